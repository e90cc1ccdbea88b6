//! `imctl registry login`: a credential for the controller's OCI registry,
//! written where skopeo, podman and buildah look for one.
//!
//! The credential comes from `CreateRegistryCredential` (as the operator of
//! the imctl config, so it carries that operator's role) and goes into the
//! containers `auth.json` (containers-auth.json(5)) under the registry's
//! `host:port`; other entries of the file are kept. With `--cert-dir`, the
//! cluster CA (`ca.crt`) is written there too, so clients trust the
//! registry's certificate (`skopeo --cert-dir`, or
//! `/etc/containers/certs.d/<host:port>/`); `--client-cert` adds the
//! operator's certificate and key for mutual TLS instead of a token.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use clap::Subcommand;
use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::CreateRegistryCredentialRequest;

use crate::client;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Get a registry credential and write it into auth.json.
    Login {
        /// The registry's host:port (the controller's --registry-listen).
        registry: String,
        /// The auth file to update. Default: $REGISTRY_AUTH_FILE, else
        /// $XDG_RUNTIME_DIR/containers/auth.json, else
        /// /run/containers/0/auth.json for root, else
        /// ~/.config/containers/auth.json.
        #[arg(long)]
        authfile: Option<PathBuf>,
        /// Also write the cluster CA as ca.crt into this directory.
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// With --cert-dir: also write the operator's client.cert and
        /// client.key there (mutual TLS; no token needed).
        #[arg(long, requires = "cert_dir")]
        client_cert: bool,
        /// How long the credential is valid (at most 365d).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

pub async fn run(
    cfg: &ClientConfig,
    command: RegistryCommand,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Login {
            registry,
            authfile,
            cert_dir,
            client_cert,
            ttl,
        } => {
            check_host(&registry)?;
            let path = authfile.unwrap_or_else(default_authfile);
            let mut api = client::connect(cfg).await?;
            let cred = api
                .create_registry_credential(CreateRegistryCredentialRequest {
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            write_auth(&path, &registry, &cred.username, &cred.password)?;
            if let Some(dir) = &cert_dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                write(
                    &dir.join("ca.crt"),
                    cfg.certificate_authority_data.as_bytes(),
                    0o644,
                )?;
                if client_cert {
                    write(
                        &dir.join("client.cert"),
                        cfg.client_certificate_data.as_bytes(),
                        0o644,
                    )?;
                    write(
                        &dir.join("client.key"),
                        cfg.client_key_data.as_bytes(),
                        0o600,
                    )?;
                }
            }
            println!(
                "logged in to {registry} as {} (credential valid until {}); wrote {}",
                cred.username,
                time::OffsetDateTime::from_unix_timestamp(cred.expires_unix)
                    .ok()
                    .and_then(|t| t
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok())
                    .unwrap_or_else(|| cred.expires_unix.to_string()),
                path.display()
            );
            Ok(())
        }
    }
}

fn check_host(registry: &str) -> anyhow::Result<()> {
    if registry.is_empty()
        || registry.contains('/')
        || registry.contains("://")
        || registry.chars().any(char::is_whitespace)
    {
        bail!("registry {registry:?} must be host:port, e.g. 10.0.0.1:5000 (no scheme or path)");
    }
    Ok(())
}

fn default_authfile() -> PathBuf {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("containers/auth.json");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/containers/0/auth.json");
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".config/containers/auth.json"),
        None => PathBuf::from(format!("/run/containers/{uid}/auth.json")),
    }
}

/// Adds `registry` with `user:password` to the auth file at `path`,
/// keeping everything else in it.
fn write_auth(path: &Path, registry: &str, user: &str, password: &str) -> anyhow::Result<()> {
    let mut doc: serde_json::Value = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is not JSON; fix or remove it", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let obj = doc
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", path.display()))?;
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths = auths
        .as_object_mut()
        .with_context(|| format!("{}: auths is not an object", path.display()))?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    auths.insert(registry.to_string(), serde_json::json!({ "auth": auth }));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write(path, serde_json::to_string_pretty(&doc)?.as_bytes(), 0o600)
}

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    ironmesh_process::write_file_atomic(path, data, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn auth_file_keeps_other_registries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/auth.json");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            &p,
            r#"{"auths":{"other:1":{"auth":"eA=="}},"credHelpers":{}}"#,
        )
        .unwrap();
        write_auth(&p, "127.0.0.1:5000", "ed", "imrc.1.2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["auths"]["other:1"]["auth"], "eA==");
        let a = v["auths"]["127.0.0.1:5000"]["auth"].as_str().unwrap();
        let raw = base64::engine::general_purpose::STANDARD.decode(a).unwrap();
        assert_eq!(raw, b"ed:imrc.1.2");
        assert!(v.get("credHelpers").is_some());
        assert!(check_host("https://x").is_err());
        assert!(check_host("x:1/p").is_err());
        assert!(check_host("127.0.0.1:5000").is_ok());
    }
}
