//! The web app the node serves on its API address: embedded files, browser sessions, and
//! the same-origin rules for requests that carry a session cookie.
//!
//! The app and the API share one origin (`http://127.0.0.1:<port>`). A browser proves who
//! it is with an HttpOnly, SameSite=Strict cookie from [`sessions`]; since SameSite does not
//! tell ports apart (another web server on `127.0.0.1` is "same site"), every request that
//! relies on the cookie must also show it came from the node's own origin: [`check_origin`].

pub mod assets;
pub mod sessions;

use axum::http::{HeaderMap, Method, header};
use sha2::Digest as _;

/// Content-Security-Policy of the app's files: only its own scripts, styles and API; no
/// framing, no inline script, nothing fetched from anywhere else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
    font-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'self'";

/// Largest text `POST /v1/qr` draws.
pub const MAX_QR_TEXT_BYTES: usize = 2048;

/// The embedded file `name` and its content type.
pub fn asset(name: &str) -> Option<(&'static str, &'static [u8])> {
    assets::ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, kind, bytes)| (*kind, *bytes))
}

/// Name of the session cookie of node `peer`: `kith_session_` and 8 hex digits of a digest
/// of its PeerId. Cookies do not tell ports apart, so two nodes on one machine need two
/// names, and the name must not change when the node's API port does (port 0 by default).
pub fn cookie_name(peer: &libp2p::PeerId) -> String {
    let digest = sha2::Sha256::digest(peer.to_bytes());
    format!(
        "kith_session_{}",
        data_encoding::HEXLOWER.encode(&digest[..4])
    )
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim())
}

/// Why a cookie request was refused as not coming from the node's own origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    /// `Host` is not one of the node's loopback names (a DNS-rebinding page would send its
    /// own host name).
    #[error("the request names host {0:?}, which is not this node's address")]
    ForeignHost(String),
    /// `Origin` is another origin than the node's.
    #[error("the request comes from another origin ({0})")]
    ForeignOrigin(String),
    /// `Sec-Fetch-Site` says the request was made by another site or origin.
    #[error("the browser says the request comes from another origin (Sec-Fetch-Site: {0})")]
    CrossSite(String),
    /// A request that changes something came without an `Origin` header.
    #[error("a {0} request without an Origin header")]
    NoOrigin(Method),
}

/// Checks that a request carrying the session cookie was made by the node's own pages:
/// `Host` is the node's address on loopback (`127.0.0.1`, `localhost` or `[::1]` with `port`),
/// `Origin`, when sent, is `http://<Host>`, `Sec-Fetch-Site`, when sent, is `same-origin` or
/// `none` (typed into the address bar), and a method other than GET and HEAD has an `Origin`
/// (browsers send it on every such request).
pub fn check_origin(method: &Method, headers: &HeaderMap, port: u16) -> Result<(), OriginError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_own_host(host, port) {
        return Err(OriginError::ForeignHost(host.chars().take(100).collect()));
    }
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        Some(Ok(origin)) if origin.strip_prefix("http://") == Some(host) => {}
        Some(origin) => {
            let shown = origin.unwrap_or("not text");
            return Err(OriginError::ForeignOrigin(
                shown.chars().take(100).collect(),
            ));
        }
        None if *method != Method::GET && *method != Method::HEAD => {
            return Err(OriginError::NoOrigin(method.clone()));
        }
        None => {}
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("not text");
        if site != "same-origin" && site != "none" {
            return Err(OriginError::CrossSite(site.chars().take(40).collect()));
        }
    }
    Ok(())
}

/// Whether `host` (a `Host` header) names the node on loopback at `port`.
pub fn is_own_host(host: &str, port: u16) -> bool {
    let Some((name, given)) = host.rsplit_once(':') else {
        return false;
    };
    given.parse() == Ok(port) && matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

/// `text` as a QR code in SVG (error correction M, a 4-module quiet zone); `None` if it is
/// longer than [`MAX_QR_TEXT_BYTES`] or does not fit in a QR code.
pub fn qr_svg(text: &str) -> Option<String> {
    if text.len() > MAX_QR_TEXT_BYTES {
        return None;
    }
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M).ok()?;
    let width = code.width();
    let size = width + 8;
    let mut path = String::new();
    for (i, color) in code.to_colors().iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (x, y) = (i % width + 4, i / width + 4);
            path.push_str(&format!("M{x} {y}h1v1h-1z"));
        }
    }
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" \
         shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" \
         fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn the_nodes_own_pages_pass() {
        let own = headers(&[
            ("host", "127.0.0.1:7040"),
            ("origin", "http://127.0.0.1:7040"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(check_origin(&Method::POST, &own, 7040), Ok(()));
        let typed = headers(&[("host", "localhost:7040"), ("sec-fetch-site", "none")]);
        assert_eq!(check_origin(&Method::GET, &typed, 7040), Ok(()));
        let v6 = headers(&[("host", "[::1]:7040"), ("origin", "http://[::1]:7040")]);
        assert_eq!(check_origin(&Method::DELETE, &v6, 7040), Ok(()));
    }

    #[test]
    fn other_origins_and_hosts_are_refused() {
        let other_port = headers(&[
            ("host", "127.0.0.1:7040"),
            ("origin", "http://127.0.0.1:8000"),
        ]);
        assert!(matches!(
            check_origin(&Method::POST, &other_port, 7040),
            Err(OriginError::ForeignOrigin(_))
        ));
        let rebinding = headers(&[("host", "evil.example:7040")]);
        assert!(matches!(
            check_origin(&Method::GET, &rebinding, 7040),
            Err(OriginError::ForeignHost(_))
        ));
        let wrong_port = headers(&[("host", "127.0.0.1:7041")]);
        assert!(check_origin(&Method::GET, &wrong_port, 7040).is_err());
        let image_from_elsewhere =
            headers(&[("host", "127.0.0.1:7040"), ("sec-fetch-site", "same-site")]);
        assert!(matches!(
            check_origin(&Method::GET, &image_from_elsewhere, 7040),
            Err(OriginError::CrossSite(_))
        ));
        let no_origin = headers(&[("host", "127.0.0.1:7040")]);
        assert!(matches!(
            check_origin(&Method::POST, &no_origin, 7040),
            Err(OriginError::NoOrigin(_))
        ));
        let null = headers(&[("host", "127.0.0.1:7040"), ("origin", "null")]);
        assert!(check_origin(&Method::PUT, &null, 7040).is_err());
        assert!(check_origin(&Method::GET, &HeaderMap::new(), 7040).is_err());
    }

    #[test]
    fn cookies_are_found_by_name() {
        let map = headers(&[
            ("cookie", "a=1; kith_session_7040=abc"),
            ("cookie", "kith_session_7041=def"),
        ]);
        assert_eq!(cookie(&map, "kith_session_7040"), Some("abc"));
        assert_eq!(cookie(&map, "kith_session_7041"), Some("def"));
        let (a, b) = (libp2p::PeerId::random(), libp2p::PeerId::random());
        assert_ne!(cookie_name(&a), cookie_name(&b));
        assert_eq!(cookie_name(&a).len(), "kith_session_".len() + 8);
        assert_eq!(cookie(&map, "kith_session_1"), None);
    }

    #[test]
    fn a_qr_code_is_an_svg_and_long_texts_are_refused() {
        let svg = qr_svg("kith://join/abc").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("h1v1h-1z"), "{svg}");
        assert_eq!(qr_svg(&"x".repeat(MAX_QR_TEXT_BYTES + 1)), None);
    }

    #[test]
    fn every_asset_is_found_and_index_exists() {
        assert!(asset("index.html").is_some());
        for (name, kind, bytes) in assets::ASSETS {
            assert_eq!(asset(name).map(|(k, _)| k), Some(*kind));
            assert!(!bytes.is_empty(), "{name} is empty");
            assert!(!name.contains('/'), "{name}: the app's directory is flat");
        }
        assert_eq!(asset("../Cargo.toml"), None);
    }

    #[test]
    fn the_app_names_no_other_origin() {
        for (name, _, bytes) in assets::ASSETS {
            let text = String::from_utf8_lossy(bytes);
            // An SVG names its XML namespace with a URL; nothing is fetched from it.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{name} contains {needle}");
            }
        }
    }
}
