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
//! of every one arrived, settles 3 s, and prints the server's `VmRSS`
//! before and after and the difference per stream.

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
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut held = Vec::new();
    if mode == "h2" {
        for first in (0..streams).step_by(STREAMS_PER_H2_CONNECTION) {
            let tls = connect(addr, Arc::clone(&config)).await;
            let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
            held.push(tokio::spawn(async move {
                let _ = connection.await;
            }));
            for i in first..(first + STREAMS_PER_H2_CONNECTION).min(streams) {
                let mut send = send.clone().ready().await.expect("ready");
                let request = http::Request::get(format!("https://localhost/topics/idle-{i}"))
                    .body(())
                    .expect("request");
                let (response, _) = send.send_request(request, true).expect("send");
                let ready_tx = ready_tx.clone();
                held.push(tokio::spawn(async move {
                    let mut body = response.await.expect("response").into_body();
                    let mut first = true;
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        if std::mem::take(&mut first) {
                            let _ = ready_tx.send(());
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
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if std::mem::take(&mut first) {
                        let _ = ready_tx.send(());
                    }
                }
            }));
        }
    }
    for _ in 0..streams {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .expect("every stream answers within 60 s");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let per_stream = (after.saturating_sub(before) * 1024) as f64 / streams as f64;
    println!(
        "summary mode={mode} streams={streams} rss_before_kib={before} rss_after_kib={after} bytes_per_stream={per_stream:.0}"
    );
    for task in held {
        task.abort();
    }
}
