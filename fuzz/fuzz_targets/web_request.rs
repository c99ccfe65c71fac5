//! The web listener: arbitrary requests through the real app (the OAuth callback and the
//! one-time login pages) of a real daemon. `{link}` in the request stands for a fresh link's
//! token, so that inputs reach the pages behind a valid link; a `peer: ADDR` header line sets
//! the client's address (for the guess throttle) and is not sent.

#![no_main]

use authkeeper_fuzz::{daemon, parse_request, runtime, send};
use axum::extract::ConnectInfo;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;

/// A fresh link's `{id}.{secret}`, for an owner's Jellyfin login.
fn fresh_link() -> String {
    let shared = daemon();
    let issued =
        runtime().block_on(authkeeper::links::create(&shared, "jellyfin", "fuzz:owner")).expect("a link is made");
    issued.url.split_once("token=").expect("the link carries its token").1.to_owned()
}

fuzz_target!(|data: &[u8]| {
    let text;
    let data = if data.windows(6).any(|w| w == b"{link}") {
        let Ok(s) = std::str::from_utf8(data) else { return };
        text = s.replace("{link}", &fresh_link());
        text.as_bytes()
    } else {
        data
    };
    let Some(mut request) = parse_request(data) else { return };
    let peer = request
        .headers_mut()
        .remove("peer")
        .and_then(|v| v.to_str().ok()?.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 40000)));
    request.extensions_mut().insert(ConnectInfo(peer));
    let shared = daemon();
    let app = authkeeper::web::app(shared, vec!["127.0.0.2".parse().unwrap()]);
    let response = send(app, request);
    authkeeper_fuzz::check_api_answer(&response);
    let csp = response.headers().get("content-security-policy");
    assert!(csp.is_some(), "an answer without the pages' headers: {}", response.status());
});
