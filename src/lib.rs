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
//! encrypt for the gateway -> datagram to the gateway's endpoint. No TUN, no kernel
//! routing. Every lookup is scoped to one tunnel's engine, so nothing crosses tenants.

pub mod api;
pub mod bench;
pub mod config;
pub mod control;
pub mod core;
pub mod io;
pub mod keys;
pub mod store;
