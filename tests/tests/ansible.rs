//! The Ansible rollout, for real: `site.yml` installs a controller and two
//! agents on Debian machines that Ansible reaches over SSH on their own
//! addresses (systemd-nspawn hosts in network namespaces, see
//! `tests/ansible/testbed.sh`), the agents join and report Ready, a second
//! run changes nothing, the rolling agent upgrade keeps a running
//! instance's PID, `systemd-analyze verify` accepts the installed units, and
//! the uninstall playbook removes what the roles installed.
//!
//! Needs root, `debootstrap`, `systemd-container` and ansible-core +
//! ansible-lint in `/opt/ironmesh-ansible-venv` (or `$IRONMESH_ANSIBLE_VENV`);
//! `scripts/install-deps.sh` installs them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ironmesh_tests::{bin, bin_dir, images_dir, ready_status, wait_for};
use serde_json::Value;
use tempfile::TempDir;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn venv_bin(tool: &str) -> PathBuf {
    let venv = std::env::var_os("IRONMESH_ANSIBLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ironmesh-ansible-venv"));
    let p = venv.join("bin").join(tool);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh (it makes the Ansible venv)",
        p.display()
    );
    p
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Test hosts booted by `testbed.sh up`; `testbed.sh down` on drop stops
/// the machines and removes namespaces, bridge, mounts and cgroups, also
/// when the test fails.
struct Testbed {
    dir: TempDir,
    hosts: BTreeMap<String, String>,
}

impl Testbed {
    fn script() -> PathBuf {
        repo_root().join("tests/ansible/testbed.sh")
    }

    fn up(hosts: &[&str]) -> Testbed {
        let dir = tempfile::Builder::new()
            .prefix("im-testbed-")
            .tempdir()
            .expect("tempdir");
        let mut tb = Testbed {
            dir,
            hosts: BTreeMap::new(),
        };
        let out = Command::new("bash")
            .arg(Self::script())
            .arg("up")
            .arg(tb.dir.path())
            .args(hosts)
            .stdin(Stdio::null())
            .output()
            .expect("run testbed.sh");
        // Read what was created even on failure, so that drop cleans it up.
        let list = std::fs::read_to_string(tb.dir.path().join("hosts.list")).unwrap_or_default();
        for line in list.lines() {
            if let Some((h, a)) = line.split_once(' ') {
                tb.hosts.insert(h.to_string(), a.to_string());
            }
        }
        assert!(
            out.status.success(),
            "testbed.sh up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
        tb
    }

    fn addr(&self, host: &str) -> &str {
        &self.hosts[host]
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A file inside a host's root filesystem, seen from this machine.
    fn host_file(&self, host: &str, path: &str) -> PathBuf {
        self.path(&format!("hosts/{host}/root{path}"))
    }

    fn ssh(&self, host: &str, cmd: &str) -> Output {
        let args = std::fs::read_to_string(self.path("ssh_args")).expect("ssh_args");
        Command::new("ssh")
            .args(args.split_whitespace())
            .arg(format!("root@{}", self.addr(host)))
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh")
    }

    fn ssh_ok(&self, host: &str, cmd: &str) -> String {
        let out = self.ssh(host, cmd);
        assert!(
            out.status.success(),
            "on {host}: `{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An inventory shaped like the example one: one controller, agents.
    fn write_inventory(&self, controllers: &[&str], agents: &[&str]) -> PathBuf {
        let ssh_args = std::fs::read_to_string(self.path("ssh_args")).expect("ssh_args");
        let group = |hosts: &[&str]| {
            hosts
                .iter()
                .map(|h| format!("        {h}:\n          ansible_host: {}\n", self.addr(h)))
                .collect::<String>()
        };
        let inv = format!(
            "all:\n  vars:\n    ansible_user: root\n    ansible_ssh_common_args: \"{}\"\n    ironmesh_binary_dir: {}\n  children:\n    ironmesh_controllers:\n      hosts:\n{}    ironmesh_agents:\n      hosts:\n{}",
            ssh_args.trim(),
            bin_dir().display(),
            group(controllers),
            group(agents),
        );
        let p = self.path("inventory.yml");
        std::fs::write(&p, inv).expect("write inventory");
        p
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("down")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
    }
}

/// One playbook run: wall time, output, and the PLAY RECAP per host.
struct Run {
    took: Duration,
    log: String,
    recap: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Run {
    fn changed(&self) -> BTreeMap<&str, u32> {
        self.recap
            .iter()
            .map(|(h, c)| (h.as_str(), c.get("changed").copied().unwrap_or(0)))
            .collect()
    }
}

fn playbook(tb: &Testbed, inventory: &Path, name: &str, extra: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(venv_bin("ansible-playbook"));
    cmd.arg("-i")
        .arg(inventory)
        .arg(format!("ironmesh.platform.{name}"))
        .env("ANSIBLE_CONFIG", repo_root().join("ansible/ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", tb.path("ansible-tmp"))
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv_bin("ansible-playbook").parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null());
    for (k, v) in extra {
        cmd.arg("-e").arg(format!("{k}={v}"));
    }
    let start = Instant::now();
    let out = cmd.output().expect("run ansible-playbook");
    let took = start.elapsed();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(tb.path(&format!("{name}.log")), &log).ok();
    assert!(
        out.status.success(),
        "playbook {name} failed ({}):\n{}",
        out.status,
        tail(&log, 60)
    );
    // "node-a : ok=22 changed=0 unreachable=0 failed=0 ..."
    let mut recap = BTreeMap::new();
    let body = log.rsplit("PLAY RECAP").next().unwrap_or_default();
    for line in body.lines() {
        let Some((host, counts)) = line.split_once(" : ") else {
            continue;
        };
        let counts: BTreeMap<String, u32> = counts
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        recap.insert(host.trim().to_string(), counts);
    }
    assert!(!recap.is_empty(), "no PLAY RECAP in:\n{}", tail(&log, 40));
    for (h, c) in &recap {
        assert_eq!(c.get("failed"), Some(&0), "{h} failed in {name}");
        assert_eq!(c.get("unreachable"), Some(&0), "{h} unreachable in {name}");
    }
    Run { took, log, recap }
}

fn imctl(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("imctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run imctl")
}

fn imctl_json(config: &Path, args: &[&str]) -> Option<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = imctl(config, &a);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// (node, pid, reason) of the workload's one Running instance.
fn running_instance(config: &Path, workload: &str) -> Option<(String, u64, String)> {
    let list = imctl_json(config, &["get", "instances"])?;
    let inst = list["items"].as_array()?.iter().find(|i| {
        i.pointer("/spec/workload").and_then(Value::as_str) == Some(workload)
            && i.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
    })?;
    Some((
        inst.pointer("/spec/node")?.as_str()?.to_string(),
        inst.pointer("/status/pid")?.as_u64()?,
        inst.pointer("/status/reason")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    ))
}

const AGENTS: [&str; 2] = ["node-a", "node-b"];

#[test]
fn ansible_site_joins_agents_is_idempotent_and_rolling_upgrade_keeps_instances() {
    // The roles pass ansible-lint's production profile.
    let lint = Command::new(venv_bin("ansible-lint"))
        .args(["--profile", "production", "--nocolor"])
        .current_dir(repo_root().join("ansible"))
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv_bin("ansible-lint").parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("run ansible-lint");
    assert!(
        lint.status.success(),
        "ansible-lint --profile production failed:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let tb = Testbed::up(&["ctl", "node-a", "node-b"]);
    let inventory = tb.write_inventory(&["ctl"], &AGENTS);

    // First run: everything installed, agents joined and Ready (the role
    // waits for that itself).
    let first = playbook(&tb, &inventory, "site", &[]);
    assert!(
        first.changed().values().all(|&c| c > 0),
        "{:?}",
        first.recap
    );

    // The operator's credential, as written on the controller host; imctl
    // on this machine reaches the controller at its own address.
    let admin = tb.path("admin.yaml");
    std::fs::copy(
        tb.host_file("ctl", "/var/lib/ironmesh/controller/admin.yaml"),
        &admin,
    )
    .expect("admin.yaml on the controller host");
    for node in AGENTS {
        wait_for(&format!("{node} Ready"), Duration::from_secs(30), || {
            let n = imctl_json(&admin, &["get", "nodes", node])?;
            (ready_status(&n).as_deref() == Some("True")).then_some(())
        });
    }

    // Second run: nothing to do.
    let second = playbook(&tb, &inventory, "site", &[]);
    assert!(
        second.changed().values().all(|&c| c == 0),
        "the second run changed something: {:?}\n{}",
        second.recap,
        tail(&second.log, 80)
    );
    eprintln!(
        "ansible site.yml wall time: first run {:.1}s, idempotent run {:.1}s",
        first.took.as_secs_f64(),
        second.took.as_secs_f64()
    );

    // systemd accepts the installed units (binaries in place, as booted).
    for (host, units) in [
        ("ctl", "ironmesh-controller.service"),
        ("node-a", "ironmesh-agent.service ironmesh-bpffs.service"),
    ] {
        let out = tb.ssh(
            host,
            &format!("cd /etc/systemd/system && systemd-analyze verify {units}"),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("ironmesh"),
            "systemd-analyze verify {units} on {host}: {text}"
        );
    }
    assert_eq!(
        tb.ssh_ok("node-a", "findmnt -no FSTYPE /sys/fs/bpf"),
        "bpf",
        "bpffs mounted"
    );
    // The join token is gone from the host once the node has joined.
    assert_eq!(
        tb.ssh_ok(
            "node-a",
            "test -e /etc/ironmesh/bootstrap-token && echo present || echo absent"
        ),
        "absent"
    );

    // A workload on the hosts' containerd.
    let push = imctl(
        &admin,
        &[
            "image",
            "push",
            images_dir().join("records-server").to_str().unwrap(),
        ],
    );
    assert!(
        push.status.success(),
        "image push: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    let manifest = tb.path("records.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: records\nspec:\n  replicas: 1\n  image: ironmesh/records-server:dev\n  env:\n    - name: LISTEN_ADDR\n      value: 0.0.0.0:8080\n",
    )
    .unwrap();
    let apply = imctl(&admin, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        apply.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&apply.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (node, pid, _) = loop {
        if let Some(found) = running_instance(&admin, "records") {
            break found;
        }
        if std::time::Instant::now() > deadline {
            let out = imctl(&admin, &["describe", "workload", "records"]);
            panic!(
                "records not Running within 60s:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The PID is the host's (the machine's PID namespace): it runs there.
    assert_eq!(
        tb.ssh_ok(&node, &format!("cat /proc/{pid}/comm")),
        "records-server"
    );

    // A "new" agent build: the same binary with a marker appended (ELF
    // loaders ignore trailing bytes), so its checksum differs.
    let new_dir = tb.path("new-release");
    std::fs::create_dir_all(&new_dir).unwrap();
    let mut new_agent = std::fs::read(bin("ironmesh-agent")).unwrap();
    new_agent.extend_from_slice(b"\n# ironmesh rolling upgrade test\n");
    std::fs::write(new_dir.join("ironmesh-agent"), &new_agent).unwrap();
    std::fs::set_permissions(
        new_dir.join("ironmesh-agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let agent_pid = |host: &str| {
        tb.ssh_ok(
            host,
            "systemctl show --property=MainPID --value ironmesh-agent.service",
        )
    };
    let before: BTreeMap<&str, String> = AGENTS.iter().map(|h| (*h, agent_pid(h))).collect();

    let upgrade = playbook(
        &tb,
        &inventory,
        "upgrade_agents",
        &[("ironmesh_binary_dir", new_dir.to_str().unwrap())],
    );
    // One host at a time: node-a's batch finished before node-b's began.
    let a = upgrade
        .log
        .find("node-a: agent PID")
        .expect("node-a report");
    let b = upgrade
        .log
        .find("node-b: agent PID")
        .expect("node-b report");
    assert!(a < b, "hosts upgraded in order, one at a time");
    let new_sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&new_agent));
    for host in AGENTS {
        assert_ne!(agent_pid(host), before[host], "{host}'s agent restarted");
        let sum = tb.ssh_ok(host, "sha256sum /usr/local/bin/ironmesh-agent");
        assert!(sum.starts_with(&new_sum), "{host} runs the new agent");
    }
    // The instance was adopted, not restarted.
    let (node_after, pid_after, reason) =
        wait_for("records adopted", Duration::from_secs(30), || {
            running_instance(&admin, "records").filter(|(_, _, r)| r == "Adopted")
        });
    assert_eq!((node_after.as_str(), pid_after), (node.as_str(), pid));
    assert_eq!(reason, "Adopted");
    assert_eq!(
        tb.ssh_ok(&node, &format!("cat /proc/{pid}/comm")),
        "records-server"
    );
    eprintln!(
        "ansible upgrade_agents.yml: {:.1}s; instance PID {pid} on {node} kept",
        upgrade.took.as_secs_f64()
    );

    // Uninstall removes what the roles installed, containers included.
    playbook(&tb, &inventory, "uninstall", &[]);
    for host in AGENTS {
        let left = tb.ssh_ok(
            host,
            "ls /usr/local/bin /etc/systemd/system | grep -i ironmesh || true; \
             ls -d /etc/ironmesh /var/lib/ironmesh 2>/dev/null || true; \
             ls -A /var/lib/containerd; dpkg-query -W containerd runc 2>/dev/null || true; \
             pgrep -x records-server || true",
        );
        assert_eq!(left, "", "{host} still has: {left}");
    }
    let left = tb.ssh_ok(
        "ctl",
        "ls /usr/local/bin /etc/systemd/system | grep -i -e ironmesh -e imctl || true; \
         ls -d /etc/ironmesh /var/lib/ironmesh 2>/dev/null || true; getent passwd ironmesh || true",
    );
    assert_eq!(left, "", "ctl still has: {left}");
}
