//! The "Guarantees" of API.md under load: no gap, no duplicate, in order
//! across the replay→live switch while publishes race; multi-topic streams;
//! slow subscribers that lose nothing and block nobody; retention resets;
//! write-stall closing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// Publishes `count` events from `publishers` concurrent keep-alive clients,
/// each to the topic `pick(i)` picks; returns every acked id with its topics.
async fn publish_concurrently(
    server: &TestServer,
    publishers: usize,
    count: usize,
    pad: usize,
    pick: fn(usize) -> Vec<&'static str>,
) -> Vec<(String, Vec<&'static str>)> {
    let filler = Arc::new("x".repeat(pad));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let client = server.client.clone();
        let url = server.url("/publish");
        let filler = Arc::clone(&filler);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in (p..count).step_by(publishers) {
                let topics = pick(i);
                let body =
                    json!({"topics": topics, "event": "n", "data": {"i": i, "pad": *filler}})
                        .to_string();
                let (status, answer) = post_raw(&client, &url, body).await;
                assert_eq!(status, 201, "{answer}");
                acked.push((answer["id"].as_str().unwrap().to_owned(), topics));
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by_key(|(id, _)| seq_of(id));
    all
}

/// Reads `expected` events and asserts they are exactly those ids, in order.
async fn assert_exactly(stream: &mut SseReader, expected: &[String], who: &str) {
    let mut got = Vec::with_capacity(expected.len());
    while got.len() < expected.len() {
        match stream.next_event_within(WAIT).await {
            Some(event) => got.push(event.id),
            None => break,
        }
    }
    let seen: HashSet<&String> = got.iter().collect();
    assert_eq!(seen.len(), got.len(), "{who}: duplicates in {got:?}");
    assert_eq!(
        got,
        expected,
        "{who}: got {} of {} events",
        got.len(),
        expected.len()
    );
    stream.expect_no_event(Duration::from_millis(100)).await;
}

async fn race(live_buffer: usize) {
    let server = Arc::new(TestServer::start(|c| c.stream.live_buffer_events = live_buffer).await);
    const EVENTS: usize = 600;
    // Subscribers join at staggered moments while four publishers run.
    let mut subscribers = Vec::new();
    for s in 0..12 {
        let server = Arc::clone(&server);
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * s)).await;
            let path = if s % 2 == 0 {
                "/topics/a?last_event_id=0"
            } else {
                "/events?topic=a&topic=b&last_event_id=0"
            };
            (s, server.subscribe(path, None).await)
        }));
    }
    let acked = publish_concurrently(&server, 4, EVENTS, 0, |i| match i % 3 {
        0 => vec!["a"],
        1 => vec!["b"],
        _ => vec!["a", "b"],
    })
    .await;
    let in_a: Vec<String> = acked
        .iter()
        .filter(|(_, t)| t.contains(&"a"))
        .map(|(id, _)| id.clone())
        .collect();
    let in_ab: Vec<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    for subscriber in subscribers {
        let (s, mut stream) = subscriber.await.unwrap();
        let expected = if s % 2 == 0 { &in_a } else { &in_ab };
        assert_exactly(&mut stream, expected, &format!("subscriber {s}")).await;
    }
    if live_buffer < 16 {
        // The point of the tiny ring: subscribers did fall off it and were
        // served from the log, so the guarantees above held on that path.
        let metrics = metrics_text(&server.client, &server.base).await;
        let fallbacks = metric_value(&metrics, "sse_gateway_lag_fallbacks_total");
        assert!(fallbacks > 0.0, "the lag path ran: {fallbacks}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_subscribers_from_zero_get_every_event_exactly_once_in_order() {
    race(4096).await;
}

/// The same race with a tiny live ring, so subscribers fall off it and catch
/// up from the log mid-race: the lag path must keep the same guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_subscribers_with_a_tiny_live_ring_still_get_everything_once() {
    race(4).await;
}

#[tokio::test]
async fn an_event_in_two_subscribed_topics_arrives_once_and_ids_increase() {
    let server = TestServer::start(|_| {}).await;
    let mut live = server
        .subscribe("/events?topic=a&topic=b&topic=a", None)
        .await;
    live.until_blocks(2).await;
    let both = server
        .post_raw(
            "/publish",
            json!({"topics": ["a", "b"], "data": 1}).to_string(),
        )
        .await;
    assert_eq!(both.0, 201);
    let only_c = server.publish("c", "e", json!(2)).await;
    let only_b = server.publish("b", "e", json!(3)).await;
    let only_a = server.publish("a", "e", json!(4)).await;
    let expected = vec![
        both.1["id"].as_str().unwrap().to_owned(),
        only_b.clone(),
        only_a.clone(),
    ];
    assert!(seq_of(&only_c) < seq_of(&only_b));
    assert_exactly(&mut live, &expected, "live").await;
    let mut replay = server.subscribe("/events?topic=b&topic=a", Some("0")).await;
    assert_exactly(&mut replay, &expected, "replay").await;
    let events = server
        .subscribe("/events?topic=b&topic=a", Some("0"))
        .await
        .take(3)
        .await;
    assert!(events
        .windows(2)
        .all(|w| seq_of(&w[0].id) < seq_of(&w[1].id)));
}

/// A raw HTTP/1.1 SSE client that reads only when asked: with a tiny receive
/// buffer, a subscriber that is not reading really is slow for the server.
struct RawSse {
    conn: RawConn,
    parser: SseParser,
    in_body: bool,
    queue: std::collections::VecDeque<SseEvent>,
}

impl RawSse {
    async fn connect(server: &TestServer, path: &str, last_event_id: Option<&str>) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut conn = RawConn::from_tcp(socket.connect(server.addr).await.unwrap());
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        conn.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{resume}\r\n"
        ))
        .await;
        Self {
            conn,
            parser: SseParser::default(),
            in_body: false,
            queue: Default::default(),
        }
    }

    async fn next(&mut self) -> SseEvent {
        if !self.in_body {
            let head = self.conn.head().await;
            assert_eq!((head.version.as_str(), head.status), ("HTTP/1.1", 200));
            assert_eq!(head.headers["transfer-encoding"], "chunked");
            self.in_body = true;
        }
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            let chunk = self.conn.chunk().await;
            assert!(!chunk.is_empty(), "server closed the stream");
            let events = self.parser.feed(&chunk);
            self.queue.extend(events);
        }
    }

    async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    /// Every event up to and including the one with id `last`.
    async fn until_id(&mut self, last: &str) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while events.last().is_none_or(|e: &SseEvent| e.id != last) {
            events.push(self.next().await);
        }
        events
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_loses_nothing_and_blocks_no_publisher() {
    const EVENTS: usize = 3000;
    let server = TestServer::start(|c| c.stream.live_buffer_events = 64).await;
    let mut slow = RawSse::connect(&server, "/topics/t", Some("0")).await;
    let mut reader = server.subscribe("/topics/t", Some("0")).await;
    let started = Instant::now();
    let acked = publish_concurrently(&server, 8, EVENTS, 2000, |_| vec!["t"]).await;
    let publish_time = started.elapsed();
    // All publishes were acked while the slow socket read nothing: publishers
    // were never waiting for it (else this would have hung).
    assert_eq!(acked.len(), EVENTS);
    let ids: Vec<String> = acked.into_iter().map(|(id, _)| id).collect();
    assert_exactly(&mut reader, &ids, "reading subscriber").await;
    let events = slow.take(EVENTS).await;
    let got: Vec<String> = events.into_iter().map(|e| e.id).collect();
    assert_eq!(
        got, ids,
        "the slow subscriber gets every event once, in order"
    );
    let metrics = metrics_text(&server.client, &server.base).await;
    let fallbacks = metric_value(&metrics, "sse_gateway_lag_fallbacks_total");
    assert!(
        fallbacks >= 1.0,
        "the slow subscriber fell back to the log: {fallbacks}"
    );
    eprintln!("published {EVENTS} events in {publish_time:?} with a silent subscriber attached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_that_takes_nothing_for_write_stall_is_closed() {
    let server = TestServer::start(|c| {
        c.limits.write_stall_ms = 300;
        c.stream.live_buffer_events = 16;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    stalled
        .write_all(b"GET /topics/big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let server_ref = &server;
    eventually("the stream to be counted", || async move {
        server_ref.get_json("/topics/big/info").await.1["subscribers"] == 1
    })
    .await;
    // Enough data to fill every buffer between the gateway and the socket.
    let blob = "x".repeat(60_000);
    for _ in 0..200 {
        server.publish("big", "e", json!(blob)).await;
    }
    eventually("the stalled stream to be closed", || async move {
        server_ref.get_json("/topics/big/info").await.1["subscribers"] == 0
    })
    .await;
    // A healthy subscriber is unaffected and still gets everything.
    let mut healthy = server.subscribe("/topics/big", Some("0")).await;
    let got = healthy.take(200).await;
    assert!(
        got.iter().all(|e| e.data.len() == blob.len() + 2),
        "every event whole"
    );
    assert!(
        got.windows(2)
            .all(|w| seq_of(&w[1].id) == seq_of(&w[0].id) + 1),
        "all 200, in order, none missing"
    );
    drop(stalled);
}

#[tokio::test]
async fn resume_behind_retention_gets_a_reset_then_what_is_retained() {
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 5;
        c.retention.trim_interval_ms = 20;
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(server.publish("t", "e", json!(i)).await);
    }
    let server_ref = &server;
    eventually("retention to trim to 5", || async move {
        server_ref.get_json("/topics/t/info").await.1["count"] == 5
    })
    .await;
    let (_, info) = server.get_json("/topics/t/info").await;
    assert_eq!(info["first_id"], ids[15]);
    assert_eq!(info["last_id"], ids[19]);

    let mut stream = server.subscribe("/topics/t", Some(&ids[2])).await;
    let reset = stream.next_event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(
        reset.json(),
        json!({"reason": "retention", "requested": ids[2], "oldest": ids[15]})
    );
    assert_eq!(reset.id, ids[14], "continues from the newest trimmed id");
    let rest: Vec<String> = stream.take(5).await.into_iter().map(|e| e.id).collect();
    assert_eq!(rest, ids[15..]);

    // The reset's id resumes cleanly; so does the id of the newest trimmed event.
    let mut again = server.subscribe("/topics/t", Some(&reset.id)).await;
    assert_eq!(again.next_event().await.id, ids[15]);
    // `0` means whatever there is: never a reset.
    let mut all = server.subscribe("/topics/t", Some("0")).await;
    let retained: Vec<String> = all.take(5).await.into_iter().map(|e| e.id).collect();
    assert_eq!(retained, ids[15..]);
    assert!(!String::from_utf8_lossy(&all.raw).contains("event: reset"));
    // An id inside the retained range: no reset.
    let mut inside = server.subscribe("/topics/t", Some(&ids[16])).await;
    assert_eq!(inside.next_event().await.id, ids[17]);
}

#[tokio::test]
async fn trimming_another_topic_does_not_reset_this_one() {
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 3;
        c.retention.trim_interval_ms = 20;
    })
    .await;
    let keep = server.publish("quiet", "e", json!("keep")).await;
    for i in 0..10 {
        server.publish("busy", "e", json!(i)).await;
    }
    let server_ref = &server;
    eventually("busy to be trimmed", || async move {
        server_ref.get_json("/topics/busy/info").await.1["count"] == 3
    })
    .await;
    let mut stream = server
        .subscribe("/topics/quiet", Some(&format!("{}-0", epoch_of(&keep))))
        .await;
    let event = stream.next_event().await;
    assert_eq!(
        event.id, keep,
        "no reset: nothing of `quiet` newer than the id was trimmed"
    );
}

/// Issue 15: the highest watermark of a multi-topic stream belongs to one
/// topic; another may still retain older events, and none may be skipped.
#[tokio::test]
async fn a_multi_topic_stream_never_skips_retained_events_of_a_quieter_topic() {
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 3;
        c.retention.trim_interval_ms = 20;
    })
    .await;
    let quiet = server.publish("y", "e", json!("y")).await;
    let mut busy = Vec::new();
    for i in 0..8 {
        busy.push(server.publish("x", "e", json!(i)).await);
    }
    let server_ref = &server;
    eventually("x to be trimmed to 3", || async move {
        server_ref.get_json("/topics/x/info").await.1["count"] == 3
    })
    .await;
    let retained: Vec<String> = std::iter::once(quiet.clone())
        .chain(busy[5..].iter().cloned())
        .collect();

    // `0`: every retained event of every topic, in id order, never a reset.
    let mut all = server.subscribe("/events?topic=x&topic=y", Some("0")).await;
    let got: Vec<String> = all.take(4).await.into_iter().map(|e| e.id).collect();
    assert_eq!(got, retained, "from 0");
    assert!(!String::from_utf8_lossy(&all.raw).contains("event: reset"));

    // From before everything: a reset says x lost events, then all that is retained.
    let start = format!("{}-0", epoch_of(&quiet));
    let mut resumed = server
        .subscribe("/events?topic=x&topic=y", Some(&start))
        .await;
    let reset = resumed.next_event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(
        reset.json(),
        json!({"reason": "retention", "requested": start, "oldest": quiet})
    );
    let got: Vec<String> = resumed.take(4).await.into_iter().map(|e| e.id).collect();
    assert_eq!(got, retained, "after the reset");

    // The reset's id is a safe place to resume: nothing retained is skipped
    // (the notice may repeat; data never goes).
    let mut again = server
        .subscribe("/events?topic=x&topic=y", Some(&reset.id))
        .await;
    let mut got = Vec::new();
    while got.len() < retained.len() {
        let event = again.next_event().await;
        if event.event != "reset" {
            got.push(event.id);
        }
    }
    assert_eq!(got, retained, "resumed from the reset's id");
}

#[tokio::test]
async fn a_multi_topic_event_survives_while_one_of_its_topics_retains_it() {
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 2;
        c.retention.trim_interval_ms = 20;
    })
    .await;
    let shared = server
        .post_raw(
            "/publish",
            json!({"topics": ["a", "b"], "data": "shared"}).to_string(),
        )
        .await
        .1;
    let shared = shared["id"].as_str().unwrap().to_owned();
    for i in 0..5 {
        server.publish("a", "e", json!(i)).await;
    }
    let server_ref = &server;
    eventually("a to be trimmed", || async move {
        server_ref.get_json("/topics/a/info").await.1["count"] == 2
    })
    .await;
    let (_, info_b) = server.get_json("/topics/b/info").await;
    assert_eq!(info_b["count"], 1);
    let mut stream = server.subscribe("/topics/b", Some("0")).await;
    let event = stream.next_event().await;
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (shared.as_str(), "\"shared\"")
    );
}

#[tokio::test]
async fn events_older_than_max_age_are_trimmed_and_resets_say_so() {
    let server = TestServer::start(|c| {
        c.retention.max_age_s = 1;
        c.retention.trim_interval_ms = 50;
    })
    .await;
    let first = server.publish("t", "e", json!(1)).await;
    server.publish("t", "e", json!(2)).await;
    let server_ref = &server;
    eventually("age retention to empty the topic", || async move {
        server_ref.get_json("/topics/t/info").await.1["count"] == 0
    })
    .await;
    let (_, info) = server.get_json("/topics/t/info").await;
    assert_eq!(info["first_id"], serde_json::Value::Null);
    let mut stream = server.subscribe("/topics/t", Some(&first)).await;
    let reset = stream.next_event().await;
    assert_eq!(
        reset.json(),
        json!({"reason": "retention", "requested": first, "oldest": null})
    );
    let live = server.publish("t", "e", json!(3)).await;
    assert_eq!(stream.next_event().await.id, live);
}

/// A subscriber that stops reading while the topic is trimmed past it gets a
/// `reset` mid-stream, then continues from what is retained, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_that_falls_behind_retention_gets_a_reset_mid_stream() {
    const EVENTS: usize = 2000;
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 100;
        c.retention.trim_interval_ms = 10;
        c.stream.live_buffer_events = 16;
        c.stream.replay_batch_events = 32;
    })
    .await;
    let mut slow = RawSse::connect(&server, "/topics/t", None).await;
    let acked = publish_concurrently(&server, 4, EVENTS, 4000, |_| vec!["t"]).await;
    let last = acked.last().unwrap().0.clone();
    let server_ref = &server;
    eventually("trim to 100", || async move {
        server_ref.get_json("/topics/t/info").await.1["count"] == 100
    })
    .await;
    let events = slow.until_id(&last).await;
    let resets: Vec<&SseEvent> = events.iter().filter(|e| e.event == "reset").collect();
    assert!(!resets.is_empty(), "expected a retention reset");
    for reset in &resets {
        assert_eq!(reset.json()["reason"], "retention");
    }
    // Every id, the resets' included, in stream order: each step is either
    // the next event (+1), or a reset that says what was skipped (its id is
    // the newest trimmed one), followed right after that id. So no event is
    // lost without a reset saying so, at every reset, not only the last.
    let ids: Vec<(bool, u64)> = events
        .iter()
        .map(|e| (e.event == "reset", seq_of(&e.id)))
        .collect();
    for pair in ids.windows(2) {
        let ((was_reset, before), (is_reset, now)) = (pair[0], pair[1]);
        match (was_reset, is_reset) {
            (_, true) => assert!(now >= before, "a reset never goes back: {pair:?}"),
            (_, false) => assert_eq!(now, before + 1, "no silent gap: {pair:?}"),
        }
    }
}

/// Issue 15: a slow multi-topic subscriber that falls back to the log while
/// one topic is trimmed past it gets a reset, and still every retained event
/// of the other topic (the cursor never jumps to the busy topic's watermark).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_multi_topic_subscriber_keeps_a_quieter_topics_events_through_a_reset() {
    const EACH: usize = 1000;
    let server = TestServer::start(|c| {
        c.retention.max_events_per_topic = 100;
        c.retention.trim_interval_ms = 10;
        c.stream.live_buffer_events = 16;
        c.stream.replay_batch_events = 32;
    })
    .await;
    let mut slow = RawSse::connect(&server, "/events?topic=x&topic=y", None).await;
    publish_concurrently(&server, 4, EACH, 4000, |_| vec!["x"]).await;
    let quiet = server.publish("y", "e", json!("y")).await;
    let busy = publish_concurrently(&server, 4, EACH, 4000, |_| vec!["x"]).await;
    let last = busy.last().unwrap().0.clone();
    let server_ref = &server;
    eventually("x to be trimmed to 100", || async move {
        server_ref.get_json("/topics/x/info").await.1["count"] == 100
    })
    .await;
    let events = slow.until_id(&last).await;
    assert!(
        events.iter().any(|e| e.event == "reset"),
        "the subscriber fell behind retention, so it was told"
    );
    let data: Vec<&SseEvent> = events.iter().filter(|e| e.event != "reset").collect();
    assert_eq!(
        data.iter().filter(|e| e.id == quiet).count(),
        1,
        "the quiet topic's retained event arrives once"
    );
    assert!(
        data.windows(2).all(|w| seq_of(&w[1].id) > seq_of(&w[0].id)),
        "ids strictly increase"
    );
    let retained: Vec<&String> = busy[busy.len() - 100..].iter().map(|(id, _)| id).collect();
    for id in retained {
        assert!(data.iter().any(|e| &e.id == id), "retained {id} arrives");
    }
}
