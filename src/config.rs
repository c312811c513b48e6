//! Settings: embedded defaults, then the config file, then `WGPLANE_*` variables and
//! flags (the last two are merged by clap in `main`).
//!
//! Everything is parsed into typed values and checked here, before any port is bound;
//! an error names the file, the key and the reason. This module does no I/O beyond
//! reading the file it is given.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::control::Id;

/// The example config, also the documentation of every key. Tests load it.
pub const EXAMPLE: &str = include_str!("../config/wgplane.toml");

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a key of the wrong type or an unknown key.
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    /// A value is well-typed but not acceptable.
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: &'static str,
        reason: String,
    },
}

/// The whole configuration, as the file spells it. Every field has a default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Admin API.
    pub api: ApiSettings,
    /// Persistent state.
    pub state: StateSettings,
    /// Tunnels and allocation.
    pub tunnels: TunnelSettings,
    /// Peer events.
    pub events: EventSettings,
    /// Management forwards opened at start-up (the API adds more).
    pub forwards: Vec<ForwardSetting>,
    /// TUN mode.
    pub tun: TunSettings,
    /// Logging.
    pub log: LogSettings,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// How each log line is written to stderr.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`),
    /// for log collectors.
    Json,
}

/// `[tun]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TunSettings {
    /// Route the host into the tunnels with a kernel TUN device (needs
    /// `CAP_NET_ADMIN` and `/dev/net/tun`). Off: the userspace stack serves each
    /// tunnel's server address, with no privileges.
    pub enabled: bool,
    /// Device name.
    pub name: String,
    /// Device MTU.
    pub mtu: u16,
}

impl Default for TunSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            name: "wgplane0".into(),
            mtu: 1420,
        }
    }
}

/// `[[forwards]]`: a host TCP listener carried to a router's port in its tunnel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardSetting {
    /// Tenant id.
    pub tenant: String,
    /// Router id.
    pub router: String,
    /// The router's TCP port (8728 for the RouterOS API).
    pub port: u16,
    /// Host address to listen on.
    pub listen: SocketAddr,
}

/// Deepest webhook queue the config may ask for (per URL).
pub const MAX_WEBHOOK_QUEUE: usize = 1_000_000;

/// `[events]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// URLs that receive every peer event as a JSON POST.
    pub webhooks: Vec<String>,
    /// Events waiting for webhook delivery before new ones are dropped.
    pub webhook_queue: usize,
    /// Timeout of one webhook request, in seconds.
    pub webhook_timeout_secs: u16,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            webhook_queue: 1024,
            webhook_timeout_secs: 5,
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Address the admin API listens on.
    pub listen: SocketAddr,
    /// File holding the bearer token; default `<state.dir>/api-token`.
    pub token_file: Option<PathBuf>,
    /// `/metrics` takes the token too (it names tenants and peers): for an API
    /// reachable beyond the host. Prometheus sends it with `authorization:
    /// credentials_file`.
    pub metrics_need_token: bool,
    /// `/metrics` has the `wireguard_*` series per peer (bytes, latest
    /// handshake). A peer costs about 2 µs per scrape: with 100,000 peers a
    /// scrape takes about 0.2 s of CPU and 54 MiB; off, the per-tunnel series
    /// (`wgplane_peers` by status among them) remain.
    pub metrics_per_peer: bool,
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// Directory for the database, the API token and (by default) the master key.
    pub dir: PathBuf,
    /// File holding the master key (32 bytes, base64); default `<dir>/master-key`.
    pub master_key_file: Option<PathBuf>,
    /// Environment variable that, when set, holds the master key (base64) and wins
    /// over the file.
    pub master_key_env: String,
}

/// `[tunnels]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelSettings {
    /// Underlay address the tunnel sockets bind to.
    pub bind: IpAddr,
    /// First listen port handed out.
    pub first_port: u16,
    /// Last listen port handed out (the end of the range a container
    /// publishes, say): beyond it a new tenant is refused.
    pub last_port: u16,
    /// Host name or address that routers and phones dial (the `endpoint` field).
    pub public_host: String,
    /// Range tenant subnets are carved from.
    pub supernet: Ipv4Net,
    /// Prefix length of each tenant subnet.
    pub subnet_prefix_len: u8,
    /// Allocation starts at the subnet holding this address, then wraps around.
    pub subnet_start: Ipv4Addr,
    /// Keepalive interval the appliance uses towards peers, in seconds (0 = off).
    pub keepalive_secs: u16,
    /// Silence after which a peer counts as gone: gateways fail over, and
    /// `peer_disconnected` is sent.
    pub liveness_timeout_secs: u16,
    /// Handshake initiations per second and tunnel answered with a handshake;
    /// above it, and for a second after, initiators get cookie replies
    /// (WireGuard's load defence).
    pub handshakes_per_second: u32,
    /// Handshakes per second the whole process computes across all tunnels;
    /// when it runs dry, or more initiations than this arrive in a second, every
    /// tunnel demands cookies for a second, so a storm cannot starve established
    /// flows of CPU.
    pub handshake_budget_per_second: u32,
    /// Run the tunnels' threads under `SCHED_BATCH` (see `io::sched`):
    /// fewer, larger wake-ups under load. The admin API's keep the default
    /// policy.
    pub batch_scheduling: bool,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token_file: None,
            metrics_need_token: false,
            metrics_per_peer: true,
        }
    }
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./wgplane-state"),
            master_key_file: None,
            master_key_env: "WGPLANE_MASTER_KEY".into(),
        }
    }
}

/// Handshakes per second for the whole process: about a third of one core at
/// ~150 µs of Diffie-Hellman work each.
pub const DEFAULT_HANDSHAKE_BUDGET: u32 = 2_000;

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            first_port: 51820,
            last_port: u16::MAX,
            public_host: "vpn.example.com".into(),
            supernet: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default(),
            subnet_prefix_len: 16,
            subnet_start: Ipv4Addr::new(10, 100, 0, 0),
            keepalive_secs: 0,
            liveness_timeout_secs: 60,
            handshakes_per_second: crate::core::engine::DEFAULT_HANDSHAKES_PER_SECOND,
            handshake_budget_per_second: DEFAULT_HANDSHAKE_BUDGET,
            batch_scheduling: true,
        }
    }
}

impl Settings {
    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(&text, file)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let settings: Settings = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        settings.validate(&file.display().to_string())?;
        Ok(settings)
    }

    /// Checks relations between values. `origin` names where they came from.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.tunnels
            .check()
            .and_then(|()| self.events.check())
            .and_then(|()| self.tun.check())
            .and_then(|()| self.check_forwards())
            .map_err(|(key, reason)| ConfigError::Invalid {
                file: origin.to_owned(),
                key,
                reason,
            })
    }

    /// The `[[forwards]]` entries, and whether they fit the mode.
    fn check_forwards(&self) -> Result<(), Problem> {
        if self.tun.enabled && !self.forwards.is_empty() {
            // As the API's `409 tun_mode`: the host reaches routers through the
            // device, and forwards need the userspace stack that TUN mode replaces.
            return Err((
                "forwards",
                "TUN mode reaches routers through the host device; forwards need tun.enabled = false".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (n, f) in self.forwards.iter().enumerate() {
            let entry = n + 1;
            if let Err(e) = Id::parse(&f.tenant, "tenant") {
                return Err(("forwards.tenant", format!("entry {entry}: {e}")));
            }
            if let Err(e) = Id::parse(&f.router, "router") {
                return Err(("forwards.router", format!("entry {entry}: {e}")));
            }
            if f.port == 0 {
                return Err(("forwards.port", format!("entry {entry}: must not be 0")));
            }
            if !seen.insert((&f.tenant, &f.router, f.port)) {
                return Err((
                    "forwards.port",
                    format!(
                        "entry {entry}: port {} of router {} in tenant {} is listed twice",
                        f.port, f.router, f.tenant
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where the master key file lives.
    pub fn master_key_file(&self) -> PathBuf {
        self.state
            .master_key_file
            .clone()
            .unwrap_or_else(|| self.state.dir.join("master-key"))
    }

    /// The state database.
    pub fn database(&self) -> PathBuf {
        self.state.dir.join("state.db")
    }

    /// Where the API token lives.
    pub fn token_file(&self) -> PathBuf {
        self.api
            .token_file
            .clone()
            .unwrap_or_else(|| self.state.dir.join("api-token"))
    }
}

/// A key that is not acceptable, and why: [`ConfigError::Invalid`] without its file.
type Problem = (&'static str, String);

impl TunnelSettings {
    /// The address plan, the port range, the handshake budgets and the host
    /// peers are told.
    fn check(&self) -> Result<(), Problem> {
        if self.subnet_prefix_len < self.supernet.prefix_len() || self.subnet_prefix_len > 30 {
            return Err((
                "tunnels.subnet_prefix_len",
                format!(
                    "must be between the supernet's /{} and /30, got /{}",
                    self.supernet.prefix_len(),
                    self.subnet_prefix_len
                ),
            ));
        }
        if self.supernet.network() != self.supernet.addr() {
            return Err((
                "tunnels.supernet",
                format!(
                    "{} has host bits set; did you mean {}?",
                    self.supernet,
                    self.supernet.trunc()
                ),
            ));
        }
        if !self.supernet.contains(&self.subnet_start) {
            return Err((
                "tunnels.subnet_start",
                format!(
                    "{} is outside the supernet {}",
                    self.subnet_start, self.supernet
                ),
            ));
        }
        if self.liveness_timeout_secs == 0 {
            return Err(("tunnels.liveness_timeout_secs", "must be at least 1".into()));
        }
        if self.handshake_budget_per_second == 0 {
            return Err((
                "tunnels.handshake_budget_per_second",
                "must be at least 1".into(),
            ));
        }
        if self.handshakes_per_second == 0 {
            return Err(("tunnels.handshakes_per_second", "must be at least 1".into()));
        }
        if self.first_port == 0 {
            return Err(("tunnels.first_port", "must not be 0".into()));
        }
        if self.last_port < self.first_port {
            return Err((
                "tunnels.last_port",
                format!("must not be below first_port ({})", self.first_port),
            ));
        }
        if self.public_host.trim().is_empty() || self.public_host.contains(char::is_whitespace) {
            return Err((
                "tunnels.public_host",
                "must be a host name or address without spaces".into(),
            ));
        }
        // Peers get it with each tunnel's own port: a port, a scheme or a path
        // here would make every endpoint wrong. A colon is IPv6's alone.
        // Brackets only around a whole IPv6 address: the endpoints add their
        // own, and a lone one would be copied into every peer's config.
        let host = self.public_host.as_str();
        let ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(bare) => bare.parse::<std::net::Ipv6Addr>().is_ok(),
            None if host.contains(['[', ']', '/']) => false,
            None => !host.contains(':') || host.parse::<std::net::Ipv6Addr>().is_ok(),
        };
        if !ok {
            return Err((
                "tunnels.public_host",
                format!(
                    "{:?} must be a host name or an IP address, without port, scheme or path (each tunnel adds its own port)",
                    self.public_host
                ),
            ));
        }
        Ok(())
    }
}

impl TunnelSettings {
    /// Why peers may not reach the tunnels at `public_host`: an address of a
    /// family the sockets do not take (an IPv6 one while they bind to IPv4,
    /// an IPv4 one while they bind to one IPv6 address; `::` takes both).
    /// A warning, not an error: a proxy or NAT64 in front may translate.
    pub fn public_host_mismatch(&self) -> Option<&'static str> {
        let host = self
            .public_host
            .trim_start_matches('[')
            .trim_end_matches(']');
        match (host.parse::<IpAddr>().ok()?, self.bind) {
            (IpAddr::V6(_), IpAddr::V4(_)) => Some(
                "tunnels.public_host is an IPv6 address, but the tunnels bind to IPv4: peers would dial where nothing listens (bind to :: for both families)",
            ),
            (IpAddr::V4(_), IpAddr::V6(v6)) if !v6.is_unspecified() => Some(
                "tunnels.public_host is an IPv4 address, but the tunnels bind to one IPv6 address: peers would dial where nothing listens (bind to :: for both families)",
            ),
            _ => None,
        }
    }
}

impl EventSettings {
    /// Webhook URLs and the bounds of their queues.
    fn check(&self) -> Result<(), Problem> {
        for (i, url) in self.webhooks.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                // Not the URL itself: it may carry credentials.
                let scheme = url.split_once("://").map_or("none", |(s, _)| s);
                return Err((
                    "events.webhooks",
                    format!(
                        "entry {} is not an http:// or https:// URL (scheme: {scheme:?})",
                        i + 1
                    ),
                ));
            }
        }
        for (key, value) in [
            ("events.webhook_queue", self.webhook_queue as u64),
            (
                "events.webhook_timeout_secs",
                self.webhook_timeout_secs.into(),
            ),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        // Each URL gets a queue this deep: it bounds what a URL that is down
        // makes the appliance keep.
        if self.webhook_queue > MAX_WEBHOOK_QUEUE {
            return Err((
                "events.webhook_queue",
                format!("must be at most {MAX_WEBHOOK_QUEUE}"),
            ));
        }
        Ok(())
    }
}

impl TunSettings {
    /// The device's name and MTU.
    fn check(&self) -> Result<(), Problem> {
        if self.name.is_empty() || self.name.len() > 15 || self.name.contains(['/', ' ']) {
            return Err((
                "tun.name",
                "must be 1-15 characters, no '/' or spaces".into(),
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(("tun.mtu", format!("{} is outside 576-9000", self.mtu)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_the_defaults_spelled_out() {
        let s = Settings::parse(EXAMPLE, Path::new("config/wgplane.toml")).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn the_port_range_must_not_run_backwards() {
        let e = Settings::parse(
            "[tunnels]\nfirst_port = 51820\nlast_port = 51819\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tunnels.last_port") && e.contains("51820"),
            "{e}"
        );
        let s = Settings::parse("[tunnels]\nlast_port = 51820\n", Path::new("a.toml")).unwrap();
        assert_eq!((s.tunnels.first_port, s.tunnels.last_port), (51820, 51820));
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = Settings::parse("[tunnels]\nfirst_port = \"x\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml:") && e.contains("first_port"), "{e}");
        let e = Settings::parse("[tunels]\n", Path::new("b.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tunels"), "{e}");
        let e = Settings::parse("[tunnels]\nsubnet_prefix_len = 4\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml: key `tunnels.subnet_prefix_len`"), "{e}");
        let e = Settings::parse(
            "[tunnels]\nsupernet = \"10.1.2.3/8\"\n",
            Path::new("d.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tunnels.supernet"), "{e}");
        for key in ["handshakes_per_second", "handshake_budget_per_second"] {
            let e = Settings::parse(&format!("[tunnels]\n{key} = 0\n"), Path::new("e.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("e.toml: key `tunnels.{key}`")), "{e}");
        }
        for key in ["webhook_queue", "webhook_timeout_secs"] {
            let e = Settings::parse(&format!("[events]\n{key} = 0\n"), Path::new("f.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("f.toml: key `events.{key}`")), "{e}");
        }
        // Deep enough to panic tokio's channel, or to hold without bound.
        let e = Settings::parse(
            "[events]\nwebhook_queue = 2305843009213693952\n",
            Path::new("g.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("events.webhook_queue") && e.contains("at most"),
            "{e}"
        );
    }

    /// The endpoint host peers get: a name or an address, never a port, a
    /// scheme or a path (each tunnel adds its own port).
    #[test]
    fn the_public_host_is_a_host_alone() {
        let with = |host: &str| {
            Settings::parse(
                &format!("[tunnels]\npublic_host = \"{host}\"\n"),
                Path::new("h.toml"),
            )
        };
        for good in [
            "vpn.example.com",
            "203.0.113.1",
            "2001:db8::1",
            "[2001:db8::1]",
        ] {
            assert!(with(good).is_ok(), "{good}");
        }
        for bad in [
            "vpn.example.com:51820",
            "https://vpn.example.com",
            "203.0.113.1:1",
            "a/b",
            "[2001:db8::1",
            "2001:db8::1]",
            "[vpn.example.com]",
            "[203.0.113.1]",
            "[2001:db8::1]:51820",
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("tunnels.public_host"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_public_host_of_the_other_family_is_named() {
        let with = |host: &str, bind: &str| TunnelSettings {
            public_host: host.into(),
            bind: bind.parse().unwrap(),
            ..Default::default()
        };
        for (host, bind) in [
            ("2001:db8::1", "0.0.0.0"),
            ("[2001:db8::1]", "203.0.113.1"),
            ("203.0.113.1", "2001:db8::5"),
        ] {
            assert!(
                with(host, bind).public_host_mismatch().is_some(),
                "{host} {bind}"
            );
        }
        for (host, bind) in [
            ("2001:db8::1", "::"),
            ("203.0.113.1", "::"),
            ("203.0.113.1", "0.0.0.0"),
            ("vpn.example.com", "0.0.0.0"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            assert_eq!(
                with(host, bind).public_host_mismatch(),
                None,
                "{host} {bind}"
            );
        }
    }

    #[test]
    fn forwards_are_checked_entry_by_entry() {
        let entry = |tenant: &str, router: &str, port: u16| {
            format!("[[forwards]]\ntenant = \"{tenant}\"\nrouter = \"{router}\"\nport = {port}\nlisten = \"127.0.0.1:0\"\n")
        };
        let good = entry("kitonga", "r1", 8728);
        Settings::parse(&good, Path::new("g.toml")).unwrap();
        for (text, key) in [
            (
                good.clone() + &entry("bad id!", "r1", 22),
                "key `forwards.tenant`: entry 2",
            ),
            (entry("kitonga", "..", 22), "key `forwards.router`: entry 1"),
            (entry("kitonga", "r1", 0), "key `forwards.port`: entry 1"),
            (good.clone() + &good, "key `forwards.port`: entry 2"),
            (
                "[tun]\nenabled = true\n".to_owned() + &good,
                "key `forwards`: TUN mode",
            ),
        ] {
            let e = Settings::parse(&text, Path::new("g.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
