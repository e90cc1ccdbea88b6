//! `imctl secret tls|generic`: make a Secret from files and literals and
//! apply it (the `kubectl create secret` habit), so keys never have to be
//! pasted into a manifest on disk.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::{ApplyRequest, Manifest};
use serde_json::json;

use crate::client;

#[derive(Subcommand)]
pub enum SecretCommand {
    /// A TLS Secret (tls.crt, tls.key) from PEM files, e.g. for a Gateway
    /// listener with `tls: {issuer: Secret, secretName: NAME}`.
    Tls {
        name: String,
        /// The certificate chain, leaf first (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        key: PathBuf,
    },
    /// An Opaque Secret from literals and files.
    Generic {
        name: String,
        /// An entry as NAME=VALUE (repeatable).
        #[arg(long = "from-literal", value_name = "NAME=VALUE")]
        literals: Vec<String>,
        /// An entry from a file: NAME=PATH, or PATH (named by its file name).
        #[arg(long = "from-file", value_name = "[NAME=]PATH")]
        files: Vec<String>,
    },
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The Secret manifest a command describes.
fn manifest(command: &SecretCommand) -> anyhow::Result<(String, serde_json::Value)> {
    let (name, ty, data) = match command {
        SecretCommand::Tls { name, cert, key } => {
            let mut data = BTreeMap::new();
            data.insert(ironmesh_api::secret::TLS_CERT.to_string(), read(cert)?);
            data.insert(ironmesh_api::secret::TLS_KEY.to_string(), read(key)?);
            (name, "TLS", data)
        }
        SecretCommand::Generic {
            name,
            literals,
            files,
        } => {
            let mut data = BTreeMap::new();
            for l in literals {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--from-literal {l:?}: expected NAME=VALUE"))?;
                if data.insert(k.to_string(), v.to_string()).is_some() {
                    bail!("entry {k:?} is given twice");
                }
            }
            for f in files {
                let (k, path) = match f.split_once('=') {
                    Some((k, p)) => (k.to_string(), PathBuf::from(p)),
                    None => {
                        let p = PathBuf::from(f);
                        let k = p
                            .file_name()
                            .and_then(|n| n.to_str())
                            .with_context(|| format!("--from-file {f:?}: no file name"))?
                            .to_string();
                        (k, p)
                    }
                };
                if data.insert(k.clone(), read(&path)?).is_some() {
                    bail!("entry {k:?} is given twice");
                }
            }
            (name, "Opaque", data)
        }
    };
    Ok((
        name.clone(),
        json!({"apiVersion": ironmesh_api::API_VERSION, "kind": "Secret",
               "metadata": {"name": name}, "spec": {"type": ty, "data": data}}),
    ))
}

pub async fn run(
    cfg: &ClientConfig,
    command: SecretCommand,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let (name, doc) = manifest(&command)?;
    // Checked here first, so a bad file is named before anything is sent.
    ironmesh_api::validate(&doc).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut api = client::connect(cfg).await?;
    let resp = api
        .apply(ApplyRequest {
            manifests: vec![Manifest {
                origin: format!("secret {name}"),
                json: doc.to_string(),
            }],
            dry_run: false,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    for r in resp.results {
        println!("secrets/{} {}", r.name, r.action);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_secrets_take_literals_and_files_named_by_their_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "abc").unwrap();
        let (name, doc) = manifest(&SecretCommand::Generic {
            name: "db".into(),
            literals: vec!["user=orders".into()],
            files: vec![f.display().to_string()],
        })
        .unwrap();
        assert_eq!(name, "db");
        assert_eq!(doc["spec"]["data"]["user"], "orders");
        assert_eq!(doc["spec"]["data"]["token"], "abc");
        assert!(ironmesh_api::validate(&doc).is_ok());
        let twice = manifest(&SecretCommand::Generic {
            name: "db".into(),
            literals: vec!["a=1".into(), "a=2".into()],
            files: vec![],
        });
        assert!(twice.unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn a_tls_secret_from_files_is_checked_before_it_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&crt, "not a certificate").unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let (_, doc) = manifest(&SecretCommand::Tls {
            name: "edge".into(),
            cert: crt,
            key,
        })
        .unwrap();
        let e = ironmesh_api::validate(&doc).unwrap_err();
        assert_eq!(e.path, "spec.data[\"tls.crt\"]", "{e}");
    }
}
