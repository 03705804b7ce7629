//! Three in-process nodes on loopback: create a group, invite two others by link, everyone
//! talks and everyone reads everything; a node restarts and keeps its groups, its history
//! and its place in the conversation.

#![allow(clippy::unwrap_used)]

use kith_client::model::{CreateInviteRequest, MessageBody, NodeEvent};
use kith_tests::{InGroup, TestNode, is_text, loopback_config, wait_event, wait_texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_talk_and_survive_a_restart() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), loopback_config(vec![boot])).await?;

    let group = a.node.engine.run(|e| e.create_group("friends")).await?;
    assert_eq!(group.members.len(), 1);
    let invite = a
        .node
        .engine
        .in_group(&group.id, move |e, g| {
            e.create_invite(
                g,
                CreateInviteRequest {
                    expires_in_secs: None,
                    max_uses: Some(2),
                    approval: false,
                },
            )
        })
        .await?;
    assert!(invite.link.starts_with("kith1"));
    assert!(invite.url.starts_with("kith://join#kith1"));

    let mut a_events = a.node.engine.subscribe();
    let joined_b = b.node.engine.join(invite.link.clone()).await?;
    assert_eq!(joined_b.id, group.id);
    assert_eq!(joined_b.name, "friends");
    wait_event(&mut a_events, "A sees epoch 1", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 1, .. })
    })
    .await?;

    let mut b_events = b.node.engine.subscribe();
    let joined_c = c.node.engine.join(invite.url.clone()).await?;
    assert_eq!(joined_c.members.len(), 3);
    // B learns of C through the commit A published on the group topic.
    wait_event(&mut b_events, "B moves to epoch 2", |e| {
        matches!(
            e,
            NodeEvent::EpochChanged {
                epoch: 2,
                member_count: 3,
                ..
            }
        )
    })
    .await?;

    // The invite allowed two joins; a third is refused with a clear reason.
    let d_dir = tempfile::tempdir()?;
    let d = TestNode::start(d_dir.path(), loopback_config(vec![])).await?;
    let err = d.node.engine.join(invite.link.clone()).await.unwrap_err();
    assert!(err.to_string().contains("used up"), "{err}");
    d.node.shutdown().await;

    // Everyone sends; everyone receives the other two.
    let nodes = [&a, &b, &c];
    let mut subs: Vec<_> = nodes.iter().map(|n| n.node.engine.subscribe()).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.node
            .engine
            .in_group(&group.id, move |e, g| e.send(g, &format!("hello from {i}")))
            .await?;
    }
    for (i, rx) in subs.iter_mut().enumerate() {
        let others: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("hello from {j}"))
            .collect();
        wait_texts(rx, &format!("node {i}"), &others).await?;
    }
    for n in nodes {
        let texts: Vec<String> = n
            .node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 100))
            .await?
            .into_iter()
            .filter_map(|m| match m.body {
                MessageBody::Text { text } => Some(text),
                _ => None,
            })
            .collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
    }

    // Restart B: it keeps the group, the epoch and the history, and keeps talking.
    let b = b.restart().await?;
    let g = b
        .node
        .engine
        .in_group(&group.id, |e, g| e.show_group(g))
        .await?;
    assert_eq!(g.epoch, 2);
    assert_eq!(g.members.len(), 3);
    let history = b
        .node
        .engine
        .in_group("friends", |e, g| e.history(g, 100))
        .await?;
    assert!(
        history
            .iter()
            .any(|m| matches!(&m.body, MessageBody::Text { text } if text == "hello from 2"))
    );

    let mut a_events = a.node.engine.subscribe();
    let mut c_events = c.node.engine.subscribe();
    b.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "back after restart"))
        .await?;
    wait_event(&mut a_events, "A hears B after restart", |e| {
        is_text(e, "back after restart")
    })
    .await?;
    wait_event(&mut c_events, "C hears B after restart", |e| {
        is_text(e, "back after restart")
    })
    .await?;
    let mut b_events = b.node.engine.subscribe();
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "welcome back"))
        .await?;
    wait_event(&mut b_events, "B hears A after restart", |e| {
        is_text(e, "welcome back")
    })
    .await?;

    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}
