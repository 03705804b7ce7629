//! The `kith` command line: clap definitions, and the client side of the local API.
//!
//! `kith init` and `kith run` act on the data directory and start the node; every other
//! subcommand is a client of a running node's API (see [`Client`]), found through
//! `<data_dir>/api.addr` (or `--api`) and authenticated with `<data_dir>/api.token`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use libp2p::PeerId;
use serde::Serialize;

use kith_client::model::{
    CreateInviteRequest, DirectBody, GroupInfo, GroupSummary, InviteInfo, JoinStage, MessageBody,
    MessageChange, MessageInfo, NodeEvent, ProfileBody, ReachInfo, StatusInfo, StorageStatus,
};
use kith_client::text::{clean, clean_multiline, format_utc, short_peer};
use kith_client::{Client, ClientError, LiveEvent};
use kith_protocol::invite::InviteError;

use crate::config::{ConfigError, ConfigOverrides, resolve_data_dir};

mod chat;
mod verify;
pub use chat::ChatArgs;
pub use verify::VerifyArgs;

/// Where a command's logs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error (every command but a full-screen `kith chat`).
    Stderr,
    /// Nowhere: a full-screen `kith chat` without `RUST_LOG` (nothing may draw over it).
    Nowhere,
    /// Appended to this file: a full-screen `kith chat` with `RUST_LOG` set.
    File(PathBuf),
}

/// Where `cli`'s logs go: a full-screen `kith chat` owns the terminal, so its logs are off,
/// or in `<data_dir>/chat.log` when `RUST_LOG` asks for them.
pub fn log_target(cli: &Cli) -> LogTarget {
    let Command::Chat(args) = &cli.command else {
        return LogTarget::Stderr;
    };
    if !chat::full_screen(args) {
        return LogTarget::Stderr;
    }
    if std::env::var_os("RUST_LOG").is_none() {
        return LogTarget::Nowhere;
    }
    match resolve_data_dir(cli.data_dir.as_deref()) {
        Ok(dir) => LogTarget::File(dir.join(chat::LOG_FILE)),
        Err(_) => LogTarget::Nowhere,
    }
}

/// Why a client subcommand failed. Displayed as the one-line error the user sees.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The node could not be reached, or it refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The data directory cannot be found (no `--data-dir` and no platform data directory).
    #[error(transparent)]
    DataDir(#[from] ConfigError),
    /// The invite link was refused before contacting the node.
    #[error(transparent)]
    Invite(#[from] InviteError),
    /// The command line asks for something a client command cannot do.
    #[error("{0}")]
    Local(String),
    /// The node's database cannot be read (`history --offline`; the node must be stopped).
    #[error("cannot read the node's database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Writing the output failed (e.g. the reading end of a pipe closed).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Kith: a peer-to-peer group messenger with no server anywhere.
#[derive(Debug, Parser)]
#[command(name = "kith", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Data directory (node key, config, database, API files) [default: the platform's
    /// data directory, e.g. ~/.local/share/kith].
    #[arg(long, global = true, env = "KITH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL of the node's API [default: read from <data_dir>/api.addr].
    #[arg(long, global = true, env = "KITH_API", value_name = "URL")]
    pub api: Option<String>,
    /// Log output format (on stderr; filter with RUST_LOG, default "info"; a full-screen
    /// `kith chat` logs only with RUST_LOG set, to <data_dir>/chat.log).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data directory, the node key and a commented config.toml (never
    /// overwrites), and print the node's PeerId.
    Init(InitArgs),
    /// Run the node in the foreground.
    Run(RunArgs),
    /// Show the running node's identity, addresses, peers and groups.
    Status(JsonArg),
    /// Create, list and inspect groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Create an invite link (with a QR code) for a group; list or revoke a group's invites.
    Invite(InviteArgs),
    /// Join a group with an invite link.
    Join(JoinArgs),
    /// List the join requests waiting for approval on this node.
    JoinRequests {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Approve a join request (the joiner is added to the group).
    Approve(DecideArgs),
    /// Deny a join request.
    Deny(DecideArgs),
    /// Send a text message to a group (or a reply to one of its messages), or a file or
    /// picture with --file.
    Send(SendArgs),
    /// Fetch the file of a message from the members that hold it, showing progress, and
    /// save it (in the current directory unless --out).
    Download(DownloadArgs),
    /// The file store: what it holds, pinning, and a group's automatic download size.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Put an emoji reaction on a message, or take it back with --remove.
    React(ReactArgs),
    /// Replace the text of one of your own messages (everyone sees it was edited).
    Edit(EditArgs),
    /// Delete one of your own messages for everyone (a tombstone stays).
    Delete(MessageArgs),
    /// Mark a group read up to a message (the newest by default); members see a read
    /// receipt unless `[chat] read_receipts` is off.
    Read(ReadArgs),
    /// Set or show your profile (display name and avatar), or show a member's.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Start (or find) a direct chat with a member of a shared group, or make a one-use
    /// link to one with --link.
    Dm(DmArgs),
    /// Show a group's message history (times are UTC).
    History(HistoryArgs),
    /// Print a group's messages as they arrive (times are UTC).
    Watch(WatchArgs),
    /// Chat in the terminal: a full-screen client (chats, messages, replies and reactions
    /// by key), or plain lines when not on a terminal or with --plain (times are UTC).
    ///
    /// Nothing else writes to the full screen: its logs are off unless RUST_LOG is set, and
    /// then they are appended to <data_dir>/chat.log (plain mode logs to stderr). When the
    /// node is started again on another API port, both modes find it by reading
    /// <data_dir>/api.addr again (not with --api or KITH_API).
    Chat(ChatArgs),
    /// Inspect connections and block peers (e.g. to make a network partition in a test).
    #[command(subcommand)]
    Net(NetCommand),
    /// Open the web app in a browser on this machine, logged in with a one-time link (or
    /// print the link with --print).
    Open(OpenArgs),
    /// Show the safety number of this node and a member (digits and QR code) to compare
    /// with theirs, and mark the member verified.
    Verify(VerifyArgs),
}

/// `kith open` arguments.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Print only the link (it works once, within 2 minutes) instead of starting a browser.
    #[arg(long)]
    pub print: bool,
}

/// `kith net …`.
#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// List the connected peers.
    Peers(JsonArg),
    /// List the blocked peers.
    Blocked(JsonArg),
    /// Add peers to the block list: their connections are closed and refused both ways
    /// until unblocked.
    Block {
        /// PeerIds to block.
        #[arg(required = true, num_args = 1.., value_name = "PEER_ID", value_parser = parse_peer_id)]
        peers: Vec<PeerId>,
        /// Print the API's JSON answer (the whole block list) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Empty the block list; the node reconnects to the peers it had blocked.
    UnblockAll(JsonArg),
}

/// `kith init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Network id written to the new config.toml [default: kith].
    #[arg(long, value_name = "ID")]
    pub network: Option<String>,
}

/// `kith run`: command-line values that override config.toml and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// libp2p listen address (multiaddr); repeat for several. Replaces `listen`.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Peer to contact at start (multiaddr ending in /p2p/<peer id>); repeatable.
    /// Replaces `bootstrap`.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Network id.
    #[arg(long, value_name = "ID")]
    pub network: Option<String>,
    /// Address for the local API (IP:PORT; port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT")]
    pub api_listen: Option<SocketAddr>,
    /// Serve Prometheus/OpenMetrics metrics on http://IP:PORT/metrics (port 0 picks a free
    /// one, written to metrics.addr in the data directory). Off by default.
    #[arg(long = "metrics", value_name = "IP:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Do not relay circuits for nodes behind NAT, even when this node is reachable.
    #[arg(long)]
    pub no_relay_service: bool,
    /// Ask the home router for a port mapping with UPnP (off by default).
    #[arg(long)]
    pub upnp: bool,
    /// This machine's public addresses are reachable (a server, or a forwarded port):
    /// announce them at once instead of waiting for other nodes to test them.
    #[arg(long)]
    pub public: bool,
    /// Start over on purpose with this node key and an empty database, when the start check
    /// finds kith.redb missing, empty or another key's (the old file is kept as
    /// kith.redb.old-<time>). Changes nothing when key and database belong together.
    #[arg(long, conflicts_with = "new_identity")]
    pub fresh_database: bool,
    /// Start over on purpose with a new node key and an empty database, when the start check
    /// finds node.key missing, damaged or not the database's (old files are kept as
    /// node.key.old-<time> and kith.redb.old-<time>). Changes nothing when key and database
    /// belong together.
    #[arg(long)]
    pub new_identity: bool,
}

impl RunArgs {
    /// The flags as config overrides (the last layer over file and environment).
    pub fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            network: self.network.clone(),
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            no_mdns: self.no_mdns,
            api_listen: self.api_listen,
            metrics_listen: self.metrics_listen,
            no_relay_service: self.no_relay_service,
            upnp: self.upnp,
            public: self.public,
        }
    }

    /// What the start check may set aside, from `--fresh-database` / `--new-identity`.
    pub fn recovery(&self) -> crate::datadir::Recovery {
        use crate::datadir::Recovery;
        match (self.fresh_database, self.new_identity) {
            (_, true) => Recovery::NewIdentity,
            (true, false) => Recovery::FreshDatabase,
            (false, false) => Recovery::Refuse,
        }
    }
}

/// A lone `--json` flag.
#[derive(Debug, Clone, Args)]
pub struct JsonArg {
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith group …`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group with this node as its only member.
    Create {
        /// Display name (1 to 128 bytes).
        name: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List this node's groups.
    List(JsonArg),
    /// Show a group and its members.
    Show {
        /// Group id, unique id prefix (4+ hex characters) or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a group's members (PeerId, MLS leaf index, this node).
    Members {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a member from a group (it cannot read anything sent afterwards).
    Remove {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// The member's PeerId.
        #[arg(value_parser = parse_peer_id)]
        peer: PeerId,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Leave a group. Another member (the one with the lowest leaf index) commits it; until
    /// then this node sends nothing more to the group.
    Leave {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Refresh this node's key in a group (a self-update commit; also automatic after 1000
    /// own messages or 7 days).
    Update {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `kith approve` and `kith deny`.
#[derive(Debug, Clone, Args)]
pub struct DecideArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The request id (or a unique prefix of 4+ characters), from `kith join-requests`.
    pub request: String,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith invite list` and `kith invite revoke`.
#[derive(Debug, Clone, Subcommand)]
pub enum InviteCommand {
    /// List a group's invites as this node knows them (any member's, with group-wide uses).
    List {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an invite for the whole group: no member honours it any more.
    Revoke {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// The invite id or a unique prefix of 4+ characters (`kith invite list`).
        invite: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `kith invite`: `kith invite GROUP [options]` creates a link; `kith invite list GROUP` and
/// `kith invite revoke GROUP INVITE` manage them.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct InviteArgs {
    /// List or revoke instead of creating.
    #[command(subcommand)]
    pub action: Option<InviteCommand>,
    /// Group id, unique id prefix or exact name.
    #[arg(required = true)]
    pub group: Option<String>,
    /// Joins wait until a member approves them (`kith join-requests`, `kith approve`).
    #[arg(long)]
    pub approve: bool,
    /// How many people can join with the link [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
    /// How long the link is valid, e.g. 30m, 2h, 7d, 1h30m [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub expires: Option<u64>,
    /// Do not print a QR code.
    #[arg(long)]
    pub no_qr: bool,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith join`.
#[derive(Debug, Clone, Args)]
pub struct JoinArgs {
    /// The invite link (`kith1…` or `kith://join#kith1…`).
    pub link: String,
    /// Give up after this long, e.g. 30s, 5m [default: 2m; at most 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub timeout: Option<u64>,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith react`.
#[derive(Debug, Clone, Args)]
pub struct ReactArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The message: its id or a unique prefix of 8 or more hex characters (the second
    /// column of `kith history`).
    pub message: String,
    /// The emoji, e.g. 👍.
    pub emoji: String,
    /// Take the reaction back.
    #[arg(long)]
    pub remove: bool,
    /// Print the API's JSON answer (the message) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith edit`.
#[derive(Debug, Clone, Args)]
pub struct EditArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The message (id or unique prefix of 8+ hex characters).
    pub message: String,
    /// The new text; several words are joined with spaces.
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub text: Vec<String>,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith delete`.
#[derive(Debug, Clone, Args)]
pub struct MessageArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The message (id or unique prefix of 8+ hex characters).
    pub message: String,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith read`.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The last message read (id or unique prefix); the newest if absent.
    pub message: Option<String>,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith profile …`.
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Set your display name (and avatar); it goes to every group you are in and to
    /// groups you join later.
    Set {
        /// Display name, 1 to 64 characters.
        #[arg(long)]
        name: String,
        /// A PNG, JPEG or WebP image of at most 16 KiB.
        #[arg(long, value_name = "PATH")]
        avatar: Option<PathBuf>,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show your profile, or the one this node holds of a member (PeerId).
    Show {
        /// A member's PeerId; yours if absent.
        peer: Option<String>,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `kith dm`.
#[derive(Debug, Clone, Args)]
pub struct DmArgs {
    /// The person: their name, short id (the end of their PeerId) or PeerId, as a member
    /// of one of your groups shows it; or the link someone made with `kith dm --link`.
    #[arg(required_unless_present = "link", conflicts_with = "link")]
    pub person: Option<String>,
    /// Make a one-use invite link to a new direct chat instead, for someone you share no
    /// group with (they run `kith join LINK`).
    #[arg(long)]
    pub link: bool,
    /// Do not print a QR code with --link.
    #[arg(long)]
    pub no_qr: bool,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kith send`.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// Answer this message (id or unique prefix of 8+ hex characters).
    #[arg(long, value_name = "MESSAGE")]
    pub reply: Option<String>,
    /// Send this file (any file; pictures get their dimensions and a thumbnail); the text,
    /// if any, is its caption.
    #[arg(long, value_name = "PATH", conflicts_with = "reply")]
    pub file: Option<PathBuf>,
    /// The message; several words are joined with spaces.
    #[arg(required_unless_present = "file", num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub text: Vec<String>,
    /// Print the API's JSON answer instead of nothing.
    #[arg(long)]
    pub json: bool,
}

/// `kith download`.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The message with the file (id or unique prefix of 8+ hex characters).
    pub message: String,
    /// Where to save it: a directory (the file keeps its name; ` (1)` is added if taken)
    /// or a new file's path [default: the current directory].
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Start the download in the node and return at once (it goes on in the background).
    #[arg(long)]
    pub no_wait: bool,
    /// Print the file's state as JSON instead of progress and a saved path.
    #[arg(long)]
    pub json: bool,
}

/// `kith files …`.
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// List the files the store holds, how much of each, and the space used.
    List(JsonArg),
    /// Keep a message's file when the store needs room (or no longer, with --off).
    Pin {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// The message with the file.
        message: String,
        /// Stop keeping it.
        #[arg(long)]
        off: bool,
    },
    /// Set the size up to which files posted in a group are fetched as soon as they
    /// arrive (e.g. `10MiB`, `0` for never, `default` for `[files] auto_download_kib`).
    Auto {
        /// Group id, unique id prefix or exact name.
        group: String,
        /// A size (`B`, `KiB`, `MiB`, `GiB` suffixes), `0`, or `default`.
        size: String,
    },
}

/// `kith history`.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// Show at most the last N entries (the node allows at most 1000) [default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: Option<u64>,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read the history from the data directory of a stopped node instead of asking a
    /// running one: every entry it holds durably (all of them unless `--limit`). GROUP is
    /// then the full group id or the exact name.
    #[arg(long)]
    pub offline: bool,
}

/// `kith watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// Print each event as one line of JSON.
    #[arg(long)]
    pub json: bool,
}

/// The clap command tree, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses a duration like `45s`, `30m`, `2h`, `7d`, `1w` or `1h30m` (a bare number is
/// seconds) into seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return if secs == 0 {
            Err("duration must be more than zero".to_owned())
        } else {
            Ok(secs)
        };
    }
    let bad = || format!("invalid duration '{text}' (expected e.g. 30m, 2h, 7d or 1h30m)");
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("duration '{text}' is too long"))?;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    if total == 0 {
        return Err("duration must be more than zero".to_owned());
    }
    Ok(total)
}

/// Parses a PeerId argument.
pub fn parse_peer_id(text: &str) -> Result<PeerId, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{}' is not a peer id (12D3KooW…)", clean(text)))
}

/// Runs a client subcommand (everything but `init` and `run`) against the running node.
pub async fn run_client(cli: Cli) -> anyhow::Result<()> {
    match client_command(cli).await {
        // `kith history | head` closes the pipe early; that is not an error.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

async fn client_command(cli: Cli) -> Result<(), CliError> {
    let connect = || -> Result<Client, CliError> {
        let data_dir = resolve_data_dir(cli.data_dir.as_deref())?;
        Ok(Client::from_data_dir(&data_dir, cli.api.as_deref())?)
    };
    match &cli.command {
        Command::Init(_) | Command::Run(_) => Err(CliError::Local(
            "`init` and `run` are not client commands".to_owned(),
        )),
        Command::Status(args) => {
            let status = connect()?.status().await?;
            if args.json {
                return print_json(&status);
            }
            print_status(&status)
        }
        Command::Group(GroupCommand::Create { name, json }) => {
            let group = connect()?.create_group(name).await?;
            if *json {
                return print_json(&group);
            }
            out(&format!(
                "created group '{}' ({})",
                clean(&group.name),
                group.id
            ))
        }
        Command::Group(GroupCommand::List(args)) => {
            let groups = connect()?.groups().await?;
            if args.json {
                return print_json(&groups);
            }
            print_groups(&groups)
        }
        Command::Group(GroupCommand::Show { group, json }) => {
            let group = connect()?.group(group).await?;
            if *json {
                return print_json(&group);
            }
            print_group(&group)
        }
        Command::Group(GroupCommand::Members { group, json }) => {
            let members = connect()?.members(group).await?;
            if *json {
                return print_json(&members);
            }
            let mut lines = vec![format!("{:>4}  PEER", "LEAF")];
            for m in &members {
                let me = if m.is_self { "  (this node)" } else { "" };
                let mark = verify::member_mark(m);
                let name = m
                    .name
                    .as_deref()
                    .map(|n| format!("  {}", clean(n)))
                    .unwrap_or_default();
                lines.push(format!(
                    "{:>4}  {}{name}{me}{mark}",
                    m.leaf_index,
                    clean(&m.peer_id)
                ));
            }
            lines.extend(verify::key_change_warnings(&members));
            out(&lines.join("\n"))
        }
        Command::Group(GroupCommand::Remove { group, peer, json }) => {
            let g = connect()?.remove_member(group, &peer.to_string()).await?;
            if *json {
                return print_json(&g);
            }
            out(&format!(
                "removed {peer} from '{}'; epoch {}, {} members",
                clean(&g.name),
                g.epoch,
                g.members.len()
            ))
        }
        Command::Group(GroupCommand::Leave { group, json }) => {
            let g = connect()?.leave_group(group).await?;
            if *json {
                return print_json(&g);
            }
            out(&format!(
                "asked to leave '{}'; another member commits it when it sees the request",
                clean(&g.name)
            ))
        }
        Command::Group(GroupCommand::Update { group, json }) => {
            let g = connect()?.self_update(group).await?;
            if *json {
                return print_json(&g);
            }
            out(&format!(
                "refreshed this node's key in '{}'; epoch {}",
                clean(&g.name),
                g.epoch
            ))
        }
        Command::Invite(args) => invite_command(&connect()?, args).await,
        Command::Join(args) => join_command(connect, args).await,
        Command::JoinRequests { group, json } => {
            let list = connect()?.join_requests(group).await?;
            if *json {
                return print_json(&list);
            }
            if list.is_empty() {
                return out("no join requests are waiting on this node");
            }
            let mut lines = vec![format!(
                "{:<16}  {:<8}  {:<8}  {:<19}  STATE",
                "REQUEST", "JOINER", "INVITE", "RECEIVED (UTC)"
            )];
            for r in &list {
                lines.push(format!(
                    "{:<16}  {:<8}  {:<8}  {:<19}  {}",
                    clean(&r.id),
                    short_peer(&r.peer),
                    short_id(&r.invite),
                    format_utc(r.received_at_ms / 1000),
                    clean(&r.state)
                ));
            }
            out(&lines.join("\n"))
        }
        Command::Approve(args) | Command::Deny(args) => {
            let approve = matches!(&cli.command, Command::Approve(_));
            let r = connect()?
                .decide_join(&args.group, &args.request, approve)
                .await?;
            if args.json {
                return print_json(&r);
            }
            let verb = if approve {
                "approved; the joiner is added when it asks again (within seconds)"
            } else {
                "denied"
            };
            out(&format!(
                "join request {} from {} {verb}",
                clean(&r.id),
                short_peer(&r.peer)
            ))
        }
        Command::Send(SendArgs {
            group,
            file: Some(path),
            text,
            json,
            ..
        }) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| CliError::Local(format!("{} is not a file", path.display())))?;
            let caption = text.join(" ");
            let caption = (!caption.is_empty()).then_some(caption);
            let m = connect()?
                .send_file(group, path, &name, caption.as_deref())
                .await?;
            if *json {
                return print_json(&m);
            }
            out(&format_message(&m, Some(&m.sender), false))
        }
        Command::Download(args) => download_command(&connect()?, args).await,
        Command::Files(cmd) => files_command(&connect()?, cmd).await,
        Command::Send(args) => {
            let text = args.text.join(" ");
            let message = connect()?
                .reply(&args.group, &text, args.reply.as_deref())
                .await?;
            if args.json {
                return print_json(&message);
            }
            Ok(())
        }
        Command::React(args) => {
            let m = connect()?
                .react(&args.group, &args.message, &args.emoji, !args.remove)
                .await?;
            if args.json {
                return print_json(&m);
            }
            out(&format_message(&m, Some(""), true))
        }
        Command::Edit(args) => {
            let m = connect()?
                .edit(&args.group, &args.message, &args.text.join(" "))
                .await?;
            if args.json {
                return print_json(&m);
            }
            out(&format_message(&m, Some(&m.sender), true))
        }
        Command::Delete(args) => {
            let m = connect()?
                .delete_message(&args.group, &args.message)
                .await?;
            if args.json {
                return print_json(&m);
            }
            out(&format_message(&m, Some(&m.sender), true))
        }
        Command::Read(args) => {
            let m = connect()?
                .mark_read(&args.group, args.message.as_deref())
                .await?;
            if args.json {
                return print_json(&m);
            }
            out(&format!("read up to {}", format_message(&m, None, false)))
        }
        Command::Profile(cmd) => profile_command(&connect()?, cmd).await,
        Command::Dm(args) => dm_command(&connect()?, args).await,
        Command::History(args) if args.offline => {
            let data_dir = resolve_data_dir(cli.data_dir.as_deref())?;
            let messages = offline_history(&data_dir, &args.group, args.limit)?;
            if args.json {
                return print_json(&messages);
            }
            let me = crate::identity::load_keypair(&data_dir)
                .ok()
                .map(|k| k.public().to_peer_id().to_string());
            for m in &messages {
                out(&format_message(m, me.as_deref(), true))?;
            }
            Ok(())
        }
        Command::History(args) => {
            let client = connect()?;
            let group = client.group(&args.group).await?;
            let messages = client.history(&group.id, args.limit).await?;
            if args.json {
                return print_json(&messages);
            }
            let me = self_peer(&group);
            let labels = member_labels(&group);
            for m in &messages {
                out(&format_message_named(m, me, true, &labels))?;
            }
            Ok(())
        }
        Command::Open(args) => {
            let client = connect()?;
            let code = client.login_code().await?;
            let url = client.app_login_url(&code.code)?;
            let minutes = code.expires_in_secs.div_ceil(60);
            if args.print {
                return out(url.as_str());
            }
            match open_browser(url.as_str()) {
                Some(how) => {
                    out(&format!("opening Kith in your browser ({how})"))?;
                    out(&format!(
                        "if it does not open, go to this link within {minutes} minutes (it works once):"
                    ))?;
                }
                None => out(&format!(
                    "open this link in a browser on this machine within {minutes} minutes (it works once):"
                ))?,
            }
            out(&format!("  {url}"))
        }
        Command::Watch(args) => {
            let client = connect()?;
            let group = client.group(&args.group).await?;
            let me = self_peer(&group).map(str::to_owned);
            let labels = member_labels(&group);
            let mut events = client.events(Some(&group.id)).await?;
            if !args.json {
                eprintln_quiet(&format!(
                    "watching '{}' ({}); Ctrl-C to stop",
                    clean(&group.name),
                    short_id(&group.id)
                ));
            }
            while let Some(event) = events.next().await? {
                match event {
                    LiveEvent::Event(event) if args.json => {
                        let line = serde_json::to_string(&event)
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        out(&line)?;
                    }
                    LiveEvent::Event(NodeEvent::Message(m)) => {
                        out(&format_message_named(&m, me.as_deref(), true, &labels))?;
                    }
                    LiveEvent::Event(NodeEvent::MessageChanged {
                        by,
                        change,
                        message,
                        id,
                        ..
                    }) => {
                        let who = if Some(by.as_str()) == me.as_deref() {
                            "you".to_owned()
                        } else {
                            labels
                                .get(&by)
                                .map(|l| clean(l))
                                .unwrap_or_else(|| short_peer(&by))
                        };
                        let what = match &change {
                            MessageChange::Reaction { emoji, on: true } => {
                                format!("reacted {}", clean(emoji))
                            }
                            MessageChange::Reaction { emoji, on: false } => {
                                format!("took back {}", clean(emoji))
                            }
                            MessageChange::Edit => "edited".to_owned(),
                            MessageChange::Delete => "deleted".to_owned(),
                        };
                        match message {
                            Some(m) => out(&format!(
                                "  * {who} {what}: {}",
                                format_message(&m, me.as_deref(), true)
                            ))?,
                            None => out(&format!(
                                "  * {who} {what} message {} (not here yet)",
                                short_id(&id)
                            ))?,
                        }
                    }
                    LiveEvent::Event(NodeEvent::Typing { peer, .. }) => {
                        eprintln_quiet(&format!("{} is typing…", clean(&peer.label)));
                    }
                    LiveEvent::Event(NodeEvent::ProfileUpdated { profile, .. }) => {
                        let was = labels
                            .get(&profile.peer_id)
                            .map(|l| clean(l))
                            .unwrap_or_else(|| short_peer(&profile.peer_id));
                        out(&format!(
                            "  * {was} is now called '{}'",
                            clean(&profile.name)
                        ))?;
                    }
                    LiveEvent::Event(NodeEvent::VerificationLost { message, .. }) => {
                        out(&format!("WARNING: {}", clean(&message)))?;
                    }
                    LiveEvent::Event(_) => {}
                    LiveEvent::Lagged(missed) => {
                        eprintln_quiet(&format!(
                            "(fell behind: {missed} events were skipped; see `kith history`)"
                        ));
                    }
                }
            }
            Err(ClientError::StreamEnded.into())
        }
        Command::Net(cmd) => net_command(&connect()?, cmd).await,
        Command::Verify(args) => verify::verify_command(&connect()?, args).await,
        Command::Chat(args) => {
            // Followed to a new address when the node restarts, unless given explicitly.
            let follow = match cli.api {
                Some(_) => None,
                None => Some(resolve_data_dir(cli.data_dir.as_deref())?),
            };
            chat::chat_command(connect()?, args, follow).await
        }
    }
}

async fn invite_command(client: &Client, args: &InviteArgs) -> Result<(), CliError> {
    match &args.action {
        Some(InviteCommand::List { group, json }) => {
            let list = client.invites(group).await?;
            if *json {
                return print_json(&list);
            }
            if list.is_empty() {
                return out("no invites known for this group");
            }
            let mut lines = vec![format!(
                "{:<12}  {:<8}  {:>9}  {:<19}  {:<8}  FLAGS",
                "INVITE", "CREATOR", "USES LEFT", "EXPIRES (UTC)", "STATE"
            )];
            for i in &list {
                let creator = if i.creator.is_empty() {
                    "?".to_owned()
                } else {
                    short_peer(&i.creator)
                };
                let mut flags = Vec::new();
                if i.approval {
                    flags.push("approval");
                }
                if i.revoked {
                    flags.push("revoked");
                }
                lines.push(format!(
                    "{:<12}  {:<8}  {:>9}  {:<19}  {:<8}  {}",
                    clean(&i.id).chars().take(12).collect::<String>(),
                    creator,
                    format!("{}/{}", i.uses_left, i.max_uses),
                    format_utc(i.expires_at),
                    clean(&i.state),
                    flags.join(",")
                ));
            }
            out(&lines.join("\n"))
        }
        Some(InviteCommand::Revoke {
            group,
            invite,
            json,
        }) => {
            let r = client.revoke_invite(group, invite).await?;
            if *json {
                return print_json(&r);
            }
            out(&format!(
                "revoked invite {} for the whole group",
                short_id(&r.id)
            ))
        }
        None => {
            let group = args
                .group
                .as_deref()
                .ok_or_else(|| CliError::Local("no group given".to_owned()))?;
            let req = CreateInviteRequest {
                expires_in_secs: args.expires,
                max_uses: args.uses,
                approval: args.approve,
            };
            let invite = client.create_invite(group, &req).await?;
            if args.json {
                return print_json(&invite);
            }
            print_invite(&invite, !args.no_qr)
        }
    }
}

/// `kith history --offline`: the last `limit` (default all) history entries of `group`
/// (full id, unique id prefix or exact name, as online) from the database in `data_dir`,
/// which no running node holds.
fn offline_history(
    data_dir: &Path,
    group: &str,
    limit: Option<u64>,
) -> Result<Vec<MessageInfo>, CliError> {
    let store = crate::engine::open_store(data_dir)?;
    let groups = store.groups()?;
    let id = crate::engine::resolve_group(group, groups.iter().map(|g| (g.id, g.name.as_str())))
        .map_err(|e| match e {
            crate::engine::EngineError::AmbiguousGroup(_) => CliError::Local(format!(
                "'{}' matches several groups in {}; use the full id",
                clean(group),
                data_dir.display()
            )),
            _ => CliError::Local(format!(
                "the database in {} has no group '{}'",
                data_dir.display(),
                clean(group)
            )),
        })?;
    let Some(meta) = groups.iter().find(|g| g.id == id) else {
        return Err(CliError::Local(format!(
            "the database in {} has no group '{}'",
            data_dir.display(),
            clean(group)
        )));
    };
    let limit = limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let entries = store.history(&meta.id, limit)?;
    Ok(crate::engine::history_view(
        &store, &meta.id, &entries, true,
    ))
}

/// `kith join`: checks the link, then asks the node to join while printing each stage the
/// node reports on its event stream (to stderr), and ends with the group or the reason.
async fn join_command(
    connect: impl Fn() -> Result<Client, CliError>,
    args: &JoinArgs,
) -> Result<(), CliError> {
    // Refuse a damaged, forged or expired link before bothering the node.
    let invite = kith_protocol::invite::Invite::parse(&args.link)?;
    if now_secs() >= invite.expires_at {
        return Err(kith_protocol::invite::InviteError::Expired {
            expired_at: invite.expires_at,
        }
        .into());
    }
    let client = connect()?;
    // The node's network is only known to the running node (`kith run --network` overrides
    // config.toml): ask it, so a link of another network fails before "joining …".
    invite.check(&client.status().await?.network, now_secs())?;
    let timeout = args.timeout.unwrap_or(DEFAULT_JOIN_TIMEOUT_SECS);
    let mut printer = None;
    if !args.json {
        eprintln_quiet(&format!(
            "joining '{}' (invited by {}; giving up after {})",
            clean(&invite.group_name),
            short_peer(&invite.inviter.to_string()),
            format_secs(timeout)
        ));
        // Progress is commentary: if the event stream fails, the join still goes on.
        if let Ok(mut events) = client.events(None).await {
            let group = invite.group.to_string();
            printer = Some(tokio::spawn(async move {
                while let Ok(Some(event)) = events.next().await {
                    if let LiveEvent::Event(NodeEvent::JoinProgress { group: g, stage }) = event
                        && g == group
                    {
                        eprintln_quiet(&format!("  {}", describe_stage(&stage)));
                        if matches!(stage, JoinStage::Ready { .. }) {
                            return;
                        }
                    }
                }
            }));
        }
    }
    let result = client.join(invite.link(), Some(timeout)).await;
    if let Some(mut p) = printer {
        // On success, let the stream catch up to "ready" so the stages print in order.
        if result.is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut p).await;
        }
        p.abort();
    }
    let group = result?;
    if args.json {
        return print_json(&group);
    }
    out(&format!(
        "joined group '{}' ({}), {} members",
        clean(&group.name),
        group.id,
        group.members.len()
    ))
}

/// `kith join`'s time limit when `--timeout` is not given.
const DEFAULT_JOIN_TIMEOUT_SECS: u64 = 120;

/// A duration in seconds as `2m`, `1h30m` or `45s`.
fn format_secs(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// One line for a join stage.
pub fn describe_stage(stage: &JoinStage) -> String {
    match stage {
        JoinStage::FindingMembers { .. } => {
            "finding members (the inviter, and the DHT)…".to_owned()
        }
        JoinStage::Contacting { peer, via } => {
            let via = if via == "dht" {
                "found in the DHT"
            } else {
                "the inviter"
            };
            format!("contacting {} ({via})…", short_peer(peer))
        }
        JoinStage::RequestSent { peer } => format!("request sent to {}", short_peer(peer)),
        JoinStage::TryingNext { peer, reason } => {
            format!(
                "{} could not help ({}); trying another member",
                short_peer(peer),
                clean(reason)
            )
        }
        JoinStage::AwaitingApproval { peer, request } => format!(
            "waiting for approval: request {} held by {} (a member runs `kith approve GROUP {}`)",
            clean(request),
            short_peer(peer),
            clean(request)
        ),
        JoinStage::Added { peer } => {
            format!("added by {}; setting up the group…", short_peer(peer))
        }
        JoinStage::Ready {
            epoch,
            member_count,
        } => format!(
            "ready at epoch {epoch} with {member_count} members; new messages and history are arriving"
        ),
        JoinStage::Rejoining => {
            "a concurrent commit won over the one that added us; joining again".to_owned()
        }
        JoinStage::Lost { reason } => format!("could not join again: {}", clean(reason)),
    }
}

async fn net_command(client: &Client, cmd: &NetCommand) -> Result<(), CliError> {
    let (list, json) = match cmd {
        NetCommand::Peers(args) => (client.peers().await?, args.json),
        NetCommand::Blocked(args) => (client.blocked().await?, args.json),
        NetCommand::Block { peers, json } => {
            // The API replaces the whole list; add to what is blocked already.
            let mut all = client.blocked().await?.peers;
            all.extend(peers.iter().map(PeerId::to_string));
            all.sort();
            all.dedup();
            (client.set_blocked(&all).await?, *json)
        }
        NetCommand::UnblockAll(args) => (client.set_blocked(&[]).await?, args.json),
    };
    if json {
        return print_json(&list);
    }
    for p in &list.peers {
        out(&clean(p))?;
    }
    Ok(())
}

/// Writes one line to stdout.
/// Starts the user's browser on `url` without waiting for it: `$BROWSER` if set, else the
/// desktop's opener. Returns what was started, or `None` when there is no desktop to open
/// it on (no display) or nothing could be started.
fn open_browser(url: &str) -> Option<String> {
    let program = match std::env::var("BROWSER") {
        Ok(browser) if !browser.trim().is_empty() => browser,
        _ if cfg!(target_os = "macos") => "open".to_owned(),
        _ => {
            let has_display = ["DISPLAY", "WAYLAND_DISPLAY"]
                .iter()
                .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
            if !has_display {
                return None;
            }
            "xdg-open".to_owned()
        }
    };
    let mut words = program.split_whitespace();
    let name = words.next()?;
    let started = std::process::Command::new(name)
        .args(words)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match started {
        Ok(_) => Some(name.to_owned()),
        Err(e) => {
            tracing::debug!(program = name, error = %e, "cannot start a browser");
            None
        }
    }
}

fn out(line: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// Writes one line to stderr, ignoring failures (it is only commentary).
fn eprintln_quiet(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ClientError::Protocol(e.to_string()))?;
    out(&text)
}

fn print_status(s: &StatusInfo) -> Result<(), CliError> {
    let mut lines = vec![
        format!("peer id:   {}", s.peer_id),
        format!(
            "name:      {}",
            s.name
                .as_deref()
                .map(clean)
                .unwrap_or_else(|| "(none; `kith profile set --name NAME`)".to_owned())
        ),
        format!("network:   {}", clean(&s.network)),
        format!("version:   {}", clean(&s.version)),
        format!("peers:     {} connected", s.connected_peers),
    ];
    if s.listen_addrs.is_empty() {
        lines.push("listening: (nowhere yet)".to_owned());
    }
    for (i, addr) in s.listen_addrs.iter().enumerate() {
        let label = if i == 0 { "listening:" } else { "" };
        lines.push(format!("{label:<10} {}", clean(addr)));
    }
    lines.push(reach_line(&s.reach, s.relayed_peers));
    lines.push(storage_line(&s.storage));
    lines.push(format!("groups:    {}", s.groups.len()));
    for g in &s.groups {
        let sync = if g.in_sync {
            String::new()
        } else if g.held > 0 {
            format!(", catching up: {} held", g.held)
        } else {
            ", catching up".to_owned()
        };
        let mut forks = String::new();
        if g.missing > 0 {
            forks.push_str(&format!(", {} missing", g.missing));
        }
        if g.sync_failures > 0 {
            forks.push_str(&format!(", {} failed syncs", g.sync_failures));
        }
        if g.undecryptable > 0 {
            forks.push_str(&format!(", {} UNDECRYPTABLE", g.undecryptable));
        }
        if g.forks_detected > 0 {
            forks.push_str(&format!(", {} forks seen", g.forks_detected));
        }
        if g.rollbacks > 0 {
            forks.push_str(&format!(", {} rollbacks", g.rollbacks));
        }
        if g.deep_forks > 0 {
            forks.push_str(&format!(
                ", FORKED: {} rival commits beyond the rewind window",
                g.deep_forks
            ));
        }
        lines.push(format!(
            "           {}  {} ({} members, epoch {} auth {}{sync}{forks})",
            short_id(&g.id),
            group_title(g),
            g.member_count,
            g.epoch,
            clean(&g.epoch_auth)
        ));
    }
    out(&lines.join("\n"))
}

/// The `storage:` line of `kith status`.
fn storage_line(storage: &StorageStatus) -> String {
    match storage {
        StorageStatus::Ok => "storage:   ok".to_owned(),
        StorageStatus::Failing {
            since_ms, message, ..
        } => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let secs = now_ms.saturating_sub(*since_ms) / 1000;
            format!("storage:   FAILING for {secs} s: {}", clean(message))
        }
    }
}

fn print_groups(groups: &[GroupSummary]) -> Result<(), CliError> {
    if groups.is_empty() {
        return out(
            "no groups yet (create one with `kith group create NAME` or join with `kith join LINK`)",
        );
    }
    let mut lines = vec![format!(
        "{:<8}  {:>7}  {:>5}  NAME",
        "ID", "MEMBERS", "EPOCH"
    )];
    for g in groups {
        lines.push(format!(
            "{:<8}  {:>7}  {:>5}  {}",
            short_id(&g.id),
            g.member_count,
            g.epoch,
            group_title(g)
        ));
    }
    out(&lines.join("\n"))
}

/// A group's name as listed: a direct chat is named after the other person.
fn group_title(g: &GroupSummary) -> String {
    match &g.direct {
        Some(p) => format!("direct chat with {}", clean(&p.label)),
        None => clean(&g.name),
    }
}

fn print_group(g: &GroupInfo) -> Result<(), CliError> {
    let mut lines = vec![
        format!("name:    {}", clean(&g.name)),
        format!("id:      {}", g.id),
        format!("epoch:   {}", g.epoch),
        format!("joined:  {} UTC", format_utc(g.joined_at_ms / 1000)),
        format!("history: {}", delivery_line(g)),
        format!("members: {}", g.members.len()),
    ];
    for m in &g.members {
        let me = if m.is_self { "  (this node)" } else { "" };
        let mark = verify::member_mark(m);
        let name = m
            .name
            .as_deref()
            .map(|n| format!("  {}", clean(n)))
            .unwrap_or_default();
        lines.push(format!("  {}{name}{me}{mark}", clean(&m.peer_id)));
    }
    lines.extend(verify::key_change_warnings(&g.members));
    out(&lines.join("\n"))
}

/// What `kith group show` says about the group's history on this node: complete, catching
/// up, or messages that are missing or lost here.
fn delivery_line(g: &GroupInfo) -> String {
    let mut parts = Vec::new();
    if g.catching_up {
        parts.push("catching up (new messages are shown once older ones are in)".to_owned());
    }
    if g.missing > 0 {
        parts.push(format!(
            "{} messages known to be missing, being fetched",
            g.missing
        ));
    }
    if g.sync_failures > 0 {
        parts.push(format!(
            "the last {} history syncs failed (retrying with back-off)",
            g.sync_failures
        ));
    }
    let lost: u64 = g.undecryptable.values().sum();
    if lost > 0 {
        let reasons: Vec<String> = g
            .undecryptable
            .iter()
            .map(|(r, n)| format!("{n} {}", clean(r)))
            .collect();
        parts.push(format!(
            "{lost} messages cannot be decrypted on this node ({})",
            reasons.join(", ")
        ));
    }
    if parts.is_empty() {
        "complete".to_owned()
    } else {
        parts.join("; ")
    }
}

/// One line on whether others can dial this node.
fn reach_line(r: &ReachInfo, relayed_peers: usize) -> String {
    let relayed = if relayed_peers > 0 {
        format!(" ({relayed_peers} peers through a relay)")
    } else {
        String::new()
    };
    let text = match r {
        ReachInfo::Unknown => "checking (no other node has tested this one yet)".to_owned(),
        ReachInfo::Direct { addrs } => {
            let first = addrs.first();
            let at = first.map(|a| clean(&a.addr)).unwrap_or_default();
            match first.map(|a| a.scope.as_str()) {
                Some("public") => format!("public at {at}"),
                Some("lan") => format!("reachable on this LAN at {at}"),
                Some("loopback") => format!("reachable on this machine at {at}"),
                _ => format!("reachable at {at}"),
            }
        }
        ReachInfo::Relayed { relays } => {
            let names: Vec<String> = relays.iter().map(|r| short_peer(&r.peer)).collect();
            format!("behind NAT, reachable through relay {}", names.join(", "))
        }
        ReachInfo::BehindNat => {
            "behind NAT, no relay yet (others cannot dial this node; it dials them)".to_owned()
        }
    };
    format!("reach:     {text}{relayed}")
}

fn print_invite(invite: &InviteInfo, qr: bool) -> Result<(), CliError> {
    let uses = if invite.max_uses == 1 {
        "1 join".to_owned()
    } else {
        format!("{} joins", invite.max_uses)
    };
    let approval = if invite.approval {
        " Each join waits for a member's approval (`kith join-requests`)."
    } else {
        ""
    };
    let mut text = format!(
        "{}\n\nURL: {}\nValid for {uses} until {} UTC; any member online can admit.{approval}\nInvite id: {} (`kith invite revoke GROUP {}` to revoke it).",
        invite.link,
        invite.url,
        format_utc(invite.expires_at),
        clean(&invite.id),
        short_id(&invite.id)
    );
    if !invite.leaves_lan {
        text.push_str(
            "\nNote: this node has no public address or relay yet, so the link works only on \
             this LAN. Once `kith status` shows a relay or a public address, create a new one.",
        );
    }
    if qr {
        match render_qr(&invite.url) {
            Some(code) => {
                text.push_str("\n\n");
                text.push_str(&code);
            }
            None => text.push_str("\n(the link is too long for a QR code)"),
        }
    }
    out(&text)
}

/// Renders `data` as a terminal QR code (two modules per character, with quiet zone),
/// light on dark so it scans from a dark terminal. `None` if it does not fit a QR code.
pub fn render_qr(data: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::with_error_correction_level(data, qrcode::EcLevel::L).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// The labels of a group's members (`Alice (7gtRrqCQ)`), by PeerId.
fn member_labels(group: &GroupInfo) -> BTreeMap<String, String> {
    group
        .members
        .iter()
        .filter(|m| !m.label.is_empty())
        .map(|m| (m.peer_id.clone(), m.label.clone()))
        .collect()
}

/// This node's PeerId in a group, if it is listed.
fn self_peer(group: &GroupInfo) -> Option<&str> {
    group
        .members
        .iter()
        .find(|m| m.is_self)
        .map(|m| m.peer_id.as_str())
}

/// Human lines for a history entry: time, the message id's first 8 characters (to name it
/// in `kith send --reply`, `react`, `edit`, `delete`), sender, text (or what happened);
/// with `details`, what it answers, whether it was edited or deleted, its reactions and
/// who read it.
pub fn format_message(m: &MessageInfo, me: Option<&str>, details: bool) -> String {
    format_message_named(m, me, details, &BTreeMap::new())
}

/// [`format_message`], with the members' labels (`Alice (7gtRrqCQ)`, by PeerId) for the
/// people a membership line names.
pub fn format_message_named(
    m: &MessageInfo,
    me: Option<&str>,
    details: bool,
    labels: &BTreeMap<String, String>,
) -> String {
    let who = |peer: &str| {
        if Some(peer) == me {
            "you".to_owned()
        } else {
            labels
                .get(peer)
                .map(|l| clean(l))
                .unwrap_or_else(|| short_peer(peer))
        }
    };
    let time = format_utc(m.sent_at_ms / 1000);
    let sender = if Some(m.sender.as_str()) == me {
        "you".to_owned()
    } else if m.sender_label.is_empty() {
        short_peer(&m.sender)
    } else {
        clean(&m.sender_label)
    };
    let indent = " ".repeat(31);
    match &m.body {
        MessageBody::Text { .. } | MessageBody::File { .. } => {
            let id = short_id(&m.id);
            let mut line = format!("{time}  {id}  {sender}: ");
            if m.deleted {
                line.push_str("(message deleted)");
            } else {
                let text = match &m.body {
                    MessageBody::File { file } => {
                        line.push_str(&format_file(file));
                        if file.caption.is_empty() {
                            ""
                        } else {
                            line.push_str(&format!("\n{indent}"));
                            &file.caption
                        }
                    }
                    MessageBody::Text { text } => text,
                    _ => "",
                };
                line.push_str(&clean_multiline(text).replace('\n', &format!("\n{indent}")));
                if m.edited_at_ms.is_some() {
                    line.push_str(" (edited)");
                }
            }
            if !details {
                return line;
            }
            if let Some(r) = &m.reply_to {
                let to = r
                    .sender
                    .as_ref()
                    .map(|p| {
                        if Some(p.peer_id.as_str()) == me {
                            "you".to_owned()
                        } else {
                            clean(&p.label)
                        }
                    })
                    .unwrap_or_else(|| "a message not here yet".to_owned());
                let quote = r
                    .excerpt
                    .as_deref()
                    .map(|e| format!(": \"{}\"", clean(e)))
                    .unwrap_or_default();
                line = format!(
                    "{line}\n{indent}\u{21AA} reply to {to} ({}){quote}",
                    short_id(&r.id)
                );
            }
            if !m.reactions.is_empty() {
                let list: Vec<String> = m
                    .reactions
                    .iter()
                    .map(|r| format!("{} {}", clean(&r.emoji), r.by.len()))
                    .collect();
                line = format!("{line}\n{indent}[{}]", list.join("  "));
            }
            if Some(m.sender.as_str()) == me && !m.read_by.is_empty() {
                let names: Vec<String> = m.read_by.iter().map(|p| clean(&p.label)).collect();
                line = format!("{line}\n{indent}read by {}", names.join(", "));
            }
            line
        }
        MessageBody::GroupCreated { name } => {
            format!("{time}  * {sender} created the group '{}'", clean(name))
        }
        MessageBody::MembersAdded { members } => {
            let names: Vec<String> = members.iter().map(|p| who(p)).collect();
            format!("{time}  * {} joined", names.join(", "))
        }
        MessageBody::MembersRemoved { members } => {
            let names: Vec<String> = members.iter().map(|p| who(p)).collect();
            format!("{time}  * {} left", names.join(", "))
        }
        MessageBody::InviteCreated {
            invite,
            max_uses,
            expires_at,
            approval,
        } => {
            let approval = if *approval { ", approval needed" } else { "" };
            format!(
                "{time}  * {sender} created invite {} ({max_uses} uses until {} UTC{approval})",
                short_id(invite),
                format_utc(*expires_at)
            )
        }
        MessageBody::InviteRevoked { invite } => {
            format!("{time}  * {sender} revoked invite {}", short_id(invite))
        }
        MessageBody::Reaction { to, emoji, on } => {
            let verb = if *on { "reacted" } else { "took back" };
            format!(
                "{time}  * {sender} {verb} {} on {}",
                clean(emoji),
                short_id(to)
            )
        }
        MessageBody::Edit { target, .. } => {
            format!("{time}  * {sender} edited {}", short_id(target))
        }
        MessageBody::Delete { target } => {
            format!("{time}  * {sender} deleted {}", short_id(target))
        }
    }
}

/// `kith download`.
async fn download_command(client: &Client, args: &DownloadArgs) -> Result<(), CliError> {
    use kith_client::model::FileStatus;
    let m = client.message(&args.group, &args.message).await?;
    let MessageBody::File { file } = &m.body else {
        return Err(CliError::Local(if m.deleted {
            "that message was deleted; its file is gone".to_owned()
        } else {
            "that message has no file".to_owned()
        }));
    };
    // Listen before starting, so no progress is missed.
    let mut events = client.events(Some(&m.group)).await?;
    let mut state = client.download(&args.group, &args.message).await?;
    if args.json && args.no_wait {
        return print_json(&state);
    }
    if args.no_wait {
        return out(&format!(
            "fetching {} ({}) in the background; `kith download {} {}` saves it when done",
            clean(&file.name),
            kith_client::text::human_bytes(file.size),
            args.group,
            short_id(&m.id)
        ));
    }
    let bar = indicatif::ProgressBar::new(file.size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(clean(&file.name));
    let mut told_waiting = false;
    while state.status != FileStatus::Complete {
        bar.set_position(state.have_bytes);
        match state.status {
            FileStatus::Deleted => {
                bar.abandon();
                return Err(CliError::Local(
                    "the file's message was deleted while it was being fetched".into(),
                ));
            }
            FileStatus::Waiting if !told_waiting => {
                bar.println("no member that has it is online; waiting (Ctrl-C stops waiting, the node keeps trying)");
                told_waiting = true;
            }
            _ => {}
        }
        match events.next().await? {
            Some(LiveEvent::Event(NodeEvent::FileProgress {
                file: f, state: s, ..
            })) if f == file.id => {
                state = s;
            }
            Some(LiveEvent::Lagged(_)) => {
                state = client.download(&args.group, &args.message).await?;
            }
            Some(_) => {}
            None => return Err(CliError::Client(ClientError::StreamEnded)),
        }
    }
    bar.finish_and_clear();
    if args.json {
        return print_json(&state);
    }
    let target = match &args.out {
        Some(p) if p.is_dir() => crate::files::store::unique_path(p, &file.name),
        Some(p) => p.clone(),
        None => crate::files::store::unique_path(Path::new("."), &file.name),
    };
    let part = target.with_extension(format!(
        "{}kith-part",
        target
            .extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default()
    ));
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&part)
        .await
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", part.display())))?;
    let written = client.save_file(&args.group, &args.message, &mut f).await;
    let done = match written {
        Ok(n) if n == file.size => f
            .sync_all()
            .await
            .map_err(|e| CliError::Local(format!("cannot write {}: {e}", part.display()))),
        Ok(n) => Err(CliError::Local(format!(
            "the node sent {n} of {} bytes; try again",
            file.size
        ))),
        Err(e) => Err(e.into()),
    };
    drop(f);
    if let Err(e) = done {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    if target.exists() {
        let _ = std::fs::remove_file(&part);
        return Err(CliError::Local(format!(
            "{} exists already; not overwriting it",
            target.display()
        )));
    }
    std::fs::rename(&part, &target)
        .map_err(|e| CliError::Local(format!("cannot save {}: {e}", target.display())))?;
    out(&format!(
        "saved {} ({}) to {}",
        clean(&file.name),
        kith_client::text::human_bytes(file.size),
        target.display()
    ))
}

/// Parses `10MiB`, `512KiB`, `1.5GiB`, `2048`, `0`.
fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(CliError::Local(format!(
                "'{}' is not a size (e.g. 10MiB)",
                clean(s)
            )));
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| CliError::Local(format!("'{}' is not a size (e.g. 10MiB)", clean(s))))?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > 1e15 {
        return Err(CliError::Local(format!("'{}' is out of range", clean(s))));
    }
    Ok((n * mult as f64) as u64)
}

/// `kith files …`.
async fn files_command(client: &Client, cmd: &FilesCommand) -> Result<(), CliError> {
    use kith_client::text::human_bytes;
    match cmd {
        FilesCommand::List(a) => {
            let info = client.file_store().await?;
            if a.json {
                return print_json(&info);
            }
            let mut lines = vec![format!(
                "file store: {} of {} used, {} files",
                human_bytes(info.used_bytes),
                human_bytes(info.quota_bytes),
                info.files.len()
            )];
            for f in &info.files {
                let status = format!("{:?}", f.state.status).to_ascii_lowercase();
                let line = format!(
                    "{}  {:>10}  {:<11}{}{}",
                    short_id(&f.id),
                    human_bytes(f.size),
                    status,
                    if f.own { "  sent by you" } else { "" },
                    if f.state.pinned { "  pinned" } else { "" },
                );
                lines.push(line.trim_end().to_owned());
            }
            out(&lines.join(
                "
",
            ))
        }
        FilesCommand::Pin {
            group,
            message,
            off,
        } => {
            client.pin_file(group, message, !off).await?;
            out(if *off {
                "the file may be removed when the store needs room"
            } else {
                "the file is kept when the store needs room"
            })
        }
        FilesCommand::Auto { group, size } => {
            let limit = if size.trim().eq_ignore_ascii_case("default") {
                None
            } else {
                Some(parse_size(size)?)
            };
            let now = client
                .set_file_settings(
                    group,
                    &kith_client::model::FileSettings {
                        auto_download_bytes: limit,
                    },
                )
                .await?;
            let n = now.auto_download_bytes.unwrap_or(0);
            out(&if n == 0 {
                "files in this group are fetched only with `kith download`".to_owned()
            } else {
                format!(
                    "files up to {} in this group are fetched as soon as they arrive",
                    human_bytes(n)
                )
            })
        }
    }
}

/// A file in a message line: `[file] name (size, type[, W×H]) status`.
pub fn format_file(f: &kith_client::model::FileInfo) -> String {
    use kith_client::model::FileStatus;
    let dims = match (f.width, f.height) {
        (Some(w), Some(h)) => format!(", {w}\u{00D7}{h}"),
        _ => String::new(),
    };
    let status = match f.state.status {
        FileStatus::Remote => " - not downloaded".to_owned(),
        FileStatus::Downloading => format!(
            " - downloading {}%",
            (f.state.have_bytes * 100).checked_div(f.size).unwrap_or(0)
        ),
        FileStatus::Waiting => " - waiting for a member that has it".to_owned(),
        FileStatus::Complete => String::new(),
        FileStatus::Deleted => " - deleted".to_owned(),
        FileStatus::Evicted => " - removed to save space".to_owned(),
    };
    format!(
        "[file] {} ({}, {}{dims}){status}",
        clean(&f.name),
        kith_client::text::human_bytes(f.size),
        clean(&f.mime)
    )
}

/// `kith profile …`.
async fn profile_command(client: &Client, cmd: &ProfileCommand) -> Result<(), CliError> {
    match cmd {
        ProfileCommand::Set { name, avatar, json } => {
            let avatar = match avatar {
                None => None,
                Some(path) => {
                    let max = kith_protocol::chat::MAX_AVATAR_BYTES as u64;
                    let len = std::fs::metadata(path)
                        .map_err(|e| {
                            CliError::Local(format!("cannot read {}: {e}", path.display()))
                        })?
                        .len();
                    if len > max {
                        return Err(CliError::Local(format!(
                            "{} is {} KiB; an avatar must be at most {} KiB (make it smaller, e.g. 96x96 pixels)",
                            path.display(),
                            len.div_ceil(1024),
                            max / 1024
                        )));
                    }
                    let bytes = std::fs::read(path).map_err(|e| {
                        CliError::Local(format!("cannot read {}: {e}", path.display()))
                    })?;
                    Some(data_encoding::BASE64.encode(&bytes))
                }
            };
            let p = client
                .set_profile(&ProfileBody {
                    name: name.clone(),
                    avatar,
                })
                .await?;
            if *json {
                return print_json(&p);
            }
            out(&format!(
                "profile set: {}{}; sent to your groups",
                clean(&p.label),
                p.avatar
                    .as_deref()
                    .map(|m| format!(", avatar {m}"))
                    .unwrap_or_default()
            ))
        }
        ProfileCommand::Show { peer, json } => {
            let p = match peer {
                Some(peer) => Some(client.profile_of(peer).await?),
                None => client.profile().await?,
            };
            if *json {
                return print_json(&p);
            }
            match p {
                Some(p) => out(&format!(
                    "{}\n  peer: {}\n  set: {} UTC{}",
                    clean(&p.label),
                    clean(&p.peer_id),
                    format_utc(p.version / 1000),
                    p.avatar
                        .as_deref()
                        .map(|m| format!("\n  avatar: {m}"))
                        .unwrap_or_default()
                )),
                None => out("no profile yet; set one with `kith profile set --name NAME`"),
            }
        }
    }
}

/// `kith dm`.
async fn dm_command(client: &Client, args: &DmArgs) -> Result<(), CliError> {
    // `kith dm LINK`: the link of a direct chat someone made with `kith dm --link`.
    if let Some(link) = args.person.as_deref().filter(|p| {
        let p = p.trim().to_ascii_lowercase();
        p.starts_with("kith1") || p.starts_with("kith://")
    }) {
        let invite = kith_protocol::invite::Invite::parse(link)?;
        if now_secs() >= invite.expires_at {
            return Err(kith_protocol::invite::InviteError::Expired {
                expired_at: invite.expires_at,
            }
            .into());
        }
        let g = client.join(link, None).await?;
        if args.json {
            return print_json(&g);
        }
        return out(&format!(
            "joined direct chat {}; write with `kith send {} …`",
            short_id(&g.id),
            short_id(&g.id)
        ));
    }
    let d = client
        .direct(&DirectBody {
            peer: args.person.clone(),
            link: args.link,
        })
        .await?;
    if args.json {
        return print_json(&d);
    }
    let id = short_id(&d.group.id);
    let with = d.with.as_ref().map(|p| clean(&p.label));
    match (&d.link, with) {
        (Some(link), _) => {
            let mut text = format!(
                "direct chat {id} created; give this one-use link to the person (valid 7 days), who runs `kith dm LINK`:\n\n{link}"
            );
            if !args.no_qr
                && let Some(code) = render_qr(link)
            {
                text.push_str("\n\n");
                text.push_str(&code);
            }
            out(&text)
        }
        (None, Some(with)) if d.created => out(&format!(
            "direct chat {id} with {with} created; they join it by themselves. Write with `kith send {id} …`"
        )),
        (None, Some(with)) => out(&format!(
            "you already have a direct chat with {with}: {id}. Write with `kith send {id} …`"
        )),
        (None, None) => out(&format!("direct chat {id}")),
    }
}

/// A short form of a group id: its first 8 hex characters, enough to name it in commands.
fn short_id(id: &str) -> String {
    clean(id).chars().take(8).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::TestNode;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn file_lines_say_what_and_how_far() {
        use kith_client::model::{FileInfo, FileState, FileStatus};
        let mut f = FileInfo {
            id: "ab".repeat(32),
            name: "photo\u{202E}.jpg".into(),
            size: 4 << 20,
            mime: "image/jpeg".into(),
            caption: String::new(),
            width: Some(640),
            height: Some(480),
            thumbnail: true,
            state: FileState {
                status: FileStatus::Downloading,
                have_bytes: 1 << 20,
                pinned: false,
            },
        };
        assert_eq!(
            format_file(&f),
            "[file] photo\u{FFFD}.jpg (4.0 MiB, image/jpeg, 640\u{00D7}480) - downloading 25%"
        );
        f.state.status = FileStatus::Complete;
        assert!(format_file(&f).ends_with("480)"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_secs("45s"), Ok(45));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("2h"), Ok(7200));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert_eq!(parse_duration_secs("1w"), Ok(604_800));
        assert_eq!(parse_duration_secs("1h30m"), Ok(5400));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs(" 2h "), Ok(7200));
        for bad in [
            "",
            "0",
            "0m",
            "h",
            "2x",
            "2h3",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn invite_flags_parse() {
        let cli = Cli::try_parse_from([
            "kith",
            "invite",
            "friends",
            "--uses",
            "3",
            "--expires",
            "2h",
        ])
        .unwrap();
        let Command::Invite(args) = cli.command else {
            panic!("not invite");
        };
        assert_eq!(args.uses, Some(3));
        assert_eq!(args.expires, Some(7200));
        assert!(Cli::try_parse_from(["kith", "invite", "g", "--uses", "0"]).is_err());
        assert!(Cli::try_parse_from(["kith", "invite", "g", "--expires", "soon"]).is_err());
    }

    #[test]
    fn send_joins_words_and_allows_dashes() {
        let cli =
            Cli::try_parse_from(["kith", "send", "friends", "hello", "-world-", "--json"]).unwrap();
        let Command::Send(args) = cli.command else {
            panic!("not send");
        };
        // After the first word everything is text, even things that look like flags.
        assert_eq!(args.text.join(" "), "hello -world- --json");
        assert!(!args.json);
        let cli = Cli::try_parse_from(["kith", "send", "--json", "friends", "hi"]).unwrap();
        let Command::Send(args) = cli.command else {
            panic!("not send");
        };
        assert!(args.json);
        assert!(Cli::try_parse_from(["kith", "send", "friends"]).is_err());
    }

    #[test]
    fn run_flags_become_overrides() {
        let cli = Cli::try_parse_from([
            "kith",
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/1",
            "--listen",
            "/ip4/127.0.0.1/tcp/2",
            "--no-mdns",
            "--api-listen",
            "127.0.0.1:9000",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        let o = args.overrides();
        assert_eq!(o.listen.len(), 2);
        assert!(o.no_mdns);
        assert_eq!(o.api_listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert!(Cli::try_parse_from(["kith", "run", "--api-listen", "nope"]).is_err());
    }

    #[test]
    fn net_block_takes_peer_ids() {
        let peer = crate::testing::peer(7);
        let cli = Cli::try_parse_from(["kith", "net", "block", &peer.to_string()]).unwrap();
        let Command::Net(NetCommand::Block { peers, json }) = cli.command else {
            panic!("not net block");
        };
        assert_eq!(peers, vec![peer]);
        assert!(!json);
        assert!(Cli::try_parse_from(["kith", "net", "block"]).is_err());
        assert!(Cli::try_parse_from(["kith", "net", "block", "not-a-peer"]).is_err());
        assert!(Cli::try_parse_from(["kith", "net", "unblock-all"]).is_ok());
        let cli = Cli::try_parse_from(["kith", "run", "--metrics", "127.0.0.1:0"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(
            args.overrides().metrics_listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
    }

    #[test]
    fn messages_format_for_humans() {
        let mut m = MessageInfo::new(
            "00".repeat(32),
            "11".repeat(32),
            1,
            "12D3KooWAAAAAAAAalice123".to_owned(),
            (1_700_000_000_123, 1_700_000_000_500),
            MessageBody::Text {
                text: "hi\x07 there".to_owned(),
            },
        );
        assert_eq!(
            format_message(&m, None, true),
            "2023-11-14 22:13:20  00000000  alice123: hi\u{FFFD} there"
        );
        assert_eq!(
            format_message(&m, Some("12D3KooWAAAAAAAAalice123"), true),
            "2023-11-14 22:13:20  00000000  you: hi\u{FFFD} there"
        );
        m.sender_label = "Al\u{202E}ice (alice123)".into();
        m.edited_at_ms = Some(1);
        m.reactions = vec![crate::model::ReactionInfo {
            emoji: "👍".into(),
            by: vec!["a".into(), "b".into()],
        }];
        m.reply_to = Some(crate::model::ReplyInfo {
            id: "ab".repeat(32),
            sender: None,
            excerpt: None,
        });
        assert_eq!(
            format_message(&m, None, true),
            "2023-11-14 22:13:20  00000000  Al\u{FFFD}ice (alice123): hi\u{FFFD} there (edited)\n\
             \x20                              \u{21AA} reply to a message not here yet (abababab)\n\
             \x20                              [👍 2]"
        );
        m.deleted = true;
        assert_eq!(
            format_message(&m, None, false),
            "2023-11-14 22:13:20  00000000  Al\u{FFFD}ice (alice123): (message deleted)"
        );
        m.sender_label = String::new();
        let joined = MessageInfo {
            body: MessageBody::MembersAdded {
                members: vec!["12D3KooWBBBBBBBBbob45678".to_owned()],
            },
            ..m
        };
        assert_eq!(
            format_message(&joined, None, true),
            "2023-11-14 22:13:20  * bob45678 joined"
        );
    }

    #[test]
    fn qr_code_renders() {
        let qr = render_qr("kith://join#kith1abcdefghijklmnop").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(qr.contains('\u{2580}') || qr.contains('\u{2584}'));
    }

    #[tokio::test]
    async fn damaged_link_fails_before_contacting_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::try_parse_from([
            "kith",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "join",
            "kith1thisisnotavalidlink",
        ])
        .unwrap();
        // The data dir has no node at all: a "not running" error would mean we tried.
        let err = client_command(cli).await.unwrap_err();
        assert!(matches!(err, CliError::Invite(_)), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_talks_to_the_api() {
        let node = TestNode::start().await;
        let client = node.client();
        assert_eq!(
            client.status().await.unwrap().peer_id,
            node.node.peer_id.to_string()
        );
        // A name with a space and a slash is one path segment.
        let group = client.create_group("book club / 2").await.unwrap();
        assert_eq!(group.name, "book club / 2");
        let friends = client.create_group("friends").await.unwrap();
        let m = client.send("friends", "hello").await.unwrap();
        assert_eq!(
            m.body,
            MessageBody::Text {
                text: "hello".into()
            }
        );
        // Three entries (the creation and two texts); the limit keeps the newest two.
        client.send("friends", "again").await.unwrap();
        let h = client.history(&friends.id, Some(2)).await.unwrap();
        assert_eq!(h.len(), 2);
        let err = client.group("nobody").await.unwrap_err();
        match &err {
            ClientError::Api { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (404, "not_found"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.to_string(), "no group matches 'nobody'");
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_reads_and_replaces_the_block_list() {
        use crate::testing::peer;
        let node = TestNode::start().await;
        let other = TestNode::start().await;
        node.connect(&other).await;
        let client = node.client();
        assert_eq!(client.blocked().await.unwrap().peers, Vec::<String>::new());
        let (a, b) = (peer(1).to_string(), peer(2).to_string());
        let list = client
            .set_blocked(&[b.clone(), a.clone(), a.clone()])
            .await
            .unwrap();
        let mut want = vec![a.clone(), b.clone()];
        want.sort_by_key(|p| p.parse::<PeerId>().unwrap());
        assert_eq!(list.peers, want);
        assert_eq!(client.blocked().await.unwrap().peers, want);
        assert_eq!(node.engine().blocked().await.unwrap().len(), 2);
        assert_eq!(
            client.peers().await.unwrap().peers,
            vec![other.node.peer_id.to_string()]
        );
        let err = client.set_blocked(&["nope".to_owned()]).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 400, code, .. } if code == "bad_request"),
            "{err:?}"
        );
        assert!(err.to_string().contains("invalid peer id 'nope'"), "{err}");
        assert_eq!(client.set_blocked(&[]).await.unwrap().peers.len(), 0);
        other.stop().await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_reports_a_wrong_token() {
        let node = TestNode::start().await;
        let client = node.client_with(&"f".repeat(64));
        let err = client.status().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 401, code, .. } if code == "unauthorized"),
            "{err:?}"
        );
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_follows_events() {
        let node = TestNode::start().await;
        let friends = node.create_group("friends").await;
        let elsewhere = node.create_group("elsewhere").await;
        let client = node.client();
        let mut events = client.events(Some("friends")).await.unwrap();
        client.send(&elsewhere.id, "elsewhere").await.unwrap();
        let here = client.send(&friends.id, "here").await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            event,
            Some(LiveEvent::Event(NodeEvent::Message(Box::new(here))))
        );
        node.stop().await;
    }
}
