//! The Kith node: IO around the sans-IO `kith-protocol` core.

pub mod admission;
pub mod api;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod datadir;
pub mod engine;
pub mod http;
pub mod identity;
pub mod join_trail;
pub mod metrics;
pub mod model;
pub mod net;
pub mod node;
pub mod store;
pub mod sync;
