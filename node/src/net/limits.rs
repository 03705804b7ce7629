//! What one peer may cost this node, enforced by the network task before anything reaches
//! the engine; all of it bounded in memory.
//!
//! - [`PeerLimits`]: per connected peer, a rate of gossip messages and of join requests
//!   (token buckets). A peer over its gossip rate has the rest ignored and is graylisted
//!   for [`PENALTY`] through gossipsub's application score; join requests over the rate are
//!   answered "busy" without reaching the engine.
//! - [`ConnectionCaps`]: connections per remote IP (inbound) and per peer (both ways),
//!   refused beyond the cap.
//! - [`FairStore`]: the DHT records a node stores for others, per peer and in total.
//!
//! Gossipsub's own peer scoring (invalid envelopes, IP colocation, broken promises) is set
//! up in [`score_params`]; [`GRAYLIST_THRESHOLD`] is where a peer's messages stop being
//! read at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::gossipsub;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::metrics::{PeerFault, PeerFaults};

/// A rate: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held.
    pub burst: f64,
}

/// Gossip messages per peer, over all topics. An honest mesh peer forwards each message
/// of every group both are in once; 200 a second sustained is far above what groups
/// write (docs/BENCHMARKS.md's highest rates are 60–100 msg/s for a whole group).
pub const GOSSIP_RATE: Rate = Rate {
    per_sec: 200.0,
    burst: 1000.0,
};
/// Join requests per peer: a joiner retries a few times, then gives up.
pub const JOIN_RATE: Rate = Rate {
    per_sec: 0.2,
    burst: 5.0,
};
/// How long a peer over its gossip rate stays graylisted.
pub const PENALTY: Duration = Duration::from_secs(60);
/// The application score of a penalised peer: far below [`GRAYLIST_THRESHOLD`].
const PENALTY_SCORE: f64 = -1000.0;
/// Penalised peers remembered at once (the oldest is forgiven first).
const MAX_PENALISED: usize = 1024;
/// A peer whose gossip stream broke this many times within [`CUT_WINDOW`] is refused
/// connections for [`BAN`].
pub const CUTS_TO_BAN: usize = 3;
/// The window of [`CUTS_TO_BAN`].
pub const CUT_WINDOW: Duration = Duration::from_secs(600);
/// How long a peer is refused connections after [`CUTS_TO_BAN`] broken gossip streams.
pub const BAN: Duration = Duration::from_secs(600);
/// Broken-stream events and bans remembered at once.
const MAX_CUTS: usize = 1024;

/// Below this score gossipsub ignores everything a peer sends.
pub const GRAYLIST_THRESHOLD: f64 = -80.0;
/// Below this score this node does not publish its own messages to the peer.
pub const PUBLISH_THRESHOLD: f64 = -50.0;
/// Below this score no gossip (IHAVE/IWANT) is exchanged with the peer.
pub const GOSSIP_THRESHOLD: f64 = -10.0;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding its whole burst.
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_sec).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Join requests per invite, from all peers together: a link posted to a crowd is
/// used by many at once, a used-up or leaked one hammered by one joiner under many names.
pub const INVITE_JOIN_RATE: Rate = Rate {
    per_sec: 0.5,
    burst: 30.0,
};

/// One rate per key (an invite), for at most `cap` keys; when full, the key used longest
/// ago is forgotten (it starts again with a full burst).
#[derive(Debug)]
pub struct KeyedRates<K> {
    rate: Rate,
    cap: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedRates<K> {
    /// `rate` per key, for at most `cap` keys.
    pub fn new(rate: Rate, cap: usize) -> KeyedRates<K> {
        KeyedRates {
            rate,
            cap: cap.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token of `key`'s rate, if there is one.
    pub fn take(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.cap {
            let oldest = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.buckets.remove(&k);
            }
        }
        let rate = self.rate;
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[derive(Debug, Clone)]
struct PeerState {
    gossip: Bucket,
    join: Bucket,
}

/// What [`PeerLimits::gossip`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipAdmit {
    /// Within the rate: hand it to the engine.
    Pass,
    /// Over the rate: ignore it.
    Drop,
    /// Over the rate for the first time since the last penalty: ignore it, and graylist
    /// the peer (the caller sets its application score to [`PeerLimits::PENALTY_SCORE`]).
    Penalise,
}

/// Per-peer rates of the network task. Entries exist only for connected peers (and at most
/// [`MAX_PENALISED`] penalties), so memory follows the connection caps.
#[derive(Debug)]
pub struct PeerLimits {
    gossip_rate: Rate,
    join_rate: Rate,
    peers: HashMap<PeerId, PeerState>,
    /// Peers graylisted by this node, and until when, oldest first.
    penalised: VecDeque<(PeerId, Instant)>,
    /// When peers' gossip streams broke, oldest first.
    cuts: VecDeque<(PeerId, Instant)>,
    faults: PeerFaults,
}

impl PeerLimits {
    /// The application score given to a penalised peer.
    pub const PENALTY_SCORE: f64 = PENALTY_SCORE;

    /// Limits at `gossip_rate` and `join_rate`, counting faults in `faults`.
    pub fn new(gossip_rate: Rate, join_rate: Rate, faults: PeerFaults) -> PeerLimits {
        PeerLimits {
            gossip_rate,
            join_rate,
            peers: HashMap::new(),
            penalised: VecDeque::new(),
            cuts: VecDeque::new(),
            faults,
        }
    }

    fn state(&mut self, peer: PeerId, now: Instant) -> &mut PeerState {
        let (g, j) = (self.gossip_rate, self.join_rate);
        self.peers.entry(peer).or_insert_with(|| PeerState {
            gossip: Bucket::full(g, now),
            join: Bucket::full(j, now),
        })
    }

    /// A gossip message from `peer` arrived.
    pub fn gossip(&mut self, peer: PeerId, now: Instant) -> GossipAdmit {
        let rate = self.gossip_rate;
        if self.state(peer, now).gossip.take(rate, now) {
            return GossipAdmit::Pass;
        }
        if self.is_penalised(&peer) {
            return GossipAdmit::Drop;
        }
        if self.penalised.len() >= MAX_PENALISED {
            self.penalised.pop_front();
        }
        self.penalised.push_back((peer, now + PENALTY));
        self.faults.inc(PeerFault::GossipFlood);
        GossipAdmit::Penalise
    }

    /// A join request from `peer` arrived: whether to hand it to the engine.
    pub fn join(&mut self, peer: PeerId, now: Instant) -> bool {
        let rate = self.join_rate;
        let ok = self.state(peer, now).join.take(rate, now);
        if !ok {
            self.faults.inc(PeerFault::JoinFlood);
        }
        ok
    }

    /// `peer`'s gossip stream broke (the connection was closed): whether it broke
    /// [`CUTS_TO_BAN`] times within [`CUT_WINDOW`], so the peer is to be banned.
    pub fn cut(&mut self, peer: PeerId, now: Instant) -> bool {
        while self
            .cuts
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) > CUT_WINDOW)
        {
            self.cuts.pop_front();
        }
        if self.cuts.len() >= MAX_CUTS {
            self.cuts.pop_front();
        }
        self.cuts.push_back((peer, now));
        let n = self.cuts.iter().filter(|(p, _)| *p == peer).count();
        if n >= CUTS_TO_BAN {
            self.cuts.retain(|(p, _)| *p != peer);
            return true;
        }
        false
    }

    /// Whether `peer` is serving a penalty.
    pub fn is_penalised(&self, peer: &PeerId) -> bool {
        self.penalised.iter().any(|(p, _)| p == peer)
    }

    /// Penalties that ended by `now` (their peers' scores are to be restored).
    pub fn forgive(&mut self, now: Instant) -> Vec<PeerId> {
        let (done, left): (Vec<_>, Vec<_>) = self.penalised.drain(..).partition(|(_, t)| *t <= now);
        self.penalised = left.into();
        done.into_iter().map(|(p, _)| p).collect()
    }

    /// `peer`'s last connection closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Peers with state.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.peers.len()
    }
}

/// Gossipsub's peer-score parameters for Kith (see docs/PROTOCOL.md, "Peer scoring").
///
/// - Invalid envelopes (P4): only rejections that no honest node forwards count
///   ([`kith_protocol::group::RejectReason::is_intrinsic`]); each topic weighs them
///   −20 × count², so three put a peer below [`GRAYLIST_THRESHOLD`]; the count decays by 1 %
///   a second.
/// - Mesh delivery rates (P3) are off: a quiet group delivers nothing for hours, and
///   honest peers would be pruned for it.
/// - IP colocation (P6): more than 20 peers from one IP cost −2 × excess²; loopback is
///   exempt (a local testnet), and a relay's circuits (at most 16 per Kith relay) stay
///   under the threshold.
/// - Broken promises and mesh protocol violations (P7): −10 × excess² above 6.
/// - The application score (P5) is this node's own verdict: [`PeerLimits`] sets
///   [`PeerLimits::PENALTY_SCORE`] on a flooder for [`PENALTY`].
/// - Small rewards for time in the mesh and first deliveries (P1, P2) are capped at 10, so
///   an old peer cannot buy its way out of a penalty.
pub fn score_params() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let params = gossipsub::PeerScoreParams {
        topics: HashMap::new(),
        topic_score_cap: 10.0,
        app_specific_weight: 1.0,
        ip_colocation_factor_weight: -2.0,
        ip_colocation_factor_threshold: 20.0,
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ]),
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: 0.99,
        decay_interval: Duration::from_secs(1),
        decay_to_zero: 0.01,
        retain_score: Duration::from_secs(3600),
        ..gossipsub::PeerScoreParams::default()
    };
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: GOSSIP_THRESHOLD,
        publish_threshold: PUBLISH_THRESHOLD,
        graylist_threshold: GRAYLIST_THRESHOLD,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 3.0,
    };
    (params, thresholds)
}

/// The score parameters of one group topic.
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -20.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    }
}

/// Connection caps: inbound connections per remote IP, and connections per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSettings {
    /// Inbound connections from one IP address at once.
    pub per_ip: usize,
    /// Connections with one peer at once (both directions; a direct and a relayed one, a
    /// TCP and a QUIC one, and one in each direction fit).
    pub per_peer: usize,
    /// Also cap loopback addresses (off: a local testnet has every node on 127.0.0.1).
    pub loopback: bool,
}

impl Default for CapSettings {
    fn default() -> Self {
        CapSettings {
            per_ip: 16,
            per_peer: 6,
            loopback: false,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum CapExceeded {
    /// Too many inbound connections from one IP.
    #[error("too many connections from {0}")]
    Ip(IpAddr),
    /// Too many connections with one peer.
    #[error("too many connections with this peer")]
    Peer,
    /// The peer is banned for a while (its gossip stream kept breaking).
    #[error("this peer is refused for a while")]
    Banned,
}

/// Refuses connections beyond [`CapSettings`], counting each refusal.
pub struct ConnectionCaps {
    settings: CapSettings,
    by_ip: HashMap<IpAddr, usize>,
    by_peer: HashMap<PeerId, usize>,
    conns: HashMap<ConnectionId, (PeerId, Option<IpAddr>)>,
    /// Peers refused until a time (at most [`MAX_CUTS`]).
    banned: HashMap<PeerId, Instant>,
    faults: PeerFaults,
}

impl ConnectionCaps {
    /// Refuses `peer`'s connections until `until` (existing ones are the caller's to
    /// close).
    pub fn ban(&mut self, peer: PeerId, until: Instant) {
        let now = Instant::now();
        self.banned.retain(|_, t| *t > now);
        if self.banned.len() >= MAX_CUTS && !self.banned.contains_key(&peer) {
            let first = self.banned.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p);
            if let Some(p) = first {
                self.banned.remove(&p);
            }
        }
        self.banned.insert(peer, until);
    }

    fn check_banned(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        if self.banned.get(peer).is_some_and(|t| *t > Instant::now()) {
            self.faults.inc(PeerFault::Banned);
            return Err(ConnectionDenied::new(CapExceeded::Banned));
        }
        Ok(())
    }

    /// Caps at `settings`, counting refusals in `faults`.
    pub fn new(settings: CapSettings, faults: PeerFaults) -> ConnectionCaps {
        ConnectionCaps {
            settings,
            by_ip: HashMap::new(),
            by_peer: HashMap::new(),
            conns: HashMap::new(),
            banned: HashMap::new(),
            faults,
        }
    }

    /// The IP an inbound connection is capped by: none for a relayed one (that is the
    /// relay's address, and the relay caps its circuits), nor for loopback unless asked.
    fn capped_ip(&self, remote: &Multiaddr) -> Option<IpAddr> {
        if remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return None;
        }
        let ip = remote.iter().find_map(|p| match p {
            Protocol::Ip4(a) => Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => Some(IpAddr::V6(a)),
            _ => None,
        })?;
        (self.settings.loopback || !ip.is_loopback()).then_some(ip)
    }

    fn check_ip(&self, ip: Option<IpAddr>) -> Result<(), ConnectionDenied> {
        match ip {
            Some(ip) if self.by_ip.get(&ip).copied().unwrap_or(0) >= self.settings.per_ip => {
                self.faults.inc(PeerFault::TooManyConnections);
                Err(ConnectionDenied::new(CapExceeded::Ip(ip)))
            }
            _ => Ok(()),
        }
    }

    fn check_peer(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        if self.by_peer.get(peer).copied().unwrap_or(0) >= self.settings.per_peer {
            self.faults.inc(PeerFault::TooManyConnections);
            return Err(ConnectionDenied::new(CapExceeded::Peer));
        }
        Ok(())
    }
}

impl NetworkBehaviour for ConnectionCaps {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check_ip(self.capped_ip(remote))
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let ip = self.capped_ip(remote);
        self.check_banned(&peer)?;
        self.check_ip(ip)?;
        self.check_peer(&peer)?;
        self.add(id, peer, ip);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_banned(&peer)?;
        self.check_peer(&peer)?;
        self.add(id, peer, None);
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = event {
            self.remove(c.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

impl ConnectionCaps {
    fn add(&mut self, id: ConnectionId, peer: PeerId, ip: Option<IpAddr>) {
        *self.by_peer.entry(peer).or_default() += 1;
        if let Some(ip) = ip {
            *self.by_ip.entry(ip).or_default() += 1;
        }
        self.conns.insert(id, (peer, ip));
    }

    fn remove(&mut self, id: ConnectionId) {
        let Some((peer, ip)) = self.conns.remove(&id) else {
            return;
        };
        decrement(&mut self.by_peer, peer);
        if let Some(ip) = ip {
            decrement(&mut self.by_ip, ip);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// DHT provider keys stored for one other peer, at most.
pub const PROVIDER_KEYS_PER_PEER: usize = 64;
/// DHT provider keys stored for all other peers together, at most (this node's own keys
/// are on top: a full store never stops it announcing its invites).
pub const PROVIDER_KEYS_FOR_OTHERS: usize = 2048;
/// DHT value records stored for others, at most (Kith itself stores none).
pub const RECORDS_FOR_OTHERS: usize = 64;
/// Largest DHT value record stored.
pub const MAX_RECORD_BYTES: usize = 4096;

/// A DHT store that shares its room fairly: at most [`PROVIDER_KEYS_PER_PEER`] provider
/// keys per other peer and [`PROVIDER_KEYS_FOR_OTHERS`] in all, so one peer cannot fill
/// a node's store and crowd out everybody else's announcements, or its own.
pub struct FairStore {
    inner: MemoryStore,
    local: PeerId,
    /// Provider keys held per other peer.
    keys_of: HashMap<PeerId, HashSet<RecordKey>>,
    keys_for_others: usize,
    faults: PeerFaults,
}

impl FairStore {
    /// A store for the node `local`.
    pub fn new(local: PeerId, faults: PeerFaults) -> FairStore {
        let config = MemoryStoreConfig {
            max_records: RECORDS_FOR_OTHERS,
            max_value_bytes: MAX_RECORD_BYTES,
            max_provided_keys: PROVIDER_KEYS_FOR_OTHERS + 1024,
            ..MemoryStoreConfig::default()
        };
        FairStore {
            inner: MemoryStore::with_config(local, config),
            local,
            keys_of: HashMap::new(),
            keys_for_others: 0,
            faults,
        }
    }

    /// Drops `provider`'s expired records when it is at its cap (kad removes expired
    /// records only when they are asked for).
    fn purge_expired(&mut self, provider: &PeerId) {
        let Some(keys) = self.keys_of.get(provider) else {
            return;
        };
        if keys.len() < PROVIDER_KEYS_PER_PEER {
            return;
        }
        let now = Instant::now();
        let expired: Vec<RecordKey> = keys
            .iter()
            .filter(|k| {
                self.inner
                    .providers(k)
                    .iter()
                    .all(|r| r.provider != *provider || r.is_expired(now))
            })
            .cloned()
            .collect();
        for k in expired {
            self.inner.remove_provider(&k, provider);
            self.forget_key(provider, &k);
        }
    }

    fn forget_key(&mut self, provider: &PeerId, key: &RecordKey) {
        if let Some(keys) = self.keys_of.get_mut(provider)
            && keys.remove(key)
        {
            self.keys_for_others = self.keys_for_others.saturating_sub(1);
            if keys.is_empty() {
                self.keys_of.remove(provider);
            }
        }
    }
}

impl RecordStore for FairStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<std::borrow::Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> libp2p::kad::store::Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> libp2p::kad::store::Result<()> {
        let provider = record.provider;
        if provider != self.local {
            let known = self
                .keys_of
                .get(&provider)
                .is_some_and(|k| k.contains(&record.key));
            if !known {
                self.purge_expired(&provider);
                let held = self.keys_of.get(&provider).map_or(0, HashSet::len);
                if held >= PROVIDER_KEYS_PER_PEER
                    || self.keys_for_others >= PROVIDER_KEYS_FOR_OTHERS
                {
                    self.faults.inc(PeerFault::DhtFull);
                    return Err(libp2p::kad::store::Error::MaxProvidedKeys);
                }
            }
            let key = record.key.clone();
            self.inner.add_provider(record)?;
            // The inner store drops a provider silently when the key already has its
            // replication factor of providers; count only what it kept.
            let kept = self
                .inner
                .providers(&key)
                .iter()
                .any(|p| p.provider == provider);
            if kept && !known {
                self.keys_of.entry(provider).or_default().insert(key);
                self.keys_for_others += 1;
            }
            return Ok(());
        }
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p);
        self.forget_key(p, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let rate = Rate {
            per_sec: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        assert!((0..3).all(|_| b.take(rate, t0)));
        assert!(!b.take(rate, t0));
        assert!(b.take(rate, t0 + Duration::from_millis(500)));
        assert!(!b.take(rate, t0 + Duration::from_millis(500)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(rate, later)).count(), 3);
    }

    #[test]
    fn a_gossip_flooder_is_penalised_once_then_forgiven() {
        let faults = PeerFaults::default();
        let rate = Rate {
            per_sec: 10.0,
            burst: 5.0,
        };
        let mut l = PeerLimits::new(rate, JOIN_RATE, faults.clone());
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let verdicts: Vec<_> = (0..8).map(|_| l.gossip(flooder, t0)).collect();
        assert_eq!(&verdicts[..5], &[GossipAdmit::Pass; 5]);
        assert_eq!(verdicts[5], GossipAdmit::Penalise);
        assert_eq!(&verdicts[6..], &[GossipAdmit::Drop; 2]);
        assert_eq!(l.gossip(honest, t0), GossipAdmit::Pass);
        assert_eq!(faults.get(PeerFault::GossipFlood), 1);
        assert!(l.is_penalised(&flooder));
        assert!(l.forgive(t0 + PENALTY / 2).is_empty());
        assert_eq!(l.forgive(t0 + PENALTY), vec![flooder]);
        assert!(!l.is_penalised(&flooder));
        l.disconnected(&flooder);
        l.disconnected(&honest);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn join_requests_over_the_rate_are_refused_and_counted() {
        let faults = PeerFaults::default();
        let mut l = PeerLimits::new(GOSSIP_RATE, JOIN_RATE, faults.clone());
        let p = PeerId::random();
        let t0 = Instant::now();
        let ok = (0..20).filter(|_| l.join(p, t0)).count();
        assert_eq!(ok, JOIN_RATE.burst as usize);
        assert_eq!(faults.get(PeerFault::JoinFlood), 20 - ok as u64);
        assert!(l.join(p, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn rates_per_key_are_separate_and_bounded() {
        let rate = Rate {
            per_sec: 0.0,
            burst: 2.0,
        };
        let mut r = KeyedRates::new(rate, 3);
        let t0 = Instant::now();
        assert!(r.take(&1, t0) && r.take(&1, t0));
        assert!(!r.take(&1, t0), "key 1 used up");
        assert!(r.take(&2, t0), "key 2 has its own rate");
        for k in 3..100 {
            r.take(&k, t0 + Duration::from_millis(k));
        }
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn the_third_broken_stream_in_ten_minutes_bans_and_the_ban_ends() {
        let mut l = PeerLimits::new(GOSSIP_RATE, JOIN_RATE, PeerFaults::default());
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(!l.cut(p, t0));
        assert!(!l.cut(q, t0));
        // An old cut falls out of the window.
        assert!(!l.cut(p, t0 + CUT_WINDOW + Duration::from_secs(1)));
        assert!(!l.cut(p, t0 + CUT_WINDOW + Duration::from_secs(2)));
        assert!(l.cut(p, t0 + CUT_WINDOW + Duration::from_secs(3)));
        let faults = PeerFaults::default();
        let mut caps = ConnectionCaps::new(CapSettings::default(), faults.clone());
        caps.ban(p, Instant::now() + Duration::from_secs(60));
        let addr: Multiaddr = "/ip4/192.0.2.1/tcp/1"
            .parse()
            .unwrap_or_else(|_| Multiaddr::empty());
        let id = ConnectionId::new_unchecked(1);
        assert!(
            caps.handle_established_outbound_connection(
                id,
                p,
                &addr,
                Endpoint::Dialer,
                PortUse::New
            )
            .is_err()
        );
        assert!(
            caps.handle_established_inbound_connection(id, q, &addr, &addr)
                .is_ok()
        );
        assert_eq!(faults.get(PeerFault::Banned), 1);
        caps.ban(q, Instant::now());
        let id2 = ConnectionId::new_unchecked(2);
        assert!(
            caps.handle_established_outbound_connection(
                id2,
                q,
                &addr,
                Endpoint::Dialer,
                PortUse::New
            )
            .is_ok(),
            "a ban that ended refuses nothing"
        );
    }

    #[test]
    fn penalties_are_bounded() {
        let mut l = PeerLimits::new(
            Rate {
                per_sec: 0.0,
                burst: 0.0,
            },
            JOIN_RATE,
            PeerFaults::default(),
        );
        let t0 = Instant::now();
        for _ in 0..MAX_PENALISED + 10 {
            l.gossip(PeerId::random(), t0);
        }
        assert_eq!(l.penalised.len(), MAX_PENALISED);
    }

    #[test]
    fn the_score_parameters_are_valid_and_three_invalid_envelopes_graylist() {
        let (params, _) = score_params();
        assert!(params.validate().is_ok());
        let topic = topic_score_params();
        assert!(topic.validate().is_ok());
        let p4 = |n: f64| topic.topic_weight * topic.invalid_message_deliveries_weight * n * n;
        assert!(p4(2.0) >= GRAYLIST_THRESHOLD);
        assert!(p4(3.0) < GRAYLIST_THRESHOLD);
        // The rewards cannot outweigh one penalty.
        assert!(params.topic_score_cap + p4(3.0) < GRAYLIST_THRESHOLD + 10.0);
        assert!(
            PENALTY_SCORE * params.app_specific_weight + params.topic_score_cap
                < GRAYLIST_THRESHOLD
        );
    }

    fn provider(key: &[u8], peer: PeerId) -> ProviderRecord {
        ProviderRecord::new(RecordKey::new(&key), peer, Vec::new())
    }

    #[test]
    fn one_peer_cannot_fill_the_dht_store() {
        let local = PeerId::random();
        let faults = PeerFaults::default();
        let mut s = FairStore::new(local, faults.clone());
        let greedy = PeerId::random();
        let stored = (0..PROVIDER_KEYS_PER_PEER + 10)
            .filter(|i| s.add_provider(provider(&i.to_be_bytes(), greedy)).is_ok())
            .count();
        assert_eq!(stored, PROVIDER_KEYS_PER_PEER);
        assert_eq!(faults.get(PeerFault::DhtFull), 10);
        // Re-announcing a held key is always fine; others and this node still have room.
        assert!(
            s.add_provider(provider(&0usize.to_be_bytes(), greedy))
                .is_ok()
        );
        assert!(s.add_provider(provider(b"other", PeerId::random())).is_ok());
        assert!(s.add_provider(provider(b"mine", local)).is_ok());
        // Removing frees the room again.
        s.remove_provider(&RecordKey::new(&0usize.to_be_bytes()), &greedy);
        assert!(s.add_provider(provider(b"new", greedy)).is_ok());
    }

    #[test]
    fn connections_beyond_the_caps_are_refused() {
        let faults = PeerFaults::default();
        let mut caps = ConnectionCaps::new(
            CapSettings {
                per_ip: 2,
                per_peer: 2,
                loopback: false,
            },
            faults.clone(),
        );
        let from = |ip: &str| -> Multiaddr {
            format!("/ip4/{ip}/tcp/1")
                .parse()
                .unwrap_or_else(|_| Multiaddr::empty())
        };
        let local = from("192.0.2.1");
        let mut next = 0;
        let mut inbound = |caps: &mut ConnectionCaps, peer: PeerId, remote: &Multiaddr| {
            next += 1;
            let id = ConnectionId::new_unchecked(next);
            caps.handle_pending_inbound_connection(id, &local, remote)?;
            caps.handle_established_inbound_connection(id, peer, &local, remote)
                .map(|_| id)
        };
        let a = from("198.51.100.7");
        let first = inbound(&mut caps, PeerId::random(), &a);
        assert!(first.is_ok());
        assert!(inbound(&mut caps, PeerId::random(), &a).is_ok());
        assert!(
            inbound(&mut caps, PeerId::random(), &a).is_err(),
            "third from one IP"
        );
        // Loopback is not capped by default, relayed connections never by IP.
        let lo = from("127.0.0.1");
        assert!((0..5).all(|_| inbound(&mut caps, PeerId::random(), &lo).is_ok()));
        let relayed: Multiaddr = format!("{a}/p2p/{}/p2p-circuit", PeerId::random())
            .parse()
            .unwrap_or_else(|_| Multiaddr::empty());
        assert!(inbound(&mut caps, PeerId::random(), &relayed).is_ok());
        // One peer: two connections at most.
        let p = PeerId::random();
        assert!(inbound(&mut caps, p, &from("203.0.113.1")).is_ok());
        assert!(inbound(&mut caps, p, &from("203.0.113.2")).is_ok());
        assert!(
            inbound(&mut caps, p, &from("203.0.113.3")).is_err(),
            "third with one peer"
        );
        assert_eq!(faults.get(PeerFault::TooManyConnections), 2);
        // A closed connection frees its place.
        if let Ok(id) = first {
            caps.remove(id);
        }
        assert!(inbound(&mut caps, PeerId::random(), &a).is_ok());
    }
}
