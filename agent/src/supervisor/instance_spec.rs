//! The container an instance gets: its [`InstanceSpec`] built from the
//! Workload spec and the image's run defaults.
//!
//! Command and args follow Kubernetes: `command` replaces the image's
//! entrypoint, `args` replace its cmd. Resources become cgroup limits
//! (cpu millicores, memory bytes); capabilities are added to the runtime's
//! default set. The labels let a restarted agent recognise its containers.

use std::collections::HashMap;

use crate::runtime::{BindMount, ImageDefaults, InstanceSpec, Resources};

use super::{DesiredInstance, LABEL_INSTANCE, LABEL_SPEC_GENERATION, LABEL_WORKLOAD};

/// The argv of the container, or empty for "the image's entrypoint + cmd".
pub fn argv(command: &[String], args: &[String], image: &ImageDefaults) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        // Nothing set: the runtime takes the image's entrypoint + cmd.
        (true, true) => Vec::new(),
        // Only args: they replace the cmd, the entrypoint stays.
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        // command set: the image's entrypoint and cmd are both ignored.
        (false, _) => command.iter().chain(args).cloned().collect(),
    }
}

/// The labels every instance container carries.
pub fn labels(d: &DesiredInstance) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_INSTANCE.to_string(), d.name.clone()),
        (LABEL_WORKLOAD.to_string(), d.workload.clone()),
        (
            LABEL_SPEC_GENERATION.to_string(),
            d.spec_generation.to_string(),
        ),
    ])
}

/// What one of `d`'s volume mounts needs from storage: the mount's name,
/// the volume, its size, backend and pool as the assignment binds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeNeed {
    pub mount: String,
    pub volume: String,
    pub size_bytes: u64,
    pub backend: String,
    pub pool: String,
}

/// The volumes `d` mounts, in `spec.volumes` order. A mount the
/// assignment does not bind to this node is an error naming it (running
/// without it would write the data to the wrong place).
pub fn volume_needs(d: &DesiredInstance) -> Result<Vec<VolumeNeed>, String> {
    d.spec
        .volumes
        .iter()
        .map(|m| {
            let v = d
                .volumes
                .iter()
                .find(|iv| iv.name == m.name)
                .and_then(|iv| iv.volume.as_ref())
                .filter(|v| v.name == m.volume)
                .ok_or_else(|| {
                    format!(
                        "volume {} (spec.volumes {}) is not bound to this node",
                        m.volume, m.name
                    )
                })?;
            Ok(VolumeNeed {
                mount: m.name.clone(),
                volume: v.name.clone(),
                size_bytes: v.size_bytes,
                backend: v.backend.clone(),
                pool: v.pool.clone(),
            })
        })
        .collect()
}

/// The bind mounts of `d`'s volumes, given where each volume is provisioned
/// on the host (by volume name).
pub fn bind_mounts(
    d: &DesiredInstance,
    paths: &HashMap<String, std::path::PathBuf>,
) -> Result<Vec<BindMount>, String> {
    d.spec
        .volumes
        .iter()
        .map(|m| {
            let source = paths
                .get(&m.volume)
                .ok_or_else(|| format!("volume {} is not provisioned on this node", m.volume))?;
            Ok(BindMount {
                source: source.clone(),
                destination: m.mount_path.clone(),
                readonly: m.read_only,
            })
        })
        .collect()
}

/// The runtime spec of `d`'s container. Errors are the operator's to fix
/// in the Workload (a sentence naming the field).
pub fn instance_spec(d: &DesiredInstance, image: &ImageDefaults) -> Result<InstanceSpec, String> {
    let w = &d.spec;
    let cpu_millis = w
        .resources
        .cpu_millis()
        .map_err(|e| format!("resources.cpu: {e}"))?;
    let memory_bytes = w
        .resources
        .memory_bytes()
        .map_err(|e| format!("resources.memory: {e}"))?;
    let mut spec = InstanceSpec::new(&d.name, &w.image);
    spec.args = argv(&w.command, &w.args, image);
    spec.env = w
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    spec.cwd = w.working_dir.clone();
    spec.resources = Resources {
        cpu_millis: Some(cpu_millis),
        memory_bytes: Some(memory_bytes),
    };
    spec.readonly_rootfs = w.read_only_root_filesystem;
    spec.pids_limit = Some(w.resources.pids_limit());
    if let Some(sc) = &w.security_context {
        spec.run_as_user = sc.run_as_user;
        spec.run_as_group = sc.run_as_group;
        spec.run_as_non_root = sc.run_as_non_root;
        spec.seccomp_unconfined =
            sc.seccomp_profile == ironmesh_api::workload::SeccompProfile::Unconfined;
    }
    spec.cap_add = w
        .capabilities
        .as_ref()
        .map(|c| c.add.clone())
        .unwrap_or_default();
    spec.labels = labels(d);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_api::workload::WorkloadSpec;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn desired(json: serde_json::Value) -> DesiredInstance {
        DesiredInstance {
            queue_dir: None,
            name: "web-1".into(),
            workload: "web".into(),
            spec_generation: 7,
            spec: serde_json::from_value::<WorkloadSpec>(json).unwrap(),
            image_digest: String::new(),
            volumes: Vec::new(),
        }
    }

    #[test]
    fn command_and_args_follow_kubernetes() {
        let image = ImageDefaults {
            entrypoint: s(&["/entry"]),
            cmd: s(&["--default"]),
            ..Default::default()
        };
        assert!(argv(&[], &[], &image).is_empty());
        assert_eq!(argv(&[], &s(&["-x"]), &image), s(&["/entry", "-x"]));
        assert_eq!(argv(&s(&["/bin/sh"]), &[], &image), s(&["/bin/sh"]));
        assert_eq!(
            argv(&s(&["/bin/sh"]), &s(&["-c", "true"]), &image),
            s(&["/bin/sh", "-c", "true"])
        );
    }

    #[test]
    fn spec_carries_resources_env_caps_and_labels() {
        let d = desired(serde_json::json!({
            "image": "busybox:1",
            "command": ["/bin/sh"],
            "env": [{"name": "A", "value": "1"}],
            "workingDir": "/tmp",
            "resources": {"cpu": "250m", "memory": "64Mi"},
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN"]},
        }));
        let spec = instance_spec(&d, &ImageDefaults::default()).unwrap();
        assert_eq!(spec.id, "web-1");
        assert_eq!(spec.image, "busybox:1");
        assert_eq!(spec.args, s(&["/bin/sh"]));
        assert_eq!(spec.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(spec.resources.cpu_millis, Some(250));
        assert_eq!(spec.resources.memory_bytes, Some(64 << 20));
        assert!(spec.readonly_rootfs);
        assert_eq!(spec.cap_add, s(&["NET_ADMIN"]));
        assert_eq!(spec.pids_limit, Some(4096));
        assert!(!spec.seccomp_unconfined && !spec.run_as_non_root);
        assert_eq!(spec.labels[LABEL_INSTANCE], "web-1");
        assert_eq!(spec.labels[LABEL_WORKLOAD], "web");
        assert_eq!(spec.labels[LABEL_SPEC_GENERATION], "7");
    }

    #[test]
    fn volumes_need_a_binding_and_become_bind_mounts() {
        use ironmesh_proto::v1::{InstanceVolume, VolumeAssignment};
        let mut d = desired(serde_json::json!({
            "image": "busybox:1",
            "volumes": [{"name": "d", "volume": "data", "mountPath": "/data", "readOnly": true}],
        }));
        let err = volume_needs(&d).unwrap_err();
        assert_eq!(
            err,
            "volume data (spec.volumes d) is not bound to this node"
        );
        d.volumes.push(InstanceVolume {
            name: "d".into(),
            volume: Some(VolumeAssignment {
                name: "data".into(),
                size_bytes: 16 << 20,
                backend: "file".into(),
                pool: "default".into(),
            }),
            mount_path: "/data".into(),
            read_only: true,
        });
        let needs = volume_needs(&d).unwrap();
        assert_eq!(needs[0].volume, "data");
        assert_eq!(needs[0].size_bytes, 16 << 20);
        let paths = HashMap::from([("data".to_string(), std::path::PathBuf::from("/v/data"))]);
        let mounts = bind_mounts(&d, &paths).unwrap();
        assert_eq!(
            mounts,
            vec![BindMount {
                source: "/v/data".into(),
                destination: "/data".into(),
                readonly: true
            }]
        );
        assert!(bind_mounts(&d, &HashMap::new()).is_err());
    }
}
