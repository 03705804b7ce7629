//! Whether others can dial this node, and the relay reservations that make it dialable when
//! they cannot.
//!
//! [`Reach`] is plain state, fed by the network task: addresses AutoNAT confirmed (or
//! expired), AutoNAT probe results, what identify told about each peer (does it serve
//! circuit relay v2, at which public addresses), and the life of each relay listener. It
//! answers two questions: what to tell the user ([`Reachability`]) and which relays to ask
//! for a reservation now ([`Reach::plan`]). No IO happens here, so the choices are tested
//! directly.
//!
//! Choosing relays: only peers that serve the relay protocol and advertise a public address
//! are candidates; members of this node's groups (peers on one of its gossipsub topics) come
//! first, then the others, each ordered by how often it failed. A relay whose reservation
//! failed or closed waits a backoff that doubles per failure before it is tried again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kith_protocol::addr::AddrScope;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Most relay candidates remembered.
const MAX_CANDIDATES: usize = 256;
/// First wait after a relay failed; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait before a failed relay is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Addresses kept per candidate.
const ADDRS_PER_CANDIDATE: usize = 4;

/// Whether and how others can reach this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// Nothing is known yet: no address was confirmed and no probe answered.
    Unknown,
    /// Other nodes dialled these addresses back (AutoNAT): this node is directly reachable.
    Direct {
        /// The confirmed addresses.
        addrs: Vec<Multiaddr>,
    },
    /// Not directly reachable; reachable through these relays' circuits.
    Relayed {
        /// Relay and the circuit address others dial.
        circuits: Vec<(PeerId, Multiaddr)>,
    },
    /// Not directly reachable (a probe failed, or no address could be tested) and no relay
    /// reservation yet.
    BehindNat,
}

/// A peer that could relay for us.
#[derive(Debug, Clone)]
struct Candidate {
    /// Its public addresses, from identify.
    addrs: Vec<Multiaddr>,
    /// Reservations that failed or closed in a row.
    failures: u32,
    /// Not to be tried before this.
    retry_at: Option<Instant>,
}

/// One relay listener (a reservation asked for or held).
#[derive(Debug, Clone)]
struct Slot {
    relay: PeerId,
    /// The circuit address once the relay accepted.
    circuit: Option<Multiaddr>,
}

/// Reachability and relay reservation state.
#[derive(Debug)]
pub struct Reach {
    /// Reservations to hold while not directly reachable.
    want: usize,
    /// Confirmed direct external addresses.
    direct: Vec<Multiaddr>,
    /// AutoNAT probes that failed since the last confirmed address.
    failed_probes: u32,
    candidates: HashMap<PeerId, Candidate>,
    slots: HashMap<ListenerId, Slot>,
}

impl Reach {
    /// Holds up to `want` relay reservations while not directly reachable (0: never).
    pub fn new(want: usize) -> Self {
        Reach {
            want,
            direct: Vec::new(),
            failed_probes: 0,
            candidates: HashMap::new(),
            slots: HashMap::new(),
        }
    }

    /// What to report.
    pub fn reachability(&self) -> Reachability {
        if !self.direct.is_empty() {
            return Reachability::Direct {
                addrs: self.direct.clone(),
            };
        }
        let mut circuits: Vec<(PeerId, Multiaddr)> = self
            .slots
            .values()
            .filter_map(|s| s.circuit.clone().map(|c| (s.relay, c)))
            .collect();
        circuits.sort();
        if !circuits.is_empty() {
            Reachability::Relayed { circuits }
        } else if self.failed_probes > 0 || !self.slots.is_empty() {
            Reachability::BehindNat
        } else {
            Reachability::Unknown
        }
    }

    /// Whether some direct address is confirmed (Kademlia then serves the DHT).
    pub fn is_direct(&self) -> bool {
        !self.direct.is_empty()
    }

    /// A confirmed external address. Returns whether direct reachability changed.
    pub fn confirmed(&mut self, addr: &Multiaddr) -> bool {
        if AddrScope::of(addr) == AddrScope::Relayed || self.direct.contains(addr) {
            return false;
        }
        let was = self.is_direct();
        self.direct.push(addr.clone());
        self.failed_probes = 0;
        was != self.is_direct()
    }

    /// An external address expired. Returns whether direct reachability changed.
    pub fn expired(&mut self, addr: &Multiaddr) -> bool {
        let was = self.is_direct();
        self.direct.retain(|a| a != addr);
        was != self.is_direct()
    }

    /// Forgets every confirmed address (the machine's own addresses changed: they must be
    /// confirmed again). Returns whether direct reachability changed.
    pub fn network_changed(&mut self) -> bool {
        let was = self.is_direct();
        self.direct.clear();
        self.failed_probes = 0;
        for c in self.candidates.values_mut() {
            c.retry_at = None;
            c.failures = 0;
        }
        was
    }

    /// An AutoNAT probe of an address failed.
    pub fn probe_failed(&mut self) {
        self.failed_probes = self.failed_probes.saturating_add(1);
    }

    /// What identify told about `peer`: it is a relay candidate if it serves the relay
    /// protocol and has a public address.
    pub fn identified(&mut self, peer: PeerId, serves_relay: bool, addrs: &[Multiaddr]) {
        let public: Vec<Multiaddr> = addrs
            .iter()
            .filter(|a| AddrScope::of(a) == AddrScope::Public)
            .take(ADDRS_PER_CANDIDATE)
            .cloned()
            .collect();
        if !serves_relay || public.is_empty() {
            self.candidates.remove(&peer);
            return;
        }
        if let Some(c) = self.candidates.get_mut(&peer) {
            c.addrs = public;
            return;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            return;
        }
        self.candidates.insert(
            peer,
            Candidate {
                addrs: public,
                failures: 0,
                retry_at: None,
            },
        );
    }

    /// The relays held or asked for.
    pub fn relays(&self) -> HashSet<PeerId> {
        self.slots.values().map(|s| s.relay).collect()
    }

    /// Relay listen addresses to open now (`<relay addr>/p2p/<relay>/p2p-circuit`): none
    /// while directly reachable, else enough to hold `want` reservations, members first.
    pub fn plan(&self, now: Instant, members: &HashSet<PeerId>) -> Vec<(PeerId, Multiaddr)> {
        if self.is_direct() || self.slots.len() >= self.want {
            return Vec::new();
        }
        let held = self.relays();
        let mut ready: Vec<(&PeerId, &Candidate)> = self
            .candidates
            .iter()
            .filter(|(p, c)| !held.contains(p) && c.retry_at.is_none_or(|t| t <= now))
            .collect();
        ready.sort_by_key(|(p, c)| (!members.contains(p), c.failures, **p));
        ready
            .into_iter()
            .take(self.want - self.slots.len())
            .filter_map(|(p, c)| {
                let addr = c.addrs.first()?.clone();
                Some((*p, addr.with(Protocol::P2p(*p)).with(Protocol::P2pCircuit)))
            })
            .collect()
    }

    /// Listeners to close: every relay listener once directly reachable.
    pub fn surplus(&self) -> Vec<ListenerId> {
        if self.is_direct() {
            self.slots.keys().copied().collect()
        } else {
            Vec::new()
        }
    }

    /// A relay listener was opened for `relay`.
    pub fn listening(&mut self, id: ListenerId, relay: PeerId) {
        self.slots.insert(
            id,
            Slot {
                relay,
                circuit: None,
            },
        );
    }

    /// A listener got an address; returns whether it was one of ours (a relay accepted).
    pub fn listen_addr(&mut self, id: ListenerId, addr: &Multiaddr) -> bool {
        let Some(slot) = self.slots.get_mut(&id) else {
            return false;
        };
        slot.circuit = Some(addr.clone());
        if let Some(c) = self.candidates.get_mut(&slot.relay) {
            c.failures = 0;
            c.retry_at = None;
        }
        true
    }

    /// A listener closed (refused, expired, relay gone). Returns the relay if it was ours.
    pub fn closed(&mut self, id: ListenerId, now: Instant) -> Option<PeerId> {
        let slot = self.slots.remove(&id)?;
        self.failed(slot.relay, now);
        Some(slot.relay)
    }

    /// Asking `relay` failed (or its reservation ended): it waits a backoff that doubles per
    /// failure in a row.
    pub fn failed(&mut self, relay: PeerId, now: Instant) {
        if let Some(c) = self.candidates.get_mut(&relay) {
            c.failures = c.failures.saturating_add(1);
            let factor = 1u32 << c.failures.min(8).saturating_sub(1);
            c.retry_at = Some(now + (FIRST_BACKOFF * factor).min(MAX_BACKOFF));
        }
    }

    /// Whether `id` is one of the relay listeners.
    pub fn is_relay_listener(&self, id: ListenerId) -> bool {
        self.slots.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("valid multiaddr")
    }

    fn relays(n: usize) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        v.sort();
        v
    }

    #[test]
    fn reserves_on_public_relays_members_first_and_stops_once_direct() {
        let mut r = Reach::new(2);
        assert_eq!(r.reachability(), Reachability::Unknown);
        let [x, y, z, lan] = relays(4).try_into().expect("four");
        r.identified(x, true, &[a("/ip4/203.0.113.1/tcp/1")]);
        r.identified(
            y,
            true,
            &[a("/ip4/192.168.1.1/tcp/1"), a("/ip4/203.0.113.2/tcp/1")],
        );
        r.identified(z, true, &[a("/ip4/203.0.113.3/tcp/1")]);
        // Serves no relay, or has no public address: never a candidate.
        r.identified(lan, true, &[a("/ip4/192.168.1.7/tcp/1")]);
        r.identified(PeerId::random(), false, &[a("/ip4/203.0.113.9/tcp/1")]);
        let members: HashSet<PeerId> = [z].into();
        let now = Instant::now();
        let plan = r.plan(now, &members);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].0, z, "a member goes first");
        assert_eq!(
            plan[0].1,
            a(&format!("/ip4/203.0.113.3/tcp/1/p2p/{z}/p2p-circuit"))
        );
        assert!(plan.iter().all(|(p, _)| *p != lan));
        // The public address of y is used, not its LAN one.
        if let Some((_, addr)) = plan.iter().find(|(p, _)| *p == y) {
            assert!(addr.to_string().starts_with("/ip4/203.0.113.2/"));
        }
        let ids = [ListenerId::next(), ListenerId::next()];
        for (id, (p, _)) in ids.iter().zip(&plan) {
            r.listening(*id, *p);
        }
        assert!(r.plan(now, &members).is_empty(), "two held: enough");
        assert_eq!(r.reachability(), Reachability::BehindNat);
        let circuit = a(&format!("/ip4/203.0.113.3/tcp/1/p2p/{z}/p2p-circuit"));
        assert!(r.listen_addr(ids[0], &circuit));
        assert_eq!(
            r.reachability(),
            Reachability::Relayed {
                circuits: vec![(z, circuit.clone())]
            }
        );
        // A circuit confirmed as external does not make the node direct.
        assert!(!r.confirmed(&circuit));
        assert!(r.confirmed(&a("/ip4/198.51.100.5/tcp/7341")));
        assert!(r.is_direct());
        assert_eq!(r.surplus().len(), 2);
        assert!(r.plan(now, &members).is_empty());
    }

    #[test]
    fn a_failed_relay_waits_longer_each_time() {
        let mut r = Reach::new(1);
        let [x] = relays(1).try_into().expect("one");
        r.identified(x, true, &[a("/ip4/203.0.113.1/tcp/1")]);
        let none = HashSet::new();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..4 {
            assert_eq!(r.plan(now, &none).len(), 1);
            let id = ListenerId::next();
            r.listening(id, x);
            assert_eq!(r.closed(id, now), Some(x));
            assert!(r.plan(now, &none).is_empty(), "backing off");
            let mut wait = Duration::ZERO;
            while r.plan(now + wait, &none).is_empty() {
                wait += Duration::from_secs(1);
            }
            waits.push(wait);
            now += wait;
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        // A network change forgets failures.
        r.network_changed();
        assert_eq!(r.plan(now, &none).len(), 1);
        assert_eq!(r.closed(ListenerId::next(), now), None, "not ours");
    }
}
