//! A member's side of a join request: what to do with it ([`decide`]), and the requests
//! held for approval on this node (invites created with `--approve`).
//!
//! A joiner whose invite needs approval gets `AwaitingApproval` and sends the same request
//! again every few seconds. The member keeps the request here, in memory and bounded, until a
//! user approves or denies it; the joiner's next retry then gets the Welcome (the Add was
//! committed at approval) or the refusal. A request is identified by the joiner's PeerId and
//! key package, so a retry finds its entry. Entries are lost when the node restarts; the
//! joiner's next retry simply holds the request again.

use std::collections::BTreeMap;

use libp2p_identity::PeerId;
use openmls_traits::OpenMlsProvider;

use crate::envelope::{JoinRejection, JoinRequest, JoinResponse, RejoinRequestV1};
use crate::fork::GroupRecords;
use crate::group::GroupEngine;
use crate::ids::{GroupId, InviteId, hash_parts};
use crate::invite::{InviteRecord, secret_hash};

/// Most requests held on one node.
pub const MAX_HELD: usize = 64;
/// Most requests held for one group.
pub const MAX_HELD_PER_GROUP: usize = 16;
/// A waiting request is forgotten this long after the joiner's last retry (it gave up).
pub const STALE_AFTER_MS: u64 = 30_000;
/// A decided request (approved or denied) is kept this long for the joiner to pick up.
pub const DECIDED_TTL_MS: u64 = 10 * 60_000;

/// Where a held request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldState {
    /// Waiting for someone to approve or deny it.
    Waiting,
    /// Approved: the Add is committed; this is the answer for the joiner's next retry.
    Approved(JoinResponse),
    /// Denied.
    Denied,
}

/// One held request.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its id.
    pub id: u64,
    /// The group.
    pub group: GroupId,
    /// The invite it uses.
    pub invite: InviteId,
    /// The joiner (transport-authenticated).
    pub peer: PeerId,
    /// The request as received.
    pub request: JoinRequest,
    /// First arrival, ms since the Unix epoch.
    pub received_at_ms: u64,
    /// Last retry, ms since the Unix epoch.
    pub seen_at_ms: u64,
    /// When it was decided, ms since the Unix epoch.
    pub decided_at_ms: Option<u64>,
    /// Where it stands.
    pub state: HeldState,
}

impl Held {
    /// Whether the joiner retried recently enough to be still waiting for an answer.
    pub fn joiner_waiting(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.seen_at_ms) < STALE_AFTER_MS
    }
}

/// Why a request could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// [`MAX_HELD`] or [`MAX_HELD_PER_GROUP`] requests are waiting already.
    #[error("too many join requests are waiting for approval")]
    Full,
}

/// Why a held request could not be found by id prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    /// No held request of the group matches.
    #[error("no join request matches '{0}'")]
    NotFound(String),
    /// Several match; give more characters.
    #[error("'{0}' matches several join requests; give more characters")]
    Ambiguous(String),
}

/// The id of a join request: from the joiner and its key package, so a retry of the same
/// request has the same id and a new request (fresh key package) a new one.
pub fn request_id(peer: &PeerId, request: &JoinRequest) -> u64 {
    let key_package = match request {
        JoinRequest::V1(r) => &r.key_package,
        JoinRequest::Rejoin(r) => &r.key_package,
    };
    let h = hash_parts(&[b"kith/join-request/v1", &peer.to_bytes(), key_package]);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first)
}

/// The text form of a request id: 16 hex characters.
pub fn request_id_text(id: u64) -> String {
    format!("{id:016x}")
}

/// The held requests of this node.
#[derive(Debug, Default)]
pub struct HeldRequests {
    held: BTreeMap<u64, Held>,
}

impl HeldRequests {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops requests whose joiner gave up and decided ones past [`DECIDED_TTL_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        self.held.retain(|_, h| match h.decided_at_ms {
            Some(at) => now_ms.saturating_sub(at) < DECIDED_TTL_MS,
            None => h.joiner_waiting(now_ms),
        });
    }

    /// The entry for a retried request, its last-seen time refreshed.
    pub fn retry(&mut self, id: u64, now_ms: u64) -> Option<&Held> {
        let h = self.held.get_mut(&id)?;
        h.seen_at_ms = now_ms;
        Some(h)
    }

    /// Holds a new request. Fails when the node or the group holds too many waiting ones.
    pub fn hold(
        &mut self,
        peer: PeerId,
        group: GroupId,
        invite: InviteId,
        request: JoinRequest,
        now_ms: u64,
    ) -> Result<&Held, HoldError> {
        self.expire(now_ms);
        let id = request_id(&peer, &request);
        if !self.held.contains_key(&id) {
            let in_group = self.held.values().filter(|h| h.group == group).count();
            if self.held.len() >= MAX_HELD || in_group >= MAX_HELD_PER_GROUP {
                return Err(HoldError::Full);
            }
            // One waiting request per joiner and group: a new key package replaces the old.
            self.held.retain(|_, h| {
                !(h.peer == peer && h.group == group && h.state == HeldState::Waiting)
            });
            self.held.insert(
                id,
                Held {
                    id,
                    group,
                    invite,
                    peer,
                    request,
                    received_at_ms: now_ms,
                    seen_at_ms: now_ms,
                    decided_at_ms: None,
                    state: HeldState::Waiting,
                },
            );
        }
        self.held.get(&id).ok_or(HoldError::Full)
    }

    /// The held requests of `group`, oldest first.
    pub fn of_group(&self, group: GroupId) -> Vec<&Held> {
        let mut v: Vec<&Held> = self.held.values().filter(|h| h.group == group).collect();
        v.sort_by_key(|h| (h.received_at_ms, h.id));
        v
    }

    /// The request of `group` whose id starts with `prefix` (at least 4 hex characters, or
    /// the whole id).
    pub fn find(&self, group: GroupId, prefix: &str) -> Result<&Held, FindError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        let not_found = || FindError::NotFound(prefix.clone());
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let mut matches = self
            .held
            .values()
            .filter(|h| h.group == group && request_id_text(h.id).starts_with(&prefix));
        let first = matches.next().ok_or_else(not_found)?;
        if matches.next().is_some() {
            return Err(FindError::Ambiguous(prefix));
        }
        Ok(first)
    }

    /// The held request `id`.
    pub fn get(&self, id: u64) -> Option<&Held> {
        self.held.get(&id)
    }

    /// Records a decision on request `id`.
    pub fn decide(&mut self, id: u64, state: HeldState, now_ms: u64) {
        if let Some(h) = self.held.get_mut(&id) {
            h.state = state;
            h.decided_at_ms = Some(now_ms);
        }
    }
}

/// What a member does with a join request (see [`decide`]).
#[derive(Debug)]
pub enum Admission {
    /// Answer at once: a retry of a held request gets its current answer.
    Answer(JoinResponse),
    /// Refuse (screened out, or the invite could not be read).
    Refuse(JoinRejection),
    /// A member whose branch lost a deep fork asks to be added again:
    /// `GroupEngine::handle_rejoin_request`.
    Rejoin(RejoinRequestV1),
    /// Newly held for approval (the request [`HeldRequests::get`] finds): tell the user and
    /// answer `AwaitingApproval`.
    Held(u64),
    /// Add the joiner now: `GroupEngine::handle_join_request` with this invite record.
    Admit(Box<(JoinRequest, Option<InviteRecord>)>),
}

/// Decides what to do with `request` from `peer` (transport-authenticated) at `now_ms`: a
/// retry of a held request gets its current answer; a new request is screened against the
/// invite `read_invite` returns for its secret (an error refuses it as `Internal`), then held
/// (the invite needs approval) or admitted.
pub fn decide<P, E>(
    engine: &GroupEngine<P>,
    held: &mut HeldRequests,
    peer: PeerId,
    request: JoinRequest,
    read_invite: impl FnOnce(&InviteId) -> Result<Option<InviteRecord>, E>,
    now_ms: u64,
) -> Admission
where
    P: OpenMlsProvider,
    P::StorageProvider: GroupRecords,
    E: std::fmt::Display,
{
    held.expire(now_ms);
    let held_id = request_id(&peer, &request);
    if let Some(h) = held.retry(held_id, now_ms) {
        return Admission::Answer(match &h.state {
            HeldState::Waiting => JoinResponse::AwaitingApproval { request: held_id },
            HeldState::Approved(response) => response.clone(),
            HeldState::Denied => JoinResponse::Rejected(JoinRejection::Denied),
        });
    }
    let r = match request {
        JoinRequest::Rejoin(r) => return Admission::Rejoin(r),
        JoinRequest::V1(ref r) => r,
    };
    let invite = InviteId::of(&secret_hash(&r.secret));
    let group = r.group;
    let record = match read_invite(&invite) {
        Ok(record) => record,
        Err(e) => {
            tracing::error!(error = %e, "cannot read invites");
            return Admission::Refuse(JoinRejection::Internal);
        }
    };
    if let Err(why) = engine.screen_join_request(peer, &request, record.as_ref(), now_ms) {
        return Admission::Refuse(why);
    }
    if record.as_ref().is_some_and(|r| r.approval) {
        return match held.hold(peer, group, invite, request, now_ms) {
            Ok(h) => Admission::Held(h.id),
            Err(e) => {
                tracing::warn!(%peer, group = %group.short(), error = %e, "cannot hold join request");
                Admission::Refuse(JoinRejection::Busy)
            }
        };
    }
    Admission::Admit(Box::new((request, record)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::envelope::JoinRequestV1;

    use super::*;

    fn peer(n: u8) -> PeerId {
        crate::testing::member_key(n).public().to_peer_id()
    }

    fn request(n: u8) -> JoinRequest {
        JoinRequest::V1(JoinRequestV1 {
            network: "n".into(),
            group: GroupId([1; 32]),
            secret: [2; 32],
            key_package: vec![n; 8],
        })
    }

    #[test]
    fn a_retry_finds_its_request_and_a_new_key_package_replaces_it() {
        let mut h = HeldRequests::new();
        let g = GroupId([1; 32]);
        let inv = InviteId([3; 32]);
        let id = h.hold(peer(1), g, inv, request(1), 0).unwrap().id;
        assert_eq!(id, request_id(&peer(1), &request(1)));
        assert_ne!(id, request_id(&peer(2), &request(1)), "bound to the joiner");
        assert_eq!(h.hold(peer(1), g, inv, request(1), 5).unwrap().id, id);
        assert_eq!(h.of_group(g).len(), 1);
        assert_eq!(h.retry(id, 10).unwrap().seen_at_ms, 10);
        let id2 = h.hold(peer(1), g, inv, request(2), 20).unwrap().id;
        assert_ne!(id, id2);
        assert_eq!(h.of_group(g).len(), 1, "the old request was replaced");
        assert!(h.retry(id, 30).is_none());
    }

    #[test]
    fn holding_is_bounded_per_group_and_in_total() {
        let mut h = HeldRequests::new();
        let inv = InviteId([3; 32]);
        for n in 0..MAX_HELD_PER_GROUP as u8 {
            h.hold(peer(n), GroupId([1; 32]), inv, request(n), 0)
                .unwrap();
        }
        assert_eq!(
            h.hold(peer(200), GroupId([1; 32]), inv, request(200), 0)
                .unwrap_err(),
            HoldError::Full
        );
        let mut n = 0u8;
        let mut g = 2u8;
        while h.held.len() < MAX_HELD {
            if h.hold(peer(n), GroupId([g; 32]), inv, request(n), 0)
                .is_err()
            {
                g += 1;
            }
            n = n.wrapping_add(1);
        }
        assert!(
            h.hold(peer(250), GroupId([99; 32]), inv, request(250), 0)
                .is_err()
        );
    }

    #[test]
    fn stale_and_old_decided_requests_expire() {
        let mut h = HeldRequests::new();
        let g = GroupId([1; 32]);
        let inv = InviteId([3; 32]);
        let a = h.hold(peer(1), g, inv, request(1), 0).unwrap().id;
        let b = h.hold(peer(2), g, inv, request(2), 0).unwrap().id;
        h.decide(b, HeldState::Denied, 1000);
        h.expire(STALE_AFTER_MS);
        assert!(h.retry(a, STALE_AFTER_MS).is_none(), "joiner gave up");
        assert_eq!(h.retry(b, STALE_AFTER_MS).unwrap().state, HeldState::Denied);
        h.expire(1000 + DECIDED_TTL_MS);
        assert!(h.of_group(g).is_empty());
    }

    #[test]
    fn requests_are_found_by_unique_prefix() {
        let mut h = HeldRequests::new();
        let g = GroupId([1; 32]);
        let inv = InviteId([3; 32]);
        let id = h.hold(peer(1), g, inv, request(1), 0).unwrap().id;
        let text = request_id_text(id);
        assert_eq!(text.len(), 16);
        assert_eq!(h.find(g, &text[..6]).unwrap().id, id);
        assert_eq!(h.find(g, &text.to_uppercase()).unwrap().id, id);
        assert!(matches!(h.find(g, "abc"), Err(FindError::NotFound(_))));
        assert!(matches!(h.find(g, "zzzz"), Err(FindError::NotFound(_))));
        assert!(matches!(
            h.find(GroupId([2; 32]), &text),
            Err(FindError::NotFound(_))
        ));
    }
}
