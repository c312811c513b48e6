//! The hub and the webhooks against a recording directory and local receivers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use crate::core::engine::Event;
use crate::io::runtime::TunnelEvent;
use crate::io::tunnel::News;

use super::hub::*;
use super::webhooks::*;
use super::*;
use std::sync::Mutex;

/// Peers whose key starts with 1 are clients, the others routers; every
/// batch of endpoints handed over is kept, and reconciliations counted
/// (with the time each began). The first `refusals` writes (hand-overs and
/// reconciliations alike) fail, as on a full disk. The tenants the tests use
/// are registered ("deleted" is not).
#[derive(Clone)]
struct Recorder {
    batches: Arc<Mutex<Vec<Vec<Heard>>>>,
    reconciled: Arc<AtomicU64>,
    reconciled_at: Arc<Mutex<Vec<tokio::time::Instant>>>,
    refusals: Arc<AtomicU64>,
    /// What a pass over the tunnels sees.
    seen: Arc<Mutex<Seen>>,
}

impl Default for Recorder {
    fn default() -> Self {
        let seen = Seen {
            registered: ["acme", "other", "flood"].map(Arc::from).into(),
            ..Default::default()
        };
        Self {
            batches: Arc::default(),
            reconciled: Arc::default(),
            reconciled_at: Arc::default(),
            refusals: Arc::default(),
            seen: Arc::new(Mutex::new(seen)),
        }
    }
}

impl Recorder {
    fn write(&self) -> Result<(), NotStored> {
        let refuse = self
            .refusals
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            Err(NotStored)
        } else {
            Ok(())
        }
    }
}

impl Directory for Recorder {
    async fn resolve(&self, _tenant: &str, key: &[u8; 32]) -> Option<(&'static str, String)> {
        let kind = if key[0] == 1 { "client" } else { "router" };
        Some((kind, format!("p{}", key[1])))
    }

    async fn routers_heard_at(&self, heard: Vec<Heard>) -> Result<(), NotStored> {
        self.batches.lock().unwrap().push(heard);
        self.write()
    }

    async fn reconcile_router_endpoints(&self) -> (Seen, Result<(), NotStored>) {
        self.reconciled.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        self.reconciled_at.lock().unwrap().push(now);
        (self.seen.lock().unwrap().clone(), self.write())
    }
}

fn connected(kind: u8, n: u16) -> TunnelEvent {
    let mut peer = [0u8; 32];
    peer[0] = kind;
    peer[1..3].copy_from_slice(&n.to_be_bytes());
    TunnelEvent {
        tenant: Arc::from("acme"),
        event: News::Peer(Event::Connected {
            peer,
            endpoint: Some(SocketAddr::from(([203, 0, 113, 2], n))),
        }),
        at: std::time::SystemTime::UNIX_EPOCH,
    }
}

/// A hub running on `directory`, fed by the returned sender through a
/// channel of `capacity`.
fn spawn_hub(
    capacity: usize,
    directory: &Recorder,
) -> (broadcast::Sender<TunnelEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = broadcast::channel(capacity);
    let (subscribers, _) = broadcast::channel(8);
    let hub = run_hub(rx, directory.clone(), subscribers, None, Arc::default());
    (tx, tokio::spawn(hub))
}

/// Runs the hub over `events`, queued before it starts in a channel of
/// `capacity`, to the end: the batches handed over, and reconciliations.
async fn run(events: Vec<TunnelEvent>, capacity: usize) -> (Vec<Vec<Heard>>, u64) {
    let (tx, rx) = broadcast::channel(capacity);
    for e in events {
        tx.send(e).unwrap();
    }
    drop(tx);
    let directory = Recorder::default();
    let (subscribers, _) = broadcast::channel(8);
    run_hub(rx, directory.clone(), subscribers, None, Arc::default()).await;
    let batches = directory.batches.lock().unwrap().clone();
    (batches, directory.reconciled.load(Ordering::Relaxed))
}

#[tokio::test]
async fn a_reconnect_wave_costs_a_few_batches_of_router_endpoints() {
    // Routers and clients connect, one router disconnects: only the
    // routers' endpoints are kept, in order, in one batch.
    let mut wave: Vec<_> = (0..10).map(|n| connected(0, n)).collect();
    wave.insert(3, connected(1, 99));
    let mut gone = connected(0, 5);
    gone.event = News::Peer(Event::Disconnected { peer: [0; 32] });
    wave.push(gone);
    let (got, reconciled) = run(wave, 4096).await;
    assert_eq!((got.len(), reconciled), (1, 0), "{got:?}");
    let ports: Vec<u16> = got[0].iter().map(|h| h.endpoint.port()).collect();
    assert_eq!(ports, (0..10).collect::<Vec<_>>());

    // A larger wave is handed over in batches of at most HEARD_BATCH.
    let (got, _) = run((0..1500).map(|n| connected(0, n)).collect(), 4096).await;
    let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(sizes, [HEARD_BATCH, 1500 - HEARD_BATCH]);
}

#[tokio::test]
async fn lost_events_make_the_hub_take_endpoints_from_the_tunnels() {
    // 10 events into a channel of 4: the hub lags, loses 6, and has every
    // router's endpoint taken from the running tunnels once; the 4 it
    // still gets are handed over as usual.
    let (got, reconciled) = run((0..10).map(|n| connected(0, n)).collect(), 4).await;
    assert_eq!(reconciled, 1);
    let ports: Vec<u16> = got.concat().iter().map(|h| h.endpoint.port()).collect();
    assert_eq!(ports, [6, 7, 8, 9]);
}

/// A reconnect wave that makes the hub fall behind again and again costs
/// one pass over the tunnels, once it has settled, not one per lag.
#[tokio::test(start_paused = true)]
async fn lags_in_a_row_cost_one_pass_over_the_tunnels() {
    let directory = Recorder::default();
    let (tx, hub) = spawn_hub(4, &directory);
    for wave in 0..5u16 {
        for n in 0..10 {
            tx.send(connected(0, wave * 100 + n)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(directory.reconciled.load(Ordering::Relaxed), 0, "settling");
    tokio::time::sleep(LAG_SETTLE).await;
    assert_eq!(directory.reconciled.load(Ordering::Relaxed), 1);
    drop(tx);
    hub.await.unwrap();
    assert_eq!(directory.reconciled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn subscribers_and_webhooks_are_told_how_many_events_the_hub_lost() {
    // 10 connects into a channel of 4: the hub loses the first 6. Both
    // followers hear of the loss first, then get the 4 that remain.
    let (tx, rx) = broadcast::channel(4);
    for n in 0..10 {
        tx.send(connected(0, n)).unwrap();
    }
    drop(tx);
    let (subscribers, mut sse) = broadcast::channel(64);
    let (webhooks, mut hooks) = mpsc::channel(64);
    let stats = Arc::new(EventStats::default());
    run_hub(
        rx,
        Recorder::default(),
        subscribers,
        Some(webhooks),
        Arc::clone(&stats),
    )
    .await;
    let mut heard = (Vec::new(), Vec::new());
    while let Ok(e) = sse.try_recv() {
        heard.0.push(e);
    }
    while let Ok(Queued { lost_before, event }) = hooks.try_recv() {
        assert_eq!(lost_before, 0);
        heard.1.push(event);
    }
    assert_eq!(heard.0, heard.1, "SSE and webhooks hear the same");
    let summary: Vec<String> = heard
        .0
        .iter()
        .map(|p| match p {
            Published::Lagged(l) => format!("lagged {}", l.missed),
            Published::Peer(e) => {
                format!("{} {}", e.event, e.endpoint.as_deref().unwrap_or(""))
            }
        })
        .collect();
    assert_eq!(
        summary,
        [
            "lagged 6",
            "peer_connected 203.0.113.2:6",
            "peer_connected 203.0.113.2:7",
            "peer_connected 203.0.113.2:8",
            "peer_connected 203.0.113.2:9",
        ]
    );
    assert_eq!(stats.lagged.load(Ordering::Relaxed), 6);
    assert_eq!(stats.published.load(Ordering::Relaxed), 4);
}

/// A tunnel that stops, even one whose task ended by a bug and said
/// nothing, has each of its peers that was announced connected announced
/// disconnected, under its name; other tunnels' peers stay.
#[tokio::test]
async fn a_stopped_tunnel_disconnects_the_peers_announced_connected() {
    let (tx, rx) = broadcast::channel(64);
    let elsewhere = |mut e: TunnelEvent| {
        e.tenant = Arc::from("other");
        e
    };
    tx.send(connected(0, 1)).unwrap();
    tx.send(connected(1, 2)).unwrap();
    tx.send(elsewhere(connected(0, 3))).unwrap();
    let mut stopped = connected(0, 1);
    stopped.event = News::Stopped;
    tx.send(stopped.clone()).unwrap();
    // A second stop has nobody left to disconnect.
    tx.send(stopped).unwrap();
    drop(tx);
    let (subscribers, mut sse) = broadcast::channel(64);
    run_hub(rx, Recorder::default(), subscribers, None, Arc::default()).await;
    let mut heard = Vec::new();
    while let Ok(Published::Peer(e)) = sse.try_recv() {
        let endpoint = e.endpoint.unwrap_or_default();
        heard.push(format!(
            "{} {} {} {} {endpoint}",
            e.event, e.tenant_id, e.kind, e.id
        ));
    }
    let (connects, disconnects) = heard.split_at(3);
    assert_eq!(
        connects,
        [
            "peer_connected acme router p0 203.0.113.2:1",
            "peer_connected acme client p0 203.0.113.2:2",
            "peer_connected other router p0 203.0.113.2:3",
        ]
    );
    let mut disconnects = disconnects.to_vec();
    disconnects.sort();
    assert_eq!(
        disconnects,
        [
            "peer_disconnected acme client p0 203.0.113.2:2",
            "peer_disconnected acme router p0 203.0.113.2:1"
        ]
    );
}

/// A `peer_disconnected` carries the endpoint the peer was last announced
/// at: where it roamed to, not where it connected from.
#[tokio::test]
async fn a_disconnect_names_the_endpoint_last_announced() {
    let (tx, rx) = broadcast::channel(64);
    let first = connected(0, 1);
    let News::Peer(Event::Connected { peer, .. }) = first.event else {
        unreachable!()
    };
    let later = |event| TunnelEvent {
        event: News::Peer(event),
        ..first.clone()
    };
    let roamed_to = SocketAddr::from(([198, 51, 100, 7], 4500));
    tx.send(first.clone()).unwrap();
    tx.send(later(Event::Roamed {
        peer,
        endpoint: roamed_to,
    }))
    .unwrap();
    tx.send(later(Event::Disconnected { peer })).unwrap();
    drop(tx);
    let (subscribers, mut sse) = broadcast::channel(64);
    run_hub(rx, Recorder::default(), subscribers, None, Arc::default()).await;
    let mut heard = Vec::new();
    while let Ok(Published::Peer(e)) = sse.try_recv() {
        heard.push(format!("{} {}", e.event, e.endpoint.unwrap_or_default()));
    }
    assert_eq!(
        heard,
        [
            "peer_connected 203.0.113.2:1",
            "peer_roamed 198.51.100.7:4500",
            "peer_disconnected 198.51.100.7:4500",
        ]
    );
}

/// A peer whose `peer_disconnected` was lost while the hub fell behind is
/// announced disconnected at the pass over the tunnels (which no longer count
/// it connected), not long after, when its tunnel stops; every connect gets
/// one disconnect. So is a peer of a tenant deleted while the hub was behind
/// (its tunnel's `Stopped` lost). Peers of tunnels that did not answer the
/// pass are left alone.
#[tokio::test(start_paused = true)]
async fn a_disconnect_lost_in_a_lag_is_announced_at_the_next_pass() {
    let key = |e: &TunnelEvent| match &e.event {
        News::Peer(Event::Connected { peer, .. }) => *peer,
        _ => unreachable!("a connect"),
    };
    let (one, two) = (connected(0, 1), connected(0, 2));
    let mut other = connected(0, 3);
    other.tenant = Arc::from("other");
    let mut deleted = connected(0, 4);
    deleted.tenant = Arc::from("deleted");
    let directory = Recorder::default();
    {
        let mut seen = directory.seen.lock().unwrap();
        seen.tenants.insert(Arc::from("acme"));
        seen.connected.insert((Arc::from("acme"), key(&one)));
    }
    let (tx, rx) = broadcast::channel(4);
    let (subscribers, mut sse) = broadcast::channel(64);
    let hub = tokio::spawn(run_hub(
        rx,
        directory.clone(),
        subscribers,
        None,
        Arc::default(),
    ));
    for e in [one, two, other, deleted] {
        tx.send(e).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Two's disconnect is among the events lost here.
    for n in 0..10 {
        let mut flood = connected(0, 100 + n);
        flood.tenant = Arc::from("flood");
        tx.send(flood).unwrap();
    }
    tokio::time::sleep(LAG_SETTLE * 2).await;
    assert_eq!(directory.reconciled.load(Ordering::Relaxed), 1);
    for tenant in ["acme", "other"] {
        let mut stopped = connected(0, 1);
        stopped.tenant = Arc::from(tenant);
        stopped.event = News::Stopped;
        tx.send(stopped).unwrap();
    }
    drop(tx);
    hub.await.unwrap();
    let mut disconnects = Vec::new();
    while let Ok(e) = sse.try_recv() {
        if let Published::Peer(e) = e {
            if e.event == "peer_disconnected" {
                disconnects.push((e.tenant_id, e.public_key));
            }
        }
    }
    let b64 = |e: &TunnelEvent| crate::keys::encode(&key(e));
    // The pass's two in either order.
    disconnects[..2].sort();
    let expected = [
        ("acme".to_owned(), b64(&connected(0, 2))),
        ("deleted".to_owned(), b64(&connected(0, 4))),
        ("acme".to_owned(), b64(&connected(0, 1))),
        ("other".to_owned(), b64(&connected(0, 3))),
    ];
    assert_eq!(disconnects, expected, "two at the pass, then the stops");
}

/// A receiver that takes a delivery and never answers holds up its URL:
/// its queue (as deep as configured, 1 here) fills, and what does not fit
/// is dropped and counted, never waited for.
#[tokio::test]
async fn a_url_that_hangs_fills_its_queue_and_the_rest_is_dropped() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (accepted_tx, mut accepted) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream); // read nothing, answer nothing
            let _ = accepted_tx.try_send(());
        }
    });
    let stats = Arc::new(EventStats::default());
    let (queue, rx) = mpsc::channel(1);
    tokio::spawn(run_webhooks(
        rx,
        vec![url],
        Duration::from_secs(600),
        Arc::clone(&stats),
    ));
    let event = || Published::Lagged(Lagged::now(1));
    queue.send(event().into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the first delivery reaches the receiver");
    // The worker is busy with the first: one more fits its queue.
    for _ in 0..10 {
        queue.send(event().into()).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.webhook_dropped.load(Ordering::Relaxed) < 9 {
        assert!(tokio::time::Instant::now() < deadline, "nothing dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stats.webhook_dropped.load(Ordering::Relaxed), 9);
    assert_eq!(stats.webhook_delivered.load(Ordering::Relaxed), 0);
}

/// A receiver that fell behind and catches up is told how many events it
/// missed, before the next one, as an SSE subscriber is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_fell_behind_is_told_how_many_it_missed() {
    let (queue, gate, bodies, stats) = gated_fan_out(2).await;
    let event = |n| Published::Lagged(Lagged::now(n));
    queue.send(event(100).into()).await.unwrap(); // held by the receiver
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 101..=105 {
        queue.send(event(n).into()).await.unwrap(); // 101 and 102 wait, the rest dropped
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stats.webhook_dropped.load(Ordering::Relaxed), 3);
    gate.add_permits(100);
    assert_eq!(missed_of(&bodies, 3).await, [100, 101, 102]);
    queue.send(event(106).into()).await.unwrap();
    // 100 to 102 as sent, then the news of the three dropped, then 106.
    assert_eq!(missed_of(&bodies, 5).await, [100, 101, 102, 3, 106]);
    assert_eq!(stats.webhook_dropped.load(Ordering::Relaxed), 3);
}

/// A receiver on loopback that takes a delivery only when `gate` gives it
/// a permit, and keeps every body: its URL, the gate, the bodies.
async fn gated_receiver() -> (
    String,
    Arc<tokio::sync::Semaphore>,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (hook_gate, hook_bodies) = (Arc::clone(&gate), Arc::clone(&bodies));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| async move {
            if let Ok(permit) = hook_gate.acquire().await {
                permit.forget();
            }
            hook_bodies.lock().unwrap().push(body.0);
            axum::http::StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, gate, bodies)
}

/// Webhooks with queues `depth` deep, to one [`gated_receiver`]: the
/// fan-out's queue, the receiver's gate and bodies, and the counters.
async fn gated_fan_out(
    depth: usize,
) -> (
    mpsc::Sender<Queued>,
    Arc<tokio::sync::Semaphore>,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    Arc<EventStats>,
) {
    let (url, gate, bodies) = gated_receiver().await;
    let stats = Arc::new(EventStats::default());
    let (queue, rx) = mpsc::channel(depth);
    let timeout = Duration::from_secs(30);
    tokio::spawn(run_webhooks(rx, vec![url], timeout, Arc::clone(&stats)));
    (queue, gate, bodies, stats)
}

/// Waits until `bodies` holds `n`, and returns their `missed` fields.
async fn missed_of(bodies: &std::sync::Mutex<Vec<serde_json::Value>>, n: usize) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bodies.lock().unwrap().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            bodies.lock()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = bodies.lock().unwrap();
    got.iter().map(|b| b["missed"].as_u64().unwrap()).collect()
}

/// A URL that takes events more slowly than they come is not told of
/// each loss as it happens (a `lagged` for every event it takes): only
/// once its queue is half empty again, once for all it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_slower_than_the_events_is_told_once_it_has_room() {
    let (queue, gate, bodies, stats) = gated_fan_out(4).await;
    let event = |n| Published::Lagged(Lagged::now(n));
    let settle = || tokio::time::sleep(Duration::from_millis(200));
    queue.send(event(100).into()).await.unwrap(); // at the receiver
    settle().await;
    for n in 101..=109 {
        queue.send(event(n).into()).await.unwrap(); // 101-104 wait, 105-109 dropped
    }
    settle().await;
    gate.add_permits(1); // 100 taken: 101 at the receiver, one slot free
    settle().await;
    queue.send(event(110).into()).await.unwrap(); // dropped: no room to tell
    settle().await;
    gate.add_permits(100);
    assert_eq!(missed_of(&bodies, 5).await, [100, 101, 102, 103, 104]);
    queue.send(event(111).into()).await.unwrap();
    assert_eq!(missed_of(&bodies, 7).await[5..], [6, 111]);
    assert_eq!(stats.webhook_dropped.load(Ordering::Relaxed), 6);
}

/// Events the hub's own queue refused are told to every URL at the gap:
/// after the events that came before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_hub_lost_are_told_where_they_were_lost() {
    let (queue, gate, bodies, _) = gated_fan_out(8).await;
    gate.add_permits(100);
    let event = |n| Published::Lagged(Lagged::now(n));
    queue.send(event(100).into()).await.unwrap();
    queue.send(event(101).into()).await.unwrap();
    let after_the_gap = Queued {
        lost_before: 3,
        event: event(102),
    };
    queue.send(after_the_gap).await.unwrap();
    assert_eq!(missed_of(&bodies, 4).await, [100, 101, 3, 102]);
}

/// A receiver that redirects is not followed: events go only to the URL
/// the operator configured (a redirect could point anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receivers_redirect_is_not_followed() {
    use axum::http::{header, StatusCode};
    let hits = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let (to_hook, to_elsewhere) = (Arc::clone(&hits), Arc::clone(&hits));
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(move || async move {
                to_hook[0].fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, "/elsewhere")],
                )
            }),
        )
        .route(
            "/elsewhere",
            axum::routing::post(move || async move {
                to_elsewhere[1].fetch_add(1, Ordering::SeqCst);
                StatusCode::NO_CONTENT
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (queue, rx) = mpsc::channel(4);
    tokio::spawn(run_webhooks(
        rx,
        vec![url],
        Duration::from_secs(5),
        Arc::default(),
    ));
    queue
        .send(Published::Lagged(Lagged::now(1)).into())
        .await
        .unwrap();
    // The retry (after 500 ms) comes after the first attempt has ended,
    // redirect and all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hits[0].load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no retry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        hits[1].load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[test]
fn logged_urls_keep_no_credentials_or_query() {
    assert_eq!(
        redacted("https://user:secret@hooks.example.net:8443/wg/events?token=abc"),
        "https://hooks.example.net:8443/wg/events"
    );
    assert_eq!(redacted("http://127.0.0.1/hook"), "http://127.0.0.1/hook");
}

#[test]
fn a_published_event_is_serialized_as_the_event_itself() {
    let e = connected(0, 7);
    let News::Peer(news) = &e.event else {
        unreachable!()
    };
    let announced = Announced {
        name: ("router", "gw".into()),
        endpoint: None,
    };
    let peer = describe(&e.tenant, e.at, news, announced);
    assert_eq!(
        serde_json::to_value(Published::Peer(peer.clone())).unwrap(),
        serde_json::to_value(&peer).unwrap()
    );
    let lagged = serde_json::to_value(Published::Lagged(Lagged::now(3))).unwrap();
    assert_eq!(lagged["event"], "lagged");
    assert_eq!(lagged["missed"], 3);
    assert!(lagged["at"].as_str().unwrap().ends_with('Z'), "{lagged}");
}

#[tokio::test(start_paused = true)]
async fn endpoints_the_store_refuses_are_taken_from_the_tunnels_until_it_takes_them() {
    // The disk is full for the hand-over and the first retry; the second
    // retry stores them, and then the hub waits for events again.
    let directory = Recorder::default();
    directory.refusals.store(2, Ordering::Relaxed);
    let (tx, hub) = spawn_hub(16, &directory);
    let start = tokio::time::Instant::now();
    tx.send(connected(0, 7)).unwrap();
    tokio::time::sleep(STORE_RETRY * 5).await;
    let at: Vec<_> = directory.reconciled_at.lock().unwrap().clone();
    let after: Vec<_> = at.iter().map(|t| t.duration_since(start)).collect();
    assert_eq!(
        after,
        [STORE_RETRY, STORE_RETRY * 2],
        "retries at {after:?}"
    );
    assert_eq!(directory.batches.lock().unwrap().len(), 1);

    // Stored: the next router is handed over as usual, with no retry.
    tx.send(connected(0, 8)).unwrap();
    tokio::time::sleep(STORE_RETRY * 3).await;
    assert_eq!(directory.batches.lock().unwrap().len(), 2);
    assert_eq!(directory.reconciled.load(Ordering::Relaxed), 2);
    drop(tx);
    hub.await.unwrap();
}
