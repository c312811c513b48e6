//! Helpers for black-box tests that start the real `wgplane` binary on loopback and
//! talk to it with real UDP sockets and HTTP.
#![allow(dead_code)]

pub mod stack_router;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde_json::Value;

/// A running `wgplane run`, killed (by PID) on drop.
pub struct Appliance {
    child: Child,
    pub api: SocketAddr,
    pub token: String,
    pub first_port: u16,
    pub state: tempfile::TempDir,
    /// Where the appliance's stderr goes (`wgplane.log` in the state dir
    /// unless the test put it elsewhere).
    log_file: PathBuf,
    http: reqwest::blocking::Client,
}

/// A TCP port that was free a moment ago, below the ephemeral range (see
/// [`free_udp_ports`]): no test's outgoing connection can take it first.
pub fn free_tcp_port() -> u16 {
    free_run(1, |p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// Start of a run of `n` UDP ports that were free a moment ago. They lie below
/// the kernel's ephemeral range (from 32768 by default), where no socket bound to
/// port 0 (a test's own clients, another appliance's) can take one of them before
/// the appliance binds it.
pub fn free_udp_ports(n: u16) -> u16 {
    free_run(n, |p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// Start of a run of `n` ports below the ephemeral range that `free` says are
/// free. Runs handed out in one process never overlap, and processes start at
/// different places.
fn free_run(n: u16, free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 15_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(65_000);
    let n32 = u32::from(n.max(1));
    assert!(
        ephemeral > LOW + 10 * n32,
        "ephemeral ports start at {ephemeral}"
    );
    let span = ephemeral - LOW - n32;
    let spread = std::process::id().wrapping_mul(7_919);
    for _ in 0..1_000 {
        let offset = NEXT.fetch_add(n32, Ordering::Relaxed);
        let start = LOW + spread.wrapping_add(offset) % span;
        let Ok(start) = u16::try_from(start) else {
            continue;
        };
        if (start..start + n.max(1)).all(&free) {
            return start;
        }
    }
    panic!("no run of {n} free ports below {ephemeral}");
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wgplane"))
}

impl Appliance {
    /// Starts the binary on loopback with a fresh state dir.
    pub fn start() -> Self {
        let state = tempfile::tempdir().expect("tempdir");
        Self::start_with(state, free_tcp_port(), free_udp_ports(4), &[])
            .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"))
    }

    /// Starts the binary on loopback with a fresh state dir and extra
    /// environment variables (`WGPLANE_*` settings, say).
    pub fn start_with_env(envs: &[(&str, &str)]) -> Self {
        let state = tempfile::tempdir().expect("tempdir");
        Self::start_with(state, free_tcp_port(), free_udp_ports(4), envs)
            .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"))
    }

    /// Starts the binary on a fresh state dir with `toml` as its config file.
    pub fn start_with_config(toml: &str) -> Self {
        let state = tempfile::tempdir().expect("tempdir");
        let config = state.path().join("wgplane.toml");
        std::fs::write(&config, toml).expect("config");
        let config = config.to_str().expect("UTF-8 path").to_owned();
        Self::start_with(
            state,
            free_tcp_port(),
            free_udp_ports(4),
            &[("WGPLANE_CONFIG", &config)],
        )
        .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"))
    }

    /// Starts the binary on an existing state dir and given ports, with extra
    /// environment variables. Err carries the log when it exits or does not answer.
    pub fn start_with(
        state: tempfile::TempDir,
        api_port: u16,
        first_port: u16,
        envs: &[(&str, &str)],
    ) -> Result<Self, String> {
        let log_file = state.path().join("wgplane.log");
        Self::start_logging_to(state, &log_file, api_port, first_port, envs)
    }

    /// Like `start_with`, with the log appended to `log_file` (outside a state
    /// dir that the test fills up, say).
    pub fn start_logging_to(
        state: tempfile::TempDir,
        log_file: &Path,
        api_port: u16,
        first_port: u16,
        envs: &[(&str, &str)],
    ) -> Result<Self, String> {
        Self::launch(state, log_file, api_port, first_port, envs, true)
    }

    /// Like `start_with`, but ready once the API answers at all: `/healthz`
    /// may say that a tunnel is down.
    pub fn start_unhealthy(
        state: tempfile::TempDir,
        api_port: u16,
        first_port: u16,
    ) -> Result<Self, String> {
        let log_file = state.path().join("wgplane.log");
        Self::launch(state, &log_file, api_port, first_port, &[], false)
    }

    fn launch(
        state: tempfile::TempDir,
        log_file: &Path,
        api_port: u16,
        first_port: u16,
        envs: &[(&str, &str)],
        healthy: bool,
    ) -> Result<Self, String> {
        let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .expect("log file");
        // Tunnels on loopback only, unless the test names the address itself.
        let bind: &[&str] = match envs.iter().any(|(k, _)| *k == "WGPLANE_BIND") {
            true => &[],
            false => &["--bind", "127.0.0.1"],
        };
        let child = Command::new(binary())
            .args(["run", "--api-listen", &api.to_string()])
            .args(bind)
            .args([
                "--first-port",
                &first_port.to_string(),
                "--public-host",
                "127.0.0.1",
            ])
            .arg("--state-dir")
            .arg(state.path())
            // Nothing from the developer's environment (a webhook URL, TUN mode,
            // another bind address) reaches the appliance under test.
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| !k.starts_with("WGPLANE_")))
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start wgplane");
        let token_file = state.path().join("api-token");
        let mut app = Self {
            child,
            api,
            token: String::new(),
            first_port,
            state,
            log_file: log_file.to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                let ok = app
                    .http
                    .get(format!("http://{api}/healthz"))
                    .send()
                    .is_ok_and(|r| r.status().is_success() || !healthy);
                if ok && !t.trim().is_empty() {
                    app.token = t.trim().to_owned();
                    return Ok(app);
                }
            }
            if let Ok(Some(status)) = app.child.try_wait() {
                return Err(format!("wgplane exited with {status}:\n{}", app.log()));
            }
            if Instant::now() > deadline {
                return Err(app.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and hands back its
    /// state dir and ports for a restart.
    pub fn kill9(mut self) -> (tempfile::TempDir, u16, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let api_port = self.api.port();
        let first_port = self.first_port;
        // Move the state dir out; Drop then only kills an already dead child.
        let state = std::mem::replace(&mut self.state, tempfile::tempdir().expect("tempdir"));
        (state, api_port, first_port)
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's PID, which it keeps until waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The appliance's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Subscribes to `GET /v1/events`; parsed `(event, data)` pairs arrive on the
    /// returned channel from a reader thread.
    pub fn subscribe_events(&self) -> std::sync::mpsc::Receiver<(String, Value)> {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .expect("sse client");
        let resp = client
            .get(format!("http://{}/v1/events", self.api))
            .bearer_auth(&self.token)
            .send()
            .expect("subscribe");
        assert_eq!(resp.status().as_u16(), 200);
        std::thread::spawn(move || {
            let mut name = String::new();
            for line in std::io::BufReader::new(resp).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line
                    .strip_prefix("event: ")
                    .or_else(|| line.strip_prefix("event:"))
                {
                    name = n.trim().to_owned();
                } else if let Some(d) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    let value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                    if tx.send((std::mem::take(&mut name), value)).is_err() {
                        break;
                    }
                }
            }
        });
        rx
    }

    /// `GET /metrics` as text (no token).
    pub fn scrape(&self) -> String {
        let (status, body) = self.call_with("GET", "/metrics", None, None);
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_owned()
    }

    /// A request with the token; returns status and JSON (or text as a JSON string).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_with(method, path, body, Some(&self.token))
    }

    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Like `call` but asserts the status.
    pub fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (got, value) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path} -> {value}\n{}", self.log());
        value
    }

    /// Tenant `tenant` (new) set up for KTN: gateway router `gw` at
    /// 10.100.0.40 and client `phone` (10.200.0.2), each with a key of the test.
    pub fn put_ktn(&self, tenant: &str) -> Ktn {
        let view = self.expect("PUT", &format!("/v1/tenants/{tenant}"), None, 201);
        let server_key = view["server_public_key"].as_str().expect("key").to_owned();
        let (gateway, gw_public) = keypair();
        self.put_gateway(tenant, &gw_public);
        let (phone, p_public) = keypair();
        let body = format!(r#"{{"public_key":"{p_public}"}}"#);
        let path = format!("/v1/tenants/{tenant}/clients/phone");
        self.expect("PUT", &path, Some(&body), 201);
        Ktn {
            server_key,
            gateway,
            phone,
        }
    }

    /// Router `gw` of `tenant` with `public_key` at 10.100.0.40, made the
    /// gateway of the egress pool 10.200.0.0/24.
    pub fn put_gateway(&self, tenant: &str, public_key: &str) {
        let body = format!(r#"{{"public_key":"{public_key}","vpn_ip":"10.100.0.40"}}"#);
        let router = format!("/v1/tenants/{tenant}/routers/gw");
        self.expect("PUT", &router, Some(&body), 201);
        self.expect(
            "PUT",
            &format!("/v1/tenants/{tenant}/egress"),
            Some(r#"{"pool":"10.200.0.0/24","gateways":["gw"]}"#),
            201,
        );
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `Appliance::put_ktn` set up.
pub struct Ktn {
    /// The tunnel's public key (base64).
    pub server_key: String,
    pub gateway: StaticSecret,
    pub phone: StaticSecret,
}

/// A WireGuard peer in the test process: a boringtun `Tunn` on its own UDP socket.
pub struct UdpPeer {
    pub socket: UdpSocket,
    pub tunn: Tunn,
    pub secret: StaticSecret,
    pub server: SocketAddr,
    /// Bytes of every datagram sent to / received from the appliance.
    pub sent_bytes: u64,
    pub received_bytes: u64,
    buf: Vec<u8>,
}

pub fn keypair() -> (StaticSecret, String) {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let public = wgplane::keys::encode(PublicKey::from(&secret).as_bytes());
    (secret, public)
}

impl UdpPeer {
    pub fn new(
        secret: StaticSecret,
        server_public_b64: &str,
        server: SocketAddr,
        index: u32,
    ) -> Self {
        Self::with_psk(secret, server_public_b64, server, index, None)
    }

    /// A peer that also mixes `psk` into its handshakes.
    pub fn with_psk(
        secret: StaticSecret,
        server_public_b64: &str,
        server: SocketAddr,
        index: u32,
        psk: Option<[u8; 32]>,
    ) -> Self {
        let server_public =
            PublicKey::from(wgplane::keys::decode(server_public_b64).expect("server key"));
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind peer socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            tunn: Tunn::new(secret.clone(), server_public, psk, None, index, None),
            socket,
            secret,
            server,
            sent_bytes: 0,
            received_bytes: 0,
            buf: vec![0u8; 65_600],
        }
    }

    /// Accepts datagrams only from the appliance's endpoint, as a NAT's mapping
    /// does: an answer from another of the host's addresses is lost.
    pub fn connect_socket(&mut self) {
        self.socket.connect(self.server).expect("connect");
    }

    /// Moves to a new UDP socket (a new source port), keeping the session: roaming.
    pub fn rebind(&mut self) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind peer socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        self.socket = socket;
        self.socket.local_addr().expect("addr")
    }

    fn transmit(&mut self, datagram: &[u8]) {
        self.socket.send_to(datagram, self.server).expect("send");
        self.sent_bytes += datagram.len() as u64;
    }

    /// Handshakes with the appliance; true once the session is up.
    pub fn handshake(&mut self) -> bool {
        self.try_handshake(5)
    }

    /// Like `handshake`, with `attempts` initiations 2 s apart.
    pub fn try_handshake(&mut self, attempts: usize) -> bool {
        for _ in 0..attempts {
            if let TunnResult::WriteToNetwork(d) =
                self.tunn.format_handshake_initiation(&mut self.buf, true)
            {
                let d = d.to_vec();
                self.transmit(&d);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                self.poll();
                if self.tunn.time_since_last_handshake().is_some() {
                    return true;
                }
            }
        }
        false
    }

    /// Sends an inner packet.
    pub fn send(&mut self, packet: &[u8]) {
        let mut out = vec![0u8; packet.len() + 256];
        if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut out) {
            let d = d.to_vec();
            self.transmit(&d);
        }
    }

    /// Receives one datagram (200 ms timeout), answering protocol messages; returns a
    /// decrypted inner packet if it carried one.
    pub fn poll(&mut self) -> Option<Vec<u8>> {
        let mut datagram = vec![0u8; 65_600];
        let (n, from) = self.socket.recv_from(&mut datagram).ok()?;
        self.received_bytes += n as u64;
        let mut result = self
            .tunn
            .decapsulate(Some(from.ip()), &datagram[..n], &mut self.buf);
        let mut packet = None;
        loop {
            match result {
                TunnResult::WriteToNetwork(d) => {
                    let d = d.to_vec();
                    self.transmit(&d);
                    result = self.tunn.decapsulate(None, &[], &mut self.buf);
                }
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    packet = Some(p.to_vec());
                    break;
                }
                _ => break,
            }
        }
        packet
    }

    /// Waits up to `timeout` for an inner packet.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(p) = self.poll() {
                return Some(p);
            }
        }
        None
    }
}

/// The value of the one sample of `name` whose labels include every `label`.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "one sample of {name} with {labels:?}, found {hits:?}"
    );
    hits[0]
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("numeric sample")
}

/// A child process that is killed (by its PID, SIGKILL) and reaped when this
/// is dropped, also when a test panics half-way.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}
