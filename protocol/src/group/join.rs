//! Joining a group by invite, both sides: the joiner's request and the Welcome it gets,
//! the member's answer (an Add commit), and what a joiner does when the commit that added
//! it lost to a concurrent one.

use libp2p_identity::PeerId;
use openmls::prelude::{
    KeyPackage, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn,
    PURE_CIPHERTEXT_WIRE_FORMAT_POLICY, SenderRatchetConfiguration, StagedWelcome,
    tls_codec::{Deserialize as _, Serialize as _},
};
use openmls_traits::OpenMlsProvider;

use super::branch::{checkpoint, note_applied};
use super::members::bound_peer;
use super::state::{Group, Source, hold_orphan, hold_pending};
use super::{
    CIPHERSUITE, Effect, GroupEngine, GroupError, LostJoin, MAX_PAST_EPOCHS, invites, mls_err,
};
use crate::envelope::{
    Envelope, JoinRejection, JoinRequest, JoinRequestV1, JoinResponse, MAX_GROUP_NAME_BYTES,
    PayloadKind,
};
use crate::fork::{self, Applied, Branch, GroupRecords, Joined, OwnChange};
use crate::ids::{GroupId, InviteId, MessageId};
use crate::invite::{Invite, InviteRecord, InviteUpdate};
use crate::order::{MAX_FORWARD_DISTANCE, OUT_OF_ORDER_TOLERANCE};
use crate::records::{EntryKind, GroupMeta, HistoryEntry, StoredEnvelope};
use crate::seal::SealKey;

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

/// Where a Welcome comes from: the group it must be for, what to show if the member's answer
/// lacks a name or sender, and the link (for a join by invite).
pub(super) struct WelcomeSource {
    pub(super) group: GroupId,
    pub(super) fallback_name: String,
    pub(super) fallback_sender: PeerId,
    pub(super) link: Option<String>,
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Makes the join request for `invite`: a fresh key package (its private keys are staged
    /// in storage; the caller commits them before sending).
    pub fn prepare_join(
        &mut self,
        invite: &Invite,
        now_ms: u64,
    ) -> Result<JoinRequest, GroupError> {
        invite.check(&self.network, now_ms / 1000)?;
        if self
            .groups
            .get(&invite.group)
            .is_some_and(|g| !g.lifecycle.rejoining())
        {
            return Err(GroupError::AlreadyMember(invite.group));
        }
        let key_package = self.fresh_key_package()?;
        Ok(JoinRequest::V1(JoinRequestV1 {
            network: self.network.clone(),
            group: invite.group,
            secret: invite.secret,
            key_package,
        }))
    }

    /// A new TLS-encoded key package of this node (its private keys go to storage).
    pub(super) fn fresh_key_package(&self) -> Result<Vec<u8>, GroupError> {
        let bundle = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.me.signer,
                self.me.credential.clone(),
            )
            .map_err(mls_err)?;
        bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(mls_err)
    }

    /// Answers a join request from `from` (transport-authenticated PeerId). `record` is the
    /// stored invite whose secret hash matches the request, if any. On acceptance the joiner
    /// is added in a commit that is merged here and published to the group.
    pub fn handle_join_request(
        &mut self,
        from: PeerId,
        request: JoinRequest,
        record: Option<InviteRecord>,
        now_ms: u64,
    ) -> Result<(JoinResponse, Vec<Effect>), GroupError> {
        let kp = match self.screen_join_request(from, &request, record.as_ref(), now_ms) {
            Ok(kp) => kp,
            Err(r) => return Ok((JoinResponse::Rejected(r), Vec::new())),
        };
        let JoinRequest::V1(req) = request else {
            return Ok((JoinResponse::Rejected(JoinRejection::Internal), Vec::new()));
        };
        let invite = InviteId::of(&crate::invite::secret_hash(&req.secret));
        self.add_member(req.group, from, kp, req.key_package, Some(invite), now_ms)
    }

    /// Adds `from` with key package `kp` (already checked; `key_package` is its encoding) in
    /// a commit that names `invite` in its AAD when there is one, merges and publishes it,
    /// and returns the answer for the joiner.
    pub(super) fn add_member(
        &mut self,
        group: GroupId,
        from: PeerId,
        kp: KeyPackage,
        key_package: Vec<u8>,
        invite: Option<InviteId>,
        now_ms: u64,
    ) -> Result<(JoinResponse, Vec<Effect>), GroupError> {
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok((JoinResponse::Rejected(JoinRejection::NotMember), Vec::new()));
        };
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        // The commit names the invite it used, so every member counts the use on merging it.
        if let Some(invite) = invite {
            g.mls
                .set_aad(invites::CommitNote::InviteUse(invite).encode());
        }
        let (commit, welcome, _info) =
            match g.mls.add_members(&self.provider, &self.me.signer, &[kp]) {
                Ok(x) => x,
                Err(e) => {
                    g.mls.set_aad(Vec::new());
                    return Err(mls_err(e));
                }
            };
        if let Err(e) = g.mls.merge_pending_commit(&self.provider) {
            let _ = g.mls.clear_pending_commit(self.provider.storage());
            return Err(mls_err(e));
        }
        let welcome = welcome.tls_serialize_detached().map_err(mls_err)?;
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        let envelope = Envelope::new(group, old_epoch, PayloadKind::Commit, commit);
        let (data, id) = envelope.encode().map_err(mls_err)?;
        note_applied(
            &self.provider,
            group,
            g,
            Applied {
                epoch: old_epoch,
                commit: id,
                own: Some(OwnChange::Add {
                    key_package,
                    invite: invite.map(|i| *i.as_bytes()),
                }),
                invite,
            },
        )?;
        g.sent_since_update = 0;
        g.last_update_ms = Some(now_ms);
        let mut effects: Vec<Effect> = invite
            .map(|id| Effect::Invite(InviteUpdate::Used { group, id }))
            .into_iter()
            .collect();
        effects.extend([
            Effect::SaveEnvelope(StoredEnvelope {
                id,
                group,
                epoch: old_epoch,
                kind: PayloadKind::Commit,
                bytes: data.clone(),
                received_at_ms: now_ms,
            }),
            Effect::Record(HistoryEntry {
                group,
                id,
                epoch: old_epoch,
                sender: self.me.peer,
                sent_at_ms: now_ms,
                received_at_ms: now_ms,
                kind: EntryKind::MembersAdded(vec![from]),
            }),
            Effect::EpochChanged {
                group,
                epoch: g.epoch(),
                member_count: g.member_count(),
            },
            Effect::Publish {
                topic: g.topic,
                data,
            },
        ]);
        Ok((
            JoinResponse::Admitted {
                welcome,
                group_name: g.meta.name.clone(),
                commit: id,
            },
            effects,
        ))
    }

    /// A member says this node is not in `group` (it refused a sync request). If this node
    /// joined recently, the commit that added it may have lost to a concurrent one that the
    /// node never received: returns [`Effect::JoinLost`] so the caller asks to join again (a
    /// member answers "already a member" if the join stands, see [`GroupEngine::keep_join`]).
    pub fn member_says_not_in(&mut self, group: &GroupId) -> Option<Effect> {
        let g = self.groups.get_mut(group)?;
        let j = g.branch.joined.as_ref()?;
        if !g.lifecycle.settled() || !g.active() {
            return None;
        }
        g.lifecycle.start_rejoining();
        Some(Effect::JoinLost {
            group: *group,
            link: j.link.clone(),
            by: j.by.as_deref().and_then(|b| PeerId::from_bytes(b).ok()),
        })
    }

    /// The member says this node is still in the group: the join did not lose after all.
    pub fn keep_join(&mut self, group: &GroupId) {
        if let Some(g) = self.groups.get_mut(group) {
            g.lifecycle.stop_rejoining();
        }
    }

    /// Joining again after a lost race was refused (`reason`): the group stays, read-only.
    pub fn join_lost(&mut self, group: &GroupId, reason: LostJoin) {
        if let Some(g) = self.groups.get_mut(group) {
            g.lifecycle.lose(reason);
        }
    }

    /// Why joining again after a lost race was refused, if it was.
    pub fn lost_reason(&self, group: &GroupId) -> Option<LostJoin> {
        self.groups
            .get(group)
            .and_then(|g| g.lifecycle.lost().cloned())
    }

    /// Completes a join with the member's answer. On success this node is a member.
    pub fn handle_join_response(
        &mut self,
        invite: &Invite,
        response: JoinResponse,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let (welcome_bytes, group_name, commit) = match response {
            JoinResponse::Rejected(r) => return Err(GroupError::JoinRejected(r)),
            JoinResponse::AwaitingApproval { .. } => {
                return Err(GroupError::BadWelcome(
                    "the member still holds the request for approval".into(),
                ));
            }
            JoinResponse::Accepted {
                welcome,
                group_name,
            } => (welcome, group_name, None),
            JoinResponse::Admitted {
                welcome,
                group_name,
                commit,
            } => (welcome, group_name, Some(commit)),
        };
        let source = WelcomeSource {
            group: invite.group,
            fallback_name: invite.group_name.clone(),
            fallback_sender: invite.inviter,
            link: Some(invite.link().to_owned()),
        };
        self.install_welcome(&source, welcome_bytes, group_name, commit, now_ms)
    }

    /// Sets up a group from a Welcome. If this node is joining the group again (its state
    /// is a dead branch), the old state is replaced, and comes back if anything fails.
    pub(super) fn install_welcome(
        &mut self,
        source: &WelcomeSource,
        welcome_bytes: Vec<u8>,
        group_name: String,
        commit: Option<MessageId>,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let group = source.group;
        let old = match self.groups.get(&group) {
            Some(g) if g.lifecycle.rejoining() => {
                let epoch = g.epoch();
                checkpoint(&self.provider, group, epoch)?;
                self.provider
                    .storage()
                    .replace_group_records(&group, &[])
                    .map_err(mls_err)?;
                self.groups.remove(&group).map(|g| (g, epoch))
            }
            Some(_) => return Err(GroupError::AlreadyMember(group)),
            None => None,
        };
        let mut joined = self.welcome(source, welcome_bytes, group_name, commit, now_ms);
        match (&mut joined, old) {
            (Err(_), Some((g, epoch))) => {
                let storage = self.provider.storage();
                let _ = fork::restore_checkpoint(storage, &group, epoch);
                let _ = fork::delete_checkpoint(storage, &group, epoch);
                self.groups.insert(group, g);
            }
            (Ok((_, effects)), Some((old, _))) => {
                // The fork counters describe this node's history with the group: keep them.
                // Envelopes held for later epochs may be the winning branch's next commits.
                if let Some(g) = self.groups.get_mut(&group) {
                    g.rollbacks = old.rollbacks;
                    g.deep_forks = old.deep_forks;
                    for p in old.pending {
                        hold_pending(g, p.epoch, &p.bytes);
                    }
                    for p in old.orphans {
                        hold_orphan(g, p.epoch, &p.bytes);
                    }
                    g.retry = true;
                }
                // Invite counts from the dead branch go; the new invite states replace them.
                effects.insert(0, Effect::ForgetInvites { group });
                self.drain_pending(group, now_ms, effects, Source::Held);
                self.settle(now_ms, effects);
            }
            _ => {}
        }
        joined
    }

    /// Sets up the group from a member's Welcome (see [`GroupEngine::handle_join_response`]).
    fn welcome(
        &mut self,
        source: &WelcomeSource,
        welcome_bytes: Vec<u8>,
        group_name: String,
        commit: Option<MessageId>,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome_bytes.as_slice())
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(GroupError::BadWelcome("not a Welcome message".into()));
        };
        let staged = StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, None)
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        let sender = staged
            .welcome_sender()
            .ok()
            .and_then(|leaf| bound_peer(leaf.credential(), leaf.signature_key().as_slice()));
        let mls = staged
            .into_group(&self.provider)
            .map_err(|e| GroupError::BadWelcome(e.to_string()))?;
        if mls.group_id().as_slice() != source.group.as_bytes() {
            // Not the group we were invited to: undo.
            let mut mls = mls;
            let _ = mls.delete(self.provider.storage());
            return Err(GroupError::BadWelcome(
                "the Welcome is for a different group than the invite".into(),
            ));
        }
        let id = source.group;
        let mut name = if group_name.len() <= MAX_GROUP_NAME_BYTES {
            group_name
        } else {
            source.fallback_name.clone()
        };
        if name.trim().is_empty() {
            name = source.fallback_name.clone();
        }
        let meta = GroupMeta {
            id,
            name,
            joined_at_ms: now_ms,
        };
        let topic = id.topic(&self.network);
        // Nothing of a previous membership (checkpoints, kept messages) applies any more.
        fork::forget_group(self.provider.storage(), &id).map_err(mls_err)?;
        let since = mls.epoch().as_u64();
        let branch = Branch {
            since,
            applied: Vec::new(),
            joined: commit
                .zip(source.link.clone())
                .map(|(commit, link)| Joined {
                    epoch: since.saturating_sub(1),
                    commit,
                    link,
                    by: sender.map(|p| p.to_bytes()),
                }),
            older: Vec::new(),
        };
        fork::save_branch(self.provider.storage(), &id, &branch).map_err(mls_err)?;
        super::resend::note_epoch_key(&self.provider, &id, &mls)?;
        let group = Group::new(mls, meta.clone(), topic, Some(now_ms), branch);
        let epoch = group.epoch();
        let member_count = group.member_count();
        self.groups.insert(id, group);
        let entry = HistoryEntry {
            group: id,
            id: MessageId::of(&welcome_bytes),
            epoch,
            sender: sender.unwrap_or(source.fallback_sender),
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::Joined(self.me.peer),
        };
        Ok((
            id,
            vec![
                Effect::SaveGroup(meta),
                Effect::Record(entry),
                Effect::EpochChanged {
                    group: id,
                    epoch,
                    member_count,
                },
                Effect::Subscribe(topic, SealKey::of(&self.network, &id)),
            ],
        ))
    }
}
