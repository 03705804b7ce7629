//! History sync on the node side: the per-peer rate limit of the responder. The wire types
//! and the planning logic are in `kith_protocol::sync`, the requester's decisions (and their
//! constants, re-exported here) in `kith_protocol::sync::scheduler`; the request-response
//! protocol is in [`crate::net`]; the engine actor answers requests and drives the requester
//! (see [`crate::engine`]).

use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;

/// Sync requests a peer may make per second, sustained.
pub const REQUESTS_PER_SEC: f64 = 4.0;
/// Sync requests a peer may make in a burst.
pub const REQUEST_BURST: f64 = 8.0;
/// Response bytes (envelope bytes as counted by `plan_response`) served per peer and second.
pub const BYTES_PER_SEC: f64 = 4.0 * 1024.0 * 1024.0;
/// Response bytes a peer may receive in a burst.
pub const BYTE_BURST: f64 = 8.0 * 1024.0 * 1024.0;
/// Peers whose buckets are remembered; beyond this the least recently seen one is forgotten.
pub const MAX_LIMITED_PEERS: usize = 1024;
pub use kith_protocol::sync::scheduler::SYNC_INTERVAL;
/// Most stored envelopes of one group read to summarise or answer a sync.
pub const MAX_SCAN_ENVELOPES: usize = 200_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    requests: f64,
    bytes: f64,
    last: Instant,
}

/// Token buckets per peer: [`REQUESTS_PER_SEC`] (burst [`REQUEST_BURST`]) and
/// [`BYTES_PER_SEC`] of response bytes (burst [`BYTE_BURST`]). A request is allowed when one
/// request token is left and the byte bucket is not in debt; the bytes of the answer are
/// charged afterwards (the size is only known once the page is planned), so a large page can
/// put the bucket in debt and refuse the next requests until it refills. At most
/// [`MAX_LIMITED_PEERS`] peers are tracked.
#[derive(Debug, Default)]
pub struct SyncLimiter {
    peers: HashMap<PeerId, Bucket>,
}

impl SyncLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    fn bucket(&mut self, peer: PeerId, now: Instant) -> &mut Bucket {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_LIMITED_PEERS {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.peers.remove(&p);
            }
        }
        let b = self.peers.entry(peer).or_insert(Bucket {
            requests: REQUEST_BURST,
            bytes: BYTE_BURST,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.requests = (b.requests + dt * REQUESTS_PER_SEC).min(REQUEST_BURST);
        b.bytes = (b.bytes + dt * BYTES_PER_SEC).min(BYTE_BURST);
        b.last = now;
        b
    }

    /// Takes one request token for `peer`; false if it must be refused.
    pub fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        let b = self.bucket(peer, now);
        if b.requests < 1.0 || b.bytes <= 0.0 {
            return false;
        }
        b.requests -= 1.0;
        true
    }

    /// Charges `bytes` of response to `peer`.
    pub fn charge(&mut self, peer: PeerId, bytes: u64, now: Instant) {
        let b = self.bucket(peer, now);
        b.bytes -= bytes as f64;
    }

    /// Peers tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut l = SyncLimiter::new();
        let p = PeerId::random();
        let t0 = Instant::now();
        for _ in 0..8 {
            assert!(l.allow(p, t0));
        }
        assert!(!l.allow(p, t0));
        // 250 ms refill one request.
        assert!(l.allow(p, t0 + Duration::from_millis(260)));
        assert!(!l.allow(p, t0 + Duration::from_millis(260)));
        // Another peer is independent.
        assert!(l.allow(PeerId::random(), t0));
    }

    #[test]
    fn byte_debt_refuses_until_refilled() {
        let mut l = SyncLimiter::new();
        let p = PeerId::random();
        let t0 = Instant::now();
        assert!(l.allow(p, t0));
        l.charge(p, 10 * 1024 * 1024, t0);
        assert!(!l.allow(p, t0 + Duration::from_millis(100)));
        assert!(l.allow(p, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn peers_are_bounded() {
        let mut l = SyncLimiter::new();
        let t0 = Instant::now();
        for i in 0..(MAX_LIMITED_PEERS + 10) {
            l.allow(PeerId::random(), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(l.len(), MAX_LIMITED_PEERS);
    }
}
