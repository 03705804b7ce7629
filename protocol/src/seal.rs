//! Sealed gossip frames: what a group's topic carries instead of a bare [`Envelope`].
//!
//! An envelope's clear header (group id, epoch, kind) and the MLS framing inside it (group
//! id, epoch, content type, and for commits the sender and the whole commit) would tell any
//! peer on the topic, member or not, which group it is, how its epochs move and who commits.
//! A sealed frame hides all of that behind one AEAD layer keyed from the group id, which
//! members (and holders of an unused invite, and former members) know and a stranger does
//! not: the topic and the DHT keys are one-way hashes of it. The plaintext is padded to one
//! of [`BUCKETS`], so a frame's length says only which bucket its envelope fell in.
//!
//! Sealing is deterministic: the nonce is a hash of the key and the envelope, so every
//! member that seals one envelope produces the same frame (one gossipsub message id for
//! it, however many members publish it again), and [`open`] accepts exactly that frame and
//! no other, so a member cannot make two frames of one envelope either. Equal frames reveal
//! only that they carry the same envelope, which gossipsub's duplicate handling shows anyway.
//!
//! Layout (docs/PROTOCOL.md, "Sealed frames"):
//!
//! ```text
//! frame     = version (1 byte, 0x01) || nonce (12) || ChaCha20-Poly1305(key, nonce,
//!             aad = version, plaintext) (bucket + 16 bytes)
//! plaintext = length of the envelope (u32, big endian) || envelope || zeros to the bucket
//! key       = SHA-256 of the parts "kith/seal/v1", network id, group id (ids::hash_parts)
//! nonce     = first 12 bytes of hash_parts("kith/seal-nonce/v1", key, envelope)
//! ```
//!
//! [`Envelope`]: crate::envelope::Envelope

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};

use crate::envelope::{Envelope, MAX_ENVELOPE_BYTES};
use crate::ids::{GroupId, hash_parts};

/// The frame format version (its first byte).
pub const SEAL_VERSION: u8 = 1;
/// Bytes of the nonce.
const NONCE_BYTES: usize = 12;
/// Bytes of the Poly1305 tag.
const TAG_BYTES: usize = 16;
/// Bytes of the length prefix inside the plaintext.
const LEN_BYTES: usize = 4;
/// Bytes a frame adds to its padded plaintext.
pub const FRAME_OVERHEAD: usize = 1 + NONCE_BYTES + TAG_BYTES;

/// The padded plaintext sizes, smallest first: an envelope of `n` bytes is padded to the
/// first bucket of at least `n + 4` bytes. Four times apart, so a text of a few words and
/// one of a paragraph look the same; the last holds the largest envelope accepted.
pub const BUCKETS: [usize; 6] = [
    512,
    2 * 1024,
    8 * 1024,
    32 * 1024,
    128 * 1024,
    MAX_ENVELOPE_BYTES + LEN_BYTES,
];

/// The largest frame: the last bucket sealed.
pub const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + LEN_BYTES + FRAME_OVERHEAD;

/// The key that seals one group's frames on one network.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SealKey(pub [u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key opens every frame of its group: never in logs.
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The key of `group` on `network`.
    pub fn of(network: &str, group: &GroupId) -> Self {
        SealKey(hash_parts(&[b"kith/seal/v1", network.as_bytes(), &group.0]))
    }

    fn nonce(&self, envelope: &[u8]) -> Nonce {
        let h = hash_parts(&[b"kith/seal-nonce/v1", &self.0, envelope]);
        *Nonce::from_slice(&h[..NONCE_BYTES])
    }
}

/// Why an envelope could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope of {0} bytes is larger than {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
}

/// Why a frame did not open. Every case means the same to a receiver (not a frame of this
/// group, or altered); they are told apart for tests and logs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The frame's length is not a bucket plus the overhead.
    #[error("a frame of {0} bytes is not a sealed frame's size")]
    Size(usize),
    /// The first byte is not [`SEAL_VERSION`].
    #[error("unknown frame version {0}")]
    Version(u8),
    /// The AEAD tag did not verify: another group's key, or altered bytes.
    #[error("the frame does not open with this group's key")]
    Tag,
    /// It opened, but the padding, the length or the nonce is not what sealing makes.
    #[error("the frame is not in canonical form")]
    NotCanonical,
    /// It opened, but the envelope inside is another group's (sealed by someone who holds
    /// both groups' keys): on this topic it would be read twice, or in place of the real one.
    #[error("the frame holds another group's envelope")]
    OtherGroup,
}

/// The bucket an envelope of `len` bytes is padded to, if it fits in one.
pub fn bucket(len: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|b| len + LEN_BYTES <= *b)
}

/// Seals `envelope` (encoded [`crate::envelope::Envelope`] bytes) with `key`.
pub fn seal(key: &SealKey, envelope: &[u8]) -> Result<Vec<u8>, SealError> {
    let size = bucket(envelope.len()).ok_or(SealError::TooLarge(envelope.len()))?;
    let nonce = key.nonce(envelope);
    let mut frame = Vec::with_capacity(size + FRAME_OVERHEAD);
    frame.push(SEAL_VERSION);
    frame.extend_from_slice(&nonce);
    let body = frame.len();
    frame.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    frame.extend_from_slice(envelope);
    frame.resize(body + size, 0);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.0));
    let tag = cipher
        .encrypt_in_place_detached(&nonce, &[SEAL_VERSION], &mut frame[body..])
        .expect("ChaCha20-Poly1305 seals any buffer below 256 GiB");
    frame.extend_from_slice(&tag);
    Ok(frame)
}

/// Opens a frame sealed with `key`; returns the envelope bytes inside.
pub fn open(key: &SealKey, frame: &[u8]) -> Result<Vec<u8>, OpenError> {
    let size = frame
        .len()
        .checked_sub(FRAME_OVERHEAD)
        .filter(|s| BUCKETS.contains(s))
        .ok_or(OpenError::Size(frame.len()))?;
    if frame[0] != SEAL_VERSION {
        return Err(OpenError::Version(frame[0]));
    }
    let nonce = *Nonce::from_slice(&frame[1..1 + NONCE_BYTES]);
    let (body, tag) = frame[1 + NONCE_BYTES..].split_at(size);
    let mut plain = body.to_vec();
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.0));
    cipher
        .decrypt_in_place_detached(&nonce, &[SEAL_VERSION], &mut plain, Tag::from_slice(tag))
        .map_err(|_| OpenError::Tag)?;
    let (len, rest) = plain.split_at(LEN_BYTES);
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > rest.len() || bucket(len) != Some(size) || rest[len..].iter().any(|b| *b != 0) {
        return Err(OpenError::NotCanonical);
    }
    let envelope = rest[..len].to_vec();
    if key.nonce(&envelope) != nonce {
        return Err(OpenError::NotCanonical);
    }
    Ok(envelope)
}

/// Opens a frame that arrived on the topic of `key`'s group on `network`, and checks that
/// the envelope inside is that group's. Bytes inside that are not an envelope at all are
/// returned as they are: the receiver rejects them as undecodable.
pub fn open_envelope(key: &SealKey, network: &str, frame: &[u8]) -> Result<Vec<u8>, OpenError> {
    let envelope = open(key, frame)?;
    match Envelope::decode(&envelope) {
        Ok(e) if SealKey::of(network, &e.group()) != *key => Err(OpenError::OtherGroup),
        _ => Ok(envelope),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::PayloadKind;
    use data_encoding::HEXLOWER;
    use proptest::prelude::*;

    fn key() -> SealKey {
        SealKey::of("kith-golden", &GroupId([0x11; 32]))
    }

    #[test]
    fn golden_vector() {
        // Pins the key derivation, the nonce, the padding and the AEAD: a change to any of
        // them breaks every node that has not changed with it.
        assert_eq!(
            HEXLOWER.encode(&key().0),
            "ad1b5435ea8e68afc84deac60279e62d106b0af44769c62fdff6ceb2f8bf7f9e"
        );
        let frame = seal(&key(), b"hello").unwrap();
        assert_eq!(frame.len(), 512 + FRAME_OVERHEAD);
        assert_eq!(HEXLOWER.encode(&frame[..13]), "018fb8e3cff0adeae55327d263");
        assert_eq!(
            HEXLOWER.encode(&frame[frame.len() - 16..]),
            "49e1167b5ff36917ac86e5e6ad76745c"
        );
        assert_eq!(
            HEXLOWER.encode(&crate::ids::MessageId::of(&frame).0),
            "1480b520113aae903bd898c2956e5df2de7d98754168a5d0c5e107edbd92c48a"
        );
        assert_eq!(open(&key(), &frame).unwrap(), b"hello");
    }

    #[test]
    fn the_frame_shows_no_header_and_only_the_bucket() {
        let group = GroupId([0x42; 32]);
        let key = SealKey::of("net", &group);
        let short = Envelope::new(group, 7, PayloadKind::Application, vec![0xaa; 10]);
        let long = Envelope::new(group, 7, PayloadKind::Commit, vec![0xbb; 400]);
        let (short, _) = short.encode().unwrap();
        let (long, _) = long.encode().unwrap();
        let a = seal(&key, &short).unwrap();
        let b = seal(&key, &long).unwrap();
        assert_eq!(a.len(), b.len(), "both in the first bucket");
        for frame in [&a, &b] {
            assert!(
                !frame.windows(32).any(|w| w == group.0),
                "group id in the clear"
            );
            assert!(!frame.windows(8).any(|w| w == [0xaa; 8] || w == [0xbb; 8]));
        }
        assert_eq!(open(&key, &a).unwrap(), short);
        assert_eq!(open(&key, &b).unwrap(), long);
    }

    #[test]
    fn sealing_is_deterministic_and_only_the_canonical_frame_opens() {
        let env = b"an envelope".to_vec();
        let frame = seal(&key(), &env).unwrap();
        assert_eq!(frame, seal(&key(), &env).unwrap());
        // Same plaintext under another nonce: a valid AEAD ciphertext, but not canonical.
        let mut plain = Vec::new();
        plain.extend_from_slice(&(env.len() as u32).to_be_bytes());
        plain.extend_from_slice(&env);
        plain.resize(512, 0);
        let nonce = Nonce::from([9u8; 12]);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key().0));
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &[SEAL_VERSION], &mut plain)
            .unwrap();
        let mut other = vec![SEAL_VERSION];
        other.extend_from_slice(&nonce);
        other.extend_from_slice(&plain);
        other.extend_from_slice(&tag);
        assert_eq!(open(&key(), &other), Err(OpenError::NotCanonical));
    }

    #[test]
    fn other_keys_altered_bytes_and_wrong_sizes_do_not_open() {
        let frame = seal(&key(), b"x").unwrap();
        let other = SealKey::of("kith-golden", &GroupId([0x12; 32]));
        assert_eq!(open(&other, &frame), Err(OpenError::Tag));
        assert_ne!(
            SealKey::of("other-net", &GroupId([0x11; 32])),
            key(),
            "the network is part of the key"
        );
        let mut bad = frame.clone();
        bad[40] ^= 1;
        assert_eq!(open(&key(), &bad), Err(OpenError::Tag));
        let mut v2 = frame.clone();
        v2[0] = 2;
        assert_eq!(open(&key(), &v2), Err(OpenError::Version(2)));
        assert_eq!(open(&key(), &frame[..100]), Err(OpenError::Size(100)));
        assert_eq!(open(&key(), &[]), Err(OpenError::Size(0)));
        assert_eq!(
            seal(&key(), &vec![0; MAX_ENVELOPE_BYTES + 1]),
            Err(SealError::TooLarge(MAX_ENVELOPE_BYTES + 1))
        );
        let max = seal(&key(), &vec![7; MAX_ENVELOPE_BYTES]).unwrap();
        assert_eq!(max.len(), MAX_FRAME_BYTES);
        assert_eq!(open(&key(), &max).unwrap().len(), MAX_ENVELOPE_BYTES);
    }

    #[test]
    fn another_groups_envelope_does_not_open_on_this_topic() {
        let (a, b) = (GroupId([0xa0; 32]), GroupId([0xb0; 32]));
        let (ka, kb) = (SealKey::of("net", &a), SealKey::of("net", &b));
        let (of_b, _) = Envelope::new(b, 3, PayloadKind::Application, vec![1; 40])
            .encode()
            .unwrap();
        // Sealed for A's topic by someone holding both keys.
        let wrong = seal(&ka, &of_b).unwrap();
        assert_eq!(open(&ka, &wrong).unwrap(), of_b, "the seal itself is fine");
        assert_eq!(
            open_envelope(&ka, "net", &wrong),
            Err(OpenError::OtherGroup)
        );
        assert_eq!(
            open_envelope(&kb, "net", &seal(&kb, &of_b).unwrap()).unwrap(),
            of_b
        );
        // Not an envelope at all: passed on, for the receiver to reject.
        let junk = seal(&ka, b"junk").unwrap();
        assert_eq!(open_envelope(&ka, "net", &junk).unwrap(), b"junk");
    }

    #[test]
    fn buckets_cover_every_envelope_size() {
        assert_eq!(bucket(0), Some(512));
        assert_eq!(bucket(508), Some(512));
        assert_eq!(bucket(509), Some(2048));
        assert_eq!(bucket(MAX_ENVELOPE_BYTES), Some(MAX_ENVELOPE_BYTES + 4));
        assert_eq!(bucket(MAX_ENVELOPE_BYTES + 1), None);
    }

    proptest! {
        #[test]
        fn any_envelope_round_trips_in_its_bucket(env in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let frame = seal(&key(), &env).unwrap();
            prop_assert_eq!(frame.len(), bucket(env.len()).unwrap() + FRAME_OVERHEAD);
            prop_assert_eq!(open(&key(), &frame).unwrap(), env);
        }

        #[test]
        fn any_bytes_fail_to_open_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert!(open(&key(), &bytes).is_err());
        }
    }
}
