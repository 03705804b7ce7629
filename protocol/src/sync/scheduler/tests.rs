//! The scheduler driven directly: inputs in, outputs checked.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;
use crate::sync::{SyncPageV1, SyncPageV2};

fn peer(i: u8) -> PeerId {
    libp2p_identity::Keypair::ed25519_from_bytes([i; 32])
        .unwrap()
        .public()
        .to_peer_id()
}

fn group(i: u8) -> GroupId {
    GroupId([i; 32])
}

/// A world where every group has the given connected members and nothing is stored.
struct World {
    members: BTreeMap<GroupId, Vec<PeerId>>,
    writable: bool,
}

impl World {
    fn new(groups: &[(GroupId, Vec<PeerId>)]) -> Self {
        World {
            members: groups.iter().cloned().collect(),
            writable: true,
        }
    }
}

impl Context for World {
    fn writable(&mut self) -> bool {
        self.writable
    }
    fn candidates(&mut self, group: &GroupId) -> Option<Vec<PeerId>> {
        self.members.get(group).cloned()
    }
    fn holdings(&mut self, _: &GroupId) -> Option<(Holdings, Summary)> {
        let h = Holdings::new(std::iter::empty());
        let s = h.summary();
        Some((h, s))
    }
}

fn requests(out: &[Output]) -> Vec<(PeerId, RequestId, SyncRequest)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request { peer, id, request } => Some((*peer, *id, (**request).clone())),
            _ => None,
        })
        .collect()
}

fn one_request(out: &[Output]) -> (PeerId, RequestId, SyncRequest) {
    let r = requests(out);
    assert_eq!(r.len(), 1, "{out:?}");
    r.into_iter().next().unwrap()
}

fn last_page(envelopes: Vec<Vec<u8>>) -> SyncResponse {
    SyncResponse::V2(SyncPageV2 {
        envelopes,
        next: None,
        complete: true,
        partial: Vec::new(),
    })
}

fn envelope(g: GroupId, epoch: u64, kind: PayloadKind, n: u8) -> Vec<u8> {
    Envelope::new(g, epoch, kind, vec![n; 8])
        .encode()
        .unwrap()
        .0
}

fn ended(out: &[Output]) -> Option<bool> {
    out.iter().find_map(|o| match o {
        Output::RunEnded { complete, .. } => Some(*complete),
        _ => None,
    })
}

/// Fails one run of `g` (the only member does not answer, on version 2 nor on 1).
fn fail_run(s: &mut SyncScheduler, w: &mut World, now: Millis, trigger: Trigger, g: GroupId) {
    let out = s.handle(now, Input::Sync { group: g, trigger }, w);
    let (_, id, _) = one_request(&out);
    let out = s.handle(
        now,
        Input::RequestFailed {
            id,
            failure: RequestFailure::Unanswered,
        },
        w,
    );
    let (_, id, req) = one_request(&out);
    assert!(matches!(req, SyncRequest::V1(_)), "retried with version 1");
    let out = s.handle(
        now,
        Input::RequestFailed {
            id,
            failure: RequestFailure::Unanswered,
        },
        w,
    );
    assert_eq!(ended(&out), Some(false));
}

#[test]
fn failing_syncs_back_off_up_to_five_minutes() {
    assert_eq!(sync_backoff(0), Duration::ZERO);
    assert_eq!(sync_backoff(1), SYNC_DEBOUNCE);
    assert_eq!(sync_backoff(2), SYNC_DEBOUNCE * 2);
    assert_eq!(sync_backoff(4), SYNC_DEBOUNCE * 8);
    assert_eq!(sync_backoff(7), MAX_SYNC_BACKOFF);
    assert_eq!(sync_backoff(u32::MAX), MAX_SYNC_BACKOFF);
}

#[test]
fn fetched_envelopes_are_read_epoch_by_epoch_commits_last() {
    let e = |epoch: u64, commit: bool, n: u8| (epoch, commit, n as usize, vec![n]);
    // As a responder sends them: commits, whole epochs, then a partial older epoch.
    let fetched = vec![
        e(3, true, 0),
        e(4, true, 1),
        e(4, false, 2),
        e(5, false, 3),
        e(3, false, 4),
        e(4, false, 5),
    ];
    assert_eq!(
        sort_fetched(fetched),
        vec![vec![4], vec![0], vec![2], vec![5], vec![1], vec![3]]
    );
}

#[test]
fn a_run_holds_fetches_sorted_and_ends_the_hold_in_time() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let out = s.handle(
        0,
        Input::PeerConnected {
            peer: peer(2),
            groups: vec![g],
        },
        &mut w,
    );
    assert_eq!(out[0], Output::BeginHold { group: g });
    let (p, id, req) = one_request(&out);
    assert_eq!(p, peer(2));
    assert!(matches!(
        req,
        SyncRequest::V2(SyncRequestV2 {
            want: Want::Summary(_),
            ..
        })
    ));
    assert!(s.is_running(&g));
    // Two pages: the second repeats an envelope of the first.
    let commit = envelope(g, 3, PayloadKind::Commit, 1);
    let app = envelope(g, 3, PayloadKind::Application, 2);
    let later = envelope(g, 4, PayloadKind::Application, 3);
    let out = s.handle(
        10,
        Input::Response {
            id,
            response: SyncResponse::V2(SyncPageV2 {
                envelopes: vec![commit.clone(), later.clone()],
                next: Some(Cursor::AfterCommit {
                    epoch: 3,
                    id: MessageId::of(&commit),
                }),
                complete: false,
                partial: Vec::new(),
            }),
        },
        &mut w,
    );
    let (_, id, _) = one_request(&out);
    let out = s.handle(
        20,
        Input::Response {
            id,
            response: last_page(vec![app.clone(), commit.clone()]),
        },
        &mut w,
    );
    assert_eq!(
        out,
        vec![
            Output::Ingest {
                group: g,
                envelopes: vec![app, commit, later]
            },
            Output::EndHold {
                group: g,
                in_time: true
            },
            Output::RunEnded {
                group: g,
                complete: true,
                started: 0
            },
        ]
    );
    assert!(!s.is_running(&g) && !s.is_unsynced(&g) && s.failures(&g) == 0);
}

#[test]
fn failures_back_off_and_a_success_resets_them() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let mut now = 0;
    fail_run(&mut s, &mut w, now, Trigger::Gap, g);
    assert_eq!(s.failures(&g), 1);
    // 5 s of back-off (not the 1 s gap debounce).
    let out = s.handle(
        now + 4_999,
        Input::Sync {
            group: g,
            trigger: Trigger::Gap,
        },
        &mut w,
    );
    assert!(out.is_empty(), "{out:?}");
    now += 5_000;
    fail_run(&mut s, &mut w, now, Trigger::Gap, g);
    assert_eq!(s.failures(&g), 2);
    // The flush tick retries a failed group, but only once its back-off (10 s) is over.
    let tick = || Input::Tick {
        holding: Vec::new(),
        stale: Vec::new(),
    };
    assert!(s.handle(now + 9_999, tick(), &mut w).is_empty());
    let out = s.handle(now + 10_000, tick(), &mut w);
    let (_, id, _) = one_request(&out);
    let out = s.handle(
        now + 10_000,
        Input::Response {
            id,
            response: last_page(Vec::new()),
        },
        &mut w,
    );
    assert_eq!(ended(&out), Some(true));
    assert_eq!(s.failures(&g), 0);
    assert!(!s.is_unsynced(&g));
}

#[test]
fn backoff_is_capped_at_five_minutes() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let mut now = 0;
    for _ in 0..10 {
        fail_run(&mut s, &mut w, now, Trigger::Routine, g);
        now += ms(MAX_SYNC_BACKOFF);
    }
    assert_eq!(s.failures(&g), 10);
    let out = s.handle(
        now - 1,
        Input::Sync {
            group: g,
            trigger: Trigger::Routine,
        },
        &mut w,
    );
    assert!(out.is_empty());
}

#[test]
fn a_member_that_connects_bypasses_the_backoff() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2), peer(3)])]);
    let mut s = SyncScheduler::new(7);
    // Three failures: 20 s of back-off. Both members fail each run.
    for k in 0..3u64 {
        let now = k * 100_000;
        let mut out = s.handle(
            now,
            Input::Sync {
                group: g,
                trigger: Trigger::Gap,
            },
            &mut w,
        );
        while ended(&out).is_none() {
            let (_, id, _) = one_request(&out);
            out = s.handle(
                now,
                Input::Response {
                    id,
                    response: SyncResponse::Refused(SyncRefusal::Unavailable),
                },
                &mut w,
            );
        }
        assert_eq!(ended(&out), Some(false));
    }
    let now = 200_000 + 1_000;
    assert!(
        s.handle(
            now,
            Input::Sync {
                group: g,
                trigger: Trigger::Gap
            },
            &mut w
        )
        .is_empty()
    );
    // The member that connects is asked now (1 s after the last start), first.
    let out = s.handle(
        now,
        Input::PeerConnected {
            peer: peer(3),
            groups: vec![g],
        },
        &mut w,
    );
    let (p, _, _) = one_request(&out);
    assert_eq!(p, peer(3));
}

#[test]
fn newcomers_are_all_asked_even_after_a_complete_answer() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2), peer(3), peer(4)])]);
    let mut s = SyncScheduler::new(7);
    // A run is going on when two members connect.
    let out = s.handle(
        0,
        Input::Sync {
            group: g,
            trigger: Trigger::Routine,
        },
        &mut w,
    );
    let (_, id, _) = one_request(&out);
    for p in [peer(3), peer(4)] {
        let out = s.handle(
            10,
            Input::PeerConnected {
                peer: p,
                groups: vec![g],
            },
            &mut w,
        );
        assert!(out.is_empty());
    }
    let out = s.handle(
        20,
        Input::Response {
            id,
            response: last_page(Vec::new()),
        },
        &mut w,
    );
    assert_eq!(ended(&out), Some(true));
    // The next tick (past the gap debounce) asks both, one after the other.
    let out = s.handle(
        1_000,
        Input::Tick {
            holding: Vec::new(),
            stale: Vec::new(),
        },
        &mut w,
    );
    let (p, id, _) = one_request(&out);
    assert_eq!(p, peer(3));
    let out = s.handle(
        1_010,
        Input::Response {
            id,
            response: last_page(Vec::new()),
        },
        &mut w,
    );
    let (p, id, _) = one_request(&out);
    assert_eq!(p, peer(4));
    let out = s.handle(
        1_020,
        Input::Response {
            id,
            response: last_page(Vec::new()),
        },
        &mut w,
    );
    assert_eq!(ended(&out), Some(true));
}

#[test]
fn rate_limited_pages_are_retried_four_times_then_the_next_member_is_asked() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2), peer(3)])]);
    let mut s = SyncScheduler::new(0);
    let out = s.handle(
        0,
        Input::Sync {
            group: g,
            trigger: Trigger::Routine,
        },
        &mut w,
    );
    let (first, mut id, _) = one_request(&out);
    let mut now = 0;
    for attempt in 1..=4u64 {
        let out = s.handle(
            now,
            Input::Response {
                id,
                response: SyncResponse::Refused(SyncRefusal::RateLimited),
            },
            &mut w,
        );
        let at = now + 140 * attempt;
        assert_eq!(out, vec![Output::ScheduleTimer { at }]);
        // Too early: nothing.
        assert!(s.handle(at - 1, Input::Timer, &mut w).is_empty());
        now = at;
        let out = s.handle(now, Input::Timer, &mut w);
        let (p, next, _) = one_request(&out);
        assert_eq!(p, first);
        id = next;
    }
    let out = s.handle(
        now,
        Input::Response {
            id,
            response: SyncResponse::Refused(SyncRefusal::RateLimited),
        },
        &mut w,
    );
    let (p, _, _) = one_request(&out);
    assert_ne!(p, first, "the other member is asked");
}

#[test]
fn a_failing_group_never_delays_another_groups_sync() {
    let (a, b) = (group(1), group(2));
    let mut w = World::new(&[(a, vec![peer(2)]), (b, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    // Group a has failed many times and is backing off for minutes.
    let mut now = 0;
    for _ in 0..6 {
        fail_run(&mut s, &mut w, now, Trigger::Gap, a);
        now += ms(sync_backoff(s.failures(&a)));
    }
    // A run of a is waiting out a rate-limited page of the same member.
    let out = s.handle(
        now,
        Input::Sync {
            group: a,
            trigger: Trigger::Newcomer,
        },
        &mut w,
    );
    let (_, id_a, _) = one_request(&out);
    let out = s.handle(
        now,
        Input::Response {
            id: id_a,
            response: SyncResponse::Refused(SyncRefusal::RateLimited),
        },
        &mut w,
    );
    assert!(matches!(out[..], [Output::ScheduleTimer { .. }]));
    // Group b syncs at once, every time it is asked to, and completes.
    for k in 0..3u64 {
        let t = now + k * ms(SYNC_INTERVAL);
        let out = s.handle(t, Input::SyncAll { groups: vec![a, b] }, &mut w);
        let reqs = requests(&out);
        assert!(
            reqs.iter().all(|(_, _, r)| *r.group() == b),
            "only b starts: {out:?}"
        );
        let (_, id_b, _) = one_request(&out);
        let out = s.handle(
            t,
            Input::Response {
                id: id_b,
                response: last_page(Vec::new()),
            },
            &mut w,
        );
        assert_eq!(ended(&out), Some(true));
        assert_eq!(s.failures(&b), 0);
    }
    assert!(s.failures(&a) >= 6);
}

#[test]
fn stale_holds_end_unless_a_run_still_receives_pages() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let out = s.handle(
        0,
        Input::Sync {
            group: g,
            trigger: Trigger::Gap,
        },
        &mut w,
    );
    let (_, mut id, _) = one_request(&out);
    let stale = |g| Input::Tick {
        holding: vec![g],
        stale: vec![g],
    };
    // Pages keep coming every 20 s: the hold goes on past 30 s.
    let page = |n: u8, epoch| {
        SyncResponse::V1(SyncPageV1 {
            envelopes: vec![envelope(g, epoch, PayloadKind::Application, n)],
            next: Some(Cursor::AfterCommit {
                epoch,
                id: MessageId([n; 32]),
            }),
            complete: false,
        })
    };
    let mut now = 0;
    let mut n = 0u8;
    while now < ms(MAX_CATCH_UP_RUN) - 20_000 {
        now += 20_000;
        n += 1;
        let out = s.handle(
            now,
            Input::Response {
                id,
                response: page(n, 1),
            },
            &mut w,
        );
        id = one_request(&out).1;
        assert!(s.handle(now, stale(g), &mut w).is_empty());
    }
    // Past the longest run, the hold ends: what came so far is read first.
    now = ms(MAX_CATCH_UP_RUN);
    let out = s.handle(now, stale(g), &mut w);
    assert!(matches!(&out[0], Output::Ingest { envelopes, .. } if envelopes.len() == n as usize));
    assert_eq!(
        out[1],
        Output::EndHold {
            group: g,
            in_time: false
        }
    );
    assert!(s.is_running(&g), "the run goes on");

    // A run whose member went silent for 30 s loses its hold sooner.
    let h = group(2);
    w.members.insert(h, vec![peer(3)]);
    let out = s.handle(
        now,
        Input::Sync {
            group: h,
            trigger: Trigger::Gap,
        },
        &mut w,
    );
    one_request(&out);
    assert!(s.handle(now + 29_999, stale(h), &mut w).is_empty());
    let out = s.handle(now + 30_000, stale(h), &mut w);
    assert_eq!(
        out,
        vec![Output::EndHold {
            group: h,
            in_time: false
        }]
    );
}

#[test]
fn a_released_hold_is_not_taken_again_by_the_same_tick() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let out = s.handle(
        0,
        Input::Tick {
            holding: vec![g],
            stale: vec![g],
        },
        &mut w,
    );
    assert_eq!(
        out,
        vec![Output::EndHold {
            group: g,
            in_time: false
        }]
    );
    // Still holding (nobody released it yet) but not stale: a run starts.
    let out = s.handle(
        500,
        Input::Tick {
            holding: vec![g],
            stale: Vec::new(),
        },
        &mut w,
    );
    assert_eq!(out[0], Output::BeginHold { group: g });
}

#[test]
fn a_gap_during_a_run_starts_another_when_it_ends() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let out = s.handle(
        0,
        Input::Sync {
            group: g,
            trigger: Trigger::Routine,
        },
        &mut w,
    );
    let (_, id, _) = one_request(&out);
    let out = s.handle(
        10,
        Input::FutureEpoch {
            group: g,
            seen_epoch: 5,
            current_epoch: 3,
        },
        &mut w,
    );
    assert!(out.is_empty());
    let out = s.handle(
        20,
        Input::Response {
            id,
            response: last_page(Vec::new()),
        },
        &mut w,
    );
    assert_eq!(ended(&out), Some(true));
    assert!(
        matches!(out.last(), Some(Output::Request { .. })),
        "{out:?}"
    );
}

#[test]
fn nothing_starts_while_the_store_cannot_be_written_or_nobody_is_connected() {
    let g = group(1);
    let mut w = World::new(&[(g, Vec::new())]);
    let mut s = SyncScheduler::new(7);
    assert!(
        s.handle(0, Input::SyncAll { groups: vec![g] }, &mut w)
            .is_empty()
    );
    w.members.insert(g, vec![peer(2)]);
    w.writable = false;
    assert!(
        s.handle(0, Input::SyncAll { groups: vec![g] }, &mut w)
            .is_empty()
    );
    w.writable = true;
    assert!(
        !s.handle(0, Input::SyncAll { groups: vec![g] }, &mut w)
            .is_empty()
    );
}

#[test]
fn a_not_member_refusal_is_reported() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let out = s.handle(
        0,
        Input::Sync {
            group: g,
            trigger: Trigger::Routine,
        },
        &mut w,
    );
    let (_, id, _) = one_request(&out);
    let out = s.handle(
        0,
        Input::Response {
            id,
            response: SyncResponse::Refused(SyncRefusal::NotMember),
        },
        &mut w,
    );
    assert_eq!(out[0], Output::NotAMember { group: g });
    assert_eq!(ended(&out), Some(false));
}

#[test]
fn an_incomplete_run_reads_only_the_epochs_before_its_first_range_answer() {
    let item = |epoch: u64, commit: bool, n: u8| (epoch, commit, n as usize, vec![n; 8]);
    let mut collected = vec![
        item(3, false, 1),
        item(3, true, 2),
        item(4, false, 3),
        item(4, true, 4),
        item(5, false, 5),
    ];
    let none = HashSet::new();
    let mut untouched = collected.clone();
    assert_eq!(keep_before_first_ranged(&mut untouched, &none), None);
    assert_eq!(untouched, collected);
    // A range answer in epoch 4: epoch 3 is read; epoch 4 (its messages and the commit
    // leaving it) and 5 wait for the next run.
    let ranged: HashSet<MessageId> = [MessageId::of(&[3; 8])].into_iter().collect();
    assert_eq!(
        keep_before_first_ranged(&mut collected, &ranged),
        Some((4, 3))
    );
    assert_eq!(collected, vec![item(3, false, 1), item(3, true, 2)]);
}

#[test]
fn only_a_catch_up_holds_live_messages() {
    let g = group(1);
    let mut w = World::new(&[(g, vec![peer(2)])]);
    let mut s = SyncScheduler::new(7);
    let holds = |out: &[Output]| out.contains(&Output::BeginHold { group: g });
    // Completes a run started by `input` at `now`; says whether it held live messages.
    let run = |s: &mut SyncScheduler, w: &mut World, now: Millis, input: Input| -> bool {
        let out = s.handle(now, input, w);
        let held = holds(&out);
        let (_, id, _) = one_request(&out);
        let out = s.handle(
            now + 10,
            Input::Response {
                id,
                response: last_page(Vec::new()),
            },
            w,
        );
        assert_eq!(ended(&out), Some(true));
        held
    };
    let routine = || Input::SyncAll { groups: vec![g] };
    let minute = 60_000;
    // The first run since the start holds: this node cannot tell yet what it lacks.
    assert!(run(&mut s, &mut w, 0, routine()));
    // Caught up: the next routine run and a member connecting do not hold.
    assert!(!run(&mut s, &mut w, minute, routine()));
    let connected = Input::PeerConnected {
        peer: peer(2),
        groups: vec![g],
    };
    assert!(!run(&mut s, &mut w, 2 * minute, connected));
    // Nor does a known gap (the engine holds what must wait itself).
    let gap = Input::Sync {
        group: g,
        trigger: Trigger::Gap,
    };
    assert!(!run(&mut s, &mut w, 3 * minute, gap));
    // After a wake-up, or a store that recovered, the first run holds again.
    let woke = Input::Woke { groups: vec![g] };
    assert!(run(&mut s, &mut w, 4 * minute, woke));
    assert!(!run(&mut s, &mut w, 5 * minute, routine()));
    let recovered = Input::Recovered { groups: vec![g] };
    assert!(run(&mut s, &mut w, 6 * minute, recovered));
    assert!(!run(&mut s, &mut w, 7 * minute, routine()));
}
