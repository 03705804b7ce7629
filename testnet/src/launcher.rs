//! Starting, driving and stopping a set of local `kith run` processes that share one group.
//!
//! [`Testnet::up`] starts node 0, waits until its API answers, starts the others in parallel
//! batches with node 0 as their only bootstrap peer (the rest is found through the DHT),
//! creates a group on node 0 and joins every other node with one invite link, one join at a
//! time (the inviter serialises commits anyway), waiting after each join until every member
//! reports the same epoch and member count. Then it opens every node's event stream and
//! proves the group topic works with probe messages between every pair of nodes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kith_client::model::{CreateInviteRequest, MessageInfo, NodeEvent};
use kith_client::{Client, ClientError, LiveEvent};
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::error::{Result, TestnetError};
use crate::ledger::{Ledger, PROBE_PREFIX};
use crate::manifest::{self, MAX_NODES, Manifest, ManifestNode};
use crate::procs::{self, Sig};
use crate::progress::Progress;

/// Name of the group every testnet creates.
pub const GROUP_NAME: &str = "testnet";
/// How long a node may take from spawn to a working API with a listen address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the members may take to agree on the epoch after a join.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long probe messages may take to prove the group topic works.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one API call may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `RUST_LOG` of the nodes.
pub const DEFAULT_NODE_LOG: &str = "info,libp2p=warn";
/// Where run directories go by default (relative to the working directory).
pub const DEFAULT_ROOT: &str = "testnet-run";
/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(50);
/// An invite allows at most this many joins (the node's limit).
const MAX_INVITE_USES: usize = 1000;
/// Most history entries the node's API lists in one request.
pub const MAX_HISTORY: usize = 1000;

/// Milliseconds since the Unix epoch on this machine's clock (the nodes use the same clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs `fut` with a time limit, turning expiry into [`TestnetError::Timeout`].
pub async fn within<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(TestnetError::Timeout {
            what: what(),
            secs: limit.as_secs_f64(),
        }),
    }
}

/// Where the `kith` binary is: `explicit`, else `KITH_BIN`, else next to this executable
/// (`target/<profile>/kith`, also from `target/<profile>/deps/` for test binaries).
pub fn find_kith(explicit: Option<&Path>) -> Result<PathBuf> {
    let check = |p: PathBuf, source: &str| {
        if p.is_file() {
            Ok(p)
        } else {
            Err(TestnetError::KithNotFound(format!(
                "{source} {} is not a file",
                p.display()
            )))
        }
    };
    if let Some(p) = explicit {
        return check(p.to_owned(), "--kith");
    }
    if let Some(p) = std::env::var_os("KITH_BIN") {
        return check(PathBuf::from(p), "KITH_BIN");
    }
    let exe = std::env::current_exe()
        .map_err(|e| TestnetError::KithNotFound(format!("cannot locate this executable: {e}")))?;
    let dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    let mut tried = Vec::new();
    for candidate in [Some(dir.join("kith")), dir.parent().map(|p| p.join("kith"))]
        .into_iter()
        .flatten()
    {
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(TestnetError::KithNotFound(format!(
        "not at {}",
        tried.join(" or ")
    )))
}

/// Whether `kith run` of this binary accepts `--metrics`.
pub async fn kith_supports_metrics(kith: &Path) -> bool {
    let out = tokio::process::Command::new(kith)
        .args(["run", "--help"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--metrics"))
}

/// The current UTC time as `YYYYmmdd-HHMMSS` (sorts by time).
pub fn timestamp() -> String {
    kith_client::text::format_utc(now_ms() / 1000)
        .replace(['-', ':'], "")
        .replace(' ', "-")
}

/// A fresh directory `root/<prefix><timestamp>` (with a suffix if taken).
pub fn fresh_dir(root: &Path, prefix: &str) -> PathBuf {
    let stamp = format!("{prefix}{}", timestamp());
    let mut dir = root.join(&stamp);
    let mut n = 2;
    while dir.exists() {
        dir = root.join(format!("{stamp}-{n}"));
        n += 1;
    }
    dir
}

/// Settings of [`Testnet::up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// How many nodes (at least 1).
    pub nodes: usize,
    /// The run directory; created. `None`: `./testnet-run/<timestamp>`.
    pub dir: Option<PathBuf>,
    /// Network id of every node.
    pub network: String,
    /// Start nodes with `--metrics 127.0.0.1:0`.
    pub metrics: bool,
    /// The `kith` binary (see [`find_kith`]).
    pub kith: Option<PathBuf>,
    /// How many nodes start at once after node 0.
    pub batch: usize,
    /// `RUST_LOG` of the nodes.
    pub node_log: String,
    /// No stage lines or bars.
    pub quiet: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            nodes: 5,
            dir: None,
            network: "kith-testnet".to_owned(),
            metrics: false,
            kith: None,
            batch: 8,
            node_log: DEFAULT_NODE_LOG.to_owned(),
            quiet: false,
        }
    }
}

/// One node of the testnet.
#[derive(Debug)]
pub struct Node {
    /// Index (also in the directory name `node-NNN`).
    pub index: usize,
    /// Data directory.
    pub dir: PathBuf,
    /// PeerId, once known.
    pub peer_id: String,
    /// Pid while running.
    pub pid: Option<u32>,
    /// API client while running.
    pub client: Option<Client>,
    /// API address while running.
    pub api_addr: Option<String>,
    /// Metrics address while running with metrics.
    pub metrics_addr: Option<String>,
    /// Bootstrap multiaddr while running.
    pub bootstrap_addr: Option<String>,
    /// Whether it is in the group.
    pub member: bool,
    /// Extra environment of its next `kith run` (e.g. `KITH_CRASH_AT` for crash tests).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    recorder: Option<JoinHandle<()>>,
}

impl Node {
    fn new(index: usize, dir: PathBuf) -> Node {
        Node {
            index,
            dir,
            peer_id: String::new(),
            pid: None,
            client: None,
            api_addr: None,
            metrics_addr: None,
            bootstrap_addr: None,
            member: false,
            env: Vec::new(),
            child: None,
            recorder: None,
        }
    }

    /// Whether the launcher believes the node is running.
    pub fn is_running(&self) -> bool {
        self.pid.is_some()
    }

    /// The API client, or an error naming the node.
    pub fn client(&self) -> Result<&Client> {
        self.client.as_ref().ok_or_else(|| TestnetError::Node {
            node: self.index,
            message: "is not running".to_owned(),
        })
    }
}

/// State shared with background tasks (event recorders, traffic).
#[derive(Debug, Default)]
pub struct SharedState {
    /// The accounting.
    pub ledger: Ledger,
    /// Per node: its client while it is a ready member (traffic picks senders here).
    pub senders: Vec<Option<Client>>,
    /// The group id.
    pub group: String,
    /// Next traffic sequence number.
    pub next_seq: u64,
}

/// A cloneable handle to [`SharedState`].
#[derive(Debug, Clone, Default)]
pub struct Shared(Arc<Mutex<SharedState>>);

impl Shared {
    /// Locks the state (a panic in another holder does not poison it for us).
    pub fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`Testnet::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShutdownSummary {
    /// Pids that exited after SIGTERM.
    pub stopped: Vec<u32>,
    /// Pids that needed SIGKILL.
    pub killed: Vec<u32>,
    /// Pids still alive afterwards (should be empty).
    pub left_running: Vec<u32>,
}

/// A running testnet.
pub struct Testnet {
    /// The run directory.
    pub dir: PathBuf,
    /// Network id.
    pub network: String,
    /// The `kith` binary.
    pub kith: PathBuf,
    /// Whether nodes serve metrics.
    pub metrics: bool,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The group id (after [`Testnet::form_group`]).
    pub group: Option<String>,
    /// State shared with recorders and traffic.
    pub shared: Shared,
    /// Stage output.
    pub progress: Progress,
    /// The current partition, if any.
    pub partition: Option<Vec<Vec<usize>>>,
    /// The last invite link [`Testnet::form_group`] used, once all its uses are taken: what
    /// `bench --attack joinspam` spams with.
    pub used_link: Option<String>,
    /// Whether this process started the nodes (and so stops them).
    owned: bool,
    node_log: String,
    http: reqwest::Client,
    created_at_ms: u64,
}

impl Testnet {
    fn empty(dir: PathBuf, network: String, kith: PathBuf, metrics: bool, quiet: bool) -> Self {
        Testnet {
            dir,
            network,
            kith,
            metrics,
            nodes: Vec::new(),
            group: None,
            shared: Shared::default(),
            progress: Progress::new(quiet),
            partition: None,
            used_link: None,
            owned: true,
            node_log: DEFAULT_NODE_LOG.to_owned(),
            http: reqwest::Client::new(),
            created_at_ms: now_ms(),
        }
    }

    /// Starts a testnet (see the module docs). On error, everything started is stopped.
    pub async fn up(opts: UpOptions) -> Result<Testnet> {
        if opts.nodes == 0 || opts.nodes > MAX_NODES {
            return Err(TestnetError::Invalid(format!(
                "--nodes must be between 1 and {MAX_NODES}"
            )));
        }
        if opts.network.is_empty() || opts.network.len() > 64 {
            return Err(TestnetError::Invalid(
                "--network must be 1 to 64 characters".to_owned(),
            ));
        }
        let kith = find_kith(opts.kith.as_deref())?;
        let dir = opts
            .dir
            .clone()
            .unwrap_or_else(|| fresh_dir(Path::new(DEFAULT_ROOT), ""));
        if let Ok(old) = Manifest::read(&dir)
            && old
                .nodes
                .iter()
                .any(|n| n.pid.is_some_and(|p| procs::is_kith_node(p, &n.dir)))
        {
            return Err(TestnetError::Invalid(format!(
                "a testnet is already running in {} (stop it with `kith-testnet down --dir {}`)",
                dir.display(),
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| TestnetError::io(format!("creating {}", dir.display()), e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| TestnetError::io(format!("resolving {}", dir.display()), e))?;
        let mut metrics = opts.metrics;
        let mut tn = Testnet::empty(dir, opts.network.clone(), kith, false, opts.quiet);
        tn.node_log = opts.node_log.clone();
        if metrics && !kith_supports_metrics(&tn.kith).await {
            tn.progress.line(&format!(
                "note: {} has no `run --metrics`; metrics are n/a",
                tn.kith.display()
            ));
            metrics = false;
        }
        tn.metrics = metrics;
        match tn.bring_up(opts.nodes, opts.batch.max(1)).await {
            Ok(()) => Ok(tn),
            Err(e) => {
                tn.shutdown().await;
                Err(e)
            }
        }
    }

    async fn bring_up(&mut self, count: usize, batch: usize) -> Result<()> {
        self.progress.line(&format!(
            "starting {count} nodes in {} (kith: {})",
            self.dir.display(),
            self.kith.display()
        ));
        let bar = self.progress.bar(count, "nodes up");
        self.add_node()?;
        self.spawn(0, None)?;
        self.wait_up(&[0]).await?;
        bar.inc(1);
        let boot = self.nodes[0].bootstrap_addr.clone();
        let mut next = 1;
        while next < count {
            let end = (next + batch).min(count);
            let batch_ix: Vec<usize> = (next..end).collect();
            for &i in &batch_ix {
                self.add_node()?;
                self.spawn(i, boot.clone())?;
            }
            self.wait_up(&batch_ix).await?;
            bar.inc(batch_ix.len() as u64);
            next = end;
        }
        bar.finish_and_clear();
        self.progress.line(&format!("{count}/{count} nodes up"));
        self.write_manifest()?;
        self.form_group().await?;
        self.write_manifest()?;
        Ok(())
    }

    /// Attaches to a testnet started by another process (from its `testnet.json`): the nodes
    /// must be running; they are not stopped by [`Testnet::shutdown`].
    pub async fn attach(dir: &Path, quiet: bool) -> Result<Testnet> {
        let m = Manifest::read(dir)?;
        let group = m.group.clone().ok_or_else(|| TestnetError::Manifest {
            path: dir.join(manifest::FILE_NAME),
            message: "the testnet has no group yet".to_owned(),
        })?;
        let mut tn = Testnet::empty(dir.to_owned(), m.network.clone(), m.kith, m.metrics, quiet);
        tn.owned = false;
        tn.created_at_ms = m.created_at_ms;
        tn.group = Some(group.clone());
        tn.shared.lock().group = group;
        for mn in m.nodes {
            let mut node = Node::new(mn.index, mn.dir.clone());
            node.peer_id = mn.peer_id.clone();
            node.member = mn.member;
            let pid = mn.pid.filter(|p| procs::is_kith_node(*p, &mn.dir));
            if pid.is_some() {
                let client = Client::from_data_dir(&mn.dir, None)
                    .map_err(|e| TestnetError::api(mn.index, "connecting", e))?;
                node.client = Some(client);
                node.pid = pid;
                node.api_addr = mn.api_addr;
                node.metrics_addr = mn.metrics_addr;
                node.bootstrap_addr = mn.bootstrap_addr;
            }
            {
                let mut st = tn.shared.lock();
                st.ledger.set_node(mn.index, &mn.peer_id);
                st.senders.push(None);
            }
            tn.nodes.push(node);
        }
        let members = tn.running_members();
        tn.progress.line(&format!(
            "attached to {} ({} of {} nodes running)",
            dir.display(),
            members.len(),
            tn.nodes.len()
        ));
        let now = now_ms();
        for &i in &members {
            tn.shared.lock().ledger.set_member(i, now);
            tn.open_recorder(i).await?;
        }
        let pairs = all_pairs(&members);
        tn.prove_ready(&pairs, READY_TIMEOUT).await?;
        tn.mark_ready(&members);
        Ok(tn)
    }

    /// Whether this process started (and will stop) the nodes.
    pub fn owns_nodes(&self) -> bool {
        self.owned
    }

    /// The group id, or an error if there is none yet.
    pub fn group_id(&self) -> Result<&str> {
        self.group
            .as_deref()
            .ok_or_else(|| TestnetError::Invalid("the testnet has no group yet".to_owned()))
    }

    /// Indices of members whose process runs.
    pub fn running_members(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.member && n.is_running())
            .map(|n| n.index)
            .collect()
    }

    fn add_node(&mut self) -> Result<usize> {
        let index = self.nodes.len();
        if index >= MAX_NODES {
            return Err(TestnetError::Invalid(format!(
                "a testnet has at most {MAX_NODES} nodes"
            )));
        }
        let dir = self.dir.join(format!("node-{index:03}"));
        self.nodes.push(Node::new(index, dir));
        self.shared.lock().senders.push(None);
        Ok(index)
    }

    /// Spawns `kith run` for node `i` (not waiting for it).
    fn spawn(&mut self, i: usize, bootstrap: Option<String>) -> Result<()> {
        let node = &mut self.nodes[i];
        let (log, log2) = prepare_node_dir(&node.dir)?;
        let mut cmd = tokio::process::Command::new(&self.kith);
        cmd.arg("--data-dir").arg(&node.dir).args([
            "run",
            "--network",
            &self.network,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--api-listen",
            "127.0.0.1:0",
            "--no-mdns",
        ]);
        if self.metrics {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        if let Some(b) = &bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.env("RUST_LOG", &self.node_log)
            .env_remove("KITH_API")
            .env_remove("KITH_DATA_DIR")
            .env_remove("KITH_BOOTSTRAP")
            .env_remove("KITH_LISTEN")
            .env_remove("KITH_METRICS")
            .env_remove(kith_client::crashpoint::ENV)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| TestnetError::io(format!("starting {}", self.kith.display()), e))?;
        node.pid = child.id();
        node.child = Some(child);
        Ok(())
    }

    /// Waits until every node in `ix` answers on its API with a TCP listen address.
    async fn wait_up(&mut self, ix: &[usize]) -> Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for &i in ix {
            let node = &self.nodes[i];
            let (dir, pid, metrics) = (node.dir.clone(), node.pid, self.metrics);
            set.spawn(async move { (i, wait_node_up(i, &dir, pid, metrics).await) });
        }
        let mut first_err = None;
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| TestnetError::Invalid(format!("task failed: {e}")))?;
            match r {
                Ok(up) => {
                    let node = &mut self.nodes[i];
                    node.peer_id = up.peer_id;
                    node.client = Some(up.client);
                    node.api_addr = Some(up.api_addr);
                    node.bootstrap_addr = Some(up.bootstrap_addr);
                    node.metrics_addr = up.metrics_addr;
                    self.shared.lock().ledger.set_node(i, &node.peer_id);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Creates the group on node 0 and joins every other node (see the module docs).
    async fn form_group(&mut self) -> Result<()> {
        let client0 = self.nodes[0].client()?.clone();
        let group = within(API_TIMEOUT, || "node 0 to create the group".into(), async {
            client0
                .create_group(GROUP_NAME)
                .await
                .map_err(|e| TestnetError::api(0, "creating the group", e))
        })
        .await?;
        check_group_id(0, &group.id)?;
        let gid = group.id.clone();
        self.group = Some(gid.clone());
        self.shared.lock().group = gid.clone();
        self.nodes[0].member = true;
        let count = self.nodes.len();
        let bar = self.progress.bar(count.saturating_sub(1), "joined");
        if count > 1 {
            self.progress.line(&format!(
                "group {} created on node 0; joining {} nodes",
                &gid[..8],
                count - 1
            ));
        }
        let mut link = String::new();
        let mut uses_left = 0;
        for i in 1..count {
            if uses_left == 0 {
                let uses = (count - i).min(MAX_INVITE_USES);
                link = self.invite(0, uses).await?;
                uses_left = uses;
            }
            uses_left -= 1;
            self.join(i, &link).await?;
            bar.inc(1);
        }
        if count > 1 && uses_left == 0 {
            self.used_link = Some(link);
        }
        bar.finish_and_clear();
        let members: Vec<usize> = (0..count).collect();
        let epoch = self.wait_converged(&members, CONVERGE_TIMEOUT).await?;
        self.progress.line(&format!(
            "all {count} members agree: epoch {epoch}, {count} members"
        ));
        let now = now_ms();
        for i in 0..count {
            self.shared.lock().ledger.set_member(i, now);
            self.open_recorder(i).await?;
        }
        let pairs = all_pairs(&members);
        self.prove_ready(&pairs, READY_TIMEOUT).await?;
        self.mark_ready(&members);
        self.progress.line(&format!(
            "group topic ready: every node heard every other node ({} pairs)",
            pairs.len()
        ));
        Ok(())
    }

    /// Creates an invite link on node `via` for `uses` joins.
    async fn invite(&self, via: usize, uses: usize) -> Result<String> {
        let client = self.nodes[via].client()?.clone();
        let gid = self.group_id()?.to_owned();
        let req = CreateInviteRequest {
            expires_in_secs: Some(24 * 3600),
            max_uses: Some(u32::try_from(uses).unwrap_or(u32::MAX)),
            approval: false,
        };
        let invite = within(
            API_TIMEOUT,
            || format!("node {via} to create an invite"),
            async {
                client
                    .create_invite(&gid, &req)
                    .await
                    .map_err(|e| TestnetError::api(via, "creating an invite", e))
            },
        )
        .await?;
        Ok(invite.link)
    }

    /// Node `i` joins with `link`; then waits until every running member agrees.
    async fn join(&mut self, i: usize, link: &str) -> Result<()> {
        let client = self.nodes[i].client()?.clone();
        let gid = self.group_id()?.to_owned();
        let joined = within(
            API_TIMEOUT + Duration::from_secs(10),
            || format!("node {i} to join"),
            async {
                client
                    .join(link, None)
                    .await
                    .map_err(|e| TestnetError::api(i, "joining by invite", e))
            },
        )
        .await?;
        if joined.id != gid {
            return Err(TestnetError::Node {
                node: i,
                message: format!("joined group {} instead of {gid}", joined.id),
            });
        }
        self.nodes[i].member = true;
        let members = self.running_members();
        self.wait_converged(&members, CONVERGE_TIMEOUT).await?;
        Ok(())
    }

    /// Waits until every node in `members` reports the same epoch and a member count equal
    /// to the number of members the launcher knows of; returns the epoch.
    pub async fn wait_converged(&self, members: &[usize], limit: Duration) -> Result<u64> {
        let expected = self.nodes.iter().filter(|n| n.member).count();
        let deadline = Instant::now() + limit;
        loop {
            let view = self.group_views(members).await?;
            let first = view.first().map(|v| v.1);
            if view
                .iter()
                .all(|(_, e, c)| Some(*e) == first && *c == expected)
            {
                return Ok(first.unwrap_or(0));
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = view
                    .iter()
                    .map(|(i, e, c)| format!("node {i}: epoch {e}, {c} members"))
                    .collect();
                return Err(TestnetError::Timeout {
                    what: format!(
                        "members to agree on the group ({expected} members expected; {})",
                        shown.join("; ")
                    ),
                    secs: limit.as_secs_f64(),
                });
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    /// (node, epoch, member count) of the group on each of `nodes`.
    pub async fn group_views(&self, nodes: &[usize]) -> Result<Vec<(usize, u64, usize)>> {
        let gid = self.group_id()?.to_owned();
        let mut out = Vec::with_capacity(nodes.len());
        for &i in nodes {
            let client = self.nodes[i].client()?;
            let g = within(
                API_TIMEOUT,
                || format!("node {i} to show the group"),
                async {
                    client
                        .group(&gid)
                        .await
                        .map_err(|e| TestnetError::api(i, "showing the group", e))
                },
            )
            .await?;
            out.push((i, g.epoch, g.members.len()));
        }
        Ok(out)
    }

    /// Opens node `i`'s event stream and records its messages in the ledger.
    async fn open_recorder(&mut self, i: usize) -> Result<()> {
        let client = self.nodes[i].client()?.clone();
        let gid = self.group_id()?.to_owned();
        let mut stream = within(
            API_TIMEOUT,
            || format!("node {i} to open its event stream"),
            async {
                client
                    .events(Some(&gid))
                    .await
                    .map_err(|e| TestnetError::api(i, "opening the event stream", e))
            },
        )
        .await?;
        let shared = self.shared.clone();
        if let Some(old) = self.nodes[i].recorder.take() {
            old.abort();
        }
        self.nodes[i].recorder = Some(tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(Some(LiveEvent::Event(NodeEvent::Message(m)))) => {
                        shared.lock().ledger.record_event(i, &m, now_ms());
                    }
                    Ok(Some(LiveEvent::Event(_))) => {}
                    Ok(Some(LiveEvent::Lagged(n))) => shared.lock().ledger.lagged(i, n),
                    Ok(None) | Err(_) => {
                        shared.lock().ledger.stream_ended(i, now_ms());
                        return;
                    }
                }
            }
        }));
        Ok(())
    }

    /// Sends probes until, for every `(sender, receiver)` pair, the receiver has seen a
    /// probe from the sender sent during this call. Probes are re-sent every second by
    /// senders still missing somewhere.
    pub async fn prove_ready(&self, pairs: &[(usize, usize)], limit: Duration) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let gid = self.group_id()?.to_owned();
        let since = now_ms();
        let deadline = Instant::now() + limit;
        let mut round = 0u64;
        loop {
            let pending: Vec<(usize, usize)> = {
                let st = self.shared.lock();
                pairs
                    .iter()
                    .copied()
                    .filter(|&(s, r)| !st.ledger.probe_seen(&self.nodes[s].peer_id, r, since))
                    .collect()
            };
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = pending
                    .iter()
                    .take(12)
                    .map(|(s, r)| format!("{s}→{r}"))
                    .collect();
                return Err(TestnetError::Timeout {
                    what: format!(
                        "probe messages through the group topic ({} of {} sender→receiver pairs never arrived: {}{})",
                        pending.len(),
                        pairs.len(),
                        shown.join(", "),
                        if pending.len() > shown.len() {
                            ", …"
                        } else {
                            ""
                        }
                    ),
                    secs: limit.as_secs_f64(),
                });
            }
            let mut senders: Vec<usize> = pending.iter().map(|p| p.0).collect();
            senders.sort_unstable();
            senders.dedup();
            for s in senders {
                let client = self.nodes[s].client()?.clone();
                let text = format!("{PROBE_PREFIX}{s} {round}");
                let gid = gid.clone();
                // A failed probe is retried next round; the deadline bounds the whole wait.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(API_TIMEOUT, client.send(&gid, &text)).await;
                });
            }
            round += 1;
            let round_end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < round_end.min(deadline) {
                tokio::time::sleep(POLL).await;
                let st = self.shared.lock();
                if pairs
                    .iter()
                    .all(|&(s, r)| st.ledger.probe_seen(&self.nodes[s].peer_id, r, since))
                {
                    break;
                }
            }
        }
    }

    /// Marks `ix` ready from now on: they count as receivers and traffic may pick them.
    pub fn mark_ready(&self, ix: &[usize]) {
        let now = now_ms();
        let mut st = self.shared.lock();
        for &i in ix {
            st.ledger.node_ready(i, now);
            if let Some(slot) = st.senders.get_mut(i) {
                *slot = self.nodes[i].client.clone();
            }
        }
    }

    /// Takes node `i` out of the ready set (before stopping it).
    fn mark_down(&self, i: usize) {
        let mut st = self.shared.lock();
        st.ledger.node_down(i, now_ms());
        if let Some(slot) = st.senders.get_mut(i) {
            *slot = None;
        }
    }

    /// Stops node `i` with `sig`; after SIGTERM, waits [`STOP_TIMEOUT`] and then uses
    /// SIGKILL. Returns whether SIGKILL was needed (always true for `Sig::Kill`).
    pub async fn stop_node(&mut self, i: usize, sig: Sig) -> Result<bool> {
        self.mark_down(i);
        let node = &mut self.nodes[i];
        let Some(pid) = node.pid else {
            return Err(TestnetError::Node {
                node: i,
                message: "is not running".to_owned(),
            });
        };
        let killed = stop_process(pid, node.child.as_mut(), &node.dir, sig).await;
        if let Some(r) = node.recorder.take() {
            r.abort();
        }
        node.pid = None;
        node.child = None;
        node.client = None;
        node.api_addr = None;
        node.metrics_addr = None;
        node.bootstrap_addr = None;
        self.write_manifest()?;
        match killed {
            StopOutcome::Exited => Ok(sig == Sig::Kill),
            StopOutcome::Killed => Ok(true),
            StopOutcome::StillRunning => Err(TestnetError::Node {
                node: i,
                message: format!("pid {pid} is still running after SIGKILL"),
            }),
        }
    }

    /// Starts node `i` again on its data directory (bootstrapping from a running node),
    /// re-applies a partition in effect, and, for a member, waits until probes prove it is
    /// back in the group topic both ways.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        self.start_node_api_only(i).await?;
        self.finish_start(i).await
    }

    /// Opens node `i`'s event recorder and waits until it and every running member on its
    /// side of any partition hear each other on the group topic; then marks it ready.
    async fn open_recorder_and_prove_ready(&mut self, i: usize) -> Result<()> {
        self.open_recorder(i).await?;
        let others: Vec<usize> = self
            .running_members()
            .into_iter()
            .filter(|&o| o != i && self.same_side(i, o))
            .collect();
        let mut pairs = Vec::new();
        for &o in &others {
            pairs.push((o, i));
            pairs.push((i, o));
        }
        self.prove_ready(&pairs, READY_TIMEOUT).await?;
        self.mark_ready(&[i]);
        Ok(())
    }

    fn same_side(&self, a: usize, b: usize) -> bool {
        match &self.partition {
            None => true,
            Some(sides) => sides.iter().any(|s| s.contains(&a) && s.contains(&b)),
        }
    }

    /// Starts a new node (if `i` is the next index) or uses a running non-member, and joins
    /// it to the group with an invite created on `via`.
    pub async fn invite_join(&mut self, i: usize, via: usize) -> Result<()> {
        if i == self.nodes.len() {
            self.add_node()?;
            let boot = self.nodes[via].bootstrap_addr.clone();
            self.spawn(i, boot)?;
            self.wait_up(&[i]).await?;
            if let Some(sides) = self.partition.clone() {
                self.apply_partition_to(i, &sides).await?;
            }
        }
        if self.nodes[i].member {
            return Err(TestnetError::Node {
                node: i,
                message: "is already a member".to_owned(),
            });
        }
        let link = self.invite(via, 1).await?;
        self.join(i, &link).await?;
        self.write_manifest()?;
        self.shared.lock().ledger.set_member(i, now_ms());
        self.open_recorder_and_prove_ready(i).await?;
        Ok(())
    }

    /// Starts a new node that is not in the group, bootstrapping from node `via`, and waits
    /// until its API answers. Returns its index.
    pub async fn add_spare_node(&mut self, via: usize) -> Result<usize> {
        let i = self.add_node()?;
        let boot = self.nodes[via].bootstrap_addr.clone();
        self.spawn(i, boot)?;
        self.wait_up(&[i]).await?;
        self.write_manifest()?;
        Ok(i)
    }

    /// Removes member `i` from the group through member `via` (an MLS commit), then waits
    /// until every running member agrees on the new epoch and member count. From then on
    /// `i` is not expected to receive anything and does not send traffic; it keeps running.
    pub async fn remove_member(&mut self, i: usize, via: usize) -> Result<u64> {
        if !self.nodes[i].member {
            return Err(TestnetError::Node {
                node: i,
                message: "is not a member".to_owned(),
            });
        }
        let client = self.nodes[via].client()?.clone();
        let gid = self.group_id()?.to_owned();
        let peer = self.nodes[i].peer_id.clone();
        let now = now_ms();
        {
            let mut st = self.shared.lock();
            st.ledger.set_removed(i, now);
            if let Some(slot) = st.senders.get_mut(i) {
                *slot = None;
            }
        }
        self.nodes[i].member = false;
        self.write_manifest()?;
        within(
            API_TIMEOUT,
            || format!("node {via} to remove node {i}"),
            async {
                client
                    .remove_member(&gid, &peer)
                    .await
                    .map_err(|e| TestnetError::api(via, "removing a member", e))
            },
        )
        .await?;
        let members = self.running_members();
        self.wait_converged(&members, CONVERGE_TIMEOUT).await
    }

    /// Makes member `i` commit a self-update (new leaf key, new epoch), then waits until
    /// every running member agrees on the new epoch.
    pub async fn self_update(&self, i: usize) -> Result<u64> {
        let client = self.nodes[i].client()?.clone();
        let gid = self.group_id()?.to_owned();
        within(
            API_TIMEOUT,
            || format!("node {i} to update its key"),
            async {
                client
                    .self_update(&gid)
                    .await
                    .map_err(|e| TestnetError::api(i, "updating its key", e))
            },
        )
        .await?;
        let members = self.running_members();
        self.wait_converged(&members, CONVERGE_TIMEOUT).await
    }

    /// Node `i`'s history of the group, oldest first, as listed by its API (at most
    /// [`MAX_HISTORY`] entries, the newest).
    pub async fn history(&self, i: usize) -> Result<Vec<MessageInfo>> {
        let client = self.nodes[i].client()?.clone();
        let gid = self.group_id()?.to_owned();
        within(
            API_TIMEOUT,
            || format!("node {i} to list its history"),
            async {
                client
                    .history(&gid, Some(MAX_HISTORY as u64))
                    .await
                    .map_err(|e| TestnetError::api(i, "listing history", e))
            },
        )
        .await
    }

    /// Starts stopped node `i` again and returns once its API answers, without waiting for
    /// it to be back in the group topic; [`Testnet::finish_start`] does the rest.
    pub async fn start_node_api_only(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].is_running() {
            return Err(TestnetError::Node {
                node: i,
                message: "is already running".to_owned(),
            });
        }
        let boot = self
            .nodes
            .iter()
            .find(|n| n.index != i && n.is_running())
            .and_then(|n| n.bootstrap_addr.clone());
        self.spawn(i, boot)?;
        self.wait_up(&[i]).await?;
        self.write_manifest()
    }

    /// The rest of [`Testnet::start_node`] after [`Testnet::start_node_api_only`]: the
    /// partition in effect, the event recorder, and probes both ways.
    pub async fn finish_start(&mut self, i: usize) -> Result<()> {
        if let Some(sides) = self.partition.clone() {
            self.apply_partition_to(i, &sides).await?;
        }
        if self.nodes[i].member {
            self.open_recorder_and_prove_ready(i).await?;
        }
        Ok(())
    }

    /// Sends `text` from node `i` and records it as tracked traffic.
    pub async fn send(&self, i: usize, text: &str) -> Result<u64> {
        let client = self.nodes[i].client()?.clone();
        let gid = self.group_id()?.to_owned();
        let seq = {
            let mut st = self.shared.lock();
            st.next_seq += 1;
            st.next_seq
        };
        crate::traffic::send_tracked(&self.shared, client, gid, i, seq, text.to_owned()).await;
        let st = self.shared.lock();
        if let Some(f) = st.ledger.failures.iter().find(|f| f.seq == seq) {
            return Err(TestnetError::Node {
                node: i,
                message: format!("send failed: {}", f.error),
            });
        }
        Ok(seq)
    }

    /// Cuts the network into `sides` with each node's connection gate, then waits until no
    /// running node is connected to a node of another side.
    pub async fn partition(&mut self, sides: Vec<Vec<usize>>) -> Result<()> {
        self.shared
            .lock()
            .ledger
            .partition_start(sides.clone(), now_ms());
        self.partition = Some(sides.clone());
        let running: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.index)
            .collect();
        for &i in &running {
            self.apply_partition_to(i, &sides).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut crossing = Vec::new();
            for &i in &running {
                for peer in self.connected_peers(i).await? {
                    if let Some(o) = self.nodes.iter().position(|n| n.peer_id == peer)
                        && !self.same_side(i, o)
                    {
                        crossing.push(format!("{i}↔{o}"));
                    }
                }
            }
            if crossing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestnetError::Timeout {
                    what: format!(
                        "the partition to close connections (still connected: {})",
                        crossing.join(", ")
                    ),
                    secs: 15.0,
                });
            }
            tokio::time::sleep(POLL * 4).await;
        }
    }

    async fn apply_partition_to(&self, i: usize, sides: &[Vec<usize>]) -> Result<()> {
        let blocked: Vec<String> = self
            .nodes
            .iter()
            .filter(|o| {
                o.index != i && !sides.iter().any(|s| s.contains(&i) && s.contains(&o.index))
            })
            .map(|o| o.peer_id.clone())
            .collect();
        self.set_blocked(i, &blocked).await
    }

    /// Lifts the partition on every running node and waits until probes prove every pair of
    /// running members can talk again (within `limit`).
    pub async fn heal(&mut self, limit: Duration) -> Result<()> {
        let running: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.index)
            .collect();
        for &i in &running {
            self.set_blocked(i, &[]).await?;
        }
        self.partition = None;
        let members = self.running_members();
        self.prove_ready(&all_pairs(&members), limit).await?;
        self.shared.lock().ledger.partition_end(now_ms());
        Ok(())
    }

    /// `PUT /v1/net/blocked` on node `i`: replaces its block list with `peers`.
    pub async fn set_blocked(&self, i: usize, peers: &[String]) -> Result<()> {
        let client = self.nodes[i].client()?;
        within(
            API_TIMEOUT,
            || format!("node {i} to set its block list"),
            async {
                client
                    .set_blocked(peers)
                    .await
                    .map(|_| ())
                    .map_err(|e| gating_error(i, "setting the block list", e))
            },
        )
        .await
    }

    /// `GET /v1/net/peers` on node `i`: PeerIds of connected peers.
    pub async fn connected_peers(&self, i: usize) -> Result<Vec<String>> {
        let client = self.nodes[i].client()?;
        within(
            API_TIMEOUT,
            || format!("node {i} to list its peers"),
            async {
                client
                    .peers()
                    .await
                    .map(|l| l.peers)
                    .map_err(|e| gating_error(i, "listing connected peers", e))
            },
        )
        .await
    }

    /// Scrapes node `i`'s metrics, if it serves them.
    pub async fn scrape(
        &self,
        i: usize,
    ) -> Option<Result<crate::metrics::Figures, crate::metrics::ScrapeError>> {
        let addr = self.nodes[i].metrics_addr.as_deref()?;
        Some(crate::metrics::scrape(&self.http, addr).await)
    }

    /// The manifest as of now.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            version: manifest::VERSION,
            launcher_pid: std::process::id(),
            network: self.network.clone(),
            kith: self.kith.clone(),
            group: self.group.clone(),
            metrics: self.metrics,
            created_at_ms: self.created_at_ms,
            nodes: self
                .nodes
                .iter()
                .map(|n| ManifestNode {
                    index: n.index,
                    dir: n.dir.clone(),
                    pid: n.pid,
                    peer_id: n.peer_id.clone(),
                    api_addr: n.api_addr.clone(),
                    metrics_addr: n.metrics_addr.clone(),
                    bootstrap_addr: n.bootstrap_addr.clone(),
                    member: n.member,
                })
                .collect(),
        }
    }

    /// Writes `testnet.json` (only for a testnet this process owns).
    pub fn write_manifest(&self) -> Result<()> {
        if self.owned {
            self.manifest().write(&self.dir)
        } else {
            Ok(())
        }
    }

    /// Stops recorders and, if this process started them, every node: SIGTERM to all, up to
    /// [`STOP_TIMEOUT`] to exit, then SIGKILL. Nothing this launcher started is left running.
    pub async fn shutdown(&mut self) -> ShutdownSummary {
        let mut summary = ShutdownSummary::default();
        for i in 0..self.nodes.len() {
            self.mark_down(i);
            if let Some(r) = self.nodes[i].recorder.take() {
                r.abort();
            }
        }
        if !self.owned {
            return summary;
        }
        let running: Vec<(usize, u32)> = self
            .nodes
            .iter()
            .filter_map(|n| n.pid.map(|p| (n.index, p)))
            .collect();
        for &(_, pid) in &running {
            let _ = procs::signal(pid, Sig::Term);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for &(i, pid) in &running {
            let node = &mut self.nodes[i];
            let left = deadline.saturating_duration_since(Instant::now());
            let exited = match node.child.as_mut() {
                Some(child) => tokio::time::timeout(left, child.wait()).await.is_ok(),
                None => wait_gone(pid, left).await,
            };
            if exited {
                summary.stopped.push(pid);
                continue;
            }
            let _ = procs::signal(pid, Sig::Kill);
            let gone = match node.child.as_mut() {
                Some(child) => tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_ok(),
                None => wait_gone(pid, Duration::from_secs(5)).await,
            };
            if gone {
                summary.killed.push(pid);
            } else {
                summary.left_running.push(pid);
            }
        }
        for node in &mut self.nodes {
            node.pid = None;
            node.child = None;
            node.client = None;
            node.api_addr = None;
            node.metrics_addr = None;
            node.bootstrap_addr = None;
        }
        let _ = self.write_manifest();
        summary
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(r) = node.recorder.take() {
                r.abort();
            }
            // Children are spawned with kill_on_drop; this makes the intent explicit.
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// Every ordered pair of distinct nodes in `ix`.
pub fn all_pairs(ix: &[usize]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for &s in ix {
        for &r in ix {
            if s != r {
                pairs.push((s, r));
            }
        }
    }
    pairs
}

/// An API error of the connection-gating endpoints; a 404 means the node predates them.
fn gating_error(node: usize, what: &str, error: ClientError) -> TestnetError {
    match &error {
        ClientError::Api { status: 404, .. } | ClientError::Api { status: 405, .. } => {
            TestnetError::Node {
                node,
                message: format!("{what}: this kith has no connection gating (/v1/net/…)"),
            }
        }
        _ => TestnetError::api(node, what, error),
    }
}

fn check_group_id(node: usize, id: &str) -> Result<()> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(TestnetError::Node {
            node,
            message: "answered a group id that is not 64 hex characters".to_owned(),
        })
    }
}

/// What a node reported once up.
struct NodeUp {
    peer_id: String,
    client: Client,
    api_addr: String,
    bootstrap_addr: String,
    metrics_addr: Option<String>,
}

/// The last non-empty line of a node's log, cleaned for one-line display.
fn last_log_line(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)");
    kith_client::text::clean(&line.chars().take(300).collect::<String>())
}

/// Makes a node's data directory ready for a new `kith run`: creates it, removes address
/// files a killed node left behind (they would point a client at a dead port until the new
/// process writes its own), and opens `node.log` for appending, twice (stdout and stderr).
pub fn prepare_node_dir(dir: &Path) -> Result<(std::fs::File, std::fs::File)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| TestnetError::io(format!("creating {}", dir.display()), e))?;
    for stale in ["api.addr", "metrics.addr"] {
        match std::fs::remove_file(dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TestnetError::io(format!("removing {stale}"), e)),
        }
    }
    let log_path = dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| TestnetError::io(format!("opening {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| TestnetError::io("duplicating the log handle", e))?;
    Ok((log, log2))
}

/// Polls node `i` until its API answers with a loopback TCP listen address (and its metrics
/// address is written, if on).
async fn wait_node_up(i: usize, dir: &Path, pid: Option<u32>, metrics: bool) -> Result<NodeUp> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(pid) = pid
            && !procs::is_alive(pid)
        {
            return Err(TestnetError::Node {
                node: i,
                message: format!(
                    "kith run (pid {pid}) exited during start; last log line: {}",
                    last_log_line(dir)
                ),
            });
        }
        if let Some(up) = probe_node(dir, metrics).await {
            return Ok(up);
        }
        if Instant::now() >= deadline {
            return Err(TestnetError::Timeout {
                what: format!(
                    "node {i} to answer on its API (log: {}; last line: {})",
                    dir.join("node.log").display(),
                    last_log_line(dir)
                ),
                secs: START_TIMEOUT.as_secs_f64(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn probe_node(dir: &Path, metrics: bool) -> Option<NodeUp> {
    let api_addr = std::fs::read_to_string(dir.join("api.addr")).ok()?;
    let api_addr = api_addr.trim().to_owned();
    let metrics_addr = if metrics {
        Some(
            std::fs::read_to_string(dir.join("metrics.addr"))
                .ok()?
                .trim()
                .to_owned(),
        )
    } else {
        None
    };
    let client = Client::from_data_dir(dir, None).ok()?;
    let status = tokio::time::timeout(Duration::from_secs(2), client.status())
        .await
        .ok()?
        .ok()?;
    let tcp = status
        .listen_addrs
        .iter()
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))?;
    Some(NodeUp {
        bootstrap_addr: format!("{tcp}/p2p/{}", status.peer_id),
        peer_id: status.peer_id,
        client,
        api_addr,
        metrics_addr,
    })
}

enum StopOutcome {
    Exited,
    Killed,
    StillRunning,
}

/// Signals `pid` and waits for it; escalates SIGTERM to SIGKILL after [`STOP_TIMEOUT`].
/// A pid that is no longer this node's `kith run` (and is not our child) is left alone.
async fn stop_process(pid: u32, child: Option<&mut Child>, dir: &Path, sig: Sig) -> StopOutcome {
    match child {
        Some(child) => {
            let _ = procs::signal(pid, sig);
            let limit = if sig == Sig::Kill {
                Duration::from_secs(5)
            } else {
                STOP_TIMEOUT
            };
            if tokio::time::timeout(limit, child.wait()).await.is_ok() {
                return StopOutcome::Exited;
            }
            let _ = procs::signal(pid, Sig::Kill);
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_ok()
            {
                StopOutcome::Killed
            } else {
                StopOutcome::StillRunning
            }
        }
        None => {
            if !procs::is_kith_node(pid, dir) {
                return StopOutcome::Exited;
            }
            let _ = procs::signal(pid, sig);
            if wait_gone(pid, STOP_TIMEOUT).await {
                return StopOutcome::Exited;
            }
            let _ = procs::signal(pid, Sig::Kill);
            if wait_gone(pid, Duration::from_secs(5)).await {
                StopOutcome::Killed
            } else {
                StopOutcome::StillRunning
            }
        }
    }
}

/// Polls until `pid` is gone (or a zombie), up to `limit`.
pub async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !procs::is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `kith-testnet down`: stops the testnet recorded in `run_dir/testnet.json`. Its launcher
/// (if alive) gets SIGTERM first so it stops its nodes itself; any node still running then
/// gets SIGTERM and, after [`STOP_TIMEOUT`], SIGKILL. Only processes proven to be that
/// launcher or those nodes are signalled.
pub async fn down(run_dir: &Path) -> Result<(ShutdownSummary, Vec<String>)> {
    let m = Manifest::read(run_dir)?;
    let mut notes = Vec::new();
    let mut summary = ShutdownSummary::default();
    if m.launcher_pid != std::process::id() && procs::is_launcher(m.launcher_pid) {
        let _ = procs::signal(m.launcher_pid, Sig::Term);
        if wait_gone(m.launcher_pid, STOP_TIMEOUT + Duration::from_secs(10)).await {
            notes.push(format!("launcher (pid {}) stopped", m.launcher_pid));
        } else {
            notes.push(format!(
                "launcher (pid {}) did not exit; stopping its nodes directly",
                m.launcher_pid
            ));
        }
    }
    for n in &m.nodes {
        let Some(pid) = n.pid else { continue };
        if !procs::is_alive(pid) {
            continue;
        }
        if !procs::is_kith_node(pid, &n.dir) {
            notes.push(format!(
                "pid {pid} is no longer node {}'s kith (reused?); left alone",
                n.index
            ));
            continue;
        }
        match stop_process(pid, None, &n.dir, Sig::Term).await {
            StopOutcome::Exited => summary.stopped.push(pid),
            StopOutcome::Killed => summary.killed.push(pid),
            StopOutcome::StillRunning => summary.left_running.push(pid),
        }
    }
    Ok((summary, notes))
}

/// One row of `kith-testnet status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusRow {
    /// Node index.
    pub index: usize,
    /// Pid, if recorded.
    pub pid: Option<u32>,
    /// Whether the pid is that node's live `kith run`.
    pub alive: bool,
    /// PeerId.
    pub peer_id: String,
    /// Connected peers, if the API answered.
    pub connected_peers: Option<usize>,
    /// Groups, if the API answered.
    pub groups: Option<usize>,
    /// Epoch of the testnet group, if the node has it.
    pub epoch: Option<u64>,
    /// Members of the testnet group as this node sees it.
    pub members: Option<usize>,
    /// An error from the API, if any.
    pub error: Option<String>,
}

/// `kith-testnet status`: a row per node of `run_dir/testnet.json`.
pub async fn status(run_dir: &Path) -> Result<(Manifest, Vec<StatusRow>)> {
    let m = Manifest::read(run_dir)?;
    let mut rows = Vec::new();
    for n in &m.nodes {
        let alive = n.pid.is_some_and(|p| procs::is_kith_node(p, &n.dir));
        let mut row = StatusRow {
            index: n.index,
            pid: n.pid,
            alive,
            peer_id: n.peer_id.clone(),
            connected_peers: None,
            groups: None,
            epoch: None,
            members: None,
            error: None,
        };
        if alive {
            match Client::from_data_dir(&n.dir, None) {
                Ok(client) => {
                    match tokio::time::timeout(Duration::from_secs(5), client.status()).await {
                        Ok(Ok(s)) => {
                            row.connected_peers = Some(s.connected_peers);
                            row.groups = Some(s.groups.len());
                            if let Some(g) = m
                                .group
                                .as_deref()
                                .and_then(|gid| s.groups.iter().find(|g| g.id == gid))
                            {
                                row.epoch = Some(g.epoch);
                                row.members = Some(g.member_count);
                            }
                        }
                        Ok(Err(e)) => row.error = Some(e.to_string()),
                        Err(_) => row.error = Some("API did not answer within 5 s".to_owned()),
                    }
                }
                Err(e) => row.error = Some(e.to_string()),
            }
        }
        rows.push(row);
    }
    Ok((m, rows))
}

/// Renders status rows as a text table.
pub fn status_table(rows: &[StatusRow]) -> String {
    let dash = || "-".to_owned();
    let mut out = format!(
        "{:>4}  {:>8}  {:<5}  {:<8}  {:>5}  {:>6}  {:>5}  {:>7}\n",
        "NODE", "PID", "ALIVE", "PEER", "PEERS", "GROUPS", "EPOCH", "MEMBERS"
    );
    for r in rows {
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "{:>4}  {:>8}  {:<5}  {:<8}  {:>5}  {:>6}  {:>5}  {:>7}{}\n",
                r.index,
                r.pid.map_or_else(dash, |p| p.to_string()),
                if r.alive { "yes" } else { "no" },
                kith_client::text::short_peer(&r.peer_id),
                r.connected_peers.map_or_else(dash, |v| v.to_string()),
                r.groups.map_or_else(dash, |v| v.to_string()),
                r.epoch.map_or_else(dash, |v| v.to_string()),
                r.members.map_or_else(dash, |v| v.to_string()),
                r.error
                    .as_deref()
                    .map(|e| format!("  ({})", kith_client::text::clean(e)))
                    .unwrap_or_default()
            ),
        );
    }
    out
}
