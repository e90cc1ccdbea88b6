//! End-to-end tests of Sources (GitOps): a real controller following a
//! local git repository made in a temporary directory.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ironmesh_tests::{str_at, wait_for, Controller, ControllerOpts};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

const WEB: &str = "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: web
spec:
  image: web:1
";

const SVC: &str = "apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports: [{port: 80}]
";

const OTHER: &str = "apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: other
spec:
  selector: {app: other}
  ports: [{port: 81}]
";

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.invalid",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes (or with `None` removes) files under `repo`, commits them all
/// and returns the new commit.
fn commit(repo: &Path, files: &[(&str, Option<&str>)], message: &str) -> String {
    for (path, text) in files {
        let p = repo.join(path);
        match text {
            Some(t) => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, t).unwrap();
            }
            None => std::fs::remove_file(&p).unwrap(),
        }
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "--quiet", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

fn get(ctl: &Controller, kind: &str, name: &str) -> Option<Value> {
    let out = ctl.imctl(&["get", kind, name, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("imctl printed JSON"))
}

fn ready(source: &Value) -> Option<&Value> {
    source
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

fn wait_applied(ctl: &Controller, commit: &str) -> Value {
    wait_for(&format!("Source applies {commit}"), DEADLINE, || {
        get(ctl, "sources", "platform")
            .filter(|src| str_at(src, "/status/lastAppliedCommit") == commit)
    })
}

fn wait_failed(ctl: &Controller, commit: &str) -> Value {
    wait_for(&format!("Source rejects {commit}"), DEADLINE, || {
        get(ctl, "sources", "platform").filter(|src| {
            str_at(src, "/status/lastAttemptedCommit") == commit
                && ready(src).is_some_and(|c| c["reason"] == "ApplyFailed")
        })
    })
}

fn source_yaml(name: &str, repo: &Path, branch: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Source
metadata:
  name: {name}
spec:
  repo: {}
  branch: {branch}
  directory: apps
  intervalSeconds: 1
",
        repo.display()
    )
}

#[test]
fn source_applies_prunes_and_refuses_broken_commits() {
    let ctl = Controller::start(ControllerOpts::default());
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path();
    git(repo, &["init", "--quiet", "-b", "main"]);
    let c1 = commit(
        repo,
        &[("apps/web.yaml", Some(WEB)), ("apps/svc.yaml", Some(SVC))],
        "web and its service",
    );
    // An object made by hand: the Source must never touch it.
    ctl.apply_yaml("apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: manual\nspec:\n  image: manual:1\n",
    );
    ctl.apply_yaml(&source_yaml("platform", repo, "main"));

    // First commit: both objects applied, marked as the Source's.
    let src = wait_applied(&ctl, &c1);
    assert_eq!(src["status"]["appliedObjects"], 2, "{src}");
    assert_eq!(ready(&src).unwrap()["status"], "True", "{src}");
    let web = get(&ctl, "workloads", "web").expect("web applied");
    assert_eq!(
        str_at(&web, "/metadata/labels/ironmesh.dev~1source"),
        "platform"
    );
    let svc = get(&ctl, "services", "web").expect("service applied");
    assert_eq!(
        str_at(&svc, "/metadata/labels/ironmesh.dev~1source"),
        "platform"
    );

    // The Service leaves git: pruned; the Workload and the hand-made one stay.
    let c2 = commit(repo, &[("apps/svc.yaml", None)], "drop the service");
    let src = wait_applied(&ctl, &c2);
    assert_eq!(src["status"]["appliedObjects"], 1, "{src}");
    assert!(get(&ctl, "services", "web").is_none(), "service pruned");
    assert!(get(&ctl, "workloads", "web").is_some());
    assert!(get(&ctl, "workloads", "manual").is_some());

    // A broken commit (a bad field next to a good new object) changes
    // nothing and says which file, document and field.
    let broken = WEB.replace("image: web:1", "image: web:2\n  replicas: -1");
    let c3 = commit(
        repo,
        &[
            ("apps/web.yaml", Some(&broken)),
            ("apps/other.yaml", Some(OTHER)),
        ],
        "broken",
    );
    let src = wait_failed(&ctl, &c3);
    let msg = str_at(ready(&src).unwrap(), "/message");
    assert!(
        msg.contains("apps/web.yaml, document 1") && msg.contains("spec.replicas"),
        "{msg}"
    );
    assert_eq!(str_at(&src, "/status/lastAppliedCommit"), c2);
    assert_eq!(ready(&src).unwrap()["status"], "False");
    assert!(get(&ctl, "services", "other").is_none(), "nothing applied");
    let web = get(&ctl, "workloads", "web").unwrap();
    assert_eq!(str_at(&web, "/spec/image"), "web:1", "web unchanged");

    // Fixed: the whole commit applies.
    let c4 = commit(
        repo,
        &[("apps/web.yaml", Some(&WEB.replace("web:1", "web:2")))],
        "fixed",
    );
    let src = wait_applied(&ctl, &c4);
    assert_eq!(ready(&src).unwrap()["status"], "True", "{src}");
    assert_eq!(
        str_at(&get(&ctl, "workloads", "web").unwrap(), "/spec/image"),
        "web:2"
    );
    assert!(get(&ctl, "services", "other").is_some());

    // Claiming the hand-made object is a conflict, not a takeover.
    let c5 = commit(
        repo,
        &[(
            "apps/manual.yaml",
            Some("apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: manual\nspec:\n  image: git:1\n"),
        )],
        "claim manual",
    );
    let src = wait_failed(&ctl, &c5);
    let msg = str_at(ready(&src).unwrap(), "/message");
    assert!(
        msg.contains("Workload \"manual\" already exists and was not created by this Source"),
        "{msg}"
    );
    let manual = get(&ctl, "workloads", "manual").unwrap();
    assert_eq!(str_at(&manual, "/spec/image"), "manual:1");
    assert!(manual
        .pointer("/metadata/labels/ironmesh.dev~1source")
        .is_none());
}

#[test]
fn source_reports_fetch_errors() {
    let ctl = Controller::start(ControllerOpts::default());
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path();
    git(repo, &["init", "--quiet", "-b", "main"]);
    commit(repo, &[("apps/web.yaml", Some(WEB))], "web");
    ctl.apply_yaml(&source_yaml("platform", repo, "no-such-branch"));
    let src = wait_for("FetchFailed", DEADLINE, || {
        get(&ctl, "sources", "platform")
            .filter(|src| ready(src).is_some_and(|c| c["reason"] == "FetchFailed"))
    });
    let msg = str_at(ready(&src).unwrap(), "/message");
    assert!(msg.contains("no-such-branch"), "{msg}");
    assert!(get(&ctl, "workloads", "web").is_none());
}
