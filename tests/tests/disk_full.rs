//! A full disk heals: node A keeps its data directory on a small tmpfs that the test fills
//! up. A refuses sends with the disk-full error (in the API and the CLI) while it keeps
//! answering, says so in `kith status` and its metrics, ignores what B sends meanwhile, and
//! once the filler is deleted writes again by itself, with no restart: its sends succeed, B's
//! messages from the outage arrive through history sync, and nothing stored before is gone.
//!
//! Needs root (CI runs as root) to mount the tmpfs; otherwise it says why and passes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure};
use kith_client::model::{CreateInviteRequest, MessageBody, MessageInfo, NodeEvent, StorageStatus};
use kith_node::engine::EngineError;
use kith_node::store::FailureReason;
use kith_tests::{
    InGroup, TestNode, WAIT, kith, loopback_config, metric, wait_event, wait_texts, with_metrics,
};

/// Size of the tmpfs holding A's data directory.
const TMPFS_SIZE: &str = "32m";
/// Texts exchanged before the disk fills, after it is freed, and sent by B while it is full.
const BEFORE: usize = 5;
const AFTER: usize = 10;
const DURING: usize = 5;
/// Sends A tries while its disk is full.
const REFUSED: usize = 10;
/// Texts B sends right after the disk filled up, before A noticed.
const UNNOTICED: usize = 20;
/// How long A may take to fetch what it missed once its store writes again: well below the
/// 60 s routine sync, so only the sync started on recovery passes.
const SYNC_WAIT: Duration = Duration::from_secs(20);

/// A tmpfs mounted on a temporary directory, unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot (not root, or mounting is not permitted here).
    fn mount(size: &str) -> anyhow::Result<Result<Tmpfs, String>> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1))
            .unwrap_or("unknown");
        if uid != "0" {
            return Ok(Err(format!(
                "mounting a tmpfs needs root, and this test runs as uid {uid}"
            )));
        }
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "kith-disk-full",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Ok(Tmpfs { dir })),
            Ok(out) => Ok(Err(format!(
                "`mount -t tmpfs` is not permitted here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Err(e) => Ok(Err(format!("cannot run `mount`: {e}"))),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a node of a failed test holds files): detach it now, it goes
            // when they are closed.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Fills the file system holding `dir` with a file, until a write fails; returns its path.
fn fill(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match file.write_all(&chunk) {
            Ok(()) => written += chunk.len(),
            Err(e) => {
                ensure!(
                    FailureReason::of_io(&e) == FailureReason::NoSpace,
                    "filling failed for another reason: {e}"
                );
                break;
            }
        }
        ensure!(written < 1 << 30, "the tmpfs never filled up");
    }
    // What a partial chunk left free, too.
    let mut byte = [0u8; 1];
    while file.write_all(&byte).is_ok() {
        byte[0] = byte[0].wrapping_add(1);
    }
    Ok(path)
}

fn texts(history: &[MessageInfo]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in history {
        if let MessageBody::Text { text } = &m.body {
            *counts.entry(text.clone()).or_default() += 1;
        }
    }
    counts
}

fn is_disk_full(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Storage {
            reason: FailureReason::NoSpace,
            ..
        }
    )
}

/// Polls A's status until its storage is in the state `want` says.
async fn wait_storage(
    node: &TestNode,
    what: &str,
    want: fn(&StorageStatus) -> bool,
) -> anyhow::Result<StorageStatus> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let storage = node.node.engine.status().await?.storage;
        if want(&storage) {
            return Ok(storage);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}; storage is {storage:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_then_heals_without_a_restart() -> anyhow::Result<()> {
    let tmpfs = match Tmpfs::mount(TMPFS_SIZE)? {
        Ok(t) => t,
        Err(why) => {
            println!("skipping a_full_disk_refuses_writes_then_heals_without_a_restart: {why}");
            return Ok(());
        }
    };
    let a_dir = tempfile::tempdir_in(tmpfs.path())?;
    let b_dir = tempfile::tempdir()?;

    // A creates the group, so no follow-up sync of a join runs on A: what B sends during
    // the outage can only come back through the sync A starts when its store recovers.
    let a = TestNode::start(a_dir.path(), with_metrics(loopback_config(vec![]))).await?;
    let boot = a.bootstrap_peer().await?;
    let b = TestNode::start(b_dir.path(), loopback_config(vec![boot])).await?;
    let group = a.node.engine.run(|e| e.create_group("disk")).await?;
    let invite = a
        .node
        .engine
        .in_group(&group.id, move |e, g| {
            e.create_invite(
                g,
                CreateInviteRequest {
                    expires_in_secs: None,
                    max_uses: Some(1),
                    approval: false,
                },
            )
        })
        .await?;
    let mut a_events = a.node.engine.subscribe();
    let mut b_events = b.node.engine.subscribe();
    b.node.engine.join(invite.link.clone()).await?;
    wait_event(&mut a_events, "B joined", |e| {
        matches!(e, NodeEvent::EpochChanged { epoch: 1, .. })
    })
    .await?;
    let g = group.id.clone();

    // Before: B's texts reach A, then A's own (durable, so everything before is on disk).
    let from_b: Vec<String> = (0..BEFORE).map(|i| format!("b before {i}")).collect();
    for t in &from_b {
        b.node.engine.send_text(&g, t).await?;
    }
    wait_texts(&mut a_events, "A", &from_b).await?;
    let from_a: Vec<String> = (0..BEFORE).map(|i| format!("a before {i}")).collect();
    for t in &from_a {
        a.node.engine.send_text(&g, t).await?;
    }
    wait_texts(&mut b_events, "B", &from_a).await?;
    let before = a
        .node
        .engine
        .in_group(&g, |e, g| e.history(g, 1000))
        .await?;
    assert_eq!(
        before
            .iter()
            .filter(|m| matches!(m.body, MessageBody::Text { .. }))
            .count(),
        2 * BEFORE
    );

    // The disk fills up. A still stores what B sends, without fsync (redb keeps it in
    // memory) and shows it; the flush that follows within half a second fails, the store
    // reopens its file, and those messages are gone from it. A must reload its MLS state
    // from the file, or it could never decrypt them again when they come back.
    let filler = fill(tmpfs.path())?;
    let unnoticed: Vec<String> = (0..UNNOTICED).map(|i| format!("b unnoticed {i}")).collect();
    for t in &unnoticed {
        b.node.engine.send_text(&g, t).await?;
    }
    wait_texts(&mut a_events, "A", &unnoticed).await?;
    wait_storage(&a, "A's flush to fail", |s| {
        matches!(s, StorageStatus::Failing { .. })
    })
    .await?;

    // From then on sends are refused, with one clear line.
    let dir = a_dir.path().display().to_string();
    let expected = format!(
        "the node cannot write to its disk (no space left on device in {dir}); free some \
         space, the node retries by itself"
    );
    for i in 0..REFUSED {
        let e = a
            .node
            .engine
            .in_group(&g, move |e, g| e.send(g, &format!("a refused {i}")))
            .await
            .expect_err("a send on a full disk");
        assert!(is_disk_full(&e), "{e}");
        assert_eq!(e.to_string(), expected);
    }
    // Other local writes too.
    let e = a
        .node
        .engine
        .run(|e| e.create_group("nope"))
        .await
        .expect_err("a new group on a full disk");
    assert!(is_disk_full(&e), "{e}");
    let e = a
        .node
        .engine
        .in_group(&g, move |e, g| {
            e.create_invite(
                g,
                CreateInviteRequest {
                    expires_in_secs: None,
                    max_uses: Some(1),
                    approval: false,
                },
            )
        })
        .await
        .expect_err("an invite on a full disk");
    assert!(is_disk_full(&e), "{e}");

    // A keeps answering: status says why, and history still reads.
    let storage = a.node.engine.status().await?.storage;
    let StorageStatus::Failing {
        reason, message, ..
    } = &storage
    else {
        bail!("status does not say the storage fails: {storage:?}");
    };
    assert_eq!(reason, "disk_full");
    assert_eq!(message, &expected);
    assert_eq!(metric(&a, "kith_store_failing").await?, 1.0);
    assert!(metric(&a, "kith_store_write_failures_total{reason=\"disk_full\"}").await? >= 1.0);
    let during = a
        .node
        .engine
        .in_group(&g, |e, g| e.history(g, 1000))
        .await?;
    for m in &before {
        assert!(during.contains(m), "lost while the disk is full: {m:?}");
    }
    // The CLI: one line and a failure exit code for a send, the state in `kith status`.
    let out = kith(a_dir.path(), &["send", &g, "from the cli"])?;
    assert!(!out.status.success(), "kith send succeeded on a full disk");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: {expected}\n")
    );
    let out = kith(a_dir.path(), &["status"])?;
    assert!(out.status.success(), "kith status failed: {out:?}");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("storage:   FAILING for ") && l.ends_with(&expected)),
        "{status}"
    );

    // B sends meanwhile; A ignores what it cannot store (the messages stay with B).
    let ignored = metric(&a, "kith_envelopes_ignored_total{reason=\"storage\"}").await?;
    let sent_during: Vec<String> = (0..DURING).map(|i| format!("b during {i}")).collect();
    for t in &sent_during {
        b.node.engine.send_text(&g, t).await?;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&a, "kith_envelopes_ignored_total{reason=\"storage\"}").await?
        < ignored + DURING as f64
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "A never saw B's messages sent while its disk was full"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = texts(
        &a.node
            .engine
            .in_group(&g, |e, g| e.history(g, 1000))
            .await?,
    );
    assert!(
        sent_during.iter().all(|t| !counts.contains_key(t)),
        "{counts:?}"
    );

    // Space comes back: A notices by itself (no send, no restart) and writes again.
    std::fs::remove_file(&filler)?;
    wait_storage(&a, "A's storage to heal", |s| *s == StorageStatus::Ok).await?;
    assert_eq!(metric(&a, "kith_store_failing").await?, 0.0);
    let sent_after: Vec<String> = (0..AFTER).map(|i| format!("a after {i}")).collect();
    let mut ok = 0;
    for t in &sent_after {
        if a.node.engine.send_text(&g, t).await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, AFTER, "sends that succeeded after the disk was freed");
    wait_texts(&mut b_events, "B", &sent_after).await?;

    // What B sent during the outage comes back through history sync; nothing is lost or
    // doubled; what A had before is all there, in the same order.
    let deadline = tokio::time::Instant::now() + SYNC_WAIT;
    let after = loop {
        let after = a
            .node
            .engine
            .in_group(&g, |e, g| e.history(g, 1000))
            .await?;
        let counts = texts(&after);
        if sent_during
            .iter()
            .chain(&unnoticed)
            .all(|t| counts.contains_key(t))
        {
            break after;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "B's messages from the outage did not reach A within {SYNC_WAIT:?}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kept: Vec<&MessageInfo> = after.iter().filter(|m| before.contains(m)).collect();
    assert_eq!(
        kept,
        before.iter().collect::<Vec<_>>(),
        "history before the outage"
    );
    let counts = texts(&after);
    let expected_texts = from_b
        .iter()
        .chain(&from_a)
        .chain(&unnoticed)
        .chain(&sent_during)
        .chain(&sent_after);
    for t in expected_texts {
        assert_eq!(counts.get(t), Some(&1), "{t} in {counts:?}");
    }
    assert!(
        counts
            .keys()
            .all(|t| !t.starts_with("a refused") && t != "from the cli"),
        "a refused send was stored: {counts:?}"
    );

    a.node.shutdown().await;
    b.node.shutdown().await;
    drop(a_dir);
    drop(tmpfs);
    Ok(())
}
