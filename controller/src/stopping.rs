//! Ending streams when the controller stops: tonic's graceful shutdown
//! waits for every open stream, and an agent's Sync stream never ends on
//! its own, so each streaming response is cut with a clear status instead.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ironmesh_process::Shutdown;
use tonic::Status;

/// A boxed response stream, as the services return them.
pub type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `s` until `shutdown`, then one `UNAVAILABLE: controller shutting down`
/// and the end. A stream that ends by itself ends as it would.
pub fn until_shutdown<T, S>(s: S, shutdown: Shutdown) -> Boxed<T>
where
    T: Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    type State<T> = (
        Boxed<T>,
        Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    );
    let start: Option<State<T>> = Some((Box::pin(s), Box::pin(shutdown.wait())));
    Box::pin(futures::stream::unfold(start, |state| async move {
        let (mut s, mut stop) = state?;
        tokio::select! {
            biased;
            _ = &mut stop => Some((
                Err(Status::unavailable(ironmesh_proto::SHUTTING_DOWN)),
                None,
            )),
            item = s.next() => item.map(|i| (i, Some((s, stop)))),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_that_never_ends_ends_on_shutdown_with_the_status() {
        let (shutdown, tx) = Shutdown::manual();
        let mut s = until_shutdown(
            futures::stream::iter([Ok(1)]).chain(futures::stream::pending::<Result<i32, Status>>()),
            shutdown,
        );
        assert_eq!(s.next().await.map(|r| r.ok()), Some(Some(1)));
        tx.send(true).unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(2), s.next())
            .await
            .expect("ends promptly");
        let st = end.expect("one last item").unwrap_err();
        assert!(ironmesh_proto::is_shutting_down(&st), "{st:?}");
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_ends_by_itself_adds_nothing() {
        let (shutdown, _tx) = Shutdown::manual();
        let items: Vec<_> = until_shutdown(futures::stream::iter([Ok(1), Ok(2)]), shutdown)
            .map(|r| r.ok())
            .collect()
            .await;
        assert_eq!(items, vec![Some(1), Some(2)]);
    }
}
