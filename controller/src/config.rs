//! Command-line flags and environment variables of `ironmesh-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ironmesh_daemon::LogFormat;

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
    /// Default: https://127.0.0.1:<port> when listening on all addresses.
    #[arg(long, env = "IRONMESH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Extra names or IP addresses for the controller's TLS certificate
    /// (repeat, or comma-separate in the variable). localhost, 127.0.0.1,
    /// the host name and the listen address are always included.
    #[arg(long = "tls-san", env = "IRONMESH_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,

    /// Bootstrap token agents present to join. Default: generated on first
    /// start and kept in <data-dir>/bootstrap-token.
    #[arg(long, env = "IRONMESH_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<String>,

    /// How often agents send heartbeats.
    #[arg(long, env = "IRONMESH_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// A node whose heartbeats stop for longer than this turns NotReady.
    #[arg(long, env = "IRONMESH_NODE_GRACE", default_value = "4s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,

    /// The block instance addresses come from; each node gets a
    /// `--node-cidr-prefix` part of it on first contact.
    #[arg(long, env = "IRONMESH_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    pub cluster_cidr: ironmesh_api::net::Ipv4Cidr,

    /// Prefix length of each node's pod CIDR (/24: 253 instances per node,
    /// 256 nodes in a /16).
    #[arg(long, env = "IRONMESH_NODE_CIDR_PREFIX", default_value_t = 24)]
    pub node_cidr_prefix: u8,

    /// Log format.
    #[arg(long, env = "IRONMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl ControllerConfig {
    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
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
        if let Some(t) = &self.bootstrap_token {
            if t.len() < 16 {
                return Err("--bootstrap-token must be at least 16 characters".into());
            }
        }
        if let Some(u) = &self.advertise_url {
            if !u.starts_with("https://") {
                return Err(format!("--advertise-url {u:?} must start with https://"));
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
