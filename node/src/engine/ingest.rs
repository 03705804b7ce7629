//! Envelopes in: gossip batches and fetched history go through [`Actor::ingest`]; the sync
//! scheduler's inputs and outputs; answering members' sync requests.

use super::*;

impl Actor {
    /// Processes received envelopes, reports each verdict to gossipsub as soon as MLS has
    /// judged it (forwarding does not wait for our disk), then stores all of them in one
    /// transaction. If that write fails, the MLS state is rolled back to disk and the
    /// messages are lost for this node only (they were valid, so forwarding them was right;
    /// history sync can fetch them again).
    pub(super) fn on_gossip(&mut self, batch: Vec<(MessageId, PeerId, Vec<u8>, Instant)>) {
        let mut effects = Vec::new();
        let mut seen: HashSet<MessageId> = HashSet::new();
        // While the disk cannot be written, nothing is processed (it could not be stored):
        // other members hold these messages, and history sync fetches them once it can.
        let writable = self.disk_ok();
        for (id, source, data, arrived) in batch {
            let verdict = if !seen.insert(id) {
                Verdict::Ignore(IgnoreReason::Duplicate)
            } else if !writable {
                Verdict::Ignore(IgnoreReason::Storage)
            } else {
                let held = timed(&self.metrics, CpuPart::Store, || {
                    self.store.has_message(&id)
                });
                match held {
                    Ok(true) => Verdict::Ignore(IgnoreReason::Duplicate),
                    Ok(false) => {
                        let groups = &mut self.groups;
                        let (verdict, fx) = timed(&self.metrics, CpuPart::Mls, || {
                            groups.handle_envelope(&data, now_ms())
                        });
                        effects.extend(fx);
                        if matches!(verdict, Verdict::Ignore(_)) {
                            self.observe_gap(&data);
                        }
                        verdict
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store read failed");
                        Verdict::Ignore(IgnoreReason::Storage)
                    }
                }
            };
            self.metrics.envelope(&verdict);
            match &verdict {
                Verdict::Reject(why) => {
                    tracing::warn!(msg = %id.short(), from = %source, reason = %why, "rejected gossip message")
                }
                Verdict::Ignore(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "ignored gossip message")
                }
                Verdict::Accept => tracing::debug!(msg = %id.short(), "accepted gossip message"),
            }
            match (forward::forwarding(&verdict), verdict) {
                (Some(now), _) => {
                    let _ = self.net.validate_blocking(id, source, &now);
                }
                (None, Verdict::Ignore(why)) => {
                    let since = now_ms().saturating_sub(arrived.elapsed().as_millis() as u64);
                    if !self.deferred.insert(id, source, since, why.clone()) {
                        let _ = self
                            .net
                            .validate_blocking(id, source, &Verdict::Ignore(why));
                    }
                }
                (None, verdict) => {
                    let _ = self.net.validate_blocking(id, source, &verdict);
                }
            }
        }
        crashpoint::reached(Point::Ingest);
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(error = %e, "cannot store received messages; they are lost on this node");
            self.metrics.envelope_ignored(&IgnoreReason::Storage);
        }
        self.settle_deferred();
    }

    /// If `data` is an envelope of a group this node is behind in, tells the sync scheduler
    /// (its gap detector starts a sync when it signals).
    pub(super) fn observe_gap(&mut self, data: &[u8]) {
        let Ok(env) = Envelope::decode(data) else {
            return;
        };
        let group = env.group();
        let Some(current_epoch) = self.groups.group_epoch(&group) else {
            return;
        };
        self.sync_input(sched::Input::FutureEpoch {
            group,
            seen_epoch: env.epoch(),
            current_epoch,
        });
    }

    /// Processes envelopes fetched by history sync for `group`, in the given order, like
    /// gossip but without reporting verdicts: ones already stored are skipped, and
    /// everything is written in one transaction. Live envelopes held meanwhile are processed
    /// when the run ends (`GroupEngine::handle_synced_envelope`). Returns how many were
    /// accepted.
    pub(super) fn ingest(&mut self, group: GroupId, envelopes: Vec<Vec<u8>>) -> usize {
        if !self.disk_ok() {
            // Fetched again by the sync started when the store recovers.
            return 0;
        }
        let new: Vec<Vec<u8>> = envelopes
            .into_iter()
            .filter(|data| match self.store.has_message(&MessageId::of(data)) {
                Ok(held) => !held,
                Err(e) => {
                    tracing::error!(error = %e, "store read failed");
                    false
                }
            })
            .collect();
        // Each sender's messages are read in position order, whatever order the answers
        // brought them in (`GroupEngine::handle_synced_batch`).
        let (verdicts, effects) = self.groups.handle_synced_batch(new, now_ms());
        let mut accepted = 0;
        for (id, verdict) in verdicts {
            match verdict {
                Verdict::Accept => accepted += 1,
                Verdict::Reject(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "rejected synced envelope");
                }
                Verdict::Ignore(why) => {
                    tracing::debug!(msg = %id.short(), reason = %why, "ignored synced envelope");
                }
            }
        }
        crashpoint::reached(Point::Sync);
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(group = %group.short(), error = %e, "cannot store synced messages");
            return 0;
        }
        self.settle_deferred();
        accepted
    }

    /// The active groups.
    pub(super) fn active_groups(&self) -> Vec<GroupId> {
        self.groups
            .groups()
            .iter()
            .filter(|v| v.active)
            .map(|v| v.meta.id)
            .collect()
    }

    /// Feeds `input` to the sync scheduler and performs its outputs. Inputs that arise while
    /// outputs are performed (reading fetched envelopes can reveal another gap) are queued
    /// and fed after the current outputs, so the scheduler sees them in order.
    pub(super) fn sync_input(&mut self, input: sched::Input) {
        self.sync_queue.push_back(input);
        if self.sync_busy {
            return;
        }
        self.sync_busy = true;
        while let Some(input) = self.sync_queue.pop_front() {
            let now = self.clock.elapsed().as_millis() as sched::Millis;
            let mut ctx = SyncContext {
                writable: self.disk_ok(),
                groups: &self.groups,
                store: &self.store,
                net: &self.net,
                me: self.me,
            };
            let outputs = self.sync.handle(now, input, &mut ctx);
            for output in outputs {
                self.perform_sync(now, output);
            }
        }
        self.sync_busy = false;
    }

    /// Performs one output of the sync scheduler.
    pub(super) fn perform_sync(&mut self, now: sched::Millis, output: sched::Output) {
        match output {
            sched::Output::Request { peer, id, request } => {
                let net = self.net.clone();
                let tx = self.tx.clone();
                self.runtime.spawn(async move {
                    let result = net.sync(peer, *request).await;
                    let _ = tx.send(Input::SyncReply { id, result }).await;
                });
            }
            sched::Output::ScheduleTimer { at } => {
                let tx = self.tx.clone();
                let wait = Duration::from_millis(at.saturating_sub(now));
                self.runtime.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Input::SyncTimer).await;
                });
            }
            sched::Output::BeginHold { group } => self.groups.begin_catch_up(&group, now_ms()),
            sched::Output::Ingest { group, envelopes } => {
                let accepted = self.ingest(group, envelopes);
                *self.fetched.entry(group).or_default() += accepted;
            }
            sched::Output::EndHold { group, in_time } => self.end_catch_up(group, in_time),
            sched::Output::RunEnded {
                group,
                complete,
                started,
            } => {
                let fetched = self.fetched.remove(&group).unwrap_or(0);
                tracing::debug!(group = %group.short(), complete, fetched, took_ms = now.saturating_sub(started), "history sync ended");
                if fetched > 0 {
                    tracing::info!(group = %group.short(), fetched, "fetched missed history");
                    let _ = self.events.send(NodeEvent::HistorySynced {
                        group: group.to_string(),
                        fetched,
                    });
                }
            }
            sched::Output::NotAMember { group } => {
                // If we joined recently, the commit that added us may have lost.
                if let Some(fx) = self.groups.member_says_not_in(&group) {
                    self.after_commit(vec![fx]);
                }
            }
        }
    }

    /// Processes the live envelopes of `group` held during its catch-up, after the fetched
    /// (older) ones.
    /// With `in_time` false (the hold ran out of time) they are read whatever positions
    /// are still missing.
    pub(super) fn end_catch_up(&mut self, group: GroupId, in_time: bool) {
        let effects = if in_time {
            self.groups.end_catch_up(&group, now_ms())
        } else {
            self.groups.end_catch_up_now(&group, now_ms())
        };
        if let Err(e) = self.apply_with(effects, false) {
            tracing::error!(error = %e, "cannot store messages held during history sync");
        }
    }

    /// Answers a sync request from `peer`.
    ///
    /// Membership: the transport authenticated `peer` (Noise), and every member's MLS
    /// credential binds its PeerId to its leaf key (see `kith_protocol::group::bound_peer`), so
    /// `peer` being in the group's current member list proves membership. The request's
    /// `proof` field is therefore not checked (it is reserved for relayed requests, where the
    /// transport peer is not the requester).
    pub(super) fn on_sync_request(&mut self, peer: PeerId, request: SyncRequest) -> SyncResponse {
        let group = *request.group();
        let now = Instant::now();
        if !self.limiter.allow(peer, now) {
            tracing::debug!(%peer, "sync request rate-limited");
            return SyncResponse::Refused(SyncRefusal::RateLimited);
        }
        let Some(view) = self.groups.group(&group).filter(|v| v.active) else {
            return SyncResponse::Refused(SyncRefusal::UnknownGroup);
        };
        if !view.members.iter().any(|(_, p)| *p == peer) {
            tracing::debug!(%peer, group = %group.short(), "sync request from a non-member");
            return SyncResponse::Refused(SyncRefusal::NotMember);
        }
        // The summary names the requester's commit per epoch: its branch. If it differs from
        // ours, fetch its commits too, so the concurrent-commit rule can decide on our side.
        let held: Vec<(u64, MessageId)> = request
            .summary()
            .map(|s| {
                s.epochs
                    .iter()
                    .filter_map(|e| Some((e.epoch, e.commit?)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(epoch) = self.groups.detect_fork(&group, held) {
            tracing::warn!(%peer, group = %group.short(), epoch, "fork detected: this member holds another commit for the epoch");
            self.metrics.fork_detected();
            self.sync_input(sched::Input::ForkSeen { group, peer });
        }
        let envelopes = match self.store.envelopes_of_group(&group, MAX_SCAN_ENVELOPES) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(%peer, group = %group.short(), error = %e, "cannot read envelopes to answer a sync request; refused as unavailable");
                return SyncResponse::Refused(SyncRefusal::Unavailable);
            }
        };
        let mut items = Vec::with_capacity(envelopes.len());
        for env in &envelopes {
            match env.kind {
                PayloadKind::Commit => items.push(SyncItem::commit(env)),
                PayloadKind::Application => match self.store.history_entry(&env.id) {
                    Ok(Some(h)) => items.push(SyncItem::application(env, h.sent_at_ms, &h.sender)),
                    // Invite states after an Add: a new member fetches them here.
                    Ok(None) => items.push(SyncItem::unrecorded(env, &self.me)),
                    Err(e) => {
                        // Skipping it would send a page that claims to be complete but is not.
                        tracing::error!(%peer, group = %group.short(), error = %e, "cannot read a history entry to answer a sync request; refused as unavailable");
                        return SyncResponse::Refused(SyncRefusal::Unavailable);
                    }
                },
                PayloadKind::Proposal => {}
            }
        }
        let (response, bytes) = respond(&request, &items);
        self.limiter.charge(peer, bytes, now);
        tracing::debug!(%peer, group = %group.short(), bytes, "serving history sync");
        response
    }
}

/// What the sync scheduler asks the actor when it starts a run.
pub(super) struct SyncContext<'a> {
    writable: bool,
    groups: &'a GroupEngine<KithProvider>,
    store: &'a Store,
    net: &'a NetHandle,
    me: PeerId,
}

impl sched::Context for SyncContext<'_> {
    fn writable(&mut self) -> bool {
        self.writable
    }

    fn candidates(&mut self, group: &GroupId) -> Option<Vec<PeerId>> {
        let view = self.groups.group(group).filter(|v| v.active)?;
        let connected: HashSet<PeerId> = self
            .net
            .info_blocking()
            .ok()?
            .connected
            .into_iter()
            .collect();
        Some(
            view.members
                .iter()
                .map(|(_, p)| *p)
                .filter(|p| *p != self.me && connected.contains(p))
                .collect(),
        )
    }

    /// What this node holds of `group`, and its summary with the floor at the epoch it
    /// joined at.
    fn holdings(&mut self, group: &GroupId) -> Option<(Holdings, Summary)> {
        let read = || -> Result<(Holdings, Summary), StoreError> {
            let envelopes = self.store.envelopes_of_group(group, MAX_SCAN_ENVELOPES)?;
            let floor = self.store.first_history_epoch(group)?.unwrap_or(0);
            let holdings = Holdings::new(envelopes.iter());
            let summary = holdings.summary().with_floor(floor);
            Ok((holdings, summary))
        };
        read()
            .inspect_err(|e| tracing::error!(error = %e, "cannot summarise stored envelopes"))
            .ok()
    }
}
