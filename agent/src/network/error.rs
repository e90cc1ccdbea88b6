//! The one error type of the instance networking module.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

/// What went wrong while giving an instance its network, or while routing
/// to other nodes. Every variant names the object (instance, interface,
/// namespace file, peer node) and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The agent's [`super::NetworkConfig`] is not usable.
    #[error("network config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// An instance name that cannot name a namespace file.
    #[error("instance name {name:?} is not valid: {reason}")]
    InvalidInstance { name: String, reason: &'static str },
    /// `setup` or `set_peer_routes` before `configure`.
    #[error("instance networking is not configured: the node has no pod CIDR yet")]
    NotConfigured,
    /// The pod CIDR from the controller cannot hold instances.
    #[error("pod CIDR {cidr} is not usable: {reason}")]
    BadPodCidr { cidr: Ipv4Net, reason: &'static str },
    /// Every address of the pod CIDR is leased.
    #[error("instance {instance}: pod CIDR {cidr} has no free address ({leased} leased)")]
    Exhausted {
        instance: String,
        cidr: Ipv4Net,
        leased: usize,
    },
    /// The leases file exists but cannot be trusted; it is never silently
    /// replaced, since that could hand out an address twice.
    #[error("leases file {path}: {reason}")]
    LeasesCorrupt { path: PathBuf, reason: String },
    /// A file or mount operation failed.
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{object}: {step}: {source}")]
    Netlink {
        /// e.g. `instance web-0 (veth im1a2b3c4d)` or `peer node b`.
        object: String,
        step: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    /// A peer route the controller sent cannot be installed as given.
    #[error("peer route for node {node} ({cidr} via {via}): {reason}")]
    InvalidPeer {
        node: String,
        cidr: Ipv4Net,
        via: Ipv4Addr,
        reason: String,
    },
}

impl NetworkError {
    pub(crate) fn io(step: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NetworkError::Io {
            step,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn netlink(
        object: impl Into<String>,
        step: &'static str,
        source: rtnetlink::Error,
    ) -> Self {
        NetworkError::Netlink {
            object: object.into(),
            step,
            source,
        }
    }
}

/// The errno of a netlink NACK, positive (`libc::ENOENT`, …).
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// True when the kernel answered "no such object", which an idempotent
/// delete treats as done.
pub(crate) fn is_absent(e: &rtnetlink::Error) -> bool {
    matches!(
        errno(e),
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL)
    )
}
