//! `kith-testnet stream-bench`: the raw throughput of one libp2p stream on loopback, the
//! baseline that file transfer's throughput is set against (as a ratio), and the measuring
//! helpers ([`Meter`], [`Throughput`]) the file bench reuses.
//!
//! Two swarms are built in this process with the transport stack of Kith's node
//! (`node/src/net.rs`, `build_swarm`): TCP with `nodelay(true)`, Noise, Yamux's default
//! configuration, and QUIC beside it, the same idle connection timeout. Only the behaviour
//! differs: [`libp2p_stream::Behaviour`], which hands out a bare [`libp2p::Stream`]. One
//! listens on 127.0.0.1 port 0, the other dials it; once connected, the dialler opens ONE
//! stream on [`PROTOCOL`] and writes N MiB into it, the listener reads and discards until
//! the end of the stream. The clock and the CPU meter run from the opened stream to the
//! reader's end of stream. Both ends run in this process, so the CPU time is the sender's
//! and the receiver's together (and the swarms' own work, which is part of the cost).

use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, Swarm, noise, tcp, yamux};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::procs::{process_cpu_seconds, self_cpu_seconds};

/// Bytes in one MiB.
pub const MIB: u64 = 1024 * 1024;

/// The dedicated protocol of the measured stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/kith-testnet/stream-bench/1");

/// The default amount pushed through the stream, in MiB.
pub const DEFAULT_MIB: u64 = 256;

/// The largest amount accepted, in MiB (64 GiB).
pub const MAX_MIB: u64 = 65_536;

/// Size of each write: one file chunk (256 KiB), as the file transfer sends them.
const WRITE_SIZE: usize = 256 * 1024;
/// Size of each read.
const READ_SIZE: usize = 64 * 1024;
/// How long listening, connecting and opening the stream may each take.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// The node's idle connection timeout (`IDLE_CONNECTION_TIMEOUT` in node/src/net.rs).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);

/// The transport the stream runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP (`nodelay`), Noise, Yamux: Kith's TCP path.
    Tcp,
    /// QUIC (v1, libp2p's default configuration).
    Quic,
}

impl Transport {
    /// The stack, as printed: `tcp+noise+yamux` or `quic`.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp+noise+yamux",
            Transport::Quic => "quic",
        }
    }

    /// The loopback address to listen on, port 0.
    fn listen_addr(self) -> Multiaddr {
        let addr = Multiaddr::empty().with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST));
        match self {
            Transport::Tcp => addr.with(Protocol::Tcp(0)),
            Transport::Quic => addr.with(Protocol::Udp(0)).with(Protocol::QuicV1),
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            _ => Err(format!("unknown transport {s:?} (tcp or quic)")),
        }
    }
}

/// Settings of one raw-stream measurement.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// MiB to push through the stream (1 to [`MAX_MIB`]).
    pub mib: u64,
    /// The transport.
    pub transport: Transport,
    /// How long the transfer itself may take before it fails.
    pub timeout: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            mib: DEFAULT_MIB,
            transport: Transport::Tcp,
            timeout: Duration::from_secs(600),
        }
    }
}

/// Why a raw-stream measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamBenchError {
    /// An option is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A swarm could not be built, listen or connect.
    #[error("{what}: {message}")]
    Swarm {
        /// What was being done.
        what: &'static str,
        /// The libp2p error.
        message: String,
    },
    /// The stream could not be opened, written or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A step ran out of time.
    #[error("timed out after {secs:.0} s {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit, in seconds.
        secs: f64,
    },
    /// The reader's count differs from what was written.
    #[error("the reader got {got} bytes of {expected}")]
    Short {
        /// Bytes written.
        expected: u64,
        /// Bytes read.
        got: u64,
    },
}

/// Wall time, CPU time and bytes of one measured window, and the rates derived from them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    /// Useful bytes moved.
    pub bytes: u64,
    /// Wall time of the window, seconds.
    pub wall_secs: f64,
    /// CPU time (user + system) spent in the window by the measured processes, seconds.
    pub cpu_secs: f64,
    /// `bytes` in MiB over `wall_secs`.
    pub mib_per_sec: f64,
    /// `cpu_secs` over `bytes` in MiB.
    pub cpu_secs_per_mib: f64,
}

impl Throughput {
    /// The figures of `bytes` moved in `wall_secs` for `cpu_secs` of CPU. A zero duration
    /// or amount gives rates of 0, not infinities.
    pub fn new(bytes: u64, wall_secs: f64, cpu_secs: f64) -> Self {
        let mib = bytes as f64 / MIB as f64;
        Throughput {
            bytes,
            wall_secs,
            cpu_secs,
            mib_per_sec: if wall_secs > 0.0 {
                mib / wall_secs
            } else {
                0.0
            },
            cpu_secs_per_mib: if mib > 0.0 { cpu_secs / mib } else { 0.0 },
        }
    }

    /// This throughput as a fraction of `baseline`'s (e.g. file transfer over the raw
    /// stream: 0.5 means half the raw stream's MiB/s); 0 when the baseline moved nothing.
    pub fn ratio_to(&self, baseline: &Throughput) -> f64 {
        if baseline.mib_per_sec > 0.0 {
            self.mib_per_sec / baseline.mib_per_sec
        } else {
            0.0
        }
    }
}

/// Whose CPU time a [`Meter`] counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuOf {
    /// This process, all threads ([`self_cpu_seconds`], nanosecond resolution).
    ThisProcess,
    /// The sum over these processes ([`process_cpu_seconds`], clock-tick resolution): e.g.
    /// the pids of the `kith` nodes taking part in a file transfer. Each must still be
    /// running when the meter finishes.
    Pids(Vec<u32>),
}

impl CpuOf {
    /// The CPU seconds so far.
    fn read(&self) -> io::Result<f64> {
        match self {
            CpuOf::ThisProcess => Ok(self_cpu_seconds()),
            CpuOf::Pids(pids) => pids.iter().map(|p| process_cpu_seconds(*p)).sum(),
        }
    }
}

/// A stopwatch for wall and CPU time: [`Meter::start`] before the measured window,
/// [`Meter::finish`] after it with the bytes moved.
#[derive(Debug, Clone)]
pub struct Meter {
    of: CpuOf,
    wall0: Instant,
    cpu0: f64,
}

impl Meter {
    /// Reads the clocks now. Fails if a process of [`CpuOf::Pids`] cannot be read.
    pub fn start(of: CpuOf) -> io::Result<Self> {
        let cpu0 = of.read()?;
        Ok(Meter {
            of,
            wall0: Instant::now(),
            cpu0,
        })
    }

    /// The figures of the window from [`Meter::start`] to now, in which `bytes` moved.
    pub fn finish(&self, bytes: u64) -> io::Result<Throughput> {
        let wall = self.wall0.elapsed().as_secs_f64();
        let cpu = self.of.read()? - self.cpu0;
        Ok(Throughput::new(bytes, wall, cpu.max(0.0)))
    }
}

/// The result of [`raw_stream`].
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    /// The transport.
    pub transport: Transport,
    /// The stack, e.g. `tcp+noise+yamux`.
    pub stack: &'static str,
    /// MiB asked for.
    pub mib: u64,
    /// Bytes, wall and CPU time and rates; the CPU is the whole process: sender, receiver
    /// and both swarms.
    #[serde(flatten)]
    pub throughput: Throughput,
}

/// The one-line summary of `f`, e.g. `raw libp2p stream (tcp+noise+yamux, loopback): 256
/// MiB in 1.23 s = 208.1 MiB/s, CPU 0.0061 s/MiB (both ends)`.
pub fn render(f: &StreamFigures) -> String {
    format!(
        "raw libp2p stream ({}, loopback): {} MiB in {:.2} s = {:.1} MiB/s, CPU {:.4} s/MiB (both ends)\n",
        f.stack,
        f.mib,
        f.throughput.wall_secs,
        f.throughput.mib_per_sec,
        f.throughput.cpu_secs_per_mib
    )
}

/// What a swarm's driver reports to [`raw_stream`].
enum Report {
    Listening(Multiaddr),
    Connected,
    Failed(String),
}

type StreamSwarm = Swarm<libp2p_stream::Behaviour>;

/// A swarm with the node's transports and [`libp2p_stream::Behaviour`].
fn build() -> Result<StreamSwarm, StreamBenchError> {
    let err = |message: String| StreamBenchError::Swarm {
        what: "building a swarm",
        message,
    };
    let swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(e.to_string()))?
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .map_err(|e| err(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

/// Polls `swarm` until the task is aborted, reporting what [`raw_stream`] waits for.
async fn drive(mut swarm: StreamSwarm, reports: mpsc::UnboundedSender<Report>) {
    loop {
        let report = match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => Report::Listening(address),
            SwarmEvent::ConnectionEstablished { .. } => Report::Connected,
            SwarmEvent::OutgoingConnectionError { error, .. } => Report::Failed(error.to_string()),
            SwarmEvent::ListenerError { error, .. } => Report::Failed(error.to_string()),
            SwarmEvent::ConnectionClosed {
                cause: Some(cause), ..
            } => Report::Failed(format!("connection closed: {cause}")),
            _ => continue,
        };
        // Nobody listening any more is fine: the measurement is over.
        let _ = reports.send(report);
    }
}

/// Aborts the swarm drivers when the measurement ends, however it ends.
struct Drivers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Drivers {
    fn drop(&mut self) {
        for d in &self.0 {
            d.abort();
        }
    }
}

/// Waits up to [`SETUP_LIMIT`] for the report `want` picks out.
async fn wait_for<T>(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    what: &'static str,
    mut want: impl FnMut(Report) -> Option<T>,
) -> Result<T, StreamBenchError> {
    let wait = async {
        while let Some(r) = reports.recv().await {
            if let Report::Failed(message) = r {
                return Err(StreamBenchError::Swarm { what, message });
            }
            if let Some(v) = want(r) {
                return Ok(v);
            }
        }
        Err(StreamBenchError::Swarm {
            what,
            message: "the swarm stopped".to_owned(),
        })
    };
    tokio::time::timeout(SETUP_LIMIT, wait)
        .await
        .map_err(|_| StreamBenchError::Timeout {
            what,
            secs: SETUP_LIMIT.as_secs_f64(),
        })?
}

/// Pushes `opts.mib` MiB through one libp2p stream between two swarms of this process on
/// loopback and measures wall and CPU time (see the module documentation). Must run on a
/// multi-threaded Tokio runtime for both ends to use both cores.
pub async fn raw_stream(opts: &StreamOptions) -> Result<StreamFigures, StreamBenchError> {
    if !(1..=MAX_MIB).contains(&opts.mib) {
        return Err(StreamBenchError::Invalid(format!(
            "--mib must be 1 to {MAX_MIB}"
        )));
    }
    let expected = opts.mib * MIB;

    let mut listener = build()?;
    let mut dialler = build()?;
    let listener_id = *listener.local_peer_id();
    let mut incoming = listener
        .behaviour()
        .new_control()
        .accept(PROTOCOL)
        .map_err(|e| StreamBenchError::Swarm {
            what: "accepting the bench protocol",
            message: e.to_string(),
        })?;
    let mut control = dialler.behaviour().new_control();

    listener
        .listen_on(opts.transport.listen_addr())
        .map_err(|e| StreamBenchError::Swarm {
            what: "listening on 127.0.0.1",
            message: e.to_string(),
        })?;
    let (listener_tx, mut listener_rx) = mpsc::unbounded_channel();
    let mut drivers = Drivers(vec![tokio::spawn(drive(listener, listener_tx))]);
    let addr = wait_for(&mut listener_rx, "listening on 127.0.0.1", |r| match r {
        Report::Listening(a) => Some(a),
        _ => None,
    })
    .await?;

    dialler
        .dial(addr.clone().with(Protocol::P2p(listener_id)))
        .map_err(|e| StreamBenchError::Swarm {
            what: "dialling the listener",
            message: e.to_string(),
        })?;
    let (dialler_tx, mut dialler_rx) = mpsc::unbounded_channel();
    drivers.0.push(tokio::spawn(drive(dialler, dialler_tx)));
    wait_for(&mut dialler_rx, "connecting to the listener", |r| {
        matches!(r, Report::Connected).then_some(())
    })
    .await?;

    // The reader: take the one stream, count and discard to its end.
    let reader = tokio::spawn(async move {
        let Some((_, mut stream)) = incoming.next().await else {
            return Err(io::Error::other("no inbound stream"));
        };
        let mut buf = vec![0u8; READ_SIZE];
        let mut got = 0u64;
        loop {
            match stream.read(&mut buf).await? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let aborts_reader = reader.abort_handle();

    let mut stream = tokio::time::timeout(SETUP_LIMIT, control.open_stream(listener_id, PROTOCOL))
        .await
        .map_err(|_| StreamBenchError::Timeout {
            what: "opening the stream",
            secs: SETUP_LIMIT.as_secs_f64(),
        })?
        .map_err(|e| StreamBenchError::Io {
            what: "opening the stream",
            source: io::Error::other(e.to_string()),
        })?;

    let meter = Meter::start(CpuOf::ThisProcess).map_err(|source| StreamBenchError::Io {
        what: "reading the CPU time",
        source,
    })?;
    let transfer = async {
        let chunk = vec![0x5au8; WRITE_SIZE];
        let mut left = expected;
        while left > 0 {
            let n = left.min(WRITE_SIZE as u64) as usize;
            stream
                .write_all(&chunk[..n])
                .await
                .map_err(|source| StreamBenchError::Io {
                    what: "writing the stream",
                    source,
                })?;
            left -= n as u64;
        }
        stream
            .close()
            .await
            .map_err(|source| StreamBenchError::Io {
                what: "closing the stream",
                source,
            })?;
        reader
            .await
            .map_err(|e| StreamBenchError::Io {
                what: "reading the stream",
                source: io::Error::other(e.to_string()),
            })?
            .map_err(|source| StreamBenchError::Io {
                what: "reading the stream",
                source,
            })
    };
    let got = match tokio::time::timeout(opts.timeout, transfer).await {
        Ok(got) => got?,
        Err(_) => {
            aborts_reader.abort();
            return Err(StreamBenchError::Timeout {
                what: "pushing the bytes through",
                secs: opts.timeout.as_secs_f64(),
            });
        }
    };
    let throughput = meter.finish(got).map_err(|source| StreamBenchError::Io {
        what: "reading the CPU time",
        source,
    })?;
    drop(drivers);
    if got != expected {
        return Err(StreamBenchError::Short { expected, got });
    }
    Ok(StreamFigures {
        transport: opts.transport,
        stack: opts.transport.label(),
        mib: opts.mib,
        throughput,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn throughput_rates_and_ratio() {
        let t = Throughput::new(512 * MIB, 2.0, 1.0);
        assert_eq!(t.mib_per_sec, 256.0);
        assert_eq!(t.cpu_secs_per_mib, 1.0 / 512.0);
        let half = Throughput::new(256 * MIB, 2.0, 1.0);
        assert_eq!(half.ratio_to(&t), 0.5);
        let none = Throughput::new(0, 0.0, 0.0);
        assert_eq!((none.mib_per_sec, none.cpu_secs_per_mib), (0.0, 0.0));
        assert_eq!(t.ratio_to(&none), 0.0);
    }

    #[test]
    fn a_meter_over_pids_sums_them_and_fails_on_a_missing_one() {
        let me = std::process::id();
        let m = Meter::start(CpuOf::Pids(vec![me, me])).unwrap();
        let t = m.finish(MIB).unwrap();
        assert!(t.cpu_secs >= 0.0 && t.bytes == MIB);
        assert!(Meter::start(CpuOf::Pids(vec![u32::MAX - 1])).is_err());
    }

    #[test]
    fn renders_one_line() {
        let f = StreamFigures {
            transport: Transport::Tcp,
            stack: Transport::Tcp.label(),
            mib: 256,
            throughput: Throughput::new(256 * MIB, 1.25, 1.5),
        };
        assert_eq!(
            render(&f),
            "raw libp2p stream (tcp+noise+yamux, loopback): 256 MiB in 1.25 s = 204.8 MiB/s, \
             CPU 0.0059 s/MiB (both ends)\n"
        );
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["transport"], "tcp");
        assert_eq!(json["bytes"], 256 * MIB);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_zero_mib() {
        let opts = StreamOptions {
            mib: 0,
            ..StreamOptions::default()
        };
        assert!(matches!(
            raw_stream(&opts).await,
            Err(StreamBenchError::Invalid(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quic_moves_exactly_the_bytes() {
        let opts = StreamOptions {
            mib: 8,
            transport: Transport::Quic,
            timeout: Duration::from_secs(120),
        };
        let f = tokio::time::timeout(Duration::from_secs(180), raw_stream(&opts))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.throughput.bytes, 8 * MIB);
        assert_eq!(f.stack, "quic");
        assert!(f.throughput.wall_secs > 0.0 && f.throughput.cpu_secs > 0.0);
    }
}
