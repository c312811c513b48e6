//! `wgplane bench` against a real appliance: it provisions its throw-away tenant,
//! forwards what it offers, reports the appliance's CPU, and cleans up.

mod support;

use std::process::Command;

use support::Appliance;

#[test]
fn bench_reports_a_paced_run_and_cleans_up() {
    let app = Appliance::start();
    let token = app.state_dir().join("api-token");
    let out = Command::new(support::binary())
        .args([
            "bench",
            "--api",
            &format!("http://{}", app.api),
            "--token-file",
        ])
        .arg(&token)
        .args([
            "--seconds",
            "1",
            "--rate",
            "2000",
            "--size",
            "200",
            "--json",
        ])
        .args(["--pid", &app.pid().to_string()])
        .output()
        .expect("run wgplane bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        app.log()
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let sent = r["sent_packets"].as_u64().unwrap();
    let forwarded = r["forwarded_packets"].as_u64().unwrap();
    let received = r["received_packets"].as_u64().unwrap();
    assert!((1500..=2600).contains(&sent), "paced at about 2000/s: {r}");
    assert!(
        forwarded >= sent * 90 / 100,
        "the appliance forwarded what it got: {r}"
    );
    assert!(
        received >= forwarded * 90 / 100,
        "and the gateway received it: {r}"
    );
    assert_eq!(r["packet_bytes"], 200);
    assert!(r["appliance_cpu_seconds"].as_f64().is_some(), "{r}");
    assert!(
        r["appliance_cpu_us_per_packet"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    // The throw-away tenant is gone.
    let tenants = app.expect("GET", "/v1/tenants", None, 200);
    assert_eq!(tenants.as_array().unwrap().len(), 0, "{tenants}");
}
