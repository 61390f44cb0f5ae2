//! The queue between a log's callers and its one writer (sled's writer
//! thread, Redis's writer task): what goes in, and how callers wait.
//!
//! An append waits for a place when the queue is full (backpressure on
//! publishers: nothing is dropped) and then for the writer's answer, which
//! comes only once the event is durable. Shutdown is one more message, so the
//! writer finishes everything queued before it first.

use tokio::sync::{mpsc, oneshot};

use super::{Appended, LogError, NewEvent};

/// The writer's answer to one append: one outcome per event, or why none was stored.
pub(crate) type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

/// What the writer receives.
pub(crate) enum WriterMsg {
    /// Events committed together (a batch publish is one message, never split).
    Append(Vec<NewEvent>, Reply),
    /// Finish everything queued before this, make it durable, and stop.
    Shutdown(oneshot::Sender<()>),
}

/// An append the writer has taken and not answered yet.
pub(crate) type Pending = (Vec<NewEvent>, Reply);

/// Queues `events` and waits for their outcomes (or the writer's error).
pub(crate) async fn append(
    writer: &mpsc::Sender<WriterMsg>,
    events: Vec<NewEvent>,
) -> Result<Vec<Appended>, LogError> {
    let (reply_tx, reply_rx) = oneshot::channel();
    writer
        .send(WriterMsg::Append(events, reply_tx))
        .await
        .map_err(|_| LogError::Closed)?;
    reply_rx.await.map_err(|_| LogError::Closed)?
}

/// Asks the writer to finish and waits until it has (or is already gone).
pub(crate) async fn shut_down(writer: &mpsc::Sender<WriterMsg>) {
    let (done_tx, done_rx) = oneshot::channel();
    if writer.send(WriterMsg::Shutdown(done_tx)).await.is_ok() {
        let _ = done_rx.await;
    }
}
