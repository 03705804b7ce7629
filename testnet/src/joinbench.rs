//! `kith-testnet join-bench`: how long a newcomer waits, from running `kith join LINK` to
//! reading the first message of the group, with the inviter online and with it stopped.
//!
//! A testnet of N members is started. Node 0 sends a text to the group every
//! [`JoinBenchOptions::tick`] throughout. Each trial: a member (the inviter, never node 0)
//! creates a one-use invite; in the *offline* mode it is stopped (SIGTERM) once node 0 has
//! learned the invite, so another member must admit the joiner (found through the DHT, after
//! the link's dead addresses failed). A fresh node, bootstrapped from node 0, subscribes to
//! its event stream; then the clock starts and `kith join LINK` runs as a child process.
//! Two times are recorded from that start: when `kith join` exited successfully, and when the
//! joiner's event stream delivered the first decrypted text of the group. The second
//! includes up to one tick of waiting for node 0's next message.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kith_client::LiveEvent;
use kith_client::model::{CreateInviteRequest, MessageBody, NodeEvent};
use serde::Serialize;

use crate::error::{Result, TestnetError};
use crate::launcher::{Testnet, UpOptions, within};
use crate::procs::Sig;
use crate::stats::{Percentiles, percentiles};

/// How long one `kith join` may take before the trial fails.
const JOIN_LIMIT: Duration = Duration::from_secs(60);
/// How long to wait for the first message after joining.
const FIRST_MESSAGE_LIMIT: Duration = Duration::from_secs(30);
/// How long the offline inviter's invite may take to reach node 0.
const SHARE_LIMIT: Duration = Duration::from_secs(30);

/// Settings of a join benchmark.
#[derive(Debug, Clone)]
pub struct JoinBenchOptions {
    /// How to start the testnet.
    pub up: UpOptions,
    /// Trials per mode.
    pub trials: usize,
    /// Node 0's sending period.
    pub tick: Duration,
    /// Where to write `join-report.json` (default: the run directory).
    pub out: Option<PathBuf>,
}

/// One join.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// `online` or `offline` (the inviter's node).
    pub mode: String,
    /// The inviter's node index.
    pub inviter: usize,
    /// The joiner's node index.
    pub joiner: usize,
    /// From starting `kith join` to its successful exit, ms.
    pub join_ms: u64,
    /// From starting `kith join` to the first decrypted text on the joiner, ms.
    pub first_message_ms: u64,
}

/// The figures of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// `online` or `offline`.
    pub mode: String,
    /// `kith join` duration.
    pub join_ms: Option<Percentiles>,
    /// Time to the first message.
    pub first_message_ms: Option<Percentiles>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct JoinBenchReport {
    /// Members of the testnet.
    pub members: usize,
    /// Node 0's sending period, ms.
    pub tick_ms: u64,
    /// Every trial, in order.
    pub trials: Vec<Trial>,
    /// Summary per mode.
    pub figures: Vec<ModeFigures>,
    /// Run directory.
    pub dir: PathBuf,
}

/// Runs the benchmark; the testnet is stopped at the end, also on error.
pub async fn join_bench(opts: JoinBenchOptions) -> Result<JoinBenchReport> {
    if opts.up.nodes < 3 {
        return Err(TestnetError::Invalid(
            "join-bench needs at least 3 nodes (a sender, an inviter, another member)".into(),
        ));
    }
    if opts.trials == 0 || opts.trials > 50 {
        return Err(TestnetError::Invalid("--trials must be 1 to 50".into()));
    }
    let mut tn = Testnet::up(opts.up.clone()).await?;
    let result = run(&mut tn, &opts).await;
    tn.shutdown().await;
    result
}

async fn run(tn: &mut Testnet, opts: &JoinBenchOptions) -> Result<JoinBenchReport> {
    let members = tn.nodes.len();
    let group = tn.group_id()?.to_owned();
    let sender = tn.nodes[0].client()?.clone();
    let ticker = {
        let (group, tick) = (group.clone(), opts.tick);
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut interval = tokio::time::interval(tick);
            loop {
                interval.tick().await;
                n += 1;
                let _ = sender.send(&group, &format!("tick {n}")).await;
            }
        })
    };
    let mut trials = Vec::new();
    let mut outcome = Ok(());
    'trials: for t in 0..opts.trials {
        for offline in [false, true] {
            // Inviters rotate over nodes 1.., never node 0 (the sender and bootstrap).
            let inviter = 1 + (2 * t + usize::from(offline)) % (members - 1);
            match trial(tn, &group, inviter, offline).await {
                Ok(trial) => {
                    tn.progress.line(&format!(
                        "trial {} ({}, inviter node {}): joined in {} ms, first message after {} ms",
                        t + 1,
                        trial.mode,
                        inviter,
                        trial.join_ms,
                        trial.first_message_ms
                    ));
                    trials.push(trial);
                }
                Err(e) => {
                    outcome = Err(e);
                    break 'trials;
                }
            }
        }
    }
    ticker.abort();
    outcome?;
    let figures = ["online", "offline"]
        .iter()
        .map(|mode| {
            let of = |f: fn(&Trial) -> u64| {
                let v: Vec<u64> = trials.iter().filter(|t| t.mode == *mode).map(f).collect();
                percentiles(&v)
            };
            ModeFigures {
                mode: (*mode).to_owned(),
                join_ms: of(|t| t.join_ms),
                first_message_ms: of(|t| t.first_message_ms),
            }
        })
        .collect();
    let report = JoinBenchReport {
        members,
        tick_ms: u64::try_from(opts.tick.as_millis()).unwrap_or(u64::MAX),
        trials,
        figures,
        dir: tn.dir.clone(),
    };
    let out = opts.out.clone().unwrap_or_else(|| tn.dir.clone());
    std::fs::create_dir_all(&out)
        .map_err(|e| TestnetError::io(format!("creating {}", out.display()), e))?;
    let path = out.join("join-report.json");
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TestnetError::Invalid(format!("encoding the report: {e}")))?;
    std::fs::write(&path, json + "\n")
        .map_err(|e| TestnetError::io(format!("writing {}", path.display()), e))?;
    Ok(report)
}

async fn trial(tn: &mut Testnet, group: &str, inviter: usize, offline: bool) -> Result<Trial> {
    let client = tn.nodes[inviter].client()?.clone();
    let req = CreateInviteRequest {
        expires_in_secs: Some(3600),
        max_uses: Some(1),
        approval: false,
    };
    let invite = within(
        Duration::from_secs(10),
        || format!("node {inviter} to create an invite"),
        async {
            client
                .create_invite(group, &req)
                .await
                .map_err(|e| TestnetError::api(inviter, "creating an invite", e))
        },
    )
    .await?;
    if offline {
        // Another member must know the invite before the inviter goes.
        let node0 = tn.nodes[0].client()?.clone();
        within(
            SHARE_LIMIT,
            || "node 0 to learn the invite".to_owned(),
            async {
                loop {
                    let list = node0
                        .invites(group)
                        .await
                        .map_err(|e| TestnetError::api(0, "listing invites", e))?;
                    if list.iter().any(|i| i.id == invite.id) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await?;
        tn.stop_node(inviter, Sig::Term).await?;
    }
    let joiner = tn.add_spare_node(0).await?;
    let joiner_client = tn.nodes[joiner].client()?.clone();
    let mut events = joiner_client
        .events(None)
        .await
        .map_err(|e| TestnetError::api(joiner, "opening the event stream", e))?;
    let started = Instant::now();
    let output = tokio::time::timeout(
        JOIN_LIMIT,
        tokio::process::Command::new(&tn.kith)
            .arg("--data-dir")
            .arg(&tn.nodes[joiner].dir)
            .args(["join", &invite.link, "--json"])
            .env_remove("KITH_API")
            .env_remove("KITH_DATA_DIR")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| TestnetError::Node {
        node: joiner,
        message: format!("`kith join` did not finish within {JOIN_LIMIT:?}"),
    })?
    .map_err(|e| TestnetError::io("running kith join", e))?;
    let join_ms = elapsed_ms(started);
    if !output.status.success() {
        return Err(TestnetError::Node {
            node: joiner,
            message: format!(
                "`kith join` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    let first = tokio::time::timeout(FIRST_MESSAGE_LIMIT, async {
        loop {
            match events.next().await {
                Ok(Some(LiveEvent::Event(NodeEvent::Message(m))))
                    if m.group == group && matches!(m.body, MessageBody::Text { .. }) =>
                {
                    return Ok(elapsed_ms(started));
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err("the event stream ended".to_owned()),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let first_message_ms = match first {
        Ok(Ok(ms)) => ms,
        Ok(Err(e)) => {
            return Err(TestnetError::Node {
                node: joiner,
                message: e,
            });
        }
        Err(_) => {
            return Err(TestnetError::Node {
                node: joiner,
                message: format!("no message within {FIRST_MESSAGE_LIMIT:?} after joining"),
            });
        }
    };
    tn.stop_node(joiner, Sig::Term).await?;
    if offline {
        tn.start_node(inviter).await?;
    }
    Ok(Trial {
        mode: if offline { "offline" } else { "online" }.to_owned(),
        inviter,
        joiner,
        join_ms,
        first_message_ms,
    })
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The report as a table.
pub fn render(r: &JoinBenchReport) -> String {
    let mut out = format!(
        "join benchmark: {} members, node 0 sends every {} ms; {}\n\n\
         {:<8} {:>6}  {:>22}  {:>22}\n",
        r.members,
        r.tick_ms,
        r.dir.display(),
        "inviter",
        "trials",
        "kith join ms p50/max",
        "first msg ms p50/max"
    );
    for f in &r.figures {
        let cell = |p: &Option<Percentiles>| match p {
            Some(p) => format!("{}/{}", p.p50, p.max),
            None => "n/a".to_owned(),
        };
        let n = f.join_ms.as_ref().map_or(0, |p| p.count);
        out.push_str(&format!(
            "{:<8} {:>6}  {:>22}  {:>22}\n",
            f.mode,
            n,
            cell(&f.join_ms),
            cell(&f.first_message_ms)
        ));
    }
    out
}
