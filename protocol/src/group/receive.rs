//! The way in for envelopes from the network: decode and check one, hold it if it is
//! early, route it (a rival commit, an application message, another MLS message), and
//! read the held ones once they are due.

use openmls::prelude::{MlsMessageIn, ProtocolMessage, tls_codec::Deserialize as _};
use openmls_traits::OpenMlsProvider;

use super::branch::load_mls;
use super::state::{Pending, Source, hold_behind, hold_orphan, hold_pending};
use super::{Effect, GroupEngine, IgnoreReason, RejectReason, Verdict, mls_err};
use crate::envelope::{Envelope, PayloadKind};
use crate::fork::GroupRecords;
use crate::ids::{GroupId, MessageId};
use crate::order::{Check, MAX_FORWARD_DISTANCE};

/// One received envelope on its way through the engine, decoded and checked once by
/// [`GroupEngine::process`] and handed on with its MLS message.
#[derive(Clone, Copy)]
pub(super) struct Incoming<'a> {
    /// The group it is for.
    pub(super) group: GroupId,
    /// The decoded envelope.
    pub(super) envelope: &'a Envelope,
    /// Its id (the hash of `bytes`).
    pub(super) id: MessageId,
    /// The bytes as received: what is held, kept or stored.
    pub(super) bytes: &'a [u8],
    /// Where they came from.
    pub(super) source: Source,
    /// When they arrived.
    pub(super) now_ms: u64,
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Handles envelope bytes received from the network. Returns the gossip verdict and the
    /// effects. Envelopes for a future epoch are held (bounded) and processed once the
    /// commits before them arrive.
    ///
    /// While the group catches up ([`GroupEngine::begin_catch_up`]) every envelope of it is
    /// held (verdict `Ignore`) and processed when the catch-up ends.
    pub fn handle_envelope(&mut self, bytes: &[u8], now_ms: u64) -> (Verdict, Vec<Effect>) {
        let mut effects = Vec::new();
        let verdict = self.process(bytes, now_ms, &mut effects, Source::Live);
        self.settle(now_ms, &mut effects);
        (verdict, effects)
    }

    /// Handles envelope bytes fetched by history sync. Like [`GroupEngine::handle_envelope`],
    /// but never held for a catch-up, and, while the group catches up, an accepted commit
    /// does not release the envelopes held for the new epoch: they wait until
    /// [`GroupEngine::end_catch_up`], after the older envelopes still to be fetched.
    pub fn handle_synced_envelope(&mut self, bytes: &[u8], now_ms: u64) -> (Verdict, Vec<Effect>) {
        let mut effects = Vec::new();
        let verdict = self.process(bytes, now_ms, &mut effects, Source::Synced);
        self.settle(now_ms, &mut effects);
        (verdict, effects)
    }

    /// Decodes and checks envelope bytes, holds them if they are early, and routes them:
    /// a commit for a past epoch to the concurrent-commit rule, an application message to
    /// the ordered read, anything else to MLS. An accepted one releases what was held.
    pub(super) fn process(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        effects: &mut Vec<Effect>,
        source: Source,
    ) -> Verdict {
        let envelope = match Envelope::decode(bytes) {
            Ok(e) => e,
            Err(e) => return Verdict::Reject(RejectReason::Envelope(e)),
        };
        let group_id = envelope.group();
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        if g.lifecycle.lost().is_some() {
            return Verdict::Ignore(IgnoreReason::JoinLost);
        }
        let epoch = g.epoch();
        if source == Source::Live && g.catching_up.is_some() {
            hold_pending(g, envelope.epoch(), bytes);
            return Verdict::Ignore(IgnoreReason::CatchingUp);
        }
        if envelope.epoch() > epoch {
            // Held even by a node removed on its branch: the branch may lose.
            if !matches!(source, Source::Held | Source::Drained) {
                hold_pending(g, envelope.epoch(), bytes);
            }
            return Verdict::Ignore(IgnoreReason::FutureEpoch {
                epoch: envelope.epoch(),
                ours: epoch,
            });
        }
        let message = match MlsMessageIn::tls_deserialize_exact(envelope.mls())
            .ok()
            .and_then(|m| m.try_into_protocol_message().ok())
        {
            Some(m) => m,
            None => return Verdict::Reject(RejectReason::NotMls),
        };
        if message.group_id().as_slice() != group_id.as_bytes()
            || message.epoch().as_u64() != envelope.epoch()
        {
            return Verdict::Reject(RejectReason::HeaderMismatch);
        }
        let id = MessageId::of(bytes);
        if envelope.kind() == PayloadKind::Commit
            && envelope.epoch() == epoch
            && let Some(held) = g.removal.as_ref().map(|h| h.record.commit)
        {
            // A commit removing this node is held at this epoch (see `removal`): the
            // concurrent-commit rule decides against it as against a merged one.
            if id == held {
                return Verdict::Ignore(IgnoreReason::RemovalHeld);
            }
            if held < id {
                hold_orphan(g, epoch, bytes);
                return Verdict::Ignore(IgnoreReason::LosingCommit {
                    epoch,
                    winner: held,
                });
            }
        }
        let msg = Incoming {
            group: group_id,
            envelope: &envelope,
            id,
            bytes,
            source,
            now_ms,
        };
        let verdict = if envelope.kind() == PayloadKind::Commit && envelope.epoch() < epoch {
            self.consider_rival(msg, message, effects)
        } else if !g.mls.is_active() {
            return Verdict::Ignore(IgnoreReason::Removed);
        } else if envelope.kind() == PayloadKind::Application {
            self.process_application(msg, message, effects)
        } else {
            self.process_mls(msg, message, effects)
        };
        if verdict == Verdict::Accept && !self.is_catching_up(&group_id) {
            let again = if source == Source::Drained {
                Source::Drained
            } else {
                Source::Held
            };
            self.drain_pending(group_id, now_ms, effects, again);
        }
        verdict
    }

    /// Decrypts an application message, unless that would cost a message this node has
    /// not received yet (see [`crate::order`]): a live message whose sender's position is
    /// too far past the oldest one missing is undone (the storage returns to its savepoint
    /// and the group is reloaded from it), held, and the node is told to fetch the gap.
    fn process_application(
        &mut self,
        msg: Incoming<'_>,
        message: ProtocolMessage,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let Incoming {
            group: group_id,
            envelope,
            bytes,
            source,
            now_ms,
            ..
        } = msg;
        let savepoint = self.provider.storage().savepoint();
        let mark = effects.len();
        self.decrypted = None;
        self.ahead = false;
        let verdict = self.process_mls(msg, message, effects);
        let decrypted = self.decrypted.take();
        let ahead = std::mem::take(&mut self.ahead);
        let Some(g) = self.groups.get_mut(&group_id) else {
            self.provider.storage().release(savepoint);
            return verdict;
        };
        if ahead && matches!(source, Source::Live | Source::Synced) {
            // Nothing was decrypted: hold it and fetch what comes before.
            self.provider.storage().release(savepoint);
            effects.push(hold_behind(g, envelope.epoch(), bytes, now_ms, {
                u64::from(MAX_FORWARD_DISTANCE)
            }));
            return verdict;
        }
        let Some((sender, Some(seq))) = decrypted.filter(|_| verdict == Verdict::Accept) else {
            self.provider.storage().release(savepoint);
            return verdict;
        };
        if matches!(source, Source::Live | Source::Drained)
            && let Check::Behind { missing } = g.tracks.check(&sender, seq)
        {
            let undone = self
                .provider
                .storage()
                .undo(savepoint)
                .map_err(mls_err)
                .and_then(|()| load_mls(self.provider.storage(), &group_id));
            match undone {
                Ok(mls) => {
                    effects.truncate(mark);
                    g.mls = mls;
                    if source == Source::Drained {
                        // Back to where it was: the drain stops, the catch-up goes on
                        // (with its first start, so its time limit still applies).
                        g.pending_bytes += bytes.len();
                        g.pending.push_front(Pending {
                            epoch: envelope.epoch(),
                            bytes: bytes.to_vec(),
                        });
                        g.catching_up = Some(self.drain_since.unwrap_or(now_ms));
                        effects.push(Effect::Behind {
                            group: group_id,
                            missing,
                        });
                    } else {
                        effects.push(hold_behind(g, envelope.epoch(), bytes, now_ms, missing));
                    }
                    return Verdict::Ignore(IgnoreReason::SenderGap { missing });
                }
                Err(e) => {
                    // Only a failing store gets here. The message stays accepted: better
                    // to risk an older one than to drop this one.
                    tracing::error!(group = %group_id.short(), error = %e, "cannot undo a decryption ahead of a gap");
                    g.tracks.note(sender, seq);
                    return verdict;
                }
            }
        }
        self.provider.storage().release(savepoint);
        g.tracks.note(sender, seq);
        verdict
    }

    /// Processes held envelopes whose epoch has been reached, oldest first.
    pub(super) fn drain_pending(
        &mut self,
        group_id: GroupId,
        now_ms: u64,
        effects: &mut Vec<Effect>,
        source: Source,
    ) {
        loop {
            let Some(g) = self.groups.get_mut(&group_id) else {
                return;
            };
            if g.catching_up.is_some() {
                // A drained message went back to the hold: the rest waits with it.
                return;
            }
            let epoch = g.epoch();
            let Some(pos) = g.pending.iter().position(|p| p.epoch <= epoch) else {
                return;
            };
            let Some(p) = g.pending.remove(pos) else {
                return;
            };
            g.pending_bytes -= p.bytes.len();
            // `process` drains again after each accepted commit; nested calls stop once
            // nothing is ready, so the recursion depth is bounded by the number held.
            let verdict = self.process(&p.bytes, now_ms, effects, source);
            tracing::debug!(
                group = %group_id.short(),
                msg = %MessageId::of(&p.bytes).short(),
                ?verdict,
                "read a held envelope"
            );
        }
    }
}
