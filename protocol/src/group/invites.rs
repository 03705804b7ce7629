//! Invites the whole group honours: creation and revocation travel as MLS application
//! messages, so every member stores the same [`InviteRecord`]s (through
//! [`Effect::Invite`]) and any online member can admit a joiner; the Add commit names the
//! invite it used in its authenticated data ([`CommitNote`]), so every member counts the use
//! when it merges that commit.
//!
//! Kept apart from `apply.rs` so the message-processing code there stays small: it calls
//! [`invite_message_effects`] for invite messages and [`used_invite`] after merging a commit.

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use openmls::prelude::{KeyPackage, KeyPackageIn, ProtocolVersion, tls_codec::Deserialize as _};
use openmls_traits::OpenMlsProvider;
use serde::{Deserialize, Serialize};

use super::local::encrypt_app;
use super::members::member_peer;
use super::state::active_group;
use super::{CIPHERSUITE, Effect, GroupEngine, GroupError, RejectReason, Verdict, bound_peer};
use crate::codec;
use crate::envelope::{
    AppContent, AppContentV1, Body, InviteState, JoinRejection, JoinRequest, MAX_INVITE_STATES,
    MAX_INVITE_USES, PayloadKind, SharedInvite,
};
use crate::ids::{GroupId, InviteId};
use crate::invite::{Invite, InviteParams, InviteRecord, InviteUpdate, secret_hash};
use crate::records::{EntryKind, HistoryEntry, StoredEnvelope};

/// Longest commit authenticated data a member reads as a [`CommitNote`].
const MAX_COMMIT_NOTE_BYTES: usize = 256;

/// What a commit says about itself in its MLS authenticated data (clear text, signed by the
/// committer). A versioned enum encoded with the codec; absent or unreadable AAD means
/// "nothing to say", so commits of older nodes are still merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitNote {
    /// The commit adds a member admitted with this invite; every member counts one use.
    InviteUse(InviteId),
}

impl CommitNote {
    /// The AAD bytes.
    pub fn encode(&self) -> Vec<u8> {
        // A single-field enum of fixed-size ids always encodes.
        codec::encode(self).unwrap_or_default()
    }

    /// Reads a commit's AAD; `None` if it is empty or not a note this version knows.
    pub fn decode(aad: &[u8]) -> Option<Self> {
        if aad.is_empty() {
            return None;
        }
        codec::decode(aad, MAX_COMMIT_NOTE_BYTES).ok()
    }
}

/// The invite a merged commit used, as an update to count, from the commit's AAD.
/// The invite a commit's AAD says it used, if any.
pub(super) fn note_invite(aad: &[u8]) -> Option<InviteId> {
    match CommitNote::decode(aad)? {
        CommitNote::InviteUse(id) => Some(id),
    }
}

pub(super) fn used_invite(group: GroupId, aad: &[u8]) -> Option<Effect> {
    match CommitNote::decode(aad)? {
        CommitNote::InviteUse(id) => Some(Effect::Invite(InviteUpdate::Used { group, id })),
    }
}

/// The effects of an accepted invite message (creation or revocation) from `sender`:
/// the envelope is kept (history sync serves it), a history row is written, and the record
/// is updated. `Err` is the verdict for a body this function does not handle.
pub(super) fn invite_message_effects(
    group: GroupId,
    sender: PeerId,
    stored: StoredEnvelope,
    sent_at_ms: u64,
    now_ms: u64,
    body: Body,
) -> Result<Vec<Effect>, Verdict> {
    let (kind, update) = match body {
        Body::InviteStates(list) => {
            // No history row: nothing new happened, a new member is told what did.
            let mut effects = vec![Effect::SaveEnvelope(stored)];
            effects.extend(list.iter().filter_map(|s| {
                let creator = PeerId::from_bytes(&s.creator).ok()?;
                Some(Effect::Invite(InviteUpdate::State {
                    group,
                    id: InviteId::of(&s.invite.secret_hash),
                    secret_hash: s.invite.secret_hash,
                    expires_at: s.invite.expires_at,
                    max_uses: s.invite.max_uses,
                    approval: s.invite.approval,
                    creator,
                    created_at: s.created_at,
                    uses: s.uses,
                    revoked: s.revoked,
                }))
            }));
            return Ok(effects);
        }
        Body::InviteCreated(shared) => created(group, sender, sent_at_ms, &shared),
        Body::InviteRevoked(id) => (
            EntryKind::InviteRevoked(id),
            InviteUpdate::Revoked { group, id },
        ),
        Body::Text(_)
        | Body::ResendRequest(_)
        | Body::Resent(_)
        | Body::SealedResent(_)
        | Body::Chat(_)
        | Body::ResentChat(_)
        | Body::SealedResentChat(_) => {
            return Err(Verdict::Reject(RejectReason::NotInvite));
        }
    };
    let entry = HistoryEntry {
        group,
        id: stored.id,
        epoch: stored.epoch,
        sender,
        sent_at_ms,
        received_at_ms: now_ms,
        kind,
    };
    Ok(vec![
        Effect::SaveEnvelope(stored),
        Effect::Record(entry),
        Effect::Invite(update),
    ])
}

fn created(
    group: GroupId,
    creator: PeerId,
    sent_at_ms: u64,
    shared: &SharedInvite,
) -> (EntryKind, InviteUpdate) {
    let id = InviteId::of(&shared.secret_hash);
    (
        EntryKind::InviteCreated {
            id,
            max_uses: shared.max_uses,
            expires_at: shared.expires_at,
            approval: shared.approval,
        },
        InviteUpdate::Created {
            group,
            id,
            secret_hash: shared.secret_hash,
            expires_at: shared.expires_at,
            max_uses: shared.max_uses,
            approval: shared.approval,
            creator,
            created_at: sent_at_ms / 1000,
        },
    )
}

/// What a member chooses when creating an invite (the secret comes from the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInvite {
    /// Where this node can be reached; at most three go into the link.
    pub addrs: Vec<Multiaddr>,
    /// Fresh random secret.
    pub secret: [u8; 32],
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Joins allowed, 1 to [`MAX_INVITE_USES`].
    pub max_uses: u32,
    /// Joins wait for a member's approval.
    pub approval: bool,
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: crate::fork::GroupRecords,
{
    /// Creates a signed invite to `group` and shares it with the group: an encrypted
    /// [`Body::InviteCreated`] message, so every member stores the record and can honour the
    /// link. Effects: the record, the message's envelope and history row, its publication.
    pub fn create_invite(
        &mut self,
        group: GroupId,
        new: NewInvite,
        now_ms: u64,
    ) -> Result<(Invite, Vec<Effect>), GroupError> {
        if new.max_uses == 0 || new.max_uses > MAX_INVITE_USES {
            return Err(GroupError::InvalidInput(format!(
                "uses must be between 1 and {MAX_INVITE_USES}"
            )));
        }
        let g = active_group(&mut self.groups, group)?;
        let invite = Invite::create(
            InviteParams {
                network: self.network.clone(),
                group,
                group_name: g.meta.name.clone(),
                addrs: new.addrs,
                secret: new.secret,
                expires_at: new.expires_at,
                max_uses: new.max_uses,
            },
            &self.me.keypair,
        )?;
        let shared = SharedInvite {
            secret_hash: secret_hash(&new.secret),
            expires_at: new.expires_at,
            max_uses: new.max_uses,
            approval: new.approval,
        };
        let effects = self.send_invite_body(group, Body::InviteCreated(shared), now_ms)?;
        Ok((invite, effects))
    }

    /// Tells the group (above all a member just added, who cannot read earlier messages) the
    /// state of its invites: an encrypted [`Body::InviteStates`] message with the `records`
    /// that are complete and not expired, ended ones included so the new member can tell a
    /// joiner why a link ended (at most [`MAX_INVITE_STATES`], live ones first, then newest
    /// first). Nothing is sent if there are none.
    pub fn share_invite_states(
        &mut self,
        group: GroupId,
        records: &[InviteRecord],
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        let now = now_ms / 1000;
        let mut live: Vec<&InviteRecord> = records
            .iter()
            .filter(|r| r.group == group && r.is_announced(now))
            .collect();
        live.sort_by_key(|r| (!r.is_active(now), std::cmp::Reverse(r.created_at)));
        let states: Vec<InviteState> = live
            .into_iter()
            .take(MAX_INVITE_STATES)
            .filter_map(|r| {
                Some(InviteState {
                    invite: SharedInvite {
                        secret_hash: r.secret_hash?,
                        expires_at: r.expires_at,
                        max_uses: r.max_uses,
                        approval: r.approval,
                    },
                    creator: r.creator?.to_bytes(),
                    created_at: r.created_at,
                    uses: r.uses,
                    revoked: r.revoked,
                })
            })
            .collect();
        if states.is_empty() {
            return Ok(Vec::new());
        }
        self.send_invite_body(group, Body::InviteStates(states), now_ms)
    }

    /// Revokes invite `id` of `group` for the whole group: an encrypted
    /// [`Body::InviteRevoked`] message. The caller checks that the invite exists.
    pub fn revoke_invite(
        &mut self,
        group: GroupId,
        id: InviteId,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        self.send_invite_body(group, Body::InviteRevoked(id), now_ms)
    }

    /// Encrypts an invite body for `group` and returns the effects of sending it, plus the
    /// record update it makes locally (members apply the same one on receipt).
    fn send_invite_body(
        &mut self,
        group: GroupId,
        body: Body,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        let me = self.me.peer;
        let g = active_group(&mut self.groups, group)?;
        let content = AppContent::V1(AppContentV1 {
            sent_at_ms: now_ms,
            body: body.clone(),
        });
        let (epoch, data, id) = encrypt_app(&self.provider, &self.me.signer, group, g, &content)?;
        let stored = StoredEnvelope {
            id,
            group,
            epoch,
            kind: PayloadKind::Application,
            bytes: data.clone(),
            received_at_ms: now_ms,
        };
        let topic = g.topic;
        let mut effects = invite_message_effects(group, me, stored, now_ms, now_ms, body)
            .map_err(|_| GroupError::InvalidInput("not an invite message".into()))?;
        effects.push(Effect::Publish { topic, data });
        Ok(effects)
    }

    /// Checks a join request from `from` (transport-authenticated) against `record` (the
    /// stored invite whose id matches the request's secret, if any) without changing
    /// anything. In order: network, this node's membership, the invite's secret, that `from`
    /// is not a member already, the invite's state (not revoked, not expired, not used up),
    /// and the key package (valid, Kith's ciphersuite, bound to `from`). Returns the
    /// validated key package.
    pub fn screen_join_request(
        &self,
        from: PeerId,
        request: &JoinRequest,
        record: Option<&InviteRecord>,
        now_ms: u64,
    ) -> Result<KeyPackage, JoinRejection> {
        let JoinRequest::V1(req) = request else {
            return Err(JoinRejection::Internal);
        };
        if req.network != self.network {
            return Err(JoinRejection::WrongNetwork);
        }
        let Some(g) = self.groups.get(&req.group) else {
            return Err(JoinRejection::NotMember);
        };
        if !g.active() || g.lifecycle.leaving() {
            return Err(JoinRejection::NotMember);
        }
        let hash = secret_hash(&req.secret);
        let Some(record) = record.filter(|r| r.group == req.group && r.id == InviteId::of(&hash))
        else {
            return Err(JoinRejection::UnknownInvite);
        };
        if record.secret_hash.is_some_and(|h| h != hash) {
            return Err(JoinRejection::UnknownInvite);
        }
        // Before the invite's own state: a joiner whose Add stands asks again when a member
        // that is behind says it is not in the group, and must hear that its join stands,
        // not that the invite is used up (by its own join).
        if g.mls.members().any(|m| member_peer(&m) == Some(from)) {
            return Err(JoinRejection::AlreadyMember);
        }
        record.admits(now_ms / 1000)?;
        self.checked_key_package(from, &req.key_package)
    }

    /// Decodes and validates a joiner's key package: our ciphersuite, and a credential bound
    /// to the signature key that names `from`, the transport-authenticated requester.
    pub(super) fn checked_key_package(
        &self,
        from: PeerId,
        bytes: &[u8],
    ) -> Result<KeyPackage, JoinRejection> {
        let Ok(kp_in) = KeyPackageIn::tls_deserialize_exact(bytes) else {
            return Err(JoinRejection::InvalidKeyPackage);
        };
        let Ok(kp) = kp_in.validate(self.provider.crypto(), ProtocolVersion::Mls10) else {
            return Err(JoinRejection::InvalidKeyPackage);
        };
        let leaf = kp.leaf_node();
        if kp.ciphersuite() != CIPHERSUITE
            || bound_peer(leaf.credential(), leaf.signature_key().as_slice()) != Some(from)
        {
            return Err(JoinRejection::InvalidKeyPackage);
        }
        Ok(kp)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::*;
    use crate::envelope::JoinResponse;
    use crate::testing::{Sim, T0_MS};

    fn sim(n: usize) -> Sim<'static, OpenMlsRustCrypto> {
        Sim::new(
            (0..n).map(|_| OpenMlsRustCrypto::default()).collect(),
            "test-net",
            Box::new(|_, _, _| {}),
        )
    }

    fn record(s: &Sim<'_, OpenMlsRustCrypto>, i: usize, id: InviteId) -> Option<InviteRecord> {
        s.invites[i].iter().find(|r| r.id == id).cloned()
    }

    /// Member 0 creates a group and admits members 1..n (one invite each, through 0).
    fn group_of(n: usize, total: usize) -> (Sim<'static, OpenMlsRustCrypto>, GroupId) {
        let mut s = sim(total);
        let g = s.create_group(0, "club").unwrap();
        for j in 1..n {
            let inv = s.invite(0, g, 1).unwrap();
            s.deliver_all();
            s.join(j, 0, &inv).unwrap();
            s.deliver_all();
        }
        (s, g)
    }

    #[test]
    fn every_member_stores_the_invite_and_any_member_admits_with_it() {
        let (mut s, g) = group_of(3, 5);
        let inv = s.invite(0, g, 2).unwrap();
        s.deliver_all();
        let expected = record(&s, 0, inv.id()).unwrap();
        assert_eq!(expected.creator, Some(s.peer(0)));
        assert_eq!(expected.secret_hash, Some(secret_hash(&inv.secret)));
        assert_eq!((expected.max_uses, expected.uses), (2, 0));
        for i in 1..3 {
            assert_eq!(
                record(&s, i, inv.id()),
                Some(expected.clone()),
                "member {i}"
            );
            assert!(s.history[i].iter().any(|h| matches!(
                &h.kind,
                EntryKind::InviteCreated { id, max_uses: 2, .. } if *id == inv.id()
            )));
        }
        // Member 1, not the inviter, admits member 3; every member counts the use.
        s.join(3, 1, &inv).unwrap();
        s.deliver_all();
        for i in 0..3 {
            assert_eq!(record(&s, i, inv.id()).unwrap().uses, 1, "member {i}");
        }
        // Member 2 admits member 4: the invite is used up everywhere.
        s.join(4, 2, &inv).unwrap();
        s.deliver_all();
        for i in 0..3 {
            let r = record(&s, i, inv.id()).unwrap();
            assert_eq!((r.uses, r.uses_left()), (2, 0), "member {i}");
            assert_eq!(r.admits(T0_MS / 1000), Err(JoinRejection::UsedUp));
        }
        assert_eq!(s.engines[0].group(&g).unwrap().members.len(), 5);
    }

    #[test]
    fn a_use_counted_at_one_member_refuses_the_next_join_at_another() {
        let (mut s, g) = group_of(3, 5);
        let inv = s.invite(1, g, 1).unwrap();
        s.deliver_all();
        s.join(3, 0, &inv).unwrap();
        s.deliver_all();
        let err = s.join(4, 2, &inv).unwrap_err();
        assert!(
            matches!(err, GroupError::JoinRejected(JoinRejection::UsedUp)),
            "{err:?}"
        );
    }

    #[test]
    fn a_revocation_reaches_every_member() {
        let (mut s, g) = group_of(3, 4);
        let inv = s.invite(0, g, 5).unwrap();
        s.deliver_all();
        let fx = s.engines[2].revoke_invite(g, inv.id(), s.now_ms).unwrap();
        s.apply(2, fx);
        s.deliver_all();
        for i in 0..3 {
            assert!(record(&s, i, inv.id()).unwrap().revoked, "member {i}");
            assert!(
                s.history[i]
                    .iter()
                    .any(|h| h.kind == EntryKind::InviteRevoked(inv.id()))
            );
        }
        let err = s.join(3, 0, &inv).unwrap_err();
        assert!(
            matches!(err, GroupError::JoinRejected(JoinRejection::Revoked)),
            "{err:?}"
        );
    }

    /// A new member is told of ended invites too (until they expire), so it can tell a
    /// joiner why a link ended instead of "unknown invite".
    #[test]
    fn ended_invites_are_shared_with_a_new_member() {
        let (mut s, g) = group_of(2, 4);
        // The simulator's secrets follow its clock: one invite per millisecond.
        let used = s.invite(0, g, 1).unwrap();
        s.now_ms += 1;
        let revoked = s.invite(0, g, 5).unwrap();
        s.now_ms += 1;
        let short = s.invite(0, g, 5).unwrap();
        s.deliver_all();
        let fx = s.engines[0]
            .revoke_invite(g, revoked.id(), s.now_ms)
            .unwrap();
        s.apply(0, fx);
        s.deliver_all();
        // Member 2 joins with the one-use link: it is used up now.
        s.join(2, 0, &used).unwrap();
        s.deliver_all();
        // `short` has expired by the time member 0 shares the states.
        let mut records = s.invites[0].clone();
        for r in &mut records {
            if r.id == short.id() {
                r.expires_at = s.now_ms / 1000;
            }
        }
        let fx = s.engines[0]
            .share_invite_states(g, &records, s.now_ms)
            .unwrap();
        s.apply(0, fx);
        s.deliver_all();
        let now = s.now_ms / 1000;
        let r = record(&s, 2, used.id()).expect("the used-up invite is shared");
        assert_eq!(r.admits(now), Err(JoinRejection::UsedUp));
        let r = record(&s, 2, revoked.id()).expect("the revoked invite is shared");
        assert_eq!(r.admits(now), Err(JoinRejection::Revoked));
        assert!(
            record(&s, 2, short.id()).is_none(),
            "an expired invite is not shared"
        );
        // So member 2 refuses with the reason, like the inviter would.
        let err = s.join(3, 2, &used).unwrap_err();
        assert!(
            matches!(err, GroupError::JoinRejected(JoinRejection::UsedUp)),
            "{err:?}"
        );
    }

    #[test]
    fn approval_flag_is_shared() {
        let (mut s, g) = group_of(2, 2);
        let (inv, fx) = s.engines[1]
            .create_invite(
                g,
                NewInvite {
                    addrs: Vec::new(),
                    secret: [9; 32],
                    expires_at: T0_MS / 1000 + 60,
                    max_uses: 3,
                    approval: true,
                },
                T0_MS,
            )
            .unwrap();
        s.apply(1, fx);
        s.deliver_all();
        let r = record(&s, 0, inv.id()).unwrap();
        assert!(r.approval);
        assert_eq!(r.creator, Some(s.peer(1)));
        assert_eq!(r.expires_at, T0_MS / 1000 + 60);
    }

    #[test]
    fn create_invite_checks_uses() {
        let (mut s, g) = group_of(1, 1);
        for uses in [0, MAX_INVITE_USES + 1] {
            let err = s.engines[0]
                .create_invite(
                    g,
                    NewInvite {
                        addrs: Vec::new(),
                        secret: [1; 32],
                        expires_at: T0_MS / 1000 + 60,
                        max_uses: uses,
                        approval: false,
                    },
                    T0_MS,
                )
                .unwrap_err();
            assert!(matches!(err, GroupError::InvalidInput(_)), "{err:?}");
        }
    }

    #[test]
    fn merging_updates_in_any_order_gives_one_record() {
        let group = GroupId([1; 32]);
        let id = InviteId::of(&[2; 32]);
        let created = InviteUpdate::Created {
            group,
            id,
            secret_hash: [2; 32],
            expires_at: 100,
            max_uses: 3,
            approval: false,
            creator: crate::testing::member_key(0).public().to_peer_id(),
            created_at: 10,
        };
        let used = InviteUpdate::Used { group, id };
        let revoked = InviteUpdate::Revoked { group, id };
        let orders = [
            vec![&created, &used, &used, &revoked],
            vec![&used, &revoked, &created, &used],
            vec![&revoked, &used, &used, &created],
            vec![&used, &created, &revoked, &used],
        ];
        let records: Vec<InviteRecord> = orders
            .iter()
            .map(|o| {
                o.iter()
                    .fold(None, |r, u| Some(InviteRecord::merge(r, u)))
                    .unwrap()
            })
            .collect();
        for r in &records {
            assert_eq!(r, &records[0]);
        }
        assert_eq!((records[0].uses, records[0].revoked), (2, true));
        assert_eq!(records[0].secret_hash, Some([2; 32]));
        // Before the creation is known, nobody is admitted.
        let early = InviteRecord::merge(None, &used);
        assert_eq!(early.admits(0), Err(JoinRejection::UnknownInvite));
    }

    #[test]
    fn commit_notes_decode_only_what_they_know() {
        let id = InviteId([7; 32]);
        let note = CommitNote::InviteUse(id);
        assert_eq!(CommitNote::decode(&note.encode()), Some(note.clone()));
        assert_eq!(note.encode()[0], 0, "tag 00");
        assert_eq!(CommitNote::decode(&[]), None);
        assert_eq!(CommitNote::decode(&[9, 1, 2]), None);
        assert_eq!(CommitNote::decode(&vec![0; 4096]), None);
        assert_eq!(used_invite(GroupId([1; 32]), b"garbage"), None);
    }

    #[test]
    fn awaiting_approval_is_not_a_welcome() {
        let (mut s, g) = group_of(1, 2);
        let inv = s.invite(0, g, 1).unwrap();
        let err = s.engines[1]
            .handle_join_response(&inv, JoinResponse::AwaitingApproval { request: 1 }, T0_MS)
            .unwrap_err();
        assert!(matches!(err, GroupError::BadWelcome(_)), "{err:?}");
        assert!(s.engines[1].groups().is_empty());
    }
}
