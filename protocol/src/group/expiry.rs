//! Deleting past epochs' secrets a bounded time after each epoch *ended*.
//!
//! openmls stamps an epoch's secrets when they are created, so its time-based deletion
//! measures an epoch's age from its start: an epoch that lasted longer than the window is
//! deleted the moment the group leaves it, and a message a member sent in it a second
//! before the commit (or while it had not heard of the commit yet) can no longer be read.
//! Kith keeps its own record of when this node left each past epoch, and only ever asks
//! openmls to keep the newest `k` past epochs.

use std::time::{Duration, SystemTime};

use openmls::prelude::PastEpochDeletion;
use openmls_traits::OpenMlsProvider;

use super::{GroupEngine, GroupError, MAX_PAST_EPOCHS, mls_err};
use crate::fork::{self, GroupRecords};
use crate::ids::GroupId;

/// When this node left each past epoch it still holds secrets for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct EpochEnds {
    /// Every epoch below this one has been noted (as ended, or already deleted).
    noted_below: u64,
    /// (epoch, when this node noticed it had left it, ms), oldest first.
    ends: Vec<(u64, u64)>,
}

fn ends_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"epoch-ends", group, &[])
}

impl EpochEnds {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 16 * self.ends.len());
        out.extend_from_slice(&self.noted_below.to_be_bytes());
        for (e, at) in &self.ends {
            out.extend_from_slice(&e.to_be_bytes());
            out.extend_from_slice(&at.to_be_bytes());
        }
        out
    }

    /// None if the bytes are not a record (then the epochs are noted afresh, which only
    /// keeps secrets longer, never shorter).
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 8 || !(bytes.len() - 8).is_multiple_of(16) || bytes.len() > 8 + 16 * 64 {
            return None;
        }
        let word = |i: usize| {
            <[u8; 8]>::try_from(&bytes[i..i + 8])
                .ok()
                .map(u64::from_be_bytes)
        };
        let noted_below = word(0)?;
        let mut ends = Vec::new();
        let mut i = 8;
        while i < bytes.len() {
            ends.push((word(i)?, word(i + 8)?));
            i += 16;
        }
        Some(EpochEnds { noted_below, ends })
    }

    /// Brings the record up to a group now at epoch `current`, whose past epochs start at
    /// `lowest` (count bound and join), at `now_ms`. Returns the newest epoch whose secrets
    /// are due for deletion (ended `ttl_ms` ago or more), removing it and all older ones,
    /// and how many it removed.
    fn advance(
        &mut self,
        current: u64,
        lowest: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Option<(u64, usize)> {
        if self.noted_below > current {
            // Rolled back: the restored state may hold secrets this record had dropped;
            // note them again as ending now, so they are deleted one window from now.
            self.ends.retain(|(e, _)| *e < current);
            self.noted_below = lowest;
        }
        for e in self.noted_below.max(lowest)..current {
            if !self.ends.iter().any(|(x, _)| *x == e) {
                self.ends.push((e, now_ms));
            }
        }
        self.ends.sort_unstable();
        self.noted_below = current;
        self.ends.retain(|(e, _)| *e >= lowest);
        let due = self
            .ends
            .iter()
            .filter(|(_, at)| at.saturating_add(ttl_ms) <= now_ms)
            .map(|(e, _)| *e)
            .max()?;
        let before = self.ends.len();
        self.ends.retain(|(e, _)| *e > due);
        Some((due, before - self.ends.len()))
    }
}

/// What [`GroupEngine::expire_past_epochs`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// It staged storage writes for the caller to persist.
    pub staged: bool,
    /// Past epochs whose secrets it deleted (over all groups).
    pub epochs: u64,
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Deletes, in every group, the secrets of past epochs this node left `ttl` ago or more
    /// (at most [`MAX_PAST_EPOCHS`] are kept in any case). Cheap when nothing is due: call
    /// it on every tick.
    ///
    /// An epoch's window starts when this node first noticed it had left the epoch (at
    /// the first call after the commit), so the time between calls adds to the window.
    pub fn expire_past_epochs(
        &mut self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Expired, GroupError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut out = Expired::default();
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            let Some(g) = self.groups.get(&id) else {
                continue;
            };
            let current = g.epoch();
            let lowest = current
                .saturating_sub(MAX_PAST_EPOCHS as u64)
                .max(g.branch.since);
            let before = match self.epoch_ends.get(&id) {
                Some(r) => Some(r.clone()),
                None => self
                    .provider
                    .storage()
                    .get_kith(&ends_key(&id))
                    .map_err(mls_err)?
                    .and_then(|b| EpochEnds::decode(&b)),
            };
            let mut record = before.clone().unwrap_or(EpochEnds {
                noted_below: lowest,
                ends: Vec::new(),
            });
            let due = record.advance(current, lowest, now_ms, ttl_ms);
            if let Some((due, removed)) = due {
                out.epochs += removed as u64;
                let keep = usize::try_from(current.saturating_sub(due + 1)).unwrap_or(usize::MAX);
                // A cutoff before any timestamp deletes nothing by time; the count does it.
                let policy = PastEpochDeletion::before_timestamp(SystemTime::UNIX_EPOCH)
                    .max_past_epochs(keep);
                if let Some(g) = self.groups.get_mut(&id) {
                    g.mls
                        .delete_past_epoch_secrets(&self.provider, policy)
                        .map_err(mls_err)?;
                }
                out.staged = true;
            }
            if before.as_ref() != Some(&record) {
                self.provider
                    .storage()
                    .put_kith(&ends_key(&id), Some(&record.encode()))
                    .map_err(mls_err)?;
                out.staged = true;
            }
            self.epoch_ends.insert(id, record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::EpochEnds;

    #[test]
    fn an_epoch_is_due_a_window_after_it_ended_not_after_it_began() {
        let mut r = EpochEnds {
            noted_below: 7,
            ends: Vec::new(),
        };
        // At 1000 the group is at epoch 8: epoch 7 ended (noticed now).
        assert_eq!(r.advance(8, 3, 1_000, 30_000), None);
        assert_eq!(r.ends, vec![(7, 1_000)]);
        assert_eq!(r.advance(8, 3, 30_999, 30_000), None);
        assert_eq!(r.advance(9, 4, 31_000, 30_000), Some((7, 1)));
        assert_eq!(r.ends, vec![(8, 31_000)]);
        assert_eq!(r.advance(9, 4, 60_999, 30_000), None);
        assert_eq!(r.advance(9, 4, 61_000, 30_000), Some((8, 1)));
        assert!(r.ends.is_empty());
    }

    #[test]
    fn a_rollback_notes_the_restored_epochs_again() {
        let mut r = EpochEnds {
            noted_below: 10,
            ends: vec![(9, 5_000)],
        };
        // Back to epoch 8: epoch 9 is not a past epoch any more; 5..8 may be restored.
        assert_eq!(r.advance(8, 5, 6_000, 30_000), None);
        assert_eq!(r.ends, vec![(5, 6_000), (6, 6_000), (7, 6_000)]);
        assert_eq!(r.advance(8, 5, 36_000, 30_000), Some((7, 3)));
    }

    #[test]
    fn the_record_round_trips_and_bad_bytes_are_refused() {
        let r = EpochEnds {
            noted_below: 42,
            ends: vec![(40, 1), (41, u64::MAX)],
        };
        assert_eq!(EpochEnds::decode(&r.encode()), Some(r));
        assert_eq!(EpochEnds::decode(&[1, 2, 3]), None);
        assert_eq!(EpochEnds::decode(&[0; 8 + 15]), None);
    }
}
