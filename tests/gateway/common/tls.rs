//! TLS for tests: a CA made in the test, leaf certificates it signs, an
//! in-process gateway serving them ([`TlsServer`]), and clients that trust
//! that CA: reqwest (HTTP/1.1 or HTTP/2 by ALPN), a bare TLS handshake that
//! reports the served certificate, and one `h2` connection driven by hand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use sse_gateway::config::TlsConfig;
use sse_gateway::Config;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::server::test_config;

/// A certificate authority that exists for one test.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// Its certificate, PEM: what clients trust.
    pub pem: String,
}

/// A server certificate for `localhost` and `127.0.0.1`, signed by a [`TestCa`].
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 as the gateway prints it.
    pub fingerprint: String,
}

impl Leaf {
    /// Writes it as `cert.pem` and `key.pem` in `dir`.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &self.cert_pem).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sse-gateway test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA cert").pem();
        Self { params, key, pem }
    }

    /// A new leaf (new key, new serial) named `name`.
    pub fn leaf(&self, name: &str) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        Leaf {
            fingerprint: sse_gateway::tls::fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/ca.pem` (for curl).
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }

    fn roots(&self) -> rustls::RootCertStore {
        roots_from_pem(&self.pem)
    }
}

/// A root store holding the certificates of `pem`.
pub fn roots_from_pem(pem: &str) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("root");
    }
    roots
}

/// A TLS connection to `addr` trusting `roots`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_on(TcpStream::connect(addr).await?, roots, alpn).await
}

/// A TLS session on a connected socket (e.g. one with a tiny receive buffer).
pub async fn tls_connect_on(
    tcp: TcpStream,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = rustls::ClientConfig::builder_with_provider(sse_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await
}

/// The fingerprint of the certificate a new handshake with `addr` gets.
pub async fn served_fingerprint(addr: SocketAddr, roots: rustls::RootCertStore) -> String {
    let tls = tls_connect(addr, roots, &[b"http/1.1"])
        .await
        .expect("TLS handshake");
    let certs = tls.get_ref().1.peer_certificates().expect("peer certs");
    sse_gateway::tls::fingerprint(&certs[0])
}

/// A reqwest client trusting `ca_pem`; `h1_only` keeps it off HTTP/2.
pub fn client(ca_pem: &str, h1_only: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"));
    if h1_only {
        builder = builder.http1_only();
    }
    builder.build().expect("client")
}

/// An in-process gateway serving HTTPS with a certificate of a [`TestCa`].
pub struct TlsServer {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    pub ca: TestCa,
    /// The certificate it started with.
    pub leaf: Leaf,
    /// Where `cert.pem` and `key.pem` are (rewrite them to reload).
    pub tls_dir: TempDir,
    /// HTTP/2 when the server offers it (it does).
    pub client: reqwest::Client,
    /// HTTP/1.1 only.
    pub h1: reqwest::Client,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), sse_gateway::RunError>>>,
    _data: TempDir,
}

impl TlsServer {
    /// Starts with a fresh CA and leaf; certificate files polled every 100 ms.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let ca = TestCa::new();
        let leaf = ca.leaf("first");
        let tls_dir = TempDir::new().expect("tempdir");
        let (cert_file, key_file) = leaf.write_to(tls_dir.path());
        let data = TempDir::new().expect("tempdir");
        let mut config = test_config(data.path());
        config.tls = Some(TlsConfig {
            cert_file,
            key_file,
            reload_interval_ms: 100,
        });
        tweak(&mut config);
        config.validate().expect("valid config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(sse_gateway::run(listener, config, stop.clone()));
        let server = Self {
            addr,
            base: format!("https://127.0.0.1:{}", addr.port()),
            client: client(&ca.pem, false),
            h1: client(&ca.pem, true),
            ca,
            leaf,
            tls_dir,
            stop,
            handle: Some(handle),
            _data: data,
        };
        for _ in 0..200 {
            if let Ok(r) = server.h1.get(server.url("/readyz")).send().await {
                if r.status() == reqwest::StatusCode::OK {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("TLS gateway did not become ready");
    }

    /// Stops the gateway (as `SIGTERM` does): it drains and returns.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        self.ca.roots()
    }

    /// Publishes over HTTPS; returns the id.
    pub async fn publish(&self, topic: &str, data: serde_json::Value) -> String {
        super::server::publish(&self.client, &self.base, topic, "e", data).await
    }

    /// Streams `/topics/{topic}/info` counts.
    pub async fn subscribers(&self, topic: &str) -> u64 {
        let (status, info) =
            super::server::get_json(&self.client, &self.url(&format!("/topics/{topic}/info")))
                .await;
        assert_eq!(status, reqwest::StatusCode::OK, "{info}");
        info["subscribers"].as_u64().expect("subscribers")
    }

    /// One HTTP/2 connection (ALPN `h2`), driven by the `h2` crate; the
    /// client grants `window` bytes per stream until the test releases them.
    pub async fn h2_connection(&self, window: u32) -> h2::client::SendRequest<Bytes> {
        let (send, connection) = self.h2_open(window).await;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        send
    }

    /// Like [`Self::h2_connection`], but the connection future is the
    /// caller's to poll (or to stop polling: a peer that went silent).
    pub async fn h2_open(
        &self,
        window: u32,
    ) -> (
        h2::client::SendRequest<Bytes>,
        h2::client::Connection<TlsStream<TcpStream>, Bytes>,
    ) {
        let tls = tls_connect(self.addr, self.roots(), &[b"h2"])
            .await
            .expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the server chose HTTP/2"
        );
        h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake::<_, Bytes>(tls)
            .await
            .expect("h2 handshake")
    }

    /// `GET path` on an h2 connection; the response head and its body.
    pub async fn h2_get(
        &self,
        send: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (http::response::Parts, h2::RecvStream) {
        let mut request = http::Request::get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).expect("request");
        let ready = tokio::time::timeout(super::WAIT, send.clone().ready())
            .await
            .expect("the connection takes another stream within the wait")
            .expect("h2 ready");
        *send = ready;
        let (response, _) = send.send_request(request, true).expect("send request");
        let response = tokio::time::timeout(super::WAIT, response)
            .await
            .expect("a response within the wait")
            .expect("h2 response");
        response.into_parts()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}
