//! The Kith node: IO around the sans-IO `kith-protocol` core.

pub mod admission;
pub mod api;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod engine;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod net;
pub mod node;
pub mod store;
pub mod sync;
