//! The web app's routes and the cookie rules, over a real node (no socket).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use tower::ServiceExt;

use crate::api::{TEST_ADDR, router_with_sessions};
use crate::testing::{TOKEN, TestNode};
use crate::web::sessions::Sessions;

const OWN_ORIGIN: &str = "http://127.0.0.1:7040";

async fn app() -> (TestNode, Router) {
    let node = TestNode::start().await;
    let app = router_with_sessions(
        node.engine(),
        TOKEN.to_owned(),
        Arc::new(Sessions::in_memory()),
    );
    (node, app)
}

async fn send(app: &Router, request: Request<Body>) -> (Response<Body>, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec();
    (Response::from_parts(parts, Body::empty()), bytes)
}

fn get(uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method("GET")
        .uri(uri)
        .header(header::HOST, TEST_ADDR)
}

/// Logs a browser in the way `kith open` does; returns its `Cookie` header.
async fn log_in(app: &Router) -> String {
    let request = Request::builder()
        .method("POST")
        .uri("/v1/web/login-codes")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (response, body) = send(app, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let code: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let code = code["code"].as_str().unwrap().to_owned();
    let login = get(&format!("/app/login?code={code}"))
        .header("sec-fetch-site", "none")
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(app, login).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/app/");
    let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(set.starts_with("kith_session_"), "{set}");
    // The same code again is refused.
    let again = get(&format!("/app/login?code={code}"))
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(app, again).await;
    assert_eq!(response.headers()[header::LOCATION], "/app/?login=failed");
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    set.split(';').next().unwrap().to_owned()
}

fn create_group(cookie: &str, origin: Option<&str>, host: &str) -> Request<Body> {
    let mut builder = Request::builder()
        .method("POST")
        .uri("/v1/groups")
        .header(header::HOST, host)
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(origin) = origin {
        builder = builder.header(header::ORIGIN, origin);
    }
    builder
        .body(Body::from(r#"{"name":"from the web"}"#))
        .unwrap()
}

async fn group_count(app: &Router) -> usize {
    let request = Request::builder()
        .uri("/v1/groups")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (_, body) = send(app, request).await;
    let groups: serde_json::Value = serde_json::from_slice(&body).unwrap();
    groups.as_array().unwrap().len()
}

fn error_code(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    json["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_login_code_becomes_a_session_that_drives_the_api() {
    let (node, app) = app().await;
    let cookie = log_in(&app).await;
    let (response, body) = send(
        &app,
        get("/v1/web/session")
            .header(header::COOKIE, &cookie)
            .header("sec-fetch-site", "same-origin")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("expires_at_ms"));
    let (response, body) = send(&app, create_group(&cookie, Some(OWN_ORIGIN), TEST_ADDR)).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(group_count(&app).await, 1);
    node.stop().await;
}

#[tokio::test]
async fn cookie_requests_from_anywhere_else_are_refused() {
    let (node, app) = app().await;
    let cookie = log_in(&app).await;
    for (origin, host) in [
        (Some("http://127.0.0.1:9999"), TEST_ADDR),
        (Some("null"), TEST_ADDR),
        (None, TEST_ADDR),
        (Some("http://rebound.example:7040"), "rebound.example:7040"),
    ] {
        let (response, body) = send(&app, create_group(&cookie, origin, host)).await;
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{origin:?} {host}"
        );
        assert_eq!(error_code(&body), "cross_origin");
    }
    // A page on another port of 127.0.0.1 is "same site" to the browser, so the cookie is
    // sent with its image or script requests: Sec-Fetch-Site tells them apart.
    let (response, _) = send(
        &app,
        get("/v1/groups")
            .header(header::COOKIE, &cookie)
            .header("sec-fetch-site", "same-site")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(group_count(&app).await, 0, "nothing was created");
    // A made-up session is no session.
    let name = cookie.split('=').next().unwrap();
    let fake = format!("{name}={}", "ab".repeat(32));
    let (response, body) = send(&app, create_group(&fake, Some(OWN_ORIGIN), TEST_ADDR)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "unauthorized");
    node.stop().await;
}

#[tokio::test]
async fn only_the_api_token_gets_login_codes_and_logout_ends_the_session() {
    let (node, app) = app().await;
    let cookie = log_in(&app).await;
    let from_browser = Request::builder()
        .method("POST")
        .uri("/v1/web/login-codes")
        .header(header::HOST, TEST_ADDR)
        .header(header::ORIGIN, OWN_ORIGIN)
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(&app, from_browser).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let logout = Request::builder()
        .method("POST")
        .uri("/v1/web/logout")
        .header(header::HOST, TEST_ADDR)
        .header(header::ORIGIN, OWN_ORIGIN)
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(&app, logout).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (response, _) = send(&app, create_group(&cookie, Some(OWN_ORIGIN), TEST_ADDR)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    node.stop().await;
}

#[tokio::test]
async fn the_app_is_served_with_its_headers_and_nothing_else() {
    let (node, app) = app().await;
    let (response, _) = send(&app, get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/app/");
    let (response, body) = send(&app, get("/app/").body(Body::empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let h = response.headers();
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(String::from_utf8_lossy(&body).contains("<html"));
    for (name, kind, _) in crate::web::assets::ASSETS {
        let (response, _) = send(
            &app,
            get(&format!("/app/{name}")).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], *kind);
    }
    for missing in ["/app/nothing.js", "/app/..%2FCargo.toml", "/app/sub/app.js"] {
        let (response, _) = send(&app, get(missing).body(Body::empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    let rebound = Request::builder()
        .uri("/app/")
        .header(header::HOST, "rebound.example:7040")
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(&app, rebound).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Without credentials the API stays closed.
    let (response, _) = send(&app, get("/v1/groups").body(Body::empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    node.stop().await;
}

#[tokio::test]
async fn an_invite_link_is_drawn_as_a_qr_code() {
    let (node, app) = app().await;
    let request = Request::builder()
        .method("POST")
        .uri("/v1/qr")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"text":"kith://join/example"}"#))
        .unwrap();
    let (response, body) = send(&app, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/svg+xml");
    assert!(body.starts_with(b"<svg"));
    let long = serde_json::json!({ "text": "x".repeat(5000) }).to_string();
    let request = Request::builder()
        .method("POST")
        .uri("/v1/qr")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(long))
        .unwrap();
    let (response, _) = send(&app, request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    node.stop().await;
}
