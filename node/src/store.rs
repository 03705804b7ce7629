//! The node's persistence: one redb file per node.
//!
//! Tables:
//! - `mls`: openmls' [`StorageProvider`](openmls_traits::storage::StorageProvider) records
//!   (keys and values are written by [`MlsStorage`]).
//! - `groups`: group id → [`GroupMeta`].
//! - `history`: [`history_key`] (group id ++ the canonical history order: epoch, sent_at_ms,
//!   sender, message id) → [`HistoryEntry`], so every member lists a group's history in the
//!   same order whatever the arrival order.
//! - `message_index`: message id → history key (or empty), to drop duplicates.
//! - `envelopes`: message id → [`StoredEnvelope`], to serve history to other members.
//! - `envelopes_by_group`: group id ‖ epoch ‖ message id → `()`, an index of `envelopes`
//!   written in the same transactions, so a group's envelopes (or those of a range of its
//!   epochs) are found without scanning every group's (added by schema 4).
//! - `invites`: invite id → [`InviteRecord`] (schema 2 keyed the inviter's records by the
//!   secret hash; [`Store::open`] migrates them to schema 3 in place).
//! - `peers`: `PeerId` bytes → list of multiaddr bytes (the address book).
//! - `verify_marks`: `PeerId` bytes → the member's verification mark (`store/marks.rs`;
//!   created by the first mark, so it needs no schema change).
//! - `meta`: `schema_version` (u32 big-endian). Schema 1 keyed `history` by a local arrival
//!   sequence (kept in `next_seq`); [`Store::open`] migrates it to schema 2, then 3 and 4, in
//!   place. `owner`: the PeerId bytes of the node key the database belongs to, written by
//!   [`Store::open_owned`] at creation (or adopted on the first such open of a database
//!   written before owners were recorded), so a swapped key is refused instead of starting
//!   a node whose groups are dead.
//!
//! Kith records are encoded with [`kith_protocol::codec`]; openmls records with serde_json.
//!
//! **Atomicity.** openmls writes through [`MlsStorage`] never reach the database directly: they
//! are staged in memory, and [`Store::commit`] writes the staged MLS changes together with a
//! [`Batch`] of history rows, envelopes, groups, invites and peers in *one* redb write
//! transaction. A crash therefore never leaves MLS keys and history disagreeing: either both
//! are on disk or neither is.

mod chat;
mod health;
mod marks;
mod mls;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kith_protocol::codec::{self, MAX_DECODE_BYTES};
use kith_protocol::envelope::PayloadKind;
use kith_protocol::ids::{GroupId, InviteId, MessageId};
use kith_protocol::invite::{InviteRecord, InviteUpdate};
use kith_protocol::order::Undecryptable;
use kith_protocol::records::{GroupMeta, HistoryEntry, StoredEnvelope};
use kith_protocol::sync::MAX_SENDER_BYTES;
use kith_protocol::{Multiaddr, PeerId};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use chat::{Changes, MAX_CHANGES_SHOWN, MAX_PROFILES, Receipt, fold};
pub use health::{FailureReason, PROBE_BYTES, Recovery, StoreHealth};
pub use mls::{KithProvider, MlsStorage};

use health::DbSlot;

/// openmls storage records: label + serde_json key → serde_json value.
const MLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mls");
/// Group id → codec-encoded [`GroupMeta`].
const GROUPS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("groups");
/// [`history_key`] → codec-encoded [`HistoryEntry`].
const HISTORY: TableDefinition<&[u8; HISTORY_KEY_LEN], &[u8]> = TableDefinition::new("history");
/// Message id → history key of its entry (empty: seen, but no history row).
const MESSAGE_INDEX: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("message_index");
/// Message id → codec-encoded [`StoredEnvelope`].
const ENVELOPES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("envelopes");
/// [`envelope_index_key`] (group id ‖ epoch ‖ message id) → nothing: the `envelopes` of a
/// group in epoch order.
const ENVELOPES_BY_GROUP: TableDefinition<&[u8; ENVELOPE_INDEX_KEY_LEN], ()> =
    TableDefinition::new("envelopes_by_group");
/// Invite id → codec-encoded [`InviteRecord`].
const INVITES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("invites");
/// `PeerId` bytes → codec-encoded `Vec<Vec<u8>>` of multiaddr bytes.
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
/// group id (32) ‖ envelope id (32) → epoch (u64 BE) ‖ reason code (u8) ‖ received_at_ms
/// (u64 BE): envelopes of the group that this node can never decrypt
/// ([`Undecryptable`]); the envelope itself is kept in `envelopes`.
const UNDECRYPTABLE: TableDefinition<&[u8; 64], &[u8]> = TableDefinition::new("undecryptable");
/// Store-wide values, see [`META_SCHEMA_VERSION`] and [`META_NEXT_SEQ`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_SCHEMA_VERSION: &str = "schema_version";
/// The PeerId (bytes) of the node key this database belongs to.
const META_OWNER: &str = "owner";
/// Schema 1 only: the next local history sequence number.
const META_NEXT_SEQ: &str = "next_seq";

/// The schema this code writes and understands. Version 1 (history in arrival order),
/// version 2 (invites keyed by secret hash, without group-wide state) and version 3 (no
/// per-group envelope index) are migrated in place on open.
pub const SCHEMA_VERSION: u32 = 4;
/// At most this many addresses are kept per peer; newer ones push out older ones.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// At most this many peers are kept in the address book.
pub const MAX_PEERS: u64 = 1000;

/// group id (32) ‖ epoch (8) ‖ sent_at_ms (8) ‖ sender padded to [`MAX_SENDER_BYTES`] ‖
/// sender length (1) ‖ message id (32).
const HISTORY_KEY_LEN: usize = 32 + 8 + 8 + MAX_SENDER_BYTES + 1 + 32;
/// `envelopes_by_group` key: group id (32) ‖ epoch (8, big-endian) ‖ message id (32).
const ENVELOPE_INDEX_KEY_LEN: usize = 32 + 8 + 32;
/// Schema 1 `history` key: group id ‖ u64 BE arrival sequence.
const V1_HISTORY_KEY_LEN: usize = 40;

fn undecryptable_key(group: &GroupId, id: &MessageId) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(group.as_bytes());
    k[32..].copy_from_slice(id.as_bytes());
    k
}

/// How much history a node keeps per group; see [`Store::prune`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries whose `sent_at_ms` is older than this many milliseconds are deleted.
    pub max_age_ms: u64,
    /// At most this many history entries are kept per group (the newest in canonical order).
    pub max_messages: u64,
}

/// Default retention: 365 days.
pub const DEFAULT_RETENTION_DAYS: u64 = 365;
/// Default retention: 100 000 history entries per group.
pub const DEFAULT_RETENTION_MAX_MESSAGES: u64 = 100_000;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_ms: DEFAULT_RETENTION_DAYS * 24 * 3600 * 1000,
            max_messages: DEFAULT_RETENTION_MAX_MESSAGES,
        }
    }
}

/// What [`Store::chat_summary`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatSummary {
    /// The newest message.
    pub last: Option<HistoryEntry>,
    /// Unread messages (up to the cap asked for).
    pub unread: u64,
}

/// What one [`Store::prune`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// History rows deleted.
    pub history: usize,
    /// Envelopes deleted.
    pub envelopes: usize,
    /// The budget ran out: more may be due, call again.
    pub more: bool,
}

/// What went wrong in the store. Every variant leaves the database as it was before the call:
/// a failed [`Store::commit`] writes nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (IO error, full disk, corrupted file, …). The operation had no effect; the
    /// caller may retry, or report that the data directory is unusable.
    #[error("database error: {0}")]
    Database(#[from] redb::Error),
    /// The database file is already open, by this process or another node using the same data
    /// directory. Stop the other node or pick another data directory.
    #[error("the database is already open by another node")]
    AlreadyOpen,
    /// A stored record could not be decoded: the file was damaged or written by incompatible
    /// code. Nothing was changed; the record stays as it is.
    #[error("corrupt record in table `{table}`: {reason}")]
    Corrupt {
        /// The table holding the record.
        table: &'static str,
        /// Why it could not be decoded.
        reason: String,
    },
    /// A value could not be serialized for storage (an openmls entity or key, or a Kith record).
    /// This is a bug in the caller or a dependency, not bad data on disk.
    #[error("cannot serialize value: {0}")]
    Serde(String),
    /// A record is larger than the store accepts (it could not be read back). The whole commit
    /// was refused; the caller should bound the value before storing it.
    #[error("record of {len} bytes for table `{table}` exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The table the record was meant for.
        table: &'static str,
        /// Encoded length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The store cannot write: a write failed with an I/O error (full disk, read-only or
    /// failing device) and writes are refused until [`Store::recover`] finds that they work
    /// again. Reads fail with it only while the file could not be opened again. Nothing was
    /// written.
    #[error("cannot write to the store in {}: {reason}", dir.display())]
    Failing {
        /// Why the last write failed.
        reason: FailureReason,
        /// The data directory.
        dir: PathBuf,
    },
    /// The file was written by a newer Kith with a schema this version does not understand.
    /// Upgrade Kith; the file was not modified.
    #[error("database schema version {found} is newer than the supported version {supported}")]
    SchemaTooNew {
        /// The version in the file.
        found: u32,
        /// The newest version this code understands.
        supported: u32,
    },
    /// The database belongs to another node key than the one it was opened with
    /// ([`Store::open_owned`]). The file was not modified; the caller restores the right key
    /// or sets the database aside.
    #[error("the database belongs to node {owner}")]
    OtherOwner {
        /// The PeerId recorded in the database.
        owner: PeerId,
    },
    /// A bounded table is full: the new record was refused and nothing was written.
    #[error("table `{table}` is full ({limit} records)")]
    Full {
        /// The table.
        table: &'static str,
        /// How many records it holds at most.
        limit: u64,
    },
}

macro_rules! from_redb_error {
    ($($ty:ty),* $(,)?) => {
        $(
            impl From<$ty> for StoreError {
                fn from(e: $ty) -> Self {
                    StoreError::Database(e.into())
                }
            }
        )*
    };
}

from_redb_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyOpen,
            other => StoreError::Database(other.into()),
        }
    }
}

/// Everything besides the staged MLS changes that one [`Store::commit`] writes.
///
/// Produced by the engine from the protocol's effects; all of it lands in the same transaction
/// as the MLS state change that produced it.
#[derive(Debug, Default)]
pub struct Batch {
    /// Groups to insert or replace (keyed by [`GroupMeta::id`]).
    pub groups: Vec<GroupMeta>,
    /// History entries to store, each at its canonical position (see [`Store::history`]); an
    /// entry whose message id already has a history row (stored earlier or earlier in this
    /// batch) is skipped. A sender id longer than [`MAX_SENDER_BYTES`] fails the commit.
    pub history: Vec<HistoryEntry>,
    /// Raw envelopes to keep for serving sync; an envelope already stored is left as is.
    pub envelopes: Vec<StoredEnvelope>,
    /// Invite updates, each merged into the stored record with its id
    /// ([`InviteRecord::merge`]), in order.
    pub invites: Vec<InviteUpdate>,
    /// Groups whose invite records are deleted before `invites` are merged.
    pub forget_invites: Vec<GroupId>,
    /// Address-book updates: the given addresses go first, then the previously known ones, at
    /// most [`MAX_ADDRS_PER_PEER`]. See [`Store::commit`] for the peer cap.
    pub peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Losing branches left (applied before everything else in the batch): the group's
    /// envelopes of later epochs and the lost commits are deleted, and the history rows of
    /// membership changes that did not happen.
    pub rollbacks: Vec<Rollback>,
    /// (envelope id, history id): the envelope carried that history entry, so
    /// [`Store::history_entry`] finds the entry by the envelope's id too.
    pub links: Vec<(MessageId, MessageId)>,
    /// Envelopes this node can never decrypt: each is kept (like [`Batch::envelopes`]) and
    /// counted in the `undecryptable` table, unless it is already stored (then it was a
    /// copy of a message this node holds, not a loss).
    pub undecryptable: Vec<(StoredEnvelope, Undecryptable)>,
    /// Undecryptable envelopes whose text arrived again, re-sent by its sender on request:
    /// no longer counted as lost (the envelope stays, so sync does not fetch it again).
    pub recovered: Vec<(GroupId, MessageId)>,
    /// Members' profiles (signatures checked): a newer version replaces the kept one.
    pub profiles: Vec<(PeerId, kith_protocol::chat::SignedProfile)>,
    /// Read receipts (this node's own too).
    pub receipts: Vec<Receipt>,
    /// Groups that are direct chats, with the other person.
    pub direct: Vec<(GroupId, PeerId)>,
}

/// See [`Batch::rollbacks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The group.
    pub group: GroupId,
    /// Envelopes of epochs after this one are deleted.
    pub to_epoch: u64,
    /// Envelope ids deleted whatever their epoch.
    pub lost_commits: Vec<MessageId>,
    /// History ids whose rows are deleted.
    pub forget_history: Vec<MessageId>,
}

impl Batch {
    /// The records to persist for a list of engine effects (the network and notification
    /// effects are not the store's business and are skipped).
    pub fn from_effects(effects: &[kith_protocol::group::Effect]) -> Batch {
        use kith_protocol::group::Effect;
        let mut batch = Batch::default();
        for e in effects {
            match e {
                Effect::SaveGroup(m) => batch.groups.push(m.clone()),
                Effect::SaveEnvelope(s) => batch.envelopes.push(s.clone()),
                Effect::Record(h) => batch.history.push(h.clone()),
                Effect::Invite(u) => batch.invites.push(u.clone()),
                Effect::ForgetInvites { group } => batch.forget_invites.push(*group),
                Effect::Undecryptable { envelope, reason } => {
                    batch.undecryptable.push((envelope.clone(), *reason))
                }
                Effect::Recovered { group, envelope } => batch.recovered.push((*group, *envelope)),
                Effect::JoinLost { .. } | Effect::DeepForkLost { .. } | Effect::Behind { .. } => {}
                Effect::LinkEnvelope { envelope, history } => {
                    if envelope != history {
                        batch.links.push((*envelope, *history));
                    }
                }
                Effect::RolledBack {
                    group,
                    to_epoch,
                    lost_commits,
                    forget_history,
                } => {
                    // What this batch would have stored on the losing branch goes too.
                    batch.envelopes.retain(|e| {
                        e.group != *group || (e.epoch <= *to_epoch && !lost_commits.contains(&e.id))
                    });
                    batch.history.retain(|h| !forget_history.contains(&h.id));
                    batch.rollbacks.push(Rollback {
                        group: *group,
                        to_epoch: *to_epoch,
                        lost_commits: lost_commits.clone(),
                        forget_history: forget_history.clone(),
                    });
                }
                Effect::Profile { owner, profile, .. } => {
                    batch.profiles.push((*owner, profile.clone()))
                }
                Effect::Receipt {
                    group,
                    peer,
                    up_to,
                    sent_at_ms,
                } => batch.receipts.push(Receipt {
                    group: *group,
                    peer: *peer,
                    up_to: *up_to,
                    at_ms: *sent_at_ms,
                }),
                Effect::Direct { group, peer } => batch.direct.push((*group, *peer)),
                Effect::Publish { .. }
                | Effect::Subscribe(..)
                | Effect::Unsubscribe(_)
                | Effect::Typing { .. }
                | Effect::DirectOffer { .. }
                | Effect::EpochChanged { .. } => {}
            }
        }
        batch
    }

    /// True if the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
            && self.history.is_empty()
            && self.envelopes.is_empty()
            && self.invites.is_empty()
            && self.forget_invites.is_empty()
            && self.peers.is_empty()
            && self.rollbacks.is_empty()
            && self.links.is_empty()
            && self.undecryptable.is_empty()
            && self.recovered.is_empty()
            && self.profiles.is_empty()
            && self.receipts.is_empty()
            && self.direct.is_empty()
    }
}

/// The node's database: one redb file, plus the staged (uncommitted) openmls writes.
///
/// Cheap to share by reference; [`Store::provider`] hands out openmls providers that see the
/// same staged writes. The file is closed when the `Store` and every provider from it are
/// dropped.
pub struct Store {
    db: Arc<DbSlot>,
    mls: MlsStorage,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("mls", &self.mls).finish()
    }
}

/// Makes the database file readable and writable by its owner only: it holds every group's
/// keys and history. A failure is logged, not fatal (the directory is private already).
fn owner_only(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                if let Err(e) =
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot make the database private to its owner");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the database's permissions")
            }
        }
    }
}

impl Store {
    /// Opens the database at `path`, creating the file and its tables if missing.
    ///
    /// Fails with [`StoreError::SchemaTooNew`] if a newer Kith wrote the file, with
    /// [`StoreError::AlreadyOpen`] if another node holds it, and with
    /// [`StoreError::Database`] if the file is damaged (page checksums are verified on open).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_inner(path, None)
    }

    /// Opens the database at `path` as the database of node `owner`, like [`Store::open`]:
    /// a new database records `owner`, one without an owner record (written before owners
    /// were recorded) adopts it, and one recorded for another node fails with
    /// [`StoreError::OtherOwner`], leaving the file untouched.
    pub fn open_owned(path: &Path, owner: &PeerId) -> Result<Store, StoreError> {
        Self::open_inner(path, Some(owner))
    }

    /// The owner recorded in the database at `path`, if any, without changing the file (for
    /// error messages: it names the node whose key is wanted).
    pub fn owner_of(path: &Path) -> Result<Option<PeerId>, StoreError> {
        use redb::ReadableDatabase as _;
        let db = Database::builder().open(path)?;
        let txn = db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        meta.get(META_OWNER)?
            .map(|v| decode_owner(v.value()))
            .transpose()
    }

    fn open_inner(path: &Path, owner: Option<&PeerId>) -> Result<Store, StoreError> {
        let file = path.to_owned();
        let owner = owner.copied();
        Store::open_with(
            path,
            Box::new(move || Store::open_file(&file, owner.as_ref())),
        )
    }

    /// Opens the database file and checks its schema (and owner): at start, and again after
    /// an I/O error (see [`Store::generation`]).
    fn open_file(path: &Path, owner: Option<&PeerId>) -> Result<Database, StoreError> {
        // Verify page checksums on every open: a file damaged outside redb is then a typed
        // error instead of a possible panic later. It reads the whole file once at startup.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)?;
        owner_only(path);
        Store::prepare(db, owner)
    }

    /// Checks the schema of a freshly opened database, migrating older ones in place, and
    /// records or checks its owner.
    fn prepare(db: Database, owner: Option<&PeerId>) -> Result<Database, StoreError> {
        let txn = db.begin_write()?;
        {
            let found = {
                let meta = txn.open_table(META)?;
                meta.get(META_SCHEMA_VERSION)?
                    .map(|v| decode_u32(v.value()))
                    .transpose()?
            };
            match found {
                None => {}
                Some(found) if found > SCHEMA_VERSION => {
                    // Dropping `txn` aborts it: the file stays untouched.
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(SCHEMA_VERSION) => {}
                // Same transaction as the version bump below: all or nothing.
                Some(1) => {
                    migrate_v1(&txn)?;
                    migrate_v2(&txn)?;
                    migrate_v3(&txn)?;
                }
                Some(2) => {
                    migrate_v2(&txn)?;
                    migrate_v3(&txn)?;
                }
                Some(3) => migrate_v3(&txn)?,
                Some(found) => {
                    return Err(StoreError::Corrupt {
                        table: "meta",
                        reason: format!("unknown schema version {found}"),
                    });
                }
            }
            if let Some(owner) = owner {
                claim_owner(&txn, owner, found.is_some())?;
            }
            txn.open_table(MLS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(HISTORY)?;
            txn.open_table(MESSAGE_INDEX)?;
            txn.open_table(ENVELOPES)?;
            txn.open_table(ENVELOPES_BY_GROUP)?;
            txn.open_table(INVITES)?;
            txn.open_table(PEERS)?;
            txn.open_table(UNDECRYPTABLE)?;
            // Added without a schema change: a new table is empty in an older file.
            txn.open_table(chat::REFS)?;
            txn.open_table(chat::PROFILES)?;
            txn.open_table(chat::RECEIPTS)?;
            txn.open_table(chat::DIRECT)?;
            txn.open_table(chat::FILES_GONE)?;
            if found != Some(SCHEMA_VERSION) {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(db)
    }

    /// Opens the store with `open`, which also reopens the file after an I/O error.
    fn open_with(path: &Path, open: health::Opener) -> Result<Store, StoreError> {
        let db = Arc::new(DbSlot::open(path, open)?);
        let mls = MlsStorage::new(Arc::clone(&db));
        Ok(Store { db, mls })
    }

    /// Whether the store can write (see [`StoreHealth`]).
    pub fn health(&self) -> StoreHealth {
        self.db.health()
    }

    /// A handle reading this store's health from anywhere (the API's status).
    pub fn health_view(&self) -> HealthView {
        HealthView(Arc::clone(&self.db))
    }

    /// True unless a write failed and the store has not recovered yet.
    pub fn is_writable(&self) -> bool {
        self.health() == StoreHealth::Ok
    }

    /// Times the file was opened again after an I/O error. Whatever was loaded from the store
    /// at an earlier generation (the engine's MLS groups) must be loaded again: the commits
    /// without fsync before the error are gone.
    pub fn generation(&self) -> u64 {
        self.db.generation()
    }

    /// While failing: if an attempt is due, opens the file again if needed and probes with a
    /// durable write; see [`Recovery`]. `force` (a local write asks) makes an attempt due
    /// unless one ran a moment ago; otherwise attempts back off from 0.5 s to 4 s.
    pub fn recover(&self, force: bool) -> Recovery {
        self.db.recover(force)
    }

    /// The error writes are refused with, for a caller that refuses one itself.
    pub fn refusal(&self) -> StoreError {
        let reason = match self.health() {
            StoreHealth::Failing { reason, .. } => reason,
            StoreHealth::Ok => FailureReason::Io,
        };
        StoreError::Failing {
            reason,
            dir: self.db.dir().to_owned(),
        }
    }

    /// An openmls provider over this store. Its writes are staged until [`Store::commit`];
    /// all providers from one store share the same staged writes.
    pub fn provider(&self) -> KithProvider {
        KithProvider::new(self.mls.clone())
    }

    /// Writes the staged MLS changes and `batch` in one transaction, then clears the staged
    /// changes.
    ///
    /// On error nothing is written and the staged changes are kept: the caller either retries
    /// or calls [`Store::discard_staged`] and reloads its MLS groups from storage.
    ///
    /// The address book keeps at most [`MAX_PEERS`] peers: a new peer beyond the cap replaces
    /// the stored peer whose id follows it in key order (a pseudo-random victim, since peer ids
    /// are hashes), so the book stays bounded yet keeps learning.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_with(batch, true).map(drop)
    }

    /// Like [`Store::commit`], but with `durable == false` the transaction is not fsynced: it
    /// is atomic and visible at once, and becomes durable with the next durable commit or
    /// [`Store::flush`]. A crash before that loses the whole transaction (MLS state and
    /// records together), never part of it. The node uses this for received messages, whose
    /// loss is recoverable, and flushes within half a second.
    ///
    /// An I/O error (full disk, …) makes the store failing: this and later writes return
    /// [`StoreError::Failing`] until [`Store::recover`] succeeds, and the file is opened
    /// again, which loses the non-durable commits not yet flushed (see [`Store::generation`]).
    ///
    /// Returns the ids of the history entries that were stored already, at the same place
    /// (a copy of a text this node had, such as one sent again on another member's request):
    /// the caller does not announce them again.
    pub fn commit_with(&self, batch: Batch, durable: bool) -> Result<Vec<MessageId>, StoreError> {
        let result = self.commit_inner(batch, durable);
        self.db.observe(result)
    }

    fn commit_inner(&self, batch: Batch, durable: bool) -> Result<Vec<MessageId>, StoreError> {
        let mut staged = self.mls.lock_staged();
        let mut already = Vec::new();
        if staged.is_empty() && batch.is_empty() {
            return Ok(already);
        }
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Database(redb::Error::from(e)))?;
        }
        {
            let mut mls = txn.open_table(MLS)?;
            for (key, value) in staged.iter() {
                match value {
                    Some(value) => {
                        mls.insert(key.as_slice(), value.as_slice())?;
                    }
                    None => {
                        mls.remove(key.as_slice())?;
                    }
                }
            }

            for rollback in &batch.rollbacks {
                apply_rollback(&txn, rollback)?;
            }

            let mut groups = txn.open_table(GROUPS)?;
            for group in &batch.groups {
                let bytes = encode_record("groups", group)?;
                groups.insert(group.id.as_bytes(), bytes.as_slice())?;
            }

            if !batch.history.is_empty() {
                let mut history = txn.open_table(HISTORY)?;
                let mut index = txn.open_table(MESSAGE_INDEX)?;
                let mut refs = txn.open_table(chat::REFS)?;
                let mut gone = txn.open_table(chat::FILES_GONE)?;
                for entry in &batch.history {
                    let key = history_key(entry)?;
                    let old = index.get(entry.id.as_bytes())?.map(|k| k.value().to_vec());
                    if let Some(old) = old {
                        if old == key {
                            tracing::debug!(id = %entry.id.short(), "history entry already stored");
                            already.push(entry.id);
                            continue;
                        }
                        // The same message again in another epoch (re-sent after its branch
                        // lost): it moves to its new place, it is not shown twice.
                        if let Ok(old) = <[u8; HISTORY_KEY_LEN]>::try_from(old.as_slice()) {
                            history.remove(&old)?;
                        }
                    }
                    let mut entry = entry.clone();
                    chat::before_insert(&mut refs, &index, &mut history, &mut gone, &mut entry)?;
                    let bytes = encode_record("history", &entry)?;
                    history.insert(&key, bytes.as_slice())?;
                    index.insert(entry.id.as_bytes(), key.as_slice())?;
                }
            }

            if !batch.links.is_empty() {
                let mut index = txn.open_table(MESSAGE_INDEX)?;
                for (envelope, history) in &batch.links {
                    let key = index.get(history.as_bytes())?.map(|k| k.value().to_vec());
                    if let Some(key) = key {
                        index.insert(envelope.as_bytes(), key.as_slice())?;
                    }
                }
            }

            let mut envelopes = txn.open_table(ENVELOPES)?;
            let mut by_group = txn.open_table(ENVELOPES_BY_GROUP)?;
            for envelope in &batch.envelopes {
                if envelopes.get(envelope.id.as_bytes())?.is_some() {
                    continue;
                }
                let bytes = encode_record("envelopes", envelope)?;
                envelopes.insert(envelope.id.as_bytes(), bytes.as_slice())?;
                by_group.insert(&envelope_index_key(envelope), ())?;
            }
            if !batch.undecryptable.is_empty() {
                let mut lost = txn.open_table(UNDECRYPTABLE)?;
                let index = txn.open_table(MESSAGE_INDEX)?;
                for (envelope, reason) in &batch.undecryptable {
                    if envelopes.get(envelope.id.as_bytes())?.is_some()
                        || index.get(envelope.id.as_bytes())?.is_some()
                    {
                        continue;
                    }
                    let bytes = encode_record("envelopes", envelope)?;
                    envelopes.insert(envelope.id.as_bytes(), bytes.as_slice())?;
                    by_group.insert(&envelope_index_key(envelope), ())?;
                    let mut value = Vec::with_capacity(17);
                    value.extend_from_slice(&envelope.epoch.to_be_bytes());
                    value.push(reason.code());
                    value.extend_from_slice(&envelope.received_at_ms.to_be_bytes());
                    lost.insert(
                        &undecryptable_key(&envelope.group, &envelope.id),
                        value.as_slice(),
                    )?;
                }
            }
            if !batch.recovered.is_empty() {
                let mut lost = txn.open_table(UNDECRYPTABLE)?;
                for (group, id) in &batch.recovered {
                    lost.remove(&undecryptable_key(group, id))?;
                }
            }

            let mut invites = txn.open_table(INVITES)?;
            if !batch.forget_invites.is_empty() {
                let mut doomed = Vec::new();
                for row in invites.iter()? {
                    let (key, value) = row?;
                    let record: InviteRecord = decode_record("invites", value.value())?;
                    if batch.forget_invites.contains(&record.group) {
                        doomed.push(*key.value());
                    }
                }
                for key in doomed {
                    invites.remove(&key)?;
                }
            }
            for update in &batch.invites {
                let id = update.id();
                let current: Option<InviteRecord> = invites
                    .get(id.as_bytes())?
                    .map(|v| decode_record("invites", v.value()))
                    .transpose()?;
                let merged = InviteRecord::merge(current, update);
                let bytes = encode_record("invites", &merged)?;
                invites.insert(id.as_bytes(), bytes.as_slice())?;
            }

            let mut peers = txn.open_table(PEERS)?;
            for (peer, addrs) in &batch.peers {
                upsert_peer(&mut peers, peer, addrs)?;
            }
            chat::write(&txn, &batch.profiles, &batch.receipts, &batch.direct)?;
        }
        txn.commit()?;
        staged.clear();
        Ok(already)
    }

    /// Makes every earlier non-durable commit durable (an empty fsynced transaction).
    pub fn flush(&self) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            let _staged = self.mls.lock_staged();
            let txn = self.db.begin_write()?;
            txn.commit()?;
            Ok(())
        })();
        self.db.observe(result)
    }

    /// Drops all staged (uncommitted) MLS changes. Any `MlsGroup` held in memory may now be
    /// ahead of storage: reload it with `MlsGroup::load`.
    pub fn discard_staged(&self) {
        self.mls.lock_staged().clear();
    }

    /// True if openmls has written anything not yet committed.
    pub fn has_staged(&self) -> bool {
        !self.mls.lock_staged().is_empty()
    }

    /// All groups this node is a member of, in group-id order.
    pub fn groups(&self) -> Result<Vec<GroupMeta>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(GROUPS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            out.push(decode_record("groups", value.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` history entries of `group`, in canonical history order
    /// (`kith_protocol::sync::HistoryKey`: epoch, sent_at_ms, sender bytes, message id), which
    /// is the same on every member whatever the arrival order.
    pub fn history(&self, group: &GroupId, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        self.history_before(group, None, limit)
    }

    /// [`Store::history`], of the entries before message `before` only (a page further
    /// back); `before` must be a message of `group` ([`Store::position`]).
    pub fn history_before(
        &self,
        group: &GroupId,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let (lo, mut hi) = group_range(group);
        let mut inclusive = true;
        if let Some(key) = before.and_then(|b| <[u8; HISTORY_KEY_LEN]>::try_from(b).ok()) {
            if key[..32] != hi[..32] {
                return Ok(Vec::new());
            }
            hi = key;
            inclusive = false;
        }
        let rows = if inclusive {
            table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?
        } else {
            table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..&hi)?
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in rows.rev() {
            let (_, value) = row?;
            let entry: HistoryEntry = decode_record("history", value.value())?;
            // Reactions, edits and deletes are shown on their targets, not as lines.
            if entry.kind.target().is_some() {
                continue;
            }
            out.push(entry);
            if out.len() >= limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// What a chats list shows of `group`: the newest message (a text or a file; not
    /// membership lines, reactions, edits or deletes) and how many messages of others came
    /// after both `read` (the position of this node's read mark) and this node's own newest
    /// message (writing in a chat reads it), counted up to `cap`.
    pub fn chat_summary(
        &self,
        group: &GroupId,
        me: &PeerId,
        read: Option<&[u8]>,
        cap: u64,
    ) -> Result<ChatSummary, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let (lo, hi) = group_range(group);
        let mut summary = ChatSummary::default();
        let mut counting = true;
        for row in table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?.rev() {
            let (key, value) = row?;
            if read.is_some_and(|r| key.value().as_slice() <= r) {
                counting = false;
            }
            if !counting && summary.last.is_some() {
                break;
            }
            let entry: HistoryEntry = decode_record("history", value.value())?;
            if entry.kind.target().is_some() || entry.kind.text().is_none() {
                continue;
            }
            if entry.sender == *me {
                counting = false;
            } else if counting {
                summary.unread += 1;
                if summary.unread >= cap {
                    counting = false;
                }
            }
            if summary.last.is_none() {
                summary.last = Some(entry);
            }
        }
        Ok(summary)
    }

    /// Whether `peer` was removed from `group` after invite `invite` was made and not added
    /// back since: walking history from the newest entry, a removal of `peer` comes before
    /// (is newer than) both the invite's creation and any later add of `peer`. A removal
    /// older than what history keeps is not found (the answer is then `false`).
    pub fn removed_since_invite(
        &self,
        group: &GroupId,
        peer: &PeerId,
        invite: &InviteId,
    ) -> Result<bool, StoreError> {
        use kith_protocol::records::EntryKind;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let (lo, hi) = group_range(group);
        for row in table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?.rev() {
            let (_, value) = row?;
            let entry: HistoryEntry = decode_record("history", value.value())?;
            match &entry.kind {
                EntryKind::MembersRemoved(gone) if gone.contains(peer) => return Ok(true),
                EntryKind::MembersAdded(added) if added.contains(peer) => return Ok(false),
                EntryKind::InviteCreated { id, .. } if id == invite => return Ok(false),
                _ => {}
            }
        }
        Ok(false)
    }

    /// [`Store::has_message`] for each of `ids`, in one read transaction.
    pub fn has_messages(&self, ids: &[MessageId]) -> Result<Vec<bool>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(MESSAGE_INDEX)?;
        let envelopes = txn.open_table(ENVELOPES)?;
        ids.iter()
            .map(|id| {
                Ok(index.get(id.as_bytes())?.is_some() || envelopes.get(id.as_bytes())?.is_some())
            })
            .collect()
    }

    /// True if the message was already seen: it has a history row or its envelope is stored.
    pub fn has_message(&self, id: &MessageId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        if txn.open_table(MESSAGE_INDEX)?.get(id.as_bytes())?.is_some() {
            return Ok(true);
        }
        Ok(txn.open_table(ENVELOPES)?.get(id.as_bytes())?.is_some())
    }

    /// How many envelopes of `group` this node kept as undecryptable, by reason.
    pub fn undecryptable_counts(
        &self,
        group: &GroupId,
    ) -> Result<BTreeMap<Undecryptable, u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UNDECRYPTABLE)?;
        let lo = undecryptable_key(group, &MessageId([0; 32]));
        let hi = undecryptable_key(group, &MessageId([0xff; 32]));
        let mut counts = BTreeMap::new();
        for row in table.range::<&[u8; 64]>(&lo..=&hi)? {
            let (_, value) = row?;
            let reason = value
                .value()
                .get(8)
                .copied()
                .and_then(Undecryptable::from_code)
                .ok_or_else(|| StoreError::Corrupt {
                    table: "undecryptable",
                    reason: "unknown reason code".into(),
                })?;
            *counts.entry(reason).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// The stored envelope with this id, if any.
    pub fn envelope(&self, id: &MessageId) -> Result<Option<StoredEnvelope>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENVELOPES)?;
        let value = table.get(id.as_bytes())?;
        value
            .map(|v| decode_record("envelopes", v.value()))
            .transpose()
    }

    /// The stored envelopes of `group`, in `(epoch, id)` order, at most `limit` of them (the
    /// oldest epochs first), found through the `envelopes_by_group` index. Used to summarise
    /// what this node holds and to answer sync requests.
    pub fn envelopes_of_group(
        &self,
        group: &GroupId,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(ENVELOPES_BY_GROUP)?;
        let table = txn.open_table(ENVELOPES)?;
        let (lo, hi) = envelope_index_range(group, 0, u64::MAX);
        let mut out = Vec::new();
        for row in index.range::<&[u8; ENVELOPE_INDEX_KEY_LEN]>(&lo..=&hi)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = row?;
            let id = index_key_id(key.value());
            let Some(value) = table.get(&id)? else {
                return Err(StoreError::Corrupt {
                    table: "envelopes_by_group",
                    reason: format!("indexes a missing envelope {}", MessageId(id).short()),
                });
            };
            out.push(decode_record("envelopes", value.value())?);
        }
        Ok(out)
    }

    /// The history entry recorded for message `id`, if any (looked up through
    /// `message_index`).
    pub fn history_entry(&self, id: &MessageId) -> Result<Option<HistoryEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(MESSAGE_INDEX)?;
        let Some(key) = index.get(id.as_bytes())? else {
            return Ok(None);
        };
        let Ok(key) = <[u8; HISTORY_KEY_LEN]>::try_from(key.value()) else {
            return Ok(None);
        };
        let history = txn.open_table(HISTORY)?;
        let value = history.get(&key)?;
        value
            .map(|v| decode_record("history", v.value()))
            .transpose()
    }

    /// The epoch of the oldest history entry of `group` (for a joiner, the epoch it joined
    /// at), if it has any.
    pub fn first_history_epoch(&self, group: &GroupId) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let (lo, hi) = group_range(group);
        let Some(row) = table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?.next() else {
            return Ok(None);
        };
        let (_, value) = row?;
        let entry: HistoryEntry = decode_record("history", value.value())?;
        Ok(Some(entry.epoch))
    }

    /// Deletes `group`'s history beyond `retention`, oldest first in canonical order, touching at
    /// most `budget` history rows; [`Pruned::more`] says the budget ran out. Committed without
    /// fsync, like received messages.
    ///
    /// A history row goes if it is older than `retention.max_age_ms` (by its `sent_at_ms`,
    /// relative to `now_ms`) or beyond the newest `retention.max_messages`; the walk stops at
    /// the first row that is neither. With it go its `message_index` entry and, for an
    /// application message, its envelope. Then every stored envelope of the group from an epoch
    /// below the oldest retained row's epoch `T` is deleted, except commits of epoch `T - 1`
    /// (the commit into `T`): the commit chain from `T - 1` on stays servable by sync. If every
    /// row went, `T` is the newest deleted row's epoch.
    pub fn prune(
        &self,
        group: &GroupId,
        retention: Retention,
        now_ms: u64,
        budget: usize,
    ) -> Result<Pruned, StoreError> {
        let result = self.prune_inner(group, retention, now_ms, budget);
        self.db.observe(result)
    }

    fn prune_inner(
        &self,
        group: &GroupId,
        retention: Retention,
        now_ms: u64,
        budget: usize,
    ) -> Result<Pruned, StoreError> {
        let cutoff = now_ms.saturating_sub(retention.max_age_ms);
        let (lo, hi) = group_range(group);
        // Plan in a read transaction; the rows are only read.
        let mut doomed: Vec<([u8; HISTORY_KEY_LEN], HistoryEntry)> = Vec::new();
        let mut more = false;
        let threshold = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(HISTORY)?;
            let total = table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?.count() as u64;
            let mut excess = total.saturating_sub(retention.max_messages);
            let mut threshold = None;
            for row in table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)? {
                let (key, value) = row?;
                let entry: HistoryEntry = decode_record("history", value.value())?;
                if excess == 0 && entry.sent_at_ms >= cutoff {
                    threshold = Some(entry.epoch);
                    break;
                }
                if doomed.len() >= budget {
                    more = true;
                    threshold = Some(entry.epoch);
                    break;
                }
                excess = excess.saturating_sub(1);
                doomed.push((*key.value(), entry));
            }
            threshold.or_else(|| doomed.last().map(|(_, e)| e.epoch))
        };
        let Some(threshold) = threshold else {
            return Ok(Pruned::default());
        };
        let mut pruned = Pruned {
            history: doomed.len(),
            envelopes: 0,
            more,
        };
        let _staged = self.mls.lock_staged();
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Database(redb::Error::from(e)))?;
        {
            let mut history = txn.open_table(HISTORY)?;
            let mut index = txn.open_table(MESSAGE_INDEX)?;
            let mut envelopes = txn.open_table(ENVELOPES)?;
            let mut by_group = txn.open_table(ENVELOPES_BY_GROUP)?;
            let mut refs = txn.open_table(chat::REFS)?;
            let mut gone = txn.open_table(chat::FILES_GONE)?;
            for (key, entry) in &doomed {
                chat::on_prune(&mut refs, &mut gone, entry)?;
                history.remove(key)?;
                index.remove(entry.id.as_bytes())?;
                let app = envelopes
                    .get(entry.id.as_bytes())?
                    .map(|v| decode_record::<StoredEnvelope>("envelopes", v.value()))
                    .transpose()?
                    .filter(|env| env.kind == PayloadKind::Application);
                if let Some(env) = app {
                    envelopes.remove(entry.id.as_bytes())?;
                    by_group.remove(&envelope_index_key(&env))?;
                    pruned.envelopes += 1;
                }
            }
            // The group's envelopes of epochs below `threshold`, from the index; of epoch
            // `threshold - 1`, the commits stay.
            let (lo, hi) = envelope_index_range(group, 0, threshold.saturating_sub(1));
            let mut old: Vec<[u8; ENVELOPE_INDEX_KEY_LEN]> = Vec::new();
            if threshold > 0 {
                for row in by_group.range::<&[u8; ENVELOPE_INDEX_KEY_LEN]>(&lo..=&hi)? {
                    let (key, _) = row?;
                    let key = *key.value();
                    if index_key_epoch(&key).saturating_add(1) >= threshold {
                        let id = index_key_id(&key);
                        let is_commit = envelopes
                            .get(&id)?
                            .map(|v| decode_record::<StoredEnvelope>("envelopes", v.value()))
                            .transpose()?
                            .is_some_and(|env| env.kind == PayloadKind::Commit);
                        if is_commit {
                            continue;
                        }
                    }
                    old.push(key);
                }
            }
            for key in &old {
                let id = index_key_id(key);
                envelopes.remove(&id)?;
                by_group.remove(key)?;
                // A "seen, no history row" marker, if any; history rows are below `threshold`
                // only when already deleted above.
                index.remove(&id)?;
            }
            pruned.envelopes += old.len();
        }
        txn.commit()?;
        Ok(pruned)
    }

    /// The invite record with this id, if any.
    pub fn invite(&self, id: &InviteId) -> Result<Option<InviteRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(INVITES)?;
        let value = table.get(id.as_bytes())?;
        value
            .map(|v| decode_record("invites", v.value()))
            .transpose()
    }

    /// Every stored invite record (of all groups), in id order.
    pub fn invites(&self) -> Result<Vec<InviteRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(INVITES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            out.push(decode_record("invites", value.value())?);
        }
        Ok(out)
    }

    /// Deletes the invite records that expired before `before` (Unix seconds), at most
    /// `budget` of them; returns how many. Run with the retention timer, so the table stays
    /// bounded by the invites of the recent past.
    pub fn prune_invites(&self, before: u64, budget: usize) -> Result<usize, StoreError> {
        let result = self.prune_invites_inner(before, budget);
        self.db.observe(result)
    }

    fn prune_invites_inner(&self, before: u64, budget: usize) -> Result<usize, StoreError> {
        let expired: Vec<InviteId> = self
            .invites()?
            .into_iter()
            .filter(|r| r.secret_hash.is_some() && r.expires_at < before)
            .map(|r| r.id)
            .take(budget)
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Database(redb::Error::from(e)))?;
        {
            let mut table = txn.open_table(INVITES)?;
            for id in &expired {
                table.remove(id.as_bytes())?;
            }
        }
        txn.commit()?;
        Ok(expired.len())
    }

    /// The address book: every known peer with its addresses (most recently learned first),
    /// in peer-id byte order. At most [`MAX_PEERS`] entries.
    pub fn peers(&self) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PEERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let peer = PeerId::from_bytes(key.value()).map_err(|e| StoreError::Corrupt {
                table: "peers",
                reason: format!("bad peer id: {e}"),
            })?;
            let addrs = decode_addrs(value.value())?
                .into_iter()
                .map(|bytes| {
                    Multiaddr::try_from(bytes).map_err(|e| StoreError::Corrupt {
                        table: "peers",
                        reason: format!("bad multiaddr: {e}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push((peer, addrs));
        }
        Ok(out)
    }
}

/// A shared view of a [`Store`]'s health, readable without the store.
#[derive(Debug, Clone)]
pub struct HealthView(Arc<DbSlot>);

impl HealthView {
    /// The store's current health.
    pub fn health(&self) -> StoreHealth {
        self.0.health()
    }

    /// The data directory, for messages.
    pub fn dir(&self) -> &Path {
        self.0.dir()
    }

    /// Failed writes so far for `reason`.
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.0.failures(reason)
    }
}

/// Merges `addrs` into the peer's entry, evicting another peer if the book is full.
fn upsert_peer(
    peers: &mut redb::Table<'_, &[u8], &[u8]>,
    peer: &PeerId,
    addrs: &[Multiaddr],
) -> Result<(), StoreError> {
    let key = peer.to_bytes();
    let old = peers
        .get(key.as_slice())?
        .map(|v| decode_addrs(v.value()))
        .transpose()?;
    if old.is_none() && addrs.is_empty() {
        return Ok(());
    }
    let mut merged: Vec<Vec<u8>> = Vec::with_capacity(MAX_ADDRS_PER_PEER);
    for addr in addrs
        .iter()
        .map(Multiaddr::to_vec)
        .chain(old.iter().flatten().cloned())
    {
        if merged.len() == MAX_ADDRS_PER_PEER {
            break;
        }
        if !merged.contains(&addr) {
            merged.push(addr);
        }
    }
    if old.is_none() && peers.len()? >= MAX_PEERS {
        let victim = {
            let after = peers
                .range::<&[u8]>((Bound::Excluded(key.as_slice()), Bound::Unbounded))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().to_vec());
            match after {
                Some(k) => Some(k),
                None => peers.first()?.map(|(k, _)| k.value().to_vec()),
            }
        };
        if let Some(victim) = victim {
            peers.remove(victim.as_slice())?;
        }
    }
    let bytes = encode_record("peers", &merged)?;
    peers.insert(key.as_slice(), bytes.as_slice())?;
    Ok(())
}

/// The `history` key of an entry: group id, then the canonical history order
/// `(epoch, sent_at_ms, sender bytes, message id)` in a form whose byte order is that order. One
/// group's rows are contiguous.
///
/// The sender is zero-padded to [`MAX_SENDER_BYTES`] and followed by its length, which keeps
/// lexicographic byte order exactly (a plain length prefix would sort short ids first; in
/// practice every Ed25519 PeerId is 38 bytes).
fn history_key(entry: &HistoryEntry) -> Result<[u8; HISTORY_KEY_LEN], StoreError> {
    let sender = entry.sender.to_bytes();
    if sender.len() > MAX_SENDER_BYTES {
        return Err(StoreError::TooLarge {
            table: "history",
            len: sender.len(),
            limit: MAX_SENDER_BYTES,
        });
    }
    let mut key = [0u8; HISTORY_KEY_LEN];
    key[..32].copy_from_slice(entry.group.as_bytes());
    key[32..40].copy_from_slice(&entry.epoch.to_be_bytes());
    // Members record a commit at their own times: order it at the end of its epoch instead.
    let sent_at_ms = if entry.kind.is_commit() {
        u64::MAX
    } else {
        entry.sent_at_ms
    };
    key[40..48].copy_from_slice(&sent_at_ms.to_be_bytes());
    key[48..48 + sender.len()].copy_from_slice(&sender);
    key[48 + MAX_SENDER_BYTES] = sender.len() as u8;
    key[HISTORY_KEY_LEN - 32..].copy_from_slice(entry.id.as_bytes());
    Ok(key)
}

/// The smallest and largest possible `history` keys of `group`.
fn group_range(group: &GroupId) -> ([u8; HISTORY_KEY_LEN], [u8; HISTORY_KEY_LEN]) {
    let mut lo = [0u8; HISTORY_KEY_LEN];
    lo[..32].copy_from_slice(group.as_bytes());
    let mut hi = [0xffu8; HISTORY_KEY_LEN];
    hi[..32].copy_from_slice(group.as_bytes());
    (lo, hi)
}

/// Schema 1 → 2: re-keys every `history` row from the arrival sequence to [`history_key`],
/// points `message_index` at the new keys and drops `next_seq`. Runs inside the caller's
/// transaction, which also writes the new schema version: all of it or nothing.
/// Checks, inside the open transaction, that the database belongs to `owner`, recording
/// `owner` if no owner is recorded yet (a new database, or one written before owners were
/// recorded, which `existed`). A refusal aborts the transaction: the file stays untouched.
fn claim_owner(
    txn: &redb::WriteTransaction,
    owner: &PeerId,
    existed: bool,
) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let recorded = meta
        .get(META_OWNER)?
        .map(|v| decode_owner(v.value()))
        .transpose()?;
    match recorded {
        Some(recorded) if recorded == *owner => Ok(()),
        Some(recorded) => Err(StoreError::OtherOwner { owner: recorded }),
        None => {
            meta.insert(META_OWNER, owner.to_bytes().as_slice())?;
            if existed {
                tracing::info!(%owner, "recorded the node key as the owner of an older database");
            }
            Ok(())
        }
    }
}

fn decode_owner(bytes: &[u8]) -> Result<PeerId, StoreError> {
    PeerId::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table: "meta",
        reason: format!("owner is not a PeerId: {e}"),
    })
}

fn migrate_v1(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    const V1_HISTORY: TableDefinition<&[u8; V1_HISTORY_KEY_LEN], &[u8]> =
        TableDefinition::new("history");
    let mut rows: Vec<Vec<u8>> = Vec::new();
    {
        let old = txn.open_table(V1_HISTORY)?;
        for row in old.iter()? {
            let (_, value) = row?;
            rows.push(value.value().to_vec());
        }
    }
    txn.delete_table(V1_HISTORY)?;
    let mut history = txn.open_table(HISTORY)?;
    let mut index = txn.open_table(MESSAGE_INDEX)?;
    for bytes in &rows {
        let entry: HistoryEntry = decode_record("history", bytes)?;
        let key = history_key(&entry)?;
        history.insert(&key, bytes.as_slice())?;
        index.insert(entry.id.as_bytes(), key.as_slice())?;
    }
    txn.open_table(META)?.remove(META_NEXT_SEQ)?;
    tracing::info!(rows = rows.len(), "migrated the store from schema 1 to 2");
    Ok(())
}

/// Deletes what a losing branch stored (see [`Batch::rollbacks`]).
fn apply_rollback(txn: &redb::WriteTransaction, r: &Rollback) -> Result<(), StoreError> {
    let mut envelopes = txn.open_table(ENVELOPES)?;
    let mut by_group = txn.open_table(ENVELOPES_BY_GROUP)?;
    // The group's envelopes of epochs after `to_epoch`, from the index.
    let mut doomed: Vec<[u8; ENVELOPE_INDEX_KEY_LEN]> = Vec::new();
    if let Some(first) = r.to_epoch.checked_add(1) {
        let (lo, hi) = envelope_index_range(&r.group, first, u64::MAX);
        for row in by_group.range::<&[u8; ENVELOPE_INDEX_KEY_LEN]>(&lo..=&hi)? {
            let (key, _) = row?;
            doomed.push(*key.value());
        }
    }
    // The lost commits, wherever they are.
    for id in &r.lost_commits {
        let env = envelopes
            .get(id.as_bytes())?
            .map(|v| decode_record::<StoredEnvelope>("envelopes", v.value()))
            .transpose()?;
        if let Some(env) = env.filter(|e| e.group == r.group) {
            doomed.push(envelope_index_key(&env));
        }
    }
    doomed.sort_unstable();
    doomed.dedup();
    for key in &doomed {
        envelopes.remove(&index_key_id(key))?;
        by_group.remove(key)?;
    }
    let mut history = txn.open_table(HISTORY)?;
    let mut index = txn.open_table(MESSAGE_INDEX)?;
    for id in &r.forget_history {
        let key = index.remove(id.as_bytes())?.map(|k| k.value().to_vec());
        if let Some(key) = key.and_then(|k| <[u8; HISTORY_KEY_LEN]>::try_from(k.as_slice()).ok()) {
            history.remove(&key)?;
        }
    }
    tracing::info!(
        group = %r.group.short(),
        to_epoch = r.to_epoch,
        envelopes = doomed.len(),
        "deleted what a losing branch stored"
    );
    Ok(())
}

/// Schema 2 → 3: the inviter's own invite records, keyed by secret hash, become group-wide
/// records keyed by invite id (creator unknown, no approval, not revoked, uses kept).
fn migrate_v2(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    /// The schema-2 record.
    #[derive(Serialize, serde::Deserialize)]
    struct InviteRecordV2 {
        group: GroupId,
        secret_hash: [u8; 32],
        expires_at: u64,
        max_uses: u32,
        uses: u32,
        created_at: u64,
    }
    let mut old: Vec<InviteRecordV2> = Vec::new();
    {
        let table = txn.open_table(INVITES)?;
        for row in table.iter()? {
            let (_, value) = row?;
            old.push(decode_record("invites", value.value())?);
        }
    }
    txn.delete_table(INVITES)?;
    let mut table = txn.open_table(INVITES)?;
    for r in &old {
        let id = InviteId::of(&r.secret_hash);
        let record = InviteRecord {
            group: r.group,
            id,
            secret_hash: Some(r.secret_hash),
            expires_at: r.expires_at,
            max_uses: r.max_uses,
            uses: r.uses,
            created_at: r.created_at,
            creator: None,
            approval: false,
            revoked: false,
        };
        let bytes = encode_record("invites", &record)?;
        table.insert(id.as_bytes(), bytes.as_slice())?;
    }
    tracing::info!(invites = old.len(), "migrated the store from schema 2 to 3");
    Ok(())
}

/// Schema 3 → 4: builds the `envelopes_by_group` index from the `envelopes` table. A row
/// that does not decode is left out of the index (logged), so a damaged envelope does not
/// keep the node from opening; no sync could have served it anyway.
fn migrate_v3(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut keys: Vec<[u8; ENVELOPE_INDEX_KEY_LEN]> = Vec::new();
    {
        let envelopes = txn.open_table(ENVELOPES)?;
        for row in envelopes.iter()? {
            let (id, value) = row?;
            match decode_record::<StoredEnvelope>("envelopes", value.value()) {
                Ok(env) => keys.push(envelope_index_key(&env)),
                Err(e) => tracing::warn!(
                    id = %MessageId(*id.value()).short(),
                    error = %e,
                    "envelope left out of the per-group index: it does not decode"
                ),
            }
        }
    }
    let mut by_group = txn.open_table(ENVELOPES_BY_GROUP)?;
    for key in &keys {
        by_group.insert(key, ())?;
    }
    tracing::info!(
        envelopes = keys.len(),
        "migrated the store from schema 3 to 4"
    );
    Ok(())
}

/// The `envelopes_by_group` key of an envelope: group id ‖ epoch (big-endian) ‖ message id.
fn envelope_index_key(env: &StoredEnvelope) -> [u8; ENVELOPE_INDEX_KEY_LEN] {
    let mut key = [0u8; ENVELOPE_INDEX_KEY_LEN];
    key[..32].copy_from_slice(env.group.as_bytes());
    key[32..40].copy_from_slice(&env.epoch.to_be_bytes());
    key[40..].copy_from_slice(env.id.as_bytes());
    key
}

/// The smallest and largest `envelopes_by_group` keys of `group` for epochs `first..=last`.
fn envelope_index_range(
    group: &GroupId,
    first: u64,
    last: u64,
) -> ([u8; ENVELOPE_INDEX_KEY_LEN], [u8; ENVELOPE_INDEX_KEY_LEN]) {
    let mut lo = [0u8; ENVELOPE_INDEX_KEY_LEN];
    lo[..32].copy_from_slice(group.as_bytes());
    lo[32..40].copy_from_slice(&first.to_be_bytes());
    let mut hi = [0xffu8; ENVELOPE_INDEX_KEY_LEN];
    hi[..32].copy_from_slice(group.as_bytes());
    hi[32..40].copy_from_slice(&last.to_be_bytes());
    (lo, hi)
}

/// The message id in an `envelopes_by_group` key.
fn index_key_id(key: &[u8; ENVELOPE_INDEX_KEY_LEN]) -> [u8; 32] {
    let mut id = [0u8; 32];
    id.copy_from_slice(&key[40..]);
    id
}

/// The epoch in an `envelopes_by_group` key.
fn index_key_epoch(key: &[u8; ENVELOPE_INDEX_KEY_LEN]) -> u64 {
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&key[32..40]);
    u64::from_be_bytes(epoch)
}

fn encode_record<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    let bytes = codec::encode(value).map_err(|e| StoreError::Serde(e.to_string()))?;
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(StoreError::TooLarge {
            table,
            len: bytes.len(),
            limit: MAX_DECODE_BYTES,
        });
    }
    Ok(bytes)
}

fn decode_record<T: Serialize + DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    codec::decode(bytes, MAX_DECODE_BYTES).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

fn decode_addrs(bytes: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    decode_record("peers", bytes)
}

fn decode_u32(bytes: &[u8]) -> Result<u32, StoreError> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            table: "meta",
            reason: format!("expected 4 bytes, found {}", bytes.len()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_protocol::Keypair;
    use kith_protocol::envelope::PayloadKind;
    use kith_protocol::records::EntryKind;
    use redb::ReadableDatabase;
    use tempfile::TempDir;

    fn open_temp() -> (TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("kith.redb")).expect("open");
        (dir, store)
    }

    fn peer(n: u8) -> PeerId {
        peer_n(u16::from(n))
    }

    fn peer_n(n: u16) -> PeerId {
        let mut seed = [0x42; 32];
        seed[..2].copy_from_slice(&n.to_be_bytes());
        Keypair::ed25519_from_bytes(seed)
            .expect("ed25519 key")
            .public()
            .to_peer_id()
    }

    fn entry(group: u8, id: u8, text: &str) -> HistoryEntry {
        HistoryEntry {
            group: GroupId([group; 32]),
            id: MessageId([id; 32]),
            epoch: 1,
            sender: peer(1),
            sent_at_ms: 10,
            received_at_ms: 20,
            kind: EntryKind::Text(text.into()),
        }
    }

    fn envelope(id: u8, len: usize) -> StoredEnvelope {
        StoredEnvelope {
            id: MessageId([id; 32]),
            group: GroupId([1; 32]),
            epoch: 1,
            kind: PayloadKind::Application,
            bytes: vec![id; len],
            received_at_ms: 5,
        }
    }

    fn texts(entries: &[HistoryEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::Text(t) => t.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn the_database_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, store) = open_temp();
        let path = dir.path().join("kith.redb");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode();
        assert_eq!(mode(&path) & 0o777, 0o600);
        drop(store);
        // An older file made readable by others is tightened on the next open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let _store = Store::open(&path).expect("reopen");
        assert_eq!(mode(&path) & 0o777, 0o600);
    }

    #[test]
    fn errors_and_handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<StoreError>();
        check::<Store>();
        check::<KithProvider>();
        check::<MlsStorage>();
    }

    #[test]
    fn a_copy_of_a_stored_entry_is_reported_and_a_moved_one_is_not() {
        let (_dir, store) = open_temp();
        let first = Batch {
            history: vec![entry(1, 1, "a")],
            ..Batch::default()
        };
        assert!(store.commit_with(first, true).expect("commit").is_empty());
        // The same entry again (a text sent again on request): stored already.
        let again = Batch {
            history: vec![entry(1, 1, "a"), entry(1, 2, "b")],
            ..Batch::default()
        };
        assert_eq!(
            store.commit_with(again, true).expect("commit"),
            vec![MessageId([1; 32])]
        );
        // In another epoch (re-sent after its branch lost) it moves: not a copy.
        let mut moved = entry(1, 1, "a");
        moved.epoch = 2;
        let batch = Batch {
            history: vec![moved],
            ..Batch::default()
        };
        assert!(store.commit_with(batch, true).expect("commit").is_empty());
        assert_eq!(
            texts(&store.history(&GroupId([1; 32]), 10).expect("history")),
            ["b", "a"]
        );
    }

    #[test]
    fn history_is_ordered_per_group_and_limited() {
        let (dir, store) = open_temp();
        let batch = Batch {
            history: vec![
                entry(1, 1, "a1"),
                entry(2, 2, "b1"),
                entry(1, 3, "a2"),
                entry(1, 4, "a3"),
            ],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let g1 = GroupId([1; 32]);
        assert_eq!(
            texts(&store.history(&g1, 100).expect("history")),
            ["a1", "a2", "a3"]
        );
        assert_eq!(
            texts(&store.history(&g1, 2).expect("history")),
            ["a2", "a3"]
        );
        assert!(store.history(&g1, 0).expect("history").is_empty());
        assert_eq!(
            texts(&store.history(&GroupId([2; 32]), 10).expect("history")),
            ["b1"]
        );
        assert!(
            store
                .history(&GroupId([3; 32]), 10)
                .expect("history")
                .is_empty()
        );

        // Rows written after a reopen still sort in.
        drop(store);
        let store = Store::open(&dir.path().join("kith.redb")).expect("reopen");
        let batch = Batch {
            history: vec![entry(1, 5, "a4")],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(
            texts(&store.history(&g1, 2).expect("history")),
            ["a3", "a4"]
        );
    }

    fn ids(entries: &[HistoryEntry]) -> Vec<u8> {
        entries.iter().map(|e| e.id.0[0]).collect()
    }

    /// An entry with explicit order fields.
    fn at(id: u8, epoch: u64, sent_at_ms: u64, sender: u8) -> HistoryEntry {
        HistoryEntry {
            epoch,
            sent_at_ms,
            sender: peer(sender),
            ..entry(1, id, "x")
        }
    }

    fn app_envelope(e: &HistoryEntry) -> StoredEnvelope {
        StoredEnvelope {
            id: e.id,
            group: e.group,
            epoch: e.epoch,
            kind: PayloadKind::Application,
            bytes: vec![e.id.0[0]],
            received_at_ms: 5,
        }
    }

    fn commit_envelope(id: u8, epoch: u64) -> StoredEnvelope {
        StoredEnvelope {
            kind: PayloadKind::Commit,
            epoch,
            ..envelope(id, 3)
        }
    }

    #[test]
    fn history_is_in_canonical_order_whatever_the_arrival_order() {
        let (s1, s2) = (peer(1).to_bytes(), peer(2).to_bytes());
        let (lo, hi) = if s1 < s2 { (1, 2) } else { (2, 1) };
        // Canonical: (epoch, sent_at_ms, sender bytes, id).
        let canonical = vec![
            at(9, 1, 500, hi),
            at(3, 2, 100, lo),
            at(2, 2, 100, hi),
            at(1, 2, 200, lo),
            at(4, 2, 200, lo),
            at(5, 3, 0, hi),
        ];
        let want = ids(&canonical);
        for order in [[5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3], [0, 1, 2, 3, 4, 5]] {
            let (_dir, store) = open_temp();
            // One entry per commit, as if they arrived one by one.
            for i in order {
                let batch = Batch {
                    history: vec![canonical[i].clone()],
                    ..Batch::default()
                };
                store.commit(batch).expect("commit");
            }
            let got = store.history(&GroupId([1; 32]), 100).expect("history");
            assert_eq!(ids(&got), want, "arrival order {order:?}");
            assert_eq!(
                ids(&store.history(&GroupId([1; 32]), 2).expect("history")),
                want[4..]
            );
            assert_eq!(
                store.first_history_epoch(&GroupId([1; 32])).expect("first"),
                Some(1)
            );
            let e = store
                .history_entry(&MessageId([4; 32]))
                .expect("entry")
                .expect("present");
            assert_eq!(e, canonical[4]);
        }
    }

    #[test]
    fn schema_1_is_migrated_in_place() {
        const V1_HISTORY: TableDefinition<&[u8; V1_HISTORY_KEY_LEN], &[u8]> =
            TableDefinition::new("history");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kith.redb");
        // A minimal schema-1 writer: rows keyed by arrival sequence, in arrival order.
        let arrived = [
            at(1, 3, 10, 1),
            at(2, 1, 50, 1),
            at(3, 2, 5, 1),
            at(4, 1, 20, 1),
        ];
        raw_write(&path, |txn| {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, 1u32.to_be_bytes().as_slice())
                .expect("version");
            meta.insert(META_NEXT_SEQ, 4u64.to_be_bytes().as_slice())
                .expect("seq");
            let mut history = txn.open_table(V1_HISTORY).expect("history");
            let mut index = txn.open_table(MESSAGE_INDEX).expect("index");
            for (seq, e) in arrived.iter().enumerate() {
                let mut key = [0u8; V1_HISTORY_KEY_LEN];
                key[..32].copy_from_slice(e.group.as_bytes());
                key[32..].copy_from_slice(&(seq as u64).to_be_bytes());
                let bytes = codec::encode(e).expect("encode");
                history.insert(&key, bytes.as_slice()).expect("row");
                index
                    .insert(e.id.as_bytes(), key.as_slice())
                    .expect("index");
            }
            // A "seen, no history row" marker survives as is.
            index.insert(&[7; 32], [].as_slice()).expect("marker");
        });
        let store = Store::open(&path).expect("migrate");
        let g = GroupId([1; 32]);
        assert_eq!(ids(&store.history(&g, 10).expect("history")), [4, 2, 3, 1]);
        for e in &arrived {
            assert_eq!(store.history_entry(&e.id).expect("entry").as_ref(), Some(e));
        }
        assert!(store.has_message(&MessageId([7; 32])).expect("has"));
        // New rows sort in; a duplicate of a migrated row is still dropped.
        store
            .commit(Batch {
                history: vec![at(5, 2, 1, 1), at(2, 1, 50, 1)],
                ..Batch::default()
            })
            .expect("commit");
        assert_eq!(
            ids(&store.history(&g, 10).expect("history")),
            [4, 2, 5, 3, 1]
        );
        drop(store);
        // The version was bumped with the re-keying; reopening does not migrate again.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            ids(&store.history(&g, 10).expect("history")),
            [4, 2, 5, 3, 1]
        );
        drop(store);
        let db = Database::create(&path).expect("raw open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        let version = meta
            .get(META_SCHEMA_VERSION)
            .expect("get")
            .expect("version");
        assert_eq!(decode_u32(version.value()).expect("u32"), SCHEMA_VERSION);
        assert!(meta.get(META_NEXT_SEQ).expect("get").is_none());
    }

    #[test]
    fn schema_2_invites_are_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kith.redb");
        raw_write(&path, |txn| {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, 2u32.to_be_bytes().as_slice())
                .expect("version");
            let mut invites = txn.open_table(INVITES).expect("invites");
            // The schema-2 golden record: group 44…44, secret hash 66…66, expiry
            // 1 800 000 000, 5 uses allowed, 2 used, created 1 700 000 000.
            let mut bytes = vec![0x44; 32];
            bytes.extend_from_slice(&[0x66; 32]);
            bytes.extend_from_slice(&[0xfc, 0x00, 0xd2, 0x49, 0x6b, 0x05, 0x02]);
            bytes.extend_from_slice(&[0xfc, 0x00, 0xf1, 0x53, 0x65]);
            invites.insert(&[0x66; 32], bytes.as_slice()).expect("row");
        });
        let store = Store::open(&path).expect("migrate");
        let id = InviteId::of(&[0x66; 32]);
        let r = store.invite(&id).expect("read").expect("migrated");
        assert_eq!(r.group, GroupId([0x44; 32]));
        assert_eq!(r.secret_hash, Some([0x66; 32]));
        assert_eq!((r.max_uses, r.uses), (5, 2));
        assert_eq!((r.expires_at, r.created_at), (1_800_000_000, 1_700_000_000));
        assert!(!r.revoked && !r.approval && r.creator.is_none());
        assert_eq!(store.invites().expect("all").len(), 1);
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.invite(&id).expect("read"), Some(r));
    }

    #[test]
    fn prune_by_count_keeps_the_newest_in_order_and_the_commit_chain() {
        let (_dir, store) = open_temp();
        let g = GroupId([1; 32]);
        // Epochs 1..=4, three messages each (ids 10*epoch + k), arriving newest first.
        let entries: Vec<HistoryEntry> = (1..=4u8)
            .rev()
            .flat_map(|e| {
                (0..3u8).map(move |k| at(10 * e + k, u64::from(e), 100 + u64::from(k), 1))
            })
            .collect();
        let commits: Vec<StoredEnvelope> = (1..=4u8)
            .map(|e| commit_envelope(200 + e, u64::from(e)))
            .collect();
        let batch = Batch {
            history: entries.clone(),
            envelopes: entries.iter().map(app_envelope).chain(commits).collect(),
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let keep = Retention {
            max_age_ms: u64::MAX,
            max_messages: 5,
        };
        // A budget of 4 stops early and says so.
        let p = store.prune(&g, keep, 1_000, 4).expect("prune");
        assert_eq!((p.history, p.more), (4, true));
        let p = store.prune(&g, keep, 1_000, 100).expect("prune");
        assert_eq!((p.history, p.more), (3, false));
        assert_eq!(
            ids(&store.history(&g, 100).expect("history")),
            [31, 32, 40, 41, 42]
        );
        assert_eq!(store.first_history_epoch(&g).expect("first"), Some(3));
        for gone in [10, 12, 20, 22, 30] {
            assert!(
                !store.has_message(&MessageId([gone; 32])).expect("has"),
                "{gone}"
            );
        }
        for kept in [31, 42] {
            assert!(
                store
                    .envelope(&MessageId([kept; 32]))
                    .expect("env")
                    .is_some()
            );
        }
        // Commits of epochs 1 goes; 2 (into 3), 3 and 4 stay.
        assert!(
            store
                .envelope(&MessageId([201; 32]))
                .expect("env")
                .is_none()
        );
        for kept in [202, 203, 204] {
            assert!(
                store
                    .envelope(&MessageId([kept; 32]))
                    .expect("env")
                    .is_some(),
                "{kept}"
            );
        }
        // Nothing more is due.
        assert_eq!(
            store.prune(&g, keep, 1_000, 100).expect("prune"),
            Pruned::default()
        );
        assert_index_matches(&store);
    }

    #[test]
    fn prune_by_age_leaves_other_groups_alone() {
        let (_dir, store) = open_temp();
        let g = GroupId([1; 32]);
        let entries: Vec<HistoryEntry> = (0..6u8)
            .map(|i| at(i, 1 + u64::from(i / 2), 1_000 * u64::from(i), 1))
            .collect();
        let other = HistoryEntry {
            sent_at_ms: 0,
            ..entry(2, 99, "other")
        };
        let batch = Batch {
            history: entries.iter().cloned().chain([other.clone()]).collect(),
            envelopes: entries.iter().chain([&other]).map(app_envelope).collect(),
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let keep = Retention {
            max_age_ms: 2_500,
            max_messages: 100,
        };
        // At 6 000 ms, entries sent before 3 500 ms are too old.
        let p = store.prune(&g, keep, 6_000, 100).expect("prune");
        assert_eq!(p.history, 4);
        assert_eq!(ids(&store.history(&g, 100).expect("history")), [4, 5]);
        assert!(store.envelope(&MessageId([3; 32])).expect("env").is_none());
        assert!(store.envelope(&MessageId([4; 32])).expect("env").is_some());
        assert_eq!(
            store.history(&GroupId([2; 32]), 10).expect("history"),
            vec![other]
        );
        assert!(store.envelope(&MessageId([99; 32])).expect("env").is_some());
        // Everything old: the group's history is emptied.
        let p = store.prune(&g, keep, 100_000, 100).expect("prune");
        assert_eq!(p.history, 2);
        assert!(store.history(&g, 100).expect("history").is_empty());
        assert_index_matches(&store);
        let left: Vec<MessageId> = store
            .envelopes_of_group(&GroupId([2; 32]), 100)
            .expect("envelopes")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(left, [MessageId([99; 32])]);
    }

    /// The `envelopes_by_group` index lists exactly the stored envelopes.
    fn assert_index_matches(store: &Store) {
        let txn = store.db.begin_read().expect("read");
        let envelopes = txn.open_table(ENVELOPES).expect("envelopes");
        let mut want = Vec::new();
        for row in envelopes.iter().expect("iter") {
            let (_, v) = row.expect("row");
            let env: StoredEnvelope = decode_record("envelopes", v.value()).expect("decode");
            want.push(envelope_index_key(&env));
        }
        want.sort_unstable();
        let index = txn.open_table(ENVELOPES_BY_GROUP).expect("index");
        let got: Vec<[u8; ENVELOPE_INDEX_KEY_LEN]> = index
            .iter()
            .expect("iter")
            .map(|r| *r.expect("row").0.value())
            .collect();
        assert_eq!(got, want, "index and envelopes disagree");
    }

    /// Envelopes of two groups over epochs 1..=4: (group, id, epoch, kind).
    fn spread_envelopes() -> Vec<StoredEnvelope> {
        let mut out = Vec::new();
        for (g, base) in [(1u8, 0u8), (2, 100)] {
            for epoch in 1..=4u64 {
                out.push(StoredEnvelope {
                    group: GroupId([g; 32]),
                    ..commit_envelope(base + 10 * epoch as u8, epoch)
                });
                for k in 1..=3u8 {
                    out.push(StoredEnvelope {
                        group: GroupId([g; 32]),
                        epoch,
                        ..envelope(base + 10 * epoch as u8 + k, 20)
                    });
                }
            }
        }
        out
    }

    fn group_ids(store: &Store, g: u8) -> Vec<u8> {
        store
            .envelopes_of_group(&GroupId([g; 32]), 1000)
            .expect("envelopes")
            .iter()
            .map(|e| e.id.0[0])
            .collect()
    }

    #[test]
    fn rollback_deletes_later_epochs_and_lost_commits_through_the_index() {
        let (_dir, store) = open_temp();
        store
            .commit(Batch {
                envelopes: spread_envelopes(),
                ..Batch::default()
            })
            .expect("commit");
        assert_eq!(group_ids(&store, 1).len(), 16);
        // `envelopes_of_group` is in (epoch, id) order and bounded.
        assert_eq!(group_ids(&store, 1)[..5], [10, 11, 12, 13, 20]);
        assert_eq!(
            store
                .envelopes_of_group(&GroupId([1; 32]), 3)
                .expect("envelopes")
                .len(),
            3
        );
        store
            .commit(Batch {
                rollbacks: vec![Rollback {
                    group: GroupId([1; 32]),
                    to_epoch: 2,
                    // The commit leaving epoch 2 lost; a lost id of another group is ignored.
                    lost_commits: vec![MessageId([20; 32]), MessageId([110; 32])],
                    forget_history: vec![],
                }],
                ..Batch::default()
            })
            .expect("rollback");
        assert_eq!(group_ids(&store, 1), [10, 11, 12, 13, 21, 22, 23]);
        assert_eq!(group_ids(&store, 2).len(), 16);
        assert!(store.envelope(&MessageId([30; 32])).expect("env").is_none());
        assert_index_matches(&store);
        // Rolling back to the last possible epoch deletes nothing more.
        store
            .commit(Batch {
                rollbacks: vec![Rollback {
                    group: GroupId([1; 32]),
                    to_epoch: u64::MAX,
                    lost_commits: vec![],
                    forget_history: vec![],
                }],
                ..Batch::default()
            })
            .expect("rollback");
        assert_eq!(group_ids(&store, 1).len(), 7);
        assert_index_matches(&store);
    }

    #[test]
    fn schema_3_envelopes_are_indexed_in_place() {
        let (dir, store) = open_temp();
        store
            .commit(Batch {
                envelopes: spread_envelopes(),
                ..Batch::default()
            })
            .expect("commit");
        let before = (group_ids(&store, 1), group_ids(&store, 2));
        drop(store);
        let path = dir.path().join("kith.redb");
        // What a schema-3 node left: the same envelopes, no index.
        raw_write(&path, |txn| {
            assert!(txn.delete_table(ENVELOPES_BY_GROUP).expect("delete"));
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, 3u32.to_be_bytes().as_slice())
                .expect("version");
        });
        let store = Store::open(&path).expect("migrate");
        assert_eq!((group_ids(&store, 1), group_ids(&store, 2)), before);
        assert_index_matches(&store);
        // The migrated index is maintained like a new one.
        store
            .commit(Batch {
                envelopes: vec![StoredEnvelope {
                    epoch: 9,
                    ..envelope(77, 5)
                }],
                rollbacks: vec![Rollback {
                    group: GroupId([2; 32]),
                    to_epoch: 3,
                    lost_commits: vec![],
                    forget_history: vec![],
                }],
                ..Batch::default()
            })
            .expect("commit");
        assert_eq!(group_ids(&store, 1).last(), Some(&77));
        assert_eq!(group_ids(&store, 2).len(), 12);
        assert_index_matches(&store);
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_index_matches(&store);
        drop(store);
        let db = Database::create(&path).expect("raw open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        let version = meta
            .get(META_SCHEMA_VERSION)
            .expect("get")
            .expect("version");
        assert_eq!(decode_u32(version.value()).expect("u32"), SCHEMA_VERSION);
    }

    #[test]
    fn duplicate_message_ids_are_dropped() {
        let (_dir, store) = open_temp();
        let g1 = GroupId([1; 32]);
        let batch = Batch {
            history: vec![entry(1, 1, "first"), entry(1, 1, "again in batch")],
            envelopes: vec![envelope(1, 10), envelope(9, 10)],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let batch = Batch {
            history: vec![entry(1, 1, "again later"), entry(1, 2, "second")],
            envelopes: vec![StoredEnvelope {
                bytes: vec![0xee],
                ..envelope(9, 0)
            }],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(
            texts(&store.history(&g1, 10).expect("history")),
            ["first", "second"]
        );

        assert!(store.has_message(&MessageId([1; 32])).expect("has"));
        assert!(
            store.has_message(&MessageId([2; 32])).expect("has"),
            "history only"
        );
        assert!(
            store.has_message(&MessageId([9; 32])).expect("has"),
            "envelope only"
        );
        assert!(!store.has_message(&MessageId([3; 32])).expect("has"));

        // The first copy of an envelope is kept.
        assert_eq!(
            store.envelope(&MessageId([9; 32])).expect("envelope"),
            Some(envelope(9, 10))
        );
        assert_eq!(store.envelope(&MessageId([3; 32])).expect("envelope"), None);
    }

    #[test]
    fn groups_and_invites_are_upserted() {
        let (_dir, store) = open_temp();
        let meta = |n: u8, name: &str| GroupMeta {
            id: GroupId([n; 32]),
            name: name.into(),
            joined_at_ms: 7,
        };
        let group = GroupId([1; 32]);
        let id = InviteId::of(&[5; 32]);
        let created = InviteUpdate::Created {
            group,
            id,
            secret_hash: [5; 32],
            expires_at: 1000,
            max_uses: 3,
            approval: true,
            creator: peer(1),
            created_at: 1,
        };
        let used = InviteUpdate::Used { group, id };
        // A use can arrive before the creation (sync sends commits first): both count.
        let batch = Batch {
            groups: vec![meta(2, "two"), meta(1, "one")],
            invites: vec![used.clone()],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let early = store.invite(&id).expect("invite").expect("record");
        assert_eq!((early.uses, early.secret_hash), (1, None));
        assert_eq!(store.invite(&InviteId([6; 32])).expect("invite"), None);

        let batch = Batch {
            groups: vec![meta(1, "renamed")],
            invites: vec![created.clone(), used.clone()],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let record = store.invite(&id).expect("invite").expect("record");
        let expected = InviteRecord::merge(Some(InviteRecord::merge(Some(early), &created)), &used);
        assert_eq!(record, expected);
        assert_eq!((record.uses, record.max_uses), (2, 3));
        assert_eq!(record.creator, Some(peer(1)));
        assert!(record.approval && !record.revoked);
        assert_eq!(store.invites().expect("all"), vec![record.clone()]);
        // Expired records are pruned; live ones stay.
        assert_eq!(store.prune_invites(1000, 10).expect("prune"), 0);
        assert_eq!(store.prune_invites(1001, 10).expect("prune"), 1);
        assert_eq!(store.invite(&id).expect("invite"), None);
        assert_eq!(
            store.groups().expect("groups"),
            vec![meta(1, "renamed"), meta(2, "two")]
        );
    }

    #[test]
    fn forgetting_a_groups_invites_comes_before_the_batch_updates() {
        let (_dir, store) = open_temp();
        let used = |g: u8, i: u8| InviteUpdate::Used {
            group: GroupId([g; 32]),
            id: InviteId([i; 32]),
        };
        let batch = Batch {
            invites: vec![used(1, 10), used(1, 10), used(1, 11), used(2, 20)],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(store.invites().expect("all").len(), 3);
        // Group 1 joined again on another branch: its counts go, and the new states count.
        let batch = Batch {
            forget_invites: vec![GroupId([1; 32])],
            invites: vec![used(1, 10)],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let left: Vec<(InviteId, u32)> = store
            .invites()
            .expect("all")
            .iter()
            .map(|r| (r.id, r.uses))
            .collect();
        assert_eq!(left, vec![(InviteId([10; 32]), 1), (InviteId([20; 32]), 1)]);
    }

    #[test]
    fn address_book_is_bounded() {
        let (_dir, store) = open_temp();
        let addr = |n: u16| -> Multiaddr {
            format!("/ip4/127.0.0.1/tcp/{n}")
                .parse()
                .expect("multiaddr")
        };

        // Per peer: new addresses first, then old ones, at most MAX_ADDRS_PER_PEER.
        let p = peer(1);
        let batch = Batch {
            peers: vec![(p, (0..5).map(addr).collect())],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let batch = Batch {
            peers: vec![(p, (10..15).map(addr).chain([addr(0)]).collect())],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        let peers = store.peers().expect("peers");
        assert_eq!(peers.len(), 1);
        let expected: Vec<Multiaddr> = (10..15).map(addr).chain((0..3).map(addr)).collect();
        assert_eq!(peers[0], (p, expected));

        // A new peer with no addresses is not stored.
        let batch = Batch {
            peers: vec![(peer(2), Vec::new())],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(store.peers().expect("peers").len(), 1);

        // At most MAX_PEERS peers; the newest always gets in.
        let many: Vec<(PeerId, Vec<Multiaddr>)> = (0..MAX_PEERS + 5)
            .map(|n| (peer_n(1000 + n as u16), vec![addr(1)]))
            .collect();
        let last = many.last().map(|(p, _)| *p).expect("last");
        store
            .commit(Batch {
                peers: many,
                ..Batch::default()
            })
            .expect("commit");
        let peers = store.peers().expect("peers");
        assert_eq!(peers.len() as u64, MAX_PEERS);
        assert!(peers.iter().any(|(p, _)| *p == last));

        // Updating a known peer when full evicts nobody.
        let known = peers[0].0;
        store
            .commit(Batch {
                peers: vec![(known, vec![addr(2)])],
                ..Batch::default()
            })
            .expect("commit");
        let peers = store.peers().expect("peers");
        assert_eq!(peers.len() as u64, MAX_PEERS);
        assert_eq!(peers[0], (known, vec![addr(2), addr(1)]));
    }

    #[test]
    fn failed_commit_writes_nothing() {
        let (_dir, store) = open_temp();
        let too_big = envelope(2, MAX_DECODE_BYTES + 1);
        let batch = Batch {
            groups: vec![GroupMeta {
                id: GroupId([1; 32]),
                name: "g".into(),
                joined_at_ms: 0,
            }],
            history: vec![entry(1, 1, "lost")],
            envelopes: vec![envelope(1, 10), too_big],
            ..Batch::default()
        };
        let err = store.commit(batch).expect_err("too large");
        assert!(
            matches!(
                err,
                StoreError::TooLarge {
                    table: "envelopes",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(store.groups().expect("groups").is_empty());
        assert!(
            store
                .history(&GroupId([1; 32]), 10)
                .expect("history")
                .is_empty()
        );
        assert!(!store.has_message(&MessageId([1; 32])).expect("has"));
        // An empty commit is fine and does nothing.
        store.commit(Batch::default()).expect("empty commit");
    }

    #[test]
    fn damaged_file_fails_to_open_without_panicking() {
        let (dir, store) = open_temp();
        let batch = Batch {
            history: (0..50).map(|i| entry(1, i, "some text")).collect(),
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        drop(store);
        let path = dir.path().join("kith.redb");
        let mut bytes = std::fs::read(&path).expect("read file");
        assert!(bytes.len() > 8192);
        for b in &mut bytes[4096..] {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).expect("write file");
        let err = Store::open(&path).expect_err("damaged file");
        assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    }

    #[test]
    fn second_open_of_the_same_file_is_refused() {
        let (dir, _store) = open_temp();
        let err = Store::open(&dir.path().join("kith.redb")).expect_err("already open");
        assert!(matches!(err, StoreError::AlreadyOpen), "{err:?}");
    }

    fn raw_write(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
        let db = Database::create(path).expect("raw open");
        let txn = db.begin_write().expect("begin");
        f(&txn);
        txn.commit().expect("raw commit");
    }

    #[test]
    fn the_owner_is_recorded_and_another_key_refused() {
        let (dir, store) = open_temp();
        drop(store);
        let path = dir.path().join("kith.redb");
        // Written by `Store::open` like an older node: no owner yet.
        assert_eq!(Store::owner_of(&path).expect("read"), None);
        // The first owned open adopts its key; the same key opens again.
        let store = Store::open_owned(&path, &peer(1)).expect("adopt");
        store
            .commit(Batch {
                groups: vec![GroupMeta {
                    id: GroupId([1; 32]),
                    name: "kept".into(),
                    joined_at_ms: 0,
                }],
                ..Batch::default()
            })
            .expect("commit");
        drop(store);
        assert_eq!(Store::owner_of(&path).expect("read"), Some(peer(1)));
        drop(Store::open_owned(&path, &peer(1)).expect("same key"));
        // Another key is refused and the file is left as it was.
        let err = Store::open_owned(&path, &peer(2)).expect_err("other key");
        assert!(
            matches!(err, StoreError::OtherOwner { owner } if owner == peer(1)),
            "{err}"
        );
        assert_eq!(Store::owner_of(&path).expect("read"), Some(peer(1)));
        let store = Store::open_owned(&path, &peer(1)).expect("still the owner's");
        assert_eq!(store.groups().expect("groups").len(), 1);
        drop(store);
        // A new database records its owner at creation.
        let fresh = dir.path().join("fresh.redb");
        drop(Store::open_owned(&fresh, &peer(3)).expect("create"));
        assert_eq!(Store::owner_of(&fresh).expect("read"), Some(peer(3)));
    }

    #[test]
    fn a_schema_3_database_without_owner_is_migrated_and_adopted() {
        let (dir, store) = open_temp();
        store
            .commit(Batch {
                envelopes: spread_envelopes(),
                ..Batch::default()
            })
            .expect("commit");
        drop(store);
        let path = dir.path().join("kith.redb");
        raw_write(&path, |txn| {
            assert!(txn.delete_table(ENVELOPES_BY_GROUP).expect("delete"));
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, 3u32.to_be_bytes().as_slice())
                .expect("version");
            assert!(meta.get(META_OWNER).expect("get").is_none());
        });
        let store = Store::open_owned(&path, &peer(7)).expect("migrate and adopt");
        assert_index_matches(&store);
        drop(store);
        assert_eq!(Store::owner_of(&path).expect("read"), Some(peer(7)));
        // A damaged owner record is a typed error, not a new owner.
        raw_write(&path, |txn| {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_OWNER, [1u8, 2, 3].as_slice())
                .expect("insert");
        });
        assert!(matches!(
            Store::open_owned(&path, &peer(7)),
            Err(StoreError::Corrupt { table: "meta", .. })
        ));
    }

    #[test]
    fn newer_schema_is_refused() {
        let (dir, store) = open_temp();
        drop(store);
        let path = dir.path().join("kith.redb");
        raw_write(&path, |txn| {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, 99u32.to_be_bytes().as_slice())
                .expect("insert");
        });
        let err = Store::open(&path).expect_err("too new");
        assert!(
            matches!(
                err,
                StoreError::SchemaTooNew {
                    found: 99,
                    supported: SCHEMA_VERSION
                }
            ),
            "{err:?}"
        );

        raw_write(&path, |txn| {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(META_SCHEMA_VERSION, [1u8].as_slice())
                .expect("insert");
        });
        let err = Store::open(&path).expect_err("garbage version");
        assert!(
            matches!(err, StoreError::Corrupt { table: "meta", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_records_are_typed_errors() {
        let (dir, store) = open_temp();
        drop(store);
        let path = dir.path().join("kith.redb");
        let garbage: &[u8] = &[0xff, 0xfe, 0xfd, 0x00, 0x01];
        raw_write(&path, |txn| {
            txn.open_table(GROUPS)
                .expect("groups")
                .insert(&[1; 32], garbage)
                .expect("insert");
            txn.open_table(HISTORY)
                .expect("history")
                .insert(&group_range(&GroupId([1; 32])).0, garbage)
                .expect("insert");
            txn.open_table(ENVELOPES)
                .expect("envelopes")
                .insert(&[1; 32], garbage)
                .expect("insert");
            txn.open_table(INVITES)
                .expect("invites")
                .insert(&[1; 32], garbage)
                .expect("insert");
            txn.open_table(PEERS)
                .expect("peers")
                .insert(peer(1).to_bytes().as_slice(), garbage)
                .expect("insert");
        });
        let store = Store::open(&path).expect("open");
        let corrupt = |r: Result<(), StoreError>, table: &str| match r {
            Err(StoreError::Corrupt { table: t, .. }) if t == table => {}
            other => panic!("expected corrupt {table}, got {other:?}"),
        };
        corrupt(store.groups().map(drop), "groups");
        corrupt(store.history(&GroupId([1; 32]), 5).map(drop), "history");
        corrupt(store.envelope(&MessageId([1; 32])).map(drop), "envelopes");
        corrupt(store.invite(&InviteId([1; 32])).map(drop), "invites");
        corrupt(store.peers().map(drop), "peers");
        // Writing over a corrupt record still works (an upsert does not read it).
        let fixed = GroupMeta {
            id: GroupId([1; 32]),
            name: "fixed".into(),
            joined_at_ms: 0,
        };
        store
            .commit(Batch {
                groups: vec![fixed.clone()],
                ..Batch::default()
            })
            .expect("commit");
        assert_eq!(store.groups().expect("groups"), vec![fixed]);
    }
}
