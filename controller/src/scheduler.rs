//! Placement of instances onto nodes. Pure and deterministic: the same
//! nodes, bookings and asks give the same answers, with no clock, no
//! randomness and no I/O.
//!
//! A pass builds a [`Cluster`] from the Nodes (allocatable minus the
//! configured [`Reserve`]) and books every instance already bound; each
//! [`Cluster::place`] then
//!
//! 1. **filters** nodes: Ready, not cordoned (`spec.unschedulable`), labels
//!    matching `placement.nodeSelector`, of a platform the image offers
//!    (an index lists its platforms; a node runs `linux/<its CPU>`; a
//!    single-platform image or a node that reported no CPU passes), no
//!    `NoSchedule`/`NoExecute` taint
//!    the instance does not tolerate, room for the requested CPU and memory,
//!    and — with `placement.spread` — not pushing its topology domain more
//!    than `maxSkew` above the least-loaded domain;
//! 2. **scores** the rest, best first: fewest replicas of the workload in the
//!    node's topology domain, then on the node itself, then fewest
//!    untolerated `PreferNoSchedule` taints, then the highest utilisation
//!    score (least requested plus balanced CPU/memory fractions, 0–200),
//!    then the node name;
//! 3. books the request on the winner, so several placements in one pass
//!    never overcommit a node.
//!
//! When no node passes, the error counts the first failed filter per node:
//! `0/3 nodes available: 2 insufficient memory, 1 tainted`; when nodes
//! fail on their platform it adds what the image offers.
//!
//! It must not read the store; [`crate::workloads`] feeds it.

use std::collections::{BTreeMap, HashMap};

use ironmesh_api::node::{Taint, TaintEffect};
use ironmesh_api::workload::{Placement, HOSTNAME_LABEL};
use ironmesh_oci::Platform;

/// What the scheduler knows about one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeCapacity {
    pub name: String,
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Allocatable CPU in millicores and memory in bytes, as the node
    /// reports them (before the [`Reserve`]).
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// The node's CPU as an OCI architecture (`amd64`); empty if it
    /// reported none. Its OS is `linux`.
    pub architecture: String,
}

/// The OS of every node.
const NODE_OS: &str = "linux";

/// What the controller keeps back on every node for the agent, containerd
/// and the OS (`--reserve-cpu`, `--reserve-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reserve {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// What one instance asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl std::ops::AddAssign for Request {
    fn add_assign(&mut self, o: Request) {
        self.cpu_millis += o.cpu_millis;
        self.memory_bytes += o.memory_bytes;
    }
}

/// Why a node was filtered out; the order of the variants is the order
/// in which the filters run, and the explanation lists them in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unfit {
    NotReady,
    Unschedulable,
    Selector,
    Platform,
    Tainted,
    Cpu,
    Memory,
    MissingTopology,
    Skew,
}

impl Unfit {
    fn describe(self) -> &'static str {
        match self {
            Unfit::NotReady => "not ready",
            Unfit::Unschedulable => "unschedulable",
            Unfit::Selector => "not matching the node selector",
            Unfit::Platform => "of a platform the image does not offer",
            Unfit::Tainted => "tainted",
            Unfit::Cpu => "insufficient cpu",
            Unfit::Memory => "insufficient memory",
            Unfit::MissingTopology => "missing the spread topology label",
            Unfit::Skew => "over the spread max skew",
        }
    }
}

/// Whether `tolerations` accept every taint of `taints` with an effect in
/// `effects`; returns how many they do not accept.
fn untolerated(
    taints: &[Taint],
    tolerations: &[ironmesh_api::workload::Toleration],
    effects: &[TaintEffect],
) -> usize {
    taints
        .iter()
        .filter(|t| effects.contains(&t.effect))
        .filter(|t| !tolerations.iter().any(|tol| tol.tolerates(t)))
        .count()
}

/// Whether a running instance with `placement` must leave a node with
/// `taints` (an untolerated `NoExecute` taint).
pub fn evicted_by_taints(taints: &[Taint], placement: Option<&Placement>) -> bool {
    let tolerations = placement.map(|p| p.tolerations.as_slice()).unwrap_or(&[]);
    untolerated(taints, tolerations, &[TaintEffect::NoExecute]) > 0
}

/// The cluster as the scheduler sees it during one pass: nodes and what is
/// already bound to each.
#[derive(Debug, Default)]
pub struct Cluster {
    /// Sorted by name; capacities already net of the reserve.
    nodes: Vec<NodeCapacity>,
    index: HashMap<String, usize>,
    used: Vec<Request>,
    /// workload → instances bound on each node (by node index).
    replicas: HashMap<String, Vec<u32>>,
}

impl Cluster {
    /// A cluster whose nodes keep nothing back.
    pub fn new(nodes: Vec<NodeCapacity>) -> Cluster {
        Cluster::with_reserve(nodes, Reserve::default())
    }

    /// A cluster whose nodes offer their allocatable minus `reserve`.
    pub fn with_reserve(mut nodes: Vec<NodeCapacity>, reserve: Reserve) -> Cluster {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        for n in &mut nodes {
            n.cpu_millis = n.cpu_millis.saturating_sub(reserve.cpu_millis);
            n.memory_bytes = n.memory_bytes.saturating_sub(reserve.memory_bytes);
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        Cluster {
            used: vec![Request::default(); nodes.len()],
            nodes,
            index,
            replicas: HashMap::new(),
        }
    }

    /// Books `req` of an instance of `workload` on `node` (already bound).
    /// Bookings on nodes that are not in the cluster are ignored.
    pub fn book(&mut self, node: &str, workload: &str, req: Request) {
        if let Some(&i) = self.index.get(node) {
            self.book_at(i, workload, req);
        }
    }

    fn book_at(&mut self, i: usize, workload: &str, req: Request) {
        self.used[i] += req;
        let len = self.nodes.len();
        let counts = match self.replicas.get_mut(workload) {
            Some(c) => c,
            None => self
                .replicas
                .entry(workload.to_string())
                .or_insert_with(|| vec![0; len]),
        };
        counts[i] += 1;
    }

    /// [`Cluster::place_with`] without placement constraints.
    pub fn place(&mut self, workload: &str, req: Request) -> Result<String, String> {
        self.place_with(workload, req, None)
    }

    /// The best node for an instance of `workload` asking `req` under
    /// `placement`, booked; or why no node fits.
    pub fn place_with(
        &mut self,
        workload: &str,
        req: Request,
        placement: Option<&Placement>,
    ) -> Result<String, String> {
        self.place_for(workload, req, placement, &[])
    }

    /// [`Cluster::place_with`] for an image that runs only on `platforms`
    /// (an index's; empty: anywhere).
    pub fn place_for(
        &mut self,
        workload: &str,
        req: Request,
        placement: Option<&Placement>,
        platforms: &[Platform],
    ) -> Result<String, String> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.place_among(&all, workload, req, placement, platforms)
    }

    /// [`Cluster::place_with`] restricted to `node` (an instance that mounts
    /// a volume bound there); the reason names the node.
    pub fn place_on(
        &mut self,
        node: &str,
        workload: &str,
        req: Request,
        placement: Option<&Placement>,
    ) -> Result<String, String> {
        self.place_on_for(node, workload, req, placement, &[])
    }

    /// [`Cluster::place_on`] for an image that runs only on `platforms`.
    pub fn place_on_for(
        &mut self,
        node: &str,
        workload: &str,
        req: Request,
        placement: Option<&Placement>,
        platforms: &[Platform],
    ) -> Result<String, String> {
        match self.index.get(node).copied() {
            Some(i) => self
                .place_among(&[i], workload, req, placement, platforms)
                .map_err(|why| format!("node {node}, where its volumes are bound: {why}")),
            None => Err(format!(
                "node {node}, where its volumes are bound, has not joined"
            )),
        }
    }

    fn domain<'a>(&'a self, i: usize, key: &str) -> Option<&'a str> {
        let n = &self.nodes[i];
        match n.labels.get(key) {
            Some(v) => Some(v.as_str()),
            None if key == HOSTNAME_LABEL => Some(n.name.as_str()),
            None => None,
        }
    }

    fn place_among(
        &mut self,
        candidates: &[usize],
        workload: &str,
        req: Request,
        placement: Option<&Placement>,
        platforms: &[Platform],
    ) -> Result<String, String> {
        let empty = Placement::default();
        let runs_here = |n: &NodeCapacity| {
            platforms.is_empty()
                || n.architecture.is_empty()
                || platforms
                    .iter()
                    .any(|p| p.os == NODE_OS && p.architecture == n.architecture)
        };
        let p = placement.unwrap_or(&empty);
        let counts = self.replicas.get(workload);
        let count_at = |i: usize| counts.map(|c| c[i]).unwrap_or(0);

        // First the filters that do not depend on spread; spread compares
        // domains among the nodes the instance could otherwise use.
        let mut reasons: BTreeMap<Unfit, usize> = BTreeMap::new();
        let mut fit: Vec<usize> = Vec::new();
        // Topology domains of nodes that pass selector and taints (spread
        // counts replicas in them even when a node there is full).
        let mut domains: BTreeMap<&str, u32> = BTreeMap::new();
        for &i in candidates {
            let n = &self.nodes[i];
            let used = self.used[i];
            let eligible_topology = || {
                p.node_selector
                    .iter()
                    .all(|(k, v)| n.labels.get(k) == Some(v))
                    && untolerated(
                        &n.taints,
                        &p.tolerations,
                        &[TaintEffect::NoSchedule, TaintEffect::NoExecute],
                    ) == 0
            };
            let why = if !n.ready {
                Some(Unfit::NotReady)
            } else if n.unschedulable {
                Some(Unfit::Unschedulable)
            } else if !p
                .node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
            {
                Some(Unfit::Selector)
            } else if !runs_here(n) {
                Some(Unfit::Platform)
            } else if untolerated(
                &n.taints,
                &p.tolerations,
                &[TaintEffect::NoSchedule, TaintEffect::NoExecute],
            ) > 0
            {
                Some(Unfit::Tainted)
            } else if used.cpu_millis + req.cpu_millis > n.cpu_millis {
                Some(Unfit::Cpu)
            } else if used.memory_bytes + req.memory_bytes > n.memory_bytes {
                Some(Unfit::Memory)
            } else {
                None
            };
            if let Some(s) = &p.spread {
                if eligible_topology() {
                    if let Some(d) = self.domain(i, &s.topology_key) {
                        *domains.entry(d).or_default() += count_at(i);
                    }
                }
            }
            match why {
                Some(w) => *reasons.entry(w).or_default() += 1,
                None => fit.push(i),
            }
        }

        // Spread: drop nodes whose domain would exceed the skew; score by
        // the domain's count.
        let min_domain = domains.values().copied().min().unwrap_or(0);
        let mut best: Option<(usize, Score)> = None;
        for i in fit {
            let domain_count = match &p.spread {
                None => 0,
                Some(s) => match self.domain(i, &s.topology_key) {
                    None => {
                        *reasons.entry(Unfit::MissingTopology).or_default() += 1;
                        continue;
                    }
                    Some(d) => {
                        let c = domains.get(d).copied().unwrap_or(0);
                        if c + 1 > min_domain + s.max_skew.max(1) {
                            *reasons.entry(Unfit::Skew).or_default() += 1;
                            continue;
                        }
                        c
                    }
                },
            };
            let n = &self.nodes[i];
            let key = (
                domain_count,
                count_at(i),
                untolerated(&n.taints, &p.tolerations, &[TaintEffect::PreferNoSchedule]),
                std::cmp::Reverse(utilisation_score(n, self.used[i], req)),
            );
            // Strictly better: ties keep the earlier name (nodes are sorted).
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((i, key));
            }
        }
        match best {
            Some((i, _)) => {
                self.book_at(i, workload, req);
                Ok(self.nodes[i].name.clone())
            }
            None => {
                let total = candidates.len();
                if total == 0 {
                    return Err("0/0 nodes available: no node has joined".to_string());
                }
                let parts: Vec<String> = reasons
                    .iter()
                    .map(|(why, n)| format!("{n} {}", why.describe()))
                    .collect();
                let mut why = format!("0/{total} nodes available: {}", parts.join(", "));
                if reasons.contains_key(&Unfit::Platform) {
                    let offered: Vec<String> = platforms.iter().map(|p| p.to_string()).collect();
                    why.push_str(&format!(" (the image offers {})", offered.join(", ")));
                }
                Err(why)
            }
        }
    }
}

/// A candidate's rank, smaller is better: replicas of the workload in its
/// topology domain, on the node, untolerated `PreferNoSchedule` taints,
/// then the utilisation score, highest first.
type Score = (u32, u32, usize, std::cmp::Reverse<u64>);

/// 0–200: the free fraction left after placing (least requested, averaged
/// over CPU and memory, 0–100) plus how balanced the two fractions would be
/// (100 minus their difference). A node with no capacity for a resource
/// counts as fully used in it.
fn utilisation_score(n: &NodeCapacity, used: Request, req: Request) -> u64 {
    let frac = |used: u64, cap: u64| -> u64 {
        used.saturating_mul(100)
            .checked_div(cap)
            .map_or(100, |f| f.min(100))
    };
    let cpu = frac(used.cpu_millis + req.cpu_millis, n.cpu_millis);
    let mem = frac(used.memory_bytes + req.memory_bytes, n.memory_bytes);
    let least_requested = 100 - (cpu + mem) / 2;
    let balanced = 100 - cpu.abs_diff(mem);
    least_requested + balanced
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_api::workload::{Spread, Toleration, TolerationOperator};

    fn node(name: &str, ready: bool, cpu: u64, mem: u64) -> NodeCapacity {
        NodeCapacity {
            name: name.into(),
            ready,
            cpu_millis: cpu,
            memory_bytes: mem,
            ..NodeCapacity::default()
        }
    }

    fn labelled(name: &str, labels: &[(&str, &str)]) -> NodeCapacity {
        let mut n = node(name, true, 4000, 4 * GI);
        n.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        n
    }

    fn taint(key: &str, effect: TaintEffect) -> Taint {
        Taint {
            key: key.into(),
            value: "yes".into(),
            effect,
        }
    }

    const GI: u64 = 1 << 30;
    const SMALL: Request = Request {
        cpu_millis: 100,
        memory_bytes: 1 << 20,
    };

    #[test]
    fn replicas_spread_and_bookings_count() {
        let mut c = Cluster::new(vec![node("b", true, 2000, GI), node("a", true, 1000, GI)]);
        let r = Request {
            cpu_millis: 600,
            memory_bytes: GI / 4,
        };
        // Both empty: b, whose larger CPU stays less used and more balanced.
        assert_eq!(c.place("w", r), Ok("b".to_string()));
        // a holds no replica of w yet.
        assert_eq!(c.place("w", r), Ok("a".to_string()));
        // a has 400m left: b, although it already holds one.
        assert_eq!(c.place("w", r), Ok("b".to_string()));
        assert_eq!(c.place("v", r), Ok("b".to_string()));
        assert_eq!(
            c.place("w", r).unwrap_err(),
            "0/2 nodes available: 2 insufficient cpu"
        );
    }

    #[test]
    fn three_replicas_over_three_nodes_one_each() {
        let mut c = Cluster::new(vec![
            node("h1", true, 2000, GI),
            node("h2", true, 2000, GI),
            node("h3", true, 2000, GI),
        ]);
        let placed: Vec<String> = (0..3).map(|_| c.place("web", SMALL).unwrap()).collect();
        assert_eq!(placed, ["h1", "h2", "h3"]);
    }

    #[test]
    fn explains_every_node() {
        let mut cordoned = node("c", true, 4000, 4 * GI);
        cordoned.unschedulable = true;
        let mut c = Cluster::new(vec![
            node("a", false, 4000, 4 * GI),
            node("b", true, 4000, GI / 2),
            cordoned,
        ]);
        let err = c
            .place(
                "w",
                Request {
                    cpu_millis: 100,
                    memory_bytes: GI,
                },
            )
            .unwrap_err();
        assert_eq!(
            err,
            "0/3 nodes available: 1 not ready, 1 unschedulable, 1 insufficient memory"
        );
        assert_eq!(
            Cluster::new(vec![])
                .place("w", Request::default())
                .unwrap_err(),
            "0/0 nodes available: no node has joined"
        );
    }

    #[test]
    fn reserve_is_taken_off_allocatable() {
        let reserve = Reserve {
            cpu_millis: 100,
            memory_bytes: 256 << 20,
        };
        let mut c = Cluster::with_reserve(vec![node("a", true, 1000, GI)], reserve);
        let r = Request {
            cpu_millis: 900,
            memory_bytes: GI - (256 << 20),
        };
        assert_eq!(c.place("w", r), Ok("a".into()));
        let mut c = Cluster::with_reserve(vec![node("a", true, 1000, GI)], reserve);
        let r = Request {
            cpu_millis: 901,
            memory_bytes: 0,
        };
        assert_eq!(
            c.place("w", r).unwrap_err(),
            "0/1 nodes available: 1 insufficient cpu"
        );
    }

    #[test]
    fn node_selector_filters_on_labels() {
        let mut c = Cluster::new(vec![
            labelled("a", &[("disk", "hdd")]),
            labelled("b", &[("disk", "ssd")]),
            labelled("c", &[]),
        ]);
        let p = Placement {
            node_selector: [("disk".to_string(), "ssd".to_string())].into(),
            ..Placement::default()
        };
        for _ in 0..3 {
            assert_eq!(c.place_with("w", SMALL, Some(&p)), Ok("b".into()));
        }
        let p = Placement {
            node_selector: [("disk".to_string(), "nvme".to_string())].into(),
            ..Placement::default()
        };
        assert_eq!(
            c.place_with("w", SMALL, Some(&p)).unwrap_err(),
            "0/3 nodes available: 3 not matching the node selector"
        );
    }

    #[test]
    fn taints_repel_unless_tolerated() {
        let mut a = labelled("a", &[]);
        a.taints = vec![taint("gpu", TaintEffect::NoSchedule)];
        let mut b = labelled("b", &[]);
        b.taints = vec![taint("maint", TaintEffect::NoExecute)];
        let mut c = Cluster::new(vec![a, b, node("c", true, 1000, GI / 2)]);
        let big = Request {
            cpu_millis: 100,
            memory_bytes: GI,
        };
        assert_eq!(
            c.place("w", big).unwrap_err(),
            "0/3 nodes available: 2 tainted, 1 insufficient memory"
        );
        let tolerate_gpu = Placement {
            tolerations: vec![Toleration {
                key: "gpu".into(),
                operator: TolerationOperator::Exists,
                value: String::new(),
                effect: None,
            }],
            ..Placement::default()
        };
        assert_eq!(c.place_with("w", big, Some(&tolerate_gpu)), Ok("a".into()));
        // Equal with the wrong value does not tolerate.
        let wrong = Placement {
            tolerations: vec![Toleration {
                key: "maint".into(),
                operator: TolerationOperator::Equal,
                value: "no".into(),
                effect: Some(TaintEffect::NoExecute),
            }],
            ..Placement::default()
        };
        assert!(c.place_with("v", big, Some(&wrong)).is_err());
    }

    #[test]
    fn prefer_no_schedule_is_avoided_when_another_node_fits() {
        let mut a = labelled("a", &[]);
        a.taints = vec![taint("old", TaintEffect::PreferNoSchedule)];
        let mut c = Cluster::new(vec![a, labelled("b", &[])]);
        assert_eq!(c.place("w", SMALL), Ok("b".into()));
        // b now holds a replica: spreading wins over the soft taint.
        assert_eq!(c.place("w", SMALL), Ok("a".into()));
    }

    #[test]
    fn no_execute_evicts_untolerated() {
        let taints = vec![taint("maint", TaintEffect::NoExecute)];
        assert!(evicted_by_taints(&taints, None));
        let p = Placement {
            tolerations: vec![Toleration {
                key: String::new(),
                operator: TolerationOperator::Exists,
                value: String::new(),
                effect: None,
            }],
            ..Placement::default()
        };
        assert!(!evicted_by_taints(&taints, Some(&p)));
        assert!(!evicted_by_taints(
            &[taint("x", TaintEffect::NoSchedule)],
            None
        ));
    }

    #[test]
    fn balanced_utilisation_prefers_the_emptier_and_more_balanced_node() {
        // Same replica counts (other workloads): the emptier node wins.
        let mut c = Cluster::new(vec![
            node("a", true, 4000, 4 * GI),
            node("b", true, 4000, 4 * GI),
        ]);
        c.book(
            "a",
            "other",
            Request {
                cpu_millis: 2000,
                memory_bytes: 2 * GI,
            },
        );
        assert_eq!(c.place("w", SMALL), Ok("b".into()));
        // A memory-heavy ask goes where memory is the less used resource.
        let mut c = Cluster::new(vec![
            node("a", true, 4000, 4 * GI),
            node("b", true, 4000, 4 * GI),
        ]);
        c.book(
            "a",
            "other",
            Request {
                cpu_millis: 0,
                memory_bytes: 2 * GI,
            },
        );
        c.book(
            "b",
            "other",
            Request {
                cpu_millis: 2000,
                memory_bytes: 0,
            },
        );
        let mem_heavy = Request {
            cpu_millis: 0,
            memory_bytes: 2 * GI,
        };
        assert_eq!(c.place("w", mem_heavy), Ok("b".into()));
    }

    #[test]
    fn spread_across_a_topology_label_honours_max_skew() {
        let nodes = vec![
            labelled("a1", &[("rack", "a")]),
            labelled("a2", &[("rack", "a")]),
            labelled("a3", &[("rack", "a")]),
            labelled("b1", &[("rack", "b")]),
            labelled("x", &[]),
        ];
        let p = Placement {
            spread: Some(Spread {
                topology_key: "rack".into(),
                max_skew: 1,
            }),
            ..Placement::default()
        };
        let mut c = Cluster::new(nodes.clone());
        let placed: Vec<String> = (0..4)
            .map(|_| c.place_with("w", SMALL, Some(&p)).unwrap())
            .collect();
        // Racks alternate; inside rack a the replicas go to different nodes.
        assert_eq!(placed, ["a1", "b1", "a2", "b1"]);

        // With rack b full, rack a may only run max_skew ahead.
        let mut full_b = nodes;
        full_b[3].cpu_millis = 0;
        let mut c = Cluster::new(full_b);
        assert_eq!(c.place_with("w", SMALL, Some(&p)), Ok("a1".into()));
        assert_eq!(
            c.place_with("w", SMALL, Some(&p)).unwrap_err(),
            "0/5 nodes available: 1 insufficient cpu, 1 missing the spread topology label, 3 over the spread max skew"
        );
    }

    #[test]
    fn spread_by_hostname_defaults_to_the_node_name() {
        let p = Placement {
            spread: Some(Spread {
                topology_key: HOSTNAME_LABEL.into(),
                max_skew: 1,
            }),
            ..Placement::default()
        };
        let mut c = Cluster::new(vec![labelled("a", &[]), labelled("b", &[])]);
        let placed: Vec<String> = (0..4)
            .map(|_| c.place_with("w", SMALL, Some(&p)).unwrap())
            .collect();
        assert_eq!(placed, ["a", "b", "a", "b"]);
    }

    #[test]
    fn same_input_same_placements() {
        let build = || {
            let mut nodes: Vec<NodeCapacity> = (0..50)
                .map(|i| {
                    let mut n = node(
                        &format!("n{i:02}"),
                        i % 7 != 0,
                        1000 + i * 37,
                        GI + i * (1 << 24),
                    );
                    n.labels.insert("rack".into(), format!("r{}", i % 5));
                    n
                })
                .collect();
            nodes.reverse();
            Cluster::new(nodes)
        };
        let p = Placement {
            spread: Some(Spread {
                topology_key: "rack".into(),
                max_skew: 2,
            }),
            ..Placement::default()
        };
        let run = |mut c: Cluster| -> Vec<Result<String, String>> {
            (0..300)
                .map(|i| {
                    c.place_with(
                        &format!("w{}", i % 4),
                        Request {
                            cpu_millis: 50 + (i as u64 % 3) * 40,
                            memory_bytes: 64 << 20,
                        },
                        Some(&p),
                    )
                })
                .collect()
        };
        assert_eq!(run(build()), run(build()));
    }

    #[test]
    fn place_on_names_the_volume_node() {
        let mut c = Cluster::new(vec![node("a", false, 1000, GI), node("b", true, 1000, GI)]);
        assert_eq!(
            c.place_on("a", "w", SMALL, None).unwrap_err(),
            "node a, where its volumes are bound: 0/1 nodes available: 1 not ready"
        );
        assert_eq!(
            c.place_on("z", "w", SMALL, None).unwrap_err(),
            "node z, where its volumes are bound, has not joined"
        );
        assert_eq!(c.place_on("b", "w", SMALL, None), Ok("b".into()));
    }

    #[test]
    fn an_index_keeps_its_instances_to_nodes_of_its_platforms() {
        let arch = |name: &str, a: &str| {
            let mut n = node(name, true, 4000, 4 * GI);
            n.architecture = a.into();
            n
        };
        let linux = |a: &str| Platform {
            os: "linux".into(),
            architecture: a.into(),
            variant: None,
        };
        let nodes = vec![
            arch("a-amd", "amd64"),
            arch("b-arm", "arm64"),
            arch("c-arm", "arm64"),
        ];
        // arm64 only: the amd64 node (first by name) is skipped.
        let mut c = Cluster::new(nodes.clone());
        let arm_only = [linux("arm64")];
        let placed: Vec<String> = (0..2)
            .map(|_| c.place_for("w", SMALL, None, &arm_only).unwrap())
            .collect();
        assert_eq!(placed, ["b-arm", "c-arm"]);
        // Single-platform images (no list) go anywhere; both platforms too.
        let mut c = Cluster::new(nodes.clone());
        assert_eq!(c.place_for("w", SMALL, None, &[]), Ok("a-amd".into()));
        let both = [linux("arm64"), linux("amd64")];
        let mut c = Cluster::new(nodes.clone());
        assert_eq!(c.place_for("v", SMALL, None, &both), Ok("a-amd".into()));

        // No node of the image's platform: the reason says what it offers.
        let mut c = Cluster::new(nodes);
        let odd = [
            linux("s390x"),
            Platform {
                os: "windows".into(),
                ..linux("amd64")
            },
        ];
        assert_eq!(
            c.place_for("w", SMALL, None, &odd).unwrap_err(),
            "0/3 nodes available: 3 of a platform the image does not offer \
             (the image offers linux/s390x, windows/amd64)"
        );
        // A node that reported no CPU is not kept out on a guess.
        let mut c = Cluster::new(vec![arch("x", "")]);
        assert_eq!(c.place_for("w", SMALL, None, &odd), Ok("x".into()));
        // With a volume's node, the same reason.
        let mut c = Cluster::new(vec![arch("a-amd", "amd64")]);
        assert_eq!(
            c.place_on_for("a-amd", "w", SMALL, None, &arm_only)
                .unwrap_err(),
            "node a-amd, where its volumes are bound: 0/1 nodes available: \
             1 of a platform the image does not offer (the image offers linux/arm64)"
        );
    }
}
