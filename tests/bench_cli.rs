//! `wgplane bench` against a real appliance: it provisions its throw-away tenant,
//! forwards what it offers, reports the appliance's CPU, and cleans up.

mod support;

use std::process::Command;

use support::Appliance;

#[test]
fn bench_reports_a_paced_run_and_cleans_up() {
    let app = Appliance::start();
    let r = bench_json(&app, &["--seconds", "1", "--rate", "2000", "--size", "200"]);
    assert_paced_and_delivered(&r);
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
    assert_paced_and_delivered(&r);
    assert!(r["latency"]["p50_us"].as_u64().unwrap() > 0, "{r}");
    assert_no_tenants_left(&app);
}

#[test]
fn a_given_tenant_is_stormed_by_strangers_carries_the_flow_and_stays() {
    let app = Appliance::start();
    // A storm on tenant "ktn" from keys it does not know: no handshake for any
    // of them. The patient router, a registered one, gets its handshake, if need
    // be with a cookie (it starts 1 s in and retries after 1-1.33 s).
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
    assert_eq!(storm["responses"], 0, "strangers get no handshake: {storm}");
    assert_eq!(storm["patient"]["completed"], 1, "{storm}");
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

/// A flow report paced at 2,000 packets/s for a second: not more than that sent
/// (pacing), and what was sent went through the appliance to the receivers. The
/// bounds leave room for a loaded CI machine (loopback may drop under load);
/// they are about function, not speed.
fn assert_paced_and_delivered(r: &serde_json::Value) {
    let sent = r["sent_packets"].as_u64().unwrap();
    let forwarded = r["forwarded_packets"].as_u64().unwrap();
    let received = r["received_packets"].as_u64().unwrap();
    assert!((500..=2600).contains(&sent), "paced at 2000/s for 1 s: {r}");
    assert!(
        forwarded >= sent / 2,
        "the appliance forwarded what it got: {r}"
    );
    assert!(received >= forwarded / 2, "and the receivers got it: {r}");
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
    let out = Command::new(support::binary())
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
    let state = tempfile::tempdir().expect("tempdir");
    let app = Appliance::start_with(
        state,
        support::free_tcp_port(),
        support::free_udp_ports(4),
        // The process-wide budget out of the way: this is about one tunnel's.
        &[
            ("WGPLANE_HANDSHAKES_PER_SECOND", "50"),
            ("WGPLANE_HANDSHAKE_BUDGET_PER_SECOND", "100000"),
        ],
    )
    .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
    let common = ["--mode", "handshakes", "--tunnels", "2", "--peers", "5"];

    // 40 per second over 2 tunnels: every initiation gets its handshake.
    let calm = bench_json(
        &app,
        &[&common[..], &["--rate", "40", "--seconds", "2"]].concat(),
    );
    let sent = calm["sent_initiations"].as_u64().unwrap();
    assert!((60..=100).contains(&sent), "{calm}");
    assert_eq!(calm["responses"], sent, "{calm}");
    assert_eq!(calm["cookie_replies"], 0, "{calm}");
    assert_eq!(calm["appliance_handshakes"], sent, "{calm}");
    assert!(calm["appliance_cpu_us_per_handshake"].as_f64().unwrap() > 0.0);

    // 1,000 per second over 2 tunnels, 20 times the limit: the appliance answers
    // about its limit with handshakes and the rest with cookie replies.
    let storm = bench_json(
        &app,
        &[&common[..], &["--rate", "1000", "--seconds", "2"]].concat(),
    );
    let sent = storm["sent_initiations"].as_u64().unwrap();
    let responses = storm["responses"].as_u64().unwrap();
    let cookies = storm["cookie_replies"].as_u64().unwrap();
    assert!(sent >= 1_500, "{storm}");
    assert!(cookies >= sent / 2, "cookies took over: {storm}");
    assert!(
        responses <= sent / 4,
        "handshakes stayed near the limit: {storm}"
    );
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
    let state = tempfile::tempdir().expect("tempdir");
    let app = Appliance::start_with(
        state,
        support::free_tcp_port(),
        support::free_udp_ports(4),
        &[("WGPLANE_HANDSHAKE_BUDGET_PER_SECOND", "200")],
    )
    .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
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
    assert!(sent >= 3_500, "{storm}");
    // Once the budget ran dry, the storm's routers (which never echo a cookie)
    // meet cookies on every tunnel.
    assert!(
        (1..=sent / 10).contains(&responses),
        "cookies took over: {storm}"
    );
    // Routers that echo the cookie, as WireGuard peers do, get their handshake.
    let patient = &storm["patient"];
    assert_eq!(patient["routers"], 4, "{storm}");
    assert_eq!(patient["completed"], 4, "{storm}");
    assert_eq!(
        responses + cookies,
        sent,
        "every other initiation met a cookie, none went unanswered: {storm}"
    );
}
