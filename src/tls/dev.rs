//! `serve --dev-tls`: a self-signed certificate for `localhost`,
//! `127.0.0.1` and `::1`, so HTTPS and HTTP/2 work on the first run.
//!
//! Made once under `<data_dir>/dev-tls/` and reused while it has more than
//! a month left, so a browser or `curl --cacert` that was told to trust it
//! keeps trusting it across restarts. Valid for a year (Apple platforms
//! refuse server certificates valid for more than 825 days). Never for
//! production: the key sits next to the data, unencrypted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};

use super::TlsError;

/// How long a made certificate is valid.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A certificate older than this is made anew (a month before it expires).
const RENEW_AFTER: Duration = Duration::from_secs(335 * 24 * 3600);

/// The development certificate on disk.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SHA-256 of the certificate, `AB:CD:…`.
    pub fingerprint: String,
    /// Made now (rather than reused from an earlier run).
    pub created: bool,
}

/// The certificate under `data_dir/dev-tls/`: reused when it is loadable and
/// young enough, made otherwise.
pub fn ensure(data_dir: &Path) -> Result<DevCertificate, TlsError> {
    let dir = data_dir.join("dev-tls");
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    let young = std::fs::metadata(&cert_file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|made| made.elapsed().ok())
        .is_some_and(|age| age < RENEW_AFTER);
    if young {
        if let Ok(pair) = super::load(&cert_file, &key_file) {
            if let Some(cert) = pair.cert.first() {
                return Ok(DevCertificate {
                    fingerprint: super::fingerprint(cert),
                    cert_file,
                    key_file,
                    created: false,
                });
            }
        }
    }
    let (cert_pem, key_pem, fingerprint) = make()?;
    std::fs::create_dir_all(&dir).map_err(|source| TlsError::Write {
        path: dir.clone(),
        source,
    })?;
    write(&key_file, key_pem.as_bytes(), true)?;
    write(&cert_file, cert_pem.as_bytes(), false)?;
    Ok(DevCertificate {
        cert_file,
        key_file,
        fingerprint,
        created: true,
    })
}

/// A new key pair and self-signed certificate: (cert PEM, key PEM, fingerprint).
fn make() -> Result<(String, String, String), TlsError> {
    let setup = |e: rcgen::Error| TlsError::Setup(format!("cannot make a certificate: {e}"));
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = CertificateParams::new(names).map_err(setup)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "sse-gateway development certificate");
    params.distinguished_name = name;
    let now = time::OffsetDateTime::from(SystemTime::now());
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + VALIDITY;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(setup)?;
    let cert = params.self_signed(&key).map_err(setup)?;
    let fingerprint = super::fingerprint(cert.der());
    Ok((cert.pem(), key.serialize_pem(), fingerprint))
}

/// Writes a file; `private` ones are readable by their owner only.
fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    let failed = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(failed)?;
    std::io::Write::write_all(&mut file, bytes).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_certificate_is_made_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        assert!(first.created);
        assert!(super::super::load(&first.cert_file, &first.key_file).is_ok());
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        let again = ensure(dir.path()).unwrap();
        assert!(!again.created);
        assert_eq!(again.fingerprint, first.fingerprint);
        // A broken file is replaced, not served.
        std::fs::write(&first.key_file, "garbage").unwrap();
        let remade = ensure(dir.path()).unwrap();
        assert!(remade.created);
        assert_ne!(remade.fingerprint, first.fingerprint);
    }
}
