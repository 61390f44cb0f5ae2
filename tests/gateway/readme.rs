//! The README's examples, run as written. Every fenced block of `README.md`,
//! `examples/projects-dashboard/README.md` and `docs/API.md` is extracted with its line,
//! info string and section, and [`classify`] gives it a rule: run against a
//! real gateway (the shell walk-through with its expected outputs, the browser
//! snippet in node, the Python follower, nginx in front of one or three
//! gateways, `redis-server` started from the config block, a Redis Cluster), or
//! not run, with the one-line reason. A block no rule knows fails
//! [`readme_every_block_is_run_or_excused`].
//!
//! What is executed is the snippet's own text. The substitutions, all in
//! [`Subst`] and the nginx/Redis address mapping beside it, nowhere else:
//! - the address `127.0.0.1:8080` becomes the test gateway's (`serve` gets
//!   `SSE_GATEWAY_LISTEN=127.0.0.1:0`, the CLI `SSE_GATEWAY_URL`: the
//!   documented overrides);
//! - `cargo run [-q] --release --` becomes `sse-gateway`, a shim on `PATH`
//!   that runs the binary under test;
//! - the example epoch `Xk3v9QaB` becomes the gateway's epoch (in commands and
//!   in expected output);
//! - the dashboard's static-server port `8000` becomes a free port;
//! - the example `hs256_secret`, which the gateway refuses because it is
//!   published, becomes a secret of the test's (as the README tells users);
//! - in config blocks, private addresses (`redis://10.0.0.5:6379`, the
//!   upstream `server` lines) become the test's Redis servers and gateways, and
//!   nginx's `listen 443 ssl http2;` a loopback port, `/var/log/nginx/` a temp dir;
//! - streams that never end (`curl -N`, `sse-gateway tail`) run for
//!   [`STREAM_SECS`] (in the background, until their section ends) and
//!   reaching that limit counts as success.
//!
//! Output shown in the README (`# …` lines right after a command, plain blocks
//! after a `curl -N` follower) is compared exactly, with `…` as a wildcard.
//! Needs `curl`, `python3` with `requests`, `node` with `tests/js/node_modules`,
//! `redis-server`, `redis-cli` and `nginx` (`scripts/test.sh` installs them);
//! without one these tests fail, they never skip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;

use crate::common::*;
use crate::redis::{free_port, redis_cli, require, Cluster};

/// The files whose blocks are run.
const FILES: [&str; 3] = [
    "README.md",
    "examples/projects-dashboard/README.md",
    "docs/API.md",
];

/// The client reference: its plain and `json` blocks illustrate formats.
const API_MD: &str = "docs/API.md";

/// The epoch the README's example ids use.
const EXAMPLE_EPOCH: &str = "Xk3v9QaB";

/// How long a never-ending stream (`curl -N`, `tail`) runs in a block that
/// runs to completion.
const STREAM_SECS: u64 = 3;

/// The same in a background block (a follower whose output later blocks
/// show): ended earlier, when its section ends.
const BACKGROUND_STREAM_SECS: u64 = 30;

/// Where the tools come from.
const SETUP: &str = "`bash scripts/test.sh` installs curl, python3-requests, nodejs with \
     tests/js/node_modules, redis-server and nginx";

/// The unknown-block message.
const UNKNOWN: &str = "a block the README test does not know — run it or say why not";

// ------------------------------------------------------------------ extraction

/// One fenced block.
#[derive(Debug, Clone)]
struct Block {
    file: &'static str,
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    /// The content, the fence's indentation removed, every line ending in LF.
    text: String,
    /// The `## ` heading it is under ("" before the first).
    section: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{} line {}", self.file, self.line)
    }
}

fn blocks_of(file: &'static str) -> Vec<Block> {
    let text = std::fs::read_to_string(repo_path(file))
        .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
    let mut blocks = Vec::new();
    let mut section = String::new();
    // (line, indent, info, body) of the block being read.
    let mut open: Option<(usize, usize, String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let closes = open.is_some() && trimmed.trim_end() == "```";
        if closes {
            let (start, _, info, body) = open.take().expect("open block");
            blocks.push(Block {
                file,
                line: start,
                info,
                text: body,
                section: section.clone(),
            });
        } else if let Some((_, ind, _, body)) = open.as_mut() {
            let cut = line.bytes().take(*ind).take_while(|b| *b == b' ').count();
            body.push_str(&line[cut..]);
            body.push('\n');
        } else if let Some(info) = trimmed.strip_prefix("```") {
            open = Some((i + 1, indent, info.trim().to_owned(), String::new()));
        } else if let Some(heading) = line.strip_prefix("## ") {
            section = heading.trim().to_owned();
        }
    }
    assert!(open.is_none(), "{file}: a fenced block is never closed");
    blocks
}

// ------------------------------------------------------------------ shell commands

/// What one shell command is, hence how it runs.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// `serve`: starts the gateway, in the background.
    Serve,
    /// `curl -N`: follows a stream until the time limit.
    Stream,
    /// `python3 -m http.server`: a static server, in the background.
    Static,
    /// `cd`.
    Cd,
    /// Runs to completion (`curl`, `sse-gateway publish|tail|token`, `echo`).
    Run { needs_gateway: bool },
    /// `inspect|check|export|import`: offline, the gateway stopped first.
    Offline,
    /// Not executed, with the reason.
    NotRun(&'static str),
    /// No rule knows it.
    Unknown(String),
}

/// One command of a shell block.
#[derive(Debug, Clone)]
struct Cmd {
    /// Its README line.
    line: usize,
    /// Its first and last line in the block (continuations included).
    first: usize,
    last: usize,
    text: String,
    /// The `# ` lines right after it: what it prints.
    output: Vec<String>,
    kind: Kind,
}

fn commands(block: &Block) -> Vec<Cmd> {
    let lines: Vec<&str> = block.text.lines().collect();
    let mut cmds: Vec<Cmd> = Vec::new();
    let mut after_command = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() {
            after_command = false;
        } else if line.trim_start().starts_with('#') {
            if after_command {
                let cmd = cmds.last_mut().expect("a command");
                let out = line.trim_start().trim_start_matches('#');
                cmd.output
                    .push(out.strip_prefix(' ').unwrap_or(out).to_owned());
            }
        } else {
            let first = i;
            let mut text = line.to_owned();
            while lines[i].trim_end().ends_with('\\') && i + 1 < lines.len() {
                i += 1;
                text.push('\n');
                text.push_str(lines[i]);
            }
            cmds.push(Cmd {
                line: block.line + 1 + first,
                first,
                last: i,
                kind: kind_of(&text),
                text,
                output: Vec::new(),
            });
            after_command = true;
        }
        i += 1;
    }
    cmds
}

/// The text without end-of-line comments (a `#` after whitespace, outside quotes).
fn without_comment(text: &str) -> String {
    let (mut single, mut double, mut prev_space) = (false, false, true);
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => break,
            _ => {}
        }
        prev_space = c.is_whitespace();
        out.push(c);
    }
    out
}

fn kind_of(text: &str) -> Kind {
    if text.contains("scripts/test.sh") {
        return Kind::NotRun(
            "the whole CI run (fmt, clippy, every test), of which this test is one",
        );
    }
    if text.contains("POWERCUT_") && text.contains("cargo test") {
        return Kind::NotRun(
            "tests/gateway/power_loss.rs run long (minutes); this suite runs the same test with CI's 2 cuts per mode",
        );
    }
    let code = without_comment(text).replace("\\\n", " ");
    let mut kinds = Vec::new();
    for segment in code.split(['|', ';', '&']).flat_map(|s| s.split("$(")) {
        let words: Vec<&str> = segment
            .split_whitespace()
            .map(|w| w.trim_matches(|c| c == '(' || c == ')'))
            .filter(|w| !w.is_empty())
            .skip_while(|w| {
                w.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
            })
            .collect();
        let Some(program) = words.first() else {
            continue;
        };
        let sub = match *program {
            "sse-gateway" => words.get(1).copied(),
            "cargo" if words.get(1) == Some(&"run") && words.contains(&"--release") => words
                .iter()
                .position(|w| *w == "--")
                .and_then(|k| words.get(k + 1).copied()),
            _ => None,
        };
        kinds.push(match (*program, sub) {
            ("curl", _) if words.contains(&"-N") => Kind::Stream,
            ("curl", _) => Kind::Run {
                needs_gateway: true,
            },
            ("sse-gateway" | "cargo", Some("serve")) => Kind::Serve,
            ("sse-gateway" | "cargo", Some("publish" | "tail")) => Kind::Run {
                needs_gateway: true,
            },
            ("sse-gateway" | "cargo", Some("token")) => Kind::Run {
                needs_gateway: false,
            },
            ("sse-gateway" | "cargo", Some("inspect" | "check" | "export" | "import")) => {
                Kind::Offline
            }
            ("cd", _) => Kind::Cd,
            ("echo", _) => Kind::Run {
                needs_gateway: false,
            },
            ("python3", _) if segment.contains("-m http.server") => Kind::Static,
            _ => Kind::Unknown(segment.trim().to_owned()),
        });
    }
    if let Some(unknown) = kinds.iter().find(|k| matches!(k, Kind::Unknown(_))) {
        return unknown.clone();
    }
    for strong in [Kind::Serve, Kind::Static, Kind::Offline] {
        if kinds.contains(&strong) {
            return strong;
        }
    }
    for only in [Kind::Stream, Kind::Cd] {
        if !kinds.is_empty() && kinds.iter().all(|k| *k == only) {
            return only;
        }
    }
    if kinds.is_empty() {
        return Kind::Unknown(text.to_owned());
    }
    Kind::Run {
        needs_gateway: kinds.contains(&Kind::Run {
            needs_gateway: true,
        }) || kinds.contains(&Kind::Stream),
    }
}

/// Commands that only start something long-running (or `cd` before it): the
/// block runs in the background.
fn is_background(cmds: &[Cmd]) -> bool {
    let run: Vec<&Cmd> = cmds
        .iter()
        .filter(|c| !matches!(c.kind, Kind::NotRun(_)))
        .collect();
    !run.is_empty()
        && run
            .iter()
            .all(|c| matches!(c.kind, Kind::Serve | Kind::Stream | Kind::Static | Kind::Cd))
}

// ------------------------------------------------------------------ classification

/// How a block is handled.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// Shell commands, run in order by [`run_session`].
    Shell,
    /// A plain block after a `curl -N` follower in its section: what it prints.
    Output,
    /// A `toml` block the shell blocks of its section run under (root
    /// `config.toml` plus this block).
    Config,
    /// The Development tree: every path it names exists.
    Tree,
    /// The browser snippet, in node.
    Browser,
    /// The Python follower.
    Python,
    /// A `redis.conf` block: `redis-server` starts with it.
    RedisConf,
    /// `[storage] backend = "redis"`: gateways on a test Redis.
    RedisStorage,
    /// `[storage] backend = "redis-cluster"`: a gateway on a 3-node cluster.
    ClusterStorage,
    /// nginx in front of the section's gateways.
    Nginx,
    /// Not run, with the reason.
    NotRun(&'static str),
    /// No rule knows it: the message.
    Unknown(String),
}

fn classify(blocks: &[Block]) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut follower_in: Option<String> = None;
    for block in blocks {
        if follower_in.as_deref() != Some(&block.section) {
            follower_in = None;
        }
        let rule = match block.info.as_str() {
            "sh" | "bash" | "shell" => {
                let cmds = commands(block);
                let unknown = cmds.iter().find_map(|c| match &c.kind {
                    Kind::Unknown(what) => Some(format!(
                        "line {}: `{what}` is a command the README test does not know — run it or say why not",
                        c.line
                    )),
                    _ => None,
                });
                let bad_output = cmds.iter().find(|c| {
                    !c.output.is_empty()
                        && !matches!(c.kind, Kind::Run { .. } | Kind::Offline | Kind::NotRun(_))
                });
                if let Some(message) = unknown {
                    Rule::Unknown(message)
                } else if let Some(c) = bad_output {
                    Rule::Unknown(format!(
                        "line {}: `# …` lines after a command that runs in the background are read as its output and cannot be compared: make them prose or an end-of-line comment",
                        c.line
                    ))
                } else if cmds.is_empty() {
                    Rule::Unknown(UNKNOWN.to_owned())
                } else if let Some(Kind::NotRun(reason)) = cmds
                    .iter()
                    .all(|c| matches!(c.kind, Kind::NotRun(_)))
                    .then(|| cmds[0].kind.clone())
                {
                    Rule::NotRun(reason)
                } else {
                    if is_background(&cmds) && cmds.iter().any(|c| c.kind == Kind::Stream) {
                        follower_in = Some(block.section.clone());
                    }
                    Rule::Shell
                }
            }
            "" if follower_in.is_some() => Rule::Output,
            "" | "json" if block.file == API_MD => Rule::NotRun(
                "a format illustration of the reference, not a command's output; \
                 tests/gateway/subscribe_api.rs and publish_api.rs pin the formats",
            ),
            "" if is_tree(&block.text) => Rule::Tree,
            "toml" => match block.text.parse::<toml::Table>() {
                Err(e) => Rule::Unknown(format!("a toml block that does not parse: {e}")),
                Ok(table) => match table
                    .get("storage")
                    .and_then(|s| s.get("backend"))
                    .and_then(|b| b.as_str())
                {
                    Some("redis") => Rule::RedisStorage,
                    Some("redis-cluster") => Rule::ClusterStorage,
                    Some(other) => Rule::Unknown(format!("storage backend {other:?}: {UNKNOWN}")),
                    None => Rule::Config,
                },
            },
            "conf" if block.text.contains("appendonly") || block.text.contains("maxmemory") => {
                Rule::RedisConf
            }
            "nginx" => Rule::Nginx,
            "python" => Rule::Python,
            "js" | "javascript" => Rule::Browser,
            _ => Rule::Unknown(UNKNOWN.to_owned()),
        };
        rules.push(rule);
    }
    rules
}

/// Every block of every file with its rule.
fn classified() -> Vec<(Block, Rule)> {
    FILES
        .iter()
        .flat_map(|file| {
            let blocks = blocks_of(file);
            let rules = classify(&blocks);
            blocks.into_iter().zip(rules)
        })
        .collect()
}

/// The blocks with `rule`; panics when there is none (a runner that runs nothing).
fn blocks_with(rule: Rule) -> Vec<Block> {
    let blocks: Vec<Block> = classified()
        .into_iter()
        .filter(|(_, r)| *r == rule)
        .map(|(b, _)| b)
        .collect();
    assert!(!blocks.is_empty(), "no README block has the rule {rule:?}");
    blocks
}

/// A directory tree: each unindented line starts with a path.
fn is_tree(text: &str) -> bool {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    !lines.is_empty()
        && lines.iter().all(|l| {
            l.starts_with(' ')
                || l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.contains('/') || w.contains('.'))
        })
}

// ------------------------------------------------------------------ substitutions

/// The documented substitutions, in one place.
#[derive(Debug, Clone, Default)]
struct Subst {
    gateway: Option<SocketAddr>,
    epoch: Option<String>,
    static_port: u16,
}

impl Subst {
    fn apply(&self, text: &str) -> String {
        let mut text = text
            .replace("cargo run -q --release --", "sse-gateway")
            .replace("cargo run --release --", "sse-gateway")
            .replace(
                "http.server 8000",
                &format!("http.server {}", self.static_port),
            )
            .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", self.static_port));
        // The gateway refuses this published example secret on purpose.
        text = text.replace(
            "a-random-secret-of-at-least-32-bytes",
            "readme-test-secret-0123456789abcdefghijklmnop",
        );
        if let Some(addr) = self.gateway {
            text = text.replace("127.0.0.1:8080", &addr.to_string());
        }
        if let Some(epoch) = &self.epoch {
            text = text.replace(EXAMPLE_EPOCH, epoch);
        }
        text
    }
}

/// Replaces the distinct private (`10.x.x.x:port`) addresses of a config
/// block, in order of appearance, with `targets`.
fn private_addresses(text: &str, targets: &[String]) -> String {
    let re = regex::Regex::new(r"\b10\.\d+\.\d+\.\d+:\d+\b").expect("regex");
    let mut distinct: Vec<String> = Vec::new();
    for m in re.find_iter(text) {
        if !distinct.iter().any(|d| d == m.as_str()) {
            distinct.push(m.as_str().to_owned());
        }
    }
    assert!(
        distinct.len() <= targets.len(),
        "{} addresses in a config block, {} test servers: {distinct:?}",
        distinct.len(),
        targets.len()
    );
    re.replace_all(text, |c: &regex::Captures| {
        let k = distinct.iter().position(|d| *d == c[0]).expect("seen");
        targets[k].clone()
    })
    .into_owned()
}

/// The repository's `config.toml` with `block`'s keys set (a table of the
/// block replaces the same keys of the same table; new tables are added).
fn merged_config(blocks: &[String]) -> String {
    let root = std::fs::read_to_string(repo_path("config.toml")).expect("config.toml");
    if blocks.is_empty() {
        return root;
    }
    let mut table: toml::Table = root.parse().expect("config.toml parses");
    for block in blocks {
        let extra: toml::Table = block
            .parse()
            .unwrap_or_else(|e| panic!("a README toml block does not parse: {e}\n{block}"));
        for (key, value) in extra {
            match (table.get_mut(&key), value) {
                (Some(toml::Value::Table(base)), toml::Value::Table(add)) => base.extend(add),
                (_, value) => {
                    table.insert(key, value);
                }
            }
        }
    }
    toml::to_string(&table).expect("config serialises")
}

/// `true` when `text` matches `pattern`, where `…` matches any text.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(parts[0]) else {
        return false;
    };
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(k) => rest = &rest[k + mid.len()..],
            None => return false,
        }
    }
    rest.ends_with(parts[parts.len() - 1])
}

// ------------------------------------------------------------------ processes

/// A background process in its own process group (killed with the group).
struct Bg {
    what: String,
    child: tokio::process::Child,
    pgid: i32,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

fn pump(reader: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut reader) = reader {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().expect("pump lock").extend_from_slice(&buf[..n]);
            }
        });
    }
    sink
}

impl Bg {
    fn spawn(what: String, mut command: tokio::process::Command) -> Self {
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}; {SETUP}"));
        let pgid = child.id().expect("a pid") as i32;
        let out = pump(child.stdout.take());
        let err = pump(child.stderr.take());
        Self {
            what,
            child,
            pgid,
            out,
            err,
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("out lock")).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().expect("err lock")).into_owned()
    }

    /// The processes of its group (the leader is the spawned process).
    fn members(&self) -> Vec<i32> {
        if self.pgid <= 0 {
            return Vec::new();
        }
        let out = std::process::Command::new("pgrep")
            .args(["-g", &self.pgid.to_string()])
            .output()
            .expect("pgrep (procps)");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn group_alive(&self) -> bool {
        !self.members().is_empty()
    }

    /// Signals the leader's descendants (or the leader when it has none): a
    /// shell then finishes by itself and reaps them, leaving no orphan.
    fn signal(&self, signal: &str) {
        let others: Vec<String> = self
            .members()
            .into_iter()
            .filter(|p| *p != self.pgid)
            .map(|p| p.to_string())
            .collect();
        let targets = if others.is_empty() && self.pgid > 0 {
            vec![self.pgid.to_string()]
        } else {
            others
        };
        if !targets.is_empty() {
            let _ = std::process::Command::new("kill")
                .arg(signal)
                .arg("--")
                .args(&targets)
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGTERM, then waits until every process of its group is gone.
    async fn stop(mut self) {
        self.signal("-TERM");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.child.try_wait().ok().flatten().is_some() && !self.group_alive() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within 20 s of SIGTERM",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pgid = 0;
    }

    /// Its exit status if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.pgid > 0 {
            // Descendants first, so that the shell reaps them; then the shell.
            self.signal("-KILL");
            std::thread::sleep(Duration::from_millis(50));
            let _ = self.child.start_kill();
        }
    }
}

/// Waits until `check` holds, up to [`WAIT`]; panics with `what()` otherwise.
async fn wait_for(mut check: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(url: &str) -> Option<StatusCode> {
    fresh_client()
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status())
}

async fn wait_ready(base: &str) {
    let url = format!("{base}/readyz");
    let deadline = tokio::time::Instant::now() + WAIT;
    while status_of(&url).await != Some(StatusCode::OK) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} did not answer 200"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The epoch of the gateway at `base` (from `GET /topics`' `head_id`).
async fn epoch_at(base: &str) -> String {
    let (status, topics) = get_json(&fresh_client(), &format!("{base}/topics")).await;
    assert_eq!(status, StatusCode::OK, "GET /topics: {topics}");
    epoch_of(topics["head_id"].as_str().expect("head_id")).to_owned()
}

/// Publishes one event to `topic` at `base`; the id.
async fn publish_at(base: &str, topic: &str, event: &str, data: Value) -> String {
    publish(&fresh_client(), base, topic, event, data).await
}

// ------------------------------------------------------------------ the shell walk-through

/// Defines the `curl` that limits `-N` streams (the only change to the
/// commands) and fails on an HTTP error (the test's check that it worked).
const PREAMBLE: &str = r#"set -eo pipefail
curl() {
    local arg
    for arg in "$@"; do
        if [[ $arg == -N ]]; then
            command curl -sS --fail-with-body --max-time "$README_STREAM_SECS" "$@" && return 0
            local rc=$?
            [[ $rc == 28 ]] && return 0
            return $rc
        fi
    done
    command curl -sS --fail-with-body "$@"
}
"#;

/// The README's shell blocks in order, as one operator would run them from
/// the repository root: one data dir, one gateway started by the `serve`
/// block, restarted when a section's `toml` blocks change its `config.toml`
/// and stopped for the offline tools.
struct Session {
    file: &'static str,
    /// Stands for the repository root: `config.toml`, `./data`, and links to
    /// the rest of the checkout.
    root: TempDir,
    /// Holds the `sse-gateway` shim.
    bin: TempDir,
    subst: Subst,
    /// The running gateway, and the `serve` script that started it.
    gateway: Option<Bg>,
    serve_script: Option<(String, String)>,
    section: String,
    section_toml: Vec<String>,
    /// Background blocks of the section: followers (with the output their
    /// plain blocks show) and static servers.
    background: Vec<(Bg, String)>,
    /// The follower plain blocks refer to.
    current: Option<usize>,
}

impl Session {
    fn new(file: &'static str) -> Self {
        let root = TempDir::new().expect("tempdir");
        let repo = repo_path("");
        for entry in std::fs::read_dir(&repo).expect("repo root") {
            let entry = entry.expect("entry");
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if ["config.toml", "data", "target", ".git"].contains(&name.as_ref()) {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), root.path().join(name.as_ref()))
                .expect("symlink");
        }
        let bin = TempDir::new().expect("tempdir");
        let shim = bin.path().join("sse-gateway");
        std::fs::write(
            &shim,
            format!(
                "#!/usr/bin/env bash\n\
                 # The binary under test; `tail` follows for README_STREAM_SECS.\n\
                 if [[ ${{1-}} == tail ]]; then\n\
                 \ttimeout \"$README_STREAM_SECS\" '{bin}' \"$@\" && exit 0\n\
                 \trc=$?; [[ $rc == 124 ]] && exit 0; exit $rc\n\
                 fi\n\
                 exec '{bin}' \"$@\"\n",
                bin = env!("CARGO_BIN_EXE_sse-gateway")
            ),
        )
        .expect("write shim");
        std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod shim");
        let session = Self {
            file,
            root,
            bin,
            subst: Subst {
                static_port: free_port(),
                ..Subst::default()
            },
            gateway: None,
            // A file that starts no gateway of its own runs against the
            // README's command (a).
            serve_script: Some((
                "README.md command (a)".to_owned(),
                format!("{PREAMBLE}cargo run --release -- serve\n")
                    .replace("cargo run --release --", "sse-gateway"),
            )),
            section: String::new(),
            section_toml: Vec::new(),
            background: Vec::new(),
            current: None,
        };
        session.write_config();
        session
    }

    fn write_config(&self) {
        let blocks: Vec<String> = self
            .section_toml
            .iter()
            .map(|b| self.subst.apply(b))
            .collect();
        std::fs::write(self.root.path().join("config.toml"), merged_config(&blocks))
            .expect("write config.toml");
    }

    fn base(&self) -> String {
        format!("http://{}", self.subst.gateway.expect("a gateway"))
    }

    /// `bash -c script` in the root, with the shim first on `PATH`.
    fn shell(&self, script: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-c", script])
            .current_dir(self.root.path())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.path().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("README_STREAM_SECS", STREAM_SECS.to_string())
            .env("SSE_GATEWAY_LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .env_remove("SSE_GATEWAY_CONFIG")
            .env_remove("SSE_GATEWAY_DATA_DIR")
            .env_remove("SSE_GATEWAY_TOKEN");
        if let Some(addr) = self.subst.gateway {
            command.env("SSE_GATEWAY_URL", format!("http://{addr}"));
        }
        command
    }

    /// The block as a script: commands not run become comments; with
    /// `markers`, each command's output is preceded by a marker line.
    fn script(&self, block: &Block, cmds: &[Cmd], markers: bool) -> String {
        let mut script = String::from(PREAMBLE);
        script.push_str(&format!("# ---- {} ----\n", block.at()));
        for (i, line) in block.text.lines().enumerate() {
            if let Some((k, cmd)) = cmds.iter().enumerate().find(|(_, c)| c.first == i) {
                if let Kind::NotRun(reason) = cmd.kind {
                    script.push_str(&format!("# not run: {reason}\n"));
                } else if markers {
                    script.push_str(&format!("printf '\\n@@README-CMD-{k}@@\\n'\n"));
                }
            }
            let not_run = cmds
                .iter()
                .any(|c| matches!(c.kind, Kind::NotRun(_)) && (c.first..=c.last).contains(&i));
            if !not_run {
                script.push_str(&self.subst.apply(line));
                script.push('\n');
            }
        }
        script
    }

    async fn start_gateway(&mut self) {
        let (at, script) = self.serve_script.clone().unwrap_or_else(|| {
            panic!(
                "{}: a block needs the gateway, but no block before it starts one",
                self.file
            )
        });
        let bg = Bg::spawn(format!("the gateway of {at}"), self.shell(&script));
        let mut addr = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while addr.is_none() {
            addr = bg
                .stderr()
                .split("listening on http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok());
            assert!(
                tokio::time::Instant::now() < deadline && bg.group_alive(),
                "{at}: the gateway did not start:\n{}",
                bg.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.subst.gateway = addr;
        self.gateway = Some(bg);
        let base = self.base();
        wait_ready(&base).await;
        self.subst.epoch = Some(epoch_at(&base).await);
        self.check_config_effects().await;
    }

    async fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop().await;
        }
    }

    async fn restart_gateway(&mut self) {
        if self.gateway.is_some() {
            self.stop_gateway().await;
            self.start_gateway().await;
        }
    }

    /// The section's `toml` blocks took effect: `[auth]` refuses an anonymous
    /// publish, `[cors]` answers each allowed origin.
    async fn check_config_effects(&self) {
        let base = self.base();
        for text in &self.section_toml {
            let table: toml::Table = self.subst.apply(text).parse().expect("toml");
            if table.contains_key("auth") {
                let (status, body) = post_raw(
                    &fresh_client(),
                    &format!("{base}/topics/readme:auth"),
                    r#"{"data": 1}"#,
                )
                .await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "[auth] is on: {body}");
            }
            let origins = table
                .get("cors")
                .and_then(|c| c.get("allowed_origins"))
                .and_then(|o| o.as_array())
                .cloned()
                .unwrap_or_default();
            for origin in origins.iter().filter_map(|o| o.as_str()) {
                let response = fresh_client()
                    .get(format!("{base}/healthz"))
                    .header("origin", origin)
                    .send()
                    .await
                    .expect("GET /healthz");
                let allowed = response
                    .headers()
                    .get("access-control-allow-origin")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                assert_eq!(allowed.as_deref(), Some(origin), "[cors] allows {origin}");
            }
        }
    }

    /// Leaving a section: its background blocks end (each that exited must
    /// have succeeded) and its config blocks no longer apply.
    async fn enter_section(&mut self, section: &str) {
        if section == self.section {
            return;
        }
        for (mut bg, _) in std::mem::take(&mut self.background) {
            if let Some(status) = bg.exited() {
                assert!(
                    status.success(),
                    "{} failed ({status}):\n{}\n{}",
                    bg.what,
                    bg.stdout(),
                    bg.stderr()
                );
            }
        }
        self.current = None;
        self.section = section.to_owned();
        if !self.section_toml.is_empty() {
            self.section_toml.clear();
            self.write_config();
            self.restart_gateway().await;
        }
    }

    async fn config(&mut self, block: &Block) {
        self.section_toml.push(block.text.clone());
        self.write_config();
        if self.gateway.is_some() {
            self.restart_gateway().await;
        }
    }

    async fn shell_block(&mut self, block: &Block) {
        let cmds = commands(block);
        let kinds: Vec<&Kind> = cmds.iter().map(|c| &c.kind).collect();
        if kinds.contains(&&Kind::Serve) {
            self.stop_gateway().await;
            self.serve_script = Some((block.at(), self.script(block, &cmds, false)));
            self.start_gateway().await;
            return;
        }
        let offline = kinds.contains(&&Kind::Offline);
        let needs_gateway = kinds.iter().any(|k| {
            matches!(
                k,
                Kind::Stream
                    | Kind::Run {
                        needs_gateway: true
                    }
            )
        });
        if offline {
            self.stop_gateway().await;
        } else if needs_gateway && self.gateway.is_none() {
            self.start_gateway().await;
        }
        if is_background(&cmds) {
            let mut command = self.shell(&self.script(block, &cmds, false));
            command.env("README_STREAM_SECS", BACKGROUND_STREAM_SECS.to_string());
            let bg = Bg::spawn(block.at(), command);
            if kinds.contains(&&Kind::Static) {
                self.check_static_server(block, &bg).await;
            } else {
                self.current = Some(self.background.len());
            }
            self.background.push((bg, String::new()));
            return;
        }
        let script = self.script(block, &cmds, true);
        let mut command = self.shell(&script);
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("run bash");
        let pgid = child.id().expect("a pid");
        let output =
            match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
                Ok(output) => output.expect("bash output"),
                Err(_) => {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pgid}")])
                        .status();
                    panic!("{}: still running after 60 s", block.at())
                }
            };
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: the block failed ({}).\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
            block.at(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let mut outputs: BTreeMap<usize, String> = BTreeMap::new();
        for piece in stdout.split("\n@@README-CMD-").skip(1) {
            let (k, out) = piece.split_once("@@\n").unwrap_or((piece, ""));
            outputs.insert(
                k.trim_end_matches('@').parse().expect("marker"),
                out.to_owned(),
            );
        }
        for (k, cmd) in cmds.iter().enumerate() {
            if cmd.output.is_empty() || matches!(cmd.kind, Kind::NotRun(_)) {
                continue;
            }
            let expected = self.subst.apply(&cmd.output.join("\n"));
            let actual = outputs.get(&k).map(|o| o.trim_end()).unwrap_or_default();
            let actual: String = actual
                .lines()
                .map(str::trim_end)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                wildcard_match(&expected, &actual),
                "{} line {}: the README shows\n{expected}\nbut `{}` printed\n{actual}",
                self.file,
                cmd.line,
                cmd.text
            );
        }
    }

    /// The static server serves the page, and the gateway (when running)
    /// allows its origin: what the section's `[cors]` block is for.
    async fn check_static_server(&self, block: &Block, bg: &Bg) {
        let base = format!("http://127.0.0.1:{}", self.subst.static_port);
        if self.gateway.is_some() {
            let response = fresh_client()
                .get(format!("{}/healthz", self.base()))
                .header("origin", &base)
                .send()
                .await
                .expect("GET /healthz");
            let allowed = response
                .headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert!(
                allowed.as_deref() == Some(base.as_str()) || allowed.as_deref() == Some("*"),
                "{}: the gateway does not allow the page's origin {base} (CORS: {allowed:?})",
                block.at()
            );
        }
        for path in ["/", "/index.html", "/app.js"] {
            let url = format!("{base}{path}");
            let deadline = tokio::time::Instant::now() + WAIT;
            while status_of(&url).await != Some(StatusCode::OK) {
                assert!(
                    tokio::time::Instant::now() < deadline && bg.group_alive(),
                    "{}: {url} is not served:\n{}",
                    block.at(),
                    bg.stderr()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn output_block(&mut self, block: &Block) {
        let k = self.current.expect("classified as output: a follower runs");
        let expected = {
            let (_, shown) = &mut self.background[k];
            shown.push_str(&self.subst.apply(&block.text));
            shown.clone()
        };
        let (bg, _) = &self.background[k];
        wait_for(
            || wildcard_match(&expected, &bg.stdout()),
            || {
                format!(
                    "{}: the follower ({}) printed\n{}\nbut the README shows (all its plain blocks so far)\n{expected}",
                    block.at(),
                    bg.what,
                    bg.stdout()
                )
            },
        )
        .await;
    }
}

/// Runs every `Shell`, `Output` and `Config` block of `file` in order.
async fn run_session(file: &'static str) {
    let blocks = blocks_of(file);
    let rules = classify(&blocks);
    let mut session = Session::new(file);
    let mut ran = 0;
    for (block, rule) in blocks.iter().zip(&rules) {
        if !matches!(rule, Rule::Shell | Rule::Output | Rule::Config) {
            continue;
        }
        session.enter_section(&block.section).await;
        println!("{}: {rule:?}", block.at());
        match rule {
            Rule::Shell => session.shell_block(block).await,
            Rule::Output => session.output_block(block).await,
            Rule::Config => session.config(block).await,
            _ => unreachable!(),
        }
        ran += 1;
    }
    session.enter_section("(end)").await;
    assert!(ran > 0, "{file}: no shell block ran");
    session.stop_gateway().await;
}

// ------------------------------------------------------------------ tests

#[test]
fn readme_every_block_is_run_or_excused() {
    let mut unknown = Vec::new();
    for (block, rule) in classified() {
        println!("{} ({}): {rule:?}", block.at(), block.info);
        if rule == Rule::Shell {
            for cmd in commands(&block) {
                if let Kind::NotRun(reason) = cmd.kind {
                    println!("    line {}: not run: {reason}", cmd.line);
                }
            }
        }
        if let Rule::Unknown(message) = rule {
            unknown.push(format!("{}: {message}", block.at()));
        }
    }
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
}

#[test]
fn readme_development_tree_names_paths_that_exist() {
    for block in blocks_with(Rule::Tree) {
        let mut missing = Vec::new();
        // The directory a line's words are relative to.
        let (mut top, mut base) = (String::new(), String::new());
        for line in block.text.lines().filter(|l| !l.trim().is_empty()) {
            let indent = line.len() - line.trim_start().len();
            let mut words = line.split_whitespace().peekable();
            let rest_from;
            if indent == 0 {
                // `a/b.rs  what it is` or `a/, b/ what they are`.
                let mut paths = Vec::new();
                for word in words.by_ref() {
                    paths.push(word.trim_end_matches(',').to_owned());
                    if !word.ends_with(',') {
                        break;
                    }
                }
                for path in &paths {
                    if !repo_path(path).exists() {
                        missing.push(path.clone());
                    }
                }
                top = paths.last().cloned().unwrap_or_default();
                base = top.clone();
                rest_from = words.collect::<Vec<_>>().join(" ");
            } else if indent == 2
                && line
                    .split_whitespace()
                    .next()
                    .is_some_and(|w| w.ends_with('/'))
            {
                let sub = words.next().unwrap_or_default();
                base = format!("{top}{sub}");
                if !repo_path(&base).exists() {
                    missing.push(base.clone());
                }
                rest_from = words.collect::<Vec<_>>().join(" ");
            } else {
                rest_from = line.to_owned();
            }
            check_tokens(&rest_from, &base, &mut missing);
        }
        assert!(
            missing.is_empty(),
            "{}: the Development tree names paths that do not exist: {missing:?}",
            block.at()
        );
    }
}

/// Path-like words of a description (`x.rs`, `a/{b,c}.rs`, `dir/`) exist
/// under `base` (when it is a directory) or the repository root.
fn check_tokens(text: &str, base: &str, missing: &mut Vec<String>) {
    let token = regex::Regex::new(r"^[A-Za-z0-9_./{},-]+(\.rs|\.md|/)$").expect("regex");
    let dir = if base.ends_with('/') { base } else { "" };
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c: char| "(),:;".contains(c));
        if !token.is_match(word) {
            continue;
        }
        let expanded: Vec<String> = match (word.find('{'), word.find('}')) {
            (Some(open), Some(close)) if open < close => word[open + 1..close]
                .split(',')
                .map(|alt| format!("{}{alt}{}", &word[..open], &word[close + 1..]))
                .collect(),
            _ => vec![word.to_owned()],
        };
        for path in expanded {
            if !(repo_path(&format!("{dir}{path}")).exists() || repo_path(&path).exists()) {
                missing.push(format!("{path} (in the line of {base})"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_shell_walkthrough_runs_as_written() {
    run_session("README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_dashboard_run_it_steps_run_as_written() {
    run_session("examples/projects-dashboard/README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_api_reference_commands_run_as_written() {
    run_session(API_MD).await;
}

/// The browser snippet in node, with the `eventsource` package as
/// `EventSource` and stubs for `localStorage`, `applyUpdate` and
/// `refetchEverything` that print what they are given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_browser_snippet_applies_updates_and_refetches_on_reset() {
    let package = repo_path("tests/js/node_modules/eventsource/package.json");
    assert!(
        package.is_file(),
        "{} is missing: run `bash scripts/test.sh` (npm ci in tests/js)",
        package.display()
    );
    for block in blocks_with(Rule::Browser) {
        let dir = TempDir::new().expect("tempdir");
        let gateway = GatewayProcess::start(&dir.path().join("data"), "127.0.0.1:0", &[]);
        let epoch = epoch_at(&gateway.base).await;
        let subst = Subst {
            gateway: Some(gateway.addr),
            epoch: Some(epoch.clone()),
            ..Subst::default()
        };
        let harness = format!(
            r#"import {{ createRequire }} from "node:module";
const __readme = (() => {{
  const require = createRequire(process.env.README_JS_PACKAGE);
  globalThis.EventSource = require("eventsource").EventSource;
  const print = (value) => process.stdout.write(`${{JSON.stringify(value)}}\n`);
  const store = new Map(Object.entries(JSON.parse(process.env.README_JS_STORAGE)));
  globalThis.localStorage = {{
    getItem: (key) => (store.has(key) ? store.get(key) : null),
    setItem: (key, value) => {{ store.set(key, String(value)); print({{ setItem: key, value: String(value) }}); }},
  }};
  globalThis.applyUpdate = (update) => print({{ applyUpdate: update }});
  globalThis.refetchEverything = () => print({{ refetchEverything: true }});
}})();
// ---- {} ----
{}"#,
            block.at(),
            subst.apply(&block.text)
        );
        let script = dir.path().join("snippet.mjs");
        std::fs::write(&script, harness).expect("write snippet.mjs");
        let node = |storage: Value| {
            let mut command = tokio::process::Command::new("node");
            command
                .arg(&script)
                .env("README_JS_PACKAGE", repo_path("tests/js/package.json"))
                .env("README_JS_STORAGE", storage.to_string());
            Bg::spawn(format!("node running {}", block.at()), command)
        };
        let lines = |bg: &Bg| -> Vec<Value> {
            bg.stdout()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        let uuid = "3f1c2b4a-1111-4222-8333-444455556666";
        let info = gateway.url(&format!("/topics/projects:project:{uuid}/info"));

        // Nothing saved: live from now; a published update is applied and its id saved.
        let first = node(json!({}));
        wait_subscribed(&info, &block, &first).await;
        let payload = json!({"uuid": uuid, "name": "Roof", "status": "active"});
        let (status, answer) = post_raw(
            &fresh_client(),
            &gateway.url("/projects/broadcast/project"),
            json!({"event": "project_updated", "payload": payload}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        let id = answer["id"].as_str().expect("id").to_owned();
        let want = vec![
            json!({"applyUpdate": payload}),
            json!({"setItem": "projects:lastEventId", "value": id}),
        ];
        wait_for(
            || lines(&first) == want,
            || {
                format!(
                    "{}: expected {want:?}, the snippet printed {}\n{}",
                    block.at(),
                    first.stdout(),
                    first.stderr()
                )
            },
        )
        .await;
        first.stop().await;

        // A saved id from another log: `reset`, a refetch, and the reset's id saved.
        let second = node(json!({"projects:lastEventId": "Zz9Zz9Zz-5"}));
        wait_for(
            || {
                let got = lines(&second);
                got.len() == 2
                    && got[0] == json!({"refetchEverything": true})
                    && got[1]["setItem"] == "projects:lastEventId"
                    && got[1]["value"].as_str().map(epoch_of) == Some(epoch.as_str())
            },
            || {
                format!(
                    "{}: expected a refetch and a saved id of epoch {epoch}; the snippet printed {}\n{}",
                    block.at(),
                    second.stdout(),
                    second.stderr()
                )
            },
        )
        .await;
        second.stop().await;
    }
}

/// The Python follower prints each event once across a gateway restart and,
/// while the gateway is down, waits the `retry:` delay between attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_python_follower_resumes_once_and_honours_retry() {
    for block in blocks_with(Rule::Python) {
        let dir = TempDir::new().expect("tempdir");
        let data = dir.path().join("data");
        let gateway = GatewayProcess::start(&data, "127.0.0.1:0", &[]);
        let addr = gateway.addr;
        let base = gateway.base.clone();
        let subst = Subst {
            gateway: Some(addr),
            ..Subst::default()
        };
        let script = dir.path().join("follower.py");
        std::fs::write(&script, subst.apply(&block.text)).expect("write follower.py");
        let mut command = tokio::process::Command::new("python3");
        command.arg(&script).env("PYTHONUNBUFFERED", "1");
        let follower = Bg::spawn(format!("python3 running {}", block.at()), command);
        let info = format!("{base}/topics/projects:all/info");
        wait_subscribed(&info, &block, &follower).await;
        publish_at(&base, "projects:all", "project_created", json!({"n": 1})).await;
        let first = "project_created {'n': 1}";
        wait_for(
            || follower.stdout().contains(first),
            || format!("{}: printed {}", block.at(), follower.stdout()),
        )
        .await;

        // Down for 3 s: a listener on the gateway's port counts the attempts.
        assert!(gateway.terminate().success());
        let listener = std::net::TcpListener::bind(addr).expect("rebind the gateway's port");
        listener.set_nonblocking(true).expect("nonblocking");
        let mut attempts = 0;
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < until {
            match listener.accept() {
                Ok((socket, _)) => {
                    attempts += 1;
                    drop(socket);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        drop(listener);
        assert!(
            (1..=3).contains(&attempts),
            "{}: {attempts} connection attempts in 3 s of downtime; `retry: 2000` allows 1 to 3",
            block.at()
        );

        let _gateway = start_gateway(&data, &addr.to_string(), None).await;
        wait_subscribed(&info, &block, &follower).await;
        publish_at(&base, "projects:all", "project_created", json!({"n": 2})).await;
        let second = "project_created {'n': 2}";
        wait_for(
            || follower.stdout().contains(second),
            || format!("{}: printed {}", block.at(), follower.stdout()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            follower.stdout().lines().collect::<Vec<_>>(),
            vec![first, second],
            "{}: each event printed once",
            block.at()
        );
        follower.stop().await;
    }
}

/// Waits until the topic of `info` (a `/topics/{topic}/info` URL) has one subscriber.
async fn wait_subscribed(info: &str, block: &Block, client: &Bg) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = get_json(&fresh_client(), info).await;
        if body["subscribers"].as_u64() == Some(1) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: the client did not subscribe ({body}):\n{}\n{}",
            block.at(),
            client.stdout(),
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `redis-server` started with a README `conf` block (plus the port, bind
/// address and dir lines the test adds), its log in the temp dir.
struct ConfRedis {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

impl ConfRedis {
    fn start(block: &Block) -> Self {
        let dir = TempDir::new().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "{}\n# added by the test\nport {port}\nbind 127.0.0.1\ndir {}\n",
                block.text,
                dir.path().display()
            ),
        )
        .expect("write redis.conf");
        let log = std::fs::File::create(dir.path().join("redis.log")).expect("log");
        let mut child = std::process::Command::new(require("redis-server"))
            .arg(&conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["ping"]) != "PONG" {
            let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
            assert!(
                child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline,
                "{}: redis-server does not start with this block:\n{log}",
                block.at()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every directive of the block is in effect.
        for line in block.text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once(char::is_whitespace).expect("key value");
            let got = redis_cli(port, &["config", "get", key]);
            assert_eq!(
                got.lines().nth(1).map(str::to_lowercase),
                Some(value.trim().to_lowercase()),
                "{}: CONFIG GET {key} answered {got:?}",
                block.at()
            );
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for ConfRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The distinct upstream `server` addresses of nginx blocks, in order.
fn upstream_addresses(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\bserver\s+(\d+\.\d+\.\d+\.\d+:\d+)").expect("regex");
    let mut out: Vec<String> = Vec::new();
    for c in re.captures_iter(text) {
        if !out.contains(&c[1].to_owned()) {
            out.push(c[1].to_owned());
        }
    }
    out
}

/// nginx (Debian's) with the README's blocks in its `http` context, in a
/// temp prefix: `daemon off`, `master_process off`, logs and temp files there.
struct Nginx {
    _bg: Bg,
    port: u16,
}

impl Nginx {
    async fn start(dir: &Path, blocks: &[&Block], gateways: &[String]) -> (Self, String) {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!("nginx is not installed: the README test runs its nginx blocks; {SETUP}")
            });
        let port = free_port();
        let mut http = String::new();
        let mut listens = 0;
        for block in blocks {
            listens += block.text.matches("listen 443 ssl http2;").count();
            let mut text = block
                .text
                .replace(
                    "listen 443 ssl http2;",
                    &format!("listen 127.0.0.1:{port};"),
                )
                .replace("/var/log/nginx/", &format!("{}/", dir.display()));
            let upstream = upstream_addresses(&text);
            for (k, addr) in upstream.iter().enumerate() {
                let target = gateways.get(k).unwrap_or_else(|| {
                    panic!("{}: more upstream servers than gateways", block.at())
                });
                text = text.replace(&format!("server {addr}"), &format!("server {target}"));
            }
            http.push_str(&format!("# ---- {} ----\n{text}\n", block.at()));
        }
        assert_eq!(
            listens, 1,
            "one `listen 443 ssl http2;` to point at a test port"
        );
        if !http.contains("access_log") {
            http.insert_str(0, &format!("access_log {}/access.log;\n", dir.display()));
        }
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             client_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n{http}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), &conf).expect("write nginx.conf");
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"));
        let bg = Bg::spawn("nginx".into(), command);
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline && bg.group_alive(),
                "nginx did not start:\n{}\n{}\n{conf}",
                bg.stderr(),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (Self { _bg: bg, port }, http)
    }
}

/// Each section with nginx, Redis config or Redis storage blocks: Redis from
/// the section's `conf` block, gateways (on that Redis with the section's
/// storage block, else on sled with the root config), one per upstream
/// `server`, nginx in front: a stream through nginx gets live events published
/// through nginx and on every gateway; with a `log_format` block the access
/// log has no `access_token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_nginx_and_redis_blocks_run_as_written() {
    let all = classified();
    let mut sections: Vec<(&'static str, String)> = Vec::new();
    for (block, rule) in &all {
        let key = (block.file, block.section.clone());
        if matches!(rule, Rule::Nginx | Rule::RedisConf | Rule::RedisStorage)
            && !sections.contains(&key)
        {
            sections.push(key);
        }
    }
    let mut seen = Vec::new();
    let access_log = regex::Regex::new(r"access_log\s+(\S+)").expect("regex");
    for (file, section) in sections {
        let of = |want: Rule| -> Vec<&Block> {
            all.iter()
                .filter(|(b, r)| b.file == file && b.section == section && *r == want)
                .map(|(b, _)| b)
                .collect()
        };
        let (confs, storages, nginxes) =
            (of(Rule::RedisConf), of(Rule::RedisStorage), of(Rule::Nginx));
        println!(
            "{file} ## {section}: {} conf, {} storage, {} nginx",
            confs.len(),
            storages.len(),
            nginxes.len()
        );
        seen.extend(confs.iter().map(|_| "conf"));
        seen.extend(storages.iter().map(|_| "storage"));
        seen.extend(nginxes.iter().map(|_| "nginx"));
        let dir = TempDir::new().expect("tempdir");
        let redis: Vec<ConfRedis> = confs.iter().map(|b| ConfRedis::start(b)).collect();
        let upstream: Vec<String> = nginxes
            .iter()
            .flat_map(|b| upstream_addresses(&b.text))
            .collect();
        let count = upstream.len().max(if storages.is_empty() { 0 } else { 2 });
        let config = match storages.as_slice() {
            [] => None,
            [storage] => {
                let targets: Vec<String> = match redis.first() {
                    Some(r) => vec![format!("127.0.0.1:{}", r.port)],
                    None => panic!(
                        "{}: a Redis storage block without a conf block in its section",
                        storage.at()
                    ),
                };
                let path = dir.path().join("config.toml");
                std::fs::write(
                    &path,
                    merged_config(&[private_addresses(&storage.text, &targets)]),
                )
                .expect("write config");
                Some(path)
            }
            more => panic!("{} Redis storage blocks in one section", more.len()),
        };
        let gateways: Vec<GatewayProcess> = (0..count)
            .map(|k| {
                GatewayProcess::start_with_config(
                    &dir.path().join(format!("data-{k}")),
                    "127.0.0.1:0",
                    config.as_deref(),
                    &[],
                )
            })
            .collect();
        for gateway in &gateways {
            wait_ready(&gateway.base).await;
        }
        if nginxes.is_empty() {
            if gateways.len() >= 2 {
                // One shared log: an event published on one node streams from another.
                let mut reader = SseReader::connect(
                    &fresh_client(),
                    &gateways[1].url("/topics/readme:shared"),
                    None,
                )
                .await;
                let id = publish_at(&gateways[0].base, "readme:shared", "e", json!(1)).await;
                assert_eq!(reader.next_event().await.id, id);
            }
            continue;
        }
        let addrs: Vec<String> = gateways.iter().map(|g| g.addr.to_string()).collect();
        let (nginx, http) = Nginx::start(dir.path(), &nginxes, &addrs).await;
        let front = format!("http://127.0.0.1:{}", nginx.port);
        let topic = "readme:nginx";
        let stream_url = format!("{front}/topics/{topic}?access_token=readme-secret-in-the-url");
        let mut reader = SseReader::connect(&fresh_client(), &stream_url, None).await;
        // Live: each event arrives before the next is published.
        let id = publish_at(&front, topic, "through_nginx", json!({"n": 0})).await;
        let event = tokio::time::timeout(Duration::from_secs(2), reader.next_event())
            .await
            .expect("an event published through nginx arrives live through nginx");
        assert_eq!(event.id, id);
        for (k, gateway) in gateways.iter().enumerate() {
            let id = publish_at(&gateway.base, topic, "direct", json!({"n": k + 1})).await;
            let event = tokio::time::timeout(Duration::from_secs(2), reader.next_event())
                .await
                .unwrap_or_else(|_| {
                    panic!("an event published on gateway {k} arrives live through nginx")
                });
            assert_eq!(event.id, id);
        }
        drop(reader);
        let log_path = access_log
            .captures(&http)
            .map(|c| c[1].to_owned())
            .expect("an access_log");
        if nginxes.iter().any(|b| b.text.contains("log_format")) {
            let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
            wait_for(
                || {
                    read()
                        .lines()
                        .any(|l| l.contains(&format!("GET /topics/{topic}")))
                },
                || format!("the stream's request is not in {log_path}:\n{}", read()),
            )
            .await;
            assert!(
                !read().contains("access_token"),
                "nginx's access log with the README's log_format has the token:\n{}",
                read()
            );
        }
    }
    for kind in ["conf", "storage", "nginx"] {
        assert!(seen.contains(&kind), "no README {kind} block ran");
    }
}

/// The Redis Cluster block serves a gateway on a 3-node cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_redis_cluster_block_serves_a_gateway() {
    for block in blocks_with(Rule::ClusterStorage) {
        let cluster = tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("cluster");
        let targets: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            merged_config(&[private_addresses(&block.text, &targets)]),
        )
        .expect("write config");
        let gateway = GatewayProcess::start_with_config(
            &dir.path().join("data"),
            "127.0.0.1:0",
            Some(&path),
            &[],
        );
        wait_ready(&gateway.base).await;
        let id = publish_at(&gateway.base, "readme:cluster", "e", json!({"n": 1})).await;
        let mut reader = SseReader::connect(
            &fresh_client(),
            &gateway.url("/topics/readme:cluster"),
            Some("0"),
        )
        .await;
        assert_eq!(
            reader.next_event().await.id,
            id,
            "{}: replay from the cluster",
            block.at()
        );
    }
}
