//! Model lifecycle against the real binary: a model repository with
//! versions, Triton's repository API over REST and gRPC, a swap under load
//! that drops nothing, a failed load that changes nothing, polling, and
//! configuration reload (API and SIGHUP).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::inference::model_infer_request::InferInputTensor;
use quiver_gateway::proto::inference::{
    ModelInferRequest, ModelReadyRequest, RepositoryIndexRequest, RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
};
use quiver_kernels::{Activation, HostTensor, TensorData};
use serde_json::{Value, json};
use support::{Server, f32_bytes, f32s_of, metric};

/// The one input row every request sends.
fn row() -> Vec<f32> {
    (0..16).map(|i| (i as f32 * 0.61).cos()).collect()
}

/// Writes MLP weights (16 -> 32 -> 4) from `seed` as version `v` of `mlp`.
fn write_version(repo: &Path, v: u64, seed: u64) {
    quiver_kernels::mlp::write_mlp(
        &repo.join("mlp").join(v.to_string()),
        &[16, 32, 4],
        Activation::Relu,
        seed,
    )
    .unwrap();
}

/// What version `v` (weights of `seed`) computes for [`row`].
fn expected(repo: &Path, v: u64) -> Vec<f32> {
    let model = quiver_kernels::load(
        &quiver_kernels::ModelSpec::Mlp {
            dir: repo.join("mlp").join(v.to_string()),
        },
        &quiver_kernels::Device::Cpu,
    )
    .unwrap();
    let input = HostTensor::new("INPUT0", vec![1, 16], TensorData::F32(row())).unwrap();
    let prepared = model.prepare(vec![input]).unwrap();
    match &model.forward(std::slice::from_ref(&prepared)).unwrap()[0][0].data {
        TensorData::F32(v) => v.clone(),
        other => panic!("expected FP32, got {other:?}"),
    }
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

/// A repository with `mlp/model.toml` (`extra` appended) and version 1.
fn repository(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("mlp")).unwrap();
    std::fs::write(
        dir.path().join("mlp/model.toml"),
        format!("kind = \"mlp\"\nmax_batch_size = 32\ndefault_timeout_ms = 10000\n{extra}"),
    )
    .unwrap();
    write_version(dir.path(), 1, 1);
    dir
}

fn config(repo: &Path, server_extra: &str) -> String {
    format!(
        "[server]\nmodel_repository = \"{}\"\n{server_extra}\n",
        repo.display()
    )
}

fn native_request(version: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "mlp".into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 16],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(f32_bytes(&row()))],
        ..Default::default()
    }
}

/// One answer seen by a load generator: when its request left and its
/// answer came, the version the answer names and its output.
#[derive(Debug, Clone)]
struct Seen {
    sent: Instant,
    received: Instant,
    version: String,
    output: Vec<f32>,
}

type Log = Arc<Mutex<Vec<Result<Seen, String>>>>;

/// Sends [`row`] to `mlp` over QUIC native, REST (JSON) and gRPC from
/// several connections until `stop`, logging every outcome.
fn spawn_load(
    server: &Server,
    stop: Arc<AtomicBool>,
    log: Log,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (stop, log) = (stop.clone(), log.clone());
        let client = futures_client(server);
        tasks.push(tokio::spawn(async move {
            let client = client.await;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let r = client.infer(&native_request("")).await;
                let received = Instant::now();
                log.lock().unwrap().push(match r {
                    Ok(resp) => Ok(Seen {
                        sent,
                        received,
                        version: resp.model_version.clone(),
                        output: f32s_of(&resp.raw_output_contents[0]),
                    }),
                    Err(e) => Err(format!("quic: {e}")),
                });
            }
        }));
    }
    for _ in 0..2 {
        let (stop, log) = (stop.clone(), log.clone());
        let url = format!("{}/v2/models/mlp/infer", server.http_url());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let body = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": row()}]});
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let r = http.post(&url).json(&body).send().await;
                let outcome = match r {
                    Ok(resp) if resp.status().is_success() => {
                        let v: Value = resp.json().await.unwrap();
                        Ok(Seen {
                            sent,
                            received: Instant::now(),
                            version: v["model_version"].as_str().unwrap_or("").to_owned(),
                            output: v["outputs"][0]["data"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|x| x.as_f64().unwrap() as f32)
                                .collect(),
                        })
                    }
                    Ok(resp) => Err(format!(
                        "rest: {} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(format!("rest: {e}")),
                };
                log.lock().unwrap().push(outcome);
            }
        }));
    }
    {
        let (stop, log) = (stop.clone(), log.clone());
        let url = server.grpc_url();
        tasks.push(tokio::spawn(async move {
            let mut grpc = GrpcInferenceServiceClient::connect(url).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let r = grpc.model_infer(native_request("")).await;
                let received = Instant::now();
                log.lock().unwrap().push(match r {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        Ok(Seen {
                            sent,
                            received,
                            version: resp.model_version.clone(),
                            output: f32s_of(&resp.raw_output_contents[0]),
                        })
                    }
                    Err(e) => Err(format!("grpc: {e}")),
                });
            }
        }));
    }
    tasks
}

fn futures_client(
    server: &Server,
) -> impl std::future::Future<Output = quiver_gateway::client::Client> + Send + 'static {
    let (quic, fingerprint) = (server.quic, server.fingerprint.clone());
    async move {
        quiver_gateway::client::Client::connect(
            quic,
            quiver_gateway::client::ClientOptions::new(quiver_gateway::tls::Trust::Pinned(
                fingerprint,
            )),
        )
        .await
        .unwrap()
    }
}

async fn post(url: String, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn index(server: &Server) -> Vec<(String, String, String)> {
    let (status, v) = post(
        format!("{}/v2/repository/index", server.http_url()),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["version"].as_str().unwrap_or("").to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Under steady load on `mlp` over three protocols, version 2 (other
/// weights) is loaded beside version 1 and takes over the unversioned
/// requests, then version 1 is unloaded (a config override narrows the
/// version policy) and drains: every request is answered, none fails, each
/// answer is version 1's or version 2's output as its `model_version` says,
/// version 2's only once its load was asked for, and only version 2's for
/// requests sent after the load answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_takes_over_under_load_and_nothing_is_dropped() {
    let repo = repository("version_policy = \"all\"\n");
    write_version(repo.path(), 2, 2);
    let (want1, want2) = (expected(repo.path(), 1), expected(repo.path(), 2));
    assert!(!close(&want1, &want2), "the two versions must differ");
    std::fs::remove_dir_all(repo.path().join("mlp/2")).unwrap();

    let server = Server::start(&config(repo.path(), ""));
    assert_eq!(
        index(&server).await,
        vec![("mlp".into(), "1".into(), "READY".into())]
    );
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let tasks = spawn_load(&server, stop.clone(), log.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Version 2 appears in the repository and is loaded: both serve, the
    // newest takes the requests that name no version.
    write_version(repo.path(), 2, 2);
    let load_sent = Instant::now();
    let (status, report) = post(
        format!("{}/v2/repository/models/mlp/load", server.http_url()),
        json!({}),
    )
    .await;
    let load_answered = Instant::now();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["loaded"][0]["version"], "2", "{report}");
    assert_eq!(report["kept"], json!(["1"]), "{report}");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Version 1 leaves: Triton's version-policy spelling, as tritonclient
    // sends a config override.
    let (status, report) = post(
        format!("{}/v2/repository/models/mlp/load", server.http_url()),
        json!({"parameters": {"config": json!({"version_policy": {"specific": {"versions": ["2"]}}}).to_string()}}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["draining"], json!(["1"]), "{report}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let log = log.lock().unwrap().clone();
    let errors: Vec<&String> = log.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} failed: {errors:?}", errors.len());
    let seen: Vec<Seen> = log.into_iter().map(Result::unwrap).collect();
    assert!(seen.len() >= 200, "only {} requests under load", seen.len());
    let (mut v1, mut v2) = (0, 0);
    for s in &seen {
        match s.version.as_str() {
            "1" => {
                v1 += 1;
                assert!(close(&s.output, &want1), "version 1 answer {s:?}");
                assert!(
                    s.sent < load_answered,
                    "a request sent after version 2 was ready got version 1: {s:?}"
                );
            }
            "2" => {
                v2 += 1;
                assert!(close(&s.output, &want2), "version 2 answer {s:?}");
                assert!(
                    s.received > load_sent,
                    "version 2 answered before its load was asked for: {s:?}"
                );
            }
            other => panic!("answer names version '{other}': {s:?}"),
        }
    }
    assert!(v1 > 0 && v2 > 0, "v1 {v1} v2 {v2}");
    let span =
        seen.iter().map(|s| s.received).max().unwrap() - seen.iter().map(|s| s.sent).min().unwrap();
    eprintln!(
        "{} requests in {:.1} s ({:.0}/s) over QUIC, REST and gRPC: {v1} answered by version 1, \
         {v2} by version 2, 0 failed",
        seen.len(),
        span.as_secs_f64(),
        seen.len() as f64 / span.as_secs_f64()
    );

    // Version 1 drained and was freed; asking for it now is a typed 404.
    let text = server
        .wait_for_metrics("version 1 unloaded", |t| {
            metric(
                t,
                "quiver_model_unloads_total",
                &[("model", "mlp"), ("version", "1")],
            ) == 1.0
        })
        .await;
    assert_eq!(
        metric(
            &text,
            "quiver_model_ready",
            &[("model", "mlp"), ("version", "1")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "quiver_model_ready",
            &[("model", "mlp"), ("version", "2")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "quiver_model_loads_total",
            &[("model", "mlp"), ("outcome", "ok")]
        ),
        3.0,
        "start-up, version 2, the narrowed policy"
    );
    assert_eq!(
        index(&server).await,
        vec![("mlp".into(), "2".into(), "READY".into())]
    );
    let client = server.client().await;
    let err = client.infer(&native_request("1")).await.unwrap_err();
    assert!(err.to_string().contains("no version '1'"), "{err}");
    let resp = client.infer(&native_request("2")).await.unwrap();
    assert!(close(&f32s_of(&resp.raw_output_contents[0]), &want2));
    // HTTP/3 names versions in the path, as REST does.
    let mut h3 = support::h3::connect(&server).await;
    let body = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": row()}]});
    let answer = h3.post_json("/v2/models/mlp/versions/2/infer", &body).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["model_version"], "2");
    let answer = h3.post_json("/v2/models/mlp/versions/1/infer", &body).await;
    assert_eq!(answer.status, 404, "{}", answer.json());
    let answer = h3.get("/v2/models/mlp/versions/2/ready").await;
    assert_eq!(answer.status, 200);
    let meta: Value = reqwest::get(format!("{}/v2/models/mlp", server.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["versions"], json!(["2"]));
}

/// A version whose weights do not load leaves version 1 serving; the
/// error is on the API, in the index and in the failed-load counter. A bad
/// override and an unknown model are refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_leaves_the_serving_version_in_place() {
    let repo = repository("");
    let server = Server::start(&config(repo.path(), ""));
    let want1 = expected(repo.path(), 1);
    let broken = repo.path().join("mlp/2");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        repo.path().join("mlp/1/config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    std::fs::write(broken.join("model.safetensors"), b"not safetensors").unwrap();

    let load = format!("{}/v2/repository/models/mlp/load", server.http_url());
    let (status, v) = post(load.clone(), json!({})).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"].as_str().unwrap();
    assert!(message.contains("version 2"), "{message}");

    let client = server.client().await;
    let resp = client.infer(&native_request("")).await.unwrap();
    assert_eq!(resp.model_version, "1");
    assert!(close(&f32s_of(&resp.raw_output_contents[0]), &want1));
    let text = server.scrape().await;
    assert_eq!(
        metric(
            &text,
            "quiver_model_loads_total",
            &[("model", "mlp"), ("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(
        index(&server).await,
        vec![("mlp".into(), "1".into(), "READY".into())]
    );

    // An override with a bad knob: its path and the range, nothing changes.
    let (status, v) = post(
        load.clone(),
        json!({"parameters": {"config": "{\"max_batch_size\": 0}"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("mlp/model.toml.max_batch_size"),
        "{v}"
    );
    let (status, v) = post(
        format!("{}/v2/repository/models/nope/load", server.http_url()),
        json!({}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let resp = client.infer(&native_request("")).await.unwrap();
    assert_eq!(resp.model_version, "1");
}

/// `model_control = "explicit"`: nothing loads until asked. The gRPC
/// repository service indexes, loads and unloads; `ModelReady` says false
/// (not an error) for a model that does not serve, as Triton does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_control_loads_and_unloads_over_grpc() {
    let repo = repository("");
    let server = Server::start(&config(repo.path(), "model_control = \"explicit\""));
    let mut grpc = GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let ready = |grpc: &mut GrpcInferenceServiceClient<_>| {
        let mut grpc: GrpcInferenceServiceClient<tonic::transport::Channel> = grpc.clone();
        async move {
            grpc.model_ready(ModelReadyRequest {
                name: "mlp".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .ready
        }
    };
    let index = grpc
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(index.models.len(), 1);
    assert_eq!(index.models[0].name, "mlp");
    assert_eq!(index.models[0].state, "UNAVAILABLE");
    assert!(!ready(&mut grpc).await);
    let err = grpc.model_infer(native_request("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    grpc.repository_model_load(RepositoryModelLoadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(ready(&mut grpc).await);
    let resp = grpc
        .model_infer(native_request(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_version, "1");
    assert!(close(
        &f32s_of(&resp.raw_output_contents[0]),
        &expected(repo.path(), 1)
    ));
    let ready_only = grpc
        .repository_index(RepositoryIndexRequest {
            ready: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready_only.models[0].state, "READY");
    assert_eq!(ready_only.models[0].version, "1");

    grpc.repository_model_unload(RepositoryModelUnloadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!ready(&mut grpc).await);
    let err = grpc.model_infer(native_request("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err = grpc
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

/// `model_control = "poll"`: a new version directory is picked up (the
/// policy is the newest one), and a model whose directory goes is unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_picks_up_new_versions_and_removed_models() {
    let repo = repository("");
    let server = Server::start(&config(
        repo.path(),
        "model_control = \"poll\"\nrepository_poll_ms = 100",
    ));
    let client = server.client().await;
    assert_eq!(
        client
            .infer(&native_request(""))
            .await
            .unwrap()
            .model_version,
        "1"
    );
    write_version(repo.path(), 2, 2);
    let want2 = expected(repo.path(), 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = client.infer(&native_request("")).await.unwrap();
        if resp.model_version == "2" {
            assert!(close(&f32s_of(&resp.raw_output_contents[0]), &want2));
            break;
        }
        assert!(Instant::now() < deadline, "version 2 never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(repo.path().join("mlp")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.infer(&native_request("")).await {
            Err(e) if e.to_string().contains("unknown model") => break,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "mlp never unloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const RELOAD_BASE: &str = r#"
[server]
auth_tokens = ["first"]

[[models]]
name = "identity"
kind = "identity"
"#;

/// `method path` with `token`: the status and the JSON body (null if none).
async fn call(server: &Server, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn reload(server: &Server, token: &str) -> (u16, Value) {
    call(
        server,
        reqwest::Method::POST,
        "/v2/repository/reload",
        token,
    )
    .await
}

async fn model_config(server: &Server, token: &str, model: &str) -> (u16, Value) {
    let path = format!("/v2/models/{model}/config");
    call(server, reqwest::Method::GET, &path, token).await
}

/// The configuration file is re-read on `POST /v2/repository/reload` and on
/// SIGHUP: tokens change at once, a new inline model loads, a changed
/// batching knob reloads its model, a listener change is reported as
/// needing a restart, and an invalid file keeps everything as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_tokens_models_and_knobs_and_reports_what_needs_a_restart() {
    let server = Server::start(RELOAD_BASE);
    let file = server.config_file();
    assert_eq!(model_config(&server, "first", "identity").await.0, 200);
    // The reload is authenticated like inference.
    assert_eq!(reload(&server, "wrong").await.0, 401);

    let second = RELOAD_BASE
        .replace("\"first\"", "\"second\"")
        .replace("[server]\n", "[server]\nhttp_listen = \"127.0.0.1:1\"\n")
        + "\n[[models]]\nname = \"mlp\"\nkind = \"mlp\"\nmax_batch_size = 8\n[models.demo]\ninputs = 16\nhidden = [8]\noutputs = 2\n";
    std::fs::write(&file, &second).unwrap();
    let (status, report) = reload(&server, "first").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["needs_restart"],
        json!(["server.http_listen"]),
        "{report}"
    );
    let applied = report["applied"].to_string();
    assert!(applied.contains("server.auth_tokens"), "{report}");
    assert!(applied.contains("models.mlp: loaded"), "{report}");
    assert_eq!(model_config(&server, "first", "identity").await.0, 401);
    let (status, config) = model_config(&server, "second", "mlp").await;
    assert_eq!(status, 200);
    assert_eq!(config["max_batch_size"], 8);

    // An invalid file: every error with its path, nothing changes.
    std::fs::write(
        &file,
        second.replace("max_batch_size = 8", "max_batch_size = 0"),
    )
    .unwrap();
    let (status, v) = reload(&server, "second").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("models[1].max_batch_size"),
        "{v}"
    );
    assert_eq!(
        model_config(&server, "second", "mlp").await.1["max_batch_size"],
        8
    );

    // SIGHUP: a batching knob changes and the model is swapped.
    std::fs::write(
        &file,
        second.replace("max_batch_size = 8", "max_batch_size = 4"),
    )
    .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while model_config(&server, "second", "mlp").await.1["max_batch_size"] != 4 {
        assert!(Instant::now() < deadline, "SIGHUP never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = server.scrape().await;
    assert_eq!(
        metric(&text, "quiver_config_reloads_total", &[("outcome", "ok")]),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "quiver_config_reloads_total",
            &[("outcome", "invalid")]
        ),
        1.0
    );
}
