//! Volume: storage allocated from a node's disk pool, mounted into
//! instances, surviving their restarts.

use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::validate::{checks, Errors, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    pub size: Quantity,
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Pin to a node; otherwise the controller picks one with room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<VolumeBackend>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    #[default]
    ReadWriteOnce,
    ReadOnlyMany,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeBackend {
    /// An ext4 image file per volume, loop-mounted.
    File,
    /// A btrfs subvolume with a qgroup limit.
    Btrfs,
}

impl Spec for VolumeSpec {
    fn check(&self, errs: &mut Errors) {
        checks::positive_bytes(errs, "spec.size", &self.size);
        if let Some(n) = &self.node {
            checks::dns_label(errs, "spec.node", n);
        }
    }
}
