//! `kith open` against a real `kith run` process: the one-time link logs a browser in (an
//! HttpOnly, SameSite=Strict cookie), works once, and the cookie drives the API only from
//! the node's own origin. The browser itself is driven in `browser.rs`; this checks the
//! HTTP exchange as a browser would make it, and how `kith open` starts a browser.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use kith_tests::{api_addr, kith_bin, poll_until, raw_http, raw_http_with_head, spawn_kith_run};

/// Runs `kith --data-dir DIR open ARGS` with `env` set and no desktop or browser from the
/// environment; returns stdout (the command must succeed).
fn kith_open(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(kith_bin().unwrap());
    command
        .arg("--data-dir")
        .arg(dir)
        .arg("open")
        .args(args)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("BROWSER")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kith open failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The path and query of the login link in `text`.
fn login_path(text: &str) -> String {
    let url = text
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no link in {text:?}"));
    let rest = url.strip_prefix("http://").unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("/{path}")
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn kith_open_gives_a_one_time_link_that_logs_a_browser_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _node = spawn_kith_run(dir, None).unwrap();
    let addr = api_addr(dir).unwrap();

    let printed = kith_open(dir, &["--print"], &[]);
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(
        printed.starts_with(&format!("http://{addr}/app/login?code=")),
        "{printed}"
    );
    let path = login_path(&printed);

    let (status, head, _) = raw_http_with_head(addr, "GET", &path, &[], "").unwrap();
    assert_eq!(status, 303, "{head}");
    assert_eq!(header(&head, "location"), Some("/app/"));
    let set_cookie = header(&head, "set-cookie").unwrap();
    assert!(set_cookie.starts_with("kith_session_"), "{set_cookie}");
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = format!("Cookie: {}", set_cookie.split(';').next().unwrap());
    assert!(
        !cookie.contains(
            &std::fs::read_to_string(dir.join("api.token"))
                .unwrap()
                .trim()
                .to_owned()
        ),
        "the API token never leaves the node"
    );

    // The link works once.
    let (status, head, _) = raw_http_with_head(addr, "GET", &path, &[], "").unwrap();
    assert_eq!(status, 303);
    assert_eq!(header(&head, "location"), Some("/app/?login=failed"));
    assert_eq!(header(&head, "set-cookie"), None);

    // The cookie drives the API from the node's own pages…
    let origin = format!("Origin: http://{addr}");
    let (status, body) = raw_http(
        addr,
        "GET",
        "/v1/web/session",
        &[&cookie, "Sec-Fetch-Site: same-origin"],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/groups",
        &[&cookie, &origin, "Content-Type: application/json"],
        r#"{"name":"from the browser"}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // …and from nowhere else.
    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/groups",
        &[
            &cookie,
            "Origin: http://127.0.0.1:1",
            "Content-Type: application/json",
        ],
        r#"{"name":"from elsewhere"}"#,
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cross_origin"), "{body}");

    // The session outlives a restart of the node (on another port: the cookie's name comes
    // from the node's identity, not its port).
    drop(_node);
    let _node = spawn_kith_run(dir, None).unwrap();
    let addr_again = api_addr(dir).unwrap();
    let (status, body) = raw_http(
        addr_again,
        "GET",
        "/v1/web/session",
        &[&cookie, "Sec-Fetch-Site: same-origin"],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[test]
fn kith_open_starts_the_browser_or_says_where_to_go() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _node = spawn_kith_run(dir, None).unwrap();
    let addr = api_addr(dir).unwrap();

    // No desktop: the link and what to do with it.
    let text = kith_open(dir, &[], &[]);
    assert!(
        text.starts_with("open this link in a browser on this machine within 2 minutes"),
        "{text}"
    );
    assert!(
        text.contains(&format!("http://{addr}/app/login?code=")),
        "{text}"
    );

    // $BROWSER is started with the link.
    let opened = dir.join("opened");
    let script = dir.join("browser.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1\" > '{}'\n", opened.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = kith_open(dir, &[], &[("BROWSER", script.to_str().unwrap())]);
    assert!(text.starts_with("opening Kith in your browser"), "{text}");
    let link = poll_until("the browser script ran", || {
        Ok(std::fs::read_to_string(&opened)
            .ok()
            .filter(|t| t.ends_with('\n')))
    })
    .unwrap();
    assert_eq!(login_path(&link), login_path(&text));
}
