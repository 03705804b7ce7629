//! openmls' storage over the `mls` table, with writes staged in memory until
//! [`Store::commit`](super::Store::commit).
//!
//! Record layout: the storage key is a per-record-kind label, a NUL byte, then the serde_json
//! encoding of the openmls key, so two kinds of record never collide (labels hold no NUL, and
//! JSON never contains a raw NUL). Single values are MessagePack behind a one-byte tag (see
//! `encode_value`); list values, and values written by earlier versions, are JSON. openmls types implement serde,
//! and JSON is the format openmls' own storages use for them. List-valued records
//! (own leaf nodes, queued proposal refs, epoch encryption key pairs) are JSON arrays.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kith_protocol::fork::{self, GroupRecords};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use redb::ReadableTable;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DbSlot, MLS, StoreError};

/// Staged openmls writes: storage key → new value, or `None` for a deletion.
pub(super) type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Labels of the record kinds; one per kind of openmls record.
mod label {
    pub const JOIN_CONFIG: &str = "join_config";
    pub const OWN_LEAF_NODES: &str = "own_leaf_nodes";
    pub const PROPOSAL_REFS: &str = "proposal_refs";
    pub const PROPOSAL: &str = "proposal";
    pub const TREE: &str = "tree";
    pub const INTERIM_TRANSCRIPT_HASH: &str = "interim_transcript_hash";
    pub const CONTEXT: &str = "context";
    pub const CONFIRMATION_TAG: &str = "confirmation_tag";
    pub const GROUP_STATE: &str = "group_state";
    pub const MESSAGE_SECRETS: &str = "message_secrets";
    pub const RESUMPTION_PSK_STORE: &str = "resumption_psk_store";
    pub const OWN_LEAF_INDEX: &str = "own_leaf_index";
    pub const EPOCH_SECRETS: &str = "epoch_secrets";
    pub const SIGNATURE_KEY_PAIR: &str = "signature_key_pair";
    pub const ENCRYPTION_KEY_PAIR: &str = "encryption_key_pair";
    pub const EPOCH_KEY_PAIRS: &str = "epoch_key_pairs";
    pub const KEY_PACKAGE: &str = "key_package";
    pub const PSK: &str = "psk";
}

/// openmls' storage provider for a Kith node.
///
/// Reads see staged writes first, then the committed database. Writes and deletions are only
/// staged; [`Store::commit`](super::Store::commit) persists them together with the history rows
/// they belong to. Clones share the same database and staged writes.
#[derive(Clone)]
pub struct MlsStorage {
    db: Arc<DbSlot>,
    staged: Arc<Mutex<Overlay>>,
    journal: Arc<Mutex<Journal>>,
}

/// What the staged writes were before each change made under an open savepoint, so
/// [`GroupRecords::undo`] can put them back (see `kith_protocol::order`). Empty when no
/// savepoint is open.
#[derive(Debug, Default)]
struct Journal {
    /// Open savepoints.
    depth: usize,
    /// (key, the staged entry it replaced: `None` if the key was not staged).
    changes: Vec<(Vec<u8>, Option<Staged>)>,
}

/// One staged entry: a new value, or `None` for a deletion.
type Staged = Option<Vec<u8>>;

impl std::fmt::Debug for MlsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsStorage")
            .field("staged", &self.lock_staged().len())
            .finish_non_exhaustive()
    }
}

impl MlsStorage {
    pub(super) fn new(db: Arc<DbSlot>) -> Self {
        MlsStorage {
            db,
            staged: Arc::new(Mutex::new(Overlay::new())),
            journal: Arc::new(Mutex::new(Journal::default())),
        }
    }

    /// Locks the staged writes. A panic while holding the lock cannot leave the map half
    /// updated (each change is a single insert), so a poisoned lock is still usable.
    pub(super) fn lock_staged(&self) -> MutexGuard<'_, Overlay> {
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stages `value` under `key` (`None`: a deletion), remembering the entry it replaces
    /// while a savepoint is open. The caller holds the staged lock (taken before the
    /// journal's, always in that order).
    fn stage(&self, staged: &mut Overlay, key: Vec<u8>, value: Option<Vec<u8>>) {
        let mut journal = self.lock_journal();
        if journal.depth > 0 {
            let previous = staged.insert(key.clone(), value);
            journal.changes.push((key, previous));
        } else {
            staged.insert(key, value);
        }
    }

    /// The current bytes under `key`: staged value if any, else the committed one.
    fn get_raw(&self, staged: &Overlay, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = staged.get(key) {
            return Ok(value.clone());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MLS)?;
        let value = table.get(key)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn read<V: DeserializeOwned>(
        &self,
        label: &str,
        key: &impl Serialize,
    ) -> Result<Option<V>, StoreError> {
        let key = storage_key(label, key)?;
        let staged = self.lock_staged();
        self.get_raw(&staged, &key)?
            .map(|bytes| decode_value(&bytes))
            .transpose()
    }

    fn write(
        &self,
        label: &str,
        key: &impl Serialize,
        value: &impl Serialize,
    ) -> Result<(), StoreError> {
        let key = storage_key(label, key)?;
        let value = encode_value(value)?;
        self.stage(&mut self.lock_staged(), key, Some(value));
        Ok(())
    }

    fn delete(&self, label: &str, key: &impl Serialize) -> Result<(), StoreError> {
        let key = storage_key(label, key)?;
        self.stage(&mut self.lock_staged(), key, None);
        Ok(())
    }

    fn read_list<V: DeserializeOwned>(
        &self,
        label: &str,
        key: &impl Serialize,
    ) -> Result<Vec<V>, StoreError> {
        Ok(self.read(label, key)?.unwrap_or_default())
    }

    /// Appends `item` to the JSON array under `key` (read-modify-write under one lock).
    fn append(
        &self,
        label: &str,
        key: &impl Serialize,
        item: &impl Serialize,
    ) -> Result<(), StoreError> {
        let key = storage_key(label, key)?;
        let item = serde_json::to_value(item).map_err(|e| StoreError::Serde(e.to_string()))?;
        let mut staged = self.lock_staged();
        let mut list: Vec<serde_json::Value> = match self.get_raw(&staged, &key)? {
            Some(bytes) => decode_value(&bytes)?,
            None => Vec::new(),
        };
        list.push(item);
        let value = to_json(&list)?;
        self.stage(&mut staged, key, Some(value));
        Ok(())
    }

    /// Removes every element equal to `item` from the JSON array under `key`.
    fn remove_from_list(
        &self,
        label: &str,
        key: &impl Serialize,
        item: &impl Serialize,
    ) -> Result<(), StoreError> {
        let key = storage_key(label, key)?;
        let item = serde_json::to_value(item).map_err(|e| StoreError::Serde(e.to_string()))?;
        let mut staged = self.lock_staged();
        let Some(bytes) = self.get_raw(&staged, &key)? else {
            return Ok(());
        };
        let mut list: Vec<serde_json::Value> = decode_value(&bytes)?;
        list.retain(|v| *v != item);
        let value = to_json(&list)?;
        self.stage(&mut staged, key, Some(value));
        Ok(())
    }
}

/// Chunked records: openmls rewrites its message-secrets record (every kept past epoch's
/// secret tree and member list, then the current epoch's tree) on every message sent or
/// received. Stored whole, a 100-member group a few commits old rewrote some 100 KB per
/// message. Stored in pieces of [`CHUNK_BYTES`], only the pieces whose bytes changed are
/// written: the past epochs come first in the encoding and do not change between commits,
/// so a message rewrites the last piece or two.
///
/// Layout: under the record's key, a header `[CHUNKED_TAG, pieces: u32 LE, bytes: u32 LE]`;
/// piece `i` under the record's key followed by `\0#` and `i` as u32 big-endian. The pieces
/// contain the group id in their key like the record itself, so checkpoints and rollbacks
/// (`GroupRecords`) copy and restore them with it.
const CHUNK_BYTES: usize = 16 * 1024;
/// First byte of a chunked record's header (never the first byte of a single value).
const CHUNKED_TAG: u8 = 0x02;
/// Largest record accepted back from the table (pieces × [`CHUNK_BYTES`]).
const MAX_CHUNKED_BYTES: usize = 256 * 1024 * 1024;

fn chunk_key(base: &[u8], i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(base.len() + 6);
    k.extend_from_slice(base);
    k.extend_from_slice(b"\0#");
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// `(pieces, bytes)` of a chunked header, `None` if `value` is not one.
fn chunk_header(value: &[u8]) -> Option<(u32, usize)> {
    match value {
        [CHUNKED_TAG, rest @ ..] if rest.len() == 8 => {
            let pieces = u32::from_le_bytes(rest[..4].try_into().ok()?);
            let bytes = u32::from_le_bytes(rest[4..].try_into().ok()?) as usize;
            Some((pieces, bytes))
        }
        _ => None,
    }
}

impl MlsStorage {
    /// Writes `value` under `key` in pieces, staging only the pieces that differ from the
    /// current ones (and deleting pieces a shorter value no longer has).
    fn write_chunked(
        &self,
        label: &str,
        key: &impl Serialize,
        value: &impl Serialize,
    ) -> Result<(), StoreError> {
        let base = storage_key(label, key)?;
        let bytes = encode_value(value)?;
        let pieces = u32::try_from(bytes.len().div_ceil(CHUNK_BYTES))
            .map_err(|_| StoreError::Serde("record too large".into()))?;
        let len =
            u32::try_from(bytes.len()).map_err(|_| StoreError::Serde("record too large".into()))?;
        let mut staged = self.lock_staged();
        let old_pieces = match self.get_raw(&staged, &base)? {
            Some(old) => chunk_header(&old).map_or(0, |(n, _)| n),
            None => 0,
        };
        for (i, piece) in (0u32..).zip(bytes.chunks(CHUNK_BYTES)) {
            let k = chunk_key(&base, i);
            if i < old_pieces && self.get_raw(&staged, &k)?.as_deref() == Some(piece) {
                continue;
            }
            self.stage(&mut staged, k, Some(piece.to_vec()));
        }
        for i in pieces..old_pieces {
            self.stage(&mut staged, chunk_key(&base, i), None);
        }
        let mut header = vec![CHUNKED_TAG];
        header.extend_from_slice(&pieces.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        if self.get_raw(&staged, &base)?.as_deref() != Some(header.as_slice()) {
            self.stage(&mut staged, base, Some(header));
        }
        Ok(())
    }

    /// Reads a record written by [`Self::write_chunked`], or by [`Self::write`] before
    /// records were chunked.
    fn read_chunked<V: DeserializeOwned>(
        &self,
        label: &str,
        key: &impl Serialize,
    ) -> Result<Option<V>, StoreError> {
        let base = storage_key(label, key)?;
        let staged = self.lock_staged();
        let Some(head) = self.get_raw(&staged, &base)? else {
            return Ok(None);
        };
        let Some((pieces, len)) = chunk_header(&head) else {
            return decode_value(&head).map(Some);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "mls",
            reason,
        };
        if len > MAX_CHUNKED_BYTES || (pieces as usize) != len.div_ceil(CHUNK_BYTES) {
            return Err(corrupt(format!(
                "chunked record of {pieces} pieces, {len} bytes"
            )));
        }
        let mut bytes = Vec::with_capacity(len);
        for i in 0..pieces {
            let piece = self
                .get_raw(&staged, &chunk_key(&base, i))?
                .ok_or_else(|| corrupt(format!("piece {i} of {pieces} missing")))?;
            bytes.extend_from_slice(&piece);
        }
        if bytes.len() != len {
            return Err(corrupt(format!(
                "pieces hold {} of {len} bytes",
                bytes.len()
            )));
        }
        decode_value(&bytes).map(Some)
    }

    /// Deletes a chunked record and its pieces.
    fn delete_chunked(&self, label: &str, key: &impl Serialize) -> Result<(), StoreError> {
        let base = storage_key(label, key)?;
        let mut staged = self.lock_staged();
        let pieces = match self.get_raw(&staged, &base)? {
            Some(old) => chunk_header(&old).map_or(0, |(n, _)| n),
            None => 0,
        };
        for i in 0..pieces {
            self.stage(&mut staged, chunk_key(&base, i), None);
        }
        self.stage(&mut staged, base, None);
        Ok(())
    }
}

fn storage_key(label: &str, key: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(label.len() + 1 + 48);
    out.extend_from_slice(label.as_bytes());
    out.push(0);
    serde_json::to_writer(&mut out, key).map_err(|e| StoreError::Serde(e.to_string()))?;
    Ok(out)
}

/// First byte of a value encoded as MessagePack. JSON values (lists, and every value written
/// before MessagePack was introduced) never start with it, so both are read back.
const MSGPACK_TAG: u8 = 0x01;

/// Encodes a single openmls value: the tag, then MessagePack with named fields, and every
/// sequence of bytes (`Vec<u8>`, `[u8]`) as one MessagePack byte string.
///
/// Measured on a 100-member group: openmls rewrites its message-secrets record on every
/// message, and serde_json (which spells every secret byte as a decimal number) was the
/// largest single CPU cost of a 100-node testnet. MessagePack is self-describing, which
/// openmls needs (`untagged` enums, `deserialize_any`). serde hands a `Vec<u8>` over as a
/// sequence of integers, which MessagePack then wrote one marker at a time (37 % of the
/// self time of a send at 1,000 members, docs/BENCHMARKS.md); `BytesMode::ForceIterables`
/// writes it as one byte string instead, and the decoder turns a byte string back into
/// the sequence the type asks for, so records written either way read back the same.
fn encode_value(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![MSGPACK_TAG];
    let mut serializer = rmp_serde::Serializer::new(&mut out)
        .with_struct_map()
        .with_bytes(rmp_serde::config::BytesMode::ForceIterables);
    value
        .serialize(&mut serializer)
        .map_err(|e| StoreError::Serde(e.to_string()))?;
    Ok(out)
}

/// Decodes a value written by [`encode_value`] or as JSON.
fn decode_value<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, StoreError> {
    match bytes.split_first() {
        Some((&MSGPACK_TAG, rest)) => {
            rmp_serde::from_slice(rest).map_err(|e| StoreError::Corrupt {
                table: "mls",
                reason: e.to_string(),
            })
        }
        _ => from_json(bytes),
    }
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Serde(e.to_string()))
}

fn from_json<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: "mls",
        reason: e.to_string(),
    })
}

/// Key of a queued proposal: its group and its reference.
fn proposal_key<'a, G: Serialize, R: Serialize>(
    group_id: &'a G,
    proposal_ref: &'a R,
) -> (&'a G, &'a R) {
    (group_id, proposal_ref)
}

impl MlsStorage {
    /// Every current (key, value) whose key matches `keep`: committed rows overlaid with the
    /// staged writes and deletions, in key order. Scans the whole table: used only around
    /// commits and rollbacks, which are rare.
    fn scan(&self, keep: impl Fn(&[u8]) -> bool) -> Result<fork::Records, StoreError> {
        let staged = self.lock_staged();
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MLS)?;
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            if keep(k.value()) {
                out.insert(k.value().to_vec(), v.value().to_vec());
            }
        }
        for (k, v) in staged.iter().filter(|(k, _)| keep(k)) {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }
}

/// Checkpoints and Kith's fork records live in the `mls` table beside the openmls records
/// (keys starting with [`fork::KITH_PREFIX`]), so they commit in the same transaction.
impl GroupRecords for MlsStorage {
    type Error = StoreError;

    fn group_records(
        &self,
        group: &kith_protocol::ids::GroupId,
    ) -> Result<fork::Records, StoreError> {
        let needle = fork::openmls_group_needle(group);
        self.scan(|k| !k.starts_with(fork::KITH_PREFIX) && fork::contains(k, &needle))
    }

    fn replace_group_records(
        &self,
        group: &kith_protocol::ids::GroupId,
        records: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let current = self.group_records(group)?;
        let mut staged = self.lock_staged();
        for (k, _) in current {
            self.stage(&mut staged, k, None);
        }
        for (k, v) in records {
            self.stage(&mut staged, k.clone(), Some(v.clone()));
        }
        Ok(())
    }

    fn put_kith(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        self.stage(
            &mut self.lock_staged(),
            key.to_vec(),
            value.map(<[u8]>::to_vec),
        );
        Ok(())
    }

    type Savepoint = usize;

    fn savepoint(&self) -> usize {
        let mut journal = self.lock_journal();
        journal.depth += 1;
        journal.changes.len()
    }

    fn undo(&self, savepoint: usize) -> Result<(), StoreError> {
        let mut staged = self.lock_staged();
        let mut journal = self.lock_journal();
        while journal.changes.len() > savepoint {
            let Some((key, previous)) = journal.changes.pop() else {
                break;
            };
            match previous {
                Some(value) => staged.insert(key, value),
                None => staged.remove(&key),
            };
        }
        journal.depth = journal.depth.saturating_sub(1);
        if journal.depth == 0 {
            journal.changes.clear();
        }
        Ok(())
    }

    fn release(&self, _savepoint: usize) {
        let mut journal = self.lock_journal();
        journal.depth = journal.depth.saturating_sub(1);
        if journal.depth == 0 {
            journal.changes.clear();
        }
    }

    fn get_kith(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let staged = self.lock_staged();
        self.get_raw(&staged, key)
    }

    fn kith_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let staged = self.lock_staged();
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MLS)?;
        let mut keys: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        for row in table.range::<&[u8]>(prefix..)? {
            let (k, _) = row?;
            if !k.value().starts_with(prefix) {
                break;
            }
            keys.insert(k.value().to_vec());
        }
        for (k, v) in staged.range::<[u8], _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        )) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(_) => keys.insert(k.clone()),
                None => keys.remove(k),
            };
        }
        Ok(keys.into_iter().collect())
    }
}

impl StorageProvider<CURRENT_VERSION> for MlsStorage {
    type Error = StoreError;

    // --- group state: writers ---

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(label::JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(label::OWN_LEAF_NODES, group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.write(
            label::PROPOSAL,
            &proposal_key(group_id, proposal_ref),
            proposal,
        )?;
        self.append(label::PROPOSAL_REFS, group_id, proposal_ref)
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write(label::TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(
            label::INTERIM_TRANSCRIPT_HASH,
            group_id,
            interim_transcript_hash,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(label::CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(label::CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(label::GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write_chunked(label::MESSAGE_SECRETS, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(label::RESUMPTION_PSK_STORE, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(label::OWN_LEAF_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(label::EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    // --- crypto objects: writers ---

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(label::SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(label::ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(
            label::EPOCH_KEY_PAIRS,
            &(group_id, epoch, leaf_index),
            &key_pairs,
        )
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(label::KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(label::PSK, psk_id, psk)
    }

    // --- group state: readers ---

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(label::JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(label::OWN_LEAF_NODES, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.read_list(label::PROPOSAL_REFS, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(label::PROPOSAL_REFS, group_id)?;
        let mut out = Vec::with_capacity(refs.len());
        for proposal_ref in refs {
            let proposal = self
                .read(label::PROPOSAL, &proposal_key(group_id, &proposal_ref))?
                .ok_or_else(|| StoreError::Corrupt {
                    table: "mls",
                    reason: "queued proposal listed but missing".into(),
                })?;
            out.push((proposal_ref, proposal));
        }
        Ok(out)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read(label::TREE, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(label::CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(label::INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(label::CONFIRMATION_TAG, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(label::GROUP_STATE, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read_chunked(label::MESSAGE_SECRETS, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(label::RESUMPTION_PSK_STORE, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(label::OWN_LEAF_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(label::EPOCH_SECRETS, group_id)
    }

    // --- crypto objects: readers ---

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.read_list(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(label::KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(label::PSK, psk_id)
    }

    // --- group state: deleters ---

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.remove_from_list(label::PROPOSAL_REFS, group_id, proposal_ref)?;
        self.delete(label::PROPOSAL, &proposal_key(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_chunked(label::MESSAGE_SECRETS, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::RESUMPTION_PSK_STORE, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::OWN_LEAF_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(label::EPOCH_SECRETS, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(label::PROPOSAL_REFS, group_id)?;
        for proposal_ref in &refs {
            self.delete(label::PROPOSAL, &proposal_key(group_id, proposal_ref))?;
        }
        self.delete(label::PROPOSAL_REFS, group_id)
    }

    // --- crypto objects: deleters ---

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.delete(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete(label::KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.delete(label::PSK, psk_id)
    }
}

/// The openmls provider a Kith node runs on: RustCrypto for crypto and randomness, and
/// [`MlsStorage`] (staged writes over redb) for storage.
///
/// Get one from [`Store::provider`](super::Store::provider).
#[derive(Debug)]
pub struct KithProvider {
    crypto: RustCrypto,
    storage: MlsStorage,
}

impl KithProvider {
    pub(super) fn new(storage: MlsStorage) -> Self {
        KithProvider {
            crypto: RustCrypto::default(),
            storage,
        }
    }
}

impl OpenMlsProvider for KithProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kith_protocol::Keypair;
    use kith_protocol::ids::{GroupId as KithGroupId, MessageId};
    use kith_protocol::records::{EntryKind, HistoryEntry, StoredEnvelope};
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use redb::ReadableTable;
    use tempfile::TempDir;

    use super::super::{Batch, Store, StoreError};
    use super::*;

    const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

    /// One node: its own data directory, store, provider and MLS identity.
    struct Node {
        dir: TempDir,
        store: Store,
        provider: KithProvider,
        signer: SignatureKeyPair,
        credential: CredentialWithKey,
    }

    impl Node {
        fn new(name: &str) -> Node {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(&db_path(&dir)).expect("open");
            let provider = store.provider();
            let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).expect("signer");
            signer.store(provider.storage()).expect("store signer");
            assert!(store.has_staged(), "openmls writes are staged");
            store.commit(Batch::default()).expect("commit");
            assert!(!store.has_staged());
            let credential = CredentialWithKey {
                credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
                signature_key: signer.public().into(),
            };
            Node {
                dir,
                store,
                provider,
                signer,
                credential,
            }
        }

        /// Simulates a restart: closes the database and opens it again, reading the signer back.
        fn restart(self) -> Node {
            let Node {
                dir,
                store,
                provider,
                signer,
                credential,
            } = self;
            let public = signer.to_public_vec();
            drop((store, provider, signer));
            let store = Store::open(&db_path(&dir)).expect("reopen");
            let provider = store.provider();
            let signer = SignatureKeyPair::read(
                provider.storage(),
                &public,
                CIPHERSUITE.signature_algorithm(),
            )
            .expect("signer survives restart");
            Node {
                dir,
                store,
                provider,
                signer,
                credential,
            }
        }

        fn commit(&self) {
            self.store.commit(Batch::default()).expect("commit");
        }

        fn key_package(&self) -> KeyPackage {
            let bundle = KeyPackage::builder()
                .build(
                    CIPHERSUITE,
                    &self.provider,
                    &self.signer,
                    self.credential.clone(),
                )
                .expect("key package");
            self.commit();
            bundle.key_package().clone()
        }

        fn create_group(&self, id: &GroupId) -> MlsGroup {
            let group = MlsGroup::new_with_group_id(
                &self.provider,
                &self.signer,
                &create_config(),
                id.clone(),
                self.credential.clone(),
            )
            .expect("create group");
            self.commit();
            group
        }

        /// Adds members and returns (commit bytes, welcome bytes).
        fn add(&self, group: &mut MlsGroup, key_packages: &[KeyPackage]) -> (Vec<u8>, Vec<u8>) {
            let (commit, welcome, _) = group
                .add_members(&self.provider, &self.signer, key_packages)
                .expect("add members");
            group
                .merge_pending_commit(&self.provider)
                .expect("merge pending commit");
            self.commit();
            (wire(&commit), wire(&welcome))
        }

        fn join(&self, welcome: &[u8]) -> MlsGroup {
            let MlsMessageBodyIn::Welcome(welcome) = unwire(welcome).extract() else {
                panic!("not a welcome");
            };
            let group = StagedWelcome::new_from_welcome(
                &self.provider,
                create_config().join_config(),
                welcome,
                None,
            )
            .expect("staged welcome")
            .into_group(&self.provider)
            .expect("group from welcome");
            self.commit();
            group
        }

        fn send(&self, group: &mut MlsGroup, text: &str) -> Vec<u8> {
            let message = group
                .create_message(&self.provider, &self.signer, text.as_bytes())
                .expect("create message");
            self.commit();
            wire(&message)
        }

        /// Processes a message from the group: returns the application bytes, or merges a
        /// commit and returns `None`.
        fn receive(&self, group: &mut MlsGroup, bytes: &[u8]) -> Option<Vec<u8>> {
            let message = unwire(bytes)
                .try_into_protocol_message()
                .expect("protocol message");
            let processed = group
                .process_message(&self.provider, message)
                .expect("process message");
            let out = match processed.into_content() {
                ProcessedMessageContent::ApplicationMessage(app) => Some(app.into_bytes()),
                ProcessedMessageContent::StagedCommitMessage(staged) => {
                    group
                        .merge_staged_commit(&self.provider, *staged)
                        .expect("merge staged commit");
                    None
                }
                other => panic!("unexpected content {other:?}"),
            };
            self.commit();
            out
        }

        fn load(&self, id: &GroupId) -> MlsGroup {
            MlsGroup::load(self.provider.storage(), id)
                .expect("load group")
                .expect("group exists")
        }
    }

    fn db_path(dir: &TempDir) -> PathBuf {
        dir.path().join("kith.redb")
    }

    fn create_config() -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build()
    }

    fn wire(message: &MlsMessageOut) -> Vec<u8> {
        message.tls_serialize_detached().expect("serialize")
    }

    fn unwire(bytes: &[u8]) -> MlsMessageIn {
        MlsMessageIn::tls_deserialize_exact(bytes).expect("deserialize")
    }

    fn group_id(n: u8) -> GroupId {
        GroupId::from_slice(&[n; 32])
    }

    /// Sends `text` from one member and checks every other member reads it.
    fn exchange(from: (&Node, &mut MlsGroup), to: &mut [(&Node, &mut MlsGroup)], text: &str) {
        let bytes = from.0.send(from.1, text);
        for (node, group) in to.iter_mut() {
            assert_eq!(
                node.receive(group, &bytes).as_deref(),
                Some(text.as_bytes())
            );
        }
    }

    #[test]
    fn two_and_three_member_groups_run_on_the_store() {
        let alice = Node::new("alice");
        let bob = Node::new("bob");
        let carol = Node::new("carol");
        let id = group_id(1);

        let mut a = alice.create_group(&id);
        let (_, welcome) = alice.add(&mut a, &[bob.key_package()]);
        let mut b = bob.join(&welcome);
        assert_eq!(a.epoch(), b.epoch());

        exchange((&alice, &mut a), &mut [(&bob, &mut b)], "hello bob");
        exchange((&bob, &mut b), &mut [(&alice, &mut a)], "hello alice");

        // Bob, not the creator, adds Carol; Alice follows the commit.
        let (commit, welcome) = bob.add(&mut b, &[carol.key_package()]);
        assert_eq!(alice.receive(&mut a, &commit), None);
        let mut c = carol.join(&welcome);
        assert_eq!(a.epoch(), b.epoch());
        assert_eq!(a.epoch(), c.epoch());
        assert_eq!(c.members().count(), 3);

        exchange(
            (&carol, &mut c),
            &mut [(&alice, &mut a), (&bob, &mut b)],
            "hi all",
        );
        exchange(
            (&alice, &mut a),
            &mut [(&bob, &mut b), (&carol, &mut c)],
            "welcome carol",
        );
        for node in [&alice, &bob, &carol] {
            assert!(!node.store.has_staged());
        }
    }

    #[test]
    fn group_survives_a_restart() {
        let alice = Node::new("alice");
        let bob = Node::new("bob");
        let id = group_id(2);
        let mut a = alice.create_group(&id);
        let (_, welcome) = alice.add(&mut a, &[bob.key_package()]);
        let mut b = bob.join(&welcome);
        exchange((&alice, &mut a), &mut [(&bob, &mut b)], "before 1");
        exchange((&bob, &mut b), &mut [(&alice, &mut a)], "before 2");
        let epoch = b.epoch();

        drop(b);
        let bob = bob.restart();
        let mut b = bob.load(&id);
        assert_eq!(b.epoch(), epoch);
        assert_eq!(b.members().count(), 2);

        // Both ratchets moved on before the restart and must not be reused after it.
        exchange((&alice, &mut a), &mut [(&bob, &mut b)], "after 1");
        exchange((&bob, &mut b), &mut [(&alice, &mut a)], "after 2");

        // And a new epoch after the restart.
        let carol = Node::new("carol");
        let (commit, welcome) = bob.add(&mut b, &[carol.key_package()]);
        assert_eq!(alice.receive(&mut a, &commit), None);
        let mut c = carol.join(&welcome);
        exchange(
            (&alice, &mut a),
            &mut [(&bob, &mut b), (&carol, &mut c)],
            "after 3",
        );
    }

    fn history_row(id: &GroupId, epoch: u64) -> HistoryEntry {
        HistoryEntry {
            group: kith_id(id),
            id: MessageId([epoch as u8; 32]),
            epoch,
            sender: Keypair::ed25519_from_bytes([3; 32])
                .expect("key")
                .public()
                .to_peer_id(),
            sent_at_ms: 1,
            received_at_ms: 2,
            kind: EntryKind::MembersAdded(Vec::new()),
        }
    }

    fn kith_id(id: &GroupId) -> KithGroupId {
        KithGroupId::from_slice(id.as_slice()).expect("32-byte group id")
    }

    #[test]
    fn mls_change_and_history_commit_together_or_not_at_all() {
        let alice = Node::new("alice");
        let bob = Node::new("bob");
        let id = group_id(3);
        let mut a = alice.create_group(&id);
        let bob_kp = bob.key_package();
        assert_eq!(a.epoch().as_u64(), 0);

        // 1. A failed commit: MLS moved to epoch 1 in memory, the batch is refused.
        a.add_members(
            &alice.provider,
            &alice.signer,
            std::slice::from_ref(&bob_kp),
        )
        .expect("add");
        a.merge_pending_commit(&alice.provider).expect("merge");
        assert!(alice.store.has_staged());
        let too_big = StoredEnvelope {
            id: MessageId([0xaa; 32]),
            group: kith_id(&id),
            epoch: 0,
            kind: kith_protocol::envelope::PayloadKind::Commit,
            bytes: vec![0; kith_protocol::codec::MAX_DECODE_BYTES + 1],
            received_at_ms: 0,
        };
        let err = alice
            .store
            .commit(Batch {
                history: vec![history_row(&id, 1)],
                envelopes: vec![too_big],
                ..Batch::default()
            })
            .expect_err("too large");
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err:?}");
        assert!(
            alice.store.has_staged(),
            "a failed commit keeps the staged writes"
        );
        assert!(
            alice
                .store
                .history(&kith_id(&id), 10)
                .expect("history")
                .is_empty()
        );

        // Discarding the staged writes brings storage back to the committed epoch.
        alice.store.discard_staged();
        assert!(!alice.store.has_staged());
        assert_eq!(alice.load(&id).epoch().as_u64(), 0);

        // 2. A crash with staged MLS writes: nothing of it is on disk after a restart.
        let mut a = alice.load(&id);
        a.add_members(
            &alice.provider,
            &alice.signer,
            std::slice::from_ref(&bob_kp),
        )
        .expect("add");
        a.merge_pending_commit(&alice.provider).expect("merge");
        drop(a);
        let alice = alice.restart();
        assert!(!alice.store.has_staged());
        assert_eq!(alice.load(&id).epoch().as_u64(), 0);
        assert!(
            alice
                .store
                .history(&kith_id(&id), 10)
                .expect("history")
                .is_empty()
        );

        // 3. A successful commit: the epoch change and its history row are both there.
        let mut a = alice.load(&id);
        let (_, welcome) = {
            let (commit, welcome, _) = a
                .add_members(&alice.provider, &alice.signer, &[bob_kp])
                .expect("add");
            a.merge_pending_commit(&alice.provider).expect("merge");
            alice
                .store
                .commit(Batch {
                    history: vec![history_row(&id, 1)],
                    ..Batch::default()
                })
                .expect("commit");
            (wire(&commit), wire(&welcome))
        };
        drop(a);
        let alice = alice.restart();
        let mut a = alice.load(&id);
        assert_eq!(a.epoch().as_u64(), 1);
        assert_eq!(
            alice.store.history(&kith_id(&id), 10).expect("history"),
            vec![history_row(&id, 1)]
        );
        let mut b = bob.join(&welcome);
        exchange((&alice, &mut a), &mut [(&bob, &mut b)], "it worked");
    }

    #[test]
    fn corrupt_mls_record_is_a_typed_error() {
        let alice = Node::new("alice");
        let id = group_id(4);
        drop(alice.create_group(&id));
        let Node {
            dir,
            store,
            provider,
            ..
        } = alice;
        drop((store, provider));

        {
            let db = redb::Database::create(db_path(&dir)).expect("raw open");
            let txn = db.begin_write().expect("begin");
            {
                let mut table = txn.open_table(MLS).expect("mls");
                let key = storage_key(label::TREE, &id).expect("key");
                assert!(table.get(key.as_slice()).expect("get").is_some());
                table
                    .insert(key.as_slice(), b"{not json".as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }

        let store = Store::open(&db_path(&dir)).expect("reopen");
        let provider = store.provider();
        let err = MlsGroup::load(provider.storage(), &id).expect_err("corrupt tree");
        assert!(
            matches!(err, StoreError::Corrupt { table: "mls", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn lists_and_deletions_are_staged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&db_path(&dir)).expect("open");
        let storage = store.provider().storage().clone();
        let key = (7u8, "k");
        storage
            .append(label::OWN_LEAF_NODES, &key, &1u32)
            .expect("append");
        storage
            .append(label::OWN_LEAF_NODES, &key, &2u32)
            .expect("append");
        store.commit(Batch::default()).expect("commit");
        storage
            .append(label::OWN_LEAF_NODES, &key, &3u32)
            .expect("append");
        storage
            .remove_from_list(label::OWN_LEAF_NODES, &key, &1u32)
            .expect("remove");
        let list: Vec<u32> = storage
            .read_list(label::OWN_LEAF_NODES, &key)
            .expect("read");
        assert_eq!(list, [2, 3]);
        store.discard_staged();
        let list: Vec<u32> = storage
            .read_list(label::OWN_LEAF_NODES, &key)
            .expect("read");
        assert_eq!(list, [1, 2]);

        storage.delete(label::OWN_LEAF_NODES, &key).expect("delete");
        let list: Vec<u32> = storage
            .read_list(label::OWN_LEAF_NODES, &key)
            .expect("read");
        assert!(
            list.is_empty(),
            "a staged deletion hides the committed value"
        );
        store.commit(Batch::default()).expect("commit");
        drop((storage, store));
        let store = Store::open(&db_path(&dir)).expect("reopen");
        let storage = store.provider().storage().clone();
        let list: Vec<u32> = storage
            .read_list(label::OWN_LEAF_NODES, &key)
            .expect("read");
        assert!(list.is_empty());
    }
}

#[cfg(test)]
mod value_encoding_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        secret: Vec<u8>,
        epoch: u64,
    }

    #[test]
    fn values_are_tagged_msgpack_and_legacy_json_still_reads() {
        let v = Sample {
            secret: vec![7; 32],
            epoch: 9,
        };
        let packed = encode_value(&v).unwrap();
        assert_eq!(packed[0], MSGPACK_TAG);
        assert!(packed.len() < serde_json::to_vec(&v).unwrap().len());
        assert_eq!(decode_value::<Sample>(&packed).unwrap(), v);
        // The secret is one byte string (bin 8, length 32), not 32 integers.
        let bin = [&[0xc4, 32][..], &[7; 32]].concat();
        assert!(packed.windows(bin.len()).any(|w| w == bin));
        // Records written before byte strings were forced (integers one by one) still read.
        let mut ints = vec![MSGPACK_TAG];
        rmp_serde::encode::write_named(&mut ints, &v).unwrap();
        assert!(ints.len() > packed.len());
        assert_eq!(decode_value::<Sample>(&ints).unwrap(), v);
        let legacy = serde_json::to_vec(&v).unwrap();
        assert_eq!(decode_value::<Sample>(&legacy).unwrap(), v);
        assert!(matches!(
            decode_value::<Sample>(&[MSGPACK_TAG, 0xc1]),
            Err(StoreError::Corrupt { table: "mls", .. })
        ));
    }
}

#[cfg(test)]
mod chunk_tests {
    #![allow(clippy::unwrap_used)]

    use super::super::{Batch, Store};
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Big {
        past: Vec<u8>,
        current: Vec<u8>,
    }

    /// The pieces of the record under `group` that the next commit would write.
    fn staged_pieces(s: &MlsStorage, group: &str) -> Vec<Vec<u8>> {
        let base = storage_key(label::MESSAGE_SECRETS, &group).unwrap();
        s.lock_staged()
            .keys()
            .filter(|k| k.starts_with(&base) && k.len() > base.len())
            .cloned()
            .collect()
    }

    #[test]
    fn a_record_is_written_in_pieces_and_only_changed_pieces_are_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kith.redb");
        let store = Store::open(&path).unwrap();
        let s = store.provider().storage().clone();
        let mut v = Big {
            past: vec![1; 5 * CHUNK_BYTES],
            current: vec![2; 100],
        };
        s.write_chunked(label::MESSAGE_SECRETS, &"g", &v).unwrap();
        assert_eq!(staged_pieces(&s, "g").len(), 6);
        assert_eq!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"g")
                .unwrap()
                .unwrap(),
            v
        );
        store.commit(Batch::default()).unwrap();

        // A message changes the tail only: one piece is written, and the header stays.
        v.current = vec![3; 100];
        s.write_chunked(label::MESSAGE_SECRETS, &"g", &v).unwrap();
        assert_eq!(staged_pieces(&s, "g").len(), 1);
        let base = storage_key(label::MESSAGE_SECRETS, &"g").unwrap();
        assert!(!s.lock_staged().contains_key(&base));
        assert_eq!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"g")
                .unwrap()
                .unwrap(),
            v
        );
        store.commit(Batch::default()).unwrap();

        // Shorter: the pieces beyond the end are deleted.
        v.past = vec![1; 10];
        s.write_chunked(label::MESSAGE_SECRETS, &"g", &v).unwrap();
        store.commit(Batch::default()).unwrap();
        drop(s);
        drop(store);
        let store = Store::open(&path).unwrap();
        let s = store.provider().storage().clone();
        assert_eq!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"g")
                .unwrap()
                .unwrap(),
            v
        );
        let rows = s.scan(|k| k.starts_with(&base)).unwrap();
        assert_eq!(rows.len(), 2, "the header and one piece are left");

        // Deleted with its pieces; a record written whole before chunking still reads.
        s.delete_chunked(label::MESSAGE_SECRETS, &"g").unwrap();
        store.commit(Batch::default()).unwrap();
        assert!(s.scan(|k| k.starts_with(&base)).unwrap().is_empty());
        assert!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"g")
                .unwrap()
                .is_none()
        );
        s.write(label::MESSAGE_SECRETS, &"g", &v).unwrap();
        assert_eq!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"g")
                .unwrap()
                .unwrap(),
            v
        );

        // A missing piece is reported as corruption, not a panic or a wrong value.
        s.write_chunked(label::MESSAGE_SECRETS, &"h", &v).unwrap();
        let hb = storage_key(label::MESSAGE_SECRETS, &"h").unwrap();
        s.stage(&mut s.lock_staged(), chunk_key(&hb, 0), None);
        assert!(matches!(
            s.read_chunked::<Big>(label::MESSAGE_SECRETS, &"h"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

#[cfg(test)]
mod savepoint_tests {
    #![allow(clippy::unwrap_used)]

    use super::super::{Batch, Store};
    use super::*;

    fn kith(n: u8) -> Vec<u8> {
        let mut k = fork::KITH_PREFIX.to_vec();
        k.push(n);
        k
    }

    #[test]
    fn undo_puts_back_staged_and_committed_records_and_release_keeps_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kith.redb")).unwrap();
        let s = store.provider().storage().clone();
        // Committed: a=1, c=3. Staged: a=2.
        s.put_kith(&kith(b'a'), Some(b"1")).unwrap();
        s.put_kith(&kith(b'c'), Some(b"3")).unwrap();
        store.commit(Batch::default()).unwrap();
        s.put_kith(&kith(b'a'), Some(b"2")).unwrap();

        let outer = s.savepoint();
        s.put_kith(&kith(b'a'), Some(b"x")).unwrap();
        s.put_kith(&kith(b'b'), Some(b"y")).unwrap();
        s.put_kith(&kith(b'c'), None).unwrap();
        let inner = s.savepoint();
        s.put_kith(&kith(b'b'), Some(b"z")).unwrap();
        s.release(inner);
        assert_eq!(s.get_kith(&kith(b'b')).unwrap().as_deref(), Some(&b"z"[..]));
        s.undo(outer).unwrap();
        assert_eq!(s.get_kith(&kith(b'a')).unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(s.get_kith(&kith(b'b')).unwrap(), None);
        assert_eq!(s.get_kith(&kith(b'c')).unwrap().as_deref(), Some(&b"3"[..]));
        // Nothing is journaled without a savepoint; a released one keeps its writes.
        assert!(s.lock_journal().changes.is_empty());
        let sp = s.savepoint();
        s.put_kith(&kith(b'd'), Some(b"4")).unwrap();
        s.release(sp);
        assert!(s.lock_journal().changes.is_empty());
        store.commit(Batch::default()).unwrap();
        assert_eq!(s.get_kith(&kith(b'd')).unwrap().as_deref(), Some(&b"4"[..]));
        assert_eq!(s.get_kith(&kith(b'a')).unwrap().as_deref(), Some(&b"2"[..]));
    }
}
