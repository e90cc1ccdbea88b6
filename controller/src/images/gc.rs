//! Garbage collection of the image store: blobs and untagged manifests no
//! image refers to.
//!
//! Live: every tagged manifest, and every manifest record younger than the
//! grace period (an index's manifests are pushed before the index); from
//! those, the manifests an index lists, the manifests whose subject is
//! live (signatures, SBOMs), and the config and layers of every live image
//! manifest. Everything else is removed once it is older than the grace:
//! records by their push time, blob files by their modification time,
//! which every upload, mount and existence check refreshes. So a blob
//! uploaded for a manifest not pushed yet survives for the grace period,
//! and an upload still in flight is not a blob yet at all.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use super::manifests::{parse, ManifestError, ManifestRecord, MANIFEST_PREFIX};
use super::{now_unix_ms, ImageRecord, ImageStore, KEY_PREFIX};
use crate::store::{Op, Txn};

/// Most deletions in one store transaction.
const TXN_BATCH: usize = 128;

/// What one collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub manifests_removed: u64,
    /// Blobs kept because something live refers to them.
    pub blobs_kept: u64,
}

impl ImageStore {
    /// Removes what nothing live refers to and is older than `grace`.
    pub async fn collect_garbage(&self, grace: Duration) -> Result<GcReport, ManifestError> {
        // Exclusive: no manifest or tag is recorded while this decides.
        let _exclusive = self.gc_lock.write().await;
        let now_ms = now_unix_ms();
        let cutoff_ms = now_ms.saturating_sub(grace.as_millis() as i64);
        let mut report = GcReport::default();

        let (tags, _) = self.store.list(KEY_PREFIX).await?;
        let (records, _) = self.store.list(MANIFEST_PREFIX).await?;
        let records: Vec<(String, ManifestRecord)> = records
            .into_iter()
            .filter_map(|kv| Some((kv.key.clone(), serde_json::from_slice(&kv.value).ok()?)))
            .collect();

        let mut live_manifests: BTreeSet<String> = tags
            .iter()
            .filter_map(|kv| serde_json::from_slice::<ImageRecord>(&kv.value).ok())
            .map(|r| r.manifest_digest)
            .collect();
        live_manifests.extend(
            records
                .iter()
                .filter(|(_, r)| r.pushed_unix_ms > cutoff_ms)
                .map(|(_, r)| r.digest.clone()),
        );
        let mut live_blobs: BTreeSet<String> = BTreeSet::new();
        let mut expanded: BTreeSet<String> = BTreeSet::new();
        let mut parsed_cache: HashMap<String, Vec<String>> = HashMap::new();
        loop {
            let pending: Vec<String> = live_manifests.difference(&expanded).cloned().collect();
            if pending.is_empty() {
                break;
            }
            for digest in pending {
                expanded.insert(digest.clone());
                live_blobs.insert(digest.clone());
                let refs = match parsed_cache.get(&digest) {
                    Some(r) => r.clone(),
                    None => {
                        let refs = match self.read_manifest_blob(&digest).await? {
                            Some(bytes) => match parse(&bytes, None) {
                                Ok(p) => {
                                    live_blobs.extend(p.blobs.into_iter().map(|b| b.1));
                                    p.children.into_iter().map(|c| c.0).collect()
                                }
                                Err(e) => {
                                    tracing::warn!(%digest, error = %e, "live manifest does not parse; keeping only itself");
                                    Vec::new()
                                }
                            },
                            None => {
                                tracing::warn!(%digest, "live manifest's blob is missing");
                                Vec::new()
                            }
                        };
                        parsed_cache.insert(digest.clone(), refs.clone());
                        refs
                    }
                };
                live_manifests.extend(refs);
            }
            // Referrers of what is live are live.
            for (_, r) in &records {
                if r.subject
                    .as_ref()
                    .is_some_and(|s| live_manifests.contains(s))
                {
                    live_manifests.insert(r.digest.clone());
                }
            }
        }

        // Records of dead manifests.
        let dead: Vec<String> = records
            .iter()
            .filter(|(_, r)| !live_manifests.contains(&r.digest))
            .map(|(k, _)| k.clone())
            .collect();
        for batch in dead.chunks(TXN_BATCH) {
            self.store
                .txn(Txn {
                    compares: Vec::new(),
                    ops: batch
                        .iter()
                        .map(|k| Op::Delete { key: k.clone() })
                        .collect(),
                })
                .await?;
            report.manifests_removed += batch.len() as u64;
        }

        // Blob files.
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut entries = tokio::fs::read_dir(&self.blobs)
            .await
            .map_err(|e| super::io_err("list", &self.blobs)(e))?;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| super::io_err("list", &self.blobs)(e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                continue;
            }
            if live_blobs.contains(&format!("sha256:{name}")) {
                report.blobs_kept += 1;
                continue;
            }
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            if meta.modified().is_ok_and(|m| m > cutoff) {
                report.blobs_kept += 1;
                continue;
            }
            match tokio::fs::remove_file(entry.path()).await {
                Ok(()) => {
                    report.blobs_removed += 1;
                    report.bytes_freed += meta.len();
                }
                Err(e) => {
                    tracing::warn!(blob = %name, error = %e, "cannot remove an unreferenced blob")
                }
            }
        }
        if report.blobs_removed > 0 {
            self.sync_blob_dir().await?;
        }
        tracing::info!(
            blobs_removed = report.blobs_removed,
            bytes_freed = report.bytes_freed,
            manifests_removed = report.manifests_removed,
            blobs_kept = report.blobs_kept,
            grace_s = grace.as_secs(),
            "image garbage collection"
        );
        Ok(report)
    }
}

/// Collects every `interval` until `shutdown` (the controller's periodic
/// run; `imctl image gc` runs one on demand).
pub async fn run(
    images: ImageStore,
    interval: Duration,
    grace: Duration,
    metrics: std::sync::Arc<crate::metrics::ControllerMetrics>,
    shutdown: ironmesh_process::Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.clone().wait() => return,
        }
        match images.collect_garbage(grace).await {
            Ok(r) => metrics.count_gc(&r),
            Err(e) => {
                tracing::warn!(error = %e, "image garbage collection failed; retrying at the next interval")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifests::{sha256_digest, Reference};
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn blob_count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("images/blobs/sha256"))
            .unwrap()
            .count()
    }

    #[tokio::test]
    async fn unreferenced_blobs_go_after_the_grace_and_referenced_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let images = ImageStore::open(dir.path().join("images"), Arc::new(store)).unwrap();
        let put = |data: &'static [u8]| {
            let images = images.clone();
            async move {
                let d = sha256_digest(data);
                images.store_bytes(&d, data).await.unwrap();
                d
            }
        };
        let config = put(b"{}").await;
        let layer = put(b"layer").await;
        let orphan = put(b"uploaded, never referenced").await;
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 5}],
        }))
        .unwrap();
        images
            .put_manifest("app", &Reference::Tag("1".into()), None, &m)
            .await
            .unwrap();
        assert_eq!(blob_count(dir.path()), 4);

        // Within the grace nothing goes: the orphan may be an upload whose
        // manifest is still to come.
        let r = images
            .collect_garbage(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!((r.blobs_removed, r.manifests_removed), (0, 0));
        assert_eq!(blob_count(dir.path()), 4);

        // Past it, only the orphan.
        let r = images.collect_garbage(Duration::ZERO).await.unwrap();
        assert_eq!(r.blobs_removed, 1);
        assert_eq!(r.bytes_freed, 26);
        assert!(images.stat_blob(&orphan).await.unwrap().is_none());
        assert!(images.stat_blob(&layer).await.unwrap().is_some());

        // The image removed: everything goes.
        images.remove_image("app:1").await.unwrap();
        let r = images.collect_garbage(Duration::ZERO).await.unwrap();
        assert_eq!((r.blobs_removed, r.manifests_removed), (3, 1));
        assert_eq!(r.bytes_freed, 2 + 5 + m.len() as u64);
        assert_eq!(blob_count(dir.path()), 0);
        assert!(images.repositories().await.unwrap().is_empty());
    }
}
