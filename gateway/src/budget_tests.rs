//! The budget's accounting: whatever the order of reservations, growths and
//! drops, the level is the sum of the live reservations, never above the
//! limit, the gauge agrees, and everything is given back at the end.

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    Reserve(u64),
    Grow(usize, u64),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..400).prop_map(Op::Reserve),
        (any::<usize>(), 0u64..200).prop_map(|(i, n)| Op::Grow(i, n)),
        any::<usize>().prop_map(Op::Drop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn level_is_the_sum_of_live_reservations_and_never_passes_the_limit(
        limit in 1u64..2_000,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let gauge = Gauge::default();
        let budget = MemoryBudget::new(limit, gauge.clone());
        let mut live: Vec<Reservation> = Vec::new();
        for op in ops {
            match op {
                Op::Reserve(n) => {
                    let before = budget.held();
                    match budget.reserve(n) {
                        Ok(r) => live.push(r),
                        Err(GatewayError::MemoryBudget { need, held, limit: l }) => {
                            prop_assert_eq!(need, n);
                            prop_assert_eq!(l, limit);
                            prop_assert!(held + n > limit);
                            prop_assert_eq!(budget.held(), before);
                        }
                        Err(other) => prop_assert!(false, "unexpected {other}"),
                    }
                }
                Op::Grow(i, n) => {
                    if !live.is_empty() {
                        let i = i % live.len();
                        let fits = budget.held() + n <= limit;
                        prop_assert_eq!(live[i].grow(n).is_ok(), fits);
                    }
                }
                Op::Drop(i) => {
                    if !live.is_empty() {
                        live.swap_remove(i % live.len());
                    }
                }
            }
            let sum: u64 = live.iter().map(Reservation::bytes).sum();
            prop_assert_eq!(budget.held(), sum);
            prop_assert!(budget.held() <= limit);
            prop_assert_eq!(u64::try_from(gauge.get()).ok(), Some(sum));
        }
        drop(live);
        prop_assert_eq!(budget.held(), 0);
        prop_assert_eq!(gauge.get(), 0);
    }
}

#[test]
fn reservations_from_many_threads_balance() {
    let budget = MemoryBudget::new(1_000, Gauge::default());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..10_000u64 {
                    if let Ok(mut r) = budget.reserve(i % 7) {
                        let _ = r.grow(i % 3);
                        assert!(budget.held() <= 1_000);
                    }
                }
            });
        }
    });
    assert_eq!(budget.held(), 0);
}
