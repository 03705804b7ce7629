//! `kith`: the Kith node daemon (`kith run`) and its command-line client.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Mutex;

use clap::Parser;
use kith_node::cli::{Cli, Command, LogFormat, LogTarget};
use kith_node::config::{Config, resolve_data_dir};
use kith_node::{cli, datadir, identity, node};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Usage errors exit with code 2 here (clap's convention); --help/--version exit 0.
    let cli = Cli::parse();
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints the error as one line on stderr and returns exit code 1.
fn fail(err: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "error: {}", one_line(err));
    ExitCode::FAILURE
}

/// The error and its causes on one line, skipping causes whose text the message already
/// carries (many error types both print their cause and expose it as `source()`).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`). A full-screen `kith chat`
/// logs nothing unless `RUST_LOG` is set, and then to `<data_dir>/chat.log`
/// ([`cli::log_target`]).
fn init_tracing(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match cli::log_target(cli) {
        LogTarget::Nowhere => return,
        LogTarget::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path);
            // A log file that cannot be opened is no reason not to chat.
            let Ok(file) = file else { return };
            let builder = builder.with_writer(Mutex::new(file)).with_ansi(false);
            match cli.log_format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            }
        }
        LogTarget::Stderr => {
            let builder = builder.with_writer(std::io::stderr);
            match cli.log_format {
                LogFormat::Text => builder
                    .with_ansi(std::io::stderr().is_terminal())
                    .try_init(),
                LogFormat::Json => builder.json().with_ansi(false).try_init(),
            }
        }
    };
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init(args) => {
            let data_dir = resolve_data_dir(cli.data_dir.as_deref())?;
            datadir::check_init(&data_dir)?;
            let outcome = identity::init(&data_dir, args.network.as_deref())?;
            let note = if outcome.created {
                format!("created a node key in {}", data_dir.display())
            } else {
                format!("kept the existing node key in {}", data_dir.display())
            };
            let _ = writeln!(std::io::stderr().lock(), "{note}");
            // The PeerId alone on stdout, for scripts.
            writeln!(std::io::stdout().lock(), "{}", outcome.peer_id)?;
            Ok(())
        }
        Command::Run(args) => {
            let data_dir = resolve_data_dir(cli.data_dir.as_deref())?;
            let config = Config::resolve(&data_dir, &args.overrides())?;
            node::run(&data_dir, config, args.recovery()).await?;
            Ok(())
        }
        _ => cli::run_client(cli).await,
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot bind: {source}")]
    struct Bind {
        source: std::io::Error,
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let err = anyhow::Error::new(Bind { source: io });
        assert_eq!(one_line(&err), "cannot bind: address in use");
        let err = anyhow::anyhow!("inner detail").context("outer");
        assert_eq!(one_line(&err), "outer: inner detail");
    }
}
