//! Sources (GitOps): keeps the manifests of a git branch applied.
//!
//! For every Source the leader fetches `spec.branch` from `spec.repo` with
//! the `git` CLI into a bare cache under `<data-dir>/sources/<name>` (no
//! work tree; files are read from the fetched commit's tree), validates
//! every `*.yaml`, `*.yml` and `*.json` under `spec.directory` exactly as
//! `imctl apply` does, and in one store transaction applies them all and
//! deletes the objects this Source applied earlier that left git. Objects
//! it applies carry the label [`SOURCE_LABEL`]; it never overwrites or
//! deletes an object without its own mark. A commit that does not validate
//! or conflicts changes nothing; the Source's status says why.
//!
//! It polls every `spec.intervalSeconds`, and at once when a Source's spec
//! changes. It does not create Sources or Instances and does not touch
//! objects of other Sources or of `imctl`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironmesh_api::object::Source;
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::source::{SourceSpec, SourceStatus};
use ironmesh_api::{Condition, ConditionStatus, Kind, Validated};
use serde_json::{json, Value};

use crate::resources::{labels_of, now_rfc3339, ApplyAction, Resources, StoredObject};

/// Label on every object a Source applied; the value is the Source's name.
pub const SOURCE_LABEL: &str = "ironmesh.dev/source";

/// How often the reconciler looks at Sources when nothing changes.
const TICK: Duration = Duration::from_secs(1);
/// Largest manifest file a Source reads; a bigger one fails the commit.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest total of the manifest files of one commit.
pub const MAX_SOURCE_BYTES: u64 = 32 << 20;
/// Largest fetched repository (the tip commit only: fetches are shallow);
/// a bigger one is removed from the cache and fails the sync.
pub const MAX_REPOSITORY_BYTES: u64 = 256 << 20;

/// Longest a single git command may run.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Kinds any Source may apply (and so may prune): those an `edit` operator
/// may apply, other Sources excepted. Making a Source needs only role edit,
/// so it must not apply what only admins may (Nodes). Each Source narrows
/// this further with `spec.kinds`.
fn appliable(kind: Kind) -> bool {
    ironmesh_api::source::SOURCE_APPLIABLE_KINDS.contains(&kind)
}

/// What one sync of a Source came to.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncResult {
    /// Every manifest at `commit` is applied; `objects` as `Kind/name`.
    Applied {
        commit: String,
        objects: Vec<String>,
    },
    /// The branch could not be fetched.
    FetchFailed { message: String },
    /// The manifests at `commit` were not applied; nothing changed.
    ApplyFailed { commit: String, message: String },
}

/// Runs the Source reconciler until `shutdown`.
pub async fn run(resources: Resources, data_dir: PathBuf, shutdown: ironmesh_process::Shutdown) {
    use futures::{FutureExt, StreamExt};
    let cache = data_dir.join("sources");
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    loop {
        let rev = resources.store().revision().await.unwrap_or(0);
        let mut events = match resources
            .store()
            .watch(&crate::resources::prefix(Kind::Source), rev)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "source controller cannot watch the store");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(TICK) => continue,
                }
            }
        };
        loop {
            // Losing leadership (or shutting down) abandons a pass at once:
            // git is killed, and an apply is one transaction, written or not.
            tokio::select! {
                _ = &mut stopped => return,
                r = pass(&resources, &cache, &mut tracked) => if let Err(e) = r {
                    tracing::warn!(error = %e, "source pass failed");
                },
            }
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(TICK) => {}
                ev = events.next() => match ev {
                    Some(Ok(_)) => while let Some(Some(Ok(_))) = events.next().now_or_never() {},
                    _ => break,
                },
            }
        }
    }
}

/// What the reconciler remembers about one Source between passes.
struct Tracked {
    spec: SourceSpec,
    next: Instant,
    /// The commit applied with `spec`, so an unchanged commit is not
    /// applied again.
    applied: Option<String>,
}

/// Syncs every Source that is due or whose spec changed.
async fn pass(
    resources: &Resources,
    cache: &Path,
    tracked: &mut HashMap<String, Tracked>,
) -> Result<(), crate::resources::ResourceError> {
    let (sources, _) = resources
        .list(Kind::Source, &LabelSelector::default())
        .await?;
    let names: BTreeSet<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    tracked.retain(|name, _| {
        let keep = names.contains(name.as_str());
        if !keep {
            let _ = std::fs::remove_dir_all(cache.join(name));
        }
        keep
    });
    for src in &sources {
        let spec = match src.typed::<Source>() {
            Ok(s) => s.spec,
            Err(e) => {
                tracing::warn!(source = %src.name, error = %e, "unreadable Source");
                continue;
            }
        };
        let now = Instant::now();
        let (due, applied) = match tracked.get(&src.name) {
            Some(t) if t.spec == spec => (now >= t.next, t.applied.clone()),
            _ => (true, None),
        };
        if !due {
            continue;
        }
        let result = sync(resources, cache, &src.name, &spec, applied.as_deref()).await;
        let applied = match &result {
            Some(SyncResult::Applied { commit, .. }) => Some(commit.clone()),
            None => applied,
            _ => None,
        };
        tracked.insert(
            src.name.clone(),
            Tracked {
                spec: spec.clone(),
                next: now + Duration::from_secs(u64::from(spec.interval_seconds.max(1))),
                applied,
            },
        );
        let now_s = now_rfc3339();
        resources
            .update_typed(Kind::Source, &src.name, |cur: Option<Source>| {
                let mut obj = cur?;
                let prev = obj.status.take().unwrap_or_default();
                let status = match &result {
                    Some(r) => next_status(prev, r, &now_s),
                    None => SourceStatus {
                        last_sync_time: Some(now_s.clone()),
                        ..prev
                    },
                };
                obj.status = Some(status);
                Some(obj)
            })
            .await?;
    }
    Ok(())
}

/// Fetches and, when the commit is new, applies one Source. `None` when
/// the fetched commit is `already_applied`.
async fn sync(
    resources: &Resources,
    cache: &Path,
    name: &str,
    spec: &SourceSpec,
    already_applied: Option<&str>,
) -> Option<SyncResult> {
    let dir = cache.join(name);
    let commit = match fetch(&dir, spec).await {
        Ok(c) => c,
        Err(message) => {
            tracing::warn!(source = %name, %message, "source fetch failed");
            return Some(SyncResult::FetchFailed { message });
        }
    };
    if already_applied == Some(commit.as_str()) {
        return None;
    }
    let result = match apply_commit(resources, &dir, name, spec, &commit).await {
        Ok(objects) => SyncResult::Applied { commit, objects },
        Err(message) => SyncResult::ApplyFailed { commit, message },
    };
    match &result {
        SyncResult::Applied { commit, objects } => {
            tracing::info!(source = %name, %commit, objects = objects.len(), "source applied")
        }
        SyncResult::ApplyFailed { commit, message } => {
            tracing::warn!(source = %name, %commit, %message, "source commit not applied")
        }
        SyncResult::FetchFailed { .. } => {}
    }
    Some(result)
}

/// Reads, validates and applies the manifests at `commit`, pruning what
/// left git. Returns the objects now applied, as `Kind/name`.
async fn apply_commit(
    resources: &Resources,
    dir: &Path,
    name: &str,
    spec: &SourceSpec,
    commit: &str,
) -> Result<Vec<String>, String> {
    let tree = git(dir, &["ls-tree", "-r", "-l", "-z", "--full-tree", commit]).await?;
    let files = manifest_files(&tree, &spec.directory)?;
    let mut texts = Vec::with_capacity(files.len());
    for (path, oid) in files {
        let blob = git(dir, &["cat-file", "blob", &oid]).await?;
        // The listing said how big; this holds even if it lied.
        if blob.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(format!(
                "{path}: is {}; a Source reads files of at most {}: split it",
                human_bytes(blob.len() as u64),
                human_bytes(MAX_MANIFEST_BYTES)
            ));
        }
        let text = String::from_utf8(blob).map_err(|_| format!("{path}: is not UTF-8 text"))?;
        texts.push((path, text));
    }
    let docs = collect(&texts, name, &spec.allowed_kinds(), spec.allow_privileged)?;
    let mut owned = Vec::new();
    if spec.prune {
        let sel = LabelSelector::parse(&format!("{SOURCE_LABEL}={name}"))
            .map_err(|e| format!("cannot select this Source's objects: {e}"))?;
        for kind in Kind::ALL.into_iter().filter(|k| appliable(*k)) {
            let (items, _) = resources
                .list(kind, &sel)
                .await
                .map_err(|e| e.to_string())?;
            owned.extend(items.into_iter().map(|o| (o.kind, o.name)));
        }
    }
    let prune = prune_plan(&owned, &docs);
    let guard = |o: &StoredObject| check_owner(o, name);
    let (_, applied) = resources
        .apply_and_delete(&docs, &prune, &guard)
        .await
        .map_err(|e| e.to_string())?;
    Ok(applied
        .iter()
        .filter(|a| a.action != ApplyAction::Deleted)
        .map(|a| format!("{}/{}", a.kind, a.name))
        .collect())
}

/// Fetches `spec.branch` into the bare cache `dir` (created on first use)
/// and returns the fetched commit.
async fn fetch(dir: &Path, spec: &SourceSpec) -> Result<String, String> {
    if !dir.join("HEAD").exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the cache {}: {e}", dir.display()))?;
        git(dir, &["init", "--bare", "--quiet", "."]).await?;
    }
    let refspec = format!("+refs/heads/{}:refs/ironmesh/fetched", spec.branch);
    git(
        dir,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--force",
            // Only the tip is applied; history would only cost disk.
            "--depth",
            "1",
            "--",
            &spec.repo,
            &refspec,
        ],
    )
    .await
    .map_err(|e| {
        // Status and logs get this text: never the URL's credentials.
        redact_credentials(&format!(
            "cannot fetch branch {:?} of {}: {e}",
            spec.branch, spec.repo
        ))
    })?;
    let size = repository_bytes(&git(dir, &["count-objects", "-v"]).await?);
    if size > MAX_REPOSITORY_BYTES {
        // Give the disk back; the next sync fetches afresh.
        let _ = std::fs::remove_dir_all(dir);
        return Err(format!(
            "branch {:?} of {} is {} at its tip; a Source fetches at most {}: keep manifests in a smaller repository",
            spec.branch,
            redact_credentials(&spec.repo),
            human_bytes(size),
            human_bytes(MAX_REPOSITORY_BYTES)
        ));
    }
    let out = git(
        dir,
        &["rev-parse", "--verify", "refs/ironmesh/fetched^{commit}"],
    )
    .await?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

/// Bytes of a repository from `git count-objects -v` (loose and packed).
fn repository_bytes(count_objects: &[u8]) -> u64 {
    String::from_utf8_lossy(count_objects)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "size" | "size-pack")
                .then(|| v.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum::<u64>()
        .saturating_mul(1024)
}

/// `text` with the user and password of every URL in it (`scheme://user:
/// secret@host`) replaced by `***`.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// Runs `git` in `dir`; `Err` is git's own complaint.
async fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(format!("git {} took longer than {GIT_TIMEOUT:?}", args[0])),
        Ok(Err(e)) => return Err(format!("cannot run git: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(format!("git {} failed: {}", args[0], why.join("; ")))
}

/// The manifest files under `directory` in a `git ls-tree -r -z
/// --full-tree` listing, as `(path, blob id)` sorted by path. Symlinks and
/// submodules are skipped. A directory with no files is an error (it does
/// not exist at that commit), so a typo never prunes everything.
pub fn manifest_files(ls_tree: &[u8], directory: &str) -> Result<Vec<(String, String)>, String> {
    let dir = directory.trim_start_matches("./").trim_end_matches('/');
    let prefix = if dir.is_empty() || dir == "." {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut any = false;
    let mut out = Vec::new();
    let mut total: u64 = 0;
    let mut too_big = Vec::new();
    for entry in ls_tree.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((info, path)) = entry.split_once('\t') else {
            continue;
        };
        if !path.starts_with(&prefix) {
            continue;
        }
        any = true;
        // `mode type oid` and, with `ls-tree -l`, the blob's size.
        let mut f = info.split_whitespace();
        let (mode, kind, oid) = (f.next(), f.next(), f.next());
        let size = f.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let is_file = kind == Some("blob") && matches!(mode, Some("100644" | "100755"));
        let is_manifest = [".yaml", ".yml", ".json"].iter().any(|e| path.ends_with(e));
        if let (true, true, Some(oid)) = (is_file, is_manifest, oid) {
            if size > MAX_MANIFEST_BYTES {
                too_big.push(format!(
                    "{path}: is {}; a Source reads files of at most {}: split it",
                    human_bytes(size),
                    human_bytes(MAX_MANIFEST_BYTES)
                ));
            }
            total = total.saturating_add(size);
            out.push((path.to_string(), oid.to_string()));
        }
    }
    if !any {
        return Err(format!(
            "directory {directory:?} does not exist (or is empty) at this commit"
        ));
    }
    if !too_big.is_empty() {
        return Err(too_big.join("\n"));
    }
    if total > MAX_SOURCE_BYTES {
        return Err(format!(
            "the manifests under {directory:?} are {} together; a Source reads at most {} per commit: split them over several Sources",
            human_bytes(total),
            human_bytes(MAX_SOURCE_BYTES)
        ));
    }
    out.sort();
    Ok(out)
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{n} bytes")
    }
}

/// Parses and validates `(path, text)` files into documents to apply,
/// each labelled with [`SOURCE_LABEL`]` = source`. A Workload reaching
/// beyond the default sandbox is refused unless the Source has
/// `allowPrivileged`. Every problem is reported, one per line, naming the
/// file and document.
pub fn collect(
    files: &[(String, String)],
    source: &str,
    allowed: &[Kind],
    allow_privileged: bool,
) -> Result<Vec<(String, Validated)>, String> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (path, text) in files {
        let parsed = if path.ends_with(".json") {
            serde_json::from_str::<Value>(text)
                .map(|v| vec![(1, v)])
                .map_err(|e| format!("{path}: not valid JSON: {e}"))
        } else {
            ironmesh_api::parse_yaml_documents_numbered(text).map_err(|e| format!("{path}: {e}"))
        };
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for (n, doc) in parsed {
            let origin = format!("{path}, document {n}");
            match ironmesh_api::validate(&doc) {
                Err(e) => errors.push(format!("{origin}: {e}")),
                Ok(v) if !appliable(v.kind) => errors.push(format!(
                    "{origin}: {} {:?}: a Source may not create {}s; apply it with imctl",
                    v.kind, v.name, v.kind
                )),
                Ok(v) if !allowed.contains(&v.kind) => errors.push(format!(
                    "{origin}: {} {:?}: this Source may apply only {} (spec.kinds); add {} there to allow it",
                    v.kind,
                    v.name,
                    allowed.iter().map(Kind::as_str).collect::<Vec<_>>().join(", "),
                    v.kind
                )),
                Ok(v) if !allow_privileged && !crate::authz::host_access(&v).is_empty() => {
                    let (path, what) = crate::authz::host_access(&v).remove(0);
                    errors.push(format!(
                        "{origin}: {} {:?}: {path}: {what}: Source {source:?} applies this only with spec.allowPrivileged: true (set by an admin operator)",
                        v.kind, v.name
                    ))
                }
                Ok(mut v) => {
                    v.object["metadata"]["labels"][SOURCE_LABEL] = json!(source);
                    docs.push((origin, v));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors.join("\n"))
    }
}

/// Objects this Source applied earlier (`owned`) that are not among
/// `desired`: the ones to prune.
pub fn prune_plan(
    owned: &[(Kind, String)],
    desired: &[(String, Validated)],
) -> Vec<(Kind, String)> {
    let keep: BTreeSet<(Kind, &str)> = desired
        .iter()
        .map(|(_, v)| (v.kind, v.name.as_str()))
        .collect();
    owned
        .iter()
        .filter(|(k, n)| !keep.contains(&(*k, n.as_str())))
        .cloned()
        .collect()
}

/// `Ok` when Source `source` may overwrite or delete `o`: it carries this
/// Source's mark.
pub fn check_owner(o: &StoredObject, source: &str) -> Result<(), String> {
    match labels_of(&o.object).get(SOURCE_LABEL).map(String::as_str) {
        Some(s) if s == source => Ok(()),
        Some(other) => Err(format!(
            "{} {:?} already exists and belongs to Source {other:?}; this Source leaves it alone",
            o.kind, o.name
        )),
        None => Err(format!(
            "{} {:?} already exists and was not created by this Source (imctl apply?); delete it or rename it in git",
            o.kind, o.name
        )),
    }
}

/// The status after `result`, keeping what still holds from `prev`.
pub fn next_status(prev: SourceStatus, result: &SyncResult, now: &str) -> SourceStatus {
    let mut s = prev;
    s.last_sync_time = Some(now.to_string());
    let (ready, reason, message) = match result {
        SyncResult::Applied { commit, objects } => {
            s.last_applied_commit = Some(commit.clone());
            s.last_attempted_commit = Some(commit.clone());
            s.applied = objects.clone();
            s.applied_objects = objects.len();
            s.last_error = None;
            let short = &commit[..commit.len().min(12)];
            (
                ConditionStatus::True,
                "Applied",
                format!("applied {} objects from commit {short}", objects.len()),
            )
        }
        SyncResult::FetchFailed { message } => {
            s.last_error = Some(message.clone());
            (ConditionStatus::False, "FetchFailed", message.clone())
        }
        SyncResult::ApplyFailed { commit, message } => {
            s.last_attempted_commit = Some(commit.clone());
            let short = &commit[..commit.len().min(12)];
            let message = format!("commit {short} not applied, nothing changed: {message}");
            s.last_error = Some(message.clone());
            (ConditionStatus::False, "ApplyFailed", message)
        }
    };
    let prev_ready = s.conditions.iter().find(|c| c.type_ == "Ready").cloned();
    let transition = match &prev_ready {
        Some(c) if c.status == ready => c.last_transition_time.clone(),
        _ => Some(now.to_string()),
    };
    s.conditions.retain(|c| c.type_ != "Ready");
    s.conditions.push(Condition {
        type_: "Ready".into(),
        status: ready,
        reason: reason.into(),
        message,
        last_transition_time: transition,
        last_heartbeat_time: None,
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_api::source::DEFAULT_SOURCE_KINDS;

    #[test]
    fn credentials_in_urls_never_reach_status_text() {
        let t = "cannot fetch branch \"main\" of https://bot:s3cret@git.example/x.git: \
                 fatal: unable to access 'https://bot:s3cret@git.example/x.git/': 403";
        let r = redact_credentials(t);
        assert!(!r.contains("s3cret") && !r.contains("bot"), "{r}");
        assert_eq!(r.matches("https://***@git.example/x.git").count(), 2, "{r}");
        // Nothing to hide: unchanged.
        let plain = "cannot fetch https://git.example/x.git or /srv/git/x (user@host is fine)";
        assert_eq!(redact_credentials(plain), plain);
        assert_eq!(
            redact_credentials("ssh://git@host:22/r"),
            "ssh://***@host:22/r"
        );
    }

    #[test]
    fn privileged_workloads_need_allow_privileged() {
        let module = "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: kmod\nspec:\n  image: web:1\n  capabilities: {add: [NET_RAW, SYS_MODULE]}\n";
        let e = collect(
            &files(&[("k.yaml", module)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(
            e.contains("k.yaml, document 1: Workload \"kmod\": spec.capabilities.add[1]: capability SYS_MODULE is outside the default set: Source \"p\" applies this only with spec.allowPrivileged: true"),
            "{e}"
        );
        let unconfined = "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: u\nspec:\n  image: web:1\n  securityContext: {seccompProfile: Unconfined}\n";
        let e = collect(
            &files(&[("u.yaml", unconfined)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(e.contains("spec.securityContext.seccompProfile"), "{e}");
        assert_eq!(
            collect(
                &files(&[("k.yaml", module), ("u.yaml", unconfined)]),
                "p",
                &DEFAULT_SOURCE_KINDS,
                true
            )
            .unwrap()
            .len(),
            2
        );
        // Capabilities of Docker's default set need nothing more.
        let raw = "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: r\nspec:\n  image: web:1\n  capabilities: {add: [NET_RAW]}\n";
        assert!(collect(
            &files(&[("r.yaml", raw)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false
        )
        .is_ok());
    }

    #[test]
    fn a_source_applies_only_what_an_edit_operator_may() {
        assert!(appliable(Kind::Workload) && appliable(Kind::PipelineRun));
        for k in [Kind::Node, Kind::Instance, Kind::Source] {
            assert!(!appliable(k), "{k}");
        }
    }

    const WEB: &str = "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: web:1\n";
    const SVC: &str = "apiVersion: ironmesh.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n";

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn manifest_files_picks_manifests_under_the_directory() {
        let entries = [
            "100644 blob aaa\tapps/web.yaml",
            "100644 blob bbb\tapps/svc.yml",
            "100644 blob ccc\tapps/README.md",
            "120000 blob ddd\tapps/link.yaml",
            "160000 commit eee\tapps/sub.yaml",
            "100755 blob fff\tapps/x/p.json",
            "100644 blob ggg\tother/o.yaml",
        ];
        let listing: String = entries.iter().map(|e| format!("{e}\0")).collect();
        let ls = listing.as_bytes();
        let got = manifest_files(ls, "apps").unwrap();
        assert_eq!(
            got,
            [
                ("apps/svc.yml".to_string(), "bbb".to_string()),
                ("apps/web.yaml".into(), "aaa".into()),
                ("apps/x/p.json".into(), "fff".into()),
            ]
        );
        assert_eq!(manifest_files(ls, "./apps/").unwrap(), got);
        // With sizes (`ls-tree -l`): one file over the cap, or too much in all.
        let big = format!(
            "100644 blob aaa {}\tapps/huge.yaml\0100644 blob bbb     12\tapps/ok.yaml\0",
            MAX_MANIFEST_BYTES + 1
        );
        let e = manifest_files(big.as_bytes(), "apps").unwrap_err();
        assert!(
            e.contains("apps/huge.yaml: is 4.0 MiB; a Source reads files of at most 4.0 MiB"),
            "{e}"
        );
        let many: String = (0..9)
            .map(|i| format!("100644 blob b{i} {}\tapps/f{i}.yaml\0", MAX_MANIFEST_BYTES))
            .collect();
        let e = manifest_files(many.as_bytes(), "apps").unwrap_err();
        assert!(
            e.contains("are 36.0 MiB together; a Source reads at most 32.0 MiB per commit"),
            "{e}"
        );
        let sized = "100644 blob aaa    120\tapps/web.yaml\0";
        assert_eq!(
            manifest_files(sized.as_bytes(), "apps").unwrap(),
            [("apps/web.yaml".to_string(), "aaa".to_string())]
        );
        assert_eq!(manifest_files(ls, ".").unwrap().len(), 4);
        let e = manifest_files(ls, "app").unwrap_err();
        assert!(e.contains("directory \"app\" does not exist"), "{e}");
    }

    #[test]
    fn repository_size_counts_loose_and_packed_kib() {
        let out = b"count: 3\nsize: 12\nin-pack: 40\npacks: 1\nsize-pack: 1000\nprune-packable: 0\ngarbage: 0\nsize-garbage: 0\n";
        assert_eq!(repository_bytes(out), 1012 * 1024);
        assert_eq!(repository_bytes(b""), 0);
    }

    #[test]
    fn collect_labels_documents_and_names_file_document_and_field() {
        let docs = collect(
            &files(&[("a.yaml", &format!("{WEB}---\n{SVC}"))]),
            "platform",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].0, "a.yaml, document 2");
        assert_eq!(
            docs[0].1.object["metadata"]["labels"][SOURCE_LABEL],
            "platform"
        );

        let broken = WEB.replace("image: web:1", "image: web:1\n  replicas: -1");
        let e = collect(
            &files(&[("ok.yaml", SVC), ("apps/web.yaml", &broken)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(
            e.starts_with("apps/web.yaml, document 1: Workload \"web\": spec.replicas"),
            "{e}"
        );

        let e = collect(
            &files(&[("bad.yaml", "a: [")]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(e.starts_with("bad.yaml: document 1:"), "{e}");
        let e = collect(
            &files(&[("bad.json", "{")]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(e.starts_with("bad.json: not valid JSON"), "{e}");
    }

    #[test]
    fn sources_may_not_create_sources_or_instances() {
        let src = "apiVersion: ironmesh.dev/v1\nkind: Source\nmetadata:\n  name: more\nspec:\n  repo: /srv/git/x\n";
        let e = collect(
            &files(&[("s.yaml", src)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(
            e.contains("s.yaml, document 1: Source \"more\": a Source may not create Sources"),
            "{e}"
        );
        let inst = "apiVersion: ironmesh.dev/v1\nkind: Instance\nmetadata:\n  name: i\nspec: {}\n";
        let e = collect(
            &files(&[("i.yaml", inst)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap_err();
        assert!(e.contains("i.yaml, document 1:"), "{e}");
    }

    #[test]
    fn only_the_kinds_in_spec_kinds_are_applied() {
        let e = collect(&files(&[("w.yaml", WEB)]), "p", &[Kind::Service], false).unwrap_err();
        assert!(
            e.contains("w.yaml, document 1: Workload \"web\": this Source may apply only Service (spec.kinds)"),
            "{e}"
        );
        let node = "apiVersion: ironmesh.dev/v1\nkind: Node\nmetadata:\n  name: n1\nspec: {}\n";
        let e = collect(&files(&[("n.yaml", node)]), "p", &Kind::ALL, false).unwrap_err();
        assert!(e.contains("a Source may not create Nodes"), "{e}");
    }

    #[test]
    fn prune_plan_deletes_only_owned_objects_that_left_git() {
        let desired = collect(
            &files(&[("w.yaml", WEB)]),
            "p",
            &DEFAULT_SOURCE_KINDS,
            false,
        )
        .unwrap();
        let owned = vec![
            (Kind::Workload, "web".to_string()),
            (Kind::Service, "web".to_string()),
        ];
        assert_eq!(
            prune_plan(&owned, &desired),
            [(Kind::Service, "web".to_string())]
        );
        assert!(prune_plan(&[], &desired).is_empty());
    }

    fn stored(labels: Value) -> StoredObject {
        StoredObject {
            kind: Kind::Workload,
            name: "web".into(),
            object: json!({"metadata": {"name": "web", "labels": labels}}),
            revision: 1,
        }
    }

    #[test]
    fn only_objects_with_this_sources_mark_may_be_touched() {
        assert!(check_owner(&stored(json!({SOURCE_LABEL: "p"})), "p").is_ok());
        let e = check_owner(&stored(json!({SOURCE_LABEL: "q"})), "p").unwrap_err();
        assert!(e.contains("belongs to Source \"q\""), "{e}");
        let e = check_owner(&stored(json!({})), "p").unwrap_err();
        assert!(
            e.contains("Workload \"web\" already exists and was not created by this Source"),
            "{e}"
        );
    }

    #[test]
    fn status_reports_applied_failed_and_keeps_last_applied() {
        let ok = SyncResult::Applied {
            commit: "c1".into(),
            objects: vec!["Workload/web".into()],
        };
        let s = next_status(SourceStatus::default(), &ok, "t1");
        assert_eq!(s.last_applied_commit.as_deref(), Some("c1"));
        assert_eq!(s.applied_objects, 1);
        assert_eq!(s.conditions[0].reason, "Applied");
        assert_eq!(s.conditions[0].last_transition_time.as_deref(), Some("t1"));

        let bad = SyncResult::ApplyFailed {
            commit: "c2".into(),
            message: "w.yaml, document 1: spec.image: is required".into(),
        };
        let s = next_status(s, &bad, "t2");
        assert_eq!(s.last_applied_commit.as_deref(), Some("c1"));
        assert_eq!(s.last_attempted_commit.as_deref(), Some("c2"));
        assert_eq!(s.applied_objects, 1);
        assert_eq!(s.conditions.len(), 1);
        assert_eq!(s.conditions[0].status, ConditionStatus::False);
        assert_eq!(s.conditions[0].reason, "ApplyFailed");
        assert!(s.conditions[0]
            .message
            .contains("w.yaml, document 1: spec.image"));
        assert_eq!(s.conditions[0].last_transition_time.as_deref(), Some("t2"));

        let s = next_status(
            s,
            &SyncResult::FetchFailed {
                message: "git fetch failed".into(),
            },
            "t3",
        );
        assert_eq!(s.conditions[0].reason, "FetchFailed");
        assert_eq!(s.conditions[0].last_transition_time.as_deref(), Some("t2"));
        assert_eq!(s.last_sync_time.as_deref(), Some("t3"));
    }
}
