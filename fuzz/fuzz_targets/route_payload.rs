//! The broadcast route evaluator on any JSON payload: never panics, and a
//! routed event's topics are valid and unique.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_gateway::routes::projects_routes;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for route in projects_routes() {
        if let Ok(topics) = route.topics_for(&payload) {
            assert!(!topics.is_empty());
            for (i, topic) in topics.iter().enumerate() {
                assert!(!topics[..i].contains(topic));
            }
        }
    }
});
