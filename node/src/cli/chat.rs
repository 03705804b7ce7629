//! `kith chat [GROUP]`: a full-screen terminal chat client of the running node, or a plain
//! line-by-line one when stdin or stdout is not a terminal (or with `--plain`).
//!
//! The parts: `state` (what is shown and what keys and events do; no I/O, unit-tested),
//! `draw` (ratatui rendering of the state), `text` (sanitising and wrapping text from the
//! network), `input` (the input line), `run` (the terminal, the event stream and the
//! requests), `link` (the way to the node, followed to a new port when it restarts) and
//! `plain` (the line mode).

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use kith_client::Client;

use super::CliError;

mod draw;
mod input;
mod link;
mod plain;
mod run;
mod state;
mod text;

/// `kith chat` (its help text is the doc comment of `Command::Chat`).
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// The chat to open: group id, unique id prefix or exact name [default: the first; in
    /// plain mode required unless this node is in only one group].
    pub group: Option<String>,
    /// Plain lines instead of the full screen: print the last messages as `HH:MM name: text`,
    /// then new ones as they arrive, and send each line read from stdin (EOF ends). Also
    /// used when stdin or stdout is not a terminal.
    #[arg(long)]
    pub plain: bool,
    /// In plain mode, print this many of the last messages first.
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub last: u64,
}

/// Whether `kith chat` with these arguments takes the full screen (not `--plain`, and
/// both stdin and stdout are a terminal).
pub fn full_screen(args: &ChatArgs) -> bool {
    !args.plain && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// The file full-screen `kith chat` appends its logs to when `RUST_LOG` is set.
pub const LOG_FILE: &str = "chat.log";

/// Runs `kith chat`: the full-screen client on a terminal, the plain one otherwise.
/// `data_dir` is where to read the node's address again when it cannot be reached (`None`
/// when the address was given explicitly).
pub async fn chat_command(
    client: Client,
    args: &ChatArgs,
    data_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let link = link::Link::new(client, data_dir);
    if full_screen(args) {
        run::run(link, args.group.as_deref()).await
    } else {
        plain::run(&link, args).await
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
