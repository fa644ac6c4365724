//! The `trees` forest on random forests made here (no model files): the SIMD walks against
//! the scalar reference bit for bit (always), and the CUDA kernel `kernels/cuda/trees.cu`
//! against the same reference (with the `cuda` feature on a machine with a GPU; elsewhere
//! that test prints `skipped: no CUDA device (...)`). On a GPU it also prints the kernel's
//! time for 1, 64 and 4096 rows (information for `scripts/gpu-check`, not an assertion).
#![allow(clippy::unwrap_used)]

use quiver_kernels::Device;
use quiver_kernels::cpu::Isa;
use quiver_kernels::trees::TreeModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FEATURES: usize = 20;

/// Thresholds and row values come from this small set, so ties (value == threshold) are
/// common and both sides of every split rule are taken.
fn value(rng: &mut ChaCha8Rng) -> f32 {
    match rng.random_range(0..20) {
        0 => f32::NAN,
        1 => 0.0,
        2 => 1e-36,
        _ => f32::from(rng.random_range(-8i8..8)) / 4.0,
    }
}

/// An XGBoost JSON binary:logistic model of `trees` full trees of `depth`.
fn xgboost_model(rng: &mut ChaCha8Rng, trees: usize, depth: u32) -> String {
    let splits = (1usize << depth) - 1;
    let nodes = 2 * splits + 1;
    let tree = |rng: &mut ChaCha8Rng| {
        let mut cols: [Vec<String>; 5] = Default::default();
        for i in 0..nodes {
            let split = i < splits;
            let cond = if split {
                f32::from(rng.random_range(-8i8..8)) / 4.0
            } else {
                rng.random_range(-0.5f32..0.5)
            };
            let (l, r) = if split {
                (2 * i as i64 + 1, 2 * i as i64 + 2)
            } else {
                (-1, -1)
            };
            cols[0].push(l.to_string());
            cols[1].push(r.to_string());
            cols[2].push(rng.random_range(0..FEATURES).to_string());
            cols[3].push(cond.to_string());
            cols[4].push(u8::from(rng.random_bool(0.5)).to_string());
        }
        format!(
            r#"{{"left_children":[{}],"right_children":[{}],"split_indices":[{}],"split_conditions":[{}],"default_left":[{}],"split_type":[{}]}}"#,
            cols[0].join(","),
            cols[1].join(","),
            cols[2].join(","),
            cols[3].join(","),
            cols[4].join(","),
            vec!["0"; nodes].join(",")
        )
    };
    let trees_json: Vec<String> = (0..trees).map(|_| tree(rng)).collect();
    format!(
        r#"{{"learner":{{"objective":{{"name":"binary:logistic"}},"learner_model_param":{{"base_score":"3E-1","num_class":"0","num_feature":"{FEATURES}","num_target":"1"}},"gradient_booster":{{"name":"gbtree","model":{{"tree_info":[{}],"trees":[{}]}}}}}}}}"#,
        vec!["0"; trees].join(","),
        trees_json.join(",")
    )
}

/// A LightGBM text multiclass model (`classes` trees per iteration) of full trees of
/// `depth`, every missing type and default direction drawn at random.
fn lightgbm_model(rng: &mut ChaCha8Rng, iterations: usize, classes: usize, depth: u32) -> String {
    let mut s = format!(
        "tree\nversion=v4\nnum_class={classes}\nnum_tree_per_iteration={classes}\n\
         label_index=0\nmax_feature_idx={}\nobjective=multiclass num_class:{classes}\n\n",
        FEATURES - 1
    );
    let leaves = 1usize << depth;
    let splits = leaves - 1;
    let child = |c: usize| {
        if c < splits {
            c as i64
        } else {
            -((c - splits) as i64) - 1
        }
    };
    for t in 0..iterations * classes {
        let list = |v: Vec<String>| v.join(" ");
        let feature = list(
            (0..splits)
                .map(|_| rng.random_range(0..FEATURES).to_string())
                .collect(),
        );
        let threshold = list(
            (0..splits)
                .map(|_| (f64::from(rng.random_range(-8i8..8)) / 4.0).to_string())
                .collect(),
        );
        let decision = list(
            (0..splits)
                .map(|_| [0u8, 2, 4, 6, 8, 10][rng.random_range(0..6)].to_string())
                .collect(),
        );
        let left = list((0..splits).map(|i| child(2 * i + 1).to_string()).collect());
        let right = list((0..splits).map(|i| child(2 * i + 2).to_string()).collect());
        let values = list(
            (0..leaves)
                .map(|_| rng.random_range(-0.3f64..0.3).to_string())
                .collect(),
        );
        s.push_str(&format!(
            "Tree={t}\nnum_leaves={leaves}\nnum_cat=0\nsplit_feature={feature}\n\
             threshold={threshold}\ndecision_type={decision}\nleft_child={left}\n\
             right_child={right}\nleaf_value={values}\nis_linear=0\nshrinkage=1\n\n"
        ));
    }
    s.push_str("end of trees\n");
    s
}

fn rows(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n * FEATURES).map(|_| value(rng)).collect()
}

fn models() -> Vec<(&'static str, TreeModel)> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let xgb = xgboost_model(&mut rng, 120, 6);
    let lgb = lightgbm_model(&mut rng, 30, 3, 5);
    vec![
        (
            "xgboost",
            TreeModel::from_bytes(xgb.as_bytes(), true, Device::Cpu).unwrap(),
        ),
        (
            "lightgbm",
            TreeModel::from_bytes(lgb.as_bytes(), true, Device::Cpu).unwrap(),
        ),
    ]
}

#[test]
fn random_forests_agree_bit_for_bit_on_every_instruction_set() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = rows(&mut rng, 700);
    for (name, model) in models() {
        let forest = model.forest();
        for n in [1, 5, 16, 33, 64, 129, 700] {
            let x = &x[..n * FEATURES];
            let mut reference = vec![0.0; n * forest.groups()];
            forest.margins_scalar(x, &mut reference);
            for isa in Isa::available() {
                let mut got = vec![0.0; reference.len()];
                forest.margins(isa, x, &mut got);
                let same = got
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} on {isa:?} with {n} rows");
            }
        }
    }
}

/// GPU test: the CUDA forest kernel against the CPU reference. Without the `cuda` feature or
/// without a GPU it prints `skipped: no CUDA device (...)` and passes.
#[test]
fn gpu_forest_matches_cpu_reference_or_skips_without_cuda_device() {
    let gpu = match Device::Cuda(0).to_candle() {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: no CUDA device ({why})");
            return;
        }
    };
    #[cfg(feature = "cuda")]
    on_gpu(&gpu);
    #[cfg(not(feature = "cuda"))]
    unreachable!("cuda:0 opened without the cuda feature: {gpu:?}");
}

#[cfg(feature = "cuda")]
fn on_gpu(gpu: &candle_core::Device) {
    use quiver_kernels::trees::cuda::CudaForest;
    use std::time::Instant;

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = rows(&mut rng, 4096);
    for (name, model) in models() {
        let forest = model.forest();
        let on_device = CudaForest::upload(forest, gpu).unwrap();
        for n in [1, 3, 64, 4096] {
            let x = &x[..n * FEATURES];
            let mut reference = vec![0.0; n * forest.groups()];
            forest.margins_scalar(x, &mut reference);
            let got = on_device.margins(x).unwrap();
            assert_eq!(got.len(), reference.len());
            // The walks are the CPU's; only the summation order differs (and, for XGBoost,
            // f32 against f64 sums).
            let diff = got
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff <= 1e-5, "{name}, {n} rows: max diff {diff}");
            let start = Instant::now();
            let reps = 20;
            for _ in 0..reps {
                on_device.margins(x).unwrap();
            }
            println!(
                "{name}: {n} rows on cuda:0: max diff {diff:.2e}, {:.1} µs per call (copies included)",
                start.elapsed().as_secs_f64() * 1e6 / f64::from(reps)
            );
        }
    }
}
