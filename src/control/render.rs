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
/// limited to the appliance's server address. A gateway of the egress policy also
/// accepts the client pool from the tunnel, routes it back into the tunnel and
/// masquerades it on its WAN interface list. A router given an address in the
/// tenant's IPv6 network (an `allowed_ips` entry `/128` inside it) gets that
/// address with the network's /64, and accepts the network from the tunnel.
pub fn router_script(tenant: &Tenant, router: &Router, public_host: &str) -> String {
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
    let comment = ros_quote(&format!("wgplane {}", tenant.id));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wgplane: RouterOS v7 script for router {} ({}) of tenant {}",
        ros_quote(&router.name),
        router.id,
        tenant.id
    );
    let _ = writeln!(out, "/system identity set name={}", ros_quote(&router.name));
    match &router.private_key {
        Some(key) => {
            let _ = writeln!(
                out,
                "/interface wireguard add name={ifname} listen-port=13231 mtu=1420 private-key={} comment={comment}",
                ros_quote(&key.to_base64())
            );
        }
        None => {
            let _ = writeln!(
                out,
                "# This router keeps its own key: the interface below must hold the private key of {}",
                keys::encode(router.public_key.as_bytes())
            );
            let _ = writeln!(
                out,
                "/interface wireguard add name={ifname} listen-port=13231 mtu=1420 comment={comment}"
            );
        }
    }
    let _ = writeln!(
        out,
        "/interface wireguard peers add interface={ifname} public-key={} endpoint-address={} endpoint-port={} allowed-address={} persistent-keepalive=25s comment={comment}",
        ros_quote(&keys::encode(tenant.public_key.as_bytes())),
        public_host.trim_start_matches('[').trim_end_matches(']'),
        tenant.listen_port,
        allowed.join(",")
    );
    let _ = writeln!(
        out,
        "/ip address add address={}/32 interface={ifname} comment={comment}",
        router.vpn_ip
    );
    let _ = writeln!(
        out,
        "/ip route add dst-address={} gateway={ifname} comment={comment}",
        tenant.subnet
    );
    if let Some(address6) = address6 {
        let _ = writeln!(
            out,
            "/ipv6 address add address={address6}/{} interface={ifname} advertise=no comment={comment}",
            net6.prefix_len()
        );
    }
    let _ = writeln!(out, "/ip service set api address={}/32", tenant.server_ip());
    if let Some(pool) = pool {
        let _ = writeln!(
            out,
            "# KTN gateway: the client pool comes through the tunnel and leaves on the WAN."
        );
        let _ = writeln!(
            out,
            "/ip route add dst-address={pool} gateway={ifname} comment={comment}"
        );
        let _ = writeln!(
            out,
            "/ip firewall nat add chain=srcnat src-address={pool} out-interface-list=WAN action=masquerade comment={comment}"
        );
    }
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
