//! The admin API answers bad input with a 4xx JSON error naming the field, and
//! requires its token.

mod support;

use support::Appliance;

fn error_of(v: &serde_json::Value) -> (&str, Option<&str>) {
    (
        v["error"]["code"].as_str().expect("error.code"),
        v["error"]["field"].as_str(),
    )
}

#[test]
fn token_is_required_and_checked() {
    let app = Appliance::start();
    for token in [None, Some("wrong"), Some("")] {
        let (status, v) = app.call_with("GET", "/v1/tenants", None, token);
        assert_eq!(status, 401);
        assert_eq!(error_of(&v).0, "unauthorized");
    }
    let (status, _) = app.call_with("GET", "/healthz", None, None);
    assert_eq!(status, 200);
    // Without the token, no path under /v1 tells whether it exists or what
    // it takes: a 401, not a 404 or a 405.
    for (method, path) in [
        ("GET", "/v1/no-such-thing"),
        ("GET", "/v1"),
        ("DELETE", "/v1/tenants"),
        ("POST", "/v1/tenants/acme/routers/r1"),
    ] {
        let (status, v) = app.call_with(method, path, None, None);
        assert_eq!(
            (status, error_of(&v).0),
            (401, "unauthorized"),
            "{method} {path}"
        );
    }
    // With it, they are what they are.
    assert_eq!(app.call("GET", "/v1/no-such-thing", None).0, 404);
    assert_eq!(app.call("DELETE", "/v1/tenants", None).0, 405);
    // Outside /v1, an unknown path is a 404 to anybody.
    assert_eq!(app.call_with("GET", "/nowhere", None, None).0, 404);
}

/// Every change is logged with its method, path and answer (refused ones
/// too); reads are not, nor is a refused token at the default level.
#[test]
fn changes_are_logged_reads_are_not() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/audited", None, 201);
    app.expect("PUT", "/v1/tenants/audited/routers/r9", None, 201);
    app.expect("GET", "/v1/tenants/audited/routers/r9", None, 200);
    let (status, _) = app.call(
        "PUT",
        "/v1/tenants/audited/routers/r9",
        Some("{\"vpn_ip\":\"nope\"}"),
    );
    assert_eq!(status, 400);
    app.expect("DELETE", "/v1/tenants/audited/routers/r9", None, 204);
    let (status, _) = app.call_with("DELETE", "/v1/tenants/audited", None, Some("wrong"));
    assert_eq!(status, 401);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wanted = [
        "PUT /v1/tenants/audited 201",
        "PUT /v1/tenants/audited/routers/r9 201",
        "PUT /v1/tenants/audited/routers/r9 400",
        "DELETE /v1/tenants/audited/routers/r9 204",
    ];
    let changes = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" change"))
            .filter_map(|l| {
                let field = |name: &str| {
                    let at = l.find(&format!("{name}="))? + name.len() + 1;
                    l[at..].split_whitespace().next().map(str::to_owned)
                };
                Some(format!(
                    "{} {} {}",
                    field("method")?,
                    field("path")?,
                    field("status")?
                ))
            })
            .collect()
    };
    while changes(&app.log()).len() < wanted.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = app.log();
    assert_eq!(changes(&log), wanted, "{log}");
}

/// Method, path, body, expected status, error code and field.
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    u16,
    &'a str,
    Option<&'a str>,
);

#[test]
fn bad_input_gets_4xx_naming_the_field() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/t1", None, 201);
    let cases: &[Case] = &[
        (
            "PUT",
            "/v1/tenants/bad%20id",
            None,
            400,
            "invalid_field",
            Some("tenant_id"),
        ),
        (
            "PUT",
            "/v1/tenants/t2",
            Some(r#"{"listen_port":"x"}"#),
            400,
            "invalid_field",
            Some("listen_port"),
        ),
        (
            "PUT",
            "/v1/tenants/t2",
            Some(r#"{"subnet":"10.1.2.3/16"}"#),
            400,
            "invalid_field",
            Some("subnet"),
        ),
        (
            "PUT",
            "/v1/tenants/t2",
            Some(r#"{"colour":"red"}"#),
            400,
            "invalid_field",
            Some("colour"),
        ),
        (
            "PUT",
            "/v1/tenants/t2",
            Some("{not json"),
            400,
            "invalid_body",
            None,
        ),
        (
            "PUT",
            "/v1/tenants/t1",
            Some(r#"{"subnet":"10.99.0.0/16"}"#),
            409,
            "immutable_field",
            Some("subnet"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/routers/r1",
            Some(r#"{"public_key":"abc"}"#),
            400,
            "invalid_field",
            Some("public_key"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/routers/r1",
            Some(r#"{"vpn_ip":"10.55.0.1"}"#),
            409,
            "address_unavailable",
            Some("vpn_ip"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/routers/r1",
            Some(r#"{"vpn_ip":"nope"}"#),
            400,
            "invalid_field",
            Some("vpn_ip"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/routers/r1",
            Some(r#"{"allowed_ips":["10.100.0.0/8"]}"#),
            409,
            "address_unavailable",
            Some("allowed_ips"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/egress",
            Some(r#"{"gateways":[]}"#),
            400,
            "invalid_field",
            Some("pool"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/egress",
            Some(r#"{"pool":"10.200.0.0/24","gateways":["ghost"]}"#),
            400,
            "invalid_field",
            Some("gateways"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/egress",
            Some(r#"{"pool":"10.100.5.0/24","gateways":["ghost"]}"#),
            409,
            "overlap",
            Some("pool"),
        ),
        (
            "PUT",
            "/v1/tenants/t1/clients/c1",
            Some("{}"),
            409,
            "egress_not_found",
            None,
        ),
        (
            "GET",
            "/v1/tenants/nope",
            None,
            404,
            "tenant_not_found",
            None,
        ),
        (
            "GET",
            "/v1/tenants/t1/routers/nope",
            None,
            404,
            "router_not_found",
            None,
        ),
        (
            "GET",
            "/v1/tenants/t1/egress",
            None,
            404,
            "egress_not_found",
            None,
        ),
        (
            "GET",
            "/v1/tenants/t1/route?src=1.2.3.4",
            None,
            400,
            "invalid_field",
            Some("dst"),
        ),
        (
            "GET",
            "/v1/tenants/t1/route?src=x&dst=1.1.1.1",
            None,
            400,
            "invalid_field",
            Some("src"),
        ),
        (
            "GET",
            "/v1/tenants/t1/route?src=1.1.1.1&src=2.2.2.2&dst=1.1.1.1",
            None,
            400,
            "invalid_field",
            Some("src"),
        ),
        // Not UTF-8 once percent-decoded: still JSON, still naming the parameter.
        (
            "GET",
            "/v1/tenants/%FF",
            None,
            400,
            "invalid_field",
            Some("tenant_id"),
        ),
        (
            "DELETE",
            "/v1/tenants/t1/clients/%C3%28",
            None,
            400,
            "invalid_field",
            Some("client_id"),
        ),
        ("GET", "/v1/nothing", None, 404, "not_found", None),
    ];
    for (method, path, body, status, code, field) in cases {
        let (got, v) = app.call(method, path, *body);
        assert_eq!(got, *status, "{method} {path} {body:?} -> {v}");
        assert_eq!(
            error_of(&v),
            (*code, *field),
            "{method} {path} {body:?} -> {v}"
        );
    }
    // Nothing was created by the refused requests.
    let list = app.expect("GET", "/v1/tenants", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let routers = app.expect("GET", "/v1/tenants/t1/routers", None, 200);
    assert_eq!(routers.as_array().unwrap().len(), 0);

    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(100_000));
    let (status, v) = app.call("PUT", "/v1/tenants/t1/routers/r1", Some(&big));
    assert_eq!(status, 413, "{v}");
}

#[test]
fn conflicts() {
    let app = Appliance::start();
    let (_, key) = support::keypair();
    let body = format!(r#"{{"public_key":"{key}","vpn_ip":"10.100.0.40"}}"#);
    app.expect("PUT", "/v1/tenants/t1/routers/gw", Some(&body), 201);
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/t1/routers/other",
        Some(&format!(r#"{{"public_key":"{key}"}}"#)),
    );
    assert_eq!(
        (status, error_of(&v)),
        (409, ("duplicate_public_key", Some("public_key")))
    );
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/t1/routers/other",
        Some(r#"{"vpn_ip":"10.100.0.40"}"#),
    );
    assert_eq!(
        (status, error_of(&v)),
        (409, ("address_unavailable", Some("vpn_ip")))
    );
    app.expect(
        "PUT",
        "/v1/tenants/t1/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["gw"]}"#),
        201,
    );
    app.expect("PUT", "/v1/tenants/t1/clients/p1", None, 201);
    let (status, v) = app.call("DELETE", "/v1/tenants/t1/routers/gw", None);
    assert_eq!((status, error_of(&v).0), (409, "in_use"));
    let (status, v) = app.call("DELETE", "/v1/tenants/t1/egress", None);
    assert_eq!((status, error_of(&v).0), (409, "in_use"));
    // Egress of a tenant that does not exist.
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/nobody/egress",
        Some(r#"{"pool":"10.201.0.0/24","gateways":["x"]}"#),
    );
    assert_eq!((status, error_of(&v).0), (404, "tenant_not_found"), "{v}");
    // Another tenant cannot claim the pool, nor a port in use.
    app.expect("PUT", "/v1/tenants/t3/routers/gw3", None, 201);
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/t3/egress",
        Some(r#"{"pool":"10.200.0.128/25","gateways":["gw3"]}"#),
    );
    assert_eq!(
        (status, error_of(&v)),
        (409, ("overlap", Some("pool"))),
        "{v}"
    );
    app.expect("DELETE", "/v1/tenants/t3", None, 204);
    let port = app.first_port;
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/t2",
        Some(&format!(r#"{{"listen_port":{port}}}"#)),
    );
    assert_eq!(
        (status, error_of(&v)),
        (409, ("port_in_use", Some("listen_port")))
    );
    app.expect("DELETE", "/v1/tenants/t1/clients/p1", None, 204);
    app.expect("DELETE", "/v1/tenants/t1/egress", None, 204);
    app.expect("DELETE", "/v1/tenants/t1/routers/gw", None, 204);
}

/// Refusals that come before a handler would read the body (no such route, no
/// token, a bad id in the path) wait for the whole body: an answer sent while
/// the client is still sending is lost when the connection is then reset.
#[test]
fn refusals_wait_for_the_body_they_refuse() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let app = Appliance::start();
    let body = vec![b'x'; 60_000];
    for (path, token, status) in [
        ("/v1/no-such-route", Some(app.token.as_str()), "404"),
        ("/v1/tenants/acme", None, "401"),
        ("/v1/tenants/bad%20id", Some(app.token.as_str()), "400"),
    ] {
        let mut conn = std::net::TcpStream::connect(app.api).expect("connect");
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).expect("head");
        conn.write_all(&body[..1000]).expect("first bytes");
        // Nothing comes back while the body is incomplete.
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("{path}: answered before the body was read: {other:?}"),
        }
        conn.write_all(&body[1000..]).expect("rest of the body");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {answer}"
        );
        assert!(answer.contains("\"error\""), "{path}: {answer}");
    }
}

/// `/metrics` is open by default; `api.metrics_need_token` puts it behind the
/// same token as `/v1`.
#[test]
fn metrics_can_require_the_token() {
    let open = Appliance::start();
    assert_eq!(open.call_with("GET", "/metrics", None, None).0, 200);

    let app = Appliance::start_with_config("[api]\nmetrics_need_token = true\n");
    for token in [None, Some("wrong")] {
        let (status, v) = app.call_with("GET", "/metrics", None, token);
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(error_of(&v).0, "unauthorized");
    }
    let (status, text) = app.call_with("GET", "/metrics", None, Some(app.token.as_str()));
    assert_eq!(status, 200);
    assert!(text.to_string().contains("wgplane_"), "{text}");
    assert_eq!(app.call_with("GET", "/healthz", None, None).0, 200);

    // The same by variable, as a container sets it.
    let by_variable = Appliance::start_with(
        tempfile::tempdir().expect("tempdir"),
        support::free_tcp_port(),
        support::free_udp_ports(4),
        &[("WGPLANE_METRICS_NEED_TOKEN", "true")],
    )
    .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
    assert_eq!(by_variable.call_with("GET", "/metrics", None, None).0, 401);
}

/// SIGHUP reads the token file again: the new token opens `/v1` and the old
/// one no longer does; an empty file keeps the token and says so. The process
/// lives on (SIGHUP's default would end it).
#[test]
fn sighup_reads_the_token_again() {
    let app = Appliance::start();
    let stream = app.subscribe_events();
    let hangup = || {
        let pid = libc::pid_t::try_from(app.pid()).expect("pid");
        // SAFETY: kill(2) on our own child's PID, which it keeps until waited for.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    };
    let file = app.state_dir().join("api-token");
    std::fs::write(&file, "rotated-token-1\n").expect("write the token");
    hangup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app
        .call_with("GET", "/v1/tenants", None, Some("rotated-token-1"))
        .0
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "{}", app.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, v) = app.call("GET", "/v1/tenants", None);
    assert_eq!((status, error_of(&v)), (401, ("unauthorized", None)), "{v}");
    // The event stream opened with the old token has ended.
    assert!(
        matches!(
            stream.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ),
        "the old token's event stream still runs"
    );

    std::fs::write(&file, "").expect("empty the token file");
    hangup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !app.log().contains("the API token file is empty") {
        assert!(std::time::Instant::now() < deadline, "{}", app.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, _) = app.call_with("GET", "/v1/tenants", None, Some("rotated-token-1"));
    assert_eq!(status, 200, "the token stays when the file is empty");
    assert!(
        !app.log().contains("rotated-token-1"),
        "the token is never logged"
    );
}

/// `--last-port` / `WGPLANE_LAST_PORT` ends the range tenants' ports come
/// from (the ports a container publishes): past it a new tenant is refused with
/// a 409 that names the range, and one that asks for its port may lie outside.
#[test]
fn tenant_ports_end_at_the_last_port() {
    let first = support::free_udp_ports(4);
    let last = (first + 1).to_string();
    let state = tempfile::tempdir().expect("tempdir");
    let app = Appliance::start_with(
        state,
        support::free_tcp_port(),
        first,
        &[("WGPLANE_LAST_PORT", &last)],
    )
    .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
    app.expect("PUT", "/v1/tenants/t1", None, 201);
    app.expect("PUT", "/v1/tenants/t2", None, 201);
    let (status, v) = app.call("PUT", "/v1/tenants/t3", None);
    assert_eq!((status, error_of(&v)), (409, ("exhausted", None)), "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{first}-{last}")), "{message}");
    app.expect("GET", "/v1/tenants/t3", None, 404);
    let outside = first + 3;
    let v = app.expect(
        "PUT",
        "/v1/tenants/t3",
        Some(&format!(r#"{{"listen_port":{outside}}}"#)),
        201,
    );
    assert_eq!(v["listen_port"], outside, "{v}");
}

/// A port the appliance would allocate but another program holds is stepped
/// over (it used to answer 409 to every new tenant until that program let go);
/// a port the caller asks for is not, and its refusal names the field.
#[test]
fn allocated_ports_that_other_programs_hold_are_stepped_over() {
    let app = Appliance::start();
    let held = |port: u16| std::net::UdpSocket::bind(("127.0.0.1", port)).expect("hold port");
    let _first = held(app.first_port);
    let _second = held(app.first_port + 1);
    let v = app.expect("PUT", "/v1/tenants/t1", None, 201);
    assert_eq!(v["listen_port"], app.first_port + 2, "{v}");
    // A router's PUT creates its tenant the same way.
    let v = app.expect("PUT", "/v1/tenants/t2/routers/r1", None, 201);
    assert_eq!(v["vpn_ip"], "10.101.1.1", "{v}");
    let v = app.expect("GET", "/v1/tenants/t2", None, 200);
    assert_eq!(v["listen_port"], app.first_port + 3, "{v}");

    let port = app.first_port;
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/t3",
        Some(&format!(r#"{{"listen_port":{port}}}"#)),
    );
    assert_eq!(
        (status, error_of(&v)),
        (409, ("port_unavailable", Some("listen_port"))),
        "{v}"
    );
    app.expect("GET", "/v1/tenants/t3", None, 404);
}
