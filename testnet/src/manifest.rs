//! `RUN_DIR/testnet.json`: what a launcher started, so that `status` and `down` (and a bench
//! attached with `--dir`) can find the nodes from another process.
//!
//! The file is input like any other: it is size-limited and validated, and a pid in it is
//! only ever signalled after `/proc/<pid>/cmdline` proves it is that node's `kith run`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TestnetError};

/// File name inside the run directory.
pub const FILE_NAME: &str = "testnet.json";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Largest manifest read.
const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Most nodes a testnet may have.
pub const MAX_NODES: usize = 500;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Pid of the `kith-testnet` process that owns the nodes.
    pub launcher_pid: u32,
    /// Network id of every node.
    pub network: String,
    /// The `kith` binary used.
    pub kith: PathBuf,
    /// The testnet's group id, once created.
    pub group: Option<String>,
    /// Whether nodes serve metrics.
    pub metrics: bool,
    /// When the testnet started (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// The nodes, by index.
    pub nodes: Vec<ManifestNode>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestNode {
    /// Index (position in `nodes`).
    pub index: usize,
    /// Data directory.
    pub dir: PathBuf,
    /// Pid of its `kith run`, while the launcher believes it is running.
    pub pid: Option<u32>,
    /// Its PeerId.
    pub peer_id: String,
    /// Its local API (`IP:PORT`).
    pub api_addr: Option<String>,
    /// Its metrics endpoint (`IP:PORT`), if on.
    pub metrics_addr: Option<String>,
    /// Multiaddr others can bootstrap from (`…/tcp/PORT/p2p/ID`).
    pub bootstrap_addr: Option<String>,
    /// Whether it is a member of the testnet's group.
    pub member: bool,
}

impl Manifest {
    /// Reads and validates `run_dir/testnet.json`.
    pub fn read(run_dir: &Path) -> Result<Manifest> {
        let path = run_dir.join(FILE_NAME);
        let bad = |message: String| TestnetError::Manifest {
            path: path.clone(),
            message,
        };
        let meta = std::fs::metadata(&path).map_err(|e| {
            bad(if e.kind() == std::io::ErrorKind::NotFound {
                "not found (is there a testnet in this directory?)".to_owned()
            } else {
                e.to_string()
            })
        })?;
        if meta.len() > MAX_BYTES {
            return Err(bad(format!("larger than {MAX_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        Ok(m)
    }

    /// Checks the invariants a reader relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "version {} is not supported (expected {VERSION})",
                self.version
            ));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(format!("more than {MAX_NODES} nodes"));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.index != i {
                return Err(format!("node at position {i} has index {}", n.index));
            }
            if !n.dir.is_absolute() {
                return Err(format!("node {i}: data directory is not an absolute path"));
            }
            if n.pid == Some(0) {
                return Err(format!("node {i}: pid 0"));
            }
        }
        if let Some(g) = &self.group
            && (g.len() != 64 || !g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("group is not a 64-character hex id".to_owned());
        }
        Ok(())
    }

    /// Writes `run_dir/testnet.json` atomically (temporary file, then rename).
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(FILE_NAME);
        let tmp = run_dir.join(format!(".{FILE_NAME}.tmp"));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TestnetError::Invalid(format!("cannot encode the manifest: {e}")))?;
        std::fs::write(&tmp, text + "\n")
            .map_err(|e| TestnetError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| TestnetError::io(format!("writing {}", path.display()), e))
    }
}

/// The most recent run directory under `root` (names sort by time) with a manifest.
pub fn latest_run_dir(root: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(root).map_err(|e| {
        TestnetError::io(
            format!("no --dir given and cannot list {}", root.display()),
            e,
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(FILE_NAME).is_file())
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(|| {
        TestnetError::Invalid(format!(
            "no testnet found under {} (pass --dir RUN_DIR)",
            root.display()
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: VERSION,
            launcher_pid: 42,
            network: "n".into(),
            kith: "/bin/kith".into(),
            group: Some("ab".repeat(32)),
            metrics: false,
            created_at_ms: 1,
            nodes: vec![ManifestNode {
                index: 0,
                dir: "/tmp/r/node-000".into(),
                pid: Some(7),
                peer_id: "p".into(),
                api_addr: Some("127.0.0.1:1".into()),
                metrics_addr: None,
                bootstrap_addr: None,
                member: true,
            }],
        }
    }

    #[test]
    fn round_trips_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);

        // The newest run directory with a manifest wins.
        let root = tempfile::tempdir().unwrap();
        for name in ["20240101-000000", "20240102-000000"] {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            m.write(&d).unwrap();
        }
        std::fs::create_dir(root.path().join("20240103-000000")).unwrap();
        assert_eq!(
            latest_run_dir(root.path()).unwrap(),
            root.path().join("20240102-000000")
        );
        assert!(latest_run_dir(&root.path().join("20240103-000000")).is_err());

        let mut bad = sample();
        bad.nodes[0].index = 3;
        assert!(bad.validate().is_err());
        let mut bad = sample();
        bad.nodes[0].dir = "relative".into();
        assert!(bad.validate().is_err());
        let mut bad = sample();
        bad.group = Some("nothex".into());
        assert!(bad.validate().is_err());
        let mut bad = sample();
        bad.version = 9;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
        std::fs::write(dir.path().join(FILE_NAME), "{\"version\": 1, \"extra\": 2}").unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("testnet.json"), "{err}");
        assert!(!err.contains('\n'));
    }
}
