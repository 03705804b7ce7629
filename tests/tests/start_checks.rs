//! What `kith run` refuses at start, with one line naming the files and the way out: a node
//! key that is not the database's, missing, or empty; a database lost where the data
//! directory shows earlier use; a busy listen port. Also: an older database without an
//! owner record is adopted, and the local API closes a connection whose header never ends.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kith_tests::{
    KithProcess, NETWORK, TestNode, WAIT, kith_bin, kith_ok, loopback_config, spawn_kith_run,
    status_json, wait_api_up,
};

/// `kith run` on loopback (port 0, no mDNS) with `extra` flags.
fn run_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(kith_bin().unwrap());
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["run", "--network", NETWORK, "--api-listen", "127.0.0.1:0"])
        .args(["--no-mdns"])
        .args(extra)
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs `kith run` with `extra`, which must exit with code 1 and print one `error:` line (a
/// run that starts instead is killed after [`WAIT`] and fails the test); returns the line.
fn run_fails(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--listen", "/ip4/127.0.0.1/tcp/0"];
    args.extend_from_slice(extra);
    run_fails_with(dir, &args)
}

fn run_fails_with(dir: &Path, args: &[&str]) -> String {
    let mut child = run_cmd(dir, args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kith run {args:?} did not stop within {WAIT:?}: it started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {stderr}");
    lines[0].to_owned()
}

/// Starts `kith run` with `extra` and waits until its API answers.
fn spawn_run(dir: &Path, extra: &[&str]) -> KithProcess {
    let child = run_cmd(dir, extra)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("RUST_LOG", "info,libp2p=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("node.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let proc = KithProcess {
        child,
        dir: dir.to_owned(),
    };
    wait_api_up(dir).unwrap();
    proc
}

/// A data directory after one run of a node: node.key, kith.redb and api.token.
fn used_dir() -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = spawn_kith_run(tmp.path(), None).unwrap();
    let peer = status_json(tmp.path()).unwrap()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(node.terminate().unwrap().success());
    (tmp, peer)
}

/// Replaces `dir`'s node.key with a new one (made by `kith init` elsewhere); returns its
/// PeerId.
fn swap_key(dir: &Path) -> String {
    let other = tempfile::tempdir().unwrap();
    let peer = kith_ok(other.path(), &["init"]).unwrap().trim().to_owned();
    std::fs::remove_file(dir.join("node.key")).unwrap();
    std::fs::copy(other.path().join("node.key"), dir.join("node.key")).unwrap();
    peer
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn a_swapped_key_is_refused_and_the_flag_starts_over_on_purpose() {
    let (tmp, old) = used_dir();
    let dir = tmp.path();
    let new = swap_key(dir);
    let line = run_fails(dir, &[]);
    for part in [
        dir.join("node.key").display().to_string(),
        dir.join("kith.redb").display().to_string(),
        old.clone(),
        "--fresh-database".to_owned(),
    ] {
        assert!(line.contains(&part), "{part} is not in {line:?}");
    }
    // Refusing changed nothing: the old database is still there, whole.
    assert!(
        !names(dir).iter().any(|n| n.contains(".old-")),
        "{:?}",
        names(dir)
    );
    // On purpose: this key, an empty database, the old one kept aside.
    let node = spawn_run(dir, &["--fresh-database"]);
    assert_eq!(status_json(dir).unwrap()["peer_id"], new.as_str());
    assert!(
        names(dir).iter().any(|n| n.starts_with("kith.redb.old-")),
        "{:?}",
        names(dir)
    );
    drop(node);
}

#[test]
fn a_missing_key_next_to_a_used_database_is_refused() {
    let (tmp, old) = used_dir();
    let dir = tmp.path();
    std::fs::remove_file(dir.join("node.key")).unwrap();
    let line = run_fails(dir, &[]);
    assert!(
        line.contains("node.key is missing") && line.contains("kith.redb"),
        "{line:?}"
    );
    assert!(
        line.contains(&old) && line.contains("--new-identity"),
        "{line:?}"
    );
    assert!(!dir.join("node.key").exists(), "a key was made anyway");
    // `kith init` does not make one either.
    let out = kith_tests::kith(dir, &["init"]).unwrap();
    assert!(!out.status.success());
    assert!(!dir.join("node.key").exists());
    // On purpose: a new identity, the old database kept aside.
    let node = spawn_run(dir, &["--new-identity"]);
    assert_ne!(status_json(dir).unwrap()["peer_id"], old.as_str());
    drop(node);
}

#[test]
fn a_truncated_database_is_refused_where_earlier_use_is_visible() {
    let (tmp, _) = used_dir();
    let dir = tmp.path();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("kith.redb"))
        .unwrap();
    let line = run_fails(dir, &[]);
    assert!(
        line.contains(&dir.join("kith.redb").display().to_string()) && line.contains("empty"),
        "{line:?}"
    );
    assert!(
        line.contains("api.token") && line.contains("--fresh-database"),
        "{line:?}"
    );
    // A deleted one, too.
    std::fs::remove_file(dir.join("kith.redb")).unwrap();
    let line = run_fails(dir, &[]);
    assert!(line.contains("kith.redb is missing"), "{line:?}");
}

#[test]
fn an_empty_key_says_it_is_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    kith_ok(dir, &["init"]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("node.key"))
        .unwrap();
    let line = run_fails(dir, &[]);
    assert!(
        line.contains("node.key is empty") && line.contains("--new-identity"),
        "{line:?}"
    );
    assert!(
        !line.contains("rsa") && !line.contains("feature"),
        "{line:?}"
    );
}

#[test]
fn a_busy_port_is_named_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let line = run_fails_with(tmp.path(), &["--listen", &addr]);
    assert!(
        line.contains(&format!("cannot listen on {addr}: address in use")),
        "{line:?}"
    );
    assert!(line.contains("--listen"), "{line:?}");
    drop(held);
}

/// A database written before owners were recorded (as `Store::open` still writes it) is
/// adopted by the key next to it; from then on a swapped key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_database_without_owner_is_adopted() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let key = kith_node::identity::init(dir, None)?.peer_id;
    drop(kith_node::store::Store::open(&dir.join("kith.redb"))?);
    kith_node::identity::load_or_create_api_token(dir)?;
    assert_eq!(
        kith_node::store::Store::owner_of(&dir.join("kith.redb"))?,
        None
    );
    let node = TestNode::start(dir, loopback_config(vec![])).await?;
    assert_eq!(node.node.peer_id, key);
    let group = node.node.engine.run(|e| e.create_group("kept")).await?;
    node.node.shutdown().await;
    assert_eq!(
        kith_node::store::Store::owner_of(&dir.join("kith.redb"))?,
        Some(key)
    );
    // Still opens, with its groups.
    let node = TestNode::start(dir, loopback_config(vec![])).await?;
    assert_eq!(
        node.node.engine.run(|e| Ok(e.list_groups())).await?[0].id,
        group.id
    );
    node.node.shutdown().await;
    swap_key(dir);
    let err = TestNode::start(dir, loopback_config(vec![]))
        .await
        .err()
        .expect("a swapped key starts");
    assert!(err.to_string().contains("does not belong to"), "{err}");
    Ok(())
}

/// A client that sends half a request header is disconnected within a few seconds, while
/// a whole request on another connection is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_closes_a_connection_whose_header_never_ends() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let node = TestNode::start(tmp.path(), loopback_config(vec![])).await?;
    let addr = node.node.api_addr;
    let closed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthor")?;
        let started = Instant::now();
        let mut rest = Vec::new();
        // Ends (EOF or reset) when the node closes the connection; fails after WAIT.
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => anyhow::bail!("the connection stayed open ({e})"),
        }
        let text = String::from_utf8_lossy(&rest);
        anyhow::ensure!(
            !text.contains(" 200 "),
            "a half request was answered: {text}"
        );
        Ok(started.elapsed())
    });
    // Meanwhile a whole request is answered.
    let token = kith_tests::api_token(tmp.path())?;
    let auth = format!("Authorization: Bearer {token}");
    let (status, _) = tokio::task::spawn_blocking(move || {
        kith_tests::raw_http(addr, "GET", "/v1/status", &[&auth], "")
    })
    .await??;
    assert_eq!(status, 200);
    let after = closed.await??;
    assert!(after < WAIT, "closed after {after:?}");
    node.node.shutdown().await;
    Ok(())
}
