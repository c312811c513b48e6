//! Flow modes through a KTN tenant. Upload ([`Direction::Up`]): phones send
//! packets to an internet address; the appliance's egress rule takes them to the
//! tenant's gateway, where they are counted and timed. Download
//! ([`Direction::Down`]): the gateway sends the internet's answers to every phone
//! in turn; the appliance routes each to its phone, where it is counted and timed.
//!
//! Each packet carries its send time (nanoseconds since the run began) in its
//! payload, so the gateway measures one-way latency through the appliance on the
//! same clock. Latency is only meaningful at a rate the path sustains (`--rate`):
//! flat out it measures the queues.
//!
//! Left out: transport protocols: the packets are bare IPv4 (protocol 253), so no TCP
//! congestion control paces them (the `benches/hubs.sh` lab runs iperf3 for that).
//! Handshake load is [`super::storm`]'s.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::x25519::{PublicKey, StaticSecret};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use super::cpu::CpuMeter;
use super::{opt, Api, BenchError, BenchSpec, Peer};
use crate::core::packet::build::ip_packet;
use crate::keys;

/// Packets a phone sends back to back (one GSO send with offload).
const BURST: usize = 64;

/// Largest GSO send, below the kernel's 64 KiB limit.
const MAX_GSO_BYTES: usize = 60_000;

/// Smallest inner packet: an IPv4 header and the 8-byte send time.
pub const MIN_PACKET_BYTES: usize = 28;

/// Largest inner packet: encrypted (32 bytes more) it still fits one UDP
/// datagram, with room to spare.
pub const MAX_PACKET_BYTES: usize = 65_000;

/// The egress pool and gateway router the flow sets up in its tenant.
const EGRESS_POOL: &str = "198.18.128.0/24";
const GATEWAY: &str = "gateway";

/// Most phones in a flow.
pub const MAX_PHONES: usize = 250;

/// Where the phones send: an address of the simulated internet that nothing
/// answers for; it only names a destination for the egress rule.
const INTERNET: [u8; 4] = [198, 18, 0, 1];

/// One-way latency percentiles, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Which way the packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Direction {
    /// Phones -> gateway (egress rule).
    #[serde(rename = "phones_to_gateway")]
    Up,
    /// Gateway -> phones (the answers, one phone after another).
    #[serde(rename = "gateway_to_phones")]
    Down,
}

/// What a flow run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    pub direction: Direction,
    pub packet_bytes: usize,
    pub seconds: f64,
    pub phones: usize,
    pub offload: bool,
    pub sent_packets: u64,
    /// Packets the appliance forwarded by the egress rule (from its metrics).
    pub forwarded_packets: u64,
    pub received_packets: u64,
    pub loss_percent: f64,
    pub received_gbit_per_s: f64,
    pub received_packets_per_s: f64,
    pub latency: Option<Latency>,
    pub appliance_cpu_seconds: Option<f64>,
    pub appliance_cpu_seconds_per_gib: Option<f64>,
    pub appliance_cpu_us_per_packet: Option<f64>,
    /// The measured window (sending), in milliseconds since the Unix epoch.
    pub window_start_unix_ms: u64,
    pub window_end_unix_ms: u64,
}

impl FlowReport {
    /// The report as a small table.
    pub fn table(&self) -> String {
        let latency = self.latency.as_ref().map_or("n/a".to_owned(), |l| {
            format!(
                "p50 {} / p90 {} / p99 {} / p99.9 {} / max {} µs",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            )
        });
        format!(
            "direction              {}\n\
             packet size            {} B ({} phone(s), peer offload {})\n\
             duration               {:.1} s\n\
             sent / forwarded / received {} / {} / {} packets ({:.2} % lost)\n\
             throughput             {:.3} Gbit/s, {:.0} packets/s\n\
             one-way latency        {}\n\
             appliance CPU          {}\n\
             appliance CPU per GiB  {}\n\
             appliance CPU / packet {}\n",
            match self.direction {
                Direction::Up => "phones -> gateway",
                Direction::Down => "gateway -> phones",
            },
            self.packet_bytes,
            self.phones,
            if self.offload { "on" } else { "off" },
            self.seconds,
            self.sent_packets,
            self.forwarded_packets,
            self.received_packets,
            self.loss_percent,
            self.received_gbit_per_s,
            self.received_packets_per_s,
            latency,
            opt(self.appliance_cpu_seconds, "s"),
            opt(self.appliance_cpu_seconds_per_gib, "s"),
            opt(self.appliance_cpu_us_per_packet, "µs"),
        )
    }
}

/// Provisions a KTN tenant (gateway, egress pool, phones) and runs the flow.
pub(crate) async fn run(
    spec: &BenchSpec,
    direction: Direction,
    api: &Api,
    created: &mut Vec<String>,
) -> Result<FlowReport, BenchError> {
    if !(MIN_PACKET_BYTES..=MAX_PACKET_BYTES).contains(&spec.size) {
        return Err(BenchError::Spec(format!(
            "packet size {} is outside {MIN_PACKET_BYTES}..={MAX_PACKET_BYTES} bytes",
            spec.size
        )));
    }
    if !(1..=MAX_PHONES).contains(&spec.peers) {
        return Err(BenchError::Spec(format!(
            "{} phones: a flow takes 1..={MAX_PHONES}",
            spec.peers
        )));
    }
    let (tenant, tunnel) = api
        .tenant_for(spec, format!("bench-{}", std::process::id()), created)
        .await?;
    let endpoint = SocketAddr::new(spec.host, tunnel.port);
    let policy = json!({"pool": EGRESS_POOL, "gateways": [GATEWAY]});
    if spec.tenant.is_some() {
        // A given tenant's own egress policy and gateway are never replaced:
        // only a policy identical to the bench's (from an earlier bench run) is
        // taken as it is, with its gateway.
        let existing = api
            .get_if_any(&format!("/v1/tenants/{tenant}/egress"))
            .await?;
        match existing {
            Some(existing) if existing != policy => {
                return Err(BenchError::TenantInUse {
                    tenant,
                    what: format!("an egress policy ({existing})"),
                });
            }
            Some(_) => {}
            None => {
                let router = format!("/v1/tenants/{tenant}/routers/{GATEWAY}");
                if api.get_if_any(&router).await?.is_some() {
                    return Err(BenchError::TenantInUse {
                        tenant,
                        what: format!("a router named {GATEWAY:?}"),
                    });
                }
            }
        }
    }
    let gw_secret = api.router(&tenant, GATEWAY).await?;
    api.call(
        reqwest::Method::PUT,
        &format!("/v1/tenants/{tenant}/egress"),
        Some(policy),
    )
    .await?;
    let mut phones = Vec::new();
    for i in 0..spec.peers {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = keys::encode(PublicKey::from(&secret).as_bytes());
        let c = api
            .call(
                reqwest::Method::PUT,
                &format!("/v1/tenants/{tenant}/clients/phone-{i}"),
                Some(json!({ "public_key": public })),
            )
            .await?;
        let ip: IpAddr = c["vpn_ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Api(format!("client answer lacks vpn_ip: {c}")))?;
        phones.push((secret, ip));
    }

    // The appliance's forwarded count, read before and after: a given tenant
    // may have carried traffic before this run.
    let before = forwarded(api, &tenant, direction).await?;
    let blast_spec = spec.clone();
    let server = tunnel.public;
    let mut report = tokio::task::spawn_blocking(move || {
        blast(&blast_spec, direction, server, endpoint, gw_secret, phones)
    })
    .await
    .map_err(|e| BenchError::Api(e.to_string()))??;
    // The appliance's own count: the per-packet and per-GiB figures use it, so
    // losses after the appliance (the receiver's socket) do not inflate them.
    report.forwarded_packets = super::grown(before, forwarded(api, &tenant, direction).await?);
    let (sent, forwarded, received) = (
        report.sent_packets,
        report.forwarded_packets,
        report.received_packets,
    );
    if sent == 0 || forwarded == 0 || received == 0 {
        return Err(BenchError::NothingThrough {
            sent,
            forwarded,
            received,
        });
    }
    if let Some(cpu) = report.appliance_cpu_seconds {
        // The size the packets were sent at.
        let gib =
            (report.forwarded_packets * report.packet_bytes as u64) as f64 / f64::from(1u32 << 30);
        report.appliance_cpu_seconds_per_gib = (gib > 0.0).then(|| cpu / gib);
        report.appliance_cpu_us_per_packet =
            (report.forwarded_packets > 0).then(|| cpu * 1e6 / report.forwarded_packets as f64);
    }
    Ok(report)
}

/// The appliance's count of the packets it forwarded for `tenant` in this
/// direction, since it started: by the egress rule (up) or peer to peer (down).
async fn forwarded(api: &Api, tenant: &str, direction: Direction) -> Result<f64, BenchError> {
    match direction {
        Direction::Up => {
            api.counter("wgplane_egress_packets_total", tenant, "")
                .await
        }
        Direction::Down => {
            api.counter(
                "wgplane_packets_forwarded_total",
                tenant,
                "path=\"peer_to_peer\"",
            )
            .await
        }
    }
}

/// Counters shared by the sending and receiving threads.
#[derive(Default)]
struct Counters {
    /// Tells the senders to stop.
    stop: AtomicBool,
    /// Tells the gateway to stop, once what was in flight has arrived.
    drained: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
}

fn blast(
    spec: &BenchSpec,
    direction: Direction,
    server: PublicKey,
    endpoint: SocketAddr,
    gw_secret: StaticSecret,
    phones: Vec<(StaticSecret, IpAddr)>,
) -> Result<FlowReport, BenchError> {
    let mut gateway = Peer::new(gw_secret, server, 1, endpoint)?;
    gateway.handshake("gateway")?;
    let phone_count = phones.len();
    // Checked in `run`; the floor keeps the send-time stamp in the packet.
    let size = spec.size.max(MIN_PACKET_BYTES);
    let mut peers = Vec::with_capacity(phone_count);
    for (i, (secret, ip)) in phones.into_iter().enumerate() {
        let mut phone = Peer::new(secret, server, 100 + i as u32, endpoint)?;
        phone.handshake("phone")?;
        peers.push((phone, ip));
    }
    // Who sends what, and who receives.
    let (senders, receivers): (Vec<Sender>, Vec<Peer>) = match direction {
        Direction::Up => (
            peers
                .into_iter()
                .map(|(phone, ip)| Sender {
                    packets: vec![ip_packet(ip, IpAddr::from(INTERNET), size - 20)],
                    peer: phone,
                    next: 0,
                })
                .collect(),
            vec![gateway],
        ),
        Direction::Down => {
            let packets = peers
                .iter()
                .map(|(_, ip)| ip_packet(IpAddr::from(INTERNET), *ip, size - 20))
                .collect();
            let sender = Sender {
                peer: gateway,
                packets,
                next: 0,
            };
            (vec![sender], peers.into_iter().map(|(p, _)| p).collect())
        }
    };
    let mut threads = spec.senders.clamp(1, senders.len().max(1));
    if spec.rate > 0 {
        // Each thread paces its own share, and a share of 0 would mean flat out:
        // no more threads than packets per second.
        threads = threads.min(usize::try_from(spec.rate).unwrap_or(usize::MAX));
    }
    let mut groups: Vec<Vec<Sender>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, sender) in senders.into_iter().enumerate() {
        groups[i % threads].push(sender);
    }

    let counters = Counters::default();
    let latency: Mutex<Option<Histogram<u64>>> = Mutex::new(None);
    let begin = Instant::now();
    let wall = std::time::SystemTime::now();
    let mut seconds = 0.0;
    let meter = CpuMeter::start(spec.pid);
    std::thread::scope(|scope| {
        for mut receiver in receivers {
            let (counters_r, latency_r) = (&counters, &latency);
            scope.spawn(move || {
                let hist = receive(&mut receiver, counters_r, begin, spec.offload);
                if let Ok(mut slot) = latency_r.lock() {
                    match slot.as_mut() {
                        // Same bounds: adding cannot fail.
                        Some(all) => {
                            let _ = all.add(&hist);
                        }
                        None => *slot = Some(hist),
                    }
                }
            });
        }
        for (i, group) in groups.into_iter().enumerate() {
            let rate = thread_rate(spec.rate, threads, i);
            let counters_s = &counters;
            scope.spawn(move || send(group, counters_s, begin, size, rate, spec.offload));
        }
        std::thread::sleep(spec.duration);
        counters.stop.store(true, Ordering::Relaxed);
        seconds = begin.elapsed().as_secs_f64();
        drain(&counters);
    });
    let cpu = meter.seconds();
    let sent = counters.sent.load(Ordering::Relaxed);
    let received = counters.received.load(Ordering::Relaxed);
    let bytes = counters.received_bytes.load(Ordering::Relaxed);
    let latency = latency
        .into_inner()
        .ok()
        .flatten()
        .filter(|h| !h.is_empty())
        .map(|h| Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        });
    Ok(FlowReport {
        direction,
        packet_bytes: size,
        seconds,
        phones: phone_count,
        offload: spec.offload,
        sent_packets: sent,
        forwarded_packets: 0,
        received_packets: received,
        loss_percent: if sent == 0 {
            0.0
        } else {
            100.0 * (sent.saturating_sub(received)) as f64 / sent as f64
        },
        received_gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        received_packets_per_s: received as f64 / seconds,
        latency,
        appliance_cpu_seconds: cpu,
        appliance_cpu_seconds_per_gib: None,
        appliance_cpu_us_per_packet: None,
        window_start_unix_ms: super::unix_ms(wall),
        window_end_unix_ms: super::unix_ms(wall + Duration::from_secs_f64(seconds)),
    })
}

/// Sending thread `i`'s share of `rate` packets per second over `threads`
/// threads: the remainder goes one each to the first threads, so the shares add
/// up to `rate` (0 stays 0: flat out).
fn thread_rate(rate: u64, threads: usize, i: usize) -> u64 {
    let threads = threads.max(1) as u64;
    rate / threads + u64::from((i as u64) < rate % threads)
}

/// Packets still in flight when the senders stop are not lost: lets the gateway
/// take them (until nothing arrived for 50 ms, at most 1 s), then stops it.
fn drain(counters: &Counters) {
    let mut last = counters.received.load(Ordering::Relaxed);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let now = counters.received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    counters.drained.store(true, Ordering::Relaxed);
}

/// A receiver (the gateway, or one phone): decrypts, counts and times what
/// arrives until told to stop.
fn receive(peer: &mut Peer, counters: &Counters, begin: Instant, offload: bool) -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; cannot fail with these bounds.
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds");
    let gro = offload
        .then(|| crate::io::udp::batching_state(&peer.socket).ok())
        .flatten();
    let mut datagram = vec![0u8; 65_536];
    let mut buf = vec![0u8; 65_536];
    while !counters.drained.load(Ordering::Relaxed) {
        let (len, stride) = match &gro {
            Some(state) => {
                let mut meta = [quinn_udp::RecvMeta::default()];
                let mut slices = [std::io::IoSliceMut::new(&mut datagram)];
                match state.recv((&peer.socket).into(), &mut slices, &mut meta) {
                    Ok(1) => (meta[0].len, meta[0].stride.max(1)),
                    _ => continue,
                }
            }
            None => match peer.socket.recv(&mut datagram) {
                Ok(n) => (n, n.max(1)),
                Err(_) => continue,
            },
        };
        for one in datagram[..len].chunks(stride) {
            if let TunnResult::WriteToTunnelV4(p, _) = peer.tunn.decapsulate(None, one, &mut buf) {
                counters.received.fetch_add(1, Ordering::Relaxed);
                counters
                    .received_bytes
                    .fetch_add(p.len() as u64, Ordering::Relaxed);
                if let Some(stamp) = p.get(20..28) {
                    let mut sent_at = [0u8; 8];
                    sent_at.copy_from_slice(stamp);
                    let now = begin.elapsed().as_nanos() as u64;
                    let micros = now.saturating_sub(u64::from_le_bytes(sent_at)) / 1_000;
                    hist.saturating_record(micros.max(1));
                }
            }
        }
    }
    hist
}

/// A sending peer and the packets it sends, in turn: a phone's one packet to the
/// internet, or the gateway's answers to each phone.
struct Sender {
    peer: Peer,
    packets: Vec<Vec<u8>>,
    /// The packet it sends next.
    next: usize,
}

/// A sender's next packet in turn (`next` moves on), stamped with the send time.
fn next_packet<'a>(packets: &'a mut [Vec<u8>], next: &mut usize, begin: Instant) -> &'a [u8] {
    let at = *next % packets.len().max(1);
    *next = at + 1;
    match packets.get_mut(at) {
        Some(packet) => {
            stamp(packet, begin);
            packet
        }
        None => &[],
    }
}

/// One sending thread: its peers take turns sending bursts, paced at `rate`
/// packets per second (0: flat out). A burst cycles through the peer's packets.
fn send(
    mut senders: Vec<Sender>,
    counters: &Counters,
    begin: Instant,
    size: usize,
    rate: u64,
    offload: bool,
) {
    if senders.is_empty() {
        return;
    }
    let states: Vec<Option<quinn_udp::UdpSocketState>> = senders
        .iter()
        .map(|s| {
            offload
                .then(|| crate::io::udp::batching_state(&s.peer.socket).ok())
                .flatten()
        })
        .collect();
    let destinations: Vec<SocketAddr> = senders
        .iter()
        .map(|s| s.peer.socket.peer_addr())
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    let mut burst = vec![0u8; BURST * (size + 64)];
    let mut one = vec![0u8; size + 64];
    let started = Instant::now();
    // Packets offered so far: the next burst is due at offered / rate seconds.
    let mut offered = 0u64;
    let mut turn = 0;
    while !counters.stop.load(Ordering::Relaxed) {
        if rate > 0 {
            let due = Duration::from_secs_f64(offered as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        turn = (turn + 1) % senders.len();
        let Sender {
            peer,
            packets,
            next,
        } = &mut senders[turn];
        match &states[turn] {
            Some(state) => {
                let mut len = 0;
                let mut segment = 0;
                // A GSO send carries at most 64 KiB.
                let fits = MAX_GSO_BYTES / (size + 32);
                let segments = BURST.min(state.max_gso_segments()).min(fits).max(1);
                offered += segments as u64;
                for _ in 0..segments {
                    let packet = next_packet(packets, next, begin);
                    if let TunnResult::WriteToNetwork(d) =
                        peer.tunn.encapsulate(packet, &mut burst[len..])
                    {
                        segment = d.len();
                        len += segment;
                    }
                }
                let transmit = quinn_udp::Transmit {
                    destination: destinations
                        .get(turn)
                        .copied()
                        .unwrap_or(SocketAddr::from(([0; 4], 0))),
                    ecn: None,
                    contents: &burst[..len],
                    segment_size: (len > segment).then_some(segment),
                    src_ip: None,
                };
                if segment > 0 && state.try_send((&peer.socket).into(), &transmit).is_ok() {
                    counters
                        .sent
                        .fetch_add((len / segment) as u64, Ordering::Relaxed);
                }
            }
            None => {
                offered += BURST as u64;
                for _ in 0..BURST {
                    let packet = next_packet(packets, next, begin);
                    if let TunnResult::WriteToNetwork(d) = peer.tunn.encapsulate(packet, &mut one) {
                        // A full socket buffer drops, like a real link.
                        if peer.socket.send(d).is_ok() {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// Writes the send time into the packet's payload (bytes 20..28, after the IPv4
/// header; protocol 253 carries no checksum).
fn stamp(packet: &mut [u8], begin: Instant) {
    let now = begin.elapsed().as_nanos() as u64;
    if let Some(slot) = packet.get_mut(20..28) {
        slot.copy_from_slice(&now.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_shares_add_up_to_the_rate() {
        for (rate, threads) in [(0, 3), (7, 3), (2, 2), (100_000, 7), (5, 1)] {
            let shares: Vec<u64> = (0..threads)
                .map(|i| thread_rate(rate, threads, i))
                .collect();
            assert_eq!(shares.iter().sum::<u64>(), rate, "{rate} over {threads}");
            if rate >= threads as u64 {
                assert!(shares.iter().all(|&s| s > 0), "{shares:?}");
            }
        }
        assert_eq!(thread_rate(7, 3, 0), 3);
        assert_eq!(thread_rate(7, 3, 2), 2);
    }
}
