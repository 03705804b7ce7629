//! Hostile input from the network: a member's node publishes garbage, truncated, forged and
//! mis-addressed envelopes on the group topic. The receiver must not store any of it, must
//! not lose anything it already had, and must keep working.

#![allow(clippy::unwrap_used)]

use kith_client::model::{CreateInviteRequest, MessageBody};
use kith_protocol::envelope::{Envelope, PayloadKind};
use kith_protocol::ids::GroupId;
use kith_tests::{InGroup, TestNode, loopback_config, wait_texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_topic_is_dropped_and_nothing_is_lost() -> anyhow::Result<()> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = TestNode::start(da.path(), loopback_config(vec![])).await?;
    let b = TestNode::start(db.path(), loopback_config(vec![a.bootstrap_peer().await?])).await?;
    let g = a.node.engine.run(|e| e.create_group("g")).await?;
    let inv = a
        .node
        .engine
        .in_group(&g.id, |e, g| {
            e.create_invite(g, CreateInviteRequest::default())
        })
        .await?;
    b.node.engine.join(inv.link).await?;
    let mut b_events = b.node.engine.subscribe();
    a.node
        .engine
        .in_group(&g.id, |e, g| e.send(g, "before"))
        .await?;
    wait_texts(&mut b_events, "B", &["before".to_string()]).await?;

    let gid: GroupId = g.id.parse()?;
    let topic = gid.topic(kith_tests::NETWORK);
    let real = b
        .node
        .engine
        .in_group(&g.id, |e, g| e.history(g, 10))
        .await?;
    // A valid envelope to mutate: B's own last message as stored is not reachable here, so
    // build shapes by hand.
    let header_only = Envelope::new(gid, 1, PayloadKind::Application, vec![0u8; 64])
        .encode()?
        .0;
    let mut truncated = header_only.clone();
    truncated.truncate(header_only.len() / 2);
    let wrong_epoch = Envelope::new(gid, 99, PayloadKind::Commit, vec![1, 2, 3])
        .encode()?
        .0;
    let other_group = Envelope::new(GroupId([7; 32]), 0, PayloadKind::Application, vec![])
        .encode()?
        .0;
    let mut trailing = header_only.clone();
    trailing.push(0);
    for junk in [
        b"not an envelope at all".to_vec(),
        vec![0xff; 4096],
        header_only,
        truncated,
        wrong_epoch,
        other_group,
        trailing,
        Vec::new(),
    ] {
        a.node.net.publish(topic, junk).await?;
    }
    // A genuine message after the junk still arrives, and nothing from the junk was stored.
    a.node
        .engine
        .in_group(&g.id, |e, g| e.send(g, "after"))
        .await?;
    wait_texts(&mut b_events, "B", &["after".to_string()]).await?;
    let history = b
        .node
        .engine
        .in_group(&g.id, |e, g| e.history(g, 100))
        .await?;
    let texts: Vec<_> = history
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, vec!["before", "after"]);
    assert_eq!(
        history.len(),
        real.len() + 1,
        "only the genuine message was added"
    );
    // B is still fully functional: it can send, and A reads it.
    let mut a_events = a.node.engine.subscribe();
    b.node
        .engine
        .in_group(&g.id, |e, g| e.send(g, "still here"))
        .await?;
    wait_texts(&mut a_events, "A", &["still here".to_string()]).await?;
    a.node.shutdown().await;
    b.node.shutdown().await;
    Ok(())
}
