//! End to end, ONNX graphs (`kind = "onnx"`): the real `quiver` binary serving the MLP and
//! the small image classifier that `scripts/make-onnx` built, its metadata read from the
//! graph, driven over KServe v2 REST (binary tensors, two outputs) and the QUIC native
//! protocol; every answer must be ONNX Runtime's output within 1e-4. A graph with op types
//! candle-onnx cannot run passes the configuration's checks but stops start-up, naming them.
//!
//! The graphs come from `scripts/make-onnx` (scripts/test runs it); without them these tests
//! fail and say so.
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
"#,
        dir.join("conv.onnx").display(),
        dir.join("mlp.onnx").display()
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

#[test]
fn a_graph_with_ops_candle_onnx_cannot_run_stops_start_up_naming_them() {
    let dir = onnx_dir();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"pooled\"\nkind = \"onnx\"\npath = \"{}\"\n",
            dir.join("refused.onnx").display()
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GlobalAveragePool") && stderr.contains("LpNormalization"),
        "{stderr}"
    );
}
