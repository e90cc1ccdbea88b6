//! The node's desired state from one whole assignment: a pure function (no
//! I/O, no logging) whose result the apply task writes out. What this agent
//! cannot use is left out and listed in [`DesiredState::skipped`] for the
//! caller to log; an instance whose spec cannot be read becomes a Failed
//! state (reason `InvalidSpec`) instead of an instance.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ironmesh_proto::v1::{policy_rule, Assignment, InstanceState};

use crate::datapath::{Direction, PolicyRule, Protocol, RateLimit, ServiceEntry};
use crate::network::PeerRoute;
use crate::storage::{VolumePlan, WantedVolume};
use crate::supervisor::DesiredInstance;

/// The reserved identity of this host's own addresses (identities from
/// label sets start at 256).
pub const HOST_IDENTITY: u32 = 1;

/// What the desired state depends on besides the assignment.
#[derive(Clone, Copy, Default)]
pub struct Inputs<'a> {
    /// This host's own IPv4 addresses (not loopback), which get
    /// [`HOST_IDENTITY`]. `None`: this node has no datapath, and the
    /// datapath part is not built.
    pub host_ips: Option<&'a [Ipv4Addr]>,
    /// The host directory of a pipeline step's work-queue socket, by
    /// instance name; `None` without a work-queue proxy (steps get none).
    pub queue_dir: Option<&'a dyn Fn(&str) -> PathBuf>,
}

/// Everything one whole assignment asks of this node.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredState {
    pub revision: u64,
    /// The instances to run, decoded.
    pub instances: Vec<DesiredInstance>,
    /// Instances whose spec cannot be read: not run; these Failed states
    /// say why.
    pub rejected: Vec<InstanceState>,
    /// Routes to the other nodes' pod CIDRs.
    pub peers: Vec<PeerRoute>,
    /// What the BPF maps should hold (`None` without a datapath).
    pub datapath: Option<DatapathState>,
    /// Every volume bound to this node, and the deleted ones to remove.
    pub volumes: VolumePlan,
    /// Entries left out (or, for a volume backend, defaulted), in
    /// assignment order.
    pub skipped: Vec<Skipped>,
}

/// The datapath's maps as the assignment wants them (replace-sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Address → identity, this host's own addresses last.
    pub identities: Vec<(Ipv4Addr, u32)>,
    /// Allow rules, each one the datapath can hold.
    pub rules: Vec<PolicyRule>,
    pub ingress_enforced: Vec<u32>,
    pub egress_enforced: Vec<u32>,
    pub services: Vec<ServiceEntry>,
    /// Mesh instances (permissive or strict), by address: their workload
    /// and whether strict.
    pub mesh: Vec<MeshEntry>,
}

/// One address of a mesh instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEntry {
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub workload: String,
    pub strict: bool,
}

/// An assignment entry this agent cannot use as sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    #[error("instance {instance}: this agent cannot read the instance spec: {error}")]
    Spec { instance: String, error: String },
    #[error("peer {peer}: unreadable pod CIDR {pod_cidr:?} or address {node_ip:?}")]
    Peer {
        peer: String,
        pod_cidr: String,
        node_ip: String,
    },
    #[error("identity {identity}: unreadable address {ip:?}")]
    Identity { ip: String, identity: u32 },
    #[error("policy rule without a direction: {rule}")]
    RuleDirection { rule: String },
    #[error("policy rule this agent cannot express (protocol or port): {rule}")]
    RuleInexpressible { rule: String },
    #[error("policy rule the datapath cannot hold: {error}")]
    RuleRejected { error: String },
    #[error("service {service}: unreadable VIP {vip:?}, port {port} or protocol {protocol:?}")]
    Service {
        service: String,
        vip: String,
        port: u32,
        protocol: String,
    },
    #[error("service {service}: unreadable backend {ip:?} port {port}")]
    Backend {
        service: String,
        ip: String,
        port: u32,
    },
    #[error("volume {volume}: unknown backend {backend:?} ({error}); the pool's default is used")]
    VolumeBackend {
        volume: String,
        backend: String,
        error: String,
    },
}

/// The node's desired state for the whole assignment `a`.
pub fn desired_state(a: &Assignment, inputs: &Inputs<'_>) -> DesiredState {
    let mut skipped = Vec::new();
    let (instances, rejected) = instances(a, inputs.queue_dir, &mut skipped);
    let peers = peers(a, &mut skipped);
    let datapath = inputs.host_ips.map(|ips| datapath(a, ips, &mut skipped));
    let volumes = volumes(a, &mut skipped);
    DesiredState {
        revision: a.revision,
        instances,
        rejected,
        peers,
        datapath,
        volumes,
        skipped,
    }
}

fn instances(
    a: &Assignment,
    queue_dir: Option<&dyn Fn(&str) -> PathBuf>,
    skipped: &mut Vec<Skipped>,
) -> (Vec<DesiredInstance>, Vec<InstanceState>) {
    let mut desired = Vec::with_capacity(a.instances.len());
    let mut rejected = Vec::new();
    for i in &a.instances {
        match serde_json::from_str::<ironmesh_api::workload::WorkloadSpec>(&i.spec_json) {
            Ok(spec) => desired.push(DesiredInstance {
                name: i.name.clone(),
                workload: i.workload.clone(),
                spec_generation: i.spec_generation,
                spec,
                image_digest: i.image_digest.clone(),
                volumes: i.volumes.clone(),
                queue_dir: i.task.as_ref().and(queue_dir).map(|dir| dir(&i.name)),
            }),
            Err(e) => {
                skipped.push(Skipped::Spec {
                    instance: i.name.clone(),
                    error: e.to_string(),
                });
                rejected.push(InstanceState {
                    name: i.name.clone(),
                    phase: ironmesh_proto::v1::InstancePhase::Failed.into(),
                    reason: "InvalidSpec".into(),
                    message: format!("this agent cannot read the instance spec: {e}"),
                    spec_generation: i.spec_generation,
                    ..Default::default()
                });
            }
        }
    }
    (desired, rejected)
}

fn peers(a: &Assignment, skipped: &mut Vec<Skipped>) -> Vec<PeerRoute> {
    let mut routes = Vec::with_capacity(a.peers.len());
    for p in &a.peers {
        match (p.pod_cidr.parse::<ipnet::Ipv4Net>(), p.node_ip.parse()) {
            (Ok(pod_cidr), Ok(via)) => routes.push(PeerRoute {
                node: p.name.clone(),
                pod_cidr,
                via,
            }),
            _ => skipped.push(Skipped::Peer {
                peer: p.name.clone(),
                pod_cidr: p.pod_cidr.clone(),
                node_ip: p.node_ip.clone(),
            }),
        }
    }
    routes
}

/// The protocols a rule or service names: "" is every protocol.
fn protocols(p: &str) -> Option<Vec<Protocol>> {
    match p {
        "TCP" => Some(vec![Protocol::Tcp]),
        "UDP" => Some(vec![Protocol::Udp]),
        "" => Some(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp]),
        _ => None,
    }
}

/// Identities, policy and services for the BPF maps. This host's own
/// addresses are the reserved host identity, always allowed into its local
/// instances: probes and operators on the node must reach enforced
/// instances (Cilium's allow-localhost=always). The host is never
/// egress-enforced, and the replies of an egress-enforced instance to it
/// pass by conntrack, so egress needs no host rule; connections an
/// egress-enforced instance opens to the host need a rule, like any other
/// destination.
fn datapath(a: &Assignment, host_ips: &[Ipv4Addr], skipped: &mut Vec<Skipped>) -> DatapathState {
    let mut identities = Vec::with_capacity(a.identities.len() + host_ips.len());
    let mut mesh = Vec::new();
    for e in &a.identities {
        match e.ip.parse() {
            Ok(ip) => {
                identities.push((ip, e.identity));
                let mode = ironmesh_proto::v1::MeshMode::try_from(e.mesh)
                    .unwrap_or(ironmesh_proto::v1::MeshMode::Off);
                if mode != ironmesh_proto::v1::MeshMode::Off && !e.workload.is_empty() {
                    mesh.push(MeshEntry {
                        ip,
                        identity: e.identity,
                        workload: e.workload.clone(),
                        strict: mode == ironmesh_proto::v1::MeshMode::Strict,
                    });
                }
            }
            Err(_) => skipped.push(Skipped::Identity {
                ip: e.ip.clone(),
                identity: e.identity,
            }),
        }
    }
    identities.extend(host_ips.iter().map(|ip| (*ip, HOST_IDENTITY)));

    let mut rules = Vec::new();
    for r in &a.policy_rules {
        let direction = match policy_rule::Direction::try_from(r.direction) {
            Ok(policy_rule::Direction::Ingress) => Direction::Ingress,
            Ok(policy_rule::Direction::Egress) => Direction::Egress,
            _ => {
                skipped.push(Skipped::RuleDirection {
                    rule: format!("{r:?}"),
                });
                continue;
            }
        };
        let (Some(protos), Ok(port)) = (protocols(&r.protocol), u16::try_from(r.port)) else {
            skipped.push(Skipped::RuleInexpressible {
                rule: format!("{r:?}"),
            });
            continue;
        };
        // Identity 0 on the peer side means any peer (see the proto).
        let named = |id: u32| (id != 0).then_some(id);
        for p in protos {
            rules.push(PolicyRule {
                direction,
                src_identity: named(r.src_identity),
                dst_identity: named(r.dst_identity),
                port: if p == Protocol::Icmp { 0 } else { port },
                proto: p,
                rate: (r.rate_per_second > 0).then_some(RateLimit {
                    per_second: r.rate_per_second,
                    burst: r.burst,
                }),
                rule_id: 0,
            });
        }
    }
    for dst in &a.ingress_enforced {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp] {
            rules.push(PolicyRule::ingress(Some(HOST_IDENTITY), *dst, 0, p));
        }
    }
    rules.dedup();
    // One rule this agent cannot hold must not keep every other policy
    // change out of the kernel: leave it out (the caller says so).
    rules.retain(|r| match r.check() {
        Ok(()) => true,
        Err(e) => {
            skipped.push(Skipped::RuleRejected {
                error: e.to_string(),
            });
            false
        }
    });

    let mut services = Vec::with_capacity(a.services.len());
    for s in &a.services {
        let head = (
            s.vip.parse::<Ipv4Addr>(),
            u16::try_from(s.port),
            protocols(&s.protocol).and_then(|p| p.into_iter().next()),
        );
        let (Ok(vip), Ok(port), Some(proto)) = head else {
            skipped.push(Skipped::Service {
                service: s.name.clone(),
                vip: s.vip.clone(),
                port: s.port,
                protocol: s.protocol.clone(),
            });
            continue;
        };
        let mut backends = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            match (b.ip.parse::<Ipv4Addr>(), u16::try_from(b.port)) {
                (Ok(ip), Ok(port)) => backends.push((ip, port)),
                _ => skipped.push(Skipped::Backend {
                    service: s.name.clone(),
                    ip: b.ip.clone(),
                    port: b.port,
                }),
            }
        }
        services.push(ServiceEntry {
            vip,
            port,
            proto,
            backends,
        });
    }

    DatapathState {
        identities,
        rules,
        ingress_enforced: a.ingress_enforced.clone(),
        egress_enforced: a.egress_enforced.clone(),
        services,
        mesh,
    }
}

/// The volumes as storage wants them; an unknown backend falls back to the
/// pool's default.
fn volumes(a: &Assignment, skipped: &mut Vec<Skipped>) -> VolumePlan {
    VolumePlan {
        wanted: wanted_volumes(a, skipped),
        remove: a.remove_volumes.clone(),
    }
}

fn wanted_volumes(a: &Assignment, skipped: &mut Vec<Skipped>) -> Vec<WantedVolume> {
    a.volumes
        .iter()
        .map(|v| WantedVolume {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            backend: match v.backend.as_str() {
                "" => None,
                b => b
                    .parse()
                    .inspect_err(|e: &String| {
                        skipped.push(Skipped::VolumeBackend {
                            volume: v.name.clone(),
                            backend: b.to_string(),
                            error: e.clone(),
                        })
                    })
                    .ok(),
            },
            pool: (!v.pool.is_empty()).then(|| v.pool.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_proto::v1::{
        IdentityEntry, InstanceAssignment, PeerNode, PipelineTask, PolicyRule as ProtoRule,
        ServiceBackend, ServiceEntry as ProtoService, VolumeAssignment,
    };

    const SPEC: &str = r#"{"image":"registry.local/web:1.2","command":["/bin/web"]}"#;

    fn instance(name: &str, spec_json: &str) -> InstanceAssignment {
        InstanceAssignment {
            name: name.into(),
            workload: "web".into(),
            spec_generation: 3,
            spec_json: spec_json.into(),
            image_digest: "sha256:abc".into(),
            ..Default::default()
        }
    }

    fn rule(
        direction: policy_rule::Direction,
        src: u32,
        dst: u32,
        port: u32,
        protocol: &str,
    ) -> ProtoRule {
        ProtoRule {
            direction: direction as i32,
            src_identity: src,
            dst_identity: dst,
            port,
            protocol: protocol.into(),
            ..Default::default()
        }
    }

    fn with_datapath(a: &Assignment, host_ips: &[Ipv4Addr]) -> (DatapathState, Vec<Skipped>) {
        let d = desired_state(
            a,
            &Inputs {
                host_ips: Some(host_ips),
                ..Default::default()
            },
        );
        (d.datapath.expect("a datapath state"), d.skipped)
    }

    #[test]
    fn a_whole_assignment_gives_its_instances_decoded() {
        let mut step = instance("step-0", SPEC);
        step.task = Some(PipelineTask {
            run: "r".into(),
            step: "s".into(),
            index: 0,
            worker: false,
        });
        let a = Assignment {
            revision: 42,
            instances: vec![instance("web-abcde", SPEC), step],
            ..Default::default()
        };
        let dir = |name: &str| PathBuf::from("/q").join(name);
        let d = desired_state(
            &a,
            &Inputs {
                queue_dir: Some(&dir),
                ..Default::default()
            },
        );
        assert_eq!(d.revision, 42);
        assert!(d.rejected.is_empty());
        assert!(d.skipped.is_empty());
        assert!(d.datapath.is_none(), "no host addresses: no datapath part");
        let spec: ironmesh_api::workload::WorkloadSpec = serde_json::from_str(SPEC).unwrap();
        assert_eq!(
            d.instances,
            vec![
                DesiredInstance {
                    name: "web-abcde".into(),
                    workload: "web".into(),
                    spec_generation: 3,
                    spec: spec.clone(),
                    image_digest: "sha256:abc".into(),
                    volumes: vec![],
                    queue_dir: None,
                },
                DesiredInstance {
                    name: "step-0".into(),
                    workload: "web".into(),
                    spec_generation: 3,
                    spec,
                    image_digest: "sha256:abc".into(),
                    volumes: vec![],
                    queue_dir: Some(PathBuf::from("/q/step-0")),
                },
            ]
        );

        // Without a work-queue proxy a step gets no socket directory.
        let d = desired_state(&a, &Inputs::default());
        assert_eq!(d.instances[1].queue_dir, None);
    }

    #[test]
    fn an_unreadable_spec_is_rejected_with_invalid_spec() {
        let a = Assignment {
            revision: 7,
            instances: vec![
                instance("good", SPEC),
                instance("bad", r#"{"image":"x","noSuchField":1}"#),
            ],
            ..Default::default()
        };
        let d = desired_state(&a, &Inputs::default());
        assert_eq!(d.instances.len(), 1);
        assert_eq!(d.instances[0].name, "good");
        assert_eq!(d.rejected.len(), 1);
        let st = &d.rejected[0];
        assert_eq!(
            (st.name.as_str(), st.phase().name(), st.reason.as_str()),
            ("bad", "Failed", "InvalidSpec")
        );
        assert_eq!(st.spec_generation, 3);
        assert!(st.message.contains("noSuchField"), "{}", st.message);
        assert!(matches!(&d.skipped[..], [Skipped::Spec { instance, .. }] if instance == "bad"));
    }

    #[test]
    fn identity_0_on_the_peer_side_means_any_peer() {
        use policy_rule::Direction as D;
        let a = Assignment {
            policy_rules: vec![
                rule(D::Ingress, 0, 300, 80, "TCP"),
                rule(D::Egress, 300, 0, 53, "UDP"),
                rule(D::Ingress, 301, 300, 443, "TCP"),
            ],
            ..Default::default()
        };
        let (dp, skipped) = with_datapath(&a, &[]);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            dp.rules,
            vec![
                PolicyRule::ingress(None, 300, 80, Protocol::Tcp),
                PolicyRule::egress(300, None, 53, Protocol::Udp),
                PolicyRule::ingress(Some(301), 300, 443, Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn identity_0_on_the_enforced_side_is_refused_not_fatal() {
        use policy_rule::Direction as D;
        let a = Assignment {
            policy_rules: vec![
                rule(D::Ingress, 300, 0, 80, "TCP"),
                rule(D::Ingress, 301, 300, 80, "TCP"),
            ],
            ..Default::default()
        };
        let (dp, skipped) = with_datapath(&a, &[]);
        assert_eq!(
            dp.rules,
            vec![PolicyRule::ingress(Some(301), 300, 80, Protocol::Tcp)]
        );
        assert!(
            matches!(&skipped[..], [Skipped::RuleRejected { .. }]),
            "{skipped:?}"
        );
    }

    #[test]
    fn any_protocol_is_tcp_udp_and_icmp_without_a_port() {
        let mut r = rule(policy_rule::Direction::Ingress, 301, 300, 8080, "");
        r.rate_per_second = 10;
        r.burst = 20;
        let (dp, _) = with_datapath(
            &Assignment {
                policy_rules: vec![r],
                ..Default::default()
            },
            &[],
        );
        let got: Vec<(Protocol, u16, Option<RateLimit>)> =
            dp.rules.iter().map(|r| (r.proto, r.port, r.rate)).collect();
        let rate = Some(RateLimit {
            per_second: 10,
            burst: 20,
        });
        assert_eq!(
            got,
            vec![
                (Protocol::Tcp, 8080, rate),
                (Protocol::Udp, 8080, rate),
                (Protocol::Icmp, 0, rate),
            ]
        );
    }

    #[test]
    fn rules_without_a_direction_or_with_an_unknown_protocol_are_skipped() {
        use policy_rule::Direction as D;
        let a = Assignment {
            policy_rules: vec![
                rule(D::Unspecified, 301, 300, 80, "TCP"),
                rule(D::Ingress, 301, 300, 80, "SCTP"),
                rule(D::Ingress, 301, 300, 70_000, "TCP"),
                rule(D::Ingress, 301, 300, 80, "TCP"),
            ],
            ..Default::default()
        };
        let (dp, skipped) = with_datapath(&a, &[]);
        assert_eq!(
            dp.rules,
            vec![PolicyRule::ingress(Some(301), 300, 80, Protocol::Tcp)]
        );
        assert!(
            matches!(
                &skipped[..],
                [
                    Skipped::RuleDirection { .. },
                    Skipped::RuleInexpressible { .. },
                    Skipped::RuleInexpressible { .. }
                ]
            ),
            "{skipped:?}"
        );
    }

    #[test]
    fn host_addresses_get_the_host_identity_and_into_every_enforced_instance() {
        let host: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let a = Assignment {
            identities: vec![
                IdentityEntry {
                    ip: "10.0.0.5".into(),
                    identity: 300,
                    ..Default::default()
                },
                IdentityEntry {
                    ip: "not-an-ip".into(),
                    identity: 301,
                    ..Default::default()
                },
            ],
            ingress_enforced: vec![300],
            egress_enforced: vec![302],
            ..Default::default()
        };
        let (dp, skipped) = with_datapath(&a, &[host]);
        assert_eq!(
            dp.identities,
            vec![("10.0.0.5".parse().unwrap(), 300), (host, HOST_IDENTITY)]
        );
        assert_eq!(
            dp.rules,
            [Protocol::Tcp, Protocol::Udp, Protocol::Icmp]
                .map(|p| PolicyRule::ingress(Some(HOST_IDENTITY), 300, 0, p))
                .to_vec()
        );
        assert_eq!(
            (dp.ingress_enforced, dp.egress_enforced),
            (vec![300], vec![302])
        );
        assert_eq!(
            skipped,
            vec![Skipped::Identity {
                ip: "not-an-ip".into(),
                identity: 301
            }]
        );
    }

    #[test]
    fn services_keep_their_readable_backends() {
        let a = Assignment {
            services: vec![
                ProtoService {
                    name: "web".into(),
                    vip: "10.96.0.10".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    backends: vec![
                        ServiceBackend {
                            ip: "10.0.0.5".into(),
                            port: 8080,
                        },
                        ServiceBackend {
                            ip: "10.0.0.6".into(),
                            port: 70_000,
                        },
                    ],
                },
                ProtoService {
                    name: "dns".into(),
                    vip: "10.96.0.53".into(),
                    port: 53,
                    protocol: "UDP".into(),
                    backends: vec![],
                },
                ProtoService {
                    name: "broken".into(),
                    vip: "vip".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    backends: vec![],
                },
            ],
            ..Default::default()
        };
        let (dp, skipped) = with_datapath(&a, &[]);
        assert_eq!(
            dp.services,
            vec![
                ServiceEntry {
                    vip: "10.96.0.10".parse().unwrap(),
                    port: 80,
                    proto: Protocol::Tcp,
                    backends: vec![("10.0.0.5".parse().unwrap(), 8080)],
                },
                ServiceEntry {
                    vip: "10.96.0.53".parse().unwrap(),
                    port: 53,
                    proto: Protocol::Udp,
                    backends: vec![],
                },
            ]
        );
        assert!(
            matches!(
                &skipped[..],
                [Skipped::Backend { .. }, Skipped::Service { service, .. }] if service == "broken"
            ),
            "{skipped:?}"
        );
    }

    #[test]
    fn peers_with_an_unreadable_cidr_or_address_are_left_out() {
        let peer = |name: &str, cidr: &str, ip: &str| PeerNode {
            name: name.into(),
            pod_cidr: cidr.into(),
            node_ip: ip.into(),
        };
        let a = Assignment {
            peers: vec![
                peer("b", "10.0.1.0/24", "192.0.2.2"),
                peer("c", "10.0.2.0/33", "192.0.2.3"),
                peer("d", "10.0.3.0/24", ""),
            ],
            ..Default::default()
        };
        let d = desired_state(&a, &Inputs::default());
        assert_eq!(
            d.peers,
            vec![PeerRoute {
                node: "b".into(),
                pod_cidr: "10.0.1.0/24".parse().unwrap(),
                via: "192.0.2.2".parse().unwrap(),
            }]
        );
        assert_eq!(d.skipped.len(), 2);
    }

    #[test]
    fn volumes_default_an_unknown_backend_and_an_empty_pool() {
        let vol = |name: &str, backend: &str, pool: &str| VolumeAssignment {
            name: name.into(),
            size_bytes: 1 << 20,
            backend: backend.into(),
            pool: pool.into(),
        };
        let a = Assignment {
            volumes: vec![
                vol("a", "", ""),
                vol("b", "file", "fast"),
                vol("c", "tape", ""),
            ],
            remove_volumes: vec!["old".into()],
            ..Default::default()
        };
        let d = desired_state(&a, &Inputs::default());
        assert_eq!(d.volumes.remove, vec!["old".to_string()]);
        let got: Vec<(&str, Option<crate::storage::Backend>, Option<&str>)> = d
            .volumes
            .wanted
            .iter()
            .map(|v| (v.name.as_str(), v.backend, v.pool.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", None, None),
                ("b", Some(crate::storage::Backend::File), Some("fast")),
                ("c", None, None),
            ]
        );
        assert!(
            matches!(&d.skipped[..], [Skipped::VolumeBackend { volume, .. }] if volume == "c"),
            "{:?}",
            d.skipped
        );
    }
}

/// Randomised runs over what the controller sends (fuzzing on stable
/// Rust): assignments decoded from mutated real encodings, folded as
/// deltas onto a whole one and turned into the desired state, with and
/// without a datapath. Nothing may panic. `IRONMESH_FUZZ_CASES` cases
/// (default 3,000); the long run is `IRONMESH_FUZZ_CASES=1000000
/// CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true cargo test -p ironmesh-agent
/// --release --lib fuzz -- --nocapture`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use ironmesh_proto::v1::{
        AssignmentDelta, IdentityEntry, InstanceAssignment, PeerNode, PolicyRule, ServiceBackend,
        ServiceEntry, VolumeAssignment,
    };
    use prost::Message;

    fn whole() -> Assignment {
        Assignment {
            revision: 7,
            instances: vec![InstanceAssignment {
                name: "web-0".into(),
                workload: "web".into(),
                spec_generation: 3,
                spec_json: r#"{"image":"registry.local/web:1.2","command":["/bin/web"],"env":[{"name":"A","value":"b"}],"resources":{"cpu":"100m","memory":"64Mi"},"ports":[{"containerPort":80}],"volumes":[{"name":"v","mountPath":"/data"}]}"#.into(),
                image_digest: "sha256:abc".into(),
                ..Default::default()
            }],
            peers: vec![PeerNode { name: "n2".into(), pod_cidr: "10.244.2.0/24".into(), node_ip: "10.0.0.3".into() }],
            identities: vec![IdentityEntry { ip: "10.244.1.5".into(), identity: 300, ..Default::default() }],
            policy_rules: vec![PolicyRule { direction: 1, src_identity: 0, dst_identity: 300, port: 80, protocol: "TCP".into(), rate_per_second: 10, burst: 20 }],
            ingress_enforced: vec![300],
            egress_enforced: vec![300],
            services: vec![ServiceEntry { name: "web".into(), vip: "10.96.0.10".into(), port: 80, protocol: "TCP".into(), backends: vec![ServiceBackend { ip: "10.244.1.5".into(), port: 8080 }] }],
            volumes: vec![VolumeAssignment { name: "v".into(), size_bytes: 1 << 30, backend: "dir".into(), pool: "fast".into() }],
            remove_volumes: vec!["gone".into()],
            gateways: Vec::new(),
            delta: None,
            more: false,
        }
    }

    fn delta() -> Assignment {
        Assignment {
            revision: 8,
            delta: Some(AssignmentDelta {
                base_revision: 7,
                identities_set: vec![IdentityEntry {
                    ip: "10.244.2.9".into(),
                    identity: 301,
                    ..Default::default()
                }],
                identities_removed: vec!["10.244.1.5".into()],
                policy_rules_added: vec![PolicyRule {
                    direction: 2,
                    src_identity: 300,
                    dst_identity: 0,
                    port: 53,
                    protocol: "UDP".into(),
                    ..Default::default()
                }],
                services_set: vec![ServiceEntry {
                    name: "db".into(),
                    vip: "10.96.0.11".into(),
                    port: 5432,
                    protocol: "TCP".into(),
                    backends: vec![],
                }],
                peers_removed: vec!["n2".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fuzz_assignments() {
        use ironmesh_api::fuzz::{mutate_bytes, run_counted, Rng};
        let seeds = [whole().encode_to_vec(), delta().encode_to_vec()];
        let host_ips = [Ipv4Addr::new(10, 0, 0, 2)];
        run_counted("assignments", |rng| {
            let which = rng.random_range(0..seeds.len());
            let bytes = mutate_bytes(rng, &seeds[which]);
            let Ok(next) = Assignment::decode(bytes.as_slice()) else {
                return false;
            };
            let mut current = Some(whole());
            if ironmesh_proto::assignment::apply(&mut current, next).is_ok() {
                if let Some(a) = &current {
                    let dir = |name: &str| PathBuf::from("/q").join(name);
                    let _ = desired_state(
                        a,
                        &Inputs {
                            host_ips: Some(&host_ips),
                            queue_dir: Some(&dir),
                        },
                    );
                    let _ = desired_state(a, &Inputs::default());
                }
            }
            true
        });
    }
}
