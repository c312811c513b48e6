//! `wgplane run`: start-up in order (state lock, secrets, state, tunnels, API),
//! the background tasks, and the graceful stop on a signal.
//!
//! Left out: the work of every part, which is the library's; this wires them
//! together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{broadcast, mpsc, Mutex};

use wgplane::api::{self, AppState, Control};
use wgplane::config::{LogFormat, Settings};
use wgplane::control::registry::{AllocPolicy, Registry};
use wgplane::control::Id;
use wgplane::io::tun::HostDevice;
use wgplane::io::{events, Runtime, RuntimeSettings};
use wgplane::store::files::StateLock;
use wgplane::store::{Change, Store};

use crate::cli::{settings, RunArgs};
use crate::secrets::{load_master_key, load_or_create_token};
use crate::{init_logging, own_files_only};

/// `wgplane run`: the appliance, until SIGTERM or Ctrl-C.
pub(crate) fn run_appliance(args: RunArgs) -> Result<()> {
    let settings = settings(&args)?;
    init_logging(settings.log.format);
    // Everything the appliance creates (state directory, database and its
    // journal, token, master key) is its own alone: directories 0700,
    // files 0600.
    own_files_only();
    // The tunnels run on threads of their own, under SCHED_BATCH (when on);
    // the admin API, the background tasks and the management forwards on the
    // default policy, so that an answer's own wake-ups do not wait a scheduler
    // tick behind other work (the tunnel's acknowledgement of a change still
    // is a tunnel thread's wake-up).
    let batch = settings.tunnels.batch_scheduling;
    let tunnels = tokio::runtime::Builder::new_multi_thread()
        .thread_name("wgplane-tunnels")
        .on_thread_start(move || {
            if batch {
                batch_scheduling();
            }
        })
        .enable_all()
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let format = settings.log.format;
    let result = runtime.block_on(run(settings, tunnels.handle().clone()));
    // Blocking work still under way (a scrape's render, say) does not hold
    // the exit up beyond the grace period.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    tunnels.shutdown_timeout(TUNNELS_GRACE);
    // With JSON logs the reason the appliance stops is a JSON line too, for
    // the collector that reads the others; in text it is printed as it is.
    if let (Err(e), LogFormat::Json) = (&result, format) {
        tracing::error!(error = %format!("{e:#}"), "stopped: fatal error");
        std::process::exit(1);
    }
    result
}

/// `SCHED_BATCH` for this thread and every thread it creates (the tunnels'
/// runtime calls it as each of its threads starts; `wgplane relay` before its
/// runtime exists); refused, the default policy stays.
pub(crate) fn batch_scheduling() {
    if let Err(e) = wgplane::io::sched::batch_scheduling() {
        tracing::warn!(error = %e, "SCHED_BATCH refused; the default scheduling policy stays");
    }
}

/// On every SIGHUP, reads the API token file again: a new token is taken at
/// once (requests with the old one get 401); an unreadable or empty file
/// keeps the old token, and says so.
pub(crate) async fn reload_token_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    state: Arc<AppState>,
    path: PathBuf,
) {
    while hangups.recv().await.is_some() {
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await
        };
        match read {
            Ok(Ok(text)) if !text.trim().is_empty() => {
                state.token.replace(text.trim().to_owned());
                tracing::info!(path = %path.display(), "SIGHUP: API token read again");
            }
            Ok(Ok(_)) => tracing::error!(path = %path.display(),
                "SIGHUP: the API token file is empty; the token is unchanged"),
            Ok(Err(e)) => tracing::error!(path = %path.display(), error = %e,
                "SIGHUP: the API token file cannot be read; the token is unchanged"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: the token was not read"),
        }
    }
}

/// Adds the config file's `[[forwards]]` to the registry (and the store).
pub(crate) fn apply_config_forwards(
    settings: &Settings,
    registry: &mut Registry,
    store: &mut Store,
) -> Result<()> {
    for f in &settings.forwards {
        // The ids were checked with the config file; a tenant or router that the
        // API has removed since is only warned about, so that the appliance
        // still starts.
        let (Ok(t), Ok(r)) = (
            Id::parse(&f.tenant, "tenant"),
            Id::parse(&f.router, "router"),
        ) else {
            continue;
        };
        // `:0` asks for any free port: the one bound at an earlier start
        // (recorded then, see `record_bound_forwards`) is kept.
        let stored = registry
            .tenant(&t)
            .ok()
            .and_then(|tenant| tenant.routers.get(&r))
            .and_then(|router| router.forwards.get(&f.port));
        if stored.is_some_and(|s| f.listen.port() == 0 && s.ip() == f.listen.ip()) {
            continue;
        }
        match registry.put_forward(&t, &r, f.port, f.listen) {
            // A store that refuses costs this forward's record, not the start:
            // the forward runs from the registry all the same.
            Ok(_) => {
                if let Err(e) = store.apply(&[Change::Forward(&t, &r, f.port, f.listen)]) {
                    tracing::warn!(tenant = %t, router = %r, port = f.port, error = %e,
                        "config forward not stored; it runs from the config");
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %t, router = %r, port = f.port, error = %e, "config forward skipped")
            }
        }
    }
    Ok(())
}

/// The appliance on the current runtime (API, background tasks), its tunnels
/// on `tunnels`.
pub(crate) async fn run(settings: Settings, tunnels: tokio::runtime::Handle) -> Result<()> {
    let started = std::time::SystemTime::now();
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut stop_requested = catch_stop_signals(Arc::clone(&serving));
    // SIGHUP re-reads the API token; caught from the start, so that one sent
    // during start-up does not end the process (its default), and acted on
    // once the API serves.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot catch SIGHUP")?;
    // Held until the process ends: a second appliance on this directory would
    // keep its own registry over the same database.
    let _lock = StateLock::acquire(&settings.state.dir)?;
    tidy_state_dir(&settings)?;
    let token = load_or_create_token(&settings.token_file())?;
    if settings.tunnels.public_host == "vpn.example.com" {
        tracing::warn!("tunnels.public_host is the placeholder vpn.example.com: set it to the address peers dial");
    }
    if let Some(why) = settings.tunnels.public_host_mismatch() {
        tracing::warn!("{why}");
    }
    let master = load_master_key(&settings)?;
    let (mut store, mut registry) = open_state(&settings, master)?;
    let mut runtime = start_runtime(&settings, &tunnels)?;
    let engine_events = runtime.subscribe();
    apply_config_forwards(&settings, &mut registry, &mut store)?;
    bring_up_all(&mut runtime, &registry, &settings).await;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let state = Arc::new(AppState {
        control: Mutex::new(Control {
            registry,
            runtime,
            store: std::sync::Mutex::new(store),
        }),
        token: api::Token::new(token),
        metrics_need_token: settings.api.metrics_need_token,
        metrics_per_peer: settings.api.metrics_per_peer,
        public_host: settings.tunnels.public_host.clone(),
        events: broadcast::channel(1024).0,
        event_stats: Arc::default(),
        api_requests: Default::default(),
        scraping: Default::default(),
        last_health: Default::default(),
        stopping,
        started,
    });
    tokio::spawn(reload_token_on_hangup(
        hangups,
        Arc::clone(&state),
        settings.token_file(),
    ));
    state.control.lock().await.record_bound_forwards();
    let mut background = Background::start(&settings, &state, engine_events);
    let listener = tokio::net::TcpListener::bind(settings.api.listen)
        .await
        .with_context(|| format!("cannot bind the admin API on {}", settings.api.listen))?;
    tracing::info!(listen = %settings.api.listen, token_file = %settings.token_file().display(), "admin API up");
    let mut signalled = state.stopping.clone();
    serving.store(true, std::sync::atomic::Ordering::SeqCst);
    let listener = api::server::Capped::new(listener, api::server::MAX_CONNECTIONS);
    let serve = api::server::serve(listener, api::router(Arc::clone(&state)), async move {
        let _ = stop_requested.wait_for(|asked| *asked).await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    // Requests still open after the grace period do not hold the exit up.
    let overdue = async move {
        let _ = signalled.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let mut failed = None;
    tokio::select! {
        () = serve => {},
        () = overdue => tracing::warn!(grace_secs = SHUTDOWN_GRACE.as_secs(), "requests still open after the grace period"),
        why = background.first_to_end() => failed = Some(why),
    }
    // Every change holds the control lock until it is stored and applied:
    // with the lock, none is half-way. It is never given back, so that a change
    // still waiting for it (a detached one) cannot start while the runtime is
    // being torn down, and be cut off after it was stored.
    match tokio::time::timeout(CHANGE_GRACE, state.control.lock()).await {
        Ok(held) => std::mem::forget(held),
        Err(_) => tracing::warn!("a change was still running at exit: its client got no answer, and it may or may not be stored"),
    }
    tracing::info!("stopped");
    match failed {
        Some(why) => anyhow::bail!("a background task stopped: {why}"),
        None => Ok(()),
    }
}

/// Catches the stop signals from the start: as PID 1 (a container) a process
/// without a handler ignores SIGTERM. Before the API serves (`serving`), a
/// stop ends the process at once, as a kill would (the state survives one by
/// design); after, the returned flag asks for the graceful stop, and a second
/// signal ends the process at once.
fn catch_stop_signals(
    serving: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::sync::watch::Receiver<bool> {
    let (stop_asked, stop_requested) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        if !serving.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!("stopped during start-up");
            std::process::exit(0);
        }
        let _ = stop_asked.send(true);
        // A second signal does not wait for the graceful stop: an operator
        // who presses Ctrl-C again means now (every stored change is on
        // disk already; a kill loses nothing).
        shutdown_signal().await;
        tracing::warn!("stopped at once: a second signal");
        std::process::exit(130);
    });
    stop_requested
}

/// Warns about a state directory open to others, and removes what a kill
/// inside an earlier start's key or token write left (no second copy of a
/// key stays).
fn tidy_state_dir(settings: &Settings) -> Result<()> {
    // Made 0700 when the appliance creates it; one made before (a volume, a
    // `mkdir` in an image) keeps its mode, which the operator should know of.
    if let Ok(meta) = std::fs::metadata(&settings.state.dir) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %settings.state.dir.display(), mode = format!("{:o}", mode & 0o777),
                "the state directory is open to other users (its files are 0600): chmod 700 it");
        }
    }
    for path in [settings.token_file(), settings.master_key_file()] {
        wgplane::store::files::remove_temporaries_of(&path)?;
    }
    Ok(())
}

/// Opens (and migrates) the state database, and takes its tenants back into
/// a registry; stored tenants whose host prefixes look wrong are warned about.
fn open_state(settings: &Settings, master: wgplane::store::MasterKey) -> Result<(Store, Registry)> {
    let database = settings.database();
    let store = Store::open(&database, master)
        .with_context(|| format!("cannot open {}", database.display()))?;
    let tenants = store
        .load()
        .with_context(|| format!("cannot load {}", database.display()))?;
    for tenant in &tenants {
        for why in wgplane::control::restore::warnings(tenant) {
            tracing::warn!(tenant = %tenant.id, problem = %why, "stored tenant: fix it through the API (host_prefixes)");
        }
        let public_host = &settings.tunnels.public_host;
        if let Some((net, address)) =
            wgplane::control::restore::holding_public_address(&tenant.host_prefixes, public_host)
        {
            tracing::warn!(tenant = %tenant.id, prefix = %net, public_address = %address,
                "stored tenant: a host prefix holds the appliance's public address, so routers \
                 would route their tunnel into itself: fix it through the API (host_prefixes)");
        }
    }
    let registry = Registry::restore(
        AllocPolicy::from(&settings.tunnels),
        rand_core::RngCore::next_u32(&mut rand_core::OsRng),
        tenants,
    )
    .with_context(|| format!("cannot take back the state in {}", database.display()))?;
    Ok((store, registry))
}

/// The tunnels' runtime, with the TUN device in TUN mode, and the open-files
/// limit raised for its sockets. Its tasks, sockets and device run on
/// `tunnels`; the device's netlink connection (routes and addresses, for
/// changes and the periodic check) on the current runtime, the API's.
fn start_runtime(settings: &Settings, tunnels: &tokio::runtime::Handle) -> Result<Runtime> {
    let control = tokio::runtime::Handle::current();
    let _on_tunnels = tunnels.enter();
    let host = if settings.tun.enabled {
        let device = HostDevice::open_on(&settings.tun.name, settings.tun.mtu, &control).context(
            "TUN mode needs /dev/net/tun and CAP_NET_ADMIN (or set tun.enabled = false)",
        )?;
        Some(Arc::new(device))
    } else {
        None
    };
    // One socket per tunnel: a thousand tenants need more than the usual 1024.
    if let Some(open_files) = wgplane::io::limits::raise_open_files() {
        tracing::debug!(open_files, "open-files limit");
    }
    let t = &settings.tunnels;
    Ok(Runtime::new(RuntimeSettings {
        host,
        bind: t.bind,
        keepalive: (t.keepalive_secs > 0).then_some(t.keepalive_secs),
        liveness_timeout: Duration::from_secs(u64::from(t.liveness_timeout_secs)),
        handshakes_per_second: t.handshakes_per_second,
        handshake_budget_per_second: t.handshake_budget_per_second,
    }))
}

/// Starts every stored tunnel; one that cannot come up is down, not gone: the
/// supervisor tries it again, and `/healthz` says so.
async fn bring_up_all(runtime: &mut Runtime, registry: &Registry, settings: &Settings) {
    let mut restored = 0usize;
    for tenant in registry.tenants() {
        match runtime.bring_up(tenant).await {
            Ok(()) => restored += 1,
            Err(e) => tracing::error!(
                tenant = %tenant.id,
                error = %e,
                retry_secs = api::supervisor::RETRY.as_secs(),
                "tunnel could not be restored"
            ),
        }
    }
    tracing::info!(tunnels = restored, database = %settings.database().display(), "state restored");
}

/// The background tasks, which run as long as the process: one that ends (a
/// bug) stops the appliance with an error, for its supervisor (systemd, the
/// container's restart policy) to start it again from the store, rather than
/// leave it running without tunnels revived or events sent.
struct Background {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Background {
    /// The webhooks' deliverer (when there are URLs), the supervisor and the
    /// event hub.
    fn start(
        settings: &Settings,
        state: &Arc<AppState>,
        engine_events: broadcast::Receiver<wgplane::io::TunnelEvent>,
    ) -> Self {
        let mut this = Self {
            tasks: tokio::task::JoinSet::new(),
            names: std::collections::HashMap::new(),
        };
        let webhooks = (!settings.events.webhooks.is_empty()).then(|| {
            let (queue, rx) = mpsc::channel(settings.events.webhook_queue);
            this.spawn(
                "webhooks",
                events::run_webhooks(
                    rx,
                    settings.events.webhooks.clone(),
                    Duration::from_secs(u64::from(settings.events.webhook_timeout_secs)),
                    Arc::clone(&state.event_stats),
                ),
            );
            queue
        });
        this.spawn("supervisor", api::supervisor::run(Arc::clone(state)));
        this.spawn(
            "event hub",
            events::run_hub(
                engine_events,
                Arc::clone(state),
                state.events.clone(),
                webhooks,
                Arc::clone(&state.event_stats),
            ),
        );
        this
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Waits for the first task to end, and says which and how.
    async fn first_to_end(&mut self) -> String {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match ended {
            Ok((id, ())) => (id, "ended".to_owned()),
            Err(e) => (e.id(), e.to_string()),
        };
        let task = self.names.get(&id).copied().unwrap_or("background");
        tracing::error!(task, how = %how, "a background task stopped; exiting");
        format!("the {task} task: {how}")
    }
}

/// How long a shutdown waits for open requests before it goes on.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a shutdown then waits for a change under way to be stored.
pub(crate) const CHANGE_GRACE: Duration = Duration::from_secs(2);

/// How long the runtime's blocking work (a scrape's render, say) may hold the
/// exit up. With [`TUNNELS_GRACE`] the graces add up to 8.2 s, under the 10 s
/// that `docker stop` gives before SIGKILL.
pub(crate) const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// How long the tunnels' runtime may take to stop once the rest has: its
/// tasks end when their command channels close, and it runs no blocking work.
pub(crate) const TUNNELS_GRACE: Duration = Duration::from_millis(200);

/// Ctrl-C or SIGTERM, whichever comes first.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
