//! Topic, event name, id and resume-point parsing on arbitrary input: never
//! panics, and what is accepted has the grammar of API.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_gateway::model::{
    parse_canonical_u64, parse_topic_list, Epoch, EventName, ResumePoint, Topic,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(topic) = Topic::parse(&text) {
        assert!((1..=200).contains(&topic.as_str().len()));
        assert!(topic
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~:@-".contains(&b)));
    }
    if let Ok(name) = EventName::parse(&text) {
        assert!((1..=100).contains(&name.as_str().len()) && name.as_str() != "reset");
        assert!(name
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)));
    }
    if let Some(n) = parse_canonical_u64(&text) {
        assert_eq!(n.to_string(), text);
    }
    let epoch = Epoch::parse("fuzz0").expect("epoch");
    match ResumePoint::parse(Some(&text), &epoch) {
        ResumePoint::After(seq) => assert_eq!(epoch.id(seq), text),
        ResumePoint::Everything => assert_eq!(text, "0"),
        ResumePoint::Live => assert!(text.is_empty()),
        ResumePoint::Unknown(raw) => assert_eq!(raw, text),
    }
    if let Ok(topics) = parse_topic_list(text.split(',')) {
        assert!((1..=64).contains(&topics.len()));
    }
});
