//! Invites over real nodes on loopback: any member honours a link (the inviter may be
//! offline, the link's addresses may be useless), revoked and expired links are refused with
//! their own reasons, a tampered link never leaves the joiner's node, and approval mode runs
//! end to end.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_client::model::{CreateInviteRequest, InviteInfo, InviteSummary, JoinStage, NodeEvent};
use kith_node::engine::EngineError;
use kith_protocol::envelope::JoinRejection;
use kith_protocol::invite::{Invite, InviteParams};
use kith_tests::{InGroup, TestNode, WAIT, loopback_config, wait_event, wait_texts};

/// Creates an invite on `node` for `group`.
async fn invite(
    node: &TestNode,
    group: &str,
    uses: u32,
    secs: Option<u64>,
    approval: bool,
) -> anyhow::Result<InviteInfo> {
    Ok(node
        .node
        .engine
        .in_group(group, move |e, g| {
            e.create_invite(
                g,
                CreateInviteRequest {
                    expires_in_secs: secs,
                    max_uses: Some(uses),
                    approval,
                },
            )
        })
        .await?)
}

/// Polls `node`'s invite list of `group` until `pred` holds for invite `id`.
async fn wait_invite(
    node: &TestNode,
    group: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&InviteSummary) -> bool,
) -> anyhow::Result<InviteSummary> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = node
            .node
            .engine
            .in_group(group, |e, g| e.list_invites(g))
            .await?;
        if let Some(i) = list.iter().find(|i| i.id == id && pred(i)) {
            return Ok(i.clone());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}; invites: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A and B in a group created by A (B joined by A's first invite).
async fn two_members(dirs: &[tempfile::TempDir]) -> anyhow::Result<(TestNode, TestNode, String)> {
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let b = TestNode::start(
        dirs[1].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    let (group, first) = a.group_with_invite("club", 1).await?;
    b.node.engine.join(first.link).await?;
    Ok((a, b, group.id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_member_admits_while_the_inviter_is_stopped() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, g) = two_members(&dirs).await?;
    let inv = invite(&a, &g, 2, None, false).await?;
    // B learns the invite inside the group, and counts no use yet.
    let seen = wait_invite(&b, &g, &inv.id, "B to learn the invite", |i| {
        i.state == "active"
    })
    .await?;
    assert_eq!(seen.creator, a.node.peer_id.to_string());
    assert_eq!((seen.uses, seen.uses_left), (0, 2));

    // The inviter stops; its addresses in the link are dead now.
    a.node.shutdown().await;
    let j = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    let mut progress = j.node.engine.subscribe();
    let joined = j.node.engine.join(inv.link.clone()).await?;
    assert_eq!(joined.id, g);
    assert_eq!(joined.members.len(), 3);
    // The join went through a member found in the DHT.
    wait_event(&mut progress, "a DHT candidate", |e| {
        matches!(e, NodeEvent::JoinProgress { stage: JoinStage::Contacting { via, peer }, .. }
            if via == "dht" && *peer == b.node.peer_id.to_string())
    })
    .await?;
    // B counted the use, and the new member reads the group.
    wait_invite(&b, &g, &inv.id, "B to count the use", |i| i.uses == 1).await?;
    let mut j_events = j.node.engine.subscribe();
    b.node
        .engine
        .in_group(&g, |e, g| e.send(g, "welcome"))
        .await?;
    wait_texts(&mut j_events, "J", &["welcome".to_owned()]).await?;
    j.node.shutdown().await;
    b.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_and_expired_links_are_refused_with_their_reasons() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, g) = two_members(&dirs).await?;
    let j = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;

    // A creates, B (not the creator) revokes; A learns it and refuses the link.
    let inv = invite(&a, &g, 5, None, false).await?;
    wait_invite(&b, &g, &inv.id, "B to learn the invite", |_| true).await?;
    let revoked = b
        .node
        .engine
        .in_group(&g, {
            let invite = inv.id[..8].to_owned();
            move |e, g| e.revoke_invite(g, &invite)
        })
        .await?;
    assert!(revoked.revoked);
    assert_eq!(revoked.state, "revoked");
    wait_invite(&a, &g, &inv.id, "A to learn the revocation", |i| i.revoked).await?;
    let err = j.node.engine.join(inv.link.clone()).await.unwrap_err();
    assert!(
        matches!(err, EngineError::JoinRejected(JoinRejection::Revoked)),
        "{err}"
    );
    assert!(err.to_string().contains("revoked"), "{err}");

    // An expired link is refused with its own reason, before any request.
    let short = invite(&a, &g, 5, Some(1), false).await?;
    let expires_at = short.expires_at;
    while now_secs() < expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = j.node.engine.join(short.link.clone()).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let listed = wait_invite(&a, &g, &short.id, "expired state", |i| i.state == "expired").await?;
    assert_eq!(listed.uses, 0);

    // A used-up link says so.
    let once = invite(&a, &g, 1, None, false).await?;
    wait_invite(&b, &g, &once.id, "B to learn the one-use invite", |_| true).await?;
    j.node.engine.join(once.link.clone()).await?;
    wait_invite(&b, &g, &once.id, "B to count the use", |i| i.uses_left == 0).await?;
    let k_dir = tempfile::tempdir()?;
    let k = TestNode::start(
        k_dir.path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    let err = k.node.engine.join(once.link.clone()).await.unwrap_err();
    assert!(
        matches!(err, EngineError::JoinRejected(JoinRejection::UsedUp)),
        "{err}"
    );
    assert!(err.to_string().contains("used up"), "{err}");
    for n in [a, b, j, k] {
        n.node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn useless_link_addresses_still_join_through_the_dht() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, g) = two_members(&dirs).await?;
    let inv = invite(&a, &g, 1, None, false).await?;
    wait_invite(&b, &g, &inv.id, "B to learn the invite", |_| true).await?;
    // The inviter re-signs the same invite with addresses nobody listens on (a port that was
    // just free, on two loopback addresses).
    let parsed = Invite::parse(&inv.link)?;
    let free_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let key = kith_node::identity::load_keypair(&a.dir)?;
    let bogus = Invite::create(
        InviteParams {
            network: parsed.network.clone(),
            group: parsed.group,
            group_name: parsed.group_name.clone(),
            addrs: vec![
                format!("/ip4/127.0.0.1/tcp/{free_port}").parse()?,
                format!("/ip4/127.0.0.3/tcp/{free_port}").parse()?,
            ],
            secret: parsed.secret,
            expires_at: parsed.expires_at,
            max_uses: parsed.max_uses,
        },
        &key,
    )?;
    // The inviter is gone too, and the joiner only knows a node that is not in the group.
    a.node.shutdown().await;
    let x = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    let j = TestNode::start(
        dirs[3].path(),
        loopback_config(vec![x.bootstrap_peer().await?]),
    )
    .await?;
    let joined = j.node.engine.join(bogus.link().to_owned()).await?;
    assert_eq!(joined.id, g);
    for n in [b, x, j] {
        n.node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_link_is_refused_before_any_traffic() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let (_, inv) = a.group_with_invite("club", 1).await?;
    // A joiner that knows nobody: anything that reached the network would show as a peer.
    let j = TestNode::start(dirs[1].path(), loopback_config(vec![])).await?;
    let mut chars: Vec<char> = inv.link.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
    let tampered: String = chars.into_iter().collect();
    let err = j.node.engine.join(tampered).await.unwrap_err();
    assert!(matches!(err, EngineError::Invite(_)), "{err}");
    assert!(j.node.engine.connected_peers().await?.is_empty());
    assert!(j.node.engine.run(|e| Ok(e.list_groups())).await?.is_empty());
    a.node.shutdown().await;
    j.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_mode_holds_requests_until_a_member_decides() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, g) = two_members(&dirs).await?;
    let inv = invite(&a, &g, 2, None, true).await?;
    assert!(inv.approval);
    wait_invite(&b, &g, &inv.id, "B to learn the invite", |i| i.approval).await?;
    let boot = a.bootstrap_peer().await?;
    let j = TestNode::start(dirs[2].path(), loopback_config(vec![boot.clone()])).await?;
    let k = TestNode::start(dirs[3].path(), loopback_config(vec![boot])).await?;

    // J asks and waits; A sees the held request and approves it.
    let mut j_events = j.node.engine.subscribe();
    let j_engine = j.node.engine.clone();
    let link = inv.link.clone();
    let joining = tokio::spawn(async move { j_engine.join(link).await });
    let held = wait_event(&mut j_events, "J waits for approval", |e| {
        matches!(
            e,
            NodeEvent::JoinProgress {
                stage: JoinStage::AwaitingApproval { .. },
                ..
            }
        )
    })
    .await?;
    let NodeEvent::JoinProgress {
        stage: JoinStage::AwaitingApproval { request, peer },
        ..
    } = held
    else {
        unreachable!()
    };
    // The request is held by whichever member J reached first (A or B).
    let holder = if peer == b.node.peer_id.to_string() {
        &b
    } else {
        &a
    };
    let listed = holder
        .node
        .engine
        .in_group(&g, |e, g| e.join_requests(g))
        .await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, request);
    assert_eq!(listed[0].peer, j.node.peer_id.to_string());
    assert_eq!(listed[0].state, "waiting");
    assert!(!joining.is_finished(), "J must still be waiting");
    let approved = holder
        .node
        .engine
        .in_group(&g, {
            let request = request[..6].to_owned();
            move |e, g| e.decide_join(g, &request, true)
        })
        .await?;
    assert_eq!(approved.state, "approved");
    let joined = tokio::time::timeout(WAIT, joining).await???;
    assert_eq!(joined.id, g);
    let mut j_events = j.node.engine.subscribe();
    a.node
        .engine
        .in_group(&g, |e, g| e.send(g, "approved!"))
        .await?;
    wait_texts(&mut j_events, "J", &["approved!".to_owned()]).await?;

    // K asks too and is denied: a clear refusal, nothing added.
    let mut k_events = k.node.engine.subscribe();
    let k_engine = k.node.engine.clone();
    let link = inv.link.clone();
    let asking = tokio::spawn(async move { k_engine.join(link).await });
    let held = wait_event(&mut k_events, "K waits for approval", |e| {
        matches!(
            e,
            NodeEvent::JoinProgress {
                stage: JoinStage::AwaitingApproval { .. },
                ..
            }
        )
    })
    .await?;
    let NodeEvent::JoinProgress {
        stage: JoinStage::AwaitingApproval { peer, .. },
        ..
    } = held
    else {
        unreachable!()
    };
    let holder = if peer == b.node.peer_id.to_string() {
        &b
    } else {
        &a
    };
    let waiting = holder
        .node
        .engine
        .in_group(&g, |e, g| e.join_requests(g))
        .await?;
    let k_request = waiting
        .iter()
        .find(|r| r.peer == k.node.peer_id.to_string())
        .unwrap();
    holder
        .node
        .engine
        .in_group(&g, {
            let request = k_request.id.clone();
            move |e, g| e.decide_join(g, &request, false)
        })
        .await?;
    let err = tokio::time::timeout(WAIT, asking).await??.unwrap_err();
    assert!(
        matches!(err, EngineError::JoinRejected(JoinRejection::Denied)),
        "{err}"
    );
    assert_eq!(
        a.node
            .engine
            .in_group(&g, |e, g| e.show_group(g))
            .await?
            .members
            .len(),
        3
    );
    for n in [a, b, j, k] {
        n.node.shutdown().await;
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Two members accept the same one-use link at the same moment, each for a different joiner
/// (each joiner can reach only one of them). Exactly one joiner ends up in the group; the
/// other is refused ("used up"), either at once or, if both Add commits were made, after
/// its commit lost (the joiner sees the winning commit, asks again and is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_members_race_to_accept_a_one_use_link() -> anyhow::Result<()> {
    race_to_join(1).await
}

/// The same race with a two-use link: both joiners end up in the group. If both Add
/// commits were made at once, the joiner whose commit lost joins again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joiner_whose_add_commit_lost_joins_again() -> anyhow::Result<()> {
    race_to_join(2).await
}

async fn race_to_join(uses: u32) -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, g) = two_members(&dirs).await?;
    let inv = invite(&a, &g, uses, None, false).await?;
    wait_invite(&b, &g, &inv.id, "B to learn the invite", |_| true).await?;
    let (pa, pb) = (a.node.peer_id, b.node.peer_id);
    let j1 = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    let j2 = TestNode::start(
        dirs[3].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    // J1 can only talk to A, J2 only to B.
    j1.node.net.set_blocked(vec![pb]).await?;
    j2.node.net.set_blocked(vec![pa]).await?;
    let mut e1 = j1.node.engine.subscribe();
    let mut e2 = j2.node.engine.subscribe();
    let (r1, r2) = tokio::join!(
        j1.node.engine.join(inv.link.clone()),
        j2.node.engine.join(inv.link.clone()),
    );
    let joiners = [(&j1, r1, &mut e1), (&j2, r2, &mut e2)];
    // Wait until A and B agree, then count who is in.
    let deadline = tokio::time::Instant::now() + WAIT;
    let members = loop {
        let ga = a.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
        let gb = b.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
        if ga.epoch == gb.epoch
            && ga.epoch_auth == gb.epoch_auth
            && ga.members.len() == 2 + uses as usize
        {
            break ga.members;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("A and B did not converge: {ga:?} / {gb:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut winners = 0;
    for (j, result, events) in joiners {
        let me = j.node.peer_id.to_string();
        if members.iter().any(|m| m.peer_id == me) {
            winners += 1;
            // The winner's own view converges too.
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let gj = j.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
                let ga = a.node.engine.in_group(&g, |e, g| e.show_group(g)).await?;
                if gj.active && gj.epoch_auth == ga.epoch_auth {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("the winning joiner did not converge: {gj:?} vs {ga:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        match result {
            Err(EngineError::JoinRejected(JoinRejection::UsedUp)) => {}
            Err(e) => anyhow::bail!("the losing joiner got an unexpected error: {e}"),
            Ok(_) => {
                // It was added by the losing commit: it must notice and be told "used up".
                wait_event(events, "the losing joiner to be refused", |e| {
                    matches!(e, NodeEvent::JoinProgress { stage: JoinStage::Lost { reason }, .. }
                        if reason.contains("used up"))
                })
                .await?;
                assert!(
                    !j.node
                        .engine
                        .in_group(&g, |e, g| e.show_group(g))
                        .await?
                        .active
                );
            }
        }
    }
    assert_eq!(winners, uses, "joiners in the group: {members:?}");
    for n in [a, b, j1, j2] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// A member added after an invite was created learns it (the member who adds it shares the
/// state of the group's live invites) and can honour it while the creator is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_later_member_honours_an_invite_created_before_it_joined() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let b = TestNode::start(
        dirs[1].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    let (group, for_b) = a.group_with_invite("club", 1).await?;
    let g = group.id;
    let early = invite(&a, &g, 2, None, false).await?;
    b.node.engine.join(for_b.link).await?;
    // B was not a member when `early` was created, yet it learns it, with its use count.
    let seen = wait_invite(&b, &g, &early.id, "B to learn the earlier invite", |_| true).await?;
    assert_eq!(seen.uses, 0, "{seen:?}");
    let j = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    a.node.shutdown().await;
    let joined = j.node.engine.join(early.link).await?;
    assert_eq!(joined.id, g);
    wait_invite(&b, &g, &early.id, "B to count the use", |i| i.uses == 1).await?;
    for n in [b, j] {
        n.node.shutdown().await;
    }
    Ok(())
}

/// A used-up and a revoked link, tried while the inviter is offline and another member is
/// online, get their own reasons: members keep announcing an ended invite until it expires
/// (and the member who added B told B of it), so the joiner finds B in the DHT and B answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ended_links_give_their_reason_while_the_inviter_is_offline() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let b = TestNode::start(
        dirs[1].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    // B uses up a one-use link itself; A revokes another one.
    let (group, used) = a.group_with_invite("club", 1).await?;
    let g = group.id;
    let revoked = invite(&a, &g, 5, None, false).await?;
    b.node.engine.join(used.link.clone()).await?;
    wait_invite(&b, &g, &used.id, "B to know its link is used up", |i| {
        i.state == "used_up"
    })
    .await?;
    a.node
        .engine
        .in_group(&g, {
            let invite = revoked.id.clone();
            move |e, g| e.revoke_invite(g, &invite)
        })
        .await?;
    wait_invite(&b, &g, &revoked.id, "B to learn the revocation", |i| {
        i.revoked
    })
    .await?;
    a.node.shutdown().await;

    let j = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![b.bootstrap_peer().await?]),
    )
    .await?;
    for (link, reason, words) in [
        (&used.link, JoinRejection::UsedUp, "used up"),
        (&revoked.link, JoinRejection::Revoked, "revoked"),
    ] {
        let err = j.node.engine.join(link.clone()).await.unwrap_err();
        assert!(
            matches!(&err, EngineError::JoinRejected(r) if *r == reason),
            "{words}: {err}"
        );
        let text = err.to_string();
        assert!(text.contains(words), "{text}");
        assert!(!text.contains("could not reach"), "{text}");
    }
    for n in [b, j] {
        n.node.shutdown().await;
    }
    Ok(())
}
