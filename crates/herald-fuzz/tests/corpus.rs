//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and the
//! inputs kept from crashes (`fuzz/regressions/<target>/`) through the
//! targets on stable Rust, so a regression on any path the fuzzer reached
//! fails CI without nightly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out.sort();
    out
}

fn replay(target: &str, run: fn(&[u8])) {
    let inputs = inputs(target);
    // A missing or emptied corpus must not pass quietly.
    assert!(
        inputs.len() >= 20,
        "fuzz/corpus/{target} holds {} inputs",
        inputs.len()
    );
    for (path, bytes) in &inputs {
        let ok = std::panic::catch_unwind(|| run(bytes));
        assert!(ok.is_ok(), "{target}: {} fails", path.display());
    }
    println!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn frame() {
    replay("frame", herald_fuzz::frame);
}

#[test]
fn hello_jwt() {
    replay("hello_jwt", herald_fuzz::hello_jwt);
}

#[test]
fn publish_body() {
    replay("publish_body", herald_fuzz::publish_body);
}

#[test]
fn lifecycle() {
    replay("lifecycle", herald_fuzz::lifecycle);
}

#[test]
fn catchup() {
    replay("catchup", herald_fuzz::catchup);
}
