//! The mlp model: loading from a directory (checked tensor by tensor), forward on a batch
//! against a plain-Rust reference, and the deterministic demo.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use quiver_kernels::{
    Activation, DataType, Device, HostTensor, InputError, LoadError, Model, ModelSpec, Prepared,
    TensorData, load, write_mlp,
};

/// Host weights: per layer (`[out][in]` weight row-major, bias).
type Weights = Vec<(Vec<f32>, Vec<f32>)>;

/// Reads weights straight from the safetensors file, independently of the crate's loader.
fn read_weights(dir: &Path, layers: &[usize]) -> Weights {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: String| -> Vec<f32> {
        let v = file.tensor(&name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32);
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    (0..layers.len() - 1)
        .map(|i| {
            (
                f32s(format!("layers.{i}.weight")),
                f32s(format!("layers.{i}.bias")),
            )
        })
        .collect()
}

/// erf to ~1e-7 (Abramowitz & Stegun 7.1.26 is 1.5e-7; this series/continued form is
/// plenty for a 1e-4 comparison).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

fn act(a: &Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::None => x,
        other => panic!("no reference for {other:?}"),
    }
}

/// The MLP in plain loops, in f64.
fn reference(layers: &[usize], weights: &Weights, a: &Activation, row: &[f32]) -> Vec<f32> {
    let mut x: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
    for (i, (w, b)) in weights.iter().enumerate() {
        let (fan_in, fan_out) = (layers[i], layers[i + 1]);
        let mut y = vec![0.0f64; fan_out];
        for o in 0..fan_out {
            let mut s = f64::from(b[o]);
            for k in 0..fan_in {
                s += f64::from(w[o * fan_in + k]) * x[k];
            }
            y[o] = if i + 1 < weights.len() { act(a, s) } else { s };
        }
        x = y;
    }
    x.into_iter().map(|v| v as f32).collect()
}

/// Deterministic test inputs (no RNG needed): a request of `rows` rows.
fn request(rows: usize, features: usize, salt: usize) -> HostTensor {
    let values = (0..rows * features)
        .map(|i| (((i * 7 + salt * 13) % 29) as f32 - 14.0) / 7.0)
        .collect();
    HostTensor::new("INPUT0", vec![rows, features], TensorData::F32(values)).unwrap()
}

/// Runs a batch of requests with these row counts and compares each output row with the
/// reference.
fn check_against_reference(
    model: &Arc<dyn Model>,
    layers: &[usize],
    weights: &Weights,
    a: &Activation,
    row_counts: &[usize],
) {
    let (features, outputs) = (layers[0], *layers.last().unwrap());
    let inputs: Vec<HostTensor> = row_counts
        .iter()
        .enumerate()
        .map(|(salt, &rows)| request(rows, features, salt))
        .collect();
    let batch: Vec<Prepared> = inputs
        .iter()
        .map(|t| model.prepare(vec![t.clone()]).unwrap())
        .collect();
    for (p, &rows) in batch.iter().zip(row_counts) {
        assert_eq!((p.rows, p.tokens), (rows as u32, 1));
    }
    let out = model.forward(&batch).unwrap();
    assert_eq!(out.len(), row_counts.len());
    let mut max_diff = 0.0f32;
    for ((o, input), &rows) in out.iter().zip(&inputs).zip(row_counts) {
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].name, "OUTPUT0");
        assert_eq!(o[0].shape, [rows, outputs]);
        let (TensorData::F32(got), TensorData::F32(x)) = (&o[0].data, &input.data) else {
            panic!("not FP32");
        };
        for r in 0..rows {
            let want = reference(layers, weights, a, &x[r * features..(r + 1) * features]);
            for (g, w) in got[r * outputs..(r + 1) * outputs].iter().zip(&want) {
                max_diff = max_diff.max((g - w).abs());
            }
        }
    }
    assert!(max_diff <= 1e-4, "{a:?}: max abs diff {max_diff}");
}

/// An MLP of `layers` written to disk and loaded, for every activation, with its weights
/// as read back.
fn written_models(layers: &[usize]) -> Vec<(Activation, Arc<dyn Model>, Weights)> {
    [
        Activation::Relu,
        Activation::Gelu,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::None,
    ]
    .into_iter()
    .enumerate()
    .map(|(seed, a)| {
        let dir = tempfile::tempdir().unwrap();
        write_mlp(dir.path(), layers, a, seed as u64).unwrap();
        let model = load(
            &ModelSpec::Mlp {
                dir: dir.path().into(),
            },
            &Device::Cpu,
        )
        .unwrap();
        (a, model, read_weights(dir.path(), layers))
    })
    .collect()
}

#[test]
fn written_mlp_matches_plain_loops_for_every_activation() {
    let layers = [5, 8, 6, 3];
    for (a, model, weights) in written_models(&layers) {
        assert_eq!(model.kind(), "mlp");
        check_against_reference(&model, &layers, &weights, &a, &[1, 4, 2, 7]);
    }
}

/// Small batches run on the calling thread (`Mlp::run_here`), large ones through candle;
/// both match the reference for every activation.
#[test]
fn small_batches_on_the_calling_thread_and_large_ones_on_candle_agree() {
    use quiver_kernels::mlp::{SMALL_BATCH_MACS, random_weights};
    let layers = [5, 8, 6, 3];
    let macs: usize = layers.windows(2).map(|w| w[0] * w[1]).sum();
    let large = SMALL_BATCH_MACS / macs + 1;
    for (a, model, weights) in written_models(&layers) {
        check_against_reference(&model, &layers, &weights, &a, &[1]);
        check_against_reference(&model, &layers, &weights, &a, &[large - 1, 1]);
        check_against_reference(&model, &layers, &weights, &a, &[large, 3]);
    }
    // Which path a batch takes.
    let config = quiver_kernels::MlpConfig {
        layers: layers.to_vec(),
        activation: Activation::Relu,
    };
    let mlp = quiver_kernels::Mlp::from_weights(
        config,
        random_weights(&layers, 3),
        Device::Cpu,
        candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(mlp.run_here(&[0.5; 5], 1).is_some());
    assert!(mlp.run_here(&vec![0.5; 5 * large], large).is_none());
}

#[test]
fn signature_reports_widths() {
    let dir = tempfile::tempdir().unwrap();
    write_mlp(dir.path(), &[4, 3, 2], Activation::Relu, 1).unwrap();
    let model = load(
        &ModelSpec::Mlp {
            dir: dir.path().into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    let sig = model.signature();
    assert_eq!(sig.inputs[0].name, "INPUT0");
    assert_eq!(sig.inputs[0].datatype, DataType::Fp32);
    assert_eq!(sig.inputs[0].shape, [-1, 4]);
    assert_eq!(sig.outputs[0].name, "OUTPUT0");
    assert_eq!(sig.outputs[0].shape, [-1, 2]);
}

/// Writes `config.json` and a safetensors file of the given F32 tensors by hand.
fn write_by_hand(dir: &Path, config: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                *name,
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let file = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

fn hand_weights() -> Weights {
    // 3 -> 4 -> 2
    let w0: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 6.0).collect();
    let b0 = vec![0.1, -0.2, 0.3, 0.0];
    let w1: Vec<f32> = (0..8).map(|i| ((i * 5) % 8) as f32 / 4.0 - 1.0).collect();
    let b1 = vec![0.5, -0.5];
    vec![(w0, b0), (w1, b1)]
}

fn hand_tensors(w: &Weights) -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    vec![
        ("layers.0.weight", vec![4, 3], w[0].0.clone()),
        ("layers.0.bias", vec![4], w[0].1.clone()),
        ("layers.1.weight", vec![2, 4], w[1].0.clone()),
        ("layers.1.bias", vec![2], w[1].1.clone()),
    ]
}

const HAND_CONFIG: &str = r#"{"layers": [3, 4, 2], "activation": "tanh", "model_type": "mlp"}"#;

#[test]
fn hand_built_safetensors_matches_plain_loops() {
    let dir = tempfile::tempdir().unwrap();
    let w = hand_weights();
    write_by_hand(dir.path(), HAND_CONFIG, &hand_tensors(&w));
    let model = load(
        &ModelSpec::Mlp {
            dir: dir.path().into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    check_against_reference(&model, &[3, 4, 2], &w, &Activation::Tanh, &[2, 1, 5]);
}

fn load_err(dir: &Path) -> LoadError {
    load(&ModelSpec::Mlp { dir: dir.into() }, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = hand_tensors(&hand_weights());
    t.retain(|(name, _, _)| *name != "layers.1.bias");
    write_by_hand(dir.path(), HAND_CONFIG, &t);
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::MissingTensor { name } if name == "layers.1.bias"),
        "{err}"
    );
    assert!(err.to_string().contains("layers.1.bias"));
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = hand_tensors(&hand_weights());
    t[0].1 = vec![3, 4]; // transposed
    write_by_hand(dir.path(), HAND_CONFIG, &t);
    let err = load_err(dir.path());
    match &err {
        LoadError::Shape {
            name,
            expected,
            got,
        } => {
            assert_eq!(name, "layers.0.weight");
            assert_eq!(expected, &[4, 3]);
            assert_eq!(got, &[3, 4]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn tensors_beyond_the_configured_depth_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = hand_tensors(&hand_weights());
    t.push(("layers.2.bias", vec![2], vec![0.0, 0.0]));
    write_by_hand(dir.path(), HAND_CONFIG, &t);
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::UnexpectedTensor { name } if name == "layers.2.bias"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_mlp(dir.path(), &[3, 4, 2], Activation::Tanh, 0).unwrap();
    // Replace the file with one whose first weight is F64.
    let w = hand_weights();
    let f64_bytes: Vec<u8> = w[0]
        .0
        .iter()
        .flat_map(|&x| f64::from(x).to_le_bytes())
        .collect();
    let rest = hand_tensors(&w);
    let rest_bytes: Vec<Vec<u8>> = rest
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = vec![(
        "layers.0.weight",
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![4, 3], &f64_bytes)
            .unwrap(),
    )];
    for ((name, shape, _), b) in rest.iter().zip(&rest_bytes).skip(1) {
        views.push((
            *name,
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .unwrap(),
        ));
    }
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::Dtype { name, .. } if name == "layers.0.weight"),
        "{err}"
    );
}

#[test]
fn bad_files_are_typed_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::Io { path, .. } if path.ends_with("config.json")),
        "{err}"
    );

    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = load_err(dir.path());
    assert!(matches!(&err, LoadError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"layers": [4], "activation": "relu"}"#,
    )
    .unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Config { .. }));

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"layers": [4, 2], "activation": "swish"}"#,
    )
    .unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Config { .. }));

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"layers": [4, 2], "activation": "relu"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x05\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::Safetensors { path, .. } if path.ends_with("model.safetensors")),
        "{err}"
    );
}

#[test]
fn prepare_rejects_wrong_shapes() {
    let model = demo(3);
    let err = model.prepare(vec![request(2, 5, 0)]).unwrap_err();
    assert_eq!(
        err,
        InputError::WrongShape {
            name: "INPUT0".into(),
            expected: vec![-1, 4],
            got: vec![2, 5]
        }
    );
    let flat = HostTensor::new("INPUT0", vec![4], TensorData::F32(vec![0.0; 4])).unwrap();
    assert!(matches!(
        model.prepare(vec![flat]).unwrap_err(),
        InputError::WrongShape { .. }
    ));
    let err = model.prepare(vec![request(0, 4, 0)]).unwrap_err();
    assert_eq!(
        err,
        InputError::EmptyBatch {
            name: "INPUT0".into()
        }
    );
    let f64s = HostTensor::new("INPUT0", vec![1, 4], TensorData::F64(vec![0.0; 4])).unwrap();
    assert!(matches!(
        model.prepare(vec![f64s]).unwrap_err(),
        InputError::WrongDatatype { .. }
    ));
}

#[test]
fn forward_rejects_a_prepared_of_the_wrong_width_instead_of_panicking() {
    let model = demo(3);
    let bogus = Prepared {
        inputs: vec![request(2, 7, 0)],
        rows: 2,
        tokens: 1,
        token_ids: Vec::new(),
        truncated: 0,
    };
    assert!(model.forward(&[bogus]).is_err());
    assert!(model.forward(&[]).unwrap().is_empty());
}

fn demo(seed: u64) -> Arc<dyn Model> {
    let spec = ModelSpec::MlpDemo {
        inputs: 4,
        hidden: vec![16, 8],
        outputs: 3,
        activation: Activation::Gelu,
        seed,
    };
    load(&spec, &Device::Cpu).unwrap()
}

fn run(model: &Arc<dyn Model>) -> Vec<Vec<HostTensor>> {
    let batch: Vec<Prepared> = [3, 1, 2]
        .iter()
        .enumerate()
        .map(|(salt, &rows)| model.prepare(vec![request(rows, 4, salt)]).unwrap())
        .collect();
    model.forward(&batch).unwrap()
}

#[test]
fn demo_is_deterministic_per_seed() {
    let a = run(&demo(42));
    let b = run(&demo(42));
    assert_eq!(a, b, "same seed, different outputs");
    let c = run(&demo(43));
    assert_ne!(a, c, "different seeds, same outputs");
}

#[test]
fn demo_has_the_weights_write_mlp_writes() {
    let dir = tempfile::tempdir().unwrap();
    write_mlp(dir.path(), &[4, 16, 8, 3], Activation::Gelu, 42).unwrap();
    let from_file = load(
        &ModelSpec::Mlp {
            dir: dir.path().into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(run(&from_file), run(&demo(42)));
    let weights = read_weights(dir.path(), &[4, 16, 8, 3]);
    check_against_reference(
        &demo(42),
        &[4, 16, 8, 3],
        &weights,
        &Activation::Gelu,
        &[2, 3],
    );
}

#[test]
fn impossible_demo_specs_are_errors() {
    for (inputs, hidden, outputs) in [(0, vec![], 1), (3, vec![0], 1), (3, vec![], 0)] {
        let spec = ModelSpec::MlpDemo {
            inputs,
            hidden,
            outputs,
            activation: Activation::Relu,
            seed: 0,
        };
        let err = load(&spec, &Device::Cpu).unwrap_err();
        assert!(matches!(err, LoadError::Spec { .. }), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        write_mlp(dir.path(), &[3], Activation::Relu, 0),
        Err(LoadError::Spec { .. })
    ));
}
