//! The documented substitutions, config merging, output matching, and
//! background processes in their own process groups.

use super::*;

/// The documented substitutions, in one place.
#[derive(Debug, Clone, Default)]
pub(super) struct Subst {
    pub(super) gateway: Option<SocketAddr>,
    pub(super) epoch: Option<String>,
    pub(super) static_port: u16,
}

impl Subst {
    pub(super) fn apply(&self, text: &str) -> String {
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
pub(super) fn private_addresses(text: &str, targets: &[String]) -> String {
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
pub(super) fn merged_config(blocks: &[String]) -> String {
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
pub(super) fn wildcard_match(pattern: &str, text: &str) -> bool {
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
pub(super) struct Bg {
    pub(super) what: String,
    pub(super) child: tokio::process::Child,
    pub(super) pgid: i32,
    pub(super) out: Arc<Mutex<Vec<u8>>>,
    pub(super) err: Arc<Mutex<Vec<u8>>>,
}

pub(super) fn pump(
    reader: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> Arc<Mutex<Vec<u8>>> {
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
    pub(super) fn spawn(what: String, mut command: tokio::process::Command) -> Self {
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

    pub(super) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("out lock")).into_owned()
    }

    pub(super) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().expect("err lock")).into_owned()
    }

    /// The processes of its group (the leader is the spawned process).
    pub(super) fn members(&self) -> Vec<i32> {
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

    pub(super) fn group_alive(&self) -> bool {
        !self.members().is_empty()
    }

    /// Signals the leader's descendants (or the leader when it has none): a
    /// shell then finishes by itself and reaps them, leaving no orphan.
    pub(super) fn signal(&self, signal: &str) {
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
    pub(super) async fn stop(mut self) {
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
    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
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
pub(super) async fn wait_for(mut check: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn status_of(url: &str) -> Option<StatusCode> {
    fresh_client()
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status())
}

pub(super) async fn wait_ready(base: &str) {
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
pub(super) async fn epoch_at(base: &str) -> String {
    let (status, topics) = get_json(&fresh_client(), &format!("{base}/topics")).await;
    assert_eq!(status, StatusCode::OK, "GET /topics: {topics}");
    epoch_of(topics["head_id"].as_str().expect("head_id")).to_owned()
}

/// Publishes one event to `topic` at `base`; the id.
pub(super) async fn publish_at(base: &str, topic: &str, event: &str, data: Value) -> String {
    publish(&fresh_client(), base, topic, event, data).await
}
