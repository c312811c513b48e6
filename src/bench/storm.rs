//! Handshake mode: routers across many tunnels send handshake initiations at a
//! fixed rate; the appliance answers each with a handshake response or, above
//! its configured load, with a cookie reply.
//!
//! Initiations are prepared before the measured window (each needs the sender's
//! own Diffie-Hellman work, which would otherwise compete with the appliance for
//! the same cores) in the order they will be sent, so every peer's timestamps
//! increase and none is refused as a replay. Each router sends from its own
//! socket, as real routers have their own endpoints. The responses are counted,
//! not completed: the appliance's work for a handshake is done when it answers.
//!
//! These storm routers never echo a cookie. `--patient N` adds routers that
//! behave like real WireGuard peers inside the storm: they keep the cookie from a
//! cookie reply and retry with it (after 1 s, where WireGuard waits 5), and the
//! report says how many got their handshake and how long it took.
//!
//! `--echoing N` adds routers that do what a botnet of real hosts can: echo
//! every cookie at once and start a new handshake as soon as one is answered. Their
//! initiations prove their addresses, so they get Diffie-Hellman work up to what
//! the appliance's budget and its per-source shares allow: the most handshake
//! work senders can cause. Their initiations are prepared before the window,
//! too (enough for the most a source may get, `ECHO_STOCK_PER_SECOND`), and
//! they write each cookie into them themselves ([`super::cookie`]), so that an
//! answered handshake costs the generator a send, a receive and a MAC: a
//! generator that made each initiation in the window (two Diffie-Hellman
//! operations) could not keep up with the appliance's budget on the core it
//! shares with a flow's generator. `--sources S` spreads all the routers' sockets over
//! S loopback addresses (127.77.0.1 up; Linux answers for all of 127.0.0.0/8),
//! as real routers have addresses of their own; with one, every router sends
//! from `host` and the appliance's per-source share (20 handshakes a second)
//! caps what cookie-proven routers get in all.
//!
//! With `--tenant`, the storm hits that one tenant's tunnel (say a KTN tunnel
//! whose public key every phone knows) from strangers: keys the appliance does
//! not know, so no initiation of theirs ends in a handshake.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::StaticSecret;
use serde::Serialize;

use super::cookie::{write_mac2, Cookie, CookieOpener, INITIATION_LEN};
use super::cpu::CpuMeter;
use super::{opt, Api, BenchError, BenchSpec, TunnelInfo};
use crate::core::sources::{PER_SOURCE_BURST, PER_SOURCE_PER_SECOND};

/// Initiations per second offered when `--rate` is 0.
pub const DEFAULT_RATE: u64 = 25_000;

/// Most routers in one storm (each has its own socket).
pub const MAX_ROUTERS: usize = 20_000;

/// Most initiations prepared for one run (about 150 bytes each).
const MAX_PREPARED: u64 = 2_000_000;

/// A patient router's wait for an answer before it retries (WireGuard's
/// REKEY_TIMEOUT is 5 s; shorter so that a run sees several tries), plus up to
/// WireGuard's 333 ms of jitter.
const PATIENT_RETRY: Duration = Duration::from_secs(1);
const PATIENT_JITTER_MS: u32 = 333;

/// Patient routers start this long into the storm, when it has the appliance
/// under load.
const PATIENT_START: Duration = Duration::from_secs(1);

/// An echoing router's wait for an answer before it initiates again, on
/// average: the appliance drops, without an answer, a cookie-proven initiation
/// that finds its budget or its source's share spent. Each wait is drawn from
/// half of it to one and a half: routers that all waited alike would stay in
/// step, and their initiations would keep arriving together, in bursts larger
/// than the budget's bucket (10 ms of handshakes), which then drops most of each
/// burst: with waits of exactly 100 ms, 200 routers got 530-740 handshakes a
/// second where the budget pays for 2,000.
const ECHO_WAIT: Duration = Duration::from_millis(100);

/// Initiations prepared per echoing router and second of the run: under load a
/// source gets at most 20 handshakes a second ([`PER_SOURCE_PER_SECOND`]), and
/// an echoing router whose initiation goes unanswered tries again after at
/// least half an [`ECHO_WAIT`], at most twenty times a second. One whose stock
/// runs out makes the rest in the window (counted in
/// [`EchoReport::live_initiations`]).
const ECHO_STOCK_PER_SECOND: f64 = PER_SOURCE_PER_SECOND + 20.0;

/// The first of the loopback addresses routers send from with `--sources`.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);

/// What a handshake run measured.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub tunnels: usize,
    pub peers_per_tunnel: usize,
    /// From the first initiation to the last answer.
    pub seconds: f64,
    pub offered_per_s: f64,
    pub sent_initiations: u64,
    /// Handshake responses received: handshakes the appliance completed.
    pub responses: u64,
    /// Cookie replies received: initiations the appliance refused under load.
    pub cookie_replies: u64,
    pub handshakes_per_s: f64,
    /// Initiations answered (response or cookie reply) per second.
    pub answered_per_s: f64,
    /// Initiations the appliance answered with a handshake response (its
    /// metrics; the storm's routers never complete a handshake).
    pub appliance_handshakes: u64,
    pub appliance_cpu_seconds: Option<f64>,
    pub appliance_cpu_us_per_handshake: Option<f64>,
    /// Appliance CPU per initiation it got, whatever the answer: the storm's,
    /// the patient routers' and the echoing routers' (their echoes included).
    pub appliance_cpu_us_per_initiation: Option<f64>,
    /// Appliance CPU over its busy time (from the first initiation to the last
    /// answer, or to the end of the echoing and patient routers' run, whichever
    /// is later): 1.0 is one core busy.
    pub appliance_cores: Option<f64>,
    /// The routers that retried with their cookie (`--patient`).
    pub patient: PatientReport,
    /// The routers that echoed cookies at once (`--echoing`).
    pub echoing: EchoReport,
    /// Loopback addresses the routers sent from.
    pub sources: usize,
    /// The storm's sending, in milliseconds since the Unix epoch.
    pub window_start_unix_ms: u64,
    pub window_end_unix_ms: u64,
}

/// What the echoing routers (address-proven load) got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EchoReport {
    pub routers: usize,
    /// Initiations they sent, each with the last cookie they got.
    pub initiations: u64,
    /// Initiations made in the window (two Diffie-Hellman operations each on
    /// the generator's cores) because a router used up those prepared for it.
    pub live_initiations: u64,
    pub cookie_replies: u64,
    /// Handshake responses: the appliance's Diffie-Hellman work for them.
    pub handshakes: u64,
    /// Handshakes per second over the storm's sending window.
    pub handshakes_per_s: f64,
}

/// What the patient routers (real WireGuard behaviour) saw inside the storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PatientReport {
    pub routers: usize,
    /// Routers that got a handshake response before the storm ended.
    pub completed: usize,
    /// Cookie replies they received on the way.
    pub cookie_replies: u64,
    /// Initiations they sent.
    pub initiations: u64,
    /// From a router's first initiation to its handshake response.
    pub seconds_p50: Option<f64>,
    pub seconds_max: Option<f64>,
}

impl StormReport {
    /// The report as a small table.
    pub fn table(&self) -> String {
        let mut table = format!(
            "tunnels x peers        {} x {}\n\
             duration               {:.1} s, {:.0} initiations/s offered\n\
             sent initiations       {}\n\
             responses / cookies    {} / {}\n\
             handshakes             {:.0} /s ({} counted by the appliance)\n\
             answered               {:.0} /s\n\
             appliance CPU          {} ({})\n\
             appliance CPU / hs     {}\n\
             appliance CPU / init   {}\n",
            self.tunnels,
            self.peers_per_tunnel,
            self.seconds,
            self.offered_per_s,
            self.sent_initiations,
            self.responses,
            self.cookie_replies,
            self.handshakes_per_s,
            self.appliance_handshakes,
            self.answered_per_s,
            opt(self.appliance_cpu_seconds, "s"),
            opt(self.appliance_cores, "cores"),
            opt(self.appliance_cpu_us_per_handshake, "µs"),
            opt(self.appliance_cpu_us_per_initiation, "µs"),
        );
        if self.sources > 1 {
            table.push_str(&format!(
                "sources                {} loopback addresses\n",
                self.sources
            ));
        }
        let e = &self.echoing;
        if e.routers > 0 {
            table.push_str(&format!(
                "echoing routers        {}: {} initiations, {} cookie replies, \
                 {} handshakes ({:.0} /s)\n",
                e.routers, e.initiations, e.cookie_replies, e.handshakes, e.handshakes_per_s,
            ));
        }
        let p = &self.patient;
        if p.routers > 0 {
            let seconds = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.2} s"));
            table.push_str(&format!(
                "patient routers        {} of {} got a handshake ({} cookie replies), \
                 p50 {} max {}\n",
                p.completed,
                p.routers,
                p.cookie_replies,
                seconds(p.seconds_p50),
                seconds(p.seconds_max),
            ));
        }
        table
    }
}

/// Provisions the tunnels and their routers, then runs the storm.
pub(crate) async fn run(
    spec: &BenchSpec,
    api: &Api,
    created: &mut Vec<String>,
    registered: &mut Vec<String>,
) -> Result<StormReport, BenchError> {
    let pid = std::process::id();
    // A given tenant is stormed alone, by strangers.
    let tunnels = if spec.tenant.is_some() {
        1
    } else {
        spec.tunnels.max(1)
    };
    let peers = spec.peers.max(1);
    // One socket each, all open at once.
    if tunnels * peers + spec.patient + spec.echoing > MAX_ROUTERS {
        return Err(BenchError::Spec(format!(
            "{tunnels} tunnels x {peers} routers + {} patient + {} echoing: a storm takes at most {MAX_ROUTERS} routers",
            spec.patient, spec.echoing
        )));
    }
    if spec.sources > 1 && spec.host != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        return Err(BenchError::Spec(format!(
            "--sources {} spreads the routers over loopback addresses: the appliance must be at 127.0.0.1, not {}",
            spec.sources, spec.host
        )));
    }
    let mut routers = Vec::new();
    // Each tunnel's tenant name, public key and port.
    let mut tenants = Vec::new();
    let count_routers = tunnels * peers;
    for t in 0..tunnels {
        let (name, TunnelInfo { public, port }) = api
            .tenant_for(spec, format!("bench-{pid}-hs{t}"), created)
            .await?;
        for r in 0..peers {
            let secret = if spec.tenant.is_some() {
                StaticSecret::random_from_rng(rand_core::OsRng)
            } else {
                api.router(&name, &format!("r{r}")).await?
            };
            let index = (t * peers + r) as u32;
            routers.push((
                Tunn::new(secret, public, None, None, index, None),
                SocketAddr::new(spec.host, port),
            ));
        }
        tenants.push((name, public, port));
    }
    // Registered routers get ids of this run's own: in a given tenant they
    // must not take over (re-key) a router of the tenant's, and they go again
    // after the run (the caller deletes them, also after a failure or Ctrl-C).
    let mut register = async |tenant: &str, id: String| -> Result<StaticSecret, BenchError> {
        if spec.tenant.is_some() {
            let path = format!("/v1/tenants/{tenant}/routers/{id}");
            if api.get_if_any(&path).await?.is_some() {
                return Err(BenchError::TenantInUse {
                    tenant: tenant.to_owned(),
                    what: format!("a router named {id:?}"),
                });
            }
            let secret = api.router(tenant, &id).await?;
            registered.push(path);
            return Ok(secret);
        }
        api.router(tenant, &id).await
    };
    let mut patient = Vec::with_capacity(spec.patient);
    for p in 0..spec.patient {
        let (name, public, port) = &tenants[p % tunnels];
        let (public, port) = (*public, *port);
        let secret = register(name, format!("bench-{pid}-p{p}")).await?;
        let index = (count_routers + p) as u32;
        patient.push((
            Tunn::new(secret, public, None, None, index, None),
            SocketAddr::new(spec.host, port),
        ));
    }
    let mut echoing = Vec::with_capacity(spec.echoing);
    let openers: Vec<_> = tenants
        .iter()
        .map(|(_, public, _)| Arc::new(CookieOpener::new(public)))
        .collect();
    for e in 0..spec.echoing {
        let (name, public, port) = &tenants[e % tunnels];
        let (public, port) = (*public, *port);
        let secret = register(name, format!("bench-{pid}-e{e}")).await?;
        let index = (count_routers + spec.patient + e) as u32;
        echoing.push(Echoer {
            tunn: Tunn::new(secret, public, None, None, index, None),
            to: SocketAddr::new(spec.host, port),
            opener: Arc::clone(&openers[e % tunnels]),
            stock: Vec::new().into_iter(),
        });
    }
    let rate = if spec.rate == 0 {
        DEFAULT_RATE
    } else {
        spec.rate
    };
    let total = (rate as f64 * spec.duration.as_secs_f64()) as u64;
    let total = total.min(MAX_PREPARED);
    let threads = spec.senders.max(2);
    let count = routers.len();
    let prepared = tokio::task::spawn_blocking(move || prepare(routers, total, threads))
        .await
        .map_err(|e| BenchError::Api(e.to_string()))?;
    let stock = (ECHO_STOCK_PER_SECOND * spec.duration.as_secs_f64()).ceil() as usize
        + PER_SOURCE_BURST as usize;
    let echoing = tokio::task::spawn_blocking(move || stock_up(echoing, stock, threads))
        .await
        .map_err(|e| BenchError::Api(e.to_string()))?;
    // The appliance's handshake count, before and after: a given tenant may
    // have had handshakes before this run.
    let mut before = Vec::with_capacity(tenants.len());
    for (name, ..) in &tenants {
        before.push(
            api.counter("wgplane_handshake_responses_total", name, "")
                .await?,
        );
    }
    let mut report = storm(spec, &prepared, count, rate, patient, echoing).await?;
    report.tunnels = tunnels;
    report.peers_per_tunnel = peers;
    for ((name, ..), before) in tenants.iter().zip(before) {
        let after = api
            .counter("wgplane_handshake_responses_total", name, "")
            .await?;
        report.appliance_handshakes += super::grown(before, after);
    }
    Ok(report)
}

/// `total` initiations, round-robin over the routers, in sending order. Prepared
/// on `threads` threads, each taking a share of the routers (so each router's
/// timestamps still increase in the final order).
fn prepare(routers: Vec<(Tunn, SocketAddr)>, total: u64, threads: usize) -> Vec<Prepared> {
    let count = routers.len().max(1);
    let rounds = total.div_ceil(count as u64) as usize;
    let mut shares: Vec<Vec<(usize, Tunn, SocketAddr)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, (tunn, to)) in routers.into_iter().enumerate() {
        shares[i % threads].push((i, tunn, to));
    }
    // Per router, its initiations in order.
    let per_router: Vec<(usize, SocketAddr, Vec<Vec<u8>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut buf = [0u8; 256];
                    for (i, mut tunn, to) in share {
                        let mut mine = Vec::with_capacity(rounds);
                        for _ in 0..rounds {
                            if let TunnResult::WriteToNetwork(d) =
                                tunn.format_handshake_initiation(&mut buf, true)
                            {
                                mine.push(d.to_vec());
                            }
                        }
                        out.push((i, to, mine));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut by_router: Vec<Option<(SocketAddr, std::vec::IntoIter<Vec<u8>>)>> =
        (0..count).map(|_| None).collect();
    for (i, to, mine) in per_router {
        by_router[i] = Some((to, mine.into_iter()));
    }
    let mut order = Vec::with_capacity(total as usize);
    'rounds: for _ in 0..rounds {
        for (router, slot) in by_router.iter_mut().enumerate() {
            let Some((to, initiations)) = slot else {
                continue;
            };
            if order.len() as u64 >= total {
                break 'rounds;
            }
            if let Some(datagram) = initiations.next() {
                order.push(Prepared {
                    router,
                    to: *to,
                    datagram,
                });
            }
        }
    }
    order
}

/// Prepares `stock` initiations for each echoing router, on `threads` threads.
fn stock_up(echoing: Vec<Echoer>, stock: usize, threads: usize) -> Vec<Echoer> {
    let per_thread = echoing.len().div_ceil(threads.max(1)).max(1);
    let mut echoing = echoing;
    std::thread::scope(|scope| {
        for share in echoing.chunks_mut(per_thread) {
            scope.spawn(move || {
                let mut buf = [0u8; 256];
                for router in share {
                    let mut mine = Vec::with_capacity(stock);
                    for _ in 0..stock {
                        if let TunnResult::WriteToNetwork(d) =
                            router.tunn.format_handshake_initiation(&mut buf, true)
                        {
                            if let Ok(initiation) = <[u8; INITIATION_LEN]>::try_from(&*d) {
                                mine.push(initiation);
                            }
                        }
                    }
                    router.stock = mine.into_iter();
                }
            });
        }
    });
    echoing
}

/// An echoing router: its `Tunn` (for initiations beyond its stock), where it
/// sends, how it opens its tunnel's cookie replies, and its prepared initiations
/// in order.
struct Echoer {
    tunn: Tunn,
    to: SocketAddr,
    opener: Arc<CookieOpener>,
    stock: std::vec::IntoIter<[u8; INITIATION_LEN]>,
}

/// One initiation, ready to send from its router's socket.
struct Prepared {
    router: usize,
    to: SocketAddr,
    datagram: Vec<u8>,
}

/// Answers counted by the listening tasks.
#[derive(Default)]
struct Answers {
    responses: AtomicU64,
    cookies: AtomicU64,
    /// Nanoseconds since the start of the last answer.
    last: AtomicU64,
}

/// Counts what comes back to one router's socket until told to stop.
async fn listen(
    socket: Arc<tokio::net::UdpSocket>,
    answers: Arc<Answers>,
    mut stop: watch::Receiver<bool>,
    begin: Instant,
) {
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            got = socket.recv(&mut buf) => {
                let Ok(n) = got else { continue };
                match (n, buf[0]) {
                    (92, 2) => answers.responses.fetch_add(1, Ordering::Relaxed),
                    (64, 3) => answers.cookies.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                answers.last.store(begin.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            _ = stop.changed() => break,
        }
    }
}

/// Sends the prepared initiations at `rate` per second, each router from its
/// own socket (its own endpoint, as real routers have), and counts the answers.
async fn storm(
    spec: &BenchSpec,
    prepared: &[Prepared],
    routers: usize,
    rate: u64,
    patient: Vec<(Tunn, SocketAddr)>,
    echoing: Vec<Echoer>,
) -> Result<StormReport, BenchError> {
    // Storm routers first, then the patient ones, then the echoing ones.
    let from = |i: usize| source(spec.host, i, spec.sources);
    let mut sockets = Vec::with_capacity(routers);
    for i in 0..routers {
        sockets.push(Arc::new(tokio::net::UdpSocket::bind((from(i), 0)).await?));
    }
    let patients_from = routers;
    let echoing_from = routers + patient.len();
    let answers = Arc::new(Answers::default());
    let (stop, stopped) = watch::channel(false);
    tracing::info!(
        initiations = prepared.len(),
        rate,
        "storm: measured window opens"
    );
    let begin = Instant::now();
    let wall = std::time::SystemTime::now();
    let mut listeners = tokio::task::JoinSet::new();
    for socket in &sockets {
        listeners.spawn(listen(
            Arc::clone(socket),
            Arc::clone(&answers),
            stopped.clone(),
            begin,
        ));
    }
    let meter = CpuMeter::start(spec.pid);
    let deadline = begin + spec.duration;
    let mut patients = tokio::task::JoinSet::new();
    for (i, (tunn, to)) in patient.into_iter().enumerate() {
        let at = from(patients_from + i);
        patients.spawn(retry_with_cookies(tunn, to, at, begin, deadline));
    }
    let echoes = Arc::new(Echoes::default());
    let echo_routers = echoing.len();
    let mut echoers = tokio::task::JoinSet::new();
    for (i, router) in echoing.into_iter().enumerate() {
        let at = from(echoing_from + i);
        echoers.spawn(echo_cookies(router, at, deadline, Arc::clone(&echoes)));
    }
    let mut sent = 0u64;
    let mut sending = Duration::ZERO;
    // Initiations go out in chunks of 64, chunk `n` due at n * 64 / rate s.
    for (n, chunk) in prepared.chunks(64).enumerate() {
        let due = Duration::from_secs_f64(n as f64 * 64.0 / rate as f64);
        if due >= spec.duration {
            break;
        }
        tokio::time::sleep_until((begin + due).into()).await;
        for p in chunk {
            if sockets[p.router].try_send_to(&p.datagram, p.to).is_ok() {
                sent += 1;
            }
        }
        sending = begin.elapsed();
    }
    // A backlog is still being answered: wait until the answers stop (half a
    // second of quiet, at most ten seconds), so the CPU read covers them.
    let drained = Instant::now();
    while drained.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = Duration::from_nanos(answers.last.load(Ordering::Relaxed));
        if begin.elapsed().saturating_sub(last) > Duration::from_millis(500) {
            break;
        }
    }
    // The echoing and patient routers run until the deadline (also when the
    // storm's stock ran out sooner): the CPU read covers all their work.
    while let Some(outcome) = echoers.join_next().await {
        if let Ok(outcome) = outcome {
            outcome?;
        }
    }
    let echoing = echoes.report(echo_routers, spec.duration);
    let mut patient = PatientReport::default();
    let mut took = Vec::new();
    // When the last patient router stopped: at its handshake, or at the
    // deadline for one that never got one.
    let mut patients_ran = Duration::ZERO;
    while let Some(outcome) = patients.join_next().await {
        patient.routers += 1;
        let Ok(outcome) = outcome else { continue };
        let (done, cookies, initiations) = outcome?;
        patient.cookie_replies += cookies;
        patient.initiations += initiations;
        patients_ran = patients_ran.max(done.unwrap_or(spec.duration));
        if let Some(t) = done {
            patient.completed += 1;
            took.push(t.as_secs_f64());
        }
    }
    let cpu = meter.seconds();
    // The appliance's busy time: until the last answer, or the end of the
    // echoing and patient routers' run; not the quiet waited for after it.
    let last_answer = Duration::from_nanos(answers.last.load(Ordering::Relaxed));
    // The echoing routers run to the deadline.
    let routers_ran = if echo_routers > 0 {
        spec.duration
    } else {
        patients_ran
    };
    let cpu_window = last_answer.max(routers_ran).max(sending);
    let _ = stop.send(true);
    while listeners.join_next().await.is_some() {}
    took.sort_by(f64::total_cmp);
    patient.seconds_p50 = took.get(took.len() / 2).copied();
    patient.seconds_max = took.last().copied();
    let responses = answers.responses.load(Ordering::Relaxed);
    let cookie_replies = answers.cookies.load(Ordering::Relaxed);
    let answered_handshakes = responses + echoing.handshakes + patient.completed as u64;
    // Every initiation the appliance got, from every kind of router.
    let all_initiations = sent + echoing.initiations + patient.initiations;
    if sent == 0 {
        return Err(BenchError::Storm("no initiation could be sent".into()));
    }
    // From the first initiation to the last answer. Strangers (`--tenant`) get
    // no answer below the appliance's load limit: there, none is a result and
    // the window is the sending's; a storm of registered routers that got none
    // measured nothing (the appliance is not answering this host), and rates
    // over a zero-length window would be nonsense.
    let seconds = if responses + cookie_replies > 0 {
        Duration::from_nanos(answers.last.load(Ordering::Relaxed)).as_secs_f64()
    } else if spec.tenant.is_some() {
        sending.as_secs_f64()
    } else {
        return Err(BenchError::Storm(format!(
            "the appliance answered none of {sent} initiations (is {} its tunnels' address?)",
            spec.host
        )));
    };
    if seconds <= 0.0 {
        return Err(BenchError::Storm("the storm's window has no length".into()));
    }
    Ok(StormReport {
        tunnels: 0,
        peers_per_tunnel: 0,
        seconds,
        offered_per_s: sent as f64 / sending.as_secs_f64().max(f64::EPSILON),
        sent_initiations: sent,
        responses,
        cookie_replies,
        handshakes_per_s: responses as f64 / seconds,
        answered_per_s: (responses + cookie_replies) as f64 / seconds,
        appliance_handshakes: 0,
        appliance_cpu_seconds: cpu,
        // Every handshake response received, the echoing and patient routers'
        // included. Cookie replies cost a MAC, not Diffie-Hellman: they are left
        // out of the denominator, which makes this an upper bound.
        appliance_cpu_us_per_handshake: cpu
            .filter(|_| answered_handshakes > 0)
            .map(|c| c * 1e6 / answered_handshakes as f64),
        appliance_cpu_us_per_initiation: cpu.map(|c| c * 1e6 / all_initiations as f64),
        appliance_cores: cpu.map(|c| c / cpu_window.as_secs_f64().max(f64::EPSILON)),
        patient,
        echoing,
        sources: spec.sources.max(1),
        window_start_unix_ms: super::unix_ms(wall),
        window_end_unix_ms: super::unix_ms(wall + sending),
    })
}

/// The address router `i` sends from: `host` itself with one source, else one
/// of `sources` loopback addresses from [`FIRST_SOURCE`] on, in turn.
fn source(host: IpAddr, i: usize, sources: usize) -> IpAddr {
    if sources <= 1 {
        return host;
    }
    let offset = (i % sources) as u32;
    IpAddr::V4(Ipv4Addr::from(u32::from(FIRST_SOURCE).wrapping_add(offset)))
}

/// What the echoing routers counted.
#[derive(Default)]
struct Echoes {
    initiations: AtomicU64,
    live: AtomicU64,
    cookies: AtomicU64,
    handshakes: AtomicU64,
}

impl Echoes {
    fn report(&self, routers: usize, window: Duration) -> EchoReport {
        let handshakes = self.handshakes.load(Ordering::Relaxed);
        EchoReport {
            routers,
            initiations: self.initiations.load(Ordering::Relaxed),
            live_initiations: self.live.load(Ordering::Relaxed),
            cookie_replies: self.cookies.load(Ordering::Relaxed),
            handshakes,
            handshakes_per_s: if window.is_zero() {
                0.0
            } else {
                handshakes as f64 / window.as_secs_f64()
            },
        }
    }
}

/// A router that costs the appliance as much as a real host can: from the
/// start of the storm until `deadline` it initiates, sends the initiation again
/// with the cookie of a cookie reply at once, and goes on to its next initiation
/// as soon as one is answered or about an [`ECHO_WAIT`] passes without an answer.
async fn echo_cookies(
    mut router: Echoer,
    from: IpAddr,
    deadline: Instant,
    echoes: Arc<Echoes>,
) -> Result<(), BenchError> {
    let socket = tokio::net::UdpSocket::bind((from, 0)).await?;
    let (mut out, mut answer) = ([0u8; 256], [0u8; 256]);
    // The last cookie: the responder's secret changes every two minutes, and a
    // stale cookie only earns a fresh one.
    let mut cookie: Option<Cookie> = None;
    while Instant::now() < deadline {
        let mut initiation = match router.stock.next() {
            Some(initiation) => initiation,
            None => match router.tunn.format_handshake_initiation(&mut out, true) {
                TunnResult::WriteToNetwork(d) => match <[u8; INITIATION_LEN]>::try_from(&*d) {
                    Ok(initiation) => {
                        echoes.live.fetch_add(1, Ordering::Relaxed);
                        initiation
                    }
                    Err(_) => break,
                },
                _ => break,
            },
        };
        // Until it is answered with a handshake response or not at all: a
        // cookie reply earns the same initiation another try, with its cookie.
        while Instant::now() < deadline {
            if let Some(cookie) = &cookie {
                write_mac2(&mut initiation, cookie);
            }
            if socket.send_to(&initiation, router.to).await.is_ok() {
                echoes.initiations.fetch_add(1, Ordering::Relaxed);
            }
            let jitter = ECHO_WAIT.mul_f64(
                f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng))
                    / f64::from(u32::MAX),
            );
            let wait = (Instant::now() + ECHO_WAIT / 2 + jitter).min(deadline);
            let mut echo = false;
            while let Ok(got) = tokio::time::timeout_at(wait.into(), socket.recv(&mut answer)).await
            {
                let n = got?;
                // A response is counted, not completed, as the storm's routers
                // do: completing it would cost this generator two
                // Diffie-Hellman operations on the cores it shares with the
                // flow's generator. A cookie reply to another (older)
                // initiation does not open and is passed over.
                if (n, answer[0]) == (92, 2) {
                    echoes.handshakes.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if let Some(fresh) = router.opener.open(&answer[..n], &initiation) {
                    echoes.cookies.fetch_add(1, Ordering::Relaxed);
                    cookie = Some(fresh);
                    echo = true;
                    break;
                }
            }
            if !echo {
                break;
            }
        }
    }
    Ok(())
}

/// A router that behaves like a WireGuard peer: from [`PATIENT_START`] into the
/// storm until `deadline`, it initiates, keeps the cookie from a cookie reply
/// and retries every [`PATIENT_RETRY`] (plus jitter) until a handshake response
/// comes back.
/// Returns how long that took (none: no handshake) and the cookie replies seen.
async fn retry_with_cookies(
    mut tunn: Tunn,
    to: SocketAddr,
    from: IpAddr,
    begin: Instant,
    deadline: Instant,
) -> Result<(Option<Duration>, u64, u64), BenchError> {
    tokio::time::sleep_until((begin + PATIENT_START).into()).await;
    let socket = tokio::net::UdpSocket::bind((from, 0)).await?;
    let started = Instant::now();
    let (mut cookies, mut initiations) = (0, 0);
    let (mut out, mut answer, mut scratch) = ([0u8; 256], [0u8; 256], [0u8; 256]);
    while Instant::now() < deadline {
        if let TunnResult::WriteToNetwork(initiation) =
            tunn.format_handshake_initiation(&mut out, true)
        {
            socket.send_to(initiation, to).await?;
            initiations += 1;
        }
        let jitter = Duration::from_millis(u64::from(
            rand_core::RngCore::next_u32(&mut rand_core::OsRng) % PATIENT_JITTER_MS,
        ));
        let retry = Instant::now() + PATIENT_RETRY + jitter;
        while let Ok(got) = tokio::time::timeout_at(retry.into(), socket.recv(&mut answer)).await {
            let n = got?;
            let kind = answer[0];
            let result = tunn.decapsulate(Some(to.ip()), &answer[..n], &mut scratch);
            match (kind, result) {
                (_, TunnResult::Err(_)) => {}
                (2, _) => return Ok((Some(started.elapsed()), cookies, initiations)),
                (3, _) => cookies += 1,
                _ => {}
            }
        }
    }
    Ok((None, cookies, initiations))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::source;

    #[test]
    fn routers_take_the_loopback_sources_in_turn() {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(source(host, 7, 1), host);
        let at = |i| source(host, i, 300);
        assert_eq!(at(0), IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1)));
        assert_eq!(at(255), IpAddr::V4(Ipv4Addr::new(127, 77, 1, 0)));
        assert_eq!(at(299), IpAddr::V4(Ipv4Addr::new(127, 77, 1, 44)));
        assert_eq!(at(300), at(0));
        // The most sources the CLI takes stay inside 127.0.0.0/8.
        assert_eq!(
            source(host, 64_999, 65_000),
            IpAddr::V4(Ipv4Addr::new(127, 77, 253, 232))
        );
    }
}
