//! A split brain heals (issue 4, scenario b): ten in-process nodes in one group are cut into
//! two sides of five with block lists on both sides. Each side removes one of its own members
//! (so both sides commit for the same epoch) and sends 100 messages spread over its four
//! remaining members. Then the partition heals. One side's removal wins the epoch (lowest
//! envelope id); the other side rolls back, takes it, re-proposes its own removal and re-sends
//! its messages. Whichever side wins, all eight remaining members must end in the same epoch
//! with the same epoch authenticator and member set (both removals applied), each reading all
//! 200 messages exactly once; the two removed members read none of them.
//!
//! `KITH_SPLIT_SEED` picks which member of each side is removed and which one removes it
//! (default 1). The test prints the convergence time, measured from the last unblock until
//! every remaining member has converged and holds every message (see docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kith_client::model::GroupInfo;
use kith_tests::{InGroup, TestNode, WAIT, group_of, text_counts, wait_connected};
use libp2p::PeerId;

const SIDE: usize = 5;
const PER_SIDE: usize = 100;

fn seed() -> u64 {
    std::env::var("KITH_SPLIT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// (removed, remover) on a side of `SIDE` nodes starting at `base`, picked by `seed`.
fn victims(seed: u64, base: usize) -> (usize, usize) {
    let removed = (seed as usize + base) % SIDE;
    let remover = (removed + 1 + (seed as usize / SIDE) % (SIDE - 1)) % SIDE;
    (base + removed, base + remover)
}

/// A side's texts: `PER_SIDE` of them, spread round-robin over `senders`.
fn side_texts(side: &str, senders: &[usize]) -> Vec<(usize, String)> {
    (0..PER_SIDE)
        .map(|k| {
            let s = senders[k % senders.len()];
            (s, format!("{side} {k} from node {s}"))
        })
        .collect()
}

/// Sends `texts` (each from its node), one sender's messages in order, all senders at once.
async fn send_all(
    nodes: &[TestNode],
    group: &str,
    texts: &[(usize, String)],
) -> anyhow::Result<()> {
    let senders: BTreeSet<usize> = texts.iter().map(|(s, _)| *s).collect();
    let mut tasks = Vec::new();
    for s in senders {
        let engine = nodes[s].node.engine.clone();
        let group = group.to_owned();
        let mine: Vec<String> = texts
            .iter()
            .filter(|(from, _)| *from == s)
            .map(|(_, t)| t.clone())
            .collect();
        tasks.push(tokio::spawn(async move {
            for t in mine {
                engine.in_group(&group, move |e, g| e.send(g, &t)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One look at the remaining members: `Ok(())` when all agree on epoch, authenticator and
/// member set, the set is `want_members`, and each holds every text of `want` exactly once.
async fn converged_once(
    nodes: &[TestNode],
    members: &[usize],
    group: &str,
    want_members: &BTreeSet<String>,
    want: &[String],
) -> anyhow::Result<Result<Vec<GroupInfo>, String>> {
    let mut views = Vec::new();
    for &i in members {
        let g = nodes[i]
            .node
            .engine
            .in_group(group, |e, g| e.show_group(g))
            .await?;
        let set: BTreeSet<String> = g.members.iter().map(|m| m.peer_id.clone()).collect();
        if &set != want_members {
            return Ok(Err(format!(
                "node {i} ({}) at epoch {} lists {} members",
                nodes[i].node.peer_id,
                g.epoch,
                set.len()
            )));
        }
        views.push(g);
    }
    let first = (&views[0].epoch, &views[0].epoch_auth);
    if let Some((k, v)) = views
        .iter()
        .enumerate()
        .find(|(_, v)| (&v.epoch, &v.epoch_auth) != first)
    {
        return Ok(Err(format!(
            "node {} at epoch {} ({}), node {} at epoch {} ({})",
            members[0], first.0, first.1, members[k], v.epoch, v.epoch_auth
        )));
    }
    for &i in members {
        let counts = text_counts(&nodes[i], group).await?;
        let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
        if !twice.is_empty() {
            // A re-sent message replaces its first copy; two copies is a bug, not a delay.
            anyhow::bail!("node {i} shows messages more than once: {twice:?}");
        }
        let missing: Vec<&String> = want.iter().filter(|t| !counts.contains_key(*t)).collect();
        if !missing.is_empty() {
            return Ok(Err(format!(
                "node {i} lacks {} messages, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(4)]
            )));
        }
        if counts.len() != want.len() {
            anyhow::bail!("node {i} shows texts nobody sent: {counts:?}");
        }
    }
    Ok(Ok(views))
}

/// Polls [`converged_once`] until it holds, failing after [`WAIT`].
async fn converged(
    nodes: &[TestNode],
    members: &[usize],
    group: &str,
    want_members: &BTreeSet<String>,
    want: &[String],
) -> anyhow::Result<Vec<GroupInfo>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match converged_once(nodes, members, group, want_members, want).await? {
            Ok(views) => return Ok(views),
            Err(why) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("members {members:?} did not converge within {WAIT:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_sides_of_a_split_change_membership_and_talk_then_converge() -> anyhow::Result<()> {
    let seed = seed();
    let dirs: Vec<_> = (0..2 * SIDE)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let (nodes, group) = group_of(&dirs, "split brain").await?;
    let g = group.id.clone();
    let peers: Vec<PeerId> = nodes.iter().map(|n| n.node.peer_id).collect();
    let all: Vec<usize> = (0..2 * SIDE).collect();
    let everyone: BTreeSet<String> = peers.iter().map(ToString::to_string).collect();
    let (left, right): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| i < SIDE);
    // Everyone at the epoch of the last join, in one branch, before the split.
    let start = converged(&nodes, &all, &g, &everyone, &[]).await?;
    let epoch = start[0].epoch;
    for side in [&left, &right] {
        kith_tests::wait_mesh(&side.iter().map(|&i| &nodes[i]).collect::<Vec<_>>()).await?;
    }

    // Split 5 | 5, blocked on both sides, and check that no connection crosses it.
    for (mine, theirs) in [(&left, &right), (&right, &left)] {
        for &i in mine {
            let blocked: Vec<PeerId> = theirs.iter().map(|&j| peers[j]).collect();
            nodes[i].node.net.set_blocked(blocked).await?;
        }
    }
    for (mine, theirs) in [(&left, &right), (&right, &left)] {
        let other: Vec<PeerId> = theirs.iter().map(|&j| peers[j]).collect();
        for &i in mine {
            wait_connected(
                &nodes[i],
                &format!("node {i} to lose the other side"),
                |c| !c.iter().any(|p| other.contains(p)),
            )
            .await?;
        }
    }

    // Each side removes one of its own members, for the same epoch.
    let (l_gone, l_remover) = victims(seed, 0);
    let (r_gone, r_remover) = victims(seed, SIDE);
    eprintln!(
        "seed {seed}: node {l_remover} removes node {l_gone}, node {r_remover} removes node {r_gone}"
    );
    let (a, b) = tokio::join!(
        nodes[l_remover].node.engine.in_group(&g, {
            let peer = peers[l_gone];
            move |e, g| e.remove_member(g, peer)
        }),
        nodes[r_remover].node.engine.in_group(&g, {
            let peer = peers[r_gone];
            move |e, g| e.remove_member(g, peer)
        }),
    );
    assert_eq!(a?.epoch, epoch + 1);
    assert_eq!(b?.epoch, epoch + 1);
    let l_stay: Vec<usize> = left.iter().copied().filter(|&i| i != l_gone).collect();
    let r_stay: Vec<usize> = right.iter().copied().filter(|&i| i != r_gone).collect();
    let members_without = |gone: &[usize]| -> BTreeSet<String> {
        all.iter()
            .filter(|i| !gone.contains(i))
            .map(|&i| peers[i].to_string())
            .collect()
    };

    // Every member of a side has merged its removal before the side talks: a message sent
    // before its sender saw the removal is from the old epoch, and the removed member may
    // read it.
    converged(&nodes, &l_stay, &g, &members_without(&[l_gone]), &[]).await?;
    converged(&nodes, &r_stay, &g, &members_without(&[r_gone]), &[]).await?;

    // Each side talks: 100 messages over its four remaining members, read by its side.
    let l_texts = side_texts("left", &l_stay);
    let r_texts = side_texts("right", &r_stay);
    let (a, b) = tokio::join!(
        send_all(&nodes, &g, &l_texts),
        send_all(&nodes, &g, &r_texts)
    );
    a?;
    b?;
    let l_want: Vec<String> = l_texts.iter().map(|(_, t)| t.clone()).collect();
    let r_want: Vec<String> = r_texts.iter().map(|(_, t)| t.clone()).collect();
    let l_side = converged(&nodes, &l_stay, &g, &members_without(&[l_gone]), &l_want).await?;
    let r_side = converged(&nodes, &r_stay, &g, &members_without(&[r_gone]), &r_want).await?;
    assert_ne!(
        l_side[0].epoch_auth, r_side[0].epoch_auth,
        "the two sides forked"
    );
    // Nothing crossed the split.
    for &i in &l_stay {
        let counts = text_counts(&nodes[i], &g).await?;
        assert!(!r_want.iter().any(|t| counts.contains_key(t)), "node {i}");
    }

    // Heal, one node after another as a driver would; the clock starts at the last unblock.
    for n in &nodes {
        n.node.net.set_blocked(vec![]).await?;
    }
    let healed = Instant::now();
    let stay: Vec<usize> = l_stay.iter().chain(&r_stay).copied().collect();
    let want: Vec<String> = l_want.iter().chain(&r_want).cloned().collect();
    let views = converged(
        &nodes,
        &stay,
        &g,
        &members_without(&[l_gone, r_gone]),
        &want,
    )
    .await?;
    let took = healed.elapsed();
    // Both removals: the winner's, then the loser's re-proposal.
    assert_eq!(views[0].epoch, epoch + 2, "{views:?}");
    let mut rollbacks = (0, 0);
    for (&i, v) in stay.iter().zip(&views) {
        assert_eq!(v.deep_forks, 0, "node {i}");
        if i < SIDE {
            rollbacks.0 += v.rollbacks;
        } else {
            rollbacks.1 += v.rollbacks;
        }
    }
    // The two sides learned of each other's branch from history sync summaries.
    let seen: u64 = views.iter().map(|v| v.forks_detected).sum();
    assert!(
        seen > 0,
        "no member saw the fork in a sync summary: {views:?}"
    );
    let loser = match rollbacks {
        (0, r) if r > 0 => "right",
        (l, 0) if l > 0 => "left",
        other => anyhow::bail!("expected exactly one side to roll back: {other:?}"),
    };
    eprintln!(
        "converged {:.2} s after the heal: epoch {}, {} members, {} messages on each; the {loser} side rolled back ({rollbacks:?})",
        took.as_secs_f64(),
        views[0].epoch,
        views[0].members.len(),
        want.len()
    );

    // The removed members read nothing sent after their removal, on either side.
    for gone in [l_gone, r_gone] {
        let v = nodes[gone]
            .node
            .engine
            .in_group(&g, |e, g| e.show_group(g))
            .await?;
        assert!(!v.active, "node {gone} is not a member: {v:?}");
        let counts = text_counts(&nodes[gone], &g).await?;
        assert!(counts.is_empty(), "node {gone} read {counts:?}");
    }
    for n in nodes {
        n.node.shutdown().await;
    }
    Ok(())
}
