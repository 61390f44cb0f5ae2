//! Auth and tenancy (API.md "Auth"): JWT from header, cookie or query; 401 vs
//! 403; public topics; streams that end with their token; RS256/ES256; tokens
//! never logged; per-org isolation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use sse_gateway::auth::{mint_hs256, Claims};
use sse_gateway::config::AuthConfig;
use tempfile::TempDir;

use crate::common::*;

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(subscribe: &[&str], publish: &[&str], org: Option<&str>, ttl_s: i64) -> Claims {
    Claims {
        exp: (now() as i64 + ttl_s) as u64,
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        publish: publish.iter().map(|s| s.to_string()).collect(),
        org: org.map(str::to_owned),
        sub: Some("test".into()),
    }
}

fn token(subscribe: &[&str], publish: &[&str], org: Option<&str>) -> String {
    mint_hs256(SECRET, &claims(subscribe, publish, org, 3600)).unwrap()
}

fn hs256(public_topics: &[&str]) -> AuthConfig {
    AuthConfig {
        hs256_secret: Some(SECRET.into()),
        public_topics: public_topics.iter().map(|s| s.to_string()).collect(),
        ..AuthConfig::default()
    }
}

async fn publish_with(
    server: &TestServer,
    token: Option<&str>,
    topic: &str,
    data: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = server
        .client
        .post(server.url(&format!("/topics/{topic}")))
        .header("content-type", "application/json")
        .body(json!({ "data": data }).to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

async fn get_with(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = server.client.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Opens a stream with a bearer token; returns it after the first blocks.
async fn stream_with(
    server: &TestServer,
    path: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> SseReader {
    let mut request = server.client.get(server.url(path)).bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    SseReader::from_response(response)
}

#[tokio::test]
async fn publishing_needs_a_token_with_a_matching_publish_claim() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&["news"]))).await;
    let (status, body) = publish_with(&server, None, "news", json!(1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "even to a public topic"
    );
    let reader = token(&["*"], &[], None);
    let (status, body) = publish_with(&server, Some(&reader), "news", json!(1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let writer = token(&[], &["projects:project:*"], None);
    let (status, _) = publish_with(&server, Some(&writer), "projects:project:p1", json!(1)).await;
    assert_eq!(status, 201);
    let (status, _) = publish_with(&server, Some(&writer), "projects:all", json!(1)).await;
    assert_eq!(status, 403);
    // Multi-topic: every topic must be allowed, else nothing is stored.
    let response = server
        .client
        .post(server.url("/publish"))
        .bearer_auth(&writer)
        .header("content-type", "application/json")
        .body(json!({"topics": ["projects:project:p1", "projects:all"], "data": 2}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let admin = token(&["*"], &["*"], None);
    let (_, info) = get_with(&server, "/topics/projects:project:p1/info", Some(&admin)).await;
    assert_eq!(
        info["count"], 1,
        "the refused multi-topic publish stored nothing"
    );
    // Broadcast routes are checked against the topics they produce.
    let response = server
        .client
        .post(server.url("/projects/broadcast/task"))
        .bearer_auth(&writer)
        .header("content-type", "application/json")
        .body(json!({"event": "task_created", "payload": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

/// Issue 15: a listing reveals what a subscription would (counts, ids), so
/// a publish-only right lists nothing.
#[tokio::test]
async fn the_topic_list_shows_only_topics_the_caller_may_subscribe_to() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    let publisher = token(&[], &["*"], None);
    for topic in ["secret", "open"] {
        assert_eq!(
            publish_with(&server, Some(&publisher), topic, json!(1))
                .await
                .0,
            201
        );
    }
    let (status, list) = get_with(&server, "/topics", Some(&publisher)).await;
    assert_eq!(status, 200);
    assert_eq!(list["topics"], json!([]), "publish-only: nothing listed");
    let reader = token(&["open"], &["*"], None);
    let (_, list) = get_with(&server, "/topics", Some(&reader)).await;
    let names: Vec<&str> = list["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["open"]);
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    let expired = mint_hs256(SECRET, &claims(&["*"], &["*"], None, -120)).unwrap();
    let wrong_key = mint_hs256(
        "another-secret-another-secret-another",
        &claims(&["*"], &["*"], None, 3600),
    )
    .unwrap();
    let other_alg = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &claims(&["*"], &["*"], None, 3600),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    #[derive(serde::Serialize)]
    struct NoExp {
        publish: Vec<String>,
    }
    let no_exp = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &NoExp {
            publish: vec!["*".into()],
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    #[derive(serde::Serialize)]
    struct NotBefore {
        exp: u64,
        nbf: u64,
        publish: Vec<String>,
        subscribe: Vec<String>,
    }
    let not_yet_valid = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &NotBefore {
            exp: now() + 7200,
            nbf: now() + 3600,
            publish: vec!["*".into()],
            subscribe: vec!["*".into()],
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for (what, bad) in [
        ("expired", expired),
        ("nbf in the future", not_yet_valid),
        ("wrong key", wrong_key),
        ("other alg", other_alg),
        ("no exp", no_exp),
        ("garbage", "x.y.z".into()),
    ] {
        let (status, body) = publish_with(&server, Some(&bad), "t", json!(1)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
        let (status, _) = get_with(&server, "/topics/t", Some(&bad)).await;
        assert_eq!(status, 401, "{what}: streams answer 401 too");
    }
}

#[tokio::test]
async fn subscribing_anonymously_only_to_public_topics_and_with_claims_otherwise() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&["news", "public:*"]))).await;
    let mut open = server.subscribe("/topics/news", None).await;
    assert_eq!(open.status, 200);
    open.until_blocks(2).await;
    let wild = server.subscribe("/topics/public:anything", None).await;
    assert_eq!(wild.status, 200);
    let (status, body) = get_with(&server, "/topics/secret", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = get_with(&server, "/events?topic=news&topic=secret", None).await;
    assert_eq!(status, 401, "every topic of a stream must be allowed");
    let scoped = token(&["projects:project:*"], &[], None);
    let (status, body) = get_with(&server, "/topics/projects:all", Some(&scoped)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let mut allowed = stream_with(
        &server,
        "/events?topic=projects:project:a&topic=news",
        &scoped,
        None,
    )
    .await;
    assert_eq!(allowed.status, 200, "a token may also read public topics");
    let admin = token(&["*"], &["*"], None);
    let id = publish_with(&server, Some(&admin), "news", json!("hello"))
        .await
        .1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(open.next_event().await.id, id);
    assert_eq!(allowed.next_event().await.id, id);
    // Info needs the same right as subscribing.
    assert_eq!(get_with(&server, "/topics/secret/info", None).await.0, 401);
    assert_eq!(get_with(&server, "/topics/news/info", None).await.0, 200);
    assert_eq!(
        get_with(&server, "/topics/projects:all/info", Some(&scoped))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn the_token_travels_in_a_header_a_cookie_or_the_query() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    let reader = token(&["t"], &[], None);
    let by_cookie = server
        .client
        .get(server.url("/topics/t/info"))
        .header("cookie", format!("theme=dark; sse_gateway_token={reader}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_cookie.status(), 200);
    let by_query = server
        .client
        .get(server.url(&format!("/topics/t?access_token={reader}")))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    assert_eq!(by_query.headers()["content-type"], "text/event-stream");
    let (status, _) = get_with(&server, "/topics/t/info", Some(&reader)).await;
    assert_eq!(status, 200);
}

/// Issue 15: `exp` near `u64::MAX` used to overflow an `Instant` and kill
/// the connection task; it means "never expires".
#[tokio::test]
async fn a_token_that_expires_at_the_end_of_time_streams_normally() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    let mut forever = claims(&["t"], &["t"], None, 0);
    forever.exp = u64::MAX - 1;
    let forever = mint_hs256(SECRET, &forever).unwrap();
    let mut stream = stream_with(&server, "/topics/t", &forever, None).await;
    assert_eq!(stream.status, 200);
    let (status, body) = publish_with(&server, Some(&forever), "t", json!("still here")).await;
    assert_eq!(status, 201, "{body}");
    let event = stream.next_event().await;
    assert_eq!(event.data, r#""still here""#);
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    let short = mint_hs256(SECRET, &claims(&["t"], &[], None, 2)).unwrap();
    let mut stream = stream_with(&server, "/topics/t", &short, None).await;
    assert_eq!(stream.status, 200);
    let started = std::time::Instant::now();
    assert!(
        stream.until_closed(Duration::from_secs(6)).await,
        "the stream closed at exp"
    );
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "closed at exp, not later: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn rs256_and_es256_public_keys_verify_tokens_and_pin_the_algorithm() {
    for (algorithm, alg, private, public) in [
        (
            "RS256",
            Algorithm::RS256,
            "tests/fixtures/keys/rsa_private.pem",
            "tests/fixtures/keys/rsa_public.pem",
        ),
        (
            "ES256",
            Algorithm::ES256,
            "tests/fixtures/keys/ec_private.pem",
            "tests/fixtures/keys/ec_public.pem",
        ),
    ] {
        let server = TestServer::start(|c| {
            c.auth = Some(AuthConfig {
                algorithm: Some(algorithm.into()),
                public_key_file: Some(repo_path(public)),
                ..AuthConfig::default()
            })
        })
        .await;
        let pem = std::fs::read(repo_path(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let good = jsonwebtoken::encode(&Header::new(alg), &claims(&[], &["t"], None, 3600), &key)
            .unwrap();
        assert_eq!(
            publish_with(&server, Some(&good), "t", json!(1)).await.0,
            201,
            "{algorithm}"
        );
        // An HS256 token "signed" with the public key must not pass (algorithm confusion).
        let public_pem = std::fs::read_to_string(repo_path(public)).unwrap();
        let confused = mint_hs256(&public_pem, &claims(&[], &["t"], None, 3600)).unwrap();
        assert_eq!(
            publish_with(&server, Some(&confused), "t", json!(1))
                .await
                .0,
            401,
            "{algorithm}"
        );
    }
}

#[tokio::test]
async fn tokens_never_appear_in_logs_or_metrics() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[auth]\nhs256_secret = \"{SECRET}\"\n")).unwrap();
    let data = dir.path().join("data");
    let gateway = GatewayProcess::start_with_config_env(
        &data,
        "127.0.0.1:0",
        Some(&config),
        &[],
        &[("RUST_LOG", "debug")],
    );
    let secret_token = token(&["t"], &["t"], None);
    let client = reqwest::Client::new();
    let response = client
        .get(gateway.url(&format!("/topics/t/info?access_token={secret_token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = SseReader::connect(
        &client,
        &gateway.url(&format!("/topics/t?access_token={secret_token}")),
        None,
    )
    .await;
    stream.until_blocks(2).await;
    let bad = format!("{secret_token}x");
    let refused = client
        .get(gateway.url(&format!("/topics/t/info?access_token={bad}")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let metrics = metrics_text(&client, &gateway.base).await;
    drop(stream);
    // Wait for the last request's log line (not a fixed sleep): only then do
    // "the token is not in the log" checks read a log that has it all.
    let gateway_ref = &gateway;
    eventually("the refused request to be logged", || async move {
        gateway_ref
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("/topics/t/info") && l.contains("401"))
    })
    .await;
    let log = gateway.log.lock().unwrap().join("\n");
    assert!(
        log.contains("/topics/t/info"),
        "the request was logged (path only): {log}"
    );
    let signature = secret_token.rsplit('.').next().unwrap();
    assert!(
        !log.contains(signature),
        "the token leaked into the log: {log}"
    );
    assert!(
        !log.contains("access_token"),
        "the query string leaked into the log: {log}"
    );
    assert!(!metrics.contains(signature));
}

#[tokio::test]
async fn tenancy_isolates_orgs_completely() {
    let server = TestServer::start(|c| {
        c.auth = Some(hs256(&["projects:all"]));
        c.tenancy.enabled = true;
    })
    .await;
    // Wildcard claims: still confined to the token's org.
    let a = token(&["*"], &["*"], Some("orgA"));
    let b = token(&["*"], &["*"], Some("orgB"));
    let mut stream_a = stream_with(
        &server,
        "/events?topic=projects:all&topic=projects:tasks",
        &a,
        Some("0"),
    )
    .await;
    let mut stream_b = stream_with(&server, "/topics/projects:all", &b, Some("0")).await;
    assert_eq!(
        (stream_a.status.as_u16(), stream_b.status.as_u16()),
        (200, 200)
    );

    let (status, answer_a) = publish_with(&server, Some(&a), "projects:all", json!("from A")).await;
    assert_eq!(status, 201);
    assert_eq!(
        answer_a["topics"],
        json!(["projects:all"]),
        "clients see unscoped names"
    );
    let id_a = answer_a["id"].as_str().unwrap().to_owned();
    let (_, answer_b) = publish_with(&server, Some(&b), "projects:all", json!("from B")).await;
    let id_b = answer_b["id"].as_str().unwrap().to_owned();
    let broadcast = server
        .client
        .post(server.url("/projects/broadcast/task"))
        .bearer_auth(&b)
        .header("content-type", "application/json")
        .body(json!({"event": "task_created", "payload": {"n": 1}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(broadcast.status(), 201);
    let broadcast: serde_json::Value = broadcast.json().await.unwrap();
    assert_eq!(
        broadcast["topics"],
        json!(["projects:all", "projects:tasks"])
    );

    let event = stream_a.next_event().await;
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (id_a.as_str(), "\"from A\"")
    );
    stream_a.expect_no_event(Duration::from_millis(300)).await;
    let got_b: Vec<String> = stream_b.take(2).await.into_iter().map(|e| e.data).collect();
    assert_eq!(got_b, ["\"from B\"", "{\"n\":1}"]);

    // Resuming with the other org's ids shows nothing of theirs.
    let mut resumed = stream_with(&server, "/topics/projects:all", &a, Some(&id_b)).await;
    resumed.expect_no_event(Duration::from_millis(300)).await;
    let mut from_zero = stream_with(
        &server,
        "/events?topic=projects:all&topic=projects:tasks",
        &a,
        Some("0"),
    )
    .await;
    assert_eq!(from_zero.next_event().await.id, id_a);
    from_zero.expect_no_event(Duration::from_millis(300)).await;

    // Names that look like another org's stored topics stay inside the caller's org.
    let mut sneaky = stream_with(&server, "/topics/projects:org:orgB:all", &a, Some("0")).await;
    assert_eq!(sneaky.status, 200);
    sneaky.expect_no_event(Duration::from_millis(300)).await;

    // Info and the topic list are per org, with unscoped names.
    let (_, info_a) = get_with(&server, "/topics/projects:all/info", Some(&a)).await;
    assert_eq!(
        (info_a["count"].as_u64(), info_a["last_id"].as_str()),
        (Some(1), Some(id_a.as_str()))
    );
    assert_eq!(info_a["topic"], "projects:all");
    let (_, list_b) = get_with(&server, "/topics", Some(&b)).await;
    let names: Vec<&str> = list_b["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["projects:all", "projects:tasks"]);
    let (_, list_a) = get_with(&server, "/topics", Some(&a)).await;
    assert_eq!(list_a["topics"].as_array().unwrap().len(), 1);
    // The head of the shared log would tell A how much B publishes: A sees
    // the newest id of its own topics.
    assert_eq!(list_a["head_id"], json!(id_a));
    let (_, list_b) = get_with(&server, "/topics", Some(&b)).await;
    assert_eq!(list_b["head_id"], json!(broadcast["id"]));

    // No org, or no token at all (even for a "public" topic): 401.
    let no_org = token(&["*"], &["*"], None);
    assert_eq!(
        publish_with(&server, Some(&no_org), "projects:all", json!(1))
            .await
            .0,
        401
    );
    assert_eq!(
        get_with(&server, "/topics/projects:all", Some(&no_org))
            .await
            .0,
        401
    );
    assert_eq!(get_with(&server, "/topics/projects:all", None).await.0, 401);
    assert_eq!(get_with(&server, "/topics", None).await.0, 401);
}

#[tokio::test]
async fn the_token_subcommand_mints_a_working_dev_token_from_the_config() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[auth]\nhs256_secret = \"{SECRET}\"\n")).unwrap();
    let (status, stdout, stderr) = run_binary(&[
        "--config",
        config.to_str().unwrap(),
        "token",
        "--publish",
        "projects:*",
        "--subscribe",
        "projects:all",
        "--ttl",
        "60",
    ]);
    assert!(status.success(), "{stderr}");
    let minted = stdout.trim().to_owned();
    let server = TestServer::start(|c| c.auth = Some(hs256(&[]))).await;
    assert_eq!(
        publish_with(&server, Some(&minted), "projects:all", json!(1))
            .await
            .0,
        201
    );
    assert_eq!(
        publish_with(&server, Some(&minted), "other", json!(1))
            .await
            .0,
        403
    );
    // Without [auth] or a secret it explains itself.
    let bare = dir.path().join("bare.toml");
    std::fs::write(&bare, "").unwrap();
    let (status, _, stderr) = run_binary(&["--config", bare.to_str().unwrap(), "token"]);
    assert!(!status.success());
    assert!(stderr.contains("[auth]"), "{stderr}");
}
