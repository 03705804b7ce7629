//! The web app's files (`node/web/`), built into the binary: `GET /app/<name>` serves
//! `node/web/<name>` with its content type. One row per file; the app has no build step.

/// `(name, content type, bytes)` of every file of the web app.
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../web/index.html"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/api.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/dom.js"),
    ),
    (
        "chat.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/chat.js"),
    ),
    (
        "panels.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/panels.js"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../web/icon.svg"),
    ),
];
