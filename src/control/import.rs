//! Migration from kernel WireGuard: the API requests that make a server's
//! configuration (read by [`super::wgconf`]) a tenant tunnel with the same key,
//! port and subnet, its peers routers with the same keys (preshared ones too)
//! and addresses. The routers keep their configuration: once the appliance
//! answers at the old server's address and port, they shake hands with it as
//! with the old server.
//!
//! The KTN design moves too, when the caller names the phones' pool and its
//! gateways (by their addresses in the subnet): the peers with an address in
//! the pool become clients (phones) with their keys and addresses, and the
//! pool an egress policy through those gateways, as the old host's `ip rule`
//! sent it.
//!
//! What cannot be carried over is refused before anything is asked of the
//! API, every problem at once (the plan is rehearsed on an empty registry, so
//! the API's own rules refuse nothing the file alone decides): a peer with no address of its own in the
//! subnet (or the pool), a server address other than the subnet's first host
//! (wgplane's), a gateway that is no router of the file, or no private key. What is left out on purpose is
//! listed as notes: default routes through a peer (an egress policy here),
//! IPv6 addresses of the server, the host's wg-quick commands.
//!
//! Left out: sending the requests (`wgplane import`, in the binary).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::model::{ClientRequest, EgressRequest, Id, RouterRequest, TenantRequest};
use super::registry::{AllocPolicy, Registry};
use super::wgconf::{PeerSection, WgConf};
use crate::core::alloc;
use crate::keys;

/// Why a configuration cannot be imported as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// Each line one thing to change in the file (or to give on the command
    /// line) before the import can run.
    #[error("cannot import: {}", .0.join("; "))]
    Refused(Vec<String>),
}

/// One peer to create: a router or a client.
#[derive(Debug, Clone)]
pub struct Planned<R> {
    pub id: Id,
    /// Line of its `[Peer]` section.
    pub line: usize,
    pub request: R,
}

/// One router to create.
pub type PlannedRouter = Planned<RouterRequest>;

/// One client (phone) to create.
pub type PlannedClient = Planned<ClientRequest>;

/// What to ask of the API, in order: the tenant, its routers, the egress
/// policy, its clients.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tenant: TenantRequest,
    /// The subnet the tenant gets.
    pub subnet: Ipv4Net,
    pub routers: Vec<PlannedRouter>,
    /// The phones' pool through its gateways (router ids), when one was named.
    pub egress: Option<EgressRequest>,
    pub clients: Vec<PlannedClient>,
    /// What is not carried over, and why; for the operator to read.
    pub notes: Vec<String>,
}

/// What the caller says that the file does not.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The tenant's subnet, when the file does not say it (`wg showconf`
    /// prints no `Address`) or says several.
    pub subnet: Option<Ipv4Net>,
    /// KTN: the phones' pool; its peers become clients.
    pub pool: Option<Ipv4Net>,
    /// KTN: the pool's gateways, by their addresses in the subnet, in
    /// failover order.
    pub gateways: Vec<Ipv4Addr>,
}

/// A tenant the appliance has already, as its API describes it.
#[derive(Debug, Clone)]
pub struct Existing {
    pub id: String,
    /// Base64, as the API shows it.
    pub public_key: String,
    pub listen_port: u16,
    pub subnet: Ipv4Net,
    /// Its egress policy's pool, if it has one.
    pub pool: Option<Ipv4Net>,
    /// TUN mode: host prefixes its routers reach through the host.
    pub host_prefixes: Vec<IpNet>,
}

/// What the appliance's other tenants (and one of the same id) would refuse
/// of `plan` for `tenant`: asked before the old interface goes down, not
/// found out after. Empty when the import can run.
pub fn conflicts(plan: &Plan, tenant: &Id, existing: &[Existing]) -> Vec<String> {
    let public = plan
        .tenant
        .private_key
        .as_deref()
        .and_then(|k| keys::SecretKey::parse(k).ok())
        .map(|k| keys::encode(k.public().as_bytes()));
    let pool = plan
        .egress
        .as_ref()
        .and_then(|e| e.pool.parse::<Ipv4Net>().ok());
    let ours = [Some(plan.subnet), pool];
    let mut found = Vec::new();
    for t in existing {
        if t.id == tenant.as_str() {
            let same = public.as_deref() == Some(t.public_key.as_str())
                && plan.tenant.listen_port.is_none_or(|p| p == t.listen_port)
                && t.subnet == plan.subnet;
            if !same {
                found.push(format!(
                    "tenant {} exists here with another key, port or subnet (port {}, subnet {})",
                    t.id, t.listen_port, t.subnet
                ));
            }
            continue;
        }
        if plan.tenant.listen_port == Some(t.listen_port) {
            found.push(format!("port {} is tenant {}'s", t.listen_port, t.id));
        }
        if public.as_deref() == Some(t.public_key.as_str()) {
            found.push(format!("the private key is tenant {}'s tunnel key", t.id));
        }
        let theirs = [Some(t.subnet), t.pool]
            .into_iter()
            .flatten()
            .map(IpNet::V4)
            .chain(t.host_prefixes.iter().copied());
        for other in theirs {
            for mine in ours.iter().flatten() {
                if alloc::overlaps(IpNet::V4(*mine), other) {
                    found.push(format!(
                        "{mine} overlaps {other} of tenant {} (one appliance routes each \
                         address to one tenant: give this one other addresses, or another appliance)",
                        t.id
                    ));
                }
            }
        }
    }
    found
}

/// Plans the import of `conf`.
pub fn plan(conf: &WgConf, options: &Options) -> Result<Plan, ImportError> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let iface = &conf.interface;
    let subnet = options.subnet;
    if iface.private_key.is_none() {
        problems.push(
            "[Interface] has no PrivateKey: the tunnel's key is what the routers know".into(),
        );
    }
    let subnet = match tenant_subnet(conf, subnet, &mut notes) {
        Ok(net) => Some(net),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    if iface.listen_port.is_none() {
        notes.push(
            "no ListenPort: a port is allocated here, and every router's endpoint must change to it"
                .into(),
        );
    }
    if iface.save_config {
        notes.push(
            "SaveConfig = true: `wg-quick down` rewrites this file from the running \
             interface, without its comments (the peers' names, so their ids change): \
             import a copy made before it"
                .into(),
        );
    }
    let kept_up = conf.peers.iter().filter(|p| p.keepalive.is_some()).count();
    if kept_up > 0 {
        notes.push(format!(
            "PersistentKeepalive on {kept_up} peers not carried over: the appliance keeps \
             every peer up or none (tunnels.keepalive_secs in its config file, off by \
             default): set it to 25 if the routers behind NAT do not send their own"
        ));
    }
    if !iface.host_keys.is_empty() {
        notes.push(format!(
            "{} not carried over: the appliance routes and isolates the tunnel itself",
            iface.host_keys.join(", ")
        ));
    }
    let mut routers: Vec<PlannedRouter> = Vec::new();
    let mut clients: Vec<PlannedClient> = Vec::new();
    let pool = options.pool.map(|p| p.trunc());
    if let Some(subnet) = subnet {
        if let Err(problem) = check_pool(subnet, pool, &options.gateways) {
            problems.push(problem);
        }
        for peer in &conf.peers {
            let in_pool = pool.filter(|p| {
                peer.allowed_ips.iter().any(
                    |n| matches!(n, IpNet::V4(v) if v.prefix_len() == 32 && p.contains(&v.addr())),
                )
            });
            let planned = match in_pool {
                Some(pool) => client(peer, pool, &clients, &mut notes).map(|c| clients.push(c)),
                None => router(peer, subnet, &routers, &mut notes).map(|r| routers.push(r)),
            };
            if let Err(problem) = planned {
                problems.push(problem);
            }
        }
    }
    let egress = pool.map(|pool| EgressRequest {
        pool: pool.to_string(),
        gateways: options
            .gateways
            .iter()
            .filter_map(|g| {
                let found = routers
                    .iter()
                    .find(|r| r.request.vpn_ip.as_deref() == Some(g.to_string().as_str()));
                if found.is_none() {
                    problems.push(format!(
                        "the gateway {g} is no router's address in the file"
                    ));
                }
                found.map(|r| r.id.to_string())
            })
            .collect(),
    });
    let Some(subnet) = subnet.filter(|_| problems.is_empty()) else {
        return Err(ImportError::Refused(problems));
    };
    let plan = Plan {
        tenant: TenantRequest {
            listen_port: iface.listen_port,
            subnet: Some(subnet.to_string()),
            host_prefixes: None,
            private_key: iface.private_key.as_ref().map(keys::SecretKey::to_base64),
        },
        subnet,
        routers,
        egress,
        clients,
        notes,
    };
    let refused = rehearse(&plan);
    match refused.is_empty() {
        true => Ok(plan),
        false => Err(ImportError::Refused(refused)),
    }
}

/// What the API's rules refuse of `plan`, found by applying it to an empty
/// registry, so that an import does not stop half-way (the old interface
/// already down) for a reason the file alone shows: overlapping prefixes, a
/// prefix in the subnet or the pool, a key twice, an address the pool keeps.
/// Other tenants of the appliance can still refuse some of it.
fn rehearse(plan: &Plan) -> Vec<String> {
    let mut registry = Registry::new(AllocPolicy::default(), 1);
    let mut refused = Vec::new();
    let Ok(t) = Id::parse("import", "tenant") else {
        return refused;
    };
    if let Err(e) = registry.put_tenant(&t, &plan.tenant, std::time::SystemTime::UNIX_EPOCH) {
        refused.push(format!("the tunnel: {e}"));
        return refused;
    }
    for r in &plan.routers {
        if let Err(e) = registry.put_router(&t, &r.id, &r.request) {
            refused.push(format!("[Peer] at line {} (router {}): {e}", r.line, r.id));
        }
    }
    if let Some(egress) = &plan.egress {
        if let Err(e) = registry.put_egress(&t, egress) {
            refused.push(format!("the egress policy: {e}"));
            return refused;
        }
    }
    for c in &plan.clients {
        if let Err(e) = registry.put_client(&t, &c.id, &c.request) {
            refused.push(format!("[Peer] at line {} (client {}): {e}", c.line, c.id));
        }
    }
    refused
}

/// A pool needs gateways and gateways a pool; the pool lies outside the subnet.
fn check_pool(subnet: Ipv4Net, pool: Option<Ipv4Net>, gateways: &[Ipv4Addr]) -> Result<(), String> {
    match pool {
        None if !gateways.is_empty() => {
            Err("gateways without a pool: give the phones' pool too".into())
        }
        None => Ok(()),
        Some(_) if gateways.is_empty() => {
            Err("a pool without gateways: phones' traffic leaves only through one".into())
        }
        Some(p) if alloc::overlaps(IpNet::V4(p), IpNet::V4(subnet)) => {
            Err(format!("the pool {p} overlaps the subnet {subnet}"))
        }
        Some(_) => Ok(()),
    }
}

/// The client a peer with an address in the pool becomes: a phone sends only
/// from that address, so its other allowed IPs are left out.
fn client(
    peer: &PeerSection,
    pool: Ipv4Net,
    planned: &[PlannedClient],
    notes: &mut Vec<String>,
) -> Result<PlannedClient, String> {
    let who = describe(peer);
    let vpn_ip =
        host_in(peer, pool, |_| true).ok_or_else(|| format!("{who} has no address in {pool}"))?;
    let others: Vec<String> = peer
        .allowed_ips
        .iter()
        .filter(|n| **n != IpNet::V4(Ipv4Net::from(vpn_ip)))
        .map(ToString::to_string)
        .collect();
    if !others.is_empty() {
        notes.push(format!(
            "{who}: {} left out: a phone sends only from its own address",
            others.join(", ")
        ));
    }
    let (id, name) = id_and_name(peer, "phone", vpn_ip, |id| {
        planned.iter().any(|c| &c.id == id)
    })?;
    Ok(PlannedClient {
        id,
        line: peer.line,
        request: ClientRequest {
            name,
            public_key: Some(keys::encode(&peer.public_key)),
            vpn_ip: Some(vpn_ip.to_string()),
            dns: None,
            preshared_key: psk(peer),
        },
    })
}

/// The subnet given, or the one of the file's IPv4 `Address`, whose address
/// must be the subnet's first host: the address the routers know the server by.
fn tenant_subnet(
    conf: &WgConf,
    given: Option<Ipv4Net>,
    notes: &mut Vec<String>,
) -> Result<Ipv4Net, String> {
    let mut v4 = Vec::new();
    for address in &conf.interface.addresses {
        match address {
            IpNet::V4(net) => v4.push(*net),
            IpNet::V6(net) => notes.push(format!(
                "Address {net} not carried over: the tenant's IPv6 network is its own \
                 (fd77:7770:…::/64, see GET /v1/tenants/{{id}})"
            )),
        }
    }
    let (subnet, old_address) = match (given, v4.as_slice()) {
        (Some(net), _) => {
            let outside = v4.iter().filter(|a| !net.contains(&a.addr()));
            for address in outside {
                notes.push(format!(
                    "Address {address} not carried over: the tenant answers only at its \
                     subnet's first host"
                ));
            }
            (
                net.trunc(),
                v4.iter().map(|a| a.addr()).find(|a| net.contains(a)),
            )
        }
        (None, [one]) => (one.trunc(), Some(one.addr())),
        (None, []) => {
            return Err(
                "[Interface] has no IPv4 Address: give the tenant's subnet (--subnet)".into(),
            )
        }
        (None, _) => {
            return Err(
                "[Interface] has several IPv4 Addresses: give the tenant's subnet (--subnet)"
                    .into(),
            )
        }
    };
    if subnet.prefix_len() > 30 {
        return Err(format!("the subnet {subnet} is smaller than a /30"));
    }
    let server = alloc::server_address(subnet);
    match old_address {
        Some(old) if old != server => Err(format!(
            "the server's address {old} is not {server}, the first host of {subnet}, which \
             wgplane answers at: routers that reach the server at {old} would lose it"
        )),
        None => {
            notes.push(format!("the server's address is {server}"));
            Ok(subnet)
        }
        Some(_) => Ok(subnet),
    }
}

/// The router a peer becomes: its first host address in the subnet is its
/// `vpn_ip`, the rest of its allowed IPs (but a default route) its prefixes.
fn router(
    peer: &PeerSection,
    subnet: Ipv4Net,
    planned: &[PlannedRouter],
    notes: &mut Vec<String>,
) -> Result<PlannedRouter, String> {
    let who = describe(peer);
    let server = alloc::server_address(subnet);
    let Some(vpn_ip) = host_in(peer, subnet, |a| a != server) else {
        return Err(format!(
            "{who} has no address of its own in {subnet} (an AllowedIPs /32 in it): \
             a router needs one"
        ));
    };
    let mut allowed_ips = Vec::new();
    for net in &peer.allowed_ips {
        if net.prefix_len() == 0 {
            notes.push(format!(
                "{who}: {net} left out: traffic leaves through a router by an egress \
                 policy here (PUT /v1/tenants/{{id}}/egress); add its own LAN prefixes \
                 to its allowed_ips, or its packets from them are dropped as spoofed"
            ));
        } else if *net != IpNet::V4(Ipv4Net::from(vpn_ip)) {
            allowed_ips.push(net.trunc().to_string());
        }
    }
    let (id, name) = id_and_name(peer, "router", vpn_ip, |id| {
        planned.iter().any(|r| &r.id == id)
    })?;
    // Where the old server last heard it (`wg showconf`, or a file
    // `SaveConfig` wrote): the appliance can shake hands with it first.
    let endpoint = peer.endpoint.as_deref().and_then(|text| {
        let parsed = text
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(crate::core::peer::canonical_endpoint)
            .filter(|e| crate::core::peer::answerable(*e));
        if parsed.is_none() {
            notes.push(format!(
                "{who}: Endpoint {text:?} not carried over: not an address and port \
                 (the router is reached once it speaks)"
            ));
        }
        parsed.map(|e| e.to_string())
    });
    Ok(PlannedRouter {
        id,
        line: peer.line,
        request: RouterRequest {
            name,
            public_key: Some(keys::encode(&peer.public_key)),
            vpn_ip: Some(IpAddr::V4(vpn_ip).to_string()),
            allowed_ips: Some(allowed_ips),
            preshared_key: psk(peer),
            endpoint,
        },
    })
}

/// The peer's preshared key as the API takes it; none when the file has
/// none, so that one set through the API since is kept.
fn psk(peer: &PeerSection) -> Option<String> {
    peer.preshared_key
        .as_ref()
        .map(crate::keys::PresharedKey::to_base64)
}

/// The peer's first `/32` in `net` that is a host address of it and passes
/// `also`.
fn host_in(peer: &PeerSection, net: Ipv4Net, also: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    peer.allowed_ips.iter().find_map(|n| match n {
        IpNet::V4(v)
            if v.prefix_len() == 32
                && net.contains(&v.addr())
                && v.addr() != net.network()
                && v.addr() != net.broadcast()
                && also(v.addr()) =>
        {
            Some(v.addr())
        }
        _ => None,
    })
}

/// The peer's id (from its name, else `<kind>-10-100-1-5` after its address)
/// and its name (without control characters: the parser made them spaces).
fn id_and_name(
    peer: &PeerSection,
    kind: &str,
    address: Ipv4Addr,
    taken: impl Fn(&Id) -> bool,
) -> Result<(Id, Option<String>), String> {
    let name = peer.name.clone();
    let by_address = Id::parse(
        &format!("{kind}-{}", address.to_string().replace('.', "-")),
        "id",
    )
    .map_err(|e| e.to_string())?;
    let id = name
        .as_deref()
        .and_then(id_from_name)
        .filter(|id| !taken(id))
        .unwrap_or(by_address);
    if taken(&id) {
        return Err(format!(
            "{} has the address {address} of another peer",
            describe(peer)
        ));
    }
    Ok((id, name))
}

/// An id made of a name: characters an id cannot hold become `-`.
fn id_from_name(name: &str) -> Option<Id> {
    let text: String = name
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '-',
        })
        .take(64)
        .collect();
    Id::parse(text.trim_matches('-'), "router_id").ok()
}

/// "`[Peer]` at line 9 (Branch A)" or "… (HIgo9x…)".
fn describe(peer: &PeerSection) -> String {
    let key = keys::encode(&peer.public_key);
    match &peer.name {
        Some(name) => format!("[Peer] at line {} ({name})", peer.line),
        None => format!("[Peer] at line {} ({}…)", peer.line, &key[..8]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wgconf::parse;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const A: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    const B: &str = "3dw2xMD9xm1rs7kp6NkLUxvPJZPYRjA2yjn2z6nj5iY=";

    fn conf(interface: &str, peers: &str) -> WgConf {
        parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\n{interface}\n{peers}"
        ))
        .unwrap()
    }

    fn problems(e: ImportError) -> Vec<String> {
        let ImportError::Refused(list) = e;
        list
    }

    #[test]
    fn a_tenant_server_becomes_a_tenant_with_its_routers() {
        let c = conf(
            "Address = 10.100.0.1/16, fd00::1/64\nListenPort = 51821\nPostUp = ip rule add from 10.200.0.0/24 table 100",
            &format!(
                "[Peer]\n# Name = Branch A\nPublicKey = {A}\nAllowedIPs = 10.100.1.1/32, 192.168.88.1/24\n\
                 [Peer]\nPublicKey = {B}\nPresharedKey = {KEY}\nAllowedIPs = 10.100.0.40/32, 0.0.0.0/0"
            ),
        );
        let p = plan(&c, &Options::default()).unwrap();
        assert_eq!(p.tenant.listen_port, Some(51821));
        assert_eq!(p.tenant.subnet.as_deref(), Some("10.100.0.0/16"));
        assert_eq!(p.tenant.private_key.as_deref(), Some(KEY));
        let ids: Vec<&str> = p.routers.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["Branch-A", "router-10-100-0-40"]);
        let a = &p.routers[0].request;
        assert_eq!(a.name.as_deref(), Some("Branch A"));
        assert_eq!(a.public_key.as_deref(), Some(A));
        assert_eq!(a.vpn_ip.as_deref(), Some("10.100.1.1"));
        assert_eq!(
            a.allowed_ips.as_deref(),
            Some(&["192.168.88.0/24".to_string()][..])
        );
        // The file's preshared key goes with its peer; a peer without one
        // asks for none.
        let gw = &p.routers[1].request;
        assert_eq!(gw.preshared_key.as_deref(), Some(KEY));
        assert_eq!(a.preshared_key, None);
        assert_eq!(gw.name, None);
        assert_eq!(gw.allowed_ips.as_deref(), Some(&[][..]));
        let notes = p.notes.join("\n");
        for expected in ["fd00::1/64", "PostUp", "0.0.0.0/0 left out"] {
            assert!(notes.contains(expected), "{expected}: {notes}");
        }
    }

    #[test]
    fn what_cannot_be_carried_over_is_refused_all_at_once() {
        let c = parse(&format!(
            "[Interface]\nAddress = 10.100.0.254/16\n\
             [Peer]\nPublicKey = {A}\nPresharedKey = {KEY}\nAllowedIPs = 10.100.1.1/32\n\
             [Peer]\nPublicKey = {B}\nAllowedIPs = 10.200.0.2/32"
        ))
        .unwrap();
        let list = problems(plan(&c, &Options::default()).unwrap_err());
        assert_eq!(list.len(), 2, "{list:?}");
        assert!(list[0].contains("no PrivateKey"), "{list:?}");
        assert!(list[1].contains("is not 10.100.0.1"), "{list:?}");
        // With the subnet right, the peers' own problems show.
        let c = conf(
            "Address = 10.100.0.1/16",
            &format!(
                "[Peer]\nPublicKey = {A}\nPresharedKey = {KEY}\nAllowedIPs = 10.100.1.1/32\n\
                 [Peer]\nPublicKey = {B}\nAllowedIPs = 10.200.0.2/32, 10.100.0.1/32"
            ),
        );
        let list = problems(plan(&c, &Options::default()).unwrap_err());
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(
            list[0].contains("line 8") && list[0].contains("no address of its own"),
            "{list:?}"
        );
        assert!(!list.join(" ").contains(KEY));
    }

    #[test]
    fn the_subnet_comes_from_the_command_line_when_the_file_has_none() {
        let c = conf(
            "",
            &format!("[Peer]\nPublicKey = {A}\nAllowedIPs = 10.101.1.7/32"),
        );
        assert!(problems(plan(&c, &Options::default()).unwrap_err())[0].contains("--subnet"));
        let p = plan(
            &c,
            &Options {
                subnet: Some("10.101.0.0/16".parse().unwrap()),
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(p.subnet.to_string(), "10.101.0.0/16");
        assert_eq!(p.routers[0].id.as_str(), "router-10-101-1-7");
        assert!(
            p.notes.iter().any(|n| n.contains("ListenPort")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn ids_are_made_unique() {
        let c = conf(
            "Address = 10.100.0.1/16",
            &format!(
                "[Peer]\n# Name = gw/1\nPublicKey = {A}\nAllowedIPs = 10.100.1.1/32\n\
                 [Peer]\n# Name = gw 1\nPublicKey = {B}\nAllowedIPs = 10.100.1.2/32"
            ),
        );
        let ids: Vec<String> = plan(&c, &Options::default())
            .unwrap()
            .routers
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(ids, ["gw-1", "router-10-100-1-2"]);
    }

    /// The KTN design: phones on the same interface as the routers, their
    /// pool sent through the gateway by the old host's `ip rule`.
    #[test]
    fn phones_in_the_named_pool_become_clients_behind_the_gateway() {
        const P1: &str = "9s0OcPyS5t3ZDl3zGyRPUKnbTtqg1+5RkpIZJ4HS3zQ=";
        let c = conf(
            "Address = 10.100.0.1/16\nListenPort = 51820",
            &format!(
                "[Peer]\n# Name = mikrotik-1\nPublicKey = {A}\nAllowedIPs = 10.100.0.40/32, 0.0.0.0/0\n\
                 [Peer]\n# Name = Alice's phone\nPublicKey = {B}\nAllowedIPs = 10.200.0.2/32, 10.100.0.0/16\n\
                 [Peer]\nPublicKey = {P1}\nAllowedIPs = 10.200.0.3/32"
            ),
        );
        let ktn = |gateways: &[&str]| Options {
            pool: Some("10.200.0.0/24".parse().unwrap()),
            gateways: gateways.iter().map(|g| g.parse().unwrap()).collect(),
            ..Options::default()
        };
        let p = plan(&c, &ktn(&["10.100.0.40"])).unwrap();
        let ids = |list: &[String]| list.join(",");
        assert_eq!(
            ids(&p
                .routers
                .iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()),
            "mikrotik-1"
        );
        let egress = p.egress.as_ref().unwrap();
        assert_eq!(
            (egress.pool.as_str(), egress.gateways.as_slice()),
            ("10.200.0.0/24", &["mikrotik-1".to_string()][..])
        );
        let clients: Vec<(String, Option<String>, Option<String>)> = p
            .clients
            .iter()
            .map(|c| {
                (
                    c.id.to_string(),
                    c.request.name.clone(),
                    c.request.vpn_ip.clone(),
                )
            })
            .collect();
        assert_eq!(
            clients,
            [
                (
                    "Alice-s-phone".into(),
                    Some("Alice's phone".into()),
                    Some("10.200.0.2".into())
                ),
                ("phone-10-200-0-3".into(), None, Some("10.200.0.3".into())),
            ]
        );
        assert_eq!(p.clients[1].request.public_key.as_deref(), Some(P1));
        assert!(
            p.notes.iter().any(|n| n.contains("10.100.0.0/16 left out")),
            "{:?}",
            p.notes
        );
        // Without the pool, the phones are peers no router can be.
        let list = problems(plan(&c, &Options::default()).unwrap_err());
        assert_eq!(list.len(), 2, "{list:?}");
        // A gateway that is no router of the file, a pool in the subnet.
        let list = problems(plan(&c, &ktn(&["10.100.0.41"])).unwrap_err());
        assert!(
            list.iter().any(|p| p.contains("10.100.0.41 is no router")),
            "{list:?}"
        );
        let mut inside = ktn(&["10.100.0.40"]);
        inside.pool = Some("10.100.9.0/24".parse().unwrap());
        let list = problems(plan(&c, &inside).unwrap_err());
        assert!(
            list.iter().any(|p| p.contains("overlaps the subnet")),
            "{list:?}"
        );
        let list = problems(plan(&c, &ktn(&[])).unwrap_err());
        assert!(
            list.iter().any(|p| p.contains("without gateways")),
            "{list:?}"
        );
    }

    /// What the API would refuse half-way is refused before anything is
    /// asked: a LAN in the subnet, two peers with one LAN, one key twice, a
    /// phone on the address the pool keeps for the gateway side.
    #[test]
    fn what_the_api_would_refuse_is_refused_before_it_is_asked() {
        const C: &str = "9s0OcPyS5t3ZDl3zGyRPUKnbTtqg1+5RkpIZJ4HS3zQ=";
        let c = conf(
            "Address = 10.100.0.1/16",
            &format!(
                "[Peer]\nPublicKey = {A}\nAllowedIPs = 10.100.1.1/32, 10.100.5.0/24\n\
                 [Peer]\nPublicKey = {B}\nAllowedIPs = 10.100.0.40/32, 192.168.88.0/24\n\
                 [Peer]\nPublicKey = {C}\nAllowedIPs = 10.100.1.3/32, 192.168.88.0/24\n\
                 [Peer]\nPublicKey = {B}\nAllowedIPs = 10.100.1.4/32\n\
                 [Peer]\nPublicKey = {KEY}\nAllowedIPs = 10.200.0.1/32\n"
            ),
        );
        let options = Options {
            pool: Some("10.200.0.0/24".parse().unwrap()),
            gateways: vec!["10.100.0.40".parse().unwrap()],
            ..Options::default()
        };
        let list = problems(plan(&c, &options).unwrap_err());
        let expected = [
            (
                "line 4 (router router-10-100-1-1)",
                "overlaps the tenant subnet",
            ),
            (
                "line 10 (router router-10-100-1-3)",
                "overlaps another peer",
            ),
            (
                "line 13 (router router-10-100-1-4)",
                "already used by router router-10-100-0-40",
            ),
            ("line 16 (client phone-10-200-0-1)", "10.200.0.1"),
        ];
        assert_eq!(list.len(), expected.len(), "{list:?}");
        for (problem, (at, what)) in list.iter().zip(expected) {
            assert!(
                problem.contains(at) && problem.contains(what),
                "{at} {what}: {problem}"
            );
        }
    }

    #[test]
    fn the_appliances_other_tenants_are_asked_first() {
        let c = conf(
            "Address = 10.100.0.1/16\nListenPort = 51820",
            &format!("[Peer]\nPublicKey = {A}\nAllowedIPs = 10.100.0.40/32"),
        );
        let options = Options {
            pool: Some("10.200.0.0/24".parse().unwrap()),
            gateways: vec!["10.100.0.40".parse().unwrap()],
            ..Options::default()
        };
        let p = plan(&c, &options).unwrap();
        let ours = keys::encode(keys::SecretKey::parse(KEY).unwrap().public().as_bytes());
        let tenant = Id::parse("kitonga", "tenant").unwrap();
        let other = |id: &str, port: u16, subnet: &str, pool: Option<&str>| Existing {
            id: id.into(),
            public_key: B.into(),
            listen_port: port,
            subnet: subnet.parse().unwrap(),
            pool: pool.map(|p| p.parse().unwrap()),
            host_prefixes: Vec::new(),
        };
        assert!(conflicts(
            &p,
            &tenant,
            &[other("b", 51821, "10.101.0.0/16", Some("10.201.0.0/24"))]
        )
        .is_empty());
        // The same tenant again (a re-run) is no conflict; with another key it is.
        let again = Existing {
            public_key: ours.clone(),
            ..other("kitonga", 51820, "10.100.0.0/16", None)
        };
        assert!(conflicts(&p, &tenant, std::slice::from_ref(&again)).is_empty());
        let moved = Existing {
            public_key: B.into(),
            ..again
        };
        assert_eq!(conflicts(&p, &tenant, &[moved]).len(), 1);
        // Every tenant set up alike: the second one cannot come.
        let alike = conflicts(
            &p,
            &tenant,
            &[other(
                "first",
                51820,
                "10.100.0.0/16",
                Some("10.200.0.0/24"),
            )],
        );
        assert_eq!(alike.len(), 3, "{alike:?}");
        assert!(
            alike[0].contains("port 51820 is tenant first's"),
            "{alike:?}"
        );
        assert!(
            alike[1].contains("10.100.0.0/16 overlaps 10.100.0.0/16"),
            "{alike:?}"
        );
        assert!(
            alike[2].contains("10.200.0.0/24 overlaps 10.200.0.0/24"),
            "{alike:?}"
        );
        // A host prefix of another tenant (TUN mode) holds its addresses too.
        let hosting = Existing {
            host_prefixes: vec!["10.200.0.0/16".parse().unwrap()],
            ..other("c", 51822, "10.102.0.0/16", None)
        };
        let held = conflicts(&p, &tenant, &[hosting]);
        assert_eq!(held.len(), 1, "{held:?}");
        assert!(
            held[0].contains("10.200.0.0/24 overlaps 10.200.0.0/16 of tenant c"),
            "{held:?}"
        );
    }
}
