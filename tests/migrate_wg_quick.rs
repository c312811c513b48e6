//! Migration from kernel WireGuard, end to end, with the platform's whole
//! design: a wg-quick server configuration runs first on wireguard-go (the old
//! hub), with the host's `ip rule` sending the phones' pool to the MikroTik
//! gateway, and three wireguard-go peers connected to it: a branch router, the
//! gateway and a phone. Then the old hub stops, the real `wgplane` binary starts
//! on the same addresses, `wgplane import --pool … --gateway …` reads the same
//! file, and the peers, whose configurations are never touched, get through
//! again: the router to the server address, the phone through wgplane and the
//! gateway to an address behind the gateway. The gateway sends nothing of its
//! own after the switch: wgplane reaches it at the endpoint the file gives.
//!
//! ```text
//!  router ns   wg 10.100.1.1   198.51.100.2 --veth-- 198.51.100.1 \
//!  gateway ns  wg 10.100.0.40  203.0.113.2  --veth-- 203.0.113.1  -- hub ns: wireguard-go
//!              (lo 198.18.9.1)                                       10.100.0.1, then
//!  phone ns    wg 10.200.0.2   198.18.1.2   --veth-- 198.18.1.1   /  wgplane, UDP 51820
//! ```
//!
//! The router and the phone have preshared keys, which the import carries.
//!
//! Needs root, `ip netns`, wireguard-go, wg, wg-quick, curl and ping: without
//! them it prints `SKIP` and passes, except under `CI`, where it fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::netns::{
    prerequisites_met, run_args, run_checked, start_wireguard_go, unique_name, wait_wgplane_ready,
    wg_keypair, write_private, Netns, NsApi, Proc,
};

const TEST: &str = "migrate_wg_quick";
const TOOLS: &[&str] = &["ip", "wireguard-go", "wg", "wg-quick", "curl", "ping"];
const API_PORT: u16 = 7444;
/// Behind the gateway: what the phones reach through it.
const BEHIND_GATEWAY: &str = "198.18.9.1";
/// The gateway's own WireGuard port, in the server's file as its endpoint.
const GATEWAY_PORT: u16 = 51900;

/// Where a peer sits: `(role, its underlay address, the hub's, its allowed
/// IPs, its tunnel address, what it pings to prove its path)`.
type Spec = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const PEERS: [Spec; 3] = [
    (
        "router",
        "198.51.100.2",
        "198.51.100.1",
        "10.100.0.0/16",
        "10.100.1.1/16",
        "10.100.0.1",
    ),
    (
        "gateway",
        "203.0.113.2",
        "203.0.113.1",
        "10.100.0.0/16,10.200.0.0/24",
        "10.100.0.40/16",
        "10.100.0.1",
    ),
    (
        "phone",
        "198.18.1.2",
        "198.18.1.1",
        "0.0.0.0/0",
        "10.200.0.2/32",
        BEHIND_GATEWAY,
    ),
];

/// A peer in its own namespace, joined to the hub's by a veth pair:
/// wireguard-go configured once, for the old hub.
struct Peer {
    role: &'static str,
    // Stopped before its namespace goes (fields drop in order).
    _wg: Proc,
    ns: Netns,
    target: &'static str,
}

impl Peer {
    fn start(
        hub: &Netns,
        dir: &Path,
        spec: Spec,
        key: &Path,
        psk: Option<&Path>,
        server_pub: &str,
    ) -> Peer {
        let (role, underlay, hub_addr, allowed, addr, target) = spec;
        let tag = &role[..2];
        let ns = Netns::new(role);
        ns.veth(
            "eth0",
            &format!("{underlay}/24"),
            hub,
            &format!("to-{tag}"),
            &format!("{hub_addr}/24"),
        );
        let ifname = unique_name(tag);
        let wg = start_wireguard_go(&ns, role, &ifname, dir);
        let psk = psk
            .map(|f| format!("preshared-key {} ", path_str(f)))
            .unwrap_or_default();
        let port = match role {
            "gateway" => format!("listen-port {GATEWAY_PORT} "),
            _ => String::new(),
        };
        ns.run_words(&format!(
            "wg set {ifname} {port}private-key {} peer {server_pub} {psk}endpoint {hub_addr}:51820 \
             allowed-ips {allowed} persistent-keepalive 25",
            path_str(key)
        ));
        ns.run_words(&format!("ip address add {addr} dev {ifname}"));
        ns.run_words(&format!("ip link set {ifname} mtu 1420 up"));
        match role {
            "phone" => ns.run_words(&format!("ip route add {target}/32 dev {ifname}")),
            "gateway" => {
                ns.run_words(&format!("ip address add {BEHIND_GATEWAY}/32 dev lo"));
                ns.run_words(&format!("ip route add 10.200.0.0/24 dev {ifname}"))
            }
            _ => String::new(),
        };
        Peer {
            role,
            _wg: wg,
            ns,
            target,
        }
    }

    fn pings(&self) -> bool {
        ok(&self.ns.output(&["ping", "-c", "1", "-W", "1", self.target]))
    }
}

/// Pings from every peer until each has got through once, up to `within`.
/// The roles of those that never did.
fn all_get_through<'a>(
    peers: impl IntoIterator<Item = &'a Peer>,
    within: Duration,
) -> Vec<&'static str> {
    let deadline = Instant::now() + within;
    let mut waiting: Vec<&Peer> = peers.into_iter().collect();
    while !waiting.is_empty() && Instant::now() < deadline {
        waiting.retain(|p| !p.pings());
    }
    waiting.iter().map(|p| p.role).collect()
}

#[test]
fn a_wg_quick_servers_peers_reconnect_unchanged_after_import() {
    if !prerequisites_met(TEST, TOOLS) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("wgplane-migrate-")
        .tempdir()
        .expect("create temporary directory");
    let dir = tmp.path();
    let hub = Netns::new("hub");

    // The platform's server configuration, as wg-quick keeps it.
    let (server_key_file, server_pub) = wg_keypair(dir, "server");
    let server_key = fs::read_to_string(&server_key_file).expect("read the server key");
    let server_key = server_key.trim();
    let keys: Vec<(PathBuf, String)> = PEERS.iter().map(|spec| wg_keypair(dir, spec.0)).collect();
    // The router and the phone also have preshared keys; the gateway has none.
    let psk = |name: &str| {
        let text = run_checked(Command::new("wg").arg("genpsk"));
        let file = dir.join(format!("{name}.psk"));
        write_private(&file, &text);
        (file, text.trim().to_string())
    };
    let psks = [Some(psk("router")), None, Some(psk("phone"))];
    let psk_line = |i: usize| {
        psks[i]
            .as_ref()
            .map(|(_, text)| format!("PresharedKey = {text}\n"))
            .unwrap_or_default()
    };
    let old_if = unique_name("old");
    let conf = dir.join(format!("{old_if}.conf"));
    write_private(
        &conf,
        &format!(
            "[Interface]\nAddress = 10.100.0.1/16\nListenPort = 51820\nPrivateKey = {server_key}\n\
             PostUp = ip rule add from 10.200.0.0/24 table 100; ip route add default dev %i table 100\n\n\
             [Peer]\n# Name = Branch A\nPublicKey = {}\n{}AllowedIPs = 10.100.1.1/32, 192.168.88.0/24\n\n\
             [Peer]\n# Name = mikrotik-1\nPublicKey = {}\n{}AllowedIPs = 10.100.0.40/32, 0.0.0.0/0\n\
             Endpoint = 203.0.113.2:{GATEWAY_PORT}\n\n\
             [Peer]\n# Name = phone 1\nPublicKey = {}\n{}AllowedIPs = 10.200.0.2/32\n",
            keys[0].1,
            psk_line(0),
            keys[1].1,
            psk_line(1),
            keys[2].1,
            psk_line(2)
        ),
    );

    // The old hub: wireguard-go with the file, and the host's policy routing
    // that wg-quick's PostUp set up.
    let mut old = start_wireguard_go(&hub, "old hub wireguard-go", &old_if, dir);
    let stripped = dir.join("stripped.conf");
    write_private(&stripped, &hub.run(&["wg-quick", "strip", path_str(&conf)]));
    hub.run(&["wg", "setconf", &old_if, path_str(&stripped)]);
    hub.sysctl("net.ipv4.ip_forward", "1");
    for line in [
        format!("ip address add 10.100.0.1/16 dev {old_if}"),
        format!("ip link set {old_if} mtu 1420 up"),
        format!("ip route add 10.200.0.0/24 dev {old_if}"),
        "ip rule add from 10.200.0.0/24 table 100".to_string(),
        format!("ip route add default dev {old_if} table 100"),
    ] {
        hub.run_words(&line);
    }

    // The peers, configured once for the old hub and never again.
    let peers: Vec<Peer> = PEERS
        .into_iter()
        .zip(keys.iter().zip(&psks))
        .map(|(spec, ((key, _), psk))| {
            Peer::start(
                &hub,
                dir,
                spec,
                key,
                psk.as_ref().map(|(f, _)| f.as_path()),
                &server_pub,
            )
        })
        .collect();
    let missing = all_get_through(&peers, Duration::from_secs(20));
    assert!(
        missing.is_empty(),
        "through the old hub, never: {missing:?}"
    );
    // The gateway's last word before the switch is answered, so that it has no
    // handshake of its own coming: it sent the phone's last echo reply, and
    // WireGuard starts a handshake 15 s after data that nothing answered.
    assert!(
        peers[1].pings(),
        "the gateway's last ping through the old hub"
    );

    // The switch: the old hub goes, wgplane comes on the same addresses and port.
    old.stop();
    hub.run_words("ip rule del from 10.200.0.0/24 table 100");
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
            "--pool",
            "10.200.0.0/24",
            "--gateway",
            "10.100.0.40",
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
    for line in [
        "would create router Branch-A (line 7)",
        "would create router mikrotik-1 (line 13): vpn_ip 10.100.0.40",
        "endpoint 203.0.113.2:51900",
        "would set the egress policy: pool 10.200.0.0/24 through mikrotik-1",
        "would create client phone-1 (line 19)",
        "PostUp not carried over",
        "has no tenant in the way",
        "0.0.0.0/0 left out",
    ] {
        assert!(planned.contains(line), "{line}: {planned}");
    }
    let api_client = NsApi {
        ns: &hub,
        port: API_PORT,
        header_file: header,
    };
    api_client.expect("GET", "/v1/tenants/kitonga", None, 404);

    let done = import(&[]);
    for line in [
        "router Branch-A (line 7): created",
        "router mikrotik-1 (line 13): created",
        "client phone-1 (line 19): created",
    ] {
        assert!(done.contains(line), "{line}: {done}");
    }
    let tenant = api_client.expect("GET", "/v1/tenants/kitonga", None, 200);
    assert_eq!(tenant["server_public_key"], server_pub.as_str(), "{tenant}");
    assert_eq!(tenant["listen_port"], 51820, "{tenant}");
    assert_eq!(tenant["subnet_cidr"], "10.100.0.0/16", "{tenant}");

    // Each peer's stale session finds nothing here; its next handshake (at
    // most 15 s after its first unanswered packet) finds wgplane. The phone's
    // packets go nowhere until the gateway is back.
    // The gateway sends nothing but keepalives, which start no handshake:
    // the phone's first packet wakes it, from the endpoint the file gave.
    let missing = all_get_through([&peers[0], &peers[2]], Duration::from_secs(60));
    if !missing.is_empty() {
        panic!(
            "never got through wgplane: {missing:?}\nwgplane log:\n{}\n{:#?}",
            wgplane.log(),
            api_client.diagnostics(&["/v1/tenants/kitonga/routers", "/v1/tenants/kitonga/clients"])
        );
    }
    // (The router's and the phone's sessions use their preshared keys: with
    // none on wgplane's side they could not have been made.)
    let paths = [
        ("routers/Branch-A", "10.100.1.1"),
        ("routers/mikrotik-1", "10.100.0.40"),
        ("clients/phone-1", "10.200.0.2"),
    ];
    for (i, (path, vpn_ip)) in paths.into_iter().enumerate() {
        let p = api_client.expect("GET", &format!("/v1/tenants/kitonga/{path}"), None, 200);
        assert_eq!(p["status"], "connected", "{p}");
        assert_eq!(p["vpn_ip"], vpn_ip, "{p}");
        assert_eq!(p["public_key"], keys[i].1.as_str(), "{p}");
        assert_eq!(p["has_preshared_key"], psks[i].is_some(), "{p}");
        if let Some((_, psk)) = &psks[i] {
            assert!(
                !p.to_string().contains(psk.as_str()),
                "the key is shown: {p}"
            );
        }
    }
    let r = api_client.expect("GET", "/v1/tenants/kitonga/routers/Branch-A", None, 200);
    assert_eq!(r["name"], "Branch A", "{r}");

    // Run again (after an import that stopped half-way): nothing changes.
    let again = import(&[]);
    for line in [
        "exists with this key",
        "router Branch-A (line 7): exists, now as the file says",
        "client phone-1 (line 19): exists, now as the file says",
    ] {
        assert!(again.contains(line), "{line}: {again}");
    }
    wgplane.stop();
}

fn ok(out: &Output) -> bool {
    out.status.success()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}
