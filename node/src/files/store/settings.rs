//! Per-group file settings, kept in the file store's index: the size up to which files
//! posted in a group are fetched as soon as their message arrives.

use kith_protocol::ids::GroupId;
use redb::{ReadableDatabase, TableDefinition};

use super::{BlobError, BlobStore};

/// Group id → automatic download limit in bytes (big-endian u64).
pub(super) const GROUP_AUTO: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("group_auto_download");

impl BlobStore {
    /// The automatic download limit set for `group`, if one is (else the node's default
    /// applies).
    pub fn auto_download(&self, group: GroupId) -> Result<Option<u64>, BlobError> {
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let table = match txn.open_table(GROUP_AUTO) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(redb::Error::from(e).into()),
        };
        Ok(table
            .get(group.as_bytes())
            .map_err(redb::Error::from)?
            .map(|v| v.value()))
    }

    /// Sets (or with `None` clears) the automatic download limit of `group`, durably.
    pub fn set_auto_download(&self, group: GroupId, limit: Option<u64>) -> Result<(), BlobError> {
        let txn = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = txn.open_table(GROUP_AUTO).map_err(redb::Error::from)?;
            match limit {
                Some(l) => {
                    table
                        .insert(group.as_bytes(), l)
                        .map_err(redb::Error::from)?;
                }
                None => {
                    table.remove(group.as_bytes()).map_err(redb::Error::from)?;
                }
            }
        }
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_group_setting_is_kept_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let g = GroupId([4; 32]);
        {
            let store = BlobStore::open(dir.path(), 1 << 30).unwrap();
            assert_eq!(store.auto_download(g).unwrap(), None);
            store.set_auto_download(g, Some(0)).unwrap();
        }
        let store = BlobStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(store.auto_download(g).unwrap(), Some(0));
        store.set_auto_download(g, None).unwrap();
        assert_eq!(store.auto_download(g).unwrap(), None);
    }
}
