//! End to end over HTTP/3 on the QUIC port (ALPN `h3`): the real `quiver`
//! binary, driven with an h3-quinn client; the same UDP port serves the
//! QUIC native protocol too.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use serde_json::json;
use support::h3::connect;
use support::{
    OIP_CONFIG, OIP_MAX_REQUEST_BYTES, Server, TOKEN, assert_close, f32_bytes, f32s_of, metric,
    mlp_expected, mlp_rows,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_over_http3_alongside_the_native_protocol() {
    let server = Server::start(OIP_CONFIG);
    let mut h3 = connect(&server).await;

    let live = h3.call("GET", "/v2/health/live", &[], None).await;
    assert_eq!(live.status, 200);
    assert_eq!(h3.get("/v2").await.json()["name"], "quiver");
    let meta = h3.get("/v2/models/mlp").await;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["inputs"][0]["shape"], json!([-1, 16]));
    let cfg = h3.get("/v2/models/mlp/config").await.json();
    assert_eq!(
        (
            cfg["max_batch_size"].clone(),
            cfg["input"][0]["dims"].clone()
        ),
        (json!(32), json!([16]))
    );
    assert_eq!(
        h3.get("/v2/models/identity/config").await.json()["input"][0]["dims"],
        json!([-1])
    );

    // JSON on mlp and identity.
    let data = mlp_rows(2);
    let a = h3
        .post_json(
            "/v2/models/mlp/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": data}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let got: Vec<f32> = a.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_close(&got, &mlp_expected(&data));
    let a = h3
        .post_json(
            "/v2/models/identity/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [7, 8]}]}),
        )
        .await;
    assert_eq!(a.json()["outputs"][0]["data"], json!([7.0, 8.0]));

    // Binary tensors.
    let head = json!({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                    "parameters": {"binary_data_size": 128}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&f32_bytes(&data));
    let a = h3
        .call(
            "POST",
            "/v2/models/mlp/infer",
            &[
                ("authorization", format!("Bearer {TOKEN}")),
                ("inference-header-content-length", head.len().to_string()),
            ],
            Some(body),
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let n: usize = a.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_close(&f32s_of(&a.body[n..]), &mlp_expected(&data));

    // Errors.
    let bad = h3
        .call(
            "POST",
            "/v2/models/mlp/infer",
            &[("authorization", format!("Bearer {TOKEN}"))],
            Some(b"{oops".to_vec()),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string());
    let wrong_shape = h3
        .post_json(
            "/v2/models/mlp/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
        )
        .await;
    assert_eq!(wrong_shape.status, 400);
    let wrong_type = h3
        .post_json(
            "/v2/models/mlp/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [1, 16], "data": vec![1; 16]}]}),
        )
        .await;
    assert_eq!(wrong_type.status, 400);
    let unknown_input = h3
        .post_json(
            "/v2/models/mlp/infer",
            &json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 16], "data": vec![1.0; 16]}]}),
        )
        .await;
    assert_eq!(unknown_input.status, 400);
    assert_eq!(h3.get("/v2/models/nope/config").await.status, 404);
    let no_token = h3
        .call("POST", "/v2/models/mlp/infer", &[], Some(b"{}".to_vec()))
        .await;
    assert_eq!(no_token.status, 401);
    let too_big = h3
        .call(
            "POST",
            "/v2/models/mlp/infer",
            &[("authorization", format!("Bearer {TOKEN}"))],
            Some(vec![b' '; OIP_MAX_REQUEST_BYTES + 1]),
        )
        .await;
    assert_eq!(too_big.status, 413);

    // Still serving on HTTP/3, and the native protocol on the same port.
    let a = h3
        .post_json(
            "/v2/models/identity/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [5]}]}),
        )
        .await;
    assert_eq!(a.status, 200);
    let native = server.client_with_token(Some(TOKEN)).await;
    let t = quiver_kernels::HostTensor::new(
        "INPUT0",
        vec![1, 1],
        quiver_kernels::TensorData::F32(vec![9.0]),
    )
    .unwrap();
    let resp = native
        .infer(&quiver_gateway::tensor::request_to_proto(
            "identity",
            "",
            &[t],
            Default::default(),
        ))
        .await
        .unwrap();
    assert_eq!(f32s_of(&resp.raw_output_contents[0]), vec![9.0]);

    let text = server.scrape().await;
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "h3"), ("outcome", "ok")]
        ) >= 4.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "h3"), ("outcome", "invalid_argument")]
        ) >= 4.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "quiver_rejections_total",
            &[("protocol", "h3"), ("reason", "too_large")]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_request_stream_is_cancelled_and_never_computed() {
    use std::time::Duration;
    // As in the native protocol's test: one request fills the whole batch
    // budget of a model slow enough to keep the device busy while a second
    // request waits in the queue and is cancelled.
    let server = Server::start(support::BIG_MODEL);
    let busy = support::occupy_device(&server).await;

    let mut h3 = connect(&server).await;
    let body = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1024], "data": vec![0.5; 1024]}]})
        .to_string();
    let req = http::Request::post("https://localhost/v2/models/big/infer")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(())
        .unwrap();
    let mut stream = h3.send.send_request(req).await.unwrap();
    stream.send_data(Bytes::from(body)).await.unwrap();
    stream.finish().await.unwrap();
    // Cancel as RFC 9114 says a client does: it will not read the answer.
    stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
    drop(stream);

    let resp = tokio::time::timeout(Duration::from_secs(120), busy)
        .await
        .expect("the big request is answered")
        .unwrap()
        .unwrap();
    assert_eq!(
        quiver_gateway::tensor::response_int(&resp, quiver_gateway::request::params::BATCH_SIZE),
        Some(1),
        "the cancelled request was batched with the big one"
    );
    let text = server
        .wait_for_metrics("the cancelled request skipped in the queue", |t| {
            metric(t, "quiver_cancelled_in_queue_total", &[("model", "big")]) >= 1.0
        })
        .await;
    assert_eq!(
        metric(
            &text,
            "quiver_cancelled_in_queue_total",
            &[("model", "big")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "quiver_requests_total",
            &[
                ("model", "big"),
                ("protocol", "h3"),
                ("outcome", "cancelled")
            ]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "quiver_computed_requests_total", &[("model", "big")]),
        1.0,
        "the cancelled request was computed"
    );

    // The connection still serves.
    let live = h3.call("GET", "/v2/health/live", &[], None).await;
    assert_eq!(live.status, 200);
}
