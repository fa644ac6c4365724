//! End to end over the QUIC native protocol: the real `quiver` binary on
//! loopback, driven by the Rust client as users drive it.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_gateway::error::Code;
use quiver_gateway::request::params;
use quiver_gateway::tensor::{int_param, outputs_from_proto, request_to_proto, response_int};
use quiver_kernels::{Activation, Device, HostTensor, ModelSpec, TensorData};
use support::{Server, metric};

const SMALL: &str = r#"
[[models]]
name = "identity"
kind = "identity"
max_batch_size = 64
priority_levels = 2
default_timeout_ms = 10000

[[models]]
name = "mlp"
kind = "mlp"
max_batch_size = 64
priority_levels = 2
default_timeout_ms = 10000
[models.demo]
inputs = 64
hidden = [512, 512]
outputs = 8
activation = "relu"
seed = 7
"#;

fn mlp_reference() -> Arc<dyn quiver_kernels::Model> {
    quiver_kernels::load(
        &ModelSpec::MlpDemo {
            inputs: 64,
            hidden: vec![512, 512],
            outputs: 8,
            activation: Activation::Relu,
            seed: 7,
        },
        &Device::Cpu,
    )
    .unwrap()
}

fn f32_tensor(name: &str, shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
    HostTensor::new(name, shape, TensorData::F32(data)).unwrap()
}

fn schedule(
    priority: i64,
    timeout_us: i64,
) -> HashMap<String, quiver_gateway::proto::InferParameter> {
    let mut p = HashMap::new();
    p.insert(params::PRIORITY.to_string(), int_param(priority));
    p.insert(params::TIMEOUT.to_string(), int_param(timeout_us));
    p
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        other => panic!("expected FP32, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_from_fifty_streams_each_get_one_right_answer() {
    let server = Server::start(SMALL);
    let client = server.client().await;
    let reference = mlp_reference();

    let mut tasks = Vec::new();
    for task in 0..50u32 {
        let client = client.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            let mut batch_sizes = Vec::new();
            for i in 0..20u32 {
                let n = task * 20 + i;
                let priority = i64::from(n % 2) + 1;
                let timeout_us = 2_000_000 + i64::from(n % 5) * 2_000_000;
                let parameters = schedule(priority, timeout_us);
                if n % 2 == 0 {
                    let data: Vec<f32> = (0..8).map(|k| (n * 8 + k) as f32).collect();
                    let input = f32_tensor("INPUT0", vec![1, 8], data.clone());
                    let req = request_to_proto("identity", &n.to_string(), &[input], parameters);
                    let resp = client.infer(&req).await.unwrap();
                    assert_eq!(resp.id, n.to_string());
                    let out = outputs_from_proto(&resp).unwrap();
                    assert_eq!(out.len(), 1);
                    assert_eq!(out[0].name, "OUTPUT0");
                    assert_eq!(out[0].shape, vec![1, 8]);
                    assert_eq!(f32s(&out[0]), data.as_slice());
                    batch_sizes.push(response_int(&resp, params::BATCH_SIZE).unwrap());
                } else {
                    let data: Vec<f32> = (0..128)
                        .map(|k| ((n + k) % 17) as f32 / 8.0 - 1.0)
                        .collect();
                    let input = f32_tensor("INPUT0", vec![2, 64], data);
                    let expected = reference
                        .forward(&[reference.prepare(vec![input.clone()]).unwrap()])
                        .unwrap();
                    let req = request_to_proto("mlp", &n.to_string(), &[input], parameters);
                    let resp = client.infer(&req).await.unwrap();
                    let out = outputs_from_proto(&resp).unwrap();
                    assert_eq!(out[0].shape, vec![2, 8]);
                    for (a, b) in f32s(&out[0]).iter().zip(f32s(&expected[0][0])) {
                        assert!((a - b).abs() <= 1e-4, "mlp output {a} differs from {b}");
                    }
                    batch_sizes.push(response_int(&resp, params::BATCH_SIZE).unwrap());
                }
            }
            batch_sizes
        }));
    }
    let mut histogram: BTreeMap<i64, u32> = BTreeMap::new();
    let mut answered = 0;
    for t in tasks {
        for size in t.await.unwrap() {
            *histogram.entry(size).or_default() += 1;
            answered += 1;
        }
    }
    eprintln!("observed batch sizes (size: requests): {histogram:?}");
    assert_eq!(answered, 1000);
    let largest = *histogram.keys().last().unwrap();
    assert!(largest > 1, "no batch larger than 1 formed: {histogram:?}");

    let text = server.scrape().await;
    let ok = metric(
        &text,
        "quiver_requests_total",
        &[("protocol", "quic"), ("outcome", "ok")],
    );
    assert_eq!(ok, 1000.0, "{text}");
    let computed = metric(&text, "quiver_computed_requests_total", &[]);
    assert_eq!(computed, 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_deadline_is_rejected_before_any_work() {
    let server = Server::start(SMALL);
    let client = server.client().await;
    let input = f32_tensor("INPUT0", vec![1, 64], vec![0.5; 64]);
    let req = request_to_proto("mlp", "late", std::slice::from_ref(&input), schedule(1, 1));
    let err = client.infer(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");

    let text = server.scrape().await;
    assert_eq!(
        metric(&text, "quiver_computed_requests_total", &[("model", "mlp")]),
        0.0,
        "the rejected request was computed"
    );
    assert_eq!(
        metric(
            &text,
            "quiver_requests_total",
            &[("outcome", "deadline_unreachable")]
        ),
        1.0
    );

    // A reachable deadline on the same connection still works.
    let req = request_to_proto("mlp", "ok", &[input], schedule(1, 5_000_000));
    client.infer(&req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_cancelled_and_never_computed() {
    // One request fills the whole batch budget of a model slow enough to
    // keep the device busy while a second request waits and is cancelled.
    let server = Server::start(support::BIG_MODEL);
    let busy = support::occupy_device(&server).await;
    let client = server.client().await;

    let small = f32_tensor("INPUT0", vec![1, 1024], vec![0.5; 1024]);
    let small_req = request_to_proto("big", "cancel-me", &[small], HashMap::new());
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&quiver_gateway::framing::encode(&small_req))
        .await
        .unwrap();
    send.finish().unwrap();
    // Cancel: tell the server we will not read its answer.
    recv.stop(0u32.into()).unwrap();
    drop(send);

    let resp = busy.await.unwrap().unwrap();
    assert_eq!(response_int(&resp, params::BATCH_SIZE), Some(1));

    // Wait (bounded) for the scheduler to skip the cancelled request.
    let mut text = String::new();
    for _ in 0..500 {
        text = server.scrape().await;
        if metric(
            &text,
            "quiver_cancelled_in_queue_total",
            &[("model", "big")],
        ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
        metric(&text, "quiver_requests_total", &[("outcome", "cancelled")]),
        1.0
    );
    assert_eq!(
        metric(&text, "quiver_computed_requests_total", &[("model", "big")]),
        1.0,
        "the cancelled request was computed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_one_stream_gets_an_error_and_the_others_keep_working() {
    let server = Server::start(SMALL);
    let client = server.client().await;

    let mut good = Vec::new();
    for n in 0..20u32 {
        let client = client.clone();
        good.push(tokio::spawn(async move {
            let input = f32_tensor("INPUT0", vec![1, 2], vec![n as f32, 1.0]);
            let req = request_to_proto("identity", "", &[input], HashMap::new());
            client.infer(&req).await
        }));
    }

    // A valid header followed by bytes that are not protobuf (wire type 7).
    let mut frame = 8u32.to_be_bytes().to_vec();
    frame.extend_from_slice(b"\x0f\xff\xff\xff\xff\xff\xff\xff");
    let err = client.send_frame(Bytes::from(frame)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // A stream that ends inside the header.
    let err = client
        .send_frame(Bytes::from_static(b"\x00\x01"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // A well-formed request that does not fit the model.
    let wrong = HostTensor::new("INPUT0", vec![1, 2], TensorData::I64(vec![1, 2])).unwrap();
    let req = request_to_proto("identity", "", &[wrong], HashMap::new());
    let err = client.infer(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // Unknown model and unknown input name.
    let input = f32_tensor("INPUT0", vec![1, 2], vec![1.0, 2.0]);
    let req = request_to_proto("nope", "", &[input], HashMap::new());
    let err = client.infer(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    let input = f32_tensor("WRONG", vec![1, 2], vec![1.0, 2.0]);
    let req = request_to_proto("identity", "", &[input], HashMap::new());
    let err = client.infer(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    for g in good {
        g.await.unwrap().unwrap();
    }
    let input = f32_tensor("INPUT0", vec![1, 2], vec![3.0, 4.0]);
    let req = request_to_proto("identity", "", &[input], HashMap::new());
    client.infer(&req).await.unwrap();

    let text = server.scrape().await;
    assert_eq!(
        metric(
            &text,
            "quiver_requests_total",
            &[("outcome", "invalid_argument")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "quiver_requests_total",
            &[("outcome", "unknown_model")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_without_being_read_whole() {
    let server = Server::start(&format!("[server]\nmax_frame_bytes = 1048576\n{SMALL}"));
    let client = server.client().await;
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    // Declare 64 MiB, send only 64 KiB of it, and do not finish. The server
    // may refuse from the prefix alone, before the 64 KiB leave: a write
    // that finds the stream already stopped (code 1) is the refusal too.
    send.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
    match send.write_all(&vec![0u8; 64 << 10]).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) => assert_eq!(code.into_inner(), 1),
        Err(e) => panic!("unexpected write error {e}"),
    }
    let reply: quiver_gateway::proto::native::Reply = tokio::time::timeout(
        Duration::from_secs(10),
        quiver_gateway::framing::read_frame(&mut recv, 1 << 20),
    )
    .await
    .expect("the refusal comes before the body is sent")
    .unwrap();
    match reply.result {
        Some(quiver_gateway::proto::native::reply::Result::Status(s)) => {
            assert_eq!(s.code, Code::ResourceExhausted as i32, "{}", s.message);
        }
        other => panic!("expected a status, got {other:?}"),
    }
    // The server stopped reading: further writes are refused.
    let mut stopped = false;
    for _ in 0..64 {
        match send.write_all(&vec![0u8; 64 << 10]).await {
            Ok(()) => continue,
            Err(quinn::WriteError::Stopped(code)) => {
                assert_eq!(code.into_inner(), 1);
                stopped = true;
                break;
            }
            Err(e) => panic!("unexpected write error {e}"),
        }
    }
    assert!(stopped, "the server kept reading the oversized body");

    let input = f32_tensor("INPUT0", vec![1, 2], vec![3.0, 4.0]);
    let req = request_to_proto("identity", "", &[input], HashMap::new());
    client.infer(&req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_rides_as_a_parameter_and_is_checked_before_the_router() {
    use quiver_gateway::client::ClientError;
    use quiver_gateway::frontend::auth::PARAMETER;
    use support::TOKEN;

    let server = Server::start(&format!("[server]\nauth_tokens = [\"{TOKEN}\"]\n{SMALL}"));
    let input = f32_tensor("INPUT0", vec![1, 2], vec![3.0, 4.0]);
    let req = request_to_proto("identity", "", std::slice::from_ref(&input), HashMap::new());
    let unauthenticated = |r: Result<_, ClientError>| match r {
        Err(e) => assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}"),
        Ok(resp) => panic!("served without a valid token: {resp:?}"),
    };

    let anonymous = server.client_with_token(None).await;
    unauthenticated(anonymous.infer(&req).await);
    // Refused before the model is looked up: no token, no catalogue.
    let unknown = request_to_proto("nope", "", std::slice::from_ref(&input), HashMap::new());
    unauthenticated(anonymous.infer(&unknown).await);
    // A token that is not a string parameter.
    let mut not_a_string = req.clone();
    not_a_string
        .parameters
        .insert(PARAMETER.into(), int_param(42));
    unauthenticated(anonymous.infer(&not_a_string).await);
    let wrong = server.client_with_token(Some("not-the-token")).await;
    unauthenticated(wrong.infer(&req).await);

    let right = server.client_with_token(Some(TOKEN)).await;
    let resp = right.infer(&req).await.unwrap();
    assert_eq!(f32s(&outputs_from_proto(&resp).unwrap()[0]), &[3.0, 4.0]);
    // The refused connections keep working once a token comes along: the
    // raw frame carries it as the parameter.
    let mut authed = req.clone();
    authed.parameters.insert(
        PARAMETER.into(),
        quiver_gateway::frontend::auth::bearer_parameter(TOKEN),
    );
    anonymous.infer(&authed).await.unwrap();

    let text = server.scrape().await;
    let quic = |outcome| {
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "quic"), ("outcome", outcome)],
        )
    };
    assert_eq!(quic("unauthenticated"), 4.0, "{text}");
    assert_eq!(quic("ok"), 2.0, "{text}");
    assert_eq!(quic("unknown_model"), 0.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "quiver_rejections_total",
            &[("protocol", "quic"), ("reason", "unauthenticated")]
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "quiver_computed_requests_total", &[]),
        2.0,
        "{text}"
    );
}

/// One request at a time on an idle device runs inline, on the front end's
/// thread (`quiver_dispatch_reason = "inline"`, counted as such), with the
/// right answer; `inline_below_us = 0` sends the same requests through the
/// device thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_an_idle_device_run_inline_unless_turned_off() {
    for (inline_below_us, want) in [(1000, "inline"), (0, "device_idle")] {
        let config = SMALL.replace(
            "name = \"identity\"\nkind = \"identity\"",
            &format!(
                "name = \"identity\"\nkind = \"identity\"\ninline_below_us = {inline_below_us}"
            ),
        );
        let server = Server::start(&config);
        let client = server.client().await;
        for n in 0..20u32 {
            let data: Vec<f32> = (0..8).map(|k| (n * 8 + k) as f32).collect();
            let input = f32_tensor("INPUT0", vec![1, 8], data.clone());
            let req = request_to_proto("identity", &n.to_string(), &[input], HashMap::new());
            let resp = client.infer(&req).await.unwrap();
            let out = outputs_from_proto(&resp).unwrap();
            assert_eq!(f32s(&out[0]), data.as_slice());
            assert_eq!(
                quiver_gateway::tensor::response_str(&resp, params::DISPATCH_REASON),
                Some(want),
                "request {n}"
            );
            assert_eq!(response_int(&resp, params::BATCH_SIZE), Some(1));
        }
        let text = server.scrape().await;
        assert_eq!(
            metric(
                &text,
                "quiver_batches_total",
                &[("model", "identity"), ("reason", want)]
            ),
            20.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_kept_as_bytes_reads_as_the_decoded_message() {
    let server = Server::start(SMALL);
    let client = server.client().await;
    let data: Vec<f32> = (0..8).map(|k| k as f32).collect();
    let input = f32_tensor("INPUT0", vec![1, 8], data.clone());
    let req = request_to_proto("identity", "raw-1", &[input], HashMap::new());
    let frame = quiver_gateway::framing::encode(&req);
    let raw = client.send_frame_raw(frame.clone()).await.unwrap();
    let peek = raw.peek().expect("a local answer is read in place");
    let resp = raw.decode().unwrap();
    assert!(peek.reads_as(&resp), "{peek:?} against {resp:?}");
    assert_eq!(
        (peek.model_name, peek.id, peek.outputs),
        ("identity", "raw-1", 1)
    );
    assert_eq!(
        peek.parameter(params::PATH),
        Some(quiver_gateway::tensor::ParamRef::Str("local"))
    );
    assert_eq!(
        peek.parameter(params::BATCH_SIZE),
        Some(quiver_gateway::tensor::ParamRef::Int(1))
    );
    assert_eq!(
        f32s(&outputs_from_proto(&resp).unwrap()[0]),
        data.as_slice()
    );
    // A status reply is the same error as from `send_frame`.
    let unknown = request_to_proto("nope", "raw-2", &[], HashMap::new());
    let frame = quiver_gateway::framing::encode(&unknown);
    match client.send_frame_raw(frame.clone()).await {
        Err(quiver_gateway::client::ClientError::Status { code, .. }) => {
            assert_eq!(code, Code::NotFound);
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    match client.send_frame(frame).await {
        Err(quiver_gateway::client::ClientError::Status { code, .. }) => {
            assert_eq!(code, Code::NotFound);
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
}
