//! `/v1/tenants/{t}/routers`: routers, their RouterOS scripts, and the
//! management forwards to them.
//!
//! Left out: the rules ([`crate::control::registry`]), the script's text
//! ([`crate::control::render`]) and carrying forwarded connections
//! ([`crate::io::forward`]); a stored forward that cannot open now (its port taken) is
//! left to the `supervisor`.

use std::net::SocketAddrV4;
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use crate::api::body::JsonBody;
use crate::api::params::Path;
use crate::api::views::{ErrorBody, ForwardView, RouterView};
use crate::api::{ApiError, Control};
use crate::control::model::{ForwardRequest, RouterRequest, TenantRequest};
use crate::control::registry::Put;
use crate::control::{render, Id, Tenant};
use crate::io::RuntimeError;
use crate::store::Change;

use super::{
    commit, ensure_tenant, peer_status, remove_peer, status_of, statuses, stored_but, sync,
    tenant_id, tenant_row, undo, ApiResult, Before, Shared, CHANGE_UNAVAILABLE,
    FORWARD_UNAVAILABLE,
};

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

#[utoipa::path(put, path = "/tenants/{tenant_id}/routers/{router_id}", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), request_body = RouterRequest, responses((status = 201, description = "Created", body = RouterView), (status = 200, description = "Existed", body = RouterView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
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
        // A refused router changed nothing; a tenant made for it goes again.
        Err(e) => {
            if created_tenant == Put::Created {
                undo(&mut control, &t, before).await;
            }
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
    apply_forwards(&mut control, &t, &r).await;
    router_answer(&control, &t, &r, status_of(put)).await
}

#[utoipa::path(post, path = "/tenants/{tenant_id}/routers/{router_id}/key", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 200, description = "A new key pair generated here: the router's script (GET …/script) carries the new private key. The old key's session ends at once.", body = RouterView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn new_router_key(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let mut control = state.control.lock().await;
    let before = Before::Router {
        id: r.clone(),
        before: control.registry.tenant(&t)?.routers.get(&r).cloned(),
    };
    control.registry.new_router_key(&t, &r)?;
    persist!(control, &t, before, |reg| {
        reg.tenant(&t)
            .ok()
            .and_then(|x| x.routers.get(&r))
            .map(|router| vec![Change::Router(&t, router)])
            .unwrap_or_default()
    });
    // A new key is a new peer (and a gateway's egress follows it): the
    // whole peer set.
    sync(&mut control, &t).await.map_err(stored_but)?;
    apply_forwards(&mut control, &t, &r).await;
    router_answer(&control, &t, &r, StatusCode::OK).await
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/routers/{router_id}/script", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 200, description = "RouterOS v7 script", content_type = "text/plain", body = String), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_router_script(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let control = state.control.lock().await;
    let (tenant, router) = find_router(&control, &t, &r)?;
    // In TUN mode the tunnel carries the host prefixes to the host device.
    let host_routes = match control.runtime.tun_mode() {
        true => &tenant.host_prefixes[..],
        false => &[],
    };
    let text = render::router_script(tenant, router, &state.public_host, host_routes);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

fn port_param(text: &str) -> Result<u16, ApiError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_field("port", format!("{text:?} is not a port (1-65535)")))
}

/// Makes the running forwards of router `r` match the registry (targets follow the
/// router's address). A forward that cannot be opened now (another program holds
/// its port) is logged and left to the supervisor, which tries it again every
/// 5 s: the router's own change is done all the same. In TUN mode stored
/// forwards stay closed (the host reaches routers by route).
async fn apply_forwards(control: &mut Control, t: &Id, r: &Id) {
    if control.runtime.tun_mode() {
        return;
    }
    let Some(router) = control
        .registry
        .tenant(t)
        .ok()
        .and_then(|x| x.routers.get(r))
    else {
        return;
    };
    let wanted: Vec<(u16, std::net::SocketAddr, SocketAddrV4)> = router
        .forwards
        .iter()
        .map(|(port, listen)| (*port, *listen, SocketAddrV4::new(router.vpn_ip, *port)))
        .collect();
    for (port, listen, target) in wanted {
        if let Err(e) = control
            .runtime
            .set_forward(t, r, port, listen, target)
            .await
        {
            tracing::warn!(tenant = %t, router = %r, port, error = %e,
                "forward not open; the supervisor tries again every 5 s");
        }
    }
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

#[utoipa::path(put, path = "/tenants/{tenant_id}/routers/{router_id}/forwards/{port}", tag = "forwards", params(("tenant_id" = String, Path, description = "Tenant id"), ("router_id" = String, Path, description = "Router id"), ("port" = u16, Path, description = "The router's TCP port inside the tunnel")), request_body(content = Option<ForwardRequest>, description = "listen: host address (default 127.0.0.1:0, any free port)"), responses((status = 201, description = "Created: the listener is open", body = ForwardView), (status = 200, description = "Existed", body = ForwardView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Listen address in use (listen_unavailable), or TUN mode (tun_mode)", body = ErrorBody), (status = 503, description = FORWARD_UNAVAILABLE, body = ErrorBody)))]
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
        // A tunnel that is down takes the forward when it starts again, as it
        // takes every other stored change: stored, and answered as such.
        Err(e @ RuntimeError::TaskGone(_)) => {
            if let Err(stored) =
                commit(&mut control.store, &[Change::Forward(&t, &r, port, listen)])
            {
                undo(&mut control, &t, before).await;
                return Err(stored.into());
            }
            return Err(stored_but(e));
        }
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

#[utoipa::path(delete, path = "/tenants/{tenant_id}/routers/{router_id}/forwards/{port}", tag = "forwards", params(("tenant_id" = String, Path, description = "Tenant id"), ("router_id" = String, Path, description = "Router id"), ("port" = u16, Path, description = "The router's port")), responses((status = 204, description = "Deleted; the listener is closed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
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

#[utoipa::path(delete, path = "/tenants/{tenant_id}/routers/{router_id}", tag = "routers", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("router_id" = String, Path, description = "Router id")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn delete_router(
    State(state): Shared,
    Path((t, r)): Path<(String, String)>,
) -> ApiResult {
    let (t, r) = (tenant_id(&t)?, Id::parse(&r, "router_id")?);
    let mut control = state.control.lock().await;
    let removed = control.registry.delete_router(&t, &r)?;
    let (key, ports) = (*removed.public_key.as_bytes(), removed.forwards.clone());
    let before = Before::Router {
        id: r.clone(),
        before: Some(removed),
    };
    persist!(control, &t, before, |_reg| vec![Change::DeleteRouter(
        &t, &r
    )]);
    for port in ports.keys() {
        control.runtime.remove_forward(&t, &r, *port).await;
    }
    remove_peer(&mut control, &t, key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
