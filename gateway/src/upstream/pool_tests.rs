#![allow(clippy::unwrap_used)]
//! The pool's rules under a simulated clock.
use super::*;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("worker-{i}")).collect()
}

fn pool(n: usize) -> (Pool, Instant) {
    (
        Pool::new(PoolConfig::default(), names(n), 7),
        Instant::now(),
    )
}

fn succeed(pool: &mut Pool, now: Instant, id: EndpointId, latency_ms: u64) {
    // Record an answer from `id` as if a request had gone there.
    let decay = pool.config.decay;
    pool.endpoints[id]
        .ewma
        .observe(now, Duration::from_millis(latency_ms), decay);
}

#[test]
fn p2c_sends_most_traffic_to_the_faster_endpoint() {
    // One fast endpoint among four: it wins every pair it is drawn in (half
    // of them), where a uniform choice would give it a quarter.
    let (mut p, mut now) = pool(4);
    succeed(&mut p, now, 0, 1);
    for id in 1..4 {
        succeed(&mut p, now, id, 20);
    }
    let mut counts = [0u32; 4];
    for _ in 0..3000 {
        now += Duration::from_millis(1);
        let t = p.start(now).unwrap();
        counts[t.endpoint()] += 1;
        let latency = if t.endpoint() == 0 { 1 } else { 20 };
        p.finish(
            t,
            now,
            Outcome::Success {
                latency: Duration::from_millis(latency),
            },
        );
    }
    assert!(counts[0] > 1300, "{counts:?}");
    assert!(
        counts[1..].iter().all(|&c| c > 200),
        "slow ones still get some: {counts:?}"
    );
}

#[test]
fn requests_in_flight_raise_the_cost() {
    let (mut p, now) = pool(2);
    // Both equally fast; every request started and held lands on the
    // endpoint with fewer in flight, so the load stays even.
    let held: Vec<Ticket> = (0..10).map(|_| p.start(now).unwrap()).collect();
    assert_eq!((p.in_flight(0), p.in_flight(1)), (5, 5));
    // Finishing endpoint 1's requests sends the next ones there.
    let (on_one, on_zero): (Vec<Ticket>, Vec<Ticket>) =
        held.into_iter().partition(|t| t.endpoint() == 1);
    for t in on_one {
        p.finish(t, now, Outcome::Abandoned);
    }
    let next: Vec<Ticket> = (0..4).map(|_| p.start(now).unwrap()).collect();
    assert!(next.iter().all(|t| t.endpoint() == 1));
    for t in next.into_iter().chain(on_zero) {
        p.finish(t, now, Outcome::Abandoned);
    }
    assert_eq!((p.in_flight(0), p.in_flight(1)), (0, 0));
}

#[test]
fn peak_ewma_jumps_up_at_once_and_decays_down_with_time() {
    let (mut p, mut now) = pool(1);
    succeed(&mut p, now, 0, 10);
    assert_eq!(p.expected_latency(now), Some(Duration::from_millis(10)));
    now += Duration::from_millis(1);
    succeed(&mut p, now, 0, 50);
    assert_eq!(p.expected_latency(now), Some(Duration::from_millis(50)));
    // A fast answer one decay constant later moves it about 63% of the way.
    now += Duration::from_secs(10);
    succeed(&mut p, now, 0, 10);
    let ms = p.expected_latency(now).unwrap().as_secs_f64() * 1e3;
    assert!(
        (ms - (50.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp()))).abs() < 0.01,
        "{ms}"
    );
}

fn answer_on(p: &mut Pool, now: Instant, id: EndpointId) {
    let t = p.start_excluding(now, None).unwrap();
    assert_eq!(t.endpoint(), id, "single-endpoint pool expected");
    p.finish(
        t,
        now,
        Outcome::Success {
            latency: Duration::from_millis(1),
        },
    );
}

fn fail_on(p: &mut Pool, now: Instant, id: EndpointId) {
    let t = p.start_excluding(now, None).unwrap();
    assert_eq!(t.endpoint(), id, "single-endpoint pool expected");
    p.finish(t, now, Outcome::Failure);
}

#[test]
fn consecutive_failures_eject_and_a_success_resets_the_count() {
    let (mut p, now) = pool(1);
    fail_on(&mut p, now, 0);
    fail_on(&mut p, now, 0);
    answer_on(&mut p, now, 0);
    fail_on(&mut p, now, 0);
    fail_on(&mut p, now, 0);
    assert_eq!(p.health(0, now), Some(Health::Healthy));
    fail_on(&mut p, now, 0);
    assert!(matches!(
        p.health(0, now),
        Some(Health::Ejected { ejections: 1, .. })
    ));
    assert!(
        p.start(now).is_none(),
        "an ejected endpoint takes no request"
    );
}

#[test]
fn ejection_backs_off_exponentially_with_probation_between() {
    let (mut p, mut now) = pool(1);
    for _ in 0..3 {
        fail_on(&mut p, now, 0);
    }
    // First ejection: 1 s.
    now += Duration::from_millis(999);
    assert!(p.start(now).is_none());
    now += Duration::from_millis(1);
    assert!(matches!(
        p.health(0, now),
        Some(Health::Probation { probing: false, .. })
    ));
    // Probation: one request at a time.
    let probe = p.start(now).unwrap();
    assert!(p.start(now).is_none(), "a second request during probation");
    p.finish(probe, now, Outcome::Failure);
    // Failed probation: ejected for 2 s.
    match p.health(0, now) {
        Some(Health::Ejected { until, ejections }) => {
            assert_eq!(until - now, Duration::from_secs(2));
            assert_eq!(ejections, 2);
        }
        other => panic!("{other:?}"),
    }
    now += Duration::from_secs(2);
    let probe = p.start(now).unwrap();
    p.finish(
        probe,
        now,
        Outcome::Success {
            latency: Duration::from_millis(1),
        },
    );
    assert_eq!(p.health(0, now), Some(Health::Healthy));
}

#[test]
fn back_off_is_capped() {
    let config = PoolConfig {
        eject_after: 1,
        max_ejection: Duration::from_secs(5),
        ..PoolConfig::default()
    };
    let mut p = Pool::new(config, names(1), 1);
    let mut now = Instant::now();
    for _ in 0..10 {
        let t = p.start(now).unwrap();
        p.finish(t, now, Outcome::Failure);
        match p.health(0, now) {
            Some(Health::Ejected { until, .. }) => {
                assert!(until - now <= Duration::from_secs(5));
                now = until;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn active_probes_eject_and_restore() {
    let (mut p, mut now) = pool(2);
    for _ in 0..3 {
        p.probe(1, now, false);
    }
    assert!(matches!(p.health(1, now), Some(Health::Ejected { .. })));
    for _ in 0..20 {
        let t = p.start(now).unwrap();
        assert_eq!(t.endpoint(), 0);
        p.finish(t, now, Outcome::Abandoned);
    }
    // A ready probe during the back-off does not cut it short.
    p.probe(1, now, true);
    assert!(matches!(p.health(1, now), Some(Health::Ejected { .. })));
    now += Duration::from_secs(1);
    p.probe(1, now, true);
    assert_eq!(p.health(1, now), Some(Health::Healthy));
    assert_eq!(p.available(now), 2);
}

#[test]
fn the_retry_budget_allows_a_floor_then_a_share_of_requests() {
    let config = PoolConfig {
        retry_ratio: 0.5,
        retry_min_per_sec: 0.2,
        retry_window: Duration::from_secs(10),
        ..PoolConfig::default()
    };
    let mut p = Pool::new(config, names(1), 3);
    let now = Instant::now();
    // Floor: 0.2/s over 10 s = 2 retries with no traffic.
    assert!(p.try_retry(now));
    assert!(p.try_retry(now));
    assert!(!p.try_retry(now));
    // Ten requests buy five more.
    for _ in 0..10 {
        let t = p.start(now).unwrap();
        p.finish(t, now, Outcome::Abandoned);
    }
    let granted = (0..10).filter(|_| p.try_retry(now)).count();
    assert_eq!(granted, 5);
    // After the window, the budget starts over.
    let later = now + Duration::from_secs(11);
    assert!(p.try_retry(later));
}

#[test]
fn set_endpoints_keeps_the_state_of_those_that_stay() {
    let (mut p, now) = pool(2);
    for _ in 0..3 {
        p.probe(0, now, false);
    }
    let stale = p.start(now).unwrap();
    p.set_endpoints(vec!["worker-9".into(), "worker-0".into()]);
    assert_eq!(p.len(), 2);
    assert_eq!(p.name(1), Some("worker-0"));
    assert!(matches!(p.health(1, now), Some(Health::Ejected { .. })));
    assert_eq!(p.health(0, now), Some(Health::Healthy));
    // A ticket from before the change is ignored, not misattributed.
    p.finish(stale, now, Outcome::Failure);
    assert_eq!(p.health(0, now), Some(Health::Healthy));
}

#[test]
fn an_empty_pool_gives_no_endpoint() {
    let (mut p, now) = pool(0);
    assert!(p.is_empty());
    assert!(p.start(now).is_none());
    assert_eq!(p.expected_latency(now), None);
}

#[test]
fn an_endpoint_slow_once_is_tried_again_after_a_quiet_while() {
    let (mut p, mut now) = pool(2);
    succeed(&mut p, now, 0, 300);
    succeed(&mut p, now, 1, 3);
    // Right after its slow answer, endpoint 0 loses every choice.
    for _ in 0..50 {
        let t = p.start(now).unwrap();
        assert_eq!(t.endpoint(), 1);
        p.finish(t, now, Outcome::Abandoned);
    }
    // Its estimate decays while it gets nothing; endpoint 1's answers keep
    // its own fresh. After enough decay constants endpoint 0 wins a choice,
    // and its real answer (fast now) keeps it in the rotation.
    let mut tried = false;
    for _ in 0..100 {
        now += Duration::from_secs(1);
        let t = p.start(now).unwrap();
        let id = t.endpoint();
        p.finish(
            t,
            now,
            Outcome::Success {
                latency: Duration::from_millis(3),
            },
        );
        if id == 0 {
            tried = true;
            break;
        }
    }
    assert!(tried, "the once-slow endpoint never got traffic again");
}
