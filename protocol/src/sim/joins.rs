//! Joins by invite in the simulated world: joiners run the node's join client
//! ([`JoinClient`]) against the world's dials, DHT lookups and join requests; members answer
//! with the node's admission ([`admission::decide`]) and the group engine; a joiner whose
//! Add lost a race joins again with the same link, and a member whose branch lost a deep
//! fork asks to be added again ([`RejoinClient`]), as the node does.

use std::convert::Infallible;

use libp2p_identity::PeerId;

use super::node::{JoinRun, RejoinRun};
use super::{CLOSED_MS, Event, PARTITION_TIMEOUT_MS, World};
use crate::envelope::{JoinRejection, JoinRequest, JoinResponse};
use crate::group::{Effect, LostJoin};
use crate::ids::{GroupId, MessageId};
use crate::join::admission::{self, Admission};
use crate::join::client::{self, JoinClient, JoinPlan, Outcome};
use crate::join::rejoin::{self, RejoinClient};
use crate::sync::scheduler::{self as sched, Trigger};

/// The time limit of one join (the node's default).
pub(super) const JOIN_TIMEOUT_MS: u64 = 120_000;
/// A joiner whose join found nobody or timed out tries again after this pause, as a user
/// would.
pub(super) const JOIN_RETRY_MS: u64 = 5_000;
/// The node syncs a group again these long after joining it (`JOIN_FOLLOW_UP_SYNCS`).
const FOLLOW_UP_MS: [u64; 2] = [2_000, 8_000];

/// An input for one of a node's join clients.
#[derive(Debug, Clone)]
pub(super) enum ClientInput {
    Join(client::Input),
    Rejoin(rejoin::Input),
}

/// How a joiner's attempts ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum JoinEnd {
    /// It is a member (as far as it knows).
    Joined,
    /// A refusal no member would change (used up, …).
    Refused(JoinRejection),
    /// Its Add lost a race and joining again was refused: the group is read-only there.
    Lost(JoinRejection),
}

impl World {
    /// Starts a join of `i` with the run's invite (`prefer`: the member who added it, when
    /// joining again after a lost race).
    pub(super) fn start_join(&mut self, i: usize, prefer: Option<PeerId>, again: bool) {
        let Some(invite) = self.invite.clone() else {
            return;
        };
        if !self.up(i) || self.core(i).join.is_some() {
            return;
        }
        let now_ms = self.now_ms();
        let request = match self.core(i).engine.prepare_join(&invite, now_ms) {
            Ok(r) => r,
            // A member already (its join stands): nothing to do.
            Err(_) => return,
        };
        // The key package's private keys are durable before anyone is asked.
        self.commit_effects(i, Vec::new(), true);
        let plan = JoinPlan {
            group: invite.group,
            me: self.slots[i].peer,
            inviter: invite.inviter,
            inviter_addrs: invite.addrs.clone(),
            prefer,
            timeout_ms: JOIN_TIMEOUT_MS,
        };
        let (client, outs) = JoinClient::start(plan, self.now);
        self.stats.join_attempts += 1;
        self.core(i).join = Some(JoinRun {
            client,
            invite,
            request,
            again,
        });
        self.join_outputs(i, outs);
    }

    /// Performs what `i`'s join client asked for.
    fn join_outputs(&mut self, i: usize, outs: Vec<client::Output>) {
        let life = self.slots[i].life;
        for out in outs {
            match out {
                client::Output::Progress(_) => {}
                client::Output::Dial { op, peer, .. } => {
                    let to = self.index_of(&peer);
                    let connected = to.is_some_and(|t| self.connected(i, t));
                    let delay = match to {
                        _ if connected => self.rng.range(self.cfg.latency_ms),
                        Some(t) if self.up(t) => PARTITION_TIMEOUT_MS,
                        _ => CLOSED_MS,
                    };
                    let input = ClientInput::Join(client::Input::Dialled { op, connected });
                    self.at(
                        delay,
                        Event::ClientInput {
                            node: i,
                            life,
                            input,
                        },
                    );
                }
                client::Output::Lookup { op } => {
                    let peers = self.providers(i);
                    let delay = self.rng.range(self.cfg.latency_ms) * 4;
                    let input = ClientInput::Join(client::Input::Found { op, peers });
                    self.at(
                        delay,
                        Event::ClientInput {
                            node: i,
                            life,
                            input,
                        },
                    );
                }
                client::Output::Request { op, peer } => {
                    let Some(request) = self.core(i).join.as_ref().map(|j| j.request.clone())
                    else {
                        continue;
                    };
                    self.send_join_request(i, peer, request, ClientOp::Join(op));
                }
                client::Output::ScheduleTimer { at } => {
                    let delay = at.saturating_sub(self.now);
                    self.at(delay, Event::ClientTimer { node: i, life });
                }
                client::Output::Done(outcome) => self.join_done(i, outcome),
            }
        }
    }

    /// Members the DHT names for the invite, seen from `i`: those that hold it, announced,
    /// and are reachable.
    fn providers(&self, i: usize) -> Vec<PeerId> {
        let Some(invite) = &self.invite else {
            return Vec::new();
        };
        let now = self.now_ms() / 1000;
        (0..self.slots.len())
            .filter(|&j| j != i && self.connected(i, j))
            .filter(|&j| {
                self.slots[j].core.as_ref().is_some_and(|c| {
                    c.engine.group(&invite.group).is_some_and(|v| v.active)
                        && c.store
                            .invites
                            .get(&invite.id())
                            .is_some_and(|r| r.is_announced(now))
                })
            })
            .map(|j| self.slots[j].peer)
            .collect()
    }

    fn send_join_request(&mut self, i: usize, peer: PeerId, request: JoinRequest, op: ClientOp) {
        let life = self.slots[i].life;
        match self.index_of(&peer) {
            Some(to) => {
                let delay = self.rng.range(self.cfg.latency_ms);
                self.at(
                    delay,
                    Event::JoinRequest {
                        to,
                        from: i,
                        life,
                        op,
                        request: Box::new(request),
                    },
                );
            }
            None => {
                let input = op.failed();
                self.at(
                    CLOSED_MS,
                    Event::ClientInput {
                        node: i,
                        life,
                        input,
                    },
                );
            }
        }
    }

    /// Member `to` answers a join or rejoin request from `from`.
    pub(super) fn on_join_request(
        &mut self,
        to: usize,
        from: usize,
        life: u64,
        op: ClientOp,
        request: JoinRequest,
    ) {
        if !self.connected(from, to) {
            let delay = if self.up(to) {
                PARTITION_TIMEOUT_MS
            } else {
                CLOSED_MS
            };
            let input = op.failed();
            self.at(
                delay,
                Event::ClientInput {
                    node: from,
                    life,
                    input,
                },
            );
            return;
        }
        let response = self.admit(to, from, request);
        let delay = self.rng.range(self.cfg.latency_ms);
        let input = op.answered(response);
        self.at(
            delay,
            Event::ClientInput {
                node: from,
                life,
                input,
            },
        );
    }

    /// What member `to` answers, as the node's `on_join_request` does (every invite here
    /// admits without approval).
    fn admit(&mut self, to: usize, from: usize, request: JoinRequest) -> JoinResponse {
        let peer = self.slots[from].peer;
        let now_ms = self.now_ms();
        let core = self.core(to);
        let store = &core.store;
        let decided = admission::decide(
            &core.engine,
            &mut core.held,
            peer,
            request,
            |id| Ok::<_, Infallible>(store.invites.get(id).cloned()),
            now_ms,
        );
        let answered = match decided {
            Admission::Answer(response) => return response,
            Admission::Refuse(why) => return JoinResponse::Rejected(why),
            Admission::Held(request) => return JoinResponse::AwaitingApproval { request },
            Admission::Rejoin(r) => self.core(to).engine.handle_rejoin_request(peer, r, now_ms),
            Admission::Admit(admit) => {
                let (request, record) = *admit;
                self.core(to)
                    .engine
                    .handle_join_request(peer, request, record, now_ms)
            }
        };
        let Ok((response, effects)) = answered else {
            return JoinResponse::Rejected(JoinRejection::Internal);
        };
        let added = !matches!(response, JoinResponse::Rejected(_));
        // The Add is durable before the answer leaves.
        self.commit_effects(to, effects, true);
        if added {
            self.stats.admitted += 1;
            self.share_invite_states(to, self.group);
        }
        response
    }

    /// The member tells the group the state of its invites after adding someone.
    fn share_invite_states(&mut self, i: usize, group: GroupId) {
        let now_ms = self.now_ms();
        let records: Vec<_> = self.core(i).store.invites.values().cloned().collect();
        if let Ok(fx) = self
            .core(i)
            .engine
            .share_invite_states(group, &records, now_ms)
            && !fx.is_empty()
        {
            self.commit_effects(i, fx, true);
        }
    }

    /// A join client's input or timer.
    pub(super) fn on_client_input(&mut self, i: usize, life: u64, input: Option<ClientInput>) {
        if !self.up(i) || self.slots[i].life != life {
            return;
        }
        let now = self.now;
        match input {
            Some(ClientInput::Join(input)) => {
                let outs = match self.core(i).join.as_mut() {
                    Some(j) => j.client.handle(now, input),
                    None => return,
                };
                self.join_outputs(i, outs);
            }
            Some(ClientInput::Rejoin(input)) => {
                let outs = match self.core(i).rejoin.as_mut() {
                    Some(r) => r.client.handle(now, input),
                    None => return,
                };
                self.rejoin_outputs(i, outs);
            }
            None => {
                let outs = self
                    .core(i)
                    .join
                    .as_mut()
                    .map(|j| j.client.handle(now, client::Input::Timer))
                    .unwrap_or_default();
                self.join_outputs(i, outs);
                let outs = self
                    .core(i)
                    .rejoin
                    .as_mut()
                    .map(|r| r.client.handle(now, rejoin::Input::Timer))
                    .unwrap_or_default();
                self.rejoin_outputs(i, outs);
            }
        }
    }

    /// A join of `i` ended, as the node's `end_join` and `rejoin` take it.
    fn join_done(&mut self, i: usize, outcome: Outcome) {
        let Some(run) = self.core(i).join.take() else {
            return;
        };

        let group = run.invite.group;
        let now_ms = self.now_ms();
        match outcome {
            Outcome::Joined { response, .. } => {
                match self
                    .core(i)
                    .engine
                    .handle_join_response(&run.invite, response, now_ms)
                {
                    Ok((_, fx)) => {
                        self.commit_effects(i, fx, true);
                        self.ends.insert(i, JoinEnd::Joined);
                        self.joined_sync(i, group);
                    }
                    Err(e) => panic!("joiner {i} could not use a member's Welcome: {e}"),
                }
            }
            Outcome::Refused(JoinRejection::AlreadyMember) if run.again => {
                // The join stood after all.
                self.core(i).engine.keep_join(&group);
                self.ends.insert(i, JoinEnd::Joined);
            }
            Outcome::Refused(r) if run.again => {
                self.core(i).engine.join_lost(&group, LostJoin::Refused(r));
                self.ends.insert(i, JoinEnd::Lost(r));
            }
            Outcome::Refused(r) => {
                self.ends.insert(i, JoinEnd::Refused(r));
            }
            Outcome::Unreachable(line) | Outcome::TimedOut(line) if run.again => {
                // As the node: joining again after a lost race that reaches nobody in time
                // leaves the group read-only.
                self.core(i)
                    .engine
                    .join_lost(&group, LostJoin::Unreachable(line));
                self.ends.insert(i, JoinEnd::Lost(JoinRejection::Internal));
            }
            Outcome::Unreachable(_) | Outcome::TimedOut(_) => {
                // A user tries again.
                self.stats.join_retries += 1;
                let life = self.slots[i].life;
                self.at(JOIN_RETRY_MS, Event::JoinStart { node: i, life });
            }
        }
    }

    /// After a join: fetch what was sent in the new epoch, and again twice a little later
    /// (a commit that beat the one adding us shows up then), as the node does.
    fn joined_sync(&mut self, i: usize, group: GroupId) {
        self.sync_input(
            i,
            sched::Input::Sync {
                group,
                trigger: Trigger::Routine,
            },
        );
        let life = self.slots[i].life;
        for pause in FOLLOW_UP_MS {
            self.at(
                pause,
                Event::FollowUp {
                    node: i,
                    life,
                    group,
                },
            );
        }
    }

    /// What the effects of `i` ask of its join clients: join again after a lost race, ask
    /// to be added again after a deep fork.
    pub(super) fn after_effects(&mut self, i: usize) {
        let Some(core) = self.slots[i].core.as_mut() else {
            return;
        };
        let lost = std::mem::take(&mut core.lost);
        for e in lost {
            match e {
                Effect::JoinLost { by, .. } => {
                    self.stats.join_lost += 1;
                    self.ends.remove(&i);
                    self.start_join(i, by, true);
                }
                Effect::DeepForkLost {
                    group,
                    epoch,
                    commit,
                    members,
                } => {
                    self.stats.deep_forks += 1;
                    self.start_rejoin(i, group, epoch, commit, members);
                }
                _ => {}
            }
        }
    }

    fn start_rejoin(
        &mut self,
        i: usize,
        group: GroupId,
        epoch: u64,
        commit: MessageId,
        members: Vec<PeerId>,
    ) {
        if self.core(i).rejoin.is_some() {
            return;
        }
        let (client, outs) = RejoinClient::start(members, self.now);
        self.core(i).rejoin = Some(RejoinRun {
            client,
            group,
            epoch,
            commit,
        });
        self.rejoin_outputs(i, outs);
    }

    fn rejoin_outputs(&mut self, i: usize, outs: Vec<rejoin::Output>) {
        let life = self.slots[i].life;
        for out in outs {
            let Some(run) = self.core(i).rejoin.as_ref() else {
                return;
            };
            let (group, epoch, commit) = (run.group, run.epoch, run.commit);
            match out {
                rejoin::Output::Ask { op, peer } => {
                    match self.core(i).engine.prepare_rejoin(group, epoch, commit) {
                        Ok(request) => {
                            self.commit_effects(i, Vec::new(), true);
                            self.send_join_request(i, peer, request, ClientOp::Rejoin(op));
                        }
                        Err(_) => {
                            let input = ClientInput::Rejoin(rejoin::Input::CannotPrepare { op });
                            self.at(
                                0,
                                Event::ClientInput {
                                    node: i,
                                    life,
                                    input,
                                },
                            );
                        }
                    }
                }
                rejoin::Output::Use { op, peer, response } => {
                    let now_ms = self.now_ms();
                    let ok = match self
                        .core(i)
                        .engine
                        .handle_rejoin_response(group, peer, response, now_ms)
                    {
                        Ok((_, fx)) => {
                            self.commit_effects(i, fx, true);
                            self.joined_sync(i, group);
                            true
                        }
                        Err(_) => false,
                    };
                    let input = ClientInput::Rejoin(rejoin::Input::Used { op, ok });
                    self.at(
                        0,
                        Event::ClientInput {
                            node: i,
                            life,
                            input,
                        },
                    );
                }
                rejoin::Output::ScheduleTimer { at } => {
                    let delay = at.saturating_sub(self.now);
                    self.at(delay, Event::ClientTimer { node: i, life });
                }
                rejoin::Output::Done(ok) => {
                    self.core(i).rejoin = None;
                    if ok {
                        self.stats.rejoined += 1;
                    } else {
                        self.core(i).engine.rejoin_failed(&group);
                    }
                }
            }
        }
    }
}

/// Which client a join request belongs to, and its operation.
#[derive(Debug, Clone, Copy)]
pub(super) enum ClientOp {
    Join(client::OpId),
    Rejoin(client::OpId),
}

impl ClientOp {
    fn failed(self) -> ClientInput {
        match self {
            ClientOp::Join(op) => ClientInput::Join(client::Input::RequestFailed { op }),
            ClientOp::Rejoin(op) => ClientInput::Rejoin(rejoin::Input::Failed { op }),
        }
    }

    fn answered(self, response: JoinResponse) -> ClientInput {
        match self {
            ClientOp::Join(op) => ClientInput::Join(client::Input::Answered { op, response }),
            ClientOp::Rejoin(op) => ClientInput::Rejoin(rejoin::Input::Answered { op, response }),
        }
    }
}
