//! A full disk under the state dir: every change that cannot be made durable is
//! answered `503 storage_failed` and undone, in memory and in the data plane;
//! the tunnels go on carrying traffic; once there is space again, changes are
//! made as before, the router endpoints the store refused meanwhile are stored
//! after all, and a `kill -9` and restart shows exactly the acknowledged state.
//!
//! Needs root (it mounts a small tmpfs as the state dir): without it the test
//! says SKIP on stderr, and under CI it fails.

mod common;
mod support;

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{keypair, sample, Appliance, UdpPeer};
use wgplane::core::packet::build::ip_packet;

/// A tmpfs of a few MiB mounted over a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Self {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "wgplane-test"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = File::create(&path).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("fill tmpfs: {e}"),
            }
        }
        // Smaller writes take the last partial page too.
        while file.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        path
    }
}

/// Unmounts, and removes the mount point, which the state's `TempDir` could not
/// remove while the tmpfs was mounted on it.
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg("-l").arg(&self.0).output();
        if !unmounted.is_ok_and(|out| out.status.success()) && !std::thread::panicking() {
            panic!("umount {} failed", self.0.display());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn router_ids(app: &Appliance) -> Vec<String> {
    let list = app.expect("GET", "/v1/tenants/acme/routers", None, 200);
    let mut ids: Vec<String> = list
        .as_array()
        .expect("router list")
        .iter()
        .map(|r| r["router_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

fn assert_refused(app: &Appliance, method: &str, path: &str, body: Option<&str>) {
    let (status, value) = app.call(method, path, body);
    assert_eq!(
        (status, value["error"]["code"].as_str()),
        (503, Some("storage_failed")),
        "{method} {path} on a full disk -> {value}"
    );
}

/// The endpoint stored for router `id`, read from the database itself.
fn stored_endpoint(state: &Path, id: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        state.join("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    db.query_row("SELECT endpoint FROM routers WHERE id = ?1", [id], |r| {
        r.get(0)
    })
    .ok()
    .flatten()
}

/// The appliance on a state directory that is a small tmpfs, with `ports`
/// UDP ports from its first; `None` (a printed skip) without root. Bound in
/// this order, they are dropped the other way round, a panic's unwinding
/// included: the appliance first, then the tmpfs, then the log.
fn on_tmpfs(ports: u16) -> Option<(tempfile::TempDir, Tmpfs, PathBuf, u16, Appliance)> {
    if !common::netns::root_prerequisites_met("full_disk", &["mount", "umount"]) {
        return None;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let log_file = logs.path().join("wgplane.log");
    let disk = Tmpfs::mount(state.path());
    let state_dir = state.path().to_owned();
    let (api_port, first_port) = (support::free_tcp_port(), support::free_udp_ports(ports));
    let app = Appliance::start_logging_to(state, &log_file, api_port, first_port, &[])
        .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
    Some((logs, disk, state_dir, first_port, app))
}

#[test]
fn a_full_disk_refuses_changes_whole_and_loses_none() {
    let Some((logs, disk, state_dir, first_port, app)) = on_tmpfs(4) else {
        return;
    };

    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let server: SocketAddr = ([127, 0, 0, 1], first_port).into();
    let (kept_secret, kept_public) = keypair();
    let body = format!(r#"{{"public_key":"{kept_public}","vpn_ip":"10.100.1.1"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/kept", Some(&body), 201);
    let mut kept = UdpPeer::new(kept_secret, &server_key, server, 0x10);
    assert!(kept.handshake(), "{}", app.log());
    let first_endpoint = kept.socket.local_addr().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_endpoint(&state_dir, "kept").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stored_endpoint(&state_dir, "kept"), Some(first_endpoint));

    let filler = disk.fill();

    // A new router: refused, gone from the API and from the tunnel.
    let (new_secret, new_public) = keypair();
    let body = format!(r#"{{"public_key":"{new_public}"}}"#);
    assert_refused(&app, "PUT", "/v1/tenants/acme/routers/new", Some(&body));
    app.expect("GET", "/v1/tenants/acme/routers/new", None, 404);
    assert_eq!(router_ids(&app), ["kept"]);
    let mut new = UdpPeer::new(new_secret.clone(), &server_key, server, 0x20);
    assert!(!new.try_handshake(1), "a refused router shook hands");

    // A change and a delete of the kept router: refused, and it is unchanged.
    let body =
        format!(r#"{{"public_key":"{kept_public}","vpn_ip":"10.100.1.1","name":"renamed"}}"#);
    assert_refused(&app, "PUT", "/v1/tenants/acme/routers/kept", Some(&body));
    assert_refused(&app, "DELETE", "/v1/tenants/acme/routers/kept", None);
    let view = app.expect("GET", "/v1/tenants/acme/routers/kept", None, 200);
    assert_eq!(view["name"], "kept", "{view}");

    // The operator sees it in the metrics.
    let text = app.scrape();
    assert_eq!(sample(&text, "wgplane_store_writable", &[]), 0.0, "{text}");
    assert!(sample(&text, "wgplane_store_write_failures_total", &[]) >= 3.0);

    // A new tenant: refused, and its port is closed again.
    let port = first_port + 2;
    let body = format!(r#"{{"listen_port":{port}}}"#);
    assert_refused(&app, "PUT", "/v1/tenants/other", Some(&body));
    app.expect("GET", "/v1/tenants/other", None, 404);
    UdpSocket::bind(("127.0.0.1", port)).expect("the refused tenant's port is free again");

    // The kept router still passes traffic, and roams: the new endpoint cannot
    // be stored yet.
    let roamed_to = kept.rebind().to_string();
    let src: IpAddr = "10.100.1.1".parse().unwrap();
    let dst: IpAddr = "10.100.0.1".parse().unwrap();
    kept.send(&ip_packet(src, dst, 32));
    let view = app.expect("GET", "/v1/tenants/acme/routers/kept", None, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut live = view["endpoint"].clone();
    while live != roamed_to.as_str() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        live = app.expect("GET", "/v1/tenants/acme/routers/kept", None, 200)["endpoint"].clone();
    }
    assert_eq!(live, roamed_to.as_str(), "the roam was not seen");
    assert!(kept.try_handshake(1), "the kept router lost its tunnel");

    // Space again: the refused router is made now, and the roamed endpoint is
    // stored by the event hub's retry.
    std::fs::remove_file(filler).expect("remove filler");
    app.expect(
        "PUT",
        "/v1/tenants/acme/routers/new",
        Some(&format!(r#"{{"public_key":"{new_public}"}}"#)),
        201,
    );
    assert_eq!(sample(&app.scrape(), "wgplane_store_writable", &[]), 1.0);
    let deadline = Instant::now() + wgplane::io::events::STORE_RETRY + Duration::from_secs(10);
    while stored_endpoint(&state_dir, "kept").as_deref() != Some(roamed_to.as_str())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        stored_endpoint(&state_dir, "kept").as_deref(),
        Some(roamed_to.as_str()),
        "the endpoint refused on the full disk was never stored\n{}",
        app.log()
    );
    assert!(
        app.log().contains("router endpoints not stored"),
        "{}",
        app.log()
    );

    // Exactly the acknowledged state survives a kill -9.
    let (state, api_port, first_port) = app.kill9();
    let log_file = logs.path().join("wgplane.log");
    let app = Appliance::start_logging_to(state, &log_file, api_port, first_port, &[])
        .unwrap_or_else(|log| panic!("wgplane did not come back:\n{log}"));
    assert_eq!(router_ids(&app), ["kept", "new"]);
    app.expect("GET", "/v1/tenants/other", None, 404);
    let view = app.expect("GET", "/v1/tenants/acme/routers/kept", None, 200);
    assert_eq!(view["name"], "kept", "{view}");
    assert_eq!(view["endpoint"], roamed_to.as_str(), "{view}");
    let mut new = UdpPeer::new(new_secret, &server_key, server, 0x30);
    assert!(new.handshake(), "{}", app.log());
    drop(app);
    drop(disk);
}

/// A store whose write was refused reads writable again once the disk has
/// room, with no change made meanwhile (a quiet appliance: no router roams,
/// no API call): the supervisor probes it every pass with a write that changes
/// nothing, which a full disk refuses too.
#[test]
fn a_store_reads_writable_again_without_a_change() {
    let Some((_logs, disk, _, _, app)) = on_tmpfs(2) else {
        return;
    };
    app.expect("PUT", "/v1/tenants/acme", None, 201);

    let filler = disk.fill();
    assert_refused(&app, "PUT", "/v1/tenants/acme/routers/r1", None);
    let writable = || sample(&app.scrape(), "wgplane_store_writable", &[]);
    assert_eq!(writable(), 0.0);
    // A pass of the supervisor later: the probe was refused as well.
    std::thread::sleep(wgplane::api::supervisor::RETRY + Duration::from_secs(1));
    assert_eq!(
        writable(),
        0.0,
        "a write that changes nothing is a write too"
    );

    std::fs::remove_file(filler).expect("remove filler");
    let deadline = Instant::now() + wgplane::api::supervisor::RETRY + Duration::from_secs(5);
    while writable() != 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(writable(), 1.0, "probed writable again");
    app.expect("PUT", "/v1/tenants/acme/routers/r1", None, 201);
    drop(app);
    drop(disk);
}
