//! Processes on this machine, through `/proc` and signals (Linux).
//!
//! The launcher signals only processes it can prove are the `kith` node it started: the
//! command line in `/proc/<pid>/cmdline` must run `kith … run` on that node's data directory.
//! A pid recorded in an old `testnet.json` may have been reused by anything since.

use std::path::Path;

use rustix::process::{Pid, Signal};

/// A signal the launcher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM: ask to stop cleanly.
    Term,
    /// SIGKILL: stop now (a crash, as far as the node can tell).
    Kill,
}

/// Sends `sig` to `pid`. An error means the process does not exist (or is not ours).
pub fn signal(pid: u32, sig: Sig) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid pid"))?;
    let sig = match sig {
        Sig::Term => Signal::TERM,
        Sig::Kill => Signal::KILL,
    };
    rustix::process::kill_process(pid, sig).map_err(std::io::Error::from)
}

/// The state letter and the fields after the command name of `/proc/<pid>/stat`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether `pid` is a running process (present in `/proc` and not a zombie).
pub fn is_alive(pid: u32) -> bool {
    match stat_fields(pid) {
        Some(fields) => fields
            .first()
            .is_some_and(|state| state != "Z" && state != "X"),
        None => false,
    }
}

/// The command line of `pid`, one string per argument.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `args` is `kith --data-dir <data_dir> run …` (the program's file name is `kith`).
pub fn is_kith_node_cmdline(args: &[String], data_dir: &Path) -> bool {
    let Some(program) = args.first() else {
        return false;
    };
    if Path::new(program).file_name().and_then(|n| n.to_str()) != Some("kith") {
        return false;
    }
    let dir = data_dir.to_string_lossy();
    let has_dir = args
        .windows(2)
        .any(|w| w[0] == "--data-dir" && w[1] == dir.as_ref())
        || args.iter().any(|a| a == &format!("--data-dir={dir}"));
    has_dir && args.iter().any(|a| a == "run")
}

/// Whether `pid` is a live `kith run` on `data_dir`.
pub fn is_kith_node(pid: u32, data_dir: &Path) -> bool {
    is_alive(pid) && cmdline(pid).is_some_and(|args| is_kith_node_cmdline(&args, data_dir))
}

/// Whether `pid` is a live `kith-testnet` process (a launcher).
pub fn is_launcher(pid: u32) -> bool {
    is_alive(pid)
        && cmdline(pid).is_some_and(|args| {
            args.first().is_some_and(|p| {
                Path::new(p).file_name().and_then(|n| n.to_str()) == Some("kith-testnet")
            })
        })
}

/// CPU time and memory of one process.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcStats {
    /// User plus system CPU time in seconds (`utime + stime` over the clock tick rate).
    pub cpu_secs: f64,
    /// Peak resident set size in KiB (`VmHWM`).
    pub peak_rss_kib: u64,
    /// Current resident set size in KiB (`VmRSS`).
    pub rss_kib: u64,
}

/// Clock ticks per second, the unit of `utime`/`stime` in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// Reads [`ProcStats`] of `pid`; `None` if it is gone or `/proc` looks unfamiliar.
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let fields = stat_fields(pid)?;
    // After the command name: field 3 (state) is index 0, so utime (14) is 11, stime (15) 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    let ticks = clock_ticks_per_second().max(1);
    Some(ProcStats {
        cpu_secs: (utime + stime) as f64 / ticks as f64,
        peak_rss_kib: kib("VmHWM:")?,
        rss_kib: kib("VmRSS:")?,
    })
}

/// User plus system CPU time of `pid` so far, in seconds: `utime + stime` of
/// `/proc/<pid>/stat` over [`clock_ticks_per_second`] (so in steps of one tick, 10 ms on
/// most kernels). Threads are included, children are not. Sum it over several processes
/// (e.g. the `kith` nodes of a bench) before and after a measured window.
pub fn process_cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    cpu_seconds_of_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no utime/stime fields"),
        )
    })
}

/// `utime + stime` in seconds from the text of a `/proc/<pid>/stat`.
fn cpu_seconds_of_stat(text: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let mut rest = text[text.rfind(')')? + 1..].split_whitespace();
    // After the command name: field 3 (state) comes first, so utime (14) is the 12th.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second().max(1) as f64)
}

/// User plus system CPU time of this process so far (all its threads), in seconds, from
/// `CLOCK_PROCESS_CPUTIME_ID`: nanosecond resolution, unlike [`process_cpu_seconds`].
pub fn self_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_kith_node_command_line() {
        let args: Vec<String> = [
            "/t/debug/kith",
            "--data-dir",
            "/r/node-001",
            "run",
            "--no-mdns",
        ]
        .map(String::from)
        .into();
        assert!(is_kith_node_cmdline(&args, Path::new("/r/node-001")));
        assert!(!is_kith_node_cmdline(&args, Path::new("/r/node-002")));
        let other: Vec<String> = ["/bin/sleep", "--data-dir", "/r/node-001", "run"]
            .map(String::from)
            .into();
        assert!(!is_kith_node_cmdline(&other, Path::new("/r/node-001")));
        let not_run: Vec<String> = ["kith", "--data-dir", "/r/node-001", "status"]
            .map(String::from)
            .into();
        assert!(!is_kith_node_cmdline(&not_run, Path::new("/r/node-001")));
        assert!(!is_kith_node_cmdline(&[], Path::new("/r")));
    }

    #[test]
    fn splits_the_cpu_of_its_own_threads_by_name() {
        let me = std::process::id();
        // A thread named like the node's network thread burns CPU until its own clock
        // shows it; its time then appears under `net_secs`, while it is still alive.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("kith-net".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(50) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                done_tx.send(x).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        done_rx.recv().unwrap();
        let cpu = thread_cpu(me).unwrap();
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(cpu.net_secs > 0.01, "{cpu:?}");
        assert!(cpu.other_secs > 0.0, "{cpu:?}");
        assert_eq!(cpu.engine_secs, 0.0, "{cpu:?}");
        assert!(thread_cpu(u32::MAX).is_none());
    }

    #[test]
    fn reads_its_own_stats() {
        let me = std::process::id();
        assert!(is_alive(me));
        let s = proc_stats(me).unwrap();
        assert!(s.peak_rss_kib > 0 && s.peak_rss_kib >= s.rss_kib);
        assert!(s.cpu_secs >= 0.0);
        assert!(clock_ticks_per_second() > 0);
        assert!(!is_kith_node(me, Path::new("/nowhere")));
    }

    #[test]
    fn a_missing_pid_is_not_alive() {
        // Pids are below 2^22 on Linux.
        assert!(!is_alive(u32::MAX - 1));
        assert!(proc_stats(u32::MAX - 1).is_none());
        assert!(signal(u32::MAX, Sig::Term).is_err());
        assert!(process_cpu_seconds(u32::MAX - 1).is_err());
    }

    #[test]
    fn cpu_seconds_of_this_process_grow_with_work() {
        let me = std::process::id();
        let before = self_cpu_seconds();
        let from_proc = process_cpu_seconds(me).unwrap();
        // Burn a little CPU, then both clocks must have moved forward.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = self_cpu_seconds();
        assert!(after > before, "{before} -> {after}");
        assert!(process_cpu_seconds(me).unwrap() >= from_proc);
        // /proc counts in ticks and may lag the clock by up to one, never lead it by much.
        assert!(process_cpu_seconds(me).unwrap() <= after + 0.05);
    }

    #[test]
    fn parses_utime_and_stime_after_an_odd_command_name() {
        let ticks = clock_ticks_per_second() as f64;
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0 1 0 0";
        let secs = cpu_seconds_of_stat(stat).unwrap();
        assert!((secs - 300.0 / ticks).abs() < 1e-9, "{secs}");
        assert!(cpu_seconds_of_stat("42 (x) S 1 2").is_none());
    }
}

/// CPU time of one process's live threads, by the part of the node they run (the threads'
/// names, set by the node: `kith-engine`, `kith-net`; everything else is the async runtime
/// and its helpers). Seconds of `/proc/<pid>/task/<tid>/schedstat` (time on a CPU, in ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThreadCpu {
    /// Threads named `kith-engine` (the engine, and unnamed threads it started).
    pub engine_secs: f64,
    /// The `kith-net` thread: the swarm, every connection, gossipsub, the DHT.
    pub net_secs: f64,
    /// Every other live thread: the async runtime (API, event streams, timers, files).
    pub other_secs: f64,
}

/// Reads [`ThreadCpu`] of `pid`; `None` if it is gone. A thread that ended between two
/// readings drops out of its group (its time stays in the process total).
pub fn thread_cpu(pid: u32) -> Option<ThreadCpu> {
    let mut out = ThreadCpu::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(ns) = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        let secs = ns as f64 / 1e9;
        match comm.trim_end() {
            "kith-engine" => out.engine_secs += secs,
            "kith-net" => out.net_secs += secs,
            _ => out.other_secs += secs,
        }
    }
    Some(out)
}
