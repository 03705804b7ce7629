//! The joiner's side of joining and rejoining, run as async tasks on the handle: find
//! members through the DHT, ask them in turn, follow a held request, and report each stage
//! (`JoinStage`) as it goes.

use super::*;

impl EngineHandle {
    /// [`EngineHandle::join`] with a time limit (`None`: [`DEFAULT_JOIN_TIMEOUT`]).
    pub async fn join_with_timeout(
        &self,
        link: String,
        timeout: Option<Duration>,
    ) -> Result<GroupInfo, EngineError> {
        let result = self.join_inner(link, timeout, None).await;
        self.metrics.join(match &result {
            Ok(_) => JoinResult::Joined,
            Err(EngineError::JoinRejected(_)) => JoinResult::Refused,
            Err(EngineError::Unreachable(_) | EngineError::TimedOut(_)) => JoinResult::Unreachable,
            Err(EngineError::Invite(_)) => JoinResult::BadInvite,
            Err(_) => JoinResult::Error,
        });
        result
    }

    pub(super) fn progress(&self, group: GroupId, stage: JoinStage) {
        let _ = self.events.send(NodeEvent::JoinProgress {
            group: group.to_string(),
            stage,
        });
    }

    /// Joins by `link` within `timeout`; `prefer` is a member to ask before anyone else (the
    /// member who added us, when joining again after a lost race).
    pub(super) async fn join_inner(
        &self,
        link: String,
        timeout: Option<Duration>,
        prefer: Option<PeerId>,
    ) -> Result<GroupInfo, EngineError> {
        // A damaged, forged, expired or foreign link is refused here, before any traffic.
        let invite = Invite::parse(&link)?;
        invite.check(&self.network, now_ms() / 1000)?;
        let timeout = timeout.unwrap_or(DEFAULT_JOIN_TIMEOUT);
        if timeout.is_zero() || timeout > MAX_JOIN_TIMEOUT {
            return Err(EngineError::BadRequest(format!(
                "the join time limit must be between 1 second and {} minutes",
                MAX_JOIN_TIMEOUT.as_secs() / 60
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let group = invite.group;
        self.progress(
            group,
            JoinStage::FindingMembers {
                timeout_secs: timeout.as_secs(),
            },
        );
        let request = self
            .call(|r| Call::PrepareJoin(Box::new(invite.clone()), r))
            .await?;
        // Look the invite up in the DHT while the inviter is tried.
        let lookup_providers = || {
            let net = self.net.clone();
            let key = invite.rendezvous_key();
            tokio::spawn(async move { net.get_providers(key).await })
        };
        let mut lookup = Some(lookup_providers());
        let mut lookups = 1;
        let mut tried: HashSet<PeerId> = HashSet::new();
        let mut trail = Trail::new(invite.addrs.len());
        let mut unknown: Option<JoinRejection> = None;
        // Connecting is harmless, so the inviter is dialled while the DHT is searched: a
        // dead or black-holed link address then costs nothing if a member answers there
        // first. The request itself goes to one member at a time (two members could
        // otherwise both add us).
        self.progress(
            group,
            JoinStage::Contacting {
                peer: invite.inviter.to_string(),
                via: "link".to_owned(),
            },
        );
        let mut inviter_dial = {
            let net = self.net.clone();
            let (peer, addrs) = (invite.inviter, invite.addrs.clone());
            let limit = deadline.min(tokio::time::Instant::now() + JOIN_DIAL_TIMEOUT);
            Some(tokio::spawn(async move {
                tokio::time::timeout_at(limit, net.connect(peer, addrs)).await
            }))
        };
        let mut candidates: Vec<(PeerId, Vec<Multiaddr>, &'static str)> = prefer
            .filter(|p| *p != self.peer_id)
            .map(|p| (p, Vec::new(), "member"))
            .into_iter()
            .collect();
        let inviter_entry = (invite.inviter, invite.addrs.clone(), "link");
        while candidates.is_empty() && (inviter_dial.is_some() || lookup.is_some()) {
            tokio::select! {
                // The inviter first when both are ready.
                biased;
                dialled = async { inviter_dial.as_mut().expect("guarded").await },
                    if inviter_dial.is_some() =>
                {
                    inviter_dial = None;
                    match dialled {
                        Ok(Ok(Ok(()))) => candidates.push(inviter_entry.clone()),
                        Ok(Ok(Err(e))) => {
                            tracing::info!(group = %group.short(), peer = %invite.inviter, error = %e, "cannot connect to the inviter");
                            trail.inviter = Some(Miss::CannotConnect);
                        }
                        _ => trail.inviter = Some(Miss::ConnectTimedOut),
                    }
                }
                found = async { lookup.as_mut().expect("guarded").await },
                    if lookup.is_some() =>
                {
                    lookup = None;
                    let found = match found {
                        Ok(Ok(peers)) => peers,
                        _ => Vec::new(),
                    };
                    candidates.extend(
                        found
                            .into_iter()
                            .filter(|p| *p != self.peer_id && *p != invite.inviter)
                            .take(MAX_JOIN_CANDIDATES)
                            .map(|p| (p, Vec::new(), "dht")),
                    );
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out(timeout, &trail, lookups));
                }
            }
        }
        if let Some(dial) = inviter_dial.take() {
            // Members answered in the DHT first; the inviter stays a fallback.
            dial.abort();
            candidates.push(inviter_entry);
        }
        loop {
            if candidates.is_empty() {
                let task = match lookup.take() {
                    Some(task) => task,
                    // A node that just started may not have DHT peers yet, and a member may
                    // be announcing right now: look again, less often, until the time limit.
                    // Once a member said it does not know the invite, a few more looks
                    // suffice: that is most likely the answer.
                    None if tokio::time::Instant::now() + lookup_pause(lookups) < deadline
                        && (unknown.is_none() || lookups < UNKNOWN_INVITE_LOOKUPS) =>
                    {
                        tokio::time::sleep(lookup_pause(lookups)).await;
                        lookups += 1;
                        lookup_providers()
                    }
                    None => break,
                };
                let found = match tokio::time::timeout_at(deadline, task).await {
                    Ok(Ok(Ok(peers))) => peers,
                    Ok(_) => Vec::new(),
                    Err(_) => return Err(self.timed_out(timeout, &trail, lookups)),
                };
                tracing::debug!(group = %group.short(), found = found.len(), "members found in the DHT");
                candidates.extend(
                    found
                        .into_iter()
                        .filter(|p| *p != self.peer_id && !tried.contains(p))
                        .take(MAX_JOIN_CANDIDATES)
                        .map(|p| (p, Vec::new(), "dht")),
                );
                if candidates.is_empty() {
                    continue;
                }
            }
            let (peer, addrs, via) = candidates.remove(0);
            if !tried.insert(peer) {
                continue;
            }
            match self
                .attempt(group, peer, addrs, via, &request, deadline)
                .await
            {
                Attempt::Accepted(response) => {
                    self.progress(
                        group,
                        JoinStage::Added {
                            peer: peer.to_string(),
                        },
                    );
                    let info = self
                        .call(|r| Call::CompleteJoin(Box::new(invite), response, r))
                        .await?;
                    self.progress(
                        group,
                        JoinStage::Ready {
                            epoch: info.epoch,
                            member_count: info.members.len(),
                        },
                    );
                    return Ok(info);
                }
                Attempt::Refused(r) => return Err(EngineError::JoinRejected(r)),
                Attempt::Next(miss) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.timed_out(timeout, &trail, lookups));
                    }
                    if miss == Miss::Declined(JoinRejection::UnknownInvite) {
                        // The member who signed the link created the invite: if it does not
                        // know it, no one does.
                        if peer == invite.inviter {
                            return Err(EngineError::JoinRejected(JoinRejection::UnknownInvite));
                        }
                        unknown = Some(JoinRejection::UnknownInvite);
                    }
                    self.progress(
                        group,
                        JoinStage::TryingNext {
                            peer: peer.to_string(),
                            reason: miss.to_string(),
                        },
                    );
                    if peer == invite.inviter {
                        trail.inviter = Some(miss);
                    } else {
                        trail.member(miss);
                    }
                }
            }
        }
        // Every member we reached said it does not know the invite: that is the answer.
        if let Some(r) = unknown {
            return Err(EngineError::JoinRejected(r));
        }
        trail.lookups = lookups;
        Err(EngineError::Unreachable(trail.unreachable()))
    }

    /// Asks `members`, one after the other, to add this node again after its branch of
    /// `group` lost a fork at `epoch` deeper than it can roll back; the one whose branch
    /// holds `commit` there does. If none can (yet), the next sign of the fork tries again.
    pub(super) async fn rejoin_member(
        &self,
        group: GroupId,
        epoch: u64,
        commit: MessageId,
        members: Vec<PeerId>,
    ) {
        tracing::warn!(group = %group.short(), epoch, "this node's branch lost a deep fork; asking to be added again");
        // Every member of the losing branch asks in the same order, so the first member of
        // the winning branch re-adds them one after the other instead of two members
        // re-adding at once (which would be a new race).
        let mut members = members;
        members.sort();
        // A member of the winning branch may be busy re-adding another node, or not yet
        // connected after a partition heals: try a few rounds before waiting for the next
        // sign of the fork.
        for round in 0..REJOIN_ROUNDS {
            if round > 0 {
                tokio::time::sleep(REJOIN_RETRY).await;
            }
            for peer in members.iter().copied() {
                let request = match self
                    .call(|r| Call::PrepareRejoin(group, epoch, commit, r))
                    .await
                {
                    Ok(request) => request,
                    Err(e) => {
                        tracing::warn!(group = %group.short(), error = %e, "cannot prepare a rejoin");
                        break;
                    }
                };
                let asked = async {
                    self.net.connect(peer, Vec::new()).await.ok()?;
                    self.net.join(peer, Vec::new(), request).await.ok()
                };
                let Ok(Some(response)) = tokio::time::timeout(JOIN_DIAL_TIMEOUT, asked).await
                else {
                    continue;
                };
                if let JoinResponse::Rejected(why) = &response {
                    tracing::debug!(group = %group.short(), %peer, reason = %why, "rejoin refused");
                    continue;
                }
                match self
                    .call(|r| Call::CompleteRejoin(group, peer, response, r))
                    .await
                {
                    Ok(info) => {
                        tracing::info!(group = %group.short(), %peer, epoch = info.epoch, "added again on the winning branch");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(group = %group.short(), %peer, error = %e, "cannot use the rejoin answer")
                    }
                }
            }
        }
        let _ = self.call(|r| Call::RejoinFailed(group, r)).await;
    }

    /// Joins `group` again with `link` after the commit that added this node lost to a
    /// concurrent one. A member saying we are still in the group means the join stands; any
    /// other refusal (the link was used up by the winner, revoked, expired) leaves the group
    /// read-only here, with the reason in the join progress events.
    pub(super) async fn rejoin(&self, group: GroupId, link: String, by: Option<PeerId>) {
        self.progress(group, JoinStage::Rejoining);
        let outcome = match self.join_inner(link, None, by).await {
            Ok(info) => {
                tracing::info!(group = %group.short(), epoch = info.epoch, "joined again on the winning branch");
                return;
            }
            Err(EngineError::JoinRejected(JoinRejection::AlreadyMember)) => None,
            Err(e) => Some(e.to_string()),
        };
        let _ = self
            .call(|r| Call::JoinOutcome(group, outcome.clone(), r))
            .await;
        // Announced once the group is marked read-only, so a client that sees it sees that.
        if let Some(reason) = outcome {
            tracing::warn!(group = %group.short(), %reason, "could not join again after a lost race");
            self.progress(group, JoinStage::Lost { reason });
        }
    }

    pub(super) fn timed_out(&self, timeout: Duration, trail: &Trail, lookups: u32) -> EngineError {
        let mut trail = trail.clone();
        trail.lookups = lookups;
        EngineError::TimedOut(trail.timed_out(timeout.as_secs()))
    }

    /// Asks one member: connect (bounded by [`JOIN_DIAL_TIMEOUT`]), send the request, and
    /// while the member holds it for approval, send it again every [`APPROVAL_RETRY`].
    pub(super) async fn attempt(
        &self,
        group: GroupId,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        via: &'static str,
        request: &JoinRequest,
        deadline: tokio::time::Instant,
    ) -> Attempt {
        if via != "link" {
            // The inviter was announced when its dial started.
            self.progress(
                group,
                JoinStage::Contacting {
                    peer: peer.to_string(),
                    via: via.to_owned(),
                },
            );
        }
        let dial_deadline = deadline.min(tokio::time::Instant::now() + JOIN_DIAL_TIMEOUT);
        match tokio::time::timeout_at(dial_deadline, self.net.connect(peer, addrs)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::info!(group = %group.short(), %peer, via, error = %e, "cannot connect to a member");
                return Attempt::Next(Miss::CannotConnect);
            }
            Err(_) => return Attempt::Next(Miss::ConnectTimedOut),
        }
        self.progress(
            group,
            JoinStage::RequestSent {
                peer: peer.to_string(),
            },
        );
        tracing::info!(group = %group.short(), %peer, via, "sending join request");
        let mut announced = false;
        loop {
            let sent = self.net.join(peer, Vec::new(), request.clone());
            let response = match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::info!(group = %group.short(), %peer, error = %e, "join request failed");
                    return Attempt::Next(Miss::RequestFailed);
                }
                Err(_) => return Attempt::Next(Miss::NoAnswer),
            };
            match response {
                JoinResponse::Accepted { .. } | JoinResponse::Admitted { .. } => {
                    return Attempt::Accepted(response);
                }
                JoinResponse::Rejected(
                    r @ (JoinRejection::UnknownInvite
                    | JoinRejection::NotMember
                    | JoinRejection::Internal
                    | JoinRejection::Busy),
                ) => return Attempt::Next(Miss::Declined(r)),
                JoinResponse::Rejected(r) => return Attempt::Refused(r),
                JoinResponse::AwaitingApproval { request: id } => {
                    if !announced {
                        announced = true;
                        self.progress(
                            group,
                            JoinStage::AwaitingApproval {
                                peer: peer.to_string(),
                                request: request_id_text(id),
                            },
                        );
                    }
                    let wake = deadline.min(tokio::time::Instant::now() + APPROVAL_RETRY);
                    tokio::time::sleep_until(wake).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Attempt::Next(Miss::StillAwaitingApproval);
                    }
                }
            }
        }
    }
}

/// How a join attempt with one member ended.
pub(super) enum Attempt {
    /// The member added us: complete the join with this answer.
    Accepted(JoinResponse),
    /// A refusal no other member would change (revoked, expired, used up, denied, …).
    Refused(JoinRejection),
    /// This member could not help; try the next one.
    Next(Miss),
}
