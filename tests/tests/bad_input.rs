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

/// What the hostile peer runs: gossipsub, and ping so Kith keeps the connection.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct Hostile {
    gossipsub: libp2p::gossipsub::Behaviour,
    ping: libp2p::ping::Behaviour,
}

type HostileSwarm = libp2p::Swarm<Hostile>;

/// A peer outside Kith (any gossipsub implementation) on B's group topic.
fn hostile_gossip_peer() -> anyhow::Result<HostileSwarm> {
    use libp2p::{gossipsub, noise, ping, tcp, yamux};
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::new(&<sha2::Sha256 as sha2::Digest>::digest(&m.data))
        })
        // Far above Kith's limit, so it does send what Kith cannot take.
        .max_transmit_size(1 << 20)
        .heartbeat_interval(std::time::Duration::from_millis(200))
        .build()?;
    let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
        .map_err(anyhow::Error::msg)?;
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| Hostile {
            gossipsub,
            ping: ping::Behaviour::default(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(std::time::Duration::from_secs(60)))
        .build())
}

/// Drives `swarm` until `done` picks an event, for at most 30 s.
async fn until<T>(
    swarm: &mut HostileSwarm,
    what: &str,
    mut done: impl FnMut(&libp2p::swarm::SwarmEvent<HostileEvent>) -> Option<T>,
) -> anyhow::Result<T> {
    use futures::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let ev = swarm.select_next_some().await;
            if let Some(t) = done(&ev) {
                return t;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))
}

/// Polls `series` on `node`'s metrics until it reaches `at_least`, for at most 30 s.
async fn wait_metric(node: &TestNode, series: &str, at_least: f64) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = kith_tests::metric(node, series).await?;
        if v >= at_least {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {v}, expected {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_gossip_frame_closes_the_connection_so_the_peer_starts_over()
-> anyhow::Result<()> {
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let db = tempfile::tempdir()?;
    let b = TestNode::start(db.path(), kith_tests::with_metrics(loopback_config(vec![]))).await?;
    let g = b.node.engine.run(|e| e.create_group("g")).await?;
    let gid: GroupId = g.id.parse()?;
    let topic = gossipsub::IdentTopic::new(gid.topic(kith_tests::NETWORK).topic_string());
    let b_addr = b.bootstrap_peer().await?.addr;
    let b_peer = b.node.peer_id;
    let mut h = hostile_gossip_peer()?;
    h.behaviour_mut().gossipsub.subscribe(&topic)?;
    let subscribed = |ev: &SwarmEvent<HostileEvent>| match ev {
        SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            ..
        })) if *peer_id == b_peer => Some(()),
        _ => None,
    };

    h.dial(b_addr.clone())?;
    until(&mut h, "B's subscription", subscribed).await?;
    // One frame above B's limit (256 KiB envelopes): B's gossipsub gives up on the stream.
    h.behaviour_mut()
        .gossipsub
        .publish(topic.clone(), vec![0u8; 300 * 1024])
        .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    until(&mut h, "B to close the connection", |ev| match ev {
        SwarmEvent::ConnectionClosed { peer_id, .. } if *peer_id == b_peer => Some(()),
        _ => None,
    })
    .await?;
    let fault = "kith_peer_faults_total{fault=\"gossip_stream_broken\"}";
    assert_eq!(wait_metric(&b, fault, 1.0).await?, 1.0);

    // The peer noticed, so it starts over, and what it publishes reaches B again: B reads
    // (and rejects) its next envelope.
    let rejected = "kith_envelopes_rejected_total{reason=\"decode\"}";
    let before = kith_tests::metric(&b, rejected).await?;
    h.dial(b_addr)?;
    until(&mut h, "B's subscription again", subscribed).await?;
    h.behaviour_mut()
        .gossipsub
        .publish(topic, b"not an envelope at all".to_vec())
        .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    wait_metric(&b, rejected, before + 1.0).await?;
    assert_eq!(kith_tests::metric(&b, fault).await?, 1.0);
    b.node.shutdown().await;
    Ok(())
}
