//! A seeded simulator of whole node cores with virtual time (tests only).
//!
//! Each simulated node is what the node's engine runs, without its IO: the MLS
//! [`GroupEngine`](crate::group::GroupEngine) on openmls' memory storage, the history-sync
//! [`SyncScheduler`](crate::sync::scheduler::SyncScheduler) driven as `node::engine` drives
//! it, the responder side of sync ([`crate::sync::respond`]), and a store whose durable part
//! survives a crash ([`node`]). The world between them has a virtual clock that jumps to the
//! next event, gossip with latency, loss, duplication and reordering, request-response for
//! sync (failing across partitions and to crashed nodes, sometimes refused as rate-limited),
//! partitions, and crashes that restart from the last durable state.
//!
//! Everything the world decides comes from one seed ([`Rng`]), so a failing seed replays
//! the same schedule. MLS itself draws its own randomness (openmls' crypto provider seeds
//! from the OS), so message ids and ciphertexts differ between replays; nothing the world
//! decides depends on them.
//!
//! After the faults stop, every partition heals, every crashed node restarts, and the world
//! runs on for a while; then [`World::check`] asserts the properties: every message reached,
//! exactly once, every member that was a member when it was sent; all members end in one
//! epoch with one epoch authenticator; nodes outside the group read nothing; joins by
//! invite keep the invite's bounds (`check`, with joiners driven in `joins`).

use std::collections::{BTreeMap, BTreeSet};

use libp2p_identity::PeerId;

use crate::envelope::JoinRequest;
use crate::group::{Identity, NewInvite, PAST_EPOCH_TTL};
use crate::ids::{GroupId, TopicId};
use crate::invite::Invite;
use crate::sync::scheduler::{self as sched, RequestFailure, SYNC_INTERVAL};
use crate::sync::{SyncRefusal, SyncRequest, SyncResponse};
use crate::testing::{T0_MS, member_key};

mod check;
mod config;
mod joins;
mod node;
#[cfg(test)]
mod tests;

pub use config::{Config, Rng, Stats};
use joins::{ClientInput, ClientOp, JoinEnd};
use node::{Action, Core, Durable};

/// The flush tick of the node (`node::engine::FLUSH_INTERVAL`).
const FLUSH_MS: u64 = 500;
/// How long a request across a partition waits before it fails.
const PARTITION_TIMEOUT_MS: u64 = 10_000;
/// How long a request to a crashed node takes to fail (the connection closes).
const CLOSED_MS: u64 = 50;
/// Network name of the simulated nodes.
const NETWORK: &str = "sim-net";

/// Something scheduled at a virtual time.
#[derive(Debug)]
enum Event {
    Gossip {
        to: usize,
        topic: TopicId,
        data: Vec<u8>,
    },
    Request {
        to: usize,
        from: usize,
        life: u64,
        id: sched::RequestId,
        request: Box<SyncRequest>,
    },
    Reply {
        to: usize,
        life: u64,
        id: sched::RequestId,
        response: Option<SyncResponse>,
    },
    Timer {
        node: usize,
        life: u64,
    },
    Flush {
        node: usize,
        life: u64,
    },
    SyncAll {
        node: usize,
        life: u64,
    },
    Send {
        node: usize,
        k: usize,
    },
    Commit {
        node: usize,
    },
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    Partition {
        cut: Vec<usize>,
    },
    Heal,
    EndFaults,
    /// A joiner starts (or tries again) to join.
    JoinStart {
        node: usize,
        life: u64,
    },
    /// A join or rejoin request reaches member `to`.
    JoinRequest {
        to: usize,
        from: usize,
        life: u64,
        op: ClientOp,
        request: Box<JoinRequest>,
    },
    /// A result for one of the node's join clients.
    ClientInput {
        node: usize,
        life: u64,
        input: ClientInput,
    },
    /// A join client's timer.
    ClientTimer {
        node: usize,
        life: u64,
    },
    /// Sync a group just joined again (the node's follow-up syncs).
    FollowUp {
        node: usize,
        life: u64,
        group: GroupId,
    },
}

/// A message some member sent, and who should read it.
#[derive(Debug, Clone)]
struct Sent {
    text: String,
    sender: usize,
    /// Members in the sender's view when it sent it.
    members: BTreeSet<PeerId>,
}

/// One node's place in the world.
struct Slot {
    core: Option<Core>,
    durable: Durable,
    /// Incarnation: events of an earlier one are dropped.
    life: u64,
    crashable: bool,
    peer: PeerId,
}

impl World {
    /// Undecryptable envelopes whose text came back, re-sent on request, over all members
    /// (what the run exercised of [`crate::group::GroupEngine::resend_tick`]).
    pub fn recovered(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.core.as_ref())
            .map(|c| c.store.recovered.len())
            .sum()
    }
}

/// The simulated world.
pub struct World {
    cfg: Config,
    rng: Rng,
    seed: u64,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    slots: Vec<Slot>,
    /// Members cut off by the current partition.
    cut: BTreeSet<usize>,
    faults: bool,
    group: GroupId,
    sent: Vec<Sent>,
    /// The invite the joiners use.
    invite: Option<Invite>,
    /// How each joiner's join ended.
    ends: BTreeMap<usize, JoinEnd>,
    /// Statistics.
    pub stats: Stats,
}

impl World {
    /// Sets up `cfg` from `seed`: member 0 creates the group and adds every other member
    /// (no faults yet), then the faults are scheduled.
    pub fn new(cfg: Config, seed: u64) -> World {
        let n = cfg.members + cfg.joiners + cfg.strangers;
        let mut rng = Rng::new(seed);
        let slots = (0..n)
            .map(|i| {
                let identity = identity(i);
                let core = Core::start(
                    identity,
                    NETWORK,
                    &Durable::default(),
                    rng.next_u64(),
                    T0_MS,
                );
                Slot {
                    peer: core.engine.peer_id(),
                    core: Some(core),
                    durable: Durable::default(),
                    life: 0,
                    crashable: cfg.crashable.contains(&i)
                        || cfg.outages.iter().any(|(m, _, _)| *m == i),
                }
            })
            .collect();
        let group = GroupId(crate::ids::hash_parts(&[b"sim-group", &seed.to_be_bytes()]));
        let mut w = World {
            cfg,
            rng,
            seed,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            slots,
            cut: BTreeSet::new(),
            faults: false,
            group,
            sent: Vec::new(),
            invite: None,
            ends: BTreeMap::new(),
            stats: Stats::default(),
        };
        for i in 0..n {
            let first = w.rng.below(FLUSH_MS);
            w.at(first, Event::Flush { node: i, life: 0 });
            let sync = w.rng.below(SYNC_INTERVAL.as_millis() as u64);
            w.at(sync, Event::SyncAll { node: i, life: 0 });
        }
        w.setup();
        w.schedule_faults();
        w
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn now_ms(&self) -> u64 {
        T0_MS + self.now
    }

    fn up(&self, i: usize) -> bool {
        self.slots[i].core.is_some()
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.up(a) && self.up(b) && self.cut.contains(&a) == self.cut.contains(&b)
    }

    fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.slots.iter().position(|s| s.peer == *peer)
    }

    /// Member 0 creates the group; each other member joins through it in turn.
    fn setup(&mut self) {
        let g = self.group;
        let now_ms = self.now_ms();
        let fx = self
            .core(0)
            .engine
            .create_group(g, "sim", now_ms)
            .expect("create group");
        self.commit_effects(0, fx, true);
        let invite = self.create_invite(b"sim-secret", self.cfg.members.max(1) as u32);
        for j in 1..self.cfg.members {
            let now_ms = self.now_ms();
            let request = self
                .core(j)
                .engine
                .prepare_join(&invite, now_ms)
                .expect("prepare join");
            let record = self.core(0).store.invites.get(&invite.id()).cloned();
            let from = self.slots[j].peer;
            let (response, fx) = self
                .core(0)
                .engine
                .handle_join_request(from, request, record, now_ms)
                .expect("join request");
            self.commit_effects(0, fx, true);
            let (_, fx) = self
                .core(j)
                .engine
                .handle_join_response(&invite, response, now_ms)
                .expect("join response");
            self.commit_effects(j, fx, true);
            // Let the commit reach every member before the next one.
            self.run_until(self.now + 1_000);
        }
        if self.cfg.joiners > 0 {
            // The joiners' link, from member 0: the others learn it through the group.
            self.invite = Some(self.create_invite(b"sim-joiners", self.cfg.invite_uses));
        }
        self.run_until(self.now + 5_000);
    }

    /// Member 0 creates an invite of `max_uses` for a year.
    fn create_invite(&mut self, label: &[u8], max_uses: u32) -> Invite {
        let now_ms = self.now_ms();
        let secret = crate::ids::hash_parts(&[label, &self.seed.to_be_bytes()]);
        let group = self.group;
        let (invite, fx) = self
            .core(0)
            .engine
            .create_invite(
                group,
                NewInvite {
                    addrs: Vec::new(),
                    secret,
                    expires_at: now_ms / 1000 + 365 * 24 * 3600,
                    max_uses,
                    approval: false,
                },
                now_ms,
            )
            .expect("create invite");
        self.commit_effects(0, fx, true);
        invite
    }

    fn core(&mut self, i: usize) -> &mut Core {
        self.slots[i].core.as_mut().expect("node is up")
    }

    /// Schedules the sends, commits, crashes and partitions from the seed.
    fn schedule_faults(&mut self) {
        self.faults = true;
        let mut t = 0;
        for k in 0..self.cfg.messages {
            t += self.rng.range(self.cfg.send_every_ms);
            let node = self.cfg.senders[self.rng.below(self.cfg.senders.len() as u64) as usize];
            self.at(t, Event::Send { node, k });
        }
        let span = t.max(1);
        let mut next_join = 0;
        for k in 0..self.cfg.joiners {
            let when = match self.cfg.join_every_ms {
                Some(pause) => {
                    next_join += self.rng.range(pause);
                    next_join
                }
                None => self.rng.below(span),
            };
            let node = self.cfg.members + k;
            self.at(when, Event::JoinStart { node, life: 0 });
        }
        for _ in 0..self.cfg.commits {
            let when = self.rng.below(span);
            self.at(when, Event::Commit { node: 0 });
        }
        for _ in 0..self.cfg.crashes {
            if self.cfg.crashable.is_empty() {
                break;
            }
            let node = self.cfg.crashable[self.rng.below(self.cfg.crashable.len() as u64) as usize];
            let when = self.rng.below(span);
            let down = self.rng.range(self.cfg.down_ms);
            self.at(when, Event::Crash { node });
            self.at(when + down, Event::Restart { node });
        }
        for _ in 0..self.cfg.partitions {
            let cut: Vec<usize> = (0..self.slots.len())
                .filter(|_| self.rng.chance(0.4))
                .collect();
            let when = self.rng.below(span);
            let len = self.rng.range(self.cfg.partition_ms);
            self.at(when, Event::Partition { cut });
            self.at(when + len, Event::Heal);
        }
        for (node, down, up) in self.cfg.outages.clone() {
            self.at(down, Event::Crash { node });
            self.at(up, Event::Restart { node });
        }
        for (cut, from, to) in self.cfg.cuts.clone() {
            self.at(from, Event::Partition { cut });
            self.at(to, Event::Heal);
        }
        let end = self
            .queue
            .keys()
            .map(|(t, _)| *t)
            .max()
            .unwrap_or(self.now)
            .saturating_sub(self.now);
        self.at(end + 1, Event::EndFaults);
    }

    /// Runs every event up to virtual time `until`.
    pub fn run_until(&mut self, until: u64) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((t, _), event) = entry.remove_entry();
            self.now = t;
            self.stats.events += 1;
            self.handle(event);
        }
        self.now = self.now.max(until);
        self.stats.virtual_ms = self.now;
    }

    /// Runs the faults, then heals and settles.
    pub fn run(&mut self) {
        while self.faults {
            let Some(((t, _), event)) = self.queue.pop_first() else {
                break;
            };
            self.now = t;
            self.stats.events += 1;
            self.handle(event);
        }
        let end = self.now + self.cfg.settle_ms;
        self.run_until(end);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Gossip { to, topic, data } => {
                if !self.up(to) {
                    return;
                }
                let now_ms = self.now_ms();
                let mut out = Vec::new();
                let durable = self.core(to).on_gossip(topic, &data, now_ms, &mut out);
                self.after(to, durable, out);
            }
            Event::Request {
                to,
                from,
                life,
                id,
                request,
            } => {
                if !self.connected(from, to) {
                    let delay = if self.up(to) {
                        PARTITION_TIMEOUT_MS
                    } else {
                        CLOSED_MS
                    };
                    self.at(
                        delay,
                        Event::Reply {
                            to: from,
                            life,
                            id,
                            response: None,
                        },
                    );
                    return;
                }
                let response = if self.faults && self.rng.chance(self.cfg.rate_limited) {
                    SyncResponse::Refused(SyncRefusal::RateLimited)
                } else {
                    self.stats.requests += 1;
                    let peer = self.slots[from].peer;
                    self.core(to).serve(peer, &request)
                };
                // A fork seen while serving starts a sync on the responder.
                self.drain(to);
                let delay = self.rng.range(self.cfg.latency_ms);
                self.at(
                    delay,
                    Event::Reply {
                        to: from,
                        life,
                        id,
                        response: Some(response),
                    },
                );
            }
            Event::Reply {
                to,
                life,
                id,
                response,
            } => {
                if !self.up(to) || self.slots[to].life != life {
                    return;
                }
                let input = match response {
                    Some(response) => sched::Input::Response { id, response },
                    None => sched::Input::RequestFailed {
                        id,
                        failure: RequestFailure::Unanswered,
                    },
                };
                self.sync_input(to, input);
            }
            Event::Timer { node, life } => {
                if self.up(node) && self.slots[node].life == life {
                    self.sync_input(node, sched::Input::Timer);
                }
            }
            Event::Flush { node, life } => {
                if !self.up(node) || self.slots[node].life != life {
                    return;
                }
                self.flush(node);
                self.at(FLUSH_MS, Event::Flush { node, life });
            }
            Event::SyncAll { node, life } => {
                if !self.up(node) || self.slots[node].life != life {
                    return;
                }
                let groups = self.active_groups(node);
                self.sync_input(node, sched::Input::SyncAll { groups });
                self.at(
                    SYNC_INTERVAL.as_millis() as u64,
                    Event::SyncAll { node, life },
                );
            }
            Event::Send { node, k } => self.send(node, k),
            Event::Commit { node } => {
                if !self.up(node) {
                    return;
                }
                let (g, now_ms) = (self.group, self.now_ms());
                if let Ok(fx) = self.core(node).engine.self_update(g, now_ms) {
                    self.commit_effects(node, fx, true);
                }
            }
            Event::Crash { node } => {
                if self.up(node) && self.faults {
                    self.stats.crashes += 1;
                    self.slots[node].core = None;
                    self.slots[node].life += 1;
                }
            }
            Event::Restart { node } => self.restart(node),
            Event::Partition { cut } => {
                if self.faults {
                    self.cut = cut.into_iter().collect();
                }
            }
            Event::Heal => self.heal(),
            Event::JoinStart { node, life } => {
                if self.up(node) && self.slots[node].life == life {
                    self.start_join(node, None, false);
                }
            }
            Event::JoinRequest {
                to,
                from,
                life,
                op,
                request,
            } => self.on_join_request(to, from, life, op, *request),
            Event::ClientInput { node, life, input } => {
                self.on_client_input(node, life, Some(input))
            }
            Event::ClientTimer { node, life } => self.on_client_input(node, life, None),
            Event::FollowUp { node, life, group } => {
                if self.up(node) && self.slots[node].life == life {
                    let trigger = sched::Trigger::Gap;
                    self.sync_input(node, sched::Input::Sync { group, trigger });
                }
            }
            Event::EndFaults => {
                self.faults = false;
                self.heal();
                for i in 0..self.slots.len() {
                    self.restart(i);
                }
            }
        }
    }

    fn active_groups(&self, i: usize) -> Vec<GroupId> {
        self.slots[i]
            .core
            .as_ref()
            .map(|c| {
                c.engine
                    .groups()
                    .iter()
                    .filter(|v| v.active)
                    .map(|v| v.meta.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The node's flush tick: the scheduler's tick, past-epoch expiry, re-sends, held
    /// removals, and the flush.
    fn flush(&mut self, i: usize) {
        let now_ms = self.now_ms();
        let core = self.core(i);
        let holding: Vec<GroupId> = core
            .store
            .metas
            .keys()
            .copied()
            .filter(|g| core.engine.is_catching_up(g))
            .collect();
        let limit = sched::CATCH_UP_HOLD_LIMIT.as_millis() as u64;
        let stale = core.engine.stale_catch_ups(now_ms, limit);
        self.sync_input(i, sched::Input::Tick { holding, stale });
        // Past epochs age in virtual time, on every tick as in the node.
        if let Err(e) = self
            .core(i)
            .engine
            .expire_past_epochs(now_ms, PAST_EPOCH_TTL)
        {
            panic!("past-epoch expiry failed: {e}");
        }
        // Requests for what it cannot decrypt, and the texts members asked it for.
        match self.core(i).engine.resend_tick(now_ms) {
            Ok(fx) if !fx.is_empty() => self.commit_effects(i, fx, true),
            Ok(_) => {}
            Err(e) => panic!("re-send tick failed: {e}"),
        }
        // Commits removing it whose grace ended are merged.
        let fx = self.core(i).engine.removal_tick(now_ms);
        if !fx.is_empty() {
            self.commit_effects(i, fx, false);
        }
        if self.core(i).take_dirty() && self.slots[i].crashable {
            self.slots[i].durable = self.core(i).durable();
        }
    }

    fn send(&mut self, i: usize, k: usize) {
        if !self.up(i) {
            return;
        }
        let (g, now_ms) = (self.group, self.now_ms());
        let text = format!("m{k} from {i}");
        let members: BTreeSet<PeerId> = match self.core(i).engine.group(&g) {
            Some(v) if v.active => v.members.iter().map(|(_, p)| *p).collect(),
            _ => return,
        };
        match self.core(i).engine.send_text(g, &text, now_ms) {
            Ok((_, fx)) => {
                self.stats.sent += 1;
                self.sent.push(Sent {
                    text,
                    sender: i,
                    members,
                });
                self.commit_effects(i, fx, true);
            }
            Err(e) => panic!("member {i} could not send: {e}"),
        }
    }

    fn restart(&mut self, i: usize) {
        if self.up(i) {
            return;
        }
        let seed = self.rng.next_u64();
        let core = Core::start(
            identity(i),
            NETWORK,
            &self.slots[i].durable,
            seed,
            self.now_ms(),
        );
        self.slots[i].core = Some(core);
        let life = self.slots[i].life;
        let first = self.rng.below(FLUSH_MS);
        self.at(first, Event::Flush { node: i, life });
        self.at(
            SYNC_INTERVAL.as_millis() as u64,
            Event::SyncAll { node: i, life },
        );
        let others: Vec<usize> = (0..self.slots.len())
            .filter(|j| *j != i && self.connected(i, *j))
            .collect();
        for j in others {
            self.meet(i, j);
            self.meet(j, i);
        }
    }

    /// Ends the partition: everyone that was cut off meets everyone else.
    fn heal(&mut self) {
        let cut = std::mem::take(&mut self.cut);
        for &a in &cut {
            for b in 0..self.slots.len() {
                if !cut.contains(&b) && self.connected(a, b) {
                    self.meet(a, b);
                    self.meet(b, a);
                }
            }
        }
    }

    /// `i` sees `j` connect.
    fn meet(&mut self, i: usize, j: usize) {
        let peer = self.slots[j].peer;
        let Some(core) = self.slots[i].core.as_ref() else {
            return;
        };
        let groups: Vec<GroupId> = core
            .engine
            .groups()
            .iter()
            .filter(|v| v.active && v.members.iter().any(|(_, p)| *p == peer))
            .map(|v| v.meta.id)
            .collect();
        if !groups.is_empty() {
            self.sync_input(i, sched::Input::PeerConnected { peer, groups });
        }
    }

    /// Commits the effects of a local operation of `i` (durable) and performs them.
    fn commit_effects(&mut self, i: usize, effects: Vec<crate::group::Effect>, durable: bool) {
        let mut out = Vec::new();
        let durable = self.core(i).apply(effects, durable, &mut out);
        self.after(i, durable, out);
    }

    fn sync_input(&mut self, i: usize, input: sched::Input) {
        self.drain_with(i, Some(input));
    }

    fn drain(&mut self, i: usize) {
        self.drain_with(i, None);
    }

    fn drain_with(&mut self, i: usize, input: Option<sched::Input>) {
        let (now, now_ms) = (self.now, self.now_ms());
        let links: Vec<bool> = (0..self.slots.len())
            .map(|j| self.connected(i, j))
            .collect();
        let peers: Vec<PeerId> = self.slots.iter().map(|s| s.peer).collect();
        let connected = |p: &PeerId| peers.iter().position(|q| q == p).is_some_and(|j| links[j]);
        let mut out = Vec::new();
        let Some(core) = self.slots[i].core.as_mut() else {
            return;
        };
        let durable = match input {
            Some(input) => core.sync_input(input, now, now_ms, &connected, &mut out),
            None => core.drain(now, now_ms, &connected, &mut out),
        };
        self.after(i, durable, out);
    }

    /// Snapshots `i` after a durable commit and performs what it asked of the world.
    fn after(&mut self, i: usize, durable: bool, actions: Vec<Action>) {
        if durable && self.slots[i].crashable {
            self.slots[i].durable = self.core(i).durable();
            self.core(i).take_dirty();
        }
        // Scheduler inputs the effects queued (a gap seen, a rollback).
        let mut actions = actions;
        {
            let (now, now_ms) = (self.now, self.now_ms());
            let links: Vec<bool> = (0..self.slots.len())
                .map(|j| self.connected(i, j))
                .collect();
            let peers: Vec<PeerId> = self.slots.iter().map(|s| s.peer).collect();
            let connected =
                |p: &PeerId| peers.iter().position(|q| q == p).is_some_and(|j| links[j]);
            if let Some(core) = self.slots[i].core.as_mut()
                && core.drain(now, now_ms, &connected, &mut actions)
                && self.slots[i].crashable
            {
                self.slots[i].durable = self.core(i).durable();
                self.core(i).take_dirty();
            }
        }
        for a in actions {
            match a {
                Action::Publish(topic, data) => self.publish(i, topic, data),
                Action::Request { peer, id, request } => {
                    let life = self.slots[i].life;
                    match self.index_of(&peer) {
                        Some(to) => {
                            let delay = self.rng.range(self.cfg.latency_ms);
                            self.at(
                                delay,
                                Event::Request {
                                    to,
                                    from: i,
                                    life,
                                    id,
                                    request,
                                },
                            );
                        }
                        None => self.at(
                            CLOSED_MS,
                            Event::Reply {
                                to: i,
                                life,
                                id,
                                response: None,
                            },
                        ),
                    }
                }
                Action::Timer(at) => {
                    let life = self.slots[i].life;
                    self.at(at.saturating_sub(self.now), Event::Timer { node: i, life });
                }
            }
        }
        self.after_effects(i);
    }

    fn publish(&mut self, from: usize, topic: TopicId, data: Vec<u8>) {
        for j in 0..self.slots.len() {
            if j == from || !self.connected(from, j) {
                continue;
            }
            let stranger = j >= self.cfg.members + self.cfg.joiners;
            if !stranger
                && !self.slots[j]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.subscribed.contains(&topic))
            {
                continue;
            }
            if self.faults && self.rng.chance(self.cfg.drop) {
                self.stats.dropped += 1;
                continue;
            }
            self.stats.gossip += 1;
            let delay = self.rng.range(self.cfg.latency_ms);
            self.at(
                delay,
                Event::Gossip {
                    to: j,
                    topic,
                    data: data.clone(),
                },
            );
            if self.faults && self.rng.chance(self.cfg.duplicate) {
                let delay = self.rng.range(self.cfg.latency_ms);
                self.at(
                    delay,
                    Event::Gossip {
                        to: j,
                        topic,
                        data: data.clone(),
                    },
                );
            }
        }
    }

    /// Texts sent.
    pub fn sent(&self) -> usize {
        self.sent.len()
    }
}

fn identity(i: usize) -> Identity {
    Identity::new(&member_key(i as u8)).expect("ed25519 key")
}
