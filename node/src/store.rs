//! The node's persistence: one redb file per node.
//!
//! Tables:
//! - `mls`: openmls' [`StorageProvider`](openmls_traits::storage::StorageProvider) records
//!   (keys and values are written by [`MlsStorage`]).
//! - `groups`: group id → [`GroupMeta`].
//! - `history`: group id ++ local sequence (u64 big-endian) → [`HistoryEntry`].
//! - `message_index`: message id → history key (or empty), to drop duplicates.
//! - `envelopes`: message id → [`StoredEnvelope`], to serve history to other members.
//! - `invites`: secret hash → [`InviteRecord`].
//! - `peers`: `PeerId` bytes → list of multiaddr bytes (the address book).
//! - `meta`: `schema_version` (u32) and `next_seq` (u64), both big-endian.
//!
//! Kith records are encoded with [`kith_protocol::codec`]; openmls records with serde_json.
//!
//! **Atomicity.** openmls writes through [`MlsStorage`] never reach the database directly: they
//! are staged in memory, and [`Store::commit`] writes the staged MLS changes together with a
//! [`Batch`] of history rows, envelopes, groups, invites and peers in *one* redb write
//! transaction. A crash therefore never leaves MLS keys and history disagreeing: either both
//! are on disk or neither is.

mod mls;

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use kith_protocol::codec::{self, MAX_DECODE_BYTES};
use kith_protocol::ids::{GroupId, MessageId};
use kith_protocol::invite::InviteRecord;
use kith_protocol::records::{GroupMeta, HistoryEntry, StoredEnvelope};
use kith_protocol::{Multiaddr, PeerId};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use mls::{KithProvider, MlsStorage};

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
/// Invite secret hash → codec-encoded [`InviteRecord`].
const INVITES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("invites");
/// `PeerId` bytes → codec-encoded `Vec<Vec<u8>>` of multiaddr bytes.
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
/// Store-wide values, see [`META_SCHEMA_VERSION`] and [`META_NEXT_SEQ`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_SCHEMA_VERSION: &str = "schema_version";
const META_NEXT_SEQ: &str = "next_seq";

/// The schema this code writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// At most this many addresses are kept per peer; newer ones push out older ones.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// At most this many peers are kept in the address book.
pub const MAX_PEERS: u64 = 1000;

const HISTORY_KEY_LEN: usize = 40;

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
    /// The file was written by a newer Kith with a schema this version does not understand.
    /// Upgrade Kith; the file was not modified.
    #[error("database schema version {found} is newer than the supported version {supported}")]
    SchemaTooNew {
        /// The version in the file.
        found: u32,
        /// The newest version this code understands.
        supported: u32,
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
    /// History entries to append, in order. Each gets the next local sequence number; an entry
    /// whose message id already has a history row (stored earlier or earlier in this batch) is
    /// skipped.
    pub history: Vec<HistoryEntry>,
    /// Raw envelopes to keep for serving sync; an envelope already stored is left as is.
    pub envelopes: Vec<StoredEnvelope>,
    /// Invite records to insert or replace (keyed by [`InviteRecord::secret_hash`]).
    pub invites: Vec<InviteRecord>,
    /// Address-book updates: the given addresses go first, then the previously known ones, at
    /// most [`MAX_ADDRS_PER_PEER`]. See [`Store::commit`] for the peer cap.
    pub peers: Vec<(PeerId, Vec<Multiaddr>)>,
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
                Effect::SaveInvite(r) => batch.invites.push(r.clone()),
                Effect::Publish { .. }
                | Effect::Subscribe(_)
                | Effect::Unsubscribe(_)
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
            && self.peers.is_empty()
    }
}

/// The node's database: one redb file, plus the staged (uncommitted) openmls writes.
///
/// Cheap to share by reference; [`Store::provider`] hands out openmls providers that see the
/// same staged writes. The file is closed when the `Store` and every provider from it are
/// dropped.
pub struct Store {
    db: Arc<Database>,
    mls: MlsStorage,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("mls", &self.mls).finish()
    }
}

impl Store {
    /// Opens the database at `path`, creating the file and its tables if missing.
    ///
    /// Fails with [`StoreError::SchemaTooNew`] if a newer Kith wrote the file, with
    /// [`StoreError::AlreadyOpen`] if another node holds it, and with
    /// [`StoreError::Database`] if the file is damaged (page checksums are verified on open).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // Verify page checksums on every open: a file damaged outside redb is then a typed
        // error instead of a possible panic later. It reads the whole file once at startup.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(MLS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(HISTORY)?;
            txn.open_table(MESSAGE_INDEX)?;
            txn.open_table(ENVELOPES)?;
            txn.open_table(INVITES)?;
            txn.open_table(PEERS)?;
            let mut meta = txn.open_table(META)?;
            let found = meta
                .get(META_SCHEMA_VERSION)?
                .map(|v| decode_u32(v.value()))
                .transpose()?;
            match found {
                None => {
                    meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
                Some(found) if found > SCHEMA_VERSION => {
                    // Dropping `txn` aborts it: the file stays untouched.
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StoreError::Corrupt {
                        table: "meta",
                        reason: format!("unknown schema version {found}"),
                    });
                }
            }
        }
        txn.commit()?;
        let db = Arc::new(db);
        let mls = MlsStorage::new(Arc::clone(&db));
        Ok(Store { db, mls })
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
        self.commit_with(batch, true)
    }

    /// Like [`Store::commit`], but with `durable == false` the transaction is not fsynced: it
    /// is atomic and visible at once, and becomes durable with the next durable commit or
    /// [`Store::flush`]. A crash before that loses the whole transaction (MLS state and
    /// records together), never part of it. The node uses this for received messages, whose
    /// loss is recoverable, and flushes within half a second.
    pub fn commit_with(&self, batch: Batch, durable: bool) -> Result<(), StoreError> {
        let mut staged = self.mls.lock_staged();
        if staged.is_empty() && batch.is_empty() {
            return Ok(());
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

            let mut groups = txn.open_table(GROUPS)?;
            for group in &batch.groups {
                let bytes = encode_record("groups", group)?;
                groups.insert(group.id.as_bytes(), bytes.as_slice())?;
            }

            if !batch.history.is_empty() {
                let mut meta = txn.open_table(META)?;
                let mut next_seq = match meta.get(META_NEXT_SEQ)? {
                    Some(v) => decode_u64(v.value())?,
                    None => 0,
                };
                let mut history = txn.open_table(HISTORY)?;
                let mut index = txn.open_table(MESSAGE_INDEX)?;
                for entry in &batch.history {
                    if index.get(entry.id.as_bytes())?.is_some() {
                        tracing::debug!(id = %entry.id.short(), "history entry already stored");
                        continue;
                    }
                    let key = history_key(&entry.group, next_seq);
                    next_seq = next_seq.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                        table: "meta",
                        reason: "history sequence exhausted".into(),
                    })?;
                    let bytes = encode_record("history", entry)?;
                    history.insert(&key, bytes.as_slice())?;
                    index.insert(entry.id.as_bytes(), key.as_slice())?;
                }
                meta.insert(META_NEXT_SEQ, next_seq.to_be_bytes().as_slice())?;
            }

            let mut envelopes = txn.open_table(ENVELOPES)?;
            for envelope in &batch.envelopes {
                if envelopes.get(envelope.id.as_bytes())?.is_some() {
                    continue;
                }
                let bytes = encode_record("envelopes", envelope)?;
                envelopes.insert(envelope.id.as_bytes(), bytes.as_slice())?;
            }

            let mut invites = txn.open_table(INVITES)?;
            for invite in &batch.invites {
                let bytes = encode_record("invites", invite)?;
                invites.insert(&invite.secret_hash, bytes.as_slice())?;
            }

            let mut peers = txn.open_table(PEERS)?;
            for (peer, addrs) in &batch.peers {
                upsert_peer(&mut peers, peer, addrs)?;
            }
        }
        txn.commit()?;
        staged.clear();
        Ok(())
    }

    /// Makes every earlier non-durable commit durable (an empty fsynced transaction).
    pub fn flush(&self) -> Result<(), StoreError> {
        let _staged = self.mls.lock_staged();
        let txn = self.db.begin_write()?;
        txn.commit()?;
        Ok(())
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

    /// The newest `limit` history entries of `group`, oldest first.
    pub fn history(&self, group: &GroupId, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let lo = history_key(group, 0);
        let hi = history_key(group, u64::MAX);
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in table
            .range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?
            .rev()
            .take(limit)
        {
            let (_, value) = row?;
            out.push(decode_record("history", value.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// True if the message was already seen: it has a history row or its envelope is stored.
    pub fn has_message(&self, id: &MessageId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        if txn.open_table(MESSAGE_INDEX)?.get(id.as_bytes())?.is_some() {
            return Ok(true);
        }
        Ok(txn.open_table(ENVELOPES)?.get(id.as_bytes())?.is_some())
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

    /// The stored envelopes of `group`, in id order, at most `limit` of them (a full scan of
    /// the `envelopes` table: it is keyed by message id). Used to summarise what this node
    /// holds and to answer sync requests.
    pub fn envelopes_of_group(
        &self,
        group: &GroupId,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENVELOPES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            if out.len() >= limit {
                break;
            }
            let (_, value) = row?;
            let env: StoredEnvelope = decode_record("envelopes", value.value())?;
            if env.group == *group {
                out.push(env);
            }
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
        let lo = history_key(group, 0);
        let hi = history_key(group, u64::MAX);
        let Some(row) = table.range::<&[u8; HISTORY_KEY_LEN]>(&lo..=&hi)?.next() else {
            return Ok(None);
        };
        let (_, value) = row?;
        let entry: HistoryEntry = decode_record("history", value.value())?;
        Ok(Some(entry.epoch))
    }

    /// The invite record stored under this secret hash, if any.
    pub fn invite(&self, secret_hash: &[u8; 32]) -> Result<Option<InviteRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(INVITES)?;
        let value = table.get(secret_hash)?;
        value
            .map(|v| decode_record("invites", v.value()))
            .transpose()
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

/// The `history` key: group id then the big-endian sequence, so one group's rows are contiguous
/// and ordered by arrival.
fn history_key(group: &GroupId, seq: u64) -> [u8; HISTORY_KEY_LEN] {
    let mut key = [0u8; HISTORY_KEY_LEN];
    key[..32].copy_from_slice(group.as_bytes());
    key[32..].copy_from_slice(&seq.to_be_bytes());
    key
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

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            table: "meta",
            reason: format!("expected 8 bytes, found {}", bytes.len()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_protocol::Keypair;
    use kith_protocol::envelope::PayloadKind;
    use kith_protocol::records::EntryKind;
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

    #[test]
    fn errors_and_handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<StoreError>();
        check::<Store>();
        check::<KithProvider>();
        check::<MlsStorage>();
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

        // The sequence survives a reopen: new rows still come after the old ones.
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
        let invite = InviteRecord {
            group: GroupId([1; 32]),
            secret_hash: [5; 32],
            expires_at: 1000,
            max_uses: 3,
            uses: 0,
            created_at: 1,
        };
        let batch = Batch {
            groups: vec![meta(2, "two"), meta(1, "one")],
            invites: vec![invite.clone()],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(
            store.invite(&[5; 32]).expect("invite"),
            Some(invite.clone())
        );
        assert_eq!(store.invite(&[6; 32]).expect("invite"), None);

        let used = InviteRecord { uses: 1, ..invite };
        let batch = Batch {
            groups: vec![meta(1, "renamed")],
            invites: vec![used.clone()],
            ..Batch::default()
        };
        store.commit(batch).expect("commit");
        assert_eq!(store.invite(&[5; 32]).expect("invite"), Some(used));
        assert_eq!(
            store.groups().expect("groups"),
            vec![meta(1, "renamed"), meta(2, "two")]
        );
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
                .insert(&history_key(&GroupId([1; 32]), 0), garbage)
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
        corrupt(store.invite(&[1; 32]).map(drop), "invites");
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
