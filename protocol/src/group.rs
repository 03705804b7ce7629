//! The MLS group engine: a state machine over `openmls`, with no IO.
//!
//! [`GroupEngine`] is generic over [`OpenMlsProvider`], so tests run it on openmls' memory
//! storage and the node runs it on redb. Each input (a local command, envelope bytes from
//! gossip, a join request or response from a peer) returns [`Effect`]s for the caller to
//! apply: publish on a topic, subscribe, persist group metadata, history rows, raw envelopes
//! and invite records. The caller persists the MLS storage writes and those effects in one
//! transaction; on failure it discards the staged writes and calls
//! [`GroupEngine::reload_all`] so memory matches disk again.
//!
//! Time comes in as `now_ms` and randomness (group ids, invite secrets) from the caller.
//!
//! Membership is bound to node identity: a member's MLS signature key *is* its libp2p ed25519
//! node key, and its credential names the PeerId derived from that key. A key package whose
//! credential does not match its signature key is refused, so the PeerId shown for a member
//! is authenticated by MLS itself.
//!
//! This file holds the engine's types and its loading; its other methods live by job in
//! `group/`: `local` (this node's own operations), `join` and `rejoin` (being added, both
//! sides), `invites`, `receive` (envelope bytes in, held envelopes out), `catch_up`,
//! `apply` (one MLS message at the current epoch), `removal` (a commit removing this node,
//! held for a grace period), `branch` (the concurrent-commit rule),
//! `state` (what is kept per group, including its `Lifecycle`), `members` (identities and
//! PeerIds) and `verdict` (the gossip verdict and its reasons).

use std::collections::BTreeMap;

use libp2p_identity::PeerId;
use openmls::prelude::{Ciphersuite, MlsGroup};
use openmls_traits::OpenMlsProvider;

use crate::envelope::JoinRejection;
use crate::fork::{self, GroupRecords};
use crate::ids::{GroupId, MessageId, TopicId};
use crate::invite::{InviteError, InviteUpdate};
use crate::order::Undecryptable;
use crate::records::{GroupMeta, HistoryEntry, StoredEnvelope};
use crate::seal::SealKey;
use members::{member_peer, self_remove_pending};
use state::Group;

/// The one ciphersuite Kith uses: X25519, AES-128-GCM, SHA-256, Ed25519 (RFC 9420 §17.1).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// How many past epochs' secrets are kept so late application messages still decrypt.
pub const MAX_PAST_EPOCHS: usize = 5;
/// Past epochs' secrets are dropped this long after this node left the epoch (see
/// [`GroupEngine::expire_past_epochs`]), not after the epoch began. openmls rewrites every retained epoch's secrets on
/// each message, so stale epochs cost on every message; this keeps the window for late
/// messages while making steady-state messages cheap.
pub const PAST_EPOCH_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Envelopes for future epochs held per group until the commits before them arrive.
pub const MAX_PENDING_PER_GROUP: usize = 1024;
/// Bytes of such envelopes held per group.
pub const MAX_PENDING_BYTES_PER_GROUP: usize = 8 * 1024 * 1024;
/// Envelopes kept per group because they did not apply to this node's branch (a losing or
/// foreign commit, a message that did not decrypt), retried after every rollback.
pub const MAX_ORPHANS_PER_GROUP: usize = 512;
/// Bytes of such envelopes kept per group.
pub const MAX_ORPHAN_BYTES_PER_GROUP: usize = 4 * 1024 * 1024;

/// Default [`UpdatePolicy::after_messages`]: own messages in a group before a self-update.
pub const SELF_UPDATE_AFTER_MESSAGES: u64 = 1000;
/// Default [`UpdatePolicy::after_ms`]: time since this node's last commit in a group before a
/// self-update (7 days).
pub const SELF_UPDATE_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

/// When this node refreshes its own leaf key in a group (a self-update commit), for
/// post-compromise security: after `after_messages` own messages or `after_ms` since its
/// last own commit, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdatePolicy {
    /// Own application messages since the last own commit.
    pub after_messages: u64,
    /// Milliseconds since the last own commit (or since the group was loaded).
    pub after_ms: u64,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            after_messages: SELF_UPDATE_AFTER_MESSAGES,
            after_ms: SELF_UPDATE_AFTER_MS,
        }
    }
}

/// Why a group operation failed. Rejections of remote input are [`Verdict`]s, not errors.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// This node is not a member of the group.
    #[error("not a member of group {0}")]
    UnknownGroup(GroupId),
    /// This node is already a member of the group it tried to join.
    #[error("already a member of group {0}")]
    AlreadyMember(GroupId),
    /// This node was removed from the group; it can read history but not send.
    #[error("no longer a member of group {0}")]
    Inactive(GroupId),
    /// This node asked to leave the group and waits for a member to commit its removal.
    #[error("leaving group {0}; waiting for a member to commit the removal")]
    Leaving(GroupId),
    /// The peer is not a member of the group.
    #[error("{0} is not a member of the group")]
    UnknownMember(PeerId),
    /// The caller's input is invalid (empty or oversized text, bad name, …).
    #[error("{0}")]
    InvalidInput(String),
    /// Creating or using an invite failed.
    #[error(transparent)]
    Invite(#[from] InviteError),
    /// The member refused the join request.
    #[error("join refused: {0}")]
    JoinRejected(JoinRejection),
    /// The join response is malformed or does not match the invite.
    #[error("bad join response: {0}")]
    BadWelcome(String),
    /// The node key is not ed25519.
    #[error("the node key must be ed25519")]
    UnsupportedKey,
    /// openmls failed (storage or library error); the caller must discard staged writes.
    #[error("MLS error: {0}")]
    Mls(String),
}

fn mls_err(e: impl std::fmt::Display) -> GroupError {
    GroupError::Mls(e.to_string())
}

/// What the caller must do after an engine call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish `data` on `topic` (after the store transaction committed).
    Publish {
        /// Group topic.
        topic: TopicId,
        /// Encoded envelope.
        data: Vec<u8>,
    },
    /// Subscribe to a group topic, whose frames are sealed with the key (see [`crate::seal`]).
    Subscribe(TopicId, SealKey),
    /// Unsubscribe from a group topic.
    Unsubscribe(TopicId),
    /// Persist group metadata.
    SaveGroup(GroupMeta),
    /// Persist a raw envelope.
    SaveEnvelope(StoredEnvelope),
    /// Append a history entry (and tell the app).
    Record(HistoryEntry),
    /// The group left a losing branch (see docs/PROTOCOL.md, "Concurrent commits"): delete
    /// the stored envelopes of epochs after `to_epoch` and of the `lost_commits`, and the
    /// history lines in `forget_history` (membership changes that did not happen). Comes
    /// before the effects of the winning branch.
    RolledBack {
        /// The group.
        group: GroupId,
        /// The last epoch both branches share.
        to_epoch: u64,
        /// Envelope ids of the commits that lost.
        lost_commits: Vec<MessageId>,
        /// History ids to delete.
        forget_history: Vec<MessageId>,
    },
    /// The application envelope `envelope` carried the history entry `history` (their ids
    /// differ for texts with a stable id): sync needs the entry to order the envelope.
    LinkEnvelope {
        /// Envelope id.
        envelope: MessageId,
        /// History id.
        history: MessageId,
    },
    /// Merge an update into the invite record with its id ([`InviteRecord::merge`]).
    Invite(InviteUpdate),
    /// Delete every invite record of `group`, before this batch's invite updates: this node
    /// joined the group again on another branch, and what it counted on the dead one (uses
    /// of Adds that did not stand) must not outlive it. The member that added it sends the
    /// group's invite states again.
    ForgetInvites {
        /// The group.
        group: GroupId,
    },
    /// The commit that added this node lost to a concurrent one: its group state is a dead
    /// branch. Join again with `link` ([`GroupEngine::prepare_join`] accepts the group
    /// while it waits), then call [`GroupEngine::keep_join`] or [`GroupEngine::join_lost`]
    /// if the member refuses.
    JoinLost {
        /// The group.
        group: GroupId,
        /// The invite link this node joined with.
        link: String,
        /// The member who added this node, to ask first.
        by: Option<PeerId>,
    },
    /// This node's branch lost a fork at `epoch`, deeper than it can roll back: ask one of
    /// `members` to add it again ([`GroupEngine::prepare_rejoin`]); the one that holds
    /// `commit` at `epoch` does.
    DeepForkLost {
        /// The group.
        group: GroupId,
        /// Where the branches split.
        epoch: u64,
        /// The winning commit there.
        commit: MessageId,
        /// Members to ask (as this node knows them).
        members: Vec<PeerId>,
    },
    /// This node is behind in `group`: it holds live messages that it could only read by
    /// moving a sender's ratchet past messages it has not received. Fetch the group's
    /// history now (a history sync); end it with [`GroupEngine::end_catch_up`].
    Behind {
        /// The group.
        group: GroupId,
        /// Messages of one sender known to be missing (a lower bound of what to fetch).
        missing: u64,
    },
    /// An envelope of `envelope.group` that this node can never decrypt. Keep it (so history
    /// sync does not fetch it again), count it and tell the user.
    Undecryptable {
        /// The envelope, as received.
        envelope: StoredEnvelope,
        /// Why it cannot be decrypted.
        reason: Undecryptable,
    },
    /// A text this node could not decrypt (the envelope `envelope`, reported as
    /// [`Effect::Undecryptable`] earlier) arrived again from its sender, re-sent on this
    /// node's request: count it as recovered.
    Recovered {
        /// The group.
        group: GroupId,
        /// The envelope that could not be decrypted.
        envelope: MessageId,
    },
    /// A member's profile (signature checked; its owner is a member of `group`): keep it
    /// unless a newer version of the owner's profile is kept already.
    Profile {
        /// The group it arrived in.
        group: GroupId,
        /// Whose it is.
        owner: PeerId,
        /// The signed profile.
        profile: crate::chat::SignedProfile,
    },
    /// `peer` has read `group` up to the message `up_to` (a history id).
    Receipt {
        /// The group.
        group: GroupId,
        /// The reader.
        peer: PeerId,
        /// The last message read.
        up_to: MessageId,
        /// The reader's clock.
        sent_at_ms: u64,
    },
    /// `peer` is typing in `group`.
    Typing {
        /// The group.
        group: GroupId,
        /// Who.
        peer: PeerId,
        /// Their clock.
        sent_at_ms: u64,
    },
    /// `group` is a direct chat between this node and `peer`.
    Direct {
        /// The group.
        group: GroupId,
        /// The other person.
        peer: PeerId,
    },
    /// `from` offers this node a direct chat: join it with `link`.
    DirectOffer {
        /// The group the offer came in (a group both are members of).
        group: GroupId,
        /// Who offers.
        from: PeerId,
        /// A one-use invite link to the direct chat.
        link: String,
    },
    /// A group moved to a new epoch.
    EpochChanged {
        /// The group.
        group: GroupId,
        /// The new epoch.
        epoch: u64,
        /// Members after the change.
        member_count: usize,
    },
}

/// Drops the [`Effect::Undecryptable`]s of envelopes the caller already holds (`held`), or
/// that the same batch stores or reports twice: a copy of a message the node read (say, one
/// held live during a sync that fetched it too) is refused by MLS like a lost one, but
/// nothing is lost. What remains is truly lost here: store it, count it, and ask for it
/// again ([`GroupEngine::want_resend_for`]).
pub fn drop_held_undecryptable(effects: &mut Vec<Effect>, held: impl Fn(&MessageId) -> bool) {
    if !effects
        .iter()
        .any(|e| matches!(e, Effect::Undecryptable { .. }))
    {
        return;
    }
    let mut known: std::collections::BTreeSet<MessageId> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::SaveEnvelope(env) => Some(env.id),
            _ => None,
        })
        .collect();
    effects.retain(|e| match e {
        Effect::Undecryptable { envelope, .. } => {
            let copy = known.contains(&envelope.id) || held(&envelope.id);
            known.insert(envelope.id);
            !copy
        }
        _ => true,
    });
}

/// The group engine of one node.
pub struct GroupEngine<P: OpenMlsProvider> {
    provider: P,
    me: Identity,
    network: String,
    groups: BTreeMap<GroupId, Group>,
    /// Own messages sent since start, mixed into stable message ids.
    sent_seq: u64,
    /// The sender and position of the application message [`GroupEngine::process_mls`]
    /// decrypted last, for [`GroupEngine::process`] to check and note (see [`crate::order`]).
    decrypted: Option<(PeerId, Option<u64>)>,
    /// [`GroupEngine::process_mls`] found the message too far ahead of its sender's
    /// messages held here ([`crate::order::DecryptFailure::Ahead`]).
    ahead: bool,
    /// While a catch-up's held envelopes are drained: when that catch-up began.
    drain_since: Option<u64>,
    /// When this node left each group's past epochs (see [`GroupEngine::expire_past_epochs`]),
    /// as last read from or written to storage.
    epoch_ends: BTreeMap<GroupId, expiry::EpochEnds>,
    /// Groups whose re-send records may hold something (see [`GroupEngine::resend_tick`]):
    /// every group after a load, and any that learns of something to ask or answer.
    resend_pending: std::collections::BTreeSet<GroupId>,
    /// The held commit removing this node that [`GroupEngine::removal_tick`] merges now
    /// (every other commit that would remove it is held, see `removal`).
    releasing: Option<MessageId>,
    /// Set by [`GroupEngine::process_mls`] when the commit it read would remove this node.
    removal_seen: bool,
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// A new engine with no groups loaded.
    pub fn new(provider: P, me: Identity, network: impl Into<String>) -> Self {
        GroupEngine {
            provider,
            me,
            network: network.into(),
            groups: BTreeMap::new(),
            sent_seq: 0,
            decrypted: None,
            ahead: false,
            drain_since: None,
            epoch_ends: BTreeMap::new(),
            resend_pending: std::collections::BTreeSet::new(),
            releasing: None,
            removal_seen: false,
        }
    }

    /// The openmls provider (the node flushes its staged storage writes).
    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.me.peer
    }

    /// The network id.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Loads groups from storage after a restart. Returns subscriptions for active groups.
    /// Groups whose MLS state is missing are skipped and returned in the second list.
    pub fn load(
        &mut self,
        metas: Vec<GroupMeta>,
    ) -> Result<(Vec<Effect>, Vec<GroupId>), GroupError> {
        let mut effects = Vec::new();
        let mut missing = Vec::new();
        for meta in metas {
            let mls_id = openmls::group::GroupId::from_slice(meta.id.as_bytes());
            match MlsGroup::load(self.provider.storage(), &mls_id).map_err(mls_err)? {
                Some(mls) => {
                    let topic = meta.id.topic(&self.network);
                    if mls.is_active() {
                        effects.push(Effect::Subscribe(
                            topic,
                            SealKey::of(&self.network, &meta.id),
                        ));
                    }
                    let mut branch =
                        fork::load_branch(self.provider.storage(), &meta.id).map_err(mls_err)?;
                    if branch.applied.is_empty() {
                        // No commit seen since this version: judge only from now on.
                        branch.since = branch.since.max(mls.epoch().as_u64());
                    }
                    let id = meta.id;
                    let mut g = Group::new(mls, meta, topic, None, branch);
                    // A commit removing this node that was held when it stopped is held
                    // again; its grace starts at the first tick.
                    g.removal = removal::reloaded(self.provider.storage(), &id, &g)?;
                    self.groups.insert(id, g);
                }
                None => missing.push(meta.id),
            }
        }
        self.resend_pending.extend(self.groups.keys().copied());
        Ok((effects, missing))
    }

    /// Re-reads every loaded group's MLS state from storage, after the caller discarded
    /// staged writes that failed to commit. Pending envelopes are kept.
    pub fn reload_all(&mut self) -> Result<(), GroupError> {
        self.epoch_ends.clear();
        self.resend_pending.extend(self.groups.keys().copied());
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            let mls_id = openmls::group::GroupId::from_slice(id.as_bytes());
            match MlsGroup::load(self.provider.storage(), &mls_id).map_err(mls_err)? {
                Some(mls) => {
                    let branch =
                        fork::load_branch(self.provider.storage(), &id).map_err(mls_err)?;
                    if let Some(g) = self.groups.get_mut(&id) {
                        g.lifecycle.set_leaving(self_remove_pending(&mls));
                        g.mls = mls;
                        g.branch = branch;
                        g.removal = removal::reloaded(self.provider.storage(), &id, g)?;
                    }
                }
                None => {
                    self.groups.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// All groups, in id order.
    pub fn groups(&self) -> Vec<GroupView> {
        self.groups.values().map(Group::view).collect()
    }

    /// Whether this node is an active member of `id` (it may send there). Not while a
    /// commit removing it is held ([`GroupEngine::removal_held`]).
    pub fn is_active(&self, id: &GroupId) -> bool {
        self.groups
            .get(id)
            .is_some_and(|g| g.active() && g.lifecycle.lost().is_none())
    }

    /// One group.
    pub fn group(&self, id: &GroupId) -> Option<GroupView> {
        self.groups.get(id).map(Group::view)
    }

    /// The epoch authenticator of a group's current epoch (equal on all members in sync).
    pub fn epoch_authenticator(&self, id: &GroupId) -> Option<Vec<u8>> {
        self.groups
            .get(id)
            .map(|g| g.mls.epoch_authenticator().as_slice().to_vec())
    }

    /// The current epoch of `group`, if this node has it (cheaper than [`GroupEngine::group`]).
    pub fn group_epoch(&self, group: &GroupId) -> Option<u64> {
        self.groups.get(group).map(|g| g.epoch())
    }

    /// Number of envelopes held for future epochs in `group`.
    pub fn pending_count(&self, group: &GroupId) -> usize {
        self.groups.get(group).map_or(0, |g| g.pending.len())
    }
}

mod apply;
mod branch;
mod catch_up;
mod chat;
mod expiry;
mod invites;
mod join;
mod keys;
mod local;
mod members;
mod receive;
mod rejoin;
mod removal;
mod resend;
mod state;
mod synced;
mod verdict;

pub use expiry::Expired;
pub use invites::{CommitNote, NewInvite};
pub use local::{removal_id, text_history_id};
pub use members::{Identity, bound_peer};
pub use removal::REMOVAL_GRACE_MS;
pub use resend::{ASK_AGAIN_MS, MAX_OWED, MAX_WANTED};
pub use state::{GroupView, LostJoin, authenticator_digest};
pub use verdict::{IgnoreReason, RejectReason, Step, Verdict};

#[cfg(test)]
mod chat_tests;
#[cfg(test)]
mod fork_tests;
#[cfg(test)]
mod order_tests;
#[cfg(test)]
mod removal_tests;
#[cfg(test)]
mod resend_tests;
#[cfg(test)]
mod tests;
