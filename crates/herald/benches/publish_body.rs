//! What reading a publish body costs per event, with and without the
//! handler's fast path: `cargo bench -p herald --bench publish_body`.
//! The body is the one `herald-bench fanout` sends (100 events, 250 B of
//! padding each); the two readings alternate, five rounds of 2,000 bodies.

use std::hint::black_box;
use std::time::Instant;

use herald::fuzzing::count_publish_events;

fn main() {
    let pad = "x".repeat(250);
    let events: Vec<_> = (0..100)
        .map(|u| {
            serde_json::json!({
                "user_id": format!("bench-u{u}"),
                "event": "bench",
                "data": {"t": 1_764_748_800_123_456_789u64, "pad": pad},
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "events": events })).unwrap_or_default();
    const BODIES: u32 = 2_000;
    for general_only in [true, false] {
        assert_eq!(
            count_publish_events(&body, general_only),
            100,
            "the body is read"
        );
    }
    println!("reading a 100-event publish body, µs per event (general / with the fast path):");
    for round in 1..=5 {
        let mut per_event = [0.0; 2];
        for (slot, general_only) in per_event.iter_mut().zip([true, false]) {
            let started = Instant::now();
            for _ in 0..BODIES {
                black_box(count_publish_events(black_box(&body), general_only));
            }
            *slot = started.elapsed().as_secs_f64() * 1e6 / f64::from(BODIES * 100);
        }
        println!("round {round}: {:.2} / {:.2}", per_event[0], per_event[1]);
    }
}
