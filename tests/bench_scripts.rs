//! The benchmark scripts of `benches/` run end to end, as the README tells users
//! to run them: `hubs.sh` builds its namespace lab and puts the three hubs and
//! the relay that is their floor side by side, `storm.sh` storms an appliance pinned to one core next to a flow.
//!
//! Runs are short and the figures are not judged (a test never times anything):
//! what is checked is that every part of each script ran and reported, and that
//! the traffic went where the lab says it goes. The two scripts share the
//! machine's cores, so they run one after the other.
//!
//! `storm.sh` runs each storm twice, alone (the storm's CPU figures) and with
//! the flow inside it (the flow's figures, no storm CPU).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::netns;
use serde_json::Value;

/// One script at a time: both load the machine's two cores.
static SCRIPTS: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `benches/<script>` with `args`, panics with its output when it fails,
/// and returns the JSON it wrote to the `--json` file.
fn run_script(script: &str, args: &[&str], json: &Path) -> Value {
    // A hang guard only: `timeout` ends a stuck script with SIGTERM, which runs
    // its clean-up (namespaces, processes), and SIGKILL a minute later.
    let out = Command::new("timeout")
        .args(["--kill-after=60", "1800", "bash"])
        .arg(repo().join("benches").join(script))
        .args(args)
        .arg("--json")
        .arg(json)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("{script} wrote no JSON ({e}):\n{stdout}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{script}: bad JSON ({e}): {text}"))
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

#[test]
fn hubs_script_measures_the_hubs_and_their_floor_in_one_run() {
    let tools = [
        "ip",
        "ss",
        "iptables",
        "sysctl",
        "ping",
        "iperf3",
        "wireguard-go",
        "wg",
        "curl",
        "python3",
        "timeout",
    ];
    if !netns::prerequisites_met(
        "hubs_script_measures_the_hubs_and_their_floor_in_one_run",
        &tools,
    ) {
        return;
    }
    let _one = SCRIPTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("hubs.json");
    let report = run_script(
        "hubs.sh",
        &["--runs", "1", "--seconds", "2", "--udp-rate", "5000"],
        &json,
    );

    // The relay carries the phone's and the gateway's own WireGuard session.
    let hubs = ["wgplane", "wireguard-go", "boringtun", "relay"];
    assert_eq!(report["hubs"], serde_json::json!(hubs), "{report}");
    let rows = report["raw"].as_array().expect("raw rows");
    for hub in hubs {
        let row = |kind: &str| {
            rows.iter()
                .find(|r| r["hub"] == hub && r["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} row for {hub}: {report}"))
        };
        // TCP through phone -> hub -> gateway (masquerade) -> internet: bytes
        // arrived, and the hub process was charged for carrying them.
        let tcp = row("tcp");
        assert!(number(tcp, "bytes") > 0.0, "{tcp}");
        assert!(number(tcp, "mbit_s") > 0.0, "{tcp}");
        assert!(number(tcp, "hub_cpu_s_per_gib") > 0.0, "{tcp}");
        assert!(
            number(tcp, "machine_cpu_s_per_gib") >= number(tcp, "hub_cpu_s_per_gib"),
            "the machine includes the hub: {tcp}"
        );
        // 64-byte UDP: packets reached the internet host through this hub.
        let udp = row("udp");
        assert!(number(udp, "received") > 0.0, "{udp}");
        assert!(number(udp, "received") <= number(udp, "sent"), "{udp}");
        assert!(number(udp, "hub_cpu_us_per_pkt") > 0.0, "{udp}");
    }
    // Every other hub's median is set against wgplane's.
    for key in ["tcp.hub_cpu_s_per_gib", "udp.hub_cpu_us_per_pkt"] {
        let summary = &report["summary"][key];
        for hub in ["wireguard-go", "boringtun", "relay"] {
            assert!(
                summary[hub]["ratio_to_wgplane"].as_f64().is_some(),
                "{key}: {summary}"
            );
        }
        // ... and every hub's CPU against the floor's.
        for hub in hubs {
            assert!(
                summary[hub]["above_floor"].as_f64().is_some(),
                "{key}: {summary}"
            );
        }
    }
}

#[test]
fn storm_script_reports_the_flow_alone_and_under_both_storms() {
    if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
        // storm.sh pins the appliance and the load generators to different CPUs.
        if netns::under_ci() {
            panic!("storm.sh needs 2 CPUs and CI has fewer");
        }
        eprintln!(
            "SKIP storm_script_reports_the_flow_alone_and_under_both_storms: fewer than 2 CPUs"
        );
        return;
    }
    for tool in ["taskset", "curl", "python3", "timeout"] {
        if netns::find_in_path(tool).is_none() {
            assert!(!netns::under_ci(), "`{tool}` is missing under CI");
            eprintln!(
                "SKIP storm_script_reports_the_flow_alone_and_under_both_storms: no `{tool}`"
            );
            return;
        }
    }
    let _one = SCRIPTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("storm.json");
    let report = run_script(
        "storm.sh",
        &[
            // Below the process's handshake budget (2,000/s): the script's
            // orchestration is under test here, not the appliance under load
            // (tests/bench_cli.rs and tests/sim_handshake.rs cover that).
            "--rates",
            "500",
            "--seconds",
            "6",
            "--flow-rate",
            "2000",
            "--flow-seconds",
            "2",
        ],
        &json,
    );

    let rows = report.as_array().expect("one row per rate");
    assert_eq!(rows.len(), 1, "{report}");
    let row = &rows[0];
    assert_eq!(row["storm_rate"], 500, "{row}");
    for flow in [
        "flow_alone",
        "flow_under_storm",
        "flow_under_storm_on_own_tunnel",
        "flow_under_proven_storm",
    ] {
        let f = &row[flow];
        // Sent, and forwarded by the appliance (what share depends on the
        // machine's load, not judged).
        let sent = number(f, "sent");
        let forwarded = number(f, "forwarded");
        assert!(sent > 0.0, "{flow}: {f}");
        assert!(
            forwarded > 0.0 && forwarded <= sent,
            "{flow}: the appliance forwarded the flow: {f}"
        );
        assert!(number(f, "p50_us") > 0.0, "{flow}: {f}");
    }
    for storm in ["storm", "storm_own_tunnel", "storm_proven"] {
        let s = &row[storm];
        assert!(number(s, "sent_initiations") > 0.0, "{storm}: {s}");
        assert!(number(s, "appliance_cores") > 0.0, "{storm}: {s}");
        // The routers that echo cookies, as WireGuard peers do, are reported
        // (how many got through before the storm ended depends on the machine).
        assert_eq!(s["patient"]["routers"], 20, "{storm}: {s}");
        assert!(number(&s["patient"], "completed") <= 20.0, "{storm}: {s}");
    }
    // The passes that carried the flow report the storm's answers, not its CPU
    // (which includes the flow's forwarding).
    // The address-proven storm: 200 routers echo cookies, every router from an
    // address of its own. The storm is below the budget here, so they get
    // handshakes (how many depends on the machine).
    for storm in ["storm_proven", "storm_proven_with_flow"] {
        let s = &row[storm];
        assert_eq!(s["sources"], 420, "{storm}: {s}");
        let e = &s["echoing"];
        assert_eq!(e["routers"], 200, "{storm}: {s}");
        assert!(number(e, "handshakes") > 0.0, "{storm}: {s}");
        assert!(
            number(e, "handshakes") <= number(e, "initiations"),
            "{storm}: {s}"
        );
    }
    for storm in [
        "storm_with_flow",
        "storm_own_tunnel_with_flow",
        "storm_proven_with_flow",
    ] {
        let s = &row[storm];
        assert!(number(s, "sent_initiations") > 0.0, "{storm}: {s}");
        assert!(s.get("appliance_cores").is_none(), "{storm}: {s}");
        assert!(
            s.get("appliance_cpu_us_per_initiation").is_none(),
            "{storm}: {s}"
        );
    }
    // The storm on other tunnels comes from registered routers: each initiation
    // is answered, with a handshake or a cookie reply.
    let s = &row["storm"];
    assert_eq!(
        number(s, "responses") + number(s, "cookie_replies"),
        number(s, "sent_initiations"),
        "{s}"
    );
}
