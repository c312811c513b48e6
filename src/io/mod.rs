//! The IO shell: tokio tasks that own sockets and the clock and feed the core.
//!
//! `tunnel` runs one task per tenant tunnel (its UDP socket, its engine, its timer);
//! `runtime` starts, stops and talks to those tasks for the control plane;
//! `limits` and `sched` set the process up for them. Nothing here makes a
//! routing decision.

pub mod runtime;
pub mod tunnel;

pub mod bridge;
mod defer;
pub mod events;
pub mod forward;
pub mod limits;
pub mod sched;
pub(crate) mod sendbatch;
#[cfg(test)]
mod testnet;
pub mod tun;
pub mod udp;
pub mod wall;

pub use runtime::{Runtime, RuntimeError, RuntimeSettings, TunnelEvent};
