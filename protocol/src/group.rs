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

use std::collections::{BTreeMap, VecDeque};

use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage, LeafNodeIndex, LeafNodeParameters,
    Member, MlsGroup, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut,
    PURE_CIPHERTEXT_WIRE_FORMAT_POLICY, ProcessedMessageContent, Proposal, ProtocolMessage, Sender,
    SenderRatchetConfiguration, StagedWelcome,
    tls_codec::{Deserialize as _, Serialize as _},
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;

use crate::codec;
use crate::envelope::{
    AppContent, AppContentV2, Body, Envelope, JoinRejection, JoinRequest, JoinRequestV1,
    JoinResponse, MAX_GROUP_NAME_BYTES, MAX_TEXT_BYTES, PayloadKind,
};
use crate::fork::{self, Applied, Branch, GroupRecords, Joined, OwnChange, REWIND_DEPTH, Sent};
use crate::ids::{GroupId, InviteId, MessageId, TopicId};
use crate::invite::{Invite, InviteError, InviteRecord, InviteUpdate};
use crate::order::{
    self, Check, DecryptFailure, MAX_FORWARD_DISTANCE, OUT_OF_ORDER_TOLERANCE, Tracks,
    Undecryptable,
};
use crate::records::{EntryKind, GroupMeta, HistoryEntry, StoredEnvelope};

/// The one ciphersuite Kith uses: X25519, AES-128-GCM, SHA-256, Ed25519 (RFC 9420 §17.1).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// How many past epochs' secrets are kept so late application messages still decrypt.
pub const MAX_PAST_EPOCHS: usize = 5;
/// Past epochs' secrets are dropped this long after the epoch ended (see
/// [`GroupEngine::expire_past_epochs`]). openmls rewrites every retained epoch's secrets on
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
    /// Subscribe to a group topic.
    Subscribe(TopicId),
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

/// This node's identity inside MLS: the node key doubles as the MLS signature key.
pub struct Identity {
    keypair: Keypair,
    peer: PeerId,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl Identity {
    /// Builds the MLS identity from the node's ed25519 key.
    pub fn new(keypair: &Keypair) -> Result<Self, GroupError> {
        let ed = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| GroupError::UnsupportedKey)?;
        let public = ed.public().to_bytes().to_vec();
        let private = ed.secret().as_ref().to_vec();
        let signer = SignatureKeyPair::from_raw(SignatureScheme::ED25519, private, public.clone());
        let peer = keypair.public().to_peer_id();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(peer.to_bytes()).into(),
            signature_key: public.into(),
        };
        Ok(Identity {
            keypair: keypair.clone(),
            peer,
            signer,
            credential,
        })
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }
}

/// The PeerId of a member, derived from its signature key, if its credential names the same
/// PeerId. `None` means the credential and key disagree (never admitted by this engine).
pub fn bound_peer(
    credential: &openmls::prelude::Credential,
    signature_key: &[u8],
) -> Option<PeerId> {
    let from_key = ed25519::PublicKey::try_from_bytes(signature_key)
        .ok()
        .map(|k| PublicKey::from(k).to_peer_id())?;
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let named = PeerId::from_bytes(basic.identity()).ok()?;
    (named == from_key).then_some(from_key)
}

fn member_peer(m: &Member) -> Option<PeerId> {
    bound_peer(&m.credential, &m.signature_key)
}

/// A read-only view of one group, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Metadata (id, name, join time).
    pub meta: GroupMeta,
    /// Current epoch.
    pub epoch: u64,
    /// Whether this node is still a member.
    pub active: bool,
    /// Whether this node proposed its own removal and waits for it to be committed.
    pub leaving: bool,
    /// Members as (leaf index, PeerId), in leaf order.
    pub members: Vec<(u32, PeerId)>,
    /// Times this node left a losing branch since it loaded the group.
    pub rollbacks: u64,
    /// Rival commits seen for epochs this node can no longer roll back to (a deep fork).
    pub deep_forks: u64,
    /// Times a member's history sync summary named another commit than this node's for an
    /// epoch both hold: the two are on different branches (since it loaded the group).
    pub forks_detected: u64,
    /// The first 8 bytes of SHA-256 over the current epoch's MLS epoch authenticator: equal
    /// on every member in the same epoch of the same branch, different across a fork.
    pub authenticator: [u8; 8],
}

struct Pending {
    epoch: u64,
    bytes: Vec<u8>,
}

/// Work of this node lost in a rollback, still to be redone by [`GroupEngine::settle`].
struct Redo {
    /// The commits of the losing branch (this node re-proposes its own ones).
    lost: Vec<Applied>,
    /// This node's messages encrypted on the losing branch, to re-send.
    messages: Vec<Sent>,
    /// Members removed on the losing branch. The messages above were written for a group
    /// without them, so they are not re-sent while any of them is a member again.
    excluded: Vec<PeerId>,
}
/// Where envelope bytes come from, for [`GroupEngine::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Live gossip: held if from a future epoch, or while the group catches up.
    Live,
    /// A history sync page: held only if from a future epoch.
    Synced,
    /// Held earlier and now due: never held again.
    Held,
    /// Held during a catch-up that ended with a complete sync: read with the position guard
    /// on; a message that trips it goes back to the front of the hold (see
    /// [`GroupEngine::end_catch_up`]).
    Drained,
}

struct Group {
    mls: MlsGroup,
    meta: GroupMeta,
    topic: TopicId,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// The commits merged recently, for the concurrent-commit rule.
    branch: Branch,
    /// Envelopes that did not apply to this branch (see [`MAX_ORPHANS_PER_GROUP`]).
    orphans: VecDeque<Pending>,
    orphan_bytes: usize,
    /// Rollbacks whose lost work (own changes, own messages) is still to be redone.
    redo: Vec<Redo>,
    /// Rival commits for epochs before the rewind window (a fork too deep to roll back).
    deep_forks: u64,
    /// Sync summaries from members whose branch differs from this node's.
    forks_detected: u64,
    /// Times this node left a losing branch.
    rollbacks: u64,
    /// Orphans must be retried (a rollback happened).
    retry: bool,
    /// This node's join lost a race and it is joining again.
    rejoining: bool,
    /// This node's join lost a race and joining again was refused for this reason.
    lost: Option<String>,
    /// The lowest epoch at which a rival beyond the rewind window was seen: a fork is
    /// judged where the branches split, not at a later epoch of the other branch.
    deep_rival: Option<u64>,
    /// Since when (ms) live envelopes are held while history sync fetches older ones (see
    /// [`GroupEngine::begin_catch_up`]).
    catching_up: Option<u64>,
    /// Which positions of each sender this node has seen (see [`crate::order`]).
    tracks: Tracks,
    /// This node proposed its own removal (see [`GroupEngine::leave_group`]).
    leaving: bool,
    /// Own application messages since this node's last own commit.
    sent_since_update: u64,
    /// When this node last committed in the group; `None` until first seen by
    /// [`GroupEngine::due_self_updates`] after a load.
    last_update_ms: Option<u64>,
}

impl Group {
    fn new(
        mls: MlsGroup,
        meta: GroupMeta,
        topic: TopicId,
        now_ms: Option<u64>,
        branch: Branch,
    ) -> Self {
        let leaving = self_remove_pending(&mls);
        Group {
            mls,
            meta,
            topic,
            pending: VecDeque::new(),
            pending_bytes: 0,
            branch,
            orphans: VecDeque::new(),
            orphan_bytes: 0,
            redo: Vec::new(),
            deep_forks: 0,
            forks_detected: 0,
            rollbacks: 0,
            retry: false,
            rejoining: false,
            lost: None,
            deep_rival: None,
            catching_up: None,
            tracks: Tracks::default(),
            leaving,
            sent_since_update: 0,
            last_update_ms: now_ms,
        }
    }

    fn epoch(&self) -> u64 {
        self.mls.epoch().as_u64()
    }

    fn view(&self) -> GroupView {
        GroupView {
            meta: self.meta.clone(),
            epoch: self.epoch(),
            active: self.mls.is_active() && self.lost.is_none(),
            leaving: self.leaving,
            members: self
                .mls
                .members()
                .filter_map(|m| Some((m.index.u32(), member_peer(&m)?)))
                .collect(),
            rollbacks: self.rollbacks,
            deep_forks: self.deep_forks,
            forks_detected: self.forks_detected,
            authenticator: authenticator_digest(self.mls.epoch_authenticator().as_slice()),
        }
    }

    fn member_count(&self) -> usize {
        self.mls.members().count()
    }
}

/// The short digest of an epoch authenticator shown to users and exchanged between members
/// (see [`GroupView::authenticator`]).
pub fn authenticator_digest(authenticator: &[u8]) -> [u8; 8] {
    let h = crate::ids::hash_parts(&[b"kith/epoch-auth", authenticator]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h[..8]);
    out
}

/// Whether this node proposed its own removal and the proposal is still pending (it survives
/// restarts in the MLS proposal store).
fn self_remove_pending(mls: &MlsGroup) -> bool {
    let me = mls.own_leaf_index();
    mls.is_active() && mls.pending_proposals().any(|p| is_self_remove(p, me))
}

/// Whether a queued proposal is a member proposing its own removal, optionally only `who`'s.
fn is_self_remove(p: &openmls::prelude::QueuedProposal, who: LeafNodeIndex) -> bool {
    self_remover(p.proposal(), p.sender()) == Some(who)
}

/// The leaf proposing its own removal, if this proposal is one.
fn self_remover(proposal: &Proposal, sender: &Sender) -> Option<LeafNodeIndex> {
    match (proposal, sender) {
        (Proposal::Remove(r), Sender::Member(s)) if r.removed() == *s => Some(*s),
        _ => None,
    }
}

/// The peers a pending or staged commit removes, looked up in the tree before it is merged.
fn removed_peers(mls: &MlsGroup, staged: &openmls::prelude::StagedCommit) -> Vec<PeerId> {
    staged
        .remove_proposals()
        .filter_map(|r| {
            let idx: LeafNodeIndex = r.remove_proposal().removed();
            mls.member_at(idx).and_then(|m| member_peer(&m))
        })
        .collect()
}

/// Merges this node's own pending commit (`commit`, made at `old_epoch`) and returns the
/// effects: the commit envelope stored, removals recorded, the epoch change, the publication.
#[allow(clippy::too_many_arguments)]
fn merge_own_commit<P: OpenMlsProvider>(
    provider: &P,
    me: PeerId,
    group: GroupId,
    g: &mut Group,
    commit: MlsMessageOut,
    old_epoch: u64,
    own: OwnChange,
    now_ms: u64,
) -> Result<Vec<Effect>, GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let removed = g
        .mls
        .pending_commit()
        .map(|c| removed_peers(&g.mls, c))
        .unwrap_or_default();
    if let Err(e) = g.mls.merge_pending_commit(provider) {
        let _ = g.mls.clear_pending_commit(provider.storage());
        return Err(mls_err(e));
    }
    // Every commit of ours carries an update path: our leaf key is fresh.
    g.sent_since_update = 0;
    g.last_update_ms = Some(now_ms);
    let commit = commit.tls_serialize_detached().map_err(mls_err)?;
    let (data, id) = Envelope::new(group, old_epoch, PayloadKind::Commit, commit)
        .encode()
        .map_err(mls_err)?;
    note_applied(
        provider,
        group,
        g,
        Applied {
            epoch: old_epoch,
            commit: id,
            own: Some(own),
            invite: None,
        },
    )?;
    let mut effects = vec![Effect::SaveEnvelope(StoredEnvelope {
        id,
        group,
        epoch: old_epoch,
        kind: PayloadKind::Commit,
        bytes: data.clone(),
        received_at_ms: now_ms,
    })];
    if !removed.is_empty() {
        effects.push(Effect::Record(HistoryEntry {
            group,
            id: removal_id(&id),
            epoch: old_epoch,
            sender: me,
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::MembersRemoved(removed),
        }));
    }
    effects.push(Effect::EpochChanged {
        group,
        epoch: g.epoch(),
        member_count: g.member_count(),
    });
    effects.push(Effect::Publish {
        topic: g.topic,
        data,
    });
    Ok(effects)
}

/// Encrypts `content` as an application message of `group` in its current epoch and wraps it
/// in an envelope: (epoch, envelope bytes, envelope id).
fn encrypt_app<P: OpenMlsProvider>(
    provider: &P,
    signer: &SignatureKeyPair,
    group: GroupId,
    g: &mut Group,
    content: &AppContent,
) -> Result<(u64, Vec<u8>, MessageId), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let seq = order::next_seq(provider.storage(), &group).map_err(mls_err)?;
    let plain = codec::encode(&content.clone().at_seq(seq)).map_err(mls_err)?;
    let epoch = g.epoch();
    let out = g
        .mls
        .create_message(provider, signer, &plain)
        .map_err(mls_err)?;
    g.sent_since_update += 1;
    let mls = out.tls_serialize_detached().map_err(mls_err)?;
    let (data, id) = Envelope::new(group, epoch, PayloadKind::Application, mls)
        .encode()
        .map_err(mls_err)?;
    Ok((epoch, data, id))
}

/// Saves the checkpoint of `group` at its current epoch `epoch`: the state a commit made in
/// this epoch applies to. Call it before creating or merging any commit.
fn checkpoint<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    epoch: u64,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    fork::save_checkpoint(provider.storage(), &group, epoch).map_err(mls_err)
}

/// Records a merged commit in the group's branch, drops the checkpoints and kept messages
/// that fell out of the rewind window, and persists the branch.
fn note_applied<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    g: &mut Group,
    applied: Applied,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let storage = provider.storage();
    g.branch.applied.retain(|a| a.epoch < applied.epoch);
    if g.branch
        .joined
        .as_ref()
        .is_some_and(|j| j.epoch + (REWIND_DEPTH as u64) < applied.epoch)
    {
        g.branch.joined = None;
    }
    g.branch.applied.push(applied);
    while g.branch.applied.len() > REWIND_DEPTH {
        let old = g.branch.applied.remove(0);
        fork::delete_checkpoint(storage, &group, old.epoch).map_err(mls_err)?;
        g.branch.older.push((old.epoch, old.commit));
    }
    let excess = g.branch.older.len().saturating_sub(fork::MAX_OLDER);
    g.branch.older.drain(..excess);
    if let Some(oldest) = g.branch.oldest() {
        // Messages of the oldest epoch still reachable stay readable after any rollback.
        fork::trim_sent(storage, &group, oldest + 1).map_err(mls_err)?;
    }
    fork::save_branch(storage, &group, &g.branch).map_err(mls_err)
}

/// The history id of a text whose sender chose the stable id `stable`: scoped to the
/// (MLS-authenticated) sender, so nobody can overwrite another member's message.
pub fn text_history_id(sender: &PeerId, stable: &MessageId) -> MessageId {
    MessageId(crate::ids::hash_parts(&[
        b"kith/text",
        &sender.to_bytes(),
        stable.as_bytes(),
    ]))
}

/// The history id of the removals in the commit envelope `commit`.
pub fn removal_id(commit: &MessageId) -> MessageId {
    MessageId(crate::ids::hash_parts(&[
        b"kith/removed",
        commit.as_bytes(),
    ]))
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
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
    /// messages held here ([`DecryptFailure::Ahead`]).
    ahead: bool,
    /// While a catch-up's held envelopes are drained: when that catch-up began.
    drain_since: Option<u64>,
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
                        effects.push(Effect::Subscribe(topic));
                    }
                    let mut branch =
                        fork::load_branch(self.provider.storage(), &meta.id).map_err(mls_err)?;
                    if branch.applied.is_empty() {
                        // No commit seen since this version: judge only from now on.
                        branch.since = branch.since.max(mls.epoch().as_u64());
                    }
                    self.groups
                        .insert(meta.id, Group::new(mls, meta, topic, None, branch));
                }
                None => missing.push(meta.id),
            }
        }
        Ok((effects, missing))
    }

    /// Re-reads every loaded group's MLS state from storage, after the caller discarded
    /// staged writes that failed to commit. Pending envelopes are kept.
    pub fn reload_all(&mut self) -> Result<(), GroupError> {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            let mls_id = openmls::group::GroupId::from_slice(id.as_bytes());
            match MlsGroup::load(self.provider.storage(), &mls_id).map_err(mls_err)? {
                Some(mls) => {
                    let branch =
                        fork::load_branch(self.provider.storage(), &id).map_err(mls_err)?;
                    if let Some(g) = self.groups.get_mut(&id) {
                        g.leaving = self_remove_pending(&mls);
                        g.mls = mls;
                        g.branch = branch;
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

    /// Creates a group with this node as its only member. `id` must be fresh random bytes.
    pub fn create_group(
        &mut self,
        id: GroupId,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
            return Err(GroupError::InvalidInput(format!(
                "group name must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
            )));
        }
        if self.groups.contains_key(&id) {
            return Err(GroupError::AlreadyMember(id));
        }
        let mls = MlsGroup::builder()
            .with_group_id(openmls::group::GroupId::from_slice(id.as_bytes()))
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .with_wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                OUT_OF_ORDER_TOLERANCE,
                MAX_FORWARD_DISTANCE,
            ))
            .build(&self.provider, &self.me.signer, self.me.credential.clone())
            .map_err(mls_err)?;
        let meta = GroupMeta {
            id,
            name: name.to_owned(),
            joined_at_ms: now_ms,
        };
        let topic = id.topic(&self.network);
        let entry = HistoryEntry {
            group: id,
            id: MessageId(crate::ids::hash_parts(&[b"kith/created", id.as_bytes()])),
            epoch: 0,
            sender: self.me.peer,
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::GroupCreated {
                name: name.to_owned(),
            },
        };
        self.groups.insert(
            id,
            Group::new(mls, meta.clone(), topic, Some(now_ms), Branch::default()),
        );
        Ok(vec![
            Effect::SaveGroup(meta),
            Effect::Record(entry),
            Effect::Subscribe(topic),
        ])
    }

    /// Makes the join request for `invite`: a fresh key package (its private keys are staged
    /// in storage; the caller commits them before sending).
    pub fn prepare_join(
        &mut self,
        invite: &Invite,
        now_ms: u64,
    ) -> Result<JoinRequest, GroupError> {
        invite.check(&self.network, now_ms / 1000)?;
        if self.groups.get(&invite.group).is_some_and(|g| !g.rejoining) {
            return Err(GroupError::AlreadyMember(invite.group));
        }
        let key_package = self.fresh_key_package()?;
        Ok(JoinRequest::V1(JoinRequestV1 {
            network: self.network.clone(),
            group: invite.group,
            secret: invite.secret,
            key_package,
        }))
    }

    /// A new TLS-encoded key package of this node (its private keys go to storage).
    fn fresh_key_package(&self) -> Result<Vec<u8>, GroupError> {
        let bundle = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.me.signer,
                self.me.credential.clone(),
            )
            .map_err(mls_err)?;
        bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(mls_err)
    }

    /// Answers a join request from `from` (transport-authenticated PeerId). `record` is the
    /// stored invite whose secret hash matches the request, if any. On acceptance the joiner
    /// is added in a commit that is merged here and published to the group.
    pub fn handle_join_request(
        &mut self,
        from: PeerId,
        request: JoinRequest,
        record: Option<InviteRecord>,
        now_ms: u64,
    ) -> Result<(JoinResponse, Vec<Effect>), GroupError> {
        let kp = match self.screen_join_request(from, &request, record.as_ref(), now_ms) {
            Ok(kp) => kp,
            Err(r) => return Ok((JoinResponse::Rejected(r), Vec::new())),
        };
        let JoinRequest::V1(req) = request else {
            return Ok((JoinResponse::Rejected(JoinRejection::Internal), Vec::new()));
        };
        let invite = InviteId::of(&crate::invite::secret_hash(&req.secret));
        self.add_member(req.group, from, kp, req.key_package, Some(invite), now_ms)
    }

    /// Adds `from` with key package `kp` (already checked; `key_package` is its encoding) in
    /// a commit that names `invite` in its AAD when there is one, merges and publishes it,
    /// and returns the answer for the joiner.
    fn add_member(
        &mut self,
        group: GroupId,
        from: PeerId,
        kp: KeyPackage,
        key_package: Vec<u8>,
        invite: Option<InviteId>,
        now_ms: u64,
    ) -> Result<(JoinResponse, Vec<Effect>), GroupError> {
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok((JoinResponse::Rejected(JoinRejection::NotMember), Vec::new()));
        };
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        // The commit names the invite it used, so every member counts the use on merging it.
        if let Some(invite) = invite {
            g.mls
                .set_aad(invites::CommitNote::InviteUse(invite).encode());
        }
        let (commit, welcome, _info) =
            match g.mls.add_members(&self.provider, &self.me.signer, &[kp]) {
                Ok(x) => x,
                Err(e) => {
                    g.mls.set_aad(Vec::new());
                    return Err(mls_err(e));
                }
            };
        if let Err(e) = g.mls.merge_pending_commit(&self.provider) {
            let _ = g.mls.clear_pending_commit(self.provider.storage());
            return Err(mls_err(e));
        }
        let welcome = welcome.tls_serialize_detached().map_err(mls_err)?;
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        let envelope = Envelope::new(group, old_epoch, PayloadKind::Commit, commit);
        let (data, id) = envelope.encode().map_err(mls_err)?;
        note_applied(
            &self.provider,
            group,
            g,
            Applied {
                epoch: old_epoch,
                commit: id,
                own: Some(OwnChange::Add {
                    key_package,
                    invite: invite.map(|i| *i.as_bytes()),
                }),
                invite,
            },
        )?;
        g.sent_since_update = 0;
        g.last_update_ms = Some(now_ms);
        let mut effects: Vec<Effect> = invite
            .map(|id| Effect::Invite(InviteUpdate::Used { group, id }))
            .into_iter()
            .collect();
        effects.extend([
            Effect::SaveEnvelope(StoredEnvelope {
                id,
                group,
                epoch: old_epoch,
                kind: PayloadKind::Commit,
                bytes: data.clone(),
                received_at_ms: now_ms,
            }),
            Effect::Record(HistoryEntry {
                group,
                id,
                epoch: old_epoch,
                sender: self.me.peer,
                sent_at_ms: now_ms,
                received_at_ms: now_ms,
                kind: EntryKind::MembersAdded(vec![from]),
            }),
            Effect::EpochChanged {
                group,
                epoch: g.epoch(),
                member_count: g.member_count(),
            },
            Effect::Publish {
                topic: g.topic,
                data,
            },
        ]);
        Ok((
            JoinResponse::Admitted {
                welcome,
                group_name: g.meta.name.clone(),
                commit: id,
            },
            effects,
        ))
    }

    /// A member says this node is not in `group` (it refused a sync request). If this node
    /// joined recently, the commit that added it may have lost to a concurrent one that the
    /// node never received: returns [`Effect::JoinLost`] so the caller asks to join again (a
    /// member answers "already a member" if the join stands, see [`GroupEngine::keep_join`]).
    pub fn member_says_not_in(&mut self, group: &GroupId) -> Option<Effect> {
        let g = self.groups.get_mut(group)?;
        let j = g.branch.joined.as_ref()?;
        if g.rejoining || g.lost.is_some() || !g.mls.is_active() {
            return None;
        }
        g.rejoining = true;
        Some(Effect::JoinLost {
            group: *group,
            link: j.link.clone(),
            by: j.by.as_deref().and_then(|b| PeerId::from_bytes(b).ok()),
        })
    }

    /// The member says this node is still in the group: the join did not lose after all.
    pub fn keep_join(&mut self, group: &GroupId) {
        if let Some(g) = self.groups.get_mut(group) {
            g.rejoining = false;
        }
    }

    /// Joining again after a lost race was refused (`reason`): the group stays, read-only.
    pub fn join_lost(&mut self, group: &GroupId, reason: String) {
        if let Some(g) = self.groups.get_mut(group) {
            g.rejoining = false;
            g.lost = Some(reason);
        }
    }

    /// Why joining again after a lost race was refused, if it was.
    pub fn lost_reason(&self, group: &GroupId) -> Option<String> {
        self.groups.get(group).and_then(|g| g.lost.clone())
    }

    /// Completes a join with the member's answer. On success this node is a member.
    pub fn handle_join_response(
        &mut self,
        invite: &Invite,
        response: JoinResponse,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let (welcome_bytes, group_name, commit) = match response {
            JoinResponse::Rejected(r) => return Err(GroupError::JoinRejected(r)),
            JoinResponse::AwaitingApproval { .. } => {
                return Err(GroupError::BadWelcome(
                    "the member still holds the request for approval".into(),
                ));
            }
            JoinResponse::Accepted {
                welcome,
                group_name,
            } => (welcome, group_name, None),
            JoinResponse::Admitted {
                welcome,
                group_name,
                commit,
            } => (welcome, group_name, Some(commit)),
        };
        let source = WelcomeSource {
            group: invite.group,
            fallback_name: invite.group_name.clone(),
            fallback_sender: invite.inviter,
            link: Some(invite.link().to_owned()),
        };
        self.install_welcome(&source, welcome_bytes, group_name, commit, now_ms)
    }

    /// Sets up a group from a Welcome. If this node is joining the group again (its state
    /// is a dead branch), the old state is replaced, and comes back if anything fails.
    fn install_welcome(
        &mut self,
        source: &WelcomeSource,
        welcome_bytes: Vec<u8>,
        group_name: String,
        commit: Option<MessageId>,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let group = source.group;
        let old = match self.groups.get(&group) {
            Some(g) if g.rejoining => {
                let epoch = g.epoch();
                checkpoint(&self.provider, group, epoch)?;
                self.provider
                    .storage()
                    .replace_group_records(&group, &[])
                    .map_err(mls_err)?;
                self.groups.remove(&group).map(|g| (g, epoch))
            }
            Some(_) => return Err(GroupError::AlreadyMember(group)),
            None => None,
        };
        let mut joined = self.welcome(source, welcome_bytes, group_name, commit, now_ms);
        match (&mut joined, old) {
            (Err(_), Some((g, epoch))) => {
                let storage = self.provider.storage();
                let _ = fork::restore_checkpoint(storage, &group, epoch);
                let _ = fork::delete_checkpoint(storage, &group, epoch);
                self.groups.insert(group, g);
            }
            (Ok((_, effects)), Some((old, _))) => {
                // The fork counters describe this node's history with the group: keep them.
                // Envelopes held for later epochs may be the winning branch's next commits.
                if let Some(g) = self.groups.get_mut(&group) {
                    g.rollbacks = old.rollbacks;
                    g.deep_forks = old.deep_forks;
                    for p in old.pending {
                        hold_pending(g, p.epoch, &p.bytes);
                    }
                    for p in old.orphans {
                        hold_orphan(g, p.epoch, &p.bytes);
                    }
                    g.retry = true;
                }
                self.drain_pending(group, now_ms, effects, Source::Held);
                self.settle(now_ms, effects);
            }
            _ => {}
        }
        joined
    }

    /// Sets up the group from a member's Welcome (see [`GroupEngine::handle_join_response`]).
    fn welcome(
        &mut self,
        source: &WelcomeSource,
        welcome_bytes: Vec<u8>,
        group_name: String,
        commit: Option<MessageId>,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome_bytes.as_slice())
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(GroupError::BadWelcome("not a Welcome message".into()));
        };
        let staged = StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, None)
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        let sender = staged
            .welcome_sender()
            .ok()
            .and_then(|leaf| bound_peer(leaf.credential(), leaf.signature_key().as_slice()));
        let mls = staged
            .into_group(&self.provider)
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        if mls.group_id().as_slice() != source.group.as_bytes() {
            // Not the group we were invited to: undo.
            let mut mls = mls;
            let _ = mls.delete(self.provider.storage());
            return Err(GroupError::BadWelcome(
                "the Welcome is for a different group than the invite".into(),
            ));
        }
        let id = source.group;
        let mut name = if group_name.len() <= MAX_GROUP_NAME_BYTES {
            group_name
        } else {
            source.fallback_name.clone()
        };
        if name.trim().is_empty() {
            name = source.fallback_name.clone();
        }
        let meta = GroupMeta {
            id,
            name,
            joined_at_ms: now_ms,
        };
        let topic = id.topic(&self.network);
        // Nothing of a previous membership (checkpoints, kept messages) applies any more.
        fork::forget_group(self.provider.storage(), &id).map_err(mls_err)?;
        let since = mls.epoch().as_u64();
        let branch = Branch {
            since,
            applied: Vec::new(),
            joined: commit
                .zip(source.link.clone())
                .map(|(commit, link)| Joined {
                    epoch: since.saturating_sub(1),
                    commit,
                    link,
                    by: sender.map(|p| p.to_bytes()),
                }),
            older: Vec::new(),
        };
        fork::save_branch(self.provider.storage(), &id, &branch).map_err(mls_err)?;
        let group = Group::new(mls, meta.clone(), topic, Some(now_ms), branch);
        let epoch = group.epoch();
        let member_count = group.member_count();
        self.groups.insert(id, group);
        let entry = HistoryEntry {
            group: id,
            id: MessageId::of(&welcome_bytes),
            epoch,
            sender: sender.unwrap_or(source.fallback_sender),
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::Joined(self.me.peer),
        };
        Ok((
            id,
            vec![
                Effect::SaveGroup(meta),
                Effect::Record(entry),
                Effect::EpochChanged {
                    group: id,
                    epoch,
                    member_count,
                },
                Effect::Subscribe(topic),
            ],
        ))
    }

    /// Encrypts and publishes a text message. Returns the history entry for it.
    pub fn send_text(
        &mut self,
        group: GroupId,
        text: &str,
        now_ms: u64,
    ) -> Result<(HistoryEntry, Vec<Effect>), GroupError> {
        if text.is_empty() || text.len() > MAX_TEXT_BYTES {
            return Err(GroupError::InvalidInput(format!(
                "text must be 1 to {MAX_TEXT_BYTES} bytes"
            )));
        }
        let epoch = active_group(&mut self.groups, group)?.epoch();
        self.sent_seq += 1;
        let stable = MessageId(crate::ids::hash_parts(&[
            b"kith/msg",
            group.as_bytes(),
            &self.me.peer.to_bytes(),
            &epoch.to_be_bytes(),
            &now_ms.to_be_bytes(),
            &self.sent_seq.to_be_bytes(),
            text.as_bytes(),
        ]));
        self.send_content(group, stable, now_ms, text, now_ms)
    }

    /// Encrypts `text` under the stable id `stable` in the current epoch and keeps it for
    /// re-sending until its epoch can no longer be rolled back.
    fn send_content(
        &mut self,
        group: GroupId,
        stable: MessageId,
        sent_at_ms: u64,
        text: &str,
        now_ms: u64,
    ) -> Result<(HistoryEntry, Vec<Effect>), GroupError> {
        let g = active_group(&mut self.groups, group)?;
        let content = AppContent::V2(AppContentV2 {
            id: stable,
            sent_at_ms,
            body: Body::Text(text.to_owned()),
        });
        let (epoch, data, id) = encrypt_app(&self.provider, &self.me.signer, group, g, &content)?;
        fork::save_sent(
            self.provider.storage(),
            &group,
            &Sent {
                epoch,
                id: stable,
                sent_at_ms,
                text: text.to_owned(),
            },
        )
        .map_err(mls_err)?;
        let entry = HistoryEntry {
            group,
            id: text_history_id(&self.me.peer, &stable),
            epoch,
            sender: self.me.peer,
            sent_at_ms,
            received_at_ms: now_ms,
            kind: EntryKind::Text(text.to_owned()),
        };
        Ok((
            entry.clone(),
            vec![
                Effect::SaveEnvelope(StoredEnvelope {
                    id,
                    group,
                    epoch,
                    kind: PayloadKind::Application,
                    bytes: data.clone(),
                    received_at_ms: now_ms,
                }),
                Effect::LinkEnvelope {
                    envelope: id,
                    history: entry.id,
                },
                Effect::Record(entry),
                Effect::Publish {
                    topic: g.topic,
                    data,
                },
            ],
        ))
    }

    /// Removes `peer` from `group`: commits a Remove, merges it and publishes the commit. The
    /// removed member cannot read anything sent after it. To remove yourself, use
    /// [`GroupEngine::leave_group`].
    pub fn remove_member(
        &mut self,
        group: GroupId,
        peer: PeerId,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        if peer == self.me.peer {
            return Err(GroupError::InvalidInput(
                "cannot remove yourself; leave the group instead".into(),
            ));
        }
        let g = active_group(&mut self.groups, group)?;
        let leaf = g
            .mls
            .members()
            .find(|m| member_peer(m) == Some(peer))
            .map(|m| m.index)
            .ok_or(GroupError::UnknownMember(peer))?;
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        let (commit, _, _) = match g
            .mls
            .remove_members(&self.provider, &self.me.signer, &[leaf])
        {
            Ok(x) => x,
            Err(e) => {
                let _ = g.mls.clear_pending_commit(self.provider.storage());
                return Err(mls_err(e));
            }
        };
        merge_own_commit(
            &self.provider,
            self.me.peer,
            group,
            g,
            commit,
            old_epoch,
            OwnChange::Remove(peer.to_bytes()),
            now_ms,
        )
    }

    /// Asks to leave `group`: publishes a proposal to remove this node, which another member
    /// must commit (MLS members cannot commit their own removal). The remaining member with
    /// the lowest leaf index commits it when it receives the proposal; until this node sees
    /// that commit it is *leaving*: it sends nothing more to the group. If that member is
    /// offline, the leave waits until it comes back.
    pub fn leave_group(&mut self, group: GroupId, now_ms: u64) -> Result<Vec<Effect>, GroupError> {
        let g = active_group(&mut self.groups, group)?;
        if g.member_count() < 2 {
            return Err(GroupError::InvalidInput(
                "you are the only member; nobody could commit your leaving".into(),
            ));
        }
        let epoch = g.epoch();
        let proposal = g
            .mls
            .leave_group(&self.provider, &self.me.signer)
            .map_err(mls_err)?;
        g.leaving = true;
        let mls = proposal.tls_serialize_detached().map_err(mls_err)?;
        let (data, id) = Envelope::new(group, epoch, PayloadKind::Proposal, mls)
            .encode()
            .map_err(mls_err)?;
        Ok(vec![
            Effect::SaveEnvelope(StoredEnvelope {
                id,
                group,
                epoch,
                kind: PayloadKind::Proposal,
                bytes: data.clone(),
                received_at_ms: now_ms,
            }),
            Effect::Publish {
                topic: g.topic,
                data,
            },
        ])
    }

    /// Commits a fresh leaf key for this node in `group` (post-compromise security), merges it
    /// and publishes the commit. Pending self-removal proposals of others are committed too.
    pub fn self_update(&mut self, group: GroupId, now_ms: u64) -> Result<Vec<Effect>, GroupError> {
        let g = active_group(&mut self.groups, group)?;
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        let bundle = match g.mls.self_update(
            &self.provider,
            &self.me.signer,
            LeafNodeParameters::default(),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = g.mls.clear_pending_commit(self.provider.storage());
                return Err(mls_err(e));
            }
        };
        let (commit, _, _) = bundle.into_contents();
        merge_own_commit(
            &self.provider,
            self.me.peer,
            group,
            g,
            commit,
            old_epoch,
            OwnChange::Update,
            now_ms,
        )
    }

    /// The active groups where this node is due a self-update under `policy`. Call it on a
    /// timer and [`GroupEngine::self_update`] each. Counters live in memory: after a load,
    /// the time counts from the first call and the message count from zero.
    pub fn due_self_updates(&mut self, now_ms: u64, policy: UpdatePolicy) -> Vec<GroupId> {
        let mut due = Vec::new();
        for (id, g) in &mut self.groups {
            if !g.mls.is_active() || g.leaving {
                continue;
            }
            let since = *g.last_update_ms.get_or_insert(now_ms);
            if g.sent_since_update >= policy.after_messages
                || now_ms.saturating_sub(since) >= policy.after_ms
            {
                due.push(*id);
            }
        }
        due
    }

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

    /// Starts holding live envelopes of `group` while history sync fetches older ones
    /// (`now_ms` starts the hold's clock, see [`GroupEngine::stale_catch_ups`], unless it is
    /// already holding).
    ///
    /// Why: MLS keeps the keys of skipped generations only for a bounded window per sender
    /// ([`OUT_OF_ORDER_TOLERANCE`]). A node coming back that decrypted a live message first
    /// would move each sender's ratchet past the window, and the older messages sync then
    /// brings could no longer be decrypted. Holding live envelopes (bounded like future-epoch
    /// ones; what falls out is fetched again by sync) and processing them after the fetched
    /// ones keeps every sender's messages in generation order.
    pub fn begin_catch_up(&mut self, group: &GroupId, now_ms: u64) {
        if let Some(g) = self.groups.get_mut(group) {
            g.catching_up.get_or_insert(now_ms);
        }
    }

    /// Holds the live envelopes of every group until a history sync has caught up: after a
    /// start, or after the machine slept, this node may have missed anything.
    pub fn begin_catch_up_all(&mut self, now_ms: u64) {
        for g in self.groups.values_mut() {
            g.catching_up.get_or_insert(now_ms);
        }
    }

    /// Ends a catch-up of `group` after a complete history sync: processes the envelopes
    /// held meanwhile (those whose epoch has been reached, in arrival order) and returns
    /// their effects. They are read with the position guard on: one that would still move
    /// its sender's ratchet too far past a missing message (gossip delivered it late, after
    /// newer ones) goes back to the front of the hold, the catch-up goes on and
    /// [`Effect::Behind`] asks for another sync. Otherwise positions still missing are not
    /// waited for any longer (no member reached had them).
    pub fn end_catch_up(&mut self, group: &GroupId, now_ms: u64) -> Vec<Effect> {
        self.finish_catch_up(group, now_ms, Source::Drained)
    }

    /// Ends a catch-up of `group` that ran out of time: processes everything held, in
    /// arrival order, without the position guard.
    pub fn end_catch_up_now(&mut self, group: &GroupId, now_ms: u64) -> Vec<Effect> {
        self.finish_catch_up(group, now_ms, Source::Held)
    }

    fn finish_catch_up(&mut self, group: &GroupId, now_ms: u64, source: Source) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(g) = self.groups.get_mut(group)
            && let Some(since) = g.catching_up.take()
        {
            self.drain_since = Some(since);
            self.drain_pending(*group, now_ms, &mut effects, source);
            self.drain_since = None;
            self.settle(now_ms, &mut effects);
            if let Some(g) = self.groups.get_mut(group)
                && g.catching_up.is_none()
            {
                g.tracks.forgive();
            }
        }
        effects
    }

    /// Whether `group` is catching up (see [`GroupEngine::begin_catch_up`]).
    pub fn is_catching_up(&self, group: &GroupId) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.catching_up.is_some())
    }

    /// Groups that have held live envelopes for `limit_ms` or longer: the caller ends their
    /// catch-up ([`GroupEngine::end_catch_up`]) so a sync that cannot finish does not keep
    /// the group silent.
    pub fn stale_catch_ups(&self, now_ms: u64, limit_ms: u64) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| {
                g.catching_up
                    .is_some_and(|since| now_ms.saturating_sub(since) >= limit_ms)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Positions of senders that this node knows it has not received, in `group`.
    pub fn missing_messages(&self, group: &GroupId) -> u64 {
        self.groups.get(group).map_or(0, |g| g.tracks.missing())
    }

    fn process(
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
        if g.lost.is_some() {
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
        let verdict = if envelope.kind() == PayloadKind::Commit && envelope.epoch() < epoch {
            self.consider_rival(group_id, &envelope, id, message, bytes, now_ms, effects)
        } else if !g.mls.is_active() {
            return Verdict::Ignore(IgnoreReason::Removed);
        } else if envelope.kind() == PayloadKind::Application {
            self.process_application(
                group_id, &envelope, id, message, bytes, now_ms, effects, source,
            )
        } else {
            self.process_mls(group_id, &envelope, id, message, bytes, now_ms, effects)
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
    #[allow(clippy::too_many_arguments)]
    fn process_application(
        &mut self,
        group_id: GroupId,
        envelope: &Envelope,
        id: MessageId,
        message: ProtocolMessage,
        bytes: &[u8],
        now_ms: u64,
        effects: &mut Vec<Effect>,
        source: Source,
    ) -> Verdict {
        let savepoint = self.provider.storage().savepoint();
        let mark = effects.len();
        self.decrypted = None;
        self.ahead = false;
        let verdict = self.process_mls(group_id, envelope, id, message, bytes, now_ms, effects);
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

    /// A commit for an epoch this node has already left: a rival of the commit it merged
    /// there. The lowest envelope id wins; if the rival wins, roll back and take it.
    #[allow(clippy::too_many_arguments)]
    fn consider_rival(
        &mut self,
        group_id: GroupId,
        envelope: &Envelope,
        id: MessageId,
        message: ProtocolMessage,
        bytes: &[u8],
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let e = envelope.epoch();
        if let Some(j) = &g.branch.joined
            && e == j.epoch
            && id != j.commit
        {
            if id < j.commit && !g.rejoining && g.lost.is_none() {
                tracing::warn!(
                    group = %group_id.short(),
                    epoch = e,
                    "the commit that added this node lost to a concurrent one; joining again"
                );
                g.rejoining = true;
                effects.push(Effect::JoinLost {
                    group: group_id,
                    link: j.link.clone(),
                    by: j.by.as_deref().and_then(|b| PeerId::from_bytes(b).ok()),
                });
            }
            return Verdict::Ignore(IgnoreReason::RivalOfJoin { epoch: e });
        }
        let ours = match g.branch.at(e) {
            Some(a) => a.commit,
            None => {
                // Commits of the other branch after the split also look like rivals; only the
                // lowest epoch seen decides (history sync sends commits in epoch order).
                let split = g.deep_rival.is_none_or(|r| e < r);
                if split && e >= g.branch.since {
                    g.deep_rival = Some(e);
                    let ours = g.branch.older.iter().find(|(x, _)| *x == e).map(|x| x.1);
                    if ours.is_none_or(|ours| id < ours) {
                        g.deep_forks += 1;
                        tracing::warn!(
                            group = %group_id.short(),
                            epoch = e,
                            "a rival commit for an epoch beyond the rewind window: deep fork"
                        );
                    }
                    // Our branch lost further back than we can roll back: be added again by a
                    // member of the winning branch (it checks it holds this commit).
                    if ours.is_some_and(|ours| id < ours)
                        && !g.rejoining
                        && g.lost.is_none()
                        && g.mls.is_active()
                    {
                        g.rejoining = true;
                        let me = self.me.peer;
                        effects.push(Effect::DeepForkLost {
                            group: group_id,
                            epoch: e,
                            commit: id,
                            members: g
                                .view()
                                .members
                                .into_iter()
                                .map(|(_, p)| p)
                                .filter(|p| *p != me)
                                .collect(),
                        });
                    }
                }
                return Verdict::Ignore(IgnoreReason::BeyondRewind { epoch: e });
            }
        };
        if ours == id {
            return Verdict::Ignore(IgnoreReason::AlreadyMerged);
        }
        if ours < id {
            hold_orphan(g, e, bytes);
            return Verdict::Ignore(IgnoreReason::LosingCommit {
                epoch: e,
                winner: ours,
            });
        }
        self.switch_branch(group_id, envelope, id, message, bytes, now_ms, effects)
    }

    /// Rolls `group_id` back to the epoch of `envelope` and merges its commit, if it is valid
    /// there; otherwise leaves the group as it was. On success the lost commits and own
    /// messages are redone by [`GroupEngine::settle`].
    #[allow(clippy::too_many_arguments)]
    fn switch_branch(
        &mut self,
        group_id: GroupId,
        envelope: &Envelope,
        id: MessageId,
        message: ProtocolMessage,
        bytes: &[u8],
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let e = envelope.epoch();
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let cur = g.epoch();
        let was_leaving = g.leaving;
        let tip_members: Vec<PeerId> = g.mls.members().filter_map(|m| member_peer(&m)).collect();
        let storage = self.provider.storage();
        if let Err(err) = checkpoint(&self.provider, group_id, cur) {
            return Verdict::Ignore(IgnoreReason::Failed {
                step: Step::CheckpointBeforeRollback,
                detail: err.to_string(),
            });
        }
        let restored = fork::restore_checkpoint(storage, &group_id, e)
            .map_err(mls_err)
            .and_then(|found| {
                if !found {
                    return Err(GroupError::Mls(format!("no checkpoint for epoch {e}")));
                }
                load_mls(storage, &group_id)
            });
        match restored {
            Ok(mls) => {
                g.leaving = was_leaving || self_remove_pending(&mls);
                g.mls = mls;
            }
            Err(err) => {
                let _ = put_back(&self.provider, group_id, g, cur, was_leaving);
                return Verdict::Ignore(IgnoreReason::Failed {
                    step: Step::RollBack { epoch: e },
                    detail: err.to_string(),
                });
            }
        }
        let lost: Vec<Applied> = g
            .branch
            .applied
            .iter()
            .filter(|a| a.epoch >= e)
            .cloned()
            .collect();
        let saved_branch = g.branch.clone();
        // Members at the fork point that the losing branch had removed.
        let excluded: Vec<PeerId> = g
            .mls
            .members()
            .filter_map(|m| member_peer(&m))
            .filter(|p| !tip_members.contains(p))
            .collect();
        let mut fx = Vec::new();
        let verdict = self.process_mls(group_id, envelope, id, message, bytes, now_ms, &mut fx);
        let Some(g) = self.groups.get_mut(&group_id) else {
            return verdict;
        };
        if verdict != Verdict::Accept {
            // Not valid on our branch at that epoch: it belongs to another branch. Keep ours.
            g.branch = saved_branch;
            if let Err(err) = put_back(&self.provider, group_id, g, cur, was_leaving) {
                tracing::error!(group = %group_id.short(), "cannot restore the branch: {err}");
            }
            hold_orphan(g, e, bytes);
            return Verdict::Ignore(IgnoreReason::OtherBranch { epoch: e });
        }
        let storage = self.provider.storage();
        for a in lost.iter().filter(|a| a.epoch > e) {
            let _ = fork::delete_checkpoint(storage, &group_id, a.epoch);
        }
        let _ = fork::delete_checkpoint(storage, &group_id, cur);
        g.rollbacks += 1;
        // Positions seen on the losing branch say nothing about the winning one.
        g.tracks = Tracks::default();
        g.retry = true;
        tracing::info!(
            group = %group_id.short(),
            from = cur,
            to = e,
            winner = %id.short(),
            "left a losing branch"
        );
        let lost_commits: Vec<MessageId> = lost.iter().map(|a| a.commit).collect();
        let mut forget_history = lost_commits.clone();
        forget_history.extend(lost_commits.iter().map(removal_id));
        effects.push(Effect::RolledBack {
            group: group_id,
            to_epoch: e,
            lost_commits,
            forget_history,
        });
        // Invite uses counted by the lost commits no longer count.
        for id in lost.iter().filter_map(|a| a.invite) {
            effects.push(Effect::Invite(InviteUpdate::Unused {
                group: group_id,
                id,
            }));
        }
        effects.extend(fx);
        // The messages this node encrypted on the lost branch; one rolled back earlier and
        // not re-sent yet is now listed here only.
        let messages = fork::sent_after(self.provider.storage(), &group_id, e).unwrap_or_else(|err| {
            tracing::warn!(group = %group_id.short(), "cannot read own messages to re-send: {err}");
            Vec::new()
        });
        for r in &mut g.redo {
            r.messages
                .retain(|m| !messages.iter().any(|n| n.id == m.id));
        }
        g.redo.push(Redo {
            lost,
            messages,
            excluded,
        });
        Verdict::Accept
    }

    /// After envelopes were handled: while a rollback happened, retries the orphans (they may
    /// belong to the winning branch), then redoes what the lost branch did of this node's
    /// own: its messages are re-sent, its changes proposed again.
    fn settle(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        // Each pass either changes nothing or moves a group to a branch whose commit at some
        // epoch has a lower id than before; the commits seen are finite, so this ends.
        while let Some(gid) = self.groups.iter().find(|(_, g)| g.retry).map(|(id, _)| *id) {
            let Some(g) = self.groups.get_mut(&gid) else {
                break;
            };
            g.retry = false;
            let orphans = std::mem::take(&mut g.orphans);
            g.orphan_bytes = 0;
            for o in orphans {
                let _ = self.process(&o.bytes, now_ms, effects, Source::Synced);
            }
        }
        let todo: Vec<(GroupId, Vec<Redo>)> = self
            .groups
            .iter_mut()
            .filter(|(_, g)| !g.redo.is_empty())
            .map(|(id, g)| (*id, std::mem::take(&mut g.redo)))
            .collect();
        for (gid, redo) in todo {
            for r in redo {
                match self.redo_lost(gid, r, now_ms, effects) {
                    Ok(Some(waiting)) => {
                        if let Some(g) = self.groups.get_mut(&gid) {
                            g.redo.push(waiting);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(group = %gid.short(), "cannot redo work of a lost branch: {e}")
                    }
                }
            }
        }
    }

    /// Proposes this node's lost changes again, in the order it first made them, then
    /// re-sends its lost messages: removals first, so a message written after a member's
    /// removal is never encrypted to that member. If a member removed on the lost branch is
    /// still in the group (another member's removal, not re-proposed yet), the messages wait:
    /// the returned [`Redo`] is tried again after the next envelope.
    fn redo_lost(
        &mut self,
        gid: GroupId,
        redo: Redo,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<Option<Redo>, GroupError> {
        let Some(g) = self.groups.get(&gid) else {
            return Ok(None);
        };
        if !g.mls.is_active() || g.leaving {
            return Ok(None);
        }
        for a in &redo.lost {
            match &a.own {
                Some(OwnChange::Update) => effects.extend(self.self_update(gid, now_ms)?),
                Some(OwnChange::Remove(peer)) => {
                    let Ok(peer) = PeerId::from_bytes(peer) else {
                        continue;
                    };
                    let still = self
                        .group(&gid)
                        .is_some_and(|v| v.members.iter().any(|(_, p)| *p == peer));
                    if still {
                        effects.extend(self.remove_member(gid, peer, now_ms)?);
                    }
                }
                Some(OwnChange::Add { .. }) => {
                    // The joiner holds a Welcome into the losing branch; re-adding it needs a
                    // new Welcome delivered to it (not implemented yet: it must join again).
                    tracing::warn!(group = %gid.short(), "a member this node added was on a losing branch");
                }
                Some(OwnChange::Proposals) | None => {}
            }
        }
        let members = self.group(&gid).map(|v| v.members).unwrap_or_default();
        let back: Vec<PeerId> = redo
            .excluded
            .iter()
            .copied()
            .filter(|p| members.iter().any(|(_, m)| m == p))
            .collect();
        if !back.is_empty() && !redo.messages.is_empty() {
            tracing::info!(
                group = %gid.short(),
                messages = redo.messages.len(),
                "re-sending lost messages once the members removed on the lost branch are removed again"
            );
            return Ok(Some(Redo {
                lost: Vec::new(),
                messages: redo.messages,
                excluded: back,
            }));
        }
        for m in redo.messages {
            fork::delete_sent(self.provider.storage(), &gid, &m).map_err(mls_err)?;
            let (_, fx) = self.send_content(gid, m.id, m.sent_at_ms, &m.text, now_ms)?;
            effects.extend(fx);
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn process_mls(
        &mut self,
        group_id: GroupId,
        envelope: &Envelope,
        id: MessageId,
        message: ProtocolMessage,
        bytes: &[u8],
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
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
                let history_id = content
                    .stable_id()
                    .map_or(id, |s| text_history_id(&sender, &s));
                let sent_at_ms = content.sent_at_ms();
                let text = match content.into_body() {
                    Body::Text(text) => text,
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
                effects.push(Effect::SaveEnvelope(stored));
                effects.push(Effect::LinkEnvelope {
                    envelope: id,
                    history: history_id,
                });
                effects.push(Effect::Record(HistoryEntry {
                    group: group_id,
                    id: history_id,
                    epoch: envelope.epoch(),
                    sender,
                    sent_at_ms,
                    received_at_ms: now_ms,
                    kind: EntryKind::Text(text),
                }));
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
                if let Err(e) = checkpoint(&self.provider, group_id, current) {
                    return Verdict::Ignore(IgnoreReason::Failed {
                        step: Step::CheckpointBeforeMerge,
                        detail: e.to_string(),
                    });
                }
                if let Err(e) = g.mls.merge_staged_commit(&self.provider, *staged) {
                    return Verdict::Reject(RejectReason::Merge(e.to_string()));
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
                    g.leaving = false;
                    effects.push(Effect::Unsubscribe(g.topic));
                } else if g.leaving {
                    // Another commit won this epoch and dropped our self-removal proposal:
                    // propose it again in the new epoch.
                    g.leaving = false;
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
                if g.leaving || !g.mls.is_active() {
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

    /// Processes held envelopes whose epoch has been reached, oldest first.
    fn drain_pending(
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
            let _ = self.process(&p.bytes, now_ms, effects, source);
        }
    }

    /// Drops past epochs' secrets that ended more than `older_than` ago, in every group.
    /// Call it periodically; the caller persists the resulting storage writes.
    pub fn expire_past_epochs(
        &mut self,
        older_than: std::time::Duration,
    ) -> Result<(), GroupError> {
        for g in self.groups.values_mut() {
            g.mls
                .delete_past_epoch_secrets(
                    &self.provider,
                    openmls::prelude::PastEpochDeletion::older_than_duration(older_than)
                        .max_past_epochs(MAX_PAST_EPOCHS),
                )
                .map_err(mls_err)?;
        }
        Ok(())
    }

    /// Compares the commits a member holds (`(epoch, commit id)`, from its sync summary) with
    /// this node's branch. Returns the first epoch where they differ, and counts it: the
    /// member and this node are on different branches. History sync then brings each side
    /// the other's commits, and the concurrent-commit rule decides.
    pub fn detect_fork(
        &mut self,
        group: &GroupId,
        held: impl IntoIterator<Item = (u64, MessageId)>,
    ) -> Option<u64> {
        let g = self.groups.get_mut(group)?;
        let epoch = held
            .into_iter()
            .find(|(e, c)| g.branch.commit_at(*e).is_some_and(|ours| ours != *c))
            .map(|(e, _)| e)?;
        g.forks_detected += 1;
        Some(epoch)
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

/// The group, if this node may still send to it.
fn active_group(
    groups: &mut BTreeMap<GroupId, Group>,
    group: GroupId,
) -> Result<&mut Group, GroupError> {
    let g = groups
        .get_mut(&group)
        .ok_or(GroupError::UnknownGroup(group))?;
    if !g.mls.is_active() || g.lost.is_some() {
        return Err(GroupError::Inactive(group));
    }
    if g.leaving {
        return Err(GroupError::Leaving(group));
    }
    Ok(g)
}

/// Keeps an envelope that does not apply to this node's branch, in case a rollback makes it
/// applicable (bounded; when full, the newest is not kept).
fn hold_orphan(g: &mut Group, epoch: u64, bytes: &[u8]) {
    if g.orphans.iter().any(|p| p.bytes == bytes) {
        return;
    }
    // When full, the newest is not kept (as in `hold_pending`): after a switch to its
    // branch the kept ones are read first, and sync brings the rest after them.
    if g.orphans.len() >= MAX_ORPHANS_PER_GROUP
        || g.orphan_bytes + bytes.len() > MAX_ORPHAN_BYTES_PER_GROUP
    {
        return;
    }
    g.orphan_bytes += bytes.len();
    g.orphans.push_back(Pending {
        epoch,
        bytes: bytes.to_vec(),
    });
}

/// Where a Welcome comes from: the group it must be for, what to show if the member's answer
/// lacks a name or sender, and the link (for a join by invite).
struct WelcomeSource {
    group: GroupId,
    fallback_name: String,
    fallback_sender: PeerId,
    link: Option<String>,
}

/// Loads a group's MLS state from storage.
fn load_mls<
    S: openmls_traits::storage::StorageProvider<{ openmls_traits::storage::CURRENT_VERSION }>,
>(
    storage: &S,
    group: &GroupId,
) -> Result<MlsGroup, GroupError> {
    let mls_id = openmls::group::GroupId::from_slice(group.as_bytes());
    MlsGroup::load(storage, &mls_id)
        .map_err(mls_err)?
        .ok_or_else(|| GroupError::Mls("group state missing after restore".into()))
}

/// Undoes a rollback attempt: puts back the state saved at `cur` and drops that checkpoint.
fn put_back<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    g: &mut Group,
    cur: u64,
    was_leaving: bool,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let storage = provider.storage();
    fork::restore_checkpoint(storage, &group, cur).map_err(mls_err)?;
    g.mls = load_mls(storage, &group)?;
    g.leaving = was_leaving;
    fork::delete_checkpoint(storage, &group, cur).map_err(mls_err)
}

/// Holds a live envelope that came before messages of its sender this node lacks, starts
/// holding the group's other live envelopes too (a catch-up from `now_ms`), and returns the
/// effect that asks the node to fetch the gap.
fn hold_behind(g: &mut Group, epoch: u64, bytes: &[u8], now_ms: u64, missing: u64) -> Effect {
    hold_pending(g, epoch, bytes);
    g.catching_up.get_or_insert(now_ms);
    Effect::Behind {
        group: g.meta.id,
        missing,
    }
}

/// Holds an envelope until its epoch is reached or a catch-up ends (bounded by
/// [`MAX_PENDING_PER_GROUP`] and [`MAX_PENDING_BYTES_PER_GROUP`]). When full, the newest is
/// not kept: what is held is older and will be read first, and a sender's messages that
/// did not fit come after them, so history sync (or the gap they leave in the sender's
/// positions) brings them later, still in order. Dropping the oldest instead would let the
/// newer ones move the sender's ratchet past them.
fn hold_pending(g: &mut Group, epoch: u64, bytes: &[u8]) {
    if g.pending.iter().any(|p| p.bytes == bytes) {
        return;
    }
    if g.pending.len() >= MAX_PENDING_PER_GROUP
        || g.pending_bytes + bytes.len() > MAX_PENDING_BYTES_PER_GROUP
    {
        tracing::debug!(
            group = %g.meta.id.short(),
            held = g.pending.len(),
            "too many envelopes held; this one is left for history sync"
        );
        return;
    }
    g.pending_bytes += bytes.len();
    g.pending.push_back(Pending {
        epoch,
        bytes: bytes.to_vec(),
    });
}

mod invites;
mod rejoin;
mod verdict;
pub use invites::{CommitNote, NewInvite};
pub use verdict::{IgnoreReason, RejectReason, Step, Verdict};

#[cfg(test)]
mod fork_tests;
#[cfg(test)]
mod order_tests;
#[cfg(test)]
mod tests;
