//! The command line: every subcommand's flags (each with its `WGPLANE_*`
//! variable where the appliance takes one), and how they and the config file
//! make the settings.
//!
//! Left out: what the commands do (`main`, `appliance`, `secrets`), and the
//! settings' own defaults and checks (`wgplane::config`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};
use ipnet::Ipv4Net;

use wgplane::config::{LogFormat, Settings};

#[derive(Parser)]
#[command(
    version,
    about = "Userspace WireGuard data plane for many tenant tunnels"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the appliance (embedded defaults unless overridden).
    Run(Box<RunArgs>),
    /// Print a new private key, like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Measure a running appliance: forward phone -> gateway packets through a
    /// throw-away tenant and report throughput and the appliance's CPU per GiB.
    Bench(BenchArgs),
    /// A UDP relay that knows nothing of WireGuard: the appliance's socket IO
    /// without its cryptography or routing. `benches/hubs.sh` runs it as the
    /// floor of a userspace hub; not an appliance feature.
    Relay(RelayArgs),
    /// Copy the state database to a file, consistently, also while the
    /// appliance runs. Restore: the copy as `state.db` in a state directory,
    /// with the same master key.
    Backup(BackupArgs),
    /// Seal every private key in the state under a new master key (the
    /// appliance must be stopped). Start it afterwards with the new key.
    Rekey(RekeyArgs),
    /// Ask a running appliance's `/healthz`: exit status 0 when every tunnel
    /// is up, 1 otherwise (a container health check without curl).
    Health(HealthArgs),
    /// Move a kernel WireGuard server to a tenant tunnel of a running
    /// appliance: its configuration file (wg-quick's `wg0.conf`, or what `wg
    /// showconf` prints) becomes a tenant with the same key, port and subnet,
    /// and its peers routers with their keys and addresses, so that they
    /// reconnect without a change. Stop the old interface first (its port).
    Import(ImportArgs),
}

#[derive(Args)]
pub(crate) struct ImportArgs {
    /// The tenant to create (or to complete, after an import that stopped).
    pub(crate) tenant: String,
    /// The server's configuration file.
    pub(crate) file: PathBuf,
    /// The tenant's subnet, when the file has no IPv4 `Address` (`wg
    /// showconf`) or several.
    #[arg(long)]
    pub(crate) subnet: Option<Ipv4Net>,
    /// KTN: the phones' pool (10.200.0.0/24). Its peers become clients, and
    /// the pool leaves through `--gateway`.
    #[arg(long, requires = "gateway")]
    pub(crate) pool: Option<Ipv4Net>,
    /// KTN: a gateway of the pool, by its address in the subnet (10.100.0.40);
    /// again for more, in failover order.
    #[arg(long, requires = "pool")]
    pub(crate) gateway: Vec<std::net::Ipv4Addr>,
    /// Admin API of the appliance.
    #[arg(long, env = "WGPLANE_API_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) api: String,
    /// File with the API token.
    #[arg(
        long,
        env = "WGPLANE_API_TOKEN_FILE",
        default_value = "./wgplane-state/api-token"
    )]
    pub(crate) token_file: PathBuf,
    /// Print what would be created, and change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Send the tunnel's private key over plain HTTP to another host (by
    /// default only over TLS, or to this host).
    #[arg(long)]
    pub(crate) allow_plain_http: bool,
}

#[derive(Args)]
pub(crate) struct HealthArgs {
    /// Admin API of the appliance (`http://host:port`, or `host:port`). Without
    /// it, where `run` would listen: `WGPLANE_API_LISTEN`, else the config
    /// file's `api.listen`, else 127.0.0.1:8080.
    #[arg(long, env = "WGPLANE_API_URL")]
    pub(crate) api: Option<String>,
    /// Config file (TOML) whose `api.listen` is asked, as `run` reads it.
    #[arg(long, env = "WGPLANE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Where `run` listens when told by variable (as `run --api-listen`).
    #[arg(long = "api-listen", env = "WGPLANE_API_LISTEN", hide = true)]
    pub(crate) api_listen: Option<SocketAddr>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub(crate) timeout: u64,
}

/// Where a command that works on the state directory finds it, as `run`
/// does: the config file, then the directory and the master key's file given
/// on their own.
#[derive(Args)]
pub(crate) struct StateArgs {
    /// Config file (TOML), for `state.dir` and where the master key is.
    #[arg(long, env = "WGPLANE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// State directory (wins over the config file).
    #[arg(long, env = "WGPLANE_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// The (current) master key's file, as `run` has it (wins over the config
    /// file).
    #[arg(long, env = "WGPLANE_MASTER_KEY_FILE")]
    pub(crate) master_key_file: Option<PathBuf>,
}

impl StateArgs {
    /// The config file's settings (or the defaults), with the directory and
    /// the master key's file given on their own.
    pub(crate) fn settings(&self) -> Result<Settings> {
        let mut settings = match &self.config {
            Some(file) => Settings::load(file)?,
            None => Settings::default(),
        };
        if let Some(dir) = &self.state_dir {
            settings.state.dir.clone_from(dir);
        }
        if let Some(file) = &self.master_key_file {
            settings.state.master_key_file = Some(file.clone());
        }
        Ok(settings)
    }
}

#[derive(Args)]
pub(crate) struct RekeyArgs {
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// File with the new master key (base64 of 32 bytes); a new random key is
    /// written there (mode 0600) if the file does not exist.
    #[arg(long)]
    pub(crate) new_key_file: PathBuf,
}

#[derive(Args)]
pub(crate) struct BackupArgs {
    // The copy is sealed under the master key, which its summary names.
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// The API token's file, as `run` has it (never a target of the copy).
    #[arg(long, env = "WGPLANE_API_TOKEN_FILE")]
    pub(crate) api_token_file: Option<PathBuf>,
    /// Where the copy goes (replaced once the new copy is complete).
    pub(crate) to: PathBuf,
}

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// Address to listen on.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Where datagrams go; its datagrams go to the last other sender.
    #[arg(long)]
    pub(crate) to: SocketAddr,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Admin API of the appliance.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) api: String,
    /// File with the API token.
    #[arg(long, default_value = "./wgplane-state/api-token")]
    pub(crate) token_file: PathBuf,
    /// Address the appliance's tunnel ports are reached at.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: IpAddr,
    /// Inner packet size in bytes (28-65000).
    #[arg(long, default_value_t = 1420,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(28..=65_000))]
    pub(crate) size: usize,
    /// Seconds to send (1-3600).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) seconds: u64,
    /// What to load the appliance with.
    #[arg(long, value_enum, default_value_t = BenchMode::Flow)]
    pub(crate) mode: BenchMode,
    /// Sending threads (1-64).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub(crate) senders: usize,
    /// Phones (flow: 1-250) or routers per tunnel (handshakes: 1-10000).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub(crate) peers: usize,
    /// Tunnels (handshakes, 1-1000; with --tenant, that one tunnel).
    #[arg(long, default_value_t = 10, conflicts_with = "tenant",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    pub(crate) tunnels: usize,
    /// Peers send with UDP GSO and receive with UDP GRO, like modern WireGuard
    /// implementations; without it, one datagram per syscall.
    #[arg(long)]
    pub(crate) offload: bool,
    /// Handshakes: routers that, inside the storm, retry with the cookie from a
    /// cookie reply as real WireGuard peers do (0-1000).
    #[arg(long, default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1_000))]
    pub(crate) patient: usize,
    /// Handshakes: routers that echo every cookie at once and handshake again as
    /// soon as one is answered, the most Diffie-Hellman work senders that prove
    /// their addresses can cause (0-10000).
    #[arg(long, default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=10_000))]
    pub(crate) echoing: usize,
    /// Handshakes: loopback addresses the routers send from, one per router in
    /// turn (1-65000; above 1 the appliance must be at 127.0.0.1).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_000))]
    pub(crate) sources: usize,
    /// Use this tenant (created if missing, left in place) instead of
    /// throw-away ones: flow adds its gateway and phones to it; handshakes storm
    /// its tunnel alone, from --peers strangers (keys it does not know).
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// PID of the appliance, to measure its CPU time.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// Packets (flow) or initiations (handshakes) per second offered in total
    /// (0: flow as fast as possible, handshakes 25,000/s; at most 10,000,000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub(crate) rate: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The bench's load.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BenchMode {
    /// Phone -> gateway packets through the egress rule.
    Flow,
    /// Gateway -> phone packets (the answers), to every phone in turn.
    Download,
    /// Handshake initiations across many tunnels.
    Handshakes,
}

/// Flags override `WGPLANE_*` variables, which override the config file.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Config file (TOML); see config/wgplane.toml.
    #[arg(long, env = "WGPLANE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// State directory (state.db, api-token, master-key) [default: ./wgplane-state]
    #[arg(long, env = "WGPLANE_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Admin API listen address [default: 127.0.0.1:8080]
    #[arg(long, env = "WGPLANE_API_LISTEN")]
    pub(crate) api_listen: Option<SocketAddr>,
    /// API token file [default: <state dir>/api-token]
    #[arg(long, env = "WGPLANE_API_TOKEN_FILE")]
    pub(crate) api_token_file: Option<PathBuf>,
    /// Master key file [default: <state dir>/master-key]
    #[arg(long, env = "WGPLANE_MASTER_KEY_FILE")]
    pub(crate) master_key_file: Option<PathBuf>,
    /// Underlay address the tunnel sockets bind to (:: for both families) [default: 0.0.0.0]
    #[arg(long, env = "WGPLANE_BIND")]
    pub(crate) bind: Option<IpAddr>,
    /// First tunnel listen port [default: 51820]
    #[arg(long, env = "WGPLANE_FIRST_PORT")]
    pub(crate) first_port: Option<u16>,
    /// Last tunnel listen port handed out: beyond it a new tenant is refused
    /// (409) [default: 65535]
    #[arg(long, env = "WGPLANE_LAST_PORT")]
    pub(crate) last_port: Option<u16>,
    /// Host name or address peers dial [default: vpn.example.com, a placeholder]
    #[arg(long, env = "WGPLANE_PUBLIC_HOST")]
    pub(crate) public_host: Option<String>,
    /// Range tenant subnets are carved from [default: 10.0.0.0/8]
    #[arg(long, env = "WGPLANE_SUPERNET")]
    pub(crate) supernet: Option<Ipv4Net>,
    /// Prefix length of tenant subnets [default: 16]
    #[arg(long, env = "WGPLANE_SUBNET_PREFIX_LEN")]
    pub(crate) subnet_prefix_len: Option<u8>,
    /// Subnet allocation starts at the subnet holding this address [default: 10.100.0.0]
    #[arg(long, env = "WGPLANE_SUBNET_START")]
    pub(crate) subnet_start: Option<Ipv4Addr>,
    /// Seconds of silence after which a peer counts as gone [default: 60]
    #[arg(long, env = "WGPLANE_LIVENESS_TIMEOUT_SECS")]
    pub(crate) liveness_timeout_secs: Option<u16>,
    /// Handshake initiations per second and tunnel answered before cookie replies [default: 1000]
    #[arg(long, env = "WGPLANE_HANDSHAKES_PER_SECOND")]
    pub(crate) handshakes_per_second: Option<u32>,
    /// Handshakes per second the whole process computes, across all tunnels [default: 2000]
    #[arg(long, env = "WGPLANE_HANDSHAKE_BUDGET_PER_SECOND")]
    pub(crate) handshake_budget_per_second: Option<u32>,
    /// Run the tunnels' threads under SCHED_BATCH: no preemption on wake-up,
    /// so a busy tunnel reads longer batches (false: the default policy; the
    /// admin API's threads always keep the default policy) [default: true]
    #[arg(long, env = "WGPLANE_BATCH_SCHEDULING", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) batch_scheduling: Option<bool>,
    /// Log lines as text or as JSON objects [default: text]
    #[arg(long, env = "WGPLANE_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// TUN mode: route the host into the tunnels through a kernel device [default: false]
    #[arg(long, env = "WGPLANE_TUN", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) tun: Option<bool>,
    /// TUN device name [default: wgplane0]
    #[arg(long, env = "WGPLANE_TUN_NAME")]
    pub(crate) tun_name: Option<String>,
    /// Ask the API token on /metrics too (it names tenants, peers' keys and
    /// addresses: set it when the API is reachable beyond the host) [default: false]
    #[arg(long, env = "WGPLANE_METRICS_NEED_TOKEN", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) metrics_need_token: Option<bool>,
    /// Webhook URL for peer events (repeat for several).
    // `--help` names the variable, never its value: URLs may carry credentials.
    #[arg(
        long = "webhook",
        env = "WGPLANE_WEBHOOKS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub(crate) webhooks: Vec<String>,
}

/// The command line; a bad value that came from a `WGPLANE_*` variable is
/// said to come from it (clap's error names only the flag).
pub(crate) fn parse_cli() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let note = variable_behind(&e);
        let _ = e.print();
        if let Some(variable) = note {
            eprintln!("note: the value came from the environment variable {variable}");
        }
        std::process::exit(e.exit_code())
    })
}

/// The variable a refused value came from: set, with no flag on the command
/// line.
pub(crate) fn variable_behind(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // "--last-port <LAST_PORT>"
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let flag = format!("--{long}");
    // `args_os`: an argument that is no UTF-8 (a path) must not panic here.
    let on_command_line = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    if on_command_line {
        return None;
    }
    let cli = Cli::command();
    let variable = std::iter::once(&cli)
        .chain(cli.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_str()?
        .to_owned();
    std::env::var_os(&variable).is_some().then_some(variable)
}

/// File (or defaults), then variables and flags; validated before anything binds.
pub(crate) fn settings(args: &RunArgs) -> Result<Settings> {
    let (mut s, origin) = match &args.config {
        Some(file) => (Settings::load(file)?, file.display().to_string()),
        None => (Settings::default(), "embedded defaults".to_owned()),
    };
    // Each flag (or its variable) given replaces the setting.
    macro_rules! given {
        ($($flag:ident => $setting:expr),* $(,)?) => {
            $(if let Some(v) = &args.$flag {
                $setting = v.clone().into();
            })*
        };
    }
    given! {
        state_dir => s.state.dir,
        api_listen => s.api.listen,
        api_token_file => s.api.token_file,
        master_key_file => s.state.master_key_file,
        bind => s.tunnels.bind,
        first_port => s.tunnels.first_port,
        last_port => s.tunnels.last_port,
        public_host => s.tunnels.public_host,
        supernet => s.tunnels.supernet,
        subnet_prefix_len => s.tunnels.subnet_prefix_len,
        subnet_start => s.tunnels.subnet_start,
        liveness_timeout_secs => s.tunnels.liveness_timeout_secs,
        handshakes_per_second => s.tunnels.handshakes_per_second,
        handshake_budget_per_second => s.tunnels.handshake_budget_per_second,
        log_format => s.log.format,
        batch_scheduling => s.tunnels.batch_scheduling,
        tun => s.tun.enabled,
        metrics_need_token => s.api.metrics_need_token,
        tun_name => s.tun.name,
    }
    if !args.webhooks.is_empty() {
        s.events.webhooks.clone_from(&args.webhooks);
    }
    s.validate(&format!("{origin} with flags and WGPLANE_* variables"))?;
    Ok(s)
}
