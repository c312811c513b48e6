//! Diagnostics: `/v1/tenants/{t}/route`, what the data plane would do with a
//! packet, and `/v1/tenants/{t}/strangers`, the keys that knocked on the
//! tunnel but are no peer of it.
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
use crate::api::views::{ErrorBody, ForeignPeer, PeerRef, RouteView, StrangerView};
use crate::api::ApiError;
use crate::control::registry::PeerWithKey;
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

#[utoipa::path(get, path = "/tenants/{tenant_id}/route", tag = "diagnostics", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]"), ("src" = String, Query, description = "Inner source address"), ("dst" = String, Query, description = "Inner destination address")), responses((status = 200, description = "What the data plane would do", body = RouteView), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = "The tunnel is down (tunnel_down): only the running tunnel can say what it would do", body = ErrorBody)))]
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

#[utoipa::path(get, path = "/tenants/{tenant_id}/strangers", tag = "diagnostics", params(("tenant_id" = String, Path, description = "Tenant id: 1-64 of [A-Za-z0-9._-]")), responses((status = 200, description = "The last keys (at most 16) that handshake initiations to the tunnel carried (with a valid mac1) and that are no peer of it, the most recent first: a router whose key is not registered here, or one that dials this tenant's port with another tenant's tunnel (`peer_of`). Whoever knows the tunnel's public key can make such an initiation, so an entry is a lead, not a proof", body = Vec<StrangerView>), (status = 400, description = "Bad input", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 404, description = "Unknown object", body = ErrorBody), (status = 503, description = "The tunnel is down (tunnel_down)", body = ErrorBody)))]
pub async fn list_strangers(State(state): Shared, Path(t): Path<String>) -> ApiResult {
    let id = tenant_id(&t)?;
    let control = state.control.lock().await;
    control.registry.tenant(&id)?;
    let strangers = control.runtime.strangers(&id).await?;
    let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
    // Each tenant's key index: O(tenants) per key, not O(peers).
    let peer_of = |key: &[u8; 32]| {
        let registry = &control.registry;
        registry
            .tenants()
            .filter(|t| t.id != id)
            .find_map(|tenant| {
                let (kind, peer) = match registry.peer_with_key(&tenant.id, key)? {
                    PeerWithKey::Router(r) => ("router", &r.id),
                    PeerWithKey::Client(c) => ("client", &c.id),
                };
                Some(ForeignPeer {
                    tenant_id: tenant.id.to_string(),
                    kind: kind.into(),
                    id: peer.to_string(),
                })
            })
    };
    let views: Vec<StrangerView> = strangers
        .iter()
        .map(|s| StrangerView {
            public_key: crate::keys::encode(&s.public_key),
            endpoint: s.endpoint.to_string(),
            last_seen_at: crate::io::wall::rfc3339(
                wall - now.saturating_duration_since(s.last_seen),
            ),
            initiations: s.initiations,
            peer_of: peer_of(&s.public_key),
        })
        .collect();
    Ok(Json(views).into_response())
}
