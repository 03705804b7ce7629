//! The file store: see [`BlobStore`].
//!
//! On disk, under the directory given to [`BlobStore::open`] (the node passes
//! `<data dir>/files`):
//!
//! - `files.redb`: the index, a redb database of its own (not `kith.redb`), with tables
//!   - `files`: file id → codec-encoded record (layout, groups, times, pin, own, the bitmap
//!     of chunks held, whether the manifest is stored, whether it was evicted);
//!   - `manifests`: file id → the manifest, its leaves concatenated (32 bytes each);
//!   - `meta`: `schema_version` (u32 big-endian).
//! - `data/<64 hex of the file id>.blob`: the sealed chunks of a file, chunk *i* at offset
//!   `i · (chunk_bytes + TAG_BYTES)` (the last one shorter). Names come from ids only.
//! - `tmp/`: imports in progress; emptied by [`BlobStore::open`].
//!
//! **The invariant**: a chunk's bit is set in the index only once its bytes are checked
//! against the manifest and durable in the data file (written, then `fsync`, then the bit
//! in a redb transaction, which is durable when it commits). A crash between the two leaves
//! a chunk written but not held, fetched again later; never a chunk held that is not there.
//! Reads check every chunk against its leaf again (disk rot): a chunk that fails clears its
//! bit.
//!
//! **Room**: a file counts for its whole sealed size from the moment it is wanted or
//! imported ([`BlobStore::want`], [`BlobStore::import`]), so a download cannot overrun the
//! quota midway; making room evicts files (see [`BlobStore::make_room`]).
//!
//! Every method is blocking IO: call it from a blocking thread.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use data_encoding::HEXLOWER;
use kith_protocol::codec;
use kith_protocol::files::{
    Bitmap, CHUNK_BYTES, FileError, Layout, MAX_NAME_BYTES, TAG_BYTES, check_chunk, check_manifest,
    leaf, open_chunk, root, safe_name, seal_chunk,
};
use kith_protocol::ids::{FileId, GroupId};
use rand::RngCore as _;
use rand::rngs::OsRng;
use redb::{
    Database, ReadableDatabase as _, ReadableTable, ReadableTableMetadata as _, TableDefinition,
};
use serde::{Deserialize, Serialize};

/// File id → codec-encoded [`Record`].
const FILES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("files");
/// File id → the manifest's leaves, concatenated.
const MANIFESTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("manifests");
/// Store-wide values: [`META_SCHEMA_VERSION`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_SCHEMA_VERSION: &str = "schema_version";

/// The schema of `files.redb` this code writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// The index's file name, in the store's directory.
pub const INDEX_FILE: &str = "files.redb";
/// The directory of the data files, in the store's directory.
pub const DATA_DIR: &str = "data";
/// The directory of imports in progress, in the store's directory.
pub const TMP_DIR: &str = "tmp";
/// At most this many files (rows, evicted ones too) in the index. A new file beyond it
/// pushes out the longest unused evicted row, or is refused ([`BlobError::TooMany`]).
pub const MAX_FILES: u64 = 100_000;
/// At most this many groups are kept per file (the groups it was posted in, whose members
/// it is served to); a file posted in more keeps the first ones.
pub const MAX_GROUPS: usize = 16;
/// Largest encoded record (a record is at most ~2.7 KiB: a bitmap of 16 Ki chunks and
/// [`MAX_GROUPS`] groups).
const MAX_RECORD_BYTES: usize = 8 * 1024;
/// [`unique_path`] tries this many numbered names before a time-stamped one.
const MAX_NUMBERED: u32 = 9999;

/// What went wrong in the file store. A failed call leaves the index as it was, and never
/// marks a chunk held that is not durable and checked.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "fsync", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading the file being added failed.
    #[error("cannot read the file being added: {0}")]
    Read(io::Error),
    /// The system's random number generator failed (no key could be drawn).
    #[error("the system's random number generator failed: {0}")]
    Random(String),
    /// The index (`files.redb`) failed: IO error, full disk, damaged file, or opened by
    /// another node.
    #[error("the file index failed: {0}")]
    Database(#[from] redb::Error),
    /// A record of the index does not decode: the index is damaged.
    #[error(
        "the file index has a damaged record ({0}); stop the node and delete the files directory to start it afresh"
    )]
    Corrupt(String),
    /// A record could not be encoded (a bug, not bad data).
    #[error("cannot encode a file record: {0}")]
    Encode(String),
    /// The index was written by a newer Kith.
    #[error("the file index has schema version {found}, newer than {supported}; upgrade Kith")]
    SchemaTooNew {
        /// The version in the file.
        found: u32,
        /// The newest this code understands.
        supported: u32,
    },
    /// The file is not in the store.
    #[error("file {} is not in this node's file store", .0.short())]
    NotFound(FileId),
    /// The file was evicted to save space: want it again to fetch it.
    #[error("file {} was removed to save space; fetch it again", .0.short())]
    Evicted(FileId),
    /// The file is not held in full yet.
    #[error("file {} is not fully fetched yet", .0.short())]
    Incomplete(FileId),
    /// The file's manifest is not stored yet, so its chunks cannot be checked.
    #[error("the chunk list of file {} has not been fetched yet", .0.short())]
    NoManifest(FileId),
    /// A held chunk failed its check on disk; its bit was cleared (it is fetched again).
    #[error(
        "chunk {index} of file {} was damaged on disk and dropped; fetch the file again",
        id.short()
    )]
    Damaged {
        /// The file.
        id: FileId,
        /// The chunk.
        index: u32,
    },
    /// A layout, manifest or chunk out of bounds or not matching, or a wrong key.
    #[error("the file does not check: {0}")]
    Bad(#[from] FileError),
    /// Not enough room could be made: files that may not be evicted (pinned, or the one
    /// being made room for) fill the quota, or the file is larger than it.
    #[error(
        "no room for {need} bytes in the file store (quota {quota} bytes); unpin or delete files, or raise the quota"
    )]
    Full {
        /// Bytes needed.
        need: u64,
        /// The quota.
        quota: u64,
    },
    /// The destination of an export exists already (it is never overwritten).
    #[error("{} already exists; choose another name", .0.display())]
    Exists(PathBuf),
    /// The index holds its most files ([`MAX_FILES`]), none of them evicted.
    #[error("the file store holds {limit} files, its limit; delete some")]
    TooMany {
        /// The limit.
        limit: u64,
    },
    /// The source of an import did not have the size given.
    #[error(
        "the file is not the size given: expected {expected} bytes, read {got}; was it changed while being added?"
    )]
    SizeMismatch {
        /// The size given.
        expected: u64,
        /// Bytes read: fewer, or `expected + 1` for a longer source (not read further).
        got: u64,
    },
}

macro_rules! from_redb_error {
    ($($ty:ty),* $(,)?) => {
        $(
            impl From<$ty> for BlobError {
                fn from(e: $ty) -> Self {
                    BlobError::Database(e.into())
                }
            }
        )*
    };
}

from_redb_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A file of the store, as its index row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// The file.
    pub id: FileId,
    /// Its chunks.
    pub layout: Layout,
    /// The groups it was posted in (at most [`MAX_GROUPS`]): it is served to their members.
    pub groups: BTreeSet<GroupId>,
    /// When it was first wanted or imported (node clock, ms).
    pub added_ms: u64,
    /// When it was last used (imported, wanted, exported or served; [`BlobStore::touch`]).
    pub last_used_ms: u64,
    /// Never evicted.
    pub pinned: bool,
    /// This node sent it (imported): evicted only after every other file.
    pub own: bool,
    /// The chunks held: each durable and checked.
    pub have: Bitmap,
    /// Whether the manifest is stored.
    pub manifest: bool,
    /// Evicted to save space: no chunk held, no room counted; want it again to fetch it.
    pub evicted: bool,
}

impl BlobMeta {
    /// A new row of file `id` posted in `group`: nothing held, not this node's own.
    fn fresh(id: FileId, layout: Layout, group: GroupId, now_ms: u64) -> BlobMeta {
        BlobMeta {
            id,
            layout,
            groups: BTreeSet::from([group]),
            added_ms: now_ms,
            last_used_ms: now_ms,
            pinned: false,
            own: false,
            have: Bitmap::empty(layout.chunks()),
            manifest: false,
            evicted: false,
        }
    }

    /// Plaintext bytes of the chunks held.
    pub fn have_bytes(&self) -> u64 {
        (0..self.layout.chunks())
            .filter(|i| self.have.get(*i))
            .map(|i| u64::from(self.layout.plain_len(i)))
            .sum()
    }

    /// Whether the file is held in full (manifest and every chunk) and can be exported.
    pub fn is_complete(&self) -> bool {
        !self.evicted && self.manifest && self.have.is_full()
    }

    /// Bytes it counts against the quota: its whole sealed size, unless evicted.
    pub fn reserved_bytes(&self) -> u64 {
        if self.evicted {
            0
        } else {
            self.layout.cipher_size()
        }
    }
}

/// What the file store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Sealed bytes reserved or held by files not evicted (and imports in progress).
    pub bytes: u64,
    /// Files not evicted.
    pub files: u64,
    /// The quota, in bytes.
    pub quota: u64,
}

/// A file added by [`BlobStore::import`]: what its file message needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Its id.
    pub id: FileId,
    /// The fresh key its chunks are sealed with.
    pub key: [u8; 32],
    /// Its chunks.
    pub layout: Layout,
}

/// An index row as stored (see [`BlobMeta`] for the fields).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    size: u64,
    chunk_bytes: u32,
    groups: Vec<GroupId>,
    added_ms: u64,
    last_used_ms: u64,
    pinned: bool,
    own: bool,
    have: Vec<u8>,
    manifest: bool,
    evicted: bool,
}

fn encode_meta(m: &BlobMeta) -> Result<Vec<u8>, BlobError> {
    let r = Record {
        size: m.layout.size,
        chunk_bytes: m.layout.chunk_bytes,
        groups: m.groups.iter().copied().collect(),
        added_ms: m.added_ms,
        last_used_ms: m.last_used_ms,
        pinned: m.pinned,
        own: m.own,
        have: m.have.as_bytes().to_vec(),
        manifest: m.manifest,
        evicted: m.evicted,
    };
    let bytes = codec::encode(&r).map_err(|e| BlobError::Encode(e.to_string()))?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(BlobError::Encode(format!(
            "a record of {} bytes, more than {MAX_RECORD_BYTES}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn decode_meta(id: FileId, bytes: &[u8]) -> Result<BlobMeta, BlobError> {
    let corrupt = |why: String| BlobError::Corrupt(format!("file {}: {why}", id.short()));
    let r: Record = codec::decode(bytes, MAX_RECORD_BYTES).map_err(|e| corrupt(e.to_string()))?;
    let layout = Layout::new(r.size, r.chunk_bytes).map_err(|e| corrupt(e.to_string()))?;
    let have = Bitmap::from_bytes(layout.chunks(), r.have)
        .ok_or_else(|| corrupt("a bitmap of another size".into()))?;
    if r.groups.len() > MAX_GROUPS {
        return Err(corrupt("too many groups".into()));
    }
    Ok(BlobMeta {
        id,
        layout,
        groups: r.groups.into_iter().collect(),
        added_ms: r.added_ms,
        last_used_ms: r.last_used_ms,
        pinned: r.pinned,
        own: r.own,
        have,
        manifest: r.manifest,
        evicted: r.evicted,
    })
}

fn load(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    id: &FileId,
) -> Result<Option<BlobMeta>, BlobError> {
    let row = table.get(id.as_bytes())?;
    row.map(|v| decode_meta(*id, v.value())).transpose()
}

fn load_manifest(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    meta: &BlobMeta,
) -> Result<Option<Vec<[u8; 32]>>, BlobError> {
    let Some(row) = table.get(meta.id.as_bytes())? else {
        return Ok(None);
    };
    let bytes = row.value();
    if bytes.len() != meta.layout.chunks() as usize * 32 {
        return Err(BlobError::Corrupt(format!(
            "the manifest of file {} has the wrong length",
            meta.id.short()
        )));
    }
    let leaves = bytes
        .chunks_exact(32)
        .map(|c| {
            let mut l = [0u8; 32];
            l.copy_from_slice(c);
            l
        })
        .collect();
    Ok(Some(leaves))
}

fn leaves_bytes(leaves: &[[u8; 32]]) -> Vec<u8> {
    leaves.iter().flatten().copied().collect()
}

/// What eviction needs to know of a row (the whole rows are not held in memory at once).
struct Summary {
    id: FileId,
    reserved: u64,
    evicted: bool,
    own: bool,
    pinned: bool,
    last_used_ms: u64,
    added_ms: u64,
}

/// State shared by the methods that tie the data files to the index.
#[derive(Debug, Default)]
struct State {
    /// Sealed bytes reserved by imports in progress (no row yet).
    pending: u64,
}

/// The node's file store: sealed chunks in data files, indexed in `files.redb` (see the
/// module documentation). `Send + Sync`; every method takes `&self` and blocks on IO.
///
/// Methods that write data files or chunk bits, or delete data files, take one lock, so a
/// chunk is never marked held in a data file that an eviction or a delete is removing;
/// reads and serving do not take it.
pub struct BlobStore {
    db: Database,
    data_dir: PathBuf,
    tmp_dir: PathBuf,
    quota: u64,
    max_files: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("data_dir", &self.data_dir)
            .field("quota", &self.quota)
            .finish()
    }
}

fn create_private_dir(path: &Path) -> Result<(), BlobError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("create", path))
}

fn sync_dir(path: &Path) -> Result<(), BlobError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", path))
}

fn random_hex() -> Result<String, BlobError> {
    let mut b = [0u8; 8];
    OsRng
        .try_fill_bytes(&mut b)
        .map_err(|e| BlobError::Random(e.to_string()))?;
    Ok(HEXLOWER.encode(&b))
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> Result<usize, BlobError> {
    let mut done = 0;
    while done < buf.len() {
        match src.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlobError::Read(e)),
        }
    }
    Ok(done)
}

/// Bytes between the starts of two chunks in a data file.
fn stride(layout: &Layout) -> u64 {
    u64::from(layout.chunk_bytes) + u64::from(TAG_BYTES)
}

/// The file id of a data file's name, if it is one.
fn parse_data_name(name: &str) -> Option<FileId> {
    let hex = name.strip_suffix(".blob")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    hex.parse().ok().filter(|id: &FileId| id.to_string() == hex)
}

/// Removes a file when dropped, unless disarmed (temporary files on every error path).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove a temporary file");
        }
    }
}

/// Room an import reserved; given back when dropped.
struct Reserved<'a> {
    store: &'a BlobStore,
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut st = self.store.state();
        st.pending = st.pending.saturating_sub(self.bytes);
    }
}

/// How reading a held chunk from its data file went.
enum Sealed {
    /// The chunk, checked.
    Good(Vec<u8>),
    /// Missing, short or not matching its leaf.
    Damaged,
}

impl BlobStore {
    /// Opens the store in `dir` (created if needed), with room for `quota_bytes` sealed
    /// bytes, and repairs what a crash may have left: `tmp/` is emptied, data files without
    /// a live index row (deleted or evicted) are removed, and rows whose data file is
    /// missing hold no chunk any more (fetched again). An undecodable row is dropped (its
    /// file is fetched again if wanted). Fails if another node has the index open.
    pub fn open(dir: &Path, quota_bytes: u64) -> Result<BlobStore, BlobError> {
        create_private_dir(dir)?;
        let data_dir = dir.join(DATA_DIR);
        let tmp_dir = dir.join(TMP_DIR);
        create_private_dir(&data_dir)?;
        // The index first: its lock keeps a second node off the directory before anything
        // is cleared.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(dir.join(INDEX_FILE))?;
        match fs::remove_dir_all(&tmp_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("empty", &tmp_dir)(e)),
        }
        create_private_dir(&tmp_dir)?;
        let store = BlobStore {
            db,
            data_dir,
            tmp_dir,
            quota: quota_bytes,
            max_files: MAX_FILES,
            state: Mutex::new(State::default()),
        };
        store.prepare()?;
        Ok(store)
    }

    /// Checks the schema, and brings the index and the data files into agreement.
    fn prepare(&self) -> Result<(), BlobError> {
        // The data files there are.
        let mut files: HashMap<FileId, PathBuf> = HashMap::new();
        let entries = fs::read_dir(&self.data_dir).map_err(io_err("list", &self.data_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.data_dir))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_data_name) {
                Some(id) => {
                    files.insert(id, entry.path());
                }
                None => {
                    tracing::warn!(path = %entry.path().display(), "a file that is not the file store's in its data directory; left alone")
                }
            }
        }
        let txn = self.db.begin_write()?;
        let live: HashSet<FileId> = {
            let mut meta = txn.open_table(META)?;
            let found = meta
                .get(META_SCHEMA_VERSION)?
                .map(|v| {
                    <[u8; 4]>::try_from(v.value())
                        .map(u32::from_be_bytes)
                        .map_err(|_| BlobError::Corrupt("the schema version".into()))
                })
                .transpose()?;
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(BlobError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
            }
            let mut table = txn.open_table(FILES)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let mut live = HashSet::new();
            let mut drop_rows = Vec::new();
            let mut fix = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let id = FileId(*k.value());
                match decode_meta(id, v.value()) {
                    Err(e) => {
                        tracing::warn!(file = %id.short(), error = %e, "dropping a damaged file record");
                        drop_rows.push(id);
                    }
                    Ok(m) => {
                        if m.evicted {
                            continue;
                        }
                        live.insert(id);
                        if m.have.count() > 0 && !files.contains_key(&id) {
                            fix.push(id);
                        }
                    }
                }
            }
            for id in drop_rows {
                table.remove(id.as_bytes())?;
                manifests.remove(id.as_bytes())?;
            }
            for id in fix {
                if let Some(mut m) = load(&table, &id)? {
                    tracing::warn!(file = %id.short(), "the data file is missing; the file will be fetched again");
                    m.have = Bitmap::empty(m.layout.chunks());
                    table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
                }
            }
            // A row claiming a manifest that is not stored (or does not load) has none.
            let mut no_manifest = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let id = FileId(*k.value());
                let m = decode_meta(id, v.value())?;
                if m.manifest && !matches!(load_manifest(&manifests, &m), Ok(Some(_))) {
                    no_manifest.push(m);
                }
            }
            for mut m in no_manifest {
                tracing::warn!(file = %m.id.short(), "the manifest is missing or damaged; the file will be fetched again");
                m.manifest = false;
                m.have = Bitmap::empty(m.layout.chunks());
                manifests.remove(m.id.as_bytes())?;
                table.insert(m.id.as_bytes(), encode_meta(&m)?.as_slice())?;
            }
            live
        };
        txn.commit()?;
        for (id, path) in files {
            if !live.contains(&id) {
                tracing::info!(file = %id.short(), "removing a data file without a file record");
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves nothing half-done in `State`.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data_path(&self, id: &FileId) -> PathBuf {
        self.data_dir.join(format!("{id}.blob"))
    }

    /// The quota, in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// The index row of `id`, if any.
    pub fn meta(&self, id: FileId) -> Result<Option<BlobMeta>, BlobError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FILES)?;
        load(&table, &id)
    }

    fn meta_or_not_found(&self, id: FileId) -> Result<BlobMeta, BlobError> {
        self.meta(id)?.ok_or(BlobError::NotFound(id))
    }

    /// The manifest of `id`, if stored (checked against the id).
    pub fn manifest(&self, id: FileId) -> Result<Option<Vec<[u8; 32]>>, BlobError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FILES)?;
        let Some(meta) = load(&table, &id)? else {
            return Ok(None);
        };
        self.checked_manifest(&txn.open_table(MANIFESTS)?, &meta)
    }

    fn checked_manifest(
        &self,
        table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
        meta: &BlobMeta,
    ) -> Result<Option<Vec<[u8; 32]>>, BlobError> {
        let Some(leaves) = load_manifest(table, meta)? else {
            return Ok(None);
        };
        if check_manifest(&meta.id, &meta.layout, &leaves).is_err() {
            return Err(BlobError::Corrupt(format!(
                "the manifest of file {} does not match its id",
                meta.id.short()
            )));
        }
        Ok(Some(leaves))
    }

    /// Every file in the index (evicted ones too), in id order.
    pub fn list(&self) -> Result<Vec<BlobMeta>, BlobError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FILES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(decode_meta(FileId(*k.value()), v.value())?);
        }
        Ok(out)
    }

    /// The files to fetch: wanted, not complete, not evicted (what to resume after a
    /// restart).
    pub fn fetching(&self) -> Result<Vec<BlobMeta>, BlobError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|m| !m.evicted && !m.is_complete())
            .collect())
    }

    fn summaries(&self) -> Result<Vec<Summary>, BlobError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FILES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let m = decode_meta(FileId(*k.value()), v.value())?;
            out.push(Summary {
                id: m.id,
                reserved: m.reserved_bytes(),
                evicted: m.evicted,
                own: m.own,
                pinned: m.pinned,
                last_used_ms: m.last_used_ms,
                added_ms: m.added_ms,
            });
        }
        Ok(out)
    }

    /// What the store uses: reserved or held sealed bytes of files not evicted (and
    /// imports in progress), their number, the quota.
    pub fn usage(&self) -> Result<Usage, BlobError> {
        let pending = self.state().pending;
        let rows = self.summaries()?;
        Ok(Usage {
            bytes: rows.iter().map(|s| s.reserved).sum::<u64>() + pending,
            files: rows.iter().filter(|s| !s.evicted).count() as u64,
            quota: self.quota,
        })
    }

    /// Evicts files until `need` more sealed bytes fit the quota, and returns the files
    /// evicted. Only unpinned files other than `keep` are evicted: files of others before
    /// this node's own, the longest unused first. An evicted file's data file is deleted
    /// and its row kept, marked evicted, with its manifest and without chunks. If not
    /// enough room can be made, nothing is evicted and it is [`BlobError::Full`].
    pub fn make_room(&self, need: u64, keep: Option<FileId>) -> Result<Vec<FileId>, BlobError> {
        let st = self.state();
        self.make_room_locked(&st, need, keep)
    }

    fn make_room_locked(
        &self,
        st: &State,
        need: u64,
        keep: Option<FileId>,
    ) -> Result<Vec<FileId>, BlobError> {
        let full = BlobError::Full {
            need,
            quota: self.quota,
        };
        if need > self.quota {
            return Err(full);
        }
        let rows = self.summaries()?;
        let used = rows.iter().map(|s| s.reserved).sum::<u64>() + st.pending;
        let room = self.quota - need;
        if used <= room {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<&Summary> = rows
            .iter()
            .filter(|s| !s.evicted && !s.pinned && Some(s.id) != keep)
            .collect();
        let freeable: u64 = candidates.iter().map(|s| s.reserved).sum();
        if used - freeable > room {
            return Err(full);
        }
        candidates.sort_by_key(|s| (s.own, s.last_used_ms, s.added_ms, s.id));
        let mut left = used;
        let mut evict = Vec::new();
        for s in candidates {
            if left <= room {
                break;
            }
            left -= s.reserved;
            evict.push(s.id);
        }
        self.evict_locked(&evict)?;
        Ok(evict)
    }

    /// Marks `ids` evicted in one transaction, then deletes their data files (a crash in
    /// between leaves data files that [`BlobStore::open`] removes).
    fn evict_locked(&self, ids: &[FileId]) -> Result<(), BlobError> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FILES)?;
            for id in ids {
                if let Some(mut m) = load(&table, id)? {
                    m.evicted = true;
                    m.have = Bitmap::empty(m.layout.chunks());
                    table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        for id in ids {
            tracing::info!(file = %id.short(), "evicted from the file store to save space");
            self.remove_data(id);
        }
        Ok(())
    }

    /// Deletes a data file; a failure is logged (the row no longer claims it, and
    /// [`BlobStore::open`] removes it).
    fn remove_data(&self, id: &FileId) {
        let path = self.data_path(id);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a data file");
        }
    }

    /// Makes sure a new row fits: at the most rows (`max_files`), the longest unused
    /// evicted row is dropped, or the new row is refused.
    fn admit_row(
        &self,
        table: &mut redb::Table<&'static [u8; 32], &'static [u8]>,
        manifests: &mut redb::Table<&'static [u8; 32], &'static [u8]>,
    ) -> Result<(), BlobError> {
        if table.len()? < self.max_files {
            return Ok(());
        }
        let mut oldest: Option<(u64, FileId)> = None;
        for row in table.iter()? {
            let (k, v) = row?;
            let m = decode_meta(FileId(*k.value()), v.value())?;
            if m.evicted && oldest.is_none_or(|(t, _)| m.last_used_ms < t) {
                oldest = Some((m.last_used_ms, m.id));
            }
        }
        let Some((_, id)) = oldest else {
            return Err(BlobError::TooMany {
                limit: self.max_files,
            });
        };
        table.remove(id.as_bytes())?;
        manifests.remove(id.as_bytes())?;
        Ok(())
    }

    /// Adds a file this node sends, read from `src`, which must have exactly `size` bytes:
    /// seals it in [`CHUNK_BYTES`] chunks under a fresh key, one chunk in memory at a
    /// time, into a temporary file, makes it durable, moves it into `data/`, then writes
    /// its row (complete, own, posted in `group`). Makes room first ([`BlobError::Full`]
    /// if it cannot). A source of another size is [`BlobError::SizeMismatch`]; on any
    /// error nothing is stored.
    pub fn import(
        &self,
        src: &mut dyn Read,
        size: u64,
        group: GroupId,
        now_ms: u64,
    ) -> Result<Imported, BlobError> {
        let layout = Layout::new(size, CHUNK_BYTES)?;
        let need = layout.cipher_size();
        let _reserved = {
            let mut st = self.state();
            let rows = self.summaries()?;
            if rows.len() as u64 >= self.max_files && rows.iter().all(|s| !s.evicted) {
                return Err(BlobError::TooMany {
                    limit: self.max_files,
                });
            }
            self.make_room_locked(&st, need, None)?;
            st.pending += need;
            Reserved {
                store: self,
                bytes: need,
            }
        };
        let mut key = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut key)
            .map_err(|e| BlobError::Random(e.to_string()))?;
        let tmp = self.tmp_dir.join(format!("import-{}.part", random_hex()?));
        let mut cleanup = RemoveOnDrop(Some(tmp.clone()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let mut leaves = Vec::with_capacity(layout.chunks() as usize);
        let mut buf = Vec::with_capacity((CHUNK_BYTES + TAG_BYTES) as usize);
        let mut got = 0u64;
        for i in 0..layout.chunks() {
            let len = layout.plain_len(i) as usize;
            buf.clear();
            buf.resize(len, 0);
            let n = read_full(src, &mut buf)?;
            got += n as u64;
            if n < len {
                return Err(BlobError::SizeMismatch {
                    expected: size,
                    got,
                });
            }
            seal_chunk(&key, &layout, i, &mut buf)?;
            leaves.push(leaf(&buf));
            file.write_all(&buf).map_err(io_err("write", &tmp))?;
        }
        if read_full(src, &mut [0u8; 1])? > 0 {
            return Err(BlobError::SizeMismatch {
                expected: size,
                got: size + 1,
            });
        }
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        let id = root(&layout, &leaves);
        let _st = self.state();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FILES)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let meta = match load(&table, &id)? {
                Some(mut m) => {
                    if m.groups.len() < MAX_GROUPS {
                        m.groups.insert(group);
                    }
                    m.own = true;
                    m.evicted = false;
                    m.manifest = true;
                    m.have = Bitmap::full(layout.chunks());
                    m.last_used_ms = m.last_used_ms.max(now_ms);
                    m
                }
                None => {
                    self.admit_row(&mut table, &mut manifests)?;
                    BlobMeta {
                        own: true,
                        have: Bitmap::full(layout.chunks()),
                        manifest: true,
                        ..BlobMeta::fresh(id, layout, group, now_ms)
                    }
                }
            };
            table.insert(id.as_bytes(), encode_meta(&meta)?.as_slice())?;
            manifests.insert(id.as_bytes(), leaves_bytes(&leaves).as_slice())?;
        }
        // The data file is durable in `data/` before the row that claims it commits.
        let data = self.data_path(&id);
        fs::rename(&tmp, &data).map_err(io_err("move into place", &data))?;
        cleanup.0 = None;
        let committed = sync_dir(&self.data_dir).and_then(|()| Ok(txn.commit()?));
        if let Err(e) = committed {
            // No row claims it (or it is not known to be durable): drop it.
            self.remove_data(&id);
            return Err(e);
        }
        Ok(Imported { id, key, layout })
    }

    /// Registers a file to fetch, posted in `group` (idempotent: a known file gets `group`
    /// added; an evicted one is wanted again, with no chunk). Reserves room for its whole
    /// sealed size when it is new or was evicted, evicting others if needed
    /// ([`BlobError::Full`] if it cannot). A layout other than the one the file is known
    /// with is refused. Returns the row.
    pub fn want(
        &self,
        id: FileId,
        layout: Layout,
        group: GroupId,
        now_ms: u64,
    ) -> Result<BlobMeta, BlobError> {
        let layout = Layout::new(layout.size, layout.chunk_bytes)?;
        let st = self.state();
        let known = self.meta(id)?;
        if let Some(m) = &known
            && m.layout != layout
        {
            return Err(FileError::Bounds(
                "the file is known with another size or chunk size".into(),
            )
            .into());
        }
        if known.as_ref().is_none_or(|m| m.evicted) {
            self.make_room_locked(&st, layout.cipher_size(), Some(id))?;
        }
        let txn = self.db.begin_write()?;
        let meta = {
            let mut table = txn.open_table(FILES)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let meta = match load(&table, &id)? {
                Some(mut m) => {
                    if m.groups.len() < MAX_GROUPS {
                        m.groups.insert(group);
                    }
                    if m.evicted {
                        m.evicted = false;
                        m.have = Bitmap::empty(layout.chunks());
                    }
                    m.last_used_ms = m.last_used_ms.max(now_ms);
                    m
                }
                None => {
                    self.admit_row(&mut table, &mut manifests)?;
                    // An empty file's manifest is empty: nothing to fetch.
                    let empty = layout.chunks() == 0 && check_manifest(&id, &layout, &[]).is_ok();
                    if empty {
                        manifests.insert(id.as_bytes(), [].as_slice())?;
                    }
                    BlobMeta {
                        manifest: empty,
                        ..BlobMeta::fresh(id, layout, group, now_ms)
                    }
                }
            };
            table.insert(id.as_bytes(), encode_meta(&meta)?.as_slice())?;
            meta
        };
        txn.commit()?;
        drop(st);
        Ok(meta)
    }

    /// Stores the manifest of `id` once it checks against the id ([`check_manifest`]); a
    /// mismatch is [`BlobError::Bad`] and stores nothing. A manifest already stored is left
    /// as it is.
    pub fn put_manifest(&self, id: FileId, leaves: &[[u8; 32]]) -> Result<(), BlobError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FILES)?;
            let mut m = load(&table, &id)?.ok_or(BlobError::NotFound(id))?;
            check_manifest(&id, &m.layout, leaves)?;
            if m.manifest {
                return Ok(());
            }
            txn.open_table(MANIFESTS)?
                .insert(id.as_bytes(), leaves_bytes(leaves).as_slice())?;
            m.manifest = true;
            table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Writes sealed chunks `(index, bytes)` of `id`: each is checked against the stored
    /// manifest first (one that does not check refuses the whole call, writing nothing),
    /// written at its offset, the data file is made durable, and only then are their bits
    /// set, in one transaction. Chunks already held are skipped. Returns the row after.
    pub fn write_chunks(
        &self,
        id: FileId,
        chunks: &[(u32, Vec<u8>)],
    ) -> Result<BlobMeta, BlobError> {
        let _st = self.state();
        let meta = self.meta_or_not_found(id)?;
        if meta.evicted {
            return Err(BlobError::Evicted(id));
        }
        let leaves = {
            let txn = self.db.begin_read()?;
            self.checked_manifest(&txn.open_table(MANIFESTS)?, &meta)?
                .ok_or(BlobError::NoManifest(id))?
        };
        for (i, c) in chunks {
            check_chunk(&meta.layout, &leaves, *i, c)?;
        }
        let mut new: Vec<&(u32, Vec<u8>)> =
            chunks.iter().filter(|(i, _)| !meta.have.get(*i)).collect();
        new.sort_by_key(|(i, _)| *i);
        new.dedup_by_key(|(i, _)| *i);
        if new.is_empty() {
            return Ok(meta);
        }
        let path = self.data_path(&id);
        let created = !path.exists();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let stride = stride(&meta.layout);
        for (i, c) in &new {
            file.write_all_at(c, u64::from(*i) * stride)
                .map_err(io_err("write", &path))?;
        }
        file.sync_data().map_err(io_err("fsync", &path))?;
        if created {
            sync_dir(&self.data_dir)?;
        }
        let txn = self.db.begin_write()?;
        let meta = {
            let mut table = txn.open_table(FILES)?;
            let mut m = load(&table, &id)?.ok_or(BlobError::NotFound(id))?;
            for (i, _) in &new {
                m.have.set(*i);
            }
            table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
            m
        };
        txn.commit()?;
        Ok(meta)
    }

    /// Reads held chunk `index` of `meta`'s file from `file`, checking it against its leaf.
    fn read_sealed(
        &self,
        file: &File,
        meta: &BlobMeta,
        leaves: &[[u8; 32]],
        index: u32,
    ) -> Result<Sealed, BlobError> {
        let mut buf = vec![0u8; meta.layout.cipher_len(index) as usize];
        match file.read_exact_at(&mut buf, u64::from(index) * stride(&meta.layout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Sealed::Damaged),
            Err(e) => return Err(io_err("read", &self.data_path(&meta.id))(e)),
        }
        Ok(match check_chunk(&meta.layout, leaves, index, &buf) {
            Ok(()) => Sealed::Good(buf),
            Err(_) => Sealed::Damaged,
        })
    }

    fn open_data(&self, id: &FileId) -> Result<Option<File>, BlobError> {
        let path = self.data_path(id);
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    /// The leaves of a row that holds chunks, read with it.
    fn held(&self, id: FileId) -> Result<(BlobMeta, Vec<[u8; 32]>), BlobError> {
        let txn = self.db.begin_read()?;
        let meta = load(&txn.open_table(FILES)?, &id)?.ok_or(BlobError::NotFound(id))?;
        let leaves = load_manifest(&txn.open_table(MANIFESTS)?, &meta)?;
        match leaves {
            Some(l) => Ok((meta, l)),
            None if meta.evicted => Err(BlobError::Evicted(id)),
            None => Err(BlobError::NoManifest(id)),
        }
    }

    /// Chunk `index` failed its check on disk: clears its bit, once a read under the lock
    /// confirms it (a write may have landed since). Returns whether it was cleared.
    fn drop_damaged(&self, id: FileId, index: u32) -> Result<bool, BlobError> {
        let _st = self.state();
        let (meta, leaves) = match self.held(id) {
            Ok(x) => x,
            Err(BlobError::NotFound(_) | BlobError::Evicted(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !meta.have.get(index) {
            return Ok(false);
        }
        if let Some(file) = self.open_data(&id)?
            && let Sealed::Good(_) = self.read_sealed(&file, &meta, &leaves, index)?
        {
            return Ok(false);
        }
        tracing::warn!(file = %id.short(), chunk = index, "a chunk was damaged on disk; dropped, to be fetched again");
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FILES)?;
            if let Some(mut m) = load(&table, &id)? {
                let mut have = Bitmap::empty(m.have.len());
                (0..m.have.len())
                    .filter(|j| *j != index && m.have.get(*j))
                    .for_each(|j| have.set(j));
                m.have = have;
                table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(true)
    }

    /// Sealed chunk `index` of `id`, if held: checked against its leaf as it is read; one
    /// that fails (missing, short or changed on disk) loses its bit (it is fetched again)
    /// and is `None`. A file not in the store is [`BlobError::NotFound`].
    pub fn read_chunk(&self, id: FileId, index: u32) -> Result<Option<Vec<u8>>, BlobError> {
        let meta = self.meta_or_not_found(id)?;
        if meta.evicted || !meta.have.get(index) {
            return Ok(None);
        }
        let (meta, leaves) = self.held(id)?;
        let sealed = match self.open_data(&id)? {
            Some(file) => self.read_sealed(&file, &meta, &leaves, index)?,
            None => Sealed::Damaged,
        };
        match sealed {
            Sealed::Good(c) => Ok(Some(c)),
            Sealed::Damaged => {
                self.drop_damaged(id, index)?;
                Ok(None)
            }
        }
    }

    /// The plaintext of chunk `index` of `id`, opened with `key` (for streaming a download
    /// chunk by chunk). A chunk not held is [`BlobError::Incomplete`] (or
    /// [`BlobError::Evicted`]); a wrong key is [`BlobError::Bad`].
    pub fn plain_chunk(
        &self,
        id: FileId,
        key: &[u8; 32],
        index: u32,
    ) -> Result<Vec<u8>, BlobError> {
        let meta = self.meta_or_not_found(id)?;
        if index >= meta.layout.chunks() {
            return Err(FileError::Bounds(format!("no chunk {index}")).into());
        }
        let Some(mut buf) = self.read_chunk(id, index)? else {
            return Err(if meta.evicted {
                BlobError::Evicted(id)
            } else {
                BlobError::Incomplete(id)
            });
        };
        open_chunk(key, &meta.layout, index, &mut buf)?;
        Ok(buf)
    }

    /// Writes the plaintext of complete file `id`, opened with `key`, to `dst`: into a
    /// temporary file in `dst`'s directory, made durable, then moved to `dst`, which is
    /// never overwritten ([`BlobError::Exists`]). A chunk that fails its check on the way
    /// loses its bit and fails the export ([`BlobError::Damaged`]); a wrong key is
    /// [`BlobError::Bad`]. Nothing is left at `dst` on error.
    pub fn export(&self, id: FileId, key: &[u8; 32], dst: &Path) -> Result<(), BlobError> {
        let meta = self.meta_or_not_found(id)?;
        if meta.evicted {
            return Err(BlobError::Evicted(id));
        }
        if !meta.is_complete() {
            return Err(BlobError::Incomplete(id));
        }
        if dst.symlink_metadata().is_ok() {
            return Err(BlobError::Exists(dst.to_owned()));
        }
        let leaves = {
            let txn = self.db.begin_read()?;
            self.checked_manifest(&txn.open_table(MANIFESTS)?, &meta)?
                .ok_or(BlobError::NoManifest(id))?
        };
        let dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(".kith-{}.part", random_hex()?));
        let cleanup = RemoveOnDrop(Some(tmp.clone()));
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let chunks = meta.layout.chunks();
        let data = if chunks > 0 {
            Some(self.open_data(&id)?)
        } else {
            None
        };
        for i in 0..chunks {
            let sealed = match &data {
                Some(Some(file)) => self.read_sealed(file, &meta, &leaves, i)?,
                _ => Sealed::Damaged,
            };
            let mut buf = match sealed {
                Sealed::Good(b) => b,
                Sealed::Damaged => {
                    if !self.drop_damaged(id, i)? {
                        // Evicted or deleted meanwhile, rather than damaged?
                        match self.meta(id)? {
                            None => return Err(BlobError::NotFound(id)),
                            Some(m) if m.evicted => return Err(BlobError::Evicted(id)),
                            Some(_) => {}
                        }
                    }
                    return Err(BlobError::Damaged { id, index: i });
                }
            };
            open_chunk(key, &meta.layout, i, &mut buf)?;
            out.write_all(&buf).map_err(io_err("write", &tmp))?;
        }
        out.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(out);
        // A hard link fails if `dst` exists, where a rename would replace it.
        match fs::hard_link(&tmp, dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(BlobError::Exists(dst.to_owned()));
            }
            Err(_) => {
                // No hard links on this file system: check, then rename.
                if dst.symlink_metadata().is_ok() {
                    return Err(BlobError::Exists(dst.to_owned()));
                }
                fs::rename(&tmp, dst).map_err(io_err("move into place", dst))?;
            }
        }
        drop(cleanup);
        sync_dir(&dir)?;
        Ok(())
    }

    fn update(&self, id: FileId, f: impl FnOnce(&mut BlobMeta)) -> Result<(), BlobError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FILES)?;
            let mut m = load(&table, &id)?.ok_or(BlobError::NotFound(id))?;
            f(&mut m);
            table.insert(id.as_bytes(), encode_meta(&m)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Records that `id` was used at `now_ms` (exported, served): eviction takes the
    /// longest unused first.
    pub fn touch(&self, id: FileId, now_ms: u64) -> Result<(), BlobError> {
        self.update(id, |m| m.last_used_ms = m.last_used_ms.max(now_ms))
    }

    /// Pins `id` (never evicted) or unpins it.
    pub fn pin(&self, id: FileId, pinned: bool) -> Result<(), BlobError> {
        self.update(id, |m| m.pinned = pinned)
    }

    /// Deletes `id`: its row and manifest first, then its data file (a crash in between
    /// leaves a data file that [`BlobStore::open`] removes). Returns whether it was there.
    pub fn delete(&self, id: FileId) -> Result<bool, BlobError> {
        let _st = self.state();
        let txn = self.db.begin_write()?;
        let found = {
            let mut table = txn.open_table(FILES)?;
            let found = table.remove(id.as_bytes())?.is_some();
            txn.open_table(MANIFESTS)?.remove(id.as_bytes())?;
            found
        };
        txn.commit()?;
        self.remove_data(&id);
        Ok(found)
    }

    /// Sets the most rows (tests of [`MAX_FILES`]).
    #[cfg(test)]
    fn set_max_files(&mut self, n: u64) {
        self.max_files = n;
    }
}

/// `dir/name`, or if that is taken `dir/stem (1).ext`, `(2)`, …: where to save a file
/// called `name`, made safe first ([`safe_name`]: no path, no hidden or reserved name), so
/// the result is always directly inside `dir`. Taken means anything exists there, even a
/// dangling link. Another process may take the name before it is used:
/// [`BlobStore::export`] then refuses with [`BlobError::Exists`].
pub fn unique_path(dir: &Path, name: &str) -> PathBuf {
    let name = safe_name(name);
    let taken = |p: &Path| p.symlink_metadata().is_ok();
    let first = dir.join(&name);
    if !taken(&first) {
        return first;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 => name.split_at(i),
        _ => (name.as_str(), ""),
    };
    let numbered = |suffix: &str| {
        let mut cut = MAX_NAME_BYTES
            .saturating_sub(ext.len() + suffix.len())
            .min(stem.len());
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        dir.join(format!("{}{suffix}{ext}", &stem[..cut]))
    };
    for n in 1..=MAX_NUMBERED {
        let p = numbered(&format!(" ({n})"));
        if !taken(&p) {
            return p;
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    numbered(&format!(" ({nanos})"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kith_protocol::files::MIN_CHUNK_BYTES;

    const G: GroupId = GroupId([7; 32]);
    const QUOTA: u64 = 1 << 30;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn open(dir: &Path, quota: u64) -> BlobStore {
        BlobStore::open(dir, quota).unwrap()
    }

    fn import(store: &BlobStore, bytes: &[u8], now: u64) -> Imported {
        store
            .import(&mut &bytes[..], bytes.len() as u64, G, now)
            .unwrap()
    }

    /// A file sealed outside any store, in chunks of `MIN_CHUNK_BYTES` (to keep quotas
    /// small in tests): id, layout, sealed chunks, leaves.
    struct Outside {
        id: FileId,
        layout: Layout,
        chunks: Vec<Vec<u8>>,
        leaves: Vec<[u8; 32]>,
    }

    fn sealed(len: usize, seed: u8) -> Outside {
        let layout = Layout::new(len as u64, MIN_CHUNK_BYTES).unwrap();
        let plain: Vec<u8> = data(len).iter().map(|b| b ^ seed).collect();
        let chunks: Vec<Vec<u8>> = (0..layout.chunks())
            .map(|i| {
                let start = layout.offset(i) as usize;
                let mut buf = plain[start..start + layout.plain_len(i) as usize].to_vec();
                seal_chunk(&[seed; 32], &layout, i, &mut buf).unwrap();
                buf
            })
            .collect();
        let leaves: Vec<_> = chunks.iter().map(|c| leaf(c)).collect();
        Outside {
            id: root(&layout, &leaves),
            layout,
            chunks,
            leaves,
        }
    }

    /// Wants `f` and stores all of it.
    fn fetch_all(store: &BlobStore, f: &Outside, now: u64) {
        store.want(f.id, f.layout, G, now).unwrap();
        store.put_manifest(f.id, &f.leaves).unwrap();
        let all: Vec<_> = f
            .chunks
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, c)| (i as u32, c))
            .collect();
        assert!(store.write_chunks(f.id, &all).unwrap().is_complete());
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<BlobStore>();
    }

    #[test]
    fn an_imported_file_reads_and_exports_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), QUOTA);
        for len in [3 * CHUNK_BYTES as usize + 1234, 0, 10] {
            let input = data(len);
            let imp = import(&store, &input, 5);
            let meta = store.meta(imp.id).unwrap().unwrap();
            assert!(meta.is_complete() && meta.own && meta.manifest && !meta.evicted);
            assert_eq!(meta.have_bytes(), len as u64);
            assert_eq!(meta.groups, BTreeSet::from([G]));
            assert_eq!(imp.layout, Layout::new(len as u64, CHUNK_BYTES).unwrap());
            let leaves = store.manifest(imp.id).unwrap().unwrap();
            check_manifest(&imp.id, &imp.layout, &leaves).unwrap();
            let mut streamed = Vec::new();
            for i in 0..imp.layout.chunks() {
                let c = store.read_chunk(imp.id, i).unwrap().unwrap();
                check_chunk(&imp.layout, &leaves, i, &c).unwrap();
                streamed.extend(store.plain_chunk(imp.id, &imp.key, i).unwrap());
            }
            assert_eq!(streamed, input);
            let out = dir.path().join(format!("out-{len}"));
            store.export(imp.id, &imp.key, &out).unwrap();
            assert_eq!(fs::read(&out).unwrap(), input);
            // Never over an existing file.
            assert!(matches!(
                store.export(imp.id, &imp.key, &out),
                Err(BlobError::Exists(_))
            ));
            // A wrong key does not open it, and leaves nothing behind.
            if len > 0 {
                let other = dir.path().join(format!("wrong-{len}"));
                assert!(matches!(
                    store.export(imp.id, &[0; 32], &other),
                    Err(BlobError::Bad(FileError::Undecryptable(0)))
                ));
                assert!(!other.exists());
            }
        }
        // No temporary file left next to the exports, nor in tmp/.
        assert!(files_in(dir.path()).iter().all(|n| !n.ends_with(".part")));
        assert!(files_in(&dir.path().join(TMP_DIR)).is_empty());
        // The data file has the fixed stride.
        let big = store
            .list()
            .unwrap()
            .into_iter()
            .find(|m| m.layout.chunks() == 4)
            .unwrap();
        let len = fs::metadata(store.data_path(&big.id)).unwrap().len();
        assert_eq!(len, big.layout.cipher_size());
        assert_eq!(store.usage().unwrap().files, 3);
    }

    #[test]
    fn a_file_fetched_from_another_store_checks_each_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let sender = open(&dir.path().join("a"), QUOTA);
        let input = data(2 * CHUNK_BYTES as usize + 77);
        let imp = import(&sender, &input, 1);
        let store = open(&dir.path().join("b"), QUOTA);
        let meta = store.want(imp.id, imp.layout, G, 2).unwrap();
        assert!(!meta.own && !meta.manifest && meta.have.count() == 0);
        assert_eq!(store.fetching().unwrap().len(), 1);
        // Again, from another group: idempotent, the group added.
        let other = GroupId([9; 32]);
        let meta = store.want(imp.id, imp.layout, other, 3).unwrap();
        assert_eq!(meta.groups, BTreeSet::from([G, other]));
        assert_eq!(store.list().unwrap().len(), 1);
        // Another layout for the same id is refused.
        let wrong = Layout::new(imp.layout.size + 1, CHUNK_BYTES).unwrap();
        assert!(matches!(
            store.want(imp.id, wrong, G, 3),
            Err(BlobError::Bad(_))
        ));
        // No chunk before the manifest; a wrong manifest is refused.
        let leaves = sender.manifest(imp.id).unwrap().unwrap();
        let chunk = |i| sender.read_chunk(imp.id, i).unwrap().unwrap();
        assert!(matches!(
            store.write_chunks(imp.id, &[(0, chunk(0))]),
            Err(BlobError::NoManifest(_))
        ));
        let mut bad = leaves.clone();
        bad.swap(0, 1);
        assert!(matches!(
            store.put_manifest(imp.id, &bad),
            Err(BlobError::Bad(FileError::BadManifest))
        ));
        assert!(!store.meta(imp.id).unwrap().unwrap().manifest);
        store.put_manifest(imp.id, &leaves).unwrap();
        // A wrong chunk (flipped bit, or at another index) refuses the call.
        let mut flipped = chunk(1);
        flipped[3] ^= 1;
        assert!(matches!(
            store.write_chunks(imp.id, &[(0, chunk(0)), (1, flipped)]),
            Err(BlobError::Bad(FileError::BadChunk(1)))
        ));
        assert!(matches!(
            store.write_chunks(imp.id, &[(2, chunk(1))]),
            Err(BlobError::Bad(FileError::BadChunk(2)))
        ));
        assert_eq!(store.meta(imp.id).unwrap().unwrap().have.count(), 0);
        // In two batches, out of order.
        let m = store.write_chunks(imp.id, &[(2, chunk(2))]).unwrap();
        assert!(m.have.get(2) && !m.is_complete());
        assert_eq!(m.have_bytes(), 77);
        assert!(store.read_chunk(imp.id, 0).unwrap().is_none());
        assert!(matches!(
            store.plain_chunk(imp.id, &imp.key, 0),
            Err(BlobError::Incomplete(_))
        ));
        assert!(matches!(
            store.export(imp.id, &imp.key, &dir.path().join("early")),
            Err(BlobError::Incomplete(_))
        ));
        let m = store
            .write_chunks(imp.id, &[(0, chunk(0)), (1, chunk(1)), (2, chunk(2))])
            .unwrap();
        assert!(m.is_complete());
        assert!(store.fetching().unwrap().is_empty());
        let out = dir.path().join("got");
        store.export(imp.id, &imp.key, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), input);
    }

    #[test]
    fn an_empty_wanted_file_is_complete_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), QUOTA);
        let f = sealed(0, 1);
        assert!(store.want(f.id, f.layout, G, 1).unwrap().is_complete());
        let out = dir.path().join("empty");
        store.export(f.id, &[1; 32], &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"");
    }

    #[test]
    fn bits_survive_a_reopen_and_only_durable_chunks_have_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = sealed(5 * MIN_CHUNK_BYTES as usize - 9, 2);
        {
            let store = open(dir.path(), QUOTA);
            store.want(f.id, f.layout, G, 1).unwrap();
            store.put_manifest(f.id, &f.leaves).unwrap();
            store
                .write_chunks(f.id, &[(0, f.chunks[0].clone()), (3, f.chunks[3].clone())])
                .unwrap();
        }
        let store = open(dir.path(), QUOTA);
        let m = store.meta(f.id).unwrap().unwrap();
        assert!(m.manifest && m.have.get(0) && m.have.get(3) && m.have.count() == 2);
        assert_eq!(store.read_chunk(f.id, 3).unwrap().unwrap(), f.chunks[3]);
        assert_eq!(store.fetching().unwrap().len(), 1);
        // A crash after writing chunk 1 but before its bit: written, not held.
        let stride = stride(&f.layout);
        let file = OpenOptions::new()
            .write(true)
            .open(store.data_path(&f.id))
            .unwrap();
        file.write_all_at(&f.chunks[1], stride).unwrap();
        drop(file);
        drop(store);
        let store = open(dir.path(), QUOTA);
        let m = store.meta(f.id).unwrap().unwrap();
        assert!(!m.have.get(1) && m.have.count() == 2);
        assert!(store.read_chunk(f.id, 1).unwrap().is_none());
    }

    #[test]
    fn open_clears_tmp_stray_data_files_and_claims_of_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let f = sealed(3 * MIN_CHUNK_BYTES as usize, 3);
        let stray = FileId([0xab; 32]);
        {
            let store = open(dir.path(), QUOTA);
            fetch_all(&store, &f, 1);
            fs::write(store.tmp_dir.join("import-1.part"), b"half").unwrap();
            fs::create_dir(store.tmp_dir.join("sub")).unwrap();
            // A crash between deleting a row and its data file.
            fs::write(store.data_path(&stray), b"sealed").unwrap();
            fs::write(store.data_dir.join("notes.txt"), b"not ours").unwrap();
        }
        let store = open(dir.path(), QUOTA);
        assert!(files_in(&store.tmp_dir).is_empty());
        assert!(!store.data_path(&stray).exists());
        assert!(store.data_dir.join("notes.txt").exists());
        assert!(store.meta(f.id).unwrap().unwrap().is_complete());
        // The data file of a complete file vanished: the row no longer claims its chunks.
        fs::remove_file(store.data_path(&f.id)).unwrap();
        drop(store);
        let store = open(dir.path(), QUOTA);
        let m = store.meta(f.id).unwrap().unwrap();
        assert!(m.manifest && m.have.count() == 0 && !m.evicted);
        assert_eq!(store.fetching().unwrap().len(), 1);
        // And it can be fetched again.
        let all: Vec<_> = f
            .chunks
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, c)| (i as u32, c))
            .collect();
        assert!(store.write_chunks(f.id, &all).unwrap().is_complete());
    }

    #[test]
    fn a_chunk_damaged_on_disk_is_caught_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), QUOTA);
        let input = data(2 * CHUNK_BYTES as usize + 5);
        let imp = import(&store, &input, 1);
        let good: Vec<Vec<u8>> = (0..3)
            .map(|i| store.read_chunk(imp.id, i).unwrap().unwrap())
            .collect();
        let path = store.data_path(&imp.id);
        let flip = |at: u64| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, at).unwrap();
            file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        };
        let stride = stride(&imp.layout);
        // Chunk 1 rots: read_chunk catches it and drops its bit.
        flip(stride + 10);
        assert!(store.read_chunk(imp.id, 1).unwrap().is_none());
        let m = store.meta(imp.id).unwrap().unwrap();
        assert!(!m.have.get(1) && m.have.get(0) && m.have.get(2) && !m.is_complete());
        assert_eq!(store.fetching().unwrap().len(), 1);
        let out = dir.path().join("out");
        assert!(matches!(
            store.export(imp.id, &imp.key, &out),
            Err(BlobError::Incomplete(_))
        ));
        // Fetched again, it is whole again.
        let m = store.write_chunks(imp.id, &[(1, good[1].clone())]).unwrap();
        assert!(m.is_complete());
        // Chunk 0 rots: the export fails on it and drops its bit; nothing is left behind.
        flip(1);
        assert!(matches!(
            store.export(imp.id, &imp.key, &out),
            Err(BlobError::Damaged { index: 0, .. })
        ));
        assert!(!out.exists());
        assert!(files_in(dir.path()).iter().all(|n| !n.ends_with(".part")));
        let m = store.meta(imp.id).unwrap().unwrap();
        assert!(!m.have.get(0) && m.have.get(1) && m.have.get(2));
        assert!(matches!(
            store.plain_chunk(imp.id, &imp.key, 0),
            Err(BlobError::Incomplete(_))
        ));
        // A truncated data file: the chunk it cut is dropped too, the others still read.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(2 * stride + 1).unwrap();
        drop(file);
        assert!(store.read_chunk(imp.id, 2).unwrap().is_none());
        assert!(!store.meta(imp.id).unwrap().unwrap().have.get(2));
        assert_eq!(store.read_chunk(imp.id, 1).unwrap().unwrap(), good[1]);
        // Both fetched again: the export works.
        let m = store
            .write_chunks(imp.id, &[(0, good[0].clone()), (2, good[2].clone())])
            .unwrap();
        assert!(m.is_complete());
        store.export(imp.id, &imp.key, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), input);
    }

    #[test]
    fn eviction_takes_others_files_first_oldest_first_never_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<Outside> = (1..=3)
            .map(|s| sealed(4 * MIN_CHUNK_BYTES as usize, s))
            .collect();
        let size = files[0].layout.cipher_size();
        // Room for four such files.
        let store = open(dir.path(), 4 * size);
        // Fetched at 10, 20, 30; the oldest is pinned, the second used again at 1000.
        for (i, f) in files.iter().enumerate() {
            fetch_all(&store, f, 10 * (i as u64 + 1));
        }
        store.pin(files[0].id, true).unwrap();
        store.touch(files[1].id, 1000).unwrap();
        // This node's own file, used longest ago of all, one chunk a bit smaller than
        // the others.
        let own = import(&store, &data(4 * MIN_CHUNK_BYTES as usize - 100), 0);
        let own_size = own.layout.cipher_size();
        assert!(own_size < size);
        let used = store.usage().unwrap();
        assert_eq!(used.files, 4);
        assert_eq!(used.bytes, 3 * size + own_size);
        assert_eq!(used.quota, 4 * size);
        // Nothing to do while it fits.
        assert!(store.make_room(size - own_size, None).unwrap().is_empty());
        // Room for one more: file 3 goes (the longest unused of the others' unpinned).
        assert_eq!(store.make_room(size, None).unwrap(), vec![files[2].id]);
        let m = store.meta(files[2].id).unwrap().unwrap();
        assert!(m.evicted && m.manifest && m.have.count() == 0);
        assert!(!store.data_path(&files[2].id).exists());
        assert!(store.read_chunk(files[2].id, 0).unwrap().is_none());
        assert!(matches!(
            store.export(files[2].id, &[3; 32], &dir.path().join("x")),
            Err(BlobError::Evicted(_))
        ));
        assert!(store.fetching().unwrap().is_empty());
        // Then file 2, then this node's own; the pinned one stays.
        assert_eq!(store.make_room(2 * size, None).unwrap(), vec![files[1].id]);
        assert_eq!(store.make_room(3 * size, None).unwrap(), vec![own.id]);
        assert!(!store.data_path(&own.id).exists());
        // `keep` is not evicted either: nothing is, and it is Full.
        assert!(matches!(
            store.make_room(4 * size, Some(files[0].id)),
            Err(BlobError::Full { .. })
        ));
        assert!(matches!(
            store.make_room(4 * size + 1, None),
            Err(BlobError::Full { need, quota }) if need == 4 * size + 1 && quota == 4 * size
        ));
        assert!(store.meta(files[0].id).unwrap().unwrap().is_complete());
        // Several at once, and nothing when it cannot be enough.
        store.pin(files[0].id, false).unwrap();
        store.want(files[1].id, files[1].layout, G, 2000).unwrap();
        store.want(files[2].id, files[2].layout, G, 2001).unwrap();
        store.pin(files[2].id, true).unwrap();
        assert!(matches!(
            store.make_room(4 * size, None),
            Err(BlobError::Full { .. })
        ));
        assert_eq!(store.usage().unwrap().files, 3);
        assert_eq!(
            store.make_room(3 * size, None).unwrap(),
            vec![files[0].id, files[1].id]
        );
        // An evicted file wanted again is fetched again.
        let m = store.want(files[1].id, files[1].layout, G, 3000).unwrap();
        assert!(!m.evicted && m.manifest && m.have.count() == 0);
        let all: Vec<_> = files[1]
            .chunks
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, c)| (i as u32, c))
            .collect();
        assert!(store.write_chunks(files[1].id, &all).unwrap().is_complete());
    }

    #[test]
    fn want_reserves_room_for_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = sealed(4 * MIN_CHUNK_BYTES as usize, 1);
        let b = sealed(4 * MIN_CHUNK_BYTES as usize, 2);
        let size = a.layout.cipher_size();
        let store = open(dir.path(), size + size / 2);
        // Wanted, nothing fetched yet: it counts in full.
        store.want(a.id, a.layout, G, 1).unwrap();
        assert_eq!(store.usage().unwrap().bytes, size);
        // Another one pushes it out; pinned, it stays and the other is refused.
        store.pin(a.id, true).unwrap();
        assert!(matches!(
            store.want(b.id, b.layout, G, 2),
            Err(BlobError::Full { .. })
        ));
        assert!(store.meta(b.id).unwrap().is_none());
        store.pin(a.id, false).unwrap();
        store.want(b.id, b.layout, G, 2).unwrap();
        assert!(store.meta(a.id).unwrap().unwrap().evicted);
        assert_eq!(store.usage().unwrap().bytes, size);
        assert_eq!(store.usage().unwrap().files, 1);
        // Writing to the evicted one is refused.
        assert!(matches!(
            store.write_chunks(a.id, &[(0, a.chunks[0].clone())]),
            Err(BlobError::Evicted(_))
        ));
        // A file larger than the quota is refused outright, imported or wanted.
        let big = sealed(8 * MIN_CHUNK_BYTES as usize, 3);
        assert!(matches!(
            store.want(big.id, big.layout, G, 3),
            Err(BlobError::Full { .. })
        ));
        let input = data(2 * size as usize);
        assert!(matches!(
            store.import(&mut &input[..], input.len() as u64, G, 3),
            Err(BlobError::Full { .. })
        ));
        assert!(store.meta(b.id).unwrap().is_some_and(|m| !m.evicted));
    }

    #[test]
    fn delete_removes_the_row_and_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), QUOTA);
        let imp = import(&store, &data(1000), 1);
        assert!(store.delete(imp.id).unwrap());
        assert!(store.meta(imp.id).unwrap().is_none());
        assert!(store.manifest(imp.id).unwrap().is_none());
        assert!(!store.data_path(&imp.id).exists());
        assert!(!store.delete(imp.id).unwrap());
        assert!(matches!(
            store.read_chunk(imp.id, 0),
            Err(BlobError::NotFound(_))
        ));
        assert!(matches!(
            store.pin(imp.id, true),
            Err(BlobError::NotFound(_))
        ));
        assert_eq!(store.usage().unwrap().bytes, 0);
    }

    #[test]
    fn an_import_of_the_wrong_size_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), QUOTA);
        let input = data(CHUNK_BYTES as usize + 10);
        let short = store.import(&mut &input[..], input.len() as u64 + 1, G, 1);
        assert!(matches!(
            short,
            Err(BlobError::SizeMismatch { expected, got }) if expected == input.len() as u64 + 1 && got == input.len() as u64
        ));
        let long = store.import(&mut &input[..], input.len() as u64 - 1, G, 1);
        assert!(matches!(long, Err(BlobError::SizeMismatch { .. })));
        assert!(store.list().unwrap().is_empty());
        assert!(files_in(&store.data_dir).is_empty());
        assert!(files_in(&store.tmp_dir).is_empty());
        assert_eq!(store.usage().unwrap().bytes, 0);
        // A reader that fails.
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("unplugged"))
            }
        }
        assert!(matches!(
            store.import(&mut Failing, 5, G, 1),
            Err(BlobError::Read(_))
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn the_number_of_rows_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), QUOTA);
        store.set_max_files(2);
        let a = sealed(100, 1);
        let b = sealed(100, 2);
        let c = sealed(100, 3);
        store.want(a.id, a.layout, G, 1).unwrap();
        store.want(b.id, b.layout, G, 2).unwrap();
        assert!(matches!(
            store.want(c.id, c.layout, G, 3),
            Err(BlobError::TooMany { limit: 2 })
        ));
        assert!(matches!(
            store.import(&mut &b"x"[..], 1, G, 3),
            Err(BlobError::TooMany { .. })
        ));
        // An evicted row makes way.
        store
            .make_room(QUOTA - a.layout.cipher_size(), Some(b.id))
            .unwrap();
        store.want(c.id, c.layout, G, 3).unwrap();
        assert!(store.meta(a.id).unwrap().is_none());
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(dir.path(), QUOTA);
        assert!(matches!(
            BlobStore::open(dir.path(), QUOTA),
            Err(BlobError::Database(_))
        ));
    }

    #[test]
    fn errors_read_as_one_line() {
        let errors = [
            BlobError::Full { need: 10, quota: 5 },
            BlobError::SizeMismatch {
                expected: 3,
                got: 2,
            },
            BlobError::Evicted(FileId([1; 32])),
            BlobError::Exists(PathBuf::from("/tmp/x")),
            BlobError::Io {
                action: "write",
                path: PathBuf::from("/d/f"),
                source: io::Error::other("disk full"),
            },
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n') && !s.is_empty(), "{s}");
        }
    }

    #[test]
    fn unique_paths_number_collisions_and_stay_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(unique_path(d, "photo.jpg"), d.join("photo.jpg"));
        fs::write(d.join("photo.jpg"), b"").unwrap();
        assert_eq!(unique_path(d, "photo.jpg"), d.join("photo (1).jpg"));
        fs::write(d.join("photo (1).jpg"), b"").unwrap();
        assert_eq!(unique_path(d, "photo.jpg"), d.join("photo (2).jpg"));
        fs::write(d.join("README"), b"").unwrap();
        assert_eq!(unique_path(d, "README"), d.join("README (1)"));
        // Hostile names land inside `dir`.
        for name in ["../x", "/etc/passwd", "..", "a/../../b", "..\\..\\c", ""] {
            let p = unique_path(d, name);
            assert_eq!(p.parent(), Some(d), "{name:?} → {}", p.display());
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!file.starts_with('.') && !file.is_empty(), "{file}");
        }
        assert_eq!(unique_path(d, "../x"), d.join("x"));
        assert_eq!(unique_path(d, "/etc/passwd"), d.join("passwd"));
        // A long name taken still fits the name limit when numbered.
        let long = format!("{}.txt", "é".repeat(200));
        let first = unique_path(d, &long);
        fs::write(&first, b"").unwrap();
        let second = unique_path(d, &long);
        let name = second.file_name().unwrap().to_str().unwrap();
        assert!(
            name.len() <= MAX_NAME_BYTES && name.ends_with(" (1).txt"),
            "{name}"
        );
    }
}
mod settings;
