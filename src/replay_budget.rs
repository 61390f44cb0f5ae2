//! The gateway-wide budget for replay reads: how many bytes of events all
//! streams together may hold between reading them from the log and handing
//! the encoded chunk to their connection.
//!
//! Each replay read is bounded (`subscription::MAX_CHUNK_BYTES` of events),
//! but nothing bounded how many run at once: 40 clients resuming together
//! meant 40 reads, each holding its events and their encoded copy, and the
//! soak's heap profile showed 10 MB of them at its peak. A stream now
//! reserves its read's worst case here first and gives it back once the
//! chunk is encoded; when the budget is spent, the next read waits for one
//! to finish. The wait depends on storage only (a read, an encode), never on
//! a client: a chunk a slow client has not taken yet is that stream's own
//! bounded buffer, not the budget's, so stalled clients cannot hold replay
//! up for everyone else.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Granularity of the budget (semaphore permits count KiB, so a budget of
/// gigabytes still fits the semaphore's permit count).
const UNIT: usize = 1024;

/// The budget, shared by every stream of the gateway.
pub struct ReplayBudget {
    units: Arc<Semaphore>,
    total_units: usize,
    /// Reads that found the budget spent and waited.
    waits: Counter,
}

/// Bytes of the budget held by one read; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    _units: OwnedSemaphorePermit,
}

impl ReplayBudget {
    /// A budget of `bytes` (at least one unit); `waits` counts reads that waited.
    pub fn new(bytes: usize, waits: Counter) -> Self {
        let total_units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(total_units)),
            total_units,
            waits,
        }
    }

    /// Holds `bytes` of the budget (all of it, if `bytes` is more), waiting
    /// until that much is free. Reads are served first come, first served,
    /// so a large reservation is not starved by small ones. Cancel-safe.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total_units);
        // `units` ≤ total ≤ MAX_PERMITS < u32::MAX.
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        let permit = match Arc::clone(&self.units).try_acquire_many_owned(units) {
            Ok(permit) => permit,
            Err(_) => {
                self.waits.inc();
                Arc::clone(&self.units)
                    .acquire_many_owned(units)
                    .await
                    // The semaphore is never closed.
                    .unwrap_or_else(|_| unreachable!("the replay budget is never closed"))
            }
        };
        Reservation { _units: permit }
    }

    /// Bytes not reserved right now.
    pub fn available_bytes(&self) -> usize {
        self.units.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reservations_never_exceed_the_budget_and_waits_are_counted() {
        let waits = Counter::default();
        let budget = Arc::new(ReplayBudget::new(1024 * 1024, waits.clone()));
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (budget, held, most) = (budget.clone(), held.clone(), most.clone());
                tokio::spawn(async move {
                    let bytes = 256 * 1024 + i * 1000;
                    let _r = budget.reserve(bytes).await;
                    let now = held.fetch_add(bytes, Ordering::SeqCst) + bytes;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    held.fetch_sub(bytes, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= 1024 * 1024, "{most} bytes held at once");
        assert!(most >= 512 * 1024, "reads ran one at a time: {most}");
        assert!(
            waits.get() > 0,
            "32 reads of 256 KiB fit a 1 MiB budget without waiting?"
        );
        assert_eq!(budget.available_bytes(), 1024 * 1024, "all given back");
    }

    #[tokio::test]
    async fn a_read_larger_than_the_whole_budget_takes_all_of_it_and_does_not_hang() {
        let budget = ReplayBudget::new(64 * 1024, Counter::default());
        let all = tokio::time::timeout(Duration::from_secs(1), budget.reserve(10 << 20))
            .await
            .expect("a reservation larger than the budget must not wait forever");
        assert_eq!(budget.available_bytes(), 0);
        drop(all);
        assert_eq!(budget.available_bytes(), 64 * 1024);
    }
}
