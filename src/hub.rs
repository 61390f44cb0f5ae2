//! Live fan-out of durable events to subscribers.
//!
//! One bounded `broadcast` ring shared by all subscribers: the log writer
//! sends each durable event once (its frame already encoded), and a send never
//! waits for a subscriber. A subscriber that falls more than the ring's
//! capacity behind gets `Lagged` and catches up from the log instead (see
//! `subscription`), so a slow client costs a cursor, not a queue.
//!
//! The hub also counts subscribers per topic for `/topics/{topic}/info`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::model::Topic;

/// A durable event as the live fan-out sees it: its SSE frame is encoded once
/// and shared by every subscriber. The hub owns the type so that it depends
/// on nothing but the model; the logs build it when they hand an event over.
#[derive(Debug)]
pub struct LiveEvent {
    /// The event's sequence in its log.
    pub seq: u64,
    /// Every topic it was published to; a subscriber takes it if it wants any.
    pub topics: Vec<Topic>,
    /// The encoded `id:`/`event:`/`data:` block.
    pub frame: Bytes,
    /// When this node saw it durable: the start of its delivery latency.
    pub durable_at: std::time::Instant,
}

/// The shared live feed.
#[derive(Debug)]
pub struct Hub {
    feed: broadcast::Sender<Arc<LiveEvent>>,
    subscribers: Mutex<HashMap<Topic, usize>>,
}

impl Hub {
    /// A hub whose ring holds `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (feed, _) = broadcast::channel(capacity.max(1));
        Self {
            feed,
            subscribers: Mutex::new(HashMap::new()),
        }
    }

    /// Sends a durable event to every live subscriber. Never blocks.
    pub fn publish(&self, event: Arc<LiveEvent>) {
        // An error only means nobody is listening right now.
        let _ = self.feed.send(event);
    }

    /// A receiver that sees every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.feed.subscribe()
    }

    /// Counts a stream as subscribed to `topics` until the guard drops.
    pub fn track(self: &Arc<Self>, topics: &[Topic]) -> SubscriberGuard {
        let mut table = self.subscribers.lock();
        for topic in topics {
            *table.entry(topic.clone()).or_default() += 1;
        }
        SubscriberGuard {
            hub: Arc::clone(self),
            topics: topics.to_vec(),
        }
    }

    /// No stream follows this hub (none subscribed to the feed or counted
    /// on a topic): its log may be closed.
    pub fn is_idle(&self) -> bool {
        self.feed.receiver_count() == 0 && self.subscribers.lock().is_empty()
    }

    /// Streams currently subscribed to `topic`.
    pub fn subscriber_count(&self, topic: &Topic) -> usize {
        self.subscribers.lock().get(topic).copied().unwrap_or(0)
    }
}

/// Keeps a stream counted in [`Hub::subscriber_count`] while alive.
#[derive(Debug)]
pub struct SubscriberGuard {
    hub: Arc<Hub>,
    topics: Vec<Topic>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut table = self.hub.subscribers.lock();
        for topic in &self.topics {
            if let Some(count) = table.get_mut(topic) {
                *count -= 1;
                if *count == 0 {
                    table.remove(topic);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo mutants` (`== 0` → `!= 0` in the guard's drop survived):
    /// the count follows each stream, and a topic nobody follows any more
    /// leaves no entry behind.
    #[test]
    fn a_topic_counts_each_stream_until_its_guard_drops() {
        let hub = Arc::new(Hub::new(16));
        let topic = Topic::parse("t").expect("topic");
        let first = hub.track(std::slice::from_ref(&topic));
        let second = hub.track(std::slice::from_ref(&topic));
        assert_eq!(hub.subscriber_count(&topic), 2);
        drop(first);
        assert_eq!(hub.subscriber_count(&topic), 1);
        drop(second);
        assert_eq!(hub.subscriber_count(&topic), 0);
        assert!(hub.subscribers.lock().is_empty(), "no entry left behind");
    }
}
