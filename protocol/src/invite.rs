//! Invite tickets: how someone is asked into a group.
//!
//! A ticket names the network, the group, the inviter (its ed25519 key, hence its PeerId) and
//! up to [`MAX_INVITE_ADDRS`] addresses to reach it, a fresh 32-byte secret, an expiry and a
//! use limit, and is signed by the inviter's node key so a link altered in transit is refused
//! before any network traffic. Text form: `kith1` followed by the lowercase, unpadded base32
//! of the encoded ticket; also accepted as `kith://join#kith1…`. Members keep only
//! [`InviteRecord`], which holds a hash of the secret, never the secret. The record is shared
//! with the whole group (see `group::invites`), so any member can honour the link.

use data_encoding::BASE32_NOPAD;
use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::envelope::{MAX_GROUP_NAME_BYTES, MAX_NETWORK_ID_BYTES};
use crate::ids::{GroupId, InviteId, hash_parts};

/// Prefix of the text form.
pub const LINK_PREFIX: &str = "kith1";
/// Prefix of the URL form.
pub const URL_PREFIX: &str = "kith://join#";
/// At most this many addresses are carried in a ticket.
pub const MAX_INVITE_ADDRS: usize = 3;
/// Longest accepted encoded multiaddr.
pub const MAX_ADDR_BYTES: usize = 128;
/// Longest accepted link text.
pub const MAX_LINK_CHARS: usize = 2048;
/// Domain separation for the signature.
const SIGNATURE_CONTEXT: &[u8] = b"kith/invite/v1";

/// Why an invite could not be created, parsed or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// The text does not start with `kith1` or `kith://join#kith1`.
    #[error("not a Kith invite link (expected it to start with 'kith1' or 'kith://join#')")]
    NotALink,
    /// The link is longer than any valid link.
    #[error("invite link is too long ({0} characters)")]
    TooLong(usize),
    /// The text after the prefix is not base32.
    #[error("invite link is damaged (not valid base32); was it copied completely?")]
    BadEncoding,
    /// The bytes do not decode as a ticket (truncated or altered).
    /// (The decode detail is kept for logs and tests but not shown: it means nothing to a user.)
    #[error("invite link is damaged or truncated; was it copied completely?")]
    Malformed(DecodeError),
    /// The inviter key inside the ticket is not a valid ed25519 key.
    #[error("invite link names an invalid inviter key")]
    BadInviterKey,
    /// A field is out of bounds (name too long, too many addresses, bad address).
    #[error("invite link is invalid: {0}")]
    Invalid(&'static str),
    /// The signature does not match: the link was altered after it was made.
    #[error("invite link signature does not verify: the link was altered")]
    BadSignature,
    /// The expiry time has passed.
    #[error("invite link expired at {expired_at} (unix time)")]
    Expired {
        /// Expiry, seconds since the Unix epoch.
        expired_at: u64,
    },
    /// The ticket is for a different network than this node's.
    #[error("invite link is for network '{link}', but this node is on network '{ours}'")]
    WrongNetwork {
        /// The link's network.
        link: String,
        /// This node's network.
        ours: String,
    },
    /// Signing failed (the key is not ed25519).
    #[error("the node key cannot sign invites (ed25519 required)")]
    Signing,
}

impl From<DecodeError> for InviteError {
    fn from(e: DecodeError) -> Self {
        InviteError::Malformed(e)
    }
}

/// What a member chooses when creating an invite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteParams {
    /// Network id of the inviting node.
    pub network: String,
    /// The group to join.
    pub group: GroupId,
    /// The group's display name, shown to the joiner before joining.
    pub group_name: String,
    /// Where the inviter can be reached; only the first [`MAX_INVITE_ADDRS`] are kept.
    pub addrs: Vec<Multiaddr>,
    /// A fresh random secret (randomness comes from the caller).
    pub secret: [u8; 32],
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// How many joins this invite allows (at least 1).
    pub max_uses: u32,
}

/// A verified invite ticket. Its `Debug` output omits the secret, so logging it is safe.
#[derive(Clone, PartialEq, Eq)]
pub struct Invite {
    /// Network id the invite is valid on.
    pub network: String,
    /// The group to join.
    pub group: GroupId,
    /// The group's display name.
    pub group_name: String,
    /// The inviter's node.
    pub inviter: PeerId,
    /// Addresses of the inviter.
    pub addrs: Vec<Multiaddr>,
    /// The one-time secret proving the holder was invited.
    pub secret: [u8; 32],
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// How many joins the invite allows.
    pub max_uses: u32,
    /// The text form, exactly as signed (re-encoding is deterministic too).
    link: String,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite")
            .field("network", &self.network)
            .field("group", &self.group)
            .field("group_name", &self.group_name)
            .field("inviter", &self.inviter)
            .field("addrs", &self.addrs)
            .field("expires_at", &self.expires_at)
            .field("max_uses", &self.max_uses)
            .finish_non_exhaustive()
    }
}

/// An invite as every member of its group stores it: no secret, only its hash, plus the
/// group-wide state (uses, revocation). Built by merging [`InviteUpdate`]s, which members
/// learn inside the group (creation and revocation messages, and the commits that used it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteRecord {
    /// The group it admits to.
    pub group: GroupId,
    /// Its id ([`InviteId::of`] the secret hash); also the record's key.
    pub id: InviteId,
    /// [`secret_hash`] of the invite's secret. `None` while only a use or a revocation is
    /// known: history sync delivers commits before messages, so those can arrive before
    /// the creation message. Such a record admits nobody.
    pub secret_hash: Option<[u8; 32]>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// How many joins it allows.
    pub max_uses: u32,
    /// How many joins it has admitted so far, counted from the commits that name it.
    pub uses: u32,
    /// When it was created (the creator's clock), seconds since the Unix epoch.
    pub created_at: u64,
    /// The member who created it (authenticated by MLS).
    pub creator: Option<PeerId>,
    /// Joins wait for a member's approval.
    pub approval: bool,
    /// A member revoked it.
    pub revoked: bool,
}

impl InviteRecord {
    /// Checks the record admits one more join at `now` (Unix seconds). The checks go from
    /// the most to the least permanent reason, so the joiner hears the one that matters.
    pub fn admits(&self, now: u64) -> Result<(), crate::envelope::JoinRejection> {
        use crate::envelope::JoinRejection;
        if self.secret_hash.is_none() {
            return Err(JoinRejection::UnknownInvite);
        }
        if self.revoked {
            return Err(JoinRejection::Revoked);
        }
        if now >= self.expires_at {
            return Err(JoinRejection::Expired);
        }
        if self.uses >= self.max_uses {
            return Err(JoinRejection::UsedUp);
        }
        Ok(())
    }

    /// Whether the record can still admit someone at `now`.
    pub fn is_active(&self, now: u64) -> bool {
        self.admits(now).is_ok()
    }

    /// Whether members announce the invite in the DHT (and tell new members of it) at `now`:
    /// it is complete and has not expired. An invite that ended early (revoked, used up) is
    /// still announced until it expires, so a joiner who reaches any member hears why it
    /// ended instead of finding no one.
    pub fn is_announced(&self, now: u64) -> bool {
        self.secret_hash.is_some() && now < self.expires_at
    }

    /// Uses left.
    pub fn uses_left(&self) -> u32 {
        self.max_uses.saturating_sub(self.uses)
    }

    /// The record after `update`, starting from `current` (the stored record with this id,
    /// if any). Merging is commutative: members that learn the same updates in any order
    /// store the same record, except that of two different creations under one id (a
    /// secret reused on purpose) the one with the lower (created_at, max_uses, expires_at)
    /// wins.
    pub fn merge(current: Option<InviteRecord>, update: &InviteUpdate) -> InviteRecord {
        let mut r = current.unwrap_or_else(|| InviteRecord {
            group: update.group(),
            id: update.id(),
            secret_hash: None,
            expires_at: 0,
            max_uses: 0,
            uses: 0,
            created_at: 0,
            creator: None,
            approval: false,
            revoked: false,
        });
        match update {
            InviteUpdate::Created {
                secret_hash,
                expires_at,
                max_uses,
                approval,
                creator,
                created_at,
                ..
            } => {
                let new_key = (*created_at, *max_uses, *expires_at);
                let replace =
                    r.secret_hash.is_none() || new_key < (r.created_at, r.max_uses, r.expires_at);
                if replace {
                    r.secret_hash = Some(*secret_hash);
                    r.expires_at = *expires_at;
                    r.max_uses = *max_uses;
                    r.approval = *approval;
                    r.creator = Some(*creator);
                    r.created_at = *created_at;
                }
            }
            InviteUpdate::Used { .. } => r.uses = r.uses.saturating_add(1),
            InviteUpdate::Unused { .. } => r.uses = r.uses.saturating_sub(1),
            InviteUpdate::State {
                group,
                id,
                secret_hash,
                expires_at,
                max_uses,
                approval,
                creator,
                created_at,
                uses,
                revoked,
            } => {
                // The creation, as if its message had been read; uses and revocation only
                // grow, so a state older than what this member counted changes nothing.
                r = InviteRecord::merge(
                    Some(r),
                    &InviteUpdate::Created {
                        group: *group,
                        id: *id,
                        secret_hash: *secret_hash,
                        expires_at: *expires_at,
                        max_uses: *max_uses,
                        approval: *approval,
                        creator: *creator,
                        created_at: *created_at,
                    },
                );
                r.uses = r.uses.max(*uses);
                r.revoked |= *revoked;
            }
            InviteUpdate::Revoked { .. } => r.revoked = true,
        }
        r
    }
}

/// One change to an invite record, as produced by the group engine. The node merges it into
/// the stored record with [`InviteRecord::merge`] in the same transaction as the MLS change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InviteUpdate {
    /// A member created the invite (this node, or a creation message from the group).
    Created {
        /// The group.
        group: GroupId,
        /// The invite id.
        id: InviteId,
        /// Hash of the secret.
        secret_hash: [u8; 32],
        /// Expiry, Unix seconds.
        expires_at: u64,
        /// Joins allowed.
        max_uses: u32,
        /// Joins wait for approval.
        approval: bool,
        /// Who created it.
        creator: PeerId,
        /// When, Unix seconds (creator's clock).
        created_at: u64,
    },
    /// A merged commit added a member with this invite.
    Used {
        /// The group.
        group: GroupId,
        /// The invite id.
        id: InviteId,
    },
    /// A commit that used the invite lost to a concurrent one and was rolled back: the use
    /// no longer counts.
    Unused {
        /// The group.
        group: GroupId,
        /// The invite id.
        id: InviteId,
    },
    /// A member told a new member the invite's state ([`crate::envelope::Body::InviteStates`]).
    State {
        /// The group.
        group: GroupId,
        /// The invite id.
        id: InviteId,
        /// Hash of the secret.
        secret_hash: [u8; 32],
        /// Expiry, Unix seconds.
        expires_at: u64,
        /// Joins allowed.
        max_uses: u32,
        /// Joins wait for approval.
        approval: bool,
        /// Who created it.
        creator: PeerId,
        /// When, Unix seconds (creator's clock).
        created_at: u64,
        /// Joins admitted so far, as the sender counted them.
        uses: u32,
        /// Revoked, as the sender knew.
        revoked: bool,
    },
    /// A member revoked the invite.
    Revoked {
        /// The group.
        group: GroupId,
        /// The invite id.
        id: InviteId,
    },
}

impl InviteUpdate {
    /// The group of the invite.
    pub fn group(&self) -> GroupId {
        match self {
            InviteUpdate::Created { group, .. }
            | InviteUpdate::Used { group, .. }
            | InviteUpdate::Unused { group, .. }
            | InviteUpdate::State { group, .. }
            | InviteUpdate::Revoked { group, .. } => *group,
        }
    }

    /// The invite's id.
    pub fn id(&self) -> InviteId {
        match self {
            InviteUpdate::Created { id, .. }
            | InviteUpdate::Used { id, .. }
            | InviteUpdate::Unused { id, .. }
            | InviteUpdate::State { id, .. }
            | InviteUpdate::Revoked { id, .. } => *id,
        }
    }
}

/// The hash under which an invite's secret is stored.
pub fn secret_hash(secret: &[u8; 32]) -> [u8; 32] {
    hash_parts(&[b"kith/invite-secret/v1", secret])
}

#[derive(Serialize, Deserialize)]
enum Ticket {
    V1(SignedTicketV1),
}

#[derive(Serialize, Deserialize)]
struct SignedTicketV1 {
    body: TicketBodyV1,
    signature: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct TicketBodyV1 {
    network: String,
    group: GroupId,
    group_name: String,
    inviter_key: [u8; 32],
    addrs: Vec<Vec<u8>>,
    secret: [u8; 32],
    expires_at: u64,
    max_uses: u32,
}

fn signed_message(body: &TicketBodyV1) -> Result<Vec<u8>, InviteError> {
    let bytes = codec::encode(body).map_err(|_| InviteError::Invalid("cannot encode"))?;
    let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + bytes.len());
    msg.extend_from_slice(SIGNATURE_CONTEXT);
    msg.extend_from_slice(&bytes);
    Ok(msg)
}

fn check_fields(
    network: &str,
    group_name: &str,
    addrs: usize,
    max_uses: u32,
) -> Result<(), InviteError> {
    if network.is_empty() || network.len() > MAX_NETWORK_ID_BYTES {
        return Err(InviteError::Invalid("network id is empty or too long"));
    }
    if group_name.len() > MAX_GROUP_NAME_BYTES {
        return Err(InviteError::Invalid("group name is too long"));
    }
    if addrs > MAX_INVITE_ADDRS {
        return Err(InviteError::Invalid("too many addresses"));
    }
    if max_uses == 0 {
        return Err(InviteError::Invalid("max uses must be at least 1"));
    }
    Ok(())
}

impl Invite {
    /// Creates and signs a ticket with the inviter's node key.
    pub fn create(params: InviteParams, key: &Keypair) -> Result<Self, InviteError> {
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| InviteError::Signing)?;
        let addrs: Vec<Multiaddr> = params
            .addrs
            .into_iter()
            .filter(|a| a.len() <= MAX_ADDR_BYTES)
            .take(MAX_INVITE_ADDRS)
            .collect();
        check_fields(
            &params.network,
            &params.group_name,
            addrs.len(),
            params.max_uses,
        )?;
        let body = TicketBodyV1 {
            network: params.network,
            group: params.group,
            group_name: params.group_name,
            inviter_key: ed.public().to_bytes(),
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            secret: params.secret,
            expires_at: params.expires_at,
            max_uses: params.max_uses,
        };
        let signature = ed.sign(&signed_message(&body)?);
        let ticket = Ticket::V1(SignedTicketV1 { body, signature });
        let bytes = codec::encode(&ticket).map_err(|_| InviteError::Invalid("cannot encode"))?;
        let link = format!(
            "{LINK_PREFIX}{}",
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        );
        Self::parse(&link)
    }

    /// Parses and verifies a link (`kith1…` or `kith://join#kith1…`, in any letter case;
    /// whitespace anywhere is ignored, so a link wrapped over lines still parses). Checks
    /// encoding, bounds and signature; not expiry (see [`Invite::check`]).
    pub fn parse(text: &str) -> Result<Self, InviteError> {
        if text.len() > MAX_LINK_CHARS * 2 {
            return Err(InviteError::TooLong(text.len()));
        }
        let text: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        if text.len() > MAX_LINK_CHARS {
            return Err(InviteError::TooLong(text.len()));
        }
        let text = text.strip_prefix(URL_PREFIX).unwrap_or(&text);
        let Some(b32) = text.strip_prefix(LINK_PREFIX) else {
            return Err(InviteError::NotALink);
        };
        let bytes = BASE32_NOPAD
            .decode(b32.to_ascii_uppercase().as_bytes())
            .map_err(|_| InviteError::BadEncoding)?;
        let Ticket::V1(signed) = codec::decode::<Ticket>(&bytes, MAX_LINK_CHARS)?;
        let body = &signed.body;
        check_fields(
            &body.network,
            &body.group_name,
            body.addrs.len(),
            body.max_uses,
        )?;
        let ed_key = ed25519::PublicKey::try_from_bytes(&body.inviter_key)
            .map_err(|_| InviteError::BadInviterKey)?;
        if !ed_key.verify(&signed_message(body)?, &signed.signature) {
            return Err(InviteError::BadSignature);
        }
        let mut addrs = Vec::with_capacity(body.addrs.len());
        for a in &body.addrs {
            if a.len() > MAX_ADDR_BYTES {
                return Err(InviteError::Invalid("address too long"));
            }
            addrs.push(
                Multiaddr::try_from(a.clone()).map_err(|_| InviteError::Invalid("bad address"))?,
            );
        }
        let inviter = PublicKey::from(ed_key).to_peer_id();
        Ok(Invite {
            network: body.network.clone(),
            group: body.group,
            group_name: body.group_name.clone(),
            inviter,
            addrs,
            secret: body.secret,
            expires_at: body.expires_at,
            max_uses: body.max_uses,
            link: format!(
                "{LINK_PREFIX}{}",
                BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
            ),
        })
    }

    /// Checks the invite can be used by a node on `network` at `now` (Unix seconds).
    pub fn check(&self, network: &str, now: u64) -> Result<(), InviteError> {
        if self.network != network {
            return Err(InviteError::WrongNetwork {
                link: self.network.clone(),
                ours: network.to_owned(),
            });
        }
        if now >= self.expires_at {
            return Err(InviteError::Expired {
                expired_at: self.expires_at,
            });
        }
        Ok(())
    }

    /// The `kith1…` text form.
    pub fn link(&self) -> &str {
        &self.link
    }

    /// The `kith://join#kith1…` URL form.
    pub fn url(&self) -> String {
        format!("{URL_PREFIX}{}", self.link)
    }

    /// The id of this invite inside its group.
    pub fn id(&self) -> InviteId {
        InviteId::of(&secret_hash(&self.secret))
    }

    /// The DHT key under which members that honour this invite announce themselves.
    pub fn rendezvous_key(&self) -> [u8; 32] {
        crate::ids::invite_rendezvous_key(&self.network, &secret_hash(&self.secret))
    }
}
