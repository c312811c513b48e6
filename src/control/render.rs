//! Text that devices receive: the RouterOS v7 script of a router and the wg-quick
//! config of a client (also as a QR code). This module only renders, it never
//! decides; every value it prints comes from the registry.

use std::fmt::Write as _;

use super::model::{Client, Router, Tenant};
use crate::keys;

/// The wg-quick style config of a client. The `PrivateKey` line is present only when
/// the key pair was generated here; otherwise the device fills in its own key.
pub fn client_config(tenant: &Tenant, client: &Client, public_host: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[Interface]");
    match &client.private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {}", k.to_base64());
        }
        None => {
            let _ = writeln!(out, "# PrivateKey = <the device's own private key>");
        }
    }
    let _ = writeln!(out, "Address = {}/32", client.vpn_ip);
    if !client.dns.is_empty() {
        let dns: Vec<String> = client.dns.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "DNS = {}", dns.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "[Peer]");
    let _ = writeln!(
        out,
        "PublicKey = {}",
        keys::encode(tenant.public_key.as_bytes())
    );
    if let Some(psk) = &client.preshared_key {
        let _ = writeln!(out, "PresharedKey = {}", psk.to_base64());
    }
    let _ = writeln!(
        out,
        "Endpoint = {}",
        endpoint(public_host, tenant.listen_port)
    );
    let _ = writeln!(out, "AllowedIPs = 0.0.0.0/0, ::/0");
    let _ = writeln!(out, "PersistentKeepalive = 25");
    out
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Name of the WireGuard interface the script creates on the router.
pub fn router_interface(tenant: &Tenant) -> String {
    format!("wgplane-{}", tenant.id)
}

/// A RouterOS string literal: quoted, with `\`, `"`, `$` and `?` escaped, and
/// control characters written as `\XX` (hex), so that no text, whatever its
/// origin, can end the line and start a command of its own.
pub fn ros_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if matches!(c, '\\' | '"' | '$' | '?') {
            out.push('\\');
            out.push(c);
        } else if c.is_ascii_control() {
            let _ = write!(out, "\\{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// The RouterOS v7 script that brings `router` onto its tenant's tunnel.
///
/// RouterOS peers take `endpoint-address` and `endpoint-port` (not `host:port`);
/// `allowed-address` adds no route, so the routes are explicit; the API service is
/// limited to the appliance's server address (and the host prefixes), and the
/// input chain accepts them from the tunnel ahead of any other rule (RouterOS's default firewall
/// drops what does not come from the LAN, management forwards included). A
/// gateway of the egress policy also accepts the client pool from the tunnel,
/// routes it back into the tunnel and masquerades it on its WAN interface list.
/// A router given an address in the tenant's IPv6 network (an `allowed_ips`
/// entry `/128` inside it) gets that address with the network's /64, and accepts
/// the network from the tunnel. `host_routes` are the host's networks the tunnel
/// carries (TUN mode's host prefixes): allowed on the peer, routed into the
/// tunnel, let use the API service and accepted by the input chain.
///
/// The script can be run again after a change (a router made a gateway, say),
/// also over the tunnel itself: it never removes what carries the session. The
/// interface and the appliance's peer are updated in place; everything else
/// (marked with the comment `wgplane <tenant>`) is added unless it is there. A
/// router that keeps its own key gets no new interface, whose key RouterOS
/// would make up: the script takes over the one that holds the router's key,
/// and stops with an error if there is none; a gateway's stops if the router
/// has no `WAN` interface list to masquerade on.
///
/// The commands are one block (`{` … `}`), so that an error stops the rest
/// also when the script is pasted into a terminal (line by line, each command
/// would run whatever failed before it), and the API service is limited last,
/// once everything that lets the appliance reach it is in place.
pub fn router_script(
    tenant: &Tenant,
    router: &Router,
    public_host: &str,
    host_routes: &[ipnet::IpNet],
) -> String {
    let ifname = router_interface(tenant);
    let pool = tenant
        .egress
        .as_ref()
        .filter(|e| e.gateways.contains(&router.id))
        .map(|e| e.pool);
    let net6 = tenant.server_net_v6();
    let address6 = router.extra_prefixes.iter().find_map(|p| match p {
        ipnet::IpNet::V6(n) if n.prefix_len() == 128 && net6.contains(&n.addr()) => Some(n.addr()),
        _ => None,
    });
    let mut allowed = vec![tenant.subnet.to_string()];
    allowed.extend(pool.map(|p| p.to_string()));
    allowed.extend(address6.map(|_| net6.to_string()));
    allowed.extend(host_routes.iter().map(ToString::to_string));
    let comment = ros_quote(&format!("wgplane {}", tenant.id));
    let mut out = String::new();
    let mut line = |text: std::fmt::Arguments<'_>| {
        let _ = out.write_fmt(text);
        out.push('\n');
    };
    // `menu add <what> <rest>` unless an entry with this comment and <what> is there.
    let ensure = |menu: &str, what: &str, rest: &str| {
        format!(
            ":if ([:len [{menu} find comment={comment} {what}]] = 0) do={{{menu} add {what} {rest} comment={comment}}}"
        )
    };
    line(format_args!(
        "# wgplane: RouterOS v7 script for router {} ({}) of tenant {}",
        ros_quote(&router.name),
        router.id,
        tenant.id
    ));
    line(format_args!(
        "# It can be run again after a change; entries of an earlier run that no longer apply stay (comment {comment})."
    ));
    line(format_args!(
        "# One block: paste it whole, or /import it; an error stops it where it is."
    ));
    line(format_args!("{{"));
    if pool.is_some() {
        line(format_args!(
            ":if ([:len [/interface list find name=WAN]] = 0) do={{:error {}}}",
            ros_quote("a KTN gateway masquerades the client pool on the interface list WAN, and this router has none: make it (with the uplink in it) and run the script again")
        ));
    }
    line(format_args!(
        "/system identity set name={}",
        ros_quote(&router.name)
    ));
    match &router.private_key {
        Some(key) => {
            // No listen port: the router only dials out, and RouterOS's
            // default (13231) may be another interface's already.
            line(format_args!(
                ":if ([:len [/interface wireguard find name={ifname}]] = 0) do={{/interface wireguard add name={ifname} comment={comment}}}"
            ));
            line(format_args!(
                "/interface wireguard set [find name={ifname}] mtu=1420 private-key={} comment={comment}",
                ros_quote(&key.to_base64())
            ));
        }
        None => {
            let own = ros_quote(&keys::encode(router.public_key.as_bytes()));
            line(format_args!(
                "# This router keeps its own key: the script takes over its WireGuard interface that holds it."
            ));
            line(format_args!(
                "# Remove the peers and addresses of an earlier hub on it first: their allowed addresses would overlap."
            ));
            line(format_args!(
                ":if ([:len [/interface wireguard find public-key={own}]] = 0) do={{:error {}}}",
                ros_quote(&format!(
                    "no WireGuard interface holds the private key of {}",
                    keys::encode(router.public_key.as_bytes())
                ))
            ));
            line(format_args!(
                "/interface wireguard set [find public-key={own}] name={ifname} mtu=1420 comment={comment}"
            ));
        }
    }
    let psk = router
        .preshared_key
        .as_ref()
        .map(|k| format!(" preshared-key={}", ros_quote(&k.to_base64())))
        .unwrap_or_default();
    let peer = format!(
        "public-key={}{psk} endpoint-address={} endpoint-port={} allowed-address={} persistent-keepalive=25s",
        ros_quote(&keys::encode(tenant.public_key.as_bytes())),
        ros_quote(public_host.trim_start_matches('[').trim_end_matches(']')),
        tenant.listen_port,
        allowed.join(",")
    );
    // A router moved from kernel WireGuard (`wgplane import`) has a peer
    // with the appliance's key already on this interface, without the
    // comment: it is adopted, not doubled (only while none has the comment).
    line(format_args!(
        ":if ([:len [/interface wireguard peers find comment={comment}]] = 0) do={{/interface wireguard peers set [find interface={ifname} public-key={}] comment={comment}}}",
        ros_quote(&keys::encode(tenant.public_key.as_bytes()))
    ));
    line(format_args!(
        ":if ([:len [/interface wireguard peers find comment={comment}]] = 0) do={{/interface wireguard peers add interface={ifname} {peer} comment={comment}}} else={{/interface wireguard peers set [find comment={comment}] interface={ifname} {peer}}}"
    ));
    if router.preshared_key.is_none() {
        // One removed here goes on the router too (run again after the
        // removal); a RouterOS that refused the empty value keeps it, and
        // the rest of the script runs.
        line(format_args!(
            ":do {{/interface wireguard peers set [find comment={comment}] preshared-key=\"\"}} on-error={{}}"
        ));
    }
    let interface = format!("interface={ifname}");
    let gateway = format!("gateway={ifname}");
    line(format_args!(
        "{}",
        ensure(
            "/ip address",
            &format!("address={}/32", router.vpn_ip),
            &interface
        )
    ));
    let mut routes = vec![ipnet::IpNet::V4(tenant.subnet)];
    routes.extend(host_routes.iter().copied());
    if let Some(address6) = address6 {
        let what = format!("address={address6}/{}", net6.prefix_len());
        let rest = format!("{interface} advertise=no");
        line(format_args!("{}", ensure("/ipv6 address", &what, &rest)));
    }
    for net in routes {
        let menu = if net.addr().is_ipv4() {
            "/ip route"
        } else {
            "/ipv6 route"
        };
        let what = format!("dst-address={net}");
        line(format_args!("{}", ensure(menu, &what, &gateway)));
    }
    // Who manages the router through the tunnel: the appliance, and in TUN
    // mode the host's networks behind it (the backend's, say).
    let mut managers = vec![ipnet::IpNet::V4(
        ipnet::Ipv4Net::new(tenant.server_ip(), 32).unwrap_or_default(),
    )];
    managers.extend(host_routes.iter().copied());
    line(format_args!(
        "# The appliance reaches the router's services (management forwards) ahead of any other rule."
    ));
    for net in &managers {
        // A single IPv4 address as RouterOS shows it (without /32), so that
        // `find` on a rule made by an earlier run matches it.
        let source = match net {
            ipnet::IpNet::V4(n) if n.prefix_len() == 32 => n.addr().to_string(),
            _ => net.to_string(),
        };
        let menu = if net.addr().is_ipv4() {
            "/ip firewall filter"
        } else {
            "/ipv6 firewall filter"
        };
        let accept = format!(
            "{menu} add chain=input in-interface={ifname} src-address={source} action=accept comment={comment}"
        );
        line(format_args!(
            ":if ([:len [{menu} find comment={comment} src-address={source}]] = 0) do={{:if ([:len [{menu} find dynamic=no]] = 0) do={{{accept}}} else={{{accept} place-before=[:pick [{menu} find dynamic=no] 0]}}}}"
        ));
    }
    if let Some(pool) = pool {
        line(format_args!(
            "# KTN gateway: the client pool comes through the tunnel and leaves on the WAN."
        ));
        let what = format!("dst-address={pool}");
        line(format_args!("{}", ensure("/ip route", &what, &gateway)));
        let what = format!("chain=srcnat src-address={pool}");
        let rest = "out-interface-list=WAN action=masquerade";
        line(format_args!("{}", ensure("/ip firewall nat", &what, rest)));
    }
    let list: Vec<String> = managers.iter().map(ToString::to_string).collect();
    line(format_args!(
        "# Last: the API service answers the appliance (and the host's networks) only."
    ));
    line(format_args!(
        "/ip service set api address={}",
        list.join(",")
    ));
    line(format_args!("}}"));
    out
}

/// A QR code of `text` as a PNG (8 pixels a module, 4 modules of quiet zone).
pub fn qr_png(text: &str) -> Result<Vec<u8>, RenderError> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let code = qrcode::QrCode::new(text.as_bytes()).map_err(|_| RenderError::TooLongForQr)?;
    let width = code.width();
    let colors = code.to_colors();
    let side = (width + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (x, y) = ((i % width + QUIET) * SCALE, (i / width + QUIET) * SCALE);
            for row in pixels[y * side..(y + SCALE) * side].chunks_mut(side) {
                row[x..x + SCALE].fill(0);
            }
        }
    }
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, side as u32, side as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|_| RenderError::Png)?;
        writer
            .write_image_data(&pixels)
            .map_err(|_| RenderError::Png)?;
    }
    Ok(png)
}

/// Why something could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The text does not fit in the largest QR code.
    #[error("text too long for a QR code")]
    TooLongForQr,
    /// PNG encoding failed.
    #[error("PNG encoding failed")]
    Png,
}

#[cfg(test)]
mod tests {
    use super::ros_quote;

    #[test]
    fn quoted_text_stays_one_string_on_one_line() {
        assert_eq!(ros_quote("Branch-A"), r#""Branch-A""#);
        assert_eq!(ros_quote(r#"a"b\c$d?e"#), r#""a\"b\\c\$d\?e""#);
        // A newline would end the command; it is written as an escape instead.
        let q = ros_quote("x\n/system reset-configuration\r\t");
        assert_eq!(q, r#""x\0A/system reset-configuration\0D\09""#);
        assert!(!q.chars().any(|c| c.is_control()));
        assert_eq!(ros_quote("Ünïcode"), "\"Ünïcode\"");
    }
}
