//! The real `sse-gateway` binary as a child process: started on a data dir,
//! `kill -9`ed, SIGTERMed, or run to completion for a CLI subcommand.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::repo_path;

/// The real `sse-gateway` binary as a child process, for restart and `kill -9` tests.
pub struct GatewayProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub base: String,
    /// Its stderr, line by line, as it arrives.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts the binary on `data_dir`, listening on `listen` (`127.0.0.1:0` picks a port).
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        Self::start_with_config(data_dir, listen, None, extra)
    }

    /// Like `start`, with a config file (else the repo's `config.toml`).
    pub fn start_with_config(
        data_dir: &Path,
        listen: &str,
        config: Option<&Path>,
        extra: &[&str],
    ) -> Self {
        Self::start_with_config_env(data_dir, listen, config, extra, &[])
    }

    /// Like `start_with_config`, with extra environment variables.
    pub fn start_with_config_env(
        data_dir: &Path,
        listen: &str,
        config: Option<&Path>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir);
        match config {
            Some(path) => command.arg("--config").arg(path),
            None => command.arg("--config").arg(repo_path("config.toml")),
        };
        let mut child = command
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-gateway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let rest = line.split("listening on ").nth(1).and_then(|rest| {
                    rest.strip_prefix("http://")
                        .or_else(|| rest.strip_prefix("https://"))
                });
                if let Some(rest) = rest {
                    if let (Some(tx), Ok(addr)) =
                        (addr_tx.take(), rest.trim().parse::<SocketAddr>())
                    {
                        let _ = tx.send(Ok(addr));
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
            if let Some(tx) = addr_tx.take() {
                let _ = tx.send(Err(()));
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                panic!("gateway did not start: {:?}", log.lock().expect("log lock"));
            }
        };
        Self {
            child,
            addr,
            base: format!("http://{addr}"),
            log,
        }
    }

    /// `<base><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The child's process id (for `/proc` readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`; (status, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(args)
        .output()
        .expect("run sse-gateway");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Collects a child's stderr on a thread, for failure messages.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<u8>>> {
    use std::io::Read;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut err = child.stderr.take().expect("stderr");
    let sink = Arc::clone(&stderr);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("stderr lock")
                .extend_from_slice(&buf[..n]);
        }
    });
    stderr
}

/// Starts the real binary on `data_dir` (with `config`, else the repo's
/// `config.toml`), retrying for a few seconds while `listen` is still taken
/// by the process that was just killed on that port.
pub async fn start_gateway(data_dir: &Path, listen: &str, config: Option<&Path>) -> GatewayProcess {
    let (data_dir, listen) = (data_dir.to_path_buf(), listen.to_owned());
    let config = config.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if std::time::Instant::now() < deadline && std::net::TcpListener::bind(&listen).is_err()
            {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            match std::panic::catch_unwind(|| {
                GatewayProcess::start_with_config(&data_dir, &listen, config.as_deref(), &[])
            }) {
                Ok(gateway) => return gateway,
                Err(panic) if std::time::Instant::now() >= deadline => {
                    std::panic::resume_unwind(panic)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .await
    .expect("start_gateway task")
}

/// A client that keeps no idle connection (the server behind a port changes).
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("reqwest client")
}
