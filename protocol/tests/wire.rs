//! Wire-layer tests: codec round trips, golden byte vectors, and adversarial decoding of every
//! type that crosses the network or is kept on disk (`Envelope`, `AppContent`, `JoinRequest`,
//! `JoinResponse`, `InviteRecord`), plus the ids derived from them.

#![allow(clippy::unwrap_used)]

use data_encoding::HEXLOWER;
use kith_protocol::codec::{self, DecodeError, MAX_DECODE_BYTES};
use kith_protocol::envelope::{
    AppContent, AppContentV1, AppContentV3, Body, Envelope, EnvelopeError, EnvelopeV1,
    JoinRejection, JoinRequest, JoinRequestV1, JoinResponse, MAX_ENVELOPE_BYTES,
    MAX_JOIN_REQUEST_BYTES, MAX_JOIN_RESPONSE_BYTES, MAX_RESEND_REQUEST_IDS, MAX_TEXT_BYTES,
    PayloadKind, Resent, SealedResent, SharedInvite,
};
use kith_protocol::group::CommitNote;
use kith_protocol::ids::{
    GroupId, IdParseError, InviteId, MessageId, TopicId, invite_rendezvous_key,
};
use kith_protocol::invite::InviteRecord;
use kith_protocol::records::{EntryKind, GroupMeta, HistoryEntry, StoredEnvelope};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Every rejection reason. `rejection_tag` below matches exhaustively, so adding a variant
/// fails to compile until it is listed here and given a pinned tag.
const ALL_REJECTIONS: [JoinRejection; 13] = [
    JoinRejection::UnknownInvite,
    JoinRejection::Expired,
    JoinRejection::UsedUp,
    JoinRejection::WrongNetwork,
    JoinRejection::NotMember,
    JoinRejection::InvalidKeyPackage,
    JoinRejection::AlreadyMember,
    JoinRejection::Internal,
    JoinRejection::Revoked,
    JoinRejection::Denied,
    JoinRejection::Busy,
    JoinRejection::OtherBranch,
    JoinRejection::RemovedSinceInvite,
];

/// The pinned wire tag of each rejection (its bincode variant index).
fn rejection_tag(r: JoinRejection) -> u8 {
    match r {
        JoinRejection::UnknownInvite => 0,
        JoinRejection::Expired => 1,
        JoinRejection::UsedUp => 2,
        JoinRejection::WrongNetwork => 3,
        JoinRejection::NotMember => 4,
        JoinRejection::InvalidKeyPackage => 5,
        JoinRejection::AlreadyMember => 6,
        JoinRejection::Internal => 7,
        JoinRejection::Revoked => 8,
        JoinRejection::Denied => 9,
        JoinRejection::Busy => 10,
        JoinRejection::OtherBranch => 11,
        JoinRejection::RemovedSinceInvite => 12,
    }
}

const ALL_KINDS: [PayloadKind; 3] = [
    PayloadKind::Commit,
    PayloadKind::Application,
    PayloadKind::Proposal,
];

fn golden_envelope() -> Envelope {
    Envelope::new(
        GroupId([0x11; 32]),
        7,
        PayloadKind::Commit,
        vec![0xde, 0xad, 0xbe, 0xef],
    )
}

fn golden_app_content() -> AppContent {
    AppContent::V1(AppContentV1 {
        sent_at_ms: 1_700_000_000_000,
        body: Body::Text("héllo".to_owned()),
    })
}

fn golden_join_request() -> JoinRequest {
    JoinRequest::V1(JoinRequestV1 {
        network: "kith-test".to_owned(),
        group: GroupId([0x22; 32]),
        secret: [0x33; 32],
        key_package: vec![1, 2, 3],
    })
}

fn golden_join_accepted() -> JoinResponse {
    JoinResponse::Accepted {
        welcome: vec![9, 8, 7],
        group_name: "friends".to_owned(),
    }
}

fn golden_invite_record() -> InviteRecord {
    InviteRecord {
        group: GroupId([0x44; 32]),
        id: InviteId([0x77; 32]),
        secret_hash: Some([0x66; 32]),
        expires_at: 1_800_000_000,
        max_uses: 5,
        uses: 2,
        created_at: 1_700_000_000,
        creator: None,
        approval: true,
        revoked: false,
    }
}

fn golden_invite_created() -> AppContent {
    AppContent::V1(AppContentV1 {
        sent_at_ms: 5,
        body: Body::InviteCreated(SharedInvite {
            secret_hash: [0x66; 32],
            expires_at: 1_800_000_000,
            max_uses: 5,
            approval: true,
        }),
    })
}

fn hex(bytes: &[u8]) -> String {
    HEXLOWER.encode(bytes)
}

fn unhex(text: &str) -> Vec<u8> {
    HEXLOWER.decode(text.as_bytes()).unwrap()
}

/// `n` repetitions of the two hex digits `byte`.
fn rep(byte: &str, n: usize) -> String {
    byte.repeat(n)
}

/// Encoded bytes of every golden value, with a name for failure messages and a decoder that
/// uses the type's own public decode entry point.
type Decoder = fn(&[u8]) -> Result<(), DecodeError>;

fn all_golden() -> Vec<(&'static str, Vec<u8>, Decoder)> {
    let mut out: Vec<(&'static str, Vec<u8>, Decoder)> = vec![
        ("envelope", golden_envelope().encode().unwrap().0, |b| {
            Envelope::decode(b).map(drop).map_err(|e| match e {
                EnvelopeError::Decode(d) => d,
            })
        }),
        (
            "app content",
            codec::encode(&golden_app_content()).unwrap(),
            |b| AppContent::decode(b).map(drop),
        ),
        (
            "join request",
            codec::encode(&golden_join_request()).unwrap(),
            |b| JoinRequest::decode(b).map(drop),
        ),
        (
            "join accepted",
            codec::encode(&golden_join_accepted()).unwrap(),
            |b| JoinResponse::decode(b).map(drop),
        ),
        (
            "invite record",
            codec::encode(&golden_invite_record()).unwrap(),
            |b| codec::decode::<InviteRecord>(b, 1024).map(drop),
        ),
    ];
    for r in ALL_REJECTIONS {
        out.push((
            "join rejected",
            codec::encode(&JoinResponse::Rejected(r)).unwrap(),
            |b| JoinResponse::decode(b).map(drop),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn envelope_round_trips_every_kind() {
    for kind in ALL_KINDS {
        for mls in [vec![], vec![0u8], vec![0xff; 300], vec![7; 70_000]] {
            for epoch in [0, 1, 250, 251, u64::from(u32::MAX) + 1, u64::MAX] {
                let env = Envelope::new(GroupId([0x5a; 32]), epoch, kind, mls.clone());
                let (bytes, id) = env.encode().unwrap();
                assert_eq!(id, MessageId::of(&bytes));
                let back = Envelope::decode(&bytes).unwrap();
                assert_eq!(back, env);
                assert_eq!(back.group(), GroupId([0x5a; 32]));
                assert_eq!(back.epoch(), epoch);
                assert_eq!(back.kind(), kind);
                assert_eq!(back.mls(), &mls[..]);
            }
        }
    }
}

#[test]
fn envelope_accessors_match_fields() {
    let env = golden_envelope();
    let Envelope::V1(EnvelopeV1 {
        group,
        epoch,
        kind,
        mls,
    }) = env.clone();
    assert_eq!(env.group(), group);
    assert_eq!(env.epoch(), epoch);
    assert_eq!(env.kind(), kind);
    assert_eq!(env.mls(), &mls[..]);
}

#[test]
fn app_content_round_trips() {
    for text in ["", "hi", "héllo wörld 👋", "\0\u{7f}\u{10ffff}"] {
        for sent_at_ms in [0, 1_700_000_000_000, u64::MAX] {
            let c = AppContent::V1(AppContentV1 {
                sent_at_ms,
                body: Body::Text(text.to_owned()),
            });
            let bytes = codec::encode(&c).unwrap();
            assert_eq!(AppContent::decode(&bytes).unwrap(), c);
        }
    }
}

#[test]
fn app_content_text_of_exactly_the_limit_round_trips() {
    let c = AppContent::V1(AppContentV1 {
        sent_at_ms: u64::MAX,
        body: Body::Text("x".repeat(MAX_TEXT_BYTES)),
    });
    let bytes = codec::encode(&c).unwrap();
    assert_eq!(AppContent::decode(&bytes).unwrap(), c);
}

#[test]
fn join_request_round_trips() {
    let r = golden_join_request();
    let bytes = codec::encode(&r).unwrap();
    assert_eq!(JoinRequest::decode(&bytes).unwrap(), r);

    let big = JoinRequest::V1(JoinRequestV1 {
        network: "n".repeat(64),
        group: GroupId([0xff; 32]),
        secret: [0; 32],
        key_package: vec![0xab; 8 * 1024],
    });
    let bytes = codec::encode(&big).unwrap();
    assert_eq!(JoinRequest::decode(&bytes).unwrap(), big);
}

#[test]
fn join_response_round_trips_accepted_and_every_rejection() {
    let a = golden_join_accepted();
    assert_eq!(
        JoinResponse::decode(&codec::encode(&a).unwrap()).unwrap(),
        a
    );
    let empty = JoinResponse::Accepted {
        welcome: vec![],
        group_name: String::new(),
    };
    assert_eq!(
        JoinResponse::decode(&codec::encode(&empty).unwrap()).unwrap(),
        empty
    );
    for r in ALL_REJECTIONS {
        let resp = JoinResponse::Rejected(r);
        let bytes = codec::encode(&resp).unwrap();
        assert_eq!(JoinResponse::decode(&bytes).unwrap(), resp);
        // Every rejection also has a distinct, non-empty user-facing message.
        assert!(!r.to_string().is_empty());
    }
    let messages: std::collections::BTreeSet<String> =
        ALL_REJECTIONS.iter().map(|r| r.to_string()).collect();
    assert_eq!(messages.len(), ALL_REJECTIONS.len());
}

#[test]
fn invite_record_round_trips() {
    let r = golden_invite_record();
    let bytes = codec::encode(&r).unwrap();
    assert_eq!(codec::decode::<InviteRecord>(&bytes, 1024).unwrap(), r);
}

#[test]
fn stored_records_round_trip() {
    // The node's store decodes these through the same codec (so the canonical-encoding check
    // applies to them too): every field, PeerIds included, must re-encode to the same bytes.
    let peer = |i: u8| {
        kith_protocol::Keypair::ed25519_from_bytes([i; 32])
            .unwrap()
            .public()
            .to_peer_id()
    };
    let meta = GroupMeta {
        id: GroupId([1; 32]),
        name: "friends".to_owned(),
        joined_at_ms: 1_700_000_000_000,
    };
    let bytes = codec::encode(&meta).unwrap();
    assert_eq!(
        codec::decode::<GroupMeta>(&bytes, MAX_DECODE_BYTES).unwrap(),
        meta
    );
    for kind in [
        EntryKind::Text("hi".to_owned()),
        EntryKind::GroupCreated {
            name: "friends".to_owned(),
        },
        EntryKind::MembersAdded(vec![peer(1), peer(2)]),
        EntryKind::MembersRemoved(vec![]),
    ] {
        let entry = HistoryEntry {
            group: GroupId([1; 32]),
            id: MessageId([2; 32]),
            epoch: 3,
            sender: peer(3),
            sent_at_ms: 4,
            received_at_ms: u64::MAX,
            kind,
        };
        let bytes = codec::encode(&entry).unwrap();
        assert_eq!(
            codec::decode::<HistoryEntry>(&bytes, MAX_DECODE_BYTES).unwrap(),
            entry
        );
    }
    let (env_bytes, id) = golden_envelope().encode().unwrap();
    let stored = StoredEnvelope {
        id,
        group: GroupId([0x11; 32]),
        epoch: 7,
        kind: PayloadKind::Commit,
        bytes: env_bytes,
        received_at_ms: 9,
    };
    let bytes = codec::encode(&stored).unwrap();
    assert_eq!(
        codec::decode::<StoredEnvelope>(&bytes, MAX_DECODE_BYTES).unwrap(),
        stored
    );
}

// Strategies for arbitrary field values.

fn arb_kind() -> impl Strategy<Value = PayloadKind> {
    prop::sample::select(ALL_KINDS.to_vec())
}

fn arb_rejection() -> impl Strategy<Value = JoinRejection> {
    prop::sample::select(ALL_REJECTIONS.to_vec())
}

fn arb_group() -> impl Strategy<Value = GroupId> {
    any::<[u8; 32]>().prop_map(GroupId)
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        arb_group(),
        any::<u64>(),
        arb_kind(),
        prop::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(g, e, k, m)| Envelope::new(g, e, k, m))
}

fn arb_app_content() -> impl Strategy<Value = AppContent> {
    (any::<u64>(), any::<String>()).prop_map(|(sent_at_ms, text)| {
        AppContent::V1(AppContentV1 {
            sent_at_ms,
            body: Body::Text(text),
        })
    })
}

fn arb_join_request() -> impl Strategy<Value = JoinRequest> {
    (
        "[a-z0-9-]{0,64}",
        arb_group(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(network, group, secret, key_package)| {
            JoinRequest::V1(JoinRequestV1 {
                network,
                group,
                secret,
                key_package,
            })
        })
}

fn arb_join_response() -> impl Strategy<Value = JoinResponse> {
    prop_oneof![
        (prop::collection::vec(any::<u8>(), 0..4096), any::<String>()).prop_map(
            |(welcome, group_name)| JoinResponse::Accepted {
                welcome,
                group_name
            }
        ),
        arb_rejection().prop_map(JoinResponse::Rejected),
    ]
}

fn arb_invite_record() -> impl Strategy<Value = InviteRecord> {
    (
        arb_group(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(group, secret_hash, expires_at, max_uses, uses, created_at)| InviteRecord {
                group,
                id: InviteId::of(&secret_hash),
                secret_hash: (secret_hash[0] & 1 == 0).then_some(secret_hash),
                expires_at,
                max_uses,
                uses,
                created_at,
                creator: None,
                approval: secret_hash[1] & 1 == 0,
                revoked: secret_hash[2] & 1 == 0,
            },
        )
}

proptest! {
    #[test]
    fn prop_envelope_round_trips(env in arb_envelope()) {
        let (bytes, id) = env.encode().unwrap();
        prop_assert_eq!(id, MessageId::of(&bytes));
        prop_assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn prop_app_content_round_trips(c in arb_app_content()) {
        let bytes = codec::encode(&c).unwrap();
        prop_assert_eq!(AppContent::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn prop_join_request_round_trips(r in arb_join_request()) {
        let bytes = codec::encode(&r).unwrap();
        prop_assert_eq!(JoinRequest::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn prop_join_response_round_trips(r in arb_join_response()) {
        let bytes = codec::encode(&r).unwrap();
        prop_assert_eq!(JoinResponse::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn prop_invite_record_round_trips(r in arb_invite_record()) {
        let bytes = codec::encode(&r).unwrap();
        prop_assert_eq!(codec::decode::<InviteRecord>(&bytes, 1024).unwrap(), r);
    }

    /// Distinct envelopes never share bytes, hence never share a `MessageId`.
    #[test]
    fn prop_distinct_envelopes_have_distinct_ids(a in arb_envelope(), b in arb_envelope()) {
        let (ba, ia) = a.encode().unwrap();
        let (bb, ib) = b.encode().unwrap();
        prop_assert_eq!(a == b, ba == bb);
        prop_assert_eq!(a == b, ia == ib);
    }

    #[test]
    fn prop_ids_display_parse_round_trip(bytes in any::<[u8; 32]>()) {
        let g = GroupId(bytes);
        let s = g.to_string();
        prop_assert_eq!(s.len(), 64);
        prop_assert_eq!(s.parse::<GroupId>().unwrap(), g);
        prop_assert_eq!(s.to_uppercase().parse::<GroupId>().unwrap(), g);
        prop_assert!(s.starts_with(&g.short()));
        prop_assert_eq!(g.short().len(), 8);
        let t = TopicId(bytes);
        prop_assert_eq!(t.to_string().parse::<TopicId>().unwrap(), t);
        let m = MessageId(bytes);
        prop_assert_eq!(m.to_string().parse::<MessageId>().unwrap(), m);
        prop_assert_eq!(GroupId::from_slice(&bytes), Some(g));
    }

    #[test]
    fn prop_id_parse_never_panics(s in ".{0,80}") {
        let _ = s.parse::<GroupId>();
    }
}

#[test]
fn id_parse_rejects_bad_text() {
    assert_eq!("".parse::<GroupId>(), Err(IdParseError::Length(0)));
    assert_eq!(
        "a".repeat(63).parse::<GroupId>(),
        Err(IdParseError::Length(63))
    );
    assert_eq!(
        "a".repeat(65).parse::<GroupId>(),
        Err(IdParseError::Length(65))
    );
    assert_eq!(
        format!("{}g", "a".repeat(63)).parse::<GroupId>(),
        Err(IdParseError::NotHex)
    );
    // 64 bytes but not 64 ASCII characters.
    assert_eq!(
        format!("{}é", "a".repeat(62)).parse::<GroupId>(),
        Err(IdParseError::NotHex)
    );
    assert_eq!(GroupId::from_slice(&[0; 31]), None);
    assert_eq!(GroupId::from_slice(&[0; 33]), None);
}

// ---------------------------------------------------------------------------------------------
// 2. Golden byte vectors
//
// WIRE FORMAT PINS. These bytes are what other nodes (possibly running older or newer builds)
// read off the network and what the store keeps on disk. If one of these assertions fails,
// the wire format changed: old and new nodes will no longer understand each other, and ids
// (MessageId = SHA-256 of the bytes), topic names and stored records change. Do not "fix"
// the expected hex; add a new version variant instead and keep decoding the old one.
//
// Layout reminder (bincode 2 standard config, serde mode): enum variant index and integers are
// little-endian varints (< 251: one byte; 251 = u16, 252 = u32, 253 = u64 follows), `[u8; 32]`
// is 32 raw bytes, `Vec<u8>` and `String` are a varint length then the bytes.
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_envelope_bytes() {
    let (bytes, id) = golden_envelope().encode().unwrap();
    // V1 = 00, group, epoch 07, PayloadKind::Commit = 00, MLS length 04 and bytes.
    let expected = format!("00{}070004deadbeef", rep("11", 32));
    assert_eq!(hex(&bytes), expected);
    assert_eq!(
        id.to_string(),
        "f29f35e7cd4b6ca2f06cd1a8f0305f2f05754e044857ba1d188fb512aaf43746",
        "MessageId of the golden envelope"
    );
}

#[test]
fn golden_app_content_bytes() {
    let bytes = codec::encode(&golden_app_content()).unwrap();
    // V1, sent_at_ms as u64 varint (fd + 8 bytes LE), Body::Text, len 6, "héllo".
    assert_eq!(hex(&bytes), "00fd0068e5cf8b010000000668c3a96c6c6f");
}

#[test]
fn golden_app_content_v3_bytes() {
    let with_id = AppContent::V3(AppContentV3 {
        seq: 300,
        id: Some(MessageId([0x44; 32])),
        sent_at_ms: 1_700_000_000_000,
        body: Body::Text("héllo".to_owned()),
    });
    // V3 = 02, seq 300 as u64 varint (fb + u16 LE), Some = 01 + 32-byte id, sent_at_ms,
    // Body::Text, len 6, "héllo".
    assert_eq!(
        hex(&codec::encode(&with_id).unwrap()),
        format!(
            "02fb2c0101{}fd0068e5cf8b010000000668c3a96c6c6f",
            rep("44", 32)
        )
    );
    // Invite bodies have no stable id: None = 00. seq 5 is one byte.
    let without = AppContent::V3(AppContentV3 {
        seq: 5,
        id: None,
        sent_at_ms: 5,
        body: Body::InviteRevoked(InviteId([0x77; 32])),
    });
    assert_eq!(
        hex(&codec::encode(&without).unwrap()),
        format!("02050005 02{}", rep("77", 32)).replace(' ', "")
    );
    // Older versions become V3 unchanged but for the position.
    assert_eq!(golden_app_content().at_seq(7).seq(), Some(7));
    assert_eq!(
        AppContent::decode(&codec::encode(&with_id).unwrap()).unwrap(),
        with_id
    );
}

#[test]
fn golden_resend_bodies_bytes() {
    let request = AppContent::V3(AppContentV3 {
        seq: 7,
        id: None,
        sent_at_ms: 5,
        body: Body::ResendRequest(vec![MessageId([0x11; 32])]),
    });
    // Body::ResendRequest = 04, one id (length 01), 32 bytes.
    assert_eq!(
        hex(&codec::encode(&request).unwrap()),
        format!("0207000504 01{}", rep("11", 32)).replace(' ', "")
    );
    let resent = AppContent::V3(AppContentV3 {
        seq: 8,
        id: Some(MessageId([0x44; 32])),
        sent_at_ms: 5,
        body: Body::Resent(Resent {
            epoch: 3,
            envelope: MessageId([0x22; 32]),
            text: "hi".to_owned(),
        }),
    });
    // Body::Resent = 05: the first epoch, the first envelope's id, the text.
    assert_eq!(
        hex(&codec::encode(&resent).unwrap()),
        format!("020801{}05 05 03{}026869", rep("44", 32), rep("22", 32)).replace(' ', "")
    );
    let sealed = AppContent::V3(AppContentV3 {
        seq: 9,
        id: Some(MessageId([0x44; 32])),
        sent_at_ms: 5,
        body: Body::SealedResent(SealedResent {
            epoch: 3,
            envelope: MessageId([0x22; 32]),
            nonce: [0x55; 12],
            sealed: vec![0xAA; 18],
        }),
    });
    // Body::SealedResent = 06: the first epoch, the first envelope's id, a 12-byte nonce (no
    // length), the sealed text with its length.
    assert_eq!(
        hex(&codec::encode(&sealed).unwrap()),
        format!(
            "020901{}05 06 03{}{} 12{}",
            rep("44", 32),
            rep("22", 32),
            rep("55", 12),
            rep("aa", 18)
        )
        .replace(' ', "")
    );
    for c in [request, resent, sealed] {
        assert_eq!(AppContent::decode(&codec::encode(&c).unwrap()).unwrap(), c);
    }
    // Out of bounds: no id, too many ids, a text over the limit.
    let bad = |body: Body| {
        AppContent::decode(
            &codec::encode(&AppContent::V1(AppContentV1 {
                sent_at_ms: 1,
                body,
            }))
            .unwrap(),
        )
    };
    assert!(bad(Body::ResendRequest(Vec::new())).is_err());
    assert!(
        bad(Body::ResendRequest(vec![
            MessageId([1; 32]);
            MAX_RESEND_REQUEST_IDS + 1
        ]))
        .is_err()
    );
    assert!(
        bad(Body::Resent(Resent {
            epoch: 0,
            envelope: MessageId([0; 32]),
            text: "x".repeat(MAX_TEXT_BYTES + 1),
        }))
        .is_err()
    );
}

#[test]
fn golden_join_request_bytes() {
    let bytes = codec::encode(&golden_join_request()).unwrap();
    let expected = format!(
        "00096b6974682d74657374{}{}03010203",
        rep("22", 32),
        rep("33", 32)
    );
    assert_eq!(hex(&bytes), expected);
}

#[test]
fn golden_join_response_bytes() {
    let bytes = codec::encode(&golden_join_accepted()).unwrap();
    // Accepted = 00, welcome len 3, group_name len 7 "friends".
    assert_eq!(hex(&bytes), "000309080707667269656e6473");
    for r in ALL_REJECTIONS {
        let bytes = codec::encode(&JoinResponse::Rejected(r)).unwrap();
        assert_eq!(bytes, vec![1, rejection_tag(r)], "{r:?}");
    }
}

#[test]
fn golden_payload_kind_tags() {
    let tags: Vec<u8> = ALL_KINDS
        .iter()
        .map(|k| {
            let bytes = codec::encode(k).unwrap();
            assert_eq!(bytes.len(), 1);
            bytes[0]
        })
        .collect();
    assert_eq!(tags, [0, 1, 2]);
}

#[test]
fn golden_invite_record_bytes() {
    // Stored on disk by every member (schema 3; the store migrates schema-2 records): a
    // change orphans every stored invite. Option = 00 (None) or 01 + value; bool = 00/01.
    let bytes = codec::encode(&golden_invite_record()).unwrap();
    let expected = format!(
        "{}{}01{}fc00d2496b0502fc00f15365000100",
        rep("44", 32),
        rep("77", 32),
        rep("66", 32)
    );
    assert_eq!(hex(&bytes), expected);
}

#[test]
fn golden_invite_bodies_and_approval_response() {
    // Body::InviteCreated = 01 after sent_at_ms; SharedInvite fields in order.
    let bytes = codec::encode(&golden_invite_created()).unwrap();
    let expected = format!("000501{}fc00d2496b0501", rep("66", 32));
    assert_eq!(hex(&bytes), expected);
    assert_eq!(AppContent::decode(&bytes).unwrap(), golden_invite_created());
    // Body::InviteRevoked = 02 and the invite id.
    let revoked = AppContent::V1(AppContentV1 {
        sent_at_ms: 5,
        body: Body::InviteRevoked(InviteId([0x77; 32])),
    });
    let bytes = codec::encode(&revoked).unwrap();
    assert_eq!(hex(&bytes), format!("000502{}", rep("77", 32)));
    // An invite allowing no joins (or too many) is refused when decoded.
    let mut zero = golden_invite_created();
    if let AppContent::V1(c) = &mut zero
        && let Body::InviteCreated(i) = &mut c.body
    {
        i.max_uses = 0;
    }
    assert_malformed(
        "zero uses",
        AppContent::decode(&codec::encode(&zero).unwrap()).map(drop),
    );
    // AwaitingApproval = 02 then the request id as a varint.
    let bytes = codec::encode(&JoinResponse::AwaitingApproval { request: 7 }).unwrap();
    assert_eq!(hex(&bytes), "0207");
    // The commit note naming an invite (the Add commit's AAD).
    let note = CommitNote::InviteUse(InviteId([0x77; 32])).encode();
    assert_eq!(hex(&note), format!("00{}", rep("77", 32)));
}

#[test]
fn golden_invite_id_and_rendezvous_key() {
    // Secret 55…55 (the golden link's), hash pinned in tests/invite.rs.
    let hash = kith_protocol::invite::secret_hash(&[0x55; 32]);
    assert_eq!(
        InviteId::of(&hash).to_string(),
        "e724b1d4ac8276085ff8e3768797bc1729e97ac6665ff6bcb1b7ef665be15363"
    );
    assert_eq!(
        hex(&invite_rendezvous_key("kith-test", &hash)),
        "c203b3e508ed29afe043591200ffab1da36a89e27eb574e29ac32283c0ee9bc9"
    );
    assert_ne!(
        invite_rendezvous_key("kith-test", &hash),
        InviteId::of(&hash).0
    );
}

#[test]
fn golden_topic_and_provider_key() {
    // Gossipsub topic names and DHT provider keys are part of the wire protocol too.
    let g = GroupId([0x44; 32]);
    let topic = "8fa6e2795b65b2cce969231e689be92ad062cee9bb5d3c71c46fda58afbbffea";
    assert_eq!(g.topic("kith-test").to_string(), topic);
    assert_eq!(
        g.topic("kith-test").topic_string(),
        format!("kith/g2/{topic}")
    );
    assert_eq!(
        hex(&g.provider_key("kith-test")),
        "75e2df841c8037b5f861ef0c479fc71770151d159105278a364e262ab502d20f"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Adversarial input
// ---------------------------------------------------------------------------------------------

fn assert_malformed(name: &str, result: Result<(), DecodeError>) {
    match result {
        Err(DecodeError::Malformed(msg)) => assert!(!msg.is_empty(), "{name}"),
        other => panic!("{name}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn every_truncation_is_malformed() {
    for (name, bytes, decode) in all_golden() {
        assert_eq!(decode(&bytes), Ok(()), "{name} decodes whole");
        for cut in 0..bytes.len() {
            assert_malformed(&format!("{name} cut at {cut}"), decode(&bytes[..cut]));
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    for (name, bytes, decode) in all_golden() {
        for extra in [&[0u8][..], &[0xff], &[1, 2, 3, 4, 5]] {
            let mut b = bytes.clone();
            b.extend_from_slice(extra);
            assert_eq!(
                decode(&b),
                Err(DecodeError::TrailingBytes(extra.len())),
                "{name} + {extra:?}"
            );
        }
    }
}

/// A bincode varint holding `v` as a full u64 (tag 253 then 8 bytes little-endian).
fn varint_u64(v: u64) -> Vec<u8> {
    let mut out = vec![253];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

#[test]
fn huge_length_prefixes_fail_cleanly() {
    for claim in [1u64 << 60, u64::MAX, (MAX_DECODE_BYTES as u64) + 1, 1 << 32] {
        // Envelope whose MLS payload claims `claim` bytes but carries four.
        let mut env = unhex("00");
        env.extend_from_slice(&[0x11; 32]);
        env.extend_from_slice(&[7, 0]);
        env.extend_from_slice(&varint_u64(claim));
        env.extend_from_slice(&[1, 2, 3, 4]);
        assert!(
            matches!(
                Envelope::decode(&env),
                Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
            ),
            "envelope claiming {claim}"
        );

        // Join request whose network string claims `claim` bytes.
        let mut req = vec![0];
        req.extend_from_slice(&varint_u64(claim));
        req.extend_from_slice(b"kith-test");
        assert_malformed(
            &format!("join request claiming {claim}"),
            JoinRequest::decode(&req).map(drop),
        );

        // Join response whose welcome claims `claim` bytes.
        let mut resp = vec![0];
        resp.extend_from_slice(&varint_u64(claim));
        resp.extend_from_slice(&[9; 16]);
        assert_malformed(
            &format!("join response claiming {claim}"),
            JoinResponse::decode(&resp).map(drop),
        );

        // App content whose text claims `claim` bytes.
        let mut app = vec![0, 5, 0];
        app.extend_from_slice(&varint_u64(claim));
        app.extend_from_slice(b"hi");
        assert_malformed(
            &format!("app content claiming {claim}"),
            AppContent::decode(&app).map(drop),
        );
    }
}

#[test]
fn u128_and_reserved_varint_tags_are_rejected() {
    // 254 announces a u128, 255 is reserved: neither is a valid length or tag.
    for tag in [254u8, 255] {
        let mut req = vec![0, tag];
        req.extend_from_slice(&[0xff; 16]);
        assert_malformed(
            &format!("len tag {tag}"),
            JoinRequest::decode(&req).map(drop),
        );
        let mut env = vec![tag];
        env.extend_from_slice(&[0; 48]);
        assert!(matches!(
            Envelope::decode(&env),
            Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
        ));
    }
}

#[test]
fn over_limit_inputs_are_too_large() {
    // The codec's hard ceiling applies whatever limit the caller passes.
    let huge = vec![0u8; MAX_DECODE_BYTES + 1];
    assert_eq!(
        codec::decode::<Envelope>(&huge, usize::MAX),
        Err(DecodeError::TooLarge {
            len: MAX_DECODE_BYTES + 1,
            limit: MAX_DECODE_BYTES,
        })
    );
    // The caller's smaller limit applies too.
    let (bytes, _) = golden_envelope().encode().unwrap();
    assert_eq!(
        codec::decode::<Envelope>(&bytes, bytes.len() - 1),
        Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: bytes.len() - 1,
        })
    );
    assert!(codec::decode::<Envelope>(&bytes, bytes.len()).is_ok());

    // Per-type limits, checked before any parsing.
    assert_eq!(
        Envelope::decode(&vec![0; MAX_ENVELOPE_BYTES + 1]),
        Err(EnvelopeError::Decode(DecodeError::TooLarge {
            len: MAX_ENVELOPE_BYTES + 1,
            limit: MAX_ENVELOPE_BYTES,
        }))
    );
    assert_eq!(
        JoinRequest::decode(&vec![0; MAX_JOIN_REQUEST_BYTES + 1]),
        Err(DecodeError::TooLarge {
            len: MAX_JOIN_REQUEST_BYTES + 1,
            limit: MAX_JOIN_REQUEST_BYTES,
        })
    );
    assert_eq!(
        JoinResponse::decode(&vec![0; MAX_JOIN_RESPONSE_BYTES + 1]),
        Err(DecodeError::TooLarge {
            len: MAX_JOIN_RESPONSE_BYTES + 1,
            limit: MAX_JOIN_RESPONSE_BYTES,
        })
    );
}

/// An envelope whose encoding is exactly `len` bytes.
fn envelope_of_encoded_len(len: usize) -> (Envelope, Vec<u8>) {
    let overhead = golden_envelope().encode().unwrap().0.len() - 4 - 1 + 5;
    let env = Envelope::new(
        GroupId([0x11; 32]),
        7,
        PayloadKind::Application,
        vec![0xaa; len - overhead],
    );
    let (bytes, _) = env.encode().unwrap();
    assert_eq!(bytes.len(), len);
    (env, bytes)
}

#[test]
fn envelope_size_limit_is_inclusive() {
    let (env, bytes) = envelope_of_encoded_len(MAX_ENVELOPE_BYTES);
    assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    let (_, bytes) = envelope_of_encoded_len(MAX_ENVELOPE_BYTES + 1);
    assert!(matches!(
        Envelope::decode(&bytes),
        Err(EnvelopeError::Decode(DecodeError::TooLarge { .. }))
    ));
}

#[test]
fn app_content_text_over_the_limit_is_too_large() {
    // Fits the byte limit (MAX_TEXT_BYTES + 64) but the text itself is one byte too long.
    let c = AppContent::V1(AppContentV1 {
        sent_at_ms: 0,
        body: Body::Text("x".repeat(MAX_TEXT_BYTES + 1)),
    });
    let bytes = codec::encode(&c).unwrap();
    assert!(bytes.len() <= MAX_TEXT_BYTES + 64);
    assert_eq!(
        AppContent::decode(&bytes),
        Err(DecodeError::TooLarge {
            len: MAX_TEXT_BYTES + 1,
            limit: MAX_TEXT_BYTES,
        })
    );
}

#[test]
fn invalid_utf8_is_malformed() {
    for bad in [
        &[0xffu8][..],
        &[0xc3],
        &[0xed, 0xa0, 0x80],
        &[b'a', 0x80, b'b'],
    ] {
        // Join request network.
        let mut req = vec![0, bad.len() as u8];
        req.extend_from_slice(bad);
        req.extend_from_slice(&[0x22; 32]);
        req.extend_from_slice(&[0x33; 32]);
        req.push(0);
        assert_malformed("join request network", JoinRequest::decode(&req).map(drop));

        // App content text.
        let mut app = vec![0, 0, 0, bad.len() as u8];
        app.extend_from_slice(bad);
        assert_malformed("app content text", AppContent::decode(&app).map(drop));

        // Accepted group name.
        let mut resp = vec![0, 0, bad.len() as u8];
        resp.extend_from_slice(bad);
        assert_malformed("group name", JoinResponse::decode(&resp).map(drop));
    }
}

#[test]
fn unknown_enum_tags_are_malformed() {
    let (env, _) = golden_envelope().encode().unwrap();

    // Envelope version tag 1 (no V2 yet), and a multi-byte varint tag.
    for tag in [vec![1u8], vec![250], vec![252, 0, 0, 0, 1]] {
        let mut b = tag.clone();
        b.extend_from_slice(&env[1..]);
        assert!(
            matches!(
                Envelope::decode(&b),
                Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
            ),
            "envelope tag {tag:?}"
        );
    }

    // PayloadKind 3 (offset: tag 1 + group 32 + epoch 1).
    let mut b = env.clone();
    b[34] = 3;
    assert!(matches!(
        Envelope::decode(&b),
        Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
    ));

    // AppContent version 2 is taken (V2); 2 is the first unassigned. Body tag 1.
    let app = codec::encode(&golden_app_content()).unwrap();
    let mut b = app.clone();
    b[0] = 2;
    assert_malformed("app content version", AppContent::decode(&b).map(drop));
    let mut b = app.clone();
    b[10] = 3;
    assert_malformed("body tag", AppContent::decode(&b).map(drop));

    // JoinRequest version 2 (V1 and Rejoin are taken).
    let mut b = codec::encode(&golden_join_request()).unwrap();
    b[0] = 2;
    assert_malformed("join request version", JoinRequest::decode(&b).map(drop));

    // JoinResponse tag 4, rejection tag 13 (the first unassigned ones).
    assert_malformed("join response tag", JoinResponse::decode(&[4]).map(drop));
    assert_malformed("join response tag", JoinResponse::decode(&[4, 0]).map(drop));
    assert_malformed("rejection tag", JoinResponse::decode(&[1, 13]).map(drop));
    assert_malformed("rejection tag", JoinResponse::decode(&[1, 250]).map(drop));
}

#[test]
fn non_canonical_varints_are_rejected() {
    // bincode's reader accepts over-long varints (7 as `fb 07 00`). If the codec let them
    // through, one envelope would have many byte strings, hence many MessageIds, and a relay
    // could re-inject a message under a fresh id. Exactly one encoding per value is accepted.
    let (env, _) = golden_envelope().encode().unwrap();

    // Epoch 7 as a u16 varint.
    let mut b = env[..33].to_vec();
    b.extend_from_slice(&[251, 7, 0]);
    b.extend_from_slice(&env[34..]);
    assert_malformed(
        "over-long epoch",
        Envelope::decode(&b).map(drop).map_err(|e| match e {
            EnvelopeError::Decode(d) => d,
        }),
    );

    // Version tag 0 as a u32 varint.
    let mut b = vec![252, 0, 0, 0, 0];
    b.extend_from_slice(&env[1..]);
    assert!(matches!(
        Envelope::decode(&b),
        Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
    ));

    // Payload length 4 as a u64 varint.
    let mut b = env[..35].to_vec();
    b.extend_from_slice(&varint_u64(4));
    b.extend_from_slice(&env[36..]);
    assert!(matches!(
        Envelope::decode(&b),
        Err(EnvelopeError::Decode(DecodeError::Malformed(_)))
    ));

    // Rejection tag as a u16 varint.
    assert_malformed(
        "over-long rejection tag",
        JoinResponse::decode(&[1, 251, 2, 0]).map(drop),
    );

    // Invite record max_uses 5 as a u32 varint.
    let rec = codec::encode(&golden_invite_record()).unwrap();
    let pos = 32 + 32 + 33 + 5; // after group, id, Some(secret_hash) and the 5-byte expires_at
    assert_eq!(rec[pos], 5);
    let mut b = rec[..pos].to_vec();
    b.extend_from_slice(&[252, 5, 0, 0, 0]);
    b.extend_from_slice(&rec[pos + 1..]);
    assert_malformed(
        "over-long max_uses",
        codec::decode::<InviteRecord>(&b, 1024).map(drop),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Random bytes never panic any decoder; whatever decodes re-encodes to the same bytes.
    #[test]
    fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = Envelope::decode(&bytes) {
            prop_assert_eq!(v.encode().unwrap().0, bytes.clone());
        }
        if let Ok(v) = AppContent::decode(&bytes) {
            prop_assert_eq!(codec::encode(&v).unwrap(), bytes.clone());
        }
        if let Ok(v) = JoinRequest::decode(&bytes) {
            prop_assert_eq!(codec::encode(&v).unwrap(), bytes.clone());
        }
        if let Ok(v) = JoinResponse::decode(&bytes) {
            prop_assert_eq!(codec::encode(&v).unwrap(), bytes.clone());
        }
        if let Ok(v) = codec::decode::<InviteRecord>(&bytes, 1024) {
            prop_assert_eq!(codec::encode(&v).unwrap(), bytes.clone());
        }
    }

    /// Corrupting a valid encoding (overwrite, insert or delete a byte) never panics, and any
    /// value that still decodes is the canonical reading of exactly those bytes.
    #[test]
    fn prop_mutated_encodings_never_panic(
        which in 0usize..13,
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        op in 0u8..3,
    ) {
        let golden = all_golden();
        let (_, mut bytes, decode) = golden[which % golden.len()].clone();
        let i = pos.index(bytes.len());
        match op {
            0 => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            _ => { bytes.remove(i); }
        }
        let _ = decode(&bytes);
        if let Ok(v) = JoinResponse::decode(&bytes) {
            prop_assert_eq!(codec::encode(&v).unwrap(), bytes.clone());
        }
        if let Ok(v) = Envelope::decode(&bytes) {
            prop_assert_eq!(v.encode().unwrap().0, bytes.clone());
        }
    }
}

/// Every chat message kind inside version-3 content, one golden value each (see
/// docs/PROTOCOL.md, "Chat messages").
fn golden_chats() -> Vec<(&'static str, AppContent)> {
    use kith_protocol::chat::{Chat, ChatV1};
    let m = MessageId([0x11; 32]);
    let s = MessageId([0x22; 32]);
    let peer = vec![0x00, 0x24, 0x08, 0x01];
    let wrap = |c: ChatV1| {
        AppContent::V3(AppContentV3 {
            seq: 1,
            id: Some(MessageId([0x44; 32])),
            sent_at_ms: 2,
            body: Body::Chat(Chat::V1(c)),
        })
    };
    vec![
        (
            "reply",
            wrap(ChatV1::Reply {
                to: m,
                text: "ok".into(),
            }),
        ),
        (
            "react",
            wrap(ChatV1::React {
                to: m,
                emoji: "👍".into(),
                on: true,
            }),
        ),
        (
            "edit",
            wrap(ChatV1::Edit {
                target: m,
                stable: s,
                text: "ok!".into(),
            }),
        ),
        (
            "delete",
            wrap(ChatV1::Delete {
                target: m,
                stable: s,
            }),
        ),
        ("receipt", wrap(ChatV1::Receipt { up_to: m })),
        ("typing", wrap(ChatV1::Typing)),
        ("direct", wrap(ChatV1::Direct { with: peer })),
    ]
}

#[test]
fn golden_chat_bytes() {
    let head = format!("0201 01{} 02 07 00", rep("44", 32)).replace(' ', "");
    let m = rep("11", 32);
    let s = rep("22", 32);
    // After the V3 head (seq 1, Some(id), sent_at_ms 2), Body::Chat = 07, Chat::V1 = 00,
    // then the ChatV1 variant index and its fields.
    let want = [
        format!("00{m}026f6b"),
        format!("01{m}04f09f918d01"),
        format!("02{m}{s}036f6b21"),
        format!("03{m}{s}"),
        format!("06{m}"),
        "07".to_owned(),
        "080400240801".to_owned(),
    ];
    for ((name, content), tail) in golden_chats().into_iter().zip(want) {
        let bytes = codec::encode(&content).unwrap();
        assert_eq!(hex(&bytes), format!("{head}{tail}"), "{name}");
        // Direct names a PeerId that is not valid: refused as content, typed.
        match AppContent::decode(&bytes) {
            Ok(back) => assert_eq!(back, content, "{name}"),
            Err(e) => {
                assert_eq!(name, "direct", "{name}: {e}");
                assert!(matches!(e, DecodeError::Malformed(_)));
            }
        }
        // Every strict prefix is a typed error, never a panic.
        for cut in 0..bytes.len() {
            assert!(
                AppContent::decode(&bytes[..cut]).is_err(),
                "{name} cut at {cut}"
            );
        }
    }
}

#[test]
fn chat_messages_out_of_bounds_are_refused_as_content() {
    use kith_protocol::chat::{Chat, ChatV1, MAX_EMOJI_BYTES, MAX_PROFILES};
    let wrap = |c: ChatV1| {
        codec::encode(&AppContent::V3(AppContentV3 {
            seq: 1,
            id: Some(MessageId([1; 32])),
            sent_at_ms: 2,
            body: Body::Chat(Chat::V1(c)),
        }))
        .unwrap()
    };
    let m = MessageId([3; 32]);
    for (what, bytes) in [
        (
            "long emoji",
            wrap(ChatV1::React {
                to: m,
                emoji: "x".repeat(MAX_EMOJI_BYTES + 1),
                on: true,
            }),
        ),
        (
            "emoji with a space",
            wrap(ChatV1::React {
                to: m,
                emoji: "a b".into(),
                on: true,
            }),
        ),
        (
            "empty reply",
            wrap(ChatV1::Reply {
                to: m,
                text: String::new(),
            }),
        ),
        (
            "long edit",
            wrap(ChatV1::Edit {
                target: m,
                stable: m,
                text: "x".repeat(MAX_TEXT_BYTES + 1),
            }),
        ),
        ("no profiles", wrap(ChatV1::Profiles(Vec::new()))),
        ("long peer", wrap(ChatV1::Direct { with: vec![0; 65] })),
    ] {
        assert!(AppContent::decode(&bytes).is_err(), "{what} was accepted");
    }
    let _ = MAX_PROFILES;
}

#[test]
fn golden_signed_profile_bytes() {
    use kith_protocol::chat::{Profile, ProfileV1, SignedProfile};
    let key = kith_protocol::Keypair::ed25519_from_bytes([1; 32]).unwrap();
    let p = SignedProfile::sign(
        Profile::V1(ProfileV1 {
            version: 1,
            name: "Alice".into(),
            avatar: None,
        }),
        &key,
    )
    .unwrap();
    let bytes = p.encode().unwrap();
    // Profile::V1 = 00, version 01, name len 05 "Alice", avatar None = 00; key len 0x20 and
    // the 32-byte public key; signature len 0x40 and 64 bytes (ed25519 is deterministic).
    assert_eq!(
        hex(&bytes),
        "000105416c69636500208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\
         4050e7823ba1158b8980a8d87c18503634789dcd2de081999854234ac6327b5bf45091ee8a4ef7f970\
         63d607c89671d92b88b8f33dca2c33c07197f10d2b64bf08"
    );
    assert_eq!(
        SignedProfile::decode(&bytes).unwrap().1,
        key.public().to_peer_id()
    );
    // One flipped bit anywhere is a typed refusal.
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        assert!(
            SignedProfile::decode(&bad).is_err(),
            "bit flip at {i} accepted"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// The sample file of the file golden vectors: 40,000 bytes `i % 251`, in 16 KiB chunks
/// (three: 16384, 16384, 7232 bytes), sealed under the key `07`×32.
fn golden_file() -> (kith_protocol::files::Layout, Vec<Vec<u8>>) {
    use kith_protocol::files::{Layout, MIN_CHUNK_BYTES, seal_chunk};
    let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let layout = Layout::new(data.len() as u64, MIN_CHUNK_BYTES).unwrap();
    let chunks = (0..layout.chunks())
        .map(|i| {
            let start = layout.offset(i) as usize;
            let mut buf = data[start..start + layout.plain_len(i) as usize].to_vec();
            seal_chunk(&[7; 32], &layout, i, &mut buf).unwrap();
            buf
        })
        .collect();
    (layout, chunks)
}

#[test]
fn golden_file_chunks_leaves_and_id() {
    use kith_protocol::files::{check_manifest, leaf, open_chunk, root};
    let (layout, chunks) = golden_file();
    assert_eq!(
        chunks.iter().map(Vec::len).collect::<Vec<_>>(),
        [16400, 16400, 7248]
    );
    // The first 16 sealed bytes and the tag of chunk 0 pin the cipher, key, nonce and AAD.
    assert_eq!(hex(&chunks[0][..16]), GOLDEN_CHUNK0_HEAD);
    assert_eq!(hex(&chunks[0][16384..]), GOLDEN_CHUNK0_TAG);
    let leaves: Vec<[u8; 32]> = chunks.iter().map(|c| leaf(c)).collect();
    assert_eq!(hex(&leaves[0]), GOLDEN_LEAF0);
    let id = root(&layout, &leaves);
    assert_eq!(id.to_string(), GOLDEN_FILE_ID);
    check_manifest(&id, &layout, &leaves).unwrap();
    let mut last = chunks[2].clone();
    open_chunk(&[7; 32], &layout, 2, &mut last).unwrap();
    assert_eq!(last[0], (32768 % 251) as u8);
}

#[test]
fn golden_file_messages() {
    use kith_protocol::chat::{Chat, ChatV1, ImageFormat};
    use kith_protocol::files::{
        CHUNK_BYTES, FileRef, FileRequest, FileRequestV1, FileResponse, FileResponseV1, FileWant,
        ImageInfo, Thumbnail,
    };
    use kith_protocol::ids::FileId;
    let file = FileRef {
        id: FileId([0x11; 32]),
        key: [0x22; 32],
        size: 300_000,
        chunk_bytes: CHUNK_BYTES,
        name: "a.png".into(),
        mime: "image/png".into(),
        image: Some(ImageInfo {
            width: 640,
            height: 480,
            thumb: Some(Thumbnail {
                format: ImageFormat::Png,
                width: 4,
                height: 3,
                bytes: b"\x89PNG\r\n\x1a\n".to_vec(),
            }),
        }),
        caption: "hi".into(),
    };
    let content = AppContent::V3(AppContentV3 {
        seq: 1,
        id: Some(MessageId([0x44; 32])),
        sent_at_ms: 2,
        body: Body::Chat(Chat::V1(ChatV1::File(Box::new(file)))),
    });
    let bytes = codec::encode(&content).unwrap();
    let head = format!("0201 01{} 02 07 00", rep("44", 32)).replace(' ', "");
    // ChatV1::File = 0a, then id, key, size 300000 (fc e0 93 04 00 = u32 varint), chunk
    // bytes 262144 (fc 00 00 04 00), name, mime, Some(image) with 640 and 480 (u16 varints
    // fb ..), Some(thumb): Png = 00, 4, 3, 8 bytes; caption.
    let tail = format!(
        "0a{}{}fce0930400fc00000400{}{}01fb8002fbe00101000403{}{}",
        rep("11", 32),
        rep("22", 32),
        "05612e706e67",
        "09696d6167652f706e67",
        "0889504e470d0a1a0a",
        "026869"
    );
    assert_eq!(hex(&bytes), format!("{head}{tail}"));
    assert_eq!(AppContent::decode(&bytes).unwrap(), content);
    for cut in 0..bytes.len() {
        assert!(AppContent::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }

    let request = FileRequest::V1(FileRequestV1 {
        group: GroupId([0x33; 32]),
        file: FileId([0x11; 32]),
        want: FileWant::Chunk(5),
    });
    let bytes = request.encode().unwrap();
    assert_eq!(
        hex(&bytes),
        format!("00{}{}0205", rep("33", 32), rep("11", 32))
    );
    assert_eq!(FileRequest::decode(&bytes).unwrap(), request);
    let have = FileResponse::V1(FileResponseV1::Have(vec![0x07]));
    assert_eq!(hex(&have.encode().unwrap()), "00000107");
    let busy = FileResponse::V1(FileResponseV1::Busy);
    assert_eq!(hex(&busy.encode().unwrap()), "0005");
    for bytes in [have.encode().unwrap(), busy.encode().unwrap()] {
        FileResponse::decode(&bytes).unwrap();
    }
}

const GOLDEN_CHUNK0_HEAD: &str = "37852b0f646e02fac87b0e0bc56ced69";
const GOLDEN_CHUNK0_TAG: &str = "b51f4f671c2f6bf344e4007e5d4ceb03";
const GOLDEN_LEAF0: &str = "15614407a511ea6c9ae8489154013a01111fc1a18a7c03bd1634eb0b3f7650ea";
const GOLDEN_FILE_ID: &str = "9fa2c901a7f15e528f5e0cc1d792fa25d63829b7cf93abe13f44d37fff3aae18";
