//! What the launcher tells the person watching: one line per stage on stderr, and progress
//! bars when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Stage lines and bars, timed from the launcher's start.
#[derive(Debug, Clone)]
pub struct Progress {
    quiet: bool,
    start: Instant,
}

impl Progress {
    /// Prints stage lines unless `quiet`.
    pub fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            start: Instant::now(),
        }
    }

    /// Seconds since the launcher started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// One stage line: `[  1.2s] message`.
    pub fn line(&self, message: &str) {
        if !self.quiet {
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{:>6.1}s] {message}",
                self.elapsed()
            );
        }
    }

    /// A bar of `len` steps (hidden unless stderr is a terminal and not quiet).
    pub fn bar(&self, len: usize, message: &str) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {elapsed_precise}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.to_owned());
        bar
    }
}
