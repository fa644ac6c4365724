//! The `trees` family against the libraries themselves: every model that
//! `scripts/train-trees` trained with PyPI's xgboost and lightgbm (each objective of each
//! library) must give the library's own `predict` (and raw scores) within 1e-5 on 10,000
//! rows with 5% NaN, on every instruction set this CPU has; the SIMD walks must agree with
//! the scalar reference bit for bit; models using what the parser does not support must be
//! refused at load time, naming it. Hand-written models pin the split semantics at the
//! edges (ties, NaN, zero-as-missing, infinities).
//!
//! The trained models come from `scripts/train-trees` (scripts/test runs it). Where they are
//! missing these tests fail and say so; they do not pass silently.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use quiver_kernels::cpu::Isa;
use quiver_kernels::trees::{Library, Objective, TreeError, TreeModel};
use quiver_kernels::{
    DataType, Device, HostTensor, InputError, LoadError, ModelSpec, TensorData, load,
};

const MAX_ABS_DIFF: f64 = 1e-5;

fn trees_dir() -> PathBuf {
    common::generated_models("trees", "tree models", "scripts/train-trees")
}

fn manifest() -> serde_json::Value {
    let bytes = std::fs::read(trees_dir().join("manifest.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn read_f64(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn max_abs_diff(ours: &[f32], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max)
}

struct Case {
    name: String,
    file: PathBuf,
    library: Library,
    classes: usize,
    pred: Vec<f64>,
    margin: Vec<f64>,
}

fn cases() -> (Vec<f32>, usize, Vec<Case>) {
    let dir = trees_dir();
    let m = manifest();
    let features = m["features"].as_u64().unwrap() as usize;
    let x = read_f32(&dir.join(m["x"].as_str().unwrap()));
    assert_eq!(x.len(), m["rows"].as_u64().unwrap() as usize * features);
    let cases = m["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_owned();
            Case {
                file: dir.join(c["file"].as_str().unwrap()),
                library: match c["library"].as_str().unwrap() {
                    "xgboost" => Library::XGBoost,
                    _ => Library::LightGbm,
                },
                classes: c["classes"].as_u64().unwrap() as usize,
                pred: read_f64(&dir.join(format!("{name}.pred.f64"))),
                margin: read_f64(&dir.join(format!("{name}.margin.f64"))),
                name,
            }
        })
        .collect();
    (x, features, cases)
}

#[test]
fn every_objective_of_both_libraries_matches_the_library() {
    let (x, features, cases) = cases();
    let objectives: Vec<String> = manifest()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["objective"].as_str().unwrap().to_owned())
        .collect();
    for want in [
        "binary:logistic",
        "reg:squarederror",
        "multi:softprob",
        "multi:softmax",
        "binary",
        "regression",
        "multiclass",
    ] {
        assert!(objectives.iter().any(|o| o == want), "no {want} model");
    }
    for case in &cases {
        let model = TreeModel::load(&case.file, false, Device::Cpu).unwrap();
        let margins = TreeModel::load(&case.file, true, Device::Cpu).unwrap();
        assert_eq!(model.library(), case.library, "{}", case.name);
        assert_eq!(model.forest().features(), features, "{}", case.name);
        assert_eq!(
            model.forest().groups(),
            case.classes.max(1),
            "{}",
            case.name
        );
        for isa in Isa::available() {
            let pred = model.predict(isa, &x).unwrap();
            let margin = margins.predict(isa, &x).unwrap();
            let dp = max_abs_diff(&pred, &case.pred);
            let dm = max_abs_diff(&margin, &case.margin);
            println!(
                "{:<22} {isa:?}: {} trees, max |ours - library| predict {dp:.2e}, margin {dm:.2e}",
                case.name,
                model.forest().trees()
            );
            assert!(
                dp <= MAX_ABS_DIFF,
                "{} on {isa:?}: predict off by {dp}",
                case.name
            );
            assert!(
                dm <= MAX_ABS_DIFF,
                "{} on {isa:?}: margin off by {dm}",
                case.name
            );
        }
    }
}

#[test]
fn xgboost_softmax_probabilities_argmax_to_its_predicted_classes() {
    let (x, _, cases) = cases();
    let case = cases.iter().find(|c| c.name == "xgb_softmax").unwrap();
    let classes = read_f64(&trees_dir().join("xgb_softmax.class.f64"));
    let model = TreeModel::load(&case.file, false, Device::Cpu).unwrap();
    assert_eq!(model.objective(), Objective::Softmax);
    let probs = model.predict(Isa::detect(), &x).unwrap();
    let mut disagree = 0;
    for (row, &class) in probs.chunks_exact(case.classes).zip(&classes) {
        let argmax = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |best, (i, &p)| if p > best.1 { (i, p) } else { best },
            )
            .0;
        disagree += usize::from(argmax as f64 != class);
    }
    assert_eq!(disagree, 0, "rows whose argmax is not XGBoost's class");
}

#[test]
fn simd_walks_match_the_scalar_reference_bit_for_bit() {
    let (x, features, cases) = cases();
    let isas = Isa::available();
    println!("instruction sets here: {isas:?}");
    for case in &cases {
        let model = TreeModel::load(&case.file, true, Device::Cpu).unwrap();
        let forest = model.forest();
        // One row (trees side by side), tails of every width, whole blocks, the parallel path.
        for rows in [1, 2, 7, 8, 15, 16, 17, 63, 64, 65, 300, 1000] {
            let x = &x[..rows * features];
            let mut reference = vec![0.0; rows * forest.groups()];
            forest.margins_scalar(x, &mut reference);
            for &isa in &isas {
                let mut here = vec![0.0; reference.len()];
                forest.margins_here(isa, x, &mut here);
                let mut pooled = vec![0.0; reference.len()];
                forest.margins(isa, x, &mut pooled);
                // The keyed walk (what margins_here runs below a vector of rows), on any
                // number of rows: it is the same code whatever the instruction set.
                let mut keyed = vec![0.0; reference.len()];
                forest.margins_keyed(x, &mut keyed);
                for (what, got) in [
                    ("margins_here", &here),
                    ("margins", &pooled),
                    ("margins_keyed", &keyed),
                ] {
                    let same = got
                        .iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {what} on {isa:?} with {rows} rows", case.name);
                }
            }
        }
    }
}

#[test]
fn unsupported_models_are_refused_at_load_naming_the_feature() {
    let dir = trees_dir();
    let refused = manifest()["refused"].as_array().unwrap().clone();
    assert!(refused.len() >= 3);
    for r in refused {
        let file = dir.join(r["file"].as_str().unwrap());
        let names = r["names"].as_str().unwrap();
        let err = TreeModel::load(&file, false, Device::Cpu).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(
                &err,
                LoadError::Trees {
                    source: TreeError::Unsupported { .. },
                    ..
                }
            ),
            "{}: {message}",
            file.display()
        );
        assert!(message.contains(names), "`{message}` does not name {names}");
        assert!(message.contains(r["file"].as_str().unwrap()), "{message}");
    }
}

#[test]
fn the_loader_serves_trees_through_the_model_trait() {
    let (x, features, cases) = cases();
    for case in cases
        .iter()
        .filter(|c| c.name == "xgb_softprob" || c.name == "lgb_binary")
    {
        let spec = ModelSpec::Trees {
            path: case.file.clone(),
            output_margin: false,
        };
        let model = load(&spec, &Device::Cpu).unwrap();
        assert_eq!(model.kind(), "trees");
        let sig = model.signature();
        assert_eq!(sig.inputs[0].shape, vec![-1, features as i64]);
        let k = case.classes.max(1);
        let want_out = if k == 1 { vec![-1] } else { vec![-1, k as i64] };
        assert_eq!(sig.outputs[0].shape, want_out);

        let request = |rows: usize, at: usize| {
            let t = HostTensor {
                name: "INPUT0".to_owned(),
                shape: vec![rows, features],
                data: TensorData::F32(x[at * features..(at + rows) * features].to_vec()),
            };
            model.prepare(vec![t]).unwrap()
        };
        let batch = [request(3, 0), request(1, 3), request(500, 4)];
        let out = model.forward(&batch).unwrap();
        assert_eq!(out.len(), 3);
        let mut row = 0;
        for (outputs, rows) in out.iter().zip([3, 1, 500]) {
            let t = &outputs[0];
            assert_eq!(t.name, "OUTPUT0");
            let want_shape = if k == 1 { vec![rows] } else { vec![rows, k] };
            assert_eq!(t.shape, want_shape);
            let TensorData::F32(values) = &t.data else {
                panic!("not FP32")
            };
            let theirs = &case.pred[row * k..(row + rows) * k];
            assert!(
                max_abs_diff(values, theirs) <= MAX_ABS_DIFF,
                "{}",
                case.name
            );
            row += rows;
        }

        let wrong = HostTensor {
            name: "INPUT0".to_owned(),
            shape: vec![1, features + 1],
            data: TensorData::F32(vec![0.0; features + 1]),
        };
        assert!(matches!(
            model.prepare(vec![wrong]),
            Err(InputError::WrongShape { .. })
        ));
        let int = HostTensor {
            name: "INPUT0".to_owned(),
            shape: vec![1, features],
            data: TensorData::I32(vec![0; features]),
        };
        assert!(matches!(
            model.prepare(vec![int]),
            Err(InputError::WrongDatatype {
                expected: DataType::Fp32,
                ..
            })
        ));
    }
}

// ---- Hand-written models: the split semantics at the edges ----

/// An XGBoost JSON model of one objective whose trees are given as
/// (left, right, feature, condition, default_left) lists.
fn xgboost_json(objective: &str, base_score: &str, features: usize, trees: &[&str]) -> String {
    let info = vec!["0"; trees.len()].join(",");
    format!(
        r#"{{"learner":{{"objective":{{"name":"{objective}"}},
        "learner_model_param":{{"base_score":"{base_score}","num_class":"0","num_feature":"{features}","num_target":"1"}},
        "gradient_booster":{{"name":"gbtree","model":{{"tree_info":[{info}],"trees":[{}]}}}}}},
        "version":[3,2,0]}}"#,
        trees.join(",")
    )
}

/// A stump on `feature` at `condition`: left leaf 1, right leaf 2 (values).
fn xgboost_stump(feature: u32, condition: &str, default_left: u8) -> String {
    format!(
        r#"{{"left_children":[1,-1,-1],"right_children":[2,-1,-1],"split_indices":[{feature},0,0],
        "split_conditions":[{condition},1.0,2.0],"default_left":[{default_left},0,0],"split_type":[0,0,0]}}"#
    )
}

fn margins(model: &TreeModel, x: &[f32]) -> Vec<Vec<f32>> {
    Isa::available()
        .into_iter()
        .map(|isa| model.predict(isa, x).unwrap())
        .collect()
}

/// Each row's margin on every instruction set (they must agree) as one list; each row is
/// also predicted alone (the keyed walk) and must agree with the rest.
fn agreed(model: &TreeModel, x: &[f32]) -> Vec<f32> {
    // Repeat the rows so the SIMD paths (by rows and by trees) both run.
    let reps = 40;
    let long: Vec<f32> = (0..reps).flat_map(|_| x.iter().copied()).collect();
    let all = margins(model, &long);
    let n = x.len() / model.forest().features();
    let first: Vec<f32> = all[0][..n].to_vec();
    for (isa, m) in Isa::available().into_iter().zip(&all) {
        for rep in 0..reps {
            assert_eq!(&m[rep * n..(rep + 1) * n], &first[..], "{isa:?}");
        }
    }
    let features = model.forest().features();
    for (r, row) in x.chunks_exact(features).enumerate() {
        for (isa, alone) in Isa::available().into_iter().zip(margins(model, row)) {
            assert_eq!(alone, [first[r]], "row {r} alone on {isa:?}");
        }
    }
    first
}

#[test]
fn xgboost_splits_are_f32_less_than_with_nan_default() {
    let json = xgboost_json(
        "reg:squarederror",
        "0E0",
        2,
        &[&xgboost_stump(0, "0.5", 1), &xgboost_stump(1, "-1.5", 0)],
    );
    let model = TreeModel::from_bytes(json.as_bytes(), true, Device::Cpu).unwrap();
    let below = 0.5f32.next_down();
    let x = [
        0.5,
        -1.5, // ties go right in both trees: 2 + 2
        below,
        -2.0, // left, left: 1 + 1
        f32::NAN,
        f32::NAN, // default left, default right: 1 + 2
        f32::INFINITY,
        f32::NEG_INFINITY, // right, left: 2 + 1
    ];
    assert_eq!(agreed(&model, &x), vec![4.0, 2.0, 3.0, 3.0]);
}

#[test]
fn xgboost_lowest_condition_keeps_minus_infinity_left() {
    // `x < f32::MIN` holds for -inf alone; the common rule's bound is next_down(MIN) = -inf.
    let json = xgboost_json(
        "reg:squarederror",
        "0E0",
        1,
        &[&xgboost_stump(0, "-3.4028235e38", 1)],
    );
    let model = TreeModel::from_bytes(json.as_bytes(), true, Device::Cpu).unwrap();
    let x = [f32::MIN, f32::NEG_INFINITY, 0.0, f32::NAN];
    // f32::MIN < f32::MIN is false: right. -inf < f32::MIN: left. NaN: default left.
    assert_eq!(agreed(&model, &x), vec![2.0, 1.0, 2.0, 1.0]);
}

#[test]
fn xgboost_base_score_is_a_probability_for_binary_logistic() {
    let json = xgboost_json(
        "binary:logistic",
        "[2.5E-1]",
        1,
        &[&xgboost_stump(0, "0", 0)],
    );
    let model = TreeModel::from_bytes(json.as_bytes(), true, Device::Cpu).unwrap();
    let m = agreed(&model, &[-1.0, 1.0]);
    let logit = (0.25f32 / 0.75).ln();
    assert!((m[0] - (logit + 1.0)).abs() < 1e-6, "{m:?}");
    assert!((m[1] - (logit + 2.0)).abs() < 1e-6, "{m:?}");
    let probs = TreeModel::from_bytes(json.as_bytes(), false, Device::Cpu).unwrap();
    let p = agreed(&probs, &[-1.0]);
    assert!((f64::from(p[0]) - 1.0 / (1.0 + (-f64::from(logit + 1.0)).exp())).abs() < 1e-6);
}

/// A LightGBM text model: `trees` are (threshold, decision_type) stumps on feature 0, left
/// leaf 1, right leaf 2.
fn lightgbm_text(objective: &str, stumps: &[(&str, u8)]) -> String {
    let mut s = format!(
        "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\n\
         max_feature_idx=0\nobjective={objective}\nfeature_names=f0\n\n"
    );
    for (t, (threshold, decision)) in stumps.iter().enumerate() {
        s.push_str(&format!(
            "Tree={t}\nnum_leaves=2\nnum_cat=0\nsplit_feature=0\nsplit_gain=1\n\
             threshold={threshold}\ndecision_type={decision}\nleft_child=-1\nright_child=-2\n\
             leaf_value=1 2\nleaf_weight=1 1\nleaf_count=1 1\ninternal_value=0\n\
             internal_weight=0\ninternal_count=2\nis_linear=0\nshrinkage=1\n\n\n"
        ));
    }
    s.push_str("end of trees\n");
    s
}

#[test]
fn lightgbm_splits_are_f64_less_or_equal_with_its_missing_types() {
    // Threshold 0.1 (f64) lies between two f32s: the f32 just below 0.1 goes left, the f32
    // nearest 0.1 (which is above it) goes right.
    let near = 0.1f32;
    assert!(f64::from(near) > 0.1);
    let cases: [(u8, [f32; 5], [f32; 5]); 4] = [
        // NaN type (2 << 2), default right: NaN right; 0 is a value (left).
        (
            8,
            [near.next_down(), near, f32::NAN, 0.0, -0.0],
            [1.0, 2.0, 2.0, 1.0, 1.0],
        ),
        // NaN type, default left.
        (
            10,
            [near.next_down(), near, f32::NAN, 0.0, 1.0],
            [1.0, 2.0, 1.0, 1.0, 2.0],
        ),
        // Zero type (1 << 2), default right: NaN and zero go right, 1e-36 is zero too.
        (
            4,
            [near.next_down(), near, f32::NAN, 0.0, 1e-36],
            [1.0, 2.0, 2.0, 2.0, 2.0],
        ),
        // None type: NaN is read as 0.0, which is <= 0.1: left, whatever the default bit.
        (
            0,
            [near.next_down(), near, f32::NAN, 0.0, 5.0],
            [1.0, 2.0, 1.0, 1.0, 2.0],
        ),
    ];
    for (decision, x, want) in cases {
        let text = lightgbm_text("regression", &[("0.10000000000000001", decision)]);
        let model = TreeModel::from_bytes(text.as_bytes(), true, Device::Cpu).unwrap();
        assert_eq!(agreed(&model, &x), want, "decision_type {decision}");
    }
    // None type with a negative threshold: NaN (as 0.0) goes right.
    let text = lightgbm_text("regression", &[("-0.5", 2)]);
    let model = TreeModel::from_bytes(text.as_bytes(), true, Device::Cpu).unwrap();
    assert_eq!(agreed(&model, &[f32::NAN, -0.5, -0.6]), vec![2.0, 1.0, 1.0]);
    // A NaN threshold: nothing is <= NaN, so every present value goes right (the children
    // are swapped at load); NaN still takes the default (left here).
    let text = lightgbm_text("regression", &[("nan", 10)]);
    let model = TreeModel::from_bytes(text.as_bytes(), true, Device::Cpu).unwrap();
    assert_eq!(
        agreed(&model, &[f32::NEG_INFINITY, 0.0, f32::MAX, f32::NAN]),
        vec![2.0, 2.0, 2.0, 1.0]
    );
    // Thresholds beyond f32's range.
    let text = lightgbm_text("regression", &[("1e300", 8), ("-1e300", 8)]);
    let model = TreeModel::from_bytes(text.as_bytes(), true, Device::Cpu).unwrap();
    assert_eq!(
        agreed(&model, &[f32::MAX, f32::INFINITY, f32::NEG_INFINITY]),
        vec![3.0, 4.0, 2.0]
    );
}

#[test]
fn lightgbm_sigmoid_parameter_scales_the_margin() {
    let text = lightgbm_text("binary sigmoid:2", &[("0", 8)]);
    let model = TreeModel::from_bytes(text.as_bytes(), false, Device::Cpu).unwrap();
    let p = agreed(&model, &[1.0]);
    assert!(
        (f64::from(p[0]) - 1.0 / (1.0 + (-4.0f64).exp())).abs() < 1e-7,
        "{p:?}"
    );
}

#[test]
fn malformed_and_unknown_files_are_typed_errors_naming_the_problem() {
    let err = |bytes: &[u8]| TreeModel::from_bytes(bytes, false, Device::Cpu).unwrap_err();
    assert!(matches!(err(b"PK\x03\x04"), TreeError::Format { .. }));
    assert!(matches!(err(b""), TreeError::Format { .. }));
    assert!(matches!(
        err(b"{\"learner\": 1"),
        TreeError::Malformed { .. }
    ));

    let cyclic = xgboost_json(
        "reg:squarederror",
        "0E0",
        1,
        &[
            r#"{"left_children":[1,0,-1,-1],"right_children":[2,3,-1,-1],"split_indices":[0,0,0,0],
            "split_conditions":[0,0,1,2],"default_left":[0,0,0,0],"split_type":[0,0,0,0]}"#,
        ],
    );
    let e = err(cyclic.as_bytes());
    assert!(
        matches!(&e, TreeError::Malformed { what } if what.contains("reached twice")),
        "{e}"
    );
    let out_of_range = xgboost_json("reg:squarederror", "0E0", 1, &[&xgboost_stump(5, "0", 0)]);
    let e = err(out_of_range.as_bytes());
    assert!(e.to_string().contains("feature 5"), "{e}");
    let child = xgboost_json(
        "reg:squarederror",
        "0E0",
        1,
        &[
            r#"{"left_children":[1,-1,-1],"right_children":[9,-1,-1],"split_indices":[0,0,0],
            "split_conditions":[0,0,1],"default_left":[0,0,0],"split_type":[0,0,0]}"#,
        ],
    );
    assert!(err(child.as_bytes()).to_string().contains("child 9"));
    let unknown = xgboost_json("reg:absoluteerror", "0E0", 1, &[&xgboost_stump(0, "0", 0)]);
    let e = err(unknown.as_bytes());
    assert!(
        matches!(&e, TreeError::Unsupported { what } if what.contains("reg:absoluteerror")),
        "{e}"
    );
    let categorical = xgboost_json("reg:squarederror", "0E0", 1, &[&xgboost_stump(0, "0", 0)])
        .replace("\"split_type\":[0,0,0]", "\"split_type\":[1,0,0]");
    assert!(
        err(categorical.as_bytes())
            .to_string()
            .contains("categorical split on feature 0")
    );

    let truncated =
        lightgbm_text("regression", &[("0", 8)]).replace("leaf_value=1 2", "leaf_value=1");
    assert!(matches!(
        err(truncated.as_bytes()),
        TreeError::Malformed { .. }
    ));
    let garbage = lightgbm_text("regression", &[("zero", 8)]);
    assert!(err(garbage.as_bytes()).to_string().contains("`zero`"));
    let lambdarank = lightgbm_text("lambdarank", &[("0", 8)]);
    assert!(
        err(lambdarank.as_bytes())
            .to_string()
            .contains("lambdarank")
    );
    let sqrt = lightgbm_text("regression sqrt", &[("0", 8)]);
    assert!(err(sqrt.as_bytes()).to_string().contains("sqrt"));
    let categorical = lightgbm_text("regression", &[("0", 9)]);
    assert!(
        err(categorical.as_bytes())
            .to_string()
            .contains("categorical")
    );

    let missing = std::env::temp_dir().join("quiver-no-such-trees-model.json");
    assert!(matches!(
        TreeModel::load(&missing, false, Device::Cpu),
        Err(LoadError::Io { .. })
    ));
}

#[test]
fn forward_walks_with_an_instruction_set_this_cpu_has() {
    let json = xgboost_json("reg:squarederror", "0E0", 1, &[&xgboost_stump(0, "0", 0)]);
    let model = TreeModel::from_bytes(json.as_bytes(), false, Device::Cpu).unwrap();
    assert!(model.isa().is_available());
    assert_eq!(
        model.isa() == Isa::Scalar,
        Isa::available() == vec![Isa::Scalar],
        "scalar is chosen only where there is no SIMD"
    );
}
