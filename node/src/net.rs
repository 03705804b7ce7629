//! The network: one task owns the libp2p `Swarm`.
//!
//! Behaviours: gossipsub (one topic per group; anonymous, content-addressed, validated by the
//! engine), Kademlia on `/kith/kad/1.0.0` (peer routing and member rendezvous through provider
//! records), identify, ping, request-response for joining (`/kith/join/1.0.0`) and for
//! history sync (`/kith/sync/1.0.0`) and for fetching file chunks (`/kith/file/1.0.0`), optional mDNS, and a block list (connection gating, e.g. for partition tests without root).
//! Transports: TCP and QUIC, with Noise and Yamux on TCP, and circuit relay v2 circuits.
//!
//! Reaching nodes behind NAT (see [`reach`]): AutoNAT v2 (client and server) confirms which
//! observed addresses others can dial back; Kademlia serves the DHT only while one is
//! confirmed. A directly reachable node serves circuit relay v2 within configured limits; a
//! node that is not keeps reservations on a few relays (members of its groups first) and
//! advertises the circuit addresses. DCUtR turns a relayed connection into a direct one
//! where the NATs allow, and the relayed connection is then closed so group traffic takes
//! the direct path. Optional UPnP asks the home router for a port mapping.
//!
//! When metrics are on, the task records libp2p's swarm and behaviour metrics and the
//! transport's bandwidth, and gossipsub keeps its internal per-topic metrics (see
//! [`crate::metrics`]).
//!
//! Everything else talks to the task through [`NetHandle`] (a bounded command queue with
//! `oneshot` replies) and receives [`NetEvent`]s. No other module sees `SwarmEvent`s. The task
//! never blocks on the engine: events are offered with `try_send`, and a full queue drops
//! gossip (gossipsub's redundancy and later history sync cover it) rather than stalling IO.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kith_protocol::envelope::{
    JoinRequest, JoinResponse, MAX_ENVELOPE_BYTES, MAX_JOIN_REQUEST_BYTES, MAX_JOIN_RESPONSE_BYTES,
};
use kith_protocol::files::{
    FileRequest, FileResponse, MAX_FILE_REQUEST_BYTES, MAX_FILE_RESPONSE_BYTES,
};
use kith_protocol::ids::{MessageId, TopicId};
use kith_protocol::seal::{self, MAX_FRAME_BYTES, SealKey};
use kith_protocol::sync::{
    MAX_SYNC_REQUEST_BYTES, MAX_SYNC_RESPONSE_BYTES, SyncRequest, SyncResponse,
};
use kith_protocol::{codec, group::Verdict};
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::metrics::{Metrics as Libp2pMetrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{
    ConnectionId, NetworkBehaviour, SwarmEvent,
    behaviour::toggle::Toggle,
    dial_opts::{DialOpts, PeerCondition},
};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, autonat, dcutr, identify, kad,
    mdns, noise, ping, quic, relay, tcp, upnp, yamux,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{FrameBytes, PeerFault, PeerFaults};

mod guard;
pub mod limits;
mod listen;
pub mod reach;
use guard::{Guarded, GuardedMuxer};
use limits::{ConnectionCaps, FairStore, GossipAdmit, PeerLimits};
pub use listen::ListenFailure;
use reach::Reach;
pub use reach::Reachability;

/// Kademlia protocol name: a separate DHT from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/kad/1.0.0");
/// Join request-response protocol name.
pub const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/join/1.0.0");
/// History sync request-response protocol name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/sync/1.0.0");
/// File chunk request-response protocol name.
pub const FILE_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/file/1.0.0");
/// How long one file request (a chunk, a manifest) may take, dialling included.
pub const FILE_TIMEOUT: Duration = Duration::from_secs(30);
/// Inbound file requests being answered at once, at most.
const MAX_PENDING_FILE_INBOUND: usize = 128;
/// Outbound file requests in flight, at most.
const MAX_PENDING_FILE_OUTBOUND: usize = 256;
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/kith/id/1.0.0";
/// How long a join request may take, dialling included.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one sync page request may take.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Inbound sync requests awaiting the engine's answer, at most.
const MAX_PENDING_SYNC_INBOUND: usize = 64;
/// Outbound sync requests in flight, at most.
const MAX_PENDING_SYNC_OUTBOUND: usize = 64;
/// Inbound join requests awaiting the engine's answer, at most.
const MAX_PENDING_INBOUND: usize = 64;
/// Outbound join requests in flight, at most.
const MAX_PENDING_OUTBOUND: usize = 64;
/// Addresses remembered per peer.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Provider lookups dial at most this many newly found members.
const MAX_DIALS_PER_LOOKUP: usize = 16;
/// Provider lookups awaited by a caller, at most (more are answered empty at once).
const MAX_PROVIDER_QUERIES: usize = 64;
/// Dials awaited by a caller, at most (more fail with [`NetError::Busy`]).
const MAX_PENDING_DIALS: usize = 64;
/// Envelopes kept per topic while no peer of that topic is connected.
const OUTBOX_PER_TOPIC: usize = 1024;
/// Bytes kept in all outboxes together.
const OUTBOX_BYTES: usize = 32 * 1024 * 1024;
/// Most peers the block list may hold.
pub const MAX_BLOCKED_PEERS: usize = 4096;
/// How often unblocked peers are dialled again until they are connected.
const REDIAL_INTERVAL: Duration = Duration::from_secs(2);
/// Dial attempts per unblocked peer (the first one is immediate).
const REDIAL_ATTEMPTS: u8 = 8;
/// Idle connections are kept this long: re-dialling costs a Noise handshake, which showed
/// up as the largest idle cost of a 100-node testnet.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// How often relay reservations are checked (and renewed where lost).
const REACH_INTERVAL: Duration = Duration::from_secs(2);
/// Dial attempts for a group peer whose last connection closed (every [`REDIAL_INTERVAL`]).
const RECONNECT_ATTEMPTS: u8 = 45;
/// How long a relayed connection stays open once a direct one to the same peer exists:
/// longer than a join request may take, so none is cut off halfway.
const RELAY_GRACE: Duration = Duration::from_secs(25);
/// DHT keys remembered for re-announcing (groups and live invites), at most.
const MAX_PROVIDED_KEYS: usize = 4096;
/// Shortest time between two refreshes of the DHT announcements and lookups.
const RENDEZVOUS_REFRESH: Duration = Duration::from_secs(5);
/// Longest gap between the node's own DHT refreshes (the engine's rendezvous every 5
/// minutes covers the long run).
const MAX_EARLY_REFRESH: Duration = Duration::from_secs(160);
/// Until this many DHT servers are known, each new one refreshes the announcements.
const FEW_DHT_SERVERS: usize = 8;
/// Group peers remembered for reconnecting, at most.
const MAX_TOPIC_PEERS: usize = 4096;
/// Queue depths.
const COMMAND_QUEUE: usize = 1024;
const EVENT_QUEUE: usize = 4096;

/// Settings for the network task.
#[derive(Clone)]
pub struct NetConfig {
    /// The node key (also the libp2p identity).
    pub keypair: Keypair,
    /// The network id (a frame's envelope must be of its topic's group on it).
    pub network: String,
    /// Addresses to listen on (TCP and/or QUIC; port 0 allowed).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers: multiaddrs ending in `/p2p/<PeerId>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Known peers from the address book, tried at start.
    pub known_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Gossipsub heartbeat (mesh maintenance and gossip emission).
    pub heartbeat: Duration,
    /// Counters of the history sync protocol's frame bytes.
    pub sync_bytes: FrameBytes,
    /// Counters of the file protocol's frame bytes.
    pub file_bytes: FrameBytes,
    /// Counters of peers cut off or limited.
    pub peer_faults: PeerFaults,
    /// Connections per IP and per peer.
    pub caps: limits::CapSettings,
    /// NAT traversal: relay service, reservations, UPnP.
    pub nat: NatSettings,
}

/// Limits of the circuit relay v2 service a directly reachable node offers to others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Reservations held for other nodes at once.
    pub max_reservations: usize,
    /// Circuits relayed at once.
    pub max_circuits: usize,
    /// Circuits relayed at once per peer.
    pub max_circuits_per_peer: usize,
    /// Longest a circuit lasts before the relay closes it.
    pub circuit_duration: Duration,
    /// Most bytes a circuit carries (each way) before the relay closes it.
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 32,
            max_circuits: 16,
            max_circuits_per_peer: 4,
            circuit_duration: Duration::from_secs(30 * 60),
            circuit_bytes: 1 << 22,
        }
    }
}

/// How the node deals with NATs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSettings {
    /// Serve circuit relay v2 with these limits (`None`: do not relay for others).
    pub relay_service: Option<RelayLimits>,
    /// Relay reservations to hold while not directly reachable.
    pub relays_wanted: usize,
    /// Ask the router for a port mapping with UPnP.
    pub upnp: bool,
    /// This machine's own public addresses are reachable (a server, or a router forwarding
    /// the port): confirm them at once instead of waiting for AutoNAT, which only probes
    /// over connections this node dialled and so never runs on a node that is only dialled.
    pub public: bool,
}

impl Default for NatSettings {
    fn default() -> Self {
        NatSettings {
            relay_service: Some(RelayLimits::default()),
            relays_wanted: 2,
            upnp: false,
            public: false,
        }
    }
}

/// Why the network could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The transport or a behaviour could not be built.
    #[error("cannot build the network stack: {0}")]
    Build(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: ListenFailure,
    },
    /// A join request failed in transport (unreachable, timeout, protocol error).
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Too many requests in flight; try again later.
    #[error("too many requests in flight")]
    Busy,
    /// The block list would hold more than [`MAX_BLOCKED_PEERS`] peers.
    #[error("cannot block more than {max} peers")]
    TooManyBlocked {
        /// The limit.
        max: usize,
    },
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// What the network reports to the engine.
#[derive(Debug)]
pub enum NetEvent {
    /// A gossip message on a subscribed topic, awaiting validation via [`NetHandle::validate`].
    Gossip {
        /// The envelope's id (SHA-256 of `data`); the verdict is reported under it, and
        /// the network task reports it under the sealed frame's gossipsub id.
        id: MessageId,
        /// The peer that forwarded it.
        source: PeerId,
        /// The envelope bytes opened from the frame (at most [`MAX_ENVELOPE_BYTES`]); empty
        /// if the frame did not open with the topic's key (then `id` is the frame's).
        data: Vec<u8>,
        /// When gossipsub handed it over: its verdict is due within gossipsub's cache
        /// window from then, however long the engine's queue was.
        arrived: std::time::Instant,
    },
    /// A peer asks to join a group; answer with [`NetHandle::respond_join`].
    InboundJoin {
        /// The requester (authenticated by the transport).
        peer: PeerId,
        /// The decoded request.
        request: JoinRequest,
        /// Token to answer with.
        token: u64,
    },
    /// A member asks for history; answer with [`NetHandle::respond_sync_blocking`].
    InboundSync {
        /// The requester (authenticated by the transport).
        peer: PeerId,
        /// The decoded, bound-checked request.
        request: SyncRequest,
        /// Token to answer with.
        token: u64,
    },
    /// A member asks for part of a file; answer with [`NetHandle::respond_file`].
    InboundFile {
        /// The requester (authenticated by the transport).
        peer: PeerId,
        /// The decoded, bound-checked request.
        request: FileRequest,
        /// Token to answer with.
        token: u64,
    },
    /// A first connection to a peer was established.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer told us its listen addresses (for the address book).
    PeerIdentified {
        /// The peer.
        peer: PeerId,
        /// Its reachable addresses.
        addrs: Vec<Multiaddr>,
    },
}

/// A snapshot of the network state.
#[derive(Debug, Clone)]
pub struct NetInfo {
    /// This node's PeerId.
    pub peer_id: PeerId,
    /// Addresses we listen on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers.
    pub connected: Vec<PeerId>,
    /// Connected peers reached only through a relay circuit (no direct connection).
    pub relayed: Vec<PeerId>,
    /// Whether others can dial this node, and how.
    pub reachability: Reachability,
}

impl NetInfo {
    /// The addresses others may use, best first: confirmed direct ones, relay circuits,
    /// then the listen addresses (which the invite ordering sorts by scope).
    pub fn shareable_addrs(&self) -> Vec<Multiaddr> {
        let mut out = match &self.reachability {
            Reachability::Direct { addrs } => addrs.clone(),
            Reachability::Relayed { circuits } => circuits.iter().map(|(_, a)| a.clone()).collect(),
            Reachability::Unknown | Reachability::BehindNat => Vec::new(),
        };
        out.extend(self.listen_addrs.iter().cloned());
        out
    }
}

enum Command {
    Publish {
        topic: TopicId,
        data: Vec<u8>,
        /// Whether bytes may go out as they are when this node has no key for the topic
        /// (tools and tests only; the engine's envelopes are sealed or not sent).
        bare: bool,
    },
    Subscribe(TopicId, SealKey),
    Unsubscribe(TopicId),
    Validate {
        id: MessageId,
        source: PeerId,
        verdict: MessageAcceptance,
    },
    Join {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: JoinRequest,
        reply: oneshot::Sender<Result<JoinResponse, NetError>>,
    },
    RespondJoin {
        token: u64,
        response: JoinResponse,
    },
    Sync {
        peer: PeerId,
        request: SyncRequest,
        reply: oneshot::Sender<Result<SyncResponse, NetError>>,
    },
    RespondSync {
        token: u64,
        response: SyncResponse,
    },
    File {
        peer: PeerId,
        request: FileRequest,
        reply: oneshot::Sender<Result<FileResponse, NetError>>,
    },
    RespondFile {
        token: u64,
        response: FileResponse,
    },
    Provide([u8; 32]),
    StopProviding([u8; 32]),
    FindProviders([u8; 32]),
    GetProviders {
        key: [u8; 32],
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Info(oneshot::Sender<NetInfo>),
    SetBlocked {
        peers: Vec<PeerId>,
        reply: oneshot::Sender<Result<Vec<PeerId>, NetError>>,
    },
    Blocked(oneshot::Sender<Vec<PeerId>>),
    Shutdown,
}

/// Cloneable handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
}

impl NetHandle {
    async fn send(&self, cmd: Command) -> Result<(), NetError> {
        self.tx.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    fn send_blocking(&self, cmd: Command) -> Result<(), NetError> {
        self.tx.blocking_send(cmd).map_err(|_| NetError::Stopped)
    }

    /// Publishes bytes on a topic from async code (tools and tests; the engine uses
    /// [`NetHandle::publish_blocking`]): sealed if this node has the topic's key, else as
    /// they are.
    pub async fn publish(&self, topic: TopicId, data: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::Publish {
            topic,
            data,
            bare: true,
        })
        .await
    }

    /// Publishes envelope bytes on a topic, sealed with its key; without a key (never
    /// subscribed) nothing is sent. Called from the engine thread (blocking).
    pub fn publish_blocking(&self, topic: TopicId, data: Vec<u8>) -> Result<(), NetError> {
        self.send_blocking(Command::Publish {
            topic,
            data,
            bare: false,
        })
    }

    /// Subscribes to a group topic whose frames `seal` seals and opens (engine thread).
    pub fn subscribe_blocking(&self, topic: TopicId, seal: SealKey) -> Result<(), NetError> {
        self.send_blocking(Command::Subscribe(topic, seal))
    }

    /// Unsubscribes from a group topic (engine thread).
    pub fn unsubscribe_blocking(&self, topic: TopicId) -> Result<(), NetError> {
        self.send_blocking(Command::Unsubscribe(topic))
    }

    /// Reports the engine's verdict on a gossip message (engine thread).
    pub fn validate_blocking(
        &self,
        id: MessageId,
        source: PeerId,
        verdict: &Verdict,
    ) -> Result<(), NetError> {
        let verdict = match verdict {
            Verdict::Accept => MessageAcceptance::Accept,
            // Only what no honest node forwards costs the forwarder score (see
            // `RejectReason::is_intrinsic`); the rest is dropped without a penalty.
            Verdict::Reject(r) if r.is_intrinsic() => MessageAcceptance::Reject,
            Verdict::Reject(_) | Verdict::Ignore(_) => MessageAcceptance::Ignore,
        };
        self.send_blocking(Command::Validate {
            id,
            source,
            verdict,
        })
    }

    /// Answers an inbound join request (engine thread).
    pub fn respond_join_blocking(
        &self,
        token: u64,
        response: JoinResponse,
    ) -> Result<(), NetError> {
        self.send_blocking(Command::RespondJoin { token, response })
    }

    /// Answers an inbound sync request (engine thread).
    pub fn respond_sync_blocking(
        &self,
        token: u64,
        response: SyncResponse,
    ) -> Result<(), NetError> {
        self.send_blocking(Command::RespondSync { token, response })
    }

    /// Sends one history sync request to `peer` (normally connected; otherwise dialled at
    /// addresses known to the DHT) and waits for the page or refusal.
    pub async fn sync(&self, peer: PeerId, request: SyncRequest) -> Result<SyncResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Sync {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Sends one file request to `peer` (dialled if needed, at addresses the DHT or
    /// identify know) and waits for the answer.
    pub async fn file(&self, peer: PeerId, request: FileRequest) -> Result<FileResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::File {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Answers an inbound file request.
    pub async fn respond_file(&self, token: u64, response: FileResponse) -> Result<(), NetError> {
        self.send(Command::RespondFile { token, response }).await
    }

    /// Announces this node as a provider of `key` in the DHT (engine thread).
    pub fn provide_blocking(&self, key: [u8; 32]) -> Result<(), NetError> {
        self.send_blocking(Command::Provide(key))
    }

    /// Looks up providers of `key` and dials the ones not yet connected (engine thread).
    pub fn find_providers_blocking(&self, key: [u8; 32]) -> Result<(), NetError> {
        self.send_blocking(Command::FindProviders(key))
    }

    /// Stops announcing this node as a provider of `key` (engine thread). Records already
    /// stored by other nodes expire on their own.
    pub fn stop_providing_blocking(&self, key: [u8; 32]) -> Result<(), NetError> {
        self.send_blocking(Command::StopProviding(key))
    }

    /// Looks up providers of `key` in the DHT and returns the first ones found (empty if
    /// none was found before the query ended). The found peers are also dialled.
    pub async fn get_providers(&self, key: [u8; 32]) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::GetProviders { key, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Connects to `peer` (at `addrs`, and at addresses the DHT knows), or returns at once
    /// if connected. Fails with [`NetError::Request`] when every address failed.
    pub async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Connect { peer, addrs, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Sends a join request to `peer`, dialling `addrs` if needed, and waits for the answer.
    pub async fn join(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: JoinRequest,
    ) -> Result<JoinResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Join {
            peer,
            addrs,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// The current network state.
    pub async fn info(&self) -> Result<NetInfo, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Info(reply)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Replaces the block list with `peers` and returns it, sorted. Connections to newly
    /// blocked peers are closed and new ones refused in both directions; unblocked peers are
    /// dialled again (at addresses from the DHT routing table or remembered when they were
    /// blocked) until connected, so a healed partition reforms without waiting for
    /// rendezvous. This node's own id is left out. Fails with [`NetError::TooManyBlocked`]
    /// above [`MAX_BLOCKED_PEERS`] peers.
    pub async fn set_blocked(&self, peers: Vec<PeerId>) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetBlocked { peers, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// The blocked peers, sorted.
    pub async fn blocked(&self) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Blocked(reply)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The current network state, from the engine thread.
    pub fn info_blocking(&self) -> Result<NetInfo, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send_blocking(Command::Info(reply))?;
        rx.blocking_recv().map_err(|_| NetError::Stopped)
    }

    /// Stops the network task.
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}

/// A message carried on one of Kith's request-response protocols: encoded by
/// `kith_protocol::codec` and never longer than [`WireMessage::MAX_BYTES`].
pub trait WireMessage: Sized + Send {
    /// Longest accepted encoding; a longer frame is refused before it is read.
    const MAX_BYTES: usize;
    /// Encodes the message.
    fn to_bytes(&self) -> Result<Vec<u8>, String>;
    /// Decodes a received message (bounded, typed errors, never panics).
    fn from_bytes(bytes: &[u8]) -> Result<Self, String>;
}

macro_rules! wire_message {
    ($ty:ty, $max:expr, $encode:expr) => {
        impl WireMessage for $ty {
            const MAX_BYTES: usize = $max;
            fn to_bytes(&self) -> Result<Vec<u8>, String> {
                $encode(self).map_err(|e| e.to_string())
            }
            fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
                <$ty>::decode(bytes).map_err(|e| e.to_string())
            }
        }
    };
}

wire_message!(
    JoinRequest,
    MAX_JOIN_REQUEST_BYTES,
    codec::encode::<JoinRequest>
);
wire_message!(
    JoinResponse,
    MAX_JOIN_RESPONSE_BYTES,
    codec::encode::<JoinResponse>
);
wire_message!(SyncRequest, MAX_SYNC_REQUEST_BYTES, SyncRequest::encode);
wire_message!(SyncResponse, MAX_SYNC_RESPONSE_BYTES, SyncResponse::encode);
wire_message!(FileRequest, MAX_FILE_REQUEST_BYTES, FileRequest::encode);
wire_message!(FileResponse, MAX_FILE_RESPONSE_BYTES, FileResponse::encode);

/// Length-prefixed codec for Kith's request-response protocols: a 4-byte big-endian
/// length, then the message. A length above the message type's limit is refused before
/// anything is read, and every message is bound-checked when decoded. With counters
/// ([`FramedCodec::counted`]) it adds every frame's bytes to them.
pub struct FramedCodec<Req, Resp> {
    bytes: Option<FrameBytes>,
    _messages: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for FramedCodec<Req, Resp> {
    fn default() -> Self {
        FramedCodec {
            bytes: None,
            _messages: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FramedCodec<Req, Resp> {
    fn clone(&self) -> Self {
        FramedCodec {
            bytes: self.bytes.clone(),
            _messages: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> FramedCodec<Req, Resp> {
    /// A codec that counts its frames' bytes in `bytes`.
    pub fn counted(bytes: FrameBytes) -> Self {
        FramedCodec {
            bytes: Some(bytes),
            _messages: std::marker::PhantomData,
        }
    }

    fn count(&self, which: fn(&FrameBytes) -> &Counter, frame_len: usize) {
        if let Some(b) = &self.bytes {
            which(b).inc_by(FRAME_PREFIX_BYTES + frame_len as u64);
        }
    }
}

/// Length of the frame length prefix.
const FRAME_PREFIX_BYTES: u64 = 4;

/// The join protocol's codec.
pub type JoinCodec = FramedCodec<JoinRequest, JoinResponse>;
/// The history sync protocol's codec.
pub type SyncCodec = FramedCodec<SyncRequest, SyncResponse>;
/// The file protocol's codec.
pub type FileCodec = FramedCodec<FileRequest, FileResponse>;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {limit}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.flush().await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one message; returns it with its frame's length (without the prefix).
async fn read_message<M: WireMessage, T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<(M, usize)> {
    let bytes = read_frame(io, M::MAX_BYTES).await?;
    Ok((M::from_bytes(&bytes).map_err(invalid)?, bytes.len()))
}

/// Writes one message; returns its frame's length (without the prefix).
async fn write_message<M: WireMessage, T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    message: M,
) -> io::Result<usize> {
    let bytes = message.to_bytes().map_err(invalid)?;
    write_frame(io, &bytes).await?;
    Ok(bytes.len())
}

impl<Req: WireMessage, Resp: WireMessage> request_response::Codec for FramedCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let (req, len) = read_message(io).await?;
        self.count(|b| &b.request_received, len);
        Ok(req)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let (resp, len) = read_message(io).await?;
        self.count(|b| &b.response_received, len);
        Ok(resp)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let len = write_message(io, req).await?;
        self.count(|b| &b.request_sent, len);
        Ok(())
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let len = write_message(io, res).await?;
        self.count(|b| &b.response_sent, len);
        Ok(())
    }
}

/// The requests of one request-response protocol that await an answer, both ways.
/// Bounded: beyond the limits an inbound request is dropped (its stream closes, the
/// requester sees a failure) and an outbound one is refused with [`NetError::Busy`].
struct Exchange<Resp> {
    name: &'static str,
    inbound: HashMap<u64, ResponseChannel<Resp>>,
    outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, NetError>>>,
    max_inbound: usize,
    max_outbound: usize,
}

impl<Resp> Exchange<Resp> {
    fn new(name: &'static str, max_inbound: usize, max_outbound: usize) -> Self {
        Exchange {
            name,
            inbound: HashMap::new(),
            outbound: HashMap::new(),
            max_inbound,
            max_outbound,
        }
    }

    /// Refuses `reply` if too many requests are in flight; otherwise hands it back.
    fn admit_outbound(
        &self,
        reply: oneshot::Sender<Result<Resp, NetError>>,
    ) -> Option<oneshot::Sender<Result<Resp, NetError>>> {
        if self.outbound.len() >= self.max_outbound {
            let _ = reply.send(Err(NetError::Busy));
            return None;
        }
        Some(reply)
    }

    /// Takes the answer channel of inbound request `token`, if it is still pending.
    fn take_inbound(&mut self, token: u64) -> Option<ResponseChannel<Resp>> {
        self.inbound.remove(&token)
    }

    /// Handles one behaviour event; returns an inbound request to hand to the engine with
    /// its token.
    fn on_event<Req>(
        &mut self,
        event: request_response::Event<Req, Resp>,
        next_token: &mut u64,
    ) -> Option<(PeerId, Req, u64)> {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if self.inbound.len() >= self.max_inbound {
                    tracing::warn!(%peer, protocol = self.name, "too many requests pending; dropping one");
                    return None;
                }
                let token = *next_token;
                *next_token += 1;
                self.inbound.insert(token, channel);
                Some((peer, request, token))
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                None
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
                None
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, protocol = self.name, error = %error, "inbound request failed");
                // Channels whose stream failed are dead; forget them.
                self.inbound.retain(|_, ch| ch.is_open());
                None
            }
            Event::ResponseSent { .. } => None,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    block: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    caps: ConnectionCaps,
    gossipsub: gossipsub::Behaviour<gossipsub::IdentityTransform, SubscriptionCap>,
    kad: kad::Behaviour<FairStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    join: request_response::Behaviour<JoinCodec>,
    sync: request_response::Behaviour<SyncCodec>,
    file: request_response::Behaviour<FileCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::v2::client::Behaviour,
    autonat_server: autonat::v2::server::Behaviour,
    upnp: Toggle<upnp::tokio::Behaviour>,
}

/// Gossipsub's subscription filter: what one peer may subscribe to.
type SubscriptionCap = gossipsub::MaxCountSubscriptionFilter<gossipsub::AllowAllSubscriptionFilter>;

/// Largest gossip frame read or sent: a sealed envelope of the largest size.
const MAX_TRANSMIT_BYTES: usize = MAX_ENVELOPE_BYTES + 1024;
const _: () = assert!(MAX_FRAME_BYTES <= MAX_TRANSMIT_BYTES);

/// How long the frame id of an opened envelope is kept for its verdict: gossipsub forgets
/// unvalidated messages sooner (its message cache), so a verdict later than this has
/// nothing left to report to.
const FRAME_ID_TTL: Duration = Duration::from_secs(120);
/// Frame ids kept at most for verdicts not reported yet (the engine reports each one).
const MAX_PENDING_FRAMES: usize = 65_536;

/// Message ids announced in one IHAVE (each costs 34 bytes on the wire).
const MAX_IHAVE_IDS: usize = 1500;
/// Control message bytes (IHAVE, IWANT, IDONTWANT, GRAFT, PRUNE) read in one frame: room
/// for a full IHAVE and IWANT of [`MAX_IHAVE_IDS`] each.
const MAX_CONTROL_BYTES: usize = 128 * 1024;
// A full IHAVE and a full IWANT (34 bytes per id with protobuf framing) fit in one frame.
const _: () = assert!(2 * MAX_IHAVE_IDS * 34 + 1024 <= MAX_CONTROL_BYTES);

/// Topics one peer may be subscribed to at once, and announce in one message (a node sends
/// all of its subscriptions at once when it connects, one topic per group it is in).
const MAX_PEER_TOPICS: usize = 1024;

fn topic_of(t: TopicId) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(t.topic_string())
}

/// Builds the behaviours. With a registry, gossipsub records its internal metrics in it
/// (prefix `gossipsub`).
fn behaviour(
    key: &Keypair,
    relay_client: relay::client::Behaviour,
    cfg: &NetConfig,
    registry: Option<&mut Registry>,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer = key.public().to_peer_id();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::new(&MessageId::of(&m.data).0)
        })
        .max_transmit_size(MAX_TRANSMIT_BYTES)
        // gossipsub 0.50 lets a peer announce 5000 ids in one IHAVE (~170 KB) but reads
        // at most 16 KB of control messages per frame and gives up on the stream beyond
        // that, which an honest node reaches at ~230 msg/s in a group. Announce fewer and
        // read more, so honest gossip always fits.
        .max_control_messages_sent(MAX_IHAVE_IDS)
        .max_control_message_size(MAX_CONTROL_BYTES)
        .heartbeat_interval(cfg.heartbeat)
        .build()?;
    let mut gossipsub = gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Anonymous,
        gossip_config,
        gossipsub::MaxCountSubscriptionFilter {
            filter: gossipsub::AllowAllSubscriptionFilter {},
            max_subscribed_topics: MAX_PEER_TOPICS,
            max_subscriptions_per_request: MAX_PEER_TOPICS,
        },
    )?;
    let (score, thresholds) = limits::score_params();
    gossipsub.with_peer_score(score, thresholds)?;
    if let Some(registry) = registry {
        gossipsub = gossipsub.with_metrics(
            registry.sub_registry_with_prefix("gossipsub"),
            gossipsub::MetricsConfig::default(),
        );
    }
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_query_timeout(Duration::from_secs(30));
    let mut kad = kad::Behaviour::with_config(
        peer,
        FairStore::new(peer, cfg.peer_faults.clone()),
        kad_config,
    );
    // Only a node others can dial serves the DHT (a NATed one in the routing tables would
    // only cost everyone failed dials); the mode follows AutoNAT's verdict.
    kad.set_mode(Some(kad::Mode::Client));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("kith/{}", env!("CARGO_PKG_VERSION"))),
    );
    let join = request_response::Behaviour::new(
        [(JOIN_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(JOIN_TIMEOUT)
            .with_max_concurrent_streams(MAX_PENDING_INBOUND),
    );
    let sync = request_response::Behaviour::with_codec(
        SyncCodec::counted(cfg.sync_bytes.clone()),
        [(SYNC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(SYNC_TIMEOUT)
            .with_max_concurrent_streams(MAX_PENDING_SYNC_INBOUND),
    );
    let file = request_response::Behaviour::with_codec(
        FileCodec::counted(cfg.file_bytes.clone()),
        [(FILE_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(FILE_TIMEOUT)
            .with_max_concurrent_streams(MAX_PENDING_FILE_INBOUND),
    );
    let mdns = if cfg.mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer)?)
    } else {
        None
    };
    Ok(Behaviour {
        block: allow_block_list::Behaviour::default(),
        caps: ConnectionCaps::new(cfg.caps, cfg.peer_faults.clone()),
        gossipsub,
        kad,
        identify,
        // Liveness every 30 s (10 s timeout): it is how a path that died behind a NAT is
        // noticed, and the default 15 s was a measurable share of idle CPU with tens of
        // connections per node.
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(Duration::from_secs(30))
                .with_timeout(Duration::from_secs(10)),
        ),
        join,
        sync,
        file,
        mdns: Toggle::from(mdns),
        relay_client,
        relay: Toggle::from(
            cfg.nat
                .relay_service
                .as_ref()
                .map(|l| relay_server(peer, l)),
        ),
        dcutr: dcutr::Behaviour::new(peer),
        autonat: autonat::v2::client::Behaviour::default(),
        autonat_server: autonat::v2::server::Behaviour::default(),
        upnp: Toggle::from(cfg.nat.upnp.then(upnp::tokio::Behaviour::default)),
    })
}

/// The relay service with `limits` (libp2p's default rate limits per peer and per IP).
fn relay_server(peer: PeerId, limits: &RelayLimits) -> relay::Behaviour {
    let config = relay::Config {
        max_reservations: limits.max_reservations,
        max_reservations_per_peer: 2,
        max_circuits: limits.max_circuits,
        max_circuits_per_peer: limits.max_circuits_per_peer,
        max_circuit_duration: limits.circuit_duration,
        max_circuit_bytes: limits.circuit_bytes,
        ..relay::Config::default()
    };
    let mut relay = relay::Behaviour::new(peer, config);
    // Fixed on, never switched: libp2p-relay 0.22 tells every connection about a status
    // change, relayed ones too, whose (dummy) handler cannot take it and panics the
    // connection task. A node behind NAT thus also offers the protocol, but Kith nodes only
    // pick relays that advertise a public address (see `reach`).
    relay.set_status(Some(relay::Status::Enable));
    relay
}

/// Builds the swarm and starts listening. With a registry, libp2p's metrics (swarm and
/// behaviour events, transport bandwidth) and gossipsub's are registered in it, and the
/// returned recorder is to be fed the swarm's events.
fn build_swarm(
    cfg: &NetConfig,
    registry: Option<&mut Registry>,
) -> Result<(Swarm<Behaviour>, Option<Libp2pMetrics>), NetError> {
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let builder = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            || Guarded(yamux::Config::default()),
        )
        .map_err(|e| build(&e))?
        .with_other_transport(|key| {
            use libp2p::Transport as _;
            quic::tokio::Transport::new(quic::Config::new(key))
                .map(|(peer, muxer), _| (peer, GuardedMuxer::new(muxer)))
        })
        .map_err(|e| build(&e))?
        .with_relay_client(noise::Config::new, || Guarded(yamux::Config::default()))
        .map_err(|e| build(&e))?;
    let swarm_config =
        |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    let (mut swarm, metrics) = match registry {
        Some(registry) => {
            let metrics = Libp2pMetrics::new(registry);
            let swarm = builder
                .with_bandwidth_metrics(registry)
                .with_behaviour(|key, relay| behaviour(key, relay, cfg, Some(registry)))
                .map_err(|e| build(&e))?
                .with_swarm_config(swarm_config)
                .build();
            (swarm, Some(metrics))
        }
        None => {
            let swarm = builder
                .with_behaviour(|key, relay| behaviour(key, relay, cfg, None))
                .map_err(|e| build(&e))?
                .with_swarm_config(swarm_config)
                .build();
            (swarm, None)
        }
    };
    for addr in &cfg.listen {
        swarm.listen_on(addr.clone()).map_err(|e| {
            tracing::debug!(%addr, error = ?e, "listen_on failed");
            NetError::Listen {
                addr: addr.clone(),
                reason: ListenFailure::of(addr, &e),
            }
        })?;
    }
    Ok((swarm, metrics))
}

/// Splits `/…/p2p/<id>` into the peer id and the address without it.
pub fn split_peer(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut a = addr.clone();
    match a.pop() {
        Some(Protocol::P2p(peer)) => Some((peer, a)),
        _ => None,
    }
}

/// Whether an address is worth remembering or handing out: anything but an unusable one
/// (unspecified, multicast, no IP). Relay circuits are kept: they are how a NATed peer is
/// reached.
fn is_dialable(addr: &Multiaddr) -> bool {
    !matches!(
        kith_protocol::addr::AddrScope::of(addr),
        kith_protocol::addr::AddrScope::Unusable
    )
}

/// Starts the network task on its own thread, `kith-net`, with its own single-threaded
/// async runtime: the swarm, its connections (transport, Noise, Yamux, every protocol
/// handler) and their timers all run there. Returns its handle and the event stream. With
/// a metrics registry, libp2p's and gossipsub's metrics are registered in it and kept up to
/// date.
///
/// Why a thread of its own: the network's CPU is then the thread's CPU (the testnet bench
/// reports it as the "gossip" share), and a message's way through the swarm never hops
/// between the worker threads of a shared runtime.
pub fn spawn(
    cfg: NetConfig,
    metrics: Option<&mut Registry>,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let runtime = NetRuntime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::Build(format!("cannot start the network runtime: {e}")))?,
    ));
    // Listeners, the QUIC endpoint's driver and every connection task belong to the network
    // runtime: build the swarm inside it.
    let prepared = match &runtime.0 {
        Some(rt) => {
            let _entered = rt.enter();
            prepare(cfg, metrics)
        }
        None => Err(NetError::Build("no network runtime".into())),
    };
    let (handle, ev_rx, task) = prepared?;
    let span = tracing::debug_span!("node", id = %short_peer(task.swarm.local_peer_id()));
    let (tx, rx) = handle;
    std::thread::Builder::new()
        .name("kith-net".into())
        .spawn(move || {
            // With several nodes in one process (the tests), debug logs say which node spoke.
            let _span = span.entered();
            let mut runtime = runtime;
            if let Some(rt) = runtime.0.take() {
                rt.block_on(task.run(rx));
            }
        })
        .map_err(|e| NetError::Build(format!("cannot start the network thread: {e}")))?;
    Ok((NetHandle { tx }, ev_rx))
}

/// The network thread's runtime until that thread takes it. Dropped before (the swarm could
/// not be built, the thread not started), it is dropped on the caller's thread, inside the
/// node's own async runtime, where a runtime may only be shut down in the background.
struct NetRuntime(Option<tokio::runtime::Runtime>);

impl Drop for NetRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

type CommandChannel = (mpsc::Sender<Command>, mpsc::Receiver<Command>);

/// Builds the swarm, dials the bootstrap and remembered peers, and makes the task.
fn prepare(
    cfg: NetConfig,
    metrics: Option<&mut Registry>,
) -> Result<(CommandChannel, mpsc::Receiver<NetEvent>, NetTask), NetError> {
    let (mut swarm, metrics) = build_swarm(&cfg, metrics)?;
    for addr in &cfg.bootstrap {
        if let Some((peer, a)) = split_peer(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            if let Err(e) = swarm.dial(DialOpts::peer_id(peer).addresses(vec![a]).build()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        } else {
            tracing::warn!(%addr, "bootstrap address lacks /p2p/<peer id>; dialling without it");
            let _ = swarm.dial(addr.clone());
        }
    }
    for (peer, addrs) in cfg.known_peers.iter().take(32) {
        for a in addrs {
            swarm.behaviour_mut().kad.add_address(peer, a.clone());
        }
    }
    // Reconnect to a few remembered peers so a restarted node finds its groups again.
    for (peer, addrs) in cfg.known_peers.iter().take(8) {
        let _ = swarm.dial(DialOpts::peer_id(*peer).addresses(addrs.clone()).build());
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let task = NetTask {
        swarm,
        events: ev_tx,
        join: Exchange::new("join", MAX_PENDING_INBOUND, MAX_PENDING_OUTBOUND),
        sync: Exchange::new("sync", MAX_PENDING_SYNC_INBOUND, MAX_PENDING_SYNC_OUTBOUND),
        file: Exchange::new("file", MAX_PENDING_FILE_INBOUND, MAX_PENDING_FILE_OUTBOUND),
        next_token: 0,
        listen_addrs: Vec::new(),
        bootstrapped: !cfg.bootstrap.is_empty() || !cfg.known_peers.is_empty(),
        subscribed: HashSet::new(),
        seals: HashMap::new(),
        frames: HashMap::new(),
        frame_order: std::collections::VecDeque::new(),
        outbox: HashMap::new(),
        outbox_bytes: 0,
        blocked_addrs: HashMap::new(),
        redial: HashMap::new(),
        metrics,
        peer_faults: cfg.peer_faults.clone(),
        limits: PeerLimits::new(
            limits::GOSSIP_RATE,
            limits::JOIN_RATE,
            cfg.peer_faults.clone(),
        ),
        graylisted: HashSet::new(),
        heartbeat: cfg.heartbeat,
        network: cfg.network.clone(),
        provider_queries: HashMap::new(),
        dials: HashMap::new(),
        reach: Reach::new(cfg.nat.relays_wanted),
        public: cfg.nat.public,
        closing: Vec::new(),
        conns: HashMap::new(),
        topic_peers: HashMap::new(),
        provided: HashSet::new(),
        last_refresh: None,
        dht_servers: HashSet::new(),
        refresh_pending: false,
        next_refresh: std::time::Instant::now() + RENDEZVOUS_REFRESH,
        refresh_every: RENDEZVOUS_REFRESH,
    };
    Ok(((tx, rx), ev_rx, task))
}

struct NetTask {
    swarm: Swarm<Behaviour>,
    events: mpsc::Sender<NetEvent>,
    /// Join requests awaiting an answer, both ways.
    join: Exchange<JoinResponse>,
    /// Sync requests awaiting a page, both ways.
    sync: Exchange<SyncResponse>,
    file: Exchange<FileResponse>,
    next_token: u64,
    listen_addrs: Vec<Multiaddr>,
    bootstrapped: bool,
    subscribed: HashSet<TopicId>,
    /// The key that seals and opens each topic's frames, for every topic subscribed to
    /// since the task started (kept after unsubscribing). Only subscribed topics' messages
    /// arrive, so a kept key opens nothing it should not.
    seals: HashMap<gossipsub::TopicHash, SealKey>,
    /// For each envelope opened from a frame and not judged yet: the frame's gossipsub id
    /// (the engine judges envelopes by their own id), and when it arrived. Bounded by
    /// [`MAX_PENDING_FRAMES`] and [`FRAME_ID_TTL`].
    frames: HashMap<MessageId, (gossipsub::MessageId, std::time::Instant)>,
    /// `frames` in arrival order, for expiry and eviction (an entry already reported is
    /// skipped when its turn comes).
    frame_order: std::collections::VecDeque<(std::time::Instant, MessageId)>,
    /// Envelopes published while no peer on their topic was known, sent as soon as one
    /// subscribes. Bounded per topic and in total; the oldest go first when full.
    outbox: HashMap<gossipsub::TopicHash, std::collections::VecDeque<Vec<u8>>>,
    outbox_bytes: usize,
    /// Addresses of blocked peers, remembered when they were blocked (the DHT routing table
    /// may forget them meanwhile), to dial them again once unblocked.
    blocked_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Unblocked peers to dial until connected: dial attempts left and addresses. Bounded
    /// by [`MAX_BLOCKED_PEERS`].
    redial: HashMap<PeerId, (u8, Vec<Multiaddr>)>,
    /// libp2p's metrics recorder, when metrics are on.
    metrics: Option<Libp2pMetrics>,
    /// Peers cut off or limited, counted.
    peer_faults: PeerFaults,
    /// Per-peer rates of gossip and join requests.
    limits: PeerLimits,
    /// Connected peers graylisted at the last look (for logging changes).
    graylisted: HashSet<PeerId>,
    /// Gossipsub's heartbeat interval.
    heartbeat: Duration,
    /// The network id.
    network: String,
    /// Provider lookups a caller awaits, answered with the first providers found.
    provider_queries: HashMap<kad::QueryId, oneshot::Sender<Vec<PeerId>>>,
    /// Dials a caller awaits, by connection: the peer and the answer channel.
    dials: HashMap<ConnectionId, (PeerId, oneshot::Sender<Result<(), NetError>>)>,
    /// Reachability and relay reservations.
    reach: Reach,
    /// This node's own public addresses are declared reachable ([`NatSettings::public`]).
    public: bool,
    /// Relayed connections superseded by a direct one, with when to close them.
    closing: Vec<(std::time::Instant, PeerId, ConnectionId)>,
    /// Open connections per peer, and whether each goes through a relay.
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// Peers on one of our topics (group members), with their last identified addresses:
    /// dialled again when their last connection closes.
    topic_peers: HashMap<PeerId, Vec<Multiaddr>>,
    /// DHT keys this node provides, announced again when it starts serving the DHT.
    provided: HashSet<[u8; 32]>,
    /// When the provided keys were last announced and looked up again.
    last_refresh: Option<std::time::Instant>,
    /// The first [`FEW_DHT_SERVERS`] peers seen serving the DHT.
    dht_servers: HashSet<PeerId>,
    /// A refresh was asked for too soon after the last one.
    refresh_pending: bool,
    /// When the provided keys are next announced and looked up again: soon after start or
    /// a network change (who serves the DHT is only learnt in the first seconds), then
    /// less and less often.
    next_refresh: std::time::Instant,
    /// The current gap between those refreshes (doubles up to [`MAX_EARLY_REFRESH`]).
    refresh_every: Duration,
}

impl NetTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut bootstrap_timer = tokio::time::interval(Duration::from_secs(300));
        bootstrap_timer.tick().await;
        let mut redial_timer = tokio::time::interval(REDIAL_INTERVAL);
        redial_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        redial_timer.tick().await;
        // gossipsub 0.50 re-arms its heartbeat timer after it fires without registering a
        // waker (`Behaviour::poll` resets the `Delay` and returns `Pending`), so on a quiet
        // node the heartbeat, and with it mesh repair and IHAVE gossip, only runs when
        // something else wakes this task (a ping, every 15 s). Polling the swarm once per
        // heartbeat interval keeps it on time.
        let mut swarm_wake = tokio::time::interval(self.heartbeat);
        swarm_wake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reach_timer = tokio::time::interval(REACH_INTERVAL);
        reach_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.on_command(cmd),
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = bootstrap_timer.tick() => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = redial_timer.tick(), if !self.redial.is_empty() => self.redial_unblocked(),
                _ = reach_timer.tick() => {
                    if self.refresh_pending || std::time::Instant::now() >= self.next_refresh {
                        self.refresh_every = (self.refresh_every * 2).min(MAX_EARLY_REFRESH);
                        self.next_refresh = std::time::Instant::now() + self.refresh_every;
                        self.refresh_rendezvous();
                    }
                    self.tend_relays();
                    self.close_superseded();
                    self.tend_scores();
                    self.forget_frames(std::time::Instant::now());
                }
                // Nothing to do: the next turn of the loop polls the swarm.
                _ = swarm_wake.tick() => {}
            }
        }
        tracing::debug!("network task stopped");
    }

    /// Hands `event` to the engine; returns whether it was taken.
    fn emit(&self, event: NetEvent) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(ev)) => {
                tracing::warn!(?ev, "engine queue full; dropping network event");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn queue(&mut self, topic: gossipsub::TopicHash, data: Vec<u8>) {
        let q = self.outbox.entry(topic).or_default();
        self.outbox_bytes += data.len();
        q.push_back(data);
        while q.len() > OUTBOX_PER_TOPIC || (self.outbox_bytes > OUTBOX_BYTES && !q.is_empty()) {
            if let Some(old) = q.pop_front() {
                self.outbox_bytes -= old.len();
                tracing::warn!("outbox full; oldest unsent message left to history sync");
            }
        }
    }

    /// Publishes what was queued for `topic` now that a peer subscribed to it.
    fn flush(&mut self, topic: &gossipsub::TopicHash) {
        let Some(mut q) = self.outbox.remove(topic) else {
            return;
        };
        while let Some(data) = q.pop_front() {
            match self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic.clone(), data.clone())
            {
                Ok(_) | Err(gossipsub::PublishError::Duplicate) => self.outbox_bytes -= data.len(),
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                    q.push_front(data);
                    break;
                }
                Err(e) => {
                    self.outbox_bytes -= data.len();
                    tracing::warn!(error = %e, "queued publish failed");
                }
            }
        }
        if !q.is_empty() {
            self.outbox.insert(topic.clone(), q);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Publish { topic, data, bare } => {
                let hash = topic_of(topic).hash();
                // A group's envelopes go out sealed, never bare.
                let data = match self.seals.get(&hash) {
                    Some(key) => match seal::seal(key, &data) {
                        Ok(frame) => frame,
                        Err(e) => {
                            tracing::warn!(topic = %topic.short(), error = %e, "cannot seal an envelope; not sent");
                            return;
                        }
                    },
                    None if bare => data,
                    None => {
                        tracing::warn!(topic = %topic.short(), "no key for the topic; envelope not sent");
                        return;
                    }
                };
                match b.gossipsub.publish(hash.clone(), data.clone()) {
                    Ok(_) => {}
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                        tracing::debug!(topic = %topic.short(), "no peer on the topic yet; queued");
                        self.queue(hash, data);
                    }
                    Err(e) => tracing::warn!(topic = %topic.short(), error = %e, "publish failed"),
                }
            }
            Command::Subscribe(t, key) => {
                self.seals.insert(topic_of(t).hash(), key);
                if let Err(e) = b.gossipsub.subscribe(&topic_of(t)) {
                    tracing::warn!(topic = %t.short(), error = %e, "subscribe failed");
                }
                if let Err(e) = b
                    .gossipsub
                    .set_topic_params(topic_of(t), limits::topic_score_params())
                {
                    tracing::warn!(topic = %t.short(), error = %e, "cannot score the topic");
                }
                self.subscribed.insert(t);
            }
            Command::Unsubscribe(t) => {
                b.gossipsub.unsubscribe(&topic_of(t));
                // The key stays (32 bytes per group this run was ever in): anything still
                // published on the topic goes out sealed, never bare.
                self.subscribed.remove(&t);
            }
            Command::Validate {
                id,
                source,
                verdict,
            } => {
                let frame = match self.frames.remove(&id) {
                    Some((frame, _)) => frame,
                    None => gossipsub::MessageId::new(&id.0),
                };
                b.gossipsub
                    .report_message_validation_result(&frame, &source, verdict);
            }
            Command::Join {
                peer,
                addrs,
                request,
                reply,
            } => {
                let Some(reply) = self.join.admit_outbound(reply) else {
                    return;
                };
                for a in &addrs {
                    b.kad.add_address(&peer, a.clone());
                }
                let id = b.join.send_request_with_addresses(&peer, request, addrs);
                self.join.outbound.insert(id, reply);
            }
            Command::RespondJoin { token, response } => {
                if let Some(ch) = self.join.take_inbound(token)
                    && b.join.send_response(ch, response).is_err()
                {
                    tracing::debug!("joiner went away before the answer");
                }
            }
            Command::Sync {
                peer,
                request,
                reply,
            } => {
                let Some(reply) = self.sync.admit_outbound(reply) else {
                    return;
                };
                let id = b.sync.send_request(&peer, request);
                self.sync.outbound.insert(id, reply);
            }
            Command::RespondSync { token, response } => {
                if let Some(ch) = self.sync.take_inbound(token)
                    && b.sync.send_response(ch, response).is_err()
                {
                    tracing::debug!("sync requester went away before the answer");
                }
            }
            Command::File {
                peer,
                request,
                reply,
            } => {
                let Some(reply) = self.file.admit_outbound(reply) else {
                    return;
                };
                let id = b.file.send_request(&peer, request);
                self.file.outbound.insert(id, reply);
            }
            Command::RespondFile { token, response } => {
                if let Some(ch) = self.file.take_inbound(token)
                    && b.file.send_response(ch, response).is_err()
                {
                    tracing::debug!("file requester went away before the answer");
                }
            }
            Command::Provide(key) => {
                if self.provided.len() < MAX_PROVIDED_KEYS {
                    self.provided.insert(key);
                }
                if let Err(e) = b.kad.start_providing(kad::RecordKey::new(&key)) {
                    tracing::warn!(error = %e, "cannot announce group membership in the DHT");
                }
            }
            Command::StopProviding(key) => {
                self.provided.remove(&key);
                b.kad.stop_providing(&kad::RecordKey::new(&key));
            }
            Command::FindProviders(key) => {
                b.kad.get_providers(kad::RecordKey::new(&key));
            }
            Command::GetProviders { key, reply } => {
                if self.provider_queries.len() >= MAX_PROVIDER_QUERIES {
                    let _ = reply.send(Vec::new());
                    return;
                }
                let id = b.kad.get_providers(kad::RecordKey::new(&key));
                self.provider_queries.insert(id, reply);
            }
            Command::Connect { peer, addrs, reply } => self.connect(peer, addrs, reply),
            Command::Info(reply) => {
                let relayed = self
                    .conns
                    .iter()
                    .filter(|(_, c)| !c.is_empty() && c.values().all(|relayed| *relayed))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(NetInfo {
                    peer_id: *self.swarm.local_peer_id(),
                    listen_addrs: self.listen_addrs.clone(),
                    connected: self.swarm.connected_peers().copied().collect(),
                    relayed,
                    reachability: self.reach.reachability(),
                });
            }
            Command::SetBlocked { peers, reply } => {
                let _ = reply.send(self.set_blocked(peers));
            }
            Command::Blocked(reply) => {
                let _ = reply.send(self.blocked());
            }
            Command::Shutdown => {}
        }
    }

    /// Dials `peer` for a caller that awaits the outcome.
    fn connect(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), NetError>>,
    ) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if self.dials.len() >= MAX_PENDING_DIALS {
            let _ = reply.send(Err(NetError::Busy));
            return;
        }
        for a in &addrs {
            self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::Always)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.insert(id, (peer, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Request {
                    peer,
                    reason: e.to_string(),
                }));
            }
        }
    }

    /// Answers the awaited dial on `connection`, if any.
    fn dial_done(&mut self, connection: ConnectionId, result: Result<(), String>) {
        if let Some((peer, reply)) = self.dials.remove(&connection) {
            let _ = reply.send(result.map_err(|reason| NetError::Request { peer, reason }));
        }
    }

    fn blocked(&self) -> Vec<PeerId> {
        let set: BTreeSet<PeerId> = self
            .swarm
            .behaviour()
            .block
            .blocked_peers()
            .iter()
            .copied()
            .collect();
        set.into_iter().collect()
    }

    /// Replaces the block list. Newly blocked peers are disconnected by the block list
    /// behaviour; unblocked ones are dialled again.
    fn set_blocked(&mut self, peers: Vec<PeerId>) -> Result<Vec<PeerId>, NetError> {
        let me = *self.swarm.local_peer_id();
        let wanted: HashSet<PeerId> = peers.into_iter().filter(|p| *p != me).collect();
        if wanted.len() > MAX_BLOCKED_PEERS {
            return Err(NetError::TooManyBlocked {
                max: MAX_BLOCKED_PEERS,
            });
        }
        let current: HashSet<PeerId> = self.swarm.behaviour().block.blocked_peers().clone();
        let (mut unblocked, mut blocked) = (0usize, 0usize);
        for peer in current.difference(&wanted) {
            self.swarm.behaviour_mut().block.unblock_peer(*peer);
            let addrs = self.blocked_addrs.remove(peer).unwrap_or_default();
            tracing::debug!(%peer, "unblocked peer");
            self.redial.insert(*peer, (REDIAL_ATTEMPTS, addrs));
            unblocked += 1;
        }
        for peer in wanted.difference(&current) {
            let addrs = self.routing_addrs(peer);
            self.redial.remove(peer);
            self.blocked_addrs.insert(*peer, addrs);
            self.swarm.behaviour_mut().block.block_peer(*peer);
            tracing::debug!(%peer, "blocked peer");
            blocked += 1;
        }
        if blocked + unblocked > 0 {
            tracing::info!(
                blocked,
                unblocked,
                total = wanted.len(),
                "block list changed"
            );
        }
        self.redial_unblocked();
        Ok(self.blocked())
    }

    /// The addresses of `peer` in the DHT routing table.
    fn routing_addrs(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let Some(bucket) = kad.kbucket(*peer) else {
            return Vec::new();
        };
        bucket
            .iter()
            .find(|e| e.node.key.preimage() == peer)
            .map(|e| {
                e.node
                    .value
                    .iter()
                    .take(MAX_ADDRS_PER_PEER)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Dials the unblocked peers that are not connected yet, each at most
    /// [`REDIAL_ATTEMPTS`] times. The other side may still block us for a while (a healed
    /// partition is unblocked one node at a time), hence the retries.
    fn redial_unblocked(&mut self) {
        let peers: Vec<PeerId> = self.redial.keys().copied().collect();
        for peer in peers {
            if self.swarm.is_connected(&peer) {
                self.redial.remove(&peer);
                continue;
            }
            let Some((left, addrs)) = self.redial.get_mut(&peer) else {
                continue;
            };
            *left = left.saturating_sub(1);
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs.clone())
                .extend_addresses_through_behaviour()
                .build();
            if *left == 0 {
                self.redial.remove(&peer);
            }
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "cannot dial unblocked peer");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.metrics {
            m.record(&event);
        }
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if self.reach.listen_addr(listener_id, &address) {
                    tracing::info!(%address, "reachable through a relay");
                } else {
                    tracing::info!(%address, "listening");
                    if self.public
                        && kith_protocol::addr::AddrScope::of(&address)
                            == kith_protocol::addr::AddrScope::Public
                    {
                        // Declared reachable: confirmed like an AutoNAT success (the swarm
                        // tells the behaviours, not us).
                        self.swarm.add_external_address(address.clone());
                        if self.reach.confirmed(&address) {
                            self.reachability_changed();
                        }
                    }
                    if !self.listen_addrs.contains(&address) {
                        self.listen_addrs.push(address);
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } if !self.reach.is_relay_listener(listener_id) => {
                self.listen_addrs.retain(|a| a != &address);
                self.network_changed(&address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.reach.closed(listener_id, std::time::Instant::now()) {
                    match reason {
                        Ok(()) => tracing::info!(%relay, "relay reservation ended"),
                        Err(e) => tracing::info!(%relay, error = %e, "relay reservation lost"),
                    }
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "others can dial this node at this address");
                if self.reach.confirmed(&address) {
                    self.reachability_changed();
                }
            }
            SwarmEvent::ExternalAddrExpired { address } if self.reach.expired(&address) => {
                self.reachability_changed();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dial_done(connection_id, Ok(()));
                self.track_connection(peer_id, connection_id, endpoint.is_relayed());
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), num_established, "connected");
                if num_established.get() == 1 {
                    self.emit(NetEvent::PeerConnected { peer: peer_id });
                    if !self.limits.is_penalised(&peer_id) {
                        // A penalty that ended while the peer was away is still in the
                        // score gossipsub kept for it.
                        let g = &mut self.swarm.behaviour_mut().gossipsub;
                        g.set_application_score(&peer_id, 0.0);
                    }
                }
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, num_established, cause = ?cause, "disconnected");
                if let Some(libp2p::swarm::ConnectionError::IO(e)) = &cause
                    && guard::is_gossip_stream_broken(e)
                {
                    self.peer_faults.inc(PeerFault::GossipStreamBroken);
                    tracing::info!(peer = %peer_id, "closed a connection: the peer sent an oversized or undecodable gossip frame");
                    let now = std::time::Instant::now();
                    if self.limits.cut(peer_id, now) {
                        tracing::info!(peer = %peer_id, "the peer's gossip stream broke again and again; refusing it for 10 minutes");
                        self.swarm
                            .behaviour_mut()
                            .caps
                            .ban(peer_id, now + limits::BAN);
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                    }
                }
                if let Some(c) = self.conns.get_mut(&peer_id) {
                    c.remove(&connection_id);
                    if c.is_empty() {
                        self.conns.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    self.limits.disconnected(&peer_id);
                    self.reconnect(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
                ..
            } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
                let connected = peer_id.is_some_and(|p| self.swarm.is_connected(&p));
                let result = if connected {
                    Ok(())
                } else {
                    Err(error.to_string())
                };
                self.dial_done(connection_id, result);
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        if let Some(m) = &self.metrics {
            match &event {
                BehaviourEvent::Gossipsub(e) => m.record(e),
                BehaviourEvent::Kad(e) => m.record(e),
                BehaviourEvent::Identify(e) => m.record(e),
                BehaviourEvent::Ping(e) => m.record(e),
                _ => {}
            }
        }
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                message_id,
            }) => {
                let now = std::time::Instant::now();
                match self.limits.gossip(propagation_source, now) {
                    GossipAdmit::Pass => {}
                    admit => {
                        let g = &mut self.swarm.behaviour_mut().gossipsub;
                        g.report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                        if admit == GossipAdmit::Penalise {
                            g.set_application_score(&propagation_source, PeerLimits::PENALTY_SCORE);
                            tracing::info!(peer = %propagation_source, "a peer sent gossip faster than allowed; ignoring it for a while");
                        }
                        return;
                    }
                }
                let (id, data) = self.open(&message);
                let opened = !data.is_empty();
                let handed = self.emit(NetEvent::Gossip {
                    id,
                    source: propagation_source,
                    data,
                    arrived: now,
                });
                // Remembered only for a verdict that will come.
                if opened && handed {
                    self.remember_frame(id, message_id, now);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }) => {
                if self.topic_peers.len() < MAX_TOPIC_PEERS
                    || self.topic_peers.contains_key(&peer_id)
                {
                    self.topic_peers.entry(peer_id).or_default();
                }
                self.flush(&topic)
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(is_dialable)
                    .take(MAX_ADDRS_PER_PEER)
                    .collect();
                let serves_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                self.reach.identified(peer_id, serves_relay, &addrs);
                if let Some(known) = self.topic_peers.get_mut(&peer_id) {
                    known.clone_from(&addrs);
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    // One of the first few DHT servers seen: what was announced or looked
                    // up before it (while nobody served the DHT) is done again.
                    if self.dht_servers.len() < FEW_DHT_SERVERS && self.dht_servers.insert(peer_id)
                    {
                        self.refresh_rendezvous();
                    }
                    for a in &addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, a.clone());
                    }
                }
                if !addrs.is_empty() {
                    self.emit(NetEvent::PeerIdentified {
                        peer: peer_id,
                        addrs,
                    });
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                // A dead path (the NAT mapping or the peer's address went away) shows as
                // failed pings long before TCP gives up. Every connection to the peer is
                // closed, not just this one: gossipsub tells a peer our subscriptions only on
                // a first connection, so a peer that moved and dialled us anew would
                // otherwise never learn them. The redial then starts from scratch.
                tracing::debug!(%peer, %connection, error = %e, "ping failed; reconnecting");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: direct connection"),
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; staying on the relay")
                }
            },
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    tracing::debug!(relay = %relay_peer_id, "relay reservation accepted");
                }
            }
            BehaviourEvent::RelayClient(_) => {}
            BehaviourEvent::Relay(ev) => tracing::debug!(?ev, "relay service"),
            BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => match result {
                Ok(()) => tracing::debug!(addr = %tested_addr, %server, "address dialled back"),
                Err(e) => {
                    tracing::debug!(addr = %tested_addr, %server, error = %e, "address not dialled back");
                    self.reach.probe_failed();
                }
            },
            BehaviourEvent::AutonatServer(_) => {}
            BehaviourEvent::Upnp(upnp::Event::NewExternalAddr { external_addr, .. }) => {
                tracing::info!(addr = %external_addr, "router mapped a port (UPnP)");
            }
            BehaviourEvent::Upnp(upnp::Event::GatewayNotFound) => {
                tracing::info!("no UPnP router found");
            }
            BehaviourEvent::Upnp(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            BehaviourEvent::Mdns(_) => {}
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            }) => {
                let me = *self.swarm.local_peer_id();
                if let Some(reply) = self.provider_queries.remove(&id) {
                    let mut found: Vec<PeerId> =
                        providers.iter().copied().filter(|p| *p != me).collect();
                    found.sort();
                    let _ = reply.send(found);
                }
                let new: Vec<PeerId> = providers
                    .into_iter()
                    .filter(|p| *p != me && !self.swarm.is_connected(p))
                    .take(MAX_DIALS_PER_LOOKUP)
                    .collect();
                for p in new {
                    tracing::debug!(peer = %p, "dialling group member found in the DHT");
                    let _ = self.swarm.dial(p);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(_),
                ..
            }) => {
                // Finished (or failed) without finding anyone.
                if let Some(reply) = self.provider_queries.remove(&id) {
                    let _ = reply.send(Vec::new());
                }
            }
            BehaviourEvent::Kad(_) => {}
            BehaviourEvent::Join(ev) => self.on_join_event(ev),
            BehaviourEvent::Sync(ev) => self.on_sync_event(ev),
            BehaviourEvent::File(ev) => {
                if let Some((peer, request, token)) = self.file.on_event(ev, &mut self.next_token) {
                    self.emit(NetEvent::InboundFile {
                        peer,
                        request,
                        token,
                    });
                }
            }
            BehaviourEvent::Block(never) => match never {},
        }
    }

    /// Records a new connection. Once a direct one to the same peer exists, the relayed ones
    /// are closed after [`RELAY_GRACE`] (requests already under way on them, a join or a
    /// sync page, finish first), so group traffic takes the direct path and the relay
    /// carries nothing more.
    fn track_connection(&mut self, peer: PeerId, id: ConnectionId, relayed: bool) {
        let conns = self.conns.entry(peer).or_default();
        conns.insert(id, relayed);
        if conns.values().any(|r| !r) {
            let at = std::time::Instant::now() + RELAY_GRACE;
            for (c, r) in conns.iter() {
                if *r && !self.closing.iter().any(|(_, p, x)| p == &peer && x == c) {
                    tracing::debug!(%peer, "direct connection up; the relayed one closes soon");
                    self.closing.push((at, peer, *c));
                }
            }
        }
    }

    /// Restores the score of peers whose penalty ended, and counts the graylisted ones.
    /// Opens a gossip frame with its topic's key. Returns the envelope's id and bytes, or,
    /// if it does not open, the frame's own id and no bytes: nothing, which the engine
    /// rejects as undecodable like any other garbage (and gossipsub then penalises the
    /// peer that forwarded it).
    fn open(&self, message: &gossipsub::Message) -> (MessageId, Vec<u8>) {
        let opened = match self.seals.get(&message.topic) {
            Some(key) => seal::open_envelope(key, &self.network, &message.data),
            None => Err(seal::OpenError::Tag),
        };
        match opened {
            Ok(envelope) => (MessageId::of(&envelope), envelope),
            Err(e) => {
                tracing::debug!(error = %e, "a gossip frame did not open");
                // The frame's own id, which is its gossipsub id (SHA-256 of the data).
                (MessageId::of(&message.data), Vec::new())
            }
        }
    }

    /// Remembers that the envelope `id` came in the frame `frame`, for its verdict. At most
    /// [`MAX_PENDING_FRAMES`]: when full, the oldest is forgotten (its verdict then goes to
    /// gossipsub under the envelope's id, which it does not know, and the frame is dropped
    /// from its cache unforwarded; history sync still brings it to those who miss it).
    fn remember_frame(
        &mut self,
        id: MessageId,
        frame: gossipsub::MessageId,
        now: std::time::Instant,
    ) {
        self.forget_frames(now);
        while self.frames.len() >= MAX_PENDING_FRAMES
            || self.frame_order.len() >= 2 * MAX_PENDING_FRAMES
        {
            let Some((at, old)) = self.frame_order.pop_front() else {
                break;
            };
            if self.frames.get(&old).is_some_and(|(_, t)| *t == at) {
                self.frames.remove(&old);
            }
        }
        self.frames.insert(id, (frame, now));
        self.frame_order.push_back((now, id));
    }

    /// Drops the frame ids of envelopes whose verdict is overdue (gossipsub has forgotten
    /// those messages already), and the order entries of those already reported.
    fn forget_frames(&mut self, now: std::time::Instant) {
        while let Some((at, id)) = self.frame_order.front().copied() {
            let current = self.frames.get(&id).is_some_and(|(_, t)| *t == at);
            if current && now.duration_since(at) < FRAME_ID_TTL {
                break;
            }
            if current {
                self.frames.remove(&id);
            }
            self.frame_order.pop_front();
        }
    }

    fn tend_scores(&mut self) {
        let g = &mut self.swarm.behaviour_mut().gossipsub;
        for peer in self.limits.forgive(std::time::Instant::now()) {
            g.set_application_score(&peer, 0.0);
        }
        let now: HashSet<PeerId> = g
            .all_peers()
            .filter(|(p, _)| {
                g.peer_score(p)
                    .is_some_and(|s| s < limits::GRAYLIST_THRESHOLD)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in now.difference(&self.graylisted) {
            let score = g.peer_score(p).unwrap_or_default();
            tracing::info!(peer = %p, score, "graylisted a peer: nothing it sends is read");
        }
        for p in self.graylisted.difference(&now) {
            tracing::info!(peer = %p, "a peer is no longer graylisted");
        }
        self.peer_faults.set_graylisted(now.len());
        self.graylisted = now;
    }

    /// Closes the relayed connections whose grace ran out.
    fn close_superseded(&mut self) {
        let now = std::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.closing.drain(..).partition(|(t, ..)| *t <= now);
        self.closing = later;
        for (_, peer, c) in due {
            if self.conns.get(&peer).is_some_and(|m| m.contains_key(&c)) {
                tracing::debug!(%peer, "closing the relayed connection: a direct one carries on");
                self.swarm.close_connection(c);
            }
        }
    }

    /// Dials a group peer again after its last connection closed (unless it is blocked).
    fn reconnect(&mut self, peer: PeerId) {
        let Some(addrs) = self.topic_peers.get(&peer) else {
            return;
        };
        if self.swarm.behaviour().block.blocked_peers().contains(&peer)
            || self.redial.len() >= MAX_BLOCKED_PEERS
        {
            return;
        }
        let addrs = addrs.clone();
        self.redial.insert(peer, (RECONNECT_ATTEMPTS, addrs));
    }

    /// Our own addresses changed (`gone` disappeared): the machine moved to another
    /// network, or lost one. Confirmed addresses are stale, so is every connection that is
    /// not on loopback; group peers are dialled again and relays asked afresh.
    fn network_changed(&mut self, gone: &Multiaddr) {
        use kith_protocol::addr::AddrScope;
        if matches!(
            AddrScope::of(gone),
            AddrScope::Loopback | AddrScope::Unusable
        ) {
            return;
        }
        tracing::info!(address = %gone, "this node's address went away; reconnecting");
        let externals: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        for a in externals {
            self.swarm.remove_external_address(&a);
        }
        if self.reach.network_changed() {
            self.reachability_changed();
        }
        self.refresh_every = RENDEZVOUS_REFRESH;
        self.next_refresh = std::time::Instant::now() + RENDEZVOUS_REFRESH;
        let peers: Vec<PeerId> = self.conns.keys().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Direct reachability changed: the DHT mode follows, and relay reservations are
    /// dropped (now direct) or sought (no longer direct).
    fn reachability_changed(&mut self) {
        let direct = self.reach.is_direct();
        let mode = if direct {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        };
        tracing::info!(?mode, "reachability changed; DHT mode follows");
        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        if direct {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
            self.refresh_rendezvous();
        }
        self.tend_relays();
    }

    /// Announces the provided keys again and looks their providers up (dialling the ones
    /// found): the DHT just became usable (this node or its first routing peer started
    /// serving it), and what was announced or looked up before reached nobody. At most
    /// once per [`RENDEZVOUS_REFRESH`]; a refresh asked for sooner runs on a later tick.
    fn refresh_rendezvous(&mut self) {
        let now = std::time::Instant::now();
        if self
            .last_refresh
            .is_some_and(|t| now.duration_since(t) < RENDEZVOUS_REFRESH)
        {
            self.refresh_pending = true;
            return;
        }
        self.refresh_pending = false;
        self.last_refresh = Some(now);
        tracing::debug!(
            keys = self.provided.len(),
            "announcing and looking up again in the DHT"
        );
        for key in self.provided.clone() {
            let kad = &mut self.swarm.behaviour_mut().kad;
            let key = kad::RecordKey::new(&key);
            let _ = kad.start_providing(key.clone());
            kad.get_providers(key);
        }
    }

    /// Keeps the wanted relay reservations: closes them once directly reachable, asks new
    /// relays (members of our groups first) for the ones missing.
    fn tend_relays(&mut self) {
        for id in self.reach.surplus() {
            self.swarm.remove_listener(id);
            self.reach.closed(id, std::time::Instant::now());
        }
        let members: HashSet<PeerId> = self.topic_peers.keys().copied().collect();
        for (relay, addr) in self.reach.plan(std::time::Instant::now(), &members) {
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    tracing::debug!(%relay, %addr, "asking a relay for a reservation");
                    self.reach.listening(id, relay);
                }
                Err(e) => {
                    tracing::debug!(%relay, error = %e, "cannot listen through relay");
                    self.reach.failed(relay, std::time::Instant::now());
                }
            }
        }
    }

    fn on_join_event(&mut self, event: request_response::Event<JoinRequest, JoinResponse>) {
        if let Some((peer, request, token)) = self.join.on_event(event, &mut self.next_token) {
            if !self.limits.join(peer, std::time::Instant::now()) {
                tracing::debug!(%peer, "join requests too fast; answering busy");
                if let Some(ch) = self.join.take_inbound(token) {
                    let busy = JoinResponse::Rejected(kith_protocol::envelope::JoinRejection::Busy);
                    let _ = self.swarm.behaviour_mut().join.send_response(ch, busy);
                }
                return;
            }
            self.emit(NetEvent::InboundJoin {
                peer,
                request,
                token,
            });
        }
    }

    fn on_sync_event(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        if let Some((peer, request, token)) = self.sync.on_event(event, &mut self.next_token) {
            self.emit(NetEvent::InboundSync {
                peer,
                request,
                token,
            });
        }
    }
}

/// The last 8 characters of a PeerId, as the CLI shows it.
pub(crate) fn short_peer(peer: &PeerId) -> String {
    let text = peer.to_string();
    text[text.len().saturating_sub(8)..].to_owned()
}
