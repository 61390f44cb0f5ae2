//! The Redis log's age trimmer, for quiet logs.
//!
//! Appends trim as part of the `append` script (count and age), so a log
//! that is published to never needs this; one that has gone quiet still
//! loses its old events on time. The trim itself is the script's `trim`
//! operation (`migrations/redis/`), atomic like every other.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::shared::Shared;

/// Age retention for quiet logs (appends also trim, as part of the script).
pub(super) async fn run_trimmer(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.options.trim_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
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
