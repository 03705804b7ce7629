//! No message lost: a receiver that gets a sender's later messages before earlier ones holds
//! them, asks for the gap, and ends with every message (see `crate::order`).

#![allow(clippy::unwrap_used)]

use openmls_rust_crypto::OpenMlsRustCrypto;

use super::*;
use crate::envelope::{Envelope, PayloadKind};
use crate::order::OUT_OF_ORDER_TOLERANCE;
use crate::testing::Sim;

fn sim(n: usize) -> Sim<'static, OpenMlsRustCrypto> {
    Sim::new(
        (0..n).map(|_| OpenMlsRustCrypto::default()).collect(),
        "test-net",
        Box::new(|_, _, _| {}),
    )
}

/// A group of `n` members, everyone joined and caught up.
fn group(s: &mut Sim<'static, OpenMlsRustCrypto>, n: usize) -> GroupId {
    let g = s.create_group(0, "order").unwrap();
    let inv = s.invite(0, g, 10).unwrap();
    s.deliver_all();
    for j in 1..n {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    g
}

/// Drops what is in flight (a gossip loss for everyone; the senders keep their envelopes).
fn drop_in_flight(s: &mut Sim<'static, OpenMlsRustCrypto>) {
    s.in_flight.clear();
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn later_messages_first_are_held_and_the_gap_is_fetched() {
    for (missed, later) in [(80usize, 300usize), (80, 5000), (10, 2000)] {
        let mut s = sim(2);
        let g = group(&mut s, 2);
        s.send(0, g, "first").unwrap();
        s.deliver_all();
        for k in 0..missed {
            s.send(0, g, &format!("missed {k}")).unwrap();
        }
        drop_in_flight(&mut s);
        for k in 0..later {
            s.send(0, g, &format!("later {k}")).unwrap();
        }
        s.deliver_all();
        if missed >= crate::order::GUARD_DISTANCE as usize {
            assert!(
                !s.behind[1].is_empty(),
                "a gap of {missed} must make the receiver hold and ask"
            );
        }
        // The node answers `Behind` with a history sync.
        s.sync_from(1, 0, g);
        s.deliver_all();
        assert!(
            s.undecryptable[1].is_empty(),
            "missed {missed}, later {later}: {:?}",
            &s.undecryptable[1][..s.undecryptable[1].len().min(3)]
        );
        assert_eq!(
            sorted(s.texts(1, g)),
            sorted(s.texts(0, g)),
            "missed {missed}, later {later}"
        );
        assert_eq!(s.texts(1, g).len(), 1 + missed + later);
        assert_eq!(s.engines[1].missing_messages(&g), 0);
    }
}

#[test]
fn many_senders_with_gaps_all_come_back() {
    let mut s = sim(4);
    let g = group(&mut s, 4);
    for i in 0..3 {
        s.send(i, g, &format!("hello {i}")).unwrap();
    }
    s.deliver_all();
    // Member 3 misses 70 messages of each other member (a partition, say)...
    for k in 0..70 {
        for i in 0..3 {
            s.send(i, g, &format!("missed {i}-{k}")).unwrap();
        }
    }
    let missed: Vec<_> = s.in_flight.drain(..).collect();
    // ...which members 0 to 2 did get.
    for (from, topic, data) in missed {
        for j in 0..3 {
            if j != from {
                let (v, fx) = s.engines[j].handle_envelope(&data, s.now_ms);
                assert_eq!(v, Verdict::Accept);
                s.apply(j, fx);
            }
        }
        let _ = topic;
    }
    for k in 0..200 {
        for i in 0..3 {
            s.send(i, g, &format!("later {i}-{k}")).unwrap();
        }
    }
    s.deliver_all();
    assert!(!s.behind[3].is_empty());
    s.sync_from(3, 1, g);
    s.deliver_all();
    assert!(s.undecryptable[3].is_empty(), "{:?}", s.undecryptable[3]);
    assert_eq!(s.texts(3, g).len(), 3 + 3 * 70 + 3 * 200);
    assert_eq!(sorted(s.texts(3, g)), sorted(s.texts(0, g)));
}

#[test]
fn a_restarted_member_holds_live_messages_until_it_has_caught_up() {
    let mut s = sim(2);
    let g = group(&mut s, 2);
    // Member 1 is down: it gets nothing of the first 100 messages.
    for k in 0..100 {
        s.send(0, g, &format!("while down {k}")).unwrap();
    }
    drop_in_flight(&mut s);
    // It comes back (the node holds every group at start) and gets live traffic first.
    s.engines[1].begin_catch_up_all(s.now_ms);
    for k in 0..50 {
        s.send(0, g, &format!("after restart {k}")).unwrap();
    }
    s.deliver_all();
    assert_eq!(
        s.texts(1, g).len(),
        0,
        "live messages wait for the catch-up"
    );
    s.sync_from(1, 0, g);
    assert!(s.undecryptable[1].is_empty(), "{:?}", s.undecryptable[1]);
    assert_eq!(s.texts(1, g).len(), 150);
}

#[test]
fn without_the_hold_the_loss_is_reported_not_silent() {
    // The failure the hold prevents: a member that reads a sender's newest message first
    // (here: one it had never seen before, so no gap is known) cannot read what is more
    // than the MLS window older. It must say so.
    let mut s = sim(2);
    let g = group(&mut s, 2);
    for k in 0..100 {
        s.send(0, g, &format!("old {k}")).unwrap();
    }
    drop_in_flight(&mut s);
    s.send(0, g, "newest").unwrap();
    s.deliver_all();
    assert_eq!(s.texts(1, g), vec!["newest"]);
    s.sync_from(1, 0, g);
    let too_old = s.undecryptable[1]
        .iter()
        .filter(|(_, r)| *r == Undecryptable::TooOld)
        .count();
    // Reading generation 100 moved the ratchet head to 101; MLS keeps the keys of the 64
    // generations below the head (37..=100), so 0..=36 are gone.
    let lost = 101 - OUT_OF_ORDER_TOLERANCE as usize;
    assert_eq!(too_old, lost);
    assert_eq!(
        s.texts(1, g).len(),
        101 - lost,
        "what is still in the window is read"
    );
}

#[test]
fn messages_of_epochs_left_long_ago_come_back_in_epoch_order() {
    // Member 2 is away while the group goes through more epochs than MLS keeps secrets
    // for; a sync that hands over each epoch's messages before the commit leaving it loses
    // nothing.
    let mut s = sim(3);
    let g = group(&mut s, 3);
    s.send(0, g, "before").unwrap();
    s.deliver_all();
    let mut away = Vec::new();
    for round in 0..(MAX_PAST_EPOCHS + 3) {
        for i in 0..2 {
            s.send(i, g, &format!("round {round} from {i}")).unwrap();
        }
        s.self_update(round % 2, g).unwrap();
        // Members 0 and 1 get everything; member 2 nothing.
        let batch: Vec<_> = s.in_flight.drain(..).collect();
        for (from, _, data) in batch {
            for j in 0..2 {
                if j != from {
                    let (v, fx) = s.engines[j].handle_envelope(&data, s.now_ms);
                    assert_eq!(v, Verdict::Accept, "member {j}");
                    s.apply(j, fx);
                }
            }
            away.push(data);
        }
    }
    s.sync_from(2, 0, g);
    assert!(s.undecryptable[2].is_empty(), "{:?}", s.undecryptable[2]);
    assert_eq!(sorted(s.texts(2, g)), sorted(s.texts(0, g)));
    assert_eq!(
        s.engines[2].group(&g).unwrap().epoch,
        s.engines[0].group(&g).unwrap().epoch
    );
}

#[test]
fn a_late_message_among_held_ones_is_not_overtaken_when_the_hold_ends() {
    // Member 1 catches up (say, after a restart) while gossip delivers a message of
    // member 0 after 69 newer ones. Ending the catch-up must not read the newer ones past
    // the window: the drain stops at the guard, asks for a sync, and the sync (which has
    // the late one) brings everything in order.
    let mut s = sim(2);
    let g = group(&mut s, 2);
    s.send(0, g, "first").unwrap();
    s.deliver_all();
    s.engines[1].begin_catch_up_all(s.now_ms);
    for k in 1..=70 {
        s.send(0, g, &format!("m{k}")).unwrap();
    }
    let late = s.in_flight.pop_front().unwrap();
    s.in_flight.push_back(late);
    s.deliver_all();
    assert_eq!(s.texts(1, g).len(), 1, "all held");
    let behind_before = s.behind[1].len();
    let fx = s.engines[1].end_catch_up(&g, s.now_ms);
    s.apply(1, fx);
    assert!(
        s.engines[1].is_catching_up(&g),
        "the drain stopped at the gap"
    );
    assert!(s.behind[1].len() > behind_before, "and asked for a sync");
    assert!(s.undecryptable[1].is_empty());
    s.sync_from(1, 0, g);
    assert!(s.undecryptable[1].is_empty(), "{:?}", s.undecryptable[1]);
    assert_eq!(s.texts(1, g).len(), 71);
    assert!(!s.engines[1].is_catching_up(&g));
}

#[test]
fn a_hold_that_ran_out_of_time_reads_everything_it_holds() {
    let mut s = sim(2);
    let g = group(&mut s, 2);
    s.send(0, g, "first").unwrap();
    s.deliver_all();
    s.engines[1].begin_catch_up_all(s.now_ms);
    for k in 1..=10 {
        s.send(0, g, &format!("m{k}")).unwrap();
    }
    s.deliver_all();
    let fx = s.engines[1].end_catch_up_now(&g, s.now_ms);
    s.apply(1, fx);
    assert!(!s.engines[1].is_catching_up(&g));
    assert_eq!(s.texts(1, g).len(), 11);
}

/// The envelopes member `from` stores for `group` that member `i` lacks, by epoch and
/// commits last (what a sync run hands over), in the responder's order within each part.
fn missing_for(
    s: &Sim<'static, OpenMlsRustCrypto>,
    i: usize,
    from: usize,
    g: GroupId,
) -> Vec<StoredEnvelope> {
    let held: std::collections::HashSet<MessageId> = s.stored[i].iter().map(|e| e.id).collect();
    let mut missing: Vec<StoredEnvelope> = s.stored[from]
        .iter()
        .filter(|e| e.group == g && !held.contains(&e.id))
        .cloned()
        .collect();
    missing.sort_by_key(|e| (e.epoch, e.kind == PayloadKind::Commit));
    missing
}

fn read_batch(s: &mut Sim<'static, OpenMlsRustCrypto>, i: usize, g: GroupId, batch: Vec<Vec<u8>>) {
    let (_, fx) = s.engines[i].handle_synced_batch(batch, s.now_ms);
    s.apply(i, fx);
    let fx = s.engines[i].end_catch_up(&g, s.now_ms);
    s.apply(i, fx);
}

#[test]
fn a_sync_batch_of_two_range_answers_is_read_in_each_senders_order() {
    // An epoch this node holds many messages of is fetched with several range requests,
    // each a slice of the id space: each answer is in history order, but the second one's
    // messages are older than the first one's last. Read as they came, every message more
    // than the MLS window behind one already read would be lost (the 200-kill crash loop
    // lost thousands this way).
    for senders in [1usize, 3] {
        let mut s = sim(senders + 1);
        let g = group(&mut s, senders + 1);
        let away = senders; // the last member misses everything below
        s.send(0, g, "first").unwrap();
        s.deliver_all();
        s.engines[away].begin_catch_up_all(s.now_ms);
        for k in 0..300 {
            let from = k % senders;
            s.send(from, g, &format!("m{k} from {from}")).unwrap();
            // Everyone else reads it; the away member does not.
            let batch: Vec<_> = s.in_flight.drain(..).collect();
            for (pub_from, _, data) in batch {
                for j in 0..senders {
                    if j != pub_from {
                        let (v, fx) = s.engines[j].handle_envelope(&data, s.now_ms);
                        assert_eq!(v, Verdict::Accept);
                        s.apply(j, fx);
                    }
                }
            }
        }
        let missing = missing_for(&s, away, 0, g);
        let last_epoch = missing.iter().map(|e| e.epoch).max().unwrap();
        let (earlier, missing): (Vec<_>, Vec<_>) =
            missing.into_iter().partition(|e| e.epoch < last_epoch);
        let (low, high): (Vec<_>, Vec<_>) =
            missing.into_iter().partition(|e| e.id.as_bytes()[0] < 0x80);
        let batch: Vec<Vec<u8>> = earlier
            .into_iter()
            .chain(low)
            .chain(high)
            .map(|e| e.bytes)
            .collect();
        assert!(batch.len() >= 300);
        read_batch(&mut s, away, g, batch);
        assert!(
            s.undecryptable[away].is_empty(),
            "{senders} senders: {} lost",
            s.undecryptable[away].len()
        );
        assert_eq!(sorted(s.texts(away, g)), sorted(s.texts(0, g)));
    }
}

#[test]
fn a_shuffled_sync_batch_loses_nothing() {
    let seed: u64 = std::env::var("KITH_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let mut s = sim(2);
    let g = group(&mut s, 2);
    s.send(0, g, "first").unwrap();
    s.deliver_all();
    for k in 0..500 {
        s.send(0, g, &format!("m{k}")).unwrap();
    }
    drop_in_flight(&mut s);
    let mut batch: Vec<Vec<u8>> = missing_for(&s, 1, 0, g)
        .into_iter()
        .map(|e| e.bytes)
        .collect();
    // Fisher-Yates with a splitmix64 stream (no rand dependency in this crate).
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..batch.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        batch.swap(i, j);
    }
    // A sync run hands over epoch by epoch; inside an epoch, any order.
    batch.sort_by_key(|b| Envelope::decode(b).map(|e| e.epoch()).unwrap_or(0));
    s.engines[1].begin_catch_up_all(s.now_ms);
    read_batch(&mut s, 1, g, batch);
    assert!(
        s.undecryptable[1].is_empty(),
        "seed {seed} (KITH_TEST_SEED): {} lost",
        s.undecryptable[1].len()
    );
    assert_eq!(s.texts(1, g).len(), 501, "seed {seed} (KITH_TEST_SEED)");
}
