//! The Subscribe part of API.md: stream headers, priming id, resume-point
//! precedence, `reset` blocks, keepalives, load shedding and stream age.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn stream_headers_retry_and_priming_id_on_an_empty_log() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/t", None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["cache-control"], "no-store");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    assert!(stream.headers.get("content-encoding").is_none());
    stream.until_blocks(2).await;
    assert!(
        stream.raw.starts_with(b"retry: 250\n"),
        "{}",
        String::from_utf8_lossy(&stream.raw)
    );
    assert_eq!(stream.parser.retry, Some(250));
    // The priming id-only block: `<epoch>-0` on an empty log.
    let primed = stream.parser.last_event_id.clone();
    assert!(primed.ends_with("-0"), "primed with {primed}");
    let id = server.publish("t", "e", json!(1)).await;
    assert_eq!(epoch_of(&id), epoch_of(&primed));
    assert_eq!(stream.next_event().await.id, id);
}

#[tokio::test]
async fn live_only_stream_is_primed_with_the_head_and_skips_history() {
    let server = TestServer::start(|_| {}).await;
    server.publish("t", "old", json!(1)).await;
    let head = server.publish("other", "old", json!(2)).await;
    let mut stream = server.subscribe("/topics/t", None).await;
    stream.until_blocks(2).await;
    assert_eq!(
        stream.parser.last_event_id, head,
        "primed with the log head, whatever the topic"
    );
    let new = server.publish("t", "new", json!(3)).await;
    let event = stream.next_event().await;
    assert_eq!(
        (event.id.as_str(), event.event.as_str(), event.data.as_str()),
        (new.as_str(), "new", "3")
    );
}

#[tokio::test]
async fn a_client_that_drops_before_its_first_event_resumes_from_the_priming_id() {
    let server = TestServer::start(|_| {}).await;
    server.publish("t", "before", json!(0)).await;
    let mut stream = server.subscribe("/topics/t", None).await;
    stream.until_blocks(2).await;
    let primed = stream.parser.last_event_id.clone();
    drop(stream);
    let missed = server.publish("t", "missed", json!(1)).await;
    let mut again = server.subscribe("/topics/t", Some(&primed)).await;
    let event = again.next_event().await;
    assert_eq!((event.id, event.event), (missed, "missed".to_owned()));
}

#[tokio::test]
async fn resume_from_zero_replays_everything_then_goes_live() {
    let server = TestServer::start(|_| {}).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(server.publish("t", "e", json!(i)).await);
    }
    let mut stream = server.subscribe("/topics/t", Some("0")).await;
    let got: Vec<String> = stream.take(5).await.into_iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
    let live = server.publish("t", "e", json!(5)).await;
    assert_eq!(stream.next_event().await.id, live);
    assert!(
        !stream.raw.windows(12).any(|w| w == b"event: reset"),
        "0 never gets a reset"
    );
}

#[tokio::test]
async fn resume_point_precedence_header_then_query_then_alias() {
    let server = TestServer::start(|_| {}).await;
    let a = server.publish("t", "e", json!("a")).await;
    let b = server.publish("t", "e", json!("b")).await;
    let c = server.publish("t", "e", json!("c")).await;

    // Header wins over both query forms.
    let path = format!("/topics/t?last_event_id={a}&lastEventId={a}");
    let mut stream = server.subscribe(&path, Some(&b)).await;
    assert_eq!(stream.next_event().await.id, c);

    // `last_event_id` wins over `lastEventId`.
    let path = format!("/topics/t?lastEventId={b}&last_event_id={a}");
    let mut stream = server.subscribe(&path, None).await;
    assert_eq!(stream.next_event().await.id, b);

    // The alias alone works.
    let mut stream = server
        .subscribe(&format!("/topics/t?lastEventId={b}"), None)
        .await;
    assert_eq!(stream.next_event().await.id, c);

    // An empty header counts as absent: the query is used.
    let mut stream = server
        .subscribe(&format!("/topics/t?last_event_id={a}"), Some(""))
        .await;
    assert_eq!(stream.next_event().await.id, b);

    // Empty everywhere: live only, primed with the head.
    let mut stream = server
        .subscribe("/topics/t?last_event_id=&lastEventId=", Some(""))
        .await;
    stream.until_blocks(2).await;
    assert_eq!(stream.parser.last_event_id, c);
    stream.expect_no_event(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn epoch_dash_zero_means_before_the_first_event() {
    let server = TestServer::start(|_| {}).await;
    let first = server.publish("t", "e", json!(1)).await;
    let zero = format!("{}-0", epoch_of(&first));
    let mut stream = server.subscribe("/topics/t", Some(&zero)).await;
    assert_eq!(stream.next_event().await.id, first);
}

/// Every flavour of unusable id: a reset with reason `unknown_id`, an `id:` at
/// the head, then live events. Never a 400.
#[tokio::test]
async fn unknown_ids_get_a_reset_then_live() {
    let server = TestServer::start(|_| {}).await;
    let first = server.publish("t", "e", json!(1)).await;
    let mut head = server.publish("t", "e", json!(2)).await;
    let epoch = epoch_of(&head).to_owned();
    let ahead = format!("{epoch}-99");
    let padded = format!("{epoch}-01");
    let plus = format!("{epoch}-+1");
    let other_epoch = "someOtherLog-1".to_owned();
    for requested in [
        "garbage",
        "42",
        other_epoch.as_str(),
        ahead.as_str(),
        padded.as_str(),
        plus.as_str(),
        "-1",
    ] {
        let mut stream = server.subscribe("/topics/t", Some(requested)).await;
        assert_eq!(stream.status, 200, "{requested}");
        let reset = stream.next_event().await;
        assert_eq!(reset.event, "reset", "{requested}");
        assert_eq!(reset.id, head, "continues from the head ({requested})");
        assert_eq!(
            reset.json(),
            json!({"reason": "unknown_id", "requested": requested, "oldest": first}),
            "{requested}"
        );
        let live = server.publish("t", "e", json!("live")).await;
        assert_eq!(stream.next_event().await.id, live, "{requested}");
        // The reset's id is a clean resume point: no new reset from it.
        let mut again = server.subscribe("/topics/t", Some(&reset.id)).await;
        assert_eq!(again.next_event().await.id, live);
        head = live;
    }
}

#[tokio::test]
async fn unknown_id_on_an_empty_log_continues_from_epoch_zero() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/t", Some("nope")).await;
    let reset = stream.next_event().await;
    assert_eq!(reset.event, "reset");
    assert!(reset.id.ends_with("-0"));
    assert_eq!(
        reset.json(),
        json!({"reason": "unknown_id", "requested": "nope", "oldest": null})
    );
}

#[tokio::test]
async fn query_ids_are_percent_decoded_and_topics_too() {
    let server = TestServer::start(|_| {}).await;
    let a = server.publish("projects:all", "e", json!(1)).await;
    let b = server.publish("projects:all", "e", json!(2)).await;
    let encoded = a.replace('-', "%2D");
    let mut stream = server
        .subscribe(
            &format!("/topics/projects%3A%61ll?last_event_id={encoded}"),
            None,
        )
        .await;
    assert_eq!(stream.next_event().await.id, b);
}

#[tokio::test]
async fn bad_topics_on_streams_are_400_json() {
    let server = TestServer::start(|_| {}).await;
    for path in [
        "/topics/a%20b",
        "/events",
        "/events?topic=",
        "/events?topic=ok&topic=b%2Fad",
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_topic", "{path}");
    }
    let many: String = (0..65).map(|i| format!("topic=t{i}&")).collect();
    let response = server
        .client
        .get(server.url(&format!("/events?{many}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let sixty_four: String = (0..64).map(|i| format!("topic=t{i}&")).collect();
    let stream = server
        .subscribe(&format!("/events?{sixty_four}"), None)
        .await;
    assert_eq!(stream.status, 200);
}

#[tokio::test]
async fn keepalive_comments_after_heartbeat_of_silence() {
    let server = TestServer::start(|c| c.stream.heartbeat_ms = 100).await;
    let mut stream = server.subscribe("/topics/quiet", None).await;
    eventually_stream(&mut stream, |s| {
        s.parser
            .comments
            .iter()
            .filter(|c| *c == "keepalive")
            .count()
            >= 2
    })
    .await;
    // Events of other topics do not count as this stream's traffic.
    // Read while the other topic is busy (a publish every 30 ms for 600 ms,
    // six heartbeats): keepalives must arrive during it, not only after it.
    let mut other_traffic = server.subscribe("/topics/quiet", None).await;
    for i in 0..20 {
        server.publish("busy", "e", json!(i)).await;
        other_traffic
            .next_event_within(Duration::from_millis(30))
            .await;
    }
    let during = other_traffic
        .parser
        .comments
        .iter()
        .filter(|c| *c == "keepalive")
        .count();
    assert!(
        during >= 2,
        "keepalives while another topic was busy: {during}"
    );
}

async fn eventually_stream(stream: &mut SseReader, check: impl Fn(&SseReader) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check(stream) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached: {}",
            String::from_utf8_lossy(&stream.raw)
        );
        stream.next_event_within(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn over_max_connections_streams_get_200_retry_comment_and_close() {
    let server = TestServer::start(|c| c.limits.max_connections = 2).await;
    let first = server.subscribe("/topics/t", None).await;
    let _second = server.subscribe("/events?topic=t", None).await;
    let mut shed = server.subscribe("/topics/t", None).await;
    assert_eq!(shed.status, 200, "never 429/503 on a stream");
    assert_eq!(shed.headers["content-type"], "text/event-stream");
    assert!(
        shed.until_closed(WAIT).await,
        "shed stream is closed by the server"
    );
    assert_eq!(shed.parser.retry, Some(250));
    assert!(
        shed.parser
            .comments
            .iter()
            .any(|c| c.contains("too many connections")),
        "{:?}",
        shed.parser.comments
    );
    assert_eq!(shed.parser.blocks, 2);
    // A slot frees when a stream ends.
    drop(first);
    let server_ref = &server;
    eventually("a slot to free", || async move {
        let mut s = server_ref.subscribe("/topics/t", None).await;
        s.until_blocks(2).await;
        s.parser.comments.is_empty() && s.parser.last_event_id.ends_with("-0")
    })
    .await;
}

#[tokio::test]
async fn streams_close_at_max_stream_age_and_resume_with_nothing_lost() {
    let server = TestServer::start(|c| c.limits.max_stream_age_ms = 300).await;
    let mut stream = server.subscribe("/topics/t", Some("0")).await;
    let a = server.publish("t", "e", json!(1)).await;
    assert_eq!(stream.next_event().await.id, a);
    assert!(
        stream.until_closed(Duration::from_secs(5)).await,
        "closed after max_stream_age"
    );
    let b = server.publish("t", "e", json!(2)).await;
    let mut again = server
        .subscribe("/topics/t", Some(&stream.parser.last_event_id))
        .await;
    assert_eq!(again.next_event().await.id, b);
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/t", None).await;
    stream.until_blocks(2).await;
    let mut replaying = server.subscribe("/events?topic=t&topic=u", Some("0")).await;
    replaying.until_blocks(1).await;
    let stopped = tokio::spawn(server.stop());
    assert!(
        stream.until_closed(Duration::from_secs(5)).await,
        "stream ended on shutdown"
    );
    assert!(
        replaying.until_closed(Duration::from_secs(5)).await,
        "stream ended on shutdown"
    );
    stopped.await.unwrap();
}

/// A replay's reads adapt to event sizes: a run of large events shrinks the
/// read (a write stays within its byte budget), and the small events after
/// them are read in growing batches again, not one per read. Every
/// replayed event is counted as delivered. (Both survived `cargo mutants`
/// before this test: `sent += 1` → `*=`, the growth condition inverted, and
/// doubling made linear.)
#[tokio::test]
async fn replay_reads_shrink_for_large_events_and_grow_back_for_small_ones() {
    const LARGE: usize = 3;
    const SMALL: usize = 3000;
    let server = TestServer::start(|_| {}).await;
    let client = reqwest::Client::new();
    let big = "x".repeat(200 * 1024);
    let mut items: Vec<serde_json::Value> = (0..LARGE)
        .map(|i| json!({ "topics": ["r"], "data": { "i": i, "big": big } }))
        .collect();
    items.extend((LARGE..LARGE + SMALL).map(|i| json!({ "topics": ["r"], "data": { "i": i } })));
    for chunk in items.chunks(1000) {
        let body = json!({ "events": chunk }).to_string();
        let (status, answer) = post_raw(&client, &server.url("/publish/batch"), body).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    }
    let before = metrics_text(&client, &server.url("")).await;
    let mut stream = server.subscribe("/topics/r", Some("0")).await;
    let events = stream.take(LARGE + SMALL).await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(seq_of(&event.id), i as u64 + 1, "in order, none missing");
    }
    let after = metrics_text(&client, &server.url("")).await;
    let delta = |name: &str| metric_value(&after, name) - metric_value(&before, name);
    assert_eq!(
        delta("sse_gateway_events_delivered_total"),
        (LARGE + SMALL) as f64,
        "every replayed event counted as delivered"
    );
    let reads = delta("sse_gateway_replay_reads_total");
    // Shrunk to one event by the large ones, then doubling back to 512 per
    // read: about 15 reads (one per read growing linearly: 56; never
    // growing: 3,003).
    assert!(
        reads <= 30.0,
        "{reads} log reads for {SMALL} small events after {LARGE} large ones: \
         reads must grow back (doubling) after the large events shrank them"
    );
}

/// A subscriber that keeps up is served from the live ring: no event sends
/// it back to the log. (`cargo mutants` turned the in-order check of the
/// live path into its opposite and nothing failed: every event then took a
/// detour through the log, same bytes, one read each.)
#[tokio::test]
async fn a_subscriber_that_keeps_up_never_falls_back_to_the_log() {
    let server = TestServer::start(|_| {}).await;
    let client = reqwest::Client::new();
    let mut stream = server.subscribe("/topics/live", None).await;
    stream.until_blocks(2).await;
    let before = metrics_text(&client, &server.url("")).await;
    for i in 0..20 {
        let id = server.publish("live", "tick", json!({ "i": i })).await;
        assert_eq!(stream.next_event().await.id, id, "delivered live, in order");
    }
    let after = metrics_text(&client, &server.url("")).await;
    let delta = |name: &str| metric_value(&after, name) - metric_value(&before, name);
    assert_eq!(
        delta("sse_gateway_lag_fallbacks_total"),
        0.0,
        "no fallback to the log"
    );
    assert_eq!(delta("sse_gateway_replay_reads_total"), 0.0, "no log reads");
    assert_eq!(delta("sse_gateway_events_delivered_total"), 20.0);
}
