//! Services the README puts around the gateway: `redis-server` from a
//! `conf` block, nginx from `nginx` blocks; and waiting for a subscriber.

use super::*;

/// Waits until the topic of `info` (a `/topics/{topic}/info` URL) has one subscriber.
pub(super) async fn wait_subscribed(info: &str, block: &Block, client: &Bg) {
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
pub(super) struct ConfRedis {
    pub(super) child: std::process::Child,
    pub(super) port: u16,
    pub(super) _dir: TempDir,
}

impl ConfRedis {
    pub(super) fn start(block: &Block) -> Self {
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
pub(super) fn upstream_addresses(text: &str) -> Vec<String> {
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
pub(super) struct Nginx {
    pub(super) _bg: Bg,
    pub(super) port: u16,
}

impl Nginx {
    pub(super) async fn start(
        dir: &Path,
        blocks: &[&Block],
        gateways: &[String],
    ) -> (Self, String) {
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
