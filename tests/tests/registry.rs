//! End-to-end tests of the controller's OCI registry (`--registry-listen`)
//! with a real client: Debian's `skopeo`.
//!
//! The images are the project's own (`ironmesh-images`) as OCI layouts;
//! the multi-platform one is that image plus an arm64 variant under one
//! index. Operators log in with `imctl registry login` (bearer tokens from
//! auth.json) or present their client certificate (`--cert-dir`). Every
//! process runs on loopback and is killed by PID when its handle drops.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ironmesh_images::{build_layout, catalog, BuiltImage};
use ironmesh_tests::{bin, images_dir, wait_for, Agent, Controller, ControllerOpts};
use ironmesh_tests::{refused as failed, succeeded as ok};
use sha2::{Digest, Sha256};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A controller with its registry on a loopback port, collecting garbage
/// with no grace (the tests decide when), and the operators ed (edit) and
/// vera (view) beside admin.
struct Fixture {
    ctl: Controller,
    registry: SocketAddr,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        let ctl = Controller::start(ControllerOpts {
            extra_args: vec![
                "--image-gc-grace".into(),
                "0s".into(),
                "--image-gc-interval".into(),
                "0s".into(),
            ],
            ..ControllerOpts::default()
        });
        let registry = ctl
            .registry
            .expect("the test controller serves its registry");
        let f = Fixture {
            ctl,
            registry,
            dir: tempfile::tempdir().unwrap(),
        };
        for (name, role) in [("ed", "edit"), ("vera", "view")] {
            ok(
                f.ctl.imctl(&[
                    "operator",
                    "create",
                    name,
                    "--role",
                    role,
                    "--out",
                    f.conf(name).to_str().unwrap(),
                ]),
                "operator create",
            );
            // Token login: auth.json plus the CA, no client certificate.
            ok(
                f.ctl.imctl_as(
                    &f.conf(name),
                    &[
                        "registry",
                        "login",
                        &registry.to_string(),
                        "--authfile",
                        f.authfile(name).to_str().unwrap(),
                        "--cert-dir",
                        f.certs(name).to_str().unwrap(),
                    ],
                ),
                "registry login",
            );
        }
        // admin: mutual TLS with its certificate, no auth.json entry.
        ok(
            f.ctl.imctl(&[
                "registry",
                "login",
                &registry.to_string(),
                "--authfile",
                f.authfile("admin").to_str().unwrap(),
                "--cert-dir",
                f.certs("admin").to_str().unwrap(),
                "--client-cert",
            ]),
            "registry login --client-cert",
        );
        f
    }

    fn conf(&self, op: &str) -> PathBuf {
        self.dir.path().join(format!("{op}.yaml"))
    }
    fn authfile(&self, op: &str) -> PathBuf {
        self.dir.path().join(format!("{op}-auth.json"))
    }
    fn certs(&self, op: &str) -> PathBuf {
        self.dir.path().join(format!("{op}-certs"))
    }

    fn reference(&self, name: &str) -> String {
        format!("docker://{}/{name}", self.registry)
    }

    /// skopeo as operator `op`: token auth for ed and vera, the client
    /// certificate for admin (an empty auth file, so no token is used).
    fn skopeo(&self, op: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("skopeo");
        let sub = args[0];
        cmd.arg(sub);
        let certs = self.certs(op);
        let authfile = if op == "admin" {
            let empty = self.dir.path().join("empty-auth.json");
            std::fs::write(&empty, "{}").unwrap();
            empty
        } else {
            self.authfile(op)
        };
        match sub {
            "copy" => {
                cmd.arg("--src-cert-dir")
                    .arg(&certs)
                    .arg("--dest-cert-dir")
                    .arg(&certs)
                    .arg("--src-authfile")
                    .arg(&authfile)
                    .arg("--dest-authfile")
                    .arg(&authfile);
            }
            _ => {
                cmd.arg("--cert-dir")
                    .arg(&certs)
                    .arg("--authfile")
                    .arg(&authfile);
            }
        }
        cmd.args(&args[1..])
            .env("HOME", self.dir.path())
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("run skopeo (apt install skopeo; scripts/install-deps.sh does)")
    }

    fn blobs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.ctl.data_dir().join("images/blobs/sha256"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Uploads the registry finished so far (from the controller's log).
    fn uploads_finished(&self) -> usize {
        self.ctl.proc.log_text().matches("upload finished").count()
    }

    /// A sample of the controller's metrics (0 when absent).
    fn metric(&self, sample: &str) -> f64 {
        let text = self.ctl.scrape_metrics().expect("scrape /metrics");
        ironmesh_tests::metric(&text, sample).unwrap_or(0.0)
    }

    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .arg("-s")
            .arg("-i")
            .arg("--cacert")
            .arg(self.certs("vera").join("ca.crt"))
            .args(args)
            .output()
            .expect("run curl")
    }
}

fn build(dir: &Path, tag: &str) -> (PathBuf, BuiltImage) {
    let spec = catalog::records_server(&bin("records-server"), tag);
    let out = dir.join(format!("records-server-{tag}"));
    let built = build_layout(&spec, &out).expect("build the image layout");
    (out, built)
}

fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let d = sha(data);
    std::fs::write(layout_blob(layout, &d), data).unwrap();
    d
}

/// Turns the single-image layout into one whose `index.json` names an
/// image index (tag `multi`) of the amd64 image and an arm64 variant
/// (same layers, its own config). Returns (index digest, arm64 manifest).
fn make_multi_platform(layout: &Path, built: &BuiltImage) -> (String, String) {
    multi_platform(layout, &built.manifest_digest, &built.config_digest)
}

fn multi_platform(layout: &Path, manifest_digest: &str, config_digest: &str) -> (String, String) {
    let manifest_bytes = std::fs::read(layout_blob(layout, manifest_digest)).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let config_bytes = std::fs::read(layout_blob(layout, config_digest)).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    config["architecture"] = "arm64".into();
    let arm_config = serde_json::to_vec(&config).unwrap();
    let arm_config_digest = write_blob(layout, &arm_config);
    manifest["config"]["digest"] = arm_config_digest.into();
    manifest["config"]["size"] = arm_config.len().into();
    let arm_manifest = serde_json::to_vec(&manifest).unwrap();
    let arm_digest = write_blob(layout, &arm_manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": mt, "digest": manifest_digest, "size": manifest_bytes.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": mt, "digest": arm_digest, "size": arm_manifest.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let index_digest = write_blob(layout, &index);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    (index_digest, arm_digest)
}

#[test]
fn skopeo_copies_in_and_out_and_the_same_push_again_uploads_nothing() {
    let f = Fixture::start();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "0.1.0");
    let dest = f.reference("ironmesh/records-server:0.1.0");
    let src = format!("oci:{}", layout.display());

    // Nobody gets anything without credentials; /v2/ says how to get them.
    let out = text(&f.curl(&[&format!("https://{}/v2/", f.registry)]).stdout);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(
        out.to_lowercase().contains(&format!(
            "www-authenticate: bearer realm=\"https://{}/token\",service=\"ironmesh-registry\"",
            f.registry
        )),
        "{out}"
    );
    let out = text(
        &f.curl(&[&format!(
            "https://{}/v2/ironmesh/records-server/tags/list",
            f.registry
        )])
        .stdout,
    );
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("\"UNAUTHORIZED\""), "{out}");

    // A view operator may not push.
    let err = failed(
        f.skopeo("vera", &["copy", &src, &dest]),
        "skopeo copy as a view operator",
    );
    assert!(err.contains("denied") || err.contains("DENIED"), "{err}");
    assert!(f.blobs().is_empty(), "{:?}", f.blobs());

    // edit pushes with the token from auth.json.
    ok(f.skopeo("ed", &["copy", &src, &dest]), "skopeo copy in");
    let mut expected: Vec<String> = [&built.manifest_digest, &built.config_digest]
        .into_iter()
        .chain(&built.layer_digests)
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    expected.sort();
    assert_eq!(f.blobs(), expected);
    let uploads = f.uploads_finished();
    assert_eq!(uploads, 1 + built.layer_digests.len(), "config and layers");
    let uploaded = "ironmesh_controller_registry_blobs_uploaded_total";
    assert_eq!(f.metric(uploaded), uploads as f64);

    // The image store's view: imctl lists it with skopeo's digest.
    let images = f.ctl.imctl_json(&["image", "ls"]);
    assert_eq!(
        images[0]["name"], "ironmesh/records-server:0.1.0",
        "{images}"
    );
    assert_eq!(
        images[0]["manifestDigest"].as_str(),
        Some(built.manifest_digest.as_str())
    );

    // inspect, as view.
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(f.skopeo("vera", &["inspect", &dest]), "skopeo inspect")).unwrap();
    assert_eq!(
        inspect["Digest"].as_str(),
        Some(built.manifest_digest.as_str())
    );
    assert_eq!(
        inspect["Layers"].as_array().unwrap().len(),
        built.layer_digests.len()
    );
    let raw = ok(
        f.skopeo("vera", &["inspect", "--raw", &dest]),
        "skopeo inspect --raw",
    );
    assert_eq!(sha(raw.as_bytes()), built.manifest_digest);

    // And back out, by the admin's client certificate: identical blobs.
    let back = work.path().join("back");
    ok(
        f.skopeo(
            "admin",
            &["copy", &dest, &format!("oci:{}:0.1.0", back.display())],
        ),
        "skopeo copy out",
    );
    for d in [&built.manifest_digest, &built.config_digest]
        .into_iter()
        .chain(&built.layer_digests)
    {
        assert_eq!(
            std::fs::read(layout_blob(&back, d)).unwrap(),
            std::fs::read(layout_blob(&layout, d)).unwrap(),
            "{d}"
        );
    }
    let tags: serde_json::Value = serde_json::from_str(&ok(
        f.skopeo(
            "vera",
            &["list-tags", &f.reference("ironmesh/records-server")],
        ),
        "skopeo list-tags",
    ))
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["0.1.0"]));

    // The same image again, and under another tag: nothing is uploaded.
    ok(f.skopeo("ed", &["copy", &src, &dest]), "skopeo copy again");
    ok(
        f.skopeo(
            "ed",
            &["copy", &src, &f.reference("ironmesh/records-server:again")],
        ),
        "skopeo copy to a new tag",
    );
    assert_eq!(
        f.uploads_finished(),
        uploads,
        "a second push uploaded blobs"
    );
    assert_eq!(f.blobs(), expected);
}

/// A layout of one image whose single layer is `layer` (no runnable
/// content: the registry checks structure and digests, not tar contents).
fn raw_layout(dir: &Path, name: &str, layer: &[u8]) -> String {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer_digest = write_blob(dir, layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = write_blob(dir, config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = write_blob(dir, &manifest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest.len(),
        "annotations": {"io.containerd.image.name": name},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    manifest_digest
}

#[test]
fn imctl_push_goes_through_the_registry_as_the_operator_index_and_chunks_included() {
    let f = Fixture::start();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "multi");
    let (index_digest, _arm) = make_multi_platform(&layout, &built);
    let path = layout.to_str().unwrap();
    let push_as = |op: &str, args: &[&str]| {
        let mut a = vec!["image", "push"];
        a.extend(args);
        if op == "admin" {
            f.ctl.imctl(&a)
        } else {
            f.ctl.imctl_as(&f.conf(op), &a)
        }
    };

    // view may not push: the registry's refusal names the role.
    let err = failed(
        push_as("vera", &[path, "--name", "ironmesh/multi:2"]),
        "push as a view operator",
    );
    assert!(err.contains("DENIED") && err.contains("view"), "{err}");

    // edit pushes the whole index; skopeo reads it back byte for byte.
    let out = ok(
        push_as("ed", &[path, "--name", "ironmesh/multi:2"]),
        "push of an index as edit",
    );
    assert!(
        out.starts_with(&format!("pushed ironmesh/multi:2 {index_digest} (")),
        "{out}"
    );
    let raw = ok(
        f.skopeo(
            "vera",
            &["inspect", "--raw", &f.reference("ironmesh/multi:2")],
        ),
        "inspect the index imctl pushed",
    );
    assert_eq!(sha(raw.as_bytes()), index_digest);
    let again = ok(
        push_as("ed", &[path, "--name", "ironmesh/multi:2"]),
        "the same push again",
    );
    assert!(again.trim().ends_with(" 0 uploaded)"), "{again}");

    // A layer over the 32 MiB single-request limit goes in chunks, and
    // arrives whole.
    let big_dir = work.path().join("big");
    let mut x = 0x9e37_79b9_u32;
    let layer: Vec<u8> = (0..(40u32 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let manifest = raw_layout(&big_dir, "ironmesh/big:1", &layer);
    let patches_before = f.ctl.proc.log_text().matches("method=PATCH").count();
    let out = ok(
        push_as("admin", &[big_dir.to_str().unwrap()]),
        "push of a 40 MiB layer",
    );
    assert!(
        out.starts_with(&format!("pushed ironmesh/big:1 {manifest} (")),
        "{out}"
    );
    let stored = f
        .ctl
        .data_dir()
        .join("images/blobs/sha256")
        .join(sha(&layer).trim_start_matches("sha256:"));
    assert_eq!(std::fs::read(&stored).unwrap(), layer);
    let patches = f.ctl.proc.log_text().matches("method=PATCH").count() - patches_before;
    assert_eq!(patches, 2, "40 MiB in 32 MiB chunks");
    let images = f.ctl.imctl_json(&["image", "ls"]);
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "ironmesh/big:1" && i["manifestDigest"] == manifest.as_str()),
        "{images}"
    );

    // A controller without --registry-listen: the error says what to do.
    let plain = Controller::start(ControllerOpts {
        registry: false,
        ..ControllerOpts::default()
    });
    let nowhere = ironmesh_tests::free_addr().to_string();
    let err = failed(
        plain.imctl(&[
            "image",
            "push",
            path,
            "--name",
            "ironmesh/multi:3",
            "--registry",
            &nowhere,
        ]),
        "push with no registry",
    );
    assert!(
        err.contains(&format!("cannot reach the registry at {nowhere}"))
            && err.contains("--registry-listen"),
        "{err}"
    );
}

#[test]
fn multi_platform_index_is_stored_whole_deleted_only_by_an_admin_then_collected() {
    let f = Fixture::start();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "multi");
    let (index_digest, arm_digest) = make_multi_platform(&layout, &built);
    let dest = f.reference("ironmesh/multi:1");
    ok(
        f.skopeo(
            "ed",
            &[
                "copy",
                "--all",
                &format!("oci:{}:multi", layout.display()),
                &dest,
            ],
        ),
        "skopeo copy --all of an index",
    );
    // Stored whole: the index comes back byte for byte, and each
    // platform's manifest by digest.
    let raw = ok(
        f.skopeo("vera", &["inspect", "--raw", &dest]),
        "inspect --raw index",
    );
    assert_eq!(sha(raw.as_bytes()), index_digest);
    let arm = ok(
        f.skopeo(
            "vera",
            &[
                "inspect",
                "--raw",
                &f.reference(&format!("ironmesh/multi@{arm_digest}")),
            ],
        ),
        "inspect the arm64 manifest by digest",
    );
    assert_eq!(sha(arm.as_bytes()), arm_digest);
    let images = f.ctl.imctl_json(&["image", "ls"]);
    assert_eq!(
        images[0]["manifestDigest"].as_str(),
        Some(index_digest.as_str())
    );
    // config ×2, layer(s), manifest ×2, index.
    assert_eq!(
        f.blobs().len(),
        5 + built.layer_digests.len(),
        "{:?}",
        f.blobs()
    );

    // An edit operator may not delete; an admin may.
    let err = failed(f.skopeo("ed", &["delete", &dest]), "skopeo delete as edit");
    assert!(err.contains("denied") || err.contains("DENIED"), "{err}");
    ok(
        f.skopeo("admin", &["delete", &dest]),
        "skopeo delete as admin",
    );
    let err = failed(
        f.skopeo("vera", &["inspect", "--raw", &dest]),
        "inspect after delete",
    );
    assert!(
        err.contains("manifest unknown") || err.contains("MANIFEST_UNKNOWN"),
        "{err}"
    );

    // Collection frees every blob (edit may not run it).
    failed(
        f.ctl.imctl_as(&f.conf("ed"), &["image", "gc"]),
        "image gc as edit",
    );
    let out = ok(f.ctl.imctl(&["image", "gc"]), "image gc");
    let removed = 5 + built.layer_digests.len();
    assert!(out.contains(&format!(" in {removed} blobs")), "{out}");
    assert!(f.blobs().is_empty(), "{:?}", f.blobs());
    assert_eq!(
        f.metric("ironmesh_controller_image_gc_blobs_removed_total"),
        removed as f64
    );

    // imctl image rm of a skopeo-pushed image: refused for edit, then
    // the admin's removal frees its blobs at once.
    let (single, _) = build(work.path(), "0.2.0");
    let name = "ironmesh/records-server:0.2.0";
    ok(
        f.skopeo(
            "ed",
            &[
                "copy",
                &format!("oci:{}", single.display()),
                &f.reference(name),
            ],
        ),
        "skopeo copy",
    );
    assert!(!f.blobs().is_empty());
    failed(
        f.ctl.imctl_as(&f.conf("ed"), &["image", "rm", name]),
        "image rm as edit",
    );
    let out = ok(f.ctl.imctl(&["image", "rm", name]), "image rm");
    assert!(out.contains(&format!("removed {name}")), "{out}");
    assert!(out.contains("garbage collection:"), "{out}");
    assert!(f.blobs().is_empty(), "{:?}", f.blobs());
    assert_eq!(f.ctl.imctl_json(&["image", "ls"]), serde_json::json!([]));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_workload_runs_from_an_index_only_skopeo_pushed_on_the_agents_platform() {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the runnable image is built for amd64"
    );
    let f = Fixture::start();
    let agent = Agent::start(&f.ctl, "node-a");
    agent.wait_ready(&f.ctl, Duration::from_secs(90));
    // The project's runnable records-server (static build), as an index of
    // amd64 (the real one) and an arm64 variant this host cannot run.
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("records");
    copy_dir(&images_dir().join("records-server"), &layout);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let amd64 = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout_blob(&layout, &amd64)).unwrap()).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let (index_digest, arm64) = multi_platform(&layout, &amd64, &config);
    let name = "ironmesh/records-multi:1";
    ok(
        f.skopeo(
            "ed",
            &[
                "copy",
                "--all",
                &format!("oci:{}:multi", layout.display()),
                &f.reference(name),
            ],
        ),
        "skopeo copy --all",
    );
    let images = f.ctl.imctl_json(&["image", "ls"]);
    assert_eq!(
        images[0]["manifestDigest"].as_str(),
        Some(index_digest.as_str())
    );

    f.ctl.apply_yaml(&format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: multi
spec:
  image: {name}
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  resources:
    cpu: 100m
    memory: 64Mi
  readinessProbe:
    httpGet:
      path: /healthz
      port: 8080
    periodSeconds: 1
"
    ));
    let inst = wait_for(
        "the instance to run and be ready",
        Duration::from_secs(60),
        || {
            let v = f
                .ctl
                .imctl_json(&["get", "instances", "-l", "ironmesh.dev/workload=multi"]);
            let items = v
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_else(|| vec![v]);
            items.into_iter().find(|i| {
                i.pointer("/status/phase").and_then(|p| p.as_str()) == Some("Running")
                    && i.pointer("/status/ready") == Some(&serde_json::Value::Bool(true))
            })
        },
    );
    assert_eq!(
        inst.pointer("/spec/node").and_then(|n| n.as_str()),
        Some("node-a"),
        "{inst}"
    );
    // containerd holds this platform's manifest under the image's name.
    let out = Command::new("ctr")
        .arg("--address")
        .arg(agent.containerd.socket())
        .arg("--namespace")
        .arg(agent.containerd.namespace())
        .args(["images", "ls"])
        .output()
        .expect("run ctr");
    let listing = text(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} not in containerd: {listing}"));
    assert!(line.contains(&amd64), "{line}");

    // An index of arm64 only (pushed with imctl): placement keeps it off
    // this amd64 node and says what the image offers.
    let arm_bytes = std::fs::read(layout_blob(&layout, &arm64)).unwrap();
    let arm_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": arm64, "size": arm_bytes.len(),
                       "platform": {"architecture": "arm64", "os": "linux"}}],
    }))
    .unwrap();
    let arm_index_digest = write_blob(&layout, &arm_index);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": arm_index_digest, "size": arm_index.len(),
    }]});
    std::fs::write(layout.join("index.json"), top.to_string()).unwrap();
    ok(
        f.ctl.imctl_as(
            &f.conf("ed"),
            &[
                "image",
                "push",
                layout.to_str().unwrap(),
                "--name",
                "ironmesh/records-arm:1",
            ],
        ),
        "imctl push of an arm64-only index",
    );
    f.ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: arm
spec:
  image: ironmesh/records-arm:1
",
    );
    let why = "0/1 nodes available: 1 of a platform the image does not offer \
               (the image offers linux/arm64)";
    let pending = wait_for(
        "the arm64-only instance to be unschedulable",
        Duration::from_secs(30),
        || {
            let v = f
                .ctl
                .imctl_json(&["get", "instances", "-l", "ironmesh.dev/workload=arm"]);
            let items = v.get("items")?.as_array()?.clone();
            items.into_iter().find(|i| {
                i.pointer("/status/reason").and_then(|r| r.as_str()) == Some("Unschedulable")
                    && i.pointer("/status/message").and_then(|m| m.as_str()) == Some(why)
            })
        },
    );
    assert_eq!(pending.pointer("/spec/node"), None, "{pending}");
    let described = ok(f.ctl.imctl(&["describe", "workload", "arm"]), "describe");
    assert!(
        described.contains("the image offers linux/arm64"),
        "{described}"
    );
}
