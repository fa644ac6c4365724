#![allow(clippy::unwrap_used)]
use std::time::Duration;

use super::*;
use crate::load::{Outcome, Served};
use crate::schedule::Schedule;

fn plan(duration_s: u64) -> StepPlan {
    StepPlan {
        load: Load::Open {
            schedule: Schedule::new(Arrival::Poisson, 100.0, 1).unwrap(),
            max_in_flight: 16,
        },
        warmup: Duration::ZERO,
        duration: Duration::from_secs(duration_s),
        deadline: Some(Duration::from_millis(100)),
        client_timeout: Duration::from_secs(30),
    }
}

/// 1000 results of 1..=1000 ms, answered within the 10 s window, plus two
/// errors.
fn recorder() -> StepRecorder {
    let mut r = StepRecorder::new(Some(Duration::from_millis(100)));
    for i in 1..=1000u64 {
        r.record(
            Duration::from_millis(i),
            Duration::ZERO,
            Duration::from_millis(i * 9),
            &Outcome::Ok(Served {
                overflow: Some(i % 10 == 0),
                batch_size: Some(if i % 2 == 0 { 4 } else { 2 }),
            }),
        );
    }
    r.record(
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(1),
        &Outcome::Err("DEADLINE_EXCEEDED".into()),
    );
    r.record(
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(1),
        &Outcome::Err("http_503".into()),
    );
    r
}

fn close(a: u64, b: u64) -> bool {
    // hdrhistogram with 3 significant digits.
    a.abs_diff(b) * 1000 <= b
}

#[test]
fn percentiles_rates_and_goodput_follow_their_definitions() {
    let s = StepReport::new("quic://x", 0, &plan(10), &recorder());
    assert_eq!((s.sent, s.ok, s.good), (1002, 1000, 100));
    assert!(close(s.p50_us.unwrap(), 500_000), "{:?}", s.p50_us);
    assert!(close(s.p90_us.unwrap(), 900_000));
    assert!(close(s.p99_us.unwrap(), 990_000));
    assert!(close(s.p999_us.unwrap(), 999_000));
    assert!(close(s.max_us.unwrap(), 1_000_000));
    // The window is 10 s and every answer came within it.
    assert!((s.offered_rps - 100.2).abs() < 1e-9);
    assert!((s.achieved_rps - 100.0).abs() < 1e-9);
    assert!((s.goodput_rps - 10.0).abs() < 1e-9);
    assert!((s.overflow_share.unwrap() - 0.1).abs() < 1e-9);
    assert!((s.batch_size_mean.unwrap() - 3.0).abs() < 1e-9);
    assert_eq!(s.errors.len(), 2);
}

#[test]
fn a_backlog_past_the_window_stretches_the_elapsed_time() {
    // The last answer comes 9 s into a 5 s window.
    let s = StepReport::new("quic://x", 0, &plan(5), &recorder());
    assert!((s.elapsed_s - 9.0).abs() < 1e-9);
    assert!((s.achieved_rps - 1000.0 / 9.0).abs() < 1e-9);
    assert!((s.offered_rps - 1002.0 / 5.0).abs() < 1e-9);
}

#[test]
fn a_step_with_only_errors_has_no_percentiles() {
    let mut r = StepRecorder::new(None);
    r.record(
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        &Outcome::Err("connect".into()),
    );
    let s = StepReport::new("h2c://x", 0, &plan(1), &r);
    assert_eq!((s.p50_us, s.max_us, s.achieved_rps), (None, None, 0.0));
    let row = csv(&[s]);
    assert!(row.lines().nth(1).unwrap().contains("connect=1"));
}

#[test]
fn ratios_divide_the_compared_target_by_the_base() {
    let a = StepReport::new("quic://a", 0, &plan(10), &recorder());
    let mut b = a.clone();
    b.target = "h2c://b".into();
    b.achieved_rps = a.achieved_rps / 2.0;
    b.p99_us = a.p99_us.map(|p| p * 3);
    let r = ratios(&[a], &[b]);
    assert!((r[0].achieved.unwrap() - 0.5).abs() < 1e-9);
    assert!((r[0].p99.unwrap() - 3.0).abs() < 1e-9);
    assert!((r[0].p50.unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn report_files_hold_every_step_and_agree_with_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let steps: Vec<StepReport> = (0..3)
        .map(|i| StepReport::new("quic://x", i, &plan(10 + i as u64), &recorder()))
        .collect();
    let run = RunReport {
        tool: "quiver-bench test".into(),
        command: vec![],
        model: "identity".into(),
        steps: steps.clone(),
        ratios: vec![],
    };
    let files = write_files(dir.path(), &run).unwrap();
    assert_eq!(files.len(), 3);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(json["steps"].as_array().unwrap().len(), 3);
    assert_eq!(json["steps"][2]["sent"], 1002);
    let csv_text = std::fs::read_to_string(&files[1]).unwrap();
    let rows: Vec<&str> = csv_text.lines().collect();
    assert_eq!(rows[0], CSV_HEADER);
    assert_eq!(rows.len(), 4);
    let columns = CSV_HEADER.split(',').count();
    assert!(rows.iter().all(|r| r.split(',').count() == columns));
    let sent_col = CSV_HEADER.split(',').position(|c| c == "sent").unwrap();
    assert_eq!(rows[1].split(',').nth(sent_col), Some("1002"));
    let svg = std::fs::read_to_string(&files[2]).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("p99.9"));
    assert!(table(&steps).lines().count() == 4);
}
