//! The command line: key tools compatible with `wg`, config errors that stop
//! start-up with the file, the key and the reason, backups, health checks,
//! scheduling, log format and the benchmarks' relay.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

fn pubkey(private: &str) -> String {
    let mut child = Command::new(support::binary())
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wgplane pubkey");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

#[test]
fn genkey_and_pubkey_match_wg_formats() {
    let out = Command::new(support::binary())
        .arg("genkey")
        .output()
        .expect("genkey");
    let private = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(private.trim().len(), 44);
    assert!(wgplane::keys::decode(private.trim()).is_ok());
    // RFC 7748's Alice key, as `wg pubkey` prints its public key.
    assert_eq!(
        pubkey("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n"),
        "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
    );
    // The same as wg itself, when it is installed.
    if let Ok(mut wg) = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        wg.stdin
            .take()
            .expect("stdin")
            .write_all(private.as_bytes())
            .expect("write");
        let out = wg.wait_with_output().expect("wg pubkey");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            pubkey(&private)
        );
    } else {
        eprintln!("note: wg not installed, compared against the RFC 7748 vector only");
    }
}

/// A closed stdout (`wgplane genkey | head -c0`) is an error, not a panic.
#[test]
fn genkey_into_a_closed_pipe_fails_without_a_panic() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(support::binary())
        .arg("genkey")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("genkey");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_config_stops_start_up_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[tunnels]\nsubnet_prefix_len = 40\n").expect("write");
    let port = support::free_tcp_port();
    let out = exits(
        Command::new(support::binary())
            .args([
                "run",
                "--api-listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path()),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("tunnels.subnet_prefix_len"),
        "{err}"
    );
    assert!(
        !dir.path().join("api-token").exists(),
        "nothing happens before validation"
    );

    std::fs::write(&file, "[api]\nlisten = 5\n").expect("write");
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml") && err.contains("listen"),
        "{err}"
    );
}

#[test]
fn the_example_config_starts() {
    // config/wgplane.toml is loaded by the unit tests; here the binary accepts it too.
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = support::free_tcp_port();
    let mut child = Command::new(support::binary())
        .args([
            "run",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/wgplane.toml"),
        ])
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(&state)
        // Only the file speaks: nothing from the developer's WGPLANE_* settings.
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("WGPLANE_")))
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    let token = state.join("api-token");
    let db = state.join("state.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(token.exists() && db.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(token.exists() && db.exists());
    // What it created is its own alone: the directory 0700, every file in it
    // (token, lock, master key, database and journal) 0600, no temporary file left.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&state).expect("read state dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "{name} left behind");
            assert_eq!(mode(&path), 0o600, "{name}");
            names.push(name);
        }
        names.sort();
        assert!(
            names.starts_with(&["api-token".into(), "lock".into(), "master-key".into()]),
            "{names:?}"
        );
    }
}

#[test]
fn bench_refuses_tunnels_with_a_given_tenant() {
    // --tenant storms that one tenant's tunnel: a tunnel count makes no sense.
    let out = Command::new(support::binary())
        .args([
            "bench",
            "--mode",
            "handshakes",
            "--tenant",
            "ktn",
            "--tunnels",
            "3",
        ])
        .output()
        .expect("run wgplane bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--tunnels") && err.contains("--tenant"),
        "{err}"
    );
}

/// `wgplane backup` of a directory that holds no state, or a database of
/// something else, fails with the path in the message and writes nothing.
#[test]
fn backup_refuses_what_is_no_state_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.db");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let backup = |state_dir: &std::path::Path| {
        exits(
            Command::new(support::binary())
                .arg("backup")
                .arg("--state-dir")
                .arg(state_dir)
                .arg(&copy)
                .env_remove("WGPLANE_CONFIG")
                .env_remove("WGPLANE_STATE_DIR"),
        )
    };
    let out = backup(&empty);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&*empty.join("state.db").to_string_lossy()),
        "{err}"
    );

    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    rusqlite::Connection::open(other.join("state.db"))
        .and_then(|c| c.execute_batch("CREATE TABLE t (x);"))
        .expect("another database");
    let out = backup(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a wgplane state database"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// Runs `cmd` and returns its output once it exits; should it still run after
/// 30 s (a start-up that should have failed), it is killed by PID and the test
/// fails instead of hanging.
fn exits(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after 30 s: {cmd:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The name and scheduling policy (`SCHED_BATCH` = 3, default = 0) of every
/// thread of process `pid`, from `/proc/<pid>/task/<tid>/stat` (field 41).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            let (open, close) = (
                stat.find('(').expect("comm"),
                stat.rfind(')').expect("comm"),
            );
            let name = stat[open + 1..close].to_owned();
            // Fields after the command name, which is in parentheses.
            let policy = stat[close + 2..]
                .split(' ')
                .nth(38)
                .expect("policy field")
                .parse()
                .expect("a number");
            (name, policy)
        })
        .collect()
}

/// CPU time (user + system, in clock ticks) of process `pid`'s threads named
/// `name`, from fields 14 and 15 of their `stat`.
fn threads_cpu(pid: u32, name: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|stat| stat.contains(&format!("({name})")))
        .map(|stat| {
            let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
                .split(' ')
                .collect();
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
        })
        .sum()
}

/// The tunnels' threads run under `SCHED_BATCH`, and do the tunnels' work;
/// the admin API's and the rest keep the default policy, so that an answer's
/// own wake-ups do not wait behind other work. Turned off, every thread has
/// the default policy.
#[test]
fn the_tunnels_threads_run_sched_batch_unless_turned_off() {
    let on = support::Appliance::start();
    let tenant = on.expect("PUT", "/v1/tenants/acme", None, 201);
    let port = tenant["listen_port"].as_u64().expect("listen_port") as u16;
    // Datagrams to the tunnel (not WireGuard: read and dropped) cost the
    // tunnels' threads CPU time.
    let before = threads_cpu(on.pid(), "wgplane-tunnels");
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while threads_cpu(on.pid(), "wgplane-tunnels") == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the tunnels' threads never ran"
        );
        for _ in 0..20_000 {
            let _ = sender.send_to(&[0; 32], ("127.0.0.1", port));
        }
    }
    let threads = thread_policies(on.pid());
    let (tunnels, rest): (Vec<_>, Vec<_>) = threads
        .iter()
        .partition(|(name, _)| name == "wgplane-tunnels");
    assert!(!tunnels.is_empty() && rest.len() > 1, "{threads:?}");
    assert!(
        tunnels.iter().all(|(_, p)| *p == 3),
        "SCHED_BATCH: {threads:?}"
    );
    assert!(
        rest.iter().all(|(_, p)| *p == 0),
        "default policy: {threads:?}"
    );
    let off = support::Appliance::start_with_env(&[("WGPLANE_BATCH_SCHEDULING", "false")]);
    let threads = thread_policies(off.pid());
    assert!(threads.iter().any(|(name, _)| name == "wgplane-tunnels"));
    assert!(
        threads.iter().all(|(_, p)| *p == 0),
        "default policy: {threads:?}"
    );
}

/// Every non-empty line of `log` as JSON; panics at one that is not.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `WGPLANE_LOG_FORMAT=json`: every log line is one JSON object, with the
/// message and fields apart, and no private key in any of them.
#[test]
fn json_logs_are_one_object_per_line() {
    let app = support::Appliance::start_with_env(&[("WGPLANE_LOG_FORMAT", "json")]);
    app.expect("PUT", "/v1/tenants/acme", None, 201);
    app.expect("PUT", "/v1/tenants/acme/routers/r1", Some("{}"), 201);
    let script = app.expect("GET", "/v1/tenants/acme/routers/r1/script", None, 200);
    let private = script
        .as_str()
        .and_then(|s| s.split("private-key=\"").nth(1))
        .and_then(|s| s.split('"').next())
        .expect("the script carries the generated key")
        .to_owned();
    let log = app.log();
    let lines = json_lines(&log);
    let up = lines
        .iter()
        .find(|l| l["fields"]["message"] == "tunnel up")
        .unwrap_or_else(|| panic!("no tunnel-up line:\n{log}"));
    assert_eq!(up["level"], "INFO");
    assert_eq!(up["fields"]["tenant"], "acme");
    assert!(!log.contains(&private), "a private key in the log");
}

/// Flags beat `WGPLANE_*` variables, which beat the config file, which beats
/// the embedded defaults; a bad value given by variable stops start-up and
/// names it.
#[test]
fn flags_beat_variables_beat_the_file_beat_the_defaults() {
    let state = tempfile::tempdir().expect("tempdir");
    let config = state.path().join("layers.toml");
    std::fs::write(
        &config,
        "[tunnels]\nsubnet_start = \"10.150.0.0\"\nsubnet_prefix_len = 20\n",
    )
    .expect("config");
    let config = config.to_str().expect("UTF-8").to_owned();
    let app = support::Appliance::start_with(
        state,
        support::free_tcp_port(),
        support::free_udp_ports(4),
        &[
            ("WGPLANE_CONFIG", &config),
            // Beats the file's subnet_start; loses to the test's --public-host.
            ("WGPLANE_SUBNET_START", "10.160.0.0"),
            ("WGPLANE_PUBLIC_HOST", "elsewhere.example.net"),
        ],
    )
    .unwrap_or_else(|log| panic!("did not start: {log}"));
    let tenant = app.expect("PUT", "/v1/tenants/layers", None, 201);
    // The variable's start, the file's prefix length (over the default /16).
    assert_eq!(tenant["subnet_cidr"], "10.160.0.0/20", "{tenant}");
    let endpoint = tenant["endpoint"].as_str().unwrap_or_default();
    assert!(
        endpoint.starts_with("127.0.0.1:"),
        "the flag wins: {tenant}"
    );
    drop(app);

    let state = tempfile::tempdir().expect("tempdir");
    let refused = support::Appliance::start_with(
        state,
        support::free_tcp_port(),
        support::free_udp_ports(4),
        &[("WGPLANE_SUBNET_PREFIX_LEN", "40")],
    );
    let Err(log) = refused else {
        panic!("a bad variable was taken")
    };
    assert!(log.contains("tunnels.subnet_prefix_len"), "{log}");
}

/// `wgplane run --help` lists the embedded defaults, as the README says.
#[test]
fn run_help_lists_the_defaults() {
    let out = exits(Command::new(support::binary()).args(["run", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    let defaults = wgplane::config::Settings::default();
    for value in [
        defaults.api.listen.to_string(),
        defaults.tunnels.first_port.to_string(),
        defaults.tunnels.bind.to_string(),
        defaults.tunnels.subnet_start.to_string(),
        defaults.tunnels.supernet.to_string(),
        defaults.tunnels.liveness_timeout_secs.to_string(),
        defaults.tunnels.handshakes_per_second.to_string(),
        defaults.tunnels.handshake_budget_per_second.to_string(),
        defaults.tun.name.clone(),
        defaults.state.dir.display().to_string(),
    ] {
        assert!(
            help.contains(&format!("[default: {value}")),
            "{value} not in:\n{help}"
        );
    }
}

/// With JSON logs, the error that stops start-up (the API's port taken) is a
/// JSON line like the others, and a RUST_LOG that is no filter is warned
/// about, not silently replaced.
#[test]
fn a_fatal_error_is_a_json_line_with_json_logs() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--log-format", "json", "--api-listen"])
            .arg(taken.local_addr().expect("address").to_string())
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--first-port", &support::free_udp_ports(2).to_string()])
            .env("RUST_LOG", "info,=="),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&said);
    let fatal = lines.last().expect("a line");
    assert_eq!(fatal["level"], "ERROR", "{said}");
    let error = fatal["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot bind the admin API"), "{said}");
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("RUST_LOG"))),
        "{said}"
    );
}

/// A webhook URL's credentials show neither in `--help` (which names the
/// variable only) nor in the error about a URL that is not http(s).
#[test]
fn webhook_credentials_stay_out_of_help_and_errors() {
    let secret = "user:s3cret@hooks.example";
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--help"])
            .env("WGPLANE_WEBHOOKS", format!("https://{secret}/x")),
    );
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("WGPLANE_WEBHOOKS"), "{help}");
    assert!(!help.contains("s3cret"), "{help}");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--state-dir"])
            .arg(dir.path())
            .env("WGPLANE_WEBHOOKS", format!("ftp://{secret}/x")),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("events.webhooks"), "{said}");
    assert!(!said.contains("s3cret"), "{said}");
}

/// `wgplane health` (a container health check without curl): exit status 0
/// with `ok` while the appliance answers 200, 1 when nothing answers.
#[test]
fn health_says_whether_the_appliance_is_up() {
    let app = support::Appliance::start();
    let health = |api: &str| {
        exits(
            Command::new(support::binary())
                .args(["health", "--timeout", "5", "--api", api])
                .env_remove("WGPLANE_API_URL"),
        )
    };
    let up = health(&format!("http://{}", app.api));
    assert!(up.status.success(), "{up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout), "ok\n");
    let nobody = format!("http://127.0.0.1:{}", support::free_tcp_port());
    let down = health(&nobody);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("no answer"),
        "{down:?}"
    );
    // Without --api it asks where `run` listens: the variable `run` reads, or
    // the config file's api.listen; an address with no scheme, or a URL that
    // already ends in /healthz, are taken as meant.
    let quiet = |command: &mut Command| {
        command
            .args(["health", "--timeout", "5"])
            .env_remove("WGPLANE_API_URL")
            .env_remove("WGPLANE_API_LISTEN")
            .env_remove("WGPLANE_CONFIG");
    };
    let mut by_variable = Command::new(support::binary());
    quiet(&mut by_variable);
    by_variable.env("WGPLANE_API_LISTEN", app.api.to_string());
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("[api]\nlisten = \"{}\"\n", app.api)).unwrap();
    let mut by_config = Command::new(support::binary());
    quiet(&mut by_config);
    by_config.arg("--config").arg(config.path());
    let mut bare = Command::new(support::binary());
    quiet(&mut bare);
    bare.args(["--api", &app.api.to_string()]);
    let mut full = Command::new(support::binary());
    quiet(&mut full);
    full.args(["--api", &format!("http://{}/healthz", app.api)]);
    for mut command in [by_variable, by_config, bare, full] {
        let out = exits(&mut command);
        assert!(out.status.success(), "{command:?}: {out:?}");
    }
}

/// `wgplane relay` (the hubs lab's floor) passes a client's datagrams to the
/// upstream address and the upstream's answers back, unchanged and in order.
#[test]
fn relay_passes_datagrams_both_ways() {
    use std::net::UdpSocket;
    use std::time::Duration;

    let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
    upstream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let port = support::free_udp_ports(1);
    let mut relay = Command::new(support::binary())
        .args(["relay", "--listen", &format!("127.0.0.1:{port}"), "--to"])
        .arg(upstream.local_addr().expect("addr").to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run wgplane relay");
    let result = std::panic::catch_unwind(|| {
        let phone = UdpSocket::bind("127.0.0.1:0").expect("bind");
        phone
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let at = format!("127.0.0.1:{port}");
        let mut buf = [0u8; 2048];
        // Until the relay listens: its first datagram through.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            phone.send_to(b"hello", &at).expect("send");
            if let Ok((n, _)) = upstream.recv_from(&mut buf) {
                assert_eq!(&buf[..n], b"hello");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay never passed a datagram"
            );
        }
        while upstream.recv_from(&mut buf).is_ok() {} // the retries' copies
        for i in 0..50u8 {
            phone.send_to(&[i; 148], &at).expect("send");
        }
        for i in 0..50u8 {
            let (n, from) = upstream.recv_from(&mut buf).expect("relayed");
            assert_eq!(
                (&buf[..n], from.port()),
                (&[i; 148][..], port),
                "datagram {i}"
            );
        }
        upstream.send_to(b"answer", &at).expect("send");
        let (n, from) = phone.recv_from(&mut buf).expect("the answer");
        assert_eq!((&buf[..n], from.port()), (&b"answer"[..], port));
    });
    let _ = relay.kill();
    let _ = relay.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A bad value in a `WGPLANE_*` variable is said to come from it: clap's own
/// error names only the flag, which the operator of a container never typed.
#[test]
fn a_bad_variable_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--state-dir"])
            .arg(dir.path())
            .env("WGPLANE_LAST_PORT", "sixty"),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--last-port") && said.contains("sixty"),
        "{said}"
    );
    assert!(
        said.contains("the value came from the environment variable WGPLANE_LAST_PORT"),
        "{said}"
    );
    // Given as a flag, the flag is what is wrong.
    let out = exits(
        Command::new(support::binary())
            .args(["run", "--last-port", "sixty", "--state-dir"])
            .arg(dir.path())
            .env("WGPLANE_LAST_PORT", "sixty"),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(!said.contains("environment variable"), "{said}");
}

/// `wgplane import` says what stops it: a file that does not parse (by line,
/// never quoting the key), a port the old interface still holds (with the
/// hint), and imports nothing then.
#[test]
fn import_says_what_stops_it() {
    let app = support::Appliance::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = wgplane::keys::SecretKey::generate().to_base64();
    let import = |text: &str| {
        let file = dir.path().join("wg0.conf");
        std::fs::write(&file, text).expect("write conf");
        let (ok, text) = run_import(&app, "moved", &file);
        assert!(!text.contains(&secret), "{text}");
        (ok, text)
    };
    let (ok, text) = import(&format!(
        "[Interface]\nPrivateKey = {secret}\nListenPorts = 1\n"
    ));
    assert!(
        !ok && text.contains("line 3: unknown key \"ListenPorts\""),
        "{text}"
    );
    let (ok, text) = import(&format!("[Interface]\nPrivateKey = {secret}x\n"));
    assert!(!ok && text.contains("line 2: PrivateKey"), "{text}");

    // The old interface still holds its port.
    let held = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let conf = format!(
        "[Interface]\nAddress = 10.100.0.1/16\nListenPort = {port}\nPrivateKey = {secret}\n"
    );
    let (ok, text) = import(&conf);
    assert!(
        !ok && text.contains("is the old interface still up?"),
        "{text}"
    );
    app.expect("GET", "/v1/tenants/moved", None, 404);
    drop(held);
    let (ok, text) = import(&conf);
    assert!(ok, "{text}");
    let t = app.expect("GET", "/v1/tenants/moved", None, 200);
    assert_eq!(t["listen_port"], port);
}

/// An import that stopped half-way (a router id that holds another key here)
/// leaves that router alone, and runs again to the end once it is out of the
/// way, keeping what it made the first time.
#[test]
fn an_import_that_stopped_runs_again() {
    let app = support::Appliance::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = wgplane::keys::SecretKey::generate().to_base64();
    let public =
        |_| wgplane::keys::encode(wgplane::keys::SecretKey::generate().public().as_bytes());
    let (a, b, other) = (public(1), public(2), public(3));
    let port = support::free_udp_ports(1);
    let file = dir.path().join("wg0.conf");
    let interface = format!(
        "[Interface]\nAddress = 10.100.0.1/16\nListenPort = {port}\nPrivateKey = {secret}\n"
    );
    let import = || run_import(&app, "two", &file);
    // The tunnel first, then a router of that id made by hand with another key.
    std::fs::write(&file, &interface).expect("write conf");
    let (ok, text) = import();
    assert!(ok, "{text}");
    let by_hand = format!("{{\"public_key\":\"{other}\",\"vpn_ip\":\"10.100.1.9\"}}");
    app.expect(
        "PUT",
        "/v1/tenants/two/routers/Branch-B",
        Some(&by_hand),
        201,
    );
    let peers = format!(
        "{interface}\n[Peer]\n# Name = Branch A\nPublicKey = {a}\nAllowedIPs = 10.100.1.1/32\n\n\
         [Peer]\n# Name = Branch B\nPublicKey = {b}\nAllowedIPs = 10.100.1.2/32\n"
    );
    std::fs::write(&file, &peers).expect("write conf");
    let (ok, text) = import();
    assert!(!ok, "{text}");
    assert!(text.contains("router Branch-A (line 6): created"), "{text}");
    assert!(
        text.contains(
            "router Branch-B (line 11): not imported: the id is another key's router here"
        ),
        "{text}"
    );
    let kept = app.expect("GET", "/v1/tenants/two/routers/Branch-B", None, 200);
    assert_eq!(kept["public_key"], other.as_str(), "left alone");

    app.expect("DELETE", "/v1/tenants/two/routers/Branch-B", None, 204);
    let (ok, text) = import();
    assert!(ok, "{text}");
    assert!(
        text.contains("router Branch-A (line 6): exists, now as the file says"),
        "{text}"
    );
    assert!(
        text.contains("router Branch-B (line 11): created"),
        "{text}"
    );
    let b_now = app.expect("GET", "/v1/tenants/two/routers/Branch-B", None, 200);
    assert_eq!(b_now["public_key"], b.as_str());

    // The same file as another tenant: its port, subnet and key are taken.
    // Nothing is made, and the dry run says so before anything goes down.
    let (ok, text) = run_import(&app, "three", &file);
    assert!(!ok && text.contains("nothing imported"), "{text}");
    for taken in [
        format!("port {port} is tenant two's"),
        "tunnel key".to_string(),
        "10.100.0.0/16 overlaps 10.100.0.0/16 of tenant two".to_string(),
    ] {
        assert!(text.contains(&taken), "{taken}: {text}");
    }
    app.expect("GET", "/v1/tenants/three", None, 404);
    let out = Command::new(support::binary())
        .args(["import", "three", "--dry-run"])
        .arg(&file)
        .args(["--api", &format!("http://{}", app.api)])
        .arg("--token-file")
        .arg(app.state_dir().join("api-token"))
        .output()
        .expect("run wgplane import --dry-run");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!("would be refused: port {port} is tenant two's")),
        "{said}"
    );
}

/// `wgplane import <tenant> <file>` against `app`: whether it succeeded, and
/// what it printed.
fn run_import(app: &support::Appliance, tenant: &str, file: &std::path::Path) -> (bool, String) {
    let out = Command::new(support::binary())
        .args(["import", tenant])
        .arg(file)
        .args(["--api", &format!("http://{}", app.api)])
        .arg("--token-file")
        .arg(app.state_dir().join("api-token"))
        .output()
        .expect("run wgplane import");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
