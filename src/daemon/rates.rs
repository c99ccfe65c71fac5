//! Each provider's rate limits as configured, and this daemon's share of them. Daemons that
//! share a store call the same provider apps, so each takes an equal part of every provider's
//! global rate (per-account limits need no sharing: one daemon holds each account's lease).

use super::{REFRESH_SHARE, Shared};
use crate::config::Settings;
use crate::limits::Limits;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The configured limits by provider, and how many daemons share them (0 until known: alone).
#[derive(Default)]
pub struct Rates {
    inner: Mutex<(BTreeMap<String, Limits>, usize)>,
}

impl Shared {
    /// Use the limits `settings` give each provider, at this daemon's share.
    pub fn configure_limits(&self, settings: &Settings) {
        let mut inner = self.rates.inner.lock().unwrap();
        inner.0 = self.gates.keys().map(|p| (p.clone(), settings.limits(p))).collect();
        self.apply_limits(&inner.0, inner.1);
    }

    /// `members` daemons share the store (and so the providers' rates) now.
    pub fn share_limits(&self, members: usize) {
        let mut inner = self.rates.inner.lock().unwrap();
        if inner.1 != members {
            inner.1 = members;
            self.apply_limits(&inner.0, members);
        }
    }

    fn apply_limits(&self, configured: &BTreeMap<String, Limits>, members: usize) {
        for (provider, gate) in &self.gates {
            let Some(limits) = configured.get(provider) else { continue };
            let share = share(limits, members);
            self.planners[provider].set_rate(share.per_second * REFRESH_SHARE);
            gate.set_limits(share);
        }
    }
}

/// One of `members` daemons' part of `limits` (all of it when alone).
fn share(limits: &Limits, members: usize) -> Limits {
    let members = members.max(1);
    Limits {
        per_second: limits.per_second / members as f64,
        burst: (limits.burst / members as u32).max(1),
        ..limits.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;

    #[test]
    fn daemons_sharing_a_store_split_each_providers_global_rate_but_not_its_per_account_limits() {
        let writes = Some(Rate { count: 1, per_secs: 1.0 });
        let trakt = Limits { per_second: 10.0, burst: 4, account_reads: None, account_writes: writes };
        assert_eq!(share(&trakt, 0), trakt, "alone until the members are known");
        assert_eq!(share(&trakt, 1), trakt);
        let half = share(&trakt, 2);
        assert_eq!((half.per_second, half.burst, half.account_writes), (5.0, 2, writes));
        assert_eq!(share(&trakt, 8).burst, 1, "a burst never falls to none");
    }
}
