//! Compact JSON exactly as sent.
//!
//! docs/API.md promises that data is stored and delivered byte-identical to
//! what the publisher sent, except for insignificant whitespace outside
//! strings: key order, duplicate keys, escapes and number text must survive.
//! Parsing into `serde_json::Value` would lose all of that, so the text is
//! validated by serde_json (as a `RawValue`) and then compacted here by a
//! scanner that only drops whitespace. The scanner also enforces what
//! serde_json lets through: lone UTF-16 surrogates in `\u` escapes (not valid
//! Unicode) and a nesting depth limit of our own.

/// Why a JSON text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("JSON is nested deeper than the limit of {0} levels")]
    TooDeep(usize),
    #[error(
        "JSON string holds a lone UTF-16 surrogate escape (\\u{0:04x}), which is not valid Unicode"
    )]
    LoneSurrogate(u16),
    #[error("JSON text is malformed")]
    Malformed,
}

/// Returns `raw` (already syntactically valid JSON) with insignificant
/// whitespace removed, after checking nesting depth and surrogate escapes.
///
/// The result has no raw CR or LF (JSON strings cannot hold them unescaped),
/// so it always fits one SSE `data:` line.
pub fn compact(raw: &str, max_depth: usize) -> Result<String, JsonError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut depth = 0usize;
    let mut i = 0;
    // Start of the run of bytes that will be copied verbatim.
    let mut run_start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.push_str(&raw[run_start..i]);
                i += 1;
                run_start = i;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(JsonError::TooDeep(max_depth));
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1).ok_or(JsonError::Malformed)?;
                i += 1;
            }
            b'"' => i = scan_string(bytes, i + 1)?,
            _ => i += 1,
        }
    }
    out.push_str(&raw[run_start..]);
    Ok(out)
}

/// Scans a string body starting just after its opening quote; returns the
/// index just after the closing quote.
fn scan_string(bytes: &[u8], mut i: usize) -> Result<usize, JsonError> {
    // A high surrogate escape waiting for its low half.
    let mut pending_high: Option<u16> = None;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                return match pending_high {
                    Some(high) => Err(JsonError::LoneSurrogate(high)),
                    None => Ok(i + 1),
                };
            }
            b'\\' => {
                let escape = *bytes.get(i + 1).ok_or(JsonError::Malformed)?;
                if escape == b'u' {
                    let unit = hex4(bytes.get(i + 2..i + 6).ok_or(JsonError::Malformed)?)?;
                    match (pending_high.take(), unit) {
                        (None, 0xD800..=0xDBFF) => pending_high = Some(unit),
                        (None, 0xDC00..=0xDFFF) => return Err(JsonError::LoneSurrogate(unit)),
                        (None, _) => {}
                        (Some(_), 0xDC00..=0xDFFF) => {}
                        (Some(high), _) => return Err(JsonError::LoneSurrogate(high)),
                    }
                    i += 6;
                } else {
                    if let Some(high) = pending_high {
                        return Err(JsonError::LoneSurrogate(high));
                    }
                    i += 2;
                }
            }
            _ => {
                if let Some(high) = pending_high {
                    return Err(JsonError::LoneSurrogate(high));
                }
                i += 1;
            }
        }
    }
    Err(JsonError::Malformed)
}

fn hex4(digits: &[u8]) -> Result<u16, JsonError> {
    let text = std::str::from_utf8(digits).map_err(|_| JsonError::Malformed)?;
    u16::from_str_radix(text, 16).map_err(|_| JsonError::Malformed)
}

/// `compact` JSON with every number written as `0`, for code that reads the
/// structure of a payload but never its numbers (the broadcast route
/// evaluator). `serde_json::Value` refuses numbers beyond `f64` (`1e999`),
/// which are valid JSON and are published as sent; this view parses.
pub fn zero_numbers(compact: &str) -> String {
    let bytes = compact.as_bytes();
    let mut out = String::with_capacity(compact.len());
    let mut i = 0;
    let mut run_start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
            }
            b'-' | b'0'..=b'9' => {
                out.push_str(&compact[run_start..i]);
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                out.push('0');
                run_start = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&compact[run_start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_insignificant_whitespace() {
        let raw = "{ \"b\" : 1.0 ,\n\t\"a\":[ 1e2 , \"x y\\n\" ], \"b\": \"\\u00e9\\/é\" }\r\n";
        assert_eq!(
            compact(raw, 64).unwrap(),
            "{\"b\":1.0,\"a\":[1e2,\"x y\\n\"],\"b\":\"\\u00e9\\/é\"}"
        );
    }

    #[test]
    fn scalars_and_strings_with_quotes() {
        assert_eq!(compact(" null ", 64).unwrap(), "null");
        assert_eq!(compact(r#" "a \" { b" "#, 64).unwrap(), r#""a \" { b""#);
    }

    #[test]
    fn refuses_lone_surrogates_accepts_pairs() {
        assert!(compact(r#""\ud83d\ude00""#, 64).is_ok());
        assert_eq!(
            compact(r#""\ud800""#, 64),
            Err(JsonError::LoneSurrogate(0xd800))
        );
        assert_eq!(
            compact(r#""\udc00x""#, 64),
            Err(JsonError::LoneSurrogate(0xdc00))
        );
        assert_eq!(
            compact(r#""\ud800\n""#, 64),
            Err(JsonError::LoneSurrogate(0xd800))
        );
        assert_eq!(
            compact(r#""\ud800\u0041""#, 64),
            Err(JsonError::LoneSurrogate(0xd800))
        );
    }

    #[test]
    fn zero_numbers_keeps_strings_and_structure() {
        let text =
            r#"{"a":1e999,"b":[-0.5E+3,"1e999 \"2\"",true,null],"c\\":12345678901234567890123}"#;
        assert_eq!(
            zero_numbers(text),
            r#"{"a":0,"b":[0,"1e999 \"2\"",true,null],"c\\":0}"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&zero_numbers(text)).is_ok());
        assert_eq!(zero_numbers("-1"), "0");
        assert_eq!(zero_numbers(r#""\\""#), r#""\\""#);
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}{}", "[".repeat(4), "]".repeat(4));
        assert!(compact(&ok, 4).is_ok());
        let deep = format!("{}{}", "[".repeat(5), "]".repeat(5));
        assert_eq!(compact(&deep, 4), Err(JsonError::TooDeep(4)));
    }
}
