//! What the group engine keeps to resolve concurrent commits: checkpoints of a group's MLS
//! state before each commit it merged, the commits it merged (its *branch*), and its own
//! recent messages, so it can roll back to a common epoch, apply the winning commit, and
//! re-send or re-propose what was lost.
//!
//! The rule (see docs/PROTOCOL.md, "Concurrent commits"): for each epoch, of all valid
//! commits made at that epoch, the one whose envelope id (SHA-256 of the envelope bytes) is
//! lowest wins. Every member can evaluate that on its own, in any arrival order, without
//! clocks, so all members that saw the same commits end on the same branch.
//!
//! Storage: the engine's storage provider implements [`GroupRecords`], which exposes the raw
//! openmls records of one group and a small key-value space for Kith's own records. Both live
//! in the same store as the MLS state, so a checkpoint, the fork log and the MLS change they
//! belong to are persisted together.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::ids::{GroupId, MessageId};

/// How many of its most recent commits a member can undo. A fork that diverged further back
/// than this is healed by rejoining instead (see [`crate::group::GroupEngine`]).
pub const REWIND_DEPTH: usize = 16;
/// Own application messages kept per group for re-sending after a rollback.
pub const MAX_RESEND: usize = 1024;
/// Largest encoded checkpoint or fork log accepted back from storage.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Raw storage records: (key, value) pairs.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// Raw access to one group's records in an openmls storage provider, and to Kith records
/// kept beside them. Implemented by the node's redb storage and, in tests, by openmls' memory
/// storage. Writes follow the provider's own staging rules (the node stages them until the
/// store transaction commits).
pub trait GroupRecords {
    /// The storage error.
    type Error: std::fmt::Display;

    /// Every openmls record that belongs to `group` (group state, tree, secrets, proposals,
    /// epoch key pairs), as (storage key, value).
    fn group_records(&self, group: &GroupId) -> Result<Records, Self::Error>;

    /// Deletes every openmls record of `group` and writes `records` instead.
    fn replace_group_records(
        &self,
        group: &GroupId,
        records: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), Self::Error>;

    /// Writes (or with `None` deletes) a Kith record. Keys start with [`KITH_PREFIX`].
    fn put_kith(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), Self::Error>;

    /// Reads one Kith record.
    fn get_kith(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;

    /// The keys of all Kith records that start with `prefix`, in key order.
    fn kith_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Self::Error>;

    /// What [`GroupRecords::savepoint`] returns.
    type Savepoint;

    /// Marks the current state of every record, so [`GroupRecords::undo`] can return to it.
    /// Savepoints nest; each one ends with exactly one `undo` or `release`.
    fn savepoint(&self) -> Self::Savepoint;

    /// Puts every record back as it was at `savepoint` (writes made since are forgotten).
    fn undo(&self, savepoint: Self::Savepoint) -> Result<(), Self::Error>;

    /// Keeps the writes made since `savepoint`.
    fn release(&self, savepoint: Self::Savepoint);
}

/// Prefix of every Kith record key in the MLS store; no openmls record key starts with it.
pub const KITH_PREFIX: &[u8] = b"kith\0";

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A stored checkpoint or log could not be decoded.
    #[error("corrupt fork record: {0}")]
    Corrupt(String),
}

fn storage<E: std::fmt::Display>(e: E) -> ForkError {
    ForkError::Storage(e.to_string())
}

/// The key of a Kith record of `kind` for `group` in the MLS store.
pub(crate) fn kith_key(kind: &[u8], group: &GroupId, rest: &[&[u8]]) -> Vec<u8> {
    key(kind, group, rest)
}

fn key(kind: &[u8], group: &GroupId, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(KITH_PREFIX.len() + kind.len() + 1 + 32 + 40);
    k.extend_from_slice(KITH_PREFIX);
    k.extend_from_slice(kind);
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

fn checkpoint_key(group: &GroupId, epoch: u64) -> Vec<u8> {
    key(b"cp", group, &[&epoch.to_be_bytes()])
}

fn log_key(group: &GroupId) -> Vec<u8> {
    key(b"log", group, &[])
}

fn sent_prefix(group: &GroupId) -> Vec<u8> {
    key(b"sent", group, &[])
}

fn sent_key(group: &GroupId, epoch: u64, id: &MessageId) -> Vec<u8> {
    key(b"sent", group, &[&epoch.to_be_bytes(), id.as_bytes()])
}

/// What one of this node's own commits did, so it can be proposed again if it loses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnChange {
    /// Added the member with this key package (TLS-encoded), admitted by the invite with this
    /// secret hash.
    Add {
        /// The joiner's key package.
        key_package: Vec<u8>,
        /// The invite it was admitted by.
        invite: Option<[u8; 32]>,
    },
    /// Removed the member with this PeerId (bytes).
    Remove(Vec<u8>),
    /// Refreshed this node's own leaf key.
    Update,
    /// Committed pending proposals of others (a member leaving).
    Proposals,
}

/// A commit this node merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The epoch the commit was made in (the state it applies to).
    pub epoch: u64,
    /// Its envelope id, which decides between concurrent commits.
    pub commit: MessageId,
    /// Set when this node made the commit.
    pub own: Option<OwnChange>,
    /// The invite whose use the commit counted (its Add was admitted by it).
    pub invite: Option<crate::ids::InviteId>,
}

/// One of this node's own application messages, kept for re-sending after a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The epoch it was encrypted in.
    pub epoch: u64,
    /// Its stable content id (the same for every re-send).
    pub id: MessageId,
    /// Sender clock at the first send.
    pub sent_at_ms: u64,
    /// What was said.
    pub said: Said,
}

/// What a kept message says: a text, or a chat message (a reply, reaction, edit, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Said {
    /// A text.
    Text(String),
    /// A chat message.
    Chat(crate::chat::Chat),
}

/// [`Sent`] as written before chat messages existed (a text only); read back as
/// [`Said::Text`].
#[derive(Serialize, Deserialize)]
struct SentV1 {
    epoch: u64,
    id: MessageId,
    sent_at_ms: u64,
    text: String,
}

fn decode_sent(bytes: &[u8]) -> Result<Sent, ForkError> {
    match codec::decode::<Sent>(bytes, MAX_RECORD_BYTES) {
        Ok(s) => Ok(s),
        Err(e) => codec::decode::<SentV1>(bytes, MAX_RECORD_BYTES)
            .map(|v| Sent {
                epoch: v.epoch,
                id: v.id,
                sent_at_ms: v.sent_at_ms,
                said: Said::Text(v.text),
            })
            .map_err(|_| ForkError::Corrupt(e.to_string())),
    }
}

/// The commits this node merged in a group, most recent last, at most [`REWIND_DEPTH`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The first epoch this node was in (it cannot judge commits of earlier epochs).
    pub since: u64,
    /// Merged commits in epoch order.
    pub applied: Vec<Applied>,
    /// How this node joined, while a concurrent commit could still undo it.
    pub joined: Option<Joined>,
    /// Ids of the commits merged before the window (epoch, commit), at most [`MAX_OLDER`]:
    /// enough to tell which side of a fork deeper than [`REWIND_DEPTH`] lost.
    pub older: Vec<(u64, MessageId)>,
}

/// Commit ids kept beyond the rewind window (see [`Branch::older`]).
pub const MAX_OLDER: usize = 1024;

/// The commit that added this node, and the link it joined with, so it can join again if a
/// concurrent commit for the same epoch wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// The epoch the Add commit was made in (this node's first epoch minus one).
    pub epoch: u64,
    /// The Add commit's envelope id.
    pub commit: MessageId,
    /// The invite link.
    pub link: String,
    /// The member who added this node (PeerId bytes): the first one to ask again, since a
    /// used-up invite is no longer announced in the DHT.
    pub by: Option<Vec<u8>>,
}

impl Branch {
    /// The commit merged at `epoch`, if it is still within the window.
    pub fn at(&self, epoch: u64) -> Option<&Applied> {
        self.applied.iter().find(|a| a.epoch == epoch)
    }

    /// The id of the commit this node's branch merged at `epoch`, if still known.
    pub fn commit_at(&self, epoch: u64) -> Option<MessageId> {
        self.at(epoch).map(|a| a.commit).or_else(|| {
            self.older
                .iter()
                .find(|(e, _)| *e == epoch)
                .map(|(_, c)| *c)
        })
    }

    /// The oldest epoch this node can roll back to.
    pub fn oldest(&self) -> Option<u64> {
        self.applied.first().map(|a| a.epoch)
    }
}

/// Saves a copy of `group`'s MLS state as it is now, as the checkpoint for `epoch`.
pub fn save_checkpoint<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<(), ForkError> {
    let records = s.group_records(group).map_err(storage)?;
    let bytes = codec::encode(&records).map_err(|e| ForkError::Storage(e.to_string()))?;
    s.put_kith(&checkpoint_key(group, epoch), Some(&bytes))
        .map_err(storage)
}

/// Puts `group`'s MLS state back to the checkpoint for `epoch`. False if there is none.
pub fn restore_checkpoint<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<bool, ForkError> {
    let Some(bytes) = s.get_kith(&checkpoint_key(group, epoch)).map_err(storage)? else {
        return Ok(false);
    };
    let records: Vec<(Vec<u8>, Vec<u8>)> =
        codec::decode(&bytes, MAX_RECORD_BYTES).map_err(|e| ForkError::Corrupt(e.to_string()))?;
    s.replace_group_records(group, &records).map_err(storage)?;
    Ok(true)
}

/// Deletes the checkpoint for `epoch`.
pub fn delete_checkpoint<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<(), ForkError> {
    s.put_kith(&checkpoint_key(group, epoch), None)
        .map_err(storage)
}

/// Reads the group's branch (empty if none was saved).
pub fn load_branch<S: GroupRecords>(s: &S, group: &GroupId) -> Result<Branch, ForkError> {
    match s.get_kith(&log_key(group)).map_err(storage)? {
        Some(bytes) => {
            codec::decode(&bytes, MAX_RECORD_BYTES).map_err(|e| ForkError::Corrupt(e.to_string()))
        }
        None => Ok(Branch::default()),
    }
}

/// Writes the group's branch.
pub fn save_branch<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    branch: &Branch,
) -> Result<(), ForkError> {
    let bytes = codec::encode(branch).map_err(|e| ForkError::Storage(e.to_string()))?;
    s.put_kith(&log_key(group), Some(&bytes)).map_err(storage)
}

/// Keeps one of this node's own messages for re-sending.
pub fn save_sent<S: GroupRecords>(s: &S, group: &GroupId, sent: &Sent) -> Result<(), ForkError> {
    let bytes = codec::encode(sent).map_err(|e| ForkError::Storage(e.to_string()))?;
    s.put_kith(&sent_key(group, sent.epoch, &sent.id), Some(&bytes))
        .map_err(storage)
}

/// This node's kept messages of `group` encrypted in an epoch after `epoch`, oldest first.
pub fn sent_after<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<Vec<Sent>, ForkError> {
    let prefix = sent_prefix(group);
    let mut out = Vec::new();
    for k in s.kith_keys(&prefix).map_err(storage)? {
        let Some(e) = k
            .get(prefix.len()..prefix.len() + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        if e <= epoch {
            continue;
        }
        if let Some(bytes) = s.get_kith(&k).map_err(storage)? {
            out.push(decode_sent(&bytes)?);
        }
    }
    out.sort_by_key(|m| (m.epoch, m.sent_at_ms));
    Ok(out)
}

/// Forgets the oldest kept messages of `group` beyond [`MAX_RESEND`] (oldest epochs first),
/// and the envelope index entries ([`index_sent`]) of epochs no kept message is from. They
/// are kept past the rewind window: a member that could not decrypt one may ask for it
/// again (see `group::resend`).
pub fn trim_sent<S: GroupRecords>(s: &S, group: &GroupId) -> Result<(), ForkError> {
    let prefix = sent_prefix(group);
    let keys = s.kith_keys(&prefix).map_err(storage)?;
    let excess = keys.len().saturating_sub(MAX_RESEND);
    if excess == 0 {
        return Ok(());
    }
    for k in &keys[..excess] {
        s.put_kith(k, None).map_err(storage)?;
    }
    let oldest_kept = keys
        .get(excess)
        .and_then(|k| k.get(prefix.len()..prefix.len() + 8))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(u64::MAX, u64::from_be_bytes);
    let index = sent_index_prefix(group);
    for k in s.kith_keys(&index).map_err(storage)? {
        let epoch = s
            .get_kith(&k)
            .map_err(storage)?
            .and_then(|v| v.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()))
            .map(u64::from_be_bytes);
        if epoch.is_none_or(|e| e < oldest_kept) {
            s.put_kith(&k, None).map_err(storage)?;
        }
    }
    Ok(())
}

fn sent_index_prefix(group: &GroupId) -> Vec<u8> {
    key(b"sent-envelope", group, &[])
}

/// Notes that the envelope `envelope` carried the kept message `sent` (its first send or a
/// re-send), so a request naming the envelope finds the message.
pub fn index_sent<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    envelope: &MessageId,
    sent: &Sent,
) -> Result<(), ForkError> {
    let mut v = sent.epoch.to_be_bytes().to_vec();
    v.extend_from_slice(sent.id.as_bytes());
    let k = key(b"sent-envelope", group, &[envelope.as_bytes()]);
    s.put_kith(&k, Some(&v)).map_err(storage)
}

/// Whether `envelope` carried one of this node's kept messages (as far as the index knows).
pub fn is_indexed<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    envelope: &MessageId,
) -> Result<bool, ForkError> {
    let k = key(b"sent-envelope", group, &[envelope.as_bytes()]);
    Ok(s.get_kith(&k).map_err(storage)?.is_some())
}

/// The kept message the envelope `envelope` carried, if it is still kept.
pub fn sent_by_envelope<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    envelope: &MessageId,
) -> Result<Option<Sent>, ForkError> {
    let k = key(b"sent-envelope", group, &[envelope.as_bytes()]);
    let Some(v) = s.get_kith(&k).map_err(storage)? else {
        return Ok(None);
    };
    let epoch = v
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes);
    let id = v.get(8..).and_then(MessageId::from_slice);
    let found = match (epoch, id) {
        (Some(epoch), Some(id)) => {
            match s.get_kith(&sent_key(group, epoch, &id)).map_err(storage)? {
                Some(bytes) => Some(decode_sent(&bytes)?),
                None => None,
            }
        }
        _ => None,
    };
    if found.is_none() {
        // The message was trimmed: the entry is of no use any more.
        s.put_kith(&k, None).map_err(storage)?;
    }
    Ok(found)
}

/// Deletes a kept message (it was re-sent, or it is superseded).
pub fn delete_sent<S: GroupRecords>(s: &S, group: &GroupId, sent: &Sent) -> Result<(), ForkError> {
    s.put_kith(&sent_key(group, sent.epoch, &sent.id), None)
        .map_err(storage)
}

/// Deletes everything this module keeps for `group` (the group was deleted or rejoined).
pub fn forget_group<S: GroupRecords>(s: &S, group: &GroupId) -> Result<(), ForkError> {
    // Kept texts go too: after a new Welcome the group may hold members this node never saw
    // added, so no text from before may be sent again (see `group::resend`).
    // A commit removing this node held on the old membership (see `group::removal`) goes
    // with it.
    for kind in [&b"cp"[..], b"log", b"sent", b"sent-envelope", b"removal"] {
        for k in s.kith_keys(&key(kind, group, &[])).map_err(storage)? {
            s.put_kith(&k, None).map_err(storage)?;
        }
    }
    Ok(())
}

/// The storage key fragment that identifies `group` in openmls records: openmls storages key
/// group records by the serde_json encoding of its `GroupId` (alone or inside a tuple).
pub fn openmls_group_needle(group: &GroupId) -> Vec<u8> {
    let id = openmls::group::GroupId::from_slice(group.as_bytes());
    serde_json::to_vec(&id).unwrap_or_default()
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod memory {
    //! [`GroupRecords`] for openmls' memory storage, used by the protocol's own tests.

    use std::sync::PoisonError;

    use openmls_memory_storage::MemoryStorage;

    use super::*;

    impl GroupRecords for MemoryStorage {
        type Error = String;
        type Savepoint = std::collections::HashMap<Vec<u8>, Vec<u8>>;

        fn savepoint(&self) -> Self::Savepoint {
            self.values
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        fn undo(&self, savepoint: Self::Savepoint) -> Result<(), String> {
            *self.values.write().unwrap_or_else(PoisonError::into_inner) = savepoint;
            Ok(())
        }

        fn release(&self, _savepoint: Self::Savepoint) {}

        fn group_records(&self, group: &GroupId) -> Result<Records, String> {
            let needle = openmls_group_needle(group);
            let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
            let mut out: Vec<(Vec<u8>, Vec<u8>)> = values
                .iter()
                .filter(|(k, _)| !k.starts_with(KITH_PREFIX) && contains(k, &needle))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            out.sort();
            Ok(out)
        }

        fn replace_group_records(
            &self,
            group: &GroupId,
            records: &[(Vec<u8>, Vec<u8>)],
        ) -> Result<(), String> {
            let needle = openmls_group_needle(group);
            let mut values = self.values.write().unwrap_or_else(PoisonError::into_inner);
            values.retain(|k, _| k.starts_with(KITH_PREFIX) || !contains(k, &needle));
            for (k, v) in records {
                values.insert(k.clone(), v.clone());
            }
            Ok(())
        }

        fn put_kith(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
            let mut values = self.values.write().unwrap_or_else(PoisonError::into_inner);
            match value {
                Some(v) => values.insert(key.to_vec(), v.to_vec()),
                None => values.remove(key),
            };
            Ok(())
        }

        fn get_kith(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
            let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
            Ok(values.get(key).cloned())
        }

        fn kith_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, String> {
            let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
            let mut keys: Vec<Vec<u8>> = values
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            keys.sort();
            Ok(keys)
        }
    }
}
