//! Who is who in a group: this node's MLS identity (its node key doubles as the MLS
//! signature key), members' PeerIds bound to their keys, and members' proposals to remove
//! themselves (how Kith leaves a group).

use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use openmls::prelude::{
    BasicCredential, CredentialWithKey, LeafNodeIndex, Member, MlsGroup, Proposal, Sender,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::types::SignatureScheme;

use super::GroupError;

/// This node's identity inside MLS: the node key doubles as the MLS signature key.
pub struct Identity {
    pub(super) keypair: Keypair,
    pub(super) peer: PeerId,
    pub(super) signer: SignatureKeyPair,
    pub(super) credential: CredentialWithKey,
}

impl Identity {
    /// Builds the MLS identity from the node's ed25519 key.
    pub fn new(keypair: &Keypair) -> Result<Self, GroupError> {
        let ed = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| GroupError::UnsupportedKey)?;
        let public = ed.public().to_bytes().to_vec();
        let private = ed.secret().as_ref().to_vec();
        let signer = SignatureKeyPair::from_raw(SignatureScheme::ED25519, private, public.clone());
        let peer = keypair.public().to_peer_id();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(peer.to_bytes()).into(),
            signature_key: public.into(),
        };
        Ok(Identity {
            keypair: keypair.clone(),
            peer,
            signer,
            credential,
        })
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }
}

/// The PeerId of a member, derived from its signature key, if its credential names the same
/// PeerId. `None` means the credential and key disagree (never admitted by this engine).
pub fn bound_peer(
    credential: &openmls::prelude::Credential,
    signature_key: &[u8],
) -> Option<PeerId> {
    let from_key = ed25519::PublicKey::try_from_bytes(signature_key)
        .ok()
        .map(|k| PublicKey::from(k).to_peer_id())?;
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let named = PeerId::from_bytes(basic.identity()).ok()?;
    (named == from_key).then_some(from_key)
}

/// The bound PeerId of a member (see [`bound_peer`]).
pub(super) fn member_peer(m: &Member) -> Option<PeerId> {
    bound_peer(&m.credential, &m.signature_key)
}

/// Whether this node proposed its own removal and the proposal is still pending (it survives
/// restarts in the MLS proposal store).
pub(super) fn self_remove_pending(mls: &MlsGroup) -> bool {
    let me = mls.own_leaf_index();
    mls.is_active() && mls.pending_proposals().any(|p| is_self_remove(p, me))
}

/// Whether a queued proposal is a member proposing its own removal, optionally only `who`'s.
pub(super) fn is_self_remove(p: &openmls::prelude::QueuedProposal, who: LeafNodeIndex) -> bool {
    self_remover(p.proposal(), p.sender()) == Some(who)
}

/// The leaf proposing its own removal, if this proposal is one.
pub(super) fn self_remover(proposal: &Proposal, sender: &Sender) -> Option<LeafNodeIndex> {
    match (proposal, sender) {
        (Proposal::Remove(r), Sender::Member(s)) if r.removed() == *s => Some(*s),
        _ => None,
    }
}

/// The peers a pending or staged commit removes, looked up in the tree before it is merged.
pub(super) fn removed_peers(
    mls: &MlsGroup,
    staged: &openmls::prelude::StagedCommit,
) -> Vec<PeerId> {
    staged
        .remove_proposals()
        .filter_map(|r| {
            let idx: LeafNodeIndex = r.remove_proposal().removed();
            mls.member_at(idx).and_then(|m| member_peer(&m))
        })
        .collect()
}
