//! The requester's side of history sync as a sans-IO state machine: when to sync which group,
//! with whom, how to walk a member's pages, and when to stop holding live messages.
//!
//! [`SyncScheduler::handle`] takes one [`Input`] and the current time and returns
//! [`Output`]s for its driver to perform: requests to send, a timer to set, fetched envelopes
//! to read, catch-up holds to begin or end. It never does IO and never reads a clock; the
//! node's engine (and the simulator in `crate::sim`) drive it. The little it must know of
//! the world at the moment it decides to start a run (is the store writable, which members
//! are connected, what this node holds) it asks through [`Context`].
//!
//! The rules, unchanged from when they lived in the node's engine:
//! - A run of a group starts on the periodic timer ([`SYNC_INTERVAL`]), when a member
//!   connects, when an envelope from a future epoch arrives ([`Gaps`]), when the group
//!   engine says it is behind, after a rollback, a join, or a wake-up. At most one run per
//!   group at a time; a gap signalled during a run starts another when it ends.
//! - Debounce: not sooner than [`SYNC_DEBOUNCE`] (routine) or [`GAP_DEBOUNCE`] (gap,
//!   newcomer) after the last start; a group whose runs failed `n` times in a row waits
//!   [`sync_backoff`]`(n)` instead (5 s doubling up to [`MAX_SYNC_BACKOFF`]), except for a
//!   member that just connected (a healed partition: it may hold what the others could not
//!   give).
//! - A run asks every member that connected since the last run (at most
//!   [`MAX_PEERS_PER_RUN`]), then the other connected members, from a random one on, until
//!   one sent a complete answer. With each member: a version-2 summary pass, then one range
//!   pass per [`Holdings::refinement`] request; a member that fails the first version-2
//!   request is asked again with version 1. At most [`MAX_PAGES_PER_RUN`] requests per
//!   member; a `RateLimited` refusal is retried [`MAX_RATE_LIMITED_RETRIES`] times after
//!   [`RATE_LIMITED_PAUSE`] times the attempt number.
//! - Fetched envelopes are collected (deduplicated by id) and handed over sorted by
//!   (epoch, commit last, arrival) when the run ends, or whenever [`MAX_RUN_BYTES`] are
//!   collected: each epoch's messages are then read before the commit that leaves it.
//! - A run holds the group's live messages ([`Output::BeginHold`]) only while the node
//!   cannot tell which of a sender's messages it lacks: until the group's first complete run
//!   since this node started, woke or recovered its store. Afterwards a run is not a
//!   catch-up: live messages go on being read meanwhile, each sender's missing positions
//!   guarded by [`crate::order::Tracks`] (a live message 48 positions past a missing one is
//!   undone and holds the group, `Effect::Behind`), and envelopes of a future epoch are held
//!   one by one until their commits arrive, as always. (Holding every group during every
//!   run cost a group of 30 that had just taken in its members, each of them fetching the
//!   commits it had missed, 1 to 5 seconds of latency on one message in ten;
//!   docs/BENCHMARKS.md.) A complete run ends the hold in time. A hold older than
//!   [`CATCH_UP_HOLD_LIMIT`] ends anyway, unless a run is still receiving pages (then up to
//!   [`MAX_CATCH_UP_RUN`]).
//!
//! Runs of different groups are independent: one group's failures and back-off never delay
//! another group's run.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use libp2p_identity::PeerId;

use super::{
    Cursor, Gaps, HeldRange, Holdings, MAX_PAGE_BYTES, Summary, SyncRefusal, SyncRequest,
    SyncRequestV1, SyncRequestV2, SyncResponse, Want,
};
use crate::envelope::{Envelope, PayloadKind};
use crate::ids::{GroupId, MessageId};

/// How often every active group is synced with an online member.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// A group is not synced again (on a new connection or the timer) sooner than this.
pub const SYNC_DEBOUNCE: Duration = Duration::from_secs(5);
/// A gap signal does not start a sync of the group sooner than this after the last one.
pub const GAP_DEBOUNCE: Duration = Duration::from_secs(1);
/// Most pages one sync run fetches from one peer.
pub const MAX_PAGES_PER_RUN: usize = 256;
/// Peers one sync run tries, at most, before giving up until the next trigger.
pub const MAX_PEERS_PER_RUN: usize = 4;
/// Longest wait between sync attempts of a group whose syncs keep failing.
pub const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(300);
/// Longest time live envelopes of a group are held while this node catches up: after it
/// they are processed even if no sync has completed, so a slow or unreachable member delays
/// live messages by at most this. What is still missing then may no longer be decryptable
/// when it arrives (it is counted as undecryptable).
pub const CATCH_UP_HOLD_LIMIT: Duration = Duration::from_secs(30);
/// Longest a sync run that keeps receiving pages may hold a group's live messages.
pub const MAX_CATCH_UP_RUN: Duration = Duration::from_secs(300);
/// Times one page request of a sync run is retried after `RateLimited`, waiting
/// [`RATE_LIMITED_PAUSE`] times the attempt number (1.4 s in all at most).
pub const MAX_RATE_LIMITED_RETRIES: u32 = 4;
/// See [`MAX_RATE_LIMITED_RETRIES`].
pub const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(140);
/// Bytes of fetched envelopes a sync run collects before it hands them over; a larger
/// backlog is handed over in parts of this size.
pub const MAX_RUN_BYTES: usize = 32 * 1024 * 1024;

/// Milliseconds on the driver's monotonic clock (any origin; only differences count).
pub type Millis = u64;

/// How long to wait before the next sync of a group whose last `failures` runs failed in a
/// row: nothing extra while they succeed, then 5 s doubling up to [`MAX_SYNC_BACKOFF`].
pub fn sync_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    SYNC_DEBOUNCE
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(MAX_SYNC_BACKOFF)
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

/// Names one request of the scheduler, so its answer finds the run that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Why a sync of a group is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The periodic timer, or a join that wants what was sent meanwhile.
    Routine,
    /// Something is known to be missing: an envelope for a future epoch, a rollback to
    /// another branch, live messages held behind a missing one.
    Gap,
    /// A member connected, or named another commit than ours for an epoch.
    Newcomer,
}

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFailure {
    /// Unreachable, timed out or undecodable: try another member.
    Unanswered,
    /// The network stopped: the run ends.
    Stopped,
}

/// What the scheduler consumes (with the time, see [`SyncScheduler::handle`]).
#[derive(Debug, Clone)]
pub enum Input {
    /// The periodic sync timer ([`SYNC_INTERVAL`]): sync each of the active `groups`.
    SyncAll {
        /// The active groups.
        groups: Vec<GroupId>,
    },
    /// Sync `group` for `trigger`.
    Sync {
        /// The group.
        group: GroupId,
        /// Why.
        trigger: Trigger,
    },
    /// The node woke after a pause (the driver began every group's catch-up): sync each of
    /// `groups` now, whatever the debounce.
    Woke {
        /// The active groups.
        groups: Vec<GroupId>,
    },
    /// The store writes again after it failed: what arrived meanwhile (or a reopen lost) is
    /// held by other members. Each of `groups` counts as not in sync until a run completes
    /// (so the tick retries it), and syncs now.
    Recovered {
        /// The active groups.
        groups: Vec<GroupId>,
    },
    /// The driver's frequent tick (the node's flush tick): retries failed groups, starts
    /// runs for groups that hold live messages, asks members that connected meanwhile, and
    /// ends holds that are too old.
    Tick {
        /// Groups whose live messages are held for a catch-up.
        holding: Vec<GroupId>,
        /// Those of them held for [`CATCH_UP_HOLD_LIMIT`] or longer.
        stale: Vec<GroupId>,
    },
    /// The time of an [`Output::ScheduleTimer`] came.
    Timer,
    /// `peer` connected; it is a member of `groups`.
    PeerConnected {
        /// The peer.
        peer: PeerId,
        /// The active groups it is a member of.
        groups: Vec<GroupId>,
    },
    /// `peer`'s sync request named another commit than ours for an epoch of `group`: ask it.
    ForkSeen {
        /// The group.
        group: GroupId,
        /// The member on the other branch.
        peer: PeerId,
    },
    /// An envelope of `group` for `seen_epoch` could not be read at `current_epoch`.
    FutureEpoch {
        /// The group.
        group: GroupId,
        /// The envelope's epoch.
        seen_epoch: u64,
        /// This node's epoch.
        current_epoch: u64,
    },
    /// The answer to request `id`.
    Response {
        /// The request.
        id: RequestId,
        /// The answer.
        response: SyncResponse,
    },
    /// Request `id` got no answer.
    RequestFailed {
        /// The request.
        id: RequestId,
        /// Why.
        failure: RequestFailure,
    },
}

/// What the driver does for the scheduler, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send `request` to `peer`; answer with [`Input::Response`] or [`Input::RequestFailed`].
    Request {
        /// The member to ask.
        peer: PeerId,
        /// The request's id.
        id: RequestId,
        /// The request (boxed: it carries a summary).
        request: Box<SyncRequest>,
    },
    /// Feed [`Input::Timer`] at `at` (earlier timers may fire too; that is harmless).
    ScheduleTimer {
        /// When.
        at: Millis,
    },
    /// Hold the live envelopes of `group` (`GroupEngine::begin_catch_up`).
    BeginHold {
        /// The group.
        group: GroupId,
    },
    /// Read these fetched envelopes of `group`, in this order
    /// (`GroupEngine::handle_synced_envelope`), skipping those already stored.
    Ingest {
        /// The group.
        group: GroupId,
        /// Encoded envelopes.
        envelopes: Vec<Vec<u8>>,
    },
    /// Read what was held for `group`'s catch-up: after a complete run (`in_time`,
    /// `GroupEngine::end_catch_up`), or because the hold ran out of time
    /// (`GroupEngine::end_catch_up_now`).
    EndHold {
        /// The group.
        group: GroupId,
        /// Whether a run completed in time.
        in_time: bool,
    },
    /// A run of `group` that started at `started` ended.
    RunEnded {
        /// The group.
        group: GroupId,
        /// Whether a member sent everything it had.
        complete: bool,
        /// When it started.
        started: Millis,
    },
    /// A member of `group` refused our request: it does not count us as a member (if we
    /// joined recently, the commit that added us may have lost).
    NotAMember {
        /// The group.
        group: GroupId,
    },
}

/// What the scheduler asks its driver when it is about to start a run.
pub trait Context {
    /// Whether fetched envelopes could be stored now; nothing starts while they could not.
    fn writable(&mut self) -> bool;
    /// The members of `group` this node could ask now (connected, not itself), in the
    /// group's member order; `None` if it is not an active member of `group`.
    fn candidates(&mut self, group: &GroupId) -> Option<Vec<PeerId>>;
    /// What this node holds of `group`, and the summary to send; `None` if it cannot be
    /// read (the run does not start).
    fn holdings(&mut self, group: &GroupId) -> Option<(Holdings, Summary)>;
}

/// Which pass of the walk of one member is going on.
#[derive(Debug, Clone)]
enum Pass {
    /// Version 2 with the summary.
    Summary,
    /// Version 1 with the summary (the member failed the first version-2 request).
    V1,
    /// Version 2 naming what we hold of partial epochs.
    Ranges(Vec<HeldRange>),
}

/// How a pass ended.
enum PassEnd {
    /// The last page arrived, with its partial epochs (version 2) or none.
    Complete(Vec<u64>),
    /// Refused, or out of pages.
    Failed,
    /// A request got no answer.
    Unanswered,
}

/// What the walk of one member waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The answer to this request.
    Answer(RequestId),
    /// The time to ask again after `RateLimited`.
    RetryAt(Millis),
}

/// Fetching from one member.
#[derive(Debug)]
struct Walk {
    peer: PeerId,
    /// Asked because it connected since the last run: it is asked even if an earlier member
    /// sent everything.
    newcomer: bool,
    /// Requests made of it in this run, bounded by [`MAX_PAGES_PER_RUN`].
    pages: usize,
    pass: Pass,
    cursor: Option<Cursor>,
    /// `RateLimited` refusals in a row in this pass.
    limited: u32,
    /// Range passes still to make after the summary pass.
    ranges: VecDeque<Vec<HeldRange>>,
    waiting: Waiting,
}

/// A run of one group.
#[derive(Debug)]
struct Run {
    started: Millis,
    /// When the last non-empty page arrived (or the run started).
    last_page: Millis,
    holdings: Holdings,
    summary: Summary,
    newcomers: VecDeque<PeerId>,
    others: VecDeque<PeerId>,
    /// A member sent a complete answer.
    complete: bool,
    walk: Option<Walk>,
    /// Fetched envelopes not handed over yet, with (epoch, is a commit, arrival).
    collected: Vec<(u64, bool, usize, Vec<u8>)>,
    collected_ids: HashSet<MessageId>,
    collected_bytes: usize,
    /// The ids of those that answered range requests (see [`keep_before_first_ranged`]).
    ranged: HashSet<MessageId>,
    arrivals: usize,
    /// A gap was signalled during the run: start another one when it ends.
    again: bool,
}

/// The requester's side of history sync for all groups of one node (see the module docs).
#[derive(Debug)]
pub struct SyncScheduler {
    runs: BTreeMap<GroupId, Run>,
    /// Which run each request in flight belongs to.
    requests: BTreeMap<RequestId, GroupId>,
    next_id: u64,
    /// When each group's last run started.
    last_sync: BTreeMap<GroupId, Millis>,
    /// Groups whose last run failed (no member sent everything).
    unsynced: BTreeSet<GroupId>,
    /// Groups with a complete run since this node started, woke or recovered its store:
    /// their routine and newcomer runs do not hold live messages.
    caught_up: BTreeSet<GroupId>,
    /// Runs of each group that failed in a row.
    failures: BTreeMap<GroupId, u32>,
    /// Members that connected since the group's last run started (newest
    /// [`MAX_PEERS_PER_RUN`] kept when they connect).
    newcomers: BTreeMap<GroupId, Vec<PeerId>>,
    /// Gap detectors, by group.
    gaps: BTreeMap<GroupId, Gaps>,
    /// State of the generator that picks the first member to ask (splitmix64).
    rng: u64,
}

impl SyncScheduler {
    /// A scheduler with nothing going on; `seed` spreads the members asked over runs.
    pub fn new(seed: u64) -> Self {
        SyncScheduler {
            runs: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_id: 0,
            last_sync: BTreeMap::new(),
            unsynced: BTreeSet::new(),
            caught_up: BTreeSet::new(),
            failures: BTreeMap::new(),
            newcomers: BTreeMap::new(),
            gaps: BTreeMap::new(),
            rng: seed,
        }
    }

    /// Whether a run of `group` is going on.
    pub fn is_running(&self, group: &GroupId) -> bool {
        self.runs.contains_key(group)
    }

    /// Whether the last run of `group` failed.
    pub fn is_unsynced(&self, group: &GroupId) -> bool {
        self.unsynced.contains(group)
    }

    /// Runs of `group` that failed in a row.
    pub fn failures(&self, group: &GroupId) -> u32 {
        self.failures.get(group).copied().unwrap_or(0)
    }

    /// Requests in flight, over all runs.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Handles one input at `now`; returns what the driver must do, in order.
    pub fn handle(&mut self, now: Millis, input: Input, ctx: &mut impl Context) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::SyncAll { groups } => {
                for g in groups {
                    self.start(now, g, Trigger::Routine, ctx, &mut out);
                }
            }
            Input::Sync { group, trigger } => self.start(now, group, trigger, ctx, &mut out),
            Input::Woke { groups } => {
                for g in groups {
                    self.caught_up.remove(&g);
                    self.last_sync.remove(&g);
                    self.start(now, g, Trigger::Gap, ctx, &mut out);
                }
            }
            Input::Recovered { groups } => {
                for g in groups {
                    self.caught_up.remove(&g);
                    self.unsynced.insert(g);
                    self.last_sync.remove(&g);
                    self.start(now, g, Trigger::Gap, ctx, &mut out);
                }
            }
            Input::Tick { holding, stale } => self.tick(now, holding, stale, ctx, &mut out),
            Input::Timer => self.timer(now, ctx, &mut out),
            Input::PeerConnected { peer, groups } => {
                for g in groups {
                    let list = self.newcomers.entry(g).or_default();
                    list.retain(|p| *p != peer);
                    if list.len() >= MAX_PEERS_PER_RUN {
                        list.remove(0);
                    }
                    list.push(peer);
                    self.start(now, g, Trigger::Newcomer, ctx, &mut out);
                }
            }
            Input::ForkSeen { group, peer } => {
                let list = self.newcomers.entry(group).or_default();
                if !list.contains(&peer) {
                    list.push(peer);
                }
                self.start(now, group, Trigger::Newcomer, ctx, &mut out);
            }
            Input::FutureEpoch {
                group,
                seen_epoch,
                current_epoch,
            } => {
                let signal = self
                    .gaps
                    .entry(group)
                    .or_default()
                    .observe(seen_epoch, current_epoch);
                if let Some(missing) = signal {
                    tracing::debug!(group = %group.short(), first = missing.first, last = missing.last, "missing commits; syncing");
                    self.start(now, group, Trigger::Gap, ctx, &mut out);
                }
            }
            Input::Response { id, response } => self.on_response(now, id, response, ctx, &mut out),
            Input::RequestFailed { id, failure } => {
                let Some(group) = self.take_request(id) else {
                    return out;
                };
                match failure {
                    RequestFailure::Stopped => self.finish(now, group, false, ctx, &mut out),
                    RequestFailure::Unanswered => {
                        self.pass_end(now, group, PassEnd::Unanswered, ctx, &mut out)
                    }
                }
            }
        }
        out
    }

    /// Starts a run of `group` unless one is going on, the last one started too recently,
    /// or no member can be asked.
    fn start(
        &mut self,
        now: Millis,
        group: GroupId,
        trigger: Trigger,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        if !ctx.writable() {
            // What it would fetch could not be stored; every group syncs on recovery.
            return;
        }
        if let Some(run) = self.runs.get_mut(&group) {
            if trigger == Trigger::Gap {
                run.again = true;
            }
            return;
        }
        // A failing group backs off, except for a member that just connected: it may be the
        // one that has what the others could not give (a partition healed).
        let backoff = match trigger {
            Trigger::Newcomer => Duration::ZERO,
            Trigger::Routine | Trigger::Gap => sync_backoff(self.failures(&group)),
        };
        let debounce = match trigger {
            Trigger::Routine => SYNC_DEBOUNCE,
            Trigger::Gap | Trigger::Newcomer => GAP_DEBOUNCE,
        }
        .max(backoff);
        if self
            .last_sync
            .get(&group)
            .is_some_and(|t| now.saturating_sub(*t) < ms(debounce))
        {
            if trigger == Trigger::Gap
                && let Some(g) = self.gaps.get_mut(&group)
            {
                // Too soon: let the next envelope from the future signal again.
                g.reset();
            }
            return;
        }
        let newcomers = self.newcomers.remove(&group).unwrap_or_default();
        let Some(candidates) = ctx.candidates(&group) else {
            return;
        };
        let newcomers: Vec<PeerId> = newcomers
            .into_iter()
            .filter(|p| candidates.contains(p))
            .collect();
        let mut peers: Vec<PeerId> = candidates
            .into_iter()
            .filter(|p| !newcomers.contains(p))
            .collect();
        if peers.is_empty() && newcomers.is_empty() {
            return;
        }
        // Spread the load over the members.
        if !peers.is_empty() {
            let start = (self.next_random() % peers.len() as u64) as usize;
            peers.rotate_left(start);
        }
        peers.truncate(MAX_PEERS_PER_RUN.saturating_sub(newcomers.len()).max(1));
        let Some((holdings, summary)) = ctx.holdings(&group) else {
            return;
        };
        tracing::debug!(group = %group.short(), ?trigger, newcomers = newcomers.len(), peers = peers.len(), epochs = summary.epochs.len(), "starting history sync");
        self.runs.insert(
            group,
            Run {
                started: now,
                last_page: now,
                holdings,
                summary,
                newcomers: newcomers.into(),
                others: peers.into(),
                complete: false,
                walk: None,
                collected: Vec::new(),
                collected_ids: HashSet::new(),
                collected_bytes: 0,
                ranged: HashSet::new(),
                arrivals: 0,
                again: false,
            },
        );
        if !self.caught_up.contains(&group) {
            out.push(Output::BeginHold { group });
        }
        self.last_sync.insert(group, now);
        self.next_peer(now, group, ctx, out);
    }

    /// Moves the run of `group` to its next member, or ends it.
    fn next_peer(
        &mut self,
        now: Millis,
        group: GroupId,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        let Some(run) = self.runs.get_mut(&group) else {
            return;
        };
        let next = match run.newcomers.pop_front() {
            Some(p) => Some((p, true)),
            None if !run.complete => run.others.pop_front().map(|p| (p, false)),
            None => None,
        };
        let Some((peer, newcomer)) = next else {
            let complete = run.complete;
            self.finish(now, group, complete, ctx, out);
            return;
        };
        run.walk = Some(Walk {
            peer,
            newcomer,
            pages: 0,
            pass: Pass::Summary,
            cursor: None,
            limited: 0,
            ranges: VecDeque::new(),
            waiting: Waiting::RetryAt(now),
        });
        self.ask(now, group, ctx, out);
    }

    /// Sends the next request of the current pass of `group`'s run.
    fn ask(&mut self, now: Millis, group: GroupId, ctx: &mut impl Context, out: &mut Vec<Output>) {
        let id = RequestId(self.next_id);
        let Some(run) = self.runs.get_mut(&group) else {
            return;
        };
        let Some(walk) = run.walk.as_mut() else {
            return;
        };
        if walk.pages >= MAX_PAGES_PER_RUN {
            self.pass_end(now, group, PassEnd::Failed, ctx, out);
            return;
        }
        walk.pages += 1;
        let cursor = walk.cursor.clone();
        let request = match &walk.pass {
            Pass::Summary => SyncRequest::V2(SyncRequestV2 {
                group,
                want: Want::Summary(run.summary.clone()),
                cursor,
                max_bytes: MAX_PAGE_BYTES,
                proof: Vec::new(),
            }),
            Pass::V1 => SyncRequest::V1(SyncRequestV1 {
                group,
                summary: run.summary.clone(),
                cursor,
                max_bytes: MAX_PAGE_BYTES,
                proof: Vec::new(),
            }),
            Pass::Ranges(ranges) => SyncRequest::V2(SyncRequestV2 {
                group,
                want: Want::Ranges(ranges.clone()),
                cursor,
                max_bytes: MAX_PAGE_BYTES,
                proof: Vec::new(),
            }),
        };
        walk.waiting = Waiting::Answer(id);
        self.next_id += 1;
        self.requests.insert(id, group);
        out.push(Output::Request {
            peer: walk.peer,
            id,
            request: Box::new(request),
        });
    }

    /// The group whose run sent request `id`, if that run still waits for it.
    fn take_request(&mut self, id: RequestId) -> Option<GroupId> {
        let group = self.requests.remove(&id)?;
        let walk = self.runs.get(&group)?.walk.as_ref()?;
        (walk.waiting == Waiting::Answer(id)).then_some(group)
    }

    fn on_response(
        &mut self,
        now: Millis,
        id: RequestId,
        response: SyncResponse,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        let Some(group) = self.take_request(id) else {
            return;
        };
        let (envelopes, next, partial) = match response {
            SyncResponse::V1(page) => (page.envelopes, page.next, Vec::new()),
            SyncResponse::V2(page) => (page.envelopes, page.next, page.partial),
            SyncResponse::Refused(why) => {
                self.on_refusal(now, group, why, ctx, out);
                return;
            }
        };
        if !envelopes.is_empty() {
            let ranged = self
                .runs
                .get(&group)
                .and_then(|r| r.walk.as_ref())
                .is_some_and(|w| matches!(w.pass, Pass::Ranges(_)));
            self.collect(now, group, envelopes, ranged, out);
        }
        let Some(walk) = self.runs.get_mut(&group).and_then(|r| r.walk.as_mut()) else {
            return;
        };
        walk.limited = 0;
        match next {
            None => self.pass_end(now, group, PassEnd::Complete(partial), ctx, out),
            Some(n) => {
                walk.cursor = Some(n);
                self.ask(now, group, ctx, out);
            }
        }
    }

    fn on_refusal(
        &mut self,
        now: Millis,
        group: GroupId,
        why: SyncRefusal,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        let Some(walk) = self.runs.get_mut(&group).and_then(|r| r.walk.as_mut()) else {
            return;
        };
        if why == SyncRefusal::RateLimited && walk.limited < MAX_RATE_LIMITED_RETRIES {
            // The member serves several of our groups (and other members) from one budget:
            // wait for it to refill rather than fail the run.
            walk.limited += 1;
            let at = now + ms(RATE_LIMITED_PAUSE) * Millis::from(walk.limited);
            tracing::debug!(peer = %walk.peer, group = %group.short(), limited = walk.limited, "sync rate-limited; waiting");
            walk.waiting = Waiting::RetryAt(at);
            out.push(Output::ScheduleTimer { at });
            return;
        }
        tracing::debug!(peer = %walk.peer, group = %group.short(), reason = %why, "sync refused");
        if why == SyncRefusal::NotMember {
            out.push(Output::NotAMember { group });
        }
        self.pass_end(now, group, PassEnd::Failed, ctx, out);
    }

    /// Asks again where a rate-limited pause is over.
    fn timer(&mut self, now: Millis, ctx: &mut impl Context, out: &mut Vec<Output>) {
        let due: Vec<GroupId> = self
            .runs
            .iter()
            .filter(|(_, r)| {
                r.walk
                    .as_ref()
                    .is_some_and(|w| matches!(w.waiting, Waiting::RetryAt(t) if t <= now))
            })
            .map(|(g, _)| *g)
            .collect();
        for g in due {
            self.ask(now, g, ctx, out);
        }
    }

    /// Continues the walk of `group`'s current member after a pass ended.
    fn pass_end(
        &mut self,
        now: Millis,
        group: GroupId,
        end: PassEnd,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        let Some(run) = self.runs.get_mut(&group) else {
            return;
        };
        let Some(walk) = run.walk.as_mut() else {
            return;
        };
        let done = match (&walk.pass, end) {
            (Pass::Summary, PassEnd::Complete(partial)) => {
                walk.ranges = run.holdings.refinement(&partial).into();
                None
            }
            (Pass::Summary, PassEnd::Unanswered) if walk.pages == 1 => {
                // The first version-2 request failed in transport: perhaps a node that speaks
                // only version 1 (it cannot decode the request and drops the stream).
                walk.pass = Pass::V1;
                walk.cursor = None;
                walk.limited = 0;
                self.ask(now, group, ctx, out);
                return;
            }
            (Pass::V1, PassEnd::Complete(_)) => Some(true),
            (Pass::Ranges(_), PassEnd::Complete(_)) => None,
            (_, PassEnd::Failed | PassEnd::Unanswered) => Some(false),
        };
        if done.is_none()
            && let Some(ranges) = walk.ranges.pop_front()
        {
            tracing::debug!(peer = %walk.peer, group = %group.short(), ranges = ranges.len(), "asking for the rest of partial epochs");
            walk.pass = Pass::Ranges(ranges);
            walk.cursor = None;
            walk.limited = 0;
            self.ask(now, group, ctx, out);
            return;
        }
        let done = done.unwrap_or(true);
        if walk.newcomer {
            run.complete |= done;
        } else {
            run.complete = done;
        }
        run.walk = None;
        self.next_peer(now, group, ctx, out);
    }

    /// Collects a page of `group`'s run; hands the collection over when the run ends, or
    /// now if it holds [`MAX_RUN_BYTES`].
    ///
    /// Why collect: a member keeps the secrets of only a few past epochs (and only for a
    /// while), so the messages of an epoch must be decrypted before the commits that follow
    /// it move the group too far. The responder sends all commits first, then whole epochs in
    /// history order, and the epochs this node holds part of only in a later pass; sorted by
    /// epoch, each epoch's messages before the commit that leaves it, they are all readable
    /// however many epochs this node missed.
    fn collect(
        &mut self,
        now: Millis,
        group: GroupId,
        envelopes: Vec<Vec<u8>>,
        ranged: bool,
        out: &mut Vec<Output>,
    ) {
        let Some(run) = self.runs.get_mut(&group) else {
            return;
        };
        run.last_page = now;
        for data in envelopes {
            let Ok(env) = Envelope::decode(&data) else {
                continue;
            };
            let id = MessageId::of(&data);
            if env.group() != group || !run.collected_ids.insert(id) {
                continue;
            }
            if ranged {
                run.ranged.insert(id);
            }
            run.collected_bytes += data.len();
            run.collected.push((
                env.epoch(),
                env.kind() == PayloadKind::Commit,
                run.arrivals,
                data,
            ));
            run.arrivals += 1;
        }
        if run.collected_bytes >= MAX_RUN_BYTES {
            hand_over(group, run, out);
        }
    }

    /// Ends the run of `group`.
    fn finish(
        &mut self,
        now: Millis,
        group: GroupId,
        complete: bool,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        let Some(mut run) = self.runs.remove(&group) else {
            return;
        };
        if let Some(Walk {
            waiting: Waiting::Answer(id),
            ..
        }) = run.walk
        {
            self.requests.remove(&id);
        }
        if !complete {
            // Each range request answers a slice of an epoch's id space, all positions
            // long: with some slices missing, reading the others would move each sender's
            // ratchet past the missing slices' messages, and reading the commits after
            // that epoch would let its secrets expire before they come. So an incomplete
            // run reads only the epochs before the first one it got a range answer for;
            // the rest is fetched again by the next run.
            let ranged = std::mem::take(&mut run.ranged);
            if let Some((first, dropped)) = keep_before_first_ranged(&mut run.collected, &ranged) {
                tracing::debug!(group = %group.short(), dropped, from_epoch = first, "incomplete sync run: epochs from its first range answer are left for the next run");
            }
        }
        hand_over(group, &mut run, out);
        if complete {
            self.unsynced.remove(&group);
            self.failures.remove(&group);
            self.caught_up.insert(group);
            out.push(Output::EndHold {
                group,
                in_time: true,
            });
        } else {
            // Live messages stay held (until a run completes or CATCH_UP_HOLD_LIMIT), and
            // the next attempt waits longer each time.
            self.unsynced.insert(group);
            let failures = self.failures.entry(group).or_insert(0);
            *failures = failures.saturating_add(1);
            tracing::debug!(group = %group.short(), failures = *failures, retry_in_s = sync_backoff(*failures).as_secs(), "history sync incomplete; backing off");
            // Let the next future-epoch envelope signal the gap again.
            if let Some(g) = self.gaps.get_mut(&group) {
                g.reset();
            }
        }
        out.push(Output::RunEnded {
            group,
            complete,
            started: run.started,
        });
        if run.again {
            if complete {
                self.last_sync.remove(&group);
            }
            self.start(now, group, Trigger::Gap, ctx, out);
        }
    }

    fn tick(
        &mut self,
        now: Millis,
        holding: Vec<GroupId>,
        stale: Vec<GroupId>,
        ctx: &mut impl Context,
        out: &mut Vec<Output>,
    ) {
        // Holds that ran out of time end, unless a run is still receiving pages (they are
        // older than the held messages); what the run fetched so far is read first.
        let mut released = BTreeSet::new();
        for group in stale {
            if let Some(run) = self.runs.get_mut(&group) {
                if now.saturating_sub(run.last_page) < ms(CATCH_UP_HOLD_LIMIT)
                    && now.saturating_sub(run.started) < ms(MAX_CATCH_UP_RUN)
                {
                    continue;
                }
                hand_over(group, run, out);
            }
            tracing::info!(group = %group.short(), "history sync has not caught up in time; showing the messages held meanwhile");
            out.push(Output::EndHold {
                group,
                in_time: false,
            });
            released.insert(group);
        }
        // A run that failed is retried (debounced) rather than left for the next routine
        // sync a minute later.
        let retry: Vec<GroupId> = self.unsynced.iter().copied().collect();
        for g in retry {
            self.start(now, g, Trigger::Routine, ctx, out);
        }
        // Groups holding live messages for a catch-up need a sync (the debounce, and the
        // back-off of failing groups, decide when).
        for g in holding {
            if !released.contains(&g) && !self.runs.contains_key(&g) {
                self.start(now, g, Trigger::Gap, ctx, out);
            }
        }
        // Members that connected while a run was going on or too soon after one.
        let waiting: Vec<GroupId> = self.newcomers.keys().copied().collect();
        for g in waiting {
            self.start(now, g, Trigger::Newcomer, ctx, out);
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What an incomplete sync run may read (see [`SyncScheduler::finish`]): drops from
/// `collected` every envelope of the first epoch that has an envelope in `ranged` (answers
/// to range requests) and of all later epochs. Returns that epoch and how many were dropped,
/// `None` if no range answer was collected.
fn keep_before_first_ranged(
    collected: &mut Vec<(u64, bool, usize, Vec<u8>)>,
    ranged: &HashSet<MessageId>,
) -> Option<(u64, usize)> {
    let first = collected
        .iter()
        .filter(|(_, _, _, data)| ranged.contains(&MessageId::of(data)))
        .map(|(epoch, _, _, _)| *epoch)
        .min()?;
    let before = collected.len();
    collected.retain(|(epoch, _, _, _)| *epoch < first);
    Some((first, before - collected.len()))
}

/// Hands what `run` collected over to the driver, in the order to read it.
fn hand_over(group: GroupId, run: &mut Run, out: &mut Vec<Output>) {
    if run.collected.is_empty() {
        return;
    }
    let collected = std::mem::take(&mut run.collected);
    run.collected_bytes = 0;
    out.push(Output::Ingest {
        group,
        envelopes: sort_fetched(collected),
    });
}

/// Fetched envelopes in the order to read them: by epoch; in each epoch the application
/// messages (in the order they came; the group engine then reads each sender's in position
/// order, `GroupEngine::handle_synced_batch`) before the commits that leave it.
pub fn sort_fetched(mut fetched: Vec<(u64, bool, usize, Vec<u8>)>) -> Vec<Vec<u8>> {
    fetched.sort_by_key(|(epoch, commit, arrival, _)| (*epoch, *commit, *arrival));
    fetched.into_iter().map(|(_, _, _, data)| data).collect()
}

#[cfg(test)]
mod tests;
