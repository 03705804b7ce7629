//! The names of a node's crash points, for test harnesses that arm them: a node started
//! with `KITH_CRASH_AT=POINT:N` aborts (like SIGKILL) the `N`th time its engine passes
//! `POINT`. The node (`kith_node::crashpoint`) does the arming; this is the shared
//! vocabulary, so a harness need not link the node to name a point.

/// The environment variable that arms a crash point.
pub const ENV: &str = "KITH_CRASH_AT";

/// A place in the engine where the node can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// Received gossip was processed by MLS (ratchets moved) and is not yet stored.
    Ingest,
    /// A history-sync page was processed by MLS and is not yet stored.
    Sync,
    /// A commit was merged (a new epoch) and is not yet stored.
    Commit,
    /// Something this node publishes (its message, commit or invite) is stored durably and
    /// not yet published.
    Send,
    /// Received messages were committed without fsync and the flush is about to run.
    Flush,
}

impl Point {
    /// Every point, in the order of the docs.
    pub const ALL: [Point; 5] = [
        Point::Ingest,
        Point::Sync,
        Point::Commit,
        Point::Send,
        Point::Flush,
    ];

    /// The name used in [`ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Point::Ingest => "ingest",
            Point::Sync => "sync",
            Point::Commit => "commit",
            Point::Send => "send",
            Point::Flush => "flush",
        }
    }

    /// The point called `name`, if any.
    pub fn from_name(name: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
