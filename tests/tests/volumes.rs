//! End-to-end test of volumes: a Volume bound to a node's pool, mounted
//! into instances by the agent, data kept across instances and restarts,
//! usage reported, quota enforced, deletion refused while mounted and
//! the data removed once the Volume is deleted.
//!
//! The agent's pool is the directory (`type=dir`) the harness gives every
//! agent, `<agent dir>/pool` (volumes are ext4 image files there). A guard
//! unmounts whatever is left mounted below the agent's directory when the
//! test ends, also on panic; loop devices go with their mounts
//! (autoclear).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ironmesh_tests::{
    instances, push_image, str_at, wait_for, Agent, Controller, ControllerOpts, Unmounter,
};
use serde_json::Value;

const BATCH: &str = "ironmesh/batch-step:dev";
const MIB: u64 = 1 << 20;

/// Waits until the workload has exactly one instance, Succeeded, and
/// returns it.
fn wait_succeeded(ctl: &Controller, workload: &str, not: Option<&str>) -> Value {
    wait_for(
        &format!("{workload}: one instance Succeeded"),
        Duration::from_secs(60),
        || {
            let list = instances(ctl, workload);
            if let [i] = list.as_slice() {
                if str_at(i, "/status/phase") == "Failed" {
                    panic!("{workload} failed: {i:#}");
                }
                if str_at(i, "/status/phase") == "Succeeded"
                    && Some(str_at(i, "/metadata/name")) != not
                {
                    return Some(i.clone());
                }
            }
            None
        },
    )
}

fn step(name: &str, args: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: {BATCH}
  args: {args}
  restartPolicy: OnFailure
  env:
    - name: STORAGE_PATH
      value: /data
  resources:
    cpu: 100m
    memory: 32Mi
  volumes:
    - name: d
      volume: data
      mountPath: /data
"
    )
}

fn fill(path: &Path, bytes: u64) -> (u64, Option<std::io::Error>) {
    let mut f = std::fs::File::create(path).expect("create");
    let chunk = vec![0x5au8; MIB as usize];
    let mut written = 0;
    while written < bytes {
        if let Err(e) = f.write_all(&chunk) {
            return (written, Some(e));
        }
        written += MIB;
    }
    match f.sync_all() {
        Ok(()) => (written, None),
        Err(e) => (written, Some(e)),
    }
}

#[test]
fn volume_is_bound_mounted_kept_across_instances_reported_limited_and_deleted() {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "node-a");
    let cleanup = Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    push_image(&ctl, "batch-step");

    // The pool is reported and the Volume is bound to it.
    let node = wait_for("node-a reports its pool", Duration::from_secs(20), || {
        ctl.node("node-a")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    assert_eq!(str_at(&node, "/status/storage/pools/0/name"), "default");
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1\nkind: Volume\nmetadata:\n  name: data\nspec:\n  size: 16Mi\n",
    );
    let vol = wait_for("volume data Bound", Duration::from_secs(20), || {
        let v = ctl.imctl_json(&["get", "volume", "data"]);
        (str_at(&v, "/status/phase") == "Bound").then_some(v)
    });
    assert_eq!(str_at(&vol, "/status/node"), "node-a");
    assert_eq!(str_at(&vol, "/status/pool"), "default");
    assert_eq!(str_at(&vol, "/status/backend"), "file");
    let image = agent.dir.path().join("pool/data.ext4");
    let host_path = agent.state_dir().join("storage/volumes/data");
    wait_for(
        "agent provisioned the image",
        Duration::from_secs(20),
        || image.exists().then_some(()),
    );

    // An instance writes to it.
    ctl.apply_yaml(&step("writer", "[]"));
    let writer = wait_succeeded(&ctl, "writer", None);
    assert_eq!(str_at(&writer, "/spec/node"), "node-a");
    assert_eq!(
        std::fs::read_to_string(host_path.join("step-0.txt")).unwrap(),
        "index=0 replicas=1\n"
    );
    let out = ctl.imctl(&["delete", "workload", "writer"]);
    assert!(out.status.success());

    // Another instance (another container) finds the data.
    ctl.apply_yaml(&step("checker", "[\"--check\", \"1\"]"));
    let first = wait_succeeded(&ctl, "checker", None);
    assert_eq!(str_at(&first, "/spec/node"), "node-a");
    // Deleting the instance: the controller recreates it on the same node
    // (where the volume is) and the data is still there.
    let first_name = str_at(&first, "/metadata/name").to_string();
    let out = ctl.imctl(&["delete", "instance", &first_name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = wait_succeeded(&ctl, "checker", Some(&first_name));
    assert_eq!(str_at(&second, "/spec/node"), "node-a");

    // Usage is reported (periodically, every 10 s by default).
    let (_, err) = fill(&host_path.join("four"), 4 * MIB);
    assert!(err.is_none(), "{err:?}");
    let vol = wait_for("volume usage reported", Duration::from_secs(30), || {
        let v = ctl.imctl_json(&["get", "volume", "data"]);
        v.pointer("/status/usageBytes")
            .and_then(Value::as_u64)
            .filter(|u| *u >= 4 * MIB)
            .map(|_| v)
    });
    eprintln!(
        "volume status: {}",
        serde_json::to_string(&vol["status"]).unwrap()
    );

    // Quota: a write beyond the size fails with ENOSPC (through the same
    // mount the containers bind).
    let (written, err) = fill(&host_path.join("big"), 32 * MIB);
    let err = err.expect("writing beyond the volume size must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written < 16 * MIB);
    std::fs::remove_file(host_path.join("big")).unwrap();

    // Deleting a volume that a workload mounts is refused, naming it.
    let out = ctl.imctl(&["delete", "volume", "data"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workload checker"), "{stderr}");

    // Once nothing mounts it, deleting it removes the data on the node.
    let out = ctl.imctl(&["delete", "workload", "checker"]);
    assert!(out.status.success());
    wait_for("checker instances gone", Duration::from_secs(30), || {
        let v = ctl.imctl_json(&["get", "instances"]);
        let n = v
            .get("items")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0);
        (n == 0).then_some(())
    });
    wait_for("volume deletable", Duration::from_secs(30), || {
        ctl.imctl(&["delete", "volume", "data"])
            .status
            .success()
            .then_some(())
    });
    wait_for("image removed on the node", Duration::from_secs(30), || {
        (!image.exists() && !host_path.exists()).then_some(())
    });
    assert!(
        cleanup.below().is_empty(),
        "left mounted: {:?}",
        cleanup.below()
    );
    drop(agent);
    drop(cleanup);
}

/// A controller started on a store restored from a backup taken before a
/// Volume existed sends the node an assignment without it: the agent keeps
/// the data, the Node says which volumes are orphaned (condition and
/// event), a Volume of that name pinned to the node adopts the data again,
/// and only deleting that Volume removes it.
#[test]
fn a_restored_store_never_wipes_volume_data() {
    let mut ctl = Controller::start(ControllerOpts::default());
    // The harness gives the agent a pool of its own, `<agent dir>/pool`.
    let agent = Agent::start(&ctl, "node-a");
    let cleanup = Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    push_image(&ctl, "batch-step");
    wait_for("node-a reports its pool", Duration::from_secs(20), || {
        ctl.node("node-a")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });

    // The backup: the store as it is now, before the Volume.
    let store = ctl.data_dir().join("store.redb");
    let backup = ctl.dir.path().join("backup.redb");
    ctl.proc.kill9();
    std::fs::copy(&store, &backup).expect("back up the store");
    ctl.start_again("controller-2.log");

    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1\nkind: Volume\nmetadata:\n  name: data\nspec:\n  size: 16Mi\n",
    );
    let image = agent.dir.path().join("pool/data.ext4");
    let host_path = agent.state_dir().join("storage/volumes/data");
    ctl.apply_yaml(&step("writer", "[]"));
    wait_succeeded(&ctl, "writer", None);
    let written = host_path.join("step-0.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "index=0 replicas=1\n"
    );
    assert!(ctl
        .imctl(&["delete", "workload", "writer"])
        .status
        .success());
    wait_for("writer instances gone", Duration::from_secs(30), || {
        instances(&ctl, "writer").is_empty().then_some(())
    });

    // Restore the backup: the cluster no longer knows the Volume.
    ctl.proc.kill9();
    std::fs::copy(&backup, &store).expect("restore the store");
    ctl.start_again("controller-3.log");
    let node = wait_for("node-a: VolumesOrphaned", Duration::from_secs(60), || {
        ctl.node("node-a").filter(|n| {
            n.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        str_at(c, "/type") == "VolumesOrphaned" && str_at(c, "/status") == "True"
                    })
                })
        })
    });
    let cond = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| str_at(c, "/type") == "VolumesOrphaned")
        .unwrap()
        .clone();
    assert_eq!(cond["volumes"], serde_json::json!(["data"]), "{cond:#}");
    assert!(str_at(&cond, "/message").contains("data"), "{cond:#}");
    let out = ctl.imctl(&["describe", "node", "node-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("VolumesOrphaned"), "{text}");
    assert!(
        text.contains("VolumeOrphaned"),
        "describe shows the event:\n{text}"
    );
    // The data is still there, on the node.
    assert!(image.exists());
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "index=0 replicas=1\n"
    );

    // Adopt it: a Volume of that name pinned to the node finds the data.
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1\nkind: Volume\nmetadata:\n  name: data\nspec:\n  size: 16Mi\n  node: node-a\n",
    );
    ctl.apply_yaml(&step("checker", "[\"--check\", \"1\"]"));
    let checked = wait_succeeded(&ctl, "checker", None);
    assert_eq!(str_at(&checked, "/spec/node"), "node-a");
    wait_for("orphan condition cleared", Duration::from_secs(30), || {
        ctl.node("node-a").filter(|n| {
            n.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        str_at(c, "/type") == "VolumesOrphaned" && str_at(c, "/status") == "False"
                    })
                })
        })
    });

    // Deleting the Volume is what removes the data.
    assert!(ctl
        .imctl(&["delete", "workload", "checker"])
        .status
        .success());
    wait_for("checker instances gone", Duration::from_secs(30), || {
        instances(&ctl, "checker").is_empty().then_some(())
    });
    wait_for("volume deletable", Duration::from_secs(30), || {
        ctl.imctl(&["delete", "volume", "data"])
            .status
            .success()
            .then_some(())
    });
    wait_for("image removed on the node", Duration::from_secs(30), || {
        (!image.exists() && !host_path.exists()).then_some(())
    });
    // A new Volume of the name binds again once the old data is gone.
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1\nkind: Volume\nmetadata:\n  name: data\nspec:\n  size: 16Mi\n",
    );
    wait_for("new volume Bound", Duration::from_secs(30), || {
        let v = ctl.imctl_json(&["get", "volume", "data"]);
        (str_at(&v, "/status/phase") == "Bound").then_some(())
    });
    wait_for(
        "new volume provisioned empty",
        Duration::from_secs(30),
        || (image.exists() && host_path.exists()).then_some(()),
    );
    assert!(!written.exists(), "the new volume starts empty");
    drop(agent);
    drop(cleanup);
}
