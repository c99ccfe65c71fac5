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
    } else if e.is_decode() || e.is_body() {
        "unreadable answer from the provider".into()
    } else {
        format!("request failed: {}", e.without_url())
    }
}
