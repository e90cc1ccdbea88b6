//! Placement of instances onto nodes: among Ready, schedulable nodes with
//! room for the requested CPU and memory, the one holding the fewest
//! instances of the same workload (so replicas spread), ties broken by name
//! (deterministic for the same input). When nothing fits it explains why, per node, in the
//! `0/3 nodes available: 2 insufficient memory, 1 not ready` habit.

use std::collections::BTreeMap;

/// What the scheduler knows about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub name: String,
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Allocatable CPU in millicores and memory in bytes.
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

/// The cluster as the scheduler sees it during one pass: nodes and what is
/// already bound to each. Placing an instance books its request, so several
/// placements in one pass do not overcommit a node.
#[derive(Debug, Default)]
pub struct Cluster {
    nodes: Vec<NodeCapacity>,
    used: BTreeMap<String, Request>,
    /// (node, workload) → instances bound there.
    replicas: BTreeMap<(String, String), usize>,
}

impl Cluster {
    pub fn new(mut nodes: Vec<NodeCapacity>) -> Cluster {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Cluster {
            nodes,
            used: BTreeMap::new(),
            replicas: BTreeMap::new(),
        }
    }

    /// Books `req` of an instance of `workload` on `node` (already bound).
    pub fn book(&mut self, node: &str, workload: &str, req: Request) {
        *self.used.entry(node.to_string()).or_default() += req;
        *self
            .replicas
            .entry((node.to_string(), workload.to_string()))
            .or_default() += 1;
    }

    /// The fitting node with the fewest replicas of `workload`, booked; or
    /// why no node fits.
    pub fn place(&mut self, workload: &str, req: Request) -> Result<String, String> {
        let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut chosen: Option<(usize, String)> = None;
        for n in &self.nodes {
            let used = self.used.get(&n.name).copied().unwrap_or_default();
            let why = if !n.ready {
                Some("not ready")
            } else if n.unschedulable {
                Some("unschedulable")
            } else if used.cpu_millis + req.cpu_millis > n.cpu_millis {
                Some("insufficient cpu")
            } else if used.memory_bytes + req.memory_bytes > n.memory_bytes {
                Some("insufficient memory")
            } else {
                None
            };
            match why {
                Some(w) => *reasons.entry(w).or_default() += 1,
                None => {
                    let count = self
                        .replicas
                        .get(&(n.name.clone(), workload.to_string()))
                        .copied()
                        .unwrap_or(0);
                    // Strictly fewer: ties keep the earlier name.
                    if chosen.as_ref().is_none_or(|(c, _)| count < *c) {
                        chosen = Some((count, n.name.clone()));
                    }
                }
            }
        }
        match chosen {
            Some((_, name)) => {
                self.book(&name, workload, req);
                Ok(name)
            }
            None => {
                let total = self.nodes.len();
                if total == 0 {
                    return Err("0/0 nodes available: no node has joined".to_string());
                }
                let parts: Vec<String> = reasons
                    .iter()
                    .map(|(why, n)| format!("{n} {why}"))
                    .collect();
                Err(format!("0/{total} nodes available: {}", parts.join(", ")))
            }
        }
    }
}

impl Cluster {
    /// [`Cluster::place`] restricted to `node` (an instance that mounts a
    /// volume bound there); the reason names the node.
    pub fn place_on(&mut self, node: &str, workload: &str, req: Request) -> Result<String, String> {
        let all = std::mem::take(&mut self.nodes);
        let (only, rest): (Vec<NodeCapacity>, Vec<NodeCapacity>) =
            all.into_iter().partition(|n| n.name == node);
        let known = !only.is_empty();
        self.nodes = only;
        let placed = self.place(workload, req);
        self.nodes.extend(rest);
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        placed.map_err(|why| {
            if known {
                format!("node {node}, where its volumes are bound: {why}")
            } else {
                format!("node {node}, where its volumes are bound, has not joined")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, cpu: u64, mem: u64) -> NodeCapacity {
        NodeCapacity {
            name: name.into(),
            ready,
            unschedulable: false,
            cpu_millis: cpu,
            memory_bytes: mem,
        }
    }

    const GI: u64 = 1 << 30;

    #[test]
    fn replicas_spread_and_bookings_count() {
        let mut c = Cluster::new(vec![node("b", true, 2000, GI), node("a", true, 1000, GI)]);
        let r = Request {
            cpu_millis: 600,
            memory_bytes: GI / 4,
        };
        assert_eq!(c.place("w", r), Ok("a".to_string()));
        // b holds no replica of w yet.
        assert_eq!(c.place("w", r), Ok("b".to_string()));
        // a has 400m left: b, although it already holds one.
        assert_eq!(c.place("w", r), Ok("b".to_string()));
        // Another workload starts at the first name that fits.
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
        let r = Request {
            cpu_millis: 100,
            memory_bytes: 1 << 20,
        };
        let placed: Vec<String> = (0..3).map(|_| c.place("web", r).unwrap()).collect();
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
            "0/3 nodes available: 1 insufficient memory, 1 not ready, 1 unschedulable"
        );
        assert_eq!(
            Cluster::new(vec![])
                .place("w", Request::default())
                .unwrap_err(),
            "0/0 nodes available: no node has joined"
        );
    }
}
