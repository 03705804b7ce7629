//! Metrics: two in-process nodes with `/metrics` on; a group, three messages and some
//! hostile envelopes, then the counters on both sides, read over HTTP as a scraper would.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kith_client::model::CreateInviteRequest;
use kith_node::config::NodeConfig;
use kith_node::metrics::CONTENT_TYPE;
use kith_protocol::envelope::{Envelope, PayloadKind};
use kith_protocol::ids::GroupId;
use kith_tests::{InGroup, TestNode, WAIT, loopback_config, wait_texts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_metrics(mut config: NodeConfig) -> NodeConfig {
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

/// `GET /metrics` over a fresh connection; returns the content type and the body.
async fn scrape(addr: SocketAddr) -> anyhow::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: kith\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((content_type, body.to_owned()))
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Scrapes until every `(series, value)` holds, failing with the last scrape after [`WAIT`].
async fn wait_samples(addr: SocketAddr, who: &str, want: &[(&str, f64)]) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = scrape(addr).await?;
        if want.iter().all(|(s, v)| sample(&text, s) == Some(*v)) {
            return Ok(text);
        }
        if tokio::time::Instant::now() > deadline {
            let got: Vec<_> = want.iter().map(|(s, _)| (*s, sample(&text, s))).collect();
            anyhow::bail!("{who}: wanted {want:?}, got {got:?} in\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_follow_a_conversation() -> anyhow::Result<()> {
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = TestNode::start(da.path(), with_metrics(loopback_config(vec![]))).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(db.path(), with_metrics(loopback_config(vec![boot]))).await?;
    let a_addr = a.node.metrics_addr.unwrap();
    let b_addr = b.node.metrics_addr.unwrap();
    // The bound address is published for tools, like api.addr.
    let written = std::fs::read_to_string(da.path().join("metrics.addr"))?;
    assert_eq!(written.trim().parse::<SocketAddr>()?, a_addr);

    let group = a.node.engine.run(|e| e.create_group("metered")).await?;
    let invite = a
        .node
        .engine
        .in_group(&group.id, |e, g| {
            e.create_invite(g, CreateInviteRequest::default())
        })
        .await?;
    b.node.engine.join(invite.link).await?;
    let mut b_events = b.node.engine.subscribe();
    let texts: Vec<String> = (0..3).map(|i| format!("metered {i}")).collect();
    for t in &texts {
        a.node.engine.send_text(&group.id, t).await?;
    }
    wait_texts(&mut b_events, "B", &texts).await?;

    // Hostile envelopes from A on the group topic, each counted under its reason at B.
    let gid: GroupId = group.id.parse()?;
    let topic = gid.topic(kith_tests::NETWORK);
    let future = Envelope::new(gid, 99, PayloadKind::Commit, vec![1, 2, 3])
        .encode()?
        .0;
    let elsewhere = Envelope::new(GroupId([7; 32]), 0, PayloadKind::Application, vec![])
        .encode()?
        .0;
    for junk in [b"not an envelope".to_vec(), future, elsewhere] {
        a.node.net.publish(topic, junk).await?;
    }

    let short = &group.id[..8];
    let epoch = format!("kith_group_epoch{{group=\"{short}\"}}");
    let members = format!("kith_group_members{{group=\"{short}\"}}");
    let (content_type, _) = scrape(a_addr).await?;
    assert_eq!(content_type, CONTENT_TYPE);
    let a_text = wait_samples(
        a_addr,
        "A",
        &[
            ("kith_messages_sent_total", 3.0),
            ("kith_messages_received_total", 0.0),
            (&epoch, 1.0),
            (&members, 2.0),
            ("kith_invites_created_total", 1.0),
            ("kith_join_requests_total{result=\"accepted\"}", 1.0),
        ],
    )
    .await?;
    let b_text = wait_samples(
        b_addr,
        "B",
        &[
            ("kith_messages_sent_total", 0.0),
            ("kith_messages_received_total", 3.0),
            (&epoch, 1.0),
            (&members, 2.0),
            ("kith_joins_total{result=\"joined\"}", 1.0),
            // Not an envelope, and another group's envelope on this group's topic (the
            // frame's group check, PROTOCOL.md "Sealed frames").
            ("kith_envelopes_rejected_total{reason=\"decode\"}", 2.0),
            ("kith_envelopes_ignored_total{reason=\"future_epoch\"}", 1.0),
            ("kith_envelopes_ignored_total{reason=\"not_member\"}", 0.0),
        ],
    )
    .await?;
    // Every store write is timed.
    assert!(sample(&a_text, "kith_store_commit_seconds_count").unwrap() >= 3.0);
    // libp2p's families and gossipsub's per-topic counts (duplicates included and not) are
    // in the same scrape; the topic label is the topic string.
    let topic_label = format!("{{hash=\"{}\"}}", topic.topic_string());
    for family in [
        "gossipsub_topic_msg_recv_counts_unfiltered_total",
        "gossipsub_topic_msg_recv_counts_total",
    ] {
        let n = sample(&b_text, &format!("{family}{topic_label}"))
            .unwrap_or_else(|| panic!("no {family}{topic_label} in\n{b_text}"));
        assert!(n >= 3.0, "{family} = {n}");
    }
    for family in [
        "# TYPE libp2p_swarm_connections_established counter",
        "# TYPE libp2p_bandwidth_bytes counter",
        "# TYPE libp2p_identify_received counter",
    ] {
        assert!(
            b_text.lines().any(|l| l == family),
            "no {family:?} in\n{b_text}"
        );
    }
    assert!(b_text.ends_with("# EOF\n"));

    a.node.shutdown().await;
    assert!(!da.path().join("metrics.addr").exists());
    b.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_by_default() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestNode::start(dir.path(), loopback_config(vec![])).await?;
    assert_eq!(a.node.metrics_addr, None);
    assert!(!dir.path().join("metrics.addr").exists());
    a.node.shutdown().await;
    Ok(())
}
