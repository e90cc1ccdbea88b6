//! Pod CIDR allocation: each node gets one `/node_prefix` block of the
//! cluster CIDR on first contact and keeps it for its lifetime. Agents
//! allocate instance addresses inside their block.
//!
//! An allocation is a store key `/ipam/podcidrs/<a.b.c.d>-<prefix>` whose
//! value is the node name, created with a compare-absent transaction, so two
//! controllers (or two racing joins) can never hand out one block twice.
//! Blocks of nodes that no longer exist are released by [`release_orphans`].

use std::collections::HashSet;

use ironmesh_api::net::Ipv4Cidr;

use crate::store::{Compare, Op, Store, StoreError, Txn, TxnOutcome};

const PREFIX: &str = "/ipam/podcidrs/";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the cluster CIDR {cluster} has no free /{prefix} block left: all {used} are in use \
         ({cluster} holds {used} nodes at --node-cidr-prefix {prefix}). Start the controller \
         with a wider --cluster-cidr (e.g. 10.0.0.0/12 holds 4096 /24 nodes) or a longer \
         --node-cidr-prefix (/26: 62 instance addresses per node, 1024 nodes in a /16), \
         or delete Nodes that are gone"
    )]
    Exhausted {
        cluster: Ipv4Cidr,
        prefix: u8,
        used: usize,
    },
    #[error("pod CIDR allocation kept conflicting with concurrent writers")]
    Contended,
}

/// The cluster CIDR and the size of each node's block.
#[derive(Debug, Clone, Copy)]
pub struct Ipam {
    pub cluster: Ipv4Cidr,
    pub node_prefix: u8,
}

fn key(c: &Ipv4Cidr) -> String {
    format!("{PREFIX}{}-{}", c.addr(), c.prefix())
}

fn parse_key(k: &str) -> Option<Ipv4Cidr> {
    let rest = k.strip_prefix(PREFIX)?;
    let (a, p) = rest.rsplit_once('-')?;
    Ipv4Cidr::new(a.parse().ok()?, p.parse().ok()?).ok()
}

impl Ipam {
    /// Checks that the blocks fit the cluster CIDR.
    pub fn new(cluster: Ipv4Cidr, node_prefix: u8) -> Result<Ipam, String> {
        if node_prefix < cluster.prefix() || node_prefix > 30 {
            return Err(format!(
                "--node-cidr-prefix /{node_prefix} must be between the cluster CIDR's /{} and /30",
                cluster.prefix()
            ));
        }
        Ok(Ipam {
            cluster,
            node_prefix,
        })
    }

    /// The node's block: the one it already has, else the lowest free one.
    /// `known` is the block the node's status names, if any: when the store
    /// still gives it to this node it is the answer, with one read instead
    /// of a list of every block (a thousand reconnecting nodes).
    pub async fn allocate(
        &self,
        store: &dyn Store,
        node: &str,
        known: Option<Ipv4Cidr>,
    ) -> Result<Ipv4Cidr, IpamError> {
        if let Some(c) =
            known.filter(|c| c.prefix() == self.node_prefix && self.cluster.contains(c.addr()))
        {
            if store
                .get(&key(&c))
                .await?
                .is_some_and(|kv| kv.value == node.as_bytes())
            {
                return Ok(c);
            }
        }
        // Racing joins all see the same lowest free block; after losing a
        // race, pick among the free ones at random so the next try does
        // not lose to the same crowd.
        for attempt in 0..32 {
            let (kvs, _) = store.list(PREFIX).await?;
            // Blocks of this size are checked by lookup; other sizes (left
            // by an earlier --node-cidr-prefix) by overlap.
            let mut used = HashSet::new();
            let mut other_sizes = Vec::new();
            for kv in &kvs {
                let Some(c) = parse_key(&kv.key) else {
                    continue;
                };
                if kv.value == node.as_bytes()
                    && c.prefix() == self.node_prefix
                    && self.cluster.contains(c.addr())
                {
                    return Ok(c);
                }
                if c.prefix() == self.node_prefix {
                    used.insert(c);
                } else {
                    other_sizes.push(c);
                }
            }
            let mut free = (0..self.cluster.subnet_count(self.node_prefix))
                .filter_map(|n| self.cluster.subnet(self.node_prefix, n))
                .filter(|c| !used.contains(c) && !other_sizes.iter().any(|u| u.overlaps(c)));
            let free = if attempt == 0 {
                free.next()
            } else {
                let window: Vec<Ipv4Cidr> = free.take(64).collect();
                (!window.is_empty()).then(|| window[rand::random_range(0..window.len())])
            };
            let Some(block) = free else {
                return Err(IpamError::Exhausted {
                    cluster: self.cluster,
                    prefix: self.node_prefix,
                    used: used.len() + other_sizes.len(),
                });
            };
            let k = key(&block);
            let txn = Txn {
                compares: vec![Compare::Absent(k.clone())],
                ops: vec![Op::Put {
                    key: k,
                    value: node.as_bytes().to_vec(),
                }],
            };
            if let TxnOutcome::Committed(_) = store.txn(txn).await? {
                tracing::info!(node, pod_cidr = %block, "pod CIDR allocated");
                return Ok(block);
            }
        }
        Err(IpamError::Contended)
    }

    /// Every allocated block and its node.
    pub async fn allocations(
        &self,
        store: &dyn Store,
    ) -> Result<Vec<(Ipv4Cidr, String)>, IpamError> {
        let (kvs, _) = store.list(PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                Some((
                    parse_key(&kv.key)?,
                    String::from_utf8_lossy(&kv.value).to_string(),
                ))
            })
            .collect())
    }
}

/// Releases blocks whose node is not in `nodes`.
pub async fn release_orphans(store: &dyn Store, nodes: &HashSet<String>) -> Result<(), IpamError> {
    let (kvs, _) = store.list(PREFIX).await?;
    for kv in kvs {
        let owner = String::from_utf8_lossy(&kv.value).to_string();
        if nodes.contains(&owner) {
            continue;
        }
        let txn = Txn {
            compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
            ops: vec![Op::Delete {
                key: kv.key.clone(),
            }],
        };
        if let TxnOutcome::Committed(_) = store.txn(txn).await? {
            tracing::info!(node = %owner, key = %kv.key, "pod CIDR released");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn blocks_are_unique_stable_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let ipam = Ipam::new("10.244.0.0/22".parse().unwrap(), 24).unwrap();
        let a = ipam.allocate(&store, "a", None).await.unwrap();
        let b = ipam.allocate(&store, "b", None).await.unwrap();
        assert_eq!(a.to_string(), "10.244.0.0/24");
        assert_eq!(b.to_string(), "10.244.1.0/24");
        assert_eq!(ipam.allocate(&store, "a", None).await.unwrap(), a, "stable");
        assert_eq!(ipam.allocate(&store, "a", Some(a)).await.unwrap(), a);
        // A hint naming another node's block is not taken.
        assert_eq!(ipam.allocate(&store, "a", Some(b)).await.unwrap(), a);
        ipam.allocate(&store, "c", None).await.unwrap();
        ipam.allocate(&store, "d", None).await.unwrap();
        let e = ipam.allocate(&store, "e", None).await.unwrap_err();
        assert!(e.to_string().contains("no free /24 block"), "{e}");
        // The error names the flags that size the plan.
        assert!(
            e.to_string().contains("--cluster-cidr")
                && e.to_string().contains("--node-cidr-prefix"),
            "{e}"
        );
        release_orphans(
            &store,
            &["a", "c", "d"].iter().map(|s| s.to_string()).collect(),
        )
        .await
        .unwrap();
        assert_eq!(
            ipam.allocate(&store, "e", None).await.unwrap(),
            b,
            "b's block reused"
        );
    }

    #[test]
    fn node_prefix_must_fit() {
        let c = "10.244.0.0/16".parse().unwrap();
        assert!(Ipam::new(c, 8).is_err());
        assert!(Ipam::new(c, 31).is_err());
        assert!(Ipam::new(c, 24).is_ok());
    }
}
