//! What every adapter's HTTP calls share: the client, and failures described without URLs.

use std::time::Duration;

/// Make rustls usable (ring); every reqwest client needs it, TLS or not. Idempotent.
pub fn install_crypto() {
    // Installing the process-wide provider fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client every adapter uses: rustls, a bounded timeout, our User-Agent.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("authkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds")
}

/// Describe a transport failure without its URL (and so without anything that could be secret).
pub fn transport_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out waiting for the provider".into()
    } else if e.is_connect() {
        "cannot reach the provider".into()
    } else if was_reset(&e) {
        "connection reset by the provider before it answered".into()
    } else if e.is_decode() || e.is_body() {
        "unreadable answer from the provider".into()
    } else if closed_early(&e) {
        "the provider closed the connection before it answered".into()
    } else {
        format!("request failed: {}", e.without_url())
    }
}

/// Describe a failure while the body of `label`'s answer was read (the status had come).
pub fn body_error(e: &reqwest::Error, label: &str) -> String {
    if e.is_timeout() {
        format!("timed out reading the answer from {label}: it came too slowly")
    } else if was_reset(e) {
        format!("connection reset by {label} while it answered")
    } else {
        format!("the answer from {label} was cut short: the connection closed before its end")
    }
}

/// The errors under `e`, outermost first.
fn causes<'a>(e: &'a reqwest::Error) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(e), |e| e.source())
}

/// The peer reset the connection (a TCP RST: `ECONNRESET`, or a write into a reset socket).
fn was_reset(e: &reqwest::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    causes(e).any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe))
    })
}

/// The connection closed (a FIN) before a whole answer came.
fn closed_early(e: &reqwest::Error) -> bool {
    causes(e).any(|c| c.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_incomplete_message))
}
