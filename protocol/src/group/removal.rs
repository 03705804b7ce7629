//! A commit that removes this node is held for [`REMOVAL_GRACE_MS`] before it is merged.
//!
//! Gossip does not keep the order between senders: a member that wrote in an epoch before
//! it saw the commit ending that epoch may reach this node after the commit did. Once
//! openmls has merged a commit removing this node the group is evicted and reads nothing
//! more, and the members no longer serve a non-member's history sync, so such a message
//! would be lost here. So a commit whose merge would remove this node is staged, checked and
//! then undone (its key is left unused, so it can be read again later), stored as a Kith
//! record beside the MLS state, and held: meanwhile this node still reads the epoch's
//! application messages but sends nothing (it is not [`GroupEngine::is_active`]). When the
//! grace ends, [`GroupEngine::removal_tick`] merges the commit and emits what a removal
//! emits (the envelope stored, the removal recorded, the epoch change, the unsubscription).
//!
//! The concurrent-commit rule still holds while a removal is held: another commit of the
//! same epoch with a higher id loses to it; one with a lower id is read as usual and, if it
//! merges, this node stays a member (the held commit becomes a losing one). A rollback to
//! an earlier epoch drops the hold the same way. After a restart the record is read back
//! and the grace starts again at the first tick, so the node ends removed and nothing it
//! read is read twice (the MLS state it read with is the one stored).

use serde::{Deserialize, Serialize};

use openmls_traits::OpenMlsProvider;

use super::branch::load_mls;
use super::receive::Incoming;
use super::state::{Group, Source, hold_orphan};
use super::{Effect, GroupEngine, GroupError, IgnoreReason, Step, Verdict, mls_err};
use crate::codec;
use crate::envelope::MAX_ENVELOPE_BYTES;
use crate::fork::{self, GroupRecords};
use crate::ids::{GroupId, MessageId};

/// How long (ms) a commit that removes this node is held before it is merged, so that
/// application messages of the epoch it ends, sent before their senders saw it, can still
/// be read. Gossip usually delivers within a second; a message later than this is lost to
/// the removed node (as before the grace existed).
pub const REMOVAL_GRACE_MS: u64 = 5_000;

/// A commit that removes this node, as stored until it is merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HeldRemoval {
    /// The epoch the commit was made in (this node's epoch while it is held).
    pub(super) epoch: u64,
    /// Its envelope id.
    pub(super) commit: MessageId,
    /// The envelope as received.
    pub(super) bytes: Vec<u8>,
}

/// A held removal in memory: the record and when its grace ends.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) record: HeldRemoval,
    /// When to merge it (ms); `None` after a load, until the first tick starts the grace.
    pub(super) due_ms: Option<u64>,
}

fn removal_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"removal", group, &[])
}

/// Stores the held removal of `group` (staged with the caller's writes).
fn save_held<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    held: &HeldRemoval,
) -> Result<(), GroupError> {
    let bytes = codec::encode(held).map_err(mls_err)?;
    s.put_kith(&removal_key(group), Some(&bytes))
        .map_err(mls_err)
}

/// Deletes the stored held removal of `group`, if any.
pub(super) fn forget_held<S: GroupRecords>(s: &S, group: &GroupId) -> Result<(), GroupError> {
    s.put_kith(&removal_key(group), None).map_err(mls_err)
}

/// The held removal stored for `group` that still applies to its MLS state at `epoch`
/// (`active`: whether openmls still counts this node a member). A record that does not
/// apply (left by a state that was replaced) or cannot be decoded is deleted.
pub(super) fn load_held<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
    active: bool,
) -> Result<Option<HeldRemoval>, GroupError> {
    let Some(bytes) = s.get_kith(&removal_key(group)).map_err(mls_err)? else {
        return Ok(None);
    };
    match codec::decode::<HeldRemoval>(&bytes, MAX_ENVELOPE_BYTES + 1024) {
        Ok(h) if active && h.epoch == epoch && MessageId::of(&h.bytes) == h.commit => Ok(Some(h)),
        Ok(_) => {
            forget_held(s, group)?;
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(group = %group.short(), error = %e, "a stored held removal cannot be read; dropped");
            forget_held(s, group)?;
            Ok(None)
        }
    }
}

/// The held removal of `g` after a (re)load from storage: the stored one, keeping the time
/// its grace ends if memory held the same commit.
pub(super) fn reloaded<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    g: &Group,
) -> Result<Option<Held>, GroupError> {
    let record = load_held(s, group, g.epoch(), g.mls.is_active())?;
    Ok(record.map(|record| {
        let due_ms = g
            .removal
            .as_ref()
            .filter(|h| h.record.commit == record.commit)
            .and_then(|h| h.due_ms);
        Held { record, due_ms }
    }))
}

/// Drops the held removal of `g` because another commit or branch won over it: the commit
/// is kept as an orphan (a later rollback may make it apply again) and its record deleted.
pub(super) fn drop_held<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    g: &mut Group,
) -> Result<(), GroupError> {
    if let Some(old) = g.removal.take() {
        hold_orphan(g, old.record.epoch, &old.record.bytes);
        forget_held(s, group)?;
    }
    Ok(())
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Holds the commit `msg`, which [`GroupEngine::process_mls`] found would remove this
    /// node: the storage goes back to `savepoint` (before the commit was read, so it can be
    /// read again when its grace ends), the group is reloaded from it, and the commit is
    /// stored and held (replacing one held before, which lost to it).
    pub(super) fn hold_removal(
        &mut self,
        msg: Incoming<'_>,
        savepoint: <P::StorageProvider as GroupRecords>::Savepoint,
    ) -> Verdict {
        let Incoming {
            group,
            envelope,
            id,
            bytes,
            now_ms,
            ..
        } = msg;
        let storage = self.provider.storage();
        let undone = storage
            .undo(savepoint)
            .map_err(mls_err)
            .and_then(|()| load_mls(storage, &group));
        let Some(g) = self.groups.get_mut(&group) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let failed = |e: GroupError| {
            Verdict::Ignore(IgnoreReason::Failed {
                step: Step::HoldRemoval,
                detail: e.to_string(),
            })
        };
        match undone {
            Ok(mls) => g.mls = mls,
            Err(e) => {
                // Only a failing store gets here; the node rolls back to its stored state.
                tracing::error!(group = %group.short(), error = %e, "cannot undo reading a commit that removes this node");
                return failed(e);
            }
        }
        let record = HeldRemoval {
            epoch: envelope.epoch(),
            commit: id,
            bytes: bytes.to_vec(),
        };
        if let Err(e) = save_held(storage, &group, &record) {
            return failed(e);
        }
        if let Some(old) = g.removal.take()
            && old.record.commit != id
        {
            hold_orphan(g, old.record.epoch, &old.record.bytes);
        }
        tracing::info!(
            group = %group.short(),
            epoch = record.epoch,
            commit = %id.short(),
            grace_ms = REMOVAL_GRACE_MS,
            "a commit removes this node; reading the rest of its last epoch before merging it"
        );
        g.removal = Some(Held {
            record,
            due_ms: Some(now_ms.saturating_add(REMOVAL_GRACE_MS)),
        });
        Verdict::Accept
    }

    /// Merges the held commits that remove this node whose grace has ended (see this
    /// module), and returns their effects: what the catch-up of such a group held is read
    /// first, then the commit is merged as any other (its envelope stored, the removal
    /// recorded, the epoch change, the unsubscription). Call it on a timer (the node's
    /// flush tick). After a load, the first call starts each held removal's grace.
    pub fn removal_tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let due: Vec<GroupId> = self
            .groups
            .iter_mut()
            .filter_map(|(id, g)| {
                let h = g.removal.as_mut()?;
                let due = *h
                    .due_ms
                    .get_or_insert(now_ms.saturating_add(REMOVAL_GRACE_MS));
                (now_ms >= due).then_some(*id)
            })
            .collect();
        for group in due {
            self.release_removal(group, now_ms, &mut effects);
        }
        if !effects.is_empty() {
            self.settle(now_ms, &mut effects);
        }
        effects
    }

    /// Whether `group` holds a commit that removes this node, waiting for its grace to end.
    pub fn removal_held(&self, group: &GroupId) -> bool {
        self.groups.get(group).is_some_and(|g| g.removal.is_some())
    }

    /// Merges the held removal of `group` now.
    fn release_removal(&mut self, group: GroupId, now_ms: u64, effects: &mut Vec<Effect>) {
        // Live messages a catch-up holds may be of this epoch: once the commit is merged,
        // none of them can be read. (A catch-up of a removed node cannot finish anyway: the
        // members no longer serve it.)
        if self.is_catching_up(&group) {
            effects.extend(self.end_catch_up_now(&group, now_ms));
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        // Reading what was held may have let another commit win over it.
        let Some(held) = g.removal.take() else {
            return;
        };
        self.releasing = Some(held.record.commit);
        let verdict = self.process(&held.record.bytes, now_ms, effects, Source::Held);
        self.releasing = None;
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        match verdict {
            Verdict::Accept => {}
            Verdict::Ignore(IgnoreReason::Failed { .. })
                if g.mls.is_active() && g.epoch() == held.record.epoch =>
            {
                // A local failure: try again at the next tick.
                tracing::warn!(group = %group.short(), reason = %verdict_text(&verdict), "cannot merge a held removal yet");
                g.removal = Some(held);
            }
            other => {
                tracing::warn!(group = %group.short(), reason = %verdict_text(&other), "a held commit removing this node no longer applies; dropped");
                if let Err(e) = forget_held(self.provider.storage(), &group) {
                    tracing::warn!(group = %group.short(), error = %e, "cannot delete a held removal");
                }
            }
        }
    }
}

fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accepted".into(),
        Verdict::Reject(r) => r.to_string(),
        Verdict::Ignore(r) => r.to_string(),
    }
}
