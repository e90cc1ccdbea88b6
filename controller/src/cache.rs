//! A watch-fed view of the store (the informer habit): loaded once with one
//! consistent list, then kept current from the store's watch, so the
//! reconcilers and the node API read memory instead of listing the store on
//! every call. It holds the resource objects (`/registry/`), the identity
//! allocations (`/identities/labels/`), the image tags (`/images/`) and
//! the volume removal records (`/volume-removals/`);
//! work-queue items and cluster bookkeeping are not kept.
//!
//! Writers still write the store; a writer that must read its own writes
//! waits for [`Cache::synced`] to pass the revision it wrote. Works the same
//! on every [`Store`] backend: only `list` and `watch` are used. When the
//! watch falls behind compaction the view is listed again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::StreamExt;
use ironmesh_api::Kind;
use tokio::sync::watch;

use crate::resources::{decode, StoredObject};
use crate::store::{Event, EventKind, KeyValue, Revision, Store, StoreError};

const REGISTRY: &str = "/registry/";
const IDENTITIES: &str = "/identities/labels/";
const IMAGES: &str = "/images/";
/// Pause before listing again after the watch failed.
const RETRY: Duration = Duration::from_millis(500);

/// What the cache holds at one revision.
#[derive(Default)]
pub struct View {
    /// Every change up to and including this revision is applied.
    pub revision: Revision,
    objects: HashMap<Kind, BTreeMap<String, Arc<StoredObject>>>,
    /// Canonical label set → identity.
    identities: HashMap<String, u32>,
    /// Image name → manifest digest, and an index's platforms.
    images: HashMap<String, CachedImage>,
    /// Node → volumes whose data it must remove
    /// ([`crate::volumes::REMOVALS`]).
    removals: HashMap<String, std::collections::BTreeSet<String>>,
}

/// What the cache keeps of an image name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedImage {
    manifest_digest: String,
    /// An index's platforms; empty for a single-platform image.
    #[serde(default)]
    platforms: Vec<ironmesh_oci::Platform>,
}

static EMPTY: BTreeMap<String, Arc<StoredObject>> = BTreeMap::new();

impl View {
    /// Every object of `kind`, by name.
    pub fn objects(&self, kind: Kind) -> &BTreeMap<String, Arc<StoredObject>> {
        self.objects.get(&kind).unwrap_or(&EMPTY)
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Arc<StoredObject>> {
        self.objects.get(&kind)?.get(name)
    }

    /// The identity allocated to a canonical label set
    /// ([`crate::workload_identities::canonical`]), if any.
    pub fn identity(&self, canonical_labels: &str) -> Option<u32> {
        self.identities.get(canonical_labels).copied()
    }

    /// The manifest digest an image name (as stored) points at.
    pub fn image_digest(&self, name: &str) -> Option<&str> {
        self.images.get(name).map(|i| i.manifest_digest.as_str())
    }

    /// The platforms an image name's index offers; empty when the name is
    /// unknown or a single-platform manifest (it may run anywhere).
    pub fn image_platforms(&self, name: &str) -> &[ironmesh_oci::Platform] {
        self.images
            .get(name)
            .map(|i| i.platforms.as_slice())
            .unwrap_or(&[])
    }

    /// The volumes `node` must remove, by name.
    pub fn removals(&self, node: &str) -> impl Iterator<Item = &String> {
        self.removals.get(node).into_iter().flatten()
    }

    fn apply(&mut self, kind: EventKind, kv: &KeyValue) {
        if let Some((node, volume)) = crate::volumes::parse_removal_key(&kv.key) {
            match kind {
                EventKind::Put => {
                    self.removals
                        .entry(node.to_string())
                        .or_default()
                        .insert(volume.to_string());
                }
                EventKind::Delete => {
                    if let Some(set) = self.removals.get_mut(node) {
                        set.remove(volume);
                        if set.is_empty() {
                            self.removals.remove(node);
                        }
                    }
                }
            }
            return;
        }
        if let Some(rest) = kv.key.strip_prefix(REGISTRY) {
            let Some((plural, _)) = rest.split_once('/') else {
                return;
            };
            let Some(k) = Kind::ALL.iter().copied().find(|k| k.plural() == plural) else {
                return;
            };
            match kind {
                EventKind::Put => match decode(k, kv) {
                    Ok(o) => {
                        self.objects
                            .entry(k)
                            .or_default()
                            .insert(o.name.clone(), Arc::new(o));
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "cache skips an unreadable object")
                    }
                },
                EventKind::Delete => {
                    if let Some(m) = self.objects.get_mut(&k) {
                        let name = kv.key.rsplit('/').next().unwrap_or_default();
                        m.remove(name);
                    }
                }
            }
        } else if let Some(labels) = kv.key.strip_prefix(IDENTITIES) {
            match kind {
                EventKind::Put => {
                    if let Some(id) = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                    {
                        self.identities.insert(labels.to_string(), id);
                    }
                }
                EventKind::Delete => {
                    self.identities.remove(labels);
                }
            }
        } else if let Some(name) = kv.key.strip_prefix(IMAGES) {
            match kind {
                EventKind::Put => match serde_json::from_slice::<CachedImage>(&kv.value).ok() {
                    Some(i) => {
                        self.images.insert(name.to_string(), i);
                    }
                    None => {
                        self.images.remove(name);
                    }
                },
                EventKind::Delete => {
                    self.images.remove(name);
                }
            }
        }
    }
}

fn kept(key: &str) -> bool {
    key.starts_with(REGISTRY)
        || key.starts_with(IDENTITIES)
        || key.starts_with(IMAGES)
        || key.starts_with(crate::volumes::REMOVALS)
}

/// The shared view. Clones share one view.
#[derive(Clone)]
pub struct Cache {
    view: Arc<RwLock<View>>,
    revision: watch::Sender<Revision>,
}

impl Cache {
    /// Lists the store once and starts following its watch until the store
    /// closes.
    pub async fn start(store: Arc<dyn Store>) -> Result<Cache, StoreError> {
        let view = load(store.as_ref()).await?;
        let rev = view.revision;
        let (revision, _) = watch::channel(rev);
        let cache = Cache {
            view: Arc::new(RwLock::new(view)),
            revision,
        };
        tokio::spawn(cache.clone().follow(store));
        Ok(cache)
    }

    /// A read lock on the current view. Hold it only for synchronous work:
    /// the watch cannot apply changes meanwhile.
    pub fn read(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision the view has reached.
    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Wakes on every revision the view reaches.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// Waits until the view includes revision `rev` (a write just made).
    /// Gives up after `deadline`, returning false.
    pub async fn synced(&self, rev: Revision, deadline: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(deadline, rx.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn follow(self, store: Arc<dyn Store>) {
        loop {
            let after = self.revision();
            match store.watch("/", after).await {
                Ok(mut events) => {
                    while let Some(ev) = events.next().await {
                        match ev {
                            Ok(first) => {
                                // Apply a burst under one lock, then wake readers once.
                                let mut batch = vec![first];
                                while let Some(Some(Ok(e))) =
                                    futures::FutureExt::now_or_never(events.next())
                                {
                                    batch.push(e);
                                    if batch.len() >= 4096 {
                                        break;
                                    }
                                }
                                self.apply(&batch);
                            }
                            Err(StoreError::Closed) => return,
                            Err(e) => {
                                tracing::warn!(error = %e, "cache watch broke; listing again");
                                break;
                            }
                        }
                    }
                }
                Err(StoreError::Closed) => return,
                Err(StoreError::Compacted { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "cache cannot watch the store"),
            }
            tokio::time::sleep(RETRY).await;
            match load(store.as_ref()).await {
                Ok(v) => {
                    let rev = v.revision;
                    *self.view.write().unwrap_or_else(|p| p.into_inner()) = v;
                    self.revision.send_replace(rev);
                }
                Err(StoreError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "cache cannot list the store"),
            }
        }
    }

    fn apply(&self, batch: &[Event]) {
        let mut last = 0;
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            for e in batch {
                if kept(&e.kv.key) {
                    v.apply(e.kind, &e.kv);
                }
                last = e.revision;
            }
            v.revision = v.revision.max(last);
            last = v.revision;
        }
        self.revision.send_replace(last);
    }
}

async fn load(store: &dyn Store) -> Result<View, StoreError> {
    let (kvs, revision) = store.list("/").await?;
    let mut view = View {
        revision,
        ..Default::default()
    };
    for kv in kvs.iter().filter(|kv| kept(&kv.key)) {
        view.apply(EventKind::Put, kv);
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Resources;
    use crate::store::embedded::EmbeddedStore;
    use serde_json::json;

    #[tokio::test]
    async fn follows_puts_and_deletes_and_reads_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let r = Resources::new(store.clone());
        let obj = |name: &str| json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": name}, "spec": {}});
        r.update(Kind::Node, "a", |_| Some(obj("a"))).await.unwrap();
        let cache = Cache::start(store.clone()).await.unwrap();
        assert!(
            cache.read().get(Kind::Node, "a").is_some(),
            "loaded at start"
        );
        let rev = r
            .update(Kind::Node, "b", |_| Some(obj("b")))
            .await
            .unwrap()
            .unwrap();
        assert!(cache.synced(rev, Duration::from_secs(5)).await);
        assert_eq!(cache.read().objects(Kind::Node).len(), 2);
        let rev = r.delete(Kind::Node, "a").await.unwrap();
        assert!(cache.synced(rev, Duration::from_secs(5)).await);
        let v = cache.read();
        assert!(v.get(Kind::Node, "a").is_none());
        assert_eq!(
            v.get(Kind::Node, "b").unwrap().object["metadata"]["resourceVersion"],
            json!(v.get(Kind::Node, "b").unwrap().revision.to_string())
        );
    }

    #[test]
    fn image_tags_keep_their_digest_and_an_indexs_platforms() {
        let mut v = View::default();
        let kv = |key: &str, value: serde_json::Value| KeyValue {
            key: key.into(),
            value: value.to_string().into_bytes(),
            create_revision: 1,
            mod_revision: 1,
        };
        let d = format!("sha256:{}", "a".repeat(64));
        v.apply(
            EventKind::Put,
            &kv(
                "/images/app:1",
                json!({"name": "app:1", "manifestDigest": d, "size": 1, "pushedUnixMs": 0,
                "platforms": [{"os": "linux", "architecture": "arm64"}]}),
            ),
        );
        v.apply(
            EventKind::Put,
            &kv(
                "/images/one:1",
                json!({"name": "one:1", "manifestDigest": d, "size": 1, "pushedUnixMs": 0}),
            ),
        );
        assert_eq!(v.image_digest("app:1"), Some(d.as_str()));
        let p: Vec<String> = v
            .image_platforms("app:1")
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(p, ["linux/arm64"]);
        assert!(v.image_platforms("one:1").is_empty());
        assert!(v.image_platforms("absent:1").is_empty());
        v.apply(EventKind::Delete, &kv("/images/app:1", json!(null)));
        assert_eq!(v.image_digest("app:1"), None);
        assert!(v.image_platforms("app:1").is_empty());
    }
}
