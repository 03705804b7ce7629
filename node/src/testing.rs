//! Helpers for this crate's tests: real nodes on loopback, so the API and its client are
//! tested against the engine they serve in production.
//!
//! A node listens on 127.0.0.1 port 0 over TCP only (so an invite link names only
//! addresses that refuse at once when the node is down), has mDNS off, and serves its API
//! and metrics on 127.0.0.1 port 0. Every wait has a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use kith_client::Client;
use libp2p::PeerId;

use crate::config::NodeConfig;
use crate::engine::{EngineError, EngineHandle};
use crate::model::{CreateInviteRequest, GroupInfo, InviteInfo};
use crate::node::{self, NodeOptions, RunningNode};

/// A token for the routers tests build over a node's engine (a node's own API server has
/// its own, in [`RunningNode::api_token`]).
pub(crate) const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// How long one wait of a test may take.
const WAIT: Duration = Duration::from_secs(20);

/// A fixed, valid PeerId: that of the ed25519 key whose secret is 32 bytes of `n`.
pub(crate) fn peer(n: u8) -> PeerId {
    libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
        .expect("32 bytes are an ed25519 secret key")
        .public()
        .to_peer_id()
}

/// A running node on a data directory of its own, deleted when the node is dropped.
pub(crate) struct TestNode {
    /// The node.
    pub(crate) node: RunningNode,
    dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with the loopback configuration; returns once it listens.
    pub(crate) async fn start() -> TestNode {
        TestNode::start_with(|_| {}).await
    }

    /// [`TestNode::start`] with the configuration changed by `adjust` first.
    pub(crate) async fn start_with(adjust: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = NodeConfig {
            network: "kith-test".into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr")],
            bootstrap: Vec::new(),
            mdns: false,
            api_listen: loopback,
            metrics_listen: Some(loopback),
            retention: Default::default(),
            update_policy: Default::default(),
            nat: crate::net::NatSettings::default(),
            past_epoch_ttl: kith_protocol::group::PAST_EPOCH_TTL,
            files: Default::default(),
            chat: Default::default(),
        };
        adjust(&mut config);
        let dir = temp_dir();
        let node = node::start(NodeOptions {
            data_dir: dir.path().to_owned(),
            config,
            heartbeat: Duration::from_millis(200),
        })
        .await
        .expect("the node starts");
        let node = TestNode { node, dir };
        // Invite links carry the listen addresses, so wait for one.
        node.wait("a listen address", |n| async move {
            !n.node
                .net
                .info()
                .await
                .expect("net runs")
                .listen_addrs
                .is_empty()
        })
        .await;
        node
    }

    /// A handle to the node's engine.
    pub(crate) fn engine(&self) -> EngineHandle {
        self.node.engine.clone()
    }

    /// A client of the node's own API server with its token.
    pub(crate) fn client(&self) -> Client {
        self.client_with(&self.node.api_token)
    }

    /// A client of the node's own API server that sends `token`.
    pub(crate) fn client_with(&self, token: &str) -> Client {
        Client::new(&format!("http://{}", self.node.api_addr), token.to_owned())
            .expect("a valid API address")
    }

    /// Creates group `name`.
    pub(crate) async fn create_group(&self, name: &str) -> GroupInfo {
        let name = name.to_owned();
        self.node
            .engine
            .run(move |e| e.create_group(&name))
            .await
            .expect("the group is created")
    }

    /// Creates an invite to `group` allowing one join.
    pub(crate) async fn invite(&self, group: &GroupInfo) -> InviteInfo {
        let id = group.id.clone();
        self.node
            .engine
            .run(move |e| e.create_invite(&id, CreateInviteRequest::default()))
            .await
            .expect("the invite is created")
    }

    /// Joins by `link` (a member must answer).
    pub(crate) async fn join(&self, link: &str) -> Result<GroupInfo, EngineError> {
        tokio::time::timeout(WAIT, self.node.engine.join(link.to_owned()))
            .await
            .expect("the join ends in time")
    }

    /// Connects to `other` and waits until both see the connection.
    pub(crate) async fn connect(&self, other: &TestNode) {
        let addrs = other.node.net.info().await.expect("net runs").listen_addrs;
        self.node
            .net
            .connect(other.node.peer_id, addrs)
            .await
            .expect("the nodes connect");
        for (a, b) in [(self, other), (other, self)] {
            let peer = b.node.peer_id;
            a.wait("the connection", |n| async move {
                n.node
                    .engine
                    .connected_peers()
                    .await
                    .expect("net runs")
                    .contains(&peer)
            })
            .await;
        }
    }

    /// The text of the node's `GET /metrics`.
    pub(crate) async fn scrape_metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.node.metrics_addr.expect("metrics are on");
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("metrics endpoint accepts");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request written");
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("metrics answered in time")
            .expect("metrics read");
        response
    }

    /// Stops the node and deletes its data directory.
    pub(crate) async fn stop(self) {
        self.node.shutdown().await;
        drop(self.dir);
    }

    /// Polls `done` until it holds; panics after [`WAIT`].
    pub(crate) async fn wait<'a, F>(&'a self, what: &str, done: impl Fn(&'a TestNode) -> F)
    where
        F: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fresh data directory, in memory where the system has a memory file system: a node
/// fsyncs every text it sends, and some tests send a thousand.
fn temp_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// Two nodes in group `name`: the first created it and the second joined by invite.
pub(crate) async fn two_in_a_group(name: &str) -> (TestNode, TestNode, GroupInfo) {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let group = a.create_group(name).await;
    let invite = a.invite(&group).await;
    b.join(&invite.link).await.expect("the second node joins");
    (a, b, group)
}
