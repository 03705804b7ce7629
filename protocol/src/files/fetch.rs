//! The fetcher's decisions for one file, without IO: which holder to ask for what, what to
//! make of each answer, and when a holder is dropped. The node performs the requests
//! ([`Fetch::next`]), feeds back answers ([`Fetch::on_response`]) and failures
//! ([`Fetch::on_failure`]), and stores what [`Fetch::on_response`] hands back as checked.
//!
//! - Every candidate holder (a member of the group) is first asked which chunks it has;
//!   holders that are still fetching are asked again every [`FetchLimits::have_refresh_ms`],
//!   so members that fetched a file become sources for the others.
//! - The manifest comes from one holder and is checked against the file id.
//! - Chunks are asked from several holders at once (at most [`FetchLimits::per_peer`] per
//!   holder and [`FetchLimits::total`] in all), each chunk from one holder at a time, lowest
//!   missing index first.
//! - A holder whose manifest, bitmap or chunk does not check is dropped for this file (its
//!   chunks go back to the others) and counted in [`Fetch::bad_answers`]. One that fails to
//!   answer backs off exponentially and is dropped after [`FetchLimits::max_failures`] in a
//!   row; one that is busy waits [`FetchLimits::retry_ms`].

use std::collections::BTreeMap;

use super::{Bitmap, FileError, FileResponseV1, FileWant, Layout, check_chunk, check_manifest};
use crate::ids::FileId;

/// How hard one download pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Chunk requests in flight per holder.
    pub per_peer: u32,
    /// Chunk requests in flight in all.
    pub total: u32,
    /// Wait after a busy answer or a first failure, ms (doubles per failure in a row).
    pub retry_ms: u64,
    /// Failures in a row after which a holder is dropped.
    pub max_failures: u32,
    /// How often a holder that lacks chunks is asked again what it has, ms.
    pub have_refresh_ms: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            per_peer: 4,
            total: 16,
            retry_ms: 1_000,
            max_failures: 5,
            have_refresh_ms: 3_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Not asked yet (or due to be asked again).
    Unknown,
    /// Asked which chunks it has.
    Asking,
    /// It has these chunks (and the manifest).
    Has(Bitmap),
    /// It has nothing of the file.
    Lacks,
    /// Dropped for now: it refused us or failed too often ([`Fetch::add_holder`] gives it
    /// another chance).
    Dropped,
    /// Dropped for good: it answered something that did not check.
    Bad,
}

#[derive(Debug, Clone)]
struct Holder {
    known: Known,
    /// When it was last told us what it has, ms.
    known_at_ms: u64,
    inflight: u32,
    failures: u32,
    /// Not asked anything before this, ms.
    wait_until_ms: u64,
    /// Chunks it sent us that checked.
    served: u64,
}

impl Holder {
    fn new() -> Holder {
        Holder {
            known: Known::Unknown,
            known_at_ms: 0,
            inflight: 0,
            failures: 0,
            wait_until_ms: 0,
            served: 0,
        }
    }
}

/// What an answer gave the caller to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// Nothing to store.
    Nothing,
    /// The manifest, checked against the file id.
    Manifest(Vec<[u8; 32]>),
    /// A sealed chunk, checked against the manifest. It counts as held from now on; if
    /// storing it fails, call [`Fetch::lost`].
    Chunk {
        /// Its index.
        index: u32,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The holder's answer did not check; it is dropped for this file.
    Bad(FileError),
}

/// One file being fetched. `P` names holders (a PeerId in the node).
#[derive(Debug, Clone)]
pub struct Fetch<P> {
    id: FileId,
    layout: Layout,
    limits: FetchLimits,
    manifest: Option<Vec<[u8; 32]>>,
    manifest_from: Option<P>,
    have: Bitmap,
    holders: BTreeMap<P, Holder>,
    /// Chunk → the holder asked for it.
    inflight: BTreeMap<u32, P>,
    bad: u64,
}

impl<P: Ord + Clone> Fetch<P> {
    /// A fetch of file `id` laid out as `layout`, resuming from what is held already: the
    /// manifest (if stored) and the chunks in `have`. A `have` that does not fit the layout
    /// is taken as nothing held.
    pub fn new(
        id: FileId,
        layout: Layout,
        manifest: Option<Vec<[u8; 32]>>,
        have: Bitmap,
        limits: FetchLimits,
    ) -> Fetch<P> {
        let chunks = layout.chunks();
        let manifest = manifest.filter(|m| check_manifest(&id, &layout, m).is_ok());
        // An empty file needs nothing from anyone.
        let manifest = manifest.or_else(|| {
            let empty = Vec::new();
            (chunks == 0 && check_manifest(&id, &layout, &empty).is_ok()).then_some(empty)
        });
        let have = if have.len() == chunks && manifest.is_some() {
            have
        } else {
            Bitmap::empty(chunks)
        };
        Fetch {
            id,
            layout,
            limits,
            manifest,
            manifest_from: None,
            have,
            holders: BTreeMap::new(),
            inflight: BTreeMap::new(),
            bad: 0,
        }
    }

    /// The file.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// Adds a candidate holder (again: one dropped for failing or refusing is given another
    /// chance; one that sent something that did not check is not).
    pub fn add_holder(&mut self, p: P) {
        let h = self.holders.entry(p).or_insert_with(Holder::new);
        if h.known == Known::Dropped {
            *h = Holder::new();
        }
    }

    /// Forgets a holder (it went away); its chunks in flight go back to the others.
    pub fn remove_holder(&mut self, p: &P) {
        self.holders.remove(p);
        self.inflight.retain(|_, q| q != p);
        if self.manifest_from.as_ref() == Some(p) {
            self.manifest_from = None;
        }
    }

    /// Chunks held and chunks in all.
    pub fn progress(&self) -> (u32, u32) {
        (self.have.count(), self.layout.chunks())
    }

    /// Whether every chunk is held (and checked).
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.have.is_full()
    }

    /// The manifest, once known.
    pub fn manifest(&self) -> Option<&[[u8; 32]]> {
        self.manifest.as_deref()
    }

    /// The chunks held.
    pub fn have(&self) -> &Bitmap {
        &self.have
    }

    /// Answers that did not check, in all.
    pub fn bad_answers(&self) -> u64 {
        self.bad
    }

    /// Holders still in the running (not dropped).
    pub fn live_holders(&self) -> usize {
        self.holders
            .values()
            .filter(|h| !matches!(h.known, Known::Dropped | Known::Bad))
            .count()
    }

    /// Whether some holder is known to have a chunk still missing, or may have (not asked
    /// yet, or asking): false means the fetch waits for a holder to come (back).
    pub fn has_source(&self) -> bool {
        self.holders.values().any(|h| match &h.known {
            Known::Unknown | Known::Asking => true,
            Known::Has(b) => {
                (0..b.len()).any(|i| b.get(i) && !self.have.get(i)) || self.manifest.is_none()
            }
            Known::Lacks | Known::Dropped | Known::Bad => false,
        })
    }

    /// Whether `p` sent something that did not check (it is not asked again).
    pub fn is_bad(&self, p: &P) -> bool {
        self.holders.get(p).is_some_and(|h| h.known == Known::Bad)
    }

    /// Chunks served by `p` that checked.
    pub fn served_by(&self, p: &P) -> u64 {
        self.holders.get(p).map_or(0, |h| h.served)
    }

    /// The requests to send now, at `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> Vec<(P, FileWant)> {
        let mut out = Vec::new();
        if self.is_complete() {
            return out;
        }
        let refresh = self.limits.have_refresh_ms;
        for (p, h) in self.holders.iter_mut() {
            if h.wait_until_ms > now_ms {
                continue;
            }
            let stale = match &h.known {
                Known::Unknown => true,
                Known::Lacks => now_ms.saturating_sub(h.known_at_ms) >= refresh,
                Known::Has(b) => !b.is_full() && now_ms.saturating_sub(h.known_at_ms) >= refresh,
                Known::Asking | Known::Dropped | Known::Bad => false,
            };
            if stale {
                h.known = match std::mem::replace(&mut h.known, Known::Asking) {
                    // Keep using what it had while asking again.
                    Known::Has(b) => Known::Has(b),
                    _ => Known::Asking,
                };
                h.known_at_ms = now_ms;
                out.push((p.clone(), FileWant::Have));
            }
        }
        if self.manifest.is_none() {
            if self.manifest_from.is_none()
                && let Some((p, _)) = self
                    .holders
                    .iter()
                    .find(|(_, h)| matches!(h.known, Known::Has(_)) && h.wait_until_ms <= now_ms)
            {
                self.manifest_from = Some(p.clone());
                out.push((p.clone(), FileWant::Manifest));
            }
            return out;
        }
        // Chunks: round-robin over holders, lowest missing chunk each holder has.
        let mut next_missing = 0u32;
        let chunks = self.layout.chunks();
        loop {
            let mut asked = false;
            for (p, h) in self.holders.iter_mut() {
                if self.inflight.len() as u32 >= self.limits.total {
                    return out;
                }
                if h.inflight >= self.limits.per_peer || h.wait_until_ms > now_ms {
                    continue;
                }
                let Known::Has(b) = &h.known else { continue };
                let pick = (next_missing..chunks)
                    .chain(0..next_missing)
                    .find(|i| !self.have.get(*i) && !self.inflight.contains_key(i) && b.get(*i));
                if let Some(i) = pick {
                    self.inflight.insert(i, p.clone());
                    h.inflight += 1;
                    next_missing = i + 1;
                    out.push((p.clone(), FileWant::Chunk(i)));
                    asked = true;
                }
            }
            if !asked {
                return out;
            }
        }
    }

    fn release(&mut self, p: &P, want: FileWant) {
        if let FileWant::Chunk(i) = want
            && self.inflight.get(&i) == Some(p)
        {
            self.inflight.remove(&i);
            if let Some(h) = self.holders.get_mut(p) {
                h.inflight = h.inflight.saturating_sub(1);
            }
        }
        if want == FileWant::Manifest && self.manifest_from.as_ref() == Some(p) {
            self.manifest_from = None;
        }
    }

    fn drop_holder(&mut self, p: &P, why: FileError) -> Got {
        self.bad += 1;
        if let Some(h) = self.holders.get_mut(p) {
            h.known = Known::Bad;
            h.inflight = 0;
        }
        self.inflight.retain(|_, q| q != p);
        if self.manifest_from.as_ref() == Some(p) {
            self.manifest_from = None;
        }
        Got::Bad(why)
    }

    /// Takes `p`'s answer to `want`.
    pub fn on_response(
        &mut self,
        p: &P,
        want: FileWant,
        answer: FileResponseV1,
        now_ms: u64,
    ) -> Got {
        self.release(p, want);
        if !self.holders.contains_key(p) {
            return Got::Nothing;
        }
        let chunks = self.layout.chunks();
        let got = match (want, answer) {
            (FileWant::Have, FileResponseV1::Have(bytes)) => {
                match Bitmap::from_bytes(chunks, bytes) {
                    Some(b) => {
                        if let Some(h) = self.holders.get_mut(p) {
                            h.known = if b.count() == 0 && chunks > 0 {
                                Known::Lacks
                            } else {
                                Known::Has(b)
                            };
                            h.known_at_ms = now_ms;
                        }
                        Got::Nothing
                    }
                    None => {
                        return self
                            .drop_holder(p, FileError::Bounds("bitmap of another size".into()));
                    }
                }
            }
            (FileWant::Manifest, FileResponseV1::Manifest(leaves)) => {
                if self.manifest.is_some() {
                    Got::Nothing
                } else {
                    match check_manifest(&self.id, &self.layout, &leaves) {
                        Ok(()) => {
                            self.manifest = Some(leaves.clone());
                            Got::Manifest(leaves)
                        }
                        Err(e) => return self.drop_holder(p, e),
                    }
                }
            }
            (FileWant::Chunk(i), FileResponseV1::Chunk(bytes)) => {
                let Some(manifest) = &self.manifest else {
                    return Got::Nothing;
                };
                match check_chunk(&self.layout, manifest, i, &bytes) {
                    Ok(()) => {
                        if let Some(h) = self.holders.get_mut(p) {
                            h.served += 1;
                        }
                        if self.have.get(i) {
                            Got::Nothing
                        } else {
                            self.have.set(i);
                            Got::Chunk { index: i, bytes }
                        }
                    }
                    Err(e) => return self.drop_holder(p, e),
                }
            }
            (want, FileResponseV1::NotHere) => {
                if let Some(h) = self.holders.get_mut(p) {
                    match (&mut h.known, want) {
                        (Known::Has(b), FileWant::Chunk(i)) => {
                            // It lost the chunk (evicted): ask what it has again.
                            let mut fresh = Bitmap::empty(b.len());
                            (0..b.len())
                                .filter(|j| *j != i && b.get(*j))
                                .for_each(|j| fresh.set(j));
                            *b = fresh;
                            h.known_at_ms = 0;
                        }
                        _ => {
                            h.known = Known::Lacks;
                            h.known_at_ms = now_ms;
                        }
                    }
                }
                Got::Nothing
            }
            (_, FileResponseV1::Denied) => {
                if let Some(h) = self.holders.get_mut(p) {
                    h.known = Known::Dropped;
                }
                Got::Nothing
            }
            (want, FileResponseV1::Busy) => {
                if let Some(h) = self.holders.get_mut(p) {
                    h.wait_until_ms = now_ms + self.limits.retry_ms;
                    if want == FileWant::Have && h.known == Known::Asking {
                        h.known = Known::Unknown;
                    }
                }
                Got::Nothing
            }
            _ => {
                return self
                    .drop_holder(p, FileError::Bounds("an answer to another question".into()));
            }
        };
        if let Some(h) = self.holders.get_mut(p) {
            h.failures = 0;
        }
        got
    }

    /// `p` did not answer `want` (unreachable, timeout, stream error).
    pub fn on_failure(&mut self, p: &P, want: FileWant, now_ms: u64) {
        self.release(p, want);
        let limits = self.limits;
        if let Some(h) = self.holders.get_mut(p) {
            h.failures += 1;
            if h.failures >= limits.max_failures {
                h.known = Known::Dropped;
                return;
            }
            let backoff = limits.retry_ms << (h.failures - 1).min(6);
            h.wait_until_ms = now_ms + backoff;
            if h.known == Known::Asking {
                h.known = Known::Unknown;
            }
        }
    }

    /// Storing chunk `index` failed: it is missing again.
    pub fn lost(&mut self, index: u32) {
        let mut fresh = Bitmap::empty(self.have.len());
        (0..self.have.len())
            .filter(|j| *j != index && self.have.get(*j))
            .for_each(|j| fresh.set(j));
        self.have = fresh;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::files::{FileResponseV1 as R, MIN_CHUNK_BYTES, leaf, root, seal_chunk};

    struct File {
        id: FileId,
        layout: Layout,
        chunks: Vec<Vec<u8>>,
        leaves: Vec<[u8; 32]>,
    }

    fn file(chunks: u32) -> File {
        let layout = Layout::new(
            u64::from(MIN_CHUNK_BYTES) * u64::from(chunks) - 100,
            MIN_CHUNK_BYTES,
        )
        .unwrap();
        let mut out = Vec::new();
        for i in 0..layout.chunks() {
            let mut buf = vec![i as u8; layout.plain_len(i) as usize];
            seal_chunk(&[3; 32], &layout, i, &mut buf).unwrap();
            out.push(buf);
        }
        let leaves: Vec<_> = out.iter().map(|c| leaf(c)).collect();
        File {
            id: root(&layout, &leaves),
            layout,
            chunks: out,
            leaves,
        }
    }

    /// What each simulated holder does.
    #[derive(Clone, Copy, PartialEq)]
    enum Behaves {
        Good,
        /// Sends chunks with a flipped bit.
        Corrupts,
        /// Never answers.
        Silent,
    }

    /// Runs a fetch to the end against holders with `have` bitmaps; returns the fetch and
    /// how many rounds it took.
    fn run(f: &File, fetch: &mut Fetch<u8>, holders: &BTreeMap<u8, (Behaves, Bitmap)>) -> u32 {
        let mut now = 0;
        for round in 0..10_000 {
            if fetch.is_complete() {
                return round;
            }
            now += 100;
            for (p, want) in fetch.next(now) {
                let (behaves, has) = &holders[&p];
                if *behaves == Behaves::Silent {
                    fetch.on_failure(&p, want, now);
                    continue;
                }
                let answer = match want {
                    FileWant::Have => R::Have(has.as_bytes().to_vec()),
                    FileWant::Manifest => R::Manifest(f.leaves.clone()),
                    FileWant::Chunk(i) if has.get(i) => {
                        let mut c = f.chunks[i as usize].clone();
                        if *behaves == Behaves::Corrupts {
                            c[0] ^= 1;
                        }
                        R::Chunk(c)
                    }
                    FileWant::Chunk(_) => R::NotHere,
                };
                fetch.on_response(&p, want, answer, now);
            }
        }
        panic!("the fetch did not complete");
    }

    fn fetch_of(f: &File) -> Fetch<u8> {
        Fetch::new(
            f.id,
            f.layout,
            None,
            Bitmap::empty(f.layout.chunks()),
            FetchLimits::default(),
        )
    }

    #[test]
    fn a_file_comes_from_several_holders_at_once() {
        let f = file(40);
        let mut fetch = fetch_of(&f);
        let mut holders = BTreeMap::new();
        for p in 1..=3u8 {
            holders.insert(p, (Behaves::Good, Bitmap::full(40)));
            fetch.add_holder(p);
        }
        run(&f, &mut fetch, &holders);
        assert_eq!(fetch.progress(), (40, 40));
        for p in 1..=3u8 {
            assert!(
                fetch.served_by(&p) > 5,
                "holder {p} served {}",
                fetch.served_by(&p)
            );
        }
        assert_eq!(fetch.bad_answers(), 0);
    }

    #[test]
    fn a_corrupted_chunk_drops_its_holder_and_comes_from_another() {
        let f = file(20);
        let mut fetch = fetch_of(&f);
        let holders = BTreeMap::from([
            (1u8, (Behaves::Corrupts, Bitmap::full(20))),
            (2u8, (Behaves::Good, Bitmap::full(20))),
        ]);
        fetch.add_holder(1);
        fetch.add_holder(2);
        run(&f, &mut fetch, &holders);
        assert!(fetch.is_complete());
        assert!(fetch.bad_answers() >= 1);
        assert_eq!(fetch.served_by(&1), 0);
        assert_eq!(fetch.served_by(&2), 20);
        assert_eq!(fetch.live_holders(), 1);
        // Added again (the node refreshes its holders from the members list): still out.
        fetch.add_holder(1);
        assert!(fetch.is_bad(&1));
    }

    #[test]
    fn a_wrong_manifest_is_refused() {
        let f = file(4);
        let mut fetch = fetch_of(&f);
        fetch.add_holder(1u8);
        let asks = fetch.next(0);
        assert_eq!(asks, vec![(1, FileWant::Have)]);
        fetch.on_response(
            &1,
            FileWant::Have,
            R::Have(Bitmap::full(4).as_bytes().to_vec()),
            0,
        );
        assert_eq!(fetch.next(0), vec![(1, FileWant::Manifest)]);
        let mut wrong = f.leaves.clone();
        wrong[0] = [0; 32];
        assert!(matches!(
            fetch.on_response(&1, FileWant::Manifest, R::Manifest(wrong), 0),
            Got::Bad(FileError::BadManifest)
        ));
        assert!(fetch.manifest().is_none());
        assert!(!fetch.has_source());
        assert!(fetch.next(10_000).is_empty());
    }

    #[test]
    fn a_silent_holder_is_given_up_and_the_rest_comes_from_a_partial_one() {
        let f = file(10);
        let mut fetch = fetch_of(&f);
        let mut half = Bitmap::empty(10);
        (0..5).for_each(|i| half.set(i));
        let mut other_half = Bitmap::empty(10);
        (5..10).for_each(|i| other_half.set(i));
        let holders = BTreeMap::from([
            (1u8, (Behaves::Silent, Bitmap::full(10))),
            (2u8, (Behaves::Good, half)),
            (3u8, (Behaves::Good, other_half)),
        ]);
        for p in 1..=3 {
            fetch.add_holder(p);
        }
        run(&f, &mut fetch, &holders);
        assert!(fetch.is_complete());
        assert_eq!(fetch.served_by(&2), 5);
        assert_eq!(fetch.served_by(&3), 5);
    }

    #[test]
    fn a_resumed_fetch_asks_only_for_what_is_missing() {
        let f = file(8);
        let mut have = Bitmap::empty(8);
        (0..6).for_each(|i| have.set(i));
        let mut fetch = Fetch::new(
            f.id,
            f.layout,
            Some(f.leaves.clone()),
            have,
            FetchLimits::default(),
        );
        fetch.add_holder(1u8);
        let holders = BTreeMap::from([(1u8, (Behaves::Good, Bitmap::full(8)))]);
        run(&f, &mut fetch, &holders);
        assert_eq!(fetch.served_by(&1), 2);
        // A stored manifest that does not match is not trusted, nor the bits with it.
        let mut wrong = f.leaves.clone();
        wrong.pop();
        let fetch: Fetch<u8> = Fetch::new(
            f.id,
            f.layout,
            Some(wrong),
            Bitmap::full(8),
            FetchLimits::default(),
        );
        assert_eq!(fetch.progress(), (0, 8));
    }

    #[test]
    fn a_holder_that_is_still_fetching_is_asked_again_later() {
        let f = file(4);
        let mut fetch = fetch_of(&f);
        fetch.add_holder(1u8);
        let _ = fetch.next(0);
        fetch.on_response(
            &1,
            FileWant::Have,
            R::Have(Bitmap::empty(4).as_bytes().to_vec()),
            0,
        );
        assert!(fetch.next(100).is_empty());
        assert_eq!(fetch.next(3_000), vec![(1, FileWant::Have)]);
    }

    #[test]
    fn limits_bound_what_is_in_flight() {
        let f = file(100);
        let mut fetch = fetch_of(&f);
        fetch.add_holder(1u8);
        fetch.add_holder(2u8);
        for p in [1, 2] {
            fetch.on_response(
                &p,
                FileWant::Have,
                R::Have(Bitmap::full(100).as_bytes().to_vec()),
                0,
            );
        }
        let _ = fetch.next(0);
        fetch.on_response(&1, FileWant::Manifest, R::Manifest(f.leaves.clone()), 0);
        let asks = fetch.next(0);
        assert_eq!(asks.len(), 8, "{asks:?}");
        assert!(fetch.next(0).is_empty());
        let mut chunks: Vec<u32> = asks
            .iter()
            .map(|(_, w)| match w {
                FileWant::Chunk(i) => *i,
                _ => panic!("{w:?}"),
            })
            .collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), 8, "each chunk from one holder");
    }

    #[test]
    fn an_empty_file_is_complete_at_once() {
        let layout = Layout::new(0, MIN_CHUNK_BYTES).unwrap();
        let id = root(&layout, &[]);
        let fetch: Fetch<u8> =
            Fetch::new(id, layout, None, Bitmap::empty(0), FetchLimits::default());
        assert!(fetch.is_complete());
    }
}
