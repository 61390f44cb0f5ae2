//! TLS certificates: loaded from the `[tls]` files, handed to every
//! handshake, and replaced without a restart (on SIGHUP, or when polling
//! sees either file change).
//!
//! A handshake asks [`Certificates`] for the current key pair, so a reload
//! takes effect at the next handshake and never touches an established
//! connection: a running stream keeps its session. A reload that fails (a
//! file unreadable or half written, no certificate, a key that does not
//! match) keeps the pair in service and logs an error; at start the same
//! failure is a one-line error and the gateway does not start.

pub mod dev;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// ALPN protocols offered, in our order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls: {path} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate { path: PathBuf },
    #[error("tls: {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("tls: {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tls: the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: {0}")]
    Setup(String),
}

/// The crypto of every TLS session: ring (no C toolchain or cmake needed,
/// unlike aws-lc-rs), so one provider in the whole binary.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `AB:CD:…`: the SHA-256 of a certificate as browsers and `openssl x509
/// -fingerprint -sha256` show it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    let mut out = String::with_capacity(digest.len() * 3);
    for (i, byte) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02X}");
    }
    out
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a certificate chain and its key, checking that they belong together.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = read(cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: cert_file.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key_pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_file.to_owned(),
        },
        other => TlsError::Invalid {
            path: key_file.to_owned(),
            message: other.to_string(),
        },
    })?;
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Invalid {
                path: key_file.to_owned(),
                message: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert_file.to_owned(),
                key: key_file.to_owned(),
            })
        }
        Err(e) => Err(TlsError::Invalid {
            path: cert_file.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// What a file looked like when last loaded: a change of either is a reason to reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stamp {
    modified: Option<SystemTime>,
    len: Option<u64>,
}

impl Stamp {
    fn of(path: &Path) -> Self {
        // Follows symlinks: a Kubernetes secret is swapped by re-pointing one.
        match std::fs::metadata(path) {
            Ok(meta) => Self {
                modified: meta.modified().ok(),
                len: Some(meta.len()),
            },
            Err(_) => Self::default(),
        }
    }
}

/// The certificate in service, and where it comes from.
#[derive(Debug)]
pub struct Certificates {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Both files as last tried (loaded or not), so a broken file is
    /// reported once, not at every poll, and retried when it changes again.
    seen: Mutex<[Stamp; 2]>,
}

impl Certificates {
    /// Loads the configured pair; fails when it is unusable.
    pub fn open(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let seen = [Stamp::of(&config.cert_file), Stamp::of(&config.key_file)];
        let current = load(&config.cert_file, &config.key_file)?;
        Ok(Arc::new(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: RwLock::new(current),
            seen: Mutex::new(seen),
        }))
    }

    /// The fingerprint of the certificate in service.
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .cert
            .first()
            .map(fingerprint)
            .unwrap_or_default()
    }

    /// Loads the files again; on success the next handshake uses them, on
    /// failure the pair in service stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock() = [Stamp::of(&self.cert_file), Stamp::of(&self.key_file)];
        let fresh = load(&self.cert_file, &self.key_file)?;
        *self.current.write() = fresh;
        Ok(())
    }

    /// Whether either file changed since it was last tried.
    fn changed(&self) -> bool {
        let now = [Stamp::of(&self.cert_file), Stamp::of(&self.key_file)];
        *self.seen.lock() != now
    }

    /// Reloads and says so in the log.
    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(
                fingerprint = %self.fingerprint(),
                "{why}: TLS certificate reloaded; new handshakes use it"
            ),
            Err(e) => tracing::error!(
                error = %e,
                fingerprint = %self.fingerprint(),
                "{why}: TLS certificate not reloaded; still serving the previous one"
            ),
        }
    }

    /// The rustls settings of the listener: this resolver, ALPN `h2` then
    /// `http/1.1`, TLS 1.2 and 1.3.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

/// Reloads `certificates` on SIGHUP and, every `interval`, when a file
/// changed; until `stop`.
pub async fn watch(
    certificates: Arc<Certificates>,
    interval: Option<Duration>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file change only");
            None
        }
    };
    let mut tick = interval.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<Option<()>>();
        let ticked = async {
            match tick.as_mut() {
                Some(tick) => tick.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = signalled => certificates.reload_logged("SIGHUP"),
            _ = ticked => {
                if certificates.changed() {
                    certificates.reload_logged("certificate file changed");
                }
            }
        }
    }
}
