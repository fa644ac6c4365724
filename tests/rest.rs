//! End to end over KServe v2 REST on TCP (HTTP/1.1 and h2c): the real
//! `quiver` binary, driven with reqwest as any REST client drives it.
#![allow(clippy::unwrap_used)]

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    OIP_CONFIG, OIP_MAX_REQUEST_BYTES, Server, TOKEN, assert_close, assert_reads_as_triton_config,
    f32_bytes, f32s_of, metric, mlp_expected, mlp_rows,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

fn f32_data(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

async fn get(c: &reqwest::Client, url: String) -> (StatusCode, Value) {
    let r = c.get(url).bearer_auth(TOKEN).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

async fn post_json(c: &reqwest::Client, url: String, body: &Value) -> (StatusCode, Value) {
    let (status, _, json) = support::post_json_with(c, url, TOKEN, body).await;
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_config_and_json_infer_over_http1_and_h2c() {
    let server = Server::start(OIP_CONFIG);
    let base = server.http_url();
    for c in [client(), h2c_client()] {
        // Health needs no token (auth_exempt_health).
        let r = c
            .get(format!("{base}/v2/health/live"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = c
            .get(format!("{base}/v2/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = c
            .get(format!("{base}/v2/models/mlp/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);

        let (s, v) = get(&c, format!("{base}/v2")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["name"], "quiver");
        let ext: Vec<&str> = v["extensions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(ext.contains(&"binary_tensor_data") && ext.contains(&"model_configuration"));

        let (s, v) = get(&c, format!("{base}/v2/models/mlp")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            v["inputs"][0],
            json!({"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]})
        );
        assert_eq!(v["outputs"][0]["shape"], json!([-1, 4]));
        let (s, v) = get(&c, format!("{base}/v2/models/identity/versions/1")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["inputs"][0]["shape"], json!([-1, -1]));

        // Triton's model configuration: max_batch_size as configured, dims
        // without the batch dimension.
        let (s, v) = get(&c, format!("{base}/v2/models/mlp/config")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["max_batch_size"], 32);
        assert_eq!(v["input"][0]["dims"], json!([16]));
        assert_eq!(v["input"][0]["data_type"], "TYPE_FP32");
        assert_eq!(v["output"][0]["dims"], json!([4]));
        let (_, v) = get(&c, format!("{base}/v2/models/identity/config")).await;
        assert_eq!(v["max_batch_size"], 64);
        assert_eq!(v["input"][0]["dims"], json!([-1]));
        // Every model's configuration reads as Triton's clients read it.
        for model in ["mlp", "identity"] {
            let (_, meta) = get(&c, format!("{base}/v2/models/{model}")).await;
            let (_, config) = get(&c, format!("{base}/v2/models/{model}/config")).await;
            assert_reads_as_triton_config(&meta, &config);
        }
        // A request larger than a batch is refused first for its size, with
        // the numbers (it used to get a deadline prediction).
        let data = mlp_rows(33);
        let (s, v) = post_json(
            &c,
            format!("{base}/v2/models/mlp/infer"),
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [33, 16], "data": data}]}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("33 rows > max_batch_size 32 of model mlp"),
            "{v}"
        );

        let data = mlp_rows(3);
        let (s, v) = post_json(
            &c,
            format!("{base}/v2/models/mlp/infer"),
            &json!({"id": "r1", "parameters": {"priority": 1, "timeout": 5_000_000},
                    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 16], "data": data}]}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["shape"], json!([3, 4]));
        assert_close(&f32_data(&v["outputs"][0]["data"]), &mlp_expected(&data));
        assert!(v["parameters"]["quiver_batch_size"].as_i64().unwrap() >= 1);

        let (s, v) = post_json(
            &c,
            format!("{base}/v2/models/identity/infer"),
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4.5]]}]}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["outputs"][0]["data"], json!([1.0, 2.0, 3.0, 4.5]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensors_in_and_out() {
    let server = Server::start(OIP_CONFIG);
    let base = server.http_url();
    let c = client();
    let data = mlp_rows(2);
    let head = json!({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                    "parameters": {"binary_data_size": 2 * 16 * 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let (v, binary) = support::post_binary(
        &c,
        format!("{base}/v2/models/mlp/infer"),
        TOKEN,
        &head,
        &f32_bytes(&data),
    )
    .await;
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 2 * 4 * 4);
    assert!(v["outputs"][0].get("data").is_none());
    assert_close(&f32s_of(&binary), &mlp_expected(&data));

    // `binary_data_output` asks for every output in binary, JSON inputs.
    let r = c
        .post(format!("{base}/v2/models/identity/infer"))
        .bearer_auth(TOKEN)
        .json(&json!({"parameters": {"binary_data_output": true},
                      "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    assert_eq!(f32s_of(&bytes[json_len..]), vec![1.0, 2.0, 3.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_the_server_keeps_serving() {
    let server = Server::start(OIP_CONFIG);
    let base = server.http_url();
    let c = client();
    let infer = |m: &str| format!("{base}/v2/models/{m}/infer");
    let good = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": mlp_rows(1)}]});

    // Malformed JSON.
    let r = c
        .post(infer("mlp"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");

    let cases = [
        // Wrong datatype.
        (
            json!({"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [1, 16], "data": vec![1; 16]}]}),
            "mlp",
            StatusCode::BAD_REQUEST,
        ),
        // Wrong shape.
        (
            json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 15], "data": vec![1.0; 15]}]}),
            "mlp",
            StatusCode::BAD_REQUEST,
        ),
        // Data that does not fill the shape.
        (
            json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": vec![1.0; 16]}]}),
            "mlp",
            StatusCode::BAD_REQUEST,
        ),
        // Unknown input name.
        (
            json!({"inputs": [{"name": "NOPE", "datatype": "FP32", "shape": [1, 16], "data": vec![1.0; 16]}]}),
            "mlp",
            StatusCode::BAD_REQUEST,
        ),
        // Unknown model.
        (good.clone(), "no-such-model", StatusCode::NOT_FOUND),
        // More rows than max_batch_size (32).
        (
            json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [33, 16], "data": vec![0.5; 33 * 16]}]}),
            "mlp",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, model, status) in cases {
        let (s, v) = post_json(&c, infer(model), &body).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let (s, _) = get(&c, format!("{base}/v2/models/no-such-model/config")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = get(&c, format!("{base}/v2/models/mlp/versions/7")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A path no route matches is named as such, not as an unknown model.
    let (s, v) = post_json(&c, format!("{base}/v2/embeddings"), &json!({"input": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("no route for POST /v2/embeddings"), "{v}");
    assert!(!error.contains("unknown model"), "{v}");
    // Repository bodies are held to their schema (schemathesis found these
    // read as defaults); an empty or null body is `{}`.
    let (s, v) = post_json(
        &c,
        format!("{base}/v2/repository/index"),
        &json!({"ready": {}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("ready must be a boolean"),
        "{v}"
    );
    let (s, v) = post_json(&c, format!("{base}/v2/repository/index"), &Value::Null).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = post_json(
        &c,
        format!("{base}/v2/repository/models/mlp/load"),
        &json!({"parameters": [null, null]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("parameters must be an object"),
        "{v}"
    );
    // Under /v1 too, in OpenAI's error shape.
    let (s, v) = post_json(&c, format!("{base}/v1/embedding"), &json!({"input": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let error = v["error"]["message"].as_str().unwrap();
    assert!(error.contains("no route for POST /v1/embedding"), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");

    // Oversized body: refused from its Content-Length.
    let big = vec![b' '; OIP_MAX_REQUEST_BYTES + 1];
    let r = c
        .post(infer("mlp"))
        .bearer_auth(TOKEN)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // ... and a chunked one (no Content-Length) once what arrived passes
    // the limit: the answer comes before the client has sent it all.
    assert_eq!(chunked_oversized(server.http).await, 413);

    // Missing or wrong token.
    let r = c.post(infer("mlp")).json(&good).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .get(format!("{base}/v2/models/mlp"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("unauthenticated"),
        "{v}"
    );

    // Still serving.
    let (s, v) = post_json(&c, infer("mlp"), &good).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let text = server.scrape().await;
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "http"), ("outcome", "invalid_argument")]
        ) >= 6.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "quiver_rejections_total",
            &[("protocol", "http"), ("reason", "unauthenticated")]
        ) >= 1.0,
        "{text}"
    );
}

/// Posts a chunked body that never ends within the limit, over raw
/// HTTP/1.1, and returns the status of the answer.
async fn chunked_oversized(addr: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    // Twice the limit at most; the server answers (and may close) first.
    for _ in 0..(2 * OIP_MAX_REQUEST_BYTES / 1024) {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_counted_once_as_cancelled() {
    use tokio::io::AsyncWriteExt;
    // One request fills the batch budget of a model slow enough to keep the
    // device busy while a REST request waits in the queue; its client then
    // closes the connection.
    let server = support::Server::start(support::BIG_MODEL);
    let busy = support::occupy_device(&server).await;
    let body = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1024], "data": vec![0.5; 1024]}]})
        .to_string();
    let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
    s.write_all(
        format!(
            "POST /v2/models/big/infer HTTP/1.1\r\nHost: quiver\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    server
        .wait_for_metrics("the REST request taken in", |t| {
            support::metric(t, "quiver_requests_received_total", &[("protocol", "http")]) >= 1.0
        })
        .await;
    drop(s);
    let text = server
        .wait_for_metrics("the REST request counted as cancelled", |t| {
            support::metric(
                t,
                "quiver_requests_total",
                &[
                    ("model", "big"),
                    ("protocol", "http"),
                    ("outcome", "cancelled"),
                ],
            ) >= 1.0
        })
        .await;
    assert_eq!(
        support::metric(
            &text,
            "quiver_requests_total",
            &[
                ("model", "big"),
                ("protocol", "http"),
                ("outcome", "cancelled")
            ],
        ),
        1.0,
        "{text}"
    );
    busy.await.unwrap().unwrap();
    let text = server.scrape().await;
    assert_eq!(
        support::metric(
            &text,
            "quiver_requests_received_total",
            &[("protocol", "http")]
        ),
        1.0
    );
    // Both requests entered routing; each ended there once (the REST one
    // as cancelled).
    assert_eq!(
        support::metric(&text, "quiver_admitted_requests_total", &[("model", "big")]),
        2.0
    );
    assert_eq!(
        support::metric(&text, "quiver_routed_requests_total", &[("model", "big")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        support::metric(
            &text,
            "quiver_routed_requests_total",
            &[("model", "big"), ("outcome", "cancelled")]
        ),
        1.0,
        "{text}"
    );
}
