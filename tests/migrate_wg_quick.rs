//! Migration from kernel WireGuard, end to end: a wg-quick server
//! configuration runs first on wireguard-go (the old hub, as the platform ran
//! it), with a wireguard-go router connected to it; then the old hub stops,
//! the real `wgplane` binary starts on the same address, `wgplane import` reads
//! the same file, and the router, whose configuration is never touched, reaches
//! the server address again through wgplane.
//!
//! ```text
//!  router ns                          hub ns
//!  wg 10.100.1.1/16  --veth--  wireguard-go 10.100.0.1, then wgplane
//!  198.51.100.2                198.51.100.1, UDP 51820
//! ```
//!
//! Needs root, `ip netns`, wireguard-go, wg, wg-quick, curl and ping: without
//! them it prints `SKIP` and passes, except under `CI`, where it fails.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::netns::{
    prerequisites_met, run_args, start_wireguard_go, unique_name, wait_for, wait_wgplane_ready,
    wg_keypair, write_private, Netns, NsApi,
};

const TEST: &str = "migrate_wg_quick";
const TOOLS: &[&str] = &["ip", "wireguard-go", "wg", "wg-quick", "curl", "ping"];
const API_PORT: u16 = 7444;

#[test]
fn a_wg_quick_servers_router_reconnects_unchanged_after_import() {
    if !prerequisites_met(TEST, TOOLS) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("wgplane-migrate-")
        .tempdir()
        .expect("create temporary directory");
    let dir = dir.path();
    let hub = Netns::new("hub");
    let router = Netns::new("rtr");
    router.veth("eth0", "198.51.100.2/24", &hub, "to-rtr", "198.51.100.1/24");

    // The platform's server configuration, as wg-quick keeps it.
    let (server_key_file, server_pub) = wg_keypair(dir, "server");
    let server_key = fs::read_to_string(&server_key_file).expect("read the server key");
    let server_key = server_key.trim();
    let (router_key_file, router_pub) = wg_keypair(dir, "router");
    let old_if = unique_name("old");
    let conf = dir.join(format!("{old_if}.conf"));
    write_private(
        &conf,
        &format!(
            "[Interface]\nAddress = 10.100.0.1/16\nListenPort = 51820\nPrivateKey = {server_key}\n\
             PostUp = sysctl -q net.ipv4.ip_forward=1\n\n\
             [Peer]\n# Name = Branch A\nPublicKey = {router_pub}\n\
             AllowedIPs = 10.100.1.1/32, 192.168.88.0/24\n"
        ),
    );

    // The old hub: wireguard-go with the file, as wg-quick would set it up.
    let mut old = start_wireguard_go(&hub, "old hub wireguard-go", &old_if, dir);
    let stripped = dir.join("stripped.conf");
    write_private(&stripped, &hub.run(&["wg-quick", "strip", path_str(&conf)]));
    hub.run(&["wg", "setconf", &old_if, path_str(&stripped)]);
    hub.run_words(&format!("ip address add 10.100.0.1/16 dev {old_if}"));
    hub.run_words(&format!("ip link set {old_if} mtu 1420 up"));

    // The router, configured once for the old hub and never again.
    let rtr_if = unique_name("rtr");
    let _router_wg = start_wireguard_go(&router, "router wireguard-go", &rtr_if, dir);
    router.run_words(&format!(
        "wg set {rtr_if} private-key {} peer {server_pub} endpoint 198.51.100.1:51820 \
         allowed-ips 10.100.0.0/16 persistent-keepalive 25",
        path_str(&router_key_file)
    ));
    router.run_words(&format!("ip address add 10.100.1.1/16 dev {rtr_if}"));
    router.run_words(&format!("ip link set {rtr_if} mtu 1420 up"));
    let pings = |within: u64| {
        wait_for(Duration::from_secs(within), || {
            ok(&router.output(&["ping", "-c", "1", "-W", "1", "10.100.0.1"])).then_some(())
        })
    };
    assert!(pings(20).is_some(), "the router never reached the old hub");

    // The switch: the old hub goes, wgplane comes on the same address and port.
    old.stop();
    let state = dir.join("state");
    fs::create_dir_all(&state).expect("create state dir");
    let api = format!("127.0.0.1:{API_PORT}");
    let bin = env!("CARGO_BIN_EXE_wgplane");
    let args = run_args(&state, &api, "198.51.100.1");
    let argv: Vec<&str> = std::iter::once(bin)
        .chain(args.iter().map(String::as_str))
        .collect();
    let mut wgplane = hub.spawn(
        "wgplane",
        &argv,
        &[("NO_COLOR", "1")],
        &dir.join("wgplane.log"),
    );
    let token = state.join("api-token");
    let header = dir.join("auth-header");
    wait_wgplane_ready(&hub, &mut wgplane, &api, &token, &header);
    let import = |extra: &[&str]| {
        let url = format!("http://{api}");
        let mut argv = vec![
            bin,
            "import",
            "kitonga",
            path_str(&conf),
            "--api",
            &url,
            "--token-file",
            path_str(&token),
        ];
        argv.extend(extra);
        let out = hub.output(&argv);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(ok(&out), "wgplane import {extra:?} failed: {text}");
        assert!(
            !text.contains(server_key),
            "the import printed the private key: {text}"
        );
        text
    };
    let planned = import(&["--dry-run"]);
    assert!(
        planned.contains("would create router Branch-A (line 7)"),
        "{planned}"
    );
    assert!(planned.contains("PostUp not carried over"), "{planned}");
    let api_client = NsApi {
        ns: &hub,
        port: API_PORT,
        header_file: header,
    };
    api_client.expect("GET", "/v1/tenants/kitonga", None, 404);

    let done = import(&[]);
    assert!(done.contains("router Branch-A (line 7): created"), "{done}");
    let tenant = api_client.expect("GET", "/v1/tenants/kitonga", None, 200);
    assert_eq!(tenant["server_public_key"], server_pub.as_str(), "{tenant}");
    assert_eq!(tenant["listen_port"], 51820, "{tenant}");
    assert_eq!(tenant["subnet_cidr"], "10.100.0.0/16", "{tenant}");

    // The router's stale session finds nothing here; its next handshake (at
    // most 15 s after its first unanswered packet) finds wgplane.
    if pings(60).is_none() {
        panic!(
            "the unchanged router never reached wgplane at 10.100.0.1\nwgplane log:\n{}\n{:#?}",
            wgplane.log(),
            api_client.diagnostics(&["/v1/tenants/kitonga/routers/Branch-A"])
        );
    }
    let r = api_client.expect("GET", "/v1/tenants/kitonga/routers/Branch-A", None, 200);
    assert_eq!(r["status"], "connected", "{r}");
    assert_eq!(r["name"], "Branch A", "{r}");
    assert_eq!(r["vpn_ip"], "10.100.1.1", "{r}");
    assert_eq!(r["public_key"], router_pub.as_str(), "{r}");

    // Run again (after an import that stopped half-way): nothing changes.
    let again = import(&[]);
    assert!(again.contains("exists with this key"), "{again}");
    assert!(
        again.contains("router Branch-A (line 7): exists, up to date"),
        "{again}"
    );
    wgplane.stop();
}

fn ok(out: &Output) -> bool {
    out.status.success()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}
