//! Routes of the web app: its embedded files, the login with a one-time code, the session,
//! and QR codes for invite links. See [`crate::web`] for the rules.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ApiResult, ApiState, Caller};
use crate::model::{LoginCode, QrBody, WebSession};
use crate::web::{self, sessions::LOGIN_CODE_TTL};

/// `POST /v1/web/login-codes` (API token only): a one-time code for `/app/login`.
pub(super) async fn login_code(
    State(s): State<ApiState>,
    caller: Option<axum::Extension<Caller>>,
) -> ApiResult<LoginCode> {
    if caller.map(|c| c.0) != Some(Caller::Token) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "login codes are only given to the API token (run `kith open`)",
        ));
    }
    Ok(Json(LoginCode {
        code: s.sessions.new_code(),
        expires_in_secs: LOGIN_CODE_TTL.as_secs(),
    }))
}

/// `GET /v1/web/session`: whether the cookie is a live session.
pub(super) async fn session(
    State(s): State<ApiState>,
    headers: HeaderMap,
) -> ApiResult<WebSession> {
    web::cookie(&headers, &s.cookie_name)
        .and_then(|secret| s.sessions.check(secret))
        .map(|expires_at_ms| Json(WebSession { expires_at_ms }))
        .ok_or_else(|| ApiError::unauthorized("no browser session; run `kith open`"))
}

/// `POST /v1/web/logout`: ends the cookie's session and clears the cookie.
pub(super) async fn logout(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let name = &s.cookie_name;
    if let Some(secret) = web::cookie(&headers, name) {
        s.sessions.end(secret);
    }
    let clear = format!("{name}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&clear) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /v1/qr`: the body's text as an SVG QR code.
pub(super) async fn qr(body: Result<Json<QrBody>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let svg = web::qr_svg(&body.text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "the text does not fit in a QR code (at most {} bytes)",
            web::MAX_QR_TEXT_BYTES
        ))
    })?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

/// `GET /` and `GET /app`: to the app.
pub(super) async fn to_app() -> Response {
    redirect("/app/")
}

/// `GET /app/`: the app's page.
pub(super) async fn index(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    serve_asset(&s, &headers, "index.html")
}

/// `GET /app/{name}`: one of the app's files.
pub(super) async fn file(
    State(s): State<ApiState>,
    headers: HeaderMap,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    match name {
        Ok(Path(name)) => serve_asset(&s, &headers, &name),
        Err(_) => not_an_asset(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginQuery {
    code: Option<String>,
}

/// `GET /app/login?code=…`: trades a login code for a session cookie, then goes to the app
/// (the code leaves the address bar); a bad code goes to the app's login screen.
pub(super) async fn login(
    State(s): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    if let Err(refused) = own_host(&s, &headers) {
        return refused.into_response();
    }
    let code = query.ok().and_then(|Query(q)| q.code);
    let Some(session) = code.and_then(|code| s.sessions.redeem(&code)) else {
        tracing::info!("a browser login with an unknown, used or expired code");
        return redirect("/app/?login=failed");
    };
    tracing::info!("a browser logged in to the web app");
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        s.cookie_name,
        session.secret,
        web::sessions::SESSION_TTL.as_secs()
    );
    let mut response = redirect("/app/");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn serve_asset(s: &ApiState, headers: &HeaderMap, name: &str) -> Response {
    if let Err(refused) = own_host(s, headers) {
        return refused.into_response();
    }
    let Some((kind, bytes)) = web::asset(name) else {
        return not_an_asset();
    };
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    app_headers(h);
    response
}

/// Headers on every page of the app: no sniffing, no referrer, no framing, always revalidated.
fn app_headers(h: &mut HeaderMap) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// Refuses a request for the app under a host name that is not the node's own (a page that
/// rebinds its DNS name to 127.0.0.1 must not get the app, nor a cookie for its name).
fn own_host(s: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if web::is_own_host(host, s.addr.port()) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_origin",
        "open the app at http://127.0.0.1 (run `kith open`)",
    ))
}

fn redirect(to: &'static str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let h = response.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static(to));
    app_headers(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_an_asset() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such file in the app",
    )
    .into_response()
}

#[cfg(test)]
mod tests;
