//! `wgplane bench` against a real appliance: it provisions its throw-away tenant,
//! forwards what it offers, reports the appliance's CPU, and cleans up.

mod support;

use std::process::Command;

use support::Appliance;

#[test]
fn bench_reports_a_paced_run_and_cleans_up() {
    let app = Appliance::start();
    let r = bench_json(&app, &["--seconds", "1", "--rate", "2000", "--size", "200"]);
    assert_sent_and_delivered(&r);
    assert_eq!(r["packet_bytes"], 200);
    assert!(r["appliance_cpu_seconds"].as_f64().is_some(), "{r}");
    assert!(
        r["appliance_cpu_us_per_packet"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert_no_tenants_left(&app);
}

#[test]
fn download_reaches_every_phone_through_the_appliance() {
    let app = Appliance::start();
    let r = bench_json(
        &app,
        &[
            "--mode",
            "download",
            "--peers",
            "5",
            "--seconds",
            "1",
            "--rate",
            "2000",
            "--size",
            "300",
        ],
    );
    assert_eq!(r["direction"], "gateway_to_phones", "{r}");
    assert_eq!(r["phones"], 5, "{r}");
    // Forwarded: the appliance's peer-to-peer count here, not the egress rule's.
    assert_sent_and_delivered(&r);
    assert!(r["latency"]["p50_us"].as_u64().unwrap() > 0, "{r}");
    assert_no_tenants_left(&app);
}

#[test]
fn a_given_tenant_is_stormed_by_strangers_carries_the_flow_and_stays() {
    let app = Appliance::start();
    // A storm on tenant "ktn" from keys it does not know: no handshake for any
    // of them. The patient router, a registered one, is reported (whether it got
    // its handshake within the storm depends on the machine's speed, so only
    // that the report is consistent is checked).
    let storm = bench_json(
        &app,
        &[
            "--mode",
            "handshakes",
            "--tenant",
            "ktn",
            "--peers",
            "5",
            "--rate",
            "100",
            "--seconds",
            "4",
            "--patient",
            "1",
        ],
    );
    assert_eq!(storm["tunnels"], 1, "{storm}");
    assert!(storm["sent_initiations"].as_u64().unwrap() > 0, "{storm}");
    assert_eq!(storm["responses"], 0, "strangers get no handshake: {storm}");
    assert_patient_consistent(&storm, 1);
    // Its registered router was the run's own, and is gone again.
    let routers = app.expect("GET", "/v1/tenants/ktn/routers", None, 200);
    assert_eq!(routers.as_array().map(Vec::len), Some(0), "{routers}");
    // The flow adds its gateway and phone to the same tenant.
    let flow = bench_json(
        &app,
        &[
            "--tenant",
            "ktn",
            "--seconds",
            "1",
            "--rate",
            "1000",
            "--size",
            "200",
        ],
    );
    assert!(flow["received_packets"].as_u64().unwrap() > 0, "{flow}");
    // Neither deleted it.
    let tenants = app.expect("GET", "/v1/tenants", None, 200);
    let names: Vec<_> = tenants
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["ktn"], "{tenants}");
}

/// A flow report: packets were sent, the appliance forwarded some of them and
/// the receivers got some of those; no stage counts more than the one before
/// it. About function, not speed: how many, or what share, depends on the
/// machine's load (loopback drops under load), so no count or rate is judged.
fn assert_sent_and_delivered(r: &serde_json::Value) {
    let sent = r["sent_packets"].as_u64().unwrap();
    let forwarded = r["forwarded_packets"].as_u64().unwrap();
    let received = r["received_packets"].as_u64().unwrap();
    assert!(sent > 0, "something was sent: {r}");
    assert!(
        (1..=sent).contains(&forwarded),
        "the appliance forwarded what it got: {r}"
    );
    assert!(
        (1..=forwarded).contains(&received),
        "and the receivers got it: {r}"
    );
}

/// The patient routers' report: all `routers` are there, no more completed
/// than there are, and the times are there exactly when some completed. Whether
/// they completed before the storm ended depends on the machine, not checked.
fn assert_patient_consistent(storm: &serde_json::Value, routers: u64) {
    let patient = &storm["patient"];
    assert_eq!(patient["routers"], routers, "{storm}");
    let completed = patient["completed"].as_u64().unwrap();
    assert!(completed <= routers, "{storm}");
    assert_eq!(patient["seconds_p50"].is_f64(), completed > 0, "{storm}");
    assert_eq!(patient["seconds_max"].is_f64(), completed > 0, "{storm}");
}

/// The bench's throw-away tenants are gone.
fn assert_no_tenants_left(app: &Appliance) {
    let tenants = app.expect("GET", "/v1/tenants", None, 200);
    assert_eq!(tenants.as_array().unwrap().len(), 0, "{tenants}");
}

/// A proxy address nothing answers at (the discard port on loopback).
const DEAD_PROXY: &str = "http://127.0.0.1:9";

/// Runs `wgplane bench` with these arguments against `app` and returns its JSON.
fn bench_json(app: &Appliance, args: &[&str]) -> serde_json::Value {
    // A hang guard only (a run takes seconds): `timeout` ends a stuck bench.
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300"])
        .arg(support::binary())
        .args(["bench", "--api", &format!("http://{}", app.api)])
        .arg("--token-file")
        .arg(app.state_dir().join("api-token"))
        .args(args)
        .args(["--json", "--pid", &app.pid().to_string()])
        // A proxy in the environment must not see the API (nor its token): this
        // one, on loopback, has nothing listening, so going through it fails.
        .env("HTTP_PROXY", DEAD_PROXY)
        .env("http_proxy", DEAD_PROXY)
        .env("ALL_PROXY", DEAD_PROXY)
        .env("all_proxy", DEAD_PROXY)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("run wgplane bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        app.log()
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn handshake_storm_is_answered_then_met_with_cookies_above_the_limit() {
    // 50 initiations per second and tunnel answered; above that, cookies.
    // The process-wide budget out of the way: this is about one tunnel's.
    let app = Appliance::start_with_env(&[
        ("WGPLANE_HANDSHAKES_PER_SECOND", "50"),
        ("WGPLANE_HANDSHAKE_BUDGET_PER_SECOND", "100000"),
    ]);
    let common = ["--mode", "handshakes", "--tunnels", "2", "--peers", "5"];

    // 40 per second over 2 tunnels: every initiation gets its handshake.
    let calm = bench_json(
        &app,
        &[&common[..], &["--rate", "40", "--seconds", "2"]].concat(),
    );
    let sent = calm["sent_initiations"].as_u64().unwrap();
    assert!(sent > 0, "{calm}");
    assert_eq!(calm["responses"], sent, "{calm}");
    assert_eq!(calm["cookie_replies"], 0, "{calm}");
    assert_eq!(calm["appliance_handshakes"], sent, "{calm}");
    assert!(calm["appliance_cpu_us_per_handshake"].as_f64().unwrap() > 0.0);

    // 1,000 per second over 2 tunnels, 20 times the limit: the appliance answers
    // some with handshakes and, above its limit, with cookie replies (how many
    // of each depends on how fast this machine gets them out, not judged).
    let storm = bench_json(
        &app,
        &[&common[..], &["--rate", "1000", "--seconds", "2"]].concat(),
    );
    let sent = storm["sent_initiations"].as_u64().unwrap();
    let responses = storm["responses"].as_u64().unwrap();
    let cookies = storm["cookie_replies"].as_u64().unwrap();
    assert!(sent > 0, "{storm}");
    assert!(responses > 0, "some were answered with handshakes: {storm}");
    assert!(cookies > 0, "cookies above the limit: {storm}");
    assert_eq!(
        responses + cookies,
        sent,
        "every initiation answered once: {storm}"
    );

    assert_no_tenants_left(&app);
}

#[test]
fn above_the_process_budget_cookies_take_over_on_every_tunnel() {
    // Each tunnel would answer 1,000 a second; the process computes 200.
    let app = Appliance::start_with_env(&[("WGPLANE_HANDSHAKE_BUDGET_PER_SECOND", "200")]);
    let storm = bench_json(
        &app,
        &[
            "--mode",
            "handshakes",
            "--tunnels",
            "4",
            "--peers",
            "5",
            "--rate",
            "1000",
            "--seconds",
            "4",
            "--patient",
            "4",
        ],
    );
    let sent = storm["sent_initiations"].as_u64().unwrap();
    let responses = storm["responses"].as_u64().unwrap();
    let cookies = storm["cookie_replies"].as_u64().unwrap();
    assert!(sent > 0, "{storm}");
    // Once the budget ran dry, the storm's routers (which never echo a cookie)
    // meet cookies.
    assert!(responses > 0, "{storm}");
    assert!(cookies > 0, "cookies once the budget ran dry: {storm}");
    // Routers that echo the cookie, as WireGuard peers do: reported.
    assert_patient_consistent(&storm, 4);
    assert_eq!(
        responses + cookies,
        sent,
        "every other initiation met a cookie, none went unanswered: {storm}"
    );
}

#[test]
fn forwarded_counts_are_this_runs_even_on_a_reused_tenant_behind_a_metrics_token() {
    // /metrics wants the token here; the bench sends it.
    let app = Appliance::start_with_config("[api]\nmetrics_need_token = true\n");
    let args = [
        "--tenant",
        "ktn",
        "--seconds",
        "1",
        "--rate",
        "1000",
        "--size",
        "200",
    ];
    // Two runs on the same tenant: the second's forwarded count is its own, not
    // the tenant's total (which would exceed what the second run sent).
    for _ in 0..2 {
        let r = bench_json(&app, &args);
        assert_sent_and_delivered(&r);
    }
}

/// Runs `wgplane bench` with these arguments against `app`, expects it to fail,
/// and returns its stderr.
fn bench_fails(app: &Appliance, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300"])
        .arg(support::binary())
        .args(["bench", "--api", &format!("http://{}", app.api)])
        .arg("--token-file")
        .arg(app.state_dir().join("api-token"))
        .args(args)
        .output()
        .expect("run wgplane bench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "bench should have failed: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[test]
fn a_storm_nobody_answers_is_an_error_not_a_figure() {
    let app = Appliance::start();
    // The tunnel ports are on 127.0.0.1; nothing listens on 127.0.0.2.
    let stderr = bench_fails(
        &app,
        &[
            "--mode",
            "handshakes",
            "--host",
            "127.0.0.2",
            "--tunnels",
            "1",
            "--peers",
            "2",
            "--rate",
            "100",
            "--seconds",
            "1",
        ],
    );
    assert!(stderr.contains("answered none of"), "{stderr}");
    assert_no_tenants_left(&app);
}

#[test]
fn out_of_range_arguments_and_a_missing_pid_are_refused_before_anything_runs() {
    for (args, expect) in [
        (&["--seconds", "0"][..], "--seconds"),
        (&["--seconds", "18446744073709551615"][..], "--seconds"),
        (&["--size", "27"][..], "--size"),
        (&["--size", "65001"][..], "--size"),
        (&["--senders", "0"][..], "--senders"),
        (&["--peers", "0"][..], "--peers"),
        (&["--tunnels", "0"][..], "--tunnels"),
        // Above Linux's largest PID (2^22): no such process.
        (&["--pid", "4194305"][..], "no such process"),
    ] {
        // An API nothing answers at: the refusal comes before any request.
        let out = Command::new(support::binary())
            .args(["bench", "--api", "http://127.0.0.1:9", "--token-file"])
            .arg(std::env::current_exe().expect("test binary"))
            .args(args)
            .output()
            .expect("run wgplane bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("admin API"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_given_tenants_own_egress_policy_and_gateway_are_never_replaced() {
    let app = Appliance::start();
    let router = |tenant: &str, id: &str| {
        let (_, public) = support::keypair();
        let body = format!(r#"{{"public_key":"{public}"}}"#);
        app.expect(
            "PUT",
            &format!("/v1/tenants/{tenant}/routers/{id}"),
            Some(&body),
            201,
        );
    };
    let flow = ["--seconds", "1", "--rate", "100", "--size", "200"];
    // A tenant with an egress policy of its own.
    router("own", "mt");
    app.expect(
        "PUT",
        "/v1/tenants/own/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["mt"]}"#),
        201,
    );
    let stderr = bench_fails(&app, &[&["--tenant", "own"][..], &flow].concat());
    assert!(stderr.contains("egress policy"), "{stderr}");
    let egress = app.expect("GET", "/v1/tenants/own/egress", None, 200);
    assert_eq!(egress["pool"], "10.200.0.0/24", "{egress}");
    assert_eq!(egress["gateways"], serde_json::json!(["mt"]), "{egress}");
    // A tenant with a router named like the bench's gateway, no policy.
    router("other", "gateway");
    let before = app.expect("GET", "/v1/tenants/other/routers/gateway", None, 200);
    let stderr = bench_fails(&app, &[&["--tenant", "other"][..], &flow].concat());
    assert!(stderr.contains("router named"), "{stderr}");
    let after = app.expect("GET", "/v1/tenants/other/routers/gateway", None, 200);
    assert_eq!(before["public_key"], after["public_key"], "{after}");
    app.expect("GET", "/v1/tenants/other/egress", None, 404);
}

#[test]
fn ctrl_c_ends_the_run_and_deletes_the_throw_away_tenant() {
    use std::time::{Duration, Instant};
    let app = Appliance::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr_path = dir.path().join("stderr");
    // Killed should the test fail before the bench ends: it would run an hour.
    let mut bench = support::KillOnDrop(
        Command::new(support::binary())
            .args(["bench", "--api", &format!("http://{}", app.api)])
            .arg("--token-file")
            .arg(app.state_dir().join("api-token"))
            .args(["--seconds", "3600", "--rate", "100", "--size", "200"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("run wgplane bench"),
    );
    let child = &mut bench.0;
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    // Hang guards only: the bench needs a moment to set up and to clean up.
    let guard = Duration::from_secs(120);
    let start = Instant::now();
    loop {
        let tenants = app.expect("GET", "/v1/tenants", None, 200);
        if !tenants.as_array().unwrap().is_empty() {
            break;
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            panic!("the bench created no tenant:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ctrl-C, to the bench's own PID.
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            panic!("the bench did not end after Ctrl-C:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{}", stderr());
    assert!(stderr().contains("interrupted"), "{}", stderr());
    assert_no_tenants_left(&app);
}

/// The echoing routers send initiations prepared before the run and write each
/// cookie into them themselves. With every tunnel under load from its second
/// initiation a second on, only initiations with a valid mac2 get handshakes.
#[test]
fn routers_that_echo_cookies_from_addresses_of_their_own_get_handshakes() {
    let app = Appliance::start_with_env(&[("WGPLANE_HANDSHAKES_PER_SECOND", "1")]);
    let storm = bench_json(
        &app,
        &[
            "--mode",
            "handshakes",
            "--tunnels",
            "2",
            "--peers",
            "2",
            "--rate",
            "100",
            "--seconds",
            "3",
            "--echoing",
            "4",
            "--sources",
            "8",
        ],
    );
    assert_eq!(storm["sources"], 8, "{storm}");
    let echoing = &storm["echoing"];
    assert_eq!(echoing["routers"], 4, "{storm}");
    let handshakes = echoing["handshakes"].as_u64().unwrap();
    // Two tunnels let one initiation a second through without a cookie: a few
    // handshakes in 3 s. The rest needed the routers' mac2.
    assert!(echoing["cookie_replies"].as_u64().unwrap() > 0, "{storm}");
    assert!(handshakes >= 20, "{storm}");
    // What was prepared sufficed.
    assert_eq!(echoing["live_initiations"], 0, "{storm}");
    assert!(
        handshakes <= echoing["initiations"].as_u64().unwrap(),
        "{storm}"
    );
    // The appliance answered at least every handshake the routers counted.
    let responses = storm["responses"].as_u64().unwrap();
    assert!(
        storm["appliance_handshakes"].as_u64().unwrap() >= handshakes + responses,
        "{storm}"
    );
}

#[test]
fn sources_need_the_appliance_on_loopback() {
    let app = Appliance::start();
    let out = Command::new(support::binary())
        .args(["bench", "--api", &format!("http://{}", app.api)])
        .arg("--token-file")
        .arg(app.state_dir().join("api-token"))
        .args([
            "--mode",
            "handshakes",
            "--host",
            "127.0.0.2",
            "--sources",
            "2",
        ])
        .args(["--seconds", "1", "--rate", "10", "--tunnels", "1"])
        .output()
        .expect("run wgplane bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--sources 2") && stderr.contains("127.0.0.1"),
        "{stderr}"
    );
    assert_no_tenants_left(&app);
}
