//! Concurrent commits between real nodes on loopback (issue 4, scenario a): five members; in
//! each of 50 rounds two of them commit a self-update at the same moment while a third
//! sends a message. Every round must end with all five in the same epoch with the same
//! epoch authenticator, both updates applied (the loser re-proposes), and no message lost
//! or shown twice.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_tests::{InGroup, TestNode, WAIT, group_of, text_counts};

/// Rounds of racing commits (`KITH_FORK_ROUNDS` overrides).
fn rounds() -> usize {
    std::env::var("KITH_FORK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Waits until every node is at `epoch` or later with one epoch authenticator; returns it.
async fn converged(nodes: &[TestNode], group: &str, epoch: u64) -> anyhow::Result<(u64, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        for n in nodes {
            let g = n
                .node
                .engine
                .in_group(group, |e, g| e.show_group(g))
                .await?;
            seen.push((g.epoch, g.epoch_auth));
        }
        if seen[0].0 >= epoch && seen.iter().all(|s| *s == seen[0]) {
            return Ok(seen.swap_remove(0));
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no convergence on epoch {epoch} after {WAIT:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_members_commit_at_once_fifty_times() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs, "race").await?;
    let g = group.id.clone();
    let (mut epoch, _) = converged(&nodes, &g, 4).await?;
    let mut sent = Vec::new();
    for round in 0..rounds() {
        let (a, b, c) = (round % 5, (round + 1) % 5, (round + 2) % 5);
        let text = format!("round {round}");
        let (ra, rb, rc) = tokio::join!(
            nodes[a].node.engine.in_group(&g, |e, g| e.self_update(g)),
            nodes[b].node.engine.in_group(&g, |e, g| e.self_update(g)),
            nodes[c].node.engine.in_group(&g, {
                let text = text.clone();
                move |e, g| e.send(g, &text)
            }),
        );
        ra?;
        rb?;
        rc?;
        sent.push(text);
        // Both updates end up applied: the winner's, then the loser's re-proposal.
        let (e, _) = converged(&nodes, &g, epoch + 2)
            .await
            .map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
        epoch = e;
    }
    // Every message exactly once everywhere (a re-sent one replaces its first copy).
    let deadline = tokio::time::Instant::now() + WAIT;
    for (i, n) in nodes.iter().enumerate() {
        loop {
            let counts = text_counts(n, &g).await?;
            let missing: Vec<_> = sent.iter().filter(|t| !counts.contains_key(*t)).collect();
            let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
            assert!(twice.is_empty(), "node {i} shows messages twice: {twice:?}");
            if missing.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("node {i} is missing {missing:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut rollbacks = 0;
    for n in &nodes {
        rollbacks += n
            .node
            .engine
            .in_group(&g, |e, g| e.show_group(g))
            .await?
            .rollbacks;
    }
    eprintln!("{} rounds, {rollbacks} rollbacks in total", rounds());
    assert!(
        rollbacks > 0,
        "the commits never raced; the test proved nothing"
    );
    for n in nodes {
        n.node.shutdown().await;
    }
    Ok(())
}

/// Waits until `node` is connected to none of `others`.
async fn wait_cut_off(node: &TestNode, others: &[libp2p::PeerId]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let connected = node.node.net.info().await?.connected;
        if !connected.iter().any(|p| others.contains(p)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("still connected to {others:?}: {connected:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A partition where both halves commit more often than the rewind depth (16 commits): after
/// healing, the losing half cannot roll back, asks the winning half to add it again, and all
/// four nodes end on one branch with four members, and talk again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fork_deeper_than_the_rewind_depth_heals_by_rejoining() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs, "deep").await?;
    let g = group.id.clone();
    converged(&nodes, &g, 3).await?;
    let peers: Vec<_> = nodes.iter().map(|n| n.node.peer_id).collect();
    let (left, right) = ([0usize, 1], [2usize, 3]);
    kith_tests::wait_mesh(&nodes.iter().collect::<Vec<_>>()).await?;
    for (side, other) in [(left, right), (right, left)] {
        let blocked: Vec<_> = other.iter().map(|i| peers[*i]).collect();
        for i in side {
            nodes[i].node.net.set_blocked(blocked.clone()).await?;
        }
    }
    for (side, other) in [(left, right), (right, left)] {
        let blocked: Vec<_> = other.iter().map(|i| peers[*i]).collect();
        for i in side {
            wait_cut_off(&nodes[i], &blocked).await?;
        }
    }
    for round in 0..18 {
        let (a, b) = (left[round % 2], right[round % 2]);
        let (ra, rb) = tokio::join!(
            nodes[a].node.engine.in_group(&g, |e, g| e.self_update(g)),
            nodes[b].node.engine.in_group(&g, |e, g| e.self_update(g)),
        );
        ra?;
        rb?;
        converged(&nodes[left[0]..=left[1]], &g, 0).await?;
        converged(&nodes[right[0]..=right[1]], &g, 0).await?;
    }
    for n in &nodes {
        n.node.net.set_blocked(Vec::new()).await?;
    }
    let (_, auth) = converged(&nodes, &g, 0).await?;
    let mut deep = 0;
    for n in &nodes {
        let info = n.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
        assert_eq!(info.members.len(), 4, "{info:?}");
        assert!(info.active);
        deep += info.deep_forks;
    }
    assert!(deep > 0, "the losing half saw the deep fork");
    // Everyone talks again.
    let mut events: Vec<_> = nodes.iter().map(|n| n.node.engine.subscribe()).collect();
    nodes[2]
        .node
        .engine
        .in_group(&g, |e, g| e.send(g, "together again"))
        .await?;
    for (i, ev) in events.iter_mut().enumerate() {
        if i != 2 {
            kith_tests::wait_texts(ev, "node", &["together again".to_owned()]).await?;
        }
    }
    eprintln!("converged on {auth}");
    for n in nodes {
        n.node.shutdown().await;
    }
    Ok(())
}
