//! End to end, ONNX graphs (`kind = "onnx"`): the real `quiver` binary serving the MLP and
//! the small image classifier that `scripts/make-onnx` built, its metadata read from the
//! graph, driven over KServe v2 REST (binary tensors, two outputs) and the QUIC native
//! protocol; every answer must be ONNX Runtime's output within 1e-4. The models run on the
//! default engine (`auto`), which is ONNX Runtime on the CPU: a third model uses ops that
//! only ONNX Runtime runs (GlobalAveragePool, LpNormalization), so it is served only if ONNX
//! Runtime serves it. A graph that no engine runs (an op of an unknown domain), and the same
//! GlobalAveragePool graph on `engine = "candle"`, pass the configuration's checks but stop
//! start-up, naming the ops.
//!
//! The graphs come from `scripts/make-onnx` and ONNX Runtime's library from its venv
//! (scripts/test runs it and exports ORT_DYLIB_PATH, which the served binary inherits);
//! without them these tests fail and say so.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use quiver_gateway::tensor::{outputs_from_proto, request_to_proto};
use quiver_kernels::{HostTensor, TensorData};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, TOKEN, f32_bytes, f32s_of};

fn onnx_dir() -> PathBuf {
    support::generated_models("onnx", "ONNX graphs", "scripts/make-onnx")
}

fn f32_file(name: &str) -> Vec<f32> {
    f32s_of(&std::fs::read(onnx_dir().join(name)).unwrap())
}

fn assert_within(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= 1e-4, "{what}[{i}]: {a} vs {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_quic_serve_onnx_graphs_as_onnx_runtime_computes_them() {
    let dir = onnx_dir();
    let config = format!(
        r#"
[server]
auth_tokens = ["{TOKEN}"]
auth_exempt_health = true

[[models]]
name = "classifier"
kind = "onnx"
path = "{}"
max_batch_size = 16
default_timeout_ms = 10000

[[models]]
name = "tabular"
kind = "onnx"
path = "{}"
max_batch_size = 64
default_timeout_ms = 10000

[[models]]
name = "pooled"
kind = "onnx"
path = "{}"
default_timeout_ms = 10000
"#,
        dir.join("conv.onnx").display(),
        dir.join("mlp.onnx").display(),
        dir.join("refused.onnx").display()
    );
    let server = Server::start(&config);
    let base = server.http_url();
    let c = reqwest::Client::new();

    // Metadata: the graph's names, types and shapes, the batch dimension free.
    let r = c
        .get(format!("{base}/v2/models/classifier"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let meta: Value = r.json().await.unwrap();
    assert_eq!(meta["inputs"][0]["name"], "image", "{meta}");
    assert_eq!(meta["inputs"][0]["datatype"], "FP32", "{meta}");
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, 32, 32]), "{meta}");
    assert_eq!(meta["outputs"][0]["name"], "logits", "{meta}");
    assert_eq!(meta["outputs"][1]["name"], "probs", "{meta}");
    assert_eq!(meta["outputs"][1]["shape"], json!([-1, 10]), "{meta}");

    // REST, binary tensors: 8 images in, both outputs back as binary.
    let images = f32_file("conv.in.image.bin");
    let n = 8;
    let head = json!({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [n, 3, 32, 32],
                    "parameters": {"binary_data_size": images.len() * 4}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}},
                    {"name": "probs", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let (v, binary) = support::post_binary(
        &c,
        format!("{base}/v2/models/classifier/infer"),
        TOKEN,
        &head,
        &f32_bytes(&images),
    )
    .await;
    assert_eq!(v["outputs"][0]["name"], "logits", "{v}");
    assert_eq!(v["outputs"][1]["shape"], json!([n, 10]), "{v}");
    let got = f32s_of(&binary);
    assert_within(&got[..n * 10], &f32_file("conv.out.logits.bin"), "logits");
    assert_within(&got[n * 10..], &f32_file("conv.out.probs.bin"), "probs");

    // REST, JSON: an image of the wrong size is the client's error.
    let (s, _, v) = support::post_json_with(
        &c,
        format!("{base}/v2/models/classifier/infer"),
        TOKEN,
        &json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 2, 2],
                            "data": vec![0.0; 12]}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Ops only ONNX Runtime runs (the default engine on the CPU): each image's channel means,
    // L2-normalised.
    let n = 2;
    let image: Vec<f32> = (0..n * 3 * 64)
        .map(|i| (i % 7) as f32 * 0.5 - 1.0)
        .collect();
    let (s, _, v) = support::post_json_with(
        &c,
        format!("{base}/v2/models/pooled/infer"),
        TOKEN,
        &json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [n, 3, 8, 8],
                            "data": image}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([n, 3]), "{v}");
    let got: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let mut want = Vec::new();
    for row in image.chunks(3 * 64) {
        let means: Vec<f32> = row
            .chunks(64)
            .map(|c| c.iter().sum::<f32>() / 64.0)
            .collect();
        let norm = means.iter().map(|m| m * m).sum::<f32>().sqrt();
        want.extend(means.iter().map(|m| m / norm));
    }
    assert_within(&got, &want, "pooled");

    // QUIC native: the MLP's 64 rows as 8 concurrent requests of 8 rows (the batcher may put
    // them in one batch), each answered with its own rows.
    let x = f32_file("mlp.in.x.bin");
    let y = f32_file("mlp.out.y.bin");
    let client = server.client_with_token(Some(TOKEN)).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        let rows = x[i * 8 * 16..(i + 1) * 8 * 16].to_vec();
        tasks.push(tokio::spawn(async move {
            let input = HostTensor {
                name: "x".into(),
                shape: vec![8, 16],
                data: TensorData::F32(rows),
            };
            let req = request_to_proto("tabular", &i.to_string(), &[input], HashMap::new());
            let resp = client.infer(&req).await.unwrap();
            outputs_from_proto(&resp).unwrap()
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.unwrap();
        assert_eq!(out[0].name, "y");
        assert_eq!(out[0].shape, vec![8, 4]);
        let TensorData::F32(got) = &out[0].data else {
            panic!("y is not FP32");
        };
        assert_within(got, &y[i * 8 * 4..(i + 1) * 8 * 4], "mlp over QUIC");
    }
}

/// Starts `quiver serve` on one onnx model (`extra` added to its table); it must fail, and
/// its stderr is returned.
fn failed_start(path: &std::path::Path, extra: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"refused\"\nkind = \"onnx\"\npath = \"{}\"\n{extra}",
            path.display()
        ),
    )
    .unwrap();
    let out = Command::new(support::quiver_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_graph_with_ops_candle_onnx_cannot_run_stops_start_up_on_it_naming_them() {
    let stderr = failed_start(&onnx_dir().join("refused.onnx"), "engine = \"candle\"\n");
    assert!(
        stderr.contains("GlobalAveragePool") && stderr.contains("LpNormalization"),
        "{stderr}"
    );
}

#[test]
fn a_graph_with_an_op_no_engine_runs_stops_start_up_naming_it() {
    let stderr = failed_start(&onnx_dir().join("custom_op.onnx"), "");
    assert!(
        stderr.contains("ONNX Runtime cannot run the graph") && stderr.contains("Frobnicate"),
        "{stderr}"
    );
}
