//! Members' keys, for safety numbers (see [`crate::verify`]): each member's PeerId with the
//! signature key of its MLS leaf, which is its node's Ed25519 key.

use libp2p_identity::PeerId;
use openmls_traits::OpenMlsProvider;

use super::GroupEngine;
use super::members::member_peer;
use crate::fork::GroupRecords;
use crate::ids::GroupId;

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// The members of `group` at its current epoch as (PeerId, leaf signature key bytes), in
    /// leaf order; `None` if this node does not have the group. Members whose credential
    /// does not name the PeerId of their key are left out, as in [`GroupEngine::group`].
    pub fn member_keys(&self, group: &GroupId) -> Option<Vec<(PeerId, Vec<u8>)>> {
        let g = self.groups.get(group)?;
        Some(
            g.mls
                .members()
                .filter_map(|m| Some((member_peer(&m)?, m.signature_key.clone())))
                .collect(),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::verify::{SafetyNumber, peer_key};

    /// Every member sees every member's key; two members compute the same safety number
    /// from what each sees.
    #[test]
    fn members_see_each_others_keys() {
        let mut s = super::super::tests::sim(2);
        let g = s.create_group(0, "two").unwrap();
        let inv = s.invite(0, g, 1).unwrap();
        s.join(1, 0, &inv).unwrap();
        s.deliver_all();
        let seen: Vec<_> = (0..2)
            .map(|i| s.engines[i].member_keys(&g).unwrap())
            .collect();
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0].len(), 2);
        for (peer, key) in &seen[0] {
            assert_eq!(peer_key(peer).unwrap().as_slice(), key.as_slice());
        }
        let (a, b) = (&seen[0][0], &seen[1][1]);
        let n0 = SafetyNumber::new((a.0, &a.1), (b.0, &b.1)).unwrap();
        let n1 = SafetyNumber::new((b.0, &b.1), (a.0, &a.1)).unwrap();
        assert_eq!(n0, n1);
        assert!(
            s.engines[0]
                .member_keys(&crate::ids::GroupId::from_slice(&[9; 32]).unwrap())
                .is_none()
        );
    }
}
