//! How imctl prints objects: tables per kind (`-o wide` adds columns),
//! YAML, JSON, and the `describe` view.

use std::time::SystemTime;

use ironmesh_api::quantity::format_bytes;
use ironmesh_api::Kind;
use serde_json::Value;

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn map_str(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// "5s", "3m", "2h", "4d" since an RFC 3339 time.
pub fn age(ts: &str) -> String {
    let Ok(t) = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
    else {
        return "<unknown>".into();
    };
    let now = time::OffsetDateTime::from(SystemTime::now());
    let secs = (now - t).whole_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

pub fn node_ready(o: &Value) -> String {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut st = match ready {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        st.push_str(",SchedulingDisabled");
    }
    st
}

/// The reason of a Source's Ready condition (Applied, ApplyFailed,
/// FetchFailed), or Pending before its first sync.
fn source_status(o: &Value) -> String {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("reason").and_then(Value::as_str))
        .unwrap_or("Pending")
        .to_string()
}

/// Phase, or the reason when it says more (CrashLoopBackOff, ImageNotFound).
fn instance_status(o: &Value) -> String {
    let phase = match s(o, "/status/phase") {
        "" => "Pending",
        p => p,
    };
    match s(o, "/status/reason") {
        "" => phase.to_string(),
        r if phase == "Running" && r == "Started" => phase.to_string(),
        r if phase == "Pending" || phase == "Failed" || r == "CrashLoopBackOff" => r.to_string(),
        _ => phase.to_string(),
    }
}

/// The items of the list at `ptr`, each shown by `f`, comma-separated;
/// `<none>` when absent or empty.
fn list_of(o: &Value, ptr: &str, f: impl Fn(&Value) -> String) -> String {
    let items: Vec<String> = o
        .pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(&f).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "<none>".to_string()
    } else {
        items.join(",")
    }
}

fn columns(kind: Kind, wide: bool) -> Vec<&'static str> {
    let mut c = match kind {
        Kind::Node => vec!["NAME", "STATUS", "CPU", "MEMORY", "AGE"],
        Kind::Workload => vec!["NAME", "READY", "IMAGE", "AGE"],
        Kind::Service => vec!["NAME", "CLUSTER-IP", "PORTS", "AGE"],
        Kind::Policy => vec!["NAME", "SELECTOR", "AGE"],
        Kind::Volume => vec!["NAME", "SIZE", "STATUS", "NODE", "USED", "AGE"],
        Kind::Pipeline => vec!["NAME", "STEPS", "SCHEDULE", "AGE"],
        Kind::PipelineRun => vec!["NAME", "PIPELINE", "PHASE", "STEPS", "AGE"],
        Kind::Source => vec!["NAME", "REPO", "BRANCH", "STATUS", "COMMIT", "AGE"],
        Kind::Gateway => vec!["NAME", "LISTENERS", "NODES", "AGE"],
        Kind::HTTPRoute => vec!["NAME", "GATEWAYS", "HOSTNAMES", "ACCEPTED", "AGE"],
        Kind::Secret => vec!["NAME", "TYPE", "ENTRIES", "AGE"],
        Kind::Instance => vec![
            "NAME", "WORKLOAD", "NODE", "STATUS", "READY", "RESTARTS", "IP", "AGE",
        ],
    };
    if wide {
        match kind {
            Kind::Node => c.extend(["ADDRESSES", "KERNEL", "CPU-MODEL", "DISKS", "AGENT"]),
            Kind::Workload => c.extend(["SELECTOR-LABELS"]),
            Kind::Service => c.extend(["SELECTOR"]),
            Kind::Instance => c.extend(["PID", "EXIT", "REASON"]),
            _ => c.extend(["LABELS"]),
        }
    }
    c
}

fn row(kind: Kind, o: &Value, wide: bool) -> Vec<String> {
    let name = s(o, "/metadata/name").to_string();
    let created = age(s(o, "/metadata/creationTimestamp"));
    let mut r = match kind {
        Kind::Node => vec![
            name,
            node_ready(o),
            s(o, "/status/capacity/cpu").to_string(),
            s(o, "/status/capacity/memory").to_string(),
            created,
        ],
        Kind::Workload => vec![
            name,
            format!(
                "{}/{}",
                o.pointer("/status/readyReplicas")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                o.pointer("/spec/replicas")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            ),
            s(o, "/spec/image").to_string(),
            created,
        ],
        Kind::Service => vec![
            name,
            match (s(o, "/status/clusterIP"), s(o, "/spec/clusterIP")) {
                ("", "") => "<pending>".to_string(),
                ("", ip) | (ip, _) => ip.to_string(),
            },
            o.pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!(
                                "{}/{}",
                                p.get("port").map(|v| v.to_string()).unwrap_or_default(),
                                p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default(),
            created,
        ],
        Kind::Policy => vec![name, map_str(o, "/spec/selector"), created],
        Kind::Volume => vec![
            name,
            s(o, "/spec/size").to_string(),
            match s(o, "/status/phase") {
                "" => "Pending".to_string(),
                p => p.to_string(),
            },
            match (s(o, "/status/node"), s(o, "/spec/node")) {
                ("", "") => "<any>".to_string(),
                ("", n) | (n, _) => n.to_string(),
            },
            match o.pointer("/status/usageBytes").and_then(Value::as_u64) {
                Some(b) => format_bytes(b),
                None => "-".to_string(),
            },
            created,
        ],
        Kind::Pipeline => vec![
            name,
            o.pointer("/spec/steps")
                .and_then(Value::as_array)
                .map(|a| a.len().to_string())
                .unwrap_or_default(),
            match s(o, "/spec/schedule") {
                "" => "<none>".to_string(),
                c => c.to_string(),
            },
            created,
        ],
        Kind::PipelineRun => {
            let steps = o
                .pointer("/status/steps")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let done = steps.iter().filter(|st| st["phase"] == "Succeeded").count();
            vec![
                name,
                s(o, "/spec/pipeline").to_string(),
                match s(o, "/status/phase") {
                    "" => "Pending".to_string(),
                    p => p.to_string(),
                },
                format!("{done}/{}", steps.len()),
                created,
            ]
        }
        Kind::Source => vec![
            name,
            s(o, "/spec/repo").to_string(),
            s(o, "/spec/branch").to_string(),
            source_status(o),
            match s(o, "/status/lastAppliedCommit") {
                "" => "<none>".to_string(),
                c => c.chars().take(12).collect(),
            },
            created,
        ],
        Kind::Gateway => vec![
            name,
            list_of(o, "/spec/listeners", |l| {
                format!(
                    "{}/{}",
                    l.get("port").map(Value::to_string).unwrap_or_default(),
                    s(l, "/protocol")
                )
            }),
            list_of(o, "/status/nodes", |n| {
                n.as_str().unwrap_or_default().to_string()
            }),
            created,
        ],
        Kind::HTTPRoute => vec![
            name,
            list_of(o, "/spec/parentRefs", |p| s(p, "/gateway").to_string()),
            list_of(o, "/spec/hostnames", |h| {
                h.as_str().unwrap_or_default().to_string()
            }),
            o.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Accepted"))
                .map_or_else(|| "<unknown>".to_string(), |c| s(c, "/status").to_string()),
            created,
        ],
        Kind::Secret => vec![
            name,
            s(o, "/spec/type").to_string(),
            list_of(o, "/status/entries", |e| {
                format!(
                    "{}({}B)",
                    s(e, "/name"),
                    e.get("bytes").map(Value::to_string).unwrap_or_default()
                )
            }),
            created,
        ],
        Kind::Instance => vec![
            name,
            s(o, "/spec/workload").to_string(),
            match s(o, "/spec/node") {
                "" => "<none>".to_string(),
                n => n.to_string(),
            },
            instance_status(o),
            if o.pointer("/status/ready").and_then(Value::as_bool) == Some(true) {
                "1/1"
            } else {
                "0/1"
            }
            .to_string(),
            o.pointer("/status/restarts")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
            match s(o, "/status/ip") {
                "" => "<none>".to_string(),
                ip => ip.to_string(),
            },
            created,
        ],
    };
    if wide {
        match kind {
            Kind::Node => {
                let addrs = o
                    .pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .filter(|a| !a.contains(':'))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                let disks = o
                    .pointer("/status/inventory/disks")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|d| {
                                format!(
                                    "{}:{}",
                                    d.get("name").and_then(Value::as_str).unwrap_or(""),
                                    format_bytes(
                                        d.get("sizeBytes").and_then(Value::as_u64).unwrap_or(0)
                                    )
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                r.extend([
                    addrs,
                    s(o, "/status/nodeInfo/kernel").to_string(),
                    s(o, "/status/inventory/cpu/model").to_string(),
                    disks,
                    s(o, "/status/nodeInfo/agentVersion").to_string(),
                ]);
            }
            Kind::Workload => r.push(map_str(o, "/metadata/labels")),
            Kind::Service => r.push(map_str(o, "/spec/selector")),
            Kind::Instance => r.extend([
                o.pointer("/status/pid")
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".to_string()),
                o.pointer("/status/exitCode")
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".to_string()),
                s(o, "/status/reason").to_string(),
            ]),
            _ => r.push(map_str(o, "/metadata/labels")),
        }
    }
    r
}

/// Renders objects of one kind as an aligned table.
pub fn table(kind: Kind, objects: &[Value], wide: bool) -> String {
    let mut rows = vec![columns(kind, wide)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>()];
    rows.extend(objects.iter().map(|o| row(kind, o, wide)));
    align(rows)
}

/// The widest a table cell prints; longer values end in `…` (a server may
/// hold a 2 MB image name, and padding to that panics in `format!`).
pub const MAX_CELL: usize = 96;

/// `c` cut to [`MAX_CELL`] characters, ending in `…` when cut; control
/// characters (a newline in a reason) print as spaces so rows stay rows.
pub fn cell(c: &str) -> String {
    let clean = |ch: char| if ch.is_control() { ' ' } else { ch };
    if c.chars().count() <= MAX_CELL {
        c.chars().map(clean).collect()
    } else {
        let mut out: String = c.chars().take(MAX_CELL - 1).map(clean).collect();
        out.push('…');
        out
    }
}

/// `c` padded with spaces to `w` characters (without `format!` widths,
/// which are limited to u16).
pub fn pad(c: &str, w: usize) -> String {
    let n = c.chars().count();
    let mut out = c.to_string();
    out.extend(std::iter::repeat_n(' ', w.saturating_sub(n)));
    out
}

/// Left-aligned columns, three spaces apart, each cut to [`MAX_CELL`]; the
/// last column is not padded.
pub fn align(rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| cell(c)).collect())
        .collect();
    let n = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c.clone()
                } else {
                    pad(c, widths.get(i).copied().unwrap_or(0))
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The `describe` view: a summary, then conditions, then spec and status.
pub fn describe(kind: Kind, o: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<16}{}\n", format!("{k}:"), v));
    line("Name", s(o, "/metadata/name").to_string());
    line("Kind", kind.as_str().to_string());
    line("Labels", or_none(map_str(o, "/metadata/labels")));
    line("Annotations", or_none(map_str(o, "/metadata/annotations")));
    line("UID", s(o, "/metadata/uid").to_string());
    line(
        "Created",
        format!(
            "{} ({} ago)",
            s(o, "/metadata/creationTimestamp"),
            age(s(o, "/metadata/creationTimestamp"))
        ),
    );
    line("Revision", s(o, "/metadata/resourceVersion").to_string());
    if kind == Kind::Workload {
        line(
            "Mesh",
            o.pointer("/spec/mesh/mode")
                .and_then(Value::as_str)
                .unwrap_or("(cluster default)")
                .to_string(),
        );
        for c in o
            .pointer("/status/meshCertificates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let until = c.get("notAfterUnix").and_then(Value::as_i64).unwrap_or(0);
            let when = time::OffsetDateTime::from_unix_timestamp(until)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| until.to_string());
            line(
                "Certificate",
                format!(
                    "{} on node {}, expires {when}",
                    s(c, "/spiffeId"),
                    s(c, "/node")
                ),
            );
        }
    }
    if kind == Kind::Node {
        line("Status", node_ready(o));
        line(
            "CPU",
            format!(
                "{} logical, {} physical, {}",
                o.pointer("/status/inventory/cpu/logical")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                o.pointer("/status/inventory/cpu/physical")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                s(o, "/status/inventory/cpu/model")
            ),
        );
        line(
            "Memory",
            format_bytes(
                o.pointer("/status/inventory/memory/totalBytes")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            ),
        );
        line(
            "System",
            format!(
                "{} {} kernel {}",
                s(o, "/status/nodeInfo/os"),
                s(o, "/status/nodeInfo/arch"),
                s(o, "/status/nodeInfo/kernel")
            ),
        );
        line("Agent", s(o, "/status/nodeInfo/agentVersion").to_string());
        if let Some(d) = o.pointer("/status/storage/diskUse") {
            let b = |k: &str| format_bytes(d.get(k).and_then(Value::as_u64).unwrap_or(0));
            line(
                "Disk use",
                format!(
                    "{} (images {}, logs {}, volumes {}, state {})",
                    b("totalBytes"),
                    b("imageBytes"),
                    b("logBytes"),
                    b("volumeBytes"),
                    b("stateBytes")
                ),
            );
        }
        out.push_str("Disks:\n");
        for d in o
            .pointer("/status/inventory/disks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "  {:<10} {:>10}  {}  {}\n",
                s(d, "/name"),
                format_bytes(d.get("sizeBytes").and_then(Value::as_u64).unwrap_or(0)),
                if d.get("rotational").and_then(Value::as_bool) == Some(true) {
                    "rotational"
                } else {
                    "solid-state"
                },
                s(d, "/model")
            ));
        }
        out.push_str("NICs:\n");
        for n in o
            .pointer("/status/inventory/nics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let addrs = n
                .get("addresses")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "  {:<12} {:<17} mtu {:<5} {:<5} {}\n",
                s(n, "/name"),
                s(n, "/mac"),
                n.get("mtu").map(|v| v.to_string()).unwrap_or_default(),
                s(n, "/operState"),
                addrs
            ));
        }
    }
    if let Some(conds) = o.pointer("/status/conditions").and_then(Value::as_array) {
        out.push_str("Conditions:\n  TYPE             STATUS  REASON               LAST HEARTBEAT        LAST TRANSITION       MESSAGE\n");
        for c in conds {
            out.push_str(&format!(
                "  {:<16} {:<7} {:<20} {:<21} {:<21} {}\n",
                s(c, "/type"),
                s(c, "/status"),
                s(c, "/reason"),
                s(c, "/lastHeartbeatTime"),
                s(c, "/lastTransitionTime"),
                s(c, "/message")
            ));
        }
    }
    if kind != Kind::Node {
        if let Some(spec) = o.get("spec") {
            out.push_str("Spec:\n");
            out.push_str(&indent(&serde_norway::to_string(spec).unwrap_or_default()));
        }
        if let Some(status) = o.get("status").filter(|_| kind != Kind::Instance) {
            out.push_str("Status:\n");
            out.push_str(&indent(
                &serde_norway::to_string(status).unwrap_or_default(),
            ));
        }
    }
    out
}

/// An object's own recent events (a Node's), oldest first, for
/// `imctl describe`.
pub fn object_events(o: &Value) -> String {
    let events: Vec<&Value> = o
        .pointer("/status/events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if events.is_empty() {
        return "Events:         <none>\n".to_string();
    }
    let mut rows = vec![vec![
        "AGE".to_string(),
        "TYPE".to_string(),
        "REASON".to_string(),
        "MESSAGE".to_string(),
    ]];
    for e in events {
        let count = e.get("count").and_then(Value::as_u64).unwrap_or(1);
        let when = age(s(e, "/time"));
        rows.push(vec![
            if count > 1 {
                format!("{when} (x{count})")
            } else {
                when
            },
            s(e, "/type").to_string(),
            s(e, "/reason").to_string(),
            s(e, "/message").to_string(),
        ]);
    }
    format!("Events:\n{}", indent(&align(rows)))
}

/// The instances of a workload (or one instance) and their recent events,
/// oldest first, for `imctl describe`.
pub fn instances_and_events(instances: &[Value]) -> String {
    let mut out = String::new();
    if instances.is_empty() {
        out.push_str("Instances:      <none>\n");
    } else {
        out.push_str("Instances:\n");
        let table = table(Kind::Instance, instances, true);
        out.push_str(&indent(&table));
        for i in instances {
            let msg = s(i, "/status/message");
            if !msg.is_empty() {
                out.push_str(&format!("  {}: {msg}\n", s(i, "/metadata/name")));
            }
        }
    }
    let mut events: Vec<(String, String, String, String, u64, String)> = Vec::new();
    for i in instances {
        for e in i
            .pointer("/status/events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            events.push((
                s(e, "/time").to_string(),
                s(e, "/type").to_string(),
                s(e, "/reason").to_string(),
                s(i, "/metadata/name").to_string(),
                e.get("count").and_then(Value::as_u64).unwrap_or(1),
                s(e, "/message").to_string(),
            ));
        }
    }
    events.sort();
    if events.is_empty() {
        out.push_str("Events:         <none>\n");
    } else {
        out.push_str("Events:\n");
        let mut rows = vec![vec![
            "AGE".to_string(),
            "TYPE".to_string(),
            "REASON".to_string(),
            "INSTANCE".to_string(),
            "MESSAGE".to_string(),
        ]];
        for (time, ty, reason, inst, count, msg) in events {
            let age = if count > 1 {
                format!("{} (x{count})", age(&time))
            } else {
                age(&time)
            };
            rows.push(vec![age, ty, reason, inst, msg]);
        }
        out.push_str(&indent(&align(rows)));
    }
    out
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn very_long_fields_are_cut_not_a_panic() {
        let long = "i".repeat(2_000_000);
        let w = json!({"metadata": {"name": "web", "labels": {"app": long.clone()},
            "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"image": long.clone(), "replicas": 1},
            "status": {"reason": format!("{long}\nsecond line")}});
        for kind in [Kind::Workload, Kind::Instance, Kind::Node, Kind::Service] {
            for wide in [false, true] {
                let t = table(kind, std::slice::from_ref(&w), wide);
                assert_eq!(t.lines().count(), 2, "{kind}: one header, one row");
                for line in t.lines() {
                    assert!(
                        line.chars().count() < 20 * MAX_CELL,
                        "{kind}: {} chars",
                        line.len()
                    );
                }
                if t.contains('i') && t.lines().nth(1).is_some_and(|l| l.contains("iii")) {
                    assert!(t.contains('…'), "{kind}: cut values end in …");
                }
            }
        }
        let _ = describe(Kind::Workload, &w);
    }

    #[test]
    fn cells_are_cut_and_padded_by_characters() {
        assert_eq!(cell("abc"), "abc");
        assert_eq!(cell("a\nb"), "a b");
        let c = cell(&"é".repeat(500));
        assert_eq!(c.chars().count(), MAX_CELL);
        assert!(c.ends_with('…'));
        assert_eq!(pad("é", 3), "é  ");
        assert_eq!(pad("long", 2), "long");
    }

    #[test]
    fn node_table_shows_status_cpu_memory() {
        let n = json!({"metadata": {"name": "n1", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "status": {"capacity": {"cpu": "2", "memory": "24Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let t = table(Kind::Node, &[n], false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].contains("n1") && lines[1].contains("Ready") && lines[1].contains("24Gi"));
        assert!(lines[1].ends_with('d'), "{t}");
    }

    #[test]
    fn not_ready_and_cordoned_nodes_say_so() {
        let n = json!({"spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(node_ready(&n), "NotReady,SchedulingDisabled");
    }

    #[test]
    fn source_table_shows_sync_status_and_applied_commit() {
        let src = json!({"metadata": {"name": "platform"},
            "spec": {"repo": "/srv/git/platform", "branch": "main"},
            "status": {"lastAppliedCommit": "4be1c0aa11223344556677889900aabbccddeeff",
                       "conditions": [{"type": "Ready", "status": "False", "reason": "ApplyFailed"}]}});
        let t = table(Kind::Source, &[src], false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("STATUS") && lines[0].contains("COMMIT"),
            "{t}"
        );
        assert!(
            lines[1].contains("ApplyFailed") && lines[1].contains("4be1c0aa1122 "),
            "{t}"
        );
        let fresh = json!({"metadata": {"name": "p"}, "spec": {"repo": "/r", "branch": "main"}});
        let t = table(Kind::Source, &[fresh], false);
        assert!(t.contains("Pending") && t.contains("<none>"), "{t}");
    }
}
