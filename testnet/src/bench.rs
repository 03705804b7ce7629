//! `kith-testnet bench`: steady seeded traffic over a testnet, then delivery, latency,
//! duplicate, wire-overhead and process-cost figures, as a table, `report.json` and
//! `latency.svg`.
//!
//! Figures and where they come from:
//! - **delivery**: expected pairs are (message, other member) for every message sent in the
//!   measured window (see [`crate::ledger`] for the exact rule); delivered = seen on the
//!   receiver's event stream before the drain timeout.
//! - **latency**: receiver's `received_at_ms` − sender's `sent_at_ms`, both from the nodes'
//!   clocks (one machine, one clock), over every delivered pair; nearest-rank percentiles.
//! - **duplicates per message per node**: from each node's metrics, the growth of gossipsub
//!   receptions with duplicates minus without, over the growth without (n/a without metrics).
//! - **wire bytes per useful byte**: growth of all nodes' transport bytes sent, over the
//!   bytes of text delivered (message size × delivered pairs). Everything on the wire counts:
//!   gossip, its control traffic, the DHT, identify, ping, Noise and Yamux framing.
//! - **CPU seconds** (`utime + stime` over the clock tick rate, from `/proc/<pid>/stat`)
//!   used during the measured window and drain; **peak RSS** (`VmHWM`) at the end.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::attack::{AttackKind, AttackStats};
use crate::error::{Result, TestnetError};
use crate::launcher::{Testnet, UpOptions, now_ms};
use crate::ledger::{Accounting, Missing};
use crate::metrics::Figures;
use crate::procs::{self, ProcStats, ThreadCpu};
use crate::stats::{Percentiles, Spread, percentiles, spread};
use crate::traffic::{self, TrafficSpec, TrafficSummary};

/// Settings of a bench run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How to start the testnet (ignored with `attach`).
    pub up: UpOptions,
    /// Use the running testnet in this run directory instead of starting one.
    pub attach: Option<PathBuf>,
    /// Messages per second, all senders together.
    pub rate: f64,
    /// Bytes per message.
    pub size: usize,
    /// Measured traffic duration.
    pub duration: Duration,
    /// Traffic before the measurement (not counted).
    pub warmup: Duration,
    /// How long to wait for the last deliveries.
    pub drain: Duration,
    /// Where to write the report (default `RUN_DIR/bench-<timestamp>`).
    pub out: Option<PathBuf>,
    /// Traffic seed.
    pub seed: u64,
    /// Hostile peers to run against the testnet for the whole bench (one each).
    pub attacks: Vec<AttackKind>,
}

/// Counts of messages in the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct MessageCounts {
    /// Scheduled by the traffic generator.
    pub scheduled: u64,
    /// Accepted by the sending node.
    pub sent: usize,
    /// Refused or failed sends.
    pub failed: usize,
    /// Not attempted (no ready sender, or too many in flight).
    pub skipped: u64,
    /// Largest lateness of a send against its schedule (ms).
    pub max_schedule_lag_ms: u64,
}

/// Delivery figures.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryFigures {
    /// Expected (message, receiver) pairs.
    pub expected: usize,
    /// Of those, seen by the receiver.
    pub delivered: usize,
    /// delivered / expected.
    pub ratio: f64,
    /// Pairs excluded because the receiver was not ready throughout.
    pub excluded_receiver_down: usize,
    /// The first missing pairs.
    pub missing: Vec<Missing>,
    /// Events that repeated a message at the same node (the app saw it twice).
    pub app_duplicates: u64,
    /// Events the launcher's streams skipped (it fell behind).
    pub stream_lagged: u64,
}

/// Gossip duplicate figures (from metrics).
#[derive(Debug, Clone, Serialize)]
pub struct DuplicateFigures {
    /// Duplicates per unique message, per node.
    pub per_message_per_node: Option<Spread>,
    /// The same over all nodes together.
    pub overall: Option<f64>,
}

/// Wire overhead (from metrics).
#[derive(Debug, Clone, Serialize)]
pub struct WireFigures {
    /// Transport bytes sent by all nodes in the window.
    pub bytes_out: Option<f64>,
    /// Text bytes delivered (size × delivered pairs).
    pub useful_bytes: u64,
    /// bytes_out / useful_bytes.
    pub bytes_per_useful_byte: Option<f64>,
}

/// One node's figures.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFigures {
    /// Index.
    pub index: usize,
    /// PeerId.
    pub peer_id: String,
    /// Pid.
    pub pid: Option<u32>,
    /// Expected pairs with this node as receiver.
    pub expected: usize,
    /// Of those, delivered.
    pub delivered: usize,
    /// CPU seconds used in the window.
    pub cpu_secs: Option<f64>,
    /// Peak RSS (MiB) at the end.
    pub peak_rss_mib: Option<f64>,
    /// Gossip duplicates per unique message.
    pub duplicates_per_message: Option<f64>,
    /// Transport bytes sent in the window.
    pub bytes_out: Option<f64>,
    /// Metrics deltas, if scraped.
    pub metrics: Option<Figures>,
}

/// Where all nodes' CPU went in the window, per delivered message.
#[derive(Debug, Clone, Serialize)]
pub struct CpuFigures {
    /// All nodes' CPU seconds in the window (`/proc/<pid>/stat`).
    pub total_secs: f64,
    /// That over the delivered (message, receiver) pairs, in µs.
    pub per_delivered_us: Option<f64>,
    /// The split by part, from the nodes' threads and the engine's own counters; shares
    /// are of the threads' time (threads that ended in the window are left out of it).
    pub parts: Vec<CpuShare>,
}

/// One part of the nodes' CPU.
#[derive(Debug, Clone, Serialize)]
pub struct CpuShare {
    /// `mls` (the group engine: openmls and Kith's group rules), `store` (redb),
    /// `engine` (the rest of the engine thread), `gossip` (the network thread: swarm,
    /// connections, gossipsub, DHT), `api` (the async runtime: API, event streams, timers).
    pub part: &'static str,
    /// CPU seconds, all nodes together.
    pub secs: f64,
    /// Fraction of the threads' total.
    pub share: f64,
    /// `share` × the CPU per delivered message, in µs.
    pub per_delivered_us: Option<f64>,
}

/// Spreads across nodes.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSummary {
    /// CPU seconds.
    pub cpu_secs: Option<Spread>,
    /// Peak RSS in MiB.
    pub peak_rss_mib: Option<Spread>,
    /// Bytes sent.
    pub bytes_out: Option<Spread>,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Traffic seed (rerun with `--seed` to repeat the choice of senders and texts).
    pub seed: u64,
    /// Nodes in the testnet.
    pub nodes: usize,
    /// Group members taking part.
    pub members: usize,
    /// Messages per second asked for.
    pub rate_per_sec: f64,
    /// Bytes per message.
    pub size_bytes: usize,
    /// Measured traffic duration (s).
    pub duration_secs: f64,
    /// Warm-up before it (s).
    pub warmup_secs: f64,
    /// Drain timeout (s).
    pub drain_timeout_secs: f64,
    /// Time from the first measured send to the end of the drain (s): the CPU window.
    pub window_secs: f64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Clock ticks per second used for CPU time.
    pub clock_ticks_per_sec: u64,
    /// Message counts.
    pub messages: MessageCounts,
    /// Delivery.
    pub delivery: DeliveryFigures,
    /// Latency percentiles (ms), if anything was delivered.
    pub latency_ms: Option<Percentiles>,
    /// Gossip duplicates.
    pub duplicates: DuplicateFigures,
    /// Wire overhead.
    pub wire: WireFigures,
    /// Per node.
    pub per_node: Vec<NodeFigures>,
    /// Across nodes.
    pub summary: NodeSummary,
    /// CPU per delivered message and its parts.
    pub cpu: CpuFigures,
    /// The hostile peers and what became of them, if any ran.
    pub attack: Option<AttackReport>,
    /// Remarks (e.g. why a figure is n/a).
    pub notes: Vec<String>,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// The hostile peers of a bench and what the nodes did about them.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// The attacks, in the order of `attackers`.
    pub kinds: Vec<AttackKind>,
    /// What each attacker did and saw (empty entries for one that failed to start).
    pub attackers: Vec<AttackStats>,
    /// Seconds from the attackers' start to the first node graylisting a peer.
    pub first_graylisted_after_secs: Option<f64>,
    /// Most (node, graylisted peer) pairs seen at once (scraped every second).
    pub graylisted_max: f64,
    /// Faults the nodes counted in the measured window, summed over nodes
    /// (`kith_peer_faults_total` by fault).
    pub faults: std::collections::BTreeMap<String, f64>,
}

impl BenchOptions {
    fn validate(&self) -> Result<()> {
        TrafficSpec {
            rate: self.rate,
            duration: self.duration,
            size: self.size,
            senders: None,
        }
        .validate()
        .map_err(|e| TestnetError::Invalid(format!("--rate/--duration/--size: {e}")))?;
        if self.warmup > Duration::from_secs(3600) || self.drain > Duration::from_secs(3600) {
            return Err(TestnetError::Invalid(
                "--warmup and --drain must be at most 3600 s".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Runs a bench: starts (or attaches to) a testnet, measures, stops what it started.
pub async fn bench(opts: BenchOptions) -> Result<BenchReport> {
    opts.validate()?;
    let mut tn = match &opts.attach {
        Some(dir) => Testnet::attach(dir, opts.up.quiet).await?,
        None => {
            let mut up = opts.up.clone();
            up.metrics = true;
            Testnet::up(up).await?
        }
    };
    let result = measure(&mut tn, &opts).await;
    let summary = tn.shutdown().await;
    if tn.owns_nodes() {
        tn.progress.line(&format!(
            "stopped {} nodes ({} needed SIGKILL){}",
            summary.stopped.len() + summary.killed.len(),
            summary.killed.len(),
            if summary.left_running.is_empty() {
                String::new()
            } else {
                format!("; STILL RUNNING: {:?}", summary.left_running)
            }
        ));
    }
    result
}

struct Snapshot {
    metrics: Vec<Option<Figures>>,
    procs: Vec<Option<ProcStats>>,
    threads: Vec<Option<ThreadCpu>>,
}

async fn snapshot(tn: &Testnet, notes: &mut Vec<String>) -> Snapshot {
    let mut metrics = Vec::new();
    let mut procs_ = Vec::new();
    let mut threads = Vec::new();
    for n in &tn.nodes {
        metrics.push(match tn.scrape(n.index).await {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                notes.push(format!("node {}: metrics: {e}", n.index));
                None
            }
            None => None,
        });
        procs_.push(n.pid.and_then(procs::proc_stats));
        threads.push(n.pid.and_then(procs::thread_cpu));
    }
    Snapshot {
        metrics,
        procs: procs_,
        threads,
    }
}

async fn measure(tn: &mut Testnet, opts: &BenchOptions) -> Result<BenchReport> {
    let members = tn.running_members();
    if members.len() < 2 {
        return Err(TestnetError::Invalid(format!(
            "a bench needs at least 2 running members (found {})",
            members.len()
        )));
    }
    let mut notes = Vec::new();
    if !tn.metrics {
        notes.push(
            "metrics n/a: the nodes do not serve metrics (duplicates and wire bytes are n/a)"
                .to_owned(),
        );
    }
    let spec = |d: Duration| TrafficSpec {
        rate: opts.rate,
        duration: d,
        size: opts.size,
        senders: None,
    };
    tn.progress.line(&format!(
        "bench: seed {}, {} members, {} msg/s of {} bytes for {:.1} s (warm-up {:.1} s)",
        opts.seed,
        members.len(),
        opts.rate,
        opts.size,
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64()
    ));
    let (stop_attack, attackers, attack_started) = start_attackers(tn, opts)?;
    if !opts.warmup.is_zero() && spec(opts.warmup).count() > 0 {
        traffic::run(
            tn.shared.clone(),
            spec(opts.warmup),
            opts.seed ^ 0x5741_524d,
        )
        .await;
    }
    let before = snapshot(tn, &mut notes).await;
    let window_start = now_ms();
    let skipped_before = tn.shared.lock().ledger.skipped;
    let mut graylist = GraylistWatch::default();
    let measured = {
        let traffic = traffic::run(tn.shared.clone(), spec(opts.duration), opts.seed);
        tokio::pin!(traffic);
        loop {
            tokio::select! {
                m = &mut traffic => break m,
                _ = tokio::time::sleep(Duration::from_secs(1)), if !attackers.is_empty() => {
                    graylist.poll(tn, attack_started).await;
                }
            }
        }
    };
    let traffic_end = now_ms();
    tn.progress.line(&format!(
        "traffic done: {} sent, draining up to {:.0} s",
        measured.attempted,
        opts.drain.as_secs_f64()
    ));
    let in_window =
        |m: &crate::ledger::Sent| m.send_start_ms >= window_start && m.send_start_ms <= traffic_end;
    let deadline = tokio::time::Instant::now() + opts.drain;
    let acc = loop {
        let acc = tn.shared.lock().ledger.account(in_window, None, now_ms());
        if acc.delivered == acc.expected || tokio::time::Instant::now() >= deadline {
            break acc;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !attackers.is_empty() {
        graylist.poll(tn, attack_started).await;
    }
    let window_end = now_ms();
    if acc.messages == 0 {
        return Err(TestnetError::Invalid(format!(
            "no message was sent in the measured window ({} scheduled, {} skipped, {} failed sends)",
            measured.scheduled,
            measured.skipped_no_sender + measured.skipped_in_flight,
            tn.shared.lock().ledger.failures.len()
        )));
    }
    let after = snapshot(tn, &mut notes).await;
    let attack = stop_attackers(
        opts,
        stop_attack,
        attackers,
        graylist,
        &before,
        &after,
        &mut notes,
    )
    .await;
    let mut report = build_report(
        tn,
        opts,
        &members,
        &measured,
        &acc,
        &before,
        &after,
        skipped_before,
        window_start,
        window_end,
        notes,
    );
    report.attack = attack;
    write_outputs(tn, opts, report, &acc)
}

type Attackers = Vec<tokio::task::JoinHandle<crate::error::Result<AttackStats>>>;

/// Starts one attacker per `opts.attacks`, dialling every running node.
fn start_attackers(
    tn: &Testnet,
    opts: &BenchOptions,
) -> Result<(
    tokio::sync::watch::Sender<bool>,
    Attackers,
    std::time::Instant,
)> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let targets: Vec<libp2p::Multiaddr> = tn
        .nodes
        .iter()
        .filter_map(|n| n.bootstrap_addr.as_deref()?.parse().ok())
        .collect();
    if !opts.attacks.is_empty() && targets.is_empty() {
        return Err(TestnetError::Invalid(
            "--attack: no node address to dial".to_owned(),
        ));
    }
    let mut handles = Vec::new();
    for (i, kind) in opts.attacks.iter().enumerate() {
        tn.progress.line(&format!(
            "attacker {i}: {kind:?} against {} nodes",
            targets.len()
        ));
        let kind = *kind;
        let targets = targets.clone();
        let seed = opts.seed ^ (0xA77A_C000 + i as u64);
        let link = tn.used_link.clone();
        let stopped = stopped.clone();
        handles.push(tokio::spawn(async move {
            crate::attack::run(kind, targets, seed, link.as_deref(), stopped).await
        }));
    }
    Ok((stop, handles, std::time::Instant::now()))
}

/// When the nodes first graylisted a peer, and the most graylisted at once.
#[derive(Debug, Default)]
struct GraylistWatch {
    first_after_secs: Option<f64>,
    max: f64,
}

impl GraylistWatch {
    async fn poll(&mut self, tn: &Testnet, started: std::time::Instant) {
        let mut now = 0.0;
        for n in &tn.nodes {
            if let Some(Ok(f)) = tn.scrape(n.index).await {
                now += f.peers_graylisted.unwrap_or(0.0);
            }
        }
        if now > 0.0 && self.first_after_secs.is_none() {
            self.first_after_secs = Some(started.elapsed().as_secs_f64());
        }
        self.max = self.max.max(now);
    }
}

/// Stops the attackers and reports them with the nodes' fault counts of the window.
async fn stop_attackers(
    opts: &BenchOptions,
    stop: tokio::sync::watch::Sender<bool>,
    attackers: Attackers,
    graylist: GraylistWatch,
    before: &Snapshot,
    after: &Snapshot,
    notes: &mut Vec<String>,
) -> Option<AttackReport> {
    if attackers.is_empty() {
        return None;
    }
    let _ = stop.send(true);
    let mut stats = Vec::new();
    for (i, h) in attackers.into_iter().enumerate() {
        match h.await {
            Ok(Ok(s)) => stats.push(s),
            Ok(Err(e)) => {
                notes.push(format!("attacker {i}: {e}"));
                stats.push(AttackStats::default());
            }
            Err(e) => {
                notes.push(format!("attacker {i}: task failed: {e}"));
                stats.push(AttackStats::default());
            }
        }
    }
    let mut faults = std::collections::BTreeMap::new();
    for (b, a) in before.metrics.iter().zip(&after.metrics) {
        if let (Some(b), Some(a)) = (b, a) {
            for (k, v) in Figures::delta(b, a).peer_faults {
                *faults.entry(k).or_insert(0.0) += v;
            }
        }
    }
    Some(AttackReport {
        kinds: opts.attacks.clone(),
        attackers: stats,
        first_graylisted_after_secs: graylist.first_after_secs,
        graylisted_max: graylist.max,
        faults,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    tn: &Testnet,
    opts: &BenchOptions,
    members: &[usize],
    measured: &TrafficSummary,
    acc: &Accounting,
    before: &Snapshot,
    after: &Snapshot,
    skipped_before: u64,
    window_start: u64,
    window_end: u64,
    mut notes: Vec<String>,
) -> BenchReport {
    let st = tn.shared.lock();
    let in_window = |t: u64| t >= window_start && t <= window_end;
    let failed = st
        .ledger
        .failures
        .iter()
        .filter(|f| in_window(f.at_ms))
        .count();
    let lagged: u64 = st.ledger.nodes.iter().map(|n| n.lagged).sum();
    for (i, n) in st.ledger.nodes.iter().enumerate() {
        if !n.stream_lost_ms.is_empty() {
            notes.push(format!(
                "node {i}: its event stream ended while it was up; its deliveries after that were not counted"
            ));
        }
    }
    let mut per_node = Vec::new();
    let mut dup_total = (0.0, 0.0, false);
    let mut bytes_total = (0.0, false);
    for n in &tn.nodes {
        let i = n.index;
        let delta = match (&before.metrics.get(i), &after.metrics.get(i)) {
            (Some(Some(b)), Some(Some(a))) => Some(Figures::delta(b, a)),
            _ => None,
        };
        let dups = delta.as_ref().and_then(|d| {
            let (u, f) = (d.gossip_received_unfiltered?, d.gossip_received?);
            dup_total.0 += u - f;
            dup_total.1 += f;
            dup_total.2 = true;
            (f > 0.0).then(|| (u - f) / f)
        });
        let bytes_out = delta.as_ref().and_then(|d| d.bytes_out);
        if let Some(b) = bytes_out {
            bytes_total.0 += b;
            bytes_total.1 = true;
        }
        let cpu = match (before.procs.get(i), after.procs.get(i)) {
            (Some(Some(b)), Some(Some(a))) => Some(a.cpu_secs - b.cpu_secs),
            _ => None,
        };
        let (expected, delivered) = acc.per_receiver.get(i).copied().unwrap_or((0, 0));
        per_node.push(NodeFigures {
            index: i,
            peer_id: n.peer_id.clone(),
            pid: n.pid,
            expected,
            delivered,
            cpu_secs: cpu,
            peak_rss_mib: after
                .procs
                .get(i)
                .copied()
                .flatten()
                .map(|p| p.peak_rss_kib as f64 / 1024.0),
            duplicates_per_message: dups,
            bytes_out,
            metrics: delta,
        });
    }
    if tn.metrics && !dup_total.2 {
        notes.push("duplicates n/a: no gossipsub receive counters in the metrics".to_owned());
    }
    if tn.metrics && !bytes_total.1 {
        notes.push("wire bytes n/a: no bandwidth counters in the metrics".to_owned());
    }
    let useful_bytes = (opts.size as u64) * acc.delivered as u64;
    let collect = |f: &dyn Fn(&NodeFigures) -> Option<f64>| -> Vec<f64> {
        per_node.iter().filter_map(f).collect()
    };
    let bytes_out = bytes_total.1.then_some(bytes_total.0);
    let cpu = cpu_figures(before, after, &per_node, acc.delivered);
    BenchReport {
        seed: opts.seed,
        nodes: tn.nodes.len(),
        members: members.len(),
        rate_per_sec: opts.rate,
        size_bytes: opts.size,
        duration_secs: opts.duration.as_secs_f64(),
        warmup_secs: opts.warmup.as_secs_f64(),
        drain_timeout_secs: opts.drain.as_secs_f64(),
        window_secs: (window_end.saturating_sub(window_start)) as f64 / 1000.0,
        run_dir: tn.dir.clone(),
        clock_ticks_per_sec: procs::clock_ticks_per_second(),
        messages: MessageCounts {
            scheduled: measured.scheduled,
            sent: acc.messages,
            failed,
            skipped: st.ledger.skipped.saturating_sub(skipped_before),
            max_schedule_lag_ms: measured.max_schedule_lag_ms,
        },
        delivery: DeliveryFigures {
            expected: acc.expected,
            delivered: acc.delivered,
            ratio: acc.ratio(),
            excluded_receiver_down: acc.excluded_receiver_down,
            missing: acc.missing.clone(),
            app_duplicates: st.ledger.duplicate_events,
            stream_lagged: lagged,
        },
        latency_ms: percentiles(&acc.latencies_ms),
        duplicates: DuplicateFigures {
            per_message_per_node: spread(&collect(&|n| n.duplicates_per_message)),
            overall: (dup_total.2 && dup_total.1 > 0.0).then(|| dup_total.0 / dup_total.1),
        },
        wire: WireFigures {
            bytes_out,
            useful_bytes,
            bytes_per_useful_byte: bytes_out
                .filter(|_| useful_bytes > 0)
                .map(|b| b / useful_bytes as f64),
        },
        summary: NodeSummary {
            cpu_secs: spread(&collect(&|n| n.cpu_secs)),
            peak_rss_mib: spread(&collect(&|n| n.peak_rss_mib)),
            bytes_out: spread(&collect(&|n| n.bytes_out)),
        },
        cpu,
        per_node,
        attack: None,
        notes,
        files: Vec::new(),
    }
}

/// All nodes' CPU in the window over the deliveries, and its split by part.
fn cpu_figures(
    before: &Snapshot,
    after: &Snapshot,
    per_node: &[NodeFigures],
    delivered: usize,
) -> CpuFigures {
    let total_secs: f64 = per_node.iter().filter_map(|n| n.cpu_secs).sum();
    let per_delivered_us = (delivered > 0).then(|| total_secs / delivered as f64 * 1e6);
    // [mls, store, engine, gossip, api]
    let mut secs = [0.0f64; 5];
    for (i, n) in per_node.iter().enumerate() {
        let (Some(Some(b)), Some(Some(a))) = (before.threads.get(i), after.threads.get(i)) else {
            continue;
        };
        let engine = (a.engine_secs - b.engine_secs).max(0.0);
        let (mls, store) = n.metrics.as_ref().map_or((0.0, 0.0), |m| {
            (m.cpu_mls.unwrap_or(0.0), m.cpu_store.unwrap_or(0.0))
        });
        let mls = mls.clamp(0.0, engine);
        let store = store.clamp(0.0, engine - mls);
        secs[0] += mls;
        secs[1] += store;
        secs[2] += engine - mls - store;
        secs[3] += (a.net_secs - b.net_secs).max(0.0);
        secs[4] += (a.other_secs - b.other_secs).max(0.0);
    }
    let threads: f64 = secs.iter().sum();
    let parts = ["mls", "store", "engine", "gossip", "api"]
        .into_iter()
        .zip(secs)
        .filter(|_| threads > 0.0)
        .map(|(part, s)| {
            let share = s / threads;
            CpuShare {
                part,
                secs: s,
                share,
                per_delivered_us: per_delivered_us.map(|u| u * share),
            }
        })
        .collect();
    CpuFigures {
        total_secs,
        per_delivered_us,
        parts,
    }
}

fn write_outputs(
    tn: &Testnet,
    opts: &BenchOptions,
    mut report: BenchReport,
    acc: &Accounting,
) -> Result<BenchReport> {
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| crate::launcher::fresh_dir(&tn.dir, "bench-"));
    std::fs::create_dir_all(&out)
        .map_err(|e| TestnetError::io(format!("creating {}", out.display()), e))?;
    let svg_path = out.join("latency.svg");
    let json_path = out.join("report.json");
    let title = format!(
        "{} nodes, {} msg/s, {} B",
        report.members, report.rate_per_sec, report.size_bytes
    );
    std::fs::write(
        &svg_path,
        crate::svg::latency_svg(&acc.latencies_ms, &title),
    )
    .map_err(|e| TestnetError::io(format!("writing {}", svg_path.display()), e))?;
    report.files = vec![json_path.clone(), svg_path];
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TestnetError::Invalid(format!("cannot encode the report: {e}")))?;
    std::fs::write(&json_path, json + "\n")
        .map_err(|e| TestnetError::io(format!("writing {}", json_path.display()), e))?;
    Ok(report)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

fn spread_text(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(
        || "n/a".to_owned(),
        |s| {
            format!(
                "{:.d$} / {:.d$} / {:.d$}",
                s.min,
                s.median,
                s.max,
                d = digits
            )
        },
    )
}

/// The report as a human-readable table.
pub fn render(r: &BenchReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(&format!("{k:<34} {v}\n"));
    };
    if let Some(a) = &r.attack {
        for (k, s) in a.kinds.iter().zip(&a.attackers) {
            line(
                "attacker",
                format!(
                    "{k:?}: published {} (refused {}), received {} frames ({} B) on {} topics, {} connections closed",
                    s.published,
                    s.publish_refused,
                    s.received,
                    s.received_bytes,
                    s.topics,
                    s.connections_closed
                ),
            );
            if s.join_requests > 0 {
                let answers: Vec<String> = s
                    .join_answers
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                line(
                    "  join requests",
                    format!(
                        "{} sent: {}; {} unanswered",
                        s.join_requests,
                        answers.join(", "),
                        s.join_failures
                    ),
                );
            }
        }
        line(
            "graylisted by the nodes",
            match a.first_graylisted_after_secs {
                Some(t) => format!(
                    "first after {t:.0} s, at most {} (node, peer) pairs at once",
                    a.graylisted_max
                ),
                None => "never".to_owned(),
            },
        );
        let faults: Vec<String> = a
            .faults
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(
            "peer faults counted (all nodes)",
            if faults.is_empty() {
                "none".to_owned()
            } else {
                faults.join(", ")
            },
        );
    }
    line("seed", r.seed.to_string());
    line(
        "testnet",
        format!("{} nodes, {} members", r.nodes, r.members),
    );
    line(
        "traffic",
        format!(
            "{} msg/s × {:.1} s, {} B each (warm-up {:.1} s)",
            r.rate_per_sec, r.duration_secs, r.size_bytes, r.warmup_secs
        ),
    );
    line(
        "messages sent / failed / skipped",
        format!(
            "{} / {} / {} (scheduled {}, max lag {} ms)",
            r.messages.sent,
            r.messages.failed,
            r.messages.skipped,
            r.messages.scheduled,
            r.messages.max_schedule_lag_ms
        ),
    );
    line(
        "deliveries expected",
        format!("{} (messages × (members − 1))", r.delivery.expected),
    );
    line(
        "delivered",
        format!(
            "{} ({:.2} %)",
            r.delivery.delivered,
            r.delivery.ratio * 100.0
        ),
    );
    match &r.latency_ms {
        Some(p) => line(
            "latency p50 / p90 / p99 / max",
            format!(
                "{} / {} / {} / {} ms (mean {:.1})",
                p.p50, p.p90, p.p99, p.max, p.mean
            ),
        ),
        None => line("latency", "n/a (nothing delivered)".to_owned()),
    }
    line(
        "gossip duplicates per msg per node",
        match r.duplicates.per_message_per_node {
            Some(s) => format!(
                "{} (min / median / max), overall {}",
                spread_text(Some(s), 2),
                opt(r.duplicates.overall, 2)
            ),
            None => "n/a".to_owned(),
        },
    );
    line(
        "wire bytes per useful byte",
        match (r.wire.bytes_per_useful_byte, r.wire.bytes_out) {
            (Some(ratio), Some(out)) => format!(
                "{ratio:.1} ({out:.0} B sent on the wire, {} B of text delivered)",
                r.wire.useful_bytes
            ),
            _ => "n/a".to_owned(),
        },
    );
    line(
        "CPU s per node (min / med / max)",
        format!(
            "{} over {:.1} s (clock ticks/s: {})",
            spread_text(r.summary.cpu_secs, 2),
            r.window_secs,
            r.clock_ticks_per_sec
        ),
    );
    line(
        "CPU per delivered message",
        match r.cpu.per_delivered_us {
            Some(us) => format!(
                "{us:.0} µs ({:.2} CPU s of all nodes / {} deliveries)",
                r.cpu.total_secs, r.delivery.delivered
            ),
            None => "n/a (nothing delivered)".to_owned(),
        },
    );
    if !r.cpu.parts.is_empty() {
        let parts: Vec<String> = r
            .cpu
            .parts
            .iter()
            .map(|p| {
                format!(
                    "{} {:.0} % ({} µs)",
                    p.part,
                    p.share * 100.0,
                    opt(p.per_delivered_us, 0)
                )
            })
            .collect();
        line("  of which", parts.join(", "));
    }
    line(
        "peak RSS MiB (min / med / max)",
        spread_text(r.summary.peak_rss_mib, 1),
    );
    out.push('\n');
    out.push_str(&format!(
        "{:>4}  {:<8}  {:>9}  {:>8}  {:>7}  {:>8}  {:>10}\n",
        "NODE", "PEER", "DELIVERED", "CPU s", "RSS MiB", "DUP/MSG", "BYTES OUT"
    ));
    for n in &r.per_node {
        out.push_str(&format!(
            "{:>4}  {:<8}  {:>9}  {:>8}  {:>7}  {:>8}  {:>10}\n",
            n.index,
            kith_client::text::short_peer(&n.peer_id),
            format!("{}/{}", n.delivered, n.expected),
            opt(n.cpu_secs, 2),
            opt(n.peak_rss_mib, 1),
            opt(n.duplicates_per_message, 2),
            opt(n.bytes_out, 0)
        ));
    }
    for note in &r.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    if r.delivery.delivered < r.delivery.expected {
        let acc = Accounting {
            expected: r.delivery.expected,
            delivered: r.delivery.delivered,
            missing: r.delivery.missing.clone(),
            ..Accounting::default()
        };
        out.push_str(&format!("{}\n", acc.describe_missing()));
    }
    for f in &r.files {
        out.push_str(&format!("wrote {}\n", f.display()));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(i: usize, cpu: f64, mls: f64, store: f64) -> NodeFigures {
        NodeFigures {
            index: i,
            peer_id: String::new(),
            pid: None,
            expected: 0,
            delivered: 0,
            cpu_secs: Some(cpu),
            peak_rss_mib: None,
            duplicates_per_message: None,
            bytes_out: None,
            metrics: Some(Figures {
                cpu_mls: Some(mls),
                cpu_store: Some(store),
                ..Figures::default()
            }),
        }
    }

    fn threads(engine: f64, net: f64, other: f64) -> Option<ThreadCpu> {
        Some(ThreadCpu {
            engine_secs: engine,
            net_secs: net,
            other_secs: other,
        })
    }

    #[test]
    fn the_cpu_per_delivery_is_split_by_part() {
        let before = Snapshot {
            metrics: vec![None, None],
            procs: vec![None, None],
            threads: vec![threads(1.0, 1.0, 1.0), threads(0.0, 0.0, 0.0)],
        };
        let after = Snapshot {
            metrics: vec![None, None],
            procs: vec![None, None],
            threads: vec![threads(2.0, 3.0, 1.5), threads(1.0, 1.0, 0.5)],
        };
        // Node 0: engine 1.0 s (mls 0.5, store 0.25), net 2.0, other 0.5; node 1: engine
        // 1.0 s of which the counters claim more than the thread used (clamped), net 1.0,
        // other 0.5. 8 CPU s over 1000 deliveries: 8000 µs each.
        let per_node = [node(0, 4.0, 0.5, 0.25), node(1, 4.0, 0.75, 0.5)];
        let cpu = cpu_figures(&before, &after, &per_node, 1000);
        assert_eq!(cpu.total_secs, 8.0);
        assert_eq!(cpu.per_delivered_us, Some(8000.0));
        let get = |p: &str| cpu.parts.iter().find(|x| x.part == p).unwrap();
        assert!((get("mls").secs - 1.25).abs() < 1e-9);
        assert!((get("store").secs - 0.5).abs() < 1e-9);
        assert!((get("engine").secs - 0.25).abs() < 1e-9);
        assert!((get("gossip").secs - 3.0).abs() < 1e-9);
        assert!((get("api").secs - 1.0).abs() < 1e-9);
        let shares: f64 = cpu.parts.iter().map(|p| p.share).sum();
        assert!((shares - 1.0).abs() < 1e-9);
        assert!((get("gossip").per_delivered_us.unwrap() - 4000.0).abs() < 1e-6);
        let none = cpu_figures(&before, &after, &per_node, 0);
        assert_eq!(none.per_delivered_us, None);
    }
}
