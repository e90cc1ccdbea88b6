//! What goes up the stream, and in which order.
//!
//! One session's outbound stream is three bounded queues read in strict
//! priority ([`Lanes`]): `control` (hello, heartbeats, inventory, acks),
//! then `state` (instance reports and events, storage reports, flows),
//! then `logs` (log chunks). The session only ever `try_send`s on
//! `control`, so a full queue anywhere never stalls its loop: a heartbeat
//! that finds `control` full is skipped, not waited for. Log chunks are
//! sent with back-pressure on their own small lane: a slow log reader slows
//! its own log stream and nothing else, and a burst of log output cannot
//! queue ahead of a heartbeat on this side of the connection.
//!
//! Besides: supervisor reports are forwarded to whichever session is open,
//! with every state that is immediately available batched into one
//! `InstanceReport`, and flow batches are forwarded without waiting.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ironmesh_proto::v1::{
    agent_message, AgentMessage, InstancePhase, InstanceReport, InstanceState,
};
use tokio::sync::{mpsc, watch};

use crate::metrics::AgentMetrics;
use crate::supervisor::SupervisorReport;

/// Room in each lane.
const CONTROL_LANE: usize = 16;
const STATE_LANE: usize = 256;
const LOG_LANE: usize = 32;
/// At most this many supervisor reports are folded into one send.
const REPORT_BATCH: usize = 512;

/// The open session's `state` lane, if a session is open.
pub(super) type Current = watch::Sender<Option<mpsc::Sender<AgentMessage>>>;

/// The sending ends of one session's outbound stream.
pub(super) struct Lanes {
    /// Hello, heartbeats, inventory, acks: read first.
    pub control: mpsc::Sender<AgentMessage>,
    /// Instance reports and events, storage reports, flows.
    pub state: mpsc::Sender<AgentMessage>,
    /// Log chunks: read only when nothing else waits.
    pub logs: mpsc::Sender<AgentMessage>,
}

/// The receiving end of [`Lanes`], as the request stream of `Sync`. It ends
/// when the `control` lane closes (the session is over).
pub(super) struct LaneStream {
    control: mpsc::Receiver<AgentMessage>,
    state: mpsc::Receiver<AgentMessage>,
    logs: mpsc::Receiver<AgentMessage>,
}

pub(super) fn lanes() -> (Lanes, LaneStream) {
    let (control, control_rx) = mpsc::channel(CONTROL_LANE);
    let (state, state_rx) = mpsc::channel(STATE_LANE);
    let (logs, logs_rx) = mpsc::channel(LOG_LANE);
    (
        Lanes {
            control,
            state,
            logs,
        },
        LaneStream {
            control: control_rx,
            state: state_rx,
            logs: logs_rx,
        },
    )
}

impl tokio_stream::Stream for LaneStream {
    type Item = AgentMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AgentMessage>> {
        let this = self.get_mut();
        match this.control.poll_recv(cx) {
            Poll::Ready(Some(m)) => return Poll::Ready(Some(m)),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        // A closed lower lane (Ready(None)) just has nothing more; the
        // control lane's waker is registered either way.
        if let Poll::Ready(Some(m)) = this.state.poll_recv(cx) {
            return Poll::Ready(Some(m));
        }
        if let Poll::Ready(Some(m)) = this.logs.poll_recv(cx) {
            return Poll::Ready(Some(m));
        }
        Poll::Pending
    }
}

pub(super) fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// Forwards supervisor reports to the current session; while disconnected
/// they are dropped (the next session starts with a full report).
pub(super) fn forward_reports(
    mut reports: mpsc::Receiver<SupervisorReport>,
    metrics: Arc<AgentMetrics>,
) -> Current {
    let (out, rx) = watch::channel::<Option<mpsc::Sender<AgentMessage>>>(None);
    tokio::spawn(async move {
        // Last known (phase, restarts) per instance, for the gauges.
        let mut known: HashMap<String, (InstancePhase, u32)> = HashMap::new();
        while let Some(first) = reports.recv().await {
            let mut batch = vec![first];
            while batch.len() < REPORT_BATCH {
                match reports.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            for r in &batch {
                observe(&metrics, &mut known, r);
            }
            let tx = rx.borrow().clone();
            let Some(tx) = tx else { continue };
            for m in batch_messages(batch) {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        }
    });
    out
}

/// The messages for a batch of reports: one `InstanceReport` with the last
/// state of each instance (in the order they first appeared), then the
/// events one by one, in order.
pub(super) fn batch_messages(batch: Vec<SupervisorReport>) -> Vec<AgentMessage> {
    let mut states: Vec<InstanceState> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut events = Vec::new();
    for r in batch {
        match r {
            SupervisorReport::State(st) => match at.get(&st.name) {
                Some(&i) => states[i] = st,
                None => {
                    at.insert(st.name.clone(), states.len());
                    states.push(st);
                }
            },
            SupervisorReport::Event(ev) => events.push(msg(agent_message::Msg::Event(ev))),
        }
    }
    let mut out = Vec::with_capacity(events.len() + 1);
    if !states.is_empty() {
        out.push(msg(agent_message::Msg::Instances(InstanceReport {
            full: false,
            instances: states,
        })));
    }
    out.extend(events);
    out
}

/// Sends flow batches to the current session without waiting: a batch
/// that finds no session, or a full queue, is dropped.
pub(super) fn forward_flows(
    mut flows: mpsc::Receiver<ironmesh_proto::v1::FlowBatch>,
    session: watch::Receiver<Option<mpsc::Sender<AgentMessage>>>,
) {
    tokio::spawn(async move {
        while let Some(batch) = flows.recv().await {
            let tx = session.borrow().clone();
            if let Some(tx) = tx {
                let _ = tx.try_send(msg(agent_message::Msg::Flows(batch)));
            }
        }
    });
}

fn observe(
    metrics: &AgentMetrics,
    known: &mut HashMap<String, (InstancePhase, u32)>,
    r: &SupervisorReport,
) {
    use crate::metrics::{PhaseLabel, ReasonLabel};
    match r {
        SupervisorReport::State(st) => {
            let before = known.insert(st.name.clone(), (st.phase(), st.restarts));
            if let Some((_, restarts)) = &before {
                if st.restarts > *restarts {
                    metrics.restarts.inc_by(u64::from(st.restarts - restarts));
                }
            }
            let mut counts: HashMap<InstancePhase, i64> = HashMap::new();
            for (phase, _) in known.values() {
                *counts.entry(*phase).or_default() += 1;
            }
            for phase in [
                InstancePhase::Pending,
                InstancePhase::Running,
                InstancePhase::Succeeded,
                InstancePhase::Failed,
            ] {
                metrics
                    .instances
                    .get_or_create(&PhaseLabel {
                        phase: phase.name().to_string(),
                    })
                    .set(counts.get(&phase).copied().unwrap_or(0));
            }
        }
        SupervisorReport::Event(ev) => {
            if ev.reason == "Deleted" {
                known.remove(&ev.instance);
            }
            metrics
                .events
                .get_or_create(&ReasonLabel {
                    reason: ev.reason.clone(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironmesh_proto::v1::{Heartbeat, InstanceEvent};
    use tokio_stream::StreamExt;

    fn state(name: &str, phase: InstancePhase) -> SupervisorReport {
        SupervisorReport::State(InstanceState {
            name: name.into(),
            phase: phase.into(),
            ..Default::default()
        })
    }

    fn event(name: &str, reason: &str) -> SupervisorReport {
        SupervisorReport::Event(InstanceEvent {
            instance: name.into(),
            reason: reason.into(),
            ..Default::default()
        })
    }

    #[test]
    fn ten_starts_are_one_report_and_the_events_in_order() {
        let mut batch = Vec::new();
        for i in 0..10 {
            batch.push(state(&format!("i{i}"), InstancePhase::Pending));
            batch.push(event(&format!("i{i}"), "Started"));
            batch.push(state(&format!("i{i}"), InstancePhase::Running));
        }
        let out = batch_messages(batch);
        assert_eq!(out.len(), 11);
        let Some(agent_message::Msg::Instances(report)) = &out[0].msg else {
            panic!("first message is not the report: {:?}", out[0]);
        };
        assert!(!report.full);
        let names: Vec<&str> = report.instances.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, (0..10).map(|i| format!("i{i}")).collect::<Vec<_>>());
        assert!(
            report
                .instances
                .iter()
                .all(|s| s.phase() == InstancePhase::Running),
            "the last state wins"
        );
        for (i, m) in out[1..].iter().enumerate() {
            assert!(
                matches!(&m.msg, Some(agent_message::Msg::Event(ev)) if ev.instance == format!("i{i}")),
                "{m:?}"
            );
        }
    }

    #[test]
    fn only_events_send_no_report() {
        let out = batch_messages(vec![event("a", "Pulled")]);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0].msg, Some(agent_message::Msg::Event(_))));
    }

    #[tokio::test]
    async fn control_goes_first_and_a_full_log_lane_does_not_hold_it() {
        let (lanes, mut stream) = lanes();
        let log = |i: u8| {
            msg(agent_message::Msg::Log(ironmesh_proto::v1::LogChunk {
                request_id: 1,
                data: vec![i],
                ..Default::default()
            }))
        };
        for i in 0..LOG_LANE as u8 {
            lanes.logs.try_send(log(i)).unwrap();
        }
        assert!(lanes.logs.try_send(log(0)).is_err(), "the log lane is full");
        lanes
            .state
            .try_send(msg(
                agent_message::Msg::Instances(InstanceReport::default()),
            ))
            .unwrap();
        lanes
            .control
            .try_send(msg(agent_message::Msg::Heartbeat(Heartbeat::default())))
            .unwrap();
        let first = stream.next().await.unwrap();
        assert!(matches!(first.msg, Some(agent_message::Msg::Heartbeat(_))));
        let second = stream.next().await.unwrap();
        assert!(matches!(second.msg, Some(agent_message::Msg::Instances(_))));
        let third = stream.next().await.unwrap();
        assert!(matches!(third.msg, Some(agent_message::Msg::Log(_))));
        // The stream ends with the control lane, whatever else is queued.
        drop(lanes.control);
        assert!(stream.next().await.is_none());
    }
}
