//! The web app's files, built into the binary from `node/web/` (no build step: plain HTML,
//! CSS and ES modules). One row per file: name under `/app/`, content type, bytes.

/// The embedded files of the web app.
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
];
