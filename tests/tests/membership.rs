//! Membership over real nodes: three in-process nodes on loopback; one refreshes its key, one
//! is removed and hears nothing more while the other two keep talking, then one leaves and
//! the remaining member commits it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_node::model::{MessageBody, NodeEvent};
use kith_tests::{TestNode, is_text, loopback_config, wait_event, wait_texts};

fn epoch_is(e: &NodeEvent, want: u64, members: usize) -> bool {
    matches!(e, NodeEvent::EpochChanged { epoch, member_count, .. } if *epoch == want && *member_count == members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_node_hears_nothing_and_the_others_keep_talking() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), loopback_config(vec![boot])).await?;

    let (group, invite) = a.group_with_invite("club", 2).await?;
    let g = group.id.clone();
    let mut a_events = a.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    wait_event(&mut a_events, "A at epoch 1", |e| epoch_is(e, 1, 2)).await?;
    let mut b_events = b.node.engine.subscribe();
    c.node.engine.join(invite.link.clone()).await?;
    wait_event(&mut b_events, "B at epoch 2", |e| epoch_is(e, 2, 3)).await?;

    // A self-update moves everyone to epoch 3.
    let mut c_events = c.node.engine.subscribe();
    let updated = a.node.engine.self_update(g.clone()).await?;
    assert_eq!(updated.epoch, 3);
    wait_event(&mut b_events, "B at epoch 3", |e| epoch_is(e, 3, 3)).await?;
    wait_event(&mut c_events, "C at epoch 3", |e| epoch_is(e, 3, 3)).await?;

    // A removes C.
    let c_peer = c.node.engine.peer_id();
    let members = a.node.engine.group(g.clone()).await?.members;
    assert!(members.iter().any(|m| m.peer_id == c_peer.to_string()));
    let after = a.node.engine.remove_member(g.clone(), c_peer).await?;
    assert_eq!(after.epoch, 4);
    assert_eq!(after.members.len(), 2);
    wait_event(&mut b_events, "B at epoch 4", |e| epoch_is(e, 4, 2)).await?;
    wait_event(&mut c_events, "C sees its removal", |e| {
        matches!(e, NodeEvent::Message(m) if matches!(&m.body, MessageBody::MembersRemoved { members } if members.contains(&c_peer.to_string())))
    })
    .await?;
    let c_view = c.node.engine.group(g.clone()).await?;
    assert!(!c_view.active, "C is no longer a member");
    assert!(
        c.node
            .engine
            .send(g.clone(), "let me in".into())
            .await
            .is_err()
    );

    // A and B keep talking; C receives none of it.
    a.node
        .engine
        .send(g.clone(), "without C (a)".into())
        .await?;
    b.node
        .engine
        .send(g.clone(), "without C (b)".into())
        .await?;
    wait_texts(&mut b_events, "B", &["without C (a)".to_owned()]).await?;
    wait_texts(&mut a_events, "A", &["without C (b)".to_owned()]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c_texts: Vec<String> = c
        .node
        .engine
        .history(g.clone(), 100)
        .await?
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text { text } => Some(text),
            _ => None,
        })
        .collect();
    assert!(c_texts.is_empty(), "C read {c_texts:?}");
    while let Ok(ev) = c_events.try_recv() {
        assert!(!is_text(&ev, "without C (a)") && !is_text(&ev, "without C (b)"));
    }

    // B leaves: A (the lowest remaining leaf) commits it.
    let leaving = b.node.engine.leave_group(g.clone()).await?;
    assert!(leaving.leaving);
    assert!(
        b.node
            .engine
            .send(g.clone(), "one more".into())
            .await
            .is_err()
    );
    wait_event(&mut a_events, "A commits B's leaving", |e| {
        epoch_is(e, 5, 1)
    })
    .await?;
    wait_event(&mut b_events, "B sees its removal", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 5, .. })
    })
    .await?;
    let b_view = b.node.engine.group(g.clone()).await?;
    assert!(!b_view.active && !b_view.leaving, "{b_view:?}");

    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// `[keys] update_after_messages` makes a member refresh its key on its own: after three
/// messages the group moves to a new epoch that everyone follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_update_after_configured_message_count() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut config = loopback_config(vec![]);
    config.update_policy.after_messages = 3;
    let a = TestNode::start(dirs[0].path(), config).await?;
    let b = TestNode::start(
        dirs[1].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    let (group, invite) = a.group_with_invite("keys", 1).await?;
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link).await?;
    for i in 0..2 {
        a.node
            .engine
            .send(group.id.clone(), format!("m{i}"))
            .await?;
    }
    assert_eq!(a.node.engine.group(group.id.clone()).await?.epoch, 1);
    a.node.engine.send(group.id.clone(), "m2".into()).await?;
    assert_eq!(a.node.engine.group(group.id.clone()).await?.epoch, 2);
    wait_event(&mut b_events, "B follows the key update", |e| {
        epoch_is(e, 2, 2)
    })
    .await?;
    for n in [a, b] {
        n.node.shutdown().await;
    }
    Ok(())
}
