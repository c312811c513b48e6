//! Brings stored tunnels that are down back up: a tunnel whose port was taken
//! when the appliance started, or whose task ended. Every [`RETRY`] it walks
//! the registry under the control lock and starts what is not running, with
//! its peers and forwards, and opens the forwards of running tunnels that
//! could not be opened before (their port was taken). A change through the
//! API does the same at once.
//!
//! It also gives a running tunnel that did not take a change in time the
//! whole stored peer set again, until it takes one, and tries a store whose
//! last write was refused with a write that changes nothing, so that
//! `wgplane_store_writable` follows the disk.
//!
//! In TUN mode it also routes client pools the kernel refused before, and
//! checks the device: one set down from outside shows in `/healthz` and
//! `wgplane_host_device_up`, and gets its addresses and pool routes back once
//! it is up again.
//!
//! It logs a tunnel's failure once (and again only when the reason changes)
//! and its recovery; `/healthz` and `wgplane_tunnel_up` show what is down
//! meanwhile. It does not restart the process or the TUN device's reader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::AppState;
use crate::control::Id;
use crate::io::tun::DeviceCheck;

/// How often tunnels that are down are tried again: a port freed by a
/// lingering old process is taken within seconds, and a tunnel that cannot
/// come up costs one failed `bind` per period.
pub const RETRY: Duration = Duration::from_secs(5);

/// Runs until the process ends.
pub async fn run(state: Arc<AppState>) {
    // Tunnels that failed, with the last reason logged.
    let mut failing: HashMap<Id, String> = HashMap::new();
    // Forwards that could not be opened, likewise.
    let mut closed = HashMap::new();
    // TUN mode: tunnels whose pool routes the kernel refused, likewise.
    let mut unrouted = HashMap::new();
    // TUN mode: why the device could not be checked or repaired, last logged.
    let mut host_failing = None;
    let mut tick = tokio::time::interval(RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        revive_all(&state, &mut failing).await;
        reopen_forwards(&state, &mut closed).await;
        reroute_pools(&state, &mut unrouted).await;
        repair_host(&state, &mut host_failing).await;
        probe_store(&state).await;
        resync(&state).await;
        super::handlers::note_health(&state, &*state.control.lock().await);
    }
}

/// One pass: tunnels that did not take a change in time are given the
/// registry's whole peer set again, until one of them takes it; one that does
/// not answer a question within [`PROBE_WAIT`](crate::io::runtime::PROBE_WAIT) is left for the next pass, so
/// that a task stuck by a bug does not hold the control lock for a change's
/// whole wait at every pass.
pub(crate) async fn resync(state: &AppState) {
    let mut control = state.control.lock().await;
    let super::Control {
        registry, runtime, ..
    } = &mut *control;
    for id in runtime.unsynced() {
        // A deleted tenant's tunnel is stopped, which forgets it.
        let Ok(tenant) = registry.tenant(&id) else {
            continue;
        };
        if !runtime.answers(&id).await {
            continue;
        }
        if runtime.sync(tenant).await.is_ok() {
            tracing::info!(tenant = %id, "the tunnel answers again and took the stored peer set");
        }
    }
}

/// One pass: a store whose last write was refused is tried again with a
/// write that changes nothing, so that `wgplane_store_writable` follows the
/// disk on a quiet appliance too.
async fn probe_store(state: &AppState) {
    let control = state.control.lock().await;
    // A store poisoned by a panic mid-write stays refused.
    if let Ok(mut store) = control.store.lock() {
        super::blocking(|| store.probe());
    };
}

/// One pass (TUN mode): checks the device and logs what it found, once per
/// change: down, back up (with what was put back), or unreadable.
async fn repair_host(state: &AppState, failing: &mut Option<String>) {
    let mut control = state.control.lock().await;
    let was_up = control.runtime.host_up();
    let Some(check) = control.runtime.repair_host().await else {
        return;
    };
    match check {
        Ok(DeviceCheck::Down) => {
            if was_up {
                tracing::warn!("the TUN device is down: the host reaches no tunnel until it is up");
            }
        }
        Ok(DeviceCheck::Up {
            addresses,
            routes,
            refused,
        }) => {
            if !was_up || addresses + routes > 0 {
                tracing::info!(
                    addresses,
                    routes,
                    "the TUN device is up; its addresses and pool routes are put back"
                );
            }
            let reasons: Vec<String> = refused.iter().map(ToString::to_string).collect();
            let reason = reasons.join("; ");
            if reasons.is_empty() {
                *failing = None;
            } else if failing.as_ref() != Some(&reason) {
                tracing::warn!(refused = %reason, retry_secs = RETRY.as_secs(),
                    "the kernel refused to take back some of the TUN device's addresses or routes");
                *failing = Some(reason);
            }
        }
        Err(e) => {
            let reason = e.to_string();
            if failing.as_ref() != Some(&reason) {
                tracing::warn!(error = %reason, retry_secs = RETRY.as_secs(), "TUN device not repaired");
                *failing = Some(reason);
            }
        }
    }
}

/// Logs `tenant`'s failure `what` (`e`), unless the last pass logged the
/// same reason, and keeps the reason for the next.
fn logged_once(
    failing: &mut HashMap<Id, String>,
    tenant: Id,
    e: &impl std::fmt::Display,
    what: &'static str,
) {
    let reason = e.to_string();
    if failing.get(&tenant) != Some(&reason) {
        tracing::warn!(%tenant, error = %reason, retry_secs = RETRY.as_secs(), "{what}");
        failing.insert(tenant, reason);
    }
}

/// One pass (TUN mode): syncs every running tunnel whose client pools the
/// host does not route as the registry says (the kernel refused a route).
async fn reroute_pools(state: &AppState, unrouted: &mut HashMap<Id, String>) {
    let mut guard = state.control.lock().await;
    let control = &mut *guard;
    let wrong: Vec<Id> = control
        .registry
        .tenants()
        .filter(|t| control.runtime.is_running(&t.id) && !control.runtime.pools_routed(t))
        .map(|t| t.id.clone())
        .collect();
    unrouted.retain(|id, _| wrong.contains(id));
    for id in wrong {
        let Ok(tenant) = control.registry.tenant(&id) else {
            continue;
        };
        match control.runtime.sync(tenant).await {
            Ok(()) => {
                if unrouted.remove(&id).is_some() {
                    tracing::info!(tenant = %id, "client pool routed again");
                }
            }
            Err(e) => logged_once(unrouted, id, &e, "client pool not routed to the host"),
        }
    }
}

/// A forward: tenant, router, port.
type ForwardKey = (Id, Id, u16);

/// One pass: opens the forwards of running tunnels that are not open.
async fn reopen_forwards(state: &AppState, closed: &mut HashMap<ForwardKey, String>) {
    let mut guard = state.control.lock().await;
    let control = &mut *guard;
    let mut still = HashMap::new();
    for tenant in control.registry.tenants() {
        if !control.runtime.is_running(&tenant.id) {
            continue;
        }
        for (router, port, e) in control.runtime.open_forwards(tenant).await {
            let key = (tenant.id.clone(), router, port);
            let reason = e.to_string();
            if closed.get(&key) != Some(&reason) {
                tracing::warn!(tenant = %key.0, router = %key.1, port, error = %reason,
                    retry_secs = RETRY.as_secs(), "forward still closed");
            }
            still.insert(key, reason);
        }
    }
    for (tenant, router, port) in closed.keys().filter(|k| !still.contains_key(*k)) {
        if control
            .runtime
            .forward_listen(tenant, router, *port)
            .is_some()
        {
            tracing::info!(%tenant, %router, port, "forward is open again");
        }
    }
    *closed = still;
    // Forwards on `:0` opened here or by `revive_all` keep the port they got.
    control.record_bound_forwards();
}

/// One pass: starts every tenant's tunnel that is not running.
async fn revive_all(state: &AppState, failing: &mut HashMap<Id, String>) {
    let mut guard = state.control.lock().await;
    let control = &mut *guard;
    let down: Vec<Id> = control
        .registry
        .tenants()
        .filter(|t| !control.runtime.is_running(&t.id))
        .map(|t| t.id.clone())
        .collect();
    // Deleted or running again (through the API) since the last pass.
    failing.retain(|id, _| down.contains(id));
    for id in down {
        let Ok(tenant) = control.registry.tenant(&id) else {
            continue;
        };
        match control.runtime.bring_up(tenant).await {
            Ok(()) => {
                failing.remove(&id);
                tracing::info!(tenant = %id, "tunnel is back up");
            }
            Err(e) => logged_once(failing, id, &e, "tunnel still down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ends acme's tunnel task, as a panic would, and runs one pass.
    async fn end_and_revive(f: &crate::api::testing::Fixture) {
        f.state.control.lock().await.runtime.end_task(&f.acme);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while f.state.control.lock().await.runtime.is_running(&f.acme) {
            assert!(tokio::time::Instant::now() < deadline, "the task ends");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut failing = HashMap::new();
        revive_all(&f.state, &mut failing).await;
        assert!(failing.is_empty(), "{failing:?}");
    }

    /// A tunnel task that ended (a panic, say) is started again by the next
    /// pass, with its peers: the router's handshake is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tunnel_task_that_ended_is_started_again_with_its_peers() {
        let f = crate::api::testing::fixture().await;
        let mut news = f.state.control.lock().await.runtime.subscribe();
        f.router_handshakes().await;
        end_and_revive(&f).await;
        assert!(f.state.control.lock().await.runtime.is_running(&f.acme));
        assert_eq!(f.state.control.lock().await.runtime.failures(&f.acme), 1);
        // The ended task could not say its peer went: the runtime says the
        // tunnel stopped, for the event hub to disconnect whom it announced.
        let mut said = Vec::new();
        while let Ok(e) = news.try_recv() {
            said.push(e.event);
        }
        assert!(
            matches!(
                said.as_slice(),
                [
                    crate::io::tunnel::News::Peer(_),
                    ..,
                    crate::io::tunnel::News::Stopped
                ]
            ),
            "{said:?}"
        );
        f.router_handshakes().await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A forward asked for while the tunnel's task has ended (before the next
    /// pass starts it again) is not opened: the handler stores it and answers
    /// 503 `tunnel_down`, instead of a listener that closes every connection.
    /// The pass that starts the task opens it.
    #[tokio::test]
    async fn a_forward_on_an_ended_tunnel_waits_for_the_task() {
        let f = crate::api::testing::fixture().await;
        f.state.control.lock().await.runtime.end_task(&f.acme);
        while f.state.control.lock().await.runtime.is_running(&f.acme) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let target = "10.100.1.1:22".parse().unwrap();
        let mut c = f.state.control.lock().await;
        let opened = c.runtime.set_forward(&f.acme, &f.gw, 22, any, target).await;
        assert!(
            matches!(opened, Err(crate::io::RuntimeError::TaskGone(_))),
            "{opened:?}"
        );
        assert_eq!(c.runtime.forward_listen(&f.acme, &f.gw, 22), None);
        c.registry
            .put_forward(&f.acme, &f.gw, 22, any)
            .expect("stored");
        drop(c);
        revive_all(&f.state, &mut HashMap::new()).await;
        let c = f.state.control.lock().await;
        assert!(c.runtime.forward_listen(&f.acme, &f.gw, 22).is_some());
        drop(c);
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A forward whose port another program held is opened once it is free.
    #[tokio::test]
    async fn a_forward_whose_port_was_taken_is_opened_once_it_is_free() {
        let f = crate::api::testing::fixture().await;
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let listen = holder.local_addr().expect("address");
        f.state
            .control
            .lock()
            .await
            .registry
            .put_forward(&f.acme, &f.gw, 22, listen)
            .expect("forward");
        let mut closed = HashMap::new();
        reopen_forwards(&f.state, &mut closed).await;
        assert_eq!(closed.len(), 1, "{closed:?}");
        let open = async || {
            let control = f.state.control.lock().await;
            control.runtime.forward_listen(&f.acme, &f.gw, 22)
        };
        assert_eq!(open().await, None);
        drop(holder);
        reopen_forwards(&f.state, &mut closed).await;
        assert!(closed.is_empty(), "{closed:?}");
        assert_eq!(open().await, Some(listen));
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A forward on `:0` that the supervisor opens keeps the port it got: the
    /// registry (and the store) have it, not `:0`.
    #[tokio::test]
    async fn a_forward_on_any_port_opened_later_keeps_its_port() {
        let f = crate::api::testing::fixture().await;
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut c = f.state.control.lock().await;
        c.registry
            .put_forward(&f.acme, &f.gw, 22, any)
            .expect("forward");
        drop(c);
        reopen_forwards(&f.state, &mut HashMap::new()).await;
        let mut c = f.state.control.lock().await;
        let open = c.runtime.forward_listen(&f.acme, &f.gw, 22).expect("open");
        assert_ne!(open.port(), 0);
        let stored = c.registry.tenant(&f.acme).expect("acme").routers[&f.gw].forwards[&22];
        assert_eq!(stored, open);
        c.runtime.stop(&f.acme).await;
    }

    /// Its forwards come back too, on the same address, and a stopped tunnel's
    /// forward ports are free as soon as `stop` returns.
    #[tokio::test]
    async fn a_tunnel_started_again_opens_its_forwards_on_the_same_address() {
        let f = crate::api::testing::fixture().await;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        {
            let mut c = f.state.control.lock().await;
            c.registry
                .put_forward(&f.acme, &f.gw, 8728, listen)
                .expect("forward");
            let vpn_ip = c.registry.tenant(&f.acme).expect("acme").routers[&f.gw].vpn_ip;
            let target = std::net::SocketAddrV4::new(vpn_ip, 8728);
            let bound = c
                .runtime
                .set_forward(&f.acme, &f.gw, 8728, listen, target)
                .await;
            assert_eq!(bound.expect("forward opened"), listen);
        }
        end_and_revive(&f).await;
        let open = f
            .state
            .control
            .lock()
            .await
            .runtime
            .forward_listen(&f.acme, &f.gw, 8728);
        assert_eq!(open, Some(listen));
        tokio::net::TcpStream::connect(listen)
            .await
            .expect("the forward listens again");
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        std::net::TcpListener::bind(listen).expect("stopped: the port is free at once");
    }
}
