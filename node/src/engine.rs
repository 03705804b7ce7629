//! The node actor: owns the protocol engine and the store, applies effects.
//!
//! The actor runs on its own OS thread, so MLS crypto and redb fsyncs never run on the async
//! runtime or in the swarm task. It receives one stream of [`Input`]s (network events, API
//! calls with `oneshot` replies, timer ticks) and handles them one at a time. For every input
//! it calls the sans-IO [`GroupEngine`], then writes the staged MLS state and the resulting
//! history rows, envelopes, groups and invites in **one** redb transaction, and only after
//! that commit publishes, subscribes and tells API clients. If the commit fails it discards
//! the staged writes and reloads MLS state from disk, so memory never runs ahead of disk.
//!
//! History sync: the actor answers sync requests from members, and drives the requester's
//! side, [`kith_protocol::sync::scheduler::SyncScheduler`], which decides when to sync which
//! group with whom (see [`Actor::sync_input`]). Each request the scheduler asks for is
//! awaited in a tokio task that sends the answer back as an input, so the actor never waits
//! on the network; fetched envelopes go through the same path as gossip.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use data_encoding::HEXLOWER;
use kith_protocol::envelope::{
    Envelope, JoinRejection, JoinRequest, JoinResponse, PayloadKind, RejoinRequestV1,
};
use kith_protocol::group::{
    Effect, GroupEngine, GroupError, GroupView, Identity, IgnoreReason, NewInvite, UpdatePolicy,
    Verdict,
};
use kith_protocol::ids::{GroupId, InviteId, MessageId, invite_rendezvous_key};
use kith_protocol::invite::{Invite, InviteRecord, secret_hash};
use kith_protocol::records::{EntryKind, HistoryEntry};
use kith_protocol::sync::scheduler::{self as sched, SyncScheduler};
use kith_protocol::sync::{
    Holdings, Summary, SyncItem, SyncRefusal, SyncRequest, SyncResponse, respond,
};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::admission::{FindError, HeldRequests, HeldState, request_id_text};
use crate::crashpoint::{self, Point};
use crate::join_trail::{Miss, Trail};
use crate::metrics::{GroupGauges, JoinRequestResult, JoinResult, KithMetrics};
use crate::model::{
    CreateInviteRequest, GroupInfo, GroupSummary, InviteInfo, InviteSummary, JoinRequestInfo,
    JoinStage, MemberInfo, MessageBody, MessageInfo, NodeEvent, StatusInfo,
};
use crate::net::{MAX_BLOCKED_PEERS, NetError, NetEvent, NetHandle};
use crate::store::{Batch, HealthView, KithProvider, Retention, Store, StoreError};
use crate::sync::{MAX_SCAN_ENVELOPES, SYNC_INTERVAL, SyncLimiter};

mod disk;

/// Default invite lifetime.
pub const DEFAULT_INVITE_SECS: u64 = 24 * 3600;
/// Longest invite lifetime.
pub const MAX_INVITE_SECS: u64 = 30 * 24 * 3600;
/// Most uses one invite may allow.
pub const MAX_INVITE_USES: u32 = kith_protocol::envelope::MAX_INVITE_USES;
/// How long a join may take when the caller sets no limit.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest join time limit a caller may set.
pub const MAX_JOIN_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the joiner waits for a connection to one member before trying the next.
const JOIN_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a joiner whose request awaits approval sends it again.
pub const APPROVAL_RETRY: Duration = Duration::from_secs(2);
/// Pause after the first DHT lookup that found nobody; it doubles for each further one, up
/// to [`MAX_JOIN_LOOKUP_RETRY`], until the join's time limit.
const JOIN_LOOKUP_RETRY: Duration = Duration::from_secs(1);
/// After joining, the group is synced again after these pauses, so a concurrent commit that
/// beat the one adding us is noticed quickly (see [`Effect::JoinLost`]).
const JOIN_FOLLOW_UP_SYNCS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(8)];
/// Rounds of asking every member to add this node again after a deep fork.
const REJOIN_ROUNDS: u32 = 5;
/// Pause between those rounds.
const REJOIN_RETRY: Duration = Duration::from_secs(2);
/// DHT lookups a join makes at most after a member said it does not know the invite.
const UNKNOWN_INVITE_LOOKUPS: u32 = 3;
/// Longest pause between two DHT lookups of one join.
const MAX_JOIN_LOOKUP_RETRY: Duration = Duration::from_secs(8);

/// The pause after the `lookups`-th DHT lookup of a join found nobody.
fn lookup_pause(lookups: u32) -> Duration {
    JOIN_LOOKUP_RETRY
        .saturating_mul(1 << lookups.saturating_sub(1).min(4))
        .min(MAX_JOIN_LOOKUP_RETRY)
}
/// Members found through the DHT that a joiner tries, at most.
const MAX_JOIN_CANDIDATES: usize = 8;
/// Invites one node announces in the DHT at most (the newest active ones).
const MAX_PROVIDED_INVITES: usize = 256;
/// Invite records are deleted this long after they expired (with the retention timer).
const INVITE_RECORD_GRACE_SECS: u64 = 24 * 3600;
/// History entries returned at most per request.
pub const MAX_HISTORY: usize = 1000;
/// How often the node re-announces its groups in the DHT and looks for other members.
/// Every 60 s cost each node a DHT provide and lookup plus dials of the results; 5 min keeps
/// the announcement fresh (provider records live for hours) at a fifth of the churn.
pub const RENDEZVOUS_INTERVAL: Duration = Duration::from_secs(300);
const INPUT_QUEUE: usize = 4096;
/// Received messages are made durable at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// How often history retention (`[retention]` in `config.toml`; by default 365 days and
/// 100 000 entries per group) is applied; also once at start.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// Most history rows one prune run deletes (over all groups); when it runs out, another run
/// is queued behind the inputs already waiting.
const PRUNE_BUDGET: usize = 5000;
/// Longest time live envelopes of a group are held while this node catches up (after a
/// start, a wake-up, or a gap in a sender's messages; checked every [`FLUSH_INTERVAL`]).
/// The sync scheduler decides it; see [`sched::CATCH_UP_HOLD_LIMIT`].
pub use kith_protocol::sync::scheduler::CATCH_UP_HOLD_LIMIT;
/// A flush tick this much later than due means the machine slept (or the process was
/// stopped): hold live messages and catch up, as after a start.
const WAKE_GAP: Duration = Duration::from_secs(10);
/// Most received envelopes written in one store transaction.
const MAX_GOSSIP_BATCH: usize = 256;
const EVENT_BUFFER: usize = 1024;

/// Why an engine operation failed. Each variant maps to one HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No group matches the given id, id prefix or name (HTTP 404).
    #[error("no group matches '{0}'")]
    GroupNotFound(String),
    /// The peer is not a member of the group (HTTP 404).
    #[error("{0} is not a member of the group")]
    MemberNotFound(String),
    /// No invite or held join request matches (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The id prefix or name matches more than one group (HTTP 400).
    #[error("'{0}' matches several groups; use the full id")]
    AmbiguousGroup(String),
    /// The request itself is invalid, e.g. empty text or a name too long (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The invite link is bad, expired or for another network (HTTP 400).
    #[error(transparent)]
    Invite(#[from] kith_protocol::invite::InviteError),
    /// A member refused the join request (HTTP 409).
    #[error("join refused: {0}")]
    JoinRejected(JoinRejection),
    /// No member of the group could be reached or add us: one line saying what was tried
    /// and what to do (see [`crate::join_trail`]) (HTTP 504).
    #[error("{0}")]
    Unreachable(String),
    /// The join did not finish within its time limit (HTTP 504).
    #[error("{0}")]
    TimedOut(String),
    /// The node is shutting down (HTTP 503).
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The node cannot write to its disk (HTTP 507 for a full disk, else 503): the request
    /// changed nothing, and the node retries by itself (see `Store::recover`).
    #[error(
        "the node cannot write to its disk ({reason} in {}); {}, the node retries by itself",
        dir.display(),
        reason.advice()
    )]
    Storage {
        /// Why the last write failed.
        reason: crate::store::FailureReason,
        /// The data directory.
        dir: std::path::PathBuf,
    },
    /// Anything else: a storage or MLS failure, logged by the node (HTTP 500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<GroupError> for EngineError {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::UnknownGroup(g) => EngineError::GroupNotFound(g.to_string()),
            GroupError::AlreadyMember(g) => {
                EngineError::BadRequest(format!("already a member of group {}", g.short()))
            }
            GroupError::Inactive(g) => {
                EngineError::BadRequest(format!("no longer a member of group {}", g.short()))
            }
            GroupError::Leaving(g) => EngineError::BadRequest(format!(
                "leaving group {}; waiting for a member to commit the removal",
                g.short()
            )),
            GroupError::UnknownMember(p) => EngineError::MemberNotFound(p.to_string()),
            GroupError::InvalidInput(m) => EngineError::BadRequest(m),
            GroupError::Invite(e) => EngineError::Invite(e),
            GroupError::JoinRejected(r) => EngineError::JoinRejected(r),
            GroupError::BadWelcome(m) => {
                EngineError::Internal(format!("the member sent an invalid welcome: {m}"))
            }
            e @ (GroupError::UnsupportedKey | GroupError::Mls(_)) => {
                EngineError::Internal(e.to_string())
            }
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Failing { reason, dir } => EngineError::Storage { reason, dir },
            e => EngineError::Internal(format!("store: {e}")),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Call {
    Groups(Reply<Vec<GroupSummary>>),
    Group(String, Reply<GroupInfo>),
    CreateGroup(String, Reply<GroupInfo>),
    CreateInvite(String, CreateInviteRequest, Reply<InviteInfo>),
    ListInvites(String, Reply<Vec<InviteSummary>>),
    RevokeInvite(String, String, Reply<InviteSummary>),
    JoinRequests(String, Reply<Vec<JoinRequestInfo>>),
    DecideJoin(String, String, bool, Reply<JoinRequestInfo>),
    PrepareJoin(Box<Invite>, Reply<JoinRequest>),
    CompleteJoin(Box<Invite>, JoinResponse, Reply<GroupInfo>),
    /// A rejoin request after a deep fork (see [`EngineHandle::rejoin_member`]).
    PrepareRejoin(GroupId, u64, MessageId, Reply<JoinRequest>),
    /// A member's answer to a rejoin request, from that member.
    CompleteRejoin(GroupId, PeerId, JoinResponse, Reply<GroupInfo>),
    /// No member could add this node again after a deep fork.
    RejoinFailed(GroupId, Reply<()>),
    /// Joining again after a lost race ended: `None` = still a member, else the refusal.
    JoinOutcome(GroupId, Option<String>, Reply<()>),
    Send(String, String, Reply<MessageInfo>),
    History(String, usize, Reply<Vec<MessageInfo>>),
    RemoveMember(String, PeerId, Reply<GroupInfo>),
    LeaveGroup(String, Reply<GroupInfo>),
    SelfUpdate(String, Reply<GroupInfo>),
}

/// What the actor consumes.
enum Input {
    Net(NetEvent),
    Call(Call),
    Tick,
    /// Sync every active group with an online member.
    SyncTick,
    /// The answer to a sync request the scheduler asked for.
    SyncReply {
        id: sched::RequestId,
        result: Result<SyncResponse, NetError>,
    },
    /// A timer the sync scheduler asked for.
    SyncTimer,
    /// Sync `group` now (a follow-up after joining).
    SyncGroup(GroupId),
    /// Make non-durable commits durable.
    Flush,
    /// Apply history retention.
    Prune,
    Shutdown,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a history entry to its API form.
pub fn message_info(h: &HistoryEntry) -> MessageInfo {
    let peers = |v: &[PeerId]| v.iter().map(|p| p.to_string()).collect();
    MessageInfo {
        id: h.id.to_string(),
        group: h.group.to_string(),
        epoch: h.epoch,
        sender: h.sender.to_string(),
        sent_at_ms: h.sent_at_ms,
        received_at_ms: h.received_at_ms,
        body: match &h.kind {
            EntryKind::Text(t) => MessageBody::Text { text: t.clone() },
            EntryKind::GroupCreated { name } => MessageBody::GroupCreated { name: name.clone() },
            EntryKind::MembersAdded(v) => MessageBody::MembersAdded { members: peers(v) },
            EntryKind::MembersRemoved(v) => MessageBody::MembersRemoved { members: peers(v) },
            EntryKind::InviteCreated {
                id,
                max_uses,
                expires_at,
                approval,
            } => MessageBody::InviteCreated {
                invite: id.to_string(),
                max_uses: *max_uses,
                expires_at: *expires_at,
                approval: *approval,
            },
            EntryKind::InviteRevoked(id) => MessageBody::InviteRevoked {
                invite: id.to_string(),
            },
            EntryKind::Joined(me) => MessageBody::MembersAdded {
                members: peers(std::slice::from_ref(me)),
            },
        },
    }
}

fn group_info(v: &GroupView, me: PeerId) -> GroupInfo {
    GroupInfo {
        id: v.meta.id.to_string(),
        name: v.meta.name.clone(),
        epoch: v.epoch,
        members: v
            .members
            .iter()
            .map(|(leaf, p)| MemberInfo {
                peer_id: p.to_string(),
                leaf_index: *leaf,
                is_self: *p == me,
            })
            .collect(),
        joined_at_ms: v.meta.joined_at_ms,
        active: v.active,
        leaving: v.leaving,
        epoch_auth: HEXLOWER.encode(&v.authenticator),
        rollbacks: v.rollbacks,
        deep_forks: v.deep_forks,
        forks_detected: v.forks_detected,
        undecryptable: Default::default(),
        missing: 0,
        catching_up: false,
        sync_failures: 0,
    }
}

/// The API form of an invite record at `now` (Unix seconds).
fn invite_summary(r: &InviteRecord, now: u64) -> InviteSummary {
    use kith_protocol::envelope::JoinRejection as R;
    let state = match r.admits(now) {
        Ok(()) => "active",
        Err(R::Revoked) => "revoked",
        Err(R::Expired) => "expired",
        Err(R::UsedUp) => "used_up",
        Err(_) => "unknown",
    };
    InviteSummary {
        id: r.id.to_string(),
        group: r.group.to_string(),
        creator: r.creator.map(|p| p.to_string()).unwrap_or_default(),
        max_uses: r.max_uses,
        uses: r.uses,
        uses_left: r.uses_left(),
        expires_at: r.expires_at,
        created_at: r.created_at,
        approval: r.approval,
        revoked: r.revoked,
        state: state.to_owned(),
    }
}

fn held_info(h: &crate::admission::Held) -> JoinRequestInfo {
    JoinRequestInfo {
        id: request_id_text(h.id),
        group: h.group.to_string(),
        peer: h.peer.to_string(),
        invite: h.invite.to_string(),
        received_at_ms: h.received_at_ms,
        state: match h.state {
            HeldState::Waiting => "waiting",
            HeldState::Approved(_) => "approved",
            HeldState::Denied => "denied",
        }
        .to_owned(),
    }
}

/// How a join attempt with one member ended.
enum Attempt {
    /// The member added us: complete the join with this answer.
    Accepted(JoinResponse),
    /// A refusal no other member would change (revoked, expired, used up, denied, …).
    Refused(JoinRejection),
    /// This member could not help; try the next one.
    Next(Miss),
}

fn summary(v: &GroupView) -> GroupSummary {
    GroupSummary {
        id: v.meta.id.to_string(),
        name: v.meta.name.clone(),
        epoch: v.epoch,
        member_count: v.members.len(),
        in_sync: true,
        held: 0,
        epoch_auth: HEXLOWER.encode(&v.authenticator),
        undecryptable: 0,
        missing: 0,
        sync_failures: 0,
        rollbacks: v.rollbacks,
        deep_forks: v.deep_forks,
        forks_detected: v.forks_detected,
    }
}

/// Orders addresses for an invite: routable ones before loopback, and never unspecified.
fn invite_addrs(mut addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    addrs.retain(|a| {
        !a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_unspecified(),
            _ => false,
        })
    });
    addrs.sort_by_key(loopback);
    addrs
}

/// Cloneable handle to the engine actor; every method is one request with one reply.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Input>,
    events: broadcast::Sender<NodeEvent>,
    net: NetHandle,
    network: String,
    peer_id: PeerId,
    metrics: Arc<KithMetrics>,
    /// The store's health, read by [`EngineHandle::status`] without asking the actor.
    health: HealthView,
}

impl EngineHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Call(make(tx)))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Node status: identity, addresses, peers, groups.
    pub async fn status(&self) -> Result<StatusInfo, EngineError> {
        let info = self
            .net
            .info()
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        let groups = self.groups().await?;
        Ok(StatusInfo {
            peer_id: self.peer_id.to_string(),
            network: self.network.clone(),
            listen_addrs: info.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: info.connected.len(),
            groups,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage: disk::storage_status(&self.health),
        })
    }

    /// Creates a group with this node as its only member.
    pub async fn create_group(&self, name: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::CreateGroup(name, r)).await
    }

    /// All groups of this node.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, EngineError> {
        self.call(Call::Groups).await
    }

    /// One group; `group` is a full id, a unique id prefix (at least 4 hex characters) or an
    /// exact name.
    pub async fn group(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::Group(group, r)).await
    }

    /// Creates an invite link to a group.
    pub async fn create_invite(
        &self,
        group: String,
        req: CreateInviteRequest,
    ) -> Result<InviteInfo, EngineError> {
        self.call(|r| Call::CreateInvite(group, req, r)).await
    }

    /// Joins a group by invite link within `timeout` (default [`DEFAULT_JOIN_TIMEOUT`]):
    /// checks the link locally, then asks the inviter named in the link and, if it cannot
    /// help, members found in the DHT under the invite's rendezvous key; waits (retrying)
    /// while a member holds the request for approval; builds the group from the Welcome.
    /// Each stage is announced as [`NodeEvent::JoinProgress`].
    pub async fn join(&self, link: String) -> Result<GroupInfo, EngineError> {
        self.join_with_timeout(link, None).await
    }

    /// [`EngineHandle::join`] with a time limit (`None`: [`DEFAULT_JOIN_TIMEOUT`]).
    pub async fn join_with_timeout(
        &self,
        link: String,
        timeout: Option<Duration>,
    ) -> Result<GroupInfo, EngineError> {
        let result = self.join_inner(link, timeout, None).await;
        self.metrics.join(match &result {
            Ok(_) => JoinResult::Joined,
            Err(EngineError::JoinRejected(_)) => JoinResult::Refused,
            Err(EngineError::Unreachable(_) | EngineError::TimedOut(_)) => JoinResult::Unreachable,
            Err(EngineError::Invite(_)) => JoinResult::BadInvite,
            Err(_) => JoinResult::Error,
        });
        result
    }

    fn progress(&self, group: GroupId, stage: JoinStage) {
        let _ = self.events.send(NodeEvent::JoinProgress {
            group: group.to_string(),
            stage,
        });
    }

    /// Joins by `link` within `timeout`; `prefer` is a member to ask before anyone else (the
    /// member who added us, when joining again after a lost race).
    async fn join_inner(
        &self,
        link: String,
        timeout: Option<Duration>,
        prefer: Option<PeerId>,
    ) -> Result<GroupInfo, EngineError> {
        // A damaged, forged, expired or foreign link is refused here, before any traffic.
        let invite = Invite::parse(&link)?;
        invite.check(&self.network, now_ms() / 1000)?;
        let timeout = timeout.unwrap_or(DEFAULT_JOIN_TIMEOUT);
        if timeout.is_zero() || timeout > MAX_JOIN_TIMEOUT {
            return Err(EngineError::BadRequest(format!(
                "the join time limit must be between 1 second and {} minutes",
                MAX_JOIN_TIMEOUT.as_secs() / 60
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let group = invite.group;
        self.progress(
            group,
            JoinStage::FindingMembers {
                timeout_secs: timeout.as_secs(),
            },
        );
        let request = self
            .call(|r| Call::PrepareJoin(Box::new(invite.clone()), r))
            .await?;
        // Look the invite up in the DHT while the inviter is tried.
        let lookup_providers = || {
            let net = self.net.clone();
            let key = invite.rendezvous_key();
            tokio::spawn(async move { net.get_providers(key).await })
        };
        let mut lookup = Some(lookup_providers());
        let mut lookups = 1;
        let mut tried: HashSet<PeerId> = HashSet::new();
        let mut trail = Trail::new(invite.addrs.len());
        let mut unknown: Option<JoinRejection> = None;
        // Connecting is harmless, so the inviter is dialled while the DHT is searched: a
        // dead or black-holed link address then costs nothing if a member answers there
        // first. The request itself goes to one member at a time (two members could
        // otherwise both add us).
        self.progress(
            group,
            JoinStage::Contacting {
                peer: invite.inviter.to_string(),
                via: "link".to_owned(),
            },
        );
        let mut inviter_dial = {
            let net = self.net.clone();
            let (peer, addrs) = (invite.inviter, invite.addrs.clone());
            let limit = deadline.min(tokio::time::Instant::now() + JOIN_DIAL_TIMEOUT);
            Some(tokio::spawn(async move {
                tokio::time::timeout_at(limit, net.connect(peer, addrs)).await
            }))
        };
        let mut candidates: Vec<(PeerId, Vec<Multiaddr>, &'static str)> = prefer
            .filter(|p| *p != self.peer_id)
            .map(|p| (p, Vec::new(), "member"))
            .into_iter()
            .collect();
        let inviter_entry = (invite.inviter, invite.addrs.clone(), "link");
        while candidates.is_empty() && (inviter_dial.is_some() || lookup.is_some()) {
            tokio::select! {
                // The inviter first when both are ready.
                biased;
                dialled = async { inviter_dial.as_mut().expect("guarded").await },
                    if inviter_dial.is_some() =>
                {
                    inviter_dial = None;
                    match dialled {
                        Ok(Ok(Ok(()))) => candidates.push(inviter_entry.clone()),
                        Ok(Ok(Err(e))) => {
                            tracing::info!(group = %group.short(), peer = %invite.inviter, error = %e, "cannot connect to the inviter");
                            trail.inviter = Some(Miss::CannotConnect);
                        }
                        _ => trail.inviter = Some(Miss::ConnectTimedOut),
                    }
                }
                found = async { lookup.as_mut().expect("guarded").await },
                    if lookup.is_some() =>
                {
                    lookup = None;
                    let found = match found {
                        Ok(Ok(peers)) => peers,
                        _ => Vec::new(),
                    };
                    candidates.extend(
                        found
                            .into_iter()
                            .filter(|p| *p != self.peer_id && *p != invite.inviter)
                            .take(MAX_JOIN_CANDIDATES)
                            .map(|p| (p, Vec::new(), "dht")),
                    );
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out(timeout, &trail, lookups));
                }
            }
        }
        if let Some(dial) = inviter_dial.take() {
            // Members answered in the DHT first; the inviter stays a fallback.
            dial.abort();
            candidates.push(inviter_entry);
        }
        loop {
            if candidates.is_empty() {
                let task = match lookup.take() {
                    Some(task) => task,
                    // A node that just started may not have DHT peers yet, and a member may
                    // be announcing right now: look again, less often, until the time limit.
                    // Once a member said it does not know the invite, a few more looks
                    // suffice: that is most likely the answer.
                    None if tokio::time::Instant::now() + lookup_pause(lookups) < deadline
                        && (unknown.is_none() || lookups < UNKNOWN_INVITE_LOOKUPS) =>
                    {
                        tokio::time::sleep(lookup_pause(lookups)).await;
                        lookups += 1;
                        lookup_providers()
                    }
                    None => break,
                };
                let found = match tokio::time::timeout_at(deadline, task).await {
                    Ok(Ok(Ok(peers))) => peers,
                    Ok(_) => Vec::new(),
                    Err(_) => return Err(self.timed_out(timeout, &trail, lookups)),
                };
                tracing::debug!(group = %group.short(), found = found.len(), "members found in the DHT");
                candidates.extend(
                    found
                        .into_iter()
                        .filter(|p| *p != self.peer_id && !tried.contains(p))
                        .take(MAX_JOIN_CANDIDATES)
                        .map(|p| (p, Vec::new(), "dht")),
                );
                if candidates.is_empty() {
                    continue;
                }
            }
            let (peer, addrs, via) = candidates.remove(0);
            if !tried.insert(peer) {
                continue;
            }
            match self
                .attempt(group, peer, addrs, via, &request, deadline)
                .await
            {
                Attempt::Accepted(response) => {
                    self.progress(
                        group,
                        JoinStage::Added {
                            peer: peer.to_string(),
                        },
                    );
                    let info = self
                        .call(|r| Call::CompleteJoin(Box::new(invite), response, r))
                        .await?;
                    self.progress(
                        group,
                        JoinStage::Ready {
                            epoch: info.epoch,
                            member_count: info.members.len(),
                        },
                    );
                    return Ok(info);
                }
                Attempt::Refused(r) => return Err(EngineError::JoinRejected(r)),
                Attempt::Next(miss) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.timed_out(timeout, &trail, lookups));
                    }
                    if miss == Miss::Declined(JoinRejection::UnknownInvite) {
                        // The member who signed the link created the invite: if it does not
                        // know it, no one does.
                        if peer == invite.inviter {
                            return Err(EngineError::JoinRejected(JoinRejection::UnknownInvite));
                        }
                        unknown = Some(JoinRejection::UnknownInvite);
                    }
                    self.progress(
                        group,
                        JoinStage::TryingNext {
                            peer: peer.to_string(),
                            reason: miss.to_string(),
                        },
                    );
                    if peer == invite.inviter {
                        trail.inviter = Some(miss);
                    } else {
                        trail.member(miss);
                    }
                }
            }
        }
        // Every member we reached said it does not know the invite: that is the answer.
        if let Some(r) = unknown {
            return Err(EngineError::JoinRejected(r));
        }
        trail.lookups = lookups;
        Err(EngineError::Unreachable(trail.unreachable()))
    }

    /// Asks `members`, one after the other, to add this node again after its branch of
    /// `group` lost a fork at `epoch` deeper than it can roll back; the one whose branch
    /// holds `commit` there does. If none can (yet), the next sign of the fork tries again.
    async fn rejoin_member(
        &self,
        group: GroupId,
        epoch: u64,
        commit: MessageId,
        members: Vec<PeerId>,
    ) {
        tracing::warn!(group = %group.short(), epoch, "this node's branch lost a deep fork; asking to be added again");
        // Every member of the losing branch asks in the same order, so the first member of
        // the winning branch re-adds them one after the other instead of two members
        // re-adding at once (which would be a new race).
        let mut members = members;
        members.sort();
        // A member of the winning branch may be busy re-adding another node, or not yet
        // connected after a partition heals: try a few rounds before waiting for the next
        // sign of the fork.
        for round in 0..REJOIN_ROUNDS {
            if round > 0 {
                tokio::time::sleep(REJOIN_RETRY).await;
            }
            for peer in members.iter().copied() {
                let request = match self
                    .call(|r| Call::PrepareRejoin(group, epoch, commit, r))
                    .await
                {
                    Ok(request) => request,
                    Err(e) => {
                        tracing::warn!(group = %group.short(), error = %e, "cannot prepare a rejoin");
                        break;
                    }
                };
                let asked = async {
                    self.net.connect(peer, Vec::new()).await.ok()?;
                    self.net.join(peer, Vec::new(), request).await.ok()
                };
                let Ok(Some(response)) = tokio::time::timeout(JOIN_DIAL_TIMEOUT, asked).await
                else {
                    continue;
                };
                if let JoinResponse::Rejected(why) = &response {
                    tracing::debug!(group = %group.short(), %peer, reason = %why, "rejoin refused");
                    continue;
                }
                match self
                    .call(|r| Call::CompleteRejoin(group, peer, response, r))
                    .await
                {
                    Ok(info) => {
                        tracing::info!(group = %group.short(), %peer, epoch = info.epoch, "added again on the winning branch");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(group = %group.short(), %peer, error = %e, "cannot use the rejoin answer")
                    }
                }
            }
        }
        let _ = self.call(|r| Call::RejoinFailed(group, r)).await;
    }

    /// Joins `group` again with `link` after the commit that added this node lost to a
    /// concurrent one. A member saying we are still in the group means the join stands; any
    /// other refusal (the link was used up by the winner, revoked, expired) leaves the group
    /// read-only here, with the reason in the join progress events.
    async fn rejoin(&self, group: GroupId, link: String, by: Option<PeerId>) {
        self.progress(group, JoinStage::Rejoining);
        let outcome = match self.join_inner(link, None, by).await {
            Ok(info) => {
                tracing::info!(group = %group.short(), epoch = info.epoch, "joined again on the winning branch");
                return;
            }
            Err(EngineError::JoinRejected(JoinRejection::AlreadyMember)) => None,
            Err(e) => Some(e.to_string()),
        };
        let _ = self
            .call(|r| Call::JoinOutcome(group, outcome.clone(), r))
            .await;
        // Announced once the group is marked read-only, so a client that sees it sees that.
        if let Some(reason) = outcome {
            tracing::warn!(group = %group.short(), %reason, "could not join again after a lost race");
            self.progress(group, JoinStage::Lost { reason });
        }
    }

    fn timed_out(&self, timeout: Duration, trail: &Trail, lookups: u32) -> EngineError {
        let mut trail = trail.clone();
        trail.lookups = lookups;
        EngineError::TimedOut(trail.timed_out(timeout.as_secs()))
    }

    /// Asks one member: connect (bounded by [`JOIN_DIAL_TIMEOUT`]), send the request, and
    /// while the member holds it for approval, send it again every [`APPROVAL_RETRY`].
    async fn attempt(
        &self,
        group: GroupId,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        via: &'static str,
        request: &JoinRequest,
        deadline: tokio::time::Instant,
    ) -> Attempt {
        if via != "link" {
            // The inviter was announced when its dial started.
            self.progress(
                group,
                JoinStage::Contacting {
                    peer: peer.to_string(),
                    via: via.to_owned(),
                },
            );
        }
        let dial_deadline = deadline.min(tokio::time::Instant::now() + JOIN_DIAL_TIMEOUT);
        match tokio::time::timeout_at(dial_deadline, self.net.connect(peer, addrs)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::info!(group = %group.short(), %peer, via, error = %e, "cannot connect to a member");
                return Attempt::Next(Miss::CannotConnect);
            }
            Err(_) => return Attempt::Next(Miss::ConnectTimedOut),
        }
        self.progress(
            group,
            JoinStage::RequestSent {
                peer: peer.to_string(),
            },
        );
        tracing::info!(group = %group.short(), %peer, via, "sending join request");
        let mut announced = false;
        loop {
            let sent = self.net.join(peer, Vec::new(), request.clone());
            let response = match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::info!(group = %group.short(), %peer, error = %e, "join request failed");
                    return Attempt::Next(Miss::RequestFailed);
                }
                Err(_) => return Attempt::Next(Miss::NoAnswer),
            };
            match response {
                JoinResponse::Accepted { .. } | JoinResponse::Admitted { .. } => {
                    return Attempt::Accepted(response);
                }
                JoinResponse::Rejected(
                    r @ (JoinRejection::UnknownInvite
                    | JoinRejection::NotMember
                    | JoinRejection::Internal
                    | JoinRejection::Busy),
                ) => return Attempt::Next(Miss::Declined(r)),
                JoinResponse::Rejected(r) => return Attempt::Refused(r),
                JoinResponse::AwaitingApproval { request: id } => {
                    if !announced {
                        announced = true;
                        self.progress(
                            group,
                            JoinStage::AwaitingApproval {
                                peer: peer.to_string(),
                                request: request_id_text(id),
                            },
                        );
                    }
                    let wake = deadline.min(tokio::time::Instant::now() + APPROVAL_RETRY);
                    tokio::time::sleep_until(wake).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Attempt::Next(Miss::StillAwaitingApproval);
                    }
                }
            }
        }
    }

    /// The invites of a group as this node knows them, newest first.
    pub async fn invites(&self, group: String) -> Result<Vec<InviteSummary>, EngineError> {
        self.call(|r| Call::ListInvites(group, r)).await
    }

    /// Revokes an invite (id or unique prefix of 4+ hex characters) for the whole group.
    pub async fn revoke_invite(
        &self,
        group: String,
        invite: String,
    ) -> Result<InviteSummary, EngineError> {
        self.call(|r| Call::RevokeInvite(group, invite, r)).await
    }

    /// The join requests held for approval on this node for a group.
    pub async fn join_requests(&self, group: String) -> Result<Vec<JoinRequestInfo>, EngineError> {
        self.call(|r| Call::JoinRequests(group, r)).await
    }

    /// Approves (`true`: commits the Add) or denies a held join request.
    pub async fn decide_join(
        &self,
        group: String,
        request: String,
        approve: bool,
    ) -> Result<JoinRequestInfo, EngineError> {
        self.call(|r| Call::DecideJoin(group, request, approve, r))
            .await
    }

    /// Sends a text message to a group.
    pub async fn send(&self, group: String, text: String) -> Result<MessageInfo, EngineError> {
        self.call(|r| Call::Send(group, text, r)).await
    }

    /// Removes a member (by PeerId) from a group; returns the group after the commit.
    pub async fn remove_member(
        &self,
        group: String,
        peer: PeerId,
    ) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::RemoveMember(group, peer, r)).await
    }

    /// Asks to leave a group: publishes this node's removal proposal, which another member
    /// commits. Returns the group, marked `leaving`.
    pub async fn leave_group(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::LeaveGroup(group, r)).await
    }

    /// Commits a fresh leaf key for this node in a group; returns the group after it.
    pub async fn self_update(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::SelfUpdate(group, r)).await
    }

    /// The newest `limit` history entries of a group, oldest first.
    pub async fn history(
        &self,
        group: String,
        limit: usize,
    ) -> Result<Vec<MessageInfo>, EngineError> {
        self.call(|r| Call::History(group, limit, r)).await
    }

    /// Live events for the API's event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// The peers this node is connected to.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, EngineError> {
        let mut peers = self.net.info().await.map_err(net_error)?.connected;
        peers.sort();
        Ok(peers)
    }

    /// The peers this node refuses connections with, sorted.
    pub async fn blocked(&self) -> Result<Vec<PeerId>, EngineError> {
        self.net.blocked().await.map_err(net_error)
    }

    /// Replaces the set of peers this node refuses connections with (see
    /// [`NetHandle::set_blocked`]); returns it, sorted.
    pub async fn set_blocked(&self, peers: Vec<PeerId>) -> Result<Vec<PeerId>, EngineError> {
        if peers.contains(&self.peer_id) {
            return Err(EngineError::BadRequest(
                "a node cannot block itself".to_owned(),
            ));
        }
        if peers.len() > MAX_BLOCKED_PEERS {
            return Err(EngineError::BadRequest(format!(
                "cannot block more than {MAX_BLOCKED_PEERS} peers"
            )));
        }
        self.net.set_blocked(peers).await.map_err(net_error)
    }

    /// Kith's metrics of this node.
    pub fn metrics(&self) -> &Arc<KithMetrics> {
        &self.metrics
    }
}

fn net_error(e: NetError) -> EngineError {
    match e {
        NetError::Stopped => EngineError::ShuttingDown,
        NetError::TooManyBlocked { .. } => EngineError::BadRequest(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}

/// The running actor: its handle and its thread.
pub struct EngineTask {
    tx: mpsc::Sender<Input>,
    thread: Option<JoinHandle<()>>,
}

impl EngineTask {
    /// Asks the actor to stop and waits until it has closed the store.
    pub async fn shutdown(mut self) {
        let _ = self.tx.send(Input::Shutdown).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// The engine's settings from `config.toml`.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The network id.
    pub network: String,
    /// How much history to keep per group.
    pub retention: Retention,
    /// When to refresh this node's own key in each group.
    pub update_policy: UpdatePolicy,
    /// How long past epochs' secrets are kept after this node left them
    /// ([`kith_protocol::group::PAST_EPOCH_TTL`]; tests shorten it).
    pub past_epoch_ttl: Duration,
}

/// The one group among `groups` (id, name) that `query` names: its full id, a unique id
/// prefix of at least 4 hex digits, or its exact name.
pub(crate) fn resolve_group<'a>(
    query: &str,
    groups: impl Iterator<Item = (GroupId, &'a str)>,
) -> Result<GroupId, EngineError> {
    let query = query.trim();
    let groups: Vec<(GroupId, &str)> = groups.collect();
    if let Ok(id) = query.parse::<GroupId>() {
        return if groups.iter().any(|(g, _)| *g == id) {
            Ok(id)
        } else {
            Err(EngineError::GroupNotFound(query.to_owned()))
        };
    }
    let lower = query.to_ascii_lowercase();
    let is_prefix = lower.len() >= 4 && lower.chars().all(|c| c.is_ascii_hexdigit());
    let matches: Vec<GroupId> = groups
        .iter()
        .filter(|(id, name)| *name == query || (is_prefix && id.to_string().starts_with(&lower)))
        .map(|(id, _)| *id)
        .collect();
    match matches.as_slice() {
        [] => Err(EngineError::GroupNotFound(query.to_owned())),
        [one] => Ok(*one),
        _ => Err(EngineError::AmbiguousGroup(query.to_owned())),
    }
}

/// Opens the group state from `store`, subscribes to every group, and starts the actor thread
/// consuming `net_events`. The engine counts what it does in `metrics`. Must be called
/// inside a tokio runtime.
pub fn start(
    store: Store,
    keypair: &Keypair,
    settings: EngineSettings,
    net: NetHandle,
    mut net_events: mpsc::Receiver<NetEvent>,
    metrics: Arc<KithMetrics>,
) -> Result<(EngineHandle, EngineTask), EngineError> {
    let EngineSettings {
        network,
        retention,
        update_policy,
        past_epoch_ttl,
    } = settings;
    let identity = Identity::new(keypair)?;
    let peer_id = identity.peer_id();
    let mut groups = GroupEngine::new(store.provider(), identity, network.clone());
    let (effects, missing) = groups.load(store.groups()?)?;
    for g in missing {
        tracing::error!(group = %g, "group listed but its MLS state is missing; skipping it");
    }
    // Whatever happened while this node was down, live messages wait until a history sync
    // has fetched what came before them (see `GroupEngine::begin_catch_up`).
    groups.begin_catch_up_all(now_ms());
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let handle = EngineHandle {
        tx: tx.clone(),
        events: events.clone(),
        net: net.clone(),
        network,
        peer_id,
        metrics: metrics.clone(),
        health: store.health_view(),
    };
    // Forward network events and timer ticks into the actor's single input queue.
    let fwd = tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = net_events.recv().await {
            if fwd.send(Input::Net(ev)).await.is_err() {
                break;
            }
        }
    });
    spawn_ticker(tx.clone(), FLUSH_INTERVAL, || Input::Flush);
    spawn_ticker(tx.clone(), RENDEZVOUS_INTERVAL, || Input::Tick);
    spawn_ticker(tx.clone(), SYNC_INTERVAL, || Input::SyncTick);
    spawn_ticker(tx.clone(), PRUNE_INTERVAL, || Input::Prune);
    let mut actor = Actor {
        disk: disk::DiskWatch::new(&store),
        groups,
        store,
        net,
        events,
        me: peer_id,
        metrics,
        gauges: HashMap::new(),
        unflushed: false,
        tx: tx.clone(),
        runtime: tokio::runtime::Handle::current(),
        limiter: SyncLimiter::new(),
        sync: SyncScheduler::new(rand::rngs::OsRng.next_u64()),
        clock: Instant::now(),
        sync_queue: VecDeque::new(),
        sync_busy: false,
        fetched: HashMap::new(),
        last_flush_ms: now_ms(),
        warned_undecryptable: HashSet::new(),
        held: HeldRequests::new(),
        provided_invites: HashSet::new(),
        retention,
        update_policy,
        past_epoch_ttl,
        handle: handle.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("kith-engine".into())
        .spawn(move || {
            // Subscribe to the loaded groups' topics and announce them, then serve.
            actor.after_commit(effects);
            for v in actor.groups.groups() {
                actor.update_gauges(v.meta.id, v.epoch, v.members.len());
            }
            actor.rendezvous();
            actor.run(rx)
        })
        .map_err(|e| EngineError::Internal(format!("cannot start engine thread: {e}")))?;
    Ok((
        handle,
        EngineTask {
            tx,
            thread: Some(thread),
        },
    ))
}

/// Whether applying `effects` sends something this node originated to the network.
fn publishes(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Publish { .. }))
}

/// Sends `make()` to the actor every `period` until the actor is gone.
fn spawn_ticker(tx: mpsc::Sender<Input>, period: Duration, make: fn() -> Input) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        loop {
            interval.tick().await;
            if tx.send(make()).await.is_err() {
                break;
            }
        }
    });
}

struct Actor {
    /// What the actor knows of the store's health (see the `disk` module).
    disk: disk::DiskWatch,
    groups: GroupEngine<KithProvider>,
    store: Store,
    net: NetHandle,
    events: broadcast::Sender<NodeEvent>,
    me: PeerId,
    metrics: Arc<KithMetrics>,
    /// Each group's gauges, created once (creating takes a lock; setting is atomic).
    gauges: HashMap<GroupId, GroupGauges>,
    /// Whether a non-durable commit awaits the next flush.
    unflushed: bool,
    /// The actor's own input queue, for sync tasks to send their pages back.
    tx: mpsc::Sender<Input>,
    /// The runtime sync tasks run on (the actor thread is not a runtime thread).
    runtime: tokio::runtime::Handle,
    /// Per-peer rate limit of inbound sync requests.
    limiter: SyncLimiter,
    /// The requester's side of history sync: when to sync which group with whom.
    sync: SyncScheduler,
    /// The origin of the scheduler's clock.
    clock: Instant,
    /// Scheduler inputs that arose while its outputs were performed (see
    /// [`Actor::sync_input`]).
    sync_queue: VecDeque<sched::Input>,
    /// Whether [`Actor::sync_input`] is performing outputs.
    sync_busy: bool,
    /// Envelopes accepted by the sync run of each group so far.
    fetched: HashMap<GroupId, usize>,
    /// When the last flush tick was handled, wall-clock ms (a long gap means the machine
    /// slept).
    last_flush_ms: u64,
    /// Groups whose undecryptable envelopes were already logged at WARN in this run.
    warned_undecryptable: HashSet<GroupId>,
    /// Join requests held for approval on this node.
    held: HeldRequests,
    /// Invite rendezvous keys this node announces in the DHT.
    provided_invites: HashSet<[u8; 32]>,
    /// How much history to keep per group (`[retention]` in `config.toml`).
    retention: Retention,
    /// When to refresh this node's own key in each group (`[keys]` in `config.toml`).
    update_policy: UpdatePolicy,
    /// How long past epochs' secrets are kept after this node left them.
    past_epoch_ttl: Duration,
    /// A handle to this actor, for work it starts in the background (joining again).
    handle: EngineHandle,
}

impl Actor {
    fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        let mut next: Option<Input> = None;
        loop {
            let input = match next.take() {
                Some(i) => i,
                None => match rx.blocking_recv() {
                    Some(i) => i,
                    None => break,
                },
            };
            self.watch_store();
            match input {
                Input::Net(NetEvent::Gossip { id, source, data }) => {
                    // Group commit: take the gossip that queued up meanwhile, process it all,
                    // and write it in one transaction (one fsync instead of one per message).
                    let mut batch = vec![(id, source, data)];
                    while batch.len() < MAX_GOSSIP_BATCH {
                        match rx.try_recv() {
                            Ok(Input::Net(NetEvent::Gossip { id, source, data })) => {
                                batch.push((id, source, data))
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.on_gossip(batch);
                }
                Input::Net(ev) => self.on_net(ev),
                Input::Call(call) => self.on_call(call),
                Input::Tick => {
                    self.self_updates();
                    self.rendezvous();
                }
                Input::SyncTick => {
                    let groups = self.active_groups();
                    self.sync_input(sched::Input::SyncAll { groups });
                }
                Input::SyncReply { id, result } => {
                    let input = match result {
                        Ok(response) => sched::Input::Response { id, response },
                        Err(NetError::Stopped) => sched::Input::RequestFailed {
                            id,
                            failure: sched::RequestFailure::Stopped,
                        },
                        Err(e) => {
                            tracing::debug!(error = %e, "sync request failed");
                            sched::Input::RequestFailed {
                                id,
                                failure: sched::RequestFailure::Unanswered,
                            }
                        }
                    };
                    self.sync_input(input);
                }
                Input::SyncTimer => self.sync_input(sched::Input::Timer),
                Input::Flush => {
                    self.retry_store();
                    // Wall-clock time: the monotonic clock stands still while the machine
                    // sleeps.
                    let gap_ms = now_ms().saturating_sub(self.last_flush_ms);
                    if gap_ms >= WAKE_GAP.as_millis() as u64 {
                        tracing::info!(
                            gap_s = gap_ms / 1000,
                            "woke up after a pause; catching up before showing new messages"
                        );
                        self.groups.begin_catch_up_all(now_ms());
                        let groups = self.active_groups();
                        self.sync_input(sched::Input::Woke { groups });
                    }
                    self.last_flush_ms = now_ms();
                    // Stale holds end, failed runs are retried, holding groups and members
                    // that connected meanwhile get a run (the scheduler decides which).
                    let holding: Vec<GroupId> = self
                        .groups
                        .groups()
                        .iter()
                        .map(|v| v.meta.id)
                        .filter(|g| self.groups.is_catching_up(g))
                        .collect();
                    let stale = self
                        .groups
                        .stale_catch_ups(now_ms(), CATCH_UP_HOLD_LIMIT.as_millis() as u64);
                    self.sync_input(sched::Input::Tick { holding, stale });
                    self.expire_past_epochs();
                    self.resend_tick();
                    self.flush();
                }
                Input::Prune => self.prune(),
                Input::SyncGroup(group) => self.sync_input(sched::Input::Sync {
                    group,
                    trigger: sched::Trigger::Gap,
                }),
                Input::Shutdown => {
                    self.flush();
                    break;
                }
            }
        }
        tracing::debug!("engine stopped; store closed");
    }

    /// Processes received envelopes, reports each verdict to gossipsub as soon as MLS has
    /// judged it (forwarding does not wait for our disk), then stores all of them in one
    /// transaction. If that write fails, the MLS state is rolled back to disk and the
    /// messages are lost for this node only (they were valid, so forwarding them was right;
    /// history sync can fetch them again).
    fn on_gossip(&mut self, batch: Vec<(MessageId, PeerId, Vec<u8>)>) {
        let mut effects = Vec::new();
        let mut seen: HashSet<MessageId> = HashSet::new();
        // While the disk cannot be written, nothing is processed (it could not be stored):
        // other members hold these messages, and history sync fetches them once it can.
        let writable = self.disk_ok();
        for (id, source, data) in batch {
            let verdict = if !seen.insert(id) {
                Verdict::Ignore(IgnoreReason::Duplicate)
            } else if !writable {
                Verdict::Ignore(IgnoreReason::Storage)
            } else {
                match self.store.has_message(&id) {
                    Ok(true) => Verdict::Ignore(IgnoreReason::Duplicate),
                    Ok(false) => {
                        let (verdict, fx) = self.groups.handle_envelope(&data, now_ms());
                        effects.extend(fx);
                        if matches!(verdict, Verdict::Ignore(_)) {
                            self.observe_gap(&data);
                        }
                        verdict
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store read failed");
                        Verdict::Ignore(IgnoreReason::Storage)
                    }
                }
            };
            self.metrics.envelope(&verdict);
            match &verdict {
                Verdict::Reject(why) => {
                    tracing::warn!(msg = %id.short(), from = %source, reason = %why, "rejected gossip message")
                }
                Verdict::Ignore(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "ignored gossip message")
                }
                Verdict::Accept => tracing::debug!(msg = %id.short(), "accepted gossip message"),
            }
            let _ = self.net.validate_blocking(id, source, &verdict);
        }
        crashpoint::reached(Point::Ingest);
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(error = %e, "cannot store received messages; they are lost on this node");
            self.metrics.envelope_ignored(&IgnoreReason::Storage);
        }
    }

    /// If `data` is an envelope of a group this node is behind in, tells the sync scheduler
    /// (its gap detector starts a sync when it signals).
    fn observe_gap(&mut self, data: &[u8]) {
        let Ok(env) = Envelope::decode(data) else {
            return;
        };
        let group = env.group();
        let Some(current_epoch) = self.groups.group_epoch(&group) else {
            return;
        };
        self.sync_input(sched::Input::FutureEpoch {
            group,
            seen_epoch: env.epoch(),
            current_epoch,
        });
    }

    /// Processes envelopes fetched by history sync for `group`, in the given order, like
    /// gossip but without reporting verdicts: ones already stored are skipped, and
    /// everything is written in one transaction. Live envelopes held meanwhile are processed
    /// when the run ends (`GroupEngine::handle_synced_envelope`). Returns how many were
    /// accepted.
    fn ingest(&mut self, group: GroupId, envelopes: Vec<Vec<u8>>) -> usize {
        if !self.disk_ok() {
            // Fetched again by the sync started when the store recovers.
            return 0;
        }
        let new: Vec<Vec<u8>> = envelopes
            .into_iter()
            .filter(|data| match self.store.has_message(&MessageId::of(data)) {
                Ok(held) => !held,
                Err(e) => {
                    tracing::error!(error = %e, "store read failed");
                    false
                }
            })
            .collect();
        // Each sender's messages are read in position order, whatever order the answers
        // brought them in (`GroupEngine::handle_synced_batch`).
        let (verdicts, effects) = self.groups.handle_synced_batch(new, now_ms());
        let mut accepted = 0;
        for (id, verdict) in verdicts {
            match verdict {
                Verdict::Accept => accepted += 1,
                Verdict::Reject(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "rejected synced envelope");
                }
                Verdict::Ignore(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "ignored synced envelope");
                }
            }
        }
        crashpoint::reached(Point::Sync);
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(group = %group.short(), error = %e, "cannot store synced messages");
            return 0;
        }
        accepted
    }

    /// The active groups.
    fn active_groups(&self) -> Vec<GroupId> {
        self.groups
            .groups()
            .iter()
            .filter(|v| v.active)
            .map(|v| v.meta.id)
            .collect()
    }

    /// Feeds `input` to the sync scheduler and performs its outputs. Inputs that arise while
    /// outputs are performed (reading fetched envelopes can reveal another gap) are queued
    /// and fed after the current outputs, so the scheduler sees them in order.
    fn sync_input(&mut self, input: sched::Input) {
        self.sync_queue.push_back(input);
        if self.sync_busy {
            return;
        }
        self.sync_busy = true;
        while let Some(input) = self.sync_queue.pop_front() {
            let now = self.clock.elapsed().as_millis() as sched::Millis;
            let mut ctx = SyncContext {
                writable: self.disk_ok(),
                groups: &self.groups,
                store: &self.store,
                net: &self.net,
                me: self.me,
            };
            let outputs = self.sync.handle(now, input, &mut ctx);
            for output in outputs {
                self.perform_sync(now, output);
            }
        }
        self.sync_busy = false;
    }

    /// Performs one output of the sync scheduler.
    fn perform_sync(&mut self, now: sched::Millis, output: sched::Output) {
        match output {
            sched::Output::Request { peer, id, request } => {
                let net = self.net.clone();
                let tx = self.tx.clone();
                self.runtime.spawn(async move {
                    let result = net.sync(peer, *request).await;
                    let _ = tx.send(Input::SyncReply { id, result }).await;
                });
            }
            sched::Output::ScheduleTimer { at } => {
                let tx = self.tx.clone();
                let wait = Duration::from_millis(at.saturating_sub(now));
                self.runtime.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Input::SyncTimer).await;
                });
            }
            sched::Output::BeginHold { group } => self.groups.begin_catch_up(&group, now_ms()),
            sched::Output::Ingest { group, envelopes } => {
                let accepted = self.ingest(group, envelopes);
                *self.fetched.entry(group).or_default() += accepted;
            }
            sched::Output::EndHold { group, in_time } => self.end_catch_up(group, in_time),
            sched::Output::RunEnded {
                group,
                complete,
                started,
            } => {
                let fetched = self.fetched.remove(&group).unwrap_or(0);
                tracing::debug!(group = %group.short(), complete, fetched, took_ms = now.saturating_sub(started), "history sync ended");
                if fetched > 0 {
                    tracing::info!(group = %group.short(), fetched, "fetched missed history");
                    let _ = self.events.send(NodeEvent::HistorySynced {
                        group: group.to_string(),
                        fetched,
                    });
                }
            }
            sched::Output::NotAMember { group } => {
                // If we joined recently, the commit that added us may have lost.
                if let Some(fx) = self.groups.member_says_not_in(&group) {
                    self.after_commit(vec![fx]);
                }
            }
        }
    }

    /// Processes the live envelopes of `group` held during its catch-up, after the fetched
    /// (older) ones.
    /// With `in_time` false (the hold ran out of time) they are read whatever positions
    /// are still missing.
    fn end_catch_up(&mut self, group: GroupId, in_time: bool) {
        let effects = if in_time {
            self.groups.end_catch_up(&group, now_ms())
        } else {
            self.groups.end_catch_up_now(&group, now_ms())
        };
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(error = %e, "cannot store messages held during history sync");
        }
    }

    /// Answers a sync request from `peer`.
    ///
    /// Membership: the transport authenticated `peer` (Noise), and every member's MLS
    /// credential binds its PeerId to its leaf key (see `kith_protocol::group::bound_peer`), so
    /// `peer` being in the group's current member list proves membership. The request's
    /// `proof` field is therefore not checked (it is reserved for relayed requests, where the
    /// transport peer is not the requester).
    fn on_sync_request(&mut self, peer: PeerId, request: SyncRequest) -> SyncResponse {
        let group = *request.group();
        let now = Instant::now();
        if !self.limiter.allow(peer, now) {
            tracing::debug!(%peer, "sync request rate-limited");
            return SyncResponse::Refused(SyncRefusal::RateLimited);
        }
        let Some(view) = self.groups.group(&group).filter(|v| v.active) else {
            return SyncResponse::Refused(SyncRefusal::UnknownGroup);
        };
        if !view.members.iter().any(|(_, p)| *p == peer) {
            tracing::debug!(%peer, group = %group.short(), "sync request from a non-member");
            return SyncResponse::Refused(SyncRefusal::NotMember);
        }
        // The summary names the requester's commit per epoch: its branch. If it differs from
        // ours, fetch its commits too, so the concurrent-commit rule can decide on our side.
        let held: Vec<(u64, MessageId)> = request
            .summary()
            .map(|s| {
                s.epochs
                    .iter()
                    .filter_map(|e| Some((e.epoch, e.commit?)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(epoch) = self.groups.detect_fork(&group, held) {
            tracing::warn!(%peer, group = %group.short(), epoch, "fork detected: this member holds another commit for the epoch");
            self.metrics.fork_detected();
            self.sync_input(sched::Input::ForkSeen { group, peer });
        }
        let envelopes = match self.store.envelopes_of_group(&group, MAX_SCAN_ENVELOPES) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(%peer, group = %group.short(), error = %e, "cannot read envelopes to answer a sync request; refused as unavailable");
                return SyncResponse::Refused(SyncRefusal::Unavailable);
            }
        };
        let mut items = Vec::with_capacity(envelopes.len());
        for env in &envelopes {
            match env.kind {
                PayloadKind::Commit => items.push(SyncItem::commit(env)),
                PayloadKind::Application => match self.store.history_entry(&env.id) {
                    Ok(Some(h)) => items.push(SyncItem::application(env, h.sent_at_ms, &h.sender)),
                    Ok(None) => {}
                    Err(e) => {
                        // Skipping it would send a page that claims to be complete but is not.
                        tracing::error!(%peer, group = %group.short(), error = %e, "cannot read a history entry to answer a sync request; refused as unavailable");
                        return SyncResponse::Refused(SyncRefusal::Unavailable);
                    }
                },
                PayloadKind::Proposal => {}
            }
        }
        let (response, bytes) = respond(&request, &items);
        self.limiter.charge(peer, bytes, now);
        tracing::debug!(%peer, group = %group.short(), bytes, "serving history sync");
        response
    }

    /// Writes effects' records and the staged MLS state in one transaction, then performs
    /// the network and notification effects. On failure, rolls memory back to disk.
    fn apply(&mut self, effects: Vec<Effect>) -> Result<(), EngineError> {
        self.apply_with(effects, true)
    }

    /// [`Actor::apply`] with a choice of durability: received messages are committed
    /// without fsync (atomic, lost together with their MLS state on a crash, made durable
    /// within [`FLUSH_INTERVAL`]); everything this node originates is durable before it is
    /// published, so a crash can never make it reuse a sender key generation.
    ///
    /// A batch that publishes anything is always durable, whatever the caller asked: a
    /// received message can make this node commit (e.g. a leave proposal it must commit),
    /// and a commit others may already apply must never be lost here by a crash.
    fn apply_with(&mut self, mut effects: Vec<Effect>, durable: bool) -> Result<(), EngineError> {
        self.drop_known_undecryptable(&mut effects);
        self.want_resend(&effects)?;
        let durable = durable || publishes(&effects);
        crashpoint::reached_when(Point::Commit, || crashpoint::merges_commit(&effects));
        let batch = Batch::from_effects(&effects);
        if (!batch.is_empty() || self.store.has_staged())
            && let Err(e) = self.commit_with(batch, durable)
        {
            self.rollback();
            return Err(e.into());
        }
        crashpoint::reached_when(Point::Send, || publishes(&effects));
        self.after_commit(effects);
        Ok(())
    }

    /// Drops the [`Effect::Undecryptable`]s of envelopes this node already holds: a copy of a
    /// message it read (say, one held live during a sync that fetched it too) is refused by
    /// MLS like a lost one, but nothing is lost.
    fn drop_known_undecryptable(&self, effects: &mut Vec<Effect>) {
        if !effects
            .iter()
            .any(|e| matches!(e, Effect::Undecryptable { .. }))
        {
            return;
        }
        let mut known: HashSet<MessageId> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::SaveEnvelope(env) => Some(env.id),
                _ => None,
            })
            .collect();
        effects.retain(|e| match e {
            Effect::Undecryptable { envelope, .. } => {
                let held = known.contains(&envelope.id)
                    || self.store.has_message(&envelope.id).unwrap_or(true);
                known.insert(envelope.id);
                !held
            }
            _ => true,
        });
    }

    /// Asks, in the same commit, for the texts of the envelopes this node truly cannot
    /// decrypt: their senders send them again (see `GroupEngine::resend_tick`).
    fn want_resend(&mut self, effects: &[Effect]) -> Result<(), EngineError> {
        let mut lost: HashMap<GroupId, Vec<MessageId>> = HashMap::new();
        for e in effects {
            if let Effect::Undecryptable { envelope, .. } = e {
                lost.entry(envelope.group).or_default().push(envelope.id);
            }
        }
        for (group, ids) in lost {
            if let Err(e) = self.groups.want_resend(group, &ids) {
                self.rollback();
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Sends what the re-send tick has due: requests for texts this node cannot decrypt,
    /// and the texts members asked it for.
    fn resend_tick(&mut self) {
        if !self.disk_ok() {
            return;
        }
        let result = self
            .groups
            .resend_tick(now_ms())
            .map_err(EngineError::from)
            .and_then(|fx| self.apply_with(fx, false));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot send re-send requests or answers");
            self.rollback();
        }
    }

    /// Commits a batch, timing it for `kith_store_commit_seconds`.
    fn commit_with(&mut self, batch: Batch, durable: bool) -> Result<(), StoreError> {
        if !self.disk_ok() {
            // Memory may be ahead of the file until the MLS state is reloaded from it.
            return Err(self.store.refusal());
        }
        let started = Instant::now();
        let result = self.store.commit_with(batch, durable);
        self.metrics.store_commit(started.elapsed());
        if result.is_ok() {
            // A durable commit also makes every earlier non-durable one durable.
            self.unflushed = !durable;
        }
        result
    }

    /// Deletes history and envelopes beyond the retention policy, at most [`PRUNE_BUDGET`]
    /// history rows per run, in non-durable commits (made durable by the next flush).
    fn prune(&mut self) {
        if !self.disk_ok() {
            // The next prune tick after the store recovers catches up.
            return;
        }
        let groups = match self.store.groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot list groups to prune");
                return;
            }
        };
        let mut budget = PRUNE_BUDGET;
        let mut more = false;
        for g in groups {
            if budget == 0 {
                more = true;
                break;
            }
            match self.store.prune(&g.id, self.retention, now_ms(), budget) {
                Ok(p) => {
                    if p.history > 0 || p.envelopes > 0 {
                        self.unflushed = true;
                        tracing::info!(group = %g.id.short(), history = p.history, envelopes = p.envelopes, "pruned old history");
                    }
                    budget = budget.saturating_sub(p.history);
                    more |= p.more;
                }
                Err(e) => tracing::error!(group = %g.id.short(), error = %e, "prune failed"),
            }
        }
        let before = (now_ms() / 1000).saturating_sub(INVITE_RECORD_GRACE_SECS);
        match self.store.prune_invites(before, PRUNE_BUDGET) {
            Ok(0) => {}
            Ok(n) => {
                self.unflushed = true;
                tracing::info!(invites = n, "deleted expired invite records");
            }
            Err(e) => tracing::error!(error = %e, "cannot prune invites"),
        }
        if more {
            let _ = self.tx.try_send(Input::Prune);
        }
    }

    /// Drops the secrets of past epochs this node left `past_epoch_ttl` ago and stores the
    /// result (on every flush tick; nothing is written while nothing is due).
    fn expire_past_epochs(&mut self) {
        if !self.disk_ok() {
            return;
        }
        let result = self
            .groups
            .expire_past_epochs(now_ms(), self.past_epoch_ttl)
            .map_err(EngineError::from)
            .and_then(|done| {
                self.metrics.past_epochs_expired(done.epochs);
                if done.staged {
                    self.apply_with(Vec::new(), false)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot expire past epochs");
            self.rollback();
        }
    }

    fn flush(&mut self) {
        // While the store fails, what was not flushed is gone with the reopened file.
        if self.unflushed && self.store.is_writable() {
            crashpoint::reached(Point::Flush);
            match self.store.flush() {
                Ok(()) => self.unflushed = false,
                Err(e) => tracing::error!(error = %e, "cannot flush the store"),
            }
        }
    }

    fn update_gauges(&mut self, group: GroupId, epoch: u64, members: usize) {
        let metrics = &self.metrics;
        self.gauges
            .entry(group)
            .or_insert_with(|| metrics.group_gauges(&group))
            .set(epoch, members);
    }

    fn rollback(&mut self) {
        let generation = self.store.generation();
        self.store.discard_staged();
        match self.groups.reload_all() {
            Ok(()) => self.disk.loaded(generation),
            Err(e) => {
                self.disk.reload_failed();
                tracing::error!(error = %e, "cannot reload group state after a failed write");
            }
        }
    }

    fn after_commit(&mut self, effects: Vec<Effect>) {
        let invites_changed = effects.iter().any(|e| matches!(e, Effect::Invite(_)));
        let mut rolled_back = Vec::new();
        let mut behind = Vec::new();
        for e in effects {
            let sent = match e {
                Effect::Publish { topic, data } => self.net.publish_blocking(topic, data),
                Effect::Subscribe(t) => self.net.subscribe_blocking(t),
                Effect::Unsubscribe(t) => self.net.unsubscribe_blocking(t),
                Effect::Record(h) => {
                    // Counted before it is announced, so whoever sees the event sees the count.
                    if h.sender != self.me && matches!(h.kind, EntryKind::Text(_)) {
                        self.metrics.messages_received(1);
                    }
                    let _ = self.events.send(NodeEvent::Message(message_info(&h)));
                    Ok(())
                }
                Effect::EpochChanged {
                    group,
                    epoch,
                    member_count,
                } => {
                    self.update_gauges(group, epoch, member_count);
                    let _ = self.events.send(NodeEvent::EpochChanged {
                        group: group.to_string(),
                        epoch,
                        member_count,
                    });
                    Ok(())
                }
                Effect::RolledBack {
                    group, to_epoch, ..
                } => {
                    self.metrics.rollback();
                    tracing::info!(group = %group.short(), to_epoch, "rolled back to the winning branch");
                    rolled_back.push(group);
                    Ok(())
                }
                Effect::DeepForkLost {
                    group,
                    epoch,
                    commit,
                    members,
                } => {
                    self.metrics.deep_fork();
                    let handle = self.handle.clone();
                    self.runtime.spawn(async move {
                        handle.rejoin_member(group, epoch, commit, members).await
                    });
                    Ok(())
                }
                Effect::JoinLost { group, link, by } => {
                    let handle = self.handle.clone();
                    self.runtime
                        .spawn(async move { handle.rejoin(group, link, by).await });
                    Ok(())
                }
                Effect::Behind { group, missing } => {
                    tracing::debug!(group = %group.short(), missing, "messages missing before a live one; fetching history first");
                    behind.push(group);
                    Ok(())
                }
                Effect::Undecryptable { envelope, reason } => {
                    self.metrics.undecryptable(reason);
                    if self.warned_undecryptable.insert(envelope.group) {
                        tracing::warn!(
                            group = %envelope.group.short(),
                            msg = %envelope.id.short(),
                            epoch = envelope.epoch,
                            reason = reason.label(),
                            "a message of this group cannot be decrypted: {reason}; asking the group for it again (until its sender answers it counts as lost in `kith group show`; further ones are logged at debug)"
                        );
                    } else {
                        tracing::debug!(group = %envelope.group.short(), msg = %envelope.id.short(), reason = reason.label(), "undecryptable message");
                    }
                    Ok(())
                }
                Effect::Recovered { group, envelope } => {
                    self.metrics.recovered();
                    tracing::debug!(group = %group.short(), msg = %envelope.short(), "a message that could not be decrypted arrived again from its sender");
                    Ok(())
                }
                Effect::SaveGroup(_)
                | Effect::SaveEnvelope(_)
                | Effect::Invite(_)
                | Effect::LinkEnvelope { .. } => Ok(()),
            };
            if sent.is_err() {
                tracing::warn!("network task has stopped; effect dropped");
            }
        }
        if invites_changed {
            self.announce_invites(false);
        }
        // The winning branch's messages sent so far are on other members only: fetch them
        // now rather than at the next routine sync.
        // A sender's messages are missing before live ones held now: fetch them.
        for group in rolled_back.into_iter().chain(behind) {
            self.sync_input(sched::Input::Sync {
                group,
                trigger: sched::Trigger::Gap,
            });
        }
    }

    /// Announces this node in the DHT under the rendezvous key of every unexpired invite of
    /// its active groups, ended ones included (all of them again when `refresh`, else only
    /// new ones), and stops announcing invites that expired.
    fn announce_invites(&mut self, refresh: bool) {
        let records = match self.store.invites() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read invites to announce");
                return;
            }
        };
        let now = now_ms() / 1000;
        // Ended (revoked, used-up) invites too, until they expire, so a joiner reaching any
        // member hears the reason; live ones first when there are too many.
        let mut active: Vec<&InviteRecord> = records
            .iter()
            .filter(|r| {
                r.is_announced(now)
                    && self
                        .groups
                        .group(&r.group)
                        .is_some_and(|v| v.active && !v.leaving)
            })
            .collect();
        active.sort_by_key(|r| (!r.is_active(now), std::cmp::Reverse(r.created_at)));
        let network = self.groups.network().to_owned();
        let wanted: HashSet<[u8; 32]> = active
            .iter()
            .take(MAX_PROVIDED_INVITES)
            .filter_map(|r| r.secret_hash.map(|h| invite_rendezvous_key(&network, &h)))
            .collect();
        for key in self.provided_invites.difference(&wanted) {
            let _ = self.net.stop_providing_blocking(*key);
        }
        for key in &wanted {
            if refresh || !self.provided_invites.contains(key) {
                let _ = self.net.provide_blocking(*key);
            }
        }
        self.provided_invites = wanted;
    }

    /// Announces this node's groups and active invites in the DHT and looks for other
    /// online members.
    fn rendezvous(&mut self) {
        for v in self.groups.groups() {
            if v.active {
                let key = v.meta.id.provider_key(self.groups.network());
                let _ = self.net.provide_blocking(key);
                let _ = self.net.find_providers_blocking(key);
            }
        }
        self.announce_invites(true);
    }

    fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Gossip { id, source, data } => self.on_gossip(vec![(id, source, data)]),
            NetEvent::InboundJoin {
                peer,
                request,
                token,
            } => {
                let response = self.on_join_request(peer, request);
                let _ = self.net.respond_join_blocking(token, response);
            }
            NetEvent::InboundSync {
                peer,
                request,
                token,
            } => {
                let response = self.on_sync_request(peer, request);
                let _ = self.net.respond_sync_blocking(token, response);
            }
            NetEvent::PeerConnected { peer } => {
                let groups: Vec<GroupId> = self
                    .groups
                    .groups()
                    .iter()
                    .filter(|v| v.active && v.members.iter().any(|(_, p)| *p == peer))
                    .map(|v| v.meta.id)
                    .collect();
                if !groups.is_empty() {
                    self.sync_input(sched::Input::PeerConnected { peer, groups });
                }
            }
            NetEvent::PeerIdentified { peer, addrs } => {
                let batch = Batch {
                    peers: vec![(peer, addrs)],
                    ..Batch::default()
                };
                // While the disk fails, the address book waits for the next identify.
                if self.disk_ok()
                    && let Err(e) = self.commit_with(batch, false)
                {
                    tracing::warn!(error = %e, "cannot update the address book");
                }
            }
        }
    }

    /// Answers a join request. A retry of a request held for approval gets its current
    /// answer; a new request is screened, then held (approval invites) or admitted.
    fn on_join_request(&mut self, peer: PeerId, request: JoinRequest) -> JoinResponse {
        let now = now_ms();
        self.held.expire(now);
        let held_id = crate::admission::request_id(&peer, &request);
        if let Some(h) = self.held.retry(held_id, now) {
            return match &h.state {
                HeldState::Waiting => JoinResponse::AwaitingApproval { request: held_id },
                HeldState::Approved(response) => response.clone(),
                HeldState::Denied => JoinResponse::Rejected(JoinRejection::Denied),
            };
        }
        let r = match &request {
            JoinRequest::V1(r) => r,
            JoinRequest::Rejoin(_) => {
                let JoinRequest::Rejoin(r) = request else {
                    return JoinResponse::Rejected(JoinRejection::Internal);
                };
                return self.on_rejoin_request(peer, r);
            }
        };
        let invite = InviteId::of(&secret_hash(&r.secret));
        let group = r.group;
        let record = match self.store.invite(&invite) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read invites");
                return JoinResponse::Rejected(JoinRejection::Internal);
            }
        };
        if let Err(why) = self
            .groups
            .screen_join_request(peer, &request, record.as_ref(), now)
        {
            tracing::info!(%peer, group = %group.short(), reason = %why, "refused join request");
            self.metrics.join_request(JoinRequestResult::Refused);
            return JoinResponse::Rejected(why);
        }
        if record.as_ref().is_some_and(|r| r.approval) {
            return match self.held.hold(peer, group, invite, request, now) {
                Ok(h) => {
                    tracing::info!(%peer, group = %group.short(), request = %request_id_text(h.id), "join request awaits approval");
                    let _ = self.events.send(NodeEvent::JoinRequestHeld(held_info(h)));
                    JoinResponse::AwaitingApproval { request: h.id }
                }
                Err(e) => {
                    tracing::warn!(%peer, group = %group.short(), error = %e, "cannot hold join request");
                    JoinResponse::Rejected(JoinRejection::Busy)
                }
            };
        }
        self.admit(peer, request, record)
    }

    /// Persists the key package a join or rejoin request carries (its private keys must be
    /// on disk before we ask), or rolls back if making it failed.
    fn stored_request(
        &mut self,
        req: Result<JoinRequest, GroupError>,
    ) -> Result<JoinRequest, EngineError> {
        let res = req
            .map_err(EngineError::from)
            .and_then(|req| self.apply(Vec::new()).map(|()| req));
        if res.is_err() {
            self.rollback();
        }
        res
    }

    /// Tells the group the state of its live invites after adding a member, who could not
    /// read the messages that created them (see [`GroupEngine::share_invite_states`]).
    fn share_invite_states(&mut self, group: GroupId) {
        let records = match self.store.invites() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read invites to share them");
                return;
            }
        };
        match self.groups.share_invite_states(group, &records, now_ms()) {
            Ok(fx) if fx.is_empty() => {}
            Ok(fx) => {
                if let Err(e) = self.apply(fx) {
                    tracing::warn!(group = %group.short(), error = %e, "cannot share invite states");
                }
            }
            Err(e) => {
                self.rollback();
                tracing::warn!(group = %group.short(), error = %e, "cannot share invite states");
            }
        }
    }

    /// A member whose branch lost a deep fork asks to be added again (see
    /// [`GroupEngine::handle_rejoin_request`]).
    fn on_rejoin_request(&mut self, peer: PeerId, r: RejoinRequestV1) -> JoinResponse {
        let group = r.group;
        match self.groups.handle_rejoin_request(peer, r, now_ms()) {
            Ok((response, effects)) => match self.apply(effects) {
                Ok(()) => {
                    if let JoinResponse::Rejected(why) = &response {
                        tracing::info!(%peer, group = %group.short(), reason = %why, "refused rejoin request");
                    } else {
                        tracing::info!(%peer, group = %group.short(), "added a member again after a deep fork");
                    }
                    response
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot store the rejoin; refusing it");
                    JoinResponse::Rejected(JoinRejection::Internal)
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "rejoin request failed");
                self.rollback();
                JoinResponse::Rejected(JoinRejection::Internal)
            }
        }
    }

    /// Adds `peer` to the group with `request` (screened again inside), stores and publishes
    /// the commit, and returns the answer for the joiner.
    fn admit(
        &mut self,
        peer: PeerId,
        request: JoinRequest,
        record: Option<InviteRecord>,
    ) -> JoinResponse {
        let JoinRequest::V1(r) = &request else {
            return JoinResponse::Rejected(JoinRejection::Internal);
        };
        let group = r.group;
        match self
            .groups
            .handle_join_request(peer, request, record, now_ms())
        {
            Ok((response, effects)) => match self.apply(effects) {
                Ok(()) => {
                    if let JoinResponse::Rejected(why) = &response {
                        tracing::info!(%peer, group = %group.short(), reason = %why, "refused join request");
                        self.metrics.join_request(JoinRequestResult::Refused);
                    } else {
                        tracing::info!(%peer, group = %group.short(), "added a member by invite");
                        self.metrics.join_request(JoinRequestResult::Accepted);
                        self.share_invite_states(group);
                    }
                    response
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot store the join; refusing it");
                    self.metrics.join_request(JoinRequestResult::Error);
                    JoinResponse::Rejected(JoinRejection::Internal)
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "join request failed");
                self.rollback();
                self.metrics.join_request(JoinRequestResult::Error);
                JoinResponse::Rejected(JoinRejection::Internal)
            }
        }
    }

    /// Approves or denies a held join request of group `q` (id prefix `which`). Approving
    /// commits the Add now; the joiner collects the Welcome with its next retry, so a joiner
    /// that stopped retrying is not added.
    fn decide_join(
        &mut self,
        q: &str,
        which: &str,
        approve: bool,
    ) -> Result<JoinRequestInfo, EngineError> {
        let id = self.resolve(q)?;
        let now = now_ms();
        self.held.expire(now);
        let h = self.held.find(id, which).map_err(|e| match e {
            FindError::NotFound(_) => EngineError::NotFound(e.to_string()),
            FindError::Ambiguous(_) => EngineError::BadRequest(e.to_string()),
        })?;
        if h.state != HeldState::Waiting {
            return Err(EngineError::BadRequest(format!(
                "join request {} was already {}",
                request_id_text(h.id),
                held_info(h).state
            )));
        }
        let (held_id, peer, request, invite) = (h.id, h.peer, h.request.clone(), h.invite);
        if !approve {
            self.held.decide(held_id, HeldState::Denied, now);
            tracing::info!(%peer, group = %id.short(), "denied a join request");
        } else {
            if !h.joiner_waiting(now) {
                return Err(EngineError::BadRequest(
                    "the joiner stopped waiting; it must ask again".to_owned(),
                ));
            }
            let record = self.store.invite(&invite)?;
            match self.admit(peer, request, record) {
                JoinResponse::Rejected(why) => return Err(EngineError::JoinRejected(why)),
                response => self
                    .held
                    .decide(held_id, HeldState::Approved(response), now),
            }
        }
        self.held
            .retry(held_id, now)
            .map(held_info)
            .ok_or_else(|| EngineError::Internal("held request vanished".to_owned()))
    }

    fn resolve(&self, query: &str) -> Result<GroupId, EngineError> {
        let views = self.groups.groups();
        resolve_group(
            query,
            views.iter().map(|v| (v.meta.id, v.meta.name.as_str())),
        )
    }

    fn view(&self, id: &GroupId) -> Result<GroupView, EngineError> {
        self.groups
            .group(id)
            .ok_or_else(|| EngineError::GroupNotFound(id.to_string()))
    }

    fn on_call(&mut self, call: Call) {
        let Some(call) = self.refuse_unwritable(call) else {
            return;
        };
        match call {
            Call::Groups(r) => {
                let list = self
                    .groups
                    .groups()
                    .iter()
                    .map(|v| {
                        let id = v.meta.id;
                        let held = self.groups.pending_count(&id);
                        let undecryptable = self
                            .store
                            .undecryptable_counts(&id)
                            .map(|c| c.values().sum())
                            .unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "cannot count undecryptable messages");
                                0
                            });
                        GroupSummary {
                            held,
                            in_sync: held == 0
                                && !self.sync.is_running(&id)
                                && !self.sync.is_unsynced(&id)
                                && !self.groups.is_catching_up(&id),
                            undecryptable,
                            missing: self.groups.missing_messages(&id),
                            sync_failures: self.sync.failures(&id),
                            ..summary(v)
                        }
                    })
                    .collect();
                let _ = r.send(Ok(list));
            }
            Call::Group(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let v = self.view(&id)?;
                    let undecryptable = self
                        .store
                        .undecryptable_counts(&id)?
                        .into_iter()
                        .map(|(reason, n)| (reason.label().to_owned(), n))
                        .collect();
                    Ok(GroupInfo {
                        undecryptable,
                        missing: self.groups.missing_messages(&id),
                        catching_up: self.groups.is_catching_up(&id),
                        sync_failures: self.sync.failures(&id),
                        ..group_info(&v, self.me)
                    })
                });
                let _ = r.send(res);
            }
            Call::CreateGroup(name, r) => {
                let _ = r.send(self.create_group(&name));
            }
            Call::CreateInvite(q, req, r) => {
                let _ = r.send(self.create_invite(&q, req));
            }
            Call::ListInvites(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let now = now_ms() / 1000;
                    let mut list: Vec<InviteRecord> = self
                        .store
                        .invites()?
                        .into_iter()
                        .filter(|r| r.group == id)
                        .collect();
                    list.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
                    Ok(list.iter().map(|r| invite_summary(r, now)).collect())
                });
                let _ = r.send(res);
            }
            Call::RevokeInvite(q, which, r) => {
                let _ = r.send(self.revoke_invite(&q, &which));
            }
            Call::JoinRequests(q, r) => {
                let res = self.resolve(&q).map(|id| {
                    self.held.expire(now_ms());
                    self.held.of_group(id).into_iter().map(held_info).collect()
                });
                let _ = r.send(res);
            }
            Call::DecideJoin(q, which, approve, r) => {
                let _ = r.send(self.decide_join(&q, &which, approve));
            }
            Call::PrepareJoin(invite, r) => {
                let req = self.groups.prepare_join(&invite, now_ms());
                let _ = r.send(self.stored_request(req));
            }
            Call::CompleteJoin(invite, response, r) => {
                let _ = r.send(self.complete_join(&invite, response));
            }
            Call::PrepareRejoin(group, epoch, commit, r) => {
                let req = self.groups.prepare_rejoin(group, epoch, commit);
                let _ = r.send(self.stored_request(req));
            }
            Call::CompleteRejoin(group, peer, response, r) => {
                let res = match self
                    .groups
                    .handle_rejoin_response(group, peer, response, now_ms())
                {
                    Ok((id, effects)) => self
                        .apply(effects)
                        .and_then(|()| Ok(group_info(&self.view(&id)?, self.me))),
                    Err(e) => {
                        self.rollback();
                        Err(e.into())
                    }
                };
                if res.is_ok() {
                    self.sync_input(sched::Input::Sync {
                        group,
                        trigger: sched::Trigger::Gap,
                    });
                    self.follow_up_syncs(group);
                }
                let _ = r.send(res);
            }
            Call::RejoinFailed(group, r) => {
                self.groups.rejoin_failed(&group);
                let _ = r.send(Ok(()));
            }
            Call::JoinOutcome(group, outcome, r) => {
                match outcome {
                    None => self.groups.keep_join(&group),
                    Some(reason) => self.groups.join_lost(&group, reason),
                }
                let _ = r.send(Ok(()));
            }
            Call::Send(q, text, r) => {
                let sent = self.send(&q, &text);
                let ok = sent.is_ok();
                let _ = r.send(sent);
                // The message count may just have reached `[keys] update_after_messages`.
                if ok {
                    self.self_updates();
                }
            }
            Call::RemoveMember(q, peer, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.remove_member(id, peer, now_ms());
                    self.commit_local(id, fx)
                });
                if res.is_ok() {
                    tracing::info!(group = %q, %peer, "removed a member");
                }
                let _ = r.send(res);
            }
            Call::LeaveGroup(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.leave_group(id, now_ms());
                    self.commit_local(id, fx)
                });
                if res.is_ok() {
                    tracing::info!(group = %q, "asked to leave the group");
                }
                let _ = r.send(res);
            }
            Call::SelfUpdate(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.self_update(id, now_ms());
                    self.commit_local(id, fx)
                });
                let _ = r.send(res);
            }
            Call::History(q, limit, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    Ok(self
                        .store
                        .history(&id, limit.clamp(1, MAX_HISTORY))?
                        .iter()
                        .map(message_info)
                        .collect())
                });
                let _ = r.send(res);
            }
        }
    }

    /// Applies the effects of a local membership operation on `id` (durably, before they
    /// are published) and returns the group after it; rolls back on failure.
    fn commit_local(
        &mut self,
        id: GroupId,
        effects: Result<Vec<Effect>, GroupError>,
    ) -> Result<GroupInfo, EngineError> {
        let effects = match effects {
            Ok(fx) => fx,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        Ok(group_info(&self.view(&id)?, self.me))
    }

    /// Commits a self-update in every group where one is due (`[keys]` in `config.toml`; by
    /// default after 1000 own messages or 7 days). Runs on the rendezvous tick.
    fn self_updates(&mut self) {
        if !self.disk_ok() {
            // Due again at the next tick.
            return;
        }
        for id in self.groups.due_self_updates(now_ms(), self.update_policy) {
            let fx = self.groups.self_update(id, now_ms());
            match self.commit_local(id, fx) {
                Ok(v) => {
                    tracing::info!(group = %id.short(), epoch = v.epoch, "self-update committed")
                }
                Err(e) => tracing::warn!(group = %id.short(), error = %e, "self-update failed"),
            }
        }
    }

    fn create_group(&mut self, name: &str) -> Result<GroupInfo, EngineError> {
        let mut id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id = GroupId(id);
        let effects = self.groups.create_group(id, name, now_ms())?;
        self.apply(effects)?;
        let view = self.view(&id)?;
        self.update_gauges(id, view.epoch, view.members.len());
        let _ = self.events.send(NodeEvent::GroupJoined(summary(&view)));
        let key = id.provider_key(self.groups.network());
        let _ = self.net.provide_blocking(key);
        tracing::info!(group = %id.short(), name = %view.meta.name, "created group");
        Ok(group_info(&view, self.me))
    }

    fn create_invite(
        &mut self,
        q: &str,
        req: CreateInviteRequest,
    ) -> Result<InviteInfo, EngineError> {
        let id = self.resolve(q)?;
        let secs = req.expires_in_secs.unwrap_or(DEFAULT_INVITE_SECS);
        if secs == 0 || secs > MAX_INVITE_SECS {
            return Err(EngineError::BadRequest(format!(
                "expiry must be between 1 second and {} days",
                MAX_INVITE_SECS / 86400
            )));
        }
        let uses = req.max_uses.unwrap_or(1);
        if uses == 0 || uses > MAX_INVITE_USES {
            return Err(EngineError::BadRequest(format!(
                "uses must be between 1 and {MAX_INVITE_USES}"
            )));
        }
        let addrs = self
            .net
            .info_blocking()
            .map(|i| invite_addrs(i.listen_addrs))
            .map_err(|_| EngineError::ShuttingDown)?;
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let now = now_ms();
        let new = NewInvite {
            addrs,
            secret,
            expires_at: now / 1000 + secs,
            max_uses: uses,
            approval: req.approval,
        };
        let (invite, effects) = match self.groups.create_invite(id, new, now) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        // Stored durably and published to the group before the link is shown.
        self.apply(effects)?;
        self.metrics.invite_created();
        tracing::info!(group = %id.short(), invite = %invite.id().short(), uses, approval = req.approval, "created invite");
        Ok(InviteInfo {
            link: invite.link().to_owned(),
            url: invite.url(),
            group: id.to_string(),
            expires_at: invite.expires_at,
            max_uses: invite.max_uses,
            id: invite.id().to_string(),
            approval: req.approval,
        })
    }

    /// Revokes invite `which` (id or unique prefix) of group `q` for the whole group.
    fn revoke_invite(&mut self, q: &str, which: &str) -> Result<InviteSummary, EngineError> {
        let id = self.resolve(q)?;
        let which = which.trim().to_ascii_lowercase();
        let is_prefix = which.len() >= 4 && which.chars().all(|c| c.is_ascii_hexdigit());
        let matches: Vec<InviteRecord> = self
            .store
            .invites()?
            .into_iter()
            .filter(|r| r.group == id && is_prefix && r.id.to_string().starts_with(&which))
            .collect();
        let record = match matches.as_slice() {
            [] => {
                return Err(EngineError::NotFound(format!(
                    "no invite of this group matches '{which}'"
                )));
            }
            [one] => one.clone(),
            _ => {
                return Err(EngineError::BadRequest(format!(
                    "'{which}' matches several invites; give more characters"
                )));
            }
        };
        if record.revoked {
            return Ok(invite_summary(&record, now_ms() / 1000));
        }
        let effects = match self.groups.revoke_invite(id, record.id, now_ms()) {
            Ok(fx) => fx,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        tracing::info!(group = %id.short(), invite = %record.id.short(), "revoked invite");
        let record = self.store.invite(&record.id)?.unwrap_or(record);
        Ok(invite_summary(&record, now_ms() / 1000))
    }

    fn complete_join(
        &mut self,
        invite: &Invite,
        response: JoinResponse,
    ) -> Result<GroupInfo, EngineError> {
        let (id, effects) = match self.groups.handle_join_response(invite, response, now_ms()) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        let view = self.view(&id)?;
        self.update_gauges(id, view.epoch, view.members.len());
        let _ = self.events.send(NodeEvent::GroupJoined(summary(&view)));
        let key = id.provider_key(self.groups.network());
        let _ = self.net.provide_blocking(key);
        let _ = self.net.find_providers_blocking(key);
        // Fetch what was sent in the new epoch before our subscription reached the mesh.
        self.sync_input(sched::Input::Sync {
            group: id,
            trigger: sched::Trigger::Routine,
        });
        // And again shortly after: a concurrent commit that beat the one adding us may have
        // been published before we subscribed; history sync brings it, and we join again.
        self.follow_up_syncs(id);
        tracing::info!(group = %id.short(), name = %view.meta.name, epoch = view.epoch, "joined group");
        Ok(group_info(&view, self.me))
    }

    /// Syncs `id` again after each of [`JOIN_FOLLOW_UP_SYNCS`] (after a join or a rejoin,
    /// when commits published just before our state was set up may have been missed).
    fn follow_up_syncs(&self, id: GroupId) {
        let tx = self.tx.clone();
        self.runtime.spawn(async move {
            for pause in JOIN_FOLLOW_UP_SYNCS {
                tokio::time::sleep(pause).await;
                if tx.send(Input::SyncGroup(id)).await.is_err() {
                    return;
                }
            }
        });
    }

    fn send(&mut self, q: &str, text: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let (entry, effects) = match self.groups.send_text(id, text, now_ms()) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        self.metrics.message_sent();
        Ok(message_info(&entry))
    }
}

/// What the sync scheduler asks the actor when it starts a run.
struct SyncContext<'a> {
    writable: bool,
    groups: &'a GroupEngine<KithProvider>,
    store: &'a Store,
    net: &'a NetHandle,
    me: PeerId,
}

impl sched::Context for SyncContext<'_> {
    fn writable(&mut self) -> bool {
        self.writable
    }

    fn candidates(&mut self, group: &GroupId) -> Option<Vec<PeerId>> {
        let view = self.groups.group(group).filter(|v| v.active)?;
        let connected: HashSet<PeerId> = self
            .net
            .info_blocking()
            .ok()?
            .connected
            .into_iter()
            .collect();
        Some(
            view.members
                .iter()
                .map(|(_, p)| *p)
                .filter(|p| *p != self.me && connected.contains(p))
                .collect(),
        )
    }

    /// What this node holds of `group`, and its summary with the floor at the epoch it
    /// joined at.
    fn holdings(&mut self, group: &GroupId) -> Option<(Holdings, Summary)> {
        let read = || -> Result<(Holdings, Summary), StoreError> {
            let envelopes = self.store.envelopes_of_group(group, MAX_SCAN_ENVELOPES)?;
            let floor = self.store.first_history_epoch(group)?.unwrap_or(0);
            let holdings = Holdings::new(envelopes.iter());
            let summary = holdings.summary().with_floor(floor);
            Ok((holdings, summary))
        };
        read()
            .inspect_err(|e| tracing::error!(error = %e, "cannot summarise stored envelopes"))
            .ok()
    }
}

/// Opens the node's store in `data_dir`.
pub fn open_store(data_dir: &Path) -> Result<Store, StoreError> {
    Store::open(&data_dir.join("kith.redb"))
}

#[cfg(test)]
mod durability_tests {
    use super::*;

    #[test]
    fn batches_that_publish_are_recognised() {
        let topic = GroupId([1; 32]).topic("n");
        assert!(publishes(&[
            Effect::Subscribe(topic),
            Effect::Publish {
                topic,
                data: vec![1]
            }
        ]));
        assert!(!publishes(&[
            Effect::Subscribe(topic),
            Effect::Unsubscribe(topic)
        ]));
        assert!(!publishes(&[]));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod resolve_tests {
    use super::*;

    #[test]
    fn a_group_is_named_by_id_unique_prefix_or_exact_name() {
        let a = GroupId([0xab; 32]);
        let b = GroupId([0xac; 32]);
        let groups = [(a, "book club"), (b, "family")];
        let find = |q: &str| resolve_group(q, groups.iter().copied());
        assert_eq!(find(&a.to_string()).unwrap(), a);
        assert_eq!(find("abab").unwrap(), a);
        assert_eq!(find("ACAC").unwrap(), b);
        assert_eq!(find(" family ").unwrap(), b);
        assert!(
            matches!(find("abc"), Err(EngineError::GroupNotFound(_))),
            "too short"
        );
        assert!(matches!(find("book"), Err(EngineError::GroupNotFound(_))));
        assert!(matches!(
            find(&GroupId([1; 32]).to_string()),
            Err(EngineError::GroupNotFound(_))
        ));
        let mut near = [0xab; 32];
        near[5] = 0;
        let twins = [(a, "x"), (GroupId(near), "y")];
        assert!(matches!(
            resolve_group("abab", twins.iter().copied()),
            Err(EngineError::AmbiguousGroup(_))
        ));
    }
}
