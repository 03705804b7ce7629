//! What the store keeps for chat features, and how a message is shown with its reactions,
//! edits and delete.
//!
//! Tables:
//! - `refs`: group id ‖ target history id ‖ history id of a reaction, edit or delete → `()`:
//!   every change to a message, found from the message whatever order they arrived in (a
//!   reaction that arrives before its message is shown on it once the message arrives).
//! - `profiles`: PeerId bytes → codec-encoded [`SignedProfile`], the newest version seen.
//! - `receipts`: group id ‖ PeerId bytes → up-to history id (32) ‖ reader's clock (u64 BE):
//!   how far each member (this node too) has read.
//! - `direct`: group id → PeerId bytes of the other person: the group is a direct chat.
//!
//! The changes themselves are ordinary history rows ([`EntryKind::Reaction`],
//! [`EntryKind::Edit`], [`EntryKind::Delete`]), so they are deduplicated, synced, re-sent
//! and pruned like texts; [`Store::history`] does not list them as lines of their own.
//! A delete also blanks the text of its target and of the target's edits in the same
//! transaction (or at once when they arrive later): the words are gone from this node.

use std::collections::BTreeMap;

use kith_protocol::PeerId;
use kith_protocol::chat::SignedProfile;
use kith_protocol::ids::{FileId, GroupId, MessageId};
use kith_protocol::records::{EntryKind, HistoryEntry};
use redb::{ReadableTable, TableDefinition};

use super::{
    HISTORY, HISTORY_KEY_LEN, MESSAGE_INDEX, Store, StoreError, decode_record, encode_record,
};
use redb::ReadableTableMetadata as _;

/// See the module documentation.
pub(super) const REFS: TableDefinition<&[u8; 96], ()> = TableDefinition::new("refs");
/// See the module documentation.
pub(super) const PROFILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("profiles");
/// See the module documentation.
pub(super) const RECEIPTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("receipts");
/// Files whose message was deleted or pruned, until the file store has deleted their
/// content (see [`Store::gone_files`]).
pub(super) const FILES_GONE: TableDefinition<&[u8; 32], ()> = TableDefinition::new("files_gone");
/// See the module documentation.
pub(super) const DIRECT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("direct");

/// At most this many profiles are kept; a new owner beyond it is not stored (they are
/// members of this node's groups, so this is far above any real need).
pub const MAX_PROFILES: u64 = 20_000;
/// At most this many changes of one message are read to show it (the newest kept).
pub const MAX_CHANGES_SHOWN: usize = 4096;

/// A read receipt: `peer` read `group` up to `up_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The group.
    pub group: GroupId,
    /// The reader.
    pub peer: PeerId,
    /// The last message read (a history id).
    pub up_to: MessageId,
    /// The reader's clock.
    pub at_ms: u64,
}

/// How a message is shown now: its latest edit, whether it was deleted, its reactions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The latest edit's text and its sender clock.
    pub edit: Option<(String, u64)>,
    /// Its sender deleted it.
    pub deleted: bool,
    /// Reactions standing now: emoji → who, in first-reaction order per emoji.
    pub reactions: Vec<(String, Vec<PeerId>)>,
}

fn ref_key(group: &GroupId, target: &MessageId, op: &MessageId) -> [u8; 96] {
    let mut k = [0u8; 96];
    k[..32].copy_from_slice(group.as_bytes());
    k[32..64].copy_from_slice(target.as_bytes());
    k[64..].copy_from_slice(op.as_bytes());
    k
}

fn ref_range(group: &GroupId, target: &MessageId) -> ([u8; 96], [u8; 96]) {
    let lo = ref_key(group, target, &MessageId([0; 32]));
    let hi = ref_key(group, target, &MessageId([0xff; 32]));
    (lo, hi)
}

fn receipt_key(group: &GroupId, peer: &PeerId) -> Vec<u8> {
    let mut k = group.as_bytes().to_vec();
    k.extend_from_slice(&peer.to_bytes());
    k
}

/// The history rows of the changes to `target` (through `refs`), at most
/// [`MAX_CHANGES_SHOWN`].
fn changes_of(
    refs: &impl ReadableTable<&'static [u8; 96], ()>,
    index: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    history: &impl ReadableTable<&'static [u8; HISTORY_KEY_LEN], &'static [u8]>,
    group: &GroupId,
    target: &MessageId,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let (lo, hi) = ref_range(group, target);
    let mut out = Vec::new();
    for row in refs.range::<&[u8; 96]>(&lo..=&hi)?.take(MAX_CHANGES_SHOWN) {
        let (key, _) = row?;
        let mut op = [0u8; 32];
        op.copy_from_slice(&key.value()[64..]);
        let Some(hkey) = index.get(&op)? else {
            continue;
        };
        let Ok(hkey) = <[u8; HISTORY_KEY_LEN]>::try_from(hkey.value()) else {
            continue;
        };
        if let Some(v) = history.get(&hkey)? {
            out.push(decode_record("history", v.value())?);
        }
    }
    Ok(out)
}

/// Folds the changes of a message sent by `author` (only the author's edits and deletes
/// count; the protocol refuses others', this is the second lock).
pub fn fold(author: &PeerId, changes: &[HistoryEntry]) -> Changes {
    let mut out = Changes::default();
    let mut latest_edit: Option<(u64, u64, MessageId)> = None;
    // (reactor, emoji) → (order, on); order = (sent_at_ms, id), the same on every member.
    let mut reactions: BTreeMap<(PeerId, String), ((u64, MessageId), bool)> = BTreeMap::new();
    let mut first_seen: Vec<(String, PeerId, (u64, MessageId))> = Vec::new();
    for c in changes {
        match &c.kind {
            EntryKind::Delete { .. } if c.sender == *author => out.deleted = true,
            EntryKind::Edit { text, .. } if c.sender == *author => {
                let order = (c.epoch, c.sent_at_ms, c.id);
                if latest_edit.is_none_or(|l| order > l) {
                    latest_edit = Some(order);
                    out.edit = Some((text.clone(), c.sent_at_ms));
                }
            }
            EntryKind::Reaction { emoji, on, .. } => {
                let order = (c.sent_at_ms, c.id);
                let slot = reactions
                    .entry((c.sender, emoji.clone()))
                    .or_insert((order, *on));
                if order >= slot.0 {
                    *slot = (order, *on);
                }
                first_seen.push((emoji.clone(), c.sender, order));
            }
            _ => {}
        }
    }
    if out.deleted {
        out.edit = None;
        return out;
    }
    // Each standing reaction, emojis in the order of their earliest standing reaction.
    first_seen.sort_by_key(|f| f.2);
    for (emoji, peer, _) in first_seen {
        if reactions.get(&(peer, emoji.clone())).is_some_and(|r| r.1) {
            match out.reactions.iter_mut().find(|(e, _)| *e == emoji) {
                Some((_, who)) if !who.contains(&peer) => who.push(peer),
                Some(_) => {}
                None => out.reactions.push((emoji, vec![peer])),
            }
        }
    }
    out
}

/// Blanks the text of a text or edit row (kept as a tombstone). A file row loses its
/// caption, name, picture and key (only its id and size stay), and its id goes into
/// `files_gone` for the file store to delete its content.
fn blank(
    entry: &mut HistoryEntry,
    gone: &mut redb::Table<&'static [u8; 32], ()>,
) -> Result<bool, StoreError> {
    Ok(match &mut entry.kind {
        EntryKind::Text(t) | EntryKind::Post { text: t, .. } | EntryKind::Edit { text: t, .. }
            if !t.is_empty() =>
        {
            t.clear();
            true
        }
        EntryKind::File { file, .. } if !file.name.is_empty() => {
            file.caption.clear();
            file.name.clear();
            file.mime.clear();
            file.image = None;
            file.key = [0; 32];
            gone.insert(file.id.as_bytes(), ())?;
            true
        }
        _ => false,
    })
}

/// Called by [`Store::commit`] for each history row before it is written, in the commit's
/// transaction: indexes a change under its target, blanks a text whose message is deleted
/// already, and applies a delete to the rows it deletes.
pub(super) fn before_insert(
    refs: &mut redb::Table<&'static [u8; 96], ()>,
    index: &redb::Table<&'static [u8; 32], &'static [u8]>,
    history: &mut redb::Table<&'static [u8; HISTORY_KEY_LEN], &'static [u8]>,
    gone: &mut redb::Table<&'static [u8; 32], ()>,
    entry: &mut HistoryEntry,
) -> Result<(), StoreError> {
    let target = entry.kind.target();
    if let Some(target) = target {
        refs.insert(&ref_key(&entry.group, &target, &entry.id), ())?;
    }
    // The message whose deletion blanks this row: itself for a text, its target for an edit.
    let subject = match &entry.kind {
        EntryKind::Text(_) | EntryKind::Post { .. } | EntryKind::File { .. } => Some(entry.id),
        EntryKind::Edit { target, .. } => Some(*target),
        _ => None,
    };
    if let Some(subject) = subject {
        let changes = changes_of(&*refs, index, &*history, &entry.group, &subject)?;
        if changes
            .iter()
            .any(|c| matches!(c.kind, EntryKind::Delete { .. }) && c.sender == entry.sender)
        {
            blank(entry, gone)?;
        }
    }
    if let (EntryKind::Delete { target }, author) = (&entry.kind, entry.sender) {
        // The target and the author's edits of it lose their words.
        let mut doomed = changes_of(&*refs, index, &*history, &entry.group, target)?;
        doomed.retain(|c| c.sender == author && matches!(c.kind, EntryKind::Edit { .. }));
        let hkey = index
            .get(target.as_bytes())?
            .and_then(|k| <[u8; HISTORY_KEY_LEN]>::try_from(k.value()).ok());
        if let Some(hkey) = hkey {
            let row = history
                .get(&hkey)?
                .map(|v| decode_record::<HistoryEntry>("history", v.value()))
                .transpose()?;
            if let Some(row) = row.filter(|r| r.sender == author) {
                doomed.push(row);
            }
        }
        for mut row in doomed {
            if !blank(&mut row, gone)? {
                continue;
            }
            let Some(k) = index
                .get(row.id.as_bytes())?
                .and_then(|k| <[u8; HISTORY_KEY_LEN]>::try_from(k.value()).ok())
            else {
                continue;
            };
            let bytes = encode_record("history", &row)?;
            history.insert(&k, bytes.as_slice())?;
        }
    }
    Ok(())
}

/// Called by the prune for each history row it deletes: its entry in `refs` goes too, and
/// a file's content is to be deleted (`files_gone`).
pub(super) fn on_prune(
    refs: &mut redb::Table<&'static [u8; 96], ()>,
    gone: &mut redb::Table<&'static [u8; 32], ()>,
    entry: &HistoryEntry,
) -> Result<(), StoreError> {
    if let Some(target) = entry.kind.target() {
        refs.remove(&ref_key(&entry.group, &target, &entry.id))?;
    }
    if let EntryKind::File { file, .. } = &entry.kind {
        gone.insert(file.id.as_bytes(), ())?;
    }
    Ok(())
}

/// Writes profiles (a newer version replaces an older one; an older one is dropped),
/// receipts and direct-chat marks, in the commit's transaction.
pub(super) fn write(
    txn: &redb::WriteTransaction,
    profiles: &[(PeerId, SignedProfile)],
    receipts: &[Receipt],
    direct: &[(GroupId, PeerId)],
) -> Result<(), StoreError> {
    if !profiles.is_empty() {
        let mut table = txn.open_table(PROFILES)?;
        for (owner, p) in profiles {
            let key = owner.to_bytes();
            let current = table
                .get(key.as_slice())?
                .and_then(|v| SignedProfile::decode(v.value()).ok())
                .map(|(p, _)| p.v1().version);
            match current {
                Some(v) if v >= p.v1().version => continue,
                None if table.len()? >= MAX_PROFILES => {
                    tracing::warn!(peer = %owner, "profile table full; profile not kept");
                    continue;
                }
                _ => {}
            }
            let bytes = p.encode().map_err(|e| StoreError::Serde(e.to_string()))?;
            table.insert(key.as_slice(), bytes.as_slice())?;
        }
    }
    if !receipts.is_empty() {
        let mut table = txn.open_table(RECEIPTS)?;
        for r in receipts {
            let key = receipt_key(&r.group, &r.peer);
            let newer = table
                .get(key.as_slice())?
                .and_then(|v| v.value().get(32..40).map(|b| b.to_vec()))
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(u64::from_be_bytes)
                .is_none_or(|at| r.at_ms >= at);
            if newer {
                let mut v = r.up_to.as_bytes().to_vec();
                v.extend_from_slice(&r.at_ms.to_be_bytes());
                table.insert(key.as_slice(), v.as_slice())?;
            }
        }
    }
    if !direct.is_empty() {
        let mut table = txn.open_table(DIRECT)?;
        for (group, peer) in direct {
            table.insert(group.as_bytes(), peer.to_bytes().as_slice())?;
        }
    }
    Ok(())
}

impl Store {
    /// The changes of the message `id` of `group` sent by `author`, folded.
    pub fn changes(
        &self,
        group: &GroupId,
        id: &MessageId,
        author: &PeerId,
    ) -> Result<Changes, StoreError> {
        let txn = self.db.begin_read()?;
        let refs = txn.open_table(REFS)?;
        let index = txn.open_table(MESSAGE_INDEX)?;
        let history = txn.open_table(HISTORY)?;
        let rows = changes_of(&refs, &index, &history, group, id)?;
        Ok(fold(author, &rows))
    }

    /// The newest profile kept of `peer`.
    pub fn profile(&self, peer: &PeerId) -> Result<Option<SignedProfile>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROFILES)?;
        let Some(v) = table.get(peer.to_bytes().as_slice())? else {
            return Ok(None);
        };
        SignedProfile::decode(v.value())
            .map(|(p, _)| Some(p))
            .map_err(|e| StoreError::Corrupt {
                table: "profiles",
                reason: e.to_string(),
            })
    }

    /// How far each member has read `group`: (reader, up-to history id, reader's clock).
    pub fn receipts(&self, group: &GroupId) -> Result<Vec<(PeerId, MessageId, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECEIPTS)?;
        let mut out = Vec::new();
        let lo = group.as_bytes().to_vec();
        let mut hi = lo.clone();
        hi.push(0xff);
        for row in table.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
            let (k, v) = row?;
            let (Ok(peer), Some(id), Some(at)) = (
                PeerId::from_bytes(&k.value()[32..]),
                v.value().get(..32).and_then(MessageId::from_slice),
                v.value()
                    .get(32..40)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
            ) else {
                continue;
            };
            out.push((peer, id, at));
        }
        Ok(out)
    }

    /// Files whose message was deleted or pruned and whose content the file store has not
    /// deleted yet (at most `limit`).
    pub fn gone_files(&self, limit: usize) -> Result<Vec<FileId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FILES_GONE)?;
        let mut out = Vec::new();
        for row in table.iter()?.take(limit) {
            out.push(FileId(*row?.0.value()));
        }
        Ok(out)
    }

    /// The file store deleted these files' content: forget them, durably.
    pub fn forget_gone_files(&self, ids: &[FileId]) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            let txn = self.db.begin_write()?;
            {
                let mut table = txn.open_table(FILES_GONE)?;
                for id in ids {
                    table.remove(id.as_bytes())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        self.db.observe(result)
    }

    /// The direct chats: group → the other person.
    pub fn direct_chats(&self) -> Result<BTreeMap<GroupId, PeerId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DIRECT)?;
        let mut out = BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            if let Ok(peer) = PeerId::from_bytes(v.value()) {
                out.insert(GroupId(*k.value()), peer);
            }
        }
        Ok(out)
    }

    /// The history key of the message `id` (its place in the canonical order), if stored.
    pub fn position(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(MESSAGE_INDEX)?;
        Ok(index
            .get(id.as_bytes())?
            .map(|k| k.value().to_vec())
            .filter(|k| k.len() == HISTORY_KEY_LEN))
    }

    /// The ids of `group`'s history messages whose hex form starts with `prefix`, at most 2
    /// (enough to tell a unique prefix from an ambiguous one).
    pub fn messages_with_prefix(
        &self,
        group: &GroupId,
        prefix: &[u8],
        odd_nibble: Option<u8>,
    ) -> Result<Vec<MessageId>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(MESSAGE_INDEX)?;
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        let n = prefix.len().min(32);
        lo[..n].copy_from_slice(&prefix[..n]);
        hi[..n].copy_from_slice(&prefix[..n]);
        if let (Some(nib), true) = (odd_nibble, n < 32) {
            lo[n] = nib << 4;
            hi[n] = (nib << 4) | 0x0f;
        }
        let mut out = Vec::new();
        for row in index.range::<&[u8; 32]>(&lo..=&hi)? {
            let (k, v) = row?;
            // Only history rows of this group (an envelope id links to a row too).
            let Ok(hkey) = <[u8; HISTORY_KEY_LEN]>::try_from(v.value()) else {
                continue;
            };
            if hkey[..32] != *group.as_bytes() || hkey[HISTORY_KEY_LEN - 32..] != *k.value() {
                continue;
            }
            out.push(MessageId(*k.value()));
            if out.len() >= 2 {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        kith_protocol::Keypair::ed25519_from_bytes([n; 32])
            .unwrap()
            .public()
            .to_peer_id()
    }

    fn change(id: u8, sender: u8, at: u64, kind: EntryKind) -> HistoryEntry {
        HistoryEntry {
            group: GroupId([1; 32]),
            id: MessageId([id; 32]),
            epoch: 1,
            sender: peer(sender),
            sent_at_ms: at,
            received_at_ms: at,
            kind,
        }
    }

    fn post(id: u8, sender: u8, text: &str) -> HistoryEntry {
        change(
            id,
            sender,
            1,
            EntryKind::Post {
                text: text.into(),
                stable: MessageId([id; 32]),
                reply_to: None,
            },
        )
    }

    fn commit(store: &Store, rows: Vec<HistoryEntry>) {
        let batch = super::super::Batch {
            history: rows,
            ..Default::default()
        };
        store.commit(batch).unwrap();
    }

    #[test]
    fn changes_stored_before_their_message_apply_when_it_arrives_and_a_delete_blanks_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let g = GroupId([1; 32]);
        let t = MessageId([9; 32]);
        let u = MessageId([8; 32]);
        // A reaction to `t` and a delete of `u` arrive first, each in its own commit.
        commit(
            &store,
            vec![change(
                1,
                2,
                5,
                EntryKind::Reaction {
                    to: t,
                    emoji: "👍".into(),
                    on: true,
                },
            )],
        );
        commit(
            &store,
            vec![change(2, 1, 6, EntryKind::Delete { target: u })],
        );
        // Then the messages.
        commit(&store, vec![post(9, 1, "hello"), post(8, 1, "oops")]);
        let c = store.changes(&g, &t, &peer(1)).unwrap();
        assert_eq!(c.reactions, vec![("👍".to_owned(), vec![peer(2)])]);
        assert!(store.changes(&g, &u, &peer(1)).unwrap().deleted);
        let u_row = store.history_entry(&u).unwrap().unwrap();
        assert_eq!(u_row.kind.text(), Some(""), "the deleted text is not kept");
        // An edit after the delete is blanked too; listing shows only the two messages.
        commit(
            &store,
            vec![change(
                3,
                1,
                7,
                EntryKind::Edit {
                    target: u,
                    text: "again".into(),
                },
            )],
        );
        let e = store.history_entry(&MessageId([3; 32])).unwrap().unwrap();
        assert_eq!(
            e.kind,
            EntryKind::Edit {
                target: u,
                text: String::new()
            }
        );
        let listed = store.history(&g, 100).unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        // A delete by someone else than the author blanks nothing.
        commit(
            &store,
            vec![change(4, 3, 8, EntryKind::Delete { target: t })],
        );
        assert_eq!(
            store.history_entry(&t).unwrap().unwrap().kind.text(),
            Some("hello")
        );
        assert!(!store.changes(&g, &t, &peer(1)).unwrap().deleted);
    }

    #[test]
    fn the_latest_reaction_of_a_member_with_an_emoji_counts_whatever_the_order() {
        let t = MessageId([9; 32]);
        let react = |id, who, at, on| {
            change(
                id,
                who,
                at,
                EntryKind::Reaction {
                    to: t,
                    emoji: "👍".into(),
                    on,
                },
            )
        };
        let rows = vec![
            react(3, 2, 30, false),
            react(1, 2, 10, true),
            react(2, 3, 20, true),
        ];
        let mut rev = rows.clone();
        rev.reverse();
        for r in [rows, rev] {
            let c = fold(&peer(1), &r);
            assert_eq!(c.reactions, vec![("👍".to_owned(), vec![peer(3)])]);
        }
    }

    #[test]
    fn only_the_author_edits_and_deletes_and_a_delete_wins() {
        let t = MessageId([9; 32]);
        let edit = |id, who, at, text: &str| {
            change(
                id,
                who,
                at,
                EntryKind::Edit {
                    target: t,
                    text: text.into(),
                },
            )
        };
        let c = fold(
            &peer(1),
            &[
                edit(1, 1, 10, "first"),
                edit(2, 1, 20, "second"),
                edit(3, 2, 30, "forged"),
            ],
        );
        assert_eq!(c.edit, Some(("second".into(), 20)));
        assert!(!c.deleted);
        let c = fold(
            &peer(1),
            &[change(4, 2, 40, EntryKind::Delete { target: t })],
        );
        assert!(!c.deleted, "a delete by another member does not count");
        let c = fold(
            &peer(1),
            &[
                edit(1, 1, 10, "x"),
                change(4, 1, 5, EntryKind::Delete { target: t }),
            ],
        );
        assert!(c.deleted);
        assert_eq!(c.edit, None);
    }

    fn at_epoch(epoch: u64, entry: HistoryEntry) -> HistoryEntry {
        HistoryEntry { epoch, ..entry }
    }

    fn invite_created(id: u8, epoch: u64, invite: kith_protocol::ids::InviteId) -> HistoryEntry {
        at_epoch(
            epoch,
            change(
                id,
                1,
                1,
                EntryKind::InviteCreated {
                    id: invite,
                    max_uses: 5,
                    expires_at: u64::MAX,
                    approval: false,
                },
            ),
        )
    }

    #[test]
    fn a_removal_after_the_invite_bars_it_and_a_new_invite_or_add_lifts_that() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let g = GroupId([1; 32]);
        let (old, new) = (
            kith_protocol::ids::InviteId([7; 32]),
            kith_protocol::ids::InviteId([8; 32]),
        );
        let bob = peer(2);
        let commit = |rows| commit(&store, rows);
        commit(vec![
            invite_created(10, 1, old),
            at_epoch(2, change(11, 1, 1, EntryKind::MembersAdded(vec![bob]))),
        ]);
        assert!(!store.removed_since_invite(&g, &bob, &old).unwrap());
        commit(vec![at_epoch(
            3,
            change(12, 1, 1, EntryKind::MembersRemoved(vec![bob])),
        )]);
        assert!(
            store.removed_since_invite(&g, &bob, &old).unwrap(),
            "removed after the old link"
        );
        assert!(
            !store.removed_since_invite(&g, &peer(3), &old).unwrap(),
            "someone else"
        );
        assert!(
            store.removed_since_invite(&g, &bob, &new).unwrap(),
            "an invite not in history is older than the removal"
        );
        commit(vec![invite_created(13, 4, new)]);
        assert!(
            !store.removed_since_invite(&g, &bob, &new).unwrap(),
            "a link made after"
        );
        assert!(store.removed_since_invite(&g, &bob, &old).unwrap());
        commit(vec![at_epoch(
            5,
            change(14, 1, 1, EntryKind::MembersAdded(vec![bob])),
        )]);
        assert!(
            !store.removed_since_invite(&g, &bob, &old).unwrap(),
            "added back since"
        );
    }
}
