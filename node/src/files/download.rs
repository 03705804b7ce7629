//! One download: drives a `kith_protocol::files::fetch::Fetch` with real requests, writes
//! what checks to the file store in batches (each batch durable before its chunks count as
//! held), and reports progress.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kith_protocol::files::fetch::{Fetch, FetchLimits, Got};
use kith_protocol::files::{FileRequest, FileRequestV1, FileWant, Layout};
use kith_protocol::ids::{FileId, GroupId};
use libp2p::PeerId;

use super::{Files, now_ms};
use crate::net::NetError;

/// Chunks written to the store in one batch (one fsync), at most.
const WRITE_BATCH: usize = 16;
/// Longest a checked chunk waits for its batch to be written.
const WRITE_DELAY: Duration = Duration::from_millis(200);
/// How often the holders are refreshed from the group's members.
const REFRESH: Duration = Duration::from_secs(2);
/// Shortest time between two progress events of one file.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

type Answer = (
    PeerId,
    FileWant,
    Result<kith_protocol::files::FileResponse, NetError>,
);

/// Fetches file `id` of `group` until it is complete (or the task is aborted).
pub(super) async fn run(files: &Files, id: FileId, layout: Layout, group: GroupId) {
    let store = files.inner.store.clone();
    let resume = tokio::task::spawn_blocking(move || {
        let meta = store.meta(id)?;
        let manifest = store.manifest(id)?;
        Ok::<_, super::BlobError>((meta, manifest))
    })
    .await;
    let (meta, manifest) = match resume {
        Ok(Ok((Some(meta), manifest))) => (meta, manifest),
        Ok(Ok((None, _))) => return,
        Ok(Err(e)) => {
            tracing::warn!(file = %id.short(), error = %e, "cannot resume a download");
            return;
        }
        Err(_) => return,
    };
    let mut fetch: Fetch<PeerId> =
        Fetch::new(id, layout, manifest, meta.have, FetchLimits::default());
    let mut inflight: FuturesUnordered<futures::future::BoxFuture<'static, Answer>> =
        FuturesUnordered::new();
    let mut pending: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut pending_since: Option<Instant> = None;
    let mut last_refresh: Option<Instant> = None;
    let mut last_progress = Instant::now() - PROGRESS_EVERY;
    let mut bad_seen = 0;
    let mut holders: BTreeSet<PeerId> = BTreeSet::new();
    files.progress(group, id, layout.size);
    loop {
        if last_refresh.is_none_or(|t| t.elapsed() >= REFRESH) {
            let mut members = files.members_of(&group);
            members.retain(|p| !files.is_shunned(p));
            for p in holders.difference(&members).copied().collect::<Vec<_>>() {
                fetch.remove_holder(&p);
                holders.remove(&p);
            }
            for p in members {
                if p != files.inner.me {
                    fetch.add_holder(p);
                    holders.insert(p);
                }
            }
            last_refresh = Some(Instant::now());
        }
        for (peer, want) in fetch.next(now_ms()) {
            let net = files.inner.net.clone();
            let me = files.clone();
            let bytes = match want {
                FileWant::Chunk(i) => u64::from(layout.cipher_len(i)),
                _ => 0,
            };
            inflight.push(Box::pin(async move {
                if bytes > 0 {
                    me.take_rate(bytes).await;
                }
                let request = FileRequest::V1(FileRequestV1 {
                    group,
                    file: id,
                    want,
                });
                (peer, want, net.file(peer, request).await)
            }));
        }
        let waiting = inflight.is_empty() && !fetch.has_source();
        files.set_waiting(&id, waiting);
        let flush_due = !pending.is_empty()
            && (pending.len() >= WRITE_BATCH
                || pending_since.is_some_and(|t| t.elapsed() >= WRITE_DELAY)
                || fetch.is_complete()
                || inflight.is_empty());
        if flush_due {
            let batch = std::mem::take(&mut pending);
            pending_since = None;
            let indices: Vec<u32> = batch.iter().map(|(i, _)| *i).collect();
            let store = files.inner.store.clone();
            let written = tokio::task::spawn_blocking(move || store.write_chunks(id, &batch)).await;
            match written {
                Ok(Ok(_)) => {
                    files
                        .inner
                        .metrics
                        .files()
                        .chunks_fetched
                        .inc_by(indices.len() as u64);
                }
                Ok(Err(e)) => {
                    tracing::warn!(file = %id.short(), error = %e, "cannot store fetched chunks; fetching them again");
                    indices.iter().for_each(|i| fetch.lost(*i));
                    // A full or failing disk: do not spin.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
            if last_progress.elapsed() >= PROGRESS_EVERY || fetch.is_complete() {
                files.progress(group, id, layout.size);
                last_progress = Instant::now();
            }
            continue;
        }
        if fetch.is_complete() && pending.is_empty() {
            break;
        }
        let tick = tokio::time::sleep(if pending.is_empty() {
            REFRESH
        } else {
            WRITE_DELAY
        });
        tokio::select! {
            Some((peer, want, result)) = inflight.next(), if !inflight.is_empty() => {
                match result {
                    Ok(answer) => {
                        match fetch.on_response(&peer, want, answer.into_v1(), now_ms()) {
                            Got::Chunk { index, bytes } => {
                                pending.push((index, bytes));
                                pending_since.get_or_insert_with(Instant::now);
                            }
                            Got::Manifest(leaves) => {
                                let store = files.inner.store.clone();
                                let stored = tokio::task::spawn_blocking(move || store.put_manifest(id, &leaves)).await;
                                if !matches!(stored, Ok(Ok(()))) {
                                    tracing::warn!(file = %id.short(), "cannot store a file's manifest");
                                    return;
                                }
                            }
                            Got::Bad(e) => {
                                files.note_bad(peer);
                                tracing::warn!(file = %id.short(), %peer, error = %e, "a member sent a part of a file that does not check; not asking it again for this file");
                            }
                            Got::Nothing => {}
                        }
                        let bad = fetch.bad_answers();
                        if bad > bad_seen {
                            files.inner.metrics.files().bad_answers.inc_by(bad - bad_seen);
                            bad_seen = bad;
                        }
                    }
                    Err(NetError::Stopped) => return,
                    Err(e) => {
                        tracing::debug!(file = %id.short(), %peer, error = %e, "file request failed");
                        fetch.on_failure(&peer, want, now_ms());
                    }
                }
            }
            _ = tick => {}
        }
    }
    files.inner.metrics.files().completed.inc();
    tracing::info!(file = %id.short(), bytes = layout.size, "file downloaded");
    files.set_waiting(&id, false);
    files.progress(group, id, layout.size);
}
