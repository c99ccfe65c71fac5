//! A refresh storm: N connections whose week-long tokens were all issued within the same hour,
//! so all expire within the same hour. Each is scheduled the way the daemon schedules it at
//! start-up (its machine's next action, its refresh's slot under Trakt's rate); the plan must
//! keep to the rate and refresh every token before it expires.

use authkeeper::daemon::{REFRESH_SHARE, with_refresh_slot};
use authkeeper::limits::RefreshPlanner;
use authkeeper_state::schedule::next_action;
use authkeeper_state::{Account, ConnKey, Event, Grant, Machine, Policy, Secret};
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
    let machines: Vec<Machine> = (0..n).map(|i| connected(i, now - TimeDelta::seconds((i % 3600) as i64))).collect();
    println!("  made      {n} machines in {:.1} s", t.elapsed().as_secs_f64());

    let planner = RefreshPlanner::new(rate);
    let t = Instant::now();
    let (mut refreshes, mut late, mut per_second) = (0usize, 0usize, HashMap::<i64, u32>::new());
    let (mut first, mut last) = (None, None);
    for m in &machines {
        let Some(next) = next_action(m, &policy) else { continue };
        with_refresh_slot(m, next, &planner, &policy, now);
        // The refresh's slot, whatever comes first: asked again, the planner answers the same.
        let want = authkeeper_state::schedule::refresh_at(m, &policy).expect("refreshable");
        let slot = planner.plan(&m.key().to_string(), want, now);
        let expires = m.connection().grant.as_ref().and_then(|g| g.expires_at).expect("expires");
        refreshes += 1;
        late += usize::from(slot >= expires || slot < now);
        *per_second.entry(slot.timestamp()).or_default() += 1;
        first = first.min(Some(slot)).or(Some(slot));
        last = last.max(Some(slot));
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    println!("  planned   {refreshes} refreshes in {:.1} s", t.elapsed().as_secs_f64());
    if let (Some(first), Some(last)) = (first, last) {
        println!(
            "  span      from {:.1} h to {:.1} h from now ({:.1} h), tokens expire {:.1}–{:.1} h from now",
            (first - now).num_seconds() as f64 / 3600.0,
            (last - now).num_seconds() as f64 / 3600.0,
            (last - first).num_seconds() as f64 / 3600.0,
            (TimeDelta::days(7) - TimeDelta::hours(1)).num_hours(),
            TimeDelta::days(7).num_hours()
        );
    }
    println!("  rate      at most {busiest} refreshes in any second (limit {rate})");
    println!("  expiring  {late} planned at or after their token's expiry (target 0)");
    anyhow::ensure!(late == 0 && f64::from(busiest) <= rate.ceil(), "the plan breaks the rate or lets tokens expire");
    Ok(())
}

/// Connected connection `i`, its week-long token issued (and validated) at `issued`.
fn connected(i: usize, issued: chrono::DateTime<Utc>) -> Machine {
    let grant = Grant {
        refresh_token: Some(Secret::new(format!("refresh-{i:08}"))),
        expires_at: Some(issued + TimeDelta::days(7)),
        ..Grant::bearer(format!("access-{i:08}"), issued)
    };
    let policy = Policy::default();
    let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), issued);
    m.handle(&Event::CredentialsSupplied { grant }, issued, policy, 0.0);
    m.handle(
        &Event::Validated { account: Account { name: format!("user{i}"), id: None }, grant: None },
        issued,
        policy,
        0.0,
    );
    m
}
