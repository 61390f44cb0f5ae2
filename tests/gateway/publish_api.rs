//! API.md "Publish" and "Errors": the three publish routes, their answers,
//! how data is stored, broadcast routing, and every error row a publish can
//! hit. After every refused publish: nothing was stored and the gateway still
//! publishes.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sse_gateway::routes::{Conditional, FieldFormat, RouteSpec};

use crate::common::*;

const UUID_UPPER: &str = "3F1C2B4A-1111-4222-8333-444455556666";
const UUID_LOWER: &str = "3f1c2b4a-1111-4222-8333-444455556666";

// ---------------------------------------------------------------- helpers

/// Sends a request; (status, headers, body as JSON or as a JSON string).
async fn send(request: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// `POST path` with `Content-Type: application/json`.
fn post_json(
    server: &TestServer,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    server
        .client
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
}

/// Asserts an answer is the API.md error: `status`, a JSON content type and
/// exactly `{"error": {"code": code, "message": <non-empty>}}`.
fn assert_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Value,
    want: StatusCode,
    code: &str,
    ctx: &str,
) {
    assert_eq!(status, want, "{ctx}: status (body {body})");
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("application/json"),
        "{ctx}: error content type {content_type:?}"
    );
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: error body is not an object: {body}"));
    assert_eq!(
        object.len(),
        1,
        "{ctx}: error body has only `error`: {body}"
    );
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: no `error` object: {body}"));
    assert_eq!(
        error.len(),
        2,
        "{ctx}: `error` has exactly code and message: {body}"
    );
    assert_eq!(
        error.get("code").and_then(Value::as_str),
        Some(code),
        "{ctx}: code in {body}"
    );
    let message = error.get("message").and_then(Value::as_str).unwrap_or("");
    assert!(!message.trim().is_empty(), "{ctx}: empty message in {body}");
}

/// The error message of an error body.
fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

/// `/topics/{topic}/info` → `count`.
async fn count(server: &TestServer, topic: &str) -> u64 {
    let (status, info) = server.get_json(&format!("/topics/{topic}/info")).await;
    assert_eq!(status, StatusCode::OK, "info for {topic}: {info}");
    info["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("count in {info}"))
}

async fn counts(server: &TestServer, topics: &[&str]) -> Vec<u64> {
    let mut out = Vec::with_capacity(topics.len());
    for topic in topics {
        out.push(count(server, topic).await);
    }
    out
}

/// Sends a publish that must be refused with `want`/`code`; then asserts that
/// nothing was stored on `watch` and that a later publish still succeeds.
/// Returns the error body.
async fn expect_refused(
    server: &TestServer,
    request: reqwest::RequestBuilder,
    want: StatusCode,
    code: &str,
    watch: &[&str],
    ctx: &str,
) -> Value {
    let before = counts(server, watch).await;
    let (status, headers, body) = send(request).await;
    assert_error(status, &headers, &body, want, code, ctx);
    assert_eq!(
        counts(server, watch).await,
        before,
        "{ctx}: a refused publish stored something on {watch:?}"
    );
    let alive_before = count(server, "still-alive").await;
    server
        .publish("still-alive", "ping", json!({ "after": ctx }))
        .await;
    assert_eq!(
        count(server, "still-alive").await,
        alive_before + 1,
        "{ctx}: the gateway still publishes"
    );
    body
}

/// Everything retained on `topic`: subscribes with `Last-Event-ID: 0`, takes
/// `n` events and checks nothing more arrives.
async fn replay(server: &TestServer, topic: &str, n: usize) -> Vec<SseEvent> {
    let mut reader = server
        .subscribe(&format!("/topics/{topic}"), Some("0"))
        .await;
    assert_eq!(reader.status, StatusCode::OK);
    let events = reader.take(n).await;
    reader.expect_no_event(Duration::from_millis(150)).await;
    events
}

/// Asserts `id` is `<epoch>-<seq>` with an `[A-Za-z0-9]+` epoch and a canonical, non-zero seq.
fn assert_id_format(id: &str) {
    let (epoch, seq) = id
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("id without '-': {id}"));
    assert!(
        !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_alphanumeric()),
        "epoch of {id}"
    );
    assert!(
        !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()),
        "seq of {id}"
    );
    assert!(
        !seq.starts_with('0'),
        "seq of {id} is canonical and after the `0` start point"
    );
}

/// `{"data": "<padding>"}` of exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let overhead = r#"{"data":""}"#.len();
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(len - overhead));
    assert_eq!(body.len(), len);
    body
}

/// `len` levels of arrays around `0`: `[[[0]]]` for 3.
fn nested(len: usize) -> String {
    format!("{}0{}", "[".repeat(len), "]".repeat(len))
}

fn broadcast_body(event: &str, payload: Value) -> String {
    json!({ "event": event, "payload": payload }).to_string()
}

// ---------------------------------------------------------------- POST /topics/{topic}

#[tokio::test]
async fn publish_to_topic_answers_201_with_id_and_the_topic() {
    let server = TestServer::start(|_| {}).await;
    let (status, headers, body) = send(post_json(
        &server,
        "/topics/orders",
        r#"{"event":"created","data":{"n":1}}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let object = body.as_object().expect("object answer");
    assert_eq!(object.len(), 2, "answer is exactly id and topics: {body}");
    assert_eq!(body["topics"], json!(["orders"]));
    let id = body["id"].as_str().expect("id string");
    assert_id_format(id);
    assert_eq!(count(&server, "orders").await, 1);

    let events = replay(&server, "orders", 1).await;
    assert_eq!(
        events[0],
        SseEvent {
            id: id.to_owned(),
            event: "created".into(),
            data: r#"{"n":1}"#.into()
        }
    );
}

#[tokio::test]
async fn ids_share_one_epoch_and_are_consecutive_across_topics() {
    let server = TestServer::start(|_| {}).await;
    let mut ids = Vec::new();
    for (i, topic) in ["a", "b", "a", "c:d", "b"].iter().enumerate() {
        ids.push(server.publish(topic, "tick", json!(i)).await);
    }
    let (status, multi) = server
        .post_raw("/publish", r#"{"topics":["a","z"],"data":5}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{multi}");
    ids.push(multi["id"].as_str().expect("id").to_owned());
    for id in &ids {
        assert_id_format(id);
        assert_eq!(
            epoch_of(id),
            epoch_of(&ids[0]),
            "one epoch per log: {ids:?}"
        );
    }
    for pair in ids.windows(2) {
        assert_eq!(
            seq_of(&pair[1]),
            seq_of(&pair[0]) + 1,
            "seq grows by one per publish: {ids:?}"
        );
    }
}

#[tokio::test]
async fn absent_or_null_event_is_delivered_as_message() {
    let server = TestServer::start(|_| {}).await;
    let bodies = [
        (r#"{"data":1}"#, "message"),
        (r#"{"event":null,"data":2}"#, "message"),
        (r#"{"data":3,"event":null}"#, "message"),
        (r#"{"event":"message","data":4}"#, "message"),
        (
            r#"{"event":"Custom.name:x-1_","data":5}"#,
            "Custom.name:x-1_",
        ),
    ];
    let mut ids = Vec::new();
    for (body, _) in bodies {
        let (status, answer) = server.post_raw("/topics/names", body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}: {answer}");
        ids.push(answer["id"].as_str().expect("id").to_owned());
    }
    let events = replay(&server, "names", bodies.len()).await;
    for (i, ((_, name), event)) in bodies.iter().zip(&events).enumerate() {
        assert_eq!(event.event, *name, "event {i}");
        assert_eq!(event.id, ids[i], "event {i}");
        assert_eq!(event.data, (i + 1).to_string(), "event {i}");
    }
}

#[tokio::test]
async fn data_is_stored_byte_exact_with_only_insignificant_whitespace_removed() {
    let server = TestServer::start(|_| {}).await;
    // (data as sent, data as delivered)
    let cases: &[(&str, &str)] = &[
        (r#"{ "b" : 1 , "a" : [ 2 , 3 ] }"#, r#"{"b":1,"a":[2,3]}"#),
        (r#"{"z":1,"a":2,"m":3}"#, r#"{"z":1,"a":2,"m":3}"#),
        (r#"{"a":1, "a":2}"#, r#"{"a":1,"a":2}"#),
        (r#""\u00e9\/\n\"\\\t""#, r#""\u00e9\/\n\"\\\t""#),
        (r#"{"\u00E9":"\/"}"#, r#"{"\u00E9":"\/"}"#),
        (
            r#"[ 1.0 , 1e2 , -0 , 1E+2 , 0.50e-3 , 12345678901234567890123 ]"#,
            r#"[1.0,1e2,-0,1E+2,0.50e-3,12345678901234567890123]"#,
        ),
        ("\"é日本😀\"", "\"é日本😀\""),
        (r#""\ud83d\ude00 pair""#, r#""\ud83d\ude00 pair""#),
        (
            r#""  spaces { [ , : kept ] }  ""#,
            r#""  spaces { [ , : kept ] }  ""#,
        ),
        (
            "\r\n\t {\r\n\"k\"\t:\r\n\"v\"\r\n,\"n\" : null }\r\n",
            r#"{"k":"v","n":null}"#,
        ),
        (r#""a\u0000b\r\nc""#, r#""a\u0000b\r\nc""#),
        ("null", "null"),
        (" true ", "true"),
        ("0", "0"),
        (r#""text""#, r#""text""#),
        ("{ }", "{}"),
        ("[ ]", "[]"),
        (
            r#"{"data":{"data":"nested"}}"#,
            r#"{"data":{"data":"nested"}}"#,
        ),
    ];
    for (sent, _) in cases {
        let body = format!("{{ \"data\" :\n {sent} \n}}");
        let (status, answer) = server.post_raw("/topics/exact", body).await;
        assert_eq!(status, StatusCode::CREATED, "{sent}: {answer}");
    }
    let mut reader = server.subscribe("/topics/exact", Some("0")).await;
    let events = reader.take(cases.len()).await;
    for ((sent, want), event) in cases.iter().zip(&events) {
        assert_eq!(event.data, *want, "data sent as {sent:?}");
        let line = format!("\ndata: {want}\n");
        assert!(
            reader.raw.windows(line.len()).any(|w| w == line.as_bytes()),
            "{want:?} travels as one data: line"
        );
    }
    // The same through /publish and a broadcast.
    let (status, _) = server.post_raw("/publish", "{\"topics\":[\"exact2\"],\"data\":{ \"b\" : 1.0 , \"a\" : \"\\u00e9\" , \"b\" : 1e2 }}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        replay(&server, "exact2", 1).await[0].data,
        r#"{"b":1.0,"a":"\u00e9","b":1e2}"#
    );
    let payload = r#"{ "event" : "task_created" , "payload" : { "z" : 1.0 , "title" : "\u00e9t\u00e9 é" , "z" : [ 1e2 ] } }"#;
    let (status, _) = server.post_raw("/projects/broadcast/task", payload).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        replay(&server, "projects:tasks", 1).await[0].data,
        r#"{"z":1.0,"title":"\u00e9t\u00e9 é","z":[1e2]}"#
    );
}

// ---------------------------------------------------------------- POST /publish

#[tokio::test]
async fn publish_many_removes_repeats_keeps_order_and_stores_one_event_with_one_id() {
    let server = TestServer::start(|_| {}).await;
    let (status, answer) = server
        .post_raw(
            "/publish",
            r#"{"topics":["b","a","b","c","a"],"event":"multi","data":{"x":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["b", "a", "c"]));
    assert_eq!(answer.as_object().map(|o| o.len()), Some(2), "{answer}");
    let id = answer["id"].as_str().expect("id").to_owned();
    assert_id_format(&id);
    for topic in ["a", "b", "c"] {
        assert_eq!(count(&server, topic).await, 1, "{topic}");
        let events = replay(&server, topic, 1).await;
        assert_eq!(
            events[0],
            SseEvent {
                id: id.clone(),
                event: "multi".into(),
                data: r#"{"x":1}"#.into()
            },
            "{topic}"
        );
    }
    // One event in several topics of one stream is sent once.
    let mut reader = server
        .subscribe("/events?topic=a&topic=b&topic=c", Some("0"))
        .await;
    assert_eq!(reader.next_event().await.id, id);
    reader.expect_no_event(Duration::from_millis(200)).await;
    // The next publish takes the very next id: the multi-topic event used one.
    let next = server.publish("a", "after", json!(null)).await;
    assert_eq!(seq_of(&next), seq_of(&id) + 1);
}

#[tokio::test]
async fn publish_many_takes_1_to_64_topics_and_refuses_0_or_65() {
    let server = TestServer::start(|_| {}).await;
    let one = r#"{"topics":["solo"],"data":1}"#;
    let (status, answer) = server.post_raw("/publish", one).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["solo"]));

    let topics: Vec<String> = (0..64).map(|i| format!("t{i:02}")).collect();
    let (status, answer) = server
        .post_raw(
            "/publish",
            json!({ "topics": topics, "data": 1 }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(topics));
    assert_eq!(count(&server, "t63").await, 1);

    // 65 entries, 64 after the repeat is removed: accepted.
    let mut repeated = topics.clone();
    repeated.insert(10, "t05".into());
    let (status, answer) = server
        .post_raw(
            "/publish",
            json!({ "topics": repeated, "data": 2 }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(topics));

    let too_many: Vec<String> = (0..65).map(|i| format!("u{i:02}")).collect();
    let body = expect_refused(
        &server,
        post_json(
            &server,
            "/publish",
            json!({ "topics": too_many, "data": 3 }).to_string(),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_topic",
        &["u00", "u63", "u64"],
        "65 topics",
    )
    .await;
    assert!(
        message(&body).contains("64"),
        "the message states the limit: {body}"
    );
    expect_refused(
        &server,
        post_json(&server, "/publish", r#"{"topics":[],"data":3}"#),
        StatusCode::BAD_REQUEST,
        "invalid_topic",
        &["solo"],
        "0 topics",
    )
    .await;
}

// ---------------------------------------------------------------- POST /projects/broadcast/{kind}

#[tokio::test]
async fn broadcast_project_adds_templates_only_when_is_template_is_json_true() {
    let server = TestServer::start(|_| {}).await;
    let project_topic = format!("projects:project:{UUID_LOWER}");
    let cases = [
        (
            json!({ "uuid": UUID_LOWER, "is_template": true, "name": "T" }),
            true,
        ),
        (json!({ "uuid": UUID_LOWER, "is_template": "true" }), false),
        (json!({ "uuid": UUID_LOWER, "is_template": 1 }), false),
        (json!({ "uuid": UUID_LOWER, "is_template": false }), false),
        (json!({ "uuid": UUID_LOWER }), false),
    ];
    let mut template_ids = Vec::new();
    for (payload, template) in &cases {
        let body = broadcast_body("project_updated", payload.clone());
        let (status, answer) = server.post_raw("/projects/broadcast/project", body).await;
        assert_eq!(status, StatusCode::CREATED, "{payload}: {answer}");
        let mut want = vec!["projects:all".to_owned(), project_topic.clone()];
        if *template {
            want.push("projects:templates".into());
            template_ids.push(answer["id"].as_str().expect("id").to_owned());
        }
        assert_eq!(answer["topics"], json!(want), "{payload}");
    }
    assert_eq!(count(&server, "projects:all").await, cases.len() as u64);
    assert_eq!(count(&server, &project_topic).await, cases.len() as u64);
    assert_eq!(count(&server, "projects:templates").await, 1);
    let templates = replay(&server, "projects:templates", 1).await;
    assert_eq!(templates[0].id, template_ids[0]);
    assert_eq!(
        templates[0].event, "project_updated",
        "the event name is `event`"
    );
    assert_eq!(
        templates[0].data,
        cases[0].0.to_string(),
        "the data is `payload`"
    );
}

#[tokio::test]
async fn broadcast_task_goes_to_all_and_tasks() {
    let server = TestServer::start(|_| {}).await;
    let payload = json!({ "uuid": UUID_LOWER, "project_uuid": UUID_LOWER, "title": "t" });
    let (status, answer) = server
        .post_raw(
            "/projects/broadcast/task",
            broadcast_body("task_created", payload.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["projects:all", "projects:tasks"]));
    let id = answer["id"].as_str().expect("id").to_owned();
    assert_id_format(&id);
    for topic in ["projects:all", "projects:tasks"] {
        let events = replay(&server, topic, 1).await;
        assert_eq!(
            events[0],
            SseEvent {
                id: id.clone(),
                event: "task_created".into(),
                data: payload.to_string()
            }
        );
    }
    assert_eq!(
        count(&server, &format!("projects:project:{UUID_LOWER}")).await,
        0,
        "task does not go to the project topic"
    );
}

#[tokio::test]
async fn broadcast_assignment_and_dependency_go_to_all_and_the_project() {
    let server = TestServer::start(|_| {}).await;
    let project_topic = format!("projects:project:{UUID_LOWER}");
    for (kind, event) in [
        ("assignment", "assignment_created"),
        ("dependency", "dependency_removed"),
    ] {
        let payload = json!({ "project_uuid": UUID_LOWER, "kind": kind });
        let (status, answer) = server
            .post_raw(
                &format!("/projects/broadcast/{kind}"),
                broadcast_body(event, payload),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{kind}: {answer}");
        assert_eq!(
            answer["topics"],
            json!(["projects:all", project_topic]),
            "{kind}"
        );
    }
    let events = replay(&server, &project_topic, 2).await;
    assert_eq!(
        events.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["assignment_created", "dependency_removed"]
    );
    assert_eq!(count(&server, "projects:all").await, 2);
    assert_eq!(count(&server, "projects:tasks").await, 0);
    assert_eq!(count(&server, "projects:templates").await, 0);
}

#[tokio::test]
async fn broadcast_uuid_is_written_lowercase_hyphenated() {
    let server = TestServer::start(|_| {}).await;
    let lower_topic = format!("projects:project:{UUID_LOWER}");
    let (status, answer) = server
        .post_raw(
            "/projects/broadcast/project",
            broadcast_body("project_created", json!({ "uuid": UUID_UPPER })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["projects:all", lower_topic]));
    let (status, answer) = server
        .post_raw(
            "/projects/broadcast/assignment",
            broadcast_body("a", json!({ "project_uuid": UUID_UPPER })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["projects:all", lower_topic]));
    assert_eq!(count(&server, &lower_topic).await, 2);
    assert_eq!(
        count(&server, &format!("projects:project:{UUID_UPPER}")).await,
        0
    );
    // The payload itself is stored as sent (uppercase).
    let events = replay(&server, &lower_topic, 2).await;
    assert_eq!(events[0].data, json!({ "uuid": UUID_UPPER }).to_string());
}

#[tokio::test]
async fn broadcast_missing_or_non_uuid_routing_field_is_422_invalid_payload() {
    let server = TestServer::start(|_| {}).await;
    let watch = ["projects:all", "projects:tasks", "projects:templates"];
    let cases = [
        ("project", json!({}), "uuid"),
        ("project", json!({ "is_template": true }), "uuid"),
        ("project", json!({ "uuid": null }), "uuid"),
        ("project", json!({ "uuid": "" }), "uuid"),
        ("project", json!({ "uuid": "nope" }), "uuid"),
        ("project", json!({ "uuid": 5 }), "uuid"),
        ("project", json!({ "uuid": [UUID_LOWER] }), "uuid"),
        (
            "project",
            json!({ "uuid": "3f1c2b4a-1111-4222-8333-44445555666" }),
            "uuid",
        ),
        (
            "project",
            json!({ "uuid": "3f1c2b4a-1111-4222-8333-44445555666g" }),
            "uuid",
        ),
        ("project", json!({ "project_uuid": UUID_LOWER }), "uuid"),
        ("project", json!([UUID_LOWER]), "uuid"),
        ("assignment", json!({}), "project_uuid"),
        ("assignment", json!({ "uuid": UUID_LOWER }), "project_uuid"),
        (
            "assignment",
            json!({ "project_uuid": "projects:all" }),
            "project_uuid",
        ),
        ("dependency", json!({ "project_uuid": 1 }), "project_uuid"),
        (
            "dependency",
            json!({ "project_uuid": true }),
            "project_uuid",
        ),
    ];
    for (kind, payload, field) in cases {
        let ctx = format!("{kind} {payload}");
        let payload_is_array = payload.is_array();
        let body = expect_refused(
            &server,
            post_json(
                &server,
                &format!("/projects/broadcast/{kind}"),
                broadcast_body("e", payload),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
            &watch,
            &ctx,
        )
        .await;
        if !payload_is_array {
            assert!(
                message(&body).contains(field),
                "{ctx}: message names `{field}`: {body}"
            );
        }
    }
    assert_eq!(counts(&server, &watch).await, [0, 0, 0]);
}

#[tokio::test]
async fn broadcast_unknown_kind_or_module_is_404_not_found() {
    let server = TestServer::start(|_| {}).await;
    let body = broadcast_body(
        "e",
        json!({ "uuid": UUID_LOWER, "project_uuid": UUID_LOWER }),
    );
    for path in [
        "/projects/broadcast/nope",
        "/projects/broadcast/Project",
        "/projects/broadcast/tasks",
        "/crm/broadcast/task",
        "/projects/broadcast/task/extra",
    ] {
        expect_refused(
            &server,
            post_json(&server, path, body.clone()),
            StatusCode::NOT_FOUND,
            "not_found",
            &["projects:all", "projects:tasks"],
            path,
        )
        .await;
    }
}

#[tokio::test]
async fn broadcast_route_added_by_config_works_without_code_changes() {
    let deal = RouteSpec {
        module: "crm".into(),
        kind: "deal".into(),
        topics: vec![
            "crm:all".into(),
            "crm:deal:{deal_uuid}".into(),
            "crm:owner:{owner}".into(),
        ],
        fields: BTreeMap::from([
            ("deal_uuid".to_owned(), FieldFormat::Uuid),
            ("owner".to_owned(), FieldFormat::TopicPart),
        ]),
        when_true: vec![Conditional {
            field: "won".into(),
            topics: vec!["crm:won".into()],
        }],
    };
    // The same route as an operator writes it in config.toml.
    let from_toml = sse_gateway::Config::from_toml(
        r#"
        [[routes]]
        module = "crm"
        kind = "deal"
        topics = ["crm:all", "crm:deal:{deal_uuid}", "crm:owner:{owner}"]
        fields = { deal_uuid = "uuid", owner = "topic_part" }
        when_true = [{ field = "won", topics = ["crm:won"] }]
        "#,
    )
    .expect("route config parses");
    assert_eq!(from_toml.routes, vec![deal.clone()]);

    let server = TestServer::start(|c| c.routes = from_toml.routes.clone()).await;
    let deal_topic = format!("crm:deal:{UUID_LOWER}");
    let payload = json!({ "deal_uuid": UUID_UPPER, "owner": "alice", "won": true });
    let (status, answer) = server
        .post_raw(
            "/crm/broadcast/deal",
            broadcast_body("deal_won", payload.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["topics"],
        json!(["crm:all", deal_topic, "crm:owner:alice", "crm:won"])
    );
    let events = replay(&server, &deal_topic, 1).await;
    assert_eq!(
        (events[0].event.as_str(), events[0].data.as_str()),
        ("deal_won", payload.to_string().as_str())
    );

    let (status, answer) = server
        .post_raw(
            "/crm/broadcast/deal",
            broadcast_body(
                "deal_updated",
                json!({ "deal_uuid": UUID_LOWER, "owner": "bob", "won": "true" }),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["topics"],
        json!(["crm:all", deal_topic, "crm:owner:bob"])
    );
    assert_eq!(count(&server, "crm:won").await, 1);

    for payload in [
        json!({ "owner": "bob" }),
        json!({ "deal_uuid": UUID_LOWER }),
        json!({ "deal_uuid": UUID_LOWER, "owner": "a b" }),
    ] {
        expect_refused(
            &server,
            post_json(
                &server,
                "/crm/broadcast/deal",
                broadcast_body("deal_updated", payload.clone()),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
            &["crm:all", &deal_topic],
            &payload.to_string(),
        )
        .await;
    }
    expect_refused(
        &server,
        post_json(
            &server,
            "/crm/broadcast/lead",
            broadcast_body("x", json!({})),
        ),
        StatusCode::NOT_FOUND,
        "not_found",
        &["crm:all"],
        "unconfigured crm kind",
    )
    .await;
}

// ---------------------------------------------------------------- 400 invalid_topic

#[tokio::test]
async fn bad_topic_names_are_400_invalid_topic_and_store_nothing() {
    let server = TestServer::start(|_| {}).await;
    let long = "a".repeat(201);
    let bad_paths = [
        "a%20b".to_owned(),
        "a%2Fb".to_owned(),
        "%C3%A9".to_owned(),
        "a*b".to_owned(),
        "a,b".to_owned(),
        "a!b".to_owned(),
        "a$b".to_owned(),
        "a%00b".to_owned(),
        "a%FFb".to_owned(),
        "a%25b".to_owned(),
        long.clone(),
    ];
    for path in &bad_paths {
        expect_refused(
            &server,
            post_json(&server, &format!("/topics/{path}"), r#"{"data":1}"#),
            StatusCode::BAD_REQUEST,
            "invalid_topic",
            &["a", "b", "ab"],
            path,
        )
        .await;
    }
    // 200 bytes is the longest topic.
    let longest = "a".repeat(200);
    let (status, answer) = server
        .post_raw(&format!("/topics/{longest}"), r#"{"data":1}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(count(&server, &longest).await, 1);

    // Through /publish: one bad topic refuses the whole event.
    for bad in ["", "a b", "a/b", "é", "a\nb", long.as_str()] {
        expect_refused(
            &server,
            post_json(
                &server,
                "/publish",
                json!({ "topics": ["ok", bad], "data": 1 }).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_topic",
            &["ok"],
            &format!("/publish with {bad:?}"),
        )
        .await;
    }
}

#[tokio::test]
async fn empty_topic_in_the_path_is_refused_and_stores_nothing() {
    // API.md: an empty topic is `invalid_topic`, and an unknown path is
    // `not_found`; `/topics/` with nothing after it may be either.
    let server = TestServer::start(|_| {}).await;
    let before = count(&server, "still-alive").await;
    let (status, headers, body) = send(post_json(&server, "/topics/", r#"{"data":1}"#)).await;
    match status {
        StatusCode::BAD_REQUEST => {
            assert_error(status, &headers, &body, status, "invalid_topic", "/topics/")
        }
        _ => assert_error(
            status,
            &headers,
            &body,
            StatusCode::NOT_FOUND,
            "not_found",
            "/topics/",
        ),
    }
    server.publish("still-alive", "ping", json!(1)).await;
    assert_eq!(count(&server, "still-alive").await, before + 1);
}

#[tokio::test]
async fn percent_encoded_topic_is_decoded_before_validation_and_case_sensitive() {
    let server = TestServer::start(|_| {}).await;
    let (status, answer) = server.post_raw("/topics/%41bc%3Ax", r#"{"data":1}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"], json!(["Abc:x"]));
    assert_eq!(count(&server, "Abc:x").await, 1);
    assert_eq!(
        count(&server, "abc:x").await,
        0,
        "topics are case-sensitive"
    );
    let (status, answer) = server
        .post_raw("/publish", r#"{"topics":["Abc:x","abc:x"],"data":2}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["topics"],
        json!(["Abc:x", "abc:x"]),
        "different case is a different topic"
    );
    assert_eq!(count(&server, "Abc:x").await, 2);
    assert_eq!(count(&server, "abc:x").await, 1);
}

// ---------------------------------------------------------------- 400 invalid_event

#[tokio::test]
async fn bad_or_reserved_event_names_are_400_invalid_event() {
    let server = TestServer::start(|_| {}).await;
    let long = "e".repeat(101);
    for name in [
        "a b",
        "a~",
        "a@b",
        "a/b",
        "",
        "é",
        "a\nb",
        "reset",
        long.as_str(),
    ] {
        let body = json!({ "event": name, "data": 1 }).to_string();
        let refused = expect_refused(
            &server,
            post_json(&server, "/topics/ev", body),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            &["ev"],
            &format!("event {name:?}"),
        )
        .await;
        if name == "reset" {
            assert!(message(&refused).contains("reserved"), "{refused}");
        }
    }
    for (path, body) in [
        (
            "/publish",
            json!({ "topics": ["ev"], "event": "reset", "data": 1 }),
        ),
        (
            "/publish",
            json!({ "topics": ["ev"], "event": "bad name", "data": 1 }),
        ),
        (
            "/projects/broadcast/task",
            json!({ "event": "reset", "payload": {} }),
        ),
        (
            "/projects/broadcast/task",
            json!({ "event": "x".repeat(101), "payload": {} }),
        ),
    ] {
        expect_refused(
            &server,
            post_json(&server, path, body.to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            &["ev", "projects:all"],
            &format!("{path} {body}"),
        )
        .await;
    }
    // 100 bytes is the longest name.
    let longest = "e".repeat(100);
    let id = server.publish("ev", &longest, json!(1)).await;
    let events = replay(&server, "ev", 1).await;
    assert_eq!(
        (events[0].id.as_str(), events[0].event.as_str()),
        (id.as_str(), longest.as_str())
    );
}

// ---------------------------------------------------------------- 400 invalid_json

#[tokio::test]
async fn malformed_json_and_lone_surrogates_are_400_invalid_json() {
    let server = TestServer::start(|_| {}).await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("/topics/js", b"not json".to_vec()),
        ("/topics/js", b"".to_vec()),
        ("/topics/js", br#"{"data":1"#.to_vec()),
        ("/topics/js", br#"{"data":{"a":[1,2}"#.to_vec()),
        ("/topics/js", br#"{"data":1} trailing"#.to_vec()),
        ("/topics/js", br#"{"data":1}{"data":2}"#.to_vec()),
        ("/topics/js", br#"{'data':1}"#.to_vec()),
        ("/topics/js", br#"{"data":[1,]}"#.to_vec()),
        ("/topics/js", br#"{"data":NaN}"#.to_vec()),
        ("/topics/js", br#"{"data":01}"#.to_vec()),
        ("/topics/js", b"{\"data\":\"\xff\"}".to_vec()),
        ("/topics/js", b"{\"data\":\"raw\nnewline\"}".to_vec()),
        ("/topics/js", br#"{"data":"\ud800"}"#.to_vec()),
        ("/topics/js", br#"{"data":"\udc00 low first"}"#.to_vec()),
        ("/topics/js", br#"{"data":"\ud800\u0041"}"#.to_vec()),
        ("/topics/js", br#"{"data":{"\ud800":1}}"#.to_vec()),
        ("/topics/js", br#"{"data":["ok","\udfff"]}"#.to_vec()),
        ("/topics/js", br#"{"event":"\ud800","data":1}"#.to_vec()),
        ("/publish", br#"{"topics":["js"],"data":"\ud800"}"#.to_vec()),
        ("/publish", br#"{"topics":["js"],"data":}"#.to_vec()),
        (
            "/projects/broadcast/task",
            br#"{"event":"e","payload":{"t":"\ud800"}}"#.to_vec(),
        ),
        (
            "/projects/broadcast/task",
            br#"{"event":"e","payload":{"#.to_vec(),
        ),
    ];
    for (path, body) in bodies {
        let ctx = format!("{path} {}", String::from_utf8_lossy(&body));
        expect_refused(
            &server,
            post_json(&server, path, body),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &["js", "projects:all"],
            &ctx,
        )
        .await;
    }
}

#[tokio::test]
async fn json_nested_deeper_than_the_limit_is_400_invalid_json() {
    let server = TestServer::start(|c| c.limits.max_json_depth = 8).await;
    // Within the limit, whether or not the envelope object counts.
    let (status, answer) = server
        .post_raw("/topics/deep", format!(r#"{{"data":{}}}"#, nested(7)))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(replay(&server, "deep", 1).await[0].data, nested(7));
    for (path, body) in [
        ("/topics/deep", format!(r#"{{"data":{}}}"#, nested(9))),
        (
            "/topics/deep",
            r#"{"data":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}}"#.to_owned(),
        ),
        ("/topics/deep", format!(r#"{{"data":{}}}"#, nested(200))),
        ("/topics/deep", format!(r#"{{"data":{}}}"#, nested(100_000))),
        (
            "/publish",
            format!(r#"{{"topics":["deep"],"data":{}}}"#, nested(9)),
        ),
        (
            "/projects/broadcast/task",
            format!(r#"{{"event":"e","payload":{{"x":{}}}}}"#, nested(9)),
        ),
    ] {
        let ctx = format!("{path} {}", &body[..body.len().min(80)]);
        expect_refused(
            &server,
            post_json(&server, path, body),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &["deep", "projects:all"],
            &ctx,
        )
        .await;
    }
}

// ---------------------------------------------------------------- 400 invalid_body

#[tokio::test]
async fn json_of_the_wrong_shape_is_400_invalid_body_naming_the_field() {
    let server = TestServer::start(|_| {}).await;
    // (path, body, a word the message must contain)
    let cases = [
        ("/topics/sh", r#"{}"#, "data"),
        ("/topics/sh", r#"{"event":"e"}"#, "data"),
        ("/topics/sh", r#"{"data":1,"data":2}"#, "data"),
        (
            "/topics/sh",
            r#"{"event":"a","event":"b","data":1}"#,
            "event",
        ),
        ("/topics/sh", r#"{"event":5,"data":1}"#, "event"),
        ("/topics/sh", r#"{"event":["x"],"data":1}"#, "event"),
        ("/topics/sh", r#"{"event":{"name":"x"},"data":1}"#, "event"),
        ("/topics/sh", r#"{"data":1,"extra":true}"#, "extra"),
        ("/topics/sh", r#"{"topics":["sh"],"data":1}"#, "topics"),
        ("/publish", r#"{"data":1}"#, "topics"),
        ("/publish", r#"{"topics":["sh"]}"#, "data"),
        ("/publish", r#"{"topics":"sh","data":1}"#, "topics"),
        ("/publish", r#"{"topics":[1],"data":1}"#, "topics"),
        ("/publish", r#"{"topics":null,"data":1}"#, "topics"),
        (
            "/publish",
            r#"{"topics":["sh"],"topics":["sh"],"data":1}"#,
            "topics",
        ),
        (
            "/publish",
            r#"{"topics":["sh"],"event":7,"data":1}"#,
            "event",
        ),
        (
            "/publish",
            r#"{"topics":["sh"],"data":1,"payload":{}}"#,
            "payload",
        ),
        ("/projects/broadcast/task", r#"{"event":"e"}"#, "payload"),
        // The module always sends its event atom: none is a broken publisher.
        (
            "/projects/broadcast/task",
            r#"{"payload":{"uuid":"6f1b2c3d-0000-4000-8000-000000000001"}}"#,
            "event",
        ),
        (
            "/projects/broadcast/task",
            r#"{"event":null,"payload":{}}"#,
            "event",
        ),
        (
            "/projects/broadcast/task",
            r#"{"event":"e","payload":{},"payload":{}}"#,
            "payload",
        ),
        (
            "/projects/broadcast/task",
            r#"{"event":1,"payload":{}}"#,
            "event",
        ),
        (
            "/projects/broadcast/task",
            r#"{"event":"e","payload":{},"data":1}"#,
            "data",
        ),
    ];
    for (path, body, field) in cases {
        let ctx = format!("{path} {body}");
        let refused = expect_refused(
            &server,
            post_json(&server, path, body),
            StatusCode::BAD_REQUEST,
            "invalid_body",
            &["sh", "projects:all"],
            &ctx,
        )
        .await;
        assert!(
            message(&refused).contains(field),
            "{ctx}: the message names `{field}`: {refused}"
        );
    }
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_400_invalid_body() {
    let server = TestServer::start(|_| {}).await;
    for (path, body) in [
        ("/topics/sh", "[null,1]"),
        ("/topics/sh", r#"["message",{"a":1}]"#),
        ("/topics/sh", "[]"),
        ("/topics/sh", "null"),
        ("/topics/sh", "1"),
        ("/topics/sh", r#""data""#),
        ("/topics/sh", "true"),
        ("/publish", r#"[["sh"],null,1]"#),
        ("/publish", "[]"),
        ("/projects/broadcast/task", r#"["e",{}]"#),
        ("/projects/broadcast/task", r#""e""#),
    ] {
        expect_refused(
            &server,
            post_json(&server, path, body),
            StatusCode::BAD_REQUEST,
            "invalid_body",
            &["sh", "projects:all"],
            &format!("{path} {body}"),
        )
        .await;
    }
}

// ---------------------------------------------------------------- 404, 405

#[tokio::test]
async fn unknown_paths_are_404_not_found_json() {
    let server = TestServer::start(|_| {}).await;
    for (method, path) in [
        (reqwest::Method::GET, "/console/nope.js"),
        (reqwest::Method::GET, "/nope"),
        (reqwest::Method::POST, "/nope"),
        (reqwest::Method::POST, "/topics/a/b"),
        (reqwest::Method::GET, "/topics/a/info/more"),
        (reqwest::Method::POST, "/projects/broadcast"),
        (reqwest::Method::POST, "/publish/extra"),
        (reqwest::Method::GET, "/healthz/x"),
    ] {
        let request = server
            .client
            .request(method.clone(), server.url(path))
            .header("content-type", "application/json")
            .body(r#"{"data":1}"#);
        expect_refused(
            &server,
            request,
            StatusCode::NOT_FOUND,
            "not_found",
            &["a"],
            &format!("{method} {path}"),
        )
        .await;
    }
}

#[tokio::test]
async fn wrong_method_is_405_with_allow_header_and_json_body() {
    let server = TestServer::start(|_| {}).await;
    server.publish("x", "seed", json!(1)).await;
    for (method, path, allowed) in [
        (reqwest::Method::DELETE, "/topics/x", &["GET", "POST"][..]),
        (reqwest::Method::PUT, "/topics/x", &["GET", "POST"]),
        (reqwest::Method::PATCH, "/topics/x", &["GET", "POST"]),
        (reqwest::Method::POST, "/healthz", &["GET"]),
        (reqwest::Method::POST, "/readyz", &["GET"]),
        (reqwest::Method::POST, "/metrics", &["GET"]),
        (reqwest::Method::POST, "/topics/x/info", &["GET"]),
        (reqwest::Method::POST, "/events", &["GET"]),
        (reqwest::Method::GET, "/publish", &["POST"]),
        (reqwest::Method::PUT, "/publish", &["POST"]),
        (reqwest::Method::GET, "/projects/broadcast/task", &["POST"]),
    ] {
        let ctx = format!("{method} {path}");
        let before = count(&server, "x").await;
        let request = server
            .client
            .request(method.clone(), server.url(path))
            .header("content-type", "application/json")
            .body(r#"{"topics":["x"],"data":1}"#);
        let (status, headers, body) = send(request).await;
        assert_error(
            status,
            &headers,
            &body,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &ctx,
        );
        let allow = headers
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{ctx}: no Allow header"));
        let listed: Vec<String> = allow
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .collect();
        for want in allowed {
            assert!(
                listed.iter().any(|m| m == want),
                "{ctx}: Allow {allow:?} lists {want}"
            );
        }
        assert!(
            !listed.iter().any(|m| m == method.as_str()),
            "{ctx}: Allow {allow:?} does not list the refused method"
        );
        assert_eq!(count(&server, "x").await, before, "{ctx} stored nothing");
    }
    server.publish("x", "after", json!(2)).await;
    assert_eq!(count(&server, "x").await, 2);
}

// ---------------------------------------------------------------- 413

#[tokio::test]
async fn declared_body_over_the_limit_is_413_and_stores_nothing() {
    let server = TestServer::start(|c| c.limits.max_body_bytes = 1024).await;
    let (status, answer) = server.post_raw("/topics/big", body_of_len(1024)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "exactly the limit is accepted: {answer}"
    );
    for len in [1025, 4096, 64 * 1024] {
        expect_refused(
            &server,
            post_json(&server, "/topics/big", body_of_len(len)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &["big"],
            &format!("declared {len} bytes"),
        )
        .await;
    }
    let topics = json!({ "topics": ["big"], "data": "x".repeat(2000) }).to_string();
    expect_refused(
        &server,
        post_json(&server, "/publish", topics),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["big"],
        "/publish",
    )
    .await;
    let broadcast = broadcast_body("e", json!({ "pad": "x".repeat(2000) }));
    expect_refused(
        &server,
        post_json(&server, "/projects/broadcast/task", broadcast),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["big", "projects:all"],
        "broadcast",
    )
    .await;
    assert_eq!(count(&server, "big").await, 1);
}

/// A body sent with `Transfer-Encoding: chunked` (no `Content-Length`), in 100-byte chunks.
fn chunked(body: String) -> reqwest::Body {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .into_bytes()
        .chunks(100)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn oversized_chunked_body_is_413_and_stores_nothing() {
    let server = TestServer::start(|c| c.limits.max_body_bytes = 1024).await;
    // A chunked body within the limit is fine.
    let (status, headers, answer) = send(post_json(
        &server,
        "/topics/big",
        chunked(body_of_len(1024)),
    ))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{headers:?} {answer}");
    assert_eq!(count(&server, "big").await, 1);
    for len in [1025, 8 * 1024] {
        expect_refused(
            &server,
            post_json(&server, "/topics/big", chunked(body_of_len(len))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &["big"],
            &format!("chunked {len} bytes"),
        )
        .await;
    }
    let topics = json!({ "topics": ["big"], "data": "x".repeat(2000) }).to_string();
    expect_refused(
        &server,
        post_json(&server, "/publish", chunked(topics)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["big"],
        "chunked /publish",
    )
    .await;
    assert_eq!(count(&server, "big").await, 1);
}

// ---------------------------------------------------------------- 415

#[tokio::test]
async fn publish_without_a_json_content_type_is_415() {
    let server = TestServer::start(|_| {}).await;
    let routes = [
        ("/topics/ct", r#"{"data":1}"#.to_owned()),
        ("/publish", r#"{"topics":["ct"],"data":1}"#.to_owned()),
        ("/projects/broadcast/task", broadcast_body("e", json!({}))),
    ];
    for (path, body) in &routes {
        for content_type in [
            None,
            Some("text/plain"),
            Some("text/plain; charset=utf-8"),
            Some("application/x-www-form-urlencoded"),
            Some("text/json"),
            Some("application/jsonx"),
            Some("multipart/form-data; boundary=x"),
        ] {
            let mut request = server.client.post(server.url(path)).body(body.clone());
            if let Some(value) = content_type {
                request = request.header("content-type", value);
            }
            expect_refused(
                &server,
                request,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                &["ct", "projects:all"],
                &format!("{path} with {content_type:?}"),
            )
            .await;
        }
    }
}

#[tokio::test]
async fn json_content_types_with_parameters_and_plus_json_are_accepted() {
    let server = TestServer::start(|_| {}).await;
    let mut published = 0;
    for content_type in [
        "application/json; charset=utf-8",
        "application/merge-patch+json",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ] {
        for (path, body) in [
            ("/topics/ct", r#"{"data":1}"#.to_owned()),
            ("/publish", r#"{"topics":["ct"],"data":2}"#.to_owned()),
            (
                "/projects/broadcast/task",
                broadcast_body("e", json!({ "n": 3 })),
            ),
        ] {
            let request = server
                .client
                .post(server.url(path))
                .header("content-type", content_type)
                .body(body);
            let (status, _, answer) = send(request).await;
            assert_eq!(
                status,
                StatusCode::CREATED,
                "{path} with {content_type}: {answer}"
            );
            if path != "/projects/broadcast/task" {
                published += 1;
            }
        }
    }
    assert_eq!(count(&server, "ct").await, published);
    assert_eq!(count(&server, "projects:tasks").await, 4);
}

// ---------------------------------------------------------------- 503

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_after_shutdown_began_is_503_or_refused_and_stores_nothing() {
    let server = TestServer::start(|_| {}).await;
    server.publish("x", "before", json!(1)).await;
    assert_eq!(count(&server, "x").await, 1);
    server.begin_stop();
    // A fresh client: no pooled connection to reuse.
    let client = reqwest::Client::new();
    for (path, body) in [
        ("/topics/x", r#"{"data":2}"#.to_owned()),
        ("/publish", r#"{"topics":["x"],"data":3}"#.to_owned()),
        ("/projects/broadcast/task", broadcast_body("e", json!({}))),
    ] {
        let request = client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body);
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let headers = response.headers().clone();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                assert_error(
                    status,
                    &headers,
                    &body,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    path,
                );
                let retry_after = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_else(|| panic!("{path}: no Retry-After"));
                assert!(
                    retry_after.trim().parse::<u64>().is_ok(),
                    "{path}: Retry-After {retry_after:?} is delay-seconds"
                );
            }
            // The listener may already be closed: no answer at all, nothing processed.
            Err(e) => assert!(
                e.is_connect() || e.is_request(),
                "{path}: neither a 503 nor a refused connection: {e}"
            ),
        }
    }
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(
        count(&server, "x").await,
        1,
        "nothing published during shutdown was stored"
    );
    assert_eq!(
        count(&server, "projects:all").await,
        0,
        "nothing published during shutdown was stored"
    );
    server.publish("x", "after-restart", json!(4)).await;
    assert_eq!(count(&server, "x").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_flight_at_shutdown_is_either_stored_with_201_or_refused_with_503() {
    let server = TestServer::start(|_| {}).await;
    // Opens the pooled connection the next request reuses.
    server.publish("x", "before", json!(1)).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    }));
    let request = post_json(&server, "/topics/x", body);
    let answer = tokio::spawn(async move {
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Ok::<_, reqwest::Error>((status, headers, body))
    });
    tx.send(bytes::Bytes::from_static(
        br#"{"event":"in-flight","data":"#,
    ))
    .await
    .expect("first chunk");
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.begin_stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The rest may find the connection closed; the answer says what happened.
    let _ = tx.send(bytes::Bytes::from_static(b"2}")).await;
    drop(tx);
    let answer = tokio::time::timeout(WAIT, answer)
        .await
        .expect("an answer in time")
        .expect("join");
    let stored = match &answer {
        Ok((StatusCode::CREATED, _, body)) => {
            assert_id_format(body["id"].as_str().unwrap_or(""));
            true
        }
        Ok((status, headers, body)) => {
            assert_error(
                *status,
                headers,
                body,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "in-flight publish",
            );
            let retry_after = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .expect("Retry-After on 503");
            assert!(
                retry_after.trim().parse::<u64>().is_ok(),
                "Retry-After {retry_after:?} is delay-seconds"
            );
            false
        }
        Err(e) => panic!("an in-flight publish gets an answer during a graceful stop: {e}"),
    };
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let want = if stored { 2 } else { 1 };
    assert_eq!(
        count(&server, "x").await,
        want,
        "stored exactly when acknowledged ({answer:?})"
    );
    server.publish("x", "after-restart", json!(3)).await;
    assert_eq!(count(&server, "x").await, want + 1);
}

/// The deterministic form of the test above: a publish whose head arrived
/// before shutdown began and whose body arrives after it is in flight, and
/// must be answered `503 unavailable` with `Retry-After` (not a dropped
/// connection, not a 201), and nothing is stored.
#[tokio::test]
async fn a_publish_in_flight_when_shutdown_begins_is_503_and_stores_nothing() {
    let server = TestServer::start(|_| {}).await;
    server.publish("x", "before", json!(1)).await;
    let body = r#"{"data":2}"#;
    let mut conn = RawConn::open(&server).await;
    conn.send(&format!(
        "POST /topics/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ))
    .await;
    // `100 Continue` comes when the handler starts reading the body: the
    // request is in flight (no sleep, no race).
    assert_eq!(conn.head().await.status, 100);
    server.begin_stop();
    conn.send(body).await;
    let head = conn.head().await;
    assert_eq!(head.status, 503, "{:?}", head.headers);
    assert!(
        head.headers
            .get("retry-after")
            .is_some_and(|v| v.trim().parse::<u64>().is_ok()),
        "Retry-After: {:?}",
        head.headers
    );
    let length: usize = head.headers["content-length"].parse().unwrap();
    let answer: Value = serde_json::from_slice(&conn.body(length).await).unwrap();
    assert_eq!(answer["error"]["code"], "unavailable");
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(count(&server, "x").await, 1, "nothing was stored");
}
