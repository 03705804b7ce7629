//! Reading one MLS message at this node's epoch: an application message becomes history,
//! a commit is merged, a member's proposal to leave is stored (and committed by the member
//! whose turn it is).

use libp2p_identity::PeerId;
use openmls::prelude::{
    BasicCredential, LeafNodeIndex, ProcessedMessageContent, ProtocolMessage, Sender,
};
use openmls_traits::OpenMlsProvider;

use super::branch::{checkpoint, note_applied};
use super::local::{merge_own_commit, removal_id};
use super::members::{bound_peer, member_peer, removed_peers, self_remover};
use super::receive::Incoming;
use super::removal::{drop_held, forget_held};
use super::state::hold_orphan;
use super::{Effect, GroupEngine, IgnoreReason, RejectReason, Step, Verdict, invites, resend};
use crate::chat::Chat;
use crate::codec::{self, DecodeError};
use crate::envelope::{
    AppContent, Body, MAX_CONTENT_BYTES, PayloadKind, Resent, ResentChat, SealedResent,
};
use crate::fork::{Applied, GroupRecords, OwnChange, Said};
use crate::order::{self, DecryptFailure, Undecryptable};
use crate::records::{EntryKind, HistoryEntry, StoredEnvelope};

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Processes one MLS message of `msg` at this node's current epoch (or, for an
    /// application message, a past one whose secrets are kept): records a text or an
    /// invite message, merges a commit, stores a member's proposal to leave and commits it
    /// if this node is the remaining member with the lowest leaf index.
    ///
    /// A valid commit that would remove this node is not merged but held (see `removal`):
    /// what reading it wrote to the storage is undone, so it can be read again when its
    /// grace ends.
    pub(super) fn process_mls(
        &mut self,
        msg: Incoming<'_>,
        message: ProtocolMessage,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        if msg.envelope.kind() != PayloadKind::Commit {
            return self.read_mls(msg, message, effects);
        }
        let savepoint = self.provider.storage().savepoint();
        self.removal_seen = false;
        let verdict = self.read_mls(msg, message, effects);
        if std::mem::take(&mut self.removal_seen) {
            return self.hold_removal(msg, savepoint);
        }
        self.provider.storage().release(savepoint);
        verdict
    }

    /// [`GroupEngine::process_mls`], except that a commit removing this node (other than
    /// the one being released) is only checked: `removal_seen` is set and nothing is merged.
    fn read_mls(
        &mut self,
        msg: Incoming<'_>,
        message: ProtocolMessage,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let Incoming {
            group: group_id,
            envelope,
            id,
            bytes,
            now_ms,
            ..
        } = msg;
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let current = g.epoch();
        let processed = match g.mls.process_message(&self.provider, message) {
            Ok(p) => p,
            Err(e)
                if envelope.kind() == PayloadKind::Application
                    && envelope.epoch() < g.branch.since =>
            {
                // Sent before this node joined: it was never meant to read it.
                return Verdict::Ignore(IgnoreReason::BeforeJoin(e.to_string()));
            }
            Err(e) if envelope.kind() == PayloadKind::Application => {
                match order::classify(&e, envelope.epoch(), current) {
                    DecryptFailure::Lost(reason) => {
                        if reason == Undecryptable::EpochGone {
                            // A rollback to another branch could still make it readable.
                            hold_orphan(g, envelope.epoch(), bytes);
                        }
                        effects.push(Effect::Undecryptable {
                            envelope: StoredEnvelope {
                                id,
                                group: group_id,
                                epoch: envelope.epoch(),
                                kind: envelope.kind(),
                                bytes: bytes.to_vec(),
                                received_at_ms: now_ms,
                            },
                            reason,
                        });
                        return Verdict::Ignore(IgnoreReason::Undecryptable(reason));
                    }
                    DecryptFailure::Duplicate => {
                        return Verdict::Ignore(IgnoreReason::AlreadyRead);
                    }
                    DecryptFailure::Ahead => {
                        self.ahead = true;
                        return Verdict::Ignore(IgnoreReason::TooFarAhead(e.to_string()));
                    }
                    DecryptFailure::Other => {
                        hold_orphan(g, envelope.epoch(), bytes);
                        return if envelope.epoch() < current {
                            Verdict::Ignore(IgnoreReason::PastEpoch(e.to_string()))
                        } else {
                            Verdict::Reject(RejectReason::Mls(e.to_string()))
                        };
                    }
                }
            }
            Err(e) if envelope.epoch() < current => {
                // It may have been sent on a branch this node has not switched to yet.
                hold_orphan(g, envelope.epoch(), bytes);
                return Verdict::Ignore(IgnoreReason::PastEpoch(e.to_string()));
            }
            Err(e) => {
                // It may belong to a branch that wins later.
                hold_orphan(g, envelope.epoch(), bytes);
                return Verdict::Reject(RejectReason::Mls(e.to_string()));
            }
        };
        let sender_leaf = match processed.sender() {
            Sender::Member(idx) => Some(*idx),
            _ => None,
        };
        // The sender as of the message's epoch. Commits and proposals are only processed at
        // the current epoch; application messages may come from a past one, whose tree
        // openmls used to verify them and whose credential it returns.
        let sender = sender_leaf.and_then(|idx| g.mls.member_at(idx).and_then(|m| member_peer(&m)));
        let named_sender = BasicCredential::try_from(processed.credential().clone())
            .ok()
            .and_then(|c| PeerId::from_bytes(c.identity()).ok());
        let stored = StoredEnvelope {
            id,
            group: group_id,
            epoch: envelope.epoch(),
            kind: envelope.kind(),
            bytes: bytes.to_vec(),
            received_at_ms: now_ms,
        };
        let aad = processed.aad().to_vec();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                // A member removed since (a message from a past epoch) no longer speaks for the
                // group: its leaf is gone or belongs to someone else now.
                let Some(sender) = named_sender.filter(|n| sender == Some(*n)) else {
                    return Verdict::Reject(RejectReason::FormerMember);
                };
                let content = match AppContent::decode(&app.into_bytes()) {
                    Ok(c) => c,
                    Err(e) => return Verdict::Reject(RejectReason::Content(e)),
                };
                self.decrypted = Some((sender, content.seq()));
                let sent_at_ms = content.sent_at_ms();
                let stable = content.stable_id();
                // A sealed re-send opens with this node's key of the message's epoch, which
                // only its members hold; then it is read like a re-send in the clear.
                let body = match content.into_body() {
                    Body::SealedResent(sealed) => {
                        match unseal(&self.provider, &group_id, &sealed, |plain| {
                            let text = String::from_utf8(plain).map_err(|_| {
                                DecodeError::Malformed("a sealed text is not UTF-8".into())
                            })?;
                            Ok(Body::Resent(Resent {
                                epoch: sealed.epoch,
                                envelope: sealed.envelope,
                                text,
                            }))
                        }) {
                            Ok(body) => body,
                            Err(v) => return v,
                        }
                    }
                    Body::SealedResentChat(sealed) => {
                        match unseal(&self.provider, &group_id, &sealed, |plain| {
                            let chat: Chat = codec::decode(&plain, MAX_CONTENT_BYTES)?;
                            chat.check()
                                .map_err(|e| DecodeError::Malformed(e.to_string()))?;
                            Ok(Body::ResentChat(ResentChat {
                                epoch: sealed.epoch,
                                envelope: sealed.envelope,
                                chat,
                            }))
                        }) {
                            Ok(body) => body,
                            Err(v) => return v,
                        }
                    }
                    body => body,
                };
                // What was said, and for a message sent again the epoch it was first said in
                // and the envelope a member asked for.
                let (said, first) = match body {
                    Body::Text(text) => (Said::Text(text), None),
                    Body::Chat(chat) => (Said::Chat(chat), None),
                    Body::Resent(r) => (Said::Text(r.text), Some((r.epoch, r.envelope))),
                    Body::ResentChat(r) => (Said::Chat(r.chat), Some((r.epoch, r.envelope))),
                    Body::ResendRequest(ids) => {
                        // A member asks for envelopes it cannot decrypt; those that carried
                        // this node's messages are sent again at the next tick.
                        if sender != self.me.peer {
                            match resend::note_asked(self.provider.storage(), &group_id, &ids) {
                                Ok(0) => {}
                                Ok(_) => {
                                    self.resend_pending.insert(group_id);
                                }
                                Err(e) => {
                                    return Verdict::Ignore(IgnoreReason::Failed {
                                        step: Step::RecordResend,
                                        detail: e.to_string(),
                                    });
                                }
                            }
                        }
                        effects.push(Effect::SaveEnvelope(stored));
                        return Verdict::Accept;
                    }
                    other => {
                        return match invites::invite_message_effects(
                            group_id, sender, stored, sent_at_ms, now_ms, other,
                        ) {
                            Ok(fx) => {
                                effects.extend(fx);
                                Verdict::Accept
                            }
                            Err(v) => v,
                        };
                    }
                };
                let at_epoch = match first {
                    None => envelope.epoch(),
                    Some(first) => match resent(
                        self.provider.storage(),
                        g.branch.since,
                        group_id,
                        stable,
                        first,
                        envelope.epoch(),
                        effects,
                    ) {
                        Ok(()) => first.0,
                        Err(v) => return v,
                    },
                };
                let saying = super::chat::Saying {
                    group: group_id,
                    me: self.me.peer,
                    sender,
                    stable,
                    envelope: id,
                    epoch: at_epoch,
                    sent_at_ms,
                    now_ms,
                    g: &*g,
                };
                let recorded = match saying.effects(said) {
                    Ok(fx) => fx,
                    Err(r) => return Verdict::Reject(r),
                };
                effects.push(Effect::SaveEnvelope(stored));
                if recorded.iter().any(|e| matches!(e, Effect::Record(_))) {
                    effects.push(Effect::LinkEnvelope {
                        envelope: id,
                        history: saying.history_id(),
                    });
                }
                effects.extend(recorded);
                Verdict::Accept
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                // Every added member must carry a credential bound to its key.
                let mut added = Vec::new();
                for add in staged.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    match bound_peer(leaf.credential(), leaf.signature_key().as_slice()) {
                        Some(p) => added.push(p),
                        None => {
                            return Verdict::Reject(RejectReason::UnboundMember);
                        }
                    }
                }
                let removed = removed_peers(&g.mls, &staged);
                let self_removed = staged.self_removed();
                if self_removed && self.releasing != Some(id) {
                    // Held first: the caller undoes this read (see `removal`).
                    self.removal_seen = true;
                    return Verdict::Accept;
                }
                if let Err(e) = checkpoint(&self.provider, group_id, current) {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::CheckpointBeforeMerge,
                        detail: e.to_string(),
                    });
                }
                if let Err(e) = g.mls.merge_staged_commit(&self.provider, *staged) {
                    return Verdict::Reject(RejectReason::Merge(e.to_string()));
                }
                if !added.is_empty()
                    && let Err(e) =
                        resend::note_added(self.provider.storage(), &group_id, g.epoch())
                {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::RecordCommit,
                        detail: e.to_string(),
                    });
                }
                if let Err(e) = note_applied(
                    &self.provider,
                    group_id,
                    g,
                    Applied {
                        epoch: current,
                        commit: id,
                        own: None,
                        invite: invites::note_invite(&aad),
                    },
                ) {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::RecordCommit,
                        detail: e.to_string(),
                    });
                }
                // The held removal merged now, or one that this commit won over: either way
                // its record goes (a lost one is kept as an orphan).
                let storage = self.provider.storage();
                let done = if self_removed {
                    forget_held(storage, &group_id)
                } else {
                    drop_held(storage, &group_id, g)
                };
                if let Err(e) = done {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::RecordCommit,
                        detail: e.to_string(),
                    });
                }
                let sender = sender.unwrap_or(self.me.peer);
                effects.push(Effect::SaveEnvelope(stored));
                effects.extend(invites::used_invite(group_id, &aad));
                if !added.is_empty() {
                    effects.push(Effect::Record(HistoryEntry {
                        group: group_id,
                        id,
                        epoch: envelope.epoch(),
                        sender,
                        sent_at_ms: now_ms,
                        received_at_ms: now_ms,
                        kind: EntryKind::MembersAdded(added),
                    }));
                }
                if !removed.is_empty() {
                    effects.push(Effect::Record(HistoryEntry {
                        group: group_id,
                        id: removal_id(&id),
                        epoch: envelope.epoch(),
                        sender,
                        sent_at_ms: now_ms,
                        received_at_ms: now_ms,
                        kind: EntryKind::MembersRemoved(removed),
                    }));
                }
                effects.push(Effect::EpochChanged {
                    group: group_id,
                    epoch: g.epoch(),
                    member_count: g.member_count(),
                });
                if self_removed {
                    g.lifecycle.set_leaving(false);
                    effects.push(Effect::Unsubscribe(g.topic));
                } else if g.lifecycle.leaving() {
                    // Another commit won this epoch and dropped our self-removal proposal:
                    // propose it again in the new epoch.
                    g.lifecycle.set_leaving(false);
                    match self.leave_group(group_id, now_ms) {
                        Ok(fx) => effects.extend(fx),
                        Err(e) => {
                            return Verdict::Reject(RejectReason::Reproposal(e.to_string()));
                        }
                    }
                }
                Verdict::Accept
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                // Kith only ever proposes a member's own removal (leaving); any other
                // proposal would be committed by the next commit of an honest member.
                if self_remover(proposal.proposal(), proposal.sender()).is_none() {
                    return Verdict::Reject(RejectReason::NotSelfRemoval);
                }
                if let Err(e) = g
                    .mls
                    .store_pending_proposal(self.provider.storage(), *proposal)
                {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::StoreProposal,
                        detail: e.to_string(),
                    });
                }
                effects.push(Effect::SaveEnvelope(stored));
                if g.lifecycle.leaving() || !g.active() {
                    return Verdict::Accept;
                }
                // Only the remaining member with the lowest leaf index commits, so the members
                // do not all commit the same removal at once.
                let leaving: Vec<LeafNodeIndex> = g
                    .mls
                    .pending_proposals()
                    .filter_map(|p| self_remover(p.proposal(), p.sender()))
                    .collect();
                let lowest = g
                    .mls
                    .members()
                    .map(|m| m.index)
                    .filter(|i| !leaving.contains(i))
                    .min();
                if lowest == Some(g.mls.own_leaf_index()) {
                    let old_epoch = g.epoch();
                    if let Err(e) = checkpoint(&self.provider, group_id, old_epoch) {
                        return Verdict::Ignore(IgnoreReason::Failed {
                            step: Step::CommitRemoval,
                            detail: e.to_string(),
                        });
                    }
                    let commit = match g
                        .mls
                        .commit_to_pending_proposals(&self.provider, &self.me.signer)
                    {
                        Ok((commit, _, _)) => commit,
                        Err(e) => {
                            let _ = g.mls.clear_pending_commit(self.provider.storage());
                            return Verdict::Ignore(IgnoreReason::Failed {
                                step: Step::CommitRemoval,
                                detail: e.to_string(),
                            });
                        }
                    };
                    match merge_own_commit(
                        &self.provider,
                        self.me.peer,
                        group_id,
                        g,
                        commit,
                        old_epoch,
                        OwnChange::Proposals,
                        now_ms,
                    ) {
                        Ok(fx) => effects.extend(fx),
                        Err(e) => {
                            return Verdict::Ignore(IgnoreReason::Failed {
                                step: Step::CommitRemoval,
                                detail: e.to_string(),
                            });
                        }
                    }
                }
                Verdict::Accept
            }
            _ => Verdict::Ignore(IgnoreReason::Unsupported),
        }
    }
}

/// Opens a sealed re-send ([`resend::open_sealed`]) and reads its plaintext with `read`.
fn unseal<P: OpenMlsProvider>(
    provider: &P,
    group: &crate::ids::GroupId,
    sealed: &SealedResent,
    read: impl FnOnce(Vec<u8>) -> Result<Body, DecodeError>,
) -> Result<Body, Verdict>
where
    P::StorageProvider: GroupRecords,
{
    match resend::open_sealed(provider, group, sealed) {
        Ok(Some(plain)) => read(plain).map_err(|e| Verdict::Reject(RejectReason::Content(e))),
        Ok(None) => Err(Verdict::Ignore(IgnoreReason::BeforeJoin(
            "a message sent again, sealed for an epoch this node was not in".into(),
        ))),
        Err(e) => Err(Verdict::Ignore(IgnoreReason::Failed {
            step: Step::RecordResend,
            detail: e.to_string(),
        })),
    }
}

/// Checks a message sent again (`first`: the epoch it was first said in and the envelope a
/// member asked for): it goes where it was first said, and only a member of that epoch may
/// be placed there. Counts the asked-for envelope as recovered if this node asked for it.
fn resent<S: GroupRecords>(
    storage: &S,
    since: u64,
    group: crate::ids::GroupId,
    stable: Option<crate::ids::MessageId>,
    (first, asked): (u64, crate::ids::MessageId),
    epoch: u64,
    effects: &mut Vec<Effect>,
) -> Result<(), Verdict> {
    if stable.is_none() || first > epoch {
        return Err(Verdict::Reject(RejectReason::BadResend));
    }
    if first < since {
        return Err(Verdict::Ignore(IgnoreReason::BeforeJoin(
            "a message sent again from before this node joined".into(),
        )));
    }
    match resend::received_again(storage, &group, &asked) {
        Ok(true) => effects.push(Effect::Recovered {
            group,
            envelope: asked,
        }),
        Ok(false) => {}
        Err(e) => {
            return Err(Verdict::Ignore(IgnoreReason::Failed {
                step: Step::RecordResend,
                detail: e.to_string(),
            }));
        }
    }
    Ok(())
}
