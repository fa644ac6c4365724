//! Shared helpers of the end-to-end tests: start the real `quiver` binary on
//! loopback, wait until it says it is ready, and scrape its metrics.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quiver_gateway::client::{Client, ClientOptions};
use quiver_gateway::tls::Trust;

pub mod h3;

/// A running `quiver serve` child process; killed when dropped.
pub struct Server {
    child: Child,
    pub quic: SocketAddr,
    pub metrics: SocketAddr,
    /// The REST listener (HTTP/1.1, h2c).
    pub http: SocketAddr,
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The REST and gRPC listeners over TLS, when configured.
    pub https: Option<SocketAddr>,
    pub grpcs: Option<SocketAddr>,
    pub fingerprint: String,
    pub lines: Vec<String>,
    _dir: tempfile::TempDir,
}

pub fn quiver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_quiver")
}

impl Server {
    /// Starts `quiver serve` with `config` (TOML) on loopback ports chosen by
    /// the OS, and waits (bounded) for its `ready` line.
    pub fn start(config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiver.toml");
        std::fs::write(&path, config).unwrap();
        let path = path.to_str().unwrap().to_owned();
        Server::launch(&["--config", &path], dir)
    }

    /// Starts `quiver serve ARGS...` (e.g. `--model DIR`) on loopback ports
    /// chosen by the OS, and waits (bounded) for its `ready` line.
    pub fn start_args(args: &[&str]) -> Server {
        Server::launch(args, tempfile::tempdir().unwrap())
    }

    fn launch(args: &[&str], dir: tempfile::TempDir) -> Server {
        let mut child = Command::new(quiver_bin())
            .arg("serve")
            .args(args)
            .args([
                "--quic-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the quiver binary starts");
        let lines = wait_ready(&mut child);
        let (mut quic, mut metrics, mut fingerprint) = (None, None, None);
        let (mut http, mut grpc, mut https, mut grpcs) = (None, None, None, None);
        for line in &lines {
            if let Some(rest) =
                line.strip_prefix("quiver: QUIC native (quiver/1) listening on udp ")
            {
                quic = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) =
                line.strip_prefix("quiver: REST (HTTP/1.1, h2c) listening on http://")
            {
                http = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("quiver: gRPC listening on tcp ") {
                grpc = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) =
                line.strip_prefix("quiver: REST over TLS (HTTP/1.1, HTTP/2) listening on https://")
            {
                https = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("quiver: gRPC over TLS listening on tcp ")
            {
                grpcs = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("quiver: metrics on http://") {
                metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
            } else if let Some(i) = line.find("sha256 fingerprint ") {
                fingerprint = Some(line[i + "sha256 fingerprint ".len()..].trim().to_string());
            }
        }
        Server {
            child,
            quic: quic.expect("QUIC address printed"),
            metrics: metrics.expect("metrics address printed"),
            http: http.expect("REST address printed"),
            grpc: grpc.expect("gRPC address printed"),
            https,
            grpcs,
            fingerprint: fingerprint.expect("fingerprint printed"),
            lines,
            _dir: dir,
        }
    }

    /// A client that pins the server's printed certificate fingerprint.
    pub async fn client(&self) -> Client {
        Client::connect(
            self.quic,
            ClientOptions::new(Trust::Pinned(self.fingerprint.clone())),
        )
        .await
        .expect("client connects")
    }

    /// A client that pins the server's fingerprint and sends `token` with
    /// every request (none when `None`).
    pub async fn client_with_token(&self, token: Option<&str>) -> Client {
        let mut options = ClientOptions::new(Trust::Pinned(self.fingerprint.clone()));
        options.token = token.map(str::to_owned);
        Client::connect(self.quic, options)
            .await
            .expect("client connects")
    }

    /// Waits (bounded, 10 s) until `done` holds for the text of `/metrics`,
    /// and returns that text; panics with the last text if it never does.
    pub async fn wait_for_metrics(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.scrape().await;
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "never saw {what}:\n{text}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The server process's peak resident set (`VmHWM` of
    /// `/proc/PID/status`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib * 1024
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> String {
        http_get(self.metrics, "/metrics").await
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "quiver did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a started `quiver` child's stdout until its `quiver: ready` line
/// (bounded: 120 s, then the child is killed and the test fails with what
/// it printed); returns the lines. Later lines keep being drained, so the
/// child never blocks on a full pipe.
pub fn wait_ready(child: &mut Child) -> Vec<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("quiver did not become ready; it printed: {lines:#?}");
        };
        let ready = line == "quiver: ready";
        lines.push(line);
        if ready {
            // Keep draining in the background.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return lines;
        }
    }
}

/// The base URL of the REST listener, e.g. `http://127.0.0.1:PORT`.
impl Server {
    /// The process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration file [`Server::start`] wrote (rewrite it, then
    /// reload).
    pub fn config_file(&self) -> std::path::PathBuf {
        self._dir.path().join("quiver.toml")
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// A minimal HTTP/1.1 GET, enough to read `/metrics`.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("metrics answer in time")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    body.to_string()
}

/// The sum of the values of every sample of `name` whose labels include all
/// of `labels` (0 if none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}

/// The bearer token of [`OIP_CONFIG`].
pub const TOKEN: &str = "e2e-s3cret";

/// Largest request body of [`OIP_CONFIG`], in bytes.
pub const OIP_MAX_REQUEST_BYTES: usize = 65536;

/// The configuration of the Open Inference Protocol front-end tests: the
/// embedded default's models (`identity`, and `mlp` 16 -> 64 -> 4 from seed
/// 42), a bearer token (health exempt) and a 64 KiB request limit.
pub const OIP_CONFIG: &str = r#"
[server]
max_frame_bytes = 65536
auth_tokens = ["e2e-s3cret"]
auth_exempt_health = true

[[models]]
name = "identity"
kind = "identity"
max_batch_size = 64
default_timeout_ms = 10000

[[models]]
name = "mlp"
kind = "mlp"
max_batch_size = 32
default_timeout_ms = 10000
[models.demo]
inputs = 16
hidden = [64]
outputs = 4
activation = "relu"
seed = 42
"#;

/// The `mlp` of [`OIP_CONFIG`], loaded in-process to compute expected outputs.
pub fn oip_mlp_reference() -> std::sync::Arc<dyn quiver_kernels::Model> {
    quiver_kernels::load(
        &quiver_kernels::ModelSpec::MlpDemo {
            inputs: 16,
            hidden: vec![64],
            outputs: 4,
            activation: quiver_kernels::Activation::Relu,
            seed: 42,
        },
        &quiver_kernels::Device::Cpu,
    )
    .unwrap()
}

/// `rows` rows of 16 deterministic features.
pub fn mlp_rows(rows: usize) -> Vec<f32> {
    (0..rows * 16).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// What the reference `mlp` computes for `data` (`[rows, 16]`).
pub fn mlp_expected(data: &[f32]) -> Vec<f32> {
    use quiver_kernels::{HostTensor, TensorData};
    let model = oip_mlp_reference();
    let rows = data.len() / 16;
    let input = HostTensor::new("INPUT0", vec![rows, 16], TensorData::F32(data.to_vec())).unwrap();
    let prepared = model.prepare(vec![input]).unwrap();
    let out = model.forward(std::slice::from_ref(&prepared)).unwrap();
    match &out[0][0].data {
        TensorData::F32(v) => v.clone(),
        other => panic!("expected FP32, got {other:?}"),
    }
}

/// Asserts two float vectors agree to 1e-5 (relative), element by element.
pub fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

/// Little-endian bytes of f32s, as KServe raw tensors carry them.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32s of little-endian bytes.
pub fn f32s_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Checks a model's Triton configuration (`GET /v2/models/M/config`, as JSON)
/// against its KServe v2 metadata (`GET /v2/models/M`) the way Triton's
/// clients read them (perf_analyzer builds each request's shape from them): a
/// batching model (`max_batch_size` > 0), every tensor with non-empty `dims`,
/// and the metadata's shape = the batch dimension (-1) followed by `dims`.
pub fn assert_reads_as_triton_config(metadata: &serde_json::Value, config: &serde_json::Value) {
    let name = &config["name"];
    assert!(
        config["max_batch_size"].as_i64().unwrap() > 0,
        "{name}: max_batch_size {}",
        config["max_batch_size"]
    );
    for (meta_key, config_key) in [("inputs", "input"), ("outputs", "output")] {
        let tensors = config[config_key].as_array().unwrap();
        assert_eq!(
            tensors.len(),
            metadata[meta_key].as_array().unwrap().len(),
            "{name}: {config_key}"
        );
        for t in tensors {
            let dims: Vec<i64> = t["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            assert!(!dims.is_empty(), "{name}: {} has no dims: {t}", t["name"]);
            let meta = metadata[meta_key]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == t["name"])
                .unwrap_or_else(|| panic!("{name}: {} not in the metadata", t["name"]));
            let mut shape = vec![-1];
            shape.extend(&dims);
            assert_eq!(
                meta["shape"],
                serde_json::json!(shape),
                "{name}: {}",
                t["name"]
            );
        }
    }
}

/// A model slow enough that one request filling its whole batch budget
/// keeps the device busy for a while (see [`occupy_device`]).
pub const BIG_MODEL: &str = r#"
[[models]]
name = "big"
kind = "mlp"
max_batch_size = 2048
max_batch_tokens = 2048
default_timeout_ms = 60000
[models.demo]
inputs = 1024
hidden = [2048, 2048]
outputs = 8
"#;

/// Sends one request that fills the whole batch budget of [`BIG_MODEL`]
/// and waits (bounded) until its batch is on the device, so a request sent
/// next waits in the queue; the handle answers with the big response.
pub async fn occupy_device(
    server: &Server,
) -> tokio::task::JoinHandle<
    Result<quiver_gateway::proto::ModelInferResponse, quiver_gateway::client::ClientError>,
> {
    let client = server.client().await;
    let big = quiver_kernels::HostTensor::new(
        "INPUT0",
        vec![2048, 1024],
        quiver_kernels::TensorData::F32(vec![0.01; 2048 * 1024]),
    )
    .unwrap();
    let big_req =
        quiver_gateway::tensor::request_to_proto("big", "big", &[big], Default::default());
    let busy = tokio::spawn(async move { client.infer(&big_req).await });
    server
        .wait_for_metrics("the big batch on the device", |t| {
            metric(t, "quiver_batches_in_flight", &[("model", "big")]) >= 1.0
        })
        .await;
    busy
}

/// The workspace's root directory.
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$QUIVER_MODELS_DIR/<family>` (else `<workspace>/models/<family>`), where a
/// script wrote test models and their `manifest.json`; a missing manifest
/// fails the test with the script to run.
pub fn generated_models(family: &str, what: &str, script: &str) -> std::path::PathBuf {
    let root = match std::env::var_os("QUIVER_MODELS_DIR") {
        Some(root) => std::path::PathBuf::from(root),
        None => workspace().join("models"),
    };
    let dir = root.join(family);
    assert!(
        dir.join("manifest.json").is_file(),
        "no {what} in {}: run {script} (or set QUIVER_MODELS_DIR)",
        dir.display()
    );
    dir
}

/// The MiniLM test model: `$QUIVER_MODELS_DIR/all-MiniLM-L6-v2` (or
/// `$QUIVER_MODELS_DIR` itself), else `<workspace>/models/all-MiniLM-L6-v2`
/// (`scripts/fetch-models` puts it there).
pub fn minilm_dir() -> std::path::PathBuf {
    const MODEL: &str = "all-MiniLM-L6-v2";
    let dir = match std::env::var_os("QUIVER_MODELS_DIR") {
        Some(root) => {
            let root = std::path::PathBuf::from(root);
            let nested = root.join(MODEL);
            if nested.join("config.json").is_file() {
                nested
            } else {
                root
            }
        }
        None => workspace().join("models").join(MODEL),
    };
    assert!(
        dir.join("model.safetensors").is_file(),
        "{MODEL} is not in {}: run scripts/fetch-models (or set QUIVER_MODELS_DIR)",
        dir.display()
    );
    std::fs::canonicalize(dir).unwrap()
}

/// Sends `input` alone to the upstream pool `config` as model `model` (a
/// pool of its own, default policy, a 10 s deadline).
pub async fn infer_upstream(
    model: &str,
    config: &quiver_config::Upstream,
    input: &quiver_kernels::HostTensor,
) -> Result<quiver_gateway::upstream::Served, quiver_gateway::error::GatewayError> {
    let metrics = std::sync::Arc::new(quiver_gateway::metrics::Metrics::new());
    let pool = quiver_gateway::upstream::Upstream::new(model, config, metrics)
        .expect("the upstream pool builds");
    pool.infer(
        "",
        std::slice::from_ref(input),
        quiver_gateway::upstream::client::Policy::default(),
        Instant::now() + Duration::from_secs(10),
    )
    .await
}

/// POSTs `body` as JSON with bearer `token`; the status, headers and JSON
/// answer.
pub async fn post_json_with(
    c: &reqwest::Client,
    url: String,
    token: &str,
    body: &serde_json::Value,
) -> (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    serde_json::Value,
) {
    let r = c
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("the request is sent");
    let status = r.status();
    let headers = r.headers().clone();
    (status, headers, r.json().await.expect("a JSON answer"))
}

/// POSTs a KServe v2 binary-data request (the JSON `head`, then `raw`) to
/// `url` with `token` and expects 200: the answer's JSON header and the
/// binary bytes after it.
pub async fn post_binary(
    c: &reqwest::Client,
    url: String,
    token: &str,
    head: &str,
    raw: &[u8],
) -> (serde_json::Value, Vec<u8>) {
    let mut body = head.as_bytes().to_vec();
    body.extend_from_slice(raw);
    let r = c
        .post(url)
        .bearer_auth(token)
        .header("Inference-Header-Content-Length", head.len())
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("the request is sent");
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let json_len: usize = r
        .headers()
        .get("inference-header-content-length")
        .expect("a binary answer names its JSON header's length")
        .to_str()
        .expect("an ASCII header")
        .parse()
        .expect("a length");
    let bytes = r.bytes().await.expect("the answer's body");
    let (json, binary) = bytes.split_at(json_len);
    (
        serde_json::from_slice(json).expect("a JSON header"),
        binary.to_vec(),
    )
}
