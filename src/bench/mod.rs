//! `wgplane bench`: a load generator that users run against their own appliance.
//!
//! It provisions a throw-away KTN tenant through the admin API (a gateway router,
//! an egress pool, a phone), completes both handshakes with in-process boringtun
//! peers, then blasts phone -> internet packets for a fixed time and counts what
//! the gateway receives. It reads the appliance's CPU time from `/proc/<pid>/stat`
//! before and after, so the figure that matters — appliance CPU-seconds per GiB
//! forwarded, and CPU-µs per packet — comes from the same run. The tenant is
//! deleted at the end. Only the appliance's own addresses are ever contacted.
//!
//! Left out for now: latency percentiles, handshake storms, many peers.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use serde_json::{json, Value};

use crate::core::packet::build::ip_packet;
use crate::keys;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Admin API base, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// Bearer token.
    pub token: String,
    /// Host the tunnel ports are reached at (usually 127.0.0.1).
    pub host: IpAddr,
    /// Inner packet size in bytes.
    pub size: usize,
    /// How long to send.
    pub duration: Duration,
    /// Sending threads (each its own phone socket).
    pub senders: usize,
    /// The appliance's PID, for its CPU time; none: not measured.
    pub pid: Option<u32>,
    /// Packets per second to offer in total; 0 sends as fast as possible.
    pub rate: u64,
}

/// The result, printed as a table and as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub packet_bytes: usize,
    pub seconds: f64,
    pub sent_packets: u64,
    pub received_packets: u64,
    /// Packets the appliance forwarded by the egress rule (from its metrics).
    pub forwarded_packets: u64,
    pub loss_percent: f64,
    pub received_gbit_per_s: f64,
    pub received_packets_per_s: f64,
    pub appliance_cpu_seconds: Option<f64>,
    pub appliance_cpu_seconds_per_gib: Option<f64>,
    pub appliance_cpu_us_per_packet: Option<f64>,
}

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The admin API refused or was unreachable.
    #[error("admin API: {0}")]
    Api(String),
    /// A socket could not be used.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A handshake did not complete.
    #[error("handshake with the appliance did not complete ({0})")]
    Handshake(&'static str),
}

/// CPU time (user + system, all threads, living and exited) of a process.
///
/// Read from the process's CPU-time clock (`clock_getcpuclockid`), which has
/// nanosecond resolution; `/proc/<pid>/stat` counts in 10 ms ticks, too coarse
/// for a short run of a fast appliance, and is only the fallback.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_clock(pid).or_else(|| proc_stat_cpu(pid))
}

fn cpu_clock(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer for the duration of the call.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id only yields an error.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

fn proc_stat_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Clock ticks are 100 per second on every Linux this runs on (USER_HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, BenchError> {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| BenchError::Api(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(BenchError::Api(format!("{method} {path}: {status} {text}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

struct Peer {
    tunn: Tunn,
    socket: UdpSocket,
}

impl Peer {
    fn new(
        secret: StaticSecret,
        server: PublicKey,
        index: u32,
        to: SocketAddr,
    ) -> Result<Self, BenchError> {
        let socket = UdpSocket::bind((to.ip(), 0))?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self {
            tunn: Tunn::new(secret, server, None, None, index, None),
            socket,
        })
    }

    fn handshake(&mut self, name: &'static str) -> Result<(), BenchError> {
        let mut buf = vec![0u8; 2048];
        for _ in 0..10 {
            if let TunnResult::WriteToNetwork(d) =
                self.tunn.format_handshake_initiation(&mut buf, true)
            {
                let d = d.to_vec();
                self.socket.send(&d)?;
            }
            let mut datagram = vec![0u8; 2048];
            if let Ok(n) = self.socket.recv(&mut datagram) {
                if let TunnResult::WriteToNetwork(k) =
                    self.tunn.decapsulate(None, &datagram[..n], &mut buf)
                {
                    let k = k.to_vec();
                    self.socket.send(&k)?;
                }
                if self.tunn.time_since_last_handshake().is_some() {
                    return Ok(());
                }
            }
        }
        Err(BenchError::Handshake(name))
    }
}

/// Runs the bench against a running appliance.
pub async fn run(spec: &BenchSpec) -> Result<BenchReport, BenchError> {
    let api = Api {
        client: reqwest::Client::new(),
        base: spec.api.trim_end_matches('/').to_owned(),
        token: spec.token.clone(),
    };
    let tenant = format!("bench-{}", std::process::id());
    let t = api
        .call(reqwest::Method::PUT, &format!("/v1/tenants/{tenant}"), None)
        .await?;
    let result = run_on(spec, &api, &tenant, &t).await;
    // Always clean up the throw-away tenant.
    let _ = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/{tenant}"),
            None,
        )
        .await;
    result
}

async fn run_on(
    spec: &BenchSpec,
    api: &Api,
    tenant: &str,
    t: &Value,
) -> Result<BenchReport, BenchError> {
    let bad = |what: &str| BenchError::Api(format!("tenant answer lacks {what}: {t}"));
    let server = keys::decode(
        t["server_public_key"]
            .as_str()
            .ok_or_else(|| bad("server_public_key"))?,
    )
    .map(PublicKey::from)
    .map_err(|_| bad("a valid server_public_key"))?;
    let port = t["listen_port"]
        .as_u64()
        .ok_or_else(|| bad("listen_port"))? as u16;
    let endpoint = SocketAddr::new(spec.host, port);

    let gw_secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let gw_public = keys::encode(PublicKey::from(&gw_secret).as_bytes());
    api.call(
        reqwest::Method::PUT,
        &format!("/v1/tenants/{tenant}/routers/gateway"),
        Some(json!({"name": "bench gateway", "public_key": gw_public})),
    )
    .await?;
    api.call(
        reqwest::Method::PUT,
        &format!("/v1/tenants/{tenant}/egress"),
        Some(json!({"pool": "198.18.128.0/24", "gateways": ["gateway"]})),
    )
    .await?;
    let mut phones = Vec::new();
    for i in 0..spec.senders.max(1) {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = keys::encode(PublicKey::from(&secret).as_bytes());
        let c = api
            .call(
                reqwest::Method::PUT,
                &format!("/v1/tenants/{tenant}/clients/phone-{i}"),
                Some(json!({"public_key": public})),
            )
            .await?;
        let ip: IpAddr = c["vpn_ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Api(format!("client answer lacks vpn_ip: {c}")))?;
        phones.push((secret, ip));
    }

    let blast_spec = spec.clone();
    let mut report = tokio::task::spawn_blocking(move || {
        blast(&blast_spec, server, endpoint, gw_secret, phones)
    })
    .await
    .map_err(|e| BenchError::Api(e.to_string()))??;
    // The appliance's own count: the per-packet and per-GiB figures use it, so
    // losses after the appliance (the receiver's socket) do not inflate them.
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .map_err(|e| BenchError::Api(e.to_string()))?
        .text()
        .await
        .unwrap_or_default();
    let label = format!("tenant=\"{tenant}\"");
    report.forwarded_packets = metrics
        .lines()
        .find(|l| l.starts_with("wgplane_egress_packets_total") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    if let Some(cpu) = report.appliance_cpu_seconds {
        let gib = (report.forwarded_packets * spec.size as u64) as f64 / f64::from(1u32 << 30);
        report.appliance_cpu_seconds_per_gib = (gib > 0.0).then(|| cpu / gib);
        report.appliance_cpu_us_per_packet =
            (report.forwarded_packets > 0).then(|| cpu * 1e6 / report.forwarded_packets as f64);
    }
    Ok(report)
}

fn blast(
    spec: &BenchSpec,
    server: PublicKey,
    endpoint: SocketAddr,
    gw_secret: StaticSecret,
    phones: Vec<(StaticSecret, IpAddr)>,
) -> Result<BenchReport, BenchError> {
    let mut gateway = Peer::new(gw_secret, server, 1, endpoint)?;
    gateway.handshake("gateway")?;
    let mut senders = Vec::new();
    for (i, (secret, ip)) in phones.into_iter().enumerate() {
        let mut phone = Peer::new(secret, server, 100 + i as u32, endpoint)?;
        phone.handshake("phone")?;
        senders.push((phone, ip));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_before = spec.pid.and_then(process_cpu);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (stop_r, received_r, bytes_r) = (
            Arc::clone(&stop),
            Arc::clone(&received),
            Arc::clone(&received_bytes),
        );
        let gateway = &mut gateway;
        scope.spawn(move || {
            let mut datagram = vec![0u8; 65_536];
            let mut buf = vec![0u8; 65_536];
            while !stop_r.load(Ordering::Relaxed) {
                let Ok(n) = gateway.socket.recv(&mut datagram) else {
                    continue;
                };
                if let TunnResult::WriteToTunnelV4(p, _) =
                    gateway.tunn.decapsulate(None, &datagram[..n], &mut buf)
                {
                    received_r.fetch_add(1, Ordering::Relaxed);
                    bytes_r.fetch_add(p.len() as u64, Ordering::Relaxed);
                }
            }
        });
        let per_sender = spec.rate / senders.len().max(1) as u64;
        for (mut phone, ip) in senders.drain(..) {
            let (stop_s, sent_s) = (Arc::clone(&stop), Arc::clone(&sent));
            let size = spec.size.max(28);
            scope.spawn(move || {
                let packet = ip_packet(ip, IpAddr::from([198, 18, 0, 1]), size - 20);
                let mut out = vec![0u8; size + 64];
                let begin = Instant::now();
                let mut batches = 0u64;
                while !stop_s.load(Ordering::Relaxed) {
                    // Pacing: batch `n` of 64 is due at n * 64 / rate seconds.
                    if per_sender > 0 {
                        let due =
                            Duration::from_secs_f64(batches as f64 * 64.0 / per_sender as f64);
                        if let Some(wait) = due.checked_sub(begin.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    batches += 1;
                    for _ in 0..64 {
                        if let TunnResult::WriteToNetwork(d) =
                            phone.tunn.encapsulate(&packet, &mut out)
                        {
                            // A full socket buffer drops, like a real link.
                            if phone.socket.send(d).is_ok() {
                                sent_s.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
        std::thread::sleep(spec.duration);
        stop.store(true, Ordering::Relaxed);
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, spec.pid.and_then(process_cpu)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
        _ => None,
    };
    let (sent, received, bytes) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        received_bytes.load(Ordering::Relaxed),
    );
    let gib = bytes as f64 / f64::from(1u32 << 30);
    Ok(BenchReport {
        packet_bytes: spec.size,
        seconds,
        sent_packets: sent,
        received_packets: received,
        forwarded_packets: 0,
        loss_percent: if sent == 0 {
            0.0
        } else {
            100.0 * (sent.saturating_sub(received)) as f64 / sent as f64
        },
        received_gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        received_packets_per_s: received as f64 / seconds,
        appliance_cpu_seconds: cpu,
        appliance_cpu_seconds_per_gib: cpu.filter(|_| gib > 0.0).map(|c| c / gib),
        appliance_cpu_us_per_packet: cpu
            .filter(|_| received > 0)
            .map(|c| c * 1e6 / received as f64),
    })
}

/// The report as a small table.
pub fn table(r: &BenchReport) -> String {
    let opt = |v: Option<f64>, unit: &str| {
        v.map_or("n/a (no --pid)".to_owned(), |x| format!("{x:.3} {unit}"))
    };
    format!(
        "packet size            {} B\n\
         duration               {:.1} s\n\
         sent / forwarded / received {} / {} / {} packets ({:.2} % lost)\n\
         throughput             {:.3} Gbit/s, {:.0} packets/s\n\
         appliance CPU          {}\n\
         appliance CPU per GiB  {}\n\
         appliance CPU / packet {}\n",
        r.packet_bytes,
        r.seconds,
        r.sent_packets,
        r.forwarded_packets,
        r.received_packets,
        r.loss_percent,
        r.received_gbit_per_s,
        r.received_packets_per_s,
        opt(r.appliance_cpu_seconds, "s"),
        opt(r.appliance_cpu_seconds_per_gib, "s"),
        opt(r.appliance_cpu_us_per_packet, "µs"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time() {
        let pid = std::process::id();
        let before = process_cpu(pid).expect("/proc/self/stat");
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let after = process_cpu(pid).expect("/proc/self/stat");
        assert!(after > before, "{before:?} -> {after:?} ({x})");
        assert!(process_cpu(u32::MAX).is_none());
        // The precise clock and the tick counter tell the same story.
        let clock = cpu_clock(pid).expect("CPU clock");
        let ticks = proc_stat_cpu(pid).expect("/proc/self/stat");
        let gap = clock.abs_diff(ticks);
        assert!(gap < Duration::from_millis(100), "{clock:?} vs {ticks:?}");
    }
}
