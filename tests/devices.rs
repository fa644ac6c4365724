//! Several devices per model, simulated devices, and deadlines that count
//! the network's round trip, against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_gateway::client::{Client, ClientOptions};
use quiver_gateway::proto::inference::ModelInferRequest;
use quiver_gateway::proto::inference::model_infer_request::InferInputTensor;
use quiver_gateway::tensor::int_param;
use quiver_gateway::tls::Trust;
use support::{Server, f32_bytes, metric};
use tokio::net::UdpSocket;

fn request(timeout: Option<Duration>) -> ModelInferRequest {
    let mut parameters = HashMap::new();
    if let Some(t) = timeout {
        parameters.insert(
            quiver_gateway::request::params::TIMEOUT.to_owned(),
            int_param(t.as_micros() as i64),
        );
    }
    ModelInferRequest {
        model_name: "echo".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(f32_bytes(&[1.0, 2.0, 3.0, 4.0]))],
        parameters,
        ..Default::default()
    }
}

fn string_parameter(resp: &quiver_gateway::proto::ModelInferResponse, name: &str) -> String {
    use quiver_gateway::proto::inference::infer_parameter::ParameterChoice;
    match resp
        .parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(s)) => s.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

fn int_parameter(resp: &quiver_gateway::proto::ModelInferResponse, name: &str) -> Option<i64> {
    use quiver_gateway::proto::inference::infer_parameter::ParameterChoice;
    match resp
        .parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(v)) => Some(*v),
        _ => None,
    }
}

/// Two simulated devices, the second three times as slow: requests go to
/// the one that will finish first, so the fast one computes about three in
/// four; both are used, each answer names its device, and each device has
/// its own series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_device_that_finishes_first() {
    let server = Server::start(
        r#"
[[models]]
name = "echo"
kind = "identity"
devices = ["sim:0", "sim:1"]
max_batch_size = 1
max_queue_delay_us = 0
default_timeout_ms = 10000
[models.sim]
fixed_us = 2000
slowdown_pct = [100, 300]
"#,
    );
    let client = Arc::new(server.client().await);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut devices = Vec::new();
            for _ in 0..40 {
                let resp = client.infer(&request(None)).await.unwrap();
                devices.push(string_parameter(&resp, "quiver_device"));
            }
            devices
        }));
    }
    let mut answered: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for d in t.await.unwrap() {
            *answered.entry(d).or_default() += 1;
        }
    }
    let text = server.scrape().await;
    let computed = |d: &str| {
        metric(
            &text,
            "quiver_computed_requests_total",
            &[("model", "echo"), ("device", d)],
        )
    };
    let (fast, slow) = (computed("sim:0"), computed("sim:1"));
    assert_eq!(fast + slow, 320.0, "{text}");
    assert_eq!(answered.get("sim:0").copied().unwrap_or(0) as f64, fast);
    assert_eq!(answered.get("sim:1").copied().unwrap_or(0) as f64, slow);
    let share = fast / (fast + slow);
    eprintln!("sim:0 (1x) computed {fast}, sim:1 (3x slower) {slow}: fast share {share:.2}");
    assert!(
        (0.6..0.95).contains(&share),
        "fast share {share:.2} (fast {fast}, slow {slow})"
    );
    assert!(slow > 0.0, "the slow device is used too");
    for d in ["sim:0", "sim:1"] {
        assert!(
            text.contains(&format!(
                "quiver_device_healthy{{model=\"echo\",version=\"1\",device=\"{d}\"}} 1"
            )),
            "{text}"
        );
    }
    // Triton's model configuration lists one instance group per device.
    let config: serde_json::Value =
        reqwest::get(format!("{}/v2/models/echo/config", server.http_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(config["instance_group"].as_array().unwrap().len(), 2);
}

/// A UDP relay that delays every datagram by `delay` each way: between a
/// QUIC client and the gateway it adds `2 × delay` of round trip.
async fn delaying_relay(server: SocketAddr, delay: Duration) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client: Arc<tokio::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    {
        let (front, back, client) = (front.clone(), back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                *client.lock().await = Some(from);
                let packet = buf[..n].to_vec();
                let back = back.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = back.send(&packet).await;
                });
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok(n) = back.recv(&mut buf).await else {
                return;
            };
            let Some(to) = *client.lock().await else {
                continue;
            };
            let packet = buf[..n].to_vec();
            let front = front.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = front.send_to(&packet, to).await;
            });
        }
    });
    addr
}

/// The deadline covers the round trip. A device that takes 20 ms and a
/// 50 ms deadline: served with no added delay; through a relay that adds
/// 40 ms of RTT the request is refused at once (deadline unreachable,
/// nothing computed) instead of answered late; with a 200 ms deadline it is
/// served and the answer says how much was set aside for the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_is_set_aside_from_the_deadline() {
    let server = Server::start(
        r#"
[[models]]
name = "echo"
kind = "identity"
device = "sim:0"
max_queue_delay_us = 0
[models.sim]
fixed_us = 20000
"#,
    );
    let direct = server.client().await;
    let resp = direct
        .infer(&request(Some(Duration::from_millis(50))))
        .await
        .expect("no added delay: 20 ms of compute fits 50 ms");
    let reserved = int_parameter(&resp, "quiver_rtt_reserved_us").unwrap_or(0);
    assert!(reserved < 10_000, "loopback RTT {reserved} µs");

    let relay = delaying_relay(server.quic, Duration::from_millis(20)).await;
    let far = Client::connect(
        relay,
        ClientOptions::new(Trust::Pinned(server.fingerprint.clone())),
    )
    .await
    .unwrap();
    // A first exchange gives QUIC more RTT samples than the handshake's.
    let warm = far
        .infer(&request(Some(Duration::from_secs(5))))
        .await
        .unwrap();
    let reserved = int_parameter(&warm, "quiver_rtt_reserved_us").unwrap();
    assert!(reserved >= 30_000, "40 ms of RTT, {reserved} µs reserved");

    let before = metric(
        &server.scrape().await,
        "quiver_computed_requests_total",
        &[("model", "echo")],
    );
    let err = far
        .infer(&request(Some(Duration::from_millis(50))))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    let resp = far
        .infer(&request(Some(Duration::from_millis(200))))
        .await
        .unwrap();
    assert!(int_parameter(&resp, "quiver_rtt_reserved_us").unwrap() >= 30_000);
    let after = metric(
        &server.scrape().await,
        "quiver_computed_requests_total",
        &[("model", "echo")],
    );
    assert_eq!(
        after - before,
        1.0,
        "the refused request was never computed"
    );
    let text = server.scrape().await;
    assert_eq!(
        metric(
            &text,
            "quiver_routed_requests_total",
            &[("model", "echo"), ("outcome", "deadline_unreachable")]
        ),
        1.0
    );
}

/// With `max_in_flight = 2` the device computes one batch while the next
/// forms: the scheduler's prefetch rules (deadline slack, queue delay)
/// dispatch batches, which they never do with one batch at a time, and
/// every request is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_batch_forms_while_the_first_computes() {
    let model = |name: &str, in_flight: u32| {
        format!(
            r#"
[[models]]
name = "{name}"
kind = "identity"
device = "sim:0"
max_batch_size = 64
max_queue_delay_us = 1000
max_in_flight = {in_flight}
default_timeout_ms = 10000
[models.sim]
fixed_us = 5000
"#
        )
    };
    let server = Server::start(&(model("one", 1) + &model("two", 2)));
    let client = Arc::new(server.client().await);
    for name in ["one", "two"] {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let client = client.clone();
            let name = name.to_owned();
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let mut req = request(None);
                    req.model_name.clone_from(&name);
                    client.infer(&req).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let text = server.scrape().await;
    let batches = |model: &str, reason: &str| {
        metric(
            &text,
            "quiver_batches_total",
            &[("model", model), ("reason", reason)],
        )
    };
    let prefetch =
        |model: &str| batches(model, "deadline_slack") + batches(model, "max_queue_delay");
    eprintln!(
        "max_in_flight 1: {} idle, {} full, {} prefetch; max_in_flight 2: {} idle, {} full, {} prefetch",
        batches("one", "device_idle"),
        batches("one", "budget_full"),
        prefetch("one"),
        batches("two", "device_idle"),
        batches("two", "budget_full"),
        prefetch("two"),
    );
    assert_eq!(prefetch("one"), 0.0, "{text}");
    assert!(prefetch("two") > 0.0, "{text}");
    for m in ["one", "two"] {
        assert_eq!(
            metric(&text, "quiver_computed_requests_total", &[("model", m)]),
            240.0
        );
    }
}
