//! Serving other nodes: join and rejoin requests (admission, approval), invite states for
//! new members, DHT rendezvous and invite announcements, network events.

use super::*;

impl Actor {
    /// Announces this node in the DHT under the rendezvous key of every unexpired invite of
    /// its active groups, ended ones included (all of them again when `refresh`, else only
    /// new ones), and stops announcing invites that expired.
    pub(super) fn announce_invites(&mut self, refresh: bool) {
        let records = match self.store.invites() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read invites to announce");
                return;
            }
        };
        let now = now_ms() / 1000;
        // Ended (revoked, used-up) invites too, until they expire, so a joiner reaching any
        // member hears the reason; live ones first when there are too many.
        let mut active: Vec<&InviteRecord> = records
            .iter()
            .filter(|r| {
                r.is_announced(now)
                    && self
                        .groups
                        .group(&r.group)
                        .is_some_and(|v| v.active && !v.leaving)
            })
            .collect();
        active.sort_by_key(|r| (!r.is_active(now), std::cmp::Reverse(r.created_at)));
        let network = self.groups.network().to_owned();
        let wanted: HashSet<[u8; 32]> = active
            .iter()
            .take(MAX_PROVIDED_INVITES)
            .filter_map(|r| r.secret_hash.map(|h| invite_rendezvous_key(&network, &h)))
            .collect();
        for key in self.provided_invites.difference(&wanted) {
            let _ = self.net.stop_providing_blocking(*key);
        }
        for key in &wanted {
            if refresh || !self.provided_invites.contains(key) {
                let _ = self.net.provide_blocking(*key);
            }
        }
        self.provided_invites = wanted;
    }

    /// Announces this node's groups and active invites in the DHT and looks for other
    /// online members.
    pub(super) fn rendezvous(&mut self) {
        for v in self.groups.groups() {
            if v.active {
                let key = v.meta.id.provider_key(self.groups.network());
                let _ = self.net.provide_blocking(key);
                let _ = self.net.find_providers_blocking(key);
            }
        }
        self.announce_invites(true);
    }

    pub(super) fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Gossip {
                id,
                source,
                data,
                arrived,
            } => self.on_gossip(vec![(id, source, data, arrived)]),
            NetEvent::InboundFile {
                peer,
                request,
                token,
            } => self.files.on_inbound(peer, request, token),
            NetEvent::InboundJoin {
                peer,
                request,
                token,
            } => {
                let response = self.on_join_request(peer, request);
                let _ = self.net.respond_join_blocking(token, response);
            }
            NetEvent::InboundSync {
                peer,
                request,
                token,
            } => {
                let response = self.on_sync_request(peer, request);
                let _ = self.net.respond_sync_blocking(token, response);
            }
            NetEvent::PeerConnected { peer } => {
                let groups: Vec<GroupId> = self
                    .groups
                    .groups()
                    .iter()
                    .filter(|v| v.active && v.members.iter().any(|(_, p)| *p == peer))
                    .map(|v| v.meta.id)
                    .collect();
                if !groups.is_empty() {
                    self.sync_input(sched::Input::PeerConnected { peer, groups });
                }
            }
            NetEvent::PeerIdentified { peer, addrs } => {
                let batch = Batch {
                    peers: vec![(peer, addrs)],
                    ..Batch::default()
                };
                // While the disk fails, the address book waits for the next identify.
                if self.disk_ok()
                    && let Err(e) = self.commit_with(batch, false)
                {
                    tracing::warn!(error = %e, "cannot update the address book");
                }
            }
        }
    }

    /// Answers a join request as [`kith_protocol::join::admission::decide`] says: a retry
    /// of a held request gets its current answer; a new one is screened, then held (approval
    /// invites) or admitted.
    pub(super) fn on_join_request(&mut self, peer: PeerId, request: JoinRequest) -> JoinResponse {
        let now = now_ms();
        let group = match &request {
            JoinRequest::V1(r) => r.group,
            JoinRequest::Rejoin(r) => r.group,
        };
        if let (JoinRequest::V1(_), Some(why)) = (&request, self.direct_refusal(&group, &peer)) {
            tracing::info!(%peer, group = %group.short(), "refused join request: the direct chat is with someone else");
            self.metrics.join_request(JoinRequestResult::Refused);
            return JoinResponse::Rejected(why);
        }
        // Only for a link this node knows (the secret matches): a request with a made-up
        // secret costs one key lookup here, not a walk through the group's history.
        let screened = match &request {
            JoinRequest::V1(r) => {
                let hash = kith_protocol::invite::secret_hash(&r.secret);
                let invite = kith_protocol::ids::InviteId::of(&hash);
                let known = self.store.invite(&invite).ok().flatten();
                known
                    .filter(|record| record.secret_hash == Some(hash))
                    .map(|_| invite)
            }
            JoinRequest::Rejoin(_) => None,
        };
        if let Some(invite) = screened {
            if !self.invite_joins.take(&invite, std::time::Instant::now()) {
                tracing::info!(%peer, group = %group.short(), "join requests for one invite too fast; answering busy");
                self.metrics.join_request(JoinRequestResult::Refused);
                return JoinResponse::Rejected(JoinRejection::Busy);
            }
            match self.store.removed_since_invite(&group, &peer, &invite) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(%peer, group = %group.short(), "refused join request: removed from the group after the invite was made");
                    self.metrics.join_request(JoinRequestResult::Refused);
                    return JoinResponse::Rejected(JoinRejection::RemovedSinceInvite);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read history to screen a join request");
                    self.metrics.join_request(JoinRequestResult::Error);
                    return JoinResponse::Rejected(JoinRejection::Internal);
                }
            }
        }
        let store = &self.store;
        let decided = kith_protocol::join::admission::decide(
            &self.groups,
            &mut self.held,
            peer,
            request,
            |invite| store.invite(invite),
            now,
        );
        match decided {
            Admission::Answer(response) => response,
            Admission::Refuse(why) => {
                tracing::info!(%peer, group = %group.short(), reason = %why, "refused join request");
                self.metrics.join_request(JoinRequestResult::Refused);
                JoinResponse::Rejected(why)
            }
            Admission::Rejoin(r) => self.on_rejoin_request(peer, r),
            Admission::Held(id) => {
                tracing::info!(%peer, group = %group.short(), request = %request_id_text(id), "join request awaits approval");
                if let Some(h) = self.held.get(id) {
                    let _ = self.events.send(NodeEvent::JoinRequestHeld(held_info(h)));
                }
                JoinResponse::AwaitingApproval { request: id }
            }
            Admission::Admit(admit) => {
                let (request, record) = *admit;
                self.admit(peer, request, record)
            }
        }
    }

    /// Persists the key package a join or rejoin request carries (its private keys must be
    /// on disk before we ask), or rolls back if making it failed.
    pub(super) fn stored_request(
        &mut self,
        req: Result<JoinRequest, GroupError>,
    ) -> Result<JoinRequest, EngineError> {
        let res = req
            .map_err(EngineError::from)
            .and_then(|req| self.apply(Vec::new()).map(|()| req));
        if res.is_err() {
            self.rollback();
        }
        res
    }

    /// Tells the group the state of its live invites after adding a member, who could not
    /// read the messages that created them (see [`GroupEngine::share_invite_states`]).
    pub(super) fn share_invite_states(&mut self, group: GroupId) {
        let records = match self.store.invites() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read invites to share them");
                return;
            }
        };
        match self.groups.share_invite_states(group, &records, now_ms()) {
            Ok(fx) if fx.is_empty() => {}
            Ok(fx) => {
                if let Err(e) = self.apply(fx) {
                    tracing::warn!(group = %group.short(), error = %e, "cannot share invite states");
                }
            }
            Err(e) => {
                self.rollback();
                tracing::warn!(group = %group.short(), error = %e, "cannot share invite states");
            }
        }
    }

    /// A member whose branch lost a deep fork asks to be added again (see
    /// [`GroupEngine::handle_rejoin_request`]).
    pub(super) fn on_rejoin_request(&mut self, peer: PeerId, r: RejoinRequestV1) -> JoinResponse {
        let group = r.group;
        match self.groups.handle_rejoin_request(peer, r, now_ms()) {
            Ok((response, effects)) => match self.apply(effects) {
                Ok(()) => {
                    if let JoinResponse::Rejected(why) = &response {
                        tracing::info!(%peer, group = %group.short(), reason = %why, "refused rejoin request");
                    } else {
                        tracing::info!(%peer, group = %group.short(), "added a member again after a deep fork");
                    }
                    response
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot store the rejoin; refusing it");
                    JoinResponse::Rejected(JoinRejection::Internal)
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "rejoin request failed");
                self.rollback();
                JoinResponse::Rejected(JoinRejection::Internal)
            }
        }
    }

    /// Adds `peer` to the group with `request` (screened again inside), stores and publishes
    /// the commit, and returns the answer for the joiner.
    pub(super) fn admit(
        &mut self,
        peer: PeerId,
        request: JoinRequest,
        record: Option<InviteRecord>,
    ) -> JoinResponse {
        let JoinRequest::V1(r) = &request else {
            return JoinResponse::Rejected(JoinRejection::Internal);
        };
        let group = r.group;
        match self
            .groups
            .handle_join_request(peer, request, record, now_ms())
        {
            Ok((response, effects)) => match self.apply(effects) {
                Ok(()) => {
                    if let JoinResponse::Rejected(why) = &response {
                        tracing::info!(%peer, group = %group.short(), reason = %why, "refused join request");
                        self.metrics.join_request(JoinRequestResult::Refused);
                    } else {
                        tracing::info!(%peer, group = %group.short(), "added a member by invite");
                        self.metrics.join_request(JoinRequestResult::Accepted);
                        self.share_invite_states(group);
                        self.after_admit(group, peer);
                    }
                    response
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot store the join; refusing it");
                    self.metrics.join_request(JoinRequestResult::Error);
                    JoinResponse::Rejected(JoinRejection::Internal)
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "join request failed");
                self.rollback();
                self.metrics.join_request(JoinRequestResult::Error);
                JoinResponse::Rejected(JoinRejection::Internal)
            }
        }
    }

    /// Approves or denies a held join request of group `q` (id prefix `which`). Approving
    /// commits the Add now; the joiner collects the Welcome with its next retry, so a joiner
    /// that stopped retrying is not added.
    pub fn decide_join(
        &mut self,
        q: &str,
        which: &str,
        approve: bool,
    ) -> Result<JoinRequestInfo, EngineError> {
        self.check_writable()?;
        let id = self.resolve(q)?;
        let now = now_ms();
        self.held.expire(now);
        let h = self.held.find(id, which).map_err(|e| match e {
            FindError::NotFound(_) => EngineError::NotFound(e.to_string()),
            FindError::Ambiguous(_) => EngineError::BadRequest(e.to_string()),
        })?;
        if h.state != HeldState::Waiting {
            return Err(EngineError::BadRequest(format!(
                "join request {} was already {}",
                request_id_text(h.id),
                held_info(h).state
            )));
        }
        let (held_id, peer, request, invite) = (h.id, h.peer, h.request.clone(), h.invite);
        if !approve {
            self.held.decide(held_id, HeldState::Denied, now);
            tracing::info!(%peer, group = %id.short(), "denied a join request");
        } else {
            if !h.joiner_waiting(now) {
                return Err(EngineError::BadRequest(
                    "the joiner stopped waiting; it must ask again".to_owned(),
                ));
            }
            let record = self.store.invite(&invite)?;
            match self.admit(peer, request, record) {
                JoinResponse::Rejected(why) => return Err(EngineError::JoinRejected(why)),
                response => self
                    .held
                    .decide(held_id, HeldState::Approved(response), now),
            }
        }
        self.held
            .retry(held_id, now)
            .map(held_info)
            .ok_or_else(|| EngineError::Internal("held request vanished".to_owned()))
    }
}
