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
    Effect, GroupEngine, GroupError, GroupView, Identity, IgnoreReason, LostJoin, NewInvite,
    UpdatePolicy, Verdict,
};
use kith_protocol::ids::{GroupId, MessageId, invite_rendezvous_key};
use kith_protocol::invite::{Invite, InviteRecord};
use kith_protocol::join::admission::{
    Admission, FindError, HeldRequests, HeldState, request_id_text,
};
use kith_protocol::records::{EntryKind, HistoryEntry};
use kith_protocol::sync::scheduler::{self as sched, SyncScheduler};
use kith_protocol::sync::{
    Holdings, Summary, SyncItem, SyncRefusal, SyncRequest, SyncResponse, respond,
};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::crashpoint::{self, Point};
use crate::metrics::{CpuPart, GroupGauges, JoinRequestResult, JoinResult, KithMetrics, timed};
use crate::model::{
    CreateInviteRequest, GroupInfo, GroupSummary, InviteInfo, InviteSummary, JoinRequestInfo,
    JoinStage, MemberInfo, MessageBody, MessageInfo, NodeEvent, ReachInfo, RelayInfo, ScopedAddr,
    StatusInfo,
};
use crate::net::{MAX_BLOCKED_PEERS, NetError, NetEvent, NetHandle, NetInfo};
use crate::store::{Batch, HealthView, KithProvider, Retention, Store, StoreError};
use crate::sync::{MAX_SCAN_ENVELOPES, SYNC_INTERVAL, SyncLimiter};

mod chat;
mod commit;
mod disk;
pub(crate) mod files;
mod forward;
mod handle;
mod ingest;
mod join_client;
mod local;
mod queries;
mod serve;
mod verify;
mod views;

pub use chat::{ChatPolicy, DIRECT_GROUP_NAME, TYPING_INTERVAL_MS, history_view, person};
pub use files::files_error;
pub use views::message_info;
use views::*;

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
/// After joining, the group is synced again after these pauses, so a concurrent commit that
/// beat the one adding us is noticed quickly (see [`Effect::JoinLost`]).
const JOIN_FOLLOW_UP_SYNCS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(8)];
/// Invites one node announces in the DHT at most (the newest active ones).
const MAX_PROVIDED_INVITES: usize = 256;
/// Invites whose join requests are rate-limited at once (the least recently asked is
/// forgotten first).
const MAX_RATED_INVITES: usize = 1024;
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
/// Live events kept for each API subscriber; one that falls further behind loses the oldest.
pub(crate) const EVENT_BUFFER: usize = 1024;

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
    /// and what to do (see [`kith_protocol::join::trail`]) (HTTP 504).
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
    /// The file store has no room for the file, even after removing every unpinned file
    /// it may remove (HTTP 507).
    #[error("{0}")]
    FileStoreFull(String),
    /// The file is not held in full yet (HTTP 409).
    #[error("{0}")]
    NotDownloaded(String),
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

/// An operation for the actor thread: it runs on the [`Actor`] and sends its own reply (see
/// [`EngineHandle::run`]).
type Job = Box<dyn FnOnce(&mut Actor) + Send>;

/// A request from the handle to the actor.
enum Call {
    /// An operation, e.g. one of the API's (see [`EngineHandle::run`]).
    Run(Job),
    PrepareJoin(Box<Invite>, Reply<JoinRequest>),
    CompleteJoin(Box<Invite>, JoinResponse, Reply<GroupInfo>),
    /// A rejoin request after a deep fork (see [`EngineHandle::rejoin_member`]).
    PrepareRejoin(GroupId, u64, MessageId, Reply<JoinRequest>),
    /// A member's answer to a rejoin request, from that member.
    CompleteRejoin(GroupId, PeerId, JoinResponse, Reply<GroupInfo>),
    /// No member could add this node again after a deep fork.
    RejoinFailed(GroupId, Reply<()>),
    /// Joining again after a lost race ended: `None` = still a member, else the refusal.
    JoinOutcome(GroupId, Option<LostJoin>, Reply<()>),
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

/// Cloneable handle to the engine actor: [`EngineHandle::run`] runs an operation on the
/// actor thread and returns its result; joining, status and the network's block list are
/// async methods here (they wait on the network).
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
    /// The file service.
    files: crate::files::Files,
}

impl EngineHandle {}

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
    /// Which chat notices to send and show.
    pub chat: ChatPolicy,
    /// What this node does with files.
    pub files: crate::files::FilePolicy,
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
/// consuming `net_events`, with the file service on `blobs` (spooling uploads in `spool`).
/// The engine counts what it does in `metrics`. Must be called inside a tokio runtime.
#[allow(clippy::too_many_arguments)]
pub fn start(
    store: Store,
    blobs: crate::files::BlobStore,
    spool: std::path::PathBuf,
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
        chat,
        files: file_policy,
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
    let files = crate::files::Files::start(
        blobs,
        spool,
        net.clone(),
        peer_id,
        file_policy,
        metrics.clone(),
        events.clone(),
    );
    let handle = EngineHandle {
        files: files.clone(),
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
    let fwd_files = files.clone();
    tokio::spawn(async move {
        while let Some(ev) = net_events.recv().await {
            // File requests go straight to the file service: they are many, and answering
            // one needs no group state beyond the members list.
            let ev = match ev {
                NetEvent::InboundFile {
                    peer,
                    request,
                    token,
                } => {
                    fwd_files.on_inbound(peer, request, token);
                    continue;
                }
                ev => ev,
            };
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
        deferred: forward::Deferred::default(),
        held: HeldRequests::new(),
        invite_joins: crate::net::limits::KeyedRates::new(
            crate::net::limits::INVITE_JOIN_RATE,
            MAX_RATED_INVITES,
        ),
        provided_invites: HashSet::new(),
        retention,
        update_policy,
        past_epoch_ttl,
        handle: handle.clone(),
        check_self_updates: false,
        chat,
        typing_sent: HashMap::new(),
        reported_key_changes: HashSet::new(),
        files,
    };
    let thread = std::thread::Builder::new()
        .name("kith-engine".into())
        .spawn(move || {
            // With several nodes in one process (the tests), debug logs say which node spoke.
            let _span =
                tracing::debug_span!("node", id = %crate::net::short_peer(&actor.me)).entered();
            // Subscribe to the loaded groups' topics and announce them, then serve.
            actor.after_commit(effects);
            for v in actor.groups.groups() {
                actor.update_gauges(v.meta.id, v.epoch, v.members.len());
            }
            let ids: Vec<GroupId> = actor.groups.groups().iter().map(|v| v.meta.id).collect();
            for g in ids {
                actor.share_members(g);
            }
            actor.sweep_gone_files();
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

/// The engine actor: owns the group engine and the store, on the `kith-engine` thread. Its
/// public methods are the node's operations (create a group, send a text, list invites, …),
/// one method each; [`EngineHandle::run`] runs one on this thread between other inputs, so an
/// operation sees and changes the state with nothing else running.
pub struct Actor {
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
    /// Gossip messages whose verdict waits until they are read ([`forward`]).
    deferred: forward::Deferred,
    /// Join requests held for approval on this node.
    held: HeldRequests,
    /// Join requests per invite this node knows, from all peers together.
    invite_joins: crate::net::limits::KeyedRates<kith_protocol::ids::InviteId>,
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
    /// A text was sent: once its sender has the answer, see whether a self-update is due
    /// (`[keys] update_after_messages`).
    check_self_updates: bool,
    /// Which chat notices to send and show (`[chat]` in `config.toml`).
    chat: ChatPolicy,
    /// When this node last sent a typing notice in each group.
    typing_sent: HashMap<GroupId, u64>,
    /// Verified names seen under a new key and reported in this run: (group, member,
    /// verified PeerId); see `Actor::check_verifications`.
    reported_key_changes: HashSet<(GroupId, PeerId, PeerId)>,
    /// The file service.
    files: crate::files::Files,
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
                Input::Net(NetEvent::Gossip {
                    id,
                    source,
                    data,
                    arrived,
                }) => {
                    // Group commit: take the gossip that queued up meanwhile, process it all,
                    // and write it in one transaction (one fsync instead of one per message).
                    let mut batch = vec![(id, source, data, arrived)];
                    while batch.len() < MAX_GOSSIP_BATCH {
                        match rx.try_recv() {
                            Ok(Input::Net(NetEvent::Gossip {
                                id,
                                source,
                                data,
                                arrived,
                            })) => batch.push((id, source, data, arrived)),
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
                    self.removal_tick();
                    self.settle_deferred();
                    self.flush();
                    self.sweep_gone_files();
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
        let key = kith_protocol::seal::SealKey::of("n", &GroupId([1; 32]));
        assert!(publishes(&[
            Effect::Subscribe(topic, key),
            Effect::Publish {
                topic,
                data: vec![1]
            }
        ]));
        assert!(!publishes(&[
            Effect::Subscribe(topic, key),
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
