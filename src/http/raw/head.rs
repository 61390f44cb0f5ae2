//! Reading a connection's first request head: is it a stream request (a
//! plain `GET` of a stream route, per the router's table), something else,
//! or not complete yet.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri, Version};

use crate::http::table::StreamRoutes;

/// Most header lines in a head (hyper's own limit).
const MAX_HEADERS: usize = 100;

/// A stream request's head, ready for the router.
pub(super) struct StreamHead {
    pub request: Request<Body>,
    pub keep_alive: bool,
    pub http11: bool,
}

pub(super) enum Classified {
    Partial,
    Other,
    Stream(Box<StreamHead>, usize),
}

/// Parses what has arrived: a complete stream head, not a stream request (or
/// not parseable: hyper will answer it), or not complete yet.
pub(super) fn classify(buf: &[u8], peer: SocketAddr, routes: &StreamRoutes) -> Classified {
    if buf.is_empty() {
        return Classified::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Classified::Partial,
        Err(_) => return Classified::Other,
    };
    match stream_head(&parsed, peer, routes) {
        Some(head) => Classified::Stream(Box::new(head), len),
        None => Classified::Other,
    }
}

fn stream_head(
    parsed: &httparse::Request<'_, '_>,
    peer: SocketAddr,
    routes: &StreamRoutes,
) -> Option<StreamHead> {
    let (method, path, minor) = (parsed.method?, parsed.path?, parsed.version?);
    if !routes.is_stream(method, path) {
        return None;
    }
    let http11 = minor == 1;
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path.parse::<Uri>().ok()?)
        .version(if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        })
        .body(Body::empty())
        .ok()?;
    let mut connection_close = !http11;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
        {
            // A body on a GET: rare enough to leave to hyper.
            return None;
        }
        if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection_close = false;
                }
            }
        }
        request.headers_mut().append(name, value);
    }
    request.extensions_mut().insert(ConnectInfo(peer));
    Some(StreamHead {
        request,
        keep_alive: !connection_close,
        http11,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_str(raw: &str) -> Classified {
        classify(
            raw.as_bytes(),
            "127.0.0.1:1".parse().unwrap(),
            &StreamRoutes::new(),
        )
    }

    #[test]
    fn heads_are_classified() {
        assert!(matches!(
            classify_str("GET /topics/a HTTP/1.1\r\nHost: x\r\n"),
            Classified::Partial
        ));
        assert!(matches!(
            classify_str("POST /topics/a HTTP/1.1\r\nHost: x\r\n\r\n"),
            Classified::Other
        ));
        assert!(matches!(
            classify_str("\x00\x01garbage\r\n\r\n"),
            Classified::Other
        ));
        assert!(matches!(
            classify_str("GET /topics/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Classified::Other
        ));
        let raw =
            "GET /topics/a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: e-1\r\n\r\nGET / HTTP/1.1\r\n";
        match classify_str(raw) {
            Classified::Stream(head, len) => {
                assert_eq!(&raw[len..], "GET / HTTP/1.1\r\n");
                assert!(head.keep_alive && head.http11);
                assert_eq!(head.request.headers()["last-event-id"], "e-1");
                assert_eq!(head.request.uri().path(), "/topics/a");
            }
            _ => panic!("not a stream head"),
        }
        match classify_str("GET /events?topic=a HTTP/1.0\r\n\r\n") {
            Classified::Stream(head, _) => assert!(!head.keep_alive && !head.http11),
            _ => panic!("not a stream head"),
        }
        match classify_str("GET /events?topic=a HTTP/1.1\r\nConnection: close\r\n\r\n") {
            Classified::Stream(head, _) => assert!(!head.keep_alive),
            _ => panic!("not a stream head"),
        }
    }
}
