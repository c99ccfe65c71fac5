//! A refresh storm: N connections whose week-long tokens were all issued within the same hour,
//! so all expire within the same hour. Each is scheduled the way the daemon schedules it at
//! start-up (its machine's next action, its refresh's slot under Trakt's rate); the plan must
//! keep to the rate and refresh every token before it expires.

use authkeeper::daemon::{REFRESH_SHARE, with_refresh_slot};
use authkeeper::limits::RefreshPlanner;
use authkeeper_state::Machine;
use authkeeper_state::schedule::next_action;
use chrono::{TimeDelta, Utc};
use std::collections::HashMap;
use std::time::Instant;

pub fn storm(n: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    // What the daemon runs with: validation at least daily, Trakt's rate.
    let policy = authkeeper::config::Settings::default().policy();
    let rate = authkeeper::providers::find("trakt").expect("trakt").limits().per_second * REFRESH_SHARE;
    println!("storm: {n} Trakt connections, week-long tokens issued within the past hour; refreshes at {rate}/s");
    let t = Instant::now();
    let machines: Vec<Machine> = (0..n)
        .map(|i| {
            let issued = now - TimeDelta::seconds((i % 3600) as i64);
            crate::process::connected(crate::process::profile(i), i, format!("a{i}"), format!("r{i}"), issued).machine
        })
        .collect();
    println!("  made      {n} machines in {:.1} s", t.elapsed().as_secs_f64());

    let planner = RefreshPlanner::new(rate);
    let t = Instant::now();
    let (mut refreshes, mut late, mut per_second) = (0usize, 0usize, HashMap::<i64, u32>::new());
    let (mut first, mut last) = (None, None);
    let (mut soonest, mut latest) = (None, None);
    for m in &machines {
        let Some(next) = next_action(m, &policy) else { continue };
        with_refresh_slot(m, next, &planner, &policy, now);
        // The refresh's slot, whatever comes first: asked again, the planner answers the same.
        let want = authkeeper_state::schedule::refresh_at(m, &policy).expect("refreshable");
        let slot = planner.plan(m.key().profile.as_str(), want, now);
        let expires = m.connection().grant.as_ref().and_then(|g| g.expires_at).expect("expires");
        soonest = soonest.min(Some(expires)).or(Some(expires));
        latest = latest.max(Some(expires));
        refreshes += 1;
        late += usize::from(slot >= expires || slot < now);
        *per_second.entry(slot.timestamp()).or_default() += 1;
        first = first.min(Some(slot)).or(Some(slot));
        last = last.max(Some(slot));
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    println!("  planned   {refreshes} refreshes in {:.1} s", t.elapsed().as_secs_f64());
    let hours = |t: chrono::DateTime<Utc>| (t - now).num_seconds() as f64 / 3600.0;
    if let (Some(first), Some(last), Some(soonest), Some(latest)) = (first, last, soonest, latest) {
        println!(
            "  span      from {:.1} h to {:.1} h from now ({:.1} h), tokens expire {:.1}–{:.1} h from now",
            hours(first),
            hours(last),
            hours(last) - hours(first),
            hours(soonest),
            hours(latest)
        );
    }
    println!("  rate      at most {busiest} refreshes in any second (limit {rate})");
    println!("  expiring  {late} planned at or after their token's expiry (target 0)");
    anyhow::ensure!(late == 0 && f64::from(busiest) <= rate.ceil(), "the plan breaks the rate or lets tokens expire");
    Ok(())
}
