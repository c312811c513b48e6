//! Test hosts in network namespaces: a guard per namespace, veth pairs between
//! them, and child processes stopped by PID when their guard drops.
//!
//! Every name carries the test process's PID, so parallel or leftover runs never
//! collide. Nothing here adds a route from the host namespace into a test
//! namespace: veth pairs are created directly inside the namespaces, so the host
//! never even sees the links.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// True when the environment says we run under CI (`CI=true`, `CI=1`, ...).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Checks that this process is root, that `/dev/net/tun` exists, that every tool
/// in `tools` is on `PATH`, and that a namespace can be created.
///
/// Returns `false` after printing `SKIP <test>: <reason>` to stderr when one is
/// missing, except under CI, where a missing prerequisite panics: CI installs
/// them, so their absence is a broken CI, not a reason to skip.
pub fn prerequisites_met(test: &str, tools: &[&str]) -> bool {
    let mut missing = missing_root_and_tools(tools);
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun is missing".to_string());
    }
    if missing.is_empty() {
        // The tools are there; can we actually make a namespace (not in every container)?
        // One name per call: tests of one binary probe at once, from threads.
        static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = format!("wgp-probe-{}-{n}", std::process::id());
        match Command::new("ip").args(["netns", "add", &probe]).output() {
            Ok(out) if out.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            }
            Ok(out) => missing.push(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => missing.push(format!("cannot run `ip`: {e}")),
        }
    }
    run_or_skip(test, missing)
}

/// Like `prerequisites_met`, for tests that need root and `tools` but no
/// namespace or TUN device (mounting a file system, say).
pub fn root_prerequisites_met(test: &str, tools: &[&str]) -> bool {
    run_or_skip(test, missing_root_and_tools(tools))
}

fn missing_root_and_tools(tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("not running as root".to_string());
    }
    for tool in tools {
        if find_in_path(tool).is_none() {
            missing.push(format!("`{tool}` not found on PATH"));
        }
    }
    missing
}

/// True when nothing is `missing`; otherwise a skip, said on stderr, or under
/// CI a panic.
fn run_or_skip(test: &str, missing: Vec<String>) -> bool {
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if under_ci() {
        panic!("{test}: prerequisites missing under CI (CI must install them): {reason}");
    }
    // Straight to the stderr handle: `eprintln!` would be swallowed by the test
    // harness's output capture, and a skip must never be silent.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
    false
}

fn is_root() -> bool {
    // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Full path of `tool` on `PATH`, if any.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// A name unique to this test process: `<tag><pid>`, at most 15 bytes so that it
/// also fits an interface name (wireguard-go's UAPI socket lives in the shared
/// `/var/run/wireguard`, so interface names must be unique across namespaces).
pub fn unique_name(tag: &str) -> String {
    let name = format!("{tag}{}", std::process::id());
    assert!(
        name.len() <= 15,
        "unique_name({tag:?}) = {name:?} is longer than an interface name may be"
    );
    name
}

/// Runs `cmd`, panics with its output unless it succeeds, returns its stdout.
pub fn run_checked(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(100));
    }
}

/// A network namespace that exists while this guard lives. Dropping it stops any
/// process still inside (by PID: they can only be ours) and deletes it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `wgp-<role>-<pid>` with its loopback up.
    pub fn new(role: &str) -> Netns {
        let name = format!("wgp-{role}-{}", std::process::id());
        // A leftover from a crashed run with a recycled PID would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <argv...>`, not yet run.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace; panics unless it succeeds; returns stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        run_checked(&mut self.command(argv))
    }

    /// Like [`Netns::run`] with the command as one line split on whitespace, for
    /// readability; no argument may contain whitespace.
    pub fn run_words(&self, line: &str) -> String {
        self.run(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// Runs `argv` inside the namespace and returns whatever happened.
    pub fn output(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?} in {}: {e}", self.name))
    }

    /// Like [`Netns::output`], but stdout and stderr as one string, for diagnostics.
    pub fn capture(&self, argv: &[&str]) -> String {
        match self.command(argv).stdin(Stdio::null()).output() {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run {argv:?}: {e}"),
        }
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward`, ...).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// Creates a veth pair between `self` (`if_name`, `addr` as CIDR) and `peer`
    /// (`peer_if`, `peer_addr`), addresses both ends and brings them up.
    pub fn veth(&self, if_name: &str, addr: &str, peer: &Netns, peer_if: &str, peer_addr: &str) {
        run_checked(Command::new("ip").args([
            "-n", &self.name, "link", "add", if_name, "type", "veth", "peer", "name", peer_if,
            "netns", &peer.name,
        ]));
        for (ns, ifn, a) in [(self, if_name, addr), (peer, peer_if, peer_addr)] {
            ns.run(&["ip", "address", "add", a, "dev", ifn]);
            ns.run(&["ip", "link", "set", ifn, "up"]);
        }
    }

    /// Starts `argv` inside the namespace with stdout and stderr going to `log`.
    pub fn spawn(&self, label: &str, argv: &[&str], envs: &[(&str, &str)], log: &Path) -> Proc {
        let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = file.try_clone().expect("clone log file handle");
        let mut cmd = self.command(argv);
        // The developer's WGPLANE_* settings (webhooks, TUN mode, bind address)
        // must not reach an appliance under test.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("WGPLANE_")) {
            cmd.env_remove(key);
        }
        cmd.envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        // `ip netns exec` execs the program, so the child's PID is the program's.
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({argv:?}) in {}: {e}", self.name));
        Proc {
            label: label.to_string(),
            child,
            log: log.to_path_buf(),
            leaves: None,
        }
    }

    fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Normally every process was stopped through its `Proc` already; anything
        // left was started inside this namespace by the test, so it is ours.
        let pids = self.pids();
        if !pids.is_empty() {
            for pid in &pids {
                signal(*pid, "TERM");
            }
            let _ = wait_for(TERM_GRACE, || self.pids().is_empty().then_some(()));
            for pid in self.pids() {
                signal(pid, "KILL");
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// Sends `SIGTERM`/`SIGKILL`/... to one PID (std has no `kill(2)`).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .args([
            "-c",
            "kill -s \"$1\" \"$2\" 2>/dev/null",
            "sh",
            sig,
            &pid.to_string(),
        ])
        .status();
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    /// A file the process removes when it exits cleanly, but not when killed
    /// (wireguard-go's UAPI socket in the host's `/var/run/wireguard`):
    /// removed once the process is gone.
    leaves: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// `None` while running, else how it ended.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// SIGKILL at once (a crash, as far as the process can tell), then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_leftover();
    }

    fn remove_leftover(&mut self) {
        if let Some(path) = self.leaves.take() {
            let _ = fs::remove_file(path);
        }
    }

    /// SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        if self.is_running() {
            // Not yet reaped, so the PID still names our child.
            signal(self.pid(), "TERM");
            if wait_for(TERM_GRACE, || self.exit_status()).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        self.remove_leftover();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `contents` to `path` readable by its owner only (private keys, tokens).
pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// wireguard-go refuses to start on Linux without this (it prefers the kernel module).
pub const WG_ENV: [(&str, &str); 1] = [("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")];

/// A wgplane admin API on `127.0.0.1:<port>` inside namespace `ns`, called with
/// curl from there, authenticated by the header in `header_file`.
pub struct NsApi<'a> {
    pub ns: &'a Netns,
    pub port: u16,
    pub header_file: PathBuf,
}

impl NsApi<'_> {
    /// One API call: `(status, body)`.
    pub fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let header = format!("@{}", self.header_file.display());
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            &header,
            "-w",
            "\n%{http_code}",
        ];
        if body.is_some() {
            argv.extend([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        argv.push(&url);
        let mut child = self
            .ns
            .command(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start curl in the namespace");
        {
            let mut stdin = child.stdin.take().expect("curl stdin");
            if let Some(b) = &body {
                stdin
                    .write_all(b.to_string().as_bytes())
                    .expect("write request body to curl");
            }
        }
        let out = child.wait_with_output().expect("wait for curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (resp, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{method} {path}: no HTTP status from curl: {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, resp.to_string())
    }

    /// An API call that must answer `want` with a JSON body (or no body).
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        want: u16,
    ) -> serde_json::Value {
        let sent = body.as_ref().map(ToString::to_string).unwrap_or_default();
        let (code, resp) = self.call(method, path, body);
        assert_eq!(code, want, "{method} {path} {sent} answered {code}: {resp}");
        if resp.trim().is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&resp)
            .unwrap_or_else(|e| panic!("{method} {path} answered non-JSON ({e}): {resp}"))
    }
}

impl NsApi<'_> {
    /// For a failing test's diagnostics, as `(title, text)` sections: each of
    /// `paths` as the API answers a GET, then the `wgplane_*` and `wireguard_*`
    /// samples of `/metrics`.
    pub fn diagnostics(&self, paths: &[&str]) -> Vec<(String, String)> {
        let mut sections: Vec<(String, String)> = paths
            .iter()
            .map(|path| {
                let (code, body) = self.call("GET", path, None);
                (format!("GET {path} -> {code}"), body)
            })
            .collect();
        let metrics = self.ns.capture(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}/metrics", self.port),
        ]);
        let interesting: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#') && (l.starts_with("wgplane_") || l.starts_with("wireguard_"))
            })
            .collect();
        sections.push((
            "GET /metrics (wgplane_*, wireguard_*)".to_string(),
            interesting.join("\n"),
        ));
        sections
    }
}

/// The arguments of `wgplane run` after the binary's path: state in `state`,
/// the admin API on `api`, `public_host` as the address the routers dial.
pub fn run_args(state: &Path, api: &str, public_host: &str) -> Vec<String> {
    let state = state.to_str().expect("temporary paths are UTF-8");
    [
        "run",
        "--state-dir",
        state,
        "--api-listen",
        api,
        "--public-host",
        public_host,
    ]
    .map(String::from)
    .to_vec()
}

/// A WireGuard keypair from `wg`: (private key file in `dir`, public key).
pub fn wg_keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = run_checked(Command::new("wg").arg("genkey"));
    let path = dir.join(format!("{name}.key"));
    write_private(&path, &private);
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start wg pubkey");
    child
        .stdin
        .take()
        .expect("wg pubkey stdin")
        .write_all(private.as_bytes())
        .expect("write to wg pubkey");
    let out = child.wait_with_output().expect("wait for wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// Starts `wireguard-go -f <ifname>` in `ns` and waits until `wg` can talk to it.
pub fn start_wireguard_go(ns: &Netns, label: &str, ifname: &str, dir: &Path) -> Proc {
    let log = dir.join(format!("{ifname}.log"));
    let mut proc = ns.spawn(label, &["wireguard-go", "-f", ifname], &WG_ENV, &log);
    proc.leaves = Some(PathBuf::from(format!("/var/run/wireguard/{ifname}.sock")));
    let up = wait_for(Duration::from_secs(10), || {
        if !proc.is_running() {
            return Some(false);
        }
        ns.output(&["wg", "show", ifname])
            .status
            .success()
            .then_some(true)
    });
    match up {
        Some(true) => proc,
        Some(false) => panic!("{label} exited at start: {}", proc.log()),
        None => panic!("{label} never answered `wg show {ifname}`: {}", proc.log()),
    }
}

/// The HTTP status of `GET /healthz` on the appliance at `api`, from inside `ns`
/// ("000" when nothing answers within 2 s).
pub fn health_status(ns: &Netns, api: &str) -> String {
    let url = format!("http://{api}/healthz");
    let code = ns.capture(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "2",
        &url,
    ]);
    code.trim().to_owned()
}

/// Waits until the wgplane started as `proc` in `ns` has written its token and
/// answers 200 on `/healthz` at `api`; then writes the `Authorization` header
/// for curl to `header_file`. Panics if it exits or takes more than 15 s.
pub fn wait_wgplane_ready(
    ns: &Netns,
    proc: &mut Proc,
    api: &str,
    token_file: &Path,
    header_file: &Path,
) {
    let ready = wait_for(Duration::from_secs(15), || {
        if !proc.is_running() {
            return Some(false);
        }
        let token = fs::read_to_string(token_file).ok()?;
        let token = token.trim();
        if token.is_empty() {
            return None;
        }
        (health_status(ns, api) == "200").then(|| {
            write_private(header_file, &format!("Authorization: Bearer {token}\n"));
            true
        })
    });
    match ready {
        Some(true) => {}
        Some(false) => panic!("wgplane exited during start-up"),
        None => panic!(
            "wgplane did not create {} and answer 200 on /healthz within 15 s",
            token_file.display()
        ),
    }
}
