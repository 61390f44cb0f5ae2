//! Test harness for the one `gateway` test target: a real gateway on
//! `127.0.0.1:0` with a temp data dir, in process ([`server`]) or as the real
//! binary ([`process`]); SSE reading on the library's WHATWG decoder ([`sse`]);
//! a hand-read HTTP/1.1 connection ([`raw_http`]); crash-test publishers and
//! checks ([`crash`]); ports that survive a restart ([`ports`]); a test CA and
//! HTTPS/HTTP/2 clients ([`tls`]). Small shared helpers live here.
//!
//! Everything is re-exported, so a test imports `crate::common::{…}`.

pub mod crash;
pub mod ports;
pub mod process;
pub mod raw_http;
pub mod server;
pub mod sse;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crash::*;
pub use ports::*;
pub use process::*;
pub use raw_http::*;
pub use server::*;
pub use sse::*;

/// Default wait for anything expected to arrive.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `<seq>` of an `<epoch>-<seq>` id.
pub fn seq_of(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or_else(|| panic!("not an id: {id}"))
}

/// The `<epoch>` of an id.
pub fn epoch_of(id: &str) -> &str {
    id.rsplit_once('-')
        .map(|(e, _)| e)
        .unwrap_or_else(|| panic!("not an id: {id}"))
}

/// A `retention.max_age_s` (about 100 years) under which no event a test
/// copies in from a fixture is ever old enough to be trimmed: fixtures keep
/// the times they were written at, and age with the calendar.
pub const FIXTURE_AGE_LIMIT_S: u64 = 100 * 365 * 86_400;

/// Copies the directory tree `from` into `to` (a fixture data dir into a temp dir).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Waits until `check` holds, polling; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HS256 token signed with `secret` for `org`, allowed to subscribe and
/// publish everywhere in it, valid for an hour (tenancy tests).
pub fn org_token(secret: &str, org: &str) -> String {
    sse_gateway::auth::mint_hs256(
        secret,
        &sse_gateway::auth::Claims {
            exp: sse_gateway::auth::unix_now() + 3600,
            subscribe: vec!["*".into()],
            publish: vec!["*".into()],
            org: Some(org.into()),
            sub: None,
        },
    )
    .expect("token")
}
