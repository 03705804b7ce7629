//! Chat features over real nodes (in-process, loopback): profiles that reach later joiners
//! and update everywhere, direct chats, replies, reactions, edits and deletes (also when a
//! member was offline and gets them through history sync), read receipts and typing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kith_client::model::{
    DirectBody, MessageBody, MessageChange, MessageInfo, NodeEvent, ProfileBody,
};
use kith_node::engine::EngineError;
use kith_tests::{InGroup, TestNode, WAIT, group_of, loopback_config, wait_event, wait_mesh};

trait ChatSettings {
    fn config_chat(&mut self, typing: bool, receipts: bool);
}

impl ChatSettings for kith_node::config::NodeConfig {
    fn config_chat(&mut self, typing: bool, receipts: bool) {
        self.chat.typing = typing;
        self.chat.read_receipts = receipts;
    }
}

fn set_name(name: &str) -> ProfileBody {
    ProfileBody {
        name: name.to_owned(),
        avatar: None,
    }
}

async fn history(node: &TestNode, g: &str) -> Vec<MessageInfo> {
    node.node
        .engine
        .in_group(g, |e, g| e.history(g, 1000))
        .await
        .unwrap()
}

/// Polls `node`'s view of message `id` of `g` until `pred` holds.
async fn wait_message(
    node: &TestNode,
    g: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&MessageInfo) -> bool,
) -> anyhow::Result<MessageInfo> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = id.to_owned();
        let got = node
            .node
            .engine
            .in_group(g, move |e, g| e.message(g, &id))
            .await;
        if let Ok(m) = &got
            && pred(m)
        {
            return Ok(got.unwrap());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}; last seen {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text(m: &MessageInfo) -> &str {
    match &m.body {
        MessageBody::Text { text } => text,
        _ => "",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_reach_everyone_and_later_joiners_and_stay_distinguishable() -> anyhow::Result<()>
{
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs[..2], "club").await?;
    let (a, b) = (&nodes[0], &nodes[1]);
    let g = group.id.clone();
    let a_peer = a.node.peer_id.to_string();
    let b_peer = b.node.peer_id.to_string();

    // A sets a name with a bidi override in it; B learns it, neutralised.
    let mut b_events = b.node.engine.subscribe();
    let p = a
        .node
        .engine
        .run(|e| e.set_profile(set_name("Al\u{202E}ice")))
        .await?;
    assert_eq!(p.name, "Alice");
    wait_event(&mut b_events, "A's profile on B", |e| {
        matches!(e, NodeEvent::ProfileUpdated { profile, .. } if profile.peer_id == a_peer && profile.name == "Alice")
    })
    .await?;
    assert_eq!(a.node.engine.status().await?.name.as_deref(), Some("Alice"));
    let sent = a.node.engine.send_text(&g, "hello").await?;
    assert_eq!(sent.sender_name.as_deref(), Some("Alice"));
    let b_sees = wait_message(b, &g, &sent.id, "A's text on B", |_| true).await?;
    assert_eq!(b_sees.sender_name.as_deref(), Some("Alice"));
    assert!(b_sees.sender_label.starts_with("Alice (") && b_sees.sender_label.len() > 10);

    // B takes the same name: the labels still tell them apart.
    let mut a_events = a.node.engine.subscribe();
    b.node
        .engine
        .run(|e| e.set_profile(set_name("Alice")))
        .await?;
    wait_event(
        &mut a_events,
        "B's profile on A",
        |e| matches!(e, NodeEvent::ProfileUpdated { profile, .. } if profile.peer_id == b_peer),
    )
    .await?;
    let members = a
        .node
        .engine
        .in_group(&g, |e, g| e.show_group(g))
        .await?
        .members;
    let labels: Vec<&str> = members.iter().map(|m| m.label.as_str()).collect();
    assert_eq!(labels.len(), 2);
    assert_ne!(labels[0], labels[1], "{labels:?}");
    assert!(members.iter().all(|m| m.name.as_deref() == Some("Alice")));

    // C sets a profile before joining; after the join, A and B know C's name and C knows
    // theirs (A, who added C, sends the members' profiles; C cannot read older messages).
    let c = TestNode::start(
        dirs[2].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    c.node
        .engine
        .run(|e| e.set_profile(set_name("Carol")))
        .await?;
    let c_peer = c.node.peer_id.to_string();
    let invite = a
        .node
        .engine
        .in_group(&g, |e, g| e.create_invite(g, Default::default()))
        .await?;
    let mut c_events = c.node.engine.subscribe();
    c.node.engine.join(invite.link).await?;
    let mut missing = vec![a_peer.clone(), b_peer.clone()];
    while !missing.is_empty() {
        let ev = wait_event(&mut c_events, "A's and B's profiles on C", |e| {
            matches!(e, NodeEvent::ProfileUpdated { .. })
        })
        .await?;
        if let NodeEvent::ProfileUpdated { profile, .. } = ev {
            missing.retain(|p| *p != profile.peer_id);
        }
    }
    let on_a = a.node.engine.run(move |e| e.profile_of(&c_peer)).await;
    let on_a = match on_a {
        Ok(p) => p,
        Err(_) => {
            wait_event(&mut a_events, "C's profile on A", |e| {
                matches!(e, NodeEvent::ProfileUpdated { profile, .. } if profile.name == "Carol")
            })
            .await?;
            let c_peer = c.node.peer_id.to_string();
            a.node.engine.run(move |e| e.profile_of(&c_peer)).await?
        }
    };
    assert_eq!(on_a.name, "Carol");

    // A renames itself: everyone has the new name, and old messages show it.
    let mut c_events = c.node.engine.subscribe();
    a.node
        .engine
        .run(|e| e.set_profile(set_name("Alice B")))
        .await?;
    wait_event(
        &mut c_events,
        "A's new name on C",
        |e| matches!(e, NodeEvent::ProfileUpdated { profile, .. } if profile.name == "Alice B"),
    )
    .await?;
    wait_message(b, &g, &sent.id, "A's new name on B", |m| {
        m.sender_name.as_deref() == Some("Alice B")
    })
    .await?;

    // An avatar travels with the profile and is served as it was set.
    let png = {
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        v.extend_from_slice(&[7; 100]);
        v
    };
    let b64 = data_encoding::BASE64.encode(&png);
    let mut b_events = b.node.engine.subscribe();
    a.node
        .engine
        .run(move |e| {
            e.set_profile(ProfileBody {
                name: "Alice B".into(),
                avatar: Some(b64),
            })
        })
        .await?;
    wait_event(&mut b_events, "A's avatar on B", |e| {
        matches!(e, NodeEvent::ProfileUpdated { profile, .. } if profile.avatar.as_deref() == Some("image/png"))
    })
    .await?;
    let a_peer2 = a_peer.clone();
    let (mime, bytes) = b.node.engine.run(move |e| e.avatar_of(&a_peer2)).await?;
    assert_eq!((mime, bytes), ("image/png", png));
    // Not an image, or too large: refused, nothing changes.
    let refused = a
        .node
        .engine
        .run(|e| {
            e.set_profile(ProfileBody {
                name: "X".into(),
                avatar: Some(data_encoding::BASE64.encode(b"<svg onload=alert(1)>")),
            })
        })
        .await;
    assert!(
        matches!(refused, Err(EngineError::BadRequest(_))),
        "{refused:?}"
    );
    assert_eq!(
        a.node.engine.run(|e| e.own_profile()).await?.unwrap().name,
        "Alice B"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replies_reactions_edits_and_deletes_reach_every_member() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs, "club").await?;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    wait_mesh(&[a, b, c]).await?;
    let g = group.id.clone();
    let b_peer = b.node.peer_id.to_string();
    let c_peer = c.node.peer_id.to_string();

    let hello = a.node.engine.send_text(&g, "hello").await?;
    let id = hello.id.clone();
    for n in [b, c] {
        wait_message(n, &g, &id, "hello", |_| true).await?;
    }
    // B answers it, by a unique prefix of its id.
    let prefix = id[..10].to_owned();
    let reply = b
        .node
        .engine
        .in_group(&g, move |e, g| e.reply(g, "hi back", &prefix))
        .await?;
    for n in [a, c] {
        let r = wait_message(n, &g, &reply.id, "the reply", |_| true).await?;
        let to = r.reply_to.unwrap();
        assert_eq!(to.id, id);
        assert_eq!(to.excerpt.as_deref(), Some("hello"));
    }

    // C and B react 👍; B takes it back; C adds 🎉. Everyone ends with 👍 by C and 🎉 by C.
    let mut a_events = a.node.engine.subscribe();
    for (node, emoji, on) in [
        (c, "👍", true),
        (b, "👍", true),
        (b, "👍", false),
        (c, "🎉", true),
    ] {
        let (id, emoji) = (id.clone(), emoji.to_owned());
        node.node
            .engine
            .in_group(&g, move |e, g| e.react(g, &id, &emoji, on))
            .await?;
    }
    wait_event(&mut a_events, "a reaction event on A", |e| {
        matches!(e, NodeEvent::MessageChanged { change: MessageChange::Reaction { .. }, message: Some(m), .. } if m.id == id)
    })
    .await?;
    for n in [a, b, c] {
        wait_message(n, &g, &id, "the reactions", |m| {
            m.reactions.len() == 2
                && m.reactions[0].emoji == "👍"
                && m.reactions[0].by == [c_peer.clone()]
                && m.reactions[1].emoji == "🎉"
        })
        .await?;
    }
    assert!(
        !history(a, &g)
            .await
            .iter()
            .any(|m| matches!(m.body, MessageBody::Reaction { .. }))
    );

    // A edits its text: everyone shows the new text and that it was edited.
    let (id2, prefix) = (id.clone(), id[..12].to_owned());
    let edited = a
        .node
        .engine
        .in_group(&g, move |e, g| e.edit(g, &prefix, "hello, world"))
        .await?;
    assert_eq!(text(&edited), "hello, world");
    assert!(edited.edited_at_ms.is_some());
    for n in [b, c] {
        wait_message(n, &g, &id2, "the edit", |m| {
            text(m) == "hello, world" && m.edited_at_ms.is_some()
        })
        .await?;
    }
    // Only its sender may edit or delete it: B's attempts are refused and change nothing.
    for delete in [false, true] {
        let id = id.clone();
        let refused = b
            .node
            .engine
            .in_group(&g, move |e, g| {
                if delete {
                    e.delete_message(g, &id)
                } else {
                    e.edit(g, &id, "forged")
                }
            })
            .await;
        match refused {
            Err(EngineError::BadRequest(why)) => assert!(why.contains("only its sender"), "{why}"),
            other => panic!("B changed A's message: {other:?}"),
        }
    }

    // A deletes it: a tombstone everywhere; the reply no longer quotes it.
    let id3 = id.clone();
    a.node
        .engine
        .in_group(&g, move |e, g| e.delete_message(g, &id3))
        .await?;
    for n in [a, b, c] {
        wait_message(n, &g, &id, "the delete", |m| {
            m.deleted && text(m).is_empty()
        })
        .await?;
        let r = wait_message(n, &g, &reply.id, "the reply after the delete", |_| true).await?;
        assert_eq!(r.reply_to.unwrap().excerpt, None);
    }
    // A deleted message cannot be edited again.
    let id4 = id.clone();
    assert!(
        a.node
            .engine
            .in_group(&g, move |e, g| e.edit(g, &id4, "again"))
            .await
            .is_err()
    );
    // The words are gone from B's database too (the row and the edit's row are blanked).
    let mut nodes = nodes;
    let b = nodes.swap_remove(1).stop().await;
    let store = kith_node::engine::open_store(&b.dir)?;
    let gid: kith_protocol::ids::GroupId = g.parse().unwrap();
    for h in store.history(&gid, 1000)? {
        if let Some(t) = h.kind.text() {
            assert!(!t.contains("hello"), "{h:?}");
        }
    }
    drop(b_peer);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_member_gets_reactions_and_edits_through_history_sync() -> anyhow::Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, group) = group_of(&dirs, "club").await?;
    let g = group.id.clone();
    let c = nodes.pop().unwrap().stop().await;
    let (a, b) = (&nodes[0], &nodes[1]);

    // While C is away: A says something, B reacts, A edits it, B replies, A deletes
    // another text.
    let m1 = a.node.engine.send_text(&g, "first words").await?;
    let gone = a.node.engine.send_text(&g, "regrettable").await?;
    wait_message(b, &g, &gone.id, "A's texts on B", |_| true).await?;
    let (id, id2) = (m1.id.clone(), gone.id.clone());
    b.node
        .engine
        .in_group(&g, move |e, g| e.react(g, &id, "❤️", true))
        .await?;
    let id = m1.id.clone();
    a.node
        .engine
        .in_group(&g, move |e, g| e.edit(g, &id, "better words"))
        .await?;
    let id = m1.id.clone();
    let reply = b
        .node
        .engine
        .in_group(&g, move |e, g| e.reply(g, "agreed", &id))
        .await?;
    a.node
        .engine
        .in_group(&g, move |e, g| e.delete_message(g, &id2))
        .await?;

    // C comes back and syncs: it shows what the others show.
    let c = c.start().await?;
    let b_peer = b.node.peer_id.to_string();
    let m = wait_message(&c, &g, &m1.id, "the edit and reaction on C", |m| {
        text(m) == "better words" && m.reactions.len() == 1
    })
    .await?;
    assert_eq!(m.reactions[0].by, [b_peer]);
    wait_message(&c, &g, &gone.id, "the delete on C", |m| m.deleted).await?;
    let r = wait_message(&c, &g, &reply.id, "the reply on C", |_| true).await?;
    // The reply quotes the answered message as it reads now.
    assert_eq!(r.reply_to.unwrap().excerpt.as_deref(), Some("better words"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_chats_start_from_a_shared_group_or_a_link_and_are_found_again() -> anyhow::Result<()>
{
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, _group) = group_of(&dirs[..3], "club").await?;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (a_peer, b_peer) = (a.node.peer_id.to_string(), b.node.peer_id.to_string());
    b.node
        .engine
        .run(|e| e.set_profile(set_name("Bob")))
        .await?;
    // A knows Bob's name before asking for him by name.
    let deadline = tokio::time::Instant::now() + WAIT;
    let b2 = b_peer.clone();
    while !a
        .node
        .engine
        .run({
            let b2 = b2.clone();
            move |e| Ok(e.profile_of(&b2).is_ok())
        })
        .await?
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never learned Bob's name"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut b_events = b.node.engine.subscribe();
    let dm = a
        .node
        .engine
        .run(|e| {
            e.start_direct(DirectBody {
                peer: Some("bob".into()),
                link: false,
            })
        })
        .await?;
    assert!(dm.created);
    assert_eq!(dm.with.as_ref().unwrap().peer_id, b_peer);
    // B joins by itself and marks it a direct chat with A.
    wait_event(
        &mut b_events,
        "B joins the direct chat",
        |e| matches!(e, NodeEvent::GroupJoined(g) if g.id == dm.group.id),
    )
    .await?;
    let dm_id = dm.group.id.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let groups = b.node.engine.run(|e| Ok(e.list_groups())).await?;
        let found = groups.iter().find(|g| g.id == dm_id);
        if found
            .and_then(|g| g.direct.as_ref())
            .map(|p| p.peer_id.as_str())
            == Some(&a_peer)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never marked it direct: {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It works like any chat.
    let m = a.node.engine.send_text(&dm_id, "just us").await?;
    wait_message(b, &dm_id, &m.id, "the direct message on B", |_| true).await?;
    // A second `dm` from either side finds it.
    let again = a
        .node
        .engine
        .run(move |e| {
            e.start_direct(DirectBody {
                peer: Some(b2),
                link: false,
            })
        })
        .await?;
    assert!(!again.created);
    assert_eq!(again.group.id, dm_id);
    let from_b = b
        .node
        .engine
        .run(move |e| {
            e.start_direct(DirectBody {
                peer: Some(a_peer),
                link: false,
            })
        })
        .await?;
    assert!(!from_b.created);
    assert_eq!(from_b.group.id, dm_id);

    // The offer's link admits only B: C, who saw it in the shared group, is refused.
    // (C may not join a direct chat of others even with a fresh link of that chat.)
    let link = a
        .node
        .engine
        .in_group(&dm_id, |e, g| e.create_invite(g, Default::default()))
        .await?
        .link;
    let refused = c.node.engine.join(link).await;
    assert!(refused.is_err(), "C joined A and B's direct chat");

    // With a link, for someone who shares no group: whoever joins first.
    let d = TestNode::start(
        dirs[3].path(),
        loopback_config(vec![a.bootstrap_peer().await?]),
    )
    .await?;
    let by_link = a
        .node
        .engine
        .run(|e| {
            e.start_direct(DirectBody {
                peer: None,
                link: true,
            })
        })
        .await?;
    let joined = d.node.engine.join(by_link.link.unwrap()).await?;
    assert_eq!(joined.id, by_link.group.id);
    let d_peer = d.node.peer_id.to_string();
    let a_peer = a.node.peer_id.to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let on_a = a.node.engine.run(|e| Ok(e.list_groups())).await?;
        let on_d = d.node.engine.run(|e| Ok(e.list_groups())).await?;
        let with = |list: &[kith_client::model::GroupSummary]| {
            list.iter()
                .find(|g| g.id == joined.id)
                .and_then(|g| g.direct.clone())
                .map(|p| p.peer_id)
        };
        if with(&on_a) == Some(d_peer.clone()) && with(&on_d) == Some(a_peer.clone()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link chat is not direct on both"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_receipts_and_typing_follow_each_nodes_settings() -> anyhow::Result<()> {
    // A and B send typing notices; C sends no read receipts.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |typing: bool, receipts: bool, boot| {
        let mut c = loopback_config(boot);
        c.config_chat(typing, receipts);
        c
    };
    let a = TestNode::start(dirs[0].path(), config(true, true, vec![])).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(dirs[1].path(), config(true, true, vec![boot.clone()])).await?;
    let c = TestNode::start(dirs[2].path(), config(false, false, vec![boot])).await?;
    let (group, invite) = a.group_with_invite("club", 2).await?;
    let g = group.id.clone();
    let mut a_events = a.node.engine.subscribe();
    for n in [&b, &c] {
        n.node.engine.join(invite.link.clone()).await?;
    }
    wait_event(&mut a_events, "both joined", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 2, .. })
    })
    .await?;
    wait_mesh(&[&a, &b, &c]).await?;
    let b_peer = b.node.peer_id.to_string();
    let c_peer = c.node.peer_id.to_string();

    let m = a.node.engine.send_text(&g, "read me").await?;
    for n in [&b, &c] {
        wait_message(n, &g, &m.id, "A's text", |_| true).await?;
    }
    // B reads it: A is told and shows it read by B.
    let mut a_events = a.node.engine.subscribe();
    let _ = &mut a_events;
    b.node
        .engine
        .in_group(&g, |e, g| e.mark_read(g, None))
        .await?;
    wait_event(
        &mut a_events,
        "B's receipt on A",
        |e| matches!(e, NodeEvent::Read { peer, up_to, .. } if *peer == b_peer && *up_to == m.id),
    )
    .await?;
    let seen = wait_message(&a, &g, &m.id, "read by B", |m| {
        m.read_by.iter().map(|p| &p.peer_id).eq([&b_peer])
    })
    .await?;
    assert_eq!(seen.read_by.len(), 1);

    // C reads it with receipts off, then writes: A gets C's text (C's messages arrive in
    // C's order), and no receipt of C came before it.
    c.node
        .engine
        .in_group(&g, |e, g| e.mark_read(g, None))
        .await?;
    let after = c.node.engine.send_text(&g, "after reading").await?;
    wait_message(&a, &g, &after.id, "C's text on A", |_| true).await?;
    let m_now = a
        .node
        .engine
        .in_group(&g, {
            let id = m.id.clone();
            move |e, g| e.message(g, &id)
        })
        .await?;
    assert!(
        !m_now.read_by.iter().any(|p| p.peer_id == c_peer),
        "{m_now:?}"
    );

    // Typing: B's notice reaches A; C (typing off) sends none, and at most one per few
    // seconds is sent.
    assert!(b.node.engine.in_group(&g, |e, g| e.typing(g)).await?);
    assert!(!b.node.engine.in_group(&g, |e, g| e.typing(g)).await?);
    wait_event(
        &mut a_events,
        "B typing on A",
        |e| matches!(e, NodeEvent::Typing { peer, .. } if peer.peer_id == b_peer),
    )
    .await?;
    assert!(!c.node.engine.in_group(&g, |e, g| e.typing(g)).await?);
    Ok(())
}
