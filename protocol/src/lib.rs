//! Kith's sans-IO core.
//!
//! Everything here is pure logic: no sockets, no async runtime, no database. The node crate
//! wraps it with IO. Modules:
//! - [`addr`]: who can use an address, and the order addresses go into an invite.
//! - [`chat`]: replies, reactions, edits, deletes, profiles, receipts, typing, direct chats.
//! - [`ids`]: identifier newtypes (`GroupId`, `TopicId`, `MessageId`).
//! - [`codec`]: the only place that turns wire types into bytes and back.
//! - [`envelope`]: versioned wire types carried on gossipsub and request-response.
//! - [`files`]: file messages, encrypted chunks checked against a manifest, the fetch
//!   protocol's messages and the fetcher's decisions.
//! - [`invite`]: signed invite tickets (`kith1…` links).
//! - [`fork`]: checkpoints and branches for the concurrent-commit rule.
//! - [`group`]: the MLS group engine, a state machine generic over the openmls provider.
//! - [`join`]: the joiner's and the admitting member's sides of a join, as state machines.
//! - [`seal`]: sealed gossip frames (the group's envelopes as a stranger on the topic
//!   sees them: one padded AEAD ciphertext).
//! - [`order`]: sender positions, gap tracking and undecryptable reasons (no message lost).
//! - [`sync`]: history sync between members (summaries, paginated responses, gap detection).
//! - [`verify`]: safety numbers, their QR payload, and local verification marks.

pub mod addr;
pub mod chat;
pub mod codec;
pub mod envelope;
pub mod files;
pub mod fork;
pub mod group;
pub mod ids;
pub mod invite;
pub mod join;
pub mod order;
pub mod records;
pub mod seal;
#[cfg(test)]
mod sim;
pub mod sync;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod verify;

pub use libp2p_identity::{Keypair, PeerId, PublicKey};
pub use multiaddr::Multiaddr;
