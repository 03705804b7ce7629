//! [`EngineHandle`]: the cloneable async face of the actor. Every method is one
//! [`Call`] with one reply (the join client is in `join_client`).

use super::*;

impl EngineHandle {
    pub(super) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Call,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Call(make(tx)))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Node status: identity, addresses, peers, groups.
    pub async fn status(&self) -> Result<StatusInfo, EngineError> {
        let info = self
            .net
            .info()
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        let groups = self.groups().await?;
        Ok(StatusInfo {
            peer_id: self.peer_id.to_string(),
            network: self.network.clone(),
            listen_addrs: info.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: info.connected.len(),
            groups,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage: disk::storage_status(&self.health),
        })
    }

    /// Creates a group with this node as its only member.
    pub async fn create_group(&self, name: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::CreateGroup(name, r)).await
    }

    /// All groups of this node.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, EngineError> {
        self.call(Call::Groups).await
    }

    /// One group; `group` is a full id, a unique id prefix (at least 4 hex characters) or an
    /// exact name.
    pub async fn group(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::Group(group, r)).await
    }

    /// Creates an invite link to a group.
    pub async fn create_invite(
        &self,
        group: String,
        req: CreateInviteRequest,
    ) -> Result<InviteInfo, EngineError> {
        self.call(|r| Call::CreateInvite(group, req, r)).await
    }

    /// Joins a group by invite link within `timeout` (default [`DEFAULT_JOIN_TIMEOUT`]):
    /// checks the link locally, then asks the inviter named in the link and, if it cannot
    /// help, members found in the DHT under the invite's rendezvous key; waits (retrying)
    /// while a member holds the request for approval; builds the group from the Welcome.
    /// Each stage is announced as [`NodeEvent::JoinProgress`].
    pub async fn join(&self, link: String) -> Result<GroupInfo, EngineError> {
        self.join_with_timeout(link, None).await
    }

    /// The invites of a group as this node knows them, newest first.
    pub async fn invites(&self, group: String) -> Result<Vec<InviteSummary>, EngineError> {
        self.call(|r| Call::ListInvites(group, r)).await
    }

    /// Revokes an invite (id or unique prefix of 4+ hex characters) for the whole group.
    pub async fn revoke_invite(
        &self,
        group: String,
        invite: String,
    ) -> Result<InviteSummary, EngineError> {
        self.call(|r| Call::RevokeInvite(group, invite, r)).await
    }

    /// The join requests held for approval on this node for a group.
    pub async fn join_requests(&self, group: String) -> Result<Vec<JoinRequestInfo>, EngineError> {
        self.call(|r| Call::JoinRequests(group, r)).await
    }

    /// Approves (`true`: commits the Add) or denies a held join request.
    pub async fn decide_join(
        &self,
        group: String,
        request: String,
        approve: bool,
    ) -> Result<JoinRequestInfo, EngineError> {
        self.call(|r| Call::DecideJoin(group, request, approve, r))
            .await
    }

    /// Sends a text message to a group.
    pub async fn send(&self, group: String, text: String) -> Result<MessageInfo, EngineError> {
        self.call(|r| Call::Send(group, text, r)).await
    }

    /// Removes a member (by PeerId) from a group; returns the group after the commit.
    pub async fn remove_member(
        &self,
        group: String,
        peer: PeerId,
    ) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::RemoveMember(group, peer, r)).await
    }

    /// Asks to leave a group: publishes this node's removal proposal, which another member
    /// commits. Returns the group, marked `leaving`.
    pub async fn leave_group(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::LeaveGroup(group, r)).await
    }

    /// Commits a fresh leaf key for this node in a group; returns the group after it.
    pub async fn self_update(&self, group: String) -> Result<GroupInfo, EngineError> {
        self.call(|r| Call::SelfUpdate(group, r)).await
    }

    /// The newest `limit` history entries of a group, oldest first.
    pub async fn history(
        &self,
        group: String,
        limit: usize,
    ) -> Result<Vec<MessageInfo>, EngineError> {
        self.call(|r| Call::History(group, limit, r)).await
    }

    /// Live events for the API's event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// The peers this node is connected to.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, EngineError> {
        let mut peers = self.net.info().await.map_err(net_error)?.connected;
        peers.sort();
        Ok(peers)
    }

    /// The peers this node refuses connections with, sorted.
    pub async fn blocked(&self) -> Result<Vec<PeerId>, EngineError> {
        self.net.blocked().await.map_err(net_error)
    }

    /// Replaces the set of peers this node refuses connections with (see
    /// [`NetHandle::set_blocked`]); returns it, sorted.
    pub async fn set_blocked(&self, peers: Vec<PeerId>) -> Result<Vec<PeerId>, EngineError> {
        if peers.contains(&self.peer_id) {
            return Err(EngineError::BadRequest(
                "a node cannot block itself".to_owned(),
            ));
        }
        if peers.len() > MAX_BLOCKED_PEERS {
            return Err(EngineError::BadRequest(format!(
                "cannot block more than {MAX_BLOCKED_PEERS} peers"
            )));
        }
        self.net.set_blocked(peers).await.map_err(net_error)
    }

    /// Kith's metrics of this node.
    pub fn metrics(&self) -> &Arc<KithMetrics> {
        &self.metrics
    }
}

pub(super) fn net_error(e: NetError) -> EngineError {
    match e {
        NetError::Stopped => EngineError::ShuttingDown,
        NetError::TooManyBlocked { .. } => EngineError::BadRequest(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}
