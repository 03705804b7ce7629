//! `kith-testnet crash-loop`: kills real `kith` processes again and again while every
//! member sends, and checks that no message is lost.
//!
//! The run starts a testnet (one group, every node a member), then loops until `kills`
//! kills are done. Every node that is up sends seeded traffic through its API (each node is
//! sender and receiver). Each node lives a seeded random time and is then killed with
//! SIGKILL from outside, unless it was started with a crash point armed
//! (`KITH_CRASH_AT=POINT:N`, see `kith_client::crashpoint`: inside ingest, sync, commit, send
//! or flush), in which case it usually aborts there by itself first. A dead node stays down
//! a seeded random time (the others keep sending, so it misses messages) and is started
//! again, with or without a crash point. At most all but one node are down at once.
//! The seed decides victims, times, points and counts; process timing still varies, so a
//! replay follows the same plan but not exactly the same interleaving.
//!
//! The kills are grouped in rounds. At the end of a round traffic pauses, nodes still armed
//! are killed, every dead node is started without a crash point, and the run waits until
//! the members converge: same epoch, and each lists every message acknowledged in the round
//! and the same tracked messages of the round in the same order. The time from the last
//! restart to that moment is the round's **time to converge**.
//!
//! At the end every node is stopped (SIGTERM) and its whole history is read from its
//! database, and the run counts:
//! - **acked-lost**: a send the API acknowledged that some member does not hold;
//! - **shown-then-lost**: a message a node emitted on its event stream that is missing
//!   from that node's history;
//! - **unacked-partial**: a send that got no acknowledgement (its sender died) and that
//!   some members hold and others do not (it must be everywhere or nowhere);
//! - whether every member lists the same text messages in the same order.
//!
//! The run passes when all of these are zero/equal, every round converged, no node died
//! without being killed (a panic) and every restart worked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kith_client::crashpoint::{self, Point};
use kith_client::model::{MessageBody, MessageInfo, NodeEvent};
use kith_client::{Client, LiveEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Result, TestnetError};
use crate::launcher::{API_TIMEOUT, MAX_HISTORY, Testnet, UpOptions, within};
use crate::procs::{self, Sig};
use crate::stats::{Percentiles, percentiles};
use crate::traffic::{self, traffic_text};

/// Most sends in one round: the convergence check reads the newest [`MAX_HISTORY`]
/// entries of each node, so a round must stay well below that.
pub const ROUND_MAX_SENDS: usize = 600;
/// Most sends waiting for an answer at once; beyond that a scheduled send is skipped.
const MAX_IN_FLIGHT: usize = 256;
/// How often the loop looks at its nodes.
const TICK: Duration = Duration::from_millis(20);
/// Shortest life of a node before it is killed.
const MIN_UP: Duration = Duration::from_millis(100);
/// Chance that a restarted node gets a crash point.
const ARM_CHANCE: f64 = 0.5;
/// Restarts in a row that may fail before the run gives up.
const MAX_RESTART_FAILURES: u32 = 5;
/// The line a node prints when a crash point aborts it (see `kith_client::crashpoint`).
const CRASH_LINE: &str = "kith: crash point ";
/// How many examples of each loss the report lists.
const MAX_EXAMPLES: usize = 20;

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct CrashLoopOptions {
    /// The testnet (nodes, run directory, binary, logs).
    pub up: UpOptions,
    /// Kills to do (signals and crash points together).
    pub kills: usize,
    /// The seed of the plan and the traffic.
    pub seed: u64,
    /// Messages per second, all senders together.
    pub rate: f64,
    /// Bytes per message.
    pub size: usize,
    /// Kills per round (each round ends with a convergence check).
    pub round_kills: usize,
    /// Longest life of a node before it is killed from outside (a node with a crash point
    /// gets three times this to reach it).
    pub max_up: Duration,
    /// Longest time a killed node stays down.
    pub max_down: Duration,
    /// How long the members may take to converge after a round.
    pub converge_timeout: Duration,
    /// A random member commits a self-update this often while every node is up and the
    /// members agree on the epoch (so commits happen, and the `commit` point is reached);
    /// `None`: never.
    pub update_every: Option<Duration>,
    /// Where to write the JSON report [default: RUN_DIR/crash-report.json].
    pub out: Option<PathBuf>,
}

impl Default for CrashLoopOptions {
    fn default() -> Self {
        CrashLoopOptions {
            up: UpOptions {
                nodes: 2,
                ..UpOptions::default()
            },
            kills: 100,
            seed: 0,
            rate: 20.0,
            size: 64,
            round_kills: 10,
            max_up: Duration::from_secs(3),
            max_down: Duration::from_secs(5),
            converge_timeout: Duration::from_secs(60),
            update_every: Some(Duration::from_secs(10)),
            out: None,
        }
    }
}

impl CrashLoopOptions {
    /// Checks the ranges before anything starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TestnetError::Invalid(m.to_owned()));
        if self.up.nodes < 2 {
            return bad("--nodes must be at least 2 (one member must stay up)");
        }
        if !(1..=1_000_000).contains(&self.kills) {
            return bad("--kills must be 1 to 1000000");
        }
        if !(self.rate > 0.0 && self.rate <= 1000.0) {
            return bad("--rate must be more than 0 and at most 1000 messages/s");
        }
        if !(traffic::MIN_SIZE..=traffic::MAX_SIZE).contains(&self.size) {
            return bad("--size must be 16 to 65536 bytes");
        }
        if self.round_kills == 0 {
            return bad("--round-kills must be at least 1");
        }
        if self.max_up < MIN_UP {
            return bad("--max-up must be at least 100 ms");
        }
        if self.converge_timeout.is_zero() {
            return bad("--converge-timeout must be more than 0");
        }
        Ok(())
    }

    /// The `kith-testnet` command line that runs this plan again.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "kith-testnet crash-loop --kills {} --nodes {} --seed {} --rate {} --size {} --round-kills {} --max-up-ms {} --max-down-ms {} --converge-timeout {} --update-every {}",
            self.kills,
            self.up.nodes,
            self.seed,
            self.rate,
            self.size,
            self.round_kills,
            self.max_up.as_millis(),
            self.max_down.as_millis(),
            self.converge_timeout.as_secs_f64(),
            self.update_every.map_or(0.0, |d| d.as_secs_f64()),
        );
        if let Some(k) = &self.up.kith {
            cmd.push_str(&format!(" --kith {}", k.display()));
        }
        cmd
    }
}

/// How a node went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KillHow {
    /// SIGKILL from the harness.
    Signal,
    /// It aborted at its armed crash point.
    Point,
    /// It died although nobody killed it and no crash point was armed (a bug).
    Unexpected,
}

/// One kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillRecord {
    /// 1-based number.
    pub n: usize,
    /// The node.
    pub node: usize,
    /// Seconds since the loop began.
    pub at_secs: f64,
    /// How.
    pub how: KillHow,
    /// The crash point it was started with, as `POINT:N`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub armed: Option<String>,
    /// Whether it died while starting (before its API answered).
    pub during_start: bool,
    /// How long it had been up, in milliseconds.
    pub uptime_ms: u64,
    /// For an unexpected death: the last line of its log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_log_line: Option<String>,
}

/// One round's convergence.
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    /// 1-based number.
    pub round: usize,
    /// Kills in the round.
    pub kills: usize,
    /// Sends acknowledged in the round.
    pub acked: usize,
    /// Sends that got no acknowledgement.
    pub unacked: usize,
    /// Seconds from the last restart until the members converged; `None`: they did not
    /// within the limit.
    pub converge_secs: Option<f64>,
    /// What was still wrong when the limit passed (empty when converged).
    pub detail: String,
}

/// A message missing somewhere.
#[derive(Debug, Clone, Serialize)]
pub struct LostMessage {
    /// Harness sequence number (in the text, `kt<seq> n<sender>`), if an acknowledged send.
    pub seq: Option<u64>,
    /// The node that sent it, if an acknowledged send.
    pub sender: Option<usize>,
    /// Message id.
    pub id: String,
    /// Nodes that lack it.
    pub missing_on: Vec<usize>,
}

/// `crash-report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CrashLoopReport {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Kills asked for.
    pub kills_planned: usize,
    /// Kills done (rounds end with extra SIGKILLs of nodes still armed).
    pub kills: usize,
    /// Kills by SIGKILL.
    pub kills_by_signal: usize,
    /// Aborts at crash points, by point.
    pub kills_by_point: BTreeMap<String, usize>,
    /// Nodes that died without being killed or armed (must be 0).
    pub unexpected_exits: usize,
    /// Restarts that failed (must be 0).
    pub restart_failures: usize,
    /// Self-updates committed by the harness.
    pub self_updates: usize,
    /// Sends acknowledged by the API.
    pub acked: usize,
    /// Sends that got no acknowledgement (the sender died or was down).
    pub unacked: usize,
    /// Why sends got no acknowledgement, counted by class.
    pub unacked_reasons: BTreeMap<String, usize>,
    /// Unacknowledged sends that every member holds.
    pub unacked_everywhere: usize,
    /// Unacknowledged sends that no member holds.
    pub unacked_nowhere: usize,
    /// Unacknowledged sends that some members hold and others not (must be 0).
    pub unacked_partial: usize,
    /// Acknowledged sends that some member does not hold (must be 0).
    pub acked_lost: usize,
    /// Messages shown on a node's event stream and missing from its history at the end,
    /// counted per (message, node) (must be 0).
    pub shown_then_lost: usize,
    /// (message, node) pairs whose id is missing but whose text the node holds under
    /// another id: re-sent after a fork, so not counted as lost.
    pub resent_under_new_id: usize,
    /// Message events recorded on the streams.
    pub shown_events: usize,
    /// Events the streams skipped (the harness fell behind): not checked.
    pub lagged_events: u64,
    /// Whether every member lists the same text messages in the same order.
    pub histories_equal: bool,
    /// Where the histories first differ, if they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_difference: Option<String>,
    /// Entries in each node's history at the end.
    pub history_entries: Vec<usize>,
    /// Per round.
    pub rounds: Vec<RoundResult>,
    /// Rounds that did not converge within the limit (must be 0).
    pub rounds_not_converged: usize,
    /// Time to converge over the rounds that did, in milliseconds.
    pub converge_ms: Option<Percentiles>,
    /// The first acknowledged sends lost.
    pub acked_lost_examples: Vec<LostMessage>,
    /// The first (message, node) pairs shown and then lost.
    pub shown_then_lost_examples: Vec<LostMessage>,
    /// Every kill.
    pub kill_log: Vec<KillRecord>,
    /// Wall time of the whole run, in seconds.
    pub secs: f64,
    /// Whether every check held.
    pub passed: bool,
    /// Why not, as one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The command that runs this plan again.
    pub replay: String,
}

/// An acknowledged send.
#[derive(Debug, Clone)]
struct Acked {
    seq: u64,
    sender: usize,
    id: String,
}

/// What the traffic and the event streams recorded.
#[derive(Debug, Default)]
struct Book {
    /// Per node: its API client while it is up (traffic picks senders here).
    clients: Vec<Option<Client>>,
    acked: Vec<Acked>,
    /// Sequence numbers of sends that got no acknowledgement, with their sender.
    unacked: Vec<(u64, usize)>,
    /// Why sends got no acknowledgement, counted.
    unacked_why: BTreeMap<String, usize>,
    /// Per node: ids of messages its event stream showed.
    /// Per node: ids of messages its event stream showed, with the harness key of their
    /// text (`kt<seq> n<sender>`) when they are tracked sends.
    shown: Vec<HashMap<String, Option<(u64, usize)>>>,
    shown_events: usize,
    lagged: u64,
    next_seq: u64,
    in_flight: usize,
    paused: bool,
    stopped: bool,
}

#[derive(Debug, Clone, Default)]
struct SharedBook(Arc<Mutex<Book>>);

impl SharedBook {
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sequence number and sender of a tracked text (`kt<seq> n<sender> …`).
fn tracked(text: &str) -> Option<(u64, usize)> {
    let rest = text.strip_prefix("kt")?;
    let (seq, rest) = rest.split_once(' ')?;
    let sender = rest.strip_prefix('n')?.split(' ').next()?;
    Some((seq.parse().ok()?, sender.parse().ok()?))
}

/// A short class of why a send failed, for the report.
fn unacked_reason(e: &kith_client::ClientError) -> String {
    use kith_client::ClientError;
    match e {
        ClientError::NotRunning => "node not running (connection refused)".to_owned(),
        ClientError::Api { status, code, .. } => format!("API {status} {code}"),
        ClientError::Http(_) | ClientError::Protocol(_) | ClientError::StreamEnded => {
            "connection lost before the answer".to_owned()
        }
        other => other.to_string(),
    }
}

/// Sends at `rate` from a random up node until stopped; pauses while `paused`.
async fn traffic(book: SharedBook, group: String, rate: f64, size: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut due = Instant::now();
    loop {
        due += period;
        tokio::time::sleep_until(due).await;
        let now = Instant::now();
        if now > due + Duration::from_secs(1) {
            // Fell behind (a slow machine): carry on from now instead of bursting.
            due = now;
        }
        let pick = {
            let mut b = book.lock();
            if b.stopped {
                return;
            }
            let up: Vec<(usize, Client)> = b
                .clients
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.clone().map(|c| (i, c)))
                .collect();
            if b.paused || up.is_empty() || b.in_flight >= MAX_IN_FLIGHT {
                None
            } else {
                let (i, c) = up[rng.gen_range(0..up.len())].clone();
                b.next_seq += 1;
                b.in_flight += 1;
                Some((i, c, b.next_seq))
            }
        };
        let Some((sender, client, seq)) = pick else {
            continue;
        };
        let text = traffic_text(seq, sender, size, &mut rng);
        let book = book.clone();
        let group = group.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(API_TIMEOUT, client.send(&group, &text)).await;
            let mut b = book.lock();
            b.in_flight -= 1;
            match r {
                Ok(Ok(m)) => b.acked.push(Acked {
                    seq,
                    sender,
                    id: m.id,
                }),
                Ok(Err(e)) => {
                    b.unacked.push((seq, sender));
                    *b.unacked_why.entry(unacked_reason(&e)).or_default() += 1;
                }
                Err(_) => {
                    b.unacked.push((seq, sender));
                    *b.unacked_why
                        .entry("no answer in time".to_owned())
                        .or_default() += 1;
                }
            }
        });
    }
}

/// Records every message event of node `i`'s stream into the book.
fn record(book: SharedBook, i: usize, mut stream: kith_client::EventStream) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match stream.next().await {
                Ok(Some(LiveEvent::Event(NodeEvent::Message(m)))) => {
                    let key = text_of(&m).and_then(tracked);
                    let mut b = book.lock();
                    b.shown_events += 1;
                    b.shown[i].insert(m.id, key);
                }
                Ok(Some(LiveEvent::Event(_))) => {}
                Ok(Some(LiveEvent::Lagged(n))) => book.lock().lagged += n,
                Ok(None) | Err(_) => return,
            }
        }
    })
}

/// How many times node `dir`'s log says a crash point aborted it.
fn crash_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("node.log"))
        .map(|t| t.matches(CRASH_LINE).count())
        .unwrap_or(0)
}

fn last_log_line(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    kith_client::text::clean(&line.chars().take(300).collect::<String>())
}

/// A node as the loop sees it.
#[derive(Debug, Clone)]
enum Life {
    Up {
        armed: Option<(Point, u64)>,
        since: Instant,
        kill_at: Instant,
        crash_lines: usize,
    },
    Down {
        until: Instant,
    },
}

/// A seeded crash point for a node being started, or none.
fn pick_point(rng: &mut StdRng) -> Option<(Point, u64)> {
    if !rng.gen_bool(ARM_CHANCE) {
        return None;
    }
    // Counts sized to how often each point is passed within a few seconds of life.
    let (point, most) = match rng.gen_range(0..5) {
        0 => (Point::Ingest, 20),
        1 => (Point::Sync, 2),
        2 => (Point::Commit, 2),
        3 => (Point::Send, 15),
        _ => (Point::Flush, 4),
    };
    Some((point, rng.gen_range(1..=most)))
}

fn armed_text(armed: Option<(Point, u64)>) -> Option<String> {
    armed.map(|(p, n)| format!("{p}:{n}"))
}

struct Looper {
    opts: CrashLoopOptions,
    tn: Testnet,
    book: SharedBook,
    rng: StdRng,
    life: Vec<Life>,
    recorders: Vec<Option<JoinHandle<()>>>,
    group: String,
    t0: Instant,
    kills: Vec<KillRecord>,
    restart_failures: usize,
    failures_in_a_row: u32,
    self_updates: usize,
    next_update: Option<Instant>,
    rounds: Vec<RoundResult>,
}

impl Looper {
    fn up_count(&self) -> usize {
        self.life
            .iter()
            .filter(|l| matches!(l, Life::Up { .. }))
            .count()
    }

    fn down_for(&mut self) -> Duration {
        let ms = self.opts.max_down.as_millis() as u64;
        Duration::from_millis(self.rng.gen_range(0..=ms))
    }

    /// Takes node `i` out of the traffic and stops its recorder.
    fn detach(&mut self, i: usize) {
        self.book.lock().clients[i] = None;
        if let Some(r) = self.recorders[i].take() {
            r.abort();
        }
    }

    /// Node `i` went down (`how`); cleans up and schedules its restart.
    async fn went_down(&mut self, i: usize, how: KillHow, during_start: bool) -> Result<()> {
        self.detach(i);
        let (armed, since) = match &self.life[i] {
            Life::Up { armed, since, .. } => (*armed, *since),
            Life::Down { .. } => (None, Instant::now()),
        };
        if self.tn.nodes[i].is_running() {
            self.tn.stop_node(i, Sig::Kill).await?;
        }
        let last_log_line =
            (how == KillHow::Unexpected).then(|| last_log_line(&self.tn.nodes[i].dir));
        self.kills.push(KillRecord {
            n: self.kills.len() + 1,
            node: i,
            at_secs: self.t0.elapsed().as_secs_f64(),
            how,
            armed: armed_text(armed),
            during_start,
            uptime_ms: since.elapsed().as_millis() as u64,
            last_log_line,
        });
        let down = self.down_for();
        self.life[i] = Life::Down {
            until: Instant::now() + down,
        };
        Ok(())
    }

    /// Whether node `i`'s death since it started was its crash point.
    fn died_at_point(&self, i: usize, lines_before: usize) -> bool {
        crash_lines(&self.tn.nodes[i].dir) > lines_before
    }

    /// Starts node `i` (with `armed` as its crash point) and opens its event stream.
    async fn start(&mut self, i: usize, armed: Option<(Point, u64)>) -> Result<()> {
        let dir = self.tn.nodes[i].dir.clone();
        let before = crash_lines(&dir);
        self.tn.nodes[i].env = armed
            .map(|(p, n)| vec![(crashpoint::ENV.to_owned(), format!("{p}:{n}"))])
            .unwrap_or_default();
        let started = Instant::now();
        // Counted as up from now, so a death during the start is recorded with its point.
        self.life[i] = Life::Up {
            armed,
            since: started,
            kill_at: started,
            crash_lines: before,
        };
        let opened = match self.tn.start_node_api_only(i).await {
            Ok(()) => {
                let client = self.tn.nodes[i].client()?.clone();
                let group = self.group.clone();
                within(
                    API_TIMEOUT,
                    || format!("node {i} to open its event stream"),
                    async {
                        client
                            .events(Some(&group))
                            .await
                            .map_err(|e| TestnetError::api(i, "opening the event stream", e))
                    },
                )
                .await
                .map(|s| (client, s))
            }
            Err(e) => Err(e),
        };
        match opened {
            Ok((client, stream)) => {
                self.failures_in_a_row = 0;
                self.recorders[i] = Some(record(self.book.clone(), i, stream));
                self.book.lock().clients[i] = Some(client);
                // A node with a crash point lives until it reaches it, or at most three
                // times the longest life (then it is killed from outside).
                let life = if armed.is_some() {
                    self.opts.max_up.as_millis() as u64 * 3
                } else {
                    self.rng
                        .gen_range(MIN_UP.as_millis() as u64..=self.opts.max_up.as_millis() as u64)
                };
                self.life[i] = Life::Up {
                    armed,
                    since: started,
                    kill_at: Instant::now() + Duration::from_millis(life),
                    crash_lines: before,
                };
                Ok(())
            }
            Err(e) if self.died_at_point(i, before) => {
                self.tn.progress.line(&format!(
                    "node {i} aborted at its crash point while starting ({e})"
                ));
                self.went_down(i, KillHow::Point, true).await
            }
            Err(e) => {
                self.restart_failures += 1;
                self.failures_in_a_row += 1;
                self.tn
                    .progress
                    .line(&format!("node {i} failed to start: {e}"));
                if self.failures_in_a_row >= MAX_RESTART_FAILURES {
                    return Err(e);
                }
                self.detach(i);
                if self.tn.nodes[i].is_running() {
                    self.tn.stop_node(i, Sig::Kill).await?;
                }
                self.life[i] = Life::Down {
                    until: Instant::now() + Duration::from_secs(1),
                };
                Ok(())
            }
        }
    }

    /// One look at every node: records deaths and, when `planned`, does the kills and
    /// restarts that are due (not during a convergence check).
    async fn step(&mut self, planned: bool) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.life.len() {
            let Life::Up {
                kill_at,
                crash_lines,
                armed,
                ..
            } = self.life[i].clone()
            else {
                continue;
            };
            let alive = self.tn.nodes[i].pid.is_some_and(procs::is_alive);
            if !alive {
                let how = if armed.is_some() && self.died_at_point(i, crash_lines) {
                    KillHow::Point
                } else {
                    KillHow::Unexpected
                };
                if how == KillHow::Unexpected {
                    self.tn.progress.line(&format!(
                        "node {i} died by itself: {}",
                        last_log_line(&self.tn.nodes[i].dir)
                    ));
                }
                self.went_down(i, how, false).await?;
            } else if planned && now >= kill_at {
                if self.up_count() <= 1 {
                    // Keep one member up; try again a little later.
                    if let Life::Up { kill_at, .. } = &mut self.life[i] {
                        *kill_at = now + Duration::from_millis(500);
                    }
                    continue;
                }
                self.detach(i);
                self.tn.stop_node(i, Sig::Kill).await?;
                // It may have reached its point just before the signal.
                let how = if armed.is_some() && self.died_at_point(i, crash_lines) {
                    KillHow::Point
                } else {
                    KillHow::Signal
                };
                self.went_down(i, how, false).await?;
            }
        }
        if planned {
            for i in 0..self.life.len() {
                if let Life::Down { until } = self.life[i]
                    && Instant::now() >= until
                {
                    let armed = pick_point(&mut self.rng);
                    self.start(i, armed).await?;
                }
            }
        }
        Ok(())
    }

    /// A self-update by a random member when every node is up and they agree on the epoch.
    async fn maybe_update(&mut self) {
        let (Some(every), Some(next)) = (self.opts.update_every, self.next_update) else {
            return;
        };
        if Instant::now() < next || self.up_count() < self.life.len() {
            return;
        }
        self.next_update = Some(Instant::now() + every);
        let all: Vec<usize> = (0..self.life.len()).collect();
        let Ok(views) = self.tn.group_views(&all).await else {
            return;
        };
        if views.iter().any(|v| v.1 != views[0].1) {
            return;
        }
        let i = self.rng.gen_range(0..self.life.len());
        let Ok(client) = self.tn.nodes[i].client().cloned() else {
            return;
        };
        let group = self.group.clone();
        if let Ok(Ok(_)) = tokio::time::timeout(API_TIMEOUT, client.self_update(&group)).await {
            self.self_updates += 1;
        }
    }

    /// Ends a round: pauses traffic, kills nodes still armed, starts every dead node
    /// without a crash point and waits for convergence.
    async fn end_round(
        &mut self,
        kills_before: usize,
        first_seq: u64,
        acked_before: usize,
        unacked_before: usize,
    ) -> Result<()> {
        self.book.lock().paused = true;
        let drain = Instant::now() + API_TIMEOUT + Duration::from_secs(5);
        while self.book.lock().in_flight > 0 && Instant::now() < drain {
            tokio::time::sleep(TICK).await;
        }
        // Deaths that happened meanwhile are recorded first.
        self.step(false).await?;
        for i in 0..self.life.len() {
            if let Life::Up {
                armed: Some(_),
                crash_lines,
                ..
            } = self.life[i]
            {
                self.detach(i);
                self.tn.stop_node(i, Sig::Kill).await?;
                let how = if self.died_at_point(i, crash_lines) {
                    KillHow::Point
                } else {
                    KillHow::Signal
                };
                self.went_down(i, how, false).await?;
            }
        }
        let mut attempts = 0;
        while self.life.iter().any(|l| matches!(l, Life::Down { .. })) {
            for i in 0..self.life.len() {
                if matches!(self.life[i], Life::Down { .. }) {
                    self.start(i, None).await?;
                }
            }
            attempts += 1;
            if attempts > MAX_RESTART_FAILURES {
                return Err(TestnetError::Invalid(
                    "nodes could not be started again for the convergence check".to_owned(),
                ));
            }
            // A node that failed to start (or died) is retried after a pause.
            if self.life.iter().any(|l| matches!(l, Life::Down { .. })) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let restarted = Instant::now();
        let deadline = restarted + self.opts.converge_timeout;
        let mut detail;
        let converge_secs = loop {
            // A node must not die now: nothing is armed.
            self.step(false).await?;
            if self.life.iter().any(|l| matches!(l, Life::Down { .. })) {
                detail = "a node died during the convergence check".to_owned();
                break None;
            }
            match self.converged(first_seq).await {
                Ok(()) => {
                    detail = String::new();
                    break Some(restarted.elapsed().as_secs_f64());
                }
                Err(why) => detail = why,
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let (acked, unacked) = {
            let b = self.book.lock();
            (
                b.acked.len() - acked_before,
                b.unacked.len() - unacked_before,
            )
        };
        let round = self.rounds.len() + 1;
        let round_kills = self.kills.len() - kills_before;
        self.tn.progress.line(&match converge_secs {
            Some(s) => format!(
                "round {round}: {round_kills} kills, {acked} acked and {unacked} unacked sends; converged {s:.1} s after the last restart"
            ),
            None => format!(
                "round {round}: {round_kills} kills, {acked} acked and {unacked} unacked sends; NOT converged after {:.0} s: {detail}",
                self.opts.converge_timeout.as_secs_f64()
            ),
        });
        self.rounds.push(RoundResult {
            round,
            kills: round_kills,
            acked,
            unacked,
            converge_secs,
            detail,
        });
        self.book.lock().paused = false;
        Ok(())
    }

    /// Whether the members agree now on the round that began with `first_seq`: same epoch,
    /// every acked send of the round on every node, the same tracked messages of the round in
    /// the same order. `Err` says what is still different.
    async fn converged(&self, first_seq: u64) -> std::result::Result<(), String> {
        let all: Vec<usize> = (0..self.life.len()).collect();
        let views = self.tn.group_views(&all).await.map_err(|e| e.to_string())?;
        if views.iter().any(|v| v.1 != views[0].1) {
            let shown: Vec<String> = views
                .iter()
                .map(|(i, e, _)| format!("node {i} at epoch {e}"))
                .collect();
            return Err(format!("epochs differ: {}", shown.join(", ")));
        }
        let required: Vec<(String, (u64, usize))> = self
            .book
            .lock()
            .acked
            .iter()
            .filter(|a| a.seq >= first_seq)
            .map(|a| (a.id.clone(), (a.seq, a.sender)))
            .collect();
        let mut lists = Vec::new();
        for &i in &all {
            let history = self.tn.history(i).await.map_err(|e| e.to_string())?;
            let ids: HashSet<&str> = history.iter().map(|m| m.id.as_str()).collect();
            let keys: HashSet<(u64, usize)> = history
                .iter()
                .filter_map(|m| text_of(m).and_then(tracked))
                .collect();
            // Held by id, or by text under a new id (re-sent after a fork).
            let missing = required
                .iter()
                .filter(|(id, key)| !ids.contains(id.as_str()) && !keys.contains(key))
                .count();
            if missing > 0 {
                return Err(format!(
                    "node {i} lacks {missing} of the round's {} acknowledged messages",
                    required.len()
                ));
            }
            if history.len() >= MAX_HISTORY
                && history
                    .first()
                    .and_then(text_of)
                    .and_then(tracked)
                    .is_some_and(|(seq, _)| seq >= first_seq)
            {
                return Err(format!(
                    "node {i}: the round does not fit in one history page"
                ));
            }
            let round: Vec<String> = history
                .iter()
                .filter(|m| {
                    text_of(m)
                        .and_then(tracked)
                        .is_some_and(|(s, _)| s >= first_seq)
                })
                .map(|m| m.id.clone())
                .collect();
            lists.push(round);
        }
        for (k, l) in lists.iter().enumerate().skip(1) {
            if *l != lists[0] {
                return Err(format!(
                    "node {k} lists {} of the round's messages, node 0 lists {} (or in another order)",
                    l.len(),
                    lists[0].len()
                ));
            }
        }
        Ok(())
    }
}

fn text_of(m: &MessageInfo) -> Option<&str> {
    match &m.body {
        MessageBody::Text { text } => Some(text),
        _ => None,
    }
}

/// Reads node `dir`'s whole history of `group` from its database (the node must be
/// stopped), through `kith history --offline`, so the testnet need not link the node's store.
pub fn read_history(kith: &Path, dir: &Path, group: &str) -> Result<Vec<MessageInfo>> {
    let bad = |message: String| TestnetError::Node {
        node: usize::MAX,
        message: format!("{}: {message}", dir.display()),
    };
    let output = std::process::Command::new(kith)
        .arg("--data-dir")
        .arg(dir)
        .args(["history", group, "--offline", "--json"])
        .env_remove(crashpoint::ENV)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| TestnetError::io(format!("running {}", kith.display()), e))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(bad(format!(
            "`kith history --offline` failed ({}): {}",
            output.status,
            kith_client::text::clean(&stderr.trim().chars().take(300).collect::<String>())
        )));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| bad(format!("cannot decode `kith history --offline`: {e}")))
}

/// Runs the crash loop (see the module docs), stops every node and writes the report.
/// A run whose checks fail is a report with `passed = false`; `Err` means it could not be
/// run at all.
pub async fn run(opts: CrashLoopOptions) -> Result<CrashLoopReport> {
    opts.validate()?;
    let started = Instant::now();
    let tn = Testnet::up(opts.up.clone()).await?;
    let group = tn.group_id()?.to_owned();
    let n = tn.nodes.len();
    let book = SharedBook::default();
    {
        let mut b = book.lock();
        b.clients = vec![None; n];
        b.shown = vec![HashMap::new(); n];
    }
    tn.progress.line(&format!(
        "crash loop: {} kills of {n} nodes at {} msg/s, seed {}",
        opts.kills, opts.rate, opts.seed
    ));
    let mut looper = Looper {
        rng: StdRng::seed_from_u64(opts.seed),
        tn,
        book: book.clone(),
        life: Vec::new(),
        recorders: (0..n).map(|_| None).collect(),
        group: group.clone(),
        t0: Instant::now(),
        kills: Vec::new(),
        restart_failures: 0,
        failures_in_a_row: 0,
        self_updates: 0,
        next_update: opts.update_every.map(|d| Instant::now() + d),
        rounds: Vec::new(),
        opts,
    };
    for i in 0..n {
        let client = looper.tn.nodes[i].client()?.clone();
        let stream = client
            .events(Some(&group))
            .await
            .map_err(|e| TestnetError::api(i, "opening the event stream", e))?;
        looper.recorders[i] = Some(record(book.clone(), i, stream));
        book.lock().clients[i] = Some(client);
        let life = looper
            .rng
            .gen_range(MIN_UP.as_millis() as u64..=looper.opts.max_up.as_millis() as u64);
        let now = Instant::now();
        looper.life.push(Life::Up {
            armed: None,
            since: now,
            kill_at: now + Duration::from_millis(life),
            crash_lines: crash_lines(&looper.tn.nodes[i].dir),
        });
    }
    let traffic_task = tokio::spawn(traffic(
        book.clone(),
        group.clone(),
        looper.opts.rate,
        looper.opts.size,
        looper.opts.seed.wrapping_add(1),
    ));
    let outcome = looper.main_loop().await;
    book.lock().stopped = true;
    let _ = traffic_task.await;
    for i in 0..n {
        looper.detach(i);
    }
    let summary = looper.tn.shutdown().await;
    let mut report = looper.report(&book, started);
    if let Err(e) = outcome {
        report.passed = false;
        report.failure = Some(format!("the loop stopped early: {e}"));
    } else if !summary.left_running.is_empty() {
        report.passed = false;
        report.failure = Some(format!(
            "still running after the stop: {:?}",
            summary.left_running
        ));
    }
    let path = looper
        .opts
        .out
        .clone()
        .unwrap_or_else(|| looper.tn.dir.join("crash-report.json"));
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TestnetError::Invalid(format!("cannot encode the report: {e}")))?;
    std::fs::write(&path, json + "\n")
        .map_err(|e| TestnetError::io(format!("writing {}", path.display()), e))?;
    Ok(report)
}

impl Looper {
    async fn main_loop(&mut self) -> Result<()> {
        let mut round_first_seq = 1;
        let mut round_kills_start = 0;
        let (mut acked_before, mut unacked_before) = (0, 0);
        loop {
            tokio::time::sleep(TICK).await;
            self.step(true).await?;
            self.maybe_update().await;
            let done = self.kills.len() >= self.opts.kills;
            let in_round = self.kills.len() - round_kills_start;
            let round_sends = {
                let b = self.book.lock();
                b.acked.len() + b.unacked.len() - acked_before - unacked_before
            };
            if done || in_round >= self.opts.round_kills || round_sends >= ROUND_MAX_SENDS {
                // Extra kills of armed nodes at the round's end belong to it.
                self.end_round(
                    round_kills_start,
                    round_first_seq,
                    acked_before,
                    unacked_before,
                )
                .await?;
                let b = self.book.lock();
                round_first_seq = b.next_seq + 1;
                acked_before = b.acked.len();
                unacked_before = b.unacked.len();
                drop(b);
                round_kills_start = self.kills.len();
                if self.kills.len() >= self.opts.kills {
                    return Ok(());
                }
            }
        }
    }

    /// The final checks over every node's whole history (the nodes are stopped).
    fn report(&self, book: &SharedBook, started: Instant) -> CrashLoopReport {
        let b = book.lock();
        let n = self.life.len();
        let mut failure: Option<String> = None;
        let mut histories: Vec<Vec<MessageInfo>> = Vec::with_capacity(n);
        for node in &self.tn.nodes {
            match read_history(&self.tn.kith, &node.dir, &self.group) {
                Ok(h) => histories.push(h),
                Err(e) => {
                    failure
                        .get_or_insert(format!("cannot read node {}'s history: {e}", node.index));
                    histories.push(Vec::new());
                }
            }
        }
        let sets: Vec<HashSet<&str>> = histories
            .iter()
            .map(|h| h.iter().map(|m| m.id.as_str()).collect())
            .collect();
        let held: Vec<HashSet<(u64, usize)>> = histories
            .iter()
            .map(|h| {
                h.iter()
                    .filter_map(|m| text_of(m).and_then(tracked))
                    .collect()
            })
            .collect();
        // A message whose id is gone but whose text is held under another id was re-sent
        // (a member re-sends its messages of a branch that lost a fork): not lost.
        let mut resent: HashSet<(String, usize)> = HashSet::new();
        let mut has = |i: usize, id: &str, key: Option<(u64, usize)>| {
            if sets[i].contains(id) {
                true
            } else if key.is_some_and(|k| held[i].contains(&k)) {
                resent.insert((id.to_owned(), i));
                true
            } else {
                false
            }
        };
        let mut acked_lost = 0;
        let mut acked_lost_examples = Vec::new();
        for a in &b.acked {
            let missing_on: Vec<usize> = (0..n)
                .filter(|&i| !has(i, &a.id, Some((a.seq, a.sender))))
                .collect();
            if !missing_on.is_empty() {
                acked_lost += 1;
                if acked_lost_examples.len() < MAX_EXAMPLES {
                    acked_lost_examples.push(LostMessage {
                        seq: Some(a.seq),
                        sender: Some(a.sender),
                        id: a.id.clone(),
                        missing_on,
                    });
                }
            }
        }
        let mut shown_then_lost = 0;
        let mut shown_then_lost_examples = Vec::new();
        for (i, shown) in b.shown.iter().enumerate() {
            let mut lost: Vec<&String> = shown
                .iter()
                .filter(|(id, key)| !has(i, id, **key))
                .map(|(id, _)| id)
                .collect();
            lost.sort();
            shown_then_lost += lost.len();
            for id in lost {
                if shown_then_lost_examples.len() < MAX_EXAMPLES {
                    let a = b.acked.iter().find(|a| a.id == **id);
                    shown_then_lost_examples.push(LostMessage {
                        seq: a.map(|a| a.seq),
                        sender: a.map(|a| a.sender),
                        id: id.clone(),
                        missing_on: vec![i],
                    });
                }
            }
        }
        let (mut everywhere, mut nowhere, mut partial) = (0, 0, 0);
        for u in &b.unacked {
            match held.iter().filter(|h| h.contains(u)).count() {
                0 => nowhere += 1,
                k if k == n => everywhere += 1,
                _ => partial += 1,
            }
        }
        let texts: Vec<Vec<&str>> = histories
            .iter()
            .map(|h| {
                h.iter()
                    .filter(|m| text_of(m).is_some())
                    .map(|m| m.id.as_str())
                    .collect()
            })
            .collect();
        let mut first_difference = None;
        for (k, t) in texts.iter().enumerate().skip(1) {
            if *t != texts[0] {
                let at = t
                    .iter()
                    .zip(&texts[0])
                    .position(|(a, b)| a != b)
                    .unwrap_or(t.len().min(texts[0].len()));
                first_difference = Some(format!(
                    "node {k} lists {} text messages and node 0 {}; they first differ at position {at}",
                    t.len(),
                    texts[0].len()
                ));
                break;
            }
        }
        let mut kills_by_point: BTreeMap<String, usize> = BTreeMap::new();
        let mut kills_by_signal = 0;
        let mut unexpected = 0;
        for k in &self.kills {
            match k.how {
                KillHow::Signal => kills_by_signal += 1,
                KillHow::Unexpected => unexpected += 1,
                KillHow::Point => {
                    let point = k
                        .armed
                        .as_deref()
                        .and_then(|a| a.split(':').next())
                        .unwrap_or("?")
                        .to_owned();
                    *kills_by_point.entry(point).or_default() += 1;
                }
            }
        }
        let converge_ms: Vec<u64> = self
            .rounds
            .iter()
            .filter_map(|r| r.converge_secs.map(|s| (s * 1000.0) as u64))
            .collect();
        let rounds_not_converged = self
            .rounds
            .iter()
            .filter(|r| r.converge_secs.is_none())
            .count();
        let checks = [
            (
                acked_lost > 0,
                format!("{acked_lost} acknowledged sends lost"),
            ),
            (
                shown_then_lost > 0,
                format!("{shown_then_lost} messages shown and then lost"),
            ),
            (
                partial > 0,
                format!("{partial} unacknowledged sends reached only some members"),
            ),
            (
                first_difference.is_some(),
                "the members' histories differ".to_owned(),
            ),
            (
                rounds_not_converged > 0,
                format!("{rounds_not_converged} rounds did not converge"),
            ),
            (
                unexpected > 0,
                format!("{unexpected} nodes died without being killed"),
            ),
            (
                self.restart_failures > 0,
                format!("{} restarts failed", self.restart_failures),
            ),
        ];
        let found: Vec<String> = checks
            .into_iter()
            .filter(|(bad, _)| *bad)
            .map(|(_, m)| m)
            .collect();
        if !found.is_empty() && failure.is_none() {
            failure = Some(found.join("; "));
        }
        CrashLoopReport {
            run_dir: self.tn.dir.clone(),
            seed: self.opts.seed,
            nodes: n,
            kills_planned: self.opts.kills,
            kills: self.kills.len(),
            kills_by_signal,
            kills_by_point,
            unexpected_exits: unexpected,
            restart_failures: self.restart_failures,
            self_updates: self.self_updates,
            acked: b.acked.len(),
            unacked: b.unacked.len(),
            unacked_reasons: b.unacked_why.clone(),
            unacked_everywhere: everywhere,
            unacked_nowhere: nowhere,
            unacked_partial: partial,
            acked_lost,
            shown_then_lost,
            resent_under_new_id: resent.len(),
            shown_events: b.shown_events,
            lagged_events: b.lagged,
            histories_equal: first_difference.is_none(),
            first_difference,
            history_entries: histories.iter().map(Vec::len).collect(),
            rounds: self.rounds.clone(),
            rounds_not_converged,
            converge_ms: percentiles(&converge_ms),
            acked_lost_examples,
            shown_then_lost_examples,
            kill_log: self.kills.clone(),
            secs: started.elapsed().as_secs_f64(),
            passed: failure.is_none(),
            failure,
            replay: self.opts.replay_command(),
        }
    }
}

/// The report as text.
pub fn render(r: &CrashLoopReport) -> String {
    let points: Vec<String> = r
        .kills_by_point
        .iter()
        .map(|(p, c)| format!("{p} {c}"))
        .collect();
    let converge = r.converge_ms.map_or_else(
        || "n/a".to_owned(),
        |p| {
            format!(
                "p50 {:.1} s, p90 {:.1} s, max {:.1} s over {} rounds",
                p.p50 as f64 / 1000.0,
                p.p90 as f64 / 1000.0,
                p.max as f64 / 1000.0,
                p.count
            )
        },
    );
    format!(
        "crash loop: {} nodes, seed {}, {:.0} s ({})\n\
         kills:              {} ({} SIGKILL, crash points: {})\n\
         unexpected exits:   {}\n\
         restart failures:   {}\n\
         self-updates:       {}\n\
         sends:              {} acknowledged, {} not ({} everywhere, {} nowhere, {} partial)\n\
         not acknowledged:   {}\n\
         acked-lost:         {}\n\
         shown-then-lost:    {} (of {} events shown; {} skipped by lag)\n\
         re-sent, new id:    {}\n\
         histories equal:    {}\n\
         time to converge:   {converge}; {} of {} rounds did not converge\n\
         result:             {}\n\
         replay:             {}\n",
        r.nodes,
        r.seed,
        r.secs,
        r.run_dir.display(),
        r.kills,
        r.kills_by_signal,
        if points.is_empty() {
            "none".to_owned()
        } else {
            points.join(", ")
        },
        r.unexpected_exits,
        r.restart_failures,
        r.self_updates,
        r.acked,
        r.unacked,
        r.unacked_everywhere,
        r.unacked_nowhere,
        r.unacked_partial,
        if r.unacked_reasons.is_empty() {
            "-".to_owned()
        } else {
            r.unacked_reasons
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        r.acked_lost,
        r.shown_then_lost,
        r.shown_events,
        r.lagged_events,
        r.resent_under_new_id,
        match &r.first_difference {
            None => "yes".to_owned(),
            Some(d) => format!("NO: {d}"),
        },
        r.rounds_not_converged,
        r.rounds.len(),
        match &r.failure {
            None => "PASSED".to_owned(),
            Some(f) => format!("FAILED: {f}"),
        },
        r.replay
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_texts_are_parsed() {
        let mut rng = StdRng::seed_from_u64(1);
        let t = traffic_text(1234, 7, 64, &mut rng);
        assert_eq!(tracked(&t), Some((1234, 7)));
        assert_eq!(tracked("kith-testnet probe 1 2"), None);
        assert_eq!(tracked("kt12 nx "), None);
    }

    #[test]
    fn plans_are_reproducible_and_options_checked() {
        let a: Vec<_> = {
            let mut r = StdRng::seed_from_u64(5);
            (0..50).map(|_| pick_point(&mut r)).collect()
        };
        let b: Vec<_> = {
            let mut r = StdRng::seed_from_u64(5);
            (0..50).map(|_| pick_point(&mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(Option::is_none) && a.iter().any(Option::is_some));
        assert!(CrashLoopOptions::default().validate().is_ok());
        let one = CrashLoopOptions {
            up: UpOptions {
                nodes: 1,
                ..UpOptions::default()
            },
            ..CrashLoopOptions::default()
        };
        assert!(one.validate().is_err());
        let cmd = CrashLoopOptions::default().replay_command();
        assert!(cmd.starts_with("kith-testnet crash-loop --kills 100 --nodes 2 --seed 0"));
    }
}
