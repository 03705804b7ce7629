//! Chat features on the node: replies, reactions, edits, deletes, profiles, read receipts,
//! typing and direct chats (see [`kith_protocol::chat`]). Each operation is one [`Actor`]
//! method, as in `local.rs`; the views add names, replies, edits, reactions and receipts
//! to the history entries the store holds.

use std::collections::BTreeMap;

use data_encoding::BASE64;
use kith_client::text::short_peer;
use kith_protocol::chat::{
    Avatar, Chat, ChatV1, ImageFormat, MAX_AVATAR_BYTES, Profile, ProfileV1, SignedProfile,
    clean_name,
};

use super::*;
use crate::model::{
    DirectBody, DirectInfo, MessageChange, PersonInfo, ProfileBody, ProfileInfo, ReactionInfo,
    ReplyInfo,
};

/// Typing notices are sent at most this often per group.
pub const TYPING_INTERVAL_MS: u64 = 3_000;
/// A typing notice older than this (by its sender's clock, against ours) is not shown.
pub const TYPING_SHOWN_MS: u64 = 10_000;
/// How long a direct chat's invite link stays valid.
pub const DIRECT_INVITE_SECS: u64 = 7 * 24 * 3600;
/// The name of a direct chat's group (what the invite link shows; the apps show the other
/// person instead).
pub const DIRECT_GROUP_NAME: &str = "direct chat";
/// Longest reply excerpt, in characters.
const EXCERPT_CHARS: usize = 80;

/// Which chat notices this node sends and shows (`[chat]` in `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatPolicy {
    /// Send read receipts and show others' (default on).
    pub read_receipts: bool,
    /// Send typing notices and show others' (default off).
    pub typing: bool,
    /// Join a direct chat offered by a member of a shared group by itself (default on).
    pub accept_direct: bool,
}

impl Default for ChatPolicy {
    fn default() -> Self {
        ChatPolicy {
            read_receipts: true,
            typing: false,
            accept_direct: true,
        }
    }
}

/// What the profile of `peer` shows: its cleaned name, and the label that tells people
/// with the same name apart.
pub fn person(peer: &PeerId, profile: Option<&SignedProfile>) -> PersonInfo {
    let id = peer.to_string();
    let short = short_peer(&id);
    let name = profile
        .map(|p| clean_name(&p.v1().name))
        .filter(|n| !n.is_empty());
    let label = match &name {
        Some(n) => format!("{n} ({short})"),
        None => short,
    };
    PersonInfo {
        peer_id: id,
        name,
        label,
    }
}

fn profile_info(owner: &PeerId, p: &SignedProfile) -> ProfileInfo {
    let who = person(owner, Some(p));
    ProfileInfo {
        peer_id: who.peer_id,
        name: who.name.unwrap_or_default(),
        label: who.label,
        version: p.v1().version,
        avatar: p.v1().avatar.as_ref().map(|a| a.format.mime().to_owned()),
    }
}

fn excerpt(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(EXCERPT_CHARS).collect();
    if line.chars().count() > EXCERPT_CHARS || text.lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

/// Profiles looked up once per view.
#[derive(Default)]
pub(super) struct Names(BTreeMap<PeerId, Option<SignedProfile>>);

impl Names {
    fn get(&mut self, store: &Store, peer: &PeerId) -> Option<SignedProfile> {
        self.0
            .entry(*peer)
            .or_insert_with(|| store.profile(peer).ok().flatten())
            .clone()
    }

    pub(super) fn person(&mut self, store: &Store, peer: &PeerId) -> PersonInfo {
        let p = self.get(store, peer);
        person(peer, p.as_ref())
    }
}

/// A history entry as the API shows it: with the sender's name, the message it answers,
/// its latest edit, whether it was deleted and its reactions.
fn message_view(store: &Store, h: &HistoryEntry, names: &mut Names) -> MessageInfo {
    let mut m = message_info(h);
    let sender = names.person(store, &h.sender);
    m.sender_name = sender.name;
    m.sender_label = sender.label;
    if let EntryKind::Post {
        reply_to: Some(to), ..
    } = &h.kind
    {
        let target = store.history_entry(to).ok().flatten();
        // The answered message as it reads now: edited, or gone.
        let now = target.as_ref().and_then(|t| {
            let c = store.changes(&t.group, &t.id, &t.sender).ok()?;
            if c.deleted {
                return None;
            }
            c.edit
                .map(|(text, _)| text)
                .or_else(|| t.kind.text().map(str::to_owned))
        });
        m.reply_to = Some(ReplyInfo {
            id: to.to_string(),
            sender: target.as_ref().map(|t| names.person(store, &t.sender)),
            excerpt: now.filter(|t| !t.is_empty()).map(|t| excerpt(&t)),
        });
    }
    if h.kind.text().is_some() {
        match store.changes(&h.group, &h.id, &h.sender) {
            Ok(c) => {
                if c.deleted {
                    m.deleted = true;
                    m.body = MessageBody::Text {
                        text: String::new(),
                    };
                } else if let Some((text, at)) = c.edit {
                    m.edited_at_ms = Some(at);
                    match &mut m.body {
                        // A file's caption is its text.
                        MessageBody::File { file } => file.caption = text,
                        body => *body = MessageBody::Text { text },
                    }
                }
                m.reactions = c
                    .reactions
                    .into_iter()
                    .map(|(emoji, by)| ReactionInfo {
                        emoji,
                        by: by.iter().map(|p| p.to_string()).collect(),
                    })
                    .collect();
            }
            Err(e) => tracing::warn!(error = %e, "cannot read a message's changes"),
        }
    }
    m
}

/// Fills in who read each message of `list` (of `group`), from the read receipts.
fn add_read_by(
    store: &Store,
    group: &GroupId,
    list: &mut [(Vec<u8>, MessageInfo)],
    names: &mut Names,
) {
    let Ok(receipts) = store.receipts(group) else {
        return;
    };
    let marks: Vec<(PeerId, Vec<u8>)> = receipts
        .into_iter()
        .filter_map(|(peer, up_to, _)| store.position(&up_to).ok().flatten().map(|pos| (peer, pos)))
        .collect();
    for (pos, m) in list.iter_mut() {
        if matches!(m.body, MessageBody::Text { .. } | MessageBody::File { .. }) && !pos.is_empty()
        {
            m.read_by = marks
                .iter()
                .filter(|(peer, mark)| peer.to_string() != m.sender && mark >= pos)
                .map(|(peer, _)| names.person(store, peer))
                .collect();
        }
    }
}

/// The history of `group` as the API shows it (see [`message_view`]), with who read each
/// message if `receipts`. Also used by `kith history --offline`.
pub fn history_view(
    store: &Store,
    group: &GroupId,
    entries: &[HistoryEntry],
    receipts: bool,
) -> Vec<MessageInfo> {
    let mut names = Names::default();
    let mut list: Vec<(Vec<u8>, MessageInfo)> = entries
        .iter()
        .map(|h| {
            let pos = store.position(&h.id).ok().flatten().unwrap_or_default();
            (pos, message_view(store, h, &mut names))
        })
        .collect();
    if receipts {
        add_read_by(store, group, &mut list, &mut names);
    }
    list.into_iter().map(|(_, m)| m).collect()
}

impl Actor {
    /// See [`history_view`].
    pub(super) fn history_view(
        &self,
        group: &GroupId,
        entries: &[HistoryEntry],
    ) -> Vec<MessageInfo> {
        let mut list = history_view(&self.store, group, entries, self.chat.read_receipts);
        for m in &mut list {
            if let MessageBody::File { file } = &mut m.body
                && let Ok(id) = file.id.parse::<kith_protocol::ids::FileId>()
            {
                file.state = self.files.state(&id);
            }
        }
        list
    }

    /// The message `q` of group `id` (its full id, or a unique prefix of at least 8 hex
    /// characters).
    pub(super) fn find_message(&self, id: &GroupId, q: &str) -> Result<HistoryEntry, EngineError> {
        let q = q.trim().to_ascii_lowercase();
        if q.len() < 8 || q.len() > 64 || !q.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(EngineError::BadRequest(format!(
                "'{}' is not a message id (8 to 64 hex characters)",
                kith_client::text::clean(&q)
            )));
        }
        let even = &q[..q.len() / 2 * 2];
        let prefix = HEXLOWER
            .decode(even.as_bytes())
            .map_err(|_| EngineError::BadRequest("bad message id".into()))?;
        let odd =
            (q.len() % 2 == 1).then(|| u8::from_str_radix(&q[q.len() - 1..], 16).unwrap_or(0));
        let found = self.store.messages_with_prefix(id, &prefix, odd)?;
        match found.as_slice() {
            [one] => self
                .store
                .history_entry(one)?
                .ok_or_else(|| EngineError::NotFound(format!("no message {q} in this group"))),
            [] => Err(EngineError::NotFound(format!(
                "no message {q} in this group"
            ))),
            _ => Err(EngineError::BadRequest(format!(
                "'{q}' matches several messages; give more of the id"
            ))),
        }
    }

    /// Message `m` of group `q` as shown now (`GET /v1/groups/{group}/messages/{id}`).
    pub fn message(&self, q: &str, m: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let h = self.find_message(&id, m)?;
        if h.kind.target().is_some() {
            return Err(EngineError::NotFound(format!(
                "{m} is a reaction, edit or delete, shown on its message"
            )));
        }
        Ok(self.history_view(&id, std::slice::from_ref(&h)).remove(0))
    }

    /// Sends a chat message in `group`, stores and publishes it.
    pub(super) fn send_chat(
        &mut self,
        group: GroupId,
        chat: Chat,
    ) -> Result<Option<HistoryEntry>, EngineError> {
        self.check_writable()?;
        let groups = &mut self.groups;
        let sent = timed(&self.metrics, CpuPart::Mls, || {
            groups.send_chat(group, chat, now_ms())
        });
        let (entry, effects) = match sent {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        Ok(entry)
    }

    /// Sends a text that answers the message `to` (`POST /v1/groups/{group}/messages` with
    /// `reply_to`).
    pub fn reply(&mut self, q: &str, text: &str, to: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let target = self.find_message(&id, to)?;
        if target.kind.text().is_none() {
            return Err(EngineError::BadRequest(
                "only a text message can be answered".into(),
            ));
        }
        let chat = Chat::V1(ChatV1::Reply {
            to: target.id,
            text: text.to_owned(),
        });
        let entry = self
            .send_chat(id, chat)?
            .ok_or_else(|| EngineError::Internal("a reply without a history entry".into()))?;
        self.metrics.message_sent();
        self.check_self_updates = true;
        self.one_view(&id, &entry)
    }

    pub(super) fn one_view(
        &self,
        group: &GroupId,
        h: &HistoryEntry,
    ) -> Result<MessageInfo, EngineError> {
        self.history_view(group, std::slice::from_ref(h))
            .pop()
            .ok_or_else(|| EngineError::Internal("empty view".into()))
    }

    /// Puts (`on`) or takes back a reaction on message `m` of group `q`.
    pub fn react(
        &mut self,
        q: &str,
        m: &str,
        emoji: &str,
        on: bool,
    ) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let target = self.find_message(&id, m)?;
        if target.kind.text().is_none() {
            return Err(EngineError::BadRequest(
                "only a text message can be reacted to".into(),
            ));
        }
        let emoji = emoji.trim();
        kith_protocol::chat::check_emoji(emoji)
            .map_err(|e| EngineError::BadRequest(e.to_string()))?;
        self.send_chat(
            id,
            Chat::V1(ChatV1::React {
                to: target.id,
                emoji: emoji.to_owned(),
                on,
            }),
        )?;
        self.one_view(&id, &target)
    }

    /// The stable id of this node's own message `target`, or why it cannot be changed.
    fn own_stable(&self, target: &HistoryEntry, verb: &str) -> Result<MessageId, EngineError> {
        if target.sender != self.me {
            return Err(EngineError::BadRequest(format!(
                "only its sender can {verb} a message"
            )));
        }
        match &target.kind {
            EntryKind::Post { stable, .. } | EntryKind::File { stable, .. } => {
                if self
                    .store
                    .changes(&target.group, &target.id, &self.me)?
                    .deleted
                {
                    return Err(EngineError::BadRequest("the message was deleted".into()));
                }
                Ok(*stable)
            }
            EntryKind::Text(_) => Err(EngineError::BadRequest(format!(
                "this message was sent by an older version of Kith and cannot be {verb}ed"
            ))),
            _ => Err(EngineError::BadRequest(format!(
                "only a text message can be {verb}ed"
            ))),
        }
    }

    /// Replaces the text of this node's own message `m` (`PATCH …/messages/{id}`).
    pub fn edit(&mut self, q: &str, m: &str, text: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let target = self.find_message(&id, m)?;
        let stable = self.own_stable(&target, "edit")?;
        self.send_chat(
            id,
            Chat::V1(ChatV1::Edit {
                target: target.id,
                stable,
                text: text.to_owned(),
            }),
        )?;
        self.one_view(&id, &target)
    }

    /// Deletes this node's own message `m` for everyone (`DELETE …/messages/{id}`).
    pub fn delete_message(&mut self, q: &str, m: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let target = self.find_message(&id, m)?;
        let stable = self.own_stable(&target, "delete")?;
        self.send_chat(
            id,
            Chat::V1(ChatV1::Delete {
                target: target.id,
                stable,
            }),
        )?;
        let target = self.store.history_entry(&target.id)?.unwrap_or(target);
        self.one_view(&id, &target)
    }

    /// Notes that this user read group `q` up to message `up_to` (the newest if `None`);
    /// with read receipts on, tells the group (`POST /v1/groups/{group}/read`).
    pub fn mark_read(&mut self, q: &str, up_to: Option<&str>) -> Result<MessageInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let target = match up_to {
            Some(m) => self.find_message(&id, m)?,
            None => self
                .store
                .history(&id, 1)?
                .pop()
                .ok_or_else(|| EngineError::NotFound("the group has no messages".into()))?,
        };
        let pos = self.store.position(&target.id)?;
        let mine = self
            .store
            .receipts(&id)?
            .into_iter()
            .find(|(p, _, _)| *p == self.me)
            .and_then(|(_, up, _)| self.store.position(&up).ok().flatten());
        let advances = mine.is_none_or(|m| pos.as_ref().is_some_and(|p| *p > m));
        if advances {
            let now = now_ms();
            let mut batch = Batch::default();
            batch.receipts.push(crate::store::Receipt {
                group: id,
                peer: self.me,
                up_to: target.id,
                at_ms: now,
            });
            self.commit_with(batch, false)?;
            if self.chat.read_receipts && self.groups.is_active(&id) {
                self.send_chat(id, Chat::V1(ChatV1::Receipt { up_to: target.id }))?;
            }
        }
        self.one_view(&id, &target)
    }

    /// Tells group `q` this user is typing, if typing notices are on and none was sent in
    /// the last [`TYPING_INTERVAL_MS`] (`POST /v1/groups/{group}/typing`). Whether it sent.
    pub fn typing(&mut self, q: &str) -> Result<bool, EngineError> {
        let id = self.resolve(q)?;
        if !self.chat.typing {
            return Ok(false);
        }
        let now = now_ms();
        if self
            .typing_sent
            .get(&id)
            .is_some_and(|t| now.saturating_sub(*t) < TYPING_INTERVAL_MS)
        {
            return Ok(false);
        }
        self.send_chat(id, Chat::V1(ChatV1::Typing))?;
        self.typing_sent.insert(id, now);
        Ok(true)
    }

    /// This node's profile (`GET /v1/profile`).
    pub fn own_profile(&self) -> Result<Option<ProfileInfo>, EngineError> {
        Ok(self
            .store
            .profile(&self.me)?
            .map(|p| profile_info(&self.me, &p)))
    }

    /// This node's display name, if it set one.
    pub fn own_name(&self) -> Option<String> {
        self.own_profile().ok().flatten().map(|p| p.name)
    }

    /// Sets this node's profile and sends it to every group (`PUT /v1/profile`).
    pub fn set_profile(&mut self, body: ProfileBody) -> Result<ProfileInfo, EngineError> {
        self.check_writable()?;
        let name = clean_name(&body.name);
        if name.is_empty() || body.name.len() > kith_protocol::chat::MAX_NAME_BYTES {
            return Err(EngineError::BadRequest(format!(
                "a name must be 1 to {} printable characters",
                kith_protocol::chat::MAX_NAME_CHARS
            )));
        }
        let avatar = match body.avatar {
            None => None,
            Some(b64) => {
                if b64.len() > MAX_AVATAR_BYTES * 4 / 3 + 8 {
                    return Err(EngineError::BadRequest(format!(
                        "an avatar must be at most {} KiB",
                        MAX_AVATAR_BYTES / 1024
                    )));
                }
                let bytes = BASE64
                    .decode(b64.trim().as_bytes())
                    .map_err(|_| EngineError::BadRequest("the avatar is not base64".into()))?;
                let format = ImageFormat::sniff(&bytes).ok_or_else(|| {
                    EngineError::BadRequest("the avatar is not a PNG, JPEG or WebP image".into())
                })?;
                Some(Avatar { format, bytes })
            }
        };
        // A newer version than any this node made before, whatever its clock did.
        let last = self.store.profile(&self.me)?.map_or(0, |p| p.v1().version);
        let profile = Profile::V1(ProfileV1 {
            version: now_ms().max(last + 1),
            name,
            avatar,
        });
        let signed = self.groups.sign_profile(profile)?;
        let mut batch = Batch::default();
        batch.profiles.push((self.me, signed.clone()));
        self.commit_with(batch, true)?;
        let groups: Vec<GroupId> = self
            .groups
            .groups()
            .iter()
            .filter(|v| v.active)
            .map(|v| v.meta.id)
            .collect();
        for g in groups {
            if let Err(e) = self.send_chat(g, Chat::V1(ChatV1::Profile(signed.clone()))) {
                tracing::warn!(group = %g.short(), error = %e, "cannot send the profile to a group; it goes with the next change");
            }
        }
        let info = profile_info(&self.me, &signed);
        tracing::info!(name = %info.name, "profile set");
        Ok(info)
    }

    /// The profile this node holds of `peer` (`GET /v1/profiles/{peer}`).
    pub fn profile_of(&self, peer: &str) -> Result<ProfileInfo, EngineError> {
        let p: PeerId = peer
            .parse()
            .map_err(|_| EngineError::BadRequest(format!("'{peer}' is not a PeerId")))?;
        self.store
            .profile(&p)?
            .map(|s| profile_info(&p, &s))
            .ok_or_else(|| EngineError::NotFound(format!("no profile of {peer}")))
    }

    /// The avatar of `peer`: media type and bytes (`GET /v1/profiles/{peer}/avatar`).
    pub fn avatar_of(&self, peer: &str) -> Result<(&'static str, Vec<u8>), EngineError> {
        let p: PeerId = peer
            .parse()
            .map_err(|_| EngineError::BadRequest(format!("'{peer}' is not a PeerId")))?;
        let a = self
            .store
            .profile(&p)?
            .and_then(|s| s.v1().avatar.clone())
            .ok_or_else(|| EngineError::NotFound(format!("no avatar of {peer}")))?;
        Ok((a.format.mime(), a.bytes))
    }

    /// Sends this node's profile to `group`, if it has one (after joining it).
    pub(super) fn send_own_profile(&mut self, group: GroupId) {
        let Ok(Some(p)) = self.store.profile(&self.me) else {
            return;
        };
        if let Err(e) = self.send_chat(group, Chat::V1(ChatV1::Profile(p))) {
            tracing::warn!(group = %group.short(), error = %e, "cannot send the profile to a group just joined");
        }
    }

    /// After adding `peer` to `group`: sends it the profiles of the members this node knows
    /// (it cannot read the messages that carried them), and in a direct chat, the note that
    /// makes it one.
    pub(super) fn after_admit(&mut self, group: GroupId, peer: PeerId) {
        let members: Vec<PeerId> = self
            .view(&group)
            .map(|v| v.members.iter().map(|(_, p)| *p).collect())
            .unwrap_or_default();
        let mut list: Vec<SignedProfile> = members
            .iter()
            .filter(|p| **p != peer)
            .filter_map(|p| self.store.profile(p).ok().flatten())
            .collect();
        // In pieces that stay well inside one envelope.
        while !list.is_empty() {
            let mut part = Vec::new();
            let mut bytes = 0;
            while let Some(p) = list.last() {
                let size = p.v1().avatar.as_ref().map_or(0, |a| a.bytes.len()) + 512;
                if !part.is_empty()
                    && (bytes + size > 96 * 1024 || part.len() >= kith_protocol::chat::MAX_PROFILES)
                {
                    break;
                }
                bytes += size;
                part.extend(list.pop());
            }
            if let Err(e) = self.send_chat(group, Chat::V1(ChatV1::Profiles(part))) {
                tracing::warn!(group = %group.short(), error = %e, "cannot send members' profiles to a new member");
                break;
            }
        }
        let direct = self
            .store
            .direct_chats()
            .ok()
            .and_then(|d| d.get(&group).copied());
        // The person it was made for, or (made as a link) the first to join.
        if let Some(other) = direct
            && (other == peer || other == self.me)
            && let Err(e) = self.send_chat(
                group,
                Chat::V1(ChatV1::Direct {
                    with: peer.to_bytes(),
                }),
            )
        {
            tracing::warn!(group = %group.short(), error = %e, "cannot send the direct chat note");
        }
    }

    /// Whether a join request from `peer` for `group` is refused because the group is a
    /// direct chat with someone else.
    pub(super) fn direct_refusal(&self, group: &GroupId, peer: &PeerId) -> Option<JoinRejection> {
        let other = self.store.direct_chats().ok()?.get(group).copied()?;
        let waiting = other == self.me && self.view(group).is_ok_and(|v| v.members.len() < 2);
        (other != *peer && !waiting).then_some(JoinRejection::Denied)
    }

    /// The person `q` names: a PeerId, or the exact name, label or short id (the end of the
    /// PeerId, at least 4 characters) of one member of this node's groups.
    fn find_person(&self, q: &str) -> Result<PeerId, EngineError> {
        let q = q.trim();
        if let Ok(p) = q.parse::<PeerId>() {
            return Ok(p);
        }
        let mut names = Names::default();
        let mut found: Vec<PeerId> = Vec::new();
        for v in self.groups.groups().iter().filter(|v| v.active) {
            for (_, p) in &v.members {
                if *p == self.me || found.contains(p) {
                    continue;
                }
                let who = names.person(&self.store, p);
                let by_name = who
                    .name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(q));
                let by_id = q.len() >= 4 && who.peer_id.ends_with(q);
                if by_name || by_id || who.label == q {
                    found.push(*p);
                }
            }
        }
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(EngineError::MemberNotFound(format!(
                "'{}' (no member of your groups has this name or id)",
                kith_client::text::clean(q)
            ))),
            many => Err(EngineError::BadRequest(format!(
                "'{}' names {} people: {}; use the id in brackets",
                kith_client::text::clean(q),
                many.len(),
                many.iter()
                    .map(|p| names.person(&self.store, p).label)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The direct chat with `peer`, if there is one.
    fn direct_with(&self, peer: &PeerId) -> Result<Option<GroupId>, EngineError> {
        Ok(self
            .store
            .direct_chats()?
            .into_iter()
            .find(|(g, p)| p == peer && *p != self.me && self.groups.is_active(g))
            .map(|(g, _)| g))
    }

    /// Starts or finds a direct chat (`POST /v1/direct`): with a member of a shared group
    /// (the other node joins by itself), or as a one-use link for someone else.
    pub fn start_direct(&mut self, body: DirectBody) -> Result<DirectInfo, EngineError> {
        let peer = match (&body.peer, body.link) {
            (Some(q), false) => Some(self.find_person(q)?),
            (None, true) => None,
            _ => {
                return Err(EngineError::BadRequest(
                    "name a person or ask for a link, not both".into(),
                ));
            }
        };
        if peer == Some(self.me) {
            return Err(EngineError::BadRequest(
                "a direct chat is with someone else".into(),
            ));
        }
        if let Some(p) = peer
            && let Some(g) = self.direct_with(&p)?
        {
            // Not joined yet (the offer was lost, or their node was away): offer it again.
            if self.view(&g).is_ok_and(|v| v.members.len() < 2)
                && let Some(shared) = self.shared_group(&p)
            {
                let link = self.direct_invite(&g)?;
                self.offer_direct(shared, p, link)?;
            }
            return Ok(DirectInfo {
                group: self.group_summary(&g)?,
                created: false,
                link: None,
                with: Some(Names::default().person(&self.store, &p)),
            });
        }
        let shared = match peer {
            Some(p) => Some(self.shared_group(&p).ok_or_else(|| {
                EngineError::BadRequest(
                    "you share no group with this person; use a link (`kith dm --link`)".into(),
                )
            })?),
            None => None,
        };
        let info = self.create_group(DIRECT_GROUP_NAME)?;
        let gid: GroupId = info
            .id
            .parse()
            .map_err(|_| EngineError::Internal("bad group id".into()))?;
        let link = self.direct_invite(&gid)?;
        // With a person, only they are admitted (see `direct_refusal`), whoever else sees
        // the link; with a link, whoever joins first, marked by this node's own id until then.
        let mut batch = Batch::default();
        batch.direct.push((gid, peer.unwrap_or(self.me)));
        self.commit_with(batch, true)?;
        if let (Some(p), Some(shared)) = (peer, shared) {
            self.offer_direct(shared, p, link.clone())?;
        }
        Ok(DirectInfo {
            group: self.group_summary(&gid)?,
            created: true,
            link: peer.is_none().then_some(link),
            with: peer.map(|p| Names::default().person(&self.store, &p)),
        })
    }

    /// A group this node and `peer` are both active members of (where an offer can go).
    fn shared_group(&self, peer: &PeerId) -> Option<GroupId> {
        self.groups
            .groups()
            .iter()
            .find(|v| {
                v.active
                    && v.members.iter().any(|(_, m)| m == peer)
                    && self
                        .store
                        .direct_chats()
                        .ok()
                        .is_none_or(|d| !d.contains_key(&v.meta.id))
            })
            .map(|v| v.meta.id)
    }

    /// A one-use invite link to the direct chat `group`.
    fn direct_invite(&mut self, group: &GroupId) -> Result<String, EngineError> {
        Ok(self
            .create_invite(
                &group.to_string(),
                CreateInviteRequest {
                    expires_in_secs: Some(DIRECT_INVITE_SECS),
                    max_uses: Some(1),
                    approval: false,
                },
            )?
            .url)
    }

    /// Offers `peer` the direct chat behind `link`, in the group `shared`.
    fn offer_direct(
        &mut self,
        shared: GroupId,
        peer: PeerId,
        link: String,
    ) -> Result<(), EngineError> {
        self.send_chat(
            shared,
            Chat::V1(ChatV1::DirectOffer {
                to: peer.to_bytes(),
                link,
            }),
        )?;
        tracing::info!(via = %shared.short(), peer = %peer, "offered a direct chat");
        Ok(())
    }

    /// One group's summary with its direct-chat person, as listed.
    fn group_summary(&self, id: &GroupId) -> Result<GroupSummary, EngineError> {
        self.list_groups()
            .into_iter()
            .find(|g| g.id == id.to_string())
            .ok_or_else(|| EngineError::GroupNotFound(id.to_string()))
    }

    /// Adds the direct-chat person to group summaries.
    pub(super) fn decorate(&self, list: &mut [GroupSummary]) {
        let Ok(direct) = self.store.direct_chats() else {
            return;
        };
        let mut names = Names::default();
        for g in list {
            if let Some(p) = g.id.parse::<GroupId>().ok().and_then(|id| direct.get(&id))
                && *p != self.me
            {
                g.direct = Some(Box::new(names.person(&self.store, p)));
            }
        }
    }

    /// Adds names to a group's members.
    pub(super) fn name_members(&self, members: &mut [MemberInfo]) {
        let mut names = Names::default();
        for m in members {
            if let Ok(p) = m.peer_id.parse::<PeerId>() {
                let who = names.person(&self.store, &p);
                m.name = who.name;
                m.label = who.label;
            }
        }
    }

    /// The events of chat effects, after their commit: changes shown on their messages,
    /// profiles, receipts, typing; and joining a direct chat offered to this node.
    pub(super) fn chat_event(&mut self, e: &Effect) {
        match e {
            Effect::Record(h) => {
                let Some(target) = h.kind.target() else {
                    return;
                };
                let change = match &h.kind {
                    EntryKind::Reaction { emoji, on, .. } => MessageChange::Reaction {
                        emoji: emoji.clone(),
                        on: *on,
                    },
                    EntryKind::Edit { .. } => MessageChange::Edit,
                    _ => MessageChange::Delete,
                };
                let message = self
                    .store
                    .history_entry(&target)
                    .ok()
                    .flatten()
                    .and_then(|t| self.one_view(&h.group, &t).ok())
                    .map(Box::new);
                let _ = self.events.send(NodeEvent::MessageChanged {
                    group: h.group.to_string(),
                    id: target.to_string(),
                    by: h.sender.to_string(),
                    change,
                    message,
                });
            }
            Effect::Profile { group, owner, .. } => {
                // The kept one (a newer one may have been there already).
                if let Ok(Some(p)) = self.store.profile(owner) {
                    let _ = self.events.send(NodeEvent::ProfileUpdated {
                        group: group.to_string(),
                        profile: profile_info(owner, &p),
                    });
                }
                // A verified name may have turned up under a new key.
                self.check_verifications(*group);
            }
            Effect::Receipt {
                group, peer, up_to, ..
            } if self.chat.read_receipts && *peer != self.me => {
                let _ = self.events.send(NodeEvent::Read {
                    group: group.to_string(),
                    peer: peer.to_string(),
                    up_to: up_to.to_string(),
                });
            }
            Effect::Typing {
                group,
                peer,
                sent_at_ms,
            } if self.chat.typing
                && *peer != self.me
                && now_ms().abs_diff(*sent_at_ms) < TYPING_SHOWN_MS =>
            {
                let who = Names::default().person(&self.store, peer);
                let _ = self.events.send(NodeEvent::Typing {
                    group: group.to_string(),
                    peer: who,
                });
            }
            Effect::DirectOffer { group, from, link } => {
                if !self.chat.accept_direct {
                    tracing::info!(from = %from, "a direct chat was offered; not joining ([chat] accept_direct is off)");
                    return;
                }
                match self.direct_with(from) {
                    Ok(None) => {}
                    _ => return,
                }
                tracing::info!(from = %from, via = %group.short(), "joining a direct chat offered by a member");
                let handle = self.handle.clone();
                let link = link.clone();
                self.runtime.spawn(async move {
                    if let Err(e) = handle.join(link).await {
                        tracing::warn!(error = %e, "cannot join the direct chat offered");
                    }
                });
            }
            _ => {}
        }
    }
}
