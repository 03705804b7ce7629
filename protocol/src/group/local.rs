//! What this node does on its own in its groups: create one, send a text, remove a
//! member, leave, refresh its leaf key (a self-update); each merged and published at once.

use libp2p_identity::PeerId;
use openmls::prelude::{
    LeafNodeParameters, MlsGroup, MlsMessageOut, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
    SenderRatchetConfiguration, tls_codec::Serialize as _,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;

use super::branch::{checkpoint, note_applied};
use super::members::{member_peer, removed_peers};
use super::state::{Group, active_group};
use super::{CIPHERSUITE, Effect, GroupEngine, GroupError, MAX_PAST_EPOCHS, UpdatePolicy, mls_err};
use crate::codec;
use crate::envelope::{
    AppContent, AppContentV2, Body, Envelope, MAX_GROUP_NAME_BYTES, MAX_TEXT_BYTES, PayloadKind,
};
use crate::fork::{self, Applied, Branch, GroupRecords, OwnChange, Said, Sent};
use crate::ids::{GroupId, MessageId};
use crate::order::{self, MAX_FORWARD_DISTANCE, OUT_OF_ORDER_TOLERANCE};
use crate::records::{EntryKind, GroupMeta, HistoryEntry, StoredEnvelope};
use crate::seal::SealKey;

/// Merges this node's own pending commit (`commit`, made at `old_epoch`) and returns the
/// effects: the commit envelope stored, removals recorded, the epoch change, the publication.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_own_commit<P: OpenMlsProvider>(
    provider: &P,
    me: PeerId,
    group: GroupId,
    g: &mut Group,
    commit: MlsMessageOut,
    old_epoch: u64,
    own: OwnChange,
    now_ms: u64,
) -> Result<Vec<Effect>, GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let removed = g
        .mls
        .pending_commit()
        .map(|c| removed_peers(&g.mls, c))
        .unwrap_or_default();
    if let Err(e) = g.mls.merge_pending_commit(provider) {
        let _ = g.mls.clear_pending_commit(provider.storage());
        return Err(mls_err(e));
    }
    // Every commit of ours carries an update path: our leaf key is fresh.
    g.sent_since_update = 0;
    g.last_update_ms = Some(now_ms);
    let commit = commit.tls_serialize_detached().map_err(mls_err)?;
    let (data, id) = Envelope::new(group, old_epoch, PayloadKind::Commit, commit)
        .encode()
        .map_err(mls_err)?;
    note_applied(
        provider,
        group,
        g,
        Applied {
            epoch: old_epoch,
            commit: id,
            own: Some(own),
            invite: None,
        },
    )?;
    let mut effects = vec![Effect::SaveEnvelope(StoredEnvelope {
        id,
        group,
        epoch: old_epoch,
        kind: PayloadKind::Commit,
        bytes: data.clone(),
        received_at_ms: now_ms,
    })];
    if !removed.is_empty() {
        effects.push(Effect::Record(HistoryEntry {
            group,
            id: removal_id(&id),
            epoch: old_epoch,
            sender: me,
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::MembersRemoved(removed),
        }));
    }
    effects.push(Effect::EpochChanged {
        group,
        epoch: g.epoch(),
        member_count: g.member_count(),
    });
    effects.push(Effect::Publish {
        topic: g.topic,
        data,
    });
    Ok(effects)
}

/// Encrypts `content` as an application message of `group` in its current epoch and wraps it
/// in an envelope: (epoch, envelope bytes, envelope id).
pub(super) fn encrypt_app<P: OpenMlsProvider>(
    provider: &P,
    signer: &SignatureKeyPair,
    group: GroupId,
    g: &mut Group,
    content: &AppContent,
) -> Result<(u64, Vec<u8>, MessageId), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let seq = order::next_seq(provider.storage(), &group).map_err(mls_err)?;
    let plain = codec::encode(&content.clone().at_seq(seq)).map_err(mls_err)?;
    let epoch = g.epoch();
    let out = g
        .mls
        .create_message(provider, signer, &plain)
        .map_err(mls_err)?;
    g.sent_since_update += 1;
    let mls = out.tls_serialize_detached().map_err(mls_err)?;
    let (data, id) = Envelope::new(group, epoch, PayloadKind::Application, mls)
        .encode()
        .map_err(mls_err)?;
    Ok((epoch, data, id))
}

/// The history id of a text whose sender chose the stable id `stable`: scoped to the
/// (MLS-authenticated) sender, so nobody can overwrite another member's message.
pub fn text_history_id(sender: &PeerId, stable: &MessageId) -> MessageId {
    MessageId(crate::ids::hash_parts(&[
        b"kith/text",
        &sender.to_bytes(),
        stable.as_bytes(),
    ]))
}

/// The history id of the removals in the commit envelope `commit`.
pub fn removal_id(commit: &MessageId) -> MessageId {
    MessageId(crate::ids::hash_parts(&[
        b"kith/removed",
        commit.as_bytes(),
    ]))
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Creates a group with this node as its only member. `id` must be fresh random bytes.
    pub fn create_group(
        &mut self,
        id: GroupId,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
            return Err(GroupError::InvalidInput(format!(
                "group name must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
            )));
        }
        if self.groups.contains_key(&id) {
            return Err(GroupError::AlreadyMember(id));
        }
        let mls = MlsGroup::builder()
            .with_group_id(openmls::group::GroupId::from_slice(id.as_bytes()))
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .with_wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                OUT_OF_ORDER_TOLERANCE,
                MAX_FORWARD_DISTANCE,
            ))
            .build(&self.provider, &self.me.signer, self.me.credential.clone())
            .map_err(mls_err)?;
        let meta = GroupMeta {
            id,
            name: name.to_owned(),
            joined_at_ms: now_ms,
        };
        let topic = id.topic(&self.network);
        let entry = HistoryEntry {
            group: id,
            id: MessageId(crate::ids::hash_parts(&[b"kith/created", id.as_bytes()])),
            epoch: 0,
            sender: self.me.peer,
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            kind: EntryKind::GroupCreated {
                name: name.to_owned(),
            },
        };
        super::resend::note_epoch_key(&self.provider, &id, &mls)?;
        self.groups.insert(
            id,
            Group::new(mls, meta.clone(), topic, Some(now_ms), Branch::default()),
        );
        Ok(vec![
            Effect::SaveGroup(meta),
            Effect::Record(entry),
            Effect::Subscribe(topic, SealKey::of(&self.network, &id)),
        ])
    }

    /// Encrypts and publishes a text message. Returns the history entry for it.
    pub fn send_text(
        &mut self,
        group: GroupId,
        text: &str,
        now_ms: u64,
    ) -> Result<(HistoryEntry, Vec<Effect>), GroupError> {
        if text.is_empty() || text.len() > MAX_TEXT_BYTES {
            return Err(GroupError::InvalidInput(format!(
                "text must be 1 to {MAX_TEXT_BYTES} bytes"
            )));
        }
        let stable = self.fresh_stable(group, b"kith/msg", text.as_bytes(), now_ms)?;
        self.send_content(group, stable, now_ms, Said::Text(text.to_owned()), now_ms)
            .and_then(|(entry, fx)| {
                let entry = entry.ok_or_else(|| {
                    GroupError::InvalidInput("a text without a history entry".into())
                })?;
                Ok((entry, fx))
            })
    }

    /// A new stable id for a message of this node in `group`: a hash of `kind`, the group,
    /// this node, the epoch, the clock, a counter and `extra` (the text, for a text).
    pub(super) fn fresh_stable(
        &mut self,
        group: GroupId,
        kind: &[u8],
        extra: &[u8],
        now_ms: u64,
    ) -> Result<MessageId, GroupError> {
        let epoch = active_group(&mut self.groups, group)?.epoch();
        self.sent_seq += 1;
        Ok(MessageId(crate::ids::hash_parts(&[
            kind,
            group.as_bytes(),
            &self.me.peer.to_bytes(),
            &epoch.to_be_bytes(),
            &now_ms.to_be_bytes(),
            &self.sent_seq.to_be_bytes(),
            extra,
        ])))
    }

    /// Encrypts what was said (a text or a kept chat message) under the stable id `stable`
    /// in the current epoch and keeps it for re-sending (after a rollback, or when a member
    /// asks for it), at most [`fork::MAX_RESEND`] per group. Returns its history entry, if it
    /// has one.
    pub(super) fn send_content(
        &mut self,
        group: GroupId,
        stable: MessageId,
        sent_at_ms: u64,
        said: Said,
        now_ms: u64,
    ) -> Result<(Option<HistoryEntry>, Vec<Effect>), GroupError> {
        let me = self.me.peer;
        let g = active_group(&mut self.groups, group)?;
        let body = match &said {
            Said::Text(t) => Body::Text(t.clone()),
            Said::Chat(c) => Body::Chat(c.clone()),
        };
        let content = AppContent::V2(AppContentV2 {
            id: stable,
            sent_at_ms,
            body,
        });
        let (epoch, data, id) = encrypt_app(&self.provider, &self.me.signer, group, g, &content)?;
        let recorded = super::chat::Saying {
            group,
            me,
            sender: me,
            stable: Some(stable),
            envelope: id,
            epoch,
            sent_at_ms,
            now_ms,
            g: &*g,
        }
        .effects(said.clone())
        .map_err(|e| GroupError::InvalidInput(e.to_string()))?;
        let sent = Sent {
            epoch,
            id: stable,
            sent_at_ms,
            said,
        };
        fork::save_sent(self.provider.storage(), &group, &sent).map_err(mls_err)?;
        fork::index_sent(self.provider.storage(), &group, &id, &sent).map_err(mls_err)?;
        let entry = recorded.iter().find_map(|e| match e {
            Effect::Record(h) => Some(h.clone()),
            _ => None,
        });
        let mut effects = vec![Effect::SaveEnvelope(StoredEnvelope {
            id,
            group,
            epoch,
            kind: PayloadKind::Application,
            bytes: data.clone(),
            received_at_ms: now_ms,
        })];
        if let Some(h) = &entry {
            effects.push(Effect::LinkEnvelope {
                envelope: id,
                history: h.id,
            });
        }
        effects.extend(recorded);
        effects.push(Effect::Publish {
            topic: g.topic,
            data,
        });
        Ok((entry, effects))
    }

    /// Removes `peer` from `group`: commits a Remove, merges it and publishes the commit. The
    /// removed member cannot read anything sent after it. To remove yourself, use
    /// [`GroupEngine::leave_group`].
    pub fn remove_member(
        &mut self,
        group: GroupId,
        peer: PeerId,
        now_ms: u64,
    ) -> Result<Vec<Effect>, GroupError> {
        if peer == self.me.peer {
            return Err(GroupError::InvalidInput(
                "cannot remove yourself; leave the group instead".into(),
            ));
        }
        let g = active_group(&mut self.groups, group)?;
        let leaf = g
            .mls
            .members()
            .find(|m| member_peer(m) == Some(peer))
            .map(|m| m.index)
            .ok_or(GroupError::UnknownMember(peer))?;
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        let (commit, _, _) = match g
            .mls
            .remove_members(&self.provider, &self.me.signer, &[leaf])
        {
            Ok(x) => x,
            Err(e) => {
                let _ = g.mls.clear_pending_commit(self.provider.storage());
                return Err(mls_err(e));
            }
        };
        merge_own_commit(
            &self.provider,
            self.me.peer,
            group,
            g,
            commit,
            old_epoch,
            OwnChange::Remove(peer.to_bytes()),
            now_ms,
        )
    }

    /// Asks to leave `group`: publishes a proposal to remove this node, which another member
    /// must commit (MLS members cannot commit their own removal). The remaining member with
    /// the lowest leaf index commits it when it receives the proposal; until this node sees
    /// that commit it is *leaving*: it sends nothing more to the group. If that member is
    /// offline, the leave waits until it comes back.
    pub fn leave_group(&mut self, group: GroupId, now_ms: u64) -> Result<Vec<Effect>, GroupError> {
        let g = active_group(&mut self.groups, group)?;
        if g.member_count() < 2 {
            return Err(GroupError::InvalidInput(
                "you are the only member; nobody could commit your leaving".into(),
            ));
        }
        let epoch = g.epoch();
        let proposal = g
            .mls
            .leave_group(&self.provider, &self.me.signer)
            .map_err(mls_err)?;
        g.lifecycle.set_leaving(true);
        let mls = proposal.tls_serialize_detached().map_err(mls_err)?;
        let (data, id) = Envelope::new(group, epoch, PayloadKind::Proposal, mls)
            .encode()
            .map_err(mls_err)?;
        Ok(vec![
            Effect::SaveEnvelope(StoredEnvelope {
                id,
                group,
                epoch,
                kind: PayloadKind::Proposal,
                bytes: data.clone(),
                received_at_ms: now_ms,
            }),
            Effect::Publish {
                topic: g.topic,
                data,
            },
        ])
    }

    /// Commits a fresh leaf key for this node in `group` (post-compromise security), merges it
    /// and publishes the commit. Pending self-removal proposals of others are committed too.
    pub fn self_update(&mut self, group: GroupId, now_ms: u64) -> Result<Vec<Effect>, GroupError> {
        let g = active_group(&mut self.groups, group)?;
        let old_epoch = g.epoch();
        checkpoint(&self.provider, group, old_epoch)?;
        let bundle = match g.mls.self_update(
            &self.provider,
            &self.me.signer,
            LeafNodeParameters::default(),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = g.mls.clear_pending_commit(self.provider.storage());
                return Err(mls_err(e));
            }
        };
        let (commit, _, _) = bundle.into_contents();
        merge_own_commit(
            &self.provider,
            self.me.peer,
            group,
            g,
            commit,
            old_epoch,
            OwnChange::Update,
            now_ms,
        )
    }

    /// The active groups where this node is due a self-update under `policy`. Call it on a
    /// timer and [`GroupEngine::self_update`] each. Counters live in memory: after a load,
    /// the time counts from the first call and the message count from zero.
    pub fn due_self_updates(&mut self, now_ms: u64, policy: UpdatePolicy) -> Vec<GroupId> {
        let mut due = Vec::new();
        for (id, g) in &mut self.groups {
            if !g.active() || g.lifecycle.leaving() {
                continue;
            }
            let since = *g.last_update_ms.get_or_insert(now_ms);
            if g.sent_since_update >= policy.after_messages
                || now_ms.saturating_sub(since) >= policy.after_ms
            {
                due.push(*id);
            }
        }
        due
    }
}
