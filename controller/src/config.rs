//! Command-line flags and environment variables of `ironmesh-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ironmesh_process::LogFormat;

/// The Ironmesh controller: desired state, placement, PKI and the gRPC API.
///
/// On first start it creates the cluster CA, a bootstrap token for agents
/// (`<data-dir>/bootstrap-token`) and the first operator's client config
/// (`<data-dir>/admin.yaml`, for `imctl`).
#[derive(Debug, Clone, Parser)]
#[command(name = "ironmesh-controller", version)]
pub struct ControllerConfig {
    /// Address of the gRPC API (agents and operators), served over TLS.
    #[arg(long, env = "IRONMESH_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,

    /// Address of the OCI registry (Distribution Spec v1.1, for skopeo,
    /// podman, crane…), served over HTTPS with the controller's serving
    /// certificate. Off unless given. See docs/registry.md.
    #[arg(long, env = "IRONMESH_REGISTRY_LISTEN")]
    pub registry_listen: Option<SocketAddr>,

    /// Address of the web UI (docs/ui.md), served over HTTPS with the
    /// controller's serving certificate; sign in with `imctl ui`. Empty
    /// turns it off.
    #[arg(long, env = "IRONMESH_UI_LISTEN", default_value = "127.0.0.1:7444")]
    pub ui_listen: String,

    /// Blobs and untagged manifests nothing refers to are collected only
    /// once they are older than this, so an upload whose manifest is
    /// still to come is never lost.
    #[arg(long, env = "IRONMESH_IMAGE_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub image_gc_grace: Duration,

    /// How often the image store collects garbage by itself (0: only on
    /// `imctl image gc` and `imctl image rm`).
    #[arg(long, env = "IRONMESH_IMAGE_GC_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub image_gc_interval: Duration,

    /// The mesh mode of Workloads that do not set spec.mesh.mode: off,
    /// permissive or strict. Default: strict on a cluster created by this
    /// version, permissive on one created before the mesh (recorded in the
    /// store at first start, so every controller agrees).
    #[arg(long, env = "IRONMESH_MESH_DEFAULT_MODE")]
    pub mesh_default_mode: Option<ironmesh_api::workload::MeshMode>,

    /// The SPIFFE trust domain of workload certificates
    /// (`spiffe://<trust-domain>/workload/<name>`).
    #[arg(long, env = "IRONMESH_TRUST_DOMAIN", default_value = "ironmesh.local")]
    pub trust_domain: String,

    /// How long workload certificates are valid; agents renew them at half
    /// of it.
    #[arg(long, env = "IRONMESH_WORKLOAD_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub workload_cert_lifetime: Duration,

    /// Address of the Prometheus endpoint (`/metrics`, `/healthz`), plain HTTP.
    #[arg(
        long,
        env = "IRONMESH_METRICS_LISTEN",
        default_value = "127.0.0.1:7480"
    )]
    pub metrics_listen: SocketAddr,

    /// Directory for the store, the CA and the credentials it issues.
    #[arg(
        long,
        env = "IRONMESH_DATA_DIR",
        default_value = "/var/lib/ironmesh/controller"
    )]
    pub data_dir: PathBuf,

    /// Address written into admin.yaml for imctl (`https://host:port`).
    /// Default: `https://127.0.0.1:<port>` when listening on all addresses.
    #[arg(long, env = "IRONMESH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Extra names or IP addresses for the controller's TLS certificate
    /// (repeat, or comma-separate in the variable). localhost, 127.0.0.1,
    /// the host name and the listen address are always included.
    #[arg(long = "tls-san", env = "IRONMESH_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,

    /// Bootstrap token agents present to join. Default: generated on first
    /// start and kept in `<data-dir>/bootstrap-token`. Either way it is
    /// recorded once as a join token that expires after
    /// --bootstrap-token-ttl; make more with `imctl token create`.
    #[arg(long, env = "IRONMESH_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<String>,

    /// How long the bootstrap token (the first join token) is valid,
    /// counted from the first start that recorded it; also the default
    /// lifetime of `imctl token create` (at most 365 days).
    #[arg(long, env = "IRONMESH_BOOTSTRAP_TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub bootstrap_token_ttl: Duration,

    /// Refused joins (wrong, expired or used-up token, an existing node's
    /// name) allowed from one source address per --join-failure-window;
    /// past that every join from the address is refused until the window
    /// ends. 0 turns the limit off.
    #[arg(long, env = "IRONMESH_JOIN_FAILURE_LIMIT", default_value_t = 10)]
    pub join_failure_limit: u32,

    /// See --join-failure-limit.
    #[arg(long, env = "IRONMESH_JOIN_FAILURE_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    pub join_failure_window: Duration,

    /// Lifetime of node certificates (signed at join and at each renewal;
    /// agents renew two thirds into it). A node offline past its expiry
    /// must be deleted and join again.
    #[arg(long, env = "IRONMESH_NODE_CERT_LIFETIME", default_value = "30d", value_parser = humantime::parse_duration)]
    pub node_cert_lifetime: Duration,

    /// Lifetime of the controller's own serving certificate. It is issued
    /// at every start and renewed two thirds into its lifetime while the
    /// controller runs; agents and imctl trust the CA, so nothing
    /// reconnects.
    #[arg(long, env = "IRONMESH_SERVING_CERT_LIFETIME", default_value = "90d", value_parser = humantime::parse_duration)]
    pub serving_cert_lifetime: Duration,

    /// How often agents send heartbeats.
    #[arg(long, env = "IRONMESH_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Most heartbeats per second from all nodes together: past
    /// that many × `--heartbeat-interval` nodes, agents are told a longer
    /// interval (whole seconds) and `--node-grace` grows with it, e.g. 10 s
    /// and 40 s at 1,000 nodes with the defaults.
    #[arg(long, env = "IRONMESH_MAX_HEARTBEATS_PER_SECOND", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_heartbeats_per_second: u32,

    /// A node whose heartbeats stop for longer than this turns NotReady
    /// (at `--heartbeat-interval`; see `--max-heartbeats-per-second`).
    #[arg(long, env = "IRONMESH_NODE_GRACE", default_value = "4s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,

    /// A node NotReady for longer than this loses its instances that mount
    /// no volume there: they are replaced on Ready nodes.
    #[arg(long, env = "IRONMESH_EVICTION_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub eviction_delay: Duration,

    /// Share of all nodes (0–1) that may be NotReady before eviction
    /// pauses: past it, a partition or a stalled store would otherwise
    /// restart every workload.
    #[arg(
        long,
        env = "IRONMESH_EVICTION_UNHEALTHY_THRESHOLD",
        default_value_t = 0.5
    )]
    pub eviction_unhealthy_threshold: f64,

    /// Most nodes whose instances are evicted per second.
    #[arg(long, env = "IRONMESH_EVICTION_RATE", default_value_t = 1.0)]
    pub eviction_rate: f64,

    /// CPU kept back on every node for the agent, containerd and the OS;
    /// the scheduler places instances in allocatable minus this.
    #[arg(long, env = "IRONMESH_RESERVE_CPU", default_value = "100m", value_parser = ironmesh_api::quantity::parse_cpu_millis)]
    pub reserve_cpu: u64,

    /// Memory kept back on every node (see --reserve-cpu).
    #[arg(long, env = "IRONMESH_RESERVE_MEMORY", default_value = "256Mi", value_parser = ironmesh_api::quantity::parse_bytes)]
    pub reserve_memory: u64,

    /// The block instance addresses come from; each node gets a
    /// `--node-cidr-prefix` part of it on first contact.
    #[arg(long, env = "IRONMESH_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    pub cluster_cidr: ironmesh_api::net::Ipv4Cidr,

    /// The block Service virtual IPs come from.
    #[arg(long, env = "IRONMESH_SERVICE_CIDR", default_value = "10.96.0.0/16")]
    pub service_cidr: ironmesh_api::net::Ipv4Cidr,

    /// Prefix length of each node's pod CIDR (/24: 253 instances per node,
    /// 256 nodes in a /16).
    #[arg(long, env = "IRONMESH_NODE_CIDR_PREFIX", default_value_t = 24)]
    pub node_cidr_prefix: u8,

    /// Where desired state lives: `embedded` (one file,
    /// `<data-dir>/store.redb`; one controller) or etcd, as
    /// `etcd://host:2379,host2:2379` (plain) or `etcds://host:2379,…` (TLS),
    /// for several controllers with one elected leader. See
    /// docs/high-availability.md.
    #[arg(long, env = "IRONMESH_STORE", default_value = "embedded")]
    pub store: String,

    /// CA certificate (PEM) that signed etcd's serving certificates; turns
    /// on TLS to etcd.
    #[arg(long, env = "IRONMESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's `--client-cert-auth`; needs
    /// --etcd-key.
    #[arg(long, env = "IRONMESH_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "IRONMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// Key prefix of everything Ironmesh keeps in etcd.
    #[arg(long, env = "IRONMESH_ETCD_PREFIX", default_value = "/ironmesh/")]
    pub etcd_prefix: String,

    /// Embedded store: events of history kept for watches to resume from
    /// (each a whole object); older revisions are trimmed.
    #[arg(long, env = "IRONMESH_STORE_HISTORY_EVENTS", default_value_t = crate::store::embedded::DEFAULT_HISTORY_LIMIT)]
    pub store_history_events: usize,

    /// Embedded store: bytes of history kept (e.g. 64Mi); older revisions
    /// are trimmed when either this or --store-history-events is exceeded.
    #[arg(long, env = "IRONMESH_STORE_HISTORY_BYTES", default_value = "64Mi", value_parser = ironmesh_api::quantity::parse_bytes)]
    pub store_history_bytes: u64,

    /// Revisions of history kept in etcd for watches to resume from; the
    /// controllers compact older ones. 0 leaves compaction to etcd.
    #[arg(long, env = "IRONMESH_ETCD_HISTORY", default_value_t = 50_000)]
    pub etcd_history: u64,

    /// With etcd: file with the 32-byte key (64 hex characters, e.g.
    /// `openssl rand -hex 32`) that seals the shared CA key and bootstrap
    /// token in etcd. Every controller of a cluster needs the same one.
    #[arg(long, env = "IRONMESH_CA_KEY_FILE")]
    pub ca_key_file: Option<PathBuf>,

    /// With etcd: TTL of the controller's etcd lease. A leader that dies is
    /// replaced after about this long; too short and a slow etcd costs
    /// spurious leader changes.
    #[arg(long, env = "IRONMESH_LEADER_TTL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub leader_ttl: Duration,

    /// Log format.
    #[arg(long, env = "IRONMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl ControllerConfig {
    /// `--ui-listen` as an address; `None` when it is empty (UI off).
    pub fn ui_addr(&self) -> Result<Option<SocketAddr>, String> {
        let v = self.ui_listen.trim();
        if v.is_empty() {
            return Ok(None);
        }
        v.parse()
            .map(Some)
            .map_err(|e| format!("--ui-listen {v:?}: {e} (host:port, or empty to turn the UI off)"))
    }

    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.ui_addr()?;
        if self.store_history_events == 0 {
            return Err("--store-history-events must be at least 1".into());
        }
        if self.store_history_bytes < 1 << 20 {
            return Err(format!(
                "--store-history-bytes must be at least 1Mi, got {} bytes",
                self.store_history_bytes
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be greater than zero".into());
        }
        if self.node_grace <= self.heartbeat_interval {
            return Err(format!(
                "--node-grace ({}) must be longer than --heartbeat-interval ({})",
                humantime::format_duration(self.node_grace),
                humantime::format_duration(self.heartbeat_interval)
            ));
        }
        crate::ipam::Ipam::new(self.cluster_cidr, self.node_cidr_prefix)?;
        if self.service_cidr.overlaps(&self.cluster_cidr) {
            return Err(format!(
                "--service-cidr {} overlaps --cluster-cidr {}",
                self.service_cidr, self.cluster_cidr
            ));
        }
        if let Some(t) = &self.bootstrap_token {
            if t.len() < 16 {
                return Err("--bootstrap-token must be at least 16 characters".into());
            }
        }
        if self.bootstrap_token_ttl.is_zero() || self.bootstrap_token_ttl > crate::tokens::MAX_TTL {
            return Err("--bootstrap-token-ttl must be between 1s and 365 days".into());
        }
        if self.join_failure_limit > 0 && self.join_failure_window.is_zero() {
            return Err("--join-failure-window must be greater than zero".into());
        }
        if self.node_cert_lifetime < Duration::from_secs(60)
            || self.node_cert_lifetime > crate::tokens::MAX_TTL * 10
        {
            return Err("--node-cert-lifetime must be between 1m and 10 years".into());
        }
        if !(0.0..=1.0).contains(&self.eviction_unhealthy_threshold) {
            return Err(format!(
                "--eviction-unhealthy-threshold must be between 0 and 1 (a share of the nodes), got {}",
                self.eviction_unhealthy_threshold
            ));
        }
        if !(self.eviction_rate > 0.0 && self.eviction_rate.is_finite()) {
            return Err(format!(
                "--eviction-rate must be a positive number of nodes per second, got {}",
                self.eviction_rate
            ));
        }
        if self.serving_cert_lifetime < Duration::from_secs(60)
            || self.serving_cert_lifetime > crate::tokens::MAX_TTL * 10
        {
            return Err("--serving-cert-lifetime must be between 1m and 10 years".into());
        }
        if self
            .registry_listen
            .is_some_and(|r| r == self.listen && r.port() != 0)
        {
            return Err("--registry-listen must differ from --listen".into());
        }
        if self.workload_cert_lifetime < Duration::from_secs(30)
            || self.workload_cert_lifetime > Duration::from_secs(30 * 86400)
        {
            return Err("--workload-cert-lifetime must be between 30s and 30 days".into());
        }
        if self.trust_domain.is_empty()
            || !self
                .trust_domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        {
            return Err(format!(
                "--trust-domain {:?} must be lowercase letters, digits, '.' and '-'",
                self.trust_domain
            ));
        }
        if let Some(u) = &self.advertise_url {
            if !u.starts_with("https://") {
                return Err(format!("--advertise-url {u:?} must start with https://"));
            }
        }
        match crate::store::etcd::EtcdConfig::endpoints_from_spec(&self.store) {
            Some(Err(e)) => return Err(e),
            Some(Ok(_)) => {
                if self.ca_key_file.is_none() {
                    return Err("--store etcd needs --ca-key-file (the key that seals the \
                                shared cluster CA in etcd; the same file on every controller)"
                        .into());
                }
                if self.leader_ttl < Duration::from_secs(2) {
                    return Err("--leader-ttl must be at least 2s".into());
                }
            }
            None if self.store == "embedded" => {}
            None => {
                return Err(format!(
                    "--store {:?}: use `embedded` or etcd://host:port[,host:port…] \
                     (etcds:// for TLS)",
                    self.store
                ))
            }
        }
        Ok(())
    }

    /// The URL operators and agents use to reach this controller.
    pub fn advertise_url(&self) -> String {
        if let Some(u) = &self.advertise_url {
            return u.clone();
        }
        let ip = if self.listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            self.listen.ip().to_string()
        };
        format!("https://{ip}:{}", self.listen.port())
    }
}
