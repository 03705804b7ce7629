//! Healing a fork deeper than the rewind depth: a member whose branch lost further back than
//! it can roll back asks a member of the winning branch to add it again.
//!
//! The requester is identified by its transport (Noise) PeerId. The member agrees only if
//! that PeerId is a member on its own branch (it was a member before the split) and its
//! branch holds the commit the requester saw win; it then removes the requester's old leaf
//! and adds its fresh key package, two ordinary commits that every member of the winning
//! branch merges. The requester replaces its dead branch with the Welcome.

use libp2p_identity::PeerId;
use openmls_traits::OpenMlsProvider;

use super::join::WelcomeSource;
use super::members::member_peer;
use super::state::Lifecycle;
use super::{Effect, GroupEngine, GroupError};
use crate::envelope::{JoinRejection, JoinRequest, JoinResponse, RejoinRequestV1};
use crate::fork::GroupRecords;
use crate::ids::{GroupId, MessageId};

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// The request to send to a member after [`Effect::DeepForkLost`]: a fresh key package
    /// and the winning commit this node saw at `epoch`.
    pub fn prepare_rejoin(
        &mut self,
        group: GroupId,
        epoch: u64,
        commit: MessageId,
    ) -> Result<JoinRequest, GroupError> {
        let g = self
            .groups
            .get(&group)
            .ok_or(GroupError::UnknownGroup(group))?;
        if !g.lifecycle.rejoining() {
            return Err(GroupError::AlreadyMember(group));
        }
        let key_package = self.fresh_key_package()?;
        Ok(JoinRequest::Rejoin(RejoinRequestV1 {
            network: self.network.clone(),
            group,
            epoch,
            commit,
            key_package,
        }))
    }

    /// Answers a rejoin request from `from` (transport-authenticated): if `from` is a member
    /// here and this node's branch holds the commit it names, replaces its leaf (a Remove,
    /// then an Add with the new key package) and returns the Welcome.
    pub fn handle_rejoin_request(
        &mut self,
        from: PeerId,
        req: RejoinRequestV1,
        now_ms: u64,
    ) -> Result<(JoinResponse, Vec<Effect>), GroupError> {
        let refuse = |r| Ok((JoinResponse::Rejected(r), Vec::new()));
        if req.network != self.network {
            return refuse(JoinRejection::WrongNetwork);
        }
        let Some(g) = self.groups.get(&req.group) else {
            return refuse(JoinRejection::NotMember);
        };
        if !g.active() || g.lifecycle != Lifecycle::Member {
            return refuse(JoinRejection::NotMember);
        }
        if g.branch.commit_at(req.epoch) != Some(req.commit) {
            return refuse(JoinRejection::OtherBranch);
        }
        if !g.mls.members().any(|m| member_peer(&m) == Some(from)) || from == self.me.peer {
            return refuse(JoinRejection::NotMember);
        }
        let kp = match self.checked_key_package(from, &req.key_package) {
            Ok(kp) => kp,
            Err(r) => return refuse(r),
        };
        let mut effects = self.remove_member(req.group, from, now_ms)?;
        let (response, more) =
            self.add_member(req.group, from, kp, req.key_package, None, now_ms)?;
        effects.extend(more);
        Ok((response, effects))
    }

    /// Replaces this node's dead branch of `group` with the member's Welcome.
    pub fn handle_rejoin_response(
        &mut self,
        group: GroupId,
        from: PeerId,
        response: JoinResponse,
        now_ms: u64,
    ) -> Result<(GroupId, Vec<Effect>), GroupError> {
        let (welcome, name) = match response {
            JoinResponse::Admitted {
                welcome,
                group_name,
                ..
            }
            | JoinResponse::Accepted {
                welcome,
                group_name,
            } => (welcome, group_name),
            JoinResponse::Rejected(r) => return Err(GroupError::JoinRejected(r)),
            JoinResponse::AwaitingApproval { .. } => {
                return Err(GroupError::BadWelcome("a rejoin is never held".into()));
            }
        };
        let fallback_name = self
            .groups
            .get(&group)
            .map(|g| g.meta.name.clone())
            .ok_or(GroupError::UnknownGroup(group))?;
        let source = WelcomeSource {
            group,
            fallback_name,
            fallback_sender: from,
            link: None,
        };
        self.install_welcome(&source, welcome, name, None, now_ms)
    }

    /// No member of the winning branch could add this node again (yet): look again when the
    /// next rival commit or sync shows the fork.
    pub fn rejoin_failed(&mut self, group: &GroupId) {
        if let Some(g) = self.groups.get_mut(group) {
            g.lifecycle.stop_rejoining();
        }
    }
}
