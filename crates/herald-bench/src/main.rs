//! `herald-bench`: the load generator for a running Herald (see [`bench`]).
//! It lives in its own crate so the server does not carry its dependencies
//! (HdrHistogram, a progress bar, a WebSocket client, process spawning).

use anyhow::Context;
use clap::Parser;

mod ai;
mod bench;
mod pusher;
mod soak;
mod sockudo_text;
mod text;

fn main() -> anyhow::Result<()> {
    let args = bench::BenchArgs::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(bench::run(args))
}
