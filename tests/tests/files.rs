//! Files over real nodes (in-process, loopback): a 50 MiB file reaches every member of a
//! five-node group; the sender goes offline halfway and the download completes from another
//! member; a hostile member's corrupted chunks are caught and fetched elsewhere; names that
//! try to leave the directory are neutralised; a deleted message deletes its file on every
//! member. The restart-in-the-middle test with killed processes is in `files_crash.rs`.

#![allow(clippy::unwrap_used)]

use kith_client::Client;
use kith_client::model::{FileInfo, FileStatus, MessageBody, MessageInfo, NodeEvent};
use kith_tests::{InGroup, TestNode, group_of, test_seed, wait_event, wait_mesh, with_metrics};
use sha2::{Digest, Sha256};

fn client(node: &TestNode) -> Client {
    Client::new(
        &format!("http://{}/", node.node.api_addr),
        node.node.api_token.clone(),
    )
    .unwrap()
}

fn file_of(m: &MessageInfo) -> &FileInfo {
    match &m.body {
        MessageBody::File { file } => file,
        other => panic!("not a file message: {other:?}"),
    }
}

/// Waits until the message's file is complete on `node`.
async fn wait_complete(node: &TestNode, g: &str, message: &str, who: &str) -> anyhow::Result<()> {
    let mut events = node.node.engine.subscribe();
    let id = message.to_owned();
    let m = node
        .node
        .engine
        .in_group(g, move |e, g| e.message(g, &id))
        .await?;
    let file = file_of(&m).clone();
    if file.state.status == FileStatus::Complete {
        return Ok(());
    }
    wait_event(&mut events, &format!("the file complete on {who}"), |e| {
        matches!(e, NodeEvent::FileProgress { file: f, state, .. } if *f == file.id && state.status == FileStatus::Complete)
    })
    .await?;
    Ok(())
}

/// The SHA-256 of the file of `message` as `node` serves it over its API.
async fn saved_hash(node: &TestNode, g: &str, message: &str) -> anyhow::Result<[u8; 32]> {
    let mut out = Vec::new();
    client(node).save_file(g, message, &mut out).await?;
    Ok(Sha256::digest(&out).into())
}

async fn download(node: &TestNode, g: &str, message: &str) -> anyhow::Result<()> {
    let id = message.to_owned();
    node.node
        .engine
        .in_group(g, move |e, g| e.download_file(g, &id))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_50_mib_file_reaches_every_member_of_a_five_node_group() -> anyhow::Result<()> {
    let seed = test_seed();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs, "photos").await?;
    let g = group.id.clone();
    let src = tempfile::tempdir()?;
    let path = src.path().join("holiday.bin");
    let hash = kith_tests::write_random_file(&path, 50 << 20, seed);
    let sent = client(&nodes[0])
        .send_file(&g, &path, "holiday.bin", Some("all of it"))
        .await?;
    let f = file_of(&sent);
    assert_eq!((f.size, f.caption.as_str()), (50 << 20, "all of it"));
    assert_eq!(f.state.status, FileStatus::Complete, "the sender holds it");
    // The others fetch it (above the automatic download size), all at once.
    for n in &nodes[1..] {
        wait_message_arrives(n, &g, &sent.id).await?;
        download(n, &g, &sent.id).await?;
    }
    for (i, n) in nodes.iter().enumerate().skip(1) {
        wait_complete(n, &g, &sent.id, &format!("node {i}")).await?;
        assert_eq!(
            saved_hash(n, &g, &sent.id).await?,
            hash,
            "node {i} (seed {seed})"
        );
    }
    Ok(())
}

async fn wait_message_arrives(node: &TestNode, g: &str, id: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + kith_tests::WAIT;
    loop {
        let q = id.to_owned();
        if node
            .node
            .engine
            .in_group(g, move |e, g| e.message(g, &q))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "message {id} never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sender_goes_offline_halfway_and_the_download_completes_from_another_member()
-> anyhow::Result<()> {
    let seed = test_seed();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, group) = group_of(&dirs, "team").await?;
    let g = group.id.clone();
    // C fetches slowly (2 MiB/s) and only when asked, so the sender is gone before it is
    // done.
    let c = nodes.pop().unwrap();
    let mut config = with_metrics(c.config.clone());
    config.files.download_bytes_per_sec = 2 << 20;
    config.files.auto_download_bytes = 0;
    let c = {
        let stopped = c.stop().await;
        TestNode::start(&stopped.dir, config).await?
    };
    let b = nodes.pop().unwrap();
    let b = {
        let stopped = b.stop().await;
        TestNode::start(&stopped.dir, with_metrics(stopped.config)).await?
    };
    let a = nodes.pop().unwrap();
    wait_mesh(&[&a, &b, &c]).await?;
    let src = tempfile::tempdir()?;
    let path = src.path().join("report.pdf");
    let hash = kith_tests::write_random_file(&path, 8 << 20, seed);
    let sent = client(&a).send_file(&g, &path, "report.pdf", None).await?;
    let file = file_of(&sent).clone();
    wait_message_arrives(&b, &g, &sent.id).await?;
    download(&b, &g, &sent.id).await?;
    wait_complete(&b, &g, &sent.id, "B").await?;
    // C starts; once it holds a quarter, the sender stops.
    wait_message_arrives(&c, &g, &sent.id).await?;
    let mut events = c.node.engine.subscribe();
    download(&c, &g, &sent.id).await?;
    wait_event(&mut events, "C a quarter through", |e| {
        matches!(e, NodeEvent::FileProgress { file: f, state, .. } if *f == file.id && state.have_bytes >= file.size / 4)
    })
    .await?;
    let c_state = c.node.engine.files().state(&file.id.parse()?);
    assert_eq!(
        c_state.status,
        FileStatus::Downloading,
        "C is halfway: {c_state:?}"
    );
    a.stop().await;
    wait_complete(&c, &g, &sent.id, "C").await?;
    assert_eq!(saved_hash(&c, &g, &sent.id).await?, hash, "seed {seed}");
    let served_by_b = kith_tests::metric(&b, "kith_file_chunks_served_total").await?;
    assert!(served_by_b >= 1.0, "B served {served_by_b} chunks");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_chunk_from_a_hostile_member_is_caught_and_fetched_elsewhere()
-> anyhow::Result<()> {
    let seed = test_seed();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, group) = group_of(&dirs, "team").await?;
    let g = group.id.clone();
    // C fetches only when asked: after B holds the file.
    let c = nodes.pop().unwrap();
    let c = {
        let s = c.stop().await;
        let mut config = with_metrics(s.config);
        config.files.auto_download_bytes = 0;
        TestNode::start(&s.dir, config).await?
    };
    // B flips a bit in every chunk it serves.
    let b = nodes.pop().unwrap();
    let b = {
        let s = b.stop().await;
        let mut config = s.config;
        config.files.corrupt_served = true;
        TestNode::start(&s.dir, config).await?
    };
    let a = nodes.pop().unwrap();
    wait_mesh(&[&a, &b, &c]).await?;
    let src = tempfile::tempdir()?;
    let path = src.path().join("data.bin");
    let hash = kith_tests::write_random_file(&path, 6 << 20, seed);
    let sent = client(&a).send_file(&g, &path, "data.bin", None).await?;
    wait_message_arrives(&b, &g, &sent.id).await?;
    download(&b, &g, &sent.id).await?;
    wait_complete(&b, &g, &sent.id, "B").await?;
    wait_message_arrives(&c, &g, &sent.id).await?;
    download(&c, &g, &sent.id).await?;
    wait_complete(&c, &g, &sent.id, "C").await?;
    assert_eq!(saved_hash(&c, &g, &sent.id).await?, hash, "seed {seed}");
    let bad = kith_tests::metric(&c, "kith_file_bad_answers_total").await?;
    assert!(bad >= 1.0, "C never asked B, or did not notice: {bad}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_names_are_neutralised_and_a_deleted_message_deletes_its_file_everywhere()
-> anyhow::Result<()> {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (nodes, group) = group_of(&dirs, "team").await?;
    let (a, b) = (&nodes[0], &nodes[1]);
    let g = group.id.clone();
    let src = tempfile::tempdir()?;
    let path = src.path().join("x");
    kith_tests::write_random_file(&path, 300_000, 7);
    let sent = client(a)
        .send_file(&g, &path, "../../.ssh/authorized_keys\u{202E}txt.exe", None)
        .await?;
    assert_eq!(file_of(&sent).name, "authorized_keystxt.exe");
    // Small enough to be fetched by itself as it arrives.
    wait_message_arrives(b, &g, &sent.id).await?;
    wait_complete(b, &g, &sent.id, "B").await?;
    let id = sent.id.clone();
    let on_b = b
        .node
        .engine
        .in_group(&g, move |e, g| e.message(g, &id))
        .await?;
    assert_eq!(file_of(&on_b).name, "authorized_keystxt.exe");
    let file_id = file_of(&on_b).id.parse()?;
    assert!(b.node.engine.files().store().meta(file_id)?.is_some());
    // A deletes it: B's copy goes too, and the message is a tombstone.
    let mut events = b.node.engine.subscribe();
    let id = sent.id.clone();
    a.node
        .engine
        .in_group(&g, move |e, g| e.delete_message(g, &id))
        .await?;
    wait_event(&mut events, "the file deleted on B", |e| {
        matches!(e, NodeEvent::FileProgress { state, .. } if state.status == FileStatus::Deleted)
    })
    .await?;
    assert!(b.node.engine.files().store().meta(file_id)?.is_none());
    assert!(a.node.engine.files().store().meta(file_id)?.is_none());
    let id = sent.id.clone();
    let gone = b
        .node
        .engine
        .in_group(&g, move |e, g| e.message(g, &id))
        .await?;
    assert!(gone.deleted);
    let id = sent.id.clone();
    assert!(
        b.node
            .engine
            .in_group(&g, move |e, g| e.download_file(g, &id))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_over_the_nodes_limit_is_refused_with_one_clear_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = kith_tests::loopback_config(vec![]);
    config.files.max_file_bytes = 1 << 20;
    let node = TestNode::start(dir.path(), config).await?;
    let g = node.node.engine.run(|e| e.create_group("solo")).await?.id;
    let src = tempfile::tempdir()?;
    let path = src.path().join("big.bin");
    kith_tests::write_random_file(&path, 2 << 20, 1);
    let err = client(&node)
        .send_file(&g, &path, "big.bin", None)
        .await
        .unwrap_err();
    let line = err.to_string();
    assert!(
        line.contains("larger than this node sends (1.0 MiB") && !line.contains('\n'),
        "{line}"
    );
    // A client that does not ask first gets the same answer from the node, as JSON.
    let addr = node.node.api_addr;
    let auth = format!("Authorization: Bearer {}", node.node.api_token);
    let path = format!("/v1/groups/{g}/files?name=big.bin");
    // Only the head: the node answers from the declared length, before any of the body.
    let response = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(kith_tests::WAIT))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nContent-Length: 2097152\r\n\r\n"
        )?;
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await??;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("payload_too_large"), "{response}");
    // Nothing was stored.
    assert!(node.node.engine.files().store().list()?.is_empty());
    Ok(())
}
