//! `kith-testnet`: starts N local Kith nodes as real `kith run` processes on loopback,
//! joins them into one group by invite link, drives seeded traffic and scripted scenarios
//! (kill, restart, partition, heal), and reports delivery, latency and cost figures.
//!
//! - [`launcher`]: bringing a testnet up, driving nodes, stopping everything it started;
//!   `testnet.json` ([`manifest`]) lets `status` and `down` work from another process.
//! - [`ledger`]: the delivery accounting and its exact rules.
//! - [`traffic`]: the seeded traffic generator.
//! - [`bench`]: `kith-testnet bench` and its report; [`svg`] draws the latency charts.
//! - [`scenario`]: `kith-testnet scenario FILE.toml`.
//! - [`crashloop`]: `kith-testnet crash-loop`: SIGKILL and crash points in a loop, and the
//!   count of lost messages.
//! - [`joinbench`]: `kith-testnet join-bench`: time from `kith join` to the first message.
//! - [`streambench`]: `kith-testnet stream-bench`: one raw libp2p stream's throughput and CPU
//!   per MiB on loopback (file transfer's baseline), and the [`streambench::Meter`] it uses.
//! - [`natlab`]: home routers and an internet made of network namespaces, for NAT tests;
//!   [`natnet`]: `kith run` processes inside them; [`natbench`]: `nat-bench` and `up --nat`.
//! - [`metrics`], [`procs`], [`stats`]: reading `/metrics`, `/proc` and summarising.

pub mod attack;
pub mod bench;
pub mod crashloop;
pub mod error;
pub mod filebench;
pub mod joinbench;
pub mod launcher;
pub mod ledger;
pub mod manifest;
pub mod metrics;
pub mod natbench;
pub mod natlab;
pub mod natnet;
pub mod procs;
pub mod progress;
pub mod scenario;
pub mod stats;
pub mod streambench;
pub mod svg;
pub mod traffic;

pub use error::{Result, TestnetError};
pub use launcher::{Testnet, UpOptions};

/// Environment variable with the traffic seed (overridden by `--seed`).
pub const SEED_ENV: &str = "KITH_TESTNET_SEED";

/// The seed to use: `flag`, else [`SEED_ENV`], else `fallback` (e.g. a scenario file's),
/// else a random one. A malformed environment value is an error, not silently replaced.
pub fn resolve_seed(flag: Option<u64>, fallback: Option<u64>) -> Result<u64> {
    if let Some(s) = flag {
        return Ok(s);
    }
    match std::env::var(SEED_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| TestnetError::Invalid(format!("{SEED_ENV}={v:?} is not a whole number"))),
        Err(std::env::VarError::NotPresent) => Ok(fallback.unwrap_or_else(rand::random)),
        Err(std::env::VarError::NotUnicode(_)) => Err(TestnetError::Invalid(format!(
            "{SEED_ENV} is not valid UTF-8"
        ))),
    }
}
