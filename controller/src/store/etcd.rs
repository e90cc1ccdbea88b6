//! The etcd backend of the [`Store`] trait, for operators who run several
//! controllers on one etcd cluster (etcd v3 API through `etcd-client`).
//!
//! This module owns the mapping of the store contract onto etcd and nothing
//! about what keys mean. The mapping:
//!
//! - Revisions are etcd's own, 1:1 (`mod_revision`, `create_revision`, the
//!   header revision). An empty etcd is at revision 1, not 0: the contract
//!   only promises that a fresh store has *some* revision and that every
//!   write is above it.
//! - Every key is stored under a namespace prefix that ends in `/` (default
//!   `/ironmesh/`, so the store key `/registry/…` is the etcd key
//!   `/ironmesh//registry/…`), so one etcd can serve other users too; the
//!   prefix never shows in results.
//! - `txn` is one etcd Txn: `Absent` is `create_revision == 0`,
//!   `ModRevision(k, r)` is `mod_revision == r` (plus `create_revision > 0`
//!   when `r == 0`, since etcd compares a missing key as all zeros). When
//!   the compares fail, the failure branch reads every compared key at the
//!   same revision, so the first failing compare is reported exactly.
//!   etcd fsyncs its log before it answers, as the contract asks.
//! - `watch(prefix, after)` is an etcd watch with `prev_kv` (a delete event
//!   carries the value it removed) starting at `after` itself; the event at
//!   `after` is skipped. Starting one revision early lets etcd's own
//!   compaction check answer exactly "is `after + 1` still there": etcd
//!   refuses a start below its compaction revision `C`, so `after < C` is
//!   [`StoreError::Compacted`] with `oldest = C + 1`.
//! - History is compacted by the controllers themselves (as the Kubernetes
//!   API server does): with [`EtcdConfig::history`] set, a commit that moves
//!   the revision far enough past the last compaction compacts etcd to keep
//!   about that many revisions. Several controllers doing so is harmless.
//! - A watch whose etcd stream breaks (etcd restarted, connection lost)
//!   yields [`StoreError::Io`] and ends; callers re-list and watch again,
//!   as they do for any watch error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, EventType, GetOptions, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures::StreamExt;

use super::{
    validate_txn, Compare, Event, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn,
    TxnOutcome, WatchStream,
};

/// Default key namespace inside etcd.
pub const DEFAULT_PREFIX: &str = "/ironmesh/";
/// How long one etcd request may take before it fails as I/O.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffered events per watch between the etcd stream and the consumer.
const WATCH_BUFFER: usize = 256;

/// Client certificates and CA for TLS to etcd, all PEM.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// CA that signed etcd's serving certificates.
    pub ca_pem: Option<String>,
    /// Client certificate and key, when etcd asks for one
    /// (`--client-cert-auth`).
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one per etcd member.
    pub endpoints: Vec<String>,
    /// Key namespace; every key is stored as `prefix + key`.
    pub prefix: String,
    /// TLS settings; `None` for plain HTTP endpoints.
    pub tls: Option<EtcdTls>,
    /// Keep about this many revisions of history (the controllers compact
    /// etcd); `None` leaves compaction to etcd's own settings.
    pub history: Option<u64>,
}

impl EtcdConfig {
    /// Parses `etcd://h1:2379,h2:2379` (plain) or `etcds://…` (TLS) into
    /// endpoints. Returns `None` if `spec` is not an etcd store spec.
    pub fn endpoints_from_spec(spec: &str) -> Option<Result<Vec<String>, String>> {
        let (scheme, rest) = if let Some(r) = spec.strip_prefix("etcd://") {
            ("http", r)
        } else if let Some(r) = spec.strip_prefix("etcds://") {
            ("https", r)
        } else {
            return None;
        };
        let mut out = Vec::new();
        for hp in rest.split(',').map(str::trim) {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || !hp.contains(':') || hp.contains('/') {
                return Some(Err(format!(
                    "store {spec:?}: each etcd member must be host:port, got {hp:?}"
                )));
            }
            out.push(format!("{scheme}://{hp}"));
        }
        Some(Ok(out))
    }
}

/// The etcd-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    history: Option<u64>,
    /// Revision etcd was last compacted to by this process.
    compacted: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .field("history", &self.history)
            .finish()
    }
}

fn io(e: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(s) = &e {
        if s.code() == tonic::Code::InvalidArgument {
            // Request too large, too many ops in one txn, …: retrying the
            // same request cannot succeed.
            return StoreError::Invalid(format!("etcd refused the request: {}", s.message()));
        }
    }
    StoreError::Io(format!("etcd: {}", ironmesh_process::error_chain(&e)))
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

fn is_future_revision(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("future revision"))
}

fn rev(r: i64) -> Revision {
    r.max(0) as Revision
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 128;

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix): the prefix with its last byte below 0xff raised.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from here on.
    vec![0]
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(StoreError::Io(format!(
            "etcd did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

impl EtcdStore {
    /// Connects to etcd. Fails if no endpoint answers in time.
    pub async fn connect(cfg: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &cfg.tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        let client = timed(Client::connect(cfg.endpoints.clone(), Some(opts))).await?;
        // A prefix that ends in '/' cannot be the start of another user's
        // look-alike name ("/ironmesh" would also match "/ironmeshy").
        let mut prefix = cfg.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let store = EtcdStore {
            client,
            prefix,
            history: cfg.history.filter(|h| *h > 0),
            compacted: Arc::new(AtomicU64::new(0)),
        };
        // Prove the connection works now rather than at the first request.
        store.revision().await?;
        Ok(store)
    }

    /// The etcd client, for coordination that is not part of the store
    /// contract (leases, leader election).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// `key` with the namespace prefix, as etcd stores it.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn strip<'a>(&self, key: &'a [u8]) -> Result<&'a str, StoreError> {
        let k = std::str::from_utf8(key)
            .map_err(|_| StoreError::Corrupt("a key in etcd is not UTF-8".into()))?;
        k.strip_prefix(self.prefix.as_str()).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "etcd key {k:?} is outside prefix {:?}",
                self.prefix
            ))
        })
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?.to_string(),
            value: kv.value().to_vec(),
            create_revision: rev(kv.create_revision()),
            mod_revision: rev(kv.mod_revision()),
        })
    }

    /// After a commit at `at`: compact etcd if history has grown past the
    /// configured length by a tenth of it (at least one revision).
    async fn maybe_compact(&self, at: Revision) {
        let Some(keep) = self.history else { return };
        let target = at.saturating_sub(keep);
        let step = (keep / 10).max(1);
        let last = self.compacted.load(Ordering::Relaxed);
        if target == 0 || target < last + step {
            return;
        }
        self.compacted.fetch_max(target, Ordering::Relaxed);
        let mut kv = self.client.kv_client();
        match timed(kv.compact(target as i64, None)).await {
            Ok(_) => tracing::debug!(compacted = target, "compacted etcd history"),
            // Another controller got there first.
            Err(StoreError::Io(m)) if m.contains("compacted") => {}
            Err(e) => tracing::warn!(error = %e, revision = target, "cannot compact etcd"),
        }
    }

    /// The compaction revision etcd reports for a watch that starts at
    /// `start`, if that start is compacted.
    async fn compaction_point(&self, start: i64) -> Result<Option<i64>, StoreError> {
        // A watch response may batch many events of one revision.
        let mut w = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20);
        let opts = WatchOptions::new().with_start_revision(start).with_prefix();
        let mut stream = timed(w.watch(self.full_key(""), Some(opts))).await?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| StoreError::Io("etcd did not report its compaction point".into()))?
                .map_err(io)?;
            let Some(resp) = msg else {
                return Err(StoreError::Io("etcd closed the watch".into()));
            };
            if resp.compact_revision() > 0 {
                return Ok(Some(resp.compact_revision()));
            }
            if resp.canceled() {
                return Err(StoreError::Io(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            if !resp.events().is_empty() {
                return Ok(None);
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if key.is_empty() {
            return Err(StoreError::Invalid("get of an empty key".into()));
        }
        let mut kv = self.client.kv_client();
        let resp = timed(kv.get(self.full_key(key), None)).await?;
        resp.kvs().first().map(|k| self.kv(k)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        // In pages at one revision: a single range of a large cluster is
        // more than a gRPC message may hold (9 MB at 3,000 instances
        // against the client's 4 MB limit).
        // A page of the largest objects etcd takes (1.5 MB each) must
        // still decode.
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(LIST_PAGE as usize * (3 << 19) + (1 << 20));
        let full = self.full_key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.clone().into_bytes();
        let mut at: Option<i64> = None;
        let mut items = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if let Some(r) = at {
                opts = opts.with_revision(r);
            }
            let resp = timed(kv.get(from.clone(), Some(opts))).await?;
            if at.is_none() {
                at = Some(resp.header().map(|h| h.revision()).unwrap_or(0));
            }
            for k in resp.kvs() {
                items.push(self.kv(k)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        // etcd sorts by key bytes already; keep the contract explicit.
        items.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        Ok((items, rev(at.unwrap_or(0))))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        validate_txn(&txn)?;
        let mut compares = Vec::new();
        let mut reads = Vec::new();
        for c in &txn.compares {
            match c {
                Compare::Absent(k) => {
                    compares.push(ECompare::create_revision(
                        self.full_key(k),
                        CompareOp::Equal,
                        0,
                    ));
                    reads.push(TxnOp::get(self.full_key(k), None));
                }
                Compare::ModRevision(k, r) => {
                    compares.push(ECompare::mod_revision(
                        self.full_key(k),
                        CompareOp::Equal,
                        *r as i64,
                    ));
                    if *r == 0 {
                        compares.push(ECompare::create_revision(
                            self.full_key(k),
                            CompareOp::Greater,
                            0,
                        ));
                    }
                    reads.push(TxnOp::get(self.full_key(k), None));
                }
            }
        }
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.full_key(key), None),
            })
            .collect();
        let etxn = etcd_client::Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(reads);
        let mut kv = self.client.kv_client();
        let resp = timed(kv.txn(etxn)).await?;
        let revision = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        if resp.succeeded() {
            self.maybe_compact(revision).await;
            return Ok(TxnOutcome::Committed(revision));
        }
        // Which compare failed: judge each against the keys as the failure
        // branch read them, at the revision the compares saw.
        let responses = resp.op_responses();
        for (index, (c, r)) in txn.compares.iter().zip(responses.iter()).enumerate() {
            let TxnOpResponse::Get(g) = r else {
                return Err(StoreError::Corrupt(
                    "etcd answered a txn read with something else".into(),
                ));
            };
            let found = g.kvs().first();
            let holds = match c {
                Compare::Absent(_) => found.is_none(),
                Compare::ModRevision(_, want) => {
                    found.is_some_and(|kv| rev(kv.mod_revision()) == *want)
                }
            };
            if !holds {
                return Ok(TxnOutcome::CompareFailed { index });
            }
        }
        Err(StoreError::Corrupt(
            "etcd refused a txn whose compares all hold on re-read".into(),
        ))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = timed(kv.get(
            self.full_key(""),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ))
        .await?;
        resp.header()
            .map(|h| rev(h.revision()))
            .ok_or_else(|| StoreError::Corrupt("etcd answered without a header".into()))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // Start at `after` itself (skipping its events) so that etcd's own
        // check of the start revision tells whether `after + 1` survived.
        let start = (after as i64).max(1);
        let requested = after + 1;
        // etcd reports a compacted start only asynchronously on the watch;
        // a read at the start revision answers synchronously.
        let mut kv = self.client.kv_client();
        let probe = tokio::time::timeout(
            REQUEST_TIMEOUT,
            kv.get(
                self.full_key(""),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_count_only()
                        .with_revision(start),
                ),
            ),
        )
        .await
        .map_err(|_| StoreError::Io("etcd did not answer".into()))?;
        match probe {
            Ok(_) => {}
            Err(e) if is_future_revision(&e) => {}
            Err(e) if is_compacted(&e) => {
                let c = self.compaction_point(start).await?.unwrap_or(start);
                return Err(StoreError::Compacted {
                    requested,
                    oldest: rev(c) + 1,
                });
            }
            Err(e) => return Err(io(e)),
        }
        // A watch response may batch many events of one revision.
        let mut w = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20);
        let opts = WatchOptions::new()
            .with_start_revision(start)
            .with_prefix()
            .with_prev_key();
        let stream = timed(w.watch(self.full_key(prefix), Some(opts))).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            // The request half must live as long as the watch: dropping it
            // ends the etcd watch.
            let (_requests, mut responses) = stream.split();
            let mut last = after;
            loop {
                let item: Result<(), StoreError> = match responses.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            Err(StoreError::Compacted {
                                requested: last + 1,
                                oldest: rev(resp.compact_revision()) + 1,
                            })
                        } else if resp.canceled() {
                            Err(StoreError::Io(format!(
                                "etcd cancelled the watch: {}",
                                resp.cancel_reason()
                            )))
                        } else {
                            let mut failed = None;
                            for e in resp.events() {
                                match this.event(e) {
                                    Ok(Some(ev)) if ev.revision > after => {
                                        last = ev.revision;
                                        if tx.send(Ok(ev)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(_) => {}
                                    Err(err) => {
                                        failed = Some(err);
                                        break;
                                    }
                                }
                            }
                            match failed {
                                Some(err) => Err(err),
                                None => continue,
                            }
                        }
                    }
                    Ok(None) => Err(StoreError::Io("etcd closed the watch stream".into())),
                    Err(e) => Err(io(e)),
                };
                if let Err(e) = item {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

impl EtcdStore {
    fn event(&self, e: &etcd_client::Event) -> Result<Option<Event>, StoreError> {
        let Some(kv) = e.kv() else { return Ok(None) };
        let revision = rev(kv.mod_revision());
        Ok(Some(match e.event_type() {
            EventType::Put => Event {
                kind: EventKind::Put,
                kv: self.kv(kv)?,
                revision,
            },
            EventType::Delete => {
                // The key as it was before the delete; etcd drops prev_kv
                // only when that revision is already compacted.
                let before = match e.prev_kv() {
                    Some(p) => self.kv(p)?,
                    None => KeyValue {
                        key: self.strip(kv.key())?.to_string(),
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: 0,
                    },
                };
                Event {
                    kind: EventKind::Delete,
                    kv: before,
                    revision,
                }
            }
        }))
    }
}

/// A private etcd server for tests: loopback ports, a temporary data dir,
/// killed by PID on drop (also when a test panics).
#[cfg(test)]
pub mod test_server {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct EtcdServer {
        child: Child,
        pub endpoint: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl EtcdServer {
        /// Starts etcd and waits until it accepts connections.
        pub fn start() -> EtcdServer {
            for _ in 0..3 {
                let dir = tempfile::tempdir().expect("temp dir");
                let (client, peer) = (free_port(), free_port());
                let endpoint = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let child = Command::new("etcd")
                    .args(["--name", "t", "--data-dir"])
                    .arg(dir.path())
                    .args(["--listen-client-urls", &endpoint])
                    .args(["--advertise-client-urls", &endpoint])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &format!("t={peer_url}")])
                    .args(["--max-txn-ops", "10000", "--log-level", "error"])
                    .args(["--logger", "zap"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("etcd is installed (apt-get install etcd-server)");
                let mut server = EtcdServer {
                    child,
                    endpoint,
                    _dir: dir,
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = server.child.try_wait() {
                        break; // exited: port taken; try others
                    }
                    if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                        return server;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(server);
            }
            panic!("etcd did not start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::EtcdServer;
    use super::*;

    async fn store_on(server: &EtcdServer, history: Option<u64>) -> EtcdStore {
        EtcdStore::connect(EtcdConfig {
            endpoints: vec![server.endpoint.clone()],
            prefix: DEFAULT_PREFIX.into(),
            tls: None,
            history,
        })
        .await
        .expect("connect to the test etcd")
    }

    async fn fresh() -> (Arc<dyn Store>, EtcdServer) {
        let server = EtcdServer::start();
        let s = store_on(&server, None).await;
        (Arc::new(s), server)
    }

    async fn fresh_short_history() -> (Arc<dyn Store>, EtcdServer) {
        let server = EtcdServer::start();
        let s = store_on(
            &server,
            Some(crate::store::conformance::SHORT_HISTORY as u64),
        )
        .await;
        (Arc::new(s), server)
    }

    crate::store::conformance::conformance_tests!(fresh, fresh_short_history);

    #[tokio::test]
    async fn list_larger_than_one_message_comes_in_pages_at_one_revision() {
        let (s, _server) = fresh().await;
        // 600 keys of 16 KiB: 9.6 MB, over the 4 MB a gRPC message holds.
        let value = vec![7u8; 16 << 10];
        let mut ops = Vec::new();
        for i in 0..600u32 {
            ops.push(Op::Put {
                key: format!("big/{i:04}"),
                value: value.clone(),
            });
            if ops.len() == 50 {
                s.txn(Txn {
                    compares: vec![],
                    ops: std::mem::take(&mut ops),
                })
                .await
                .unwrap();
            }
        }
        s.txn(Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "bigger".into(),
                value: b"x".to_vec(),
            }],
        })
        .await
        .unwrap();
        let (items, revision) = s.list("big/").await.unwrap();
        assert_eq!(items.len(), 600);
        assert_eq!(items[0].key, "big/0000");
        assert_eq!(items[599].key, "big/0599");
        assert_eq!(revision, s.revision().await.unwrap());
    }

    #[test]
    fn store_specs_parse() {
        assert_eq!(
            EtcdConfig::endpoints_from_spec("etcd://a:2379,b:2379"),
            Some(Ok(vec!["http://a:2379".into(), "http://b:2379".into()]))
        );
        assert_eq!(
            EtcdConfig::endpoints_from_spec("etcds://a:2379"),
            Some(Ok(vec!["https://a:2379".into()]))
        );
        assert!(matches!(
            EtcdConfig::endpoints_from_spec("etcd://a"),
            Some(Err(_))
        ));
        assert_eq!(EtcdConfig::endpoints_from_spec("embedded"), None);
    }

    #[tokio::test]
    async fn keys_live_under_the_prefix_and_other_users_are_invisible() {
        let server = EtcdServer::start();
        let s = store_on(&server, None).await;
        let mut raw = s.client();
        raw.put("/other/x", "1", None).await.unwrap();
        raw.put("/ironmeshy", "1", None).await.unwrap();
        let r = match s
            .txn(Txn {
                compares: vec![],
                ops: vec![Op::Put {
                    key: "/k".into(),
                    value: b"v".to_vec(),
                }],
            })
            .await
            .unwrap()
        {
            TxnOutcome::Committed(r) => r,
            o => panic!("{o:?}"),
        };
        let got = raw.get("/ironmesh//k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v");
        let (items, _) = s.list("").await.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "/k");
        assert_eq!(items[0].mod_revision, r);
    }

    #[tokio::test]
    async fn too_many_ops_for_etcd_is_invalid_not_io() {
        let server = EtcdServer::start();
        let s = store_on(&server, None).await;
        // The test etcd allows 10000 ops per txn.
        let ops = (0..10_001)
            .map(|i| Op::Put {
                key: format!("/k/{i}"),
                value: vec![],
            })
            .collect();
        let e = s
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    }
}
