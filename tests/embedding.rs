//! End to end, a real sentence-embedding model: `quiver serve --model
//! models/all-MiniLM-L6-v2` (no configuration file), driven over the QUIC
//! native protocol with BYTES `text` inputs. Every embedding that comes back
//! must match the reference that sentence-transformers computed
//! (`../shared/testdata/minilm_reference.json`), whether its request was
//! batched alone or with requests of very different lengths.
//!
//! The model comes from `scripts/fetch-models` (CI runs it); without it the
//! test fails and says so.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use quiver_gateway::request::params;
use quiver_gateway::tensor::{int_param, outputs_from_proto, request_to_proto};
use quiver_kernels::{HostTensor, TensorData};
use support::{Server, metric, quiver_bin};

const MODEL_NAME: &str = "all-MiniLM-L6-v2";

fn workspace() -> PathBuf {
    support::workspace()
}

fn model_dir() -> PathBuf {
    support::minilm_dir()
}

/// The reference sentences and embeddings.
fn reference() -> (Vec<String>, Vec<Vec<f64>>) {
    let path = match std::env::var_os("QUIVER_TESTDATA") {
        Some(p) if Path::new(&p).is_dir() => Path::new(&p).join("minilm_reference.json"),
        Some(p) => PathBuf::from(p),
        None => workspace().join("../shared/testdata/minilm_reference.json"),
    };
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("reference {}: {e} (set QUIVER_TESTDATA)", path.display()));
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let sentences = json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let embeddings = json["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    (sentences, embeddings)
}

/// A 60 s deadline: this test checks results, not latency, and a CPU
/// shared with builds may take seconds per batch (the default is 1 s, and
/// the admission prediction rejects what cannot make it).
fn patient() -> HashMap<String, quiver_gateway::proto::InferParameter> {
    let mut p = HashMap::new();
    p.insert(params::TIMEOUT.to_string(), int_param(60_000_000));
    p
}

fn texts(texts: &[&str]) -> HostTensor {
    let data = TensorData::Bytes(texts.iter().map(|t| t.as_bytes().to_vec()).collect());
    HostTensor::new("text", vec![texts.len()], data).unwrap()
}

/// Cosine ≥ 0.9999 and max abs difference ≤ 1e-4 against `want`.
fn check(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: width");
    let dot: f64 = got.iter().zip(want).map(|(&a, &b)| f64::from(a) * b).sum();
    let na = got
        .iter()
        .map(|&a| f64::from(a).powi(2))
        .sum::<f64>()
        .sqrt();
    let nb = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    let cosine = dot / (na * nb);
    let diff = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    assert!(
        cosine >= 0.9999 && diff <= 1e-4,
        "{what}: cosine {cosine:.7}, max abs diff {diff:.2e}"
    );
}

/// The `embedding` rows of a response.
fn embeddings(resp: &quiver_gateway::proto::ModelInferResponse) -> Vec<Vec<f32>> {
    let out = outputs_from_proto(resp).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "embedding");
    let TensorData::F32(v) = &out[0].data else {
        panic!("embedding is not FP32");
    };
    assert_eq!(out[0].shape.len(), 2);
    assert_eq!(out[0].shape[1], 384);
    v.chunks_exact(384).map(<[f32]>::to_vec).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_served_from_its_directory_matches_the_reference() {
    let dir = model_dir();
    let server = Server::start_args(&["--model", dir.to_str().unwrap()]);
    let client = server.client().await;
    let (sentences, want) = reference();
    let long = "edge gateways batch requests for the accelerator ".repeat(60);

    // Every reference sentence alone, all of them in one request, and
    // truncated 256-token texts, all at once: batches mix lengths from 3 to
    // 256 tokens.
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (i, s) in sentences.iter().enumerate() {
            let c = client.clone();
            let input = texts(&[s]);
            tasks.push(tokio::spawn(async move {
                let id = format!("{round}-{i}");
                let req = request_to_proto(MODEL_NAME, &id, &[input], patient());
                let resp = c.infer(&req).await.unwrap();
                assert_eq!(resp.id, id);
                (vec![Some(i)], embeddings(&resp))
            }));
        }
        let c = client.clone();
        let all: Vec<&str> = sentences.iter().map(String::as_str).collect();
        let input = texts(&all);
        let n = sentences.len();
        tasks.push(tokio::spawn(async move {
            let req = request_to_proto(MODEL_NAME, "all", &[input], patient());
            let resp = c.infer(&req).await.unwrap();
            ((0..n).map(Some).collect(), embeddings(&resp))
        }));
        let c = client.clone();
        let input = texts(&[&long, "x"]);
        tasks.push(tokio::spawn(async move {
            let req = request_to_proto(MODEL_NAME, "long", &[input], patient());
            let resp = c.infer(&req).await.unwrap();
            (vec![None, None], embeddings(&resp))
        }));
    }
    let mut checked = 0;
    for t in tasks {
        let (which, rows) = t.await.unwrap();
        assert_eq!(which.len(), rows.len());
        for (i, row) in which.into_iter().zip(rows) {
            match i {
                Some(i) => {
                    check(
                        &row,
                        &want[i],
                        &format!("sentence {i} ({:?})", sentences[i]),
                    );
                    checked += 1;
                }
                None => {
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
                }
            }
        }
    }
    assert_eq!(checked, 3 * 2 * sentences.len());

    // The padding of those mixed batches is counted: every real token once,
    // and the padded ones at least as many.
    let text = server.scrape().await;
    let padded = metric(&text, "quiver_padded_tokens_total", &[]);
    let real = metric(&text, "quiver_real_tokens_total", &[]);
    assert!(real > 0.0, "{text}");
    assert!(padded >= real, "padded {padded} < real {real}");

    // Malformed text is the client's error, not the server's.
    let bad = HostTensor::new("text", vec![1], TensorData::Bytes(vec![vec![0xff]])).unwrap();
    let req = request_to_proto(MODEL_NAME, "bad", &[bad], patient());
    let err = client.infer(&req).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(quiver_gateway::error::Code::InvalidArgument),
        "{err}"
    );
}

#[test]
fn serve_model_rejects_a_directory_that_holds_no_model() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(quiver_bin())
        .args(["serve", "--model"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a model directory"), "{stderr}");

    let out = Command::new(quiver_bin())
        .args(["serve", "--model", "/nonexistent/quiver-model"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}

/// Triton's clients (perf_analyzer, tritonclient) make the text input's shape
/// from the model configuration: `dims` must say one text per row (`[1]`, the
/// batch dimension implicit), over REST and gRPC; requests shaped `[n, 1]` as
/// they send them and `[n]` as KServe clients do both work; a request larger
/// than a batch is refused for its size, with the numbers, whatever its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_config_reads_as_triton_clients_read_it() {
    use quiver_gateway::proto::inference::ModelConfigRequest;
    use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use serde_json::{Value, json};

    let dir = model_dir();
    let server = Server::start_args(&["--model", dir.to_str().unwrap()]);
    let base = server.http_url();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.json::<Value>().await.unwrap()
        }
    };
    let meta = get(format!("{base}/v2/models/{MODEL_NAME}")).await;
    let config = get(format!("{base}/v2/models/{MODEL_NAME}/config")).await;
    support::assert_reads_as_triton_config(&meta, &config);
    assert_eq!(config["input"][0]["dims"], json!([1]));
    assert_eq!(config["input"][0]["data_type"], "TYPE_STRING");
    assert_eq!(config["output"][0]["dims"], json!([384]));

    let mut grpc = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let cfg = grpc
        .model_config(ModelConfigRequest {
            name: MODEL_NAME.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert!(cfg.max_batch_size > 0);
    assert_eq!(cfg.input[0].dims, vec![1]);
    assert_eq!(cfg.output[0].dims, vec![384]);

    let (sentences, want) = reference();
    let infer = |shape: Value, texts: Vec<&str>, timeout_us: Option<u64>| {
        let http = http.clone();
        let mut body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": texts}]});
        if let Some(t) = timeout_us {
            body["parameters"] = json!({"timeout": t});
        }
        let url = format!("{base}/v2/models/{MODEL_NAME}/infer");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    for shape in [json!([2, 1]), json!([2])] {
        let (status, v) = infer(
            shape.clone(),
            vec![sentences[0].as_str(), sentences[1].as_str()],
            Some(60_000_000),
        )
        .await;
        assert!(status.is_success(), "{shape}: {status} {v}");
        assert_eq!(v["outputs"][0]["shape"], json!([2, 384]), "{shape}");
        let data: Vec<f32> = v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        check(&data[..384], &want[0], &format!("{shape} row 0"));
        check(&data[384..], &want[1], &format!("{shape} row 1"));
    }

    // 40 sentences: more rows than a batch holds. With the default deadline
    // and with a long one, the answer is the same: the size, with the numbers.
    let many: Vec<&str> = (0..40)
        .map(|i| sentences[i % sentences.len()].as_str())
        .collect();
    for timeout in [None, Some(600_000_000)] {
        let (status, v) = infer(json!([40, 1]), many.clone(), timeout).await;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("40 rows > max_batch_size 32 of model all-MiniLM-L6-v2"),
            "{v}"
        );
    }
}
