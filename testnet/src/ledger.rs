//! Who sent what, who received what, and who was up when: the accounting behind delivery
//! ratios and the scenario checks. Pure data, no IO, so the rules are unit-tested.
//!
//! # What "delivered" means
//!
//! A pair (message `m` from node `s`, receiver `r`) is **expected** when all of these hold:
//! 1. `r != s` and `r` was a group member before `m`'s send began;
//! 2. `r` was *ready* without interruption from before `m`'s send began until the check:
//!    its process up, its event stream open, and (after a start, restart, join or heal) its
//!    place in the group topic proven by probe messages both ways. A receiver that was
//!    killed, stopped or restarted in between is excluded: Kith has no history sync yet,
//!    so it cannot get what it missed;
//! 3. no partition separated `s` and `r` at any time between the send and the check.
//!
//! An expected pair is **delivered** when `r`'s event stream showed `m` (same message id).
//! One more exclusion: an undelivered pair whose *sender* went down within
//! [`SENDER_GRACE_MS`] after its send returned is counted as lost with its sender, not as a
//! delivery failure (the node accepted the message and died before gossiping it).

use std::collections::HashMap;

use kith_client::model::{MessageBody, MessageInfo};

/// Texts starting with this are readiness probes, not traffic: they are not counted.
pub const PROBE_PREFIX: &str = "kith-testnet probe ";

/// How soon after a send a sender's death excuses an undelivered message.
pub const SENDER_GRACE_MS: u64 = 2_000;

/// A time window in launcher wall-clock milliseconds; open while `to_ms` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    /// Start.
    pub from_ms: u64,
    /// End, if it ended.
    pub to_ms: Option<u64>,
}

impl Span {
    /// Whether the span covers all of `[from, to]`.
    pub fn covers(&self, from: u64, to: u64) -> bool {
        self.from_ms <= from && self.to_ms.is_none_or(|end| end >= to)
    }

    /// Whether the span contains the instant `t`.
    pub fn contains(&self, t: u64) -> bool {
        self.from_ms <= t && self.to_ms.is_none_or(|end| end >= t)
    }
}

/// One node's history as far as delivery goes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeTimeline {
    /// Its PeerId (to recognise its own messages and its probes).
    pub peer_id: String,
    /// When it became a member of the group (after its join converged).
    pub member_since_ms: Option<u64>,
    /// When it stopped being a member (removed or left), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member_until_ms: Option<u64>,
    /// Windows in which it was ready (see the module docs).
    pub ready: Vec<Span>,
    /// Times its event stream ended while it was supposed to be up.
    pub stream_lost_ms: Vec<u64>,
    /// Events its stream skipped because the launcher fell behind.
    pub lagged: u64,
}

impl NodeTimeline {
    fn is_member_at(&self, t: u64) -> bool {
        self.member_since_ms.is_some_and(|m| m <= t) && self.member_until_ms.is_none_or(|u| t < u)
    }

    /// Whether the node is ready at `t`.
    pub fn ready_at(&self, t: u64) -> bool {
        self.ready.iter().any(|s| s.contains(t))
    }

    /// Whether the node is ready now (an open window).
    pub fn is_ready(&self) -> bool {
        self.ready.last().is_some_and(|s| s.to_ms.is_none())
    }
}

/// A message the launcher sent and the node accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sent {
    /// Launcher sequence number (also in the text).
    pub seq: u64,
    /// Message id the node returned.
    pub id: String,
    /// Sending node.
    pub sender: usize,
    /// When the API call began (launcher clock).
    pub send_start_ms: u64,
    /// When the API call returned.
    pub send_end_ms: u64,
    /// The sender's timestamp in the message.
    pub sent_at_ms: u64,
    /// Text length in bytes.
    pub bytes: usize,
}

/// A send the node refused or that failed in transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SendFailure {
    /// Launcher sequence number.
    pub seq: u64,
    /// The node asked.
    pub sender: usize,
    /// When (launcher clock).
    pub at_ms: u64,
    /// The one-line error.
    pub error: String,
}

/// The first arrival of a message at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Receiver's clock at arrival (from the event).
    pub received_at_ms: u64,
    /// Sender's clock at sending (from the event).
    pub sent_at_ms: u64,
}

/// A partition in effect from `span.from_ms` until its heal converged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionSpan {
    /// Node indices on each side.
    pub sides: Vec<Vec<usize>>,
    /// When.
    pub span: Span,
}

impl PartitionSpan {
    fn separates(&self, a: usize, b: usize) -> bool {
        let side = |n: usize| self.sides.iter().position(|s| s.contains(&n));
        match (side(a), side(b)) {
            (Some(x), Some(y)) => x != y,
            // A node on no side (joined later) is cut off from everyone.
            _ => true,
        }
    }
}

/// A pair that was expected and did not arrive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    /// Sequence number of the message.
    pub seq: u64,
    /// Its sender.
    pub sender: usize,
    /// The receiver that did not get it.
    pub receiver: usize,
}

/// The outcome of counting deliveries for a set of messages (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Accounting {
    /// Messages considered.
    pub messages: usize,
    /// Expected (message, receiver) pairs.
    pub expected: usize,
    /// Expected pairs that arrived.
    pub delivered: usize,
    /// Expected pairs that did not arrive (at most [`MAX_MISSING_LISTED`] listed).
    pub missing: Vec<Missing>,
    /// Pairs left out because the receiver was not ready for the whole window.
    pub excluded_receiver_down: usize,
    /// Undelivered pairs left out because the sender died right after sending.
    pub excluded_sender_down: usize,
    /// Pairs left out because a partition separated sender and receiver.
    pub excluded_partitioned: usize,
    /// Latency (receiver's arrival minus sender's timestamp, ms) of every delivered pair.
    #[serde(skip)]
    pub latencies_ms: Vec<u64>,
    /// Per receiver: (expected, delivered).
    pub per_receiver: Vec<(usize, usize)>,
}

/// How many missing pairs an [`Accounting`] lists.
pub const MAX_MISSING_LISTED: usize = 50;

impl Accounting {
    /// Delivered over expected; 1 when nothing was expected.
    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.delivered as f64 / self.expected as f64
        }
    }

    /// A short description of what is missing, for failure messages.
    pub fn describe_missing(&self) -> String {
        let shown: Vec<String> = self
            .missing
            .iter()
            .take(8)
            .map(|m| format!("#{} {}→{}", m.seq, m.sender, m.receiver))
            .collect();
        let lost = self.expected - self.delivered;
        let more = lost.saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        format!(
            "missing (message sender→receiver): {}{tail}",
            shown.join(", ")
        )
    }
}

/// Everything recorded during a run.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Per node index.
    pub nodes: Vec<NodeTimeline>,
    /// Accepted sends, in order of return.
    pub sent: Vec<Sent>,
    /// Failed sends.
    pub failures: Vec<SendFailure>,
    /// Sends skipped because too many were in flight.
    pub skipped: u64,
    /// Events that repeated a message id already seen at that node.
    pub duplicate_events: u64,
    /// Partitions, in order.
    pub partitions: Vec<PartitionSpan>,
    deliveries: HashMap<String, HashMap<usize, Delivery>>,
    probes: HashMap<(String, usize), u64>,
}

impl Ledger {
    /// Registers node `index` with its PeerId (indices must be added in order).
    pub fn set_node(&mut self, index: usize, peer_id: &str) {
        while self.nodes.len() <= index {
            self.nodes.push(NodeTimeline::default());
        }
        peer_id.clone_into(&mut self.nodes[index].peer_id);
    }

    /// Node `index` became a group member at `now`.
    pub fn set_member(&mut self, index: usize, now: u64) {
        if let Some(n) = self.nodes.get_mut(index) {
            n.member_since_ms.get_or_insert(now);
        }
    }

    /// Node `index` stopped being a group member at `now` (removed or left): messages sent
    /// from then on are not expected to reach it.
    pub fn set_removed(&mut self, index: usize, now: u64) {
        if let Some(n) = self.nodes.get_mut(index) {
            n.member_until_ms.get_or_insert(now);
        }
    }

    /// Node `index` is ready from `now` on.
    pub fn node_ready(&mut self, index: usize, now: u64) {
        if let Some(n) = self.nodes.get_mut(index)
            && !n.is_ready()
        {
            n.ready.push(Span {
                from_ms: now,
                to_ms: None,
            });
        }
    }

    /// Node `index` goes down (or stops listening) at `now`.
    pub fn node_down(&mut self, index: usize, now: u64) {
        if let Some(n) = self.nodes.get_mut(index)
            && let Some(last) = n.ready.last_mut()
            && last.to_ms.is_none()
        {
            last.to_ms = Some(now);
        }
    }

    /// Node `index`'s event stream ended at `now`; if it was supposed to be ready, that is
    /// noted (its deliveries from then on cannot be observed).
    pub fn stream_ended(&mut self, index: usize, now: u64) {
        let ready = self.nodes.get(index).is_some_and(NodeTimeline::is_ready);
        if ready {
            self.nodes[index].stream_lost_ms.push(now);
            self.node_down(index, now);
        }
    }

    /// The event stream of `index` skipped `missed` events.
    pub fn lagged(&mut self, index: usize, missed: u64) {
        if let Some(n) = self.nodes.get_mut(index) {
            n.lagged += missed;
        }
    }

    /// Records a message event seen on node `receiver`'s stream at launcher time `now`.
    /// Own messages are ignored; probes are remembered separately.
    pub fn record_event(&mut self, receiver: usize, m: &MessageInfo, now: u64) {
        let MessageBody::Text { text } = &m.body else {
            return;
        };
        let Some(node) = self.nodes.get(receiver) else {
            return;
        };
        if m.sender == node.peer_id {
            return;
        }
        if text.starts_with(PROBE_PREFIX) {
            self.probes.insert((m.sender.clone(), receiver), now);
            return;
        }
        let at_node = self.deliveries.entry(m.id.clone()).or_default();
        match at_node.entry(receiver) {
            std::collections::hash_map::Entry::Occupied(_) => self.duplicate_events += 1,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Delivery {
                    received_at_ms: m.received_at_ms,
                    sent_at_ms: m.sent_at_ms,
                });
            }
        }
    }

    /// Whether node `receiver` saw a probe from the node with PeerId `sender` at or after
    /// `since`.
    pub fn probe_seen(&self, sender: &str, receiver: usize, since: u64) -> bool {
        self.probes
            .get(&(sender.to_owned(), receiver))
            .is_some_and(|t| *t >= since)
    }

    /// The first arrival of message `id` at `receiver`, if seen.
    pub fn delivery(&self, id: &str, receiver: usize) -> Option<Delivery> {
        self.deliveries.get(id)?.get(&receiver).copied()
    }

    /// Records an accepted send.
    pub fn record_sent(&mut self, sent: Sent) {
        self.sent.push(sent);
    }

    /// Records a failed send.
    pub fn record_failure(&mut self, failure: SendFailure) {
        self.failures.push(failure);
    }

    /// A partition into `sides` begins at `now`.
    pub fn partition_start(&mut self, sides: Vec<Vec<usize>>, now: u64) {
        self.partition_end(now);
        self.partitions.push(PartitionSpan {
            sides,
            span: Span {
                from_ms: now,
                to_ms: None,
            },
        });
    }

    /// The current partition (if any) is over at `now`.
    pub fn partition_end(&mut self, now: u64) {
        if let Some(p) = self.partitions.last_mut()
            && p.span.to_ms.is_none()
        {
            p.span.to_ms = Some(now);
        }
    }

    /// Whether some node that had been ready before `t` was not ready at `t`.
    pub fn someone_down_at(&self, t: u64) -> bool {
        self.nodes
            .iter()
            .any(|n| n.is_member_at(t) && !n.ready_at(t) && n.ready.iter().any(|s| s.from_ms <= t))
    }

    /// Counts deliveries of the sent messages `filter` selects, to every receiver or only
    /// to `only_receiver`, as judged at `check_ms` (see the module docs).
    pub fn account(
        &self,
        filter: impl Fn(&Sent) -> bool,
        only_receiver: Option<usize>,
        check_ms: u64,
    ) -> Accounting {
        let mut acc = Accounting {
            per_receiver: vec![(0, 0); self.nodes.len()],
            ..Accounting::default()
        };
        for m in self.sent.iter().filter(|m| filter(m)) {
            acc.messages += 1;
            let start = m.send_start_ms;
            for (r, node) in self.nodes.iter().enumerate() {
                if r == m.sender || only_receiver.is_some_and(|o| o != r) {
                    continue;
                }
                if !node.is_member_at(start) {
                    continue;
                }
                // A partition is in effect from its start until (not at) the moment its
                // heal converged.
                if self.partitions.iter().any(|p| {
                    p.span.from_ms <= check_ms
                        && p.span.to_ms.is_none_or(|end| end > start)
                        && p.separates(m.sender, r)
                }) {
                    acc.excluded_partitioned += 1;
                    continue;
                }
                if !node.ready.iter().any(|s| s.covers(start, check_ms)) {
                    acc.excluded_receiver_down += 1;
                    continue;
                }
                match self.delivery(&m.id, r) {
                    Some(d) => {
                        acc.expected += 1;
                        acc.delivered += 1;
                        acc.per_receiver[r].0 += 1;
                        acc.per_receiver[r].1 += 1;
                        acc.latencies_ms
                            .push(d.received_at_ms.saturating_sub(d.sent_at_ms));
                    }
                    None => {
                        let sender_died = self.nodes.get(m.sender).is_some_and(|s| {
                            s.ready.iter().any(|span| {
                                span.contains(start)
                                    && span.to_ms.is_some_and(|end| {
                                        end <= m.send_end_ms.saturating_add(SENDER_GRACE_MS)
                                    })
                            })
                        });
                        if sender_died {
                            acc.excluded_sender_down += 1;
                            continue;
                        }
                        acc.expected += 1;
                        acc.per_receiver[r].0 += 1;
                        if acc.missing.len() < MAX_MISSING_LISTED {
                            acc.missing.push(Missing {
                                seq: m.seq,
                                sender: m.sender,
                                receiver: r,
                            });
                        }
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn info(id: &str, sender: &str, text: &str, sent: u64, recv: u64) -> MessageInfo {
        MessageInfo::new(
            id.to_owned(),
            "g".to_owned(),
            1,
            sender.to_owned(),
            (sent, recv),
            MessageBody::Text {
                text: text.to_owned(),
            },
        )
    }

    fn sent(seq: u64, id: &str, sender: usize, at: u64) -> Sent {
        Sent {
            seq,
            id: id.to_owned(),
            sender,
            send_start_ms: at,
            send_end_ms: at + 5,
            sent_at_ms: at + 1,
            bytes: 10,
        }
    }

    /// Three members, all ready from t=100.
    fn three() -> Ledger {
        let mut l = Ledger::default();
        for (i, p) in ["p0", "p1", "p2"].iter().enumerate() {
            l.set_node(i, p);
            l.set_member(i, 100);
            l.node_ready(i, 100);
        }
        l
    }

    #[test]
    fn counts_every_other_member_and_measures_latency() {
        let mut l = three();
        l.record_sent(sent(1, "a", 0, 200));
        l.record_event(1, &info("a", "p0", "x", 201, 211), 212);
        l.record_event(2, &info("a", "p0", "x", 201, 231), 232);
        // The sender's own stream shows its message: not a delivery.
        l.record_event(0, &info("a", "p0", "x", 201, 201), 202);
        let acc = l.account(|_| true, None, 1_000);
        assert_eq!((acc.messages, acc.expected, acc.delivered), (1, 2, 2));
        let mut lat = acc.latencies_ms.clone();
        lat.sort_unstable();
        assert_eq!(lat, vec![10, 30]);
        assert_eq!(acc.ratio(), 1.0);
        // A second arrival at the same node is a duplicate, not a second delivery.
        l.record_event(1, &info("a", "p0", "x", 201, 300), 300);
        assert_eq!(l.duplicate_events, 1);
        assert_eq!(l.account(|_| true, None, 1_000).delivered, 2);
    }

    #[test]
    fn a_missing_pair_is_listed() {
        let mut l = three();
        l.record_sent(sent(7, "b", 1, 200));
        l.record_event(0, &info("b", "p1", "x", 201, 210), 210);
        let acc = l.account(|_| true, None, 1_000);
        assert_eq!((acc.expected, acc.delivered), (2, 1));
        assert_eq!(
            acc.missing,
            vec![Missing {
                seq: 7,
                sender: 1,
                receiver: 2
            }]
        );
        assert!(acc.describe_missing().contains("#7 1→2"));
        assert_eq!(acc.per_receiver, vec![(1, 1), (0, 0), (1, 0)]);
    }

    #[test]
    fn a_receiver_down_between_send_and_check_is_excluded() {
        let mut l = three();
        l.record_sent(sent(1, "before", 0, 200)); // node 2 dies at 300
        l.node_down(2, 300);
        l.record_sent(sent(2, "while", 0, 400));
        l.node_ready(2, 500);
        l.record_sent(sent(3, "after", 0, 600));
        for id in ["before", "while", "after"] {
            l.record_event(1, &info(id, "p0", "x", 0, 0), 0);
        }
        l.record_event(2, &info("after", "p0", "x", 0, 0), 0);
        let acc = l.account(|_| true, None, 1_000);
        assert_eq!(acc.excluded_receiver_down, 2);
        assert_eq!((acc.expected, acc.delivered), (4, 4));
        assert!(l.someone_down_at(400));
        assert!(!l.someone_down_at(600));
        // Node 2 was never down before it first came up.
        assert!(!l.someone_down_at(50));
        // Only node 2, only after its restart.
        let acc = l.account(|m| m.send_start_ms >= 500, Some(2), 1_000);
        assert_eq!((acc.messages, acc.expected, acc.delivered), (1, 1, 1));
    }

    #[test]
    fn a_sender_that_died_right_after_sending_is_excused() {
        let mut l = three();
        l.record_sent(sent(1, "a", 2, 200));
        l.node_down(2, 210);
        let acc = l.account(|_| true, None, 5_000);
        assert_eq!((acc.expected, acc.excluded_sender_down), (0, 2));
        // Long after the grace period, a loss is a loss.
        let mut l = three();
        l.record_sent(sent(1, "a", 2, 200));
        l.node_down(2, 200 + 5 + SENDER_GRACE_MS + 1);
        let acc = l.account(|_| true, None, 9_000);
        assert_eq!((acc.expected, acc.delivered), (2, 0));
    }

    #[test]
    fn partitions_exclude_pairs_across_sides_only() {
        let mut l = three();
        l.partition_start(vec![vec![0, 1], vec![2]], 150);
        l.record_sent(sent(1, "a", 0, 200));
        l.partition_end(300);
        l.record_sent(sent(2, "b", 0, 400));
        // Sent the very millisecond the heal converged: after the partition.
        l.record_sent(sent(3, "c", 0, 300));
        l.record_event(1, &info("a", "p0", "x", 0, 0), 0);
        l.record_event(1, &info("b", "p0", "x", 0, 0), 0);
        l.record_event(2, &info("b", "p0", "x", 0, 0), 0);
        l.record_event(1, &info("c", "p0", "x", 0, 0), 0);
        l.record_event(2, &info("c", "p0", "x", 0, 0), 0);
        let acc = l.account(|_| true, None, 1_000);
        assert_eq!(acc.excluded_partitioned, 1);
        assert_eq!((acc.expected, acc.delivered), (5, 5));
    }

    #[test]
    fn non_members_and_probes_do_not_count() {
        let mut l = three();
        l.set_node(3, "p3");
        l.node_ready(3, 100);
        l.record_sent(sent(1, "a", 0, 200));
        l.set_member(3, 300);
        l.record_event(1, &info("a", "p0", "x", 0, 0), 0);
        l.record_event(2, &info("a", "p0", "x", 0, 0), 0);
        l.record_event(2, &info("probe", "p1", "kith-testnet probe 1 x", 0, 0), 250);
        assert!(l.probe_seen("p1", 2, 250));
        assert!(!l.probe_seen("p1", 2, 251));
        assert!(!l.probe_seen("p0", 2, 0));
        let acc = l.account(|_| true, None, 1_000);
        assert_eq!((acc.expected, acc.delivered), (2, 2));
    }

    #[test]
    fn a_lost_stream_closes_the_window() {
        let mut l = three();
        l.stream_ended(1, 150);
        assert_eq!(l.nodes[1].stream_lost_ms, vec![150]);
        // A stream ending after the node was taken down is expected.
        l.node_down(2, 150);
        l.stream_ended(2, 160);
        assert!(l.nodes[2].stream_lost_ms.is_empty());
    }
}
