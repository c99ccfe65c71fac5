//! Guessing links is throttled per client address: after [`LIMIT`] failed tokens in a minute,
//! an address gets 429 with `Retry-After` for invalid tokens until the minute is over. A valid
//! token is never throttled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed tokens an address may present in one window.
pub const LIMIT: u32 = 20;
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most (the oldest windows go first).
const REMEMBERED: usize = 65_536;

#[derive(Default)]
pub struct Guesses(Mutex<HashMap<IpAddr, (Instant, u32)>>);

impl Guesses {
    /// Count a failed token from `addr`; `Some(seconds)` when the address is over the limit.
    pub fn fail(&self, addr: IpAddr) -> Option<u64> {
        // An IPv6 host has a whole /64 to pick addresses from: it counts as one.
        let addr = match addr {
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            v4 => v4,
        };
        let now = Instant::now();
        let mut map = self.0.lock().unwrap();
        if map.len() >= REMEMBERED {
            map.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if map.len() >= REMEMBERED {
                // Guesses from this many addresses at once: count afresh rather than grow
                // without bound.
                map.clear();
            }
        }
        let entry = map.entry(addr).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let left = WINDOW.saturating_sub(now.duration_since(entry.0));
        (entry.1 > LIMIT).then(|| left.as_secs().max(1))
    }
}
