//! The client of a node's local HTTP API: one method per API operation, errors as
//! [`ClientError`], and the live event stream of `GET /v1/events` parsed from server-sent
//! events into [`LiveEvent`]s.

use std::path::Path;
use std::time::Duration;

use reqwest::Url;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::files::{self, FileError};
use crate::model::{
    CreateGroupRequest, CreateInviteRequest, DirectBody, DirectInfo, EditBody, ErrorBody,
    EventsLagged, FileSettings, FileState, FileStoreInfo, GroupInfo, GroupSummary, InviteInfo,
    InviteSummary, JoinBody, JoinRequestInfo, LAGGED_EVENT, LoginCode, MemberInfo, MessageInfo,
    NodeEvent, PeerList, PinBody, ProfileBody, ProfileInfo, ReactBody, ReadBody, SendBody,
    StatusInfo,
};

/// Largest response body the client reads (history is at most 1000 messages of 64 KiB).
const MAX_RESPONSE_BYTES: usize = 128 * 1024 * 1024;
/// Largest single server-sent event the client buffers.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// How long to wait for a TCP connection to the local node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to the node failed. Displayed as the one-line error the user sees.
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
    /// The node's `api.addr` or `api.token` exists but cannot be used.
    #[error(transparent)]
    NodeFile(#[from] FileError),
    /// The HTTP client could not be set up (the TLS-free client failed to build).
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    /// The HTTP exchange failed after connecting.
    #[error("talking to the node failed: {0}")]
    Http(String),
    /// The node's answer could not be understood.
    #[error("unexpected answer from the node: {0}")]
    Protocol(String),
    /// A file on this machine could not be read or written.
    #[error("{0}")]
    Local(String),
    /// The node ended the live event stream (it is shutting down).
    #[error("the node closed the event stream (did it stop?)")]
    StreamEnded,
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
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Client { http, base, token })
    }

    /// A client of the node owning `data_dir`: the URL is `api` if given, else read from
    /// `api.addr`; the token is read from `api.token`. Either file missing means the node is
    /// not running ([`ClientError::NotRunning`]).
    pub fn from_data_dir(data_dir: &Path, api: Option<&str>) -> Result<Client, ClientError> {
        let base = match api {
            Some(api) => api.to_owned(),
            None => match files::read_api_addr(data_dir)? {
                Some(addr) => format!("http://{addr}/"),
                None => return Err(ClientError::NotRunning),
            },
        };
        let Some(token) = files::read_api_token(data_dir)? else {
            return Err(ClientError::NotRunning);
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

    /// `POST /v1/web/login-codes`: a one-time code for the web app's login link.
    pub async fn login_code(&self) -> Result<LoginCode, ClientError> {
        self.post(&["v1", "web", "login-codes"], &serde_json::json!({}))
            .await
    }

    /// The web app's login link for `code`: `<api>/app/login?code=…`.
    pub fn app_login_url(&self, code: &str) -> Result<Url, ClientError> {
        let mut url = self.url(&["app", "login"])?;
        url.query_pairs_mut().append_pair("code", code);
        Ok(url)
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
        self.reply(group, text, None).await
    }

    /// `POST /v1/groups/{group}/messages` with `reply_to`: a text that answers a message.
    pub async fn reply(
        &self,
        group: &str,
        text: &str,
        reply_to: Option<&str>,
    ) -> Result<MessageInfo, ClientError> {
        let body = SendBody {
            text: text.to_owned(),
            reply_to: reply_to.map(str::to_owned),
        };
        self.post(&["v1", "groups", group, "messages"], &body).await
    }

    /// `GET /v1/groups/{group}/messages/{id}`: one message as shown now.
    pub async fn message(&self, group: &str, id: &str) -> Result<MessageInfo, ClientError> {
        self.get(&["v1", "groups", group, "messages", id]).await
    }

    /// `PATCH /v1/groups/{group}/messages/{id}`: edit one's own message.
    pub async fn edit(
        &self,
        group: &str,
        id: &str,
        text: &str,
    ) -> Result<MessageInfo, ClientError> {
        let url = self.url(&["v1", "groups", group, "messages", id])?;
        let body = EditBody {
            text: text.to_owned(),
        };
        self.call(self.http.patch(url).json(&body)).await
    }

    /// `DELETE /v1/groups/{group}/messages/{id}`: delete one's own message for everyone.
    pub async fn delete_message(&self, group: &str, id: &str) -> Result<MessageInfo, ClientError> {
        let url = self.url(&["v1", "groups", group, "messages", id])?;
        self.call(self.http.delete(url)).await
    }

    /// `POST /v1/groups/{group}/messages/{id}/reactions` (or `DELETE …/reactions/{emoji}`
    /// with `on` false): put or take back a reaction.
    pub async fn react(
        &self,
        group: &str,
        id: &str,
        emoji: &str,
        on: bool,
    ) -> Result<MessageInfo, ClientError> {
        if on {
            let body = ReactBody {
                emoji: emoji.to_owned(),
            };
            self.post(&["v1", "groups", group, "messages", id, "reactions"], &body)
                .await
        } else {
            let url = self.url(&["v1", "groups", group, "messages", id, "reactions", emoji])?;
            self.call(self.http.delete(url)).await
        }
    }

    /// `POST /v1/groups/{group}/files`: sends the file at `path` (read by this process and
    /// streamed to the node) under `name`, with `caption`.
    pub async fn send_file(
        &self,
        group: &str,
        path: &Path,
        name: &str,
        caption: Option<&str>,
    ) -> Result<MessageInfo, ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::Local(format!("cannot read {}: {e}", path.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| ClientError::Local(format!("cannot read {}: {e}", path.display())))?
            .len();
        // The node refuses a file over its limit before reading it, and closes the
        // connection while the body is still being sent: ask first, so the user gets the
        // node's reason rather than a broken pipe.
        let max = self.file_store().await?.max_file_bytes;
        if max > 0 && len > max {
            return Err(ClientError::Api {
                status: 413,
                code: "payload_too_large".into(),
                message: format!(
                    "the file is larger than this node sends ({}; `[files] max_file_mib`)",
                    crate::text::human_bytes(max)
                ),
            });
        }
        let mut url = self.url(&["v1", "groups", group, "files"])?;
        url.query_pairs_mut().append_pair("name", name);
        if let Some(c) = caption {
            url.query_pairs_mut().append_pair("caption", c);
        }
        self.call(
            self.http
                .post(url)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::from(file)),
        )
        .await
    }

    /// `POST /v1/groups/{group}/messages/{id}/file/download`: starts fetching the file of a
    /// message.
    pub async fn download(&self, group: &str, id: &str) -> Result<FileState, ClientError> {
        let url = self.url(&["v1", "groups", group, "messages", id, "file", "download"])?;
        self.call(self.http.post(url)).await
    }

    /// `DELETE /v1/groups/{group}/messages/{id}/file/download`: stops fetching it.
    pub async fn cancel_download(&self, group: &str, id: &str) -> Result<FileState, ClientError> {
        let url = self.url(&["v1", "groups", group, "messages", id, "file", "download"])?;
        self.call(self.http.delete(url)).await
    }

    /// `PUT /v1/groups/{group}/messages/{id}/file/pin`.
    pub async fn pin_file(
        &self,
        group: &str,
        id: &str,
        pinned: bool,
    ) -> Result<FileState, ClientError> {
        let url = self.url(&["v1", "groups", group, "messages", id, "file", "pin"])?;
        self.call(self.http.put(url).json(&PinBody { pinned }))
            .await
    }

    /// `GET /v1/files`.
    pub async fn file_store(&self) -> Result<FileStoreInfo, ClientError> {
        self.get(&["v1", "files"]).await
    }

    /// `PUT /v1/groups/{group}/files/settings`.
    pub async fn set_file_settings(
        &self,
        group: &str,
        body: &FileSettings,
    ) -> Result<FileSettings, ClientError> {
        let url = self.url(&["v1", "groups", group, "files", "settings"])?;
        self.call(self.http.put(url).json(body)).await
    }

    /// `GET /v1/groups/{group}/messages/{id}/file`: writes the file's content to `out`
    /// (which the caller names and renames); returns the bytes written.
    pub async fn save_file(
        &self,
        group: &str,
        id: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let url = self.url(&["v1", "groups", group, "messages", id, "file"])?;
        let mut response = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(ClientError::from_reqwest)?;
        let status = response.status();
        if !status.is_success() {
            let body = read_body(response).await?;
            return Err(api_error(status, &body));
        }
        let mut n = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(ClientError::from_reqwest)? {
            out.write_all(&chunk)
                .await
                .map_err(|e| ClientError::Local(format!("cannot write the file: {e}")))?;
            n += chunk.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| ClientError::Local(format!("cannot write the file: {e}")))?;
        Ok(n)
    }

    /// `POST /v1/groups/{group}/read`: this node read the group up to a message (the newest
    /// if `None`); sends a read receipt if they are on.
    pub async fn mark_read(
        &self,
        group: &str,
        up_to: Option<&str>,
    ) -> Result<MessageInfo, ClientError> {
        let body = ReadBody {
            up_to: up_to.map(str::to_owned),
        };
        self.post(&["v1", "groups", group, "read"], &body).await
    }

    /// `POST /v1/groups/{group}/typing`: tell the group this user is typing (if typing
    /// notices are on; otherwise nothing is sent). Answers whether it was sent.
    pub async fn typing(&self, group: &str) -> Result<bool, ClientError> {
        self.post(&["v1", "groups", group, "typing"], &serde_json::json!({}))
            .await
    }

    /// `GET /v1/profile`: this node's profile (`None` if it has none).
    pub async fn profile(&self) -> Result<Option<ProfileInfo>, ClientError> {
        self.get(&["v1", "profile"]).await
    }

    /// `PUT /v1/profile`: set this node's profile and send it to every group.
    pub async fn set_profile(&self, body: &ProfileBody) -> Result<ProfileInfo, ClientError> {
        self.put(&["v1", "profile"], body).await
    }

    /// `GET /v1/profiles/{peer}`: the profile this node holds of a member.
    pub async fn profile_of(&self, peer: &str) -> Result<ProfileInfo, ClientError> {
        self.get(&["v1", "profiles", peer]).await
    }

    /// `POST /v1/direct`: start or find a direct chat.
    pub async fn direct(&self, body: &DirectBody) -> Result<DirectInfo, ClientError> {
        self.post(&["v1", "direct"], body).await
    }

    /// `GET /v1/groups/{group}/messages?limit=N`.
    pub async fn history(
        &self,
        group: &str,
        limit: Option<u64>,
    ) -> Result<Vec<MessageInfo>, ClientError> {
        self.history_before(group, limit, None).await
    }

    /// `GET /v1/groups/{group}/messages?limit=N&before=ID`: the page before message `before`.
    pub async fn history_before(
        &self,
        group: &str,
        limit: Option<u64>,
        before: Option<&str>,
    ) -> Result<Vec<MessageInfo>, ClientError> {
        let mut url = self.url(&["v1", "groups", group, "messages"])?;
        if let Some(limit) = limit {
            url.query_pairs_mut()
                .append_pair("limit", &limit.to_string());
        }
        if let Some(before) = before {
            url.query_pairs_mut().append_pair("before", before);
        }
        self.call(self.http.get(url)).await
    }

    /// `GET /v1/groups/{group}/members/{peer}/verification`: the safety number of this node
    /// and the member, and whether the member is verified.
    pub async fn verification(
        &self,
        group: &str,
        peer: &str,
    ) -> Result<crate::model::Verification, ClientError> {
        self.get(&["v1", "groups", group, "members", peer, "verification"])
            .await
    }

    /// `PUT /v1/groups/{group}/members/{peer}/verification`: marks the member verified (its
    /// current key), recording `name` with the mark if given.
    pub async fn mark_verified(
        &self,
        group: &str,
        peer: &str,
        name: Option<&str>,
    ) -> Result<crate::model::Verification, ClientError> {
        let body = crate::model::MarkVerifiedRequest {
            name: name.map(str::to_owned),
        };
        self.put(
            &["v1", "groups", group, "members", peer, "verification"],
            &body,
        )
        .await
    }

    /// `DELETE /v1/groups/{group}/members/{peer}/verification`: removes the mark.
    pub async fn unmark_verified(
        &self,
        group: &str,
        peer: &str,
    ) -> Result<crate::model::Verification, ClientError> {
        let url = self.url(&["v1", "groups", group, "members", peer, "verification"])?;
        self.call(self.http.delete(url)).await
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
            kind if NodeEvent::KINDS.contains(&kind) => Ok(Some(LiveEvent::Event(
                serde_json::from_str(&data).map_err(bad)?,
            ))),
            _ => {
                tracing::debug!(event, "ignoring an unknown event kind");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
        let err = Client::from_data_dir(dir.path(), None).unwrap_err();
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

    /// Every event kind the node sends reaches a client's stream (a kind missing from
    /// `NodeEvent::KINDS` would be skipped as if from a newer node).
    #[test]
    fn every_event_kind_is_parsed() {
        use crate::model::{MessageChange, PersonInfo, ProfileInfo};
        let person = PersonInfo {
            peer_id: "12D3KooWp".into(),
            name: Some("Ann".into()),
            label: "Ann (KooWp)".into(),
        };
        let events = [
            NodeEvent::MessageChanged {
                group: "g".into(),
                id: "m".into(),
                by: "p".into(),
                change: MessageChange::Reaction {
                    emoji: "👍".into(),
                    on: true,
                },
                message: Some(Box::new(MessageInfo::new(
                    "m".into(),
                    "g".into(),
                    1,
                    "p".into(),
                    (1, 2),
                    crate::model::MessageBody::Text { text: "hi".into() },
                ))),
            },
            NodeEvent::ProfileUpdated {
                group: "g".into(),
                profile: ProfileInfo {
                    peer_id: "p".into(),
                    name: "Ann".into(),
                    label: "Ann (p)".into(),
                    version: 3,
                    avatar: Some("image/png".into()),
                },
            },
            NodeEvent::Read {
                group: "g".into(),
                peer: "p".into(),
                up_to: "m".into(),
            },
            NodeEvent::Typing {
                group: "g".into(),
                peer: person,
            },
            NodeEvent::VerificationLost {
                group: "g".into(),
                peer: "p".into(),
                name: None,
                verified_peer: "q".into(),
                reason: "key_mismatch".into(),
                message: "m".into(),
            },
        ];
        for e in events {
            assert!(NodeEvent::KINDS.contains(&e.kind()), "{}", e.kind());
            let mut parser = SseParser::default();
            parser.line(&format!("event: {}", e.kind())).unwrap();
            parser
                .line(&format!("data: {}", serde_json::to_string(&e).unwrap()))
                .unwrap();
            assert_eq!(parser.line("").unwrap(), Some(LiveEvent::Event(e)));
        }
    }
}
