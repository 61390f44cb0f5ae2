//! `json::compact` on arbitrary text: never panics; on valid JSON it keeps
//! the text as sent (only insignificant whitespace removed), its output is
//! one line of valid JSON, and the route evaluator's view of it parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use sse_gateway::json;

fuzz_target!(|data: &[u8]| {
    let Some((&depth, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let compacted = json::compact(text, usize::from(depth % 130));
    let Ok(valid) = serde_json::from_str::<&RawValue>(text) else { return };
    let Ok(out) = compacted else { return };
    assert!(!out.contains(['\r', '\n']));
    assert!(serde_json::from_str::<&RawValue>(&out).is_ok(), "{out}");
    let kept: String = {
        let (mut s, mut in_string, mut escaped) = (String::new(), false, false);
        for c in valid.get().chars() {
            if in_string {
                s.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
                in_string = c == '"';
                s.push(c);
            }
        }
        s
    };
    assert_eq!(out, kept);
    let view = json::zero_numbers(&out);
    assert!(serde_json::from_str::<serde_json::Value>(&view).is_ok(), "{view}");
});
