#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use libp2p_identity::PeerId;
use proptest::prelude::*;

use super::admission::{self, Admission, HeldRequests, HeldState};
use super::client::{
    APPROVAL_RETRY_MS, DIAL_TIMEOUT_MS, Input, JoinClient, JoinPlan, Outcome, Output, Stage,
    UNKNOWN_INVITE_LOOKUPS, Via,
};
use super::rejoin::{self, REJOIN_RETRY_MS, REJOIN_ROUNDS, RejoinClient};
use super::{Miss, OpId};
use crate::envelope::{JoinRejection, JoinRequest, JoinResponse};
use crate::ids::{GroupId, MessageId};
use crate::testing::member_key;

fn peer(n: u8) -> PeerId {
    member_key(n).public().to_peer_id()
}

const TIMEOUT: u64 = 120_000;

fn plan(prefer: Option<PeerId>) -> JoinPlan {
    JoinPlan {
        group: GroupId([7; 32]),
        me: peer(0),
        inviter: peer(1),
        inviter_addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
        prefer,
        timeout_ms: TIMEOUT,
    }
}

fn admitted() -> JoinResponse {
    JoinResponse::Admitted {
        welcome: vec![1, 2, 3],
        group_name: "g".into(),
        commit: MessageId([9; 32]),
    }
}

/// The op of the only `Dial` to `who` in `out`.
fn dial_to(out: &[Output], who: PeerId) -> OpId {
    let ops: Vec<OpId> = out
        .iter()
        .filter_map(|o| match o {
            Output::Dial { op, peer, .. } if *peer == who => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(ops.len(), 1, "one dial to {who} in {out:?}");
    ops[0]
}

fn request_to(out: &[Output], who: PeerId) -> OpId {
    let ops: Vec<OpId> = out
        .iter()
        .filter_map(|o| match o {
            Output::Request { op, peer } if *peer == who => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(ops.len(), 1, "one request to {who} in {out:?}");
    ops[0]
}

fn lookup(out: &[Output]) -> Option<OpId> {
    out.iter().find_map(|o| match o {
        Output::Lookup { op } => Some(*op),
        _ => None,
    })
}

fn done(out: &[Output]) -> Option<&Outcome> {
    out.iter().find_map(|o| match o {
        Output::Done(x) => Some(x),
        _ => None,
    })
}

fn timer(out: &[Output]) -> Option<u64> {
    out.iter().rev().find_map(|o| match o {
        Output::ScheduleTimer { at } => Some(*at),
        _ => None,
    })
}

#[test]
fn the_inviter_adds_us() {
    let (mut c, out) = JoinClient::start(plan(None), 0);
    assert_eq!(
        out[0],
        Output::Progress(Stage::FindingMembers { timeout_secs: 120 })
    );
    assert!(lookup(&out).is_some());
    let dial = dial_to(&out, peer(1));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Dial { addrs, .. } if addrs.len() == 1)),
        "the inviter is dialled at the link's addresses"
    );
    assert_eq!(timer(&out), Some(DIAL_TIMEOUT_MS));
    let out = c.handle(
        100,
        Input::Dialled {
            op: dial,
            connected: true,
        },
    );
    // The inviter connected: no need to wait for the DHT. Dialled again as the member asked.
    let dial = dial_to(&out, peer(1));
    let out = c.handle(
        110,
        Input::Dialled {
            op: dial,
            connected: true,
        },
    );
    assert!(out.contains(&Output::Progress(Stage::RequestSent { peer: peer(1) })));
    let req = request_to(&out, peer(1));
    let out = c.handle(
        200,
        Input::Answered {
            op: req,
            response: admitted(),
        },
    );
    assert!(out.contains(&Output::Progress(Stage::Added { peer: peer(1) })));
    assert!(matches!(done(&out), Some(Outcome::Joined { peer: p, .. }) if *p == peer(1)));
    assert!(c.is_done());
    assert!(
        c.handle(300, Input::Timer).is_empty(),
        "nothing after the end"
    );
}

#[test]
fn members_found_in_the_dht_first_are_asked_before_the_inviter() {
    let (mut c, out) = JoinClient::start(plan(None), 0);
    let look = lookup(&out).unwrap();
    let inviter_dial = dial_to(&out, peer(1));
    let out = c.handle(
        50,
        Input::Found {
            op: look,
            peers: vec![peer(0), peer(1), peer(2), peer(3)],
        },
    );
    assert!(out.contains(&Output::Progress(Stage::Contacting {
        peer: peer(2),
        via: Via::Dht
    })));
    let d2 = dial_to(&out, peer(2));
    // The inviter's late dial result is ignored: it is a fallback now.
    assert!(
        c.handle(
            60,
            Input::Dialled {
                op: inviter_dial,
                connected: true
            }
        )
        .iter()
        .all(|o| matches!(o, Output::ScheduleTimer { .. }))
    );
    let out = c.handle(
        70,
        Input::Dialled {
            op: d2,
            connected: true,
        },
    );
    let r2 = request_to(&out, peer(2));
    let out = c.handle(
        80,
        Input::Answered {
            op: r2,
            response: JoinResponse::Rejected(JoinRejection::Busy),
        },
    );
    assert!(out.contains(&Output::Progress(Stage::TryingNext {
        peer: peer(2),
        miss: Miss::Declined(JoinRejection::Busy)
    })));
    let d3 = dial_to(&out, peer(3));
    let out = c.handle(
        90,
        Input::Dialled {
            op: d3,
            connected: false,
        },
    );
    // Then the inviter, at the link's addresses.
    let d1 = dial_to(&out, peer(1));
    let out = c.handle(
        95,
        Input::Dialled {
            op: d1,
            connected: true,
        },
    );
    let r1 = request_to(&out, peer(1));
    let out = c.handle(
        99,
        Input::Answered {
            op: r1,
            response: admitted(),
        },
    );
    assert!(matches!(done(&out), Some(Outcome::Joined { peer: p, .. }) if *p == peer(1)));
}

#[test]
fn a_preferred_member_is_asked_first() {
    let (_, out) = JoinClient::start(plan(Some(peer(5))), 0);
    assert!(out.contains(&Output::Progress(Stage::Contacting {
        peer: peer(5),
        via: Via::Member
    })));
    assert!(out.iter().any(
        |o| matches!(o, Output::Dial { peer: p, addrs, .. } if *p == peer(5) && addrs.is_empty())
    ));
}

/// A join whose inviter connects at once and answers `response`: the last outputs.
fn inviter_answers(response: JoinResponse) -> Vec<Output> {
    let (mut c, out) = JoinClient::start(plan(None), 0);
    let d = dial_to(&out, peer(1));
    let out = c.handle(
        1,
        Input::Dialled {
            op: d,
            connected: true,
        },
    );
    // Dialled again as the member asked.
    let d = dial_to(&out, peer(1));
    let out = c.handle(
        2,
        Input::Dialled {
            op: d,
            connected: true,
        },
    );
    assert!(out.contains(&Output::Progress(Stage::RequestSent { peer: peer(1) })));
    let op = request_to(&out, peer(1));
    c.handle(3, Input::Answered { op, response })
}

#[test]
fn a_refusal_nobody_would_change_ends_the_join() {
    let out = inviter_answers(JoinResponse::Rejected(JoinRejection::UsedUp));
    assert_eq!(done(&out), Some(&Outcome::Refused(JoinRejection::UsedUp)));
}

#[test]
fn the_inviter_not_knowing_its_invite_is_the_answer() {
    let out = inviter_answers(JoinResponse::Rejected(JoinRejection::UnknownInvite));
    assert_eq!(
        done(&out),
        Some(&Outcome::Refused(JoinRejection::UnknownInvite))
    );
}

/// Drives `c` answering every dial with `connected`, every lookup with `found`, every
/// request with `answer`, firing each timer when nothing else is pending, until it ends.
/// Returns the outcome, when it ended, and every output.
fn run(
    mut c: JoinClient,
    first: Vec<Output>,
    connected: impl Fn(PeerId) -> bool,
    found: impl Fn(u32) -> Vec<PeerId>,
    answer: impl Fn(PeerId, u32) -> Option<JoinResponse>,
) -> (Outcome, u64, Vec<Output>) {
    let mut now = 0;
    let mut all = first.clone();
    let mut queue = first;
    let mut lookups = 0;
    let mut asked = std::collections::HashMap::<PeerId, u32>::new();
    let mut next_timer = None;
    for _ in 0..100_000 {
        if let Some(o) = done(&queue) {
            return (o.clone(), now, all);
        }
        let mut inputs = Vec::new();
        for o in queue.drain(..) {
            match o {
                Output::Dial { op, peer, .. } => inputs.push(Input::Dialled {
                    op,
                    connected: connected(peer),
                }),
                Output::Lookup { op } => {
                    lookups += 1;
                    inputs.push(Input::Found {
                        op,
                        peers: found(lookups),
                    });
                }
                Output::Request { op, peer } => {
                    let n = asked.entry(peer).or_default();
                    *n += 1;
                    if let Some(response) = answer(peer, *n) {
                        inputs.push(Input::Answered { op, response });
                    }
                }
                Output::ScheduleTimer { at } => next_timer = Some(at),
                Output::Progress(_) | Output::Done(_) => {}
            }
        }
        if inputs.is_empty() {
            let at = next_timer
                .take()
                .expect("a timer is always set while waiting");
            assert!(at >= now, "timers never go back");
            now = at;
            inputs.push(Input::Timer);
        }
        for i in inputs {
            let out = c.handle(now, i);
            all.extend(out.iter().cloned());
            queue.extend(out);
        }
    }
    panic!("the join never ended");
}

#[test]
fn nobody_reachable_ends_with_one_line_before_the_deadline() {
    let (c, first) = JoinClient::start(plan(None), 0);
    let (outcome, at, _) = run(c, first, |_| false, |_| Vec::new(), |_, _| None);
    let Outcome::Unreachable(line) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(at < TIMEOUT);
    assert!(
        line.starts_with("could not reach any member of the group (tried the inviter at 1 address: cannot connect; the DHT named no other member after"),
        "{line}"
    );
    assert!(line.ends_with("is a member online?"), "{line}");
}

#[test]
fn a_member_that_never_answers_times_the_join_out() {
    let (c, first) = JoinClient::start(plan(None), 0);
    let (outcome, at, _) = run(c, first, |_| true, |_| Vec::new(), |_, _| None);
    assert_eq!(at, TIMEOUT, "ends exactly at the time limit");
    assert!(
        matches!(&outcome, Outcome::TimedOut(line) if line.starts_with("the join did not finish within 120 s")),
        "{outcome:?}"
    );
}

#[test]
fn a_held_request_is_sent_again_until_approved() {
    let (c, first) = JoinClient::start(plan(None), 0);
    let (outcome, at, all) = run(
        c,
        first,
        |_| true,
        |_| Vec::new(),
        |_, n| {
            Some(if n < 4 {
                JoinResponse::AwaitingApproval { request: 42 }
            } else {
                admitted()
            })
        },
    );
    assert!(matches!(outcome, Outcome::Joined { .. }));
    assert_eq!(
        at,
        3 * APPROVAL_RETRY_MS,
        "asked again every retry interval"
    );
    let announced = all
        .iter()
        .filter(|o| {
            matches!(
                o,
                Output::Progress(Stage::AwaitingApproval { request: 42, .. })
            )
        })
        .count();
    assert_eq!(announced, 1, "the wait is announced once");
}

#[test]
fn members_not_knowing_the_invite_end_the_join_after_a_few_lookups() {
    let (c, first) = JoinClient::start(plan(None), 0);
    let (outcome, at, all) = run(
        c,
        first,
        |p| p != peer(1),
        |n| vec![peer(10 + n as u8)],
        |_, _| Some(JoinResponse::Rejected(JoinRejection::UnknownInvite)),
    );
    assert_eq!(outcome, Outcome::Refused(JoinRejection::UnknownInvite));
    assert!(at < TIMEOUT);
    let lookups = all
        .iter()
        .filter(|o| matches!(o, Output::Lookup { .. }))
        .count();
    assert_eq!(lookups as u32, UNKNOWN_INVITE_LOOKUPS);
}

#[test]
fn a_dial_that_hangs_moves_on_after_the_dial_limit() {
    let (mut c, out) = JoinClient::start(plan(None), 0);
    let look = lookup(&out).unwrap();
    let _ = c.handle(
        10,
        Input::Found {
            op: look,
            peers: vec![peer(2), peer(3)],
        },
    );
    // Neither the inviter's nor member 2's dial ever answers.
    let out = c.handle(10 + DIAL_TIMEOUT_MS, Input::Timer);
    assert!(out.contains(&Output::Progress(Stage::TryingNext {
        peer: peer(2),
        miss: Miss::ConnectTimedOut
    })));
    let _ = dial_to(&out, peer(3));
}

proptest! {
    /// Whatever the world answers, and in whatever order: the client asks one member at a
    /// time, ends exactly once, by its deadline, and says nothing after.
    #[test]
    fn one_member_at_a_time_and_one_end(
        events in proptest::collection::vec((0u8..6, 0u8..8, 0u64..3000), 1..200),
        prefer in proptest::option::of(2u8..6),
    ) {
        let (mut c, first) = JoinClient::start(plan(prefer.map(peer)), 0);
        let mut ops: Vec<OpId> = Vec::new();
        let mut ends = 0;
        let mut now = 0;
        let note = |outs: &[Output], ops: &mut Vec<OpId>, ends: &mut usize| {
            for o in outs {
                match o {
                    Output::Dial { op, .. } | Output::Lookup { op } | Output::Request { op, .. } => {
                        ops.push(*op)
                    }
                    Output::Done(_) => *ends += 1,
                    _ => {}
                }
            }
        };
        note(&first, &mut ops, &mut ends);
        for (kind, pick, dt) in events {
            if c.is_done() {
                break;
            }
            now += dt;
            let op = ops.get(pick as usize % ops.len().max(1)).copied().unwrap_or(OpId(0));
            let input = match kind {
                0 => Input::Dialled { op, connected: pick % 2 == 0 },
                1 => Input::Found { op, peers: (0..pick).map(peer).collect() },
                2 => Input::Answered { op, response: match pick % 4 {
                    0 => admitted(),
                    1 => JoinResponse::AwaitingApproval { request: 1 },
                    2 => JoinResponse::Rejected(JoinRejection::Busy),
                    _ => JoinResponse::Rejected(JoinRejection::UnknownInvite),
                }},
                3 => Input::RequestFailed { op },
                _ => Input::Timer,
            };
            let outs = c.handle(now, input);
            let requests = outs.iter().filter(|o| matches!(o, Output::Request { .. })).count();
            let dials = outs.iter().filter(|o| matches!(o, Output::Dial { .. })).count();
            prop_assert!(requests + dials <= 1, "one member at a time: {outs:?}");
            note(&outs, &mut ops, &mut ends);
            if c.is_done() {
                prop_assert!(now <= TIMEOUT || ends == 1);
            }
        }
        if !c.is_done() {
            // At the deadline, the timer ends it.
            let outs = c.handle(now.max(TIMEOUT), Input::Timer);
            note(&outs, &mut ops, &mut ends);
        }
        prop_assert_eq!(ends, 1);
        prop_assert!(c.handle(now + TIMEOUT, Input::Timer).is_empty());
    }
}

#[test]
fn rejoin_asks_in_order_round_after_round_then_gives_up() {
    let members = vec![peer(3), peer(2), peer(4), peer(2)];
    let mut sorted = [peer(2), peer(3), peer(4)];
    sorted.sort();
    let (mut c, mut out) = RejoinClient::start(members, 0);
    let mut now = 0;
    let mut asked = Vec::new();
    let mut rounds_paused = 0;
    loop {
        let mut next = Vec::new();
        for o in out {
            match o {
                rejoin::Output::Ask { op, peer } => {
                    asked.push(peer);
                    let input = if asked.len() % 2 == 0 {
                        rejoin::Input::Failed { op }
                    } else {
                        rejoin::Input::Answered {
                            op,
                            response: JoinResponse::Rejected(JoinRejection::Busy),
                        }
                    };
                    next.extend(c.handle(now, input));
                }
                rejoin::Output::ScheduleTimer { at } if at == now + REJOIN_RETRY_MS => {
                    rounds_paused += 1;
                    now = at;
                    next.extend(c.handle(now, rejoin::Input::Timer));
                }
                rejoin::Output::Done(ok) => {
                    assert!(!ok);
                    assert_eq!(asked.len(), 3 * REJOIN_ROUNDS as usize);
                    assert_eq!(&asked[..3], &sorted[..], "sorted, without duplicates");
                    assert_eq!(&asked[3..6], &sorted[..]);
                    assert_eq!(rounds_paused, REJOIN_ROUNDS - 1);
                    assert!(c.is_done());
                    return;
                }
                _ => {}
            }
        }
        assert!(!next.is_empty(), "the rejoin stalled");
        out = next;
    }
}

#[test]
fn rejoin_uses_the_first_answer_that_works_and_skips_a_silent_member() {
    let (mut c, out) = RejoinClient::start(vec![peer(2), peer(3)], 0);
    let first = match &out[..] {
        [
            rejoin::Output::Ask { op, .. },
            rejoin::Output::ScheduleTimer { at },
            ..,
        ] => {
            assert_eq!(*at, rejoin::ASK_TIMEOUT_MS);
            *op
        }
        other => panic!("{other:?}"),
    };
    // Silent: the timer moves on to the next member; its late answer is ignored.
    let out = c.handle(rejoin::ASK_TIMEOUT_MS, rejoin::Input::Timer);
    let second = match &out[0] {
        rejoin::Output::Ask { op, .. } => *op,
        other => panic!("{other:?}"),
    };
    assert!(
        c.handle(
            rejoin::ASK_TIMEOUT_MS + 1,
            rejoin::Input::Answered {
                op: first,
                response: admitted()
            }
        )
        .is_empty()
    );
    let out = c.handle(
        rejoin::ASK_TIMEOUT_MS + 2,
        rejoin::Input::Answered {
            op: second,
            response: admitted(),
        },
    );
    assert!(matches!(&out[0], rejoin::Output::Use { op, .. } if *op == second));
    let out = c.handle(
        rejoin::ASK_TIMEOUT_MS + 3,
        rejoin::Input::Used {
            op: second,
            ok: true,
        },
    );
    assert_eq!(out, vec![rejoin::Output::Done(true)]);
}

#[test]
fn admission_holds_retries_and_admits() {
    use crate::group::{GroupEngine, Identity, NewInvite};
    use openmls_rust_crypto::OpenMlsRustCrypto;
    let now = crate::testing::T0_MS;
    let mut member = GroupEngine::new(
        OpenMlsRustCrypto::default(),
        Identity::new(&member_key(0)).unwrap(),
        "net",
    );
    let mut joiner = GroupEngine::new(
        OpenMlsRustCrypto::default(),
        Identity::new(&member_key(1)).unwrap(),
        "net",
    );
    let g = GroupId([3; 32]);
    member.create_group(g, "g", now).unwrap();
    let make = |member: &mut GroupEngine<_>, approval: bool, n: u8| {
        let (inv, fx) = member
            .create_invite(
                g,
                NewInvite {
                    addrs: Vec::new(),
                    secret: [n; 32],
                    expires_at: now / 1000 + 3600,
                    max_uses: 1,
                    approval,
                },
                now,
            )
            .unwrap();
        let record = fx
            .iter()
            .find_map(|e| match e {
                crate::group::Effect::Invite(u) => {
                    Some(crate::invite::InviteRecord::merge(None, u))
                }
                _ => None,
            })
            .unwrap();
        (inv, record)
    };
    let mut held = HeldRequests::new();
    let from = peer(1);

    // Unknown invite: refused.
    let (inv, record) = make(&mut member, true, 1);
    let req = joiner.prepare_join(&inv, now).unwrap();
    let decided = admission::decide(
        &member,
        &mut held,
        from,
        req.clone(),
        |_| Ok::<_, String>(None),
        now,
    );
    assert!(matches!(
        decided,
        Admission::Refuse(JoinRejection::UnknownInvite)
    ));
    // The invite cannot be read: refused as internal, nothing held.
    let decided = admission::decide(&member, &mut held, from, req.clone(), |_| Err("disk"), now);
    assert!(matches!(
        decided,
        Admission::Refuse(JoinRejection::Internal)
    ));
    // Approval: held, then a retry gets "awaiting" until decided.
    let id = match admission::decide(
        &member,
        &mut held,
        from,
        req.clone(),
        |_| Ok::<_, String>(Some(record.clone())),
        now,
    ) {
        Admission::Held(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(held.get(id).unwrap().peer, from);
    let retry = admission::decide(
        &member,
        &mut held,
        from,
        req.clone(),
        |_| -> Result<_, String> { panic!("a retry reads no invite") },
        now + 1,
    );
    assert!(
        matches!(retry, Admission::Answer(JoinResponse::AwaitingApproval { request }) if request == id)
    );
    held.decide(id, HeldState::Denied, now + 2);
    let retry = admission::decide(
        &member,
        &mut held,
        from,
        req,
        |_| Ok::<_, String>(None),
        now + 3,
    );
    assert!(matches!(
        retry,
        Admission::Answer(JoinResponse::Rejected(JoinRejection::Denied))
    ));

    // No approval: admitted with the record.
    let (inv, record) = make(&mut member, false, 2);
    let req = joiner.prepare_join(&inv, now).unwrap();
    let decided = admission::decide(
        &member,
        &mut held,
        from,
        req,
        |_| Ok::<_, String>(Some(record.clone())),
        now,
    );
    let Admission::Admit(boxed) = decided else {
        panic!("{decided:?}")
    };
    let (req, rec) = *boxed;
    assert!(matches!(req, JoinRequest::V1(_)));
    assert_eq!(rec.unwrap().id, record.id);
}
