//! Times the `trees` engine on a synthetic forest, by default of the issue's size (500 trees
//! of depth 8 over 32 features, XGBoost JSON made here with a fixed seed): one row, 64 rows
//! and 4096 rows, on every instruction set this CPU has (4096 rows split over the pool).
//!
//! ```sh
//! cargo run -p quiver-kernels --example trees_latency            # 500 trees, depth 8
//! cargo run -p quiver-kernels --example trees_latency -- 100 6   # TREES DEPTH
//! ```
//!
//! quiver-kernels builds at opt-level 3 in the dev profile too, so no `--release` is needed.
//!
//! Prints the median of many calls of `TreeModel::predict` (probabilities, binary:logistic).
//! A measurement tool, not a test: nothing here asserts a time.

use std::time::{Duration, Instant};

use quiver_kernels::Device;
use quiver_kernels::cpu::Isa;
use quiver_kernels::trees::TreeModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FEATURES: usize = 32;

/// A full binary tree of `DEPTH` levels of splits, XGBoost's JSON layout (breadth first).
fn tree(rng: &mut ChaCha8Rng, depth: u32) -> String {
    let splits = (1usize << depth) - 1;
    let nodes = 2 * splits + 1;
    let (mut left, mut right, mut feature, mut cond, mut dl) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..nodes {
        if i < splits {
            left.push((2 * i + 1) as i64);
            right.push((2 * i + 2) as i64);
            feature.push(rng.random_range(0..FEATURES));
            cond.push(rng.random_range(-1.5f32..1.5));
            dl.push(u8::from(rng.random_bool(0.5)));
        } else {
            left.push(-1);
            right.push(-1);
            feature.push(0);
            cond.push(rng.random_range(-0.1f32..0.1));
            dl.push(0);
        }
    }
    let list = |v: Vec<String>| v.join(",");
    format!(
        r#"{{"left_children":[{}],"right_children":[{}],"split_indices":[{}],"split_conditions":[{}],"default_left":[{}],"split_type":[{}]}}"#,
        list(left.iter().map(ToString::to_string).collect()),
        list(right.iter().map(ToString::to_string).collect()),
        list(feature.iter().map(ToString::to_string).collect()),
        list(cond.iter().map(ToString::to_string).collect()),
        list(dl.iter().map(ToString::to_string).collect()),
        vec!["0"; nodes].join(","),
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(calls: usize, mut f: impl FnMut()) -> Duration {
    f();
    median(
        (0..calls)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let trees_n: usize = args.first().map_or(Ok(500), |a| a.parse())?;
    let depth: u32 = args.get(1).map_or(Ok(8), |a| a.parse())?;
    if !(1..=20).contains(&depth) || trees_n == 0 {
        return Err("usage: trees_latency [TREES >= 1] [DEPTH 1..=20]".into());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let trees: Vec<String> = (0..trees_n).map(|_| tree(&mut rng, depth)).collect();
    let json = format!(
        r#"{{"learner":{{"objective":{{"name":"binary:logistic"}},"learner_model_param":{{"base_score":"5E-1","num_class":"0","num_feature":"{FEATURES}","num_target":"1"}},"gradient_booster":{{"name":"gbtree","model":{{"tree_info":[{}],"trees":[{}]}}}}}}}}"#,
        vec!["0"; trees_n].join(","),
        trees.join(",")
    );
    let model = TreeModel::from_bytes(json.as_bytes(), false, Device::Cpu)?;
    let x: Vec<f32> = (0..4096 * FEATURES)
        .map(|_| {
            if rng.random_bool(0.05) {
                f32::NAN
            } else {
                rng.random_range(-2.0f32..2.0)
            }
        })
        .collect();
    println!(
        "forest: {} trees, depth {}, {} features, {} nodes; rayon threads {}",
        model.forest().trees(),
        model.forest().max_depth(),
        FEATURES,
        model.forest().nodes(),
        rayon::current_num_threads()
    );
    println!(
        "forward walks with {:?} (the fastest here, timed at load)",
        model.isa()
    );
    for isa in Isa::available() {
        for rows in [1usize, 64, 4096] {
            let x = &x[..rows * FEATURES];
            let calls = if rows == 4096 { 30 } else { 2000 };
            let t = time(calls, || {
                std::hint::black_box(model.predict(isa, x).ok());
            });
            println!(
                "{isa:?}: {rows:>5} rows: median {:>9.1} µs  ({:.3} µs/row)",
                t.as_secs_f64() * 1e6,
                t.as_secs_f64() * 1e6 / rows as f64
            );
        }
    }
    Ok(())
}
