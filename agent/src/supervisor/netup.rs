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

/// What the bring-up task has done so far.
#[derive(Debug, Clone)]
enum Progress {
    Working,
    /// `setup` succeeded; `attach` runs.
    Namespace(Ipv4Addr, PathBuf),
    /// Both succeeded, or the first error.
    Done(Result<(Ipv4Addr, PathBuf), String>),
}

/// What a bring-up task that ended without a word (a panic) leaves.
const ENDED: &str = "the network setup task ended unexpectedly";

/// Where a wait for the namespace ended.
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
                net.attach(&instance, ip).await?;
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

    /// Waits until the namespace is there (enough to create the task) or
    /// the bring-up has ended.
    pub(crate) async fn namespace(&mut self) -> Reached {
        let reached = self
            .wait(|p| match p {
                Progress::Working => None,
                Progress::Namespace(ip, netns) => Some(Reached::Namespace(*ip, netns.clone())),
                Progress::Done(result) => Some(Reached::Done(result.clone())),
            })
            .await;
        reached.unwrap_or_else(|| Reached::Done(Err(ENDED.to_string())))
    }

    /// Waits until the bring-up has ended (enough to start the task).
    pub(crate) async fn done(&mut self) -> Result<(Ipv4Addr, PathBuf), String> {
        let done = self
            .wait(|p| match p {
                Progress::Done(result) => Some(result.clone()),
                Progress::Working | Progress::Namespace(..) => None,
            })
            .await;
        done.unwrap_or_else(|| Err(ENDED.to_string()))
    }

    /// The first progress `pick` takes; None if the task is gone first.
    async fn wait<T>(&mut self, pick: impl Fn(&Progress) -> Option<T>) -> Option<T> {
        loop {
            if let Some(t) = pick(&self.progress.borrow_and_update()) {
                return Some(t);
            }
            if self.progress.changed().await.is_err() {
                return pick(&self.progress.borrow());
            }
        }
    }

    /// The address and namespace, if they are there already.
    pub(crate) fn peek(&self) -> Option<(Ipv4Addr, PathBuf)> {
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
