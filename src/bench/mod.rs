//! `wgplane bench`: a load generator that users run against their own appliance.
//!
//! It provisions throw-away tenants through the admin API, drives them with
//! in-process boringtun peers over the appliance's real UDP ports, and reads the
//! appliance's CPU time before and after, so every cost figure comes from the
//! same run as the load. Three modes:
//!
//! - [`flow`], upload: phones blast phone -> internet packets through a KTN
//!   tenant's egress rule to its gateway; throughput, packets/s, one-way latency
//!   percentiles, appliance CPU-seconds per GiB and CPU-µs per packet.
//! - [`flow`], download: the gateway sends the internet's answers to every phone
//!   in turn, which the appliance routes to each phone; the same figures.
//! - [`storm`]: many routers across many tunnels send handshake initiations;
//!   handshakes/s answered, cookie replies (the appliance's load defence) and
//!   appliance CPU-µs per handshake.
//!
//! [`relay`] is not a load: it is the other end of the `benches/hubs.sh` lab's
//! floor, a UDP relay with the appliance's socket IO and nothing else.
//!
//! The tenants are deleted at the end, also after a failure. Only the appliance's
//! own addresses are ever contacted. Left out: IPv6 underlay, TCP-level load
//! (the `benches/hubs.sh` lab runs iperf3 through real WireGuard peers).

pub mod cookie;
pub mod cpu;
pub mod flow;
pub mod relay;
pub mod storm;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use serde_json::{json, Value};

use crate::keys;

pub use cpu::process_cpu;

/// Which load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Phone -> gateway packets through the egress rule.
    Flow,
    /// Gateway -> phone packets: the answers, to every phone in turn.
    Download,
    /// Handshake initiations across many tunnels.
    Handshakes,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Admin API base, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// Bearer token.
    pub token: String,
    /// Host the tunnel ports are reached at (usually 127.0.0.1).
    pub host: IpAddr,
    /// Which load.
    pub mode: Mode,
    /// Inner packet size in bytes (flow).
    pub size: usize,
    /// How long to send.
    pub duration: Duration,
    /// Sending threads.
    pub senders: usize,
    /// Peers: phones (flow) or routers per tunnel (handshakes).
    pub peers: usize,
    /// Tunnels (handshakes; flow uses one).
    pub tunnels: usize,
    /// The appliance's PID, for its CPU time; none: not measured.
    pub pid: Option<u32>,
    /// Packets (flow) or initiations (handshakes) per second offered in total;
    /// 0 sends as fast as possible.
    pub rate: u64,
    /// Peers send with UDP GSO and receive with UDP GRO, as modern WireGuard
    /// implementations do; off: one datagram per syscall.
    pub offload: bool,
    /// Handshakes: routers, besides the storm's, that retry with the cookie
    /// from a cookie reply as real WireGuard peers do.
    pub patient: usize,
    /// Handshakes: registered routers that echo every cookie at once and start a
    /// new handshake as soon as one is answered: address-proven load, the most
    /// Diffie-Hellman work senders can make the appliance do.
    pub echoing: usize,
    /// Handshakes: loopback addresses the routers' sockets are spread over
    /// (1: all send from `host`); see [`storm`].
    pub sources: usize,
    /// Use this tenant (created if missing, left in place at the end) instead
    /// of throw-away ones: flow adds its gateway and phones to it; handshakes
    /// storm its tunnel alone, from `peers` strangers (keys it does not know).
    pub tenant: Option<String>,
}

/// The result, printed as a table and as JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BenchReport {
    /// From [`Mode::Flow`].
    Flow(flow::FlowReport),
    /// From [`Mode::Handshakes`].
    Handshakes(storm::StormReport),
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
    /// Interrupted (Ctrl-C); the throw-away tenants were deleted.
    #[error("interrupted; the bench's tenants were deleted")]
    Interrupted,
    /// The run failed and its throw-away tenants could not all be deleted.
    #[error("{run}; and these tenants of the bench could not be deleted: {left}")]
    Cleanup {
        /// Why the run failed.
        run: String,
        /// The tenants left behind.
        left: String,
    },
    /// A given tenant (`--tenant`) has an egress policy or a gateway router of
    /// its own that the flow would replace.
    #[error(
        "tenant {tenant} has {what} of its own; the flow would replace it: use another --tenant"
    )]
    TenantInUse {
        /// The tenant.
        tenant: String,
        /// What it has, as the API shows it.
        what: String,
    },
    /// The spec asks for something the bench cannot do.
    #[error("{0}")]
    Spec(String),
    /// A storm measured nothing that figures could be made of.
    #[error("handshake storm: {0}")]
    Storm(String),
    /// A flow got nothing through the appliance: its figures would be zeros.
    #[error("flow: nothing got through the appliance (sent {sent}, forwarded {forwarded}, received {received})")]
    NothingThrough {
        sent: u64,
        forwarded: u64,
        received: u64,
    },
    /// A handshake did not complete.
    #[error("handshake with the appliance did not complete ({0})")]
    Handshake(&'static str),
}

/// Longest wait for one admin API request.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the bench against a running appliance.
pub async fn run(spec: &BenchSpec) -> Result<BenchReport, BenchError> {
    // The API is the appliance's own address: never through a proxy from
    // HTTP_PROXY / ALL_PROXY (which would get the token), and never waiting
    // forever on a stuck appliance.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(API_TIMEOUT)
        .build()
        .map_err(|e| BenchError::Api(format!("HTTP client: {e}")))?;
    let api = Api {
        client,
        base: spec.api.trim_end_matches('/').to_owned(),
        token: spec.token.clone(),
    };
    let mut tenants = Vec::new();
    // Routers the run registered in a tenant it did not create (their paths).
    let mut routers = Vec::new();
    let work = async {
        match spec.mode {
            Mode::Flow => flow::run(spec, flow::Direction::Up, &api, &mut tenants)
                .await
                .map(BenchReport::Flow),
            Mode::Download => flow::run(spec, flow::Direction::Down, &api, &mut tenants)
                .await
                .map(BenchReport::Flow),
            Mode::Handshakes => storm::run(spec, &api, &mut tenants, &mut routers)
                .await
                .map(BenchReport::Handshakes),
        }
    };
    // Ctrl-C (SIGINT) ends the run, not the process: the clean-up below still
    // runs. A sending thread may go on until its run's end; the caller need
    // not wait for it.
    let result = tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    };
    // Always clean up the throw-away tenants and routers, and say which could
    // not be.
    let mut left = Vec::new();
    for path in routers {
        if let Err(e) = api.call(reqwest::Method::DELETE, &path, None).await {
            tracing::error!(%path, error = %e, "could not delete the bench's router");
            left.push(path);
        }
    }
    for tenant in tenants {
        if let Err(e) = api
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/tenants/{tenant}"),
                None,
            )
            .await
        {
            tracing::error!(%tenant, error = %e, "could not delete the bench's tenant");
            left.push(tenant);
        }
    }
    match result {
        Err(e) if !left.is_empty() => Err(BenchError::Cleanup {
            run: e.to_string(),
            left: left.join(", "),
        }),
        // The report stands; the failed deletes were logged above.
        other => other,
    }
}

/// The report as a small table.
pub fn table(r: &BenchReport) -> String {
    match r {
        BenchReport::Flow(f) => f.table(),
        BenchReport::Handshakes(s) => s.table(),
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it): the wall-clock
/// bounds of a measured window, for scripts that run two benches at once and
/// check that one's window lies inside the other's.
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Formats an optional figure; absent when no `--pid` was given.
fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a (no --pid)".to_owned(), |x| format!("{x:.3} {unit}"))
}

/// The admin API, as the bench uses it.
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// A throw-away tenant tunnel as the API describes it.
pub(crate) struct TunnelInfo {
    pub public: PublicKey,
    pub port: u16,
}

impl Api {
    /// Sends one request with the token; returns the status and the body.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(reqwest::StatusCode, String), BenchError> {
        let fail = |e: reqwest::Error| BenchError::Api(format!("{method} {path}: {e}"));
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let text = resp.text().await.map_err(fail)?;
        Ok((status, text))
    }

    /// GET `path`; none when the API answers 404.
    async fn get_if_any(&self, path: &str) -> Result<Option<Value>, BenchError> {
        let (status, text) = self.request(reqwest::Method::GET, path, None).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(BenchError::Api(format!("GET {path}: {status} {text}")));
        }
        Ok(Some(serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// A request that must succeed; its JSON answer (null if it has none).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, BenchError> {
        let (status, text) = self.request(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(BenchError::Api(format!("{method} {path}: {status} {text}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates tenant `name` (recorded in `created` for the clean-up).
    async fn tenant(
        &self,
        name: &str,
        created: &mut Vec<String>,
    ) -> Result<TunnelInfo, BenchError> {
        let t = self
            .call(reqwest::Method::PUT, &format!("/v1/tenants/{name}"), None)
            .await?;
        created.push(name.to_owned());
        let bad = |what: &str| BenchError::Api(format!("tenant answer lacks {what}: {t}"));
        let public = keys::decode(
            t["server_public_key"]
                .as_str()
                .ok_or_else(|| bad("server_public_key"))?,
        )
        .map(PublicKey::from)
        .map_err(|_| bad("a valid server_public_key"))?;
        let port = t["listen_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("listen_port"))?;
        Ok(TunnelInfo { public, port })
    }

    /// The tenant `name`: `spec.tenant` if given (left in place), else a
    /// throw-away one recorded in `created` for deletion.
    async fn tenant_for(
        &self,
        spec: &BenchSpec,
        name: String,
        created: &mut Vec<String>,
    ) -> Result<(String, TunnelInfo), BenchError> {
        match &spec.tenant {
            Some(given) => Ok((given.clone(), self.tenant(given, &mut Vec::new()).await?)),
            None => {
                let info = self.tenant(&name, created).await?;
                Ok((name, info))
            }
        }
    }

    /// Adds a router with a fresh key; returns its secret.
    async fn router(&self, tenant: &str, id: &str) -> Result<StaticSecret, BenchError> {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = keys::encode(PublicKey::from(&secret).as_bytes());
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/tenants/{tenant}/routers/{id}"),
            Some(json!({ "public_key": public })),
        )
        .await?;
        Ok(secret)
    }

    /// The sum of a counter's samples for one tenant whose line also contains
    /// `also` (a label; empty: any), from `/metrics` (with the token, which
    /// the appliance may require there: `api.metrics_need_token`). A total
    /// since the appliance started: callers read it before and after their run
    /// and use the difference, since a given tenant may have carried traffic
    /// before.
    async fn counter(&self, name: &str, tenant: &str, also: &str) -> Result<f64, BenchError> {
        let (status, text) = self.request(reqwest::Method::GET, "/metrics", None).await?;
        if !status.is_success() {
            return Err(BenchError::Api(format!("GET /metrics: {status} {text}")));
        }
        Ok(sum_counter(&text, name, tenant, also))
    }
}

/// The sum of counter `name`'s samples for `tenant` whose line also contains
/// `also`, in a Prometheus text exposition.
fn sum_counter(text: &str, name: &str, tenant: &str, also: &str) -> f64 {
    let label = format!("tenant=\"{tenant}\"");
    text.lines()
        .filter(|l| {
            // The name exactly: `name{...}` or `name value`, not a longer name.
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(&label) && l.contains(also))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a counter grew by between two reads (none if it went back: the
/// appliance restarted in between).
fn grown(before: f64, after: f64) -> u64 {
    (after - before).max(0.0) as u64
}

/// How long a bench peer keeps trying to complete a handshake (WireGuard peers try
/// for 90 s).
const HANDSHAKE_PATIENCE: Duration = Duration::from_secs(15);

/// Socket buffers of a simulated peer, as wireguard-go sets them.
const PEER_SOCKET_BUFFER: usize = 7 << 20;

/// One simulated peer: a boringtun tunnel and its own UDP socket, connected to
/// the appliance's port.
pub(crate) struct Peer {
    pub tunn: Tunn,
    pub socket: UdpSocket,
}

impl Peer {
    pub fn new(
        secret: StaticSecret,
        server: PublicKey,
        index: u32,
        to: SocketAddr,
    ) -> Result<Self, BenchError> {
        let socket = UdpSocket::bind((to.ip(), 0))?;
        // What wireguard-go asks for (7 MiB each way; the kernel caps it at
        // net.core.rmem_max / wmem_max). With the default 208 KiB a receiver
        // that loses its CPU for a millisecond drops a flat-out flow's bursts.
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(PEER_SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(PEER_SOCKET_BUFFER);
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self {
            tunn: Tunn::new(secret, server, None, None, index, None),
            socket,
        })
    }

    /// Completes a handshake, retrying for up to [`HANDSHAKE_PATIENCE`]: a lost
    /// datagram, or an appliance under a handshake storm that answers with a
    /// cookie and lets each source address through only so often (the bench's
    /// peers all share one address with the storm's routers).
    pub fn handshake(&mut self, name: &'static str) -> Result<(), BenchError> {
        let mut buf = vec![0u8; 2048];
        let mut datagram = vec![0u8; 2048];
        let deadline = std::time::Instant::now() + HANDSHAKE_PATIENCE;
        while std::time::Instant::now() < deadline {
            if let TunnResult::WriteToNetwork(d) =
                self.tunn.format_handshake_initiation(&mut buf, true)
            {
                self.socket.send(d)?;
            }
            if let Ok(n) = self.socket.recv(&mut datagram) {
                if let TunnResult::WriteToNetwork(k) =
                    self.tunn.decapsulate(None, &datagram[..n], &mut buf)
                {
                    self.socket.send(k)?;
                }
                if self.tunn.time_since_last_handshake().is_some() {
                    return Ok(());
                }
            }
        }
        Err(BenchError::Handshake(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_by_exact_name_and_tenant() {
        let text = "\
# TYPE wgplane_egress_packets_total counter
wgplane_egress_packets_total{tenant=\"ktn\",gateway=\"a\"} 10
wgplane_egress_packets_total{tenant=\"ktn\",gateway=\"b\"} 5
wgplane_egress_packets_total{tenant=\"other\"} 100
wgplane_egress_packets_total_extra{tenant=\"ktn\"} 1000
wgplane_packets_forwarded_total{tenant=\"ktn\",path=\"peer_to_peer\"} 7
wgplane_packets_forwarded_total{tenant=\"ktn\",path=\"egress\"} 3
";
        assert_eq!(
            sum_counter(text, "wgplane_egress_packets_total", "ktn", ""),
            15.0
        );
        assert_eq!(
            sum_counter(
                text,
                "wgplane_packets_forwarded_total",
                "ktn",
                "path=\"peer_to_peer\""
            ),
            7.0
        );
        assert_eq!(
            sum_counter(text, "wgplane_egress_packets_total", "none", ""),
            0.0
        );
    }

    #[test]
    fn growth_is_the_difference_and_never_negative() {
        assert_eq!(grown(100.0, 250.0), 150);
        assert_eq!(grown(0.0, 0.0), 0);
        // The appliance restarted in between: its totals went back.
        assert_eq!(grown(500.0, 20.0), 0);
    }
}
