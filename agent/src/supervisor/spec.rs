//! The container an instance gets: its [`InstanceSpec`] built from the
//! Workload spec and the image's run defaults.
//!
//! Command and args follow Kubernetes: `command` replaces the image's
//! entrypoint, `args` replace its cmd. Resources become cgroup limits
//! (cpu millicores, memory bytes); capabilities are added to the runtime's
//! default set. The labels let a restarted agent recognise its containers.

use std::collections::HashMap;

use crate::runtime::{ImageDefaults, InstanceSpec, Resources};

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

/// The runtime spec of `d`'s container. Errors are the operator's to fix
/// in the Workload (a sentence naming the field).
pub fn instance_spec(d: &DesiredInstance, image: &ImageDefaults) -> Result<InstanceSpec, String> {
    let w = &d.spec;
    if !w.volumes.is_empty() {
        // Running without them would write the data to the wrong place.
        return Err("volumes are not yet mounted by this agent; \
                    remove spec.volumes or run on an agent that supports them"
            .to_string());
    }
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
            name: "web-1".into(),
            workload: "web".into(),
            spec_generation: 7,
            spec: serde_json::from_value::<WorkloadSpec>(json).unwrap(),
            image_digest: String::new(),
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
        assert_eq!(spec.labels[LABEL_INSTANCE], "web-1");
        assert_eq!(spec.labels[LABEL_WORKLOAD], "web");
        assert_eq!(spec.labels[LABEL_SPEC_GENERATION], "7");
    }

    #[test]
    fn volumes_are_refused_not_ignored() {
        let d = desired(serde_json::json!({
            "image": "busybox:1",
            "volumes": [{"name": "d", "volume": "data", "mountPath": "/data"}],
        }));
        let err = instance_spec(&d, &ImageDefaults::default()).unwrap_err();
        assert!(err.contains("volumes"), "{err}");
    }
}
