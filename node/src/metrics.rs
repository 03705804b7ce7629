//! Prometheus/OpenMetrics metrics: one registry per node, served on `GET /metrics`.
//!
//! Off by default; `kith run --metrics IP:PORT` (or `metrics_listen`) turns the endpoint on.
//! The registry is filled in one place, at start ([`crate::node::start`]):
//!
//! - `kith_*`: Kith's own metrics, [`KithMetrics`], shared by `Arc` with the engine and the API;
//! - `libp2p_*`: libp2p's swarm, identify, kad, ping and gossipsub event metrics and the
//!   transport's bandwidth, recorded by the network task;
//! - `gossipsub_*`: gossipsub's internal metrics, among them per-topic received message
//!   counts with duplicates (`gossipsub_topic_msg_recv_counts_unfiltered_total`) and without
//!   (`gossipsub_topic_msg_recv_counts_total`).
//!
//! Updating a metric never blocks on IO and never fails. The engine thread only touches
//! atomics: counters with a fixed set of label values are created up front, and a group's
//! gauges are created once and then cached by the engine.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kith_protocol::group::{IgnoreReason, RejectReason, Verdict};
use kith_protocol::ids::GroupId;
use kith_protocol::order::Undecryptable;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::store::FailureReason;

/// The `Content-Type` of `GET /metrics`: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The path the metrics are served on.
pub const METRICS_PATH: &str = "/metrics";

/// Why an MLS message could not be decrypted (label `reason` of
/// `kith_decrypt_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecryptFailure {
    /// From a past epoch whose keys are gone (the envelope is ignored).
    PastEpoch,
    /// MLS could not decrypt or verify it (the envelope is rejected).
    Invalid,
}

impl DecryptFailure {
    /// Every reason, in label order.
    pub const ALL: [DecryptFailure; 2] = [DecryptFailure::PastEpoch, DecryptFailure::Invalid];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DecryptFailure::PastEpoch => "past_epoch",
            DecryptFailure::Invalid => "invalid",
        }
    }
}

/// Whether a verdict means an MLS message could not be decrypted, and why.
pub fn decrypt_failure(verdict: &Verdict) -> Option<DecryptFailure> {
    match verdict {
        Verdict::Reject(RejectReason::Mls(_)) => Some(DecryptFailure::Invalid),
        Verdict::Ignore(IgnoreReason::PastEpoch(_)) => Some(DecryptFailure::PastEpoch),
        _ => None,
    }
}

/// The result of this node's own attempt to join a group by invite (label `result` of
/// `kith_joins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinResult {
    /// Joined.
    Joined,
    /// The member refused the request (used up, expired, revoked, …).
    Refused,
    /// No member could be reached.
    Unreachable,
    /// The link is damaged, expired or for another network.
    BadInvite,
    /// Anything else (already a member, storage, MLS).
    Error,
}

impl JoinResult {
    /// Every result, in label order.
    pub const ALL: [JoinResult; 5] = [
        JoinResult::Joined,
        JoinResult::Refused,
        JoinResult::Unreachable,
        JoinResult::BadInvite,
        JoinResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinResult::Joined => "joined",
            JoinResult::Refused => "refused",
            JoinResult::Unreachable => "unreachable",
            JoinResult::BadInvite => "bad_invite",
            JoinResult::Error => "error",
        }
    }
}

/// How this node answered another peer's join request (label `result` of
/// `kith_join_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinRequestResult {
    /// The peer was added and got a Welcome.
    Accepted,
    /// The request was refused for a reason the peer is told.
    Refused,
    /// This node failed to process it.
    Error,
}

impl JoinRequestResult {
    /// Every result, in label order.
    pub const ALL: [JoinRequestResult; 3] = [
        JoinRequestResult::Accepted,
        JoinRequestResult::Refused,
        JoinRequestResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRequestResult::Accepted => "accepted",
            JoinRequestResult::Refused => "refused",
            JoinRequestResult::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Something a peer did that made this node cut or limit it (label `fault` of
/// `kith_peer_faults_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerFault {
    /// Its gossip stream broke on this node (an oversized or undecodable frame), so the
    /// connection was closed for it to start over.
    GossipStreamBroken,
    /// It sent gossip faster than the per-peer rate: graylisted for a while.
    GossipFlood,
    /// It sent join requests faster than the per-peer rate: answered "busy".
    JoinFlood,
    /// A connection was refused: too many from its IP, or with that peer.
    TooManyConnections,
    /// A DHT provider record was refused: the peer's share of the store is full.
    DhtFull,
    /// A connection of a banned peer was refused (its gossip stream broke three times
    /// within ten minutes).
    Banned,
}

impl PeerFault {
    /// Every fault, in label order.
    pub const ALL: [PeerFault; 6] = [
        PeerFault::GossipStreamBroken,
        PeerFault::GossipFlood,
        PeerFault::JoinFlood,
        PeerFault::TooManyConnections,
        PeerFault::DhtFull,
        PeerFault::Banned,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerFault::GossipStreamBroken => "gossip_stream_broken",
            PeerFault::GossipFlood => "gossip_flood",
            PeerFault::JoinFlood => "join_flood",
            PeerFault::TooManyConnections => "too_many_connections",
            PeerFault::DhtFull => "dht_full",
            PeerFault::Banned => "banned",
        }
    }
}

/// The network task's counts of [`PeerFault`]s, and how many connected peers gossipsub
/// graylists now. Cloned handles share the values.
#[derive(Debug, Clone, Default)]
pub struct PeerFaults {
    counts: [Counter; PeerFault::ALL.len()],
    graylisted: Gauge,
}

impl PeerFaults {
    /// Counts one `fault`.
    pub fn inc(&self, fault: PeerFault) {
        self.counts[fault as usize].inc();
    }

    /// How many of `fault` were counted.
    pub fn get(&self, fault: PeerFault) -> u64 {
        self.counts[fault as usize].get()
    }

    /// Sets the number of connected peers whose score is below the graylist threshold.
    pub fn set_graylisted(&self, n: usize) {
        self.graylisted.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabel {
    fault: &'static str,
}

/// Bytes of one request-response protocol's frames (the 4-byte length prefix plus the
/// encoded message; not yamux, Noise or TCP overhead), by direction. Cloned handles share
/// the counts; the network task's codec updates them.
#[derive(Debug, Clone, Default)]
pub struct FrameBytes {
    /// Requests this node sent.
    pub request_sent: Counter,
    /// Responses this node received.
    pub response_received: Counter,
    /// Requests this node received.
    pub request_received: Counter,
    /// Responses this node sent.
    pub response_sent: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    method: &'static str,
    endpoint: String,
    status: u16,
}

/// Upper bounds (seconds) of `kith_store_commit_seconds`: redb commits with fsync.
const COMMIT_BUCKETS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A histogram of durations updated with atomics only (prometheus-client's own histogram
/// takes a lock per observation). A scrape may see the sum one observation behind the
/// buckets; the count is always the buckets' total.
#[derive(Debug, Default)]
struct AtomicHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = COMMIT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(COMMIT_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let buckets: Vec<(f64, u64)> = COMMIT_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The gauges of one group, to be cached by their user (creating them takes a lock).
#[derive(Debug, Clone, Default)]
pub struct GroupGauges {
    /// `kith_group_epoch{group}`.
    pub epoch: Gauge,
    /// `kith_group_members{group}`.
    pub members: Gauge,
}

impl GroupGauges {
    /// Sets both gauges.
    pub fn set(&self, epoch: u64, members: usize) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.members.set(i64::try_from(members).unwrap_or(i64::MAX));
    }
}

/// Kith's own metrics (prefix `kith_`). Cheap to update from any thread; cloned handles
/// share the same values.
#[derive(Debug)]
pub struct KithMetrics {
    messages_sent: Counter,
    messages_received: Counter,
    rollbacks: Counter,
    undecryptable: [Counter; Undecryptable::ALL.len()],
    recovered: Counter,
    past_epochs_expired: Counter,
    deep_forks: Counter,
    forks_detected: Counter,
    rejected: [Counter; RejectReason::LABELS.len()],
    ignored: [Counter; IgnoreReason::LABELS.len()],
    decrypt_failures: [Counter; DecryptFailure::ALL.len()],
    group_epoch: Family<GroupLabel, Gauge>,
    group_members: Family<GroupLabel, Gauge>,
    store_commit: Arc<AtomicHistogram>,
    api_requests: Family<ApiLabel, Counter>,
    joins: [Counter; JoinResult::ALL.len()],
    join_requests: [Counter; JoinRequestResult::ALL.len()],
    invites_created: Counter,
    sync_bytes: FrameBytes,
    file_bytes: FrameBytes,
    peer_faults: PeerFaults,
    files: FileCounters,
    store_write_failures: [Counter; FailureReason::ALL.len()],
    store_failing: Gauge,
    engine_cpu: [Counter<f64, AtomicU64>; CpuPart::ALL.len()],
}

/// A part of the engine thread's work whose CPU time is counted
/// (`kith_engine_cpu_seconds_total{part}`): the rest of the thread's time is the engine's
/// own bookkeeping, and the other threads are the network (`kith-net`) and the async
/// runtime (API, event streams, timers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuPart {
    /// The group engine on received envelopes and own sends: openmls (decryption,
    /// signatures, its storage records, staged in memory) and Kith's group rules.
    Mls,
    /// The redb store: transactions, their commits and flushes.
    Store,
}

impl CpuPart {
    /// Every part, in label order.
    pub const ALL: [CpuPart; 2] = [CpuPart::Mls, CpuPart::Store];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuPart::Mls => "mls",
            CpuPart::Store => "store",
        }
    }
}

/// Runs `f`, adding the CPU time the calling thread spent in it to `part`.
pub fn timed<T>(metrics: &KithMetrics, part: CpuPart, f: impl FnOnce() -> T) -> T {
    let started = cpu_time::ThreadTime::try_now().ok();
    let out = f();
    if let Some(t) = started.and_then(|t| t.try_elapsed().ok()) {
        metrics.engine_cpu[part as usize].inc_by(t.as_secs_f64());
    }
    out
}

/// What the node's file transfer counts (`kith_file_*`).
#[derive(Debug, Clone, Default)]
pub struct FileCounters {
    /// Files this node sent.
    pub sent: Counter,
    /// Chunks fetched from other members that checked.
    pub chunks_fetched: Counter,
    /// Chunks served to other members.
    pub chunks_served: Counter,
    /// Answers from holders that did not check (the holder was dropped for that file).
    pub bad_answers: Counter,
    /// File requests refused (not a member, unknown file, rate limit).
    pub refused: Counter,
    /// Downloads that completed.
    pub completed: Counter,
    /// Bytes the file store holds or has reserved.
    pub store_bytes: Gauge,
}

impl FileCounters {
    fn register(r: &mut Registry) -> FileCounters {
        let f = FileCounters::default();
        r.register("files_sent", "Files this node sent", f.sent.clone());
        r.register(
            "file_chunks_fetched",
            "File chunks fetched from other members that checked against their manifest",
            f.chunks_fetched.clone(),
        );
        r.register(
            "file_chunks_served",
            "File chunks served to other members",
            f.chunks_served.clone(),
        );
        r.register(
            "file_bad_answers",
            "Answers of file holders that did not check (that holder is dropped for the file)",
            f.bad_answers.clone(),
        );
        r.register(
            "file_requests_refused",
            "File requests refused: not a member, file not posted in that group, or rate limit",
            f.refused.clone(),
        );
        r.register(
            "file_downloads_completed",
            "File downloads that completed",
            f.completed.clone(),
        );
        r.register(
            "file_store_bytes",
            "Bytes the file store holds or has reserved for downloads",
            f.store_bytes.clone(),
        );
        f
    }
}

/// Registers the frame byte counters of one request-response protocol, by direction.
fn frame_bytes(registry: &mut Registry, name: &str, help: &str) -> FrameBytes {
    let [
        request_sent,
        response_received,
        request_received,
        response_sent,
    ] = counters(
        registry,
        name,
        help,
        [
            "request_sent",
            "response_received",
            "request_received",
            "response_sent",
        ]
        .map(|direction| DirectionLabel { direction }),
    );
    FrameBytes {
        request_sent,
        response_received,
        request_received,
        response_sent,
    }
}

/// Registers a counter family with one child per label value and returns the children.
fn counters<L, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    labels: [L; N],
) -> [Counter; N]
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    registry.register(name, help, family.clone());
    labels.map(|l| family.get_or_create_owned(&l))
}

impl KithMetrics {
    /// Creates Kith's metrics and registers them in `registry` under the prefix `kith`.
    pub fn register(registry: &mut Registry) -> KithMetrics {
        let r = registry.sub_registry_with_prefix("kith");
        let cpu_family = Family::<PartLabel, Counter<f64, AtomicU64>>::default();
        r.register_with_unit(
            "engine_cpu",
            "CPU time of the engine thread in the group engine (mls) and in the store (store)",
            Unit::Seconds,
            cpu_family.clone(),
        );
        let engine_cpu =
            CpuPart::ALL.map(|p| cpu_family.get_or_create_owned(&PartLabel { part: p.as_str() }));
        let messages_sent = Counter::default();
        r.register(
            "messages_sent",
            "Text messages this node sent",
            messages_sent.clone(),
        );
        let messages_received = Counter::default();
        r.register(
            "messages_received",
            "Text messages received from the network, decrypted and stored",
            messages_received.clone(),
        );
        let undecryptable = counters(
            r,
            "undecryptable",
            "Messages of a group this node holds but can never decrypt, by reason",
            Undecryptable::ALL.map(|x| ReasonLabel { reason: x.label() }),
        );
        let recovered = Counter::default();
        r.register(
            "undecryptable_recovered",
            "Messages this node could not decrypt whose sender sent them again on its request",
            recovered.clone(),
        );
        let past_epochs_expired = Counter::default();
        r.register(
            "past_epochs_expired",
            "Past epochs whose secrets this node deleted, a bounded time after it left them",
            past_epochs_expired.clone(),
        );
        let rollbacks = Counter::default();
        r.register(
            "group_rollbacks",
            "Times a group left a losing branch for a concurrent commit with a lower id",
            rollbacks.clone(),
        );
        let deep_forks = Counter::default();
        r.register(
            "group_deep_forks",
            "Times a group's branch lost a fork deeper than the rewind depth (the node asks to be added again)",
            deep_forks.clone(),
        );
        let forks_detected = Counter::default();
        r.register(
            "group_forks_detected",
            "History sync summaries from members on another branch of a group",
            forks_detected.clone(),
        );
        let rejected = counters(
            r,
            "envelopes_rejected",
            "Gossip envelopes rejected as invalid, by reason",
            RejectReason::LABELS.map(|reason| ReasonLabel { reason }),
        );
        let ignored = counters(
            r,
            "envelopes_ignored",
            "Gossip envelopes ignored (not judged), by reason",
            IgnoreReason::LABELS.map(|reason| ReasonLabel { reason }),
        );
        let decrypt_failures = counters(
            r,
            "decrypt_failures",
            "MLS messages that could not be decrypted, by reason",
            DecryptFailure::ALL.map(|x| ReasonLabel { reason: x.as_str() }),
        );
        let group_epoch = Family::<GroupLabel, Gauge>::default();
        r.register(
            "group_epoch",
            "Current MLS epoch per group (label: short group id)",
            group_epoch.clone(),
        );
        let group_members = Family::<GroupLabel, Gauge>::default();
        r.register(
            "group_members",
            "Current member count per group (label: short group id)",
            group_members.clone(),
        );
        let store_commit = Arc::new(AtomicHistogram::default());
        r.register_with_unit(
            "store_commit",
            "Duration of store write transactions (commit with fsync)",
            Unit::Seconds,
            ArcMetric(store_commit.clone()),
        );
        let api_requests = Family::<ApiLabel, Counter>::default();
        r.register(
            "api_requests",
            "Local API requests by method, matched route and HTTP status",
            api_requests.clone(),
        );
        let joins = counters(
            r,
            "joins",
            "This node's attempts to join a group by invite, by result",
            JoinResult::ALL.map(|x| ResultLabel { result: x.as_str() }),
        );
        let join_requests = counters(
            r,
            "join_requests",
            "Join requests from other peers answered by this node, by result",
            JoinRequestResult::ALL.map(|x| ResultLabel { result: x.as_str() }),
        );
        let invites_created = Counter::default();
        r.register(
            "invites_created",
            "Invite links created",
            invites_created.clone(),
        );
        let sync_bytes = frame_bytes(
            r,
            "sync_bytes",
            "Bytes of history sync frames (/kith/sync/1.0.0, length prefix included), by \
             direction: request_sent and response_received when this node catches up, \
             request_received and response_sent when it serves others",
        );
        let file_bytes = frame_bytes(
            r,
            "file_bytes",
            "Bytes of file protocol frames (/kith/file/1.0.0, length prefix included), by \
             direction: request_sent and response_received when this node fetches, \
             request_received and response_sent when it serves others",
        );
        let files = FileCounters::register(r);
        let peer_faults = PeerFaults {
            counts: counters(
                r,
                "peer_faults",
                "Peers this node cut off or limited, by what they did",
                PeerFault::ALL.map(|f| FaultLabel { fault: f.as_str() }),
            ),
            graylisted: Gauge::default(),
        };
        r.register(
            "peers_graylisted",
            "Connected peers whose gossipsub score is below the graylist threshold (their \
             messages are not read)",
            peer_faults.graylisted.clone(),
        );
        let store_write_failures = counters(
            r,
            "store_write_failures",
            "Store writes that failed with an I/O error (recovery probes included), by reason",
            FailureReason::ALL.map(|x| ReasonLabel { reason: x.as_str() }),
        );
        let store_failing = Gauge::default();
        r.register(
            "store_failing",
            "1 while the node cannot write to its disk (local writes are refused), else 0",
            store_failing.clone(),
        );
        KithMetrics {
            messages_sent,
            messages_received,
            rollbacks,
            undecryptable,
            recovered,
            past_epochs_expired,
            deep_forks,
            forks_detected,
            rejected,
            ignored,
            decrypt_failures,
            group_epoch,
            group_members,
            store_commit,
            api_requests,
            joins,
            join_requests,
            invites_created,
            sync_bytes,
            file_bytes,
            peer_faults,
            files,
            store_write_failures,
            store_failing,
            engine_cpu,
        }
    }

    /// The history sync frame counters, for the network task's codec.
    pub fn sync_bytes(&self) -> FrameBytes {
        self.sync_bytes.clone()
    }

    /// The file protocol frame counters, for the network task's codec.
    pub fn file_bytes(&self) -> FrameBytes {
        self.file_bytes.clone()
    }

    /// The peer fault counters, for the network task.
    pub fn peer_faults(&self) -> PeerFaults {
        self.peer_faults.clone()
    }

    /// The file counters.
    pub fn files(&self) -> &FileCounters {
        &self.files
    }

    /// Counts a text message sent by this node.
    pub fn message_sent(&self) {
        self.messages_sent.inc();
    }

    /// Counts `n` text messages received from the network.
    pub fn messages_received(&self, n: u64) {
        if n > 0 {
            self.messages_received.inc_by(n);
        }
    }

    /// Counts one fork seen in a member's sync summary.
    pub fn fork_detected(&self) {
        self.forks_detected.inc();
    }

    /// Counts one lost deep fork.
    pub fn deep_fork(&self) {
        self.deep_forks.inc();
    }

    /// Counts one message that can never be decrypted here.
    pub fn undecryptable(&self, reason: Undecryptable) {
        self.undecryptable[index_of(&Undecryptable::ALL, reason)].inc();
    }

    /// Counts one undecryptable message that came back, re-sent by its sender on request.
    pub fn recovered(&self) {
        self.recovered.inc();
    }

    /// Counts past epochs whose secrets were deleted.
    pub fn past_epochs_expired(&self, n: u64) {
        if n > 0 {
            self.past_epochs_expired.inc_by(n);
        }
    }

    /// Counts one rollback to a winning branch.
    pub fn rollback(&self) {
        self.rollbacks.inc();
    }

    /// Counts one validated gossip envelope by its verdict, under its reason's label.
    pub fn envelope(&self, verdict: &Verdict) {
        match verdict {
            Verdict::Accept => {}
            Verdict::Reject(r) => self.envelope_rejected(r),
            Verdict::Ignore(r) => self.envelope_ignored(r),
        }
        if let Some(f) = decrypt_failure(verdict) {
            self.decrypt_failures[index_of(&DecryptFailure::ALL, f)].inc();
        }
    }

    /// Counts a rejected envelope.
    pub fn envelope_rejected(&self, reason: &RejectReason) {
        self.rejected[label_index(&RejectReason::LABELS, reason.label())].inc();
    }

    /// Counts an ignored envelope.
    pub fn envelope_ignored(&self, reason: &IgnoreReason) {
        self.ignored[label_index(&IgnoreReason::LABELS, reason.label())].inc();
    }

    /// The gauges of a group, labelled with its short id. Takes the family's lock: callers
    /// on the engine thread cache the result.
    pub fn group_gauges(&self, group: &GroupId) -> GroupGauges {
        let label = GroupLabel {
            group: group.short(),
        };
        GroupGauges {
            epoch: self.group_epoch.get_or_create_owned(&label),
            members: self.group_members.get_or_create_owned(&label),
        }
    }

    /// Records the duration of one store commit.
    pub fn store_commit(&self, d: Duration) {
        self.store_commit.observe(d);
    }

    /// Counts one local API request. `endpoint` is the matched route (e.g.
    /// `/v1/groups/{group}`), never the raw path, so the label stays bounded.
    pub fn api_request(&self, method: &axum::http::Method, endpoint: &str, status: u16) {
        use axum::http::Method;
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            _ => "other",
        };
        self.api_requests
            .get_or_create(&ApiLabel {
                method,
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    /// Counts one of this node's attempts to join a group.
    pub fn join(&self, result: JoinResult) {
        self.joins[index_of(&JoinResult::ALL, result)].inc();
    }

    /// Counts one answered join request from another peer.
    pub fn join_request(&self, result: JoinRequestResult) {
        self.join_requests[index_of(&JoinRequestResult::ALL, result)].inc();
    }

    /// Counts a created invite.
    pub fn invite_created(&self) {
        self.invites_created.inc();
    }

    /// Counts `n` store writes that failed with an I/O error.
    pub fn store_write_failures(&self, reason: FailureReason, n: u64) {
        self.store_write_failures[index_of(&FailureReason::ALL, reason)].inc_by(n);
    }

    /// Sets whether the node cannot write to its disk.
    pub fn set_store_failing(&self, failing: bool) {
        self.store_failing.set(i64::from(failing));
    }
}

fn index_of<T: PartialEq>(all: &[T], x: T) -> usize {
    all.iter().position(|a| *a == x).unwrap_or(0)
}

/// The position of `label` in `labels`. A reason's label is always listed (kith_protocol's
/// tests check it); were one not, it would count under the last label, `other`.
fn label_index(labels: &[&'static str], label: &str) -> usize {
    labels
        .iter()
        .position(|l| *l == label)
        .unwrap_or(labels.len().saturating_sub(1))
}

/// An `Arc`'d metric, registrable as itself (the registry takes ownership of a handle).
#[derive(Debug)]
struct ArcMetric<M>(Arc<M>);

impl<M: EncodeMetric> EncodeMetric for ArcMetric<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Encodes the whole registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// The metrics endpoint: `GET /metrics` only, no authentication (serve it on loopback).
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics))
        .with_state(registry)
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    match encode(&registry) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http::serve(listener, router(registry), shutdown).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[test]
    fn engine_cpu_is_counted_by_part() {
        let mut registry = Registry::default();
        let m = KithMetrics::register(&mut registry);
        let spin = || {
            let start = std::time::Instant::now();
            let mut x = 1u64;
            while start.elapsed() < Duration::from_millis(20) {
                x = x.wrapping_mul(3).wrapping_add(1);
            }
            x
        };
        assert_ne!(timed(&m, CpuPart::Store, spin), 0);
        let page = encode(&registry).unwrap();
        let value = |part: &str| -> f64 {
            let key = format!("kith_engine_cpu_seconds_total{{part=\"{part}\"}} ");
            let line = page.lines().find(|l| l.starts_with(&key)).unwrap();
            line[key.len()..].parse().unwrap()
        };
        assert!(value("store") >= 0.01, "{page}");
        assert_eq!(value("mls"), 0.0);
    }

    #[test]
    fn verdicts_are_counted_under_their_reason_label() {
        use kith_protocol::codec::DecodeError;
        use kith_protocol::envelope::EnvelopeError;
        use kith_protocol::group::Step;
        let mut registry = Registry::default();
        let m = KithMetrics::register(&mut registry);
        let decode = DecodeError::Malformed("x".into());
        for r in [
            RejectReason::Envelope(EnvelopeError::Decode(decode.clone())),
            RejectReason::NotMls,
            RejectReason::HeaderMismatch,
            RejectReason::Mls("decryption".into()),
            RejectReason::Merge("x".into()),
            RejectReason::Content(decode),
            RejectReason::UnboundMember,
            RejectReason::FormerMember,
            RejectReason::NotSelfRemoval,
        ] {
            m.envelope(&Verdict::Reject(r));
        }
        for r in [
            IgnoreReason::NotMember,
            IgnoreReason::Removed,
            IgnoreReason::FutureEpoch { epoch: 7, ours: 5 },
            IgnoreReason::BeyondRewind { epoch: 3 },
            IgnoreReason::PastEpoch("gone".into()),
            IgnoreReason::Storage,
            IgnoreReason::Unsupported,
            IgnoreReason::Failed {
                step: Step::StoreProposal,
                detail: "x".into(),
            },
        ] {
            m.envelope(&Verdict::Ignore(r));
        }
        m.envelope(&Verdict::Accept);
        let text = encode(&registry).unwrap();
        for line in [
            "kith_envelopes_rejected_total{reason=\"decode\"} 2",
            "kith_envelopes_rejected_total{reason=\"header\"} 1",
            "kith_envelopes_rejected_total{reason=\"mls\"} 2",
            "kith_envelopes_rejected_total{reason=\"content\"} 1",
            "kith_envelopes_rejected_total{reason=\"unbound_sender\"} 1",
            "kith_envelopes_rejected_total{reason=\"former_member\"} 1",
            "kith_envelopes_rejected_total{reason=\"other\"} 1",
            "kith_envelopes_ignored_total{reason=\"not_member\"} 2",
            "kith_envelopes_ignored_total{reason=\"future_epoch\"} 1",
            "kith_envelopes_ignored_total{reason=\"past_commit\"} 1",
            "kith_envelopes_ignored_total{reason=\"past_epoch\"} 1",
            "kith_envelopes_ignored_total{reason=\"storage\"} 1",
            "kith_envelopes_ignored_total{reason=\"other\"} 2",
            "kith_decrypt_failures_total{reason=\"invalid\"} 1",
            "kith_decrypt_failures_total{reason=\"past_epoch\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(
            decrypt_failure(&Verdict::Reject(RejectReason::Mls("x".into()))),
            Some(DecryptFailure::Invalid)
        );
        assert_eq!(
            decrypt_failure(&Verdict::Ignore(IgnoreReason::PastEpoch("x".into()))),
            Some(DecryptFailure::PastEpoch)
        );
        assert_eq!(
            decrypt_failure(&Verdict::Ignore(IgnoreReason::BeforeJoin("x".into()))),
            None
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_the_output() {
        let mut registry = Registry::default();
        let m = KithMetrics::register(&mut registry);
        m.store_commit(Duration::from_micros(100));
        m.store_commit(Duration::from_millis(3));
        m.store_commit(Duration::from_secs(5));
        let text = encode(&registry).unwrap();
        assert!(
            text.contains("# TYPE kith_store_commit_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("kith_store_commit_seconds_count 3"), "{text}");
        assert!(text.contains("kith_store_commit_seconds_bucket{le=\"0.00025\"} 1"));
        assert!(text.contains("kith_store_commit_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("kith_store_commit_seconds_bucket{le=\"+Inf\"} 3"));
    }

    #[tokio::test]
    async fn endpoint_serves_kith_and_libp2p_families() {
        let mut registry = Registry::default();
        let m = KithMetrics::register(&mut registry);
        let _libp2p = libp2p::metrics::Metrics::new(&mut registry);
        m.message_sent();
        m.envelope(&Verdict::Reject(RejectReason::NotMls));
        m.envelope(&Verdict::Ignore(IgnoreReason::FutureEpoch {
            epoch: 2,
            ours: 1,
        }));
        m.group_gauges(&GroupId([0xab; 32])).set(4, 3);
        m.api_request(&axum::http::Method::GET, "/v1/groups/{group}", 200);
        m.join(JoinResult::Joined);
        let app = router(Arc::new(registry));

        let response = app
            .clone()
            .oneshot(
                axum::http::Request::get(METRICS_PATH)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        for line in [
            "kith_messages_sent_total 1",
            "kith_messages_received_total 0",
            "kith_envelopes_rejected_total{reason=\"decode\"} 1",
            "kith_envelopes_rejected_total{reason=\"mls\"} 0",
            "kith_envelopes_ignored_total{reason=\"future_epoch\"} 1",
            "kith_group_epoch{group=\"abababab\"} 4",
            "kith_group_members{group=\"abababab\"} 3",
            "kith_api_requests_total{method=\"GET\",endpoint=\"/v1/groups/{group}\",status=\"200\"} 1",
            "kith_joins_total{result=\"joined\"} 1",
            "kith_invites_created_total 0",
            "kith_sync_bytes_total{direction=\"response_received\"} 0",
            "# TYPE libp2p_swarm_dial_attempt counter",
            "# TYPE libp2p_gossipsub_messages counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");

        let response = app
            .oneshot(
                axum::http::Request::get("/nope")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
