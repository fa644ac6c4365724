//! End to end, a gradient-boosted tree model (`kind = "trees"`): the real `quiver` binary
//! serving an XGBoost JSON and a LightGBM text model trained by `scripts/train-trees`,
//! driven over KServe v2 REST; every answer must be the library's own prediction within
//! 1e-5, NaN (missing) rows included (sent as binary tensors: JSON has no NaN).
//!
//! The models come from `scripts/train-trees` (scripts/test runs it); without them these
//! tests fail and say so.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, TOKEN, f32_bytes, f32s_of};

fn trees_dir() -> PathBuf {
    support::generated_models("trees", "tree models", "scripts/train-trees")
}

fn read<T>(path: &Path, width: usize, from: impl Fn(&[u8]) -> T) -> Vec<T> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(width)
        .map(from)
        .collect()
}

fn assert_within(ours: &[f32], theirs: &[f64], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        assert!((f64::from(a) - b).abs() <= 1e-5, "{what}[{i}]: {a} vs {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_infer_on_xgboost_and_lightgbm_models_matches_the_libraries() {
    let dir = trees_dir();
    let features = 12;
    let x: Vec<f32> = read(&dir.join("rows.f32"), 4, |c| {
        f32::from_le_bytes(c.try_into().unwrap())
    });
    let f64s = |name: &str| {
        read(&dir.join(name), 8, |c| {
            f64::from_le_bytes(c.try_into().unwrap())
        })
    };
    let config = format!(
        r#"
[server]
auth_tokens = ["{TOKEN}"]
auth_exempt_health = true

[[models]]
name = "fraud"
kind = "trees"
path = "{}"
max_batch_size = 64
default_timeout_ms = 10000

[[models]]
name = "classes"
kind = "trees"
path = "{}"
output_margin = true
max_batch_size = 64
default_timeout_ms = 10000
"#,
        dir.join("xgb_binary.json").display(),
        dir.join("lgb_multiclass.txt").display()
    );
    let server = Server::start(&config);
    let base = server.http_url();
    let c = reqwest::Client::new();

    let (s, meta): (StatusCode, Value) = {
        let r = c
            .get(format!("{base}/v2/models/fraud"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    };
    assert_eq!(s, StatusCode::OK, "{meta}");
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, features]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1]));

    // JSON: rows without NaN.
    let clean: Vec<usize> = (0..x.len() / features)
        .filter(|&r| {
            x[r * features..(r + 1) * features]
                .iter()
                .all(|v| !v.is_nan())
        })
        .take(5)
        .collect();
    let rows: Vec<Vec<f32>> = clean
        .iter()
        .map(|&r| x[r * features..(r + 1) * features].to_vec())
        .collect();
    let (s, _, v) = support::post_json_with(
        &c,
        format!("{base}/v2/models/fraud/infer"),
        TOKEN,
        &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [5, features], "data": rows}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([5]));
    let got: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap() as f32)
        .collect();
    let pred = f64s("xgb_binary.pred.f64");
    let want: Vec<f64> = clean.iter().map(|&r| pred[r]).collect();
    assert_within(&got, &want, "fraud (JSON)");

    // Binary tensors: the first 40 rows, NaN included; raw scores of a 4-class model.
    let n = 40;
    let data = &x[..n * features];
    assert!(data.iter().any(|v| v.is_nan()));
    let head = json!({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n, features],
                    "parameters": {"binary_data_size": n * features * 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let (v, binary) = support::post_binary(
        &c,
        format!("{base}/v2/models/classes/infer"),
        TOKEN,
        &head,
        &f32_bytes(data),
    )
    .await;
    assert_eq!(v["outputs"][0]["shape"], json!([n, 4]), "{v}");
    let margin = f64s("lgb_multiclass.margin.f64");
    assert_within(&f32s_of(&binary), &margin[..n * 4], "classes (binary)");

    // A row of the wrong width is the client's error, named.
    let (s, _, v) = support::post_json_with(
        &c,
        format!("{base}/v2/models/fraud/infer"),
        TOKEN,
        &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
