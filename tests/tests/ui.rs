//! The web UI in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, fantoccini) against a real controller and agent.
//!
//! Signs in with the one-time code `imctl ui` prints, sees the node Ready,
//! watches the service-map edge from `client` to `api` turn to dropped
//! when a deny Policy is applied, runs the sample pipeline from its page
//! until it succeeds, and checks that a view operator sees no buttons and
//! that forged POSTs (no CSRF token, a wrong one, a view session's) are
//! refused with 403. Screenshots of every page at 1280×800 go to
//! `target/ui-screenshots/`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use ironmesh_tests::{
    free_addr, images_dir, instances, str_at as s, wait_for, Agent, Controller, ControllerOpts,
    Unmounter,
};
use serde_json::{json, Value};

/// chromedriver in its own process group; the group (chromedriver and
/// the browsers it started) is killed on drop, also on panic.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    fn start(log: &Path) -> Chromedriver {
        use std::os::unix::process::CommandExt;
        let port = free_addr().port();
        let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("chromedriver");
        let out = std::fs::File::create(log).expect("chromedriver log");
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start chromedriver (apt-get install chromium-driver)");
        let d = Chromedriver { child, port };
        wait_for("chromedriver listens", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        d
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test started.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

async fn browser(port: u16) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--ignore-certificate-errors", "--window-size=1280,800",
                     "--disable-dev-shm-usage"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session")
}

/// Sizes the window so that the page itself (the viewport, what a
/// screenshot shows) is `w`×`h`.
async fn viewport(c: &Client, w: u32, h: u32) {
    c.set_window_size(w, h).await.unwrap();
    let v = c
        .execute("return [window.innerWidth, window.innerHeight];", vec![])
        .await
        .unwrap();
    let inner = |i: usize| v.get(i).and_then(Value::as_u64).unwrap_or(0) as u32;
    let (dw, dh) = (w.saturating_sub(inner(0)), h.saturating_sub(inner(1)));
    if dw > 0 || dh > 0 {
        c.set_window_size(w + dw, h + dh).await.unwrap();
    }
}

fn shots_dir() -> PathBuf {
    let d = ironmesh_tests::bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("ui-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

/// Polls `f` until it gives `Some` or `deadline` passes (then panics
/// naming `what`).
async fn until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the browser shows one of our pages (not Chromium's error page:
/// test hosts come and go on this machine, and Chromium aborts a load on
/// such a network change with ERR_NETWORK_CHANGED).
async fn page_ok(c: &Client) -> bool {
    c.current_url().await.is_ok_and(|u| u.scheme() == "https") && exists(c, "main").await
}

/// Navigates to `url`, again if the load was aborted.
async fn open(c: &Client, url: &str) {
    let mut last = String::new();
    for attempt in 1..=20u64 {
        if let Err(e) = c.goto(url).await {
            last = e.to_string();
        }
        if page_ok(c).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200 * attempt.min(5))).await;
    }
    shot(c, "failed-open").await;
    let at = c
        .current_url()
        .await
        .map(|u| u.to_string())
        .unwrap_or_default();
    let src = c.source().await.unwrap_or_default();
    panic!(
        "could not open {url}: at {at}, last error {last:?}, page {}",
        src.chars().take(600).collect::<String>()
    );
}

/// Signs in as the operator of `config` with a fresh code (a new one if
/// the load was aborted: the old one may have been used); returns the URL.
async fn sign_in(c: &Client, ctl: &Controller, config: &Path) -> String {
    for attempt in 1..=5u64 {
        let url = sign_in_url(ctl, config);
        let _ = c.goto(&url).await;
        if page_ok(c).await && exists(c, "#operator").await {
            return url;
        }
        tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
    }
    panic!("could not sign in");
}

/// The attribute of the first element matching `css`, if there is one.
async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    let e = c.find(Locator::Css(css)).await.ok()?;
    e.attr(name).await.ok().flatten()
}

async fn exists(c: &Client, css: &str) -> bool {
    c.find_all(Locator::Css(css))
        .await
        .map(|v| !v.is_empty())
        .unwrap_or(false)
}

/// `fetch` POST from the page (same origin, with its cookie) → status.
async fn post_status(c: &Client, path: &str, body: &str) -> u64 {
    for _ in 0..5 {
        match post_once(c, path, body).await {
            0 => tokio::time::sleep(Duration::from_millis(300)).await,
            status => return status,
        }
    }
    panic!("POST {path} did not complete");
}

async fn post_once(c: &Client, path: &str, body: &str) -> u64 {
    let v = c
        .execute(
            "const p = arguments[0], b = arguments[1];
             return fetch(p, {method: 'POST', credentials: 'same-origin', redirect: 'manual',
                 headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: b})
               .then(r => r.status);",
            vec![json!(path), json!(body)],
        )
        .await;
    v.ok().and_then(|v| v.as_u64()).unwrap_or(0)
}

fn sign_in_url(ctl: &Controller, config: &Path) -> String {
    let out = ctl.imctl_as(config, &["ui", "--url-only"]);
    assert!(
        out.status.success(),
        "imctl ui: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        url.starts_with(&format!("https://{}/login?code=", ctl.ui)),
        "{url}"
    );
    url
}

/// Connects from `client`'s namespace to `target` until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(netns: PathBuf, target: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let ns = netns.clone();
                ironmesh_tests::netns::within(&ns, move || {
                    let _ =
                        std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500));
                });
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_control_panel_in_a_browser() {
    let ctl = Controller::start(ControllerOpts::default());
    let agent = Agent::start(&ctl, "ui-node");
    let _unmount = Unmounter(vec![agent.dir.path().to_path_buf()]);
    agent.wait_ready(&ctl, Duration::from_secs(90));
    for image in ["records-server", "batch-step"] {
        let out = ctl.imctl(&["image", "push", images_dir().join(image).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: api
  labels: {app: api}
spec:
  image: ironmesh/records-server:dev
  env: [{name: LISTEN_ADDR, value: \"0.0.0.0:8080\"}]
  readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: ironmesh.dev/v1
kind: Workload
metadata:
  name: client
  labels: {team: analytics}
spec:
  image: ironmesh/batch-step:dev
  env: [{name: SLEEP_MS, value: \"600000\"}]
",
    );
    let pipeline = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/orders-pipeline.yaml"),
    )
    .unwrap();
    ctl.apply_yaml(&pipeline);
    wait_for("the node reports its pool", Duration::from_secs(30), || {
        ctl.node("ui-node")
            .filter(|n| n.pointer("/status/storage/pools/0/capacityBytes").is_some())
    });
    let api = wait_for("api ready", Duration::from_secs(60), || {
        instances(&ctl, "api")
            .into_iter()
            .find(|i| i.pointer("/status/ready") == Some(&Value::Bool(true)))
    });
    let client = wait_for("client running", Duration::from_secs(60), || {
        instances(&ctl, "client")
            .into_iter()
            .find(|i| s(i, "/status/phase") == "Running" && !s(i, "/status/ip").is_empty())
    });
    let netns = PathBuf::from("/run/ironmesh")
        .join(agent.containerd.namespace())
        .join("netns")
        .join(s(&client, "/metadata/name"));
    let target = SocketAddr::new(s(&api, "/status/ip").parse::<IpAddr>().unwrap(), 8080);

    // A view operator.
    let viewer = ctl.dir.path().join("viewer.yaml");
    let out = ctl.imctl(&[
        "operator",
        "create",
        "viewer",
        "--role",
        "view",
        "--out",
        viewer.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let driver = Chromedriver::start(&ctl.dir.path().join("chromedriver.log"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = browser(driver.port).await;
        viewport(&c, 1280, 800).await;
        let r = scenario(&c, &ctl, &viewer, netns, target).await;
        let _ = c.close().await;
        r
    });
}

async fn scenario(c: &Client, ctl: &Controller, viewer: &Path, netns: PathBuf, target: SocketAddr) {
    let base = format!("https://{}", ctl.ui);

    // Unauthenticated: nothing but the sign-in page.
    open(c, &format!("{base}/nodes")).await;
    let body = c.source().await.unwrap();
    assert!(body.contains("Sign in to Ironmesh"), "{body}");
    assert!(!body.contains("ui-node"), "no data before sign-in");

    // Sign in as admin with the one-time code.
    let url = sign_in(c, ctl, &ctl.admin_config()).await;
    let who = c
        .find(Locator::Id("operator"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(who, "admin (admin)");
    // The code works once.
    c.delete_all_cookies().await.unwrap();
    open(c, &url).await;
    assert!(
        c.source().await.unwrap().contains("Sign in to Ironmesh"),
        "a code is single-use"
    );
    sign_in(c, ctl, &ctl.admin_config()).await;
    assert!(exists(c, "#nodes-ready").await);
    shot(c, "overview").await;

    // The node appears Ready.
    open(c, &format!("{base}/nodes")).await;
    until(
        "ui-node Ready on the nodes page",
        Duration::from_secs(30),
        || async {
            (attr(c, r#"tr[data-node="ui-node"]"#, "data-ready")
                .await
                .as_deref()
                == Some("True"))
            .then_some(())
        },
    )
    .await;
    assert!(
        exists(c, r#"form[action="/nodes/ui-node/cordon"] button"#).await,
        "admin sees cordon"
    );
    shot(c, "nodes").await;

    // Traffic from client to api; the map's edge is allowed, then dropped.
    let traffic = Traffic::start(netns, target);
    open(c, &format!("{base}/map")).await;
    let edge = r#"#service-map g.edge[data-src="client"][data-dst="api"]"#;
    until(
        "an allowed client → api edge",
        Duration::from_secs(60),
        || async {
            (attr(c, edge, "data-verdict").await.as_deref() == Some("allowed")).then_some(())
        },
    )
    .await;
    shot(c, "map-allowed").await;
    ctl.apply_yaml(
        "apiVersion: ironmesh.dev/v1
kind: Policy
metadata:
  name: api-readers
spec:
  selector: {app: api}
  ingress:
    - from: [{selector: {team: other}}]
      ports: [{port: 8080}]
",
    );
    // The page is not reloaded: the live update redraws the map.
    until(
        "the client → api edge turns dropped",
        Duration::from_secs(60),
        || async {
            (attr(c, edge, "data-verdict").await.as_deref() == Some("dropped")).then_some(())
        },
    )
    .await;
    let dropped: u64 = attr(c, edge, "data-dropped")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped >= 1);
    shot(c, "map-dropped").await;
    drop(traffic);
    // Filters: only dropped flows.
    open(
        c,
        &format!("{base}/map?verdict=dropped&workload=api&port=8080"),
    )
    .await;
    assert_eq!(
        attr(c, edge, "data-verdict").await.as_deref(),
        Some("dropped")
    );

    // The policy matrix says so too.
    open(c, &format!("{base}/policies")).await;
    assert_eq!(
        attr(
            c,
            r#"#policy-matrix td[data-src="client"][data-dst="api"]"#,
            "class"
        )
        .await
        .as_deref(),
        Some("deny")
    );
    shot(c, "policies").await;

    for (page, name) in [
        ("/workloads", "workloads"),
        ("/workloads/api", "workload-api"),
        ("/instances", "instances"),
        ("/images", "images"),
        ("/charts", "charts"),
    ] {
        open(c, &format!("{base}{page}")).await;
        shot(c, name).await;
    }
    open(c, &format!("{base}/instances")).await;
    let first = c
        .find(Locator::Css(
            r#"#instances tbody tr[data-phase="Running"] th a"#,
        ))
        .await
        .unwrap();
    first.click().await.unwrap();
    assert!(exists(c, "pre#log").await);
    shot(c, "instance").await;

    // Forged POSTs from the admin's own session: no token, a wrong token.
    open(c, &format!("{base}/pipelines")).await;
    assert_eq!(
        post_status(c, "/pipelines/orders-nightly/run", "").await,
        403
    );
    assert_eq!(
        post_status(c, "/pipelines/orders-nightly/run", "csrf=0000").await,
        403
    );
    assert_eq!(post_status(c, "/nodes/ui-node/drain", "csrf=").await, 403);

    // Start the sample pipeline from its page and watch the run succeed.
    let run_button = c
        .find(Locator::Css(r#"button[data-trigger="orders-nightly"]"#))
        .await
        .expect("an admin sees the trigger button");
    let params = c.find(Locator::Id("params-orders-nightly")).await.unwrap();
    params.send_keys("DAY=2026-12-07").await.unwrap();
    run_button.click().await.unwrap();
    until("the run page", Duration::from_secs(20), || async {
        c.current_url()
            .await
            .ok()
            .filter(|u| u.path().starts_with("/runs/"))
            .map(|_| ())
    })
    .await;
    shot(c, "run-started").await;
    let run = c
        .current_url()
        .await
        .unwrap()
        .path()
        .trim_start_matches("/runs/")
        .to_string();
    let run_obj = ctl.imctl_json(&["get", "pipelinerun", &run]);
    assert_eq!(s(&run_obj, "/spec/parameters/DAY"), "2026-12-07");
    let phase = until("the run finishes", Duration::from_secs(300), || async {
        attr(c, "#run-phase", "data-phase")
            .await
            .filter(|p| matches!(p.as_str(), "Succeeded" | "Failed" | "Cancelled"))
    })
    .await;
    shot(c, "run").await;
    assert_eq!(
        phase,
        "Succeeded",
        "{}",
        c.source().await.unwrap_or_default()
    );
    assert_eq!(
        attr(c, r#"#run-dag g.step[data-step="publish"]"#, "data-phase")
            .await
            .as_deref(),
        Some("Succeeded")
    );
    open(c, &format!("{base}/runs/{run}/logs?step=publish&index=0")).await;
    shot(c, "run-logs").await;
    open(c, &format!("{base}/pipelines")).await;
    shot(c, "pipelines").await;
    open(c, &format!("{base}/volumes")).await;
    shot(c, "volumes").await;

    // A view operator: no buttons, and even with its own CSRF token a
    // POST is refused.
    c.delete_all_cookies().await.unwrap();
    sign_in(c, ctl, viewer).await;
    let who = c
        .find(Locator::Id("operator"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(who, "viewer (view)");
    open(c, &format!("{base}/pipelines")).await;
    assert!(exists(c, r#"tr[data-pipeline="orders-nightly"]"#).await);
    assert!(
        !exists(c, "button[data-trigger]").await,
        "a view operator sees no trigger button"
    );
    shot(c, "pipelines-view").await;
    open(c, &format!("{base}/nodes")).await;
    assert!(
        !exists(c, "td.actions button").await,
        "a view operator sees no node buttons"
    );
    let token = attr(c, r#"meta[name="csrf-token"]"#, "content")
        .await
        .unwrap();
    assert_eq!(
        post_status(c, "/pipelines/orders-nightly/run", &format!("csrf={token}")).await,
        403
    );
    assert_eq!(
        post_status(c, "/nodes/ui-node/cordon", &format!("csrf={token}")).await,
        403
    );
    assert_eq!(post_status(c, "/nodes/ui-node/cordon", "").await, 403);
    // Phone width: the same pages, narrower.
    viewport(c, 390, 844).await;
    for (page, name) in [("/", "overview-390"), ("/map", "map-390")] {
        open(c, &format!("{base}{page}")).await;
        shot(c, name).await;
    }
    let node = ctl.node("ui-node").unwrap();
    assert_ne!(
        node.pointer("/spec/unschedulable"),
        Some(&Value::Bool(true)),
        "nothing changed"
    );

    // Revoking the operator ends its session at once.
    let out = ctl.imctl(&["operator", "revoke", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = c
        .execute(
            "return fetch('/', {credentials: 'same-origin'}).then(r => r.status);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        status.as_u64(),
        Some(401),
        "a revoked operator's session still works"
    );
}
