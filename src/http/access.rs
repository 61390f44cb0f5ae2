//! The `Access` extractor: who is calling (from the token) and from where
//! (the client IP, for per-IP limits). Resolved once per request, before the
//! handler looks at anything else, so a bad token is a 401 whatever the body.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use super::error::ApiError;
use crate::app::App;
use crate::auth::Caller;

/// The caller and its IP.
pub struct Access {
    pub caller: Caller,
    pub ip: IpAddr,
}

impl FromRequestParts<Arc<App>> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let caller = app.gate.caller(&parts.headers, parts.uri.query())?;
        let ip = client_ip(parts, app.config.limits.trust_forwarded_for);
        Ok(Self { caller, ip })
    }
}

/// The peer address, or the last `X-Forwarded-For` entry (the address the
/// trusted proxy itself saw) when configured to trust it. Only the last
/// entry is the proxy's word: every earlier one came from the client, so
/// when the last does not parse the peer address is used, never an earlier
/// entry.
fn client_ip(parts: &Parts, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for {
        let last_entry = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok());
        if let Some(ip) = last_entry {
            return ip;
        }
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_of(forwarded: &[&str], trust: bool) -> IpAddr {
        let mut request = axum::http::Request::builder();
        for value in forwarded {
            request = request.header("x-forwarded-for", *value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        parts.extensions.insert(ConnectInfo(peer));
        client_ip(&parts, trust)
    }

    #[test]
    fn only_the_proxys_own_entry_is_trusted() {
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let proxy_saw: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(ip_of(&["203.0.113.9, 198.51.100.7"], true), proxy_saw);
        assert_eq!(ip_of(&["203.0.113.9", "198.51.100.7"], true), proxy_saw);
        // The last entry does not parse: the client's own earlier entry is
        // not a fallback, the peer is.
        assert_eq!(ip_of(&["203.0.113.9, garbage"], true), peer);
        assert_eq!(ip_of(&["203.0.113.9", "not-an-ip"], true), peer);
        assert_eq!(ip_of(&["203.0.113.9, "], true), peer);
        assert_eq!(ip_of(&[], true), peer);
        assert_eq!(
            ip_of(&["198.51.100.7"], false),
            peer,
            "not trusted unless configured"
        );
    }
}
