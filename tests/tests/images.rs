//! End-to-end tests of image distribution: `imctl image push` and
//! `imctl image ls` against a real controller (the push goes through its
//! OCI registry), and a node fetching the
//! pushed blobs back over mTLS.
//!
//! The images are the project's own (`ironmesh-images`), built around the
//! workspace's debug binaries so the test needs no static release build:
//! the push path does not care what the layer holds.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use ironmesh_images::{build_layout, catalog, BuiltImage};
use ironmesh_proto::v1::{node_service_client::NodeServiceClient, FetchBlobRequest};
use ironmesh_tests::succeeded as ok;
use ironmesh_tests::{bin, grpc, Controller, ControllerOpts};
use sha2::{Digest, Sha256};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn build(dir: &Path, program: &str, tag: &str) -> (PathBuf, BuiltImage) {
    let spec = match program {
        "records-server" => catalog::records_server(&bin(program), tag),
        _ => catalog::batch_step(&bin(program), tag),
    };
    let out = dir.join(program);
    let built = build_layout(&spec, &out).expect("build the image layout");
    (out, built)
}

/// Files in the controller's blob directory (temporary ones included).
fn stored_blobs(ctl: &Controller) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ctl.data_dir().join("images/blobs/sha256"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn blob_file(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn push_list_and_push_again_uploads_nothing() {
    let ctl = Controller::start(ControllerOpts::default());
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "records-server", "0.1.0");
    assert_eq!(built.reference, "ironmesh/records-server:0.1.0");

    let t = Instant::now();
    let out = ctl.imctl(&["image", "push", layout.to_str().unwrap()]);
    let first_time = t.elapsed();
    let stdout = ok(out, "first push");
    let line = stdout.trim();
    assert!(
        line.starts_with(&format!(
            "pushed ironmesh/records-server:0.1.0 {} (",
            built.manifest_digest
        )),
        "{line}"
    );
    assert!(line.ends_with("3 blobs, 3 uploaded)"), "{line}");
    let mut blobs = stored_blobs(&ctl);
    assert_eq!(blobs.len(), 3, "{blobs:?}");
    let mut expected: Vec<String> = [&built.manifest_digest, &built.config_digest]
        .into_iter()
        .chain(&built.layer_digests)
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    expected.sort();
    blobs.sort();
    assert_eq!(blobs, expected);

    // The same image again: nothing to upload.
    let t = Instant::now();
    let stdout = ok(
        ctl.imctl(&["image", "push", layout.to_str().unwrap()]),
        "second push",
    );
    let second_time = t.elapsed();
    assert!(stdout.trim().ends_with("3 blobs, 0 uploaded)"), "{stdout}");
    assert_eq!(stored_blobs(&ctl).len(), 3);
    println!(
        "FIGURE imctl image push of records-server ({} bytes, debug binary): \
         first {first_time:?}, again {second_time:?}",
        built.size
    );

    // A tar of the layout, under another name: shares every blob.
    let tar = work.path().join("records-server.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success());
    let stdout = ok(
        ctl.imctl(&[
            "image",
            "push",
            tar.to_str().unwrap(),
            "--name",
            "ironmesh.dev/records-server:0.1.0",
        ]),
        "push of the tar",
    );
    assert!(
        stdout.starts_with(&format!(
            "pushed ironmesh.dev/records-server:0.1.0 {}",
            built.manifest_digest
        )),
        "{stdout}"
    );
    assert!(stdout.trim().ends_with("0 uploaded)"), "{stdout}");

    // The table an operator reads, and the JSON a script reads.
    let table = ok(ctl.imctl(&["image", "ls"]), "image ls");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["NAME", "DIGEST", "SIZE", "AGE"]);
    for (line, name) in lines[1..].iter().zip([
        "ironmesh.dev/records-server:0.1.0",
        "ironmesh/records-server:0.1.0",
    ]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[0], name, "{table}");
        assert_eq!(cols[1], built.manifest_digest, "{table}");
        assert!(cols[3].ends_with("B"), "{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(
        ctl.imctl(&["image", "list", "-o", "json"]),
        "image list",
    ))
    .unwrap();
    assert_eq!(json[0]["size"].as_u64(), Some(built.size), "{json}");
    assert_eq!(
        json[1]["manifestDigest"].as_str(),
        Some(built.manifest_digest.as_str())
    );

    // Names survive a controller restart (they are in the durable store).
    let mut ctl = ctl;
    ctl.restart_after_kill9("controller-2.log");
    let table = ok(ctl.imctl(&["image", "ls"]), "image ls after restart");
    assert!(table.contains("ironmesh/records-server:0.1.0"), "{table}");
}

#[test]
fn damaged_layer_is_refused_naming_the_digest_and_nothing_is_kept() {
    let ctl = Controller::start(ControllerOpts::default());
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "batch-step", "0.1.0");
    // Same size, one byte different: only the digest check can notice.
    let layer = blob_file(&layout, &built.layer_digests[0]);
    let mut data = std::fs::read(&layer).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&layer, &data).unwrap();

    let out = ctl.imctl(&["image", "push", layout.to_str().unwrap()]);
    assert!(!out.status.success(), "a damaged layer was accepted");
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&built.layer_digests[0]), "{stderr}");
    // The registry's verdict, as the spec names it.
    assert!(
        stderr.contains("DIGEST_INVALID") && stderr.contains("nothing was stored"),
        "{stderr}"
    );
    let stored = stored_blobs(&ctl);
    let layer_hex = built.layer_digests[0].trim_start_matches("sha256:");
    assert!(
        !stored
            .iter()
            .any(|f| f.contains(layer_hex) || f.starts_with('.')),
        "the damaged layer (or a temporary file) was kept: {stored:?}"
    );
    let table = ok(ctl.imctl(&["image", "ls"]), "image ls");
    assert!(!table.contains("batch-step"), "{table}");

    // A layout without a name and no --name is refused before connecting.
    let index = layout.join("index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    v["manifests"][0]["annotations"] = serde_json::json!({
        "org.opencontainers.image.ref.name": "0.1.0"
    });
    std::fs::write(&index, v.to_string()).unwrap();
    let out = ctl.imctl(&["image", "push", layout.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--name"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn nodes_fetch_pushed_blobs_over_mtls_and_operators_cannot() {
    let ctl = Controller::start(ControllerOpts::default());
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = build(work.path(), "records-server", "0.1.0");
    ok(
        ctl.imctl(&["image", "push", layout.to_str().unwrap()]),
        "push",
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A node may fetch only the blobs of images assigned to it: give
        // it an instance of this image first.
        let node = grpc::ProtocolNode::start(&ctl, "node-img", &grpc::token(&ctl))
            .await
            .expect("join and sync");
        ctl.apply_yaml(&format!(
            "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: img-user
spec:
  image: {}
  resources:
    cpu: 100m
    memory: 64Mi
  placement:
    nodeSelector:
      ironmesh.dev/hostname: node-img
",
            built.reference
        ));
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while !node.assignment().is_some_and(|a| {
            a.instances
                .iter()
                .any(|i| i.image_digest == built.manifest_digest)
        }) {
            assert!(
                Instant::now() < deadline,
                "no instance of the image assigned to node-img"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let node = grpc::Creds {
            cert_pem: node.creds.cert_pem.clone(),
            key_pem: node.creds.key_pem.clone(),
        };
        let mut client = NodeServiceClient::new(grpc::channel(&ctl, Some(&node)).await.unwrap());
        let t = Instant::now();
        let mut stream = client
            .fetch_blob(FetchBlobRequest {
                digest: built.layer_digests[0].clone(),
                offset: 0,
            })
            .await
            .expect("fetch the layer")
            .into_inner();
        let mut data = Vec::new();
        let mut total = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("chunk");
            if total.is_none() {
                assert_eq!(chunk.digest, built.layer_digests[0]);
                total = Some(chunk.total_size);
            }
            data.extend_from_slice(&chunk.data);
        }
        let elapsed = t.elapsed();
        assert_eq!(Some(data.len() as u64), total);
        assert_eq!(
            format!("sha256:{}", hex_encode(&Sha256::digest(&data))),
            built.layer_digests[0]
        );
        assert_eq!(
            data,
            std::fs::read(blob_file(&layout, &built.layer_digests[0])).unwrap()
        );
        println!(
            "FIGURE FetchBlob of a {} byte layer over mTLS on loopback: {elapsed:?}",
            data.len()
        );

        let missing = client
            .fetch_blob(FetchBlobRequest {
                digest: format!("sha256:{}", "0".repeat(64)),
                offset: 0,
            })
            .await
            .expect_err("an unknown blob is an error");
        // Not assigned to the node, so refused before the store is asked:
        // a node cannot probe which blobs exist.
        assert_eq!(missing.code(), tonic::Code::PermissionDenied);

        // The operator certificate is not a node certificate.
        let admin = grpc::admin_creds(&ctl);
        let mut as_operator =
            NodeServiceClient::new(grpc::channel(&ctl, Some(&admin)).await.unwrap());
        let denied = as_operator
            .fetch_blob(FetchBlobRequest {
                digest: built.layer_digests[0].clone(),
                offset: 0,
            })
            .await
            .expect_err("operators may not fetch blobs");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    });
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
