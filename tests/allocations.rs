//! Allocations per request on the gateway's side of the QUIC native path,
//! counted by a global allocator: the gateway runs in this process on its
//! own runtime (its I/O threads and device threads are counted), the client
//! on this test's thread (not counted). Identity `[1, 16]` FP32 and the demo
//! MLP, one request at a time and 16 at once.
//!
//! The ceilings below are the measured counts plus slack for what varies
//! run to run (timer wheel slots, QUIC packet coalescing, ACK frequency,
//! a connection's first use of a buffer); the counts themselves are printed:
//! `cargo nextest run -p quiver-gateway --test e2e_allocations --no-capture`.
#![allow(clippy::unwrap_used)]
// The counting allocator forwards to `System`; that is all the unsafe here.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use quiver_gateway::client::{Client, ClientOptions};
use quiver_gateway::serve::Gateway;
use quiver_gateway::tensor::request_to_proto;
use quiver_gateway::tls::Trust;
use quiver_kernels::{HostTensor, TensorData};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the client's thread: its allocations are not the gateway's.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // During thread teardown the flag may be gone: count, to be safe.
    if !UNCOUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONFIG: &str = r#"
[server]
quic_listen = "127.0.0.1:0"
http_listen = "off"
grpc_listen = "off"
metrics_listen = "off"

[[models]]
name = "identity"
kind = "identity"
default_timeout_ms = 10000

[[models]]
name = "mlp"
kind = "mlp"
default_timeout_ms = 10000
[models.demo]
inputs = 16
hidden = [64]
outputs = 4
"#;

fn request(model: &str, width: usize) -> quiver_gateway::proto::ModelInferRequest {
    let data: Vec<f32> = (0..width).map(|i| i as f32 / 8.0).collect();
    let input = HostTensor::new("INPUT0", vec![1, width], TensorData::F32(data)).unwrap();
    request_to_proto(model, "", &[input], HashMap::new())
}

/// Gateway-side allocations per request over `rounds × concurrency`
/// requests, after a warm-up.
async fn per_request(
    client: &Client,
    req: &quiver_gateway::proto::ModelInferRequest,
    concurrency: usize,
    rounds: usize,
) -> f64 {
    let run = |rounds: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, req) = (client.clone(), req.clone());
            tasks.spawn(async move {
                for _ in 0..rounds {
                    client.infer(&req).await.unwrap();
                }
            });
        }
        tasks.join_all()
    };
    run(50).await;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    run(rounds).await;
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    (after - before) as f64 / (rounds * concurrency) as f64
}

#[test]
fn gateway_allocations_per_quic_request_stay_within_their_ceiling() {
    let config = quiver_config::Config::parse(CONFIG).unwrap();
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gateway = server.block_on(Gateway::start(&config, None)).unwrap();
    let addr = gateway.quic_addr.unwrap();

    UNCOUNTED.with(|u| u.set(true));
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let figures = client_rt.block_on(async {
        let client = Client::connect(addr, ClientOptions::new(Trust::Insecure))
            .await
            .unwrap();
        let identity = request("identity", 16);
        let mlp = request("mlp", 16);
        let figures = [
            ("identity c1", per_request(&client, &identity, 1, 400).await),
            (
                "identity c16",
                per_request(&client, &identity, 16, 50).await,
            ),
            ("mlp c1", per_request(&client, &mlp, 1, 400).await),
        ];
        client.close().await;
        figures
    });
    for (what, n) in &figures {
        println!("gateway allocations per request, {what}: {n:.1}");
    }
    for ((what, n), ceiling) in figures.into_iter().zip(CEILINGS) {
        assert!(
            n <= ceiling,
            "{what}: {n:.1} allocations per request > {ceiling}"
        );
    }
    server.block_on(gateway.shutdown(std::time::Duration::from_secs(1)));
}

/// Allocations per request the gateway may make, in the order of the
/// figures. Measured here: identity 24 at concurrency 1 and 21 at 16 (70
/// and 61 before the hot path was trimmed, 37 and 35 before replies were
/// written from the output tensors and plain requests read straight into
/// tensors), the demo MLP 28 (240 before, when its batches went through
/// candle's tensors).
const CEILINGS: [f64; 3] = [30.0, 30.0, 35.0];
