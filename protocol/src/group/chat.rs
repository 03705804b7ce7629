//! Chat messages in a group (see [`crate::chat`]): sending them, and what a text or chat
//! message records, on the sender and on every receiver alike.
//!
//! Replies, reactions, edits, deletes, profiles and a direct chat's notes are *kept*
//! ([`Chat::is_kept`]): like texts they are re-sent after a rollback and on a member's
//! request, so they reach every member whatever forked or was lost. Receipts, typing and
//! profile lists are not.

use openmls_traits::OpenMlsProvider;

use super::local::{encrypt_app, text_history_id};
use super::state::{Group, active_group};
use super::{Effect, GroupEngine, GroupError, RejectReason, member_peer};
use crate::chat::{Chat, ChatError, ChatV1, Profile, SignedProfile};
use crate::envelope::{AppContent, AppContentV2, Body, PayloadKind};
use crate::fork::{GroupRecords, Said};
use crate::ids::{GroupId, MessageId};
use crate::records::{EntryKind, HistoryEntry, StoredEnvelope};
use libp2p_identity::PeerId;

/// What a text or chat message records once its sender is known (MLS-authenticated).
pub(super) struct Saying<'a> {
    pub group: GroupId,
    /// This node.
    pub me: PeerId,
    /// The sender.
    pub sender: PeerId,
    /// The sender's stable id of the message, if its content has one.
    pub stable: Option<MessageId>,
    /// The envelope that carried it (the history id of a text without a stable id).
    pub envelope: MessageId,
    /// Its place in history.
    pub epoch: u64,
    pub sent_at_ms: u64,
    pub now_ms: u64,
    /// The group as this node holds it (for membership checks).
    pub g: &'a Group,
}

impl Saying<'_> {
    /// The history id of the message.
    pub fn history_id(&self) -> MessageId {
        self.stable
            .map_or(self.envelope, |s| text_history_id(&self.sender, &s))
    }

    fn entry(&self, kind: EntryKind) -> Effect {
        Effect::Record(HistoryEntry {
            group: self.group,
            id: self.history_id(),
            epoch: self.epoch,
            sender: self.sender,
            sent_at_ms: self.sent_at_ms,
            received_at_ms: self.now_ms,
            kind,
        })
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.g
            .mls
            .members()
            .any(|m| member_peer(&m).as_ref() == Some(peer))
    }

    /// The effects of what was said, or why it is refused.
    pub fn effects(&self, said: Said) -> Result<Vec<Effect>, RejectReason> {
        let chat = match said {
            Said::Text(text) => {
                let kind = match self.stable {
                    Some(stable) => EntryKind::Post {
                        text,
                        stable,
                        reply_to: None,
                    },
                    None => EntryKind::Text(text),
                };
                return Ok(vec![self.entry(kind)]);
            }
            Said::Chat(c) => c,
        };
        chat.check().map_err(RejectReason::Chat)?;
        let Some(stable) = self.stable else {
            return Err(RejectReason::Chat(ChatError::Bounds(
                "a chat message without a stable id".into(),
            )));
        };
        let Chat::V1(op) = chat;
        let own = |target: &MessageId, of: &MessageId| {
            if text_history_id(&self.sender, of) == *target {
                Ok(())
            } else {
                Err(RejectReason::NotAuthor)
            }
        };
        Ok(match op {
            ChatV1::Reply { to, text } => vec![self.entry(EntryKind::Post {
                text,
                stable,
                reply_to: Some(to),
            })],
            ChatV1::File(file) => vec![self.entry(EntryKind::File { file, stable })],
            ChatV1::React { to, emoji, on } => {
                vec![self.entry(EntryKind::Reaction { to, emoji, on })]
            }
            ChatV1::Edit {
                target,
                stable: of,
                text,
            } => {
                own(&target, &of)?;
                vec![self.entry(EntryKind::Edit { target, text })]
            }
            ChatV1::Delete { target, stable: of } => {
                own(&target, &of)?;
                vec![self.entry(EntryKind::Delete { target })]
            }
            ChatV1::Profile(p) => {
                let owner = p.verify().map_err(RejectReason::Chat)?;
                if owner != self.sender {
                    return Err(RejectReason::Chat(ChatError::NotOwner));
                }
                vec![Effect::Profile {
                    group: self.group,
                    owner,
                    profile: p,
                }]
            }
            ChatV1::Profiles(list) => {
                let mut out = Vec::with_capacity(list.len());
                for p in list {
                    let owner = p.verify().map_err(RejectReason::Chat)?;
                    if !self.is_member(&owner) {
                        // Not (any more) a member here: nothing of theirs to show.
                        continue;
                    }
                    out.push(Effect::Profile {
                        group: self.group,
                        owner,
                        profile: p,
                    });
                }
                out
            }
            ChatV1::Receipt { up_to } => vec![Effect::Receipt {
                group: self.group,
                peer: self.sender,
                up_to,
                sent_at_ms: self.sent_at_ms,
            }],
            ChatV1::Typing => vec![Effect::Typing {
                group: self.group,
                peer: self.sender,
                sent_at_ms: self.sent_at_ms,
            }],
            ChatV1::Direct { with } => {
                let with = PeerId::from_bytes(&with)
                    .map_err(|_| RejectReason::Chat(ChatError::Bounds("not a PeerId".into())))?;
                // A direct chat is two people; a note naming a third party, or sent in a
                // larger group, is not one.
                let other = if self.me == with {
                    Some(self.sender)
                } else if self.me == self.sender {
                    Some(with)
                } else {
                    None
                };
                match other {
                    Some(other) if self.g.mls.members().count() <= 2 && other != self.me => {
                        vec![Effect::Direct {
                            group: self.group,
                            peer: other,
                        }]
                    }
                    _ => Vec::new(),
                }
            }
            ChatV1::DirectOffer { to, link } => {
                if PeerId::from_bytes(&to).ok() == Some(self.me) && self.sender != self.me {
                    vec![Effect::DirectOffer {
                        group: self.group,
                        from: self.sender,
                        link,
                    }]
                } else {
                    Vec::new()
                }
            }
        })
    }
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Sends a chat message. Kept ones ([`Chat::is_kept`]) are sent like a text (kept for
    /// re-sending, recorded in history where they have a line); an edit or delete must name
    /// one of this node's own messages. Returns the history entry, if the message has one.
    pub fn send_chat(
        &mut self,
        group: GroupId,
        chat: Chat,
        now_ms: u64,
    ) -> Result<(Option<HistoryEntry>, Vec<Effect>), GroupError> {
        chat.check()
            .map_err(|e| GroupError::InvalidInput(e.to_string()))?;
        if let ChatV1::Edit { target, stable, .. } | ChatV1::Delete { target, stable } = chat.v1()
            && text_history_id(&self.me.peer, stable) != *target
        {
            return Err(GroupError::InvalidInput(ChatError::NotAuthor.to_string()));
        }
        let stable = self.fresh_stable(group, b"kith/chat", &[], now_ms)?;
        if chat.is_kept() {
            return self.send_content(group, stable, now_ms, Said::Chat(chat), now_ms);
        }
        let g = active_group(&mut self.groups, group)?;
        let content = AppContent::V2(AppContentV2 {
            id: stable,
            sent_at_ms: now_ms,
            body: Body::Chat(chat),
        });
        let (epoch, data, id) = encrypt_app(&self.provider, &self.me.signer, group, g, &content)?;
        Ok((
            None,
            vec![
                Effect::SaveEnvelope(StoredEnvelope {
                    id,
                    group,
                    epoch,
                    kind: PayloadKind::Application,
                    bytes: data.clone(),
                    received_at_ms: now_ms,
                }),
                Effect::Publish {
                    topic: g.topic,
                    data,
                },
            ],
        ))
    }

    /// Signs a profile with this node's key.
    pub fn sign_profile(&self, profile: Profile) -> Result<SignedProfile, GroupError> {
        SignedProfile::sign(profile, &self.me.keypair)
            .map_err(|e| GroupError::InvalidInput(e.to_string()))
    }
}
