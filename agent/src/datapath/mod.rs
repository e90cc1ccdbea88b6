//! The eBPF datapath of this host: identity policy, conntrack, rate limits
//! and flow events on every instance's host veth (TC), and Service load
//! balancing at the socket (cgroup `connect4`, `sendmsg4`, `recvmsg4`,
//! `getpeername4`). See `docs/datapath.md` for the semantics.
//!
//! Owns, for one agent: everything under its pin directory
//! (`<pin_dir>/v<layout>/maps/*`, `<pin_dir>/v<layout>/links/*`), the TCX
//! links on the host veths it was asked to attach, and the cgroup links on
//! its cgroup. It must not touch anything else: other agents' pins, links
//! and cgroups are never changed; nothing here creates or deletes
//! interfaces (that is [`crate::network`]).
//!
//! # Pinning and restarts
//!
//! Maps are pinned by name and reused by the next [`Datapath::load`] (same
//! layout version), so policy, identities, services and conntrack survive
//! an agent restart. Every attachment is a BPF link pinned in bpffs: it
//! keeps enforcing while no agent runs. `load` loads fresh programs and
//! swaps them into the existing pinned links (`BPF_LINK_UPDATE`), so a hook
//! is never without a program and nothing is attached twice; links whose
//! interface is gone are unpinned.
//!
//! # Writes
//!
//! The agent is the only writer of its pinned maps. The replace-set calls
//! (`set_identities`, `set_policy`, `set_enforcement`, `apply_policy`)
//! keep what they last wrote in memory (read from the pins once at load)
//! and write only the keys that changed, so changing one rule among
//! 10,000 is one map update, not a listing of the map.
//!
//! # Namespaces
//!
//! Interface names are resolved in the calling thread's network namespace:
//! call [`Datapath::load`], [`Datapath::attach_instance`] and
//! [`Datapath::detach_instance`] from the host's namespace (the agent runs
//! entirely inside it). Map writes and the flow stream work anywhere.

mod error;
mod flow_events;
mod pinned_links;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, LinkOrder};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{CgroupSockAddr, SchedClassifier, SockOps, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ironmesh_ebpf as obj;
use ironmesh_ebpf::{
    BackendKey, BackendVal, Config, CtKey, CtVal, EnforcedVal, IdentityVal, InstAddrVal, MeshAddr,
    MeshNsVal, MeshSockKey, PolicyKey, PolicyVal, RlKey, RlVal, SvcKey, SvcVal,
};

pub use error::DatapathError;
pub use flow_events::{FlowEvent, FlowEventKind, FlowMetrics, Hook, Verdict};

/// The default pin root; an agent uses `<this>/<containerd namespace>`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ironmesh";
/// The default cgroup for the socket programs (cgroup v2 root here).
pub const DEFAULT_CGROUP: &str = "/sys/fs/cgroup/unified";

/// Highest accepted rate limit and burst (new connections per second).
pub const MAX_RATE: u32 = 1_000_000;

const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (
        obj::programs::FROM_INSTANCE,
        TcAttachType::Ingress,
        "ingress",
    ),
    (obj::programs::TO_INSTANCE, TcAttachType::Egress, "egress"),
];
const CGROUP_PROGRAMS: [&str; 4] = [
    obj::programs::CONNECT4,
    obj::programs::SENDMSG4,
    obj::programs::RECVMSG4,
    obj::programs::GETPEERNAME4,
];

/// A transport protocol in rules and services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
            Protocol::Icmp => libc::IPPROTO_ICMP as u8,
        }
    }
}

/// A new-connection rate limit per source identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// New connections per second (1..=[`MAX_RATE`]).
    pub per_second: u32,
    /// Bucket size; 0 means `per_second`.
    pub burst: u32,
}

/// Which side of a flow a rule speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Lets its source into an ingress-enforced destination.
    Ingress,
    /// Lets an egress-enforced source out to its destination.
    Egress,
}

/// One allow rule: traffic from `src_identity` to `dst_identity` on `port`
/// (0: every port; must be 0 for ICMP) over `proto`. The peer side may be
/// `None`, meaning any peer (including addresses outside the mesh): the
/// source of an ingress rule, the destination of an egress rule; the other
/// side is the enforced identity and must be named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub direction: Direction,
    pub src_identity: Option<u32>,
    pub dst_identity: Option<u32>,
    pub port: u16,
    pub proto: Protocol,
    pub rate: Option<RateLimit>,
    /// Names the rule in flow events and rate buckets; 0: derived from the
    /// rule's key.
    pub rule_id: u32,
}

impl PolicyRule {
    /// Whether the datapath can hold this rule (the checks
    /// [`Datapath::apply_policy`] makes of every rule before writing any).
    pub fn check(&self) -> Result<(), DatapathError> {
        policy_entries(std::slice::from_ref(self)).map(|_| ())
    }

    /// An ingress rule: `src` (None: anyone) may open connections to `dst`.
    pub fn ingress(src: Option<u32>, dst: u32, port: u16, proto: Protocol) -> PolicyRule {
        PolicyRule {
            direction: Direction::Ingress,
            src_identity: src,
            dst_identity: Some(dst),
            port,
            proto,
            rate: None,
            rule_id: 0,
        }
    }

    /// An egress rule: `src` may open connections to `dst` (None: anyone).
    pub fn egress(src: u32, dst: Option<u32>, port: u16, proto: Protocol) -> PolicyRule {
        PolicyRule {
            direction: Direction::Egress,
            src_identity: Some(src),
            dst_identity: dst,
            port,
            proto,
            rate: None,
            rule_id: 0,
        }
    }
}

/// A Service VIP:port and its ready backends (empty: connects are refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// The datapath's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    /// Packets passed by the TC programs.
    pub allowed: u64,
    /// Packets dropped by policy.
    pub denied: u64,
    /// New connections dropped by a rate limit.
    pub rate_limited: u64,
    /// Conntrack entries created.
    pub new_flows: u64,
    /// Flow events lost (ring buffer full).
    pub events_lost: u64,
    /// Socket addresses rewritten from a VIP to a backend.
    pub lb_rewrites: u64,
    /// Connects to a VIP that had no backend (refused).
    pub lb_no_backend: u64,
    /// Packets between two local instances handed straight to the
    /// destination's eth0 (`bpf_redirect_peer`), skipping the host's
    /// forwarding path.
    pub peer_redirects: u64,
    /// TCP connects of mesh instances sent to their node proxy.
    pub mesh_captured: u64,
    /// Packets into strict mesh instances dropped as plaintext.
    pub plaintext: u64,
    /// IPv4 packets from an instance whose source was not its lease
    /// (dropped).
    pub spoofed: u64,
    /// ARP from an instance whose sender address was not its lease
    /// (dropped).
    pub arp_spoofed: u64,
    /// Frames from an instance that were neither IPv4 nor ARP (dropped).
    pub not_ipv4: u64,
    /// Frames from a veth with programs but no recorded address (dropped).
    pub no_address: u64,
    /// New flows of enforced identities refused because conntrack had no
    /// room for them.
    pub conntrack_full: u64,
}

/// Pins an attached program's link at `pin`, so the attachment outlives
/// this process (and the next agent can swap its program in).
fn pin_link<L>(link: L, pin: &Path) -> Result<(), DatapathError>
where
    L: TryInto<FdLink>,
    L::Error: std::fmt::Display,
{
    let link: FdLink = link.try_into().map_err(|e| DatapathError::Link {
        step: "converting",
        path: pin.to_path_buf(),
        message: format!("{e}"),
    })?;
    link.pin(pin).map_err(|e| DatapathError::Link {
        step: "pinning",
        path: pin.to_path_buf(),
        message: format!("{e}"),
    })?;
    Ok(())
}

/// Ids of the programs this Datapath loaded (for inspection and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramIds {
    pub from_instance: u32,
    pub to_instance: u32,
    pub connect4: u32,
}

/// Tunables written to the `im_config` map at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Periodic flow reports of live flows (0: only on close).
    pub report_interval_s: u32,
    /// Idle timeout of allowed TCP flows.
    pub ct_timeout_s: u32,
    /// Idle timeout of UDP/ICMP and refused flows.
    pub ct_short_timeout_s: u32,
    /// Packets between two local instances go straight to the
    /// destination's eth0 (`bpf_redirect_peer`, as Cilium's host routing
    /// does) instead of through the host's forwarding path; off, they are
    /// routed by the host (and visible to its netfilter FORWARD chain and
    /// to a capture on the destination's host veth). Applies to instances
    /// attached after load.
    pub peer_redirect: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            report_interval_s: 30,
            ct_timeout_s: 3600,
            ct_short_timeout_s: 60,
            peer_redirect: true,
        }
    }
}

/// The loaded datapath of one agent. Every operation is serialised.
pub struct Datapath {
    root: PathBuf,
    cgroup: PathBuf,
    cfg: DatapathConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    ebpf: Ebpf,
    identities: HashMap<MapData, u32, IdentityVal>,
    policy: HashMap<MapData, PolicyKey, PolicyVal>,
    enforced: HashMap<MapData, u32, EnforcedVal>,
    rate: HashMap<MapData, RlKey, RlVal>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    local_ifs: HashMap<MapData, u32, u32>,
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, BackendKey, BackendVal>,
    conntrack: HashMap<MapData, CtKey, CtVal>,
    inst_addr: HashMap<MapData, u32, InstAddrVal>,
    guard: PerCpuArray<MapData, u64>,
    mesh_ns: HashMap<MapData, u64, MeshNsVal>,
    mesh_pending: HashMap<MapData, MeshSockKey, MeshAddr>,
    mesh_peer: HashMap<MapData, MeshSockKey, MeshAddr>,
    flows: Option<RingBuf<MapData>>,
    /// What the policy maps hold, as last written (read from the pins
    /// once at load): replace-set calls diff against these and write only
    /// the changed keys.
    written: Written,
}

/// The last-written contents of the maps the agent replaces as sets.
#[derive(Default)]
struct Written {
    identities: BTreeMap<u32, IdentityVal>,
    policy: BTreeMap<PolicyKey, PolicyVal>,
    enforced: BTreeMap<u32, EnforcedVal>,
}

/// What changes between a map's last-written contents and the wanted set.
struct Delta<K, V> {
    upsert: Vec<(K, V)>,
    remove: Vec<K>,
}

impl<K: Ord + Copy, V: PartialEq + Copy> Delta<K, V> {
    fn between(written: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Delta<K, V> {
        Delta {
            upsert: want
                .iter()
                .filter(|(k, v)| written.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect(),
            remove: written
                .keys()
                .filter(|k| !want.contains_key(k))
                .copied()
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Writes `entries` and records each in `written` once the kernel took it,
/// so `written` stays true to the map when a write fails half-way.
fn upsert_all<K: aya::Pod + Ord + Copy, V: aya::Pod + Copy>(
    map: &mut HashMap<MapData, K, V>,
    written: &mut BTreeMap<K, V>,
    entries: &[(K, V)],
    name: &'static str,
) -> Result<(), DatapathError> {
    for (k, v) in entries {
        map.insert(k, v, 0)
            .map_err(|e| DatapathError::map("writing", name, e))?;
        written.insert(*k, *v);
    }
    Ok(())
}

/// Deletes `keys` (absent ones are fine), keeping `written` true to the map.
fn remove_all<K: aya::Pod + Ord + Copy, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    written: &mut BTreeMap<K, V>,
    keys: &[K],
    name: &'static str,
) -> Result<(), DatapathError> {
    for k in keys {
        remove_key(map, k, name)?;
        written.remove(k);
    }
    Ok(())
}

/// Every entry of a pinned map (read once at load).
fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DatapathError> {
    map.iter()
        .collect::<Result<BTreeMap<K, V>, _>>()
        .map_err(|e| DatapathError::map("reading", name, e))
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("root", &self.root)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    f: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DatapathError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { map: name })?;
    f(map).map_err(|e| DatapathError::map("opening", name, e))
}

fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    let c = std::ffi::CString::new(interface).map_err(|_| {
        DatapathError::invalid(format!("interface name {interface:?}"), "contains NUL")
    })?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DatapathError::Interface {
            interface: interface.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

/// Whether `path` is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data, valid all zeroes.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills `st`, which outlives the call; c is NUL-terminated.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

impl Datapath {
    /// Loads the datapath with maps pinned under `pin_dir` (reused if
    /// already pinned there), attaches the socket programs to `cgroup`
    /// (swapping the program of existing pinned links instead of attaching
    /// twice), and swaps the fresh TC programs into every pinned TC link
    /// whose interface still exists. Tunables default to
    /// [`DatapathConfig::default`].
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Datapath, DatapathError> {
        Self::load_with(pin_dir, cgroup, DatapathConfig::default())
    }

    /// [`Datapath::load`] with explicit tunables.
    pub fn load_with(
        pin_dir: &Path,
        cgroup: &Path,
        cfg: DatapathConfig,
    ) -> Result<Datapath, DatapathError> {
        let started = std::time::Instant::now();
        let root = pin_dir.join(format!("v{}", obj::LAYOUT_VERSION));
        let maps_dir = root.join("maps");
        let links_dir = root.join("links");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| DatapathError::io("creating pin directory", d, e))?;
        }
        if !on_bpffs(&maps_dir) {
            return Err(DatapathError::io(
                "checking pin directory",
                &maps_dir,
                std::io::Error::other("not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)"),
            ));
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(obj::DATAPATH_OBJ)
            .map_err(|source| DatapathError::Load {
                pin_dir: maps_dir.clone(),
                source: Box::new(source),
            })?;
        for (name, _, _) in TC_PROGRAMS {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load().map_err(|source| DatapathError::Program {
                step: "loading",
                program: name,
                source: Box::new(source),
            })?;
        }
        for name in CGROUP_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load().map_err(|source| DatapathError::Program {
                step: "loading",
                program: name,
                source: Box::new(source),
            })?;
        }
        {
            let p: &mut SockOps = program(&mut ebpf, obj::programs::SOCKOPS)?;
            p.load().map_err(|source| DatapathError::Program {
                step: "loading",
                program: obj::programs::SOCKOPS,
                source: Box::new(source),
            })?;
        }

        let mut inner = Inner {
            identities: take_map(&mut ebpf, obj::maps::IP_IDENTITY, HashMap::try_from)?,
            policy: take_map(&mut ebpf, obj::maps::POLICY, HashMap::try_from)?,
            enforced: take_map(&mut ebpf, obj::maps::ENFORCED, HashMap::try_from)?,
            rate: take_map(&mut ebpf, obj::maps::RATE_BUCKET, HashMap::try_from)?,
            counters: take_map(&mut ebpf, obj::maps::COUNTERS, PerCpuArray::try_from)?,
            config: take_map(&mut ebpf, obj::maps::CONFIG, Array::try_from)?,
            local_ifs: take_map(&mut ebpf, obj::maps::LOCAL_IFS, HashMap::try_from)?,
            services: take_map(&mut ebpf, obj::maps::SERVICES, HashMap::try_from)?,
            backends: take_map(&mut ebpf, obj::maps::BACKENDS, HashMap::try_from)?,
            conntrack: take_map(&mut ebpf, obj::maps::CONNTRACK, HashMap::try_from)?,
            inst_addr: take_map(&mut ebpf, obj::maps::INST_ADDR, HashMap::try_from)?,
            guard: take_map(&mut ebpf, obj::maps::GUARD_CNT, PerCpuArray::try_from)?,
            mesh_ns: take_map(&mut ebpf, obj::maps::MESH_NS, HashMap::try_from)?,
            mesh_pending: take_map(&mut ebpf, obj::maps::MESH_PENDING, HashMap::try_from)?,
            mesh_peer: take_map(&mut ebpf, obj::maps::MESH_PEER, HashMap::try_from)?,
            flows: Some(take_map(&mut ebpf, obj::maps::FLOWS, RingBuf::try_from)?),
            written: Written::default(),
            ebpf,
        };
        // The pinned maps may hold what a previous agent wrote: read them
        // once; from here on only changed keys are written.
        inner.written = Written {
            identities: read_all(&inner.identities, obj::maps::IP_IDENTITY)?,
            policy: read_all(&inner.policy, obj::maps::POLICY)?,
            enforced: read_all(&inner.enforced, obj::maps::ENFORCED)?,
        };

        let mut c = inner
            .config
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", obj::maps::CONFIG, e))?;
        c.report_interval_s = cfg.report_interval_s;
        c.ct_timeout_s = cfg.ct_timeout_s;
        c.ct_short_timeout_s = cfg.ct_short_timeout_s;
        inner
            .config
            .set(0, c, 0)
            .map_err(|e| DatapathError::map("writing", obj::maps::CONFIG, e))?;

        let dp = Datapath {
            root,
            cgroup: cgroup.to_path_buf(),
            cfg,
            inner: Mutex::new(inner),
        };
        {
            let mut inner = dp.lock();
            dp.attach_cgroup(&mut inner)?;
            dp.reattach_tc(&mut inner)?;
            dp.apply_instance_flags(&mut inner)?;
        }
        tracing::info!(
            pin_dir = %dp.root.display(),
            cgroup = %dp.cgroup.display(),
            policy_gen = c.policy_gen,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "datapath loaded"
        );
        Ok(dp)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The directory holding this datapath's pins (`<pin_dir>/v<layout>`).
    pub fn pin_root(&self) -> &Path {
        &self.root
    }

    fn attach_cgroup(&self, inner: &mut Inner) -> Result<(), DatapathError> {
        let cg = File::open(&self.cgroup)
            .map_err(|e| DatapathError::io("opening cgroup", &self.cgroup, e))?;
        let ino = cg
            .metadata()
            .map_err(|e| DatapathError::io("reading cgroup", &self.cgroup, e))?
            .ino();
        let links = self.links_dir();
        let prefix = format!("cgroup-{ino}-");
        // Links left on another cgroup (the configured cgroup changed).
        for entry in read_dir(&links)? {
            if entry.starts_with("cgroup-") && !entry.starts_with(&prefix) {
                let path = links.join(&entry);
                tracing::info!(link = %path.display(), "detaching socket program from a previous cgroup");
                remove_pin(&path)?;
            }
        }
        for name in CGROUP_PROGRAMS {
            let pin = links.join(format!("{prefix}{name}"));
            let p: &mut CgroupSockAddr = program(&mut inner.ebpf, name)?;
            let fd = p.fd().map_err(|source| DatapathError::Program {
                step: "getting fd of",
                program: name,
                source: Box::new(source),
            })?;
            if swap_into_pinned(&pin, fd.as_fd(), name)? {
                continue;
            }
            let id = p.attach(&cg, CgroupAttachMode::Single).map_err(|source| {
                DatapathError::Attach {
                    step: "attaching",
                    program: name,
                    interface: self.cgroup.display().to_string(),
                    source: Box::new(source),
                }
            })?;
            let link = p.take_link(id).map_err(|source| DatapathError::Program {
                step: "taking link of",
                program: name,
                source: Box::new(source),
            })?;
            pin_link(link, &pin)?;
            tracing::info!(program = name, cgroup = %self.cgroup.display(), "attached socket program");
        }
        // The mesh's sockops program, pinned and swapped like the others.
        let name = obj::programs::SOCKOPS;
        let pin = links.join(format!("{prefix}{name}"));
        let p: &mut SockOps = program(&mut inner.ebpf, name)?;
        let fd = p.fd().map_err(|source| DatapathError::Program {
            step: "getting fd of",
            program: name,
            source: Box::new(source),
        })?;
        if swap_into_pinned(&pin, fd.as_fd(), name)? {
            return Ok(());
        }
        let id =
            p.attach(&cg, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Attach {
                    step: "attaching",
                    program: name,
                    interface: self.cgroup.display().to_string(),
                    source: Box::new(source),
                })?;
        let link = p.take_link(id).map_err(|source| DatapathError::Program {
            step: "taking link of",
            program: name,
            source: Box::new(source),
        })?;
        pin_link(link, &pin)?;
        tracing::info!(program = name, cgroup = %self.cgroup.display(), "attached socket program");
        Ok(())
    }

    /// Swaps the freshly loaded TC programs into every pinned TC link;
    /// unpins links whose interface is gone.
    fn reattach_tc(&self, inner: &mut Inner) -> Result<(), DatapathError> {
        let links = self.links_dir();
        for entry in read_dir(&links)? {
            let Some(rest) = entry.strip_prefix("tc-") else {
                continue;
            };
            let Some((interface, dir)) = rest.rsplit_once('-') else {
                continue;
            };
            let Some((name, _, _)) = TC_PROGRAMS.iter().find(|(_, _, d)| *d == dir) else {
                continue;
            };
            let path = links.join(&entry);
            let p: &mut SchedClassifier = program(&mut inner.ebpf, name)?;
            let fd = p.fd().map_err(|source| DatapathError::Program {
                step: "getting fd of",
                program: name,
                source: Box::new(source),
            })?;
            let live = ifindex(interface).ok();
            match (live, pinned_links::update_pinned(&path, fd.as_fd())) {
                (Some(idx), Ok(())) => {
                    inner
                        .local_ifs
                        .insert(idx, 1, 0)
                        .map_err(|e| DatapathError::map("writing", obj::maps::LOCAL_IFS, e))?;
                    tracing::debug!(
                        interface,
                        program = name,
                        "re-attached TC program to pinned link"
                    );
                }
                (_, res) => {
                    tracing::info!(interface, link = %path.display(), error = ?res.err(), "interface gone; unpinning its TC link");
                    remove_pin(&path)?;
                }
            }
        }
        Ok(())
    }

    fn instance_flags(&self) -> u32 {
        if self.cfg.peer_redirect {
            0
        } else {
            obj::INST_HOST_ROUTED
        }
    }

    /// Instances a previous agent attached keep their address entry: give
    /// them this agent's delivery setting.
    fn apply_instance_flags(&self, inner: &mut Inner) -> Result<(), DatapathError> {
        let want = self.instance_flags();
        let stale: Vec<(u32, InstAddrVal)> = inner
            .inst_addr
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.flags != want)
            .collect();
        for (idx, mut v) in stale {
            v.flags = want;
            inner
                .inst_addr
                .insert(idx, v, 0)
                .map_err(|e| DatapathError::map("writing", obj::maps::INST_ADDR, e))?;
        }
        Ok(())
    }

    /// Attaches the TC programs to an instance's host-side veth (ingress:
    /// traffic from the instance; egress: traffic into it), with `addr`,
    /// the address leased to the instance, as the only source its packets
    /// may carry (anti-spoofing; also the only ARP sender). Idempotent: a
    /// pinned link for this interface gets the current program swapped in.
    ///
    /// Each new TCX attachment waits for an RCU grace period in the kernel
    /// (under the RTNL lock), so this takes tens of milliseconds on a busy
    /// host; the programs themselves are loaded once, in [`Datapath::load`].
    pub fn attach_instance(&self, host_if: &str, addr: Ipv4Addr) -> Result<(), DatapathError> {
        let started = std::time::Instant::now();
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(DatapathError::invalid(
                format!("address of {host_if}"),
                format!("{addr} cannot be an instance's address"),
            ));
        }
        let idx = ifindex(host_if)?;
        let mut inner = self.lock();
        let links = self.links_dir();
        // The address first: from the moment a program runs on this veth
        // it passes only this source (a veth without one passes nothing).
        inner
            .inst_addr
            .insert(
                idx,
                InstAddrVal {
                    addr: obj::addr_be(addr),
                    flags: self.instance_flags(),
                },
                0,
            )
            .map_err(|e| DatapathError::map("writing", obj::maps::INST_ADDR, e))?;
        for (name, attach_type, dir) in TC_PROGRAMS {
            let pin = links.join(format!("tc-{host_if}-{dir}"));
            let p: &mut SchedClassifier = program(&mut inner.ebpf, name)?;
            let fd = p.fd().map_err(|source| DatapathError::Program {
                step: "getting fd of",
                program: name,
                source: Box::new(source),
            })?;
            match pinned_links::update_pinned(&pin, fd.as_fd()) {
                Ok(()) => continue,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    // A link of a deleted interface of the same name.
                    tracing::info!(interface = host_if, link = %pin.display(), error = %e, "stale TC link; attaching anew");
                    remove_pin(&pin)?;
                }
            }
            let id = p
                .attach_with_options(
                    host_if,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|source| DatapathError::Attach {
                    step: "attaching",
                    program: name,
                    interface: host_if.to_string(),
                    source: Box::new(source),
                })?;
            let link = p.take_link(id).map_err(|source| DatapathError::Program {
                step: "taking link of",
                program: name,
                source: Box::new(source),
            })?;
            pin_link(link, &pin)?;
        }
        inner
            .local_ifs
            .insert(idx, 1, 0)
            .map_err(|e| DatapathError::map("writing", obj::maps::LOCAL_IFS, e))?;
        tracing::info!(
            interface = host_if,
            ifindex = idx,
            %addr,
            elapsed_us = started.elapsed().as_micros() as u64,
            "datapath attached to instance veth"
        );
        Ok(())
    }

    /// Detaches the TC programs from an instance's veth (unpins its links).
    /// Idempotent; works after the interface is gone.
    pub fn detach_instance(&self, host_if: &str) -> Result<(), DatapathError> {
        let mut inner = self.lock();
        let links = self.links_dir();
        // Out of the local list first: other instances' programs skip
        // packets from listed veths, trusting this veth's own program.
        let idx = ifindex(host_if).ok();
        if let Some(idx) = idx {
            match inner.local_ifs.remove(&idx) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map("deleting from", obj::maps::LOCAL_IFS, e)),
            }
        }
        for (_, _, dir) in TC_PROGRAMS {
            remove_pin(&links.join(format!("tc-{host_if}-{dir}")))?;
        }
        // The address last, once no program of this veth runs.
        if let Some(idx) = idx {
            remove_key(&mut inner.inst_addr, &idx, obj::maps::INST_ADDR)?;
        }
        tracing::info!(interface = host_if, "datapath detached from instance veth");
        Ok(())
    }

    /// Host veths with pinned TC links.
    pub fn attached_instances(&self) -> Result<Vec<String>, DatapathError> {
        let mut out = BTreeSet::new();
        for entry in read_dir(&self.links_dir())? {
            if let Some((interface, _)) = entry.strip_prefix("tc-").and_then(|r| r.rsplit_once('-'))
            {
                out.insert(interface.to_string());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Detaches every instance veth not in `keep` (garbage collection after
    /// a restart).
    pub fn retain_instances(&self, keep: &HashSet<String>) -> Result<(), DatapathError> {
        for interface in self.attached_instances()? {
            if !keep.contains(&interface) {
                self.detach_instance(&interface)?;
            }
        }
        Ok(())
    }

    fn bump_policy_gen(inner: &mut Inner) -> Result<u32, DatapathError> {
        let mut c = inner
            .config
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", obj::maps::CONFIG, e))?;
        c.policy_gen = c.policy_gen.wrapping_add(1);
        inner
            .config
            .set(0, c, 0)
            .map_err(|e| DatapathError::map("writing", obj::maps::CONFIG, e))?;
        Ok(c.policy_gen)
    }

    /// Replaces the address → identity set (cluster-wide): writes the
    /// entries that are new or changed since the last write, then removes
    /// those no longer listed. Nothing is written (and flows are not judged
    /// again) when nothing changed.
    pub fn set_identities(&self, entries: &[(Ipv4Addr, u32)]) -> Result<(), DatapathError> {
        let with_flags: Vec<(Ipv4Addr, u32, u32)> =
            entries.iter().map(|(ip, id)| (*ip, *id, 0)).collect();
        self.set_identities_with_flags(&with_flags)
    }

    /// [`Datapath::set_identities`] with each address's `ID_*` mesh flags.
    pub fn set_identities_with_flags(
        &self,
        entries: &[(Ipv4Addr, u32, u32)],
    ) -> Result<(), DatapathError> {
        let mut want: BTreeMap<u32, IdentityVal> = BTreeMap::new();
        for (ip, id, flags) in entries {
            if *id == obj::IDENTITY_ANY {
                return Err(DatapathError::invalid(
                    format!("identity of {ip}"),
                    format!("{id} is reserved"),
                ));
            }
            let val = IdentityVal {
                identity: *id,
                flags: *flags,
            };
            if let Some(prev) = want.insert(obj::addr_be(*ip), val) {
                if prev.identity != *id {
                    return Err(DatapathError::invalid(
                        format!("identity of {ip}"),
                        format!("given twice ({} and {id})", prev.identity),
                    ));
                }
            }
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let delta = Delta::between(&inner.written.identities, &want);
        if delta.is_empty() {
            return Ok(());
        }
        upsert_all(
            &mut inner.identities,
            &mut inner.written.identities,
            &delta.upsert,
            obj::maps::IP_IDENTITY,
        )?;
        remove_all(
            &mut inner.identities,
            &mut inner.written.identities,
            &delta.remove,
            obj::maps::IP_IDENTITY,
        )?;
        let gen = Self::bump_policy_gen(inner)?;
        tracing::debug!(
            entries = want.len(),
            written = delta.upsert.len(),
            removed = delta.remove.len(),
            policy_gen = gen,
            "identities written"
        );
        Ok(())
    }

    /// Marks the network namespace with cookie `netns` as a mesh instance's:
    /// its TCP connects to remote mesh instances go to its outbound listener.
    pub fn mesh_namespace_add(&self, netns: u64, flags: u32) -> Result<(), DatapathError> {
        self.lock()
            .mesh_ns
            .insert(netns, MeshNsVal { flags, pad: 0 }, 0)
            .map_err(|e| DatapathError::map("writing", obj::maps::MESH_NS, e))
    }

    /// Undoes [`Datapath::mesh_namespace_add`]; a missing entry is fine.
    pub fn mesh_namespace_remove(&self, netns: u64) -> Result<(), DatapathError> {
        match self.lock().mesh_ns.remove(&netns) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DatapathError::map("removing from", obj::maps::MESH_NS, e)),
        }
    }

    /// The original destination of the captured connection whose client is
    /// `client` in namespace `netns`, taken out of the map.
    pub fn mesh_take_original(
        &self,
        netns: u64,
        client: std::net::SocketAddrV4,
    ) -> Result<Option<std::net::SocketAddrV4>, DatapathError> {
        let k = MeshSockKey {
            netns,
            addr: obj::addr_be(*client.ip()),
            port: obj::port_be(client.port()),
            pad: 0,
        };
        let mut inner = self.lock();
        let v = match inner.mesh_pending.get(&k, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(DatapathError::map("reading", obj::maps::MESH_PENDING, e)),
        };
        let _ = inner.mesh_pending.remove(&k);
        Ok(Some(std::net::SocketAddrV4::new(
            obj::addr_from_be(v.addr),
            obj::port_from_be(v.port),
        )))
    }

    /// Until [`Datapath::mesh_peer_remove`]: the instance in `netns` sees
    /// `original` as the peer of its socket connected from `local` (the
    /// proxy's delivery socket).
    pub fn mesh_peer_set(
        &self,
        netns: u64,
        local: std::net::SocketAddrV4,
        original: std::net::SocketAddrV4,
    ) -> Result<(), DatapathError> {
        let k = mesh_key(netns, local);
        let v = MeshAddr {
            addr: obj::addr_be(*original.ip()),
            port: obj::port_be(original.port()),
            pad: 0,
        };
        self.lock()
            .mesh_peer
            .insert(k, v, 0)
            .map_err(|e| DatapathError::map("writing", obj::maps::MESH_PEER, e))
    }

    /// Undoes [`Datapath::mesh_peer_set`].
    pub fn mesh_peer_remove(&self, netns: u64, local: std::net::SocketAddrV4) {
        let _ = self.lock().mesh_peer.remove(&mesh_key(netns, local));
    }

    /// Replaces the rule set, keeping the enforced identities. See
    /// [`Datapath::apply_policy`].
    pub fn set_policy(&self, rules: &[PolicyRule]) -> Result<(), DatapathError> {
        let want = policy_entries(rules)?;
        let mut inner = self.lock();
        Self::write_policy(&mut inner, Some(&want), None)
    }

    /// Replaces the set of identities under ingress policy (default deny
    /// for incoming connections); no identity stays egress-enforced. See
    /// [`Datapath::set_enforcement`].
    pub fn set_enforced(&self, identities: &[u32]) -> Result<(), DatapathError> {
        self.set_enforcement(identities, &[])
    }

    /// Replaces the enforced identities, keeping the rules: `ingress` are
    /// default-deny for new incoming connections, `egress` for new outgoing
    /// ones (an identity may be in both). Replies of allowed connections
    /// pass either way. See [`Datapath::apply_policy`].
    pub fn set_enforcement(&self, ingress: &[u32], egress: &[u32]) -> Result<(), DatapathError> {
        let want = enforced_entries(ingress, egress)?;
        let mut inner = self.lock();
        Self::write_policy(&mut inner, None, Some(&want))
    }

    /// Replaces the rule set and the enforced identities together (what an
    /// assignment carries). Validates everything first (nothing is
    /// half-applied), then writes only what changed since the last write,
    /// in an order that never denies a flow both the old and the new policy
    /// allow: new and changed rules, then enforcement lifted, then
    /// enforcement added, then stale rules (and their rate buckets) removed.
    /// A flow judged in between may see the union of old and new grants;
    /// the policy generation is bumped last, so every live flow is judged
    /// again on its next packet under the final policy. Programs are not
    /// touched; nothing is written when nothing changed.
    pub fn apply_policy(
        &self,
        rules: &[PolicyRule],
        ingress: &[u32],
        egress: &[u32],
    ) -> Result<(), DatapathError> {
        let rules = policy_entries(rules)?;
        let enforced = enforced_entries(ingress, egress)?;
        let mut inner = self.lock();
        Self::write_policy(&mut inner, Some(&rules), Some(&enforced))
    }

    fn write_policy(
        inner: &mut Inner,
        rules: Option<&BTreeMap<PolicyKey, PolicyVal>>,
        enforced: Option<&BTreeMap<u32, EnforcedVal>>,
    ) -> Result<(), DatapathError> {
        let rules = rules.map(|w| Delta::between(&inner.written.policy, w));
        let enforced = enforced.map(|w| Delta::between(&inner.written.enforced, w));
        let rules = rules.unwrap_or(Delta {
            upsert: vec![],
            remove: vec![],
        });
        let enforced = enforced.unwrap_or(Delta {
            upsert: vec![],
            remove: vec![],
        });
        if rules.is_empty() && enforced.is_empty() {
            return Ok(());
        }
        let steps = enforcement_steps(&inner.written.enforced, &enforced);
        // Rate buckets of rules that go or change may be stale afterwards.
        let mut bucket_ids: HashSet<u32> = HashSet::new();
        for k in rules
            .remove
            .iter()
            .chain(rules.upsert.iter().map(|(k, _)| k))
        {
            if let Some(old) = inner.written.policy.get(k) {
                if old.rate_per_sec > 0 {
                    bucket_ids.insert(old.rule_id);
                }
            }
        }

        let name = obj::maps::POLICY;
        // A rule that cannot be written (a full map) must not leave its
        // identity unenforced: enforcement is written regardless, so the
        // flows the missing rules would allow are denied (and counted),
        // never let through by default.
        let rules_failed = upsert_all(
            &mut inner.policy,
            &mut inner.written.policy,
            &rules.upsert,
            name,
        )
        .err();
        let name = obj::maps::ENFORCED;
        upsert_all(
            &mut inner.enforced,
            &mut inner.written.enforced,
            &steps.lift,
            name,
        )?;
        remove_all(
            &mut inner.enforced,
            &mut inner.written.enforced,
            &steps.lift_remove,
            name,
        )?;
        upsert_all(
            &mut inner.enforced,
            &mut inner.written.enforced,
            &steps.add,
            name,
        )?;
        let name = obj::maps::POLICY;
        remove_all(
            &mut inner.policy,
            &mut inner.written.policy,
            &rules.remove,
            name,
        )?;
        let rules_failed = match rules_failed {
            None => None,
            Some(first) => {
                // Removing stale rules may have made room: try the rest once.
                let left: Vec<(PolicyKey, PolicyVal)> = rules
                    .upsert
                    .iter()
                    .filter(|(k, v)| inner.written.policy.get(k) != Some(v))
                    .copied()
                    .collect();
                upsert_all(&mut inner.policy, &mut inner.written.policy, &left, name)
                    .err()
                    .map(|_| (first, left.len()))
            }
        };

        let mut buckets_removed = 0;
        if !bucket_ids.is_empty() {
            for v in inner.written.policy.values() {
                if v.rate_per_sec > 0 {
                    bucket_ids.remove(&v.rule_id);
                }
            }
        }
        if !bucket_ids.is_empty() {
            let stale: Vec<RlKey> = collect_keys(&inner.rate, obj::maps::RATE_BUCKET)?
                .into_iter()
                .filter(|k| bucket_ids.contains(&k.rule_id))
                .collect();
            for k in &stale {
                remove_key(&mut inner.rate, k, obj::maps::RATE_BUCKET)?;
            }
            buckets_removed = stale.len();
        }
        let gen = Self::bump_policy_gen(inner)?;
        if let Some((error, missing)) = rules_failed {
            tracing::error!(
                rules = inner.written.policy.len(),
                missing,
                enforced = inner.written.enforced.len(),
                policy_gen = gen,
                %error,
                "policy rules not written; enforcement applied, so the flows they allow are denied"
            );
            return Err(DatapathError::RulesNotWritten {
                missing,
                source: Box::new(error),
            });
        }
        tracing::info!(
            rules = inner.written.policy.len(),
            rules_written = rules.upsert.len(),
            rules_removed = rules.remove.len(),
            enforced = inner.written.enforced.len(),
            enforced_changed = enforced.upsert.len() + enforced.remove.len(),
            buckets_removed,
            policy_gen = gen,
            "policy written"
        );
        Ok(())
    }

    /// Replaces the Service table. A service keeps its id across calls
    /// (same VIP, port, protocol); backends are written before the count
    /// grows and deleted after it shrinks, so a concurrent connect never
    /// picks an empty slot.
    pub fn set_services(&self, services: &[ServiceEntry]) -> Result<(), DatapathError> {
        let mut want: BTreeMap<SvcKey, &ServiceEntry> = BTreeMap::new();
        for s in services {
            if s.proto == Protocol::Icmp {
                return Err(DatapathError::invalid(
                    format!("service {}:{}", s.vip, s.port),
                    "protocol must be TCP or UDP",
                ));
            }
            if s.backends.len() > 4096 {
                return Err(DatapathError::invalid(
                    format!("service {}:{}", s.vip, s.port),
                    "more than 4096 backends",
                ));
            }
            let key = SvcKey {
                vip: obj::addr_be(s.vip),
                port: obj::port_be(s.port),
                proto: s.proto.number(),
                pad: 0,
            };
            if want.insert(key, s).is_some() {
                return Err(DatapathError::invalid(
                    format!("service {}:{} {:?}", s.vip, s.port, s.proto),
                    "listed twice",
                ));
            }
        }
        let mut inner = self.lock();
        let mut current: BTreeMap<SvcKey, SvcVal> = BTreeMap::new();
        for k in collect_keys(&inner.services, obj::maps::SERVICES)? {
            match inner.services.get(&k, 0) {
                Ok(v) => {
                    current.insert(k, v);
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map("reading", obj::maps::SERVICES, e)),
            }
        }
        let mut used: BTreeSet<u32> = current.values().map(|v| v.service_id).collect();
        let mut next_id = 1u32;
        for (key, s) in &want {
            let old = current.get(key).copied();
            let id = match old {
                Some(v) => v.service_id,
                None => {
                    while used.contains(&next_id) {
                        next_id += 1;
                    }
                    used.insert(next_id);
                    next_id
                }
            };
            for (slot, (ip, port)) in s.backends.iter().enumerate() {
                inner
                    .backends
                    .insert(
                        BackendKey {
                            service_id: id,
                            slot: slot as u32,
                        },
                        BackendVal {
                            addr: obj::addr_be(*ip),
                            port: obj::port_be(*port),
                            pad: 0,
                        },
                        0,
                    )
                    .map_err(|e| DatapathError::map("writing", obj::maps::BACKENDS, e))?;
            }
            let count = s.backends.len() as u32;
            inner
                .services
                .insert(
                    key,
                    SvcVal {
                        service_id: id,
                        backend_count: count,
                    },
                    0,
                )
                .map_err(|e| DatapathError::map("writing", obj::maps::SERVICES, e))?;
            if let Some(old) = old {
                for slot in count..old.backend_count {
                    remove_key(
                        &mut inner.backends,
                        &BackendKey {
                            service_id: id,
                            slot,
                        },
                        obj::maps::BACKENDS,
                    )?;
                }
            }
        }
        for (key, old) in &current {
            if want.contains_key(key) {
                continue;
            }
            remove_key(&mut inner.services, key, obj::maps::SERVICES)?;
            for slot in 0..old.backend_count {
                remove_key(
                    &mut inner.backends,
                    &BackendKey {
                        service_id: old.service_id,
                        slot,
                    },
                    obj::maps::BACKENDS,
                )?;
            }
        }
        tracing::info!(services = want.len(), "services written");
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<DatapathCounters, DatapathError> {
        let inner = self.lock();
        let get = |i: u32| -> Result<u64, DatapathError> {
            let v = inner
                .counters
                .get(&i, 0)
                .map_err(|e| DatapathError::map("reading", obj::maps::COUNTERS, e))?;
            Ok(v.iter().sum())
        };
        let guard = |i: u32| -> Result<u64, DatapathError> {
            let v = inner
                .guard
                .get(&i, 0)
                .map_err(|e| DatapathError::map("reading", obj::maps::GUARD_CNT, e))?;
            Ok(v.iter().sum())
        };
        Ok(DatapathCounters {
            allowed: get(obj::CNT_ALLOWED)?,
            denied: get(obj::CNT_DENIED)?,
            rate_limited: get(obj::CNT_RATE_LIMITED)?,
            new_flows: get(obj::CNT_NEW_FLOWS)?,
            events_lost: get(obj::CNT_EVENTS_LOST)?,
            lb_rewrites: get(obj::CNT_LB_REWRITES)?,
            lb_no_backend: get(obj::CNT_LB_NO_BACKEND)?,
            peer_redirects: get(obj::CNT_PEER_REDIRECTS)?,
            mesh_captured: get(obj::CNT_MESH_CAPTURED)?,
            plaintext: get(obj::CNT_PLAINTEXT)?,
            spoofed: guard(obj::GUARD_SPOOFED)?,
            arp_spoofed: guard(obj::GUARD_ARP_SPOOFED)?,
            not_ipv4: guard(obj::GUARD_NOT_IPV4)?,
            no_address: guard(obj::GUARD_NO_ADDR)?,
            conntrack_full: guard(obj::GUARD_CT_FULL)?,
        })
    }

    /// Number of conntrack entries (live and not yet expired or evicted).
    pub fn conntrack_len(&self) -> Result<usize, DatapathError> {
        let inner = self.lock();
        Ok(collect_keys(&inner.conntrack, obj::maps::CONNTRACK)?.len())
    }

    /// The current policy generation (bumped by every policy-related write).
    pub fn policy_generation(&self) -> Result<u32, DatapathError> {
        let inner = self.lock();
        Ok(inner
            .config
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", obj::maps::CONFIG, e))?
            .policy_gen)
    }

    /// Kernel ids of the programs this Datapath loaded.
    pub fn program_ids(&self) -> Result<ProgramIds, DatapathError> {
        let mut inner = self.lock();
        let mut id = |name: &'static str| -> Result<u32, DatapathError> {
            let p = inner
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { program: name })?;
            let info = p.info().map_err(|source| DatapathError::Program {
                step: "reading info of",
                program: name,
                source: Box::new(source),
            })?;
            Ok(info.id())
        };
        Ok(ProgramIds {
            from_instance: id(obj::programs::FROM_INSTANCE)?,
            to_instance: id(obj::programs::TO_INSTANCE)?,
            connect4: id(obj::programs::CONNECT4)?,
        })
    }

    /// Starts reading the flow ring buffer on the current tokio runtime.
    /// Events go to the returned channel (bounded; when it is full, events
    /// are dropped and a warning with the `dropped` count is logged). Can be
    /// taken once per Datapath; the reader stops when the receiver is
    /// dropped.
    pub fn flows(&self) -> Result<tokio::sync::mpsc::Receiver<FlowEvent>, DatapathError> {
        let ring = self.lock().flows.take().ok_or(DatapathError::FlowsTaken)?;
        flow_events::spawn_reader(ring)
    }

    /// Detaches everything a datapath pinned under `pin_dir` (TC and cgroup
    /// links) and removes its maps and the directory. For decommissioning
    /// and test cleanup; works without a loaded Datapath.
    pub fn purge(pin_dir: &Path) -> Result<(), DatapathError> {
        match std::fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::io("removing pin directory", pin_dir, e)),
        }
    }
}

/// Swaps `fd`'s program into the cgroup link pinned at `pin`: true if
/// done; false if there is none (or it was unusable and is now removed),
/// so the caller attaches anew.
fn swap_into_pinned(
    pin: &Path,
    fd: std::os::fd::BorrowedFd<'_>,
    name: &'static str,
) -> Result<bool, DatapathError> {
    match pinned_links::update_pinned(pin, fd) {
        Ok(()) => {
            tracing::debug!(program = name, link = %pin.display(), "swapped program into pinned cgroup link");
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => {
            tracing::warn!(program = name, link = %pin.display(), error = %e, "pinned cgroup link unusable; attaching anew");
            remove_pin(pin)?;
            Ok(false)
        }
    }
}

fn mesh_key(netns: u64, a: std::net::SocketAddrV4) -> MeshSockKey {
    MeshSockKey {
        netns,
        addr: obj::addr_be(*a.ip()),
        port: obj::port_be(a.port()),
        pad: 0,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { program: name })?;
    p.try_into().map_err(|source| DatapathError::Program {
        step: "typing",
        program: name,
        source: Box::new(source),
    })
}

fn read_dir(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if is_not_found(&e) => return Ok(vec![]),
        Err(e) => return Err(DatapathError::io("listing", dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DatapathError::io("listing", dir, e))?;
        if let Some(name) = e.file_name().to_str() {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(DatapathError::io("unpinning", path, e)),
    }
}

fn collect_keys<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<K>, DatapathError> {
    map.keys()
        .collect::<Result<Vec<K>, _>>()
        .map_err(|e| DatapathError::map("listing", name, e))
}

fn remove_key<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(DatapathError::map("deleting from", name, e)),
    }
}

/// An enforcement change in the order that never denies what both the old
/// and the new state allow: first `lift` (flags only dropped) and
/// `lift_remove` (identity no longer enforced), then `add`.
#[derive(Debug, PartialEq, Eq)]
struct EnforcementSteps {
    lift: Vec<(u32, EnforcedVal)>,
    lift_remove: Vec<u32>,
    add: Vec<(u32, EnforcedVal)>,
}

fn enforcement_steps(
    written: &BTreeMap<u32, EnforcedVal>,
    delta: &Delta<u32, EnforcedVal>,
) -> EnforcementSteps {
    let mut steps = EnforcementSteps {
        lift: Vec::new(),
        lift_remove: delta.remove.clone(),
        add: Vec::new(),
    };
    for (id, new) in &delta.upsert {
        let old = written.get(id).map_or(0, |v| v.enforced);
        if new.enforced & !old == 0 {
            steps.lift.push((*id, *new));
            continue;
        }
        // Trading one direction for another: keep only what both share
        // until the rules are in place for the new one.
        let shared = old & new.enforced;
        if old != shared {
            if shared == 0 {
                steps.lift_remove.push(*id);
            } else {
                steps.lift.push((*id, EnforcedVal { enforced: shared }));
            }
        }
        steps.add.push((*id, *new));
    }
    steps
}

/// Validates `rules` and keys them as in `im_policy`.
fn policy_entries(rules: &[PolicyRule]) -> Result<BTreeMap<PolicyKey, PolicyVal>, DatapathError> {
    let mut want: BTreeMap<PolicyKey, PolicyVal> = BTreeMap::new();
    for r in rules {
        let what = || {
            format!(
                "{:?} rule {:?} -> {:?} port {} {:?}",
                r.direction, r.src_identity, r.dst_identity, r.port, r.proto
            )
        };
        if r.dst_identity == Some(obj::IDENTITY_ANY) || r.src_identity == Some(obj::IDENTITY_ANY) {
            return Err(DatapathError::invalid(
                what(),
                "identity 4294967295 is reserved",
            ));
        }
        // The enforced side must be named; only the peer may be "any".
        let (src, dst, dir) = match (r.direction, r.src_identity, r.dst_identity) {
            (Direction::Ingress, src, Some(dst)) => {
                (src.unwrap_or(obj::IDENTITY_ANY), dst, obj::DIR_INGRESS)
            }
            (Direction::Egress, Some(src), dst) => {
                (src, dst.unwrap_or(obj::IDENTITY_ANY), obj::DIR_EGRESS)
            }
            (Direction::Ingress, _, None) => {
                return Err(DatapathError::invalid(
                    what(),
                    "an ingress rule must name its destination",
                ))
            }
            (Direction::Egress, None, _) => {
                return Err(DatapathError::invalid(
                    what(),
                    "an egress rule must name its source",
                ))
            }
        };
        if r.proto == Protocol::Icmp && r.port != 0 {
            return Err(DatapathError::invalid(what(), "ICMP rules take port 0"));
        }
        let (rate, burst) = match r.rate {
            None => (0, 0),
            Some(l) => {
                if l.per_second == 0 || l.per_second > MAX_RATE || l.burst > MAX_RATE {
                    return Err(DatapathError::invalid(
                        what(),
                        format!("rate limit must be 1..={MAX_RATE} per second, burst at most {MAX_RATE}"),
                    ));
                }
                (l.per_second, l.burst)
            }
        };
        let key = PolicyKey {
            src_identity: src,
            dst_identity: dst,
            dport: obj::port_be(r.port),
            proto: r.proto.number(),
            dir,
        };
        let rule_id = if r.rule_id != 0 {
            r.rule_id
        } else {
            derived_rule_id(&key)
        };
        want.insert(
            key,
            PolicyVal {
                flags: obj::POLICY_ALLOW,
                rule_id,
                rate_per_sec: rate,
                burst,
            },
        );
    }
    Ok(want)
}

/// Validates the enforced identities and merges them into `im_enforced`
/// values.
fn enforced_entries(
    ingress: &[u32],
    egress: &[u32],
) -> Result<BTreeMap<u32, EnforcedVal>, DatapathError> {
    let mut want: BTreeMap<u32, EnforcedVal> = BTreeMap::new();
    for (ids, flag) in [
        (ingress, obj::ENFORCE_INGRESS),
        (egress, obj::ENFORCE_EGRESS),
    ] {
        for id in ids {
            if *id == obj::IDENTITY_ANY || *id == obj::IDENTITY_UNKNOWN {
                return Err(DatapathError::invalid(
                    format!("enforced identity {id}"),
                    "identities 0 and 4294967295 are reserved",
                ));
            }
            want.entry(*id).or_default().enforced |= flag;
        }
    }
    Ok(want)
}

/// A stable nonzero id for a rule without one (FNV-1a of its key).
fn derived_rule_id(k: &PolicyKey) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    let bytes = k
        .src_identity
        .to_le_bytes()
        .into_iter()
        .chain(k.dst_identity.to_le_bytes())
        .chain(k.dport.to_le_bytes())
        .chain([k.proto])
        // Ingress keys hash as before egress existed (stable rule ids).
        .chain((k.dir != obj::DIR_INGRESS).then_some(k.dir));
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_is_checked_on_its_own() {
        assert!(PolicyRule::ingress(Some(7), 8, 443, Protocol::Tcp)
            .check()
            .is_ok());
        let e = PolicyRule::ingress(Some(7), 8, 443, Protocol::Icmp)
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("ICMP rules take port 0"), "{e}");
    }

    fn enf(flags: u32) -> EnforcedVal {
        EnforcedVal { enforced: flags }
    }

    #[test]
    fn deltas_list_only_changed_keys() {
        let written = BTreeMap::from([(1u32, 10u32), (2, 20), (3, 30)]);
        let want = BTreeMap::from([(1u32, 10u32), (2, 21), (4, 40)]);
        let d = Delta::between(&written, &want);
        assert_eq!(d.upsert, [(2, 21), (4, 40)]);
        assert_eq!(d.remove, [3]);
        assert!(Delta::between(&want, &want).is_empty());
    }

    #[test]
    fn enforcement_is_lifted_before_it_is_added() {
        let (i, e) = (obj::ENFORCE_INGRESS, obj::ENFORCE_EGRESS);
        // 1: both -> ingress (lift); 2: ingress -> egress (drop, then add);
        // 3: ingress -> both (add); 4: new egress (add); 5: gone (lift).
        let written = BTreeMap::from([(1, enf(i | e)), (2, enf(i)), (3, enf(i)), (5, enf(e))]);
        let want = BTreeMap::from([(1, enf(i)), (2, enf(e)), (3, enf(i | e)), (4, enf(e))]);
        let steps = enforcement_steps(&written, &Delta::between(&written, &want));
        assert_eq!(
            steps,
            EnforcementSteps {
                lift: vec![(1, enf(i))],
                lift_remove: vec![5, 2],
                add: vec![(2, enf(e)), (3, enf(i | e)), (4, enf(e))],
            }
        );
    }

    #[test]
    fn derived_rule_ids_are_stable_and_nonzero() {
        let k = PolicyKey {
            src_identity: 1,
            dst_identity: 2,
            dport: obj::port_be(80),
            proto: 6,
            dir: obj::DIR_INGRESS,
        };
        assert_eq!(derived_rule_id(&k), derived_rule_id(&k));
        assert_ne!(derived_rule_id(&k), 0);
        let k2 = PolicyKey { dport: 0, ..k };
        assert_ne!(derived_rule_id(&k), derived_rule_id(&k2));
        let egress = PolicyKey {
            dir: obj::DIR_EGRESS,
            ..k
        };
        assert_ne!(derived_rule_id(&k), derived_rule_id(&egress));
    }
}
