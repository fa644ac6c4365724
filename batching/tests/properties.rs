//! Property test of the scheduler's bookkeeping: random arrivals (priority,
//! deadline, cost, some invalid), cancellations, clock steps, polls and
//! completions on a simulated device. Every admitted request must end exactly
//! once (dispatched, ended, or handed back by shutdown); rejected ones never
//! appear; batches never break the budget and keep deadline order; lanes
//! never exceed capacity; with and without length grouping.
// Scheduler state lives in loom types under `--cfg loom`; only tests/loom.rs
// runs there.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use quiver_batching::{
    CancelToken, Cost, LatencyModel, LengthGrouping, Poll, Request, Scheduler, SchedulerConfig,
};

#[derive(Clone, Debug)]
enum Op {
    Admit {
        priority: u8,
        rows: u32,
        tokens: u32,
        deadline_us: u64,
    },
    Cancel(usize),
    Step(u64),
    Poll,
    Complete(usize),
    Drain,
    /// Tries an inline one-row batch, finished at once.
    Inline,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u32..6, 0u32..40, 0u64..20_000).prop_map(|(priority, rows, tokens, deadline_us)| Op::Admit {
            priority,
            rows,
            tokens,
            deadline_us
        }),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (0u64..3_000).prop_map(Op::Step),
        3 => Just(Op::Poll),
        2 => any::<usize>().prop_map(Op::Complete),
        1 => Just(Op::Drain),
        1 => Just(Op::Inline),
    ]
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Fate {
    #[default]
    Queued,
    Dispatched,
    Ended,
    ShutDown,
}

struct Harness {
    clock: Clock,
    now_us: u64,
    config: SchedulerConfig,
    s: Scheduler<u64>,
    fates: HashMap<u64, Fate>,
    tokens: Vec<CancelToken>,
    in_flight: Vec<(u64, u32, u32)>,
    next_id: u64,
    inlined: u64,
}

impl Harness {
    fn settle(&mut self, id: u64, fate: Fate) {
        let slot = self.fates.get_mut(&id);
        assert!(slot.is_some(), "request {id} was never admitted");
        let slot = slot.unwrap();
        assert_eq!(*slot, Fate::Queued, "request {id} ended twice");
        *slot = fate;
    }

    fn drain(&mut self) {
        let ended: Vec<u64> = self.s.drain_ended().map(|e| e.request().id).collect();
        for id in ended {
            self.settle(id, Fate::Ended);
        }
    }

    fn check_batch(&self, rows: u32, padded: u32, requests: &[Request<u64>]) {
        let sum: u32 = requests.iter().map(|r| r.cost.rows).sum();
        let longest = requests.iter().map(|r| r.cost.tokens).max().unwrap();
        assert!(!requests.is_empty());
        assert_eq!(rows, sum);
        assert_eq!(padded, sum * longest);
        assert!(rows <= self.config.max_batch_size, "rows {rows}");
        assert!(padded <= self.config.max_batch_tokens, "padded {padded}");
        assert!(requests.windows(2).all(|w| w[0].priority == w[1].priority));
        assert!(requests.windows(2).all(|w| w[0].deadline <= w[1].deadline));
        // Cancellation happens between polls here, so none may slip through.
        assert!(
            requests.iter().all(|r| !r.cancel.is_cancelled()),
            "cancelled request dispatched"
        );
    }

    fn apply(&mut self, op: Op) {
        let now = self.clock.us(self.now_us);
        match op {
            Op::Admit {
                priority,
                rows,
                tokens,
                deadline_us,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let cancel = CancelToken::new();
                let req = Request {
                    id,
                    priority,
                    arrival: now,
                    deadline: now + Duration::from_micros(deadline_us),
                    cost: Cost { rows, tokens },
                    cancel: cancel.clone(),
                    payload: id,
                };
                // Registered first so that `settle` can tell admitted ones.
                self.fates.insert(id, Fate::Queued);
                match self.s.admission().admit(req) {
                    Ok(()) => self.tokens.push(cancel),
                    Err(rejected) => {
                        assert_eq!(rejected.request.id, id);
                        self.fates.remove(&id);
                    }
                }
            }
            Op::Cancel(i) => {
                if !self.tokens.is_empty() {
                    self.tokens[i % self.tokens.len()].cancel();
                }
            }
            Op::Step(us) => self.now_us += us,
            Op::Poll => loop {
                match self.s.poll(now) {
                    Poll::Dispatch(batch) => {
                        self.check_batch(batch.rows, batch.padded_tokens, &batch.requests);
                        assert!(self.in_flight.len() < self.config.max_in_flight as usize);
                        for r in &batch.requests {
                            assert!(r.deadline >= now, "dispatched past its deadline");
                            self.settle(r.id, Fate::Dispatched);
                        }
                        self.in_flight
                            .push((batch.id, batch.rows, batch.padded_tokens));
                    }
                    Poll::WaitUntil(t) => {
                        assert!(t > now);
                        break;
                    }
                    Poll::Idle => break,
                }
            },
            Op::Complete(i) => {
                if self.in_flight.is_empty() {
                    // Unknown ids are ignored.
                    self.s.complete(now, u64::MAX, Duration::from_micros(1));
                } else {
                    let (id, rows, padded) = self.in_flight.remove(i % self.in_flight.len());
                    self.s.complete(now, id, device_time(rows, padded));
                }
            }
            Op::Drain => self.drain(),
            Op::Inline => {
                let admission = self.s.admission();
                let cost = Cost { rows: 1, tokens: 1 };
                if let Some(lease) =
                    admission.try_inline(now, cost, now + Duration::from_millis(10))
                {
                    // Only an idle device with nothing admitted and not
                    // handed back is lent.
                    assert!(self.in_flight.is_empty(), "lent with a batch in flight");
                    assert!(
                        self.fates.values().all(|f| *f != Fate::Queued),
                        "lent with a request queued"
                    );
                    self.inlined += 1;
                    lease.finish(device_time(1, 1));
                }
            }
        }
        let queued = self.s.admission().stats().queued;
        let bound = self.config.queue_capacity as u64 * u64::from(self.config.priority_levels);
        assert!(queued <= bound, "queued {queued} > {bound}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_admitted_request_ends_exactly_once(
        ops in proptest::collection::vec(op(), 1..200),
        max_in_flight in 1u32..4,
        capacity in 1usize..6,
        calibrated_model in any::<bool>(),
        grouping in any::<bool>(),
    ) {
        let config = SchedulerConfig {
            max_batch_size: 8,
            max_batch_tokens: 96,
            max_queue_delay: Duration::from_millis(1),
            queue_capacity: capacity,
            priority_levels: 2,
            max_in_flight,
            inline_below: Duration::from_micros(300),
            idle_spin: Duration::ZERO,
            length_grouping: grouping.then(LengthGrouping::default),
        };
        let model = if calibrated_model { calibrated() } else { LatencyModel::new() };
        let clock = Clock::new();
        let mut h = Harness {
            clock,
            now_us: 0,
            config: config.clone(),
            s: Scheduler::new(config, model),
            fates: HashMap::new(),
            tokens: Vec::new(),
            in_flight: Vec::new(),
            next_id: 0,
            inlined: 0,
        };
        for op in ops {
            h.apply(op);
        }
        let back: Vec<u64> = h.s.shutdown().into_iter().map(|r| r.id).collect();
        for id in back {
            h.settle(id, Fate::ShutDown);
        }
        h.drain();
        let stats = h.s.stats();
        let admission = h.s.admission().stats();
        prop_assert!(h.fates.values().all(|f| *f != Fate::Queued), "some request never ended");
        prop_assert_eq!(admission.admitted, h.fates.len() as u64);
        prop_assert_eq!(admission.queued, 0);
        prop_assert_eq!(stats.queued, 0);
        let ended = h.fates.values().filter(|f| **f == Fate::Ended).count() as u64;
        prop_assert_eq!(stats.cancelled + stats.deadline_unreachable, ended);
        let dispatched = h.fates.values().filter(|f| **f == Fate::Dispatched).count() as u64;
        prop_assert_eq!(stats.dispatched_requests, dispatched);
        prop_assert_eq!(stats.batches_for(quiver_batching::DispatchReason::Inline), h.inlined);
    }
}
