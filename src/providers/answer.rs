//! How adapters read what a provider answered: statuses with no verdict, and bodies that may
//! be garbage, an HTML page, cut short, drip-fed or huge. Every body is read here, through
//! one capped reader: at most [`MAX_ANSWER_BYTES`] is ever held, whatever the provider sends.
//! Nothing here panics, and no error repeats a URL or a credential.

use reqwest::header::CONTENT_TYPE;
use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

/// The most of one answer that is read (1 MiB): every real answer of every provider is a few
/// kilobytes; anything past this is refused, and the rest is never read.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A status that says nothing about the credential: a 429, a 5xx, anything unexpected.
pub fn status_error(label: &str, status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => format!("rate limited by {label} (429)"),
        s => format!("{label} answered HTTP {}", s.as_u16()),
    }
}

/// Why an answer's body was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer from {0} was larger than 1 MiB: refused, the rest was not read")]
    TooLarge(String),
    /// The connection failed while the body came (cut short, reset, too slow).
    #[error("{0}")]
    Transport(String),
    /// The whole body came, and it is not the JSON expected.
    #[error("unreadable answer from {label}: {what}")]
    NotJson { label: String, what: &'static str },
}

/// The whole body, read chunk by chunk up to [`MAX_ANSWER_BYTES`]. A larger announced length
/// is refused before anything is read; a body that grows past the cap is dropped there (which
/// closes the connection).
pub async fn body(mut resp: Response, label: &str) -> Result<Vec<u8>, BodyError> {
    let announced = resp.content_length().unwrap_or(0);
    if announced > MAX_ANSWER_BYTES as u64 {
        return Err(BodyError::TooLarge(label.into()));
    }
    let mut out = Vec::with_capacity(announced as usize);
    while let Some(chunk) = resp.chunk().await.map_err(|e| BodyError::Transport(super::http::body_error(&e, label)))? {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(BodyError::TooLarge(label.into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The body as `T`, or why not: too large, cut short, an HTML page, not JSON, or JSON of
/// another shape.
pub async fn read_json<T: DeserializeOwned>(resp: Response, label: &str) -> Result<T, BodyError> {
    let html = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/html"));
    let bytes = body(resp, label).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if html {
            "an HTML page (text/html), not JSON: a proxy or a login portal may stand in the way"
        } else if e.is_data() {
            "JSON of an unexpected shape"
        } else {
            "not valid JSON"
        };
        BodyError::NotJson { label: label.into(), what }
    })
}

/// [`read_json`], its error said in words.
pub async fn json<T: DeserializeOwned>(resp: Response, label: &str) -> Result<T, String> {
    read_json(resp, label).await.map_err(|e| e.to_string())
}
