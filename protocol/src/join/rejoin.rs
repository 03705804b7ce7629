//! Being added again after this node's branch lost a fork deeper than it can roll back, as
//! a sans-IO state machine (the member's side is `GroupEngine::handle_rejoin_request`).
//!
//! Every member of the losing branch asks the members it knows in the same order (sorted by
//! PeerId), so the first member of the winning branch re-adds them one after the other
//! instead of two members re-adding at once (a new race). A member may be busy re-adding
//! another node, or not yet connected after a partition heals: the client goes through the
//! list [`REJOIN_ROUNDS`] times, [`REJOIN_RETRY_MS`] apart, before it gives up until the next
//! sign of the fork. Each member gets [`ASK_TIMEOUT_MS`] to connect and answer.

use libp2p_identity::PeerId;

use super::client::{Millis, OpId};
use crate::envelope::JoinResponse;

/// Rounds of asking every member.
pub const REJOIN_ROUNDS: u32 = 5;
/// Pause between two rounds.
pub const REJOIN_RETRY_MS: Millis = 2_000;
/// How long one member has to connect and answer.
pub const ASK_TIMEOUT_MS: Millis = 5_000;

/// What the driver does for the client, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Prepare a rejoin request (a fresh key package), connect to `peer` and send it; answer
    /// with [`Input::Answered`], [`Input::Failed`] or, if no request could be prepared,
    /// [`Input::CannotPrepare`].
    Ask {
        /// The operation.
        op: OpId,
        /// The member.
        peer: PeerId,
    },
    /// Set up the group from `peer`'s answer; report with [`Input::Used`].
    Use {
        /// The operation.
        op: OpId,
        /// The member.
        peer: PeerId,
        /// Its answer (not a refusal).
        response: JoinResponse,
    },
    /// Feed [`Input::Timer`] at `at` (a later one replaces it; an extra one is harmless).
    ScheduleTimer {
        /// When.
        at: Millis,
    },
    /// Added again (`true`), or nobody could add this node in any round (`false`: the group
    /// waits for the next sign of the fork, `GroupEngine::rejoin_failed`).
    Done(bool),
}

/// What the client consumes.
#[derive(Debug, Clone)]
pub enum Input {
    /// The member answered an [`Output::Ask`].
    Answered {
        /// The operation.
        op: OpId,
        /// Its answer.
        response: JoinResponse,
    },
    /// Connecting or sending failed.
    Failed {
        /// The operation.
        op: OpId,
    },
    /// No request could be prepared (the round ends).
    CannotPrepare {
        /// The operation.
        op: OpId,
    },
    /// An [`Output::Use`] ended: the group is set up (`true`) or the answer was unusable.
    Used {
        /// The operation.
        op: OpId,
        /// Whether it worked.
        ok: bool,
    },
    /// The time of a [`Output::ScheduleTimer`] came.
    Timer,
}

/// What the client waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The answer to asking `members[index]`, until `until`.
    Answer { op: OpId, until: Millis },
    /// Setting up the group from that answer.
    Use { op: OpId },
    /// The next round, at `at`.
    Round { at: Millis },
}

/// One attempt to be added again.
#[derive(Debug)]
pub struct RejoinClient {
    members: Vec<PeerId>,
    round: u32,
    index: usize,
    waiting: Waiting,
    next_op: u64,
    done: bool,
}

impl RejoinClient {
    /// Starts asking `members` at `now`.
    pub fn start(mut members: Vec<PeerId>, now: Millis) -> (RejoinClient, Vec<Output>) {
        members.sort();
        members.dedup();
        let mut client = RejoinClient {
            members,
            round: 0,
            index: 0,
            waiting: Waiting::Round { at: now },
            next_op: 0,
            done: false,
        };
        let mut out = Vec::new();
        client.ask(now, &mut out);
        (client, out)
    }

    /// Whether it ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes `input` at `now`.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        match (input, self.waiting) {
            (Input::Answered { op, response }, Waiting::Answer { op: w, .. }) if op == w => {
                if matches!(response, JoinResponse::Rejected(_)) {
                    self.index += 1;
                    self.ask(now, &mut out);
                } else {
                    let peer = self.members[self.index];
                    self.waiting = Waiting::Use { op };
                    out.push(Output::Use { op, peer, response });
                }
            }
            (Input::Failed { op }, Waiting::Answer { op: w, .. }) if op == w => {
                self.index += 1;
                self.ask(now, &mut out);
            }
            (Input::CannotPrepare { op }, Waiting::Answer { op: w, .. }) if op == w => {
                self.index = self.members.len();
                self.ask(now, &mut out);
            }
            (Input::Used { op, ok }, Waiting::Use { op: w }) if op == w => {
                if ok {
                    self.done = true;
                    out.push(Output::Done(true));
                } else {
                    self.index += 1;
                    self.ask(now, &mut out);
                }
            }
            (Input::Timer, Waiting::Answer { until, .. }) if now >= until => {
                self.index += 1;
                self.ask(now, &mut out);
            }
            (Input::Timer, Waiting::Round { at }) if now >= at => self.ask(now, &mut out),
            _ => {}
        }
        out
    }

    /// Asks the member at `index`, or starts the next round, or gives up.
    fn ask(&mut self, now: Millis, out: &mut Vec<Output>) {
        if self.index >= self.members.len() {
            self.round += 1;
            self.index = 0;
            if self.round >= REJOIN_ROUNDS || self.members.is_empty() {
                self.done = true;
                out.push(Output::Done(false));
                return;
            }
            let at = now.saturating_add(REJOIN_RETRY_MS);
            self.waiting = Waiting::Round { at };
            out.push(Output::ScheduleTimer { at });
            return;
        }
        if let Waiting::Round { at } = self.waiting
            && now < at
        {
            return;
        }
        self.next_op += 1;
        let op = OpId(self.next_op);
        let until = now.saturating_add(ASK_TIMEOUT_MS);
        self.waiting = Waiting::Answer { op, until };
        out.push(Output::Ask {
            op,
            peer: self.members[self.index],
        });
        out.push(Output::ScheduleTimer { at: until });
    }
}
