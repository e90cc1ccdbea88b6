//! `imctl token …` (join tokens) and `imctl operator …` (who may operate
//! the cluster, with which role). Both are admin calls on the controller;
//! the secrets they make are shown or written once, here.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::{
    CreateJoinTokenRequest, CreateOperatorRequest, DeleteJoinTokenRequest, ListJoinTokensRequest,
    ListOperatorsRequest, RevokeOperatorRequest,
};

use crate::client;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a join token and print it (only this once). Agents join with
    /// it (--bootstrap-token-file) until it expires or is used up.
    Create {
        /// How long it is valid (at most 365d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it (default: unlimited; 1 with
        /// --node).
        #[arg(long)]
        uses: Option<u32>,
        /// Only this node may join with it, and it may re-provision an
        /// existing node of that name (its old certificate is revoked).
        #[arg(long)]
        node: Option<String>,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (never their secrets).
    #[command(alias = "list")]
    Ls,
    /// Delete join tokens by id; joins with them are refused from now on.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    View,
    Edit,
    Admin,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::View => "view",
            RoleArg::Edit => "edit",
            RoleArg::Admin => "admin",
        }
    }
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Make a credential for operator NAME with a role and write its imctl
    /// config (mode 0600). The key is made here and never leaves this
    /// machine; hand the file to that person.
    Create {
        name: String,
        /// view: read everything; edit: also apply/delete workloads,
        /// services, policies, volumes, pipelines, runs, sources and push
        /// images; admin: everything, incl. nodes, tokens, operators.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Where to write the config (default: ./NAME.yaml). An existing
        /// file is never overwritten.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// List operators and their roles.
    #[command(alias = "list")]
    Ls,
    /// Remove an operator and revoke its certificates.
    Revoke { name: String },
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    crate::status_err(s)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn when(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn table(rows: Vec<Vec<String>>) -> String {
    crate::output::align(rows)
}

pub async fn tokens(cfg: &ClientConfig, command: TokenCommand) -> anyhow::Result<()> {
    let mut api = client::connect(cfg).await?;
    match command {
        TokenCommand::Create {
            ttl,
            uses,
            node,
            description,
        } => {
            let r = api
                .create_join_token(CreateJoinTokenRequest {
                    ttl_seconds: ttl.as_secs().max(1),
                    uses: uses.unwrap_or(0),
                    node: node.unwrap_or_default(),
                    description,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", r.token);
            if let Some(i) = r.info {
                eprintln!(
                    "token {} expires {}{}{}",
                    i.id,
                    when(i.expires_unix),
                    if i.uses > 0 {
                        format!(", {} use(s)", i.uses)
                    } else {
                        String::new()
                    },
                    if i.node.is_empty() {
                        String::new()
                    } else {
                        format!(", only for node {}", i.node)
                    }
                );
            }
        }
        TokenCommand::Ls => {
            let r = api
                .list_join_tokens(ListJoinTokensRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if r.tokens.is_empty() {
                eprintln!("No join tokens found.");
                return Ok(());
            }
            let now = unix_now();
            let mut rows = vec![[
                "ID",
                "EXPIRES",
                "USES",
                "NODE",
                "STATE",
                "CREATED BY",
                "DESCRIPTION",
            ]
            .map(String::from)
            .to_vec()];
            for t in r.tokens {
                let state = if now >= t.expires_unix {
                    "expired"
                } else if t.uses > 0 && t.used >= t.uses {
                    "used-up"
                } else {
                    "valid"
                };
                rows.push(vec![
                    t.id,
                    when(t.expires_unix),
                    if t.uses == 0 {
                        format!("{}/unlimited", t.used)
                    } else {
                        format!("{}/{}", t.used, t.uses)
                    },
                    if t.node.is_empty() {
                        "-".into()
                    } else {
                        t.node
                    },
                    state.into(),
                    t.created_by,
                    t.description,
                ]);
            }
            print!("{}", table(rows));
        }
        TokenCommand::Delete { ids } => {
            let mut failed = false;
            for id in ids {
                match api
                    .delete_join_token(DeleteJoinTokenRequest { id: id.clone() })
                    .await
                {
                    Ok(_) => println!("token {id} deleted"),
                    Err(s) => {
                        eprintln!("error: {}", status_err(s));
                        failed = true;
                    }
                }
            }
            if failed {
                anyhow::bail!("some tokens were not deleted");
            }
        }
    }
    Ok(())
}

pub async fn operators(cfg: &ClientConfig, command: OperatorCommand) -> anyhow::Result<()> {
    let mut api = client::connect(cfg).await?;
    match command {
        OperatorCommand::Create { name, role, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.yaml")));
            if out.exists() {
                anyhow::bail!("{} exists; choose another --out", out.display());
            }
            let key = rcgen::KeyPair::generate().context("cannot make a key")?;
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("operator:{name}"));
            let csr = params
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .context("cannot make a certificate request")?;
            let r = api
                .create_operator(CreateOperatorRequest {
                    name: name.clone(),
                    role: role.as_str().into(),
                    csr_pem: csr,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut conf = ClientConfig::new(
                cfg.server.clone(),
                r.ca_certificate_pem,
                name.clone(),
                r.certificate_pem,
                key.serialize_pem(),
            );
            conf.tls_server_name = cfg.tls_server_name.clone();
            conf.registry = cfg.registry.clone();
            let yaml = serde_norway::to_string(&conf)?;
            ironmesh_process::write_file_atomic(&out, yaml.as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "operator {name} created with role {}; config written to {}",
                role.as_str(),
                out.display()
            );
        }
        OperatorCommand::Ls => {
            let r = api
                .list_operators(ListOperatorsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let mut rows = vec![["NAME", "ROLE", "CERTIFICATES", "EXPIRES", "CREATED BY"]
                .map(String::from)
                .to_vec()];
            for o in r.operators {
                rows.push(vec![
                    o.name,
                    o.role,
                    o.serials.len().to_string(),
                    when(o.expires_unix),
                    o.created_by,
                ]);
            }
            print!("{}", table(rows));
        }
        OperatorCommand::Revoke { name } => {
            let r = api
                .revoke_operator(RevokeOperatorRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "operator {name} revoked ({} certificate(s))",
                r.revoked_serials.len()
            );
        }
    }
    Ok(())
}
