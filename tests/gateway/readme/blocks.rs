//! Extraction and classification: every fenced block of a file with its
//! line, info string and section; the commands of a shell block and what
//! each is; the rule that handles each block.

use super::*;

/// One fenced block.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) file: &'static str,
    /// 1-based line of the opening fence.
    pub(super) line: usize,
    pub(super) info: String,
    /// The content, the fence's indentation removed, every line ending in LF.
    pub(super) text: String,
    /// The `## ` heading it is under ("" before the first).
    pub(super) section: String,
}

impl Block {
    pub(super) fn at(&self) -> String {
        format!("{} line {}", self.file, self.line)
    }
}

pub(super) fn blocks_of(file: &'static str) -> Vec<Block> {
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
pub(super) enum Kind {
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
    /// `inspect|check|repair|export|import`: offline, the gateway stopped first.
    Offline,
    /// Not executed, with the reason.
    NotRun(&'static str),
    /// No rule knows it.
    Unknown(String),
}

/// One command of a shell block.
#[derive(Debug, Clone)]
pub(super) struct Cmd {
    /// Its README line.
    pub(super) line: usize,
    /// Its first and last line in the block (continuations included).
    pub(super) first: usize,
    pub(super) last: usize,
    pub(super) text: String,
    /// The `# ` lines right after it: what it prints.
    pub(super) output: Vec<String>,
    pub(super) kind: Kind,
}

pub(super) fn commands(block: &Block) -> Vec<Cmd> {
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
pub(super) fn without_comment(text: &str) -> String {
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

pub(super) fn kind_of(text: &str) -> Kind {
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
    if text.contains("--storage-backend redis") {
        return Kind::NotRun(
            "a move to or from Redis; tests/gateway/transfer.rs runs these commands against a real redis-server",
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
            (
                "sse-gateway" | "cargo",
                Some("inspect" | "check" | "repair" | "export" | "import"),
            ) => Kind::Offline,
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
pub(super) fn is_background(cmds: &[Cmd]) -> bool {
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
pub(super) enum Rule {
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
    /// A snippet of the gateway's browser client (it imports `/client.js`),
    /// in two tabs of headless Chromium.
    Client,
    /// The Python follower.
    Python,
    /// A `redis.conf` block: `redis-server` starts with it.
    RedisConf,
    /// `[storage] backend = "redis"`: gateways on a test Redis.
    RedisStorage,
    /// `[storage] backend = "redis-cluster"`: a gateway on a 3-node cluster.
    ClusterStorage,
    /// `[storage] backend = "redis-sentinel"`: a gateway on a primary, two
    /// replicas and three Sentinels.
    SentinelStorage,
    /// nginx in front of the section's gateways.
    Nginx,
    /// Not run, with the reason.
    NotRun(&'static str),
    /// No rule knows it: the message.
    Unknown(String),
}

pub(super) fn classify(blocks: &[Block]) -> Vec<Rule> {
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
                    Some("redis-sentinel") => Rule::SentinelStorage,
                    Some(other) => Rule::Unknown(format!("storage backend {other:?}: {UNKNOWN}")),
                    None => Rule::Config,
                },
            },
            "conf" if block.text.contains("appendonly") || block.text.contains("maxmemory") => {
                Rule::RedisConf
            }
            "nginx" => Rule::Nginx,
            "python" => Rule::Python,
            "js" | "javascript" if block.text.contains("/client.js\"") => Rule::Client,
            "js" | "javascript" => Rule::Browser,
            _ => Rule::Unknown(UNKNOWN.to_owned()),
        };
        rules.push(rule);
    }
    rules
}

/// Every block of every file with its rule.
pub(super) fn classified() -> Vec<(Block, Rule)> {
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
pub(super) fn blocks_with(rule: Rule) -> Vec<Block> {
    let blocks: Vec<Block> = classified()
        .into_iter()
        .filter(|(_, r)| *r == rule)
        .map(|(b, _)| b)
        .collect();
    assert!(!blocks.is_empty(), "no README block has the rule {rule:?}");
    blocks
}

/// A directory tree: each unindented line starts with a path.
pub(super) fn is_tree(text: &str) -> bool {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    !lines.is_empty()
        && lines.iter().all(|l| {
            l.starts_with(' ')
                || l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.contains('/') || w.contains('.'))
        })
}
