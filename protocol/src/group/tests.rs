//! Group engine runs on openmls' memory storage.

#![allow(clippy::unwrap_used)]

use openmls_rust_crypto::OpenMlsRustCrypto;

use super::*;
use crate::envelope::{Envelope, JoinRequest, JoinResponse, PayloadKind};
use crate::invite::InviteRecord;
use crate::records::EntryKind;
use crate::testing::{Sim, member_key, three_member_run};

pub(super) fn sim(n: usize) -> Sim<'static, OpenMlsRustCrypto> {
    Sim::new(
        (0..n).map(|_| OpenMlsRustCrypto::default()).collect(),
        "test-net",
        Box::new(|_, _, _| {}),
    )
}

#[test]
fn three_members_exchange_messages() {
    let mut s = sim(3);
    three_member_run(&mut s);
    // Nothing valid is rejected. The only ignored deliveries are the commits that added a
    // joiner, seen by that joiner (it is already past them through its Welcome).
    for (j, v) in &s.verdicts {
        match v {
            Verdict::Accept => {}
            Verdict::Ignore(why) => {
                assert!(
                    matches!(why, IgnoreReason::BeyondRewind { .. }),
                    "member {j}: {why}"
                )
            }
            Verdict::Reject(why) => panic!("member {j} rejected a valid envelope: {why}"),
        }
    }
}

#[test]
fn five_members_all_read_everything() {
    let mut s = sim(5);
    let g = s.create_group(0, "five").unwrap();
    let inv = s.invite(0, g, 10).unwrap();
    for j in 1..5 {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    for i in 0..5 {
        for k in 0..3 {
            s.send(i, g, &format!("{i}-{k}")).unwrap();
        }
    }
    s.deliver_all();
    for i in 0..5 {
        assert_eq!(s.texts(i, g).len(), 15, "member {i}");
        assert_eq!(s.engines[i].group(&g).unwrap().members.len(), 5);
    }
}

#[test]
fn message_from_next_epoch_is_held_until_its_commit_arrives() {
    let mut s = sim(3);
    let g = s.create_group(0, "order").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    // Member 2 joins: the commit (epoch 1 -> 2) is in flight for member 1.
    s.join(2, 0, &inv).unwrap();
    s.send(0, g, "in epoch 2").unwrap();
    // Deliver the application message before the commit.
    assert_eq!(s.in_flight.len(), 2);
    s.deliver_at(1);
    assert!(
        s.verdicts
            .iter()
            .any(|(j, v)| *j == 1 && matches!(v, Verdict::Ignore(_))),
        "{:?}",
        s.verdicts
    );
    assert_eq!(s.engines[1].pending_count(&g), 1);
    assert!(s.texts(1, g).is_empty());
    s.deliver_all();
    assert_eq!(s.engines[1].pending_count(&g), 0);
    assert_eq!(s.texts(1, g), vec!["in epoch 2"]);
    assert_eq!(s.texts(2, g), vec!["in epoch 2"]);
}

#[test]
fn garbage_and_forged_envelopes_are_rejected() {
    let mut s = sim(2);
    let g = s.create_group(0, "g").unwrap();
    let inv = s.invite(0, g, 1).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    let now = s.now_ms;
    // Not an envelope at all.
    let (v, fx) = s.engines[1].handle_envelope(b"\x00\x01garbage", now);
    assert!(matches!(v, Verdict::Reject(_)), "{v:?}");
    assert!(fx.is_empty());
    // A valid envelope header around bytes that are not MLS.
    let (bytes, _) = Envelope::new(g, 1, PayloadKind::Application, vec![1, 2, 3])
        .encode()
        .unwrap();
    let (v, _) = s.engines[1].handle_envelope(&bytes, now);
    assert!(matches!(v, Verdict::Reject(_)), "{v:?}");
    // A real message whose header names the wrong epoch.
    s.send(0, g, "hi").unwrap();
    let (_, _, data) = s.in_flight.pop_front().unwrap();
    let env = Envelope::decode(&data).unwrap();
    let (forged, _) = Envelope::new(g, env.epoch(), PayloadKind::Application, {
        let mut m = env.mls().to_vec();
        let last = m.len() - 1;
        m[last] ^= 0x55; // flip a bit of the ciphertext tag
        m
    })
    .encode()
    .unwrap();
    let (v, fx) = s.engines[1].handle_envelope(&forged, now);
    assert!(matches!(v, Verdict::Reject(_)), "{v:?}");
    assert!(fx.is_empty());
    // The untouched message still decrypts afterwards.
    let (v, _) = s.engines[1].handle_envelope(&data, now);
    assert_eq!(v, Verdict::Accept);
    // An envelope for a group we are not in is ignored, not rejected.
    let (other, _) = Envelope::new(GroupId([9; 32]), 0, PayloadKind::Application, vec![])
        .encode()
        .unwrap();
    let (v, _) = s.engines[1].handle_envelope(&other, now);
    assert!(matches!(v, Verdict::Ignore(_)), "{v:?}");
}

#[test]
fn oversized_envelope_is_rejected_without_decoding() {
    let mut s = sim(1);
    let big = vec![0u8; crate::envelope::MAX_ENVELOPE_BYTES + 1];
    let (v, fx) = s.engines[0].handle_envelope(&big, T0);
    assert!(matches!(v, Verdict::Reject(_)));
    assert!(fx.is_empty());
    let _ = s.create_group(0, "x").unwrap();
}

const T0: u64 = crate::testing::T0_MS;

#[test]
fn join_requests_are_checked() {
    let mut s = sim(3);
    let g = s.create_group(0, "guarded").unwrap();
    let inv = s.invite(0, g, 1).unwrap();
    let record = s.invites[0][0].clone();
    let req = s.engines[1].prepare_join(&inv, T0).unwrap();
    let peer1 = s.peer(1);
    let peer2 = s.peer(2);

    let reject = |s: &mut Sim<'_, _>, from, req: JoinRequest, rec: Option<InviteRecord>, now| {
        let (resp, fx) = s.engines[0]
            .handle_join_request(from, req, rec, now)
            .unwrap();
        assert!(fx.is_empty(), "a rejection changes nothing");
        match resp {
            JoinResponse::Rejected(r) => r,
            other => panic!("not rejected: {other:?}"),
        }
    };
    // No record for this secret.
    assert_eq!(
        reject(&mut s, peer1, req.clone(), None, T0),
        JoinRejection::UnknownInvite
    );
    // Wrong secret.
    let JoinRequest::V1(mut bad) = req.clone() else {
        unreachable!("prepare_join makes V1 requests")
    };
    bad.secret[0] ^= 1;
    assert_eq!(
        reject(
            &mut s,
            peer1,
            JoinRequest::V1(bad),
            Some(record.clone()),
            T0
        ),
        JoinRejection::UnknownInvite
    );
    // Wrong network.
    let JoinRequest::V1(mut bad) = req.clone() else {
        unreachable!("prepare_join makes V1 requests")
    };
    bad.network = "elsewhere".into();
    assert_eq!(
        reject(
            &mut s,
            peer1,
            JoinRequest::V1(bad),
            Some(record.clone()),
            T0
        ),
        JoinRejection::WrongNetwork
    );
    // Unknown group.
    let JoinRequest::V1(mut bad) = req.clone() else {
        unreachable!("prepare_join makes V1 requests")
    };
    bad.group = GroupId([3; 32]);
    assert_eq!(
        reject(
            &mut s,
            peer1,
            JoinRequest::V1(bad),
            Some(record.clone()),
            T0
        ),
        JoinRejection::NotMember
    );
    // Expired (exactly at expiry).
    let at_expiry = record.expires_at * 1000;
    assert_eq!(
        reject(&mut s, peer1, req.clone(), Some(record.clone()), at_expiry),
        JoinRejection::Expired
    );
    // Used up.
    let mut used = record.clone();
    used.uses = used.max_uses;
    assert_eq!(
        reject(&mut s, peer1, req.clone(), Some(used), T0),
        JoinRejection::UsedUp
    );
    // Revoked (and revocation wins over expiry and use-up, the more permanent reason).
    let mut revoked = record.clone();
    revoked.revoked = true;
    assert_eq!(
        reject(&mut s, peer1, req.clone(), Some(revoked.clone()), T0),
        JoinRejection::Revoked
    );
    revoked.uses = revoked.max_uses;
    assert_eq!(
        reject(&mut s, peer1, req.clone(), Some(revoked), at_expiry),
        JoinRejection::Revoked
    );
    // A record known only from a use (its creation message not yet seen) admits nobody.
    let mut unknown = record.clone();
    unknown.secret_hash = None;
    assert_eq!(
        reject(&mut s, peer1, req.clone(), Some(unknown), T0),
        JoinRejection::UnknownInvite
    );
    // Key package presented by a different peer than the one it names.
    assert_eq!(
        reject(&mut s, peer2, req.clone(), Some(record.clone()), T0),
        JoinRejection::InvalidKeyPackage
    );
    // Garbage key package.
    let JoinRequest::V1(mut bad) = req.clone() else {
        unreachable!("prepare_join makes V1 requests")
    };
    bad.key_package = vec![0; 40];
    assert_eq!(
        reject(
            &mut s,
            peer1,
            JoinRequest::V1(bad),
            Some(record.clone()),
            T0
        ),
        JoinRejection::InvalidKeyPackage
    );
    assert_eq!(
        s.engines[0].group(&g).unwrap().epoch,
        0,
        "nothing was committed"
    );

    // The genuine request is accepted and uses the invite up.
    let (resp, fx) = s.engines[0]
        .handle_join_request(peer1, req, Some(record), T0)
        .unwrap();
    assert!(matches!(resp, JoinResponse::Admitted { .. }));
    let used: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Invite(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        used,
        vec![InviteUpdate::Used {
            group: g,
            id: inv.id()
        }]
    );
    let (gid, _) = s.engines[1].handle_join_response(&inv, resp, T0).unwrap();
    assert_eq!(gid, g);
    // Joining twice is refused locally.
    assert!(matches!(
        s.engines[1].prepare_join(&inv, T0),
        Err(GroupError::AlreadyMember(_))
    ));
}

#[test]
fn joiner_reports_rejection_and_rejects_foreign_welcome() {
    let mut s = sim(3);
    let g = s.create_group(0, "a").unwrap();
    let inv = s.invite(0, g, 1).unwrap();
    let err = s.engines[1]
        .handle_join_response(&inv, JoinResponse::Rejected(JoinRejection::UsedUp), T0)
        .unwrap_err();
    assert!(matches!(
        err,
        GroupError::JoinRejected(JoinRejection::UsedUp)
    ));
    let err = s.engines[1]
        .handle_join_response(
            &inv,
            JoinResponse::Accepted {
                welcome: vec![1, 2, 3],
                group_name: "x".into(),
            },
            T0,
        )
        .unwrap_err();
    assert!(matches!(err, GroupError::BadWelcome(_)), "{err:?}");
    // A Welcome for another group than the invite names is refused and leaves no group.
    let other = s.create_group(2, "b").unwrap();
    let inv_other = s.invite(2, other, 1).unwrap();
    let req = s.engines[1].prepare_join(&inv_other, T0).unwrap();
    let rec = s.invites[2][0].clone();
    let p1 = s.peer(1);
    let (resp, _) = s.engines[2]
        .handle_join_request(p1, req, Some(rec), T0)
        .unwrap();
    let err = s.engines[1]
        .handle_join_response(&inv, resp, T0)
        .unwrap_err();
    assert!(matches!(err, GroupError::BadWelcome(_)), "{err:?}");
    assert!(s.engines[1].groups().is_empty());
}

#[test]
fn sending_checks_input() {
    let mut s = sim(1);
    let g = s.create_group(0, "solo").unwrap();
    assert!(matches!(
        s.engines[0].send_text(g, "", T0),
        Err(GroupError::InvalidInput(_))
    ));
    let long = "x".repeat(crate::envelope::MAX_TEXT_BYTES + 1);
    assert!(matches!(
        s.engines[0].send_text(g, &long, T0),
        Err(GroupError::InvalidInput(_))
    ));
    assert!(matches!(
        s.engines[0].send_text(GroupId([1; 32]), "hi", T0),
        Err(GroupError::UnknownGroup(_))
    ));
    assert!(matches!(
        s.engines[0].create_group(GroupId([2; 32]), "  ", T0),
        Err(GroupError::InvalidInput(_))
    ));
}

#[test]
fn members_are_bound_to_their_node_keys() {
    let mut s = sim(2);
    let g = s.create_group(0, "bound").unwrap();
    let inv = s.invite(0, g, 1).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    let view = s.engines[0].group(&g).unwrap();
    let peers: Vec<_> = view.members.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        peers,
        vec![
            member_key(0).public().to_peer_id(),
            member_key(1).public().to_peer_id()
        ]
    );
}

/// Member 0 sends in epoch 1; the commit to epoch 2 reaches member 1 first.
fn late_message_setup() -> (Sim<'static, OpenMlsRustCrypto>, GroupId, Vec<u8>) {
    let mut s = sim(3);
    let g = s.create_group(0, "late").unwrap();
    let inv = s.invite(0, g, 2).unwrap();
    s.join(1, 0, &inv).unwrap();
    s.deliver_all();
    s.send(0, g, "sent in epoch 1").unwrap();
    let (_, _, late) = s.in_flight.pop_back().unwrap();
    s.join(2, 0, &inv).unwrap();
    s.deliver_all();
    assert_eq!(s.engines[1].group(&g).unwrap().epoch, 2);
    (s, g, late)
}

#[test]
fn late_message_from_the_previous_epoch_still_decrypts() {
    let (mut s, _g, late) = late_message_setup();
    let (v, _) = s.engines[1].handle_envelope(&late, T0);
    assert_eq!(v, Verdict::Accept);
    // The window counts from when this node left the epoch (noticed at the first expiry
    // call after the commit), however long the epoch itself lasted.
    let (mut s2, _g2, late2) = late_message_setup();
    let ttl = PAST_EPOCH_TTL.as_millis() as u64;
    assert!(
        s2.engines[1]
            .expire_past_epochs(T0, PAST_EPOCH_TTL)
            .unwrap()
            .staged
    );
    assert!(
        !s2.engines[1]
            .expire_past_epochs(T0 + ttl - 1, PAST_EPOCH_TTL)
            .unwrap()
            .staged
    );
    assert_eq!(
        s2.engines[1].handle_envelope(&late2, T0 + ttl - 1).0,
        Verdict::Accept
    );
}

#[test]
fn expired_past_epochs_no_longer_decrypt_and_nothing_breaks() {
    let (mut s, g, late) = late_message_setup();
    let ttl = PAST_EPOCH_TTL.as_millis() as u64;
    s.engines[1].expire_past_epochs(T0, PAST_EPOCH_TTL).unwrap();
    // A restart in between: the end time is read back from storage.
    s.engines[1].reload_all().unwrap();
    assert_eq!(
        s.engines[1]
            .expire_past_epochs(T0 + ttl, PAST_EPOCH_TTL)
            .unwrap()
            .epochs,
        1
    );
    let (v, fx) = s.engines[1].handle_envelope(&late, T0);
    assert!(
        matches!(v, Verdict::Ignore(IgnoreReason::Undecryptable(_))),
        "{v:?}"
    );
    // The loss is reported, with the envelope to keep.
    assert!(
        matches!(
            fx.as_slice(),
            [Effect::Undecryptable {
                reason: Undecryptable::EpochGone,
                ..
            }]
        ),
        "{fx:?}"
    );
    // The current epoch is unaffected.
    s.send(2, g, "current").unwrap();
    s.deliver_all();
    assert_eq!(s.texts(1, g), vec!["current"]);
}

/// Member 0 creates a group and admits members 1..n through invites; all delivered.
pub(super) fn group_of(n: usize) -> (Sim<'static, OpenMlsRustCrypto>, GroupId) {
    let mut s = sim(n);
    let g = s.create_group(0, "members").unwrap();
    let inv = s.invite(0, g, n as u32).unwrap();
    for j in 1..n {
        s.join(j, 0, &inv).unwrap();
        s.deliver_all();
    }
    (s, g)
}

fn assert_converged(s: &Sim<'_, OpenMlsRustCrypto>, g: GroupId, members: &[usize], epoch: u64) {
    let auth = s.engines[members[0]].epoch_authenticator(&g);
    for &i in members {
        let v = s.engines[i].group(&g).unwrap();
        assert!(v.active, "member {i} active");
        assert_eq!(v.epoch, epoch, "member {i} epoch");
        assert_eq!(v.members.len(), members.len(), "member {i} member count");
        assert_eq!(s.engines[i].epoch_authenticator(&g), auth, "member {i}");
    }
}

fn removals(s: &Sim<'_, OpenMlsRustCrypto>, i: usize, g: GroupId) -> Vec<(PeerId, Vec<PeerId>)> {
    s.history[i]
        .iter()
        .filter(|h| h.group == g)
        .filter_map(|h| match &h.kind {
            EntryKind::MembersRemoved(v) => Some((h.sender, v.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn removed_member_reads_nothing_after_and_is_not_heard() {
    let (mut s, g) = group_of(4);
    let epoch = s.engines[0].group(&g).unwrap().epoch;
    let gone = s.peer(3);
    s.remove(0, g, gone).unwrap();
    // Member 3 has not seen the commit yet and posts in the old epoch.
    s.send(3, g, "from the removed member").unwrap();
    let flight: Vec<Vec<u8>> = s.in_flight.drain(..).map(|(_, _, d)| d).collect();
    let [commit, stale] = flight.as_slice() else {
        panic!("{} envelopes in flight", flight.len());
    };
    // Members 1 and 2 process the commit, then the stale post: rejected, nothing stored.
    for j in 1..3 {
        let (v, fx) = s.engines[j].handle_envelope(commit, T0);
        assert_eq!(v, Verdict::Accept, "member {j}");
        s.apply(j, fx);
    }
    for j in 0..3 {
        let (v, fx) = s.engines[j].handle_envelope(stale, T0);
        assert!(
            matches!(v, Verdict::Reject(RejectReason::FormerMember)),
            "member {j}: {v:?}"
        );
        assert!(fx.is_empty(), "member {j} stores nothing: {fx:?}");
    }
    // The others talk in the new epoch.
    s.send(1, g, "after 1").unwrap();
    s.send(2, g, "after 2").unwrap();
    let after: Vec<Vec<u8>> = s.in_flight.iter().map(|(_, _, d)| d.clone()).collect();
    let (after1, after2) = (&after[0], &after[1]);
    // Member 3 gets the new-epoch messages first (held), then the commit: it reads none.
    for env in [after1, after2, commit] {
        let (_, fx) = s.engines[3].handle_envelope(env, T0);
        s.apply(3, fx);
    }
    for env in [after1, after2] {
        let (v, fx) = s.engines[3].handle_envelope(env, T0);
        assert!(matches!(v, Verdict::Ignore(_)), "{v:?}");
        assert!(fx.is_empty());
    }
    assert_eq!(s.texts(3, g), vec!["from the removed member"]);
    // It merges the commit once the grace for its last epoch's late messages ends.
    assert!(s.engines[3].removal_held(&g));
    s.now_ms += REMOVAL_GRACE_MS;
    s.tick(3);
    let v3 = s.engines[3].group(&g).unwrap();
    assert!(!v3.active);
    assert!(!s.subscribed[3].contains(&g.topic("test-net")));
    assert!(matches!(
        s.engines[3].send_text(g, "still here?", T0),
        Err(GroupError::Inactive(_))
    ));
    // The remaining members deliver the rest and converge.
    s.deliver_all();
    assert_converged(&s, g, &[0, 1, 2], epoch + 1);
    for i in 0..3 {
        let mut texts = s.texts(i, g);
        texts.sort();
        assert_eq!(texts, vec!["after 1", "after 2"], "member {i}");
        assert_eq!(
            removals(&s, i, g),
            vec![(s.peer(0), vec![gone])],
            "member {i}"
        );
    }
    s.send(0, g, "still talking").unwrap();
    s.deliver_all();
    assert!(s.texts(1, g).contains(&"still talking".to_owned()));
}

#[test]
fn leaving_is_committed_by_the_lowest_remaining_member() {
    let (mut s, g) = group_of(4);
    let epoch = s.engines[0].group(&g).unwrap().epoch;
    let leaver = s.peer(0);
    s.leave(0, g).unwrap();
    assert!(s.engines[0].group(&g).unwrap().leaving);
    assert!(matches!(
        s.engines[0].send_text(g, "bye", T0),
        Err(GroupError::Leaving(_))
    ));
    assert!(matches!(
        s.engines[0].self_update(g, T0),
        Err(GroupError::Leaving(_))
    ));
    s.deliver_all();
    // One commit, by member 1 (lowest leaf after the leaver's).
    assert_converged(&s, g, &[1, 2, 3], epoch + 1);
    for i in 1..4 {
        assert_eq!(
            removals(&s, i, g),
            vec![(s.peer(1), vec![leaver])],
            "member {i}"
        );
    }
    // The leaver merges the commit once the grace for its last epoch's late messages ends.
    assert!(!s.engines[0].group(&g).unwrap().active);
    s.now_ms += REMOVAL_GRACE_MS;
    s.tick(0);
    let v0 = s.engines[0].group(&g).unwrap();
    assert!(!v0.active);
    assert!(!v0.leaving);
    assert!(!s.subscribed[0].contains(&g.topic("test-net")));
    for (j, v) in &s.verdicts {
        assert!(!matches!(v, Verdict::Reject(_)), "member {j}: {v:?}");
    }
    s.send(3, g, "without 0").unwrap();
    s.deliver_all();
    assert_eq!(s.texts(1, g), vec!["without 0"]);
    assert!(s.texts(0, g).is_empty());
}

#[test]
fn a_member_leaving_in_the_middle_is_committed_by_member_0() {
    let (mut s, g) = group_of(3);
    s.leave(2, g).unwrap();
    s.deliver_all();
    assert_converged(&s, g, &[0, 1], 3);
    assert_eq!(removals(&s, 1, g), vec![(s.peer(0), vec![s.peer(2)])]);
    assert!(!s.engines[2].group(&g).unwrap().active);
}

#[test]
fn leave_proposal_survives_a_competing_commit() {
    let (mut s, g) = group_of(3);
    // Member 2 leaves while member 1's self-update is already in flight and wins the epoch.
    s.self_update(1, g).unwrap();
    s.leave(2, g).unwrap();
    s.deliver_all();
    // The proposal made in the old epoch was dropped; member 2 proposed again and member 0
    // committed it.
    assert_converged(&s, g, &[0, 1], 4);
    assert!(!s.engines[2].group(&g).unwrap().active);
}

#[test]
fn self_update_advances_the_epoch_for_everyone() {
    let (mut s, g) = group_of(3);
    let before = s.engines[0].epoch_authenticator(&g);
    s.self_update(1, g).unwrap();
    s.deliver_all();
    assert_converged(&s, g, &[0, 1, 2], 3);
    assert_ne!(s.engines[0].epoch_authenticator(&g), before);
    for i in 0..3 {
        s.send(i, g, &format!("after update {i}")).unwrap();
    }
    s.deliver_all();
    for i in 0..3 {
        assert_eq!(s.texts(i, g).len(), 3, "member {i}");
    }
}

#[test]
fn self_updates_fall_due_by_messages_and_by_time() {
    let (mut s, g) = group_of(2);
    let policy = UpdatePolicy {
        after_messages: 2,
        after_ms: 1000,
    };
    assert_eq!(UpdatePolicy::default().after_messages, 1000);
    let now = s.now_ms;
    assert!(s.engines[1].due_self_updates(now, policy).is_empty());
    s.send(1, g, "one").unwrap();
    assert!(s.engines[1].due_self_updates(now, policy).is_empty());
    s.send(1, g, "two").unwrap();
    assert_eq!(s.engines[1].due_self_updates(now, policy), vec![g]);
    s.self_update(1, g).unwrap();
    assert!(s.engines[1].due_self_updates(now, policy).is_empty());
    assert_eq!(
        s.engines[1].due_self_updates(now + 1000, policy),
        vec![g],
        "due by time"
    );
    s.deliver_all();
    assert_converged(&s, g, &[0, 1], 2);
    assert_eq!(s.texts(0, g), vec!["one", "two"]);
}

#[test]
fn membership_errors() {
    let (mut s, g) = group_of(2);
    let me = s.peer(0);
    assert!(matches!(
        s.engines[0].remove_member(g, me, T0),
        Err(GroupError::InvalidInput(_))
    ));
    let stranger = member_key(9).public().to_peer_id();
    assert!(matches!(
        s.engines[0].remove_member(g, stranger, T0),
        Err(GroupError::UnknownMember(p)) if p == stranger
    ));
    assert!(matches!(
        s.engines[0].remove_member(GroupId([7; 32]), stranger, T0),
        Err(GroupError::UnknownGroup(_))
    ));
    let solo = s.create_group(1, "solo").unwrap();
    assert!(matches!(
        s.engines[1].leave_group(solo, T0),
        Err(GroupError::InvalidInput(_))
    ));
    // Nothing changed.
    assert_eq!(s.engines[0].group(&g).unwrap().epoch, 1);
    assert!(s.in_flight.is_empty());
}
