//! End to end, the embedding APIs clients already call, against the real
//! binary serving all-MiniLM-L6-v2: OpenAI's `/v1/embeddings` and
//! `/v1/models`, text-embeddings-inference's `/embed`, `/tokenize`, `/info`
//! and `/health`, over HTTP/1.1, h2c and HTTP/3, and the OpenAPI document
//! with its page. Their embeddings must be the KServe route's for the same
//! texts (cosine 1 within 1e-6), and the reference's.
//!
//! The model comes from `scripts/fetch-models` (found as `tests/embedding.rs`
//! finds it); without it the test fails and says so.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, TOKEN};

const MODEL: &str = "all-MiniLM-L6-v2";
/// The same weights with `auto_truncate = false`.
const STRICT: &str = "minilm-strict";

fn model_dir() -> PathBuf {
    support::minilm_dir()
}

fn start() -> Server {
    let dir = model_dir();
    let dir = dir.to_str().unwrap();
    // A 60 s deadline: results, not latency, on a CPU shared with builds.
    Server::start(&format!(
        r#"
[server]
auth_tokens = ["{TOKEN}"]
auth_exempt_health = true

[[models]]
name = "{MODEL}"
kind = "embedding"
path = "{dir}"
default_timeout_ms = 60000

[[models]]
name = "{STRICT}"
kind = "embedding"
path = "{dir}"
auto_truncate = false
default_timeout_ms = 60000
"#
    ))
}

fn clients() -> [reqwest::Client; 2] {
    [
        reqwest::Client::new(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ]
}

async fn post(
    c: &reqwest::Client,
    url: String,
    body: &Value,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    support::post_json_with(c, url, TOKEN, body).await
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn assert_same(a: &[f32], b: &[f32], what: &str) {
    let c = cosine(a, b);
    assert!((1.0 - c).abs() <= 1e-6, "{what}: cosine {c:.9}");
}

/// The texts' embeddings from the KServe route (JSON), and the response body's size.
async fn kserve(c: &reqwest::Client, base: &str, texts: &[&str]) -> (Vec<Vec<f32>>, usize) {
    let body = json!({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [texts.len()], "data": texts}]
    });
    let r = c
        .post(format!("{base}/v2/models/{MODEL}/infer"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let out = &v["outputs"][0];
    assert_eq!(out["shape"], json!([texts.len(), 384]));
    let flat = floats(&out["data"]);
    (
        flat.chunks_exact(384).map(<[f32]>::to_vec).collect(),
        bytes.len(),
    )
}

const TEXTS: [&str; 3] = [
    "A man is eating food.",
    "The new movie is awesome",
    "Edge gateways batch requests for the accelerator.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_tei_embeddings_are_the_kserve_routes() {
    let server = start();
    let base = server.http_url();
    for c in clients() {
        let (want, kserve_bytes) = kserve(&c, &base, &TEXTS).await;
        // Shortest f32 floats: 384 values of ~10 characters, not ~20.
        assert!(
            kserve_bytes < 3 * 6_000,
            "{kserve_bytes} bytes for 3 MiniLM embeddings in KServe JSON"
        );

        // OpenAI, float: many strings and one.
        let (s, h, v) = post(
            &c,
            format!("{base}/v1/embeddings"),
            &json!({"model": MODEL, "input": TEXTS, "user": "ignored"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], MODEL);
        assert_eq!(h["x-quiver-truncated"], "0");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            assert_same(&floats(&d["embedding"]), &want[i], "openai float");
        }
        // Real token counts: what /tokenize says the texts take.
        let (s, _, tokens) = post(
            &c,
            format!("{base}/tokenize"),
            &json!({"inputs": TEXTS, "model": MODEL}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{tokens}");
        let counted: usize = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_array().unwrap().len())
            .sum();
        assert_eq!(v["usage"]["prompt_tokens"], counted);
        assert_eq!(v["usage"]["total_tokens"], counted);
        let first = &tokens[0];
        assert_eq!(first[0]["text"], "[CLS]");
        assert_eq!(first[0]["special"], true);
        assert_eq!(first[1]["text"], "A");
        assert_eq!(first[1]["start"], 0);
        assert_eq!(first[1]["stop"], 1);

        // OpenAI, base64 of little-endian f32, one string.
        let (s, _, v) = post(
            &c,
            format!("{base}/v1/embeddings"),
            &json!({"model": MODEL, "input": TEXTS[1], "encoding_format": "base64"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_same(&decoded, &want[1], "openai base64");

        // Matryoshka: the first 64 values, normalised again.
        let (s, _, v) = post(
            &c,
            format!("{base}/v1/embeddings"),
            &json!({"model": MODEL, "input": TEXTS[0], "dimensions": 64}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let cut = floats(&v["data"][0]["embedding"]);
        assert_eq!(cut.len(), 64);
        assert_same(&cut, &want[0][..64], "dimensions 64");
        let norm: f32 = cut.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");

        // TEI's /embed.
        let (s, _, v) = post(
            &c,
            format!("{base}/embed"),
            &json!({"inputs": TEXTS, "model": MODEL}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for (i, e) in v.as_array().unwrap().iter().enumerate() {
            assert_same(&floats(e), &want[i], "tei embed");
        }
    }

    // The same over HTTP/3.
    let mut h3 = support::h3::connect(&server).await;
    let a = h3
        .post_json("/v1/embeddings", &json!({"model": MODEL, "input": TEXTS}))
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let (want, _) = kserve(&reqwest::Client::new(), &base, &TEXTS).await;
    for (i, d) in a.json()["data"].as_array().unwrap().iter().enumerate() {
        assert_same(&floats(&d["embedding"]), &want[i], "openai over h3");
    }
    let a = h3
        .post_json("/embed", &json!({"inputs": TEXTS[2], "model": MODEL}))
        .await;
    assert_eq!(a.status, 200);
    assert_same(&floats(&a.json()[0]), &want[2], "tei over h3");
    // Refused before the handler (no token) still in OpenAI's shape.
    let a = h3
        .call(
            "POST",
            "/v1/embeddings",
            &[("content-type", "application/json".into())],
            Some(
                json!({"model": MODEL, "input": "x"})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    let a = h3.get("/info?model=minilm-strict").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["auto_truncate"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_is_a_choice_and_errors_are_typed() {
    let server = start();
    let base = server.http_url();
    let c = reqwest::Client::new();
    let long = "edge gateways batch requests for the accelerator ".repeat(60);
    let embed = format!("{base}/embed");
    let openai = format!("{base}/v1/embeddings");

    let (_, _, tokens) = post(
        &c,
        format!("{base}/tokenize"),
        &json!({"inputs": long, "model": MODEL}),
    )
    .await;
    let count = tokens[0].as_array().unwrap().len();
    assert!(count > 256, "{count} tokens");
    let too_long = format!("element 1 has {count} tokens");

    // auto_truncate (default true): cut, and said so.
    let (s, h, v) = post(
        &c,
        embed.clone(),
        &json!({"inputs": [long, "short"], "model": MODEL}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h["x-quiver-truncated"], "1");
    // truncate: false refuses with the numbers.
    let (s, _, v) = post(
        &c,
        embed.clone(),
        &json!({"inputs": ["short", long], "model": MODEL, "truncate": false}),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let message = v["error"].as_str().unwrap();
    assert!(
        message.contains(&too_long) && message.contains("limit of 256"),
        "{v}"
    );
    assert_eq!(v["error_type"], "validation");
    // Left truncation keeps the end: not the right cut's embedding.
    let (_, _, right) = post(&c, embed.clone(), &json!({"inputs": long, "model": MODEL})).await;
    let (s, _, left) = post(
        &c,
        embed.clone(),
        &json!({"inputs": long, "model": MODEL, "truncation_direction": "Left"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{left}");
    assert!(cosine(&floats(&right[0]), &floats(&left[0])) < 0.9999);

    // A model with auto_truncate = false refuses unless the request asks.
    let (s, _, v) = post(&c, embed.clone(), &json!({"inputs": long, "model": STRICT})).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (s, h, _) = post(
        &c,
        embed.clone(),
        &json!({"inputs": long, "model": STRICT, "truncate": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["x-quiver-truncated"], "1");
    let (s, _, v) = post(&c, openai.clone(), &json!({"model": STRICT, "input": long})).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{count} tokens")),
        "{v}"
    );
    // ... and the KServe route, as a request parameter.
    let kserve = |truncate: Option<bool>| {
        let mut body = json!({
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [long]}]
        });
        if let Some(t) = truncate {
            body["parameters"] = json!({ "truncate": t });
        }
        body
    };
    let (s, _, v) = post(
        &c,
        format!("{base}/v2/models/{STRICT}/infer"),
        &kserve(None),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (s, _, v) = post(
        &c,
        format!("{base}/v2/models/{STRICT}/infer"),
        &kserve(Some(true)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["parameters"]["quiver_truncated"], 1);
    let (s, _, v) = post(
        &c,
        format!("{base}/v2/models/{MODEL}/infer"),
        &kserve(Some(false)),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");

    // More rows than a batch takes: both numbers.
    let many: Vec<String> = (0..33).map(|i| format!("text {i}")).collect();
    let (s, _, v) = post(&c, openai.clone(), &json!({"model": MODEL, "input": many})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("33 rows > max_batch_size 32"), "{v}");

    // OpenAI's error shape, with the KServe routes' statuses.
    let (s, _, v) = post(&c, openai.clone(), &json!({"model": "nope", "input": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for (body, param) in [
        (
            json!({"model": MODEL, "input": [[101, 2000, 102]]}),
            "input",
        ),
        (
            json!({"model": MODEL, "input": "x", "dimensions": 385}),
            "dimensions",
        ),
        (json!({"model": MODEL, "input": []}), "input"),
    ] {
        let (s, _, v) = post(&c, openai.clone(), &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (s, _, v) = post(
        &c,
        openai.clone(),
        &json!({"model": MODEL, "input": "x", "encoding_format": "hex"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant"),
        "{v}"
    );
    // The bearer token is the other routes'.
    let r = c
        .post(openai.clone())
        .json(&json!({"model": MODEL, "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    // TEI without `model` where two text models serve: say which.
    let (s, _, v) = post(&c, embed.clone(), &json!({"inputs": "x"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains(STRICT), "{v}");
    // normalize=false cannot be honoured by a model that normalises itself.
    let (s, _, v) = post(
        &c,
        embed.clone(),
        &json!({"inputs": "x", "model": MODEL, "normalize": false}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // /v1/models, /info, /health, the document and its page.
    let get = |path: &str| c.get(format!("{base}{path}")).bearer_auth(TOKEN).send();
    let v: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, STRICT]);
    let v: Value = get("/info?model=all-MiniLM-L6-v2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model_id"], MODEL);
    assert_eq!(v["max_input_length"], 256);
    assert_eq!(v["max_client_batch_size"], 32);
    assert_eq!(v["auto_truncate"], true);
    assert_eq!(v["model_type"]["embedding"]["pooling"], "mean");
    let r = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "health needs no token");
    let r = c.get(format!("{base}/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let r = c.get(format!("{base}/docs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("docs/redoc.standalone.js"));
    let r = c
        .get(format!("{base}/docs/redoc.standalone.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().len() > 500_000);
    // A wrong method is a JSON error too.
    let r = c
        .get(openai.clone())
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
}

/// A `quiver worker` serving the model with `auto_truncate = false`; killed
/// when dropped.
struct Worker {
    child: std::process::Child,
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strict_worker() -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\n\
             metrics_listen = \"127.0.0.1:0\"\n\n[[models]]\nname = \"{MODEL}\"\n\
             kind = \"embedding\"\npath = \"{}\"\nauto_truncate = false\n\
             default_timeout_ms = 60000\n",
            model_dir().display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(support::quiver_bin())
        .arg("worker")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = support::wait_ready(&mut child);
    let find = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .expect("address printed")
            .trim()
            .parse()
            .unwrap()
    };
    Worker {
        grpc: find("quiver: gRPC listening on tcp "),
        http: find("quiver: REST (HTTP/1.1, h2c) listening on http://"),
        child,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowed_request_keeps_its_truncation() {
    // The worker refuses long texts unless a request asks to cut them; the
    // gateway's upstream-only model cuts them by default (auto_truncate), so
    // its requests must carry that choice (and its direction) upstream.
    let worker = strict_worker();
    let dir = model_dir();
    let server = Server::start(&format!(
        r#"
[server]
auth_tokens = ["{TOKEN}"]

[[models]]
name = "{MODEL}"
kind = "embedding"
path = "{dir}"
default_timeout_ms = 60000

[[models]]
name = "minilm-up"
kind = "embedding"
path = "{dir}"
routing = "upstream-only"
default_timeout_ms = 60000
[models.upstream]
endpoints = ["grpc://{grpc}"]
model = "{MODEL}"
"#,
        dir = dir.display(),
        grpc = worker.grpc,
    ));
    let base = server.http_url();
    let c = reqwest::Client::new();
    let long = "edge gateways batch requests for the accelerator ".repeat(60);
    // The worker alone refuses the long text ...
    let r = c
        .post(format!("http://{}/embed", worker.http))
        .json(&json!({ "inputs": long }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // ... and the gateway's upstream-only model does send it there.
    let (s, _, v) = post(
        &c,
        format!("{base}/v2/models/minilm-up/infer"),
        &json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["parameters"]["quiver_path"], "upstream", "{v}");
    for side in ["Right", "Left"] {
        let body =
            |model: &str| json!({"inputs": long, "model": model, "truncation_direction": side});
        let (s, _, local) = post(&c, format!("{base}/embed"), &body(MODEL)).await;
        assert_eq!(s, StatusCode::OK, "{local}");
        let (s, h, up) = post(&c, format!("{base}/embed"), &body("minilm-up")).await;
        assert_eq!(s, StatusCode::OK, "{side}: {up}");
        assert_eq!(
            h["x-quiver-truncated"], "1",
            "counted here for an upstream answer"
        );
        assert_same(
            &floats(&up[0]),
            &floats(&local[0]),
            &format!("{side} cut upstream"),
        );
    }
    // Usage of an answer that came back untokenized: counted here, after the cut.
    let (s, _, v) = post(
        &c,
        format!("{base}/v1/embeddings"),
        &json!({"model": "minilm-up", "input": long}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 256, "{v}");
}
