//! Holding a group's live envelopes while history sync fetches older ones, so every
//! sender's messages are read in order (see [`GroupEngine::begin_catch_up`]).

use openmls_traits::OpenMlsProvider;

use super::state::Source;
use super::{Effect, GroupEngine};
use crate::fork::GroupRecords;
use crate::ids::GroupId;

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Starts holding live envelopes of `group` while history sync fetches older ones
    /// (`now_ms` starts the hold's clock, see [`GroupEngine::stale_catch_ups`], unless it is
    /// already holding).
    ///
    /// Why: MLS keeps the keys of skipped generations only for a bounded window per sender
    /// ([`OUT_OF_ORDER_TOLERANCE`]). A node coming back that decrypted a live message first
    /// would move each sender's ratchet past the window, and the older messages sync then
    /// brings could no longer be decrypted. Holding live envelopes (bounded like future-epoch
    /// ones; what falls out is fetched again by sync) and processing them after the fetched
    /// ones keeps every sender's messages in generation order.
    pub fn begin_catch_up(&mut self, group: &GroupId, now_ms: u64) {
        if let Some(g) = self.groups.get_mut(group) {
            g.catching_up.get_or_insert(now_ms);
        }
    }

    /// Holds the live envelopes of every group until a history sync has caught up: after a
    /// start, or after the machine slept, this node may have missed anything.
    pub fn begin_catch_up_all(&mut self, now_ms: u64) {
        for g in self.groups.values_mut() {
            g.catching_up.get_or_insert(now_ms);
        }
    }

    /// Ends a catch-up of `group` after a complete history sync: processes the envelopes
    /// held meanwhile (those whose epoch has been reached, in arrival order) and returns
    /// their effects. They are read with the position guard on: one that would still move
    /// its sender's ratchet too far past a missing message (gossip delivered it late, after
    /// newer ones) goes back to the front of the hold, the catch-up goes on and
    /// [`Effect::Behind`] asks for another sync. Otherwise positions still missing are not
    /// waited for any longer (no member reached had them).
    pub fn end_catch_up(&mut self, group: &GroupId, now_ms: u64) -> Vec<Effect> {
        self.finish_catch_up(group, now_ms, Source::Drained)
    }

    /// Ends a catch-up of `group` that ran out of time: processes everything held, in
    /// arrival order, without the position guard.
    pub fn end_catch_up_now(&mut self, group: &GroupId, now_ms: u64) -> Vec<Effect> {
        self.finish_catch_up(group, now_ms, Source::Held)
    }

    fn finish_catch_up(&mut self, group: &GroupId, now_ms: u64, source: Source) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(g) = self.groups.get_mut(group)
            && let Some(since) = g.catching_up.take()
        {
            self.drain_since = Some(since);
            self.drain_pending(*group, now_ms, &mut effects, source);
            self.drain_since = None;
            self.settle(now_ms, &mut effects);
            if let Some(g) = self.groups.get_mut(group)
                && g.catching_up.is_none()
            {
                g.tracks.forgive();
            }
        }
        effects
    }

    /// Whether `group` is catching up (see [`GroupEngine::begin_catch_up`]).
    pub fn is_catching_up(&self, group: &GroupId) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.catching_up.is_some())
    }

    /// Groups that have held live envelopes for `limit_ms` or longer: the caller ends their
    /// catch-up ([`GroupEngine::end_catch_up`]) so a sync that cannot finish does not keep
    /// the group silent.
    pub fn stale_catch_ups(&self, now_ms: u64, limit_ms: u64) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| {
                g.catching_up
                    .is_some_and(|since| now_ms.saturating_sub(since) >= limit_ms)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Positions of senders that this node knows it has not received, in `group`.
    pub fn missing_messages(&self, group: &GroupId) -> u64 {
        self.groups.get(group).map_or(0, |g| g.tracks.missing())
    }
}
