//! Scale benchmark of the appliance (issue 5): 100,000 peers across 1,000 tenant
//! tunnels (1,000 UDP ports), measured on the real `wgplane run` binary.
//!
//! What it measures, each next to a baseline taken in the same run:
//! - **memory per idle peer**: VmRSS of appliances started on an empty state, on N
//!   tenants with no peers, on N x M/2 and on N x M peers; the per-peer figure is the
//!   slope (RSS(N x M) - RSS(N x 0)) / (N x M), the per-tunnel figure
//!   (RSS(N x 0) - RSS(empty)) / N. An idle peer has no boringtun state (its `Tunn`
//!   is made on its first handshake), so the slope is wgplane's own bytes per idle
//!   peer; `size_of::<Tunn>()` is printed as what a peer adds once it speaks. An
//!   in-process breakdown (a counting
//!   global allocator around the library's `Registry` and `TunnelEngine`) says where
//!   the bytes go;
//! - **start-up from the store**: spawn -> first `GET /v1/tenants` that lists all N
//!   tenants (the binary restores every tunnel before it binds the API);
//! - **idle timer work**: the appliance's CPU time over `--idle-secs` with no peer
//!   ever connected, against the empty appliance and the N x 0 one;
//! - **adding a peer**: `--adds` sequential `PUT /v1/tenants/{t}/routers/{id}` with
//!   fresh public keys spread over the tenants, at N x M and at a small state
//!   (10 x 10), with p50/p90/p99/max and their ratio; and the same adds again
//!   while another thread scrapes `GET /metrics` back to back; then the first
//!   adds deleted again (`DELETE`), at both sizes;
//! - **a scrape**: wall time, the appliance's CPU and the size of `GET /metrics`
//!   at N x M peers and at the small state, as it is and gzip-compressed (as
//!   Prometheus asks for it).
//!
//! The state directories are written directly through the library's `Registry` and
//! `Store` (the same files `wgplane run --state-dir` opens: `state.db`, `master-key`,
//! `api-token`), in a few big transactions, not through the API.
//!
//! What it leaves out: traffic (no peer ever handshakes, so no sessions, no
//! per-packet work: see `benches/forward.rs` and `wgplane bench`), the kernel's
//! socket buffers (not in VmRSS), TUN mode, clients and egress policies, and adding
//! tenants at scale (every add here goes to an existing tenant).
//!
//! Run: `cargo bench --bench scale -- [--tenants N] [--peers-per-tenant M]
//! [--json FILE] [--idle-secs S] [--adds K]` (defaults 1000 x 100, 10 s, 200).
//! Cargo builds the `wgplane` binary for the bench; every process started is killed
//! by its pid and every temporary directory removed, also on failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rand_core::{OsRng, RngCore};
use serde_json::json;
use wgplane::control::model::{RouterRequest, TenantRequest};
use wgplane::control::registry::{AllocPolicy, Registry};
use wgplane::control::Id;
use wgplane::core::engine::TunnelEngine;
use wgplane::keys;
use wgplane::store::{Change, MasterKey, Store};

// ---- a counting allocator, for the in-process breakdown ----

/// Live heap bytes (as requested) and live blocks of this process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live heap bytes and blocks right now.
fn heap() -> (i64, i64) {
    (
        LIVE_BYTES.load(Ordering::Relaxed) as i64,
        LIVE_BLOCKS.load(Ordering::Relaxed) as i64,
    )
}

// ---- options ----

struct Options {
    tenants: usize,
    peers: usize,
    json: Option<PathBuf>,
    idle: Duration,
    adds: usize,
}

const USAGE: &str = "usage: cargo bench --bench scale -- [--tenants N] [--peers-per-tenant M] \
[--json FILE] [--idle-secs S] [--adds K]";

fn options() -> Options {
    let mut o = Options {
        tenants: 1000,
        peers: 100,
        json: None,
        idle: Duration::from_secs(10),
        adds: 200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value\n{USAGE}")))
        };
        let number = |name: &str, text: String| -> usize {
            text.parse()
                .unwrap_or_else(|_| fail(&format!("{name}: {text:?} is not a number\n{USAGE}")))
        };
        match arg.as_str() {
            // `cargo bench` passes this to every harness-less bench.
            "--bench" => {}
            "--tenants" => o.tenants = number("--tenants", value("--tenants")),
            "--peers-per-tenant" => {
                o.peers = number("--peers-per-tenant", value("--peers-per-tenant"))
            }
            "--json" => o.json = Some(PathBuf::from(value("--json"))),
            "--idle-secs" => {
                o.idle = Duration::from_secs(number("--idle-secs", value("--idle-secs")) as u64)
            }
            "--adds" => o.adds = number("--adds", value("--adds")),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => fail(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.tenants == 0 || o.peers == 0 || o.adds == 0 {
        fail("--tenants, --peers-per-tenant and --adds must be at least 1");
    }
    o
}

fn fail(message: &str) -> ! {
    eprintln!("scale bench: {message}");
    std::process::exit(2);
}

// ---- state directories, written through the library ----

/// Subnet layout for `tenants` tenants of `hosts` routers each: the largest subnets
/// (from the default /16 down) of 10.0.0.0/8 that give every tenant its own.
fn subnet_prefix_len(tenants: usize, hosts: usize) -> u8 {
    let len = (16u8..=24)
        .find(|p| (1usize << (p - 8)) >= tenants)
        .unwrap_or_else(|| fail(&format!("{tenants} tenants do not fit 10.0.0.0/8 as /24s")));
    // Routers start at .1.1 (or .2 in a /23 or smaller); .0 and .255 are skipped.
    let room = ((1usize << (32 - len)) - 257) * 254 / 256;
    if hosts > room {
        fail(&format!(
            "{hosts} routers per tenant do not fit a /{len} (room for {room})"
        ));
    }
    len
}

/// First port of `n` consecutive UDP ports free on 127.0.0.1, below the ephemeral
/// range.
fn free_udp_range(n: usize) -> u16 {
    let n = n.max(1);
    let mut base = 20_000usize;
    while base + n <= 65_535 {
        match (base..base + n).find(|p| UdpSocket::bind(("127.0.0.1", *p as u16)).is_err()) {
            None => return base as u16,
            Some(taken) => base = taken + 1,
        }
    }
    fail(&format!("no {n} consecutive free UDP ports on 127.0.0.1"))
}

/// A free TCP port on 127.0.0.1 for an admin API.
fn free_tcp_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free API port")
}

/// Creates `path` with mode 0600 holding `text` and a newline (as the binary does).
fn write_private(path: &Path, text: &str) {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    writeln!(file, "{text}").expect("write a state file");
}

/// Times of building a state directory, and the registry's heap.
#[derive(Default, Clone, Copy)]
struct Build {
    keys: Duration,
    registry: Duration,
    store: Duration,
    batches: usize,
    /// Heap of the registry with its tenants only, then added by its routers.
    tenants_heap: (i64, i64),
    routers_heap: (i64, i64),
}

struct StateDir {
    /// Removed on drop.
    dir: tempfile::TempDir,
    token: String,
    first_port: u16,
    prefix_len: u8,
    tenants: usize,
    peers: usize,
    build: Build,
    /// The registry, kept only for the in-process engine breakdown.
    registry: Option<Registry>,
}

fn policy(first_port: u16, prefix_len: u8) -> AllocPolicy {
    AllocPolicy {
        first_port,
        last_port: u16::MAX,
        supernet: "10.0.0.0/8".parse().expect("supernet"),
        subnet_prefix_len: prefix_len,
        subnet_start: Ipv4Addr::new(10, 100, 0, 0),
    }
}

fn tenant_id(i: usize) -> Id {
    Id::parse(&format!("t{i:05}"), "tenant").expect("tenant id")
}

/// A fresh random WireGuard public key, base64.
fn fresh_public_key() -> String {
    let secret = x25519_dalek::StaticSecret::random_from_rng(OsRng);
    keys::encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

/// Writes a state directory with `tenants` x `peers` routers (random public keys).
/// `headroom`: routers per tenant that will be added later through the API.
fn build_state(label: &str, tenants: usize, peers: usize, headroom: usize) -> StateDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("wgplane-scale-{label}-"))
        .tempdir()
        .expect("create a temporary state directory");
    let prefix_len = subnet_prefix_len(tenants.max(1), peers + headroom);
    let first_port = free_udp_range(tenants);
    let master = MasterKey::generate();
    write_private(
        &dir.path().join("master-key"),
        &keys::encode(&master.to_bytes()),
    );
    let token = format!("scale{:016x}", OsRng.next_u64());
    write_private(&dir.path().join("api-token"), &token);
    let mut build = Build::default();
    // With no tenants the binary creates the database itself.
    let registry = (tenants > 0).then(|| {
        fill(
            dir.path(),
            master,
            (tenants, peers),
            policy(first_port, prefix_len),
            &mut build,
        )
    });
    StateDir {
        dir,
        token,
        first_port,
        prefix_len,
        tenants,
        peers,
        build,
        registry,
    }
}

/// Writes `tenants` x `peers` routers into a fresh store under `dir`; returns the
/// registry it built them with (for the in-process breakdown).
fn fill(
    dir: &Path,
    master: MasterKey,
    (tenants, peers): (usize, usize),
    policy: AllocPolicy,
    build: &mut Build,
) -> Registry {
    let t0 = Instant::now();
    let public_keys: Vec<String> = (0..tenants * peers).map(|_| fresh_public_key()).collect();
    build.keys = t0.elapsed();

    let t0 = Instant::now();
    let h0 = heap();
    let mut registry = Registry::new(policy, OsRng.next_u32());
    let now = SystemTime::now();
    let ids: Vec<Id> = (0..tenants).map(tenant_id).collect();
    for id in &ids {
        registry
            .put_tenant(id, &TenantRequest::default(), now)
            .unwrap_or_else(|e| panic!("registry refused tenant {id}: {e}"));
    }
    let h1 = heap();
    let mut key_iter = public_keys.into_iter();
    for id in &ids {
        for r in 0..peers {
            let rid = Id::parse(&format!("r{r}"), "router").expect("router id");
            let req = RouterRequest {
                public_key: key_iter.next(),
                ..Default::default()
            };
            registry
                .put_router(id, &rid, &req)
                .unwrap_or_else(|e| panic!("registry refused router {id}/{rid}: {e}"));
        }
    }
    let h2 = heap();
    build.registry = t0.elapsed();
    build.tenants_heap = (h1.0 - h0.0, h1.1 - h0.1);
    build.routers_heap = (h2.0 - h1.0, h2.1 - h1.1);

    let t0 = Instant::now();
    let database = dir.join("state.db");
    let mut store = Store::open(&database, master)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", database.display()));
    let per_batch = tenants.div_ceil(8);
    for chunk in ids.chunks(per_batch) {
        let mut changes = Vec::with_capacity(chunk.len() * (peers + 1));
        for id in chunk {
            let tenant = registry.tenant(id).expect("tenant just created");
            changes.push(Change::Tenant(tenant));
            changes.extend(tenant.routers.values().map(|r| Change::Router(id, r)));
        }
        store
            .apply(&changes)
            .unwrap_or_else(|e| panic!("store refused a batch: {e}"));
        build.batches += 1;
    }
    drop(store);
    build.store = t0.elapsed();
    registry
}

// ---- the appliance process ----

fn binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_wgplane"));
    if !path.is_file() {
        fail(&format!(
            "{} is missing: run `cargo build --release` first",
            path.display()
        ));
    }
    path
}

/// A running `wgplane run`; SIGTERM then SIGKILL by pid on drop.
struct Appliance {
    child: Child,
    api: String,
    token: String,
    log: PathBuf,
}

impl Appliance {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the binary on `state` and waits until `GET /v1/tenants` lists every
    /// tenant; returns it with the time from spawn to that answer.
    fn start(bin: &Path, state: &StateDir, http: &reqwest::blocking::Client) -> (Self, Duration) {
        let port = free_tcp_port();
        let log = state.dir.path().join("wgplane.log");
        let log_file = std::fs::File::create(&log).expect("create the appliance log");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--state-dir")
            .arg(state.dir.path())
            .args(["--api-listen", &format!("127.0.0.1:{port}")])
            .args(["--bind", "127.0.0.1", "--public-host", "127.0.0.1"])
            .args(["--first-port", &state.first_port.to_string()])
            .args(["--subnet-prefix-len", &state.prefix_len.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // The user's WGPLANE_* settings (master key, config, TUN...) must not leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WGPLANE_") {
                cmd.env_remove(name);
            }
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the
        // child if this bench dies without running its destructors.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut app = Appliance {
            child,
            api: format!("http://127.0.0.1:{port}/v1"),
            token: state.token.clone(),
            log,
        };
        loop {
            if let Ok(Some(status)) = app.child.try_wait() {
                panic!(
                    "wgplane exited ({status}) before answering; its log:\n{}",
                    app.log_tail()
                );
            }
            if t0.elapsed() > Duration::from_secs(180) {
                panic!(
                    "wgplane did not answer within 180 s; its log:\n{}",
                    app.log_tail()
                );
            }
            let answer = http
                .get(format!("{}/tenants", app.api))
                .bearer_auth(&app.token)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.json::<Vec<serde_json::Value>>());
            match answer {
                Ok(list) if list.len() == state.tenants => return (app, t0.elapsed()),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no {field} in {path}"))
    }

    /// CPU time (user + system, all threads) of the process so far.
    fn cpu_time(&self) -> Duration {
        let pid = self.pid() as libc::pid_t;
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: both pointers are to live locals of the right type.
        let ok = unsafe {
            libc::clock_getcpuclockid(pid, &mut clock) == 0
                && libc::clock_gettime(clock, &mut ts) == 0
        };
        if ok {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
        // Fallback: clock ticks from /proc/<pid>/stat (fields 14 and 15).
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let after_comm = text.rsplit(')').next().unwrap_or_default();
        let fields: Vec<u64> = after_comm
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / hz)
    }

    /// CPU time used over `window` of doing nothing.
    fn idle_cpu(&self, window: Duration) -> Duration {
        let before = self.cpu_time();
        std::thread::sleep(window);
        self.cpu_time().saturating_sub(before)
    }

    /// `count` sequential router PUTs with fresh keys, spread over `tenants`;
    /// latencies in ms, sorted.
    fn add_routers(
        &self,
        http: &reqwest::blocking::Client,
        tenants: usize,
        count: usize,
        name: &str,
    ) -> Vec<f64> {
        self.time_routers(tenants, count, name, 201, |url| {
            let body = json!({ "public_key": fresh_public_key() });
            http.put(url).json(&body)
        })
    }

    /// `count` sequential requests made by `request` for routers `{name}-{i}`
    /// spread over `tenants`, each answered `expected`; latencies in ms, sorted.
    fn time_routers(
        &self,
        tenants: usize,
        count: usize,
        name: &str,
        expected: u16,
        request: impl Fn(&str) -> reqwest::blocking::RequestBuilder,
    ) -> Vec<f64> {
        let mut ms = Vec::with_capacity(count);
        for i in 0..count {
            let tenant = tenant_id(i * tenants / count);
            let url = format!("{}/tenants/{tenant}/routers/{name}-{i}", self.api);
            // Built (a fresh key made) before the clock starts.
            let request = request(&url).bearer_auth(&self.token);
            let t0 = Instant::now();
            let response = request.send().unwrap_or_else(|e| panic!("{url}: {e}"));
            let status = response.status();
            let text = response.text().unwrap_or_default();
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(status.as_u16(), expected, "{url} answered {status}: {text}");
        }
        ms.sort_by(f64::total_cmp);
        ms
    }

    /// `count` scrapes of `GET /metrics`, gzip-compressed as Prometheus asks
    /// for them (`gzip`) or not: wall times in ms (sorted), the size of the
    /// last answer in bytes, and the appliance's CPU per scrape.
    fn scrape(&self, http: &reqwest::blocking::Client, count: usize, gzip: bool) -> Scrapes {
        let url = self.api.replace("/v1", "/metrics");
        let mut ms = Vec::with_capacity(count);
        let mut bytes = 0;
        let cpu0 = self.cpu_time();
        for _ in 0..count {
            let t0 = Instant::now();
            let mut request = http.get(&url);
            if gzip {
                request = request.header("accept-encoding", "gzip");
            }
            let response = request.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let status = response.status();
            let headers = response.headers().clone();
            let text = response.bytes().unwrap_or_default();
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(status.as_u16(), 200, "GET {url} answered {status}");
            let encoding = response_encoding(&headers);
            assert_eq!(encoding, gzip.then_some("gzip"), "GET {url}: its encoding");
            bytes = text.len();
        }
        let cpu_ms = (self.cpu_time() - cpu0).as_secs_f64() * 1e3 / count.max(1) as f64;
        ms.sort_by(f64::total_cmp);
        Scrapes { ms, bytes, cpu_ms }
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL; always by pid.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- measurements ----

/// What one appliance run measured.
#[derive(Default)]
struct Run {
    label: &'static str,
    tenants: usize,
    peers: usize,
    build: Build,
    startup: Duration,
    rss_ready: u64,
    rss_settled: u64,
    hwm: u64,
    idle_cpu: Option<Duration>,
    adds: Option<Vec<f64>>,
    /// `commit_floor` measured right before the adds.
    commits: Option<Vec<f64>>,
    /// `GET /metrics` after the adds.
    scrapes: Scrapes,
    /// The same, gzip-compressed (as Prometheus asks for it).
    scrapes_gzip: Scrapes,
    /// The adds again, with `GET /metrics` running back to back meanwhile.
    adds_scraping: Option<Vec<f64>>,
    /// The routers of the first adds deleted again.
    deletes: Option<Vec<f64>>,
}

/// Scrapes of `GET /metrics`.
#[derive(Default)]
struct Scrapes {
    /// Wall time of each, sorted, in ms.
    ms: Vec<f64>,
    /// Size of the answer.
    bytes: usize,
    /// The appliance's CPU time per scrape, in ms.
    cpu_ms: f64,
}

impl Run {
    fn total_peers(&self) -> usize {
        self.tenants * self.peers
    }
}

fn measure(
    bin: &Path,
    http: &reqwest::blocking::Client,
    label: &'static str,
    state: &StateDir,
    idle: Option<Duration>,
    adds: usize,
) -> Run {
    eprintln!(
        "scale bench: starting `{label}` ({} tenants x {} peers)",
        state.tenants, state.peers
    );
    let (mut app, startup) = Appliance::start(bin, state, http);
    let rss_ready = app.status_bytes("VmRSS");
    // Let the tunnel tasks run a few timer ticks before the settled reading.
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = idle.map(|w| app.idle_cpu(w));
    let rss_settled = app.status_bytes("VmRSS");
    let hwm = app.status_bytes("VmHWM");
    let commits = (adds > 0).then(|| commit_floor(adds));
    let tenants = state.tenants.max(1);
    let adds_count = adds;
    let adds = (adds > 0).then(|| app.add_routers(http, tenants, adds_count, "scale-add"));
    let scrapes = app.scrape(http, SCRAPES, false);
    let scrapes_gzip = app.scrape(http, SCRAPES, true);
    // The same adds again while `GET /metrics` runs back to back: a scrape
    // must not hold changes up.
    let adds_scraping = (adds_count > 0).then(|| {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    app.scrape(http, 1, false);
                }
            });
            let v = app.add_routers(http, tenants, adds_count, "scraping-add");
            done.store(true, Ordering::Relaxed);
            v
        })
    });
    // The first adds' routers deleted again, in the same order.
    let deletes = (adds_count > 0).then(|| {
        app.time_routers(tenants, adds_count, "scale-add", 204, |url| {
            http.delete(url)
        })
    });
    app.stop();
    Run {
        label,
        tenants: state.tenants,
        peers: state.peers,
        build: state.build,
        startup,
        rss_ready,
        rss_settled,
        hwm,
        idle_cpu,
        adds,
        commits,
        scrapes,
        scrapes_gzip,
        adds_scraping,
        deletes,
    }
}

/// The `Content-Encoding` of an answer, if any.
fn response_encoding(headers: &reqwest::header::HeaderMap) -> Option<&str> {
    headers
        .get(reqwest::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
}

/// A run's scrapes, for the JSON report.
fn scrapes_json(s: &Scrapes) -> serde_json::Value {
    serde_json::json!({
        "wall_ms": latency_json(&s.ms),
        "cpu_ms_per_scrape": s.cpu_ms,
        "bytes": s.bytes,
    })
}

/// Scrapes of `GET /metrics` per appliance.
const SCRAPES: usize = 5;

/// The in-process breakdown: heap of one tunnel's engine, empty and with its peers.
struct EngineHeap {
    tunnel: (i64, i64),
    peers: (i64, i64),
    peer_count: usize,
}

fn engine_heap(registry: &Registry) -> EngineHeap {
    let tenant = registry.tenants().next().expect("a tenant");
    let h0 = heap();
    let mut engine = TunnelEngine::new(
        tenant.secret.secret().clone(),
        vec![
            IpAddr::V4(tenant.server_ip()),
            IpAddr::V6(tenant.server_ipv6()),
        ],
    )
    .with_local_stack(
        tenant.server_ip(),
        tenant.subnet.prefix_len(),
        Instant::now(),
    );
    let h1 = heap();
    let peers = tenant.peer_configs(None);
    let peer_count = peers.len();
    engine.sync_peers(peers).expect("engine takes the peers");
    let h2 = heap();
    drop(engine);
    EngineHeap {
        tunnel: (h1.0 - h0.0, h1.1 - h0.1),
        peers: (h2.0 - h1.0, h2.1 - h1.1),
        peer_count,
    }
}

/// Heap of a GRO table (`tun_rs::GROTable::default()`), which a tunnel task makes
/// on its first write to a TUN device: never in userspace mode.
fn gro_heap() -> (i64, i64) {
    let h0 = heap();
    let gro = tun_rs::GROTable::default();
    let h1 = heap();
    drop(gro);
    (h1.0 - h0.0, h1.1 - h0.1)
}

/// The floor under an add: `count` single-router SQLite commits (WAL, fsync) to a
/// fresh store on the same disk, in this process; latencies in ms, sorted.
fn commit_floor(count: usize) -> Vec<f64> {
    let dir = tempfile::Builder::new()
        .prefix("wgplane-scale-commit-")
        .tempdir()
        .expect("create a temporary directory");
    let database = dir.path().join("state.db");
    let mut store = Store::open(&database, MasterKey::generate())
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", database.display()));
    let mut registry = Registry::new(policy(51820, 16), OsRng.next_u32());
    let t = tenant_id(0);
    registry
        .put_tenant(&t, &TenantRequest::default(), SystemTime::now())
        .expect("one tenant");
    let tenant = registry.tenant(&t).expect("tenant just created");
    store
        .apply(&[Change::Tenant(tenant)])
        .expect("store the tenant");
    let mut ms = Vec::with_capacity(count);
    for i in 0..count {
        let r = Id::parse(&format!("r{i}"), "router").expect("router id");
        let req = RouterRequest {
            public_key: Some(fresh_public_key()),
            ..Default::default()
        };
        registry.put_router(&t, &r, &req).expect("router");
        let router = &registry.tenant(&t).expect("tenant").routers[&r];
        let t0 = Instant::now();
        store
            .apply(&[Change::Router(&t, router)])
            .expect("store the router");
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    ms
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_json(sorted: &[f64]) -> serde_json::Value {
    json!({
        "count": sorted.len(),
        "p50_ms": percentile(sorted, 0.50),
        "p90_ms": percentile(sorted, 0.90),
        "p99_ms": percentile(sorted, 0.99),
        "max_ms": sorted.last().copied().unwrap_or(0.0),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() {
    let o = options();
    // Inherited by the appliances: each tunnel holds a socket.
    let _ = wgplane::io::limits::raise_open_files();
    let bin = binary();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let (n, m) = (o.tenants, o.peers);
    let small = (10usize, 10usize);
    let headroom = o.adds.div_ceil(n) + 1;
    let tunn_size = std::mem::size_of::<boringtun::noise::Tunn>();
    let gro = gro_heap();
    let peer_size = std::mem::size_of::<wgplane::core::peer::Peer>();

    // One appliance at a time: each state dir is built, measured and removed in turn.
    let mut runs = Vec::new();
    {
        let state = build_state("empty", 0, 0, 0);
        runs.push(measure(&bin, &http, "empty", &state, Some(o.idle), 0));
    }
    {
        let state = build_state("small", small.0, small.1, o.adds.div_ceil(small.0));
        runs.push(measure(&bin, &http, "small", &state, None, o.adds));
    }
    {
        let state = build_state("tunnels", n, 0, 0);
        runs.push(measure(
            &bin,
            &http,
            "tunnels only",
            &state,
            Some(o.idle),
            0,
        ));
    }
    {
        let state = build_state("half", n, m / 2, 0);
        runs.push(measure(&bin, &http, "half", &state, None, 0));
    }
    let engine;
    {
        let state = build_state("full", n, m, headroom);
        engine = state.registry.as_ref().filter(|_| m > 0).map(engine_heap);
        runs.push(measure(&bin, &http, "full", &state, Some(o.idle), o.adds));
    }
    let [empty, small_run, tunnels, half, full] = &runs[..] else {
        unreachable!("five runs")
    };

    // ---- figures ----
    let total = full.total_peers().max(1) as f64;
    let per_peer = (full.rss_settled as f64 - tunnels.rss_settled as f64) / total;
    let per_peer_ready = (full.rss_ready as f64 - tunnels.rss_ready as f64) / total;
    let per_peer_half =
        (half.rss_settled as f64 - tunnels.rss_settled as f64) / (half.total_peers().max(1) as f64);
    // Idle peers have no `Tunn`: the whole slope is wgplane's own.
    let own_per_peer = per_peer;
    // The second half of the peers: free of the per-tunnel structures that appear
    // with a tunnel's first peer (maps, trie, slot vector).
    let marginal = (full.rss_settled as f64 - half.rss_settled as f64)
        / ((full.total_peers() - half.total_peers()).max(1) as f64);
    let per_tunnel = (tunnels.rss_settled as f64 - empty.rss_settled as f64) / n as f64;
    let registry_peer = full.build.routers_heap.0 as f64 / total;
    let registry_peer_blocks = full.build.routers_heap.1 as f64 / total;
    let registry_tunnel = tunnels.build.tenants_heap.0 as f64 / n as f64;
    let adds_full = full.adds.as_deref().unwrap_or(&[]);
    let adds_small = small_run.adds.as_deref().unwrap_or(&[]);
    let p = |v: &[f64], q| if v.is_empty() { 0.0 } else { percentile(v, q) };
    let cpu_ms = |r: &Run| r.idle_cpu.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0);
    let idle_secs = o.idle.as_secs_f64().max(1e-9);

    // ---- the tables ----
    println!(
        "\n## wgplane scale: {n} tenants x {m} peers ({} peers), idle window {} s\n",
        n * m,
        o.idle.as_secs()
    );
    println!("| appliance | tenants x peers | state build (keys / registry / store) | start-up | VmRSS ready | VmRSS settled | VmHWM | idle CPU | add p50 / p90 / p99 / max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let build = if r.tenants == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.2} s / {:.2} s / {:.2} s ({} txns)",
                r.build.keys.as_secs_f64(),
                r.build.registry.as_secs_f64(),
                r.build.store.as_secs_f64(),
                r.build.batches
            )
        };
        let cpu = r
            .idle_cpu
            .map(|d| {
                format!(
                    "{:.0} ms ({:.2} % of a core)",
                    d.as_secs_f64() * 1e3,
                    d.as_secs_f64() / idle_secs * 100.0
                )
            })
            .unwrap_or_else(|| "-".into());
        let adds = r
            .adds
            .as_deref()
            .map(|v| {
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} ms",
                    p(v, 0.5),
                    p(v, 0.9),
                    p(v, 0.99),
                    v.last().copied().unwrap_or(0.0)
                )
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} x {} | {} | {:.3} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} |",
            r.label,
            r.tenants,
            r.peers,
            build,
            r.startup.as_secs_f64(),
            mib(r.rss_ready),
            mib(r.rss_settled),
            mib(r.hwm),
            cpu,
            adds
        );
    }

    let startup_ok = full.startup < Duration::from_secs(5);
    let add_ok = p(adds_full, 0.99) < 5.0;
    let mem_ok = own_per_peer <= 2048.0;
    println!("\n| figure | measured | target | verdict |");
    println!("|---|---|---|---|");
    println!(
        "| RSS per idle peer, slope (full - tunnels only) / {} | {:.0} B (at ready: {:.0} B; half-size slope: {:.0} B) | | |",
        n * m,
        per_peer,
        per_peer_ready,
        per_peer_half
    );
    println!(
        "| marginal RSS per peer (full - half) / {} | {marginal:.0} B | | |",
        full.total_peers() - half.total_peers(),
    );
    println!(
        "| wgplane's own per idle peer (idle peers have no `Tunn`) | {own_per_peer:.0} B | <= 2048 B | {} |",
        verdict(mem_ok)
    );
    println!(
        "| added once a peer speaks: boringtun `size_of::<Tunn>()` (boxed) | {tunn_size} B | | |"
    );
    println!(
        "| in-process: registry heap per peer | {registry_peer:.0} B in {registry_peer_blocks:.1} blocks | | |"
    );
    if let Some(e) = &engine {
        let k = e.peer_count.max(1) as f64;
        println!(
            "| in-process: engine heap per idle peer (incl. `Peer` {peer_size} B) | {:.0} B in {:.1} blocks | | |",
            e.peers.0 as f64 / k,
            e.peers.1 as f64 / k
        );
        println!(
            "| in-process: engine heap per tunnel (empty, with local stack) | {} B in {} blocks | | |",
            e.tunnel.0, e.tunnel.1
        );
    }
    println!("| RSS per tunnel (tunnels only - empty) / {n} | {per_tunnel:.0} B (registry heap {registry_tunnel:.0} B) | | |");
    println!(
        "| in-process: `tun_rs::GROTable::default()` heap (TUN mode only, per tunnel with host traffic) | {} B in {} blocks | | |",
        gro.0, gro.1
    );
    println!(
        "| start-up from the store, {} peers | {:.3} s | < 5 s | {} |",
        n * m,
        full.startup.as_secs_f64(),
        verdict(startup_ok)
    );
    println!(
        "| add a router at {} peers, p50 / p99 | {:.2} / {:.2} ms | < 5 ms | {} |",
        n * m,
        p(adds_full, 0.5),
        p(adds_full, 0.99),
        verdict(add_ok)
    );
    println!(
        "| add a router at {} peers (baseline), p50 / p99 | {:.2} / {:.2} ms | | |",
        small.0 * small.1,
        p(adds_small, 0.5),
        p(adds_small, 0.99)
    );
    let floor = |r: &Run| r.commits.as_deref().unwrap_or(&[]).to_vec();
    let (floor_full, floor_small) = (floor(full), floor(small_run));
    println!(
        "| floor: one SQLite commit (fsync) in-process, before the full / small adds, p50 / p99 | {:.2} / {:.2} ms, {:.2} / {:.2} ms | | |",
        p(&floor_full, 0.5),
        p(&floor_full, 0.99),
        p(&floor_small, 0.5),
        p(&floor_small, 0.99)
    );
    println!(
        "| add latency ratio full / small, p50 / p99 | {:.2} / {:.2} | ~1 (O(log n)) | |",
        p(adds_full, 0.5) / p(adds_small, 0.5).max(1e-9),
        p(adds_full, 0.99) / p(adds_small, 0.99).max(1e-9)
    );
    let deletes = |r: &Run| r.deletes.as_deref().unwrap_or(&[]).to_vec();
    let (deletes_full, deletes_small) = (deletes(full), deletes(small_run));
    println!(
        "| delete a router at {} / {} peers, p50 / p99 | {:.2} / {:.2} ms, {:.2} / {:.2} ms | ~ the same (O(log n)) | |",
        n * m,
        small.0 * small.1,
        p(&deletes_full, 0.5),
        p(&deletes_full, 0.99),
        p(&deletes_small, 0.5),
        p(&deletes_small, 0.99)
    );
    let during = full.adds_scraping.as_deref().unwrap_or(&[]);
    println!(
        "| add a router at {} peers while `GET /metrics` runs back to back, p50 / p99 | {:.2} / {:.2} ms | < 5 ms | {} |",
        n * m,
        p(during, 0.5),
        p(during, 0.99),
        verdict(p(during, 0.99) < 5.0)
    );
    for r in [full, small_run] {
        for (how, scrapes) in [
            ("", &r.scrapes),
            (" (gzip, as Prometheus asks)", &r.scrapes_gzip),
        ] {
            let v = &scrapes.ms;
            println!(
                "| `GET /metrics`{how} at {} peers: wall p50 / max, appliance CPU per scrape, size | {:.0} / {:.0} ms, {:.0} ms, {:.1} MiB | | |",
                r.total_peers(),
                p(v, 0.5),
                v.last().copied().unwrap_or(0.0),
                scrapes.cpu_ms,
                mib(scrapes.bytes as u64)
            );
        }
    }
    println!(
        "| idle CPU over {} s: empty / tunnels only / full | {:.0} / {:.0} / {:.0} ms | full ~ tunnels only (timers follow active peers) | |",
        o.idle.as_secs(),
        cpu_ms(empty),
        cpu_ms(tunnels),
        cpu_ms(full)
    );
    println!(
        "| idle CPU per idle peer (full - tunnels only) | {:.2} ns/s | ~0 | |",
        (cpu_ms(full) - cpu_ms(tunnels)) * 1e6 / idle_secs / total
    );
    println!(
        "| idle CPU per tunnel (tunnels only - empty) | {:.1} us/s | | |",
        (cpu_ms(tunnels) - cpu_ms(empty)) * 1e3 / idle_secs / n as f64
    );

    if let Some(path) = &o.json {
        let run_json = |r: &Run| {
            json!({
                "label": r.label,
                "tenants": r.tenants,
                "peers_per_tenant": r.peers,
                "build_keys_s": r.build.keys.as_secs_f64(),
                "build_registry_s": r.build.registry.as_secs_f64(),
                "build_store_s": r.build.store.as_secs_f64(),
                "build_store_transactions": r.build.batches,
                "startup_s": r.startup.as_secs_f64(),
                "rss_ready_bytes": r.rss_ready,
                "rss_settled_bytes": r.rss_settled,
                "hwm_bytes": r.hwm,
                "idle_cpu_ms": r.idle_cpu.map(|d| d.as_secs_f64() * 1e3),
                "adds": r.adds.as_deref().map(latency_json),
                "deletes": r.deletes.as_deref().map(latency_json),
                "commit_floor": r.commits.as_deref().map(latency_json),
                "adds_while_scraping": r.adds_scraping.as_deref().map(latency_json),
                "scrapes": scrapes_json(&r.scrapes),
                "scrapes_gzip": scrapes_json(&r.scrapes_gzip),
            })
        };
        let report = json!({
            "tenants": n,
            "peers_per_tenant": m,
            "idle_window_s": o.idle.as_secs_f64(),
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
            "tunn_size_bytes": tunn_size,
            "peer_size_bytes": peer_size,
            "rss_per_peer_bytes": per_peer,
            "rss_per_peer_at_ready_bytes": per_peer_ready,
            "rss_per_peer_half_bytes": per_peer_half,
            "rss_per_peer_marginal_bytes": marginal,
            "own_per_peer_bytes": own_per_peer,
            "rss_per_tunnel_bytes": per_tunnel,
            "registry_heap_per_peer_bytes": registry_peer,
            "registry_heap_per_tunnel_bytes": registry_tunnel,
            "engine_heap_per_peer_bytes": engine.as_ref().map(|e| e.peers.0 as f64 / e.peer_count.max(1) as f64),
            "engine_heap_per_tunnel_bytes": engine.as_ref().map(|e| e.tunnel.0),
            "gro_table_heap_per_tunnel_bytes": gro.0,
            "startup_full_s": full.startup.as_secs_f64(),
            "add_full": latency_json(adds_full),
            "add_small": latency_json(adds_small),
            "targets": {
                "own_per_peer_max_bytes": 2048,
                "startup_max_s": 5.0,
                "add_max_ms": 5.0,
                "own_per_peer_met": mem_ok,
                "startup_met": startup_ok,
                "add_p99_met": add_ok,
            },
        });
        let text = serde_json::to_string_pretty(&report).expect("serialize the report");
        std::fs::write(path, text + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("scale bench: JSON written to {}", path.display());
    }
}
