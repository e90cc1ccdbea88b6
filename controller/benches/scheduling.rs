//! Scheduling throughput: 10,000 instances placed on 1,000 simulated nodes
//! by the scheduler in one process, printed as placements per second.
//! `cargo bench -p ironmesh-controller --bench scheduling`.

use std::collections::BTreeMap;
use std::time::Instant;

use ironmesh_api::workload::{Placement, Spread};
use ironmesh_controller::scheduler::{Cluster, NodeCapacity, Request, Reserve};

const NODES: usize = 1_000;
const INSTANCES: usize = 10_000;
const WORKLOADS: usize = 100;

fn nodes() -> Vec<NodeCapacity> {
    (0..NODES)
        .map(|i| NodeCapacity {
            name: format!("node-{i:04}"),
            ready: i % 50 != 7,
            unschedulable: false,
            cpu_millis: 16_000 + (i as u64 % 4) * 8_000,
            memory_bytes: (64u64 + (i as u64 % 3) * 64) << 30,
            labels: BTreeMap::from([("rack".to_string(), format!("r{:02}", i % 40))]),
            taints: vec![],
            architecture: "amd64".to_string(),
        })
        .collect()
}

fn run(label: &str, placement: Option<&Placement>) {
    let mut cluster = Cluster::with_reserve(
        nodes(),
        Reserve {
            cpu_millis: 100,
            memory_bytes: 256 << 20,
        },
    );
    let started = Instant::now();
    let mut placed = 0usize;
    for i in 0..INSTANCES {
        let req = Request {
            cpu_millis: 100 + (i as u64 % 5) * 50,
            memory_bytes: (128 + (i as u64 % 4) * 128) << 20,
        };
        if cluster
            .place_with(&format!("w{}", i % WORKLOADS), req, placement)
            .is_ok()
        {
            placed += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{label}: {placed}/{INSTANCES} instances on {NODES} nodes in {:.3}s = {:.0} placements/s",
        secs,
        INSTANCES as f64 / secs
    );
}

fn main() {
    run("scheduler, resources only", None);
    run(
        "scheduler, spread over 40 racks",
        Some(&Placement {
            spread: Some(Spread {
                topology_key: "rack".into(),
                max_skew: 1,
            }),
            ..Placement::default()
        }),
    );
}
