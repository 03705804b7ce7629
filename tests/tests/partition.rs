//! Connection gating: three in-process nodes in one group are split into {A, B} and {C} with
//! block lists on both sides (as the testnet does, without root), then healed. During the
//! partition C is disconnected and hears nothing; after healing it reconnects on its own and
//! gets new messages. (What was sent during the partition is left to history sync.) And a
//! partition long enough for a member to delete the keys of the epoch the other side kept
//! writing in heals without loss: the texts are sent again on request.

#![allow(clippy::unwrap_used)]

use kith_client::model::NodeEvent;
use kith_tests::{
    InGroup, TestNode, is_text, loopback_config, metric, wait_connected, wait_event, wait_texts,
    with_metrics,
};

fn texts(history: &[kith_client::model::MessageInfo]) -> Vec<String> {
    history
        .iter()
        .filter_map(|m| match &m.body {
            kith_client::model::MessageBody::Text { text } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_peer_is_cut_off_and_comes_back_when_unblocked() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), loopback_config(vec![boot])).await?;
    let (pa, pb, pc) = (a.node.peer_id, b.node.peer_id, c.node.peer_id);

    let (group, invite) = a.group_with_invite("split", 2).await?;
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    c.node.engine.join(invite.link).await?;
    wait_event(&mut b_events, "B at epoch 2", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 2, .. })
    })
    .await?;
    // C finds B through the DHT; once both links are up, C's subscription has long reached
    // A (a message published before that would only reach C through history sync).
    wait_connected(&c, "C to connect to A and B", |p| {
        p.contains(&pa) && p.contains(&pb)
    })
    .await?;
    let mut c_events = c.node.engine.subscribe();
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "before"))
        .await?;
    wait_texts(&mut c_events, "C", &["before".to_owned()]).await?;

    // Partition {A, B} | {C}, blocked on both sides.
    assert_eq!(a.node.net.set_blocked(vec![pc]).await?, vec![pc]);
    b.node.net.set_blocked(vec![pc, pc]).await?;
    let mut ab = vec![pa, pb];
    ab.sort();
    assert_eq!(c.node.net.set_blocked(vec![pb, pa]).await?, ab);
    assert_eq!(c.node.net.blocked().await?, ab);
    wait_connected(&c, "C to lose A and B", |p| {
        !p.contains(&pa) && !p.contains(&pb)
    })
    .await?;
    wait_connected(&a, "A to lose C", |p| !p.contains(&pc)).await?;
    wait_connected(&b, "B to lose C", |p| !p.contains(&pc)).await?;
    // A and B still talk (a round trip); C hears none of it and stays disconnected.
    let mut a_events = a.node.engine.subscribe();
    let mut b_events = b.node.engine.subscribe();
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "during"))
        .await?;
    wait_texts(&mut b_events, "B", &["during".to_owned()]).await?;
    b.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "ack"))
        .await?;
    wait_texts(&mut a_events, "A", &["ack".to_owned()]).await?;
    let c_history = texts(
        &c.node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 100))
            .await?,
    );
    assert!(
        !c_history.iter().any(|t| t == "during" || t == "ack"),
        "C heard across the partition: {c_history:?}"
    );
    let c_connected = c.node.net.info().await?.connected;
    assert!(
        !c_connected.contains(&pa) && !c_connected.contains(&pb),
        "{c_connected:?}"
    );

    // Heal, one node at a time as a test driver would; the last one to unblock finds the
    // others already willing.
    for n in [&a, &b, &c] {
        assert!(n.node.net.set_blocked(vec![]).await?.is_empty());
    }
    wait_connected(&c, "C to reconnect to A and B", |p| {
        p.contains(&pa) && p.contains(&pb)
    })
    .await?;
    let mut c_events = c.node.engine.subscribe();
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "after"))
        .await?;
    wait_event(&mut c_events, "'after' at C", |e| is_text(e, "after")).await?;
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// B keeps writing while cut off from A; meanwhile A commits and, its past-epoch window
/// set to zero here, deletes the keys of the epoch B writes in. When the partition heals,
/// A cannot decrypt B's texts: it asks, B sends them again under the same ids, and both end
/// with the same history, each text in the epoch it was written in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn texts_written_across_a_partition_come_back_after_their_keys_are_gone() -> anyhow::Result<()>
{
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let zero_window = |mut c: kith_node::config::NodeConfig| {
        c.past_epoch_ttl = std::time::Duration::ZERO;
        with_metrics(c)
    };
    let a = TestNode::start(dirs[0].path(), zero_window(loopback_config(vec![]))).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), zero_window(loopback_config(vec![boot]))).await?;
    let (pa, pb) = (a.node.peer_id, b.node.peer_id);
    let (group, invite) = a.group_with_invite("cut", 1).await?;
    let mut a_events = a.node.engine.subscribe();
    b.node.engine.join(invite.link).await?;
    wait_event(&mut a_events, "B joined", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 1, .. })
    })
    .await?;
    wait_connected(&b, "B to connect to A", |p| p.contains(&pa)).await?;
    let mut b_events = b.node.engine.subscribe();
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "before"))
        .await?;
    wait_texts(&mut b_events, "B", &["before".to_owned()]).await?;

    a.node.net.set_blocked(vec![pb]).await?;
    b.node.net.set_blocked(vec![pa]).await?;
    wait_connected(&a, "A to lose B", |p| !p.contains(&pb)).await?;
    wait_connected(&b, "B to lose A", |p| !p.contains(&pa)).await?;
    let cut: Vec<String> = (1..=3).map(|i| format!("cut off {i}")).collect();
    for t in &cut {
        b.node.engine.send_text(&group.id, t).await?;
    }
    let updated = a
        .node
        .engine
        .in_group(&group.id, |e, g| e.self_update(g))
        .await?;
    assert_eq!(updated.epoch, 2);
    // A's next tick deletes epoch 1's keys.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(&a, "kith_past_epochs_expired_total").await? < 1.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "A never expired epoch 1"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let mut a_events = a.node.engine.subscribe();
    a.node.net.set_blocked(vec![]).await?;
    b.node.net.set_blocked(vec![]).await?;
    wait_texts(&mut a_events, "A", &cut).await?;
    assert_eq!(
        metric(&a, "kith_undecryptable_recovered_total").await?,
        3.0,
        "all three came back as re-sends"
    );
    let a_group = a
        .node
        .engine
        .in_group(&group.id, |e, g| e.show_group(g))
        .await?;
    assert!(
        a_group.undecryptable.values().all(|n| *n == 0),
        "nothing counted as lost: {:?}",
        a_group.undecryptable
    );
    // The same entries, in the same order, on both.
    let entries = |h: Vec<kith_client::model::MessageInfo>| -> Vec<(String, u64, String)> {
        h.into_iter()
            .filter_map(|m| match m.body {
                kith_client::model::MessageBody::Text { text } => Some((m.id, m.epoch, text)),
                _ => None,
            })
            .collect()
    };
    let on_a = entries(
        a.node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 100))
            .await?,
    );
    let on_b = entries(
        b.node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 100))
            .await?,
    );
    assert_eq!(on_a, on_b);
    assert!(
        on_b.iter().filter(|(_, e, _)| *e == 1).count() == 4,
        "{on_b:?}"
    );
    for n in [a, b] {
        n.node.shutdown().await;
    }
    Ok(())
}
