//! Seeded traffic: at a fixed total rate, a random ready member sends a message of a given
//! size. Sends run concurrently so a slow answer never delays the schedule; every outcome
//! goes to the ledger.

use std::sync::Arc;
use std::time::Duration;

use kith_client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::{Result, TestnetError};
use crate::launcher::{API_TIMEOUT, Shared, now_ms};
use crate::ledger::{SendFailure, Sent};

/// Smallest message size: the header `kt<seq> n<node> ` fits.
pub const MIN_SIZE: usize = 16;
/// Largest message size (the node's limit for a text).
pub const MAX_SIZE: usize = 64 * 1024;
/// Highest total rate.
pub const MAX_RATE: f64 = 10_000.0;
/// Longest traffic run.
pub const MAX_DURATION_SECS: f64 = 24.0 * 3600.0;
/// Sends in flight at most; beyond this a scheduled send is skipped and counted.
pub const MAX_IN_FLIGHT: usize = 512;

/// Characters of the filler text (printable ASCII).
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,";

/// What to send.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficSpec {
    /// Messages per second, all senders together.
    pub rate: f64,
    /// For how long.
    pub duration: Duration,
    /// Bytes per message.
    pub size: usize,
    /// Only these nodes send (default: every ready member).
    pub senders: Option<Vec<usize>>,
}

impl TrafficSpec {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(TestnetError::Invalid(format!(
                "rate must be more than 0 and at most {MAX_RATE} messages/s"
            )));
        }
        let secs = self.duration.as_secs_f64();
        if !(secs > 0.0 && secs <= MAX_DURATION_SECS) {
            return Err(TestnetError::Invalid(format!(
                "duration must be more than 0 and at most {MAX_DURATION_SECS} s"
            )));
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(TestnetError::Invalid(format!(
                "size must be {MIN_SIZE} to {MAX_SIZE} bytes"
            )));
        }
        if self.count() == 0 {
            return Err(TestnetError::Invalid(
                "rate × duration is less than one message".to_owned(),
            ));
        }
        Ok(())
    }

    /// How many messages the run schedules: rate × duration, rounded.
    pub fn count(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }
}

/// What a traffic run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrafficSummary {
    /// Messages scheduled.
    pub scheduled: u64,
    /// Sends attempted.
    pub attempted: u64,
    /// Scheduled sends skipped: no ready sender at that moment.
    pub skipped_no_sender: u64,
    /// Scheduled sends skipped: [`MAX_IN_FLIGHT`] sends were already waiting.
    pub skipped_in_flight: u64,
    /// Largest delay between a send's scheduled time and its start (ms).
    pub max_schedule_lag_ms: u64,
    /// First and last sequence numbers used.
    pub seq_range: Option<(u64, u64)>,
}

/// The text of traffic message `seq` from `sender`: `kt<seq> n<node> ` and random
/// printable filler, `size` bytes long (longer only if the header alone is).
pub fn traffic_text(seq: u64, sender: usize, size: usize, rng: &mut impl Rng) -> String {
    let mut text = format!("kt{seq:08} n{sender:03} ");
    while text.len() < size {
        text.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    text
}

/// Sends `text` from node `sender` and records the outcome under `seq`.
pub async fn send_tracked(
    shared: &Shared,
    client: Client,
    group: String,
    sender: usize,
    seq: u64,
    text: String,
) {
    let start = now_ms();
    let result = tokio::time::timeout(API_TIMEOUT, client.send(&group, &text)).await;
    let end = now_ms();
    let mut st = shared.lock();
    let failure = |error: String| SendFailure {
        seq,
        sender,
        at_ms: start,
        error,
    };
    match result {
        Ok(Ok(m)) => {
            if m.id.len() == 64 && m.id.bytes().all(|b| b.is_ascii_hexdigit()) {
                st.ledger.record_sent(Sent {
                    seq,
                    id: m.id,
                    sender,
                    send_start_ms: start,
                    send_end_ms: end,
                    sent_at_ms: m.sent_at_ms,
                    bytes: text.len(),
                });
            } else {
                st.ledger
                    .record_failure(failure("the node answered a malformed message id".into()));
            }
        }
        Ok(Err(e)) => st.ledger.record_failure(failure(e.to_string())),
        Err(_) => st.ledger.record_failure(failure(format!(
            "no answer within {} s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// Runs `spec` to completion (the schedule, then the last answers).
pub async fn run(shared: Shared, spec: TrafficSpec, seed: u64) -> TrafficSummary {
    let mut rng = StdRng::seed_from_u64(seed);
    let count = spec.count();
    let period = Duration::from_secs_f64(1.0 / spec.rate);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut summary = TrafficSummary {
        scheduled: count,
        ..TrafficSummary::default()
    };
    let start = Instant::now();
    for k in 0..count {
        let due = start + period.mul_f64(k as f64);
        tokio::time::sleep_until(due).await;
        let lag = Instant::now().saturating_duration_since(due).as_millis() as u64;
        summary.max_schedule_lag_ms = summary.max_schedule_lag_ms.max(lag);
        let pick = {
            let mut st = shared.lock();
            let ready: Vec<(usize, Client)> = st
                .senders
                .iter()
                .enumerate()
                .filter(|(i, c)| c.is_some() && spec.senders.as_ref().is_none_or(|s| s.contains(i)))
                .filter_map(|(i, c)| c.clone().map(|c| (i, c)))
                .collect();
            if ready.is_empty() {
                None
            } else {
                let (i, client) = ready[rng.gen_range(0..ready.len())].clone();
                st.next_seq += 1;
                Some((i, client, st.next_seq, st.group.clone()))
            }
        };
        let Some((sender, client, seq, group)) = pick else {
            summary.skipped_no_sender += 1;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            summary.skipped_in_flight += 1;
            continue;
        };
        let text = traffic_text(seq, sender, spec.size, &mut rng);
        summary.attempted += 1;
        summary.seq_range = Some(match summary.seq_range {
            Some((first, _)) => (first, seq),
            None => (seq, seq),
        });
        let shared = shared.clone();
        tasks.spawn(async move {
            send_tracked(&shared, client, group, sender, seq, text).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    {
        let mut st = shared.lock();
        st.ledger.skipped += summary.skipped_in_flight + summary.skipped_no_sender;
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_have_the_size_and_are_reproducible() {
        let mut a = StdRng::seed_from_u64(9);
        let mut b = StdRng::seed_from_u64(9);
        let t = traffic_text(12, 3, 200, &mut a);
        assert_eq!(t.len(), 200);
        assert!(t.starts_with("kt00000012 n003 "));
        assert!(t.bytes().all(|c| (0x20..0x7f).contains(&c)));
        assert_eq!(t, traffic_text(12, 3, 200, &mut b));
        // The header is never cut.
        assert_eq!(traffic_text(1, 1, 1, &mut a), "kt00000001 n001 ");
    }

    #[test]
    fn specs_are_checked() {
        let ok = TrafficSpec {
            rate: 10.0,
            duration: Duration::from_secs(3),
            size: 100,
            senders: None,
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.count(), 30);
        for bad in [
            TrafficSpec {
                rate: 0.0,
                ..ok.clone()
            },
            TrafficSpec {
                rate: f64::NAN,
                ..ok.clone()
            },
            TrafficSpec {
                size: 8,
                ..ok.clone()
            },
            TrafficSpec {
                size: MAX_SIZE + 1,
                ..ok.clone()
            },
            TrafficSpec {
                rate: 0.1,
                duration: Duration::from_secs(1),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}

/// Largest burst.
pub const MAX_BURST: u64 = 100_000;

/// What a burst did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BurstSummary {
    /// Messages the nodes accepted.
    pub sent: u64,
    /// Sends that failed (listed in the ledger's failures).
    pub failed: u64,
    /// Wall time of the burst.
    pub secs: f64,
}

/// Sends `count` tracked messages of `size` bytes as fast as the senders' APIs accept them:
/// the messages are dealt round-robin to `senders` (default: every ready member), and each
/// sender sends its share one after the other while the senders run in parallel. Returns
/// once every send has been answered.
pub async fn burst(
    shared: &Shared,
    count: u64,
    size: usize,
    senders: Option<&[usize]>,
    seed: u64,
) -> Result<BurstSummary> {
    let (group, clients) = {
        let st = shared.lock();
        let ready: Vec<(usize, Client)> = st
            .senders
            .iter()
            .enumerate()
            .filter(|(i, _)| senders.is_none_or(|s| s.contains(i)))
            .filter_map(|(i, c)| c.clone().map(|c| (i, c)))
            .collect();
        (st.group.clone(), ready)
    };
    if clients.is_empty() {
        return Err(TestnetError::Invalid(
            "no ready member to send the burst".to_owned(),
        ));
    }
    let first_seq = {
        let mut st = shared.lock();
        let first = st.next_seq + 1;
        st.next_seq += count;
        first
    };
    let failures_before = shared.lock().ledger.failures.len();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let n = clients.len() as u64;
    for (k, (sender, client)) in clients.into_iter().enumerate() {
        let shared = shared.clone();
        let group = group.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(k as u64));
        tasks.spawn(async move {
            let mut seq = first_seq + k as u64;
            while seq < first_seq + count {
                let text = traffic_text(seq, sender, size, &mut rng);
                send_tracked(&shared, client.clone(), group.clone(), sender, seq, text).await;
                seq += n;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = (shared.lock().ledger.failures.len() - failures_before) as u64;
    Ok(BurstSummary {
        sent: count - failed.min(count),
        failed,
        secs: start.elapsed().as_secs_f64(),
    })
}
