//! `kith-testnet stream-bench` pushes exactly the asked bytes through one libp2p stream on
//! 127.0.0.1 and reports them (behaviour only: speed is not asserted).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

/// How long the whole command may take in a debug build on a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(180);

async fn stream_bench(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kith-testnet"))
        .arg("stream-bench")
        .args(args)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("stream-bench did not finish in time")
        .unwrap()
}

#[tokio::test]
async fn moves_exactly_the_asked_bytes_and_reports_them() {
    let out = stream_bench(&["--mib", "8", "--json", "--timeout", "120"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"], 8 * 1024 * 1024, "{v}");
    assert_eq!(v["mib"], 8);
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["stack"], "tcp+noise+yamux");
    for key in ["wall_secs", "cpu_secs", "mib_per_sec", "cpu_secs_per_mib"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }

    let out = stream_bench(&["--mib", "1"]).await;
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with("raw libp2p stream (tcp+noise+yamux, loopback): 1 MiB in "),
        "{line}"
    );
    assert!(line.trim_end().ends_with("s/MiB (both ends)"), "{line}");
}

#[tokio::test]
async fn refuses_zero_mib_in_one_line() {
    let out = stream_bench(&["--mib", "0"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: --mib must be 1 to"), "{stderr}");
}
