//! The admin HTTP API (axum): the contract of `shared/API.md`.
//!
//! Handlers parse ids and bodies at the edge, call the registry under one lock, then
//! push the result to the running tunnels. They never touch packets. Errors are JSON
//! `{"error": {"code", "message", "field"}}` with 4xx for every bad input.

mod auth;
pub use auth::Token;
mod body;
mod detach;
mod error;
mod events;
mod handlers;
mod metrics;
pub use metrics::accepts_gzip;
mod params;
pub mod server;
pub mod supervisor;
pub mod views;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;

use crate::control::Registry;
use crate::io::Runtime;
use crate::store::Store;

pub use body::decode_json;
pub use error::ApiError;
pub use handlers::RouteQuery;
pub use params::decode_query;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The registry and the running tunnels, changed together under one lock so that
/// the data plane always follows the registry in the same order.
pub struct Control {
    pub registry: Registry,
    pub runtime: Runtime,
    /// SQLite connections are not `Sync`; the mutex is never contended (it is only
    /// reached through `&mut Control`, via `get_mut`) and only makes `Control` `Sync`.
    pub store: std::sync::Mutex<Store>,
}

impl Control {
    /// Stores the port each forward listening on `:0` was given when it was
    /// opened (at start-up, or later by the supervisor), so that it keeps it
    /// across restarts, as a forward opened through the API does. A store that
    /// refuses is logged: the forward runs, and is recorded at the next try.
    pub fn record_bound_forwards(&mut self) {
        let mut bound = Vec::new();
        for tenant in self.registry.tenants() {
            for router in tenant.routers.values() {
                for (port, _) in router.forwards.iter().filter(|(_, l)| l.port() == 0) {
                    if let Some(open) = self.runtime.forward_listen(&tenant.id, &router.id, *port) {
                        bound.push((tenant.id.clone(), router.id.clone(), *port, open));
                    }
                }
            }
        }
        if bound.is_empty() {
            return;
        }
        // One transaction (one fsync) for all of them.
        let changes: Vec<_> = bound
            .iter()
            .map(|(t, r, port, listen)| crate::store::Change::Forward(t, r, *port, *listen))
            .collect();
        let Ok(store) = self.store.get_mut() else {
            return;
        };
        match blocking(|| store.apply(&changes)) {
            Ok(()) => {
                for (t, r, port, listen) in &bound {
                    let _ = self.registry.put_forward(t, r, *port, *listen);
                }
            }
            Err(e) => tracing::warn!(forwards = bound.len(), error = %e,
                "the ports forwards were given could not be stored; tried again later"),
        }
    }
}

/// Shared state of every handler.
pub struct AppState {
    pub control: Mutex<Control>,
    pub token: auth::Token,
    /// `/metrics` needs the token too (`api.metrics_need_token`).
    pub metrics_need_token: bool,
    /// `/metrics` has the per-peer `wireguard_*` series (`api.metrics_per_peer`).
    pub metrics_per_peer: bool,
    pub public_host: String,
    /// Named peer events, for SSE subscribers.
    pub events: tokio::sync::broadcast::Sender<crate::io::events::Published>,
    /// Counters of the event path.
    pub event_stats: Arc<crate::io::events::EventStats>,
    /// API requests by route and status.
    pub api_requests: metrics::ApiCounters,
    /// `/metrics` scrapes, one at a time.
    pub scraping: metrics::OneScrape,
    /// `/healthz`'s last answer and when it was made, given again while the
    /// control lock is held long.
    pub last_health:
        std::sync::Mutex<Option<(tokio::time::Instant, axum::http::StatusCode, String)>>,
    /// Turns true when the appliance shuts down: event streams end, so that
    /// their connections close instead of holding the shutdown up.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// When the appliance started: `wgplane_start_time_seconds`, which tells
    /// a restart of the process from one of a tunnel.
    pub started: std::time::SystemTime,
}

impl crate::io::events::Directory for Arc<AppState> {
    async fn resolve(&self, tenant: &str, key: &[u8; 32]) -> Option<(&'static str, String)> {
        let id = crate::control::Id::parse(tenant, "tenant_id").ok()?;
        use crate::control::registry::PeerWithKey;
        let control = self.control.lock().await;
        match control.registry.peer_with_key(&id, key)? {
            PeerWithKey::Router(r) => Some(("router", r.id.to_string())),
            PeerWithKey::Client(c) => Some(("client", c.id.to_string())),
        }
    }

    async fn routers_heard_at(
        &self,
        heard: Vec<crate::io::events::Heard>,
    ) -> Result<(), crate::io::events::NotStored> {
        keep_router_endpoints(&mut *self.control.lock().await, heard)
    }

    /// One tunnel per turn of the lock, as a scrape does: a change waits for
    /// one tunnel's snapshot at most, not for every tunnel's (the hub runs this
    /// after it lagged, when tunnels are busy). Endpoints of peers removed
    /// meanwhile are dropped by `keep_router_endpoints`, which looks each key up.
    async fn reconcile_router_endpoints(
        &self,
    ) -> (
        crate::io::events::Seen,
        Result<(), crate::io::events::NotStored>,
    ) {
        let ids: Vec<crate::control::Id> = {
            let control = self.control.lock().await;
            control.registry.tenants().map(|t| t.id.clone()).collect()
        };
        let mut heard = Vec::new();
        let mut seen = crate::io::events::Seen {
            registered: ids.iter().map(|id| Arc::from(id.as_str())).collect(),
            ..Default::default()
        };
        for id in ids {
            let snapshot = self.control.lock().await.runtime.snapshot(&id).await;
            let Ok(snapshot) = snapshot else {
                continue;
            };
            let name: Arc<str> = Arc::from(id.as_str());
            seen.tenants.insert(Arc::clone(&name));
            for p in snapshot.peers.iter().filter(|p| p.connected) {
                seen.connected.insert((Arc::clone(&name), p.public_key));
            }
            heard.extend(snapshot.peers.iter().filter_map(|p| {
                Some(crate::io::events::Heard {
                    tenant: Arc::clone(&name),
                    key: p.public_key,
                    endpoint: p.endpoint?,
                })
            }));
        }
        let stored = keep_router_endpoints(&mut *self.control.lock().await, heard);
        (seen, stored)
    }
}

/// Stores and records the last endpoint of each router in `heard` (oldest
/// first), in one transaction, where it differs from the registry's; peers
/// that are not routers (any more) are skipped. Err when the store refused
/// them (logged here); the registry then keeps what it had.
fn keep_router_endpoints(
    control: &mut Control,
    heard: Vec<crate::io::events::Heard>,
) -> Result<(), crate::io::events::NotStored> {
    use crate::control::{Id, Router};
    let mut last: std::collections::BTreeMap<(Id, Id), Router> = Default::default();
    for h in heard {
        let Ok(tenant) = Id::parse(&h.tenant, "tenant_id") else {
            continue;
        };
        let Some(router) = control.registry.router_with_key(&tenant, &h.key) else {
            continue;
        };
        let id = router.id.clone();
        last.entry((tenant, id))
            .or_insert_with(|| router.clone())
            .endpoint = Some(h.endpoint);
    }
    let registry = &control.registry;
    last.retain(|(tenant, id), r| {
        let now = registry.tenant(tenant).ok().and_then(|t| t.routers.get(id));
        now.is_some_and(|now| now.endpoint != r.endpoint)
    });
    if last.is_empty() {
        return Ok(());
    }
    let changes: Vec<_> = last
        .iter()
        .map(|((tenant, _), r)| crate::store::Change::Router(tenant, r))
        .collect();
    match handlers::commit(&mut control.store, &changes) {
        Ok(()) => {
            for ((tenant, id), r) in &last {
                if let Some(endpoint) = r.endpoint {
                    let _ = control.registry.set_router_endpoint(tenant, id, endpoint);
                }
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(
                routers = last.len(),
                error = %e,
                retry_secs = crate::io::events::STORE_RETRY.as_secs(),
                "router endpoints not stored"
            );
            Err(crate::io::events::NotStored)
        }
    }
}

/// The full router: `/v1` behind the token, `/healthz` open, `/metrics` open unless
/// the config puts it behind the token. The
/// OpenAPI document is collected from the same handler annotations that register
/// the routes, so the two cannot drift apart.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, api) = routes(Arc::clone(&state));
    let api = Arc::new(api);
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let api = Arc::clone(&api);
                async move { axum::Json(api.as_ref().clone()) }
            })
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state),
                auth::require_token,
            ))
            .route_layer(axum::middleware::from_fn(metrics::tag_route)),
        )
        // Outside everything: every request is counted, routed or not, and
        // no answer is kept by a cache on the way.
        .layer(axum::middleware::map_response(no_store))
        .layer(axum::middleware::from_fn_with_state(
            state,
            metrics::count_requests,
        ))
}

fn routes(state: Arc<AppState>) -> (Router, utoipa::openapi::OpenApi) {
    use handlers::*;
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let v1 = OpenApiRouter::new()
        .routes(routes!(list_tenants))
        .routes(routes!(get_tenant, put_tenant, delete_tenant))
        .routes(routes!(list_routers))
        .routes(routes!(get_router, put_router, delete_router))
        .routes(routes!(new_router_key))
        .routes(routes!(get_router_script))
        .routes(routes!(list_forwards))
        .routes(routes!(put_forward, delete_forward))
        .routes(routes!(get_egress, put_egress, delete_egress))
        .routes(routes!(list_clients))
        .routes(routes!(get_client, put_client, delete_client))
        .routes(routes!(new_client_key))
        .routes(routes!(get_client_config))
        .routes(routes!(get_client_qr))
        .routes(routes!(explain_route))
        .routes(routes!(list_strangers))
        .routes(routes!(events::stream))
        .layer(axum::middleware::from_fn(detach::run_to_completion))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_token,
        ));
    let (router, mut api) = OpenApiRouter::new()
        .nest("/v1", v1)
        .routes(routes!(healthz))
        .routes(routes!(livez))
        .routes(routes!(metrics::scrape))
        .route_layer(axum::middleware::from_fn(metrics::tag_route))
        .split_for_parts();
    describe(&mut api);
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(body::read_first))
        .with_state(state);
    (router, api)
}

/// No cache on the way may keep what the API answers: router scripts, client
/// configs and QR codes carry private keys, and the rest is live state.
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Runs blocking work (an SQLite commit with its fsync) without stalling the
/// other tasks of this worker, on a multi-threaded runtime; a current-thread
/// one (tests) has no other worker to hand them to.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Title, version and the bearer scheme that every `/v1` operation needs.
fn describe(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    api.info.title = "wgplane admin API".into();
    api.info.version = "1".into();
    api.info.description = Some(
        "Tenant tunnels, routers, KTN egress policies and clients of a wgplane appliance.".into(),
    );
    api.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    api.security = Some(vec![SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
}

#[cfg(test)]
pub(crate) mod testing {
    //! One tenant (`acme`) with one router (`gw`) whose key the test holds,
    //! stored, with its tunnel running on loopback, behind an [`AppState`].

    use super::*;
    use crate::control::model::{RouterRequest, TenantRequest};
    use crate::control::registry::AllocPolicy;
    use crate::control::Id;
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    pub struct Fixture {
        pub state: Arc<AppState>,
        pub acme: Id,
        pub gw: Id,
        router_secret: StaticSecret,
        server: std::net::SocketAddr,
        server_key: PublicKey,
        _dir: tempfile::TempDir,
    }

    pub async fn fixture() -> Fixture {
        // The port is free when probed; another test may take it before the
        // tunnel binds it: then the next one.
        for _ in 0..20 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .unwrap()
                .port();
            if let Some(fixture) = fixture_on(port).await {
                return fixture;
            }
        }
        panic!("no free port for the fixture's tunnel");
    }

    /// The fixture with its tunnel on `port`; `None` when the port is taken.
    async fn fixture_on(port: u16) -> Option<Fixture> {
        let mut registry = Registry::new(
            AllocPolicy {
                first_port: port,
                ..AllocPolicy::default()
            },
            5,
        );
        let acme = Id::parse("acme", "id").unwrap();
        let gw = Id::parse("gw", "id").unwrap();
        registry
            .put_tenant(
                &acme,
                &TenantRequest::default(),
                std::time::SystemTime::now(),
            )
            .unwrap();
        let router_secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let req = RouterRequest {
            public_key: Some(crate::keys::encode(
                PublicKey::from(&router_secret).as_bytes(),
            )),
            ..Default::default()
        };
        registry.put_router(&acme, &gw, &req).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(
            &dir.path().join("state.db"),
            crate::store::MasterKey::generate(),
        )
        .unwrap();
        let tenant = registry.tenant(&acme).unwrap().clone();
        let router = &tenant.routers[&gw];
        store
            .apply(&[
                crate::store::Change::Tenant(&tenant),
                crate::store::Change::Router(&acme, router),
            ])
            .unwrap();
        let mut runtime = Runtime::new(crate::io::RuntimeSettings::loopback());
        match runtime.bring_up(&tenant).await {
            Ok(()) => {}
            Err(crate::io::RuntimeError::Bind { .. }) => return None,
            Err(e) => panic!("{e}"),
        }
        let state = Arc::new(AppState {
            control: Mutex::new(Control {
                registry,
                runtime,
                store: std::sync::Mutex::new(store),
            }),
            token: auth::Token::new(String::new()),
            metrics_need_token: false,
            metrics_per_peer: true,
            public_host: "127.0.0.1".into(),
            events: tokio::sync::broadcast::channel(8).0,
            event_stats: Arc::default(),
            api_requests: Default::default(),
            scraping: Default::default(),
            last_health: Default::default(),
            stopping: tokio::sync::watch::channel(false).1,
            started: std::time::SystemTime::now(),
        });
        Some(Fixture {
            state,
            acme,
            gw,
            router_secret,
            server: std::net::SocketAddr::from(([127, 0, 0, 1], tenant.listen_port)),
            server_key: tenant.public_key,
            _dir: dir,
        })
    }

    impl Fixture {
        /// The router handshakes with the tunnel from a fresh socket, whose
        /// address it returns once the tunnel counts it connected; panics when
        /// the tunnel does not answer within 5 s.
        pub async fn router_handshakes(&self) -> std::net::SocketAddr {
            let (secret, server_key, server) =
                (self.router_secret.clone(), self.server_key, self.server);
            let heard_at = tokio::task::spawn_blocking(move || {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                socket
                    .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let mut tunn = Tunn::new(secret, server_key, None, None, 1, None);
                let mut buf = vec![0u8; 2048];
                if let TunnResult::WriteToNetwork(init) =
                    tunn.format_handshake_initiation(&mut buf, true)
                {
                    socket.send_to(init, server).unwrap();
                }
                let mut datagram = vec![0u8; 2048];
                let (n, _) = socket
                    .recv_from(&mut datagram)
                    .expect("a handshake response");
                // The response completes the handshake; boringtun answers with a
                // keepalive, which confirms the session on the appliance's side.
                if let TunnResult::WriteToNetwork(keepalive) =
                    tunn.decapsulate(None, &datagram[..n], &mut buf)
                {
                    socket.send_to(keepalive, server).unwrap();
                }
                socket.local_addr().unwrap()
            })
            .await
            .unwrap();
            // The keepalive may still be on its way: wait until the tunnel has
            // taken it, so that the router counts as connected (and was
            // announced so) when this returns.
            let key = *PublicKey::from(&self.router_secret).as_bytes();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let status = self
                    .state
                    .control
                    .lock()
                    .await
                    .runtime
                    .peer_status(&self.acme, key)
                    .await;
                if matches!(status, Ok(Some(s)) if s.connected) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the router never counted as connected"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            heard_at
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::io::events::Directory;

    /// When the event hub has lost events, every router's endpoint is taken
    /// from the running tunnel, stored, and recorded in the registry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_events_are_made_up_from_the_running_tunnels() {
        let f = super::testing::fixture().await;
        // The router handshakes; no event hub runs.
        let heard_at = f.router_handshakes().await;
        let state = &f.state;
        let (acme, gw) = (&f.acme, &f.gw);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (seen, stored) = state.reconcile_router_endpoints().await;
            stored.expect("stored");
            assert!(
                seen.tenants.contains(acme.as_str()),
                "acme's tunnel answered"
            );
            let control = state.control.lock().await;
            let router = &control.registry.tenant(acme).unwrap().routers[gw];
            let endpoint = router.endpoint;
            let connected = seen.connected.contains(&(
                std::sync::Arc::from(acme.as_str()),
                *router.public_key.as_bytes(),
            ));
            if endpoint == Some(heard_at) && connected {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{endpoint:?}");
            drop(control);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut control = state.control.lock().await;
        let loaded = control.store.get_mut().unwrap().load().unwrap();
        assert_eq!(loaded[0].routers[gw].endpoint, Some(heard_at), "stored");
        control.runtime.stop(acme).await;
    }
}
