//! What a join tried, so that a join that fails ends with one line a user can act on.
//!
//! A join asks the inviter and members found in the DHT, one after the other; each that
//! cannot help leaves a [`Miss`]. The transport's own error chains go to the node log, not
//! into the [`Trail`]: the user reads what was tried and what to do, e.g. "could not reach any
//! member of the group (tried the inviter at 2 addresses: cannot connect; the DHT named no
//! other member after 3 lookups); is a member online?".

use crate::envelope::JoinRejection;

/// Why one member could not help a join; the join goes on with the next member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Every address failed to connect (details in the log).
    CannotConnect,
    /// Connecting took longer than the per-member limit.
    ConnectTimedOut,
    /// The request failed in transport after connecting (details in the log).
    RequestFailed,
    /// The member did not answer before the join's time limit.
    NoAnswer,
    /// The member still holds the request for approval at the time limit.
    StillAwaitingApproval,
    /// The member answered with a refusal another member may not share (it does not know
    /// the invite yet, is not a member, is busy, or failed).
    Declined(JoinRejection),
}

impl Miss {
    /// Whether the member answered at all.
    pub fn answered(self) -> bool {
        matches!(self, Miss::StillAwaitingApproval | Miss::Declined(_))
    }
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::CannotConnect => f.write_str("cannot connect"),
            Miss::ConnectTimedOut => f.write_str("cannot connect: timed out"),
            Miss::RequestFailed => f.write_str("the request failed"),
            Miss::NoAnswer => f.write_str("no answer in time"),
            Miss::StillAwaitingApproval => f.write_str("still waiting for approval"),
            Miss::Declined(r) => write!(f, "{r}"),
        }
    }
}

/// Members remembered per join for the summary (the count beyond it is still exact).
const MAX_MISSES: usize = 64;

/// What one join tried so far.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    /// Addresses the link gives for the inviter.
    pub inviter_addrs: usize,
    /// Why the inviter could not help, once it was tried.
    pub inviter: Option<Miss>,
    /// Why each other member tried could not help (at most [`MAX_MISSES`]).
    members: Vec<Miss>,
    /// Other members tried, in all.
    members_tried: usize,
    /// DHT lookups made.
    pub lookups: u32,
}

impl Trail {
    /// A trail for a link naming `inviter_addrs` addresses.
    pub fn new(inviter_addrs: usize) -> Trail {
        Trail {
            inviter_addrs,
            ..Trail::default()
        }
    }

    /// Records that a member other than the inviter could not help.
    pub fn member(&mut self, miss: Miss) {
        self.members_tried += 1;
        if self.members.len() < MAX_MISSES {
            self.members.push(miss);
        }
    }

    /// Whether some member answered (and so is online).
    fn someone_answered(&self) -> bool {
        self.inviter.is_some_and(Miss::answered) || self.members.iter().any(|m| m.answered())
    }

    /// What was tried, as a clause: "tried the inviter at 2 addresses: cannot connect, and 3
    /// members found in the DHT: 2 cannot connect, 1 no answer in time".
    fn tried(&self) -> String {
        let mut parts = Vec::new();
        if let Some(miss) = self.inviter {
            let addrs = plural(self.inviter_addrs, "address", "addresses");
            parts.push(format!("the inviter at {addrs}: {miss}"));
        }
        if self.members_tried > 0 {
            // In order of first appearance; at most a dozen kinds, so a list does.
            let mut counts: Vec<(Miss, usize)> = Vec::new();
            for m in &self.members {
                match counts.iter_mut().find(|(k, _)| k == m) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((*m, 1)),
                }
            }
            let why: Vec<String> = counts.iter().map(|(m, n)| format!("{n} {m}")).collect();
            parts.push(format!(
                "{} found in the DHT: {}",
                plural(self.members_tried, "member", "members"),
                why.join(", ")
            ));
            return format!("tried {}", parts.join(", and "));
        }
        let tried = if parts.is_empty() {
            "no member yet".to_owned()
        } else {
            parts.join(", and ")
        };
        let lookups = plural(self.lookups as usize, "lookup", "lookups");
        format!("tried {tried}; the DHT named no other member after {lookups}")
    }

    /// The line for a join that ran out of members to ask.
    pub fn unreachable(&self) -> String {
        if self.someone_answered() {
            format!(
                "no member of the group could add this node ({}); try again later",
                self.tried()
            )
        } else {
            format!(
                "could not reach any member of the group ({}); is a member online?",
                self.tried()
            )
        }
    }

    /// The line for a join that ran out of time after `secs` seconds.
    pub fn timed_out(&self, secs: u64) -> String {
        let hint = if self.someone_answered() {
            "try again later"
        } else {
            "is a member online?"
        };
        format!(
            "the join did not finish within {secs} s ({}); {hint}",
            self.tried()
        )
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_reached_asks_whether_a_member_is_online() {
        let mut t = Trail::new(2);
        t.inviter = Some(Miss::CannotConnect);
        t.lookups = 3;
        assert_eq!(
            t.unreachable(),
            "could not reach any member of the group (tried the inviter at 2 addresses: \
             cannot connect; the DHT named no other member after 3 lookups); is a member online?"
        );
        t.member(Miss::CannotConnect);
        t.member(Miss::NoAnswer);
        t.member(Miss::CannotConnect);
        let line = t.unreachable();
        assert!(
            line.contains("3 members found in the DHT: 2 cannot connect, 1 no answer in time"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn members_that_answered_mean_try_later() {
        let mut t = Trail::new(1);
        t.inviter = Some(Miss::ConnectTimedOut);
        t.member(Miss::Declined(JoinRejection::Busy));
        let line = t.unreachable();
        assert!(
            line.starts_with("no member of the group could add this node"),
            "{line}"
        );
        assert!(line.ends_with("try again later"), "{line}");
        assert!(
            t.timed_out(30)
                .starts_with("the join did not finish within 30 s")
        );
    }

    #[test]
    fn the_summary_stays_bounded() {
        let mut t = Trail::new(3);
        for _ in 0..10_000 {
            t.member(Miss::CannotConnect);
        }
        let line = t.unreachable();
        assert!(line.contains("10000 members") && line.len() < 300, "{line}");
    }
}
