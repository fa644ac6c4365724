//! `kind = "onnx"` where ONNX Runtime's library cannot be opened: engine `onnxruntime` fails
//! the load with [`OnnxError::RuntimeUnavailable`], naming the library tried and what to
//! install (never a panic), and `auto` falls back to candle-onnx, which still serves the graph.
//!
//! Its own test binary with one test: ort opens the library once per process, so this
//! process must never have opened a good one, and `ORT_DYLIB_PATH` is set here before any
//! load (no other test of this binary reads it).
#![allow(clippy::unwrap_used)]
// `std::env::set_var` is unsafe where other threads read the environment; this binary's one
// test sets it before anything else runs.
#![allow(unsafe_code)]

mod common;

use quiver_kernels::onnx::onnxruntime;
use quiver_kernels::{Device, LoadError, Model, OnnxEngine, OnnxError, OnnxModel};

#[test]
fn an_unloadable_onnx_runtime_is_a_typed_error_and_auto_falls_back_to_candle_onnx() {
    let graphs = common::generated_models("onnx", "ONNX graphs", "scripts/make-onnx");
    let path = graphs.join("mlp.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("libonnxruntime.so.1.31.1");
    let not_a_library = tmp.path().join("not-a-library.so");
    std::fs::write(&not_a_library, b"not an ELF file").unwrap();

    for library in [&missing, &not_a_library] {
        // SAFETY: the one test of this binary; no other thread reads the environment now.
        unsafe { std::env::set_var("ORT_DYLIB_PATH", library) };
        assert_eq!(onnxruntime::library(), *library);
        let candle = Device::Cpu.to_candle().unwrap();
        let err = OnnxModel::load(&path, Device::Cpu, candle, OnnxEngine::OnnxRuntime).unwrap_err();
        let message = err.to_string();
        match err {
            LoadError::Onnx {
                path: p,
                source: OnnxError::RuntimeUnavailable { library: l, .. },
            } => {
                assert_eq!(p, path);
                assert_eq!(l, *library);
            }
            other => panic!("{other}"),
        }
        for needed in [
            "pip install onnxruntime==1.31.1",
            "ORT_DYLIB_PATH=",
            "libonnxruntime.so.1.31.1",
            "engine = \"candle\"",
        ] {
            assert!(message.contains(needed), "{message}");
        }
        println!("{message}");
        assert!(!onnxruntime::is_loaded());

        // `auto` serves it on candle-onnx instead.
        let candle = Device::Cpu.to_candle().unwrap();
        let model = OnnxModel::load(&path, Device::Cpu, candle, OnnxEngine::Auto).unwrap();
        assert_eq!(model.engine(), OnnxEngine::Candle);
        let p = model
            .prepare(vec![quiver_kernels::HostTensor {
                name: "x".into(),
                shape: vec![2, 16],
                data: quiver_kernels::TensorData::F32(vec![0.5; 32]),
            }])
            .unwrap();
        let out = model.forward(std::slice::from_ref(&p)).unwrap();
        assert_eq!(out[0][0].shape[0], 2);
    }
}
