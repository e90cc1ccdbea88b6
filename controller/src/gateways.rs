//! Gateways in each node's assignment: which nodes serve which Gateway
//! (node labels against `nodeSelector`), the HTTPRoutes attached to it in
//! precedence order with their conflicting rules marked, and a certificate
//! for every HTTPS listener issued by the cluster CA. Reads the cache view
//! only; route status is written by [`run_status`] on the leader.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ironmesh_api::gateway::{GatewaySpec, HTTPRouteSpec, ListenerProtocol};
use ironmesh_api::Kind;
use ironmesh_proto::v1::{GatewayAssignment, GatewayRoute, ListenerCertificate};

use crate::cache::View;
use crate::pki::{ClusterCa, Identity};

/// Lifetime of a listener certificate; a new one is issued once two thirds
/// of it have passed (the assignment then changes and the agent reloads).
const LISTENER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// (gateway, listener, hostnames).
type ListenerKey = (String, String, Vec<String>);
/// (issued at, chain PEM, key PEM).
type Issued = (Instant, String, String);

/// Listener certificates already issued, so a pass does not sign again
/// (and the node's part stays equal between passes).
#[derive(Default)]
pub struct CertMemo {
    issued: HashMap<ListenerKey, Issued>,
}

/// Routes in precedence order: oldest first (creation time), then name.
fn ordered_routes(view: &View) -> Vec<(String, HTTPRouteSpec, String)> {
    let mut routes: Vec<(String, HTTPRouteSpec, String)> = view
        .objects(Kind::HTTPRoute)
        .values()
        .filter_map(|o| {
            let spec = serde_json::from_value(o.object.get("spec")?.clone()).ok()?;
            let created = o
                .object
                .pointer("/metadata/creationTimestamp")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string();
            Some((o.name.clone(), spec, created))
        })
        .collect();
    routes.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
    routes
}

/// Every route's conflicts, in precedence order.
pub fn route_conflicts(view: &View) -> Vec<ironmesh_api::gateway::Conflict> {
    let routes = ordered_routes(view);
    let refs: Vec<(&str, &HTTPRouteSpec)> =
        routes.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
    ironmesh_api::gateway::conflicts(&refs)
}

/// Node name → the gateways it serves.
pub fn node_gateways(
    view: &View,
    ca: Option<&ClusterCa>,
    memo: &mut CertMemo,
) -> HashMap<String, Vec<GatewayAssignment>> {
    let mut out: HashMap<String, Vec<GatewayAssignment>> = HashMap::new();
    let gateways = view.objects(Kind::Gateway);
    if gateways.is_empty() {
        memo.issued.clear();
        return out;
    }
    let routes = ordered_routes(view);
    let refs: Vec<(&str, &HTTPRouteSpec)> =
        routes.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
    let mut lost: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for c in ironmesh_api::gateway::conflicts(&refs) {
        if let Some((n, _, _)) = routes.iter().find(|(n, _, _)| *n == c.route) {
            lost.entry(n.as_str()).or_default().push(c.rule as u32);
        }
    }
    let mut keep = Vec::new();
    for g in gateways.values() {
        let Some(spec) = g
            .object
            .get("spec")
            .and_then(|s| serde_json::from_value::<GatewaySpec>(s.clone()).ok())
        else {
            continue;
        };
        let attached: Vec<GatewayRoute> = routes
            .iter()
            .filter(|(_, r, _)| r.parent_refs.iter().any(|p| p.gateway == g.name))
            .filter_map(|(name, r, _)| {
                Some(GatewayRoute {
                    name: name.clone(),
                    spec_json: serde_json::to_string(r).ok()?,
                    conflicting_rules: lost.get(name.as_str()).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let mut certificates = Vec::new();
        for l in spec
            .listeners
            .iter()
            .filter(|l| l.protocol == ListenerProtocol::HTTPS)
        {
            let key = (g.name.clone(), l.name.clone(), l.hostnames.clone());
            let fresh = memo
                .issued
                .get(&key)
                .is_some_and(|(at, _, _)| at.elapsed() < LISTENER_CERT_LIFETIME * 2 / 3);
            if !fresh {
                let Some(ca) = ca else { continue };
                match issue(ca, &g.name, &l.hostnames) {
                    Ok((chain, key_pem)) => {
                        memo.issued
                            .insert(key.clone(), (Instant::now(), chain, key_pem));
                    }
                    Err(e) => {
                        tracing::warn!(gateway = %g.name, listener = %l.name, error = %e, "cannot issue a listener certificate");
                        continue;
                    }
                }
            }
            if let Some((_, chain, key_pem)) = memo.issued.get(&key) {
                certificates.push(ListenerCertificate {
                    listener: l.name.clone(),
                    cert_chain_pem: chain.clone(),
                    key_pem: key_pem.clone(),
                });
            }
            keep.push(key);
        }
        let Ok(spec_json) = serde_json::to_string(&spec) else {
            continue;
        };
        let assignment = GatewayAssignment {
            name: g.name.clone(),
            spec_json,
            routes: attached,
            certificates,
        };
        for n in view.objects(Kind::Node).values() {
            let mut labels = crate::resources::labels_of(&n.object);
            // As the scheduler does: every node has its hostname label.
            labels
                .entry(ironmesh_api::workload::HOSTNAME_LABEL.to_string())
                .or_insert_with(|| n.name.clone());
            if spec
                .node_selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            {
                out.entry(n.name.clone())
                    .or_default()
                    .push(assignment.clone());
            }
        }
    }
    memo.issued.retain(|k, _| keep.contains(k));
    out
}

/// A server certificate for `hostnames`, chained to the cluster CA. Its
/// subject (`gateway:<name>`) is no identity the controller accepts.
fn issue(
    ca: &ClusterCa,
    gateway: &str,
    hostnames: &[String],
) -> Result<(String, String), crate::pki::PkiError> {
    let lifetime = time::Duration::seconds(LISTENER_CERT_LIFETIME.as_secs() as i64);
    let (cert, key) = ca.issue_for(
        &Identity::Gateway(gateway.to_string()),
        hostnames,
        true,
        lifetime,
    )?;
    Ok((format!("{cert}{}", ca.cert_pem()), key))
}

/// Keeps each HTTPRoute's `Accepted` condition current (leader only):
/// `False` with reason `Conflict` when a rule is shadowed by an older
/// route, `NoGateway` when a named Gateway does not exist, `True`
/// otherwise.
pub async fn run_status(
    resources: crate::resources::Resources,
    shutdown: ironmesh_process::Shutdown,
) {
    let Some(cache) = resources.cache().await.cloned() else {
        tracing::warn!("route status needs the cache; not running");
        return;
    };
    let mut changes = cache.subscribe();
    changes.mark_changed();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = changes.changed() => if r.is_err() { return },
        }
        changes.borrow_and_update();
        let wanted: Vec<(String, String, String, String)> = {
            let view = cache.read();
            let conflicts = route_conflicts(&view);
            let gateways = view.objects(Kind::Gateway);
            view.objects(Kind::HTTPRoute)
                .values()
                .filter_map(|o| {
                    let spec: HTTPRouteSpec =
                        serde_json::from_value(o.object.get("spec")?.clone()).ok()?;
                    let missing = spec
                        .parent_refs
                        .iter()
                        .find(|p| !gateways.contains_key(&p.gateway));
                    let (status, reason, message) =
                        if let Some(c) = conflicts.iter().find(|c| c.route == o.name) {
                            ("False", "Conflict", c.to_string())
                        } else if let Some(p) = missing {
                            (
                                "False",
                                "NoGateway",
                                format!("Gateway {:?} does not exist", p.gateway),
                            )
                        } else {
                            ("True", "Accepted", "attached".to_string())
                        };
                    let cur = o
                        .object
                        .pointer("/status/conditions")
                        .and_then(|c| c.as_array())
                        .and_then(|cs| {
                            cs.iter().find(|c| {
                                c.get("type").and_then(|t| t.as_str()) == Some("Accepted")
                            })
                        });
                    let same = cur.is_some_and(|c| {
                        c.get("status").and_then(|v| v.as_str()) == Some(status)
                            && c.get("reason").and_then(|v| v.as_str()) == Some(reason)
                            && c.get("message").and_then(|v| v.as_str()) == Some(message.as_str())
                    });
                    (!same).then(|| {
                        (
                            o.name.clone(),
                            status.to_string(),
                            reason.to_string(),
                            message,
                        )
                    })
                })
                .collect()
        };
        for (name, status, reason, message) in wanted {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let cond = serde_json::json!([{
                "type": "Accepted",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            }]);
            let r = resources
                .update(Kind::HTTPRoute, &name, |cur| {
                    let mut o = cur?.clone();
                    if !o.get("status").is_some_and(serde_json::Value::is_object) {
                        o["status"] = serde_json::json!({});
                    }
                    o["status"]["conditions"] = cond.clone();
                    Some(o)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(route = %name, error = %e, "cannot write route status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::resources::{Change, Resources};
    use serde_json::json;

    async fn put(res: &Resources, kind: Kind, name: &str, o: serde_json::Value) {
        res.update_many(kind, &[name.to_string()], |_, _| Change::Put(o.clone()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn selected_nodes_get_the_gateway_its_routes_and_a_listener_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn crate::store::Store> = std::sync::Arc::new(
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        );
        let cache = Cache::start(store.clone()).await.unwrap();
        let res = Resources::new(store).with_cache(cache.clone());
        for (n, role) in [("edge-1", "edge"), ("worker-1", "worker")] {
            put(
                &res,
                Kind::Node,
                n,
                json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node",
                "metadata": {"name": n, "labels": {"role": role}}, "spec": {}}),
            )
            .await;
        }
        put(&res, Kind::Gateway, "edge", json!({"apiVersion": "ironmesh.dev/v1", "kind": "Gateway",
            "metadata": {"name": "edge"}, "spec": {"nodeSelector": {"role": "edge"}, "listeners": [
                {"name": "web", "port": 8080, "protocol": "HTTP"},
                {"name": "tls", "port": 8443, "protocol": "HTTPS", "hostnames": ["api.example.com"], "tls": {"issuer": "ClusterCA"}}]}})).await;
        let rule = json!({"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backends": [{"service": "web", "port": 80, "weight": 1}], "timeout": "30s"});
        for (name, created) in [
            ("first", "2026-01-01T00:00:00Z"),
            ("second", "2026-01-02T00:00:00Z"),
        ] {
            put(
                &res,
                Kind::HTTPRoute,
                name,
                json!({"apiVersion": "ironmesh.dev/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"parentRefs": [{"gateway": "edge"}], "rules": [rule.clone()]}}),
            )
            .await;
        }
        let (ca, _) = ClusterCa::generate().unwrap();
        let mut memo = CertMemo::default();
        // Waits for the cache to reach the writes above.
        let view = res.cache().await.unwrap().read();
        let out = node_gateways(&view, Some(&ca), &mut memo);
        assert_eq!(out.keys().collect::<Vec<_>>(), vec!["edge-1"]);
        let g = &out["edge-1"][0];
        assert_eq!(g.name, "edge");
        let names: Vec<&str> = g.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert!(g.routes[0].conflicting_rules.is_empty());
        assert_eq!(g.routes[1].conflicting_rules, vec![0]);
        assert_eq!(g.certificates.len(), 1);
        let cert = &g.certificates[0];
        assert_eq!(cert.listener, "tls");
        assert_eq!(cert.cert_chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        let leaf = crate::pki::cert_info_from_pem(&cert.cert_chain_pem);
        // The listener's subject is no identity the controller accepts.
        assert!(leaf.is_err(), "{leaf:?}");
        // A second pass reuses the certificate, so the node's part is equal.
        let again = node_gateways(&view, Some(&ca), &mut memo);
        assert_eq!(again["edge-1"], out["edge-1"]);
    }
}
