//! Joining a group, as sans-IO state machines beside the group engine's own join steps
//! (`group::join`): the joiner's search for a member who adds it ([`client`]), being added
//! again after a deep fork ([`rejoin`]), what a member does with a join request
//! ([`admission`]), and the one line a failed join ends with ([`trail`]).

pub mod admission;
pub mod client;
pub mod rejoin;
pub mod trail;

#[cfg(test)]
mod tests;

pub use client::{JoinClient, JoinPlan, Millis, OpId, Outcome, Stage, Via};
pub use trail::{Miss, Trail};
