//! `kith-testnet`: the command-line front end of the `kith_testnet` library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kith_testnet::bench::{self, BenchOptions};
use kith_testnet::crashloop::{self, CrashLoopOptions};
use kith_testnet::joinbench::{self, JoinBenchOptions};
use kith_testnet::launcher::{self, DEFAULT_NODE_LOG, DEFAULT_ROOT, Testnet, UpOptions};
use kith_testnet::manifest::latest_run_dir;
use kith_testnet::scenario::{self, ScenarioOptions};
use kith_testnet::{SEED_ENV, resolve_seed};

/// Start many local Kith nodes, drive traffic and scenarios, and measure them.
#[derive(Debug, Parser)]
#[command(name = "kith-testnet", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a testnet and keep it up until Ctrl-C (or --duration).
    Up(UpArgs),
    /// Stop a testnet started by another kith-testnet process.
    Down(DirArg),
    /// Show each node of a testnet: alive, peer, connections, groups, epoch.
    Status(DirArg),
    /// Start a testnet (or use a running one), send steady traffic, report figures.
    Bench(BenchArgs),
    /// Run a scenario file (TOML) against a fresh testnet.
    Scenario(ScenarioArgs),
    /// Time `kith join LINK` to the first decrypted message, inviter online and offline.
    JoinBench(JoinBenchArgs),
    /// File throughput and CPU per MiB between real nodes, for 1 and 5 receivers.
    FileBench(FileBenchArgs),
    /// Kill nodes again and again (SIGKILL and crash points) while all send; count losses.
    CrashLoop(CrashLoopArgs),
    /// In a NAT lab (network namespaces, needs root): time to the first message across two
    /// NATs, direct vs relayed connections, and relay bytes per message.
    NatBench(NatBenchArgs),
    /// Raw throughput of ONE libp2p stream between two swarms of this process on loopback
    /// (the node's TCP+Noise+Yamux stack): the baseline of file transfer. The CPU is the
    /// whole process, so both ends together.
    StreamBench(StreamBenchArgs),
}

#[derive(Debug, Args)]
struct StreamBenchArgs {
    /// MiB to push through the stream.
    #[arg(long, default_value_t = kith_testnet::streambench::DEFAULT_MIB, value_name = "N")]
    mib: u64,
    /// Transport: tcp (TCP nodelay + Noise + Yamux, as the node) or quic.
    #[arg(long, default_value = "tcp", value_name = "KIND")]
    transport: kith_testnet::streambench::Transport,
    /// How long the transfer may take, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    timeout: f64,
    /// Print the figures as JSON on stdout instead of one line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NatBenchArgs {
    /// NAT kinds to measure: cone, symmetric (repeatable) [default: both].
    #[arg(long = "nat", value_name = "KIND")]
    nats: Vec<kith_testnet::natlab::Nat>,
    /// Trials per NAT kind (each in a fresh lab).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Messages sent after the punch, for the relay's bytes per message.
    #[arg(long, default_value_t = 50)]
    messages: usize,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// The kith binary [default: $KITH_BIN, else `kith` next to this executable].
    #[arg(long, value_name = "PATH")]
    kith: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CrashLoopArgs {
    /// Kills to do (SIGKILL from outside and aborts at crash points together).
    #[arg(long, default_value_t = 100)]
    kills: usize,
    /// Members of the group (at least 2).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Seed of the plan and the traffic [default: $KITH_TESTNET_SEED, else random].
    #[arg(long)]
    seed: Option<u64>,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Bytes per message (16 to 65536).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Kills per round; each round ends with a convergence check.
    #[arg(long, default_value_t = 10, value_name = "N")]
    round_kills: usize,
    /// Longest life of a node before it is killed from outside, in milliseconds (3 times
    /// this for a node with a crash point, to reach it).
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    max_up_ms: u64,
    /// Longest time a killed node stays down, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    max_down_ms: u64,
    /// How long the members may take to converge after a round, in seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    converge_timeout: f64,
    /// A random member commits a self-update this often, in seconds (0: never).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    update_every: f64,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Where to write the JSON report [default: RUN_DIR/crash-report.json].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct JoinBenchArgs {
    /// Members of the testnet (joiners are extra nodes).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Joins per mode (inviter online, inviter offline).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Node 0 sends a message this often, in milliseconds.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    tick_ms: u64,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct FileBenchArgs {
    /// File size in MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Receiver counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 5])]
    receivers: Vec<usize>,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

/// Options shared by the commands that start nodes.
#[derive(Debug, Clone, Args)]
struct NodeArgs {
    /// The kith binary [default: $KITH_BIN, else `kith` next to this executable].
    #[arg(long, value_name = "PATH")]
    kith: Option<PathBuf>,
    /// RUST_LOG of the nodes (their logs go to RUN_DIR/node-NNN/node.log).
    #[arg(long, value_name = "FILTER", default_value = DEFAULT_NODE_LOG)]
    node_log: String,
    /// Print no progress lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Network id of the nodes.
    #[arg(long, value_name = "NAME", default_value = "kith-testnet")]
    network: String,
    /// Serve metrics on each node (`kith run --metrics 127.0.0.1:0`).
    #[arg(long)]
    metrics: bool,
    /// Nodes started at once after node 0.
    #[arg(long, default_value_t = 8, value_name = "N")]
    batch: usize,
    /// Instead of nodes on loopback: a NAT lab (network namespaces, needs root) with one
    /// public relay and two homes behind this kind of NAT (cone or symmetric), in one group.
    #[arg(long, value_name = "KIND")]
    nat: Option<kith_testnet::natlab::Nat>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct DirArg {
    /// Run directory [default: the newest under ./testnet-run].
    #[arg(long, value_name = "RUN_DIR")]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table (status only).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A hostile peer to run for the whole bench: snoop, flood:RATE, garbage:RATE,
    /// replay:RATE, oversize:SECS or joinspam:RATE (repeatable; see docs/BENCHMARKS.md).
    #[arg(long, value_name = "KIND", value_parser = kith_testnet::attack::AttackKind::parse)]
    attack: Vec<kith_testnet::attack::AttackKind>,
    /// Number of nodes to start (ignored with --dir).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Bytes per message (16 to 65536).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Measured traffic, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,
    /// Traffic before the measurement, in seconds (not counted).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    warmup: f64,
    /// How long to wait for the last deliveries, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    drain: f64,
    /// Report directory [default: RUN_DIR/bench-<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Use the running testnet in RUN_DIR instead of starting one.
    #[arg(long, value_name = "RUN_DIR")]
    dir: Option<PathBuf>,
    /// Where to start the testnet [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "dir")]
    run_dir: Option<PathBuf>,
    /// Network id of the nodes.
    #[arg(long, value_name = "NAME", default_value = "kith-testnet")]
    network: String,
    /// Traffic seed [default: $KITH_TESTNET_SEED, else random; printed in the report].
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct ScenarioArgs {
    /// The scenario file (see testnet/scenarios/).
    file: PathBuf,
    /// Run directory [default: ./testnet-run/<UTC timestamp>].
    #[arg(long, value_name = "RUN_DIR")]
    dir: Option<PathBuf>,
    /// Traffic seed [default: $KITH_TESTNET_SEED, else the file's `seed`, else random].
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    node: NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Prints the error as one line on stderr and returns exit code 1.
fn fail(err: &anyhow::Error) -> ExitCode {
    let text = format!("{err:#}").replace('\n', " ");
    let _ = writeln!(std::io::stderr().lock(), "error: {text}");
    ExitCode::FAILURE
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    if v.is_finite() && (0.0..=86_400.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{what} must be 0 to 86400 seconds")
    }
}

fn run_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => Ok(latest_run_dir(Path::new(DEFAULT_ROOT))?),
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) if args.nat.is_some() => up_nat(args).await,
        Command::Up(args) => up(args).await,
        Command::NatBench(args) => {
            kith_testnet::natlab::Lab::available().map_err(|why| anyhow::anyhow!("{why}"))?;
            let kith = launcher::find_kith(args.kith.as_deref())?;
            let root = args
                .run_dir
                .unwrap_or_else(|| launcher::fresh_dir(Path::new(DEFAULT_ROOT), "nat-bench"));
            let nats = if args.nats.is_empty() {
                vec![
                    kith_testnet::natlab::Nat::Cone,
                    kith_testnet::natlab::Nat::Symmetric,
                ]
            } else {
                args.nats
            };
            kith_testnet::natbench::run(
                &nats,
                args.trials.max(1),
                args.messages.max(1),
                &kith,
                &root,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Down(args) => {
            let dir = run_dir(args.dir)?;
            let (summary, notes) = launcher::down(&dir).await?;
            for n in notes {
                out(&format!("{n}\n"))?;
            }
            out(&format!(
                "stopped {} nodes ({} needed SIGKILL)\n",
                summary.stopped.len() + summary.killed.len(),
                summary.killed.len()
            ))?;
            if !summary.left_running.is_empty() {
                anyhow::bail!("still running: {:?}", summary.left_running);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let dir = run_dir(args.dir)?;
            let (m, rows) = launcher::status(&dir).await?;
            if args.json {
                out(&(serde_json::to_string_pretty(&rows)? + "\n"))?;
            } else {
                out(&format!(
                    "{} (network {}, group {})\n{}",
                    dir.display(),
                    m.network,
                    m.group.as_deref().map_or("none", |g| &g[..8.min(g.len())]),
                    launcher::status_table(&rows)
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let seed = resolve_seed(args.seed, None)?;
            let opts = BenchOptions {
                up: UpOptions {
                    nodes: args.nodes,
                    dir: args.run_dir,
                    network: args.network,
                    metrics: true,
                    kith: args.node.kith,
                    node_log: args.node.node_log,
                    quiet: args.node.quiet,
                    ..UpOptions::default()
                },
                attach: args.dir,
                rate: args.rate,
                size: args.size,
                duration: secs("--duration", args.duration)?,
                warmup: secs("--warmup", args.warmup)?,
                drain: secs("--drain", args.drain)?,
                out: args.out,
                seed,
                attacks: args.attack,
            };
            let report = tokio::select! {
                r = bench::bench(opts) => r?,
                () = interrupted() => anyhow::bail!("interrupted; nodes were killed"),
            };
            if args.json {
                out(&(serde_json::to_string_pretty(&report)? + "\n"))?;
            } else {
                out(&bench::render(&report))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CrashLoop(args) => crash_loop(args).await,
        Command::FileBench(args) => {
            let opts = kith_testnet::filebench::FileBenchOptions {
                up: UpOptions {
                    dir: args.run_dir,
                    kith: args.node.kith,
                    node_log: args.node.node_log,
                    quiet: args.node.quiet,
                    ..UpOptions::default()
                },
                mib: args.mib,
                receivers: args.receivers,
                seed: 7,
            };
            let report = tokio::select! {
                r = kith_testnet::filebench::file_bench(opts) => r?,
                () = interrupted() => anyhow::bail!("interrupted; nodes were killed"),
            };
            if args.json {
                out(&(serde_json::to_string_pretty(&report)? + "\n"))?;
            } else {
                out(&kith_testnet::filebench::render(&report))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::StreamBench(args) => {
            let opts = kith_testnet::streambench::StreamOptions {
                mib: args.mib,
                transport: args.transport,
                timeout: secs("--timeout", args.timeout)?,
            };
            let figures = tokio::select! {
                r = kith_testnet::streambench::raw_stream(&opts) => r?,
                () = interrupted() => anyhow::bail!("interrupted"),
            };
            if args.json {
                out(&(serde_json::to_string_pretty(&figures)? + "\n"))?;
            } else {
                out(&kith_testnet::streambench::render(&figures))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::JoinBench(args) => {
            if !(10..=60_000).contains(&args.tick_ms) {
                anyhow::bail!("--tick-ms must be 10 to 60000");
            }
            let opts = JoinBenchOptions {
                up: UpOptions {
                    nodes: args.nodes,
                    dir: args.run_dir,
                    kith: args.node.kith,
                    node_log: args.node.node_log,
                    quiet: args.node.quiet,
                    ..UpOptions::default()
                },
                trials: args.trials,
                tick: Duration::from_millis(args.tick_ms),
                out: None,
            };
            let report = tokio::select! {
                r = joinbench::join_bench(opts) => r?,
                () = interrupted() => anyhow::bail!("interrupted; nodes were killed"),
            };
            if args.json {
                out(&(serde_json::to_string_pretty(&report)? + "\n"))?;
            } else {
                out(&joinbench::render(&report))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Scenario(args) => {
            let seed = match args.seed {
                Some(s) => Some(s),
                None => std::env::var_os(SEED_ENV)
                    .is_some()
                    .then(|| resolve_seed(None, None))
                    .transpose()?,
            };
            let opts = ScenarioOptions {
                file: args.file,
                dir: args.dir,
                kith: args.node.kith,
                seed,
                node_log: args.node.node_log,
                quiet: args.node.quiet,
            };
            let report = tokio::select! {
                r = scenario::run(opts) => r?,
                () = interrupted() => anyhow::bail!("interrupted; nodes were killed"),
            };
            out(&scenario::render(&report))?;
            match report.failure {
                None => Ok(ExitCode::SUCCESS),
                Some(f) => {
                    let _ = writeln!(std::io::stderr().lock(), "error: {f}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

async fn crash_loop(args: CrashLoopArgs) -> anyhow::Result<ExitCode> {
    let update = secs("--update-every", args.update_every)?;
    let opts = CrashLoopOptions {
        up: UpOptions {
            nodes: args.nodes,
            dir: args.run_dir,
            kith: args.node.kith,
            node_log: args.node.node_log,
            quiet: args.node.quiet,
            ..UpOptions::default()
        },
        kills: args.kills,
        seed: resolve_seed(args.seed, None)?,
        rate: args.rate,
        size: args.size,
        round_kills: args.round_kills,
        max_up: Duration::from_millis(args.max_up_ms),
        max_down: Duration::from_millis(args.max_down_ms),
        converge_timeout: secs("--converge-timeout", args.converge_timeout)?,
        update_every: (!update.is_zero()).then_some(update),
        out: args.out,
    };
    opts.validate()?;
    let report = tokio::select! {
        r = crashloop::run(opts) => r?,
        () = interrupted() => anyhow::bail!("interrupted; nodes were killed"),
    };
    if args.json {
        out(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        out(&crashloop::render(&report))?;
    }
    match &report.failure {
        None => Ok(ExitCode::SUCCESS),
        Some(f) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {f} (seed {}; replay: {})",
                report.seed,
                report.replay
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `up --nat KIND`: the NAT lab's topology with a group, until Ctrl-C (or `--duration`).
async fn up_nat(args: UpArgs) -> anyhow::Result<ExitCode> {
    let nat = args.nat.unwrap_or(kith_testnet::natlab::Nat::Cone);
    kith_testnet::natlab::Lab::available().map_err(|why| anyhow::anyhow!("{why}"))?;
    let duration = args.duration.map(|d| secs("--duration", d)).transpose()?;
    let kith = launcher::find_kith(args.node.kith.as_deref())?;
    let root = args
        .dir
        .unwrap_or_else(|| launcher::fresh_dir(Path::new(DEFAULT_ROOT), "nat"));
    let net = kith_testnet::natnet::two_homes([nat, nat], &kith, &root).await?;
    let (group, first) = kith_testnet::natbench::form_group(&net).await?;
    let mut text = format!(
        "NAT lab up ({nat:?} NATs): group {group}, first message {} ms after the join\n",
        first.as_millis()
    );
    for (i, n) in net.nodes.iter().enumerate() {
        let role = ["public relay", "home of ann", "home of bob"][i.min(2)];
        text.push_str(&format!(
            "  node {i} ({role}, {}): ip netns exec {} {} --data-dir {} status\n",
            n.host.addr,
            n.host.ns,
            kith.display(),
            n.dir.display()
        ));
    }
    text.push_str("Ctrl-C removes the lab (namespaces and nodes).\n");
    out(&text)?;
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => interrupted().await,
    }
    drop(net);
    Ok(ExitCode::SUCCESS)
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let duration = args.duration.map(|d| secs("--duration", d)).transpose()?;
    let opts = UpOptions {
        nodes: args.nodes,
        dir: args.dir,
        network: args.network,
        metrics: args.metrics,
        kith: args.node.kith,
        batch: args.batch,
        node_log: args.node.node_log,
        quiet: args.node.quiet,
    };
    let mut tn = tokio::select! {
        r = Testnet::up(opts) => r?,
        () = interrupted() => anyhow::bail!("interrupted during start; nodes were killed"),
    };
    let group = tn.group_id()?.to_owned();
    let last = tn.nodes.len() - 1;
    out(&format!(
        "testnet up: {} nodes in {}\n\
         group {group}\n\
         manifest {}\n\
         talk to any node, e.g.:\n  \
         kith --data-dir {} send {} hello\n  \
         kith --data-dir {} history {}\n\
         status: kith-testnet status --dir {}\n\
         stop:   Ctrl-C here, or kith-testnet down --dir {}\n",
        tn.nodes.len(),
        tn.dir.display(),
        tn.dir.join(kith_testnet::manifest::FILE_NAME).display(),
        tn.nodes[last].dir.display(),
        &group[..8],
        tn.nodes[0].dir.display(),
        &group[..8],
        tn.dir.display(),
        tn.dir.display(),
    ))?;
    let stop = async {
        match duration {
            Some(d) => tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = interrupted() => {}
            },
            None => interrupted().await,
        }
    };
    stop.await;
    tn.progress.line("stopping");
    let summary = tn.shutdown().await;
    out(&format!(
        "stopped {} nodes ({} needed SIGKILL)\n",
        summary.stopped.len() + summary.killed.len(),
        summary.killed.len()
    ))?;
    if !summary.left_running.is_empty() {
        return Err(anyhow::anyhow!("still running: {:?}", summary.left_running))
            .context("stopping the testnet");
    }
    Ok(ExitCode::SUCCESS)
}
