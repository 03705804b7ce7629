//! The concurrent-commit rule inside the engine (see docs/PROTOCOL.md, "Concurrent
//! commits"): checkpoints before each commit, rival commits judged (lowest id wins), a
//! rollback to the winning branch, and this node's lost work redone after it.

use libp2p_identity::PeerId;
use openmls::prelude::{MlsGroup, ProtocolMessage};
use openmls_traits::OpenMlsProvider;

use super::local::removal_id;
use super::members::{member_peer, self_remove_pending};
use super::receive::Incoming;
use super::state::{Group, Redo, Source, hold_orphan};
use super::{Effect, GroupEngine, GroupError, IgnoreReason, Step, Verdict, mls_err};
use crate::fork::{self, Applied, GroupRecords, OwnChange, REWIND_DEPTH};
use crate::ids::{GroupId, MessageId};
use crate::invite::InviteUpdate;
use crate::order::Tracks;
use crate::seal::SealKey;

/// Saves the checkpoint of `group` at its current epoch `epoch`: the state a commit made in
/// this epoch applies to. Call it before creating or merging any commit.
pub(super) fn checkpoint<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    epoch: u64,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    fork::save_checkpoint(provider.storage(), &group, epoch).map_err(mls_err)
}

/// Records a merged commit in the group's branch, drops the checkpoints that fell out of
/// the rewind window and the kept messages beyond [`fork::MAX_RESEND`], and persists the
/// branch.
pub(super) fn note_applied<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    g: &mut Group,
    applied: Applied,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let storage = provider.storage();
    g.branch.applied.retain(|a| a.epoch < applied.epoch);
    if g.branch
        .joined
        .as_ref()
        .is_some_and(|j| j.epoch + (REWIND_DEPTH as u64) < applied.epoch)
    {
        g.branch.joined = None;
    }
    let own_add = matches!(applied.own, Some(OwnChange::Add { .. }));
    g.branch.applied.push(applied);
    while g.branch.applied.len() > REWIND_DEPTH {
        let old = g.branch.applied.remove(0);
        fork::delete_checkpoint(storage, &group, old.epoch).map_err(mls_err)?;
        g.branch.older.push((old.epoch, old.commit));
    }
    let excess = g.branch.older.len().saturating_sub(fork::MAX_OLDER);
    g.branch.older.drain(..excess);
    if own_add {
        // Members from this epoch on must not read what was said before it.
        super::resend::note_added(storage, &group, g.epoch())?;
    }
    // The new epoch's re-send key, while its secrets are at hand.
    super::resend::note_epoch_key(provider, &group, &g.mls)?;
    fork::trim_sent(storage, &group).map_err(mls_err)?;
    fork::save_branch(storage, &group, &g.branch).map_err(mls_err)
}

/// Loads a group's MLS state from storage.
pub(super) fn load_mls<
    S: openmls_traits::storage::StorageProvider<{ openmls_traits::storage::CURRENT_VERSION }>,
>(
    storage: &S,
    group: &GroupId,
) -> Result<MlsGroup, GroupError> {
    let mls_id = openmls::group::GroupId::from_slice(group.as_bytes());
    MlsGroup::load(storage, &mls_id)
        .map_err(mls_err)?
        .ok_or_else(|| GroupError::Mls("group state missing after restore".into()))
}

/// Undoes a rollback attempt: puts back the state saved at `cur` and drops that checkpoint.
fn put_back<P: OpenMlsProvider>(
    provider: &P,
    group: GroupId,
    g: &mut Group,
    cur: u64,
    was_leaving: bool,
) -> Result<(), GroupError>
where
    P::StorageProvider: GroupRecords,
{
    let storage = provider.storage();
    fork::restore_checkpoint(storage, &group, cur).map_err(mls_err)?;
    g.mls = load_mls(storage, &group)?;
    g.lifecycle.set_leaving(was_leaving);
    fork::delete_checkpoint(storage, &group, cur).map_err(mls_err)
}

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// A commit for an epoch this node has already left: a rival of the commit it merged
    /// there. The lowest envelope id wins; if the rival wins, roll back and take it.
    pub(super) fn consider_rival(
        &mut self,
        msg: Incoming<'_>,
        message: ProtocolMessage,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let Incoming {
            group: group_id,
            envelope,
            id,
            bytes,
            ..
        } = msg;
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let e = envelope.epoch();
        if let Some(j) = &g.branch.joined
            && e == j.epoch
            && id != j.commit
        {
            if id < j.commit && g.lifecycle.settled() {
                tracing::warn!(
                    group = %group_id.short(),
                    epoch = e,
                    "the commit that added this node lost to a concurrent one; joining again"
                );
                g.lifecycle.start_rejoining();
                effects.push(Effect::JoinLost {
                    group: group_id,
                    link: j.link.clone(),
                    by: j.by.as_deref().and_then(|b| PeerId::from_bytes(b).ok()),
                });
            }
            return Verdict::Ignore(IgnoreReason::RivalOfJoin { epoch: e });
        }
        let ours = match g.branch.at(e) {
            Some(a) => a.commit,
            None => {
                // Commits of the other branch after the split also look like rivals; only the
                // lowest epoch seen decides (history sync sends commits in epoch order).
                let split = g.deep_rival.is_none_or(|r| e < r);
                if split && e >= g.branch.since {
                    g.deep_rival = Some(e);
                    let ours = g.branch.older.iter().find(|(x, _)| *x == e).map(|x| x.1);
                    if ours.is_none_or(|ours| id < ours) {
                        g.deep_forks += 1;
                        tracing::warn!(
                            group = %group_id.short(),
                            epoch = e,
                            "a rival commit for an epoch beyond the rewind window: deep fork"
                        );
                    }
                    // Our branch lost further back than we can roll back: be added again by a
                    // member of the winning branch (it checks it holds this commit).
                    if ours.is_some_and(|ours| id < ours) && g.lifecycle.settled() && g.active() {
                        g.lifecycle.start_rejoining();
                        let me = self.me.peer;
                        effects.push(Effect::DeepForkLost {
                            group: group_id,
                            epoch: e,
                            commit: id,
                            members: g
                                .view()
                                .members
                                .into_iter()
                                .map(|(_, p)| p)
                                .filter(|p| *p != me)
                                .collect(),
                        });
                    }
                }
                return Verdict::Ignore(IgnoreReason::BeyondRewind { epoch: e });
            }
        };
        if ours == id {
            return Verdict::Ignore(IgnoreReason::AlreadyMerged);
        }
        if ours < id {
            hold_orphan(g, e, bytes);
            return Verdict::Ignore(IgnoreReason::LosingCommit {
                epoch: e,
                winner: ours,
            });
        }
        self.switch_branch(msg, message, effects)
    }

    /// Rolls `group_id` back to the epoch of `envelope` and merges its commit, if it is valid
    /// there; otherwise leaves the group as it was. On success the lost commits and own
    /// messages are redone by [`GroupEngine::settle`].
    fn switch_branch(
        &mut self,
        msg: Incoming<'_>,
        message: ProtocolMessage,
        effects: &mut Vec<Effect>,
    ) -> Verdict {
        let Incoming {
            group: group_id,
            envelope,
            id,
            bytes,
            ..
        } = msg;
        let e = envelope.epoch();
        let Some(g) = self.groups.get_mut(&group_id) else {
            return Verdict::Ignore(IgnoreReason::NotMember);
        };
        let cur = g.epoch();
        let was_leaving = g.lifecycle.leaving();
        let was_member = g.mls.is_active();
        // A commit removing this node held at `cur` belongs to the branch being left.
        let held = g.removal.take();
        let tip_members: Vec<PeerId> = g.mls.members().filter_map(|m| member_peer(&m)).collect();
        let storage = self.provider.storage();
        if let Err(err) = checkpoint(&self.provider, group_id, cur) {
            return Verdict::Ignore(IgnoreReason::Failed {
                step: Step::CheckpointBeforeRollback,
                detail: err.to_string(),
            });
        }
        let restored = fork::restore_checkpoint(storage, &group_id, e)
            .map_err(mls_err)
            .and_then(|found| {
                if !found {
                    return Err(GroupError::Mls(format!("no checkpoint for epoch {e}")));
                }
                load_mls(storage, &group_id)
            });
        match restored {
            Ok(mls) => {
                g.lifecycle
                    .set_leaving(was_leaving || self_remove_pending(&mls));
                g.mls = mls;
            }
            Err(err) => {
                let _ = put_back(&self.provider, group_id, g, cur, was_leaving);
                g.removal = held;
                return Verdict::Ignore(IgnoreReason::Failed {
                    step: Step::RollBack { epoch: e },
                    detail: err.to_string(),
                });
            }
        }
        let lost: Vec<Applied> = g
            .branch
            .applied
            .iter()
            .filter(|a| a.epoch >= e)
            .cloned()
            .collect();
        let saved_branch = g.branch.clone();
        // Members at the fork point that the losing branch had removed.
        let excluded: Vec<PeerId> = g
            .mls
            .members()
            .filter_map(|m| member_peer(&m))
            .filter(|p| !tip_members.contains(p))
            .collect();
        let mut fx = Vec::new();
        let verdict = self.process_mls(msg, message, &mut fx);
        let Some(g) = self.groups.get_mut(&group_id) else {
            return verdict;
        };
        if verdict != Verdict::Accept {
            // Not valid on our branch at that epoch: it belongs to another branch. Keep ours.
            g.branch = saved_branch;
            if let Err(err) = put_back(&self.provider, group_id, g, cur, was_leaving) {
                tracing::error!(group = %group_id.short(), "cannot restore the branch: {err}");
            }
            g.removal = held;
            hold_orphan(g, e, bytes);
            return Verdict::Ignore(IgnoreReason::OtherBranch { epoch: e });
        }
        let storage = self.provider.storage();
        if let Some(old) = held {
            // Kept as an orphan in case the branch wins again; its record goes unless the
            // winning commit is held in its place.
            hold_orphan(g, old.record.epoch, &old.record.bytes);
            if g.removal.is_none()
                && let Err(err) = super::removal::forget_held(storage, &group_id)
            {
                tracing::warn!(group = %group_id.short(), "cannot delete a held removal: {err}");
            }
        }
        for a in lost.iter().filter(|a| a.epoch > e) {
            let _ = fork::delete_checkpoint(storage, &group_id, a.epoch);
        }
        let _ = fork::delete_checkpoint(storage, &group_id, cur);
        g.rollbacks += 1;
        // Positions seen on the losing branch say nothing about the winning one.
        g.tracks = Tracks::default();
        g.retry = true;
        tracing::info!(
            group = %group_id.short(),
            from = cur,
            to = e,
            winner = %id.short(),
            "left a losing branch"
        );
        let lost_commits: Vec<MessageId> = lost.iter().map(|a| a.commit).collect();
        let mut forget_history = lost_commits.clone();
        forget_history.extend(lost_commits.iter().map(removal_id));
        effects.push(Effect::RolledBack {
            group: group_id,
            to_epoch: e,
            lost_commits,
            forget_history,
        });
        // Invite uses counted by the lost commits no longer count.
        for id in lost.iter().filter_map(|a| a.invite) {
            effects.push(Effect::Invite(InviteUpdate::Unused {
                group: group_id,
                id,
            }));
        }
        effects.extend(fx);
        if !was_member && g.mls.is_active() {
            // Removed on the losing branch, a member on the winning one: listen again.
            effects.push(Effect::Subscribe(
                g.topic,
                SealKey::of(&self.network, &group_id),
            ));
        }
        // The messages this node encrypted on the lost branch; one rolled back earlier and
        // not re-sent yet is now listed here only.
        let messages = fork::sent_after(self.provider.storage(), &group_id, e).unwrap_or_else(|err| {
            tracing::warn!(group = %group_id.short(), "cannot read own messages to re-send: {err}");
            Vec::new()
        });
        for r in &mut g.redo {
            r.messages
                .retain(|m| !messages.iter().any(|n| n.id == m.id));
        }
        g.redo.push(Redo {
            lost,
            messages,
            excluded,
        });
        Verdict::Accept
    }

    /// After envelopes were handled: while a rollback happened, retries the orphans (they may
    /// belong to the winning branch), then redoes what the lost branch did of this node's
    /// own: its messages are re-sent, its changes proposed again.
    pub(super) fn settle(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        // Each pass either changes nothing or moves a group to a branch whose commit at some
        // epoch has a lower id than before; the commits seen are finite, so this ends.
        while let Some(gid) = self.groups.iter().find(|(_, g)| g.retry).map(|(id, _)| *id) {
            let Some(g) = self.groups.get_mut(&gid) else {
                break;
            };
            g.retry = false;
            let orphans = std::mem::take(&mut g.orphans);
            g.orphan_bytes = 0;
            for o in orphans {
                let _ = self.process(&o.bytes, now_ms, effects, Source::Synced);
            }
        }
        let todo: Vec<(GroupId, Vec<Redo>)> = self
            .groups
            .iter_mut()
            .filter(|(_, g)| !g.redo.is_empty())
            .map(|(id, g)| (*id, std::mem::take(&mut g.redo)))
            .collect();
        for (gid, redo) in todo {
            for r in redo {
                match self.redo_lost(gid, r, now_ms, effects) {
                    Ok(Some(waiting)) => {
                        if let Some(g) = self.groups.get_mut(&gid) {
                            g.redo.push(waiting);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(group = %gid.short(), "cannot redo work of a lost branch: {e}")
                    }
                }
            }
        }
    }

    /// Proposes this node's lost changes again, in the order it first made them, then
    /// re-sends its lost messages: removals first, so a message written after a member's
    /// removal is never encrypted to that member. If a member removed on the lost branch is
    /// still in the group (another member's removal, not re-proposed yet), the messages wait:
    /// the returned [`Redo`] is tried again after the next envelope.
    fn redo_lost(
        &mut self,
        gid: GroupId,
        redo: Redo,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<Option<Redo>, GroupError> {
        let Some(g) = self.groups.get(&gid) else {
            return Ok(None);
        };
        if g.removal.is_some() && g.mls.is_active() {
            // Nothing is redone by a node about to be removed; if its removal loses, it is
            // a member and redoes it then.
            return Ok(Some(redo));
        }
        if !g.mls.is_active() || g.lifecycle.leaving() {
            return Ok(None);
        }
        for a in &redo.lost {
            match &a.own {
                Some(OwnChange::Update) => effects.extend(self.self_update(gid, now_ms)?),
                Some(OwnChange::Remove(peer)) => {
                    let Ok(peer) = PeerId::from_bytes(peer) else {
                        continue;
                    };
                    let still = self
                        .group(&gid)
                        .is_some_and(|v| v.members.iter().any(|(_, p)| *p == peer));
                    if still {
                        effects.extend(self.remove_member(gid, peer, now_ms)?);
                    }
                }
                Some(OwnChange::Add { .. }) => {
                    // The joiner holds a Welcome into the losing branch; re-adding it needs a
                    // new Welcome delivered to it (not implemented yet: it must join again).
                    tracing::warn!(group = %gid.short(), "a member this node added was on a losing branch");
                }
                Some(OwnChange::Proposals) | None => {}
            }
        }
        let members = self.group(&gid).map(|v| v.members).unwrap_or_default();
        let back: Vec<PeerId> = redo
            .excluded
            .iter()
            .copied()
            .filter(|p| members.iter().any(|(_, m)| m == p))
            .collect();
        if !back.is_empty() && !redo.messages.is_empty() {
            tracing::info!(
                group = %gid.short(),
                messages = redo.messages.len(),
                "re-sending lost messages once the members removed on the lost branch are removed again"
            );
            return Ok(Some(Redo {
                lost: Vec::new(),
                messages: redo.messages,
                excluded: back,
            }));
        }
        for m in redo.messages {
            fork::delete_sent(self.provider.storage(), &gid, &m).map_err(mls_err)?;
            let (_, fx) = self.send_content(gid, m.id, m.sent_at_ms, m.said, now_ms)?;
            effects.extend(fx);
        }
        Ok(None)
    }

    /// Compares the commits a member holds (`(epoch, commit id)`, from its sync summary) with
    /// this node's branch. Returns the first epoch where they differ, and counts it: the
    /// member and this node are on different branches. History sync then brings each side
    /// the other's commits, and the concurrent-commit rule decides.
    pub fn detect_fork(
        &mut self,
        group: &GroupId,
        held: impl IntoIterator<Item = (u64, MessageId)>,
    ) -> Option<u64> {
        let g = self.groups.get_mut(group)?;
        let epoch = held
            .into_iter()
            .find(|(e, c)| g.branch.commit_at(*e).is_some_and(|ours| ours != *c))
            .map(|(e, _)| e)?;
        g.forks_detected += 1;
        Some(epoch)
    }
}
