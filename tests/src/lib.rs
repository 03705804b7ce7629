//! Harness for Kith's end-to-end tests: in-process nodes on loopback and real `kith`
//! processes driven through the CLI.
//!
//! Every node listens on 127.0.0.1 with port 0 (the OS picks a free port), mDNS is off (it
//! would send multicast on the LAN), and every wait has a timeout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kith_node::config::{BootstrapPeer, NodeConfig};
use kith_node::model::NodeEvent;
use kith_node::node::{self, NodeOptions, RunningNode};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::broadcast;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);
/// Network id used by the tests.
pub const NETWORK: &str = "kith-test";

/// A node configuration for loopback tests: TCP and QUIC on port 0, no mDNS.
pub fn loopback_config(bootstrap: Vec<BootstrapPeer>) -> NodeConfig {
    NodeConfig {
        network: NETWORK.into(),
        listen: vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"),
            "/ip4/127.0.0.1/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr"),
        ],
        bootstrap,
        mdns: false,
        api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// An in-process node with its data directory.
pub struct TestNode {
    /// The running node.
    pub node: RunningNode,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its configuration (reused on restart).
    pub config: NodeConfig,
}

/// Sends the nodes' logs to the test output when `RUST_LOG` is set (captured per test).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl TestNode {
    /// Starts a node in `dir`.
    pub async fn start(dir: &Path, config: NodeConfig) -> anyhow::Result<TestNode> {
        init_logs();
        let node = node::start(NodeOptions {
            data_dir: dir.to_owned(),
            config: config.clone(),
            heartbeat: Duration::from_millis(200),
        })
        .await?;
        Ok(TestNode {
            node,
            dir: dir.to_owned(),
            config,
        })
    }

    /// The address others can bootstrap from (first TCP listen address plus `/p2p/`).
    pub async fn bootstrap_peer(&self) -> anyhow::Result<BootstrapPeer> {
        let addr = wait_for_listen_addr(&self.node).await?;
        let peer_id = self.node.peer_id;
        Ok(BootstrapPeer {
            peer_id,
            addr: addr.with(libp2p::multiaddr::Protocol::P2p(peer_id)),
        })
    }

    /// Stops the node and starts it again on the same data directory.
    pub async fn restart(self) -> anyhow::Result<TestNode> {
        let TestNode { node, dir, config } = self;
        node.shutdown().await;
        TestNode::start(&dir, config).await
    }
}

/// Waits until the node reports a TCP listen address.
pub async fn wait_for_listen_addr(node: &RunningNode) -> anyhow::Result<Multiaddr> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = node.net.info().await?;
        if let Some(a) = info.listen_addrs.iter().find(|a| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
        }) {
            return Ok(a.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("node {} never reported a listen address", node.peer_id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for an event matching `pred` on `rx`, failing after [`WAIT`].
pub async fn wait_event(
    rx: &mut broadcast::Receiver<NodeEvent>,
    what: &str,
    mut pred: impl FnMut(&NodeEvent) -> bool,
) -> anyhow::Result<NodeEvent> {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return Ok(ev),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    bail!("event stream lagged by {n} while waiting for {what}")
                }
                Err(broadcast::error::RecvError::Closed) => {
                    bail!("event stream closed while waiting for {what}")
                }
            }
        }
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out after {WAIT:?} waiting for {what}"))?
}

/// Waits until every text in `texts` has arrived on `rx`, in any order.
pub async fn wait_texts(
    rx: &mut broadcast::Receiver<NodeEvent>,
    who: &str,
    texts: &[String],
) -> anyhow::Result<()> {
    let mut missing: std::collections::BTreeSet<&str> = texts.iter().map(String::as_str).collect();
    let fut = async {
        while !missing.is_empty() {
            match rx.recv().await {
                Ok(NodeEvent::Message(m)) => {
                    if let kith_node::model::MessageBody::Text { text } = &m.body {
                        missing.remove(text.as_str());
                    }
                }
                Ok(_) => {}
                Err(e) => bail!("{who}: event stream failed: {e}"),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(WAIT, fut).await {
        Ok(r) => r,
        Err(_) => bail!("{who}: timed out after {WAIT:?}; still missing {missing:?}"),
    }
}

/// Whether `ev` is the text message `text`.
pub fn is_text(ev: &NodeEvent, text: &str) -> bool {
    matches!(ev, NodeEvent::Message(m) if matches!(&m.body, kith_node::model::MessageBody::Text { text: t } if t == text))
}

/// Path of the `kith` binary built alongside the tests (`target/<profile>/kith`), building it
/// with the same cargo if it is missing. `KITH_BIN` overrides.
pub fn kith_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KITH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test binary location")?;
    let bin = profile_dir.join("kith");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "kith-node", "--bin", "kith"])
            .status()
            .context("running cargo build for the kith binary")?;
        if !status.success() || !bin.exists() {
            bail!("could not build the kith binary at {}", bin.display());
        }
    }
    Ok(bin)
}

/// A `kith run` child process, killed on drop if still running.
pub struct KithProcess {
    /// The child.
    pub child: Child,
    /// Its data directory.
    pub dir: PathBuf,
}

impl Drop for KithProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a `kith` CLI command against data dir `dir` and returns its output.
pub fn kith(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(kith_bin()?)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running kith {args:?}"))?;
    Ok(out)
}

/// Runs a `kith` CLI command that must succeed, returning stdout.
pub fn kith_ok(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kith(dir, args)?;
    if !out.status.success() {
        bail!(
            "kith {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Starts `kith run` on loopback with port 0 and waits until its API answers.
pub fn spawn_kith_run(dir: &Path, bootstrap: Option<&str>) -> anyhow::Result<KithProcess> {
    let mut cmd = Command::new(kith_bin()?);
    cmd.arg("--data-dir")
        .arg(dir)
        .args([
            "run",
            "--network",
            NETWORK,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--api-listen",
            "127.0.0.1:0",
            "--no-mdns",
        ])
        .env("RUST_LOG", "info,libp2p=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("node.log"))?));
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let child = cmd.spawn().context("spawning kith run")?;
    let proc = KithProcess {
        child,
        dir: dir.to_owned(),
    };
    wait_api_up(dir)?;
    Ok(proc)
}

/// Polls `kith status` until the node answers (the node writes `api.addr` once it listens).
pub fn wait_api_up(dir: &Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if dir.join("api.addr").exists()
            && kith(dir, &["status", "--json"]).is_ok_and(|o| o.status.success())
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
            bail!("node in {} did not come up; log:\n{log}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's PeerId, from `kith status --json`.
pub fn status_json(dir: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&kith_ok(dir, &["status", "--json"])?)?)
}

/// A bootstrap multiaddr for the node in `dir`: its first TCP listen address plus `/p2p/`.
pub fn bootstrap_addr(dir: &Path) -> anyhow::Result<String> {
    let s = status_json(dir)?;
    let peer: PeerId = s["peer_id"].as_str().context("peer_id")?.parse()?;
    let addr = s["listen_addrs"]
        .as_array()
        .context("listen_addrs")?
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.contains("/tcp/"))
        .context("no TCP listen address")?;
    Ok(format!("{addr}/p2p/{peer}"))
}
