//! Kith nodes in the NAT lab: `kith run` processes inside [`natlab`](crate::natlab) hosts,
//! driven through their APIs from inside their namespaces.
//!
//! [`NatNet::start`] runs a node in a host (listening on every address of its namespace,
//! TCP and QUIC, ports picked by the OS), waits for its API, and keeps a runtime inside the
//! namespace to talk to it. The nodes' data directories and logs are on the shared file
//! system, under the net's root directory. Used by the NAT tests and by
//! `kith-testnet up --nat`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kith_client::Client;
use kith_client::model::{ReachInfo, StatusInfo};
use tokio::process::Child;

use crate::error::{Result, TestnetError};
use crate::natlab::{Host, Lab, NsRuntime};
use crate::procs::{self, Sig};

/// How long a node may take to answer on its API.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable with the nodes' `RUST_LOG` (default `info,libp2p=warn`).
pub const LOG_ENV: &str = "KITH_LAB_LOG";
/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(100);

/// One node of the net.
pub struct LabNode {
    /// Its host in the lab.
    pub host: Host,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its PeerId, once started.
    pub peer_id: String,
    child: Option<Child>,
    rt: NsRuntime,
    extra: Vec<String>,
}

/// Nodes in a NAT lab.
pub struct NatNet {
    /// The lab (namespaces, routers).
    pub lab: Lab,
    /// The nodes, in start order.
    pub nodes: Vec<LabNode>,
    kith: PathBuf,
    root: PathBuf,
    log: String,
}

impl NatNet {
    /// A net whose nodes run `kith` with data directories under `root`.
    pub fn new(lab: Lab, kith: &Path, root: &Path) -> NatNet {
        NatNet {
            lab,
            nodes: Vec::new(),
            kith: kith.to_owned(),
            root: root.to_owned(),
            log: std::env::var(LOG_ENV).unwrap_or_else(|_| "info,libp2p=warn".to_owned()),
        }
    }

    /// Sets the nodes' `RUST_LOG`.
    pub fn with_log(mut self, log: &str) -> NatNet {
        log.clone_into(&mut self.log);
        self
    }

    /// Starts a node in `host` with extra `kith run` arguments; returns its index.
    pub async fn start(&mut self, host: Host, extra: &[&str]) -> Result<usize> {
        let i = self.nodes.len();
        let dir = self.root.join(format!("node{i}-{}", short(&host.ns)));
        let rt = self
            .lab
            .runtime(&host)
            .map_err(|e| TestnetError::Invalid(e.to_string()))?;
        self.nodes.push(LabNode {
            host,
            dir,
            peer_id: String::new(),
            child: None,
            rt,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        });
        self.spawn(i).await?;
        Ok(i)
    }

    /// Starts node `i` again (after [`NatNet::stop`]).
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i).await
    }

    async fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let (log, log2) = crate::launcher::prepare_node_dir(&node.dir)?;
        let log_path = node.dir.join("node.log");
        let mut cmd = self.lab.command(&node.host, &self.kith);
        cmd.arg("--data-dir").arg(&node.dir).args([
            "run",
            "--network",
            "natlab",
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--listen",
            "/ip4/0.0.0.0/udp/0/quic-v1",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--no-mdns",
        ]);
        cmd.args(&node.extra)
            .env("RUST_LOG", &self.log)
            .env_remove("KITH_API")
            .env_remove("KITH_DATA_DIR")
            .env_remove("KITH_BOOTSTRAP")
            .env_remove("KITH_LISTEN")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(|e| TestnetError::io(format!("starting {}", self.kith.display()), e))?;
        node.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(s) = self.status(i).await {
                self.nodes[i].peer_id = s.peer_id;
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                return Err(TestnetError::Node {
                    node: i,
                    message: format!(
                        "kith run exited during start ({status}); see {}",
                        log_path.display()
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(TestnetError::Timeout {
                    what: format!(
                        "node {i} to answer on its API (log: {})",
                        log_path.display()
                    ),
                    secs: START_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops node `i` with `sig` and waits for it to exit.
    pub async fn stop(&mut self, i: usize, sig: Sig) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            // `ip netns exec` execs the program, so the child's pid is the node's.
            if let Some(pid) = child.id() {
                let _ = procs::signal(pid, sig);
            }
            let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
            let _ = child.kill().await;
        }
        Ok(())
    }

    /// Runs `f` with a client of node `i`, inside the node's namespace.
    pub async fn call<T, F, Fut>(&self, i: usize, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, kith_client::ClientError>> + Send,
    {
        let dir = self.nodes[i].dir.clone();
        let r = self.nodes[i]
            .rt
            .run(async move {
                let client = Client::from_data_dir(&dir, None)?;
                f(client).await
            })
            .await;
        r.map_err(|e| TestnetError::api(i, what, e))
    }

    /// Node `i`'s status.
    pub async fn status(&self, i: usize) -> Result<StatusInfo> {
        self.call(i, "status", |c| async move { c.status().await })
            .await
    }

    /// Polls node `i`'s status until `pred` holds; returns that status.
    pub async fn wait_status(
        &self,
        i: usize,
        what: &str,
        limit: Duration,
        pred: impl Fn(&StatusInfo) -> bool,
    ) -> Result<StatusInfo> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(i).await?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(TestnetError::Timeout {
                    what: format!("node {i} {what} (last reach: {:?})", s.reach),
                    secs: limit.as_secs_f64(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `i` holds a relay reservation; returns its status.
    pub async fn wait_relayed(&self, i: usize, limit: Duration) -> Result<StatusInfo> {
        self.wait_status(i, "to hold a relay reservation", limit, |s| {
            matches!(s.reach, ReachInfo::Relayed { .. })
        })
        .await
    }

    /// The bootstrap address of node `i`: its lab address and TCP port, with its PeerId.
    pub async fn bootstrap_addr(&self, i: usize) -> Result<String> {
        let s = self.status(i).await?;
        let ip = self.nodes[i].host.addr.to_string();
        s.listen_addrs
            .iter()
            .find(|a| a.starts_with(&format!("/ip4/{ip}/tcp/")))
            .map(|a| format!("{a}/p2p/{}", s.peer_id))
            .ok_or_else(|| TestnetError::Node {
                node: i,
                message: format!("no TCP address on {ip}: {:?}", s.listen_addrs),
            })
    }

    /// One Prometheus counter of node `i` summed over its labels (0 if absent).
    pub async fn metric(&self, i: usize, name: &str) -> Result<f64> {
        let addr = std::fs::read_to_string(self.nodes[i].dir.join("metrics.addr"))
            .map_err(|e| TestnetError::io("reading metrics.addr", e))?;
        let url = format!("http://{}/metrics", addr.trim());
        let name = name.to_owned();
        let text = self.nodes[i]
            .rt
            .run(async move {
                let r = reqwest::get(&url).await?;
                r.text().await
            })
            .await
            .map_err(|e| TestnetError::Node {
                node: i,
                message: format!("metrics: {e}"),
            })?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for NatNet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: its nodes' last words are the best clue.
            for (i, n) in self.nodes.iter().enumerate() {
                let log = std::fs::read_to_string(n.dir.join("node.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- node {i} ({}) log, last lines:", n.host.ns);
                for l in &lines[lines.len().saturating_sub(400)..] {
                    eprintln!("{l}");
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                let _ = c.start_kill();
            }
        }
    }
}

/// The role part of a namespace name (`kl123x0-home` → `home`).
fn short(ns: &str) -> &str {
    ns.rsplit('-').next().unwrap_or(ns)
}

/// The lab of the NAT tests and benchmarks: a public relay (node 0, started with
/// `--public`: it is only ever dialled, and AutoNAT only probes over connections a node
/// dialled) and two homes behind `nats` (nodes 1 and 2), bootstrapped from the relay.
pub async fn two_homes(nats: [crate::natlab::Nat; 2], kith: &Path, root: &Path) -> Result<NatNet> {
    let lab_err = |e: crate::natlab::LabError| TestnetError::Invalid(e.to_string());
    let mut lab = Lab::new().map_err(lab_err)?;
    let public = lab.add_public("relay").map_err(lab_err)?;
    let a = lab.add_home("ann", nats[0]).map_err(lab_err)?;
    let b = lab.add_home("bob", nats[1]).map_err(lab_err)?;
    let mut net = NatNet::new(lab, kith, root);
    net.start(public, &["--public"]).await?;
    let boot = net.bootstrap_addr(0).await?;
    net.start(a, &["--bootstrap", &boot]).await?;
    net.start(b, &["--bootstrap", &boot]).await?;
    Ok(net)
}
