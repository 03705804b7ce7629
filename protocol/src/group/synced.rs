//! Reading what a history sync fetched in each sender's position order.
//!
//! The envelopes of one sync run come from several answers: several members, and for an
//! epoch of which this node holds many messages, several range requests that each cover a
//! slice of the id space. Each answer is in history order, but concatenated they are not:
//! the second answer's messages are older than the first one's last. A sender's ratchet
//! keeps only [`crate::order::OUT_OF_ORDER_TOLERANCE`] skipped keys, so reading a batch in
//! that order loses every message more than the window behind one read before it.
//!
//! A node cannot sort by position without decrypting (the position is inside the
//! ciphertext), so it looks first: it decrypts the batch's messages of an epoch on a scratch
//! copy of the group, notes each one's sender and position, and throws the scratch state
//! away (a storage savepoint, undone). Then it reads them for real, each sender's in
//! position order. Looking costs one more decryption per fetched message; live messages
//! are not affected.

use std::collections::HashMap;

use openmls::prelude::{
    BasicCredential, MlsMessageIn, ProcessedMessageContent, tls_codec::Deserialize as _,
};
use openmls_traits::OpenMlsProvider;

use super::branch::load_mls;
use super::state::Source;
use super::{Effect, GroupEngine, Verdict};
use crate::envelope::{AppContent, Envelope, PayloadKind};
use crate::fork::GroupRecords;
use crate::ids::{GroupId, MessageId};

/// How many times the look goes over the messages it could not read yet, in the batch's
/// order: a round reads on a ratchet that its own earlier messages moved, so a message far
/// behind one of them is only read in a later round (each round starts from the real state
/// again). Two answers concatenated need two rounds.
const LOOK_ROUNDS: usize = 3;

impl<P: OpenMlsProvider> GroupEngine<P>
where
    P::StorageProvider: GroupRecords,
{
    /// Handles a batch of envelopes fetched by history sync, like
    /// [`GroupEngine::handle_synced_envelope`] on each, but reads each sender's application
    /// messages of an epoch in position order, whatever order the batch has them in (see
    /// this module). Give the batch sorted by epoch, each epoch's commits after its
    /// application messages. Returns each envelope's id and verdict, in the order they were
    /// processed, and the effects of all of them.
    pub fn handle_synced_batch(
        &mut self,
        envelopes: Vec<Vec<u8>>,
        now_ms: u64,
    ) -> (Vec<(MessageId, Verdict)>, Vec<Effect>) {
        let mut effects = Vec::new();
        let mut verdicts = Vec::with_capacity(envelopes.len());
        let mut rest = envelopes.into_iter().peekable();
        while let Some(first) = rest.next() {
            let mut run = vec![first];
            if let Some(key) = app_run_key(&run[0]) {
                while rest
                    .peek()
                    .is_some_and(|next| app_run_key(next) == Some(key))
                {
                    run.extend(rest.next());
                }
                if run.len() > 1 {
                    run = self.in_position_order(key.0, key.1, run);
                }
            }
            for bytes in run {
                let verdict = self.process(&bytes, now_ms, &mut effects, Source::Synced);
                self.settle(now_ms, &mut effects);
                verdicts.push((MessageId::of(&bytes), verdict));
            }
        }
        (verdicts, effects)
    }

    /// `run` (application messages of `group` at `epoch`) with each sender's messages in
    /// position order. Messages whose position cannot be learnt (not readable now, sent
    /// before positions existed, garbage) keep their place.
    fn in_position_order(&mut self, group: GroupId, epoch: u64, run: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let readable = self.groups.get(&group).is_some_and(|g| {
            g.lifecycle.lost().is_none() && g.mls.is_active() && epoch <= g.epoch()
        });
        if !readable {
            return run;
        }
        let mut positions: Vec<Option<(Vec<u8>, u64)>> = vec![None; run.len()];
        for _ in 0..LOOK_ROUNDS {
            let todo: Vec<usize> = (0..run.len()).filter(|&i| positions[i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            let learnt = self.look(group, todo.iter().map(|&i| run[i].as_slice()));
            let mut progress = false;
            for (i, p) in todo.into_iter().zip(learnt) {
                if p.is_some() {
                    progress = true;
                    positions[i] = p;
                }
            }
            if !progress {
                break;
            }
        }
        // What the rounds could not read is looked at alone, each from the real state: a
        // message still readable at all is read that way (a shuffled batch costs one load
        // of the group per message; answers in history order never get here).
        for i in 0..run.len() {
            if positions[i].is_none() {
                positions[i] = self
                    .look(group, std::iter::once(run[i].as_slice()))
                    .pop()
                    .flatten();
            }
        }
        reorder(run, &positions)
    }

    /// Decrypts `envelopes` in order on a scratch copy of `group` and returns each one's
    /// sender (credential identity) and position, where readable. The storage is put back
    /// as it was before.
    fn look<'a>(
        &self,
        group: GroupId,
        envelopes: impl Iterator<Item = &'a [u8]>,
    ) -> Vec<Option<(Vec<u8>, u64)>> {
        let storage = self.provider.storage();
        let savepoint = storage.savepoint();
        let mut out = Vec::new();
        match load_mls(storage, &group) {
            Ok(mut scratch) => {
                for bytes in envelopes {
                    let position = Envelope::decode(bytes)
                        .ok()
                        .and_then(|e| MlsMessageIn::tls_deserialize_exact(e.mls()).ok())
                        .and_then(|m| m.try_into_protocol_message().ok())
                        .and_then(|m| scratch.process_message(&self.provider, m).ok())
                        .and_then(|p| {
                            let who = BasicCredential::try_from(p.credential().clone())
                                .ok()?
                                .identity()
                                .to_vec();
                            match p.into_content() {
                                ProcessedMessageContent::ApplicationMessage(app) => {
                                    let seq = AppContent::decode(&app.into_bytes()).ok()?.seq()?;
                                    Some((who, seq))
                                }
                                _ => None,
                            }
                        });
                    out.push(position);
                }
            }
            Err(e) => {
                tracing::warn!(group = %group.short(), error = %e, "cannot load a scratch copy to order synced messages");
            }
        }
        if let Err(e) = storage.undo(savepoint) {
            // Only a failing store gets here; the real reads below then fail the same way.
            tracing::error!(group = %group.short(), error = %e, "cannot undo a look at synced messages");
        }
        out
    }
}

/// The group and epoch of an application envelope (the runs [`GroupEngine::handle_synced_batch`]
/// orders), `None` for anything else.
fn app_run_key(bytes: &[u8]) -> Option<(GroupId, u64)> {
    let e = Envelope::decode(bytes).ok()?;
    (e.kind() == PayloadKind::Application).then(|| (e.group(), e.epoch()))
}

/// Puts each sender's messages into ascending position order, in the places its messages
/// already occupy (so senders stay interleaved as they were, and unknown ones stay put).
fn reorder(run: Vec<Vec<u8>>, positions: &[Option<(Vec<u8>, u64)>]) -> Vec<Vec<u8>> {
    let mut places: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, p) in positions.iter().enumerate() {
        if let Some((who, _)) = p {
            places.entry(who.as_slice()).or_default().push(i);
        }
    }
    let mut slots: Vec<Option<Vec<u8>>> = run.into_iter().map(Some).collect();
    let mut out: Vec<Option<Vec<u8>>> = vec![None; slots.len()];
    for (i, p) in positions.iter().enumerate() {
        if p.is_none() {
            out[i] = slots[i].take();
        }
    }
    for idx in places.values() {
        let mut by_seq: Vec<usize> = idx.clone();
        by_seq.sort_by_key(|&i| positions[i].as_ref().map(|(_, s)| *s));
        for (&place, &from) in idx.iter().zip(&by_seq) {
            out[place] = slots[from].take();
        }
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorder_sorts_each_sender_in_its_own_places() {
        let run: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i]).collect();
        let a = b"a".to_vec();
        let b = b"b".to_vec();
        let positions = vec![
            Some((a.clone(), 9)),
            Some((b.clone(), 2)),
            None,
            Some((a.clone(), 3)),
            Some((b.clone(), 1)),
            Some((a.clone(), 5)),
        ];
        let out = reorder(run, &positions);
        // a's places 0, 3, 5 get positions 3, 5, 9 (items 3, 5, 0); b's places 1, 4 get
        // items 4, 1; the unknown item 2 stays.
        assert_eq!(
            out,
            vec![vec![3], vec![4], vec![2], vec![5], vec![1], vec![0]]
        );
    }
}
