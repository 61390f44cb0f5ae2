//! Crash tests' shared parts: publishers that remember every acknowledged
//! event, and the check that all of them replay after a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::server::get_json;
use super::sse::SseReader;
use super::{eventually, seq_of};

/// After a crash: every acknowledged event (`id → data`) of `topic` is in the
/// log of the gateway at `base`, with its exact data, in strictly increasing
/// id order. Returns the highest sequence replayed (a later publish must get
/// a higher one: no id reused).
pub async fn assert_every_acked_event_replays(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    acked: &HashMap<String, String>,
) -> u64 {
    let (_, info) = get_json(client, &format!("{base}/topics/{topic}/info")).await;
    let stored = info["count"].as_u64().expect("count") as usize;
    assert!(
        stored >= acked.len(),
        "{stored} stored < {} acknowledged",
        acked.len()
    );
    let mut replay = SseReader::connect(client, &format!("{base}/topics/{topic}"), Some("0")).await;
    let events = replay.take(stored).await;
    let mut previous = 0;
    let mut found = 0;
    for event in &events {
        let seq = seq_of(&event.id);
        // Every publish goes to `topic`, so its ids are consecutive: a lost
        // commit (acknowledged or not) leaves a gap here.
        if previous != 0 {
            assert_eq!(seq, previous + 1, "no id missing after {previous}");
        }
        previous = seq;
        if let Some(data) = acked.get(&event.id) {
            assert_eq!(&event.data, data, "exact data for {}", event.id);
            found += 1;
        }
    }
    assert_eq!(found, acked.len(), "every acknowledged event is present");
    // And each publisher's own topic `<topic>:<p>` holds its acknowledged events.
    let mut by_publisher: HashMap<u64, Vec<&String>> = HashMap::new();
    for (id, data) in acked {
        let p = serde_json::from_str::<Value>(data).expect("publisher data is JSON")["p"]
            .as_u64()
            .expect("publisher number");
        by_publisher.entry(p).or_default().push(id);
    }
    for (p, ids) in by_publisher {
        let path = format!("{base}/topics/{topic}:{p}");
        let (_, info) = get_json(client, &format!("{path}/info")).await;
        let stored = info["count"].as_u64().expect("count") as usize;
        let mut replay = SseReader::connect(client, &path, Some("0")).await;
        let replayed: std::collections::HashSet<String> = replay
            .take(stored)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect();
        for id in ids {
            assert!(replayed.contains(id), "{id} is in {topic}:{p}");
        }
    }
    previous
}

/// Publishers for crash tests: each posts to `["<topic>", "<topic>:<p>"]` of
/// the gateway at `base` as fast as it is answered, with unusual but valid
/// JSON (to check it survives byte-exact), and remembers every acknowledged
/// id with its exact data, until stopped. Errors (the gateway being killed)
/// are expected and not counted.
pub struct AckingPublishers {
    running: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<String, String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl AckingPublishers {
    /// Starts `publishers` of them on `topic` of the gateway at `base`.
    pub fn start(client: &reqwest::Client, base: &str, topic: &str, publishers: usize) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let acked: Arc<Mutex<HashMap<String, String>>> = Default::default();
        let tasks = (0..publishers)
            .map(|p| {
                let (client, url, topic) =
                    (client.clone(), format!("{base}/publish"), topic.to_owned());
                let (running, acked) = (Arc::clone(&running), Arc::clone(&acked));
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while running.load(Ordering::Relaxed) {
                        let data = format!(r#"{{"p":{p},"i":{i},"t":"\u00e9\/","n":1.50}}"#);
                        let body =
                            format!(r#"{{"topics":["{topic}","{topic}:{p}"],"data":{data}}}"#);
                        let sent = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await;
                        if let Ok(response) = sent {
                            if response.status() == StatusCode::CREATED {
                                if let Ok(answer) = response.json::<Value>().await {
                                    let id = answer["id"].as_str().expect("a 201 carries the id");
                                    acked.lock().unwrap().insert(id.to_owned(), data);
                                }
                            }
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Self {
            running,
            acked,
            tasks,
        }
    }

    /// Waits until at least `count` publishes were acknowledged.
    pub async fn wait_for(&self, count: usize) {
        eventually("publishes to be acknowledged", || async {
            self.acked.lock().unwrap().len() >= count
        })
        .await;
    }

    /// How many publishes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops them; every acknowledged id with its data.
    pub async fn stop(self) -> HashMap<String, String> {
        self.running.store(false, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("publisher task");
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}
