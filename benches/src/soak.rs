//! `quiver-bench soak`: a gateway with two `quiver worker`s driven past its
//! local capacity for a given time while faults are injected on a schedule,
//! with accounting from both ends.
//!
//! What it starts (real processes on loopback, the `quiver` binary given by
//! `--quiver`): workers A and B and a gateway whose model `mlp` overflows to
//! them (and to endpoint C, which is down except while it answers errors),
//! plus `mlp_local` (the same weights, local only) to measure the local
//! capacity first. Then, for `--duration`, an open-loop load of
//! `--rate-factor` × that capacity over QUIC native, and every 20 s:
//!
//! - at 2 s worker A is SIGKILLed and started again 3 s later;
//! - at 8 s worker B is frozen (SIGSTOP) for the deadline plus a second,
//!   then thawed (SIGCONT);
//! - at 12 s endpoint C comes up as a worker whose `mlp` takes other
//!   inputs, so everything sent there is answered with an error, for 4 s;
//! - at 15 s one client connection is closed with requests in flight;
//! - all along, `--cancel-share` of the requests are reset by the client
//!   mid-flight.
//!
//! Accounting: every request the client sends ends in exactly one terminal
//! outcome (answered, a typed error, reset by the client, its connection
//! lost); the gateway's `quiver_requests_received_total` (QUIC) equals the
//! sum of its `quiver_requests_total` outcomes once traffic stops; its RSS
//! and open descriptors, sampled each second, end the steady state within
//! 10 % of where it began. A JSON report and an SVG plot go to `--out`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use quiver_gateway::client::{Client, ClientOptions};
use quiver_gateway::proto::ModelInferRequest;
use quiver_gateway::tls::Trust;
use quiver_kernels::{HostTensor, TensorData};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// `quiver-bench soak`'s arguments.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long the faulted load runs, in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// The offered load as a multiple of the local capacity measured first.
    #[arg(long, default_value_t = 1.5)]
    pub rate_factor: f64,
    /// Share of requests the client resets mid-flight.
    #[arg(long, default_value_t = 0.05)]
    pub cancel_share: f64,
    /// Each request's deadline (the `timeout` parameter), in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub deadline_ms: u64,
    /// Client connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// The `quiver` binary (default: the one beside quiver-bench).
    #[arg(long, value_name = "PATH")]
    pub quiver: Option<PathBuf>,
    /// Where the JSON report and the SVG plot go.
    #[arg(long, value_name = "DIR", default_value = "soak-report")]
    pub out: PathBuf,
}

/// One request's terminal outcome, seen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok,
    /// The gateway answered with this status (its name).
    Error(&'static str),
    /// The client reset the stream before the answer.
    Cancelled,
    /// The client's connection was closed under it.
    ConnectionLost,
    /// Nothing came back within the deadline plus 10 s: a lost request.
    NoAnswer,
}

impl Outcome {
    fn label(self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Error(code) => format!("error:{code}"),
            Outcome::Cancelled => "cancelled_by_client".into(),
            Outcome::ConnectionLost => "connection_lost".into(),
            Outcome::NoAnswer => "no_answer".into(),
        }
    }
}

/// One second of the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    pub t: u64,
    pub sent: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub rss_kib: u64,
    pub fds: u64,
    pub fault: Option<String>,
}

/// The report `soak` writes.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub duration_s: u64,
    pub local_capacity_rps: f64,
    pub offered_rps: f64,
    pub sent: u64,
    pub outcomes: BTreeMap<String, u64>,
    /// Requests with no terminal outcome: must be 0.
    pub lost: u64,
    pub gateway_received: f64,
    pub gateway_answered: BTreeMap<String, f64>,
    pub gateway_balance: f64,
    /// Requests of `mlp` that entered routing, and how each ended, by
    /// path and outcome (`quiver_routed_requests_total`).
    pub routed_admitted: f64,
    pub routed_by_path: BTreeMap<String, f64>,
    pub routed_balance: f64,
    pub rss_kib_steady_start: u64,
    pub rss_kib_end: u64,
    pub fds_steady_start: u64,
    pub fds_end: u64,
    pub timeline: Vec<Second>,
    pub faults: Vec<String>,
}

/// A `quiver` process and what it printed at start-up.
struct Proc {
    child: Child,
    lines: Vec<String>,
}

impl Proc {
    fn start(quiver: &Path, args: &[&str]) -> anyhow::Result<Proc> {
        let mut child = Command::new(quiver)
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", quiver.display()))?;
        let stdout = child.stdout.take().context("quiver's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                bail!("quiver {args:?} did not become ready; it printed {lines:?}");
            };
            let ready = line == "quiver: ready";
            lines.push(line);
            if ready {
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Ok(Proc { child, lines });
            }
        }
    }

    fn addr(&self, prefix: &str) -> anyhow::Result<SocketAddr> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .with_context(|| format!("no line '{prefix}…' in {:?}", self.lines))?
            .trim()
            .trim_end_matches("/metrics")
            .parse()
            .context("an address")
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now (bound and released), for a process that must
/// come back on the same one.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

const DEMO: &str = "[models.demo]\ninputs = 64\nhidden = [1024, 1024]\noutputs = 4\nactivation = \"relu\"\nseed = 11\n";

fn worker_config(port: u16, inputs: u32) -> String {
    format!(
        "[server]\nhttp_listen = \"off\"\ngrpc_listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"off\"\n\n\
         [[models]]\nname = \"mlp\"\nkind = \"mlp\"\nmax_batch_size = 64\ndefault_timeout_ms = 10000\n\
         {}",
        DEMO.replace("inputs = 64", &format!("inputs = {inputs}"))
    )
}

fn gateway_config(ports: [u16; 3]) -> String {
    let [a, b, c] = ports;
    format!(
        "[server]\nquic_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         http_listen = \"off\"\ngrpc_listen = \"off\"\n\n\
         [[models]]\nname = \"mlp\"\nkind = \"mlp\"\nmax_batch_size = 8\nqueue_capacity = 64\n\
         default_timeout_ms = 1000\n{DEMO}\n\
         [models.upstream]\nendpoints = [\"grpc://127.0.0.1:{a}\", \"grpc://127.0.0.1:{b}\", \"grpc://127.0.0.1:{c}\"]\n\
         probe_interval_ms = 200\nbase_ejection_ms = 500\nmax_ejection_ms = 2000\nconnect_timeout_ms = 200\n\n\
         [[models]]\nname = \"mlp_local\"\nkind = \"mlp\"\nmax_batch_size = 8\nqueue_capacity = 64\n\
         default_timeout_ms = 1000\nrouting = \"local-only\"\n{DEMO}"
    )
}

fn request(model: &str, deadline: Duration, seed: u64) -> ModelInferRequest {
    let row: Vec<f32> = (0..64).map(|i| ((seed + i) % 17) as f32 / 17.0).collect();
    let t = HostTensor::new("INPUT0", vec![1, 64], TensorData::F32(row)).expect("1 x 64");
    let params = [(
        "timeout".to_string(),
        quiver_gateway::tensor::int_param(i64::try_from(deadline.as_micros()).unwrap_or(i64::MAX)),
    )]
    .into();
    quiver_gateway::tensor::request_to_proto(model, "", &[t], params)
}

async fn connect(addr: SocketAddr, fingerprint: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(addr, ClientOptions::new(Trust::Pinned(fingerprint.into()))).await?)
}

/// Requests answered per second by a closed loop of `concurrency` on
/// `mlp_local` for `secs`.
async fn local_capacity(client: &Client, concurrency: usize, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (client, done) = (client.clone(), done.clone());
        tasks.spawn(async move {
            let mut i = w as u64;
            while Instant::now() < until {
                let req = request("mlp_local", Duration::from_secs(10), i);
                if client.infer(&req).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += concurrency as u64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// The series of metric `name` in a Prometheus text page: each one's
/// label text (what is inside the braces) and value.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name).then(|| Some((labels, value.parse::<f64>().ok()?)))?
        })
}

/// The value of label `key` in a series' label text.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels
        .split(&format!("{key}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
}

/// The value of `name` summed over the series that carry every one of
/// `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .filter(|(l, _)| labels.iter().all(|(k, v)| label(l, k) == Some(*v)))
        .map(|(_, v)| v)
        .sum()
}

/// `path/outcome` of `quiver_routed_requests_total{model="mlp"}`.
fn routed(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "quiver_routed_requests_total") {
        if let (Some("mlp"), Some(path), Some(outcome)) =
            (label(l, "model"), label(l, "path"), label(l, "outcome"))
        {
            *out.entry(format!("{path}/{outcome}")).or_default() += v;
        }
    }
    out
}

/// `outcome` of `quiver_requests_total{protocol="quic"}`.
fn answered(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "quiver_requests_total") {
        if let (Some("quic"), Some(outcome)) = (label(l, "protocol"), label(l, "outcome")) {
            *out.entry(outcome.to_owned()).or_default() += v;
        }
    }
    out
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: quiver\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

fn proc_status(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, fds)
}

fn quiver_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("quiver");
    if beside.exists() {
        return Ok(beside);
    }
    bail!(
        "no quiver binary beside {}: build it (cargo build --bin quiver) or pass --quiver PATH",
        me.display()
    )
}

/// Runs the soak; fails (after writing the report) when a request was lost,
/// the gateway's counters do not balance, or RSS or descriptors grew.
pub async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let quiver = quiver_path(args.quiver.clone())?;
    let dir = tempfile_dir()?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let write = |name: &str, text: String| -> anyhow::Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let cfg_a = write("worker-a.toml", worker_config(ports[0], 64))?;
    let cfg_b = write("worker-b.toml", worker_config(ports[1], 64))?;
    // Endpoint C's model takes other inputs: everything sent there fails.
    let cfg_c = write("worker-c.toml", worker_config(ports[2], 32))?;
    let cfg_g = write("gateway.toml", gateway_config(ports))?;
    let start_worker = |cfg: &str| Proc::start(&quiver, &["worker", "--config", cfg]);
    let mut worker_a = Some(start_worker(&cfg_a)?);
    let worker_b = start_worker(&cfg_b)?;
    let gateway = Proc::start(&quiver, &["serve", "--config", &cfg_g])?;
    let quic = gateway.addr("quiver: QUIC native (quiver/1) listening on udp ")?;
    let metrics_addr = gateway.addr("quiver: metrics on http://")?;
    let fingerprint = gateway
        .lines
        .iter()
        .find_map(|l| l.split("sha256 fingerprint ").nth(1))
        .context("the gateway's fingerprint")?
        .trim()
        .to_owned();
    let pid = gateway.child.id();

    let probe = connect(quic, &fingerprint).await?;
    let capacity = local_capacity(&probe, 8, 3).await.max(1.0);
    let rate = capacity * args.rate_factor;
    eprintln!(
        "soak: local capacity {capacity:.0} requests/s; offering {rate:.0}/s for {} s",
        args.duration
    );

    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(connect(quic, &fingerprint).await?);
    }
    let clients = Arc::new(Mutex::new(clients));
    let deadline = Duration::from_millis(args.deadline_ms);
    let sent = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Outcome)>();
    let started = Instant::now();
    let mut timeline: Vec<Second> = (0..args.duration)
        .map(|t| Second {
            t,
            ..Second::default()
        })
        .collect();
    let mut faults = Vec::new();

    // The load: one task per request, open loop.
    let load = {
        let (clients, sent, done_tx) = (clients.clone(), sent.clone(), done_tx.clone());
        let duration = Duration::from_secs(args.duration);
        let cancel_share = args.cancel_share;
        tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0u64;
            while started.elapsed() < duration {
                tick.tick().await;
                let client = {
                    let c = clients.lock().expect("clients");
                    c[(i as usize) % c.len()].clone()
                };
                let second = started.elapsed().as_secs();
                let cancel_after = (rng.random::<f64>() < cancel_share)
                    .then(|| Duration::from_micros(rng.random_range(100..20_000)));
                let req = request("mlp", deadline, i);
                sent.fetch_add(1, Ordering::Relaxed);
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let call = client.infer(&req);
                    let outcome = match cancel_after {
                        Some(after) => match tokio::time::timeout(after, call).await {
                            Ok(r) => classify(r),
                            // Dropping the call resets its stream.
                            Err(_) => Outcome::Cancelled,
                        },
                        None => {
                            match tokio::time::timeout(deadline + Duration::from_secs(10), call)
                                .await
                            {
                                Ok(r) => classify(r),
                                Err(_) => Outcome::NoAnswer,
                            }
                        }
                    };
                    let _ = done_tx.send((second, outcome));
                });
                i += 1;
            }
        })
    };
    drop(done_tx);

    // Faults and sampling, once a second.
    let mut worker_c: Option<Proc> = None;
    let mut b_frozen_until: Option<Instant> = None;
    let mut a_restart_at: Option<Instant> = None;
    let mut c_stop_at: Option<Instant> = None;
    for t in 0..args.duration {
        let at = started + Duration::from_secs(t);
        tokio::time::sleep_until(at.into()).await;
        let mut fault = None;
        match t % 20 {
            2 if worker_a.is_some() => {
                worker_a = None; // SIGKILL (Proc's drop)
                a_restart_at = Some(Instant::now() + Duration::from_secs(3));
                fault = Some("worker A SIGKILLed".to_string());
            }
            8 => {
                worker_b.signal("-STOP");
                b_frozen_until = Some(Instant::now() + deadline + Duration::from_secs(1));
                fault = Some("worker B frozen (SIGSTOP)".to_string());
            }
            12 if worker_c.is_none() => {
                worker_c = Some(start_worker(&cfg_c)?);
                c_stop_at = Some(Instant::now() + Duration::from_secs(4));
                fault = Some("endpoint C up, answering errors".to_string());
            }
            15 => {
                let fresh = connect(quic, &fingerprint).await?;
                let old = std::mem::replace(&mut clients.lock().expect("clients")[0], fresh);
                // Closed with its requests in flight.
                old.connection().close(0u32.into(), b"soak: dropped");
                fault = Some("client connection 0 closed with requests in flight".to_string());
            }
            _ => {}
        }
        if b_frozen_until.is_some_and(|u| Instant::now() >= u) {
            worker_b.signal("-CONT");
            b_frozen_until = None;
            fault.get_or_insert_with(|| "worker B thawed (SIGCONT)".into());
        }
        if a_restart_at.is_some_and(|u| Instant::now() >= u) {
            worker_a = Some(start_worker(&cfg_a)?);
            a_restart_at = None;
            fault.get_or_insert_with(|| "worker A restarted".into());
        }
        if c_stop_at.is_some_and(|u| Instant::now() >= u) {
            worker_c = None;
            c_stop_at = None;
            fault.get_or_insert_with(|| "endpoint C down again".into());
        }
        let (rss, fds) = proc_status(pid);
        if let Some(s) = timeline.get_mut(t as usize) {
            s.rss_kib = rss;
            s.fds = fds;
            s.fault = fault.clone();
        }
        if let Some(f) = fault {
            faults.push(format!("{t} s: {f}"));
        }
    }
    load.await?;
    if b_frozen_until.is_some() {
        worker_b.signal("-CONT");
    }

    // Every request's one outcome.
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut finished = 0u64;
    while let Some((second, outcome)) = done_rx.recv().await {
        finished += 1;
        *outcomes.entry(outcome.label()).or_default() += 1;
        if let Some(s) = timeline.get_mut(second as usize) {
            s.sent += 1;
            *s.outcomes.entry(outcome.label()).or_default() += 1;
        }
    }
    let sent = sent.load(Ordering::Relaxed);
    // No outcome at all, or none in time: lost either way.
    let lost = sent.saturating_sub(finished) + outcomes.get("no_answer").copied().unwrap_or(0);

    // The gateway's counters, once its last answers are counted.
    let mut received = 0.0;
    let mut answered_by = BTreeMap::new();
    let mut admitted = 0.0;
    let mut by_path = BTreeMap::new();
    for _ in 0..50 {
        let text = scrape(metrics_addr).await?;
        received = metric_sum(
            &text,
            "quiver_requests_received_total",
            &[("protocol", "quic")],
        );
        answered_by = answered(&text);
        admitted = metric_sum(&text, "quiver_admitted_requests_total", &[("model", "mlp")]);
        by_path = routed(&text);
        if (received - answered_by.values().sum::<f64>()).abs() < 0.5
            && (admitted - by_path.values().sum::<f64>()).abs() < 0.5
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The calibration's requests are in the gateway's counts too; they
    // were all answered, so the balance holds over both.
    let balance = received - answered_by.values().sum::<f64>();

    let steady = &timeline[timeline.len() / 5..];
    let first = |f: fn(&Second) -> u64| steady.first().map_or(0, f);
    let last = |f: fn(&Second) -> u64| steady.last().map_or(0, f);
    let report = SoakReport {
        duration_s: args.duration,
        local_capacity_rps: capacity,
        offered_rps: rate,
        sent,
        outcomes,
        lost,
        gateway_received: received,
        gateway_answered: answered_by,
        gateway_balance: balance,
        routed_balance: admitted - by_path.values().sum::<f64>(),
        routed_admitted: admitted,
        routed_by_path: by_path,
        rss_kib_steady_start: first(|s| s.rss_kib),
        rss_kib_end: last(|s| s.rss_kib),
        fds_steady_start: first(|s| s.fds),
        fds_end: last(|s| s.fds),
        timeline,
        faults,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("soak.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    let svg = args.out.join("soak.svg");
    plot(&svg, &report)?;
    print_summary(&report);
    println!("soak: wrote {} and {}", json.display(), svg.display());
    let _ = std::fs::remove_dir_all(&dir);

    if report.lost != 0 {
        bail!("{} requests got no terminal outcome", report.lost);
    }
    if report.gateway_balance.abs() > 0.5 {
        bail!(
            "the gateway received {} requests but answered {} (by outcome: {:?})",
            report.gateway_received,
            report.gateway_received - report.gateway_balance,
            report.gateway_answered
        );
    }
    if report.routed_balance.abs() > 0.5 {
        bail!(
            "{} requests of mlp entered routing but {} ended there (by path/outcome: {:?})",
            report.routed_admitted,
            report.routed_admitted - report.routed_balance,
            report.routed_by_path
        );
    }
    let grew = |start: u64, end: u64| end as f64 > start as f64 * 1.10;
    if grew(report.rss_kib_steady_start, report.rss_kib_end) {
        bail!(
            "RSS grew from {} KiB to {} KiB over the steady state",
            report.rss_kib_steady_start,
            report.rss_kib_end
        );
    }
    // A handful of descriptors come and go with the faults (a restarted
    // worker's new connection): growth counts past 10 % and past 4.
    if grew(report.fds_steady_start, report.fds_end) && report.fds_end > report.fds_steady_start + 4
    {
        bail!(
            "open descriptors grew from {} to {} over the steady state",
            report.fds_steady_start,
            report.fds_end
        );
    }
    Ok(())
}

fn classify(
    r: Result<quiver_gateway::proto::ModelInferResponse, quiver_gateway::client::ClientError>,
) -> Outcome {
    use quiver_gateway::client::ClientError;
    match r {
        Ok(_) => Outcome::Ok,
        Err(ClientError::Status { code, .. }) => Outcome::Error(code.as_str()),
        Err(_) => Outcome::ConnectionLost,
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("quiver-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn print_summary(r: &SoakReport) {
    println!(
        "soak: {} s, local capacity {:.0}/s, offered {:.0}/s; sent {}, lost {}",
        r.duration_s, r.local_capacity_rps, r.offered_rps, r.sent, r.lost
    );
    for (k, v) in &r.outcomes {
        println!("soak:   {k:<40} {v}");
    }
    println!(
        "soak: gateway received {} (QUIC), answered {} ({:?}), balance {}",
        r.gateway_received,
        r.gateway_answered.values().sum::<f64>(),
        r.gateway_answered,
        r.gateway_balance
    );
    println!(
        "soak: mlp routed: admitted {}, ended {} by path/outcome {:?}, balance {}",
        r.routed_admitted,
        r.routed_by_path.values().sum::<f64>(),
        r.routed_by_path,
        r.routed_balance
    );
    println!(
        "soak: RSS {} -> {} KiB, descriptors {} -> {} (steady state start -> end)",
        r.rss_kib_steady_start, r.rss_kib_end, r.fds_steady_start, r.fds_end
    );
}

fn plot(path: &Path, r: &SoakReport) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(640);
    let t_max = r.duration_s.max(1) as f64;
    let mut labels: Vec<String> = r.outcomes.keys().cloned().collect();
    labels.sort();
    let y_max = r.timeline.iter().map(|s| s.sent as f64).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption("requests per second, by outcome", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("requests sent in that second")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, label) in std::iter::once("sent".to_string())
        .chain(labels)
        .enumerate()
    {
        let color = Palette99::pick(i).to_rgba();
        let points = r.timeline.iter().map(|s| {
            let v = if label == "sent" {
                s.sent
            } else {
                s.outcomes.get(&label).copied().unwrap_or(0)
            };
            (s.t as f64, v as f64)
        });
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rss_max = r
        .timeline
        .iter()
        .map(|s| s.rss_kib as f64 / 1024.0)
        .fold(1.0, f64::max)
        * 1.2;
    let mut mem = ChartBuilder::on(&right)
        .caption("gateway RSS and open descriptors", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..rss_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    mem.configure_mesh()
        .x_desc("time (s)")
        .y_desc("RSS (MiB); descriptors / 10")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    mem.draw_series(LineSeries::new(
        r.timeline
            .iter()
            .map(|s| (s.t as f64, s.rss_kib as f64 / 1024.0)),
        BLUE,
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .label("RSS (MiB)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    mem.draw_series(LineSeries::new(
        r.timeline.iter().map(|s| (s.t as f64, s.fds as f64 / 10.0)),
        RED,
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .label("descriptors / 10")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    mem.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TEXT: &str = "# HELP quiver_requests_total x\n\
        quiver_requests_total{model=\"mlp\",protocol=\"quic\",outcome=\"ok\"} 10\n\
        quiver_requests_total{model=\"\",protocol=\"quic\",outcome=\"invalid_argument\"} 2\n\
        quiver_requests_total{model=\"mlp\",protocol=\"http\",outcome=\"ok\"} 99\n\
        quiver_requests_received_total{protocol=\"quic\"} 12\n\
        quiver_routed_requests_total{model=\"mlp\",path=\"local\",outcome=\"ok\"} 7\n\
        quiver_routed_requests_total{model=\"mlp\",path=\"upstream\",outcome=\"cancelled\"} 3\n\
        quiver_routed_requests_total{model=\"mlp_local\",path=\"local\",outcome=\"ok\"} 5\n";

    #[test]
    fn the_gateway_counts_are_read_by_protocol_and_outcome() {
        assert_eq!(
            metric_sum(
                TEXT,
                "quiver_requests_received_total",
                &[("protocol", "quic")]
            ),
            12.0
        );
        let a = answered(TEXT);
        assert_eq!(a.get("ok"), Some(&10.0));
        assert_eq!(a.get("invalid_argument"), Some(&2.0));
        assert_eq!(a.values().sum::<f64>(), 12.0);
        let r = routed(TEXT);
        assert_eq!(r.get("local/ok"), Some(&7.0));
        assert_eq!(r.get("upstream/cancelled"), Some(&3.0));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn every_outcome_has_its_own_label() {
        let all = [
            Outcome::Ok,
            Outcome::Error("UNAVAILABLE"),
            Outcome::Cancelled,
            Outcome::ConnectionLost,
            Outcome::NoAnswer,
        ];
        let labels: std::collections::BTreeSet<String> = all.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), all.len());
    }
}
