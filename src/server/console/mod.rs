//! The operator's console at `/ui`: a page, its script and its style sheet, built into the
//! binary (no CDN, no build step; it works offline), and the event poll it follows.
//!
//! The page asks for an API key, keeps it in `sessionStorage`, and sends it only as an
//! `Authorization` header to `GET /v1/locks` and `GET /v1/events`, never in a URL. Every
//! answer here carries a strict content security policy (scripts and styles from this
//! server only, nothing inline, no framing), and the script writes user data (lock names,
//! labels) with `textContent` only.

mod events;

pub(crate) use events::{EventHub, PATH_EVENTS};

use crate::server::http::Reply;
use http::{Response, StatusCode, header};
use http_body_util::Full;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// The policy every console answer carries.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// Whether `path` is one of the console's files.
pub(crate) fn is_asset(path: &str) -> bool {
    file(path).is_some()
}

fn file(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/ui" | "/ui/" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "/ui/app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "/ui/app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        _ => None,
    }
}

/// One of the console's files, with its security headers.
pub(crate) fn asset(path: &str) -> Reply {
    let Some((content_type, body)) = file(path) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::default())
            .expect("static headers are valid");
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
        .header(header::X_FRAME_OPTIONS, "DENY")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}
