//! Past the browser's six-connection wall: 20 tabs of one Chromium context,
//! each with its own `EventSource` on `/events` (a different topic set per
//! tab, no sharing), all live over ONE HTTP/2 connection to the TLS gateway;
//! and the same page over HTTP/1.1 (`--disable-http2`), where the 7th tab's
//! stream waits for a connection that never frees up.
//!
//! Chromium trusts the test's certificate by its public key
//! (`tests/js/browser/tabs.mjs --cert`), so it is a valid certificate to the
//! browser, not an error clicked through. The connection count is the
//! gateway's own `sse_gateway_connections_open{protocol}`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::browser::{open_tabs, require_browser_tools, BrowserScript, ONE_BROWSER, PAGE_WAIT};
use crate::common::tls::TlsServer;
use crate::common::{eventually, publish};

const TABS: usize = 20;

/// Tab `i` follows its own topic and the next tab's: every topic reaches
/// two tabs, no two tabs follow the same set.
fn topics_of(prefix: &str, tab: usize, tabs: usize) -> String {
    format!("{prefix}-{tab},{prefix}-{}", (tab + 1) % tabs)
}

/// `sse_gateway_<name>{<label>}` from `/metrics` (0 when absent), read over
/// a fresh HTTP/1.1 connection so the reading does not count as HTTP/2.
async fn metric(server: &TlsServer, series: &str) -> u64 {
    let text = server
        .h1
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const H2_CONNECTIONS: &str = "sse_gateway_connections_open{protocol=\"h2\"}";
const EVENTS_STREAMS: &str = "sse_gateway_streams_open{mode=\"events\"}";

/// The `(id, data)` of every `tick` a tab received, in order.
fn got(tab: &Value) -> Vec<(String, Value)> {
    tab["got"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|line| {
            let (id, data) = line.as_str()?.split_once(' ')?;
            Some((id.to_owned(), serde_json::from_str(data).ok()?))
        })
        .collect()
}

fn opened(state: &Value) -> Vec<u64> {
    open_tabs(state)
        .iter()
        .filter(|t| t["open"] == json!(true))
        .filter_map(|t| t["tab"].as_u64())
        .collect()
}

/// `tabs.mjs` (Chromium trusting the server's certificate), ready.
async fn tabs_page(server: &TlsServer, http1: bool) -> BrowserScript {
    let cert = server.tls_dir.path().join("cert.pem");
    let cert = cert.to_str().expect("utf-8 path");
    let mut args = vec!["--cert", cert];
    if http1 {
        args.push("--h1");
    }
    let mut page = BrowserScript::spawn_with("tabs.mjs", &args);
    page.line_where("the browser to start", PAGE_WAIT, |l| {
        l["ready"] == json!(true)
    })
    .await;
    page
}

/// Publishes a `tick` to `topic`; the id and the data.
async fn tick(server: &TlsServer, topic: &str, data: Value) -> (String, Value) {
    let id = publish(&server.h1, &server.base, topic, "tick", data.clone()).await;
    (id, data)
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_tabs_stream_over_one_h2_connection_and_a_seventh_waits_over_http1() {
    require_browser_tools();
    let _one = ONE_BROWSER.lock().await;
    let server = TlsServer::start(|c| {
        c.cors.allowed_origins = vec!["*".into()];
        c.stream.heartbeat_ms = 1000;
    })
    .await;

    // HTTP/2: 20 tabs, 20 streams, one connection.
    let mut page = tabs_page(&server, false).await;
    let topics: Vec<String> = (0..TABS).map(|i| topics_of("tab", i, TABS)).collect();
    page.command(json!({"cmd": "open", "n": TABS, "gateway": server.base, "topics": topics}))
        .await;
    page.wait_state("every tab's stream open", PAGE_WAIT, |s| {
        opened(s).len() == TABS
    })
    .await;
    let state = page
        .wait_state("every stream's protocol", PAGE_WAIT, |s| {
            open_tabs(s).iter().all(|t| t["protocol"].is_string())
        })
        .await;
    for tab in open_tabs(&state) {
        assert_eq!(tab["protocol"], "h2", "every tab's stream is HTTP/2: {tab}");
    }
    assert_eq!(metric(&server, EVENTS_STREAMS).await, TABS as u64);
    assert_eq!(
        metric(&server, H2_CONNECTIONS).await,
        1,
        "the browser's {TABS} streams share one HTTP/2 connection"
    );

    // Three rounds, one event per topic each: every tab gets the events of
    // its two topics, in publish (= id) order, each once.
    let mut published: Vec<(usize, String, Value)> = Vec::new();
    for round in 0..3 {
        for t in 0..TABS {
            let (id, data) = tick(
                &server,
                &format!("tab-{t}"),
                json!({"t": t, "round": round}),
            )
            .await;
            published.push((t, id, data));
        }
    }
    let expected = |tab: usize| -> Vec<(String, Value)> {
        published
            .iter()
            .filter(|(t, _, _)| *t == tab || *t == (tab + 1) % TABS)
            .map(|(_, id, data)| (id.clone(), data.clone()))
            .collect()
    };
    page.wait_state("6 events in every tab", PAGE_WAIT, |s| {
        let tabs = open_tabs(s);
        tabs.len() == TABS && tabs.iter().all(|t| got(t).len() >= 6)
    })
    .await;
    // A duplicate or a late event would show within this.
    let state = page.settle(Duration::from_millis(700)).await;
    let tabs = open_tabs(&state);
    assert_eq!(tabs.len(), TABS);
    for tab in &tabs {
        let i = usize::try_from(tab["tab"].as_u64().expect("tab")).expect("index");
        assert_eq!(
            got(tab),
            expected(i),
            "tab {i}: its topics' events, in order, once\n{tab:#}"
        );
        assert_eq!(tab["errors"], json!(0), "tab {i}'s stream never dropped");
    }
    assert_eq!(metric(&server, H2_CONNECTIONS).await, 1);
    page.assert_no_page_errors();
    page.exit().await;
    eventually("the first browser's streams are gone", || async {
        metric(&server, EVENTS_STREAMS).await == 0
    })
    .await;

    // HTTP/1.1: the browser opens 6 connections to an origin at most; the
    // 7th tab's EventSource waits for one while the first six stream.
    let mut page = tabs_page(&server, true).await;
    let wall = 7;
    let topics: Vec<String> = (0..wall).map(|i| format!("wall-{i}")).collect();
    page.command(json!({"cmd": "open", "n": wall, "gateway": server.base, "topics": topics}))
        .await;
    page.wait_state("six tabs' streams open", PAGE_WAIT, |s| {
        opened(s).len() >= 6
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..wall {
        ids.push(tick(&server, &format!("wall-{i}"), json!({"wall": i})).await);
    }
    let until = Instant::now() + Duration::from_secs(3);
    let mut state = page.settle(Duration::from_millis(100)).await;
    while Instant::now() < until {
        state = page.settle(Duration::from_millis(200)).await;
    }
    assert_eq!(
        opened(&state),
        (0..6).collect::<Vec<u64>>(),
        "six streams open, the 7th tab's waits\n{state:#}"
    );
    for tab in open_tabs(&state) {
        let i = usize::try_from(tab["tab"].as_u64().expect("tab")).expect("index");
        let (want, protocol) = if i < 6 {
            (vec![ids[i].clone()], json!("http/1.1"))
        } else {
            (vec![], Value::Null)
        };
        assert_eq!(got(&tab), want, "tab {i}\n{tab:#}");
        assert_eq!(
            tab["protocol"], protocol,
            "tab {i}: no response yet for the 7th"
        );
    }
    assert_eq!(metric(&server, EVENTS_STREAMS).await, 6);
    assert_eq!(metric(&server, H2_CONNECTIONS).await, 0);
    let http1 = metric(&server, "sse_gateway_connections_open{protocol=\"http1\"}").await;
    assert!(
        http1 >= 6,
        "a connection per stream: {http1} HTTP/1.1 connections"
    );
    page.assert_no_page_errors();
    page.exit().await;
}
