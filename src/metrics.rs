//! Prometheus metrics: one registry per app instance, typed handles.
//!
//! A registry per `AppState` (no process-global recorder) so several gateways
//! in one test binary never share counters. Names follow the Prometheus
//! conventions: `sse_gateway_…_total` counters, `_seconds` histograms.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::process_memory::{self, HeapReader};

/// A metric's label pairs.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Open SSE streams by mode (`topic` = `/topics/{t}`, `events` = `/events`).
    pub streams_open: Family<Labels, Gauge>,
    /// Open client connections by protocol (`http1`, `h2`): over HTTP/2
    /// many streams share one.
    pub connections_open: Family<Labels, Gauge>,
    /// SSE streams accepted, by mode.
    pub streams_total: Family<Labels, Counter>,
    /// Streams refused with `200` + `retry:` + close, by reason.
    pub streams_shed: Family<Labels, Counter>,
    pub events_published: Counter,
    /// Event frames written to subscribers (replay and live).
    pub events_delivered: Counter,
    /// Batches read from the log for replay or catch-up.
    pub replay_reads: Counter,
    pub replay_events: Counter,
    /// Times a subscriber fell off the live ring and caught up from the log.
    pub lag_fallbacks: Counter,
    /// Replay reads that waited for the gateway-wide read budget.
    pub replay_budget_waits: Counter,
    /// `reset` blocks sent, by reason.
    pub resets: Family<Labels, Counter>,
    /// Publish handling time, from a complete body to the durable ack.
    pub publish_duration: Histogram,
    /// From an event becoming durable on this node to its frame being handed
    /// to a subscriber's connection (live path; observed once per write).
    pub delivery_latency: Histogram,
    /// One group commit: batch write plus fsync.
    pub commit_duration: Histogram,
    pub commit_batch_events: Histogram,
    pub storage_bytes: Gauge,
    pub log_head: Gauge,
    /// Redis: how far this node's tail is behind (the delivery probe's
    /// append-to-arrival time, or the age of the oldest probe not back yet),
    /// the worst of the open logs; 0 with sled (no tail) or probing off.
    pub tail_lag: Gauge<f64, AtomicU64>,
    /// The process's memory, refreshed by [`Metrics::refresh_memory`].
    memory: MemoryGauges,
    /// Logs open on this node (the default one, plus each org's with
    /// tenancy on Redis; idle org logs close).
    pub open_logs: Gauge,
}

/// The process's memory: its resident set where the platform says it, and
/// the allocator's counts when the binary supplied a [`HeapReader`]. A
/// figure that cannot be read is not exported, rather than exported as 0.
struct MemoryGauges {
    process_resident: Option<Gauge>,
    heap: Option<(HeapReader, HeapGauges)>,
}

struct HeapGauges {
    allocated: Gauge,
    active: Gauge,
    resident: Gauge,
    retained: Gauge,
}

impl MemoryGauges {
    fn register(registry: &mut Registry, heap: Option<HeapReader>) -> Self {
        let process_resident = process_memory::process_resident_bytes().map(|_| {
            let gauge = Gauge::default();
            registry.register(
                "process_resident_bytes",
                "Resident set size of the gateway process (what a memory limit sees)",
                gauge.clone(),
            );
            gauge
        });
        let heap = heap.map(|reader| {
            let mut gauge = |name: &str, help: &str| {
                let gauge = Gauge::default();
                registry.register(name, help, gauge.clone());
                gauge
            };
            let gauges = HeapGauges {
                allocated: gauge("heap_allocated_bytes", "Allocator: bytes the program holds"),
                active: gauge(
                    "heap_active_bytes",
                    "Allocator: bytes in pages that hold allocations",
                ),
                resident: gauge(
                    "heap_resident_bytes",
                    "Allocator: resident bytes it maps, freed pages not yet returned included",
                ),
                retained: gauge(
                    "heap_retained_bytes",
                    "Allocator: address space returned to the kernel but kept mapped for reuse",
                ),
            };
            (reader, gauges)
        });
        Self {
            process_resident,
            heap,
        }
    }

    fn refresh(&self) {
        let set = |gauge: &Gauge, bytes: u64| gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if let (Some(gauge), Some(bytes)) = (
            &self.process_resident,
            process_memory::process_resident_bytes(),
        ) {
            set(gauge, bytes);
        }
        if let Some((reader, gauges)) = &self.heap {
            if let Some(reading) = reader() {
                set(&gauges.allocated, reading.allocated);
                set(&gauges.active, reading.active);
                set(&gauges.resident, reading.resident);
                set(&gauges.retained, reading.retained);
            }
        }
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, without allocator
    /// figures.
    pub fn new() -> Self {
        Self::with_heap(None)
    }

    /// Like [`Metrics::new`], exporting the allocator's counts through
    /// `heap` (supplied by the binary that installed the allocator).
    pub fn with_heap(heap: Option<HeapReader>) -> Self {
        let mut registry = Registry::with_prefix("sse_gateway");
        let streams_open = Family::<Labels, Gauge>::default();
        let streams_total = Family::<Labels, Counter>::default();
        let connections_open = Family::<Labels, Gauge>::default();
        let streams_shed = Family::<Labels, Counter>::default();
        let events_published = Counter::default();
        let events_delivered = Counter::default();
        let replay_reads = Counter::default();
        let replay_events = Counter::default();
        let lag_fallbacks = Counter::default();
        let replay_budget_waits = Counter::default();
        let resets = Family::<Labels, Counter>::default();
        let publish_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let commit_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let delivery_latency = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        let commit_batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let storage_bytes = Gauge::default();
        let log_head = Gauge::default();
        let tail_lag = Gauge::<f64, AtomicU64>::default();
        let open_logs = Gauge::default();

        registry.register(
            "streams_open",
            "Open SSE streams by mode",
            streams_open.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections by protocol (http1, h2)",
            connections_open.clone(),
        );
        registry.register(
            "streams",
            "SSE streams accepted by mode",
            streams_total.clone(),
        );
        registry.register(
            "streams_shed",
            "SSE streams shed with retry and close, by reason",
            streams_shed.clone(),
        );
        registry.register(
            "events_published",
            "Events made durable",
            events_published.clone(),
        );
        registry.register(
            "events_delivered",
            "Event frames written to subscribers",
            events_delivered.clone(),
        );
        registry.register(
            "replay_reads",
            "Batches read from the log for replay or catch-up",
            replay_reads.clone(),
        );
        registry.register(
            "replay_events",
            "Events read from the log for replay or catch-up",
            replay_events.clone(),
        );
        registry.register(
            "lag_fallbacks",
            "Subscribers that fell behind the live ring and caught up from the log",
            lag_fallbacks.clone(),
        );
        registry.register(
            "replay_budget_waits",
            "Replay reads that waited for limits.replay_read_budget_bytes",
            replay_budget_waits.clone(),
        );
        registry.register("resets", "reset blocks sent, by reason", resets.clone());
        registry.register(
            "publish_duration_seconds",
            "Publish time from complete body to durable ack",
            publish_duration.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Live delivery latency: durable on this node to handed to a subscriber connection",
            delivery_latency.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Group commit write and fsync time",
            commit_duration.clone(),
        );
        registry.register(
            "commit_batch_events",
            "Events per group commit",
            commit_batch_events.clone(),
        );
        registry.register(
            "storage_bytes",
            "Bytes the log takes on disk",
            storage_bytes.clone(),
        );
        registry.register(
            "log_head_sequence",
            "Newest durable sequence",
            log_head.clone(),
        );
        registry.register(
            "tail_lag_seconds",
            "Redis: time from a delivery probe's append to its arrival through this node's tail (or the age of the oldest probe not back), worst open log",
            tail_lag.clone(),
        );
        let memory = MemoryGauges::register(&mut registry, heap);
        registry.register(
            "open_logs",
            "Logs open on this node (with tenancy on Redis: the default log plus each org's that is in use)",
            open_logs.clone(),
        );

        Self {
            registry,
            streams_open,
            connections_open,
            streams_total,
            streams_shed,
            events_published,
            events_delivered,
            replay_reads,
            replay_events,
            lag_fallbacks,
            replay_budget_waits,
            resets,
            publish_duration,
            delivery_latency,
            commit_duration,
            commit_batch_events,
            storage_bytes,
            log_head,
            tail_lag,
            memory,
            open_logs,
        }
    }

    /// Reads the process's memory into its gauges (at scrape time: a
    /// reading costs a file read and a jemalloc epoch, not worth a timer).
    pub fn refresh_memory(&self) {
        self.memory.refresh();
    }

    /// Records one group commit.
    pub fn record_commit(&self, events: usize, took: Duration) {
        self.events_published.inc_by(events as u64);
        self.commit_batch_events.observe(events as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }

    /// The label set for a stream mode or reason.
    pub fn label(name: &'static str, value: &'static str) -> Labels {
        vec![(name, value)]
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
