//! Resource objects on top of the store.
//!
//! Owns the key layout (`/registry/<plural>/<name>`), the metadata the
//! system manages (uid, creationTimestamp, generation, resourceVersion) and
//! the atomic multi-object apply. It does not validate manifests (that is
//! `ironmesh_api::validate`) and does not decide anything about nodes or
//! workloads; reconcilers and RPC handlers call it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ironmesh_api::selector::LabelSelector;
use ironmesh_api::{Kind, Validated};
use serde_json::{json, Map, Value};

use crate::store::{Compare, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome};

/// How many times a read-modify-write is retried when another writer got
/// there first.
const CAS_RETRIES: usize = 16;

/// Store key of one object.
pub fn key(kind: Kind, name: &str) -> String {
    format!("/registry/{}/{}", kind.plural(), name)
}

/// Store key prefix of one kind.
pub fn prefix(kind: Kind) -> String {
    format!("/registry/{}/", kind.plural())
}

/// An object as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub kind: Kind,
    pub name: String,
    /// The full object; `metadata.resourceVersion` is filled from `revision`.
    pub object: Value,
    /// Store revision of the object's last change.
    pub revision: Revision,
}

impl StoredObject {
    /// The object as its typed form, e.g. [`ironmesh_api::object::Instance`].
    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> Result<T, ResourceError> {
        T::deserialize(&self.object).map_err(|e| ResourceError::Corrupt {
            kind: self.kind,
            name: self.name.clone(),
            message: e.to_string(),
        })
    }
}

/// A typed object as the JSON the store keeps (the store edge).
pub fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// What apply did with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub kind: Kind,
    pub name: String,
    pub action: ApplyAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl ApplyAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
            ApplyAction::Deleted => "deleted",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: Kind, name: String },
    #[error("stored {kind} {name:?} is unreadable: {message}")]
    Corrupt {
        kind: Kind,
        name: String,
        message: String,
    },
    #[error("{0} appears twice in one apply ({1} and {2})")]
    Duplicate(String, String, String),
    #[error("too much concurrent change to {0}; try again")]
    Contended(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Seal(#[from] crate::secret_seal::SealError),
    #[error("Secret objects need the controller's seal key, and this Resources has none")]
    NoSealKey,
}

/// Checks an existing object before a write replaces or deletes it; `Err`
/// says why it must not be touched.
pub type Guard<'a> = dyn Fn(&StoredObject) -> Result<(), String> + Send + Sync + 'a;

/// How long a read waits for the cache to catch up with this process's
/// own last write before it reads the store instead.
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

/// Typed access to resource objects.
///
/// With a [`Cache`](crate::cache::Cache) attached, `get` and `list` read
/// the cache, after it has caught up with the last write made through any
/// clone of this `Resources` (so a reconciler always sees its own writes);
/// writes always go to the store, guarded by the store's revisions.
#[derive(Clone)]
pub struct Resources {
    store: Arc<dyn Store>,
    cache: Option<crate::cache::Cache>,
    written: Arc<AtomicU64>,
    /// Seals Secret objects before they are written.
    seal: Option<Arc<crate::secret_seal::SecretSeal>>,
}

impl Resources {
    pub fn new(store: Arc<dyn Store>) -> Resources {
        Resources {
            store,
            cache: None,
            written: Arc::default(),
            seal: None,
        }
    }

    /// Secret objects are sealed with `seal` when written.
    pub fn with_seal(mut self, seal: Arc<crate::secret_seal::SecretSeal>) -> Resources {
        self.seal = Some(seal);
        self
    }

    /// The key Secret objects are sealed with.
    pub fn seal(&self) -> Option<&Arc<crate::secret_seal::SecretSeal>> {
        self.seal.as_ref()
    }

    /// Reads go to `cache` from now on.
    pub fn with_cache(mut self, cache: crate::cache::Cache) -> Resources {
        self.cache = Some(cache);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The cache, once it has seen this process's last write.
    pub async fn cache(&self) -> Option<&crate::cache::Cache> {
        let cache = self.cache.as_ref()?;
        let want = self.written.load(Ordering::Acquire);
        if cache.revision() >= want || cache.synced(want, READ_YOUR_WRITES).await {
            Some(cache)
        } else {
            tracing::warn!(
                revision = want,
                cached = cache.revision(),
                "cache is behind; reading the store"
            );
            None
        }
    }

    /// Makes the next cache read see every write committed so far, by any
    /// controller (an operator's get after an apply through another one):
    /// reads wait for the cache to reach the store's revision now.
    pub async fn consistent(&self) {
        if self.cache.is_some() {
            if let Ok(rev) = self.store.revision().await {
                self.wrote(rev);
            }
        }
    }

    /// Records a revision this process committed.
    pub fn wrote(&self, rev: Revision) {
        self.written.fetch_max(rev, Ordering::AcqRel);
    }

    pub async fn get(&self, kind: Kind, name: &str) -> Result<Option<StoredObject>, ResourceError> {
        if let Some(cache) = self.cache().await {
            return Ok(cache.read().get(kind, name).map(|o| (**o).clone()));
        }
        match self.store.get(&key(kind, name)).await? {
            Some(kv) => Ok(Some(decode(kind, &kv)?)),
            None => Ok(None),
        }
    }

    pub async fn list(
        &self,
        kind: Kind,
        selector: &LabelSelector,
    ) -> Result<(Vec<StoredObject>, Revision), ResourceError> {
        if let Some(cache) = self.cache().await {
            let view = cache.read();
            let out = view
                .objects(kind)
                .values()
                .filter(|o| selector.is_empty() || selector.matches(&labels_of(&o.object)))
                .map(|o| (**o).clone())
                .collect();
            return Ok((out, view.revision));
        }
        let (kvs, rev) = self.store.list(&prefix(kind)).await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let obj = decode(kind, kv)?;
            if selector.is_empty() || selector.matches(&labels_of(&obj.object)) {
                out.push(obj);
            }
        }
        Ok((out, rev))
    }

    /// Calls `visit` with every object of `kind`, without copying them out
    /// of the cache.
    pub async fn scan(
        &self,
        kind: Kind,
        mut visit: impl FnMut(&StoredObject),
    ) -> Result<(), ResourceError> {
        if let Some(cache) = self.cache().await {
            let view = cache.read();
            view.objects(kind).values().for_each(|o| visit(o));
            return Ok(());
        }
        let (all, _) = self.list(kind, &LabelSelector::default()).await?;
        all.iter().for_each(visit);
        Ok(())
    }

    /// The objects of `kind` for which `keep` is true. With a cache, only
    /// those are copied out of it.
    pub async fn list_matching(
        &self,
        kind: Kind,
        keep: impl Fn(&StoredObject) -> bool,
    ) -> Result<Vec<StoredObject>, ResourceError> {
        if let Some(cache) = self.cache().await {
            let view = cache.read();
            return Ok(view
                .objects(kind)
                .values()
                .filter(|o| keep(o))
                .map(|o| (**o).clone())
                .collect());
        }
        let (all, _) = self.list(kind, &LabelSelector::default()).await?;
        Ok(all.into_iter().filter(|o| keep(o)).collect())
    }

    /// Writes every document at one new revision, or nothing. `docs` are
    /// `(origin, validated)` pairs; origins only name documents in errors.
    pub async fn apply(
        &self,
        docs: &[(String, Validated)],
        dry_run: bool,
    ) -> Result<(Revision, Vec<Applied>), ResourceError> {
        self.write(docs, &[], &|_| Ok(()), dry_run).await
    }

    /// Like [`Resources::apply`], and deletes the objects in `delete` in the
    /// same transaction (absent ones are skipped). `guard` sees every
    /// existing object about to be overwritten or deleted; an `Err` from it
    /// changes nothing and is returned as [`ResourceError::Conflict`].
    /// Deleted objects are reported with [`ApplyAction::Deleted`].
    pub async fn apply_and_delete(
        &self,
        docs: &[(String, Validated)],
        delete: &[(Kind, String)],
        guard: &Guard<'_>,
    ) -> Result<(Revision, Vec<Applied>), ResourceError> {
        self.write(docs, delete, guard, false).await
    }

    async fn write(
        &self,
        docs: &[(String, Validated)],
        delete: &[(Kind, String)],
        guard: &Guard<'_>,
        dry_run: bool,
    ) -> Result<(Revision, Vec<Applied>), ResourceError> {
        let mut seen: std::collections::HashMap<(Kind, &str), &str> = Default::default();
        for (origin, v) in docs {
            if let Some(first) = seen.insert((v.kind, v.name.as_str()), origin.as_str()) {
                return Err(ResourceError::Duplicate(
                    format!("{} {:?}", v.kind, v.name),
                    first.to_string(),
                    origin.clone(),
                ));
            }
        }
        for _ in 0..CAS_RETRIES {
            let mut txn = Txn::default();
            let mut applied = Vec::with_capacity(docs.len());
            for (_, v) in docs {
                let k = key(v.kind, &v.name);
                let current = self.store.get(&k).await?;
                let stored = current.as_ref().map(|kv| decode(v.kind, kv)).transpose()?;
                // A Secret's values never reach the store in plaintext.
                let sealed;
                let applied_object = if v.kind == Kind::Secret {
                    let seal = self.seal.as_ref().ok_or(ResourceError::NoSealKey)?;
                    let mut o = v.object.clone();
                    seal.seal_object(&k, &mut o, stored.as_ref().map(|s| &s.object))?;
                    sealed = o;
                    &sealed
                } else {
                    &v.object
                };
                let (next, action) = match stored {
                    None => (new_object(applied_object), ApplyAction::Created),
                    Some(stored) => {
                        guard(&stored).map_err(ResourceError::Conflict)?;
                        let existing = stored.object;
                        let merged = merge_applied(&existing, applied_object);
                        if strip_rv(&merged) == strip_rv(&existing) {
                            (merged, ApplyAction::Unchanged)
                        } else {
                            (merged, ApplyAction::Configured)
                        }
                    }
                };
                match &current {
                    None => txn.compares.push(Compare::Absent(k.clone())),
                    Some(kv) => txn
                        .compares
                        .push(Compare::ModRevision(k.clone(), kv.mod_revision)),
                }
                if action != ApplyAction::Unchanged {
                    txn.ops.push(Op::Put {
                        key: k,
                        value: encode(&next),
                    });
                }
                applied.push(Applied {
                    kind: v.kind,
                    name: v.name.clone(),
                    action,
                });
            }
            for (kind, name) in delete {
                let k = key(*kind, name);
                let Some(kv) = self.store.get(&k).await? else {
                    continue;
                };
                let stored = decode(*kind, &kv)?;
                guard(&stored).map_err(ResourceError::Conflict)?;
                txn.compares
                    .push(Compare::ModRevision(k.clone(), kv.mod_revision));
                txn.ops.push(Op::Delete { key: k });
                txn.ops.extend(self.deletion_ops(&stored).await?);
                applied.push(Applied {
                    kind: *kind,
                    name: name.clone(),
                    action: ApplyAction::Deleted,
                });
            }
            if dry_run {
                return Ok((self.store.revision().await?, applied));
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed(rev) => {
                    self.wrote(rev);
                    return Ok((rev, applied));
                }
                TxnOutcome::CompareFailed { .. } => continue,
            }
        }
        Err(ResourceError::Contended("the applied objects".into()))
    }

    /// Deletes one object. Returns the revision of the delete.
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<Revision, ResourceError> {
        let k = key(kind, name);
        for _ in 0..CAS_RETRIES {
            let Some(kv) = self.store.get(&k).await? else {
                return Err(ResourceError::NotFound {
                    kind,
                    name: name.to_string(),
                });
            };
            let mut ops = vec![Op::Delete { key: k.clone() }];
            ops.extend(self.deletion_ops(&decode(kind, &kv)?).await?);
            let txn = Txn {
                compares: vec![Compare::ModRevision(k.clone(), kv.mod_revision)],
                ops,
            };
            if let TxnOutcome::Committed(rev) = self.store.txn(txn).await? {
                self.wrote(rev);
                return Ok(rev);
            }
        }
        Err(ResourceError::Contended(format!("{kind} {name:?}")))
    }

    /// What else goes in the transaction that deletes `stored`: a bound
    /// Volume leaves a removal record for its node (the only way an agent
    /// learns to delete data); a Node takes its removal records along.
    async fn deletion_ops(&self, stored: &StoredObject) -> Result<Vec<Op>, ResourceError> {
        Ok(match stored.kind {
            Kind::Volume => crate::volumes::removal_record(stored)
                .map(|(key, value)| Op::Put { key, value })
                .into_iter()
                .collect(),
            Kind::Node => self
                .store
                .list(&crate::volumes::removals_prefix(&stored.name))
                .await?
                .0
                .into_iter()
                .map(|kv| Op::Delete { key: kv.key })
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Read-modify-write of one object. `f` gets the current object (or
    /// `None`) and returns the new one, or `None` to leave it alone. Returns
    /// the revision written, if any.
    pub async fn update<F>(
        &self,
        kind: Kind,
        name: &str,
        mut f: F,
    ) -> Result<Option<Revision>, ResourceError>
    where
        F: FnMut(Option<&Value>) -> Option<Value> + Send,
    {
        let k = key(kind, name);
        for _ in 0..CAS_RETRIES {
            let current = self.store.get(&k).await?;
            let existing = match &current {
                Some(kv) => Some(decode(kind, kv)?.object),
                None => None,
            };
            let Some(mut next) = f(existing.as_ref()) else {
                return Ok(None);
            };
            if existing.is_none() {
                next = new_object(&next);
            }
            if existing.as_ref().map(strip_rv) == Some(strip_rv(&next)) {
                return Ok(None);
            }
            let compare = match &current {
                Some(kv) => Compare::ModRevision(k.clone(), kv.mod_revision),
                None => Compare::Absent(k.clone()),
            };
            let txn = Txn {
                compares: vec![compare],
                ops: vec![Op::Put {
                    key: k.clone(),
                    value: encode(&next),
                }],
            };
            if let TxnOutcome::Committed(rev) = self.store.txn(txn).await? {
                self.wrote(rev);
                return Ok(Some(rev));
            }
        }
        Err(ResourceError::Contended(format!("{kind} {name:?}")))
    }
}

impl Resources {
    /// [`Resources::update`] through the typed form `T` of the object: `f`
    /// gets the current object decoded (`None` when there is none) and
    /// returns the new one, or `None` to leave it alone. A stored object
    /// that does not decode is left alone (and logged).
    pub async fn update_typed<T, F>(
        &self,
        kind: Kind,
        name: &str,
        mut f: F,
    ) -> Result<Option<Revision>, ResourceError>
    where
        T: serde::de::DeserializeOwned + serde::Serialize,
        F: FnMut(Option<T>) -> Option<T> + Send,
    {
        self.update(kind, name, |cur| {
            let cur = match cur.map(T::deserialize).transpose() {
                Ok(cur) => cur,
                Err(e) => {
                    tracing::warn!(%kind, name, error = %e, "stored object unreadable; left as it is");
                    return None;
                }
            };
            f(cur).map(|next| to_json(&next))
        })
        .await
    }
}

/// What [`Resources::update_many`] does with one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Keep,
    Put(Value),
    Delete,
}

/// Objects per transaction of a batch (etcd refuses more than 128 ops in
/// one transaction by default).
pub const BATCH: usize = 100;

impl Resources {
    /// Read-modify-write of many objects of one kind, [`BATCH`] to a
    /// transaction: `f` gets each name and its current object (or `None`)
    /// and says what to do. A batch whose objects changed underneath is
    /// read and decided again. Returns how many objects were written.
    pub async fn update_many<F>(
        &self,
        kind: Kind,
        names: &[String],
        mut f: F,
    ) -> Result<usize, ResourceError>
    where
        F: FnMut(&str, Option<&Value>) -> Change + Send,
    {
        let mut written = 0;
        for chunk in names.chunks(BATCH) {
            let mut done = false;
            for attempt in 0..CAS_RETRIES {
                // The first attempt reads the cache (the compares catch a
                // stale read); a retry reads the store.
                let current = match (&self.cache, attempt) {
                    (Some(cache), 0) => {
                        let view = cache.read();
                        chunk
                            .iter()
                            .map(|n| view.get(kind, n).map(|o| (o.object.clone(), o.revision)))
                            .collect::<Vec<_>>()
                    }
                    _ => {
                        let mut out = Vec::with_capacity(chunk.len());
                        for n in chunk {
                            out.push(match self.store.get(&key(kind, n)).await? {
                                Some(kv) => Some((decode(kind, &kv)?.object, kv.mod_revision)),
                                None => None,
                            });
                        }
                        out
                    }
                };
                let mut txn = Txn::default();
                let mut seen = std::collections::HashSet::new();
                for (name, current) in chunk.iter().zip(current) {
                    if !seen.insert(name.as_str()) {
                        continue;
                    }
                    let k = key(kind, name);
                    let existing = current.as_ref().map(|(o, _)| o);
                    let op = match f(name, existing) {
                        Change::Keep => continue,
                        Change::Delete if existing.is_none() => continue,
                        Change::Delete => Op::Delete { key: k.clone() },
                        Change::Put(next) => {
                            let next = if existing.is_none() {
                                new_object(&next)
                            } else {
                                next
                            };
                            if existing.map(strip_rv) == Some(strip_rv(&next)) {
                                continue;
                            }
                            Op::Put {
                                key: k.clone(),
                                value: encode(&next),
                            }
                        }
                    };
                    txn.compares.push(match &current {
                        Some((_, rev)) => Compare::ModRevision(k, *rev),
                        None => Compare::Absent(k),
                    });
                    txn.ops.push(op);
                }
                let n = txn.ops.len();
                if n == 0 {
                    done = true;
                    break;
                }
                if let TxnOutcome::Committed(rev) = self.store.txn(txn).await? {
                    self.wrote(rev);
                    written += n;
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(ResourceError::Contended(format!(
                    "a batch of {kind} objects"
                )));
            }
        }
        Ok(written)
    }
}

/// Decodes a stored object and fills `metadata.resourceVersion`.
pub fn decode(kind: Kind, kv: &KeyValue) -> Result<StoredObject, ResourceError> {
    let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
    let mut object: Value =
        serde_json::from_slice(&kv.value).map_err(|e| ResourceError::Corrupt {
            kind,
            name: name.clone(),
            message: e.to_string(),
        })?;
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(kv.mod_revision.to_string()),
        );
    }
    Ok(StoredObject {
        kind,
        name,
        object,
        revision: kv.mod_revision,
    })
}

fn encode(object: &Value) -> Vec<u8> {
    // resourceVersion is derived from the store revision, never stored.
    serde_json::to_vec(&strip_rv(object)).unwrap_or_default()
}

fn strip_rv(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    o
}

/// Labels of an object, for selectors.
pub fn labels_of(object: &Value) -> std::collections::BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Adds the metadata the system owns to a first-time object.
fn new_object(applied: &Value) -> Value {
    let mut o = applied.clone();
    let meta = ensure_object(&mut o, "metadata");
    meta.insert("uid".into(), Value::String(new_uid()));
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    o
}

/// Applied fields (labels, annotations, spec) replace the stored ones;
/// system fields (uid, creationTimestamp, status) are kept; generation is
/// bumped when spec changes.
fn merge_applied(existing: &Value, applied: &Value) -> Value {
    let mut out = existing.clone();
    let spec_changed = existing.get("spec") != applied.get("spec");
    if let Some(spec) = applied.get("spec") {
        if let Some(obj) = out.as_object_mut() {
            obj.insert("spec".into(), spec.clone());
        }
    }
    let generation = existing
        .pointer("/metadata/generation")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let meta = ensure_object(&mut out, "metadata");
    for field in ["labels", "annotations"] {
        match applied.pointer(&format!("/metadata/{field}")) {
            Some(v) => {
                meta.insert(field.into(), v.clone());
            }
            None => {
                meta.remove(field);
            }
        }
    }
    if spec_changed {
        meta.insert("generation".into(), json!(generation + 1));
    }
    out
}

fn ensure_object<'a>(v: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    let Value::Object(map) = v else {
        unreachable!("just made an object")
    };
    let entry = map
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    match entry {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

/// A random RFC 4122 version-4 UUID.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Current time as RFC 3339, UTC, second precision.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// The time an RFC 3339 timestamp names, if it is one.
pub fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(std::time::SystemTime::from)
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t).replace_nanosecond(0);
    match t {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn doc(kind: &str, name: &str, label: Option<&str>) -> (String, Validated) {
        let mut meta = json!({"name": name});
        if let Some(l) = label {
            meta["labels"] = json!({"owner": l});
        }
        let spec = match kind {
            "Service" => json!({"selector": {"app": name}, "ports": [{"port": 80}]}),
            _ => json!({"image": "ironmesh/x:1"}),
        };
        let v = ironmesh_api::validate(
            &json!({"apiVersion": "ironmesh.dev/v1", "kind": kind, "metadata": meta, "spec": spec}),
        )
        .unwrap();
        (format!("{kind}/{name}"), v)
    }

    fn owned_by_a(o: &StoredObject) -> Result<(), String> {
        match labels_of(&o.object).get("owner").map(String::as_str) {
            Some("a") => Ok(()),
            _ => Err(format!("{} {:?} belongs to someone else", o.kind, o.name)),
        }
    }

    #[tokio::test]
    async fn apply_and_delete_is_one_revision_and_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let r = Resources::new(Arc::new(
            EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        ));
        let (_, first) = r
            .apply(
                &[
                    doc("Workload", "web", Some("a")),
                    doc("Service", "web", Some("a")),
                    doc("Workload", "mine", None),
                ],
                false,
            )
            .await
            .unwrap();
        assert!(first.iter().all(|a| a.action == ApplyAction::Created));

        // Applying over and deleting an object someone else owns fails
        // and changes nothing.
        let before = r.store().revision().await.unwrap();
        let e = r
            .apply_and_delete(&[doc("Workload", "mine", Some("a"))], &[], &owned_by_a)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Workload \"mine\" belongs"), "{e}");
        let e = r
            .apply_and_delete(
                &[doc("Workload", "web", Some("a"))],
                &[(Kind::Workload, "mine".into())],
                &owned_by_a,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ResourceError::Conflict(_)), "{e}");
        assert_eq!(r.store().revision().await.unwrap(), before);

        // Update one, delete one, skip an absent one: one revision.
        let (rev, applied) = r
            .apply_and_delete(
                &[doc("Workload", "web", Some("a"))],
                &[
                    (Kind::Service, "web".into()),
                    (Kind::Service, "gone".into()),
                ],
                &owned_by_a,
            )
            .await
            .unwrap();
        assert_eq!(rev, before + 1);
        let actions: Vec<_> = applied.iter().map(|a| a.action).collect();
        assert_eq!(actions, [ApplyAction::Unchanged, ApplyAction::Deleted]);
        assert!(r.get(Kind::Service, "web").await.unwrap().is_none());
        assert!(r.get(Kind::Workload, "mine").await.unwrap().is_some());
    }
}
