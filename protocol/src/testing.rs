//! A deterministic in-memory network of group engines, for tests only.
//!
//! [`Sim`] holds one [`GroupEngine`] per member and a queue of published envelopes. Delivery
//! order is controlled by the test (in order, or shuffled with a seeded generator), so
//! multi-member runs are replayable. Every effect a member produces is passed to a hook first,
//! which lets the node's store tests persist it exactly as the node would.

use std::collections::VecDeque;

use libp2p_identity::{Keypair, PeerId};
use openmls_traits::OpenMlsProvider;

use crate::envelope::{JoinResponse, PayloadKind};
use crate::group::{Effect, GroupEngine, GroupError, Identity, NewInvite, Verdict};
use crate::ids::{GroupId, MessageId, TopicId};
use crate::invite::{Invite, InviteRecord};
use crate::order::Undecryptable;
use crate::records::{HistoryEntry, StoredEnvelope};

/// Fixed time for tests: 2026-01-01T00:00:00Z in milliseconds.
pub const T0_MS: u64 = 1_767_225_600_000;

/// A deterministic node key for member `i`.
pub fn member_key(i: u8) -> Keypair {
    Keypair::ed25519_from_bytes([i.wrapping_add(1); 32])
        .expect("32 bytes is a valid ed25519 secret")
}

/// Called with (member index, effects) after every engine call, before the sim applies them.
pub type Hook<'a, P> = Box<dyn FnMut(usize, &GroupEngine<P>, &[Effect]) + 'a>;

/// An in-memory network of members.
pub struct Sim<'a, P: OpenMlsProvider> {
    /// The members' engines.
    pub engines: Vec<GroupEngine<P>>,
    /// Each member's topic subscriptions.
    pub subscribed: Vec<Vec<TopicId>>,
    /// Each member's history, in the order entries were recorded.
    pub history: Vec<Vec<HistoryEntry>>,
    /// Each member's stored invite records.
    pub invites: Vec<Vec<InviteRecord>>,
    /// Envelopes in flight: (publisher, topic, bytes).
    pub in_flight: VecDeque<(usize, TopicId, Vec<u8>)>,
    /// Verdicts of every delivery: (receiver, verdict).
    pub verdicts: Vec<(usize, Verdict)>,
    /// Current time.
    pub now_ms: u64,
    /// Each member's stored envelopes (what it would serve to a history sync), in the order
    /// it stored them.
    pub stored: Vec<Vec<StoredEnvelope>>,
    /// Each member's [`Effect::Behind`] signals: (group, missing).
    pub behind: Vec<Vec<(GroupId, u64)>>,
    /// Per member: the chat effects that are not history (profiles, receipts, typing,
    /// direct chats and offers), in order.
    pub chat: Vec<Vec<Effect>>,
    /// Each member's envelopes that it can never decrypt: (envelope id, why).
    pub undecryptable: Vec<Vec<(MessageId, Undecryptable)>>,
    hook: Hook<'a, P>,
}

impl<'a, P: OpenMlsProvider> Sim<'a, P>
where
    P::StorageProvider: crate::fork::GroupRecords,
{
    /// A sim with one member per provider; member `i` gets key [`member_key`]`(i)`.
    pub fn new(providers: Vec<P>, network: &str, hook: Hook<'a, P>) -> Self {
        let n = providers.len();
        let engines = providers
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let id = Identity::new(&member_key(i as u8)).expect("ed25519 key");
                GroupEngine::new(p, id, network)
            })
            .collect();
        Sim {
            engines,
            subscribed: vec![Vec::new(); n],
            history: vec![Vec::new(); n],
            invites: vec![Vec::new(); n],
            in_flight: VecDeque::new(),
            verdicts: Vec::new(),
            now_ms: T0_MS,
            stored: vec![Vec::new(); n],
            behind: vec![Vec::new(); n],
            chat: vec![Vec::new(); n],
            undecryptable: vec![Vec::new(); n],
            hook,
        }
    }

    /// The PeerId of member `i`.
    pub fn peer(&self, i: usize) -> PeerId {
        self.engines[i].peer_id()
    }

    /// Applies effects of member `i`: records history, queues publications.
    pub fn apply(&mut self, i: usize, effects: Vec<Effect>) {
        (self.hook)(i, &self.engines[i], &effects);
        for e in effects {
            match e {
                Effect::Publish { topic, data } => self.in_flight.push_back((i, topic, data)),
                Effect::Subscribe(t, _) => self.subscribed[i].push(t),
                Effect::Unsubscribe(t) => self.subscribed[i].retain(|x| *x != t),
                Effect::Record(h) => {
                    // A re-sent message replaces its earlier copy (the store does the same).
                    match self.history[i].iter_mut().find(|x| x.id == h.id) {
                        Some(x) => *x = h,
                        None => self.history[i].push(h),
                    }
                }
                Effect::RolledBack { forget_history, .. } => {
                    self.history[i].retain(|h| !forget_history.contains(&h.id));
                }
                Effect::Invite(u) => {
                    let current = self.invites[i].iter().position(|x| x.id == u.id());
                    let old = current.map(|p| self.invites[i].remove(p));
                    self.invites[i].push(InviteRecord::merge(old, &u));
                }
                Effect::SaveEnvelope(env) => self.stored[i].push(env),
                Effect::Behind { group, missing } => self.behind[i].push((group, missing)),
                Effect::Undecryptable { envelope, reason } => {
                    // A copy of a message it holds is refused the same way (the node checks
                    // its store likewise).
                    if !self.stored[i].iter().any(|e| e.id == envelope.id) {
                        self.undecryptable[i].push((envelope.id, reason));
                        // Asked for again at the member's next tick, as the node does.
                        self.engines[i]
                            .want_resend(envelope.group, &[envelope.id])
                            .expect("note a re-send request");
                        self.stored[i].push(envelope);
                    }
                }
                e @ (Effect::Profile { .. }
                | Effect::Receipt { .. }
                | Effect::Typing { .. }
                | Effect::Direct { .. }
                | Effect::DirectOffer { .. }) => self.chat[i].push(e),
                Effect::SaveGroup(_)
                | Effect::Recovered { .. }
                | Effect::LinkEnvelope { .. }
                | Effect::JoinLost { .. }
                | Effect::DeepForkLost { .. }
                | Effect::EpochChanged { .. } => {}
                Effect::ForgetInvites { group } => self.invites[i].retain(|r| r.group != group),
            }
        }
    }

    /// Member `i` creates a group.
    pub fn create_group(&mut self, i: usize, name: &str) -> Result<GroupId, GroupError> {
        let id = GroupId(crate::ids::hash_parts(&[
            b"test-group",
            name.as_bytes(),
            &[i as u8],
        ]));
        let fx = self.engines[i].create_group(id, name, self.now_ms)?;
        self.apply(i, fx);
        Ok(id)
    }

    /// Member `i` invites (shared with the group: deliver to let others honour it); returns
    /// the link.
    pub fn invite(
        &mut self,
        i: usize,
        group: GroupId,
        max_uses: u32,
    ) -> Result<Invite, GroupError> {
        let secret = crate::ids::hash_parts(&[b"secret", &self.now_ms.to_be_bytes(), &[i as u8]]);
        let expires = self.now_ms / 1000 + 3600;
        let (inv, fx) = self.engines[i].create_invite(
            group,
            NewInvite {
                addrs: Vec::new(),
                secret,
                expires_at: expires,
                max_uses,
                approval: false,
            },
            self.now_ms,
        )?;
        self.apply(i, fx);
        Ok(inv)
    }

    /// Member `joiner` joins through member `host` with `invite`; the host's commit is queued.
    pub fn join(
        &mut self,
        joiner: usize,
        host: usize,
        invite: &Invite,
    ) -> Result<GroupId, GroupError> {
        let req = self.engines[joiner].prepare_join(invite, self.now_ms)?;
        (self.hook)(joiner, &self.engines[joiner], &[]);
        let record = self.invites[host]
            .iter()
            .find(|r| r.id == invite.id())
            .cloned();
        let from = self.peer(joiner);
        let (resp, fx) = self.engines[host].handle_join_request(from, req, record, self.now_ms)?;
        self.apply(host, fx);
        if let JoinResponse::Rejected(r) = resp {
            return Err(GroupError::JoinRejected(r));
        }
        let (gid, fx) = self.engines[joiner].handle_join_response(invite, resp, self.now_ms)?;
        self.apply(joiner, fx);
        Ok(gid)
    }

    /// Member `i` sends text.
    pub fn send(&mut self, i: usize, group: GroupId, text: &str) -> Result<(), GroupError> {
        let (_, fx) = self.engines[i].send_text(group, text, self.now_ms)?;
        self.apply(i, fx);
        Ok(())
    }

    /// Member `i` removes `peer` from `group`; the commit is queued.
    pub fn remove(&mut self, i: usize, group: GroupId, peer: PeerId) -> Result<(), GroupError> {
        let fx = self.engines[i].remove_member(group, peer, self.now_ms)?;
        self.apply(i, fx);
        Ok(())
    }

    /// Member `i` asks to leave `group`; its proposal is queued.
    pub fn leave(&mut self, i: usize, group: GroupId) -> Result<(), GroupError> {
        let fx = self.engines[i].leave_group(group, self.now_ms)?;
        self.apply(i, fx);
        Ok(())
    }

    /// Member `i` commits a fresh leaf key in `group`; the commit is queued.
    pub fn self_update(&mut self, i: usize, group: GroupId) -> Result<(), GroupError> {
        let fx = self.engines[i].self_update(group, self.now_ms)?;
        self.apply(i, fx);
        Ok(())
    }

    /// Member `i`'s tick, as the node's flush tick runs it: past-epoch expiry, then its
    /// re-send requests and answers (queued), then the commits removing it whose grace
    /// ended ([`GroupEngine::removal_tick`]).
    pub fn tick(&mut self, i: usize) {
        self.engines[i]
            .expire_past_epochs(self.now_ms, crate::group::PAST_EPOCH_TTL)
            .expect("past-epoch expiry");
        let fx = self.engines[i]
            .resend_tick(self.now_ms)
            .expect("re-send tick");
        self.apply(i, fx);
        let fx = self.engines[i].removal_tick(self.now_ms);
        self.apply(i, fx);
    }

    /// Delivers one in-flight envelope (at `index` in the queue) to every other subscriber.
    pub fn deliver_at(&mut self, index: usize) {
        let Some((from, topic, data)) = self.in_flight.remove(index) else {
            return;
        };
        for j in 0..self.engines.len() {
            if j == from || !self.subscribed[j].contains(&topic) {
                continue;
            }
            self.now_ms += 1;
            let (v, fx) = self.engines[j].handle_envelope(&data, self.now_ms);
            self.verdicts.push((j, v));
            self.apply(j, fx);
        }
    }

    /// Delivers everything in flight, in publication order, until nothing is left.
    pub fn deliver_all(&mut self) {
        while !self.in_flight.is_empty() {
            self.deliver_at(0);
        }
    }

    /// A history sync of member `i` from member `from`: every envelope of `group` that
    /// `from` stored and `i` did not, in epoch order with each epoch's application messages
    /// before the commit that leaves it (the order the node processes a sync run in), then
    /// the end of `i`'s catch-up. Returns how many envelopes were handed over.
    pub fn sync_from(&mut self, i: usize, from: usize, group: GroupId) -> usize {
        let held: std::collections::HashSet<MessageId> =
            self.stored[i].iter().map(|e| e.id).collect();
        let mut missing: Vec<StoredEnvelope> = self.stored[from]
            .iter()
            .filter(|e| e.group == group && !held.contains(&e.id))
            .cloned()
            .collect();
        missing.sort_by_key(|e| (e.epoch, e.kind == PayloadKind::Commit));
        let n = missing.len();
        for env in missing {
            self.now_ms += 1;
            let (v, fx) = self.engines[i].handle_synced_envelope(&env.bytes, self.now_ms);
            self.verdicts.push((i, v));
            self.apply(i, fx);
        }
        let fx = self.engines[i].end_catch_up(&group, self.now_ms);
        self.apply(i, fx);
        n
    }

    /// The texts member `i` has in `group`, in its history order.
    pub fn texts(&self, i: usize, group: GroupId) -> Vec<String> {
        self.history[i]
            .iter()
            .filter(|h| h.group == group)
            .filter_map(|h| h.kind.text().map(str::to_owned))
            .collect()
    }
}

/// The standard three-member run: member 0 creates a group and invites 1 and 2 by link (each
/// through member 0), everyone delivers, then every member sends one message. Returns the
/// group id. Panics with a message on any divergence, so it is usable as a test body.
pub fn three_member_run<P: OpenMlsProvider>(sim: &mut Sim<'_, P>) -> GroupId
where
    P::StorageProvider: crate::fork::GroupRecords,
{
    let g = sim.create_group(0, "friends").expect("create group");
    let inv = sim.invite(0, g, 2).expect("invite");
    sim.deliver_all();
    sim.join(1, 0, &inv).expect("member 1 joins");
    sim.deliver_all();
    sim.join(2, 0, &inv).expect("member 2 joins");
    sim.deliver_all();
    for i in 0..3 {
        sim.send(i, g, &format!("hello from {i}")).expect("send");
    }
    sim.deliver_all();
    let auth0 = sim.engines[0].epoch_authenticator(&g);
    for i in 0..3 {
        let view = sim.engines[i].group(&g).expect("member has the group");
        assert_eq!(view.epoch, 2, "member {i} epoch");
        assert_eq!(view.members.len(), 3, "member {i} member count");
        assert_eq!(
            sim.engines[i].epoch_authenticator(&g),
            auth0,
            "member {i} authenticator"
        );
        let mut texts = sim.texts(i, g);
        texts.sort();
        assert_eq!(
            texts,
            vec!["hello from 0", "hello from 1", "hello from 2"],
            "member {i} texts"
        );
    }
    g
}
