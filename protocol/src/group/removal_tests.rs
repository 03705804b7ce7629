//! A member removed by a commit still reads the application messages of its last epoch
//! that reach it after that commit, for a grace period (see `group::removal`).

#![allow(clippy::unwrap_used)]

use std::sync::PoisonError;

use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

use super::tests::group_of;
use super::*;
use crate::records::EntryKind;
use crate::testing::{Sim, member_key};

const NET: &str = "test-net";

/// How often each text is in member `i`'s history of `g`.
fn text_count(s: &Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId, text: &str) -> usize {
    s.texts(i, g).iter().filter(|t| *t == text).count()
}

/// Whether member `i`'s history of `g` records its own removal.
fn saw_own_removal(s: &Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId) -> bool {
    let me = s.peer(i);
    s.history[i]
        .iter()
        .any(|h| h.group == g && matches!(&h.kind, EntryKind::MembersRemoved(v) if v.contains(&me)))
}

/// Delivers `data` to member `to` alone.
fn deliver_to(s: &mut Sim<'_, OpenMlsRustCrypto>, to: usize, data: &[u8]) -> Verdict {
    s.now_ms += 1;
    let (v, fx) = s.engines[to].handle_envelope(data, s.now_ms);
    s.verdicts.push((to, v.clone()));
    s.apply(to, fx);
    v
}

/// Member `i`'s tick once the removal grace has passed.
fn after_grace(s: &mut Sim<'_, OpenMlsRustCrypto>, i: usize) {
    s.now_ms += REMOVAL_GRACE_MS;
    s.tick(i);
}

/// Asserts member `i` is out of `g`: not active, not subscribed, its removal recorded once.
fn assert_removed(s: &mut Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId) {
    let v = s.engines[i].group(&g).unwrap();
    assert!(!v.active, "member {i} is not a member any more");
    assert!(!v.leaving, "member {i}");
    assert!(
        !s.subscribed[i].contains(&g.topic(NET)),
        "member {i} left the topic"
    );
    assert!(saw_own_removal(s, i, g), "member {i} recorded its removal");
    assert!(matches!(
        s.engines[i].send_text(g, "still here?", s.now_ms),
        Err(GroupError::Inactive(_))
    ));
}

/// Restarts member `i` from what its storage holds now (as the node does after a crash:
/// load the groups, hold live messages until a catch-up).
fn restart(s: &mut Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId) {
    let meta = s.engines[i].group(&g).unwrap().meta;
    let values = s.engines[i]
        .provider()
        .storage()
        .values
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let provider = OpenMlsRustCrypto::default();
    *provider
        .storage()
        .values
        .write()
        .unwrap_or_else(PoisonError::into_inner) = values;
    let mut engine = GroupEngine::new(provider, Identity::new(&member_key(i as u8)).unwrap(), NET);
    let (fx, missing) = engine.load(vec![meta]).unwrap();
    assert!(missing.is_empty());
    engine.begin_catch_up_all(s.now_ms);
    s.engines[i] = engine;
    s.subscribed[i].clear();
    s.apply(i, fx);
}

/// The commit removing member 2 reaches it before a message member 1 wrote in the same
/// epoch (before it saw the commit): member 2 still reads that message, once, and is
/// removed when the grace ends.
#[test]
fn a_removed_member_reads_its_last_epochs_message_that_comes_after_the_commit() {
    let (mut s, g) = group_of(3);
    let epoch = s.engines[0].group(&g).unwrap().epoch;
    s.remove(0, g, s.peer(2)).unwrap();
    s.send(1, g, "before the removal").unwrap();
    let flight: Vec<Vec<u8>> = s.in_flight.drain(..).map(|(_, _, d)| d).collect();
    let [commit, late] = flight.as_slice() else {
        panic!("{} envelopes in flight", flight.len());
    };
    // Member 1 merges the commit (it sent its message before); member 0 reads the message
    // from the epoch it just left.
    assert_eq!(deliver_to(&mut s, 1, commit), Verdict::Accept);
    assert_eq!(deliver_to(&mut s, 0, late), Verdict::Accept);
    // Member 2: the commit first, then the message.
    assert_eq!(deliver_to(&mut s, 2, commit), Verdict::Accept);
    let held = s.engines[2].group(&g).unwrap();
    assert!(!held.active, "a removed member sends nothing more");
    assert_eq!(held.epoch, epoch, "the commit is not merged yet");
    assert!(s.engines[2].removal_held(&g));
    assert!(s.subscribed[2].contains(&g.topic(NET)), "still listening");
    assert!(matches!(
        s.engines[2].send_text(g, "one more", s.now_ms),
        Err(GroupError::Inactive(_))
    ));
    // A copy of the commit changes nothing.
    assert_eq!(
        deliver_to(&mut s, 2, commit),
        Verdict::Ignore(IgnoreReason::RemovalHeld)
    );
    assert_eq!(deliver_to(&mut s, 2, late), Verdict::Accept);
    assert_eq!(text_count(&s, 2, g, "before the removal"), 1);
    // A copy of the message is not read twice.
    assert!(matches!(deliver_to(&mut s, 2, late), Verdict::Ignore(_)));
    assert_eq!(text_count(&s, 2, g, "before the removal"), 1);
    // The grace is not over yet: a tick changes nothing.
    s.tick(2);
    assert!(s.engines[2].removal_held(&g));
    assert!(!saw_own_removal(&s, 2, g));
    // The others talk in the next epoch: held, never read.
    s.send(0, g, "without 2").unwrap();
    let next = s.in_flight.pop_front().unwrap().2;
    assert!(matches!(
        deliver_to(&mut s, 2, &next),
        Verdict::Ignore(IgnoreReason::FutureEpoch { .. })
    ));
    deliver_to(&mut s, 1, &next);
    after_grace(&mut s, 2);
    assert_removed(&mut s, 2, g);
    assert!(!s.engines[2].removal_held(&g));
    assert_eq!(s.engines[2].group(&g).unwrap().epoch, epoch + 1);
    assert_eq!(s.texts(2, g), vec!["before the removal"]);
    assert_eq!(s.texts(1, g), vec!["before the removal", "without 2"]);
    // Its removal comes after what it read of its last epoch.
    let last = s.history[2].iter().rev().find(|h| h.group == g).unwrap();
    assert!(matches!(&last.kind, EntryKind::MembersRemoved(_)));
    // Gossip copies after the merge are refused as from a removed member.
    assert_eq!(
        deliver_to(&mut s, 2, commit),
        Verdict::Ignore(IgnoreReason::AlreadyMerged)
    );
}

/// A member leaving: the commit of its own removal is held too, and what the others wrote
/// before it still reaches the leaver.
#[test]
fn a_leaving_member_reads_what_was_said_before_its_removal() {
    let (mut s, g) = group_of(3);
    s.leave(2, g).unwrap();
    let proposal = s.in_flight.pop_front().unwrap().2;
    // Member 1 writes before the proposal reaches it (MLS sends nothing while a proposal
    // is pending).
    s.send(1, g, "bye 2").unwrap();
    let bye = s.in_flight.pop_front().unwrap().2;
    deliver_to(&mut s, 1, &proposal);
    // Member 0 commits the removal when the proposal reaches it.
    deliver_to(&mut s, 0, &proposal);
    let commit = s.in_flight.pop_front().unwrap().2;
    assert_eq!(deliver_to(&mut s, 2, &commit), Verdict::Accept);
    assert!(s.engines[2].group(&g).unwrap().leaving);
    assert_eq!(deliver_to(&mut s, 2, &bye), Verdict::Accept);
    after_grace(&mut s, 2);
    assert_removed(&mut s, 2, g);
    assert_eq!(s.texts(2, g), vec!["bye 2"]);
}

/// A restart while the removal is held: the held commit survives in storage, what was read
/// stays read once, messages of the epoch still arrive during a fresh grace, and the member
/// ends removed.
#[test]
fn a_restart_during_the_grace_keeps_the_removal_and_what_was_read() {
    let (mut s, g) = group_of(3);
    s.remove(0, g, s.peer(2)).unwrap();
    s.send(1, g, "first").unwrap();
    s.send(1, g, "second").unwrap();
    let flight: Vec<Vec<u8>> = s.in_flight.drain(..).map(|(_, _, d)| d).collect();
    let [commit, first, second] = flight.as_slice() else {
        panic!("{} envelopes in flight", flight.len());
    };
    assert_eq!(deliver_to(&mut s, 2, commit), Verdict::Accept);
    assert_eq!(deliver_to(&mut s, 2, first), Verdict::Accept);
    restart(&mut s, 2, g);
    assert!(s.engines[2].removal_held(&g), "the held commit was stored");
    assert!(!s.engines[2].group(&g).unwrap().active);
    assert!(s.subscribed[2].contains(&g.topic(NET)), "listening again");
    // Live messages wait for a catch-up that cannot happen (the members no longer serve
    // this node); the end of the grace reads them before the commit is merged.
    assert!(matches!(
        deliver_to(&mut s, 2, second),
        Verdict::Ignore(IgnoreReason::CatchingUp)
    ));
    deliver_to(&mut s, 2, first);
    // The first tick after a restart starts the grace again.
    s.tick(2);
    assert!(s.engines[2].removal_held(&g));
    after_grace(&mut s, 2);
    assert_removed(&mut s, 2, g);
    assert_eq!(text_count(&s, 2, g, "first"), 1);
    assert_eq!(text_count(&s, 2, g, "second"), 1);
    // A restart after the merge leaves it removed.
    restart(&mut s, 2, g);
    assert!(!s.engines[2].removal_held(&g));
    assert!(!s.engines[2].group(&g).unwrap().active);
    assert!(s.subscribed[2].is_empty());
}

/// The held commit competes with another commit of the same epoch (lowest id wins, see
/// `fork`): when the other one wins, the member is not removed after all (until the removal
/// is proposed again and wins), and a message of the epoch read during the grace counts
/// once; when the held one wins, the other is a losing commit and the member is removed.
#[test]
fn a_held_removal_can_lose_to_a_concurrent_commit() {
    let (mut lost, mut won) = (0, 0);
    for _ in 0..40 {
        let (mut s, g) = group_of(4);
        let epoch = s.engines[0].group(&g).unwrap().epoch;
        s.remove(0, g, s.peer(3)).unwrap();
        s.self_update(1, g).unwrap();
        s.send(2, g, "said before both").unwrap();
        let flight: Vec<(usize, TopicId, Vec<u8>)> = s.in_flight.drain(..).collect();
        let [removal, update, said] = flight.as_slice() else {
            panic!("{} envelopes in flight", flight.len());
        };
        let removal_wins = MessageId::of(&removal.2) < MessageId::of(&update.2);
        if (removal_wins && won == 2) || (!removal_wins && lost == 2) {
            continue;
        }
        assert_eq!(deliver_to(&mut s, 3, &removal.2), Verdict::Accept);
        assert!(s.engines[3].removal_held(&g));
        assert_eq!(deliver_to(&mut s, 3, &said.2), Verdict::Accept);
        let v = deliver_to(&mut s, 3, &update.2);
        if removal_wins {
            won += 1;
            assert!(
                matches!(v, Verdict::Ignore(IgnoreReason::LosingCommit { .. })),
                "{v:?}"
            );
            assert!(s.engines[3].removal_held(&g));
            after_grace(&mut s, 3);
            assert_removed(&mut s, 3, g);
        } else {
            lost += 1;
            assert_eq!(v, Verdict::Accept);
            let view = s.engines[3].group(&g).unwrap();
            assert!(!s.engines[3].removal_held(&g));
            assert!(view.active, "the update won: still a member");
            assert_eq!(view.epoch, epoch + 1);
            // The grace ending changes nothing now.
            after_grace(&mut s, 3);
            assert!(s.engines[3].group(&g).unwrap().active);
            assert!(!saw_own_removal(&s, 3, g));
            // The others settle on the update; member 0 proposes the removal again, and
            // this time it stands.
            s.in_flight.push_back(removal.clone());
            s.in_flight.push_back(update.clone());
            s.in_flight.push_back(said.clone());
            s.deliver_all();
            after_grace(&mut s, 3);
            assert_removed(&mut s, 3, g);
            let auth = s.engines[0].epoch_authenticator(&g);
            for i in 0..3 {
                let view = s.engines[i].group(&g).unwrap();
                assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
                assert_eq!(view.members.len(), 3, "member {i}");
                assert_eq!(text_count(&s, i, g, "said before both"), 1, "member {i}");
            }
        }
        assert_eq!(text_count(&s, 3, g, "said before both"), 1);
        if won == 2 && lost == 2 {
            return;
        }
    }
    panic!("in 40 tries the removal won {won} times and lost {lost} times");
}

/// A removal merged after its grace can still lose to a concurrent commit that arrives
/// later: the member is a member again on the winning branch, listens to the group again,
/// and is removed once the removal is proposed again and wins.
#[test]
fn a_member_removed_on_a_losing_branch_listens_again() {
    for _ in 0..40 {
        let (mut s, g) = group_of(4);
        s.remove(0, g, s.peer(3)).unwrap();
        s.self_update(1, g).unwrap();
        let flight: Vec<(usize, TopicId, Vec<u8>)> = s.in_flight.drain(..).collect();
        let [removal, update] = flight.as_slice() else {
            panic!("{} envelopes in flight", flight.len());
        };
        if MessageId::of(&removal.2) < MessageId::of(&update.2) {
            continue; // The removal wins: try other keys.
        }
        assert_eq!(deliver_to(&mut s, 3, &removal.2), Verdict::Accept);
        after_grace(&mut s, 3);
        assert_removed(&mut s, 3, g);
        assert_eq!(deliver_to(&mut s, 3, &update.2), Verdict::Accept);
        assert!(s.engines[3].group(&g).unwrap().active, "a member again");
        assert!(s.subscribed[3].contains(&g.topic(NET)), "listening again");
        s.in_flight.push_back(removal.clone());
        s.in_flight.push_back(update.clone());
        s.deliver_all();
        after_grace(&mut s, 3);
        let v = s.engines[3].group(&g).unwrap();
        assert!(!v.active && !s.subscribed[3].contains(&g.topic(NET)));
        for i in 0..3 {
            assert_eq!(
                s.engines[i].group(&g).unwrap().members.len(),
                3,
                "member {i}"
            );
        }
        return;
    }
    panic!("the removal never lost in 40 tries");
}
