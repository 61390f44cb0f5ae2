//! Property tests (proptest): the grammars of API.md against independent
//! regex oracles, in both directions; JSON "as sent" through
//! `json::compact` → the sled log → `sse::event_frame` → a WHATWG SSE parser
//! (and once more over real HTTP); the route evaluator on arbitrary payloads;
//! config's unknown-key errors; `json::compact` on arbitrary text. Plus the
//! regression test of a bug this work found: broadcast payloads with numbers
//! beyond f64 (`1e999`, valid JSON) were refused as `invalid_json`.
//!
//! Case counts are small so the suite stays fast on 2 cores; set
//! `PROPTEST_CASES` for a deeper local run. Failures print the shrunk input;
//! no regression files are written into the tree.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use regex::Regex;
use reqwest::StatusCode;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use sse_gateway::hub::Hub;
use sse_gateway::json::{self, JsonError};
use sse_gateway::log::sled::SledOptions;
use sse_gateway::log::{Log, NewEvent, RetentionPolicy, SledLog};
use sse_gateway::metrics::Metrics;
use sse_gateway::model::{parse_canonical_u64, Epoch, EventName, ResumePoint, Topic};
use sse_gateway::routes::{projects_routes, Conditional, FieldFormat, RouteError, RouteSpec};
use sse_gateway::{sse, Config};

use crate::common::*;

// ------------------------------------------------------------------ setup

/// Fewest cases any property runs, whatever `PROPTEST_CASES` says: a run
/// of 0 cases would pass every property without checking one.
const MIN_CASES: u32 = 32;

/// `cases` unless `PROPTEST_CASES` says otherwise (never under
/// [`MIN_CASES`]); no regression files.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases)
        .max(MIN_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The oracles: API.md's grammars written as regexes, independent of `model.rs`.
static TOPIC_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A[A-Za-z0-9._~:@-]{1,200}\z").unwrap());
static EVENT_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A[A-Za-z0-9._:-]{1,100}\z").unwrap());
static CANONICAL_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A(?:0|[1-9][0-9]*)\z").unwrap());
static ID_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)\A(.*)-((?:0|[1-9][0-9]*))\z").unwrap());

const TOPIC_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:@-";
const EVENT_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";
const EPOCH_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The oracle for a canonical decimal u64: the regex, and no overflow.
fn canonical_u64_oracle(s: &str) -> Option<u64> {
    const MAX: &str = "18446744073709551615";
    let fits = s.len() < MAX.len() || (s.len() == MAX.len() && s <= MAX);
    (CANONICAL_RE.is_match(s) && fits).then(|| s.parse::<u128>().unwrap() as u64)
}

// ------------------------------------------------------------- strategies

fn from_alphabet(alphabet: &'static str) -> impl Strategy<Value = char> {
    prop::sample::select(alphabet.chars().collect::<Vec<_>>())
}

fn grammar_string(
    alphabet: &'static str,
    len: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = String> {
    prop::collection::vec(from_alphabet(alphabet), len).prop_map(|v| v.into_iter().collect())
}

/// Characters that try hard to be confused with a grammar: controls, NUL,
/// separators, percent signs, look-alike digits and letters, BOM, max char.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
        prop::sample::select(vec![
            '\u{7f}',
            ' ',
            '/',
            '\\',
            '%',
            '+',
            '#',
            '?',
            '&',
            '=',
            '"',
            '\'',
            ',',
            ';',
            '*',
            '!',
            '$',
            '(',
            ')',
            '[',
            ']',
            '{',
            '}',
            '|',
            '^',
            '`',
            '<',
            '>',
            'é',
            'ß',
            'İ',
            'ı',
            'K',
            '\u{0661}',
            '\u{ff11}',
            '\u{2212}',
            '\u{2010}',
            '\u{200b}',
            '\u{feff}',
            '\u{2028}',
            '\u{fffd}',
            '\u{10ffff}',
            '\u{1f600}',
        ]),
    ]
}

/// Any character, biased towards the grammars' alphabets and the tricky ones.
fn mixed_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => from_alphabet(TOPIC_ALPHABET),
        2 => tricky_char(),
        2 => any::<char>(),
    ]
}

fn mixed_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(mixed_char(), 0..=max).prop_map(|v| v.into_iter().collect())
}

/// A char outside `alphabet`.
fn char_outside(alphabet: &'static str) -> impl Strategy<Value = char> {
    prop_oneof![tricky_char(), any::<char>()]
        .prop_filter("outside the alphabet", move |c| !alphabet.contains(*c))
}

/// A valid string with one character outside the alphabet put in somewhere.
fn with_foreign_char(
    alphabet: &'static str,
    len: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(from_alphabet(alphabet), len),
        char_outside(alphabet),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut chars, bad, at)| {
            let at = at.index(chars.len() + 1);
            chars.insert(at, bad);
            chars.into_iter().collect()
        })
}

/// Long strings (up to 100 000 bytes) of grammar characters or anything.
fn huge_string(alphabet: &'static str) -> impl Strategy<Value = String> {
    (201usize..100_000, prop::option::of(mixed_char())).prop_map(move |(n, c)| {
        let c = c.unwrap_or_else(|| alphabet.chars().nth(n % alphabet.len()).unwrap());
        c.to_string().repeat(n / c.len_utf8())
    })
}

// ------------------------------------------------------------ the grammars

/// Compares `Topic::parse` with the oracle; accepted names come back verbatim.
fn check_topic(raw: &str) -> Result<(), TestCaseError> {
    let expected = TOPIC_RE.is_match(raw);
    match Topic::parse(raw) {
        Ok(topic) => {
            prop_assert!(expected, "accepted {raw:?}, which the grammar refuses");
            prop_assert_eq!(topic.as_str(), raw);
        }
        Err(e) => {
            prop_assert!(
                !expected,
                "refused {raw:?} ({e}), which the grammar accepts"
            );
            prop_assert!(e.to_string().contains("invalid topic"), "{}", e);
        }
    }
    Ok(())
}

fn check_event_name(raw: &str) -> Result<(), TestCaseError> {
    let expected = EVENT_RE.is_match(raw) && raw != "reset";
    match EventName::parse(raw) {
        Ok(name) => {
            prop_assert!(expected, "accepted event name {raw:?}");
            prop_assert_eq!(name.as_str(), raw);
        }
        Err(e) => {
            prop_assert!(!expected, "refused event name {raw:?} ({e})");
            if raw == "reset" {
                prop_assert!(e.to_string().contains("reserved"), "{}", e);
            }
        }
    }
    Ok(())
}

fn check_canonical(raw: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        parse_canonical_u64(raw),
        canonical_u64_oracle(raw),
        "{:?}",
        raw
    );
    Ok(())
}

/// The resume-point oracle: API.md "Resume point" and "id".
fn resume_oracle(raw: Option<&str>, epoch: &str) -> ResumePoint {
    let raw = match raw {
        None | Some("") => return ResumePoint::Live,
        Some(raw) => raw,
    };
    if raw == "0" {
        return ResumePoint::Everything;
    }
    match ID_RE.captures(raw) {
        Some(c) if &c[1] == epoch => match canonical_u64_oracle(&c[2]) {
            Some(seq) => ResumePoint::After(seq),
            None => ResumePoint::Unknown(raw.to_owned()),
        },
        _ => ResumePoint::Unknown(raw.to_owned()),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn topic_names_from_the_grammar_are_accepted(raw in grammar_string(TOPIC_ALPHABET, 1..=200)) {
        prop_assert!(TOPIC_RE.is_match(&raw));
        check_topic(&raw)?;
    }

    #[test]
    fn topic_names_with_a_foreign_char_or_too_long_are_refused(
        raw in prop_oneof![
            with_foreign_char(TOPIC_ALPHABET, 0..=199),
            grammar_string(TOPIC_ALPHABET, 201..=600),
            huge_string(TOPIC_ALPHABET),
            Just(String::new()),
        ]
    ) {
        prop_assert!(Topic::parse(&raw).is_err(), "{:?} accepted", raw);
        check_topic(&raw)?;
    }

    #[test]
    fn topic_parse_matches_the_oracle_on_any_string(raw in mixed_string(260)) {
        check_topic(&raw)?;
    }

    #[test]
    fn event_names_from_the_grammar_are_accepted_except_reset(
        raw in prop_oneof![grammar_string(EVENT_ALPHABET, 1..=100), Just("reset".to_owned())]
    ) {
        check_event_name(&raw)?;
        prop_assert_eq!(EventName::parse(&raw).is_ok(), raw != "reset");
    }

    #[test]
    fn event_names_with_a_foreign_char_or_too_long_are_refused(
        raw in prop_oneof![
            with_foreign_char(EVENT_ALPHABET, 0..=99),
            grammar_string(EVENT_ALPHABET, 101..=300),
            huge_string(EVENT_ALPHABET),
            Just(String::new()),
        ]
    ) {
        prop_assert!(EventName::parse(&raw).is_err(), "{:?} accepted", raw);
        check_event_name(&raw)?;
    }

    #[test]
    fn event_name_parse_matches_the_oracle_on_any_string(raw in mixed_string(130)) {
        check_event_name(&raw)?;
    }

    #[test]
    fn canonical_u64_accepts_exactly_canonical_decimals(
        n in any::<u64>(),
        raw in prop_oneof![
            "[0-9]{0,22}",
            "[+-]?0*[0-9]{1,21}",
            "[0-9٠-٩０-９ +_.e-]{0,22}",
            mixed_string(30),
            huge_string("0123456789"),
        ]
    ) {
        prop_assert_eq!(parse_canonical_u64(&n.to_string()), Some(n));
        prop_assert_eq!(parse_canonical_u64(&format!("0{n}")), None);
        prop_assert_eq!(parse_canonical_u64(&format!("+{n}")), None);
        prop_assert_eq!(
            parse_canonical_u64(&(u128::from(n) + u128::from(u64::MAX) + 1).to_string()),
            None
        );
        check_canonical(&raw)?;
    }

    #[test]
    fn resume_points_follow_the_id_grammar(
        epoch in grammar_string(EPOCH_ALPHABET, 1..=32),
        other in grammar_string(EPOCH_ALPHABET, 1..=32),
        seq in any::<u64>(),
        noise in mixed_string(40),
        pick in 0usize..14,
    ) {
        let candidates: [Option<String>; 14] = [
            None,
            Some(String::new()),
            Some("0".into()),
            Some(format!("{epoch}-{seq}")),
            Some(format!("{epoch}-0")),
            Some(format!("{epoch}-0{seq}")),
            Some(format!("{other}-{seq}")),
            Some(format!("{epoch}-{noise}")),
            Some(format!("{noise}-{seq}")),
            Some(format!("{epoch}-{}", u128::from(seq) + u128::from(u64::MAX) + 1)),
            Some(noise.clone()),
            Some(format!("{epoch}-{seq}{noise}")),
            Some(format!("{}-{seq}", epoch.to_uppercase())),
            Some(format!("{}-{seq}", epoch.to_lowercase())),
        ];
        let ep = Epoch::parse(&epoch).expect("generated epochs have the grammar");
        for raw in &candidates {
            let got = ResumePoint::parse(raw.as_deref(), &ep);
            prop_assert_eq!(&got, &resume_oracle(raw.as_deref(), &epoch), "{:?}", raw);
        }
        // The generated id of this log always resumes after its sequence.
        prop_assert_eq!(
            ResumePoint::parse(Some(&ep.id(seq)), &ep),
            ResumePoint::After(seq)
        );
        let raw = &candidates[pick];
        prop_assert_eq!(
            ResumePoint::parse(raw.as_deref(), &ep),
            resume_oracle(raw.as_deref(), &epoch)
        );
    }
}

// ---------------------------------------------------------- JSON as sent

/// One generated JSON value, written twice: with random insignificant
/// whitespace (what a publisher sends) and without (what must come out).
#[derive(Debug, Clone)]
struct JsonText {
    spaced: String,
    compact: String,
}

impl JsonText {
    fn same(text: String) -> Self {
        Self {
            spaced: text.clone(),
            compact: text,
        }
    }
}

fn ws() -> impl Strategy<Value = String> {
    "[ \t\n\r]{0,3}"
}

/// One piece of a JSON string body, already escaped as JSON text.
fn string_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        // Printable ASCII but `"` and `\`, spaces included (they must survive).
        3 => "[ !#-\\[\\]-~]{1,6}",
        // Raw UTF-8: anything JSON allows unescaped (no controls, `"`, `\`).
        2 => any::<char>()
            .prop_filter("allowed raw", |c| *c >= ' ' && *c != '"' && *c != '\\')
            .prop_map(String::from),
        2 => prop::sample::select(vec!["\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"])
            .prop_map(str::to_owned),
        // \uXXXX of a non-surrogate unit, either hex case.
        2 => (0u32..=0xffff, any::<bool>())
            .prop_filter("not a surrogate", |(u, _)| !(0xd800..=0xdfff).contains(u))
            .prop_map(|(u, upper)| if upper { format!("\\u{u:04X}") } else { format!("\\u{u:04x}") }),
        // A surrogate pair.
        1 => (0xd800u32..=0xdbff, 0xdc00u32..=0xdfff, any::<bool>()).prop_map(|(h, l, upper)| {
            if upper { format!("\\u{h:04X}\\u{l:04X}") } else { format!("\\u{h:04x}\\u{l:04x}") }
        }),
        1 => Just("\\u00e9".to_owned()),
    ]
}

fn json_string() -> impl Strategy<Value = String> {
    prop::collection::vec(string_piece(), 0..8).prop_map(|p| format!("\"{}\"", p.concat()))
}

/// Object keys: a few fixed ones (so duplicates happen) or any string.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["\"a\"", "\"b\"", "\"id\"", "\"\"", "\"a b\""])
            .prop_map(str::to_owned),
        json_string(),
    ]
}

fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        1 => prop::sample::select(vec![
            "-0", "1.0", "1e2", "1E+2", "-0.0", "0e0", "1.5e-300", "1e999",
            "123456789012345678901234567890", "-9223372036854775809", "18446744073709551616",
        ])
        .prop_map(str::to_owned),
    ]
}

fn json_text() -> impl Strategy<Value = JsonText> {
    let leaf = prop_oneof![
        prop::sample::select(vec!["true", "false", "null"]).prop_map(|s| JsonText::same(s.into())),
        json_number().prop_map(JsonText::same),
        json_string().prop_map(JsonText::same),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            (
                ws(),
                prop::collection::vec((ws(), inner.clone(), ws()), 0..6)
            )
                .prop_map(|(empty_ws, items)| {
                    let spaced: Vec<String> = items
                        .iter()
                        .map(|(a, v, b)| format!("{a}{}{b}", v.spaced))
                        .collect();
                    let compact: Vec<&str> =
                        items.iter().map(|(_, v, _)| v.compact.as_str()).collect();
                    JsonText {
                        spaced: if items.is_empty() {
                            format!("[{empty_ws}]")
                        } else {
                            format!("[{}]", spaced.join(","))
                        },
                        compact: format!("[{}]", compact.join(",")),
                    }
                }),
            (
                ws(),
                prop::collection::vec((ws(), json_key(), ws(), ws(), inner, ws()), 0..6)
            )
                .prop_map(|(empty_ws, members)| {
                    let spaced: Vec<String> = members
                        .iter()
                        .map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{}{d}", v.spaced))
                        .collect();
                    let compact: Vec<String> = members
                        .iter()
                        .map(|(_, k, _, _, v, _)| format!("{k}:{}", v.compact))
                        .collect();
                    JsonText {
                        spaced: if members.is_empty() {
                            format!("{{{empty_ws}}}")
                        } else {
                            format!("{{{}}}", spaced.join(","))
                        },
                        compact: format!("{{{}}}", compact.join(",")),
                    }
                }),
        ]
    })
}

/// A whole document: the value with whitespace around it too.
fn json_document() -> impl Strategy<Value = JsonText> {
    (ws(), json_text(), ws()).prop_map(|(a, v, b)| JsonText {
        spaced: format!("{a}{}{b}", v.spaced),
        compact: v.compact,
    })
}

/// The whitespace-stripping oracle: drops ` \t\n\r` outside strings, keeps
/// every other character. Written independently of `json::compact`.
fn strip_insignificant_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// The SSE events of `frame`, fed to the WHATWG parser in two chunks.
fn parse_sse(frame: &[u8], split: prop::sample::Index) -> Vec<SseEvent> {
    let at = split.index(frame.len() + 1);
    let mut parser = SseParser::default();
    let mut events = parser.feed(&frame[..at]);
    events.extend(parser.feed(&frame[at..]));
    events
}

/// A sled log in a temp dir, as `App` opens it, with its runtime.
struct TempLog {
    // Dropped in this order: the log, its runtime, then the directory.
    log: SledLog,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl TempLog {
    fn open() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::TempDir::new().expect("tempdir");
        let options = SledOptions {
            key_window: std::time::Duration::from_secs(86_400),
            cache_capacity_bytes: 8 * 1024 * 1024,
            publish_queue: 64,
            max_commit_batch: 64,
            retention: RetentionPolicy {
                max_events_per_topic: u64::MAX / 2,
                max_age: Duration::from_secs(24 * 3600),
                batch_events: 1000,
            },
            trim_interval: Duration::from_secs(3600),
        };
        let log = {
            let _guard = rt.enter();
            SledLog::open(
                dir.path(),
                options,
                Arc::new(Hub::new(64)),
                Arc::new(Metrics::new()),
            )
            .expect("open sled log")
        };
        Self { log, rt, _dir: dir }
    }
}

impl Drop for TempLog {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.log.close());
    }
}

#[test]
fn json_round_trips_byte_exact_through_compact_log_and_sse() {
    let store = TempLog::open();
    let topic = Topic::parse("props:json").unwrap();
    let mut runner = TestRunner::new(config(160));
    let strategy = (
        json_document(),
        grammar_string(EVENT_ALPHABET, 1..=100).prop_filter("not reserved", |n| n != "reset"),
        any::<prop::sample::Index>(),
    );
    runner
        .run(&strategy, |(doc, name, split)| {
            // What the handler does: serde_json validates, `compact` strips.
            let raw: &RawValue = serde_json::from_str(&doc.spaced)
                .map_err(|e| TestCaseError::fail(format!("generated invalid JSON: {e}")))?;
            let compact = json::compact(raw.get(), 64)
                .map_err(|e| TestCaseError::fail(format!("compact refused valid JSON: {e}")))?;
            prop_assert_eq!(&compact, &doc.compact);
            prop_assert_eq!(&compact, &strip_insignificant_whitespace(&doc.spaced));
            prop_assert!(!compact.contains(['\r', '\n']));
            // A compact text is still the same JSON.
            serde_json::from_str::<&RawValue>(&compact)
                .map_err(|e| TestCaseError::fail(format!("compact output is not JSON: {e}")))?;
            // The broadcast route evaluator's view always parses, numbers as 0.
            let view: Value = serde_json::from_str(&json::zero_numbers(&compact))
                .map_err(|e| TestCaseError::fail(format!("zero_numbers view: {e}")))?;
            if let Ok(value) = serde_json::from_str::<Value>(&compact) {
                prop_assert_eq!(view, numbers_to_zero(value));
            }

            let name = EventName::parse(&name).unwrap();
            let (seq, stored) = store.rt.block_on(async {
                let seq = store
                    .log
                    .append(NewEvent {
                        topics: vec![topic.clone()],
                        name: name.clone(),
                        data: compact.clone(),
                        key: None,
                    })
                    .await
                    .expect("append");
                let batch = store
                    .log
                    .read(
                        std::slice::from_ref(&topic),
                        seq - 1,
                        seq,
                        sse_gateway::log::ReadLimit {
                            events: 8,
                            bytes: usize::MAX,
                        },
                    )
                    .await
                    .expect("read");
                (seq, batch.events)
            });
            prop_assert_eq!(stored.len(), 1);
            prop_assert_eq!(stored[0].seq, seq);
            prop_assert_eq!(&stored[0].data[..], compact.as_bytes());
            prop_assert_eq!(stored[0].name.as_str(), name.as_str());

            let frame = sse::event_frame(store.log.epoch(), seq, name.as_str(), &stored[0].data);
            let events = parse_sse(&frame, split);
            prop_assert_eq!(events.len(), 1, "{:?}", String::from_utf8_lossy(&frame));
            prop_assert_eq!(&events[0].data, &compact);
            prop_assert_eq!(&events[0].event, name.as_str());
            prop_assert_eq!(&events[0].id, &store.log.epoch().id(seq));
            Ok(())
        })
        .unwrap();
}

/// The same round trip over real HTTP: `POST /topics/{topic}` with the
/// spaced text as `data`, read back from a live SSE stream.
#[tokio::test]
async fn json_round_trips_byte_exact_over_http() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/props:http", None).await;
    assert_eq!(stream.status, StatusCode::OK);
    stream.until_blocks(2).await; // `retry:` and the id-only block
    let mut runner = TestRunner::new(config(32));
    let strategy = json_document();
    for _ in 0..runner.config().cases {
        let doc = strategy.new_tree(&mut runner).expect("generate").current();
        let body = format!("{{\"event\":\"e\",\"data\":{}}}", doc.spaced);
        let (status, answer) = server.post_raw("/topics/props:http", body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer} for {:?}", doc.spaced);
        let event = stream.next_event().await;
        assert_eq!(event.id, answer["id"].as_str().unwrap());
        assert_eq!(event.data, doc.compact, "sent {:?}", doc.spaced);
        assert_eq!(
            event.data,
            strip_insignificant_whitespace(&doc.spaced),
            "sent {:?}",
            doc.spaced
        );
    }
}

fn numbers_to_zero(value: Value) -> Value {
    match value {
        Value::Number(_) => Value::from(0),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_to_zero).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, numbers_to_zero(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Numbers beyond f64 are valid JSON: a broadcast payload holding them is
/// routed and delivered as sent (it used to be refused as `invalid_json`).
#[tokio::test]
async fn broadcast_payload_numbers_beyond_f64_are_published_as_sent() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = server.subscribe("/topics/projects:tasks", None).await;
    stream.until_blocks(2).await;
    let payload = r#"{"n":1e999,"m":-1E+400,"big":123456789012345678901234567890,"s":"1e999"}"#;
    let body = format!("{{\"event\": \"task_updated\", \"payload\": {payload}}}");
    let (status, answer) = server.post_raw("/projects/broadcast/task", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["topics"],
        serde_json::json!(["projects:all", "projects:tasks"])
    );
    let event = stream.next_event().await;
    assert_eq!(event.event, "task_updated");
    assert_eq!(event.data, payload);
    let id = uuid::Uuid::from_u128(7).hyphenated().to_string();
    let payload = format!(r#"{{"uuid":"{id}","n":1e999}}"#);
    let body = format!("{{\"event\": \"e\", \"payload\": {payload}}}");
    let (status, answer) = server.post_raw("/projects/broadcast/project", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["topics"][1], format!("projects:project:{id}"));
}

/// A JSON document holding one string with a lone surrogate escape; returns
/// the text and the lone unit.
fn with_lone_surrogate() -> impl Strategy<Value = (String, u16)> {
    (
        prop::collection::vec(string_piece(), 0..4),
        prop_oneof![0xd800u16..=0xdbff, 0xdc00u16..=0xdfff],
        any::<bool>(),
        prop::option::of(prop_oneof![
            Just("\\u0041".to_owned()),
            Just("\\n".to_owned()),
            Just("x".to_owned()),
            (0xd800u16..=0xdbff).prop_map(|h| format!("\\u{h:04x}\\udc00")),
        ]),
        json_document(),
        0usize..3,
    )
        .prop_map(|(before, lone, upper, after, doc, shape)| {
            let escape = if upper {
                format!("\\u{lone:04X}")
            } else {
                format!("\\u{lone:04x}")
            };
            let string = format!(
                "\"{}{escape}{}\"",
                before.concat(),
                after.unwrap_or_default()
            );
            let text = match shape {
                0 => string,
                1 => format!("[{}, {string}]", doc.spaced),
                _ => format!("{{\"k\": {}, \"s\": {string}}}", doc.spaced),
            };
            (text, lone)
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn compact_never_panics_and_keeps_valid_json_as_sent(
        raw in prop_oneof![
            mixed_string(200),
            prop::collection::vec(
                prop::sample::select(vec![
                    '{', '}', '[', ']', '"', '\\', 'u', 'd', '8', 'D', 'c', '0', 'f', ':', ',',
                    ' ', '\n', '\t', '\r', '1', 'e', '-', '+', '.', 'n', 't', 'é', '\u{0}',
                ]),
                0..120,
            )
            .prop_map(|v| v.into_iter().collect::<String>()),
            json_document().prop_map(|d| d.spaced),
        ],
        max_depth in 0usize..8,
    ) {
        let compacted = json::compact(&raw, max_depth);
        if let (Ok(valid), Ok(out)) = (serde_json::from_str::<&RawValue>(&raw), &compacted) {
            prop_assert_eq!(out, &strip_insignificant_whitespace(valid.get()));
            prop_assert!(serde_json::from_str::<&RawValue>(out).is_ok());
        }
    }

    #[test]
    fn compact_refuses_lone_surrogates((text, lone) in with_lone_surrogate()) {
        // serde_json lets lone surrogate escapes through; `compact` must not.
        prop_assert!(serde_json::from_str::<&RawValue>(&text).is_ok(), "{}", text);
        prop_assert_eq!(json::compact(&text, 64), Err(JsonError::LoneSurrogate(lone)));
    }
}

// ------------------------------------------------------------------ routes

fn uuid_text() -> impl Strategy<Value = String> {
    (any::<u128>(), 0usize..6).prop_map(|(n, form)| {
        let id = uuid::Uuid::from_u128(n);
        match form {
            0 => id.hyphenated().to_string(),
            1 => id.hyphenated().to_string().to_uppercase(),
            2 => id.simple().to_string(),
            3 => id.braced().to_string(),
            4 => id.urn().to_string(),
            _ => id.hyphenated().to_string()[..35].to_owned(),
        }
    })
}

fn any_json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        uuid_text().prop_map(Value::String),
        grammar_string(TOPIC_ALPHABET, 0..=220).prop_map(Value::String),
        mixed_string(40).prop_map(Value::String),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(vec![
            "uuid", "project_uuid", "is_template", "order", "store", "slug", "flags", "urgent",
            "a", "b", "c", "d", "",
        ])
        .prop_map(str::to_owned),
        1 => mixed_string(12),
    ];
    leaf.prop_recursive(5, 96, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Payloads: anything, or objects with the routing fields in place (with
/// any value), so that the success paths are reached too.
fn payload() -> impl Strategy<Value = Value> {
    prop_oneof![
        any_json_value(),
        (
            any_json_value(),
            prop::option::of(any_json_value()),
            prop::option::of(prop_oneof![
                uuid_text().prop_map(Value::String),
                any_json_value()
            ]),
            prop::option::of(prop_oneof![
                3 => Just(Value::Bool(true)),
                1 => Just(Value::Bool(false)),
                1 => Just(Value::from("true")),
                1 => Just(Value::from(1)),
                1 => any_json_value(),
            ]),
            prop::option::of(any_json_value()),
        )
            .prop_map(|(base, slug, id, flag, deep)| {
                let mut object = match base {
                    Value::Object(map) => map,
                    _ => Map::new(),
                };
                if let Some(id) = id {
                    object.insert("uuid".into(), id.clone());
                    object.insert("project_uuid".into(), id.clone());
                    object.insert("order".into(), serde_json::json!({ "uuid": id }));
                }
                if let Some(slug) = slug {
                    object.insert("store".into(), serde_json::json!({ "slug": slug }));
                }
                if let Some(flag) = flag {
                    object.insert("is_template".into(), flag.clone());
                    object.insert("flags".into(), serde_json::json!({ "urgent": flag }));
                }
                if let Some(deep) = deep {
                    object.insert(
                        "a".into(),
                        serde_json::json!({ "b": { "c": { "d": deep } } }),
                    );
                }
                Value::Object(object)
            }),
    ]
}

/// A route of another module with nested dotted fields and conditions.
fn nested_route() -> RouteSpec {
    let route = RouteSpec {
        module: "shop".into(),
        kind: "order".into(),
        topics: vec![
            "shop:all".into(),
            "shop:order:{order.uuid}".into(),
            "shop:store:{store.slug}:{order.uuid}".into(),
        ],
        fields: BTreeMap::from([
            ("order.uuid".to_owned(), FieldFormat::Uuid),
            ("store.slug".to_owned(), FieldFormat::TopicPart),
        ]),
        when_true: vec![
            Conditional {
                field: "flags.urgent".into(),
                topics: vec!["shop:urgent".into()],
            },
            Conditional {
                field: "a.b.c.d".into(),
                topics: vec!["shop:deep:{store.slug}".into(), "shop:all".into()],
            },
        ],
    };
    route.validate().expect("the nested test route is valid");
    route
}

fn uuid_at(payload: &Value, path: &[&str]) -> Option<uuid::Uuid> {
    path.iter()
        .try_fold(payload, |v, k| v.as_object()?.get(*k))?
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn route_evaluator_never_panics_and_follows_the_rules(payload in payload()) {
        let is_object = payload.is_object();
        for route in projects_routes().iter().chain([nested_route()].iter()) {
            let result = route.topics_for(&payload);
            prop_assert_eq!(
                matches!(result, Err(RouteError::NotAnObject)),
                !is_object,
                "{}/{}: {:?}",
                &route.module,
                &route.kind,
                &result
            );
            let topics = match result {
                Ok(topics) => topics,
                Err(e) => {
                    // A refusal must be owed to the payload: not an object
                    // (checked above), or the kind's routing field missing or
                    // not a UUID. An evaluator refusing everything fails here.
                    let owed = match route.kind.as_str() {
                        "project" => uuid_at(&payload, &["uuid"]).is_none(),
                        "assignment" | "dependency" => {
                            uuid_at(&payload, &["project_uuid"]).is_none()
                        }
                        "task" => false,
                        // The nested route's own rules are checked below.
                        _ => true,
                    };
                    prop_assert!(
                        !is_object || owed,
                        "{}/{} refused a routable payload: {:?}",
                        &route.module,
                        &route.kind,
                        e
                    );
                    continue;
                }
            };
            let names: Vec<&str> = topics.iter().map(Topic::as_str).collect();
            let unique: BTreeSet<&str> = names.iter().copied().collect();
            prop_assert_eq!(unique.len(), names.len(), "repeats in {:?}", names);
            for name in &names {
                prop_assert!(TOPIC_RE.is_match(name), "{}", name);
            }
            match route.kind.as_str() {
                "project" => {
                    let id = uuid_at(&payload, &["uuid"]);
                    prop_assert!(id.is_some(), "routed without a UUID: {:?}", names);
                    let mut expected = vec![
                        "projects:all".to_owned(),
                        format!("projects:project:{}", id.unwrap().hyphenated()),
                    ];
                    if payload["is_template"] == Value::Bool(true) {
                        expected.push("projects:templates".into());
                    }
                    prop_assert_eq!(names, expected);
                }
                "task" => prop_assert_eq!(names, ["projects:all", "projects:tasks"]),
                "assignment" | "dependency" => {
                    let id = uuid_at(&payload, &["project_uuid"]);
                    prop_assert!(id.is_some(), "routed without a UUID: {:?}", names);
                    prop_assert_eq!(
                        names,
                        [
                            "projects:all".to_owned(),
                            format!("projects:project:{}", id.unwrap().hyphenated())
                        ]
                    );
                }
                _ => {
                    let id = uuid_at(&payload, &["order", "uuid"]);
                    prop_assert!(id.is_some(), "routed without a UUID: {:?}", names);
                    let id = id.unwrap().hyphenated().to_string();
                    let slug = payload["store"]["slug"].as_str().unwrap_or_default();
                    prop_assert_eq!(names[0], "shop:all");
                    prop_assert_eq!(names[1], format!("shop:order:{id}"));
                    prop_assert_eq!(names[2], format!("shop:store:{slug}:{id}"));
                    let urgent = payload["flags"]["urgent"] == Value::Bool(true);
                    prop_assert_eq!(names.contains(&"shop:urgent"), urgent);
                    let deep = payload["a"]["b"]["c"]["d"] == Value::Bool(true);
                    prop_assert_eq!(names.len(), 3 + usize::from(urgent) + usize::from(deep));
                }
            }
        }
    }
}

// ------------------------------------------------------------------ config

/// Known keys per table, read from the shipped `config.toml` (which shows
/// every key) plus the `[[routes]]` and `when_true` fields.
static KNOWN_KEYS: LazyLock<BTreeMap<String, BTreeSet<String>>> = LazyLock::new(|| {
    let shipped: toml::Table = include_str!("../../config.toml").parse().unwrap();
    let mut known: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let top = known.entry(String::new()).or_default();
    top.extend(shipped.keys().cloned());
    top.extend(["auth", "routes", "tenancy"].map(String::from));
    for (name, value) in &shipped {
        if let Some(table) = value.as_table() {
            known
                .entry(name.clone())
                .or_default()
                .extend(table.keys().cloned());
        }
    }
    known
        .entry("routes".into())
        .or_default()
        .extend(["module", "kind", "topics", "fields", "when_true"].map(String::from));
    known
        .entry("when_true".into())
        .or_default()
        .extend(["field", "topics"].map(String::from));
    // config.toml shows [auth] commented out.
    known.entry("auth".into()).or_default().extend(
        [
            "algorithm",
            "hs256_secret",
            "public_key_file",
            "public_topics",
            "leeway_s",
        ]
        .map(String::from),
    );
    known
});

/// The tables an unknown key is tried in (`""` is the top level).
const TABLES: [&str; 11] = [
    "",
    "server",
    "storage",
    "stream",
    "retention",
    "limits",
    "cors",
    "auth",
    "tenancy",
    "routes",
    "when_true",
];

/// A TOML key: bare, or quoted with escapes so any name can be written.
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        return name.to_owned();
    }
    let mut out = String::from("\"");
    for c in name.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A config text with `extra` (a `key = value` line, or nothing) in `table`.
fn config_with(table: &str, extra: Option<&str>) -> String {
    let extra = extra.map(|e| format!("{e}\n")).unwrap_or_default();
    match table {
        "" => format!("{extra}[stream]\nretry_ms = 100\n"),
        "routes" => {
            format!("[[routes]]\nmodule = \"m\"\nkind = \"k\"\ntopics = [\"m:all\"]\n{extra}")
        }
        "when_true" => {
            let extra = extra.trim_end().to_owned();
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(", {extra}")
            };
            format!(
                "[[routes]]\nmodule = \"m\"\nkind = \"k\"\ntopics = [\"m:all\"]\n\
                 when_true = [{{ field = \"f\", topics = [\"m:f\"]{extra} }}]\n"
            )
        }
        "auth" => format!("[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n{extra}"),
        table => format!("[{table}]\n{extra}"),
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn config_refuses_unknown_keys_naming_them(
        table in prop::sample::select(TABLES.to_vec()),
        name in prop_oneof![
            3 => "[A-Za-z0-9_-]{1,24}",
            1 => "[\\PC]{1,16}",
            1 => "[a-z]{1,8}[ .:é\\t\"\\\\][a-z]{0,8}",
        ],
        value in prop::sample::select(vec!["1", "\"x\"", "true", "[]", "{}"]),
    ) {
        prop_assume!(!KNOWN_KEYS[table].contains(&name));
        let valid = config_with(table, None);
        match Config::from_toml(&valid) {
            // A build without auth refuses the whole [auth] table.
            Err(e) if table == "auth" && e.to_string().contains("not available") => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("control config refused ({e}):\n{valid}"))),
            Ok(_) => {}
        }
        let text = config_with(table, Some(&format!("{} = {value}", toml_key(&name))));
        let err = match Config::from_toml(&text) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted unknown key:\n{text}"))),
            Err(e) => e.to_string(),
        };
        prop_assert!(err.contains(&name), "error does not name {:?}: {}\n{}", name, err, text);
    }
}

#[test]
fn unknown_key_oracle_knows_the_shipped_keys() {
    // The property above takes the known keys from config.toml: make sure it
    // read them (and that the file they come from is a valid config).
    Config::from_toml(include_str!("../../config.toml")).expect("shipped config parses");
    for table in TABLES {
        assert!(
            !KNOWN_KEYS[table].is_empty(),
            "no known keys for table {table:?}"
        );
    }
    for key in [
        "listen",
        "data_dir",
        "heartbeat_ms",
        "max_age_s",
        "max_body_bytes",
    ] {
        assert!(KNOWN_KEYS.values().any(|keys| keys.contains(key)), "{key}");
    }
}
