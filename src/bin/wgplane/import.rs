//! `wgplane import`: a kernel WireGuard server's configuration made a tenant
//! tunnel of a running appliance, through its admin API.
//!
//! Left out: reading the file and deciding what to create, which are the
//! library's ([`wgplane::control::wgconf`], [`wgplane::control::import`]);
//! this sends the requests in order and says what each did. The requests are
//! the API's ordinary `PUT`s, so an import that stopped (a router refused, the
//! appliance restarted) can be run again: what exists already is made as the
//! file says, and a router id held by another key is not touched. Before the
//! first `PUT` (and in a dry run) it asks the appliance what its other tenants
//! hold.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use wgplane::control::import::{conflicts, plan, Existing, Options, Plan, Planned};
use wgplane::control::{wgconf, Id};

use crate::cli::ImportArgs;

pub(crate) fn import(args: ImportArgs) -> Result<()> {
    let tenant = Id::parse(&args.tenant, "tenant").context("the tenant id")?;
    // Not UTF-8 (a Latin-1 comment, say) is no reason to refuse a file `wg` takes.
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let conf = wgconf::parse(&text).with_context(|| format!("{}", args.file.display()))?;
    let options = Options {
        subnet: args.subnet,
        pool: args.pool,
        gateways: args.gateway.clone(),
    };
    let plan = plan(&conf, &options)?;
    for note in &plan.notes {
        println!("note: {note}");
    }
    let base = api_base(&args.api);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Both runs send the API token; the real one the tunnel's private key too.
    let safe = args.allow_plain_http || private_on_the_way(&base);
    let api = match safe {
        true => connect(&args, &base),
        false => Err(anyhow::anyhow!(
            "{base} is plain HTTP to another host, which would carry the API token"
        )),
    };
    if args.dry_run {
        print_plan(&tenant, &plan);
        // The appliance's other tenants are asked too, when it can be: what
        // they would refuse is better known before the old interface goes down.
        let asked = match &api {
            Ok(api) => runtime.block_on(existing(api)),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        match asked {
            Ok(existing) => {
                let found = conflicts(&plan, &tenant, &existing);
                for conflict in &found {
                    println!("would be refused: {conflict}");
                }
                if found.is_empty() {
                    println!("the appliance at {base} has no tenant in the way");
                }
            }
            Err(e) => println!(
                "note: the appliance was not asked ({e}): its other tenants may still refuse \
                 the port, the subnet or the pool"
            ),
        }
        return Ok(());
    }
    if !safe {
        bail!(
            "{base} is plain HTTP to another host, and the import sends the API token and the \
             tunnel's private key: run it on the appliance's host (--api http://127.0.0.1:…), \
             through TLS (https://), or give --allow-plain-http"
        );
    }
    let api = api?;
    runtime.block_on(async {
        let found = conflicts(&plan, &tenant, &existing(&api).await?);
        if !found.is_empty() {
            bail!("nothing imported: {}", found.join("; "));
        }
        send(&api, &tenant, &plan).await
    })
}

/// A client of the API at `base` with the token of `args`.
fn connect(args: &ImportArgs, base: &str) -> Result<Api> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read the API token in {}", args.token_file.display()))?;
    Ok(Api {
        root: format!("{base}/v1"),
        token: token.trim().to_string(),
        client: reqwest::Client::builder()
            // The appliance is asked directly, never through the environment's proxy.
            .no_proxy()
            // A redirect would send the keys in the body somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?,
    })
}

/// The appliance's tenants, with their pools.
async fn existing(api: &Api) -> Result<Vec<Existing>> {
    let (status, list) = api.call(reqwest::Method::GET, "/tenants", None).await?;
    anyhow::ensure!(
        status == 200,
        "GET /v1/tenants answered {}",
        refusal(status, &list)
    );
    let mut out = Vec::new();
    for t in list.as_array().into_iter().flatten() {
        let id = t["tenant_id"].as_str().unwrap_or_default().to_string();
        let (status, egress) = api
            .call(reqwest::Method::GET, &format!("/tenants/{id}/egress"), None)
            .await?;
        out.push(Existing {
            public_key: t["server_public_key"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            listen_port: t["listen_port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
            subnet: t["subnet_cidr"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("a tenant without a subnet in GET /v1/tenants")?,
            pool: (status == 200)
                .then(|| egress["pool"].as_str().and_then(|p| p.parse().ok()))
                .flatten(),
            host_prefixes: t["host_prefixes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str()?.parse().ok())
                .collect(),
            id,
        });
    }
    Ok(out)
}

/// The API's address without a trailing `/`, `http://` unless it names a scheme.
fn api_base(api: &str) -> String {
    let api = api.trim_end_matches('/');
    match api.contains("://") {
        true => api.to_string(),
        false => format!("http://{api}"),
    }
}

/// True when a secret may go to `base`: over TLS, or over plain HTTP to this
/// host only (a loopback address or `localhost`).
fn private_on_the_way(base: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return false;
    };
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => true,
        "http" => loopback,
        _ => false,
    }
}

fn print_plan(tenant: &Id, plan: &Plan) {
    let port = plan
        .tenant
        .listen_port
        .map_or_else(|| "a port allocated here".to_string(), |p| p.to_string());
    println!(
        "would create tenant {tenant}: subnet {}, port {port}, the file's private key",
        plan.subnet
    );
    for r in &plan.routers {
        let req = &r.request;
        println!(
            "would create router {} (line {}): vpn_ip {}, public_key {}, allowed_ips [{}]{}{}",
            r.id,
            r.line,
            req.vpn_ip.as_deref().unwrap_or_default(),
            req.public_key.as_deref().unwrap_or_default(),
            req.allowed_ips.as_deref().unwrap_or_default().join(", "),
            req.endpoint
                .as_deref()
                .map(|e| format!(", endpoint {e}"))
                .unwrap_or_default(),
            with_psk(req.preshared_key.as_deref())
        );
    }
    if let Some(egress) = &plan.egress {
        println!(
            "would set the egress policy: pool {} through {}",
            egress.pool,
            egress.gateways.join(", ")
        );
    }
    for c in &plan.clients {
        let req = &c.request;
        println!(
            "would create client {} (line {}): vpn_ip {}, public_key {}{}",
            c.id,
            c.line,
            req.vpn_ip.as_deref().unwrap_or_default(),
            req.public_key.as_deref().unwrap_or_default(),
            with_psk(req.preshared_key.as_deref())
        );
    }
}

/// ", the file's preshared key" when a peer has one (never the key).
fn with_psk(psk: Option<&str>) -> &'static str {
    match psk {
        Some(k) if !k.is_empty() => ", the file's preshared key",
        _ => "",
    }
}

struct Api {
    /// `…/v1`.
    root: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    /// One request; the status and the JSON answer (`null` when there is none).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.root);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("no answer from {url}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

impl Api {
    /// A `PUT` of `body` to `path`.
    async fn put(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
}

/// What the API said about a refusal: its `error` object's message and field.
fn refusal(status: u16, answer: &Value) -> String {
    let error = &answer["error"];
    match (error["message"].as_str(), error["field"].as_str()) {
        (Some(message), Some(field)) => format!("{status}: {field}: {message}"),
        (Some(message), None) => format!("{status}: {message}"),
        _ => format!("{status}"),
    }
}

async fn send(api: &Api, tenant: &Id, plan: &Plan) -> Result<()> {
    let body = serde_json::json!({
        "listen_port": plan.tenant.listen_port,
        "subnet": plan.tenant.subnet,
        "private_key": plan.tenant.private_key,
    });
    let (status, answer) = api.put(&format!("/tenants/{tenant}"), body).await?;
    match status {
        201 => println!(
            "tenant {tenant}: created, port {}, subnet {}, public key {}",
            answer["listen_port"], plan.subnet, answer["server_public_key"]
        ),
        200 => println!("tenant {tenant}: exists with this key, port and subnet"),
        _ if answer["error"]["code"] == "port_unavailable" => bail!(
            "tenant {tenant}: refused ({}): is the old interface still up? (wg-quick down …)",
            refusal(status, &answer)
        ),
        _ => bail!("tenant {tenant}: refused ({})", refusal(status, &answer)),
    }
    let mut failed = 0;
    for r in &plan.routers {
        let body = serde_json::json!({
            "name": r.request.name,
            "public_key": r.request.public_key,
            "vpn_ip": r.request.vpn_ip,
            "allowed_ips": r.request.allowed_ips,
            "preshared_key": r.request.preshared_key,
            "endpoint": r.request.endpoint,
        });
        failed += put_peer(api, tenant, "router", r, body).await?;
    }
    if failed > 0 {
        let phones = match plan.egress.is_some() {
            true => " (nor the egress policy and the phones: they stay cut off until it runs to the end)",
            false => "",
        };
        bail!(
            "{failed} of {} routers not imported{phones}; fix them and run the import again",
            plan.routers.len()
        );
    }
    if let Some(egress) = &plan.egress {
        let body = serde_json::json!({"pool": egress.pool, "gateways": egress.gateways});
        let (status, answer) = api.put(&format!("/tenants/{tenant}/egress"), body).await?;
        match status {
            200 | 201 => println!(
                "egress policy: pool {} through {}",
                egress.pool,
                egress.gateways.join(", ")
            ),
            _ => bail!("egress policy: refused ({})", refusal(status, &answer)),
        }
    }
    for c in &plan.clients {
        let body = serde_json::json!({
            "name": c.request.name,
            "public_key": c.request.public_key,
            "vpn_ip": c.request.vpn_ip,
            "preshared_key": c.request.preshared_key,
        });
        failed += put_peer(api, tenant, "client", c, body).await?;
    }
    let peers = plan.routers.len() + plan.clients.len();
    if failed > 0 {
        bail!("{failed} of {peers} peers not imported; fix them and run the import again");
    }
    println!(
        "imported: tenant {tenant} with {} routers and {} clients; they reconnect at their next handshake",
        plan.routers.len(),
        plan.clients.len()
    );
    Ok(())
}

/// Creates one router or client (`kind`) unless its id holds another key
/// here; says what happened. 1 when it was not imported, else 0.
async fn put_peer<R>(
    api: &Api,
    tenant: &Id,
    kind: &str,
    peer: &Planned<R>,
    body: Value,
) -> Result<usize> {
    let public_key = body["public_key"].as_str();
    let (id, line) = (&peer.id, peer.line);
    let path = format!("/tenants/{tenant}/{kind}s/{id}");
    let (status, existing) = api.call(reqwest::Method::GET, &path, None).await?;
    if status == 200 && existing["public_key"].as_str() != public_key {
        println!("{kind} {id} (line {line}): not imported: the id is another key's {kind} here");
        return Ok(1);
    }
    let (status, answer) = api.put(&path, body).await?;
    match status {
        201 => println!("{kind} {id} (line {line}): created, {}", answer["vpn_ip"]),
        200 => println!("{kind} {id} (line {line}): exists, now as the file says"),
        _ => {
            println!(
                "{kind} {id} (line {line}): refused ({})",
                refusal(status, &answer)
            );
            return Ok(1);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_address_takes_a_scheme_once() {
        assert_eq!(api_base("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(api_base("https://h:1/"), "https://h:1");
    }

    #[test]
    fn the_private_key_goes_only_over_tls_or_to_this_host() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "http://localhost:1",
            "https://vpn.example.com",
        ] {
            assert!(private_on_the_way(ok), "{ok}");
        }
        for not in [
            "http://192.0.2.1:8080",
            "http://vpn.example.com",
            "ftp://127.0.0.1",
            "nonsense",
        ] {
            assert!(!private_on_the_way(not), "{not}");
        }
    }
}
