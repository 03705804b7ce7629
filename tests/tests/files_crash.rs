//! A download survives its node being killed: real `kith` processes, SIGKILL in the middle
//! of a fetch, and the restarted node goes on from what it had stored (never from zero, never
//! serving or saving a half-written chunk), then `kith download` saves the exact file.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use kith_tests::{bootstrap_addr, kith_ok, poll_until, spawn_kith_run, test_seed};
use sha2::{Digest, Sha256};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// `(status, have_bytes)` of the only file in `dir`'s store.
fn stored(dir: &Path) -> Option<(String, u64)> {
    let info = json(&kith_ok(dir, &["files", "list", "--json"]).ok()?);
    let f = info["files"].as_array()?.first()?.clone();
    Some((
        f["state"]["status"].as_str()?.to_owned(),
        f["state"]["have_bytes"].as_u64()?,
    ))
}

#[test]
fn a_download_killed_halfway_resumes_after_the_restart() {
    let seed = test_seed();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = (dirs[0].path(), dirs[1].path());
    // B fetches at 2 MiB/s and only on request.
    std::fs::write(
        b.join("config.toml"),
        "[files]\nauto_download_kib = 0\ndownload_kib_per_sec = 2048\n",
    )
    .unwrap();
    let _na = spawn_kith_run(a, None).unwrap();
    let boot = bootstrap_addr(a).unwrap();
    let mut nb = spawn_kith_run(b, Some(&boot)).unwrap();
    kith_ok(a, &["group", "create", "team"]).unwrap();
    let invite = json(&kith_ok(a, &["invite", "team", "--json", "--no-qr"]).unwrap());
    kith_ok(b, &["join", invite["link"].as_str().unwrap()]).unwrap();

    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("video.mp4");
    let size = 12 << 20;
    let hash = kith_tests::write_random_file(&path, size, seed);
    let sent = json(
        &kith_ok(
            a,
            &["send", "team", "--file", path.to_str().unwrap(), "--json"],
        )
        .unwrap(),
    );
    let id = sent["id"].as_str().unwrap().to_owned();
    poll_until("the file message on B", || {
        Ok(kith_ok(b, &["history", "team"])
            .unwrap()
            .contains("[file] video.mp4")
            .then_some(()))
    })
    .unwrap();
    let started = kith_ok(b, &["download", "team", &id[..12], "--no-wait"]).unwrap();
    assert!(started.starts_with("fetching video.mp4"), "{started}");
    let before = poll_until("B to hold a quarter of it", || {
        Ok(stored(b).filter(|(_, have)| *have >= (size / 4) as u64 && *have < size as u64))
    })
    .unwrap();
    assert_eq!(before.0, "downloading", "seed {seed}");
    nb.sigkill().unwrap();

    let _nb = spawn_kith_run(b, Some(&boot)).unwrap();
    let (_, after_restart) = poll_until("B's store after the restart", || Ok(stored(b))).unwrap();
    assert!(
        after_restart >= before.1,
        "B held {} before the kill and {after_restart} after (seed {seed})",
        before.1
    );
    poll_until("B to finish", || {
        Ok(stored(b).filter(|(s, _)| s == "complete"))
    })
    .unwrap();
    let log = std::fs::read_to_string(b.join("node.log")).unwrap();
    assert!(
        log.contains("resuming a download"),
        "the restart did not resume"
    );

    let out = tempfile::tempdir().unwrap();
    let saved = kith_ok(
        b,
        &[
            "download",
            "team",
            &id[..12],
            "--out",
            out.path().to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        saved.starts_with("saved video.mp4 (12.0 MiB) to "),
        "{saved}"
    );
    let bytes = std::fs::read(out.path().join("video.mp4")).unwrap();
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&bytes)),
        hash,
        "seed {seed}"
    );
    // A second save does not overwrite: it picks a new name.
    let again = kith_ok(
        b,
        &[
            "download",
            "team",
            &id[..12],
            "--out",
            out.path().to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(again.trim_end().ends_with("video (1).mp4"), "{again}");
}
