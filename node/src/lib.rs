//! The Kith node: IO around the sans-IO `kith-protocol` core.

pub(crate) mod api;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod datadir;
pub mod engine;
pub mod files;
pub(crate) mod http;
pub mod identity;
pub mod metrics;
pub(crate) use kith_client::model;
pub(crate) mod net;
/// The per-peer limits and peer scoring of the network task.
pub use net::limits;
pub mod node;
pub mod store;
pub(crate) mod sync;
#[cfg(test)]
pub(crate) mod testing;
pub mod web;
