//! What people say to each other besides plain text: replies, reactions, edits, deletes,
//! profiles (display names and avatars), read receipts, typing, and the notes that make a
//! two-person direct chat. Each is a [`Chat`] inside an MLS application message
//! ([`crate::envelope::Body::Chat`]), so it is encrypted to the group and authenticated by
//! the sender's leaf like a text; see docs/PROTOCOL.md, "Chat messages".
//!
//! Messages are named by their *history id* ([`crate::group::text_history_id`]: the sender
//! and the stable id the sender chose), which every member computes the same way and which
//! survives re-sends. An edit or a delete also carries the target's stable id, so a
//! receiver checks at once, without holding the target, that the target's sender is the
//! edit's sender: `text_history_id(mls_sender, stable) == target`.

use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::envelope::MAX_TEXT_BYTES;
use crate::files::FileRef;
use crate::ids::MessageId;

/// Longest display name, in characters (after [`clean_name`]).
pub const MAX_NAME_CHARS: usize = 64;
/// Longest display name on the wire, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest avatar image.
pub const MAX_AVATAR_BYTES: usize = 16 * 1024;
/// Longest reaction, in bytes (an emoji with modifiers and joiners fits).
pub const MAX_EMOJI_BYTES: usize = 32;
/// Most profiles in one [`ChatV1::Profiles`].
pub const MAX_PROFILES: usize = 32;
/// Longest invite link in a [`ChatV1::DirectOffer`].
pub const MAX_LINK_BYTES: usize = 4096;
/// Longest PeerId, in bytes.
pub const MAX_PEER_BYTES: usize = 64;
/// Domain separation of a profile signature.
const PROFILE_DOMAIN: &[u8] = b"kith profile v1\0";

/// A chat message (versioned: a new version is a new variant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chat {
    /// Version 1.
    V1(ChatV1),
}

/// Version 1 of [`Chat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatV1 {
    /// A text that answers the message `to` (a history id).
    Reply {
        /// The message answered.
        to: MessageId,
        /// The text, 1 byte to [`MAX_TEXT_BYTES`].
        text: String,
    },
    /// Puts (`on`) or takes back (`!on`) the sender's reaction `emoji` on the message `to`.
    /// One per member per emoji: the latest of a member's reactions with one emoji counts.
    React {
        /// The message reacted to.
        to: MessageId,
        /// The emoji, 1 to [`MAX_EMOJI_BYTES`] bytes, no spaces or control characters.
        emoji: String,
        /// Put or taken back.
        on: bool,
    },
    /// Replaces the text of the sender's own message `target` (the latest edit counts).
    Edit {
        /// The message edited (a history id).
        target: MessageId,
        /// Its stable id: `text_history_id(sender, stable)` must be `target`.
        stable: MessageId,
        /// The new text, 1 byte to [`MAX_TEXT_BYTES`].
        text: String,
    },
    /// Deletes the text of the sender's own message `target` for everyone; a tombstone stays.
    Delete {
        /// The message deleted.
        target: MessageId,
        /// Its stable id, as in [`ChatV1::Edit`].
        stable: MessageId,
    },
    /// The sender's profile.
    Profile(SignedProfile),
    /// Profiles of other members, sent by the member that added someone: a new member
    /// cannot read messages from before it joined. Each is signed by its owner.
    Profiles(Vec<SignedProfile>),
    /// The sender has read the group's history up to and including the message `up_to`.
    Receipt {
        /// A history id.
        up_to: MessageId,
    },
    /// The sender is typing.
    Typing,
    /// This group is a direct chat between the sender and `with` (PeerId bytes).
    Direct {
        /// The other person.
        with: Vec<u8>,
    },
    /// An offer to `to` (PeerId bytes) to join a direct chat with the sender: the link is a
    /// one-use invite that only `to` is admitted by.
    DirectOffer {
        /// Who is invited.
        to: Vec<u8>,
        /// The invite link.
        link: String,
    },
    /// A file or picture: what members need to show it and fetch it from any member that
    /// holds it (see [`crate::files`]). Edits change its caption; a delete removes it.
    File(Box<FileRef>),
}

/// A profile and its owner's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedProfile {
    /// The profile.
    pub profile: Profile,
    /// The owner's ed25519 public key (32 bytes); the owner is the PeerId of this key.
    pub key: Vec<u8>,
    /// ed25519 signature of `"kith profile v1\0" ‖ codec(profile)`.
    pub signature: Vec<u8>,
}

/// What a member shows of itself (versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Profile {
    /// Version 1.
    V1(ProfileV1),
}

/// Version 1 of [`Profile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileV1 {
    /// When the owner set it, milliseconds since the Unix epoch: a newer one replaces it.
    pub version: u64,
    /// Display name, 1 to [`MAX_NAME_BYTES`] bytes; shown after [`clean_name`].
    pub name: String,
    /// A small picture.
    pub avatar: Option<Avatar>,
}

/// An avatar image, at most [`MAX_AVATAR_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Avatar {
    /// Its format (checked against the bytes' signature).
    pub format: ImageFormat,
    /// The encoded image.
    pub bytes: Vec<u8>,
}

/// The image formats an avatar may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// WebP.
    Webp,
}

impl ImageFormat {
    /// The format whose signature `bytes` start with.
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else {
            None
        }
    }

    /// The media type.
    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// A chat message or profile is out of bounds or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// A field is out of its bounds.
    #[error("{0}")]
    Bounds(String),
    /// The profile's signature does not verify, or its key is not an ed25519 key.
    #[error("the profile's signature does not verify")]
    BadSignature,
    /// The profile is signed by someone else than who sent or is said to own it.
    #[error("the profile belongs to another member")]
    NotOwner,
    /// An edit or delete names a message of another member.
    #[error("only its sender may edit or delete a message")]
    NotAuthor,
}

fn bounds(what: impl Into<String>) -> ChatError {
    ChatError::Bounds(what.into())
}

fn check_text(text: &str) -> Result<(), ChatError> {
    if text.is_empty() || text.len() > MAX_TEXT_BYTES {
        return Err(bounds(format!("text must be 1 to {MAX_TEXT_BYTES} bytes")));
    }
    Ok(())
}

/// Checks a reaction: 1 to [`MAX_EMOJI_BYTES`] bytes, no whitespace, control or bidi
/// characters.
pub fn check_emoji(emoji: &str) -> Result<(), ChatError> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        return Err(bounds(format!(
            "a reaction must be 1 to {MAX_EMOJI_BYTES} bytes"
        )));
    }
    if emoji
        .chars()
        // The zero-width joiner builds emoji sequences (families, professions).
        .any(|c| c.is_whitespace() || c.is_control() || (is_format_control(c) && c != '\u{200D}'))
    {
        return Err(bounds(
            "a reaction must not hold spaces or control characters",
        ));
    }
    Ok(())
}

fn check_peer(bytes: &[u8]) -> Result<PeerId, ChatError> {
    if bytes.len() > MAX_PEER_BYTES {
        return Err(bounds("PeerId too long"));
    }
    PeerId::from_bytes(bytes).map_err(|_| bounds("not a PeerId"))
}

impl Chat {
    /// The version-1 content.
    pub fn v1(&self) -> &ChatV1 {
        match self {
            Chat::V1(c) => c,
        }
    }

    /// Checks every bound (sizes, counts, formats); signatures are checked by
    /// [`SignedProfile::verify`].
    pub fn check(&self) -> Result<(), ChatError> {
        match self.v1() {
            ChatV1::Reply { text, .. } | ChatV1::Edit { text, .. } => check_text(text),
            ChatV1::React { emoji, .. } => check_emoji(emoji),
            ChatV1::Delete { .. } | ChatV1::Receipt { .. } | ChatV1::Typing => Ok(()),
            ChatV1::Profile(p) => p.check(),
            ChatV1::Profiles(list) => {
                if list.is_empty() || list.len() > MAX_PROFILES {
                    return Err(bounds(format!(
                        "a profile list holds 1 to {MAX_PROFILES} profiles"
                    )));
                }
                list.iter().try_for_each(SignedProfile::check)
            }
            ChatV1::Direct { with } => check_peer(with).map(|_| ()),
            ChatV1::DirectOffer { to, link } => {
                check_peer(to)?;
                if link.is_empty() || link.len() > MAX_LINK_BYTES {
                    return Err(bounds("invite link out of bounds"));
                }
                Ok(())
            }
            ChatV1::File(f) => f.check().map_err(|e| bounds(e.to_string())),
        }
    }

    /// Whether the sender keeps it to send again (after a rollback or when a member asks):
    /// everything that changes what members see. Receipts and typing are moments, and a
    /// profile list is sent again with the next join.
    pub fn is_kept(&self) -> bool {
        !matches!(
            self.v1(),
            ChatV1::Receipt { .. } | ChatV1::Typing | ChatV1::Profiles(_)
        )
    }
}

/// Whether `c` is an invisible formatting character that can disguise text: bidirectional
/// embeddings, overrides, isolates and marks, zero-width characters and the byte order mark.
pub fn is_format_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// A display name as shown: control and formatting characters (bidi overrides, zero-width
/// characters) removed, runs of whitespace made one space, trimmed, at most
/// [`MAX_NAME_CHARS`] characters. Empty if nothing printable is left.
pub fn clean_name(name: &str) -> String {
    let mut out = String::new();
    let mut space = false;
    let mut count = 0;
    for c in name.chars() {
        if c.is_control() && !c.is_whitespace() || is_format_control(c) {
            continue;
        }
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if count >= MAX_NAME_CHARS {
            break;
        }
        if space {
            out.push(' ');
            count += 1;
            space = false;
            if count >= MAX_NAME_CHARS {
                break;
            }
        }
        out.push(c);
        count += 1;
    }
    out
}

impl SignedProfile {
    /// Signs a profile with the owner's node key.
    pub fn sign(profile: Profile, key: &Keypair) -> Result<SignedProfile, ChatError> {
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| ChatError::BadSignature)?;
        let signature = ed.sign(&signed_bytes(&profile)?);
        let signed = SignedProfile {
            profile,
            key: ed.public().to_bytes().to_vec(),
            signature,
        };
        signed.check()?;
        Ok(signed)
    }

    /// Checks bounds: name, avatar size and format, key and signature lengths.
    pub fn check(&self) -> Result<(), ChatError> {
        let Profile::V1(p) = &self.profile;
        if p.name.is_empty() || p.name.len() > MAX_NAME_BYTES || clean_name(&p.name).is_empty() {
            return Err(bounds(format!(
                "a name must be 1 to {MAX_NAME_CHARS} printable characters"
            )));
        }
        if let Some(a) = &p.avatar {
            if a.bytes.len() > MAX_AVATAR_BYTES {
                return Err(bounds(format!(
                    "an avatar must be at most {} KiB",
                    MAX_AVATAR_BYTES / 1024
                )));
            }
            if ImageFormat::sniff(&a.bytes) != Some(a.format) {
                return Err(bounds("the avatar is not a PNG, JPEG or WebP image"));
            }
        }
        if self.key.len() != 32 || self.signature.len() != 64 {
            return Err(ChatError::BadSignature);
        }
        Ok(())
    }

    /// Checks bounds and the signature; returns the owner.
    pub fn verify(&self) -> Result<PeerId, ChatError> {
        self.check()?;
        let key =
            ed25519::PublicKey::try_from_bytes(&self.key).map_err(|_| ChatError::BadSignature)?;
        if !key.verify(&signed_bytes(&self.profile)?, &self.signature) {
            return Err(ChatError::BadSignature);
        }
        Ok(PublicKey::from(key).to_peer_id())
    }

    /// The profile's version 1 content.
    pub fn v1(&self) -> &ProfileV1 {
        match &self.profile {
            Profile::V1(p) => p,
        }
    }

    /// Encodes it for storage.
    pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
        codec::encode(self).map_err(|e| bounds(e.to_string()))
    }

    /// Decodes and verifies a stored or received profile; returns it and its owner.
    pub fn decode(bytes: &[u8]) -> Result<(SignedProfile, PeerId), DecodeError> {
        let p: SignedProfile = codec::decode(bytes, MAX_AVATAR_BYTES + MAX_NAME_BYTES + 256)?;
        let owner = p
            .verify()
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        Ok((p, owner))
    }
}

fn signed_bytes(profile: &Profile) -> Result<Vec<u8>, ChatError> {
    let mut out = PROFILE_DOMAIN.to_vec();
    out.extend(codec::encode(profile).map_err(|e| bounds(e.to_string()))?);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).unwrap()
    }

    fn profile(name: &str) -> Profile {
        Profile::V1(ProfileV1 {
            version: 1,
            name: name.into(),
            avatar: None,
        })
    }

    #[test]
    fn a_signed_profile_verifies_as_its_owner_and_not_when_altered() {
        let k = key(1);
        let signed = SignedProfile::sign(profile("Alice"), &k).unwrap();
        assert_eq!(signed.verify().unwrap(), k.public().to_peer_id());
        let mut forged = signed.clone();
        forged.profile = profile("Mallory");
        assert_eq!(forged.verify(), Err(ChatError::BadSignature));
        let mut other_key = signed;
        other_key.key = key(2)
            .public()
            .try_into_ed25519()
            .unwrap()
            .to_bytes()
            .to_vec();
        assert_eq!(other_key.verify(), Err(ChatError::BadSignature));
    }

    #[test]
    fn names_are_neutralised_and_bounded() {
        assert_eq!(
            clean_name("  Al\u{202E}ice \t\n Smith\u{200B} "),
            "Alice Smith"
        );
        assert_eq!(clean_name("a\u{0007}b\u{0000}"), "ab");
        assert_eq!(clean_name("\u{202E}\u{2066}"), "");
        let long = "x".repeat(200);
        assert_eq!(clean_name(&long).chars().count(), MAX_NAME_CHARS);
        let k = key(1);
        assert!(SignedProfile::sign(profile("\u{202E} "), &k).is_err());
        assert!(SignedProfile::sign(profile(&"y".repeat(MAX_NAME_BYTES + 1)), &k).is_err());
    }

    #[test]
    fn avatars_must_be_small_images_of_the_format_they_claim() {
        let k = key(1);
        let with = |format, bytes: Vec<u8>| {
            Profile::V1(ProfileV1 {
                version: 1,
                name: "A".into(),
                avatar: Some(Avatar { format, bytes }),
            })
        };
        let png = b"\x89PNG\r\n\x1a\nrest".to_vec();
        assert!(SignedProfile::sign(with(ImageFormat::Png, png.clone()), &k).is_ok());
        assert!(SignedProfile::sign(with(ImageFormat::Jpeg, png), &k).is_err());
        assert!(SignedProfile::sign(with(ImageFormat::Png, b"<svg>".to_vec()), &k).is_err());
        let mut big = b"\x89PNG\r\n\x1a\n".to_vec();
        big.resize(MAX_AVATAR_BYTES + 1, 0);
        assert!(SignedProfile::sign(with(ImageFormat::Png, big), &k).is_err());
    }

    #[test]
    fn reactions_are_short_and_printable() {
        assert!(check_emoji("👍").is_ok());
        assert!(check_emoji("👩‍👩‍👧").is_ok());
        assert!(check_emoji("").is_err());
        assert!(check_emoji("a b").is_err());
        assert!(check_emoji("\u{202E}x").is_err());
        assert!(check_emoji(&"x".repeat(MAX_EMOJI_BYTES + 1)).is_err());
    }

    #[test]
    fn bounds_are_checked_per_kind() {
        let id = MessageId([1; 32]);
        let c = |v| Chat::V1(v);
        assert!(
            c(ChatV1::Reply {
                to: id,
                text: String::new()
            })
            .check()
            .is_err()
        );
        assert!(c(ChatV1::Profiles(vec![])).check().is_err());
        assert!(c(ChatV1::Direct { with: vec![1; 80] }).check().is_err());
        assert!(
            c(ChatV1::DirectOffer {
                to: key(1).public().to_peer_id().to_bytes(),
                link: "x".repeat(MAX_LINK_BYTES + 1)
            })
            .check()
            .is_err()
        );
        assert!(c(ChatV1::Typing).check().is_ok());
        assert!(!c(ChatV1::Typing).is_kept());
        assert!(
            c(ChatV1::Delete {
                target: id,
                stable: id
            })
            .is_kept()
        );
    }
}
