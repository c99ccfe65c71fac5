//! The listener's pages: small, plain HTML with no script, style sheet or image from anywhere.

use crate::daemon::CallbackError;
use crate::wire::ConnectionView;
use authkeeper_state::StateName;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A page with `title` and one paragraph of `text` (escaped here).
pub fn page(status: StatusCode, title: &str, text: &str) -> Response {
    html(status, title, &format!("<p>{}</p><p>You can close this tab.</p>", escape(text)), None)
}

/// A page with `title` and a `body` of markup the caller has escaped, and a `refresh`
/// (`"3"`: reload every 3 s; `"0;url=/login"`: move on) if given.
pub fn html(status: StatusCode, title: &str, body: &str, refresh: Option<&str>) -> Response {
    let refresh = refresh.map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">")).unwrap_or_default();
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">{refresh}<title>{t} · authkeeper</title></head>\
         <body><h1>{t}</h1>{body}</body></html>\n",
        t = escape(title),
    );
    (status, HEADERS, page).into_response()
}

/// What every page sends: nothing from elsewhere, forms only to itself, no framing, no caching,
/// no referrer.
pub const HEADERS: [(header::HeaderName, &str); 5] = [
    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
    (header::CACHE_CONTROL, "no-store"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::CONTENT_SECURITY_POLICY, "default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

/// A callback that changed nothing: 400 with why.
pub fn refused(why: &CallbackError) -> Response {
    let advice = "Nothing was changed. Start the login again from authkeeper.";
    page(StatusCode::BAD_REQUEST, "Login not accepted", &format!("{why}. {advice}"))
}

/// The daemon could not take the callback.
pub fn unavailable(why: &str) -> Response {
    page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &format!("authkeeper could not finish the login now: {why}."))
}

/// What became of the connection once the callback was handled.
pub fn outcome(view: &ConnectionView) -> Response {
    let who = format!("{}/{}", view.provider, view.profile);
    match (view.state, &view.last_error) {
        (StateName::Connected, _) => {
            let account = view.account.as_deref().map(|a| format!(" as {a}")).unwrap_or_default();
            page(StatusCode::OK, "Connected", &format!("{who} is connected{account}."))
        }
        (StateName::Pending, Some(error)) => page(
            StatusCode::BAD_GATEWAY,
            "Not finished",
            &format!("{who}: the provider did not answer usefully ({error}). Reload this page to try again."),
        ),
        (state, _) => {
            let detail = view.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            page(StatusCode::OK, "Not connected", &format!("{who} is {}{detail}.", state.as_str()))
        }
    }
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
