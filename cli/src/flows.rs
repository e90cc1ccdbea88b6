//! `imctl flows`: recent flows from the controller's ring, then (with
//! `--follow`) new ones, as a table in the spirit of `hubble observe` or as
//! one JSON object per line.

use futures::StreamExt;
use ironmesh_proto::v1::{FlowRecord, FlowsRequest};
use serde_json::{json, Value};

/// Which verdicts `--verdict` accepts.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum VerdictArg {
    Allowed,
    Dropped,
    RateLimited,
    Spoofed,
    /// Plaintext dropped on its way into a strict mesh instance.
    Plaintext,
}

impl VerdictArg {
    fn as_str(self) -> &'static str {
        match self {
            VerdictArg::Allowed => "allowed",
            VerdictArg::Dropped => "dropped",
            VerdictArg::RateLimited => "rate-limited",
            VerdictArg::Spoofed => "spoofed",
            VerdictArg::Plaintext => "plaintext",
        }
    }
}

pub struct FlowsArgs {
    pub follow: bool,
    pub workload: Option<String>,
    pub verdict: Option<VerdictArg>,
    pub limit: u32,
    pub json: bool,
}

pub async fn run(
    cfg: &ironmesh_api::client_config::ClientConfig,
    args: FlowsArgs,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut api = crate::client::connect(cfg).await?;
    let mut stream = api
        .flows(FlowsRequest {
            follow: args.follow,
            workload: args.workload.unwrap_or_default(),
            verdict: args
                .verdict
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    if !args.json {
        writeln!(stdout, "{}", header())?;
    }
    while let Some(r) = stream.next().await {
        let r = r.map_err(crate::status_err)?;
        if args.json {
            writeln!(stdout, "{}", to_json(&r))?;
        } else {
            writeln!(stdout, "{}", row(&r))?;
        }
        stdout.flush()?;
    }
    Ok(())
}

fn time_of(r: &FlowRecord) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| r.time_unix_ms.to_string())
}

fn endpoint(ip: &str, port: u32, identity: u32, workload: &str, instance: &str) -> String {
    let name = match (instance.is_empty(), workload.is_empty()) {
        (false, _) => instance.to_string(),
        (true, false) => workload.to_string(),
        (true, true) if identity == 0 => "world".to_string(),
        (true, true) => format!("id:{identity}"),
    };
    if port == 0 {
        format!("{name} {ip}")
    } else {
        format!("{name} {ip}:{port}")
    }
}

fn header() -> String {
    format!(
        "{:<25} {:<40} {:<2} {:<40} {:<10} {:<12} {:<8} {:>10} {:<5}",
        "TIME", "SOURCE", "", "DESTINATION", "PORT/PROTO", "VERDICT", "EVENT", "BYTES", "MTLS"
    )
}

fn row(r: &FlowRecord) -> String {
    format!(
        "{:<25} {:<40} {:<2} {:<40} {:<10} {:<12} {:<8} {:>10} {:<5}",
        time_of(r),
        endpoint(
            &r.src_ip,
            r.src_port,
            r.src_identity,
            &r.src_workload,
            &r.src_instance
        ),
        "→",
        endpoint(
            &r.dst_ip,
            0,
            r.dst_identity,
            &r.dst_workload,
            &r.dst_instance
        ),
        format!("{}/{}", r.dst_port, r.protocol),
        r.verdict.to_uppercase(),
        r.event,
        r.bytes_fwd + r.bytes_rev,
        if r.mtls { "mtls" } else { "-" }
    )
}

fn side(ip: &str, port: u32, identity: u32, workload: &str, instance: &str) -> Value {
    json!({
        "ip": ip,
        "port": port,
        "identity": identity,
        "workload": workload,
        "instance": instance,
    })
}

pub fn to_json(r: &FlowRecord) -> Value {
    json!({
        "time": time_of(r),
        "node": r.node,
        "source": side(&r.src_ip, r.src_port, r.src_identity, &r.src_workload, &r.src_instance),
        "destination": side(&r.dst_ip, r.dst_port, r.dst_identity, &r.dst_workload, &r.dst_instance),
        "protocol": r.protocol,
        "verdict": r.verdict,
        "claimedSource": (!r.claimed_src_ip.is_empty()).then_some(&r.claimed_src_ip),
        "event": r.event,
        "hook": r.hook,
        "mtls": r.mtls,
        "sourceSpiffeId": (!r.src_spiffe_id.is_empty()).then_some(&r.src_spiffe_id),
        "destinationSpiffeId": (!r.dst_spiffe_id.is_empty()).then_some(&r.dst_spiffe_id),
        "packets": {"forward": r.packets_fwd, "reverse": r.packets_rev},
        "bytes": {"forward": r.bytes_fwd, "reverse": r.bytes_rev},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_name_both_sides_and_json_keeps_identities() {
        let r = FlowRecord {
            time_unix_ms: 1_700_000_000_000,
            src_ip: "10.244.1.2".into(),
            src_port: 40000,
            dst_ip: "10.244.2.2".into(),
            dst_port: 80,
            protocol: "TCP".into(),
            src_identity: 256,
            dst_identity: 257,
            verdict: "dropped".into(),
            event: "new".into(),
            src_workload: "client".into(),
            dst_instance: "api-0".into(),
            dst_workload: "api".into(),
            ..Default::default()
        };
        let line = row(&r);
        assert!(line.contains("client 10.244.1.2:40000"), "{line}");
        assert!(line.contains("api-0 10.244.2.2"), "{line}");
        assert!(
            line.contains("80/TCP") && line.contains("DROPPED"),
            "{line}"
        );
        let j = to_json(&r);
        assert_eq!(j["source"]["identity"], 256);
        assert_eq!(j["destination"]["workload"], "api");
        assert_eq!(j["time"], "2023-11-14T22:13:20Z");
    }
}
