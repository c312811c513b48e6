//! The IO shell: tokio tasks that own sockets and the clock and feed the core.
//!
//! - `tunnel`: one task per tenant tunnel (its UDP socket, its engine, its
//!   timer, its share of the host device); `udp` and `sendbatch` are its socket
//!   layer (`recvmmsg` with GRO, `sendmmsg` with GSO), `defer` its handshake
//!   turns under a storm.
//! - `runtime`: starts, stops and talks to those tasks for the control plane.
//! - `tun`: TUN mode's host device, its addresses, routes and reader.
//! - `forward` and `bridge`: management forwards, host TCP listeners whose
//!   connections a tunnel's userspace stack carries to a router.
//! - `events`: the peer events' hub, SSE subscribers and webhooks.
//! - `limits` and `sched` set the process up; `wall` writes wall-clock times.
//!
//! Left out: every routing decision and all protocol state (`core`), and what is
//! stored (`control`, `store`).

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
