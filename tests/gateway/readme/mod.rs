//! The README's examples, run as written. Every fenced block of `README.md`,
//! `examples/projects-dashboard/README.md` and `docs/API.md` is extracted with its line,
//! info string and section, and [`classify`] gives it a rule: run against a
//! real gateway (the shell walk-through with its expected outputs, the browser
//! snippet in node, the `/client.js` snippets in Chromium tabs, the Python follower, nginx in front of one or three
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
//!
//! [`blocks`] extracts and classifies, [`harness`] substitutes, matches and
//! runs processes, [`session`] walks the shell blocks, [`services`] starts
//! Redis and nginx; the tests below are the rules' runners.

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
use crate::redis::{redis_cli, require, Cluster};

mod blocks;
mod harness;
mod services;
mod session;

use blocks::*;
use harness::*;
use services::*;
use session::*;

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

/// Each `/client.js` snippet, as written, in 2 tabs of one headless Chromium
/// (`tests/js/browser/shared.mjs`: stubs for `applyUpdate`,
/// `refetchEverything` and `showState` record their calls) on a page origin
/// that `[cors]` allows: the tabs share ONE stream (the gateway counts one
/// subscriber) and each applies a published update exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_client_snippets_share_one_stream_across_tabs() {
    use crate::browser::{open_tabs, shared_page, ONE_BROWSER, PAGE_WAIT};
    crate::browser::require_browser_tools();
    let _one = ONE_BROWSER.lock().await;
    for block in blocks_with(Rule::Client) {
        let dir = TempDir::new().expect("tempdir");
        let (mut page, config) = shared_page(dir.path()).await;
        let gateway = GatewayProcess::start_with_config(
            &dir.path().join("data"),
            "127.0.0.1:0",
            Some(&config),
            &[],
        );
        let subst = Subst {
            gateway: Some(gateway.addr),
            ..Subst::default()
        };
        let code = subst.apply(&block.text);
        page.command(json!({"cmd": "snippet", "n": 2, "code": code}))
            .await;
        let info = gateway.url("/topics/projects:all/info");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = get_json(&fresh_client(), &info).await;
            if body["subscribers"] == json!(1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: the 2 tabs should share one stream: {body}",
                block.at()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let payload = json!({"uuid": "3f1c2b4a-1111-4222-8333-444455556666", "name": "Roof"});
        let (status, answer) = post_raw(
            &fresh_client(),
            &gateway.url("/projects/broadcast/project"),
            json!({"event": "project_updated", "payload": payload}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        let applied = |tab: &Value| -> Vec<Value> {
            tab["calls"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c.get("applyUpdate").is_some())
                .cloned()
                .collect()
        };
        page.wait_state(
            &format!("{}: both tabs applying the update", block.at()),
            PAGE_WAIT,
            |s| {
                let tabs = open_tabs(s);
                tabs.len() == 2 && tabs.iter().all(|t| !applied(t).is_empty())
            },
        )
        .await;
        // A repeat would show within this.
        let state = page.settle(Duration::from_millis(400)).await;
        for tab in open_tabs(&state) {
            assert_eq!(
                applied(&tab),
                vec![json!({"applyUpdate": payload})],
                "{}: once per tab\n{state:#}",
                block.at()
            );
            assert_eq!(tab["errors"], json!([]), "{}: {tab:#}", block.at());
        }
        page.assert_no_page_errors();
        page.exit().await;
    }
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
(() => {{
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
        let gateway = GatewayProcess::start(&data, &restartable_listen(), &[]);
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

/// The Redis Sentinel block serves a gateway through three Sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_redis_sentinel_block_serves_a_gateway() {
    for block in blocks_with(Rule::SentinelStorage) {
        let group = tokio::task::spawn_blocking(crate::redis_sentinel::SentinelGroup::start)
            .await
            .expect("sentinel group");
        let targets: Vec<String> = group
            .sentinels
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
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
        let id = publish_at(&gateway.base, "readme:sentinel", "e", json!({"n": 1})).await;
        let mut reader = SseReader::connect(
            &fresh_client(),
            &gateway.url("/topics/readme:sentinel"),
            Some("0"),
        )
        .await;
        assert_eq!(
            reader.next_event().await.id,
            id,
            "{}: replay through the Sentinels' primary",
            block.at()
        );
    }
}
