//! Versioned wire types.
//!
//! [`Envelope`] is what travels on a group's gossipsub topic: a small clear header (group,
//! epoch, kind; all of which MLS ciphertext exposes anyway) around one MLS message.
//! [`AppContent`] is the plaintext inside an MLS application message. [`JoinRequest`] and
//! [`JoinResponse`] are the request-response join protocol. Each top-level type is an enum
//! whose variant is the version, so a future version is a new variant, not a silent misparse.

use serde::{Deserialize, Serialize};

use crate::chat::Chat;
use crate::codec::{self, DecodeError, EncodeError};
use crate::ids::{GroupId, InviteId, MessageId};

/// Largest envelope accepted from the network (also the gossipsub maximum transmit size).
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// Largest text body a member may send.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Largest join request (it carries one key package).
pub const MAX_JOIN_REQUEST_BYTES: usize = 16 * 1024;
/// Largest join response (it carries a Welcome with the full ratchet tree).
pub const MAX_JOIN_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest network id.
pub const MAX_NETWORK_ID_BYTES: usize = 64;
/// Longest group name.
pub const MAX_GROUP_NAME_BYTES: usize = 128;

/// What kind of MLS message an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// An MLS commit: moves the group from `epoch` to `epoch + 1`.
    Commit,
    /// An MLS application message (encrypted [`AppContent`]).
    Application,
    /// An MLS proposal.
    Proposal,
}

/// A message on a group topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    /// Version 1.
    V1(EnvelopeV1),
}

/// Version 1 of [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeV1 {
    /// The group this message belongs to.
    pub group: GroupId,
    /// The MLS epoch the message was created in.
    pub epoch: u64,
    /// What the MLS message is.
    pub kind: PayloadKind,
    /// The TLS-encoded `MLSMessage` (RFC 9420 §6).
    pub mls: Vec<u8>,
}

/// An envelope failed to decode or is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope.
    #[error("bad envelope: {0}")]
    Decode(#[from] DecodeError),
}

impl Envelope {
    /// Builds a version-1 envelope.
    pub fn new(group: GroupId, epoch: u64, kind: PayloadKind, mls: Vec<u8>) -> Self {
        Envelope::V1(EnvelopeV1 {
            group,
            epoch,
            kind,
            mls,
        })
    }

    /// The group of the envelope.
    pub fn group(&self) -> GroupId {
        match self {
            Envelope::V1(v) => v.group,
        }
    }

    /// The epoch the envelope was created in.
    pub fn epoch(&self) -> u64 {
        match self {
            Envelope::V1(v) => v.epoch,
        }
    }

    /// The kind of MLS message inside.
    pub fn kind(&self) -> PayloadKind {
        match self {
            Envelope::V1(v) => v.kind,
        }
    }

    /// The MLS message bytes.
    pub fn mls(&self) -> &[u8] {
        match self {
            Envelope::V1(v) => &v.mls,
        }
    }

    /// Encodes the envelope; returns the bytes and their [`MessageId`].
    pub fn encode(&self) -> Result<(Vec<u8>, MessageId), EncodeError> {
        let bytes = codec::encode(self)?;
        let id = MessageId::of(&bytes);
        Ok((bytes, id))
    }

    /// Decodes an envelope received from the network.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Ok(codec::decode(bytes, MAX_ENVELOPE_BYTES)?)
    }
}

/// The plaintext of an MLS application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppContent {
    /// Version 1.
    V1(AppContentV1),
    /// Version 2: adds a stable message id, so a message re-sent after a concurrent commit
    /// lost (see docs/PROTOCOL.md, "Concurrent commits") is recognised as the same message.
    V2(AppContentV2),
    /// Version 3: adds the sender's position (`seq`), so a receiver notices messages it
    /// missed before its MLS ratchet moves past them (see docs/PROTOCOL.md, "No message
    /// lost").
    V3(AppContentV3),
}

/// Version 3 of [`AppContent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppContentV3 {
    /// The sender's count of application messages it encrypted in this group before this
    /// one: consecutive messages of one sender differ by exactly 1. A receiver that sees a
    /// jump knows how many of the sender's messages it has not seen (an upper bound on how
    /// far the sender's MLS ratchet moved since).
    pub seq: u64,
    /// The stable id ([`AppContentV2::id`]), for messages that have one (texts).
    pub id: Option<MessageId>,
    /// Sender's clock at the first send, milliseconds since the Unix epoch (display only).
    pub sent_at_ms: u64,
    /// What was said.
    pub body: Body,
}

/// Version 2 of [`AppContent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppContentV2 {
    /// Chosen by the sender once and kept for every re-send. Receivers scope it to the
    /// MLS-authenticated sender, so a member can only ever name its own messages.
    pub id: MessageId,
    /// Sender's clock at the first send, milliseconds since the Unix epoch (display only).
    pub sent_at_ms: u64,
    /// What was said.
    pub body: Body,
}

/// Version 1 of [`AppContent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppContentV1 {
    /// Sender's clock when sending, milliseconds since the Unix epoch (display only).
    pub sent_at_ms: u64,
    /// What was said.
    pub body: Body,
}

/// The body of an application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// UTF-8 text of at most [`MAX_TEXT_BYTES`].
    Text(String),
    /// The sender created an invite; every member stores it and may honour it.
    InviteCreated(SharedInvite),
    /// The sender revoked the invite with this id; no member honours it any more.
    InviteRevoked(InviteId),
    /// The state of the group's invites, sent by the member that just added someone: a
    /// new member cannot read messages from before it joined, so this is how it learns the
    /// invites created earlier. At most [`MAX_INVITE_STATES`] entries.
    InviteStates(Vec<InviteState>),
    /// The sender could not decrypt these application envelopes (their epoch's keys were
    /// already deleted, or their generation fell out of its window) and asks whoever sent
    /// them to send them again. At most [`MAX_RESEND_REQUEST_IDS`] envelope ids. No history
    /// row (see docs/PROTOCOL.md, "No message lost", re-send on request).
    ResendRequest(Vec<MessageId>),
    /// A text sent again at a member's [`Body::ResendRequest`]: under the same stable id,
    /// placed in history at the epoch it was first sent in.
    Resent(Resent),
    /// [`Body::Resent`] whose text only members of its first epoch can read: sent when a
    /// member joined after that epoch (see [`SealedResent`]).
    SealedResent(SealedResent),
    /// A chat message: a reply, reaction, edit, delete, profile, receipt, typing, or a
    /// direct chat's note (see [`crate::chat`]).
    Chat(Chat),
    /// A kept [`Body::Chat`] sent again at a member's [`Body::ResendRequest`], like
    /// [`Body::Resent`] for a text.
    ResentChat(ResentChat),
    /// [`Body::ResentChat`] sealed for the members of its first epoch, like
    /// [`Body::SealedResent`]; the sealed plaintext is the codec-encoded [`Chat`].
    SealedResentChat(SealedResent),
}

/// See [`Body::ResentChat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResentChat {
    /// The epoch it was first encrypted in.
    pub epoch: u64,
    /// The envelope id of that first copy.
    pub envelope: MessageId,
    /// The chat message, as first sent.
    pub chat: Chat,
}

/// Largest plaintext of an application message (a profile list with avatars is the
/// largest; the envelope that carries it is bounded by [`MAX_ENVELOPE_BYTES`] anyway).
pub const MAX_CONTENT_BYTES: usize = 200 * 1024;

/// Most entries in one [`Body::InviteStates`].
pub const MAX_INVITE_STATES: usize = 256;
/// Most envelope ids in one [`Body::ResendRequest`].
pub const MAX_RESEND_REQUEST_IDS: usize = 256;

/// See [`Body::Resent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resent {
    /// The epoch the text was first encrypted in (its place in history). Receivers refuse
    /// one later than the epoch of the envelope that carries it.
    pub epoch: u64,
    /// The envelope id of that first copy (the one a member asked for).
    pub envelope: MessageId,
    /// The text, as first sent.
    pub text: String,
}

/// See [`Body::SealedResent`]. The text is sealed with ChaCha20-Poly1305 under the epoch's
/// re-send key, which every member derives from the MLS exporter secret while it is in that
/// epoch (label [`RESEND_KEY_LABEL`], context the group id and the epoch, 32 bytes), with
/// the first envelope's id and the epoch as associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedResent {
    /// The epoch the text was first encrypted in.
    pub epoch: u64,
    /// The envelope id of that first copy.
    pub envelope: MessageId,
    /// A fresh nonce.
    pub nonce: [u8; 12],
    /// The sealed UTF-8 text (at most [`MAX_TEXT_BYTES`] plus the 16-byte tag).
    pub sealed: Vec<u8>,
}

/// The MLS exporter label of the per-epoch re-send key ([`SealedResent`]).
pub const RESEND_KEY_LABEL: &str = "kith resend key v1";

/// One invite in [`Body::InviteStates`]: what [`SharedInvite`] says, plus who created it and
/// when, how many joins it has admitted, and whether it was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteState {
    /// The invite as created.
    pub invite: SharedInvite,
    /// The creator's PeerId bytes.
    pub creator: Vec<u8>,
    /// Creation time, Unix seconds (creator's clock).
    pub created_at: u64,
    /// Joins admitted so far.
    pub uses: u32,
    /// A member revoked it.
    pub revoked: bool,
}

/// Most joins one invite may allow.
pub const MAX_INVITE_USES: u32 = 1000;

/// An invite as shared with the group in [`Body::InviteCreated`]: what a member needs to
/// honour it. The creator is the message's MLS-authenticated sender; the id is
/// [`InviteId::of`] the secret hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedInvite {
    /// Hash of the invite's secret (`invite::secret_hash`); the secret never leaves the link.
    pub secret_hash: [u8; 32],
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Joins allowed, 1 to [`MAX_INVITE_USES`].
    pub max_uses: u32,
    /// Joins wait for a member's approval.
    pub approval: bool,
}

impl AppContent {
    /// Decodes and checks the content of an application message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let content: AppContent = codec::decode(bytes, MAX_CONTENT_BYTES)?;
        match content.body() {
            Body::Chat(c) | Body::ResentChat(ResentChat { chat: c, .. }) => match c.check() {
                Ok(()) => Ok(content),
                Err(e) => Err(DecodeError::Malformed(e.to_string())),
            },
            Body::SealedResentChat(s) if s.sealed.len() > MAX_CONTENT_BYTES + 16 => {
                Err(DecodeError::TooLarge {
                    len: s.sealed.len(),
                    limit: MAX_CONTENT_BYTES + 16,
                })
            }
            Body::Text(t) | Body::Resent(Resent { text: t, .. }) if t.len() > MAX_TEXT_BYTES => {
                Err(DecodeError::TooLarge {
                    len: t.len(),
                    limit: MAX_TEXT_BYTES,
                })
            }
            Body::SealedResent(s) if s.sealed.len() > MAX_TEXT_BYTES + 16 => {
                Err(DecodeError::TooLarge {
                    len: s.sealed.len(),
                    limit: MAX_TEXT_BYTES + 16,
                })
            }
            Body::ResendRequest(ids) if ids.is_empty() || ids.len() > MAX_RESEND_REQUEST_IDS => {
                Err(DecodeError::Malformed(format!(
                    "a re-send request names {} envelopes (1 to {MAX_RESEND_REQUEST_IDS})",
                    ids.len()
                )))
            }
            Body::InviteCreated(i) if i.max_uses == 0 || i.max_uses > MAX_INVITE_USES => Err(
                DecodeError::Malformed(format!("invite allows {} uses", i.max_uses)),
            ),
            Body::InviteStates(list)
                if list.len() > MAX_INVITE_STATES
                    || list.iter().any(|s| {
                        s.invite.max_uses == 0
                            || s.invite.max_uses > MAX_INVITE_USES
                            || s.creator.len() > 64
                    }) =>
            {
                Err(DecodeError::Malformed(
                    "invite states out of bounds".to_owned(),
                ))
            }
            _ => Ok(content),
        }
    }

    /// The sender's clock at (first) sending.
    pub fn sent_at_ms(&self) -> u64 {
        match self {
            AppContent::V1(c) => c.sent_at_ms,
            AppContent::V2(c) => c.sent_at_ms,
            AppContent::V3(c) => c.sent_at_ms,
        }
    }

    /// What was said.
    pub fn body(&self) -> &Body {
        match self {
            AppContent::V1(c) => &c.body,
            AppContent::V2(c) => &c.body,
            AppContent::V3(c) => &c.body,
        }
    }

    /// The sender's stable message id (version 2 only).
    pub fn stable_id(&self) -> Option<MessageId> {
        match self {
            AppContent::V1(_) => None,
            AppContent::V2(c) => Some(c.id),
            AppContent::V3(c) => c.id,
        }
    }

    /// The sender's position ([`AppContentV3::seq`]; version 3 only).
    pub fn seq(&self) -> Option<u64> {
        match self {
            AppContent::V3(c) => Some(c.seq),
            _ => None,
        }
    }

    /// The same content as version 3 at the sender's position `seq`.
    pub fn at_seq(self, seq: u64) -> AppContent {
        let (id, sent_at_ms, body) = match self {
            AppContent::V1(c) => (None, c.sent_at_ms, c.body),
            AppContent::V2(c) => (Some(c.id), c.sent_at_ms, c.body),
            AppContent::V3(c) => (c.id, c.sent_at_ms, c.body),
        };
        AppContent::V3(AppContentV3 {
            seq,
            id,
            sent_at_ms,
            body,
        })
    }

    /// Takes the body out.
    pub fn into_body(self) -> Body {
        match self {
            AppContent::V1(c) => c.body,
            AppContent::V2(c) => c.body,
            AppContent::V3(c) => c.body,
        }
    }
}

/// Sent by a joiner to a member over the join request-response protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRequest {
    /// Version 1.
    V1(JoinRequestV1),
    /// A member whose branch lost a fork deeper than the rewind depth asks to be added
    /// again on the winning branch (see docs/PROTOCOL.md, "Concurrent commits").
    Rejoin(RejoinRequestV1),
}

/// See [`JoinRequest::Rejoin`]. The requester proves nothing beyond its transport
/// identity: the member checks that this PeerId is a member on its own branch, and that its
/// branch holds `commit` at `epoch` (the commit the requester saw win).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinRequestV1 {
    /// Network id.
    pub network: String,
    /// The group.
    pub group: GroupId,
    /// The epoch where the requester's branch lost.
    pub epoch: u64,
    /// The winning commit's envelope id at that epoch.
    pub commit: MessageId,
    /// A fresh TLS-encoded MLS KeyPackage of the requester.
    pub key_package: Vec<u8>,
}

/// Version 1 of [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequestV1 {
    /// Network id from the invite.
    pub network: String,
    /// Group from the invite.
    pub group: GroupId,
    /// The invite's one-time secret; the member compares its hash with the stored record.
    pub secret: [u8; 32],
    /// The joiner's TLS-encoded MLS `KeyPackage`; its credential names the joiner's PeerId.
    pub key_package: Vec<u8>,
}

/// A member's answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    /// The joiner was added. `welcome` is the TLS-encoded MLS Welcome message, which carries
    /// the ratchet tree in its GroupInfo extension.
    Accepted {
        /// TLS-encoded `MLSMessage` holding the Welcome.
        welcome: Vec<u8>,
        /// The group's display name.
        group_name: String,
    },
    /// The request was refused; nothing changed in the group.
    Rejected(JoinRejection),
    /// The invite needs a member's approval: the member holds the request. The joiner sends
    /// the same request again later and gets `Accepted` or `Rejected` once it is decided.
    AwaitingApproval {
        /// The held request's id, as the member lists it (`kith join-requests`).
        request: u64,
    },
    /// The joiner was added, like `Accepted`, and `commit` names the Add commit's envelope.
    /// If a concurrent commit for the same epoch wins (docs/PROTOCOL.md, "Concurrent
    /// commits"), the joiner sees it and asks to join again.
    Admitted {
        /// TLS-encoded `MLSMessage` holding the Welcome.
        welcome: Vec<u8>,
        /// The group's display name.
        group_name: String,
        /// Envelope id of the commit that added the joiner.
        commit: MessageId,
    },
}

/// Why a join request was refused. Each variant maps to a distinct user-facing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinRejection {
    /// The invite is not known to this member (wrong secret, or the member has not yet
    /// learned of it); another member may know it.
    #[error("the invite is not known to this member")]
    UnknownInvite,
    /// The invite has expired.
    #[error("the invite has expired")]
    Expired,
    /// The invite has been used as many times as it allows.
    #[error("the invite has been used up")]
    UsedUp,
    /// The request names another network.
    #[error("the request is for another network")]
    WrongNetwork,
    /// This node is not a member of the requested group.
    #[error("the contacted node is not a member of the group")]
    NotMember,
    /// The key package is malformed, invalid, or does not belong to the requesting peer.
    #[error("the key package is invalid or does not belong to the requesting peer")]
    InvalidKeyPackage,
    /// The requester is already a member of the group.
    #[error("the requester is already a member of the group")]
    AlreadyMember,
    /// The member failed to process the request; trying again later may work.
    #[error("the member could not process the request; try again")]
    Internal,
    /// A member revoked the invite.
    #[error("the invite was revoked")]
    Revoked,
    /// A member denied this join request (approval mode).
    #[error("a member denied the join request")]
    Denied,
    /// The member holds too many join requests awaiting approval; try later.
    #[error("the member has too many join requests awaiting approval; try again later")]
    Busy,
    /// The contacted member is not on the branch the requester asks to rejoin.
    #[error("the contacted member is not on the winning branch")]
    OtherBranch,
    /// The requester was removed from the group after the invite was made: a removal is
    /// not undone by the link the removed member joined with (a member can invite them
    /// again with a new link).
    #[error(
        "you were removed from the group after this invite was made; ask a member for a new one"
    )]
    RemovedSinceInvite,
}

impl JoinRequest {
    /// Decodes a request from the network.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(bytes, MAX_JOIN_REQUEST_BYTES)
    }
}

impl JoinResponse {
    /// Decodes a response from the network.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(bytes, MAX_JOIN_RESPONSE_BYTES)
    }
}
