//! Source: a git repository whose manifests the controller keeps applied
//! (GitOps). Every `intervalSeconds` the controller fetches `branch`, reads
//! the manifests under `directory`, and applies them all-or-nothing; with
//! `prune`, objects it applied earlier that are no longer in git are
//! deleted.

use serde::{Deserialize, Serialize};

use crate::kind::Kind;
use crate::meta::Condition;
use crate::validate::{Errors, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// A URL (`https://`, `http://`, `ssh://`, `git://`, `file://`), an
    /// scp-like address (`git@host:org/repo.git`), or an absolute path.
    pub repo: String,
    /// Default `main`.
    #[serde(default = "main_branch")]
    pub branch: String,
    /// Relative to the repository root, without `..`; default `.`.
    #[serde(default = "dot")]
    pub directory: String,
    /// At least 1; default 30.
    #[serde(default = "thirty")]
    pub interval_seconds: u32,
    /// Delete objects this Source applied once they leave git; default true.
    #[serde(default = "yes")]
    pub prune: bool,
    /// The kinds this Source may apply; a manifest of any other kind fails
    /// the sync. Default Workload, Service, Policy, Volume, Pipeline; never
    /// Node, Instance or Source.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<String>,
    /// Lets this Source apply Workloads that reach beyond the default
    /// sandbox (capabilities outside Docker's default set, seccomp
    /// `Unconfined`); default false. Only an admin operator may set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_privileged: bool,
}

/// What a Source may apply when its spec names no kinds.
pub const DEFAULT_SOURCE_KINDS: [Kind; 5] = [
    Kind::Workload,
    Kind::Service,
    Kind::Policy,
    Kind::Volume,
    Kind::Pipeline,
];

/// Kinds a Source may be allowed to apply at all: what an `edit` operator
/// may apply, other Sources excepted (a Source needs only role edit).
pub const SOURCE_APPLIABLE_KINDS: [Kind; 7] = [
    Kind::Workload,
    Kind::Service,
    Kind::Policy,
    Kind::Volume,
    Kind::Pipeline,
    Kind::PipelineRun,
    Kind::HTTPRoute,
];

fn default_kinds() -> Vec<String> {
    DEFAULT_SOURCE_KINDS
        .iter()
        .map(|k| k.as_str().to_string())
        .collect()
}

impl SourceSpec {
    /// The kinds in `spec.kinds` (already validated).
    pub fn allowed_kinds(&self) -> Vec<Kind> {
        self.kinds
            .iter()
            .filter_map(|k| k.parse::<Kind>().ok())
            .collect()
    }
}

fn main_branch() -> String {
    "main".into()
}
fn dot() -> String {
    ".".into()
}
fn thirty() -> u32 {
    30
}
fn yes() -> bool {
    true
}

const SCHEMES: [&str; 5] = ["https://", "http://", "ssh://", "git://", "file://"];

/// Why `r` is not a repository address, if it is not.
fn repo_problem(r: &str) -> Option<String> {
    if r.is_empty() {
        return Some(
            "is required: a URL such as https://git.example/platform.git or an absolute path"
                .into(),
        );
    }
    if r.chars().any(char::is_whitespace) {
        return Some(format!("must not contain whitespace, got {r:?}"));
    }
    if let Some(scheme) = SCHEMES.iter().find(|s| r.starts_with(*s)) {
        return (r.len() == scheme.len())
            .then(|| format!("{r:?} has no host or path after {scheme}"));
    }
    if r.starts_with('/') {
        return None;
    }
    // scp-like: user@host:path
    if let Some((user_host, path)) = r.split_once(':') {
        if let Some((user, host)) = user_host.split_once('@') {
            if !user.is_empty() && !host.is_empty() && !path.is_empty() && !host.contains('/') {
                return None;
            }
        }
    }
    Some(format!(
        "{r:?} must be a URL (https://, http://, ssh://, git://, file://), an scp-like address (git@host:org/repo.git) or an absolute path"
    ))
}

/// Why `b` is not a usable branch name (git's ref rules, simplified).
fn branch_problem(b: &str) -> Option<String> {
    let bad = b.is_empty()
        || b.starts_with('-')
        || b.starts_with('/')
        || b.ends_with('/')
        || b.ends_with('.')
        || b.ends_with(".lock")
        || b.contains("..")
        || b.contains("//")
        || b.contains("@{")
        || b.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
        });
    bad.then(|| format!("{b:?} is not a valid git branch name"))
}

impl Spec for SourceSpec {
    fn check(&self, errs: &mut Errors) {
        if let Some(p) = repo_problem(&self.repo) {
            errs.add("spec.repo", p);
        }
        if let Some(p) = branch_problem(&self.branch) {
            errs.add("spec.branch", p);
        }
        let d = &self.directory;
        if d.is_empty() {
            errs.add(
                "spec.directory",
                "must not be empty; use \".\" for the repository root",
            );
        } else if d.starts_with('/') || d.split('/').any(|c| c == "..") {
            errs.add(
                "spec.directory",
                format!("must be a relative path inside the repository, without \"..\", got {d:?}"),
            );
        }
        if self.kinds.is_empty() {
            errs.add(
                "spec.kinds",
                "must name at least one kind (or be left out for the default)",
            );
        }
        for (i, k) in self.kinds.iter().enumerate() {
            let path = format!("spec.kinds[{i}]");
            let allowed = SOURCE_APPLIABLE_KINDS
                .iter()
                .map(Kind::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            match SOURCE_APPLIABLE_KINDS.iter().find(|a| a.as_str() == k) {
                Some(_) => {}
                None if Kind::ALL.iter().any(|a| a.as_str() == k) => errs.add(
                    path,
                    format!("a Source may never apply {k}s; allowed: {allowed}"),
                ),
                None => errs.add(
                    path,
                    format!("{k:?} is not a kind a Source may apply; allowed: {allowed}"),
                ),
            }
        }
        if self.interval_seconds < 1 {
            errs.add(
                "spec.intervalSeconds",
                format!("must be at least 1, got {}", self.interval_seconds),
            );
        }
    }
}

/// What the controller reports about a Source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The commit last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_commit: Option<String>,
    /// The commit of the last attempt, applied or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_commit: Option<String>,
    /// How many objects the last applied commit holds.
    #[serde(default)]
    pub applied_objects: usize,
    /// RFC 3339; the last fetch, successful or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// Why the last sync failed, with the file and document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What this Source applied, e.g. `Workload/web`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use serde_json::{json, Value};

    fn src(spec: Value) -> Value {
        json!({"apiVersion": "ironmesh.dev/v1", "kind": "Source", "metadata": {"name": "platform"}, "spec": spec})
    }

    #[track_caller]
    fn rejects(spec: Value, path: &str, fragment: &str) {
        let e = validate(&src(spec)).expect_err("must be rejected");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }

    #[test]
    fn defaults_are_filled() {
        let v = validate(&src(json!({"repo": "/srv/git/platform"}))).unwrap();
        assert_eq!(
            v.object["spec"],
            json!({"repo": "/srv/git/platform", "branch": "main", "directory": ".", "intervalSeconds": 30, "prune": true,
                "kinds": ["Workload", "Service", "Policy", "Volume", "Pipeline"]})
        );
        assert_eq!(validate(&v.object).unwrap(), v);
    }

    #[test]
    fn kinds() {
        let v = validate(&src(
            json!({"repo": "/srv/git/p", "kinds": ["Service", "PipelineRun"]}),
        ))
        .unwrap();
        let spec: SourceSpec = serde_json::from_value(v.object["spec"].clone()).unwrap();
        assert_eq!(spec.allowed_kinds(), vec![Kind::Service, Kind::PipelineRun]);
        rejects(
            json!({"repo": "/srv/git/p", "kinds": ["Workload", "Node"]}),
            "spec.kinds[1]",
            "a Source may never apply Nodes",
        );
        rejects(
            json!({"repo": "/srv/git/p", "kinds": ["Source"]}),
            "spec.kinds[0]",
            "may never apply Sources",
        );
        rejects(
            json!({"repo": "/srv/git/p", "kinds": ["Gadget"]}),
            "spec.kinds[0]",
            "is not a kind a Source may apply",
        );
        rejects(
            json!({"repo": "/srv/git/p", "kinds": []}),
            "spec.kinds",
            "at least one kind",
        );
    }

    #[test]
    fn repo() {
        for ok in [
            "https://git.example/platform.git",
            "ssh://git@git.example/platform",
            "file:///srv/git/platform",
            "git@github.com:org/platform.git",
            "/srv/git/platform",
        ] {
            assert!(validate(&src(json!({"repo": ok}))).is_ok(), "{ok}");
        }
        rejects(json!({}), "spec.repo", "is required");
        rejects(json!({"repo": ""}), "spec.repo", "is required");
        rejects(
            json!({"repo": "relative/path"}),
            "spec.repo",
            "or an absolute path",
        );
        rejects(json!({"repo": "https://"}), "spec.repo", "no host or path");
        rejects(json!({"repo": "ftp://x/y"}), "spec.repo", "must be a URL");
        rejects(json!({"repo": "/srv/my repo"}), "spec.repo", "whitespace");
    }

    #[test]
    fn branch_directory_interval() {
        let with = |extra: Value| {
            let mut s = json!({"repo": "/srv/git/platform"});
            for (k, v) in extra.as_object().into_iter().flatten() {
                s[k] = v.clone();
            }
            s
        };
        for bad in ["", "a..b", "has space", "-x", "x.lock", "a:b", "x/"] {
            rejects(
                with(json!({"branch": bad})),
                "spec.branch",
                "not a valid git branch name",
            );
        }
        assert!(validate(&src(with(json!({"branch": "release/1.2"})))).is_ok());
        rejects(
            with(json!({"directory": "../x"})),
            "spec.directory",
            "relative path inside the repository",
        );
        rejects(
            with(json!({"directory": "a/../../x"})),
            "spec.directory",
            "without \"..\"",
        );
        rejects(
            with(json!({"directory": "/abs"})),
            "spec.directory",
            "relative path",
        );
        rejects(
            with(json!({"directory": ""})),
            "spec.directory",
            "use \".\"",
        );
        assert!(validate(&src(with(json!({"directory": "clusters/prod"})))).is_ok());
        rejects(
            with(json!({"intervalSeconds": 0})),
            "spec.intervalSeconds",
            "must be at least 1, got 0",
        );
        assert!(validate(&src(with(json!({"intervalSeconds": 1})))).is_ok());
        rejects(
            with(json!({"prune": "no"})),
            "spec.prune",
            "must be true or false",
        );
        let v = validate(&src(with(json!({"prune": false})))).unwrap();
        assert_eq!(v.object["spec"]["prune"], false);
    }

    #[test]
    fn status_round_trip() {
        let s = SourceStatus {
            last_applied_commit: Some("abc123".into()),
            applied: vec!["Workload/web".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            json!({"lastAppliedCommit": "abc123", "appliedObjects": 0, "applied": ["Workload/web"]})
        );
        assert_eq!(serde_json::from_value::<SourceStatus>(v).unwrap(), s);
    }
}
