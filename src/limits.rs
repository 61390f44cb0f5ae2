//! Per-client limits against hostile or broken clients: open streams per IP
//! and publish rates per token and per IP.
//!
//! Stream slots are counted like the global connection semaphore: taken
//! before the stream starts, released when its body ends. Publish rates are
//! GCRA limiters (`governor`) keyed by IP and by token hash, answered with
//! `429` + `Retry-After`. Keyed limiters grow with the number of keys, so
//! `sweep` drops idle keys periodically.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use crate::config::LimitsConfig;

/// Limits shared by every request.
pub struct ClientLimits {
    per_ip_streams: usize,
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// `None` when `limits.publish_rate_per_ip` is 0 (off, the default).
    by_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// `None` when `limits.publish_rate_per_token` is 0 (off, the default).
    by_token: Option<DefaultKeyedRateLimiter<u64>>,
    clock: DefaultClock,
}

/// A publish refused for its rate: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub retry_after: Duration,
    /// `(events, burst)` when a batch holds more events than the burst
    /// allows at once: it can never pass, whatever the wait.
    pub over_burst: Option<(u32, u32)>,
}

impl ClientLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        // 0 means no limit: the main publisher is one backend address
        // that must publish at full speed; limits are for publish routes
        // exposed to browsers.
        let quota = |per_second: u32| {
            let rate = NonZeroU32::new(per_second)?;
            let burst = NonZeroU32::new(config.publish_burst).unwrap_or(NonZeroU32::MIN);
            Some(Quota::per_second(rate).allow_burst(burst))
        };
        Self {
            per_ip_streams: config.max_connections_per_ip,
            streams: Arc::default(),
            by_ip: quota(config.publish_rate_per_ip).map(RateLimiter::keyed),
            by_token: quota(config.publish_rate_per_token).map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Takes a stream slot for `ip`, or `None` when it has too many open.
    pub fn stream_slot(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut streams = self.streams.lock();
        let open = streams.entry(ip).or_default();
        if *open >= self.per_ip_streams {
            return None;
        }
        *open += 1;
        Some(IpSlot {
            streams: Arc::clone(&self.streams),
            ip,
        })
    }

    /// Counts one publish against the IP and (if any) the token.
    pub fn publish(&self, ip: IpAddr, token: Option<u64>) -> Result<(), RateLimited> {
        let wait = |not_until: governor::NotUntil<_>| RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
            over_burst: None,
        };
        if let Some(by_ip) = &self.by_ip {
            by_ip.check_key(&ip).map_err(wait)?;
        }
        if let (Some(by_token), Some(token)) = (&self.by_token, token) {
            by_token.check_key(&token).map_err(wait)?;
        }
        Ok(())
    }

    /// Counts `n` more publishes against the IP and (if any) the token: the
    /// events of a batch beyond the one [`publish`](Self::publish) counted
    /// for its request, so a batch of 100 costs what 100 publishes cost.
    pub fn publish_more(&self, ip: IpAddr, token: Option<u64>, n: u32) -> Result<(), RateLimited> {
        let Some(more) = NonZeroU32::new(n) else {
            return Ok(());
        };
        let refused = |outcome: Result<Result<(), governor::NotUntil<_>>, _>| match outcome {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(RateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                over_burst: None,
            }),
            Err(governor::InsufficientCapacity(burst)) => Some(RateLimited {
                retry_after: Duration::from_secs(1),
                over_burst: Some((n.saturating_add(1), burst)),
            }),
        };
        if let Some(by_ip) = &self.by_ip {
            if let Some(limited) = refused(by_ip.check_key_n(&ip, more)) {
                return Err(limited);
            }
        }
        if let (Some(by_token), Some(token)) = (&self.by_token, token) {
            if let Some(limited) = refused(by_token.check_key_n(&token, more)) {
                return Err(limited);
            }
        }
        Ok(())
    }

    /// Forgets limiter state of idle keys (bounded memory).
    pub fn sweep(&self) {
        if let Some(by_ip) = &self.by_ip {
            by_ip.retain_recent();
            by_ip.shrink_to_fit();
        }
        if let Some(by_token) = &self.by_token {
            by_token.retain_recent();
            by_token.shrink_to_fit();
        }
    }
}

/// One open stream of one IP; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock();
        if let Some(open) = streams.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_slots_per_ip() {
        let config = LimitsConfig {
            max_connections_per_ip: 2,
            ..LimitsConfig::default()
        };
        let limits = ClientLimits::new(&config);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = limits.stream_slot(a).unwrap();
        let _second = limits.stream_slot(a).unwrap();
        assert!(limits.stream_slot(a).is_none());
        assert!(limits.stream_slot(b).is_some());
        drop(first);
        assert!(limits.stream_slot(a).is_some());
    }

    #[test]
    fn publish_rate_per_ip_and_token() {
        let config = LimitsConfig {
            publish_rate_per_ip: 1,
            publish_rate_per_token: 1,
            publish_burst: 2,
            ..LimitsConfig::default()
        };
        let limits = ClientLimits::new(&config);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(limits.publish(ip, None).is_ok());
        assert!(limits.publish(ip, None).is_ok());
        let refused = limits.publish(ip, None).unwrap_err();
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1)
        );
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limits.publish(other, Some(7)).is_ok());
        assert!(limits.publish("10.0.0.3".parse().unwrap(), Some(7)).is_ok());
        assert!(
            limits
                .publish("10.0.0.4".parse().unwrap(), Some(7))
                .is_err(),
            "token limit spans IPs"
        );
    }
}
