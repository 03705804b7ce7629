//! This node's own operations, from API calls: create, invite, revoke, send, remove, leave,
//! self-update (each one [`Actor`] method, run by [`EngineHandle::run`]); resolving a group
//! by id, prefix or name; `on_call`, the dispatcher.

use super::*;

impl Actor {
    pub(super) fn resolve(&self, query: &str) -> Result<GroupId, EngineError> {
        let views = self.groups.groups();
        resolve_group(
            query,
            views.iter().map(|v| (v.meta.id, v.meta.name.as_str())),
        )
    }

    pub(super) fn view(&self, id: &GroupId) -> Result<GroupView, EngineError> {
        self.groups
            .group(id)
            .ok_or_else(|| EngineError::GroupNotFound(id.to_string()))
    }

    /// Handles a call from the handle: an operation ([`Call::Run`]) or one of the join
    /// client's steps.
    pub(super) fn on_call(&mut self, call: Call) {
        let Some(call) = self.refuse_unwritable(call) else {
            return;
        };
        match call {
            Call::Run(op) => {
                op(self);
                // After the reply: the message count may just have reached
                // `[keys] update_after_messages`.
                if std::mem::take(&mut self.check_self_updates) {
                    self.self_updates();
                }
            }
            Call::PrepareJoin(invite, r) => {
                let req = self.groups.prepare_join(&invite, now_ms());
                let _ = r.send(self.stored_request(req));
            }
            Call::CompleteJoin(invite, response, r) => {
                let _ = r.send(self.complete_join(&invite, response));
            }
            Call::PrepareRejoin(group, epoch, commit, r) => {
                let req = self.groups.prepare_rejoin(group, epoch, commit);
                let _ = r.send(self.stored_request(req));
            }
            Call::CompleteRejoin(group, peer, response, r) => {
                let res = match self
                    .groups
                    .handle_rejoin_response(group, peer, response, now_ms())
                {
                    Ok((id, effects)) => self
                        .apply(effects)
                        .and_then(|()| Ok(group_info(&self.view(&id)?, self.me))),
                    Err(e) => {
                        self.rollback();
                        Err(e.into())
                    }
                };
                if res.is_ok() {
                    self.sync_input(sched::Input::Sync {
                        group,
                        trigger: sched::Trigger::Gap,
                    });
                    self.follow_up_syncs(group);
                }
                let _ = r.send(res);
            }
            Call::RejoinFailed(group, r) => {
                self.groups.rejoin_failed(&group);
                let _ = r.send(Ok(()));
            }
            Call::JoinOutcome(group, outcome, r) => {
                match outcome {
                    None => self.groups.keep_join(&group),
                    Some(reason) => self.groups.join_lost(&group, reason),
                }
                let _ = r.send(Ok(()));
            }
        }
    }

    /// Removes a member (by PeerId) from group `q`; returns the group after the commit
    /// (`DELETE /v1/groups/{group}/members/{peer}`).
    pub fn remove_member(&mut self, q: &str, peer: PeerId) -> Result<GroupInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let fx = self.groups.remove_member(id, peer, now_ms());
        let info = self.commit_local(id, fx)?;
        tracing::info!(group = %q, %peer, "removed a member");
        Ok(info)
    }

    /// Asks to leave group `q`: publishes this node's removal proposal, which another member
    /// commits. Returns the group, marked `leaving` (`POST /v1/groups/{group}/leave`).
    pub fn leave_group(&mut self, q: &str) -> Result<GroupInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let fx = self.groups.leave_group(id, now_ms());
        let info = self.commit_local(id, fx)?;
        tracing::info!(group = %q, "asked to leave the group");
        Ok(info)
    }

    /// Commits a fresh leaf key for this node in group `q`; returns the group after it
    /// (`POST /v1/groups/{group}/update`).
    pub fn self_update(&mut self, q: &str) -> Result<GroupInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let fx = self.groups.self_update(id, now_ms());
        self.commit_local(id, fx)
    }

    /// Applies the effects of a local membership operation on `id` (durably, before they
    /// are published) and returns the group after it; rolls back on failure.
    pub(super) fn commit_local(
        &mut self,
        id: GroupId,
        effects: Result<Vec<Effect>, GroupError>,
    ) -> Result<GroupInfo, EngineError> {
        let effects = match effects {
            Ok(fx) => fx,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        let mut info = group_info(&self.view(&id)?, self.me);
        self.annotate_members(&id, &mut info.members);
        Ok(info)
    }

    /// Commits a self-update in every group where one is due (`[keys]` in `config.toml`; by
    /// default after 1000 own messages or 7 days). Runs on the rendezvous tick.
    pub(super) fn self_updates(&mut self) {
        if !self.disk_ok() {
            // Due again at the next tick.
            return;
        }
        for id in self.groups.due_self_updates(now_ms(), self.update_policy) {
            let fx = self.groups.self_update(id, now_ms());
            match self.commit_local(id, fx) {
                Ok(v) => {
                    tracing::info!(group = %id.short(), epoch = v.epoch, "self-update committed")
                }
                Err(e) => tracing::warn!(group = %id.short(), error = %e, "self-update failed"),
            }
        }
    }

    /// Creates a group with this node as its only member (`POST /v1/groups`).
    pub fn create_group(&mut self, name: &str) -> Result<GroupInfo, EngineError> {
        self.check_writable()?;
        let mut id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id = GroupId(id);
        let effects = self.groups.create_group(id, name, now_ms())?;
        self.apply(effects)?;
        let view = self.view(&id)?;
        self.update_gauges(id, view.epoch, view.members.len());
        let _ = self.events.send(NodeEvent::GroupJoined(summary(&view)));
        let key = id.provider_key(self.groups.network());
        let _ = self.net.provide_blocking(key);
        tracing::info!(group = %id.short(), name = %view.meta.name, "created group");
        Ok(group_info(&view, self.me))
    }

    /// Creates an invite link to group `q` (an id, unique id prefix or exact name): stored
    /// and published to the group before the link is returned
    /// (`POST /v1/groups/{group}/invites`).
    pub fn create_invite(
        &mut self,
        q: &str,
        req: CreateInviteRequest,
    ) -> Result<InviteInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let secs = req.expires_in_secs.unwrap_or(DEFAULT_INVITE_SECS);
        if secs == 0 || secs > MAX_INVITE_SECS {
            return Err(EngineError::BadRequest(format!(
                "expiry must be between 1 second and {} days",
                MAX_INVITE_SECS / 86400
            )));
        }
        let uses = req.max_uses.unwrap_or(1);
        if uses == 0 || uses > MAX_INVITE_USES {
            return Err(EngineError::BadRequest(format!(
                "uses must be between 1 and {MAX_INVITE_USES}"
            )));
        }
        let addrs = self
            .net
            .info_blocking()
            .map(|i| invite_addrs(&i))
            .map_err(|_| EngineError::ShuttingDown)?;
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let now = now_ms();
        let new = NewInvite {
            addrs,
            secret,
            expires_at: now / 1000 + secs,
            max_uses: uses,
            approval: req.approval,
        };
        let (invite, effects) = match self.groups.create_invite(id, new, now) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        // Stored durably and published to the group before the link is shown.
        self.apply(effects)?;
        self.metrics.invite_created();
        tracing::info!(group = %id.short(), invite = %invite.id().short(), uses, approval = req.approval, "created invite");
        Ok(InviteInfo {
            link: invite.link().to_owned(),
            url: invite.url(),
            group: id.to_string(),
            expires_at: invite.expires_at,
            max_uses: invite.max_uses,
            id: invite.id().to_string(),
            approval: req.approval,
            addrs: invite.addrs.iter().map(scoped).collect(),
            leaves_lan: kith_protocol::addr::reaches_beyond_lan(&invite.addrs),
        })
    }

    /// Revokes invite `which` (id or unique prefix of 4+ hex characters) of group `q` for
    /// the whole group (`DELETE /v1/groups/{group}/invites/{invite}`).
    pub fn revoke_invite(&mut self, q: &str, which: &str) -> Result<InviteSummary, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let which = which.trim().to_ascii_lowercase();
        let is_prefix = which.len() >= 4 && which.chars().all(|c| c.is_ascii_hexdigit());
        let matches: Vec<InviteRecord> = self
            .store
            .invites()?
            .into_iter()
            .filter(|r| r.group == id && is_prefix && r.id.to_string().starts_with(&which))
            .collect();
        let record = match matches.as_slice() {
            [] => {
                return Err(EngineError::NotFound(format!(
                    "no invite of this group matches '{which}'"
                )));
            }
            [one] => one.clone(),
            _ => {
                return Err(EngineError::BadRequest(format!(
                    "'{which}' matches several invites; give more characters"
                )));
            }
        };
        if record.revoked {
            return Ok(invite_summary(&record, now_ms() / 1000));
        }
        let effects = match self.groups.revoke_invite(id, record.id, now_ms()) {
            Ok(fx) => fx,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        tracing::info!(group = %id.short(), invite = %record.id.short(), "revoked invite");
        let record = self.store.invite(&record.id)?.unwrap_or(record);
        Ok(invite_summary(&record, now_ms() / 1000))
    }

    pub(super) fn complete_join(
        &mut self,
        invite: &Invite,
        response: JoinResponse,
    ) -> Result<GroupInfo, EngineError> {
        let (id, effects) = match self.groups.handle_join_response(invite, response, now_ms()) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        let view = self.view(&id)?;
        self.update_gauges(id, view.epoch, view.members.len());
        let _ = self.events.send(NodeEvent::GroupJoined(summary(&view)));
        let key = id.provider_key(self.groups.network());
        let _ = self.net.provide_blocking(key);
        let _ = self.net.find_providers_blocking(key);
        // Fetch what was sent in the new epoch before our subscription reached the mesh.
        self.sync_input(sched::Input::Sync {
            group: id,
            trigger: sched::Trigger::Routine,
        });
        // And again shortly after: a concurrent commit that beat the one adding us may have
        // been published before we subscribed; history sync brings it, and we join again.
        self.follow_up_syncs(id);
        self.send_own_profile(id);
        tracing::info!(group = %id.short(), name = %view.meta.name, epoch = view.epoch, "joined group");
        Ok(group_info(&view, self.me))
    }

    /// Syncs `id` again after each of [`JOIN_FOLLOW_UP_SYNCS`] (after a join or a rejoin,
    /// when commits published just before our state was set up may have been missed).
    pub(super) fn follow_up_syncs(&self, id: GroupId) {
        let tx = self.tx.clone();
        self.runtime.spawn(async move {
            for pause in JOIN_FOLLOW_UP_SYNCS {
                tokio::time::sleep(pause).await;
                if tx.send(Input::SyncGroup(id)).await.is_err() {
                    return;
                }
            }
        });
    }

    /// Sends a text message to group `q` (`POST /v1/groups/{group}/messages`).
    pub fn send(&mut self, q: &str, text: &str) -> Result<MessageInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let groups = &mut self.groups;
        let sent = timed(&self.metrics, CpuPart::Mls, || {
            groups.send_text(id, text, now_ms())
        });
        let (entry, effects) = match sent {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        self.metrics.message_sent();
        self.check_self_updates = true;
        Ok(self
            .history_view(&id, std::slice::from_ref(&entry))
            .remove(0))
    }
}
