//! Plain `http` is refused for any URL the daemon sends secrets to (a `base_url`, a server, an
//! OAuth endpoint, discovered ones included) unless its host is on a home network, or the
//! config says `"authkeeper": {"allow_insecure_http": true}`: client secrets and tokens never
//! cross the internet in clear. Home network: loopback, private and link-local addresses,
//! names without a dot, and names under `.local`, `.lan`, `.internal` or `.home.arpa`.

use authkeeper_state::ConnKey;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Whether plain `http` to `host` (as a URL writes it; IPv6 in brackets) stays at home.
pub fn home_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => {
            let unique_local = (ip.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            let mapped = ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback() || v4.is_private());
            ip.is_loopback() || unique_local || link_local || mapped
        }
        Err(_) => {
            !host.contains('.')
                || [".local", ".lan", ".internal", ".home.arpa", ".localhost"].iter().any(|s| host.ends_with(s))
        }
    }
}

/// Refuse `url` (named `what` in the message) when it is plain `http` to a public host and
/// `allowed` is false. A URL that does not parse is left to the code that uses it.
pub fn check(what: &str, url: &str, allowed: bool) -> Result<(), String> {
    let Ok(parsed) = reqwest::Url::parse(url.trim()) else { return Ok(()) };
    let host = parsed.host_str().unwrap_or_default();
    if allowed || parsed.scheme() != "http" || home_host(host) {
        return Ok(());
    }
    Err(format!(
        "{what}: {url:?} is plain http to {host}, a host outside your network: secrets sent there would \
         travel in clear text. Use https, or set \"authkeeper\": {{\"allow_insecure_http\": true}} to allow it"
    ))
}

/// Every URL a config names that secrets are sent to: `authkeeper.base_url` and each
/// profile's (its server, its OAuth endpoints).
pub fn check_config(
    settings: &crate::config::Settings,
    profiles: &BTreeMap<ConnKey, Arc<crate::providers::Profile>>,
) -> Result<(), String> {
    for (name, url) in &settings.base_url {
        check(&format!("authkeeper.base_url.{name}"), url, settings.allow_insecure_http)?;
    }
    settings.hooks.check(settings.allow_insecure_http)?;
    let mut last: Option<&Arc<crate::providers::Profile>> = None;
    for (key, profile) in profiles {
        // Profiles that inherit the same settings share them: each is checked once.
        if last.is_some_and(|l| Arc::ptr_eq(l, profile)) {
            continue;
        }
        last = Some(profile);
        for (setting, url) in profile.provider.urls(profile) {
            profile.check_url(&format!("{}.{}.{setting}", profile.provider.manifest().block, key.profile), &url)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_hosts_pass_and_public_ones_need_https_or_the_setting() {
        for home in [
            "http://127.0.0.1:8080",
            "http://127.8.9.1",
            "http://[::1]:9",
            "http://localhost:1",
            "http://192.168.1.10:8096",
            "http://10.0.0.2",
            "http://172.16.4.4",
            "http://169.254.1.1",
            "http://[fd00::1]",
            "http://[fe80::1]",
            "http://jellyfin:8096",
            "http://nas.local",
            "http://tv.home.arpa",
            "https://example.com",
        ] {
            assert_eq!(check("x", home, false), Ok(()), "{home}");
        }
        for public in ["http://example.com", "http://8.8.8.8", "http://[2001:db8::1]", "http://172.32.0.1"] {
            let e = check("authkeeper.base_url.trakt", public, false).unwrap_err();
            assert!(e.contains("authkeeper.base_url.trakt") && e.contains("allow_insecure_http"), "{e}");
            assert_eq!(check("x", public, true), Ok(()), "allowed explicitly: {public}");
        }
    }
}
