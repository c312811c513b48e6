//! Route handlers. Each one: parse ids, lock, change the registry, store the
//! change (undone if the store refuses it), apply it to the running tunnel,
//! answer. One file per resource (`tenants`, `routers` with their forwards,
//! `clients` with the egress policy, `diagnostics`); this file holds what they
//! share, and `/healthz`. Validation is the registry's, the wire format `views`'.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::views::{Statuses, TenantView};
use super::{ApiError, AppState, Control};
use crate::control::model::TenantRequest;
use crate::control::registry::Put;
use crate::control::{Client, Id, Router, Tenant};
use crate::io::RuntimeError;
use crate::store::Change;
use boringtun::x25519::PublicKey;

pub(super) type Shared = State<Arc<AppState>>;

/// The OpenAPI description of a change's `503`: the codes it may carry.
/// The cap behind `busy` is [`super::detach::MAX_DETACHED`].
const CHANGE_UNAVAILABLE: &str =
    "Change not stored and undone (storage_failed); or stored but not \
taken by the running tunnel (tunnel_down; the message says so); or stored and taken while the \
host (TUN mode) has no route to a client pool yet (host_route_missing); or refused before it started \
because 256 changes are under way (busy; Retry-After says when to try again)";

/// [`CHANGE_UNAVAILABLE`] for opening a forward, which is kept while its tunnel is down.
const FORWARD_UNAVAILABLE: &str = "Change not stored and undone (storage_failed); or stored while \
the tunnel is down and opened when it starts (tunnel_down; the message says so); or refused \
before it started because 256 changes are under way (busy; Retry-After says when to try again)";
pub(super) type ApiResult = Result<Response, ApiError>;

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

/// How many ports bound by other programs an allocation steps over before it
/// gives up and says so.
const PORTS_TRIED: usize = 64;

/// Creates the tenant in the registry and binds its port, if it does not exist yet.
/// Nothing is stored: the caller persists the tenant together with its own change.
///
/// An allocated port (none in the request) that another program holds is
/// skipped for the next free one, up to [`PORTS_TRIED`] of them; a port the
/// caller asked for is theirs to change.
async fn ensure_tenant(
    control: &mut Control,
    id: &Id,
    req: &TenantRequest,
) -> Result<Put, ApiError> {
    let allocated = req.listen_port.is_none();
    let mut req = Cow::Borrowed(req);
    let mut held_elsewhere = BTreeSet::new();
    loop {
        let put = control.registry.put_tenant(id, &req, SystemTime::now())?;
        if put == Put::Updated {
            return Ok(put);
        }
        let started = match control.registry.tenant(id) {
            Ok(t) => control.runtime.start(t).await,
            Err(e) => return Err(e.into()),
        };
        let Err(e) = started else {
            return Ok(put);
        };
        // A tenant whose tunnel did not start does not exist: nor does a task
        // that was spawned but did not take its first peer set in time.
        control.runtime.stop(id).await;
        let _ = control.registry.delete_tenant(id);
        match e {
            RuntimeError::Bind { addr, source }
                if allocated && source.kind() == io::ErrorKind::AddrInUse =>
            {
                held_elsewhere.insert(addr.port());
                if held_elsewhere.len() >= PORTS_TRIED {
                    return Err(RuntimeError::Bind { addr, source }.into());
                }
                let port = control.registry.free_port(&held_elsewhere)?;
                req.to_mut().listen_port = Some(port);
            }
            e => return Err(e.into()),
        }
    }
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
    e.message = if e.code == crate::api::error::HOST_ROUTE_MISSING {
        // The tunnel has the change; only the host's way to a pool is missing.
        format!(
            "the change is stored and the running tunnel took it, but {} (tried again every 5 s)",
            e.message
        )
    } else if e.code == crate::api::error::TUNNEL_NOT_ANSWERING {
        // It may still take it, or not: it gets the whole stored state.
        format!(
            "the change is stored, but {}: the tunnel is given the stored peer set once it answers (tried every 5 s)",
            e.message
        )
    } else {
        format!(
            "the change is stored, but the running tunnel did not take it: {}",
            e.message
        )
    };
    e
}

/// Writes `list` to the store in one transaction.
pub(super) fn commit(
    store: &mut std::sync::Mutex<crate::store::Store>,
    list: &[Change<'_>],
) -> Result<(), crate::store::StoreError> {
    match store.get_mut() {
        // SQLite commits with fsync: keep the other tasks of this worker moving.
        Ok(store) => crate::api::blocking(|| store.apply(list)),
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

/// Takes a deleted peer out of the tenant's running tunnel, in O(log n); a
/// tunnel that is down is started with the stored state (which no longer has
/// the peer) instead.
async fn remove_peer(control: &mut Control, id: &Id, key: [u8; 32]) -> Result<(), ApiError> {
    if !control.runtime.is_running(id) {
        return sync(control, id).await.map_err(stored_but);
    }
    let tenant = control.registry.tenant(id)?;
    let removed = control.runtime.remove_peer(tenant, key).await;
    removed.map_err(|e| match e {
        // Its task ended meanwhile: down, and started again with the stored
        // state (without the peer) by the supervisor.
        crate::io::RuntimeError::TaskGone(_) => stored_but(ApiError::tunnel_down(&e)),
        e => stored_but(e),
    })
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

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, description = "Every tunnel is up", content_type = "text/plain", body = String), (status = 503, description = "A stored tunnel is down (its port taken, say; tried again every 5 s), or the TUN device's reader ended, or the device is down, or the host lacks a client pool's route (a line per problem); or the control plane has been busy for over 30 s", content_type = "text/plain", body = String)))]
pub async fn healthz(State(state): Shared) -> Response {
    // A change that holds the control lock long (a disk that stalls an fsync,
    // say) delays the answer at most HEALTH_WAIT: then the last answer is
    // given again while it is fresh, so that a liveness probe does not restart
    // an appliance whose tunnels run. A control plane held longer than that,
    // or before any answer, is unhealthy.
    let (status, body) = match tokio::time::timeout(HEALTH_WAIT, state.control.lock()).await {
        Ok(control) => note_health(&state, &control),
        Err(_) => fresh_answer(&state).unwrap_or((StatusCode::SERVICE_UNAVAILABLE, BUSY.into())),
    };
    (status, body).into_response()
}

/// The answer of a control plane held for over [`HEALTH_FRESH`].
const BUSY: &str = "the control plane is busy: no answer for over 30 s\n";

/// The last health answer, while it is fresh (made within [`HEALTH_FRESH`]).
fn fresh_answer(state: &AppState) -> Option<(StatusCode, String)> {
    let last = state.last_health.lock().ok().and_then(|l| l.clone())?;
    let (at, status, body) = last;
    (at.elapsed() < HEALTH_FRESH).then_some((status, body))
}

#[utoipa::path(get, path = "/livez", tag = "operations", security(()), responses((status = 200, description = "The process serves and its control plane answers, whatever the tunnels do: a liveness probe (a restart would not free a tunnel's taken port; `/healthz` is the readiness one)", content_type = "text/plain", body = String), (status = 503, description = "The control plane has been busy for over 30 s", content_type = "text/plain", body = String)))]
pub async fn livez(State(state): Shared) -> Response {
    // Alive while the control lock comes within HEALTH_WAIT, or came within
    // HEALTH_FRESH (the supervisor takes it every 5 s): what `/healthz` calls
    // busy is the only thing a restart could cure.
    if tokio::time::timeout(HEALTH_WAIT, state.control.lock())
        .await
        .is_ok()
    {
        return (StatusCode::OK, "alive\n").into_response();
    }
    match fresh_answer(&state) {
        Some(_) => (StatusCode::OK, "alive\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, BUSY).into_response(),
    }
}

/// The health answer, kept for `/healthz` to repeat. The supervisor notes it
/// after every pass too, so that the answer repeated is at most a pass old
/// whenever the control plane is responsive, however seldom probes come.
pub(crate) fn note_health(state: &AppState, control: &Control) -> (StatusCode, String) {
    let (status, body) = health_of(control);
    if let Ok(mut last) = state.last_health.lock() {
        *last = Some((tokio::time::Instant::now(), status, body.clone()));
    }
    (status, body)
}

/// How long `/healthz` waits for the control lock before it repeats its last
/// answer (probes commonly time out after 1 s).
const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a last answer may be repeated.
const HEALTH_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// The health answer: 503, a line per problem, while a stored tunnel or the
/// TUN device is down, or the host lacks a route to a client pool.
fn health_of(control: &Control) -> (StatusCode, String) {
    let (mut tunnels, mut down) = (0usize, 0usize);
    let mut unrouted = Vec::new();
    for t in control.registry.tenants() {
        tunnels += 1;
        down += usize::from(!control.runtime.is_running(&t.id));
        if !control.runtime.pools_routed(t) {
            unrouted.push(&t.id);
        }
    }
    let mut problems = String::new();
    if down > 0 {
        problems += &format!("{down} of {tunnels} tunnels down\n");
    }
    if !control.runtime.host_reading() {
        problems += "the host device's reader is down\n";
    } else if !control.runtime.host_up() {
        problems += "the host device is down (set down outside wgplane)\n";
    }
    match unrouted.as_slice() {
        [] => {}
        [one] => problems += &format!("the host has no route to a client pool of {one}\n"),
        [first, rest @ ..] => {
            problems += &format!(
                "the host has no route to client pools of {first} and {} other tenants\n",
                rest.len()
            )
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems)
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

// After `persist!`: a macro is seen only by the modules declared below it.
mod clients;
mod diagnostics;
mod routers;
mod tenants;

pub use clients::*;
pub use diagnostics::*;
pub use routers::*;
pub use tenants::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::Path;
    use crate::io::tunnel::News;

    /// A deleted router leaves the running tunnel at once (one peer removed,
    /// not the peer set sent again), and whoever was told it connected is told
    /// it is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_router_leaves_the_running_tunnel() {
        let f = crate::api::testing::fixture().await;
        f.router_handshakes().await;
        let key = {
            let control = f.state.control.lock().await;
            control.registry.tenant(&f.acme).unwrap().routers[&f.gw].public_key
        };
        let mut events = f.state.control.lock().await.runtime.subscribe();
        let path = Path((f.acme.to_string(), f.gw.to_string()));
        let response = delete_router(State(Arc::clone(&f.state)), path).await;
        assert_eq!(response.unwrap().status(), StatusCode::NO_CONTENT);
        let control = f.state.control.lock().await;
        let status = control.runtime.peer_status(&f.acme, *key.as_bytes()).await;
        assert!(matches!(status, Ok(None)), "{status:?}");
        drop(control);
        let gone = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Ok(tagged) => {
                        if let News::Peer(crate::core::engine::Event::Disconnected { peer }) =
                            tagged.event
                        {
                            break peer;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        assert_eq!(gone.ok(), Some(*key.as_bytes()));
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// While a change holds the control lock long, `/healthz` gives its last
    /// answer after a short wait instead of waiting with it, while that answer
    /// is fresh; after that, the busy control plane is the answer.
    #[tokio::test]
    async fn health_repeats_its_last_answer_while_the_lock_is_held() {
        let f = crate::api::testing::fixture().await;
        let health = || async {
            let answer = healthz(State(Arc::clone(&f.state))).await;
            let status = answer.status();
            let body = axum::body::to_bytes(answer.into_body(), 1024)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        let alive = || async { livez(State(Arc::clone(&f.state))).await.status() };
        assert_eq!(health().await.0, StatusCode::OK);
        let held = f.state.control.lock().await;
        tokio::time::pause();
        assert_eq!(health().await.0, StatusCode::OK, "the last answer");
        assert_eq!(alive().await, StatusCode::OK, "held, not for long yet");
        tokio::time::advance(HEALTH_FRESH).await;
        let (status, body) = health().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("busy"), "{body}");
        assert_eq!(
            alive().await,
            StatusCode::SERVICE_UNAVAILABLE,
            "held too long"
        );
        drop(held);
        assert_eq!(alive().await, StatusCode::OK);
        tokio::time::resume();
        // An unhealthy answer is repeated likewise.
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        let down = (
            StatusCode::SERVICE_UNAVAILABLE,
            "1 of 1 tunnels down\n".into(),
        );
        assert_eq!(health().await, down);
        assert_eq!(alive().await, StatusCode::OK, "down is not dead");
        let held = f.state.control.lock().await;
        tokio::time::pause();
        assert_eq!(health().await, down, "the last answer");
        drop(held);
    }
}
