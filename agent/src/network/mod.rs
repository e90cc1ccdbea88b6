//! Instance networking: addresses, namespaces, veths and routes.
//!
//! Owns, on this host: the leases of the node's pod CIDR
//! (`<state_dir>/network/leases.json`), one network namespace per instance
//! (bind-mounted at `<netns_dir>/<instance>`), one veth pair per instance
//! (host end `<link_prefix><8 hex>`), the /32 routes to instances, the
//! routes to other nodes' pod CIDRs and, in VXLAN mode, one VXLAN device.
//! It must not touch anything else: foreign links, routes and namespaces
//! are never changed; everything of ours is recognisable by name prefix,
//! namespace directory or route protocol number.
//!
//! # Model (routed, as Calico and Cilium do it; no bridge)
//!
//! Inside the instance namespace: `lo` up; `eth0` with `<ip>/32`; a
//! permanent neighbour entry `169.254.1.1 lladdr ee:ee:ee:ee:ee:ee`; a
//! link-scope route to `169.254.1.1` and `default via 169.254.1.1 dev eth0`;
//! IPv6 off (`net.ipv6.conf.{all,default}.disable_ipv6=1`: the datapath
//! passes only IPv4 and ARP from an instance).
//! On the host: the veth end has MAC `ee:ee:ee:ee:ee:ee` and `proxy_arp=1`
//! (so ARP for the gateway is answered even without the static entry),
//! `ip_forward=1`, and `<ip>/32 dev <host veth> scope link proto 73`.
//! The gateway address exists nowhere: it only names the host's veth end.
//!
//! # Cross-host
//!
//! [`Network::set_peer_routes`] keeps one route per other node, marked with
//! route protocol [`routes::PEER_PROTO`]:
//! - [`CrossHostMode::Direct`]: `<pod CIDR> via <node address>`, for nodes
//!   on one L2 segment.
//! - [`CrossHostMode::Vxlan`]: one VXLAN device (VNI, local address, port
//!   4789, learning off) whose address is the first address (`.1`, never
//!   leased) of this node's pod CIDR; per peer an all-zero FDB entry
//!   (`00:00:00:00:00:00 dst <peer>`: head-end replication, so ARP for a
//!   peer's tunnel address reaches that peer) and
//!   `<peer pod CIDR> via <peer's .1> dev <vxlan> onlink`. Every node's
//!   tunnel address is derived from its pod CIDR, so no extra state has to
//!   be exchanged. Set [`NetworkConfig::mtu`] to the underlay MTU minus 50
//!   in this mode to spare path-MTU discovery.
//!
//! Namespace switches only ever happen on short-lived dedicated OS threads
//! ([`netns`]), never on a tokio worker.

mod error;
pub mod interfaces;
pub mod ipam;
pub mod netns;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::TryStreamExt;
pub use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::Mutex;

pub use error::NetworkError;
use ipam::Ipam;

/// The gateway every instance routes through: a link-local address that
/// only names the host's end of the instance's veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// How this agent's instance networking is laid out on the host.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Leases file lives here: `<state_dir>/network/leases.json`.
    pub state_dir: PathBuf,
    /// Where instance netns files are bind-mounted, e.g.
    /// `/run/ironmesh/<containerd-namespace>/netns` (unique per agent, so
    /// several agents on one machine never collide).
    pub netns_dir: PathBuf,
    /// Host-side veth names are `<link_prefix><8 hex>` (at most 7 chars of
    /// prefix, so the name fits in 15); unique per agent on one kernel.
    pub link_prefix: String,
    /// MTU of the instance veth pair.
    pub mtu: u32,
}

impl NetworkConfig {
    /// The defaults for an agent with this state dir and containerd
    /// namespace: netns under `/run/ironmesh/<ns>/netns`, prefix `im` plus
    /// two hex chars of a hash of the namespace, MTU 1500.
    pub fn new(state_dir: impl Into<PathBuf>, containerd_namespace: &str) -> NetworkConfig {
        let hash = interfaces::host_if_name("", containerd_namespace);
        NetworkConfig {
            state_dir: state_dir.into(),
            netns_dir: Path::new("/run/ironmesh")
                .join(containerd_namespace)
                .join("netns"),
            link_prefix: format!("im{}", &hash[..2]),
            mtu: 1500,
        }
    }
}

/// A route to another node's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer node's name (for errors and logs).
    pub node: String,
    pub pod_cidr: Ipv4Net,
    /// The peer node's address on the shared network (direct: next hop;
    /// VXLAN: remote tunnel endpoint).
    pub via: Ipv4Addr,
}

/// How instance traffic reaches other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrossHostMode {
    /// Plain routes via the peer node's address (shared L2 segment).
    Direct,
    /// Encapsulation in VXLAN (any IP path between nodes).
    Vxlan {
        vni: u32,
        /// The device name, e.g. `imvx<..>`; at most 15 chars.
        device: String,
        /// This node's underlay address (the tunnel source).
        local_ip: Ipv4Addr,
    },
}

/// What an instance got: hand `netns_path` to the OCI spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNetwork {
    pub ip: Ipv4Addr,
    pub netns_path: PathBuf,
    pub host_if: String,
    pub gateway: Ipv4Addr,
}

/// The instance networking of one agent. All operations are serialised.
#[derive(Debug)]
pub struct Network {
    cfg: NetworkConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    ipam: Ipam,
    /// The VXLAN device last made by `set_peer_routes` (this process).
    vxlan_device: Option<String>,
}

impl Network {
    /// Checks the config, creates the directories and loads the leases.
    pub fn new(cfg: NetworkConfig) -> Result<Network, NetworkError> {
        check_config(&cfg)?;
        let dir = cfg.state_dir.join("network");
        std::fs::create_dir_all(&dir)
            .map_err(|e| NetworkError::io("creating network state directory", &dir, e))?;
        std::fs::create_dir_all(&cfg.netns_dir)
            .map_err(|e| NetworkError::io("creating netns directory", &cfg.netns_dir, e))?;
        let ipam = Ipam::load(&dir.join("leases.json"))?;
        Ok(Network {
            cfg,
            state: Mutex::new(State {
                ipam,
                vxlan_device: None,
            }),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// The node's pod CIDR, once configured (also as loaded from the leases).
    pub async fn pod_cidr(&self) -> Option<Ipv4Net> {
        self.state.lock().await.ipam.pod_cidr()
    }

    /// The current leases, instance → address.
    pub async fn leases(&self) -> BTreeMap<String, Ipv4Addr> {
        self.state.lock().await.ipam.leases().clone()
    }

    /// Where the namespace of `instance` is (or would be) mounted.
    pub fn netns_path(&self, instance: &str) -> PathBuf {
        self.cfg.netns_dir.join(instance)
    }

    /// The host-side veth name of `instance`.
    pub fn host_if(&self, instance: &str) -> String {
        interfaces::host_if_name(&self.cfg.link_prefix, instance)
    }

    /// Sets the node's pod CIDR (from the controller). If it differs from
    /// the one the stored leases were made in, all leases are dropped; the
    /// namespaces of those instances are torn down by
    /// [`Network::cleanup_orphans`] (or re-addressed by [`Network::setup`]).
    pub async fn configure(&self, pod_cidr: Ipv4Net) -> Result<(), NetworkError> {
        let mut state = self.state.lock().await;
        let old = state.ipam.pod_cidr();
        let dropped = state.ipam.set_pod_cidr(pod_cidr)?;
        if old != Some(pod_cidr) {
            tracing::info!(%pod_cidr, old = ?old, dropped = dropped.len(), "pod CIDR configured");
        }
        Ok(())
    }

    /// Gives `instance` its namespace, veth pair, address and routes.
    /// Idempotent: an instance already set up gets the same address and
    /// namespace back (agent restart, adoption), with anything missing
    /// repaired. Errors if no pod CIDR is configured yet.
    pub async fn setup(&self, instance: &str) -> Result<InstanceNetwork, NetworkError> {
        check_instance(instance)?;
        let started = Instant::now();
        let mut state = self.state.lock().await;
        let (ip, new_lease) = state.ipam.lease(instance)?;
        let net = InstanceNetwork {
            ip,
            netns_path: self.netns_path(instance),
            host_if: self.host_if(instance),
            gateway: GATEWAY,
        };
        match self.converge(instance, &net).await {
            Ok(()) => {
                tracing::info!(
                    instance,
                    %ip,
                    host_if = %net.host_if,
                    netns = %net.netns_path.display(),
                    new_lease,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "instance network set up"
                );
                Ok(net)
            }
            Err(e) => {
                tracing::warn!(instance, %ip, error = %e, "instance network setup failed");
                if new_lease {
                    // Leave nothing half made behind a lease nobody holds.
                    if let Err(undo) = self.teardown_locked(&mut state, instance).await {
                        tracing::warn!(instance, error = %undo, "undoing failed setup");
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes the instance's namespace (unmount + unlink), veth, /32
    /// route and lease. Idempotent.
    pub async fn teardown(&self, instance: &str) -> Result<(), NetworkError> {
        check_instance(instance)?;
        let mut state = self.state.lock().await;
        self.teardown_locked(&mut state, instance).await
    }

    /// Removes namespaces, veths (with our prefix), /32 routes and leases
    /// of instances not in `keep`, plus the namespace and veth of a kept
    /// instance that has no lease (its address came from an older pod
    /// CIDR; `setup` makes it anew). Returns what it removed: instance
    /// names, and `veth <name>` / `route <cidr>` for leftovers that no
    /// longer map to a name.
    pub async fn cleanup_orphans(
        &self,
        keep: &HashSet<String>,
    ) -> Result<Vec<String>, NetworkError> {
        let mut state = self.state.lock().await;
        let mut orphans: BTreeSet<String> = state
            .ipam
            .leases()
            .keys()
            .filter(|i| !keep.contains(*i))
            .cloned()
            .collect();
        let entries = match std::fs::read_dir(&self.cfg.netns_dir) {
            Ok(rd) => rd
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| NetworkError::io("listing netns directory", &self.cfg.netns_dir, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(NetworkError::io(
                    "listing netns directory",
                    &self.cfg.netns_dir,
                    e,
                ))
            }
        };
        for name in entries {
            let Some(name) = name.to_str() else { continue };
            if check_instance(name).is_err() {
                continue;
            }
            if !keep.contains(name) || state.ipam.get(name).is_none() {
                orphans.insert(name.to_owned());
            }
        }
        let mut removed = Vec::new();
        for instance in orphans {
            self.teardown_locked(&mut state, &instance).await?;
            tracing::info!(instance, "removed orphaned instance network");
            removed.push(instance);
        }

        // Veths and routes whose instance left no namespace file or lease.
        let host = netns::host_connection()?;
        let wanted: HashSet<String> = keep
            .iter()
            .filter(|i| state.ipam.get(i).is_some())
            .map(|i| self.host_if(i))
            .collect();
        let ours = interfaces::list_with_prefix(&host, &self.cfg.link_prefix)
            .await
            .map_err(|e| NetworkError::netlink("host links", "listing veths", e))?;
        for (index, name) in ours {
            if name.len() != self.cfg.link_prefix.len() + 8 || wanted.contains(&name) {
                continue;
            }
            interfaces::delete(&host, index).await.map_err(|e| {
                NetworkError::netlink(format!("veth {name}"), "deleting orphaned veth", e)
            })?;
            tracing::info!(host_if = %name, "removed orphaned veth");
            removed.push(format!("veth {name}"));
        }
        let leased: HashSet<Ipv4Addr> = keep.iter().filter_map(|i| state.ipam.get(i)).collect();
        let instance_routes = routes::list(&host, routes::INSTANCE_PROTO)
            .await
            .map_err(|e| NetworkError::netlink("host routes", "listing instance routes", e))?;
        for route in instance_routes {
            if route.dst.prefix_len() == 32 && leased.contains(&route.dst.addr()) {
                continue;
            }
            routes::delete(&host, &route).await.map_err(|e| {
                NetworkError::netlink(format!("route {}", route.dst), "deleting orphaned route", e)
            })?;
            tracing::info!(dst = %route.dst, "removed orphaned instance route");
            removed.push(format!("route {}", route.dst));
        }
        Ok(removed)
    }

    /// Makes the set of peer pod-CIDR routes exactly `routes`: adds missing
    /// ones, replaces changed ones, removes stale ones this agent installed
    /// (route protocol [`routes::PEER_PROTO`]; nothing else is touched).
    /// See the module docs for the Direct and VXLAN layouts.
    pub async fn set_peer_routes(
        &self,
        mode: &CrossHostMode,
        peers: &[PeerRoute],
    ) -> Result<(), NetworkError> {
        let mut state = self.state.lock().await;
        let own = state.ipam.pod_cidr();
        check_peers(own, peers)?;
        let host = netns::host_connection()?;
        let current = routes::list(&host, routes::PEER_PROTO)
            .await
            .map_err(|e| NetworkError::netlink("host routes", "listing peer routes", e))?;

        let vx_index: Option<u32> = match mode {
            CrossHostMode::Direct => None,
            CrossHostMode::Vxlan {
                vni,
                device,
                local_ip,
            } => {
                let own = own.ok_or(NetworkError::NotConfigured)?;
                if device.is_empty() || device.len() > interfaces::MAX_IFNAME {
                    return Err(NetworkError::Config {
                        field: "vxlan device",
                        reason: format!("{device:?} must be 1 to 15 characters"),
                    });
                }
                let index = interfaces::ensure_vxlan(&host, device, *vni, *local_ip).await?;
                if self.cfg.mtu + interfaces::VXLAN_OVERHEAD > 1500 {
                    tracing::warn!(
                        device = %device,
                        mtu = self.cfg.mtu,
                        "instance MTU exceeds the VXLAN device's; set it to the underlay MTU minus 50 \
                         or cross-host TCP relies on path-MTU discovery and is much slower"
                    );
                }
                set_only_address(
                    &host,
                    index,
                    ipam::reserved_addr(own),
                    &format!("vxlan device {device}"),
                )
                .await?;
                sync_flood_entries(&host, index, device, peers).await?;
                Some(index)
            }
        };

        for peer in peers {
            // Direct: the node itself; VXLAN: the node's tunnel address.
            let gateway = match vx_index {
                Some(_) => ipam::reserved_addr(peer.pod_cidr),
                None => peer.via,
            };
            let up_to_date = current.iter().any(|r| {
                r.dst == peer.pod_cidr
                    && r.gateway == Some(gateway)
                    && vx_index.is_none_or(|i| r.oif == Some(i))
            });
            if up_to_date {
                continue;
            }
            routes::replace_peer(&host, peer.pod_cidr, gateway, vx_index)
                .await
                .map_err(|e| {
                    NetworkError::netlink(
                        format!("peer node {} ({} via {gateway})", peer.node, peer.pod_cidr),
                        "installing route",
                        e,
                    )
                })?;
            tracing::info!(node = %peer.node, pod_cidr = %peer.pod_cidr, %gateway, "peer route installed");
        }
        let wanted: HashSet<Ipv4Net> = peers.iter().map(|p| p.pod_cidr).collect();
        for route in current.iter().filter(|r| !wanted.contains(&r.dst)) {
            routes::delete(&host, route).await.map_err(|e| {
                NetworkError::netlink(
                    format!("route {}", route.dst),
                    "deleting stale peer route",
                    e,
                )
            })?;
            tracing::info!(pod_cidr = %route.dst, "stale peer route removed");
        }

        // A VXLAN device this process made and no longer uses goes away.
        let now = match mode {
            CrossHostMode::Vxlan { device, .. } => Some(device.clone()),
            CrossHostMode::Direct => None,
        };
        if let Some(old) = state
            .vxlan_device
            .take()
            .filter(|old| Some(old) != now.as_ref())
        {
            if let Some(link) = interfaces::get(&host, &old).await.map_err(|e| {
                NetworkError::netlink(format!("vxlan device {old}"), "looking up device", e)
            })? {
                interfaces::delete(&host, link.header.index)
                    .await
                    .map_err(|e| {
                        NetworkError::netlink(
                            format!("vxlan device {old}"),
                            "deleting unused device",
                            e,
                        )
                    })?;
                tracing::info!(device = %old, "unused VXLAN device removed");
            }
        }
        state.vxlan_device = now;
        Ok(())
    }

    async fn teardown_locked(&self, state: &mut State, instance: &str) -> Result<(), NetworkError> {
        let host_if = self.host_if(instance);
        let ns_path = self.netns_path(instance);
        let host = netns::host_connection()?;
        let object = || format!("instance {instance} (veth {host_if})");
        if let Some(link) = interfaces::get(&host, &host_if)
            .await
            .map_err(|e| NetworkError::netlink(object(), "looking up host veth", e))?
        {
            interfaces::delete(&host, link.header.index)
                .await
                .map_err(|e| NetworkError::netlink(object(), "deleting host veth", e))?;
        }
        if let Some(ip) = state.ipam.get(instance) {
            // Normally gone with the veth; a route we made on another link
            // (by hand or an older version) would still be ours to remove.
            let ours = routes::list(&host, routes::INSTANCE_PROTO)
                .await
                .map_err(|e| NetworkError::netlink(object(), "listing instance routes", e))?;
            for route in ours.iter().filter(|r| r.dst == Ipv4Net::from(ip)) {
                routes::delete(&host, route)
                    .await
                    .map_err(|e| NetworkError::netlink(object(), "deleting instance route", e))?;
            }
        }
        netns::remove(&ns_path)?;
        let released = state.ipam.release(instance)?;
        tracing::info!(instance, released = ?released, "instance network torn down");
        Ok(())
    }

    async fn converge(&self, instance: &str, net: &InstanceNetwork) -> Result<(), NetworkError> {
        let object = || format!("instance {instance} (veth {})", net.host_if);
        let ns_existed = netns::is_mounted(&net.netns_path)
            .map_err(|e| NetworkError::io("checking network namespace", &net.netns_path, e))?;
        if !ns_existed {
            // A leftover file (e.g. after a reboot) that is no longer a namespace.
            netns::remove(&net.netns_path)?;
            netns::create(&net.netns_path).await?;
        }
        let host = netns::host_connection()?;
        let inside = netns::connection_in(&net.netns_path).await?;

        let host_link = interfaces::get(&host, &net.host_if)
            .await
            .map_err(|e| NetworkError::netlink(object(), "looking up host veth", e))?;
        let eth0 = interfaces::get(&inside, interfaces::INSTANCE_IF)
            .await
            .map_err(|e| NetworkError::netlink(object(), "looking up eth0 in namespace", e))?;
        let existed = host_link.is_some() && eth0.is_some();
        if !existed {
            if let Some(link) = host_link {
                interfaces::delete(&host, link.header.index)
                    .await
                    .map_err(|e| {
                        NetworkError::netlink(object(), "deleting unpaired host veth", e)
                    })?;
            }
            if let Some(link) = eth0 {
                interfaces::delete(&inside, link.header.index)
                    .await
                    .map_err(|e| NetworkError::netlink(object(), "deleting unpaired eth0", e))?;
            }
            interfaces::create_veth(&host, &net.host_if, &net.netns_path, self.cfg.mtu).await?;
        }

        configure_inside(&inside, net.ip, existed)
            .await
            .map_err(|(step, e)| {
                NetworkError::netlink(
                    format!("{} in netns {}", object(), net.netns_path.display()),
                    step,
                    e,
                )
            })?;
        netns::disable_ipv6(&net.netns_path).await?;

        let host_if = &net.host_if;
        // The instance has a permanent neighbour entry for the gateway, so
        // proxy ARP only serves tools that flush it; forwarding is needed
        // for traffic between instances and to other hosts.
        interfaces::ensure_sysctl(
            &format!("/proc/sys/net/ipv4/conf/{host_if}/proxy_arp"),
            "1",
            "the gateway is answered only by the instance's static neighbour entry",
        )?;
        interfaces::ensure_sysctl(
            &format!("/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay"),
            "0",
            "proxy ARP answers may be delayed",
        )?;
        interfaces::ensure_sysctl(
            "/proc/sys/net/ipv4/ip_forward",
            "1",
            "IPv4 forwarding stays as it is; instances reach each other and other hosts only if it is on",
        )?;
        let link = interfaces::get(&host, host_if)
            .await
            .map_err(|e| NetworkError::netlink(object(), "looking up host veth", e))?
            .ok_or_else(|| {
                NetworkError::netlink(
                    object(),
                    "looking up host veth",
                    rtnetlink::Error::RequestFailed,
                )
            })?;
        let index = link.header.index;
        if !interfaces::is_up(&link) {
            interfaces::set_up(&host, index)
                .await
                .map_err(|e| NetworkError::netlink(object(), "bringing host veth up", e))?;
        }
        routes::replace_instance(&host, net.ip, index)
            .await
            .map_err(|e| NetworkError::netlink(object(), "installing /32 route", e))?;
        if existed {
            // An address from an older pod CIDR leaves a stale /32.
            let ours = routes::list(&host, routes::INSTANCE_PROTO)
                .await
                .map_err(|e| NetworkError::netlink(object(), "listing instance routes", e))?;
            for route in ours
                .iter()
                .filter(|r| r.oif == Some(index) && r.dst != Ipv4Net::from(net.ip))
            {
                routes::delete(&host, route)
                    .await
                    .map_err(|e| NetworkError::netlink(object(), "deleting stale /32 route", e))?;
            }
        }
        Ok(())
    }
}

/// Inside the instance namespace: lo up, eth0 up with exactly `<ip>/32`,
/// the gateway's static neighbour entry, its link route and the default
/// route. Errors carry the failed step.
async fn configure_inside(
    ns: &Handle,
    ip: Ipv4Addr,
    existed: bool,
) -> Result<(), (&'static str, rtnetlink::Error)> {
    let lo = interfaces::get(ns, "lo")
        .await
        .map_err(|e| ("looking up lo", e))?;
    if let Some(lo) = lo.filter(|l| !interfaces::is_up(l)) {
        interfaces::set_up(ns, lo.header.index)
            .await
            .map_err(|e| ("bringing lo up", e))?;
    }
    let eth0 = interfaces::get(ns, interfaces::INSTANCE_IF)
        .await
        .map_err(|e| ("looking up eth0", e))?
        .ok_or(("looking up eth0", rtnetlink::Error::RequestFailed))?;
    let index = eth0.header.index;
    if !interfaces::is_up(&eth0) {
        interfaces::set_up(ns, index)
            .await
            .map_err(|e| ("bringing eth0 up", e))?;
    }
    if existed {
        for addr in addresses(ns, index)
            .await
            .map_err(|e| ("listing eth0 addresses", e))?
        {
            if address_of(&addr) != Some(IpAddr::V4(ip)) || addr.header.prefix_len != 32 {
                ns.address()
                    .del(addr)
                    .execute()
                    .await
                    .map_err(|e| ("removing stale eth0 address", e))?;
            }
        }
    }
    ns.address()
        .add(index, IpAddr::V4(ip), 32)
        .replace()
        .execute()
        .await
        .map_err(|e| ("adding eth0 address", e))?;
    ns.neighbours()
        .add(index, IpAddr::V4(GATEWAY))
        .link_layer_address(&interfaces::HOST_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| ("adding gateway neighbour entry", e))?;
    let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    ns.route()
        .add(gw_route)
        .replace()
        .execute()
        .await
        .map_err(|e| ("adding gateway route", e))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(GATEWAY)
        .output_interface(index)
        .build();
    ns.route()
        .add(default)
        .replace()
        .execute()
        .await
        .map_err(|e| ("adding default route", e))?;
    Ok(())
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
    let all: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(all
        .into_iter()
        .filter(|a| a.header.index == index && matches!(address_of(a), Some(IpAddr::V4(_))))
        .collect())
}

fn address_of(addr: &AddressMessage) -> Option<IpAddr> {
    addr.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            addr.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

/// Gives a host link exactly the IPv4 address `<ip>/32`.
async fn set_only_address(
    host: &Handle,
    index: u32,
    ip: Ipv4Addr,
    object: &str,
) -> Result<(), NetworkError> {
    for addr in addresses(host, index)
        .await
        .map_err(|e| NetworkError::netlink(object, "listing addresses", e))?
    {
        if address_of(&addr) == Some(IpAddr::V4(ip)) && addr.header.prefix_len == 32 {
            return Ok(());
        }
        host.address()
            .del(addr)
            .execute()
            .await
            .map_err(|e| NetworkError::netlink(object, "removing stale address", e))?;
    }
    host.address()
        .add(index, IpAddr::V4(ip), 32)
        .replace()
        .execute()
        .await
        .map_err(|e| NetworkError::netlink(object, "adding tunnel address", e))
}

/// Makes the device's all-zero FDB entries exactly one per peer.
async fn sync_flood_entries(
    host: &Handle,
    index: u32,
    device: &str,
    peers: &[PeerRoute],
) -> Result<(), NetworkError> {
    let object = format!("vxlan device {device}");
    let current: HashSet<Ipv4Addr> = interfaces::flood_entries(host, index)
        .await
        .map_err(|e| NetworkError::netlink(&object, "listing FDB entries", e))?
        .into_iter()
        .collect();
    let wanted: HashSet<Ipv4Addr> = peers.iter().map(|p| p.via).collect();
    for remote in wanted.difference(&current) {
        interfaces::add_flood_entry(host, index, *remote)
            .await
            .map_err(|e| NetworkError::netlink(&object, "adding FDB entry", e))?;
    }
    for remote in current.difference(&wanted) {
        interfaces::del_flood_entry(host, index, *remote)
            .await
            .map_err(|e| NetworkError::netlink(&object, "removing FDB entry", e))?;
    }
    Ok(())
}

fn check_config(cfg: &NetworkConfig) -> Result<(), NetworkError> {
    let prefix = &cfg.link_prefix;
    if prefix.is_empty()
        || prefix.len() + 8 > interfaces::MAX_IFNAME
        || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(NetworkError::Config {
            field: "link_prefix",
            reason: format!("{prefix:?} must be 1 to 7 ASCII letters or digits"),
        });
    }
    if !cfg.netns_dir.is_absolute() {
        return Err(NetworkError::Config {
            field: "netns_dir",
            reason: format!("{} is not an absolute path", cfg.netns_dir.display()),
        });
    }
    if !(576..=65535).contains(&cfg.mtu) {
        return Err(NetworkError::Config {
            field: "mtu",
            reason: format!("{} is outside 576..=65535", cfg.mtu),
        });
    }
    Ok(())
}

/// Instance names become file names under the netns directory.
fn check_instance(name: &str) -> Result<(), NetworkError> {
    let bad = |reason| {
        Err(NetworkError::InvalidInstance {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("may only contain ASCII letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn check_peers(own: Option<Ipv4Net>, peers: &[PeerRoute]) -> Result<(), NetworkError> {
    let invalid = |p: &PeerRoute, reason: String| NetworkError::InvalidPeer {
        node: p.node.clone(),
        cidr: p.pod_cidr,
        via: p.via,
        reason,
    };
    for (i, p) in peers.iter().enumerate() {
        if p.pod_cidr.addr() != p.pod_cidr.network() {
            return Err(invalid(p, "the pod CIDR has host bits set".into()));
        }
        if let Some(own) = own {
            if own.contains(&p.pod_cidr) || p.pod_cidr.contains(&own) {
                return Err(invalid(p, format!("overlaps this node's pod CIDR {own}")));
            }
        }
        if let Some(q) = peers[..i]
            .iter()
            .find(|q| q.pod_cidr.contains(&p.pod_cidr) || p.pod_cidr.contains(&q.pod_cidr))
        {
            return Err(invalid(
                p,
                format!("overlaps the pod CIDR {} of node {}", q.pod_cidr, q.node),
            ));
        }
    }
    Ok(())
}
