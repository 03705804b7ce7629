//! The joiner's side of a join by invite, as a sans-IO state machine.
//!
//! [`JoinClient::handle`] takes one [`Input`] and the current time and returns [`Output`]s
//! for its driver: connect to a member, look the invite up in the DHT, send the (already
//! prepared) join request, set a timer, report a [`Stage`], and finally [`Output::Done`]. It
//! never does IO and never reads a clock; the node's engine (`node::engine::join_client`)
//! and the simulator (`crate::sim`) drive it.
//!
//! The rules:
//! - The inviter named in the link is dialled at once (at most [`DIAL_TIMEOUT_MS`]) while the
//!   DHT is searched under the invite's key. Connecting is harmless, so both go on together;
//!   the request itself goes to one member at a time (two members could otherwise both add
//!   us, a fork).
//! - A member to prefer (the one who added us, when joining again after a lost race) is
//!   asked first. Members the DHT names before the inviter answers are asked before it; the
//!   inviter then stays a fallback.
//! - With each member: connect (at most [`DIAL_TIMEOUT_MS`]), send, wait for the answer until
//!   the join's deadline. A member that holds the request for approval gets it again every
//!   [`APPROVAL_RETRY_MS`]. A member that is unreachable, busy, not a member, or does not
//!   know the invite (it may not have heard of it yet) leaves a [`Miss`] and the next is
//!   asked; any other refusal (revoked, expired, used up, denied, …) ends the join.
//! - The inviter created the invite: if it does not know it, nobody does. Once some member
//!   said it does not know the invite, at most [`UNKNOWN_INVITE_LOOKUPS`] lookups are made.
//! - With nobody left to ask, the DHT is asked again after a pause that doubles from
//!   [`LOOKUP_RETRY_MS`] up to [`MAX_LOOKUP_RETRY_MS`] (a node that just started may not have
//!   DHT peers yet, and a member may be announcing right now), until the deadline.

use std::collections::{HashSet, VecDeque};

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

use super::trail::{Miss, Trail};
use crate::envelope::{JoinRejection, JoinResponse};
use crate::ids::GroupId;

/// Milliseconds on the driver's clock (any monotonic origin).
pub type Millis = u64;

/// How long the joiner waits for a connection to one member before trying the next.
pub const DIAL_TIMEOUT_MS: Millis = 5_000;
/// How often a joiner whose request awaits approval sends it again.
pub const APPROVAL_RETRY_MS: Millis = 2_000;
/// Pause after the first DHT lookup that found nobody to ask.
pub const LOOKUP_RETRY_MS: Millis = 1_000;
/// Longest pause between two DHT lookups of one join.
pub const MAX_LOOKUP_RETRY_MS: Millis = 8_000;
/// DHT lookups a join makes at most after a member said it does not know the invite.
pub const UNKNOWN_INVITE_LOOKUPS: u32 = 3;
/// Members found through one DHT lookup that a joiner tries, at most.
pub const MAX_CANDIDATES: usize = 8;

/// The pause after the `lookups`-th DHT lookup of a join found nobody.
pub fn lookup_pause(lookups: u32) -> Millis {
    LOOKUP_RETRY_MS
        .saturating_mul(1 << lookups.saturating_sub(1).min(4))
        .min(MAX_LOOKUP_RETRY_MS)
}

/// Names one operation the client asked for, so its result finds it (a late result of an
/// operation the client gave up on is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// How the joiner came to know a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The inviter named in the link (dial the link's addresses).
    Link,
    /// Found in the DHT under the invite's key.
    Dht,
    /// The member who added this node before (a join again after a lost race).
    Member,
}

impl Via {
    /// `link`, `dht` or `member`, as the join progress events name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Link => "link",
            Via::Dht => "dht",
            Via::Member => "member",
        }
    }
}

/// Where a join stands, for the user (the node turns these into its progress events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Looking for members, within a limit of `timeout_secs`.
    FindingMembers {
        /// The join's time limit.
        timeout_secs: u64,
    },
    /// Connecting to `peer`.
    Contacting {
        /// The member.
        peer: PeerId,
        /// How the joiner knows it.
        via: Via,
    },
    /// The request went to `peer`.
    RequestSent {
        /// The member.
        peer: PeerId,
    },
    /// `peer` holds the request until someone approves it (announced once per member).
    AwaitingApproval {
        /// The member.
        peer: PeerId,
        /// The held request's id.
        request: u64,
    },
    /// `peer` could not help; the next member is asked.
    TryingNext {
        /// The member.
        peer: PeerId,
        /// Why.
        miss: Miss,
    },
    /// `peer` added this node.
    Added {
        /// The member.
        peer: PeerId,
    },
}

/// How a join ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `peer` added this node: complete the join with `response` (a Welcome).
    Joined {
        /// The member.
        peer: PeerId,
        /// Its answer.
        response: JoinResponse,
    },
    /// A refusal no other member would change.
    Refused(JoinRejection),
    /// Nobody left to ask before the deadline; the line says what was tried.
    Unreachable(String),
    /// The deadline passed; the line says what was tried.
    TimedOut(String),
}

/// What the driver does for the client, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Tell the user.
    Progress(Stage),
    /// Connect to `peer` (at `addrs`, or wherever the transport knows it); answer with
    /// [`Input::Dialled`]. The client times the dial out itself.
    Dial {
        /// The operation.
        op: OpId,
        /// The member.
        peer: PeerId,
        /// Addresses to try (the link's for the inviter, else none).
        addrs: Vec<Multiaddr>,
    },
    /// Look the invite up in the DHT; answer with [`Input::Found`] (no one found on failure).
    Lookup {
        /// The operation.
        op: OpId,
    },
    /// Send the join request to `peer`; answer with [`Input::Answered`] or
    /// [`Input::RequestFailed`]. The client times the request out itself.
    Request {
        /// The operation.
        op: OpId,
        /// The member.
        peer: PeerId,
    },
    /// Feed [`Input::Timer`] at `at`; a later `ScheduleTimer` replaces an earlier one, and an
    /// early or extra timer is harmless.
    ScheduleTimer {
        /// When.
        at: Millis,
    },
    /// The join ended; nothing more comes out of this client.
    Done(Outcome),
}

/// What the client consumes (with the time, see [`JoinClient::handle`]).
#[derive(Debug, Clone)]
pub enum Input {
    /// A [`Output::Dial`] ended: connected, or every address failed.
    Dialled {
        /// The operation.
        op: OpId,
        /// Whether a connection stands.
        connected: bool,
    },
    /// A [`Output::Lookup`] found these peers (empty if it failed).
    Found {
        /// The operation.
        op: OpId,
        /// Providers of the invite's key.
        peers: Vec<PeerId>,
    },
    /// The member answered a [`Output::Request`].
    Answered {
        /// The operation.
        op: OpId,
        /// Its answer.
        response: JoinResponse,
    },
    /// A [`Output::Request`] failed in transport.
    RequestFailed {
        /// The operation.
        op: OpId,
    },
    /// The time of a [`Output::ScheduleTimer`] came.
    Timer,
}

/// What the join needs to know of the invite.
#[derive(Debug, Clone)]
pub struct JoinPlan {
    /// The group.
    pub group: GroupId,
    /// This node.
    pub me: PeerId,
    /// The inviter named in the link.
    pub inviter: PeerId,
    /// Its addresses in the link.
    pub inviter_addrs: Vec<Multiaddr>,
    /// A member to ask before anyone else.
    pub prefer: Option<PeerId>,
    /// The join's time limit, ms.
    pub timeout_ms: Millis,
}

/// Where the DHT lookup stands.
#[derive(Debug)]
enum Lookup {
    /// None in flight, none waiting to be used.
    Idle,
    /// In flight.
    Asked(OpId),
    /// Answered while a member was being asked; used when the candidates run out.
    Answered(Vec<PeerId>),
    /// The next lookup is due at this time.
    Paused(Millis),
}

/// What asking the current member waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The connection, until `until`.
    Dial { op: OpId, until: Millis },
    /// The answer, until the deadline.
    Answer { op: OpId },
    /// The time to send a request held for approval again.
    Retry { at: Millis },
}

/// The member being asked.
#[derive(Debug)]
struct Asking {
    peer: PeerId,
    step: Step,
    /// Whether its holding the request for approval was announced.
    announced: bool,
}

/// The joiner's side of one join.
#[derive(Debug)]
pub struct JoinClient {
    plan: JoinPlan,
    deadline: Millis,
    next_op: u64,
    /// The inviter's connection, dialled at the start, while nobody is being asked.
    inviter_dial: Option<(OpId, Millis)>,
    lookup: Lookup,
    lookups: u32,
    /// Members to ask, in order.
    candidates: VecDeque<(PeerId, Vec<Multiaddr>, Via)>,
    /// Whether the first members to ask were found (the start phase ended).
    started: bool,
    asking: Option<Asking>,
    tried: HashSet<PeerId>,
    trail: Trail,
    /// A member said it does not know the invite.
    unknown: bool,
    /// The timer last asked for.
    timer: Option<Millis>,
    done: bool,
}

impl JoinClient {
    /// A join of `plan` starting at `now`, with its first outputs.
    pub fn start(plan: JoinPlan, now: Millis) -> (JoinClient, Vec<Output>) {
        let mut client = JoinClient {
            deadline: now.saturating_add(plan.timeout_ms),
            next_op: 0,
            inviter_dial: None,
            lookup: Lookup::Idle,
            lookups: 1,
            candidates: VecDeque::new(),
            started: false,
            asking: None,
            tried: HashSet::new(),
            trail: Trail::new(plan.inviter_addrs.len()),
            unknown: false,
            timer: None,
            done: false,
            plan,
        };
        let mut out = vec![Output::Progress(Stage::FindingMembers {
            timeout_secs: client.plan.timeout_ms / 1000,
        })];
        let op = client.op();
        client.lookup = Lookup::Asked(op);
        out.push(Output::Lookup { op });
        out.push(Output::Progress(Stage::Contacting {
            peer: client.plan.inviter,
            via: Via::Link,
        }));
        let op = client.op();
        client.inviter_dial = Some((op, client.dial_until(now)));
        out.push(Output::Dial {
            op,
            peer: client.plan.inviter,
            addrs: client.plan.inviter_addrs.clone(),
        });
        if let Some(p) = client.plan.prefer.filter(|p| *p != client.plan.me) {
            client.candidates.push_back((p, Vec::new(), Via::Member));
        }
        client.advance(now, &mut out);
        (client, out)
    }

    /// Whether the join ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes `input` at `now`.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        match input {
            Input::Dialled { op, connected } => self.on_dialled(now, op, connected, &mut out),
            Input::Found { op, peers } => {
                if matches!(self.lookup, Lookup::Asked(o) if o == op) {
                    self.on_found(peers);
                }
            }
            Input::Answered { op, response } => {
                if self.answer_op() == Some(op) {
                    self.on_answer(now, response, &mut out);
                }
            }
            Input::RequestFailed { op } => {
                if self.answer_op() == Some(op) {
                    self.next(now, Miss::RequestFailed, &mut out);
                }
            }
            Input::Timer => self.on_timer(now, &mut out),
        }
        self.advance(now, &mut out);
        out
    }

    fn op(&mut self) -> OpId {
        self.next_op += 1;
        OpId(self.next_op)
    }

    fn dial_until(&self, now: Millis) -> Millis {
        self.deadline.min(now.saturating_add(DIAL_TIMEOUT_MS))
    }

    fn answer_op(&self) -> Option<OpId> {
        match self.asking.as_ref()?.step {
            Step::Answer { op } => Some(op),
            _ => None,
        }
    }

    fn inviter_entry(&self) -> (PeerId, Vec<Multiaddr>, Via) {
        (
            self.plan.inviter,
            self.plan.inviter_addrs.clone(),
            Via::Link,
        )
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Output>) {
        self.done = true;
        self.asking = None;
        out.push(Output::Done(outcome));
    }

    fn timed_out(&mut self, out: &mut Vec<Output>) {
        self.trail.lookups = self.lookups;
        let line = self.trail.timed_out(self.plan.timeout_ms / 1000);
        self.finish(Outcome::TimedOut(line), out);
    }

    /// Sends the request to the member being asked.
    fn send_request(&mut self, out: &mut Vec<Output>) {
        let op = self.op();
        if let Some(a) = &mut self.asking {
            a.step = Step::Answer { op };
            out.push(Output::Request { op, peer: a.peer });
        }
    }

    fn on_dialled(&mut self, now: Millis, op: OpId, connected: bool, out: &mut Vec<Output>) {
        if self.inviter_dial.is_some_and(|(dial, _)| dial == op) {
            self.inviter_dial = None;
            if connected {
                self.candidates.push_back(self.inviter_entry());
            } else {
                self.trail.inviter = Some(Miss::CannotConnect);
            }
            return;
        }
        let Some(a) = &self.asking else { return };
        if !matches!(a.step, Step::Dial { op: o, .. } if o == op) {
            return;
        }
        if connected {
            out.push(Output::Progress(Stage::RequestSent { peer: a.peer }));
            self.send_request(out);
        } else {
            self.next(now, Miss::CannotConnect, out);
        }
    }

    fn on_found(&mut self, peers: Vec<PeerId>) {
        if self.started {
            // Used once the members being asked run out.
            self.lookup = Lookup::Answered(peers);
            return;
        }
        self.lookup = Lookup::Idle;
        let (me, inviter) = (self.plan.me, self.plan.inviter);
        self.candidates.extend(
            peers
                .into_iter()
                .filter(|p| *p != me && *p != inviter)
                .take(MAX_CANDIDATES)
                .map(|p| (p, Vec::new(), Via::Dht)),
        );
    }

    fn on_answer(&mut self, now: Millis, response: JoinResponse, out: &mut Vec<Output>) {
        let Some(peer) = self.asking.as_ref().map(|a| a.peer) else {
            return;
        };
        match response {
            JoinResponse::Accepted { .. } | JoinResponse::Admitted { .. } => {
                out.push(Output::Progress(Stage::Added { peer }));
                self.finish(Outcome::Joined { peer, response }, out);
            }
            JoinResponse::Rejected(
                r @ (JoinRejection::UnknownInvite
                | JoinRejection::NotMember
                | JoinRejection::Internal
                | JoinRejection::Busy),
            ) => self.next(now, Miss::Declined(r), out),
            JoinResponse::Rejected(r) => self.finish(Outcome::Refused(r), out),
            JoinResponse::AwaitingApproval { request } => {
                let at = self.deadline.min(now.saturating_add(APPROVAL_RETRY_MS));
                if let Some(a) = &mut self.asking {
                    if !a.announced {
                        a.announced = true;
                        out.push(Output::Progress(Stage::AwaitingApproval { peer, request }));
                    }
                    a.step = Step::Retry { at };
                }
            }
        }
    }

    fn on_timer(&mut self, now: Millis, out: &mut Vec<Output>) {
        if let Some((_, until)) = self.inviter_dial
            && !self.started
            && now >= until
        {
            self.inviter_dial = None;
            self.trail.inviter = Some(Miss::ConnectTimedOut);
        }
        let Some(step) = self.asking.as_ref().map(|a| a.step) else {
            return;
        };
        match step {
            Step::Dial { until, .. } if now >= until => self.next(now, Miss::ConnectTimedOut, out),
            Step::Answer { .. } if now >= self.deadline => self.next(now, Miss::NoAnswer, out),
            Step::Retry { at } if now >= at => {
                if now >= self.deadline {
                    self.next(now, Miss::StillAwaitingApproval, out);
                } else {
                    self.send_request(out);
                }
            }
            _ => {}
        }
    }

    /// The member being asked could not help.
    fn next(&mut self, now: Millis, miss: Miss, out: &mut Vec<Output>) {
        let Some(a) = self.asking.take() else { return };
        if now >= self.deadline {
            return self.timed_out(out);
        }
        let peer = a.peer;
        if miss == Miss::Declined(JoinRejection::UnknownInvite) {
            // The member who signed the link created the invite: if it does not know it,
            // no one does.
            if peer == self.plan.inviter {
                return self.finish(Outcome::Refused(JoinRejection::UnknownInvite), out);
            }
            self.unknown = true;
        }
        out.push(Output::Progress(Stage::TryingNext { peer, miss }));
        if peer == self.plan.inviter {
            self.trail.inviter = Some(miss);
        } else {
            self.trail.member(miss);
        }
    }

    /// Moves on as far as the state allows without waiting, then sets the timer.
    fn advance(&mut self, now: Millis, out: &mut Vec<Output>) {
        loop {
            if self.done {
                return;
            }
            if now >= self.deadline {
                return self.timed_out(out);
            }
            if !self.started {
                let waiting =
                    self.inviter_dial.is_some() || matches!(self.lookup, Lookup::Asked(_));
                if self.candidates.is_empty() && waiting {
                    break;
                }
                self.started = true;
                if self.inviter_dial.take().is_some() {
                    // Members answered in the DHT first; the inviter stays a fallback.
                    self.candidates.push_back(self.inviter_entry());
                }
            }
            if self.asking.is_some() {
                break;
            }
            if self.candidates.is_empty() {
                match std::mem::replace(&mut self.lookup, Lookup::Idle) {
                    Lookup::Asked(op) => {
                        self.lookup = Lookup::Asked(op);
                        break;
                    }
                    Lookup::Answered(peers) => {
                        let me = self.plan.me;
                        let fresh: Vec<_> = peers
                            .into_iter()
                            .filter(|p| *p != me && !self.tried.contains(p))
                            .take(MAX_CANDIDATES)
                            .map(|p| (p, Vec::new(), Via::Dht))
                            .collect();
                        self.candidates.extend(fresh);
                        continue;
                    }
                    Lookup::Paused(at) if now >= at => {
                        self.lookups += 1;
                        let op = self.op();
                        self.lookup = Lookup::Asked(op);
                        out.push(Output::Lookup { op });
                        continue;
                    }
                    Lookup::Paused(at) => {
                        self.lookup = Lookup::Paused(at);
                        break;
                    }
                    Lookup::Idle => {
                        let pause = lookup_pause(self.lookups);
                        let more = !self.unknown || self.lookups < UNKNOWN_INVITE_LOOKUPS;
                        if now.saturating_add(pause) < self.deadline && more {
                            self.lookup = Lookup::Paused(now + pause);
                            continue;
                        }
                        // Every member reached said it does not know the invite: that is
                        // the answer.
                        if self.unknown {
                            return self
                                .finish(Outcome::Refused(JoinRejection::UnknownInvite), out);
                        }
                        self.trail.lookups = self.lookups;
                        let line = self.trail.unreachable();
                        return self.finish(Outcome::Unreachable(line), out);
                    }
                }
            }
            let Some((peer, addrs, via)) = self.candidates.pop_front() else {
                continue;
            };
            if !self.tried.insert(peer) {
                continue;
            }
            if via != Via::Link {
                // The inviter was announced when its dial started.
                out.push(Output::Progress(Stage::Contacting { peer, via }));
            }
            let op = self.op();
            self.asking = Some(Asking {
                peer,
                step: Step::Dial {
                    op,
                    until: self.dial_until(now),
                },
                announced: false,
            });
            out.push(Output::Dial { op, peer, addrs });
        }
        self.set_timer(out);
    }

    /// Asks for a timer at the earliest time something is due.
    fn set_timer(&mut self, out: &mut Vec<Output>) {
        let mut at = self.deadline;
        if !self.started
            && let Some((_, until)) = self.inviter_dial
        {
            at = at.min(until);
        }
        match self.asking.as_ref().map(|a| a.step) {
            Some(Step::Dial { until, .. }) => at = at.min(until),
            Some(Step::Retry { at: retry }) => at = at.min(retry),
            _ => {}
        }
        if let Lookup::Paused(p) = self.lookup {
            at = at.min(p);
        }
        if self.timer != Some(at) {
            self.timer = Some(at);
            out.push(Output::ScheduleTimer { at });
        }
    }
}
