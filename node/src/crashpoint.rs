//! Named crash points for the crash tests: `KITH_CRASH_AT=POINT:N` makes the node abort
//! (like SIGKILL: no destructor, no flush) the `N`th time the engine passes `POINT`, so a
//! test can crash a real `kith` process at an exact place of ingest, sync, commit, send or
//! flush instead of only at a random time from outside.
//!
//! The variable is read once, when the node starts; unset (the normal case), every point
//! costs one load of an initialised `OnceLock`. A malformed value stops the start.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub use kith_client::crashpoint::{ENV, Point};

/// Why [`ENV`] could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrashPointError {
    /// The value is not `POINT:N` with a known point and `N` ≥ 1.
    #[error(
        "{ENV}={value:?} is not POINT:N (POINT one of ingest, sync, commit, send, flush; N a whole number from 1); unset it to run normally"
    )]
    Malformed {
        /// The value found (at most 64 characters of it).
        value: String,
    },
}

/// An armed point and how often it was passed.
#[derive(Debug)]
struct Armed {
    point: Point,
    at: u64,
    passes: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Parses `POINT:N`.
pub fn parse(value: &str) -> Result<(Point, u64), CrashPointError> {
    let malformed = || CrashPointError::Malformed {
        value: value.chars().take(64).collect(),
    };
    let (name, count) = value.trim().split_once(':').ok_or_else(malformed)?;
    let point = Point::from_name(name.trim()).ok_or_else(malformed)?;
    match count.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok((point, n)),
        _ => Err(malformed()),
    }
}

/// Reads [`ENV`] (the first call in a process decides; later calls return the same) and
/// arms the point it names. Returns the armed point, if any.
pub fn arm_from_env() -> Result<Option<(Point, u64)>, CrashPointError> {
    let parsed = match std::env::var(ENV) {
        Ok(v) if v.trim().is_empty() => None,
        Ok(v) => Some(parse(&v)?),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(CrashPointError::Malformed {
                value: "(not UTF-8)".to_owned(),
            });
        }
    };
    let armed = ARMED.get_or_init(|| {
        parsed.map(|(point, at)| Armed {
            point,
            at,
            passes: AtomicU64::new(0),
        })
    });
    if let Some(a) = armed {
        tracing::warn!(point = %a.point, at = a.at, "crash point armed ({ENV}); this node will abort there");
    }
    Ok(armed.as_ref().map(|a| (a.point, a.at)))
}

/// The engine passes `point`: aborts the process if it is the armed point's `N`th pass.
#[inline]
pub fn reached(point: Point) {
    if let Some(Some(a)) = ARMED.get()
        && a.point == point
    {
        pass(a);
    }
}

/// As [`reached`], counting the pass only if `cond()` holds; `cond` runs only while
/// `point` is armed.
#[inline]
pub fn reached_when(point: Point, cond: impl FnOnce() -> bool) {
    if let Some(Some(a)) = ARMED.get()
        && a.point == point
        && cond()
    {
        pass(a);
    }
}

/// Whether `effects` merge a commit (they announce a new epoch): the test of
/// [`Point::Commit`].
pub fn merges_commit(effects: &[kith_protocol::group::Effect]) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, kith_protocol::group::Effect::EpochChanged { .. }))
}

#[cold]
fn pass(a: &Armed) {
    let n = a.passes.fetch_add(1, Ordering::SeqCst) + 1;
    if n == a.at {
        // stderr is unbuffered: the line is in the node's log before the process is gone.
        eprintln!(
            "kith: crash point {}:{n} reached ({ENV}); aborting",
            a.point
        );
        std::process::abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_counts() {
        assert_eq!(parse("ingest:37"), Ok((Point::Ingest, 37)));
        assert_eq!(parse(" flush : 1 "), Ok((Point::Flush, 1)));
        for p in Point::ALL {
            assert_eq!(Point::from_name(p.name()), Some(p));
            assert_eq!(parse(&format!("{p}:2")), Ok((p, 2)));
        }
        for bad in [
            "",
            "ingest",
            "ingest:",
            "ingest:0",
            "ingest:-1",
            "nowhere:3",
            ":3",
            "sync:x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(500);
        let CrashPointError::Malformed { value } = parse(&long).unwrap_err();
        assert_eq!(value.len(), 64);
    }

    #[test]
    fn an_unarmed_point_does_nothing() {
        // No test sets the variable, so nothing is armed and passing points is harmless.
        if std::env::var_os(ENV).is_none() {
            for p in Point::ALL {
                reached(p);
                reached_when(p, || true);
            }
        }
    }
}
