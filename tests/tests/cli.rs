//! Real `kith` processes on loopback, driven only through the command line (and, for the
//! API's authentication, raw HTTP): a three-node chat with a live watch and a restart, bad
//! and used-up invite links, `kith init`, and the API token.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kith_protocol::Keypair;
use kith_protocol::ids::GroupId;
use kith_protocol::invite::{Invite, InviteParams};
use kith_tests::{
    NETWORK, api_addr, api_token, bootstrap_addr, group_json, history_texts, is_text_json,
    kith_bin, kith_ok, poll_until, raw_http, spawn_kith_run, spawn_kith_watch, wait_history,
};

/// Runs `kith --data-dir DIR ARGS` with no log filter from the environment, so stderr holds
/// only what a user would see.
fn kith_plain(dir: &Path, args: &[&str]) -> Output {
    Command::new(kith_bin().unwrap())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs a command that must fail; returns its stderr lines.
fn kith_fails(dir: &Path, args: &[&str]) -> Vec<String> {
    let out = kith_plain(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "kith {args:?} succeeded; stdout: {}; stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "kith {args:?}: {stderr}");
    stderr.lines().map(str::to_owned).collect()
}

/// Runs a command that must fail with exactly one non-empty `error:` line on stderr;
/// returns that line.
fn kith_fails_with_one_line(dir: &Path, args: &[&str]) -> String {
    let lines = kith_fails(dir, args);
    assert_eq!(
        lines.len(),
        1,
        "kith {args:?}: expected one line, got {lines:?}"
    );
    let line = lines.into_iter().next().unwrap();
    assert!(
        line.starts_with("error: ") && line.len() > "error: ".len(),
        "{line:?}"
    );
    line
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signed invite made outside any node.
fn make_invite(key: &Keypair, network: &str, group: GroupId, expires_at: u64) -> Invite {
    Invite::create(
        InviteParams {
            network: network.to_owned(),
            group,
            group_name: "made up".to_owned(),
            addrs: vec!["/ip4/127.0.0.1/tcp/9".parse().unwrap()],
            secret: [0x5a; 32],
            expires_at,
            max_uses: 1,
        },
        key,
    )
    .unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn three_processes_chat_through_the_cli() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let d: Vec<&Path> = dirs.iter().map(|t| t.path()).collect();
    let n0 = spawn_kith_run(d[0], None).unwrap();
    let boot = bootstrap_addr(d[0]).unwrap();
    let mut n1 = spawn_kith_run(d[1], Some(&boot)).unwrap();
    let n2 = spawn_kith_run(d[2], Some(&boot)).unwrap();

    let group = json(&kith_ok(d[0], &["group", "create", "friends", "--json"]).unwrap());
    assert_eq!(group["name"], "friends");
    assert_eq!(group["members"].as_array().unwrap().len(), 1);
    let group_id = group["id"].as_str().unwrap().to_owned();

    let invite = json(
        &kith_ok(
            d[0],
            &["invite", "friends", "--uses", "2", "--json", "--no-qr"],
        )
        .unwrap(),
    );
    let link = invite["link"].as_str().unwrap();
    let url = invite["url"].as_str().unwrap();
    assert!(link.starts_with("kith1"), "{link}");
    assert_eq!(url, format!("kith://join#{link}"));
    assert_eq!(invite["max_uses"], 2);

    let joined = kith_ok(d[1], &["join", link]).unwrap();
    assert!(joined.contains("joined group 'friends'"), "{joined}");
    let joined = json(&kith_ok(d[2], &["join", url, "--json"]).unwrap());
    assert_eq!(joined["id"], group_id.as_str());
    assert_eq!(joined["members"].as_array().unwrap().len(), 3);

    // Node 1 must have processed node 2's Add before it speaks, or node 2 (which joined in
    // epoch 2) could not read it.
    poll_until("node 1 to reach epoch 2", || {
        Ok((group_json(d[1], "friends")?["epoch"] == 2).then_some(()))
    })
    .unwrap();

    for (i, dir) in d.iter().enumerate() {
        kith_ok(dir, &["send", "friends", &format!("hello from {i}")]).unwrap();
    }
    let hellos = ["hello from 0", "hello from 1", "hello from 2"];
    for dir in &d {
        wait_history(dir, "friends", &hellos).unwrap();
    }

    // A live watch on node 2. It prints nothing until an event arrives, so node 2 sends
    // probes until the watch shows one: from then on it is surely subscribed.
    let watch = spawn_kith_watch(d[2], "friends").unwrap();
    let mut probe = 0;
    poll_until("kith watch to show a probe", || {
        probe += 1;
        let text = format!("watch probe {probe}");
        kith_ok(d[2], &["send", "friends", &text]).unwrap();
        watch.next_matching(Duration::from_millis(500), |e| {
            e["type"] == "message"
                && e["body"]["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("watch probe"))
        })
    })
    .unwrap();
    let sent = json(&kith_ok(d[0], &["send", "--json", "friends", "last from 0"]).unwrap());
    let seen = watch
        .wait_line("node 0's last message", |e| is_text_json(e, "last from 0"))
        .unwrap();
    assert_eq!(seen["id"], sent["id"]);
    assert_eq!(seen["group"], group_id.as_str());
    assert_eq!(seen["sender"], sent["sender"]);
    drop(watch);

    // Restart node 1 with SIGTERM: a clean exit that removes api.addr.
    let status = n1.terminate().unwrap();
    assert!(status.success(), "kith run exited with {status}");
    assert!(!d[1].join("api.addr").exists(), "api.addr left behind");
    let down = kith_fails(d[1], &["status"]);
    assert!(
        down.last().unwrap().contains("not running"),
        "status of a stopped node: {down:?}"
    );
    drop(n1);
    let _n1 = spawn_kith_run(d[1], Some(&boot)).unwrap();

    let shown = group_json(d[1], "friends").unwrap();
    assert_eq!(shown["epoch"], 2, "{shown}");
    assert_eq!(shown["members"].as_array().unwrap().len(), 3, "{shown}");
    let texts = history_texts(d[1], "friends").unwrap();
    for h in hellos.iter().chain(&["last from 0"]) {
        assert!(texts.iter().any(|t| t == h), "{h:?} missing from {texts:?}");
    }

    kith_ok(d[1], &["send", "friends", "back"]).unwrap();
    wait_history(d[0], "friends", &["back"]).unwrap();
    wait_history(d[2], "friends", &["back"]).unwrap();
    kith_ok(d[0], &["send", "friends", "welcome back"]).unwrap();
    wait_history(d[1], "friends", &["welcome back"]).unwrap();
    wait_history(d[2], "friends", &["welcome back"]).unwrap();
    drop((n0, n2));
}

#[test]
fn bad_links_fail_fast_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    kith_ok(dir, &["init"]).unwrap();
    let key = Keypair::ed25519_from_bytes([7u8; 32]).unwrap();
    let group = GroupId([1; 32]);
    let valid = make_invite(&key, "kith", group, now_secs() + 3600);
    let link = valid.link().to_owned();

    // Flip one base32 character in the middle of the body.
    let mut chars: Vec<char> = link.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'a' { 'b' } else { 'a' };
    let tampered: String = chars.into_iter().collect();
    assert_ne!(tampered, link);
    // Cut so that the rest is not valid base32, and cut by whole 5-byte groups (8
    // characters) so that it decodes but the ticket inside is short.
    let truncated = &link[..link.len() - 11];
    let body_chars = link.len() - "kith1".len();
    let cut_bytes = &link[..link.len() - body_chars % 8 - 8];
    let expired = make_invite(&key, "kith", group, now_secs() - 3600);

    let cases: [(&str, &str, &[&str]); 6] = [
        ("tampered", &tampered, &["damaged", "altered"]),
        ("truncated", truncated, &["damaged"]),
        ("cut short", cut_bytes, &["damaged", "truncated"]),
        ("garbage", "please let me in", &["not a kith invite link"]),
        ("expired", expired.link(), &["expired"]),
        ("expired url", &expired.url(), &["expired"]),
    ];
    for (what, link, words) in cases {
        let line = kith_fails_with_one_line(dir, &["join", link]);
        let lower = line.to_lowercase();
        assert!(
            words.iter().any(|w| lower.contains(w)),
            "{what}: {line:?} names none of {words:?}"
        );
        assert!(
            !lower.contains("not running"),
            "{what}: the CLI contacted the node: {line:?}"
        );
    }

    // The network a node is on is only known to the running node (`kith run --network`
    // overrides config.toml), so the CLI asks it, before any "joining …" line.
    let _node = spawn_kith_run(dir, None).unwrap();
    let elsewhere = make_invite(&key, "elsewhere", group, now_secs() + 3600);
    for args in [&["join", "--json"][..], &["join"][..]] {
        let mut args = args.to_vec();
        args.push(elsewhere.link());
        let line = kith_fails_with_one_line(dir, &args);
        assert!(
            line.contains("network 'elsewhere'") && line.contains(&format!("network '{NETWORK}'")),
            "{args:?}: {line:?}"
        );
    }
}

#[test]
fn used_up_and_unknown_invites_are_refused() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let d: Vec<&Path> = dirs.iter().map(|t| t.path()).collect();
    let _n0 = spawn_kith_run(d[0], None).unwrap();
    let boot = bootstrap_addr(d[0]).unwrap();
    let _n1 = spawn_kith_run(d[1], Some(&boot)).unwrap();
    let _n2 = spawn_kith_run(d[2], Some(&boot)).unwrap();

    let group = json(&kith_ok(d[0], &["group", "create", "g", "--json"]).unwrap());
    let link = kith_ok(d[0], &["invite", "g", "--uses", "1", "--no-qr"]).unwrap();
    // The human form: the link alone on the first line.
    let link = link.lines().next().unwrap().trim().to_owned();
    assert!(link.starts_with("kith1"), "{link}");

    let joined = json(&kith_ok(d[1], &["join", &link, "--json"]).unwrap());
    assert_eq!(joined["id"], group["id"]);

    let line = kith_fails_with_one_line(d[2], &["join", "--json", &link]);
    assert!(line.contains("used up"), "{line:?}");
    let lines = kith_fails(d[2], &["join", &link]);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{lines:?}"
    );
    assert!(lines.last().unwrap().contains("used up"), "{lines:?}");
    assert!(
        kith_ok(d[2], &["group", "list", "--json"]).unwrap().trim() == "[]",
        "a refused join left a group behind"
    );

    // A correctly signed link from node 0 whose secret node 0 never issued.
    let key = kith_node::identity::load_keypair(d[0]).unwrap();
    let group_id: GroupId = group["id"].as_str().unwrap().parse().unwrap();
    let addrs: Vec<kith_protocol::Multiaddr> =
        kith_tests::status_json(d[0]).unwrap()["listen_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().parse().unwrap())
            .collect();
    let forged = Invite::create(
        InviteParams {
            network: NETWORK.to_owned(),
            group: group_id,
            group_name: "g".to_owned(),
            addrs,
            secret: [0x42; 32],
            expires_at: now_secs() + 3600,
            max_uses: 5,
        },
        &key,
    )
    .unwrap();
    let line = kith_fails_with_one_line(d[2], &["join", "--json", forged.link()]);
    assert!(line.contains("not known"), "{line:?}");

    // Node 0 still has two members only.
    let shown = group_json(d[0], "g").unwrap();
    assert_eq!(shown["members"].as_array().unwrap().len(), 2, "{shown}");
}

#[test]
fn init_is_idempotent_and_key_is_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let first = kith_ok(&dir, &["init"]).unwrap();
    let second = kith_ok(&dir, &["init"]).unwrap();
    let peer = first.trim();
    assert!(peer.starts_with("12D3KooW"), "{first:?}");
    assert_eq!(first.lines().count(), 1, "{first:?}");
    assert_eq!(first, second);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert!(dir.join("config.toml").is_file());
    // The key on disk is the one the PeerId names.
    let key = kith_node::identity::load_keypair(&dir).unwrap();
    assert_eq!(key.public().to_peer_id().to_string(), peer);
}

#[test]
fn api_requires_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _node = spawn_kith_run(dir, None).unwrap();
    let addr = api_addr(dir).unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    let token = api_token(dir).unwrap();
    let auth = format!("Authorization: Bearer {token}");

    let (status, body) = raw_http(addr, "GET", "/v1/status", &[], "").unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    let (status, body) = raw_http(
        addr,
        "GET",
        "/v1/status",
        &[&format!("Authorization: Bearer {}", "0".repeat(64))],
        "",
    )
    .unwrap();
    assert_eq!(status, 401, "{body}");

    let (status, body) = raw_http(addr, "GET", "/v1/status", &[&auth], "").unwrap();
    assert_eq!(status, 200, "{body}");
    let s = json(&body);
    assert_eq!(s["network"], NETWORK);
    assert!(
        s["peer_id"].as_str().unwrap().starts_with("12D3KooW"),
        "{body}"
    );

    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/groups",
        &[&auth, "Content-Type: application/json"],
        "{\"name\": ",
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    // Nothing was created.
    let (status, body) = raw_http(addr, "GET", "/v1/groups", &[&auth], "").unwrap();
    assert_eq!((status, body.as_str()), (200, "[]"));
}

/// The chat commands on real processes: a profile, a reply, a reaction, an edit (and one
/// refused), a delete, reading, and a direct chat found again.
#[test]
fn chat_commands_work_between_processes() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = (dirs[0].path(), dirs[1].path());
    let _na = spawn_kith_run(a, None).unwrap();
    let boot = bootstrap_addr(a).unwrap();
    let _nb = spawn_kith_run(b, Some(&boot)).unwrap();
    kith_ok(a, &["group", "create", "club"]).unwrap();
    let invite = json(&kith_ok(a, &["invite", "club", "--json", "--no-qr"]).unwrap());
    kith_ok(b, &["join", invite["link"].as_str().unwrap()]).unwrap();

    let set = kith_ok(a, &["profile", "set", "--name", "Alice"]).unwrap();
    assert!(set.starts_with("profile set: Alice ("), "{set}");
    let sent = json(&kith_ok(a, &["send", "--json", "club", "tonight?"]).unwrap());
    let id = sent["id"].as_str().unwrap()[..8].to_owned();
    let line = poll_until("B to show Alice's name", || {
        let h = kith_ok(b, &["history", "club"]).unwrap();
        Ok(h.lines()
            .find(|l| l.contains("tonight?") && l.contains("Alice ("))
            .map(str::to_owned))
    })
    .unwrap();
    assert!(line.contains(&id), "{line}");

    kith_ok(b, &["send", "club", "--reply", &id, "yes"]).unwrap();
    let reacted = kith_ok(b, &["react", "club", &id, "👍"]).unwrap();
    assert!(reacted.contains("[👍 1]"), "{reacted}");
    let refused = kith_fails_with_one_line(b, &["edit", "club", &id, "no"]);
    assert!(refused.contains("only its sender can edit"), "{refused}");
    let edited = kith_ok(a, &["edit", "club", &id, "tonight at 8?"]).unwrap();
    assert!(edited.contains("tonight at 8? (edited)"), "{edited}");
    poll_until("A to see the reply and the reaction", || {
        let h = kith_ok(a, &["history", "club"]).unwrap();
        Ok((h.contains("reply to you") && h.contains("[👍 1]")).then_some(()))
    })
    .unwrap();
    let deleted = kith_ok(a, &["delete", "club", &id]).unwrap();
    assert!(deleted.contains("(message deleted)"), "{deleted}");
    poll_until("B to show the tombstone", || {
        let h = kith_ok(b, &["history", "club"]).unwrap();
        Ok((h.contains("(message deleted)") && !h.contains("tonight")).then_some(()))
    })
    .unwrap();
    let read = kith_ok(b, &["read", "club"]).unwrap();
    assert!(read.starts_with("read up to"), "{read}");

    // A direct chat with Alice by name; B's node joins it by itself; a second `dm` finds it.
    poll_until("B to know Alice's profile", || {
        Ok(kith_plain(b, &["dm", "Alice", "--json"])
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    let again = kith_ok(b, &["dm", "Alice"]).unwrap();
    assert!(
        again.starts_with("you already have a direct chat with Alice ("),
        "{again}"
    );
    poll_until("A to list the direct chat", || {
        let list = kith_ok(a, &["group", "list"]).unwrap();
        Ok(list.contains("direct chat with").then_some(()))
    })
    .unwrap();
    let nobody = kith_fails_with_one_line(a, &["dm", "Zed"]);
    assert!(nobody.contains("Zed"), "{nobody}");
    // A link made with `dm --link`, used with `kith dm LINK`.
    let made = json(&kith_ok(a, &["dm", "--link", "--json"]).unwrap());
    let joined = kith_ok(b, &["dm", made["link"].as_str().unwrap()]).unwrap();
    assert!(joined.starts_with("joined direct chat"), "{joined}");
}
