//! `imctl image push`, `ls`, `rm` and `gc`: the operator's side of the
//! controller's image store.
//!
//! A push reads an OCI image layout (a directory with `oci-layout`,
//! `index.json` and `blobs/sha256/…`, or a tar of one, optionally gzipped)
//! and is a client of the controller's OCI registry (`--registry-listen`,
//! [`crate::registry_client`]), as the operator's certificate: it asks
//! (`HEAD`) which blobs the registry lacks, uploads only those, then puts
//! each image's manifest by its tag (an index: its manifests by digest,
//! then the index by tag). The registry only accepts a manifest once every
//! blob it references is stored. Pushing the same image twice uploads
//! nothing the second time.
//!
//! Names: `--name` if given (only for a layout holding one image), else
//! the manifest's `io.containerd.image.name` annotation (the full
//! `name:tag` that `build-images` and `ctr export` write), else
//! `org.opencontainers.image.ref.name` when it is a full reference rather
//! than a bare tag. A layout with several images pushes them all.

use std::io::{IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use ironmesh_api::client_config::ClientConfig;
use ironmesh_oci::annotations::{
    CONTAINERD_NAME as ANNOTATION_CONTAINERD_NAME, REF_NAME as ANNOTATION_REF_NAME,
};
use ironmesh_oci::{media, Descriptor, Digest, ImageIndex, ImageManifest};
use ironmesh_proto::v1::{
    operator_service_client::OperatorServiceClient, CollectImageGarbageRequest, ImageInfo,
    ListImagesRequest, RemoveImageRequest,
};
use tonic::transport::Channel;

use crate::client;
use crate::registry_client::RegistryClient;

/// Largest manifest read into memory.
const MAX_MANIFEST: u64 = 4 << 20;
/// Uploads at least this large show progress even when stderr is not a
/// terminal (a line per quarter).
const BIG_UPLOAD: u64 = 64 << 20;
/// On a terminal, uploads smaller than this finish too fast to need a bar.
const TTY_MIN_PROGRESS: u64 = 1 << 20;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Upload an OCI image layout (directory or tar) to the controller's
    /// image store, through its OCI registry.
    Push {
        /// An OCI image layout directory (as `build-images --out` writes),
        /// or a tar (optionally gzipped) of one. Single images and
        /// multi-platform indexes.
        path: PathBuf,
        /// The controller's registry (its --registry-listen) as host:port.
        /// Default: `registry` in the imctl config, else the host of its
        /// `server` with port 5000.
        #[arg(long, env = "IMCTL_REGISTRY")]
        registry: Option<String>,
        /// Image reference to tag, e.g. ironmesh.dev/records-server:0.1.0.
        /// Default: the name annotated in index.json. Only for a layout
        /// holding one image.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the images in the controller's image store.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(short, long, value_enum)]
        output: Option<ListOutput>,
    },
    /// Remove image names (admin), then collect the blobs no image refers
    /// to any more (those older than the controller's --image-gc-grace).
    Rm {
        /// Image references, e.g. ironmesh.dev/records-server:0.1.0.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Collect blobs and untagged manifests nothing refers to (admin).
    Gc,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ListOutput {
    Json,
}

pub async fn run(
    cfg: &ClientConfig,
    command: ImageCommand,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    match command {
        ImageCommand::Push {
            path,
            registry,
            name,
        } => {
            // Everything local is read and checked before connecting.
            let source = LayoutSource::open(&path)?;
            let images = read_layout(source.dir(), name.as_deref())
                .with_context(|| format!("image layout {}", path.display()))?;
            let addr = crate::registry_client::registry_address(registry.as_deref(), cfg)?;
            let mut registry = RegistryClient::connect(cfg, &addr).await?;
            push(&mut registry, source.dir(), &images).await
        }
        ImageCommand::Rm { names } => {
            let mut api = client::connect(cfg).await?;
            let mut failed = false;
            for name in names {
                match api
                    .remove_image(RemoveImageRequest { name: name.clone() })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        println!("removed {} ({})", r.name, r.manifest_digest);
                    }
                    Err(s) => {
                        eprintln!("error: {name}: {}", status_err(s));
                        failed = true;
                    }
                }
            }
            gc(&mut api, status_err).await?;
            if failed {
                bail!("some images were not removed");
            }
            Ok(())
        }
        ImageCommand::Gc => {
            let mut api = client::connect(cfg).await?;
            gc(&mut api, status_err).await
        }
        ImageCommand::Ls { output } => {
            let mut api = client::connect(cfg).await?;
            let images = api
                .list_images(ListImagesRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .images;
            match output {
                Some(ListOutput::Json) => {
                    let v: Vec<serde_json::Value> = images
                        .iter()
                        .map(|i| {
                            serde_json::json!({
                                "name": i.name,
                                "manifestDigest": i.manifest_digest,
                                "size": i.size,
                                "pushedUnixMs": i.pushed_unix_ms,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                None if images.is_empty() => eprintln!("No images found."),
                None => print!("{}", table(&images, now_unix_ms())),
            }
            Ok(())
        }
    }
}

async fn gc(
    api: &mut OperatorServiceClient<Channel>,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let r = api
        .collect_image_garbage(CollectImageGarbageRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "garbage collection: {} freed in {} blobs, {} untagged manifests removed, {} blobs kept (grace {}s)",
        human_size(r.bytes_freed),
        r.blobs_removed,
        r.manifests_removed,
        r.blobs_kept,
        r.grace_seconds
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// reading a layout

/// A layout directory, or a tar extracted into a temporary one.
enum LayoutSource {
    Dir(PathBuf),
    Extracted {
        _tmp: tempfile::TempDir,
        root: PathBuf,
    },
}

impl LayoutSource {
    fn open(path: &Path) -> anyhow::Result<LayoutSource> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            return Ok(LayoutSource::Dir(path.to_path_buf()));
        }
        let tmp = tempfile::Builder::new()
            .prefix("imctl-layout-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let root = extract_layout_tar(path, tmp.path())
            .with_context(|| format!("cannot read image tar {}", path.display()))?;
        Ok(LayoutSource::Extracted { _tmp: tmp, root })
    }

    fn dir(&self) -> &Path {
        match self {
            LayoutSource::Dir(d) => d,
            LayoutSource::Extracted { root, .. } => root,
        }
    }
}

/// Extracts the layout files of a tar (gzip detected by its magic) into
/// `dest` and returns the directory holding `oci-layout`. Only
/// `oci-layout`, `index.json` and `blobs/sha256/<hex>` regular files are
/// taken, optionally below one common directory; other entries are
/// skipped, and no entry can write outside `dest`.
fn extract_layout_tar(tar_path: &Path, dest: &Path) -> anyhow::Result<PathBuf> {
    let mut file = std::fs::File::open(tar_path)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let file = std::fs::File::open(tar_path)?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    let mut roots: Vec<PathBuf> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.into_owned();
        let mut parts: Vec<String> = Vec::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                // `..` or an absolute path: never follow it.
                _ => {
                    parts.clear();
                    break;
                }
            }
        }
        let (prefix, rest) = match layout_file_at(&parts) {
            Some(i) => parts.split_at(i),
            None => continue,
        };
        let prefix: PathBuf = prefix.iter().collect();
        let rel: PathBuf = prefix.join(rest.iter().collect::<PathBuf>());
        let out = dest.join(&rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::File::create(&out)?;
        std::io::copy(&mut entry, &mut f)?;
        if rest == ["oci-layout"] {
            roots.push(dest.join(prefix));
        }
    }
    match roots.as_slice() {
        [root] => Ok(root.clone()),
        [] => bail!("it holds no oci-layout file: not an OCI image layout"),
        _ => bail!("it holds several OCI image layouts; push them one at a time"),
    }
}

/// Where in `parts` a layout file's own path starts, if it is one.
fn layout_file_at(parts: &[String]) -> Option<usize> {
    let n = parts.len();
    let last = parts.last()?;
    if last == "oci-layout" || last == "index.json" {
        return Some(n - 1);
    }
    if n >= 3
        && parts[n - 3] == "blobs"
        && parts[n - 2] == "sha256"
        && last.len() == 64
        && last
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Some(n - 3);
    }
    None
}

/// A blob to upload: digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blob {
    digest: Digest,
    size: u64,
}

/// A manifest or index of the layout, with its bytes.
#[derive(Debug)]
struct LayoutManifest {
    blob: Blob,
    media_type: String,
    data: Vec<u8>,
}

/// One image of the layout, checked.
#[derive(Debug)]
struct LayoutImage {
    /// The full name (`:latest` added if it had no tag).
    name: String,
    repository: String,
    tag: String,
    /// What the tag names: an image manifest, or an index.
    top: LayoutManifest,
    /// An index's manifests, pushed by digest before it.
    children: Vec<LayoutManifest>,
    /// Layers and configs of every manifest, layers first.
    blobs: Vec<Blob>,
}

impl LayoutImage {
    /// Everything the push sends for this image: blobs, then manifests.
    fn blob_count(&self) -> usize {
        self.blobs.len() + self.children.len() + 1
    }

    fn size(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum::<u64>()
            + self.children.iter().map(|m| m.blob.size).sum::<u64>()
            + self.top.blob.size
    }
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    // Digest::hex is 64 hex digits: never a path trick.
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Checks that a blob is in the layout with its declared size.
fn check_blob(dir: &Path, desc: &Descriptor, what: &str) -> anyhow::Result<Blob> {
    let meta = std::fs::metadata(blob_path(dir, &desc.digest))
        .with_context(|| format!("{what} {} is missing from the layout", desc.digest))?;
    if meta.len() != desc.size {
        bail!(
            "{what} {} has {} bytes in the layout, its descriptor says {}",
            desc.digest,
            meta.len(),
            desc.size
        );
    }
    Ok(Blob {
        digest: desc.digest.clone(),
        size: meta.len(),
    })
}

/// Reads a manifest or index blob, checking its size and digest.
fn read_manifest(dir: &Path, desc: &Descriptor, what: &str) -> anyhow::Result<LayoutManifest> {
    let blob = check_blob(dir, desc, what)?;
    if blob.size > MAX_MANIFEST {
        bail!("{what} {} is too large ({} bytes)", desc.digest, desc.size);
    }
    let data = std::fs::read(blob_path(dir, &desc.digest))?;
    let actual = Digest::of(&data);
    if actual != desc.digest {
        bail!(
            "{what} {} in the layout hashes to {actual}: the layout is damaged",
            desc.digest
        );
    }
    let media_type = if !desc.media_type.is_empty() {
        desc.media_type.clone()
    } else if ironmesh_oci::is_index_json(&data) {
        media::OCI_INDEX.to_string()
    } else {
        media::OCI_MANIFEST.to_string()
    };
    Ok(LayoutManifest {
        blob,
        media_type,
        data,
    })
}

/// The layers and config of one image manifest, checked in the layout.
fn manifest_blobs(dir: &Path, m: &LayoutManifest, blobs: &mut Vec<Blob>) -> anyhow::Result<()> {
    let manifest: ImageManifest = serde_json::from_slice(&m.data)
        .with_context(|| format!("manifest {} is not an image manifest", m.blob.digest))?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let b = check_blob(dir, layer, &format!("layer {i}"))?;
        if !blobs.contains(&b) {
            blobs.push(b);
        }
    }
    let b = check_blob(dir, &manifest.config, "config")?;
    if !blobs.contains(&b) {
        blobs.push(b);
    }
    Ok(())
}

fn image_name(desc: &Descriptor) -> Option<String> {
    if let Some(n) = desc.annotations.get(ANNOTATION_CONTAINERD_NAME) {
        return Some(n.clone()).filter(|n| !n.is_empty());
    }
    // ref.name is often just the tag; only a full reference names an image.
    desc.annotations
        .get(ANNOTATION_REF_NAME)
        .filter(|n| n.contains('/') || n.contains(':'))
        .cloned()
}

/// The registry repository and tag of an image name, checked before any
/// upload.
fn repository_and_tag(name: &str) -> anyhow::Result<(String, String, String)> {
    let name = ironmesh_oci::name::normalize_name(name)?;
    let (path, tag) = ironmesh_oci::name::split_tag(&name);
    let tag = tag.unwrap_or("latest").to_string();
    if !path.split('/').all(ironmesh_oci::name::is_path_component) {
        bail!(
            "image name {name:?}: the registry stores it as repository {path:?}, which must be \
             lowercase path components (a registry host with a port cannot be part of it)"
        );
    }
    Ok((name.clone(), path.to_string(), tag))
}

fn read_layout(dir: &Path, name: Option<&str>) -> anyhow::Result<Vec<LayoutImage>> {
    let marker = dir.join("oci-layout");
    let marker: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&marker).with_context(|| format!("cannot read {}", marker.display()))?,
    )
    .context("oci-layout is not JSON")?;
    if marker
        .get("imageLayoutVersion")
        .and_then(|v| v.as_str())
        .is_none()
    {
        bail!("oci-layout has no imageLayoutVersion");
    }
    let index_path = dir.join("index.json");
    let index: ImageIndex = serde_json::from_slice(
        &std::fs::read(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?,
    )
    .context("index.json is not an OCI image index")?;
    if index.manifests.is_empty() {
        bail!("index.json lists no images");
    }
    if name.is_some() && index.manifests.len() > 1 {
        bail!(
            "--name names one image but the layout holds {}; push without --name to use \
             their annotated names",
            index.manifests.len()
        );
    }
    let mut images = Vec::new();
    for desc in &index.manifests {
        let full = match name {
            Some(n) => n.to_string(),
            None => image_name(desc).with_context(|| {
                format!(
                    "manifest {} has no {ANNOTATION_CONTAINERD_NAME} annotation and no full \
                     reference in {ANNOTATION_REF_NAME}; give one with --name",
                    desc.digest
                )
            })?,
        };
        let (full, repository, tag) = repository_and_tag(&full)?;
        let top = read_manifest(dir, desc, "manifest")?;
        let mut blobs = Vec::new();
        let mut children = Vec::new();
        if media::is_index(&top.media_type) {
            let inner: ImageIndex = serde_json::from_slice(&top.data)
                .with_context(|| format!("index {} is not an image index", desc.digest))?;
            for (i, m) in inner.manifests.iter().enumerate() {
                let what = format!("manifest {i} of index {}", desc.digest);
                let child = read_manifest(dir, m, &what)?;
                if media::is_index(&child.media_type) {
                    bail!("{what} is itself an index; nested indexes are not pushed");
                }
                manifest_blobs(dir, &child, &mut blobs).with_context(|| what.clone())?;
                children.push(child);
            }
        } else {
            manifest_blobs(dir, &top, &mut blobs)?;
        }
        images.push(LayoutImage {
            name: full,
            repository,
            tag,
            top,
            children,
            blobs,
        });
    }
    Ok(images)
}

// ---------------------------------------------------------------------------
// pushing

async fn push(
    registry: &mut RegistryClient,
    dir: &Path,
    images: &[LayoutImage],
) -> anyhow::Result<()> {
    // Every blob once, with the repository of its first image (the store
    // shares blobs between repositories).
    let mut all: Vec<(&Blob, &str)> = Vec::new();
    for image in images {
        for b in &image.blobs {
            if !all.iter().any(|(a, _)| *a == b) {
                all.push((b, &image.repository));
            }
        }
    }
    let mut to_send = Vec::new();
    for (blob, repo) in &all {
        if !registry.blob_exists(repo, &blob.digest).await? {
            to_send.push((*blob, *repo));
        }
    }
    let total: u64 = to_send.iter().map(|(b, _)| b.size).sum();
    let progress = Arc::new(Mutex::new(Progress::new(total)));
    let mut uploaded: Vec<Digest> = Vec::new();
    for (blob, repo) in to_send {
        let path = blob_path(dir, &blob.digest);
        registry
            .upload_blob(repo, &blob.digest, &path, blob.size, &progress)
            .await
            .map_err(|e| {
                progress.lock().map(|mut p| p.clear()).ok();
                e.context(format!("uploading {} from {}", blob.digest, path.display()))
            })?;
        uploaded.push(blob.digest.clone());
    }
    progress.lock().map(|mut p| p.finish()).ok();

    for image in images {
        // A manifest whose bytes the store already holds is not new.
        let mut sent = image
            .blobs
            .iter()
            .filter(|b| uploaded.contains(&b.digest))
            .count();
        for m in image.children.iter().chain([&image.top]) {
            if !registry
                .blob_exists(&image.repository, &m.blob.digest)
                .await?
            {
                sent += 1;
            }
        }
        for child in &image.children {
            registry
                .put_manifest(
                    &image.repository,
                    child.blob.digest.as_str(),
                    &child.media_type,
                    child.data.clone(),
                )
                .await?;
        }
        registry
            .put_manifest(
                &image.repository,
                &image.tag,
                &image.top.media_type,
                image.top.data.clone(),
            )
            .await
            .with_context(|| format!("naming {}", image.name))?;
        println!(
            "pushed {} {} ({}, {} blobs, {sent} uploaded)",
            image.name,
            image.top.blob.digest,
            human_size(image.size()),
            image.blob_count(),
        );
    }
    Ok(())
}

/// Upload progress on stderr: a redrawn line on a terminal, a line per
/// quarter for big uploads otherwise, nothing for small ones.
pub struct Progress {
    total: u64,
    sent: u64,
    tty: bool,
    enabled: bool,
    drawn: bool,
    last_draw: Option<Instant>,
    last_quarter: u64,
    started: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            total,
            sent: 0,
            tty,
            enabled: if tty {
                total >= TTY_MIN_PROGRESS
            } else {
                total >= BIG_UPLOAD
            },
            drawn: false,
            last_draw: None,
            last_quarter: 0,
            started: Instant::now(),
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.sent += n;
        if !self.enabled || self.total == 0 {
            return;
        }
        let line = format!(
            "uploading {} / {} ({}%)",
            human_size(self.sent),
            human_size(self.total),
            self.sent * 100 / self.total
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || self.sent >= self.total {
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
                self.drawn = true;
                self.last_draw = Some(Instant::now());
            }
        } else {
            let quarter = self.sent * 4 / self.total;
            if quarter > self.last_quarter {
                self.last_quarter = quarter;
                let _ = writeln!(err, "{line}");
            }
        }
    }

    /// Removes the redrawn line (before an error message).
    fn clear(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.drawn = false;
        }
    }

    fn finish(&mut self) {
        self.clear();
        if self.enabled && self.total > 0 {
            let secs = self.started.elapsed().as_secs_f64();
            eprintln!(
                "uploaded {} in {secs:.1}s ({}/s)",
                human_size(self.total),
                human_size((self.total as f64 / secs.max(0.001)) as u64)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// output

/// Decimal units, one decimal place: `512 B`, `1.3 MB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn age(pushed_ms: i64, now_ms: i64) -> String {
    let secs = ((now_ms - pushed_ms) / 1000).max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn table(images: &[ImageInfo], now_ms: i64) -> String {
    let rows: Vec<[String; 4]> = images
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.manifest_digest.clone(),
                human_size(i.size),
                age(i.pushed_unix_ms, now_ms),
            ]
        })
        .collect();
    let header = ["NAME", "DIGEST", "SIZE", "AGE"].map(String::from);
    let rows: Vec<[String; 4]> = std::iter::once(header)
        .chain(rows)
        .map(|r| r.map(|c| crate::output::cell(&c)))
        .collect();
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let size = format!(
            "{}{}",
            " ".repeat(widths[2].saturating_sub(r[2].chars().count())),
            r[2]
        );
        let line = format!(
            "{}   {}   {size}   {}",
            crate::output::pad(&r[0], widths[0]),
            crate::output::pad(&r[1], widths[1]),
            r[3],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> Digest {
        Digest::of(data)
    }

    fn put(dir: &Path, data: &[u8]) -> Digest {
        let d = sha(data);
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(blob_path(dir, &d), data).unwrap();
        d
    }

    fn layout(dir: &Path, annotations: serde_json::Value) -> Digest {
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layer = put(dir, b"layer");
        let config = put(dir, b"{}");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": config, "size": 2},
            "layers": [{"digest": layer, "size": 5}],
        }))
        .unwrap();
        let m = put(dir, &manifest);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": m, "size": manifest.len(), "annotations": annotations}]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        m
    }

    #[test]
    fn names_come_from_annotations_or_the_flag() {
        let d = tempfile::tempdir().unwrap();
        let m = layout(
            d.path(),
            serde_json::json!({ANNOTATION_CONTAINERD_NAME: "ironmesh/app:dev", ANNOTATION_REF_NAME: "dev"}),
        );
        let images = read_layout(d.path(), None).unwrap();
        assert_eq!(images[0].name, "ironmesh/app:dev");
        assert_eq!(
            (images[0].repository.as_str(), images[0].tag.as_str()),
            ("ironmesh/app", "dev")
        );
        assert_eq!(images[0].top.blob.digest, m);
        assert_eq!(images[0].blob_count(), 3);
        assert_eq!(
            images[0].blobs,
            [sha(b"layer"), sha(b"{}")].map(|d| Blob {
                size: if d == sha(b"{}") { 2 } else { 5 },
                digest: d
            })
        );
        let images = read_layout(d.path(), Some("x/y:1")).unwrap();
        assert_eq!(images[0].name, "x/y:1");

        layout(d.path(), serde_json::json!({ANNOTATION_REF_NAME: "dev"}));
        let e = read_layout(d.path(), None).unwrap_err();
        assert!(format!("{e:#}").contains("--name"), "{e:#}");
        layout(d.path(), serde_json::json!({ANNOTATION_REF_NAME: "a/b:1"}));
        assert_eq!(read_layout(d.path(), None).unwrap()[0].name, "a/b:1");
    }

    #[test]
    fn an_index_pushes_its_manifests_and_their_blobs() {
        let d = tempfile::tempdir().unwrap();
        let amd64 = layout(d.path(), serde_json::json!({}));
        let arm_layer = put(d.path(), b"arm layer");
        let arm = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": sha(b"{}"), "size": 2},
            "layers": [{"digest": arm_layer, "size": 9}],
        }))
        .unwrap();
        let arm_digest = put(d.path(), &arm);
        let manifest_len = std::fs::metadata(blob_path(d.path(), &amd64))
            .unwrap()
            .len();
        let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": media::OCI_INDEX,
        "manifests": [
            {"mediaType": media::OCI_MANIFEST, "digest": amd64, "size": manifest_len,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": media::OCI_MANIFEST, "digest": arm_digest, "size": arm.len(),
             "platform": {"os": "linux", "architecture": "arm64"}},
        ]}))
        .unwrap();
        let index_digest = put(d.path(), &index);
        let top = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": media::OCI_INDEX, "digest": index_digest, "size": index.len(),
             "annotations": {ANNOTATION_REF_NAME: "app/multi"}}]});
        std::fs::write(d.path().join("index.json"), top.to_string()).unwrap();
        let images = read_layout(d.path(), None).unwrap();
        let i = &images[0];
        assert_eq!(
            (i.name.as_str(), i.tag.as_str()),
            ("app/multi:latest", "latest")
        );
        assert_eq!(i.top.blob.digest, index_digest);
        assert_eq!(i.top.media_type, media::OCI_INDEX);
        let children: Vec<&Digest> = i.children.iter().map(|c| &c.blob.digest).collect();
        assert_eq!(children, [&amd64, &arm_digest]);
        // The shared config once; both layers.
        let blobs: Vec<&Digest> = i.blobs.iter().map(|b| &b.digest).collect();
        assert_eq!(blobs, [&sha(b"layer"), &sha(b"{}"), &arm_layer]);
        assert_eq!(i.blob_count(), 6);

        // A child missing from the layout is named before any upload.
        std::fs::remove_file(blob_path(d.path(), &arm_digest)).unwrap();
        let e = format!("{:#}", read_layout(d.path(), None).unwrap_err());
        assert!(
            e.contains(arm_digest.as_str()) && e.contains("missing"),
            "{e}"
        );

        // A name the registry cannot hold as a repository is refused.
        let e = format!(
            "{:#}",
            repository_and_tag("localhost:5000/a:1").unwrap_err()
        );
        assert!(e.contains("repository"), "{e}");
    }

    #[test]
    fn a_missing_or_resized_blob_is_named_before_any_upload() {
        let d = tempfile::tempdir().unwrap();
        layout(d.path(), serde_json::json!({ANNOTATION_REF_NAME: "a:1"}));
        std::fs::write(blob_path(d.path(), &sha(b"layer")), b"layer+").unwrap();
        let e = format!("{:#}", read_layout(d.path(), None).unwrap_err());
        assert!(
            e.contains(sha(b"layer").as_str()) && e.contains("6 bytes"),
            "{e}"
        );
        std::fs::remove_file(blob_path(d.path(), &sha(b"layer"))).unwrap();
        let e = format!("{:#}", read_layout(d.path(), None).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn tar_layouts_are_extracted_safely() {
        let src = tempfile::tempdir().unwrap();
        let m = layout(src.path(), serde_json::json!({ANNOTATION_REF_NAME: "a:1"}));
        let tar_path = src.path().join("image.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
            b.append_path_with_name(src.path().join("oci-layout"), "img/oci-layout")
                .unwrap();
            b.append_path_with_name(src.path().join("index.json"), "img/index.json")
                .unwrap();
            b.append_dir_all("img/blobs", src.path().join("blobs"))
                .unwrap();
            // An entry aiming outside: skipped. (tar::Builder refuses `..`,
            // so write the header by hand.)
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../index.json");
            h.set_size(2);
            h.set_cksum();
            b.append(&h, &b"{}"[..]).unwrap();
            b.append_path_with_name(src.path().join("index.json"), "README")
                .unwrap();
            b.finish().unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        let root = extract_layout_tar(&tar_path, out.path().join("x").as_path()).unwrap();
        assert_eq!(root, out.path().join("x/img"));
        assert!(!out.path().join("index.json").exists());
        assert!(!out.path().join("x/README").exists());
        let images = read_layout(&root, None).unwrap();
        assert_eq!(images[0].top.blob.digest, m);
    }

    /// Randomised runs over the layout reader and the tar extractor
    /// (fuzzing on stable Rust): a real layout tar with random edits, and
    /// layouts whose index and manifest JSON are edited. Nothing may panic
    /// and nothing may be written outside the destination.
    /// `IRONMESH_FUZZ_CASES` cases (default 3,000); see docs/scale.md#fuzzing.
    #[test]
    fn fuzz_layout_tar_reader() {
        use ironmesh_api::fuzz::{Rng, StdRng};
        let src = tempfile::tempdir().unwrap();
        layout(src.path(), serde_json::json!({ANNOTATION_REF_NAME: "a:1"}));
        let seed_tar = {
            let mut b = tar::Builder::new(Vec::new());
            b.append_path_with_name(src.path().join("oci-layout"), "img/oci-layout")
                .unwrap();
            b.append_path_with_name(src.path().join("index.json"), "img/index.json")
                .unwrap();
            b.append_dir_all("img/blobs", src.path().join("blobs"))
                .unwrap();
            b.into_inner().unwrap()
        };
        let index = std::fs::read(src.path().join("index.json")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar_path = work.path().join("in.tar");
        let out = work.path().join("out");
        ironmesh_api::fuzz::run("layout-tar", |rng| {
            let edit = |b: &mut Vec<u8>, rng: &mut StdRng| {
                for _ in 0..rng.random_range(1..=4) {
                    let len = b.len();
                    if len == 0 {
                        b.push(rng.random());
                        continue;
                    }
                    let at = rng.random_range(0..len);
                    match rng.random_range(0..4) {
                        0 => b[at] ^= 1 << rng.random_range(0..8),
                        1 => {
                            const SPICE: &[u8] = b"0123456789 \0/.{}[]\":,";
                            b[at] = SPICE[rng.random_range(0..SPICE.len())];
                        }
                        2 => {
                            let end = (at + rng.random_range(1..32)).min(len);
                            b.drain(at..end);
                        }
                        _ => b.insert(at, rng.random()),
                    }
                }
            };
            if rng.random_bool(0.5) {
                let mut t = seed_tar.clone();
                edit(&mut t, rng);
                std::fs::write(&tar_path, &t).unwrap();
                if let Ok(root) = extract_layout_tar(&tar_path, &out) {
                    assert!(
                        root.starts_with(&out),
                        "extracted outside: {}",
                        root.display()
                    );
                    let _ = read_layout(&root, None);
                }
            } else {
                let mut i = index.clone();
                edit(&mut i, rng);
                std::fs::write(src.path().join("index.json"), &i).unwrap();
                let _ = read_layout(src.path(), None);
            }
            let _ = std::fs::remove_dir_all(&out);
        });
        // Nothing escaped the destination.
        let names: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("in.tar")]);
    }

    #[test]
    fn sizes_and_table_read_well() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_300_000), "1.3 MB");
        assert_eq!(human_size(999_999), "1.0 MB");
        let t = table(
            &[ImageInfo {
                name: "ironmesh/app:dev".into(),
                manifest_digest: sha(b"m").to_string(),
                size: 2_500_000,
                pushed_unix_ms: 0,
            }],
            90_000,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME "), "{t}");
        assert!(lines[1].starts_with("ironmesh/app:dev "), "{t}");
        assert!(
            lines[1].contains("2.5 MB") && lines[1].ends_with("90s"),
            "{t}"
        );
    }
}
