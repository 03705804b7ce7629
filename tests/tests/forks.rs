//! Concurrent commits between real nodes on loopback (issue 4, scenario a): five members; in
//! each of 50 rounds two of them commit a self-update at the same moment while a third
//! sends a message. Every round must end with all five in the same epoch with the same
//! epoch authenticator, both updates applied (the loser re-proposes), and no message lost
//! or shown twice.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_tests::{TestNode, WAIT, group_of, text_counts};

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
            let g = n.node.engine.group(group.to_owned()).await?;
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
            nodes[a].node.engine.self_update(g.clone()),
            nodes[b].node.engine.self_update(g.clone()),
            nodes[c].node.engine.send(g.clone(), text.clone()),
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
        rollbacks += n.node.engine.group(g.clone()).await?.rollbacks;
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
