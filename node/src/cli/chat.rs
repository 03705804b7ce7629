//! `kith chat [GROUP]`: a full-screen terminal chat client of the running node, or a plain
//! line-by-line one when stdin or stdout is not a terminal (or with `--plain`).
//!
//! The parts: `state` (what is shown and what keys and events do; no I/O, unit-tested),
//! `draw` (ratatui rendering of the state), `text` (sanitising and wrapping text from the
//! network), `input` (the input line), `run` (the terminal, the event stream and the
//! requests) and `plain` (the line mode).

use std::io::IsTerminal;

use clap::Args;
use kith_client::Client;

use super::CliError;

mod draw;
mod input;
mod plain;
mod run;
mod state;
mod text;

/// `kith chat`.
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

/// Runs `kith chat`: the full-screen client on a terminal, the plain one otherwise.
pub async fn chat_command(client: Client, args: &ChatArgs) -> Result<(), CliError> {
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if args.plain || !tty {
        plain::run(&client, args).await
    } else {
        run::run(client, args.group.as_deref()).await
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
