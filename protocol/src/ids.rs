//! Identifier newtypes shared by every layer.
//!
//! All ids are 32 bytes, shown as 64 lowercase hex characters (`Display`/`FromStr`) and as an
//! 8-character short form for logs ([`GroupId::short`]).

use std::fmt;
use std::str::FromStr;

use data_encoding::HEXLOWER;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a textual id could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The text is not 64 characters long.
    #[error("expected 64 hex characters, got {0} characters")]
    Length(usize),
    /// The text has the right length but contains a non-hex character.
    #[error("not a hex string")]
    NotHex,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The first 8 hex characters, for logs and compact displays.
            pub fn short(&self) -> String {
                HEXLOWER.encode(&self.0[..4])
            }

            /// Builds the id from a byte slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&HEXLOWER.encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.len() != 64 {
                    return Err(IdParseError::Length(s.len()));
                }
                let bytes = HEXLOWER
                    .decode(s.to_ascii_lowercase().as_bytes())
                    .map_err(|_| IdParseError::NotHex)?;
                Self::from_slice(&bytes).ok_or(IdParseError::Length(s.len()))
            }
        }
    };
}

id_type!(
    /// Identifies a group. Also the MLS group id (the same 32 bytes).
    GroupId
);
id_type!(
    /// Identifies a gossipsub topic: a hash of the network id and group id, so the plain group
    /// id never appears on the wire as a topic name.
    TopicId
);
id_type!(
    /// Identifies an envelope: SHA-256 of its encoded bytes. Equal to the gossipsub message id,
    /// so duplicates are recognised the same way in the network and in the store.
    MessageId
);

id_type!(
    /// Identifies a file: the root of its chunk hash list ([`crate::files::root`]), so a
    /// file's id checks every byte of it.
    FileId
);

id_type!(
    /// Identifies an invite inside its group: a hash of the invite's secret hash. Members name
    /// invites by it (listing, revoking, and in the authenticated data of the commit that
    /// used one). It cannot be turned back into the secret hash, so seeing it (commit AAD is
    /// not encrypted) does not reveal the invite's DHT rendezvous key.
    InviteId
);

/// SHA-256 of `parts`, each prefixed with its length so that concatenations cannot collide.
pub fn hash_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

impl GroupId {
    /// The gossipsub topic of this group on network `network`.
    pub fn topic(&self, network: &str) -> TopicId {
        TopicId(hash_parts(&[b"kith/topic/v1", network.as_bytes(), &self.0]))
    }

    /// The Kademlia provider key under which online members of this group announce themselves.
    pub fn provider_key(&self, network: &str) -> [u8; 32] {
        hash_parts(&[b"kith/providers/v1", network.as_bytes(), &self.0])
    }
}

impl InviteId {
    /// The id of the invite whose secret hashes to `secret_hash`.
    pub fn of(secret_hash: &[u8; 32]) -> Self {
        InviteId(hash_parts(&[b"kith/invite-id/v1", secret_hash]))
    }
}

/// The Kademlia provider key under which members that honour an invite announce themselves,
/// so a joiner holding the link finds them. Derived from the secret's hash (which only the
/// link holder and members know), not from the group id: the DHT learns neither the group
/// nor which invites belong together.
pub fn invite_rendezvous_key(network: &str, secret_hash: &[u8; 32]) -> [u8; 32] {
    hash_parts(&[
        b"kith/invite-rendezvous/v1",
        network.as_bytes(),
        secret_hash,
    ])
}

impl TopicId {
    /// The gossipsub topic string for this id. Version 2 (`g2`) carries sealed frames
    /// ([`crate::seal`]); version 1 (`kith/g/…`) carried bare envelopes. Nodes of the two
    /// versions are on different topics, so neither takes the other's messages for garbage;
    /// history sync, which is unchanged, still carries messages between them.
    pub fn topic_string(&self) -> String {
        format!("kith/g2/{self}")
    }
}

impl MessageId {
    /// The id of an encoded envelope.
    pub fn of(envelope_bytes: &[u8]) -> Self {
        Self(Sha256::digest(envelope_bytes).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = GroupId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<GroupId>(), Ok(id));
        assert_eq!(s.to_uppercase().parse::<GroupId>(), Ok(id));
        assert_eq!(id.short(), "abababab");
    }

    #[test]
    fn parse_rejects_bad_text() {
        assert_eq!("abc".parse::<GroupId>(), Err(IdParseError::Length(3)));
        let bad = "z".repeat(64);
        assert_eq!(bad.parse::<GroupId>(), Err(IdParseError::NotHex));
    }

    #[test]
    fn topic_depends_on_network_and_group() {
        let a = GroupId([1; 32]);
        let b = GroupId([2; 32]);
        assert_ne!(a.topic("net"), b.topic("net"));
        assert_ne!(a.topic("net"), a.topic("other"));
        assert_ne!(a.topic("net").0, a.provider_key("net"));
        assert_eq!(a.topic("net"), a.topic("net"));
    }

    #[test]
    fn message_id_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            MessageId::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
