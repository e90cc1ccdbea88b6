//! `imctl token …`: join tokens for agents. The secret a token has is
//! shown once, here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::{CreateJoinTokenRequest, DeleteJoinTokenRequest, ListJoinTokensRequest};

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
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
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
