//! Chat messages between group engines: recorded by every member whatever order they
//! arrive in (live or through a sync batch), kept and re-sent like texts, and refused when
//! a member edits another's message or passes off someone else's profile.

#![allow(clippy::unwrap_used)]

use openmls_rust_crypto::OpenMlsRustCrypto;

use super::tests::sim;
use super::*;
use crate::chat::{Chat, ChatV1, Profile, ProfileV1};
use crate::envelope::{AppContent, AppContentV2, Body, PayloadKind};
use crate::records::EntryKind;
use crate::testing::Sim;

/// Three members of one group.
fn three() -> (Sim<'static, OpenMlsRustCrypto>, GroupId) {
    let mut s = sim(3);
    let g = s.create_group(0, "chat").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    for j in 1..3 {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    (s, g)
}

/// Member `i` sends `chat`; its history entry, if it has one.
fn chat(
    s: &mut Sim<'_, OpenMlsRustCrypto>,
    i: usize,
    g: GroupId,
    c: ChatV1,
) -> Option<HistoryEntry> {
    let now = s.now_ms;
    let (entry, fx) = s.engines[i].send_chat(g, Chat::V1(c), now).unwrap();
    s.apply(i, fx);
    entry
}

/// Member `i` encrypts `body` by hand, past every check its own engine makes (a hostile
/// member's node): the envelope bytes.
fn forge(s: &mut Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId, body: ChatV1) -> Vec<u8> {
    let now = s.now_ms;
    let e = &mut s.engines[i];
    let content = AppContent::V2(AppContentV2 {
        id: MessageId([9; 32]),
        sent_at_ms: now,
        body: Body::Chat(Chat::V1(body)),
    });
    let gr = e.groups.get_mut(&g).unwrap();
    super::local::encrypt_app(&e.provider, &e.me.signer, g, gr, &content)
        .unwrap()
        .1
}

fn last_text(s: &Sim<'_, OpenMlsRustCrypto>, i: usize) -> HistoryEntry {
    s.history[i]
        .iter()
        .rev()
        .find(|h| h.kind.text().is_some())
        .cloned()
        .unwrap()
}

fn stable_of(h: &HistoryEntry) -> MessageId {
    match &h.kind {
        EntryKind::Post { stable, .. } => *stable,
        other => panic!("not a post: {other:?}"),
    }
}

fn kinds(s: &Sim<'_, OpenMlsRustCrypto>, i: usize) -> Vec<EntryKind> {
    s.history[i]
        .iter()
        .filter(|h| {
            matches!(
                h.kind,
                EntryKind::Post { .. }
                    | EntryKind::Reaction { .. }
                    | EntryKind::Edit { .. }
                    | EntryKind::Delete { .. }
            )
        })
        .map(|h| h.kind.clone())
        .collect()
}

#[test]
fn a_reaction_and_an_edit_that_arrive_before_their_target_are_recorded_and_so_is_it() {
    let (mut s, g) = three();
    s.send(0, g, "hello").unwrap();
    let target = last_text(&s, 0);
    let (to, stable) = (target.id, stable_of(&target));
    chat(
        &mut s,
        1,
        g,
        ChatV1::React {
            to,
            emoji: "👍".into(),
            on: true,
        },
    );
    chat(
        &mut s,
        0,
        g,
        ChatV1::Edit {
            target: to,
            stable,
            text: "hello!".into(),
        },
    );
    assert_eq!(s.in_flight.len(), 3);
    // Member 2 gets the reaction, then the edit (its sender's next message: held until the
    // text before it is there), then the text.
    let before = s.verdicts.len();
    s.deliver_at(1);
    s.deliver_at(1);
    s.deliver_at(0);
    for (j, v) in &s.verdicts[before..] {
        assert!(!matches!(v, Verdict::Reject(_)), "member {j}: {v:?}");
    }
    let got = kinds(&s, 2);
    assert!(
        got.iter()
            .any(|k| matches!(k, EntryKind::Post { text, .. } if text == "hello")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|k| matches!(k, EntryKind::Reaction { to: t, .. } if *t == to))
    );
    assert!(
        got.iter().any(
            |k| matches!(k, EntryKind::Edit { target: t, text } if *t == to && text == "hello!")
        )
    );
    // Every member names the message the same way.
    assert!(s.history[1].iter().any(|h| h.id == to));
}

#[test]
fn changes_fetched_by_history_sync_before_their_target_are_recorded() {
    let (mut s, g) = three();
    // Member 2 is away: it gets nothing live.
    s.subscribed[2].clear();
    s.send(0, g, "hello").unwrap();
    let target = last_text(&s, 0);
    let (to, stable) = (target.id, stable_of(&target));
    s.deliver_all();
    chat(
        &mut s,
        1,
        g,
        ChatV1::React {
            to,
            emoji: "🎉".into(),
            on: true,
        },
    );
    chat(
        &mut s,
        0,
        g,
        ChatV1::Edit {
            target: to,
            stable,
            text: "hello, all".into(),
        },
    );
    s.deliver_all();
    // The sync batch has the changes first, the text last.
    let mut batch: Vec<StoredEnvelope> = s.stored[1]
        .iter()
        .filter(|e| e.group == g && e.kind == PayloadKind::Application)
        .filter(|e| !s.stored[2].iter().any(|x| x.id == e.id))
        .cloned()
        .collect();
    assert_eq!(batch.len(), 3);
    batch.rotate_left(1);
    let now = s.now_ms + 1;
    let (verdicts, fx) =
        s.engines[2].handle_synced_batch(batch.iter().map(|e| e.bytes.clone()).collect(), now);
    assert!(
        verdicts.iter().all(|(_, v)| *v == Verdict::Accept),
        "{verdicts:?}"
    );
    s.apply(2, fx);
    let got = kinds(&s, 2);
    assert_eq!(got.len(), 3, "{got:?}");
}

#[test]
fn an_edit_or_delete_of_another_members_message_is_refused_and_records_nothing() {
    let (mut s, g) = three();
    s.send(0, g, "mine").unwrap();
    s.deliver_all();
    let target = last_text(&s, 0);
    let (to, stable) = (target.id, stable_of(&target));
    // Through the engine, member 1 cannot even send it.
    let now = s.now_ms;
    let forged = ChatV1::Edit {
        target: to,
        stable,
        text: "forged".into(),
    };
    assert!(matches!(
        s.engines[1].send_chat(g, Chat::V1(forged.clone()), now),
        Err(GroupError::InvalidInput(_))
    ));
    // A hostile member encrypts it by hand: every other member refuses it.
    for body in [forged, ChatV1::Delete { target: to, stable }] {
        let data = forge(&mut s, 1, g, body);
        let before = s.history[0].len();
        let (v, fx) = s.engines[0].handle_envelope(&data, now + 1);
        assert_eq!(v, Verdict::Reject(RejectReason::NotAuthor));
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(s.history[0].len(), before);
        let (v, _) = s.engines[2].handle_envelope(&data, now + 2);
        assert_eq!(v, Verdict::Reject(RejectReason::NotAuthor));
    }
}

#[test]
fn a_profile_must_be_its_senders_own_but_a_list_may_forward_members_profiles() {
    let (mut s, g) = three();
    let profile = |name: &str| {
        Profile::V1(ProfileV1 {
            version: 1,
            name: name.into(),
            avatar: None,
        })
    };
    let alice = s.engines[0].sign_profile(profile("Alice")).unwrap();
    // Member 0's own profile: every member keeps it.
    chat(&mut s, 0, g, ChatV1::Profile(alice.clone()));
    s.deliver_all();
    for j in 1..3 {
        assert!(
            s.chat[j]
                .iter()
                .any(|e| matches!(e, Effect::Profile { owner, .. } if *owner == s.peer(0))),
            "member {j}"
        );
    }
    // Member 1 passes Alice's profile off as its own: its engine will not send it, and
    // sent by hand, it is refused.
    let now = s.now_ms;
    assert!(
        s.engines[1]
            .send_chat(g, Chat::V1(ChatV1::Profile(alice.clone())), now)
            .is_err()
    );
    let data = forge(&mut s, 1, g, ChatV1::Profile(alice.clone()));
    let (v, fx) = s.engines[2].handle_envelope(&data, now + 1);
    assert_eq!(
        v,
        Verdict::Reject(RejectReason::Chat(crate::chat::ChatError::NotOwner))
    );
    assert!(fx.is_empty());
    // Forwarding it in a list (what the member that adds someone does) is fine.
    let before = s.chat[2].len();
    chat(&mut s, 1, g, ChatV1::Profiles(vec![alice]));
    s.deliver_all();
    assert!(
        s.chat[2][before..]
            .iter()
            .any(|e| matches!(e, Effect::Profile { owner, .. } if *owner == s.peer(0)))
    );
}

#[test]
fn a_direct_chat_note_marks_the_group_on_both_sides_only() {
    let mut s = sim(3);
    let g = s.create_group(0, "direct chat").unwrap();
    let inv = s.invite(0, g, 1).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    let with = s.peer(1).to_bytes();
    chat(&mut s, 0, g, ChatV1::Direct { with });
    s.deliver_all();
    assert!(
        s.chat[0]
            .iter()
            .any(|e| matches!(e, Effect::Direct { peer, .. } if *peer == s.peer(1)))
    );
    assert!(
        s.chat[1]
            .iter()
            .any(|e| matches!(e, Effect::Direct { peer, .. } if *peer == s.peer(0)))
    );
}

#[test]
fn kept_chat_messages_are_sent_again_like_texts_and_others_are_not() {
    let (mut s, g) = three();
    s.send(0, g, "t").unwrap();
    let to = last_text(&s, 0).id;
    chat(
        &mut s,
        0,
        g,
        ChatV1::React {
            to,
            emoji: "👍".into(),
            on: true,
        },
    );
    chat(&mut s, 0, g, ChatV1::Typing);
    let kept = crate::fork::sent_after(s.engines[0].provider.storage(), &g, 0).unwrap();
    assert_eq!(
        kept.len(),
        2,
        "the text and the reaction, not the typing notice"
    );
    assert!(
        matches!(&kept[1].said, crate::fork::Said::Chat(c) if matches!(c.v1(), ChatV1::React { .. }))
    );
}

/// A reaction and an edit made on a branch that loses a concurrent commit are sent again on
/// the winning branch: every member ends with them, once.
#[test]
fn chat_messages_on_a_losing_branch_are_sent_again_and_read_once() {
    for order in [[0usize, 1], [1, 0]] {
        let mut s = sim(3);
        let g = crate::testing::three_member_run(&mut s);
        s.send(2, g, "target").unwrap();
        s.deliver_all();
        let target = last_text(&s, 2);
        s.self_update(0, g).unwrap();
        s.self_update(1, g).unwrap();
        let commits: Vec<_> = s.in_flight.drain(..).collect();
        let ids: Vec<MessageId> = commits.iter().map(|c| MessageId::of(&c.2)).collect();
        let loser = if ids[0] < ids[1] { 1 } else { 0 };
        // The loser reacts, and edits a text of its own, before it learns it lost.
        s.send(loser, g, "mine").unwrap();
        let mine = last_text(&s, loser);
        chat(
            &mut s,
            loser,
            g,
            ChatV1::React {
                to: target.id,
                emoji: "👍".into(),
                on: true,
            },
        );
        chat(
            &mut s,
            loser,
            g,
            ChatV1::Edit {
                target: mine.id,
                stable: stable_of(&mine),
                text: "mine, edited".into(),
            },
        );
        let own: Vec<_> = s.in_flight.drain(..).collect();
        for &k in &order {
            s.in_flight.push_back(commits[k].clone());
        }
        s.in_flight.extend(own);
        s.deliver_all();
        assert_eq!(s.engines[loser].group(&g).unwrap().rollbacks, 1);
        for i in 0..3 {
            let reactions: Vec<_> = s.history[i]
                .iter()
                .filter(|h| matches!(&h.kind, EntryKind::Reaction { to, .. } if *to == target.id))
                .collect();
            assert_eq!(reactions.len(), 1, "member {i}: {reactions:?}");
            let edits = s.history[i]
                .iter()
                .filter(|h| matches!(&h.kind, EntryKind::Edit { target, text } if *target == mine.id && text == "mine, edited"))
                .count();
            assert_eq!(edits, 1, "member {i}");
        }
    }
}
