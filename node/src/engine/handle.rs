//! [`EngineHandle`]: the cloneable async face of the actor. [`EngineHandle::run`] runs an
//! operation (an [`Actor`] method) on the actor thread; what waits on the network (status,
//! the block list; joining, in `join_client`) is async here.

use super::*;

impl EngineHandle {
    /// Runs `op` on the actor thread, after the inputs queued before it, and returns its
    /// result: `engine.run(move |e| e.create_group(&name))`. Every engine operation of the
    /// API is one [`Actor`] method called this way. Fails with
    /// [`EngineError::ShuttingDown`] if the actor has stopped.
    pub async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Actor) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |actor| {
            // A caller that went away needs no answer.
            let _ = tx.send(op(actor));
        });
        self.tx
            .send(Input::Call(Call::Run(job)))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Sends the actor one of the join client's calls and waits for its reply.
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
        let (groups, name) = self.run(|e| Ok((e.list_groups(), e.own_name()))).await?;
        Ok(StatusInfo {
            peer_id: self.peer_id.to_string(),
            network: self.network.clone(),
            listen_addrs: info.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: info.connected.len(),
            groups,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage: disk::storage_status(&self.health),
            reach: views::reach_info(&info.reachability),
            relayed_peers: info.relayed.len(),
            name,
        })
    }

    /// Joins a group by invite link within `timeout` (default [`DEFAULT_JOIN_TIMEOUT`]):
    /// checks the link locally, then asks the inviter named in the link and, if it cannot
    /// help, members found in the DHT under the invite's rendezvous key; waits (retrying)
    /// while a member holds the request for approval; builds the group from the Welcome.
    /// Each stage is announced as [`NodeEvent::JoinProgress`].
    pub async fn join(&self, link: String) -> Result<GroupInfo, EngineError> {
        self.join_with_timeout(link, None).await
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

    /// The file service.
    pub fn files(&self) -> &crate::files::Files {
        &self.files
    }
}

pub(super) fn net_error(e: NetError) -> EngineError {
    match e {
        NetError::Stopped => EngineError::ShuttingDown,
        NetError::TooManyBlocked { .. } => EngineError::BadRequest(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}
