//! First-start and every-start preparation of the data directory: the
//! cluster CA, the bootstrap token, the controller's server certificate and
//! the names for the controller's serving certificate and the first
//! operator's client config (`admin.yaml`).
//!
//! The bootstrap token is kept in `<data-dir>/bootstrap-token` for
//! automation; the server records it once as a join token that expires
//! (`--bootstrap-token-ttl`, see [`crate::tokens`]), and registers the
//! certificate of `admin.yaml` as operator `admin` with role admin
//! ([`crate::authz`]).

use std::path::{Path, PathBuf};

use ironmesh_api::client_config::ClientConfig;

use crate::config::ControllerConfig;
use crate::pki::{write_private, ClusterCa, Identity, PkiError};

/// Name of the operator whose credential is issued at first start.
pub const FIRST_OPERATOR: &str = "admin";

pub struct Credentials {
    pub ca: ClusterCa,
    pub bootstrap_token: String,
    /// Names and addresses the serving certificate is issued for (it is
    /// issued, and renewed, by [`crate::serving_tls`]).
    pub server_sans: Vec<String>,
    pub admin_config: PathBuf,
    /// The client certificate in `admin.yaml`, if it is readable.
    pub admin_cert_pem: Option<String>,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write admin config: {0}")]
    Encode(String),
}

/// The CA and bootstrap token when several controllers share them through
/// the store (see `ha::shared_secrets`), instead of files in the data dir.
pub struct SharedCredentials {
    pub ca: ClusterCa,
    pub bootstrap_token: String,
}

pub fn prepare(
    cfg: &ControllerConfig,
    shared: Option<SharedCredentials>,
) -> Result<Credentials, BootstrapError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| BootstrapError::Io {
        action: "create",
        path: dir.clone(),
        source,
    })?;
    let token_file = dir.join("bootstrap-token");
    let (ca, bootstrap_token) = match shared {
        Some(s) => {
            // Only the public half goes to disk: agents and imctl need it,
            // the key stays sealed in the store.
            std::fs::create_dir_all(dir.join("pki")).map_err(|source| BootstrapError::Io {
                action: "create",
                path: dir.join("pki"),
                source,
            })?;
            crate::pki::write_public(&dir.join("pki/ca.crt"), s.ca.cert_pem().as_bytes())?;
            write_private(&token_file, format!("{}\n", s.bootstrap_token).as_bytes())?;
            (s.ca, s.bootstrap_token)
        }
        None => {
            let (ca, created) = ClusterCa::load_or_create(&dir.join("pki"))?;
            if created {
                tracing::info!(path = %dir.join("pki/ca.crt").display(), "created cluster CA");
            }
            let token = match &cfg.bootstrap_token {
                Some(t) => {
                    write_private(&token_file, format!("{t}\n").as_bytes())?;
                    t.clone()
                }
                None => load_or_create_token(&token_file)?,
            };
            (ca, token)
        }
    };

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    if !cfg.listen.ip().is_unspecified() {
        sans.push(cfg.listen.ip().to_string());
    }
    if let Some(host) = url_host(&cfg.advertise_url()) {
        sans.push(host);
    }
    sans.extend(cfg.tls_sans.iter().cloned());
    sans.sort();
    sans.dedup();

    let admin_config = dir.join("admin.yaml");
    if !admin_config.exists() {
        let (cert, key) = ca.issue(&Identity::Operator(FIRST_OPERATOR.into()), &[], false)?;
        let mut conf = ClientConfig::new(
            cfg.advertise_url(),
            ca.cert_pem().to_string(),
            FIRST_OPERATOR.into(),
            cert,
            key,
        );
        conf.registry = registry_for_imctl(cfg);
        let yaml =
            serde_norway::to_string(&conf).map_err(|e| BootstrapError::Encode(e.to_string()))?;
        write_private(&admin_config, yaml.as_bytes())?;
        tracing::info!(path = %admin_config.display(), "wrote operator credential for imctl");
    }
    let admin_cert_pem = std::fs::read_to_string(&admin_config)
        .ok()
        .and_then(|t| serde_norway::from_str::<ClientConfig>(&t).ok())
        .map(|c| c.client_certificate_data);
    Ok(Credentials {
        ca,
        bootstrap_token,
        server_sans: sans,
        admin_config,
        admin_cert_pem,
        token_file,
    })
}

fn load_or_create_token(path: &Path) -> Result<String, BootstrapError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BootstrapError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let token = new_token();
    write_private(path, format!("{token}\n").as_bytes())?;
    tracing::info!(path = %path.display(), "created bootstrap token");
    Ok(token)
}

/// A fresh random bootstrap token (a join token, `imt.<id>.<secret>`).
pub fn new_token() -> String {
    crate::tokens::generate()
}

/// The registry address `admin.yaml` names for `imctl image push`, when
/// imctl's default (the server's host, port 5000) would miss it.
fn registry_for_imctl(cfg: &ControllerConfig) -> Option<String> {
    let listen = cfg.registry_listen?;
    let advertised = url_host(&cfg.advertise_url());
    let host = if listen.ip().is_unspecified() {
        advertised.clone()?
    } else {
        listen.ip().to_string()
    };
    if listen.port() == 5000 && advertised.as_deref() == Some(host.as_str()) {
        return None;
    }
    Some(if host.contains(':') {
        format!("[{host}]:{}", listen.port())
    } else {
        format!("{host}:{}", listen.port())
    })
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let hostport = rest.split('/').next()?;
    let host = if let Some(h) = hostport.strip_prefix('[') {
        h.split(']').next()?
    } else {
        hostport
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(hostport)
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_host_handles_ports_and_ipv6() {
        assert_eq!(
            url_host("https://10.0.0.1:7443").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("https://ctl.example:7443/").as_deref(),
            Some("ctl.example")
        );
        assert_eq!(url_host("https://[::1]:7443").as_deref(), Some("::1"));
        assert_eq!(url_host("http://x"), None);
    }

    #[test]
    fn token_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bootstrap-token");
        let a = load_or_create_token(&p).unwrap();
        let b = load_or_create_token(&p).unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("imt.") && a.len() > 40);
    }

    #[test]
    fn admin_config_names_the_registry_only_when_the_default_would_miss_it() {
        use clap::Parser;
        let with = |args: &[&str]| {
            let mut all = vec![
                "ironmesh-controller",
                "--advertise-url",
                "https://10.0.0.1:7443",
            ];
            all.extend(args);
            registry_for_imctl(&ControllerConfig::parse_from(all))
        };
        assert_eq!(with(&[]), None);
        assert_eq!(with(&["--registry-listen", "0.0.0.0:5000"]), None);
        assert_eq!(
            with(&["--registry-listen", "0.0.0.0:5001"]).as_deref(),
            Some("10.0.0.1:5001")
        );
        assert_eq!(
            with(&["--registry-listen", "10.0.0.2:5000"]).as_deref(),
            Some("10.0.0.2:5000")
        );
        assert_eq!(
            with(&["--registry-listen", "[fd00::2]:5000"]).as_deref(),
            Some("[fd00::2]:5000")
        );
    }
}
