//! How the store survives a failed write (a full disk, a read-only or failing device) and
//! heals by itself.
//!
//! redb latches the first I/O error of a [`Database`]: every later transaction fails with
//! `PreviousIo` until the file is closed and opened again, and the commits made without fsync
//! since the last durable one are lost with it. So on an I/O error from a write, the store
//! (1) marks itself *failing* and refuses every further write at once (typed, with the reason),
//! (2) closes the poisoned `Database` and opens the file again, so reads keep working, and
//! bumps its [generation](DbSlot::generation): whoever keeps state derived from the store
//! (the engine's MLS groups) reloads it from disk, since the lost non-durable commits may
//! have been ahead of it. (3) [`DbSlot::recover`], called on a timer with back-off and before
//! local writes, probes with a real durable write of [`PROBE_BYTES`]; once that succeeds the
//! store is healthy again.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadTransaction, ReadableDatabase, TableDefinition, WriteTransaction};

use super::StoreError;

/// Opens the database file (and checks or migrates its schema): used at start and to reopen
/// it after an I/O error.
pub(super) type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// Bytes one recovery probe writes (durably) and deletes again. Writes of this size
/// succeeding means the disk has room for ordinary commits again; the freed pages stay in the
/// file for the commits that follow.
pub const PROBE_BYTES: usize = 256 * 1024;
/// Pause before the first recovery attempt after a failure; it doubles after each failed
/// attempt up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between two timed recovery attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(4);
/// Shortest pause between two recovery attempts asked for by local writes (each attempt may
/// reopen the file): requests in between are refused at once.
const MIN_FORCED_GAP: Duration = Duration::from_millis(200);

/// The probe's record, in the `meta` table; deleted right after it was written.
const PROBE_KEY: &str = "write_probe";
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Why the store cannot write (label `reason` of `kith_store_write_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// No space left on the device, or the disk quota is used up.
    NoSpace,
    /// The file system is read-only, or the file may not be written.
    ReadOnly,
    /// Any other I/O error (a failing device, a lost network file system, …).
    Io,
}

impl FailureReason {
    /// Every reason, in label order.
    pub const ALL: [FailureReason; 3] = [
        FailureReason::NoSpace,
        FailureReason::ReadOnly,
        FailureReason::Io,
    ];

    /// The label value, also the `reason` field of the API's storage status.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::NoSpace => "disk_full",
            FailureReason::ReadOnly => "read_only",
            FailureReason::Io => "io_error",
        }
    }

    /// What happened, in words for a user.
    pub fn describe(self) -> &'static str {
        match self {
            FailureReason::NoSpace => "no space left on device",
            FailureReason::ReadOnly => "the file system is read-only or the file not writable",
            FailureReason::Io => "an I/O error",
        }
    }

    /// What the user can do about it.
    pub fn advice(self) -> &'static str {
        match self {
            FailureReason::NoSpace => "free some space",
            FailureReason::ReadOnly => "make the data directory writable",
            FailureReason::Io => "check the disk",
        }
    }

    /// The reason of an I/O error.
    pub fn of_io(e: &std::io::Error) -> FailureReason {
        // ENOSPC, EDQUOT, EROFS on Linux, should `kind()` not classify them.
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        const EROFS: i32 = 30;
        match e.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => FailureReason::NoSpace,
            ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => FailureReason::ReadOnly,
            _ => match e.raw_os_error() {
                Some(ENOSPC | EDQUOT) => FailureReason::NoSpace,
                Some(EROFS) => FailureReason::ReadOnly,
                _ => FailureReason::Io,
            },
        }
    }

    /// The reason of a redb error that poisons the database (an I/O error, or the latch of
    /// an earlier one, whose cause is unknown here); `None` for any other error.
    pub fn of_redb(e: &redb::Error) -> Option<FailureReason> {
        match e {
            redb::Error::Io(io) => Some(FailureReason::of_io(io)),
            redb::Error::PreviousIo | redb::Error::DatabaseClosed => Some(FailureReason::Io),
            _ => None,
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Whether the store can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    /// Writes work.
    Ok,
    /// A write failed with an I/O error; writes are refused until a recovery probe succeeds.
    Failing {
        /// When the first write failed (Unix milliseconds).
        since_ms: u64,
        /// Why the last write failed.
        reason: FailureReason,
    },
}

/// What one [`DbSlot::recover`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The store was healthy; nothing was done.
    Healthy,
    /// The store was failing and writes again now.
    Recovered,
    /// The store is still failing (tried and failed, or not due yet).
    Failing,
}

/// The failing state and when to try again.
#[derive(Debug, Clone, Copy)]
struct Failing {
    since_ms: u64,
    reason: FailureReason,
    /// The next timed attempt is due then.
    next_try: Instant,
    /// The pause after the next failed attempt.
    delay: Duration,
    /// The last attempt (of any kind).
    last_try: Instant,
}

/// The store's `Database`, replaced by a fresh handle on the same file after an I/O error,
/// with the store's health. Shared (by `Arc`) by the [`Store`](super::Store) and its
/// [`MlsStorage`](super::MlsStorage).
pub struct DbSlot {
    /// The data directory, for messages.
    dir: PathBuf,
    open: Opener,
    /// `None` while the file could not be opened again.
    db: RwLock<Option<Arc<Database>>>,
    failing: Mutex<Option<Failing>>,
    /// Times the file was opened again (see the module docs).
    generation: AtomicU64,
    /// Failed writes, per [`FailureReason::ALL`] index.
    failures: [AtomicU64; FailureReason::ALL.len()],
}

impl std::fmt::Debug for DbSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbSlot")
            .field("dir", &self.dir)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DbSlot {
    /// Opens the file with `open`; `path` is the file, named in messages by its directory.
    pub(super) fn open(path: &Path, open: Opener) -> Result<DbSlot, StoreError> {
        let db = open()?;
        Ok(DbSlot {
            dir: path.parent().unwrap_or(path).to_owned(),
            open,
            db: RwLock::new(Some(Arc::new(db))),
            failing: Mutex::new(None),
            generation: AtomicU64::new(0),
            failures: Default::default(),
        })
    }

    fn lock_failing(&self) -> MutexGuard<'_, Option<Failing>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current health.
    pub fn health(&self) -> StoreHealth {
        match *self.lock_failing() {
            None => StoreHealth::Ok,
            Some(f) => StoreHealth::Failing {
                since_ms: f.since_ms,
                reason: f.reason,
            },
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Times the file was opened again after an I/O error. State loaded from an earlier
    /// generation may be ahead of the file (non-durable commits are lost by a reopen).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Failed writes so far for `reason` (recovery probes included).
    pub fn failures(&self, reason: FailureReason) -> u64 {
        let i = FailureReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.failures[i].load(Ordering::Relaxed)
    }

    /// The error a refused operation returns.
    fn refusal(&self) -> StoreError {
        let reason = self.lock_failing().map_or(FailureReason::Io, |f| f.reason);
        StoreError::Failing {
            reason,
            dir: self.dir.clone(),
        }
    }

    fn current(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| self.refusal())
    }

    /// A read transaction; fails with [`StoreError::Failing`] only while the file could not
    /// be opened again.
    pub(super) fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.current()?.begin_read()?)
    }

    /// A write transaction; refused with [`StoreError::Failing`] while the store is failing.
    /// Its outcome must go through [`DbSlot::observe`].
    pub(super) fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        if self.lock_failing().is_some() {
            return Err(self.refusal());
        }
        Ok(self.current()?.begin_write()?)
    }

    /// Passes a write's result through; an I/O error turns the store failing (and reopens
    /// the file) and comes back as [`StoreError::Failing`].
    pub(super) fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match result {
            Err(StoreError::Database(e)) => match FailureReason::of_redb(&e) {
                Some(reason) => {
                    self.fail(reason, &e);
                    Err(self.refusal())
                }
                None => Err(StoreError::Database(e)),
            },
            other => other,
        }
    }

    /// Records a failed write and reopens the file.
    fn fail(&self, reason: FailureReason, error: &redb::Error) {
        let i = FailureReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.failures[i].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        {
            let mut failing = self.lock_failing();
            match failing.as_mut() {
                Some(f) => {
                    // The latch of an earlier error says nothing new about its cause.
                    if !matches!(error, redb::Error::PreviousIo | redb::Error::DatabaseClosed) {
                        f.reason = reason;
                    }
                    tracing::debug!(dir = %self.dir.display(), %reason, %error, "the store still cannot write");
                }
                None => {
                    tracing::error!(
                        dir = %self.dir.display(),
                        %reason,
                        %error,
                        "the store cannot write; writes are refused until it can again"
                    );
                    *failing = Some(Failing {
                        since_ms: now_ms(),
                        reason,
                        next_try: now + FIRST_RETRY_DELAY,
                        delay: FIRST_RETRY_DELAY,
                        last_try: now,
                    });
                }
            }
        }
        self.reopen();
    }

    /// Closes the (poisoned) database and opens the file again; on failure the slot stays
    /// empty until the next recovery attempt.
    fn reopen(&self) {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take() {
            match Arc::try_unwrap(old) {
                // Its error is the latched one, already reported.
                Ok(db) => drop(db.close()),
                // Someone still holds it: the file closes when they let go, and opening it
                // again fails (already open) until then.
                Err(old) => drop(old),
            }
        }
        match (self.open)() {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!(dir = %self.dir.display(), "store file opened again; reads work");
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot open the store file again yet");
            }
        }
    }

    /// If the store is failing and an attempt is due (`force`: a local write asks, so it is
    /// due unless one ran in the last [`MIN_FORCED_GAP`]), opens the file again if needed
    /// and probes with a durable write of [`PROBE_BYTES`]. On success the store is healthy.
    pub fn recover(&self, force: bool) -> Recovery {
        let now = Instant::now();
        {
            let mut failing = self.lock_failing();
            let Some(f) = failing.as_mut() else {
                return Recovery::Healthy;
            };
            let due = if force {
                now.duration_since(f.last_try) >= MIN_FORCED_GAP
            } else {
                now >= f.next_try
            };
            if !due {
                return Recovery::Failing;
            }
            f.last_try = now;
        }
        self.attempt()
    }

    /// One recovery attempt, whenever it is due: see [`DbSlot::recover`].
    pub(super) fn attempt(&self) -> Recovery {
        if self.lock_failing().is_none() {
            return Recovery::Healthy;
        }
        let empty = self
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if empty {
            self.reopen();
        }
        let probed = self.current().and_then(|db| probe(&db));
        match probed {
            Ok(()) => {
                let since = self.lock_failing().take().map(|f| f.since_ms);
                let secs = since.map_or(0, |s| now_ms().saturating_sub(s) / 1000);
                tracing::info!(dir = %self.dir.display(), failing_for_secs = secs, "the store writes again");
                Recovery::Recovered
            }
            Err(e) => {
                if let StoreError::Database(e) = &e
                    && let Some(reason) = FailureReason::of_redb(e)
                {
                    self.fail(reason, e);
                }
                let mut failing = self.lock_failing();
                if let Some(f) = failing.as_mut() {
                    f.next_try = Instant::now() + f.delay;
                    f.delay = (f.delay * 2).min(MAX_RETRY_DELAY);
                }
                Recovery::Failing
            }
        }
    }
}

/// Writes [`PROBE_BYTES`] durably and deletes them again.
fn probe(db: &Database) -> Result<(), StoreError> {
    let filler = vec![0u8; PROBE_BYTES];
    let txn = db.begin_write()?;
    txn.open_table(META)?.insert(PROBE_KEY, filler.as_slice())?;
    txn.commit()?;
    let txn = db.begin_write()?;
    txn.open_table(META)?.remove(PROBE_KEY)?;
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::ops::Bound;
    use std::sync::atomic::AtomicBool;

    use kith_protocol::Keypair;
    use kith_protocol::ids::{GroupId, MessageId};
    use kith_protocol::records::{EntryKind, HistoryEntry};
    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    use super::super::{Batch, Store};
    use super::*;

    /// A file whose writes fail with "no space left on device" while `full` is set, like a
    /// disk with no free block at all.
    #[derive(Debug)]
    struct FullDisk {
        file: FileBackend,
        full: Arc<AtomicBool>,
    }

    impl FullDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from(ErrorKind::StorageFull))
            } else {
                Ok(())
            }
        }
    }

    impl StorageBackend for FullDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.file.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.file.query_lock_range(s, e)
        }
    }

    /// A store on a [`FullDisk`] in `dir`, and its switch.
    fn store_on_full_disk(dir: &Path) -> (Store, Arc<AtomicBool>) {
        let path = dir.join("kith.redb");
        let full = Arc::new(AtomicBool::new(false));
        let open: Opener = {
            let (path, full) = (path.clone(), full.clone());
            Box::new(move || {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(redb::Error::Io)?;
                let backend = FullDisk {
                    file: FileBackend::new(file)?,
                    full: full.clone(),
                };
                Store::prepare(
                    Database::builder()
                        .set_check_integrity_on_open(true)
                        .create_with_backend(backend)?,
                    None,
                )
            })
        };
        (Store::open_with(&path, open).expect("open"), full)
    }

    fn text(id: u8, text: &str) -> HistoryEntry {
        HistoryEntry {
            group: GroupId([1; 32]),
            id: MessageId([id; 32]),
            epoch: 1,
            sender: Keypair::ed25519_from_bytes([7; 32])
                .expect("ed25519 key")
                .public()
                .to_peer_id(),
            sent_at_ms: u64::from(id),
            received_at_ms: u64::from(id),
            kind: EntryKind::Text(text.into()),
        }
    }

    fn batch(entries: &[(u8, &str)]) -> Batch {
        Batch {
            history: entries.iter().map(|(id, t)| text(*id, t)).collect(),
            ..Batch::default()
        }
    }

    fn texts(store: &Store) -> Result<Vec<String>, StoreError> {
        Ok(store
            .history(&GroupId([1; 32]), 100)?
            .into_iter()
            .map(|h| match h.kind {
                EntryKind::Text(t) => t,
                other => format!("{other:?}"),
            })
            .collect())
    }

    fn is_full(e: &StoreError) -> bool {
        matches!(
            e,
            StoreError::Failing {
                reason: FailureReason::NoSpace,
                ..
            }
        )
    }

    fn stage(store: &Store, key: &[u8], value: &[u8]) {
        store
            .mls
            .lock_staged()
            .insert(key.to_vec(), Some(value.to_vec()));
    }

    #[test]
    fn io_errors_are_classified() {
        let io = |kind| FailureReason::of_io(&std::io::Error::from(kind));
        assert_eq!(io(ErrorKind::StorageFull), FailureReason::NoSpace);
        assert_eq!(io(ErrorKind::QuotaExceeded), FailureReason::NoSpace);
        assert_eq!(io(ErrorKind::ReadOnlyFilesystem), FailureReason::ReadOnly);
        assert_eq!(io(ErrorKind::Other), FailureReason::Io);
        let os = |code| FailureReason::of_io(&std::io::Error::from_raw_os_error(code));
        assert_eq!(os(28), FailureReason::NoSpace);
        assert_eq!(os(30), FailureReason::ReadOnly);
        assert_eq!(os(5), FailureReason::Io);
        assert_eq!(
            FailureReason::of_redb(&redb::Error::PreviousIo),
            Some(FailureReason::Io)
        );
        assert_eq!(
            FailureReason::of_redb(&redb::Error::Corrupted("x".into())),
            None
        );
    }

    #[test]
    fn a_full_disk_refuses_writes_then_heals_without_losing_what_was_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, full) = store_on_full_disk(dir.path());
        store
            .commit(batch(&[(1, "one"), (2, "two")]))
            .expect("durable commit");
        // Visible at once, durable only with the next fsync, which never comes.
        store
            .commit_with(batch(&[(3, "unflushed")]), false)
            .expect("non-durable commit");
        assert_eq!(store.generation(), 0);

        full.store(true, Ordering::SeqCst);
        stage(&store, b"mls-key", b"new state");
        let err = store
            .commit(batch(&[(4, "refused")]))
            .expect_err("the disk is full");
        assert!(is_full(&err), "{err:?}");
        assert!(
            err.to_string().starts_with("cannot write to the store in "),
            "{err}"
        );
        assert!(
            matches!(
                store.health(),
                StoreHealth::Failing {
                    reason: FailureReason::NoSpace,
                    ..
                }
            ),
            "{:?}",
            store.health()
        );
        assert!(!store.is_writable());
        assert_eq!(store.db.failures(FailureReason::NoSpace), 1);
        // The failed commit kept the staged MLS changes for the caller to discard.
        assert!(store.has_staged());
        store.discard_staged();
        // Opening the file needs a write here, so the store has no handle: reads say why.
        let err = texts(&store).expect_err("no handle while every write fails");
        assert!(is_full(&err), "{err:?}");

        // Writes are refused without touching the disk (the count stays), flushes too.
        let err = store.commit(batch(&[(5, "x")])).expect_err("refused");
        assert!(is_full(&err), "{err:?}");
        assert!(is_full(&store.flush().expect_err("refused")));
        assert_eq!(store.db.failures(FailureReason::NoSpace), 1);
        // A timed attempt is not due yet; a forced one right after the failure neither.
        assert_eq!(store.recover(false), Recovery::Failing);
        assert_eq!(store.recover(true), Recovery::Failing);
        // An attempt while the disk is still full fails and keeps failing.
        assert_eq!(store.db.attempt(), Recovery::Failing);
        assert!(!store.is_writable());

        full.store(false, Ordering::SeqCst);
        assert_eq!(store.db.attempt(), Recovery::Recovered);
        assert_eq!(store.health(), StoreHealth::Ok);
        assert_eq!(store.recover(true), Recovery::Healthy);
        // The file was opened again: what was durable is there, the unflushed commit and
        // the refused ones are not, and whoever loaded state from the store must reload it.
        assert!(store.generation() >= 1);
        assert_eq!(texts(&store).expect("history"), ["one", "two"]);
        assert!(!store.has_staged());

        // Writes work again, MLS changes with them.
        stage(&store, b"mls-key", b"newer state");
        store
            .commit(batch(&[(6, "six")]))
            .expect("commit after recovery");
        assert_eq!(texts(&store).expect("history"), ["one", "two", "six"]);
        drop(store);
        let store = Store::open(&dir.path().join("kith.redb")).expect("reopen from disk");
        assert_eq!(texts(&store).expect("history"), ["one", "two", "six"]);
        let mls = store.mls.clone();
        let staged = mls.lock_staged();
        assert!(staged.is_empty());
        drop(staged);
        let txn = store.db.begin_read().expect("read");
        let table = txn.open_table(super::super::MLS).expect("mls table");
        let value = table
            .get(b"mls-key".as_slice())
            .expect("get")
            .map(|v| v.value().to_vec());
        assert_eq!(value.as_deref(), Some(b"newer state".as_slice()));
    }
}
