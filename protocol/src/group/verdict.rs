//! The gossip verdict on a received envelope and why: [`Verdict`] carries a
//! [`RejectReason`] or an [`IgnoreReason`], never free text.
//!
//! `Display` gives the log text and [`RejectReason::label`] / [`IgnoreReason::label`] the
//! bounded metric label. Both are exhaustive matches, so a new reason does not compile until
//! it says how it is logged and counted: the labels cannot drift from what the engine emits.

use crate::codec::DecodeError;
use crate::envelope::EnvelopeError;
use crate::ids::MessageId;
use crate::order::Undecryptable;

/// The gossip validation result for a received envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: processed, forward it.
    Accept,
    /// Invalid: garbage or forged; do not forward, penalise the source.
    Reject(RejectReason),
    /// Cannot judge (not our group, future epoch, duplicate): do not forward, no penalty.
    Ignore(IgnoreReason),
}

/// Why an envelope is invalid (see [`Verdict::Reject`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The bytes are not an envelope.
    #[error("{0}")]
    Envelope(EnvelopeError),
    /// The envelope does not carry an MLS protocol message.
    #[error("not an MLS protocol message")]
    NotMls,
    /// The envelope's group or epoch disagrees with the MLS message inside.
    #[error("envelope header does not match the MLS message")]
    HeaderMismatch,
    /// MLS refused the message (it failed to decrypt or verify); the text is openmls'.
    #[error("MLS processing failed: {0}")]
    Mls(String),
    /// MLS could not merge the commit; the text is openmls'.
    #[error("cannot merge commit: {0}")]
    Merge(String),
    /// The decrypted application content is malformed.
    #[error("bad application content: {0}")]
    Content(DecodeError),
    /// An application message whose sender is not (any more) a member holding that leaf
    /// with a bound credential: typically a removed node still posting with its old state.
    #[error("application message from a sender who is not a current member")]
    FormerMember,
    /// A commit adds a member whose credential does not name the PeerId of its key.
    #[error("commit adds a member whose credential is not bound to its key")]
    UnboundMember,
    /// A proposal other than a member's own removal (Kith proposes nothing else).
    #[error("only self-removal proposals are accepted")]
    NotSelfRemoval,
    /// An application message routed to the invite handler that is not an invite message.
    #[error("not an invite message")]
    NotInvite,
    /// A commit dropped this node's own removal proposal and proposing it again failed.
    #[error("cannot re-propose leaving after a commit: {0}")]
    Reproposal(String),
    /// A text sent again ([`crate::envelope::Body::Resent`]) without a stable id, or placed
    /// at an epoch later than the one it was sent in.
    #[error("malformed re-sent text")]
    BadResend,
    /// An edit or delete of a message whose sender is another member.
    #[error("an edit or delete of another member's message")]
    NotAuthor,
    /// A chat message that is out of bounds or does not verify (a profile signed by
    /// someone else, a profile list naming non-members, …).
    #[error("bad chat message: {0}")]
    Chat(crate::chat::ChatError),
}

impl RejectReason {
    /// Every value [`RejectReason::label`] returns, in the order metrics list them.
    pub const LABELS: [&'static str; 8] = [
        "decode",
        "mls",
        "header",
        "content",
        "unbound_sender",
        "former_member",
        "not_author",
        "other",
    ];

    /// Whether the envelope is invalid whatever state the receiver is in, so no honest node
    /// forwards it and the peer that did may be penalised. A rejection that depends on the
    /// receiver's state is not: an envelope of a fork's other branch fails MLS here but was
    /// valid for the member that forwarded it, a removed member's last message is valid to
    /// a member that has not read the removal yet, and an edit's author or a profile list
    /// is checked against what this node knows.
    pub fn is_intrinsic(&self) -> bool {
        match self {
            RejectReason::Envelope(_)
            | RejectReason::NotMls
            | RejectReason::HeaderMismatch
            | RejectReason::Content(_)
            | RejectReason::UnboundMember
            | RejectReason::NotSelfRemoval
            | RejectReason::NotInvite
            | RejectReason::BadResend => true,
            RejectReason::Mls(_)
            | RejectReason::Merge(_)
            | RejectReason::FormerMember
            | RejectReason::Reproposal(_)
            | RejectReason::NotAuthor
            | RejectReason::Chat(_) => false,
        }
    }

    /// The bounded label of `kith_envelopes_rejected_total` (one of [`Self::LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::Envelope(_) | RejectReason::NotMls => "decode",
            RejectReason::Mls(_) | RejectReason::Merge(_) => "mls",
            RejectReason::HeaderMismatch => "header",
            RejectReason::Content(_) | RejectReason::BadResend | RejectReason::Chat(_) => "content",
            RejectReason::NotAuthor => "not_author",
            RejectReason::UnboundMember => "unbound_sender",
            RejectReason::FormerMember => "former_member",
            RejectReason::NotSelfRemoval
            | RejectReason::NotInvite
            | RejectReason::Reproposal(_) => "other",
        }
    }
}

/// Why an envelope was not judged (see [`Verdict::Ignore`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreReason {
    /// For a group this node is not a member of.
    #[error("not a member of this group")]
    NotMember,
    /// For a group this node was removed from.
    #[error("no longer a member of this group")]
    Removed,
    /// This node's join lost a race and joining again was refused: the group is read-only.
    #[error("this node's join lost a race; the group is read-only")]
    JoinLost,
    /// Live, while the group catches up with history sync; held until it has.
    #[error("held until history sync has caught up")]
    CatchingUp,
    /// From an epoch ahead of this node's; held until the commits in between arrive.
    #[error("epoch {epoch} is ahead of ours ({ours}); held")]
    FutureEpoch {
        /// The envelope's epoch.
        epoch: u64,
        /// This node's epoch of the group.
        ours: u64,
    },
    /// Reading it would move its sender's ratchet past `missing` messages this node lacks;
    /// held until they are fetched.
    #[error("{missing} earlier messages of its sender are missing; held until they are fetched")]
    SenderGap {
        /// How many of the sender's earlier messages are missing.
        missing: u64,
    },
    /// Too far ahead of its sender's messages here for MLS to read; held, the gap fetched.
    #[error("too far ahead of its sender's messages here: {0}")]
    TooFarAhead(String),
    /// A rival of the commit that added this node, at `epoch` (the join may have lost).
    #[error("rival of the commit that added this node ({epoch})")]
    RivalOfJoin {
        /// The epoch both commits are for.
        epoch: u64,
    },
    /// A commit for an epoch this node can no longer roll back to (perhaps a deep fork).
    #[error("commit for epoch {epoch}, which this node can no longer roll back to")]
    BeyondRewind {
        /// The commit's epoch.
        epoch: u64,
    },
    /// The commit this node merged at its epoch.
    #[error("commit already merged")]
    AlreadyMerged,
    /// A copy of the commit removing this node that it holds until its grace ends (see
    /// [`super::REMOVAL_GRACE_MS`]).
    #[error("commit removing this node already held")]
    RemovalHeld,
    /// A rival commit for `epoch` whose id is higher than the one merged (lowest id wins);
    /// kept in case a rollback makes it apply.
    #[error("loses to commit {} for epoch {epoch} (lowest id wins)", winner.short())]
    LosingCommit {
        /// The commit's epoch.
        epoch: u64,
        /// The commit this node merged there.
        winner: MessageId,
    },
    /// A winning rival commit for `epoch` that is not valid on this node's branch: it
    /// belongs to another one. Kept in case a rollback makes it apply.
    #[error("rival commit for epoch {epoch} does not apply to this branch")]
    OtherBranch {
        /// The commit's epoch.
        epoch: u64,
    },
    /// An application message of an epoch before this node joined: never meant for it.
    #[error("sent before this node joined: {0}")]
    BeforeJoin(String),
    /// It can never be decrypted here (reported as [`super::Effect::Undecryptable`]).
    #[error("cannot be decrypted: {0}")]
    Undecryptable(Undecryptable),
    /// Its key was used already: this node read this message.
    #[error("already read")]
    AlreadyRead,
    /// From a past epoch, and MLS cannot read it there (perhaps another branch's); kept in
    /// case a rollback makes it readable.
    #[error("cannot read message from past epoch: {0}")]
    PastEpoch(String),
    /// This node failed at `step` of processing it (a local storage or MLS failure).
    #[error("cannot {step}: {detail}")]
    Failed {
        /// What this node was doing.
        step: Step,
        /// The underlying error's text.
        detail: String,
    },
    /// An MLS content type Kith does not use.
    #[error("unsupported MLS content")]
    Unsupported,
    /// Already stored: a copy that came back after gossipsub's duplicate cache forgot it
    /// (judged by the node, before the group engine).
    #[error("duplicate")]
    Duplicate,
    /// The node could not read or write its store (judged by the node).
    #[error("local storage failure")]
    Storage,
}

impl IgnoreReason {
    /// Every value [`IgnoreReason::label`] returns, in the order metrics list them.
    pub const LABELS: [&'static str; 9] = [
        "not_member",
        "future_epoch",
        "past_commit",
        "past_epoch",
        "duplicate",
        "storage",
        "held",
        "undecryptable",
        "other",
    ];

    /// The bounded label of `kith_envelopes_ignored_total` (one of [`Self::LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            IgnoreReason::NotMember | IgnoreReason::Removed | IgnoreReason::JoinLost => {
                "not_member"
            }
            IgnoreReason::FutureEpoch { .. } => "future_epoch",
            IgnoreReason::RivalOfJoin { .. }
            | IgnoreReason::BeyondRewind { .. }
            | IgnoreReason::LosingCommit { .. }
            | IgnoreReason::OtherBranch { .. } => "past_commit",
            IgnoreReason::BeforeJoin(_) | IgnoreReason::PastEpoch(_) => "past_epoch",
            IgnoreReason::AlreadyMerged
            | IgnoreReason::RemovalHeld
            | IgnoreReason::AlreadyRead
            | IgnoreReason::Duplicate => "duplicate",
            IgnoreReason::Storage => "storage",
            IgnoreReason::CatchingUp
            | IgnoreReason::SenderGap { .. }
            | IgnoreReason::TooFarAhead(_) => "held",
            IgnoreReason::Undecryptable(_) => "undecryptable",
            IgnoreReason::Failed { .. } | IgnoreReason::Unsupported => "other",
        }
    }
}

/// The step of processing an envelope at which this node failed (see
/// [`IgnoreReason::Failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Step {
    /// Saving the current state before rolling back to a rival's epoch.
    #[error("checkpoint before a rollback")]
    CheckpointBeforeRollback,
    /// Restoring the state of `epoch` to take a rival commit there.
    #[error("roll back to epoch {epoch}")]
    RollBack {
        /// The epoch rolled back to.
        epoch: u64,
    },
    /// Saving the current state before merging a commit.
    #[error("checkpoint before merging")]
    CheckpointBeforeMerge,
    /// Recording a merged commit in the group's branch.
    #[error("record the commit")]
    RecordCommit,
    /// Storing a member's proposal to leave.
    #[error("store proposal")]
    StoreProposal,
    /// Committing a member's proposal to leave.
    #[error("commit the removal")]
    CommitRemoval,
    /// Holding a commit that removes this node until its grace ends.
    #[error("hold the commit removing this node")]
    HoldRemoval,
    /// Noting a member's request for a re-send, or that a wanted text arrived again.
    #[error("record the re-send")]
    RecordResend,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each reason. The match below has no wildcard: a new variant stops this test
    /// from compiling until it is listed here too.
    fn every_reason() -> (Vec<RejectReason>, Vec<IgnoreReason>) {
        let decode = DecodeError::Malformed("x".into());
        let rejects = vec![
            RejectReason::Envelope(EnvelopeError::Decode(decode.clone())),
            RejectReason::NotMls,
            RejectReason::HeaderMismatch,
            RejectReason::Mls("x".into()),
            RejectReason::Merge("x".into()),
            RejectReason::Content(decode),
            RejectReason::FormerMember,
            RejectReason::UnboundMember,
            RejectReason::NotSelfRemoval,
            RejectReason::NotInvite,
            RejectReason::Reproposal("x".into()),
            RejectReason::BadResend,
            RejectReason::NotAuthor,
            RejectReason::Chat(crate::chat::ChatError::BadSignature),
        ];
        let step = Step::RollBack { epoch: 3 };
        let ignores = vec![
            IgnoreReason::NotMember,
            IgnoreReason::Removed,
            IgnoreReason::JoinLost,
            IgnoreReason::CatchingUp,
            IgnoreReason::FutureEpoch { epoch: 7, ours: 5 },
            IgnoreReason::SenderGap { missing: 80 },
            IgnoreReason::TooFarAhead("x".into()),
            IgnoreReason::RivalOfJoin { epoch: 3 },
            IgnoreReason::BeyondRewind { epoch: 3 },
            IgnoreReason::AlreadyMerged,
            IgnoreReason::RemovalHeld,
            IgnoreReason::LosingCommit {
                epoch: 3,
                winner: MessageId([7; 32]),
            },
            IgnoreReason::OtherBranch { epoch: 3 },
            IgnoreReason::BeforeJoin("x".into()),
            IgnoreReason::Undecryptable(Undecryptable::TooOld),
            IgnoreReason::AlreadyRead,
            IgnoreReason::PastEpoch("x".into()),
            IgnoreReason::Failed {
                step,
                detail: "x".into(),
            },
            IgnoreReason::Unsupported,
            IgnoreReason::Duplicate,
            IgnoreReason::Storage,
        ];
        for r in &rejects {
            match r {
                RejectReason::Envelope(_)
                | RejectReason::NotMls
                | RejectReason::HeaderMismatch
                | RejectReason::Mls(_)
                | RejectReason::Merge(_)
                | RejectReason::Content(_)
                | RejectReason::FormerMember
                | RejectReason::UnboundMember
                | RejectReason::NotSelfRemoval
                | RejectReason::NotInvite
                | RejectReason::Reproposal(_)
                | RejectReason::BadResend
                | RejectReason::NotAuthor
                | RejectReason::Chat(_) => {}
            }
        }
        for r in &ignores {
            match r {
                IgnoreReason::NotMember
                | IgnoreReason::Removed
                | IgnoreReason::JoinLost
                | IgnoreReason::CatchingUp
                | IgnoreReason::FutureEpoch { .. }
                | IgnoreReason::SenderGap { .. }
                | IgnoreReason::TooFarAhead(_)
                | IgnoreReason::RivalOfJoin { .. }
                | IgnoreReason::BeyondRewind { .. }
                | IgnoreReason::AlreadyMerged
                | IgnoreReason::RemovalHeld
                | IgnoreReason::LosingCommit { .. }
                | IgnoreReason::OtherBranch { .. }
                | IgnoreReason::BeforeJoin(_)
                | IgnoreReason::Undecryptable(_)
                | IgnoreReason::AlreadyRead
                | IgnoreReason::PastEpoch(_)
                | IgnoreReason::Failed { .. }
                | IgnoreReason::Unsupported
                | IgnoreReason::Duplicate
                | IgnoreReason::Storage => {}
            }
        }
        (rejects, ignores)
    }

    #[test]
    fn every_reason_has_a_listed_label_and_every_label_a_reason() {
        let (rejects, ignores) = every_reason();
        assert_eq!(rejects.len(), 14, "list every RejectReason once");
        assert_eq!(ignores.len(), 21, "list every IgnoreReason once");
        for r in &rejects {
            assert!(RejectReason::LABELS.contains(&r.label()), "{r:?}");
        }
        for r in &ignores {
            assert!(IgnoreReason::LABELS.contains(&r.label()), "{r:?}");
        }
        // No dead label: metrics create every listed one up front.
        for l in RejectReason::LABELS {
            assert!(rejects.iter().any(|r| r.label() == l), "{l} is never used");
        }
        for l in IgnoreReason::LABELS {
            assert!(ignores.iter().any(|r| r.label() == l), "{l} is never used");
        }
    }

    #[test]
    fn only_state_free_rejections_penalise_the_forwarder() {
        let (rejects, _) = every_reason();
        let penalised: Vec<&str> = rejects
            .iter()
            .filter(|r| r.is_intrinsic())
            .map(|r| r.label())
            .collect();
        // Garbage, forged headers and malformed content are invalid for everyone.
        for l in ["decode", "header", "content", "unbound_sender"] {
            assert!(penalised.contains(&l), "{l}");
        }
        // A fork's other branch, a removal not read yet, an unknown edit target: an honest
        // member may have forwarded these.
        for r in [
            RejectReason::Mls("x".into()),
            RejectReason::Merge("x".into()),
            RejectReason::FormerMember,
            RejectReason::NotAuthor,
            RejectReason::Chat(crate::chat::ChatError::BadSignature),
        ] {
            assert!(!r.is_intrinsic(), "{r:?}");
        }
    }

    #[test]
    fn log_texts_stay_as_they_were() {
        for (r, text) in [
            (
                RejectReason::Envelope(EnvelopeError::Decode(DecodeError::Malformed("x".into()))),
                "bad envelope: malformed input: x",
            ),
            (
                RejectReason::FormerMember,
                "application message from a sender who is not a current member",
            ),
            (
                RejectReason::Mls("decryption".into()),
                "MLS processing failed: decryption",
            ),
        ] {
            assert_eq!(r.to_string(), text);
        }
        for (r, text) in [
            (
                IgnoreReason::FutureEpoch { epoch: 7, ours: 5 },
                "epoch 7 is ahead of ours (5); held",
            ),
            (
                IgnoreReason::SenderGap { missing: 80 },
                "80 earlier messages of its sender are missing; held until they are fetched",
            ),
            (
                IgnoreReason::BeyondRewind { epoch: 3 },
                "commit for epoch 3, which this node can no longer roll back to",
            ),
            (
                IgnoreReason::Failed {
                    step: Step::RollBack { epoch: 3 },
                    detail: "gone".into(),
                },
                "cannot roll back to epoch 3: gone",
            ),
            (
                IgnoreReason::Failed {
                    step: Step::StoreProposal,
                    detail: "x".into(),
                },
                "cannot store proposal: x",
            ),
        ] {
            assert_eq!(r.to_string(), text);
        }
    }
}
