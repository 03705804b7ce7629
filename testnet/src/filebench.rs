//! `kith-testnet file-bench`: file throughput between real `kith` processes on loopback.
//!
//! One testnet (node 0 sends, the others receive); for each receiver count, node 0 sends a
//! fresh file of pseudo-random bytes, the receivers start fetching it at the same moment,
//! and the bench measures the time until the last one holds it in full, and the CPU seconds
//! all nodes spent meanwhile (from `/proc`). Figures are per MiB *delivered* (file size ×
//! receivers). The same run first measures one raw libp2p stream over TCP and over QUIC
//! ([`crate::streambench::raw_stream`]), and each row is reported as a ratio of it.

use std::path::Path;
use std::time::{Duration, Instant};

use kith_client::model::{FileStatus, MessageBody};
use serde::Serialize;

use crate::launcher::{Testnet, UpOptions, within};
use crate::streambench::{self, StreamFigures, StreamOptions, Transport};
use crate::{Result, TestnetError, procs};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FileBenchOptions {
    /// The testnet (its `nodes` is raised to the largest receiver count + 1).
    pub up: UpOptions,
    /// File size in MiB.
    pub mib: u64,
    /// Receiver counts, one row each (e.g. 1 and 5).
    pub receivers: Vec<usize>,
    /// Seed of the file contents.
    pub seed: u64,
}

/// One measured transfer.
#[derive(Debug, Clone, Serialize)]
pub struct FileBenchRow {
    /// Receivers fetching at once.
    pub receivers: usize,
    /// File size in MiB.
    pub mib: u64,
    /// From the download requests to the last receiver holding the file, seconds.
    pub secs: f64,
    /// MiB per second each receiver got (size / time).
    pub per_receiver_mib_s: f64,
    /// MiB per second delivered in all (size × receivers / time).
    pub total_mib_s: f64,
    /// CPU seconds of every node during the transfer.
    pub cpu_secs: f64,
    /// CPU milliseconds per MiB delivered.
    pub cpu_ms_per_mib: f64,
    /// `total_mib_s` over the raw TCP stream's MiB/s.
    pub vs_raw_tcp: f64,
    /// `cpu_ms_per_mib` over the raw TCP stream's (both ends) CPU ms per MiB.
    pub cpu_vs_raw_tcp: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct FileBenchReport {
    /// One raw libp2p stream over TCP (Noise, Yamux), in this run.
    pub raw_tcp: StreamFigures,
    /// The same over QUIC.
    pub raw_quic: StreamFigures,
    /// The file transfers.
    pub rows: Vec<FileBenchRow>,
}

fn write_file(path: &Path, mib: u64, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity((mib << 20) as usize);
    while (data.len() as u64) < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &data)
        .map_err(|e| TestnetError::io(format!("writing {}", path.display()), e))
}

fn cpu_of(tn: &Testnet) -> f64 {
    tn.nodes
        .iter()
        .filter_map(|n| n.pid.and_then(procs::proc_stats))
        .map(|s| s.cpu_secs)
        .sum()
}

fn node_err(node: usize, e: impl std::fmt::Display) -> TestnetError {
    TestnetError::Node {
        node,
        message: e.to_string(),
    }
}

async fn raw(transport: Transport, mib: u64) -> Result<StreamFigures> {
    streambench::raw_stream(&StreamOptions {
        mib: mib.max(64),
        transport,
        timeout: Duration::from_secs(300),
    })
    .await
    .map_err(|e| TestnetError::Invalid(format!("raw stream: {e}")))
}

/// Runs the bench; stops the testnet it started.
pub async fn file_bench(opts: FileBenchOptions) -> Result<FileBenchReport> {
    let most = opts.receivers.iter().copied().max().unwrap_or(1).max(1);
    if opts.mib == 0 || opts.mib > 4096 {
        return Err(TestnetError::Invalid("--mib must be 1 to 4096".into()));
    }
    let mut up = opts.up.clone();
    up.nodes = up.nodes.max(most + 1);
    let raw_tcp = raw(Transport::Tcp, opts.mib).await?;
    let raw_quic = raw(Transport::Quic, opts.mib).await?;
    let mut tn = Testnet::up(up).await?;
    let result = measure(&tn, &opts, &raw_tcp).await;
    tn.shutdown().await;
    Ok(FileBenchReport {
        raw_tcp,
        raw_quic,
        rows: result?,
    })
}

async fn measure(
    tn: &Testnet,
    opts: &FileBenchOptions,
    raw_tcp: &StreamFigures,
) -> Result<Vec<FileBenchRow>> {
    let group = tn.group_id()?.to_owned();
    let mut rows = Vec::new();
    for (round, &r) in opts.receivers.iter().enumerate() {
        let path = tn.dir.join(format!("bench-file-{round}.bin"));
        write_file(&path, opts.mib, opts.seed.wrapping_add(round as u64))?;
        let sender = tn.nodes[0].client()?;
        let sent = sender
            .send_file(&group, &path, "bench.bin", None)
            .await
            .map_err(|e| node_err(0, e))?;
        let _ = std::fs::remove_file(&path);
        let receivers: Vec<usize> = (1..=r).collect();
        // Everyone has the message before the clock starts.
        for &i in &receivers {
            let c = tn.nodes[i].client()?;
            within(
                Duration::from_secs(60),
                || format!("node {i} to get the file message"),
                async {
                    loop {
                        if c.message(&group, &sent.id).await.is_ok() {
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            )
            .await?;
        }
        let cpu0 = cpu_of(tn);
        let t0 = Instant::now();
        for &i in &receivers {
            tn.nodes[i]
                .client()?
                .download(&group, &sent.id)
                .await
                .map_err(|e| node_err(i, e))?;
        }
        let limit = Duration::from_secs(60 + opts.mib * r as u64);
        for &i in &receivers {
            let c = tn.nodes[i].client()?;
            within(limit, || format!("node {i} to download the file"), async {
                loop {
                    let m = c
                        .message(&group, &sent.id)
                        .await
                        .map_err(|e| node_err(i, e))?;
                    if let MessageBody::File { file } = &m.body
                        && file.state.status == FileStatus::Complete
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (cpu_of(tn) - cpu0).max(0.0);
        let delivered = (opts.mib * r as u64) as f64;
        let raw_cpu_ms = raw_tcp.throughput.cpu_secs_per_mib * 1000.0;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        rows.push(FileBenchRow {
            vs_raw_tcp: ratio(delivered / secs, raw_tcp.throughput.mib_per_sec),
            cpu_vs_raw_tcp: ratio(cpu * 1000.0 / delivered, raw_cpu_ms),
            receivers: r,
            mib: opts.mib,
            secs,
            per_receiver_mib_s: opts.mib as f64 / secs,
            total_mib_s: delivered / secs,
            cpu_secs: cpu,
            cpu_ms_per_mib: cpu * 1000.0 / delivered,
        });
    }
    Ok(rows)
}

/// The report as text: the raw streams, then a table of the transfers.
pub fn render(r: &FileBenchReport) -> String {
    let mut out = streambench::render(&r.raw_tcp);
    out.push_str(&streambench::render(&r.raw_quic));
    out.push_str(
        "receivers  file MiB  time s  MiB/s each  MiB/s total  vs raw tcp  CPU s  CPU ms/MiB  vs raw tcp\n",
    );
    for row in &r.rows {
        out.push_str(&format!(
            "{:>9}  {:>8}  {:>6.2}  {:>10.1}  {:>11.1}  {:>9.2}x  {:>5.2}  {:>10.2}  {:>9.1}x\n",
            row.receivers,
            row.mib,
            row.secs,
            row.per_receiver_mib_s,
            row.total_mib_s,
            row.vs_raw_tcp,
            row.cpu_secs,
            row.cpu_ms_per_mib,
            row.cpu_vs_raw_tcp,
        ));
    }
    out
}
