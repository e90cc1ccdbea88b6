//! Gateways in each node's assignment: which nodes serve which Gateway
//! (node labels against `nodeSelector`), the HTTPRoutes attached to it in
//! precedence order with their conflicting rules marked, and a certificate
//! for every HTTPS listener issued by the cluster CA. Reads the cache view
//! only; route status is written by [`run_status`] on the leader.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ironmesh_api::gateway::{
    GatewaySpec, GatewayStatus, HTTPRouteSpec, ListenerProtocol, TlsIssuer,
};
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
    /// Opens the TLS Secrets listeners name (`issuer: Secret`).
    seal: Option<std::sync::Arc<crate::secret_seal::SecretSeal>>,
    /// Secret name → (its revision, chain PEM, key PEM), opened once.
    opened: HashMap<String, (u64, String, String)>,
}

impl CertMemo {
    pub fn with_seal(seal: Option<std::sync::Arc<crate::secret_seal::SecretSeal>>) -> CertMemo {
        CertMemo {
            seal,
            ..CertMemo::default()
        }
    }

    /// The chain and key in TLS Secret `name`, if it exists and opens.
    fn open_secret(&mut self, view: &View, gateway: &str, name: &str) -> Option<(String, String)> {
        let Some(o) = view.objects(Kind::Secret).get(name).cloned() else {
            tracing::warn!(
                gateway,
                secret = name,
                "listener certificate Secret does not exist"
            );
            return None;
        };
        if let Some((rev, chain, key)) = self.opened.get(name) {
            if *rev == o.revision {
                return Some((chain.clone(), key.clone()));
            }
        }
        let seal = self.seal.as_ref()?;
        let data = match seal.open(&crate::resources::key(Kind::Secret, name), &o.object) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(gateway, secret = name, error = %e, "cannot open the listener certificate Secret");
                return None;
            }
        };
        let (Some(chain), Some(key)) = (
            data.get(ironmesh_api::secret::TLS_CERT),
            data.get(ironmesh_api::secret::TLS_KEY),
        ) else {
            tracing::warn!(
                gateway,
                secret = name,
                "listener certificate Secret is not of type TLS"
            );
            return None;
        };
        self.opened
            .insert(name.to_string(), (o.revision, chain.clone(), key.clone()));
        Some((chain.clone(), key.clone()))
    }
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
            if let Some(secret) = l
                .tls
                .as_ref()
                .filter(|t| t.issuer == TlsIssuer::Secret)
                .and_then(|t| t.secret_name.as_deref())
            {
                if let Some((chain, key_pem)) = memo.open_secret(view, &g.name, secret) {
                    certificates.push(ListenerCertificate {
                        listener: l.name.clone(),
                        cert_chain_pem: chain,
                        key_pem,
                    });
                }
                continue;
            }
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
        for n in selected_nodes(view, &spec) {
            out.entry(n).or_default().push(assignment.clone());
        }
    }
    memo.issued.retain(|k, _| keep.contains(k));
    let secrets = view.objects(Kind::Secret);
    memo.opened.retain(|name, _| secrets.contains_key(name));
    out
}

/// The nodes whose labels (with their hostname label, as the scheduler
/// sees them) match the Gateway's `nodeSelector`, in name order.
fn selected_nodes(view: &View, spec: &GatewaySpec) -> Vec<String> {
    let mut nodes: Vec<String> = view
        .objects(Kind::Node)
        .values()
        .filter(|n| {
            let mut labels = crate::resources::labels_of(&n.object);
            labels
                .entry(ironmesh_api::workload::HOSTNAME_LABEL.to_string())
                .or_insert_with(|| n.name.clone());
            spec.node_selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|n| n.name.clone())
        .collect();
    nodes.sort();
    nodes
}

/// What `Gateway.status` should say: the nodes serving it, the routes
/// attached to each listener, and what keeps a listener from serving.
pub fn gateway_status(view: &View, name: &str, spec: &GatewaySpec) -> GatewayStatus {
    let mut attached: BTreeMap<String, u32> =
        spec.listeners.iter().map(|l| (l.name.clone(), 0)).collect();
    for o in view.objects(Kind::HTTPRoute).values() {
        let Some(route) = o
            .object
            .get("spec")
            .and_then(|s| serde_json::from_value::<HTTPRouteSpec>(s.clone()).ok())
        else {
            continue;
        };
        for l in &spec.listeners {
            if route
                .parent_refs
                .iter()
                .any(|p| p.gateway == name && p.listener.as_deref().is_none_or(|x| x == l.name))
            {
                *attached.entry(l.name.clone()).or_default() += 1;
            }
        }
    }
    let secrets = view.objects(Kind::Secret);
    let mut problems = Vec::new();
    for l in &spec.listeners {
        let Some(secret) = l
            .tls
            .as_ref()
            .filter(|t| t.issuer == TlsIssuer::Secret)
            .and_then(|t| t.secret_name.as_deref())
        else {
            continue;
        };
        match secrets.get(secret) {
            None => problems.push(format!(
                "listener {:?}: Secret {secret:?} does not exist",
                l.name
            )),
            Some(o) if o.object.pointer("/spec/type").and_then(|t| t.as_str()) != Some("TLS") => {
                problems.push(format!(
                    "listener {:?}: Secret {secret:?} is not of type TLS",
                    l.name
                ))
            }
            Some(_) => {}
        }
    }
    let nodes = selected_nodes(view, spec);
    if nodes.is_empty() {
        problems.push("no node matches spec.nodeSelector".to_string());
    }
    GatewayStatus {
        nodes,
        attached_routes: attached,
        problems,
    }
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
/// otherwise; and each Gateway's status ([`gateway_status`]).
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
        let gateway_wanted: Vec<(String, serde_json::Value)> = {
            let view = cache.read();
            view.objects(Kind::Gateway)
                .values()
                .filter_map(|o| {
                    let spec: GatewaySpec =
                        serde_json::from_value(o.object.get("spec")?.clone()).ok()?;
                    let want = serde_json::to_value(gateway_status(&view, &o.name, &spec)).ok()?;
                    let cur = o.object.get("status").cloned().unwrap_or_default();
                    (cur != want).then(|| (o.name.clone(), want))
                })
                .collect()
        };
        for (name, want) in gateway_wanted {
            let r = resources
                .update(Kind::Gateway, &name, |cur| {
                    let mut o = cur?.clone();
                    o["status"] = want.clone();
                    Some(o)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(gateway = %name, error = %e, "cannot write gateway status");
            }
        }
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
        // What Gateway.status says.
        let spec: GatewaySpec =
            serde_json::from_value(view.objects(Kind::Gateway)["edge"].object["spec"].clone())
                .unwrap();
        let st = gateway_status(&view, "edge", &spec);
        assert_eq!(st.nodes, ["edge-1"]);
        assert_eq!(st.attached_routes.get("web"), Some(&2));
        assert_eq!(st.attached_routes.get("tls"), Some(&2));
        assert!(st.problems.is_empty(), "{:?}", st.problems);
    }

    #[tokio::test]
    async fn a_listener_with_issuer_secret_gets_the_sealed_secrets_chain_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn crate::store::Store> = std::sync::Arc::new(
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        );
        let cache = Cache::start(store.clone()).await.unwrap();
        let seal = std::sync::Arc::new(crate::secret_seal::SecretSeal::new(
            crate::ha::shared_secrets::SealKey::from_bytes(&[3u8; 32]).unwrap(),
        ));
        let res = Resources::new(store.clone())
            .with_cache(cache.clone())
            .with_seal(seal.clone());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["api.example.com".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let docs = [
            json!({"apiVersion": "ironmesh.dev/v1", "kind": "Node", "metadata": {"name": "edge-1"}, "spec": {}}),
            json!({"apiVersion": "ironmesh.dev/v1", "kind": "Secret", "metadata": {"name": "edge-cert"},
                "spec": {"type": "TLS", "data": {"tls.crt": cert.pem(), "tls.key": key.serialize_pem()}}}),
            json!({"apiVersion": "ironmesh.dev/v1", "kind": "Gateway", "metadata": {"name": "edge"},
                "spec": {"listeners": [{"name": "tls", "port": 8443, "protocol": "HTTPS",
                    "hostnames": ["api.example.com"], "tls": {"issuer": "Secret", "secretName": "edge-cert"}}]}}),
        ];
        let validated: Vec<_> = docs
            .iter()
            .map(|d| ("t".to_string(), ironmesh_api::validate(d).unwrap()))
            .collect();
        res.apply(&validated, false).await.unwrap();
        // The store holds no byte of the key.
        let raw = store
            .get(&crate::resources::key(Kind::Secret, "edge-cert"))
            .await
            .unwrap()
            .unwrap();
        let body = String::from_utf8_lossy(&raw.value);
        assert!(!body.contains("PRIVATE KEY"), "{body}");
        assert!(body.contains("sealedData"), "{body}");

        let mut memo = CertMemo::with_seal(Some(seal));
        let view = res.cache().await.unwrap().read();
        let out = node_gateways(&view, None, &mut memo);
        let g = &out["edge-1"][0];
        assert_eq!(g.certificates.len(), 1);
        assert_eq!(g.certificates[0].cert_chain_pem, cert.pem());
        assert_eq!(g.certificates[0].key_pem, key.serialize_pem());

        let spec: GatewaySpec = serde_json::from_value(docs[2]["spec"].clone()).unwrap();
        assert!(gateway_status(&view, "edge", &spec).problems.is_empty());
        let mut other = spec.clone();
        if let Some(t) = other.listeners[0].tls.as_mut() {
            t.secret_name = Some("gone".into());
        }
        assert_eq!(
            gateway_status(&view, "edge", &other).problems,
            ["listener \"tls\": Secret \"gone\" does not exist"]
        );

        // Without the key that sealed it, the listener gets nothing.
        let mut unsealed = CertMemo::default();
        let out = node_gateways(&view, None, &mut unsealed);
        assert!(out["edge-1"][0].certificates.is_empty());
    }
}
