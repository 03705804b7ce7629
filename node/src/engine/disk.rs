//! The actor's side of a disk that cannot be written (see `crate::store::health` for the
//! store's side).
//!
//! While the store is failing, the actor refuses local writes (sends, new groups, invites,
//! joins, …) with [`EngineError::Storage`], does not process received envelopes (they could
//! not be stored; other members keep them) and starts no history sync. It asks the store to
//! recover on every flush tick (the store backs off) and before each local write. The store
//! opens its file again after an I/O error, which loses the commits made without fsync: when
//! its generation changes, the actor reloads every group's MLS state from disk before it
//! handles anything else, so memory never runs ahead of the file. Once the store writes
//! again, every active group is synced, which fetches what arrived meanwhile.

use kith_protocol::ids::GroupId;

use super::{Actor, Call, EngineError};
use crate::model::StorageStatus;
use crate::store::{FailureReason, HealthView, Store, StoreHealth};

/// What the actor knows of the store's health.
pub(super) struct DiskWatch {
    health: HealthView,
    /// The store generation the MLS state was last loaded from; `None` after a failed reload.
    loaded: Option<u64>,
    /// Failed writes already counted in the metrics, per [`FailureReason::ALL`] index.
    counted: [u64; FailureReason::ALL.len()],
    /// Whether the actor could write at its last look.
    was_ok: bool,
}

impl DiskWatch {
    /// Watches `store`, whose state the actor has just loaded.
    pub(super) fn new(store: &Store) -> DiskWatch {
        let health = store.health_view();
        DiskWatch {
            counted: FailureReason::ALL.map(|r| health.failures(r)),
            health,
            loaded: Some(store.generation()),
            was_ok: store.is_writable(),
        }
    }

    /// The MLS state was (re)loaded from the store at `generation`.
    pub(super) fn loaded(&mut self, generation: u64) {
        self.loaded = Some(generation);
    }

    /// Reloading the MLS state failed: memory may be ahead of the file.
    pub(super) fn reload_failed(&mut self) {
        self.loaded = None;
    }
}

/// The API form of the store's health.
pub(super) fn storage_status(health: &HealthView) -> StorageStatus {
    match health.health() {
        StoreHealth::Ok => StorageStatus::Ok,
        StoreHealth::Failing { since_ms, reason } => StorageStatus::Failing {
            since_ms,
            reason: reason.as_str().to_owned(),
            message: EngineError::Storage {
                reason,
                dir: health.dir().to_owned(),
            }
            .to_string(),
        },
    }
}

impl Call {
    /// Whether the call writes to the store (and is refused while it cannot). An operation
    /// ([`Call::Run`]) that writes says so itself, with [`Actor::check_writable`].
    fn writes(&self) -> bool {
        match self {
            Call::PrepareJoin(..)
            | Call::CompleteJoin(..)
            | Call::PrepareRejoin(..)
            | Call::CompleteRejoin(..) => true,
            Call::Run(..) | Call::RejoinFailed(..) | Call::JoinOutcome(..) => false,
        }
    }

    /// Answers the call with `e`. Never given a [`Call::Run`] (it does not write), whose
    /// reply is the operation's own.
    fn refuse(self, e: EngineError) {
        // A caller that went away needs no answer.
        match self {
            Call::Run(_) => {}
            Call::CompleteJoin(_, _, r) | Call::CompleteRejoin(_, _, _, r) => drop(r.send(Err(e))),
            Call::PrepareJoin(_, r) | Call::PrepareRejoin(_, _, _, r) => drop(r.send(Err(e))),
            Call::RejoinFailed(_, r) | Call::JoinOutcome(_, _, r) => drop(r.send(Err(e))),
        }
    }
}

impl Actor {
    /// True if the store writes and the MLS state in memory is the one on disk.
    pub(super) fn disk_ok(&self) -> bool {
        self.store.is_writable() && self.disk.loaded == Some(self.store.generation())
    }

    /// Runs before every input: counts new write failures, reloads the MLS state if the
    /// store opened its file again since it was loaded, and syncs every group once the
    /// store writes again.
    pub(super) fn watch_store(&mut self) {
        for (i, reason) in FailureReason::ALL.into_iter().enumerate() {
            let total = self.disk.health.failures(reason);
            if total > self.disk.counted[i] {
                self.metrics
                    .store_write_failures(reason, total - self.disk.counted[i]);
                self.disk.counted[i] = total;
            }
        }
        if self.disk.loaded != Some(self.store.generation()) {
            tracing::info!("reloading group state from the store after it was opened again");
            self.rollback();
        }
        let ok = self.disk_ok();
        self.metrics.set_store_failing(!ok);
        if ok && !self.disk.was_ok {
            self.sync_all_after_recovery();
        }
        self.disk.was_ok = ok;
    }

    /// On the flush tick: lets a failing store try to recover (it backs off by itself).
    pub(super) fn retry_store(&mut self) {
        if !self.store.is_writable() {
            self.store.recover(false);
            self.watch_store();
        }
    }

    /// Fails with [`EngineError::Storage`] if the store cannot write, after trying to
    /// recover. Every operation that writes calls it first, so while the disk fails it is
    /// refused before it changes anything.
    pub(super) fn check_writable(&mut self) -> Result<(), EngineError> {
        if !self.store.is_writable() {
            self.store.recover(true);
        }
        self.watch_store();
        if self.disk_ok() {
            Ok(())
        } else {
            Err(self.store.refusal().into())
        }
    }

    /// Passes `call` back, or answers it with [`EngineError::Storage`] if it writes and the
    /// store still cannot after trying to recover.
    pub(super) fn refuse_unwritable(&mut self, call: Call) -> Option<Call> {
        if !call.writes() {
            return Some(call);
        }
        match self.check_writable() {
            Ok(()) => Some(call),
            Err(e) => {
                call.refuse(e);
                None
            }
        }
    }

    /// Syncs every active group now: the messages that arrived while the store could not
    /// write (or that a reopen lost) are held by other members.
    fn sync_all_after_recovery(&mut self) {
        let groups: Vec<GroupId> = self
            .groups
            .groups()
            .iter()
            .filter(|v| v.active)
            .map(|v| v.meta.id)
            .collect();
        tracing::info!(
            groups = groups.len(),
            "the store writes again; syncing every group"
        );
        // Not in sync until a run completes; retried on the flush tick until then.
        self.sync_input(kith_protocol::sync::scheduler::Input::Recovered { groups });
    }
}
