//! Connection gating: three in-process nodes in one group are split into {A, B} and {C} with
//! block lists on both sides (as the testnet does, without root), then healed. During the
//! partition C is disconnected and hears nothing; after healing it reconnects on its own and
//! gets new messages. (What was sent during the partition is left to history sync.)

#![allow(clippy::unwrap_used)]

use kith_client::model::NodeEvent;
use kith_tests::{TestNode, is_text, loopback_config, wait_connected, wait_event, wait_texts};

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
        .send(group.id.clone(), "before".into())
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
        .send(group.id.clone(), "during".into())
        .await?;
    wait_texts(&mut b_events, "B", &["during".to_owned()]).await?;
    b.node.engine.send(group.id.clone(), "ack".into()).await?;
    wait_texts(&mut a_events, "A", &["ack".to_owned()]).await?;
    let c_history = texts(&c.node.engine.history(group.id.clone(), 100).await?);
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
    a.node.engine.send(group.id.clone(), "after".into()).await?;
    wait_event(&mut c_events, "'after' at C", |e| is_text(e, "after")).await?;
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}
