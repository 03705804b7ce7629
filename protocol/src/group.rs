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
use multiaddr::Multiaddr;
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage, KeyPackageIn, LeafNodeIndex,
    LeafNodeParameters, Member, MlsGroup, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn,
    MlsMessageOut, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY, ProcessedMessageContent, Proposal,
    ProtocolMessage, ProtocolVersion, Sender, SenderRatchetConfiguration, StagedWelcome,
    tls_codec::{Deserialize as _, Serialize as _},
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;

use crate::codec;
use crate::envelope::{
    AppContent, AppContentV1, Body, Envelope, JoinRejection, JoinRequest, JoinRequestV1,
    JoinResponse, MAX_GROUP_NAME_BYTES, MAX_TEXT_BYTES, PayloadKind,
};
use crate::ids::{GroupId, MessageId, TopicId};
use crate::invite::{Invite, InviteError, InviteParams, InviteRecord, secret_hash};
use crate::records::{EntryKind, GroupMeta, HistoryEntry, StoredEnvelope};

/// The one ciphersuite Kith uses: X25519, AES-128-GCM, SHA-256, Ed25519 (RFC 9420 §17.1).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// How many past epochs' secrets are kept so late application messages still decrypt.
pub const MAX_PAST_EPOCHS: usize = 2;
/// Past epochs' secrets are dropped this long after the epoch ended (see
/// [`GroupEngine::expire_past_epochs`]). openmls rewrites every retained epoch's secrets on
/// each message, so stale epochs cost on every message; this keeps the window for late
/// messages while making steady-state messages cheap.
pub const PAST_EPOCH_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Envelopes for future epochs held per group until the commits before them arrive.
pub const MAX_PENDING_PER_GROUP: usize = 1024;
/// Bytes of such envelopes held per group.
pub const MAX_PENDING_BYTES_PER_GROUP: usize = 8 * 1024 * 1024;
/// Messages from one sender may arrive this far out of order and still decrypt.
const OUT_OF_ORDER_TOLERANCE: u32 = 64;
/// A sender may skip this many of its own generations (lost messages) and still be read.
const MAX_FORWARD_DISTANCE: u32 = 5000;
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

/// The gossip validation result for a received envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: processed, forward it.
    Accept,
    /// Invalid: garbage or forged; do not forward, penalise the source.
    Reject(String),
    /// Cannot judge (not our group, future epoch, duplicate): do not forward, no penalty.
    Ignore(String),
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
    /// Upsert an invite record.
    SaveInvite(InviteRecord),
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
}

struct Pending {
    epoch: u64,
    bytes: Vec<u8>,
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
}

struct Group {
    mls: MlsGroup,
    meta: GroupMeta,
    topic: TopicId,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// A history sync is fetching older envelopes: live ones are held until it ends (see
    /// [`GroupEngine::begin_catch_up`]).
    catching_up: bool,
    /// This node proposed its own removal (see [`GroupEngine::leave_group`]).
    leaving: bool,
    /// Own application messages since this node's last own commit.
    sent_since_update: u64,
    /// When this node last committed in the group; `None` until first seen by
    /// [`GroupEngine::due_self_updates`] after a load.
    last_update_ms: Option<u64>,
}

impl Group {
    fn new(mls: MlsGroup, meta: GroupMeta, topic: TopicId, now_ms: Option<u64>) -> Self {
        let me = mls.own_leaf_index();
        // A self-removal proposal survives restarts in the MLS proposal store.
        let leaving = mls.is_active() && mls.pending_proposals().any(|p| is_self_remove(p, me));
        Group {
            mls,
            meta,
            topic,
            pending: VecDeque::new(),
            pending_bytes: 0,
            catching_up: false,
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
            active: self.mls.is_active(),
            leaving: self.leaving,
            members: self
                .mls
                .members()
                .filter_map(|m| Some((m.index.u32(), member_peer(&m)?)))
                .collect(),
        }
    }

    fn member_count(&self) -> usize {
        self.mls.members().count()
    }
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
fn merge_own_commit<P: OpenMlsProvider>(
    provider: &P,
    me: PeerId,
    group: GroupId,
    g: &mut Group,
    commit: MlsMessageOut,
    old_epoch: u64,
    now_ms: u64,
) -> Result<Vec<Effect>, GroupError> {
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

/// The history id of the removals in the commit envelope `commit`.
fn removal_id(commit: &MessageId) -> MessageId {
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
}

impl<P: OpenMlsProvider> GroupEngine<P> {
    /// A new engine with no groups loaded.
    pub fn new(provider: P, me: Identity, network: impl Into<String>) -> Self {
        GroupEngine {
            provider,
            me,
            network: network.into(),
            groups: BTreeMap::new(),
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
                    self.groups
                        .insert(meta.id, Group::new(mls, meta, topic, None));
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
                    if let Some(g) = self.groups.get_mut(&id) {
                        let me = mls.own_leaf_index();
                        g.leaving = mls.is_active()
                            && mls.pending_proposals().any(|p| is_self_remove(p, me));
                        g.mls = mls;
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
        self.groups
            .insert(id, Group::new(mls, meta.clone(), topic, Some(now_ms)));
        Ok(vec![
            Effect::SaveGroup(meta),
            Effect::Record(entry),
            Effect::Subscribe(topic),
        ])
    }

    /// Creates a signed invite to `group` and the record to store for it.
    pub fn create_invite(
        &mut self,
        group: GroupId,
        addrs: Vec<Multiaddr>,
        secret: [u8; 32],
        expires_at: u64,
        max_uses: u32,
        now_ms: u64,
    ) -> Result<(Invite, Vec<Effect>), GroupError> {
        let g = active_group(&mut self.groups, group)?;
        let invite = Invite::create(
            InviteParams {
                network: self.network.clone(),
                group,
                group_name: g.meta.name.clone(),
                addrs,
                secret,
                expires_at,
                max_uses,
            },
            &self.me.keypair,
        )?;
        let record = invite.record(now_ms / 1000);
        Ok((invite, vec![Effect::SaveInvite(record)]))
    }

    /// Makes the join request for `invite`: a fresh key package (its private keys are staged
    /// in storage; the caller commits them before sending).
    pub fn prepare_join(
        &mut self,
        invite: &Invite,
        now_ms: u64,
    ) -> Result<JoinRequest, GroupError> {
        invite.check(&self.network, now_ms / 1000)?;
        if self.groups.contains_key(&invite.group) {
            return Err(GroupError::AlreadyMember(invite.group));
        }
        let bundle = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.me.signer,
                self.me.credential.clone(),
            )
            .map_err(mls_err)?;
        let key_package = bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(mls_err)?;
        Ok(JoinRequest::V1(JoinRequestV1 {
            network: self.network.clone(),
            group: invite.group,
            secret: invite.secret,
            key_package,
        }))
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
        let JoinRequest::V1(req) = request;
        let reject = |r| Ok((JoinResponse::Rejected(r), Vec::new()));
        if req.network != self.network {
            return reject(JoinRejection::WrongNetwork);
        }
        let Some(g) = self.groups.get_mut(&req.group) else {
            return reject(JoinRejection::NotMember);
        };
        if !g.mls.is_active() || g.leaving {
            return reject(JoinRejection::NotMember);
        }
        let Some(mut record) =
            record.filter(|r| r.group == req.group && r.secret_hash == secret_hash(&req.secret))
        else {
            return reject(JoinRejection::UnknownInvite);
        };
        if let Err(r) = record.admits(now_ms / 1000) {
            return reject(r);
        }
        let Ok(kp_in) = KeyPackageIn::tls_deserialize_exact(req.key_package.as_slice()) else {
            return reject(JoinRejection::InvalidKeyPackage);
        };
        let Ok(kp) = kp_in.validate(self.provider.crypto(), ProtocolVersion::Mls10) else {
            return reject(JoinRejection::InvalidKeyPackage);
        };
        let leaf = kp.leaf_node();
        if kp.ciphersuite() != CIPHERSUITE
            || bound_peer(leaf.credential(), leaf.signature_key().as_slice()) != Some(from)
        {
            return reject(JoinRejection::InvalidKeyPackage);
        }
        if g.mls.members().any(|m| member_peer(&m) == Some(from)) {
            return reject(JoinRejection::AlreadyMember);
        }
        let old_epoch = g.epoch();
        let (commit, welcome, _info) = g
            .mls
            .add_members(&self.provider, &self.me.signer, &[kp])
            .map_err(mls_err)?;
        if let Err(e) = g.mls.merge_pending_commit(&self.provider) {
            let _ = g.mls.clear_pending_commit(self.provider.storage());
            return Err(mls_err(e));
        }
        let welcome = welcome.tls_serialize_detached().map_err(mls_err)?;
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        let envelope = Envelope::new(req.group, old_epoch, PayloadKind::Commit, commit);
        let (data, id) = envelope.encode().map_err(mls_err)?;
        record.uses += 1;
        let effects = vec![
            Effect::SaveInvite(record),
            Effect::SaveEnvelope(StoredEnvelope {
                id,
                group: req.group,
                epoch: old_epoch,
                kind: PayloadKind::Commit,
                bytes: data.clone(),
                received_at_ms: now_ms,
            }),
            Effect::Record(HistoryEntry {
                group: req.group,
                id,
                epoch: old_epoch,
                sender: self.me.peer,
                sent_at_ms: now_ms,
                received_at_ms: now_ms,
                kind: EntryKind::MembersAdded(vec![from]),
            }),
            Effect::EpochChanged {
                group: req.group,
                epoch: g.epoch(),
                member_count: g.member_count(),
            },
            Effect::Publish {
                topic: g.topic,
                data,
            },
        ];
        Ok((
            JoinResponse::Accepted {
                welcome,
                group_name: g.meta.name.clone(),
            },
            effects,
        ))
    }

    /// Completes a join with the member's answer. On success this node is a member.
    pub fn handle_join_response(
        &mut self,
        invite: &Invite,
        response: JoinResponse,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let (welcome_bytes, group_name) = match response {
            JoinResponse::Rejected(r) => return Err(GroupError::JoinRejected(r)),
            JoinResponse::Accepted {
                welcome,
                group_name,
            } => (welcome, group_name),
        };
        if self.groups.contains_key(&invite.group) {
            return Err(GroupError::AlreadyMember(invite.group));
        }
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
        if mls.group_id().as_slice() != invite.group.as_bytes() {
            // Not the group we were invited to: undo.
            let mut mls = mls;
            let _ = mls.delete(self.provider.storage());
            return Err(GroupError::BadWelcome(
                "the Welcome is for a different group than the invite".into(),
            ));
        }
        let id = invite.group;
        let mut name = if group_name.len() <= MAX_GROUP_NAME_BYTES {
            group_name
        } else {
            invite.group_name.clone()
        };
        if name.trim().is_empty() {
            name = invite.group_name.clone();
        }
        let meta = GroupMeta {
            id,
            name,
            joined_at_ms: now_ms,
        };
        let topic = id.topic(&self.network);
        let group = Group::new(mls, meta.clone(), topic, Some(now_ms));
        let epoch = group.epoch();
        let member_count = group.member_count();
        self.groups.insert(id, group);
        let entry = HistoryEntry {
            group: id,
            id: MessageId::of(&welcome_bytes),
            epoch,
            sender: sender.unwrap_or(invite.inviter),
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
        let g = active_group(&mut self.groups, group)?;
        let content = AppContent::V1(AppContentV1 {
            sent_at_ms: now_ms,
            body: Body::Text(text.to_owned()),
        });
        let plain = codec::encode(&content).map_err(mls_err)?;
        let epoch = g.epoch();
        let out = g
            .mls
            .create_message(&self.provider, &self.me.signer, &plain)
            .map_err(mls_err)?;
        g.sent_since_update += 1;
        let mls = out.tls_serialize_detached().map_err(mls_err)?;
        let (data, id) = Envelope::new(group, epoch, PayloadKind::Application, mls)
            .encode()
            .map_err(mls_err)?;
        let entry = HistoryEntry {
            group,
            id,
            epoch,
            sender: self.me.peer,
            sent_at_ms: now_ms,
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
        (verdict, effects)
    }

    /// Handles envelope bytes fetched by history sync. Like [`GroupEngine::handle_envelope`],
    /// but never held for a catch-up, and, while the group catches up, an accepted commit
    /// does not release the envelopes held for the new epoch: they wait until
    /// [`GroupEngine::end_catch_up`], after the older envelopes still to be fetched.
    pub fn handle_synced_envelope(&mut self, bytes: &[u8], now_ms: u64) -> (Verdict, Vec<Effect>) {
        let mut effects = Vec::new();
        let verdict = self.process(bytes, now_ms, &mut effects, Source::Synced);
        (verdict, effects)
    }

    /// Starts holding live envelopes of `group` while history sync fetches older ones.
    ///
    /// Why: MLS keeps the keys of skipped generations only for a bounded window per sender
    /// (`OUT_OF_ORDER_TOLERANCE`). A node coming back that decrypted a live message first
    /// would move each sender's ratchet past the window, and the older messages sync then
    /// brings could no longer be decrypted. Holding live envelopes (bounded like future-epoch
    /// ones) and processing them after the fetched ones keeps every sender's messages in
    /// generation order.
    pub fn begin_catch_up(&mut self, group: &GroupId) {
        if let Some(g) = self.groups.get_mut(group) {
            g.catching_up = true;
        }
    }

    /// Ends a catch-up of `group`: processes the envelopes held meanwhile (those whose
    /// epoch has been reached, in arrival order) and returns their effects.
    pub fn end_catch_up(&mut self, group: &GroupId, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(g) = self.groups.get_mut(group)
            && g.catching_up
        {
            g.catching_up = false;
            self.drain_pending(*group, now_ms, &mut effects);
        }
        effects
    }

    /// Whether `group` is catching up (see [`GroupEngine::begin_catch_up`]).
    pub fn is_catching_up(&self, group: &GroupId) -> bool {
        self.groups.get(group).is_some_and(|g| g.catching_up)
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
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        let group_id = envelope.group();
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore("not a member of this group".into());
        };
        if !g.mls.is_active() {
            return Verdict::Ignore("no longer a member of this group".into());
        }
        let epoch = g.epoch();
        if source == Source::Live && g.catching_up {
            hold_pending(g, envelope.epoch(), bytes);
            return Verdict::Ignore("held until history sync has caught up".into());
        }
        if envelope.epoch() > epoch {
            if source != Source::Held {
                hold_pending(g, envelope.epoch(), bytes);
            }
            return Verdict::Ignore(format!(
                "epoch {} is ahead of ours ({epoch}); held",
                envelope.epoch()
            ));
        }
        if envelope.kind() == PayloadKind::Commit && envelope.epoch() < epoch {
            return Verdict::Ignore(format!("commit for past epoch {}", envelope.epoch()));
        }
        let message = match MlsMessageIn::tls_deserialize_exact(envelope.mls())
            .ok()
            .and_then(|m| m.try_into_protocol_message().ok())
        {
            Some(m) => m,
            None => return Verdict::Reject("not an MLS protocol message".into()),
        };
        if message.group_id().as_slice() != group_id.as_bytes()
            || message.epoch().as_u64() != envelope.epoch()
        {
            return Verdict::Reject("envelope header does not match the MLS message".into());
        }
        let id = MessageId::of(bytes);
        let verdict = self.process_mls(group_id, &envelope, id, message, bytes, now_ms, effects);
        if verdict == Verdict::Accept && !self.is_catching_up(&group_id) {
            self.drain_pending(group_id, now_ms, effects);
        }
        verdict
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
            return Verdict::Ignore("not a member of this group".into());
        };
        let current = g.epoch();
        let processed = match g.mls.process_message(&self.provider, message) {
            Ok(p) => p,
            Err(e) if envelope.epoch() < current => {
                return Verdict::Ignore(format!("cannot read message from past epoch: {e}"));
            }
            Err(e) => return Verdict::Reject(format!("MLS processing failed: {e}")),
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
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                // A member removed since (a message from a past epoch) no longer speaks for the
                // group: its leaf is gone or belongs to someone else now.
                let Some(sender) = named_sender.filter(|n| sender == Some(*n)) else {
                    return Verdict::Reject(
                        "application message from a sender who is not a current member".into(),
                    );
                };
                let content = match AppContent::decode(&app.into_bytes()) {
                    Ok(c) => c,
                    Err(e) => return Verdict::Reject(format!("bad application content: {e}")),
                };
                let AppContent::V1(c) = content;
                let Body::Text(text) = c.body;
                effects.push(Effect::SaveEnvelope(stored));
                effects.push(Effect::Record(HistoryEntry {
                    group: group_id,
                    id,
                    epoch: envelope.epoch(),
                    sender,
                    sent_at_ms: c.sent_at_ms,
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
                            return Verdict::Reject(
                                "commit adds a member whose credential is not bound to its key"
                                    .into(),
                            );
                        }
                    }
                }
                let removed = removed_peers(&g.mls, &staged);
                let self_removed = staged.self_removed();
                if let Err(e) = g.mls.merge_staged_commit(&self.provider, *staged) {
                    return Verdict::Reject(format!("cannot merge commit: {e}"));
                }
                let sender = sender.unwrap_or(self.me.peer);
                effects.push(Effect::SaveEnvelope(stored));
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
                            return Verdict::Reject(format!(
                                "cannot re-propose leaving after a commit: {e}"
                            ));
                        }
                    }
                }
                Verdict::Accept
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                // Kith only ever proposes a member's own removal (leaving); any other
                // proposal would be committed by the next commit of an honest member.
                if self_remover(proposal.proposal(), proposal.sender()).is_none() {
                    return Verdict::Reject("only self-removal proposals are accepted".into());
                }
                if let Err(e) = g
                    .mls
                    .store_pending_proposal(self.provider.storage(), *proposal)
                {
                    return Verdict::Ignore(format!("cannot store proposal: {e}"));
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
                    let commit = match g
                        .mls
                        .commit_to_pending_proposals(&self.provider, &self.me.signer)
                    {
                        Ok((commit, _, _)) => commit,
                        Err(e) => {
                            let _ = g.mls.clear_pending_commit(self.provider.storage());
                            return Verdict::Ignore(format!("cannot commit the removal: {e}"));
                        }
                    };
                    match merge_own_commit(
                        &self.provider,
                        self.me.peer,
                        group_id,
                        g,
                        commit,
                        old_epoch,
                        now_ms,
                    ) {
                        Ok(fx) => effects.extend(fx),
                        Err(e) => {
                            return Verdict::Ignore(format!("cannot commit the removal: {e}"));
                        }
                    }
                }
                Verdict::Accept
            }
            _ => Verdict::Ignore("unsupported MLS content".into()),
        }
    }

    /// Processes held envelopes whose epoch has been reached, oldest first.
    fn drain_pending(&mut self, group_id: GroupId, now_ms: u64, effects: &mut Vec<Effect>) {
        loop {
            let Some(g) = self.groups.get_mut(&group_id) else {
                return;
            };
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
            let _ = self.process(&p.bytes, now_ms, effects, Source::Held);
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
    if !g.mls.is_active() {
        return Err(GroupError::Inactive(group));
    }
    if g.leaving {
        return Err(GroupError::Leaving(group));
    }
    Ok(g)
}

fn hold_pending(g: &mut Group, epoch: u64, bytes: &[u8]) {
    if g.pending.iter().any(|p| p.bytes == bytes) {
        return;
    }
    while !g.pending.is_empty()
        && (g.pending.len() >= MAX_PENDING_PER_GROUP
            || g.pending_bytes + bytes.len() > MAX_PENDING_BYTES_PER_GROUP)
    {
        if let Some(old) = g.pending.pop_front() {
            g.pending_bytes -= old.bytes.len();
        }
    }
    g.pending_bytes += bytes.len();
    g.pending.push_back(Pending {
        epoch,
        bytes: bytes.to_vec(),
    });
}

#[cfg(test)]
mod tests;
