//! The OCI runtime spec of one instance.
//!
//! This module owns what a container is allowed to do: its process (args,
//! env, cwd, user), its resource limits (cpu quota and shares from
//! millicores, memory limit — written to the linux resources so runc puts
//! them in the instance's cgroup at `cgroupsPath`), its root filesystem
//! (optionally read-only), its privileges (`noNewPrivileges`, a small
//! default capability set plus requested adds minus requested drops,
//! Docker's default seccomp allow-list unless unconfined, a pids limit,
//! masked and read-only kernel paths as runc's defaults) and its mounts
//! and namespaces.
//!
//! Network: with [`InstanceSpec::netns`] set, the container joins that
//! network namespace (the agent creates it with the instance's veth). With
//! none, the spec has no network namespace entry and the container
//! **shares the network namespace of containerd** (on a host, the host's
//! network) — fine for tests and host-network services, not for isolation.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};

/// OCI runtime spec version written into every spec (runc 1.1 speaks 1.0.2).
pub const OCI_VERSION: &str = "1.0.2";
/// CFS period used for cpu limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CFS quota the kernel accepts, in microseconds.
pub const CPU_QUOTA_MIN_US: u64 = 1_000;
/// `PATH` given to processes when neither the image nor the instance sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities every container keeps unless it drops them.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
];

/// Every capability name the kernel knows (as of Linux 6.x).
const KNOWN_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Kernel paths hidden from containers (containerd's and runc's defaults).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Kernel paths containers may read but not write (containerd's defaults).
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A numeric user and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// Resource limits of one instance; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// CPU in millicores (1000 = one core): CFS quota over a 100 ms period,
    /// and proportional shares.
    pub cpu_millis: Option<u64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
}

/// A host path mounted into the container (volumes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

/// What the agent wants to run for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Container id: containerd identifier rules (alphanumerics joined by
    /// single `.`, `_`, `-`; at most 76 characters).
    pub id: String,
    /// Image name as imported into containerd.
    pub image: String,
    /// Full argv; empty means the image's entrypoint + cmd.
    pub args: Vec<String>,
    /// Environment, applied over the image's (same key: the instance wins).
    pub env: Vec<(String, String)>,
    /// Working directory; `None` means the image's, else `/`.
    pub cwd: Option<String>,
    /// User; `None` means the image's numeric user, else root.
    pub user: Option<User>,
    /// Replaces the uid of `user` (or of the image's user).
    pub run_as_user: Option<u32>,
    /// Replaces the gid of `user` (or of the image's user).
    pub run_as_group: Option<u32>,
    /// Refuse to build a spec whose process runs as uid 0.
    pub run_as_non_root: bool,
    /// Without a seccomp filter; `false` applies Docker's default profile.
    pub seccomp_unconfined: bool,
    /// Most tasks in the container's cgroup (`pids.max`); `None` is unlimited.
    pub pids_limit: Option<u32>,
    pub resources: Resources,
    pub readonly_rootfs: bool,
    /// Capabilities added to [`DEFAULT_CAPABILITIES`] (`NET_ADMIN` or `CAP_NET_ADMIN`).
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set (`ALL` drops every one).
    pub cap_drop: Vec<String>,
    /// Network namespace to join; `None` shares containerd's.
    pub netns: Option<PathBuf>,
    /// Hostname; `None` means the id (cut to 63 characters).
    pub hostname: Option<String>,
    pub mounts: Vec<BindMount>,
    /// containerd labels of the container (for adoption after a restart).
    pub labels: HashMap<String, String>,
}

impl InstanceSpec {
    pub fn new(id: impl Into<String>, image: impl Into<String>) -> Self {
        InstanceSpec {
            id: id.into(),
            image: image.into(),
            ..Default::default()
        }
    }
}

/// The run defaults an image's config carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// The image's `User`, as written (`uid`, `uid:gid`, or a name).
    pub user: Option<String>,
}

/// Why a spec cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no command: neither the instance args nor the image entrypoint/cmd give one")]
    NoCommand,
    #[error("environment variable name {0:?} is empty or contains '=' or NUL")]
    BadEnvName(String),
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("cpu must be at least 1 millicore")]
    ZeroCpu,
    #[error("memory limit must be at least 1 byte")]
    ZeroMemory,
    #[error("{what} {path:?} must be an absolute path")]
    NotAbsolute { what: &'static str, path: String },
    #[error("image user {0:?} is not numeric (uid or uid:gid); set the instance user instead")]
    UserName(String),
    #[error("cgroups path {0:?} must be absolute")]
    CgroupsPath(String),
    #[error("securityContext.runAsNonRoot is set but the process would run as uid 0 ({0}); set securityContext.runAsUser to a non-zero uid or use an image with a non-root USER")]
    RunsAsRoot(String),
    #[error("pids limit must be at least 1")]
    ZeroPids,
}

/// Builds the OCI runtime spec (as JSON) of `instance`, using `image` for
/// what the instance leaves unset, with its cgroup at `cgroups_path`.
pub fn build(
    instance: &InstanceSpec,
    image: &ImageDefaults,
    cgroups_path: &str,
) -> Result<Value, SpecError> {
    if !cgroups_path.starts_with('/') {
        return Err(SpecError::CgroupsPath(cgroups_path.to_string()));
    }
    let args = if instance.args.is_empty() {
        image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect()
    } else {
        instance.args.clone()
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let env = merge_env(&image.env, &instance.env)?;
    let cwd = instance
        .cwd
        .clone()
        .or_else(|| image.working_dir.clone().filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(SpecError::NotAbsolute {
            what: "working directory",
            path: cwd,
        });
    }
    let mut user = match instance.user {
        Some(user) => user,
        None => parse_user(image.user.as_deref())?,
    };
    if let Some(uid) = instance.run_as_user {
        user.uid = uid;
    }
    if let Some(gid) = instance.run_as_group {
        user.gid = gid;
    }
    if instance.run_as_non_root && user.uid == 0 {
        let from = if instance.run_as_user.is_some() {
            "securityContext.runAsUser is 0".to_string()
        } else if instance.user.is_some() {
            "the instance user is 0".to_string()
        } else {
            match image
                .user
                .as_deref()
                .map(str::trim)
                .filter(|u| !u.is_empty())
            {
                Some(u) => format!("the image's USER is {u:?}"),
                None => "the image names no USER".to_string(),
            }
        };
        return Err(SpecError::RunsAsRoot(from));
    }
    let caps = capabilities(&instance.cap_add, &instance.cap_drop)?;
    let hostname = instance
        .hostname
        .clone()
        .unwrap_or_else(|| instance.id.chars().take(63).collect());

    let mut mounts = default_mounts();
    for m in &instance.mounts {
        if !m.destination.starts_with('/') {
            return Err(SpecError::NotAbsolute {
                what: "mount destination",
                path: m.destination.clone(),
            });
        }
        if !m.source.is_absolute() {
            return Err(SpecError::NotAbsolute {
                what: "mount source",
                path: m.source.display().to_string(),
            });
        }
        let mut options = vec!["rbind", "rprivate"];
        options.push(if m.readonly { "ro" } else { "rw" });
        mounts.push(json!({
            "destination": m.destination,
            "type": "bind",
            "source": m.source,
            "options": options,
        }));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if let Some(path) = &instance.netns {
        if !path.is_absolute() {
            return Err(SpecError::NotAbsolute {
                what: "network namespace",
                path: path.display().to_string(),
            });
        }
        namespaces.push(json!({"type": "network", "path": path}));
    }

    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
    });
    if let Some(millis) = instance.resources.cpu_millis {
        if millis == 0 {
            return Err(SpecError::ZeroCpu);
        }
        let (quota, shares) = cpu_limits(millis);
        resources["cpu"] = json!({
            "quota": quota,
            "period": CPU_PERIOD_US,
            "shares": shares,
        });
    }
    if let Some(bytes) = instance.resources.memory_bytes {
        if bytes == 0 {
            return Err(SpecError::ZeroMemory);
        }
        resources["memory"] = json!({ "limit": bytes });
    }
    if let Some(pids) = instance.pids_limit {
        if pids == 0 {
            return Err(SpecError::ZeroPids);
        }
        resources["pids"] = json!({ "limit": pids });
    }

    let mut spec = json!({
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": false,
            "user": {"uid": user.uid, "gid": user.gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": instance.readonly_rootfs},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    if !instance.seccomp_unconfined {
        spec["linux"]["seccomp"] = super::seccomp::default_profile(&caps);
    }
    Ok(spec)
}

/// CFS quota (µs per [`CPU_PERIOD_US`]) and cpu shares for `millis`
/// millicores. The quota is raised to the kernel's 1 ms minimum.
pub fn cpu_limits(millis: u64) -> (i64, u64) {
    let quota = (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(CPU_QUOTA_MIN_US);
    let shares = (millis.saturating_mul(1024) / 1000).max(2);
    (i64::try_from(quota).unwrap_or(i64::MAX), shares)
}

/// The capability set: defaults, plus adds, minus drops. Names are
/// accepted with or without `CAP_`, in any case.
pub fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<String>, SpecError> {
    let normalize = |name: &String| -> Result<String, SpecError> {
        let upper = name.trim().to_ascii_uppercase();
        if upper == "ALL" {
            return Ok(upper);
        }
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        if KNOWN_CAPABILITIES.contains(&full.as_str()) {
            Ok(full)
        } else {
            Err(SpecError::UnknownCapability(name.clone()))
        }
    };
    let drop: Vec<String> = drop.iter().map(normalize).collect::<Result<_, _>>()?;
    let add: Vec<String> = add.iter().map(normalize).collect::<Result<_, _>>()?;
    let mut caps: Vec<String> = if drop.iter().any(|c| c == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for cap in add {
        if cap == "ALL" {
            caps = KNOWN_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        } else if !caps.contains(&cap) {
            caps.push(cap);
        }
    }
    Ok(caps)
}

fn merge_env(image: &[String], instance: &[(String, String)]) -> Result<Vec<String>, SpecError> {
    // First-seen order; a later value replaces an earlier one in place.
    let mut env: Vec<(String, String)> = Vec::new();
    fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        }
    }
    for entry in image {
        let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        if !key.is_empty() {
            set(&mut env, key, value);
        }
    }
    for (key, value) in instance {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(SpecError::BadEnvName(key.clone()));
        }
        set(&mut env, key, value);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        set(&mut env, "PATH", DEFAULT_PATH);
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

fn parse_user(user: Option<&str>) -> Result<User, SpecError> {
    let Some(user) = user.map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(User::default());
    };
    let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = uid
        .parse()
        .map_err(|_| SpecError::UserName(user.to_string()))?;
    let gid: u32 = if gid.is_empty() {
        uid
    } else {
        gid.parse()
            .map_err(|_| SpecError::UserName(user.to_string()))?
    };
    Ok(User { uid, gid })
}

fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> InstanceSpec {
        let mut i = InstanceSpec::new("web-1", "example/web:1");
        i.args = vec!["/bin/web".into(), "--port=80".into()];
        i
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn process_args_env_cwd() {
        let mut i = instance();
        i.env = vec![
            ("MODE".into(), "prod".into()),
            ("HOME".into(), "/srv".into()),
        ];
        i.cwd = Some("/srv".into());
        let image = ImageDefaults {
            env: vec!["HOME=/root".into(), "PATH=/bin".into()],
            ..Default::default()
        };
        let s = build(&i, &image, "/ironmesh/ns/web-1").unwrap();
        let p = &s["process"];
        assert_eq!(strings(&p["args"]), ["/bin/web", "--port=80"]);
        assert_eq!(strings(&p["env"]), ["HOME=/srv", "PATH=/bin", "MODE=prod"]);
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["terminal"], false);
        assert_eq!(p["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(s["ociVersion"], OCI_VERSION);
        assert_eq!(s["hostname"], "web-1");
        assert_eq!(s["root"], json!({"path": "rootfs", "readonly": false}));
    }

    #[test]
    fn image_defaults_fill_gaps() {
        let mut i = instance();
        i.args.clear();
        let image = ImageDefaults {
            entrypoint: vec!["/bin/busybox".into()],
            cmd: vec!["sleep".into(), "5".into()],
            env: vec![],
            working_dir: Some("/data".into()),
            user: Some("1000:2000".into()),
        };
        let s = build(&i, &image, "/p/web-1").unwrap();
        assert_eq!(
            strings(&s["process"]["args"]),
            ["/bin/busybox", "sleep", "5"]
        );
        assert_eq!(s["process"]["cwd"], "/data");
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 2000}));
        assert_eq!(
            strings(&s["process"]["env"]),
            [format!("PATH={DEFAULT_PATH}")]
        );

        let named = ImageDefaults {
            user: Some("nobody".into()),
            ..image.clone()
        };
        assert_eq!(
            build(&i, &named, "/p/x"),
            Err(SpecError::UserName("nobody".into()))
        );
        i.user = Some(User { uid: 7, gid: 7 });
        assert!(build(&i, &named, "/p/x").is_ok());

        let mut none = instance();
        none.args.clear();
        assert_eq!(
            build(&none, &ImageDefaults::default(), "/p/x"),
            Err(SpecError::NoCommand)
        );
    }

    #[test]
    fn cpu_and_memory_land_in_linux_resources() {
        let mut i = instance();
        i.resources = Resources {
            cpu_millis: Some(250),
            memory_bytes: Some(64 << 20),
        };
        let s = build(&i, &ImageDefaults::default(), "/ironmesh/ns/web-1").unwrap();
        let linux = &s["linux"];
        assert_eq!(linux["cgroupsPath"], "/ironmesh/ns/web-1");
        assert_eq!(
            linux["resources"]["cpu"],
            json!({"quota": 25_000, "period": 100_000, "shares": 256})
        );
        assert_eq!(linux["resources"]["memory"], json!({"limit": 64 << 20}));
        assert_eq!(
            linux["resources"]["devices"],
            json!([{"allow": false, "access": "rwm"}])
        );

        assert_eq!(cpu_limits(1000), (100_000, 1024));
        assert_eq!(cpu_limits(2500), (250_000, 2560));
        assert_eq!(cpu_limits(1), (1_000, 2));

        let unlimited = build(&instance(), &ImageDefaults::default(), "/x").unwrap();
        assert!(unlimited["linux"]["resources"].get("cpu").is_none());
        assert!(unlimited["linux"]["resources"].get("memory").is_none());

        i.resources.cpu_millis = Some(0);
        assert_eq!(
            build(&i, &ImageDefaults::default(), "/x"),
            Err(SpecError::ZeroCpu)
        );
        assert_eq!(
            build(&instance(), &ImageDefaults::default(), "relative"),
            Err(SpecError::CgroupsPath("relative".into()))
        );
    }

    #[test]
    fn capabilities_default_add_drop() {
        let s = build(&instance(), &ImageDefaults::default(), "/x").unwrap();
        let caps = &s["process"]["capabilities"];
        assert_eq!(strings(&caps["bounding"]), DEFAULT_CAPABILITIES);
        assert_eq!(caps["effective"], caps["bounding"]);
        assert_eq!(caps["permitted"], caps["bounding"]);
        assert!(caps.get("ambient").is_none());
        assert!(caps.get("inheritable").is_none());

        let got = capabilities(
            &["net_admin".into(), "CAP_SYS_PTRACE".into(), "KILL".into()],
            &["CAP_CHOWN".into(), "setuid".into()],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "CAP_DAC_OVERRIDE",
                "CAP_FOWNER",
                "CAP_SETGID",
                "CAP_NET_BIND_SERVICE",
                "CAP_KILL",
                "CAP_NET_ADMIN",
                "CAP_SYS_PTRACE"
            ]
        );
        assert_eq!(
            capabilities(&["NET_BIND_SERVICE".into()], &["all".into()]).unwrap(),
            ["CAP_NET_BIND_SERVICE"]
        );
        assert_eq!(
            capabilities(&["CAP_FLY".into()], &[]),
            Err(SpecError::UnknownCapability("CAP_FLY".into()))
        );
    }

    #[test]
    fn mounts_namespaces_and_readonly_root() {
        let mut i = instance();
        i.readonly_rootfs = true;
        i.mounts.push(BindMount {
            source: "/var/lib/ironmesh/volumes/v1".into(),
            destination: "/data".into(),
            readonly: false,
        });
        let s = build(&i, &ImageDefaults::default(), "/x").unwrap();
        assert_eq!(s["root"]["readonly"], true);
        let mounts = s["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/data"
            ]
        );
        let sys = &mounts[5];
        assert!(strings(&sys["options"]).contains(&"ro".to_string()));
        assert_eq!(strings(&mounts[6]["options"]), ["rbind", "rprivate", "rw"]);

        // No netns: no network namespace entry, i.e. containerd's is shared.
        let types = |s: &Value| -> Vec<String> {
            s["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["type"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(types(&s), ["pid", "ipc", "uts", "mount"]);

        i.netns = Some("/var/run/netns/web-1".into());
        let s = build(&i, &ImageDefaults::default(), "/x").unwrap();
        assert_eq!(types(&s), ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(s["linux"]["namespaces"][4]["path"], "/var/run/netns/web-1");
        assert!(strings(&s["linux"]["maskedPaths"]).contains(&"/proc/kcore".to_string()));
        assert!(strings(&s["linux"]["readonlyPaths"]).contains(&"/proc/sys".to_string()));

        i.netns = Some("relative".into());
        assert!(matches!(
            build(&i, &ImageDefaults::default(), "/x"),
            Err(SpecError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn seccomp_pids_and_run_as() {
        let s = build(&instance(), &ImageDefaults::default(), "/x").unwrap();
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(s["linux"]["resources"].get("pids").is_none());
        let mut i = instance();
        i.seccomp_unconfined = true;
        i.pids_limit = Some(64);
        let s = build(&i, &ImageDefaults::default(), "/x").unwrap();
        assert!(s["linux"].get("seccomp").is_none());
        assert_eq!(s["linux"]["resources"]["pids"], json!({"limit": 64}));
        i.pids_limit = Some(0);
        assert_eq!(
            build(&i, &ImageDefaults::default(), "/x"),
            Err(SpecError::ZeroPids)
        );

        let image = ImageDefaults {
            user: Some("1000:2000".into()),
            ..Default::default()
        };
        let mut i = instance();
        i.run_as_group = Some(3000);
        i.run_as_non_root = true;
        let s = build(&i, &image, "/x").unwrap();
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 3000}));
        i.run_as_user = Some(0);
        let e = build(&i, &image, "/x").unwrap_err();
        assert!(
            e.to_string().contains("securityContext.runAsUser is 0"),
            "{e}"
        );
        let mut i = instance();
        i.run_as_non_root = true;
        let e = build(&i, &ImageDefaults::default(), "/x").unwrap_err();
        assert_eq!(e, SpecError::RunsAsRoot("the image names no USER".into()));
        i.run_as_user = Some(65534);
        let s = build(&i, &ImageDefaults::default(), "/x").unwrap();
        assert_eq!(s["process"]["user"], json!({"uid": 65534, "gid": 0}));
    }

    #[test]
    fn bad_env_is_refused() {
        let mut i = instance();
        i.env = vec![("A=B".into(), "c".into())];
        assert_eq!(
            build(&i, &ImageDefaults::default(), "/x"),
            Err(SpecError::BadEnvName("A=B".into()))
        );
    }
}
