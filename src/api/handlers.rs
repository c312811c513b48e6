//! Route handlers. Each one: parse ids, lock, change the registry, apply to the
//! running tunnel, answer.

use std::net::{IpAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::body::JsonBody;
use super::params::{Path, Query};
use super::views::{
    ClientView, EgressView, ErrorBody, ForwardView, PeerRef, RouteView, RouterView, Statuses,
    TenantView,
};
use super::{ApiError, AppState, Control};
use crate::control::model::{
    ClientRequest, EgressRequest, ForwardRequest, RouterRequest, TenantRequest,
};
use crate::control::registry::Put;
use crate::control::{render, Client, Id, Router, Tenant};
use crate::core::engine::ExplainVerdict;
use crate::core::policy::Rule;
use crate::store::Change;
use boringtun::x25519::PublicKey;

type Shared = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

fn tenant_id(text: &str) -> Result<Id, ApiError> {
    Ok(Id::parse(text, "tenant_id")?)
}

fn status_of(put: Put) -> StatusCode {
    match put {
        Put::Created => StatusCode::CREATED,
        Put::Updated => StatusCode::OK,
    }
}

async fn statuses(control: &Control, id: &Id) -> Statuses {
    match control.runtime.snapshot(id).await {
        Ok(snapshot) => snapshot
            .peers
            .into_iter()
            .map(|p| (p.public_key, p))
            .collect(),
        Err(_) => Statuses::new(),
    }
}

/// One peer's status, as a one-entry [`Statuses`] for the views.
async fn peer_status(control: &Control, id: &Id, key: &PublicKey) -> Statuses {
    match control.runtime.peer_status(id, *key.as_bytes()).await {
        Ok(Some(status)) => Statuses::from([(status.public_key, status)]),
        _ => Statuses::new(),
    }
}

fn tenant_view(state: &AppState, control: &Control, t: &Tenant) -> TenantView {
    TenantView::new(t, &state.public_host, control.runtime.is_running(&t.id))
}

/// Creates the tenant in the registry and binds its port, if it does not exist yet.
/// Nothing is stored: the caller persists the tenant together with its own change.
async fn ensure_tenant(
    control: &mut Control,
    id: &Id,
    req: &TenantRequest,
) -> Result<Put, ApiError> {
    let put = control.registry.put_tenant(id, req, SystemTime::now())?;
    if put == Put::Created {
        let started = match control.registry.tenant(id) {
            Ok(t) => control.runtime.start(t).await,
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = started {
            // A tenant whose port cannot be bound does not exist.
            let _ = control.registry.delete_tenant(id);
            return Err(e.into());
        }
    }
    Ok(put)
}

/// What a change to a tenant puts back if it cannot be stored.
enum Before {
    /// The whole tenant (none: it did not exist; its tunnel is stopped).
    Tenant(Option<Tenant>),
    /// One router of an existing tenant (none: it did not exist). Saving one peer
    /// instead of the tenant keeps a peer change O(log n) in the tenant's size.
    Router { id: Id, before: Option<Router> },
    /// One client of an existing tenant, likewise.
    Client { id: Id, before: Option<Client> },
}

impl From<Option<Tenant>> for Before {
    fn from(before: Option<Tenant>) -> Self {
        Self::Tenant(before)
    }
}

/// Undoes a change to tenant `id`: the registry goes back to `before`, and a tunnel
/// started for a tenant that did not exist before is stopped.
async fn undo(control: &mut Control, id: &Id, before: impl Into<Before>) {
    match before.into() {
        Before::Tenant(before) => {
            if before.is_none() {
                control.runtime.stop(id).await;
            }
            control.registry.reinstate(id, before);
        }
        Before::Router { id: r, before } => control.registry.reinstate_router(id, &r, before),
        Before::Client { id: c, before } => control.registry.reinstate_client(id, &c, before),
    }
}

/// A failure of the running tunnels after the change was stored, said as such:
/// the change is not undone, and the tunnel takes it when it starts again.
fn stored_but(e: impl Into<ApiError>) -> ApiError {
    let mut e = e.into();
    e.message = format!(
        "the change is stored, but the running tunnel did not take it: {}",
        e.message
    );
    e
}

/// Writes `list` to the store in one transaction.
pub(super) fn commit(
    store: &mut std::sync::Mutex<crate::store::Store>,
    list: &[Change<'_>],
) -> Result<(), crate::store::StoreError> {
    match store.get_mut() {
        // SQLite commits with fsync: keep the other tasks of this worker moving.
        Ok(store) => tokio::task::block_in_place(|| store.apply(list)),
        Err(_) => Err(crate::store::StoreError::Poisoned),
    }
}

/// Makes the registry's change durable in one transaction (`$changes`, computed
/// from the registry as `$reg`); on failure undoes it and returns the error.
macro_rules! persist {
    ($control:ident, $id:expr, $before:expr, |$reg:ident| $changes:expr) => {{
        let result = {
            let Control {
                registry: $reg,
                store,
                ..
            } = &mut *$control;
            let $reg: &crate::control::Registry = $reg;
            let list: Vec<Change<'_>> = $changes;
            commit(store, &list)
        };
        if let Err(e) = result {
            undo(&mut $control, $id, $before).await;
            return Err(e.into());
        }
    }};
}

/// The changes that store tenant `id`'s own row, when it was just created.
fn tenant_row<'a>(
    registry: &'a crate::control::Registry,
    id: &Id,
    created: Put,
) -> Vec<Change<'a>> {
    match (created, registry.tenant(id)) {
        (Put::Created, Ok(t)) => vec![Change::Tenant(t)],
        _ => Vec::new(),
    }
}

/// Hands the tenant's stored state to its tunnel, starting the tunnel first if
/// it is down (its port was taken at start-up, say).
async fn sync(control: &mut Control, id: &Id) -> Result<(), ApiError> {
    let Control {
        registry, runtime, ..
    } = control;
    let tenant = registry.tenant(id)?;
    runtime.bring_up(tenant).await.map_err(|e| match e {
        // Its port is still taken (or its task ended again): down, not refused.
        crate::io::RuntimeError::Bind { .. } | crate::io::RuntimeError::TaskGone(_) => {
            ApiError::tunnel_down(&e)
        }
        e => e.into(),
    })
}

// ---- health ----

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, description = "Every tunnel is up", content_type = "text/plain", body = String), (status = 503, description = "A stored tunnel is down (its port taken, say; tried again every 5 s), or the TUN device's reader ended", content_type = "text/plain", body = String)))]
pub async fn healthz(State(state): Shared) -> Response {
    let control = state.control.lock().await;
    let (mut tunnels, mut down) = (0usize, 0usize);
    for t in control.registry.tenants() {
        tunnels += 1;
        down += usize::from(!control.runtime.is_running(&t.id));
    }
    if down > 0 {
        let body = format!("{down} of {tunnels} tunnels down\n");
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else if !control.runtime.host_reading() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the host device's reader is down\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

pub async fn not_found() -> ApiError {
    ApiError::no_route()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "method not allowed on this path".into(),
        field: None,
    }
}

// ---- tenants ----

#[utoipa::path(get, path = "/tenants", tag = "tenants", responses((status = 200, body = [TenantView]), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody)))]
pub async fn list_tenants(State(state): Shared) -> ApiResult {
    let control = state.control.lock().await;
    let list: Vec<TenantView> = control
        .registry
        .tenants()
        .map(|t| tenant_view(&state, &control, t))
        .collect();
    Ok(Json(list).into_response())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}", tag = "tenants", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 200, body = TenantView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_tenant(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let control = state.control.lock().await;
    let tenant = control.registry.tenant(&id)?;
    Ok(Json(tenant_view(&state, &control, tenant)).into_response())
}

#[utoipa::path(put, path = "/tenants/{tenant_id}", tag = "tenants", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), request_body(content = Option<TenantRequest>, description = "Optional: listen_port and subnet; omitted values are allocated"), responses((status = 201, description = "Created", body = TenantView), (status = 200, description = "Existed", body = TenantView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn put_tenant(
    State(state): Shared,
    Path(t): Path<String>,
    JsonBody(req): JsonBody<TenantRequest>,
) -> ApiResult {
    let id = tenant_id(&t)?;
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&id).ok().cloned();
    let put = ensure_tenant(&mut control, &id, &req).await?;
    // Always stored: an update may have changed the host prefixes.
    persist!(control, &id, before, |r| tenant_row(r, &id, Put::Created));
    sync(&mut control, &id).await.map_err(stored_but)?;
    let tenant = control.registry.tenant(&id)?;
    Ok((status_of(put), Json(tenant_view(&state, &control, tenant))).into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}", tag = "tenants", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 204, description = "Deleted; its port is closed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn delete_tenant(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let mut control = state.control.lock().await;
    let before = control.registry.delete_tenant(&id)?;
    let result = {
        let Control { store, .. } = &mut *control;
        match store.get_mut() {
            Ok(store) => tokio::task::block_in_place(|| store.apply(&[Change::DeleteTenant(&id)])),
            Err(_) => Err(crate::store::StoreError::Poisoned),
        }
    };
    if let Err(e) = result {
        control.registry.reinstate(&id, Some(before));
        return Err(e.into());
    }
    control.runtime.stop(&id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- routers ----

#[utoipa::path(get, path = "/tenants/{tenant_id}/routers", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 200, body = [RouterView]), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn list_routers(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let control = state.control.lock().await;
    let tenant = control.registry.tenant(&id)?;
    let st = statuses(&control, &id).await;
    let (now, wall) = (Instant::now(), SystemTime::now());
    let list: Vec<RouterView> = tenant
        .routers
        .values()
        .map(|r| RouterView::new(tenant, r, &st, now, wall))
        .collect();
    Ok(Json(list).into_response())
}

/// A tenant and one of its routers, or the 404 that names which is missing.
fn find_router<'a>(
    control: &'a Control,
    t: &Id,
    r: &Id,
) -> Result<(&'a Tenant, &'a crate::control::Router), ApiError> {
    let tenant = control.registry.tenant(t)?;
    let router = tenant
        .routers
        .get(r)
        .ok_or_else(|| crate::control::ControlError::NoRouter(r.to_string()))?;
    Ok((tenant, router))
}

async fn router_answer(control: &Control, t: &Id, r: &Id, status: StatusCode) -> ApiResult {
    let (tenant, router) = find_router(control, t, r)?;
    let st = peer_status(control, t, &router.public_key).await;
    let view = RouterView::new(tenant, router, &st, Instant::now(), SystemTime::now());
    Ok((status, Json(view)).into_response())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/routers/{router_id}", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 200, body = RouterView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_router(State(state): Shared, Path((t, r)): Path<(String, String)>) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let control = state.control.lock().await;
    router_answer(&control, &t, &r, StatusCode::OK).await
}

#[utoipa::path(put, path = "/tenants/{tenant_id}/routers/{router_id}", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), request_body = RouterRequest, responses((status = 201, description = "Created", body = RouterView), (status = 200, description = "Existed", body = RouterView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn put_router(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
    JsonBody(req): JsonBody<RouterRequest>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let mut control = state.control.lock().await;
    let before = match control.registry.tenant(&t) {
        Ok(tenant) => Before::Router {
            id: r.clone(),
            before: tenant.routers.get(&r).cloned(),
        },
        Err(_) => Before::Tenant(None),
    };
    let old_key = match &before {
        Before::Router {
            before: Some(old), ..
        } => Some(old.public_key),
        _ => None,
    };
    let created_tenant = ensure_tenant(&mut control, &t, &TenantRequest::default()).await?;
    let put = match control.registry.put_router(&t, &r, &req) {
        Ok(put) => put,
        Err(e) => {
            undo(&mut control, &t, before).await;
            return Err(e.into());
        }
    };
    persist!(control, &t, before, |reg| {
        let mut changes = tenant_row(reg, &t, created_tenant);
        if let Some(router) = reg.tenant(&t).ok().and_then(|x| x.routers.get(&r)) {
            changes.push(Change::Router(&t, router));
        }
        changes
    });
    let (tenant, router) = find_router(&control, &t, &r)?;
    if created_tenant == Put::Created
        || old_key.is_some_and(|k| k != router.public_key)
        || !control.runtime.is_running(&t)
    {
        // A new tunnel, a key that replaces another, or a tunnel that is down
        // (started now if its port is free): the whole peer set.
        sync(&mut control, &t).await.map_err(stored_but)?;
    } else {
        control
            .runtime
            .upsert_router(tenant, router)
            .await
            .map_err(stored_but)?;
    }
    apply_forwards(&mut control, &t, &r)
        .await
        .map_err(stored_but)?;
    router_answer(&control, &t, &r, status_of(put)).await
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/routers/{router_id}/script", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 200, description = "RouterOS v7 script", content_type = "text/plain", body = String), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_router_script(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let control = state.control.lock().await;
    let (tenant, router) = find_router(&control, &t, &r)?;
    let text = render::router_script(tenant, router, &state.public_host);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

fn port_param(text: &str) -> Result<u16, ApiError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_field("port", format!("{text:?} is not a port (1-65535)")))
}

/// Makes the running forwards of router `r` match the registry (targets follow the
/// router's address).
async fn apply_forwards(control: &mut Control, t: &Id, r: &Id) -> Result<(), ApiError> {
    let Some(router) = control
        .registry
        .tenant(t)
        .ok()
        .and_then(|x| x.routers.get(r))
    else {
        return Ok(());
    };
    let wanted: Vec<(u16, std::net::SocketAddr, SocketAddrV4)> = router
        .forwards
        .iter()
        .map(|(port, listen)| (*port, *listen, SocketAddrV4::new(router.vpn_ip, *port)))
        .collect();
    for (port, listen, target) in wanted {
        control
            .runtime
            .set_forward(t, r, port, listen, target)
            .await?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/routers/{router_id}/forwards", tag = "forwards", params(("tenant_id" = String, Path, description = "Tenant id"), ("router_id" = String, Path, description = "Router id")), responses((status = 200, body = [ForwardView]), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn list_forwards(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let control = state.control.lock().await;
    let (_, router) = find_router(&control, &t, &r)?;
    let list: Vec<ForwardView> = router
        .forwards
        .iter()
        .map(|(port, listen)| ForwardView::new(router, *port, *listen))
        .collect();
    Ok(Json(list).into_response())
}

#[utoipa::path(put, path = "/tenants/{tenant_id}/routers/{router_id}/forwards/{port}", tag = "forwards", params(("tenant_id" = String, Path, description = "Tenant id"), ("router_id" = String, Path, description = "Router id"), ("port" = u16, Path, description = "The router's TCP port inside the tunnel")), request_body(content = Option<ForwardRequest>, description = "listen: host address (default 127.0.0.1:0, any free port)"), responses((status = 201, description = "Created: the listener is open", body = ForwardView), (status = 200, description = "Existed", body = ForwardView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Listen address in use", body = ErrorBody)))]
pub async fn put_forward(
    State(state): Shared,
    Path((t, r, port)): Path<(String, String, String)>,
    JsonBody(req): JsonBody<ForwardRequest>,
) -> ApiResult {
    let (t, r, port) = (
        tenant_id(&t)?,
        Id::parse(&r, "router_id")?,
        port_param(&port)?,
    );
    let listen: std::net::SocketAddr = req
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:0")
        .parse()
        .map_err(|_| ApiError::bad_field("listen", "not an address:port"))?;
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&t).ok().cloned();
    let put = control.registry.put_forward(&t, &r, port, listen)?;
    let target = match find_router(&control, &t, &r) {
        Ok((_, router)) => SocketAddrV4::new(router.vpn_ip, port),
        Err(e) => {
            undo(&mut control, &t, before).await;
            return Err(e);
        }
    };
    let bound = match control
        .runtime
        .set_forward(&t, &r, port, listen, target)
        .await
    {
        Ok(bound) => bound,
        Err(e) => {
            undo(&mut control, &t, before).await;
            return Err(e.into());
        }
    };
    // What the runtime ran before, to go back to if the change cannot be stored.
    let previous = before
        .as_ref()
        .and_then(|tenant| tenant.routers.get(&r))
        .and_then(|router| router.forwards.get(&port).copied());
    // Store the port actually bound, so that a restart listens on the same one.
    let stored = match control.registry.put_forward(&t, &r, port, bound) {
        Ok(_) => commit(&mut control.store, &[Change::Forward(&t, &r, port, bound)])
            .map_err(ApiError::from),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = stored {
        // Back to what was: the registry, and the listener (the old one, or none).
        match previous {
            Some(old) => {
                let _ = control.runtime.set_forward(&t, &r, port, old, target).await;
            }
            None => {
                control.runtime.remove_forward(&t, &r, port).await;
            }
        }
        undo(&mut control, &t, before).await;
        return Err(e);
    }
    let (_, router) = find_router(&control, &t, &r)?;
    Ok((status_of(put), Json(ForwardView::new(router, port, bound))).into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}/routers/{router_id}/forwards/{port}", tag = "forwards", params(("tenant_id" = String, Path, description = "Tenant id"), ("router_id" = String, Path, description = "Router id"), ("port" = u16, Path, description = "The router's port")), responses((status = 204, description = "Deleted; the listener is closed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn delete_forward(
    State(state): Shared,
    Path((t, r, port)): Path<(String, String, String)>,
) -> ApiResult {
    let (t, r, port) = (
        tenant_id(&t)?,
        Id::parse(&r, "router_id")?,
        port_param(&port)?,
    );
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&t).ok().cloned();
    control.registry.delete_forward(&t, &r, port)?;
    persist!(control, &t, before, |_reg| vec![Change::DeleteForward(
        &t, &r, port
    )]);
    control.runtime.remove_forward(&t, &r, port).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}/routers/{router_id}", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn delete_router(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&t).ok().cloned();
    let removed = control.registry.delete_router(&t, &r)?;
    persist!(control, &t, before, |_reg| vec![Change::DeleteRouter(
        &t, &r
    )]);
    for port in removed.forwards.keys() {
        control.runtime.remove_forward(&t, &r, *port).await;
    }
    sync(&mut control, &t).await.map_err(stored_but)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- egress ----

#[utoipa::path(get, path = "/tenants/{tenant_id}/egress", tag = "egress", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 200, body = EgressView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_egress(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let control = state.control.lock().await;
    let tenant = control.registry.tenant(&id)?;
    match &tenant.egress {
        Some(e) => Ok(Json(EgressView::new(e)).into_response()),
        None => Err(no_egress()),
    }
}

fn no_egress() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "egress_not_found",
        message: "tenant has no egress policy".into(),
        field: None,
    }
}

#[utoipa::path(put, path = "/tenants/{tenant_id}/egress", tag = "egress", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), request_body = EgressRequest, responses((status = 201, description = "Created", body = EgressView), (status = 200, description = "Existed", body = EgressView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn put_egress(
    State(state): Shared,
    Path(t): Path<String>,
    JsonBody(req): JsonBody<EgressRequest>,
) -> ApiResult {
    let id = tenant_id(&t)?;
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&id).ok().cloned();
    let put = control.registry.put_egress(&id, &req)?;
    persist!(control, &id, before, |reg| {
        let policy = reg.tenant(&id).ok().and_then(|x| x.egress.as_ref());
        vec![Change::Egress(&id, policy)]
    });
    sync(&mut control, &id).await.map_err(stored_but)?;
    let tenant = control.registry.tenant(&id)?;
    let view = tenant.egress.as_ref().map(EgressView::new);
    Ok((status_of(put), Json(view)).into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}/egress", tag = "egress", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn delete_egress(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&id).ok().cloned();
    match control.registry.delete_egress(&id) {
        Err(crate::control::ControlError::NoEgress) => return Err(no_egress()),
        other => other?,
    }
    persist!(control, &id, before, |_reg| vec![Change::Egress(&id, None)]);
    sync(&mut control, &id).await.map_err(stored_but)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- clients ----

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 200, body = [ClientView]), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn list_clients(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let control = state.control.lock().await;
    let tenant = control.registry.tenant(&id)?;
    let st = statuses(&control, &id).await;
    let (now, wall) = (Instant::now(), SystemTime::now());
    let list: Vec<ClientView> = tenant
        .clients
        .values()
        .map(|c| ClientView::new(c, &st, now, wall))
        .collect();
    Ok(Json(list).into_response())
}

fn find_client<'a>(
    control: &'a Control,
    t: &Id,
    c: &Id,
) -> Result<(&'a Tenant, &'a crate::control::Client), ApiError> {
    let tenant = control.registry.tenant(t)?;
    let client = tenant
        .clients
        .get(c)
        .ok_or_else(|| crate::control::ControlError::NoClient(c.to_string()))?;
    Ok((tenant, client))
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients/{client_id}", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, body = ClientView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_client(State(state): Shared, Path((t, c)): Path<(String, String)>) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let control = state.control.lock().await;
    let (_, client) = find_client(&control, &t, &c)?;
    let st = statuses(&control, &t).await;
    Ok(Json(ClientView::new(
        client,
        &st,
        Instant::now(),
        SystemTime::now(),
    ))
    .into_response())
}

#[utoipa::path(put, path = "/tenants/{tenant_id}/clients/{client_id}", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), request_body = ClientRequest, responses((status = 201, description = "Created; includes config", body = ClientView), (status = 200, description = "Existed; includes config", body = ClientView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn put_client(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
    JsonBody(req): JsonBody<ClientRequest>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let mut control = state.control.lock().await;
    let previous = control.registry.tenant(&t)?.clients.get(&c).cloned();
    let old_key = previous.as_ref().map(|old| old.public_key);
    let before = Before::Client {
        id: c.clone(),
        before: previous,
    };
    let put = control.registry.put_client(&t, &c, &req)?;
    persist!(control, &t, before, |reg| {
        reg.tenant(&t)
            .ok()
            .and_then(|x| x.clients.get(&c))
            .map(|client| vec![Change::Client(&t, client)])
            .unwrap_or_default()
    });
    let (tenant, client) = find_client(&control, &t, &c)?;
    if old_key.is_some_and(|k| k != client.public_key) || !control.runtime.is_running(&t) {
        sync(&mut control, &t).await.map_err(stored_but)?;
    } else {
        control
            .runtime
            .upsert_client(tenant, client)
            .await
            .map_err(stored_but)?;
    }
    let (tenant, client) = find_client(&control, &t, &c)?;
    let st = peer_status(&control, &t, &client.public_key).await;
    let mut view = ClientView::new(client, &st, Instant::now(), SystemTime::now());
    view.config = Some(render::client_config(tenant, client, &state.public_host));
    Ok((status_of(put), Json(view)).into_response())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients/{client_id}/config", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, description = "wg-quick config", content_type = "text/plain", body = String), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_client_config(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let control = state.control.lock().await;
    let (tenant, client) = find_client(&control, &t, &c)?;
    let text = render::client_config(tenant, client, &state.public_host);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients/{client_id}/config.png", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, description = "The config as a QR code", content_type = "image/png", body = Vec<u8>), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_client_qr(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let control = state.control.lock().await;
    let (tenant, client) = find_client(&control, &t, &c)?;
    let text = render::client_config(tenant, client, &state.public_host);
    let png = render::qr_png(&text).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "render_failed",
        message: e.to_string(),
        field: None,
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}/clients/{client_id}", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = "Change not stored and undone (storage_failed), or stored but not taken by the running tunnel (tunnel_down; the message says so)", body = ErrorBody)))]
pub async fn delete_client(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&t).ok().cloned();
    control.registry.delete_client(&t, &c)?;
    persist!(control, &t, before, |_reg| vec![Change::DeleteClient(
        &t, &c
    )]);
    sync(&mut control, &t).await.map_err(stored_but)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- diagnostics ----

#[derive(serde::Deserialize)]
pub struct RouteQuery {
    src: Option<String>,
    dst: Option<String>,
}

fn query_ip(value: Option<&str>, field: &'static str) -> Result<IpAddr, ApiError> {
    let text = value.ok_or_else(|| ApiError::bad_field(field, format!("{field} is required")))?;
    text.parse()
        .map_err(|_| ApiError::bad_field(field, format!("{text:?} is not an IP address")))
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/route", tag = "diagnostics", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("src" = String, Query, description = "Inner source address"), ("dst" = String, Query, description = "Inner destination address")), responses((status = 200, description = "What the data plane would do", body = RouteView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn explain_route(
    State(state): Shared,
    Path(t): Path<String>,
    Query(q): Query<RouteQuery>,
) -> ApiResult {
    let id = tenant_id(&t)?;
    let src = query_ip(q.src.as_deref(), "src")?;
    let dst = query_ip(q.dst.as_deref(), "dst")?;
    let control = state.control.lock().await;
    let tenant = control.registry.tenant(&id)?;
    let e = control.runtime.explain(&id, src, dst).await?;
    let name = |key: &[u8; 32]| {
        let router = tenant
            .routers
            .values()
            .find(|r| r.public_key.as_bytes() == key);
        let client = tenant
            .clients
            .values()
            .find(|c| c.public_key.as_bytes() == key);
        match (router, client) {
            (Some(r), _) => Some(PeerRef {
                kind: "router".into(),
                id: r.id.to_string(),
            }),
            (None, Some(c)) => Some(PeerRef {
                kind: "client".into(),
                id: c.id.to_string(),
            }),
            (None, None) => None,
        }
    };
    let mut answer = RouteView {
        verdict: String::new(),
        to: None,
        rule: None,
        reason: None,
        from: e.from.as_ref().and_then(name),
    };
    match e.verdict {
        ExplainVerdict::Forward { peer, rule } => {
            answer.verdict = "forward".into();
            answer.to = name(&peer);
            answer.rule = Some(match rule {
                Rule::Egress { pool } => format!("egress {pool}"),
                Rule::Prefix { prefix } => format!("route {prefix}"),
            });
        }
        ExplainVerdict::Local => {
            answer.verdict = "local".into();
            answer.to = Some(PeerRef {
                kind: "server".into(),
                id: tenant.server_ip().to_string(),
            });
            answer.rule = Some(format!("local {}", tenant.server_ip()));
        }
        ExplainVerdict::Host => {
            answer.verdict = "local".into();
            answer.to = Some(PeerRef {
                kind: "host".into(),
                id: dst.to_string(),
            });
            answer.rule = Some("host prefix".into());
        }
        ExplainVerdict::Drop(reason) => {
            answer.verdict = "drop".into();
            answer.reason = Some(reason.as_str().into());
        }
    }
    Ok(Json(answer).into_response())
}
