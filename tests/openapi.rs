//! The OpenAPI document at `/v1/openapi.json` lists exactly the routes the server
//! serves, and every documented operation is routed (never a 404 `not_found` or a
//! 405 from the router itself).

mod support;

use std::collections::BTreeSet;

use support::Appliance;

/// The contract of shared/API.md plus the additions (script, QR, events, docs).
const EXPECTED: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/livez"),
    ("get", "/metrics"),
    ("get", "/v1/tenants"),
    ("get", "/v1/tenants/{tenant_id}"),
    ("put", "/v1/tenants/{tenant_id}"),
    ("delete", "/v1/tenants/{tenant_id}"),
    ("get", "/v1/tenants/{tenant_id}/routers"),
    ("get", "/v1/tenants/{tenant_id}/routers/{router_id}"),
    ("put", "/v1/tenants/{tenant_id}/routers/{router_id}"),
    ("delete", "/v1/tenants/{tenant_id}/routers/{router_id}"),
    ("get", "/v1/tenants/{tenant_id}/routers/{router_id}/script"),
    (
        "get",
        "/v1/tenants/{tenant_id}/routers/{router_id}/forwards",
    ),
    (
        "put",
        "/v1/tenants/{tenant_id}/routers/{router_id}/forwards/{port}",
    ),
    (
        "delete",
        "/v1/tenants/{tenant_id}/routers/{router_id}/forwards/{port}",
    ),
    ("get", "/v1/tenants/{tenant_id}/egress"),
    ("put", "/v1/tenants/{tenant_id}/egress"),
    ("delete", "/v1/tenants/{tenant_id}/egress"),
    ("get", "/v1/tenants/{tenant_id}/clients"),
    ("get", "/v1/tenants/{tenant_id}/clients/{client_id}"),
    ("put", "/v1/tenants/{tenant_id}/clients/{client_id}"),
    ("delete", "/v1/tenants/{tenant_id}/clients/{client_id}"),
    ("post", "/v1/tenants/{tenant_id}/clients/{client_id}/key"),
    ("post", "/v1/tenants/{tenant_id}/routers/{router_id}/key"),
    ("get", "/v1/tenants/{tenant_id}/clients/{client_id}/config"),
    (
        "get",
        "/v1/tenants/{tenant_id}/clients/{client_id}/config.png",
    ),
    ("get", "/v1/tenants/{tenant_id}/route"),
    ("get", "/v1/tenants/{tenant_id}/strangers"),
    ("get", "/v1/events"),
];

#[test]
fn document_matches_the_routes() {
    let app = Appliance::start();
    let (status, _) = app.call_with("GET", "/v1/openapi.json", None, None);
    assert_eq!(
        status, 401,
        "the document is behind the token like all of /v1"
    );
    let doc = app.expect("GET", "/v1/openapi.json", None, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "delete", "post", "patch"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = EXPECTED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Every change may be refused before it starts (`busy`, the cap on changes
    // under way) besides failing to be stored, and says so; `/healthz` names its
    // busy answer too.
    for (method, path) in &documented {
        if method == "get" && path != "/healthz" && path != "/livez" {
            continue;
        }
        let unavailable = doc["paths"][path][method]["responses"]["503"]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} documents no 503"));
        assert!(
            unavailable.contains("busy"),
            "{method} {path}: {unavailable}"
        );
        if method != "get" {
            assert!(
                unavailable.contains("storage_failed"),
                "{method} {path}: {unavailable}"
            );
        }
    }
    // The reads that ask the running tunnel say what a tunnel that is down
    // answers.
    for path in [
        "/v1/tenants/{tenant_id}/route",
        "/v1/tenants/{tenant_id}/strangers",
    ] {
        let down = doc["paths"][path]["get"]["responses"]["503"]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("get {path} documents no 503"));
        assert!(down.contains("tunnel_down"), "get {path}: {down}");
    }

    // Every documented operation reaches a handler: nothing is 405, and a 404 is
    // about a missing object, never the router's own `not_found`.
    for (method, path) in &documented {
        if path == "/v1/events" {
            continue; // a stream; covered by tests/events.rs
        }
        let concrete = path
            .replace("{tenant_id}", "nobody")
            .replace("{router_id}", "r")
            .replace("{client_id}", "c")
            .replace("{port}", "8728");
        let (status, body) = app.call(&method.to_uppercase(), &concrete, None);
        assert_ne!(status, 405, "{method} {path}");
        if status == 404 {
            assert_ne!(
                body["error"]["code"], "not_found",
                "{method} {path} is not routed"
            );
        }
    }
    // And an undocumented path is the router's 404.
    let (status, body) = app.call("GET", "/v1/tenants/x/unknown", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}
