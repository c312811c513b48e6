//! Reads a WireGuard server's configuration as `wg-quick` keeps it
//! (`/etc/wireguard/wg0.conf`) or `wg showconf` prints it: what a tenant
//! tunnel migrated from kernel WireGuard needs to keep its routers.
//!
//! The syntax is `wg(8)`'s: `[Interface]` and `[Peer]` sections (names and keys
//! case-insensitive), `Key = Value` lines, `#` to the end of a line a comment,
//! list values separated by commas, repeated list keys adding up. A comment
//! `# Name = …` (or `# Name: …`) inside a `[Peer]` section names that peer, as
//! several management tools write it.
//!
//! Left out: what the values mean to wgplane (`control::import` makes API
//! requests of them), and the `wg-quick` keys that run commands or set up the
//! host (`PostUp`, `Table`, `DNS`, `MTU`…): they are read, listed in
//! [`Interface::host_keys`] so the caller can say they are not carried over,
//! and otherwise ignored. Private and preshared keys never appear in an error.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::keys::{self, PresharedKey, SecretKey};

/// Why a configuration was refused. `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WgConfError {
    /// A `Key = Value` line before the first section.
    #[error("line {line}: a setting outside of [Interface] or [Peer]")]
    OutsideSection { line: usize },
    /// A section other than `[Interface]` and `[Peer]` (not quoted: a line
    /// that runs a key into its header would show the key).
    #[error("line {line}: a section other than [Interface] and [Peer]")]
    UnknownSection { line: usize },
    /// A key `wg` does not know in that section, quoted only when it looks
    /// like a key name (`PrivateKey: <key>` must not show the key).
    #[error("line {line}: unknown key {} in [{section}]", key.as_deref().map_or_else(|| "(not a key name)".to_string(), |k| format!("{k:?}")))]
    UnknownKey {
        line: usize,
        section: &'static str,
        key: Option<String>,
    },
    /// A line that is neither a section, a setting nor a comment.
    #[error("line {line}: expected `Key = Value`")]
    NoEquals { line: usize },
    /// A value that does not parse (never the value of a secret).
    #[error("line {line}: {key}: {reason}")]
    BadValue {
        line: usize,
        key: &'static str,
        reason: String,
    },
    /// A second `[Interface]`, or a key given twice where only one counts.
    #[error("line {line}: {what} given twice")]
    Twice { line: usize, what: &'static str },
    /// A `[Peer]` section without `PublicKey`.
    #[error("line {line}: [Peer] without PublicKey")]
    PeerWithoutKey { line: usize },
    /// No `[Interface]` section at all.
    #[error("no [Interface] section")]
    NoInterface,
}

/// The `[Interface]` section.
#[derive(Debug, Default)]
pub struct Interface {
    pub private_key: Option<SecretKey>,
    /// `ListenPort`; 0 (a random port) reads as none.
    pub listen_port: Option<u16>,
    /// `Address` (wg-quick), with their prefix lengths as written.
    pub addresses: Vec<IpNet>,
    /// The wg-quick keys read but not carried over (`PostUp`, `Table`, …), in
    /// the spelling of the file, each once.
    pub host_keys: Vec<String>,
    /// `SaveConfig = true`: `wg-quick down` rewrites the file from the running
    /// interface, without its comments.
    pub save_config: bool,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    /// Line of its `[Peer]` header.
    pub line: usize,
    /// From a `# Name = …` comment in the section.
    pub name: Option<String>,
    pub public_key: [u8; 32],
    pub preshared_key: Option<PresharedKey>,
    pub allowed_ips: Vec<IpNet>,
    /// `Endpoint`, as written.
    pub endpoint: Option<String>,
    /// `PersistentKeepalive`, in seconds, when on.
    pub keepalive: Option<u16>,
}

/// A whole configuration.
#[derive(Debug)]
pub struct WgConf {
    pub interface: Interface,
    pub peers: Vec<PeerSection>,
}

/// A peer section while it is read: the key may come on any of its lines.
struct OpenPeer {
    line: usize,
    name: Option<String>,
    public_key: Option<[u8; 32]>,
    preshared_key: Option<PresharedKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<String>,
    keepalive: Option<u16>,
}

impl OpenPeer {
    fn close(self) -> Result<PeerSection, WgConfError> {
        Ok(PeerSection {
            line: self.line,
            name: self.name,
            public_key: self
                .public_key
                .ok_or(WgConfError::PeerWithoutKey { line: self.line })?,
            preshared_key: self.preshared_key,
            allowed_ips: self.allowed_ips,
            endpoint: self.endpoint,
            keepalive: self.keepalive,
        })
    }
}

enum Section {
    None,
    Interface,
    Peer(OpenPeer),
}

/// wg-quick's own keys: they configure the host, not the WireGuard device.
const HOST_KEYS: &[&str] = &[
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

/// Parses the text of a configuration file.
pub fn parse(text: &str) -> Result<WgConf, WgConfError> {
    let mut interface: Option<Interface> = None;
    let mut peers = Vec::new();
    let mut section = Section::None;
    // A name comment names the peer whose section it is in, unless that peer
    // has one already: then it waits for the next `[Peer]` (wireguard-ui
    // writes `# Name: …` just above each header, so the first one is in
    // `[Interface]` and each next one at the end of the peer before).
    let mut pending: Option<String> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let (content, comment) = match raw.split_once('#') {
            Some((content, comment)) => (content.trim(), Some(comment)),
            None => (raw.trim(), None),
        };
        if let Some(name) = comment.and_then(name_in) {
            match &mut section {
                Section::Peer(peer) if peer.name.is_none() => peer.name = Some(name),
                _ => pending = Some(name),
            }
        }
        if content.is_empty() {
            continue;
        }
        if content.starts_with('[') {
            if let Section::Peer(peer) = std::mem::replace(&mut section, Section::None) {
                peers.push(peer.close()?);
            }
            section = match content.to_ascii_lowercase().as_str() {
                "[interface]" if interface.is_some() => {
                    return Err(WgConfError::Twice {
                        line,
                        what: "[Interface]",
                    })
                }
                "[interface]" => {
                    interface = Some(Interface::default());
                    pending = None;
                    Section::Interface
                }
                "[peer]" => Section::Peer(OpenPeer {
                    line,
                    name: pending.take(),
                    public_key: None,
                    preshared_key: None,
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    keepalive: None,
                }),
                _ => return Err(WgConfError::UnknownSection { line }),
            };
            continue;
        }
        let (key, value) = content
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or(WgConfError::NoEquals { line })?;
        let setting = Setting {
            line,
            key,
            lower: key.to_ascii_lowercase(),
            value,
        };
        match &mut section {
            Section::None => return Err(WgConfError::OutsideSection { line }),
            Section::Interface => {
                let Some(iface) = interface.as_mut() else {
                    return Err(WgConfError::NoInterface);
                };
                interface_key(iface, &setting)?;
            }
            Section::Peer(peer) => peer_key(peer, &setting)?,
        }
        if matches!(section, Section::Interface) {
            pending = None;
        }
    }
    if let Section::Peer(peer) = section {
        peers.push(peer.close()?);
    }
    let interface = interface.ok_or(WgConfError::NoInterface)?;
    Ok(WgConf { interface, peers })
}

/// One `Key = Value` line.
struct Setting<'a> {
    line: usize,
    /// As written, for messages.
    key: &'a str,
    /// Lower case, for matching.
    lower: String,
    value: &'a str,
}

fn interface_key(iface: &mut Interface, setting: &Setting) -> Result<(), WgConfError> {
    let Setting {
        line, key, value, ..
    } = *setting;
    match setting.lower.as_str() {
        "privatekey" => {
            once(&iface.private_key, line, "PrivateKey")?;
            iface.private_key = Some(SecretKey::parse(value).map_err(bad_key(line, "PrivateKey"))?);
        }
        "listenport" => {
            let port: u16 = value.parse().map_err(|_| WgConfError::BadValue {
                line,
                key: "ListenPort",
                reason: format!("{:?} is not a port", shown(value)),
            })?;
            iface.listen_port = (port != 0).then_some(port);
        }
        "address" => {
            for item in list(value) {
                iface.addresses.push(prefix(item, line, "Address")?);
            }
        }
        lower if HOST_KEYS.contains(&lower) => {
            if lower == "saveconfig" {
                iface.save_config = value.eq_ignore_ascii_case("true");
            }
            if !iface.host_keys.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                iface.host_keys.push(key.to_string());
            }
        }
        _ => {
            return Err(WgConfError::UnknownKey {
                line,
                section: "Interface",
                key: key_name(key),
            })
        }
    }
    Ok(())
}

fn peer_key(peer: &mut OpenPeer, setting: &Setting) -> Result<(), WgConfError> {
    let Setting {
        line, key, value, ..
    } = *setting;
    match setting.lower.as_str() {
        "publickey" => {
            once(&peer.public_key, line, "PublicKey")?;
            peer.public_key = Some(keys::decode(value).map_err(bad_key(line, "PublicKey"))?);
        }
        "presharedkey" => {
            once(&peer.preshared_key, line, "PresharedKey")?;
            peer.preshared_key =
                Some(PresharedKey::parse(value).map_err(bad_key(line, "PresharedKey"))?);
        }
        "allowedips" => {
            for item in list(value) {
                peer.allowed_ips.push(prefix(item, line, "AllowedIPs")?);
            }
        }
        "endpoint" => peer.endpoint = Some(value.to_string()),
        "persistentkeepalive" => peer.keepalive = value.parse().ok().filter(|&k| k > 0),
        _ => {
            return Err(WgConfError::UnknownKey {
                line,
                section: "Peer",
                key: key_name(key),
            })
        }
    }
    Ok(())
}

/// Refuses a second `what` where only one counts.
fn once<T>(slot: &Option<T>, line: usize, what: &'static str) -> Result<(), WgConfError> {
    match slot {
        Some(_) => Err(WgConfError::Twice { line, what }),
        None => Ok(()),
    }
}

/// A key that does not decode, said without quoting it (it may be a secret).
fn bad_key(line: usize, key: &'static str) -> impl FnOnce(keys::KeyError) -> WgConfError {
    move |e| WgConfError::BadValue {
        line,
        key,
        reason: e.to_string(),
    }
}

/// The items of a comma-separated list, empty ones skipped (`wg` allows a
/// trailing comma).
fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// A prefix (`10.0.0.1/32`) or a bare address (a host prefix), as written:
/// `Address = 10.100.0.1/16` keeps its host bits.
fn prefix(item: &str, line: usize, key: &'static str) -> Result<IpNet, WgConfError> {
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| WgConfError::BadValue {
            line,
            key,
            reason: format!("{:?} is not an address or prefix", shown(item)),
        })
}

/// The name in a `Name = …` or `Name: …` comment, if the comment is one: at
/// most 64 characters, control characters made spaces (it is shown in notes
/// and errors on the operator's terminal, where an escape sequence would
/// act).
fn name_in(comment: &str) -> Option<String> {
    let text = comment.trim_start_matches('#').trim();
    let rest = text.get(..4).filter(|k| k.eq_ignore_ascii_case("name"))?;
    let rest = text[rest.len()..].trim_start();
    let value: String = rest
        .strip_prefix('=')
        .or_else(|| rest.strip_prefix(':'))?
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let value = value.trim();
    (!value.is_empty()).then(|| value.chars().take(64).collect())
}

/// `key` when it looks like a key name (letters, at most 24), for an error.
fn key_name(key: &str) -> Option<String> {
    (!key.is_empty() && key.len() <= 24 && key.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| key.to_string())
}

/// At most 64 characters of something the file says, for an error.
fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "\
# The platform's wg0, as wg-quick keeps it.
[Interface]
Address = 10.100.0.1/16, fd00::1/64
ListenPort = 51820
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
PostUp = iptables -A FORWARD -i %i -j ACCEPT
SaveConfig = false

[Peer]
# Name = Branch A
PublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=
AllowedIPs = 10.100.1.1/32,192.168.88.0/24
AllowedIPs = 192.168.89.0/24
Endpoint = 198.51.100.7:13231

[peer]
publickey=3dw2xMD9xm1rs7kp6NkLUxvPJZPYRjA2yjn2z6nj5iY=   # the gateway
presharedkey = 9s0OcPyS5t3ZDl3zGyRPUKnbTtqg1+5RkpIZJ4HS3zQ=
allowedips = 10.100.0.40/32, 0.0.0.0/0,
PersistentKeepalive = 25
";

    #[test]
    fn a_wg_quick_server_config_is_read() {
        let conf = parse(SERVER).unwrap();
        let i = &conf.interface;
        assert_eq!(
            i.private_key.as_ref().unwrap().to_base64(),
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        );
        assert_eq!(i.listen_port, Some(51820));
        let addresses: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addresses, ["10.100.0.1/16", "fd00::1/64"]);
        assert_eq!(i.host_keys, ["PostUp", "SaveConfig"]);
        assert_eq!(conf.peers.len(), 2);
        let a = &conf.peers[0];
        assert_eq!((a.line, a.name.as_deref()), (9, Some("Branch A")));
        assert_eq!(
            keys::encode(&a.public_key),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        let allowed: Vec<String> = a.allowed_ips.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            allowed,
            ["10.100.1.1/32", "192.168.88.0/24", "192.168.89.0/24"]
        );
        assert_eq!(a.endpoint.as_deref(), Some("198.51.100.7:13231"));
        assert_eq!(a.preshared_key, None);
        let gw = &conf.peers[1];
        assert_eq!((gw.line, gw.name.as_deref()), (16, None));
        assert_eq!(
            gw.preshared_key
                .as_ref()
                .map(PresharedKey::to_base64)
                .as_deref(),
            Some("9s0OcPyS5t3ZDl3zGyRPUKnbTtqg1+5RkpIZJ4HS3zQ=")
        );
        assert_eq!(gw.allowed_ips.len(), 2);
    }

    #[test]
    fn what_wg_refuses_is_refused_by_line() {
        let cases: &[(&str, WgConfError)] = &[
            ("ListenPort = 1", WgConfError::OutsideSection { line: 1 }),
            (
                "[Interface]\n[Interface]",
                WgConfError::Twice {
                    line: 2,
                    what: "[Interface]",
                },
            ),
            (
                "[Interface]\n[Wat]",
                WgConfError::UnknownSection { line: 2 },
            ),
            ("[Interface]\nListenPort", WgConfError::NoEquals { line: 2 }),
            (
                "[Interface]\nColour = red",
                WgConfError::UnknownKey {
                    line: 2,
                    section: "Interface",
                    key: Some("Colour".into()),
                },
            ),
            (
                "[Interface]\n[Peer]\nAllowedIPs = 10.0.0.1/32",
                WgConfError::PeerWithoutKey { line: 2 },
            ),
            (
                "[Peer]\nPublicKey = x",
                WgConfError::BadValue {
                    line: 2,
                    key: "PublicKey",
                    reason: "not valid base64".into(),
                },
            ),
            ("# only a comment", WgConfError::NoInterface),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text).unwrap_err(), *expected, "{text}");
        }
        let e = parse("[Interface]\nListenPort = 70000").unwrap_err();
        assert!(matches!(
            e,
            WgConfError::BadValue {
                line: 2,
                key: "ListenPort",
                ..
            }
        ));
        let e = parse("[Interface]\n[Peer]\nAllowedIPs = 10.0.0.300/32").unwrap_err();
        assert!(matches!(
            e,
            WgConfError::BadValue {
                line: 3,
                key: "AllowedIPs",
                ..
            }
        ));
    }

    /// A secret that does not parse is not quoted back: the error may be
    /// printed or logged.
    #[test]
    fn secrets_are_never_quoted() {
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";
        let padded = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        for text in [
            format!("[Interface]\nPrivateKey = {secret}"),
            format!("[Interface]\n[Peer]\nPresharedKey = {secret}"),
            // Typos that run the key into what would be quoted: the key's
            // own `=` ends the "key name".
            format!("[Interface]\nPrivateKey: {padded}"),
            format!("[Interface]\nPrivateKey {padded}"),
            format!("[Interface] PrivateKey = {padded}"),
            format!("[Interface]\n[Peer]\nPresharedKey: {padded}"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                !e.contains(&padded[..8]) && !e.contains(&secret[..8]),
                "{e}"
            );
        }
    }

    #[test]
    fn names_come_from_name_comments_in_the_peers_section() {
        for (comment, name) in [
            ("# Name = Branch A", Some("Branch A")),
            ("#name:gw", Some("gw")),
            ("## NAME = x # y", Some("x # y")),
            ("# Names = x", None),
            ("# Name =", None),
            ("# branch-a", None),
            // An escape sequence never reaches the terminal that shows it.
            ("# Name = \x1b]0;pwned\x07\x1b[2JB", Some("]0;pwned  [2JB")),
            ("# Name = \x1b\t", None),
        ] {
            let text = format!(
                "[Interface]\n[Peer]\n{comment}\nPublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
            );
            assert_eq!(
                parse(&text).unwrap().peers[0].name.as_deref(),
                name,
                "{comment}"
            );
        }
        // One among [Interface]'s settings names no peer.
        let text = "[Interface]\n# Name = server\nListenPort = 1\n[Peer]\nPublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        assert_eq!(parse(text).unwrap().peers[0].name, None);
    }

    /// wireguard-ui writes each peer's name just above its `[Peer]` header;
    /// others write it inside the section: both name the right peer.
    #[test]
    fn names_above_the_header_name_the_next_peer() {
        let (a, b, c) = (
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
            "3dw2xMD9xm1rs7kp6NkLUxvPJZPYRjA2yjn2z6nj5iY=",
            "9s0OcPyS5t3ZDl3zGyRPUKnbTtqg1+5RkpIZJ4HS3zQ=",
        );
        let text = format!(
            "[Interface]\nListenPort = 51820\n\n\
             # ID:   c1\n# Name: Branch A\n# Email: a@example.com\n[Peer]\nPublicKey = {a}\nAllowedIPs = 10.100.1.1/32\n\n\
             # Name: Branch B\n[Peer]\nPublicKey = {b}\nAllowedIPs = 10.100.1.2/32\n\n\
             [Peer]\n# Name = Branch C\nPublicKey = {c}\nAllowedIPs = 10.100.1.3/32\n"
        );
        let names = |text: &str| -> Vec<Option<String>> {
            parse(text)
                .unwrap()
                .peers
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(
            names(&text),
            [
                Some("Branch A".into()),
                Some("Branch B".into()),
                Some("Branch C".into())
            ]
        );
        // A name after a peer's first settings is still that peer's.
        let text = format!(
            "[Interface]\n[Peer]\nPublicKey = {a}\n# Name = A\n[Peer]\nPublicKey = {b}\n# Name = B\n"
        );
        assert_eq!(names(&text), [Some("A".into()), Some("B".into())]);
    }
}
