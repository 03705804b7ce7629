//! Harness for Kith's end-to-end tests: in-process nodes on loopback and real `kith`
//! processes driven through the CLI.
//!
//! Every node listens on 127.0.0.1 with port 0 (the OS picks a free port), mDNS is off (it
//! would send multicast on the LAN), and every wait has a timeout.

pub mod browser;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kith_client::model::{MessageInfo, NodeEvent};
use kith_node::config::{BootstrapPeer, NodeConfig};
use kith_node::engine::{Actor, EngineError, EngineHandle};
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
        metrics_listen: None,
        retention: Default::default(),
        update_policy: Default::default(),
        nat: kith_node::config::NatSettings::default(),
        past_epoch_ttl: kith_protocol::group::PAST_EPOCH_TTL,
        files: Default::default(),
        chat: Default::default(),
    }
}

/// Runs an engine operation on one group from a test. The operation runs on the engine's
/// thread ([`EngineHandle::run`]), so it cannot borrow from the test; this gives it its own
/// copy of the group query: `node.engine.in_group(&g, |e, g| e.send(g, "hi"))`.
pub trait InGroup {
    /// Runs `op` with `group` (a group id, unique id prefix or exact name).
    fn in_group<T: Send + 'static>(
        &self,
        group: &str,
        op: impl FnOnce(&mut Actor, &str) -> Result<T, EngineError> + Send + 'static,
    ) -> impl Future<Output = Result<T, EngineError>> + Send;

    /// Sends `text` to `group`.
    fn send_text(
        &self,
        group: &str,
        text: &str,
    ) -> impl Future<Output = Result<MessageInfo, EngineError>> + Send {
        let text = text.to_owned();
        self.in_group(group, move |e, g| e.send(g, &text))
    }
}

impl InGroup for EngineHandle {
    fn in_group<T: Send + 'static>(
        &self,
        group: &str,
        op: impl FnOnce(&mut Actor, &str) -> Result<T, EngineError> + Send + 'static,
    ) -> impl Future<Output = Result<T, EngineError>> + Send {
        let group = group.to_owned();
        self.run(move |e| op(e, &group))
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

    /// Creates group `name` on this node and an invite to it allowing `uses` joins.
    pub async fn group_with_invite(
        &self,
        name: &str,
        uses: u32,
    ) -> anyhow::Result<(
        kith_client::model::GroupInfo,
        kith_client::model::InviteInfo,
    )> {
        let name = name.to_owned();
        let group = self.node.engine.run(move |e| e.create_group(&name)).await?;
        let invite = self
            .node
            .engine
            .in_group(&group.id, move |e, g| {
                e.create_invite(
                    g,
                    kith_client::model::CreateInviteRequest {
                        expires_in_secs: None,
                        max_uses: Some(uses),
                        approval: false,
                    },
                )
            })
            .await?;
        Ok((group, invite))
    }

    /// Stops the node and starts it again on the same data directory.
    pub async fn restart(self) -> anyhow::Result<TestNode> {
        let TestNode { node, dir, config } = self;
        node.shutdown().await;
        TestNode::start(&dir, config).await
    }

    /// Stops the node, keeping what it needs to start again on its data directory.
    pub async fn stop(self) -> StoppedNode {
        let TestNode { node, dir, config } = self;
        node.shutdown().await;
        StoppedNode { dir, config }
    }
}

/// A node stopped by [`TestNode::stop`].
pub struct StoppedNode {
    /// Its data directory.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: NodeConfig,
}

impl StoppedNode {
    /// Starts the node again.
    pub async fn start(self) -> anyhow::Result<TestNode> {
        TestNode::start(&self.dir, self.config).await
    }
}

/// Starts one node per directory (all bootstrapping from the first) and puts them in one
/// group created by node 0 and joined by the others in turn; returns when node 0 has merged
/// every join (epoch `n - 1`).
pub async fn group_of(
    dirs: &[tempfile::TempDir],
    name: &str,
) -> anyhow::Result<(Vec<TestNode>, kith_client::model::GroupInfo)> {
    let first = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = first.bootstrap_peer().await?;
    let mut nodes = vec![first];
    for d in &dirs[1..] {
        nodes.push(TestNode::start(d.path(), loopback_config(vec![boot.clone()])).await?);
    }
    let (group, invite) = nodes[0].group_with_invite(name, dirs.len() as u32).await?;
    let n = nodes.len() as u64;
    let mut events = nodes[0].node.engine.subscribe();
    for node in &nodes[1..] {
        node.node.engine.join(invite.link.clone()).await?;
    }
    wait_event(
        &mut events,
        "everyone joined",
        |e| matches!(e, NodeEvent::EpochChanged { epoch, .. } if *epoch == n - 1),
    )
    .await?;
    Ok((nodes, group))
}

/// Polls the node's connected peers until `pred` holds, failing after [`WAIT`].
pub async fn wait_connected(
    node: &TestNode,
    what: &str,
    pred: impl Fn(&[PeerId]) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let connected = node.node.net.info().await?.connected;
        if pred(&connected) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}; connected: {connected:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until each of `nodes` is connected to all the others. Members find each other
/// through the DHT, which nobody serves until AutoNAT confirmed an address (the first
/// seconds after start): a test that cuts a group in parts waits for this first, so each
/// part is connected within itself.
pub async fn wait_mesh(nodes: &[&TestNode]) -> anyhow::Result<()> {
    let ids: Vec<PeerId> = nodes.iter().map(|n| n.node.peer_id).collect();
    for n in nodes {
        let me = n.node.peer_id;
        wait_connected(n, &format!("{me} to reach the others of {ids:?}"), |c| {
            ids.iter().all(|p| *p == me || c.contains(p))
        })
        .await?;
    }
    Ok(())
}

/// The texts of `group`'s history on `node`, with how often each appears.
pub async fn text_counts(
    node: &TestNode,
    group: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let mut counts = std::collections::BTreeMap::new();
    for m in node
        .node
        .engine
        .in_group(group, |e, g| e.history(g, 1000))
        .await?
    {
        if let kith_client::model::MessageBody::Text { text } = m.body {
            *counts.entry(text).or_default() += 1;
        }
    }
    Ok(counts)
}

/// `config` with the `/metrics` server on (loopback, port 0).
pub fn with_metrics(mut config: NodeConfig) -> NodeConfig {
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

/// The value of the sample named exactly `series` (name and labels) on `node`'s `/metrics`
/// (started [`with_metrics`]); 0 if the series is absent.
pub async fn metric(node: &TestNode, series: &str) -> anyhow::Result<f64> {
    let addr = node
        .node
        .metrics_addr
        .context("the node was started without metrics")?;
    let (status, body) =
        tokio::task::spawn_blocking(move || raw_http(addr, "GET", "/metrics", &[], "")).await??;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}");
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0))
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
                    if let kith_client::model::MessageBody::Text { text } = &m.body {
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
    matches!(ev, NodeEvent::Message(m) if matches!(&m.body, kith_client::model::MessageBody::Text { text: t } if t == text))
}

/// Path of the `kith` binary built alongside the tests (`target/<profile>/kith`), building it
/// with the same cargo if it is missing. `KITH_BIN` overrides.
pub fn kith_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("kith", "kith-node", "KITH_BIN")
}

/// A binary of this workspace next to the test executable (`target/<profile>/<name>`),
/// built with the same cargo if it is missing; the environment variable `env` overrides.
fn workspace_bin(name: &str, package: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test binary location")?;
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .with_context(|| format!("running cargo build for the {name} binary"))?;
        if !status.success() || !bin.exists() {
            bail!("could not build the {name} binary at {}", bin.display());
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
    spawn_kith_run_with(dir, bootstrap, &[], &[])
}

/// [`spawn_kith_run`] with extra `kith run` arguments and environment variables (e.g.
/// `--metrics 127.0.0.1:0`, or `KITH_CRASH_AT`). The node's log is appended to
/// `dir/node.log`, so it keeps the lines of earlier runs, and address files a killed run
/// left behind are removed first.
pub fn spawn_kith_run_with(
    dir: &Path,
    bootstrap: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<KithProcess> {
    for stale in ["api.addr", "metrics.addr"] {
        match std::fs::remove_file(dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {stale}")),
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))?;
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
        .args(args)
        .env("RUST_LOG", "info,libp2p=warn")
        .env_remove(kith_node::crashpoint::ENV)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
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

/// Polls `probe` every 100 ms until it returns `Some`, failing after [`WAIT`]. An error from
/// `probe` ends the wait at once.
pub fn poll_until<T>(
    what: &str,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().with_context(|| format!("while waiting for {what}"))? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kith group show GROUP --json` on the node in `dir`.
pub fn group_json(dir: &Path, group: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&kith_ok(
        dir,
        &["group", "show", group, "--json"],
    )?)?)
}

/// The texts of a group's history on the node in `dir`, oldest first (`kith history --json`).
pub fn history_texts(dir: &Path, group: &str) -> anyhow::Result<Vec<String>> {
    let out = kith_ok(dir, &["history", group, "--json", "--limit", "1000"])?;
    let messages: serde_json::Value = serde_json::from_str(&out)?;
    Ok(messages
        .as_array()
        .context("history is not a JSON array")?
        .iter()
        .filter(|m| m["body"]["type"] == "text")
        .filter_map(|m| m["body"]["text"].as_str().map(str::to_owned))
        .collect())
}

/// Waits until the history of `group` on the node in `dir` holds every text in `texts`;
/// returns the whole history's texts.
pub fn wait_history(dir: &Path, group: &str, texts: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut last = Vec::new();
    let found = poll_until(
        &format!("{texts:?} in the history of {}", dir.display()),
        || {
            last = history_texts(dir, group)?;
            Ok(texts
                .iter()
                .all(|t| last.iter().any(|l| l == t))
                .then(|| last.clone()))
        },
    );
    found.with_context(|| format!("history so far: {last:?}"))
}

impl KithProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (a crash, as far as the node can tell) and reaps it.
    pub fn sigkill(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.child.kill().context("sending SIGKILL")?;
        Ok(self.child.wait()?)
    }

    /// Sends SIGTERM (with the `kill` command) and waits up to [`WAIT`] for the process to
    /// exit; returns its exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        poll_until(&format!("kith run (pid {pid}) to exit"), || {
            Ok(self.child.try_wait()?)
        })
    }
}

/// A `kith watch GROUP --json` child process whose stdout lines are read by a thread.
/// Killed on drop.
pub struct KithWatch {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

/// Starts `kith watch GROUP --json` on the node in `dir` (stderr goes to `dir/watch.log`).
pub fn spawn_kith_watch(dir: &Path, group: &str) -> anyhow::Result<KithWatch> {
    let mut child = Command::new(kith_bin()?)
        .arg("--data-dir")
        .arg(dir)
        .args(["watch", group, "--json"])
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("watch.log"))?))
        .spawn()
        .context("spawning kith watch")?;
    let stdout = child.stdout.take().context("watch stdout")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(KithWatch { child, lines })
}

impl KithWatch {
    /// Waits up to `timeout` for the watch to print a JSON line matching `pred` and returns
    /// it; `None` if none came in time. Lines that do not match are skipped. Fails if the
    /// watch ended or printed something that is not JSON.
    pub fn next_matching(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("kith watch ended")
                }
            };
            let value: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("kith watch printed a non-JSON line: {line:?}"))?;
            if pred(&value) {
                return Ok(Some(value));
            }
        }
    }

    /// As [`KithWatch::next_matching`] with a timeout of [`WAIT`], failing if nothing matched.
    pub fn wait_line(
        &self,
        what: &str,
        pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        self.next_matching(WAIT, pred)
            .with_context(|| format!("waiting for kith watch to print {what}"))?
            .with_context(|| format!("kith watch did not print {what} within {WAIT:?}"))
    }
}

impl KithWatch {
    /// Every JSON line the watch printed that was not read yet, waiting up to `quiet` after
    /// the last one for more (so lines still in the pipe are included).
    pub fn drain(&self, quiet: Duration) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        loop {
            match self.lines.recv_timeout(quiet) {
                Ok(line) => out
                    .push(serde_json::from_str(&line).with_context(|| {
                        format!("kith watch printed a non-JSON line: {line:?}")
                    })?),
                Err(_) => return Ok(out),
            }
        }
    }
}

impl Drop for KithWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a `kith watch --json` line is the text message `text`.
pub fn is_text_json(event: &serde_json::Value, text: &str) -> bool {
    event["type"] == "message" && event["body"]["type"] == "text" && event["body"]["text"] == text
}

/// The address of the node's local API, from `<dir>/api.addr`.
pub fn api_addr(dir: &Path) -> anyhow::Result<SocketAddr> {
    Ok(std::fs::read_to_string(dir.join("api.addr"))?
        .trim()
        .parse()?)
}

/// The node's API token, from `<dir>/api.token`.
pub fn api_token(dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join("api.token"))?
        .trim()
        .to_owned())
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) to `addr` and returns the status
/// code and the body. `headers` are extra header lines without CRLF.
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    raw_http_with_head(addr, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`raw_http`], also returning the response's head (status line and headers).
pub fn raw_http_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a blank line after the headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .context("HTTP response without a status")?
        .parse()?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// Path of the `kith-testnet` binary (`target/<profile>/kith-testnet`), building it with the
/// same cargo if it is missing. `KITH_TESTNET_BIN` overrides. `cargo test --workspace` builds
/// it fresh (the kith-testnet package has integration tests).
pub fn kith_testnet_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("kith-testnet", "kith-testnet", "KITH_TESTNET_BIN")
}

/// A `kith-testnet` command using [`kith_bin`]'s `kith` (through `KITH_BIN`), with the
/// environment cleaned of variables that would change what it does.
pub fn kith_testnet_cmd() -> anyhow::Result<Command> {
    let mut cmd = Command::new(kith_testnet_bin()?);
    cmd.env_remove("KITH_TESTNET_SEED")
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .env("KITH_BIN", kith_bin()?)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// The scenario files shipped with kith-testnet (`testnet/scenarios/`).
pub fn testnet_scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("testnet")
        .join("scenarios")
}

/// Whether `pid` is a live process (present in `/proc` and not a zombie).
pub fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids of live processes whose command line mentions `needle` (e.g. a run directory).
pub fn pids_mentioning(needle: &str) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .filter(|pid| pid_alive(*pid))
        .collect()
}

/// `POST /v1/groups/{group}/messages` on the node in `dir` through its API: `Ok(id)` when
/// the node acknowledged the message (201), else `Err` with what happened (an error answer,
/// or no answer because the node died).
pub fn api_send(dir: &Path, group: &str, text: &str) -> Result<String, String> {
    let addr = api_addr(dir).map_err(|e| e.to_string())?;
    let token = api_token(dir).map_err(|e| e.to_string())?;
    let body = serde_json::json!({ "text": text }).to_string();
    let auth = format!("Authorization: Bearer {token}");
    match raw_http(
        addr,
        "POST",
        &format!("/v1/groups/{group}/messages"),
        &[&auth, "Content-Type: application/json"],
        &body,
    ) {
        Ok((201, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
            .ok_or_else(|| format!("201 without a message id: {body}")),
        Ok((status, body)) => Err(format!("{status}: {body}")),
        Err(e) => Err(format!("no answer: {e:#}")),
    }
}

/// The whole history of group `group` (64 hex) of the node in `dir`, oldest first, read
/// from its database: the API lists only the newest 1000 entries. The node must be stopped.
pub fn full_history(
    dir: &Path,
    group: &str,
) -> anyhow::Result<Vec<kith_client::model::MessageInfo>> {
    let id: kith_protocol::ids::GroupId = group.parse().context("group id")?;
    let store = kith_node::engine::open_store(dir)?;
    Ok(store
        .history(&id, usize::MAX)?
        .iter()
        .map(kith_node::engine::message_info)
        .collect())
}

/// The text of a history entry, if it is a text message.
pub fn text_of(m: &kith_client::model::MessageInfo) -> Option<&str> {
    match &m.body {
        kith_client::model::MessageBody::Text { text } => Some(text),
        _ => None,
    }
}

/// The seed of a randomised test: `KITH_TEST_SEED` if set, else a random one; printed so a
/// failure can be replayed with `KITH_TEST_SEED=<seed>`.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("KITH_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("KITH_TEST_SEED={v:?} is not a whole number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    eprintln!("seed {seed} (replay with KITH_TEST_SEED={seed})");
    seed
}

/// Writes `size` pseudo-random bytes (xorshift64 from `seed`: incompressible enough, and
/// reproducible) to `path`; returns their SHA-256.
pub fn write_random_file(path: &Path, size: usize, seed: u64) -> [u8; 32] {
    use sha2::Digest;
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, &data).expect("writing a test file");
    sha2::Sha256::digest(&data).into()
}
