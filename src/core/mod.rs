//! The sans-IO core: everything that decides, nothing that waits.
//!
//! No sockets, no tokio, no clock reads: time comes in as `now`, datagrams come in as
//! byte slices and leave through a [`engine::Sink`]. This is what the tests drive with
//! simulated peers and what the fuzz targets attack.

pub mod admission;
pub mod alloc;
pub mod budget;
pub mod engine;
pub mod harness;
pub mod icmp;
pub mod load;
pub mod netstack;
pub mod packet;
pub mod peer;
pub mod policy;
pub mod sources;
pub mod table;
