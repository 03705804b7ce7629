//! Re-send on request: texts a member can no longer decrypt come back from their sender.

#![allow(clippy::unwrap_used)]

use openmls_rust_crypto::OpenMlsRustCrypto;

use super::*;
use crate::codec;
use crate::envelope::{AppContent, Body};
use crate::records::EntryKind;
use crate::testing::Sim;

use super::tests::{group_of, sim};

type S = Sim<'static, OpenMlsRustCrypto>;

/// Takes every envelope in flight out of the queue.
fn take_in_flight(s: &mut S) -> Vec<(usize, TopicId, Vec<u8>)> {
    s.in_flight.drain(..).collect()
}

/// Every member's tick, then the clock moves on by `ms`.
fn tick_all(s: &mut S, ms: u64) {
    for i in 0..s.engines.len() {
        s.tick(i);
    }
    s.now_ms += ms;
}

fn ttl() -> u64 {
    PAST_EPOCH_TTL.as_millis() as u64
}

/// Lets the past-epoch window pass on every member (their ticks delete the epochs they
/// left), then delivers `late`.
fn deliver_after_the_window(s: &mut S, late: Vec<(usize, TopicId, Vec<u8>)>) {
    tick_all(s, ttl());
    tick_all(s, 0);
    s.in_flight.extend(late);
    s.deliver_all();
}

/// The texts member `i` holds in `g` as (history id, epoch, text).
fn placed(s: &S, i: usize, g: GroupId) -> Vec<(MessageId, u64, String)> {
    s.history[i]
        .iter()
        .filter(|h| h.group == g)
        .filter_map(|h| match &h.kind {
            EntryKind::Text(t) | EntryKind::Post { text: t, .. } => {
                Some((h.id, h.epoch, t.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Member 1's texts are late: by the time they arrive, the others left their epoch more
/// than [`PAST_EPOCH_TTL`] ago and deleted its keys. They ask; member 1 sends them again;
/// every member ends with each text once, in the epoch it was said in.
#[test]
fn texts_whose_epoch_keys_are_gone_come_back_on_request_in_their_place() {
    let (mut s, g) = group_of(3);
    s.send(0, g, "before").unwrap();
    s.deliver_all();
    let epoch = s.engines[1].group(&g).unwrap().epoch;
    for t in ["late 1", "late 2", "late 3"] {
        s.send(1, g, t).unwrap();
    }
    let late = take_in_flight(&mut s);
    // Member 2 commits; everyone moves on (member 1 too: it is only its texts that lag).
    s.self_update(2, g).unwrap();
    s.deliver_all();
    assert_eq!(s.engines[0].group(&g).unwrap().epoch, epoch + 1);
    deliver_after_the_window(&mut s, late);
    for i in [0, 2] {
        assert_eq!(s.undecryptable[i].len(), 3, "member {i} cannot read them");
        assert_eq!(s.engines[i].wanted_count(&g), 3, "member {i} asks for them");
    }
    // Members 0 and 2 ask (one request each), member 1 answers both with one copy each.
    tick_all(&mut s, 1);
    assert_eq!(s.in_flight.len(), 2, "one request per asking member");
    s.deliver_all();
    tick_all(&mut s, 1);
    assert_eq!(s.in_flight.len(), 3, "each text once, however many asked");
    s.deliver_all();
    let ours = placed(&s, 1, g);
    for i in [0, 2] {
        assert_eq!(
            placed(&s, i, g),
            ours,
            "member {i} holds what member 1 said, where"
        );
        assert_eq!(
            s.engines[i].wanted_count(&g),
            0,
            "member {i} got all it asked for"
        );
    }
    assert!(ours.iter().any(|(_, e, t)| *e == epoch && t == "late 3"));
    // Nothing further is asked or sent.
    tick_all(&mut s, ASK_AGAIN_MS[0]);
    assert!(s.in_flight.is_empty());
}

/// A text said before a member joined comes back sealed: the member that lost it reads it
/// (it holds the epoch's re-send key), the new member does not (it never was in that epoch),
/// although the copy is encrypted in an epoch it is in.
#[test]
fn a_text_said_before_someone_joined_comes_back_sealed_for_its_epoch() {
    let mut s = sim(3);
    let g = s.create_group(0, "late join").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    s.send(1, g, "before member 2").unwrap();
    let late = take_in_flight(&mut s);
    s.join(2, 0, &inv).unwrap();
    s.deliver_all();
    deliver_after_the_window(&mut s, late);
    assert_eq!(s.undecryptable[0].len(), 1);
    tick_all(&mut s, 1); // member 0 asks
    assert_eq!(s.in_flight.len(), 1);
    s.deliver_all();
    tick_all(&mut s, 1); // member 1 answers, sealed
    assert_eq!(s.in_flight.len(), 1, "sent again once");
    s.verdicts.clear();
    s.deliver_all();
    // Member 2 opens the outer layer (the current epoch) and finds a sealed body it has no
    // key for.
    assert!(
        s.verdicts.iter().any(|(i, v)| *i == 2
            && matches!(v, Verdict::Ignore(IgnoreReason::BeforeJoin(why)) if why.contains("sealed"))),
        "{:?}",
        s.verdicts
    );
    assert!(
        s.texts(0, g).contains(&"before member 2".to_owned()),
        "member 0 reads it"
    );
    assert_eq!(s.engines[0].wanted_count(&g), 0);
    assert!(
        !s.texts(2, g).contains(&"before member 2".to_owned()),
        "member 2 does not"
    );
    assert_eq!(placed(&s, 0, g), placed(&s, 1, g), "in its place");
}

/// Without the re-send key of the text's epoch (kept for the newest
/// [`RESEND_KEY_EPOCHS`] epochs), a text said before someone joined is not sent again.
#[test]
fn without_the_epoch_key_a_text_from_before_a_join_is_not_sent_again() {
    let mut s = sim(3);
    let g = s.create_group(0, "late join").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    let epoch = s.engines[1].group(&g).unwrap().epoch;
    s.send(1, g, "before member 2").unwrap();
    let late = take_in_flight(&mut s);
    s.join(2, 0, &inv).unwrap();
    s.deliver_all();
    // Member 1 no longer keeps that epoch's key.
    s.engines[1].forget_epoch_key_for_tests(&g, epoch);
    deliver_after_the_window(&mut s, late);
    tick_all(&mut s, 1);
    s.deliver_all();
    tick_all(&mut s, 1);
    assert!(s.in_flight.is_empty(), "nothing sent again");
    assert!(!s.texts(0, g).contains(&"before member 2".to_owned()));
}

/// A request nobody answers is repeated on the back-off schedule and then given up.
#[test]
fn requests_back_off_and_stop() {
    let (mut s, g) = group_of(2);
    s.send(1, g, "late").unwrap();
    let late = take_in_flight(&mut s);
    s.self_update(0, g).unwrap();
    s.deliver_all();
    deliver_after_the_window(&mut s, late);
    let mut asked_at = Vec::new();
    let start = s.now_ms;
    // Member 1 is away: its requests are dropped, never answered.
    for _ in 0..(ASK_AGAIN_MS.iter().sum::<u64>() / 30_000 + 4) {
        s.tick(0);
        if !s.in_flight.is_empty() {
            asked_at.push(s.now_ms - start);
            s.in_flight.clear();
        }
        s.now_ms += 30_000;
    }
    assert_eq!(asked_at.len(), 1 + ASK_AGAIN_MS.len(), "{asked_at:?}");
    assert_eq!(s.engines[0].wanted_count(&g), 0, "given up");
    for (w, after) in asked_at.windows(2).zip(ASK_AGAIN_MS) {
        assert!(w[1] - w[0] >= after, "{asked_at:?}");
    }
}

/// The two new bodies are bounded and checked on decoding.
#[test]
fn resend_bodies_are_bounded() {
    let request = |n: usize| {
        codec::encode(&AppContent::V1(crate::envelope::AppContentV1 {
            sent_at_ms: 1,
            body: Body::ResendRequest(vec![MessageId([1; 32]); n]),
        }))
        .unwrap()
    };
    assert!(AppContent::decode(&request(1)).is_ok());
    assert!(AppContent::decode(&request(0)).is_err());
    assert!(AppContent::decode(&request(crate::envelope::MAX_RESEND_REQUEST_IDS + 1)).is_err());
}

/// An edit whose epoch keys are gone on a member comes back on request, in its place; said
/// before someone joined, it comes back sealed (`SealedResentChat`), readable by the
/// members of its epoch only. (`ResentChat`, the clear copy, is the same path without the
/// seal.)
#[test]
fn a_chat_message_whose_keys_are_gone_comes_back_sealed_on_request() {
    use crate::chat::{Chat, ChatV1};
    let mut s = sim(3);
    let g = s.create_group(0, "late chat").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    s.send(0, g, "target").unwrap();
    s.deliver_all();
    let target = s.history[0]
        .iter()
        .rev()
        .find(|h| h.kind.text() == Some("target"))
        .cloned()
        .unwrap();
    let stable = match &target.kind {
        EntryKind::Post { stable, .. } => *stable,
        other => panic!("{other:?}"),
    };
    let now = s.now_ms;
    let (_, fx) = s.engines[0]
        .send_chat(
            g,
            Chat::V1(ChatV1::Edit {
                target: target.id,
                stable,
                text: "target, edited".into(),
            }),
            now,
        )
        .unwrap();
    s.apply(0, fx);
    let late = take_in_flight(&mut s);
    // Member 2 joins after the edit was said; member 1 loses the edit's epoch keys.
    s.join(2, 0, &inv).unwrap();
    s.deliver_all();
    deliver_after_the_window(&mut s, late);
    assert_eq!(s.undecryptable[1].len(), 1, "member 1 cannot read the edit");
    tick_all(&mut s, 1); // member 1 asks
    s.deliver_all();
    tick_all(&mut s, 1); // member 0 answers, sealed (someone joined since)
    assert_eq!(s.in_flight.len(), 1);
    s.deliver_all();
    let edited = |i: usize| {
        s.history[i].iter().any(|h| {
            matches!(&h.kind, EntryKind::Edit { target: t, text } if *t == target.id && text == "target, edited")
                && h.epoch == target.epoch
        })
    };
    assert!(edited(1), "member 1 gets the edit, placed in its epoch");
    assert!(!edited(2), "member 2 was not in that epoch");
    assert_eq!(s.engines[1].wanted_count(&g), 0);
}
