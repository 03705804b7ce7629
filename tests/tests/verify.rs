//! Member verification across real nodes: both members compute the same safety number, a
//! mark survives a restart and a membership change, a mark whose key is not the member's is
//! dropped and reported; and `kith verify` with real `kith` processes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use kith_client::Client;
use kith_client::model::NodeEvent;
use kith_node::store::Store;
use kith_protocol::verify::{SafetyNumber, VerifyMark, peer_key};
use kith_tests::{
    InGroup, TestNode, bootstrap_addr, group_json, group_of, kith_bin, kith_ok, poll_until,
    spawn_kith_run,
};
use tokio::sync::broadcast::error::TryRecvError;

fn client(node: &TestNode) -> Client {
    Client::new(
        &format!("http://{}", node.node.api_addr),
        node.node.api_token.clone(),
    )
    .unwrap()
}

/// The `verification_lost` events already sent on `rx`.
fn lost_events(rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>) -> Vec<NodeEvent> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(e @ NodeEvent::VerificationLost { .. }) => out.push(e),
            Ok(_) => {}
            Err(TryRecvError::Empty) => return out,
            Err(e) => panic!("event stream: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_members_see_one_number_and_a_mark_survives_restart_and_updates() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, group) = group_of(&dirs, "pair").await.unwrap();
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    let (pa, pb) = (a.node.peer_id, b.node.peer_id);

    let va = client(&a)
        .verification(&group.id, &pb.to_string())
        .await
        .unwrap();
    let vb = client(&b)
        .verification("pair", &pa.to_string())
        .await
        .unwrap();
    assert_eq!(va.safety_number, vb.safety_number);
    assert_eq!(va.qr_payload, vb.qr_payload);
    // The number is the one the protocol computes from the two keys.
    let (ka, kb) = (peer_key(&pa).unwrap(), peer_key(&pb).unwrap());
    let want = SafetyNumber::new((pa, &ka), (pb, &kb)).unwrap();
    assert_eq!(va.safety_number, want.digits());
    assert_eq!(va.qr_payload, want.qr_payload());
    assert!(!va.verified);

    let marked = client(&a)
        .mark_verified("pair", &pb.to_string(), Some("bob"))
        .await
        .unwrap();
    assert!(marked.verified);

    // b refreshes its leaf (a new epoch): the signature key stays, so does the mark.
    let mut events = a.node.engine.subscribe();
    let epoch = group.epoch;
    b.node
        .engine
        .in_group("pair", |e, g| e.self_update(g))
        .await
        .unwrap();
    poll_until_async(|| async {
        let g = client(&a).group("pair").await.unwrap();
        g.epoch > epoch + 1
    })
    .await;
    assert!(lost_events(&mut events).is_empty());

    let a = a.restart().await.unwrap();
    let after = client(&a)
        .verification("pair", &pb.to_string())
        .await
        .unwrap();
    assert!(after.verified, "{after:?}");
    assert_eq!(after.name.as_deref(), Some("bob"));
    assert_eq!(after.verified_at_ms, marked.verified_at_ms);
    assert_eq!(after.safety_number, va.safety_number);
    let members = client(&a).members("pair").await.unwrap();
    assert!(
        members
            .iter()
            .any(|m| m.peer_id == pb.to_string() && m.verified)
    );
    b.stop().await;
    a.stop().await;
}

/// Polls `done` every 50 ms for at most 20 s.
async fn poll_until_async<F, Fut>(done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let wait = async {
        while !done().await {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), wait)
        .await
        .expect("condition not met within 20 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mark_for_another_key_is_dropped_and_reported() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, _group) = group_of(&dirs, "pair").await.unwrap();
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    let pb = b.node.peer_id;

    // A mark for b's PeerId that names another key, written while a is stopped.
    let stopped = a.stop().await;
    {
        let store = Store::open(&stopped.dir.join("kith.redb")).unwrap();
        let other = peer_key(
            &kith_protocol::Keypair::ed25519_from_bytes([7; 32])
                .unwrap()
                .public()
                .to_peer_id(),
        )
        .unwrap();
        let mark = VerifyMark::new(pb, other, Some("bob"), 1_000).unwrap();
        store.put_mark(&mark).unwrap();
    }
    let a = stopped.start().await.unwrap();
    let v = client(&a)
        .verification("pair", &pb.to_string())
        .await
        .unwrap();
    assert!(!v.verified);
    let change = v.key_changed.unwrap();
    assert_eq!(change.reason, "key_mismatch");
    assert_eq!(change.name.as_deref(), Some("bob"));
    assert_eq!(change.since_ms, None);
    let members = client(&a).members("pair").await.unwrap();
    let bob = members
        .iter()
        .find(|m| m.peer_id == pb.to_string())
        .unwrap();
    assert!(!bob.verified && bob.key_changed.is_some());

    // A membership change makes the node notice: the mark is kept as lost, told once.
    let mut events = a.node.engine.subscribe();
    a.node
        .engine
        .in_group("pair", |e, g| e.self_update(g))
        .await
        .unwrap();
    let lost = lost_events(&mut events);
    assert_eq!(lost.len(), 1, "{lost:?}");
    let NodeEvent::VerificationLost {
        peer,
        reason,
        name,
        verified_peer,
        message,
        ..
    } = &lost[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (peer.as_str(), reason.as_str(), name.as_deref()),
        (pb.to_string().as_str(), "key_mismatch", Some("bob"))
    );
    assert_eq!(verified_peer, peer);
    assert!(message.contains("not the key you verified"), "{message}");
    let v = client(&a)
        .verification("pair", &pb.to_string())
        .await
        .unwrap();
    assert!(!v.verified);
    assert!(v.key_changed.unwrap().since_ms.is_some());
    a.node
        .engine
        .in_group("pair", |e, g| e.self_update(g))
        .await
        .unwrap();
    assert!(lost_events(&mut events).is_empty(), "told twice");

    // Verifying again (the real key) clears it.
    let v = client(&a)
        .mark_verified("pair", &pb.to_string(), None)
        .await
        .unwrap();
    assert!(v.verified && v.key_changed.is_none());
    b.stop().await;
    a.stop().await;
}

/// Runs `kith --data-dir DIR ARGS` that must fail with one `error:` line on stderr.
fn kith_error_line(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(kith_bin().unwrap())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "kith {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "kith {args:?}: {lines:?}");
    assert!(lines[0].starts_with("error: "), "{lines:?}");
    lines[0].to_owned()
}

/// The three lines of 4 groups of 5 digits in `kith verify`'s output.
fn digit_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            let groups: Vec<&str> = l.split(' ').collect();
            groups.len() == 4
                && groups
                    .iter()
                    .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn kith_verify_on_real_processes() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (da, db) = (dirs[0].path(), dirs[1].path());
    let mut na = spawn_kith_run(da, None).unwrap();
    let boot = bootstrap_addr(da).unwrap();
    let _nb = spawn_kith_run(db, Some(&boot)).unwrap();
    kith_ok(da, &["group", "create", "friends"]).unwrap();
    let invite: serde_json::Value =
        serde_json::from_str(&kith_ok(da, &["invite", "friends", "--json", "--no-qr"]).unwrap())
            .unwrap();
    kith_ok(db, &["join", invite["link"].as_str().unwrap()]).unwrap();
    let peer_of = |dir: &Path| {
        let s: serde_json::Value =
            serde_json::from_str(&kith_ok(dir, &["status", "--json"]).unwrap()).unwrap();
        s["peer_id"].as_str().unwrap().to_owned()
    };
    let (pa, pb) = (peer_of(da), peer_of(db));
    poll_until("a to list b", || {
        Ok((group_json(da, "friends")?["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2))
        .then_some(()))
    })
    .unwrap();
    let short_b = &pb[pb.len() - 8..];
    let short_a = &pa[pa.len() - 8..];

    let on_a = kith_ok(da, &["verify", "friends", short_b]).unwrap();
    let on_b = kith_ok(db, &["verify", "friends", short_a]).unwrap();
    let lines = digit_lines(&on_a);
    assert_eq!(lines.len(), 3, "{on_a}");
    assert_eq!(lines, digit_lines(&on_b), "{on_a}\n{on_b}");
    assert!(on_a.contains("is not verified"), "{on_a}");
    // A QR code (block characters) and its text.
    assert!(on_a.contains('█') || on_a.contains('▀'), "{on_a}");
    let code_b = on_b
        .lines()
        .find_map(|l| l.strip_prefix("code: "))
        .unwrap()
        .to_owned();

    // a scans b's code, then marks b verified with a name.
    let scanned = kith_ok(
        da,
        &[
            "verify",
            "friends",
            short_b,
            "--scanned",
            &code_b,
            "--mark",
            "--name",
            "bob",
            "--no-qr",
        ],
    )
    .unwrap();
    assert!(scanned.contains("matches"), "{scanned}");
    assert!(scanned.contains("is verified as 'bob'"), "{scanned}");
    let members = kith_ok(da, &["group", "members", "friends"]).unwrap();
    assert!(
        members
            .lines()
            .any(|l| l.contains(&pb) && l.contains("✓ verified")),
        "{members}"
    );

    // A tampered code, an unknown member, this node: one line each, exit 1.
    let mut tampered = code_b.clone();
    let i = "kith-verify:1:".len();
    let digit = if &tampered[i..=i] == "0" { "1" } else { "0" };
    tampered.replace_range(i..=i, digit);
    let err = kith_error_line(da, &["verify", "friends", short_b, "--scanned", &tampered]);
    assert!(err.contains("differ"), "{err}");
    let err = kith_error_line(da, &["verify", "friends", "zzzzzzzz"]);
    assert!(err.contains("no member"), "{err}");
    let err = kith_error_line(da, &["verify", "friends", short_a]);
    assert!(err.contains("this node"), "{err}");
    let err = kith_error_line(da, &["verify", "friends", short_b, "--scanned", "hello"]);
    assert!(err.contains("not a Kith verification code"), "{err}");

    // The mark survives a restart of the real process.
    let status = na.terminate().unwrap();
    assert!(status.success());
    drop(na);
    let _na = spawn_kith_run(da, None).unwrap();
    let after = kith_ok(da, &["verify", "friends", short_b, "--json"]).unwrap();
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after["verified"], true, "{after}");
    assert_eq!(after["name"], "bob");
    let unmarked = kith_ok(da, &["verify", "friends", short_b, "--unmark", "--no-qr"]).unwrap();
    assert!(unmarked.contains("is not verified"), "{unmarked}");
}
