//! The `wgplane` command: run the appliance; generate keys like `wg`; back up the
//! state, seal it under a new master key, or ask a running appliance's health; and
//! the benchmark tools (`bench`, `relay`).
//!
//! Left out: the appliance's work, which is the library's ([`wgplane::api`],
//! [`wgplane::io`], [`wgplane::control`], [`wgplane::store`]); this file reads flags,
//! settings and key files, wires the parts together and stops them on a signal. `bench`
//! and `relay` are [`wgplane::bench`]'s.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use ipnet::Ipv4Net;
use tokio::sync::{broadcast, mpsc, Mutex};

use wgplane::api::{self, AppState, Control};
use wgplane::config::{LogFormat, Settings};
use wgplane::control::registry::{AllocPolicy, Registry};
use wgplane::control::Id;
use wgplane::io::tun::HostDevice;
use wgplane::io::{events, Runtime, RuntimeSettings};
use wgplane::keys::{self, SecretKey};
use wgplane::store::files::{write_private, StateLock};
use wgplane::store::{Change, MasterKey, Store};

#[derive(Parser)]
#[command(
    version,
    about = "Userspace WireGuard data plane for many tenant tunnels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Args)]
struct HealthArgs {
    /// Admin API of the appliance (`http://host:port`, or `host:port`). Without
    /// it, where `run` would listen: `WGPLANE_API_LISTEN`, else the config
    /// file's `api.listen`, else 127.0.0.1:8080.
    #[arg(long, env = "WGPLANE_API_URL")]
    api: Option<String>,
    /// Config file (TOML) whose `api.listen` is asked, as `run` reads it.
    #[arg(long, env = "WGPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// Where `run` listens when told by variable (as `run --api-listen`).
    #[arg(long = "api-listen", env = "WGPLANE_API_LISTEN", hide = true)]
    api_listen: Option<SocketAddr>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    timeout: u64,
}

#[derive(Args)]
struct RekeyArgs {
    /// Config file (TOML), for `state.dir` and where the current master key is.
    #[arg(long, env = "WGPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (wins over the config file).
    #[arg(long, env = "WGPLANE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The current master key's file, as `run` has it (wins over the config file).
    #[arg(long, env = "WGPLANE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// File with the new master key (base64 of 32 bytes); a new random key is
    /// written there (mode 0600) if the file does not exist.
    #[arg(long)]
    new_key_file: PathBuf,
}

#[derive(Args)]
struct BackupArgs {
    /// Config file (TOML), for `state.dir`.
    #[arg(long, env = "WGPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (wins over the config file).
    #[arg(long, env = "WGPLANE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The master key's file, as `run` has it (named in the summary; the
    /// copy is sealed under it).
    #[arg(long, env = "WGPLANE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// The API token's file, as `run` has it (never a target of the copy).
    #[arg(long, env = "WGPLANE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Where the copy goes (replaced once the new copy is complete).
    to: PathBuf,
}

#[derive(Args)]
struct RelayArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Where datagrams go; its datagrams go to the last other sender.
    #[arg(long)]
    to: SocketAddr,
}

#[derive(Args)]
struct BenchArgs {
    /// Admin API of the appliance.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// File with the API token.
    #[arg(long, default_value = "./wgplane-state/api-token")]
    token_file: PathBuf,
    /// Address the appliance's tunnel ports are reached at.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Inner packet size in bytes (28-65000).
    #[arg(long, default_value_t = 1420,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(28..=65_000))]
    size: usize,
    /// Seconds to send (1-3600).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// What to load the appliance with.
    #[arg(long, value_enum, default_value_t = BenchMode::Flow)]
    mode: BenchMode,
    /// Sending threads (1-64).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    senders: usize,
    /// Phones (flow: 1-250) or routers per tunnel (handshakes: 1-10000).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    peers: usize,
    /// Tunnels (handshakes, 1-1000; with --tenant, that one tunnel).
    #[arg(long, default_value_t = 10, conflicts_with = "tenant",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    tunnels: usize,
    /// Peers send with UDP GSO and receive with UDP GRO, like modern WireGuard
    /// implementations; without it, one datagram per syscall.
    #[arg(long)]
    offload: bool,
    /// Handshakes: routers that, inside the storm, retry with the cookie from a
    /// cookie reply as real WireGuard peers do (0-1000).
    #[arg(long, default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1_000))]
    patient: usize,
    /// Handshakes: routers that echo every cookie at once and handshake again as
    /// soon as one is answered, the most Diffie-Hellman work senders that prove
    /// their addresses can cause (0-10000).
    #[arg(long, default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=10_000))]
    echoing: usize,
    /// Handshakes: loopback addresses the routers send from, one per router in
    /// turn (1-65000; above 1 the appliance must be at 127.0.0.1).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_000))]
    sources: usize,
    /// Use this tenant (created if missing, left in place) instead of
    /// throw-away ones: flow adds its gateway and phones to it; handshakes storm
    /// its tunnel alone, from --peers strangers (keys it does not know).
    #[arg(long)]
    tenant: Option<String>,
    /// PID of the appliance, to measure its CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// Packets (flow) or initiations (handshakes) per second offered in total
    /// (0: flow as fast as possible, handshakes 25,000/s; at most 10,000,000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    rate: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The bench's load.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchMode {
    /// Phone -> gateway packets through the egress rule.
    Flow,
    /// Gateway -> phone packets (the answers), to every phone in turn.
    Download,
    /// Handshake initiations across many tunnels.
    Handshakes,
}

/// Flags override `WGPLANE_*` variables, which override the config file.
#[derive(Args)]
struct RunArgs {
    /// Config file (TOML); see config/wgplane.toml.
    #[arg(long, env = "WGPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (state.db, api-token, master-key) [default: ./wgplane-state]
    #[arg(long, env = "WGPLANE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Admin API listen address [default: 127.0.0.1:8080]
    #[arg(long, env = "WGPLANE_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// API token file [default: <state dir>/api-token]
    #[arg(long, env = "WGPLANE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Master key file [default: <state dir>/master-key]
    #[arg(long, env = "WGPLANE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Underlay address the tunnel sockets bind to (:: for both families) [default: 0.0.0.0]
    #[arg(long, env = "WGPLANE_BIND")]
    bind: Option<IpAddr>,
    /// First tunnel listen port [default: 51820]
    #[arg(long, env = "WGPLANE_FIRST_PORT")]
    first_port: Option<u16>,
    /// Last tunnel listen port handed out: beyond it a new tenant is refused
    /// (409) [default: 65535]
    #[arg(long, env = "WGPLANE_LAST_PORT")]
    last_port: Option<u16>,
    /// Host name or address peers dial [default: vpn.example.com, a placeholder]
    #[arg(long, env = "WGPLANE_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Range tenant subnets are carved from [default: 10.0.0.0/8]
    #[arg(long, env = "WGPLANE_SUPERNET")]
    supernet: Option<Ipv4Net>,
    /// Prefix length of tenant subnets [default: 16]
    #[arg(long, env = "WGPLANE_SUBNET_PREFIX_LEN")]
    subnet_prefix_len: Option<u8>,
    /// Subnet allocation starts at the subnet holding this address [default: 10.100.0.0]
    #[arg(long, env = "WGPLANE_SUBNET_START")]
    subnet_start: Option<Ipv4Addr>,
    /// Seconds of silence after which a peer counts as gone [default: 60]
    #[arg(long, env = "WGPLANE_LIVENESS_TIMEOUT_SECS")]
    liveness_timeout_secs: Option<u16>,
    /// Handshake initiations per second and tunnel answered before cookie replies [default: 1000]
    #[arg(long, env = "WGPLANE_HANDSHAKES_PER_SECOND")]
    handshakes_per_second: Option<u32>,
    /// Handshakes per second the whole process computes, across all tunnels [default: 2000]
    #[arg(long, env = "WGPLANE_HANDSHAKE_BUDGET_PER_SECOND")]
    handshake_budget_per_second: Option<u32>,
    /// Run the appliance's threads under SCHED_BATCH: no preemption on wake-up,
    /// so a busy tunnel reads longer batches (false: the default policy) [default: true]
    #[arg(long, env = "WGPLANE_BATCH_SCHEDULING", num_args = 0..=1, default_missing_value = "true")]
    batch_scheduling: Option<bool>,
    /// Log lines as text or as JSON objects [default: text]
    #[arg(long, env = "WGPLANE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// TUN mode: route the host into the tunnels through a kernel device [default: false]
    #[arg(long, env = "WGPLANE_TUN", num_args = 0..=1, default_missing_value = "true")]
    tun: Option<bool>,
    /// TUN device name [default: wgplane0]
    #[arg(long, env = "WGPLANE_TUN_NAME")]
    tun_name: Option<String>,
    /// Ask the API token on /metrics too (it names tenants, peers' keys and
    /// addresses: set it when the API is reachable beyond the host) [default: false]
    #[arg(long, env = "WGPLANE_METRICS_NEED_TOKEN", num_args = 0..=1, default_missing_value = "true")]
    metrics_need_token: Option<bool>,
    /// Webhook URL for peer events (repeat for several).
    // `--help` names the variable, never its value: URLs may carry credentials.
    #[arg(
        long = "webhook",
        env = "WGPLANE_WEBHOOKS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    webhooks: Vec<String>,
}

fn main() -> Result<()> {
    match parse_cli().command {
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
        Command::Relay(args) => relay(args),
        Command::Bench(args) => bench(args),
        Command::Backup(args) => backup(args),
        Command::Rekey(args) => rekey_state(args),
        Command::Health(args) => health(args),
        Command::Run(args) => run_appliance(*args),
    }
}

/// `wgplane genkey`: a new private key, like `wg genkey`.
fn genkey() -> Result<()> {
    print_line(&SecretKey::generate().to_base64())
}

/// `wgplane pubkey`: the public key of the private key on stdin.
fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let key = SecretKey::parse(&text).context("stdin is not a WireGuard private key")?;
    print_line(&keys::encode(key.public().as_bytes()))
}

/// `text` and a newline on stdout; an error, not a panic (as `println!` has),
/// when stdout is closed (`wgplane genkey | head -c0`).
fn print_line(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush())?;
    Ok(())
}

/// `wgplane relay`: the hubs lab's floor, scheduled and run as the tunnels are.
fn relay(args: RelayArgs) -> Result<()> {
    init_logging(LogFormat::Text);
    batch_scheduling();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let relay = wgplane::bench::relay::Relay::bind(args.listen, args.to)
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            tracing::info!(listen = %args.listen, to = %args.to, "relaying");
            relay.run().await.context("relay socket failed")
        })
}

/// `wgplane bench`: load against a running appliance, reported as a table or JSON.
fn bench(args: BenchArgs) -> Result<()> {
    if let Some(pid) = args.pid {
        // Checked now, not found missing after the run: the CPU figures
        // would silently be absent.
        anyhow::ensure!(
            wgplane::bench::process_cpu(pid).is_some(),
            "--pid {pid}: no such process whose CPU time can be read"
        );
    }
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read {}", args.token_file.display()))?;
    let spec = wgplane::bench::BenchSpec {
        api: args.api.clone(),
        token: token.trim().to_owned(),
        host: args.host,
        size: args.size,
        duration: Duration::from_secs(args.seconds),
        mode: match args.mode {
            BenchMode::Flow => wgplane::bench::Mode::Flow,
            BenchMode::Download => wgplane::bench::Mode::Download,
            BenchMode::Handshakes => wgplane::bench::Mode::Handshakes,
        },
        senders: args.senders,
        peers: args.peers,
        tunnels: args.tunnels,
        pid: args.pid,
        rate: args.rate,
        offload: args.offload,
        patient: args.patient,
        echoing: args.echoing,
        sources: args.sources,
        tenant: args.tenant.clone(),
    };
    // Progress (the measured window opening) goes to stderr.
    init_logging(LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(wgplane::bench::run(&spec));
    // After Ctrl-C a sending thread may still be running its measured
    // window out: the process does not wait for it.
    runtime.shutdown_background();
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", wgplane::bench::table(&report));
    }
    Ok(())
}

/// `wgplane backup`: a consistent copy of the state database.
fn backup(args: BackupArgs) -> Result<()> {
    let settings = state_settings(
        args.config.as_deref(),
        args.state_dir.as_deref(),
        args.master_key_file.as_deref(),
    )?;
    // The copy holds sealed keys: it is the operator's alone, like the state.
    own_files_only();
    let database = settings.database();
    let token_file = args
        .api_token_file
        .clone()
        .unwrap_or_else(|| settings.token_file());
    let own = [
        settings.master_key_file(),
        token_file,
        settings.state.dir.join("lock"),
    ];
    let s = wgplane::store::backup::backup(&database, &args.to, &own)?;
    println!(
            "{}: {} tenants, {} routers, {} clients (schema {}); restoring it needs the master key ({} or ${}), which is not in it",
            args.to.display(),
            s.tenants,
            s.routers,
            s.clients,
            s.schema_version,
            settings.master_key_file().display(),
            settings.state.master_key_env
        );
    Ok(())
}

/// `wgplane rekey`: every private key sealed under a new master key.
fn rekey_state(args: RekeyArgs) -> Result<()> {
    own_files_only();
    let settings = state_settings(
        args.config.as_deref(),
        args.state_dir.as_deref(),
        args.master_key_file.as_deref(),
    )?;
    rekey(&settings, &args.new_key_file)
}

/// `wgplane health`: the appliance's `/healthz`, as an exit status.
fn health(args: HealthArgs) -> Result<()> {
    let base = match (&args.api, args.api_listen, &args.config) {
        (Some(api), _, _) => api.clone(),
        (None, Some(listen), _) => asked_at(listen),
        (None, None, Some(file)) => asked_at(Settings::load(file)?.api.listen),
        (None, None, None) => asked_at(Settings::default().api.listen),
    };
    let url = healthz_url(&base);
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            // The appliance is asked directly, never through a proxy of the
            // environment's (a container's HTTP_PROXY would make it "unhealthy").
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(args.timeout))
                .build()?;
            let response = client.get(&url).send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.text().await.unwrap_or_default()))
        })
        .with_context(|| format!("no answer from {url}"))?;
    let (status, body) = answer;
    print!("{body}");
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}

/// Where to ask an appliance that listens on `listen`: a wildcard address is
/// asked on loopback.
fn asked_at(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

/// `…/healthz` of the API at `base`: `http://` unless it names a scheme, and
/// `/healthz` once, whether or not `base` ends with it.
fn healthz_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/healthz").unwrap_or(base);
    match base.contains("://") {
        true => format!("{base}/healthz"),
        false => format!("http://{base}/healthz"),
    }
}

/// `wgplane run`: the appliance, until SIGTERM or Ctrl-C.
fn run_appliance(args: RunArgs) -> Result<()> {
    let settings = settings(&args)?;
    init_logging(settings.log.format);
    // Everything the appliance creates (state directory, database and its
    // journal, token, master key) is its own alone: directories 0700,
    // files 0600.
    own_files_only();
    // Before the runtime exists: its threads inherit the policy.
    if settings.tunnels.batch_scheduling {
        batch_scheduling();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let format = settings.log.format;
    let result = runtime.block_on(run(settings));
    // Blocking work still under way (a scrape's render, say) does not hold
    // the exit up beyond the grace period.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    // With JSON logs the reason the appliance stops is a JSON line too, for
    // the collector that reads the others; in text it is printed as it is.
    if let (Err(e), LogFormat::Json) = (&result, format) {
        tracing::error!(error = %format!("{e:#}"), "stopped: fatal error");
        std::process::exit(1);
    }
    result
}

/// `SCHED_BATCH` for this thread and every thread it creates (call it before
/// the runtime exists); refused, the default policy stays.
fn batch_scheduling() {
    if let Err(e) = wgplane::io::sched::batch_scheduling() {
        tracing::warn!(error = %e, "SCHED_BATCH refused; the default scheduling policy stays");
    }
}

/// Files and directories this process creates are its user's alone (0600 and
/// 0700): the state, its copies and the keys.
fn own_files_only() {
    // SAFETY: umask only sets the process's file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// The settings of a command that only works on the state directory: the
/// config file (or the defaults), and the directory and master key file given
/// on their own.
fn state_settings(
    config: Option<&Path>,
    state_dir: Option<&Path>,
    master_key_file: Option<&Path>,
) -> Result<Settings> {
    let mut settings = match config {
        Some(file) => Settings::load(file)?,
        None => Settings::default(),
    };
    if let Some(dir) = state_dir {
        settings.state.dir = dir.to_owned();
    }
    if let Some(file) = master_key_file {
        settings.state.master_key_file = Some(file.to_owned());
    }
    Ok(settings)
}

/// `wgplane rekey`: the state's private keys sealed under the key in
/// `new_key_file` (made there when missing), with the appliance stopped.
fn rekey(settings: &Settings, new_key_file: &Path) -> Result<()> {
    let database = settings.database();
    anyhow::ensure!(
        database.exists(),
        "no state database at {}",
        database.display()
    );
    // Refused while an appliance runs on the directory: it holds the keys
    // under the current master key.
    let _lock = StateLock::acquire(&settings.state.dir)?;
    let current = load_master_key(settings)?;
    let new = match std::fs::read_to_string(new_key_file) {
        Ok(text) => decode_master_key(&text, &new_key_file.display().to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKey::generate();
            write_private(new_key_file, &keys::encode(&key.to_bytes()))?;
            println!("new master key written to {}", new_key_file.display());
            key
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", new_key_file.display())),
    };
    let mut store = Store::open(&database, current)
        .with_context(|| format!("cannot open {}", database.display()))?;
    let count = store.rekey(new)?;
    println!(
        "{count} private keys sealed under the new master key; from now on only it opens {}: \
         put it in {} or ${} before the next start, and keep the old key for backups made before",
        database.display(),
        settings.master_key_file().display(),
        settings.state.master_key_env
    );
    Ok(())
}

/// File (or defaults), then variables and flags; validated before anything binds.
fn settings(args: &RunArgs) -> Result<Settings> {
    let (mut s, origin) = match &args.config {
        Some(file) => (Settings::load(file)?, file.display().to_string()),
        None => (Settings::default(), "embedded defaults".to_owned()),
    };
    if let Some(v) = &args.state_dir {
        s.state.dir.clone_from(v);
    }
    if let Some(v) = args.api_listen {
        s.api.listen = v;
    }
    if let Some(v) = &args.api_token_file {
        s.api.token_file = Some(v.clone());
    }
    if let Some(v) = &args.master_key_file {
        s.state.master_key_file = Some(v.clone());
    }
    if let Some(v) = args.bind {
        s.tunnels.bind = v;
    }
    if let Some(v) = args.first_port {
        s.tunnels.first_port = v;
    }
    if let Some(v) = args.last_port {
        s.tunnels.last_port = v;
    }
    if let Some(v) = &args.public_host {
        s.tunnels.public_host.clone_from(v);
    }
    if let Some(v) = args.supernet {
        s.tunnels.supernet = v;
    }
    if let Some(v) = args.subnet_prefix_len {
        s.tunnels.subnet_prefix_len = v;
    }
    if let Some(v) = args.subnet_start {
        s.tunnels.subnet_start = v;
    }
    if let Some(v) = args.liveness_timeout_secs {
        s.tunnels.liveness_timeout_secs = v;
    }
    if let Some(v) = args.handshakes_per_second {
        s.tunnels.handshakes_per_second = v;
    }
    if let Some(v) = args.handshake_budget_per_second {
        s.tunnels.handshake_budget_per_second = v;
    }
    if let Some(v) = args.log_format {
        s.log.format = v;
    }
    if let Some(v) = args.batch_scheduling {
        s.tunnels.batch_scheduling = v;
    }
    if let Some(v) = args.tun {
        s.tun.enabled = v;
    }
    if let Some(v) = args.metrics_need_token {
        s.api.metrics_need_token = v;
    }
    if let Some(v) = &args.tun_name {
        s.tun.name.clone_from(v);
    }
    if !args.webhooks.is_empty() {
        s.events.webhooks.clone_from(&args.webhooks);
    }
    s.validate(&format!("{origin} with flags and WGPLANE_* variables"))?;
    Ok(s)
}

/// On every SIGHUP, reads the API token file again: a new token is taken at
/// once (requests with the old one get 401); an unreadable or empty file
/// keeps the old token, and says so.
async fn reload_token_on_hangup(
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

/// The command line; a bad value that came from a `WGPLANE_*` variable is
/// said to come from it (clap's error names only the flag).
fn parse_cli() -> Cli {
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
fn variable_behind(e: &clap::Error) -> Option<String> {
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
    if std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
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

/// Reads the API token, creating it (mode 0600, random) on first start.
fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => anyhow::bail!("API token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let token = SecretKey::generate()
        .to_base64()
        .replace(['+', '/', '='], "");
    write_private(path, &token)?;
    tracing::info!(path = %path.display(), "created a new API token");
    Ok(token)
}

/// A master key as its file or variable holds it; `origin` names which.
fn decode_master_key(text: &str, origin: &str) -> Result<MasterKey> {
    let bytes = keys::decode(text)
        .with_context(|| format!("{origin} does not hold a base64 32-byte master key"))?;
    Ok(MasterKey::from_bytes(bytes))
}

/// The master key: from the variable named in the config, else from the key file;
/// generated into the file only when there is no state yet to open.
fn load_master_key(settings: &Settings) -> Result<MasterKey> {
    let var = &settings.state.master_key_env;
    match std::env::var(var) {
        Ok(text) => return decode_master_key(&text, &format!("environment variable {var}")),
        // Set, but not text: never taken as unset (a new key would be made).
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("environment variable {var} does not hold a base64 32-byte master key")
        }
        Err(std::env::VarError::NotPresent) => {}
    }
    let file = settings.master_key_file();
    match std::fs::read_to_string(&file) {
        Ok(text) => return decode_master_key(&text, &file.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
    if settings.database().exists() {
        anyhow::bail!(
            "state {} exists but its master key is missing: set {var} or restore {}",
            settings.database().display(),
            file.display()
        );
    }
    let key = MasterKey::generate();
    write_private(&file, &keys::encode(&key.to_bytes()))?;
    tracing::warn!(path = %file.display(), "generated a new master key: keep a copy, the state cannot be opened without it");
    Ok(key)
}

/// Adds the config file's `[[forwards]]` to the registry (and the store).
fn apply_config_forwards(
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

async fn run(settings: Settings) -> Result<()> {
    // The stop signals are caught from the start: as PID 1 (a container) a
    // process without a handler ignores SIGTERM. Before the API serves, a stop
    // ends the process at once, as a kill would (the state survives one by
    // design); after, it shuts down gracefully.
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_asked, mut stop_requested) = tokio::sync::watch::channel(false);
    tokio::spawn({
        let serving = Arc::clone(&serving);
        async move {
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
        }
    });
    // SIGHUP re-reads the API token; caught from the start, so that one sent
    // during start-up does not end the process (its default), and acted on
    // once the API serves.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot catch SIGHUP")?;
    // Held until the process ends: a second appliance on this directory would
    // keep its own registry over the same database.
    let _lock = StateLock::acquire(&settings.state.dir)?;
    // Made 0700 when the appliance creates it; one made before (a volume, a
    // `mkdir` in an image) keeps its mode, which the operator should know of.
    if let Ok(meta) = std::fs::metadata(&settings.state.dir) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %settings.state.dir.display(), mode = format!("{:o}", mode & 0o777),
                "the state directory is open to other users (its files are 0600): chmod 700 it");
        }
    }
    // A kill inside an earlier start's key or token write may have left a
    // temporary copy beside a complete file: no second copy of a key stays.
    for path in [settings.token_file(), settings.master_key_file()] {
        wgplane::store::files::remove_temporaries_of(&path)?;
    }
    let token = load_or_create_token(&settings.token_file())?;
    if settings.tunnels.public_host == "vpn.example.com" {
        tracing::warn!("tunnels.public_host is the placeholder vpn.example.com: set it to the address peers dial");
    }
    let master = load_master_key(&settings)?;
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
    let t = &settings.tunnels;
    let registry = Registry::restore(
        AllocPolicy {
            first_port: t.first_port,
            last_port: t.last_port,
            supernet: t.supernet,
            subnet_prefix_len: t.subnet_prefix_len,
            subnet_start: t.subnet_start,
        },
        rand_core::RngCore::next_u32(&mut rand_core::OsRng),
        tenants,
    )
    .with_context(|| format!("cannot take back the state in {}", database.display()))?;
    let host = if settings.tun.enabled {
        let device = HostDevice::open(&settings.tun.name, settings.tun.mtu).context(
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
    let mut runtime = Runtime::new(RuntimeSettings {
        host,
        bind: t.bind,
        keepalive: (t.keepalive_secs > 0).then_some(t.keepalive_secs),
        liveness_timeout: Duration::from_secs(u64::from(t.liveness_timeout_secs)),
        handshakes_per_second: t.handshakes_per_second,
        handshake_budget_per_second: t.handshake_budget_per_second,
    });
    let engine_events = runtime.subscribe();
    let mut store = store;
    let mut registry = registry;
    apply_config_forwards(&settings, &mut registry, &mut store)?;
    let mut restored = 0usize;
    for tenant in registry.tenants() {
        match runtime.bring_up(tenant).await {
            Ok(()) => restored += 1,
            // Down, not gone: the supervisor tries again, and /healthz says so.
            Err(e) => tracing::error!(
                tenant = %tenant.id,
                error = %e,
                retry_secs = api::supervisor::RETRY.as_secs(),
                "tunnel could not be restored"
            ),
        }
    }
    tracing::info!(tunnels = restored, database = %database.display(), "state restored");
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
        public_host: t.public_host.clone(),
        events: broadcast::channel(1024).0,
        event_stats: Arc::default(),
        api_requests: Default::default(),
        scraping: Default::default(),
        last_health: Default::default(),
        stopping,
    });
    tokio::spawn(reload_token_on_hangup(
        hangups,
        Arc::clone(&state),
        settings.token_file(),
    ));
    state.control.lock().await.record_bound_forwards();
    // The background tasks run as long as the process: one that ends (a bug)
    // stops the appliance with an error, for its supervisor (systemd, the
    // container's restart policy) to start it again from the store, rather
    // than leave it running without tunnels revived or events sent.
    let mut background = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let webhooks = (!settings.events.webhooks.is_empty()).then(|| {
        let (queue, rx) = mpsc::channel(settings.events.webhook_queue);
        let task = background.spawn(events::run_webhooks(
            rx,
            settings.events.webhooks.clone(),
            Duration::from_secs(u64::from(settings.events.webhook_timeout_secs)),
            Arc::clone(&state.event_stats),
        ));
        names.insert(task.id(), "webhooks");
        queue
    });
    let task = background.spawn(api::supervisor::run(Arc::clone(&state)));
    names.insert(task.id(), "supervisor");
    let task = background.spawn(events::run_hub(
        engine_events,
        Arc::clone(&state),
        state.events.clone(),
        webhooks,
        Arc::clone(&state.event_stats),
    ));
    names.insert(task.id(), "event hub");
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
        Some(ended) = background.join_next_with_id() => {
            let (id, how) = match ended {
                Ok((id, ())) => (id, "ended".to_owned()),
                Err(e) => (e.id(), e.to_string()),
            };
            let task = names.get(&id).copied().unwrap_or("background");
            tracing::error!(task, how = %how, "a background task stopped; exiting");
            failed = Some(format!("the {task} task: {how}"));
        }
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

/// How long a shutdown waits for open requests before it goes on.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a shutdown then waits for a change under way to be stored.
const CHANGE_GRACE: Duration = Duration::from_secs(2);

/// How long the runtime's blocking work (a scrape's render, say) may hold the
/// exit up. The three graces add up to 8 s, under the 10 s that `docker stop`
/// gives before SIGKILL.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// Ctrl-C or SIGTERM, whichever comes first.
async fn shutdown_signal() {
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

/// Logs to stderr, `info` and up unless `RUST_LOG` says otherwise.
/// `info`, without boringtun's own lines: they come from its per-peer timers
/// (a handshake retried, a session expired), name neither tenant nor peer, and
/// repeat every few seconds per quiet peer. What they say is in the metrics
/// (`handshake_timeout`, handshakes) and the peer events.
const DEFAULT_LOG_FILTER: &str = "info,boringtun=off";

fn init_logging(format: LogFormat) {
    // A RUST_LOG that is no filter is said, not silently replaced.
    let (filter, refused) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => {
            let set = std::env::var_os("RUST_LOG").is_some();
            (DEFAULT_LOG_FILTER.into(), set.then(|| e.to_string()))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    if let Some(error) = refused {
        tracing::warn!(%error, default = DEFAULT_LOG_FILTER, "RUST_LOG is not a filter: the default levels apply");
    }
}
