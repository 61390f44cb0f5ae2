//! The shell walk-through: a file's shell, output and config blocks in
//! order, as one operator runs them from the repository root.

use super::*;

/// Defines the `curl` that limits `-N` streams (the only change to the
/// commands) and fails on an HTTP error (the test's check that it worked).
pub(super) const PREAMBLE: &str = r#"set -eo pipefail
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
pub(super) struct Session {
    pub(super) file: &'static str,
    /// Stands for the repository root: `config.toml`, `./data`, and links to
    /// the rest of the checkout.
    pub(super) root: TempDir,
    /// Holds the `sse-gateway` shim.
    pub(super) bin: TempDir,
    pub(super) subst: Subst,
    /// The running gateway, and the `serve` script that started it.
    pub(super) gateway: Option<Bg>,
    pub(super) serve_script: Option<(String, String)>,
    pub(super) section: String,
    pub(super) section_toml: Vec<String>,
    /// Background blocks of the section: followers (with the output their
    /// plain blocks show) and static servers.
    pub(super) background: Vec<(Bg, String)>,
    /// The follower plain blocks refer to.
    pub(super) current: Option<usize>,
}

impl Session {
    pub(super) fn new(file: &'static str) -> Self {
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

    pub(super) fn write_config(&self) {
        let blocks: Vec<String> = self
            .section_toml
            .iter()
            .map(|b| self.subst.apply(b))
            .collect();
        std::fs::write(self.root.path().join("config.toml"), merged_config(&blocks))
            .expect("write config.toml");
    }

    pub(super) fn base(&self) -> String {
        format!("http://{}", self.subst.gateway.expect("a gateway"))
    }

    /// `bash -c script` in the root, with the shim first on `PATH`.
    pub(super) fn shell(&self, script: &str) -> tokio::process::Command {
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
    pub(super) fn script(&self, block: &Block, cmds: &[Cmd], markers: bool) -> String {
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

    pub(super) async fn start_gateway(&mut self) {
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

    pub(super) async fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop().await;
        }
    }

    pub(super) async fn restart_gateway(&mut self) {
        if self.gateway.is_some() {
            self.stop_gateway().await;
            self.start_gateway().await;
        }
    }

    /// The section's `toml` blocks took effect: `[auth]` refuses an anonymous
    /// publish, `[cors]` answers each allowed origin.
    pub(super) async fn check_config_effects(&self) {
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
    pub(super) async fn enter_section(&mut self, section: &str) {
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

    pub(super) async fn config(&mut self, block: &Block) {
        self.section_toml.push(block.text.clone());
        self.write_config();
        if self.gateway.is_some() {
            self.restart_gateway().await;
        }
    }

    pub(super) async fn shell_block(&mut self, block: &Block) {
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
                "{} line {}: the file shows\n{expected}\nbut `{}` printed\n{actual}",
                self.file,
                cmd.line,
                cmd.text
            );
        }
    }

    /// The static server serves the page, and the gateway (when running)
    /// allows its origin: what the section's `[cors]` block is for.
    pub(super) async fn check_static_server(&self, block: &Block, bg: &Bg) {
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

    pub(super) async fn output_block(&mut self, block: &Block) {
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
pub(super) async fn run_session(file: &'static str) {
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
