//! Hostile input, end to end: the real `quiver` binary fed truncated, lying,
//! absurd and malformed requests over REST (HTTP/1.1 and h2c), gRPC and the
//! QUIC native protocol. Each attack must get a clear, typed answer (or a
//! closed stream where nothing can be answered), and after each one the
//! gateway must still answer a normal request correctly; at the end its peak
//! RSS stays under its memory budget plus a stated slack.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use quiver_gateway::error::Code;
use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::inference::model_infer_request::InferInputTensor;
use quiver_gateway::proto::inference::{InferTensorContents, ModelInferRequest};
use quiver_gateway::tensor::{outputs_from_proto, request_to_proto};
use quiver_kernels::{HostTensor, TensorData};
use serde_json::{Value, json};
use support::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The memory budget of the gateway under attack, and what its peak RSS may
/// exceed it by: the binary, its runtime, two small models and the
/// decoded copies of requests (bounded by the budget again).
const BUDGET: u64 = 64 << 20;
const RSS_SLACK: u64 = 384 << 20;

fn config() -> String {
    format!(
        "[server]\nmax_inflight_bytes = {BUDGET}\nmax_frame_bytes = {}\nrequest_read_timeout_ms = 2000\n\
         [[models]]\nname = \"identity\"\nkind = \"identity\"\nmax_batch_size = 64\n\
         [[models]]\nname = \"text\"\nkind = \"identity\"\n",
        16 << 20
    )
}

const BOUND: Duration = Duration::from_secs(10);

// ---- REST --------------------------------------------------------------------------------

/// Sends `head` and `body` on a fresh HTTP/1.1 connection (which asks to be
/// closed after the answer) and returns the status of the answer (0 if the
/// connection closed first). The write side stays open: hyper drops a
/// connection whose client half-closed it, answer or not.
async fn raw_http(server: &Server, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(server.http).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // A peer that refuses early may reset: what it sent still counts.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut buf))
        .await
        .expect("an answer or a close in time");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn post_head(path: &str, content_length: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: quiver\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n{extra}connection: close\r\n\r\n"
    )
}

async fn rest_still_serves(http: &reqwest::Client, server: &Server) {
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        http.post(format!("{}/v2/models/identity/infer", server.http_url()))
            .json(&json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}]}))
            .send(),
    )
    .await
    .expect("a normal request is answered within a second")
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["outputs"][0]["data"], json!([1.5, -2.0]));
}

async fn rest_json(http: &reqwest::Client, server: &Server, body: &Value) -> (u16, Value) {
    let r = http
        .post(format!("{}/v2/models/identity/infer", server.http_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_lies_and_malformed_bodies_and_keeps_serving() {
    let server = Server::start(&config());
    let infer = "/v2/models/identity/infer";
    for http in [
        reqwest::Client::new(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        // JSON nested 100,000 deep.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let r = http
            .post(format!("{}{infer}", server.http_url()))
            .header("content-type", "application/json")
            .body(format!("{{\"inputs\": {deep}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        rest_still_serves(&http, &server).await;

        // Shapes that are negative, zero, overflowing, or disagree with the data.
        for (shape, data) in [
            (json!([-1, 2]), json!([1.0, 2.0])),
            (json!([0, 2]), json!([])),
            (json!([4611686018427387904i64, 4]), json!([1.0])),
            (
                json!([9223372036854775807i64, 9223372036854775807i64]),
                json!([1.0]),
            ),
            (json!([2, 2]), json!([1.0, 2.0, 3.0])),
            (json!([1, 2]), json!(["a", "b"])),
            // Past f32's range: refused, not made infinite.
            (json!([1, 2]), json!([1.0, 1e40])),
        ] {
            let (status, v) = rest_json(
                &http,
                &server,
                &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": data}]}),
            )
            .await;
            assert_eq!(status, 400, "shape {shape}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
        rest_still_serves(&http, &server).await;

        // Unknown model, input and datatype.
        let r = http
            .post(format!("{}/v2/models/nosuch/infer", server.http_url()))
            .json(&json!({"inputs": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        for (name, dtype) in [("NOPE", "FP32"), ("INPUT0", "FP128")] {
            let (status, v) = rest_json(
                &http,
                &server,
                &json!({"inputs": [{"name": name, "datatype": dtype, "shape": [1, 1], "data": [1.0]}]}),
            )
            .await;
            assert_eq!(status, 400, "{name} {dtype}: {v}");
        }
        rest_still_serves(&http, &server).await;
    }

    // Lengths that lie, on raw HTTP/1.1.
    let http = reqwest::Client::new();
    let body =
        br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}"#;
    // Longer than what is sent: the body never completes, and the request
    // read timeout (2 s here) answers it.
    let (status, text) = raw_http(&server, &post_head(infer, "100000", ""), body).await;
    assert_eq!(status, 408, "{text}");
    rest_still_serves(&http, &server).await;
    // Shorter than what is sent: the JSON is cut.
    let (status, text) = raw_http(&server, &post_head(infer, "20", ""), body).await;
    assert_eq!(status, 400, "{text}");
    // Absurd: refused before any byte of the body. A length hyper cannot
    // parse (u64::MAX, negative) it refuses itself as a malformed header.
    let (status, text) = raw_http(&server, &post_head(infer, "1000000000000000", ""), b"").await;
    assert_eq!(status, 413, "{text}");
    for absurd in ["18446744073709551615", "-5"] {
        let (status, text) = raw_http(&server, &post_head(infer, absurd, ""), body).await;
        assert!([400, 413, 431].contains(&status), "{absurd}: {text}");
    }
    rest_still_serves(&http, &server).await;

    // The binary extension's header length lying: past the body, absurd,
    // not a number.
    let len = body.len().to_string();
    for header in ["9999", "18446744073709551615", "x"] {
        let (status, text) = raw_http(
            &server,
            &post_head(
                infer,
                &len,
                &format!("inference-header-content-length: {header}\r\n"),
            ),
            body,
        )
        .await;
        assert_eq!(status, 400, "header length {header}: {text}");
    }
    // A binary tensor whose declared size runs past the end of the body.
    let json_part = br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 4096}}]}"#;
    let mut binary_body = json_part.to_vec();
    binary_body.extend_from_slice(&[0u8; 16]);
    let (status, text) = raw_http(
        &server,
        &post_head(
            infer,
            &binary_body.len().to_string(),
            &format!("inference-header-content-length: {}\r\n", json_part.len()),
        ),
        &binary_body,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // BYTES elements whose length prefix runs past the end.
    let json_part = br#"{"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}"#;
    let mut bytes_body = json_part.to_vec();
    bytes_body.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, b'a', b'b', b'c', b'd']);
    let (status, text) = raw_http(
        &server,
        &post_head(
            "/v2/models/text/infer",
            &bytes_body.len().to_string(),
            &format!("inference-header-content-length: {}\r\n", json_part.len()),
        ),
        &bytes_body,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    rest_still_serves(&http, &server).await;
    let peak = server.peak_rss();
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < BUDGET + RSS_SLACK, "peak RSS {} MiB", peak >> 20);
}

// ---- gRPC --------------------------------------------------------------------------------

fn grpc_input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: HashMap::new(),
        contents: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_malformed_tensors_and_keeps_serving() {
    let server = Server::start(&config());
    let mut c = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let good = || ModelInferRequest {
        model_name: "identity".into(),
        inputs: vec![grpc_input("INPUT0", "FP32", vec![1, 1])],
        raw_input_contents: vec![Bytes::from(2.5f32.to_le_bytes().to_vec())],
        ..Default::default()
    };
    let cases: Vec<(ModelInferRequest, tonic::Code)> = vec![
        (
            ModelInferRequest {
                inputs: vec![grpc_input("INPUT0", "FP32", vec![-3, 1])],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![grpc_input("INPUT0", "FP32", vec![i64::MAX, i64::MAX])],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![grpc_input("INPUT0", "FP32", vec![1, 3])],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![grpc_input("INPUT0", "FP32", vec![1, 1])],
                raw_input_contents: vec![],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![InferInputTensor {
                    contents: Some(InferTensorContents {
                        fp32_contents: vec![1.0, 2.0, 3.0],
                        ..Default::default()
                    }),
                    ..grpc_input("INPUT0", "FP32", vec![1, 1])
                }],
                raw_input_contents: vec![],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                model_name: "text".into(),
                inputs: vec![grpc_input("INPUT0", "BYTES", vec![1])],
                raw_input_contents: vec![Bytes::from_static(b"\xff\xff\xff\x7fabc")],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![grpc_input("INPUT0", "FP99", vec![1, 1])],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                inputs: vec![grpc_input("NOPE", "FP32", vec![1, 1])],
                ..good()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            ModelInferRequest {
                model_name: "nosuch".into(),
                ..good()
            },
            tonic::Code::NotFound,
        ),
        (
            ModelInferRequest {
                raw_input_contents: vec![Bytes::from(vec![0u8; 17 << 20])],
                ..good()
            },
            tonic::Code::OutOfRange,
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let err = c.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), want, "case {i}: {err}");
        let ok = tokio::time::timeout(Duration::from_secs(1), c.model_infer(good()))
            .await
            .expect("a normal request is answered within a second")
            .unwrap()
            .into_inner();
        assert_eq!(ok.raw_output_contents[0].as_ref(), 2.5f32.to_le_bytes());
    }
    let peak = server.peak_rss();
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < BUDGET + RSS_SLACK, "peak RSS {} MiB", peak >> 20);
}

// ---- QUIC native -------------------------------------------------------------------------

async fn quic_still_serves(client: &quiver_gateway::client::Client) {
    let t = HostTensor::new("INPUT0", vec![1, 2], TensorData::F32(vec![4.0, -1.0])).unwrap();
    let req = request_to_proto("identity", "ok", &[t], HashMap::new());
    let resp = tokio::time::timeout(Duration::from_secs(1), client.infer(&req))
        .await
        .expect("a normal request is answered within a second")
        .unwrap();
    match &outputs_from_proto(&resp).unwrap()[0].data {
        TensorData::F32(v) => assert_eq!(v, &[4.0, -1.0]),
        other => panic!("expected FP32, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_native_refuses_lies_and_survives_a_reset_storm() {
    let server = Server::start(&config());
    let client = server.client().await;
    let code = |e: quiver_gateway::client::ClientError| e.code();

    // Length prefixes that lie: longer than the stream, absurd, garbage.
    let mut frame = 1000u32.to_be_bytes().to_vec();
    frame.extend_from_slice(b"short");
    assert_eq!(
        code(client.send_frame(Bytes::from(frame)).await.unwrap_err()),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .send_frame(Bytes::from(u32::MAX.to_be_bytes().to_vec()))
                .await
                .unwrap_err()
        ),
        Some(Code::ResourceExhausted)
    );
    let mut frame = 8u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 8]);
    assert_eq!(
        code(client.send_frame(Bytes::from(frame)).await.unwrap_err()),
        Some(Code::InvalidArgument)
    );
    quic_still_serves(&client).await;

    // Malformed tensors in a well-formed frame.
    for (shape, raw) in [
        (vec![-1i64, 2], vec![0u8; 8]),
        (vec![i64::MAX, 2], vec![0u8; 8]),
        (vec![1, 2], vec![0u8; 7]),
        (vec![0, 2], vec![]),
    ] {
        let req = ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![grpc_input("INPUT0", "FP32", shape.clone())],
            raw_input_contents: vec![Bytes::from(raw)],
            ..Default::default()
        };
        let err = client.infer(&req).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{shape:?}: {err}");
    }
    quic_still_serves(&client).await;

    // 10,000 streams opened and reset at once.
    let conn = client.connection().clone();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let conn = conn.clone();
        tasks.spawn(async move {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                return false;
            };
            let sent = send.write_all(&64u32.to_be_bytes()).await.is_ok();
            let _ = send.reset(0u32.into());
            drop(recv);
            sent
        });
    }
    let opened = tokio::time::timeout(Duration::from_secs(60), async {
        let mut opened = 0;
        while let Some(done) = tasks.join_next().await {
            opened += usize::from(done.unwrap());
        }
        opened
    })
    .await
    .expect("the reset storm ends");
    assert_eq!(opened, 10_000, "streams opened and written to");
    quic_still_serves(&client).await;
    let other = server.client().await;
    quic_still_serves(&other).await;
    let peak = server.peak_rss();
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < BUDGET + RSS_SLACK, "peak RSS {} MiB", peak >> 20);
}

// ---- HTTP/3 ------------------------------------------------------------------------------

async fn h3_still_serves(h3: &mut support::h3::H3) {
    let a = tokio::time::timeout(
        Duration::from_secs(1),
        h3.post_json(
            "/v2/models/identity/infer",
            &json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 4.0]}]}),
        ),
    )
    .await
    .expect("a normal HTTP/3 request is answered within a second");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["outputs"][0]["data"], json!([0.5, 4.0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_refuses_lies_and_malformed_bodies_and_survives_a_reset_storm() {
    let server = Server::start(&config());
    let mut h3 = support::h3::connect(&server).await;
    let infer = "/v2/models/identity/infer";
    let json_type = ("content-type", "application/json".to_string());
    let call = |body: Vec<u8>, extra: Vec<(&'static str, String)>| {
        let mut headers = vec![json_type.clone()];
        headers.extend(extra);
        (headers, body)
    };

    // Garbage, and JSON nested 100,000 deep.
    let deep = format!(
        "{{\"inputs\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for body in [b"\x00\xff garbage".to_vec(), deep.into_bytes()] {
        let (headers, body) = call(body, vec![]);
        let a = h3.call("POST", infer, &headers, Some(body)).await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
        h3_still_serves(&mut h3).await;
    }

    // Shapes negative, overflowing, or disagreeing with the data; unknown
    // input and datatype; unknown model.
    for (name, dtype, shape, data) in [
        ("INPUT0", "FP32", json!([-1, 2]), json!([1.0, 2.0])),
        (
            "INPUT0",
            "FP32",
            json!([9223372036854775807i64, 2]),
            json!([1.0]),
        ),
        ("INPUT0", "FP32", json!([2, 2]), json!([1.0])),
        ("NOPE", "FP32", json!([1, 1]), json!([1.0])),
        ("INPUT0", "FP128", json!([1, 1]), json!([1.0])),
    ] {
        let a = h3
            .post_json(
                infer,
                &json!({"inputs": [{"name": name, "datatype": dtype, "shape": shape, "data": data}]}),
            )
            .await;
        assert_eq!(
            a.status,
            400,
            "{name} {dtype} {shape}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let a = h3
        .post_json("/v2/models/nosuch/infer", &json!({"inputs": []}))
        .await;
    assert_eq!(a.status, 404);
    h3_still_serves(&mut h3).await;

    // Binary tensors whose lengths lie: the header length past the body; a
    // BYTES element whose length runs past the end of its tensor.
    let head = json!({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 1],
        "parameters": {"binary_data_size": 8}}]})
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&1000u32.to_le_bytes());
    body.extend_from_slice(b"abcd");
    for json_len in [head.len() + 100, head.len()] {
        let (headers, body) = call(
            body.clone(),
            vec![("inference-header-content-length", json_len.to_string())],
        );
        let a = h3.call("POST", infer, &headers, Some(body)).await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    }
    h3_still_serves(&mut h3).await;

    // content-length that lies: larger than the body, smaller, absurd.
    let ok =
        br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}"#;
    for (declared, status) in [
        (ok.len() + 10, 400),
        (ok.len() - 10, 400),
        (1usize << 60, 413),
    ] {
        let req = http::Request::post(format!("https://localhost{infer}"))
            .header("content-type", "application/json")
            .header("content-length", declared)
            .body(())
            .unwrap();
        let mut stream = h3.send.send_request(req).await.unwrap();
        let _ = stream.send_data(Bytes::from_static(ok)).await;
        let _ = stream.finish().await;
        let resp = tokio::time::timeout(BOUND, stream.recv_response())
            .await
            .expect("an answer in time");
        match resp {
            Ok(r) => assert_eq!(r.status().as_u16(), status, "content-length {declared}"),
            // h3 itself may refuse a body longer than content-length.
            Err(e) => assert!(declared < ok.len(), "content-length {declared}: {e}"),
        }
    }
    h3_still_serves(&mut h3).await;

    // A body that announces its length and stalls: the request read timeout
    // (2 s here) answers it.
    let req = http::Request::post(format!("https://localhost{infer}"))
        .header("content-type", "application/json")
        .header("content-length", 100_000)
        .body(())
        .unwrap();
    let mut stream = h3.send.send_request(req).await.unwrap();
    stream
        .send_data(Bytes::from_static(b"{\"inputs\""))
        .await
        .unwrap();
    let resp = tokio::time::timeout(BOUND, stream.recv_response())
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 408);
    h3_still_serves(&mut h3).await;

    // 10,000 requests opened and reset, on a second connection.
    let mut abuser = support::h3::connect(&server).await;
    let mut opened = 0u32;
    for i in 0..10_000u32 {
        let req = http::Request::post(format!("https://localhost{infer}"))
            .header("content-type", "application/json")
            .header("content-length", ok.len())
            .body(())
            .unwrap();
        let Ok(mut stream) = abuser.send.send_request(req).await else {
            // The server may close an abusive connection: that is its right.
            break;
        };
        if i % 2 == 0 {
            let _ = stream.send_data(Bytes::from_static(ok)).await;
        }
        stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
        stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
        opened += 1;
    }
    eprintln!("{opened} HTTP/3 requests opened and reset");
    assert_eq!(opened, 10_000, "the server refused to open streams");
    drop(abuser);
    h3_still_serves(&mut h3).await;
    let mut fresh = support::h3::connect(&server).await;
    h3_still_serves(&mut fresh).await;
    rest_still_serves(&reqwest::Client::new(), &server).await;
    let peak = server.peak_rss();
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < BUDGET + RSS_SLACK, "peak RSS {} MiB", peak >> 20);
}

// ---- slow and abusive clients ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_others_are_served() {
    // Headers must arrive within server.header_read_timeout_ms (1.5 s here).
    let server = Server::start(&format!(
        "[server]\nheader_read_timeout_ms = 1500\nmax_connections_per_source = 1000\n{}",
        config().trim_start_matches("[server]\n")
    ));
    let http = reqwest::Client::new();
    // 500 connections each sending a header byte a second, forever.
    // Connected first, one by one (500 SYNs at once would overflow the listen
    // backlog, and a dropped SYN is retried after a second: the kernel's
    // doing, not the gateway's).
    let mut streams = Vec::new();
    for _ in 0..500 {
        streams.push(TcpStream::connect(server.http).await.unwrap());
    }
    let mut slow = tokio::task::JoinSet::new();
    for mut s in streams {
        slow.spawn(async move {
            let head = b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: quiver\r\nx-slow: ";
            for i in 0..60usize {
                let byte = head.get(i).copied().unwrap_or(b'a');
                if s.write_all(&[byte]).await.is_err() {
                    return;
                }
                let mut probe = [0u8; 64];
                // A close, or an answer before the close: either ends it.
                if let Ok(read) =
                    tokio::time::timeout(Duration::from_secs(1), s.read(&mut probe)).await
                {
                    let _ = read;
                    return;
                }
            }
            panic!("a slow connection was held for a minute");
        });
    }
    // Meanwhile a normal client is served.
    for _ in 0..5 {
        rest_still_serves(&http, &server).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut closed = 0;
        while let Some(done) = slow.join_next().await {
            done.unwrap();
            closed += 1;
        }
        closed
    })
    .await
    .expect("every slow connection is closed by the server");
    assert_eq!(closed, 500);
    rest_still_serves(&http, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_is_cut_off() {
    // The whole-request timeout is long (30 s): the rate check (1 KiB/s
    // after a 2 s grace, the defaults) is what ends these.
    let server = Server::start(&config().replace(
        "request_read_timeout_ms = 2000",
        "request_read_timeout_ms = 30000",
    ));
    let http = reqwest::Client::new();
    let infer = "/v2/models/identity/infer";
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.http).await.unwrap();
        slow.spawn(async move {
            s.write_all(post_head(infer, "100000", "").as_bytes())
                .await
                .unwrap();
            let started = std::time::Instant::now();
            // 10 bytes a second, far under 1 KiB/s.
            let mut buf = Vec::new();
            for _ in 0..100 {
                if s.write_all(b"[[[[[[[[[[").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await {
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            (
                started.elapsed(),
                String::from_utf8_lossy(&buf).into_owned(),
            )
        });
    }
    rest_still_serves(&http, &server).await;
    while let Some(done) = slow.join_next().await {
        let (elapsed, text) = done.unwrap();
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("min_body_bytes_per_sec"), "{text}");
        eprintln!("cut off after {elapsed:?}");
    }
    let text = server.scrape().await;
    assert!(
        support::metric(
            &text,
            "quiver_rejections_total",
            &[("protocol", "http"), ("reason", "body_too_slow")]
        ) >= 20.0,
        "{text}"
    );
    // The same over HTTP/3: a body trickled at 10 B/s gets 408 from the
    // rate check, long before the 30 s request timeout.
    let mut h3 = support::h3::connect(&server).await;
    let req = http::Request::post(format!("https://localhost{infer}"))
        .header("content-type", "application/json")
        .header("content-length", 100_000)
        .body(())
        .unwrap();
    let mut stream = h3.send.send_request(req).await.unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        loop {
            if stream
                .send_data(Bytes::from_static(b"[[[[[[[[[["))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let resp = tokio::time::timeout(BOUND, stream.recv_response())
        .await
        .expect("an answer in time")
        .unwrap();
    eprintln!("HTTP/3 slow body answered after {:?}", started.elapsed());
    assert_eq!(resp.status().as_u16(), 408);
    let text = server.scrape().await;
    assert!(
        support::metric(
            &text,
            "quiver_rejections_total",
            &[("protocol", "h3"), ("reason", "body_too_slow")]
        ) >= 1.0,
        "{text}"
    );
    rest_still_serves(&http, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_reset_storm_leaves_other_clients_served() {
    let server = Server::start(&config());
    // 10,000 gRPC calls on one HTTP/2 connection, each cancelled (RST_STREAM)
    // as soon as it is sent.
    let abuser = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000u64 {
        let mut c = abuser.clone();
        tasks.spawn(async move {
            let req = ModelInferRequest {
                model_name: "identity".into(),
                inputs: vec![grpc_input("INPUT0", "FP32", vec![1, 1])],
                raw_input_contents: vec![Bytes::from(1.0f32.to_le_bytes().to_vec())],
                ..Default::default()
            };
            // Cancelled at some point between sending and the answer.
            let after = Duration::from_micros(i % 300);
            let _ = tokio::time::timeout(after, c.model_infer(req)).await;
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .expect("the storm ends");
    // Another client, on its own connection, is served at once.
    let mut c = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let ok = tokio::time::timeout(
        Duration::from_secs(1),
        c.model_infer(ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![grpc_input("INPUT0", "FP32", vec![1, 1])],
            raw_input_contents: vec![Bytes::from(3.0f32.to_le_bytes().to_vec())],
            ..Default::default()
        }),
    )
    .await
    .expect("answered within a second")
    .unwrap()
    .into_inner();
    assert_eq!(ok.raw_output_contents[0].as_ref(), 3.0f32.to_le_bytes());
    let http = reqwest::Client::new();
    rest_still_serves(&http, &server).await;
    let peak = server.peak_rss();
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < BUDGET + RSS_SLACK, "peak RSS {} MiB", peak >> 20);
}
