//! One instance's network, brought up in a task of its own while the
//! instance task ensures the image and creates the container: the
//! namespace has to exist when the task is created, the datapath has to be
//! attached when it starts, and neither needs to wait for the other steps.
//!
//! It makes one attempt; retries with back-off and the reporting of
//! failures stay with the instance task.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::InstanceNetworking;

/// How far the network has to be for the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Namespace, interfaces and address: before the task is created.
    Namespace,
    /// Everything, datapath included: before the task starts.
    Attached,
}

/// What the bring-up task has done so far.
#[derive(Debug, Clone)]
enum Progress {
    Working,
    /// `setup` succeeded; `attach` runs.
    Namespace(Ipv4Addr, PathBuf),
    /// Both succeeded, or the first error.
    Done(Result<(Ipv4Addr, PathBuf), String>),
}

/// Where a stage wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reached {
    /// The namespace is there (address, path); attaching goes on.
    Namespace(Ipv4Addr, PathBuf),
    /// The bring-up is over, with its outcome.
    Done(Result<(Ipv4Addr, PathBuf), String>),
}

/// A running bring-up. Drop it only once it is done, or after
/// [`Bringup::finish`]: the removal of an instance must not race it.
pub(crate) struct Bringup {
    progress: watch::Receiver<Progress>,
    task: JoinHandle<()>,
}

impl Bringup {
    /// Starts `setup` then `attach` for `instance`.
    pub(crate) fn spawn(net: Arc<dyn InstanceNetworking>, instance: String) -> Bringup {
        let (tx, progress) = watch::channel(Progress::Working);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = async {
                let (ip, netns) = net.setup(&instance).await?;
                let ns_ms = started.elapsed().as_millis() as u64;
                tx.send_replace(Progress::Namespace(ip, netns.clone()));
                net.attach(&instance).await?;
                tracing::debug!(
                    instance,
                    %ip,
                    namespace_ms = ns_ms,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "instance network brought up"
                );
                Ok::<_, String>((ip, netns))
            }
            .await;
            tx.send_replace(Progress::Done(result));
        });
        Bringup { progress, task }
    }

    /// Waits until the bring-up has reached `stage` or ended.
    pub(crate) async fn reached(&mut self, stage: Stage) -> Reached {
        let got = self
            .progress
            .wait_for(|p| match p {
                Progress::Working => false,
                Progress::Namespace(..) => stage == Stage::Namespace,
                Progress::Done(_) => true,
            })
            .await
            .map(|p| p.clone());
        match got {
            Ok(Progress::Namespace(ip, netns)) => Reached::Namespace(ip, netns),
            Ok(Progress::Done(result)) => Reached::Done(result),
            // The task ended without a word: it panicked.
            Ok(Progress::Working) | Err(_) => {
                Reached::Done(Err("the network setup task ended unexpectedly".to_string()))
            }
        }
    }

    /// The address and namespace, if they are there already.
    pub(crate) fn namespace(&self) -> Option<(Ipv4Addr, PathBuf)> {
        match &*self.progress.borrow() {
            Progress::Namespace(ip, netns) | Progress::Done(Ok((ip, netns))) => {
                Some((*ip, netns.clone()))
            }
            Progress::Working | Progress::Done(Err(_)) => None,
        }
    }

    /// Lets a bring-up still under way finish (it is short and not safe to
    /// cut midway: a half-made network would race its teardown).
    pub(crate) async fn finish(self) {
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the network setup task failed");
        }
    }
}
