//! Member verification: safety numbers, their QR payload, and the local marks a user sets
//! after comparing them.
//!
//! A member's identity is its node's Ed25519 key (the PeerId is derived from it and the MLS
//! leaf's signature key is the same key). Two members compare a **safety number** computed
//! from both keys: the same 60 digits on both sides, whoever computes it. Having compared it,
//! a user marks the member verified; the mark ([`VerifyMark`]) stays on this node only and is
//! never sent. It records the verified key, so a member whose key is not that key loses the
//! mark ([`key_mismatches`]); and it records the member's name when one is known, so the same
//! person showing up under a new key (a new install: a new PeerId) is noticed too
//! ([`key_changes`]). docs/PROTOCOL.md, "Member verification", is the reference.
//!
//! Everything here is pure: no IO, no clock (times come in as arguments).

use libp2p_identity::{PeerId, PublicKey, ed25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use crate::codec;

/// The version byte hashed into every fingerprint; a new algorithm gets a new version.
pub const SAFETY_NUMBER_VERSION: u8 = 1;
/// SHA-512 rounds per fingerprint (after the first hash): slows down a search for a key
/// whose number looks like someone else's.
pub const FINGERPRINT_ROUNDS: u32 = 5200;
/// Digits of one member's fingerprint (6 groups of 5).
pub const FINGERPRINT_DIGITS: usize = 30;
/// Digits of a safety number (two fingerprints, 12 groups of 5).
pub const SAFETY_NUMBER_DIGITS: usize = 2 * FINGERPRINT_DIGITS;
/// Length of an Ed25519 public key.
pub const KEY_BYTES: usize = 32;
/// The scheme of a QR payload: `kith-verify:1:<digits>:<peer>:<peer>`.
pub const QR_PREFIX: &str = "kith-verify";
/// The QR payload version this code writes and reads.
pub const QR_VERSION: u32 = 1;
/// Longest QR payload accepted (after trimming whitespace); a version 1 payload of two
/// Ed25519 PeerIds is 180 characters.
pub const MAX_QR_PAYLOAD_CHARS: usize = 256;
/// Longest name recorded with a mark, in bytes (after trimming).
pub const MAX_MARK_NAME_BYTES: usize = 128;
/// Longest stored mark record accepted when decoding.
pub const MAX_MARK_RECORD_BYTES: usize = 512;
/// Most marks one node keeps.
pub const MAX_MARKS: u64 = 10_000;

/// Why a safety number could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetyNumberError {
    /// The key is not a 32-byte Ed25519 public key.
    #[error("the key of {peer} is not an Ed25519 public key")]
    BadKey {
        /// The member whose key it is.
        peer: PeerId,
    },
    /// The key does not belong to the PeerId given with it.
    #[error("the key given for {peer} is another peer's")]
    KeyNotPeer {
        /// The member named.
        peer: PeerId,
    },
    /// Both sides are the same member: there is nothing to compare.
    #[error("a safety number needs two different members")]
    SameMember,
}

/// A member's 30-digit fingerprint: SHA-512 over `version ‖ key ‖ PeerId bytes`, then
/// [`FINGERPRINT_ROUNDS`] times SHA-512 over `version ‖ key ‖ previous digest`; the first 30
/// bytes of the last digest give 6 groups of 5 digits (5 bytes big-endian mod 100 000 each).
pub fn fingerprint(peer: &PeerId, key: &[u8; KEY_BYTES]) -> String {
    let mut digest = Sha512::new()
        .chain_update([SAFETY_NUMBER_VERSION])
        .chain_update(key)
        .chain_update(peer.to_bytes())
        .finalize();
    for _ in 0..FINGERPRINT_ROUNDS {
        digest = Sha512::new()
            .chain_update([SAFETY_NUMBER_VERSION])
            .chain_update(key)
            .chain_update(digest)
            .finalize();
    }
    let mut out = String::with_capacity(FINGERPRINT_DIGITS);
    for chunk in digest[..30].chunks_exact(5) {
        let n = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&format!("{:05}", n % 100_000));
    }
    out
}

/// The 32 key bytes, checked to be an Ed25519 key of `peer`.
fn checked_key(peer: &PeerId, key: &[u8]) -> Result<[u8; KEY_BYTES], SafetyNumberError> {
    let bytes: [u8; KEY_BYTES] = key
        .try_into()
        .map_err(|_| SafetyNumberError::BadKey { peer: *peer })?;
    let public = ed25519::PublicKey::try_from_bytes(&bytes)
        .map_err(|_| SafetyNumberError::BadKey { peer: *peer })?;
    if PublicKey::from(public).to_peer_id() != *peer {
        return Err(SafetyNumberError::KeyNotPeer { peer: *peer });
    }
    Ok(bytes)
}

/// The Ed25519 public key inside an Ed25519 PeerId (whose multihash is the identity hash of
/// the encoded key), if it is one.
pub fn peer_key(peer: &PeerId) -> Option<[u8; KEY_BYTES]> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return None;
    }
    let public = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    let ed = public.try_into_ed25519().ok()?;
    Some(ed.to_bytes())
}

/// The safety number of two members: both fingerprints, the smaller first, so both members
/// compute the same 60 digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
    peers: [PeerId; 2],
}

impl SafetyNumber {
    /// The safety number of `a` and `b`, each a PeerId with its Ed25519 public key (the MLS
    /// leaf's signature key). Order does not matter.
    pub fn new(a: (PeerId, &[u8]), b: (PeerId, &[u8])) -> Result<SafetyNumber, SafetyNumberError> {
        if a.0 == b.0 {
            return Err(SafetyNumberError::SameMember);
        }
        let fa = fingerprint(&a.0, &checked_key(&a.0, a.1)?);
        let fb = fingerprint(&b.0, &checked_key(&b.0, b.1)?);
        // Equal fingerprints would need a SHA-512 collision; the PeerIds still order them.
        let (first, second) = if (fa.as_str(), a.0.to_bytes()) <= (fb.as_str(), b.0.to_bytes()) {
            ((fa, a.0), (fb, b.0))
        } else {
            ((fb, b.0), (fa, a.0))
        };
        Ok(SafetyNumber {
            digits: format!("{}{}", first.0, second.0),
            peers: [first.1, second.1],
        })
    }

    /// The 60 digits, without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// The two members, in the order of their fingerprints in the number.
    pub fn peers(&self) -> [PeerId; 2] {
        self.peers
    }

    /// The number as people read it: 3 lines of 4 groups of 5 digits.
    pub fn lines(&self) -> Vec<String> {
        group_digits(&self.digits)
    }

    /// The QR payload: `kith-verify:1:<60 digits>:<first PeerId>:<second PeerId>`.
    pub fn qr_payload(&self) -> String {
        format!(
            "{QR_PREFIX}:{QR_VERSION}:{}:{}:{}",
            self.digits, self.peers[0], self.peers[1]
        )
    }

    /// Compares a payload scanned from the other member's screen with this number.
    pub fn compare(&self, scanned: &VerifyPayload) -> Comparison {
        VerifyPayload {
            digits: self.digits.clone(),
            peers: self.peers,
        }
        .compare(scanned)
    }
}

fn sorted(mut peers: [PeerId; 2]) -> [PeerId; 2] {
    peers.sort();
    peers
}

/// Digits in groups of 5, four groups per line (a 60-digit safety number is 3 lines).
pub fn group_digits(digits: &str) -> Vec<String> {
    let groups: Vec<&str> = digits
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    groups.chunks(4).map(|line| line.join(" ")).collect()
}

/// What comparing a scanned payload found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Same members, same number: the keys are the ones both sides see.
    Match,
    /// Same members, another number: one side sees another key (do not mark verified).
    Different,
    /// The payload is about another pair of members.
    OtherMembers,
}

/// A parsed QR payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPayload {
    /// The 60 digits.
    pub digits: String,
    /// The two members, as written.
    pub peers: [PeerId; 2],
}

/// Why a QR payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Longer than [`MAX_QR_PAYLOAD_CHARS`].
    #[error("the payload is {len} characters; at most {limit} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// It does not start with `kith-verify:`.
    #[error("not a Kith verification code (it should start with `{QR_PREFIX}:`)")]
    NotKith,
    /// A version this code does not read.
    #[error(
        "verification code version {0} is not supported (this node reads version {QR_VERSION})"
    )]
    Version(String),
    /// Not five `:`-separated fields.
    #[error("a verification code has 5 fields separated by `:`, this one has {0}")]
    Fields(usize),
    /// The number is not 60 decimal digits.
    #[error("the safety number in the code is not {SAFETY_NUMBER_DIGITS} digits")]
    Digits,
    /// A member field is not a PeerId.
    #[error("'{0}' in the code is not a peer id")]
    Peer(String),
}

impl VerifyPayload {
    /// Compares this payload (this node's) with one scanned from the other member's
    /// screen: the same two members (in any order) and the same digits is a match.
    pub fn compare(&self, scanned: &VerifyPayload) -> Comparison {
        if sorted(scanned.peers) != sorted(self.peers) {
            Comparison::OtherMembers
        } else if scanned.digits != self.digits {
            Comparison::Different
        } else {
            Comparison::Match
        }
    }

    /// Parses a payload written by [`SafetyNumber::qr_payload`] (surrounding whitespace is
    /// ignored; spaces inside the digits are not accepted).
    pub fn parse(text: &str) -> Result<VerifyPayload, PayloadError> {
        let text = text.trim();
        let len = text.chars().count();
        if len > MAX_QR_PAYLOAD_CHARS {
            return Err(PayloadError::TooLong {
                len,
                limit: MAX_QR_PAYLOAD_CHARS,
            });
        }
        let fields: Vec<&str> = text.split(':').collect();
        if fields.first() != Some(&QR_PREFIX) {
            return Err(PayloadError::NotKith);
        }
        match fields.get(1) {
            Some(v) if *v == QR_VERSION.to_string() => {}
            Some(v) => return Err(PayloadError::Version((*v).to_owned())),
            None => return Err(PayloadError::Fields(fields.len())),
        }
        let [_, _, digits, a, b] = fields.as_slice() else {
            return Err(PayloadError::Fields(fields.len()));
        };
        if digits.len() != SAFETY_NUMBER_DIGITS || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(PayloadError::Digits);
        }
        let peer = |s: &str| {
            s.parse::<PeerId>()
                .map_err(|_| PayloadError::Peer(s.chars().take(60).collect()))
        };
        Ok(VerifyPayload {
            digits: (*digits).to_owned(),
            peers: [peer(a)?, peer(b)?],
        })
    }
}

/// A member this node's user verified: the key compared and, if known, the member's name.
/// Stored locally only (the node's `verify_marks` table, keyed by PeerId).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyMark {
    /// The member.
    pub peer: PeerId,
    /// Its Ed25519 public key when it was verified.
    pub key: [u8; KEY_BYTES],
    /// Its display name when it was verified, if known (trimmed, 1 to
    /// [`MAX_MARK_NAME_BYTES`] bytes).
    pub name: Option<String>,
    /// When it was verified, milliseconds since the Unix epoch.
    pub verified_at_ms: u64,
    /// When this node found the member with another key and dropped the mark. A lost mark
    /// is kept (so the user keeps being told) until the member is verified again or the
    /// mark is removed; it counts as not verified.
    pub lost_at_ms: Option<u64>,
}

/// The stored form of a [`VerifyMark`] (the PeerId is the table key). Versioned: a new
/// layout is a new variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum MarkRecord {
    V1 {
        key: [u8; KEY_BYTES],
        name: Option<String>,
        verified_at_ms: u64,
        lost_at_ms: Option<u64>,
    },
}

/// Why a mark could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// The record is longer than [`MAX_MARK_RECORD_BYTES`].
    #[error("mark record of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a mark record.
    #[error("malformed mark record: {0}")]
    Malformed(#[from] codec::DecodeError),
    /// The name is empty or longer than [`MAX_MARK_NAME_BYTES`].
    #[error("a verified member's name must be 1 to {MAX_MARK_NAME_BYTES} bytes")]
    BadName,
    /// The encoder failed (cannot happen for a valid mark).
    #[error("cannot encode the mark: {0}")]
    Encode(String),
}

impl VerifyMark {
    /// A new mark for `peer` with `key`, verified at `now_ms`. `name` is trimmed; an empty
    /// one is no name.
    pub fn new(
        peer: PeerId,
        key: [u8; KEY_BYTES],
        name: Option<&str>,
        now_ms: u64,
    ) -> Result<VerifyMark, MarkError> {
        let name = name.map(str::trim).filter(|n| !n.is_empty());
        if name.is_some_and(|n| n.len() > MAX_MARK_NAME_BYTES) {
            return Err(MarkError::BadName);
        }
        Ok(VerifyMark {
            peer,
            key,
            name: name.map(str::to_owned),
            verified_at_ms: now_ms,
            lost_at_ms: None,
        })
    }

    /// Whether the mark still counts: not lost, and made for `key`.
    pub fn holds_for(&self, key: &[u8]) -> bool {
        self.lost_at_ms.is_none() && self.key.as_slice() == key
    }

    /// The stored bytes (see docs/PROTOCOL.md, "Member verification").
    pub fn encode(&self) -> Result<Vec<u8>, MarkError> {
        if self
            .name
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > MAX_MARK_NAME_BYTES)
        {
            return Err(MarkError::BadName);
        }
        let record = MarkRecord::V1 {
            key: self.key,
            name: self.name.clone(),
            verified_at_ms: self.verified_at_ms,
            lost_at_ms: self.lost_at_ms,
        };
        let bytes = codec::encode(&record).map_err(|e| MarkError::Encode(e.to_string()))?;
        if bytes.len() > MAX_MARK_RECORD_BYTES {
            return Err(MarkError::TooLarge {
                len: bytes.len(),
                limit: MAX_MARK_RECORD_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes the stored bytes of `peer`'s mark; anything else is a typed error.
    pub fn decode(peer: PeerId, bytes: &[u8]) -> Result<VerifyMark, MarkError> {
        if bytes.len() > MAX_MARK_RECORD_BYTES {
            return Err(MarkError::TooLarge {
                len: bytes.len(),
                limit: MAX_MARK_RECORD_BYTES,
            });
        }
        let MarkRecord::V1 {
            key,
            name,
            verified_at_ms,
            lost_at_ms,
        } = codec::decode(bytes, MAX_MARK_RECORD_BYTES)?;
        if name
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > MAX_MARK_NAME_BYTES)
        {
            return Err(MarkError::BadName);
        }
        Ok(VerifyMark {
            peer,
            key,
            name,
            verified_at_ms,
            lost_at_ms,
        })
    }
}

/// Why a member's verification no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChangeReason {
    /// The member (same PeerId) now has another key than the verified one: the mark is
    /// dropped. (Kith binds a PeerId to its key, so this means a damaged or tampered store
    /// or group state; checked anyway.)
    KeyMismatch,
    /// A member with the name recorded in a mark has another PeerId (a new key): the person
    /// may have come back with a new install, or someone uses their name. The mark does not
    /// carry over; the user should verify the new key.
    NewKeySameName,
}

impl KeyChangeReason {
    /// The API's and event's `reason` value.
    pub fn label(self) -> &'static str {
        match self {
            KeyChangeReason::KeyMismatch => "key_mismatch",
            KeyChangeReason::NewKeySameName => "same_name_new_key",
        }
    }
}

/// A member whose key is not the one its user verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The member as it is now.
    pub peer: PeerId,
    /// The PeerId that was verified (equal to `peer` for [`KeyChangeReason::KeyMismatch`]).
    pub verified_peer: PeerId,
    /// The name recorded with the mark.
    pub name: Option<String>,
    /// What changed.
    pub reason: KeyChangeReason,
}

impl KeyChange {
    /// The line told to the user.
    pub fn message(&self) -> String {
        let who = self
            .name
            .as_deref()
            .map_or_else(|| self.peer.to_string(), |n| format!("'{n}'"));
        match self.reason {
            KeyChangeReason::KeyMismatch => format!(
                "the key of {who} is not the key you verified; the mark was removed, compare the safety number again"
            ),
            KeyChangeReason::NewKeySameName => format!(
                "{who} now uses a new key ({}; you verified {}); compare the safety number again before trusting it",
                self.peer, self.verified_peer
            ),
        }
    }
}

/// The marks that no longer hold because their member's current key (the MLS leaf's
/// signature key, `members`: PeerId and key) differs from the verified key. Lost marks are
/// not reported again.
pub fn key_mismatches(marks: &[VerifyMark], members: &[(PeerId, &[u8])]) -> Vec<KeyChange> {
    members
        .iter()
        .filter_map(|(peer, key)| {
            let mark = marks
                .iter()
                .find(|m| m.peer == *peer && m.lost_at_ms.is_none())?;
            (mark.key.as_slice() != *key).then(|| KeyChange {
                peer: *peer,
                verified_peer: *peer,
                name: mark.name.clone(),
                reason: KeyChangeReason::KeyMismatch,
            })
        })
        .collect()
}

/// The members (`members`: PeerId and display name, if known) whose display name equals the
/// name recorded with a mark (that still holds) of **another** PeerId: the person came back
/// under a new key, or someone took their name. Names are compared after trimming, exactly.
/// A member that is itself verified (a holding mark of its own) is not reported; at most one
/// report per member (the first such mark in `marks` order).
pub fn key_changes(marks: &[VerifyMark], members: &[(PeerId, Option<&str>)]) -> Vec<KeyChange> {
    members
        .iter()
        .filter_map(|(peer, name)| {
            let name = name.map(str::trim).filter(|n| !n.is_empty())?;
            if marks
                .iter()
                .any(|m| m.peer == *peer && m.lost_at_ms.is_none())
            {
                return None;
            }
            let mark = marks.iter().find(|m| {
                m.peer != *peer && m.lost_at_ms.is_none() && m.name.as_deref() == Some(name)
            })?;
            Some(KeyChange {
                peer: *peer,
                verified_peer: mark.peer,
                name: Some(name.to_owned()),
                reason: KeyChangeReason::NewKeySameName,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    fn member(seed: u8) -> (PeerId, [u8; KEY_BYTES]) {
        let kp = Keypair::ed25519_from_bytes([seed; 32]).unwrap();
        let key = kp.public().try_into_ed25519().unwrap().to_bytes();
        (kp.public().to_peer_id(), key)
    }

    fn number(a: u8, b: u8) -> SafetyNumber {
        let (pa, ka) = member(a);
        let (pb, kb) = member(b);
        SafetyNumber::new((pa, &ka), (pb, &kb)).unwrap()
    }

    /// The golden vector of docs/PROTOCOL.md: secret keys 01…01 and 02…02.
    #[test]
    fn golden_safety_number() {
        let (p1, k1) = member(1);
        let (p2, k2) = member(2);
        assert_eq!(
            hex(&k1),
            "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
        );
        assert_eq!(
            hex(&k2),
            "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
        );
        assert_eq!(
            p1.to_string(),
            "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"
        );
        assert_eq!(
            p2.to_string(),
            "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
        );
        assert_eq!(fingerprint(&p1, &k1), "566608341334226784924841956557");
        assert_eq!(fingerprint(&p2, &k2), "783557371825351084659749104249");
        let n = number(1, 2);
        assert_eq!(
            n.digits(),
            "566608341334226784924841956557783557371825351084659749104249"
        );
        assert_eq!(
            n.lines(),
            vec![
                "56660 83413 34226 78492",
                "48419 56557 78355 73718",
                "25351 08465 97491 04249"
            ]
        );
        assert_eq!(
            n.qr_payload(),
            "kith-verify:1:566608341334226784924841956557783557371825351084659749104249:\
             12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5:\
             12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn both_sides_compute_the_same_number() {
        for (a, b) in [(1, 2), (3, 9), (200, 7)] {
            let n = number(a, b);
            assert_eq!(n, number(b, a));
            assert_eq!(n.digits().len(), SAFETY_NUMBER_DIGITS);
            assert!(n.digits().bytes().all(|c| c.is_ascii_digit()));
            let lines = n.lines();
            assert_eq!(lines.len(), 3);
            assert!(lines.iter().all(|l| l.len() == 4 * 5 + 3), "{lines:?}");
        }
        assert_ne!(number(1, 2), number(1, 3));
    }

    #[test]
    fn bad_keys_are_typed_errors() {
        let (p1, k1) = member(1);
        let (p2, k2) = member(2);
        assert_eq!(
            SafetyNumber::new((p1, &k1), (p1, &k1)),
            Err(SafetyNumberError::SameMember)
        );
        assert_eq!(
            SafetyNumber::new((p1, &k1), (p2, &k1)),
            Err(SafetyNumberError::KeyNotPeer { peer: p2 })
        );
        assert_eq!(
            SafetyNumber::new((p1, &k1[..31]), (p2, &k2)),
            Err(SafetyNumberError::BadKey { peer: p1 })
        );
        assert_eq!(peer_key(&p1), Some(k1));
    }

    #[test]
    fn qr_payload_round_trips_and_compares() {
        let n = number(1, 2);
        let scanned = VerifyPayload::parse(&format!("  {}\n", n.qr_payload())).unwrap();
        assert_eq!(scanned.digits, n.digits());
        assert_eq!(n.compare(&scanned), Comparison::Match);
        // The other side's payload is the same string.
        assert_eq!(number(2, 1).qr_payload(), n.qr_payload());
        let mut wrong = scanned.clone();
        wrong
            .digits
            .replace_range(0..1, if &wrong.digits[..1] == "0" { "1" } else { "0" });
        assert_eq!(n.compare(&wrong), Comparison::Different);
        assert_eq!(number(1, 3).compare(&scanned), Comparison::OtherMembers);
    }

    #[test]
    fn bad_qr_payloads_are_typed_errors() {
        let n = number(1, 2);
        let [a, b] = n.peers();
        let d = n.digits();
        let cases = [
            (format!("x{}", n.qr_payload()), PayloadError::NotKith),
            ("kith-verify".to_owned(), PayloadError::Fields(1)),
            (
                format!("kith-verify:2:{d}:{a}:{b}"),
                PayloadError::Version("2".into()),
            ),
            (format!("kith-verify:1:{d}:{a}"), PayloadError::Fields(4)),
            (
                format!("kith-verify:1:{d}:{a}:{b}:x"),
                PayloadError::Fields(6),
            ),
            (
                format!("kith-verify:1:{}:{a}:{b}", &d[1..]),
                PayloadError::Digits,
            ),
            (
                format!("kith-verify:1:{}x:{a}:{b}", &d[1..]),
                PayloadError::Digits,
            ),
            (
                format!("kith-verify:1:{d}:{a}:nope"),
                PayloadError::Peer("nope".into()),
            ),
            (
                "k".repeat(MAX_QR_PAYLOAD_CHARS + 1),
                PayloadError::TooLong {
                    len: MAX_QR_PAYLOAD_CHARS + 1,
                    limit: MAX_QR_PAYLOAD_CHARS,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(VerifyPayload::parse(&text), Err(want), "{text}");
        }
    }

    #[test]
    fn marks_round_trip_and_bad_records_are_typed_errors() {
        let (p, k) = member(1);
        let mut mark = VerifyMark::new(p, k, Some("  ann "), 1_700_000_000_000).unwrap();
        assert_eq!(mark.name.as_deref(), Some("ann"));
        let bytes = mark.encode().unwrap();
        assert_eq!(VerifyMark::decode(p, &bytes).unwrap(), mark);
        mark.lost_at_ms = Some(5);
        assert_eq!(
            VerifyMark::decode(p, &mark.encode().unwrap()).unwrap(),
            mark
        );
        assert_eq!(VerifyMark::new(p, k, Some(" "), 1).unwrap().name, None);
        assert_eq!(
            VerifyMark::new(p, k, Some(&"n".repeat(MAX_MARK_NAME_BYTES + 1)), 1),
            Err(MarkError::BadName)
        );
        // Truncated, trailing, unknown version, oversized, empty name: errors, no panic.
        assert!(matches!(
            VerifyMark::decode(p, &bytes[..bytes.len() - 1]),
            Err(MarkError::Malformed(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            VerifyMark::decode(p, &longer),
            Err(MarkError::Malformed(_))
        ));
        let mut v2 = bytes.clone();
        v2[0] = 1;
        assert!(matches!(
            VerifyMark::decode(p, &v2),
            Err(MarkError::Malformed(_))
        ));
        assert_eq!(
            VerifyMark::decode(p, &vec![0; MAX_MARK_RECORD_BYTES + 1]),
            Err(MarkError::TooLarge {
                len: MAX_MARK_RECORD_BYTES + 1,
                limit: MAX_MARK_RECORD_BYTES
            })
        );
        let empty_name = codec::encode(&MarkRecord::V1 {
            key: k,
            name: Some(String::new()),
            verified_at_ms: 1,
            lost_at_ms: None,
        })
        .unwrap();
        assert_eq!(VerifyMark::decode(p, &empty_name), Err(MarkError::BadName));
        for len in 0..bytes.len() {
            let _ = VerifyMark::decode(p, &bytes[..len]);
        }
    }

    /// The stored bytes of a mark, pinned (docs/PROTOCOL.md).
    #[test]
    fn golden_mark_record() {
        let (p, k) = member(1);
        let mark = VerifyMark::new(p, k, Some("ann"), 1_700_000_000_000).unwrap();
        assert_eq!(
            hex(&mark.encode().unwrap()),
            "008a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0103616e6efd0068e5cf8b01000000"
        );
    }

    fn mark(seed: u8, name: Option<&str>) -> VerifyMark {
        let (p, k) = member(seed);
        VerifyMark::new(p, k, name, 1).unwrap()
    }

    #[test]
    fn a_key_that_is_not_the_verified_one_is_reported() {
        let marks = vec![mark(1, Some("ann")), mark(2, None)];
        let (p1, k1) = member(1);
        let (p2, k2) = member(2);
        let (_, other) = member(3);
        assert!(key_mismatches(&marks, &[(p1, &k1), (p2, &k2)]).is_empty());
        let found = key_mismatches(&marks, &[(p1, &other), (p2, &k2)]);
        assert_eq!(
            found,
            vec![KeyChange {
                peer: p1,
                verified_peer: p1,
                name: Some("ann".into()),
                reason: KeyChangeReason::KeyMismatch
            }]
        );
        assert!(found[0].message().contains("'ann'"));
        // A lost mark is not reported again.
        let mut lost = marks.clone();
        lost[0].lost_at_ms = Some(9);
        assert!(key_mismatches(&lost, &[(p1, &other)]).is_empty());
        assert!(!lost[0].holds_for(&k1));
        assert!(marks[0].holds_for(&k1) && !marks[0].holds_for(&other));
    }

    #[test]
    fn the_same_name_under_a_new_key_is_reported() {
        let (p1, _) = member(1);
        let (p2, _) = member(2);
        let (p3, _) = member(3);
        let (p4, _) = member(4);
        let marks = vec![mark(1, Some("ann")), mark(2, Some("bob")), mark(4, None)];
        // Ann is back under p3, named the same; bob is himself; p4 has no name.
        let members = [
            (p3, Some(" ann ")),
            (p2, Some("bob")),
            (p1, Some("ann")),
            (p4, None),
        ];
        assert_eq!(
            key_changes(&marks, &members),
            vec![KeyChange {
                peer: p3,
                verified_peer: p1,
                name: Some("ann".into()),
                reason: KeyChangeReason::NewKeySameName
            }]
        );
        // Another name, no name, or a verified member: nothing.
        assert!(key_changes(&marks, &[(p3, Some("Ann")), (p4, Some("zed"))]).is_empty());
        assert!(key_changes(&marks, &[(p3, None)]).is_empty());
        let mut both = marks.clone();
        both.push(mark(3, Some("ann")));
        assert!(key_changes(&both, &[(p3, Some("ann"))]).is_empty());
        // A lost mark does not vouch for its name.
        let mut lost = marks.clone();
        lost[0].lost_at_ms = Some(1);
        assert!(key_changes(&lost, &[(p3, Some("ann"))]).is_empty());
        assert!(key_changes(&[], &members).is_empty());
    }
}
