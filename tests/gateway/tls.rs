//! HTTPS and HTTP/2: streams over TLS HTTP/1.1 and over HTTP/2 (many on one
//! connection, resumed, cut when their client stops granting window),
//! `curl --http2`, certificate reload without dropping streams (file change
//! and SIGHUP), `serve --dev-tls`, and the one-line error for bad files.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::common::tls::{client, served_fingerprint, TestCa, TlsServer};
use crate::common::{eventually, GatewayProcess, SseParser, SseReader, WAIT};

/// Reads an h2 body until `n` events were parsed (releasing what it reads
/// when `release`); panics after [`WAIT`].
async fn h2_events(
    body: &mut h2::RecvStream,
    parser: &mut SseParser,
    n: usize,
    release: bool,
) -> Vec<crate::common::SseEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(WAIT, body.data())
            .await
            .expect("h2 data within the wait")
            .expect("stream still open")
            .expect("h2 data");
        if release {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        events.extend(parser.feed(&chunk));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_stream_delivers_events() {
    let server = TlsServer::start(|_| {}).await;
    // A fresh connection whose first request is the stream: the raw stream
    // path over TLS (a stream after another request is hyper's).
    let fresh = client(&server.ca.pem, true);
    let mut stream = SseReader::connect(&fresh, &server.url("/topics/tls-h1"), None).await;
    assert_eq!(stream.headers["transfer-encoding"], "chunked");
    assert_eq!(stream.status, 200);
    let first = server.publish("tls-h1", json!({"n": 1})).await;
    let second = server.publish("tls-h1", json!({"n": 2})).await;
    let events = stream.take(2).await;
    assert_eq!(
        events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [first, second]
    );
    assert_eq!(events[1].json(), json!({"n": 2}));
    assert!(String::from_utf8_lossy(&stream.raw).starts_with("retry:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_h2_streams_on_one_connection_are_all_live() {
    let server = TlsServer::start(|_| {}).await;
    let mut send = server.h2_connection(1 << 20).await;
    let mut bodies = Vec::new();
    for i in 0..20 {
        let (head, body) = server
            .h2_get(&mut send, &format!("/topics/many-{i}"), &[])
            .await;
        assert_eq!(head.status, 200, "stream {i}");
        assert_eq!(head.version, http::Version::HTTP_2);
        assert_eq!(head.headers["content-type"], "text/event-stream");
        bodies.push((body, SseParser::default()));
    }
    for i in 0..20 {
        assert_eq!(server.subscribers(&format!("many-{i}")).await, 1);
    }
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            server
                .publish(&format!("many-{i}"), json!({ "i": i }))
                .await,
        );
    }
    for (i, (body, parser)) in bodies.iter_mut().enumerate() {
        let events = h2_events(body, parser, 1, true).await;
        assert_eq!(events[0].id, ids[i], "stream {i} got its own event");
        assert_eq!(events[0].json(), json!({ "i": i }));
    }
    // Still live after the first round: a second event each.
    for i in 0..20 {
        server
            .publish(&format!("many-{i}"), json!({ "again": i }))
            .await;
    }
    for (i, (body, parser)) in bodies.iter_mut().enumerate() {
        let events = h2_events(body, parser, 1, true).await;
        assert_eq!(events[0].json(), json!({ "again": i }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_resumes_after_last_event_id_with_cors() {
    let server = TlsServer::start(|c| {
        c.cors.allowed_origins = vec!["https://app.example".into()];
        c.stream.heartbeat_ms = 200;
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(server.publish("h2-resume", json!({ "n": n })).await);
    }
    let response = server
        .client
        .get(server.url("/topics/h2-resume"))
        .header("last-event-id", &ids[1])
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let mut stream = SseReader::from_response(response);
    let events = stream.take(3).await;
    assert_eq!(
        events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids[2..].to_vec(),
        "resumed right after the given id, nothing repeated or lost"
    );
    // Heartbeats flow on an idle h2 stream too.
    let before = stream.parser.comments.len();
    stream.expect_no_event(Duration::from_millis(700)).await;
    assert!(
        stream.parser.comments.len() > before,
        "heartbeats over h2: {:?}",
        stream.parser.comments
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_whose_client_grants_no_window_is_cut_after_write_stall() {
    let server = TlsServer::start(|c| c.limits.write_stall_ms = 500).await;
    // 4 KiB per stream: a few events fill it when the client does not read.
    let mut send = server.h2_connection(4096).await;
    let (_, mut stalled) = server.h2_get(&mut send, "/topics/stall-a", &[]).await;
    let (_, mut healthy) = server.h2_get(&mut send, "/topics/stall-b", &[]).await;
    assert_eq!(server.subscribers("stall-a").await, 1);
    let big = "x".repeat(1500);
    for _ in 0..8 {
        server.publish("stall-a", json!({ "pad": big })).await;
    }
    // Nothing released on stall-a: its window is spent and stays spent.
    eventually("the stalled h2 stream is cut", || async {
        server.subscribers("stall-a").await == 0
    })
    .await;
    // The stream was reset (its body ends in an error), not the connection.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.data().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e.to_string()),
                None => return None,
            }
        }
    })
    .await
    .expect("the stalled stream ends");
    assert!(ended.is_some(), "reset, not a clean end");
    let id = server.publish("stall-b", json!({"alive": true})).await;
    let events = h2_events(&mut healthy, &mut SseParser::default(), 1, true).await;
    assert_eq!(
        events[0].id, id,
        "the other stream on the connection lives on"
    );
    // A new stream on the same connection works.
    let (head, _) = server.h2_get(&mut send, "/topics/stall-c", &[]).await;
    assert_eq!(head.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_streams_over_tls() {
    let server = TlsServer::start(|_| {}).await;
    let files = TempDir::new().expect("tempdir");
    let ca = server.ca.write_to(files.path());
    let mut curl = tokio::process::Command::new("curl")
        .args(["--http2", "-sN", "-v", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .arg(server.url("/topics/curl-h2"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl");
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(curl.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("curl prints the stream")
        .expect("read")
        .expect("a line");
    assert!(first.starts_with("retry:"), "{first}");
    let id = server.publish("curl-h2", json!({"via": "curl"})).await;
    let mut got = Vec::new();
    while !got.iter().any(|l: &String| l.starts_with("data:")) {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the event arrives")
            .expect("read")
            .expect("a line");
        got.push(line);
    }
    assert!(got.contains(&format!("id: {id}")), "{got:?}");
    curl.kill().await.expect("kill curl");
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    curl.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    assert!(
        stderr.contains("< HTTP/2 200"),
        "curl spoke HTTP/2: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_file_change_is_served_to_new_handshakes_without_dropping_streams() {
    let server = TlsServer::start(|_| {}).await;
    assert_eq!(
        served_fingerprint(server.addr, server.roots()).await,
        server.leaf.fingerprint
    );
    let mut h2_stream =
        SseReader::connect(&server.client, &server.url("/topics/reload"), None).await;
    let mut h1_stream = SseReader::connect(&server.h1, &server.url("/topics/reload"), None).await;
    let second = server.ca.leaf("second");
    second.write_to(server.tls_dir.path());
    eventually("new handshakes get the new certificate", || async {
        served_fingerprint(server.addr, server.roots()).await == second.fingerprint
    })
    .await;
    // A bad rewrite keeps the certificate in service.
    std::fs::write(server.tls_dir.path().join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_fingerprint(server.addr, server.roots()).await,
        second.fingerprint
    );
    // Streams opened before the reload are still live.
    let id = server.publish("reload", json!({"after": "reload"})).await;
    assert_eq!(h2_stream.next_event().await.id, id);
    assert_eq!(h1_stream.next_event().await.id, id);
}

/// A config file serving `leaf` from `dir`, polling off (SIGHUP only).
fn config_with_tls(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nreload_interval_ms = 0\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let ca = TestCa::new();
    let first = ca.leaf("first");
    let files = TempDir::new().expect("tempdir");
    let data = TempDir::new().expect("tempdir");
    let (cert, key) = first.write_to(files.path());
    let config = config_with_tls(files.path(), &cert, &key);
    let gateway = tokio::task::spawn_blocking(move || {
        GatewayProcess::start_with_config(data.path(), "127.0.0.1:0", Some(&config), &[])
    })
    .await
    .expect("start");
    let roots = || crate::common::tls::roots_from_pem(&ca.pem);
    assert_eq!(
        served_fingerprint(gateway.addr, roots()).await,
        first.fingerprint
    );
    let https = client(&ca.pem, false);
    let url = format!("https://127.0.0.1:{}/topics/hup", gateway.addr.port());
    let mut stream = SseReader::connect(&https, &url, None).await;
    let second = ca.leaf("second");
    second.write_to(files.path());
    // Polling is off: nothing changes until the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served_fingerprint(gateway.addr, roots()).await,
        first.fingerprint
    );
    let status = Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    eventually("SIGHUP reloads", || async {
        served_fingerprint(gateway.addr, roots()).await == second.fingerprint
    })
    .await;
    let base = format!("https://127.0.0.1:{}", gateway.addr.port());
    let id = crate::common::publish(&https, &base, "hup", "e", json!({})).await;
    assert_eq!(
        stream.next_event().await.id,
        id,
        "the stream outlived the reload"
    );
    // A bad certificate on SIGHUP: logged, old one kept.
    std::fs::write(files.path().join("key.pem"), "nope").unwrap();
    Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .expect("kill -HUP");
    let log = gateway.log.clone();
    eventually("the failed reload is logged", || {
        let logged = log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("TLS certificate not reloaded") && l.contains("key.pem"));
        async move { logged }
    })
    .await;
    assert_eq!(
        served_fingerprint(gateway.addr, roots()).await,
        second.fingerprint
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_prints_its_certificate_and_curl_trusts_it() {
    let data = TempDir::new().expect("tempdir");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .args([
                "serve",
                "--dev-tls",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data.path())
            .arg("--config")
            .arg(crate::common::repo_path("config.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on https://").nth(1) {
                let _ = addr_tx.send(Ok(addr.trim().to_owned()));
            }
            seen.push(line);
        }
        let _ = addr_tx.send(Err(seen));
    });
    let mut path = None;
    let mut fingerprint = None;
    for line in BufReader::new(child.0.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
    {
        if let Some(p) = line.trim().strip_prefix("certificate: ") {
            path = Some(std::path::PathBuf::from(p));
        }
        if let Some(f) = line.trim().strip_prefix("SHA-256 fingerprint: ") {
            fingerprint = Some(f.to_owned());
        }
        if path.is_some() && fingerprint.is_some() {
            break;
        }
    }
    let addr = addr_rx
        .recv_timeout(WAIT)
        .expect("stderr read")
        .unwrap_or_else(|log| panic!("no \"listening on https://\": {log:?}"));
    let port = addr.rsplit(':').next().expect("port").to_owned();
    let (path, fingerprint) = (
        path.expect("path printed"),
        fingerprint.expect("fingerprint printed"),
    );
    assert!(
        path.starts_with(data.path()),
        "under the data dir: {path:?}"
    );
    let pem = std::fs::read_to_string(&path).expect("the printed path exists");
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");
    assert_eq!(sse_gateway::tls::fingerprint(&der), fingerprint);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(&path)
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .expect("curl");
    drop(child);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 2",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `serve` with `[tls]` pointing at `cert` and `key`; (exited with
/// failure, stderr). One still running after a few seconds has started.
fn serve_with(cert: &std::path::Path, key: &std::path::Path) -> (bool, String) {
    let dir = TempDir::new().expect("tempdir");
    let config = config_with_tls(dir.path(), cert, key);
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error")
            .stderr(Stdio::piped())
            .spawn()
            .expect("run"),
    );
    let stderr = crate::common::collect_stderr(&mut child.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let failed = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break !status.success();
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    // The reader thread lets go of its copy at EOF.
    for _ in 0..250 {
        if std::sync::Arc::strong_count(&stderr) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = String::from_utf8_lossy(&stderr.lock().expect("stderr")).into_owned();
    (failed, text)
}

#[test]
fn bad_certificate_files_stop_the_start_with_one_line() {
    let ca = TestCa::new();
    let files = TempDir::new().expect("tempdir");
    let (cert, key) = ca.leaf("one").write_to(files.path());
    let missing = files.path().join("missing.pem");
    let garbage = files.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let other_key = files.path().join("other-key.pem");
    std::fs::write(&other_key, ca.leaf("two").key_pem).unwrap();
    let cases = [
        (&missing, &key, "cannot read"),
        (&garbage, &key, "holds no PEM certificate"),
        (&cert, &garbage, "holds no PEM private key"),
        (&cert, &other_key, "does not belong to the certificate"),
    ];
    for (cert, key, expected) in cases {
        let (failed, stderr) = serve_with(cert, key);
        assert!(failed, "started with {cert:?} {key:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].starts_with("sse-gateway: tls: ") && lines[0].contains(expected),
            "{expected}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_request_headers_are_bounded_by_max_header_bytes() {
    let server = TlsServer::start(|c| c.limits.max_header_bytes = 8192).await;
    let mut send = server.h2_connection(1 << 20).await;
    let fits = "x".repeat(4000);
    let (head, _) = server
        .h2_get(&mut send, "/healthz", &[("x-pad", fits.as_str())])
        .await;
    assert_eq!(head.status, 200);
    let over = "x".repeat(10_000);
    let request = http::Request::get(server.url("/healthz"))
        .header("x-pad", over.as_str())
        .body(())
        .expect("request");
    let mut ready = send.clone().ready().await.expect("ready");
    let (response, _) = ready.send_request(request, true).expect("send");
    let answer = tokio::time::timeout(WAIT, response)
        .await
        .expect("an answer");
    // Refused as over HTTP/1.1: 431, and only this request.
    assert_eq!(answer.expect("a response, not a reset").status(), 431);
    // The connection itself goes on.
    let (head, _) = server.h2_get(&mut send, "/healthz", &[]).await;
    assert_eq!(head.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_stream_that_takes_nothing_is_closed_after_write_stall() {
    let server = TlsServer::start(|c| {
        c.limits.write_stall_ms = 300;
        c.stream.live_buffer_events = 16;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let mut stalled = crate::common::tls::tls_connect_on(tcp, server.roots(), &[b"http/1.1"])
        .await
        .expect("handshake");
    use tokio::io::AsyncWriteExt;
    stalled
        .write_all(b"GET /topics/tls-big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    stalled.flush().await.unwrap();
    eventually("the stream to be counted", || async {
        server.subscribers("tls-big").await == 1
    })
    .await;
    let blob = "x".repeat(60_000);
    for _ in 0..200 {
        server.publish("tls-big", json!(blob)).await;
    }
    eventually("the stalled TLS stream to be closed", || async {
        server.subscribers("tls-big").await == 0
    })
    .await;
    drop(stalled);
}

/// Until the h2 `body` ends: `Some(error)` when it was reset, `None` on a
/// clean end; panics after [`WAIT`].
async fn h2_body_end(body: &mut h2::RecvStream) -> Option<String> {
    tokio::time::timeout(WAIT, async {
        loop {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Some(Err(e)) => return Some(e.to_string()),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends within the wait")
}

/// The server ended the connection on purpose: a GOAWAY without an error
/// code, or the socket closed under a client that was still writing its last
/// frames (a PING answer, a window update) when the server hung up after
/// its GOAWAY: `BrokenPipe` / `ConnectionReset` on the client's side. Not a
/// GOAWAY with an error code, not a protocol error.
fn assert_closed_gracefully(result: Result<(), h2::Error>) {
    let Err(e) = result else { return };
    let io_close = e.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    });
    let clean_goaway = e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR);
    assert!(io_close || clean_goaway, "closed with an error: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_is_closed_with_goaway_but_not_while_a_stream_is_open() {
    let idle = Duration::from_millis(400);
    let server = TlsServer::start(|c| {
        c.http2.idle_timeout_ms = 400;
        c.stream.heartbeat_ms = 60_000;
    })
    .await;
    let (mut send, connection) = server.h2_open(1 << 20).await;
    let ended = tokio::spawn(async move {
        let result = connection.await;
        (Instant::now(), result)
    });
    // A stream open for 3 idle timeouts (no event, no heartbeat in that
    // time): the connection stays, the stream stays live.
    let (head, mut body) = server.h2_get(&mut send, "/topics/h2-idle", &[]).await;
    assert_eq!(head.status, 200);
    tokio::time::sleep(idle * 3).await;
    assert!(!ended.is_finished(), "closed while a stream was open");
    let id = server.publish("h2-idle", json!({"still": "live"})).await;
    let events = h2_events(&mut body, &mut SseParser::default(), 1, true).await;
    assert_eq!(events[0].id, id);
    // The client drops the stream (RST_STREAM): the connection now has none
    // and is closed after the idle timeout, cleanly (GOAWAY NO_ERROR).
    drop(body);
    let dropped = Instant::now();
    let (closed_at, result) = tokio::time::timeout(WAIT, ended)
        .await
        .expect("the idle connection is closed within the wait")
        .expect("join");
    assert_closed_gracefully(result);
    let after = closed_at - dropped;
    assert!(
        // Not before the timeout; well before anything else would close it
        // (keep-alive pings answered, write_stall 60 s).
        after >= idle - Duration::from_millis(50) && after < Duration::from_secs(5),
        "closed {after:?} after its last stream (idle timeout {idle:?})"
    );
    // A connection that never opened a stream goes the same way.
    let (_send, connection) = server.h2_open(1 << 20).await;
    let opened = Instant::now();
    let result = tokio::time::timeout(WAIT, connection)
        .await
        .expect("a connection without streams is closed");
    assert_closed_gracefully(result);
    assert!(opened.elapsed() >= idle - Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_whose_peer_stops_answering_pings_is_closed() {
    // write_stall (60 s) and heartbeats (15 s) cannot end the stream in
    // this test's time: only the keep-alive PING can.
    let server = TlsServer::start(|c| {
        c.http2.keepalive_interval_ms = 300;
        c.http2.keepalive_timeout_ms = 300;
    })
    .await;
    let (mut send, mut connection) = server.h2_open(1 << 20).await;
    let (silence, silenced) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = &mut connection => {}
            _ = silenced => {
                // Still open, never polled again: no PING is answered.
                std::future::pending::<()>().await;
                drop(connection);
            }
        }
    });
    let (head, mut body) = server.h2_get(&mut send, "/topics/h2-ping", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(server.subscribers("h2-ping").await, 1);
    // A peer that answers keeps its connection through many pings.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        server.subscribers("h2-ping").await,
        1,
        "kept while answering"
    );
    let id = server.publish("h2-ping", json!({"n": 1})).await;
    let events = h2_events(&mut body, &mut SseParser::default(), 1, true).await;
    assert_eq!(events[0].id, id);
    let _ = silence.send(());
    let went_silent = Instant::now();
    eventually("the silent peer's stream is closed", || async {
        server.subscribers("h2-ping").await == 0
    })
    .await;
    println!(
        "closed {:?} after the peer went silent",
        went_silent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_outlives_more_stall_resets_than_h2s_local_reset_limit() {
    // h2 sends GOAWAY after 1,024 resets it counts as the server's own
    // errors; 1,100 write-stall resets on one connection must not be counted.
    const STREAMS: usize = 1_100;
    const BATCH: usize = 220;
    let server = TlsServer::start(|c| c.limits.write_stall_ms = 150).await;
    // Window 0: no stream can get its first bytes, every one stalls.
    let (mut send, connection) = server.h2_open(0).await;
    let ended = tokio::spawn(connection);
    let mut reset = 0;
    for first in (0..STREAMS).step_by(BATCH) {
        let mut bodies = Vec::new();
        for i in first..(first + BATCH).min(STREAMS) {
            let (head, body) = server
                .h2_get(&mut send, &format!("/topics/stall-many-{}", i % 8), &[])
                .await;
            assert_eq!(head.status, 200, "stream {i}");
            bodies.push(body);
        }
        for mut body in bodies {
            assert!(h2_body_end(&mut body).await.is_some(), "reset, not ended");
            reset += 1;
        }
        assert!(
            !ended.is_finished(),
            "connection closed after {reset} resets"
        );
    }
    assert_eq!(reset, STREAMS);
    // The connection still takes and answers a stream.
    let (head, _) = server.h2_get(&mut send, "/healthz", &[]).await;
    assert_eq!(head.status, 200);
    assert!(!ended.is_finished(), "the connection lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_is_closed_with_goaway_when_the_gateway_stops() {
    let server = TlsServer::start(|_| {}).await;
    let (mut send, connection) = server.h2_open(1 << 20).await;
    let ended = tokio::spawn(connection);
    let (head, mut body) = server.h2_get(&mut send, "/topics/h2-stop", &[]).await;
    assert_eq!(head.status, 200);
    let id = server.publish("h2-stop", json!({"before": "stop"})).await;
    let events = h2_events(&mut body, &mut SseParser::default(), 1, true).await;
    assert_eq!(events[0].id, id);
    server.stop();
    // The stream ends (the subscriber resumes elsewhere) and the
    // connection closes cleanly instead of idling until the drain gives up.
    h2_body_end(&mut body).await;
    let closed = tokio::time::timeout(WAIT, ended)
        .await
        .expect("the connection is closed at stop")
        .expect("join");
    assert_closed_gracefully(closed);
}
