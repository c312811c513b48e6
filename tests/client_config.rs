//! Device configs: the wg-quick text is accepted by `wg-quick strip`, and the PNG at
//! `config.png` is a QR code that decodes to exactly that text.

mod support;

use std::process::Command;

use support::Appliance;

fn provisioned() -> (Appliance, String) {
    let app = Appliance::start();
    let (_, gw) = support::keypair();
    app.put_gateway("kitonga", &gw);
    let c = app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-1",
        Some(r#"{"dns":["1.1.1.1","2606:4700:4700::1111"]}"#),
        201,
    );
    let config = c["config"].as_str().unwrap().to_owned();
    (app, config)
}

#[test]
fn config_is_wg_quick_and_matches_the_api() {
    let (app, config) = provisioned();
    let (status, text) = app.call("GET", "/v1/tenants/kitonga/clients/phone-1/config", None);
    assert_eq!((status, text.as_str().unwrap()), (200, config.as_str()));
    assert!(config.contains("Address = 10.200.0.2/32"));
    assert!(config.contains("DNS = 1.1.1.1, 2606:4700:4700::1111"));
    assert!(config.contains("AllowedIPs = 0.0.0.0/0, ::/0"));
    assert!(config.contains(&format!("Endpoint = 127.0.0.1:{}", app.first_port)));

    let Some(stripped) = wg_quick_strip(&config) else {
        return;
    };
    assert!(stripped.contains("PrivateKey = ") && !stripped.contains("Address"));
}

#[test]
fn qr_code_decodes_to_the_config() {
    let (app, config) = provisioned();
    let resp = reqwest::blocking::Client::new()
        .get(format!(
            "http://{}/v1/tenants/kitonga/clients/phone-1/config.png",
            app.api
        ))
        .bearer_auth(&app.token)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    // It holds the phone's private key: no cache on the way may keep it.
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let bytes = resp.bytes().unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| pixels[y * w + x]);
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1);
    let (_, content) = grids[0].decode().unwrap();
    assert_eq!(content, config);

    // A phone that keeps its own key has no QR code: it would never connect.
    let (_, public) = support::keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/own-key",
        Some(&body),
        201,
    );
    let (status, v) = app.call(
        "GET",
        "/v1/tenants/kitonga/clients/own-key/config.png",
        None,
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("no_private_key")),
        "{v}"
    );
    app.expect(
        "GET",
        "/v1/tenants/kitonga/clients/own-key/config",
        None,
        200,
    );
}

/// The secret of a config's `PrivateKey` line.
fn private_key(config: &str) -> boringtun::x25519::StaticSecret {
    let line = config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .expect("a PrivateKey line");
    boringtun::x25519::StaticSecret::from(wgplane::keys::decode(line).expect("a key"))
}

/// A lost phone: `POST …/key` gives it a key pair generated here, keeping its
/// address. The old key cannot shake hands any more; the new config can.
#[test]
fn a_new_key_replaces_a_lost_phones() {
    let (app, config) = provisioned();
    let tenant = app.expect("GET", "/v1/tenants/kitonga", None, 200);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", app.first_port).parse().unwrap();
    let mut lost = support::UdpPeer::new(private_key(&config), &server_key, server, 1);
    assert!(lost.handshake(), "the first key works");

    let before = app.expect("GET", "/v1/tenants/kitonga/clients/phone-1", None, 200);
    let view = app.expect("POST", "/v1/tenants/kitonga/clients/phone-1/key", None, 200);
    let new_config = view["config"].as_str().unwrap().to_owned();
    assert_ne!(view["public_key"], before["public_key"]);
    assert_eq!(view["vpn_ip"], before["vpn_ip"]);
    assert_ne!(
        private_key(&new_config).to_bytes(),
        private_key(&config).to_bytes()
    );
    assert!(new_config.contains("Address = 10.200.0.2/32"));
    assert!(new_config.contains("DNS = 1.1.1.1, 2606:4700:4700::1111"));
    let (status, text) = app.call("GET", "/v1/tenants/kitonga/clients/phone-1/config", None);
    assert_eq!((status, text.as_str()), (200, Some(new_config.as_str())));

    let mut old = support::UdpPeer::new(private_key(&config), &server_key, server, 2);
    assert!(!old.try_handshake(1), "the old key is no peer any more");
    let mut found = support::UdpPeer::new(private_key(&new_config), &server_key, server, 3);
    assert!(found.handshake(), "the new config connects");

    let (status, v) = app.call("POST", "/v1/tenants/kitonga/clients/nobody/key", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("client_not_found")),
        "{v}"
    );
}

/// A phone with a preshared key made here: its config carries it (and `wg-quick`
/// takes that config), answers show only that it has one, and only a device
/// that holds it shakes hands.
#[test]
fn a_preshared_key_goes_into_the_config_and_the_handshake() {
    let (app, _) = provisioned();
    let c = app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-2",
        Some(r#"{"preshared_key":"generate"}"#),
        201,
    );
    let config = c["config"].as_str().unwrap().to_owned();
    let psk = config
        .lines()
        .find_map(|l| l.strip_prefix("PresharedKey = "))
        .expect("a PresharedKey line")
        .to_owned();
    let view = app.expect("GET", "/v1/tenants/kitonga/clients/phone-2", None, 200);
    assert_eq!(view["has_preshared_key"], true, "{view}");
    for shown in [
        view.to_string(),
        app.call("GET", "/v1/tenants/kitonga/clients", None)
            .1
            .to_string(),
        app.scrape(),
        app.log(),
    ] {
        assert!(!shown.contains(&psk), "the preshared key is shown: {shown}");
    }
    let tenant = app.expect("GET", "/v1/tenants/kitonga", None, 200);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", app.first_port).parse().unwrap();
    let bytes = wgplane::keys::decode(&psk).expect("a key");
    let mut without = support::UdpPeer::new(private_key(&config), &server_key, server, 4);
    assert!(
        !without.try_handshake(1),
        "no session without the preshared key"
    );
    let mut with =
        support::UdpPeer::with_psk(private_key(&config), &server_key, server, 5, Some(bytes));
    assert!(
        with.handshake(),
        "the config's preshared key works\n{}",
        app.log()
    );

    if let Some(stripped) = wg_quick_strip(&config) {
        assert!(stripped.contains(&format!("PresharedKey = {psk}")));
    }
}

/// What `wg-quick strip` makes of `config` (it refuses what is not a wg-quick
/// config); `None` without wg-quick.
fn wg_quick_strip(config: &str) -> Option<String> {
    let wg_quick = support_tool("wg-quick")?;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wgphone.conf");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(wg_quick)
        .arg("strip")
        .arg(&file)
        .output()
        .expect("wg-quick strip");
    assert!(
        out.status.success(),
        "wg-quick strip refused it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A tool from the system, or a printed skip (a failure under CI).
fn support_tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_default();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing under CI"
        );
        eprintln!("SKIP part of client_config: {name} not installed (Debian: wireguard-tools)");
    }
    found
}
