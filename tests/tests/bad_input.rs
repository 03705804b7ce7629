//! Hostile input from the network: a node publishes garbage, truncated, forged and
//! mis-addressed envelopes on the group topic, frames too large to read, or floods. The
//! receiver must not store any of it, must not lose anything it already had, must keep
//! working, and must stop listening to the peer (graylisting) or make it start over.

#![allow(clippy::unwrap_used)]

use kith_client::model::{CreateInviteRequest, MessageBody};
use kith_protocol::envelope::{Envelope, PayloadKind};
use kith_protocol::ids::GroupId;
use kith_protocol::seal::{self, SealKey};
use kith_tests::{InGroup, TestNode, loopback_config, wait_texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_topic_is_dropped_and_nothing_is_lost() -> anyhow::Result<()> {
    let (da, db, dc) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let a = TestNode::start(da.path(), loopback_config(vec![])).await?;
    let b = TestNode::start(
        db.path(),
        kith_tests::with_metrics(loopback_config(vec![a.bootstrap_peer().await?])),
    )
    .await?;
    // The garbage comes from C, a node outside the group: B graylists whoever forwards it,
    // and A must not be that peer.
    let c = TestNode::start(dc.path(), loopback_config(vec![b.bootstrap_peer().await?])).await?;
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
    // Each shape twice: as it is (the frame does not open) and sealed with the group's key
    // (as a former member could: the envelope inside does not decode, or is not for B).
    let key = SealKey::of(kith_tests::NETWORK, &gid);
    let shapes = [
        b"not an envelope at all".to_vec(),
        vec![0xff; 4096],
        header_only,
        truncated,
        wrong_epoch,
        other_group,
        trailing,
        Vec::new(),
    ];
    for junk in shapes {
        let sealed = seal::seal(&key, &junk)?;
        c.node.net.publish(topic, junk).await?;
        c.node.net.publish(topic, sealed).await?;
    }
    // B read the garbage (and stopped listening to C after the third, see net::limits).
    wait_metric(&b, "kith_envelopes_rejected_total{reason=\"decode\"}", 3.0).await?;
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
    c.node.shutdown().await;
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
    h.dial(b_addr.clone())?;
    until(&mut h, "B's subscription again", subscribed).await?;
    h.behaviour_mut()
        .gossipsub
        .publish(topic.clone(), b"not an envelope at all".to_vec())
        .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    wait_metric(&b, rejected, before + 1.0).await?;
    assert_eq!(kith_tests::metric(&b, fault).await?, 1.0);

    // Two more within ten minutes, and B refuses the peer for a while.
    for cut in 2u8..=3 {
        if cut > 2 {
            h.dial(b_addr.clone())?;
            until(&mut h, "B's subscription again", subscribed).await?;
        }
        h.behaviour_mut()
            .gossipsub
            .publish(topic.clone(), vec![cut; 300 * 1024])
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
        until(&mut h, "B to close the connection", |ev| match ev {
            SwarmEvent::ConnectionClosed { peer_id, .. } if *peer_id == b_peer => Some(()),
            _ => None,
        })
        .await?;
        wait_metric(&b, fault, f64::from(cut)).await?;
    }
    h.dial(b_addr)?;
    until(&mut h, "B to refuse the connection", |ev| match ev {
        SwarmEvent::ConnectionClosed { peer_id, .. } if *peer_id == b_peer => Some(()),
        SwarmEvent::OutgoingConnectionError { .. } => Some(()),
        _ => None,
    })
    .await?;
    wait_metric(&b, "kith_peer_faults_total{fault=\"banned\"}", 1.0).await?;
    b.node.shutdown().await;
    Ok(())
}

/// B in a group of its own with metrics on, a hostile peer connected to it and on the group
/// topic.
async fn b_and_a_hostile_peer(
    dir: &std::path::Path,
) -> anyhow::Result<(
    TestNode,
    GroupId,
    HostileSwarm,
    libp2p::gossipsub::IdentTopic,
)> {
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let b = TestNode::start(dir, kith_tests::with_metrics(loopback_config(vec![]))).await?;
    let g = b.node.engine.run(|e| e.create_group("g")).await?;
    let gid: GroupId = g.id.parse()?;
    let topic = gossipsub::IdentTopic::new(gid.topic(kith_tests::NETWORK).topic_string());
    let b_peer = b.node.peer_id;
    let mut h = hostile_gossip_peer()?;
    h.behaviour_mut().gossipsub.subscribe(&topic)?;
    h.dial(b.bootstrap_peer().await?.addr)?;
    until(&mut h, "B's subscription", |ev| match ev {
        SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            ..
        })) if *peer_id == b_peer => Some(()),
        _ => None,
    })
    .await?;
    Ok((b, gid, h, topic))
}

/// Drives `h` until `node`'s `series` reaches `at_least` (30 s at most).
async fn drive_until_metric(
    h: &mut HostileSwarm,
    node: &TestNode,
    series: &str,
    at_least: f64,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let wait = wait_metric(node, series, at_least);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            v = &mut wait => return v,
            _ = h.select_next_some() => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_forwarding_invalid_envelopes_is_graylisted() -> anyhow::Result<()> {
    let db = tempfile::tempdir()?;
    let (b, _, mut h, topic) = b_and_a_hostile_peer(db.path()).await?;
    let rejected = "kith_envelopes_rejected_total{reason=\"decode\"}";
    let graylisted = "kith_peers_graylisted";
    // Garbage no honest node forwards, one at a time: each is read and rejected until the
    // score falls below the graylist threshold (three, see net::limits).
    let mut sent = 0;
    while kith_tests::metric(&b, graylisted).await? < 1.0 {
        anyhow::ensure!(sent < 10, "not graylisted after {sent} invalid envelopes");
        sent += 1;
        h.behaviour_mut()
            .gossipsub
            .publish(topic.clone(), format!("garbage {sent}").into_bytes())
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
        drive_until_metric(&mut h, &b, rejected, f64::from(sent)).await?;
        // The graylist count is refreshed every 2 s.
        if sent >= 3 {
            drive_until_metric(&mut h, &b, graylisted, 1.0).await?;
        }
    }
    assert_eq!(sent, 3, "graylisted after the third invalid envelope");
    // From now on nothing it sends is read.
    for i in 0..20 {
        h.behaviour_mut()
            .gossipsub
            .publish(topic.clone(), format!("more garbage {i}").into_bytes())
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    }
    let quiet = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        drive_until_metric(&mut h, &b, rejected, 4.0),
    )
    .await;
    assert!(quiet.is_err(), "a graylisted peer's envelope was read");
    assert_eq!(kith_tests::metric(&b, rejected).await?, 3.0);
    b.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gossip_flooder_is_cut_off_at_the_per_peer_rate() -> anyhow::Result<()> {
    let db = tempfile::tempdir()?;
    let (b, gid, mut h, topic) = b_and_a_hostile_peer(db.path()).await?;
    // Envelopes of B's group from epochs B has not reached, sealed with the topic's key (as
    // a former member could): B opens them but cannot judge them yet (no penalty from the
    // score), so only the per-peer rate stops them.
    let key = SealKey::of(kith_tests::NETWORK, &gid);
    let started = std::time::Instant::now();
    for i in 0u64..3000 {
        let other = Envelope::new(gid, 5 + i, PayloadKind::Application, vec![0; 64])
            .encode()?
            .0;
        let other = seal::seal(&key, &other)?;
        h.behaviour_mut()
            .gossipsub
            .publish(topic.clone(), other)
            .map_err(|e| anyhow::anyhow!("publish {i}: {e}"))?;
    }
    let flood = "kith_peer_faults_total{fault=\"gossip_flood\"}";
    drive_until_metric(&mut h, &b, flood, 1.0).await?;
    drive_until_metric(&mut h, &b, "kith_peers_graylisted", 1.0).await?;
    // What passed: the burst, and the rate for as long as the flood lasted.
    let limit = kith_node::limits::GOSSIP_RATE;
    let allowed = limit.burst + limit.per_sec * started.elapsed().as_secs_f64();
    let mut ignored = 0.0;
    for reason in ["future_epoch", "held"] {
        let series = format!("kith_envelopes_ignored_total{{reason=\"{reason}\"}}");
        ignored += kith_tests::metric(&b, &series).await?;
    }
    assert!(ignored > 0.0, "none of the flood reached the engine");
    assert!(
        ignored <= allowed,
        "{ignored} envelopes of the flood reached the engine, {allowed:.0} allowed"
    );
    assert_eq!(kith_tests::metric(&b, flood).await?, 1.0, "penalised once");
    b.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_on_the_topic_sees_only_sealed_frames_of_bucket_sizes() -> anyhow::Result<()> {
    use futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = TestNode::start(da.path(), loopback_config(vec![])).await?;
    let g = a.node.engine.run(|e| e.create_group("g")).await?;
    let gid: GroupId = g.id.parse()?;
    // A stranger that found the topic (subscriptions are announced to every peer) listens
    // on it from before anyone joins, so it relays the whole group's gossip.
    let topic = gossipsub::IdentTopic::new(gid.topic(kith_tests::NETWORK).topic_string());
    let a_peer = a.node.peer_id;
    let mut h = hostile_gossip_peer()?;
    h.behaviour_mut().gossipsub.subscribe(&topic)?;
    h.dial(a.bootstrap_peer().await?.addr)?;
    until(&mut h, "A's subscription", |ev| match ev {
        SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            ..
        })) if *peer_id == a_peer => Some(()),
        _ => None,
    })
    .await?;
    let (tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
    let capture = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) = h.select_next_some().await
                && tx.send(message.data).is_err()
            {
                return;
            }
        }
    });

    let b = TestNode::start(db.path(), loopback_config(vec![a.bootstrap_peer().await?])).await?;
    let inv = a
        .node
        .engine
        .in_group(&g.id, |e, g| {
            e.create_invite(g, CreateInviteRequest::default())
        })
        .await?;
    b.node.engine.join(inv.link).await?;
    let long = "a longer message, of about a hundred bytes, which a stranger must not tell from a short one";
    for text in ["ok", long] {
        a.node
            .engine
            .in_group(&g.id, |e, g| e.send(g, text))
            .await?;
    }
    b.node
        .engine
        .in_group(&g.id, |e, g| e.send(g, "hi"))
        .await?;

    // Until the capture holds B's add (a commit) and texts of different lengths in one
    // bucket. The test knows the group id, so it can look inside; the stranger cannot.
    let key = SealKey::of(kith_tests::NETWORK, &gid);
    let mut seen: Vec<(usize, Envelope)> = Vec::new();
    let deadline = tokio::time::Instant::now() + kith_tests::WAIT;
    let done = |seen: &[(usize, Envelope)]| {
        let commit = seen.iter().any(|(_, e)| e.kind() == PayloadKind::Commit);
        let apps: Vec<_> = seen
            .iter()
            .filter(|(_, e)| e.kind() == PayloadKind::Application && e.epoch() == 1)
            .collect();
        let same_frame_other_length = apps.iter().any(|(fa, ea)| {
            apps.iter()
                .any(|(fb, eb)| fa == fb && ea.mls().len() != eb.mls().len())
        });
        commit && same_frame_other_length
    };
    while !done(&seen) {
        let frame = tokio::time::timeout_at(deadline, frames.recv())
            .await
            .map_err(|_| anyhow::anyhow!("captured only {} frames", seen.len()))?
            .ok_or_else(|| anyhow::anyhow!("the capture stopped"))?;
        // What the stranger has: a version byte, a nonce and ciphertext of a bucket's size.
        assert_eq!(frame[0], seal::SEAL_VERSION);
        assert!(
            seal::BUCKETS.contains(&(frame.len() - seal::FRAME_OVERHEAD)),
            "a frame of {} bytes is not a bucket",
            frame.len()
        );
        assert!(
            !frame.windows(32).any(|w| w == gid.0),
            "the group id is in the clear"
        );
        assert!(Envelope::decode(&frame).is_err(), "a bare envelope");
        let envelope = Envelope::decode(&seal::open(&key, &frame)?)?;
        assert_eq!(envelope.group(), gid);
        seen.push((frame.len(), envelope));
    }
    capture.abort();
    a.node.shutdown().await;
    b.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_requests_with_a_used_up_link_are_bounded_per_peer_and_per_invite()
-> anyhow::Result<()> {
    use kith_testnet::attack::{self, AttackKind};
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = TestNode::start(da.path(), kith_tests::with_metrics(loopback_config(vec![]))).await?;
    let g = a.node.engine.run(|e| e.create_group("g")).await?;
    let inv = a
        .node
        .engine
        .in_group(&g.id, |e, g| {
            e.create_invite(g, CreateInviteRequest::default())
        })
        .await?;
    let b = TestNode::start(db.path(), loopback_config(vec![a.bootstrap_peer().await?])).await?;
    b.node.engine.join(inv.link.clone()).await?;

    // Eight spammers (eight peer ids, one address) send the used-up link to A, each faster
    // than one peer may: each is answered busy beyond its own burst, and all together
    // beyond the invite's.
    const SPAMMERS: u64 = 8;
    let flood = "kith_peer_faults_total{fault=\"join_flood\"}";
    let refused = "kith_join_requests_total{result=\"refused\"}";
    let target = a.bootstrap_peer().await?.addr;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = std::time::Instant::now();
    let spammers: Vec<_> = (0..SPAMMERS)
        .map(|i| {
            let (target, link, stopped) = (target.clone(), inv.link.clone(), stopped.clone());
            tokio::spawn(async move {
                attack::run(
                    AttackKind::JoinSpam { rate: 20.0 },
                    vec![target],
                    i,
                    Some(&link),
                    stopped,
                )
                .await
            })
        })
        .collect();
    // The engine refused more than the invite's burst (used up, then busy), and every
    // spammer went over its own rate.
    let invite = kith_node::limits::INVITE_JOIN_RATE;
    let per_peer = kith_node::limits::JOIN_RATE;
    wait_metric(&a, refused, invite.burst + 15.0).await?;
    wait_metric(&a, flood, SPAMMERS as f64).await?;
    let _ = stop.send(true);
    let mut used_up = 0;
    let mut busy = 0;
    for s in spammers {
        let stats = s.await??;
        let mine = stats
            .join_answers
            .get("Rejected(UsedUp)")
            .copied()
            .unwrap_or(0);
        // One peer gets its burst and rate through to the engine, no more.
        let allowed = per_peer.burst + per_peer.per_sec * started.elapsed().as_secs_f64();
        assert!(
            mine as f64 <= allowed,
            "{mine} used-up answers to one peer, {allowed:.1} allowed"
        );
        assert_eq!(stats.join_answers.get("Accepted"), None);
        used_up += mine;
        busy += stats
            .join_answers
            .get("Rejected(Busy)")
            .copied()
            .unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = invite.burst + invite.per_sec * elapsed;
    assert!(
        used_up as f64 <= allowed,
        "{used_up} used-up answers for one invite in {elapsed:.1} s, {allowed:.1} allowed"
    );
    // Busy answers beyond the per-peer refusals came from the invite's limit.
    let per_peer_busy = kith_tests::metric(&a, flood).await?;
    assert!(
        busy as f64 > per_peer_busy,
        "the invite's limit never answered busy ({busy} busy, {per_peer_busy} of them per peer)"
    );
    // The group is as it was, and it still works.
    let mut a_events = a.node.engine.subscribe();
    b.node
        .engine
        .in_group(&g.id, |e, g| e.send(g, "still two of us"))
        .await?;
    wait_texts(&mut a_events, "A", &["still two of us".to_string()]).await?;
    let groups = a.node.engine.run(|e| Ok(e.list_groups())).await?;
    assert_eq!(
        groups.iter().map(|g| g.member_count).collect::<Vec<_>>(),
        [2]
    );
    a.node.shutdown().await;
    b.node.shutdown().await;
    Ok(())
}
