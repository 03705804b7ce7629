//! Crash tests with real `kith` processes: a node killed with SIGKILL (or aborted at a
//! crash point, `KITH_CRASH_AT`) must lose nothing. Every message the API acknowledged
//! reaches every member, a message some member holds reaches all of them, and nothing a
//! node showed is lost from its history.
//!
//! - `crash_loop_loses_nothing`: a short seeded run of `kith-testnet crash-loop` (20 kills,
//!   SIGKILL and crash points, on both members; the long run is documented in
//!   testnet/README.md and docs/BENCHMARKS.md).
//! - `receiver_killed_*`: the receiver is killed, the sender sends 80 messages (across one
//!   or four new epochs, or followed by 5,000 more) while it is down and keeps sending
//!   while it comes back; the receiver must end with every one, in the sender's order.
//!   With 5,000 later messages mostly sent during the catch-up the test is `--ignored`.
//! - `sender_killed_mid_send_*` and `sender_aborted_*`: the sender dies while sending, from
//!   outside and at the `send` crash point between the durable commit and the publish.
//!
//! The tests of this file run one at a time (each starts real processes; on 2 cores they
//! would slow each other down). Seeds come from `KITH_TEST_SEED` and are printed.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kith_tests::{
    KithProcess, api_send, bootstrap_addr, full_history, history_texts, kith_ok, kith_testnet_cmd,
    poll_until, raw_http, spawn_kith_run_with, spawn_kith_watch, test_seed, text_of, wait_history,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one after the other.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const METRICS: [&str; 2] = ["--metrics", "127.0.0.1:0"];

/// Two `kith run` processes in one group, each proven to receive the other's messages.
struct Pair {
    dirs: [tempfile::TempDir; 2],
    a: KithProcess,
    b: KithProcess,
    /// The group id (64 hex).
    group: String,
}

impl Pair {
    fn a_dir(&self) -> PathBuf {
        self.dirs[0].path().to_owned()
    }

    fn b_dir(&self) -> PathBuf {
        self.dirs[1].path().to_owned()
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Sends probes from `from` until `to` holds one: from then on `to` hears `from` live.
fn prove_hears(from: &Path, to: &Path, group: &str, tag: &str) {
    let mut n = 0;
    poll_until(&format!("{tag} probes to arrive"), || {
        n += 1;
        let text = format!("{tag} probe {n}");
        kith_ok(from, &["send", group, &text])?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if history_texts(to, group)?
                .iter()
                .any(|t| t.starts_with(&format!("{tag} probe ")))
            {
                return Ok(Some(()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(None)
    })
    .unwrap();
}

/// Starts A and B (B bootstrapping from A) with extra `kith run` arguments, puts them in
/// one group created by A, and proves each hears the other.
fn two_in_a_group(a_args: &[&str], b_args: &[&str]) -> Pair {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (da, db) = (dirs[0].path(), dirs[1].path());
    let a = spawn_kith_run_with(da, None, a_args, &[]).unwrap();
    let boot = bootstrap_addr(da).unwrap();
    let b = spawn_kith_run_with(db, Some(&boot), b_args, &[]).unwrap();
    let group = json(&kith_ok(da, &["group", "create", "crash", "--json"]).unwrap());
    let group = group["id"].as_str().unwrap().to_owned();
    let invite = json(&kith_ok(da, &["invite", &group, "--json", "--no-qr"]).unwrap());
    kith_ok(db, &["join", invite["link"].as_str().unwrap()]).unwrap();
    prove_hears(da, db, &group, "a");
    prove_hears(db, da, &group, "b");
    Pair { dirs, a, b, group }
}

/// Sends `texts` through the API of the node in `dir` from `threads` threads at once;
/// returns each text with its outcome (`Ok(id)` when acknowledged). A thread stops at its
/// first failure when `stop_at_failure`.
fn send_all(
    dir: &Path,
    group: &str,
    texts: Vec<String>,
    threads: usize,
    stop_at_failure: bool,
    acked: &AtomicUsize,
) -> Vec<(String, Result<String, String>)> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::with_capacity(texts.len()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(text) = texts.get(k) else { return };
                    let r = api_send(dir, group, text);
                    let ok = r.is_ok();
                    if ok {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    out.lock().unwrap().push((text.clone(), r));
                    if !ok && stop_at_failure {
                        return;
                    }
                }
            });
        }
    });
    out.into_inner().unwrap()
}

/// `kith_messages_received_total` of the node in `dir` (started with `--metrics`).
fn received_total(dir: &Path) -> anyhow::Result<Option<f64>> {
    let Ok(addr) = std::fs::read_to_string(dir.join("metrics.addr")) else {
        return Ok(None);
    };
    let (status, body) = raw_http(addr.trim().parse()?, "GET", "/metrics", &[], "")?;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}");
    Ok(body.lines().find_map(|l| {
        l.strip_prefix("kith_messages_received_total ")
            .and_then(|v| v.trim().parse().ok())
    }))
}

/// The ids of the text messages of a whole history, in its order.
fn text_ids(h: &[kith_client::model::MessageInfo]) -> Vec<String> {
    h.iter()
        .filter(|m| text_of(m).is_some())
        .map(|m| m.id.clone())
        .collect()
}

/// Where two id lists first differ, for failure messages.
fn first_difference(a: &[String], b: &[String]) -> String {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    format!(
        "A lists {} text messages, B {}; first difference at position {at}",
        a.len(),
        b.len()
    )
}

/// The receiver B is killed with SIGKILL and the sender A sends `missed` messages, in
/// `epochs + 1` parts with a self-update (a new epoch) after each but the last; then A
/// sends `later` messages, and B starts again once the first of them were acknowledged, so
/// it hears the rest live while it fetches what it missed. B must end with every message,
/// and both must list the same messages in the same order.
fn receiver_gets_every_message_back(missed: usize, epochs: usize, later: usize, limit: Duration) {
    let _serial = serial();
    let mut p = two_in_a_group(&[], &METRICS);
    let (da, db) = (p.a_dir(), p.b_dir());
    p.b.sigkill().unwrap();
    let started = Instant::now();
    let mut sent = Vec::new();
    let part = missed.div_ceil(epochs + 1);
    for k in 0..=epochs {
        let down: Vec<String> = (k * part..((k + 1) * part).min(missed))
            .map(|i| format!("missed {i:05}"))
            .collect();
        sent.extend(send_all(
            &da,
            &p.group,
            down,
            4,
            false,
            &AtomicUsize::new(0),
        ));
        if k < epochs {
            kith_ok(&da, &["group", "update", &p.group]).unwrap();
        }
    }
    let acked_later = AtomicUsize::new(0);
    let boot = bootstrap_addr(&da).unwrap();
    let restart_after = later.min(20);
    let (b, later_sent) = std::thread::scope(|s| {
        let restart = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked_later.load(Ordering::SeqCst) < restart_after && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            spawn_kith_run_with(&db, Some(&boot), &METRICS, &[])
        });
        let texts: Vec<String> = (0..later).map(|i| format!("later {i:05}")).collect();
        let sent = send_all(&da, &p.group, texts, 4, false, &acked_later);
        (restart.join().unwrap(), sent)
    });
    p.b = b.unwrap();
    let restarted = Instant::now();
    sent.extend(later_sent);
    let failed: Vec<_> = sent.iter().filter(|(_, r)| r.is_err()).take(3).collect();
    assert!(failed.is_empty(), "sends failed with A up: {failed:?}");
    let count = missed + later;
    eprintln!(
        "A sent {count} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ids: HashSet<String> = sent.into_iter().filter_map(|(_, r)| r.ok()).collect();
    // B counts the texts it receives from others since its start: all of these.
    let deadline = Instant::now() + limit;
    let mut got = 0.0;
    while Instant::now() < deadline {
        got = received_total(&db).unwrap().unwrap_or(0.0);
        if got >= count as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "B received {got} of {count}, {:.1} s after the last send",
        restarted.elapsed().as_secs_f64()
    );
    p.a.terminate().unwrap();
    p.b.terminate().unwrap();
    let ha = full_history(&da, &p.group).unwrap();
    let hb = full_history(&db, &p.group).unwrap();
    let on_b: HashSet<&str> = hb.iter().map(|m| m.id.as_str()).collect();
    let lost: Vec<&str> = hb
        .iter()
        .chain(&ha)
        .filter(|m| ids.contains(&m.id) && !on_b.contains(m.id.as_str()))
        .filter_map(text_of)
        .collect();
    let missing = ids.iter().filter(|id| !on_b.contains(id.as_str())).count();
    assert_eq!(
        missing,
        0,
        "B lacks {missing} of the {count} messages (e.g. {:?}; kith_messages_received_total: {got}); logs in {}",
        &lost[..lost.len().min(5)],
        db.display()
    );
    let (ta, tb) = (text_ids(&ha), text_ids(&hb));
    assert!(ta == tb, "histories differ: {}", first_difference(&ta, &tb));
}

#[test]
fn receiver_killed_gets_80_missed_back_among_300_later() {
    receiver_gets_every_message_back(80, 0, 300, Duration::from_secs(60));
}

#[test]
fn receiver_killed_gets_80_missed_back_across_a_new_epoch() {
    receiver_gets_every_message_back(80, 1, 300, Duration::from_secs(60));
}

/// More epochs passed while B was down than a member keeps past epochs' secrets for.
#[test]
fn receiver_killed_gets_messages_of_four_epochs_back() {
    receiver_gets_every_message_back(200, 4, 300, Duration::from_secs(60));
}

/// Issue 10's count: 80 messages and then 5,000 later ones, all sent while the receiver
/// is down (A's 1000th message also makes it commit a self-update on the way).
#[test]
fn receiver_killed_gets_80_and_5000_later_messages_back() {
    receiver_gets_every_message_back(5080, 0, 300, Duration::from_secs(300));
}

/// The 5,000 later messages sent mostly while the receiver catches up. Slower than the
/// suite likes in a debug build (about 30 s on 2 cores); run it with
/// `cargo test -p kith-tests --test crash_loop -- --ignored among_5000_later`.
#[test]
#[ignore = "slow: 5,080 sends; run with --ignored"]
fn receiver_killed_gets_80_missed_back_among_5000_later() {
    receiver_gets_every_message_back(80, 0, 5000, Duration::from_secs(300));
}

/// The texts of the `message` lines of a `kith watch --json`.
fn shown_texts(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|e| e["type"] == "message" && e["body"]["type"] == "text")
        .filter_map(|e| e["body"]["text"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until A and B list the same texts and hold every text in `must`; returns them.
fn wait_equal(da: &Path, db: &Path, group: &str, must: &[String]) -> Vec<String> {
    let mut last = (Vec::new(), Vec::new());
    let r = poll_until("A and B to list the same history", || {
        let (ta, tb) = (history_texts(da, group)?, history_texts(db, group)?);
        let done = ta == tb && must.iter().all(|m| tb.contains(m));
        last = (ta.clone(), tb);
        Ok(done.then_some(ta))
    });
    r.unwrap_or_else(|e| {
        let missing_a: Vec<_> = must.iter().filter(|m| !last.0.contains(m)).take(5).collect();
        let missing_b: Vec<_> = must.iter().filter(|m| !last.1.contains(m)).take(5).collect();
        panic!(
            "{e:#}: A lists {} texts (missing e.g. {missing_a:?}), B {} (missing e.g. {missing_b:?})",
            last.0.len(),
            last.1.len()
        )
    })
}

#[test]
fn sender_killed_mid_send_loses_no_acknowledged_message() {
    let _serial = serial();
    let seed = test_seed();
    let mut p = two_in_a_group(&[], &[]);
    let (da, db) = (p.a_dir(), p.b_dir());
    let watch_a = spawn_kith_watch(&da, &p.group).unwrap();
    let watch_b = spawn_kith_watch(&db, &p.group).unwrap();
    // The watches print nothing until an event comes: probe until both show one.
    let mut n = 0;
    poll_until("both watches to show a probe", || {
        n += 1;
        kith_ok(&da, &["send", &p.group, &format!("watch probe {n}")])?;
        let probe = |e: &serde_json::Value| {
            e["body"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("watch probe"))
        };
        Ok((watch_a
            .next_matching(Duration::from_millis(500), probe)?
            .is_some()
            && watch_b
                .next_matching(Duration::from_millis(2000), probe)?
                .is_some())
        .then_some(()))
    })
    .unwrap();
    // A is killed once this many sends were acknowledged, with 4 more in flight.
    let kill_after = 20 + (seed % 40) as usize;
    let texts: Vec<String> = (0..600).map(|i| format!("mid {i:04}")).collect();
    let acked = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let a = Mutex::new(&mut p.a);
    let outcomes = std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::SeqCst) < kill_after && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            a.lock().unwrap().sigkill().unwrap();
            killed.store(true, Ordering::SeqCst);
        });
        send_all(&da, &p.group, texts, 4, true, &acked)
    });
    assert!(killed.load(Ordering::SeqCst));
    let acked_texts: Vec<String> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| t.clone())
        .collect();
    let unacked: Vec<String> = outcomes
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(t, _)| t.clone())
        .collect();
    assert!(
        acked_texts.len() >= kill_after,
        "{} acked",
        acked_texts.len()
    );
    eprintln!(
        "A killed after {} acknowledged sends; {} sends got no answer",
        acked_texts.len(),
        unacked.len()
    );
    let shown_a = shown_texts(&watch_a.drain(Duration::from_millis(500)).unwrap());
    drop(watch_a);
    let boot = bootstrap_addr(&db).unwrap();
    p.a = spawn_kith_run_with(&da, Some(&boot), &[], &[]).unwrap();
    let history = wait_equal(&da, &db, &p.group, &acked_texts);
    for u in &unacked {
        // Equal histories: an unacknowledged message is on both or on neither.
        eprintln!(
            "unacknowledged {u:?}: {}",
            if history.contains(u) {
                "arrived everywhere"
            } else {
                "arrived nowhere"
            }
        );
    }
    let shown_b = shown_texts(&watch_b.drain(Duration::from_millis(500)).unwrap());
    for (who, shown) in [("A", &shown_a), ("B", &shown_b)] {
        let lost: Vec<_> = shown.iter().filter(|t| !history.contains(t)).collect();
        assert!(lost.is_empty(), "{who} showed and then lost {lost:?}");
    }
}

#[test]
fn sender_aborted_between_store_and_publish_delivers_everywhere() {
    let _serial = serial();
    let seed = test_seed();
    let mut p = two_in_a_group(&[], &[]);
    let (da, db) = (p.a_dir(), p.b_dir());
    // A restarts with the `send` point armed: its m-th published batch after the start is
    // stored and then the process aborts before publishing it. Nothing else publishes on A
    // meanwhile, so that is its m-th text.
    let m = 2 + seed % 10;
    p.a.terminate().unwrap();
    let boot = bootstrap_addr(&db).unwrap();
    let point = format!("send:{m}");
    p.a = spawn_kith_run_with(&da, Some(&boot), &[], &[("KITH_CRASH_AT", &point)]).unwrap();
    prove_hears(&db, &da, &p.group, "again");
    let texts: Vec<String> = (1..=m).map(|i| format!("point {i}")).collect();
    for (i, t) in texts.iter().enumerate() {
        let r = api_send(&da, &p.group, t);
        if i + 1 < texts.len() {
            assert!(
                r.is_ok(),
                "send {} failed before the crash point: {r:?}",
                i + 1
            );
        } else {
            assert!(
                r.is_err(),
                "the send at the crash point was acknowledged: {r:?}"
            );
        }
    }
    let status = p.a.child.wait().unwrap();
    assert!(!status.success(), "A did not abort: {status}");
    let log = std::fs::read_to_string(da.join("node.log")).unwrap();
    assert!(
        log.contains(&format!("kith: crash point {point} reached")),
        "A's log does not show the crash point"
    );
    p.a = spawn_kith_run_with(&da, Some(&boot), &[], &[]).unwrap();
    // The last text was stored on A and never published: B must get it all the same.
    let must: Vec<&str> = texts.iter().map(String::as_str).collect();
    wait_history(&db, &p.group, &must).unwrap();
    wait_equal(&da, &db, &p.group, &texts);
}

#[test]
fn a_malformed_crash_point_stops_the_start_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let out = std::process::Command::new(kith_tests::kith_bin().unwrap())
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--no-mdns")
        .env("KITH_CRASH_AT", "nowhere:3")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: KITH_CRASH_AT=\"nowhere:3\" is not POINT:N"),
        "{stderr}"
    );
    assert!(!dir.exists(), "the data directory was created");
}

#[test]
fn crash_loop_loses_nothing() {
    let _serial = serial();
    let seed = test_seed();
    let run = tempfile::Builder::new()
        .prefix("crash-loop-")
        .tempdir()
        .unwrap();
    let run_dir = run.path().join("run");
    let args: Vec<String> = [
        "crash-loop",
        "--kills",
        "20",
        "--nodes",
        "2",
        "--round-kills",
        "5",
        "--max-up-ms",
        "2000",
        "--max-down-ms",
        "4000",
        "--rate",
        "40",
        "--update-every",
        "4",
        "--converge-timeout",
        "30",
        "--json",
        "--quiet",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(["--seed".to_owned(), seed.to_string()])
    .chain(["--run-dir".to_owned(), run_dir.display().to_string()])
    .collect();
    let out = kith_testnet_cmd().unwrap().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(r) => r,
        Err(e) => {
            let kept = run.keep();
            panic!(
                "kith-testnet crash-loop printed no report ({e}; {}): {stderr}; run dir kept in {}",
                out.status,
                kept.display()
            )
        }
    };
    let replay = format!(
        "KITH_TEST_SEED={seed} cargo test -p kith-tests --test crash_loop crash_loop_loses_nothing (or: {})",
        report["replay"].as_str().unwrap_or("?")
    );
    let zero = [
        "acked_lost",
        "shown_then_lost",
        "unacked_partial",
        "rounds_not_converged",
        "unexpected_exits",
        "restart_failures",
    ];
    let bad: Vec<String> = zero
        .iter()
        .filter(|k| report[**k] != 0)
        .map(|k| format!("{k} = {}", report[*k]))
        .chain((report["histories_equal"] != true).then(|| {
            format!(
                "histories differ: {}",
                report["first_difference"].as_str().unwrap_or("?")
            )
        }))
        .collect();
    if !bad.is_empty() || report["passed"] != true || !out.status.success() {
        let kept = run.keep();
        panic!(
            "crash loop failed (seed {seed}): {}; failure: {}; rounds: {}; acked-lost examples: {}; run dir kept in {}; replay: {replay}",
            bad.join(", "),
            report["failure"],
            report["rounds"],
            report["acked_lost_examples"],
            kept.display()
        );
    }
    assert!(report["kills"].as_u64().unwrap() >= 20, "{report}");
    assert!(report["acked"].as_u64().unwrap() > 0, "{report}");
    eprintln!(
        "crash loop: {} kills ({} SIGKILL, points {}), {} acked, converge {}",
        report["kills"],
        report["kills_by_signal"],
        report["kills_by_point"],
        report["acked"],
        report["converge_ms"]
    );
}
