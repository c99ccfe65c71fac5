//! The control socket's API: arbitrary requests (method, path, headers, body) through the real
//! router of a real daemon. No panic, no 500, and every error answer is the API's JSON error.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(request) = authkeeper_fuzz::parse_request(data) else { return };
    let router = authkeeper::api::router(authkeeper_fuzz::daemon());
    let response = authkeeper_fuzz::send(router, request);
    authkeeper_fuzz::check_api_answer(&response);
    if !response.status().is_success() {
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap_or_else(|e| {
            panic!(
                "a {} answer that is not JSON ({e}): {:?}",
                response.status(),
                String::from_utf8_lossy(response.body())
            )
        });
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "an error answer without error and message: {body}"
        );
    }
});
