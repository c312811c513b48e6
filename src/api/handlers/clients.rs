//! `/v1/tenants/{t}/egress` and `/v1/tenants/{t}/clients`: the KTN egress policy
//! and the clients (phones) behind it, with their configs and QR codes.
//!
//! Left out: the rules and address allocation ([`crate::control::registry`]), and the
//! config text and QR image, which [`crate::control::render`] makes.

use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use crate::api::body::JsonBody;
use crate::api::params::Path;
use crate::api::views::{ClientView, EgressView, ErrorBody};
use crate::api::{ApiError, AppState, Control};
use crate::control::model::{ClientRequest, EgressRequest};
use crate::control::{render, Id, Tenant};
use crate::store::Change;

use super::{
    commit, peer_status, remove_peer, status_of, statuses, stored_but, sync, tenant_id, undo,
    ApiResult, Before, Shared, CHANGE_UNAVAILABLE,
};

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

#[utoipa::path(put, path = "/tenants/{tenant_id}/egress", tag = "egress", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), request_body = EgressRequest, responses((status = 201, description = "Created", body = EgressView), (status = 200, description = "Existed", body = EgressView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
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

#[utoipa::path(delete, path = "/tenants/{tenant_id}/egress", tag = "egress", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
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
    // This one peer's status: not a snapshot of the tunnel's whole peer set.
    let st = peer_status(&control, &t, &client.public_key).await;
    Ok(Json(ClientView::new(
        client,
        &st,
        Instant::now(),
        SystemTime::now(),
    ))
    .into_response())
}

#[utoipa::path(put, path = "/tenants/{tenant_id}/clients/{client_id}", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), request_body = ClientRequest, responses((status = 201, description = "Created; includes config", body = ClientView), (status = 200, description = "Existed; includes config", body = ClientView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
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
    let view = with_config(&state, &control, &t, &c).await?;
    Ok((status_of(put), Json(view)).into_response())
}

#[utoipa::path(post, path = "/tenants/{tenant_id}/clients/{client_id}/key", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, description = "A new key pair generated here; includes the new config. The old key's session ends at once.", body = ClientView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn new_client_key(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let mut control = state.control.lock().await;
    let previous = control.registry.tenant(&t)?.clients.get(&c).cloned();
    let before = Before::Client {
        id: c.clone(),
        before: previous,
    };
    control.registry.new_client_key(&t, &c)?;
    persist!(control, &t, before, |reg| {
        reg.tenant(&t)
            .ok()
            .and_then(|x| x.clients.get(&c))
            .map(|client| vec![Change::Client(&t, client)])
            .unwrap_or_default()
    });
    // A new key is a new peer: the old one leaves the running tunnel.
    sync(&mut control, &t).await.map_err(stored_but)?;
    let view = with_config(&state, &control, &t, &c).await?;
    Ok(Json(view).into_response())
}

/// Client `c` of tenant `t` as a changed one is answered: its status and its
/// config, with the private key where it is held here.
async fn with_config(
    state: &AppState,
    control: &Control,
    t: &Id,
    c: &Id,
) -> Result<ClientView, ApiError> {
    let (tenant, client) = find_client(control, t, c)?;
    let st = peer_status(control, t, &client.public_key).await;
    let mut view = ClientView::new(client, &st, Instant::now(), SystemTime::now());
    view.config = Some(render::client_config(tenant, client, &state.public_host));
    Ok(view)
}

/// The wg-quick config of client `c` of tenant `t` (ids as given in the
/// path), and whether it holds the private key (one imported with only its
/// public key has the line commented out).
async fn client_config(state: &AppState, t: &str, c: &str) -> Result<(String, bool), ApiError> {
    let (t, c) = (tenant_id(t)?, Id::parse(c, "client_id")?);
    let control = state.control.lock().await;
    let (tenant, client) = find_client(&control, &t, &c)?;
    let text = render::client_config(tenant, client, &state.public_host);
    Ok((text, client.private_key.is_some()))
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients/{client_id}/config", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, description = "wg-quick config", content_type = "text/plain", body = String), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody)))]
pub async fn get_client_config(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (text, _) = client_config(&state, &t, &c).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[utoipa::path(get, path = "/tenants/{tenant_id}/clients/{client_id}/config.png", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 200, description = "The config as a QR code", content_type = "image/png", body = Vec<u8>), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 409, description = "The client's private key is not held here (no_private_key)", body = ErrorBody)))]
pub async fn get_client_qr(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (text, has_key) = client_config(&state, &t, &c).await?;
    // A phone scanning it would get a tunnel that can never connect.
    if !has_key {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "no_private_key",
            message: "the appliance does not hold this client's private key (it was given only \
                      its public key): use GET …/config and put the key in on the device"
                .into(),
            field: None,
        });
    }
    // A few milliseconds of CPU: off the workers the tunnels run on.
    let rendered = tokio::task::spawn_blocking(move || render::qr_png(&text)).await;
    let failed = |message: String| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "render_failed",
        message,
        field: None,
    };
    let png = rendered
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}/clients/{client_id}", tag = "clients", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("client_id" = String, Path, description = "Client id")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn delete_client(
    State(state): Shared,
    Path((t, c)): Path<(String, String)>,
) -> ApiResult {
    let (t, c) = (tenant_id(&t)?, Id::parse(&c, "client_id")?);
    let mut control = state.control.lock().await;
    let removed = control.registry.delete_client(&t, &c)?;
    let key = *removed.public_key.as_bytes();
    let before = Before::Client {
        id: c.clone(),
        before: Some(removed),
    };
    persist!(control, &t, before, |_reg| vec![Change::DeleteClient(
        &t, &c
    )]);
    remove_peer(&mut control, &t, key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
