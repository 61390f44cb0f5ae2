//! Redis under power loss: `redis-server` with its AOF on a `powercut` FUSE
//! mount (a cut keeps only what was fsynced), the real gateway publishing to
//! it under load; at a random moment Redis is `kill -9`ed **while publishes
//! are in flight** and the power cut; Redis restarts on what survived and
//! every event the gateway acknowledged must still be there, in order, with
//! its exact data — the README's promise for `appendfsync always`.
//!
//! With `appendfsync everysec` (Redis's default AOF mode) the same test fails:
//! Redis answers before its fsync, the cut drops the last second of
//! acknowledged events, and the gateway, seeing the log's head go back,
//! refuses writes ("Redis lost its data"). A kill of Redis alone cannot tell
//! the two apart (the page cache keeps what `write` handed it), which is why
//! this test cuts the power.
//!
//! Knob: `POWERCUT_CYCLES` (default 3).

use std::process::Child;
use std::time::Duration;

use powercut::{Image, Mode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use tempfile::TempDir;

use crate::common::free_port;
use crate::common::*;
use crate::redis::{gateways, redis_config, single, spawn_redis};

/// The AOF setting under test (the README's recommended one).
const APPENDFSYNC: &str = "always";

/// `redis-server` on `port` with its data in `dir`, the given AOF fsync
/// mode. `may_move`: on the first start another process may have taken the
/// port since it was picked — then another one is picked; a restart keeps
/// its port and waits for it.
fn start_redis(port: &mut u16, dir: &std::path::Path, appendfsync: &str, may_move: bool) -> Child {
    let args: Vec<String> = ["--appendonly", "yes", "--appendfsync", appendfsync]
        .map(String::from)
        .to_vec();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match spawn_redis(*port, dir, &args) {
            Ok(child) => return child,
            Err(why) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start on port {port}: {why}"
                );
                if may_move {
                    *port = free_port();
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_power_cut_under_load_keeps_every_acknowledged_event() {
    let cycles: u64 = std::env::var("POWERCUT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("[redis power cut] seed {seed}, {cycles} cycles, appendfsync {APPENDFSYNC}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mountpoint = TempDir::new().expect("mountpoint");
    let redis_dir = mountpoint.path().join("redis");
    let scratch = TempDir::new().expect("scratch dir");
    let mut port = free_port();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // Journal mode (a directory change is durable after any fsync, as on
    // ext4): Redis fsyncs its AOF files, and which directory entries a
    // filesystem keeps without a directory fsync is ext4's business, not
    // what this test is about.
    let mount = Image::empty()
        .mount(Mode::Journal, None, mountpoint.path())
        .expect("mount the power-cut filesystem (needs /dev/fuse and root)");
    std::fs::create_dir(&redis_dir).expect("redis dir");
    std::fs::File::open(mountpoint.path())
        .and_then(|d| d.sync_all())
        .expect("fsync the mount's root");
    let mut redis = start_redis(&mut port, &redis_dir, APPENDFSYNC, true);
    let url = format!("redis://127.0.0.1:{port}");
    let config = redis_config(scratch.path(), &single(&url), "");
    let gateway = gateways(scratch.path(), &config, 1)
        .pop()
        .expect("a gateway");
    let mut mount = Some(mount);
    let mut acked_so_far = std::collections::HashMap::new();
    let mut head = 0;

    for cycle in 1..=cycles {
        let publishers = AckingPublishers::start(&client, &gateway.base, "crash", 6);
        publishers.wait_for(50).await;
        let run_for = Duration::from_millis(rng.random_range(100..1500));
        tokio::time::sleep(run_for).await;
        // Redis dies with publishes in flight, then the power goes.
        let _ = redis.kill();
        let _ = redis.wait();
        let image = mount
            .take()
            .expect("mounted")
            .power_cut()
            .expect("power cut");
        let acked = publishers.stop().await;
        let new = acked.len();
        acked_so_far.extend(acked);
        println!(
            "[redis power cut] cycle {cycle}: {} acknowledged in all ({new} this cycle), \
             kill -9 + cut after {} ms; the disk kept {} bytes",
            acked_so_far.len(),
            run_for.as_millis(),
            image.total_bytes()
        );

        mount = Some(
            image
                .mount(Mode::Journal, None, mountpoint.path())
                .expect("mount what survived"),
        );
        redis = start_redis(&mut port, &redis_dir, APPENDFSYNC, false);
        // The gateway reconnects by itself; it refuses writes (503) if the
        // log it finds is behind what it acknowledged.
        eventually("the gateway to be ready on the restarted Redis (it stays 503 when Redis came back without events it acknowledged)", || async {
            client
                .get(gateway.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
        head =
            assert_every_acked_event_replays(&client, &gateway.base, "crash", &acked_so_far).await;
    }
    // After the last restart, a new publish gets an id above every
    // acknowledged one (on another topic: the ids of `crash` must stay
    // consecutive for the check above).
    let next = publish(
        &client,
        &gateway.base,
        "after-cut",
        "message",
        serde_json::json!("next"),
    )
    .await;
    assert!(
        seq_of(&next) > head,
        "no id reused after the cut: {next} vs {head}"
    );
    let _ = redis.kill();
    let _ = redis.wait();
    if let Some(mount) = mount {
        mount.unmount().expect("unmount");
    }
}
