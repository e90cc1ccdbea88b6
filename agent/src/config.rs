//! Command-line flags and environment variables of `ironmesh-agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ironmesh_process::LogFormat;

/// The Ironmesh node agent: discovers this host, joins the controller over
/// mutual TLS and keeps it informed.
///
/// First start: needs --controller, --ca-cert and a bootstrap token. Later
/// starts reuse the identity kept in --state-dir.
#[derive(Debug, Clone, Parser)]
#[command(name = "ironmesh-agent", version)]
pub struct AgentConfig {
    /// Controller URL, https://host:port, or several comma-separated (all
    /// controllers of one cluster): the agent streams to one and fails over
    /// to the next when it goes away.
    #[arg(long, env = "IRONMESH_CONTROLLER", value_delimiter = ',', required = true, num_args = 1..)]
    pub controller: Vec<String>,

    /// The cluster CA certificate (the controller's `<data-dir>/pki/ca.crt`),
    /// needed to verify the controller at first join.
    #[arg(long, env = "IRONMESH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Bootstrap token for the first join.
    #[arg(
        long,
        env = "IRONMESH_BOOTSTRAP_TOKEN",
        hide_env_values = true,
        conflicts_with = "bootstrap_token_file"
    )]
    pub bootstrap_token: Option<String>,

    /// File holding the bootstrap token (preferred over the flag: it stays
    /// out of the process list). Read only at the first join: once the
    /// node has its certificate the file may be deleted (the Ansible role
    /// does).
    #[arg(long, env = "IRONMESH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,

    /// This node's name (a DNS label). Default: the host name, lowercased.
    #[arg(long, env = "IRONMESH_NODE_NAME")]
    pub node_name: Option<String>,

    /// Name the controller's certificate must carry, if not the host in
    /// --controller.
    #[arg(long, env = "IRONMESH_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Where the agent keeps its identity and what it has created.
    #[arg(
        long,
        env = "IRONMESH_STATE_DIR",
        default_value = "/var/lib/ironmesh/agent"
    )]
    pub state_dir: PathBuf,

    /// Address of the Prometheus endpoint (`/metrics`, `/healthz`).
    #[arg(
        long,
        env = "IRONMESH_METRICS_LISTEN",
        default_value = "127.0.0.1:7481"
    )]
    pub metrics_listen: SocketAddr,

    /// The IPv4 address other nodes route this node's instances through.
    /// Default: the address of the default route's interface, else of the
    /// first physical NIC.
    #[arg(long, env = "IRONMESH_NODE_IP")]
    pub node_ip: Option<std::net::Ipv4Addr>,

    /// How instance traffic reaches other nodes: `direct` (routes via each
    /// node's address; the nodes share an L2 segment) or `vxlan`
    /// (encapsulated; any IP path between nodes — lower --instance-mtu to
    /// the underlay MTU minus 50).
    #[arg(
        long,
        env = "IRONMESH_CROSS_HOST",
        value_enum,
        default_value = "direct"
    )]
    pub cross_host: CrossHost,

    /// VXLAN network identifier (with --cross-host vxlan).
    #[arg(long, env = "IRONMESH_VXLAN_VNI", default_value_t = 4242)]
    pub vxlan_vni: u32,

    /// MTU of each instance's veth pair.
    #[arg(long, env = "IRONMESH_INSTANCE_MTU", default_value_t = 1500)]
    pub instance_mtu: u32,

    /// Deliver packets between two instances of this node straight to the
    /// destination (`bpf_redirect_peer`, skipping the host's forwarding
    /// path). `false`: the host routes them, so its netfilter FORWARD
    /// chain and a capture on the destination's host veth see them.
    #[arg(
        long,
        env = "IRONMESH_DATAPATH_PEER_REDIRECT",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub datapath_peer_redirect: bool,

    /// Run the node proxy: mTLS (HBONE) between mesh instances on
    /// different hosts (docs/mesh.md). `false`: this node's instances stay
    /// out of the mesh (plaintext), whatever their Workload says.
    #[arg(
        long,
        env = "IRONMESH_MESH",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub mesh: bool,

    /// bpffs directory the datapath pins its programs, maps and links in.
    /// Default: `/sys/fs/bpf/ironmesh/<containerd-namespace>`.
    #[arg(long, env = "IRONMESH_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// cgroup v2 directory the Service load balancer (connect4, sendmsg4,
    /// recvmsg4) attaches to: every process below it has Service VIPs
    /// balanced. The root of the unified hierarchy by default.
    #[arg(
        long,
        env = "IRONMESH_DATAPATH_CGROUP",
        default_value = "/sys/fs/cgroup/unified"
    )]
    pub datapath_cgroup: PathBuf,

    /// containerd's gRPC socket. containerd 1.6 or 1.7 (Debian 12 ships
    /// 1.6.20) with runc and the overlayfs snapshotter.
    #[arg(
        long,
        env = "IRONMESH_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,

    /// The containerd namespace this agent keeps its images, containers
    /// and tasks in; nothing outside it is touched.
    #[arg(
        long,
        env = "IRONMESH_CONTAINERD_NAMESPACE",
        default_value = "ironmesh"
    )]
    pub containerd_namespace: String,

    /// First delay before restarting an exited container; doubles per
    /// consecutive restart.
    #[arg(long, env = "IRONMESH_RESTART_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub restart_backoff: Duration,

    /// Longest delay between restarts.
    #[arg(long, env = "IRONMESH_RESTART_BACKOFF_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    pub restart_backoff_max: Duration,

    /// How long a stopping container gets between SIGTERM and SIGKILL.
    #[arg(long, env = "IRONMESH_STOP_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,

    /// Size of one container log file (stdout or stderr of an instance)
    /// before it is rotated, e.g. `10Mi`, `512Ki`.
    #[arg(long, env = "IRONMESH_LOG_MAX_SIZE", default_value = "10Mi", value_parser = parse_log_size)]
    pub log_max_size: u64,

    /// Log files kept per stream and instance, the live one included.
    #[arg(long, env = "IRONMESH_LOG_MAX_FILES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub log_max_files: u32,

    /// A storage pool volumes are allocated from; repeat the flag for
    /// several (the first is the default). Format:
    /// `name=NAME,type=dir|btrfs|device|loopfile,path=PATH[,size=SIZE][,fs=btrfs|ext4][,mkfs=true]`
    /// — see docs/storage.md. In the environment, separate pools with ';'.
    #[arg(
        long = "storage-pool",
        env = "IRONMESH_STORAGE_POOLS",
        value_delimiter = ';'
    )]
    pub storage_pools: Vec<String>,

    /// How often pool capacity and volume usage are reported (and
    /// volumes reconciled with the assignment).
    #[arg(long, env = "IRONMESH_STORAGE_REPORT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub storage_report_interval: Duration,

    /// Log format.
    #[arg(long, env = "IRONMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

/// `--cross-host` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CrossHost {
    Direct,
    Vxlan,
}

/// The default node name: the kernel host name, lowercased, with anything
/// outside a DNS label replaced by '-'.
pub fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "node".to_string()
    } else {
        name
    }
}

/// A log size such as `10Mi` or `1048576`: at least 4 KiB.
fn parse_log_size(s: &str) -> Result<u64, String> {
    let bytes = ironmesh_api::quantity::Quantity::from(s)
        .bytes()
        .map_err(|e| format!("{s:?}: {e}"))?;
    if bytes < 4096 {
        return Err(format!("{s:?} is below the 4Ki minimum"));
    }
    Ok(bytes)
}
