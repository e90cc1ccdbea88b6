//! Services: a stable virtual IP from the service CIDR for every Service,
//! and its endpoints (the ready instances its selector picks).
//!
//! A VIP is claimed with a store record `/ipam/services/<ip>` naming the
//! Service, created with a compare-absent transaction, so no address is
//! handed out twice; `spec.clusterIP` asks for a particular one. Records of
//! deleted Services are released. The agents balance each VIP across the
//! endpoints in the kernel; [`endpoints`] computes them for assignments.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ironmesh_api::net::Ipv4Cidr;
use ironmesh_api::object::Service;
use ironmesh_api::selector::LabelSelector;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{ServiceBackend, ServiceEntry};

use crate::resources::{ResourceError, Resources, StoredObject};
use crate::store::{Compare, Op, TxnOutcome};

const PREFIX: &str = "/ipam/services/";
const RESYNC: Duration = Duration::from_secs(2);

/// Runs VIP allocation after every change to Services (and every few
/// seconds) until `shutdown`.
pub async fn run(resources: Resources, cidr: Ipv4Cidr, shutdown: ironmesh_process::Shutdown) {
    use futures::{FutureExt, StreamExt};
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        let rev = resources.store().revision().await.unwrap_or(0);
        let mut events = match resources
            .store()
            .watch(&crate::resources::prefix(Kind::Service), rev)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "service controller cannot watch the store");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(RESYNC) => continue,
                }
            }
        };
        loop {
            if let Err(e) = reconcile(&resources, cidr).await {
                tracing::warn!(error = %e, "service pass failed");
            }
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(RESYNC) => {}
                ev = events.next() => match ev {
                    Some(Ok(_)) => while let Some(Some(Ok(_))) = events.next().now_or_never() {},
                    _ => break,
                },
            }
        }
    }
}

/// Gives every Service without one a VIP, and releases VIPs of Services
/// that are gone.
pub async fn reconcile(resources: &Resources, cidr: Ipv4Cidr) -> Result<(), ResourceError> {
    let store = resources.store();
    let (services, _) = resources
        .list(Kind::Service, &LabelSelector::default())
        .await?;
    let (claims, _) = store.list(PREFIX).await?;
    let mut owner_of: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for kv in &claims {
        if let Some(ip) = kv.key.strip_prefix(PREFIX).and_then(|s| s.parse().ok()) {
            owner_of.insert(ip, String::from_utf8_lossy(&kv.value).to_string());
        }
    }
    let names: HashSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    for kv in &claims {
        let owner = String::from_utf8_lossy(&kv.value).to_string();
        if !names.contains(owner.as_str()) {
            let txn = crate::store::Txn {
                compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                ops: vec![Op::Delete {
                    key: kv.key.clone(),
                }],
            };
            store.txn(txn).await?;
            tracing::info!(service = %owner, key = %kv.key, "service VIP released");
        }
    }
    for svc in &services {
        let Ok(typed) = svc.typed::<Service>() else {
            tracing::warn!(service = %svc.name, "unreadable service; no VIP");
            continue;
        };
        let current = typed
            .status
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|s| s.parse::<Ipv4Addr>().ok());
        if current.is_some_and(|ip| owner_of.get(&ip) == Some(&svc.name)) {
            continue;
        }
        match claim(resources, &typed, cidr, &owner_of).await? {
            Ok(ip) => {
                owner_of.insert(ip, svc.name.clone());
                write_status(resources, &svc.name, Some(ip), None).await?;
                tracing::info!(service = %svc.name, vip = %ip, "service VIP allocated");
            }
            Err(why) => {
                tracing::warn!(service = %svc.name, reason = %why, "no VIP for service");
                write_status(resources, &svc.name, None, Some(&why)).await?;
            }
        }
    }
    Ok(())
}

/// Claims the requested or the lowest free address; `Err` says why not.
async fn claim(
    resources: &Resources,
    svc: &Service,
    cidr: Ipv4Cidr,
    owners: &BTreeMap<Ipv4Addr, String>,
) -> Result<Result<Ipv4Addr, String>, ResourceError> {
    let requested = svc.spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let candidates: Vec<Ipv4Addr> = match requested {
        Some(r) => match r.parse::<Ipv4Addr>() {
            Ok(ip) if cidr.contains(ip) => vec![ip],
            _ => {
                return Ok(Err(format!(
                    "spec.clusterIP {r} is not an address in the service CIDR {cidr}"
                )))
            }
        },
        // Skip the network address and the first one (reserved).
        None => (2..cidr.size().saturating_sub(1))
            .filter_map(|n| cidr.nth(n))
            .filter(|ip| !owners.contains_key(ip))
            .take(64)
            .collect(),
    };
    for ip in candidates {
        if let Some(owner) = owners.get(&ip) {
            if owner != svc.name() {
                return Ok(Err(format!("{ip} is already the VIP of service {owner:?}")));
            }
        }
        let key = format!("{PREFIX}{ip}");
        let txn = crate::store::Txn {
            compares: vec![Compare::Absent(key.clone())],
            ops: vec![Op::Put {
                key,
                value: svc.name().as_bytes().to_vec(),
            }],
        };
        if let TxnOutcome::Committed(_) = resources.store().txn(txn).await? {
            return Ok(Ok(ip));
        }
    }
    Ok(Err(format!("the service CIDR {cidr} has no free address")))
}

async fn write_status(
    resources: &Resources,
    name: &str,
    ip: Option<Ipv4Addr>,
    problem: Option<&str>,
) -> Result<(), ResourceError> {
    resources
        .update_typed(Kind::Service, name, |cur: Option<Service>| {
            let mut o = cur?;
            let status = o.status_mut();
            match ip {
                Some(ip) => {
                    status.cluster_ip = Some(ip.to_string());
                    status.message.clear();
                }
                None => status.message = problem.unwrap_or_default().to_string(),
            }
            Some(o)
        })
        .await?;
    Ok(())
}

/// A ready instance as a backend: its address and workload labels.
pub struct ReadyInstance {
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

/// The datapath entries of every Service with a VIP: one per port, with
/// the ready instances its selector picks as backends.
pub fn endpoints(services: &[StoredObject], ready: &[ReadyInstance]) -> Vec<ServiceEntry> {
    let mut out = Vec::new();
    for svc in services {
        let Ok(Service {
            spec,
            status: Some(status),
            ..
        }) = svc.typed::<Service>()
        else {
            continue;
        };
        let Some(vip) = status.cluster_ip.as_deref() else {
            continue;
        };
        let picked: Vec<&ReadyInstance> = ready
            .iter()
            .filter(|r| {
                spec.selector
                    .iter()
                    .all(|(k, v)| r.labels.get(k) == Some(v))
            })
            .collect();
        for p in &spec.ports {
            let target = p.target_port.unwrap_or(p.port);
            let mut backends: Vec<ServiceBackend> = picked
                .iter()
                .map(|r| ServiceBackend {
                    ip: r.ip.to_string(),
                    port: target,
                })
                .collect();
            backends.sort_by(|a, b| a.ip.cmp(&b.ip));
            out.push(ServiceEntry {
                name: svc.name.clone(),
                vip: vip.to_string(),
                port: p.port,
                protocol: p.protocol.to_string(),
                backends,
            });
        }
    }
    out
}
