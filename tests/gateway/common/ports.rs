//! Loopback ports that stay ours between a process's death and its restart.
//!
//! A port picked with `bind(":0")` comes from the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`), the same range every outgoing
//! connection's local port and every other `:0` bind draws from. Once the
//! gateway (or Redis) that held it is killed, any of the hundreds of
//! connections the other tests open may take it before the restart binds it
//! again: a test that restarts "on the same port" then fails for a reason
//! that has nothing to do with what it checks.
//!
//! So ports that must survive a restart come from below the ephemeral range,
//! where the kernel never hands one out on its own: only an explicit bind
//! can take them. Each test process walks its own stretch of that range
//! (offset by its pid) and checks every port by binding it first, so another
//! process on a fixed port is skipped. A Redis Cluster node also needs its
//! bus port, `port + 10000`, which the range below keeps out of the
//! ephemeral range too.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out (above the registered services people run
/// on developer machines: 5432, 6379, 8080, 9090…).
const LOWEST: u32 = 10_000;
/// Cluster bus ports are `port + 10000`.
const BUS_OFFSET: u32 = 10_000;

/// Next candidate, as an offset into the range; starts at a pid-derived
/// point so two test processes at once rarely walk the same ports.
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A loopback port outside the ephemeral range, free when returned, whose
/// `+10000` bus port is free and outside that range too.
pub fn free_port() -> u16 {
    let ephemeral_low = ephemeral_range_start();
    // Both the port and its bus port stay below the ephemeral range.
    let span = ephemeral_low.saturating_sub(LOWEST + BUS_OFFSET).max(1);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = LOWEST + offset;
        let (Ok(port), Ok(bus)) = (u16::try_from(port), u16::try_from(port + BUS_OFFSET)) else {
            continue;
        };
        if bindable(port) && bindable(bus) {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range ({ephemeral_low})");
}

/// `127.0.0.1:<a free port>` for a gateway that will be restarted on it.
pub fn restartable_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The first port of the kernel's ephemeral range (32768 when unreadable,
/// Linux's default).
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[test]
fn ports_are_outside_the_ephemeral_range_distinct_and_bindable() {
    let low = ephemeral_range_start();
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ports.len(),
        "a port handed out twice: {ports:?}"
    );
    for port in ports {
        assert!(
            u32::from(port) + BUS_OFFSET < low,
            "{port} (+{BUS_OFFSET}) is not below {low}"
        );
        assert!(bindable(port), "{port} is not free");
    }
}
