//! The `wgplane` command: run the appliance; generate keys like `wg`; back up the
//! state, seal it under a new master key, or ask a running appliance's health;
//! move a kernel WireGuard server's tunnel to a running appliance (`import`); and
//! the benchmark tools (`bench`, `relay`).
//!
//! Left out: the appliance's work, which is the library's ([`wgplane::api`],
//! [`wgplane::io`], [`wgplane::control`], [`wgplane::store`]); this binary reads flags,
//! settings and key files (`cli`, `secrets`), wires the parts together and stops them
//! on a signal (`appliance`). `bench` and `relay` are [`wgplane::bench`]'s.

mod appliance;
mod cli;
mod import;
mod secrets;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use wgplane::config::{LogFormat, Settings};
use wgplane::keys::{self, SecretKey};

use crate::appliance::{batch_scheduling, run_appliance};
use crate::cli::{
    parse_cli, BackupArgs, BenchArgs, BenchMode, Command, HealthArgs, RekeyArgs, RelayArgs,
};
use crate::secrets::rekey;

fn main() -> Result<()> {
    match parse_cli().command {
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
        Command::Relay(args) => relay(args),
        Command::Bench(args) => bench(args),
        Command::Backup(args) => backup(args),
        Command::Rekey(args) => rekey_state(args),
        Command::Health(args) => health(args),
        Command::Import(args) => import::import(args),
        Command::Run(args) => run_appliance(*args),
    }
}

/// `wgplane genkey`: a new private key, like `wg genkey`.
pub(crate) fn genkey() -> Result<()> {
    print_line(&SecretKey::generate().to_base64())
}

/// `wgplane pubkey`: the public key of the private key on stdin.
pub(crate) fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let key = SecretKey::parse(&text).context("stdin is not a WireGuard private key")?;
    print_line(&keys::encode(key.public().as_bytes()))
}

/// `text` and a newline on stdout; an error, not a panic (as `println!` has),
/// when stdout is closed (`wgplane genkey | head -c0`).
pub(crate) fn print_line(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush())?;
    Ok(())
}

/// `wgplane relay`: the hubs lab's floor, scheduled and run as the tunnels are.
pub(crate) fn relay(args: RelayArgs) -> Result<()> {
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
pub(crate) fn bench(args: BenchArgs) -> Result<()> {
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
pub(crate) fn backup(args: BackupArgs) -> Result<()> {
    let settings = args.state.settings()?;
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
pub(crate) fn rekey_state(args: RekeyArgs) -> Result<()> {
    own_files_only();
    let settings = args.state.settings()?;
    rekey(&settings, &args.new_key_file)
}

/// `wgplane health`: the appliance's `/healthz`, as an exit status.
pub(crate) fn health(args: HealthArgs) -> Result<()> {
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
pub(crate) fn asked_at(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

/// `…/healthz` of the API at `base`: `http://` unless it names a scheme, and
/// `/healthz` once, whether or not `base` ends with it.
pub(crate) fn healthz_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/healthz").unwrap_or(base);
    match base.contains("://") {
        true => format!("{base}/healthz"),
        false => format!("http://{base}/healthz"),
    }
}

/// Files and directories this process creates are its user's alone (0600 and
/// 0700): the state, its copies and the keys.
pub(crate) fn own_files_only() {
    // SAFETY: umask only sets the process's file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Logs to stderr, `info` and up unless `RUST_LOG` says otherwise.
/// `info`, without boringtun's own lines: they come from its per-peer timers
/// (a handshake retried, a session expired), name neither tenant nor peer, and
/// repeat every few seconds per quiet peer. What they say is in the metrics
/// (`handshake_timeout`, handshakes) and the peer events.
pub(crate) const DEFAULT_LOG_FILTER: &str = "info,boringtun=off";

pub(crate) fn init_logging(format: LogFormat) {
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
