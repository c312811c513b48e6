//! Migration from kernel WireGuard: the API requests that make a server's
//! configuration (read by [`super::wgconf`]) a tenant tunnel with the same key,
//! port and subnet, its peers routers with the same keys and addresses. The
//! routers keep their configuration: once the appliance answers at the old
//! server's address and port, they shake hands with it as with the old server.
//!
//! What cannot be carried over is refused before anything is asked of the
//! API, every problem at once: a peer with a preshared key (wgplane has none),
//! a peer with no address of its own in the subnet, a server address other
//! than the subnet's first host (wgplane's), or no private key. What is left
//! out on purpose is listed as notes: default routes through a peer (an egress
//! policy here), IPv6 addresses of the server, the host's wg-quick commands.
//!
//! Left out: sending the requests (`wgplane import`, in the binary), and phones
//! (clients of a pool, which need an egress policy first).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::model::{Id, RouterRequest, TenantRequest};
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

/// One router to create.
#[derive(Debug, Clone)]
pub struct PlannedRouter {
    pub id: Id,
    /// Line of its `[Peer]` section.
    pub line: usize,
    pub request: RouterRequest,
}

/// What to ask of the API, in order: the tenant, then its routers.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tenant: TenantRequest,
    /// The subnet the tenant gets.
    pub subnet: Ipv4Net,
    pub routers: Vec<PlannedRouter>,
    /// What is not carried over, and why; for the operator to read.
    pub notes: Vec<String>,
}

/// Plans the import of `conf`; `subnet` is the tenant's subnet when the file
/// does not say it (`wg showconf` prints no `Address`) or says several.
pub fn plan(conf: &WgConf, subnet: Option<Ipv4Net>) -> Result<Plan, ImportError> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let iface = &conf.interface;
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
    if !iface.host_keys.is_empty() {
        notes.push(format!(
            "{} not carried over: the appliance routes and isolates the tunnel itself",
            iface.host_keys.join(", ")
        ));
    }
    let mut routers: Vec<PlannedRouter> = Vec::new();
    if let Some(subnet) = subnet {
        for peer in &conf.peers {
            match router(peer, subnet, &routers, &mut notes) {
                Ok(r) => routers.push(r),
                Err(problem) => problems.push(problem),
            }
        }
    }
    match (problems.is_empty(), subnet) {
        (true, Some(subnet)) => Ok(Plan {
            tenant: TenantRequest {
                listen_port: iface.listen_port,
                subnet: Some(subnet.to_string()),
                host_prefixes: None,
                private_key: iface.private_key.as_ref().map(keys::SecretKey::to_base64),
            },
            subnet,
            routers,
            notes,
        }),
        _ => Err(ImportError::Refused(problems)),
    }
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
        (Some(net), _) => (
            net.trunc(),
            v4.iter().map(|a| a.addr()).find(|a| net.contains(a)),
        ),
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
    if peer.preshared_key {
        return Err(format!(
            "{who} has a PresharedKey, which wgplane does not support: remove it on \
             both sides first, or leave this peer on the old server"
        ));
    }
    let server = alloc::server_address(subnet);
    let own = |a: Ipv4Addr| {
        subnet.contains(&a) && a != subnet.network() && a != subnet.broadcast() && a != server
    };
    let vpn_ip = peer.allowed_ips.iter().find_map(|net| match net {
        IpNet::V4(n) if n.prefix_len() == 32 && own(n.addr()) => Some(n.addr()),
        _ => None,
    });
    let Some(vpn_ip) = vpn_ip else {
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
                 policy here (PUT /v1/tenants/{{id}}/egress)"
            ));
        } else if *net != IpNet::V4(Ipv4Net::from(vpn_ip)) {
            allowed_ips.push(net.trunc().to_string());
        }
    }
    let name = peer.name.as_ref().map(|n| {
        n.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    });
    let taken = |id: &Id| planned.iter().any(|r| &r.id == id);
    let by_address = Id::parse(
        &format!("router-{}", vpn_ip.to_string().replace('.', "-")),
        "router_id",
    )
    .map_err(|e| e.to_string())?;
    let id = name
        .as_deref()
        .and_then(id_from_name)
        .filter(|id| !taken(id))
        .unwrap_or(by_address);
    if taken(&id) {
        return Err(format!("{who} has the address {vpn_ip} of another peer"));
    }
    Ok(PlannedRouter {
        id,
        line: peer.line,
        request: RouterRequest {
            name,
            public_key: Some(keys::encode(&peer.public_key)),
            vpn_ip: Some(IpAddr::V4(vpn_ip).to_string()),
            allowed_ips: Some(allowed_ips),
        },
    })
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
    const A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
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
                 [Peer]\nPublicKey = {B}\nAllowedIPs = 10.100.0.40/32, 0.0.0.0/0"
            ),
        );
        let p = plan(&c, None).unwrap();
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
        let gw = &p.routers[1].request;
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
        let list = problems(plan(&c, None).unwrap_err());
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
        let list = problems(plan(&c, None).unwrap_err());
        assert!(
            list[0].contains("line 4") && list[0].contains("PresharedKey"),
            "{list:?}"
        );
        assert!(
            list[1].contains("line 8") && list[1].contains("no address of its own"),
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
        assert!(problems(plan(&c, None).unwrap_err())[0].contains("--subnet"));
        let p = plan(&c, Some("10.101.0.0/16".parse().unwrap())).unwrap();
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
        let ids: Vec<String> = plan(&c, None)
            .unwrap()
            .routers
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(ids, ["gw-1", "router-10-100-1-2"]);
    }
}
