//! The API operations that only read: the groups, one group, its invites, its held join
//! requests, its history. Each is one [`Actor`] method, run by [`EngineHandle::run`]; none
//! is refused while the disk cannot write.

use super::*;
use crate::model::MAX_UNREAD;

impl Actor {
    /// All groups of this node, with how far each is from being in sync (`GET /v1/groups`).
    pub fn list_groups(&self) -> Vec<GroupSummary> {
        let mut list: Vec<GroupSummary> = self
            .groups
            .groups()
            .iter()
            .map(|v| {
                let id = v.meta.id;
                let held = self.groups.pending_count(&id);
                let undecryptable = self
                    .store
                    .undecryptable_counts(&id)
                    .map(|c| c.values().sum())
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot count undecryptable messages");
                        0
                    });
                let mut summary = GroupSummary {
                    held,
                    in_sync: held == 0
                        && !self.sync.is_running(&id)
                        && !self.sync.is_unsynced(&id)
                        && !self.groups.is_catching_up(&id),
                    undecryptable,
                    missing: self.groups.missing_messages(&id),
                    sync_failures: self.sync.failures(&id),
                    active: self.groups.is_active(&id),
                    ..summary(v)
                };
                self.chat_summary(&id, &mut summary);
                summary
            })
            .collect();
        self.decorate(&mut list);
        list
    }

    /// Group `q`: a full id, a unique id prefix (at least 4 hex characters) or an exact name
    /// (`GET /v1/groups/{group}`).
    pub fn show_group(&self, q: &str) -> Result<GroupInfo, EngineError> {
        let id = self.resolve(q)?;
        let v = self.view(&id)?;
        let undecryptable = self
            .store
            .undecryptable_counts(&id)?
            .into_iter()
            .map(|(reason, n)| (reason.label().to_owned(), n))
            .collect();
        let mut info = GroupInfo {
            undecryptable,
            missing: self.groups.missing_messages(&id),
            catching_up: self.groups.is_catching_up(&id),
            sync_failures: self.sync.failures(&id),
            ..group_info(&v, self.me)
        };
        self.name_members(&mut info.members);
        self.annotate_members(&id, &mut info.members);
        Ok(info)
    }

    /// The invites of group `q` as this node knows them, newest first
    /// (`GET /v1/groups/{group}/invites`).
    pub fn list_invites(&self, q: &str) -> Result<Vec<InviteSummary>, EngineError> {
        let id = self.resolve(q)?;
        let now = now_ms() / 1000;
        let mut list: Vec<InviteRecord> = self
            .store
            .invites()?
            .into_iter()
            .filter(|r| r.group == id)
            .collect();
        list.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
        Ok(list.iter().map(|r| invite_summary(r, now)).collect())
    }

    /// The join requests held for approval on this node for group `q`
    /// (`GET /v1/groups/{group}/join-requests`).
    pub fn join_requests(&mut self, q: &str) -> Result<Vec<JoinRequestInfo>, EngineError> {
        let id = self.resolve(q)?;
        self.held.expire(now_ms());
        Ok(self.held.of_group(id).into_iter().map(held_info).collect())
    }

    /// The newest `limit` history entries of group `q` (at least 1, at most
    /// [`MAX_HISTORY`]), oldest first (`GET /v1/groups/{group}/messages`).
    pub fn history(&self, q: &str, limit: usize) -> Result<Vec<MessageInfo>, EngineError> {
        self.history_page(q, limit, None)
    }

    /// [`Actor::history`] before message `before` (a full id or a unique prefix): the page
    /// further back from one already shown.
    pub fn history_page(
        &self,
        q: &str,
        limit: usize,
        before: Option<&str>,
    ) -> Result<Vec<MessageInfo>, EngineError> {
        let id = self.resolve(q)?;
        let before = match before {
            Some(m) => {
                let target = self.find_message(&id, m)?;
                Some(self.store.position(&target.id)?.ok_or_else(|| {
                    EngineError::NotFound(format!(
                        "message {} has no place in history",
                        target.id.short()
                    ))
                })?)
            }
            None => None,
        };
        let entries =
            self.store
                .history_before(&id, before.as_deref(), limit.clamp(1, MAX_HISTORY))?;
        Ok(self.history_view(&id, &entries))
    }

    /// The chats-list part of a group summary: unread count, newest message, read mark.
    fn chat_summary(&self, id: &GroupId, summary: &mut GroupSummary) {
        let mark = match self.store.receipts(id) {
            Ok(receipts) => receipts.into_iter().find(|(p, _, _)| *p == self.me),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the read marks");
                None
            }
        };
        let position = mark
            .as_ref()
            .and_then(|(_, up_to, _)| self.store.position(up_to).ok().flatten());
        match self
            .store
            .chat_summary(id, &self.me, position.as_deref(), MAX_UNREAD)
        {
            Ok(found) => {
                summary.unread = found.unread;
                summary.last_message = found
                    .last
                    .and_then(|entry| self.history_view(id, &[entry]).pop())
                    .map(Box::new);
            }
            Err(e) => tracing::warn!(error = %e, "cannot summarise a chat"),
        }
        summary.read_up_to = mark.map(|(_, up_to, _)| up_to.to_string());
    }
}
