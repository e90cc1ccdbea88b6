//! The OCI image layouts `build_layout` writes: reproducible, internally
//! consistent (every digest re-hashed here), with a deterministic layer.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ironmesh_images::static_build::check_static;
use ironmesh_images::{
    build_layout, catalog, sha256_digest, BuiltImage, ImageDir, ImageError, ImageFile, ImageSpec,
    LayerCompression,
};
use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app"), b"#!fake binary\x00\x01\x02").unwrap();
        std::fs::write(dir.path().join("conf.json"), br#"{"a":1}"#).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spec(&self) -> ImageSpec {
        let mut spec = ImageSpec::new("ironmesh/test-app", "t1");
        spec.entrypoint = vec!["/bin/app".into(), "--serve".into()];
        spec.env = vec!["PATH=/bin".into(), "MODE=test".into()];
        spec.working_dir = "/tmp".into();
        spec.exposed_ports = vec!["8080".into(), "9090/udp".into()];
        spec.labels = BTreeMap::from([("org.example.a".into(), "b".into())]);
        spec.files = vec![
            ImageFile {
                path_in_image: "/etc/app/conf.json".into(),
                source: self.path("conf.json"),
                mode: 0o644,
            },
            ImageFile {
                path_in_image: "/bin/app".into(),
                source: self.path("app"),
                mode: 0o755,
            },
        ];
        spec.directories = vec![ImageDir {
            path_in_image: "/tmp".into(),
            mode: 0o1777,
        }];
        spec
    }
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Follows index → manifest → config and layer, checking every digest
/// and size on the way; returns (manifest, config, uncompressed layer).
fn open_layout(layout: &Path, built: &BuiltImage) -> (Value, Value, Vec<u8>) {
    assert_eq!(
        json(&std::fs::read(layout.join("oci-layout")).unwrap()),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    for (name, bytes) in tree(&layout.join("blobs/sha256")) {
        assert_eq!(
            format!("sha256:{name}"),
            sha256_digest(&bytes),
            "blob file name is not its sha256"
        );
    }
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    let desc = &manifests[0];
    assert_eq!(desc["digest"], built.manifest_digest.as_str());
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest_bytes = blob(layout, &built.manifest_digest);
    assert_eq!(desc["size"], manifest_bytes.len() as u64);
    assert_eq!(desc["platform"]["architecture"], "amd64");
    assert_eq!(desc["platform"]["os"], "linux");

    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["config"]["digest"], built.config_digest.as_str());
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config_bytes = blob(layout, &built.config_digest);
    assert_eq!(manifest["config"]["size"], config_bytes.len() as u64);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(built.layer_digests.len(), 1);
    assert_eq!(layers[0]["digest"], built.layer_digests[0].as_str());
    let layer_blob = blob(layout, &built.layer_digests[0]);
    assert_eq!(layers[0]["size"], layer_blob.len() as u64);

    let tar = match layers[0]["mediaType"].as_str().unwrap() {
        "application/vnd.oci.image.layer.v1.tar+gzip" => {
            assert_eq!(&layer_blob[..2], &[0x1f, 0x8b], "gzip magic");
            // Fixed gzip header: mtime 0, no FNAME/FCOMMENT/FEXTRA flags.
            assert_eq!(&layer_blob[3..8], &[0, 0, 0, 0, 0]);
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(layer_blob.as_slice())
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        "application/vnd.oci.image.layer.v1.tar" => layer_blob,
        other => panic!("layer media type {other}"),
    };
    let config = json(&config_bytes);
    assert_eq!(
        config["rootfs"],
        serde_json::json!({"type": "layers", "diff_ids": [sha256_digest(&tar)]})
    );
    assert_eq!(built.diff_ids, vec![sha256_digest(&tar)]);
    let total = (manifest_bytes.len() + config_bytes.len()) as u64
        + std::fs::metadata(
            layout
                .join("blobs/sha256")
                .join(&built.layer_digests[0][7..]),
        )
        .unwrap()
        .len();
    assert_eq!(built.size, total);
    (manifest, config, tar)
}

struct TarEntry {
    path: String,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
}

fn tar_entries(tar_bytes: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let header = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            TarEntry {
                path: String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                gid: header.gid().unwrap(),
                mtime: header.mtime().unwrap(),
                data,
            }
        })
        .collect()
}

#[test]
fn same_spec_twice_gives_identical_layouts() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let a = build_layout(&fx.spec(), &out.path().join("a")).unwrap();
    let b = build_layout(&fx.spec(), &out.path().join("b")).unwrap();
    assert_eq!(a, b);
    let (ta, tb) = (tree(&out.path().join("a")), tree(&out.path().join("b")));
    assert_eq!(ta.len(), 5, "oci-layout, index.json and three blobs");
    assert_eq!(ta, tb, "layouts differ byte for byte");

    // The source files' own permissions and times do not leak in.
    let app = fx.path("app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&app, std::fs::read(&app).unwrap()).unwrap();
    let c = build_layout(&fx.spec(), &out.path().join("c")).unwrap();
    assert_eq!(a, c);
}

#[test]
fn layout_is_consistent_and_layer_deterministic() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("img");
    let built = build_layout(&fx.spec(), &layout).unwrap();
    assert_eq!(built.reference, "ironmesh/test-app:t1");
    let (_, config, tar) = open_layout(&layout, &built);

    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "t1");
    assert_eq!(
        annotations["io.containerd.image.name"],
        "ironmesh/test-app:t1"
    );

    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    assert_eq!(
        config["config"],
        serde_json::json!({
            "Entrypoint": ["/bin/app", "--serve"],
            "Env": ["PATH=/bin", "MODE=test"],
            "ExposedPorts": {"8080/tcp": {}, "9090/udp": {}},
            "Labels": {"org.example.a": "b"},
            "WorkingDir": "/tmp",
        })
    );

    let entries = tar_entries(&tar);
    let listed: Vec<(&str, u32)> = entries.iter().map(|e| (e.path.as_str(), e.mode)).collect();
    assert_eq!(
        listed,
        vec![
            ("bin/", 0o755),
            ("bin/app", 0o755),
            ("etc/", 0o755),
            ("etc/app/", 0o755),
            ("etc/app/conf.json", 0o644),
            ("tmp/", 0o1777),
        ]
    );
    for e in &entries {
        assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.path);
        let want = if e.path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        };
        assert_eq!(e.kind, want, "{}", e.path);
    }
    assert_eq!(entries[1].data, std::fs::read(fx.path("app")).unwrap());
    assert_eq!(entries[4].data, br#"{"a":1}"#);
}

#[test]
fn epoch_and_uncompressed_layers() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let plain = build_layout(&fx.spec(), &out.path().join("plain")).unwrap();

    let mut spec = fx.spec();
    spec.epoch = 1_700_000_000;
    let dated = build_layout(&spec, &out.path().join("dated")).unwrap();
    assert_ne!(plain.manifest_digest, dated.manifest_digest);
    let (_, config, tar) = open_layout(&out.path().join("dated"), &dated);
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    assert!(tar_entries(&tar).iter().all(|e| e.mtime == 1_700_000_000));

    let mut spec = fx.spec();
    spec.compression = LayerCompression::None;
    let raw = build_layout(&spec, &out.path().join("raw")).unwrap();
    let (manifest, _, _) = open_layout(&out.path().join("raw"), &raw);
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(raw.layer_digests, raw.diff_ids);
    assert_eq!(raw.diff_ids, plain.diff_ids, "same tar either way");
}

#[test]
fn rebuilding_into_a_layout_replaces_it() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("img");
    let first = build_layout(&fx.spec(), &layout).unwrap();
    std::fs::write(fx.path("app"), b"another binary").unwrap();
    let second = build_layout(&fx.spec(), &layout).unwrap();
    assert_ne!(first.manifest_digest, second.manifest_digest);
    open_layout(&layout, &second);
    assert_eq!(
        tree(&layout.join("blobs/sha256")).len(),
        3,
        "stale blobs of the first build were left behind"
    );
    // Nothing but the layout is left next to it.
    let siblings: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert_eq!(siblings.len(), 1);
}

#[test]
fn refuses_to_replace_what_is_not_a_layout() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let precious = out.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("notes.txt"), b"keep me").unwrap();
    let err = build_layout(&fx.spec(), &precious).unwrap_err();
    assert!(matches!(err, ImageError::NotALayout(_)), "{err}");
    assert!(err.to_string().contains("precious"), "{err}");
    assert_eq!(
        std::fs::read(precious.join("notes.txt")).unwrap(),
        b"keep me"
    );
    // An empty directory is fine.
    let empty = out.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    build_layout(&fx.spec(), &empty).unwrap();
}

#[test]
fn errors_name_the_file_and_field() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let mut spec = fx.spec();
    spec.files[1].source = fx.path("missing-binary");
    let err = build_layout(&spec, &out.path().join("x")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ImageError::ReadSource { .. }), "{text}");
    assert!(
        text.contains("missing-binary") && text.contains("/bin/app"),
        "{text}"
    );
    assert!(!out.path().join("x").exists(), "nothing written on error");

    let mut spec = fx.spec();
    spec.files[0].path_in_image = "/etc/../passwd".into();
    let text = build_layout(&spec, &out.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("files[0] \"/etc/../passwd\"") && text.contains("\"..\""),
        "{text}"
    );
    let entries: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(entries.is_empty(), "no staging directory left behind");
}

#[test]
fn catalog_images_build() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let server = catalog::records_server(&fx.path("app"), "dev");
    let built = build_layout(&server, &out.path().join("rs")).unwrap();
    assert_eq!(built.reference, "ironmesh/records-server:dev");
    let (_, config, tar) = open_layout(&out.path().join("rs"), &built);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/records-server"])
    );
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );
    let paths: Vec<String> = tar_entries(&tar).into_iter().map(|e| e.path).collect();
    assert_eq!(paths, vec!["bin/", "bin/records-server", "tmp/"]);

    let step = catalog::batch_step(&fx.path("app"), "dev");
    let built = build_layout(&step, &out.path().join("bs")).unwrap();
    assert_eq!(built.reference, "ironmesh/batch-step:dev");
    let (_, config, _) = open_layout(&out.path().join("bs"), &built);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/batch-step"])
    );
}

#[test]
fn static_check_tells_dynamic_from_static() {
    // Test binaries are ordinary dynamically linked executables.
    let me = std::env::current_exe().unwrap();
    let err = check_static(&me).unwrap_err();
    assert!(err.to_string().contains("program interpreter"), "{err}");
    let fx = Fixture::new();
    let err = check_static(&fx.path("conf.json")).unwrap_err();
    assert!(err.to_string().contains("not an ELF file"), "{err}");
}
