#![allow(clippy::unwrap_used)]
use super::*;
use crate::schedule::Arrival;

/// Answers at once, except request `stall_index`, which takes `stall`; every
/// `error_every`-th request fails.
struct Fake {
    stall_index: Option<u64>,
    stall: Duration,
    error_every: Option<u64>,
}

impl Infer for Fake {
    fn infer(&self, index: u64) -> impl Future<Output = Outcome> + Send {
        let stall = (self.stall_index == Some(index)).then_some(self.stall);
        let fail = self.error_every.is_some_and(|n| index.is_multiple_of(n));
        async move {
            if let Some(d) = stall {
                tokio::time::sleep(d).await;
            }
            if fail {
                Outcome::Err("RESOURCE_EXHAUSTED".into())
            } else {
                Outcome::Ok(Served {
                    overflow: Some(index.is_multiple_of(4)),
                    batch_size: Some(2),
                })
            }
        }
    }
}

fn open(rate: f64, warmup_ms: u64, duration_ms: u64, max_in_flight: u32) -> StepPlan {
    StepPlan {
        load: Load::Open {
            schedule: Schedule::new(Arrival::Constant, rate, 1).unwrap(),
            max_in_flight,
        },
        warmup: Duration::from_millis(warmup_ms),
        duration: Duration::from_millis(duration_ms),
        deadline: None,
        client_timeout: Duration::from_secs(30),
    }
}

#[test]
fn recorder_counts_goodput_overflow_and_batch_sizes() {
    let mut r = StepRecorder::new(Some(Duration::from_millis(10)));
    let ok = |overflow| {
        Outcome::Ok(Served {
            overflow: Some(overflow),
            batch_size: Some(4),
        })
    };
    let ms = Duration::from_millis;
    r.record(ms(5), Duration::ZERO, ms(100), &ok(false));
    r.record(ms(10), Duration::ZERO, ms(300), &ok(true));
    r.record(ms(11), Duration::ZERO, ms(200), &ok(false));
    r.record(
        ms(1),
        Duration::ZERO,
        ms(50),
        &Outcome::Err("http_429".into()),
    );
    assert_eq!(
        (r.sent, r.ok, r.good),
        (4, 3, 2),
        "the deadline is inclusive"
    );
    assert_eq!(r.errors.get("http_429"), Some(&1));
    assert_eq!((r.path_known, r.overflow), (3, 1));
    assert_eq!(r.batch_sizes.get(&4), Some(&3));
    assert_eq!(r.last_answer, ms(300));
    assert_eq!(r.latency_us.len(), 3, "errors have no latency");
}

#[test]
fn latency_never_runs_backwards() {
    let t = Instant::now();
    let later = t + Duration::from_millis(3);
    assert_eq!(latency_from_intended(t, later), Duration::from_millis(3));
    assert_eq!(latency_from_intended(later, t), Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_on_every_request_meant_for_its_duration() {
    // 100/s for 100 ms: requests at 0, 10, ..., 90 ms. Request 0 stalls for
    // 300 ms and only one may be in flight, so request i cannot be sent before
    // 300 ms: measured from its intended time, its latency is at least
    // 300 - 10 i ms, although the server answers it at once.
    let target = Arc::new(Fake {
        stall_index: Some(0),
        stall: Duration::from_millis(300),
        error_every: None,
    });
    let rec = run_step(target, &open(100.0, 0, 100, 1), Arc::default()).await;
    assert_eq!((rec.sent, rec.ok), (10, 10));
    // hdrhistogram keeps 3 significant digits.
    assert!(
        rec.latency_us.min() >= 209_000,
        "smallest latency {} µs hides the stall",
        rec.latency_us.min()
    );
    assert!(rec.latency_us.max() >= 299_000);
    assert!(
        rec.send_lag_us.max() >= 209_000,
        "the client's lateness is recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_requests_are_sent_but_not_counted() {
    // 200/s: 10 arrivals in the 50 ms warm-up, 20 in the 100 ms window.
    let target = Arc::new(Fake {
        stall_index: None,
        stall: Duration::ZERO,
        error_every: None,
    });
    let progress = Arc::new(Progress::default());
    let rec = run_step(target, &open(200.0, 50, 100, 64), progress.clone()).await;
    assert_eq!(rec.sent, 20);
    assert_eq!(
        progress.answered.load(std::sync::atomic::Ordering::Relaxed),
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_agree_with_what_was_sent() {
    let target = Arc::new(Fake {
        stall_index: None,
        stall: Duration::ZERO,
        error_every: Some(3),
    });
    let plan = StepPlan {
        load: Load::Closed { concurrency: 4 },
        warmup: Duration::from_millis(20),
        duration: Duration::from_millis(100),
        deadline: None,
        client_timeout: Duration::from_secs(30),
    };
    let rec = run_step(target, &plan, Arc::default()).await;
    assert!(rec.sent > 0);
    let errors: u64 = rec.errors.values().sum();
    assert_eq!(rec.ok + errors, rec.sent);
    assert!(errors > 0 && rec.ok > 0);
    assert_eq!(rec.ok, rec.latency_us.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_client_timeout_is_counted_as_such() {
    let target = Arc::new(Fake {
        stall_index: Some(0),
        stall: Duration::from_secs(60),
        error_every: None,
    });
    let mut plan = open(100.0, 0, 30, 8);
    plan.client_timeout = Duration::from_millis(50);
    let rec = run_step(target, &plan, Arc::default()).await;
    assert_eq!(rec.sent, 3);
    assert_eq!(rec.errors.get("client_timeout"), Some(&1));
}
