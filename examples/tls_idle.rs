//! Server memory per idle stream over HTTPS: HTTP/2 (many streams per
//! connection) against HTTP/1.1 over TLS (one connection per stream), on a
//! running gateway served with `--dev-tls`.
//!
//! ```text
//! sse-gateway serve --dev-tls --data-dir /tmp/d --listen 127.0.0.1:8443 &
//! cargo run --release --example tls_idle -- 127.0.0.1:8443 /tmp/d/dev-tls/cert.pem <pid> h2 2000
//! ```
//!
//! Opens `streams` idle `GET /topics/idle-<i>` streams (`h2`: 200 per
//! connection; `h1`: one TLS connection each), waits until the first bytes
//! of every one arrived (or 60 s passed without news), settles 3 s, and
//! prints the server's `VmRSS` before and after and the difference per
//! stream. A stream that failed (its response, body or connection ended
//! with an error) or stayed silent is counted and reported with its
//! connection, never lost: an earlier version let a failed stream's task
//! panic unseen, which looked like a stream that never got its first bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS_PER_H2_CONNECTION: usize = 200;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("kB")
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, ca, pid, mode, streams] = &args[..] else {
        eprintln!("usage: tls_idle <addr> <ca.pem> <server pid> <h2|h1> <streams>");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("addr");
    let pid: u32 = pid.parse().expect("pid");
    let streams: usize = streams.parse().expect("streams");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("PEM")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![if mode == "h2" {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let config = Arc::new(config);
    let before = rss_kib(pid);
    // Every stream reports how it went (a stream that fails is counted and
    // named, never silently lost: a dead task would only show as a timeout).
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Outcome)>();
    let mut held = Vec::new();
    // The h2 connection of each stream (`i / per connection`).
    let connection_of = |i: usize| i / STREAMS_PER_H2_CONNECTION;
    if mode == "h2" {
        for (c, first) in (0..streams).step_by(STREAMS_PER_H2_CONNECTION).enumerate() {
            let tls = connect(addr, Arc::clone(&config)).await;
            // The h2 crate (0.4.21) closes a connection (GOAWAY
            // ENHANCE_YOUR_CALM "too_many_data_frames") when small DATA
            // frames it buffered unread cost more than half its connection
            // window (256 B each, against 32 KiB by default): 200 streams'
            // first bytes arriving before their readers run did that. A
            // connection window like hyper's client (5 MiB) leaves room.
            let (send, connection) = h2::client::Builder::new()
                .initial_connection_window_size(5 << 20)
                .handshake::<_, bytes::Bytes>(tls)
                .await
                .expect("h2 handshake");
            held.push(tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("h2 connection {c} ended: {e}");
                }
            }));
            for i in first..(first + STREAMS_PER_H2_CONNECTION).min(streams) {
                let mut send = send.clone().ready().await.expect("ready");
                let request = http::Request::get(format!("https://localhost/topics/idle-{i}"))
                    .body(())
                    .expect("request");
                let (response, _) = send.send_request(request, true).expect("send");
                let ready_tx = ready_tx.clone();
                held.push(tokio::spawn(async move {
                    let response = match response.await {
                        Ok(response) => response,
                        Err(e) => {
                            let _ = ready_tx.send((i, Outcome::Failed(format!("response: {e}"))));
                            return;
                        }
                    };
                    if response.status() != 200 {
                        let status = response.status().as_u16();
                        let _ = ready_tx.send((i, Outcome::Failed(format!("status {status}"))));
                        return;
                    }
                    let mut body = response.into_body();
                    let mut first = true;
                    loop {
                        match body.data().await {
                            Some(Ok(chunk)) => {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                if std::mem::take(&mut first) {
                                    let _ = ready_tx.send((i, Outcome::FirstBytes));
                                }
                            }
                            Some(Err(e)) => {
                                let _ = ready_tx.send((i, Outcome::Failed(format!("body: {e}"))));
                                return;
                            }
                            None => {
                                let _ = ready_tx.send((i, Outcome::Failed("body ended".into())));
                                return;
                            }
                        }
                    }
                }));
            }
        }
    } else {
        for i in 0..streams {
            let mut tls = connect(addr, Arc::clone(&config)).await;
            let ready_tx = ready_tx.clone();
            held.push(tokio::spawn(async move {
                let head = format!("GET /topics/idle-{i} HTTP/1.1\r\nHost: localhost\r\n\r\n");
                tls.write_all(head.as_bytes()).await.expect("write");
                let mut buf = [0u8; 4096];
                let mut first = true;
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) => {
                            let _ = ready_tx.send((i, Outcome::Failed("closed".into())));
                            return;
                        }
                        Ok(_) => {
                            if std::mem::take(&mut first) {
                                let _ = ready_tx.send((i, Outcome::FirstBytes));
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send((i, Outcome::Failed(format!("read: {e}"))));
                            return;
                        }
                    }
                }
            }));
        }
    }
    let opened_at = std::time::Instant::now();
    let mut answered = vec![false; streams];
    let mut first_bytes = 0;
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    while answered.iter().any(|a| !a) {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some((i, Outcome::FirstBytes))) if !answered[i] => {
                answered[i] = true;
                first_bytes += 1;
            }
            Ok(Some((i, Outcome::Failed(why)))) => {
                if !answered[i] {
                    answered[i] = true;
                    *failures.entry(why).or_default() += 1;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let waited = opened_at.elapsed().as_secs_f64();
    let silent: Vec<usize> = (0..streams).filter(|i| !answered[*i]).collect();
    if !silent.is_empty() || !failures.is_empty() {
        let mut per_connection = std::collections::BTreeMap::<usize, usize>::new();
        for i in &silent {
            *per_connection.entry(connection_of(*i)).or_default() += 1;
        }
        eprintln!(
            "streams without first bytes after 60 s of silence: {} (per h2 connection: {per_connection:?}); failed: {failures:?}",
            silent.len()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let per_stream = (after.saturating_sub(before) * 1024) as f64 / streams as f64;
    println!(
        "summary mode={mode} streams={streams} first_bytes={first_bytes} failed={} silent={} answered_in_s={waited:.1} rss_before_kib={before} rss_after_kib={after} bytes_per_stream={per_stream:.0}",
        failures.values().sum::<usize>(),
        silent.len()
    );
    for task in held {
        task.abort();
    }
}

/// How one stream went.
enum Outcome {
    FirstBytes,
    Failed(String),
}
