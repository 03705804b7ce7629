//! Two people behind home routers (issue 12), on real NATs the test builds itself: network
//! namespaces joined by veth pairs, iptables masquerading in each home router, and one public
//! Kith node that is a member of no group and only relays (see `kith_testnet::natlab`).
//!
//! Each test makes its own lab and removes it at the end, also on failure. Where namespaces
//! cannot be made (not root, no iproute2/iptables) each test prints `skipped: <why>` and
//! passes; `.ci/run` installs the tools, and CI runs as root.
//!
//! Nodes run as real `kith run` processes inside their namespaces; the test talks to their
//! APIs from threads that entered those namespaces.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kith_client::model::{CreateInviteRequest, MessageBody, ReachInfo};
use kith_testnet::natlab::{Lab, Nat};
use kith_testnet::natnet::NatNet;
use kith_testnet::procs::Sig;

/// Time for a node to hold a relay reservation, or for a hole punch to happen.
const REACH: Duration = Duration::from_secs(60);
/// Time for a message to show up on another member.
const DELIVER: Duration = Duration::from_secs(60);

/// The lab of `kith_testnet::natnet::two_homes` (a public relay, node 0, and two homes
/// behind `nats`, nodes 1 and 2); `None` (after saying why) where labs cannot run.
async fn two_homes(nats: [Nat; 2], root: &std::path::Path) -> Option<NatNet> {
    if let Err(why) = Lab::available() {
        kith_testnet::natlab::say_skipped(&why);
        return None;
    }
    let kith = kith_tests::kith_bin().unwrap();
    Some(
        kith_testnet::natnet::two_homes(nats, &kith, root)
            .await
            .unwrap(),
    )
}

/// Texts of `group` in node `i`'s history.
async fn texts(net: &NatNet, i: usize, group: &str) -> Vec<String> {
    let g = group.to_owned();
    let history = net
        .call(i, "history", move |c| async move {
            c.history(&g, Some(1000)).await
        })
        .await
        .unwrap();
    history
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text { text } => Some(text),
            _ => None,
        })
        .collect()
}

/// Sends `text` from node `i`.
async fn send(net: &NatNet, i: usize, group: &str, text: &str) {
    let (g, t) = (group.to_owned(), text.to_owned());
    net.call(i, "send", move |c| async move { c.send(&g, &t).await })
        .await
        .unwrap();
}

/// Waits until node `i` shows every one of `want` in `group`.
async fn wait_texts(net: &NatNet, i: usize, group: &str, want: &[&str]) {
    wait_texts_within(net, i, group, want, DELIVER).await
}

/// [`wait_texts`] with another time limit.
async fn wait_texts_within(net: &NatNet, i: usize, group: &str, want: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let have = texts(net, i, group).await;
        if want.iter().all(|w| have.iter().any(|h| h == w)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} lacks some of {want:?} after {limit:?}; has {have:?}; logs in {}",
            net.nodes[i].dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node 1 creates a group and node 2 joins it by link; returns the group id and the time
/// from `join` to the first message node 2 read.
async fn join_and_greet(net: &NatNet) -> (String, Duration) {
    for i in [1, 2] {
        let s = net.wait_relayed(i, REACH).await.unwrap();
        let ReachInfo::Relayed { relays } = &s.reach else {
            unreachable!()
        };
        assert!(
            relays.iter().any(|r| r.peer == net.nodes[0].peer_id),
            "node {i} reserved on the public node: {relays:?}"
        );
    }
    let relay_s = net.status(0).await.unwrap();
    assert!(
        matches!(relay_s.reach, ReachInfo::Direct { .. }),
        "the public node is directly reachable: {:?}",
        relay_s.reach
    );
    let group = net
        .call(1, "create group", |c| async move {
            c.create_group("behind routers").await
        })
        .await
        .unwrap();
    let g = group.id.clone();
    let invite = net
        .call(1, "invite", move |c| async move {
            c.create_invite(&g, &CreateInviteRequest::default()).await
        })
        .await
        .unwrap();
    assert!(
        invite.leaves_lan,
        "the link works beyond the LAN: {invite:?}"
    );
    assert_eq!(invite.addrs[0].scope, "relayed", "{:?}", invite.addrs);
    assert!(
        invite.addrs.iter().all(|a| a.scope != "public"),
        "a NATed node has no public address of its own: {:?}",
        invite.addrs
    );
    send(net, 1, &group.id, "hello before you came").await;
    let started = Instant::now();
    let link = invite.link.clone();
    let joined = net
        .call(2, "join", move |c| async move { c.join(&link, None).await })
        .await
        .unwrap();
    assert_eq!(joined.id, group.id);
    send(net, 1, &group.id, "welcome, bob").await;
    wait_texts(net, 2, &group.id, &["welcome, bob"]).await;
    let first = started.elapsed();
    send(net, 2, &group.id, "thanks, ann").await;
    wait_texts(net, 1, &group.id, &["thanks, ann"]).await;
    (group.id, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_behind_cone_nats_join_chat_punch_through_and_survive_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut net) = two_homes([Nat::Cone, Nat::Cone], root.path()).await else {
        return;
    };
    let (group, first) = join_and_greet(&net).await;
    eprintln!("join to first message across two cone NATs: {first:?}");

    // The hole punch: both homes end up directly connected, nothing left on the relay.
    for i in [1, 2] {
        net.wait_status(i, "to reach the other home directly", REACH, |s| {
            s.relayed_peers == 0 && s.connected_peers >= 2
        })
        .await
        .unwrap();
    }
    let peers = net
        .call(1, "peers", |c| async move { c.peers().await })
        .await
        .unwrap();
    assert!(
        peers.peers.contains(&net.nodes[2].peer_id),
        "ann connects to bob: {peers:?}"
    );

    // History sync across the NATs: bob is away while ann writes, then catches up.
    net.stop(2, Sig::Term).await.unwrap();
    for k in 0..3 {
        send(&net, 1, &group, &format!("while you were away {k}")).await;
    }
    net.restart(2).await.unwrap();
    wait_texts(
        &net,
        2,
        &group,
        &[
            "while you were away 0",
            "while you were away 1",
            "while you were away 2",
        ],
    )
    .await;

    // The relay goes away for good: the direct path carries the chat on.
    for i in [1, 2] {
        net.wait_status(i, "to reach the other home directly again", REACH, |s| {
            s.relayed_peers == 0 && s.connected_peers >= 2
        })
        .await
        .unwrap();
    }
    net.stop(0, Sig::Kill).await.unwrap();
    send(&net, 1, &group, "the relay is gone").await;
    wait_texts(&net, 2, &group, &["the relay is gone"]).await;
    send(&net, 2, &group, "and we still talk").await;
    wait_texts(&net, 1, &group, &["and we still talk"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_behind_symmetric_nats_chat_through_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let Some(net) = two_homes([Nat::Symmetric, Nat::Symmetric], root.path()).await else {
        return;
    };
    let (group, first) = join_and_greet(&net).await;
    eprintln!("join to first message across two symmetric NATs: {first:?}");
    // No punch is possible: the two stay connected through the relay, and keep talking.
    let s = net.status(1).await.unwrap();
    assert!(
        s.relayed_peers >= 1,
        "ann reaches bob only through the relay: {s:?}"
    );
    for k in 0..5 {
        send(&net, 1 + k % 2, &group, &format!("relayed {k}")).await;
    }
    for i in [1, 2] {
        wait_texts(
            &net,
            i,
            &group,
            &[
                "relayed 0",
                "relayed 1",
                "relayed 2",
                "relayed 3",
                "relayed 4",
            ],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_moves_to_another_network_reconnects() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut net) = two_homes([Nat::Cone, Nat::Cone], root.path()).await else {
        return;
    };
    let (group, _) = join_and_greet(&net).await;
    let old = net.nodes[2].host.clone();
    let moved = net.lab.move_host(&old, Nat::Cone).unwrap();
    net.nodes[2].host = moved;
    eprintln!(
        "bob moved from {} to {} (seen as {})",
        old.public_addr, net.nodes[2].host.addr, net.nodes[2].host.public_addr
    );
    // Bob's node notices the change by itself: its relay reservation comes back and both
    // directions work again.
    net.wait_relayed(2, REACH).await.unwrap();
    send(&net, 1, &group, "where did you go?").await;
    wait_texts(&net, 2, &group, &["where did you go?"]).await;
    send(&net, 2, &group, "new flat, same node").await;
    // Ann's node only learns that its old connection to bob is dead from two missed pings
    // (30 s apart, 10 s timeout), then dials bob afresh through the relay.
    wait_texts_within(&net, 1, &group, &["new flat, same node"], 2 * DELIVER).await;
    drop(net.stop(2, Sig::Term).await);
}
