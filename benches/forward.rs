//! Criterion benchmarks of the data plane's per-packet work, each next to a baseline
//! measured in the same run:
//! - `route/decide`: the routing decision (rules 2-6) in a tunnel of 1,000 peers;
//! - `forward/*`: one phone -> gateway packet through `TunnelEngine::handle_datagram`
//!   (demux, decrypt, parse, policy, encrypt), against `boringtun_only`: the same
//!   decrypt + encrypt with two bare `Tunn`s, the floor the engine adds its work to;
//! - `forward_batch64/*`: 64 such datagrams in a row, as one socket wake-up hands
//!   them to the engine (compare per byte with `forward/*`);
//! - `table/100k`: longest-prefix match in a table of 100,000 prefixes, against a
//!   `HashMap` exact lookup of the same addresses (the floor for any lookup), each
//!   probing all of them in a scattered order;
//! - `crypto/*`: boringtun encapsulate and decapsulate alone;
//! - `handshake`: a router's initiation answered by the engine (admission, the
//!   peer's `Tunn`, the response), from the router's last endpoint and from a new
//!   one (one Diffie-Hellman more to find the sender), and a cookie reply under
//!   load, against `x25519_three_dh`: the three variable-base X25519
//!   multiplications no responder can avoid.
//!
//! Run: `cargo bench --bench forward`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ipnet::IpNet;
use wgplane::core::engine::{Sink, TunnelEngine};
use wgplane::core::harness::{Collect, Ktn, MemoryClient};
use wgplane::core::packet::build::ip_packet;
use wgplane::core::policy::{decide, Egress, Origin, RoutingState};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn routing_state(peers: u32) -> RoutingState {
    let mut s = RoutingState {
        local: vec![ip("10.100.0.1")],
        ..Default::default()
    };
    for i in 0..peers {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 1, 1)) + i);
        s.routes.insert(IpNet::from(IpAddr::V4(addr)), i);
    }
    for i in 0..peers / 4 {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 2)) + i);
        s.routes.insert(IpNet::from(IpAddr::V4(addr)), peers + i);
    }
    s.egress.push(Egress {
        pool: "10.200.0.0/16".parse().unwrap(),
        gateways: vec![0, 1],
    });
    s
}

fn bench_decide(c: &mut Criterion) {
    let state = routing_state(1_000);
    let phone = 1_000 + 17;
    let mut g = c.benchmark_group("route");
    // Addresses parsed once, outside the measured loop.
    let (phone_src, internet) = (ip("10.200.0.19"), ip("198.18.0.1"));
    let (r5, r200) = (ip("10.100.1.6"), ip("10.100.2.200"));
    g.bench_function("decide/egress", |b| {
        b.iter(|| {
            decide(
                &state,
                Origin::Peer(phone),
                black_box(phone_src),
                black_box(internet),
                |p| p == 0,
                |p| p >= 1_000,
            )
        })
    });
    g.bench_function("decide/router_to_router", |b| {
        b.iter(|| {
            decide(
                &state,
                Origin::Peer(5),
                black_box(r5),
                black_box(r200),
                |_| true,
                |p| p >= 1_000,
            )
        })
    });
    g.finish();
}

/// Discards outputs; counts them so the optimizer cannot.
struct Discard(usize);

impl Sink for Discard {
    fn send(&mut self, _to: SocketAddr, datagram: &[u8]) {
        self.0 += datagram.len();
    }
    fn local(&mut self, _packet: &[u8]) -> bool {
        false
    }
}

/// Two bare `Tunn`s with a completed handshake: the boringtun-only baselines.
fn session_pair() -> (Tunn, Tunn) {
    let a_secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let b_secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut a = Tunn::new(
        a_secret.clone(),
        PublicKey::from(&b_secret),
        None,
        None,
        1,
        None,
    );
    let mut b = Tunn::new(b_secret, PublicKey::from(&a_secret), None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no response"),
    };
    if let TunnResult::WriteToNetwork(k) = a.decapsulate(None, &resp, &mut buf) {
        let k = k.to_vec();
        let _ = b.decapsulate(None, &k, &mut buf);
    }
    (a, b)
}

fn bench_forward(c: &mut Criterion) {
    for size in [64usize, 1420] {
        let packet = ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), size - 20);
        let mut g = c.benchmark_group(format!("forward/{size}B"));
        g.throughput(Throughput::Bytes(size as u64));

        // Baseline: decrypt with one bare Tunn, encrypt with another. The
        // measured part allocates nothing: it decrypts into one preallocated
        // buffer and encrypts from there into another, as the engine does.
        let (mut a, mut b) = session_pair();
        let mut buf = vec![0u8; 65_600];
        let mut inner = vec![0u8; 65_600];
        let mut out = vec![0u8; 65_600];
        g.bench_function("boringtun_only", |bench| {
            bench.iter_batched(
                || match a.encapsulate(&packet, &mut buf) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => panic!(),
                },
                |datagram| match b.decapsulate(None, &datagram, &mut inner) {
                    TunnResult::WriteToTunnelV4(p, _) => {
                        matches!(b.encapsulate(p, &mut out), TunnResult::WriteToNetwork(_))
                    }
                    _ => panic!("decrypt failed"),
                },
                BatchSize::SmallInput,
            )
        });

        let Ktn {
            mut engine,
            mut phone,
            ..
        } = Ktn::new(Instant::now());
        let from = phone.addr;
        let mut sink = Discard(0);
        // What is measured forwards (checked before, so that a filter that skips
        // these benches skips nothing else).
        let datagram = phone.encrypt(&packet).expect("session");
        engine.handle_datagram(from, &datagram, Instant::now(), &mut sink);
        assert_eq!(engine.stats().forwarded_peer, 1, "the bench must forward");
        // The clock is read once per wake-up, not per packet: outside the
        // measurement, as the baseline has none.
        let now = Instant::now();
        g.bench_function("engine_forward", |bench| {
            bench.iter_batched(
                || phone.encrypt(&packet).expect("session"),
                |datagram| engine.handle_datagram(from, &datagram, now, &mut sink),
                BatchSize::SmallInput,
            )
        });
        g.finish();

        // A batch as one wake-up hands it over: 64 datagrams, one after another.
        let mut g = c.benchmark_group(format!("forward_batch64/{size}B"));
        g.throughput(Throughput::Bytes(64 * size as u64));
        g.bench_function("engine_forward", |bench| {
            bench.iter_batched(
                || {
                    (0..64)
                        .map(|_| phone.encrypt(&packet).expect("session"))
                        .collect::<Vec<_>>()
                },
                |batch| {
                    let now = Instant::now();
                    for datagram in &batch {
                        engine.handle_datagram(from, datagram, now, &mut sink);
                    }
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn bench_table(c: &mut Criterion) {
    use std::collections::HashMap;
    use wgplane::core::table::PrefixTable;
    // 100,000 peers: /32 addresses spread over 10.0.0.0/8, a /24 behind every tenth.
    let mut table = PrefixTable::new();
    let mut exact = HashMap::new();
    let mut probes = Vec::new();
    // Addresses behind a /24 (a router's LAN): no host route, so the trie answers.
    let mut lan_probes = Vec::new();
    for i in 0..100_000u32 {
        let addr = Ipv4Addr::from(0x0a00_0000 + i * 97);
        table.insert(IpNet::from(IpAddr::V4(addr)), i);
        exact.insert(IpAddr::V4(addr), i);
        if i % 10 == 0 {
            let lan = Ipv4Addr::from(0xac10_0000u32 + (i / 10) * 256);
            table.insert(IpNet::new(IpAddr::V4(lan), 24).unwrap(), i);
        }
    }
    // Every address and every LAN once, in a scattered order (a stride coprime
    // with the count), so that the lookups walk the whole table as 100,000
    // peers' traffic would, not a few entries that stay in the cache.
    for i in 0..100_000u32 {
        let j = i.wrapping_mul(7919) % 100_000;
        probes.push(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + j * 97)));
        if i < 10_000 {
            let lan = i.wrapping_mul(7919) % 10_000;
            lan_probes.push(IpAddr::V4(Ipv4Addr::from(0xac10_0000u32 + lan * 256 + 7)));
        }
    }
    let mut g = c.benchmark_group("table/100k");
    let mut n = 0usize;
    g.bench_function("hashmap_exact_baseline", |b| {
        b.iter(|| {
            n = (n + 1) % probes.len();
            exact.get(&probes[n]).copied()
        })
    });
    g.bench_function("prefix_lpm", |b| {
        b.iter(|| {
            n = (n + 1) % probes.len();
            table.lookup(probes[n]).copied()
        })
    });
    g.bench_function("prefix_lpm_lan", |b| {
        b.iter(|| {
            n = (n + 1) % lan_probes.len();
            table.lookup(lan_probes[n]).copied()
        })
    });
    g.finish();
}

fn bench_crypto(c: &mut Criterion) {
    let packet = ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 1400);
    let (mut a, mut b) = session_pair();
    let mut g = c.benchmark_group("crypto/1420B");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    let mut out = vec![0u8; 2048];
    g.bench_function("encapsulate", |bench| {
        bench.iter(|| {
            matches!(
                a.encapsulate(&packet, &mut out),
                TunnResult::WriteToNetwork(_)
            )
        })
    });
    let mut plain = vec![0u8; 2048];
    g.bench_function("decapsulate", |bench| {
        bench.iter_batched(
            || match a.encapsulate(&packet, &mut out) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!(),
            },
            |datagram| {
                matches!(
                    b.decapsulate(None, &datagram, &mut plain),
                    TunnResult::WriteToTunnelV4(..)
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A fresh initiation from `router` (its timestamp is later than the last one's).
fn initiation(router: &mut MemoryClient, buf: &mut [u8]) -> Vec<u8> {
    match router.tunn.format_handshake_initiation(buf, true) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    }
}

fn bench_handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    let secrets: [StaticSecret; 3] =
        std::array::from_fn(|_| StaticSecret::random_from_rng(rand_core::OsRng));
    let publics: [PublicKey; 3] =
        std::array::from_fn(|_| PublicKey::from(&StaticSecret::random_from_rng(rand_core::OsRng)));
    g.bench_function("x25519_three_dh", |b| {
        b.iter(|| {
            secrets
                .iter()
                .zip(&publics)
                .fold(0u8, |acc, (s, p)| acc ^ s.diffie_hellman(p).as_bytes()[0])
        })
    });

    let server = StaticSecret::random_from_rng(rand_core::OsRng);
    let server_public = PublicKey::from(&server);
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 40_000));
    let mut router = MemoryClient::new(&server_public, 7, endpoint);
    let mut buf = vec![0u8; 256];
    let start = Instant::now();
    for (name, limit, new_endpoint) in [
        ("engine_answer", u32::MAX, false),
        ("engine_answer_new_endpoint", u32::MAX, true),
        ("engine_cookie_reply", 1, false),
    ] {
        let mut engine =
            TunnelEngine::new(server.clone(), vec![ip("10.100.0.1")]).with_handshake_limit(limit);
        router.register(&mut engine, &[IpNet::from(ip("10.100.1.2"))], 1);
        let mut sink = Collect::default();
        let mut tick = 0u32;
        let mut answer = |init: &[u8], sink: &mut Collect| {
            tick += 1;
            // A new endpoint: an address the engine has never seen (in memory
            // only, nothing is sent). Time moves 1 ms per initiation.
            let from = if new_endpoint {
                SocketAddr::from((Ipv4Addr::from(0x7f00_0000 | (tick & 0x00ff_ffff)), 1024))
            } else {
                endpoint
            };
            sink.sent.clear();
            engine.handle_datagram(
                from,
                init,
                start + Duration::from_millis(u64::from(tick)),
                sink,
            );
            sink.sent.len()
        };
        // What is measured: the first answers a handshake; under the limit of 1,
        // the next ones get cookie replies (64 bytes), otherwise responses (92).
        let first = initiation(&mut router, &mut buf);
        assert_eq!(answer(&first, &mut sink), 1);
        let second = initiation(&mut router, &mut buf);
        assert_eq!(answer(&second, &mut sink), 1);
        assert_eq!(
            sink.sent[0].1.len(),
            if limit == 1 { 64 } else { 92 },
            "{name}"
        );
        g.bench_function(name, |b| {
            b.iter_batched(
                || initiation(&mut router, &mut buf),
                |init| answer(&init, &mut sink),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_decide,
    bench_forward,
    bench_table,
    bench_crypto,
    bench_handshake
);
criterion_main!(benches);
