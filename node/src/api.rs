//! The local HTTP/JSON API: how the `kith` CLI (and any other local client) drives the node.
//!
//! Served on loopback by default. Every request needs `Authorization: Bearer <token>` with
//! the token from `<data_dir>/api.token`. Every error, including unknown routes and bodies
//! that are not valid JSON, is a JSON [`ErrorBody`] with a stable `code`. Live events are
//! server-sent events on `GET /v1/events`. `GET /v1/net/peers` lists connected peers and
//! `GET`/`PUT /v1/net/blocked` read and replace the block list (connection gating, used to
//! make partitions in tests). Requests are counted in `kith_api_requests_total` by matched
//! route, not raw path.
//!
//! A handler parses the request and runs one engine operation through
//! [`EngineHandle::run`] (an `engine::Actor` method) or calls the handle's async method
//! (status, joining, the block list); its tests run against a real node on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures::{Stream, StreamExt};
use libp2p::PeerId;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use crate::engine::{EngineError, EngineHandle};
use crate::metrics::KithMetrics;
use crate::model::{
    CreateGroupRequest, CreateInviteRequest, DirectBody, DirectInfo, EditBody, ErrorBody,
    EventsLagged, EventsQuery, GroupInfo, GroupSummary, HistoryQuery, InviteInfo, InviteSummary,
    JoinBody, JoinRequestInfo, LAGGED_EVENT, MemberInfo, MessageInfo, NodeEvent, PeerList,
    ProfileBody, ProfileInfo, ReactBody, ReadBody, SendBody, StatusInfo,
};
use crate::store::FailureReason;
use crate::web::sessions::Sessions;

mod files;
mod verify;
mod web;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 128 * 1024;
/// History entries returned when the request gives no `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// Largest `limit` honoured; larger values are clamped.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// How long [`serve`] waits for open connections after shutdown before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the API on `listener` until `shutdown` completes. At shutdown, event streams are
/// ended and open connections get [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: EngineHandle,
    token: String,
    sessions: Arc<Sessions>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let addr = listener.local_addr()?;
    let app = build_router(engine, &token, sessions, addr, stop_rx.clone());
    // Connections whose request headers do not arrive within a few seconds are closed.
    let server = crate::http::serve(listener, app, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stopped = stop_rx;
    tokio::select! {
        result = server => result,
        () = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("API connections still open {SHUTDOWN_GRACE:?} after shutdown; closing");
            Ok(())
        }
    }
}

/// The address the test router pretends to listen on (requests with a session cookie
/// must name it in `Host`).
#[cfg(test)]
const TEST_ADDR: &str = "127.0.0.1:7040";

/// The API's routes over `engine`, requiring `token`, for tests that call it without a
/// socket. Event streams of this router only end when the engine stops.
#[cfg(test)]
fn router(engine: EngineHandle, token: String) -> Router {
    router_with_sessions(engine, token, Arc::new(Sessions::in_memory()))
}

#[cfg(test)]
fn router_with_sessions(engine: EngineHandle, token: String, sessions: Arc<Sessions>) -> Router {
    // The sender is dropped at once: a stop signal that can never fire.
    let (_, stop_rx) = watch::channel(false);
    let addr = TEST_ADDR.parse().unwrap_or_else(|_| unreachable!());
    build_router(engine, &token, sessions, addr, stop_rx)
}

/// Shared state of the handlers.
#[derive(Clone)]
struct ApiState {
    engine: EngineHandle,
    stop: watch::Receiver<bool>,
    /// The web app's login codes and browser sessions.
    sessions: Arc<Sessions>,
    /// The address the API listens on.
    addr: SocketAddr,
    /// Name of this node's session cookie ([`crate::web::cookie_name`]).
    cookie_name: Arc<str>,
}

/// Who made a request that passed [`authorize`] (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// A client with the API token (the CLI).
    Token,
    /// A browser with a session cookie, from the node's own origin.
    Session,
}

/// What [`authorize`] checks requests against.
struct Credentials {
    token_digest: [u8; 32],
    sessions: Arc<Sessions>,
    port: u16,
    cookie_name: Arc<str>,
}

fn build_router(
    engine: EngineHandle,
    token: &str,
    sessions: Arc<Sessions>,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
) -> Router {
    let cookie_name: Arc<str> = crate::web::cookie_name(&engine.peer_id()).into();
    let credentials = Arc::new(Credentials {
        token_digest: Sha256::digest(token.as_bytes()).into(),
        sessions: sessions.clone(),
        port: addr.port(),
        cookie_name: cookie_name.clone(),
    });
    let metrics = engine.metrics().clone();
    let state = ApiState {
        engine,
        stop,
        sessions,
        addr,
        cookie_name,
    };
    // The app's files and its login need no credentials (they hold no secret); they are
    // outside the authorization layer.
    let app = Router::new()
        .route("/", get(web::to_app))
        .route("/app", get(web::to_app))
        .route("/app/", get(web::index))
        .route("/app/login", get(web::login))
        .route("/app/{*name}", get(web::file))
        .with_state(state.clone());
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{group}", get(show_group))
        .route(
            "/v1/groups/{group}/invites",
            get(list_invites).post(create_invite),
        )
        .route("/v1/groups/{group}/invites/{invite}", delete(revoke_invite))
        .route("/v1/groups/{group}/join-requests", get(join_requests))
        .route(
            "/v1/groups/{group}/join-requests/{request}/approve",
            post(approve_join),
        )
        .route(
            "/v1/groups/{group}/join-requests/{request}/deny",
            post(deny_join),
        )
        .route("/v1/groups/{group}/members", get(members))
        .route("/v1/groups/{group}/members/{peer}", delete(remove_member))
        .route(
            "/v1/groups/{group}/members/{peer}/verification",
            get(verify::verification)
                .put(verify::mark_verified)
                .delete(verify::unmark_verified),
        )
        .route("/v1/groups/{group}/leave", post(leave_group))
        .route("/v1/groups/{group}/update", post(self_update))
        .route(
            "/v1/groups/{group}/messages",
            get(history).post(send_message),
        )
        .route(
            "/v1/groups/{group}/messages/{message}",
            get(show_message).patch(edit_message).delete(delete_message),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/reactions",
            post(react),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/reactions/{emoji}",
            delete(unreact),
        )
        .route("/v1/groups/{group}/read", post(mark_read))
        .route("/v1/groups/{group}/typing", post(typing))
        .route("/v1/profile", get(own_profile).put(set_profile))
        .route("/v1/profiles/{peer}", get(profile_of))
        .route("/v1/profiles/{peer}/avatar", get(avatar_of))
        .route("/v1/direct", post(start_direct))
        .route(
            "/v1/groups/{group}/files",
            // The body is the file, streamed to disk within `[files] max_file_mib`.
            post(files::send_file).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/groups/{group}/files/settings",
            axum::routing::put(files::settings),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/file",
            get(files::content),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/file/download",
            post(files::download).delete(files::cancel),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/file/thumbnail",
            get(files::thumbnail),
        )
        .route(
            "/v1/groups/{group}/messages/{message}/file/pin",
            axum::routing::put(files::pin),
        )
        .route("/v1/files", get(files::store))
        .route("/v1/join", post(join))
        .route("/v1/events", get(events))
        .route("/v1/net/peers", get(connected_peers))
        .route("/v1/net/blocked", get(blocked).put(set_blocked))
        .route("/v1/web/login-codes", post(web::login_code))
        .route("/v1/web/session", get(web::session))
        .route("/v1/web/logout", post(web::logout))
        .route("/v1/qr", post(web::qr))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(credentials, authorize))
        .merge(app);
    // Outermost, so refused requests (401) are counted too.
    router.layer(middleware::from_fn_with_state(metrics, count_request))
}

/// Counts a request by method, matched route (`unmatched` for unknown paths; the raw path
/// would let any client create label values) and status.
async fn count_request(
    State(metrics): State<Arc<KithMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    metrics.api_request(
        &method,
        endpoint.as_deref().unwrap_or("unmatched"),
        response.status().as_u16(),
    );
    response
}

/// An API error: an HTTP status and the JSON [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// One-line message for a human.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn unauthorized(message: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        let (status, code) = match &err {
            EngineError::GroupNotFound(_)
            | EngineError::MemberNotFound(_)
            | EngineError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            EngineError::AmbiguousGroup(_) | EngineError::BadRequest(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            EngineError::Invite(_) => (StatusCode::BAD_REQUEST, "bad_invite"),
            EngineError::JoinRejected(_) => (StatusCode::CONFLICT, "join_rejected"),
            EngineError::Unreachable(_) => (StatusCode::GATEWAY_TIMEOUT, "unreachable"),
            EngineError::TimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            EngineError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            EngineError::Storage { reason, .. } => match reason {
                FailureReason::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
                FailureReason::ReadOnly | FailureReason::Io => {
                    (StatusCode::SERVICE_UNAVAILABLE, "storage_failing")
                }
            },
            EngineError::FileStoreFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "file_store_full"),
            EngineError::NotDownloaded(_) => (StatusCode::CONFLICT, "not_downloaded"),
            EngineError::Internal(_) => {
                tracing::error!(error = %message, "API request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {} KiB", MAX_BODY_BYTES / 1024),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a JSON body with `Content-Type: application/json`",
            ),
            _ => ApiError::bad_request(rejection.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            error: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Lets a request through with the right bearer token, or with a live session cookie sent
/// by the node's own pages ([`crate::web::check_origin`]); records the [`Caller`].
async fn authorize(
    State(credentials): State<Arc<Credentials>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match given {
            Some(token) if token_matches(token, &credentials.token_digest) => Caller::Token,
            _ => return ApiError::unauthorized("invalid API token").into_response(),
        }
    } else if let Some(secret) = crate::web::cookie(request.headers(), &credentials.cookie_name) {
        if let Err(e) =
            crate::web::check_origin(request.method(), request.headers(), credentials.port)
        {
            tracing::info!(error = %e, path = request.uri().path(), "refused a cross-origin request");
            return ApiError::new(StatusCode::FORBIDDEN, "cross_origin", e.to_string())
                .into_response();
        }
        if credentials.sessions.check(secret).is_none() {
            return ApiError::unauthorized(
                "the browser session has ended; run `kith open` to log in again",
            )
            .into_response();
        }
        Caller::Session
    } else {
        return ApiError::unauthorized("missing `Authorization: Bearer <token>` header")
            .into_response();
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Compares the token's digest with the expected digest in constant time (the digests have
/// a fixed length, so neither the token's length nor its content leaks through timing).
fn token_matches(given: &str, expected: &[u8; 32]) -> bool {
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let diff = given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn status(State(s): State<ApiState>) -> ApiResult<StatusInfo> {
    Ok(Json(s.engine.status().await?))
}

async fn list_groups(State(s): State<ApiState>) -> ApiResult<Vec<GroupSummary>> {
    Ok(Json(s.engine.run(|e| Ok(e.list_groups())).await?))
}

async fn create_group(
    State(s): State<ApiState>,
    body: Result<Json<CreateGroupRequest>, JsonRejection>,
) -> ApiResult<GroupInfo> {
    let Json(body) = body?;
    Ok(Json(
        s.engine.run(move |e| e.create_group(&body.name)).await?,
    ))
}

async fn show_group(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<GroupInfo> {
    let Path(group) = group?;
    Ok(Json(s.engine.run(move |e| e.show_group(&group)).await?))
}

async fn members(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<Vec<MemberInfo>> {
    let Path(group) = group?;
    Ok(Json(
        s.engine.run(move |e| e.show_group(&group)).await?.members,
    ))
}

async fn remove_member(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<GroupInfo> {
    let Path((group, peer)) = path?;
    let peer: PeerId = peer.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("'{peer}' is not a peer id"),
        )
    })?;
    Ok(Json(
        s.engine.run(move |e| e.remove_member(&group, peer)).await?,
    ))
}

async fn leave_group(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<GroupInfo>), ApiError> {
    let Path(group) = group?;
    // Accepted, not done: another member commits the removal.
    Ok((
        StatusCode::ACCEPTED,
        Json(s.engine.run(move |e| e.leave_group(&group)).await?),
    ))
}

async fn self_update(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<GroupInfo> {
    let Path(group) = group?;
    Ok(Json(s.engine.run(move |e| e.self_update(&group)).await?))
}

async fn create_invite(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    body: Result<Json<CreateInviteRequest>, JsonRejection>,
) -> ApiResult<InviteInfo> {
    let Path(group) = group?;
    let Json(body) = body?;
    Ok(Json(
        s.engine.run(move |e| e.create_invite(&group, body)).await?,
    ))
}

async fn list_invites(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<Vec<InviteSummary>> {
    let Path(group) = group?;
    Ok(Json(s.engine.run(move |e| e.list_invites(&group)).await?))
}

async fn revoke_invite(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<InviteSummary> {
    let Path((group, invite)) = path?;
    Ok(Json(
        s.engine
            .run(move |e| e.revoke_invite(&group, &invite))
            .await?,
    ))
}

async fn join_requests(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<Vec<JoinRequestInfo>> {
    let Path(group) = group?;
    Ok(Json(s.engine.run(move |e| e.join_requests(&group)).await?))
}

async fn approve_join(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<JoinRequestInfo> {
    let Path((group, request)) = path?;
    Ok(Json(
        s.engine
            .run(move |e| e.decide_join(&group, &request, true))
            .await?,
    ))
}

async fn deny_join(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<JoinRequestInfo> {
    let Path((group, request)) = path?;
    Ok(Json(
        s.engine
            .run(move |e| e.decide_join(&group, &request, false))
            .await?,
    ))
}

async fn join(
    State(s): State<ApiState>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> ApiResult<GroupInfo> {
    let Json(body) = body?;
    let timeout = body.timeout_secs.map(Duration::from_secs);
    Ok(Json(s.engine.join_with_timeout(body.link, timeout).await?))
}

async fn send_message(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Result<(StatusCode, Json<MessageInfo>), ApiError> {
    let Path(group) = group?;
    let Json(body) = body?;
    let message = match body.reply_to {
        None => s.engine.run(move |e| e.send(&group, &body.text)).await?,
        Some(to) => {
            s.engine
                .run(move |e| e.reply(&group, &body.text, &to))
                .await?
        }
    };
    Ok((StatusCode::CREATED, Json(message)))
}

async fn show_message(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<MessageInfo> {
    let Path((group, message)) = path?;
    Ok(Json(
        s.engine.run(move |e| e.message(&group, &message)).await?,
    ))
}

async fn edit_message(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<EditBody>, JsonRejection>,
) -> ApiResult<MessageInfo> {
    let Path((group, message)) = path?;
    let Json(body) = body?;
    Ok(Json(
        s.engine
            .run(move |e| e.edit(&group, &message, &body.text))
            .await?,
    ))
}

async fn delete_message(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<MessageInfo> {
    let Path((group, message)) = path?;
    Ok(Json(
        s.engine
            .run(move |e| e.delete_message(&group, &message))
            .await?,
    ))
}

async fn react(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<ReactBody>, JsonRejection>,
) -> ApiResult<MessageInfo> {
    let Path((group, message)) = path?;
    let Json(body) = body?;
    Ok(Json(
        s.engine
            .run(move |e| e.react(&group, &message, &body.emoji, true))
            .await?,
    ))
}

async fn unreact(
    State(s): State<ApiState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> ApiResult<MessageInfo> {
    let Path((group, message, emoji)) = path?;
    Ok(Json(
        s.engine
            .run(move |e| e.react(&group, &message, &emoji, false))
            .await?,
    ))
}

async fn mark_read(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    body: Result<Json<ReadBody>, JsonRejection>,
) -> ApiResult<MessageInfo> {
    let Path(group) = group?;
    let Json(body) = body?;
    Ok(Json(
        s.engine
            .run(move |e| e.mark_read(&group, body.up_to.as_deref()))
            .await?,
    ))
}

async fn typing(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
) -> ApiResult<bool> {
    let Path(group) = group?;
    Ok(Json(s.engine.run(move |e| e.typing(&group)).await?))
}

async fn own_profile(State(s): State<ApiState>) -> ApiResult<Option<ProfileInfo>> {
    Ok(Json(s.engine.run(|e| e.own_profile()).await?))
}

async fn set_profile(
    State(s): State<ApiState>,
    body: Result<Json<ProfileBody>, JsonRejection>,
) -> ApiResult<ProfileInfo> {
    let Json(body) = body?;
    Ok(Json(s.engine.run(move |e| e.set_profile(body)).await?))
}

async fn profile_of(
    State(s): State<ApiState>,
    peer: Result<Path<String>, PathRejection>,
) -> ApiResult<ProfileInfo> {
    let Path(peer) = peer?;
    Ok(Json(s.engine.run(move |e| e.profile_of(&peer)).await?))
}

async fn avatar_of(
    State(s): State<ApiState>,
    peer: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(peer) = peer?;
    let (mime, bytes) = s.engine.run(move |e| e.avatar_of(&peer)).await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn start_direct(
    State(s): State<ApiState>,
    body: Result<Json<DirectBody>, JsonRejection>,
) -> Result<(StatusCode, Json<DirectInfo>), ApiError> {
    let Json(body) = body?;
    let d = s.engine.run(move |e| e.start_direct(body)).await?;
    let status = if d.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(d)))
}

async fn history(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Vec<MessageInfo>> {
    let Path(group) = group?;
    let Query(query) = query?;
    let limit = query
        .limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT);
    let before = query.before;
    Ok(Json(
        s.engine
            .run(move |e| e.history_page(&group, limit, before.as_deref()))
            .await?,
    ))
}

fn peer_list(peers: Vec<PeerId>) -> PeerList {
    PeerList {
        peers: peers.iter().map(PeerId::to_string).collect(),
    }
}

async fn connected_peers(State(s): State<ApiState>) -> ApiResult<PeerList> {
    Ok(Json(peer_list(s.engine.connected_peers().await?)))
}

async fn blocked(State(s): State<ApiState>) -> ApiResult<PeerList> {
    Ok(Json(peer_list(s.engine.blocked().await?)))
}

async fn set_blocked(
    State(s): State<ApiState>,
    body: Result<Json<PeerList>, JsonRejection>,
) -> ApiResult<PeerList> {
    let Json(body) = body?;
    let peers = body
        .peers
        .iter()
        .map(|p| {
            p.trim().parse::<PeerId>().map_err(|_| {
                let shown: String = p.chars().take(64).collect();
                ApiError::bad_request(format!("invalid peer id '{shown}'"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(peer_list(s.engine.set_blocked(peers).await?)))
}

async fn events(
    State(s): State<ApiState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + Send>, ApiError> {
    let Query(query) = query?;
    // Subscribe first, so nothing is missed while the group is looked up.
    let receiver = s.engine.subscribe();
    let filter = match query.group {
        Some(group) => Some(s.engine.run(move |e| e.show_group(&group)).await?.id),
        None => None,
    };
    let mut stop = s.stop;
    let stopped = async move {
        if stop.wait_for(|s| *s).await.is_err() {
            // The stop signal can no longer fire: stream until the engine stops.
            std::future::pending::<()>().await;
        }
    };
    let stream = event_stream(receiver, filter).take_until(stopped);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Turns the engine's event receiver into SSE events: `event:` is [`NodeEvent::kind`],
/// `data:` its JSON. A subscriber that fell behind gets a [`LAGGED_EVENT`] and continues.
/// Ends when the engine's sender is gone.
fn event_stream(
    receiver: broadcast::Receiver<NodeEvent>,
    filter: Option<String>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    futures::stream::unfold((receiver, filter), |(mut receiver, filter)| async move {
        loop {
            let event = match receiver.recv().await {
                Ok(event) => {
                    if filter.as_deref().is_some_and(|g| g != event.group()) {
                        continue;
                    }
                    match Event::default().event(event.kind()).json_data(&event) {
                        Ok(sse) => sse,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode an API event");
                            continue;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "API event subscriber lagged");
                    let data = EventsLagged { missed };
                    match Event::default().event(LAGGED_EVENT).json_data(data) {
                        Ok(sse) => sse,
                        Err(_) => continue,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok(event), (receiver, filter)));
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::EVENT_BUFFER;
    use crate::model::MessageBody;
    use crate::testing::{TOKEN, TestNode, peer, two_in_a_group};
    use axum::body::Body;
    use tower::ServiceExt;

    /// A real node, and the API's routes over its engine requiring [`TOKEN`].
    async fn app() -> (TestNode, Router) {
        app_of(TestNode::start().await)
    }

    fn app_of(node: TestNode) -> (TestNode, Router) {
        let app = router(node.engine(), TOKEN.to_owned());
        (node, app)
    }

    fn request(method: &str, uri: &str, body: Option<&str>) -> axum::http::Request<Body> {
        let builder = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        match body {
            Some(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_owned())),
            None => builder.body(Body::empty()),
        }
        .unwrap()
    }

    async fn call(app: &Router, req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    async fn expect_error(
        app: &Router,
        req: axum::http::Request<Body>,
        status: StatusCode,
        code: &str,
    ) {
        let (got, json) = call(app, req).await;
        assert_eq!(got, status, "{json}");
        let body: ErrorBody = serde_json::from_value(json).unwrap();
        assert_eq!(body.code, code);
        assert!(!body.error.is_empty());
    }

    /// Sends `text` to `group` on `node` as the API would.
    async fn send(node: &TestNode, group: &str, text: &str) -> MessageInfo {
        let (group, text) = (group.to_owned(), text.to_owned());
        node.engine()
            .run(move |e| e.send(&group, &text))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missing_token_is_401() {
        let (node, app) = app().await;
        let req = axum::http::Request::get("/v1/status")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let req = axum::http::Request::get("/v1/status")
            .body(Body::empty())
            .unwrap();
        let (_, json) = call(&app, req).await;
        assert_eq!(json["code"], "unauthorized");
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wrong_token_is_401() {
        let (node, app) = app().await;
        for value in [
            "Bearer nope".to_owned(),
            format!("Bearer {TOKEN}x"),
            format!("Basic {TOKEN}"),
            TOKEN.to_owned(),
        ] {
            let req = axum::http::Request::get("/v1/status")
                .header(header::AUTHORIZATION, value)
                .body(Body::empty())
                .unwrap();
            let (status, json) = call(&app, req).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(json["code"], "unauthorized");
        }
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unknown_route_needs_token_too() {
        let (node, app) = app().await;
        let req = axum::http::Request::get("/v1/nope")
            .body(Body::empty())
            .unwrap();
        let (status, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn right_token_any_scheme_case_is_accepted() {
        let (node, app) = app().await;
        let req = axum::http::Request::get("/v1/status")
            .header(header::AUTHORIZATION, format!("bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let (status, json) = call(&app, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["peer_id"], node.node.peer_id.to_string());
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn malformed_json_is_400_error_body() {
        let (node, app) = app().await;
        expect_error(
            &app,
            request("POST", "/v1/groups", Some("{not json")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        // Valid JSON of the wrong shape, too.
        expect_error(
            &app,
            request("POST", "/v1/groups", Some("{\"nom\": \"x\"}")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        expect_error(
            &app,
            request("POST", "/v1/join", Some("[]")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missing_content_type_is_415_error_body() {
        let (node, app) = app().await;
        let req = axum::http::Request::post("/v1/groups")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::from("{\"name\":\"x\"}"))
            .unwrap();
        expect_error(
            &app,
            req,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn oversized_body_is_413_error_body() {
        let (node, app) = app().await;
        node.create_group("friends").await;
        let text = "x".repeat(MAX_BODY_BYTES + 1);
        let body = serde_json::to_string(&SendBody {
            text,
            reply_to: None,
        })
        .unwrap();
        expect_error(
            &app,
            request("POST", "/v1/groups/friends/messages", Some(&body)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unknown_route_is_404_error_body() {
        let (node, app) = app().await;
        expect_error(
            &app,
            request("GET", "/v1/nope", None),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        expect_error(
            &app,
            request("GET", "/v2", None),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wrong_method_is_405_error_body() {
        let (node, app) = app().await;
        expect_error(
            &app,
            request("DELETE", "/v1/status", None),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn engine_errors_map_to_statuses() {
        let (node, app) = app().await;
        // Two groups of one name: the name alone is ambiguous.
        node.create_group("a").await;
        node.create_group("a").await;
        // An inviter whose invite is revoked: a member refuses the join.
        let inviter = TestNode::start().await;
        let group = inviter.create_group("friends").await;
        let invite = inviter.invite(&group).await;
        let (g, id) = (group.id.clone(), invite.id.clone());
        inviter
            .engine()
            .run(move |e| e.revoke_invite(&g, &id))
            .await
            .unwrap();
        let join = |link: &str, timeout_secs: Option<u64>| {
            let body = serde_json::json!({ "link": link, "timeout_secs": timeout_secs });
            request("POST", "/v1/join", Some(&body.to_string()))
        };
        let cases = [
            (
                request("GET", "/v1/groups/zzz", None),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                request("GET", "/v1/groups/a", None),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                request("POST", "/v1/groups", Some("{\"name\":\"\"}")),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                request("POST", "/v1/join", Some("{\"link\":\"x\"}")),
                StatusCode::BAD_REQUEST,
                "bad_invite",
            ),
            (
                join(&invite.link, None),
                StatusCode::CONFLICT,
                "join_rejected",
            ),
        ];
        for (req, status, code) in cases {
            expect_error(&app, req, status, code).await;
        }
        // With the inviter gone nobody can be reached: the join ends before its time limit
        // (the next DHT lookup would come after it).
        inviter.stop().await;
        expect_error(
            &app,
            join(&invite.link, Some(3)),
            StatusCode::GATEWAY_TIMEOUT,
            "unreachable",
        )
        .await;
        node.stop().await;
        // What a running node cannot be made to fail with on purpose, through the mapping.
        let internal: ApiError = EngineError::Internal("disk on fire".to_owned()).into();
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.code, "internal");
        let shutting: ApiError = EngineError::ShuttingDown.into();
        assert_eq!(shutting.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shutting.code, "shutting_down");
        let storage = |reason| -> ApiError {
            EngineError::Storage {
                reason,
                dir: "/data/kith".into(),
            }
            .into()
        };
        let full = storage(FailureReason::NoSpace);
        assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(full.code, "disk_full");
        assert_eq!(
            full.message,
            "the node cannot write to its disk (no space left on device in /data/kith); \
             free some space, the node retries by itself"
        );
        let broken = storage(FailureReason::Io);
        assert_eq!(broken.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(broken.code, "storage_failing");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn endpoints_answer_json() {
        let (node, app) = app().await;
        node.create_group("friends").await;
        let (status, json) = call(
            &app,
            request("POST", "/v1/groups", Some("{\"name\":\"book club\"}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["name"], "book club");

        let (status, json) = call(
            &app,
            request(
                "POST",
                "/v1/groups/friends/messages",
                Some("{\"text\":\"hi\"}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let m: MessageInfo = serde_json::from_value(json).unwrap();
        assert_eq!(m.body, MessageBody::Text { text: "hi".into() });

        let (status, json) = call(
            &app,
            request("POST", "/v1/groups/friends/invites", Some("{}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["max_uses"], 1);

        // Percent-encoded names reach the engine decoded.
        let (status, _) = call(&app, request("GET", "/v1/groups/fri%65nds", None)).await;
        assert_eq!(status, StatusCode::OK);
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn net_endpoints_list_and_replace_peers() {
        let (node, app) = app().await;
        let other = TestNode::start().await;
        node.connect(&other).await;
        let (status, json) = call(&app, request("GET", "/v1/net/peers", None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            serde_json::json!({ "peers": [other.node.peer_id.to_string()] })
        );

        let body = serde_json::json!({ "peers": [peer(2).to_string()] }).to_string();
        let (status, json) = call(&app, request("PUT", "/v1/net/blocked", Some(&body))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["peers"][0], peer(2).to_string());
        let (_, json) = call(&app, request("GET", "/v1/net/blocked", None)).await;
        assert_eq!(json["peers"][0], peer(2).to_string());

        // One bad id refuses the whole request and changes nothing.
        let body = serde_json::json!({ "peers": [peer(3).to_string(), "12D3KooWbad"] }).to_string();
        let (status, json) = call(&app, request("PUT", "/v1/net/blocked", Some(&body))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["code"], "bad_request");
        assert!(json["error"].as_str().unwrap().contains("12D3KooWbad"));
        assert_eq!(node.engine().blocked().await.unwrap(), vec![peer(2)]);
        expect_error(
            &app,
            request("PUT", "/v1/net/blocked", Some("{\"peers\": \"x\"}")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        expect_error(
            &app,
            request("POST", "/v1/net/blocked", Some("{\"peers\": []}")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
        other.stop().await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_chats_list_counts_unread_and_history_pages_back() {
        let (a, b, group) = two_in_a_group("friends").await;
        let (a, app) = app_of(a);
        let list = |app: Router| async move {
            let (status, json) = call(&app, request("GET", "/v1/groups", None)).await;
            assert_eq!(status, StatusCode::OK, "{json}");
            json[0].clone()
        };
        let first = list(app.clone()).await;
        assert_eq!(first["unread"], 0, "{first}");
        assert_eq!(first["active"], true);
        assert!(first.get("last_message").is_none(), "{first}");
        let mut sent = Vec::new();
        // One at a time: this test is about counting, and right after a join two quick
        // messages can arrive out of order (each is shown where it arrived).
        let engine = a.engine();
        for text in ["one", "two", "three"] {
            sent.push(send(&b, &group.id, text).await);
            a.wait("b's text", |_| {
                let engine = engine.clone();
                let id = group.id.clone();
                async move {
                    let h = engine.run(move |e| e.history(&id, 10)).await.unwrap();
                    h.iter()
                        .any(|m| matches!(&m.body, MessageBody::Text { text: t } if t == text))
                }
            })
            .await;
        }
        let summary = list(app.clone()).await;
        assert_eq!(summary["unread"], 3, "{summary}");
        assert_eq!(
            summary["last_message"]["body"]["text"], "three",
            "{summary}"
        );
        // Read up to "two": one left.
        let body = format!("{{\"up_to\": \"{}\"}}", sent[1].id);
        let (status, json) = call(
            &app,
            request("POST", "/v1/groups/friends/read", Some(&body)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let summary = list(app.clone()).await;
        assert_eq!(summary["unread"], 1, "{summary}");
        assert_eq!(summary["read_up_to"], sent[1].id);
        // Writing in a chat reads it.
        send(&a, &group.id, "mine").await;
        let summary = list(app.clone()).await;
        assert_eq!(summary["unread"], 0, "{summary}");
        assert_eq!(summary["last_message"]["body"]["text"], "mine");

        // Pages: the newest two, then the two before them.
        let (_, newest) = call(
            &app,
            request("GET", "/v1/groups/friends/messages?limit=2", None),
        )
        .await;
        let texts = |json: &serde_json::Value| -> Vec<String> {
            json.as_array()
                .unwrap()
                .iter()
                .filter_map(|m| m["body"]["text"].as_str().map(str::to_owned))
                .collect()
        };
        assert_eq!(texts(&newest), ["three", "mine"]);
        let oldest_shown = newest[0]["id"].as_str().unwrap();
        let (status, before) = call(
            &app,
            request(
                "GET",
                &format!("/v1/groups/friends/messages?limit=2&before={oldest_shown}"),
                None,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{before}");
        assert_eq!(texts(&before), ["one", "two"]);
        expect_error(
            &app,
            request("GET", "/v1/groups/friends/messages?before=00000000", None),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        b.stop().await;
        a.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn membership_routes() {
        // Leaving needs another member to commit it.
        let (a, b, _) = two_in_a_group("friends").await;
        let (a, app) = app_of(a);
        let (status, json) = call(&app, request("GET", "/v1/groups/friends/members", None)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json[0]["is_self"], true);
        assert!(json[0]["leaf_index"].is_u64());
        let (status, json) = call(&app, request("POST", "/v1/groups/friends/update", None)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let other = peer(2);
        expect_error(
            &app,
            request(
                "DELETE",
                &format!("/v1/groups/friends/members/{other}"),
                None,
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        expect_error(
            &app,
            request("DELETE", "/v1/groups/friends/members/not-a-peer", None),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        expect_error(
            &app,
            request("POST", "/v1/groups/nope/leave", None),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        // Last: a member that is leaving cannot update or remove.
        let (status, json) = call(&app, request("POST", "/v1/groups/friends/leave", None)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json["leaving"], true);
        b.stop().await;
        a.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn requests_are_counted_by_matched_route() {
        let (node, app) = app().await;
        node.create_group("friends").await;
        for uri in [
            "/v1/groups/friends",
            "/v1/groups/fri%65nds",
            "/v1/groups/zzz",
        ] {
            let _ = call(&app, request("GET", uri, None)).await;
        }
        let _ = call(&app, request("GET", "/v1/no/such/path", None)).await;
        let unauthenticated = axum::http::Request::get("/v1/status")
            .body(Body::empty())
            .unwrap();
        let _ = call(&app, unauthenticated).await;
        let text = node.scrape_metrics().await;
        for line in [
            "kith_api_requests_total{method=\"GET\",endpoint=\"/v1/groups/{group}\",status=\"200\"} 2",
            "kith_api_requests_total{method=\"GET\",endpoint=\"/v1/groups/{group}\",status=\"404\"} 1",
            "kith_api_requests_total{method=\"GET\",endpoint=\"unmatched\",status=\"404\"} 1",
            "kith_api_requests_total{method=\"GET\",endpoint=\"/v1/status\",status=\"401\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("zzz") && !text.contains("such"), "{text}");
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn history_limit_defaults_clamps_and_validates() {
        let (node, app) = app().await;
        // The creation row and 1000 texts: more than both the default and the largest limit.
        let group = node.create_group("friends").await;
        let g = group.id.clone();
        node.engine()
            .run(move |e| {
                for i in 0..1000 {
                    e.send(&g, &format!("m{i}"))?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let (_, json) = call(&app, request("GET", "/v1/groups/friends/messages", None)).await;
        let entries = json.as_array().unwrap();
        assert_eq!(entries.len(), 100);
        let (_, json) = call(
            &app,
            request("GET", "/v1/groups/friends/messages?limit=5000", None),
        )
        .await;
        assert_eq!(json.as_array().unwrap().len(), 1000);
        expect_error(
            &app,
            request("GET", "/v1/groups/friends/messages?limit=many", None),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
        node.stop().await;
    }

    /// Reads SSE frames from a body until `want` complete events (blank-line terminated)
    /// have arrived, with a timeout.
    async fn read_events(body: Body, want: usize) -> String {
        let mut stream = body.into_data_stream();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while text.matches("\n\n").count() < want {
                let chunk = stream.next().await.unwrap().unwrap();
                text.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .unwrap();
        text
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn events_stream_filters_by_group() {
        let (node, app) = app().await;
        let friends = node.create_group("friends").await;
        let other = node.create_group("other").await;
        let response = app
            .clone()
            .oneshot(request("GET", "/v1/events?group=friends", None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        send(&node, &other.id, "not for us").await;
        let hello = send(&node, &friends.id, "hello").await;
        let text = read_events(response.into_body(), 1).await;
        assert!(text.starts_with("event: message\ndata: {"), "{text}");
        assert!(
            text.contains("hello") && !text.contains("not for us"),
            "{text}"
        );
        let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        let event: NodeEvent = serde_json::from_str(data).unwrap();
        assert_eq!(event, NodeEvent::Message(Box::new(hello)));
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn events_for_unknown_group_is_404() {
        let (node, app) = app().await;
        expect_error(
            &app,
            request("GET", "/v1/events?group=zzz", None),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn lagging_subscriber_gets_lagged_and_continues() {
        // No self-update in between: every event is a text.
        let node = TestNode::start_with(|c| c.update_policy.after_messages = u64::MAX).await;
        let (node, app) = app_of(node);
        let group = node.create_group("friends").await;
        let response = app
            .clone()
            .oneshot(request("GET", "/v1/events", None))
            .await
            .unwrap();
        // Three more texts than the engine's event buffer holds, while nobody reads.
        let n = EVENT_BUFFER + 3;
        let g = group.id.clone();
        node.engine()
            .run(move |e| {
                for i in 0..n {
                    e.send(&g, &format!("m{i}"))?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let text = read_events(response.into_body(), 3).await;
        let mut frames = text.split("\n\n");
        assert_eq!(
            frames.next().unwrap(),
            "event: lagged\ndata: {\"missed\":3}"
        );
        assert!(frames.next().unwrap().contains("\"m3\""));
        assert!(frames.next().unwrap().contains("\"m4\""));
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn serve_ends_event_streams_at_shutdown() {
        let node = TestNode::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            node.engine(),
            TOKEN.to_owned(),
            Arc::new(Sessions::in_memory()),
            async {
                let _ = stop_rx.await;
            },
        ));

        // Open an event stream over a real connection and keep it open.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(
                format!(
                    "GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("serve did not stop")
            .unwrap()
            .unwrap();
        node.stop().await;
    }
}
