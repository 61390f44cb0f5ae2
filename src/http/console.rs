//! The embedded static files: the web console (`GET /` and its files under
//! `/console/…`) and the browser client (`GET /client.js`, `GET /client.d.ts`).
//!
//! Plain HTML, CSS and JavaScript from `assets/console/`, embedded in the
//! binary with `include_bytes!` (no build step, nothing fetched at run time).
//! The page only talks to the gateway's public API (`GET /topics`,
//! `GET /metrics`, `GET /readyz`, SSE streams, publishes), so it works the
//! same behind a proxy and with auth: it sends the `sse_gateway_token` cookie
//! the user sets in it.
//!
//! Caching: the file names carry no content hash, and a new binary may bring
//! new files, so every answer is `Cache-Control: no-cache` with a strong
//! `ETag` computed at compile time from the bytes: browsers revalidate on each
//! load and get a body-less `304` while the binary is the same. The HTML page
//! also carries a strict `Content-Security-Policy` (same-origin scripts,
//! styles and connections only, no framing): the page holds a token.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// One embedded file.
struct Asset {
    /// The file's bytes, as in `assets/console/`.
    body: &'static [u8],
    content_type: &'static str,
    /// FNV-1a of `body`, computed at compile time: the strong validator.
    hash: u64,
}

impl Asset {
    const fn new(body: &'static [u8], content_type: &'static str) -> Self {
        Self {
            body,
            content_type,
            hash: fnv1a(body),
        }
    }

    fn etag(&self) -> String {
        format!("\"{:016x}\"", self.hash)
    }
}

/// 64-bit FNV-1a; `const` so each asset's validator costs nothing at run time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

static INDEX: Asset = Asset::new(
    include_bytes!("../../assets/console/index.html"),
    "text/html; charset=utf-8",
);

/// The files under `/console/`, by name.
static FILES: &[(&str, Asset)] = &[
    (
        "app.js",
        Asset::new(
            include_bytes!("../../assets/console/app.js"),
            "text/javascript; charset=utf-8",
        ),
    ),
    (
        "style.css",
        Asset::new(
            include_bytes!("../../assets/console/style.css"),
            "text/css; charset=utf-8",
        ),
    ),
    (
        "favicon.svg",
        Asset::new(
            include_bytes!("../../assets/console/favicon.svg"),
            "image/svg+xml",
        ),
    ),
];

/// `assets/client/client.js`: the browser client, an ES module.
static CLIENT_JS: Asset = Asset::new(
    include_bytes!("../../assets/client/client.js"),
    "text/javascript; charset=utf-8",
);

/// `assets/client/client.d.ts`: the client's TypeScript declarations.
static CLIENT_DTS: Asset = Asset::new(
    include_bytes!("../../assets/client/client.d.ts"),
    "application/typescript; charset=utf-8",
);

/// What the page may load and connect to: itself only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the console page.
pub async fn index(headers: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &headers);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /console/{file}`: one of the console's static files.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    FILES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, asset)| serve(asset, &headers))
        .ok_or_else(|| ApiError::not_found(format!("the console has no file named {file:?}")))
}

/// `GET /client.js`: the browser client (cross-origin pages may import it
/// when `[cors]` allows them, like the streams it opens).
pub async fn client_js(headers: HeaderMap) -> Response {
    serve(&CLIENT_JS, &headers)
}

/// `GET /client.d.ts`: the browser client's TypeScript declarations.
pub async fn client_dts(headers: HeaderMap) -> Response {
    serve(&CLIENT_DTS, &headers)
}

/// The asset, or `304` when the client's copy is current.
fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = asset.etag();
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*");
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn router() -> Router {
        Router::new()
            .route("/", get(index))
            .route("/console/{file}", get(asset))
            .route("/client.js", get(client_js))
            .route("/client.d.ts", get(client_dts))
    }

    async fn get_path(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        router()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    fn header_of(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ascii header")
    }

    async fn body_text(response: Response) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8 body")
    }

    #[tokio::test]
    async fn index_is_the_console_page_with_csp_and_revalidation() {
        let response = get_path("/", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header_of(&response, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_of(&response, header::CACHE_CONTROL), "no-cache");
        assert!(header_of(&response, header::CONTENT_SECURITY_POLICY).contains("script-src 'self'"));
        assert_eq!(
            header_of(&response, header::X_CONTENT_TYPE_OPTIONS),
            "nosniff"
        );
        let body = body_text(response).await;
        assert!(
            body.contains("/console/app.js"),
            "the page loads its script"
        );
        assert!(
            body.contains("/console/style.css"),
            "the page loads its styles"
        );
    }

    #[tokio::test]
    async fn every_referenced_asset_is_served_with_its_content_type() {
        for (path, content_type) in [
            ("/console/app.js", "text/javascript; charset=utf-8"),
            ("/console/style.css", "text/css; charset=utf-8"),
            ("/console/favicon.svg", "image/svg+xml"),
            ("/client.js", "text/javascript; charset=utf-8"),
            ("/client.d.ts", "application/typescript; charset=utf-8"),
        ] {
            let response = get_path(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&response, header::CONTENT_TYPE), content_type);
            assert_eq!(header_of(&response, header::CACHE_CONTROL), "no-cache");
            assert!(!body_text(response).await.is_empty(), "{path} has a body");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_gets_304_without_a_body() {
        let first = get_path("/console/app.js", None).await;
        let etag = header_of(&first, header::ETAG).to_owned();
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "strong ETag: {etag}"
        );

        let again = get_path("/console/app.js", Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header_of(&again, header::ETAG), etag);
        assert!(body_text(again).await.is_empty());

        let listed = get_path("/console/app.js", Some(&format!("\"x\", W/{etag}"))).await;
        assert_eq!(listed.status(), StatusCode::NOT_MODIFIED, "ETag in a list");

        let stale = get_path("/console/app.js", Some("\"0000000000000000\"")).await;
        assert_eq!(stale.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_console_files_are_json_404() {
        for path in ["/console/nope.js", "/console/..%2Fsrc%2Fmain.rs"] {
            let response = get_path(path, None).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            let body: serde_json::Value =
                serde_json::from_str(&body_text(response).await).expect("JSON error body");
            assert_eq!(body["error"]["code"], "not_found");
        }
    }

    /// `examples/grafana-dashboard.json` queries only metrics the gateway exports.
    #[test]
    fn grafana_dashboard_queries_only_exported_metrics() {
        let metrics = crate::metrics::Metrics::new();
        // Families appear once they have a label set.
        metrics
            .resets
            .get_or_create(&crate::metrics::Metrics::label("reason", "retention"))
            .inc();
        metrics
            .streams_shed
            .get_or_create(&crate::metrics::Metrics::label("reason", "max_connections"))
            .inc();
        metrics
            .streams_open
            .get_or_create(&crate::metrics::Metrics::label("mode", "topic"))
            .inc();
        metrics
            .streams_total
            .get_or_create(&crate::metrics::Metrics::label("mode", "topic"))
            .inc();
        let exported: std::collections::HashSet<String> = metrics
            .render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();

        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../examples/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("expr").to_owned());
            }
        }
        assert!(exprs.len() >= 10, "{exprs:?}");
        let mut used = 0;
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(start) = rest.find("sse_gateway_") {
                let name: String = rest[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name),
                    "{name} (in {expr}) is not exported; exported: {exported:?}"
                );
                used += 1;
                rest = &rest[start + name.len()..];
            }
        }
        assert!(used >= exprs.len());
    }

    #[test]
    fn assets_differ_in_validator() {
        let tags: std::collections::HashSet<u64> = FILES
            .iter()
            .map(|(_, a)| a.hash)
            .chain([INDEX.hash, CLIENT_JS.hash, CLIENT_DTS.hash])
            .collect();
        assert_eq!(tags.len(), FILES.len() + 3);
    }
}
