//! The joiner's side of joining and rejoining, run as async tasks on the handle. What to do
//! next is decided by the sans-IO state machines of `kith_protocol::join` ([`JoinClient`],
//! [`RejoinClient`]); this drives them: it dials, looks up, sends and times as they ask, and
//! reports each stage (`JoinStage`) as it goes.

use kith_protocol::join::client::{self as join, JoinClient, JoinPlan};
use kith_protocol::join::rejoin::{self, RejoinClient};

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
    /// member who added us, when joining again after a lost race). The decisions are
    /// [`JoinClient`]'s; this performs its dials, lookups and requests as tasks and feeds
    /// their results back, with the time since the join started.
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
        let group = invite.group;
        let request = self
            .call(|r| Call::PrepareJoin(Box::new(invite.clone()), r))
            .await?;
        let plan = JoinPlan {
            group,
            me: self.peer_id,
            inviter: invite.inviter,
            inviter_addrs: invite.addrs.clone(),
            prefer,
            timeout_ms: timeout.as_millis() as u64,
        };
        let clock = Clock::new();
        let (mut client, mut outs) = JoinClient::start(plan, clock.now());
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Dropped with the join: whatever is still in flight is aborted.
        let mut tasks = tokio::task::JoinSet::new();
        let mut timer = clock.at(timeout.as_millis() as u64);
        loop {
            for out in std::mem::take(&mut outs) {
                match out {
                    join::Output::Progress(stage) => self.progress(group, join_stage(stage)),
                    join::Output::Dial { op, peer, addrs } => {
                        let (net, tx) = (self.net.clone(), tx.clone());
                        tasks.spawn(async move {
                            let connected = match net.connect(peer, addrs).await {
                                Ok(()) => true,
                                Err(e) => {
                                    tracing::info!(group = %group.short(), %peer, error = %e, "cannot connect to a member");
                                    false
                                }
                            };
                            let _ = tx.send(join::Input::Dialled { op, connected });
                        });
                    }
                    join::Output::Lookup { op } => {
                        let (net, tx, key) =
                            (self.net.clone(), tx.clone(), invite.rendezvous_key());
                        tasks.spawn(async move {
                            let peers = net.get_providers(key).await.unwrap_or_default();
                            tracing::debug!(group = %group.short(), found = peers.len(), "members found in the DHT");
                            let _ = tx.send(join::Input::Found { op, peers });
                        });
                    }
                    join::Output::Request { op, peer } => {
                        tracing::info!(group = %group.short(), %peer, "sending join request");
                        let (net, tx, request) = (self.net.clone(), tx.clone(), request.clone());
                        tasks.spawn(async move {
                            let input = match net.join(peer, Vec::new(), request).await {
                                Ok(response) => join::Input::Answered { op, response },
                                Err(e) => {
                                    tracing::info!(group = %group.short(), %peer, error = %e, "join request failed");
                                    join::Input::RequestFailed { op }
                                }
                            };
                            let _ = tx.send(input);
                        });
                    }
                    join::Output::ScheduleTimer { at } => timer = clock.at(at),
                    join::Output::Done(outcome) => return self.end_join(invite, outcome).await,
                }
            }
            let input = tokio::select! {
                Some(input) = rx.recv() => input,
                () = tokio::time::sleep_until(timer) => join::Input::Timer,
            };
            outs = client.handle(clock.now(), input);
        }
    }

    /// Completes a join that a member answered, or turns its end into the error to show.
    async fn end_join(
        &self,
        invite: Invite,
        outcome: join::Outcome,
    ) -> Result<GroupInfo, EngineError> {
        let group = invite.group;
        match outcome {
            join::Outcome::Joined { response, .. } => {
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
                Ok(info)
            }
            join::Outcome::Refused(r) => Err(EngineError::JoinRejected(r)),
            join::Outcome::Unreachable(line) => Err(EngineError::Unreachable(line)),
            join::Outcome::TimedOut(line) => Err(EngineError::TimedOut(line)),
        }
    }

    /// Asks `members` to add this node again after its branch of `group` lost a fork at
    /// `epoch` deeper than it can roll back; the one whose branch holds `commit` there does.
    /// The order and the rounds are [`RejoinClient`]'s. If none can (yet), the next sign of
    /// the fork tries again.
    pub(super) async fn rejoin_member(
        &self,
        group: GroupId,
        epoch: u64,
        commit: MessageId,
        members: Vec<PeerId>,
    ) {
        tracing::warn!(group = %group.short(), epoch, "this node's branch lost a deep fork; asking to be added again");
        let clock = Clock::new();
        let (mut client, mut outs) = RejoinClient::start(members, clock.now());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        let mut timer = clock.at(rejoin::ASK_TIMEOUT_MS);
        loop {
            for out in std::mem::take(&mut outs) {
                match out {
                    rejoin::Output::Ask { op, peer } => {
                        let request = match self
                            .call(|r| Call::PrepareRejoin(group, epoch, commit, r))
                            .await
                        {
                            Ok(request) => request,
                            Err(e) => {
                                tracing::warn!(group = %group.short(), error = %e, "cannot prepare a rejoin");
                                let _ = tx.send(rejoin::Input::CannotPrepare { op });
                                continue;
                            }
                        };
                        let (net, tx) = (self.net.clone(), tx.clone());
                        tasks.spawn(async move {
                            let asked = async {
                                net.connect(peer, Vec::new()).await.ok()?;
                                net.join(peer, Vec::new(), request).await.ok()
                            };
                            let input = match asked.await {
                                Some(response) => {
                                    if let JoinResponse::Rejected(why) = &response {
                                        tracing::debug!(group = %group.short(), %peer, reason = %why, "rejoin refused");
                                    }
                                    rejoin::Input::Answered { op, response }
                                }
                                None => rejoin::Input::Failed { op },
                            };
                            let _ = tx.send(input);
                        });
                    }
                    rejoin::Output::Use { op, peer, response } => {
                        let ok = match self
                            .call(|r| Call::CompleteRejoin(group, peer, response, r))
                            .await
                        {
                            Ok(info) => {
                                tracing::info!(group = %group.short(), %peer, epoch = info.epoch, "added again on the winning branch");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(group = %group.short(), %peer, error = %e, "cannot use the rejoin answer");
                                false
                            }
                        };
                        let _ = tx.send(rejoin::Input::Used { op, ok });
                    }
                    rejoin::Output::ScheduleTimer { at } => timer = clock.at(at),
                    rejoin::Output::Done(true) => return,
                    rejoin::Output::Done(false) => {
                        let _ = self.call(|r| Call::RejoinFailed(group, r)).await;
                        return;
                    }
                }
            }
            let input = tokio::select! {
                Some(input) = rx.recv() => input,
                () = tokio::time::sleep_until(timer) => rejoin::Input::Timer,
            };
            outs = client.handle(clock.now(), input);
        }
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
            Err(EngineError::JoinRejected(r)) => Some(LostJoin::Refused(r)),
            Err(EngineError::Unreachable(line)) => Some(LostJoin::Unreachable(line)),
            Err(EngineError::TimedOut(line)) => Some(LostJoin::TimedOut(line)),
            Err(e) => Some(LostJoin::Failed(e.to_string())),
        };
        let _ = self
            .call(|r| Call::JoinOutcome(group, outcome.clone(), r))
            .await;
        // Announced once the group is marked read-only, so a client that sees it sees that.
        if let Some(reason) = outcome {
            tracing::warn!(group = %group.short(), %reason, "could not join again after a lost race");
            self.progress(
                group,
                JoinStage::Lost {
                    reason: reason.to_string(),
                },
            );
        }
    }
}

/// The time since a join started, in the milliseconds its state machine counts.
struct Clock(tokio::time::Instant);

impl Clock {
    fn new() -> Clock {
        Clock(tokio::time::Instant::now())
    }

    fn now(&self) -> join::Millis {
        self.0.elapsed().as_millis() as u64
    }

    fn at(&self, at: join::Millis) -> tokio::time::Instant {
        self.0 + Duration::from_millis(at)
    }
}

/// The progress event for a stage of the join.
fn join_stage(stage: join::Stage) -> JoinStage {
    match stage {
        join::Stage::FindingMembers { timeout_secs } => JoinStage::FindingMembers { timeout_secs },
        join::Stage::Contacting { peer, via } => JoinStage::Contacting {
            peer: peer.to_string(),
            via: via.as_str().to_owned(),
        },
        join::Stage::RequestSent { peer } => JoinStage::RequestSent {
            peer: peer.to_string(),
        },
        join::Stage::AwaitingApproval { peer, request } => JoinStage::AwaitingApproval {
            peer: peer.to_string(),
            request: request_id_text(request),
        },
        join::Stage::TryingNext { peer, miss } => JoinStage::TryingNext {
            peer: peer.to_string(),
            reason: miss.to_string(),
        },
        join::Stage::Added { peer } => JoinStage::Added {
            peer: peer.to_string(),
        },
    }
}
