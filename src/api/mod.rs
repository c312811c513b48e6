//! The admin HTTP API (axum): the contract of `shared/API.md`.
//!
//! Handlers parse ids and bodies at the edge, call the registry under one lock, then
//! push the result to the running tunnels. They never touch packets. Errors are JSON
//! `{"error": {"code", "message", "field"}}` with 4xx for every bad input.

mod auth;
mod body;
mod error;
mod events;
mod handlers;
mod metrics;
mod views;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;

use crate::control::Registry;
use crate::io::Runtime;
use crate::store::Store;

pub use error::ApiError;

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

/// Shared state of every handler.
pub struct AppState {
    pub control: Mutex<Control>,
    pub token: String,
    pub public_host: String,
    /// Named peer events, for SSE subscribers.
    pub events: tokio::sync::broadcast::Sender<crate::io::events::PeerEvent>,
    /// Counters of the event path.
    pub event_stats: Arc<crate::io::events::EventStats>,
    /// API requests by route and status.
    pub api_requests: metrics::ApiCounters,
}

impl crate::io::events::Resolve for Arc<AppState> {
    async fn resolve(&self, tenant: &str, key: &[u8; 32]) -> Option<(&'static str, String)> {
        let id = crate::control::Id::parse(tenant, "tenant_id").ok()?;
        let control = self.control.lock().await;
        let t = control.registry.tenant(&id).ok()?;
        if let Some(r) = t.routers.values().find(|r| r.public_key.as_bytes() == key) {
            return Some(("router", r.id.to_string()));
        }
        t.clients
            .values()
            .find(|c| c.public_key.as_bytes() == key)
            .map(|c| ("client", c.id.to_string()))
    }
}

/// The full router: `/v1` behind the token, `/healthz` open.
pub fn router(state: Arc<AppState>) -> Router {
    use handlers::*;
    let v1 = Router::new()
        .route("/tenants", get(list_tenants))
        .route(
            "/tenants/{tenant_id}",
            get(get_tenant).put(put_tenant).delete(delete_tenant),
        )
        .route("/tenants/{tenant_id}/routers", get(list_routers))
        .route(
            "/tenants/{tenant_id}/routers/{router_id}",
            get(get_router).put(put_router).delete(delete_router),
        )
        .route(
            "/tenants/{tenant_id}/routers/{router_id}/script",
            get(get_router_script),
        )
        .route(
            "/tenants/{tenant_id}/egress",
            get(get_egress).put(put_egress).delete(delete_egress),
        )
        .route("/tenants/{tenant_id}/clients", get(list_clients))
        .route(
            "/tenants/{tenant_id}/clients/{client_id}",
            get(get_client).put(put_client).delete(delete_client),
        )
        .route(
            "/tenants/{tenant_id}/clients/{client_id}/config",
            get(get_client_config),
        )
        .route(
            "/tenants/{tenant_id}/clients/{client_id}/config.png",
            get(get_client_qr),
        )
        .route("/tenants/{tenant_id}/route", get(explain_route))
        .route("/events", get(events::stream))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_token,
        ));
    let count = axum::middleware::from_fn_with_state(Arc::clone(&state), metrics::count_requests);
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::scrape))
        .route_layer(count)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}
