//! `sse-gateway tail`: follows topics of a running gateway, forever.
//!
//! One topic is `GET /topics/{topic}`, several one `GET /events?topic=…`
//! stream. Like a browser's `EventSource`, it reconnects by itself when the
//! stream ends or breaks (a gateway restart, a proxy timeout, a dead socket
//! that sent nothing, not even a keepalive, for `--idle-timeout`), waiting the
//! server's `retry:` delay, and resumes with `Last-Event-ID` set to the last
//! id seen, id-only blocks included: nothing is missed, nothing printed twice.
//! Each reconnect is reported on stderr with the id it resumed after.
//! Connection failures back off (doubling, up to 30 s); a 4xx answer other
//! than 429 is final, as it is for `EventSource`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use sse_gateway::model::{parse_topic_list, RESET_EVENT_NAME};
use sse_gateway::sse::decode::{Decoder, Event, Item};

use super::pretty::pretty_json;
use super::{root_cause, GatewayArgs};

/// Reconnection delay until the server sends `retry:`.
const DEFAULT_RETRY_MS: u64 = 1_000;
/// Longest wait between connection attempts.
const MAX_BACKOFF_MS: u64 = 30_000;

/// `tail TOPIC… [--from ID] [--json]`
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// Topics to follow (several: one stream; an event in several comes once).
    #[arg(required = true, value_name = "TOPIC")]
    topics: Vec<String>,
    /// Resume after this id; `0` replays all retained history first. Default: from now on.
    #[arg(long, value_name = "ID")]
    from: Option<String>,
    /// Print one JSON object per line, {"id","event","data"}, for scripts.
    #[arg(long)]
    json: bool,
    /// Reconnect when nothing, not even a keepalive, arrived for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    idle_timeout: u64,
    #[command(flatten)]
    gateway: GatewayArgs,
}

/// Follows until a final error (or the process is stopped).
pub fn run(args: TailArgs) -> anyhow::Result<()> {
    let topics = parse_topic_list(args.topics.iter().map(String::as_str))?;
    let base = args.gateway.base()?;
    let url = match topics.as_slice() {
        [topic] => reqwest::Url::parse(&format!("{base}/topics/{topic}")),
        _ => reqwest::Url::parse_with_params(
            &format!("{base}/events"),
            topics.iter().map(|t| ("topic", t.as_str())),
        ),
    }
    .with_context(|| format!("--url {base}"))?;
    let names: Vec<&str> = topics.iter().map(|t| t.as_str()).collect();
    let mut printer = Printer {
        json: args.json,
        color: std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    };
    let mut parser = Decoder::new();
    if let Some(from) = &args.from {
        parser.set_last_event_id(from);
    }
    let idle = Duration::from_secs(args.idle_timeout.max(1));
    super::runtime()?.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let mut failures = 0u32;
        let mut connected_before = false;
        loop {
            let resume = parser.last_event_id().to_owned();
            let mut request = client
                .get(url.clone())
                .header("accept", "text/event-stream")
                .header("cache-control", "no-store");
            if !resume.is_empty() {
                request = request.header("last-event-id", &resume);
            }
            let retry_ms = parser.retry_ms().unwrap_or(DEFAULT_RETRY_MS);
            let response = match args.gateway.authorize(request).send().await {
                Ok(response) => response,
                Err(e) => {
                    failures += 1;
                    let delay = backoff(retry_ms, failures);
                    eprintln!(
                        "sse-gateway: cannot connect to {base}: {}; retrying in {delay} ms",
                        root_cause(&e)
                    );
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    continue;
                }
            };
            let status = response.status();
            if status != reqwest::StatusCode::OK {
                let text = response.text().await.unwrap_or_default();
                let message = error_message(&text);
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    failures += 1;
                    let delay = backoff(retry_ms, failures);
                    eprintln!("sse-gateway: {url} answered {status}{message}; retrying in {delay} ms");
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    continue;
                }
                bail!("{url} answered {status}{message}");
            }
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with("text/event-stream") {
                bail!("{url} is not an event stream (Content-Type: {content_type:?}); is --url a gateway?");
            }
            if connected_before {
                eprintln!("sse-gateway: reconnected; resuming after {}", shown(&resume));
            } else {
                eprintln!(
                    "sse-gateway: following {} at {base} from {}",
                    names.join(", "),
                    match resume.as_str() {
                        "" => "now on".to_owned(),
                        "0" => "the oldest retained event".to_owned(),
                        id => format!("after {id}"),
                    }
                );
            }
            connected_before = true;
            failures = 0;
            let why = follow(response, &mut parser, &mut printer, idle).await?;
            // What a cut-off block held is sent again after the reconnect.
            parser.end_stream();
            let delay = parser.retry_ms().unwrap_or(DEFAULT_RETRY_MS);
            eprintln!(
                "sse-gateway: disconnected ({why}); reconnecting in {delay} ms, resuming after {}",
                shown(parser.last_event_id())
            );
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    })
}

/// Prints the stream until it ends; returns why it ended. Errors only when
/// stdout fails.
async fn follow(
    response: reqwest::Response,
    parser: &mut Decoder,
    printer: &mut Printer,
    idle: Duration,
) -> anyhow::Result<String> {
    let mut stream = response.bytes_stream();
    let mut items = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Ok(format!("nothing received for {} s", idle.as_secs())),
            Ok(None) => return Ok("the gateway closed the stream".into()),
            Ok(Some(Err(e))) => return Ok(root_cause(&e)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        parser.feed(&chunk, |item| items.push(item));
        for item in items.drain(..) {
            match item {
                Item::Event(event) => printer.event(&event)?,
                Item::Comment(text) if text == "keepalive" || text.is_empty() => {}
                Item::Comment(text) => eprintln!("sse-gateway: the gateway says: {text}"),
            }
        }
    }
}

/// Doubling delay after consecutive failures, from the server's `retry`.
fn backoff(retry_ms: u64, failures: u32) -> u64 {
    let factor = 1u64 << failures.saturating_sub(1).min(6);
    retry_ms
        .saturating_mul(factor)
        .min(retry_ms.max(MAX_BACKOFF_MS))
}

fn shown(id: &str) -> String {
    match id {
        "" => "the live head (no id seen yet)".into(),
        "0" => "0 (all retained history)".into(),
        id => id.into(),
    }
}

/// `: code: message` from a gateway error body, or the start of the body.
fn error_message(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let error = &json["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!(": {code}: {message}"),
        _ if body.trim().is_empty() => String::new(),
        _ => format!(": {}", body.trim().chars().take(200).collect::<String>()),
    }
}

struct Printer {
    json: bool,
    color: bool,
}

#[derive(Serialize)]
struct JsonLine<'a, D: Serialize> {
    id: &'a str,
    event: &'a str,
    data: D,
}

impl Printer {
    fn event(&mut self, event: &Event) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            let line = match serde_json::from_str::<&RawValue>(&event.data) {
                Ok(data) => serde_json::to_string(&JsonLine {
                    id: &event.id,
                    event: &event.event,
                    data,
                }),
                Err(_) => serde_json::to_string(&JsonLine {
                    id: &event.id,
                    event: &event.event,
                    data: &event.data,
                }),
            }
            .map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        } else if event.event == RESET_EVENT_NAME {
            writeln!(out, "{}", self.reset_text(event))?;
            writeln!(out)?;
        } else {
            let (dim, bold, plain) = self.styles();
            writeln!(
                out,
                "{dim}{}{plain}  {bold}{}{plain}",
                event.id, event.event
            )?;
            let data = if serde_json::from_str::<&RawValue>(&event.data).is_ok() {
                pretty_json(&event.data)
            } else {
                event.data.clone()
            };
            for line in data.lines() {
                writeln!(out, "  {line}")?;
            }
            writeln!(out)?;
        }
        out.flush()
    }

    /// A reset in words, so nobody takes it for an ordinary event.
    fn reset_text(&self, event: &Event) -> String {
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
        let text = |key: &str| data[key].as_str().unwrap_or("none").to_owned();
        let reason = text("reason");
        let why = match reason.as_str() {
            "retention" => "the events after it were trimmed by retention",
            "unknown_id" => "it is not an id of this log (another data directory, or ahead of it)",
            _ => "the gateway cannot resume from it",
        };
        let (warn, plain) = if self.color {
            ("\x1b[1;33m", "\x1b[0m")
        } else {
            ("", "")
        };
        format!(
            "{warn}{}  RESET ({reason}){plain}: cannot resume after {}: {why}; oldest retained: {}. \
             Refetch the full state; following goes on from here.",
            event.id,
            text("requested"),
            text("oldest"),
        )
    }

    fn styles(&self) -> (&'static str, &'static str, &'static str) {
        if self.color {
            ("\x1b[2m", "\x1b[1m", "\x1b[0m")
        } else {
            ("", "", "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_retry_and_doubles_up_to_a_cap() {
        assert_eq!(backoff(200, 1), 200);
        assert_eq!(backoff(200, 2), 400);
        assert_eq!(backoff(200, 3), 800);
        assert_eq!(backoff(2000, 20), 30_000);
        assert_eq!(backoff(60_000, 3), 60_000);
    }

    #[test]
    fn gateway_errors_are_summarised() {
        assert_eq!(
            error_message(r#"{"error":{"code":"forbidden","message":"no"}}"#),
            ": forbidden: no"
        );
        assert_eq!(error_message(""), "");
    }
}
