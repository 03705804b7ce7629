//! This node's own operations, from API calls: create, invite, send, remove, leave,
//! self-update; resolving a group by id, prefix or name.

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

    pub(super) fn on_call(&mut self, call: Call) {
        let Some(call) = self.refuse_unwritable(call) else {
            return;
        };
        match call {
            Call::Groups(r) => {
                let list = self
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
                        GroupSummary {
                            held,
                            in_sync: held == 0
                                && !self.sync.is_running(&id)
                                && !self.sync.is_unsynced(&id)
                                && !self.groups.is_catching_up(&id),
                            undecryptable,
                            missing: self.groups.missing_messages(&id),
                            sync_failures: self.sync.failures(&id),
                            ..summary(v)
                        }
                    })
                    .collect();
                let _ = r.send(Ok(list));
            }
            Call::Group(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let v = self.view(&id)?;
                    let undecryptable = self
                        .store
                        .undecryptable_counts(&id)?
                        .into_iter()
                        .map(|(reason, n)| (reason.label().to_owned(), n))
                        .collect();
                    Ok(GroupInfo {
                        undecryptable,
                        missing: self.groups.missing_messages(&id),
                        catching_up: self.groups.is_catching_up(&id),
                        sync_failures: self.sync.failures(&id),
                        ..group_info(&v, self.me)
                    })
                });
                let _ = r.send(res);
            }
            Call::CreateGroup(name, r) => {
                let _ = r.send(self.create_group(&name));
            }
            Call::CreateInvite(q, req, r) => {
                let _ = r.send(self.create_invite(&q, req));
            }
            Call::ListInvites(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let now = now_ms() / 1000;
                    let mut list: Vec<InviteRecord> = self
                        .store
                        .invites()?
                        .into_iter()
                        .filter(|r| r.group == id)
                        .collect();
                    list.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
                    Ok(list.iter().map(|r| invite_summary(r, now)).collect())
                });
                let _ = r.send(res);
            }
            Call::RevokeInvite(q, which, r) => {
                let _ = r.send(self.revoke_invite(&q, &which));
            }
            Call::JoinRequests(q, r) => {
                let res = self.resolve(&q).map(|id| {
                    self.held.expire(now_ms());
                    self.held.of_group(id).into_iter().map(held_info).collect()
                });
                let _ = r.send(res);
            }
            Call::DecideJoin(q, which, approve, r) => {
                let _ = r.send(self.decide_join(&q, &which, approve));
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
            Call::Send(q, text, r) => {
                let sent = self.send(&q, &text);
                let ok = sent.is_ok();
                let _ = r.send(sent);
                // The message count may just have reached `[keys] update_after_messages`.
                if ok {
                    self.self_updates();
                }
            }
            Call::RemoveMember(q, peer, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.remove_member(id, peer, now_ms());
                    self.commit_local(id, fx)
                });
                if res.is_ok() {
                    tracing::info!(group = %q, %peer, "removed a member");
                }
                let _ = r.send(res);
            }
            Call::LeaveGroup(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.leave_group(id, now_ms());
                    self.commit_local(id, fx)
                });
                if res.is_ok() {
                    tracing::info!(group = %q, "asked to leave the group");
                }
                let _ = r.send(res);
            }
            Call::SelfUpdate(q, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    let fx = self.groups.self_update(id, now_ms());
                    self.commit_local(id, fx)
                });
                let _ = r.send(res);
            }
            Call::History(q, limit, r) => {
                let res = self.resolve(&q).and_then(|id| {
                    Ok(self
                        .store
                        .history(&id, limit.clamp(1, MAX_HISTORY))?
                        .iter()
                        .map(message_info)
                        .collect())
                });
                let _ = r.send(res);
            }
        }
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
        Ok(group_info(&self.view(&id)?, self.me))
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

    pub(super) fn create_group(&mut self, name: &str) -> Result<GroupInfo, EngineError> {
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

    pub(super) fn create_invite(
        &mut self,
        q: &str,
        req: CreateInviteRequest,
    ) -> Result<InviteInfo, EngineError> {
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
            .map(|i| invite_addrs(i.listen_addrs))
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
        })
    }

    /// Revokes invite `which` (id or unique prefix) of group `q` for the whole group.
    pub(super) fn revoke_invite(
        &mut self,
        q: &str,
        which: &str,
    ) -> Result<InviteSummary, EngineError> {
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

    pub(super) fn send(&mut self, q: &str, text: &str) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        let (entry, effects) = match self.groups.send_text(id, text, now_ms()) {
            Ok(x) => x,
            Err(e) => {
                self.rollback();
                return Err(e.into());
            }
        };
        self.apply(effects)?;
        self.metrics.message_sent();
        Ok(message_info(&entry))
    }
}
