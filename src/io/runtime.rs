//! Starts, stops and queries the tunnel tasks on behalf of the control plane.
//!
//! The runtime binds each tunnel's socket before the tunnel is reported as created,
//! so a port that cannot be bound is an error at the API, not a silent dead tunnel.
//! A stored tunnel that cannot come up (its port taken at start, its task ended)
//! is down, not gone: [`Runtime::bring_up`] starts it again, with its peers and
//! forwards, whenever the control plane asks (see `api::supervisor`).
//!
//! A task is asked under the control lock, so no question waits for it more
//! than [`ANSWER_WAIT`] and no change more than [`CHANGE_WAIT`]: one stuck by a
//! bug holds up its own tenant, not the API. A tunnel that did not take a
//! change in time is listed ([`Runtime::unsynced`]) for a full peer set later.
//!
//! Left out: what tunnels and peers there should be (the registry's, handed in
//! as [`Tenant`]s), storing anything, and the packet path (the tasks').

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::forward::{self, Forward};
use super::tun::{DeviceCheck, HostDevice, TenantOnDevice};
use super::tunnel::{self, Command, HostLink, News, TaggedEvent, TunnelSnapshot};
use crate::control::model::{Client, Router};
use crate::control::{Id, Tenant};
use crate::core::budget::HandshakeBudget;
use crate::core::engine::{EngineError, Explanation, PeerStatus, Stranger, TunnelEngine};
use crate::core::peer::PeerConfig;

/// Events from every tunnel.
pub type TunnelEvent = TaggedEvent;

/// How long a tunnel task may take to answer a question (a snapshot, a
/// peer's status): the API and scrapes ask under the control lock, which a
/// task stuck by a bug must not hold for good.
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a tunnel task may take to take a change (a full peer set of a
/// large tenant included).
pub const CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the supervisor's pass waits for a tunnel that did not take a
/// change to show that it answers again, before handing it the whole peer
/// set: a task that answers at all answers a question within a turn (a
/// millisecond), and a stuck one then holds the pass, and the control lock,
/// this long rather than [`CHANGE_WAIT`] every few seconds.
pub const PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Why the runtime could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The tunnel's UDP port could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A forward's TCP listener could not be bound.
    #[error("cannot listen on TCP {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The tunnel task is gone.
    #[error("tunnel task of {0} is not running")]
    TaskGone(String),
    /// The tunnel task did not answer within [`ANSWER_WAIT`], or take a
    /// change within [`CHANGE_WAIT`] (a task stuck by a bug).
    #[error("tunnel task of {tenant} did not answer within {} s", waited.as_secs())]
    NotAnswering {
        tenant: String,
        waited: std::time::Duration,
    },
    /// The TUN device refused an address or route.
    #[error(transparent)]
    Tun(#[from] super::tun::TunError),
    /// The tunnel took its peers, but the host refused a route to one of the
    /// tenant's client pools (the supervisor tries it again).
    #[error("the host has no route to a client pool yet: {0}")]
    PoolRoute(#[source] super::tun::TunError),
    /// The engine refused the peer set.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Forwards are carried by the userspace stack, which TUN mode does without.
    #[error("forwards need the userspace stack; in TUN mode the host reaches routers by route")]
    NoStack,
}

struct Handle {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    local_addr: SocketAddr,
    work: Arc<Notify>,
    /// Management forwards into this tunnel, by (router id, router port).
    forwards: HashMap<(Id, u16), Forward>,
    /// TUN mode: where host packets for this tunnel go, and what is routed here.
    host_packets: Option<mpsc::Sender<Vec<u8>>>,
    /// TUN mode: the device carries the tenant's IPv6 network too.
    host_v6: bool,
    server: std::net::Ipv4Addr,
    subnet: ipnet::Ipv4Net,
    pools: Vec<ipnet::Ipv4Net>,
}

impl Handle {
    /// A listener on `listen` whose connections this tunnel carries to `target`.
    async fn open_forward(
        &self,
        listen: SocketAddr,
        target: SocketAddrV4,
    ) -> std::io::Result<forward::Forward> {
        forward::start(
            listen,
            target,
            self.commands.clone(),
            Arc::clone(&self.work),
        )
        .await
    }
}

/// How tunnels are run.
#[derive(Clone)]
pub struct RuntimeSettings {
    /// Underlay address the sockets bind to.
    pub bind: IpAddr,
    /// Keepalive the appliance sends, if any.
    pub keepalive: Option<u16>,
    /// Silence after which a peer counts as gone.
    pub liveness_timeout: std::time::Duration,
    /// Handshake initiations per second and tunnel answered before cookie replies.
    pub handshakes_per_second: u32,
    /// Handshakes per second the whole process computes, across all tunnels.
    pub handshake_budget_per_second: u32,
    /// TUN mode: the host device. Without it, each tunnel's server address is
    /// served by the userspace stack.
    pub host: Option<Arc<HostDevice>>,
}

#[cfg(test)]
impl RuntimeSettings {
    /// Tests' settings: sockets on 127.0.0.1, userspace mode.
    pub(crate) fn loopback() -> Self {
        Self {
            bind: [127, 0, 0, 1].into(),
            keepalive: None,
            liveness_timeout: std::time::Duration::from_secs(60),
            handshakes_per_second: 1_000,
            handshake_budget_per_second: 2_000,
            host: None,
        }
    }
}

/// The running tunnels.
pub struct Runtime {
    settings: RuntimeSettings,
    /// Shared by every tunnel's engine.
    budget: Arc<HandshakeBudget>,
    tunnels: HashMap<Id, Handle>,
    events: broadcast::Sender<TunnelEvent>,
    /// TUN mode: the device was up at the last [`Runtime::repair_host`].
    host_up: bool,
    /// Per tenant, how often its tunnel task ended by itself (a bug, a socket
    /// that failed) and was cleared away for a restart.
    failures: HashMap<Id, u64>,
    /// Tunnels that did not take a change within [`CHANGE_WAIT`]: they may
    /// hold an older peer set than the registry's until a full one is taken
    /// ([`Runtime::unsynced`], which the supervisor sends again).
    unsynced: std::sync::Mutex<std::collections::BTreeSet<Id>>,
    /// Where the tunnels' tasks run and their sockets are registered: the
    /// tokio runtime [`Runtime::new`] was called in.
    tasks: tokio::runtime::Handle,
}

impl Runtime {
    /// A runtime with no tunnels yet.
    ///
    /// Call it within the tokio runtime the tunnels are to run on: their
    /// tasks and sockets go there, wherever a change is asked from. (The
    /// management forwards run where they are asked for.)
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(settings: RuntimeSettings) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            tasks: tokio::runtime::Handle::current(),
            budget: Arc::new(HandshakeBudget::new(settings.handshake_budget_per_second)),
            settings,
            tunnels: HashMap::new(),
            events,
            host_up: true,
            failures: HashMap::new(),
            unsynced: Default::default(),
        }
    }

    /// The tunnels that did not take a change in time (see `unsynced`).
    pub fn unsynced(&self) -> Vec<Id> {
        self.unsynced
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Notes whether tunnel `id` holds the registry's peer set.
    fn set_synced(&self, id: &Id, synced: bool) {
        if let Ok(mut set) = self.unsynced.lock() {
            if synced {
                set.remove(id);
            } else {
                set.insert(id.clone());
            }
        }
    }

    /// How often `id`'s tunnel task ended by itself since the start.
    pub fn failures(&self, id: &Id) -> u64 {
        self.failures.get(id).copied().unwrap_or(0)
    }

    /// Subscribes to peer events of every tunnel.
    pub fn subscribe(&self) -> broadcast::Receiver<TunnelEvent> {
        self.events.subscribe()
    }

    /// The address a tunnel's socket is bound to.
    pub fn local_addr(&self, id: &Id) -> Option<SocketAddr> {
        self.tunnels.get(id).map(|h| h.local_addr)
    }

    /// True when the tenant's tunnel task runs (false: never started, stopped,
    /// or ended).
    pub fn is_running(&self, id: &Id) -> bool {
        self.tunnels.get(id).is_some_and(|h| !h.task.is_finished())
    }

    /// Makes the tenant's tunnel task deaf to commands, as a task stuck by a
    /// bug would be: it runs on with the returned sender, and commands wait
    /// in the returned queue.
    #[cfg(test)]
    pub(crate) fn wedge_task(
        &mut self,
        id: &Id,
    ) -> Option<(mpsc::Sender<Command>, mpsc::Receiver<Command>)> {
        let (commands, queue) = mpsc::channel(1);
        let old = std::mem::replace(&mut self.tunnels.get_mut(id)?.commands, commands);
        Some((old, queue))
    }

    /// Lets a task made deaf by [`Self::wedge_task`] hear `commands` again.
    #[cfg(test)]
    pub(crate) fn unwedge_task(&mut self, id: &Id, commands: mpsc::Sender<Command>) {
        if let Some(h) = self.tunnels.get_mut(id) {
            h.commands = commands;
        }
    }

    /// Ends the tenant's tunnel task as a bug (a panic) would: its handle stays.
    #[cfg(test)]
    pub(crate) fn end_task(&self, id: &Id) {
        if let Some(h) = self.tunnels.get(id) {
            h.task.abort();
        }
    }

    /// Makes the tenant's tunnel run with everything it carries: syncs a
    /// running one; starts one that is not running, with its peers and its
    /// routers' forwards. A forward that cannot be opened is logged, not an
    /// error: the tunnel runs without it.
    pub async fn bring_up(&mut self, tenant: &Tenant) -> Result<(), RuntimeError> {
        if self.is_running(&tenant.id) {
            return self.sync(tenant).await;
        }
        let started = self.start(tenant).await;
        // A peer the engine refused does not keep the others' forwards closed.
        if !self.is_running(&tenant.id) {
            return started;
        }
        for (router, port, e) in self.open_forwards(tenant).await {
            tracing::error!(tenant = %tenant.id, %router, port, error = %e, "forward could not be opened");
        }
        started
    }

    /// Opens the forwards of `tenant`'s routers that are not open (all of them
    /// after a start; later, the ones whose port was taken); returns those
    /// that could not be opened: (router, port, why).
    pub async fn open_forwards(&mut self, tenant: &Tenant) -> Vec<(Id, u16, RuntimeError)> {
        let mut failed = Vec::new();
        for router in tenant.routers.values() {
            for (port, listen) in &router.forwards {
                if self.forward_listen(&tenant.id, &router.id, *port).is_some() {
                    continue;
                }
                let target = SocketAddrV4::new(router.vpn_ip, *port);
                if let Err(e) = self
                    .set_forward(&tenant.id, &router.id, *port, *listen, target)
                    .await
                {
                    failed.push((router.id.clone(), *port, e));
                }
            }
        }
        failed
    }

    /// True in TUN mode (the host reaches the tunnels through a device).
    pub fn tun_mode(&self) -> bool {
        self.settings.host.is_some()
    }

    /// TUN mode: the host device's drops by reason (none without a device).
    pub fn host_drops(&self) -> Option<[(&'static str, u64); 6]> {
        self.settings.host.as_ref().map(|h| h.drops().counts())
    }

    /// False when the TUN device's reader has ended (true without a device).
    pub fn host_reading(&self) -> bool {
        self.settings.host.as_ref().is_none_or(|h| h.reading())
    }

    /// False when the TUN device was down at the last [`Runtime::repair_host`]
    /// (true without a device).
    pub fn host_up(&self) -> bool {
        self.host_up
    }

    /// TUN mode: checks the device and puts back the running tunnels'
    /// addresses and pool routes that the kernel dropped (the device was set
    /// down and up from outside). `None` without a device.
    pub async fn repair_host(&mut self) -> Option<Result<DeviceCheck, RuntimeError>> {
        let host = self.settings.host.as_ref()?;
        let on_device: Vec<TenantOnDevice<'_>> = self
            .tunnels
            .values()
            .filter(|h| h.host_packets.is_some())
            .map(|h| TenantOnDevice {
                server: h.server,
                subnet: h.subnet,
                v6: h.host_v6,
                pools: &h.pools,
            })
            .collect();
        let check = host.repair(&on_device).await;
        if let Ok(c) = &check {
            self.host_up = !matches!(c, DeviceCheck::Down);
        }
        Some(check.map_err(RuntimeError::from))
    }

    /// Binds the tunnel's socket and starts its task with the tenant's peers.
    pub async fn start(&mut self, tenant: &Tenant) -> Result<(), RuntimeError> {
        if self.is_running(&tenant.id) {
            return self.sync(tenant).await;
        }
        // An ended task leaves its handle (and in TUN mode its routes): clear
        // them before binding again.
        self.stop(&tenant.id).await;
        let addr = SocketAddr::new(self.settings.bind, tenant.listen_port);
        let socket = {
            let _on_tunnels = self.tasks.enter();
            super::udp::bind(addr).and_then(super::udp::register)
        }
        .map_err(|source| RuntimeError::Bind { addr, source })?;
        let local_addr = socket.get_ref().local_addr().unwrap_or(addr);
        // The server addresses: the userspace stack's, or in TUN mode the host
        // kernel's, which has the IPv6 one only where the device took it.
        let mut own = vec![IpAddr::V4(tenant.server_ip())];
        let mut link = HostLink::default();
        let mut host_packets = None;
        let host_v6 = match &self.settings.host {
            Some(host) => {
                let (tx, rx) = mpsc::channel(super::tun::HOST_QUEUE);
                let v6 = host.add_tenant(tenant.server_ip(), tenant.subnet, tx.clone())?;
                link = HostLink {
                    packets: Some(rx),
                    recycle: Some(host.recycler()),
                    device: Some(host.device()),
                    out: Default::default(),
                };
                host_packets = Some(tx);
                v6
            }
            None => false,
        };
        if self.settings.host.is_none() || host_v6 {
            own.push(IpAddr::V6(tenant.server_ipv6()));
        }
        let mut engine = TunnelEngine::new(tenant.secret.secret().clone(), own)
            .with_liveness_timeout(self.settings.liveness_timeout)
            .with_handshake_limit(self.settings.handshakes_per_second)
            .with_handshake_budget(Arc::clone(&self.budget))
            .with_subnet(tenant.subnet);
        if self.settings.host.is_none() {
            engine = engine.with_local_stack(
                tenant.server_ip(),
                tenant.subnet.prefix_len(),
                std::time::Instant::now(),
            );
        }
        let (commands, rx) = mpsc::channel(64);
        let work = Arc::new(Notify::new());
        // Whatever the task logs (its socket layer's too) names the tenant.
        let span = tracing::info_span!("tunnel", tenant = %tenant.id);
        let task = self.tasks.spawn(tracing::Instrument::instrument(
            tunnel::run(
                engine,
                socket,
                rx,
                self.events.clone(),
                Arc::from(tenant.id.as_str()),
                Arc::clone(&work),
                link,
            ),
            span,
        ));
        self.tunnels.insert(
            tenant.id.clone(),
            Handle {
                commands,
                task,
                local_addr,
                work,
                forwards: HashMap::new(),
                host_packets,
                host_v6,
                server: tenant.server_ip(),
                subnet: tenant.subnet,
                pools: Vec::new(),
            },
        );
        tracing::info!(tenant = %tenant.id, interface = %tenant.interface_name, %local_addr, "tunnel up");
        self.sync(tenant).await
    }

    /// Forgets what is counted of a deleted tenant's tunnel (its failures),
    /// so that a tenant created again under the same id starts from nothing.
    pub fn forget(&mut self, id: &Id) {
        self.failures.remove(id);
    }

    /// Stops a tunnel and closes its port. The event hub is told
    /// ([`News::Stopped`]), after everything the task said: it reports the
    /// peers it announced connected as disconnected, also when the task had
    /// ended by a bug and can say nothing more.
    pub async fn stop(&mut self, id: &Id) {
        self.set_synced(id, true);
        if let Some(h) = self.tunnels.remove(id) {
            if let Some(host) = &self.settings.host {
                host.remove_tenant(h.server, h.subnet);
                for pool in &h.pools {
                    host.remove_pool(*pool).await;
                }
            }
            // Closed, not only dropped: their ports are free when this returns,
            // so that a restart can bind them again at once.
            for (_, forward) in h.forwards {
                forward.close().await;
            }
            // Ended by itself, not by this stop: say how, and count it.
            let ended = h.task.is_finished();
            drop(h.commands);
            // The task ends when it sees the closed channel; abort covers a busy socket.
            h.task.abort();
            let result = h.task.await;
            if ended {
                *self.failures.entry(id.clone()).or_default() += 1;
                match result {
                    Err(e) if e.is_panic() => {
                        let panic = e.into_panic();
                        let message = panic
                            .downcast_ref::<&str>()
                            .copied()
                            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                            .unwrap_or("(no message)");
                        tracing::error!(tenant = %id, panic = message, "tunnel task panicked");
                    }
                    _ => tracing::warn!(tenant = %id, "tunnel task had ended"),
                }
            }
            let _ = self.events.send(TunnelEvent {
                tenant: Arc::from(id.as_str()),
                event: News::Stopped,
                at: std::time::SystemTime::now(),
            });
            tracing::info!(tenant = %id, "tunnel down");
        }
    }

    /// Opens (or re-targets) the forward from `listen` on the host to `target`,
    /// the port `port` of router `router` inside tenant `tenant`'s tunnel.
    pub async fn set_forward(
        &mut self,
        tenant: &Id,
        router: &Id,
        port: u16,
        listen: SocketAddr,
        target: SocketAddrV4,
    ) -> Result<SocketAddr, RuntimeError> {
        if self.settings.host.is_some() {
            return Err(RuntimeError::NoStack);
        }
        // A task that ended (until the supervisor's next pass starts it again)
        // would take no connection: the forward waits for the new task.
        let handle = self
            .tunnels
            .get_mut(tenant)
            .filter(|h| !h.task.is_finished())
            .ok_or_else(|| RuntimeError::TaskGone(tenant.to_string()))?;
        let key = (router.clone(), port);
        if let Some(f) = handle.forwards.get(&key).filter(|f| f.is_open()) {
            // `:0` keeps the port bound before, on the same address only: a
            // forward moved from 0.0.0.0 to 127.0.0.1 must stop listening on
            // every interface.
            let same_address = f.listen.ip() == listen.ip();
            if f.target == target && same_address && (f.listen == listen || listen.port() == 0) {
                return Ok(f.listen);
            }
        }
        // The old listener stays open unless the new one wants its port (its
        // very address, or another address on the same port, which the old
        // one may hold through a wildcard); then it is closed first, and
        // opened again should the new one fail.
        let reopen = match handle.forwards.get(&key) {
            Some(f)
                if f.listen == listen
                    || (listen.port() != 0 && f.listen.port() == listen.port()) =>
            {
                let old = (f.listen, f.target);
                if let Some(f) = handle.forwards.remove(&key) {
                    f.close().await;
                }
                Some(old)
            }
            _ => None,
        };
        match handle.open_forward(listen, target).await {
            Ok(forward) => {
                let bound = forward.listen;
                // Replacing the entry closes the old listener, if any.
                handle.forwards.insert(key, forward);
                Ok(bound)
            }
            Err(source) => {
                if let Some((old_listen, old_target)) = reopen {
                    match handle.open_forward(old_listen, old_target).await {
                        Ok(old) => {
                            handle.forwards.insert(key, old);
                        }
                        Err(e) => {
                            tracing::warn!(listen = %old_listen, error = %e, "forward could not be reopened");
                        }
                    }
                }
                Err(RuntimeError::Listen {
                    addr: listen,
                    source,
                })
            }
        }
    }

    /// Closes a forward; true if it existed.
    pub async fn remove_forward(&mut self, tenant: &Id, router: &Id, port: u16) -> bool {
        let forward = self
            .tunnels
            .get_mut(tenant)
            .and_then(|h| h.forwards.remove(&(router.clone(), port)));
        match forward {
            Some(f) => {
                f.close().await;
                true
            }
            None => false,
        }
    }

    /// The bound address of an open forward (none for one whose accept loop
    /// ended: the supervisor opens it again).
    pub fn forward_listen(&self, tenant: &Id, router: &Id, port: u16) -> Option<SocketAddr> {
        self.tunnels
            .get(tenant)?
            .forwards
            .get(&(router.clone(), port))
            .filter(|f| f.is_open())
            .map(|f| f.listen)
    }

    /// Pushes the tenant's current peers and egress policy to its task.
    pub async fn sync(&mut self, tenant: &Tenant) -> Result<(), RuntimeError> {
        let peers = self.sync_peers(tenant).await;
        // The host's routes to the pools after the peers, and whatever the
        // peers did: a route the kernel refuses costs the host its way to the
        // phones, not the tunnel its peers, and a refused peer does not leave
        // a pool routed that the tenant gave up. The supervisor tries a
        // missing route again ([`Runtime::pools_routed`]).
        let pools = self.sync_pools(tenant).await;
        peers.and(pools.map_err(RuntimeError::PoolRoute))
    }

    /// The peer half of [`Self::sync`]: the tunnel takes `tenant`'s whole peer
    /// set, egress policies and host routes; the tunnel counts as synced once
    /// it did.
    async fn sync_peers(&self, tenant: &Tenant) -> Result<(), RuntimeError> {
        let peers = tenant.peer_configs(self.settings.keepalive);
        let egress = tenant.egress_configs();
        // What the device routes back into the tunnel: the subnet, and the IPv6
        // network where the device carries it.
        let mut host_sources = Vec::new();
        if self.settings.host.is_some() {
            host_sources.push(ipnet::IpNet::V4(tenant.subnet));
            if self.tunnels.get(&tenant.id).is_some_and(|h| h.host_v6) {
                host_sources.push(ipnet::IpNet::V6(tenant.server_net_v6()));
            }
        }
        let (reply, rx) = oneshot::channel();
        let peers = self
            .ask(
                &tenant.id,
                Command::Sync {
                    peers,
                    egress,
                    // Host prefixes only mean something with a host device.
                    host_prefixes: if self.settings.host.is_some() {
                        tenant.host_prefixes.clone()
                    } else {
                        Vec::new()
                    },
                    host_sources,
                    reply,
                },
                rx,
            )
            .await
            .and_then(|taken| taken.map(|_| ()).map_err(RuntimeError::from));
        if peers.is_ok() {
            self.set_synced(&tenant.id, true);
        }
        peers
    }

    /// True while tunnel `id` may lack a change it was sent (see `unsynced`).
    fn is_unsynced(&self, id: &Id) -> bool {
        self.unsynced.lock().map_or(true, |set| set.contains(id))
    }

    /// TUN mode: true when the host routes exactly the tenant's pools into its
    /// running tunnel (always true without a device or a running tunnel).
    pub fn pools_routed(&self, tenant: &Tenant) -> bool {
        let Some(h) = self.tunnels.get(&tenant.id) else {
            return true;
        };
        if self.settings.host.is_none() || h.host_packets.is_none() {
            return true;
        }
        let wanted: Vec<ipnet::Ipv4Net> = tenant.egress.iter().map(|e| e.pool).collect();
        h.pools.len() == wanted.len() && wanted.iter().all(|p| h.pools.contains(p))
    }

    /// TUN mode: routes the tenant's client pool into the host device.
    async fn sync_pools(&mut self, tenant: &Tenant) -> Result<(), super::tun::TunError> {
        let (Some(host), Some(handle)) = (&self.settings.host, self.tunnels.get_mut(&tenant.id))
        else {
            return Ok(());
        };
        let wanted: Vec<ipnet::Ipv4Net> = tenant.egress.iter().map(|e| e.pool).collect();
        if wanted == handle.pools {
            return Ok(());
        }
        // `handle.pools` says what is on the device at every step, so that a
        // failure half-way leaves nothing unaccounted for (a route left behind
        // at stop, or one removed later that another tenant took meanwhile).
        let gone: Vec<ipnet::Ipv4Net> = handle
            .pools
            .iter()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for pool in gone {
            host.remove_pool(pool).await;
            handle.pools.retain(|p| *p != pool);
        }
        if let Some(tx) = &handle.host_packets {
            for pool in wanted {
                if !handle.pools.contains(&pool) {
                    host.add_pool(pool, tenant.server_ip(), tx.clone()).await?;
                    handle.pools.push(pool);
                }
            }
        }
        Ok(())
    }

    /// What the tunnel would do with a packet from `src` to `dst`.
    pub async fn explain(
        &self,
        id: &Id,
        src: IpAddr,
        dst: IpAddr,
    ) -> Result<Explanation, RuntimeError> {
        let (reply, rx) = oneshot::channel();
        self.ask(id, Command::Explain { src, dst, reply }, rx).await
    }

    /// The keys initiations to `id`'s tunnel carried that are no peer of it,
    /// the most recent first.
    pub async fn strangers(&self, id: &Id) -> Result<Vec<Stranger>, RuntimeError> {
        let (reply, rx) = oneshot::channel();
        self.ask(id, Command::Strangers { reply }, rx).await
    }

    /// Adds or updates one peer of a running tunnel whose key did not change
    /// (a new router or client, or new addresses for one): O(log n) in the
    /// tunnel's peers, where [`Self::sync`] re-sends all of them.
    pub async fn upsert_router(
        &self,
        tenant: &Tenant,
        router: &Router,
    ) -> Result<(), RuntimeError> {
        self.upsert_peer(tenant, router.peer_config(self.settings.keepalive))
            .await
    }

    /// Like [`Self::upsert_router`], for a client.
    pub async fn upsert_client(
        &self,
        tenant: &Tenant,
        client: &Client,
    ) -> Result<(), RuntimeError> {
        self.upsert_peer(tenant, client.peer_config(self.settings.keepalive))
            .await
    }

    async fn upsert_peer(
        &self,
        tenant: &Tenant,
        peer: (PeerConfig, u32),
    ) -> Result<(), RuntimeError> {
        // A tunnel that may have lost an earlier change takes the whole peer
        // set instead: one change applied over a lost one could leave the two
        // at odds (a deleted phone kept while its egress policy went).
        if self.is_unsynced(&tenant.id) {
            return self.sync_peers(tenant).await;
        }
        let (reply, rx) = oneshot::channel();
        let egress = tenant.egress_configs();
        self.ask(
            &tenant.id,
            Command::Upsert {
                peer,
                egress,
                reply,
            },
            rx,
        )
        .await?
        .map_err(RuntimeError::from)
    }

    /// Removes one peer (by key) from a running tunnel, where the tenant no
    /// longer has it: O(log n) in the tunnel's peers, where [`Self::sync`]
    /// re-sends all of them.
    pub async fn remove_peer(&self, tenant: &Tenant, key: [u8; 32]) -> Result<(), RuntimeError> {
        // As in `upsert_peer`: over a lost change, the whole set.
        if self.is_unsynced(&tenant.id) {
            return self.sync_peers(tenant).await;
        }
        let (reply, rx) = oneshot::channel();
        let egress = tenant.egress_configs();
        self.ask(&tenant.id, Command::Remove { key, egress, reply }, rx)
            .await
    }

    /// One peer's status, if the tunnel has it.
    pub async fn peer_status(
        &self,
        id: &Id,
        key: [u8; 32],
    ) -> Result<Option<PeerStatus>, RuntimeError> {
        let (reply, rx) = oneshot::channel();
        self.ask(id, Command::PeerStatus { key, reply }, rx).await
    }

    /// Whether tunnel `id`'s task answers a question (one peer's status)
    /// within [`PROBE_WAIT`].
    pub async fn answers(&self, id: &Id) -> bool {
        let Some(handle) = self.tunnels.get(id) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        let asked = async {
            let command = Command::PeerStatus {
                key: [0; 32],
                reply,
            };
            handle.commands.send(command).await.is_ok() && rx.await.is_ok()
        };
        tokio::time::timeout(PROBE_WAIT, asked)
            .await
            .unwrap_or(false)
    }

    /// Peer statuses and counters of one tunnel.
    pub async fn snapshot(&self, id: &Id) -> Result<TunnelSnapshot, RuntimeError> {
        let (reply, rx) = oneshot::channel();
        self.ask(id, Command::Snapshot { reply }, rx).await
    }

    /// Hands `command` to tunnel `id`'s task and waits for its answer on
    /// `rx`: within [`CHANGE_WAIT`] for a change, [`ANSWER_WAIT`] for the rest.
    async fn ask<T>(
        &self,
        id: &Id,
        command: Command,
        rx: oneshot::Receiver<T>,
    ) -> Result<T, RuntimeError> {
        let change = matches!(
            command,
            Command::Sync { .. } | Command::Upsert { .. } | Command::Remove { .. }
        );
        let waited = if change { CHANGE_WAIT } else { ANSWER_WAIT };
        let gone = || RuntimeError::TaskGone(id.to_string());
        let handle = self.tunnels.get(id).ok_or_else(gone)?;
        let asked = async {
            handle.commands.send(command).await.map_err(|_| gone())?;
            rx.await.map_err(|_| gone())
        };
        tokio::time::timeout(waited, asked)
            .await
            .unwrap_or_else(|_| {
                // Queued or not, the change may never be taken: the supervisor
                // sends the whole peer set again until one is.
                if change {
                    self.set_synced(id, false);
                }
                Err(RuntimeError::NotAnswering {
                    tenant: id.to_string(),
                    waited,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::TenantRequest;
    use crate::control::registry::AllocPolicy;
    use crate::control::Registry;

    /// A tunnel started from another runtime (the admin API's) runs on the
    /// one its `Runtime` was made in, with its socket registered there: it
    /// reads datagrams while nothing drives the runtime it was started from.
    #[test]
    fn tunnels_run_where_their_runtime_was_made() {
        let tunnels = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut runtime = {
            let _on_tunnels = tunnels.enter();
            Runtime::new(RuntimeSettings::loopback())
        };
        let id = Id::parse("acme", "id").unwrap();
        let (registry, _) = api.block_on(running_tenant(&mut runtime, &id, |_| {}));
        let tenant = registry.tenant(&id).unwrap().clone();
        api.block_on(async {
            let here = tokio::runtime::Handle::current().metrics();
            assert_eq!(here.num_alive_tasks(), 0, "nothing runs on the API's");
        });
        assert_eq!(tunnels.metrics().num_alive_tasks(), 1, "the tunnel's task");

        // The API's runtime is idle now: the tunnel still reads.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(&[1; 32], ("127.0.0.1", tenant.listen_port))
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let snapshot = tunnels.block_on(runtime.snapshot(&id)).unwrap();
            if snapshot.stats.rx_datagrams >= 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never read");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tunnels.block_on(runtime.stop(&id));
    }

    /// A registry with tenant `id` (made ready by `prepare`), whose tunnel
    /// `runtime` runs. A port free when probed may be taken before the tunnel
    /// binds it: then the next one.
    async fn running_tenant(
        runtime: &mut Runtime,
        id: &Id,
        prepare: impl Fn(&mut Registry),
    ) -> (Registry, u16) {
        for _ in 0..20 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .unwrap()
                .port();
            let policy = AllocPolicy {
                first_port: port,
                ..AllocPolicy::default()
            };
            let mut registry = Registry::new(policy, 5);
            let request = TenantRequest::default();
            registry
                .put_tenant(id, &request, std::time::SystemTime::now())
                .unwrap();
            prepare(&mut registry);
            match runtime.bring_up(registry.tenant(id).unwrap()).await {
                Ok(()) => return (registry, port),
                Err(RuntimeError::Bind { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port");
    }

    /// A change that comes after one the tunnel may have lost (it did not
    /// answer in time) hands over the whole peer set, not itself alone:
    /// applied over the lost one, it could leave the tunnel with a phone whose
    /// egress policy is gone.
    #[tokio::test]
    async fn a_change_after_a_lost_one_hands_over_the_whole_peer_set() {
        use crate::control::model::{ClientRequest, EgressRequest, RouterRequest};
        let mut runtime = Runtime::new(RuntimeSettings::loopback());
        let id = Id::parse("acme", "id").unwrap();
        let router = || {
            let key = crate::keys::SecretKey::generate().public();
            RouterRequest {
                public_key: Some(crate::keys::encode(key.as_bytes())),
                ..RouterRequest::default()
            }
        };
        let (mut registry, _) = running_tenant(&mut runtime, &id, |r| {
            r.put_router(&id, &Id::parse("gw", "id").unwrap(), &router())
                .unwrap();
            let egress = EgressRequest {
                pool: "10.200.0.0/24".into(),
                gateways: vec!["gw".into()],
            };
            r.put_egress(&id, &egress).unwrap();
            let phone = ClientRequest {
                public_key: router().public_key,
                ..ClientRequest::default()
            };
            r.put_client(&id, &Id::parse("phone", "id").unwrap(), &phone)
                .unwrap();
        })
        .await;
        let keys = |snapshot: TunnelSnapshot| {
            let mut keys: Vec<[u8; 32]> = snapshot.peers.iter().map(|p| p.public_key).collect();
            keys.sort();
            keys
        };
        let registered = |registry: &Registry| {
            let mut keys: Vec<[u8; 32]> = registry
                .tenant(&id)
                .unwrap()
                .peer_configs(None)
                .iter()
                .map(|(c, _)| *c.public_key.as_bytes())
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(runtime.snapshot(&id).await.unwrap()).len(), 2);

        // The phone's removal and the policy's are lost on their way.
        registry
            .delete_client(&id, &Id::parse("phone", "id").unwrap())
            .unwrap();
        registry.delete_egress(&id).unwrap();
        runtime.set_synced(&id, false);

        // The next change, a new router, brings the tunnel to the registry's set.
        registry
            .put_router(&id, &Id::parse("r2", "id").unwrap(), &router())
            .unwrap();
        let tenant = registry.tenant(&id).unwrap().clone();
        let r2 = &tenant.routers[&Id::parse("r2", "id").unwrap()];
        runtime.upsert_router(&tenant, r2).await.unwrap();
        let held = keys(runtime.snapshot(&id).await.unwrap());
        assert_eq!(
            held,
            registered(&registry),
            "the phone is gone, r2 is there"
        );
        assert!(runtime.unsynced().is_empty());

        // So does a removal: the gateway's, lost, goes with r2's.
        let gone = registry
            .delete_router(&id, &Id::parse("r2", "id").unwrap())
            .unwrap();
        registry
            .delete_router(&id, &Id::parse("gw", "id").unwrap())
            .unwrap();
        runtime.set_synced(&id, false);
        let tenant = registry.tenant(&id).unwrap().clone();
        runtime
            .remove_peer(&tenant, *gone.public_key.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            keys(runtime.snapshot(&id).await.unwrap()),
            Vec::<[u8; 32]>::new()
        );
        runtime.stop(&id).await;
    }
}
