//! The testnet launcher end to end, as real processes on loopback: a 5-node bench delivers
//! every message and leaves no process behind; a testnet started by one `kith-testnet`
//! process is inspected and stopped by others (`status`, `down`).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kith_tests::{kith_testnet_cmd, pid_alive, pids_mentioning, poll_until};

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn bench_on_five_nodes_delivers_everything_and_stops_every_node() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let out_dir = tmp.path().join("report");
    let started = Instant::now();
    let output = kith_testnet_cmd()?
        .args(["bench", "--nodes", "5", "--rate", "10", "--duration", "3"])
        .args([
            "--warmup", "1", "--size", "200", "--drain", "10", "--seed", "42",
        ])
        .arg("--run-dir")
        .arg(&run)
        .arg("--out")
        .arg(&out_dir)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );

    let report = read_json(&out_dir.join("report.json"))?;
    assert_eq!(report["seed"], 42);
    assert_eq!(report["members"], 5);
    // 10 msg/s for 3 s, every one accepted, every one at the 4 other members.
    assert_eq!(report["messages"]["scheduled"], 30);
    assert_eq!(report["messages"]["sent"], 30, "{report:#}");
    assert_eq!(report["messages"]["failed"], 0);
    assert_eq!(report["delivery"]["expected"], 120);
    assert_eq!(report["delivery"]["delivered"], 120, "{stdout}");
    assert_eq!(report["delivery"]["ratio"], 1.0);
    let latency = &report["latency_ms"];
    assert_eq!(latency["count"], 120);
    assert!(latency["p50"].as_u64().unwrap() <= latency["p99"].as_u64().unwrap());
    // CPU and memory come from /proc for every node.
    let nodes = report["per_node"].as_array().context("per_node")?;
    assert_eq!(nodes.len(), 5);
    for n in nodes {
        assert!(n["peak_rss_mib"].as_f64().unwrap() > 1.0, "{n}");
        assert!(n["cpu_secs"].as_f64().unwrap() >= 0.0, "{n}");
        assert_eq!(n["delivered"], n["expected"]);
    }
    assert!(
        stdout.contains("delivered                          120 (100.00 %)"),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(out_dir.join("latency.svg"))?;
    assert!(svg.starts_with("<svg") && svg.contains("latency CDF"));

    // Every node the bench started is gone, and nothing runs on the run directory.
    for n in nodes {
        let pid = n["pid"].as_u64().context("pid")?;
        assert!(!pid_alive(pid), "node pid {pid} still running");
    }
    let left = pids_mentioning(&run.to_string_lossy());
    assert!(
        left.is_empty(),
        "processes left on {}: {left:?}",
        run.display()
    );
    let manifest = read_json(&run.join("testnet.json"))?;
    assert!(
        manifest["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["pid"].is_null())
    );
    Ok(())
}

#[test]
fn a_testnet_is_inspected_and_stopped_from_other_processes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let mut launcher = kith_testnet_cmd()?
        .args(["up", "--nodes", "3", "--duration", "120"])
        .arg("--dir")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // If the test fails half-way, stop the testnet the way a user would (`down` stops the
    // launcher and then any node left), then make sure the launcher is gone.
    struct Guard(std::process::Child, std::path::PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            if matches!(self.0.try_wait(), Ok(None)) {
                if let Ok(mut down) = kith_testnet_cmd() {
                    let _ = down.arg("down").arg("--dir").arg(&self.1).output();
                }
                let _ = self.0.kill();
            }
            let _ = self.0.wait();
        }
    }
    let stdout = launcher.stdout.take().context("stdout")?;
    let mut guard = Guard(launcher, run.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("testnet up") => break,
            Ok(line) => printed.push(line),
            Err(e) => bail!("the launcher never said it was up ({e}): {printed:?}"),
        }
    }

    let manifest = read_json(&run.join("testnet.json"))?;
    let pids: Vec<u64> = manifest["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| pid_alive(*p)));

    let status = kith_testnet_cmd()?
        .args(["status", "--json", "--dir"])
        .arg(&run)
        .output()?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_eq!(r["alive"], true, "{r}");
        assert_eq!(r["members"], 3, "{r}");
        assert_eq!(r["epoch"], rows[0]["epoch"], "{r}");
        assert!(r["connected_peers"].as_u64().unwrap() >= 1, "{r}");
    }

    let down = kith_testnet_cmd()?
        .args(["down", "--dir"])
        .arg(&run)
        .output()?;
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    // The launcher stopped its nodes and exited cleanly.
    let exit = poll_until("the launcher to exit", || Ok(guard.0.try_wait()?))?;
    assert!(exit.success(), "launcher exit: {exit}");
    for pid in &pids {
        assert!(!pid_alive(*pid), "node pid {pid} still running");
    }
    assert!(pids_mentioning(&run.to_string_lossy()).is_empty());

    // Down again: nothing to stop, and no error.
    let again = kith_testnet_cmd()?
        .args(["down", "--dir"])
        .arg(&run)
        .output()?;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("stopped 0 nodes"));
    Ok(())
}
