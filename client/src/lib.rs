//! The client library of a Kith node's local HTTP API: the JSON model of every request,
//! response and live event ([`model`]), a typed client with one method per operation
//! ([`Client`]), the live event stream ([`EventStream`]), how to find a running node from
//! its data directory ([`files`]), terminal text helpers ([`text`]), and the names of the
//! node's crash points for test harnesses ([`crashpoint`]).
//!
//! It depends on no networking, MLS or storage crate, so tools that only talk to nodes (the
//! CLI, `kith-testnet`, tests) do not compile libp2p, openmls or redb for it. The node's API
//! server uses the same [`model`], so server and clients agree on the JSON by construction;
//! `docs/API.md` is the contract.

mod client;
pub mod crashpoint;
pub mod files;
pub mod model;
pub mod text;

pub use client::{Client, ClientError, EventStream, LiveEvent};
