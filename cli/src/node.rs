//! `imctl node cordon|uncordon|drain NAME`.
//!
//! A Node's `spec` belongs to the operator and its `status` to the system,
//! so cordoning reads the Node and applies it back with
//! `spec.unschedulable` changed (labels, annotations and the rest of the
//! spec unchanged); the controller keeps the status. Draining cordons, then
//! deletes every instance bound to the node: the workload controller
//! replaces them on other nodes, and the node's agent stops the old ones
//! with its stop grace when its assignment no longer lists them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use ironmesh_api::Kind;
use ironmesh_proto::v1::operator_service_client::OperatorServiceClient;
use ironmesh_proto::v1::{DeleteRequest, ListRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;

use ironmesh_api::client_config::ClientConfig;

use crate::client;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Mark the node unschedulable: no new instances are placed there;
    /// running ones stay.
    Cordon { name: String },
    /// Make the node schedulable again.
    Uncordon { name: String },
    /// Cordon the node and move every instance off it, waiting until none
    /// is bound there any more.
    Drain {
        name: String,
        /// Give up after this long.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

type Api = OperatorServiceClient<Channel>;

pub async fn run(
    cfg: &ClientConfig,
    command: NodeCommand,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let mut api = client::connect(cfg).await?;
    match command {
        NodeCommand::Cordon { name } => {
            let changed = set_unschedulable(&mut api, &name, true, status_err).await?;
            println!(
                "nodes/{name} {}",
                if changed {
                    "cordoned"
                } else {
                    "already cordoned"
                }
            );
        }
        NodeCommand::Uncordon { name } => {
            let changed = set_unschedulable(&mut api, &name, false, status_err).await?;
            println!(
                "nodes/{name} {}",
                if changed {
                    "uncordoned"
                } else {
                    "already schedulable"
                }
            );
        }
        NodeCommand::Drain { name, timeout } => {
            set_unschedulable(&mut api, &name, true, status_err).await?;
            println!("nodes/{name} cordoned");
            let started = Instant::now();
            let mut deleted: BTreeSet<String> = BTreeSet::new();
            let mut last_left = usize::MAX;
            loop {
                let on_node = instances_on(&mut api, &name, status_err).await?;
                if on_node.is_empty() {
                    println!(
                        "nodes/{name} drained in {:.1}s",
                        started.elapsed().as_secs_f64()
                    );
                    break;
                }
                if on_node.len() != last_left {
                    println!("{} instance(s) left on {name}", on_node.len());
                    last_left = on_node.len();
                }
                for i in &on_node {
                    if deleted.insert(i.clone()) {
                        match api
                            .delete(DeleteRequest {
                                kind: Kind::Instance.as_str().into(),
                                name: i.clone(),
                            })
                            .await
                        {
                            Ok(_) => println!("instances/{i} evicted"),
                            Err(s) if s.code() == tonic::Code::NotFound => {}
                            Err(s) => return Err(status_err(s)),
                        }
                    }
                }
                if started.elapsed() > timeout {
                    bail!(
                        "node {name} still has {} instance(s) after {}",
                        on_node.len(),
                        humantime::format_duration(timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}

/// Applies the Node back with `spec.unschedulable = on`; false if it
/// already was.
async fn set_unschedulable(
    api: &mut Api,
    name: &str,
    on: bool,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<bool> {
    let node = client::get_object(api, Kind::Node, name, status_err).await?;
    let mut spec = node.get("spec").cloned().unwrap_or_else(|| json!({}));
    if !spec.is_object() {
        spec = json!({});
    }
    if spec
        .get("unschedulable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        == on
    {
        return Ok(false);
    }
    spec["unschedulable"] = json!(on);
    client::apply_spec(api, Kind::Node, &node, spec, status_err).await?;
    Ok(true)
}

/// Names of the instances bound to `node`.
async fn instances_on(
    api: &mut Api,
    node: &str,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<Vec<String>> {
    let r = api
        .list(ListRequest {
            kind: Kind::Instance.as_str().into(),
            label_selector: String::new(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut out = Vec::new();
    for item in r.items {
        let v: Value = serde_json::from_str(&item.json)?;
        if v.pointer("/spec/node").and_then(Value::as_str) == Some(node) {
            out.push(item.name);
        }
    }
    Ok(out)
}
