//! End-to-end tests of trust in the control plane, with the real
//! controller, agent and imctl: join tokens that expire and run out, no
//! take-over of an existing node's name, revocation when a Node is
//! deleted, operator roles, node reports checked against the node's pod
//! CIDR and bounds, the node authorizer of the image store, node
//! certificates renewed while instances keep running, and Secrets sealed
//! at rest and shown only to admins.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ironmesh_proto::v1::{
    agent_message::Msg, node_service_client::NodeServiceClient, FetchBlobRequest, InstanceReport,
    InstanceState, Inventory,
};
use ironmesh_tests::grpc::{self, Creds, ProtocolNode};
use ironmesh_tests::{images_dir, wait_for, Agent, Controller, ControllerOpts};
use ironmesh_tests::{refused, succeeded as ok};
use serde_json::Value;

/// `imctl token create ARGS`; the token it printed.
fn create_token(ctl: &Controller, args: &[&str]) -> String {
    let mut a = vec!["token", "create"];
    a.extend_from_slice(args);
    ok(ctl.imctl(&a), "token create").trim().to_string()
}

fn copy(c: &Creds) -> Creds {
    Creds {
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.clone(),
    }
}

/// Polls `f` from async code until it returns `Some`, or panics after
/// `deadline`.
async fn until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn workload_on(name: &str, image: &str, node: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
spec:
  image: {image}
  resources:
    cpu: 100m
    memory: 64Mi
  placement:
    nodeSelector:
      ironmesh.dev/hostname: {node}
"
    )
}

#[test]
fn a_token_never_buys_the_name_of_an_existing_node() {
    let ctl = Controller::start(ControllerOpts::default());
    let token = grpc::token(&ctl);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let first = ProtocolNode::start(&ctl, "vm", &token)
            .await
            .expect("join vm");
        assert!(ctl.node("vm").is_some());

        // A fresh key asking for the name of a node that exists.
        let err = grpc::join(&ctl, "vm", &token)
            .await
            .err()
            .expect("take-over must be refused");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
        for needle in [
            "node vm already exists",
            "imctl delete node vm",
            "imctl token create --node vm",
        ] {
            assert!(err.message().contains(needle), "{}", err.message());
        }
        // Also for a node that joined but never synced (no Node yet).
        grpc::join(&ctl, "quiet", &token).await.expect("join quiet");
        let err = grpc::join(&ctl, "quiet", &token).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

        // Re-provisioning with a token bound to the name works, once, and
        // revokes the old certificate: its open stream ends.
        let bound = create_token(&ctl, &["--node", "vm", "--description", "reinstall vm"]);
        let other = grpc::join(&ctl, "other", &bound).await.err().unwrap();
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
        assert!(
            other.message().contains("bound to node \"vm\""),
            "{}",
            other.message()
        );
        let fresh = grpc::join(&ctl, "vm", &bound)
            .await
            .expect("re-provision vm");
        let ended = until("the old stream to end", Duration::from_secs(10), || {
            first.ended()
        })
        .await;
        assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
        assert!(ended.message().contains("revoked"), "{}", ended.message());
        let err = ProtocolNode::connect(&ctl, "vm", copy(&first.creds))
            .await
            .err()
            .expect("the old certificate is revoked");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("revoked"), "{}", err.message());
        let again = ProtocolNode::connect(&ctl, "vm", fresh)
            .await
            .expect("the new certificate syncs");
        assert!(again.ended().is_none());
        let used = grpc::join(&ctl, "vm", &bound).await.err().unwrap();
        assert_eq!(used.code(), tonic::Code::PermissionDenied, "{used:?}");
        assert!(used.message().contains("used up"), "{}", used.message());
    });
}

#[test]
fn expired_and_used_up_tokens_are_refused() {
    let ctl = Controller::start(ControllerOpts {
        extra_args: vec!["--bootstrap-token-ttl".into(), "3s".into()],
        ..ControllerOpts::default()
    });
    let bootstrap = grpc::token(&ctl);
    let listed = ok(ctl.imctl(&["token", "ls"]), "token ls");
    assert!(listed.contains(&bootstrap[4..20]), "{listed}");
    assert!(
        !listed.contains(&bootstrap[21..]),
        "the secret is never listed"
    );

    let once = create_token(&ctl, &["--uses", "1", "--description", "one node"]);
    let short = create_token(&ctl, &["--ttl", "1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        grpc::join(&ctl, "tok-a", &once).await.expect("first use");
        let err = grpc::join(&ctl, "tok-b", &once).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("used up (1 of 1 joins)"),
            "{}",
            err.message()
        );
    });
    // The controller's own clock says when they have expired.
    wait_for("tokens to expire", Duration::from_secs(15), || {
        let out = ok(ctl.imctl(&["token", "ls"]), "token ls");
        let expired = |id: &str| {
            out.lines()
                .any(|l| l.starts_with(id) && l.contains(" expired "))
        };
        (expired(&short[4..20]) && expired(&bootstrap[4..20])).then_some(())
    });
    rt.block_on(async {
        for (t, what) in [(&short, "a 1s token"), (&bootstrap, "the first token")] {
            let err = grpc::join(&ctl, "tok-c", t).await.err().unwrap();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err:?}");
            assert!(
                err.message().contains("expired at"),
                "{what}: {}",
                err.message()
            );
        }
        // A deleted token is simply not valid.
        ok(
            ctl.imctl(&["token", "delete", &once[4..20]]),
            "token delete",
        );
        let err = grpc::join(&ctl, "tok-d", &once).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    });
    // A real agent with the expired token gives up with the reason.
    let mut agent = Agent::start(&ctl, "tok-late");
    let status = wait_for("agent to exit", Duration::from_secs(20), || {
        agent.proc.try_exit()
    });
    assert!(!status.success());
    let log = agent.proc.log_text();
    assert!(log.contains("expired at"), "{log}");
    assert!(ctl.node("tok-late").is_none());
}

#[test]
fn refused_joins_from_one_address_are_limited() {
    let ctl = Controller::start(ControllerOpts {
        extra_args: vec!["--join-failure-limit".into(), "3".into()],
        ..ControllerOpts::default()
    });
    let token = grpc::token(&ctl);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for i in 0..3 {
            let err = grpc::join(&ctl, &format!("guess-{i}"), "imt.0000000000000000.guess")
                .await
                .err()
                .unwrap();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        }
        // Now even the right token is refused from this address.
        let err = grpc::join(&ctl, "honest", &token).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("too many refused joins"),
            "{}",
            err.message()
        );
    });
}

#[test]
fn a_deleted_node_cannot_come_back_with_its_old_certificate() {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "node-del");
    agent.wait_ready(&ctl, Duration::from_secs(20));
    ok(ctl.imctl(&["delete", "node", "node-del"]), "delete node");
    // Its stream is cut, and every reconnect with the old certificate is
    // refused: two refusals seen by the agent prove it tried again.
    wait_for(
        "the agent to be refused twice",
        Duration::from_secs(30),
        || (agent.proc.log_text().matches("was revoked").count() >= 2).then_some(()),
    );
    assert!(
        ctl.node("node-del").is_none(),
        "a refused node must not re-create its Node"
    );
    assert!(
        ctl.proc.log_text().contains("sync refused"),
        "the controller says why"
    );
    // The name is free for a new join (a new machine, or this one wiped).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        grpc::join(&ctl, "node-del", &grpc::token(&ctl))
            .await
            .expect("the deleted node's name can be joined again");
    });
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn secrets_are_sealed_at_rest_and_their_values_shown_only_to_an_admin() {
    let mut ctl = Controller::start(ControllerOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let ed = dir.path().join("ed.yaml");
    ok(
        ctl.imctl(&[
            "operator",
            "create",
            "ed",
            "--role",
            "edit",
            "--out",
            ed.to_str().unwrap(),
        ]),
        "operator create",
    );
    const VALUE: &str = "correct-horse-battery-staple-0451";
    let manifest = dir.path().join("secret.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: ironmesh.dev/v1\nkind: Secret\nmetadata: {{name: db}}\n\
             spec:\n  data:\n    password: {VALUE}\n"
        ),
    )
    .unwrap();
    let apply = |c: &Path| ctl.imctl_as(c, &["apply", "-f", manifest.to_str().unwrap()]);
    let err = refused(apply(&ed), "edit applies a Secret");
    assert!(
        err.contains("may not apply or delete Secret objects: that needs role admin"),
        "{err}"
    );
    let out = ok(apply(&ctl.admin_config()), "admin applies a Secret");
    assert!(out.contains("secrets/db created"), "{out}");
    let out = ok(apply(&ctl.admin_config()), "admin applies it again");
    assert!(out.contains("secrets/db unchanged"), "{out}");
    // The same from the command line, without a manifest on disk.
    let out = ok(
        ctl.imctl(&[
            "secret",
            "generic",
            "db",
            "--from-literal",
            &format!("password={VALUE}"),
        ]),
        "imctl secret generic",
    );
    assert!(out.contains("secrets/db unchanged"), "{out}");

    // get, list and the table show names and sizes, never the value.
    let table = ok(ctl.imctl(&["get", "secrets"]), "get secrets");
    assert!(
        table.contains("db") && table.contains("password(33B)"),
        "{table}"
    );
    let shown = ctl.imctl_json(&["get", "secret", "db"]);
    assert!(!shown.to_string().contains(VALUE), "{shown}");
    assert!(shown.pointer("/spec/sealedData").is_none(), "{shown}");
    assert_eq!(shown["status"]["entries"][0]["name"], "password");
    for args in [
        vec!["get", "secrets", "-o", "yaml"],
        vec!["describe", "secret", "db"],
    ] {
        let out = ok(ctl.imctl(&args), "read a Secret");
        assert!(!out.contains(VALUE), "{args:?}: {out}");
    }
    // Only an admin's --reveal shows it, and it is audited.
    let err = refused(
        ctl.imctl_as(&ed, &["get", "secret", "db", "--reveal"]),
        "edit reveals",
    );
    assert!(
        err.contains("may not read the values of Secret objects: that needs role admin"),
        "{err}"
    );
    let revealed = ctl.imctl_json(&["get", "secret", "db", "--reveal"]);
    assert_eq!(revealed["spec"]["data"]["password"], VALUE);
    let log = ctl.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("RevealSecret") && l.contains("operator=admin")),
        "{log}"
    );

    // The data directory (the store and everything else) never holds it,
    // and it opens again after a restart.
    let hits = files_containing(&ctl.data_dir(), VALUE.as_bytes());
    assert!(hits.is_empty(), "plaintext found in {hits:?}");
    ctl.restart_after_kill9("controller-restarted.log");
    let revealed = ctl.imctl_json(&["get", "secret", "db", "--reveal"]);
    assert_eq!(revealed["spec"]["data"]["password"], VALUE);
    // An applied `get -o yaml` (values hidden) does not wipe the values.
    let hidden = dir.path().join("hidden.json");
    std::fs::write(&hidden, shown.to_string()).unwrap();
    let err = refused(
        ctl.imctl(&["apply", "-f", hidden.to_str().unwrap()]),
        "apply of a shown Secret",
    );
    assert!(err.contains("at least one entry"), "{err}");
}

#[test]
fn a_view_operator_cannot_apply_and_an_admin_can() {
    let ctl = Controller::start(ControllerOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let conf = |n: &str| dir.path().join(format!("{n}.yaml"));
    for (name, role) in [("vera", "view"), ("ed", "edit")] {
        let out = ok(
            ctl.imctl(&[
                "operator",
                "create",
                name,
                "--role",
                role,
                "--out",
                conf(name).to_str().unwrap(),
            ]),
            "operator create",
        );
        assert!(out.contains(&format!("role {role}")), "{out}");
        let mode = std::fs::metadata(conf(name)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
    let manifest = dir.path().join("wl.yaml");
    std::fs::write(
        &manifest,
        workload_on("roles", "ironmesh/records-server:dev", "nowhere"),
    )
    .unwrap();
    let apply = |c: &Path| ctl.imctl_as(c, &["apply", "-f", manifest.to_str().unwrap()]);

    let err = refused(apply(&conf("vera")), "view apply");
    assert!(
        err.contains(
            "operator vera (role view) may not apply or delete Workload objects: that needs role edit"
        ),
        "{err}"
    );
    ok(ctl.imctl_as(&conf("vera"), &["get", "nodes"]), "view get");
    assert!(ctl
        .imctl_as(&conf("vera"), &["get", "workloads", "roles"])
        .stderr
        .starts_with(b"error"));

    ok(apply(&ctl.admin_config()), "admin apply");
    ok(
        ctl.imctl_as(&conf("vera"), &["get", "workloads", "roles"]),
        "view get",
    );
    ok(apply(&conf("ed")), "edit apply");
    let err = refused(
        ctl.imctl_as(&conf("ed"), &["token", "create"]),
        "edit token create",
    );
    assert!(
        err.contains("operator ed (role edit) may not manage join tokens: that needs role admin"),
        "{err}"
    );
    let err = refused(
        ctl.imctl_as(&conf("ed"), &["delete", "node", "nowhere"]),
        "edit delete node",
    );
    assert!(
        err.contains(
            "operator ed (role edit) may not apply or delete Node objects: that needs role admin"
        ),
        "{err}"
    );
    ok(
        ctl.imctl_as(&conf("ed"), &["delete", "workload", "roles"]),
        "edit delete",
    );

    let listed = ok(ctl.imctl(&["operator", "ls"]), "operator ls");
    for (name, role) in [("admin", "admin"), ("ed", "edit"), ("vera", "view")] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&format!(" {role} "))),
            "{listed}"
        );
    }
    // Every mutating call leaves an audit line with the operator's name.
    let log = ctl.proc.log_text();
    let audit = |who: &str, outcome: &str| {
        log.lines().any(|l| {
            l.contains("operator call")
                && l.contains(&format!("operator={who}"))
                && l.contains(outcome)
        })
    };
    assert!(audit("vera", "denied"), "{log}");
    assert!(audit("admin", "\"ok\""), "{log}");
    assert!(audit("ed", "denied"), "{log}");

    // A revoked operator gets nothing, not even reads.
    ok(
        ctl.imctl(&["operator", "revoke", "vera"]),
        "operator revoke",
    );
    let err = refused(
        ctl.imctl_as(&conf("vera"), &["get", "nodes"]),
        "revoked get",
    );
    assert!(err.contains("revoked"), "{err}");
    // The last admin cannot be revoked.
    let err = refused(
        ctl.imctl(&["operator", "revoke", "admin"]),
        "revoke last admin",
    );
    assert!(err.contains("last admin"), "{err}");
}

#[test]
fn a_node_reporting_an_address_outside_its_pod_cidr_is_refused() {
    let ctl = Controller::start(ControllerOpts::default());
    let token = grpc::token(&ctl);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = ProtocolNode::start(&ctl, "rep-a", &token).await.unwrap();
        let b = ProtocolNode::start(&ctl, "rep-b", &token).await.unwrap();
        assert_ne!(a.pod_cidr, b.pod_cidr);
        ctl.apply_yaml(&workload_on("liar", "ironmesh/records-server:dev", "rep-a"));
        let inst = until("an instance on rep-a", Duration::from_secs(20), || {
            a.assignment()?.instances.first().cloned()
        })
        .await;
        // An address from rep-b's block, claimed by rep-a.
        let b_net: std::net::Ipv4Addr = b.pod_cidr.split('/').next().unwrap().parse().unwrap();
        let stolen = std::net::Ipv4Addr::from(u32::from(b_net) + 10).to_string();
        let report = |ip: &str| {
            Msg::Instances(InstanceReport {
                full: false,
                instances: vec![InstanceState {
                    name: inst.name.clone(),
                    phase: ironmesh_proto::v1::InstancePhase::Running.into(),
                    ready: true,
                    spec_generation: inst.spec_generation,
                    ip: ip.to_string(),
                    ..Default::default()
                }],
            })
        };
        a.send(report(&stolen)).await;
        let ended = until(
            "rep-a's stream to be refused",
            Duration::from_secs(10),
            || a.ended(),
        )
        .await;
        assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
        assert!(
            ended.message().contains(&format!(
                "{stolen} is not in this node's pod CIDR {}",
                a.pod_cidr
            )),
            "{}",
            ended.message()
        );
        let status_ip = |ctl: &Controller| {
            ctl.imctl_json(&["get", "instances", &inst.name])
                .pointer("/status/ip")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        assert_eq!(status_ip(&ctl), None, "nothing of the lie was recorded");
        assert!(
            b.assignment()
                .is_none_or(|asg| asg.identities.iter().all(|e| e.ip != stolen)),
            "rep-b's identity map never sees the stolen address"
        );

        // The same report with an address of its own block is taken.
        let a_net: std::net::Ipv4Addr = a.pod_cidr.split('/').next().unwrap().parse().unwrap();
        let own = std::net::Ipv4Addr::from(u32::from(a_net) + 10).to_string();
        let a2 = ProtocolNode::connect(&ctl, "rep-a", copy(&a.creds))
            .await
            .unwrap();
        a2.send(report(&own)).await;
        until(
            "rep-a's own address recorded",
            Duration::from_secs(10),
            || (status_ip(&ctl).as_deref() == Some(own.as_str())).then_some(()),
        )
        .await;

        // Out-of-range inventory is refused, and the controller carries on.
        let c = ProtocolNode::start(&ctl, "rep-c", &token).await.unwrap();
        c.send(Msg::Inventory(Inventory {
            boot_time_unix: u64::MAX,
            ..Default::default()
        }))
        .await;
        let ended = until(
            "rep-c's stream to be refused",
            Duration::from_secs(10),
            || c.ended(),
        )
        .await;
        assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
        assert!(
            ended.message().contains("boot_time_unix"),
            "{}",
            ended.message()
        );
    });
    ok(ctl.imctl(&["get", "nodes"]), "the controller still serves");
}

#[test]
fn a_node_gets_permission_denied_for_a_blob_not_assigned_to_it() {
    let ctl = Controller::start(ControllerOpts::default());
    let layout = images_dir().join("records-server");
    ok(
        ctl.imctl(&["image", "push", layout.to_str().unwrap()]),
        "image push",
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // The name build-images gives it (as the other end-to-end tests use).
    let name = "ironmesh/records-server:dev";
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let token = grpc::token(&ctl);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let with = ProtocolNode::start(&ctl, "blob-a", &token).await.unwrap();
        let without = ProtocolNode::start(&ctl, "blob-b", &token).await.unwrap();
        ctl.apply_yaml(&workload_on("blobs", name, "blob-a"));
        until(
            "the image assigned to blob-a",
            Duration::from_secs(20),
            || {
                with.assignment()?
                    .instances
                    .iter()
                    .any(|i| i.image_digest == manifest_digest)
                    .then_some(())
            },
        )
        .await;
        let fetch = |creds: Creds, digest: String| {
            let ctl = &ctl;
            async move {
                let mut c = NodeServiceClient::new(grpc::channel(ctl, Some(&creds)).await.unwrap());
                let mut s = c
                    .fetch_blob(FetchBlobRequest { digest, offset: 0 })
                    .await?
                    .into_inner();
                let mut n = 0;
                while let Some(chunk) = s.next().await {
                    n += chunk?.data.len();
                }
                Ok::<usize, tonic::Status>(n)
            }
        };
        for d in [&manifest_digest, &layer] {
            let n = fetch(copy(&with.creds), d.clone())
                .await
                .expect("assigned blob");
            assert!(n > 0);
            let err = fetch(copy(&without.creds), d.clone()).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            assert!(
                err.message().contains("node blob-b may not fetch blob"),
                "{}",
                err.message()
            );
        }
    });
}

#[test]
fn node_certificates_renew_three_times_while_instances_keep_running() {
    // The controller's own serving certificate renews on the same clock:
    // 1 minute, renewed 40 s in, without dropping a connection.
    let ctl = Controller::start(ControllerOpts {
        extra_args: vec![
            "--node-cert-lifetime".into(),
            "1m".into(),
            "--serving-cert-lifetime".into(),
            "1m".into(),
        ],
        ..ControllerOpts::default()
    });
    let serving_expiry = |ctl: &Controller| {
        let text = ctl.scrape_metrics().unwrap_or_default();
        ironmesh_tests::metric(
            &text,
            "ironmesh_controller_serving_certificate_expiry_timestamp_seconds",
        )
        .unwrap_or(0.0)
    };
    let first_serving_expiry = serving_expiry(&ctl);
    assert!(first_serving_expiry > 0.0, "the expiry metric is set");
    let agent = Agent::start(&ctl, "rot");
    agent.wait_ready(&ctl, Duration::from_secs(30));
    let first_cert = std::fs::read_to_string(agent.state_dir().join("node.crt")).unwrap();
    ok(
        ctl.imctl(&[
            "image",
            "push",
            images_dir().join("records-server").to_str().unwrap(),
        ]),
        "image push",
    );
    ctl.apply_yaml(&format!(
        "{}  env:\n    - name: LISTEN_ADDR\n      value: 0.0.0.0:8080\n",
        workload_on("steady", "ironmesh/records-server:dev", "rot")
    ));
    let running = |ctl: &Controller| -> Option<(String, u64, u64)> {
        let list = ctl.imctl_json(&["get", "instances"]);
        let i = list["items"].as_array()?.first()?.clone();
        (i.pointer("/status/phase")?.as_str()? == "Running").then_some(())?;
        Some((
            i.pointer("/metadata/name")?.as_str()?.to_string(),
            i.pointer("/status/pid")?.as_u64()?,
            i.pointer("/status/restarts")?.as_u64()?,
        ))
    };
    let before = wait_for("the instance running", Duration::from_secs(60), || {
        running(&ctl)
    });
    let opened_before = ctl
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("sync stream opened") && l.contains("node=rot"))
        .count();

    // 1-minute certificates, renewed two thirds in: three renewals in
    // about two minutes.
    wait_for("three renewals", Duration::from_secs(240), || {
        let n = agent
            .proc
            .log_text()
            .matches("node certificate renewed; reconnecting")
            .count();
        assert_eq!(
            running(&ctl).as_ref(),
            Some(&before),
            "the instance must keep running"
        );
        (n >= 3).then_some(())
    });
    let renewed_cert = std::fs::read_to_string(agent.state_dir().join("node.crt")).unwrap();
    assert_ne!(
        first_cert, renewed_cert,
        "the certificate on disk is the renewed one"
    );
    let log = ctl.proc.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("node certificate renewed") && l.contains("node=\"rot\""))
            .count()
            >= 3,
        "{log}"
    );
    // One reconnect per renewal, no storm.
    let opened = log
        .lines()
        .filter(|l| l.contains("sync stream opened") && l.contains("node=rot"))
        .count()
        - opened_before;
    assert!(
        (3..=4).contains(&opened),
        "{opened} reconnects for 3 renewals"
    );
    assert_eq!(
        ready_node(&ctl, "rot"),
        Some("True".to_string()),
        "the node stayed Ready"
    );
    // Renewed at least twice in those two minutes; imctl kept working
    // (every poll above was a new connection) and the reconnect count
    // above shows the agent did not reconnect for it.
    assert!(
        log.matches("renewed the controller's serving certificate")
            .count()
            >= 2,
        "{log}"
    );
    assert!(
        serving_expiry(&ctl) >= first_serving_expiry + 60.0,
        "new handshakes get the renewed certificate"
    );
}

fn ready_node(ctl: &Controller, name: &str) -> Option<String> {
    ironmesh_tests::ready_status(&ctl.node(name)?)
}
