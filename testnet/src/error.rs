//! The launcher's errors. Each is displayed as the one line the user sees.

use std::path::PathBuf;

use kith_client::ClientError;

/// Why a testnet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    /// The `kith` binary was not found; pass `--kith PATH` or set `KITH_BIN`.
    #[error(
        "cannot find the kith binary ({0}); build it with `cargo build -p kith-node` or pass --kith PATH / KITH_BIN"
    )]
    KithNotFound(String),
    /// A file or directory could not be read or written, or a process not started.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A node's API refused a request or could not be reached.
    #[error("node {node}: {what}: {error}")]
    Api {
        /// Node index.
        node: usize,
        /// What was asked.
        what: String,
        /// The client error.
        error: ClientError,
    },
    /// A node misbehaved: exited early, answered something unusable.
    #[error("node {node}: {message}")]
    Node {
        /// Node index.
        node: usize,
        /// What happened.
        message: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {secs:.0} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit, in seconds.
        secs: f64,
    },
    /// `testnet.json` is missing or unusable.
    #[error("{}: {message}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A scenario file is invalid (checked before any node starts).
    #[error("{}: {message}", path.display())]
    Scenario {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the step number.
        message: String,
    },
    /// A scenario step failed or one of its assertions did not hold.
    #[error("step {step} ({action}) failed: {message}")]
    StepFailed {
        /// 1-based step number.
        step: usize,
        /// The action, e.g. `assert all_delivered`.
        action: String,
        /// Why.
        message: String,
    },
    /// An option or input value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl TestnetError {
    /// An [`TestnetError::Io`] with context.
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        TestnetError::Io {
            context: context.into(),
            error,
        }
    }

    /// An [`TestnetError::Api`] error of node `node`.
    pub fn api(node: usize, what: impl Into<String>, error: ClientError) -> Self {
        TestnetError::Api {
            node,
            what: what.into(),
            error,
        }
    }
}

/// Result with [`TestnetError`].
pub type Result<T, E = TestnetError> = std::result::Result<T, E>;
