//! Randomised robustness runs ("fuzzing" on stable Rust), shared by every
//! crate's fuzz tests (other crates enable the `fuzz` feature in their
//! dev-dependencies): [`run`] drives seeded cases under `catch_unwind` and
//! names the seed of a panic; [`mutate`] edits text inputs, [`mutate_bytes`]
//! binary encodings. This crate's own targets — manifests (parse +
//! validate), quantities, label selectors and cron schedules — are below.
//! Each target runs `IRONMESH_FUZZ_CASES` cases (default 3,000, seconds in
//! all) and prints cases per second. The long run keeps overflow checks on:
//! `IRONMESH_FUZZ_CASES=1000000 CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
//! cargo test -p ironmesh-api --release --lib fuzz -- --nocapture`.

pub use rand::rngs::StdRng;
pub use rand::{Rng, SeedableRng};

/// Cases per target: `IRONMESH_FUZZ_CASES`, default 3,000.
pub fn cases() -> u64 {
    std::env::var("IRONMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// Runs `case` [`cases`] times with a generator seeded from the case
/// number; a panic is reported with the seed that reproduces it.
pub fn run(target: &str, mut case: impl FnMut(&mut StdRng)) {
    run_counted(target, |rng| {
        case(rng);
        true
    })
}

/// Like [`run`]; `case` says whether its input got past decoding (to the
/// code under test), and the count is printed with the rate.
pub fn run_counted(target: &str, mut case: impl FnMut(&mut StdRng) -> bool) {
    let n = cases();
    let started = std::time::Instant::now();
    let mut reached = 0u64;
    for seed in 0..n {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x1f0e_d00d);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng))) {
            Ok(true) => reached += 1,
            Ok(false) => {}
            Err(_) => panic!("fuzz target {target}: case {seed} panicked (rerun with this seed)"),
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "fuzz {target}: {n} cases ({reached} past decoding) in {secs:.2} s, {:.0} cases/s, no panic",
        n as f64 / secs
    );
}

/// `seed` with 1-3 small binary edits (bit flips, random bytes inserted,
/// short ranges removed, printable overwrites): most mutated protobuf
/// encodings still decode, so the checks behind decoding get exercised.
pub fn mutate_bytes(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let len = b.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..8) {
            0 if len > 0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b.insert(at, rng.random()),
            2 if len > 0 => {
                let end = (at + rng.random_range(1..8)).min(len);
                b.drain(at..end);
            }
            3 => b.push(rng.random()),
            _ if len > 0 => b[at] = rng.random_range(0x20..0x7f),
            _ => {}
        }
    }
    b
}

/// Bytes that matter to the grammars under test.
const SPICE: &[u8] = b" \t\n:-,=!()[]{}&*|>#'\"/\\.@0123456789aZ_%\x00\xff";

/// `seed` with 1-8 random edits: flips, inserts, deletes, duplicated or
/// swapped ranges.
pub fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let len = b.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..6) {
            0 if len > 0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b.insert(at, SPICE[rng.random_range(0..SPICE.len())]),
            2 if len > 0 => {
                let end = (at + rng.random_range(1..16)).min(len);
                b.drain(at..end);
            }
            3 if len > 0 => {
                let end = (at + rng.random_range(1..64)).min(len);
                let chunk: Vec<u8> = b[at..end].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, chunk);
            }
            4 if len > 0 => b[at] = SPICE[rng.random_range(0..SPICE.len())],
            _ => b.push(rng.random()),
        }
    }
    b
}

/// A random short string over `alphabet`.
pub fn word(rng: &mut StdRng, alphabet: &[u8], max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{check_cron, Schedule};
    use crate::quantity::{parse_bytes, parse_cpu_millis};
    use crate::selector::LabelSelector;
    use std::collections::BTreeMap;

    const MANIFESTS: [&str; 3] = [
        include_str!("../../examples/orders-data-product.yaml"),
        include_str!("../../examples/orders-pipeline.yaml"),
        "apiVersion: ironmesh.dev/v1\nkind: Workload\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  image: registry.local/web:1.2\n  replicas: 3\n  args: [--port, \"80\"]\n  env: [{name: MODE, value: prod}]\n  resources: {cpu: 500m, memory: 1Gi}\n  readinessProbe: {httpGet: {path: /healthz, port: 80}}\n---\nkind: Service\napiVersion: ironmesh.dev/v1\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n",
    ];

    #[test]
    fn fuzz_manifests_parse_and_validate() {
        run("manifests", |rng| {
            let seed = MANIFESTS[rng.random_range(0..MANIFESTS.len())].as_bytes();
            let text = String::from_utf8_lossy(&mutate(rng, seed)).into_owned();
            if let Ok(docs) = crate::parse_yaml_documents(&text) {
                for d in docs {
                    let _ = crate::validate(&d);
                }
            }
        });
    }

    #[test]
    fn fuzz_quantities() {
        const A: &[u8] = b"0123456789.eE+-kKMGTPEimun ";
        run("quantities", |rng| {
            let s = word(rng, A, 24);
            let _ = parse_bytes(&s);
            let _ = parse_cpu_millis(&s);
            let v = serde_json::json!(rng.random::<f64>() * 10f64.powi(rng.random_range(-5..40)));
            let _ = crate::quantity::bytes_from_json(&v);
            let _ = crate::quantity::cpu_millis_from_json(&v);
            let _ = crate::quantity::format_bytes(rng.random());
            let _ = crate::quantity::format_cpu_millis(rng.random());
        });
    }

    #[test]
    fn fuzz_label_selectors() {
        const A: &[u8] = b"abz09-_./=!,() innotin\t";
        run("selectors", |rng| {
            let s = if rng.random_bool(0.5) {
                word(rng, A, 40)
            } else {
                String::from_utf8_lossy(&mutate(
                    rng,
                    b"app=web,tier!=db,team,!legacy,env in (prod,staging),x notin (a)",
                ))
                .into_owned()
            };
            if let Ok(sel) = LabelSelector::parse(&s) {
                let labels: BTreeMap<String, String> = (0..rng.random_range(0..4))
                    .map(|_| (word(rng, b"abenv", 4), word(rng, b"prodweb", 4)))
                    .collect();
                let _ = sel.matches(&labels);
            }
        });
    }

    #[test]
    fn fuzz_cron_schedules() {
        const A: &[u8] = b"0123456789*/-, @JANFEBMONSUNyearlydailyhourlyevery smh";
        run("cron", |rng| {
            let s = if rng.random_bool(0.5) {
                word(rng, A, 30)
            } else {
                let seeds: [&[u8]; 4] = [
                    b"*/5 * * * *",
                    b"0 2 * * MON-FRI",
                    b"@every 90s",
                    b"15 3 1,15 JAN-JUN */2",
                ];
                let pick = seeds[rng.random_range(0..seeds.len())];
                String::from_utf8_lossy(&mutate(rng, pick)).into_owned()
            };
            let _ = check_cron(&s);
            if let Ok(sched) = Schedule::parse(&s) {
                let after = if rng.random_bool(0.2) {
                    rng.random()
                } else {
                    rng.random_range(0..4_000_000_000)
                };
                let _ = sched.next_after(after);
                let _ = sched.next_after(u64::MAX - rng.random_range(0..100_000));
            }
        });
    }
}
