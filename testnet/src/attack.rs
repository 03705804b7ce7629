//! Hostile peers for `kith-testnet bench --attack KIND[:ARG]`: one libp2p swarm per
//! attacker, in this process, that is not a Kith node and does what a stranger on the
//! network could do.
//!
//! Every attacker dials every node of the testnet and, like any gossipsub peer, learns
//! the group topics (`kith/g2/…`) from the nodes' subscription announcements and subscribes
//! to them. Then:
//!
//! - `snoop`: only listens, counting the frames and bytes a non-member receives.
//! - `flood:RATE`: publishes RATE messages a second that look as valid as it can make them:
//!   copies of frames it captured on the topic with two bytes near the end changed (a
//!   frame has the size and form of a real one, but without the group's key the attacker
//!   cannot make one that opens, see `kith_protocol::seal`). Until it captured one it sends
//!   nothing.
//! - `garbage:RATE`: publishes RATE random byte strings a second (not even an envelope).
//! - `replay:RATE`: publishes RATE captured frames a second again, unchanged, the
//!   oldest first, each at least [`REPLAY_AGE`] after it was captured (after gossipsub's
//!   duplicate cache forgot it).
//! - `oversize:SECS`: every SECS seconds publishes one message larger than a node accepts
//!   (300 KiB), then a small one.
//! - `joinspam:RATE`: sends RATE join requests a second (`/kith/join/1.0.0`), to the nodes
//!   in turn, with an invite link whose uses are all taken (the testnet's own, see
//!   [`crate::launcher::Testnet::used_link`]) and a made-up key package, and counts the
//!   answers.
//!
//! The attacker's swarm gossips like an ordinary peer (it forwards what it receives);
//! gossipsub scoring, graylisting and the per-peer limits of the nodes are what is
//! measured against it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use kith_protocol::codec;
use kith_protocol::envelope::{JoinRequest, JoinRequestV1, JoinResponse};
use kith_protocol::invite::Invite;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, noise, ping, request_response,
    tcp, yamux,
};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::{Result, TestnetError};

/// How old a captured frame must be before `replay` sends it again (gossipsub's
/// duplicate cache keeps message ids for 60 s by default).
pub const REPLAY_AGE: Duration = Duration::from_secs(65);
/// Frames kept for tampering and replaying.
const CAPTURE_LIMIT: usize = 4096;
/// The size of an oversized message: above the node's 256 KiB + 1 KiB.
const OVERSIZE_BYTES: usize = 300 * 1024;
/// Kith's join protocol.
const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/join/1.0.0");
/// How long a join request may wait for its answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The identify protocol version of Kith nodes (so the attacker looks like one).
const IDENTIFY_PROTOCOL: &str = "/kith/id/1.0.0";

/// What an attacker does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AttackKind {
    /// Subscribes to every group topic and listens.
    Snoop,
    /// Tampered copies of captured frames, `rate` per second.
    Flood {
        /// Messages per second.
        rate: f64,
    },
    /// Random bytes, `rate` per second.
    Garbage {
        /// Messages per second.
        rate: f64,
    },
    /// Captured frames again, `rate` per second.
    Replay {
        /// Messages per second.
        rate: f64,
    },
    /// One message over the size limit every `every_secs` seconds.
    Oversize {
        /// Seconds between oversized messages.
        every_secs: f64,
    },
    /// Join requests with a used-up link, `rate` per second.
    JoinSpam {
        /// Requests per second.
        rate: f64,
    },
}

impl AttackKind {
    /// Parses `snoop`, `flood:RATE`, `garbage:RATE`, `replay:RATE`, `oversize:SECS` or
    /// `joinspam:RATE`.
    pub fn parse(s: &str) -> std::result::Result<AttackKind, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> std::result::Result<f64, String> {
            let v = match arg {
                Some(a) => a
                    .parse::<f64>()
                    .map_err(|_| format!("`{a}` is not a number"))?,
                None => default,
            };
            if v.is_finite() && v > 0.0 && v <= 100_000.0 {
                Ok(v)
            } else {
                Err(format!("{v} is out of range (0 to 100000)"))
            }
        };
        match name {
            "snoop" if arg.is_none() => Ok(AttackKind::Snoop),
            "flood" => Ok(AttackKind::Flood { rate: num(50.0)? }),
            "garbage" => Ok(AttackKind::Garbage { rate: num(50.0)? }),
            "replay" => Ok(AttackKind::Replay { rate: num(20.0)? }),
            "oversize" => Ok(AttackKind::Oversize {
                every_secs: num(5.0)?,
            }),
            "joinspam" => Ok(AttackKind::JoinSpam { rate: num(20.0)? }),
            _ => Err(format!(
                "unknown attack `{s}` (snoop, flood:RATE, garbage:RATE, replay:RATE, oversize:SECS, joinspam:RATE)"
            )),
        }
    }

    /// The seconds between two sends, if it sends.
    fn interval(self) -> Option<Duration> {
        match self {
            AttackKind::Snoop => None,
            AttackKind::Flood { rate }
            | AttackKind::Garbage { rate }
            | AttackKind::Replay { rate }
            | AttackKind::JoinSpam { rate } => Some(Duration::from_secs_f64(1.0 / rate)),
            AttackKind::Oversize { every_secs } => Some(Duration::from_secs_f64(every_secs)),
        }
    }
}

/// What an attacker did and saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackStats {
    /// Its peer id.
    pub peer: String,
    /// Group topics it subscribed to.
    pub topics: usize,
    /// Messages it published (accepted by its own gossipsub for sending).
    pub published: u64,
    /// Publishes its gossipsub refused (no peer would take them).
    pub publish_refused: u64,
    /// Gossip messages it received on the group topics (as a non-member).
    pub received: u64,
    /// Their bytes.
    pub received_bytes: u64,
    /// Connections to nodes that closed (by either side).
    pub connections_closed: u64,
    /// Dials it made again after a node closed.
    pub redials: u64,
    /// Join requests it sent (`joinspam`).
    pub join_requests: u64,
    /// The answers to them, by kind (`Rejected(UsedUp)`, `Rejected(Busy)`, …).
    pub join_answers: BTreeMap<String, u64>,
    /// Join requests that got no answer (the stream was refused, reset or timed out).
    pub join_failures: u64,
}

#[derive(NetworkBehaviour)]
struct Hostile {
    gossipsub: gossipsub::Behaviour,
    ping: ping::Behaviour,
    identify: identify::Behaviour,
    join: request_response::Behaviour<RawFrames>,
}

/// Kith's request-response framing (a 4-byte big-endian length, then the bytes) around
/// bytes the attacker makes and reads itself.
#[derive(Debug, Clone, Copy, Default)]
struct RawFrames;

/// The largest answer read (a join response's limit).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_ANSWER_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
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

impl request_response::Codec for RawFrames {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// A join request with `invite`'s secret and a made-up key package of 200 to 400
/// random bytes (a node never gets as far as reading it: the link is used up).
fn join_request(invite: &Invite, rng: &mut impl Rng) -> Result<Vec<u8>> {
    let key_package: Vec<u8> = (0..rng.gen_range(200..400)).map(|_| rng.r#gen()).collect();
    let request = JoinRequest::V1(JoinRequestV1 {
        network: invite.network.clone(),
        group: invite.group,
        secret: invite.secret,
        key_package,
    });
    codec::encode(&request).map_err(|e| TestnetError::Invalid(format!("attacker: {e}")))
}

fn swarm() -> Result<Swarm<Hostile>> {
    let err = |e: String| TestnetError::Invalid(format!("attacker: {e}"));
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        // Kith's message id (SHA-256 of the data): with another one its IHAVE ids would
        // not match what it delivers, and the nodes' scores would punish it as a peer that
        // breaks its promises before any attack is measured.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::new(&<sha2::Sha256 as sha2::Digest>::digest(&m.data))
        })
        .max_transmit_size(1 << 20)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
        .map_err(|e| err(e.to_owned()))?;
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(e.to_string()))?
        .with_behaviour(|key| Hostile {
            gossipsub,
            ping: ping::Behaviour::default(),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_owned(),
                key.public(),
            )),
            join: request_response::Behaviour::with_codec(
                RawFrames,
                [(JOIN_PROTOCOL, request_response::ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(JOIN_TIMEOUT),
            ),
        })
        .map_err(|e| err(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

/// Runs one attacker against `targets` until `stop` turns true; returns what it did.
/// `used_link` is the invite link `joinspam` sends (required for it, unused otherwise).
pub async fn run(
    kind: AttackKind,
    targets: Vec<Multiaddr>,
    seed: u64,
    used_link: Option<&str>,
    mut stop: watch::Receiver<bool>,
) -> Result<AttackStats> {
    let invite = match (kind, used_link) {
        (AttackKind::JoinSpam { .. }, Some(link)) => Some(
            Invite::parse(link)
                .map_err(|e| TestnetError::Invalid(format!("attacker: the used-up link: {e}")))?,
        ),
        (AttackKind::JoinSpam { .. }, None) => {
            return Err(TestnetError::Invalid(
                "attacker: joinspam needs the testnet's used-up invite link (a testnet the bench starts)".to_owned(),
            ));
        }
        _ => None,
    };
    let mut connected: Vec<PeerId> = Vec::new();
    let mut next_target = 0usize;
    let mut swarm = swarm()?;
    let mut stats = AttackStats {
        peer: swarm.local_peer_id().to_string(),
        ..AttackStats::default()
    };
    let mut by_peer: Vec<(PeerId, Multiaddr)> = Vec::new();
    for t in &targets {
        if let Some(libp2p::multiaddr::Protocol::P2p(p)) = t.iter().last() {
            by_peer.push((p, t.clone()));
        }
        swarm
            .dial(t.clone())
            .map_err(|e| TestnetError::Invalid(format!("attacker: dial {t}: {e}")))?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut topics: HashSet<gossipsub::TopicHash> = HashSet::new();
    let mut captured: VecDeque<(Instant, gossipsub::TopicHash, Vec<u8>)> = VecDeque::new();
    let mut sent_oversize_last = false;
    let mut tick = kind.interval().map(|d| {
        let mut t = tokio::time::interval(d);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let next_tick = async {
            match tick.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() {
                    break;
                }
            }
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
                    topic,
                    ..
                })) if topic.as_str().starts_with("kith/g2/") && !topics.contains(&topic) => {
                    let _ = swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&gossipsub::IdentTopic::new(topic.as_str()));
                    topics.insert(topic);
                    stats.topics = topics.len();
                }
                SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Message {
                    message,
                    ..
                })) => {
                    stats.received += 1;
                    stats.received_bytes += message.data.len() as u64;
                    if captured.len() >= CAPTURE_LIMIT {
                        captured.pop_front();
                    }
                    captured.push_back((Instant::now(), message.topic, message.data));
                }
                SwarmEvent::ConnectionEstablished { peer_id, .. } if !connected.contains(&peer_id) => {
                    connected.push(peer_id);
                }
                SwarmEvent::Behaviour(HostileEvent::Join(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                })) => {
                    let answer = match JoinResponse::decode(&response) {
                        Ok(JoinResponse::Rejected(why)) => format!("Rejected({why:?})"),
                        Ok(JoinResponse::Accepted { .. } | JoinResponse::Admitted { .. }) => {
                            "Accepted".to_owned()
                        }
                        Ok(JoinResponse::AwaitingApproval { .. }) => "AwaitingApproval".to_owned(),
                        Err(_) => "undecodable".to_owned(),
                    };
                    *stats.join_answers.entry(answer).or_insert(0) += 1;
                }
                SwarmEvent::Behaviour(HostileEvent::Join(
                    request_response::Event::OutboundFailure { .. },
                )) => stats.join_failures += 1,
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    connected.retain(|p| *p != peer_id);
                    stats.connections_closed += 1;
                    if let Some((_, addr)) = by_peer.iter().find(|(p, _)| *p == peer_id) {
                        stats.redials += 1;
                        let _ = swarm.dial(addr.clone());
                    }
                }
                _ => {}
            },
            _ = next_tick => {
                if let Some(invite) = &invite {
                    if connected.is_empty() {
                        continue;
                    }
                    let peer = connected[next_target % connected.len()];
                    next_target += 1;
                    let request = join_request(invite, &mut rng)?;
                    swarm.behaviour_mut().join.send_request(&peer, request);
                    stats.join_requests += 1;
                    continue;
                }
                let Some(topic) = topics.iter().next().cloned() else {
                    continue;
                };
                let data = match kind {
                    AttackKind::Snoop | AttackKind::JoinSpam { .. } => continue,
                    AttackKind::Garbage { .. } => {
                        let len = rng.gen_range(16..1024);
                        (0..len).map(|_| rng.r#gen::<u8>()).collect()
                    }
                    AttackKind::Flood { .. } => {
                        let Some((_, _, real)) = captured.get(rng.gen_range(0..captured.len().max(1))) else {
                            continue;
                        };
                        tamper(real, &mut rng)
                    }
                    AttackKind::Replay { .. } => {
                        match captured.front() {
                            Some((at, _, _)) if at.elapsed() >= REPLAY_AGE => {}
                            _ => continue,
                        }
                        match captured.pop_front() {
                            Some((_, _, data)) => data,
                            None => continue,
                        }
                    }
                    AttackKind::Oversize { .. } => {
                        // Alternate: the oversized frame, then (next tick at once) a small one.
                        sent_oversize_last = !sent_oversize_last;
                        if sent_oversize_last {
                            vec![0xAB; OVERSIZE_BYTES]
                        } else {
                            b"small after oversized".to_vec()
                        }
                    }
                };
                match swarm.behaviour_mut().gossipsub.publish(topic, data) {
                    Ok(_) => stats.published += 1,
                    Err(_) => stats.publish_refused += 1,
                }
            }
        }
    }
    Ok(stats)
}

/// `real` with two bytes near its end (inside the ciphertext or its tag) changed, and a
/// distinct message id each time (the change is random).
fn tamper(real: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut v = real.to_vec();
    if v.len() > 32 {
        let at = v.len() - 1 - rng.gen_range(0..16);
        v[at] ^= rng.gen_range(1..=255u8);
        let at = v.len() - 17 - rng.gen_range(0..8);
        v[at] ^= rng.gen_range(1..=255u8);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse_with_their_arguments() {
        assert_eq!(AttackKind::parse("snoop"), Ok(AttackKind::Snoop));
        assert_eq!(
            AttackKind::parse("flood:25"),
            Ok(AttackKind::Flood { rate: 25.0 })
        );
        assert_eq!(
            AttackKind::parse("oversize"),
            Ok(AttackKind::Oversize { every_secs: 5.0 })
        );
        assert_eq!(
            AttackKind::parse("joinspam:3"),
            Ok(AttackKind::JoinSpam { rate: 3.0 })
        );
        assert!(AttackKind::parse("flood:0").is_err());
        assert!(AttackKind::parse("flood:x").is_err());
        assert!(AttackKind::parse("snoop:3").is_err());
        assert!(AttackKind::parse("nuke").is_err());
    }

    #[test]
    fn a_tampered_copy_differs_only_near_its_end() {
        let real: Vec<u8> = (0..200u8).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t = tamper(&real, &mut rng);
        assert_eq!(t.len(), real.len());
        assert_eq!(t[..150], real[..150]);
        assert_ne!(t, real);
    }
}
