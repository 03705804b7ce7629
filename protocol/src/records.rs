//! What the group engine asks the node to keep: group metadata, history entries and raw
//! envelopes. They are produced as [`crate::group::Effect`]s and written by the node's store in
//! the same transaction as the MLS state change that produced them.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::envelope::PayloadKind;
use crate::files::FileRef;
use crate::ids::{GroupId, InviteId, MessageId};

/// A group this node is a member of, as listed to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// The group.
    pub id: GroupId,
    /// Display name chosen by the creator.
    pub name: String,
    /// When this node created or joined the group, milliseconds since the Unix epoch.
    pub joined_at_ms: u64,
}

/// One line of a group's history as this node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The group.
    pub group: GroupId,
    /// Id of the envelope that carried it (for local events, the id of the commit envelope).
    pub id: MessageId,
    /// MLS epoch it was sent in.
    pub epoch: u64,
    /// The member who sent it.
    pub sender: PeerId,
    /// Sender's clock at sending, milliseconds since the Unix epoch (display only).
    pub sent_at_ms: u64,
    /// This node's clock when it arrived, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// What happened.
    pub kind: EntryKind,
}

/// What a history entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A text message.
    Text(String),
    /// The group was created by `sender`.
    GroupCreated {
        /// The group's name at creation.
        name: String,
    },
    /// `sender` added these members (by PeerId).
    MembersAdded(Vec<PeerId>),
    /// `sender` removed these members.
    MembersRemoved(Vec<PeerId>),
    /// `sender` created an invite that any member may honour.
    InviteCreated {
        /// The invite.
        id: InviteId,
        /// Joins allowed.
        max_uses: u32,
        /// Expiry, Unix seconds.
        expires_at: u64,
        /// Joins wait for approval.
        approval: bool,
    },
    /// `sender` revoked an invite.
    InviteRevoked(InviteId),
    /// This node (the PeerId) joined the group through a Welcome from `sender`. Added after
    /// the others (tag 06); earlier versions recorded a join as `MembersAdded`.
    Joined(PeerId),
    /// A text with a stable id (tag 07; earlier versions recorded texts as `Text`): the
    /// stable id lets its sender edit or delete it, and a reply names the message it answers.
    Post {
        /// The text (empty once deleted).
        text: String,
        /// The sender's stable id of the message ([`crate::group::text_history_id`] of the
        /// sender and this is the entry's id).
        stable: MessageId,
        /// The history id of the message it answers.
        reply_to: Option<MessageId>,
    },
    /// `sender` put (`on`) or took back its reaction `emoji` on the message `to`. Not a line
    /// of its own: it is shown on its target (see [`EntryKind::target`]).
    Reaction {
        /// The message reacted to.
        to: MessageId,
        /// The emoji.
        emoji: String,
        /// Put or taken back.
        on: bool,
    },
    /// `sender` replaced the text of its message `target` (empty once the target is
    /// deleted). Shown on its target.
    Edit {
        /// The message edited.
        target: MessageId,
        /// The new text.
        text: String,
    },
    /// `sender` deleted its message `target`. Shown on its target, as a tombstone.
    Delete {
        /// The message deleted.
        target: MessageId,
    },
    /// A file or picture (tag 11). Its caption is its text: edits change it, a delete
    /// blanks it and removes the file (the node then forgets the key and the content).
    File {
        /// What the sender sent.
        file: Box<FileRef>,
        /// The sender's stable id of the message, as in [`EntryKind::Post`].
        stable: MessageId,
    },
}

impl EntryKind {
    /// The text of a text message (`Text` or `Post`).
    pub fn text(&self) -> Option<&str> {
        match self {
            EntryKind::Text(t) | EntryKind::Post { text: t, .. } => Some(t),
            EntryKind::File { file, .. } => Some(&file.caption),
            _ => None,
        }
    }

    /// The message a reaction, edit or delete applies to: such entries are not lines of
    /// history of their own but change how their target is shown.
    pub fn target(&self) -> Option<MessageId> {
        match self {
            EntryKind::Reaction { to: t, .. }
            | EntryKind::Edit { target: t, .. }
            | EntryKind::Delete { target: t } => Some(*t),
            _ => None,
        }
    }

    /// Whether the entry records a commit (members added or removed). Every member records
    /// a commit under the same id but at its own time, so the canonical history order puts
    /// commit entries at the end of their epoch (`epoch`, then `sent_at_ms` = `u64::MAX`)
    /// rather than at a time members disagree on.
    pub fn is_commit(&self) -> bool {
        matches!(
            self,
            EntryKind::MembersAdded(_) | EntryKind::MembersRemoved(_)
        )
    }
}

/// A raw envelope kept to serve history to other members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    /// Its id (hash of `bytes`).
    pub id: MessageId,
    /// Its group.
    pub group: GroupId,
    /// Its epoch.
    pub epoch: u64,
    /// What it carries.
    pub kind: PayloadKind,
    /// The encoded envelope exactly as received or sent.
    pub bytes: Vec<u8>,
    /// Arrival time at this node, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
}
