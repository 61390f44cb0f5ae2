//! Validated domain values: topics, event names, event ids and resume points.
//!
//! Everything that arrives from a client is turned into one of these newtypes
//! once, at the edge; nothing past an extractor holds an unvalidated string.
//! No I/O happens here.

use std::fmt;

/// Longest topic name, in bytes (docs/API.md: 1 to 200 bytes).
pub const MAX_TOPIC_LEN: usize = 200;
/// Longest event name, in bytes (docs/API.md: 1 to 100).
pub const MAX_EVENT_NAME_LEN: usize = 100;
/// Most topics one event may be published to, or one stream may follow.
pub const MAX_TOPICS: usize = 64;
/// The event name used when a publish gives none.
pub const DEFAULT_EVENT_NAME: &str = "message";
/// The event name the gateway itself uses to say a resume point is unusable.
pub const RESET_EVENT_NAME: &str = "reset";

/// Why a client-supplied value was refused. Mapped to a 400 at the HTTP edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid topic {0:?}: a topic is 1 to 200 bytes of [A-Za-z0-9._~:@-]")]
    Topic(String),
    #[error("a request names 1 to {MAX_TOPICS} topics; this one names {0}")]
    TopicCount(usize),
    #[error("invalid event name {0:?}: an event name is 1 to 100 bytes of [A-Za-z0-9._:-]")]
    EventName(String),
    #[error("the event name \"reset\" is reserved for the gateway; choose another name")]
    ReservedEventName,
}

/// A topic name: 1 to 200 bytes of `[A-Za-z0-9._~:@-]`, case-sensitive.
///
/// `/` is not in the alphabet, which is what makes the log's index key
/// `t/<topic>/<seq>` unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Validates `raw` against the topic grammar.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_TOPIC_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~:@-".contains(&b));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValidationError::Topic(truncate_for_message(raw)))
        }
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic pattern: an exact topic, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(String),
    Prefix(String),
}

impl TopicPattern {
    /// Parses a pattern; the part before a trailing `*` must be topic characters.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok_chars = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~:@-".contains(&b))
        };
        match raw.strip_suffix('*') {
            Some(prefix) if ok_chars(prefix) && prefix.len() < MAX_TOPIC_LEN => {
                Ok(Self::Prefix(prefix.to_owned()))
            }
            None if Topic::parse(raw).is_ok() => Ok(Self::Exact(raw.to_owned())),
            _ => Err(format!("{raw:?} is not a topic or a `prefix*` pattern")),
        }
    }

    /// Whether `topic` is the exact topic or starts with the prefix.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == topic,
            Self::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }
}

/// Whether `text` may stand as a literal part of a topic template: empty, or
/// topic characters only (a route's template is checked once, at config load).
pub fn literal_topic_ok(text: &str) -> bool {
    text.is_empty() || Topic::parse(text).is_ok()
}

/// Parses a list of raw topic names: validates each, removes repeats keeping
/// first-seen order, and enforces 1..=64 topics.
pub fn parse_topic_list<'a>(
    raw: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Topic>, ValidationError> {
    let mut topics: Vec<Topic> = Vec::new();
    for name in raw {
        let topic = Topic::parse(name)?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
        if topics.len() > MAX_TOPICS {
            return Err(ValidationError::TopicCount(topics.len()));
        }
    }
    if topics.is_empty() {
        return Err(ValidationError::TopicCount(0));
    }
    Ok(topics)
}

/// An event name: `[A-Za-z0-9._:-]{1,100}`, never `reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventName(String);

impl EventName {
    /// Validates a client-chosen event name (refuses the reserved `reset`).
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_EVENT_NAME_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !ok {
            return Err(ValidationError::EventName(truncate_for_message(raw)));
        }
        if raw == RESET_EVENT_NAME {
            return Err(ValidationError::ReservedEventName);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The default name, `message`.
    pub fn default_name() -> Self {
        Self(DEFAULT_EVENT_NAME.to_owned())
    }

    /// Rebuilds a name read back from our own log, where it was validated on
    /// the way in. The log decoder checks the grammar again and reports
    /// corruption instead of calling this with garbage.
    pub(crate) fn from_log(raw: String) -> Self {
        Self(raw)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The epoch part of an id: a short `[A-Za-z0-9]` string fixed for one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch(String);

impl Epoch {
    /// Length of a freshly generated epoch.
    pub const LEN: usize = 8;

    /// A new random epoch, for a new log.
    pub fn generate() -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        Self(Alphanumeric.sample_string(&mut rand::rng(), Self::LEN))
    }

    /// Accepts a stored epoch if it has the epoch grammar.
    pub fn parse(raw: &str) -> Option<Self> {
        let ok =
            !raw.is_empty() && raw.len() <= 32 && raw.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| Self(raw.to_owned()))
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The external id of sequence number `seq` in this log: `<epoch>-<seq>`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{}", self.0, seq)
    }
}

/// Where a subscriber asked to start, before it is checked against the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumePoint {
    /// No resume id: live only, from now on.
    Live,
    /// The literal `0`: all retained history, never a `reset`.
    Everything,
    /// `<epoch>-<seq>` of this log: resume after `seq` (0 = before the first event).
    After(u64),
    /// Anything else: not an id, another log's epoch, or a non-canonical number.
    /// Kept verbatim so the `reset` can echo it back.
    Unknown(String),
}

impl ResumePoint {
    /// Interprets a raw resume id against this log's epoch. An empty value
    /// counts as absent; callers pass `None` when no id was sent.
    pub fn parse(raw: Option<&str>, epoch: &Epoch) -> Self {
        let raw = match raw {
            None | Some("") => return Self::Live,
            Some(raw) => raw,
        };
        if raw == "0" {
            return Self::Everything;
        }
        let Some((epoch_part, seq_part)) = raw.rsplit_once('-') else {
            return Self::Unknown(raw.to_owned());
        };
        if epoch_part != epoch.as_str() {
            return Self::Unknown(raw.to_owned());
        }
        match parse_canonical_u64(seq_part) {
            Some(seq) => Self::After(seq),
            None => Self::Unknown(raw.to_owned()),
        }
    }
}

/// Parses a canonical decimal u64: digits only, no sign, no leading zeros
/// (except `0` itself), no overflow.
pub fn parse_canonical_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// Error messages echo what was sent, but never unboundedly much of it.
fn truncate_for_message(raw: &str) -> String {
    const MAX: usize = 64;
    if raw.len() <= MAX {
        return raw.to_owned();
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &raw[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        let p = TopicPattern::parse("projects:project:*").unwrap();
        assert!(p.matches("projects:project:abc"));
        assert!(!p.matches("projects:all"));
        assert!(TopicPattern::parse("*").unwrap().matches("anything"));
        assert!(TopicPattern::parse("a*b").is_err());
        assert!(TopicPattern::parse("a b").is_err());
        assert_eq!(
            TopicPattern::parse("x").unwrap(),
            TopicPattern::Exact("x".into())
        );
    }

    #[test]
    fn topic_grammar() {
        assert!(Topic::parse("projects:project:3f1c-AB_x.~@").is_ok());
        assert!(Topic::parse(&"a".repeat(200)).is_ok());
        for bad in ["", "a/b", "a b", "é", &"a".repeat(201), "a%41", "a\n"] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn topic_list_dedups_in_order_and_bounds_count() {
        let topics = parse_topic_list(["b", "a", "b"]).unwrap();
        assert_eq!(
            topics.iter().map(Topic::as_str).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(parse_topic_list([]), Err(ValidationError::TopicCount(0)));
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        assert!(parse_topic_list(many.iter().map(String::as_str)).is_err());
        let repeated: Vec<&str> = std::iter::repeat_n("same", 100).collect();
        assert_eq!(parse_topic_list(repeated).unwrap().len(), 1);
    }

    #[test]
    fn event_name_grammar() {
        assert!(EventName::parse("project_created").is_ok());
        assert!(EventName::parse("a.b:c-d").is_ok());
        assert_eq!(
            EventName::parse("reset"),
            Err(ValidationError::ReservedEventName)
        );
        for bad in ["", "a b", "a~", &"x".repeat(101), "a\r"] {
            assert!(EventName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn epoch_grammar() {
        for good in ["a", "Z9", "abc123", &"x".repeat(32)] {
            assert_eq!(
                Epoch::parse(good).map(|e| e.id(7)),
                Some(format!("{good}-7"))
            );
        }
        for bad in ["", &"x".repeat(33), "ab-c", "a b", "é", "ab_c"] {
            assert_eq!(Epoch::parse(bad), None, "{bad:?} should be refused");
        }
        assert_eq!(Epoch::generate().as_str().len(), Epoch::LEN);
    }

    #[test]
    fn resume_point_parsing() {
        let epoch = Epoch::parse("abc123").unwrap();
        let parse = |raw| ResumePoint::parse(raw, &epoch);
        assert_eq!(parse(None), ResumePoint::Live);
        assert_eq!(parse(Some("")), ResumePoint::Live);
        assert_eq!(parse(Some("0")), ResumePoint::Everything);
        assert_eq!(parse(Some("abc123-0")), ResumePoint::After(0));
        assert_eq!(parse(Some("abc123-42")), ResumePoint::After(42));
        for unknown in [
            "abc123-042",
            "abc123-+1",
            "abc123--1",
            "abc123-",
            "other-1",
            "42",
            "garbage",
            "abc123-18446744073709551616",
            "ABC123-1",
        ] {
            assert_eq!(
                parse(Some(unknown)),
                ResumePoint::Unknown(unknown.into()),
                "{unknown}"
            );
        }
    }
}
