//! The node proxy: mTLS between hosts for mesh instances (HBONE: HTTP/2
//! CONNECT over mutual TLS to port 15008).
//!
//! In-pod model: for every local mesh instance the proxy holds two
//! listeners *inside that instance's network namespace*: the outbound one
//! on `127.0.0.1:15001`, where the datapath's `connect4` program sends the
//! instance's TCP connects to mesh instances on other nodes (the original
//! destination is kept in a BPF map under the client's port), and the
//! inbound HBONE one on `0.0.0.0:15008`. The source identity is the
//! namespace a listener lives in, never a packet's address. Between
//! instances of one node traffic stays on the kernel path.
//!
//! Parts: [`outbound`] (capture → tunnel), [`inbound`] (tunnel → policy →
//! instance), [`pool`] (one HTTP/2 connection per source workload and
//! destination, reused), [`certs`] (workload certificates and TLS),
//! [`policy`] (the view of the cluster and the Policy judge), [`netns`]
//! (sockets made in a namespace).

pub mod certs;
pub mod inbound;
pub mod netns;
pub mod outbound;
pub mod policy;
pub mod pool;
mod relay;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ironmesh_proto::v1::FlowRecord;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::datapath::Datapath;
use certs::Certs;
use policy::View;

pub use ironmesh_ebpf::{MESH_HBONE_PORT, MESH_OUTBOUND_PORT};

/// Connection metrics, per direction and both SPIFFE IDs.
#[derive(Clone)]
pub struct MeshMetrics {
    pub connections: Family<ConnLabels, Counter>,
    pub bytes: Family<ConnLabels, Counter>,
    pub duration: Family<DirLabel, Histogram>,
    pub open: Family<DirLabel, Gauge>,
    pub handshake_failures: Family<DirLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ConnLabels {
    /// inbound or outbound.
    pub direction: String,
    /// ok, denied (policy), refused (destination or upstream), error.
    pub result: String,
    pub src: String,
    pub dst: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DirLabel {
    pub direction: String,
}

impl MeshMetrics {
    pub fn register(registry: &mut Registry) -> MeshMetrics {
        let m = MeshMetrics {
            connections: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0])
            }),
            open: Family::default(),
            handshake_failures: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("ironmesh_agent_mesh");
        r.register(
            "connections",
            "Connections through the node proxy, by direction, result and SPIFFE IDs",
            m.connections.clone(),
        );
        r.register(
            "bytes",
            "Bytes carried through the node proxy (both ways)",
            m.bytes.clone(),
        );
        r.register(
            "connection_duration_seconds",
            "How long proxied connections lasted",
            m.duration.clone(),
        );
        r.register(
            "open_connections",
            "Proxied connections open now",
            m.open.clone(),
        );
        r.register(
            "handshake_failures",
            "mTLS peers refused: failed handshakes, unusable or revoked certificates, removed nodes",
            m.handshake_failures.clone(),
        );
        m
    }

    fn dir(d: &str) -> DirLabel {
        DirLabel {
            direction: d.to_string(),
        }
    }
}

/// One finished proxied connection, for metrics and flows.
pub(crate) struct ConnReport {
    pub direction: &'static str,
    pub result: &'static str,
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub src_id: String,
    pub dst_id: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub started: Instant,
}

struct LocalInstance {
    ip: Ipv4Addr,
    netns: PathBuf,
    active: Option<Active>,
}

struct Active {
    workload: String,
    cookie: Option<u64>,
    tasks: Vec<JoinHandle<()>>,
}

/// The node proxy of this agent.
pub struct Mesh {
    pub(crate) datapath: Arc<Datapath>,
    pub(crate) certs: Arc<Certs>,
    pub(crate) node: String,
    view: RwLock<Arc<View>>,
    instances: Mutex<HashMap<String, LocalInstance>>,
    pub(crate) pool: pool::Pool,
    pub(crate) metrics: MeshMetrics,
    flows: mpsc::Sender<FlowRecord>,
    /// Instance → workload of the listeners open, kept on disk so that a
    /// restarted agent reopens them before its first assignment arrives.
    remembered: Mutex<HashMap<String, String>>,
    remembered_file: PathBuf,
    have_view: std::sync::atomic::AtomicBool,
}

impl Mesh {
    /// The proxy, and the flow records it produces (for the flow export).
    pub fn new(
        datapath: Arc<Datapath>,
        certs: Certs,
        node: &str,
        metrics: MeshMetrics,
    ) -> (Arc<Mesh>, mpsc::Receiver<FlowRecord>) {
        let (tx, rx) = mpsc::channel(4096);
        let remembered_file = certs.dir().join("listeners.json");
        let remembered: HashMap<String, String> = std::fs::read(&remembered_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mesh = Arc::new(Mesh {
            datapath,
            certs: Arc::new(certs),
            node: node.to_string(),
            view: RwLock::new(Arc::new(View::default())),
            instances: Mutex::new(HashMap::new()),
            pool: pool::Pool::default(),
            metrics,
            flows: tx,
            remembered: Mutex::new(remembered),
            remembered_file,
            have_view: std::sync::atomic::AtomicBool::new(false),
        });
        let renew = mesh.clone();
        tokio::spawn(async move { renew.renew_loop().await });
        (mesh, rx)
    }

    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A new view of the cluster (every applied assignment).
    pub fn set_view(self: &Arc<Self>, mut view: View) {
        view.nodes.insert(self.node.clone());
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        self.have_view
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.reconcile();
    }

    /// An instance's network is up (its namespace and address).
    pub fn instance_up(self: &Arc<Self>, instance: &str, ip: Ipv4Addr, netns: PathBuf) {
        {
            let mut all = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let e = all.entry(instance.to_string()).or_insert(LocalInstance {
                ip,
                netns: netns.clone(),
                active: None,
            });
            if e.ip != ip || e.netns != netns {
                if let Some(a) = e.active.take() {
                    self.stop(a);
                }
                e.ip = ip;
                e.netns = netns;
            }
        }
        self.reconcile();
    }

    /// An instance's network is going away.
    pub fn instance_down(&self, instance: &str) {
        let gone = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(instance);
        if let Some(a) = gone.and_then(|g| g.active) {
            self.stop(a);
        }
    }

    fn stop(&self, a: Active) {
        for t in a.tasks {
            t.abort();
        }
        if let Some(c) = a.cookie {
            if let Err(e) = self.datapath.mesh_namespace_remove(c) {
                tracing::warn!(error = %e, "cannot drop a mesh namespace from the datapath");
            }
        }
        tracing::info!(workload = %a.workload, "mesh listeners closed");
    }

    /// Opens the listeners of local instances that joined the mesh, closes
    /// those of instances that left it.
    fn reconcile(self: &Arc<Self>) {
        let view = self.view();
        let have_view = self.have_view.load(std::sync::atomic::Ordering::SeqCst);
        let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        for (name, inst) in all.iter_mut() {
            // Before the first assignment, what the previous agent had open.
            let want = if have_view {
                view.peers.get(&inst.ip).map(|p| p.workload.clone())
            } else {
                remembered.get(name).cloned()
            };
            let have = inst.active.as_ref().map(|a| a.workload.clone());
            if want == have {
                continue;
            }
            if let Some(a) = inst.active.take() {
                self.stop(a);
            }
            if let Some(workload) = want {
                let me = self.clone();
                let (name, ip, netns, w) =
                    (name.clone(), inst.ip, inst.netns.clone(), workload.clone());
                let task = tokio::spawn(async move { me.activate(name, w, ip, netns).await });
                inst.active = Some(Active {
                    workload,
                    cookie: None,
                    tasks: vec![task],
                });
            }
        }
        if have_view {
            let now: HashMap<String, String> = all
                .iter()
                .filter_map(|(n, i)| i.active.as_ref().map(|a| (n.clone(), a.workload.clone())))
                .collect();
            if *remembered != now {
                match serde_json::to_vec(&now) {
                    Ok(b) => {
                        if let Err(e) =
                            ironmesh_process::write_file_atomic(&self.remembered_file, &b, 0o644)
                        {
                            tracing::warn!(error = %e, "cannot record the mesh listeners");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode the mesh listeners"),
                }
                *remembered = now;
            }
        }
    }

    /// Certificate, listeners, then the namespace marked for capture.
    async fn activate(
        self: Arc<Self>,
        instance: String,
        workload: String,
        ip: Ipv4Addr,
        netns: PathBuf,
    ) {
        let mut wait = Duration::from_millis(200);
        let cert = loop {
            match self.certs.ensure(&workload, &instance).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(instance, workload, error = %e, "no workload certificate yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        };
        let listeners = {
            let netns = netns.clone();
            tokio::task::spawn_blocking(move || open_listeners(&netns)).await
        };
        let (out_l, in_l, cookie) = match listeners {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::error!(instance, error = %e, "cannot open the mesh listeners in the instance's namespace");
                return;
            }
            Err(e) => {
                tracing::error!(instance, error = %e, "mesh listener task failed");
                return;
            }
        };
        let server = match self.certs.server_config(&workload) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(instance, error = %e, "cannot build the inbound TLS settings");
                return;
            }
        };
        let sockets = match netns::SocketFactory::new(&netns) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(instance, error = %e, "cannot enter the instance's namespace");
                return;
            }
        };
        let ctx = Arc::new(inbound::Local {
            sockets,
            instance: instance.clone(),
            workload: workload.clone(),
            spiffe_id: cert.spiffe_id.clone(),
            ip,
            netns: netns.clone(),
            cookie,
        });
        let t_in = tokio::spawn(inbound::serve(self.clone(), ctx.clone(), in_l, server));
        let t_out = tokio::spawn(outbound::serve(self.clone(), ctx, out_l));
        // Capture starts only once both listeners accept.
        let flags = ironmesh_ebpf::ID_MESH;
        if let Err(e) = self.datapath.mesh_namespace_add(cookie, flags) {
            tracing::error!(instance, error = %e, "cannot mark the namespace for mesh capture");
        }
        let mut all = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        match all.get_mut(&instance).and_then(|i| i.active.as_mut()) {
            Some(a) if a.workload == workload => {
                a.cookie = Some(cookie);
                a.tasks.push(t_in);
                a.tasks.push(t_out);
                tracing::info!(instance, workload, spiffe_id = %cert.spiffe_id, netns_cookie = cookie, "mesh listeners open");
            }
            _ => {
                // Stopped or changed meanwhile.
                t_in.abort();
                t_out.abort();
                let _ = self.datapath.mesh_namespace_remove(cookie);
            }
        }
    }

    /// Renews certificates at half-life; forgets those of workloads no
    /// longer here.
    async fn renew_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let here: HashMap<String, String> = {
                let all = self.instances.lock().unwrap_or_else(|e| e.into_inner());
                all.iter()
                    .filter_map(|(n, i)| i.active.as_ref().map(|a| (a.workload.clone(), n.clone())))
                    .collect()
            };
            for c in self.certs.all() {
                match here.get(&c.workload) {
                    None => self.certs.forget(&c.workload),
                    Some(instance) if c.renew_at() <= std::time::SystemTime::now() => {
                        if let Err(e) = self.certs.ensure(&c.workload, instance).await {
                            tracing::warn!(workload = %c.workload, error = %e, "workload certificate renewal failed; retrying");
                        }
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// The SPIFFE ID of `workload` in this cluster's trust domain (taken
    /// from a certificate of ours: one trust domain per cluster).
    pub(crate) fn spiffe_of(&self, own: &str, workload: &str) -> String {
        let td = own
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("ironmesh.local");
        format!("spiffe://{td}/workload/{workload}")
    }

    pub(crate) fn report(&self, r: ConnReport) {
        let took = r.started.elapsed();
        let labels = ConnLabels {
            direction: r.direction.to_string(),
            result: r.result.to_string(),
            src: r.src_id.clone(),
            dst: r.dst_id.clone(),
        };
        self.metrics.connections.get_or_create(&labels).inc();
        self.metrics
            .bytes
            .get_or_create(&labels)
            .inc_by(r.bytes_in + r.bytes_out);
        self.metrics
            .duration
            .get_or_create(&MeshMetrics::dir(r.direction))
            .observe(took.as_secs_f64());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let rec = FlowRecord {
            time_unix_ms: now_ms,
            node: String::new(),
            src_ip: r.src.ip().to_string(),
            src_port: u32::from(r.src.port()),
            dst_ip: r.dst.ip().to_string(),
            dst_port: u32::from(r.dst.port()),
            protocol: "TCP".into(),
            src_identity: r.src_identity,
            dst_identity: r.dst_identity,
            verdict: if r.result == "denied" {
                "dropped".into()
            } else {
                "allowed".into()
            },
            event: "close".into(),
            hook: format!("proxy-{}", r.direction),
            packets_fwd: 0,
            bytes_fwd: r.bytes_out,
            packets_rev: 0,
            bytes_rev: r.bytes_in,
            mtls: true,
            src_spiffe_id: r.src_id,
            dst_spiffe_id: r.dst_id,
            ..Default::default()
        };
        let _ = self.flows.try_send(rec);
    }
}

/// The outbound and inbound listeners, made in the instance's namespace,
/// and the namespace's cookie.
fn open_listeners(
    netns: &std::path::Path,
) -> std::io::Result<(tokio::net::TcpListener, tokio::net::TcpListener, u64)> {
    let out = netns::tcp_socket(netns)?;
    out.set_reuseaddr(true)?;
    out.bind((Ipv4Addr::LOCALHOST, MESH_OUTBOUND_PORT).into())?;
    let inb = netns::tcp_socket(netns)?;
    inb.set_reuseaddr(true)?;
    inb.bind((Ipv4Addr::UNSPECIFIED, MESH_HBONE_PORT).into())?;
    let cookie = netns::netns_cookie(&out)?;
    Ok((out.listen(1024)?, inb.listen(1024)?, cookie))
}
