//! Invite ticket tests: golden link, create/parse round trips in every accepted text form,
//! tampering and truncation, hand-forged tickets that carry a valid signature over invalid
//! fields, expiry and network checks, and the stored `InviteRecord`.

#![allow(clippy::unwrap_used)]

use data_encoding::{BASE32_NOPAD, HEXLOWER};
use kith_protocol::codec::{self, DecodeError};
use kith_protocol::envelope::{JoinRejection, MAX_GROUP_NAME_BYTES, MAX_NETWORK_ID_BYTES};
use kith_protocol::ids::{GroupId, InviteId};
use kith_protocol::invite::{
    Invite, InviteError, InviteParams, InviteRecord, InviteUpdate, LINK_PREFIX, MAX_ADDR_BYTES,
    MAX_INVITE_ADDRS, MAX_LINK_CHARS, URL_PREFIX, secret_hash,
};
use kith_protocol::{Keypair, Multiaddr};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn key() -> Keypair {
    Keypair::ed25519_from_bytes([7u8; 32]).unwrap()
}

fn other_key() -> Keypair {
    Keypair::ed25519_from_bytes([8u8; 32]).unwrap()
}

fn addr(s: &str) -> Multiaddr {
    s.parse().unwrap()
}

fn params() -> InviteParams {
    InviteParams {
        network: "kith-test".to_owned(),
        group: GroupId([0x44; 32]),
        group_name: "Book club".to_owned(),
        addrs: vec![
            addr("/ip4/192.0.2.1/tcp/4001"),
            addr("/ip4/192.0.2.1/udp/4001/quic-v1"),
        ],
        secret: [0x55; 32],
        expires_at: 1_800_000_000,
        max_uses: 5,
    }
}

fn invite() -> Invite {
    Invite::create(params(), &key()).unwrap()
}

/// The base32 body of a link (after `kith1`).
fn body(link: &str) -> &str {
    link.strip_prefix(LINK_PREFIX).unwrap()
}

fn link_of_bytes(bytes: &[u8]) -> String {
    format!(
        "{LINK_PREFIX}{}",
        BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
    )
}

fn bytes_of_link(link: &str) -> Vec<u8> {
    BASE32_NOPAD
        .decode(body(link).to_ascii_uppercase().as_bytes())
        .unwrap()
}

/// The errors a damaged link may produce. Which one depends on where the damage lands: in the
/// base32 text, in the framing, in a bounded field (checked before the signature), in the
/// inviter key, or anywhere else (the signature then fails).
fn is_damage_error(e: &InviteError) -> bool {
    matches!(
        e,
        InviteError::BadSignature
            | InviteError::BadEncoding
            | InviteError::Malformed(_)
            | InviteError::Invalid(_)
            | InviteError::BadInviterKey
    )
}

fn assert_damaged(what: &str, text: &str) {
    match Invite::parse(text) {
        Err(e) => assert!(is_damage_error(&e), "{what}: unexpected error {e:?}"),
        Ok(i) => panic!("{what}: damaged link parsed as {i:?}"),
    }
}

// A mirror of the private ticket types, with the same serde shape (bincode ignores names).
// It lets the tests forge tickets that carry a *valid* signature over fields `Invite::create`
// would never produce, to check that `Invite::parse` enforces its bounds on its own. It also
// documents the ticket layout, and `mirror_matches_real_ticket_bytes` keeps it honest.

#[derive(Serialize, Deserialize, Clone)]
enum MirrorTicket {
    V1(MirrorSigned),
}

#[derive(Serialize, Deserialize, Clone)]
struct MirrorSigned {
    body: MirrorBody,
    signature: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone)]
struct MirrorBody {
    network: String,
    group: GroupId,
    group_name: String,
    inviter_key: [u8; 32],
    addrs: Vec<Vec<u8>>,
    secret: [u8; 32],
    expires_at: u64,
    max_uses: u32,
}

const SIGNATURE_CONTEXT: &[u8] = b"kith/invite/v1";

fn ed25519_public(k: &Keypair) -> [u8; 32] {
    k.public().try_into_ed25519().unwrap().to_bytes()
}

fn mirror_body() -> MirrorBody {
    let p = params();
    MirrorBody {
        network: p.network,
        group: p.group,
        group_name: p.group_name,
        inviter_key: ed25519_public(&key()),
        addrs: p.addrs.iter().map(|a| a.to_vec()).collect(),
        secret: p.secret,
        expires_at: p.expires_at,
        max_uses: p.max_uses,
    }
}

/// Signs `body` as `Invite::create` does (context string, then the encoded body).
fn sign(body: &MirrorBody, k: &Keypair) -> Vec<u8> {
    let mut msg = SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(&codec::encode(body).unwrap());
    k.sign(&msg).unwrap()
}

fn forge(body: MirrorBody) -> String {
    let signature = sign(&body, &key());
    let ticket = MirrorTicket::V1(MirrorSigned { body, signature });
    link_of_bytes(&codec::encode(&ticket).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Golden link
// ---------------------------------------------------------------------------------------------

// WIRE FORMAT PIN. Invite links are handed between people and must keep working across
// versions: if this assertion fails, the ticket encoding (or the signed message) changed and
// links made by other builds no longer parse. Do not update the string; add a new ticket
// version instead. Ed25519 signatures are deterministic (RFC 8032), so the whole link,
// signature included, is fixed for a fixed key and fixed parameters.
const GOLDEN_LINK: &str = concat!(
    "kith1aaeww2lunawxizltorceirceirceirceirceirceirceirceirceirceirceirceirceickcn5x",
    "wwiddnr2wf2sknrr6fhcsbk7pkud3cmxml6mvi53k5pv6pojeehxknekenurmaieajqaaaiaqmd5bbmc",
    "maaacagiqed5bzubvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvkvp4adjes2yfidz",
    "evasfdsa5zh4slalxrv5dryy4sqhyzbssobu6awspeakiqpuf2lj2xxrm5qehke6hqpprhe3ibynxskp",
    "rvsi4qbsn66yvghun4dqc",
);
const GOLDEN_PEER_ID: &str = "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7";

#[test]
fn golden_link() {
    let inv = invite();
    assert_eq!(inv.link(), GOLDEN_LINK);
    assert_eq!(inv.url(), format!("kith://join#{GOLDEN_LINK}"));
    assert_eq!(inv.inviter.to_string(), GOLDEN_PEER_ID);
    assert_eq!(inv.inviter, key().public().to_peer_id());
    // And the golden link parses back to the same fields, on any build.
    let parsed = Invite::parse(GOLDEN_LINK).unwrap();
    assert_eq!(parsed, inv);
    assert_eq!(parsed.network, "kith-test");
    assert_eq!(parsed.group, GroupId([0x44; 32]));
    assert_eq!(parsed.group_name, "Book club");
    assert_eq!(parsed.addrs, params().addrs);
    assert_eq!(parsed.secret, [0x55; 32]);
    assert_eq!(parsed.expires_at, 1_800_000_000);
    assert_eq!(parsed.max_uses, 5);
}

#[test]
fn golden_secret_hash() {
    // Stored as the invite record's key: a change orphans every stored invite.
    assert_eq!(
        HEXLOWER.encode(&secret_hash(&[0x55; 32])),
        "0637f83266c0021be17042bc24dfc8469249e808ccb58bbeeea4068b576e5d9e"
    );
}

#[test]
fn mirror_matches_real_ticket_bytes() {
    // The forged-ticket helpers below are only meaningful if they reproduce real tickets.
    assert_eq!(forge(mirror_body()), invite().link());
    let decoded: MirrorTicket = codec::decode(&bytes_of_link(invite().link()), 4096).unwrap();
    let MirrorTicket::V1(signed) = decoded;
    assert_eq!(signed.signature.len(), 64);
    assert_eq!(signed.body.inviter_key, ed25519_public(&key()));
}

// ---------------------------------------------------------------------------------------------
// Round trips and accepted text forms
// ---------------------------------------------------------------------------------------------

#[test]
fn create_parse_round_trip_both_forms() {
    let inv = invite();
    assert!(inv.link().starts_with(LINK_PREFIX));
    assert!(
        body(inv.link())
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)),
        "lowercase base32 without padding"
    );
    assert_eq!(Invite::parse(inv.link()).unwrap(), inv);
    assert!(inv.url().starts_with(URL_PREFIX));
    assert_eq!(Invite::parse(&inv.url()).unwrap(), inv);
    // Re-encoding is deterministic: creating twice gives the same link.
    assert_eq!(invite().link(), inv.link());
}

#[test]
fn surrounding_whitespace_is_ignored() {
    let inv = invite();
    for text in [
        format!("  {}  ", inv.link()),
        format!("\n\t{}\r\n", inv.link()),
        format!(" {}\n", inv.url()),
        format!("{}{}", " ".repeat(3000), inv.link()),
    ] {
        assert_eq!(Invite::parse(&text).unwrap(), inv, "{text:?}");
    }
    // A link wrapped over lines (mail clients do this) still parses to the same invite.
    let link = inv.link();
    let (a, b) = link.split_at(20);
    assert_eq!(Invite::parse(&format!("{a} {b}")).unwrap(), inv);
    assert_eq!(Invite::parse(&format!("{a}\r\n  {b}")).unwrap(), inv);
}

#[test]
fn uppercase_and_mixed_case_base32_is_accepted() {
    let inv = invite();
    let upper = format!("{LINK_PREFIX}{}", body(inv.link()).to_ascii_uppercase());
    let parsed = Invite::parse(&upper).unwrap();
    assert_eq!(parsed, inv);
    // The link is normalised to lowercase.
    assert_eq!(parsed.link(), inv.link());
    let mixed: String = body(inv.link())
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    assert_eq!(
        Invite::parse(&format!("{LINK_PREFIX}{mixed}")).unwrap(),
        inv
    );
    assert_eq!(Invite::parse(&format!("{URL_PREFIX}{upper}")).unwrap(), inv);
}

#[test]
fn uppercase_prefix_never_yields_another_invite() {
    // The prefix is matched case-sensitively today. Whatever the policy, an all-caps link
    // (as some QR readers return it) must either be refused or parse to the same invite.
    let inv = invite();
    for text in [
        inv.link().to_ascii_uppercase(),
        inv.url().to_ascii_uppercase(),
    ] {
        match Invite::parse(&text) {
            Ok(p) => assert_eq!(p, inv),
            Err(e) => assert_eq!(e, InviteError::NotALink),
        }
    }
}

#[test]
fn addresses_beyond_three_are_cut_on_create() {
    let mut p = params();
    p.addrs = (0..6)
        .map(|i| addr(&format!("/ip4/192.0.2.{i}/tcp/400{i}")))
        .collect();
    let inv = Invite::create(p.clone(), &key()).unwrap();
    assert_eq!(inv.addrs.len(), MAX_INVITE_ADDRS);
    assert_eq!(inv.addrs, p.addrs[..MAX_INVITE_ADDRS].to_vec());
    assert_eq!(Invite::parse(inv.link()).unwrap(), inv);
}

#[test]
fn over_long_addresses_are_dropped_on_create() {
    let long = addr(&format!("/dns/{}/tcp/1", "a".repeat(MAX_ADDR_BYTES)));
    assert!(long.len() > MAX_ADDR_BYTES);
    let mut p = params();
    p.addrs = vec![
        long.clone(),
        addr("/ip4/192.0.2.1/tcp/1"),
        long,
        addr("/ip4/192.0.2.2/tcp/2"),
        addr("/ip4/192.0.2.3/tcp/3"),
        addr("/ip4/192.0.2.4/tcp/4"),
    ];
    let inv = Invite::create(p.clone(), &key()).unwrap();
    assert_eq!(
        inv.addrs,
        vec![p.addrs[1].clone(), p.addrs[3].clone(), p.addrs[4].clone()]
    );
}

#[test]
fn no_addresses_is_fine() {
    let mut p = params();
    p.addrs.clear();
    let inv = Invite::create(p, &key()).unwrap();
    assert!(inv.addrs.is_empty());
    assert_eq!(Invite::parse(inv.link()).unwrap(), inv);
}

/// An address of exactly `len` encoded bytes.
fn addr_of_len(len: usize, i: u8) -> Multiaddr {
    // /dns/<name>/tcp/<port>: 1 (dns) + 1 (name length, < 128) + name + 1 (tcp) + 2 (port).
    let a = addr(&format!("/dns/{}{}/tcp/4001", i, "a".repeat(len - 6)));
    assert_eq!(a.len(), len);
    a
}

#[test]
fn largest_invite_fits_the_link_limit() {
    let p = InviteParams {
        network: "n".repeat(MAX_NETWORK_ID_BYTES),
        group: GroupId([0xff; 32]),
        group_name: "é".repeat(MAX_GROUP_NAME_BYTES / 2),
        addrs: (0..3).map(|i| addr_of_len(MAX_ADDR_BYTES, i)).collect(),
        secret: [0xff; 32],
        expires_at: u64::MAX,
        max_uses: u32::MAX,
    };
    let inv = Invite::create(p.clone(), &key()).unwrap();
    assert_eq!(inv.addrs, p.addrs);
    assert!(inv.url().len() <= MAX_LINK_CHARS, "{}", inv.url().len());
    assert_eq!(Invite::parse(&inv.url()).unwrap(), inv);
}

#[test]
fn field_bounds_on_create() {
    let mut p = params();
    p.network = "n".repeat(MAX_NETWORK_ID_BYTES);
    assert!(Invite::create(p.clone(), &key()).is_ok());
    p.network.push('n');
    assert!(matches!(
        Invite::create(p.clone(), &key()),
        Err(InviteError::Invalid(_))
    ));
    p.network.clear();
    assert!(matches!(
        Invite::create(p, &key()),
        Err(InviteError::Invalid(_))
    ));

    let mut p = params();
    p.group_name = "g".repeat(MAX_GROUP_NAME_BYTES);
    assert!(Invite::create(p.clone(), &key()).is_ok());
    p.group_name.push('g');
    assert!(matches!(
        Invite::create(p, &key()),
        Err(InviteError::Invalid(_))
    ));

    let mut p = params();
    p.group_name = String::new();
    assert!(Invite::create(p, &key()).is_ok());
}

#[test]
fn max_uses_zero_is_rejected() {
    let mut p = params();
    p.max_uses = 0;
    assert!(matches!(
        Invite::create(p.clone(), &key()),
        Err(InviteError::Invalid(_))
    ));
    p.max_uses = 1;
    assert_eq!(Invite::create(p, &key()).unwrap().max_uses, 1);
}

// ---------------------------------------------------------------------------------------------
// Non-links, length, tampering, truncation
// ---------------------------------------------------------------------------------------------

#[test]
fn non_link_text_is_not_a_link() {
    for text in [
        "",
        "   ",
        "hello",
        "kith",
        "kith2abc",
        "kith:abc",
        "https://example.com/join#kith1abc",
        "kith://join#",
        "kith://join#hello",
        "kith://join#kith://join#kith1aaaa",
        "xkith1aaaa",
        "\u{feff}kith1aaaa",
    ] {
        assert_eq!(Invite::parse(text), Err(InviteError::NotALink), "{text:?}");
    }
    // The prefix is case-insensitive (QR readers may upper-case URLs), so this is a link,
    // just a damaged one.
    assert_damaged("upper-case scheme", "KITH://JOIN#KITH1AAAA");
}

#[test]
fn too_long_text_is_too_long() {
    let text = format!("{LINK_PREFIX}{}", "a".repeat(MAX_LINK_CHARS));
    assert_eq!(
        Invite::parse(&text),
        Err(InviteError::TooLong(MAX_LINK_CHARS + LINK_PREFIX.len()))
    );
    // The length check comes first, so an over-long non-link is also TooLong.
    let junk = "x".repeat(MAX_LINK_CHARS + 1);
    assert_eq!(
        Invite::parse(&junk),
        Err(InviteError::TooLong(MAX_LINK_CHARS + 1))
    );
    // Exactly at the limit it is only judged on content.
    let at_limit = format!(
        "{LINK_PREFIX}{}",
        "a".repeat(MAX_LINK_CHARS - LINK_PREFIX.len())
    );
    assert!(!matches!(
        Invite::parse(&at_limit),
        Err(InviteError::TooLong(_))
    ));
}

#[test]
fn every_substituted_character_is_rejected() {
    let inv = invite();
    let link = inv.link();
    let b32 = body(link);
    let alphabet = "abcdefghijklmnopqrstuvwxyz234567";
    for (i, original) in b32.char_indices() {
        for c in alphabet.chars().filter(|&c| c != original) {
            let mut tampered = b32.to_owned();
            tampered.replace_range(i..i + 1, c.encode_utf8(&mut [0; 4]));
            assert_damaged(
                &format!("position {i}: {original} -> {c}"),
                &format!("{LINK_PREFIX}{tampered}"),
            );
        }
        // Characters outside the alphabet are an encoding error.
        for c in ['0', '1', '8', '9', '=', '-', 'é'] {
            let mut tampered = b32.to_owned();
            tampered.replace_range(i..i + 1, c.encode_utf8(&mut [0; 4]));
            assert_eq!(
                Invite::parse(&format!("{LINK_PREFIX}{tampered}")),
                Err(InviteError::BadEncoding),
                "position {i}: {original} -> {c}"
            );
        }
    }
}

#[test]
fn every_flipped_bit_is_rejected() {
    let bytes = bytes_of_link(invite().link());
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert_damaged(&format!("byte {i} bit {bit}"), &link_of_bytes(&b));
        }
    }
}

#[test]
fn every_truncation_is_rejected() {
    let link = invite().link().to_owned();
    for cut in LINK_PREFIX.len()..link.len() {
        assert_damaged(&format!("cut at {cut}"), &link[..cut]);
    }
    // Truncated by whole bytes, re-encoded as valid base32: the ticket framing fails.
    let bytes = bytes_of_link(&link);
    for cut in 0..bytes.len() {
        assert!(
            matches!(
                Invite::parse(&link_of_bytes(&bytes[..cut])),
                Err(InviteError::Malformed(_))
            ),
            "byte cut at {cut}"
        );
    }
}

#[test]
fn appended_data_is_rejected() {
    let inv = invite();
    let bytes = bytes_of_link(inv.link());
    for extra in [&[0u8][..], &[0, 0, 0, 0, 0], &[0xff; 7]] {
        let mut b = bytes.clone();
        b.extend_from_slice(extra);
        assert_eq!(
            Invite::parse(&link_of_bytes(&b)),
            Err(InviteError::Malformed(DecodeError::TrailingBytes(
                extra.len()
            )))
        );
    }
    for suffix in ["a", "aa", "aaaaaaaa", "7"] {
        assert_damaged(suffix, &format!("{}{suffix}", inv.link()));
    }
}

#[test]
fn non_canonical_base32_is_rejected() {
    // The last character of an unpadded base32 string may carry unused low bits; a link that
    // sets them decodes to the same bytes but is not the signed text, and is refused.
    let alphabet = "abcdefghijklmnopqrstuvwxyz234567";
    let mut checked = 0;
    for name_len in 0..5 {
        let mut p = params();
        p.group_name = "x".repeat(name_len);
        let link = Invite::create(p, &key()).unwrap().link().to_owned();
        let unused_bits = (5 - (bytes_of_link(&link).len() * 8) % 5) % 5;
        let last = link.chars().last().unwrap();
        let v = alphabet.find(last).unwrap();
        for low in 1..(1usize << unused_bits) {
            let c = alphabet.as_bytes()[v ^ low] as char;
            let text = format!("{}{c}", &link[..link.len() - 1]);
            assert_eq!(
                Invite::parse(&text),
                Err(InviteError::BadEncoding),
                "{text}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

// ---------------------------------------------------------------------------------------------
// Forged tickets: valid signature, invalid content
// ---------------------------------------------------------------------------------------------

#[test]
fn forged_ticket_bounds_are_enforced_on_parse() {
    let mut b = mirror_body();
    b.max_uses = 0;
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.addrs = (0..4).map(|i| addr_of_len(20, i).to_vec()).collect();
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.network = String::new();
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.network = "n".repeat(MAX_NETWORK_ID_BYTES + 1);
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.group_name = "g".repeat(MAX_GROUP_NAME_BYTES + 1);
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.addrs = vec![vec![0xff, 0xff, 0xff]];
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    let mut b = mirror_body();
    b.addrs = vec![addr(&format!("/dns/{}/tcp/1", "a".repeat(MAX_ADDR_BYTES))).to_vec()];
    assert!(matches!(
        Invite::parse(&forge(b)),
        Err(InviteError::Invalid(_))
    ));

    // The same fields within bounds do parse (the forging itself is sound).
    let mut b = mirror_body();
    b.addrs = (0..3)
        .map(|i| addr_of_len(MAX_ADDR_BYTES, i).to_vec())
        .collect();
    assert!(Invite::parse(&forge(b)).is_ok());
}

#[test]
fn signature_by_another_key_is_rejected() {
    let b = mirror_body();
    let signature = sign(&b, &other_key());
    let link = link_of_bytes(
        &codec::encode(&MirrorTicket::V1(MirrorSigned { body: b, signature })).unwrap(),
    );
    assert_eq!(Invite::parse(&link), Err(InviteError::BadSignature));

    // Claiming another inviter with the original signature fails too.
    let mut b = mirror_body();
    let signature = sign(&b, &key());
    b.inviter_key = ed25519_public(&other_key());
    let link = link_of_bytes(
        &codec::encode(&MirrorTicket::V1(MirrorSigned { body: b, signature })).unwrap(),
    );
    assert_eq!(Invite::parse(&link), Err(InviteError::BadSignature));
}

#[test]
fn signature_without_context_or_of_wrong_length_is_rejected() {
    let b = mirror_body();
    // Signed over the bare body, without the domain-separation context.
    let signature = key().sign(&codec::encode(&b).unwrap()).unwrap();
    let link = link_of_bytes(
        &codec::encode(&MirrorTicket::V1(MirrorSigned {
            body: b.clone(),
            signature,
        }))
        .unwrap(),
    );
    assert_eq!(Invite::parse(&link), Err(InviteError::BadSignature));

    let good = sign(&b, &key());
    for signature in [
        vec![],
        good[..63].to_vec(),
        [&good[..], &[0]].concat(),
        vec![0; 64],
    ] {
        let link = link_of_bytes(
            &codec::encode(&MirrorTicket::V1(MirrorSigned {
                body: b.clone(),
                signature,
            }))
            .unwrap(),
        );
        assert_eq!(Invite::parse(&link), Err(InviteError::BadSignature));
    }
}

#[test]
fn invalid_inviter_key_is_rejected() {
    // Find 32 bytes that are not a valid compressed Edwards point.
    let bad = (0u8..=255)
        .map(|i| {
            let mut k = [i; 32];
            k[31] &= 0x7f;
            k
        })
        .find(|k| libp2p_identity::ed25519::PublicKey::try_from_bytes(k).is_err())
        .unwrap();
    let mut b = mirror_body();
    b.inviter_key = bad;
    assert_eq!(Invite::parse(&forge(b)), Err(InviteError::BadInviterKey));
}

#[test]
fn non_canonical_ticket_encoding_is_rejected() {
    // max_uses 5 re-encoded as an over-long varint (`fb 05 00`): same fields, valid signature
    // (it covers the canonical re-encoding), but not the signed bytes. Accepting it would give
    // one invite many link texts.
    let bytes = bytes_of_link(invite().link());
    let pos = bytes.len() - 1 - 64 - 1; // before signature length (1) + signature (64)
    assert_eq!(bytes[pos], 5);
    let mut b = bytes[..pos].to_vec();
    b.extend_from_slice(&[251, 5, 0]);
    b.extend_from_slice(&bytes[pos + 1..]);
    assert!(matches!(
        Invite::parse(&link_of_bytes(&b)),
        Err(InviteError::Malformed(DecodeError::Malformed(_)))
    ));
}

// ---------------------------------------------------------------------------------------------
// Use: expiry, network, records
// ---------------------------------------------------------------------------------------------

#[test]
fn check_expiry_boundary() {
    let inv = invite();
    assert_eq!(inv.check("kith-test", 0), Ok(()));
    assert_eq!(inv.check("kith-test", 1_800_000_000 - 1), Ok(()));
    let expired = Err(InviteError::Expired {
        expired_at: 1_800_000_000,
    });
    assert_eq!(inv.check("kith-test", 1_800_000_000), expired);
    assert_eq!(inv.check("kith-test", 1_800_000_001), expired);
    assert_eq!(inv.check("kith-test", u64::MAX), expired);
}

#[test]
fn check_wrong_network() {
    let inv = invite();
    for ours in ["kith-main", "", "KITH-TEST", "kith-test "] {
        assert_eq!(
            inv.check(ours, 0),
            Err(InviteError::WrongNetwork {
                link: "kith-test".to_owned(),
                ours: ours.to_owned(),
            })
        );
    }
}

#[test]
fn expired_invite_still_parses() {
    // Parsing checks integrity only; expiry is judged by `check` with the caller's clock.
    let mut p = params();
    p.expires_at = 0;
    let inv = Invite::create(p, &key()).unwrap();
    assert_eq!(Invite::parse(inv.link()).unwrap(), inv);
    assert!(matches!(
        inv.check("kith-test", 0),
        Err(InviteError::Expired { expired_at: 0 })
    ));
}

fn record(uses: u32, max_uses: u32) -> InviteRecord {
    let hash = secret_hash(&[0x55; 32]);
    InviteRecord {
        group: GroupId([0x44; 32]),
        id: InviteId::of(&hash),
        secret_hash: Some(hash),
        expires_at: 1000,
        max_uses,
        uses,
        created_at: 10,
        creator: None,
        approval: false,
        revoked: false,
    }
}

#[test]
fn record_admits() {
    assert_eq!(record(0, 1).admits(0), Ok(()));
    assert_eq!(record(0, 1).admits(999), Ok(()));
    assert_eq!(record(4, 5).admits(999), Ok(()));
    // Exactly at expiry is expired.
    assert_eq!(record(0, 1).admits(1000), Err(JoinRejection::Expired));
    assert_eq!(record(0, 1).admits(u64::MAX), Err(JoinRejection::Expired));
    // Used up.
    assert_eq!(record(1, 1).admits(0), Err(JoinRejection::UsedUp));
    assert_eq!(record(5, 5).admits(0), Err(JoinRejection::UsedUp));
    assert_eq!(record(u32::MAX, 5).admits(0), Err(JoinRejection::UsedUp));
    assert_eq!(record(0, 0).admits(0), Err(JoinRejection::UsedUp));
    // Both: expiry is reported.
    assert_eq!(record(5, 5).admits(1000), Err(JoinRejection::Expired));
    // Revoked beats everything else.
    let revoked = InviteRecord {
        revoked: true,
        ..record(5, 5)
    };
    assert_eq!(revoked.admits(1000), Err(JoinRejection::Revoked));
    assert_eq!(revoked.uses_left(), 0);
    assert!(!revoked.is_active(0));
    assert!(record(0, 2).is_active(0));
    assert_eq!(record(1, 3).uses_left(), 2);
}

#[test]
fn record_from_invite_holds_hash_not_secret() {
    let inv = invite();
    let hash = secret_hash(&inv.secret);
    let rec = InviteRecord::merge(
        None,
        &InviteUpdate::Created {
            group: inv.group,
            id: inv.id(),
            secret_hash: hash,
            expires_at: inv.expires_at,
            max_uses: inv.max_uses,
            approval: false,
            creator: inv.inviter,
            created_at: 1_700_000_000,
        },
    );
    assert_eq!(rec.group, inv.group);
    assert_eq!(rec.id, InviteId::of(&hash));
    assert_eq!(rec.secret_hash, Some(hash));
    assert_ne!(hash, inv.secret);
    assert_eq!(rec.expires_at, inv.expires_at);
    assert_eq!(rec.max_uses, inv.max_uses);
    assert_eq!(rec.uses, 0);
    assert_eq!(rec.created_at, 1_700_000_000);
    assert_eq!(rec.creator, Some(inv.inviter));
    assert_eq!(rec.admits(1_700_000_000), Ok(()));
    // The link's rendezvous key is the members' one, and is neither the id nor the hash.
    assert_eq!(
        inv.rendezvous_key(),
        kith_protocol::ids::invite_rendezvous_key("kith-test", &hash)
    );
    assert_ne!(inv.rendezvous_key(), hash);
    assert_ne!(inv.rendezvous_key(), inv.id().0);

    // The stored bytes do not contain the secret anywhere, nor does the debug output.
    let bytes = codec::encode(&rec).unwrap();
    assert!(!bytes.windows(32).any(|w| w == inv.secret));
    assert!(!bytes.windows(8).any(|w| w == &inv.secret[..8]));
    let debug = format!("{rec:?}");
    assert!(!debug.contains("85, 85, 85, 85"), "{debug}");
    assert_eq!(codec::decode::<InviteRecord>(&bytes, 1024).unwrap(), rec);
}

#[test]
fn secret_hash_is_not_a_plain_sha256() {
    use sha2::{Digest, Sha256};
    let s = [0x55; 32];
    let plain: [u8; 32] = Sha256::digest(s).into();
    assert_ne!(secret_hash(&s), plain, "domain-separated");
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn arb_params() -> impl Strategy<Value = InviteParams> {
    (
        "[a-z0-9.-]{1,64}",
        any::<[u8; 32]>(),
        prop::collection::vec(any::<char>(), 0..32),
        prop::collection::vec((any::<[u8; 4]>(), any::<u16>()), 0..6),
        any::<[u8; 32]>(),
        any::<u64>(),
        1u32..,
    )
        .prop_map(
            |(network, group, name, addrs, secret, expires_at, max_uses)| {
                let mut group_name: String = name.into_iter().collect();
                while group_name.len() > MAX_GROUP_NAME_BYTES {
                    group_name.pop();
                }
                InviteParams {
                    network,
                    group: GroupId(group),
                    group_name,
                    addrs: addrs
                        .into_iter()
                        .map(|(ip, port)| {
                            addr(&format!(
                                "/ip4/{}.{}.{}.{}/tcp/{port}",
                                ip[0], ip[1], ip[2], ip[3]
                            ))
                        })
                        .collect(),
                    secret,
                    expires_at,
                    max_uses,
                }
            },
        )
}

proptest! {
    #[test]
    fn prop_create_parse_round_trip(p in arb_params(), seed in any::<[u8; 32]>()) {
        let k = Keypair::ed25519_from_bytes(seed).unwrap();
        let inv = Invite::create(p.clone(), &k).unwrap();
        prop_assert_eq!(&inv.network, &p.network);
        prop_assert_eq!(inv.group, p.group);
        prop_assert_eq!(&inv.group_name, &p.group_name);
        prop_assert_eq!(&inv.addrs[..], &p.addrs[..p.addrs.len().min(MAX_INVITE_ADDRS)]);
        prop_assert_eq!(inv.secret, p.secret);
        prop_assert_eq!(inv.expires_at, p.expires_at);
        prop_assert_eq!(inv.max_uses, p.max_uses);
        prop_assert_eq!(inv.inviter, k.public().to_peer_id());
        prop_assert_eq!(Invite::parse(inv.link()).unwrap(), inv.clone());
        prop_assert_eq!(Invite::parse(&inv.url()).unwrap(), inv.clone());
        prop_assert_eq!(inv.id(), InviteId::of(&secret_hash(&p.secret)));
    }

    #[test]
    fn prop_random_bit_flip_is_rejected(
        p in arb_params(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let inv = Invite::create(p, &key()).unwrap();
        let mut bytes = bytes_of_link(inv.link());
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let result = Invite::parse(&link_of_bytes(&bytes));
        prop_assert!(matches!(&result, Err(e) if is_damage_error(e)), "{:?}", result);
    }

    #[test]
    fn prop_parse_never_panics(text in ".{0,300}") {
        let _ = Invite::parse(&text);
        let _ = Invite::parse(&format!("{LINK_PREFIX}{text}"));
        let _ = Invite::parse(&format!("{URL_PREFIX}{LINK_PREFIX}{text}"));
    }

    #[test]
    fn prop_parse_random_base32_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        // Random ticket bytes: framing, bounds or signature fail; never a panic, never Ok.
        let result = Invite::parse(&link_of_bytes(&bytes));
        prop_assert!(result.is_err());
    }

    #[test]
    fn prop_secret_hash_differs_per_secret(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
        prop_assert_eq!(secret_hash(&a), secret_hash(&a));
        prop_assert_eq!(a == b, secret_hash(&a) == secret_hash(&b));
        prop_assert_ne!(secret_hash(&a), a);
    }

    #[test]
    fn prop_record_admits_matches_rule(
        expires_at in any::<u64>(),
        now in any::<u64>(),
        max_uses in any::<u32>(),
        uses in any::<u32>(),
    ) {
        let rec = InviteRecord {
            group: GroupId([1; 32]),
            id: InviteId::of(&[2; 32]),
            secret_hash: Some([2; 32]),
            expires_at,
            max_uses,
            uses,
            created_at: 0,
            creator: None,
            approval: false,
            revoked: false,
        };
        let expected = if now >= expires_at {
            Err(JoinRejection::Expired)
        } else if uses >= max_uses {
            Err(JoinRejection::UsedUp)
        } else {
            Ok(())
        };
        prop_assert_eq!(rec.admits(now), expected);
    }
}
