//! What the engine keeps of each group in memory: the MLS state, the branch, where this
//! node stands (its [`Lifecycle`]), envelopes held until they can be read, counters; and the
//! bounded holds that keep those envelopes.

use std::collections::{BTreeMap, VecDeque};

use libp2p_identity::PeerId;
use openmls::prelude::MlsGroup;

use super::members::{member_peer, self_remove_pending};
use super::removal::Held;
use super::{
    Effect, GroupError, MAX_ORPHAN_BYTES_PER_GROUP, MAX_ORPHANS_PER_GROUP,
    MAX_PENDING_BYTES_PER_GROUP, MAX_PENDING_PER_GROUP,
};
use crate::envelope::JoinRejection;
use crate::fork::{Applied, Branch, Sent};
use crate::ids::{GroupId, TopicId};
use crate::order::Tracks;
use crate::records::GroupMeta;

/// A read-only view of one group, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Metadata (id, name, join time).
    pub meta: GroupMeta,
    /// Current epoch.
    pub epoch: u64,
    /// Whether this node is still a member that may send: false once it was removed, and
    /// already while a commit removing it is held (see [`super::REMOVAL_GRACE_MS`]).
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

/// An envelope kept until it can be read: its epoch and its bytes as received.
pub(super) struct Pending {
    pub(super) epoch: u64,
    pub(super) bytes: Vec<u8>,
}

/// Work of this node lost in a rollback, still to be redone by [`GroupEngine::settle`].
pub(super) struct Redo {
    /// The commits of the losing branch (this node re-proposes its own ones).
    pub(super) lost: Vec<Applied>,
    /// This node's messages encrypted on the losing branch, to re-send.
    pub(super) messages: Vec<Sent>,
    /// Members removed on the losing branch. The messages above were written for a group
    /// without them, so they are not re-sent while any of them is a member again.
    pub(super) excluded: Vec<PeerId>,
}

/// Where envelope bytes come from, for [`GroupEngine::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
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

/// Where this node stands in a group, beyond what MLS knows (whether it is still a member
/// at all is `MlsGroup::is_active`).
///
/// Leaving is orthogonal to a lost race: a node that proposed its own removal may then
/// learn that its join or branch lost, and its proposal stays pending on that branch. The
/// `leaving` of the last two states keeps that, so every combination the engine reaches
/// has one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Lifecycle {
    /// A member in good standing.
    Member,
    /// It proposed its own removal ([`GroupEngine::leave_group`]) and waits for a member
    /// to commit it; meanwhile it sends nothing to the group.
    Leaving,
    /// The commit that added it, or its branch, lost to a concurrent one: it asks to be
    /// added again ([`Effect::JoinLost`], [`Effect::DeepForkLost`]).
    Rejoining {
        /// It had proposed its own removal.
        leaving: bool,
    },
    /// Joining again after a lost race was refused for `reason`: read-only.
    Lost {
        /// Why joining again was refused.
        reason: LostJoin,
        /// It had proposed its own removal.
        leaving: bool,
    },
}

impl Lifecycle {
    /// A member, leaving if it has a removal proposal of its own pending.
    fn new(leaving: bool) -> Self {
        if leaving {
            Lifecycle::Leaving
        } else {
            Lifecycle::Member
        }
    }

    /// Whether this node proposed its own removal and waits for it to be committed.
    pub(super) fn leaving(&self) -> bool {
        match self {
            Lifecycle::Member => false,
            Lifecycle::Leaving => true,
            Lifecycle::Rejoining { leaving } | Lifecycle::Lost { leaving, .. } => *leaving,
        }
    }

    /// Records whether this node's own removal proposal is pending, in any state.
    pub(super) fn set_leaving(&mut self, now: bool) {
        match self {
            Lifecycle::Member | Lifecycle::Leaving => *self = Lifecycle::new(now),
            Lifecycle::Rejoining { leaving } | Lifecycle::Lost { leaving, .. } => *leaving = now,
        }
    }

    /// Whether this node asks to be added again.
    pub(super) fn rejoining(&self) -> bool {
        matches!(self, Lifecycle::Rejoining { .. })
    }

    /// Why joining again was refused, if it was.
    pub(super) fn lost(&self) -> Option<&LostJoin> {
        match self {
            Lifecycle::Lost { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Neither asking to be added again nor refused: a lost race can still start a rejoin.
    pub(super) fn settled(&self) -> bool {
        matches!(self, Lifecycle::Member | Lifecycle::Leaving)
    }

    /// A race was lost: ask to be added again. Only from a settled state.
    pub(super) fn start_rejoining(&mut self) {
        if self.settled() {
            *self = Lifecycle::Rejoining {
                leaving: self.leaving(),
            };
        }
    }

    /// Asking to be added again ended without a new Welcome (the join stands, or nobody
    /// could add it yet): back to where it stood before.
    pub(super) fn stop_rejoining(&mut self) {
        if let Lifecycle::Rejoining { leaving } = *self {
            *self = Lifecycle::new(leaving);
        }
    }

    /// Joining again was refused for `reason`.
    pub(super) fn lose(&mut self, reason: LostJoin) {
        *self = Lifecycle::Lost {
            reason,
            leaving: self.leaving(),
        };
    }
}

/// Why joining again after a lost race did not work (the group is read-only then).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostJoin {
    /// A member refused, for a reason no other member would change.
    #[error("join refused: {0}")]
    Refused(JoinRejection),
    /// No member could be reached (the line says what was tried).
    #[error("{0}")]
    Unreachable(String),
    /// The time limit passed (the line says what was tried).
    #[error("{0}")]
    TimedOut(String),
    /// Something else failed on this node.
    #[error("{0}")]
    Failed(String),
}

/// One group as the engine holds it.
pub(super) struct Group {
    pub(super) mls: MlsGroup,
    pub(super) meta: GroupMeta,
    pub(super) topic: TopicId,
    /// Envelopes held for a future epoch or during a catch-up, oldest first (see
    /// [`hold_pending`]).
    pub(super) pending: VecDeque<Pending>,
    pub(super) pending_bytes: usize,
    /// The commits merged recently, for the concurrent-commit rule.
    pub(super) branch: Branch,
    /// Envelopes that did not apply to this branch (see [`MAX_ORPHANS_PER_GROUP`]).
    pub(super) orphans: VecDeque<Pending>,
    pub(super) orphan_bytes: usize,
    /// Rollbacks whose lost work (own changes, own messages) is still to be redone.
    pub(super) redo: Vec<Redo>,
    /// Rival commits for epochs before the rewind window (a fork too deep to roll back).
    pub(super) deep_forks: u64,
    /// Sync summaries from members whose branch differs from this node's.
    pub(super) forks_detected: u64,
    /// Times this node left a losing branch.
    pub(super) rollbacks: u64,
    /// Orphans must be retried (a rollback happened).
    pub(super) retry: bool,
    /// Where this node stands in the group.
    pub(super) lifecycle: Lifecycle,
    /// The lowest epoch at which a rival beyond the rewind window was seen: a fork is
    /// judged where the branches split, not at a later epoch of the other branch.
    pub(super) deep_rival: Option<u64>,
    /// Since when (ms) live envelopes are held while history sync fetches older ones (see
    /// [`GroupEngine::begin_catch_up`]).
    pub(super) catching_up: Option<u64>,
    /// Which positions of each sender this node has seen (see [`crate::order`]).
    pub(super) tracks: Tracks,
    /// Own application messages since this node's last own commit.
    pub(super) sent_since_update: u64,
    /// When this node last committed in the group; `None` until first seen by
    /// [`GroupEngine::due_self_updates`] after a load.
    pub(super) last_update_ms: Option<u64>,
    /// A commit that removes this node, held until its grace ends (see `removal`).
    pub(super) removal: Option<Held>,
}

impl Group {
    /// A group loaded or joined with `mls`; `now_ms` starts the self-update clock (`None`:
    /// at the first [`GroupEngine::due_self_updates`]).
    pub(super) fn new(
        mls: MlsGroup,
        meta: GroupMeta,
        topic: TopicId,
        now_ms: Option<u64>,
        branch: Branch,
    ) -> Self {
        let lifecycle = Lifecycle::new(self_remove_pending(&mls));
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
            lifecycle,
            deep_rival: None,
            catching_up: None,
            tracks: Tracks::default(),
            sent_since_update: 0,
            last_update_ms: now_ms,
            removal: None,
        }
    }

    /// Whether this node is a member that may act in the group: MLS counts it one, and no
    /// commit removing it is held.
    pub(super) fn active(&self) -> bool {
        self.mls.is_active() && self.removal.is_none()
    }

    /// The current epoch.
    pub(super) fn epoch(&self) -> u64 {
        self.mls.epoch().as_u64()
    }

    /// The read-only view for listings.
    pub(super) fn view(&self) -> GroupView {
        GroupView {
            meta: self.meta.clone(),
            epoch: self.epoch(),
            active: self.active() && self.lifecycle.lost().is_none(),
            leaving: self.lifecycle.leaving(),
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

    /// How many members the group has at this epoch.
    pub(super) fn member_count(&self) -> usize {
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

/// The group, if this node may still send to it.
pub(super) fn active_group(
    groups: &mut BTreeMap<GroupId, Group>,
    group: GroupId,
) -> Result<&mut Group, GroupError> {
    let g = groups
        .get_mut(&group)
        .ok_or(GroupError::UnknownGroup(group))?;
    if !g.active() || g.lifecycle.lost().is_some() {
        return Err(GroupError::Inactive(group));
    }
    if g.lifecycle.leaving() {
        return Err(GroupError::Leaving(group));
    }
    Ok(g)
}

/// Keeps an envelope that does not apply to this node's branch, in case a rollback makes it
/// applicable (bounded; when full, the newest is not kept).
pub(super) fn hold_orphan(g: &mut Group, epoch: u64, bytes: &[u8]) {
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

/// Holds a live envelope that came before messages of its sender this node lacks, starts
/// holding the group's other live envelopes too (a catch-up from `now_ms`), and returns the
/// effect that asks the node to fetch the gap.
pub(super) fn hold_behind(
    g: &mut Group,
    epoch: u64,
    bytes: &[u8],
    now_ms: u64,
    missing: u64,
) -> Effect {
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
pub(super) fn hold_pending(g: &mut Group, epoch: u64, bytes: &[u8]) {
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
