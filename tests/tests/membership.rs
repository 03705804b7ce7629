//! Membership over real nodes: three in-process nodes on loopback; one refreshes its key, one
//! is removed and hears nothing more while the other two keep talking (even when it is made to
//! listen on the group topic again), then one leaves and the remaining member commits it. And
//! a member removed while it was cut off, which never learns it and goes on posting (issue 4,
//! scenario c): it decrypts nothing new and the others reject every post.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_client::model::{JoinStage, MessageBody, NodeEvent};
use kith_protocol::ids::GroupId;
use kith_tests::{
    InGroup, NETWORK, TestNode, is_text, loopback_config, metric, text_counts, wait_connected,
    wait_event, wait_texts, with_metrics,
};

fn epoch_is(e: &NodeEvent, want: u64, members: usize) -> bool {
    matches!(e, NodeEvent::EpochChanged { epoch, member_count, .. } if *epoch == want && *member_count == members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_node_hears_nothing_and_the_others_keep_talking() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), with_metrics(loopback_config(vec![boot]))).await?;

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
    let updated = a.node.engine.in_group(&g, |e, g| e.self_update(g)).await?;
    assert_eq!(updated.epoch, 3);
    wait_event(&mut b_events, "B at epoch 3", |e| epoch_is(e, 3, 3)).await?;
    wait_event(&mut c_events, "C at epoch 3", |e| epoch_is(e, 3, 3)).await?;

    // A removes C.
    let c_peer = c.node.engine.peer_id();
    let members = a
        .node
        .engine
        .in_group(&g, |e, g| e.show_group(g))
        .await?
        .members;
    assert!(members.iter().any(|m| m.peer_id == c_peer.to_string()));
    let after = a
        .node
        .engine
        .in_group(&g, move |e, g| e.remove_member(g, c_peer))
        .await?;
    assert_eq!(after.epoch, 4);
    assert_eq!(after.members.len(), 2);
    wait_event(&mut b_events, "B at epoch 4", |e| epoch_is(e, 4, 2)).await?;
    wait_event(&mut c_events, "C sees its removal", |e| {
        matches!(e, NodeEvent::Message(m) if matches!(&m.body, MessageBody::MembersRemoved { members } if members.contains(&c_peer.to_string())))
    })
    .await?;
    let c_view = c.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert!(!c_view.active, "C is no longer a member");
    assert!(
        c.node
            .engine
            .in_group(&g, |e, g| e.send(g, "let me in"))
            .await
            .is_err()
    );

    // A and B keep talking; C receives none of it.
    a.node
        .engine
        .in_group(&g, |e, g| e.send(g, "without C (a)"))
        .await?;
    b.node
        .engine
        .in_group(&g, |e, g| e.send(g, "without C (b)"))
        .await?;
    wait_texts(&mut b_events, "B", &["without C (a)".to_owned()]).await?;
    wait_texts(&mut a_events, "A", &["without C (b)".to_owned()]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c_texts: Vec<String> = c
        .node
        .engine
        .in_group(&g, |e, g| e.history(g, 100))
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

    // C's node is made to listen on the group topic again (as a modified node would): the
    // messages reach it, and it reads none of them. (A former member still knows the group
    // id, so it can open the frames' outer seal: what it cannot read is MLS.)
    let gid = g.parse::<GroupId>()?;
    let topic = gid.topic(NETWORK);
    let key = kith_protocol::seal::SealKey::of(NETWORK, &gid);
    let net = c.node.net.clone();
    tokio::task::spawn_blocking(move || net.subscribe_blocking(topic, key)).await??;
    let not_member = r#"kith_envelopes_ignored_total{reason="not_member"}"#;
    let before = metric(&c, not_member).await?;
    // Gossipsub needs a heartbeat or two to take C back into the mesh: resend until one
    // arrives. Every one sent must then stay unread.
    let mut sent = Vec::new();
    let deadline = tokio::time::Instant::now() + kith_tests::WAIT;
    while metric(&c, not_member).await? <= before {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing reached C on the topic"
        );
        let text = format!("C listens again {}", sent.len());
        a.node
            .engine
            .in_group(&g, {
                let text = text.clone();
                move |e, g| e.send(g, &text)
            })
            .await?;
        sent.push(text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = text_counts(&c, &g).await?;
    assert!(counts.is_empty(), "C read {counts:?} after re-subscribing");
    let c_view = c.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert!(!c_view.active && c_view.epoch == 4, "{c_view:?}");

    // B leaves: A (the lowest remaining leaf) commits it.
    let leaving = b.node.engine.in_group(&g, |e, g| e.leave_group(g)).await?;
    assert!(leaving.leaving);
    assert!(
        b.node
            .engine
            .in_group(&g, |e, g| e.send(g, "one more"))
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
    let b_view = b.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert!(!b_view.active && !b_view.leaving, "{b_view:?}");

    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// Issue 4, scenario c. C is cut off while A removes it, so it never sees the commit; once
/// the network heals it is still subscribed and sure it is a member. It cannot fetch the
/// commit (the members refuse to sync with a non-member), so it stays at its old epoch: it
/// reads none of the new messages that reach it, and every post it makes (queued during the
/// partition, and after the heal) is rejected by A and B as from a former member.
/// Cuts C off from A and B (both sides block), then A removes C at epoch 2 → 3 and B
/// follows (`b_events` is B's event stream).
async fn remove_while_cut_off(
    a: &TestNode,
    b: &TestNode,
    c: &TestNode,
    g: &str,
    b_events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
) -> anyhow::Result<()> {
    let (pa, pb, pc) = (a.node.peer_id, b.node.peer_id, c.node.peer_id);
    a.node.net.set_blocked(vec![pc]).await?;
    b.node.net.set_blocked(vec![pc]).await?;
    c.node.net.set_blocked(vec![pa, pb]).await?;
    wait_connected(c, "C to lose A and B", |p| p.is_empty()).await?;
    wait_connected(a, "A to lose C", |p| !p.contains(&pc)).await?;
    wait_connected(b, "B to lose C", |p| !p.contains(&pc)).await?;
    let after = a
        .node
        .engine
        .in_group(g, move |e, g| e.remove_member(g, pc))
        .await?;
    assert_eq!((after.epoch, after.members.len()), (3, 2));
    wait_event(b_events, "B at epoch 3", |e| epoch_is(e, 3, 2)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_removed_while_away_reads_nothing_new_and_its_posts_are_rejected()
-> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), with_metrics(loopback_config(vec![]))).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(
        dirs[1].path(),
        with_metrics(loopback_config(vec![boot.clone()])),
    )
    .await?;
    let c = TestNode::start(dirs[2].path(), with_metrics(loopback_config(vec![boot]))).await?;
    let (pa, pb) = (a.node.peer_id, b.node.peer_id);
    let (group, invite) = a.group_with_invite("club", 2).await?;
    let g = group.id.clone();
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    c.node.engine.join(invite.link).await?;
    wait_event(&mut b_events, "B at epoch 2", |e| epoch_is(e, 2, 3)).await?;
    wait_connected(&c, "C to connect to A and B", |p| {
        p.contains(&pa) && p.contains(&pb)
    })
    .await?;
    let mut c_events = c.node.engine.subscribe();
    a.node
        .engine
        .in_group(&g, |e, g| e.send(g, "before"))
        .await?;
    wait_texts(&mut c_events, "C", &["before".to_owned()]).await?;

    // Cut C off (both sides block), then A removes it and A and B talk without it.
    remove_while_cut_off(&a, &b, &c, &g, &mut b_events).await?;
    let mut a_events = a.node.engine.subscribe();
    a.node
        .engine
        .in_group(&g, |e, g| e.send(g, "without C (a)"))
        .await?;
    b.node
        .engine
        .in_group(&g, |e, g| e.send(g, "without C (b)"))
        .await?;
    wait_texts(&mut b_events, "B", &["without C (a)".to_owned()]).await?;
    wait_texts(&mut a_events, "A", &["without C (b)".to_owned()]).await?;

    // C does not know: it posts at its old epoch (queued until a peer is back).
    let c_view = c.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert!(c_view.active && c_view.epoch == 2, "{c_view:?}");
    let mut posts = Vec::new();
    for k in 0..3 {
        let text = format!("C still posting {k}");
        c.node
            .engine
            .in_group(&g, {
                let text = text.clone();
                move |e, g| e.send(g, &text)
            })
            .await?;
        posts.push(text);
    }

    // Heal. C comes back subscribed; the posts it queued go out to the first member to
    // subscribe, which rejects them (and so does not forward them).
    for n in [&a, &b, &c] {
        n.node.net.set_blocked(vec![]).await?;
    }
    wait_connected(&c, "C to reconnect to A and B", |p| {
        p.contains(&pa) && p.contains(&pb)
    })
    .await?;
    let rejected = r#"kith_envelopes_rejected_total{reason="former_member"}"#;
    let deadline = tokio::time::Instant::now() + kith_tests::WAIT;
    while metric(&a, rejected).await? + metric(&b, rejected).await? < 3.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "C's queued posts were not rejected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A and B go on talking: their messages reach C (it still listens) and stay unreadable.
    let future = r#"kith_envelopes_ignored_total{reason="future_epoch"}"#;
    let before = metric(&c, future).await?;
    let mut new = Vec::new();
    let deadline = tokio::time::Instant::now() + kith_tests::WAIT;
    while metric(&c, future).await? < before + 2.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "A's and B's messages never reached C"
        );
        for (who, n) in [("a", &a), ("b", &b)] {
            let text = format!("after the heal ({who}) {}", new.len());
            n.node
                .engine
                .in_group(&g, {
                    let text = text.clone();
                    move |e, g| e.send(g, &text)
                })
                .await?;
            new.push(text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // C posts on (it still thinks it is a member) until both A and B have rejected one.
    let (ra, rb) = (metric(&a, rejected).await?, metric(&b, rejected).await?);
    while metric(&a, rejected).await? <= ra || metric(&b, rejected).await? <= rb {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "C's posts after the heal were not rejected by both A and B"
        );
        let text = format!("C posting after the heal {}", posts.len());
        c.node
            .engine
            .in_group(&g, {
                let text = text.clone();
                move |e, g| e.send(g, &text)
            })
            .await?;
        posts.push(text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nobody shows C's posts; C shows nothing A or B wrote after removing it.
    for (who, n) in [("A", &a), ("B", &b)] {
        let counts = text_counts(n, &g).await?;
        assert!(
            !posts.iter().any(|p| counts.contains_key(p)),
            "{who} shows a post of the removed member: {counts:?}"
        );
        assert!(
            new.iter().all(|t| counts.contains_key(t)),
            "{who}: {counts:?}"
        );
    }
    let counts = text_counts(&c, &g).await?;
    let read: Vec<_> = counts
        .keys()
        .filter(|t| !posts.contains(t) && *t != "before")
        .collect();
    assert!(read.is_empty(), "C read {read:?} after its removal");
    let c_view = c.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert_eq!(
        c_view.epoch, 2,
        "C never got past its old epoch: {c_view:?}"
    );
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// A member removed while away, whose invite still has uses left, comes back: members
/// refuse its sync ("not a member"), which a recent joiner reads as a lost join and so asks
/// to join again with its link. Members refuse that link to it (removed since the invite
/// was made), so the removal stands. (Before, the old link let it straight back in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_member_cannot_come_back_with_its_old_link() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), loopback_config(vec![boot])).await?;
    let (group, invite) = a.group_with_invite("club", 5).await?;
    let g = group.id.clone();
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    c.node.engine.join(invite.link).await?;
    wait_event(&mut b_events, "B at epoch 2", |e| epoch_is(e, 2, 3)).await?;

    // C is cut off while A removes it.
    remove_while_cut_off(&a, &b, &c, &g, &mut b_events).await?;

    // Back online, C asks for history, is told it is not a member, tries its link again and
    // is refused for good.
    let mut c_events = c.node.engine.subscribe();
    for n in [&a, &b, &c] {
        n.node.net.set_blocked(vec![]).await?;
    }
    let lost = wait_event(&mut c_events, "C's rejoin to be refused", |e| {
        matches!(
            e,
            NodeEvent::JoinProgress {
                stage: JoinStage::Lost { .. },
                ..
            }
        )
    })
    .await?;
    let NodeEvent::JoinProgress {
        stage: JoinStage::Lost { reason },
        ..
    } = lost
    else {
        unreachable!()
    };
    assert!(reason.contains("removed from the group"), "{reason}");
    for (who, n) in [("A", &a), ("B", &b)] {
        let view = n.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
        assert_eq!(
            (view.epoch, view.members.len()),
            (3, 2),
            "{who} let the removed member back in"
        );
    }
    let c_view = c.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
    assert!(!c_view.active, "C still counts itself a member: {c_view:?}");
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// `[keys] update_after_messages` makes a member refresh its key on its own: after three
/// own messages the group moves to a new epoch that everyone follows.
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
    // A's first own message of epoch 1 is the invite states it sends B after adding it
    // (the link B used, used up now, included), so two texts make three.
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "m0"))
        .await?;
    assert_eq!(
        a.node
            .engine
            .in_group(&group.id, |e, g| e.show_group(g))
            .await?
            .epoch,
        1
    );
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "m1"))
        .await?;
    assert_eq!(
        a.node
            .engine
            .in_group(&group.id, |e, g| e.show_group(g))
            .await?
            .epoch,
        2
    );
    wait_event(&mut b_events, "B follows the key update", |e| {
        epoch_is(e, 2, 2)
    })
    .await?;
    for n in [a, b] {
        n.node.shutdown().await;
    }
    Ok(())
}
