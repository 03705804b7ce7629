//! History sync: the sans-IO core of offline delivery between members.
//!
//! A member that was offline asks an online member for what it missed. It sends a
//! [`SyncRequest`] carrying a compact [`Summary`] of the envelopes it already holds (a count
//! and a digest per epoch); the responder answers with [`SyncResponse`] pages: first the
//! commits the requester lacks, in epoch order, then application messages in canonical
//! history order ([`HistoryKey`]). Each page is bounded by the requester's `max_bytes` (and by
//! [`MAX_PAGE_BYTES`]); a [`Cursor`] resumes the next page deterministically.
//!
//! Version 2 ([`SyncRequestV2`], answered by [`respond`]) sends only the difference: an epoch
//! whose digest differs and of which the requester holds nothing is sent whole; one of which
//! it holds some is listed in the last page's [`SyncPageV2::partial`], and the requester then
//! names the ids it holds there ([`Want::Ranges`], planned by [`Holdings::refinement`]) and
//! gets exactly the others. Version 1 ([`plan_response`]) sends every differing epoch whole;
//! it is still answered, for nodes that predate version 2.
//!
//! [`Gaps`] turns "an envelope from a future epoch arrived" into a bounded "missing commits"
//! signal during normal operation.
//!
//! Nothing here does IO or checks membership: the node authenticates the requester (see
//! [`SyncRequestV1::proof`]), loads the envelopes, and feeds the received envelopes to the
//! group engine, which deduplicates them by [`MessageId`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{self, DecodeError, EncodeError};
use crate::envelope::{MAX_ENVELOPE_BYTES, PayloadKind};
use crate::ids::{GroupId, MessageId};
use crate::records::StoredEnvelope;

pub mod scheduler;

/// Most epochs a [`Summary`] lists individually; older epochs fall under its floor.
pub const MAX_SUMMARY_EPOCHS: usize = 1024;
/// Largest membership proof in a request.
pub const MAX_PROOF_BYTES: usize = 512;
/// Longest sender id in a [`HistoryKey`] (an Ed25519 PeerId is 38 bytes).
pub const MAX_SENDER_BYTES: usize = 64;
/// Largest encoded [`SyncRequest`] (a full summary is about 80 KiB).
pub const MAX_SYNC_REQUEST_BYTES: usize = 96 * 1024;
/// Largest encoded [`SyncResponse`].
pub const MAX_SYNC_RESPONSE_BYTES: usize = codec::MAX_DECODE_BYTES;
/// Hard cap on the envelope bytes of one page (each envelope counted with its length prefix),
/// whatever `max_bytes` the requester asks for. The margin below
/// [`MAX_SYNC_RESPONSE_BYTES`] covers the response's own fields (tags, cursor, flag).
pub const MAX_PAGE_BYTES: u32 = (MAX_SYNC_RESPONSE_BYTES - 1024) as u32;

/// Most ranges one [`Want::Ranges`] request carries.
pub const MAX_HELD_RANGES: usize = 128;
/// Most held ids one [`Want::Ranges`] request carries, over all its ranges (64 KiB of
/// [`IdPrefix`]es).
pub const MAX_HELD_IDS: usize = 4096;

/// The first 16 bytes of a [`MessageId`]: how a [`HeldRange`] names ids, at half the size.
///
/// Two different ids share a prefix by chance with probability 2^-128 per pair. Making a
/// message whose prefix equals another member's message takes about 2^128 hashes, so a
/// member cannot use it to keep someone else's message from a requester; two messages of its
/// own with one prefix (about 2^64 hashes) only hide its own messages, which it can withhold
/// anyway.
pub type IdPrefix = [u8; 16];

/// The [`IdPrefix`] of `id`.
pub fn id_prefix(id: &MessageId) -> IdPrefix {
    let mut p = [0u8; 16];
    p.copy_from_slice(&id.as_bytes()[..16]);
    p
}

/// Domain separator of [`app_set_digest`].
const APP_SET_DOMAIN: &[u8] = b"kith/sync/app-set/v1";

// ---------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------

/// Sent by a member to another member of the same group to fetch what it missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Version 1: a differing epoch is sent whole. Still answered for older nodes.
    V1(SyncRequestV1),
    /// Version 2: only the difference is sent (tag 01). Answered with [`SyncResponse::V2`].
    V2(SyncRequestV2),
}

/// Version 1 of [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequestV1 {
    /// The group to sync.
    pub group: GroupId,
    /// What the requester already holds. Send the same summary for every page of one sync.
    pub summary: Summary,
    /// Where to resume: `None` for the first page, else the `next` of the previous page.
    pub cursor: Option<Cursor>,
    /// Most envelope bytes the requester wants in one page; the responder also applies
    /// [`MAX_PAGE_BYTES`].
    pub max_bytes: u32,
    /// Signature by the requester's MLS leaf key over a fresh challenge; checked by the node
    /// (not by this module). At most [`MAX_PROOF_BYTES`].
    pub proof: Vec<u8>,
}

/// Version 2 of [`SyncRequest`]: a summary pass, then range passes for partial epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequestV2 {
    /// The group to sync.
    pub group: GroupId,
    /// What the requester asks for. Send the same value for every page of one pass.
    pub want: Want,
    /// Where to resume: `None` for the first page of a pass, else the previous page's `next`.
    pub cursor: Option<Cursor>,
    /// Most envelope bytes the requester wants in one page; the responder also applies
    /// [`MAX_PAGE_BYTES`].
    pub max_bytes: u32,
    /// As [`SyncRequestV1::proof`]. At most [`MAX_PROOF_BYTES`].
    pub proof: Vec<u8>,
}

/// The two passes of a version-2 sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// Summary pass: the commits the requester lacks, then the application messages of every
    /// differing epoch it holds none of. Differing epochs it holds some of are listed in the
    /// last page's [`SyncPageV2::partial`] and nothing of them is sent.
    Summary(Summary),
    /// Range pass: the application messages in these ranges that the requester does not hold.
    /// At most [`MAX_HELD_RANGES`] ranges and [`MAX_HELD_IDS`] held ids in all.
    Ranges(Vec<HeldRange>),
}

/// "Of the application messages of `epoch` whose [`IdPrefix`] is in `[start, end)`, I hold
/// exactly those with a prefix in `held`": the responder sends the others. Ranges split an
/// epoch's id space so that a large holding fits in several requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRange {
    /// The epoch.
    pub epoch: u64,
    /// Lowest prefix of the range (inclusive).
    pub start: IdPrefix,
    /// End of the range (exclusive); `None`: up to the highest possible prefix, inclusive.
    pub end: Option<IdPrefix>,
    /// The prefixes of the ids of this range the requester holds, strictly ascending, all
    /// inside the range.
    pub held: Vec<IdPrefix>,
}

/// A member's answer to a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// Version 1: one page of envelopes.
    V1(SyncPageV1),
    /// The request was refused; nothing was sent.
    Refused(SyncRefusal),
    /// Version 2: one page of envelopes (tag 02), the answer to [`SyncRequest::V2`].
    V2(SyncPageV2),
}

/// One page of a version-2 sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPageV2 {
    /// Encoded [`crate::envelope::Envelope`]s, each at most [`MAX_ENVELOPE_BYTES`].
    pub envelopes: Vec<Vec<u8>>,
    /// Cursor for the next page; `None` when this is the last page.
    pub next: Option<Cursor>,
    /// True exactly when `next` is `None`.
    pub complete: bool,
    /// Only on the last page of a [`Want::Summary`] pass (else empty): the epochs whose
    /// application messages differ and of which the requester holds some. None of their
    /// application messages were sent; ask for them with [`Want::Ranges`]. Strictly
    /// ascending, at most [`MAX_SUMMARY_EPOCHS`].
    pub partial: Vec<u64>,
}

/// One page of a sync: encoded envelopes, exactly as stored, in sync order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPageV1 {
    /// Encoded [`crate::envelope::Envelope`]s, each at most [`MAX_ENVELOPE_BYTES`].
    pub envelopes: Vec<Vec<u8>>,
    /// Cursor for the next page; `None` when this is the last page.
    pub next: Option<Cursor>,
    /// True exactly when `next` is `None`.
    pub complete: bool,
}

/// Why a sync request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SyncRefusal {
    /// The requester is not (proved to be) a member of the group.
    #[error("the requester is not a member of the group")]
    NotMember,
    /// The requester asked too often; try again later.
    #[error("too many sync requests; try again later")]
    RateLimited,
    /// The contacted node does not know this group.
    #[error("the contacted node does not know the group")]
    UnknownGroup,
    /// The request is invalid (bad summary or cursor).
    #[error("the sync request is invalid")]
    BadRequest,
    /// The responder could not answer right now for a reason of its own (e.g. its storage
    /// failed to read); the request may be fine. Ask another member, or this one later.
    /// Added after the first four refusals (tag 04): a node that predates it fails to decode
    /// this response and treats it like a failed request, which leads to the same retry.
    #[error("the contacted node cannot answer right now (internal failure)")]
    Unavailable,
}

/// What the requester holds: one entry per epoch it holds anything of, for epochs at or above
/// `floor`. The requester wants nothing from epochs below `floor` (they are older than the
/// [`MAX_SUMMARY_EPOCHS`] window, or before it joined and undecryptable for it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The lowest epoch the requester asks about.
    pub floor: u64,
    /// Per-epoch entries, strictly ascending by epoch, all `>= floor`, at most
    /// [`MAX_SUMMARY_EPOCHS`]. An epoch not listed is one the requester holds nothing of.
    pub epochs: Vec<EpochSummary>,
}

/// What the requester holds of one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: u64,
    /// The commit that left this epoch (envelope epoch = `epoch`), if held.
    pub commit: Option<MessageId>,
    /// How many distinct application messages of this epoch are held.
    pub app_count: u32,
    /// [`app_set_digest`] of their ids.
    pub app_hash: [u8; 32],
}

/// A position in the responder's sync order: everything at or before it has been sent.
/// Commits sort before application messages. The requester treats it as opaque and echoes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Cursor {
    /// After the commit `id` of epoch `epoch` (commits are ordered by `(epoch, id)`).
    AfterCommit {
        /// Envelope epoch of the last commit sent.
        epoch: u64,
        /// Its id.
        id: MessageId,
    },
    /// After the application message with this key.
    AfterApplication(HistoryKey),
}

/// The canonical history order of application messages: `(epoch, sent_at_ms, sender, id)`,
/// compared field by field (`sender` as bytes, lexicographically).
///
/// MLS generations are invisible without decrypting and are per sender, so the order uses what
/// every member who decrypted the message sees identically: the envelope epoch, the sender's
/// `AppContent::sent_at_ms`, the sender's PeerId bytes (authenticated by MLS), and the message
/// id as the final tie-break. All members therefore sort the same set identically, whatever
/// the arrival order. `sent_at_ms` is the sender's clock, so a member can misplace its own
/// messages, but only within their epoch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HistoryKey {
    /// MLS epoch of the envelope.
    pub epoch: u64,
    /// `AppContent::sent_at_ms`.
    pub sent_at_ms: u64,
    /// The sender's `PeerId::to_bytes()`, at most [`MAX_SENDER_BYTES`].
    pub sender: Vec<u8>,
    /// The envelope's id.
    pub id: MessageId,
}

/// The canonical history order key of an application message (see [`HistoryKey`]).
pub fn history_order_key(
    epoch: u64,
    sent_at_ms: u64,
    sender: &PeerId,
    id: MessageId,
) -> HistoryKey {
    HistoryKey {
        epoch,
        sent_at_ms,
        sender: sender.to_bytes(),
        id,
    }
}

/// A sync message failed to decode or breaks a bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The bytes are not a valid encoding.
    #[error("bad sync message: {0}")]
    Decode(#[from] DecodeError),
    /// The summary lists more than [`MAX_SUMMARY_EPOCHS`] epochs.
    #[error("summary lists {0} epochs, more than {MAX_SUMMARY_EPOCHS}")]
    TooManyEpochs(usize),
    /// Summary epochs are not strictly ascending, or one is below the floor.
    #[error("summary epochs are not strictly ascending from the floor")]
    UnorderedSummary,
    /// The proof is longer than [`MAX_PROOF_BYTES`].
    #[error("proof of {0} bytes exceeds {MAX_PROOF_BYTES}")]
    ProofTooLarge(usize),
    /// A cursor's sender is longer than [`MAX_SENDER_BYTES`].
    #[error("cursor sender of {0} bytes exceeds {MAX_SENDER_BYTES}")]
    SenderTooLong(usize),
    /// A page carries an envelope longer than [`MAX_ENVELOPE_BYTES`].
    #[error("page carries an envelope of {0} bytes, over {MAX_ENVELOPE_BYTES}")]
    EnvelopeTooLarge(usize),
    /// A page's `complete` flag disagrees with its `next` cursor.
    #[error("page is marked complete but has a next cursor, or the reverse")]
    InconsistentPage,
    /// A range request carries more than [`MAX_HELD_RANGES`] ranges.
    #[error("{0} held ranges, more than {MAX_HELD_RANGES}")]
    TooManyRanges(usize),
    /// A range request carries more than [`MAX_HELD_IDS`] held ids.
    #[error("{0} held ids, more than {MAX_HELD_IDS}")]
    TooManyHeldIds(usize),
    /// A range is empty (`end <= start`), or its held ids are not strictly ascending inside it.
    #[error("a held range is empty or its ids are unordered or outside it")]
    BadRange,
    /// A page's partial epochs are too many, not strictly ascending, or on a page that is
    /// not the last.
    #[error("a page's partial epochs are invalid")]
    BadPartial,
}

impl Summary {
    /// Checks the bounds a decoded summary must satisfy.
    pub fn validate(&self) -> Result<(), SyncError> {
        if self.epochs.len() > MAX_SUMMARY_EPOCHS {
            return Err(SyncError::TooManyEpochs(self.epochs.len()));
        }
        let mut prev: Option<u64> = None;
        for e in &self.epochs {
            if e.epoch < self.floor || prev.is_some_and(|p| e.epoch <= p) {
                return Err(SyncError::UnorderedSummary);
            }
            prev = Some(e.epoch);
        }
        Ok(())
    }

    /// Raises the floor to `floor` (e.g. the epoch this node joined at), dropping entries below.
    pub fn with_floor(mut self, floor: u64) -> Self {
        if floor > self.floor {
            self.floor = floor;
            self.epochs.retain(|e| e.epoch >= floor);
        }
        self
    }

    /// The entry for `epoch`, if the requester listed it.
    pub fn epoch(&self, epoch: u64) -> Option<&EpochSummary> {
        self.epochs
            .binary_search_by_key(&epoch, |e| e.epoch)
            .ok()
            .and_then(|i| self.epochs.get(i))
    }
}

impl Cursor {
    fn validate(&self) -> Result<(), SyncError> {
        match self {
            Cursor::AfterApplication(k) if k.sender.len() > MAX_SENDER_BYTES => {
                Err(SyncError::SenderTooLong(k.sender.len()))
            }
            _ => Ok(()),
        }
    }
}

impl HeldRange {
    /// True if the prefix `p` falls inside the range.
    pub fn contains(&self, p: &IdPrefix) -> bool {
        *p >= self.start && self.end.is_none_or(|end| *p < end)
    }

    /// True if the message `id` is inside the range and not named as held: it is wanted.
    pub fn wants(&self, id: &MessageId) -> bool {
        let p = id_prefix(id);
        self.contains(&p) && self.held.binary_search(&p).is_err()
    }

    fn validate(&self) -> Result<(), SyncError> {
        let nonempty = self.end.is_none_or(|end| self.start < end);
        let ordered = self.held.windows(2).all(|w| w[0] < w[1]);
        let inside = self.held.first().is_none_or(|f| self.contains(f))
            && self.held.last().is_none_or(|l| self.contains(l));
        if nonempty && ordered && inside {
            Ok(())
        } else {
            Err(SyncError::BadRange)
        }
    }
}

impl Want {
    fn validate(&self) -> Result<(), SyncError> {
        match self {
            Want::Summary(s) => s.validate(),
            Want::Ranges(ranges) => {
                if ranges.len() > MAX_HELD_RANGES {
                    return Err(SyncError::TooManyRanges(ranges.len()));
                }
                let ids: usize = ranges.iter().map(|r| r.held.len()).sum();
                if ids > MAX_HELD_IDS {
                    return Err(SyncError::TooManyHeldIds(ids));
                }
                ranges.iter().try_for_each(HeldRange::validate)
            }
        }
    }
}

impl SyncRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode(self)
    }

    /// Decodes and bound-checks a request from the network. Does not check `proof`.
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncError> {
        let req: SyncRequest = codec::decode(bytes, MAX_SYNC_REQUEST_BYTES)?;
        let (proof, cursor) = match &req {
            SyncRequest::V1(v) => {
                v.summary.validate()?;
                (&v.proof, &v.cursor)
            }
            SyncRequest::V2(v) => {
                v.want.validate()?;
                (&v.proof, &v.cursor)
            }
        };
        if proof.len() > MAX_PROOF_BYTES {
            return Err(SyncError::ProofTooLarge(proof.len()));
        }
        if let Some(c) = cursor {
            c.validate()?;
        }
        Ok(req)
    }

    /// The group the request is about.
    pub fn group(&self) -> &GroupId {
        match self {
            SyncRequest::V1(v) => &v.group,
            SyncRequest::V2(v) => &v.group,
        }
    }

    /// The requester's summary, if the request carries one (a range pass does not).
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            SyncRequest::V1(v) => Some(&v.summary),
            SyncRequest::V2(v) => match &v.want {
                Want::Summary(s) => Some(s),
                _ => None,
            },
        }
    }
}

fn validate_page(
    envelopes: &[Vec<u8>],
    next: Option<&Cursor>,
    complete: bool,
) -> Result<(), SyncError> {
    if let Some(e) = envelopes.iter().find(|e| e.len() > MAX_ENVELOPE_BYTES) {
        return Err(SyncError::EnvelopeTooLarge(e.len()));
    }
    if complete == next.is_some() {
        return Err(SyncError::InconsistentPage);
    }
    if let Some(c) = next {
        c.validate()?;
    }
    Ok(())
}

impl SyncResponse {
    /// Encodes the response.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode(self)
    }

    /// Decodes and bound-checks a response from the network. The envelopes themselves are
    /// checked later, one by one, by the group engine.
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncError> {
        let resp: SyncResponse = codec::decode(bytes, MAX_SYNC_RESPONSE_BYTES)?;
        match &resp {
            SyncResponse::V1(page) => {
                validate_page(&page.envelopes, page.next.as_ref(), page.complete)?;
            }
            SyncResponse::V2(page) => {
                validate_page(&page.envelopes, page.next.as_ref(), page.complete)?;
                let ordered = page.partial.windows(2).all(|w| w[0] < w[1]);
                if page.partial.len() > MAX_SUMMARY_EPOCHS
                    || !ordered
                    || (!page.complete && !page.partial.is_empty())
                {
                    return Err(SyncError::BadPartial);
                }
            }
            SyncResponse::Refused(_) => {}
        }
        Ok(resp)
    }
}

// ---------------------------------------------------------------------------------------------
// Summaries
// ---------------------------------------------------------------------------------------------

/// Order-independent digest of a set of application message ids:
/// `SHA-256("kith/sync/app-set/v1" ‖ id1 ‖ … ‖ idn)` over the distinct ids in ascending byte
/// order. (A plain XOR of ids would be cheaper but lets a member craft colliding sets.)
pub fn app_set_digest<'a>(ids: impl IntoIterator<Item = &'a MessageId>) -> [u8; 32] {
    let sorted: BTreeSet<&MessageId> = ids.into_iter().collect();
    let mut h = Sha256::new();
    h.update(APP_SET_DOMAIN);
    for id in sorted {
        h.update(id.as_bytes());
    }
    h.finalize().into()
}

/// Per-epoch contents, used for both sides.
#[derive(Default)]
struct EpochSets {
    commits: BTreeSet<MessageId>,
    apps: BTreeSet<MessageId>,
}

fn group_by_epoch<'a>(
    envelopes: impl Iterator<Item = &'a StoredEnvelope>,
) -> BTreeMap<u64, EpochSets> {
    let mut by_epoch: BTreeMap<u64, EpochSets> = BTreeMap::new();
    for env in envelopes {
        match env.kind {
            PayloadKind::Commit => {
                by_epoch
                    .entry(env.epoch)
                    .or_default()
                    .commits
                    .insert(env.id);
            }
            PayloadKind::Application => {
                by_epoch.entry(env.epoch).or_default().apps.insert(env.id);
            }
            PayloadKind::Proposal => {}
        }
    }
    by_epoch
}

/// Summarises the envelopes a node holds for one group (proposals are ignored; duplicates
/// count once). Only the newest [`MAX_SUMMARY_EPOCHS`] epochs are listed; if there are more,
/// the floor is raised to the oldest one listed. Use [`Summary::with_floor`] to exclude
/// epochs from before this node joined.
pub fn summarize<'a>(envelopes: impl Iterator<Item = &'a StoredEnvelope>) -> Summary {
    Holdings::new(envelopes).summary()
}

/// What a requester holds of one group, kept for a whole sync run: it gives the
/// [`Summary`] of the first pass and the [`HeldRange`]s of the partial epochs.
#[derive(Default)]
pub struct Holdings {
    by_epoch: BTreeMap<u64, EpochSets>,
}

impl std::fmt::Debug for Holdings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holdings")
            .field("epochs", &self.by_epoch.len())
            .finish()
    }
}

impl Holdings {
    /// Indexes the envelopes a node holds for one group (proposals are ignored; duplicates
    /// count once).
    pub fn new<'a>(envelopes: impl Iterator<Item = &'a StoredEnvelope>) -> Self {
        Self {
            by_epoch: group_by_epoch(envelopes),
        }
    }

    /// The summary of these holdings; see [`summarize`].
    pub fn summary(&self) -> Summary {
        let skip = self.by_epoch.len().saturating_sub(MAX_SUMMARY_EPOCHS);
        let epochs: Vec<EpochSummary> = self
            .by_epoch
            .iter()
            .skip(skip)
            .map(|(&epoch, sets)| EpochSummary {
                epoch,
                // Normally one commit per epoch; with several (a fork seen), list the lowest
                // id: the responder sends any other commit it has.
                commit: sets.commits.first().copied(),
                app_count: u32::try_from(sets.apps.len()).unwrap_or(u32::MAX),
                app_hash: app_set_digest(&sets.apps),
            })
            .collect();
        let floor = if skip > 0 {
            epochs.first().map_or(0, |e| e.epoch)
        } else {
            0
        };
        Summary { floor, epochs }
    }

    /// The range requests for the `partial` epochs a summary pass reported: each inner
    /// `Vec` is the [`Want::Ranges`] of one pass and fits its bounds ([`MAX_HELD_RANGES`],
    /// [`MAX_HELD_IDS`]). An epoch's held ids are cut into chunks of at most
    /// [`MAX_HELD_IDS`]; each chunk covers the id space from its first id up to the next
    /// chunk's first id, so the ranges of one epoch cover all ids exactly once. Costs 32 bytes
    /// per held application message of a partial epoch, whatever the responder holds.
    pub fn refinement(&self, partial: &[u64]) -> Vec<Vec<HeldRange>> {
        let mut passes: Vec<Vec<HeldRange>> = Vec::new();
        let mut current: Vec<HeldRange> = Vec::new();
        let mut ids_in_current = 0usize;
        let epochs: BTreeSet<u64> = partial.iter().copied().collect();
        for epoch in epochs {
            // Ascending ids give ascending prefixes; equal prefixes count once.
            let mut held: Vec<IdPrefix> = self
                .by_epoch
                .get(&epoch)
                .map(|s| s.apps.iter().map(id_prefix).collect())
                .unwrap_or_default();
            held.dedup();
            let chunks: Vec<&[IdPrefix]> = if held.is_empty() {
                vec![&[]]
            } else {
                held.chunks(MAX_HELD_IDS).collect()
            };
            for (i, chunk) in chunks.iter().enumerate() {
                let start = if i == 0 {
                    [0; 16]
                } else {
                    chunk.first().copied().unwrap_or([0; 16])
                };
                let end = chunks.get(i + 1).and_then(|c| c.first()).copied();
                if current.len() >= MAX_HELD_RANGES || ids_in_current + chunk.len() > MAX_HELD_IDS {
                    passes.push(std::mem::take(&mut current));
                    ids_in_current = 0;
                }
                ids_in_current += chunk.len();
                current.push(HeldRange {
                    epoch,
                    start,
                    end,
                    held: chunk.to_vec(),
                });
            }
        }
        if !current.is_empty() {
            passes.push(current);
        }
        passes
    }
}

// ---------------------------------------------------------------------------------------------
// Response planning
// ---------------------------------------------------------------------------------------------

/// One envelope the responder may serve, with its place in the sync order.
#[derive(Debug, Clone)]
pub struct SyncItem<'a> {
    /// The stored envelope.
    pub envelope: &'a StoredEnvelope,
    /// Its position: [`Cursor::AfterCommit`] for commits, [`Cursor::AfterApplication`] with the
    /// message's [`HistoryKey`] for application messages.
    pub position: Cursor,
}

impl<'a> SyncItem<'a> {
    /// A commit envelope.
    pub fn commit(envelope: &'a StoredEnvelope) -> Self {
        Self {
            position: Cursor::AfterCommit {
                epoch: envelope.epoch,
                id: envelope.id,
            },
            envelope,
        }
    }

    /// An application envelope with its decrypted `sent_at_ms` and authenticated sender
    /// (from the node's history entry with the same id).
    pub fn application(envelope: &'a StoredEnvelope, sent_at_ms: u64, sender: &PeerId) -> Self {
        Self {
            position: Cursor::AfterApplication(history_order_key(
                envelope.epoch,
                sent_at_ms,
                sender,
                envelope.id,
            )),
            envelope,
        }
    }

    /// An application envelope that made no history row (the invite states a member sends
    /// after adding someone, a re-send request): placed by when `responder` received it, so
    /// its pages still walk in one stable order. Without it, a new member who subscribed
    /// after such a message was published could never fetch it.
    pub fn unrecorded(envelope: &'a StoredEnvelope, responder: &PeerId) -> Self {
        Self::application(envelope, envelope.received_at_ms, responder)
    }
}

/// One page planned by [`plan_response`], [`plan_summary_page`] or [`plan_ranges_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Encoded envelopes to send, in sync order.
    pub envelopes: Vec<Vec<u8>>,
    /// Where the next page starts; `None` when nothing is left.
    pub next: Option<Cursor>,
    /// Partial epochs (see [`SyncPageV2::partial`]); only on the last page of a version-2
    /// summary pass, else empty.
    pub partial: Vec<u64>,
}

impl Page {
    /// Total envelope bytes of the page as counted against the budget (lengths plus prefixes).
    pub fn counted_bytes(&self) -> u64 {
        self.envelopes.iter().map(|e| counted_len(e.len())).sum()
    }

    /// The version-1 wire response for this page (`partial` is dropped: version 1 has none).
    pub fn into_response(self) -> SyncResponse {
        SyncResponse::V1(SyncPageV1 {
            complete: self.next.is_none(),
            envelopes: self.envelopes,
            next: self.next,
        })
    }

    /// The version-2 wire response for this page.
    pub fn into_response_v2(self) -> SyncResponse {
        SyncResponse::V2(SyncPageV2 {
            complete: self.next.is_none(),
            envelopes: self.envelopes,
            next: self.next,
            partial: self.partial,
        })
    }
}

/// What the decoder's limit charges per envelope of a page on top of its bytes: the codec
/// counts the memory a decoded `Vec<Vec<u8>>` claims, `size_of::<Vec<u8>>()` per item (24 on
/// 64-bit targets; 32 leaves room for any target).
pub const PAGE_ITEM_ALLOWANCE: u64 = 32;

/// What one envelope of `len` bytes costs against a page's budget: [`counted_len`] plus
/// [`PAGE_ITEM_ALLOWANCE`], so a full page of many envelopes still decodes within
/// [`MAX_SYNC_RESPONSE_BYTES`].
pub fn page_cost(len: usize) -> u64 {
    counted_len(len) + PAGE_ITEM_ALLOWANCE
}

/// Bytes an envelope of `len` bytes takes in a page: itself plus its varint length prefix.
pub fn counted_len(len: usize) -> u64 {
    let prefix = match len {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    };
    len as u64 + prefix
}

/// Whether an item can be served at all: at or above `floor`, not oversized, and a commit or
/// application message whose position matches its kind.
fn usable(floor: u64) -> impl Fn(&&SyncItem<'_>) -> bool {
    move |it| {
        it.envelope.epoch >= floor
            && it.envelope.bytes.len() <= MAX_ENVELOPE_BYTES
            && matches!(
                (&it.position, it.envelope.kind),
                (Cursor::AfterCommit { .. }, PayloadKind::Commit)
                    | (Cursor::AfterApplication(_), PayloadKind::Application)
            )
    }
}

/// How the responder's application messages of each epoch compare with the summary.
struct EpochPlan {
    /// Differing epochs the requester holds no application message of.
    whole: BTreeSet<u64>,
    /// Differing epochs the requester holds some application messages of.
    partial: Vec<u64>,
}

fn compare_epochs(summary: &Summary, local: &[SyncItem<'_>]) -> EpochPlan {
    let ours = group_by_epoch(
        local
            .iter()
            .filter(usable(summary.floor))
            .map(|it| it.envelope),
    );
    let mut plan = EpochPlan {
        whole: BTreeSet::new(),
        partial: Vec::new(),
    };
    for (&epoch, mine) in &ours {
        if mine.apps.is_empty() {
            continue;
        }
        match summary.epoch(epoch) {
            None => {
                plan.whole.insert(epoch);
            }
            Some(theirs) if theirs.app_count == 0 => {
                plan.whole.insert(epoch);
            }
            Some(theirs) => {
                if u32::try_from(mine.apps.len()).unwrap_or(u32::MAX) != theirs.app_count
                    || app_set_digest(&mine.apps) != theirs.app_hash
                {
                    plan.partial.push(epoch);
                }
            }
        }
    }
    plan
}

/// The commits of epochs `>= summary.floor` the requester's summary does not name.
fn missing_commit(summary: &Summary, it: &SyncItem<'_>) -> bool {
    it.envelope.kind == PayloadKind::Commit
        && summary.epoch(it.envelope.epoch).and_then(|e| e.commit) != Some(it.envelope.id)
}

/// Sorts `wanted` into sync order, drops duplicates and items at or before `cursor`, and
/// fills one page within `budget` (the first item always goes in).
fn paginate(mut wanted: Vec<&SyncItem<'_>>, cursor: Option<&Cursor>, budget: u64) -> Page {
    wanted.retain(|it| cursor.is_none_or(|c| it.position.cmp(c) == Ordering::Greater));
    wanted.sort_by(|a, b| a.position.cmp(&b.position));
    wanted.dedup_by(|a, b| a.envelope.id == b.envelope.id);
    let mut page = Page {
        envelopes: Vec::new(),
        next: None,
        partial: Vec::new(),
    };
    let mut used = 0u64;
    let mut last: Option<&Cursor> = None;
    for (i, it) in wanted.iter().enumerate() {
        let cost = page_cost(it.envelope.bytes.len());
        if i > 0 && used + cost > budget {
            page.next = last.cloned();
            return page;
        }
        used += cost;
        page.envelopes.push(it.envelope.bytes.clone());
        last = Some(&it.position);
    }
    page
}

/// Plans one page of the version-1 answer to a requester holding `summary`.
///
/// `local` is everything the responder holds for the group, in any order (items of other
/// kinds than commit/application, envelopes over [`MAX_ENVELOPE_BYTES`] and duplicates are
/// skipped). The answer is, in this order:
/// 1. every commit of an epoch `>= summary.floor` whose id the requester's entry for that
///    epoch does not name, by `(epoch, id)`;
/// 2. all application messages of every epoch `>= summary.floor` whose `(app_count,
///    app_hash)` differs from the requester's (or that the requester does not list), in
///    [`HistoryKey`] order. A digest cannot tell which ids are missing, so a mismatching
///    epoch is sent whole; the requester drops duplicates by id. (Version 2,
///    [`plan_summary_page`] and [`plan_ranges_page`], sends only the missing ones.)
///
/// Only items after `cursor` are considered. Items are added while their costs
/// ([`page_cost`]: encoded length plus a per-item decoding allowance) fit in
/// `min(max_bytes, MAX_PAGE_BYTES)`; the first item of a page is
/// always added, so one envelope larger than the budget is sent alone and every page makes
/// progress. The same inputs always give the same page.
pub fn plan_response(
    summary: &Summary,
    local: &[SyncItem<'_>],
    cursor: Option<&Cursor>,
    max_bytes: u32,
) -> Page {
    let budget = u64::from(max_bytes.min(MAX_PAGE_BYTES));
    let plan = compare_epochs(summary, local);
    let wanted: Vec<&SyncItem<'_>> = local
        .iter()
        .filter(usable(summary.floor))
        .filter(|it| match it.envelope.kind {
            PayloadKind::Commit => missing_commit(summary, it),
            _ => {
                plan.whole.contains(&it.envelope.epoch)
                    || plan.partial.binary_search(&it.envelope.epoch).is_ok()
            }
        })
        .collect();
    paginate(wanted, cursor, budget)
}

/// Bytes reserved in a version-2 page for a `partial` list of `n` epochs: each epoch is a
/// varint of at most 9 bytes and the decoder charges 8 bytes of memory for it, plus the
/// list's length prefix and the page's extra fields.
fn partial_reserve(n: usize) -> u64 {
    n as u64 * 17 + 16
}

/// Plans one page of a version-2 [`Want::Summary`] pass: the commits the requester lacks (as
/// in [`plan_response`]), then the application messages of the differing epochs the
/// requester lists with `app_count == 0` or not at all, in [`HistoryKey`] order. Differing
/// epochs of which the requester holds some are not sent: the last page lists them in
/// `partial`. The page budget is reduced by the room that list takes
/// (17 bytes per epoch), on every page of the pass, so the last page fits too.
pub fn plan_summary_page(
    summary: &Summary,
    local: &[SyncItem<'_>],
    cursor: Option<&Cursor>,
    max_bytes: u32,
) -> Page {
    let plan = compare_epochs(summary, local);
    let budget = u64::from(max_bytes.min(MAX_PAGE_BYTES))
        .saturating_sub(partial_reserve(plan.partial.len()));
    let wanted: Vec<&SyncItem<'_>> = local
        .iter()
        .filter(usable(summary.floor))
        .filter(|it| match it.envelope.kind {
            PayloadKind::Commit => missing_commit(summary, it),
            _ => plan.whole.contains(&it.envelope.epoch),
        })
        .collect();
    let mut page = paginate(wanted, cursor, budget);
    if page.next.is_none() {
        page.partial = plan.partial;
    }
    page
}

/// Plans one page of a version-2 [`Want::Ranges`] pass: the application messages inside
/// `ranges` whose ids the ranges do not list as held, in [`HistoryKey`] order. Nothing the
/// requester named is sent, and nothing else (no commits, no other epochs).
pub fn plan_ranges_page(
    ranges: &[HeldRange],
    local: &[SyncItem<'_>],
    cursor: Option<&Cursor>,
    max_bytes: u32,
) -> Page {
    let budget = u64::from(max_bytes.min(MAX_PAGE_BYTES));
    let mut by_epoch: BTreeMap<u64, Vec<&HeldRange>> = BTreeMap::new();
    for r in ranges {
        by_epoch.entry(r.epoch).or_default().push(r);
    }
    let wanted: Vec<&SyncItem<'_>> = local
        .iter()
        .filter(usable(0))
        .filter(|it| it.envelope.kind == PayloadKind::Application)
        .filter(|it| {
            let id = &it.envelope.id;
            by_epoch
                .get(&it.envelope.epoch)
                .is_some_and(|rs| rs.iter().any(|r| r.wants(id)))
        })
        .collect();
    paginate(wanted, cursor, budget)
}

/// Plans the answer to a decoded request: a version-1 page for [`SyncRequest::V1`], a
/// version-2 page for [`SyncRequest::V2`]. Returns it with its counted envelope bytes (for
/// the responder's rate limit). See [`plan_response`], [`plan_summary_page`] and
/// [`plan_ranges_page`].
pub fn respond(request: &SyncRequest, local: &[SyncItem<'_>]) -> (SyncResponse, u64) {
    match request {
        SyncRequest::V1(r) => {
            let page = plan_response(&r.summary, local, r.cursor.as_ref(), r.max_bytes);
            let bytes = page.counted_bytes();
            (page.into_response(), bytes)
        }
        SyncRequest::V2(r) => {
            let page = match &r.want {
                Want::Summary(s) => plan_summary_page(s, local, r.cursor.as_ref(), r.max_bytes),
                Want::Ranges(ranges) => {
                    plan_ranges_page(ranges, local, r.cursor.as_ref(), r.max_bytes)
                }
            };
            let bytes = page.counted_bytes();
            (page.into_response_v2(), bytes)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gap detection
// ---------------------------------------------------------------------------------------------

/// Commits known to be missing: those whose envelope epoch is in `first..=last` (the commit of
/// epoch `e` moves the group to `e + 1`), so the group can advance to `last + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingCommits {
    /// Envelope epoch of the first missing commit (this node's current epoch).
    pub first: u64,
    /// Envelope epoch of the last missing commit.
    pub last: u64,
}

/// Per-group gap detector for normal operation. State is two numbers, so it is bounded.
///
/// Envelope epochs are unauthenticated until decrypted, so a signal is only a hint: the node
/// should answer it with a rate-limited [`SyncRequest`], not trust it further.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gaps {
    /// Highest epoch already signalled as reachable (`last + 1` of the last signal).
    signalled_up_to: Option<u64>,
}

impl Gaps {
    /// A detector with nothing signalled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that an envelope of `seen_epoch` arrived while this node is at `current_epoch`.
    /// Returns the missing commits if the envelope is ahead and the gap reaches further than
    /// anything signalled before; `None` otherwise (no gap, or already signalled).
    pub fn observe(&mut self, seen_epoch: u64, current_epoch: u64) -> Option<MissingCommits> {
        if let Some(s) = self.signalled_up_to
            && s <= current_epoch
        {
            // The earlier gap has been filled.
            self.signalled_up_to = None;
        }
        if seen_epoch <= current_epoch {
            return None;
        }
        if self.signalled_up_to.is_some_and(|s| seen_epoch <= s) {
            return None;
        }
        self.signalled_up_to = Some(seen_epoch);
        Some(MissingCommits {
            first: current_epoch,
            last: seen_epoch - 1,
        })
    }

    /// Forgets what was signalled, so the next gap is signalled again (e.g. after a sync
    /// failed and should be retried).
    pub fn reset(&mut self) {
        self.signalled_up_to = None;
    }
}
