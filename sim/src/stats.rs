//! Per-node figures of a fleet: what each simulated node received (split
//! into whole and delta assignments, counted as `prost` encoded length),
//! how its streams went, and what it runs.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::agent::Phase;

/// Assignment messages and their encoded bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub whole_msgs: u64,
    pub whole_bytes: u64,
    pub delta_msgs: u64,
    pub delta_bytes: u64,
}

impl Received {
    pub fn msgs(&self) -> u64 {
        self.whole_msgs + self.delta_msgs
    }

    pub fn bytes(&self) -> u64 {
        self.whole_bytes + self.delta_bytes
    }

    /// What arrived between `earlier` and `self`.
    pub fn since(&self, earlier: &Received) -> Received {
        Received {
            whole_msgs: self.whole_msgs.saturating_sub(earlier.whole_msgs),
            whole_bytes: self.whole_bytes.saturating_sub(earlier.whole_bytes),
            delta_msgs: self.delta_msgs.saturating_sub(earlier.delta_msgs),
            delta_bytes: self.delta_bytes.saturating_sub(earlier.delta_bytes),
        }
    }

    pub fn add(&mut self, o: &Received) {
        self.whole_msgs += o.whole_msgs;
        self.whole_bytes += o.whole_bytes;
        self.delta_msgs += o.delta_msgs;
        self.delta_bytes += o.delta_bytes;
    }
}

/// A snapshot of one simulated node.
#[derive(Debug, Clone)]
pub struct NodeStats {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub phase: Phase,
    /// Streams that got a Welcome.
    pub sessions: u64,
    /// Assignments acknowledged on the current stream.
    pub session_acks: u64,
    pub acked_revision: u64,
    pub received: Received,
    /// Deltas that did not apply (each ended its stream).
    pub delta_errors: u64,
    pub disconnects: u64,
    pub last_error: Option<String>,
    pub pod_cidr: Option<Ipv4Net>,
    /// Instances it runs now.
    pub instances: usize,
    /// Instances it started over its life (first reports).
    pub started_instances: u64,
    pub replaced_instances: u64,
    pub report_messages: u64,
    pub reported_states: u64,
}

/// The median of `v` (the lower middle for an even count); `None` if empty.
pub fn median(v: &[u64]) -> Option<u64> {
    percentile(v, 50.0)
}

/// The `p`th percentile of `v` by nearest rank (lower); `None` if empty.
pub fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * (s.len() - 1) as f64).floor() as usize;
    s.get(rank.min(s.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7]), Some(7));
        assert_eq!(median(&[9, 1, 5]), Some(5));
        assert_eq!(median(&[4, 1, 3, 2]), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4, 5], 100.0), Some(5));
    }

    #[test]
    fn received_since() {
        let a = Received {
            whole_msgs: 1,
            whole_bytes: 100,
            delta_msgs: 2,
            delta_bytes: 40,
        };
        let mut b = a;
        b.delta_msgs += 1;
        b.delta_bytes += 30;
        let d = b.since(&a);
        assert_eq!((d.msgs(), d.bytes(), d.whole_msgs), (1, 30, 0));
    }
}
