//! The Kith node: IO around the sans-IO `kith-protocol` core.

pub mod engine;
pub mod model;
pub mod net;
pub mod store;
