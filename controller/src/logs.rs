//! Relays instance logs from agents to operators.
//!
//! Logs stay on the node that ran the instance. `imctl logs` asks the
//! controller, which sends a `LogRequest` down the node's sync stream and
//! forwards the agent's `LogChunk`s to the caller; when the caller goes
//! away a `LogCancel` stops a follow. No inbound connection to the agent is
//! needed, so nodes behind NAT work too.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use ironmesh_api::Kind;
use ironmesh_proto::v1::{
    controller_message, ControllerMessage, LogCancel, LogChunk, LogRequest, LogsChunk, LogsRequest,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::Status;

use crate::resources::Resources;

pub type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsChunk, Status>> + Send>>;
/// A sync stream's outbound queue (see [`crate::node_api::Outbound`]).
type Downstream = crate::node_api::Outbound;

/// An open log request: its node, where chunks go, and a flag set when the
/// reader fell behind and the request was ended.
type Pending = (
    String,
    mpsc::Sender<Result<LogsChunk, Status>>,
    Arc<AtomicBool>,
);

#[derive(Default)]
struct Inner {
    /// Open sync streams by node: (session, sender).
    sessions: HashMap<String, (u64, Downstream)>,
    /// Open log requests: id → (node, where chunks go, set when the
    /// reader fell behind and the request was ended).
    pending: HashMap<u64, Pending>,
}

#[derive(Clone, Default)]
pub struct LogRelay {
    inner: Arc<Mutex<Inner>>,
    next_id: Arc<AtomicU64>,
}

impl LogRelay {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync stream opened: log requests for `node` go down `tx`.
    pub fn connect(&self, node: &str, session: u64, tx: Downstream) {
        self.lock().sessions.insert(node.to_string(), (session, tx));
    }

    /// A sync stream ended: its open log requests end with an error.
    pub fn disconnect(&self, node: &str, session: u64) {
        let mut g = self.lock();
        if g.sessions.get(node).is_some_and(|(s, _)| *s == session) {
            g.sessions.remove(node);
            let ids: Vec<u64> = g
                .pending
                .iter()
                .filter(|(_, (n, _, _))| n == node)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some((_, tx, _)) = g.pending.remove(&id) {
                    let _ = tx.try_send(Err(Status::unavailable(format!(
                        "node {node:?} disconnected"
                    ))));
                }
            }
        }
    }

    /// A chunk from `node`'s agent. Chunks for requests that node was not
    /// asked for are dropped. Never waits: this runs in the node's sync
    /// loop, and a reader that does not keep up must not stall that node's
    /// heartbeats. A reader whose buffer is full loses its request (the
    /// agent is told to stop) and is told why after what it has buffered.
    pub fn deliver(&self, node: &str, chunk: LogChunk) {
        let mut g = self.lock();
        let (tx, lagged) = match g.pending.get(&chunk.request_id) {
            Some((n, tx, lagged)) if n == node => (tx.clone(), lagged.clone()),
            _ => return,
        };
        let done = chunk.eof || !chunk.error.is_empty();
        let mut full = false;
        if !chunk.data.is_empty() {
            full |= matches!(
                tx.try_send(Ok(LogsChunk { data: chunk.data })),
                Err(mpsc::error::TrySendError::Full(_))
            );
        }
        if !full && !chunk.error.is_empty() {
            let _ = tx.try_send(Err(Status::not_found(chunk.error)));
        }
        if full {
            lagged.store(true, Ordering::Release);
            if let Some((_, down)) = g.sessions.get(node) {
                let _ = down.try_send(Box::new(Ok(ControllerMessage {
                    msg: Some(controller_message::Msg::LogCancel(LogCancel {
                        request_id: chunk.request_id,
                    })),
                })));
            }
            tracing::info!(
                node,
                request = chunk.request_id,
                "log reader fell behind; request ended"
            );
        }
        if done || full {
            g.pending.remove(&chunk.request_id);
        }
    }

    /// Starts relaying the logs of `req.instance` from its node.
    pub async fn open(
        &self,
        resources: &Resources,
        req: LogsRequest,
    ) -> Result<LogsStream, Status> {
        let inst = resources
            .get(Kind::Instance, &req.instance)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "instance {:?} not found (see `imctl get instances`)",
                    req.instance
                ))
            })?;
        let node = inst
            .object
            .pointer("/spec/node")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "instance {:?} is not placed on a node yet, so it has no logs",
                    req.instance
                ))
            })?
            .to_string();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(64);
        let lagged = Arc::new(AtomicBool::new(false));
        let down = {
            let mut g = self.lock();
            let down = g
                .sessions
                .get(&node)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "node {node:?} of instance {:?} is not connected",
                        req.instance
                    ))
                })?;
            g.pending.insert(id, (node.clone(), tx, lagged.clone()));
            down
        };
        let ask = ControllerMessage {
            msg: Some(controller_message::Msg::LogRequest(LogRequest {
                request_id: id,
                instance: req.instance.clone(),
                follow: req.follow,
                tail_lines: req.tail_lines,
            })),
        };
        if down.send(Box::new(Ok(ask))).await.is_err() {
            self.lock().pending.remove(&id);
            return Err(Status::unavailable(format!("node {node:?} disconnected")));
        }
        tracing::debug!(instance = %req.instance, %node, request = id, follow = req.follow, "log relay opened");
        Ok(Box::pin(Relayed {
            rx,
            id,
            down,
            relay: self.clone(),
            lagged,
        }))
    }
}

/// The caller's end; dropping it cancels the request on the agent.
struct Relayed {
    rx: mpsc::Receiver<Result<LogsChunk, Status>>,
    id: u64,
    down: Downstream,
    relay: LogRelay,
    lagged: Arc<AtomicBool>,
}

impl Stream for Relayed {
    type Item = Result<LogsChunk, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if self.lagged.swap(false, Ordering::AcqRel) => {
                Poll::Ready(Some(Err(Status::resource_exhausted(
                    "this log stream was ended because it was read more slowly than the instance wrote; run `imctl logs` again (with --tail to skip what was missed)",
                ))))
            }
            other => other,
        }
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        let still_open = self.relay.lock().pending.remove(&self.id).is_some();
        if still_open {
            let _ = self.down.try_send(Box::new(Ok(ControllerMessage {
                msg: Some(controller_message::Msg::LogCancel(LogCancel {
                    request_id: self.id,
                })),
            })));
        }
    }
}
