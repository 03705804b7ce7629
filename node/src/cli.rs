//! The `kith` command line: clap definitions, and the client side of the local API.
//!
//! `kith init` and `kith run` act on the data directory and start the node; every other
//! subcommand is a client of a running node's API (see [`Client`]), found through
//! `<data_dir>/api.addr` (or `--api`) and authenticated with `<data_dir>/api.token`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use libp2p::PeerId;
use reqwest::Url;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigOverrides, resolve_data_dir};
use crate::identity::{self, IdentityError};
use crate::model::{
    CreateGroupRequest, CreateInviteRequest, ErrorBody, EventsLagged, GroupInfo, GroupSummary,
    InviteInfo, InviteSummary, JoinBody, JoinRequestInfo, JoinStage, LAGGED_EVENT, MemberInfo,
    MessageBody, MessageInfo, NodeEvent, PeerList, SendBody, StatusInfo, StorageStatus,
};

/// Largest response body the client reads (history is at most 1000 messages of 64 KiB).
const MAX_RESPONSE_BYTES: usize = 128 * 1024 * 1024;
/// Largest single server-sent event the client buffers.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// How long to wait for a TCP connection to the local node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Log output format (on stderr; filter with RUST_LOG, default "info").
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
    /// Send a text message to a group.
    Send(SendArgs),
    /// Show a group's message history (times are UTC).
    History(HistoryArgs),
    /// Print a group's messages as they arrive (times are UTC).
    Watch(WatchArgs),
    /// Inspect connections and block peers (e.g. to make a network partition in a test).
    #[command(subcommand)]
    Net(NetCommand),
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

/// `kith send`.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The message; several words are joined with spaces.
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub text: Vec<String>,
    /// Print the API's JSON answer instead of nothing.
    #[arg(long)]
    pub json: bool,
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

/// Why a client command failed. Displayed as the one-line error the user sees.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node's API is not reachable: no `api.addr`/`api.token`, or connection refused.
    #[error("the node is not running (start it with `kith run`)")]
    NotRunning,
    /// The node answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The [`ErrorBody`] code, e.g. `not_found`.
        code: String,
        /// The [`ErrorBody`] message.
        message: String,
    },
    /// `--api` is not a usable URL.
    #[error("invalid --api URL '{url}': {reason}")]
    BadApiUrl {
        /// What was given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The data directory or its API files cannot be used.
    #[error("{0}")]
    Local(String),
    /// The invite link was refused before contacting the node.
    #[error(transparent)]
    Invite(#[from] kith_protocol::invite::InviteError),
    /// The HTTP exchange failed after connecting.
    #[error("talking to the node failed: {0}")]
    Http(String),
    /// The node's answer could not be understood.
    #[error("unexpected answer from the node: {0}")]
    Protocol(String),
    /// The node ended the live event stream (it is shutting down).
    #[error("the node closed the event stream (did it stop?)")]
    StreamEnded,
    /// Writing the output failed (e.g. the reading end of a pipe closed).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl ClientError {
    fn from_reqwest(err: reqwest::Error) -> Self {
        if err.is_connect() {
            return ClientError::NotRunning;
        }
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        ClientError::Http(text)
    }
}

/// A client of one node's local API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl Client {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7342/`) using `token`.
    pub fn new(base: &str, token: String) -> Result<Client, ClientError> {
        let bad = |reason: String| ClientError::BadApiUrl {
            url: base.to_owned(),
            reason,
        };
        let base = Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if base.scheme() != "http" {
            return Err(bad("only http:// is supported".to_owned()));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("not an http://host:port URL".to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client { http, base, token })
    }

    /// A client of the node owning `data_dir` (resolved as for `--data-dir`): the URL is
    /// `api` if given, else read from `api.addr`; the token is read from `api.token`.
    pub fn from_data_dir(
        data_dir: Option<&Path>,
        api: Option<&str>,
    ) -> Result<Client, ClientError> {
        let data_dir = resolve_data_dir(data_dir).map_err(|e| ClientError::Local(e.to_string()))?;
        let base = match api {
            Some(api) => api.to_owned(),
            None => match identity::read_api_addr(&data_dir) {
                Ok(Some(addr)) => format!("http://{addr}/"),
                Ok(None) => return Err(ClientError::NotRunning),
                Err(e) => return Err(ClientError::Local(e.to_string())),
            },
        };
        let token = match identity::read_api_token(&data_dir) {
            Ok(token) => token,
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(ClientError::NotRunning);
            }
            Err(e) => return Err(ClientError::Local(e.to_string())),
        };
        Client::new(&base, token)
    }

    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::BadApiUrl {
                url: self.base.to_string(),
                reason: "not a base URL".to_owned(),
            })?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(ClientError::from_reqwest)?;
        let status = response.status();
        let body = read_body(response).await?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("cannot decode the answer: {e}")))
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ClientError> {
        let url = self.url(segments)?;
        self.call(self.http.get(url)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(segments)?;
        self.call(self.http.post(url).json(body)).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusInfo, ClientError> {
        self.get(&["v1", "status"]).await
    }

    /// `GET /v1/groups`.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        self.get(&["v1", "groups"]).await
    }

    async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(segments)?;
        self.call(self.http.put(url).json(body)).await
    }

    /// `GET /v1/net/peers`: the connected peers.
    pub async fn peers(&self) -> Result<PeerList, ClientError> {
        self.get(&["v1", "net", "peers"]).await
    }

    /// `GET /v1/net/blocked`: the blocked peers.
    pub async fn blocked(&self) -> Result<PeerList, ClientError> {
        self.get(&["v1", "net", "blocked"]).await
    }

    /// `PUT /v1/net/blocked`: replaces the block list with `peers`; returns the new list.
    pub async fn set_blocked(&self, peers: &[String]) -> Result<PeerList, ClientError> {
        let body = PeerList {
            peers: peers.to_vec(),
        };
        self.put(&["v1", "net", "blocked"], &body).await
    }

    /// `POST /v1/groups`.
    pub async fn create_group(&self, name: &str) -> Result<GroupInfo, ClientError> {
        let body = CreateGroupRequest {
            name: name.to_owned(),
        };
        self.post(&["v1", "groups"], &body).await
    }

    /// `GET /v1/groups/{group}`.
    pub async fn group(&self, group: &str) -> Result<GroupInfo, ClientError> {
        self.get(&["v1", "groups", group]).await
    }

    /// `GET /v1/groups/{group}/members`.
    pub async fn members(&self, group: &str) -> Result<Vec<MemberInfo>, ClientError> {
        self.get(&["v1", "groups", group, "members"]).await
    }

    /// `DELETE /v1/groups/{group}/members/{peer}`.
    pub async fn remove_member(&self, group: &str, peer: &str) -> Result<GroupInfo, ClientError> {
        let url = self.url(&["v1", "groups", group, "members", peer])?;
        self.call(self.http.delete(url)).await
    }

    /// `POST /v1/groups/{group}/leave`.
    pub async fn leave_group(&self, group: &str) -> Result<GroupInfo, ClientError> {
        let url = self.url(&["v1", "groups", group, "leave"])?;
        self.call(self.http.post(url)).await
    }

    /// `POST /v1/groups/{group}/update`.
    pub async fn self_update(&self, group: &str) -> Result<GroupInfo, ClientError> {
        let url = self.url(&["v1", "groups", group, "update"])?;
        self.call(self.http.post(url)).await
    }

    /// `POST /v1/groups/{group}/invites`.
    pub async fn create_invite(
        &self,
        group: &str,
        req: &CreateInviteRequest,
    ) -> Result<InviteInfo, ClientError> {
        self.post(&["v1", "groups", group, "invites"], req).await
    }

    /// `POST /v1/join`.
    pub async fn join(
        &self,
        link: &str,
        timeout_secs: Option<u64>,
    ) -> Result<GroupInfo, ClientError> {
        let body = JoinBody {
            link: link.to_owned(),
            timeout_secs,
        };
        self.post(&["v1", "join"], &body).await
    }

    /// `GET /v1/groups/{group}/invites`.
    pub async fn invites(&self, group: &str) -> Result<Vec<InviteSummary>, ClientError> {
        self.get(&["v1", "groups", group, "invites"]).await
    }

    /// `DELETE /v1/groups/{group}/invites/{invite}`.
    pub async fn revoke_invite(
        &self,
        group: &str,
        invite: &str,
    ) -> Result<InviteSummary, ClientError> {
        let url = self.url(&["v1", "groups", group, "invites", invite])?;
        self.call(self.http.delete(url)).await
    }

    /// `GET /v1/groups/{group}/join-requests`.
    pub async fn join_requests(&self, group: &str) -> Result<Vec<JoinRequestInfo>, ClientError> {
        self.get(&["v1", "groups", group, "join-requests"]).await
    }

    /// `POST /v1/groups/{group}/join-requests/{request}/approve` (or `/deny`).
    pub async fn decide_join(
        &self,
        group: &str,
        request: &str,
        approve: bool,
    ) -> Result<JoinRequestInfo, ClientError> {
        let verb = if approve { "approve" } else { "deny" };
        let url = self.url(&["v1", "groups", group, "join-requests", request, verb])?;
        self.call(self.http.post(url)).await
    }

    /// `POST /v1/groups/{group}/messages`.
    pub async fn send(&self, group: &str, text: &str) -> Result<MessageInfo, ClientError> {
        let body = SendBody {
            text: text.to_owned(),
        };
        self.post(&["v1", "groups", group, "messages"], &body).await
    }

    /// `GET /v1/groups/{group}/messages?limit=N`.
    pub async fn history(
        &self,
        group: &str,
        limit: Option<u64>,
    ) -> Result<Vec<MessageInfo>, ClientError> {
        let mut url = self.url(&["v1", "groups", group, "messages"])?;
        if let Some(limit) = limit {
            url.query_pairs_mut()
                .append_pair("limit", &limit.to_string());
        }
        self.call(self.http.get(url)).await
    }

    /// `GET /v1/events?group=…`: the live event stream, of one group or all.
    pub async fn events(&self, group: Option<&str>) -> Result<EventStream, ClientError> {
        let mut url = self.url(&["v1", "events"])?;
        if let Some(group) = group {
            url.query_pairs_mut().append_pair("group", group);
        }
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(ClientError::from_reqwest)?;
        let status = response.status();
        if !status.is_success() {
            let body = read_body(response).await?;
            return Err(api_error(status, &body));
        }
        Ok(EventStream {
            response,
            parser: SseParser::default(),
        })
    }
}

/// Reads a response body of at most [`MAX_RESPONSE_BYTES`].
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ClientError::from_reqwest)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::Protocol("answer is too large".to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error of a non-2xx answer: the [`ErrorBody`] if there is one.
fn api_error(status: reqwest::StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.error,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: format!("the node answered HTTP {status}"),
        },
    }
}

/// One item of the live event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// An event from the node.
    Event(NodeEvent),
    /// This client fell behind and missed this many events; the stream goes on.
    Lagged(u64),
}

/// The live event stream of `GET /v1/events`, parsed from server-sent events.
pub struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
}

impl EventStream {
    /// The next event; `None` when the node closed the stream.
    pub async fn next(&mut self) -> Result<Option<LiveEvent>, ClientError> {
        loop {
            if let Some(event) = self.parser.next_buffered()? {
                return Ok(Some(event));
            }
            match self
                .response
                .chunk()
                .await
                .map_err(ClientError::from_reqwest)?
            {
                Some(chunk) => self.parser.buf.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}

/// A server-sent-events parser (the subset axum emits: `event`, `data`, comments).
#[derive(Debug, Default)]
struct SseParser {
    /// Received bytes not yet split into lines.
    buf: Vec<u8>,
    /// The current event's name.
    event: String,
    /// The current event's data lines.
    data: String,
}

impl SseParser {
    /// The next complete event in the buffer, if any.
    fn next_buffered(&mut self) -> Result<Option<LiveEvent>, ClientError> {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(event) = self.line(&String::from_utf8_lossy(&line))? {
                return Ok(Some(event));
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(ClientError::Protocol("event is too large".to_owned()));
        }
        Ok(None)
    }

    /// Handles one line; a blank line completes an event.
    fn line(&mut self, line: &str) -> Result<Option<LiveEvent>, ClientError> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return Ok(None); // A comment, e.g. a keep-alive.
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                if self.data.len() > MAX_EVENT_BYTES {
                    return Err(ClientError::Protocol("event is too large".to_owned()));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Result<Option<LiveEvent>, ClientError> {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return Ok(None);
        }
        let bad = |e: serde_json::Error| ClientError::Protocol(format!("bad '{event}' event: {e}"));
        match event.as_str() {
            LAGGED_EVENT => {
                let lagged: EventsLagged = serde_json::from_str(&data).map_err(bad)?;
                Ok(Some(LiveEvent::Lagged(lagged.missed)))
            }
            "message" | "group_joined" | "epoch_changed" | "history_synced" | "join_progress"
            | "join_request_held" => Ok(Some(LiveEvent::Event(
                serde_json::from_str(&data).map_err(bad)?,
            ))),
            _ => {
                tracing::debug!(event, "ignoring an unknown event kind");
                Ok(None)
            }
        }
    }
}

/// Runs a client subcommand (everything but `init` and `run`) against the running node.
pub async fn run_client(cli: Cli) -> anyhow::Result<()> {
    match client_command(cli).await {
        // `kith history | head` closes the pipe early; that is not an error.
        Err(ClientError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

async fn client_command(cli: Cli) -> Result<(), ClientError> {
    let connect = || Client::from_data_dir(cli.data_dir.as_deref(), cli.api.as_deref());
    match &cli.command {
        Command::Init(_) | Command::Run(_) => Err(ClientError::Local(
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
                lines.push(format!("{:>4}  {}{me}", m.leaf_index, clean(&m.peer_id)));
            }
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
        Command::Send(args) => {
            let text = args.text.join(" ");
            let message = connect()?.send(&args.group, &text).await?;
            if args.json {
                return print_json(&message);
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
            for m in &messages {
                out(&format_message(m, me))?;
            }
            Ok(())
        }
        Command::Watch(args) => {
            let client = connect()?;
            let group = client.group(&args.group).await?;
            let me = self_peer(&group).map(str::to_owned);
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
                        out(&format_message(&m, me.as_deref()))?;
                    }
                    LiveEvent::Event(_) => {}
                    LiveEvent::Lagged(missed) => {
                        eprintln_quiet(&format!(
                            "(fell behind: {missed} events were skipped; see `kith history`)"
                        ));
                    }
                }
            }
            Err(ClientError::StreamEnded)
        }
        Command::Net(cmd) => net_command(&connect()?, cmd).await,
    }
}

async fn invite_command(client: &Client, args: &InviteArgs) -> Result<(), ClientError> {
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
                .ok_or_else(|| ClientError::Local("no group given".to_owned()))?;
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

/// `kith join`: checks the link, then asks the node to join while printing each stage the
/// node reports on its event stream (to stderr), and ends with the group or the reason.
async fn join_command(
    connect: impl Fn() -> Result<Client, ClientError>,
    args: &JoinArgs,
) -> Result<(), ClientError> {
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

async fn net_command(client: &Client, cmd: &NetCommand) -> Result<(), ClientError> {
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
fn out(line: &str) -> Result<(), ClientError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// Writes one line to stderr, ignoring failures (it is only commentary).
fn eprintln_quiet(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn print_json<T: Serialize>(value: &T) -> Result<(), ClientError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ClientError::Protocol(e.to_string()))?;
    out(&text)
}

fn print_status(s: &StatusInfo) -> Result<(), ClientError> {
    let mut lines = vec![
        format!("peer id:   {}", s.peer_id),
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
            clean(&g.name),
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

fn print_groups(groups: &[GroupSummary]) -> Result<(), ClientError> {
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
            clean(&g.name)
        ));
    }
    out(&lines.join("\n"))
}

fn print_group(g: &GroupInfo) -> Result<(), ClientError> {
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
        lines.push(format!("  {}{me}", clean(&m.peer_id)));
    }
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

fn print_invite(invite: &InviteInfo, qr: bool) -> Result<(), ClientError> {
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

/// This node's PeerId in a group, if it is listed.
fn self_peer(group: &GroupInfo) -> Option<&str> {
    group
        .members
        .iter()
        .find(|m| m.is_self)
        .map(|m| m.peer_id.as_str())
}

/// One human line for a history entry: time, short sender, text (or what happened).
pub fn format_message(m: &MessageInfo, me: Option<&str>) -> String {
    let who = |peer: &str| {
        if Some(peer) == me {
            "you".to_owned()
        } else {
            short_peer(peer)
        }
    };
    let time = format_utc(m.sent_at_ms / 1000);
    let sender = who(&m.sender);
    match &m.body {
        MessageBody::Text { text } => {
            let text = clean_multiline(text).replace('\n', "\n                               ");
            format!("{time}  {sender:>8}: {text}")
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
    }
}

/// A short form of a PeerId for display: its last 8 characters (every ed25519 PeerId
/// starts with the same `12D3KooW`).
pub fn short_peer(peer: &str) -> String {
    let peer = clean(peer);
    let chars: Vec<char> = peer.chars().collect();
    chars[chars.len().saturating_sub(8)..].iter().collect()
}

/// A short form of a group id: its first 8 hex characters, enough to name it in commands.
fn short_id(id: &str) -> String {
    clean(id).chars().take(8).collect()
}

/// Makes text from the network safe to print on one terminal line: control characters and
/// bidirectional overrides (which could rewrite the terminal or disguise text) are replaced.
pub fn clean(text: &str) -> String {
    clean_multiline(text).replace('\n', "\u{FFFD}")
}

/// As [`clean`], but keeps newlines.
fn clean_multiline(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if (c.is_control() && c != '\n') || bidi {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the Unix epoch.
pub fn format_utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
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

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
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
        let peer = crate::api::fake::peer(7);
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
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_utc(951_825_600), "2000-02-29 12:00:00");
        // Absurd values do not panic.
        let _ = format_utc(u64::MAX);
    }

    #[test]
    fn hostile_text_is_neutralised() {
        assert_eq!(clean("a\x1b[2Jb"), "a\u{FFFD}[2Jb");
        assert_eq!(clean("x\u{202E}y"), "x\u{FFFD}y");
        assert_eq!(clean("one\ntwo"), "one\u{FFFD}two");
        assert_eq!(short_peer("12D3KooWabcdefgh12345678"), "12345678");
        assert_eq!(short_peer("abc"), "abc");
    }

    #[test]
    fn messages_format_for_humans() {
        let m = MessageInfo {
            id: "00".repeat(32),
            group: "11".repeat(32),
            epoch: 1,
            sender: "12D3KooWAAAAAAAAalice123".to_owned(),
            sent_at_ms: 1_700_000_000_123,
            received_at_ms: 1_700_000_000_500,
            body: MessageBody::Text {
                text: "hi\x07 there".to_owned(),
            },
        };
        assert_eq!(
            format_message(&m, None),
            "2023-11-14 22:13:20  alice123: hi\u{FFFD} there"
        );
        assert_eq!(
            format_message(&m, Some("12D3KooWAAAAAAAAalice123")),
            "2023-11-14 22:13:20       you: hi\u{FFFD} there"
        );
        let joined = MessageInfo {
            body: MessageBody::MembersAdded {
                members: vec!["12D3KooWBBBBBBBBbob45678".to_owned()],
            },
            ..m
        };
        assert_eq!(
            format_message(&joined, None),
            "2023-11-14 22:13:20  * bob45678 joined"
        );
    }

    #[test]
    fn qr_code_renders() {
        let qr = render_qr("kith://join#kith1abcdefghijklmnop").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(qr.contains('\u{2580}') || qr.contains('\u{2584}'));
    }

    #[test]
    fn client_rejects_bad_api_urls() {
        assert!(matches!(
            Client::new("not a url", String::new()),
            Err(ClientError::BadApiUrl { .. })
        ));
        assert!(matches!(
            Client::new("https://127.0.0.1:1/", String::new()),
            Err(ClientError::BadApiUrl { .. })
        ));
        assert!(Client::new("http://127.0.0.1:1", String::new()).is_ok());
    }

    #[test]
    fn missing_node_files_mean_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let err = Client::from_data_dir(Some(dir.path()), None).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning), "{err}");
        assert_eq!(
            err.to_string(),
            "the node is not running (start it with `kith run`)"
        );
    }

    #[tokio::test]
    async fn refused_connection_means_not_running() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = Client::new(&format!("http://127.0.0.1:{port}"), "t".repeat(64)).unwrap();
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ClientError::NotRunning), "{err}");
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
        assert!(matches!(err, ClientError::Invite(_)), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    /// Starts the API over the fake backend on a real socket; returns the client and the
    /// fake (to push events). The server stops when the test's runtime ends.
    async fn fake_node(token: &str) -> (Client, crate::api::fake::Fake) {
        use crate::api::fake::{Fake, TOKEN};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Fake::new(16);
        tokio::spawn(crate::api::serve(
            listener,
            fake.clone(),
            TOKEN.to_owned(),
            std::future::pending(),
        ));
        let client = Client::new(&format!("http://{addr}"), token.to_owned()).unwrap();
        (client, fake)
    }

    #[tokio::test]
    async fn client_talks_to_the_api() {
        use crate::api::fake::{GROUP_ID, TOKEN};
        let (client, _) = fake_node(TOKEN).await;
        assert_eq!(client.status().await.unwrap().peer_id, "12D3KooWself");
        // A name with a space and a slash is one path segment.
        let group = client.create_group("book club / 2").await.unwrap();
        assert_eq!(group.name, "book club / 2");
        let m = client.send("friends", "hello").await.unwrap();
        assert_eq!(
            m.body,
            MessageBody::Text {
                text: "hello".into()
            }
        );
        let h = client.history(GROUP_ID, Some(2)).await.unwrap();
        assert_eq!(h.len(), 2);
        let err = client.group("nobody").await.unwrap_err();
        match &err {
            ClientError::Api { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (404, "not_found"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.to_string(), "no group matches 'nobody'");
    }

    #[tokio::test]
    async fn client_reads_and_replaces_the_block_list() {
        use crate::api::fake::{TOKEN, peer};
        let (client, fake) = fake_node(TOKEN).await;
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
        assert_eq!(fake.blocked.lock().unwrap().len(), 2);
        assert_eq!(client.peers().await.unwrap().peers, vec![a]);
        let err = client.set_blocked(&["nope".to_owned()]).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 400, code, .. } if code == "bad_request"),
            "{err:?}"
        );
        assert!(err.to_string().contains("invalid peer id 'nope'"), "{err}");
        assert_eq!(client.set_blocked(&[]).await.unwrap().peers.len(), 0);
    }

    #[tokio::test]
    async fn client_reports_a_wrong_token() {
        let (client, _) = fake_node(&"f".repeat(64)).await;
        let err = client.status().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 401, code, .. } if code == "unauthorized"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn client_follows_events() {
        use crate::api::fake::{GROUP_ID, TOKEN, message};
        let (client, fake) = fake_node(TOKEN).await;
        let mut events = client.events(Some("friends")).await.unwrap();
        fake.events
            .send(NodeEvent::Message(message(&"cc".repeat(32), "elsewhere")))
            .unwrap();
        fake.events
            .send(NodeEvent::Message(message(GROUP_ID, "here")))
            .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            event,
            Some(LiveEvent::Event(NodeEvent::Message(message(
                GROUP_ID, "here"
            ))))
        );
    }

    #[test]
    fn sse_lines_parse() {
        // Exercise the line parser without a connection.
        let mut parser = SseParser::default();
        assert_eq!(parser.line(": keep-alive").unwrap(), None);
        assert_eq!(parser.line("event: lagged").unwrap(), None);
        assert_eq!(parser.line("data: {\"missed\":4}").unwrap(), None);
        assert_eq!(parser.line("").unwrap(), Some(LiveEvent::Lagged(4)));
        assert_eq!(parser.line("event: future_kind").unwrap(), None);
        assert_eq!(parser.line("data: {}").unwrap(), None);
        assert_eq!(parser.line("").unwrap(), None);
        assert_eq!(parser.line("event: message").unwrap(), None);
        assert_eq!(parser.line("data: {broken").unwrap(), None);
        assert!(parser.line("").is_err());
    }
}
