//! `/v1/tenants/{t}/route`: what the data plane would do with a packet.
//!
//! Left out: the decision itself, which the running tunnel's engine makes
//! ([`crate::core::engine::TunnelEngine::explain`], by the rules of
//! [`crate::core::policy`]). Nothing is sent or counted, and only addresses are asked:
//! no ports, no protocol.

use std::net::IpAddr;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;

use crate::api::params::{Path, Query};
use crate::api::views::{ErrorBody, PeerRef, RouteView};
use crate::api::ApiError;
use crate::core::engine::ExplainVerdict;
use crate::core::policy::Rule;

use super::{tenant_id, ApiResult, Shared};

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
