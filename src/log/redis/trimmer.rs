//! The Redis log's age trimmer, for quiet logs.
//!
//! Appends trim as part of the `append` script (count and age), so a log
//! that is published to never needs this; one that has gone quiet still
//! loses its old events on time. The trim itself is the script's `trim`
//! operation (`migrations/redis/`), atomic like every other.
//!
//! The trimmers of all the logs open on a node share one budget per
//! `retention.trim_interval_ms`, as the probes do (see `probe`): with more
//! than 100 logs open (one per org with tenancy) each runs less often, so
//! 2,000 quiet org logs cost 100 calls per interval, not 2,000.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::probe::{stretched, Running};
use super::shared::Shared;

/// Age retention for quiet logs (appends also trim, as part of the script).
pub(super) async fn run_trimmer(shared: Arc<Shared>, stop: CancellationToken) {
    let _running = Running::start(&shared.clients.trimmers);
    loop {
        let every = stretched(
            shared.options.trim_interval,
            shared.clients.trimmers.load(Ordering::Relaxed),
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if shared.failure().is_some() {
            return;
        }
        let mut conn = match shared.clients.shared().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "retention pass skipped");
                continue;
            }
        };
        let pass: Result<u64, _> = shared
            .script
            .key(&shared.log_key)
            .arg("trim")
            .arg(shared.epoch.as_str())
            .arg(shared.options.retention.max_age.as_millis() as u64)
            .arg(shared.options.retention.batch_events)
            .invoke_async(&mut conn)
            .await;
        match pass {
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(removed, log = %shared.log_key, "retention trimmed events")
            }
            Err(e) => {
                shared.clients.broken(&e);
                tracing::debug!(error = %e, log = %shared.log_key, "retention pass failed");
            }
        }
    }
}
