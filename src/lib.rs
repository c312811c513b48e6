//! wgplane: a userspace WireGuard data plane for many tenant tunnels in one process.
//!
//! ```text
//!   UDP :51820 (tenant A)   UDP :51821 (tenant B)   ...   one socket per tunnel
//!          |                        |
//!   io::   tunnel task              tunnel task           tokio: socket, clock, commands
//!          |                        |
//!   core:: TunnelEngine             TunnelEngine          sans-IO: demux, boringtun,
//!                                                         source check, egress policy, LPM
//!   control:: Registry (tenants, routers, clients, allocation) <- api:: axum admin API
//! ```
//!
//! A KTN packet, phone -> internet: datagram on the tenant's port -> peer by receiver
//! index -> decrypt -> source check -> egress policy picks the tenant's live gateway ->
//! encrypt for the gateway -> datagram to the gateway's endpoint: no TUN device and no
//! kernel routing on that path. Every lookup is scoped to one tunnel's engine, so
//! nothing crosses tenants.
//!
//! Left out: the kernel's WireGuard and routing (TUN mode, [`io::tun`], is the opt-in
//! exception that hands packets to the host), and NAT: phones reach the internet
//! through their tenant's gateway router, which masquerades them (its script,
//! [`control::render`], sets that up).

pub mod api;
pub mod bench;
pub mod config;
pub mod control;
pub mod core;
pub mod io;
pub mod keys;
pub mod store;
