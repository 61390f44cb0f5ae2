//! Idempotency keys (`Idempotency-Key`, IETF draft-ietf-httpapi-idempotency-key-header):
//! their syntax, their scope (one org's keys never meet another's) and the
//! digest that tells "the same request again" from "the same key reused".
//!
//! Validated once here; the log stores a [`StoredKey`] beside the event it
//! guards, in the same atomic write. No I/O happens here.

use sha2::{Digest, Sha256};

use crate::model::{EventName, Topic};

/// Longest key a client may send (the contract: 1 to 255 visible ASCII characters).
pub const MAX_KEY_LEN: usize = 255;

/// Why a client's key was refused. `400 invalid_idempotency_key` at the HTTP edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Idempotency-Key{where_}: a key is 1 to 255 visible ASCII characters (0x21-0x7E, no spaces)")]
pub struct KeyError {
    /// Where the key came from, for the message (` in events[3].idempotency_key`).
    pub where_: String,
}

/// A client's key, validated: 1 to 255 bytes of `0x21..=0x7E`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(String);

impl ClientKey {
    /// Validates `raw` (the header's whole value, or an item's `idempotency_key`).
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_KEY_LEN
            && raw.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(KeyError {
                where_: String::new(),
            })
        }
    }

    /// The key of item `index` of a batch sent with this key in its header:
    /// `<key>#<index>`, so a retried batch replays item by item. May be
    /// longer than a client key (it is never parsed back).
    pub fn for_item(&self, index: usize) -> Self {
        Self(format!("{}#{index}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key as the log stores it: scoped to its org, with the digest of the
/// request it first came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// `<org>:<key>` (`:<key>` without tenancy). Orgs hold no `:`, so two
    /// orgs' keys never collide.
    pub scoped: String,
    /// SHA-256 of the normalized event ([`request_digest`]).
    pub digest: [u8; 32],
}

impl StoredKey {
    /// Binds `key` to one org and one normalized event.
    pub fn new(
        org: Option<&str>,
        key: &ClientKey,
        topics: &[Topic],
        name: &EventName,
        data: &str,
    ) -> Self {
        Self {
            scoped: format!("{}:{}", org.unwrap_or(""), key.as_str()),
            digest: request_digest(org, topics, name, data),
        }
    }
}

/// The digest of a normalized event: org, stored topics (resolved, repeats
/// removed, in order), event name and compact data. Whatever route carried
/// the event (`/topics/{t}`, `/publish`, a broadcast route, a batch item),
/// the same event has the same digest, so a retry through another route
/// replays. Every field is length-prefixed, so no two events share an input.
pub fn request_digest(
    org: Option<&str>,
    topics: &[Topic],
    name: &EventName,
    data: &str,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    field(org.unwrap_or("").as_bytes());
    field(&(topics.len() as u64).to_be_bytes());
    for topic in topics {
        field(topic.as_str().as_bytes());
    }
    field(name.as_str().as_bytes());
    field(data.as_bytes());
    hash.finalize().into()
}

/// Lowercase hex of a digest (Redis values, exports).
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`hex`]'s output back.
pub fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_1_to_255_visible_ascii() {
        for ok in [
            "a",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            "\"quoted\"",
            &"x".repeat(255),
        ] {
            assert!(ClientKey::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", " a", "a b", "é", "a\tb", &"x".repeat(256), "\u{7f}"] {
            assert!(ClientKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_digest_tells_every_field_apart() {
        let t = |s: &str| Topic::parse(s).unwrap();
        let n = EventName::parse("e").unwrap();
        let base = request_digest(None, &[t("a"), t("b")], &n, "1");
        assert_eq!(base, request_digest(None, &[t("a"), t("b")], &n, "1"));
        assert_ne!(base, request_digest(Some("o"), &[t("a"), t("b")], &n, "1"));
        assert_ne!(base, request_digest(None, &[t("b"), t("a")], &n, "1"));
        assert_ne!(base, request_digest(None, &[t("a")], &n, "1"));
        assert_ne!(
            base,
            request_digest(None, &[t("a"), t("b")], &EventName::default_name(), "1")
        );
        assert_ne!(base, request_digest(None, &[t("a"), t("b")], &n, "2"));
        assert_eq!(parse_hex(&hex(&base)), Some(base));
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn scoped_keys_differ_per_org() {
        let key = ClientKey::parse("k").unwrap();
        let n = EventName::default_name();
        let a = StoredKey::new(Some("a"), &key, &[], &n, "1");
        let b = StoredKey::new(Some("b"), &key, &[], &n, "1");
        assert_ne!(a.scoped, b.scoped);
        assert_eq!(StoredKey::new(None, &key, &[], &n, "1").scoped, ":k");
        assert_eq!(key.for_item(3).as_str(), "k#3");
    }
}
