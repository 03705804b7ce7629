//! Why a listen address could not be bound, as a reason a user can act on.
//!
//! libp2p's `TransportError::Other` prints nothing itself and its composed transports hide
//! the OS error behind wrappers, so `listen_on` errors are classified here: the OS error
//! kind is searched in the error's sources and, where the wrappers hide it, found again by
//! binding the same address once with the standard library.

use std::error::Error;
use std::io;
use std::net::{IpAddr, SocketAddr};

use libp2p::Multiaddr;
use libp2p::TransportError;
use libp2p::multiaddr::Protocol;

/// Why a listen address could not be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenFailure {
    /// Another socket holds the port.
    InUse,
    /// The OS refused (e.g. a port below 1024 without privileges).
    NotPermitted,
    /// The IP address is not one of this machine's.
    NotAvailable,
    /// The multiaddr is not one the node can listen on.
    Unsupported,
    /// Anything else, with the OS's words.
    Other(String),
}

impl std::fmt::Display for ListenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenFailure::InUse => f.write_str(
                "address in use (is another kith node running? choose another port with --listen)",
            ),
            ListenFailure::NotPermitted => f.write_str(
                "permission denied (ports below 1024 need privileges; choose another port with --listen)",
            ),
            ListenFailure::NotAvailable => f.write_str(
                "this machine has no such IP address (check the address given to --listen)",
            ),
            ListenFailure::Unsupported => f.write_str(
                "not an address a node can listen on (use /ip4/IP/tcp/PORT or /ip4/IP/udp/PORT/quic-v1)",
            ),
            ListenFailure::Other(text) => write!(f, "{text}"),
        }
    }
}

impl ListenFailure {
    /// Classifies the error of `listen_on(addr)`.
    pub fn of(addr: &Multiaddr, err: &TransportError<io::Error>) -> ListenFailure {
        let err = match err {
            TransportError::MultiaddrNotSupported(_) => return ListenFailure::Unsupported,
            TransportError::Other(err) => err,
        };
        if let Some(kind) = os_kind(err) {
            return Self::from_kind(kind, err);
        }
        // The OS error is hidden behind a wrapper: ask the OS again.
        match probe(addr) {
            Some(Err(e)) => Self::from_kind(e.kind(), &e),
            _ => ListenFailure::Other(one_line(err)),
        }
    }

    fn from_kind(kind: io::ErrorKind, err: &io::Error) -> ListenFailure {
        match kind {
            io::ErrorKind::AddrInUse => ListenFailure::InUse,
            io::ErrorKind::PermissionDenied => ListenFailure::NotPermitted,
            io::ErrorKind::AddrNotAvailable => ListenFailure::NotAvailable,
            _ => ListenFailure::Other(one_line(err)),
        }
    }
}

/// The first OS error kind (not `Other`) among `err` and its sources.
fn os_kind(err: &io::Error) -> Option<io::ErrorKind> {
    let mut current: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() != io::ErrorKind::Other {
                return Some(io.kind());
            }
            if let Some(inner) = io.get_ref() {
                current = Some(inner);
                continue;
            }
        }
        current = e.source();
    }
    None
}

/// Binds `addr`'s IP and port once with the standard library (TCP for `/tcp/`, UDP for
/// `/udp/`); `None` if the address has no IP and port. The socket is closed at once.
fn probe(addr: &Multiaddr) -> Option<io::Result<()>> {
    let mut ip: Option<IpAddr> = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(a.into()),
            Protocol::Ip6(a) => ip = Some(a.into()),
            Protocol::Tcp(port) => {
                let sa = SocketAddr::new(ip?, port);
                return Some(std::net::TcpListener::bind(sa).map(drop));
            }
            Protocol::Udp(port) => {
                let sa = SocketAddr::new(ip?, port);
                return Some(std::net::UdpSocket::bind(sa).map(drop));
            }
            _ => {}
        }
    }
    None
}

/// The error's text with its sources, on one line, without repeating a source whose text
/// the line already carries.
fn one_line(err: &io::Error) -> String {
    let mut line = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        current = e.source();
    }
    if line.is_empty() {
        line = format!("{:?}", err.kind());
    }
    line.replace('\n', " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_os_error_is_found() {
        let inner = io::Error::from(io::ErrorKind::AddrInUse);
        let wrapped = io::Error::other(inner);
        let err = TransportError::Other(wrapped);
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        assert_eq!(ListenFailure::of(&addr, &err), ListenFailure::InUse);
        assert!(ListenFailure::InUse.to_string().contains("--listen"));
    }

    #[test]
    fn a_hidden_os_error_is_found_by_binding_again() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        // A wrapper whose sources do not lead to the OS error.
        #[derive(Debug)]
        struct Opaque;
        impl std::fmt::Display for Opaque {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("opaque")
            }
        }
        impl Error for Opaque {}
        let err = TransportError::Other(io::Error::other(Opaque));
        assert_eq!(ListenFailure::of(&addr, &err), ListenFailure::InUse);
        drop(held);
    }
}
