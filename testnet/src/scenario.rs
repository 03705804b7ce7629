//! Scenarios: a TOML file with a `[testnet]` section and an ordered list of `[[step]]`s.
//!
//! ```toml
//! [testnet]
//! nodes = 5            # 1 to 500
//! # network = "kith-testnet"   metrics = false   seed = 42
//!
//! [[step]]
//! at = 0               # optional: not before this many seconds after the testnet is up
//! action = "traffic"   # runs in the background
//! rate = 5             # messages/s, all senders together
//! duration = 10        # seconds
//! size = 200           # bytes per message
//! # senders = [0, 1]   # optional: only these nodes send
//!
//! [[step]]
//! at = 3
//! action = "kill"      # SIGKILL; "stop" is SIGTERM; "start"/"restart" bring it back
//! node = 3
//! label = "killed"     # optional: a later assert can count only messages after this step
//! ```
//!
//! Other actions: `send {node, text}`, `invite_join {node, via}` (a new node when `node` is
//! the next index), `partition {groups = [[0,1],[2,3,4]]}`, `heal {timeout?}`,
//! `wait {seconds}`, `wait_until {condition, timeout}` with condition `epochs_equal`,
//! `all_delivered` or `connected`, and `assert {check, node?, nodes?, since?, timeout?}` with
//! check `all_delivered`, `epochs_equal`, `delivered_while_down`, `received_after_restart` or
//! `history_equal`.
//!
//! Membership and history sync:
//! - `burst {count, size, senders?}`: sends `count` tracked messages as fast as the senders'
//!   APIs accept them (dealt round-robin; default senders: every ready member); waits for
//!   every answer.
//! - `remove {node, via}`: member `via` removes `node` (an MLS commit); waits until the
//!   running members agree on the new epoch. `node` keeps running but is no longer expected
//!   to receive anything. `update {node}`: `node` commits a self-update (a new epoch).
//! - `catch_up {node, timeout?}` (needs `metrics = true`): starts stopped member `node` and
//!   measures the time from its restart until it holds every tracked message sent while it
//!   was down (polling its `kith_messages_received_total`, then confirming every id in its
//!   history), and the history sync bytes it moved per missed text byte
//!   (`kith_sync_bytes_total`). At most 1000 missed messages (the history API's page).
//!   Then it waits, like `start`, until the node is back in the group topic.
//!
//! Checks (the delivery rule is [`crate::ledger`]'s): first every background traffic run
//! finishes, then the check is retried until it holds or `timeout` (default 10 s) passes.
//! - `all_delivered`: every expected pair of every tracked message (after `since`) arrived,
//!   and no event stream was lost while its node was up. Receivers that were down at any
//!   time between a send and the check are not expected to have that message.
//! - `delivered_while_down`: the messages sent while some member was down reached every
//!   member that was up (at least one such message must exist).
//! - `received_after_restart` (needs `node`): the node was restarted, and every message
//!   other members sent after its restart reached it (at least one must exist).
//! - `epochs_equal`: every running member reports the same epoch and the full member count.
//! - `history_equal` (`nodes`, default every running member): the nodes are at the same
//!   epoch, each lists every tracked message sent since all of them were members, and the
//!   entries they all hold appear in the same order in each and at the end of each list
//!   (entries only one holds, such as its own "joined" row, come before them). Compared on
//!   the newest 1000 entries (the history API's page), so a node listing that many fails.
//!
//! The whole file is validated before any node starts; errors name the step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::error::{Result, TestnetError};
use crate::launcher::{DEFAULT_ROOT, MAX_HISTORY, Testnet, UpOptions, fresh_dir, now_ms};
use crate::ledger::Accounting;
use crate::manifest::MAX_NODES;
use crate::procs::Sig;
use crate::traffic::{self, TrafficSpec, TrafficSummary};

/// Largest scenario file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most steps in a scenario.
const MAX_STEPS: usize = 1000;
/// Longest wait or timeout in a step.
const MAX_WAIT_SECS: f64 = 3600.0;
/// Default time a check may take to hold.
const DEFAULT_CHECK_TIMEOUT: f64 = 10.0;
/// Default time a heal may take to restore every pair.
const DEFAULT_HEAL_TIMEOUT: f64 = 60.0;
/// Default time a catch-up may take.
const DEFAULT_CATCH_UP_TIMEOUT: f64 = 60.0;

/// `[testnet]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestnetSection {
    /// Nodes at the start.
    pub nodes: usize,
    /// Network id.
    #[serde(default)]
    pub network: Option<String>,
    /// Start nodes with metrics.
    #[serde(default)]
    pub metrics: bool,
    /// Traffic seed (overridden by `--seed` / `KITH_TESTNET_SEED`).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Every running member agrees on the epoch and member count.
    EpochsEqual,
    /// Every expected delivery arrived.
    AllDelivered,
    /// Every running node has at least one connected peer.
    Connected,
}

/// What an assert checks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Every expected delivery arrived.
    AllDelivered,
    /// Every running member agrees on the epoch and member count.
    EpochsEqual,
    /// Messages sent while a member was down reached every member that was up.
    DeliveredWhileDown,
    /// A restarted node got every message sent after its restart.
    ReceivedAfterRestart,
    /// The listed nodes hold the same history in the same order, at the same epoch.
    HistoryEqual,
}

/// One action.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Background traffic.
    Traffic {
        /// Messages per second.
        rate: f64,
        /// Seconds.
        duration: f64,
        /// Bytes per message.
        size: usize,
        /// Only these nodes send.
        #[serde(default)]
        senders: Option<Vec<usize>>,
    },
    /// SIGKILL a node.
    Kill {
        /// Node index.
        node: usize,
    },
    /// SIGTERM a node (SIGKILL if it does not exit in time).
    Stop {
        /// Node index.
        node: usize,
    },
    /// Start a stopped node.
    Start {
        /// Node index.
        node: usize,
    },
    /// Stop (if running) and start a node.
    Restart {
        /// Node index.
        node: usize,
    },
    /// Send many tracked messages as fast as the APIs take them.
    Burst {
        /// How many.
        count: u64,
        /// Bytes per message.
        size: usize,
        /// Only these nodes send.
        #[serde(default)]
        senders: Option<Vec<usize>>,
    },
    /// Remove a member from the group.
    Remove {
        /// The member removed.
        node: usize,
        /// The member that commits the removal.
        via: usize,
    },
    /// A member commits a self-update.
    Update {
        /// The member.
        node: usize,
    },
    /// Start a stopped member and measure how fast it catches up on what it missed.
    CatchUp {
        /// The member.
        node: usize,
        /// Seconds it may take (default 60).
        #[serde(default)]
        timeout: Option<f64>,
    },
    /// Send one tracked message.
    Send {
        /// Node index.
        node: usize,
        /// The text.
        text: String,
    },
    /// Join a node (a new one if `node` is the next index) with an invite from `via`.
    InviteJoin {
        /// Node index.
        node: usize,
        /// Member creating the invite.
        via: usize,
    },
    /// Cut the network into groups of nodes.
    Partition {
        /// The sides.
        groups: Vec<Vec<usize>>,
    },
    /// Lift the partition and wait until every pair can talk.
    Heal {
        /// Seconds to wait for that (default 60).
        #[serde(default)]
        timeout: Option<f64>,
    },
    /// Sleep.
    Wait {
        /// Seconds.
        seconds: f64,
    },
    /// Wait until a condition holds.
    WaitUntil {
        /// The condition.
        condition: Condition,
        /// Seconds.
        timeout: f64,
    },
    /// Check something; the scenario fails if it does not hold.
    Assert {
        /// The check.
        check: Check,
        /// Node, for checks about one node.
        #[serde(default)]
        node: Option<usize>,
        /// Nodes, for checks comparing several nodes.
        #[serde(default)]
        nodes: Option<Vec<usize>>,
        /// Only messages sent after the step with this label completed.
        #[serde(default)]
        since: Option<String>,
        /// Seconds the check may take to hold (default 10).
        #[serde(default)]
        timeout: Option<f64>,
    },
}

impl Action {
    /// A short description for output.
    pub fn describe(&self) -> String {
        match self {
            Action::Traffic {
                rate,
                duration,
                size,
                ..
            } => format!("traffic {rate} msg/s × {duration} s, {size} B"),
            Action::Kill { node } => format!("kill node {node}"),
            Action::Stop { node } => format!("stop node {node}"),
            Action::Start { node } => format!("start node {node}"),
            Action::Restart { node } => format!("restart node {node}"),
            Action::Send { node, .. } => format!("send from node {node}"),
            Action::Burst { count, size, .. } => format!("burst {count} × {size} B"),
            Action::Remove { node, via } => format!("remove node {node} via {via}"),
            Action::Update { node } => format!("update node {node}"),
            Action::CatchUp { node, .. } => format!("catch_up node {node}"),
            Action::InviteJoin { node, via } => format!("invite_join node {node} via {via}"),
            Action::Partition { groups } => format!("partition {groups:?}"),
            Action::Heal { .. } => "heal".to_owned(),
            Action::Wait { seconds } => format!("wait {seconds} s"),
            Action::WaitUntil { condition, .. } => format!("wait_until {}", snake(condition)),
            Action::Assert {
                check, node, nodes, ..
            } => match (node, nodes) {
                (Some(n), _) => format!("assert {} node {n}", snake(check)),
                (None, Some(ns)) => format!("assert {} nodes {ns:?}", snake(check)),
                (None, None) => format!("assert {}", snake(check)),
            },
        }
    }
}

fn snake<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// Not before this many seconds after the testnet is up.
    pub at: Option<f64>,
    /// A name later asserts can refer to with `since`.
    pub label: Option<String>,
    /// What to do.
    pub action: Action,
}

/// A parsed and validated scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// `[testnet]`.
    pub testnet: TestnetSection,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    testnet: TestnetSection,
    #[serde(default)]
    step: Vec<toml::Table>,
}

fn secs_ok(v: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= MAX_WAIT_SECS
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario> {
        let bad = |message: String| TestnetError::Scenario {
            path: path.to_owned(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Scenario::parse(&text).map_err(bad)
    }

    /// Parses and validates scenario text; the error is one line naming the step.
    pub fn parse(text: &str) -> std::result::Result<Scenario, String> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        if raw.step.len() > MAX_STEPS {
            return Err(format!("more than {MAX_STEPS} steps"));
        }
        let mut steps = Vec::new();
        for (i, mut table) in raw.step.into_iter().enumerate() {
            let n = i + 1;
            let at = match table.remove("at") {
                None => None,
                Some(toml::Value::Integer(v)) => Some(v as f64),
                Some(toml::Value::Float(v)) => Some(v),
                Some(_) => return Err(format!("step {n}: `at` must be a number of seconds")),
            };
            let label = match table.remove("label") {
                None => None,
                Some(toml::Value::String(s)) => Some(s),
                Some(_) => return Err(format!("step {n}: `label` must be a string")),
            };
            if !table.contains_key("action") {
                return Err(format!("step {n}: missing `action`"));
            }
            let action: Action = toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| format!("step {n}: {}", one_line(&e.to_string())))?;
            steps.push(Step { at, label, action });
        }
        let s = Scenario {
            testnet: raw.testnet,
            steps,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks ranges and that each step makes sense given the steps before it.
    fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.testnet;
        if t.nodes == 0 || t.nodes > MAX_NODES {
            return Err(format!("[testnet] nodes must be 1 to {MAX_NODES}"));
        }
        if let Some(n) = &t.network
            && (n.is_empty() || n.len() > 64)
        {
            return Err("[testnet] network must be 1 to 64 characters".to_owned());
        }
        let mut running = vec![true; t.nodes];
        let mut member = vec![true; t.nodes];
        let mut labels: Vec<&str> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let n = i + 1;
            let err = |m: String| format!("step {n} ({}): {m}", step.action.describe());
            if let Some(at) = step.at
                && !(at.is_finite() && (0.0..=86_400.0).contains(&at))
            {
                return Err(err("`at` must be 0 to 86400 seconds".to_owned()));
            }
            let count = running.len();
            let exists = |node: usize| {
                if node < count {
                    Ok(())
                } else {
                    Err(err(format!(
                        "there is no node {node} (nodes 0 to {})",
                        count - 1
                    )))
                }
            };
            match &step.action {
                Action::Traffic {
                    rate,
                    duration,
                    size,
                    senders,
                } => {
                    if !(duration.is_finite() && *duration > 0.0 && *duration <= MAX_WAIT_SECS) {
                        return Err(err(format!(
                            "duration must be more than 0 and at most {MAX_WAIT_SECS} s"
                        )));
                    }
                    TrafficSpec {
                        rate: *rate,
                        duration: Duration::from_secs_f64(*duration),
                        size: *size,
                        senders: None,
                    }
                    .validate()
                    .map_err(|e| err(e.to_string()))?;
                    for &s in senders.iter().flatten() {
                        exists(s)?;
                    }
                }
                Action::Kill { node } | Action::Stop { node } => {
                    exists(*node)?;
                    if !running[*node] {
                        return Err(err(format!("node {node} is not running at this point")));
                    }
                    running[*node] = false;
                }
                Action::Start { node } => {
                    exists(*node)?;
                    if running[*node] {
                        return Err(err(format!("node {node} is already running at this point")));
                    }
                    running[*node] = true;
                }
                Action::Restart { node } => {
                    exists(*node)?;
                    running[*node] = true;
                }
                Action::Send { node, text } => {
                    exists(*node)?;
                    if !running[*node] || !member[*node] {
                        return Err(err(format!(
                            "node {node} is not a running member at this point"
                        )));
                    }
                    if text.is_empty() || text.len() > traffic::MAX_SIZE {
                        return Err(err(format!(
                            "text must be 1 to {} bytes",
                            traffic::MAX_SIZE
                        )));
                    }
                }
                Action::Burst {
                    count,
                    size,
                    senders,
                } => {
                    if !(1..=traffic::MAX_BURST).contains(count) {
                        return Err(err(format!("count must be 1 to {}", traffic::MAX_BURST)));
                    }
                    if !(traffic::MIN_SIZE..=traffic::MAX_SIZE).contains(size) {
                        return Err(err(format!(
                            "size must be {} to {} bytes",
                            traffic::MIN_SIZE,
                            traffic::MAX_SIZE
                        )));
                    }
                    for &s in senders.iter().flatten() {
                        exists(s)?;
                        if !running[s] || !member[s] {
                            return Err(err(format!(
                                "sender {s} is not a running member at this point"
                            )));
                        }
                    }
                }
                Action::Remove { node, via } => {
                    exists(*node)?;
                    exists(*via)?;
                    if node == via {
                        return Err(err(
                            "a member cannot remove itself (that is leaving)".to_owned()
                        ));
                    }
                    if !running[*via] || !member[*via] {
                        return Err(err(format!(
                            "node {via} is not a running member at this point"
                        )));
                    }
                    if !member[*node] {
                        return Err(err(format!("node {node} is not a member at this point")));
                    }
                    member[*node] = false;
                }
                Action::Update { node } => {
                    exists(*node)?;
                    if !running[*node] || !member[*node] {
                        return Err(err(format!(
                            "node {node} is not a running member at this point"
                        )));
                    }
                }
                Action::CatchUp { node, timeout } => {
                    exists(*node)?;
                    if !self.testnet.metrics {
                        return Err(err(
                            "catch_up reads the node's metrics: set `metrics = true` in [testnet]"
                                .to_owned(),
                        ));
                    }
                    if running[*node] || !member[*node] {
                        return Err(err(format!(
                            "node {node} is not a stopped member at this point"
                        )));
                    }
                    if timeout.is_some_and(|t| !secs_ok(t)) {
                        return Err(err(format!(
                            "timeout must be more than 0 and at most {MAX_WAIT_SECS} s"
                        )));
                    }
                    running[*node] = true;
                }
                Action::InviteJoin { node, via } => {
                    exists(*via)?;
                    if !running[*via] || !member[*via] {
                        return Err(err(format!(
                            "node {via} is not a running member at this point"
                        )));
                    }
                    if *node == count {
                        if count >= MAX_NODES {
                            return Err(err(format!("at most {MAX_NODES} nodes")));
                        }
                        running.push(true);
                        member.push(true);
                    } else {
                        exists(*node)?;
                        if member[*node] {
                            return Err(err(format!("node {node} is already a member")));
                        }
                        if !running[*node] {
                            return Err(err(format!("node {node} is not running")));
                        }
                        member[*node] = true;
                    }
                }
                Action::Partition { groups } => {
                    if groups.len() < 2 || groups.iter().any(Vec::is_empty) {
                        return Err(err("needs at least two non-empty groups".to_owned()));
                    }
                    let mut seen = vec![false; count];
                    for &x in groups.iter().flatten() {
                        exists(x)?;
                        if seen[x] {
                            return Err(err(format!("node {x} is in two groups")));
                        }
                        seen[x] = true;
                    }
                    if let Some(missing) = seen.iter().position(|s| !s) {
                        return Err(err(format!("node {missing} is in no group")));
                    }
                }
                Action::Heal { timeout } => {
                    if timeout.is_some_and(|t| !secs_ok(t)) {
                        return Err(err(format!(
                            "timeout must be more than 0 and at most {MAX_WAIT_SECS} s"
                        )));
                    }
                }
                Action::Wait { seconds } => {
                    if !secs_ok(*seconds) {
                        return Err(err(format!(
                            "seconds must be more than 0 and at most {MAX_WAIT_SECS}"
                        )));
                    }
                }
                Action::WaitUntil { timeout, .. } => {
                    if !secs_ok(*timeout) {
                        return Err(err(format!(
                            "timeout must be more than 0 and at most {MAX_WAIT_SECS} s"
                        )));
                    }
                }
                Action::Assert {
                    check,
                    node,
                    nodes,
                    since,
                    timeout,
                } => {
                    if timeout.is_some_and(|t| !secs_ok(t)) {
                        return Err(err(format!(
                            "timeout must be more than 0 and at most {MAX_WAIT_SECS} s"
                        )));
                    }
                    if let Some(l) = since
                        && !labels.contains(&l.as_str())
                    {
                        return Err(err(format!("`since` names no earlier step label '{l}'")));
                    }
                    match (check, nodes) {
                        (Check::HistoryEqual, Some(ns)) => {
                            if ns.is_empty() {
                                return Err(err("`nodes` must not be empty".to_owned()));
                            }
                            for &x in ns {
                                exists(x)?;
                            }
                        }
                        (Check::HistoryEqual, None) => {}
                        (_, Some(_)) => {
                            return Err(err("only history_equal takes `nodes`".to_owned()));
                        }
                        (_, None) => {}
                    }
                    match (check, node) {
                        (Check::ReceivedAfterRestart, None) => {
                            return Err(err("received_after_restart needs `node`".to_owned()));
                        }
                        (Check::ReceivedAfterRestart, Some(x)) => exists(*x)?,
                        (_, Some(_)) => {
                            return Err(err("this check takes no `node`".to_owned()));
                        }
                        (_, None) => {}
                    }
                }
            }
            if let Some(l) = &step.label {
                if l.is_empty() || l.len() > 64 {
                    return Err(err("label must be 1 to 64 characters".to_owned()));
                }
                if labels.contains(&l.as_str()) {
                    return Err(err(format!("label '{l}' is used twice")));
                }
                labels.push(l);
            }
        }
        Ok(())
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Settings of a scenario run.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// The scenario file.
    pub file: PathBuf,
    /// Run directory (default `./testnet-run/<timestamp>`).
    pub dir: Option<PathBuf>,
    /// The `kith` binary.
    pub kith: Option<PathBuf>,
    /// Traffic seed if given on the command line or in the environment (else the file's,
    /// else random).
    pub seed: Option<u64>,
    /// `RUST_LOG` of the nodes.
    pub node_log: String,
    /// No stage lines.
    pub quiet: bool,
}

/// The outcome of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// 1-based step number.
    pub step: usize,
    /// What it did.
    pub action: String,
    /// Seconds after the testnet was up when it began.
    pub started_secs: f64,
    /// How long it took.
    pub took_secs: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// What it found (counts for checks) or why it failed.
    pub detail: String,
}

/// `scenario-report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The scenario file.
    pub file: PathBuf,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Traffic seed.
    pub seed: u64,
    /// Whether every step succeeded.
    pub passed: bool,
    /// The first failure, as one line.
    pub failure: Option<String>,
    /// Step results, up to the first failure.
    pub steps: Vec<StepResult>,
    /// Deliveries of every tracked message at the end (for information).
    pub delivery: Accounting,
    /// Background traffic runs.
    pub traffic: Vec<TrafficSummary>,
    /// Sends the nodes refused.
    pub send_failures: usize,
    /// Pids still running after the stop (must be empty).
    pub left_running: Vec<u32>,
}

/// Loads `opts.file`, starts its testnet, runs the steps, stops everything and writes
/// `RUN_DIR/scenario-report.json`. A failed step is a report with `passed = false`; an
/// `Err` means the scenario could not be run at all.
pub async fn run(opts: ScenarioOptions) -> Result<ScenarioReport> {
    let scenario = Scenario::load(&opts.file)?;
    let seed = opts
        .seed
        .or(scenario.testnet.seed)
        .unwrap_or_else(rand::random);
    let mut up = UpOptions {
        nodes: scenario.testnet.nodes,
        dir: Some(
            opts.dir
                .clone()
                .unwrap_or_else(|| fresh_dir(Path::new(DEFAULT_ROOT), "")),
        ),
        metrics: scenario.testnet.metrics,
        kith: opts.kith.clone(),
        node_log: opts.node_log.clone(),
        quiet: opts.quiet,
        ..UpOptions::default()
    };
    if let Some(n) = &scenario.testnet.network {
        up.network.clone_from(n);
    }
    let mut tn = Testnet::up(up).await?;
    tn.progress.line(&format!(
        "scenario {} ({} steps), seed {seed}",
        opts.file.display(),
        scenario.steps.len()
    ));
    let mut runner = Runner {
        seed,
        labels: HashMap::new(),
        traffic: Vec::new(),
        traffic_done: Vec::new(),
    };
    let t0 = tokio::time::Instant::now();
    let mut results = Vec::new();
    let mut failure = None;
    for (i, step) in scenario.steps.iter().enumerate() {
        if let Some(at) = step.at {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(at)).await;
        }
        let started = t0.elapsed().as_secs_f64();
        let desc = step.action.describe();
        tn.progress.line(&format!("step {}: {desc}", i + 1));
        let outcome = runner.execute(&mut tn, i, step).await;
        let took = t0.elapsed().as_secs_f64() - started;
        let (ok, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(e) => (false, one_line(&e)),
        };
        if !detail.is_empty() {
            tn.progress.line(&format!(
                "  {} {detail}",
                if ok { "ok:" } else { "FAILED:" }
            ));
        }
        if !ok {
            failure = Some(
                TestnetError::StepFailed {
                    step: i + 1,
                    action: desc.clone(),
                    message: detail.clone(),
                }
                .to_string(),
            );
        }
        results.push(StepResult {
            step: i + 1,
            action: desc,
            started_secs: started,
            took_secs: took,
            ok,
            detail,
        });
        if !ok {
            break;
        }
    }
    if failure.is_some() {
        for t in &runner.traffic {
            t.abort();
        }
    }
    runner.finish_traffic().await;
    let delivery = tn.shared.lock().ledger.account(|_| true, None, now_ms());
    let send_failures = tn.shared.lock().ledger.failures.len();
    let summary = tn.shutdown().await;
    let report = ScenarioReport {
        file: opts.file.clone(),
        run_dir: tn.dir.clone(),
        seed,
        passed: failure.is_none(),
        failure,
        steps: results,
        delivery,
        traffic: runner.traffic_done,
        send_failures,
        left_running: summary.left_running,
    };
    let path = tn.dir.join("scenario-report.json");
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TestnetError::Invalid(format!("cannot encode the report: {e}")))?;
    std::fs::write(&path, json + "\n")
        .map_err(|e| TestnetError::io(format!("writing {}", path.display()), e))?;
    Ok(report)
}

struct Runner {
    seed: u64,
    /// Completion time (ms) of labelled steps.
    labels: HashMap<String, u64>,
    traffic: Vec<JoinHandle<TrafficSummary>>,
    traffic_done: Vec<TrafficSummary>,
}

impl Runner {
    async fn finish_traffic(&mut self) {
        for t in self.traffic.drain(..) {
            if let Ok(s) = t.await {
                self.traffic_done.push(s);
            }
        }
    }

    async fn execute(
        &mut self,
        tn: &mut Testnet,
        index: usize,
        step: &Step,
    ) -> std::result::Result<String, String> {
        let detail = self.action(tn, index, &step.action).await?;
        if let Some(l) = &step.label {
            self.labels.insert(l.clone(), now_ms());
        }
        Ok(detail)
    }

    async fn action(
        &mut self,
        tn: &mut Testnet,
        index: usize,
        action: &Action,
    ) -> std::result::Result<String, String> {
        let e = |e: TestnetError| e.to_string();
        match action {
            Action::Traffic {
                rate,
                duration,
                size,
                senders,
            } => {
                let spec = TrafficSpec {
                    rate: *rate,
                    duration: Duration::from_secs_f64(*duration),
                    size: *size,
                    senders: senders.clone(),
                };
                let seed = self.seed.wrapping_add(index as u64);
                self.traffic
                    .push(tokio::spawn(traffic::run(tn.shared.clone(), spec, seed)));
                Ok(String::new())
            }
            Action::Kill { node } => {
                tn.stop_node(*node, Sig::Kill).await.map_err(e)?;
                Ok(String::new())
            }
            Action::Stop { node } => {
                let killed = tn.stop_node(*node, Sig::Term).await.map_err(e)?;
                Ok(if killed {
                    "did not exit after SIGTERM; killed".to_owned()
                } else {
                    String::new()
                })
            }
            Action::Start { node } => {
                tn.start_node(*node).await.map_err(e)?;
                Ok("back in the group topic".to_owned())
            }
            Action::Restart { node } => {
                if tn.nodes[*node].is_running() {
                    tn.stop_node(*node, Sig::Term).await.map_err(e)?;
                }
                tn.start_node(*node).await.map_err(e)?;
                Ok("back in the group topic".to_owned())
            }
            Action::Send { node, text } => {
                let seq = tn.send(*node, text).await.map_err(e)?;
                Ok(format!("message #{seq}"))
            }
            Action::Burst {
                count,
                size,
                senders,
            } => {
                let seed = self.seed.wrapping_add(index as u64);
                let b = traffic::burst(&tn.shared, *count, *size, senders.as_deref(), seed)
                    .await
                    .map_err(e)?;
                if b.failed > 0 {
                    return Err(format!(
                        "{} of {count} sends failed (see the report's send failures)",
                        b.failed
                    ));
                }
                Ok(format!(
                    "{} messages sent in {:.1} s ({:.0} msg/s)",
                    b.sent,
                    b.secs,
                    b.sent as f64 / b.secs.max(1e-9)
                ))
            }
            Action::Remove { node, via } => {
                let epoch = tn.remove_member(*node, *via).await.map_err(e)?;
                Ok(format!(
                    "node {node} removed; running members at epoch {epoch}"
                ))
            }
            Action::Update { node } => {
                let epoch = tn.self_update(*node).await.map_err(e)?;
                Ok(format!("running members at epoch {epoch}"))
            }
            Action::CatchUp { node, timeout } => {
                let limit = Duration::from_secs_f64(timeout.unwrap_or(DEFAULT_CATCH_UP_TIMEOUT));
                catch_up(tn, *node, limit).await
            }
            Action::InviteJoin { node, via } => {
                tn.invite_join(*node, *via).await.map_err(e)?;
                Ok(format!("node {node} is a member"))
            }
            Action::Partition { groups } => {
                tn.partition(groups.clone()).await.map_err(e)?;
                Ok("no connection crosses the partition".to_owned())
            }
            Action::Heal { timeout } => {
                let limit = Duration::from_secs_f64(timeout.unwrap_or(DEFAULT_HEAL_TIMEOUT));
                tn.heal(limit).await.map_err(e)?;
                Ok("every pair of running members talks again".to_owned())
            }
            Action::Wait { seconds } => {
                tokio::time::sleep(Duration::from_secs_f64(*seconds)).await;
                Ok(String::new())
            }
            Action::WaitUntil { condition, timeout } => {
                let limit = Duration::from_secs_f64(*timeout);
                match condition {
                    Condition::EpochsEqual => epochs_equal(tn, limit).await,
                    Condition::AllDelivered => {
                        self.finish_traffic().await;
                        self.delivery(tn, Check::AllDelivered, None, None, limit)
                            .await
                    }
                    Condition::Connected => connected(tn, limit).await,
                }
            }
            Action::Assert {
                check,
                node,
                nodes,
                since,
                timeout,
            } => {
                let limit = Duration::from_secs_f64(timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT));
                let since = since.as_ref().and_then(|l| self.labels.get(l).copied());
                match check {
                    Check::EpochsEqual => epochs_equal(tn, limit).await,
                    Check::HistoryEqual => {
                        let ns = nodes.clone().unwrap_or_else(|| tn.running_members());
                        history_equal(tn, &ns, limit).await
                    }
                    _ => {
                        self.finish_traffic().await;
                        self.delivery(tn, *check, *node, since, limit).await
                    }
                }
            }
        }
    }

    /// Retries a delivery check until it holds or `limit` passes.
    async fn delivery(
        &self,
        tn: &Testnet,
        check: Check,
        node: Option<usize>,
        since: Option<u64>,
        limit: Duration,
    ) -> std::result::Result<String, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let verdict = judge(tn, check, node, since);
            if verdict.is_ok() || tokio::time::Instant::now() >= deadline {
                return verdict;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One evaluation of a delivery check.
fn judge(
    tn: &Testnet,
    check: Check,
    node: Option<usize>,
    since: Option<u64>,
) -> std::result::Result<String, String> {
    let st = tn.shared.lock();
    let l = &st.ledger;
    let now = now_ms();
    let after = |t: u64| since.is_none_or(|s| t >= s);
    let excluded = |a: &Accounting| {
        format!(
            "excluded: {} receiver down, {} sender died right after sending, {} partitioned",
            a.excluded_receiver_down, a.excluded_sender_down, a.excluded_partitioned
        )
    };
    match check {
        Check::AllDelivered => {
            let lost: Vec<String> = l
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.stream_lost_ms.iter().any(|t| after(*t)))
                .map(|(i, _)| i.to_string())
                .collect();
            if !lost.is_empty() {
                return Err(format!(
                    "the event stream of node(s) {} ended while they were up; their deliveries cannot be checked",
                    lost.join(", ")
                ));
            }
            let a = l.account(|m| after(m.send_start_ms), None, now);
            if a.messages == 0 {
                return Err("no tracked message was sent; nothing to check".to_owned());
            }
            if a.delivered == a.expected {
                Ok(format!(
                    "{} messages, {}/{} deliveries ({})",
                    a.messages,
                    a.delivered,
                    a.expected,
                    excluded(&a)
                ))
            } else {
                Err(format!(
                    "{} of {} expected deliveries arrived; {}",
                    a.delivered,
                    a.expected,
                    a.describe_missing()
                ))
            }
        }
        Check::DeliveredWhileDown => {
            let a = l.account(
                |m| after(m.send_start_ms) && l.someone_down_at(m.send_start_ms),
                None,
                now,
            );
            if a.messages == 0 || a.expected == 0 {
                return Err(
                    "no message was sent while a member was down; the check proves nothing"
                        .to_owned(),
                );
            }
            if a.delivered == a.expected {
                Ok(format!(
                    "{} messages sent while a member was down reached every up member ({} deliveries; {})",
                    a.messages,
                    a.delivered,
                    excluded(&a)
                ))
            } else {
                Err(format!(
                    "of the messages sent while a member was down, {} of {} expected deliveries arrived; {}",
                    a.delivered,
                    a.expected,
                    a.describe_missing()
                ))
            }
        }
        Check::ReceivedAfterRestart => {
            let Some(n) = node else {
                return Err("received_after_restart needs a node".to_owned());
            };
            let Some(t) = l
                .nodes
                .get(n)
                .filter(|x| x.ready.len() >= 2)
                .and_then(|x| x.ready.last())
                .map(|s| s.from_ms)
            else {
                return Err(format!("node {n} was never restarted"));
            };
            let a = l.account(
                |m| m.sender != n && m.send_start_ms >= t && after(m.send_start_ms),
                Some(n),
                now,
            );
            if a.expected == 0 {
                return Err(format!(
                    "no message from another member was sent to node {n} after its restart (or it is down again)"
                ));
            }
            if a.delivered == a.expected {
                Ok(format!(
                    "node {n} received all {} messages sent after its restart",
                    a.delivered
                ))
            } else {
                Err(format!(
                    "node {n} received {} of {} messages sent after its restart; {}",
                    a.delivered,
                    a.expected,
                    a.describe_missing()
                ))
            }
        }
        Check::EpochsEqual | Check::HistoryEqual => {
            Err(format!("{} is not a delivery check", snake(&check)))
        }
    }
}

async fn epochs_equal(tn: &Testnet, limit: Duration) -> std::result::Result<String, String> {
    let members = tn.running_members();
    match tn.wait_converged(&members, limit).await {
        Ok(epoch) => Ok(format!(
            "{} running members at epoch {epoch}",
            members.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Retries [`history_once`] until it holds or `limit` passes.
async fn history_equal(
    tn: &Testnet,
    nodes: &[usize],
    limit: Duration,
) -> std::result::Result<String, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let verdict = history_once(tn, nodes).await;
        if verdict.is_ok() || tokio::time::Instant::now() >= deadline {
            return verdict;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One evaluation of `history_equal` (see the module docs).
async fn history_once(tn: &Testnet, nodes: &[usize]) -> std::result::Result<String, String> {
    let required: Vec<String> = {
        let st = tn.shared.lock();
        let since = nodes
            .iter()
            .filter_map(|&i| st.ledger.nodes.get(i).and_then(|n| n.member_since_ms))
            .max()
            .unwrap_or(0);
        st.ledger
            .sent
            .iter()
            .filter(|m| m.send_start_ms >= since)
            .map(|m| m.id.clone())
            .collect()
    };
    let mut lists: Vec<Vec<String>> = Vec::with_capacity(nodes.len());
    let mut infos: HashMap<String, String> = HashMap::new();
    let mut epochs = Vec::with_capacity(nodes.len());
    for &i in nodes {
        if !tn.nodes[i].is_running() {
            return Err(format!("node {i} is not running"));
        }
        let view = tn.group_views(&[i]).await.map_err(|e| e.to_string())?;
        epochs.push(view.first().map_or(0, |v| v.1));
        let history = tn.history(i).await.map_err(|e| e.to_string())?;
        if history.len() >= MAX_HISTORY {
            return Err(format!(
                "node {i} lists {MAX_HISTORY} entries, the API's page; history_equal compares fewer"
            ));
        }
        for m in &history {
            infos.entry(m.id.clone()).or_insert_with(|| {
                format!(
                    "{} ({}, epoch {}, sent_at_ms {})",
                    m.id.get(..8).unwrap_or(&m.id),
                    serde_json::to_value(&m.body)
                        .ok()
                        .and_then(|v| v["type"].as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    m.epoch,
                    m.sent_at_ms
                )
            });
        }
        lists.push(history.into_iter().map(|m| m.id).collect());
    }
    if epochs.iter().any(|e| Some(e) != epochs.first()) {
        let shown: Vec<String> = nodes
            .iter()
            .zip(&epochs)
            .map(|(i, e)| format!("node {i} at {e}"))
            .collect();
        return Err(format!("epochs differ: {}", shown.join(", ")));
    }
    let sets: Vec<std::collections::HashSet<&String>> =
        lists.iter().map(|l| l.iter().collect()).collect();
    for (k, &i) in nodes.iter().enumerate() {
        let missing = required.iter().filter(|id| !sets[k].contains(id)).count();
        if missing > 0 {
            return Err(format!(
                "node {i} lacks {missing} of the {} tracked messages",
                required.len()
            ));
        }
    }
    let shared: Vec<Vec<&String>> = lists
        .iter()
        .map(|l| {
            l.iter()
                .filter(|id| sets.iter().all(|s| s.contains(id)))
                .collect()
        })
        .collect();
    for (k, &i) in nodes.iter().enumerate().skip(1) {
        if shared[k] != shared[0] {
            let at = shared[0]
                .iter()
                .zip(&shared[k])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let show = |k: usize| {
                shared[k]
                    .get(at)
                    .and_then(|id| infos.get(*id))
                    .cloned()
                    .unwrap_or_default()
            };
            return Err(format!(
                "node {i} orders the {} shared entries differently from node {} (first difference at position {at}: {} there, {} on node {i})",
                shared[0].len(),
                nodes[0],
                show(0),
                show(k)
            ));
        }
    }
    for (k, &i) in nodes.iter().enumerate() {
        let tail = &lists[k][lists[k].len() - shared[k].len()..];
        if tail.iter().collect::<Vec<_>>() != shared[k] {
            return Err(format!(
                "node {i} lists entries only it holds among the shared ones"
            ));
        }
    }
    Ok(format!(
        "nodes {nodes:?} at epoch {} list the same {} entries in the same order, with all {} tracked messages",
        epochs.first().copied().unwrap_or(0),
        shared[0].len(),
        required.len()
    ))
}

/// `catch_up`: restarts stopped member `node` and measures its catch-up (see the module
/// docs).
async fn catch_up(
    tn: &mut Testnet,
    node: usize,
    limit: Duration,
) -> std::result::Result<String, String> {
    let (missed, missed_bytes) = {
        let st = tn.shared.lock();
        let Some(down) = st
            .ledger
            .nodes
            .get(node)
            .and_then(|n| n.ready.last())
            .and_then(|s| s.to_ms)
        else {
            return Err(format!("node {node} was never up and then stopped"));
        };
        let missed: Vec<&crate::ledger::Sent> = st
            .ledger
            .sent
            .iter()
            .filter(|m| m.sender != node && m.send_start_ms >= down)
            .collect();
        let bytes: usize = missed.iter().map(|m| m.bytes).sum();
        (
            missed
                .into_iter()
                .map(|m| m.id.clone())
                .collect::<Vec<String>>(),
            bytes,
        )
    };
    if missed.is_empty() {
        return Err(format!(
            "no tracked message was sent while node {node} was down; nothing to catch up"
        ));
    }
    if missed.len() > MAX_HISTORY {
        return Err(format!(
            "node {node} missed {} messages; catch_up confirms through one history page, so at most {}",
            missed.len(),
            MAX_HISTORY
        ));
    }
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    tn.start_node_api_only(node)
        .await
        .map_err(|e| e.to_string())?;
    let api_up = started.elapsed();
    let want = missed.len() as f64;
    let figures = loop {
        let figures = match tn.scrape(node).await {
            None => return Err(format!("node {node} serves no metrics")),
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => None,
        };
        if figures
            .as_ref()
            .is_some_and(|f| f.messages_received.unwrap_or(0.0) >= want)
        {
            break figures;
        }
        if tokio::time::Instant::now() >= deadline {
            let got = figures.and_then(|f| f.messages_received).unwrap_or(0.0);
            return Err(format!(
                "node {node} received {got} of {} missed messages within {:.0} s",
                missed.len(),
                limit.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let caught_up = started.elapsed();
    let held: std::collections::HashSet<String> = tn
        .history(node)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let lacking = missed.iter().filter(|id| !held.contains(*id)).count();
    if lacking > 0 {
        return Err(format!(
            "node {node} counted {want} received messages but its history lacks {lacking} of the {} it missed",
            missed.len()
        ));
    }
    let f = figures.unwrap_or_default();
    let request = f.sync_request_sent.unwrap_or(0.0);
    let response = f.sync_response_received.unwrap_or(0.0);
    let transport = f.bytes_in.unwrap_or(0.0) + f.bytes_out.unwrap_or(0.0);
    let per = |b: f64| b / missed_bytes.max(1) as f64;
    tn.finish_start(node).await.map_err(|e| e.to_string())?;
    Ok(format!(
        "node {node} caught up on {} missed messages ({missed_bytes} text bytes) {:.2} s after its restart ({:.2} s after its API answered); \
         history sync moved {:.0} bytes ({request:.0} request, {response:.0} response) = {:.3} per missed byte; \
         all transport bytes since its start {transport:.0} = {:.3} per missed byte",
        missed.len(),
        caught_up.as_secs_f64(),
        (caught_up - api_up).as_secs_f64(),
        request + response,
        per(request + response),
        per(transport)
    ))
}

async fn connected(tn: &Testnet, limit: Duration) -> std::result::Result<String, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut lonely = Vec::new();
        for n in tn.nodes.iter().filter(|n| n.is_running()) {
            let peers = match n.client() {
                Ok(c) => tokio::time::timeout(Duration::from_secs(5), c.status())
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|s| s.connected_peers),
                Err(_) => None,
            };
            if peers.unwrap_or(0) == 0 {
                lonely.push(n.index.to_string());
            }
        }
        if lonely.is_empty() {
            return Ok("every running node has a peer".to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "node(s) {} have no connected peer after {:.0} s",
                lonely.join(", "),
                limit.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The report's steps as a text table.
pub fn render(r: &ScenarioReport) -> String {
    let mut out = format!(
        "{:>4}  {:>7}  {:>6}  {:<4}  {}\n",
        "STEP", "AT s", "TOOK s", "OK", "ACTION / DETAIL"
    );
    for s in &r.steps {
        out.push_str(&format!(
            "{:>4}  {:>7.1}  {:>6.1}  {:<4}  {}{}\n",
            s.step,
            s.started_secs,
            s.took_secs,
            if s.ok { "ok" } else { "FAIL" },
            s.action,
            if s.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", s.detail)
            }
        ));
    }
    let d = &r.delivery;
    out.push_str(&format!(
        "seed {}; tracked messages {}, deliveries {}/{} (excluded: {} receiver down, {} sender died, {} partitioned); failed sends {}\n",
        r.seed,
        d.messages,
        d.delivered,
        d.expected,
        d.excluded_receiver_down,
        d.excluded_sender_down,
        d.excluded_partitioned,
        r.send_failures
    ));
    out.push_str(&format!(
        "{}; report in {}\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.run_dir.join("scenario-report.json").display()
    ));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[testnet]
nodes = 5

[[step]]
at = 0
action = "traffic"
rate = 5
duration = 10.5
size = 200

[[step]]
at = 3
action = "kill"
node = 3
label = "down"

[[step]]
action = "restart"
node = 3

[[step]]
action = "invite_join"
node = 5
via = 0

[[step]]
action = "partition"
groups = [[0, 1], [2, 3, 4, 5]]

[[step]]
action = "heal"

[[step]]
action = "wait_until"
condition = "epochs_equal"
timeout = 30

[[step]]
action = "assert"
check = "received_after_restart"
node = 3
since = "down"
"#;

    #[test]
    fn parses_a_good_scenario() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.testnet.nodes, 5);
        assert_eq!(s.steps.len(), 8);
        assert_eq!(s.steps[1].at, Some(3.0));
        assert_eq!(s.steps[1].label.as_deref(), Some("down"));
        assert_eq!(s.steps[1].action, Action::Kill { node: 3 });
        assert!(
            matches!(s.steps[0].action, Action::Traffic { rate, duration, size: 200, .. } if rate == 5.0 && duration == 10.5)
        );
        assert_eq!(
            s.steps[7].action.describe(),
            "assert received_after_restart node 3"
        );
    }

    fn err(text: &str) -> String {
        let e = Scenario::parse(text).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn bad_scenarios_name_the_step() {
        let head = "[testnet]\nnodes = 3\n";
        let cases = [
            ("[[step]]\naction = \"kill\"\nnode = 3\n", "step 1"),
            ("[[step]]\naction = \"kil\"\nnode = 1\n", "step 1"),
            ("[[step]]\naction = \"kill\"\nnod = 1\n", "step 1"),
            ("[[step]]\nnode = 1\n", "missing `action`"),
            (
                "[[step]]\naction = \"start\"\nnode = 1\n",
                "already running",
            ),
            (
                "[[step]]\naction = \"kill\"\nnode = 1\n[[step]]\naction = \"stop\"\nnode = 1\n",
                "step 2",
            ),
            (
                "[[step]]\naction = \"traffic\"\nrate = 0\nduration = 1\nsize = 100\n",
                "rate",
            ),
            (
                "[[step]]\naction = \"traffic\"\nrate = 1\nduration = 1\nsize = 1\n",
                "size",
            ),
            (
                "[[step]]\naction = \"partition\"\ngroups = [[0, 1]]\n",
                "two",
            ),
            (
                "[[step]]\naction = \"partition\"\ngroups = [[0], [1]]\n",
                "node 2 is in no group",
            ),
            (
                "[[step]]\naction = \"partition\"\ngroups = [[0, 1], [1, 2]]\n",
                "two groups",
            ),
            ("[[step]]\naction = \"wait\"\nseconds = -1\n", "seconds"),
            ("[[step]]\nat = \"soon\"\naction = \"heal\"\n", "`at`"),
            (
                "[[step]]\naction = \"assert\"\ncheck = \"received_after_restart\"\n",
                "needs `node`",
            ),
            (
                "[[step]]\naction = \"assert\"\ncheck = \"all_delivered\"\nsince = \"x\"\n",
                "label 'x'",
            ),
            (
                "[[step]]\naction = \"assert\"\ncheck = \"everything\"\n",
                "step 1",
            ),
            (
                "[[step]]\naction = \"invite_join\"\nnode = 4\nvia = 0\n",
                "no node 4",
            ),
            (
                "[[step]]\naction = \"send\"\nnode = 0\ntext = \"\"\n",
                "text",
            ),
            (
                "[[step]]\naction = \"remove\"\nnode = 1\nvia = 1\n",
                "cannot remove itself",
            ),
            (
                "[[step]]\naction = \"remove\"\nnode = 1\nvia = 0\n[[step]]\naction = \"update\"\nnode = 1\n",
                "step 2",
            ),
            (
                "[[step]]\naction = \"burst\"\ncount = 0\nsize = 100\n",
                "count",
            ),
            (
                "[[step]]\naction = \"stop\"\nnode = 2\n[[step]]\naction = \"catch_up\"\nnode = 2\n",
                "metrics = true",
            ),
            (
                "[[step]]\naction = \"assert\"\ncheck = \"epochs_equal\"\nnodes = [0]\n",
                "only history_equal",
            ),
            (
                "[[step]]\naction = \"assert\"\ncheck = \"history_equal\"\nnodes = [5]\n",
                "no node 5",
            ),
        ];
        for (steps, want) in cases {
            let e = err(&format!("{head}{steps}"));
            assert!(e.contains(want), "{steps:?}: {e}");
        }
        assert!(err("[testnet]\nnodes = 0\n").contains("nodes"));
        assert!(err("[testnet]\nnodes = 2\nextra = 1\n").contains("extra"));
        assert!(err("nodes = 2\n").contains("testnet"));
        assert!(err("[testnet\n").contains("TOML") || !err("[testnet\n").is_empty());
    }

    #[test]
    fn catch_up_needs_a_stopped_member_and_metrics() {
        let ok = "[testnet]\nnodes = 3\nmetrics = true\n[[step]]\naction = \"stop\"\nnode = 2\n\
                  [[step]]\naction = \"catch_up\"\nnode = 2\n";
        let s = Scenario::parse(ok).unwrap();
        assert_eq!(
            s.steps[1].action,
            Action::CatchUp {
                node: 2,
                timeout: None
            }
        );
        let running =
            "[testnet]\nnodes = 3\nmetrics = true\n[[step]]\naction = \"catch_up\"\nnode = 2\n";
        assert!(err(running).contains("not a stopped member"));
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4);
    }
}
