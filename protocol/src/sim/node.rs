//! One simulated node core: the group engine on openmls' memory storage, the sync scheduler
//! driven as the node's engine drives it, the responder side of history sync, and a store
//! whose durable part is what survives a crash.
//!
//! Durability follows the node (`node::engine`): received messages are committed without
//! fsync and made durable by the next flush tick; whatever publishes is durable before it is
//! sent. A crash goes back to the last durable state: the store's records and every record
//! of the MLS storage as they were then.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::PoisonError;

use libp2p_identity::PeerId;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

use crate::envelope::{Envelope, JoinRequest, PayloadKind};
use crate::group::{Effect, GroupEngine, Identity, Verdict};
use crate::ids::{GroupId, InviteId, MessageId, TopicId};
use crate::invite::{Invite, InviteRecord};
use crate::join::admission::HeldRequests;
use crate::join::client::JoinClient;
use crate::join::rejoin::RejoinClient;
use crate::order::Undecryptable;
use crate::records::{GroupMeta, HistoryEntry, StoredEnvelope};
use crate::seal::{self, SealKey};
use crate::sync::scheduler::{self as sched, SyncScheduler};
use crate::sync::{Holdings, Summary, SyncItem, SyncRefusal, SyncRequest, SyncResponse, respond};

/// The group engine of a simulated node.
pub(super) type Engine = GroupEngine<OpenMlsRustCrypto>;

/// What a node stores beside the MLS state (the node's redb tables).
#[derive(Debug, Clone, Default)]
pub(super) struct Store {
    pub envelopes: BTreeMap<MessageId, StoredEnvelope>,
    pub history: BTreeMap<MessageId, HistoryEntry>,
    /// Envelope id -> history id, where they differ.
    pub links: BTreeMap<MessageId, MessageId>,
    pub metas: BTreeMap<GroupId, GroupMeta>,
    pub invites: BTreeMap<InviteId, InviteRecord>,
    pub undecryptable: BTreeMap<MessageId, Undecryptable>,
    /// Undecryptable envelopes whose text arrived again, re-sent on request.
    pub recovered: BTreeSet<MessageId>,
}

impl Store {
    /// Writes what `effects` store, as `Batch::from_effects` and the store's commit do.
    fn commit(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::SaveGroup(m) => {
                    self.metas.insert(m.id, m.clone());
                }
                Effect::SaveEnvelope(env) => {
                    self.envelopes.entry(env.id).or_insert_with(|| env.clone());
                }
                Effect::Record(h) => {
                    self.history.insert(h.id, h.clone());
                }
                Effect::LinkEnvelope { envelope, history } => {
                    if envelope != history {
                        self.links.insert(*envelope, *history);
                    }
                }
                Effect::ForgetInvites { group } => self.invites.retain(|_, r| r.group != *group),
                Effect::Invite(u) => {
                    let old = self.invites.remove(&u.id());
                    self.invites.insert(u.id(), InviteRecord::merge(old, u));
                }
                Effect::Undecryptable { envelope, reason } => {
                    self.undecryptable.insert(envelope.id, *reason);
                    self.envelopes
                        .entry(envelope.id)
                        .or_insert_with(|| envelope.clone());
                }
                Effect::Recovered { envelope, .. } => {
                    self.recovered.insert(*envelope);
                }
                Effect::RolledBack {
                    group,
                    to_epoch,
                    lost_commits,
                    forget_history,
                } => {
                    self.envelopes.retain(|_, e| {
                        e.group != *group || (e.epoch <= *to_epoch && !lost_commits.contains(&e.id))
                    });
                    for h in forget_history {
                        self.history.remove(h);
                    }
                }
                Effect::Publish { .. }
                | Effect::Subscribe(..)
                | Effect::Unsubscribe(_)
                | Effect::JoinLost { .. }
                | Effect::DeepForkLost { .. }
                | Effect::Behind { .. }
                | Effect::Profile { .. }
                | Effect::Receipt { .. }
                | Effect::Typing { .. }
                | Effect::Direct { .. }
                | Effect::DirectOffer { .. }
                | Effect::EpochChanged { .. } => {}
            }
        }
    }

    fn has(&self, id: &MessageId) -> bool {
        self.envelopes.contains_key(id)
    }
}

/// What survives a crash.
#[derive(Debug, Clone, Default)]
pub(super) struct Durable {
    store: Store,
    mls: HashMap<Vec<u8>, Vec<u8>>,
}

/// What a node asks the simulated world to do.
#[derive(Debug)]
pub(super) enum Action {
    /// Publish on a topic.
    Publish(TopicId, Vec<u8>),
    /// Send a sync request.
    Request {
        peer: PeerId,
        id: sched::RequestId,
        request: Box<SyncRequest>,
    },
    /// Wake the scheduler at this virtual time.
    Timer(sched::Millis),
}

/// Things a node noticed that the checks report.
#[derive(Debug, Default, Clone)]
pub(super) struct Notes {
    pub deep_forks: u64,
    pub join_lost: u64,
    pub hold_timeouts: u64,
    pub runs: u64,
    pub failed_runs: u64,
}

/// A join in progress (lost with a crash, like the node's join task).
pub(super) struct JoinRun {
    pub client: JoinClient,
    pub invite: Invite,
    pub request: JoinRequest,
    /// Joining again after the Add lost a race.
    pub again: bool,
}

/// Asking to be added again after a deep fork (lost with a crash).
pub(super) struct RejoinRun {
    pub client: RejoinClient,
    pub group: GroupId,
    pub epoch: u64,
    pub commit: MessageId,
}

/// A simulated node while it runs.
pub(super) struct Core {
    pub engine: Engine,
    pub sync: SyncScheduler,
    pub store: Store,
    pub subscribed: BTreeSet<TopicId>,
    /// The key of every topic this node subscribed to since it started (kept after
    /// unsubscribing: a leaving member's last commit goes out after it stopped listening).
    pub seals: BTreeMap<TopicId, SealKey>,
    pub notes: Notes,
    /// Join requests held for approval (none in the simulated invites; the same path).
    pub held: HeldRequests,
    pub join: Option<JoinRun>,
    pub rejoin: Option<RejoinRun>,
    /// `JoinLost` and `DeepForkLost` effects for the world's join clients.
    pub lost: Vec<Effect>,
    /// Whether anything was committed since the last durable point.
    dirty: bool,
    /// Inputs for the scheduler that arose while its outputs were performed.
    queue: Vec<sched::Input>,
}

/// Builds the context the scheduler asks when it starts a run.
struct Ctx<'a> {
    engine: &'a Engine,
    store: &'a Store,
    connected: &'a dyn Fn(&PeerId) -> bool,
}

impl sched::Context for Ctx<'_> {
    fn writable(&mut self) -> bool {
        true
    }

    fn candidates(&mut self, group: &GroupId) -> Option<Vec<PeerId>> {
        let view = self.engine.group(group).filter(|v| v.active)?;
        let me = self.engine.peer_id();
        Some(
            view.members
                .iter()
                .map(|(_, p)| *p)
                .filter(|p| *p != me && (self.connected)(p))
                .collect(),
        )
    }

    fn holdings(&mut self, group: &GroupId) -> Option<(Holdings, Summary)> {
        let envelopes: Vec<&StoredEnvelope> = self
            .store
            .envelopes
            .values()
            .filter(|e| e.group == *group)
            .collect();
        let floor = self
            .store
            .history
            .values()
            .filter(|h| h.group == *group)
            .map(|h| h.epoch)
            .min()
            .unwrap_or(0);
        let holdings = Holdings::new(envelopes.into_iter());
        let summary = holdings.summary().with_floor(floor);
        Some((holdings, summary))
    }
}

impl Core {
    /// Starts a node from `durable` (empty for a new node), as the node's `engine::start`
    /// does: load the groups, hold every group's live messages until a sync caught up.
    pub fn start(
        identity: Identity,
        network: &str,
        durable: &Durable,
        seed: u64,
        now_ms: u64,
    ) -> Self {
        let provider = OpenMlsRustCrypto::default();
        *provider
            .storage()
            .values
            .write()
            .unwrap_or_else(PoisonError::into_inner) = durable.mls.clone();
        let mut engine = GroupEngine::new(provider, identity, network);
        let mut subscribed = BTreeSet::new();
        let mut seals = BTreeMap::new();
        match engine.load(durable.store.metas.values().cloned().collect()) {
            Ok((effects, _missing)) => {
                for e in effects {
                    if let Effect::Subscribe(t, key) = e {
                        subscribed.insert(t);
                        seals.insert(t, key);
                    }
                }
            }
            Err(e) => panic!("a durable state did not load: {e}"),
        }
        engine.begin_catch_up_all(now_ms);
        Core {
            engine,
            sync: SyncScheduler::new(seed),
            store: durable.store.clone(),
            subscribed,
            seals,
            notes: Notes::default(),
            held: HeldRequests::new(),
            join: None,
            rejoin: None,
            lost: Vec::new(),
            dirty: false,
            queue: Vec::new(),
        }
    }

    /// The state a crash now would go back to (if the last commit was durable).
    pub fn durable(&self) -> Durable {
        Durable {
            store: self.store.clone(),
            mls: self
                .engine
                .provider()
                .storage()
                .values
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Commits `effects` and performs them; returns whether the commit must be durable
    /// (the caller snapshots then). Scheduler inputs they cause are queued.
    pub fn apply(
        &mut self,
        mut effects: Vec<Effect>,
        durable: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        // A copy of a message this node holds is refused like a lost one; nothing is lost.
        let store = &self.store;
        crate::group::drop_held_undecryptable(&mut effects, |id| store.has(id));
        // What is truly lost here is asked for again, in the same commit.
        if let Err(e) = self.engine.want_resend_for(&effects) {
            panic!("cannot note a re-send request: {e}");
        }
        let durable = durable || effects.iter().any(|e| matches!(e, Effect::Publish { .. }));
        self.store.commit(&effects);
        self.dirty = true;
        for e in &effects {
            if let Effect::Subscribe(t, key) = e {
                self.seals.insert(*t, *key);
            }
        }
        for e in effects {
            match e {
                // What the network carries is sealed, as the node's network task does.
                Effect::Publish { topic, data } => match self.seals.get(&topic) {
                    Some(key) => match seal::seal(key, &data) {
                        Ok(frame) => out.push(Action::Publish(topic, frame)),
                        Err(e) => panic!("an envelope the engine made does not seal: {e}"),
                    },
                    None => panic!("a publish on a topic the node never subscribed to"),
                },
                Effect::Subscribe(t, _) => {
                    self.subscribed.insert(t);
                }
                Effect::Unsubscribe(t) => {
                    self.subscribed.remove(&t);
                }
                Effect::RolledBack { group, .. } | Effect::Behind { group, .. } => {
                    self.queue.push(sched::Input::Sync {
                        group,
                        trigger: sched::Trigger::Gap,
                    })
                }
                Effect::DeepForkLost { .. } => {
                    self.notes.deep_forks += 1;
                    self.lost.push(e);
                }
                Effect::JoinLost { .. } => {
                    self.notes.join_lost += 1;
                    self.lost.push(e);
                }
                _ => {}
            }
        }
        durable
    }

    /// Marks the state durable (the flush tick or a durable commit); returns whether
    /// anything changed since the last time.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Receives one gossip frame on `topic`. A frame this node cannot open (a stranger has
    /// no key) is dropped, as the node's network task makes the engine reject it.
    pub fn on_gossip(
        &mut self,
        topic: TopicId,
        frame: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(Ok(data)) = self
            .seals
            .get(&topic)
            .map(|k| seal::open_envelope(k, super::NETWORK, frame))
        else {
            return false;
        };
        let data = &data[..];
        if self.store.has(&MessageId::of(data)) {
            return false;
        }
        let (verdict, effects) = self.engine.handle_envelope(data, now_ms);
        if matches!(verdict, Verdict::Ignore(_))
            && let Ok(env) = Envelope::decode(data)
            && let Some(current_epoch) = self.engine.group_epoch(&env.group())
        {
            self.queue.push(sched::Input::FutureEpoch {
                group: env.group(),
                seen_epoch: env.epoch(),
                current_epoch,
            });
        }
        self.apply(effects, false, out)
    }

    /// Answers a sync request from `peer`, as the node's `on_sync_request` does (without
    /// the rate limit; the world refuses some requests as rate-limited itself).
    pub fn serve(&mut self, peer: PeerId, request: &SyncRequest) -> SyncResponse {
        let group = *request.group();
        let Some(view) = self.engine.group(&group).filter(|v| v.active) else {
            return SyncResponse::Refused(SyncRefusal::UnknownGroup);
        };
        if !view.members.iter().any(|(_, p)| *p == peer) {
            return SyncResponse::Refused(SyncRefusal::NotMember);
        }
        let held: Vec<(u64, MessageId)> = request
            .summary()
            .map(|s| {
                s.epochs
                    .iter()
                    .filter_map(|e| Some((e.epoch, e.commit?)))
                    .collect()
            })
            .unwrap_or_default();
        if self.engine.detect_fork(&group, held).is_some() {
            self.queue.push(sched::Input::ForkSeen { group, peer });
        }
        let mut items = Vec::new();
        let me = self.engine.peer_id();
        for env in self.store.envelopes.values().filter(|e| e.group == group) {
            match env.kind {
                PayloadKind::Commit => items.push(SyncItem::commit(env)),
                PayloadKind::Application => {
                    let hid = self.store.links.get(&env.id).unwrap_or(&env.id);
                    match self.store.history.get(hid) {
                        Some(h) => items.push(SyncItem::application(env, h.sent_at_ms, &h.sender)),
                        None => items.push(SyncItem::unrecorded(env, &me)),
                    }
                }
                PayloadKind::Proposal => {}
            }
        }
        respond(request, &items).0
    }

    /// Feeds `input` (and whatever it causes) to the scheduler and performs the outputs.
    pub fn sync_input(
        &mut self,
        input: sched::Input,
        now: sched::Millis,
        now_ms: u64,
        connected: &dyn Fn(&PeerId) -> bool,
        out: &mut Vec<Action>,
    ) -> bool {
        self.queue.insert(0, input);
        self.drain(now, now_ms, connected, out)
    }

    /// Feeds the queued scheduler inputs; returns whether a durable commit happened.
    pub fn drain(
        &mut self,
        now: sched::Millis,
        now_ms: u64,
        connected: &dyn Fn(&PeerId) -> bool,
        out: &mut Vec<Action>,
    ) -> bool {
        let mut durable = false;
        while !self.queue.is_empty() {
            let input = self.queue.remove(0);
            let mut ctx = Ctx {
                engine: &self.engine,
                store: &self.store,
                connected,
            };
            let outputs = self.sync.handle(now, input, &mut ctx);
            for o in outputs {
                durable |= self.perform(o, now_ms, out);
            }
        }
        durable
    }

    fn perform(&mut self, output: sched::Output, now_ms: u64, out: &mut Vec<Action>) -> bool {
        match output {
            sched::Output::Request { peer, id, request } => {
                out.push(Action::Request { peer, id, request });
                false
            }
            sched::Output::ScheduleTimer { at } => {
                out.push(Action::Timer(at));
                false
            }
            sched::Output::BeginHold { group } => {
                self.engine.begin_catch_up(&group, now_ms);
                false
            }
            sched::Output::Ingest { envelopes, .. } => {
                let new: Vec<Vec<u8>> = envelopes
                    .into_iter()
                    .filter(|data| !self.store.has(&MessageId::of(data)))
                    .collect();
                let (_, effects) = self.engine.handle_synced_batch(new, now_ms);
                self.apply(effects, false, out)
            }
            sched::Output::EndHold { group, in_time } => {
                let effects = if in_time {
                    self.engine.end_catch_up(&group, now_ms)
                } else {
                    self.notes.hold_timeouts += 1;
                    self.engine.end_catch_up_now(&group, now_ms)
                };
                self.apply(effects, false, out)
            }
            sched::Output::RunEnded { complete, .. } => {
                self.notes.runs += 1;
                if !complete {
                    self.notes.failed_runs += 1;
                }
                false
            }
            sched::Output::NotAMember { group } => match self.engine.member_says_not_in(&group) {
                Some(fx) => self.apply(vec![fx], false, out),
                None => false,
            },
        }
    }

    /// The texts in this node's history of `group`, by text.
    pub fn texts(&self, group: &GroupId) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for h in self.store.history.values().filter(|h| h.group == *group) {
            if let Some(t) = h.kind.text() {
                *out.entry(t.to_owned()).or_default() += 1;
            }
        }
        out
    }
}
