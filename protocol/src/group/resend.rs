//! Re-send on request: a member that cannot decrypt a text (its epoch's keys are deleted,
//! or its generation fell out of the window) asks the group for it by envelope id, and its
//! sender encrypts it again in the current epoch under the same stable id.
//!
//! Both sides keep their part in small Kith records, written in the transaction that
//! learnt of it, so a crash between asking and answering loses nothing:
//! - the asker's *wanted* list: envelope ids, how often they were asked for, when next;
//! - the sender's *owed* list: envelope ids of its own texts that a member asked for;
//! - the sender's index from an envelope id to the kept copy of its text
//!   ([`fork::index_sent`]);
//! - the sender's *last add*: the first epoch of the newest member it saw added. A text is
//!   sent again in the clear (inside the group's current epoch) only if nobody joined after
//!   its epoch: a member must not read what was said before it joined. Otherwise it is sent
//!   sealed ([`Body::SealedResent`]) under its epoch's *re-send key*, which only members of
//!   that epoch hold; without that key it is not sent. A node that joins again (a new
//!   Welcome) forgets its kept texts ([`fork::forget_group`]): it may not have seen who was
//!   added meanwhile.
//! - every member's re-send keys: 32 bytes per epoch it was in, derived from the MLS
//!   exporter secret when it entered the epoch ([`note_epoch_key`]), kept for the newest
//!   [`RESEND_KEY_EPOCHS`] epochs. They outlive the epoch's own secrets, which go 30 s after
//!   the epoch ended: a member that lost a text's epoch can still read the sealed copy.

use openmls::prelude::MlsGroup;
use openmls_traits::OpenMlsProvider;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::AeadType;

use super::local::encrypt_app;
use super::state::active_group;
use super::{Effect, GroupEngine, GroupError, mls_err};
use crate::codec;
use crate::envelope::{
    AppContent, AppContentV1, AppContentV2, Body, MAX_RESEND_REQUEST_IDS, PayloadKind,
    RESEND_KEY_LABEL, Resent, ResentChat, SealedResent,
};
use crate::fork::{self, GroupRecords, Said};
use crate::ids::{GroupId, MessageId};
use crate::records::StoredEnvelope;

/// Envelope ids a member keeps asking for, per group; beyond it the oldest are dropped.
pub const MAX_WANTED: usize = 1024;
/// Envelope ids a sender keeps to answer, per group.
pub const MAX_OWED: usize = 1024;
/// When the asker asks again for an envelope nobody sent again yet, after its first
/// request: 1 min, 10 min, 1 h; then it gives up (the envelope stays counted as
/// undecryptable).
pub const ASK_AGAIN_MS: [u64; 3] = [60_000, 600_000, 3_600_000];

fn wanted_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"resend-wanted", group, &[])
}

fn owed_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"resend-owed", group, &[])
}

fn last_add_key(group: &GroupId) -> Vec<u8> {
    fork::kith_key(b"last-add", group, &[])
}

/// Epochs whose re-send keys a member keeps (the newest; 32 bytes each).
pub const RESEND_KEY_EPOCHS: u64 = 256;

fn epoch_key_key(group: &GroupId, epoch: u64) -> Vec<u8> {
    fork::kith_key(b"resend-key", group, &[&epoch.to_be_bytes()])
}

/// The context of the re-send key of `group`'s `epoch`.
fn epoch_key_context(group: &GroupId, epoch: u64) -> Vec<u8> {
    let mut c = group.as_bytes().to_vec();
    c.extend_from_slice(&epoch.to_be_bytes());
    c
}

/// The associated data of a sealed text: the first envelope's id and its epoch.
fn sealed_aad(envelope: &MessageId, epoch: u64) -> Vec<u8> {
    let mut aad = envelope.as_bytes().to_vec();
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad
}

/// Derives and keeps the re-send key of the epoch `mls` is in now (call it whenever the
/// group enters an epoch: created, joined, a commit merged); drops the key
/// [`RESEND_KEY_EPOCHS`] epochs older. Staged with the caller's writes.
pub(super) fn note_epoch_key<P: OpenMlsProvider>(
    provider: &P,
    group: &GroupId,
    mls: &MlsGroup,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    if !mls.is_active() {
        // Removed by this commit: no epoch of its own to keep a key for.
        return Ok(());
    }
    let epoch = mls.epoch().as_u64();
    let key = mls
        .export_secret(
            provider.crypto(),
            RESEND_KEY_LABEL,
            &epoch_key_context(group, epoch),
            32,
        )
        .map_err(mls_err)?;
    let s = provider.storage();
    s.put_kith(&epoch_key_key(group, epoch), Some(&key))
        .map_err(mls_err)?;
    if let Some(old) = epoch.checked_sub(RESEND_KEY_EPOCHS) {
        s.put_kith(&epoch_key_key(group, old), None)
            .map_err(mls_err)?;
    }
    Ok(())
}

fn epoch_key<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<Option<Vec<u8>>, GroupError> {
    Ok(s.get_kith(&epoch_key_key(group, epoch))
        .map_err(mls_err)?
        .filter(|k| k.len() == 32))
}

/// Opens a sealed re-send of `group` with this node's re-send key of its epoch: `None` if
/// this node has no key for that epoch (it was not in it, or not on this branch of it, or
/// the key is gone) or the seal does not open. The plaintext is a UTF-8 text
/// ([`Body::SealedResent`]) or a codec-encoded chat message ([`Body::SealedResentChat`]).
pub(super) fn open_sealed<P: OpenMlsProvider>(
    provider: &P,
    group: &GroupId,
    sealed: &SealedResent,
) -> Result<Option<Vec<u8>>, GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let Some(key) = epoch_key(provider.storage(), group, sealed.epoch)? else {
        return Ok(None);
    };
    let Ok(plain) = provider.crypto().aead_decrypt(
        AeadType::ChaCha20Poly1305,
        &key,
        &sealed.sealed,
        &sealed.nonce,
        &sealed_aad(&sealed.envelope, sealed.epoch),
    ) else {
        return Ok(None);
    };
    Ok(Some(plain))
}

/// One envelope the asker wants: how many requests named it, and when to ask next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wanted {
    envelope: MessageId,
    asked: u32,
    next_ms: u64,
}

fn decode_wanted(bytes: &[u8]) -> Vec<Wanted> {
    bytes
        .chunks_exact(44)
        .filter_map(|c| {
            Some(Wanted {
                envelope: MessageId::from_slice(&c[..32])?,
                asked: u32::from_be_bytes(c[32..36].try_into().ok()?),
                next_ms: u64::from_be_bytes(c[36..44].try_into().ok()?),
            })
        })
        .collect()
}

fn encode_wanted(list: &[Wanted]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len() * 44);
    for w in list {
        out.extend_from_slice(w.envelope.as_bytes());
        out.extend_from_slice(&w.asked.to_be_bytes());
        out.extend_from_slice(&w.next_ms.to_be_bytes());
    }
    out
}

fn decode_ids(bytes: &[u8]) -> Vec<MessageId> {
    bytes
        .chunks_exact(32)
        .filter_map(MessageId::from_slice)
        .collect()
}

fn encode_ids(ids: &[MessageId]) -> Vec<u8> {
    ids.iter().flat_map(|i| *i.as_bytes()).collect()
}

fn read<S: GroupRecords>(s: &S, key: &[u8]) -> Result<Vec<u8>, GroupError> {
    Ok(s.get_kith(key).map_err(mls_err)?.unwrap_or_default())
}

fn write<S: GroupRecords>(s: &S, key: &[u8], bytes: Vec<u8>) -> Result<(), GroupError> {
    let value = if bytes.is_empty() { None } else { Some(bytes) };
    s.put_kith(key, value.as_deref()).map_err(mls_err)
}

/// Notes that members were added to `group` and are members from `epoch` on.
pub(super) fn note_added<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    epoch: u64,
) -> Result<(), GroupError> {
    if last_added(s, group)? < epoch {
        s.put_kith(&last_add_key(group), Some(&epoch.to_be_bytes()))
            .map_err(mls_err)?;
    }
    Ok(())
}

fn last_added<S: GroupRecords>(s: &S, group: &GroupId) -> Result<u64, GroupError> {
    Ok(s.get_kith(&last_add_key(group))
        .map_err(mls_err)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// A member asked for the envelopes `ids`: keeps those that carried this node's own texts,
/// to send again at the next [`GroupEngine::resend_tick`].
pub(super) fn note_asked<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    ids: &[MessageId],
) -> Result<usize, GroupError> {
    let mut owed = decode_ids(&read(s, &owed_key(group))?);
    let before = owed.len();
    for id in ids {
        if !owed.contains(id) && fork::is_indexed(s, group, id).map_err(mls_err)? {
            owed.push(*id);
        }
    }
    let added = owed.len() - before;
    if added > 0 {
        let excess = owed.len().saturating_sub(MAX_OWED);
        owed.drain(..excess);
        write(s, &owed_key(group), encode_ids(&owed))?;
    }
    Ok(added)
}

/// A text this node wanted arrived again: it need not ask for `envelope` any more.
/// Returns whether it had asked.
pub(super) fn received_again<S: GroupRecords>(
    s: &S,
    group: &GroupId,
    envelope: &MessageId,
) -> Result<bool, GroupError> {
    let mut wanted = decode_wanted(&read(s, &wanted_key(group))?);
    let before = wanted.len();
    wanted.retain(|w| w.envelope != *envelope);
    if wanted.len() == before {
        return Ok(false);
    }
    write(s, &wanted_key(group), encode_wanted(&wanted))?;
    Ok(true)
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// This node cannot decrypt the application envelopes `ids` of `group` (the caller has
    /// ruled out that it holds them): ask their sender to send them again, at the next
    /// [`GroupEngine::resend_tick`]. The writes are staged with the caller's.
    pub fn want_resend(&mut self, group: GroupId, ids: &[MessageId]) -> Result<(), GroupError> {
        if ids.is_empty() || !self.groups.contains_key(&group) {
            return Ok(());
        }
        let s = self.provider.storage();
        let mut wanted = decode_wanted(&read(s, &wanted_key(&group))?);
        for id in ids {
            if !wanted.iter().any(|w| w.envelope == *id) {
                wanted.push(Wanted {
                    envelope: *id,
                    asked: 0,
                    next_ms: 0,
                });
            }
        }
        let excess = wanted.len().saturating_sub(MAX_WANTED);
        wanted.drain(..excess);
        write(s, &wanted_key(&group), encode_wanted(&wanted))?;
        self.resend_pending.insert(group);
        Ok(())
    }

    /// [`GroupEngine::want_resend`] for every [`Effect::Undecryptable`] in `effects`, which
    /// the caller has already cleared of envelopes it holds (a copy of a message it read is
    /// refused like a lost one).
    pub fn want_resend_for(&mut self, effects: &[Effect]) -> Result<(), GroupError> {
        let mut lost: std::collections::BTreeMap<GroupId, Vec<MessageId>> = Default::default();
        for e in effects {
            if let Effect::Undecryptable { envelope, .. } = e {
                lost.entry(envelope.group).or_default().push(envelope.id);
            }
        }
        for (group, ids) in lost {
            self.want_resend(group, &ids)?;
        }
        Ok(())
    }

    /// Drops this node's re-send key of `group`'s `epoch` (tests only).
    #[cfg(test)]
    pub(crate) fn forget_epoch_key_for_tests(&mut self, group: &GroupId, epoch: u64) {
        let _ = self
            .provider
            .storage()
            .put_kith(&epoch_key_key(group, epoch), None);
    }

    /// How many envelopes this node still asks for in `group`.
    pub fn wanted_count(&self, group: &GroupId) -> usize {
        self.provider
            .storage()
            .get_kith(&wanted_key(group))
            .ok()
            .flatten()
            .map_or(0, |v| v.len() / 44)
    }

    /// Sends what is due, in every group this node can send in and that is not catching
    /// up: its requests for envelopes it could not decrypt (at most
    /// [`MAX_RESEND_REQUEST_IDS`] per group and tick), and the texts members asked it for.
    /// Call it on every tick; cheap when nothing is due.
    pub fn resend_tick(&mut self, now_ms: u64) -> Result<Vec<Effect>, GroupError> {
        let mut effects = Vec::new();
        let ids: Vec<GroupId> = self.resend_pending.iter().copied().collect();
        for group in ids {
            if !self.groups.contains_key(&group) {
                self.resend_pending.remove(&group);
                continue;
            }
            if self.is_catching_up(&group) || active_group(&mut self.groups, group).is_err() {
                continue;
            }
            let waiting = self.ask(group, now_ms, &mut effects)?;
            self.answer(group, now_ms, &mut effects)?;
            if !waiting {
                self.resend_pending.remove(&group);
            }
        }
        Ok(effects)
    }

    /// Sends the group's due requests; returns whether envelopes are still wanted.
    fn ask(
        &mut self,
        group: GroupId,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<bool, GroupError> {
        let s = self.provider.storage();
        let mut wanted = decode_wanted(&read(s, &wanted_key(&group))?);
        let due: Vec<MessageId> = wanted
            .iter()
            .filter(|w| w.next_ms <= now_ms)
            .map(|w| w.envelope)
            .take(MAX_RESEND_REQUEST_IDS)
            .collect();
        if due.is_empty() {
            return Ok(!wanted.is_empty());
        }
        for w in wanted.iter_mut().filter(|w| due.contains(&w.envelope)) {
            match ASK_AGAIN_MS.get(w.asked as usize) {
                Some(after) => w.next_ms = now_ms.saturating_add(*after),
                None => w.next_ms = u64::MAX,
            }
            w.asked += 1;
        }
        wanted.retain(|w| w.next_ms != u64::MAX);
        write(s, &wanted_key(&group), encode_wanted(&wanted))?;
        tracing::info!(group = %group.short(), envelopes = due.len(), "asking the group to send again what this node cannot decrypt");
        let content = AppContent::V1(AppContentV1 {
            sent_at_ms: now_ms,
            body: Body::ResendRequest(due),
        });
        self.publish_app(group, &content, now_ms, effects)?;
        Ok(!wanted.is_empty())
    }

    fn answer(
        &mut self,
        group: GroupId,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<(), GroupError> {
        let s = self.provider.storage();
        let owed = decode_ids(&read(s, &owed_key(&group))?);
        if owed.is_empty() {
            return Ok(());
        }
        write(s, &owed_key(&group), Vec::new())?;
        let added = last_added(s, &group)?;
        let mut refused = 0usize;
        let mut sent = 0usize;
        let mut sealed = 0usize;
        for envelope in owed {
            let Some(copy) = fork::sent_by_envelope(self.provider.storage(), &group, &envelope)
                .map_err(mls_err)?
            else {
                continue;
            };
            let body = if added > copy.epoch {
                // Someone joined after it was said: they must not read it. Sealed under the
                // epoch's re-send key, only members of that epoch can.
                let Some(key) = epoch_key(self.provider.storage(), &group, copy.epoch)? else {
                    refused += 1;
                    continue;
                };
                let nonce: [u8; 12] = self.provider.rand().random_array().map_err(mls_err)?;
                let plain = match &copy.said {
                    Said::Text(t) => t.as_bytes().to_vec(),
                    Said::Chat(c) => codec::encode(c).map_err(mls_err)?,
                };
                let sealed_text = self
                    .provider
                    .crypto()
                    .aead_encrypt(
                        AeadType::ChaCha20Poly1305,
                        &key,
                        &plain,
                        &nonce,
                        &sealed_aad(&envelope, copy.epoch),
                    )
                    .map_err(mls_err)?;
                sealed += 1;
                let s = SealedResent {
                    epoch: copy.epoch,
                    envelope,
                    nonce,
                    sealed: sealed_text,
                };
                match copy.said {
                    Said::Text(_) => Body::SealedResent(s),
                    Said::Chat(_) => Body::SealedResentChat(s),
                }
            } else {
                match &copy.said {
                    Said::Text(t) => Body::Resent(Resent {
                        epoch: copy.epoch,
                        envelope,
                        text: t.clone(),
                    }),
                    Said::Chat(c) => Body::ResentChat(ResentChat {
                        epoch: copy.epoch,
                        envelope,
                        chat: c.clone(),
                    }),
                }
            };
            let content = AppContent::V2(AppContentV2 {
                id: copy.id,
                sent_at_ms: copy.sent_at_ms,
                body,
            });
            let (id, _) = self.publish_app(group, &content, now_ms, effects)?;
            fork::index_sent(self.provider.storage(), &group, &id, &copy).map_err(mls_err)?;
            effects.push(Effect::LinkEnvelope {
                envelope: id,
                history: super::text_history_id(&self.me.peer, &copy.id),
            });
            sent += 1;
        }
        if sent > 0 || refused > 0 {
            tracing::info!(group = %group.short(), sent, sealed, refused_after_join = refused, "sent texts again that members asked for (sealed for their epoch's members where someone joined since; none whose epoch key is gone)");
        }
        Ok(())
    }

    /// Encrypts `content` in `group`'s current epoch; pushes the effects that store and
    /// publish it. Returns its envelope id and epoch.
    fn publish_app(
        &mut self,
        group: GroupId,
        content: &AppContent,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<(MessageId, u64), GroupError> {
        let g = active_group(&mut self.groups, group)?;
        let (epoch, data, id) = encrypt_app(&self.provider, &self.me.signer, group, g, content)?;
        effects.push(Effect::SaveEnvelope(StoredEnvelope {
            id,
            group,
            epoch,
            kind: PayloadKind::Application,
            bytes: data.clone(),
            received_at_ms: now_ms,
        }));
        effects.push(Effect::Publish {
            topic: g.topic,
            data,
        });
        Ok((id, epoch))
    }
}
