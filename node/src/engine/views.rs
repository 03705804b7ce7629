//! What the API shows: history entries, groups, invites and held join requests as the
//! JSON model's types.

use super::*;

/// Converts a history entry to its API form.
pub fn message_info(h: &HistoryEntry) -> MessageInfo {
    let peers = |v: &[PeerId]| v.iter().map(|p| p.to_string()).collect();
    MessageInfo::new(
        h.id.to_string(),
        h.group.to_string(),
        h.epoch,
        h.sender.to_string(),
        (h.sent_at_ms, h.received_at_ms),
        match &h.kind {
            EntryKind::Text(t) | EntryKind::Post { text: t, .. } => {
                MessageBody::Text { text: t.clone() }
            }
            EntryKind::Reaction { to, emoji, on } => MessageBody::Reaction {
                to: to.to_string(),
                emoji: emoji.clone(),
                on: *on,
            },
            EntryKind::Edit { target, text } => MessageBody::Edit {
                target: target.to_string(),
                text: text.clone(),
            },
            EntryKind::Delete { target } => MessageBody::Delete {
                target: target.to_string(),
            },
            EntryKind::GroupCreated { name } => MessageBody::GroupCreated { name: name.clone() },
            EntryKind::MembersAdded(v) => MessageBody::MembersAdded { members: peers(v) },
            EntryKind::MembersRemoved(v) => MessageBody::MembersRemoved { members: peers(v) },
            EntryKind::InviteCreated {
                id,
                max_uses,
                expires_at,
                approval,
            } => MessageBody::InviteCreated {
                invite: id.to_string(),
                max_uses: *max_uses,
                expires_at: *expires_at,
                approval: *approval,
            },
            EntryKind::InviteRevoked(id) => MessageBody::InviteRevoked {
                invite: id.to_string(),
            },
            EntryKind::Joined(me) => MessageBody::MembersAdded {
                members: peers(std::slice::from_ref(me)),
            },
            EntryKind::File { file, .. } => MessageBody::File {
                file: Box::new(file_info(file)),
            },
        },
    )
}

/// A file message in its API form; its state is filled in from the file store.
pub fn file_info(f: &kith_protocol::files::FileRef) -> kith_client::model::FileInfo {
    kith_client::model::FileInfo {
        id: f.id.to_string(),
        name: f.display_name(),
        size: f.size,
        mime: f.media_type().to_owned(),
        caption: f.caption.clone(),
        width: f.image.as_ref().map(|i| i.width),
        height: f.image.as_ref().map(|i| i.height),
        thumbnail: f.image.as_ref().is_some_and(|i| i.thumb.is_some()),
        state: Default::default(),
    }
}

pub(super) fn group_info(v: &GroupView, me: PeerId) -> GroupInfo {
    GroupInfo {
        id: v.meta.id.to_string(),
        name: v.meta.name.clone(),
        epoch: v.epoch,
        members: v
            .members
            .iter()
            .map(|(leaf, p)| MemberInfo {
                peer_id: p.to_string(),
                leaf_index: *leaf,
                is_self: *p == me,
                name: None,
                label: kith_client::text::short_peer(&p.to_string()),
                verified: false,
                key_changed: None,
            })
            .collect(),
        joined_at_ms: v.meta.joined_at_ms,
        active: v.active,
        leaving: v.leaving,
        epoch_auth: HEXLOWER.encode(&v.authenticator),
        rollbacks: v.rollbacks,
        deep_forks: v.deep_forks,
        forks_detected: v.forks_detected,
        undecryptable: Default::default(),
        missing: 0,
        catching_up: false,
        sync_failures: 0,
    }
}

/// The API form of an invite record at `now` (Unix seconds).
pub(super) fn invite_summary(r: &InviteRecord, now: u64) -> InviteSummary {
    use kith_protocol::envelope::JoinRejection as R;
    let state = match r.admits(now) {
        Ok(()) => "active",
        Err(R::Revoked) => "revoked",
        Err(R::Expired) => "expired",
        Err(R::UsedUp) => "used_up",
        Err(_) => "unknown",
    };
    InviteSummary {
        id: r.id.to_string(),
        group: r.group.to_string(),
        creator: r.creator.map(|p| p.to_string()).unwrap_or_default(),
        max_uses: r.max_uses,
        uses: r.uses,
        uses_left: r.uses_left(),
        expires_at: r.expires_at,
        created_at: r.created_at,
        approval: r.approval,
        revoked: r.revoked,
        state: state.to_owned(),
    }
}

pub(super) fn held_info(h: &kith_protocol::join::admission::Held) -> JoinRequestInfo {
    JoinRequestInfo {
        id: request_id_text(h.id),
        group: h.group.to_string(),
        peer: h.peer.to_string(),
        invite: h.invite.to_string(),
        received_at_ms: h.received_at_ms,
        state: match h.state {
            HeldState::Waiting => "waiting",
            HeldState::Approved(_) => "approved",
            HeldState::Denied => "denied",
        }
        .to_owned(),
    }
}

pub(super) fn summary(v: &GroupView) -> GroupSummary {
    GroupSummary {
        id: v.meta.id.to_string(),
        name: v.meta.name.clone(),
        epoch: v.epoch,
        member_count: v.members.len(),
        in_sync: true,
        held: 0,
        epoch_auth: HEXLOWER.encode(&v.authenticator),
        undecryptable: 0,
        missing: 0,
        sync_failures: 0,
        rollbacks: v.rollbacks,
        deep_forks: v.deep_forks,
        forks_detected: v.forks_detected,
        direct: None,
        active: true,
        unread: 0,
        last_message: None,
        read_up_to: None,
    }
}

/// The addresses for an invite: confirmed public ones, relay circuits, then LAN and
/// loopback ones (see [`kith_protocol::addr::invite_order`]).
pub(super) fn invite_addrs(info: &NetInfo) -> Vec<Multiaddr> {
    kith_protocol::addr::invite_order(
        &info.shareable_addrs(),
        kith_protocol::invite::MAX_INVITE_ADDRS,
    )
}

/// An address with its scope, for the API.
pub fn scoped(addr: &Multiaddr) -> ScopedAddr {
    ScopedAddr {
        addr: addr.to_string(),
        scope: kith_protocol::addr::AddrScope::of(addr).name().to_owned(),
    }
}

/// The network's reachability in the API's form.
pub fn reach_info(r: &crate::net::Reachability) -> ReachInfo {
    use crate::net::Reachability;
    match r {
        Reachability::Unknown => ReachInfo::Unknown,
        Reachability::Direct { addrs } => ReachInfo::Direct {
            addrs: addrs.iter().map(scoped).collect(),
        },
        Reachability::Relayed { circuits } => ReachInfo::Relayed {
            relays: circuits
                .iter()
                .map(|(peer, addr)| RelayInfo {
                    peer: peer.to_string(),
                    addr: addr.to_string(),
                })
                .collect(),
        },
        Reachability::BehindNat => ReachInfo::BehindNat,
    }
}
