//! The image's single layer: a deterministic tar, optionally gzipped.
//!
//! Entries come in sorted path order (directories before what they hold),
//! as GNU tar headers with uid/gid 0, no user or group names, the spec's
//! modes and the spec's epoch as mtime. Directory names end in `/`. The
//! gzip stream has a fixed header (mtime 0, no file name, OS "unknown")
//! and a fixed level, so equal inputs give equal bytes.

use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

use crate::error::ImageError;
use crate::spec::{ImageSpec, LayerCompression, Node, ValidSpec};

/// Gzip level of compressed layers. Changing it changes every digest.
pub const GZIP_LEVEL: u32 = 9;

pub const MEDIA_LAYER_TAR: &str = ironmesh_oci::media::OCI_LAYER_TAR;
pub const MEDIA_LAYER_TAR_GZIP: &str = ironmesh_oci::media::OCI_LAYER_TAR_GZIP;

/// A built layer.
pub(crate) struct Layer {
    /// The blob: the tar, or the gzipped tar.
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    /// `sha256:` of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    ironmesh_oci::Digest::of(bytes).into()
}

pub(crate) fn build_layer(spec: &ImageSpec, valid: &ValidSpec) -> Result<Layer, ImageError> {
    let tar = build_tar(spec, valid)?;
    let diff_id = sha256_digest(&tar);
    let layer_err = |source| ImageError::Layer {
        image: spec.reference(),
        source,
    };
    match spec.compression {
        LayerCompression::None => Ok(Layer {
            blob: tar,
            media_type: MEDIA_LAYER_TAR,
            diff_id,
        }),
        LayerCompression::Gzip => {
            let blob = gzip(&tar).map_err(layer_err)?;
            Ok(Layer {
                blob,
                media_type: MEDIA_LAYER_TAR_GZIP,
                diff_id,
            })
        }
    }
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    // GzBuilder writes no file name, no comment and no extra field unless
    // asked to; mtime 0 and OS 255 ("unknown") keep the header fixed.
    let mut encoder: GzEncoder<Vec<u8>> = GzBuilder::new().mtime(0).operating_system(255).write(
        Vec::with_capacity(data.len() / 2),
        Compression::new(GZIP_LEVEL),
    );
    encoder.write_all(data)?;
    encoder.finish()
}

fn build_tar(spec: &ImageSpec, valid: &ValidSpec) -> Result<Vec<u8>, ImageError> {
    let mut builder = tar::Builder::new(Vec::new());
    let layer_err = |source| ImageError::Layer {
        image: spec.reference(),
        source,
    };
    for (path, node) in &valid.tree {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(spec.epoch);
        match *node {
            Node::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(mode);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{path}/"), io::empty())
                    .map_err(layer_err)?;
            }
            Node::File { mode, index } => {
                let file = &spec.files[index];
                // Read whole: the size in the header and the bytes written
                // then come from one read even if the source changes.
                let data =
                    std::fs::read(&file.source).map_err(|source| ImageError::ReadSource {
                        image: spec.reference(),
                        path_in_image: file.path_in_image.clone(),
                        source_path: file.source.clone(),
                        source,
                    })?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(mode);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, data.as_slice())
                    .map_err(layer_err)?;
            }
        }
    }
    builder.into_inner().map_err(layer_err)
}
