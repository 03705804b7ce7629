//! The `kith-testnet` binary refuses bad input with one line on stderr and exit code 1
//! (2 for usage errors), before starting any node.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn testnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kith-testnet"))
        .args(args)
        .env_remove("KITH_TESTNET_SEED")
        .output()
        .unwrap()
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn a_bad_scenario_names_the_step_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[testnet]\nnodes = 3\n\n[[step]]\naction = \"kill\"\nnode = 7\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = testnet(&[
        "scenario",
        file.to_str().unwrap(),
        "--dir",
        run.to_str().unwrap(),
    ]);
    let err = one_line_error(&out);
    assert!(err.contains("step 1") && err.contains("no node 7"), "{err}");
    assert!(!run.exists(), "a node directory was created");

    std::fs::write(&file, "[testnet]\nnodes = \"many\"\n").unwrap();
    let err = one_line_error(&testnet(&["scenario", file.to_str().unwrap()]));
    assert!(err.contains("bad.toml"), "{err}");
    let err = one_line_error(&testnet(&["scenario", "/nonexistent/x.toml"]));
    assert!(err.contains("x.toml"), "{err}");
}

#[test]
fn bad_options_and_missing_testnets_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let err = one_line_error(&testnet(&["bench", "--size", "5", "--run-dir", d]));
    assert!(err.contains("size"), "{err}");
    let err = one_line_error(&testnet(&["bench", "--rate", "0", "--run-dir", d]));
    assert!(err.contains("rate"), "{err}");
    let err = one_line_error(&testnet(&["down", "--dir", d]));
    assert!(err.contains("testnet.json"), "{err}");
    let err = one_line_error(&testnet(&["status", "--dir", d]));
    assert!(err.contains("testnet.json"), "{err}");
    std::fs::write(dir.path().join("testnet.json"), "{\"version\": 99}").unwrap();
    let err = one_line_error(&testnet(&["down", "--dir", d]));
    assert!(err.contains("testnet.json"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kith-testnet"))
        .args(["up", "--nodes", "0", "--dir", d])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("--nodes"), "{err}");
    // A malformed seed in the environment is refused, not replaced.
    let out = Command::new(env!("CARGO_BIN_EXE_kith-testnet"))
        .args(["bench", "--run-dir", d])
        .env("KITH_TESTNET_SEED", "abc")
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("KITH_TESTNET_SEED"), "{err}");
    // Usage errors are clap's (exit code 2).
    assert_eq!(testnet(&["bench", "--nodes", "x"]).status.code(), Some(2));
}

#[test]
fn crash_loop_options_are_checked_before_any_node_starts() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    for (args, word) in [
        (&["--nodes", "1"][..], "--nodes"),
        (&["--round-kills", "0"][..], "--round-kills"),
        (&["--rate", "0"][..], "--rate"),
        (&["--max-up-ms", "10"][..], "--max-up"),
    ] {
        let mut all = vec!["crash-loop", "--run-dir", r];
        all.extend_from_slice(args);
        let err = one_line_error(&testnet(&all));
        assert!(err.contains(word), "{args:?}: {err}");
    }
    assert!(!run.exists(), "a run directory was created");
}
