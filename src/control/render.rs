//! Text that devices receive: the wg-quick config of a client.
//!
//! RouterOS scripts come with the provisioning work of the control plane (issue 3);
//! this module only renders, it never decides.

use std::fmt::Write as _;

use super::model::{Client, Tenant};
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
