//! Member verification: the safety number of this node and a member, marking a member
//! verified (stored locally, `store/marks.rs`), and noticing members whose key is not the
//! verified one (see [`kith_protocol::verify`]). The operations are `Actor` methods run by
//! [`EngineHandle::run`]; [`Actor::check_verifications`] runs when a group's epoch changes.

use kith_protocol::verify::{
    self as verify, KEY_BYTES, KeyChange, KeyChangeReason, SafetyNumber, VerifyMark,
};

use super::*;
use crate::model::{KeyChangeInfo, Verification};

/// What this node knows of one member's verification.
struct MemberMark {
    verified: bool,
    mark: Option<VerifyMark>,
    change: Option<KeyChangeInfo>,
}

fn change_info(c: &KeyChange, since_ms: Option<u64>) -> KeyChangeInfo {
    KeyChangeInfo {
        reason: c.reason.label().to_owned(),
        verified_peer: c.verified_peer.to_string(),
        name: c.name.clone(),
        since_ms,
        message: c.message(),
    }
}

/// The mark-related state of each of `members` (PeerId, current key), given all `marks` and
/// the members' display names.
fn member_marks(
    marks: &[VerifyMark],
    members: &[(PeerId, Vec<u8>)],
    names: &[(PeerId, Option<String>)],
) -> Vec<(PeerId, MemberMark)> {
    let named: Vec<(PeerId, Option<&str>)> =
        names.iter().map(|(p, n)| (*p, n.as_deref())).collect();
    let renamed = verify::key_changes(marks, &named);
    members
        .iter()
        .map(|(peer, key)| {
            let mark = marks.iter().find(|m| m.peer == *peer).cloned();
            let mismatch = mark.as_ref().and_then(|m| {
                (!m.holds_for(key)).then(|| {
                    change_info(
                        &KeyChange {
                            peer: *peer,
                            verified_peer: *peer,
                            name: m.name.clone(),
                            reason: KeyChangeReason::KeyMismatch,
                        },
                        m.lost_at_ms,
                    )
                })
            });
            let change = mismatch.or_else(|| {
                renamed
                    .iter()
                    .find(|c| c.peer == *peer)
                    .map(|c| change_info(c, None))
            });
            let state = MemberMark {
                verified: mark.as_ref().is_some_and(|m| m.holds_for(key)),
                mark,
                change,
            };
            (*peer, state)
        })
        .collect()
}

impl Actor {
    /// The display names of `group`'s members as far as this node knows them (from their
    /// profiles), so a verified member's name under a new key is reported
    /// ([`verify::key_changes`]).
    fn member_names(&self, group: &GroupId) -> Vec<(PeerId, Option<String>)> {
        self.groups
            .member_keys(group)
            .unwrap_or_default()
            .into_iter()
            .map(|(peer, _)| {
                let name = self
                    .store
                    .profile(&peer)
                    .ok()
                    .flatten()
                    .map(|p| kith_protocol::chat::clean_name(&p.v1().name))
                    .filter(|n| !n.is_empty());
                (peer, name)
            })
            .collect()
    }

    /// `peer`'s current key in `group` (its MLS leaf's signature key).
    fn member_key(&self, group: &GroupId, peer: PeerId) -> Result<Vec<u8>, EngineError> {
        if peer == self.me {
            return Err(EngineError::BadRequest(
                "that is this node; verify another member".to_owned(),
            ));
        }
        self.groups
            .member_keys(group)
            .ok_or_else(|| EngineError::GroupNotFound(group.to_string()))?
            .into_iter()
            .find(|(p, _)| *p == peer)
            .map(|(_, key)| key)
            .ok_or_else(|| EngineError::MemberNotFound(peer.to_string()))
    }

    /// The safety number of this node and member `peer` of group `q`, and whether the member
    /// is verified (`GET /v1/groups/{group}/members/{peer}/verification`).
    pub fn verification(&self, q: &str, peer: PeerId) -> Result<Verification, EngineError> {
        let id = self.resolve(q)?;
        let key = self.member_key(&id, peer)?;
        let own = verify::peer_key(&self.me)
            .ok_or_else(|| EngineError::Internal("this node's key is not Ed25519".to_owned()))?;
        let number = SafetyNumber::new((self.me, &own), (peer, &key))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let marks = self.store.marks()?;
        let names = self.member_names(&id);
        let state = member_marks(&marks, &[(peer, key)], &names)
            .pop()
            .map(|(_, s)| s)
            .ok_or_else(|| EngineError::MemberNotFound(peer.to_string()))?;
        Ok(Verification {
            group: id.to_string(),
            peer_id: peer.to_string(),
            self_peer_id: self.me.to_string(),
            safety_number: number.digits().to_owned(),
            qr_payload: number.qr_payload(),
            verified: state.verified,
            verified_at_ms: state.mark.as_ref().map(|m| m.verified_at_ms),
            name: state.mark.and_then(|m| m.name),
            key_changed: state.change,
        })
    }

    /// Marks member `peer` of group `q` verified with its current key, recording `name`
    /// (or, if none is given, the member's display name if known) with the mark
    /// (`PUT …/verification`). Replaces an earlier mark, also one that was lost.
    pub fn mark_verified(
        &mut self,
        q: &str,
        peer: PeerId,
        name: Option<&str>,
    ) -> Result<Verification, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let key = self.member_key(&id, peer)?;
        let key: [u8; KEY_BYTES] = key.as_slice().try_into().map_err(|_| {
            EngineError::Internal(format!("the key of {peer} is not an Ed25519 key"))
        })?;
        let known = self
            .member_names(&id)
            .into_iter()
            .find(|(p, _)| *p == peer)
            .and_then(|(_, n)| n);
        let name = name.or(known.as_deref());
        let mark = VerifyMark::new(peer, key, name, now_ms())
            .map_err(|e| EngineError::BadRequest(e.to_string()))?;
        self.store.put_mark(&mark).map_err(|e| match e {
            StoreError::Full { limit, .. } => EngineError::BadRequest(format!(
                "at most {limit} members can be marked verified; unmark some first"
            )),
            e => e.into(),
        })?;
        tracing::info!(group = %id.short(), %peer, "marked a member verified");
        self.verification(q, peer)
    }

    /// Removes the verification mark of member `peer` of group `q` (`DELETE
    /// …/verification`); removing a mark that is not there is not an error.
    pub fn unmark_verified(&mut self, q: &str, peer: PeerId) -> Result<Verification, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        self.member_key(&id, peer)?;
        if self.store.remove_mark(&peer)? {
            tracing::info!(group = %id.short(), %peer, "removed a member's verification mark");
        }
        self.reported_key_changes.retain(|(_, _, p)| *p != peer);
        self.verification(q, peer)
    }

    /// Sets `verified` and `key_changed` of the members of `group` (for `GET
    /// /v1/groups/{group}` and `…/members`). A store that cannot read the marks leaves them
    /// unset (logged): the group is still shown.
    pub(super) fn annotate_members(&self, group: &GroupId, members: &mut [MemberInfo]) {
        let marks = match self.store.marks() {
            Ok(m) if m.is_empty() => return,
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read verification marks");
                return;
            }
        };
        let keys = self.groups.member_keys(group).unwrap_or_default();
        let states = member_marks(&marks, &keys, &self.member_names(group));
        for m in members {
            if let Some((_, s)) = states.iter().find(|(p, _)| p.to_string() == m.peer_id) {
                m.verified = s.verified;
                m.key_changed = s.change.clone();
            }
        }
    }

    /// After `group`'s membership changed: drops (keeps as lost) the marks whose member now
    /// has another key, and reports verified names under new keys, each once, as
    /// [`NodeEvent::VerificationLost`] and a warning in the log.
    pub(super) fn check_verifications(&mut self, group: GroupId) {
        let Some(keys) = self.groups.member_keys(&group) else {
            return;
        };
        let marks = match self.store.marks() {
            Ok(m) if m.is_empty() => return,
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read verification marks");
                return;
            }
        };
        let refs: Vec<(PeerId, &[u8])> = keys.iter().map(|(p, k)| (*p, k.as_slice())).collect();
        let mut found = Vec::new();
        for change in verify::key_mismatches(&marks, &refs) {
            let Some(mut mark) = marks.iter().find(|m| m.peer == change.peer).cloned() else {
                continue;
            };
            mark.lost_at_ms = Some(now_ms());
            // Told once it is stored; until then the member shows it anyway, and the next
            // membership change tries again.
            match self.store.put_mark(&mark) {
                Ok(()) => found.push(change),
                Err(e) => tracing::warn!(error = %e, "cannot store a lost verification mark"),
            }
        }
        let names = self.member_names(&group);
        let named: Vec<(PeerId, Option<&str>)> =
            names.iter().map(|(p, n)| (*p, n.as_deref())).collect();
        for change in verify::key_changes(&marks, &named) {
            if self
                .reported_key_changes
                .insert((group, change.peer, change.verified_peer))
            {
                found.push(change);
            }
        }
        for change in found {
            tracing::warn!(group = %group.short(), peer = %change.peer, reason = change.reason.label(), "{}", change.message());
            let _ = self.events.send(NodeEvent::VerificationLost {
                group: group.to_string(),
                peer: change.peer.to_string(),
                name: change.name.clone(),
                verified_peer: change.verified_peer.to_string(),
                reason: change.reason.label().to_owned(),
                message: change.message(),
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(n: u8) -> (PeerId, [u8; 32]) {
        let kp = Keypair::ed25519_from_bytes([n; 32]).unwrap();
        let key = kp.public().try_into_ed25519().unwrap().to_bytes();
        (kp.public().to_peer_id(), key)
    }

    #[test]
    fn member_state_from_marks_keys_and_names() {
        let (p1, k1) = member(1);
        let (p2, k2) = member(2);
        let (p3, k3) = member(3);
        let marks = vec![
            VerifyMark::new(p1, k1, Some("ann"), 7).unwrap(),
            VerifyMark::new(p2, k1, None, 8).unwrap(),
        ];
        let keys = vec![(p1, k1.to_vec()), (p2, k2.to_vec()), (p3, k3.to_vec())];
        let names = vec![(p1, None), (p2, None), (p3, Some("ann".to_owned()))];
        let states = member_marks(&marks, &keys, &names);
        let s1 = &states[0].1;
        assert!(s1.verified && s1.change.is_none());
        // p2's mark names another key: not verified, told why.
        let s2 = &states[1].1;
        assert!(!s2.verified);
        assert_eq!(s2.change.as_ref().unwrap().reason, "key_mismatch");
        // p3 carries ann's name under a new key.
        let s3 = &states[2].1;
        assert!(!s3.verified && s3.mark.is_none());
        let c = s3.change.as_ref().unwrap();
        assert_eq!(
            (c.reason.as_str(), c.verified_peer.as_str()),
            ("same_name_new_key", p1.to_string().as_str())
        );
    }
}
