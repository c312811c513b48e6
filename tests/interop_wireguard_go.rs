//! End to end with real WireGuard peers: wireguard-go on a phone and on a
//! tenant's gateway (a simulated MikroTik), the real `wgplane` binary as hub,
//! all in network namespaces joined by veth pairs.
//!
//! ```text
//!  phone ns                 hub ns                    gw ns                        inet ns
//!  wg 10.200.0.2  --veth--  wgplane  --veth--  wg 10.100.0.40, MASQUERADE --veth--  HTTP server
//!  198.51.100.2         198.51.100.1 203.0.113.1   203.0.113.2   198.18.0.1        198.18.0.2
//! ```
//!
//! The phone's default route is its tunnel. wgplane's egress policy sends the
//! phone's packets to the gateway, which masquerades them towards the HTTP
//! server; `inet` has no route back to the pool, so an answer proves the path.
//! Pings with a TTL of 1 and 2 show the hops (the hub, then the gateway), and
//! the hub's ICMP errors are read by real IP stacks. Then the gateway goes down
//! and the phone must get nowhere.
//!
//! Needs root, `ip netns`, wireguard-go, wg, iptables, curl and python3: without
//! them it prints `SKIP` and passes, except under `CI`, where it fails. On a
//! failure it prints diagnostics (logs, `wg show`, routes, API state), and with
//! `WGPLANE_INTEROP_DIAG=1` on success too.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::{
    prerequisites_met, run_args, run_checked, start_wireguard_go, unique_name, wait_for,
    wait_wgplane_ready, wg_keypair, write_private, Netns, NsApi, Proc,
};
use serde_json::{json, Value};

const TEST: &str = "interop_wireguard_go";
/// Programs the test runs (CI installs them).
const TOOLS: &[&str] = &[
    "ip",
    "wireguard-go",
    "wg",
    "wg-quick",
    "iptables",
    "curl",
    "python3",
    "sysctl",
    "ss",
];
const API_PORT: u16 = 7443;
const HTTP_PORT: u16 = 8000;

#[test]
fn phone_reaches_internet_through_gateway_and_not_without_it() {
    if !prerequisites_met(TEST, TOOLS) {
        return;
    }
    let mut lab = Lab::new();
    lab.start_wgplane();
    let tunnel = lab.provision();
    lab.start_gateway(&tunnel);
    lab.start_phone(&tunnel);
    lab.wait_gateway_connected();

    // Phone -> hub -> gateway -> internet and back. The first packets trigger the
    // phone's handshake, so allow retries.
    let url = format!("http://198.18.0.2:{HTTP_PORT}/");
    let body = wait_for(Duration::from_secs(20), || {
        let out = lab.phone.output(&["curl", "-sS", "--max-time", "5", &url]);
        if out.status.success() {
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            eprintln!(
                "{TEST}: curl from phone failed, retrying: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
    })
    .expect("the phone never reached the internet server through wgplane and the gateway");
    assert!(
        body.contains(&lab.marker),
        "unexpected body from the internet server: {body:?}"
    );
    let clients = lab.http_clients();
    assert!(
        !clients.is_empty() && clients.iter().all(|c| c == "198.18.0.1"),
        "the internet server should see only the gateway's masqueraded address 198.18.0.1, saw {clients:?}"
    );

    // The hops, as real IP stacks see them (a traceroute by hand): with one hop
    // of TTL the phone's ping ends at the hub, which says so from the tenant's
    // server address; with two, at the gateway, the MikroTik that every packet
    // of the phone's passes. And a router pinging an address no peer owns hears
    // "host unreachable" from the hub, as kernel WireGuard would answer.
    for (ttl, hop) in [("1", "10.100.0.1"), ("2", "10.100.0.40")] {
        let out = lab
            .phone
            .output(&["ping", "-n", "-c", "1", "-W", "3", "-t", ttl, "198.18.0.2"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("From {hop}")) && text.contains("Time to live exceeded"),
            "TTL {ttl}: {text}"
        );
    }
    let out = lab
        .gw
        .output(&["ping", "-n", "-c", "1", "-W", "3", "10.100.9.9"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 10.100.0.1") && text.contains("Destination Host Unreachable"),
        "{text}"
    );

    // kill -9 and restart on the same state: the same wireguard-go peers, never
    // provisioned again, reconnect and the phone reaches the internet again. The
    // phone's own timers bring it back within about 15-25 s. The gateway, which
    // still holds its old session and sends only keepalives on it, would stay
    // away for up to three minutes: wgplane kept where it last heard from it and
    // wakes it with the phone's first packet.
    lab.crash_and_restart_wgplane();
    let body = wait_for(Duration::from_secs(60), || {
        let out = lab.phone.output(&["curl", "-sS", "--max-time", "3", &url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .expect("after kill -9 and a restart, the phone never reached the internet again");
    assert!(body.contains(&lab.marker));
    let tenant = lab.expect_api("GET", "/v1/tenants/kitonga", None, 200);
    assert_eq!(tenant["routers"], 1, "restored: {tenant}");
    assert_eq!(tenant["clients"], 1, "restored: {tenant}");

    // Gateway down: once wgplane no longer counts it live, the egress policy has
    // nowhere else to send the phone's packets: they are dropped and counted.
    lab.gw_wg.as_mut().expect("gateway running").stop();
    let route = "/v1/tenants/kitonga/route?src=10.200.0.2&dst=198.18.0.2";
    let down = wait_for(Duration::from_secs(60), || {
        let (code, body) = lab.api("GET", route, None);
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["reason"] == "egress_down").then_some(())
    });
    assert!(
        down.is_some(),
        "the gateway never stopped counting as live: {}",
        lab.api("GET", route, None).1
    );
    let drops_before = lab.egress_down_drops();
    let seen_before = lab.http_clients().len();
    let out = lab.phone.output(&["curl", "-sS", "--max-time", "5", &url]);
    assert!(
        !out.status.success(),
        "with the gateway down the phone still got an answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let clients = lab.http_clients();
    assert_eq!(
        clients.len(),
        seen_before,
        "with the gateway down, requests still reached the internet server: {clients:?}"
    );
    assert!(
        lab.egress_down_drops() > drops_before,
        "the phone's packets were not counted as egress_down"
    );
    assert!(
        lab.wgplane.as_mut().expect("wgplane started").is_running(),
        "wgplane exited while the gateway was down"
    );
}

/// What provisioning hands to the WireGuard peers.
struct Tunnel {
    hub_pub: String,
    port: u64,
    gw_key: PathBuf,
    /// The wg-quick config the API generated for the phone.
    phone_config: String,
}

/// Everything the test set up. Fields drop in order: processes first, then the
/// namespaces, then the temporary directory. On a panic, `Drop` prints
/// diagnostics before any of that goes away.
struct Lab {
    wgplane: Option<Proc>,
    phone_wg: Option<Proc>,
    gw_wg: Option<Proc>,
    http: Proc,
    phone: Netns,
    hub: Netns,
    gw: Netns,
    inet: Netns,
    phone_if: String,
    gw_if: String,
    marker: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("wgplane-interop-")
            .tempdir()
            .expect("create temporary directory");
        let phone = Netns::new("phone");
        let hub = Netns::new("hub");
        let gw = Netns::new("gw");
        let inet = Netns::new("inet");
        phone.veth(
            "eth0",
            "198.51.100.2/24",
            &hub,
            "to-phone",
            "198.51.100.1/24",
        );
        gw.veth("eth0", "203.0.113.2/24", &hub, "to-gw", "203.0.113.1/24");
        gw.veth("to-inet", "198.18.0.1/24", &inet, "eth0", "198.18.0.2/24");

        gw.sysctl("net.ipv4.ip_forward", "1");
        gw.run_words("ip route add default via 198.18.0.2");
        gw.run_words("iptables -t nat -A POSTROUTING -s 10.200.0.0/24 -o to-inet -j MASQUERADE");

        // The internet: a web server that logs each client's address. No route to
        // 10.200.0.0/24 here, so only masqueraded traffic can be answered.
        let www = dir.path().join("www");
        fs::create_dir(&www).expect("create web root");
        let marker = format!("wgplane-interop-{}", std::process::id());
        fs::write(www.join("index.html"), format!("{marker}\n")).expect("write index.html");
        let http = inet.spawn(
            "http server",
            &[
                "python3",
                "-u",
                "-m",
                "http.server",
                &HTTP_PORT.to_string(),
                "--bind",
                "198.18.0.2",
                "--directory",
                path_str(&www),
            ],
            &[],
            &dir.path().join("http.log"),
        );
        let mut lab = Lab {
            wgplane: None,
            phone_wg: None,
            gw_wg: None,
            http,
            phone,
            hub,
            gw,
            inet,
            phone_if: unique_name("wgph"),
            gw_if: unique_name("wggw"),
            marker,
            dir,
        };
        let filter = format!("sport = :{HTTP_PORT}");
        let listening = wait_for(Duration::from_secs(10), || {
            let out = lab.inet.capture(&["ss", "-Hltn", &filter]);
            (!out.trim().is_empty()).then_some(())
        });
        assert!(
            listening.is_some(),
            "the HTTP server in inet never listened"
        );
        assert!(
            lab.http.is_running(),
            "the HTTP server exited: {}",
            lab.http.log()
        );
        lab
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    fn start_wgplane(&mut self) {
        let state = self.state_dir();
        fs::create_dir_all(&state).expect("create state dir");
        let api = format!("127.0.0.1:{API_PORT}");
        let args = run_args(&state, &api, "198.51.100.1");
        let argv: Vec<&str> = std::iter::once(env!("CARGO_BIN_EXE_wgplane"))
            .chain(args.iter().map(String::as_str))
            .collect();
        let proc = self.hub.spawn(
            "wgplane",
            &argv,
            // A gateway that stops sending (keepalive every 25 s) is not live
            // after 30 s instead of the default 60: the gateway-down check waits less.
            &[("NO_COLOR", "1"), ("WGPLANE_LIVENESS_TIMEOUT_SECS", "30")],
            &self.dir().join("wgplane.log"),
        );
        let header_file = self.dir().join("auth-header");
        let proc = self.wgplane.insert(proc);
        wait_wgplane_ready(
            &self.hub,
            proc,
            &api,
            &state.join("api-token"),
            &header_file,
        );
    }

    /// Provisioning through the API, as the platform backend does it: the
    /// tenant's tunnel, the gateway router, the egress policy, the phone.
    fn provision(&self) -> Tunnel {
        let (gw_key, gw_pub) = self.keypair("gw");

        let tenant = self.expect_api("PUT", "/v1/tenants/kitonga", Some(json!({})), 201);
        let hub_pub = str_field(&tenant, "server_public_key").to_string();
        assert_eq!(tenant["listen_port"], 51820, "tenant: {tenant}");
        assert_eq!(tenant["subnet_cidr"], "10.100.0.0/16", "tenant: {tenant}");
        assert_eq!(tenant["server_ip"], "10.100.0.1", "tenant: {tenant}");
        let port = tenant["listen_port"]
            .as_u64()
            .expect("listen_port is a number");

        let router = self.expect_api(
            "PUT",
            "/v1/tenants/kitonga/routers/mikrotik-1",
            Some(json!({"name": "gw", "public_key": gw_pub, "vpn_ip": "10.100.0.40"})),
            201,
        );
        assert_eq!(router["vpn_ip"], "10.100.0.40", "router: {router}");
        assert_eq!(router["public_key"], gw_pub.as_str(), "router: {router}");

        self.expect_api(
            "PUT",
            "/v1/tenants/kitonga/egress",
            Some(json!({"pool": "10.200.0.0/24", "gateways": ["mikrotik-1"]})),
            201,
        );

        // The phone's key pair is generated by wgplane: the phone gets a complete
        // wg-quick config, as a real phone would from the QR code.
        let client = self.expect_api(
            "PUT",
            "/v1/tenants/kitonga/clients/phone-1",
            Some(json!({"name": "phone", "vpn_ip": "10.200.0.2"})),
            201,
        );
        assert_eq!(client["vpn_ip"], "10.200.0.2", "client: {client}");
        let phone_config = str_field(&client, "config").to_string();
        Tunnel {
            hub_pub,
            port,
            gw_key,
            phone_config,
        }
    }

    /// The gateway: a tunnel to the hub carrying its subnet and the client pool
    /// (so return traffic to the phone is accepted), the pool routed into it, and
    /// the pool masqueraded towards the internet (set up in [`Lab::new`]).
    fn start_gateway(&mut self, t: &Tunnel) {
        let gw_if = &self.gw_if;
        let proc = start_wireguard_go(&self.gw, "gw wireguard-go", gw_if, self.dir.path());
        self.gw_wg = Some(proc);
        self.gw.run_words(&format!(
            "wg set {gw_if} private-key {} peer {} endpoint 203.0.113.1:{} \
             allowed-ips 10.100.0.0/16,10.200.0.0/24 persistent-keepalive 25",
            path_str(&t.gw_key),
            t.hub_pub,
            t.port
        ));
        self.gw
            .run_words(&format!("ip address add 10.100.0.40/16 dev {gw_if}"));
        self.gw
            .run_words(&format!("ip link set {gw_if} mtu 1420 up"));
        self.gw
            .run_words(&format!("ip route add 10.200.0.0/24 dev {gw_if}"));
    }

    /// The phone, configured from the API's wg-quick config: `wg-quick strip` turns
    /// it into what `wg setconf` takes; the address comes from its `Address` line.
    /// Everything goes through the tunnel; the underlay /24 stays connected, so the
    /// hub's endpoint remains reachable.
    fn start_phone(&mut self, t: &Tunnel) {
        let phone_if = self.phone_if.clone();
        let proc = start_wireguard_go(
            &self.phone,
            "phone wireguard-go",
            &phone_if,
            self.dir.path(),
        );
        self.phone_wg = Some(proc);
        assert!(
            t.phone_config.contains("Endpoint = 198.51.100.1:51820"),
            "config: {}",
            t.phone_config
        );
        let conf = self.dir().join(format!("{phone_if}.conf"));
        write_private(&conf, &t.phone_config);
        let stripped = run_checked(
            std::process::Command::new("wg-quick")
                .arg("strip")
                .arg(&conf),
        );
        let setconf = self.dir().join(format!("{phone_if}.setconf"));
        write_private(&setconf, &stripped);
        self.phone
            .run_words(&format!("wg setconf {phone_if} {}", path_str(&setconf)));
        let address = t
            .phone_config
            .lines()
            .find_map(|l| l.strip_prefix("Address = "))
            .expect("Address line in the phone's config");
        self.phone
            .run_words(&format!("ip address add {address} dev {phone_if}"));
        self.phone
            .run_words(&format!("ip link set {phone_if} mtu 1420 up"));
        self.phone
            .run_words(&format!("ip route add default dev {phone_if}"));
    }

    /// Crashes wgplane (SIGKILL) and starts it again on the same state directory.
    fn crash_and_restart_wgplane(&mut self) {
        let mut old = self.wgplane.take().expect("wgplane running");
        old.kill9();
        fs::rename(
            self.dir().join("wgplane.log"),
            self.dir().join("wgplane-before-crash.log"),
        )
        .expect("keep the first log");
        self.start_wgplane();
    }

    /// The gateway's keepalive starts a handshake as soon as its link is up; from
    /// it the hub learns the gateway's endpoint, and the API must say so.
    fn wait_gateway_connected(&self) {
        let shook = wait_for(Duration::from_secs(15), || {
            latest_handshake(&self.gw, &self.gw_if).filter(|t| *t > 0)
        });
        assert!(
            shook.is_some(),
            "the gateway never completed a handshake with wgplane"
        );
        let path = "/v1/tenants/kitonga/routers/mikrotik-1";
        let connected = wait_for(Duration::from_secs(5), || {
            let (code, body) = self.api("GET", path, None);
            let v: Value = serde_json::from_str(&body).ok()?;
            (code == 200 && v["status"] == "connected").then_some(())
        });
        assert!(
            connected.is_some(),
            "after the gateway's handshake, GET {path} should say \"status\": \"connected\"; it says {}",
            self.api("GET", path, None).1
        );
    }

    /// One API call from inside the hub namespace: `(status, body)`.
    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        self.hub_api().call(method, path, body)
    }

    /// The tenant's `egress_down` drop counter, from `/metrics`.
    fn egress_down_drops(&self) -> f64 {
        let (_, text) = self.api("GET", "/metrics", None);
        text.lines()
            .find(|l| {
                l.starts_with("wgplane_packets_dropped_total")
                    && l.contains("tenant=\"kitonga\"")
                    && l.contains("reason=\"egress_down\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn hub_api(&self) -> NsApi<'_> {
        NsApi {
            ns: &self.hub,
            port: API_PORT,
            header_file: self.dir().join("auth-header"),
        }
    }

    /// An API call that must answer `want` with a JSON body (or no body).
    fn expect_api(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        self.hub_api().expect(method, path, body, want)
    }

    /// A WireGuard keypair from `wg`: (private key file, public key).
    fn keypair(&self, name: &str) -> (PathBuf, String) {
        wg_keypair(self.dir(), name)
    }

    /// Client addresses in the HTTP server's access log, in order.
    fn http_clients(&self) -> Vec<String> {
        // `198.18.0.1 - - [29/Nov/2025 18:00:00] "GET / HTTP/1.1" 200 -`
        self.http
            .log()
            .lines()
            .filter(|l| l.contains("\"GET "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    fn dump_diagnostics(&mut self) {
        let mut d = String::new();
        let mut section = |title: &str, text: String| {
            d.push_str(&format!("----- {title} -----\n{}\n", text.trim_end()));
        };
        for proc in [&mut self.wgplane, &mut self.phone_wg, &mut self.gw_wg]
            .into_iter()
            .flatten()
            .chain([&mut self.http])
        {
            let state = match proc.exit_status() {
                None => format!("running, pid {}", proc.pid()),
                Some(s) => format!("exited: {s}"),
            };
            section(&format!("{} ({state})", proc.label()), proc.log());
        }
        for (ns, ifn) in [(&self.phone, &self.phone_if), (&self.gw, &self.gw_if)] {
            section(
                &format!("{}: wg show", ns.name()),
                ns.capture(&["wg", "show", ifn]),
            );
        }
        for ns in [&self.phone, &self.hub, &self.gw, &self.inet] {
            section(
                &format!("{}: addresses and routes", ns.name()),
                ns.capture(&["ip", "-br", "address"]) + &ns.capture(&["ip", "route"]),
            );
        }
        section(
            "gw: nat table",
            self.gw
                .capture(&["iptables", "-t", "nat", "-L", "-n", "-v"]),
        );
        if self.dir().join("auth-header").exists() {
            let paths = [
                "/v1/tenants/kitonga",
                "/v1/tenants/kitonga/routers",
                "/v1/tenants/kitonga/clients",
                "/v1/tenants/kitonga/egress",
                "/v1/tenants/kitonga/route?src=10.200.0.2&dst=198.18.0.2",
            ];
            for (title, text) in self.hub_api().diagnostics(&paths) {
                section(&title, text);
            }
        }
        eprintln!("===== {TEST} diagnostics =====\n{d}===== end of diagnostics =====");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // WGPLANE_INTEROP_DIAG=1 shows them on success too.
        if std::thread::panicking() || std::env::var_os("WGPLANE_INTEROP_DIAG").is_some() {
            self.dump_diagnostics();
        }
    }
}

/// The latest handshake time (Unix seconds, 0 = never) of the first peer of `ifname`.
fn latest_handshake(ns: &Netns, ifname: &str) -> Option<u64> {
    let out = ns.output(&["wg", "show", ifname, "latest-handshakes"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("missing string field {field:?} in {v}"))
}

fn path_str(p: &Path) -> &str {
    let s = p.to_str().expect("temporary paths are UTF-8");
    assert!(
        !s.contains(char::is_whitespace),
        "temporary path {s:?} contains whitespace"
    );
    s
}
