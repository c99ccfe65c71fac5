//! How adapters read what a provider answered: statuses with no verdict, and bodies that may
//! be garbage. Neither ever panics, and neither repeats a URL or a credential.

use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

/// A status that says nothing about the credential: a 429, a 5xx, anything unexpected.
pub fn status_error(label: &str, status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => format!("rate limited by {label} (429)"),
        s => format!("{label} answered HTTP {}", s.as_u16()),
    }
}

/// The body as `T`, or a clear error when it is not.
pub async fn json<T: DeserializeOwned>(resp: Response, label: &str) -> Result<T, String> {
    let bytes = resp.bytes().await.map_err(super::transport_error)?;
    serde_json::from_slice(&bytes).map_err(|_| format!("unreadable answer from {label}"))
}
