//! Concurrent commits: a seeded simulation with shuffled, duplicated and dropped deliveries.
//!
//! `KITH_SIM_SEEDS` sets how many seeds run (default 24) and `KITH_SIM_SEED` the first one,
//! so a failing seed printed by the test can be replayed alone.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use openmls_rust_crypto::OpenMlsRustCrypto;

use super::*;
use crate::envelope::{JoinRequest, JoinResponse};
use crate::fork::REWIND_DEPTH;
use crate::testing::Sim;

/// xorshift64*: a tiny deterministic generator, enough to shuffle deliveries.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sim(n: usize) -> Sim<'static, OpenMlsRustCrypto> {
    Sim::new(
        (0..n).map(|_| OpenMlsRustCrypto::default()).collect(),
        "test-net",
        Box::new(|_, _, _| {}),
    )
}

/// A network where every (receiver, envelope) delivery is a separate item picked at random.
struct Net {
    queue: Vec<(usize, Vec<u8>)>,
    dropped: Vec<(usize, Vec<u8>)>,
}

impl Net {
    /// Moves the sim's publications into per-receiver deliveries.
    fn collect(&mut self, s: &mut Sim<'_, OpenMlsRustCrypto>) {
        while let Some((from, topic, data)) = s.in_flight.pop_front() {
            for j in 0..s.engines.len() {
                if j != from && s.subscribed[j].contains(&topic) {
                    self.queue.push((j, data.clone()));
                }
            }
        }
    }

    /// Delivers everything: random order, 10 % duplicated, 10 % dropped and redelivered
    /// later; members sometimes send a text in between.
    fn run(
        &mut self,
        s: &mut Sim<'_, OpenMlsRustCrypto>,
        rng: &mut Rng,
        g: GroupId,
        sent: &mut BTreeMap<String, usize>,
    ) {
        self.collect(s);
        loop {
            if self.queue.is_empty() {
                if self.dropped.is_empty() {
                    return;
                }
                self.queue.append(&mut self.dropped);
            }
            let (to, data) = self.queue.swap_remove(rng.below(self.queue.len()));
            if rng.chance(10) {
                self.dropped.push((to, data));
                continue;
            }
            if rng.chance(10) {
                self.queue.push((to, data.clone()));
            }
            s.now_ms += 1;
            let (_, fx) = s.engines[to].handle_envelope(&data, s.now_ms);
            s.apply(to, fx);
            if rng.chance(3) {
                let i = rng.below(s.engines.len());
                send(s, i, g, sent);
            }
            self.collect(s);
        }
    }
}

fn send(
    s: &mut Sim<'_, OpenMlsRustCrypto>,
    i: usize,
    g: GroupId,
    sent: &mut BTreeMap<String, usize>,
) {
    let text = format!("m{} from {i}", sent.len());
    if s.send(i, g, &text).is_ok() {
        sent.insert(text, i);
    }
}

/// One seeded run: `n` members, `rounds` rounds in which 2 or 3 members commit at once
/// (self-updates) while messages fly. Returns a description of the first divergence.
fn run_seed(seed: u64, n: usize, rounds: usize) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut s = sim(n);
    let g = s.create_group(0, "fork").unwrap();
    let inv = s.invite(0, g, n as u32).unwrap();
    for j in 1..n {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    let mut net = Net {
        queue: Vec::new(),
        dropped: Vec::new(),
    };
    let mut sent = BTreeMap::new();
    for _ in 0..rounds {
        for _ in 0..rng.below(3) {
            let i = rng.below(n);
            send(&mut s, i, g, &mut sent);
        }
        let committers = 2 + rng.below(2);
        let mut chosen = BTreeSet::new();
        while chosen.len() < committers.min(n) {
            chosen.insert(rng.below(n));
        }
        for &i in &chosen {
            s.self_update(i, g)
                .map_err(|e| format!("self-update: {e}"))?;
        }
        net.run(&mut s, &mut rng, g, &mut sent);
    }
    let auth0 = s.engines[0].epoch_authenticator(&g);
    let epoch0 = s.engines[0].group_epoch(&g);
    for i in 0..n {
        if s.engines[i].epoch_authenticator(&g) != auth0 {
            return Err(format!(
                "member {i} ended at epoch {:?} with another authenticator than member 0 (epoch {epoch0:?})",
                s.engines[i].group_epoch(&g)
            ));
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for h in s.history[i].iter().filter(|h| h.group == g) {
            if let Some(t) = h.kind.text() {
                *seen.entry(t.to_owned()).or_default() += 1;
            }
        }
        for text in sent.keys() {
            match seen.get(text) {
                Some(1) => {}
                Some(k) => return Err(format!("member {i} has {text:?} {k} times")),
                None => return Err(format!("member {i} never got {text:?}")),
            }
        }
        if seen.len() != sent.len() {
            return Err(format!("member {i} has texts nobody sent"));
        }
    }
    Ok(())
}

#[test]
fn concurrent_commits_converge_over_many_seeds() {
    let count = env_u64("KITH_SIM_SEEDS", 24);
    let first = env_u64("KITH_SIM_SEED", 1);
    let mut rollbacks = 0;
    for seed in first..first + count {
        let n = 3 + (seed % 4) as usize;
        if let Err(e) = run_seed(seed, n, 6) {
            panic!(
                "seed {seed} ({n} members): {e} (replay: KITH_SIM_SEED={seed} KITH_SIM_SEEDS=1)"
            );
        }
        rollbacks += 1;
    }
    assert_eq!(rollbacks, count);
}

/// Two members commit at once; whichever order the others see them in, all end on the
/// commit with the lower id, and the loser's message sent on its branch is read once.
#[test]
fn lower_commit_id_wins_in_any_order() {
    for order in [[0usize, 1], [1, 0]] {
        let mut s = sim(3);
        let g = crate::testing::three_member_run(&mut s);
        s.self_update(0, g).unwrap();
        s.self_update(1, g).unwrap();
        let commits: Vec<_> = s.in_flight.drain(..).collect();
        let ids: Vec<MessageId> = commits.iter().map(|c| MessageId::of(&c.2)).collect();
        let winner = if ids[0] < ids[1] { 0 } else { 1 };
        let loser = 1 - winner;
        // The loser talks on its own branch before it learns it lost.
        s.send(loser, g, "on the losing branch").unwrap();
        let loser_msg = s.in_flight.pop_back().unwrap();
        for &k in &order {
            s.in_flight.push_back(commits[k].clone());
        }
        s.in_flight.push_back(loser_msg);
        s.deliver_all();
        let auth = s.engines[winner].epoch_authenticator(&g);
        for i in 0..3 {
            assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
            let texts: Vec<_> = s
                .texts(i, g)
                .into_iter()
                .filter(|t| t == "on the losing branch")
                .collect();
            assert_eq!(texts.len(), 1, "member {i} reads the re-sent message once");
        }
        let view = s.engines[loser].group(&g).unwrap();
        assert_eq!(view.rollbacks, 1);
        // The loser proposed its update again: both updates are in, one epoch apart.
        assert_eq!(
            view.epoch, 4,
            "two more epochs: the winner's and the loser's update"
        );
    }
}

/// A member removed by a commit that loses is a member again; the removal is re-proposed
/// by its author and wins in the next epoch.
#[test]
fn a_lost_removal_is_proposed_again() {
    let mut s = sim(4);
    let g = s.create_group(0, "r").unwrap();
    let inv = s.invite(0, g, 3).unwrap();
    for j in 1..4 {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    let victim = s.peer(3);
    // Find a pair where the removal loses: try member 1's update against member 0's remove.
    s.remove(0, g, victim).unwrap();
    s.self_update(1, g).unwrap();
    let commits: Vec<_> = s.in_flight.drain(..).collect();
    let remove_id = MessageId::of(&commits[0].2);
    let update_id = MessageId::of(&commits[1].2);
    for c in commits {
        s.in_flight.push_back(c);
    }
    s.deliver_all();
    let auth = s.engines[0].epoch_authenticator(&g);
    for i in 0..3 {
        assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
        let members = s.engines[i].group(&g).unwrap().members;
        assert!(
            !members.iter().any(|(_, p)| *p == victim),
            "member {i} still lists the removed member (remove {} vs update {})",
            remove_id.short(),
            update_id.short()
        );
        assert_eq!(members.len(), 3);
    }
    assert!(!s.engines[3].group(&g).unwrap().active);
}

/// Delivers what is in flight from members of `side` to the other members of `side` only;
/// returns what was published, for delivery to the other side later.
fn deliver_within(s: &mut Sim<'_, OpenMlsRustCrypto>, side: &[usize]) -> Vec<(usize, Vec<u8>)> {
    let mut published = Vec::new();
    while let Some((from, _, data)) = s.in_flight.pop_front() {
        published.push((from, data.clone()));
        for &j in side.iter().filter(|j| **j != from) {
            s.now_ms += 1;
            let (_, fx) = s.engines[j].handle_envelope(&data, s.now_ms);
            s.apply(j, fx);
        }
    }
    published
}

/// Both halves of a partition commit more often than the rewind depth. After healing, the
/// members of the losing half see they cannot roll back, ask a member of the winning half
/// to add them again, and everyone ends on one branch with all four members.
#[test]
fn a_fork_deeper_than_the_rewind_depth_heals_by_rejoining() {
    let mut s = sim(4);
    let g = s.create_group(0, "deep").unwrap();
    let inv = s.invite(0, g, 3).unwrap();
    for j in 1..4 {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    let (left, right) = ([0usize, 1], [2usize, 3]);
    let mut from_left = Vec::new();
    let mut from_right = Vec::new();
    for round in 0..REWIND_DEPTH + 2 {
        s.self_update(left[round % 2], g).unwrap();
        from_left.extend(deliver_within(&mut s, &left));
        s.self_update(right[round % 2], g).unwrap();
        from_right.extend(deliver_within(&mut s, &right));
    }
    assert_ne!(
        s.engines[0].epoch_authenticator(&g),
        s.engines[2].epoch_authenticator(&g)
    );
    // Heal: each side receives everything the other published.
    let mut lost = Vec::new();
    for (side, msgs) in [(right, &from_left), (left, &from_right)] {
        for (_, data) in msgs {
            for &j in &side {
                s.now_ms += 1;
                let (_, fx) = s.engines[j].handle_envelope(data, s.now_ms);
                for e in &fx {
                    if let Effect::DeepForkLost { epoch, commit, .. } = e {
                        lost.push((j, *epoch, *commit));
                    }
                }
                s.apply(j, fx);
            }
        }
    }
    assert_eq!(
        lost.len(),
        2,
        "both members of the losing half notice: {lost:?}"
    );
    let losers: Vec<usize> = lost.iter().map(|l| l.0).collect();
    let winner = (0..4).find(|i| !losers.contains(i)).unwrap();
    for (j, epoch, commit) in lost {
        assert!(s.engines[j].group(&g).unwrap().deep_forks > 0);
        let req = s.engines[j].prepare_rejoin(g, epoch, commit).unwrap();
        let JoinRequest::Rejoin(req) = req else {
            unreachable!("prepare_rejoin makes Rejoin requests")
        };
        // A member of the losing half is on the wrong branch and says so.
        let other_loser = losers.iter().copied().find(|x| *x != j).unwrap();
        let me = s.peer(j);
        let (resp, _) = s.engines[other_loser]
            .handle_rejoin_request(me, req.clone(), s.now_ms)
            .unwrap();
        assert!(
            matches!(resp, JoinResponse::Rejected(_)),
            "a losing-side member must not re-add: {resp:?}"
        );
        let (resp, fx) = s.engines[winner]
            .handle_rejoin_request(me, req, s.now_ms)
            .unwrap();
        s.apply(winner, fx);
        let by = s.peer(winner);
        let (_, fx) = s.engines[j]
            .handle_rejoin_response(g, by, resp, s.now_ms)
            .unwrap();
        s.apply(j, fx);
        s.deliver_all();
    }
    let auth = s.engines[winner].epoch_authenticator(&g);
    for i in 0..4 {
        let view = s.engines[i].group(&g).unwrap();
        assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
        assert_eq!(view.members.len(), 4, "member {i}");
        assert!(view.active, "member {i}");
    }
    // Everyone talks again.
    s.send(losers[0], g, "back").unwrap();
    s.deliver_all();
    for i in 0..4 {
        assert!(s.texts(i, g).contains(&"back".to_owned()), "member {i}");
    }
}

/// Delivers everything in flight to every other member, in publication order, including
/// members that were removed and unsubscribed: they model a removed node that keeps
/// listening on the topic.
fn deliver_to_everyone(s: &mut Sim<'_, OpenMlsRustCrypto>) {
    while let Some((from, _, data)) = s.in_flight.pop_front() {
        for j in 0..s.engines.len() {
            if j != from {
                s.now_ms += 1;
                let (_, fx) = s.engines[j].handle_envelope(&data, s.now_ms);
                s.apply(j, fx);
            }
        }
    }
}

/// A removal loses to a concurrent commit. Messages that its author, and another member
/// that had merged it, wrote after the removal are re-sent on the winning branch, where the
/// removed member is a member again until the removal is re-proposed: they must wait for
/// that, or the removed member (still listening) reads what was written without it.
#[test]
fn messages_written_after_a_lost_removal_never_reach_the_removed_member() {
    let mut lost_removals = 0;
    for attempt in 0..40 {
        let mut s = sim(4);
        let g = s.create_group(0, "secrets").unwrap();
        let inv = s.invite(0, g, 3).unwrap();
        for j in 1..4 {
            s.join(j, 0, &inv).unwrap();
            s.deliver_all();
        }
        let victim = s.peer(3);
        s.remove(0, g, victim).unwrap();
        s.self_update(1, g).unwrap();
        let removal = s.in_flight.pop_front().unwrap();
        let update = s.in_flight.pop_front().unwrap();
        if MessageId::of(&removal.2) < MessageId::of(&update.2) {
            continue; // The removal wins: nothing is rolled back. Try other keys.
        }
        lost_removals += 1;
        // Member 2 and the victim merge the removal first; 0 and 2 write without the victim.
        for j in [2, 3] {
            let (_, fx) = s.engines[j].handle_envelope(&removal.2, s.now_ms);
            s.apply(j, fx);
        }
        assert!(!s.engines[3].group(&g).unwrap().active);
        s.send(0, g, "secret from 0").unwrap();
        s.send(2, g, "secret from 2").unwrap();
        let sent: Vec<_> = s.in_flight.drain(..).collect();
        s.in_flight.push_back(update);
        s.in_flight.push_back(removal);
        s.in_flight.extend(sent);
        deliver_to_everyone(&mut s);

        let auth = s.engines[0].epoch_authenticator(&g);
        for i in 0..3 {
            let view = s.engines[i].group(&g).unwrap();
            assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
            assert!(
                !view.members.iter().any(|(_, p)| *p == victim),
                "member {i}"
            );
            let mut texts = s.texts(i, g);
            texts.sort();
            assert_eq!(texts, ["secret from 0", "secret from 2"], "member {i}");
        }
        assert!(
            s.texts(3, g).is_empty(),
            "attempt {attempt}: the removed member read {:?}",
            s.texts(3, g)
        );
        if lost_removals == 3 {
            return;
        }
    }
    panic!("the removal lost only {lost_removals} times in 40 attempts");
}

/// A member's sync summary that names another commit for an epoch this node holds shows a
/// fork; the same commit does not.
#[test]
fn a_summary_from_another_branch_is_a_detected_fork() {
    let mut s = sim(3);
    let g = crate::testing::three_member_run(&mut s);
    s.self_update(0, g).unwrap();
    s.self_update(1, g).unwrap();
    let commits: Vec<_> = s.in_flight.drain(..).collect();
    let (ours, theirs) = (MessageId::of(&commits[0].2), MessageId::of(&commits[1].2));
    assert_eq!(s.engines[0].detect_fork(&g, [(2, ours)]), None);
    assert_eq!(s.engines[0].detect_fork(&g, [(2, theirs)]), Some(2));
    assert_eq!(s.engines[0].group(&g).unwrap().forks_detected, 1);
    // An epoch this node has no commit for says nothing.
    assert_eq!(s.engines[0].detect_fork(&g, [(40, theirs)]), None);
}
