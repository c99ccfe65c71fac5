//! Declared cron schedules: validated like the rest of the config, replaced on reload, and run
//! through the same queue and limits as everything else.

mod common;

use authkeeper::wire::WireEvent;
use authkeeper_state::{Cause, StateName};
use common::*;
use serde_json::{Value, json};

fn write_config(h: &Harness, schedules: Value) {
    let config = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"},
        "authkeeper": {"base_url": {"trakt": h.emulator.url()}, "schedules": schedules},
    });
    // Written whole and renamed into place: the watcher never sees a half-written file.
    let tmp = h.config_path().with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::rename(&tmp, h.config_path()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cron_expression_is_refused_and_the_previous_schedule_stays() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    write_config(&h, json!({"validate_all": "0 0 4 * * *"}));
    let daemon = h.start_daemon().await;
    let client = h.client();
    let health: Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["schedules"]["validate_all"], "0 0 4 * * *");

    let mut events = client.events().await.unwrap();
    write_config(&h, json!({"validate_all": "0 0 4 * *"})); // five fields: no seconds
    let error = tokio::time::timeout(PATIENCE, async {
        loop {
            if let WireEvent::ConfigError { error, .. } = events.next().await.unwrap().unwrap() {
                return error;
            }
        }
    })
    .await
    .unwrap();
    assert!(error.contains("validate_all") && error.contains("cron"), "{error}");
    let health: Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["schedules"]["validate_all"], "0 0 4 * * *", "the previous schedule is in force");
    assert_eq!(health["config"]["ok"], false);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_all_sweeps_connected_connections_and_compact_history_runs() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    write_config(&h, json!({}));
    let daemon = h.start_daemon().await;
    let mut events = connect_approved(&h).await;

    // Every second, from now on: the sweep validates the connected connection.
    write_config(&h, json!({"validate_all": "* * * * * *", "compact_history": "* * * * * *"}));
    let (mut swept, mut validated, mut compacted) = (false, false, false);
    tokio::time::timeout(PATIENCE, async {
        while !(swept && validated && compacted) {
            match events.next().await.unwrap().unwrap() {
                WireEvent::ScheduleRan { schedule, detail, .. } if schedule == "validate_all" => {
                    assert!(detail.contains("1 connections"), "{detail}");
                    swept = true;
                }
                WireEvent::ScheduleRan { schedule, detail, .. } if schedule == "compact_history" => {
                    assert!(detail.contains("history rows"), "{detail}");
                    compacted = true;
                }
                WireEvent::Transition { cause: Cause::Validated, from, to, .. } if swept => {
                    assert_eq!((from, to), (StateName::Connected, StateName::Connected));
                    validated = true;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("both schedules ran and the sweep validated");
    daemon.stop().await;
}
