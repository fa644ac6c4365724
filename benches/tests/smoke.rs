//! End-to-end smoke run of `quiver-bench`: the real binary against a real
//! gateway, checking that the report files exist and that their counts agree
//! with the requests the schedule sent.
//!
//! The gateway runs in this test's process (`Gateway::start`, the same code
//! `quiver serve` runs), so the test needs no second binary: Cargo builds
//! `quiver-bench` for its own package's integration tests
//! (`CARGO_BIN_EXE_quiver-bench`), but would not build `quiver` from a
//! dependency.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quiver_bench::echo_server::{EchoLimits, EchoServer};
use quiver_config::Config;
use quiver_gateway::serve::Gateway;
use serde_json::Value;

const CONFIG: &str = r#"
[[models]]
name = "identity"
kind = "identity"
max_batch_size = 16
default_timeout_ms = 10000
"#;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver-bench"))
        .args(args)
        .output()
        .expect("quiver-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "quiver-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_sweep_reports_every_request_the_schedule_sent() {
    let mut config = Config::parse(CONFIG).unwrap();
    config.server.quic_listen = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_listen = None;
    let gateway = Gateway::start(&config, None).await.unwrap();
    let target = format!("quic://{}", gateway.quic_addr.expect("serve binds QUIC"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let out_s = out.to_str().unwrap().to_string();
    // Constant arrivals at 40/s and 80/s over a 1 s window after a 0.25 s
    // warm-up: exactly 40 and 80 requests are meant for each window.
    let args: Vec<String> = [
        "run",
        "--target",
        &target,
        "--insecure",
        "--rate",
        "40,80",
        "--arrival",
        "constant",
        "--warmup",
        "0.25",
        "--duration",
        "1",
        "--deadline-us",
        "5000000",
        "--priority",
        "1",
        "--quiet",
        "--out",
        &out_s,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stdout = tokio::task::spawn_blocking(move || {
        bench(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();

    let report = read_json(&out.join("report.json"));
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{stdout}");
    for (step, expected) in steps.iter().zip([40u64, 80]) {
        assert_eq!(step["sent"], expected, "{step}");
        let errors: u64 = step["errors"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(step["ok"].as_u64().unwrap() + errors, expected);
        assert_eq!(errors, 0, "identity answers every request: {step}");
        assert_eq!(step["good"], expected, "well within a 5 s deadline");
        // Quiver reports where and in what batch it served each request.
        assert_eq!(step["overflow_share"], 0.0);
        assert!(step["batch_size_mean"].as_f64().unwrap() >= 1.0);
        assert!(step["p50_us"].as_u64().unwrap() <= step["max_us"].as_u64().unwrap());
    }

    let csv = std::fs::read_to_string(out.join("steps.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "a header and one row per step");
    let sent = rows[0].split(',').position(|c| c == "sent").unwrap();
    let sent: Vec<&str> = rows[1..]
        .iter()
        .map(|r| r.split(',').nth(sent).unwrap())
        .collect();
    assert_eq!(sent, ["40", "80"]);
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert!(svg.contains("<svg"));
    assert!(stdout.contains("40/s const") && stdout.contains("80/s const"));

    gateway.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_against_the_echo_server_and_a_comparison_agree_in_count() {
    let server = EchoServer::bind("127.0.0.1:0".parse().unwrap(), EchoLimits::default()).unwrap();
    let addr = server.local_addr().unwrap();
    let endpoint = server.endpoint.clone();
    tokio::spawn(server.serve());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap().to_string();
    let a = format!("quic-echo://{addr}");
    let args: Vec<String> = [
        "run",
        "--target",
        &a,
        "--compare",
        &a,
        "--insecure",
        "--concurrency",
        "2",
        "--warmup",
        "0.1",
        "--duration",
        "0.5",
        "--quiet",
        "--out",
        &out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stdout = tokio::task::spawn_blocking(move || {
        bench(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let report = read_json(&dir.path().join("report.json"));
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "the step on both targets: {stdout}");
    for s in steps {
        assert!(s["sent"].as_u64().unwrap() > 0);
        assert_eq!(s["ok"], s["sent"], "{s}");
        assert!(s["batch_size_mean"].is_null(), "an echo reports no batch");
    }
    assert_eq!(report["ratios"].as_array().unwrap().len(), 1);
    endpoint.close(0u32.into(), b"done");
}

/// A stand-in KServe v2 REST server: answers like Quiver, with every fifth
/// request refused with 429.
async fn rest_server() -> std::net::SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let count = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/v2/models/{model}/infer",
        axum::routing::post(move |body: axum::body::Bytes| {
            let count = count.clone();
            async move {
                let n = count.fetch_add(1, Ordering::Relaxed);
                let req: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(req["inputs"][0]["name"], "INPUT0");
                if n % 5 == 4 {
                    return (StatusCode::TOO_MANY_REQUESTS, "busy").into_response();
                }
                let resp = serde_json::json!({
                    "model_name": "identity",
                    "parameters": {"quiver_path": "local", "quiver_batch_size": 3},
                    "outputs": [],
                });
                (StatusCode::OK, resp.to_string()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_target_counts_results_and_http_errors_by_status() {
    use quiver_bench::inputs::{RequestPool, Shape, policy_parameters, tensor_payloads};
    use quiver_bench::load::{Load, Progress, StepPlan, run_step};
    use quiver_bench::targets::{ConnectOptions, Target};
    use std::sync::Arc;

    let addr = rest_server().await;
    let pool = RequestPool {
        model: "identity".into(),
        payloads: tensor_payloads("INPUT0", &Shape(vec![1, 4]), 8, 1).unwrap(),
        parameters: policy_parameters(Some(100_000), None),
    };
    let options = ConnectOptions {
        trust: None,
        server_name: None,
        connections: 1,
        binary: false,
        engine_config: None,
        token: None,
    };
    let url = format!("http://{addr}").parse().unwrap();
    let target = Arc::new(Target::connect(&url, &options, &pool).await.unwrap());
    // One client, so the server sees the window's requests in order.
    let plan = StepPlan {
        load: Load::Closed { concurrency: 1 },
        warmup: Duration::ZERO,
        duration: Duration::from_millis(300),
        deadline: None,
        client_timeout: Duration::from_secs(10),
    };
    let rec = run_step(target, &plan, Arc::new(Progress::default())).await;
    assert!(rec.sent >= 5, "sent {}", rec.sent);
    let refused = rec.errors.get("http_429").copied().unwrap_or(0);
    assert_eq!(refused, rec.sent / 5, "{:?}", rec.errors);
    assert_eq!(rec.ok + refused, rec.sent);
    assert_eq!(rec.batch_sizes.get(&3), Some(&rec.ok));
    assert_eq!((rec.path_known, rec.overflow), (rec.ok, 0));
}

/// A gateway on loopback (QUIC, REST and gRPC on free ports, no metrics) that takes the
/// bearer token `bench-s3cret`.
async fn gateway_with_token() -> Gateway {
    let mut config = Config::parse(&format!(
        "[server]\nauth_tokens = [\"bench-s3cret\"]\n{CONFIG}"
    ))
    .unwrap();
    config.server.quic_listen = "127.0.0.1:0".parse().unwrap();
    config.server.http_listen = Some("127.0.0.1:0".parse().unwrap());
    config.server.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    config.server.metrics_listen = None;
    Gateway::start(&config, None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_sends_the_token_as_its_protocol_carries_it() {
    use quiver_bench::inputs::{RequestPool, Shape, tensor_payloads};
    use quiver_bench::load::{Infer, Outcome};
    use quiver_bench::targets::{ConnectOptions, Target};
    use quiver_gateway::tls::Trust;

    let gateway = gateway_with_token().await;
    let quic = gateway.quic_addr.expect("serve binds QUIC");
    let http = gateway.http_addr.expect("REST is on");
    let grpc = gateway.grpc_addr.expect("gRPC is on");
    let pool = RequestPool {
        model: "identity".into(),
        payloads: tensor_payloads("INPUT0", &Shape(vec![1, 4]), 2, 1).unwrap(),
        parameters: Default::default(),
    };
    // The refusal of each protocol when the token is missing or wrong.
    let targets = [
        (format!("quic://{quic}"), "UNAUTHENTICATED"),
        (format!("h3://{quic}"), "http_401"),
        (format!("http://{http}"), "http_401"),
        (format!("h2c://{http}"), "http_401"),
        (format!("grpc://{grpc}"), "UNAUTHENTICATED"),
    ];
    for (url, refusal) in targets {
        for (token, want_ok) in [
            (Some("bench-s3cret"), true),
            (Some("wrong"), false),
            (None, false),
        ] {
            let options = ConnectOptions {
                trust: Some(Trust::Insecure),
                server_name: None,
                connections: 1,
                binary: false,
                engine_config: None,
                token: token.map(str::to_owned),
            };
            let target = Target::connect(&url.parse().unwrap(), &options, &pool)
                .await
                .unwrap();
            for index in 0..2 {
                match target.infer(index).await {
                    Outcome::Ok(_) if want_ok => {}
                    Outcome::Err(kind) if !want_ok => assert_eq!(kind, refusal, "{url}"),
                    other => panic!("{url} with token {token:?}: {other:?}"),
                }
            }
        }
    }
    gateway.shutdown(Duration::from_secs(1)).await;
}

/// The gateway refuses an HTTP/3 request with a wrong token from its headers alone and stops
/// the request stream (H3_NO_ERROR) while the client may still be sending: with a 4 MiB body
/// the client always is. The refusal is the answer (`http_401`), not a transport error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_refusal_before_the_body_is_read_is_the_answer() {
    use quiver_bench::inputs::{RequestPool, Shape, tensor_payloads};
    use quiver_bench::load::{Infer, Outcome};
    use quiver_bench::targets::{ConnectOptions, Target};
    use quiver_gateway::tls::Trust;

    let gateway = gateway_with_token().await;
    let quic = gateway.quic_addr.expect("serve binds QUIC");
    let pool = RequestPool {
        model: "identity".into(),
        // 1 Mi floats, binary: a 4 MiB body.
        payloads: tensor_payloads("INPUT0", &Shape(vec![1024, 1024]), 1, 1).unwrap(),
        parameters: Default::default(),
    };
    let options = ConnectOptions {
        trust: Some(Trust::Insecure),
        server_name: None,
        connections: 1,
        binary: true,
        engine_config: None,
        token: Some("wrong".into()),
    };
    let target = Target::connect(&format!("h3://{quic}").parse().unwrap(), &options, &pool)
        .await
        .unwrap();
    for index in 0..3 {
        match target.infer(index).await {
            Outcome::Err(kind) => assert_eq!(kind, "http_401", "request {index}"),
            other => panic!("request {index}: {other:?}"),
        }
    }
    gateway.shutdown(Duration::from_secs(1)).await;
}
