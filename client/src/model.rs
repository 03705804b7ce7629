//! The local API's data model: JSON bodies of requests, responses and live events.
//!
//! Shared by the node's API server (`kith_node::api`) and [`crate::Client`], so both sides
//! agree by construction. Ids are lowercase hex strings; times are milliseconds since the
//! Unix epoch.

use serde::{Deserialize, Serialize};

mod verification;
pub use verification::{KeyChangeInfo, MarkVerifiedRequest, Verification};

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// This node's PeerId.
    pub peer_id: String,
    /// The network id this node belongs to.
    pub network: String,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
    /// Number of peers currently connected.
    pub connected_peers: usize,
    /// The groups this node is a member of.
    pub groups: Vec<GroupSummary>,
    /// Version of the `kith` binary.
    pub version: String,
    /// Whether the node can write to its disk (absent from older nodes: `ok`).
    #[serde(default)]
    pub storage: StorageStatus,
    /// Whether other nodes can dial this one (absent from older nodes: `unknown`).
    #[serde(default)]
    pub reach: ReachInfo,
    /// Connected peers reached only through a relay circuit (absent from older nodes: 0).
    #[serde(default)]
    pub relayed_peers: usize,
    /// This node's display name, if it set a profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Whether other nodes can dial this one, in [`StatusInfo::reach`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReachInfo {
    /// Not known yet (no address confirmed, no probe answered).
    #[default]
    Unknown,
    /// Others dialled these addresses back: directly reachable.
    Direct {
        /// The confirmed addresses, each with its scope (`public`, `lan`, `loopback`).
        addrs: Vec<ScopedAddr>,
    },
    /// Behind NAT, reachable through relays.
    Relayed {
        /// The relays held, with the circuit address others dial.
        relays: Vec<RelayInfo>,
    },
    /// Behind NAT, no relay reservation yet: reachable only by nodes it dials itself.
    BehindNat,
}

/// An address and who can use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedAddr {
    /// The multiaddr.
    pub addr: String,
    /// `public`, `relayed`, `lan` or `loopback`.
    pub scope: String,
}

/// A relay reservation, in [`ReachInfo::Relayed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's PeerId.
    pub peer: String,
    /// The circuit address through it.
    pub addr: String,
}

/// Whether the node can write to its disk, in [`StatusInfo::storage`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StorageStatus {
    /// Writes work.
    #[default]
    Ok,
    /// A write failed (full disk, read-only or failing device): sends and other local writes
    /// are refused, received messages wait with other members, and the node retries by
    /// itself.
    Failing {
        /// When the first write failed (ms since the Unix epoch).
        since_ms: u64,
        /// Why: `disk_full`, `read_only` or `io_error`.
        reason: String,
        /// One line for a human: what happened and what to do.
        message: String,
    },
}

/// A group in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Group id (64 hex characters).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Number of members.
    pub member_count: usize,
    /// Whether this node believes it has the group's history: no envelopes held for a
    /// future epoch, no history sync running, and the last one (if any) completed.
    #[serde(default = "yes")]
    pub in_sync: bool,
    /// Envelopes held for a future epoch, waiting for the commits before them.
    #[serde(default)]
    pub held: usize,
    /// See [`GroupInfo::epoch_auth`].
    #[serde(default)]
    pub epoch_auth: String,
    /// Messages of the group this node holds but can never decrypt (all reasons; see
    /// [`GroupInfo::undecryptable`]).
    #[serde(default)]
    pub undecryptable: u64,
    /// See [`GroupInfo::missing`].
    #[serde(default)]
    pub missing: u64,
    /// See [`GroupInfo::sync_failures`].
    #[serde(default)]
    pub sync_failures: u32,
    /// See [`GroupInfo::rollbacks`].
    #[serde(default)]
    pub rollbacks: u64,
    /// See [`GroupInfo::deep_forks`].
    #[serde(default)]
    pub deep_forks: u64,
    /// See [`GroupInfo::forks_detected`].
    #[serde(default)]
    pub forks_detected: u64,
    /// Set when the group is a direct chat: the other person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<Box<PersonInfo>>,
    /// Whether this node is still a member (false once removed or after leaving).
    #[serde(default = "yes")]
    pub active: bool,
    /// Messages of others after this node's read mark and its own last message, counted up
    /// to [`MAX_UNREAD`].
    #[serde(default)]
    pub unread: u64,
    /// The newest message (a text or a file), for a chats list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<Box<MessageInfo>>,
    /// The message this node marked read up to (`POST …/read`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_up_to: Option<String>,
}

/// The highest [`GroupSummary::unread`] counted; a list shows more as `999+`.
pub const MAX_UNREAD: u64 = 1000;

/// A person as shown: PeerId, display name, and a label that tells apart people with the
/// same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonInfo {
    /// PeerId.
    pub peer_id: String,
    /// Display name from the person's profile (control and bidi characters removed), if
    /// they set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What to show: `Alice (7gtRrqCQ)`, the name and the last 8 characters of the PeerId, or
    /// only those 8 characters without a name.
    pub label: String,
}

/// `GET /v1/groups/{group}`: one group in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group id (64 hex characters).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Members in leaf order.
    pub members: Vec<MemberInfo>,
    /// When this node created or joined the group.
    pub joined_at_ms: u64,
    /// Whether this node is still a member (false once removed or after leaving).
    #[serde(default = "yes")]
    pub active: bool,
    /// Whether this node asked to leave and waits for a member to commit it.
    #[serde(default)]
    pub leaving: bool,
    /// Digest of the current epoch's MLS epoch authenticator (16 hex characters): the same
    /// on every member in the same epoch unless the group forked.
    #[serde(default)]
    pub epoch_auth: String,
    /// Times this node rolled the group back to a winning branch (since it started).
    #[serde(default)]
    pub rollbacks: u64,
    /// Rival commits for epochs too old to roll back to (a fork deeper than the rewind
    /// window; since it started).
    #[serde(default)]
    pub deep_forks: u64,
    /// Times a member's history sync showed it on another branch (since it started).
    #[serde(default)]
    pub forks_detected: u64,
    /// Messages of the group this node holds but can never decrypt, by reason
    /// (`too_old`: newer messages of the same sender were read first and MLS had already
    /// dropped its key; `epoch_gone`: the keys of its epoch were already deleted). Each is a
    /// message lost on this node; the count persists across restarts.
    #[serde(default)]
    pub undecryptable: std::collections::BTreeMap<String, u64>,
    /// Messages of other members this node knows it has not received yet (gaps in their
    /// senders' message counters); a history sync is fetching them.
    #[serde(default)]
    pub missing: u64,
    /// Whether live messages are held while this node catches up on history.
    #[serde(default)]
    pub catching_up: bool,
    /// History syncs of the group that failed in a row (0: the last one completed or none
    /// failed); the next attempt waits longer each time, up to 5 minutes.
    #[serde(default)]
    pub sync_failures: u32,
}

fn yes() -> bool {
    true
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's node PeerId.
    pub peer_id: String,
    /// MLS leaf index.
    pub leaf_index: u32,
    /// Whether this member is the local node.
    pub is_self: bool,
    /// Display name from the member's profile, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// See [`PersonInfo::label`] (absent from older nodes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Whether this node's user verified the member's current key
    /// (`…/members/{peer}/verification`). Absent from older nodes (read as false).
    #[serde(default)]
    pub verified: bool,
    /// Set when the member's key is not the one verified; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_changed: Option<KeyChangeInfo>,
}

/// `POST /v1/groups` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateGroupRequest {
    /// Display name, 1 to 128 bytes.
    pub name: String,
}

/// `POST /v1/groups/{group}/invites` body. Both fields optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInviteRequest {
    /// Lifetime in seconds (default 24 h, at most 30 days).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// How many joins the link allows (default 1, at most 1000).
    #[serde(default)]
    pub max_uses: Option<u32>,
    /// Joins wait for a member's approval (default false).
    #[serde(default)]
    pub approval: bool,
}

/// A created invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    /// The `kith1…` link.
    pub link: String,
    /// The same as a `kith://join#…` URL.
    pub url: String,
    /// Group id.
    pub group: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Allowed joins.
    pub max_uses: u32,
    /// The invite's id in the group (64 hex characters; `kith invite list` shows it).
    #[serde(default)]
    pub id: String,
    /// Joins wait for a member's approval.
    #[serde(default)]
    pub approval: bool,
    /// The addresses in the link, best first, each with its scope (absent from older
    /// nodes).
    #[serde(default)]
    pub addrs: Vec<ScopedAddr>,
    /// Whether the link works from outside the inviter's LAN: it holds a public or relayed
    /// address (absent from older nodes: `true`).
    #[serde(default = "yes")]
    pub leaves_lan: bool,
}

/// An invite of a group as every member stores it: `GET /v1/groups/{group}/invites`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteSummary {
    /// Invite id (64 hex characters); a unique prefix of 4 or more names it.
    pub id: String,
    /// Group id.
    pub group: String,
    /// The member who created it (empty if unknown: created before schema 3, or only a use
    /// or revocation of it has been seen so far).
    pub creator: String,
    /// Joins allowed.
    pub max_uses: u32,
    /// Joins so far, counted group-wide from the commits that used it.
    pub uses: u32,
    /// Joins left.
    pub uses_left: u32,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Creation time (creator's clock), seconds since the Unix epoch.
    pub created_at: u64,
    /// Joins wait for a member's approval.
    pub approval: bool,
    /// A member revoked it.
    pub revoked: bool,
    /// `active`, `revoked`, `expired`, `used_up`, or `unknown` (its creation message has
    /// not reached this node yet).
    pub state: String,
}

/// A join request held for approval on this node: `GET /v1/groups/{group}/join-requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequestInfo {
    /// Request id (16 hex characters); a unique prefix of 4 or more names it.
    pub id: String,
    /// Group id.
    pub group: String,
    /// The joiner's PeerId (authenticated by the transport).
    pub peer: String,
    /// The invite it uses.
    pub invite: String,
    /// When it first arrived, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// `waiting`, `approved` or `denied`.
    pub state: String,
}

/// `POST /v1/join` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinBody {
    /// The invite link, `kith1…` or `kith://join#…`.
    pub link: String,
    /// Give up after this many seconds (default 120, at most 3600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// A stage of a join in progress, reported as [`NodeEvent::JoinProgress`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JoinStage {
    /// Looking for members: the link's inviter first, the DHT meanwhile.
    FindingMembers {
        /// The time limit of the whole join, in seconds.
        timeout_secs: u64,
    },
    /// Connecting to a member.
    Contacting {
        /// Its PeerId.
        peer: String,
        /// `link` (the inviter named in the link) or `dht` (found under the invite's key).
        via: String,
    },
    /// The join request was sent to a member.
    RequestSent {
        /// Its PeerId.
        peer: String,
    },
    /// A member could not help (unreachable, or did not know the invite); trying the next.
    TryingNext {
        /// Its PeerId.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The member holds the request until someone approves it.
    AwaitingApproval {
        /// The member's PeerId.
        peer: String,
        /// The request id to give to whoever approves (`kith approve GROUP ID`).
        request: String,
    },
    /// A member added this node; the group is being set up.
    Added {
        /// The member who added us.
        peer: String,
    },
    /// The group is ready; messages from now on arrive (and missed ones through sync).
    Ready {
        /// Epoch joined at.
        epoch: u64,
        /// Member count.
        member_count: usize,
    },
    /// The commit that added this node lost to a concurrent commit (see docs/PROTOCOL.md,
    /// "Concurrent commits"); the node joins again with the same link.
    Rejoining,
    /// Joining again after a lost race was refused; the group stays read-only here.
    Lost {
        /// Why (the member's refusal).
        reason: String,
    },
}

/// `POST /v1/groups/{group}/messages` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBody {
    /// UTF-8 text, 1 byte to 64 KiB.
    pub text: String,
    /// The message it answers (full id or a unique prefix of 8 or more hex characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// `PATCH /v1/groups/{group}/messages/{id}` body: the new text of one's own message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditBody {
    /// UTF-8 text, 1 byte to 64 KiB.
    pub text: String,
}

/// `POST /v1/groups/{group}/messages/{id}/reactions` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactBody {
    /// One emoji (1 to 32 bytes, no spaces or control characters).
    pub emoji: String,
}

/// `POST /v1/groups/{group}/read` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadBody {
    /// The last message read (id or unique prefix); the newest message if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<String>,
}

/// `PUT /v1/profile` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileBody {
    /// Display name, 1 to 64 printable characters (control and bidi characters are removed).
    pub name: String,
    /// A PNG, JPEG or WebP image of at most 16 KiB, base64 (standard alphabet, padded);
    /// absent: no avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

/// `GET /v1/profile`, `PUT /v1/profile`, `GET /v1/profiles/{peer}`, and the
/// `profile_updated` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileInfo {
    /// Whose.
    pub peer_id: String,
    /// Display name (cleaned).
    pub name: String,
    /// See [`PersonInfo::label`].
    pub label: String,
    /// When its owner set it (owner's clock): a newer one replaces it everywhere.
    pub version: u64,
    /// Media type of the avatar (`image/png`, `image/jpeg`, `image/webp`), if it has one;
    /// the image is at `GET /v1/profiles/{peer}/avatar`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

/// `POST /v1/direct` body: start (or find) a direct chat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectBody {
    /// The person: a PeerId, or the unique name or short id of a member of a shared group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Instead of a person: make a one-use invite link to a new direct chat, for someone
    /// who shares no group with this node.
    #[serde(default)]
    pub link: bool,
}

/// `POST /v1/direct` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectInfo {
    /// The direct chat.
    pub group: GroupSummary,
    /// False when an existing direct chat with this person was found.
    pub created: bool,
    /// The one-use link (with `link: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The other person, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<PersonInfo>,
}

/// A reaction standing on a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionInfo {
    /// The emoji.
    pub emoji: String,
    /// Who put it (PeerIds), earliest first.
    pub by: Vec<String>,
}

/// The message a reply answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyInfo {
    /// Its id.
    pub id: String,
    /// Its sender, if this node holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<PersonInfo>,
    /// Its first line, at most 80 characters, if this node holds it and it is not deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Envelope id (64 hex characters).
    pub id: String,
    /// Group id.
    pub group: String,
    /// MLS epoch it was sent in.
    pub epoch: u64,
    /// Sender's PeerId.
    pub sender: String,
    /// Sender's clock at sending.
    pub sent_at_ms: u64,
    /// This node's clock at arrival.
    pub received_at_ms: u64,
    /// What it is.
    pub body: MessageBody,
    /// The sender's display name, if they set a profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_name: Option<String>,
    /// See [`PersonInfo::label`], for the sender.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sender_label: String,
    /// The message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyInfo>,
    /// When its sender last edited it (sender's clock); the body holds the edited text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at_ms: Option<u64>,
    /// Its sender deleted it: the text is gone (the body's text is empty).
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// Reactions standing on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionInfo>,
    /// Members (other than its sender) whose read receipts cover it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_by: Vec<PersonInfo>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl MessageInfo {
    /// A message with only the base fields (no name, reply, edit, reactions).
    pub fn new(
        id: String,
        group: String,
        epoch: u64,
        sender: String,
        (sent_at_ms, received_at_ms): (u64, u64),
        body: MessageBody,
    ) -> Self {
        MessageInfo {
            id,
            group,
            epoch,
            sender,
            sent_at_ms,
            received_at_ms,
            body,
            sender_name: None,
            sender_label: String::new(),
            reply_to: None,
            edited_at_ms: None,
            deleted: false,
            reactions: Vec::new(),
            read_by: Vec::new(),
        }
    }
}

/// What changed on a message, in a `message_changed` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageChange {
    /// A reaction was put or taken back.
    Reaction {
        /// The emoji.
        emoji: String,
        /// Put (true) or taken back.
        on: bool,
    },
    /// Its sender edited it.
    Edit,
    /// Its sender deleted it.
    Delete,
}

/// The content of a history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageBody {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// The group was created.
    GroupCreated {
        /// Its name.
        name: String,
    },
    /// Members were added (PeerIds).
    MembersAdded {
        /// Who.
        members: Vec<String>,
    },
    /// Members were removed (PeerIds).
    MembersRemoved {
        /// Who.
        members: Vec<String>,
    },
    /// The sender created an invite any member honours.
    InviteCreated {
        /// Invite id.
        invite: String,
        /// Joins allowed.
        max_uses: u32,
        /// Expiry, seconds since the Unix epoch.
        expires_at: u64,
        /// Joins wait for approval.
        approval: bool,
    },
    /// The sender revoked an invite.
    InviteRevoked {
        /// Invite id.
        invite: String,
    },
    /// The sender put or took back a reaction on the message `to`. Not listed in history
    /// (the message shows its reactions); seen in `message_changed` events and with
    /// `GET …/messages/{id}` of the change itself.
    Reaction {
        /// The message.
        to: String,
        /// The emoji.
        emoji: String,
        /// Put or taken back.
        on: bool,
    },
    /// The sender edited its message `target` (not listed in history, as above).
    Edit {
        /// The message.
        target: String,
        /// The new text.
        text: String,
    },
    /// The sender deleted its message `target` (not listed in history, as above).
    Delete {
        /// The message.
        target: String,
    },
    /// A file or picture.
    File {
        /// What it is, and how much of it this node holds.
        file: Box<FileInfo>,
    },
}

/// A file or picture in a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// File id (64 hex characters): names it in `/v1/files/{id}`.
    pub id: String,
    /// Its name, made safe to show and save (no path, no control characters).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type (`application/octet-stream` when unknown).
    pub mime: String,
    /// Words sent with it (may be empty; edits change them).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caption: String,
    /// A picture's width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// A picture's height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Whether a thumbnail can be had at `/v1/files/{id}/thumbnail`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub thumbnail: bool,
    /// How much of it this node holds.
    pub state: FileState,
}

/// `POST /v1/groups/{group}/files` query: the body is the file's bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendFileQuery {
    /// The file's name (only its last path component is kept, made safe).
    pub name: String,
    /// Words to send with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

/// `PUT /v1/groups/{group}/files/settings` body and answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSettings {
    /// Files up to this size posted in the group are fetched as soon as their message
    /// arrives (0: never). In a request, `null` goes back to the node's `[files]` setting.
    pub auto_download_bytes: Option<u64>,
}

/// `PUT …/messages/{id}/file/pin` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinBody {
    /// Keep the file when the file store needs room.
    pub pinned: bool,
}

/// `GET /v1/files`: the file store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStoreInfo {
    /// Bytes held or reserved for downloads.
    pub used_bytes: u64,
    /// The most it may use (`[files] quota_mib`).
    pub quota_bytes: u64,
    /// The largest file this node sends (`[files] max_file_mib`).
    #[serde(default)]
    pub max_file_bytes: u64,
    /// The files it knows, newest first.
    pub files: Vec<StoredFile>,
}

/// A file in the file store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// File id.
    pub id: String,
    /// Groups it was posted in.
    pub groups: Vec<String>,
    /// Size in bytes.
    pub size: u64,
    /// This node sent it.
    pub own: bool,
    /// How much of it this node holds.
    pub state: FileState,
}

/// How much of a file this node holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// Where it stands.
    pub status: FileStatus,
    /// Content bytes held (checked), of `size`.
    pub have_bytes: u64,
    /// Whether it is kept when the file store needs room.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pinned: bool,
}

/// Where a file stands on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Not fetched (not asked for, or too large to fetch by itself).
    #[default]
    Remote,
    /// Being fetched.
    Downloading,
    /// Waiting for a member that holds it to come online.
    Waiting,
    /// Held in full, checked.
    Complete,
    /// Its message was deleted: the file is gone for everyone.
    Deleted,
    /// Removed from this node's file store (quota or retention); fetch it again to see it.
    Evicted,
}

/// `GET /v1/groups/{group}/messages` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// At most this many entries, newest last (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only entries before this message (its id or a unique prefix of at least 8 hex
    /// characters): the page before one already shown.
    #[serde(default)]
    pub before: Option<String>,
}

/// A live event on `GET /v1/events` (server-sent events; the SSE `event:` field is `type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    /// A history entry was added (a message arrived or was sent, or membership changed).
    Message(Box<MessageInfo>),
    /// This node joined or created a group.
    GroupJoined(GroupSummary),
    /// A group moved to a new epoch (membership or keys changed).
    EpochChanged {
        /// Group id.
        group: String,
        /// New epoch.
        epoch: u64,
        /// Member count after the change.
        member_count: usize,
    },
    /// History sync fetched envelopes this node had missed (their messages are also
    /// announced one by one as [`NodeEvent::Message`]).
    HistorySynced {
        /// Group id.
        group: String,
        /// Envelopes fetched and accepted.
        fetched: usize,
    },
    /// A join by invite link (on this node) reached a new stage.
    JoinProgress {
        /// The group being joined.
        group: String,
        /// The stage.
        stage: JoinStage,
    },
    /// A join request awaits approval on this node (`kith join-requests`).
    JoinRequestHeld(JoinRequestInfo),
    /// A message was reacted to, edited or deleted. `message` is the message as shown now,
    /// if this node holds it (a change that arrives first is shown on it once it arrives).
    MessageChanged {
        /// Group id.
        group: String,
        /// The message's id.
        id: String,
        /// Who changed it (PeerId).
        by: String,
        /// What changed.
        change: MessageChange,
        /// The message now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<Box<MessageInfo>>,
    },
    /// A member's profile arrived or changed (also this node's own).
    ProfileUpdated {
        /// The group it arrived in.
        group: String,
        /// The profile.
        profile: ProfileInfo,
    },
    /// A member read the group up to a message (read receipts are on).
    Read {
        /// Group id.
        group: String,
        /// The reader (PeerId).
        peer: String,
        /// The last message read.
        up_to: String,
    },
    /// A member is typing (typing notices are on); shown for a few seconds.
    Typing {
        /// Group id.
        group: String,
        /// Who.
        peer: PersonInfo,
    },
    /// A member's key is not the one this node's user verified (noticed when the group's
    /// membership changed): a verification mark was dropped, or a verified name turned up
    /// under a new key.
    VerificationLost {
        /// Group id.
        group: String,
        /// The member as it is now.
        peer: String,
        /// The name recorded with the mark, if any.
        name: Option<String>,
        /// The PeerId that was verified (equal to `peer` for `key_mismatch`).
        verified_peer: String,
        /// `key_mismatch` or `same_name_new_key` (see [`KeyChangeInfo::reason`]).
        reason: String,
        /// The line to show the user.
        message: String,
    },
    /// A file's download moved on: progress (at most about 4 a second per file), completion,
    /// waiting for a holder, deletion.
    FileProgress {
        /// Group id.
        group: String,
        /// File id ([`FileInfo::id`]).
        file: String,
        /// How much of it this node holds now.
        state: FileState,
        /// Its size in bytes.
        size: u64,
    },
}

impl NodeEvent {
    /// Every value of [`NodeEvent::kind`]: the event names a client parses (others, from a
    /// newer node, it skips).
    pub const KINDS: [&'static str; 12] = [
        "message",
        "group_joined",
        "epoch_changed",
        "history_synced",
        "join_progress",
        "join_request_held",
        "message_changed",
        "profile_updated",
        "read",
        "typing",
        "verification_lost",
        "file_progress",
    ];

    /// The group the event concerns.
    pub fn group(&self) -> &str {
        match self {
            NodeEvent::Message(m) => &m.group,
            NodeEvent::GroupJoined(g) => &g.id,
            NodeEvent::EpochChanged { group, .. } => group,
            NodeEvent::HistorySynced { group, .. } => group,
            NodeEvent::JoinProgress { group, .. } => group,
            NodeEvent::JoinRequestHeld(r) => &r.group,
            NodeEvent::MessageChanged { group, .. }
            | NodeEvent::ProfileUpdated { group, .. }
            | NodeEvent::Read { group, .. }
            | NodeEvent::Typing { group, .. } => group,
            NodeEvent::VerificationLost { group, .. } => group,
            NodeEvent::FileProgress { group, .. } => group,
        }
    }

    /// The SSE event name.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeEvent::Message(_) => "message",
            NodeEvent::GroupJoined(_) => "group_joined",
            NodeEvent::EpochChanged { .. } => "epoch_changed",
            NodeEvent::HistorySynced { .. } => "history_synced",
            NodeEvent::JoinProgress { .. } => "join_progress",
            NodeEvent::JoinRequestHeld(_) => "join_request_held",
            NodeEvent::MessageChanged { .. } => "message_changed",
            NodeEvent::ProfileUpdated { .. } => "profile_updated",
            NodeEvent::Read { .. } => "read",
            NodeEvent::Typing { .. } => "typing",
            NodeEvent::VerificationLost { .. } => "verification_lost",
            NodeEvent::FileProgress { .. } => "file_progress",
        }
    }
}

/// A list of peers: `GET /v1/net/peers` (connected peers), `GET /v1/net/blocked`, and the
/// body and answer of `PUT /v1/net/blocked` (the whole block list).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerList {
    /// PeerIds (`12D3KooW…`), sorted.
    pub peers: Vec<String>,
}

/// Error body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `bad_request`, `join_rejected`.
    pub code: String,
    /// One-line human-readable message.
    pub error: String,
}

/// `GET /v1/events` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Only events of this group (full id, unique id prefix or exact name); all if absent.
    #[serde(default)]
    pub group: Option<String>,
}

/// SSE event name sent when the subscriber fell behind and events were dropped.
pub const LAGGED_EVENT: &str = "lagged";

/// Data of a [`LAGGED_EVENT`]: the stream goes on after it, minus the dropped events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsLagged {
    /// How many events this subscriber missed.
    pub missed: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The JSON of a status answer and of a live event, field by field as docs/API.md
    /// documents them: moving the model out of the node must not change a byte of it.
    #[test]
    fn wire_json_is_the_documented_shape() {
        let status = StatusInfo {
            peer_id: "12D3KooWBB4XFKs24mUqit5MLWhAhY6xs23BMLb5fZYKDu7Wiy3k".into(),
            network: "kith".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/43901".into()],
            connected_peers: 3,
            groups: vec![GroupSummary {
                id: "c9".repeat(32),
                name: "book club".into(),
                epoch: 2,
                member_count: 3,
                in_sync: true,
                held: 0,
                epoch_auth: "00112233aabbccdd".into(),
                undecryptable: 1,
                missing: 2,
                sync_failures: 0,
                rollbacks: 4,
                deep_forks: 0,
                forks_detected: 5,
                direct: None,
                active: true,
                unread: 3,
                last_message: None,
                read_up_to: None,
            }],
            version: "0.1.0".into(),
            storage: StorageStatus::Failing {
                since_ms: 1_795_353_513_174,
                reason: "disk_full".into(),
                message: "no space".into(),
            },
            reach: ReachInfo::Relayed {
                relays: vec![RelayInfo {
                    peer: "12D3KooWrelay".into(),
                    addr: "/ip4/203.0.113.5/tcp/7341/p2p/12D3KooWrelay/p2p-circuit".into(),
                }],
            },
            relayed_peers: 1,
            name: None,
        };
        let want = json!({
            "peer_id": "12D3KooWBB4XFKs24mUqit5MLWhAhY6xs23BMLb5fZYKDu7Wiy3k",
            "network": "kith",
            "listen_addrs": ["/ip4/127.0.0.1/tcp/43901"],
            "connected_peers": 3,
            "groups": [{
                "id": "c9".repeat(32), "name": "book club", "epoch": 2, "member_count": 3,
                "in_sync": true, "held": 0, "epoch_auth": "00112233aabbccdd",
                "undecryptable": 1, "missing": 2, "sync_failures": 0, "rollbacks": 4,
                "deep_forks": 0, "forks_detected": 5, "active": true, "unread": 3
            }],
            "version": "0.1.0",
            "storage": {
                "state": "failing", "since_ms": 1_795_353_513_174_u64,
                "reason": "disk_full", "message": "no space"
            },
            "reach": {
                "state": "relayed",
                "relays": [{
                    "peer": "12D3KooWrelay",
                    "addr": "/ip4/203.0.113.5/tcp/7341/p2p/12D3KooWrelay/p2p-circuit"
                }]
            },
            "relayed_peers": 1
        });
        assert_eq!(serde_json::to_value(&status).unwrap(), want);
        assert_eq!(
            serde_json::from_value::<StatusInfo>(want.clone()).unwrap(),
            status
        );
        // A node from before NAT traversal sends neither field.
        let mut old = want;
        let o = old.as_object_mut().unwrap();
        o.remove("reach");
        o.remove("relayed_peers");
        let old: StatusInfo = serde_json::from_value(old).unwrap();
        assert_eq!((old.reach, old.relayed_peers), (ReachInfo::Unknown, 0));
        let direct = ReachInfo::Direct {
            addrs: vec![ScopedAddr {
                addr: "/ip4/203.0.113.9/tcp/7341".into(),
                scope: "public".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&direct).unwrap(),
            json!({"state": "direct", "addrs": [{"addr": "/ip4/203.0.113.9/tcp/7341", "scope": "public"}]})
        );
        assert_eq!(
            serde_json::to_value(ReachInfo::BehindNat).unwrap(),
            json!({"state": "behind_nat"})
        );

        let event = NodeEvent::JoinProgress {
            group: "ab".repeat(32),
            stage: JoinStage::Contacting {
                peer: "12D3KooWpeer".into(),
                via: "dht".into(),
            },
        };
        let want = json!({
            "type": "join_progress",
            "group": "ab".repeat(32),
            "stage": {"kind": "contacting", "peer": "12D3KooWpeer", "via": "dht"}
        });
        assert_eq!(serde_json::to_value(&event).unwrap(), want);
        assert_eq!(event.kind(), "join_progress");

        let message = NodeEvent::Message(Box::new(MessageInfo::new(
            "01".repeat(32),
            "ab".repeat(32),
            1,
            "12D3KooWpeer".into(),
            (10, 11),
            MessageBody::Text { text: "hi".into() },
        )));
        let want = json!({
            "type": "message", "id": "01".repeat(32), "group": "ab".repeat(32), "epoch": 1,
            "sender": "12D3KooWpeer", "sent_at_ms": 10, "received_at_ms": 11,
            "body": {"type": "text", "text": "hi"}
        });
        assert_eq!(serde_json::to_value(&message).unwrap(), want);
    }

    /// Fields added after the first version read as their documented defaults from older
    /// nodes.
    #[test]
    fn older_answers_still_parse() {
        let old = json!({
            "id": "c9".repeat(32), "name": "book club", "epoch": 2, "member_count": 3
        });
        let g: GroupSummary = serde_json::from_value(old).unwrap();
        assert!(g.in_sync);
        assert_eq!((g.held, g.undecryptable), (0, 0));
    }
}

/// `POST /v1/web/login-codes` answer: a one-time code for `/app/login?code=…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCode {
    /// The code (64 lowercase hex digits); it works once.
    pub code: String,
    /// Seconds it stays valid.
    pub expires_in_secs: u64,
}

/// `GET /v1/web/session` answer: the browser's session is live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebSession {
    /// When the session ends, Unix milliseconds.
    pub expires_at_ms: u64,
}

/// `POST /v1/qr` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QrBody {
    /// The text to draw (at most 2,048 bytes), e.g. an invite link.
    pub text: String,
}
