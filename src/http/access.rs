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
/// trusted proxy itself saw) when configured to trust it.
fn client_ip(parts: &Parts, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for {
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .next_back();
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}
