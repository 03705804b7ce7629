//! The `verify_marks` table: the members this node's user verified
//! ([`kith_protocol::verify::VerifyMark`]), keyed by PeerId bytes. Local only, never sent.
//! At most [`MAX_MARKS`] marks; each write is its own durable transaction.

use kith_protocol::PeerId;
use kith_protocol::verify::{MAX_MARKS, MarkError, VerifyMark};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Store, StoreError};

/// `PeerId` bytes → encoded [`VerifyMark`] (docs/PROTOCOL.md, "Member verification").
const MARKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("verify_marks");
const TABLE: &str = "verify_marks";

fn corrupt(e: MarkError) -> StoreError {
    StoreError::Corrupt {
        table: TABLE,
        reason: e.to_string(),
    }
}

fn decode(key: &[u8], value: &[u8]) -> Result<VerifyMark, StoreError> {
    let peer = PeerId::from_bytes(key).map_err(|e| StoreError::Corrupt {
        table: TABLE,
        reason: format!("bad peer id: {e}"),
    })?;
    VerifyMark::decode(peer, value).map_err(corrupt)
}

impl Store {
    /// Every mark, in PeerId byte order. A damaged record is [`StoreError::Corrupt`].
    pub fn marks(&self) -> Result<Vec<VerifyMark>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(MARKS) {
            Ok(t) => t,
            // Created by the first mark: a database without one has none.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The mark of `peer`, if any.
    pub fn mark(&self, peer: &PeerId) -> Result<Option<VerifyMark>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(MARKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let key = peer.to_bytes();
        let value = table.get(key.as_slice())?;
        value.map(|v| decode(&key, v.value())).transpose()
    }

    /// Stores `mark`, replacing the peer's earlier one, durably. A new peer beyond
    /// [`MAX_MARKS`] is [`StoreError::Full`]; an invalid mark is [`StoreError::TooLarge`] or
    /// [`StoreError::Serde`]. Nothing is written on error.
    pub fn put_mark(&self, mark: &VerifyMark) -> Result<(), StoreError> {
        let result = self.put_mark_inner(mark);
        self.db.observe(result)
    }

    fn put_mark_inner(&self, mark: &VerifyMark) -> Result<(), StoreError> {
        let bytes = mark.encode().map_err(|e| match e {
            MarkError::TooLarge { len, limit } => StoreError::TooLarge {
                table: TABLE,
                len,
                limit,
            },
            other => StoreError::Serde(other.to_string()),
        })?;
        let key = mark.peer.to_bytes();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(MARKS)?;
            let known = table.get(key.as_slice())?.is_some();
            if !known && table.len()? >= MAX_MARKS {
                return Err(StoreError::Full {
                    table: TABLE,
                    limit: MAX_MARKS,
                });
            }
            table.insert(key.as_slice(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Deletes the mark of `peer`, durably; returns whether there was one.
    pub fn remove_mark(&self, peer: &PeerId) -> Result<bool, StoreError> {
        let result = (|| -> Result<bool, StoreError> {
            let txn = self.db.begin_write()?;
            let removed = {
                let mut table = txn.open_table(MARKS)?;
                table.remove(peer.to_bytes().as_slice())?.is_some()
            };
            txn.commit()?;
            Ok(removed)
        })();
        self.db.observe(result)
    }

    /// Writes raw bytes as `peer`'s mark, bypassing every check (tests of damaged records).
    #[cfg(test)]
    pub fn put_raw_mark(&self, peer: &PeerId, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(MARKS)?;
            table.insert(peer.to_bytes().as_slice(), bytes)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::peer;

    fn key(n: u8) -> [u8; 32] {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .unwrap()
            .public()
            .try_into_ed25519()
            .unwrap()
            .to_bytes()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kith.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn marks_are_stored_replaced_removed_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kith.redb");
        let store = Store::open(&path).unwrap();
        assert!(store.marks().unwrap().is_empty());
        assert_eq!(store.mark(&peer(1)).unwrap(), None);
        let ann = VerifyMark::new(peer(1), key(1), Some("ann"), 10).unwrap();
        store.put_mark(&ann).unwrap();
        let again = VerifyMark::new(peer(1), key(1), None, 20).unwrap();
        store.put_mark(&again).unwrap();
        store
            .put_mark(&VerifyMark::new(peer(2), key(2), None, 30).unwrap())
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.mark(&peer(1)).unwrap(), Some(again));
        assert_eq!(store.marks().unwrap().len(), 2);
        assert!(store.remove_mark(&peer(2)).unwrap());
        assert!(!store.remove_mark(&peer(2)).unwrap());
        assert_eq!(store.marks().unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_or_oversized_mark_is_a_typed_error() {
        let (_dir, store) = open();
        store.put_raw_mark(&peer(1), &[7, 7, 7]).unwrap();
        assert!(matches!(
            store.mark(&peer(1)),
            Err(StoreError::Corrupt {
                table: "verify_marks",
                ..
            })
        ));
        assert!(matches!(store.marks(), Err(StoreError::Corrupt { .. })));
        store.put_raw_mark(&peer(1), &vec![0; 4096]).unwrap();
        let err = store.mark(&peer(1)).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // A key that is not a PeerId.
        let txn = store.db.begin_write().unwrap();
        txn.open_table(MARKS)
            .unwrap()
            .insert([1u8, 2, 3].as_slice(), [0u8].as_slice())
            .unwrap();
        txn.commit().unwrap();
        assert!(matches!(store.marks(), Err(StoreError::Corrupt { .. })));
        // The mark can be replaced or removed all the same.
        store
            .put_mark(&VerifyMark::new(peer(1), key(1), None, 1).unwrap())
            .unwrap();
        assert!(store.mark(&peer(1)).unwrap().is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        let (_dir, store) = open();
        // Fill it through one transaction (one per mark would take minutes of fsyncs).
        let filler = VerifyMark::new(peer(1), key(1), None, 1)
            .unwrap()
            .encode()
            .unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(MARKS).unwrap();
            for i in 0..MAX_MARKS {
                let mut k = peer(1).to_bytes();
                k.extend_from_slice(&i.to_be_bytes());
                table.insert(k.as_slice(), filler.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let err = store
            .put_mark(&VerifyMark::new(peer(2), key(2), None, 1).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Full { table: "verify_marks", limit } if limit == MAX_MARKS),
            "{err}"
        );
        assert_eq!(store.mark(&peer(2)).unwrap(), None);
    }
}
