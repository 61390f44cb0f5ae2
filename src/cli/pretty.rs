//! Readable JSON for `tail`: re-indents JSON text and changes nothing else.
//!
//! Parsing into `serde_json::Value` would sort keys, merge duplicate keys and
//! rewrite numbers and escapes; an operator looking at events must see the
//! data as it was published. So this works on the text: strings and number
//! or literal runs are copied verbatim, only whitespace between tokens is
//! replaced.

/// `raw` (JSON text) with two spaces of indent per level, one member or
/// element per line, `": "` after keys; `{}` and `[]` stay on one line.
pub fn pretty_json(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let end = string_end(bytes, i);
                out.push_str(&raw[i..end]);
                i = end;
                continue;
            }
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { '}' } else { ']' };
                let next = skip_whitespace(bytes, i + 1);
                out.push(open as char);
                if bytes.get(next) == Some(&(close as u8)) {
                    out.push(close);
                    i = next + 1;
                    continue;
                }
                depth += 1;
                newline(&mut out, depth);
            }
            close @ (b'}' | b']') => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(close as char);
            }
            b',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            b':' => out.push_str(": "),
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                let start = i;
                while i < bytes.len() && !is_delimiter(bytes[i]) {
                    i += 1;
                }
                out.push_str(&raw[start..i]);
                continue;
            }
        }
        i += 1;
    }
    out
}

fn is_delimiter(b: u8) -> bool {
    matches!(
        b,
        b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"' | b' ' | b'\t' | b'\n' | b'\r'
    )
}

/// The index just past the string starting at `start` (its opening quote).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

fn skip_whitespace(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("  ");
    }
}

#[cfg(test)]
mod tests {
    use super::pretty_json;

    #[test]
    fn indents_objects_and_arrays() {
        assert_eq!(
            pretty_json(r#"{"a":1,"b":[true,null],"c":{}}"#),
            "{\n  \"a\": 1,\n  \"b\": [\n    true,\n    null\n  ],\n  \"c\": {}\n}"
        );
    }

    #[test]
    fn keeps_key_order_duplicates_numbers_and_escapes() {
        let raw = r#"{"z":1.0,"a":2e3,"z":"\u00e9 é \"q\" {,:}","x":[]}"#;
        let pretty = pretty_json(raw);
        assert_eq!(
            pretty,
            "{\n  \"z\": 1.0,\n  \"a\": 2e3,\n  \"z\": \"\\u00e9 é \\\"q\\\" {,:}\",\n  \"x\": []\n}"
        );
        // Only whitespace was added: removing it outside strings gives the input back.
        assert_eq!(sse_gateway::json::compact(&pretty, 64).unwrap(), raw);
    }

    #[test]
    fn scalars_stay_as_they_are() {
        for raw in ["1", "-0.5e-7", "\"text\"", "true", "null", "[]", "{}"] {
            assert_eq!(pretty_json(raw), raw);
        }
    }
}
