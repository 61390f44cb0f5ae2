//! Auth: JWT verification, topic patterns, access decisions and the tenancy
//! rewrite.
//!
//! A token (HS256 secret, or RS256/ES256 public key; the algorithm is pinned
//! by config, `exp` is required) carries `subscribe` and `publish` topic
//! patterns and, with tenancy on, an `org`. Patterns and the topics clients
//! name are always *unscoped*; with tenancy every topic is rewritten into the
//! caller's org (`projects:all` → `projects:org:<org>:all`) before it reaches
//! the log, so no token, pattern, id or route can name another org's topic.
//!
//! Token sources, in order: `Authorization: Bearer`, the `sse_gateway_token`
//! cookie, `?access_token=`. Tokens are never logged.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::model::{Topic, TopicPattern as Pattern};

/// Name of the cookie a token may travel in (set by the web console).
pub const TOKEN_COOKIE: &str = "sse_gateway_token";

/// Why a request was refused. 401 for the `Unauthorized` kinds, 403 for `Forbidden`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: send `Authorization: Bearer <jwt>`, the sse_gateway_token cookie, or ?access_token=")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has no `org` claim, which tenancy requires")]
    NoOrg,
    #[error("the token may not {action} topic {topic:?}")]
    Forbidden { action: &'static str, topic: String },
    #[error("topic {0:?} is too long once scoped to the org; keep topics shorter")]
    ScopedTooLong(String),
}

/// Problems loading the auth config (keys).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read auth.public_key_file {path}: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.public_key_file {path} is not a {algorithm} PEM public key: {message}")]
    BadKey {
        path: String,
        algorithm: &'static str,
        message: String,
    },
}

fn any_match(patterns: &[Pattern], topic: &Topic) -> bool {
    patterns.iter().any(|p| p.matches(topic.as_str()))
}

/// Claims the gateway reads. Unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Principal {
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    org: Option<String>,
    /// Unix seconds; a stream ends when it passes.
    pub expires_at: u64,
    /// A stable, non-reversible key for per-token rate limits.
    pub rate_key: u64,
}

impl Principal {
    /// Time left before the token expires (zero if already past).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Who is calling: resolved once per request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No auth configured: everything is allowed.
    Open,
    /// Auth on, no token.
    Anonymous,
    Token(Principal),
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Self::Token(p) => Some(p),
            _ => None,
        }
    }
}

/// How a caller's topics map to stored topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Topics are stored as named.
    Global,
    /// Tenancy: topics are stored under this org.
    Org(String),
}

impl Scope {
    /// The stored name of a client-visible topic.
    pub fn apply(&self, topic: &Topic) -> Result<Topic, AuthError> {
        let Self::Org(org) = self else {
            return Ok(topic.clone());
        };
        let scoped = match topic.as_str().split_once(':') {
            Some((first, rest)) => format!("{first}:org:{org}:{rest}"),
            None => format!("{}:org:{org}", topic.as_str()),
        };
        Topic::parse(&scoped).map_err(|_| AuthError::ScopedTooLong(topic.to_string()))
    }

    /// The client-visible name of a stored topic, if it belongs to this scope.
    pub fn strip(&self, stored: &Topic) -> Option<Topic> {
        let Self::Org(org) = self else {
            return Some(stored.clone());
        };
        let s = stored.as_str();
        let (first, rest) = s.split_once(':')?;
        let rest = rest.strip_prefix("org:")?.strip_prefix(org.as_str())?;
        let unscoped = if rest.is_empty() {
            first.to_owned()
        } else {
            format!(
                "{first}{}",
                rest.strip_prefix(':').map(|r| format!(":{r}"))?
            )
        };
        Topic::parse(&unscoped).ok()
    }
}

/// The verifier and access policy, built from `[auth]` and `[tenancy]`.
pub struct Gate {
    verifier: Option<Verifier>,
    public_topics: Vec<Pattern>,
    tenancy: bool,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Gate {
    /// Loads keys; `None` config = auth off.
    pub fn from_config(auth: Option<&AuthConfig>, tenancy: bool) -> Result<Self, AuthConfigError> {
        let Some(auth) = auth else {
            return Ok(Self {
                verifier: None,
                public_topics: Vec::new(),
                tenancy: false,
            });
        };
        if tenancy && !auth.public_topics.is_empty() {
            // Anonymous callers have no org, so no topic is theirs to read.
            tracing::warn!(
                "auth.public_topics has no effect with [tenancy] enabled: anonymous callers \
                 have no org; every stream needs a token with an org claim"
            );
        }
        let (algorithm, key) = match auth.algorithm() {
            "RS256" | "ES256" => {
                let path = auth.public_key_file.as_deref().unwrap_or(Path::new(""));
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::ReadKey {
                    path: shown.clone(),
                    source,
                })?;
                if auth.algorithm() == "RS256" {
                    let key =
                        DecodingKey::from_rsa_pem(&pem).map_err(|e| AuthConfigError::BadKey {
                            path: shown,
                            algorithm: "RS256",
                            message: e.to_string(),
                        })?;
                    (Algorithm::RS256, key)
                } else {
                    let key =
                        DecodingKey::from_ec_pem(&pem).map_err(|e| AuthConfigError::BadKey {
                            path: shown,
                            algorithm: "ES256",
                            message: e.to_string(),
                        })?;
                    (Algorithm::ES256, key)
                }
            }
            _ => (
                Algorithm::HS256,
                DecodingKey::from_secret(auth.hs256_secret.as_deref().unwrap_or("").as_bytes()),
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = auth.leeway_s;
        validation.validate_exp = true;
        // A token that is not valid yet (`nbf` in the future) is refused like
        // an expired one; `nbf` stays optional.
        validation.validate_nbf = true;
        validation.validate_aud = false;
        // Config was validated: every public topic pattern parses.
        let public_topics = auth
            .public_topics
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        Ok(Self {
            verifier: Some(Verifier { key, validation }),
            public_topics,
            tenancy,
        })
    }

    /// Whether auth is on.
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Resolves the caller from the request's token, if any. A token that is
    /// present but invalid is an error even where anonymous access would do.
    pub fn caller(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Caller, AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Caller::Open);
        };
        let Some(token) = find_token(headers, query)? else {
            return Ok(Caller::Anonymous);
        };
        let data = jsonwebtoken::decode::<Claims>(&token, &verifier.key, &verifier.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let parse_all = |patterns: &[String]| {
            patterns
                .iter()
                .filter_map(|p| Pattern::parse(p).ok())
                .collect()
        };
        if let Some(org) = &claims.org {
            let ok = !org.is_empty()
                && org.len() <= 64
                && org
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(AuthError::Invalid(
                    "`org` must be 1 to 64 characters of [A-Za-z0-9_-]".into(),
                ));
            }
        }
        Ok(Caller::Token(Principal {
            subscribe: parse_all(&claims.subscribe),
            publish: parse_all(&claims.publish),
            org: claims.org,
            expires_at: claims.exp,
            rate_key: hash_token(&token),
        }))
    }

    /// May `caller` read `topics`? Returns the scope to store them under.
    pub fn subscribe(&self, caller: &Caller, topics: &[Topic]) -> Result<Scope, AuthError> {
        self.check(caller, topics, "subscribe to", |p| &p.subscribe, true)
    }

    /// May `caller` publish to `topics`?
    pub fn publish(&self, caller: &Caller, topics: &[Topic]) -> Result<Scope, AuthError> {
        self.check(caller, topics, "publish to", |p| &p.publish, false)
    }

    /// The scope of a caller for listings: `None` = may see nothing.
    pub fn listing_scope(&self, caller: &Caller) -> Result<Scope, AuthError> {
        match caller {
            Caller::Open => Ok(Scope::Global),
            Caller::Anonymous if self.tenancy => Err(AuthError::Missing),
            Caller::Anonymous => Ok(Scope::Global),
            Caller::Token(p) => self.scope_of(p),
        }
    }

    /// May `caller` see `topic` (unscoped) in a listing? Only if it may
    /// subscribe to it: a listing shows counts and ids, which are what a
    /// subscription reveals, so a publish-only right shows nothing.
    pub fn may_list(&self, caller: &Caller, topic: &Topic) -> bool {
        match caller {
            Caller::Open => true,
            Caller::Anonymous => any_match(&self.public_topics, topic),
            Caller::Token(p) => any_match(&p.subscribe, topic),
        }
    }

    fn scope_of(&self, principal: &Principal) -> Result<Scope, AuthError> {
        if !self.tenancy {
            return Ok(Scope::Global);
        }
        principal
            .org
            .clone()
            .map(Scope::Org)
            .ok_or(AuthError::NoOrg)
    }

    fn check(
        &self,
        caller: &Caller,
        topics: &[Topic],
        action: &'static str,
        allowed: fn(&Principal) -> &Vec<Pattern>,
        anonymous_public: bool,
    ) -> Result<Scope, AuthError> {
        match caller {
            Caller::Open => Ok(Scope::Global),
            Caller::Anonymous => {
                // Tenancy: every topic belongs to an org, so there is nothing public.
                if !anonymous_public
                    || self.tenancy
                    || !topics.iter().all(|t| any_match(&self.public_topics, t))
                {
                    return Err(AuthError::Missing);
                }
                Ok(Scope::Global)
            }
            Caller::Token(principal) => {
                let scope = self.scope_of(principal)?;
                // Public topics stay readable with a token too (not under tenancy).
                let public = |t: &Topic| {
                    anonymous_public && !self.tenancy && any_match(&self.public_topics, t)
                };
                if let Some(topic) = topics
                    .iter()
                    .find(|t| !any_match(allowed(principal), t) && !public(t))
                {
                    return Err(AuthError::Forbidden {
                        action,
                        topic: topic.to_string(),
                    });
                }
                Ok(scope)
            }
        }
    }
}

/// Finds the token: `Authorization: Bearer`, then the cookie, then `?access_token=`.
fn find_token(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Invalid("Authorization is not text".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Invalid("Authorization must be `Bearer <token>`".into()))?;
        return Ok(Some(token.trim().to_owned()));
    }
    for cookies in headers.get_all(header::COOKIE) {
        let Ok(cookies) = cookies.to_str() else {
            continue;
        };
        for pair in cookies.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name == TOKEN_COOKIE && !value.is_empty() {
                    return Ok(Some(value.to_owned()));
                }
            }
        }
    }
    let from_query = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, v)| k == "access_token" && !v.is_empty())
        .map(|(_, v)| v.into_owned());
    Ok(from_query)
}

fn hash_token(token: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut hasher);
    hasher.finish()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs an HS256 token (for `sse-gateway token`, development and tests).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn tenancy_scoping_round_trips_and_never_crosses_orgs() {
        let a = Scope::Org("A".into());
        let b = Scope::Org("B".into());
        assert_eq!(
            a.apply(&topic("projects:all")).unwrap().as_str(),
            "projects:org:A:all"
        );
        assert_eq!(a.apply(&topic("foo")).unwrap().as_str(), "foo:org:A");
        assert_eq!(
            a.apply(&topic("projects:project:x:y")).unwrap().as_str(),
            "projects:org:A:project:x:y"
        );
        for t in [
            "projects:all",
            "foo",
            "a:b:c",
            "projects:org:B:all",
            "x:org:B",
        ] {
            let stored = a.apply(&topic(t)).unwrap();
            assert_eq!(a.strip(&stored).unwrap().as_str(), t);
            assert_eq!(b.strip(&stored), None, "{t} of A is invisible to B");
            assert_ne!(stored, b.apply(&topic(t)).unwrap());
        }
        // A name that looks scoped to B, asked for by A, stays inside A.
        assert_eq!(
            a.apply(&topic("projects:org:B:all")).unwrap().as_str(),
            "projects:org:A:org:B:all"
        );
        assert_eq!(
            Scope::Org("AB".into()).strip(&topic("projects:org:A:all")),
            None
        );
        assert_eq!(a.strip(&topic("projects:org:AB:all")), None);
    }

    #[test]
    fn token_sources_in_order() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            find_token(&headers, Some("access_token=q"))
                .unwrap()
                .as_deref(),
            Some("q")
        );
        headers.insert(header::COOKIE, "a=b; sse_gateway_token=c".parse().unwrap());
        assert_eq!(
            find_token(&headers, Some("access_token=q"))
                .unwrap()
                .as_deref(),
            Some("c")
        );
        headers.insert(header::AUTHORIZATION, "Bearer h".parse().unwrap());
        assert_eq!(
            find_token(&headers, Some("access_token=q"))
                .unwrap()
                .as_deref(),
            Some("h")
        );
        headers.insert(header::AUTHORIZATION, "Basic x".parse().unwrap());
        assert!(find_token(&headers, None).is_err());
    }
}
