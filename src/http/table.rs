//! The route table: every method and path the gateway serves, and what
//! answers it.
//!
//! Two readers share it. [`super::router`] registers every entry with axum,
//! and the raw stream path ([`super::raw`]) asks [`StreamRoutes`] whether a
//! request head is a stream before it hands the request to that router. One
//! table means a new stream route cannot silently miss the raw path, and a
//! test walks every entry to prove both readers agree.

use axum::routing::MethodFilter;

/// The methods the gateway routes (any `GET` also answers `HEAD`, as axum does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Get,
    Post,
}

impl Verb {
    /// The method as it appears on the request line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
        }
    }

    /// axum's filter for this method.
    pub(crate) fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
        }
    }
}

/// What answers a route: one handler each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Console,
    ConsoleAsset,
    ClientJs,
    ClientDts,
    Healthz,
    Readyz,
    Metrics,
    ListTopics,
    TopicInfo,
    SubscribeTopic,
    SubscribeEvents,
    PublishTopic,
    PublishMany,
    PublishBatch,
    Broadcast,
}

impl Endpoint {
    /// Whether a successful answer is an event stream, which the raw path
    /// writes to the socket itself. Exhaustive on purpose: a new endpoint
    /// must say whether it streams.
    pub(crate) fn is_stream(self) -> bool {
        match self {
            Self::SubscribeTopic | Self::SubscribeEvents => true,
            Self::Console
            | Self::ConsoleAsset
            | Self::ClientJs
            | Self::ClientDts
            | Self::Healthz
            | Self::Readyz
            | Self::Metrics
            | Self::ListTopics
            | Self::TopicInfo
            | Self::PublishTopic
            | Self::PublishMany
            | Self::PublishBatch
            | Self::Broadcast => false,
        }
    }
}

/// One entry: a path in axum's syntax (`{name}` is one segment), a method,
/// and its endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    pub path: &'static str,
    pub verb: Verb,
    pub endpoint: Endpoint,
}

const fn route(verb: Verb, path: &'static str, endpoint: Endpoint) -> Route {
    Route {
        path,
        verb,
        endpoint,
    }
}

/// Every route of the gateway, in the order `docs/API.md` lists them.
pub(crate) const ROUTES: &[Route] = &[
    route(Verb::Get, "/", Endpoint::Console),
    route(Verb::Get, "/console/{file}", Endpoint::ConsoleAsset),
    route(Verb::Get, "/client.js", Endpoint::ClientJs),
    route(Verb::Get, "/client.d.ts", Endpoint::ClientDts),
    route(Verb::Get, "/healthz", Endpoint::Healthz),
    route(Verb::Get, "/readyz", Endpoint::Readyz),
    route(Verb::Get, "/metrics", Endpoint::Metrics),
    route(Verb::Get, "/topics", Endpoint::ListTopics),
    route(Verb::Get, "/topics/{topic}", Endpoint::SubscribeTopic),
    route(Verb::Post, "/topics/{topic}", Endpoint::PublishTopic),
    route(Verb::Get, "/topics/{topic}/info", Endpoint::TopicInfo),
    route(Verb::Get, "/events", Endpoint::SubscribeEvents),
    route(Verb::Post, "/publish", Endpoint::PublishMany),
    route(Verb::Post, "/publish/batch", Endpoint::PublishBatch),
    route(
        Verb::Post,
        "/{module}/broadcast/{kind}",
        Endpoint::Broadcast,
    ),
];

/// Answers "does this request line reach a stream endpoint?" with the same
/// path matcher axum's router uses (`matchit`), built from [`ROUTES`].
pub(crate) struct StreamRoutes {
    paths: matchit::Router<Vec<(Verb, Endpoint)>>,
}

impl StreamRoutes {
    /// Builds the matcher from the route table.
    pub(crate) fn new() -> Self {
        let mut grouped: Vec<(&'static str, Vec<(Verb, Endpoint)>)> = Vec::new();
        for route in ROUTES {
            match grouped.iter_mut().find(|(path, _)| *path == route.path) {
                Some((_, verbs)) => verbs.push((route.verb, route.endpoint)),
                None => grouped.push((route.path, vec![(route.verb, route.endpoint)])),
            }
        }
        let mut paths = matchit::Router::new();
        for (path, verbs) in grouped {
            // The table is a constant that the router accepted too (tests
            // build both), so an insert cannot fail at run time; if it ever
            // did, that path would simply not take the raw stream path.
            if let Err(e) = paths.insert(path, verbs) {
                tracing::error!(path, error = %e, "route table entry not matchable");
            }
        }
        Self { paths }
    }

    /// Whether `method` and the request target `target` (origin form, query
    /// included) reach a stream endpoint.
    pub(crate) fn is_stream(&self, method: &str, target: &str) -> bool {
        if !target.starts_with('/') {
            return false;
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        self.paths.at(path).is_ok_and(|found| {
            found
                .value
                .iter()
                .any(|(verb, endpoint)| verb.as_str() == method && endpoint.is_stream())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A concrete path for a pattern: every `{name}` becomes a valid value.
    fn sample(pattern: &str) -> String {
        pattern
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "projects:all"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn every_route_is_classified_as_the_table_says() {
        let streams = StreamRoutes::new();
        for route in ROUTES {
            let path = sample(route.path);
            for verb in [Verb::Get, Verb::Post] {
                let expected = ROUTES
                    .iter()
                    .any(|r| r.path == route.path && r.verb == verb && r.endpoint.is_stream());
                assert_eq!(
                    streams.is_stream(verb.as_str(), &path),
                    expected,
                    "{} {path}",
                    verb.as_str()
                );
                let with_query = format!("{path}?last_event_id=0");
                assert_eq!(streams.is_stream(verb.as_str(), &with_query), expected);
            }
            assert!(!streams.is_stream("HEAD", &path), "HEAD {path}");
        }
        // The table has stream routes at all (else the raw path is dead code).
        assert!(ROUTES.iter().any(|r| r.endpoint.is_stream()));
    }

    /// The requests of [`ROUTES`] that `api` (docs/API.md) has no row for
    /// in its routes table (`| \`METHOD /path\` |` under `## Routes`), and
    /// those `openapi` (openapi.yaml) has no operation for, each named with
    /// the file that misses it.
    fn undocumented(api: &str, openapi: &str) -> Vec<String> {
        let routes_table: Vec<&str> = api
            .lines()
            .skip_while(|l| *l != "## Routes")
            .skip(1)
            .take_while(|l| !l.starts_with("## "))
            .filter(|l| l.starts_with("| `"))
            .collect();
        let mut missing = Vec::new();
        for route in ROUTES {
            let method = route.verb.as_str();
            let request = format!("{method} {}", route.path);
            let row = format!("| `{request}` |");
            if !routes_table.iter().any(|l| l.starts_with(&row)) {
                missing.push(format!("docs/API.md: {request}"));
            }
            if !has_operation(openapi, route.path, &method.to_ascii_lowercase()) {
                missing.push(format!("openapi.yaml: {request}"));
            }
        }
        missing
    }

    /// Whether the `paths:` section of an OpenAPI document has the line
    /// `  <path>:` with a `    <method>:` key in its block.
    fn has_operation(openapi: &str, path: &str, method: &str) -> bool {
        let header = format!("  {path}:");
        let key = format!("    {method}:");
        let mut in_block = false;
        for line in openapi.lines().skip_while(|l| *l != "paths:").skip(1) {
            let line = line.trim_end();
            let text = line.trim_start();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            match line.len() - text.len() {
                // The next top-level key: `paths:` is over.
                0 => break,
                2 => in_block = line == header,
                _ if in_block && line == key => return true,
                _ => {}
            }
        }
        false
    }

    /// A file of the repository, as text.
    fn read(file: &str) -> String {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    #[test]
    fn every_route_is_documented_in_docs_api_md_and_openapi_yaml() {
        let api = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md"))
            .expect("docs/API.md, the client reference");
        let openapi = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
            .expect("openapi.yaml");
        let missing = undocumented(&api, &openapi);
        assert!(
            missing.is_empty(),
            "routes of src/http/table.rs that clients cannot find: {missing:#?}"
        );
    }

    #[test]
    fn a_route_missing_from_either_file_is_reported() {
        let api = read("docs/API.md");
        let openapi = read("openapi.yaml");
        // One line gone from each: the routes-table row, the path line.
        let row = api
            .lines()
            .find(|l| l.starts_with("| `GET /readyz` |"))
            .expect("the /readyz row");
        let api = api.replacen(&format!("{row}\n"), "", 1);
        let openapi = openapi.replacen("\n  /readyz:\n", "\n", 1);
        assert_eq!(
            undocumented(&api, &openapi),
            ["docs/API.md: GET /readyz", "openapi.yaml: GET /readyz"]
        );
        // A row of a longer path is no row of a shorter one (`GET /`).
        let only_healthz = "## Routes\n\n| `GET /healthz` | liveness |\n";
        assert!(undocumented(only_healthz, "").contains(&"docs/API.md: GET /".to_owned()));
    }

    #[test]
    fn only_plain_gets_of_stream_routes_are_streams() {
        let streams = StreamRoutes::new();
        for (method, path) in [
            ("GET", "/events?topic=a"),
            ("GET", "/events"),
            ("GET", "/topics/projects:all"),
            ("GET", "/topics/a?last_event_id=x"),
        ] {
            assert!(streams.is_stream(method, path), "{method} {path}");
        }
        for (method, path) in [
            ("POST", "/topics/a"),
            ("HEAD", "/topics/a"),
            ("GET", "/topics"),
            ("GET", "/topics/"),
            ("GET", "/topics/a/info"),
            ("GET", "/topics/a/"),
            ("GET", "/eventsx"),
            ("GET", "/events/"),
            ("GET", "http://host/topics/a"),
            ("GET", "*"),
            ("GET", "/"),
        ] {
            assert!(!streams.is_stream(method, path), "{method} {path}");
        }
    }
}
