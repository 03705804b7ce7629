//! Gossip verdicts that wait for the envelope to be read.
//!
//! gossipsub forwards a message to the mesh only once the node reports it as valid
//! (`validate_messages`). An envelope this node holds because it is early (an epoch ahead
//! of its own, a group still catching up, a sender position MLS cannot reach yet) cannot be
//! judged when it arrives. Reported as "ignore" it was never forwarded: every peer that
//! would have had it from this node had to fetch it by history sync, seconds later, and a
//! node behind after a burst of joins cut its whole mesh off that way (measured on 30
//! nodes: p90 1.5 s, p99 5 s, see docs/BENCHMARKS.md). Now its verdict waits: once the held
//! envelope has been read and stored, gossipsub is told to accept (and forward) it; if it
//! has not been within [`DEFER_LIMIT_MS`], to ignore it. Nothing unverified is forwarded.
//!
//! An envelope held because its sender's earlier messages are missing (`SenderGap`) was
//! decrypted and its signature checked before it was set aside, so it is accepted at once.

use std::collections::HashMap;

use kith_protocol::group::{IgnoreReason, Verdict};
use kith_protocol::ids::MessageId;
use libp2p::PeerId;

use super::{Actor, now_ms};

/// Envelopes whose verdict may wait at once; beyond, an early one is ignored as before.
pub(super) const MAX_DEFERRED: usize = 1024;
/// How long a verdict may wait. gossipsub keeps an unvalidated message for its history
/// window (5 heartbeats of 1 s); after that an accept would forward nothing.
pub(super) const DEFER_LIMIT_MS: u64 = 4_000;

/// Gossip messages whose verdict waits: id → (the peer it came from, when, why it waits).
#[derive(Debug, Default)]
pub(super) struct Deferred {
    waiting: HashMap<MessageId, (PeerId, u64, IgnoreReason)>,
}

/// What gossipsub is told now about a message with this verdict: `None` to wait.
pub(super) fn forwarding(verdict: &Verdict) -> Option<Verdict> {
    match verdict {
        Verdict::Ignore(IgnoreReason::SenderGap { .. }) => Some(Verdict::Accept),
        Verdict::Ignore(
            IgnoreReason::CatchingUp
            | IgnoreReason::FutureEpoch { .. }
            | IgnoreReason::TooFarAhead(_),
        ) => None,
        other => Some(other.clone()),
    }
}

impl Deferred {
    /// Remembers a message whose verdict waits; `false` when full (report it now).
    pub(super) fn insert(
        &mut self,
        id: MessageId,
        source: PeerId,
        now: u64,
        why: IgnoreReason,
    ) -> bool {
        if self.waiting.len() >= MAX_DEFERRED && !self.waiting.contains_key(&id) {
            return false;
        }
        self.waiting.insert(id, (source, now, why));
        true
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes the verdicts that are due: an accept for every id in `stored` that arrived
    /// less than [`DEFER_LIMIT_MS`] ago (gossipsub still holds it), an ignore for every one
    /// older.
    pub(super) fn due(
        &mut self,
        stored: impl Fn(&[MessageId]) -> Vec<bool>,
        now: u64,
    ) -> Vec<(MessageId, PeerId, Verdict)> {
        let ids: Vec<MessageId> = self.waiting.keys().copied().collect();
        let held = stored(&ids);
        let mut out = Vec::new();
        for (id, stored) in ids.into_iter().zip(held) {
            let Some((source, since, _)) = self.waiting.get(&id) else {
                continue;
            };
            let verdict = if now.saturating_sub(*since) >= DEFER_LIMIT_MS {
                let Some((_, _, why)) = self.waiting.get(&id).cloned() else {
                    continue;
                };
                Verdict::Ignore(why)
            } else if stored {
                Verdict::Accept
            } else {
                continue;
            };
            let source = *source;
            self.waiting.remove(&id);
            out.push((id, source, verdict));
        }
        out
    }
}

impl Actor {
    /// Reports the waiting gossip verdicts that are due (see the module docs).
    pub(super) fn settle_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let store = &self.store;
        let due = self.deferred.due(
            |ids| match store.has_messages(ids) {
                Ok(held) => held,
                Err(e) => {
                    tracing::error!(error = %e, "store read failed");
                    vec![false; ids.len()]
                }
            },
            now_ms(),
        );
        for (id, source, verdict) in due {
            tracing::debug!(msg = %id.short(), forward = matches!(verdict, Verdict::Accept), "held gossip message settled");
            let _ = self.net.validate_blocking(id, source, &verdict);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn early_envelopes_wait_and_verified_held_ones_are_forwarded_at_once() {
        assert_eq!(
            forwarding(&Verdict::Ignore(IgnoreReason::SenderGap { missing: 2 })),
            Some(Verdict::Accept)
        );
        for early in [
            IgnoreReason::CatchingUp,
            IgnoreReason::FutureEpoch { epoch: 5, ours: 4 },
            IgnoreReason::TooFarAhead("x".into()),
        ] {
            assert_eq!(forwarding(&Verdict::Ignore(early)), None);
        }
        for now in [Verdict::Accept, Verdict::Ignore(IgnoreReason::Duplicate)] {
            assert_eq!(forwarding(&now), Some(now.clone()));
        }
    }

    #[test]
    fn a_waiting_verdict_is_accept_once_stored_and_ignore_after_the_limit() {
        let mut d = Deferred::default();
        let (a, b, c) = (MessageId([1; 32]), MessageId([2; 32]), MessageId([3; 32]));
        let peer = PeerId::random();
        assert!(d.insert(a, peer, 1_000, IgnoreReason::CatchingUp));
        assert!(d.insert(b, peer, 1_000, IgnoreReason::CatchingUp));
        assert!(d.insert(c, peer, 4_000, IgnoreReason::CatchingUp));
        // Only `a` is stored; nothing is old enough yet.
        let stored = |ids: &[MessageId]| ids.iter().map(|i| *i == a).collect::<Vec<_>>();
        let due = d.due(stored, 2_000);
        assert_eq!(due, vec![(a, peer, Verdict::Accept)]);
        // `b` has waited 4 s: ignored; `c` still waits.
        let due = d.due(|ids: &[MessageId]| vec![false; ids.len()], 5_000);
        assert_eq!(
            due,
            vec![(b, peer, Verdict::Ignore(IgnoreReason::CatchingUp))]
        );
        assert!(!d.is_empty());
        // Read too late (the engine's queue was long): gossipsub no longer holds it, so it
        // is ignored rather than accepted.
        let late = MessageId([4; 32]);
        assert!(d.insert(late, peer, 0, IgnoreReason::CatchingUp));
        let stored_late = |ids: &[MessageId]| ids.iter().map(|i| *i == late).collect::<Vec<_>>();
        assert_eq!(
            d.due(stored_late, 4_500),
            vec![(late, peer, Verdict::Ignore(IgnoreReason::CatchingUp))]
        );
        // Full: a new one is refused (reported at once by the caller), a known one is kept.
        let mut full = Deferred::default();
        for i in 0..MAX_DEFERRED {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(full.insert(MessageId(id), peer, 0, IgnoreReason::CatchingUp));
        }
        assert!(!full.insert(a, peer, 0, IgnoreReason::CatchingUp));
    }
}
