//! Hostile input to every route of the OpenAPI document: each gets a 4xx with a
//! JSON error, nothing panics, and the state is exactly as before.

mod support;

use serde_json::Value;
use support::Appliance;

/// Everything the API shows, minus counters that move on their own.
fn dump(app: &Appliance) -> Value {
    let mut tenants = app.expect("GET", "/v1/tenants", None, 200);
    for t in tenants.as_array_mut().unwrap() {
        let id = t["tenant_id"].as_str().unwrap().to_owned();
        t["routers_list"] = app.expect("GET", &format!("/v1/tenants/{id}/routers"), None, 200);
        t["clients_list"] = app.expect("GET", &format!("/v1/tenants/{id}/clients"), None, 200);
        t["egress"] = app.call("GET", &format!("/v1/tenants/{id}/egress"), None).1;
    }
    tenants
}

/// Bodies that are invalid for every PUT route.
fn hostile_bodies() -> Vec<String> {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    vec![
        "{".into(),
        "null".into(),
        "[]".into(),
        "\"just a string\"".into(),
        "12345678901234567890".into(),
        r#"{"name": 5, "listen_port": -1, "pool": 7}"#.into(),
        r#"{"listen_port": 70000, "name": [1], "pool": {}}"#.into(),
        r#"{"public_key": "AAAA", "subnet": "999.1.1.1/8", "pool": "10.0.0.0/99", "gateways": "gw"}"#.into(),
        r#"{"name": "a\u0000b", "subnet": "::/0", "pool": "x", "gateways": []}"#.into(),
        r#"{"vpn_ip": "10.100.0.1", "listen_port": 0, "pool": "0.0.0.0/0", "gateways": ["gw"]}"#.into(),
        r#"{"allowed_ips": ["0.0.0.0/0"], "subnet": "10.100.0.0/33", "pool": "10.100.0.0/24", "gateways": ["gw"]}"#.into(),
        format!(r#"{{"name": "{}", "subnet": 1, "pool": "10.250.0.0/24", "gateways": ["gw", "gw"]}}"#, "x".repeat(60_000)),
        format!(r#"{{"dns": [{}], "listen_port": "a", "gateways": 1}}"#, vec!["\"1.1.1.1\""; 5_000].join(",")),
        r#"{"unknown": true}"#.into(),
        deep,
        "x".repeat(70_000),
        "\u{feff}{\"name\":\"bom\"}".into(),
        r#"{"name":"ok"} trailing"#.into(),
    ]
}

#[test]
fn hostile_input_gets_4xx_and_changes_nothing() {
    let app = Appliance::start();
    let (_, gw) = support::keypair();
    app.put_gateway("t1", &gw);
    app.expect("PUT", "/v1/tenants/t1/clients/c1", None, 201);
    let before = dump(&app);

    let doc = app.expect("GET", "/v1/openapi.json", None, 200);
    let mut tried = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if path == "/v1/events" || !path.starts_with("/v1/") {
            continue;
        }
        for method in item.as_object().unwrap().keys() {
            // Existing and new objects, and ids that are not ids.
            let ids = [
                "t1",
                "new-one",
                "bad id",
                "..",
                &"x".repeat(65),
                "%00",
                "%2F",
            ];
            for id in ids {
                let concrete = path
                    .replace(
                        "{tenant_id}",
                        if path.contains("{router_id}") || path.contains("{client_id}") {
                            "t1"
                        } else {
                            id
                        },
                    )
                    .replace("{router_id}", if id == "t1" { "gw" } else { id })
                    .replace("{client_id}", if id == "t1" { "c1" } else { id })
                    .replace("{port}", if id == "t1" { "8728" } else { id });
                let bodies = if method == "put" {
                    hostile_bodies()
                } else {
                    vec![]
                };
                for body in bodies.iter().map(Some).chain(std::iter::once(None)) {
                    if method == "put" && body.is_none() {
                        continue; // an empty PUT body is a valid request
                    }
                    if method == "delete"
                        && ["t1", "gw", "c1"].iter().any(|x| concrete.ends_with(x))
                    {
                        continue; // deleting existing objects is not hostile
                    }
                    if method == "post"
                        && ["/gw/key", "/c1/key"].iter().any(|x| concrete.ends_with(x))
                    {
                        continue; // nor is a new key for one
                    }
                    let (status, v) =
                        app.call(&method.to_uppercase(), &concrete, body.map(String::as_str));
                    tried += 1;
                    if method == "get" && status == 200 {
                        continue; // reading existing objects is fine
                    }
                    assert!(
                        (400..500).contains(&status),
                        "{method} {concrete} {:?} -> {status} {v}",
                        body.map(|b| &b[..b.len().min(80)])
                    );
                    if status != 413 || v.is_object() {
                        assert!(v["error"]["code"].is_string(), "{method} {concrete} -> {v}");
                    }
                }
            }
        }
    }
    assert!(tried > 300, "{tried} requests");
    // Bad query strings for the explain endpoint.
    for q in [
        "",
        "?src=",
        "?src=1.1.1.1&dst=zzz",
        "?src=%ff&dst=1.1.1.1",
        "?dst=1.1.1.1&src=1.1.1.1.1",
    ] {
        let (status, v) = app.call("GET", &format!("/v1/tenants/t1/route{q}"), None);
        assert_eq!(status, 400, "{q}: {v}");
    }
    assert_eq!(dump(&app), before, "state changed under hostile input");
    assert!(app.expect("GET", "/healthz", None, 200).is_string());
}
