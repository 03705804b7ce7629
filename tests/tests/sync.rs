//! History sync between in-process nodes: a node that was offline catches up from online
//! members by itself (no manual call), also when the sender of what it missed is gone, and a
//! non-member's sync request is refused; a member holding half of an epoch gets only the
//! other half (version 2), and version-1 requests are still answered.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use kith_client::model::{GroupInfo, MessageBody, NodeEvent};
use kith_protocol::envelope::{Envelope, PayloadKind};
use kith_protocol::ids::{GroupId, MessageId};
use kith_protocol::records::StoredEnvelope;
use kith_protocol::sync::SyncResponse;
use kith_protocol::sync::{
    Holdings, MAX_PAGE_BYTES, Summary, SyncRefusal, SyncRequest, SyncRequestV1, SyncRequestV2, Want,
};
use kith_tests::{InGroup, TestNode, WAIT, loopback_config, wait_event, wait_texts};

/// A, B and C in one group created by A (C bootstraps from `c_boot` extra peers too).
async fn three_in_a_group(
    dirs: &[tempfile::TempDir],
) -> anyhow::Result<(TestNode, TestNode, TestNode, GroupInfo)> {
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot_a = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot_a.clone()])).await?;
    let boot_b = b.bootstrap_peer().await?;
    // C knows both, so it finds B after a restart even when A is gone.
    let c = TestNode::start(dirs[2].path(), loopback_config(vec![boot_a, boot_b])).await?;
    let (group, invite) = a.group_with_invite("sync", 2).await?;
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    c.node.engine.join(invite.link.clone()).await?;
    wait_event(&mut b_events, "B moves to epoch 2", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 2, .. })
    })
    .await?;
    Ok((a, b, c, group))
}

async fn texts(node: &TestNode, group: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(node
        .node
        .engine
        .in_group(group, |e, g| e.history(g, 1000))
        .await?
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text { text } => Some(text),
            _ => None,
        })
        .collect())
}

/// The ids of `node`'s history of `group`, in the order the node lists them.
async fn history_ids(node: &TestNode, group: &str) -> anyhow::Result<Vec<String>> {
    Ok(node
        .node
        .engine
        .in_group(group, |e, g| e.history(g, 1000))
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect())
}

/// Polls until `node` has every text in `want` and is at least at `epoch`.
async fn wait_caught_up(
    node: &TestNode,
    group: &str,
    want: &BTreeSet<String>,
    epoch: u64,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let have = texts(node, group).await?;
        let e = node
            .node
            .engine
            .in_group(group, |e, g| e.show_group(g))
            .await?
            .epoch;
        if want.is_subset(&have) && e >= epoch {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = want.difference(&have).collect();
            anyhow::bail!("not caught up after {WAIT:?}: epoch {e}, missing {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_node_catches_up_by_itself() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c, group) = three_in_a_group(&dirs).await?;

    // C goes offline, keeping its data directory.
    let TestNode {
        node: c_node,
        dir: c_dir,
        config: c_config,
    } = c;
    c_node.shutdown().await;

    // A and B exchange 50 messages, then A commits a self-update.
    let mut a_events = a.node.engine.subscribe();
    let mut b_events = b.node.engine.subscribe();
    let mut from_a = Vec::new();
    let mut from_b = Vec::new();
    for i in 0..25 {
        let t = format!("a{i}");
        a.node.engine.send_text(&group.id, &t).await?;
        from_a.push(t);
        let t = format!("b{i}");
        b.node.engine.send_text(&group.id, &t).await?;
        from_b.push(t);
    }
    wait_texts(&mut b_events, "B", &from_a).await?;
    wait_texts(&mut a_events, "A", &from_b).await?;
    let updated = a
        .node
        .engine
        .in_group(&group.id, |e, g| e.self_update(g))
        .await?;
    assert_eq!(updated.epoch, 3);
    wait_event(&mut b_events, "B moves to epoch 3", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 3, .. })
    })
    .await?;

    // C comes back and fetches everything without being asked to.
    let c = TestNode::start(&c_dir, c_config).await?;
    let want: BTreeSet<String> = from_a.iter().chain(&from_b).cloned().collect();
    wait_caught_up(&c, &group.id, &want, 3).await?;
    assert_eq!(texts(&c, &group.id).await?.len(), 50);

    // Every member lists the history in the same (canonical) order, although C got it by
    // back-fill and A and B by gossip in different interleavings. Only the entries from
    // before a member joined differ (A records the group's creation, a joiner its join), so
    // the lists are compared on the entries all three hold: the 50 messages and later.
    let all = [
        history_ids(&a, &group.id).await?,
        history_ids(&b, &group.id).await?,
        history_ids(&c, &group.id).await?,
    ];
    let shared: Vec<Vec<&String>> = all
        .iter()
        .map(|ids| {
            ids.iter()
                .filter(|id| all.iter().all(|other| other.contains(id)))
                .collect()
        })
        .collect();
    assert!(
        shared[0].len() >= 50,
        "only {} shared entries",
        shared[0].len()
    );
    assert_eq!(shared[0], shared[1], "A and B list history differently");
    assert_eq!(shared[0], shared[2], "A and C list history differently");
    // The shared entries are each list's tail: nothing shared is interleaved with local ones.
    for ids in &all {
        assert_eq!(
            ids[ids.len() - shared[0].len()..]
                .iter()
                .collect::<Vec<_>>(),
            shared[0]
        );
    }

    // And it is back in the conversation at the new epoch.
    let mut c_events = c.node.engine.subscribe();
    b.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "after"))
        .await?;
    wait_texts(&mut c_events, "C", &["after".to_owned()]).await?;

    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_comes_from_a_member_other_than_the_sender() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c, group) = three_in_a_group(&dirs).await?;
    // Let C learn B's addresses before it goes down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let TestNode {
        node: c_node,
        dir: c_dir,
        config: c_config,
    } = c;
    c_node.shutdown().await;

    let mut b_events = b.node.engine.subscribe();
    let sent: Vec<String> = (0..10).map(|i| format!("from a {i}")).collect();
    for t in &sent {
        a.node.engine.send_text(&group.id, t).await?;
    }
    wait_texts(&mut b_events, "B", &sent).await?;
    // The sender leaves; only B holds its messages for C.
    a.node.shutdown().await;

    let c = TestNode::start(&c_dir, c_config).await?;
    let want: BTreeSet<String> = sent.into_iter().collect();
    wait_caught_up(&c, &group.id, &want, 2).await?;

    for n in [b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_member_sync_is_refused() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c, group) = three_in_a_group(&dirs[..3]).await?;
    let d = TestNode::start(
        dirs[3].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    let request = |group: GroupId| {
        SyncRequest::V1(SyncRequestV1 {
            group,
            summary: Summary::default(),
            cursor: None,
            max_bytes: MAX_PAGE_BYTES,
            proof: Vec::new(),
        })
    };
    let id: GroupId = group.id.parse()?;
    let answer = d.node.net.sync(b.node.peer_id, request(id)).await?;
    assert_eq!(answer, SyncResponse::Refused(SyncRefusal::NotMember));
    let answer = d
        .node
        .net
        .sync(b.node.peer_id, request(GroupId([7; 32])))
        .await?;
    assert_eq!(answer, SyncResponse::Refused(SyncRefusal::UnknownGroup));

    // A member asking directly gets the history.
    let answer = c.node.net.sync(b.node.peer_id, request(id)).await?;
    match answer {
        SyncResponse::V1(page) => {
            assert!(page.complete);
            assert!(!page.envelopes.is_empty());
        }
        other => panic!("member was refused: {other:?}"),
    }

    for n in [a, b, c, d] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// A member that holds half of an epoch's messages asks a node with version 2: the summary
/// pass sends none of that epoch and reports it partial; the range pass sends exactly the
/// other half.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_epoch_gets_only_the_missing_half() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c, group) = three_in_a_group(&dirs).await?;
    let mut b_events = b.node.engine.subscribe();
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for t in &sent {
        a.node.engine.send_text(&group.id, t).await?;
    }
    wait_texts(&mut b_events, "B", &sent).await?;
    let id: GroupId = group.id.parse()?;

    // Everything B serves, by version 1 with an empty summary.
    let all = match c
        .node
        .net
        .sync(
            b.node.peer_id,
            SyncRequest::V1(SyncRequestV1 {
                group: id,
                summary: Summary::default(),
                cursor: None,
                max_bytes: MAX_PAGE_BYTES,
                proof: Vec::new(),
            }),
        )
        .await?
    {
        SyncResponse::V1(page) if page.complete => page.envelopes,
        other => panic!("unexpected answer: {other:?}"),
    };
    let stored: Vec<StoredEnvelope> = all
        .iter()
        .map(|bytes| {
            let env = Envelope::decode(bytes).unwrap();
            StoredEnvelope {
                id: MessageId::of(bytes),
                group: id,
                epoch: env.epoch(),
                kind: env.kind(),
                bytes: bytes.clone(),
                received_at_ms: 0,
            }
        })
        .collect();
    let all_apps: Vec<&StoredEnvelope> = stored
        .iter()
        .filter(|e| e.kind == PayloadKind::Application)
        .collect();
    // The 20 texts, and the invite states A sent after each of its two Adds (served too,
    // though they made no history row: a new member fetches them this way).
    assert_eq!(all_apps.len(), 22);
    let text_epoch = all_apps.last().unwrap().epoch;
    let apps: Vec<&StoredEnvelope> = all_apps
        .iter()
        .copied()
        .filter(|e| e.epoch == text_epoch)
        .collect();
    // Hold every commit, everything of earlier epochs, and every other application message
    // of the texts' epoch.
    let held: Vec<StoredEnvelope> = stored
        .iter()
        .filter(|e| e.kind == PayloadKind::Commit)
        .chain(all_apps.iter().copied().filter(|e| e.epoch != text_epoch))
        .chain(apps.iter().step_by(2).copied())
        .cloned()
        .collect();
    let missing: BTreeSet<MessageId> = apps.iter().skip(1).step_by(2).map(|e| e.id).collect();
    let holdings = Holdings::new(held.iter());

    let ask = |want: Want| {
        SyncRequest::V2(SyncRequestV2 {
            group: id,
            want,
            cursor: None,
            max_bytes: MAX_PAGE_BYTES,
            proof: Vec::new(),
        })
    };
    let first = c
        .node
        .net
        .sync(b.node.peer_id, ask(Want::Summary(holdings.summary())))
        .await?;
    let SyncResponse::V2(first) = first else {
        panic!("unexpected answer: {first:?}")
    };
    assert!(first.complete);
    assert!(
        first.envelopes.is_empty(),
        "the summary pass resent held data"
    );
    assert_eq!(first.partial, vec![text_epoch]);
    let mut got = BTreeSet::new();
    for ranges in holdings.refinement(&first.partial) {
        match c
            .node
            .net
            .sync(b.node.peer_id, ask(Want::Ranges(ranges)))
            .await?
        {
            SyncResponse::V2(page) if page.complete => {
                for e in &page.envelopes {
                    assert!(got.insert(MessageId::of(e)), "sent twice");
                }
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    assert_eq!(got, missing);

    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_retention_prunes_history() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestNode::start(dir.path(), loopback_config(vec![])).await?;
    let group = a.node.engine.run(|e| e.create_group("small")).await?;
    let sent: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    for t in &sent {
        a.node.engine.send_text(&group.id, t).await?;
    }
    let ids_before = history_ids(&a, &group.id).await?;
    assert_eq!(ids_before.len(), 11, "creation row plus 10 messages");
    // The three newest in history order: (epoch, sent_at_ms, sender, id), so two messages
    // sent in the same millisecond may list in either order.
    let newest: BTreeSet<String> = a
        .node
        .engine
        .in_group(&group.id, |e, g| e.history(g, 3))
        .await?
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text { text } => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(newest.len(), 3);

    // The default keeps everything; a restart with `[retention] max_messages = 3` prunes at
    // start down to the 3 newest entries.
    let mut a = a.restart().await?;
    assert_eq!(history_ids(&a, &group.id).await?, ids_before);
    a.config.retention.max_messages = 3;
    let a = a.restart().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ids = history_ids(&a, &group.id).await?;
        if ids.len() <= 3 {
            assert_eq!(ids, ids_before[8..]);
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still {} entries after {WAIT:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(texts(&a, &group.id).await?, newest);
    a.node.shutdown().await;
    Ok(())
}

/// A and B in a group created by A; B has read A's text "first".
async fn two_talking(
    dirs: &[tempfile::TempDir],
    name: &str,
) -> anyhow::Result<(TestNode, TestNode, GroupInfo)> {
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot_a = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), loopback_config(vec![boot_a])).await?;
    let (group, invite) = a.group_with_invite(name, 1).await?;
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    a.node
        .engine
        .in_group(&group.id, |e, g| e.send(g, "first"))
        .await?;
    wait_texts(&mut b_events, "B", &["first".to_owned()]).await?;
    Ok((a, b, group))
}

/// Issue 10's loss: a member that comes back and gets a sender's newest messages live
/// before history sync has brought the older ones must still end with every message. B is
/// down while A sends 80 messages; A goes on sending 300 more while B restarts and catches
/// up. B ends with all 380, in A's order, none undecryptable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_member_gets_every_message_although_newer_ones_arrive_first() -> anyhow::Result<()>
{
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, group) = two_talking(&dirs, "restart").await?;

    let b = b.stop().await;
    let mut want: BTreeSet<String> = BTreeSet::from(["first".to_owned()]);
    for i in 0..80 {
        let t = format!("while down {i}");
        a.node.engine.send_text(&group.id, &t).await?;
        want.insert(t);
    }
    // A keeps talking while B comes back.
    let sender = {
        let engine = a.node.engine.clone();
        let id = group.id.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..300 {
                let t = format!("meanwhile {i}");
                engine.send_text(&id, &t).await?;
                sent.push(t);
                if i % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            anyhow::Ok(sent)
        })
    };
    let b = b.start().await?;
    want.extend(sender.await??);
    wait_caught_up(&b, &group.id, &want, 0).await?;
    let info = b
        .node
        .engine
        .in_group(&group.id, |e, g| e.show_group(g))
        .await?;
    assert!(
        info.undecryptable.is_empty(),
        "B could not decrypt: {:?}",
        info.undecryptable
    );
    let in_order = |list: Vec<kith_client::model::MessageInfo>| -> Vec<String> {
        list.into_iter()
            .filter_map(|m| match m.body {
                MessageBody::Text { text } => Some(text),
                _ => None,
            })
            .collect()
    };
    let on_a = in_order(
        a.node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 1000))
            .await?,
    );
    let on_b = in_order(
        b.node
            .engine
            .in_group(&group.id, |e, g| e.history(g, 1000))
            .await?,
    );
    let first_difference = on_a.iter().zip(&on_b).position(|(x, y)| x != y);
    assert!(
        on_a.len() == on_b.len() && first_difference.is_none(),
        "B lists the texts in another order than A: {} vs {} texts, first difference at {first_difference:?}",
        on_a.len(),
        on_b.len()
    );
    Ok(())
}

/// A member that was away while the group went through more epochs than MLS keeps the
/// secrets of (5 past epochs) gets the messages of every one of them: the sync run applies
/// each commit only after the messages of the epoch it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_away_for_many_epochs_reads_the_messages_of_each() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, group) = two_talking(&dirs, "epochs").await?;
    let b = b.stop().await;
    let mut want: BTreeSet<String> = BTreeSet::from(["first".to_owned()]);
    let rounds = 8u64;
    for round in 0..rounds {
        for i in 0..10 {
            let t = format!("epoch round {round} text {i}");
            a.node.engine.send_text(&group.id, &t).await?;
            want.insert(t);
        }
        a.node
            .engine
            .in_group(&group.id, |e, g| e.self_update(g))
            .await?;
    }
    let epoch = a
        .node
        .engine
        .in_group(&group.id, |e, g| e.show_group(g))
        .await?
        .epoch;
    let b = b.start().await?;
    wait_caught_up(&b, &group.id, &want, epoch).await?;
    let info = b
        .node
        .engine
        .in_group(&group.id, |e, g| e.show_group(g))
        .await?;
    assert!(
        info.undecryptable.is_empty(),
        "B could not decrypt: {:?}",
        info.undecryptable
    );
    Ok(())
}
