//! Who can use an address: the scope of a multiaddr, and the order addresses go into an
//! invite link.
//!
//! An invite link leaves the inviter's machine (it is pasted into another chat, read out,
//! scanned), so the addresses in it must be ones the joiner can dial: a public address, or a
//! circuit through a relay that is public. A LAN address is only useful to someone on the
//! same LAN; it is kept last and recognised as such by its IP range (private, link-local,
//! carrier-grade NAT or unique-local), so no separate mark is carried on the wire.

use std::net::{Ipv4Addr, Ipv6Addr};

use multiaddr::{Multiaddr, Protocol};

/// Who can dial an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrScope {
    /// Anyone: a public IP address or a DNS name.
    Public,
    /// Anyone who can reach the relay: `…/p2p/<relay>/p2p-circuit`.
    Relayed,
    /// Only hosts on the same local network (RFC 1918, link-local, CGNAT, unique-local).
    Lan,
    /// Only this machine.
    Loopback,
    /// Nobody: an unspecified address (`0.0.0.0`, `::`) or no IP at all.
    Unusable,
}

impl AddrScope {
    /// The scope of `addr`. A circuit address is [`AddrScope::Relayed`] whatever the
    /// relay's own address is (the relay was chosen for being reachable).
    pub fn of(addr: &Multiaddr) -> AddrScope {
        if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return AddrScope::Relayed;
        }
        for p in addr.iter() {
            match p {
                Protocol::Ip4(ip) => return scope_v4(ip),
                Protocol::Ip6(ip) => return scope_v6(ip),
                Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => {
                    return AddrScope::Public;
                }
                _ => {}
            }
        }
        AddrScope::Unusable
    }

    /// A short lowercase name for output: `public`, `relayed`, `lan`, `loopback`, `unusable`.
    pub fn name(self) -> &'static str {
        match self {
            AddrScope::Public => "public",
            AddrScope::Relayed => "relayed",
            AddrScope::Lan => "lan",
            AddrScope::Loopback => "loopback",
            AddrScope::Unusable => "unusable",
        }
    }

    /// Whether someone off this machine's LAN can use the address.
    pub fn leaves_lan(self) -> bool {
        matches!(self, AddrScope::Public | AddrScope::Relayed)
    }
}

fn scope_v4(ip: Ipv4Addr) -> AddrScope {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        AddrScope::Unusable
    } else if ip.is_loopback() {
        AddrScope::Loopback
    } else if ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b)) {
        // 100.64.0.0/10 is carrier-grade NAT: behind the provider's NAT, not public.
        AddrScope::Lan
    } else {
        AddrScope::Public
    }
}

fn scope_v6(ip: Ipv6Addr) -> AddrScope {
    let first = ip.segments()[0];
    if ip.is_unspecified() || ip.is_multicast() {
        AddrScope::Unusable
    } else if ip.is_loopback() {
        AddrScope::Loopback
    } else if (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80 {
        // fc00::/7 unique-local, fe80::/10 link-local.
        AddrScope::Lan
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        scope_v4(v4)
    } else {
        AddrScope::Public
    }
}

/// Most addresses of one scope an invite carries when others are available, so one kind
/// (say, two public ones) does not crowd out the fallback (a relayed one).
const PER_SCOPE: usize = 2;

/// Orders addresses for an invite link and keeps at most `max`: public ones first, then
/// relayed ones (at most [`PER_SCOPE`] of each while other scopes wait), then LAN and, last,
/// loopback; never unusable ones, never the same address twice. Within a scope the input
/// order is kept (the caller puts its best first).
pub fn invite_order(addrs: &[Multiaddr], max: usize) -> Vec<Multiaddr> {
    let mut unique: Vec<&Multiaddr> = Vec::new();
    for a in addrs {
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    let of = |scope: AddrScope| -> Vec<&Multiaddr> {
        unique
            .iter()
            .copied()
            .filter(|a| AddrScope::of(a) == scope)
            .collect()
    };
    let (public, relayed) = (of(AddrScope::Public), of(AddrScope::Relayed));
    let (lan, loopback) = (of(AddrScope::Lan), of(AddrScope::Loopback));
    let mut out: Vec<Multiaddr> = Vec::new();
    // First pass: the best few of each reachable scope; second pass: the rest, in order.
    let first = public
        .iter()
        .take(PER_SCOPE)
        .chain(relayed.iter().take(PER_SCOPE))
        .chain(lan.iter().take(1));
    let rest = public
        .iter()
        .skip(PER_SCOPE)
        .chain(relayed.iter().skip(PER_SCOPE))
        .chain(lan.iter().skip(1))
        .chain(loopback.iter());
    for a in first.chain(rest) {
        if out.len() == max {
            break;
        }
        out.push((*a).clone());
    }
    out
}

/// Whether an invite with these addresses can be used from outside the inviter's LAN.
pub fn reaches_beyond_lan(addrs: &[Multiaddr]) -> bool {
    addrs.iter().any(|a| AddrScope::of(a).leaves_lan())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("valid multiaddr")
    }

    const RELAY: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    #[test]
    fn scopes() {
        let cases = [
            ("/ip4/203.0.113.7/tcp/7341", AddrScope::Public),
            ("/ip4/198.51.100.1/udp/7341/quic-v1", AddrScope::Public),
            ("/dns4/kith.example/tcp/7341", AddrScope::Public),
            ("/ip4/192.168.1.2/tcp/7341", AddrScope::Lan),
            ("/ip4/10.0.0.5/tcp/7341", AddrScope::Lan),
            ("/ip4/172.16.3.4/tcp/7341", AddrScope::Lan),
            ("/ip4/100.64.1.1/tcp/7341", AddrScope::Lan),
            ("/ip4/100.128.1.1/tcp/7341", AddrScope::Public),
            ("/ip4/169.254.1.1/tcp/7341", AddrScope::Lan),
            ("/ip4/127.0.0.1/tcp/7341", AddrScope::Loopback),
            ("/ip4/0.0.0.0/tcp/7341", AddrScope::Unusable),
            ("/ip6/::1/tcp/7341", AddrScope::Loopback),
            ("/ip6/fd00::1/tcp/7341", AddrScope::Lan),
            ("/ip6/fe80::1/tcp/7341", AddrScope::Lan),
            ("/ip6/2001:db8::1/tcp/7341", AddrScope::Public),
            ("/ip6/::ffff:192.168.0.1/tcp/7341", AddrScope::Lan),
            ("/ip6/::/tcp/7341", AddrScope::Unusable),
            ("/tcp/7341", AddrScope::Unusable),
        ];
        for (addr, want) in cases {
            assert_eq!(AddrScope::of(&a(addr)), want, "{addr}");
        }
        // A circuit is relayed even through a LAN relay address.
        let circuit = a(&format!("/ip4/192.168.1.9/tcp/1/p2p/{RELAY}/p2p-circuit"));
        assert_eq!(AddrScope::of(&circuit), AddrScope::Relayed);
    }

    #[test]
    fn invite_puts_public_then_relayed_then_lan() {
        let circuit = a(&format!("/ip4/203.0.113.1/tcp/1/p2p/{RELAY}/p2p-circuit"));
        let input = [
            a("/ip4/127.0.0.1/tcp/1"),
            a("/ip4/192.168.1.2/tcp/1"),
            a("/ip4/0.0.0.0/tcp/1"),
            circuit.clone(),
            a("/ip4/198.51.100.4/tcp/1"),
            a("/ip4/198.51.100.4/tcp/1"),
        ];
        let got = invite_order(&input, 3);
        assert_eq!(
            got,
            vec![
                a("/ip4/198.51.100.4/tcp/1"),
                circuit,
                a("/ip4/192.168.1.2/tcp/1")
            ]
        );
        assert!(reaches_beyond_lan(&got));
        // Only loopback and LAN: kept (a link for this LAN), but it does not leave it.
        let local = invite_order(&input[..3], 3);
        assert_eq!(
            local,
            vec![a("/ip4/192.168.1.2/tcp/1"), a("/ip4/127.0.0.1/tcp/1")]
        );
        assert!(!reaches_beyond_lan(&local));
    }

    #[test]
    fn many_public_addresses_leave_room_for_a_relay() {
        let circuit = a(&format!("/ip4/203.0.113.1/tcp/1/p2p/{RELAY}/p2p-circuit"));
        let input = [
            a("/ip4/198.51.100.1/tcp/1"),
            a("/ip4/198.51.100.2/tcp/1"),
            a("/ip4/198.51.100.3/tcp/1"),
            circuit.clone(),
        ];
        let got = invite_order(&input, 3);
        assert_eq!(got[2], circuit);
        assert_eq!(invite_order(&input, 8).len(), 4);
    }
}
