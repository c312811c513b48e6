//! Errors of the control plane, each mapped to one HTTP status by the API.
//!
//! Left out: the statuses and the JSON answer, which the API's `error` module makes
//! from these, and the errors of the store ([`crate::store::StoreError`]) and of the
//! running tunnels ([`crate::io::RuntimeError`]).

use ipnet::{IpNet, Ipv4Net};

use crate::core::alloc::AllocError;

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// One input field is malformed (400).
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// The tenant does not exist (404).
    #[error("tenant {0} does not exist")]
    NoTenant(String),
    /// The router does not exist (404).
    #[error("router {0} does not exist")]
    NoRouter(String),
    /// The client does not exist (404).
    #[error("client {0} does not exist")]
    NoClient(String),
    /// The router has no forward for this port (404).
    #[error("no forward for port {0}")]
    NoForward(u16),
    /// The tenant has no egress policy (404 on GET/DELETE, 409 for clients).
    #[error("tenant has no egress policy")]
    NoEgress,
    /// The public key is already used by another peer of the tunnel (409).
    #[error("public key is already used by {owner} in this tunnel")]
    DuplicateKey { owner: String },
    /// Another tenant's tunnel has this key pair already (409).
    #[error("the key is tenant {tenant}'s tunnel key already")]
    DuplicateTunnelKey { tenant: String },
    /// The address is taken or not usable (409).
    #[error("{addr} is not available: {reason}")]
    AddressUnavailable {
        field: &'static str,
        addr: IpNet,
        reason: &'static str,
    },
    /// The listen port is taken (409).
    #[error("listen port {0} is already in use")]
    PortInUse(u16),
    /// Another forward listens on this address already (409).
    #[error("{0}")]
    ListenTaken(String),
    /// The subnet or pool overlaps another tenant's subnet or pool (409).
    #[error("{net} overlaps {other}")]
    Overlap {
        field: &'static str,
        net: Ipv4Net,
        other: Ipv4Net,
    },
    /// A value of an existing tenant cannot change while it is live (409).
    #[error("{field} of an existing tenant cannot change (is {current})")]
    Immutable {
        field: &'static str,
        current: String,
    },
    /// The object is referenced by another one (409).
    #[error("{0}")]
    InUse(String),
    /// The state loaded from the store breaks a rule the API enforces (start-up
    /// only: a hand-edited or damaged state).
    // `reason` is part of the message, not a `source()`: a chain of causes
    // (anyhow's at start-up) would say it twice.
    #[error("the stored state is inconsistent: tenant {tenant}: {reason}")]
    Inconsistent {
        tenant: super::Id,
        reason: super::restore::RestoreError,
    },
    /// Allocation found nothing (409).
    #[error(transparent)]
    Exhausted(#[from] AllocError),
}

impl ControlError {
    /// Shorthand for a field error.
    pub fn field(field: &'static str, reason: impl Into<String>) -> Self {
        ControlError::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// The input field at fault, if one is.
    pub fn field_name(&self) -> Option<&'static str> {
        match self {
            ControlError::InvalidField { field, .. }
            | ControlError::AddressUnavailable { field, .. }
            | ControlError::Overlap { field, .. }
            | ControlError::Immutable { field, .. } => Some(field),
            ControlError::DuplicateKey { .. } => Some("public_key"),
            ControlError::DuplicateTunnelKey { .. } => Some("private_key"),
            ControlError::PortInUse(_) => Some("listen_port"),
            ControlError::ListenTaken(_) => Some("listen"),
            _ => None,
        }
    }

    /// Stable snake_case code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::InvalidField { .. } => "invalid_field",
            ControlError::NoTenant(_) => "tenant_not_found",
            ControlError::NoRouter(_) => "router_not_found",
            ControlError::NoClient(_) => "client_not_found",
            ControlError::NoEgress => "egress_not_found",
            ControlError::NoForward(_) => "forward_not_found",
            ControlError::DuplicateKey { .. } => "duplicate_public_key",
            ControlError::DuplicateTunnelKey { .. } => "duplicate_tunnel_key",
            ControlError::AddressUnavailable { .. } => "address_unavailable",
            ControlError::PortInUse(_) => "port_in_use",
            ControlError::ListenTaken(_) => "listen_unavailable",
            ControlError::Overlap { .. } => "overlap",
            ControlError::Immutable { .. } => "immutable_field",
            ControlError::InUse(_) => "in_use",
            ControlError::Inconsistent { .. } => "inconsistent_state",
            ControlError::Exhausted(_) => "exhausted",
        }
    }
}
