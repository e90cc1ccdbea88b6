//! End-to-end: a Gateway on one fake host, HTTPRoutes to records-server
//! instances through their Services, JWT at the edge with a test issuer
//! serving its JWK Set over HTTPS (on the test bridge, like the
//! controller). Requests come from another fake host. What a user checks:
//! the status codes, that refused requests never reach the records-server
//! (its request log says so), and a 90/10 canary counted in the two
//! backends' logs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ironmesh_tests::{images_dir, wait_for, Agent, Controller, ControllerOpts, Host};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

const LISTEN_PORT: u16 = 18080;
const ISSUER: &str = "https://issuer.test";

struct Signer(Ed25519KeyPair);

impl Signer {
    fn new() -> Signer {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Signer(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap())
    }
    fn jwk(&self, kid: &str) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": URL_SAFE_NO_PAD.encode(self.0.public_key().as_ref())})
    }
    fn sign(&self, alg: &str, kid: &str, claims: &Value) -> String {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        if alg == "none" {
            return format!("{signed}.");
        }
        let sig = self.0.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "aud": "orders", "sub": "alice", "exp": now() + 600, "scope": "orders:read"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// The test issuer: `jwks` over HTTPS on `ip`, with a certificate of its
/// own for that address. Runs on its own runtime until the test ends.
fn issuer(ip: IpAddr, jwks: String) -> (SocketAddr, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![ip.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let std_listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = jwks.clone();
                        async move {
                            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
    });
    (addr, pem)
}

/// One GET from inside `from`: (status, body).
fn get(from: &Host, to: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let req = match token {
        Some(t) => format!("GET {path} HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"),
        None => format!("GET {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"),
    };
    from.within(move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

/// Many GETs from inside `from`, each on its own connection: the statuses.
fn get_many(from: &Host, to: SocketAddr, path: &str, n: usize) -> Vec<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n");
    from.within(move || {
        (0..n)
            .map(|_| {
                let mut s =
                    std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(req.as_bytes()).unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out.split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    })
}

fn instance_of(ctl: &Controller, workload: &str) -> Option<String> {
    let v = ctl.imctl_json(&[
        "get",
        "instances",
        "-l",
        &format!("ironmesh.dev/workload={workload}"),
    ]);
    v.get("items")?
        .as_array()?
        .iter()
        .find(|i| i.pointer("/status/ready") == Some(&Value::Bool(true)))
        .and_then(|i| i.pointer("/metadata/name")?.as_str().map(str::to_string))
}

/// Requests the records-server logged (one line per request).
fn served(ctl: &Controller, instance: &str, needle: &str) -> usize {
    let out = ctl.imctl(&["logs", instance]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn workload(name: &str) -> String {
    format!(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  image: ironmesh/records-server:dev
  env:
    - name: LISTEN_ADDR
      value: 0.0.0.0:8080
  readinessProbe:
    tcpSocket:
      port: 8080
    periodSeconds: 1
---
apiVersion: ironmesh.dev/v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports:
    - port: 80
      targetPort: 8080
"
    )
}

#[test]
fn jwt_at_the_edge_and_a_canary_through_services() {
    let ctl = Controller::start(ControllerOpts::default());
    let edge = Agent::start(&ctl, "edge");
    let worker = Agent::start(&ctl, "worker");
    let client = ctl.net.add_host("client");
    for a in [&edge, &worker] {
        a.wait_ready(&ctl, Duration::from_secs(90));
    }
    let out = ctl.imctl(&[
        "image",
        "push",
        images_dir().join("records-server").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl.apply_yaml(&workload("orders"));
    ctl.apply_yaml(&workload("orders-next"));

    let key = Signer::new();
    let jwks = json!({"keys": [key.jwk("k1")]}).to_string();
    let (issuer_addr, issuer_ca) = issuer(IpAddr::V4(ctl.net.gateway()), jwks);
    // The HTTPS listener serves the operator's own certificate, from a
    // TLS Secret.
    let site_key = rcgen::KeyPair::generate().unwrap();
    let site_cert = rcgen::CertificateParams::new(vec!["api.example.com".to_string()])
        .unwrap()
        .self_signed(&site_key)
        .unwrap();
    let secret = json!({"apiVersion": "ironmesh.dev/v1", "kind": "Secret", "metadata": {"name": "edge-cert"},
        "spec": {"type": "TLS", "data": {"tls.crt": site_cert.pem(), "tls.key": site_key.serialize_pem()}}});
    ctl.apply_yaml(&secret.to_string());
    let gateway = json!({"apiVersion": "ironmesh.dev/v1", "kind": "Gateway", "metadata": {"name": "edge"},
        "spec": {"nodeSelector": {"ironmesh.dev/hostname": "edge"},
                 "listeners": [{"name": "web", "port": LISTEN_PORT},
                               {"name": "tls", "port": LISTEN_PORT + 1, "protocol": "HTTPS",
                                "hostnames": ["api.example.com"],
                                "tls": {"issuer": "Secret", "secretName": "edge-cert"}}]}});
    let orders = json!({"apiVersion": "ironmesh.dev/v1", "kind": "HTTPRoute", "metadata": {"name": "orders"},
        "spec": {"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"],
            "jwt": {"issuer": ISSUER, "audiences": ["orders"],
                    "jwks": {"url": format!("https://{issuer_addr}/jwks"), "caCert": issuer_ca},
                    "rules": [{"claim": "scope", "contains": "orders:read"}]},
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/records"}}],
                       "backends": [{"service": "orders", "port": 80}]}]}});
    let canary = json!({"apiVersion": "ironmesh.dev/v1", "kind": "HTTPRoute", "metadata": {"name": "canary"},
        "spec": {"parentRefs": [{"gateway": "edge"}], "hostnames": ["api.example.com"],
            "rules": [{"matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
                       "backends": [{"service": "orders", "port": 80, "weight": 90},
                                    {"service": "orders-next", "port": 80, "weight": 10}]}]}});
    // JSON is YAML.
    ctl.apply_yaml(&format!("{gateway}\n---\n{orders}\n---\n{canary}\n"));

    let stable = wait_for("orders ready", Duration::from_secs(90), || {
        instance_of(&ctl, "orders")
    });
    let next = wait_for("orders-next ready", Duration::from_secs(90), || {
        instance_of(&ctl, "orders-next")
    });
    let gw = SocketAddr::new(IpAddr::V4(edge.host.addr), LISTEN_PORT);
    let good = key.sign("EdDSA", "k1", &claims(json!({})));

    // A valid token reaches the records-server through the Service.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let (s, b) = get(&client, gw, "/records", Some(&good));
        if s == 200 {
            break (s, b);
        }
        if std::time::Instant::now() > deadline {
            let log = edge.proc.log_text();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("gateway") || l.contains("WARN"))
                .collect();
            panic!(
                "the route never answered 200; last {s} {b}\nagent:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 200);
    assert!(body.contains("\"id\""), "{body}");

    // Refusals never reach it.
    let before = served(&ctl, &stable, "/records");
    let other = Signer::new();
    for (what, token, want) in [
        ("no token", None, 401),
        (
            "expired",
            Some(key.sign("EdDSA", "k1", &claims(json!({"exp": now() - 3600})))),
            401,
        ),
        (
            "wrong audience",
            Some(key.sign("EdDSA", "k1", &claims(json!({"aud": "billing"})))),
            401,
        ),
        (
            "wrong signature",
            Some(other.sign("EdDSA", "k1", &claims(json!({})))),
            401,
        ),
        (
            "alg none",
            Some(key.sign("none", "k1", &claims(json!({})))),
            401,
        ),
        (
            "missing scope",
            Some(key.sign("EdDSA", "k1", &claims(json!({"scope": "orders:write"})))),
            403,
        ),
    ] {
        let (status, body) = get(&client, gw, "/records", token.as_deref());
        assert_eq!(status, want, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(v["error"].is_string(), "{what}: {body}");
    }
    // One more good request, so the log has caught up when we count.
    assert_eq!(get(&client, gw, "/records", Some(&good)).0, 200);
    wait_for("the good request logged", Duration::from_secs(20), || {
        (served(&ctl, &stable, "/records") > before).then_some(())
    });
    assert_eq!(
        served(&ctl, &stable, "/records"),
        before + 1,
        "a refused request reached the backend"
    );

    // The canary: 1000 requests, 90/10 by the backends' own logs.
    let (s0, n0) = (
        served(&ctl, &stable, "/healthz"),
        served(&ctl, &next, "/healthz"),
    );
    let statuses = get_many(&client, gw, "/healthz", 1000);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let counted = wait_for("1000 requests logged", Duration::from_secs(30), || {
        let (s, n) = (
            served(&ctl, &stable, "/healthz") - s0,
            served(&ctl, &next, "/healthz") - n0,
        );
        (s + n >= 1000).then_some((s, n))
    });
    // Readiness probes are TCP only, so every /healthz line is ours.
    assert_eq!(counted.0 + counted.1, 1000);
    assert!(
        (70..=130).contains(&counted.1),
        "orders-next served {} of 1000",
        counted.1
    );

    // HTTPS with the Secret's certificate, trusted as the client's own root.
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), site_cert.pem()).unwrap();
    let url = format!("https://api.example.com:{}/healthz", LISTEN_PORT + 1);
    let resolve = format!("api.example.com:{}:{}", LISTEN_PORT + 1, edge.host.addr);
    let https = wait_for(
        "the HTTPS listener answers",
        Duration::from_secs(30),
        || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &client.netns,
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                ])
                .args([
                    "--cacert",
                    ca_file.path().to_str().unwrap(),
                    "--resolve",
                    &resolve,
                ])
                .args([
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version}",
                    &url,
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.starts_with("200").then_some(text)
        },
    );
    // curl offers h2 over ALPN, and the listener takes it.
    assert!(https.ends_with(" 2"), "{https}");

    // Gateway.status: who serves it and what is attached.
    let st = wait_for("the Gateway's status", Duration::from_secs(30), || {
        let g = ctl.imctl_json(&["get", "gateway", "edge"]);
        (g.pointer("/status/nodes") == Some(&json!(["edge"]))).then_some(g)
    });
    assert_eq!(
        st["status"]["attachedRoutes"],
        json!({"web": 2, "tls": 2}),
        "{st}"
    );
    assert!(st["status"].get("problems").is_none(), "{st}");
    drop(worker);
    drop(edge);
}
