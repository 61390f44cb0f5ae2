//! `sse-gateway publish`: one event to a running gateway; prints its id.
//!
//! One topic goes to `POST /topics/{topic}`, several to `POST /publish` (one
//! event, one id, in all of them). The data is sent as given, embedded raw
//! (never re-serialised, so key order and number text survive); topics and
//! the event name are checked here first for a clear message.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::value::RawValue;
use sse_gateway::model::{parse_topic_list, EventName};

use super::{root_cause, GatewayArgs};

/// `publish TOPIC… --event NAME --data JSON`
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Topics to publish to (several: one event with one id in all of them).
    #[arg(required = true, value_name = "TOPIC")]
    topics: Vec<String>,
    /// Event name (the gateway's default is `message`).
    #[arg(long, value_name = "NAME")]
    event: Option<String>,
    /// The event's data: JSON text, or `-` to read it from standard input.
    #[arg(long, value_name = "JSON", allow_hyphen_values = true)]
    data: String,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
}

/// Publishes and prints the id.
pub fn run(args: PublishArgs) -> anyhow::Result<()> {
    let topics = parse_topic_list(args.topics.iter().map(String::as_str))?;
    if let Some(name) = &args.event {
        EventName::parse(name)?;
    }
    let text = if args.data == "-" {
        if std::io::stdin().is_terminal() {
            bail!(
                "--data -: reading the JSON from standard input, which is a terminal; pipe it in"
            );
        }
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the data from standard input")?;
        text
    } else {
        args.data.clone()
    };
    let data: &RawValue = serde_json::from_str(text.trim())
        .map_err(|e| anyhow::anyhow!("--data is not JSON: {e}"))?;
    let base = args.gateway.base()?;
    let (url, body) = match topics.as_slice() {
        [topic] => (
            format!("{base}/topics/{topic}"),
            Body {
                topics: None,
                event: args.event.as_deref(),
                data,
            },
        ),
        _ => (
            format!("{base}/publish"),
            Body {
                topics: Some(topics.iter().map(|t| t.as_str()).collect()),
                event: args.event.as_deref(),
                data,
            },
        ),
    };
    let body = serde_json::to_string(&body)?;

    let runtime = super::runtime()?;
    let (status, answer) = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        let response = args.gateway.authorize(request).send().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the gateway at {base}: {}", root_cause(&e))
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer from {url}: {}", root_cause(&e)))?;
        anyhow::Ok((status, text))
    })?;
    let json: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    if status != reqwest::StatusCode::CREATED {
        let error = &json["error"];
        match (error["code"].as_str(), error["message"].as_str()) {
            (Some(code), Some(message)) => bail!("publish refused: {status} {code}: {message}"),
            _ => bail!("publish refused: {status}: {}", answer.trim()),
        }
    }
    let Some(id) = json["id"].as_str() else {
        bail!(
            "the gateway answered {status} without an id: {}",
            answer.trim()
        );
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{id}")?;
    out.flush()?;
    Ok(())
}
