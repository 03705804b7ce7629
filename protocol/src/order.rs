//! Keeping every sender's messages decryptable (docs/PROTOCOL.md, "No message lost").
//!
//! MLS keeps the keys of a sender's skipped generations only for a bounded window
//! ([`OUT_OF_ORDER_TOLERANCE`]). A member that decrypts a sender's newer message before
//! older ones it has not received yet moves that sender's ratchet forward; once the ratchet
//! is more than the window past an older message, that message can never be decrypted.
//!
//! The defence has three parts, all here or driven from here:
//! - every application message carries the sender's position ([`AppContentV3::seq`]),
//!   counted per group by the sender ([`next_seq`]);
//! - a receiver tracks, per sender, which positions it has not seen ([`Tracks`]), and
//!   [`Tracks::check`] says when accepting a live message would move the ratchet too close
//!   to the oldest one still missing: the group engine then undoes that decryption (a
//!   storage savepoint, [`crate::fork::GroupRecords::savepoint`]), holds the message and
//!   asks the node to fetch the gap by history sync first;
//! - what still cannot be decrypted is classified ([`Undecryptable`]) and reported, never
//!   dropped silently.
//!
//! [`AppContentV3::seq`]: crate::envelope::AppContentV3::seq

use std::collections::{BTreeSet, HashMap};

use libp2p_identity::PeerId;
use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::prelude::{ProcessMessageError, ValidationError};

use crate::fork::{self, GroupRecords};
use crate::ids::GroupId;

/// Past generations of each sender whose keys MLS keeps for out-of-order messages.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 64;

/// How many generations MLS may ratchet a sender forward in one step (a larger jump is
/// refused as too far in the future).
pub const MAX_FORWARD_DISTANCE: u32 = 5000;

/// How far past the oldest missing position of a sender a live message may be and still be
/// decrypted at once. Below [`OUT_OF_ORDER_TOLERANCE`], with room for messages that arrive
/// while the gap is being fetched; positions differ at least as much as generations do, so
/// the missing message's key is still in the window whenever this allows a decryption.
pub const GUARD_DISTANCE: u64 = 48;

/// Positions a tracked sender may have missing at once. [`Tracks::check`] keeps live gaps
/// below [`GUARD_DISTANCE`]; a larger jump from a history sync page or from held messages
/// (which are never undone) is not tracked position by position.
const MAX_MISSING_PER_SENDER: u64 = 4 * GUARD_DISTANCE;

/// Why an envelope of a group this node is in could not be decrypted. A member that sees one
/// has lost that message for good (unless its sender sends it again); it is counted and
/// shown, and the envelope is kept so history sync does not fetch it again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Undecryptable {
    /// The sender's ratchet had already moved more than [`OUT_OF_ORDER_TOLERANCE`]
    /// generations past the message.
    TooOld,
    /// The message is from a past epoch whose secrets this node has already deleted.
    EpochGone,
}

impl Undecryptable {
    /// Every reason, for metrics families that list all label values.
    pub const ALL: [Undecryptable; 2] = [Undecryptable::TooOld, Undecryptable::EpochGone];

    /// A short label for logs, metrics and the API.
    pub fn label(self) -> &'static str {
        match self {
            Undecryptable::TooOld => "too_old",
            Undecryptable::EpochGone => "epoch_gone",
        }
    }

    /// Decodes [`Undecryptable::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Undecryptable::TooOld),
            1 => Some(Undecryptable::EpochGone),
            _ => None,
        }
    }

    /// A stable one-byte code for storage.
    pub fn code(self) -> u8 {
        match self {
            Undecryptable::TooOld => 0,
            Undecryptable::EpochGone => 1,
        }
    }
}

impl std::fmt::Display for Undecryptable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Undecryptable::TooOld => {
                "the sender's key for it was already dropped (newer messages were read first)"
            }
            Undecryptable::EpochGone => "the keys of its epoch were already deleted",
        })
    }
}

/// What a failed decryption means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecryptFailure {
    /// It can never be decrypted by this node. (The caller must first rule out that it
    /// already holds the message: a copy of a message it read is refused the same way.)
    Lost(Undecryptable),
    /// Its key was used already: this node read this message (under this or another
    /// envelope).
    Duplicate,
    /// It is too far ahead of what this node has of its sender: fetch the gap first.
    Ahead,
    /// Anything else (another branch, garbage): the caller's usual handling.
    Other,
}

/// Classifies an openmls processing error of a message from `epoch` (this node is at
/// `current`).
pub fn classify<E>(e: &ProcessMessageError<E>, epoch: u64, current: u64) -> DecryptFailure {
    use MessageDecryptionError as D;
    match e {
        ProcessMessageError::ValidationError(ValidationError::NoPastEpochData) => {
            DecryptFailure::Lost(Undecryptable::EpochGone)
        }
        ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
            D::SecretTreeError(t),
        )) => match t {
            SecretTreeError::TooDistantInThePast if epoch < current => {
                DecryptFailure::Lost(Undecryptable::EpochGone)
            }
            SecretTreeError::TooDistantInThePast => DecryptFailure::Lost(Undecryptable::TooOld),
            SecretTreeError::SecretReuseError => DecryptFailure::Duplicate,
            SecretTreeError::TooDistantInTheFuture => DecryptFailure::Ahead,
            _ => DecryptFailure::Other,
        },
        _ => DecryptFailure::Other,
    }
}

fn seq_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"seq", group, &[])
}

/// The position for this node's next application message in `group`, and counts it. The
/// count is staged in the MLS store, so it commits in the same transaction as the ratchet
/// step of the message it numbers. It is never reset, not even by a rollback or a rejoin:
/// a position is never used twice, so positions differ at least as much as generations.
pub fn next_seq<S: GroupRecords>(storage: &S, group: &GroupId) -> Result<u64, S::Error> {
    let key = seq_key(group);
    let seq = storage
        .get_kith(&key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    storage.put_kith(&key, Some(&(seq + 1).to_be_bytes()))?;
    Ok(seq)
}

/// What this node has seen of one sender's positions.
#[derive(Debug, Clone, Default)]
struct SenderTrack {
    /// The highest position seen.
    last: u64,
    /// Positions below `last` not seen yet, at most [`MAX_MISSING_PER_SENDER`].
    missing: BTreeSet<u64>,
}

/// The answer of [`Tracks::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Accept: no missing message of this sender is put at risk.
    Fine,
    /// Undo and hold: accepting would move the sender's ratchet too close to (or past) a
    /// message this node has not seen yet.
    Behind {
        /// Positions of the sender this node has not seen up to this message.
        missing: u64,
    },
}

/// A receiver's view of the senders of one group (memory only: after a restart the node
/// holds live messages until a history sync has caught up, which covers what a restart
/// forgets). Bounded by the group's members: only MLS-authenticated senders are tracked.
#[derive(Debug, Clone, Default)]
pub struct Tracks {
    senders: HashMap<PeerId, SenderTrack>,
}

impl Tracks {
    /// Whether a live message at `seq` from `sender` may be decrypted now (see
    /// [`GUARD_DISTANCE`]). A sender seen for the first time is always fine.
    pub fn check(&self, sender: &PeerId, seq: u64) -> Check {
        let Some(t) = self.senders.get(sender) else {
            return Check::Fine;
        };
        if seq <= t.last {
            return Check::Fine;
        }
        let oldest = t.missing.first().copied().unwrap_or(t.last + 1);
        if seq - oldest >= GUARD_DISTANCE {
            let missing = t.missing.len() as u64 + (seq - t.last - 1);
            Check::Behind { missing }
        } else {
            Check::Fine
        }
    }

    /// Notes that the message at `seq` from `sender` was decrypted.
    pub fn note(&mut self, sender: PeerId, seq: u64) {
        let t = self.senders.entry(sender).or_insert_with(|| SenderTrack {
            last: seq,
            missing: BTreeSet::new(),
        });
        if seq > t.last {
            let gap = seq - t.last - 1;
            if gap > MAX_MISSING_PER_SENDER {
                // Too far to track one by one (only possible from sync pages or held
                // messages, which arrive in order anyway).
                t.missing.clear();
            } else {
                t.missing.extend(t.last + 1..seq);
                while t.missing.len() as u64 > MAX_MISSING_PER_SENDER {
                    t.missing.pop_first();
                }
            }
            t.last = seq;
        } else {
            t.missing.remove(&seq);
        }
    }

    /// Positions not seen yet, over all senders.
    pub fn missing(&self) -> u64 {
        self.senders.values().map(|t| t.missing.len() as u64).sum()
    }

    /// Stops waiting for missing positions: after a history sync caught up (or gave up),
    /// what is still missing is not held by any member this node reached. The highest
    /// positions seen are kept.
    pub fn forgive(&mut self) {
        for t in self.senders.values_mut() {
            t.missing.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        crate::testing::member_key(n).public().to_peer_id()
    }

    #[test]
    fn first_sight_and_consecutive_messages_are_fine() {
        let mut t = Tracks::default();
        let a = peer(11);
        assert_eq!(t.check(&a, 1000), Check::Fine);
        t.note(a, 1000);
        for seq in 1001..1200 {
            assert_eq!(t.check(&a, seq), Check::Fine);
            t.note(a, seq);
        }
        assert_eq!(t.missing(), 0);
    }

    #[test]
    fn a_jump_past_the_guard_is_behind() {
        let mut t = Tracks::default();
        let a = peer(12);
        t.note(a, 10);
        assert_eq!(t.check(&a, 10 + GUARD_DISTANCE), Check::Fine);
        assert_eq!(
            t.check(&a, 11 + GUARD_DISTANCE),
            Check::Behind {
                missing: GUARD_DISTANCE
            }
        );
        // Another sender is not affected.
        assert_eq!(t.check(&peer(13), 5000), Check::Fine);
    }

    #[test]
    fn an_open_gap_limits_how_far_later_messages_may_go() {
        let mut t = Tracks::default();
        let a = peer(14);
        t.note(a, 0);
        t.note(a, 3); // 1 and 2 missing
        assert_eq!(t.missing(), 2);
        for seq in 4..(1 + GUARD_DISTANCE) {
            assert_eq!(t.check(&a, seq), Check::Fine, "seq {seq}");
            t.note(a, seq);
        }
        assert!(matches!(
            t.check(&a, 1 + GUARD_DISTANCE),
            Check::Behind { .. }
        ));
        // The gap fills: the guard moves with the oldest missing position.
        t.note(a, 1);
        assert_eq!(t.check(&a, 1 + GUARD_DISTANCE), Check::Fine);
        t.note(a, 2);
        assert_eq!(t.missing(), 0);
        assert_eq!(t.check(&a, GUARD_DISTANCE + 10), Check::Fine);
    }

    #[test]
    fn forgiving_clears_the_gaps_but_keeps_the_position() {
        let mut t = Tracks::default();
        let a = peer(15);
        t.note(a, 0);
        t.note(a, 20);
        t.forgive();
        assert_eq!(t.missing(), 0);
        assert_eq!(t.check(&a, 21), Check::Fine);
        assert!(matches!(
            t.check(&a, 21 + GUARD_DISTANCE),
            Check::Behind { .. }
        ));
    }

    #[test]
    fn huge_gaps_from_sync_stay_bounded() {
        let mut t = Tracks::default();
        let a = peer(16);
        t.note(a, 0);
        t.note(a, 1_000_000);
        assert_eq!(t.missing(), 0);
        t.note(a, 1_000_000 + MAX_MISSING_PER_SENDER);
        assert_eq!(t.missing(), MAX_MISSING_PER_SENDER - 1);
    }

    #[test]
    fn reasons_round_trip_their_codes() {
        for r in Undecryptable::ALL {
            assert_eq!(Undecryptable::from_code(r.code()), Some(r));
        }
        assert_eq!(Undecryptable::from_code(9), None);
    }
}
