//! The `onnx` family against ONNX Runtime: every graph that `scripts/make-onnx` built (an MLP
//! with `Gemm` in both layouts and `MatMul` + `Add`; a small convolutional image classifier
//! with two outputs) must give ONNX Runtime's outputs within 1e-4 on its fixed inputs, whole
//! and split into requests of several sizes batched together; the graphs that candle-onnx
//! cannot run must be refused at load, naming their op types. With the `cuda` feature on a
//! machine with a GPU the same graphs run on `cuda:0` too (elsewhere that test prints
//! `skipped: no CUDA device (...)`).
//!
//! The graphs come from `scripts/make-onnx` (scripts/test runs it). Where they are missing
//! these tests fail and say so; they do not pass silently.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use quiver_kernels::{
    DataType, Device, HostTensor, InputError, LoadError, ModelSpec, OnnxError, TensorData, load,
};

const MAX_ABS_DIFF: f32 = 1e-4;

fn onnx_dir() -> PathBuf {
    common::generated_models("onnx", "ONNX graphs", "scripts/make-onnx")
}

fn manifest() -> serde_json::Value {
    let bytes = std::fs::read(onnx_dir().join("manifest.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A tensor of the manifest (`{"name", "datatype", "shape", "file"}`).
fn tensor(entry: &serde_json::Value) -> HostTensor {
    tensor_in(&onnx_dir(), entry)
}

/// A tensor of a manifest in `dir`.
fn tensor_in(dir: &Path, entry: &serde_json::Value) -> HostTensor {
    let bytes = std::fs::read(dir.join(entry["file"].as_str().unwrap())).unwrap();
    let shape: Vec<usize> = entry["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = match entry["datatype"].as_str().unwrap() {
        "FP32" => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "INT64" => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        other => panic!("datatype {other} in the manifest"),
    };
    assert_eq!(data.len(), shape.iter().product::<usize>());
    HostTensor {
        name: entry["name"].as_str().unwrap().to_owned(),
        shape,
        data,
    }
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        other => panic!("`{}` is {:?}, not FP32", t.name, other.datatype()),
    }
}

fn max_abs_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Rows `start..end` of a tensor batched along dim 0.
fn rows(t: &HostTensor, start: usize, end: usize) -> HostTensor {
    let per_row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    HostTensor {
        name: t.name.clone(),
        shape,
        data: TensorData::F32(f32s(t)[start * per_row..end * per_row].to_vec()),
    }
}

/// Loads each graph on `device` and compares it with ONNX Runtime: the whole input as one
/// request, then split into requests of 1, 3 and the remaining rows batched together.
fn parity_on(device: &Device) {
    let m = manifest();
    let graphs = m["graphs"].as_object().unwrap();
    assert!(graphs.contains_key("mlp") && graphs.contains_key("conv"));
    for (name, case) in graphs {
        let path = onnx_dir().join(case["model"].as_str().unwrap());
        let model = load(&ModelSpec::Onnx { path }, device).unwrap();
        assert_eq!(model.kind(), "onnx");
        let inputs: Vec<HostTensor> = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();
        let expected: Vec<HostTensor> = case["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();

        // The signature is the graph's: names, FP32, a free batch dimension.
        let sig = model.signature();
        assert_eq!(sig.inputs.len(), inputs.len(), "{name}");
        for (spec, t) in sig.inputs.iter().zip(&inputs) {
            assert_eq!(spec.name, t.name, "{name}");
            assert_eq!(spec.datatype, DataType::Fp32, "{name}");
            assert_eq!(spec.shape[0], -1, "{name}");
            assert_eq!(
                &spec.shape[1..],
                &t.shape[1..].iter().map(|&d| d as i64).collect::<Vec<_>>()[..]
            );
        }
        let out_names: Vec<&str> = sig.outputs.iter().map(|s| s.name.as_str()).collect();
        let want_names: Vec<&str> = expected.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(out_names, want_names, "{name}");

        let whole = model.prepare(inputs.clone()).unwrap();
        let got = model.forward(std::slice::from_ref(&whole)).unwrap();
        assert_eq!(got.len(), 1);
        for (ours, theirs) in got[0].iter().zip(&expected) {
            assert_eq!(ours.name, theirs.name);
            assert_eq!(ours.shape, theirs.shape, "{name}/{}", ours.name);
            let d = max_abs_diff(f32s(ours), f32s(theirs));
            assert!(
                d <= MAX_ABS_DIFF,
                "{name}/{} on {device}: max |diff| {d}",
                ours.name
            );
            println!(
                "{name}/{} on {device}: max |diff| vs ONNX Runtime {d:.2e}",
                ours.name
            );
        }

        // Requests of 1, 3 and the rest in one batch: each answered with its own rows.
        let n = inputs[0].shape[0];
        let cuts = [0, 1, 4, n];
        let batch: Vec<_> = cuts
            .windows(2)
            .map(|w| {
                model
                    .prepare(inputs.iter().map(|t| rows(t, w[0], w[1])).collect())
                    .unwrap()
            })
            .collect();
        let got = model.forward(&batch).unwrap();
        assert_eq!(got.len(), 3);
        for (answer, w) in got.iter().zip(cuts.windows(2)) {
            for (ours, theirs) in answer.iter().zip(&expected) {
                let theirs = rows(theirs, w[0], w[1]);
                assert_eq!(ours.shape, theirs.shape);
                let d = max_abs_diff(f32s(ours), f32s(&theirs));
                assert!(
                    d <= MAX_ABS_DIFF,
                    "{name}/{} rows {w:?}: max |diff| {d}",
                    ours.name
                );
            }
        }
    }
}

#[test]
fn graphs_match_onnx_runtime_on_the_cpu() {
    parity_on(&Device::Cpu);
}

/// The same graphs on `cuda:0`: with the `cuda` feature on a machine with a GPU; elsewhere it
/// prints `skipped: no CUDA device (...)` and passes.
#[test]
fn graphs_match_onnx_runtime_on_cuda() {
    match Device::Cuda(0).to_candle() {
        Ok(_) => parity_on(&Device::Cuda(0)),
        Err(why) => println!("skipped: no CUDA device ({why})"),
    }
}

#[test]
fn graphs_with_ops_candle_onnx_cannot_run_are_refused_naming_them() {
    let m = manifest();
    let refused = m["refused"].as_object().unwrap();
    assert!(refused.len() >= 2);
    for (name, case) in refused {
        let path = onnx_dir().join(case["model"].as_str().unwrap());
        let want: Vec<String> = case["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_owned())
            .collect();
        let err = load(&ModelSpec::Onnx { path: path.clone() }, &Device::Cpu).unwrap_err();
        let message = err.to_string();
        match err {
            LoadError::Onnx {
                path: p,
                source: OnnxError::UnsupportedOps { ops },
            } => {
                assert_eq!(p, path);
                assert_eq!(ops, want, "{name}");
            }
            other => panic!("{name}: {other}"),
        }
        for op in &want {
            assert!(message.contains(op.as_str()), "{name}: {message}");
        }
        println!("{name}: {message}");
    }
}

#[test]
fn a_directory_holding_model_onnx_loads_and_bad_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(onnx_dir().join("mlp.onnx"), tmp.path().join("model.onnx")).unwrap();
    let model = load(
        &ModelSpec::Onnx {
            path: tmp.path().to_owned(),
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.signature().inputs[0].shape, vec![-1, 16]);

    let garbage = tmp.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\xff\xff\xff not protobuf").unwrap();
    let err = load(&ModelSpec::Onnx { path: garbage }, &Device::Cpu).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Onnx {
                source: OnnxError::Parse { .. },
                ..
            }
        ),
        "{err}"
    );
    let missing = tmp.path().join("missing.onnx");
    let err = load(&ModelSpec::Onnx { path: missing }, &Device::Cpu).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err}");
}

#[test]
fn inputs_that_do_not_fit_the_graph_are_the_clients_fault() {
    let path = onnx_dir().join("mlp.onnx");
    let model = load(&ModelSpec::Onnx { path }, &Device::Cpu).unwrap();
    let input = |name: &str, shape: Vec<usize>| HostTensor {
        name: name.to_owned(),
        data: TensorData::F32(vec![0.5; shape.iter().product()]),
        shape,
    };
    assert!(matches!(
        model.prepare(vec![input("x", vec![2, 15])]),
        Err(InputError::WrongShape { .. })
    ));
    assert!(matches!(
        model.prepare(vec![input("INPUT0", vec![2, 16])]),
        Err(InputError::UnknownInput { .. })
    ));
    let p = model.prepare(vec![input("x", vec![2, 16])]).unwrap();
    assert_eq!(p.rows, 2);
}

fn i64s(t: &HostTensor) -> &[i64] {
    match &t.data {
        TensorData::I64(v) => v,
        other => panic!("`{}` is {:?}, not INT64", t.name, other.datatype()),
    }
}

/// MiniLM's encoder as optimum-cli exports it, against ONNX Runtime: the opset-16 export (ops
/// candle-onnx runs) on 8 sentences padded to the longest, then each sentence alone at its
/// own length in one batch (8 groups of one shape each: the real tokens' states must match);
/// the default-opset export is refused, naming LayerNormalization.
#[test]
#[ignore = "needs MiniLM's ONNX export, made with torch (several GB from PyPI), so not in CI; \
            run with: scripts/export-minilm-onnx && \
            cargo test -p quiver-kernels --test onnx -- --ignored minilm"]
fn minilm_export_matches_onnx_runtime() {
    let dir = onnx_dir().join("minilm");
    assert!(
        dir.join("manifest.json").is_file(),
        "no MiniLM export in {}: run scripts/export-minilm-onnx",
        dir.display()
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let inputs: Vec<HostTensor> = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| tensor_in(&dir, e))
        .collect();
    let expected = tensor_in(&dir, &m["outputs"][0]);
    let start = std::time::Instant::now();
    let model = load(
        &ModelSpec::Onnx {
            path: dir.join("model.onnx"),
        },
        &Device::Cpu,
    )
    .unwrap();
    println!("minilm: loaded and checked in {:?}", start.elapsed());
    let sig = model.signature();
    assert!(
        sig.inputs
            .iter()
            .all(|s| s.shape == vec![-1, -1] && s.datatype == DataType::Int64)
    );
    assert_eq!(sig.outputs[0].shape, vec![-1, -1, 384]);

    let whole = model.prepare(inputs.clone()).unwrap();
    let start = std::time::Instant::now();
    let got = model.forward(std::slice::from_ref(&whole)).unwrap();
    println!("minilm: 8 sentences in {:?}", start.elapsed());
    let ours = &got[0][0];
    assert_eq!(ours.shape, expected.shape);
    let d = max_abs_diff(f32s(ours), f32s(&expected));
    println!("minilm/last_hidden_state: max |diff| vs ONNX Runtime {d:.2e}");
    assert!(d <= MAX_ABS_DIFF, "max |diff| {d}");

    // Each sentence alone, unpadded.
    let (n, width) = (expected.shape[0], expected.shape[1]);
    let mask = i64s(inputs.iter().find(|t| t.name == "attention_mask").unwrap());
    let lengths: Vec<usize> = (0..n)
        .map(|i| {
            mask[i * width..(i + 1) * width]
                .iter()
                .filter(|&&v| v == 1)
                .count()
        })
        .collect();
    let batch: Vec<_> = (0..n)
        .map(|i| {
            let len = lengths[i];
            let one = inputs
                .iter()
                .map(|t| HostTensor {
                    name: t.name.clone(),
                    shape: vec![1, len],
                    data: TensorData::I64(i64s(t)[i * width..i * width + len].to_vec()),
                })
                .collect();
            model.prepare(one).unwrap()
        })
        .collect();
    let got = model.forward(&batch).unwrap();
    let hidden = 384;
    for (i, answer) in got.iter().enumerate() {
        let len = lengths[i];
        assert_eq!(answer[0].shape, vec![1, len, hidden]);
        let theirs = &f32s(&expected)[i * width * hidden..(i * width + len) * hidden];
        let d = max_abs_diff(f32s(&answer[0]), theirs);
        assert!(d <= MAX_ABS_DIFF, "sentence {i} alone: max |diff| {d}");
    }

    let err = load(
        &ModelSpec::Onnx {
            path: dir.join("model.default-opset.onnx"),
        },
        &Device::Cpu,
    )
    .unwrap_err();
    match err {
        LoadError::Onnx {
            source: OnnxError::UnsupportedOps { ops },
            ..
        } => assert_eq!(ops, vec!["LayerNormalization".to_owned()]),
        other => panic!("{other}"),
    }
}
