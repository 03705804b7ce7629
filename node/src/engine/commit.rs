//! Effects out: one store transaction per batch of engine effects, then the network and
//! the API; the flush, prune, past-epoch expiry, re-send and held-removal ticks; rollback
//! after a failed commit.

use super::*;

impl Actor {
    /// Writes effects' records and the staged MLS state in one transaction, then performs
    /// the network and notification effects. On failure, rolls memory back to disk.
    pub(super) fn apply(&mut self, effects: Vec<Effect>) -> Result<(), EngineError> {
        self.apply_with(effects, true)
    }

    /// [`Actor::apply`] with a choice of durability: received messages are committed
    /// without fsync (atomic, lost together with their MLS state on a crash, made durable
    /// within [`FLUSH_INTERVAL`]); everything this node originates is durable before it is
    /// published, so a crash can never make it reuse a sender key generation.
    ///
    /// A batch that publishes anything is always durable, whatever the caller asked: a
    /// received message can make this node commit (e.g. a leave proposal it must commit),
    /// and a commit others may already apply must never be lost here by a crash.
    pub(super) fn apply_with(
        &mut self,
        mut effects: Vec<Effect>,
        durable: bool,
    ) -> Result<(), EngineError> {
        self.drop_known_undecryptable(&mut effects);
        self.want_resend(&effects)?;
        let durable = durable || publishes(&effects);
        crashpoint::reached_when(Point::Commit, || crashpoint::merges_commit(&effects));
        let batch = Batch::from_effects(&effects);
        if !batch.is_empty() || self.store.has_staged() {
            match self.commit_with(batch, durable) {
                // A text this node held already (sent again on another member's request)
                // is not announced a second time.
                Ok(already) if !already.is_empty() => {
                    effects.retain(|e| !matches!(e, Effect::Record(h) if already.contains(&h.id)))
                }
                Ok(_) => {}
                Err(e) => {
                    self.rollback();
                    return Err(e.into());
                }
            }
        }
        crashpoint::reached_when(Point::Send, || publishes(&effects));
        self.after_commit(effects);
        Ok(())
    }

    /// Drops the [`Effect::Undecryptable`]s of envelopes this node already holds
    /// ([`kith_protocol::group::drop_held_undecryptable`]); a store read error counts as held.
    pub(super) fn drop_known_undecryptable(&self, effects: &mut Vec<Effect>) {
        kith_protocol::group::drop_held_undecryptable(effects, |id| {
            self.store.has_message(id).unwrap_or(true)
        });
    }

    /// Asks, in the same commit, for the texts of the envelopes this node truly cannot
    /// decrypt: their senders send them again (see `GroupEngine::resend_tick`).
    pub(super) fn want_resend(&mut self, effects: &[Effect]) -> Result<(), EngineError> {
        if let Err(e) = self.groups.want_resend_for(effects) {
            self.rollback();
            return Err(e.into());
        }
        Ok(())
    }

    /// Sends what the re-send tick has due: requests for texts this node cannot decrypt,
    /// and the texts members asked it for.
    pub(super) fn resend_tick(&mut self) {
        if !self.disk_ok() {
            return;
        }
        let result = self
            .groups
            .resend_tick(now_ms())
            .map_err(EngineError::from)
            .and_then(|fx| self.apply_with(fx, false));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot send re-send requests or answers");
            self.rollback();
        }
    }

    /// Merges the held commits that remove this node whose grace has ended
    /// (`GroupEngine::removal_tick`): until then it still read messages of its last epoch.
    /// Not durable, like any received commit (the next flush makes it so).
    pub(super) fn removal_tick(&mut self) {
        if !self.disk_ok() {
            return;
        }
        let effects = self.groups.removal_tick(now_ms());
        if let Err(e) = self.apply_with(effects, false) {
            tracing::warn!(error = %e, "cannot merge a held removal");
        }
    }

    /// Commits a batch, timing it for `kith_store_commit_seconds`.
    pub(super) fn commit_with(
        &mut self,
        batch: Batch,
        durable: bool,
    ) -> Result<Vec<MessageId>, StoreError> {
        if !self.disk_ok() {
            // Memory may be ahead of the file until the MLS state is reloaded from it.
            return Err(self.store.refusal());
        }
        let started = Instant::now();
        let result = timed(&self.metrics, CpuPart::Store, || {
            self.store.commit_with(batch, durable)
        });
        self.metrics.store_commit(started.elapsed());
        if result.is_ok() {
            // A durable commit also makes every earlier non-durable one durable.
            self.unflushed = !durable;
        }
        result
    }

    /// Deletes history and envelopes beyond the retention policy, at most [`PRUNE_BUDGET`]
    /// history rows per run, in non-durable commits (made durable by the next flush).
    pub(super) fn prune(&mut self) {
        if !self.disk_ok() {
            // The next prune tick after the store recovers catches up.
            return;
        }
        let groups = match self.store.groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot list groups to prune");
                return;
            }
        };
        let mut budget = PRUNE_BUDGET;
        let mut more = false;
        for g in groups {
            if budget == 0 {
                more = true;
                break;
            }
            match self.store.prune(&g.id, self.retention, now_ms(), budget) {
                Ok(p) => {
                    if p.history > 0 || p.envelopes > 0 {
                        self.unflushed = true;
                        tracing::info!(group = %g.id.short(), history = p.history, envelopes = p.envelopes, "pruned old history");
                    }
                    budget = budget.saturating_sub(p.history);
                    more |= p.more;
                }
                Err(e) => tracing::error!(group = %g.id.short(), error = %e, "prune failed"),
            }
        }
        let before = (now_ms() / 1000).saturating_sub(INVITE_RECORD_GRACE_SECS);
        match self.store.prune_invites(before, PRUNE_BUDGET) {
            Ok(0) => {}
            Ok(n) => {
                self.unflushed = true;
                tracing::info!(invites = n, "deleted expired invite records");
            }
            Err(e) => tracing::error!(error = %e, "cannot prune invites"),
        }
        if more {
            let _ = self.tx.try_send(Input::Prune);
        }
    }

    /// Drops the secrets of past epochs this node left `past_epoch_ttl` ago and stores the
    /// result (on every flush tick; nothing is written while nothing is due).
    pub(super) fn expire_past_epochs(&mut self) {
        if !self.disk_ok() {
            return;
        }
        let result = self
            .groups
            .expire_past_epochs(now_ms(), self.past_epoch_ttl)
            .map_err(EngineError::from)
            .and_then(|done| {
                self.metrics.past_epochs_expired(done.epochs);
                if done.staged {
                    self.apply_with(Vec::new(), false)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot expire past epochs");
            self.rollback();
        }
    }

    pub(super) fn flush(&mut self) {
        // While the store fails, what was not flushed is gone with the reopened file.
        if self.unflushed && self.store.is_writable() {
            crashpoint::reached(Point::Flush);
            match timed(&self.metrics, CpuPart::Store, || self.store.flush()) {
                Ok(()) => self.unflushed = false,
                Err(e) => tracing::error!(error = %e, "cannot flush the store"),
            }
        }
    }

    /// Tells the file service who the members of `group` are now (nobody once this node
    /// is no longer in it): it serves files only to them.
    pub(super) fn share_members(&self, group: GroupId) {
        let members = self
            .groups
            .groups()
            .iter()
            .find(|v| v.meta.id == group && v.active)
            .map(|v| v.members.iter().map(|(_, p)| *p).collect())
            .unwrap_or_default();
        self.files.set_members(group, members);
    }

    /// Files up to this size posted in `group` are fetched when their message arrives.
    pub(super) fn auto_download_limit(&self, group: &GroupId) -> u64 {
        match self.files.store().auto_download(*group) {
            Ok(Some(limit)) => limit,
            Ok(None) => self.files.policy().auto_download_bytes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a group's file setting");
                self.files.policy().auto_download_bytes
            }
        }
    }

    /// Deletes the content of files whose messages were deleted or pruned.
    pub(super) fn sweep_gone_files(&mut self) {
        let gone = match self.store.gone_files(256) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read deleted files");
                return;
            }
        };
        if gone.is_empty() {
            return;
        }
        let done = self.files.forget(&gone);
        if let Err(e) = self.store.forget_gone_files(&done) {
            tracing::warn!(error = %e, "cannot note deleted files");
        }
    }

    pub(super) fn update_gauges(&mut self, group: GroupId, epoch: u64, members: usize) {
        let metrics = &self.metrics;
        self.gauges
            .entry(group)
            .or_insert_with(|| metrics.group_gauges(&group))
            .set(epoch, members);
    }

    pub(super) fn rollback(&mut self) {
        let generation = self.store.generation();
        self.store.discard_staged();
        match self.groups.reload_all() {
            Ok(()) => self.disk.loaded(generation),
            Err(e) => {
                self.disk.reload_failed();
                tracing::error!(error = %e, "cannot reload group state after a failed write");
            }
        }
    }

    pub(super) fn after_commit(&mut self, effects: Vec<Effect>) {
        let invites_changed = effects
            .iter()
            .any(|e| matches!(e, Effect::Invite(_) | Effect::ForgetInvites { .. }));
        let mut rolled_back = Vec::new();
        let mut behind = Vec::new();
        let mut epoch_changed = Vec::new();
        for e in effects {
            let sent = match e {
                Effect::Publish { topic, data } => self.net.publish_blocking(topic, data),
                Effect::Subscribe(t, key) => self.net.subscribe_blocking(t, key),
                Effect::Unsubscribe(t) => self.net.unsubscribe_blocking(t),
                Effect::Record(h) => {
                    if let EntryKind::File { file, .. } = &h.kind {
                        let limit = self.auto_download_limit(&h.group);
                        self.files.posted(h.group, h.sender, file, limit);
                    }
                    // Counted before it is announced, so whoever sees the event sees the count.
                    if h.sender != self.me && h.kind.text().is_some() {
                        self.metrics.messages_received(1);
                    }
                    if self.events.receiver_count() == 0 {
                        // Nobody listens: no view to build.
                    } else if h.kind.target().is_some() {
                        // A reaction, edit or delete: shown on its message.
                        self.chat_event(&Effect::Record(h));
                    } else {
                        let info = match h.kind.text() {
                            Some(_) => self
                                .history_view(&h.group, std::slice::from_ref(&h))
                                .remove(0),
                            None => message_info(&h),
                        };
                        let _ = self.events.send(NodeEvent::Message(Box::new(info)));
                    }
                    Ok(())
                }
                e @ (Effect::Profile { .. }
                | Effect::Receipt { .. }
                | Effect::Typing { .. }
                | Effect::DirectOffer { .. }) => {
                    self.chat_event(&e);
                    Ok(())
                }
                Effect::EpochChanged {
                    group,
                    epoch,
                    member_count,
                } => {
                    self.update_gauges(group, epoch, member_count);
                    epoch_changed.push(group);
                    let _ = self.events.send(NodeEvent::EpochChanged {
                        group: group.to_string(),
                        epoch,
                        member_count,
                    });
                    Ok(())
                }
                Effect::RolledBack {
                    group, to_epoch, ..
                } => {
                    self.metrics.rollback();
                    tracing::info!(group = %group.short(), to_epoch, "rolled back to the winning branch");
                    rolled_back.push(group);
                    Ok(())
                }
                Effect::DeepForkLost {
                    group,
                    epoch,
                    commit,
                    members,
                } => {
                    self.metrics.deep_fork();
                    let handle = self.handle.clone();
                    self.runtime.spawn(async move {
                        handle.rejoin_member(group, epoch, commit, members).await
                    });
                    Ok(())
                }
                Effect::JoinLost { group, link, by } => {
                    let handle = self.handle.clone();
                    self.runtime
                        .spawn(async move { handle.rejoin(group, link, by).await });
                    Ok(())
                }
                Effect::Behind { group, missing } => {
                    tracing::debug!(group = %group.short(), missing, "messages missing before a live one; fetching history first");
                    behind.push(group);
                    Ok(())
                }
                Effect::Undecryptable { envelope, reason } => {
                    self.metrics.undecryptable(reason);
                    if self.warned_undecryptable.insert(envelope.group) {
                        tracing::warn!(
                            group = %envelope.group.short(),
                            msg = %envelope.id.short(),
                            epoch = envelope.epoch,
                            reason = reason.label(),
                            "a message of this group cannot be decrypted: {reason}; asking the group for it again (until its sender answers it counts as lost in `kith group show`; further ones are logged at debug)"
                        );
                    } else {
                        tracing::debug!(group = %envelope.group.short(), msg = %envelope.id.short(), reason = reason.label(), "undecryptable message");
                    }
                    Ok(())
                }
                Effect::Recovered { group, envelope } => {
                    self.metrics.recovered();
                    tracing::debug!(group = %group.short(), msg = %envelope.short(), "a message that could not be decrypted arrived again from its sender");
                    Ok(())
                }
                Effect::SaveGroup(_)
                | Effect::SaveEnvelope(_)
                | Effect::Direct { .. }
                | Effect::Invite(_)
                | Effect::ForgetInvites { .. }
                | Effect::LinkEnvelope { .. } => Ok(()),
            };
            if sent.is_err() {
                tracing::warn!("network task has stopped; effect dropped");
            }
        }
        if invites_changed {
            self.announce_invites(false);
        }
        // Membership changed: is every verified member still the key that was verified?
        for group in epoch_changed {
            self.share_members(group);
            self.check_verifications(group);
        }
        // The winning branch's messages sent so far are on other members only: fetch them
        // now rather than at the next routine sync.
        // A sender's messages are missing before live ones held now: fetch them.
        for group in rolled_back.into_iter().chain(behind) {
            self.sync_input(sched::Input::Sync {
                group,
                trigger: sched::Trigger::Gap,
            });
        }
    }
}
