//! The control plane's model: tenants, routers, egress policies and clients, with
//! validation and allocation. Plain data and functions, no I/O: the API calls it under
//! one lock, then hands the resulting peer sets to the data plane.
//!
//! It leaves out persistence (the store's job), rendering of scripts and configs
//! (`render`), and anything that happens per packet.

pub mod error;
pub mod import;
pub mod model;
pub mod occupancy;
pub mod registry;
pub mod render;
pub mod restore;
pub mod wgconf;

pub use error::ControlError;
pub use model::{Client, EgressPolicy, Id, Router, Tenant};
pub use registry::Registry;
