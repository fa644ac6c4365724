//! End to end: `/metrics` on the metrics listener moves with the requests
//! sent over REST and gRPC, and exports the latency histograms, their
//! p50/p90/p99, queue depth, batch and rejection counters.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use quiver_gateway::proto::inference::ModelInferRequest;
use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::inference::model_infer_request::InferInputTensor;
use serde_json::json;
use support::{OIP_CONFIG, Server, TOKEN, f32_bytes, metric, mlp_rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_the_requests_sent() {
    let server = Server::start(OIP_CONFIG);
    let before = server.scrape().await;
    let ok = |text: &str, protocol: &str| {
        metric(
            text,
            "quiver_requests_total",
            &[("model", "mlp"), ("protocol", protocol), ("outcome", "ok")],
        )
    };
    assert_eq!(ok(&before, "http"), 0.0);

    let http = reqwest::Client::new();
    let url = format!("{}/v2/models/mlp/infer", server.http_url());
    for _ in 0..5 {
        let r = http
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": mlp_rows(2)}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/v2/models/nope/infer", server.http_url()))
        .bearer_auth(TOKEN)
        .json(&json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let mut grpc = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    for _ in 0..3 {
        let mut req = tonic::Request::new(ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 16],
                parameters: Default::default(),
                contents: None,
            }],
            raw_input_contents: vec![Bytes::from(f32_bytes(&mlp_rows(1)))],
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        grpc.model_infer(req).await.unwrap();
    }

    let after = server.scrape().await;
    assert_eq!(ok(&after, "http"), 5.0, "{after}");
    assert_eq!(ok(&after, "grpc"), 3.0, "{after}");
    assert_eq!(
        metric(
            &after,
            "quiver_rejections_total",
            &[("protocol", "http"), ("reason", "unauthenticated")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "quiver_requests_total",
            &[("protocol", "http"), ("outcome", "unknown_model")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "quiver_rejections_total",
            &[("protocol", "http"), ("reason", "unknown_model")]
        ),
        1.0,
        "{after}"
    );
    // Durations: histogram counts and quantiles, by model.
    assert_eq!(
        metric(
            &after,
            "quiver_request_duration_seconds_count",
            &[("model", "mlp")]
        ),
        8.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "quiver_request_duration_seconds_bucket",
            &[("model", "mlp"), ("le", "+Inf")]
        ),
        8.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "quiver_queue_duration_seconds_count",
            &[("model", "mlp")]
        ),
        8.0,
        "{after}"
    );
    let p99 = metric(
        &after,
        "quiver_request_duration_quantile_seconds",
        &[("model", "mlp"), ("quantile", "0.99")],
    );
    let p50 = metric(
        &after,
        "quiver_request_duration_quantile_seconds",
        &[("model", "mlp"), ("quantile", "0.5")],
    );
    assert!(p99 > 0.0 && p99 >= p50, "p50 {p50} p99 {p99}\n{after}");
    assert!(
        metric(
            &after,
            "quiver_compute_duration_seconds_count",
            &[("model", "mlp")]
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &after,
            "quiver_computed_requests_total",
            &[("model", "mlp")]
        ),
        8.0,
        "{after}"
    );
    assert!(metric(&after, "quiver_batches_total", &[("model", "mlp")]) >= 1.0);
    assert!(
        after.contains("quiver_queue_depth{model=\"mlp\",version=\"1\",device=\"cpu\"}"),
        "{after}"
    );
    // The start-up calibration's fit, one gauge per term; a batch costs
    // something, so the fit's total for one row is positive.
    let term = |t: &str| {
        metric(
            &after,
            "quiver_latency_model_seconds",
            &[("model", "mlp"), ("term", t)],
        )
    };
    for t in ["fixed", "per_row", "per_token"] {
        assert!(
            after.contains(&format!(
                "quiver_latency_model_seconds{{model=\"mlp\",version=\"1\",device=\"cpu\",term=\"{t}\"}}"
            )),
            "{after}"
        );
    }
    assert!(term("fixed") + term("per_row") + term("per_token") > 0.0);
}
