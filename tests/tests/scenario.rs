//! The shipped scenarios, as real processes. kill-restart: with node 3 killed (SIGKILL) in
//! the middle of traffic, the four others still get every message; once restarted, node 3 is
//! back in the group topic and gets every message sent after its restart. offline-sync: a
//! member that was stopped catches up through history sync.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::Context;
use kith_tests::{kith_testnet_cmd, pids_mentioning, testnet_scenarios_dir};

#[test]
fn kill_restart_scenario_passes() -> anyhow::Result<()> {
    let (report, run, _tmp) = run_scenario("kill-restart.toml", 7)?;
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["seed"], 7);
    let steps = report["steps"].as_array().context("steps")?;
    assert_eq!(steps.len(), 7);
    assert!(steps.iter().all(|s| s["ok"] == true), "{steps:#?}");
    let detail = |action: &str| {
        steps
            .iter()
            .find(|s| s["action"] == action)
            .and_then(|s| s["detail"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    // Messages were really sent while node 3 was down, and after its restart.
    assert!(
        detail("assert delivered_while_down").contains("reached every up member"),
        "{steps:#?}"
    );
    assert!(
        detail("assert received_after_restart node 3").contains("node 3 received all"),
        "{steps:#?}"
    );
    let d = &report["delivery"];
    assert_eq!(d["delivered"], d["expected"], "{d}");
    assert!(d["excluded_receiver_down"].as_u64().unwrap() > 0, "{d}");
    assert!(report["left_running"].as_array().unwrap().is_empty());
    assert!(pids_mentioning(&run.to_string_lossy()).is_empty());
    Ok(())
}

/// The shipped offline-sync scenario, as real processes: node 3 is stopped while the others
/// send 500 messages and remove node 4; once started again, node 3 holds all 500 messages,
/// the new epoch and the same history, in the same order, as the other members.
#[test]
fn offline_sync_scenario_passes() -> anyhow::Result<()> {
    let (report, run, _tmp) = run_scenario("offline-sync.toml", 11)?;
    assert_eq!(report["passed"], true, "{report:#}");
    let steps = report["steps"].as_array().context("steps")?;
    assert_eq!(steps.len(), 9);
    assert!(steps.iter().all(|s| s["ok"] == true), "{steps:#?}");
    let detail = |action: &str| {
        steps
            .iter()
            .find(|s| s["action"] == action)
            .and_then(|s| s["detail"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        detail("remove node 4 via 0").contains("running members at epoch"),
        "{steps:#?}"
    );
    let same = detail("assert history_equal nodes [0, 1, 2, 3]");
    assert!(
        same.contains("in the same order, with all 500 tracked messages"),
        "{same}"
    );
    // Node 3 was down for every one of the 500 messages: it got them only by history sync.
    let d = &report["delivery"];
    assert_eq!(d["messages"], 500, "{d}");
    assert_eq!(d["delivered"], d["expected"], "{d}");
    assert_eq!(d["excluded_receiver_down"], 500, "{d}");
    assert!(report["left_running"].as_array().unwrap().is_empty());
    assert!(pids_mentioning(&run.to_string_lossy()).is_empty());
    Ok(())
}

/// Runs the shipped scenario `name` with `seed` through the real `kith-testnet` binary,
/// checks it exited successfully within a minute, and returns its JSON report, its run
/// directory and the temporary directory holding the run (kept alive).
fn run_scenario(
    name: &str,
    seed: u64,
) -> anyhow::Result<(serde_json::Value, std::path::PathBuf, tempfile::TempDir)> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let file = testnet_scenarios_dir().join(name);
    let started = Instant::now();
    let output = kith_testnet_cmd()?
        .arg("scenario")
        .arg(&file)
        .args(["--seed", &seed.to_string(), "--dir"])
        .arg(&run)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scenario failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let text = std::fs::read_to_string(run.join("scenario-report.json"))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    Ok((report, run, tmp))
}
