//! `/v1/tenants`: a tenant's tunnel, created, listed, changed and deleted.
//!
//! Left out: a tenant's routers, clients and egress policy (`routers`, `clients`), and
//! the steps every handler shares (starting a tunnel on a free port, storing, undoing),
//! which are in the handlers' `mod.rs`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use crate::api::body::JsonBody;
use crate::api::params::Path;
use crate::api::views::{ErrorBody, TenantView};
use crate::api::Control;
use crate::control::model::TenantRequest;
use crate::control::registry::Put;
use crate::store::Change;

use super::{
    commit, ensure_tenant, status_of, stored_but, sync, tenant_id, tenant_row, tenant_view, undo,
    ApiResult, Shared, CHANGE_UNAVAILABLE,
};

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

#[utoipa::path(put, path = "/tenants/{tenant_id}", tag = "tenants", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), request_body(content = Option<TenantRequest>, description = "Optional: listen_port and subnet (omitted values are allocated); private_key only to keep a migrated server's key"), responses((status = 201, description = "Created", body = TenantView), (status = 200, description = "Existed", body = TenantView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 409, description = "Conflict", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn put_tenant(
    State(state): Shared,
    Path(t): Path<String>,
    JsonBody(req): JsonBody<TenantRequest>,
) -> ApiResult {
    let id = tenant_id(&t)?;
    reaches_the_appliance(&state.public_host, req.host_prefixes.as_deref())?;
    let mut control = state.control.lock().await;
    let before = control.registry.tenant(&id).ok().cloned();
    let put = ensure_tenant(&mut control, &id, &req).await?;
    // Always stored: an update may have changed the host prefixes.
    persist!(control, &id, before, |r| tenant_row(r, &id, Put::Created));
    sync(&mut control, &id).await.map_err(stored_but)?;
    let tenant = control.registry.tenant(&id)?;
    Ok((status_of(put), Json(tenant_view(&state, &control, tenant))).into_response())
}

/// Refuses a host prefix that holds the appliance's public address (see
/// [`crate::control::restore::holding_public_address`]). One that does not
/// parse is left to the registry, which names it.
fn reaches_the_appliance(
    public_host: &str,
    prefixes: Option<&[String]>,
) -> Result<(), crate::api::ApiError> {
    let parsed: Vec<ipnet::IpNet> = prefixes
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    match crate::control::restore::holding_public_address(&parsed, public_host) {
        None => Ok(()),
        Some((net, address)) => Err(crate::api::ApiError::bad_field(
            "host_prefixes",
            format!(
                "{net} holds the appliance's public address {address}: routers would \
                 route their tunnel's own datagrams into the tunnel"
            ),
        )),
    }
}

#[utoipa::path(delete, path = "/tenants/{tenant_id}", tag = "tenants", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 204, description = "Deleted; its port is closed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = CHANGE_UNAVAILABLE, body = ErrorBody)))]
pub async fn delete_tenant(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let mut control = state.control.lock().await;
    let before = control.registry.delete_tenant(&id)?;
    if let Err(e) = super::commit(&mut control.store, &[Change::DeleteTenant(&id)]) {
        control.registry.reinstate(&id, Some(before));
        return Err(e.into());
    }
    control.runtime.stop(&id).await;
    control.runtime.forget(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::reaches_the_appliance;

    /// A deleted tenant's failure count goes with it: one created again under
    /// the same id does not start with its predecessor's.
    #[tokio::test]
    async fn a_deleted_tenant_takes_its_failures_along() {
        use crate::api::params::Path;
        use axum::extract::State;
        let f = crate::api::testing::fixture().await;
        f.state.control.lock().await.runtime.end_task(&f.acme);
        while f.state.control.lock().await.runtime.is_running(&f.acme) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        assert_eq!(f.state.control.lock().await.runtime.failures(&f.acme), 1);
        let state = std::sync::Arc::clone(&f.state);
        let deleted = super::delete_tenant(State(state), Path("acme".into())).await;
        assert_eq!(
            deleted.map(|r| r.status()).ok(),
            Some(axum::http::StatusCode::NO_CONTENT)
        );
        assert_eq!(f.state.control.lock().await.runtime.failures(&f.acme), 0);
    }

    #[test]
    fn a_host_prefix_holding_the_appliances_address_is_refused() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refused = reaches_the_appliance("203.0.113.1", Some(&list(&["203.0.113.0/24"])));
        let e = refused.expect_err("holds the public address");
        assert_eq!(e.field.as_deref(), Some("host_prefixes"));
        let v6 = list(&["2001:db8::/32"]);
        assert!(reaches_the_appliance("[2001:db8::1]", Some(&v6)).is_err());
        assert!(reaches_the_appliance("203.0.113.1", Some(&list(&["198.18.0.0/16"]))).is_ok());
        assert!(
            reaches_the_appliance("vpn.example.com", Some(&v6)).is_ok(),
            "a name"
        );
        assert!(reaches_the_appliance("203.0.113.1", None).is_ok());
    }
}
