//! `kith-testnet nat-bench` and `kith-testnet up --nat`: the NAT lab's topologies for
//! people, and its figures.
//!
//! Each trial builds a fresh lab ([`crate::natnet::two_homes`]): a public relay and two homes
//! behind the chosen NAT. Ann creates a group and an invite, bob joins by link, and the trial
//! measures the time from bob's `join` call to the first message from ann shown on bob; then
//! whether the two end up directly connected (hole punched) within [`PUNCH_WAIT`]; then the
//! relay's transport bytes while ann sends `messages` texts, per message.

use std::path::Path;
use std::time::{Duration, Instant};

use kith_client::model::{CreateInviteRequest, MessageBody};

use crate::error::{Result, TestnetError};
use crate::natlab::Nat;
use crate::natnet::{NatNet, two_homes};

/// How long a trial waits for the hole punch before counting the pair as relayed.
pub const PUNCH_WAIT: Duration = Duration::from_secs(45);
/// How long anything else in a trial may take.
const STEP: Duration = Duration::from_secs(60);
/// The relay's byte counter (all transports, both directions).
const BYTES_METRIC: &str = "libp2p_bandwidth_bytes_total";

/// What one trial measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trial {
    /// From bob's `join` to ann's first message on bob, in milliseconds.
    pub join_to_first_ms: u64,
    /// Whether the homes ended directly connected.
    pub direct: bool,
    /// Relay transport bytes per message sent after the punch (or without it).
    pub relay_bytes_per_message: f64,
}

/// Builds the lab and forms the group: returns the group id and the join-to-first time.
pub async fn form_group(net: &NatNet) -> Result<(String, Duration)> {
    for i in [1, 2] {
        net.wait_relayed(i, STEP).await?;
    }
    let group = net
        .call(1, "create group", |c| async move {
            c.create_group("nat lab").await
        })
        .await?;
    let g = group.id.clone();
    let invite = net
        .call(1, "invite", move |c| async move {
            c.create_invite(&g, &CreateInviteRequest::default()).await
        })
        .await?;
    let started = Instant::now();
    let link = invite.link;
    net.call(2, "join", move |c| async move { c.join(&link, None).await })
        .await?;
    let (g, text) = (group.id.clone(), "first".to_owned());
    net.call(1, "send", move |c| async move { c.send(&g, &text).await })
        .await?;
    wait_text(net, 2, &group.id, "first").await?;
    Ok((group.id, started.elapsed()))
}

async fn wait_text(net: &NatNet, i: usize, group: &str, text: &str) -> Result<()> {
    let deadline = Instant::now() + STEP;
    loop {
        let g = group.to_owned();
        let history = net
            .call(i, "history", move |c| async move {
                c.history(&g, Some(1000)).await
            })
            .await?;
        if history
            .iter()
            .any(|m| matches!(&m.body, MessageBody::Text { text: t } if t == text))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestnetError::Timeout {
                what: format!("node {i} to show '{text}'"),
                secs: STEP.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One trial behind `nat`, with `messages` texts for the relay byte count.
pub async fn trial(nat: Nat, messages: usize, kith: &Path, root: &Path) -> Result<Trial> {
    let net = two_homes([nat, nat], kith, root).await?;
    let (group, first) = form_group(&net).await?;
    let direct = net
        .wait_status(2, "to connect directly", PUNCH_WAIT, |s| {
            s.relayed_peers == 0 && s.connected_peers >= 2
        })
        .await
        .is_ok();
    let before = net.metric(0, BYTES_METRIC).await?;
    for k in 0..messages {
        let (g, t) = (group.clone(), format!("bench {k}"));
        net.call(1, "send", move |c| async move { c.send(&g, &t).await })
            .await?;
    }
    wait_text(
        &net,
        2,
        &group,
        &format!("bench {}", messages.saturating_sub(1)),
    )
    .await?;
    let after = net.metric(0, BYTES_METRIC).await?;
    Ok(Trial {
        join_to_first_ms: first.as_millis() as u64,
        direct,
        relay_bytes_per_message: (after - before) / messages.max(1) as f64,
    })
}

/// Runs `trials` trials per NAT kind and prints one line per kind.
pub async fn run(
    nats: &[Nat],
    trials: usize,
    messages: usize,
    kith: &Path,
    root: &Path,
) -> Result<()> {
    println!(
        "nat        trials  direct  join->first ms (median, max)  relay bytes/message (median)"
    );
    for &nat in nats {
        let mut results = Vec::new();
        for t in 0..trials {
            let dir = root.join(format!("{nat:?}-{t}").to_lowercase());
            results.push(trial(nat, messages, kith, &dir).await?);
        }
        let mut firsts: Vec<u64> = results.iter().map(|r| r.join_to_first_ms).collect();
        firsts.sort_unstable();
        let mut bytes: Vec<f64> = results.iter().map(|r| r.relay_bytes_per_message).collect();
        bytes.sort_by(f64::total_cmp);
        let direct = results.iter().filter(|r| r.direct).count();
        println!(
            "{:<10} {:>6}  {:>3}/{:<3} {:>10} {:>8}                    {:>10.0}",
            format!("{nat:?}").to_lowercase(),
            trials,
            direct,
            trials,
            firsts.get(firsts.len() / 2).copied().unwrap_or(0),
            firsts.last().copied().unwrap_or(0),
            bytes.get(bytes.len() / 2).copied().unwrap_or(0.0),
        );
    }
    Ok(())
}
