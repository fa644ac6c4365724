//! The `onnx` family against ONNX Runtime's Python outputs, on both engines (ONNX Runtime
//! through `ort`, and candle-onnx): every graph that `scripts/make-onnx` built (an MLP with
//! `Gemm` in both layouts and `MatMul` + `Add`; a small convolutional image classifier with two
//! outputs) must give ONNX Runtime's outputs within 1e-4 on its fixed inputs, whole and split
//! into requests of several sizes batched together, and both engines must report the same
//! signature. The graphs that candle-onnx cannot run must be refused at load by it, naming
//! their op types; ONNX Runtime runs those of the standard and refuses a custom domain's op.
//! With the `cuda` feature on a machine with a GPU the same graphs run on `cuda:0` too (on
//! candle-onnx; elsewhere that test prints `skipped: no CUDA device (...)`).
//!
//! The graphs come from `scripts/make-onnx` and ONNX Runtime's library from its venv
//! (scripts/test runs it and exports ORT_DYLIB_PATH). Where either is missing these tests fail
//! and say so; they do not pass silently. `onnx_without_runtime.rs` covers a library that
//! cannot be opened.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use quiver_kernels::{
    DataType, Device, HostTensor, InputError, LoadError, Model, ModelSpec, OnnxEngine, OnnxError,
    OnnxModel, TensorData, load,
};

const MAX_ABS_DIFF: f32 = 1e-4;

/// The two engines, by name.
const ENGINES: [OnnxEngine; 2] = [OnnxEngine::OnnxRuntime, OnnxEngine::Candle];

/// `path` on `device` on `engine`, which must be the engine that runs it.
fn load_on(path: &Path, device: &Device, engine: OnnxEngine) -> OnnxModel {
    let candle = device.to_candle().unwrap();
    let model = OnnxModel::load(path, device.clone(), candle, engine)
        .unwrap_or_else(|e| panic!("{} on {engine}: {e}", path.display()));
    assert_eq!(model.engine(), engine);
    model
}

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

/// Loads each graph on `device` on `engine` and compares it with ONNX Runtime's Python
/// outputs: the whole input as one request, then split into requests of 1, 3 and the
/// remaining rows batched together.
fn parity_on(device: &Device, engine: OnnxEngine) {
    let m = manifest();
    let graphs = m["graphs"].as_object().unwrap();
    assert!(graphs.contains_key("mlp") && graphs.contains_key("conv"));
    for (name, case) in graphs {
        let path = onnx_dir().join(case["model"].as_str().unwrap());
        let model = load_on(&path, device, engine);
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
                "{name}/{} on {device} ({engine}): max |diff| {d}",
                ours.name
            );
            println!(
                "{name}/{} on {device} ({engine}): max |diff| vs ONNX Runtime {d:.2e}",
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
                    "{name}/{} rows {w:?} ({engine}): max |diff| {d}",
                    ours.name
                );
            }
        }
    }
}

#[test]
fn graphs_match_onnx_runtime_on_the_cpu_on_onnx_runtime() {
    parity_on(&Device::Cpu, OnnxEngine::OnnxRuntime);
}

#[test]
fn graphs_match_onnx_runtime_on_the_cpu_on_candle_onnx() {
    parity_on(&Device::Cpu, OnnxEngine::Candle);
}

/// The same graphs on `cuda:0` (candle-onnx, what `auto` picks there): with the `cuda`
/// feature on a machine with a GPU; elsewhere it prints `skipped: no CUDA device (...)` and
/// passes.
#[test]
fn graphs_match_onnx_runtime_on_cuda() {
    match Device::Cuda(0).to_candle() {
        Ok(_) => parity_on(&Device::Cuda(0), OnnxEngine::Candle),
        Err(why) => println!("skipped: no CUDA device ({why})"),
    }
}

/// `auto` is ONNX Runtime on the CPU (its library opens here) and candle-onnx on CUDA;
/// `onnxruntime` on a CUDA device is refused, naming both.
#[test]
fn auto_picks_onnx_runtime_on_the_cpu_and_onnxruntime_is_refused_on_cuda() {
    let path = onnx_dir().join("mlp.onnx");
    let candle = Device::Cpu.to_candle().unwrap();
    let model = OnnxModel::load(&path, Device::Cpu, candle.clone(), OnnxEngine::Auto).unwrap();
    assert_eq!(model.engine(), OnnxEngine::OnnxRuntime);
    // Through the loader, as the gateway loads it: the default engine.
    let loaded = load(
        &ModelSpec::Onnx {
            path: path.clone(),
            engine: OnnxEngine::default(),
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(loaded.signature(), model.signature());

    let err = OnnxModel::load(&path, Device::Cuda(0), candle, OnnxEngine::OnnxRuntime).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            LoadError::Onnx {
                source: OnnxError::EngineDevice {
                    engine: OnnxEngine::OnnxRuntime,
                    device: Device::Cuda(0)
                },
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("cuda:0") && message.contains("candle"),
        "{message}"
    );
    if Device::Cuda(0).to_candle().is_ok() {
        let model = load_on(&path, &Device::Cuda(0), OnnxEngine::Candle);
        assert_eq!(model.signature(), loaded.signature());
    }
}

/// Both engines read the same signature from each graph, the MiniLM export's too when it
/// is there.
#[test]
fn both_engines_report_the_same_signature() {
    let m = manifest();
    let mut paths: Vec<PathBuf> = m["graphs"]
        .as_object()
        .unwrap()
        .values()
        .map(|case| onnx_dir().join(case["model"].as_str().unwrap()))
        .collect();
    let minilm = onnx_dir().join("minilm/model.onnx");
    if minilm.is_file() {
        paths.push(minilm);
    }
    for path in paths {
        let [ort, candle] = ENGINES.map(|e| load_on(&path, &Device::Cpu, e));
        assert_eq!(ort.signature(), candle.signature(), "{}", path.display());
        println!("{}: {:?}", path.display(), ort.signature());
    }
}

#[test]
fn graphs_with_ops_candle_onnx_cannot_run_are_refused_by_it_naming_them() {
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
        let err = load(
            &ModelSpec::Onnx {
                path: path.clone(),
                engine: OnnxEngine::Candle,
            },
            &Device::Cpu,
        )
        .unwrap_err();
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

/// ONNX Runtime runs the standard ops candle-onnx lacks (`refused.onnx`: GlobalAveragePool,
/// LpNormalization), and refuses at load an op of a domain it does not know, naming it.
#[test]
fn onnx_runtime_runs_ops_candle_onnx_lacks_and_refuses_unknown_ones() {
    let m = manifest();
    let refused = m["refused"].as_object().unwrap();
    for (name, case) in refused {
        let path = onnx_dir().join(case["model"].as_str().unwrap());
        let ops: Vec<&str> = case["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let custom: Vec<&str> = ops.iter().copied().filter(|o| o.contains(':')).collect();
        let candle = Device::Cpu.to_candle().unwrap();
        let loaded = OnnxModel::load(&path, Device::Cpu, candle, OnnxEngine::OnnxRuntime);
        if custom.is_empty() {
            // Loaded, so it ran the one-row check; run it again on three rows.
            let model = loaded.unwrap_or_else(|e| panic!("{name}: {e}"));
            let inputs: Vec<HostTensor> = model
                .signature()
                .inputs
                .iter()
                .map(|spec| {
                    let mut shape: Vec<usize> =
                        spec.shape.iter().map(|&d| d.max(1) as usize).collect();
                    shape[0] = 3;
                    HostTensor {
                        name: spec.name.clone(),
                        data: TensorData::F32(vec![0.25; shape.iter().product()]),
                        shape,
                    }
                })
                .collect();
            let p = model.prepare(inputs).unwrap();
            let got = model.forward(std::slice::from_ref(&p)).unwrap();
            for t in &got[0] {
                assert_eq!(t.shape[0], 3, "{name}/{}", t.name);
                assert!(f32s(t).iter().all(|v| v.is_finite()), "{name}/{}", t.name);
            }
            println!("{name} ({}) runs on ONNX Runtime", ops.join(", "));
        } else {
            let err = loaded.unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(
                    err,
                    LoadError::Onnx {
                        source: OnnxError::Runtime { .. },
                        ..
                    }
                ),
                "{name}: {message}"
            );
            for op in custom {
                let op = op.rsplit(':').next().unwrap();
                assert!(message.contains(op), "{name}: {message}");
            }
            println!("{name}: {message}");
        }
    }
}

#[test]
fn a_directory_holding_model_onnx_loads_and_bad_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(onnx_dir().join("mlp.onnx"), tmp.path().join("model.onnx")).unwrap();
    let garbage = tmp.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\xff\xff\xff not protobuf").unwrap();
    let missing = tmp.path().join("missing.onnx");
    for engine in ENGINES {
        let spec = |path: &Path| ModelSpec::Onnx {
            path: path.to_owned(),
            engine,
        };
        let model = load(&spec(tmp.path()), &Device::Cpu).unwrap();
        assert_eq!(model.signature().inputs[0].shape, vec![-1, 16]);

        let err = load(&spec(&garbage), &Device::Cpu).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Onnx {
                    source: OnnxError::Parse { .. },
                    path,
                } if *path == garbage
            ),
            "{engine}: {err}"
        );
        println!("{engine}: {err}");
        let err = load(&spec(&missing), &Device::Cpu).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{engine}: {err}");
    }
}

#[test]
fn inputs_that_do_not_fit_the_graph_are_the_clients_fault() {
    let path = onnx_dir().join("mlp.onnx");
    for engine in ENGINES {
        let model = load_on(&path, &Device::Cpu, engine);
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
}

fn i64s(t: &HostTensor) -> &[i64] {
    match &t.data {
        TensorData::I64(v) => v,
        other => panic!("`{}` is {:?}, not INT64", t.name, other.datatype()),
    }
}

/// MiniLM's encoder as optimum-cli exports it, against ONNX Runtime's Python outputs, on both
/// engines: the opset-16 export on 8 sentences padded to the longest, then each sentence alone
/// at its own length in one batch (8 groups of one shape each: the real tokens' states must
/// match). The default-opset export (LayerNormalization) runs on ONNX Runtime, within the same
/// bound, and candle-onnx refuses it, naming LayerNormalization.
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
    for engine in ENGINES {
        minilm_on(&dir.join("model.onnx"), engine, &inputs, &expected);
    }
    minilm_on(
        &dir.join("model.default-opset.onnx"),
        OnnxEngine::OnnxRuntime,
        &inputs,
        &expected,
    );
    let err = load(
        &ModelSpec::Onnx {
            path: dir.join("model.default-opset.onnx"),
            engine: OnnxEngine::Candle,
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

/// One MiniLM export on one engine against the reference (see above).
fn minilm_on(path: &Path, engine: OnnxEngine, inputs: &[HostTensor], expected: &HostTensor) {
    let what = format!(
        "minilm {} ({engine})",
        path.file_name().unwrap().to_string_lossy()
    );
    let start = std::time::Instant::now();
    let model = load_on(path, &Device::Cpu, engine);
    println!("{what}: loaded and checked in {:?}", start.elapsed());
    let sig = model.signature();
    assert!(
        sig.inputs
            .iter()
            .all(|s| s.shape == vec![-1, -1] && s.datatype == DataType::Int64),
        "{what}: {sig:?}"
    );
    assert_eq!(sig.outputs[0].shape, vec![-1, -1, 384], "{what}");

    let whole = model.prepare(inputs.to_vec()).unwrap();
    let start = std::time::Instant::now();
    let got = model.forward(std::slice::from_ref(&whole)).unwrap();
    println!("{what}: 8 sentences in {:?}", start.elapsed());
    let ours = &got[0][0];
    assert_eq!(ours.shape, expected.shape);
    let d = max_abs_diff(f32s(ours), f32s(expected));
    println!("{what}/last_hidden_state: max |diff| vs ONNX Runtime {d:.2e}");
    assert!(d <= MAX_ABS_DIFF, "{what}: max |diff| {d}");

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
        let theirs = &f32s(expected)[i * width * hidden..(i * width + len) * hidden];
        let d = max_abs_diff(f32s(&answer[0]), theirs);
        assert!(
            d <= MAX_ABS_DIFF,
            "{what}: sentence {i} alone: max |diff| {d}"
        );
    }
}
