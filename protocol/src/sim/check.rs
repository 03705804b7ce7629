//! The properties a run must keep, checked after it settled ([`World::check`]).

use std::collections::{BTreeMap, BTreeSet};

use libp2p_identity::PeerId;

use super::World;
use super::joins::JoinEnd;
use crate::envelope::JoinRejection;
use crate::ids::MessageId;
use crate::records::EntryKind;

impl World {
    /// The properties; one line per violation.
    pub fn check(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let g = self.group;
        // The group as member 0 ends with it: who is in.
        let in_group: BTreeSet<PeerId> = self.slots[0]
            .core
            .as_ref()
            .and_then(|c| c.engine.group(&g))
            .map(|v| v.members.iter().map(|(_, p)| *p).collect())
            .unwrap_or_default();
        let joiners = self.cfg.members..self.cfg.members + self.cfg.joiners;
        for i in joiners.clone() {
            let active = self.slots[i]
                .core
                .as_ref()
                .and_then(|c| c.engine.group(&g))
                .is_some_and(|v| v.active);
            let listed = in_group.contains(&self.slots[i].peer);
            match self.ends.get(&i) {
                None => bad.push(format!("joiner {i} never finished joining")),
                Some(JoinEnd::Joined) if !(active && listed) => bad.push(format!(
                    "joiner {i} joined, but is {} and {} in member 0's group",
                    if active { "active" } else { "not active" },
                    if listed { "listed" } else { "not listed" },
                )),
                Some(JoinEnd::Refused(r) | JoinEnd::Lost(r)) if active || listed => bad.push(
                    format!("joiner {i} was refused ({r}) but is still a member"),
                ),
                _ => {}
            }
        }
        // Where the agreed history puts each text and since when each member is in: a
        // member must hold a text its sender sent it (in the sender's view then) and that
        // is placed at an epoch where it is a member. (A joiner whose first Add lost and
        // that was added again later need not hold what its sender wrote on the losing
        // branch and sent again on the winning one before the second Add.)
        let (placed_at, member_from) = self.agreed_history();
        let mut auth: BTreeMap<(u64, [u8; 8]), Vec<usize>> = BTreeMap::new();
        for i in (0..self.cfg.members).chain(joiners.clone()) {
            let member = i < self.cfg.members || in_group.contains(&self.slots[i].peer);
            let Some(core) = self.slots[i].core.as_ref() else {
                bad.push(format!("node {i} is down at the end"));
                continue;
            };
            if !member {
                continue;
            }
            match core.engine.group(&g) {
                Some(v) if v.active => auth.entry((v.epoch, v.authenticator)).or_default().push(i),
                _ => bad.push(format!("member {i} is no longer an active member")),
            }
            let texts = core.texts(&g);
            let mut missing = Vec::new();
            let peer = self.slots[i].peer;
            for s in &self.sent {
                if !s.members.contains(&peer) {
                    continue;
                }
                let since = member_from.get(&peer).copied().unwrap_or(0);
                if placed_at.get(&s.text).is_some_and(|e| *e < since) {
                    continue;
                }
                match texts.get(&s.text).copied().unwrap_or(0) {
                    0 => missing.push(s.text.clone()),
                    1 => {}
                    n => bad.push(format!("member {i} holds '{}' {n} times", s.text)),
                }
            }
            if !missing.is_empty() {
                let senders: BTreeSet<usize> = self
                    .sent
                    .iter()
                    .filter(|s| missing.contains(&s.text))
                    .map(|s| s.sender)
                    .collect();
                bad.push(format!(
                    "member {i} lacks {} of {} messages (from members {senders:?}; first: '{}'); undecryptable: {}, hold timeouts: {}, runs: {} ({} failed), missing positions: {}",
                    missing.len(),
                    self.sent.len(),
                    missing[0],
                    core.store.undecryptable.len(),
                    core.notes.hold_timeouts,
                    core.notes.runs,
                    core.notes.failed_runs,
                    core.engine.missing_messages(&g),
                ));
            }
            if self.cfg.joiners == 0 && (core.notes.deep_forks > 0 || core.notes.join_lost > 0) {
                // One committer and no joins: there is no race to lose.
                bad.push(format!("member {i} lost a deep fork or its join"));
            }
        }
        if auth.len() > 1 {
            bad.push(format!(
                "members end in different epochs or branches: {auth:?}"
            ));
        }
        // Nobody reads what was not sent to it: every text a node holds was sent while it
        // was a member in the sender's view, and somebody sent it. A member of the agreed
        // group may also read what its sender wrote on a branch that lost to the Add of
        // that member, sent again on the winning branch (PROTOCOL.md, "Concurrent commits").
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(core) = slot.core.as_ref() else {
                continue;
            };
            for t in core.texts(&g).keys() {
                match self.sent.iter().find(|s| s.text == *t) {
                    None => bad.push(format!("node {i} holds a text nobody sent: '{t}'")),
                    Some(s)
                        if !s.members.contains(&slot.peer) && !in_group.contains(&slot.peer) =>
                    {
                        bad.push(format!("node {i} reads '{t}', sent while it was no member"))
                    }
                    Some(_) => {}
                }
            }
            if i >= self.cfg.members + self.cfg.joiners && core.engine.group(&g).is_some() {
                bad.push(format!("stranger {i} holds the group"));
            }
        }
        bad.extend(self.check_invite(&in_group));
        // Every member places each text where its sender did (the canonical order is by
        // epoch, then send time): a text sent again on request goes back to its epoch.
        let mut placed: BTreeMap<MessageId, (u64, u64, usize)> = BTreeMap::new();
        for i in 0..self.cfg.members {
            let Some(core) = self.slots[i].core.as_ref() else {
                continue;
            };
            for h in core.store.history.values().filter(|h| h.group == g) {
                if h.kind.text().is_none() {
                    continue;
                }
                match placed.get(&h.id) {
                    Some((e, at, j)) if (*e, *at) != (h.epoch, h.sent_at_ms) => bad.push(format!(
                        "members {j} and {i} place a text at epochs {e} and {}",
                        h.epoch
                    )),
                    Some(_) => {}
                    None => {
                        placed.insert(h.id, (h.epoch, h.sent_at_ms, i));
                    }
                }
            }
        }
        bad
    }

    /// From the members' histories: the epoch each text is placed at, and the epoch from
    /// which each member is in the group (after the last commit that added it, in member
    /// 0's history; 0 for the creator).
    fn agreed_history(&self) -> (BTreeMap<String, u64>, BTreeMap<PeerId, u64>) {
        let g = self.group;
        let mut placed = BTreeMap::new();
        let mut from = BTreeMap::new();
        for (i, slot) in self.slots.iter().enumerate().take(self.cfg.members) {
            let Some(core) = slot.core.as_ref() else {
                continue;
            };
            for h in core.store.history.values().filter(|h| h.group == g) {
                match &h.kind {
                    EntryKind::Text(t) | EntryKind::Post { text: t, .. } => {
                        placed.entry(t.clone()).or_insert(h.epoch);
                    }
                    EntryKind::MembersAdded(peers) if i == 0 => {
                        for p in peers {
                            let e = from.entry(*p).or_insert(0);
                            *e = (*e).max(h.epoch + 1);
                        }
                    }
                    _ => {}
                }
            }
        }
        (placed, from)
    }

    /// The joiners' invite: its uses are never exceeded, and every member counts exactly the
    /// joins that stand (a use of an Add that lost a race is given back).
    fn check_invite(&self, in_group: &BTreeSet<PeerId>) -> Vec<String> {
        let mut bad = Vec::new();
        let Some(invite) = &self.invite else {
            return bad;
        };
        let joiners = self.cfg.members..self.cfg.members + self.cfg.joiners;
        let joined = joiners
            .clone()
            .filter(|&i| in_group.contains(&self.slots[i].peer))
            .count() as u32;
        if joined > self.cfg.invite_uses {
            bad.push(format!(
                "{joined} joined with an invite of {} uses",
                self.cfg.invite_uses
            ));
        }
        for i in (0..self.cfg.members).chain(joiners) {
            if i >= self.cfg.members && !in_group.contains(&self.slots[i].peer) {
                continue;
            }
            let Some(core) = self.slots[i].core.as_ref() else {
                continue;
            };
            match core.store.invites.get(&invite.id()) {
                Some(r) if r.uses > r.max_uses => bad.push(format!(
                    "member {i} counts {} uses of {}",
                    r.uses, r.max_uses
                )),
                Some(r) if r.uses != joined => bad.push(format!(
                    "member {i} counts {} uses of the invite, but {joined} joined with it",
                    r.uses
                )),
                Some(_) => {}
                None => bad.push(format!("member {i} does not know the joiners' invite")),
            }
        }
        // A joiner turned away for want of uses only when they were all used.
        for (i, end) in &self.ends {
            if matches!(end, JoinEnd::Refused(JoinRejection::UsedUp))
                && joined < self.cfg.invite_uses
            {
                bad.push(format!(
                    "joiner {i} was told the invite is used up, but only {joined} of {} uses stand",
                    self.cfg.invite_uses
                ));
            }
        }
        bad
    }
}
