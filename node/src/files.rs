//! Files on the node: the file store (encrypted chunks on disk, indexed in `files.redb`),
//! thumbnails and media types of what this node sends, and the fetching of files from the
//! members that hold them (see `kith_protocol::files` for the wire and the checks).
//!
//! [`Files`] is the service the engine and the API share:
//! - it **serves** `/kith/file/1.0.0` requests of members: only to a member of a group the
//!   file was posted in (the engine keeps [`Files::set_members`] current), only chunks the
//!   store holds and has checked, within a per-peer byte rate;
//! - it **fetches** files (one task per file, [`download`]) from every member that holds
//!   them, several at once, resuming after a restart from what the store holds;
//! - it **imports** what this node sends ([`Files::import`]) and deletes the files whose
//!   messages were deleted or pruned ([`Files::forget`]).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kith_client::model::{FileState, FileStatus, NodeEvent};
use kith_protocol::files::{FileRef, FileRequest, FileResponse, FileResponseV1, FileWant, Layout};
use kith_protocol::ids::{FileId, GroupId};
use libp2p::PeerId;
use tokio::sync::{Semaphore, broadcast};

use crate::metrics::KithMetrics;
use crate::net::NetHandle;

mod download;
pub mod store;
pub mod thumb;

pub use store::{BlobError, BlobStore};

/// Bytes a member may fetch from this node per second, sustained.
pub const SERVE_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;
/// Bytes a member may fetch from this node in a burst.
pub const SERVE_BURST_BYTES: f64 = 128.0 * 1024.0 * 1024.0;
/// Chunks read from disk at once to answer members.
const SERVE_READS: usize = 16;
/// Peers whose serving buckets are remembered.
const MAX_SERVE_PEERS: usize = 1024;
/// Files fetched at once; more wait their turn.
pub const MAX_DOWNLOADS: usize = 8;
/// A member that sent parts that do not check for this many files is asked for no file
/// for [`BAD_PEER_FOR`].
pub const BAD_PEER_FILES: u32 = 3;
/// How long a member with [`BAD_PEER_FILES`] bad files is not asked.
pub const BAD_PEER_FOR: std::time::Duration = std::time::Duration::from_secs(3600);
/// Members whose bad answers are remembered, at most.
const MAX_BAD_PEERS: usize = 1024;

/// What this node does with files (`[files]` in `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePolicy {
    /// Largest file this node sends.
    pub max_file_bytes: u64,
    /// Files up to this size are fetched when their message arrives (0: never).
    pub auto_download_bytes: u64,
    /// Space the file store may use.
    pub quota_bytes: u64,
    /// Most bytes per second fetched, over all downloads (0: no limit).
    pub download_bytes_per_sec: u64,
    /// Tests only (never set from `config.toml`): flip a bit in every chunk this node
    /// serves, so it acts as a hostile member whose chunks do not check.
    pub corrupt_served: bool,
}

impl Default for FilePolicy {
    fn default() -> Self {
        FilePolicy {
            max_file_bytes: 100 << 20,
            auto_download_bytes: 10 << 20,
            quota_bytes: 2 << 30,
            download_bytes_per_sec: 0,
            corrupt_served: false,
        }
    }
}

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The file store failed or refused.
    #[error(transparent)]
    Store(#[from] BlobError),
    /// The file is larger than this node sends.
    #[error(
        "the file is {size} bytes; this node sends files of at most {max} bytes (`[files] max_file_mib`)"
    )]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file message is out of bounds.
    #[error("{0}")]
    Invalid(String),
    /// The file is not held in full yet.
    #[error("the file is not downloaded yet (`kith download` fetches it)")]
    NotComplete,
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = now;
    }
}

/// A running download.
struct Job {
    group: GroupId,
    /// No holder is known to have what is missing.
    waiting: bool,
    abort: tokio::task::AbortHandle,
}

struct Inner {
    store: Arc<BlobStore>,
    net: NetHandle,
    me: PeerId,
    policy: FilePolicy,
    metrics: Arc<KithMetrics>,
    events: broadcast::Sender<NodeEvent>,
    /// Members of each group (this node included), kept by the engine.
    members: RwLock<HashMap<GroupId, BTreeSet<PeerId>>>,
    jobs: Mutex<HashMap<FileId, Job>>,
    /// Downloads running at once.
    slots: Arc<Semaphore>,
    serve_buckets: Mutex<HashMap<PeerId, Bucket>>,
    serve_reads: Semaphore,
    /// The download rate limit, shared by all downloads.
    rate: Mutex<Bucket>,
    runtime: tokio::runtime::Handle,
    /// Where uploads are spooled before they are imported.
    spool: PathBuf,
    /// Members that sent parts of files that did not check, this run.
    bad_peers: Mutex<BadPeers>,
}

/// Members that sent parts of files that did not check: how many files, and when last.
/// Bounded to [`MAX_BAD_PEERS`] (the least recent is forgotten).
#[derive(Debug, Default)]
struct BadPeers(HashMap<PeerId, (u32, Instant)>);

impl BadPeers {
    /// Notes a bad file from `peer`; true when this makes it shunned.
    fn note(&mut self, peer: PeerId, now: Instant) -> bool {
        if !self.0.contains_key(&peer) && self.0.len() >= MAX_BAD_PEERS {
            let oldest = self.0.iter().min_by_key(|(_, (_, t))| *t).map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.0.remove(&p);
            }
        }
        let e = self.0.entry(peer).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
        e.0 == BAD_PEER_FILES
    }

    /// Whether `peer` is not asked for files now.
    fn shunned(&self, peer: &PeerId, now: Instant) -> bool {
        self.0.get(peer).is_some_and(|(n, t)| {
            *n >= BAD_PEER_FILES && now.saturating_duration_since(*t) < BAD_PEER_FOR
        })
    }
}

/// The node's file service (cheap to clone).
#[derive(Clone)]
pub struct Files {
    inner: Arc<Inner>,
}

impl Files {
    /// Starts the service on `store` and resumes the downloads the store lists as unfinished.
    /// Must be called inside a tokio runtime.
    pub fn start(
        store: BlobStore,
        spool: PathBuf,
        net: NetHandle,
        me: PeerId,
        policy: FilePolicy,
        metrics: Arc<KithMetrics>,
        events: broadcast::Sender<NodeEvent>,
    ) -> Files {
        let files = Files {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                net,
                me,
                policy,
                metrics,
                events,
                members: RwLock::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(MAX_DOWNLOADS)),
                serve_buckets: Mutex::new(HashMap::new()),
                serve_reads: Semaphore::new(SERVE_READS),
                rate: Mutex::new(Bucket::new(policy.download_bytes_per_sec as f64)),
                runtime: tokio::runtime::Handle::current(),
                spool,
                bad_peers: Mutex::new(BadPeers::default()),
            }),
        };
        files.update_usage();
        match files.inner.store.fetching() {
            Ok(list) => {
                for meta in list {
                    if let Some(group) = meta.groups.iter().next().copied() {
                        tracing::info!(file = %meta.id.short(), "resuming a download");
                        files.spawn_job(meta.id, meta.layout, group);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list unfinished downloads"),
        }
        files
    }

    /// Stops every download (what they fetched stays; they resume at the next start).
    pub fn shutdown(&self) {
        let jobs: Vec<Job> = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, j)| j)
            .collect();
        for j in jobs {
            j.abort.abort();
        }
    }

    /// A weak reference to the file store: it is closed once this has no strong count.
    pub fn store_weak(&self) -> std::sync::Weak<BlobStore> {
        Arc::downgrade(&self.inner.store)
    }

    /// The policy.
    pub fn policy(&self) -> FilePolicy {
        self.inner.policy
    }

    /// The file store.
    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    /// Where an upload may be spooled (a fresh path in the store's own directory).
    pub fn spool_path(&self) -> PathBuf {
        let n: u64 = rand::random();
        self.inner.spool.join(format!("upload-{n:016x}"))
    }

    /// The engine's view of `group`'s members changed (or the group was left: empty).
    pub fn set_members(&self, group: GroupId, members: BTreeSet<PeerId>) {
        let mut m = self
            .inner
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if members.is_empty() {
            m.remove(&group);
        } else {
            m.insert(group, members);
        }
    }

    /// `peer` sent a part of a file that did not check (it is already dropped for that file).
    fn note_bad(&self, peer: PeerId) {
        let shunned = self
            .inner
            .bad_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(peer, Instant::now());
        if shunned {
            tracing::warn!(%peer, files = BAD_PEER_FILES, "a member keeps sending parts of files that do not check; not asking it for files for an hour");
        }
    }

    /// Whether `peer` is not asked for files (see [`BAD_PEER_FILES`]).
    fn is_shunned(&self, peer: &PeerId) -> bool {
        self.inner
            .bad_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shunned(peer, Instant::now())
    }

    fn members_of(&self, group: &GroupId) -> BTreeSet<PeerId> {
        self.inner
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .cloned()
            .unwrap_or_default()
    }

    fn is_member(&self, group: &GroupId, peer: &PeerId) -> bool {
        self.inner
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .is_some_and(|m| m.contains(peer))
    }

    /// Imports a file this node sends, from `path` (`size` bytes), for `group`: seals it
    /// into the store and returns the file message's parts (the caller adds the name,
    /// caption and picture). Blocking.
    pub fn import(
        &self,
        path: &Path,
        group: GroupId,
    ) -> Result<(FileId, [u8; 32], Layout), FilesError> {
        let mut f = std::fs::File::open(path).map_err(|e| {
            FilesError::Store(BlobError::Io {
                action: "open",
                path: path.to_owned(),
                source: e,
            })
        })?;
        let size = f
            .metadata()
            .map_err(|e| {
                FilesError::Store(BlobError::Io {
                    action: "read",
                    path: path.to_owned(),
                    source: e,
                })
            })?
            .len();
        if size > self.inner.policy.max_file_bytes {
            return Err(FilesError::TooLarge {
                size,
                max: self.inner.policy.max_file_bytes,
            });
        }
        let imported = self
            .inner
            .store
            .import(&mut f as &mut dyn Read, size, group, now_ms())?;
        self.inner.metrics.files().sent.inc();
        self.update_usage();
        Ok((imported.id, imported.key, imported.layout))
    }

    /// A file message was recorded in `group` (sent by `sender`): fetch it now if the
    /// policy says so (`auto_limit`: the group's automatic download limit). Blocking (the
    /// store registers it).
    pub fn posted(&self, group: GroupId, sender: PeerId, file: &FileRef, auto_limit: u64) {
        if sender == self.inner.me || file.name.is_empty() {
            return;
        }
        if file.size > auto_limit {
            return;
        }
        match self.inner.store.meta(file.id) {
            // Evicted or deleted here before: only on request.
            Ok(Some(m)) if m.evicted || m.is_complete() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the file store");
                return;
            }
        }
        if let Err(e) = self.download(group, file) {
            tracing::info!(file = %file.id.short(), error = %e, "not fetching a file");
        }
    }

    /// Starts fetching `file` of `group` (no-op if held or being fetched). Blocking.
    pub fn download(&self, group: GroupId, file: &FileRef) -> Result<FileState, FilesError> {
        let layout = file
            .layout()
            .map_err(|e| FilesError::Invalid(e.to_string()))?;
        let meta = self.inner.store.want(file.id, layout, group, now_ms())?;
        self.update_usage();
        if !meta.is_complete() {
            self.spawn_job(file.id, layout, group);
        }
        Ok(self.state(&file.id))
    }

    fn spawn_job(&self, id: FileId, layout: Layout, group: GroupId) {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.contains_key(&id) {
            return;
        }
        let me = self.clone();
        let task = self.inner.runtime.spawn(async move {
            let slot = me.inner.slots.clone().acquire_owned().await;
            download::run(&me, id, layout, group).await;
            drop(slot);
            me.inner
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
        jobs.insert(
            id,
            Job {
                group,
                waiting: false,
                abort: task.abort_handle(),
            },
        );
    }

    fn set_waiting(&self, id: &FileId, waiting: bool) {
        if let Some(j) = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            j.waiting = waiting;
        }
    }

    /// How much of file `id` this node holds.
    pub fn state(&self, id: &FileId) -> FileState {
        let job = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|j| j.waiting);
        let meta = match self.inner.store.meta(*id) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a file's state");
                None
            }
        };
        let Some(meta) = meta else {
            return FileState::default();
        };
        let status = if meta.is_complete() {
            FileStatus::Complete
        } else if meta.evicted {
            FileStatus::Evicted
        } else {
            match job {
                Some(true) => FileStatus::Waiting,
                Some(false) => FileStatus::Downloading,
                None => FileStatus::Remote,
            }
        };
        FileState {
            status,
            have_bytes: meta.have_bytes(),
            pinned: meta.pinned,
        }
    }

    /// Stops fetching `id` (its chunks stay until evicted). Returns whether it was running.
    pub fn cancel(&self, id: &FileId) -> bool {
        let job = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match job {
            Some(j) => {
                j.abort.abort();
                true
            }
            None => false,
        }
    }

    /// The messages of these files were deleted or pruned: stop fetching them and delete
    /// their content. Blocking. Returns the ids handled (all unless the store failed).
    pub fn forget(&self, ids: &[FileId]) -> Vec<FileId> {
        let mut done = Vec::new();
        for id in ids {
            let group = self
                .inner
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)
                .map(|j| j.group);
            self.cancel(id);
            let groups = match self.inner.store.meta(*id) {
                Ok(m) => m.map(|m| m.groups).unwrap_or_default(),
                Err(_) => Default::default(),
            };
            match self.inner.store.delete(*id) {
                Ok(_) => {
                    done.push(*id);
                    for g in group.into_iter().chain(groups) {
                        let _ = self.inner.events.send(NodeEvent::FileProgress {
                            group: g.to_string(),
                            file: id.to_string(),
                            state: FileState {
                                status: FileStatus::Deleted,
                                have_bytes: 0,
                                pinned: false,
                            },
                            size: 0,
                        });
                    }
                }
                Err(e) => tracing::warn!(file = %id.short(), error = %e, "cannot delete a file"),
            }
        }
        self.update_usage();
        done
    }

    /// Keeps (`true`) or no longer keeps a file when the store needs room. Blocking.
    pub fn pin(&self, id: &FileId, pinned: bool) -> Result<(), FilesError> {
        self.inner.store.pin(*id, pinned)?;
        Ok(())
    }

    fn update_usage(&self) {
        if let Ok(u) = self.inner.store.usage() {
            self.inner
                .metrics
                .files()
                .store_bytes
                .set(i64::try_from(u.bytes).unwrap_or(i64::MAX));
        }
    }

    /// A member asks for part of a file: answers it in the background.
    pub fn on_inbound(&self, peer: PeerId, request: FileRequest, token: u64) {
        let me = self.clone();
        self.inner.runtime.spawn(async move {
            let answer = me.answer(peer, request).await;
            if !matches!(answer, FileResponseV1::Chunk(_)) {
                tracing::trace!(%peer, ?answer, "file request answered");
            }
            if let Err(e) = me
                .inner
                .net
                .respond_file(token, FileResponse::V1(answer))
                .await
            {
                tracing::debug!(error = %e, "cannot answer a file request");
            }
        });
    }

    async fn answer(&self, peer: PeerId, request: FileRequest) -> FileResponseV1 {
        let r = request.v1().clone();
        let refused = || {
            self.inner.metrics.files().refused.inc();
            FileResponseV1::Denied
        };
        if !self.is_member(&r.group, &peer) {
            return refused();
        }
        let me = self.clone();
        let meta = match tokio::task::spawn_blocking(move || me.inner.store.meta(r.file)).await {
            Ok(Ok(m)) => m,
            _ => return FileResponseV1::Busy,
        };
        let Some(meta) = meta.filter(|m| m.groups.contains(&r.group)) else {
            return refused();
        };
        if meta.evicted || !meta.manifest {
            return FileResponseV1::NotHere;
        }
        match r.want {
            FileWant::Have => FileResponseV1::Have(meta.have.as_bytes().to_vec()),
            FileWant::Manifest => {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.inner.store.manifest(r.file)).await {
                    Ok(Ok(Some(m))) => FileResponseV1::Manifest(m),
                    Ok(Ok(None)) => FileResponseV1::NotHere,
                    _ => FileResponseV1::Busy,
                }
            }
            FileWant::Chunk(i) => {
                if !meta.have.get(i) {
                    return FileResponseV1::NotHere;
                }
                let len = f64::from(meta.layout.cipher_len(i));
                {
                    let mut buckets = self
                        .inner
                        .serve_buckets
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if !buckets.contains_key(&peer) && buckets.len() >= MAX_SERVE_PEERS {
                        let oldest = buckets.iter().min_by_key(|(_, b)| b.last).map(|(p, _)| *p);
                        if let Some(p) = oldest {
                            buckets.remove(&p);
                        }
                    }
                    let b = buckets
                        .entry(peer)
                        .or_insert_with(|| Bucket::new(SERVE_BURST_BYTES));
                    b.refill(SERVE_BYTES_PER_SEC, SERVE_BURST_BYTES, Instant::now());
                    if b.tokens < len {
                        self.inner.metrics.files().refused.inc();
                        return FileResponseV1::Busy;
                    }
                    b.tokens -= len;
                }
                let Ok(_permit) = self.inner.serve_reads.acquire().await else {
                    return FileResponseV1::Busy;
                };
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.inner.store.read_chunk(r.file, i))
                    .await
                {
                    Ok(Ok(Some(mut c))) => {
                        self.inner.metrics.files().chunks_served.inc();
                        if self.inner.policy.corrupt_served
                            && let Some(b) = c.first_mut()
                        {
                            *b ^= 1;
                        }
                        FileResponseV1::Chunk(c)
                    }
                    Ok(Ok(None)) => FileResponseV1::NotHere,
                    _ => FileResponseV1::Busy,
                }
            }
        }
    }

    /// Waits until `bytes` more may be fetched under the download rate limit.
    async fn take_rate(&self, bytes: u64) {
        let rate = self.inner.policy.download_bytes_per_sec as f64;
        if rate <= 0.0 {
            return;
        }
        // The burst is one second's worth, and at least one chunk.
        let burst = rate.max(bytes as f64);
        loop {
            let wait = {
                let mut b = self.inner.rate.lock().unwrap_or_else(|e| e.into_inner());
                b.refill(rate, burst, Instant::now());
                if b.tokens >= bytes as f64 {
                    b.tokens -= bytes as f64;
                    return;
                }
                (bytes as f64 - b.tokens) / rate
            };
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait.min(1.0))).await;
        }
    }

    fn progress(&self, group: GroupId, id: FileId, size: u64) {
        let _ = self.inner.events.send(NodeEvent::FileProgress {
            group: group.to_string(),
            file: id.to_string(),
            state: self.state(&id),
            size,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_with_bad_files_is_shunned_for_a_while_and_the_list_is_bounded() {
        let mut bad = BadPeers::default();
        let p = PeerId::random();
        let t0 = Instant::now();
        assert!(!bad.note(p, t0));
        assert!(!bad.note(p, t0));
        assert!(!bad.shunned(&p, t0));
        assert!(bad.note(p, t0));
        assert!(bad.shunned(&p, t0 + std::time::Duration::from_secs(60)));
        assert!(!bad.shunned(&p, t0 + BAD_PEER_FOR));
        assert!(!bad.shunned(&PeerId::random(), t0));
        for i in 0..(MAX_BAD_PEERS + 5) {
            bad.note(
                PeerId::random(),
                t0 + std::time::Duration::from_millis(i as u64),
            );
        }
        assert_eq!(bad.0.len(), MAX_BAD_PEERS);
    }
}
