//! Closes a connection whose gossip stream this node gave up on, so the peer notices.
//!
//! A peer's gossipsub messages arrive on one long-lived stream it opened. When a frame on
//! it is larger than `max_transmit_size` or does not decode, libp2p-gossipsub 0.50 closes
//! its side of that stream and drops it (its handler, `Failed to read from inbound stream`).
//! Over Yamux that is a half-close: the peer's side stays writable, Yamux discards what
//! arrives for a stream it no longer knows and tells nobody, and the peer's gossip handler
//! never reads its outbound stream, so it goes on publishing into nothing until the
//! connection is replaced. Gossipsub also disables itself on a connection after five
//! inbound streams, so re-opening is no cure either.
//!
//! [`Guarded`] wraps the stream multiplexer of every connection (TCP, QUIC and relayed).
//! Each stream the remote opens is watched through the multistream-select answer this node
//! writes on it: once it accepted a gossipsub protocol (`/meshsub/…`, `/floodsub/…`), a
//! close of the stream before the peer ended it can only be gossipsub giving up on it (on
//! an end from the peer gossipsub closes after reading the end). The multiplexer then
//! fails with [`GossipStreamBroken`], libp2p closes the connection, the peer sees it
//! closed and starts over with a fresh connection and fresh streams, and the network task
//! counts it (`kith_peer_faults_total{fault="gossip_stream_broken"}`). Every other stream
//! passes through untouched.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::future::{MapOk, TryFutureExt};
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::UpgradeInfo;
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};

/// The protocol name prefixes of gossipsub's streams.
const GOSSIP_PROTOCOLS: [&[u8]; 2] = [b"/meshsub/", b"/floodsub/"];
/// multistream-select's header message.
const MULTISTREAM_HEADER: &[u8] = b"/multistream/1.0.0\n";
/// Most bytes of this node's first writes on an inbound stream looked at for the accepted
/// protocol (the header, a few "na" answers and one protocol name fit well within it).
const SNIFF_LIMIT: usize = 512;

/// The error a guarded connection closes with when this node gave up on the peer's gossip
/// stream (an oversized or undecodable frame).
#[derive(Debug, thiserror::Error)]
#[error("the peer's gossip stream broke (an oversized or undecodable frame)")]
pub struct GossipStreamBroken;

/// Whether `error` (a connection's close cause) is, or wraps, [`GossipStreamBroken`].
pub fn is_gossip_stream_broken(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<GossipStreamBroken>() {
            return true;
        }
        // An io::Error's `source()` skips the error it wraps; step into that one instead.
        next = match e.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// A multiplexer upgrade (Yamux) whose connections are guarded.
#[derive(Debug, Clone)]
pub struct Guarded<U>(pub U);

impl<U: UpgradeInfo> UpgradeInfo for Guarded<U> {
    type Info = U::Info;
    type InfoIter = U::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.protocol_info()
    }
}

impl<C, U> InboundConnectionUpgrade<C> for Guarded<U>
where
    U: InboundConnectionUpgrade<C>,
{
    type Output = GuardedMuxer<U::Output>;
    type Error = U::Error;
    type Future = MapOk<U::Future, fn(U::Output) -> GuardedMuxer<U::Output>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0
            .upgrade_inbound(socket, info)
            .map_ok(GuardedMuxer::new as fn(_) -> _)
    }
}

impl<C, U> OutboundConnectionUpgrade<C> for Guarded<U>
where
    U: OutboundConnectionUpgrade<C>,
{
    type Output = GuardedMuxer<U::Output>;
    type Error = U::Error;
    type Future = MapOk<U::Future, fn(U::Output) -> GuardedMuxer<U::Output>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0
            .upgrade_outbound(socket, info)
            .map_ok(GuardedMuxer::new as fn(_) -> _)
    }
}

/// What the streams of one connection tell the connection.
#[derive(Debug, Default)]
struct Shared {
    broken: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Shared {
    fn break_connection(&self) {
        self.broken.store(true, Ordering::Release);
        let waker = self.waker.lock().map(|mut w| w.take()).unwrap_or_default();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A stream multiplexer whose inbound gossip streams are watched.
#[derive(Debug)]
pub struct GuardedMuxer<M> {
    inner: M,
    shared: Arc<Shared>,
}

impl<M> GuardedMuxer<M> {
    /// Guards `inner`.
    pub fn new(inner: M) -> Self {
        GuardedMuxer {
            inner,
            shared: Arc::default(),
        }
    }
}

impl<M> StreamMuxer for GuardedMuxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
    M::Error: Send + Sync + 'static,
{
    type Substream = GuardedStream<M::Substream>;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let shared = self.shared.clone();
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| GuardedStream::inbound(s, shared))
            .map_err(io::Error::other)
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(GuardedStream::outbound)
            .map_err(io::Error::other)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_close(cx)
            .map_err(io::Error::other)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        if let Ok(mut w) = self.shared.waker.lock() {
            match &*w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        if self.shared.broken.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::other(GossipStreamBroken)));
        }
        Pin::new(&mut self.inner).poll(cx).map_err(io::Error::other)
    }
}

/// What is known of a stream's protocol.
#[derive(Debug)]
enum Watch {
    /// Not a stream to watch (opened by this node, or another protocol).
    No,
    /// Opened by the peer; this node's first writes so far (multistream-select answers).
    Answering(Vec<u8>),
    /// Opened by the peer for gossipsub.
    Gossip,
}

/// A stream of a guarded connection.
#[derive(Debug)]
pub struct GuardedStream<S> {
    inner: S,
    watch: Watch,
    /// The peer ended its side (a read returned 0 bytes).
    peer_ended: bool,
    shared: Option<Arc<Shared>>,
}

impl<S> GuardedStream<S> {
    fn inbound(inner: S, shared: Arc<Shared>) -> Self {
        GuardedStream {
            inner,
            watch: Watch::Answering(Vec::new()),
            peer_ended: false,
            shared: Some(shared),
        }
    }

    fn outbound(inner: S) -> Self {
        GuardedStream {
            inner,
            watch: Watch::No,
            peer_ended: false,
            shared: None,
        }
    }

    /// Looks at `written`, the next bytes this node wrote, while the protocol is unknown.
    fn note_written(&mut self, written: &[u8]) {
        let Watch::Answering(buf) = &mut self.watch else {
            return;
        };
        buf.extend_from_slice(&written[..written.len().min(SNIFF_LIMIT)]);
        self.watch = match accepted(buf) {
            Answer::Gossip => Watch::Gossip,
            Answer::Other => Watch::No,
            Answer::NotYet if buf.len() >= SNIFF_LIMIT => Watch::No,
            Answer::NotYet => return,
        };
    }
}

/// What a listener's multistream-select answers so far say.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// It accepted a gossipsub protocol.
    Gossip,
    /// It accepted another protocol, or the bytes are not multistream-select.
    Other,
    /// No protocol accepted yet.
    NotYet,
}

/// Reads the messages (unsigned-varint length, then that many bytes) in `buf`: the header
/// and "na" answers are skipped, a protocol list ("ls") too, and the first protocol name
/// is the accepted one.
fn accepted(buf: &[u8]) -> Answer {
    let mut rest = buf;
    loop {
        let Some((len, after)) = uvarint(rest) else {
            // An unfinished length prefix waits for more; an overlong one is not ours.
            return if rest.len() < 10 {
                Answer::NotYet
            } else {
                Answer::Other
            };
        };
        let Ok(len) = usize::try_from(len) else {
            return Answer::Other;
        };
        if after.len() < len {
            return Answer::NotYet;
        }
        let (msg, next) = after.split_at(len);
        rest = next;
        if msg == MULTISTREAM_HEADER || msg == b"na\n" || !msg.starts_with(b"/") {
            continue;
        }
        return if GOSSIP_PROTOCOLS.iter().any(|p| msg.starts_with(p)) {
            Answer::Gossip
        } else {
            Answer::Other
        };
    }
}

/// An unsigned LEB128 number at the start of `buf` (at most 9 bytes, as multistream-select
/// allows), and what follows it; `None` if it is unfinished or too long.
fn uvarint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut n: u64 = 0;
    for (i, b) in buf.iter().take(9).enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, &buf[i + 1..]));
        }
    }
    None
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if n == 0 && !buf.is_empty() {
            self.peer_ended = true;
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.note_written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if matches!(self.watch, Watch::Gossip)
            && !self.peer_ended
            && let Some(shared) = self.shared.take()
        {
            shared.break_connection();
        }
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &[u8]) -> Vec<u8> {
        let mut v = vec![u8::try_from(body.len()).unwrap_or(0)];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn the_accepted_protocol_is_read_from_the_answers() {
        let header = msg(MULTISTREAM_HEADER);
        let gossip = [header.clone(), msg(b"/meshsub/1.1.0\n")].concat();
        assert_eq!(accepted(&gossip), Answer::Gossip);
        let after_na = [header.clone(), msg(b"na\n"), msg(b"/floodsub/1.0.0\n")].concat();
        assert_eq!(accepted(&after_na), Answer::Gossip);
        let other = [header.clone(), msg(b"/ipfs/kad/1.0.0\n")].concat();
        assert_eq!(accepted(&other), Answer::Other);
        assert_eq!(accepted(&header), Answer::NotYet);
        assert_eq!(accepted(&gossip[..header.len() + 4]), Answer::NotYet);
        assert_eq!(accepted(&[]), Answer::NotYet);
        assert_eq!(accepted(&[0xff; 12]), Answer::Other);
    }

    /// A stream whose reads and writes are in memory.
    #[derive(Default)]
    struct Mem {
        to_read: Vec<u8>,
        written: Vec<u8>,
    }

    impl AsyncRead for Mem {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.to_read.len());
            buf[..n].copy_from_slice(&self.to_read[..n]);
            self.to_read.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Mem {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `answers` one byte at a time (as a slow socket might take them), then reads
    /// once (or to the end) from `to_read` and closes; whether the connection broke.
    fn run(answers: &[u8], to_read: Vec<u8>, read_to_end: bool) -> bool {
        futures::executor::block_on(async {
            use futures::{AsyncReadExt, AsyncWriteExt};
            let shared = Arc::new(Shared::default());
            let mut s = GuardedStream::inbound(
                Mem {
                    to_read,
                    written: Vec::new(),
                },
                shared.clone(),
            );
            for b in answers {
                s.write_all(&[*b]).await.unwrap_or_default();
            }
            let mut buf = [0u8; 8];
            if read_to_end {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap_or_default();
            } else {
                s.read(&mut buf).await.unwrap_or_default();
            }
            s.close().await.unwrap_or_default();
            shared.broken.load(Ordering::Acquire)
        })
    }

    #[test]
    fn only_a_gossip_stream_closed_before_the_peer_ended_it_breaks_the_connection() {
        let gossip = [msg(MULTISTREAM_HEADER), msg(b"/meshsub/1.2.0\n")].concat();
        let kad = [msg(MULTISTREAM_HEADER), msg(b"/ipfs/kad/1.0.0\n")].concat();
        // Gossipsub gave up after reading part of a frame: broken.
        assert!(run(&gossip, vec![1; 64], false));
        // The peer ended its stream and gossipsub closed after reading the end: fine.
        assert!(!run(&gossip, vec![1; 4], true));
        // Any other protocol closing early: fine.
        assert!(!run(&kad, vec![1; 64], false));
    }

    #[test]
    fn a_broken_stream_wakes_and_fails_its_connection() {
        let shared = Arc::new(Shared::default());
        let woke = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::Release);
            }
        }
        let waker = Waker::from(Arc::new(Flag(woke.clone())));
        if let Ok(mut w) = shared.waker.lock() {
            *w = Some(waker);
        }
        shared.break_connection();
        assert!(woke.load(Ordering::Acquire));
        assert!(shared.broken.load(Ordering::Acquire));
        let closed = io::Error::other(io::Error::other(GossipStreamBroken));
        assert!(is_gossip_stream_broken(&closed));
        assert!(!is_gossip_stream_broken(&io::Error::other("reset")));
    }
}
