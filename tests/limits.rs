//! End to end: the connection and stream limits (`server.max_connections`,
//! `server.max_concurrent_streams`) on the real `quiver` binary. A connection
//! over the limit is refused with a clear answer while those within keep
//! working; streams over the limit wait for credit and none is lost.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use quiver_gateway::client::{Client, ClientError, ClientOptions};
use quiver_gateway::proto::native::{Reply, reply};
use quiver_gateway::tensor::{outputs_from_proto, request_to_proto};
use quiver_gateway::tls::Trust;
use quiver_kernels::{HostTensor, TensorData};
use support::{Server, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDENTITY: &str = r#"
[[models]]
name = "identity"
kind = "identity"
max_batch_size = 64
default_timeout_ms = 10000
"#;

/// A bound on waits for events; never reached when things work.
const BOUND: Duration = Duration::from_secs(10);

fn echo_request(v: f32) -> quiver_gateway::proto::ModelInferRequest {
    let t = HostTensor::new("INPUT0", vec![1, 1], TensorData::F32(vec![v])).unwrap();
    request_to_proto("identity", &v.to_string(), &[t], HashMap::new())
}

fn echoed(resp: &quiver_gateway::proto::ModelInferResponse) -> f32 {
    match &outputs_from_proto(resp).unwrap()[0].data {
        TensorData::F32(v) => v[0],
        other => panic!("expected FP32, got {other:?}"),
    }
}

async fn assert_echoes(client: &Client, v: f32) {
    let resp = client.infer(&echo_request(v)).await.unwrap();
    assert_eq!(echoed(&resp), v);
}

/// `quiver_rejections_total` for one protocol and reason.
fn rejections(text: &str, protocol: &str, reason: &str) -> f64 {
    metric(
        text,
        "quiver_rejections_total",
        &[("protocol", protocol), ("reason", reason)],
    )
}

/// Whether `fut` is still pending after one poll.
async fn pending_after_one_poll<F: Future>(fut: Pin<&mut F>) -> bool {
    let mut fut = fut;
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_connection_over_the_limit_is_refused_and_the_others_keep_working() {
    let server = Server::start(&format!("[server]\nmax_connections = 2\n{IDENTITY}"));
    let options = || ClientOptions::new(Trust::Pinned(server.fingerprint.clone()));
    // A client's handshake completes only once the server has accepted it,
    // so both count when the third one arrives.
    let a = server.client().await;
    let b = server.client().await;
    assert_echoes(&a, 1.0).await;
    assert_echoes(&b, 2.0).await;

    match Client::connect(server.quic, options()).await {
        Err(ClientError::Connection(quinn::ConnectionError::ConnectionClosed(close))) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED,
                "{close}"
            );
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a third connection was accepted with max_connections = 2"),
    }

    assert_echoes(&a, 3.0).await;
    assert_echoes(&b, 4.0).await;
    let text = server.scrape().await;
    assert_eq!(
        rejections(&text, "quic", "too_many_connections"),
        1.0,
        "{text}"
    );

    // A closed connection frees its place once QUIC has drained it.
    a.close().await;
    let deadline = tokio::time::Instant::now() + BOUND;
    let c = loop {
        match Client::connect(server.quic, options()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the freed place was never given again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_echoes(&c, 5.0).await;
    assert_echoes(&b, 6.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_over_the_limit_wait_for_credit_and_every_one_is_answered() {
    const N: usize = 4;
    let server = Server::start(&format!(
        "[server]\nmax_concurrent_streams = {N}\n{IDENTITY}"
    ));
    let client = server.client().await;
    let conn = client.connection();

    // N streams take all the credit the server granted in the handshake:
    // the client cannot open one more, so the server never has more than N
    // in flight on this connection.
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(conn.open_bi().await.unwrap());
    }
    let mut one_more = Box::pin(conn.open_bi());
    assert!(
        pending_after_one_poll(one_more.as_mut()).await,
        "a stream over max_concurrent_streams = {N} was opened"
    );
    // As the held streams are answered, the server grants credit again.
    for (i, (mut send, mut recv)) in held.into_iter().enumerate() {
        let v = i as f32;
        send.write_all(&quiver_gateway::framing::encode(&echo_request(v)))
            .await
            .unwrap();
        send.finish().unwrap();
        let reply: Reply = quiver_gateway::framing::read_frame(&mut recv, 1 << 20)
            .await
            .unwrap();
        match reply.result {
            Some(reply::Result::Response(r)) => assert_eq!(echoed(&r), v),
            other => panic!("expected a response, got {other:?}"),
        }
    }
    let (mut send, mut recv) = tokio::time::timeout(BOUND, one_more)
        .await
        .expect("credit came back once the held streams ended")
        .unwrap();
    send.write_all(&quiver_gateway::framing::encode(&echo_request(99.0)))
        .await
        .unwrap();
    send.finish().unwrap();
    let reply: Reply = quiver_gateway::framing::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap();
    assert!(
        matches!(reply.result, Some(reply::Result::Response(_))),
        "{reply:?}"
    );

    // Many more requests at once than the limit: they queue for credit on
    // the client, and every one gets its own answer.
    let mut tasks = Vec::new();
    for i in 0..(N * 8) {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let v = 100.0 + i as f32;
            let resp = client.infer(&echo_request(v)).await.unwrap();
            assert_eq!(echoed(&resp), v);
        }));
    }
    for t in tasks {
        tokio::time::timeout(BOUND, t)
            .await
            .expect("every request over the stream limit is answered")
            .unwrap();
    }
    let text = server.scrape().await;
    assert_eq!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "quic"), ("outcome", "ok")]
        ),
        (N + 1 + N * 8) as f64,
        "{text}"
    );
}

/// One HTTP/1.1 request on a kept-alive connection: the status and body.
async fn http1_get(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: quiver\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(BOUND, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "connection closed mid-answer: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(BOUND, stream.read(&mut chunk))
            .await
            .expect("a body in time")
            .unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    (status, body)
}

/// What the server sends on a fresh connection, read until it closes.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(BOUND, stream.read(&mut chunk))
            .await
            .expect("the server closes the refused connection")
        {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after the answer: what was sent is still read.
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// The head of an answer, or what came before the connection closed.
async fn read_until_closed_or_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(BOUND, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_connection_over_the_limit_gets_503_and_the_others_keep_working() {
    let server = Server::start(&format!("[server]\nmax_connections = 2\n{IDENTITY}"));
    // One answered request each: both connections are being served.
    let mut a = TcpStream::connect(server.http).await.unwrap();
    let mut b = TcpStream::connect(server.http).await.unwrap();
    assert_eq!(http1_get(&mut a, "/v2/health/live").await.0, 200);
    assert_eq!(http1_get(&mut b, "/v2/health/live").await.0, 200);

    let mut c = TcpStream::connect(server.http).await.unwrap();
    let refused = read_until_closed(&mut c).await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    let lower = refused.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{refused}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{refused}");
    let body = refused.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("too many connections"),
        "{v}"
    );

    // The two within the limit are served as before.
    let (status, body) = http1_get(&mut a, "/v2/models/identity").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http1_get(&mut b, "/v2/health/ready").await.0, 200);
    let text = server.scrape().await;
    assert_eq!(
        rejections(&text, "http", "too_many_connections"),
        1.0,
        "{text}"
    );

    // Closing one frees its place (once the server has seen it close).
    drop(a);
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let mut d = TcpStream::connect(server.http).await.unwrap();
        d.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: quiver\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed_or_head(&mut d).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            answer.starts_with("HTTP/1.1 503 ") || answer.is_empty(),
            "{answer}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never given again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(http1_get(&mut b, "/v2/health/live").await.0, 200);
}

/// A bound that the slow-client tests wait for answers within; the read
/// timeout they configure is far below it.
const READ_TIMEOUT: &str = "request_read_timeout_ms = 300";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_body_shorter_than_its_length_gets_408_and_others_are_served() {
    let server = Server::start(&format!("[server]\n{READ_TIMEOUT}\n{IDENTITY}"));
    // Announces 1000 bytes, sends 20, and waits.
    let mut slow = TcpStream::connect(server.http).await.unwrap();
    slow.write_all(
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: quiver\r\n\
          content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"inputs\": [{\"name\"",
    )
    .await
    .unwrap();
    // Meanwhile another client is served.
    let mut other = TcpStream::connect(server.http).await.unwrap();
    assert_eq!(http1_get(&mut other, "/v2/models/identity").await.0, 200);
    let answer = read_until_closed_or_head(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(http1_get(&mut other, "/v2/health/ready").await.0, 200);
}

/// Opens a native stream, sends only a length prefix announcing `len` bytes
/// and keeps the stream open; returns the status the server answers with.
async fn status_after_length_prefix(
    client: &Client,
    len: u32,
) -> (quiver_gateway::error::Code, String) {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&len.to_be_bytes()).await.unwrap();
    let body = tokio::time::timeout(BOUND, recv.read_to_end(1 << 20))
        .await
        .expect("the server answers the stream")
        .unwrap();
    let reply = quiver_gateway::client::decode_reply(&body[4..]).unwrap();
    match reply.result {
        Some(reply::Result::Status(s)) => {
            (quiver_gateway::error::Code::from_i32(s.code), s.message)
        }
        other => panic!("expected a status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_stream_that_stalls_after_its_length_prefix_gets_deadline_exceeded() {
    let server = Server::start(&format!("[server]\n{READ_TIMEOUT}\n{IDENTITY}"));
    let client = server.client().await;
    // A length prefix announcing 4 KiB, then nothing: the stream stays open.
    let (code, message) = status_after_length_prefix(&client, 4096).await;
    assert_eq!(
        code,
        quiver_gateway::error::Code::DeadlineExceeded,
        "{message}"
    );
    assert!(message.contains("request_read_timeout_ms"), "{message}");
    // The connection and the gateway go on serving.
    assert_echoes(&client, 7.0).await;
    let text = server.scrape().await;
    assert_eq!(rejections(&text, "quic", "request_timeout"), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_connection() {
    let server = Server::start(&format!(
        "[server]\nmax_connections = 64\nmax_connections_per_source = 2\n{IDENTITY}"
    ));
    // REST: two idle connections from this host; a third is refused with 503
    // although 62 places are free.
    let mut a = TcpStream::connect(server.http).await.unwrap();
    let mut b = TcpStream::connect(server.http).await.unwrap();
    assert_eq!(http1_get(&mut a, "/v2/health/live").await.0, 200);
    assert_eq!(http1_get(&mut b, "/v2/health/live").await.0, 200);
    let mut c = TcpStream::connect(server.http).await.unwrap();
    let refused = read_until_closed(&mut c).await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert_eq!(http1_get(&mut a, "/v2/health/ready").await.0, 200);

    // QUIC: the third connection from this host is closed once its handshake
    // is done; the two within the limit keep working.
    let options = || ClientOptions::new(Trust::Pinned(server.fingerprint.clone()));
    let q1 = server.client().await;
    let q2 = server.client().await;
    assert_echoes(&q1, 1.0).await;
    assert_echoes(&q2, 2.0).await;
    let q3 = Client::connect(server.quic, options()).await.unwrap();
    let refused = q3.infer(&echo_request(3.0)).await;
    assert!(
        refused.is_err(),
        "a third connection from one host was served"
    );
    match q3.connection().close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                quiver_gateway::frontend::quic::CLOSE_TOO_MANY_FROM_SOURCE.into(),
                "{close}"
            );
        }
        other => panic!("closed for another reason: {other:?} ({refused:?})"),
    }
    assert_echoes(&q1, 4.0).await;
    let text = server.scrape().await;
    for protocol in ["http", "quic"] {
        assert_eq!(
            rejections(&text, protocol, "too_many_connections_from_source"),
            1.0,
            "{protocol}: {text}"
        );
    }
    // A closed QUIC connection gives its place back.
    q2.close().await;
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let q = Client::connect(server.quic, options()).await.unwrap();
        if q.infer(&echo_request(5.0)).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never given again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the gauge `quiver_inflight_bytes`.
async fn inflight_bytes(server: &Server) -> f64 {
    metric(&server.scrape().await, "quiver_inflight_bytes", &[])
}

/// Polls (bounded) until the request-memory gauge reads `want`.
async fn wait_inflight(server: &Server, want: f64) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let got = inflight_bytes(server).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "quiver_inflight_bytes stayed at {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_memory_budget_are_refused_before_their_bodies_are_read() {
    // A budget of 1 MiB and requests of up to 768 KiB: one announced request
    // of 700,000 bytes holds most of it.
    let server = Server::start(&format!(
        "[server]\nmax_inflight_bytes = 1048576\nmax_frame_bytes = 786432\n{IDENTITY}"
    ));
    wait_inflight(&server, 0.0).await;

    // REST: a body announced and half sent holds its whole length.
    let post = |len: usize| {
        format!(
            "POST /v2/models/identity/infer HTTP/1.1\r\nHost: quiver\r\n\
             content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    let mut holder = TcpStream::connect(server.http).await.unwrap();
    holder.write_all(post(700_000).as_bytes()).await.unwrap();
    holder.write_all(&vec![b' '; 1000]).await.unwrap();
    wait_inflight(&server, 700_000.0).await;
    // A second one that does not fit is refused from its headers alone.
    let mut refused = TcpStream::connect(server.http).await.unwrap();
    refused.write_all(post(700_000).as_bytes()).await.unwrap();
    let answer = read_until_closed_or_head(&mut refused).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nretry-after: 1\r\n"),
        "{answer}"
    );
    // Small requests still fit beside it.
    let client = server.client().await;
    assert_echoes(&client, 1.0).await;

    // QUIC native: a frame announced beside the held one gets UNAVAILABLE
    // before its body is sent.
    let (code, message) = status_after_length_prefix(&client, 700_000).await;
    assert_eq!(code, quiver_gateway::error::Code::Unavailable, "{message}");
    assert!(message.contains("max_inflight_bytes"), "{message}");

    // The holder goes away: its bytes are given back, and a large request
    // fits again.
    drop(holder);
    wait_inflight(&server, 0.0).await;
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&600_000u32.to_be_bytes()).await.unwrap();
    wait_inflight(&server, 600_004.0).await;
    // Cancelled mid-body by its client: released too.
    send.reset(0u32.into()).unwrap();
    drop(recv.stop(0u32.into()));
    wait_inflight(&server, 0.0).await;
    assert_echoes(&client, 2.0).await;
    wait_inflight(&server, 0.0).await;

    let text = server.scrape().await;
    for protocol in ["http", "quic"] {
        assert!(
            rejections(&text, protocol, "memory_budget") >= 1.0,
            "{protocol}: {text}"
        );
    }
}

// ---- QUIC address validation and 0-RTT ---------------------------------------------------

/// A quinn client endpoint of the native protocol that pins the server's
/// certificate and would send 0-RTT data if the server allowed it.
fn early_data_client(server: &Server) -> quinn::Endpoint {
    let mut tls = quiver_gateway::tls::client_config(
        &Trust::Pinned(server.fingerprint.clone()),
        &[quiver_gateway::NATIVE_ALPN],
    )
    .unwrap();
    tls.enable_early_data = true;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    endpoint
}

async fn native_echo(conn: &quinn::Connection, v: f32) -> f32 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    quiver_gateway::framing::write_frame(&mut send, &echo_request(v))
        .await
        .unwrap();
    let reply: Reply = quiver_gateway::framing::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap();
    match reply.result {
        Some(reply::Result::Response(r)) => echoed(&r),
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Three clients, each on a new connection, each served; then the count of
/// QUIC Retries the server sent.
async fn retries_for_three_clients(server: &Server) -> f64 {
    for v in [1.0, 2.0, 3.0] {
        let client = server.client().await;
        assert_eq!(echoed(&client.infer(&echo_request(v)).await.unwrap()), v);
        client.close().await;
    }
    metric(&server.scrape().await, "quiver_quic_retries_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_handshake_rate_clients_prove_their_address_with_a_retry() {
    // 0: every new client is asked for a Retry.
    let always = Server::start(&format!(
        "[server]\nquic_retry_above_per_sec = 0\n{IDENTITY}"
    ));
    assert_eq!(retries_for_three_clients(&always).await, 3.0);
    // Under the default rate a client is never asked.
    let calm = Server::start(IDENTITY);
    assert_eq!(retries_for_three_clients(&calm).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_is_refused() {
    let server = Server::start(IDENTITY);
    let endpoint = early_data_client(&server);
    // A first connection, which a resuming client learns its ticket from.
    let conn = endpoint
        .connect(server.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    assert_eq!(native_echo(&conn, 5.0).await, 5.0);
    conn.close(0u32.into(), b"done");
    // The second may resume, but may not send before the handshake ends.
    let connecting = endpoint.connect(server.quic, "localhost").unwrap();
    match connecting.into_0rtt() {
        Err(connecting) => {
            let conn = connecting.await.unwrap();
            assert_eq!(native_echo(&conn, 6.0).await, 6.0);
        }
        Ok((conn, accepted)) => {
            assert!(!accepted.await, "the server accepted 0-RTT data");
            assert_eq!(native_echo(&conn, 6.0).await, 6.0);
        }
    }
}

// ---- per-client rate limits ----------------------------------------------------------------

/// A model slow enough (one row per batch, about a few ms each) that a
/// greedy client could take all of its capacity.
fn fair_config(rate: u32) -> String {
    format!(
        "[server]\nauth_tokens = [\"greedy\", \"polite\"]\nrate_limit_per_sec = {rate}\n\
         rate_limit_burst = 10\n\n\
         [[models]]\nname = \"mlp\"\nkind = \"mlp\"\nmax_batch_size = 1\nqueue_capacity = 4096\n\
         default_timeout_ms = 500\n\
         [models.demo]\ninputs = 1024\nhidden = [2048, 2048, 2048]\noutputs = 4\nseed = 7\n"
    )
}

fn mlp_request() -> quiver_gateway::proto::ModelInferRequest {
    let t = HostTensor::new("INPUT0", vec![1, 1024], TensorData::F32(vec![0.25; 1024])).unwrap();
    request_to_proto("mlp", "", &[t], HashMap::new())
}

/// Runs a greedy client (open loop, `greedy_per_sec`) beside a polite one
/// (20 requests/s) for `secs`; returns (polite ok, polite failed, greedy
/// ok, greedy refused for its rate) and the first polite failure.
async fn greedy_beside_polite(
    server: &Server,
    greedy_per_sec: u32,
    secs: u64,
) -> ((u32, u32, u32, u32), Option<String>) {
    let greedy = std::sync::Arc::new(server.client_with_token(Some("greedy")).await);
    let polite = std::sync::Arc::new(server.client_with_token(Some("polite")).await);
    let run = |client: std::sync::Arc<Client>, per_sec: u32| async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
        let mut tasks = tokio::task::JoinSet::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            tick.tick().await;
            let client = client.clone();
            tasks.spawn(async move { client.infer(&mlp_request()).await });
        }
        let (mut ok, mut limited, mut failed, mut first) = (0u32, 0u32, 0u32, None);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) if e.to_string().contains("rate limit") => limited += 1,
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(e.to_string());
                }
            }
        }
        (ok, limited, failed, first)
    };
    let (g, p) = tokio::join!(run(greedy, greedy_per_sec), run(polite, 20));
    ((p.0, p.1 + p.2, g.0, g.1), p.3.or(g.3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_client_does_not_push_a_polite_one_past_its_deadlines() {
    // Each client's share is 40 requests/s; the greedy one sends ten times
    // that, open loop, more than the model can compute.
    let server = Server::start(&fair_config(40));
    let ((polite_ok, polite_failed, greedy_ok, greedy_limited), first) =
        greedy_beside_polite(&server, 400, 3).await;
    eprintln!(
        "polite: {polite_ok} ok, {polite_failed} failed; greedy: {greedy_ok} ok, {greedy_limited} refused for its rate"
    );
    assert_eq!(polite_failed, 0, "first failure: {first:?}");
    assert!(polite_ok >= 55, "{polite_ok}");
    // The greedy client got its rate (3 s x 40/s + the burst), no more.
    assert!(greedy_ok <= 3 * 40 + 10 + 5, "{greedy_ok}");
    assert!(greedy_limited > 500, "{greedy_limited}");
    let text = server.scrape().await;
    assert!(
        metric(
            &text,
            "quiver_rejections_total",
            &[
                ("model", "mlp"),
                ("protocol", "quic"),
                ("reason", "rate_limited")
            ]
        ) >= greedy_limited as f64,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_rest_request_gets_429_with_retry_after_before_its_body_is_read() {
    let server = Server::start(&format!(
        "[server]\nrate_limit_per_sec = 1\nrate_limit_burst = 1\n{IDENTITY}"
    ));
    let http = reqwest::Client::new();
    let url = format!("{}/v2/models/identity/infer", server.http_url());
    let body = serde_json::json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]});
    let first = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap(),
        "1"
    );
    let text = second.text().await.unwrap();
    assert!(text.contains("rate limit of 1 requests/s"), "{text}");

    // The same client (its source address) over HTTP/3 shares the bucket:
    // refused before its body is read, counted once.
    let mut h3 = support::h3::connect(&server).await;
    let a = h3
        .call(
            "POST",
            "/v2/models/identity/infer",
            &[("content-type", "application/json".into())],
            Some(body.to_string().into_bytes()),
        )
        .await;
    assert_eq!(a.status, 429, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.headers.get("retry-after").unwrap(), "1");
    let metrics = server.scrape().await;
    for protocol in ["http", "h3"] {
        assert_eq!(
            metric(
                &metrics,
                "quiver_rejections_total",
                &[
                    ("model", "identity"),
                    ("protocol", protocol),
                    ("reason", "rate_limited")
                ]
            ),
            1.0,
            "{protocol}: {metrics}"
        );
    }
}
