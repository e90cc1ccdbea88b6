//! The service map and the flow charts.
//!
//! The map is built from the flow ring ([`crate::flow_log::FlowLog`]) at
//! each request: workloads are the graph's nodes, and each (source,
//! destination) pair that exchanged flows is an edge with its counts by
//! verdict, its bytes and the verdict of its latest flow, which colours
//! it. The layout is a circle with nodes in name order, so the same
//! workloads are always drawn in the same places.
//!
//! The charts come from [`FlowRates`]: per-minute counters of the last
//! hour, fed from the flow stream by one task ([`super::feeds`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use ironmesh_proto::v1::FlowRecord;
use maud::{html, Markup, PreEscaped};

/// Minutes the charts cover.
pub const MINUTES: usize = 60;

/// What an edge carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edge {
    pub allowed: u64,
    pub dropped: u64,
    pub rate_limited: u64,
    pub other: u64,
    pub bytes: u64,
    /// The verdict of the newest flow on the edge.
    pub last_verdict: String,
    pub ports: BTreeSet<u32>,
}

/// Which flows the map and table show (query parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub verdict: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub port: String,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        if !self.verdict.is_empty()
            && crate::flow_log::normalize_verdict(&self.verdict) != Some(r.verdict.as_str())
        {
            return false;
        }
        if !self.workload.is_empty()
            && r.src_workload != self.workload
            && r.dst_workload != self.workload
        {
            return false;
        }
        if let Ok(p) = self.port.trim().parse::<u32>() {
            if r.dst_port != p {
                return false;
            }
        }
        true
    }
}

/// The name a flow's end is drawn as.
pub fn end_name(workload: &str, ip: &str) -> String {
    if workload.is_empty() {
        format!("ip:{ip}")
    } else {
        workload.to_string()
    }
}

/// The graph of `flows` (oldest first) that `filter` keeps, plus every
/// workload in `workloads` as a node (unless the filter names one).
pub struct Graph {
    pub nodes: Vec<String>,
    pub edges: BTreeMap<(String, String), Edge>,
}

pub fn graph(flows: &[FlowRecord], workloads: &[String], filter: &Filter) -> Graph {
    let mut nodes: BTreeSet<String> = BTreeSet::new();
    if filter.workload.is_empty() {
        nodes.extend(workloads.iter().cloned());
    } else {
        nodes.insert(filter.workload.clone());
    }
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for r in flows.iter().filter(|r| filter.matches(r)) {
        let src = end_name(&r.src_workload, &r.src_ip);
        let dst = end_name(&r.dst_workload, &r.dst_ip);
        nodes.insert(src.clone());
        nodes.insert(dst.clone());
        let e = edges.entry((src, dst)).or_default();
        match r.verdict.as_str() {
            "allowed" => e.allowed += 1,
            "dropped" => e.dropped += 1,
            "rate-limited" => e.rate_limited += 1,
            _ => e.other += 1,
        }
        e.bytes += r.bytes_fwd + r.bytes_rev;
        e.last_verdict.clone_from(&r.verdict);
        e.ports.insert(r.dst_port);
    }
    Graph {
        nodes: nodes.into_iter().collect(),
        edges,
    }
}

/// A CSS class for a verdict.
pub fn verdict_class(v: &str) -> &'static str {
    match v {
        "allowed" => "allowed",
        "dropped" => "dropped",
        "rate-limited" => "rate-limited",
        _ => "other",
    }
}

/// Draws `g` as SVG: nodes on a circle in name order, edges as arrows.
pub fn svg(g: &Graph) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 520.0;
    let n = g.nodes.len().max(1) as f64;
    let r = (H / 2.0 - 60.0).max(40.0);
    let (cx, cy) = (W / 2.0, H / 2.0);
    let pos: BTreeMap<&str, (f64, f64)> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (name.as_str(), (cx + r * a.cos(), cy + r * a.sin()))
        })
        .collect();
    let mut edges = String::new();
    for ((src, dst), e) in &g.edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(src.as_str()), pos.get(dst.as_str()))
        else {
            continue;
        };
        // Stop short of the destination's circle so the arrow shows.
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let (ex, ey) = (x2 - dx / len * 22.0, y2 - dy / len * 22.0);
        let class = verdict_class(&e.last_verdict);
        let title = format!(
            "{src} → {dst}: {} allowed, {} dropped, {} rate-limited, {} bytes, ports {}",
            e.allowed,
            e.dropped,
            e.rate_limited,
            e.bytes,
            e.ports
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let _ = write!(
            edges,
            r#"<g class="edge {class}" data-src="{}" data-dst="{}" data-verdict="{class}" data-allowed="{}" data-dropped="{}" data-rate-limited="{}"><title>{}</title><line x1="{x1:.1}" y1="{y1:.1}" x2="{ex:.1}" y2="{ey:.1}" marker-end="url(#arrow-{class})"/><text x="{:.1}" y="{:.1}">{}/{}/{}</text></g>"#,
            esc(src),
            esc(dst),
            e.allowed,
            e.dropped,
            e.rate_limited,
            esc(&title),
            (x1 + x2) / 2.0,
            (y1 + y2) / 2.0 - 4.0,
            e.allowed,
            e.dropped,
            e.rate_limited,
        );
    }
    let mut nodes = String::new();
    for (name, (x, y)) in &pos {
        let _ = write!(
            nodes,
            r#"<g class="node" data-name="{0}"><circle cx="{x:.1}" cy="{y:.1}" r="18"/><text x="{x:.1}" y="{1:.1}">{0}</text></g>"#,
            esc(name),
            y + 34.0
        );
    }
    let markers: String = ["allowed", "dropped", "rate-limited", "other"]
        .iter()
        .map(|c| {
            format!(
                r#"<marker id="arrow-{c}" class="{c}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z"/></marker>"#
            )
        })
        .collect();
    html! {
        svg #service-map viewBox=(format!("0 0 {W} {H}")) role="img"
            aria-label=(format!("Service map: {} workloads, {} edges", g.nodes.len(), g.edges.len())) {
            defs { (PreEscaped(markers)) }
            (PreEscaped(edges))
            (PreEscaped(nodes))
        }
    }
}

/// Escapes text for SVG/HTML attributes and content.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Flows counted in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub allowed: u64,
    pub dropped: u64,
    pub rate_limited: u64,
    pub other: u64,
    pub bytes: u64,
}

/// Per-minute flow counters of the last [`MINUTES`] minutes. Cheap to clone.
#[derive(Clone, Default)]
pub struct FlowRates {
    ring: Arc<Mutex<VecDeque<Minute>>>,
}

impl FlowRates {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Minute>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `r` in the minute of its timestamp.
    pub fn add(&self, r: &FlowRecord) {
        let minute = r.time_unix_ms.div_euclid(60_000);
        let mut g = self.lock();
        let slot = match g.back_mut() {
            Some(m) if m.minute == minute => m,
            Some(m) if m.minute > minute => {
                // Late: count it in its minute if still kept.
                match g.iter_mut().find(|m| m.minute == minute) {
                    Some(m) => m,
                    None => return,
                }
            }
            _ => {
                g.push_back(Minute {
                    minute,
                    ..Minute::default()
                });
                while g.len() > MINUTES {
                    g.pop_front();
                }
                match g.back_mut() {
                    Some(m) => m,
                    None => return,
                }
            }
        };
        match r.verdict.as_str() {
            "allowed" => slot.allowed += 1,
            "dropped" => slot.dropped += 1,
            "rate-limited" => slot.rate_limited += 1,
            _ => slot.other += 1,
        }
        slot.bytes += r.bytes_fwd + r.bytes_rev;
    }

    /// The last [`MINUTES`] minutes up to `now_minute`, oldest first, with
    /// zeros for minutes without flows.
    pub fn series(&self, now_minute: i64) -> Vec<Minute> {
        let g = self.lock();
        (0..MINUTES as i64)
            .rev()
            .map(|back| {
                let m = now_minute - back;
                g.iter().find(|x| x.minute == m).copied().unwrap_or(Minute {
                    minute: m,
                    ..Minute::default()
                })
            })
            .collect()
    }
}

/// A sparkline of `values` as inline SVG.
pub fn sparkline(label: &str, class: &str, values: &[u64]) -> Markup {
    const W: f64 = 300.0;
    const H: f64 = 48.0;
    let peak = values.iter().copied().max().unwrap_or(0);
    let max = peak.max(1) as f64;
    let step = W / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                H - 2.0 - (*v as f64 / max) * (H - 4.0)
            )
        })
        .collect();
    let total: u64 = values.iter().sum();
    html! {
        figure.spark {
            svg class=(format!("sparkline {class}")) viewBox=(format!("0 0 {W} {H}"))
                role="img" aria-label=(format!("{label}: {total} in the last hour, at most {peak} a minute")) {
                polyline points=(points.join(" ")) {}
            }
            figcaption { (label) ": " strong { (total) } " in the last hour (peak " (peak) "/min)" }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn flow(src: &str, dst: &str, verdict: &str, port: u32, ms: i64) -> FlowRecord {
        FlowRecord {
            time_unix_ms: ms,
            src_workload: src.into(),
            dst_workload: dst.into(),
            src_ip: "10.0.0.1".into(),
            dst_ip: "10.0.0.2".into(),
            verdict: verdict.into(),
            dst_port: port,
            bytes_fwd: 10,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn edges_count_by_verdict_and_take_the_latest_colour() {
        let flows = vec![
            flow("client", "api", "allowed", 8080, 1),
            flow("client", "api", "allowed", 8080, 2),
            flow("client", "api", "dropped", 8080, 3),
            flow("", "api", "allowed", 80, 4),
        ];
        let g = graph(&flows, &["db".to_string()], &Filter::default());
        assert_eq!(g.nodes, vec!["api", "client", "db", "ip:10.0.0.1"]);
        let e = &g.edges[&("client".to_string(), "api".to_string())];
        assert_eq!((e.allowed, e.dropped, e.bytes), (2, 1, 30));
        assert_eq!(e.last_verdict, "dropped");
        let svg = svg(&g).into_string();
        assert!(svg.contains(r#"class="edge dropped" data-src="client" data-dst="api""#));
        // Deterministic: the same input draws the same picture.
        assert_eq!(
            svg,
            super::svg(&graph(&flows, &["db".to_string()], &Filter::default())).into_string()
        );
    }

    #[test]
    fn filters_keep_verdict_workload_and_port() {
        let flows = vec![
            flow("a", "b", "allowed", 80, 1),
            flow("c", "d", "dropped", 443, 2),
        ];
        let f = Filter {
            verdict: "dropped".into(),
            ..Filter::default()
        };
        assert_eq!(graph(&flows, &[], &f).edges.len(), 1);
        let f = Filter {
            port: "80".into(),
            ..Filter::default()
        };
        assert!(graph(&flows, &[], &f)
            .edges
            .contains_key(&("a".into(), "b".into())));
        let f = Filter {
            workload: "d".into(),
            ..Filter::default()
        };
        let g = graph(&flows, &["a".into()], &f);
        assert_eq!(g.nodes, vec!["c", "d"]);
    }

    #[test]
    fn rates_fill_minutes_and_keep_an_hour() {
        let rates = FlowRates::default();
        for m in 0..90 {
            rates.add(&flow("a", "b", "allowed", 80, m * 60_000));
        }
        rates.add(&flow("a", "b", "dropped", 80, 89 * 60_000 + 5));
        let s = rates.series(89);
        assert_eq!(s.len(), MINUTES);
        assert_eq!(s[MINUTES - 1].dropped, 1);
        assert!(s.iter().all(|m| m.allowed == 1));
        let later = rates.series(100);
        assert_eq!(later.iter().map(|m| m.allowed).sum::<u64>(), 49);
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(esc("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }
}
