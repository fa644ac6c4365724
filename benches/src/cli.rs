//! The command line: `quiver-bench run` (a sweep of load steps against one
//! target, or two with `--compare`) and `quiver-bench echo-server`.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use quiver_gateway::tls::Trust;

use crate::echo_server::{EchoLimits, EchoServer};
use crate::inputs::{self, LengthDist, RequestPool, Shape};
use crate::load::{self, Load, Progress, StepPlan};
use crate::report::{self, RunReport, StepReport};
use crate::schedule::{Arrival, Schedule};
use crate::targets::{ConnectOptions, Target, TargetUrl};

/// Quiver's load generator: open- and closed-loop load against any KServe v2
/// (Open Inference Protocol) server over the QUIC native protocol, REST
/// over HTTP/1.1, HTTP/2 and HTTP/3, or gRPC, with latency measured from each request's
/// intended send time, goodput, and reports (table, JSON, CSV, SVG plot).
#[derive(Debug, Parser)]
#[command(name = "quiver-bench", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a sweep of load steps against a target and report each step.
    Run(Box<RunArgs>),
    /// Serve a bare QUIC echo (each stream answered with its own bytes): the
    /// transport's limit, measured with a `quic-echo://` target.
    EchoServer(EchoArgs),
    /// Start a gateway and two workers, drive the gateway past its local
    /// capacity while injecting faults (client resets, dropped connections,
    /// a worker killed and restarted, a worker frozen, an upstream that
    /// answers errors), and check that every request got exactly one
    /// outcome, the gateway's counters balance and its RSS and descriptors
    /// stay flat. Writes a JSON report and an SVG plot.
    Soak(crate::soak::SoakArgs),
    /// Write random weights of given names, dtypes and shapes (a
    /// safetensors header as JSON): a model of real dimensions without
    /// carrying its weights (`scripts/gpu-check`).
    GenWeights(crate::weights::GenWeightsArgs),
}

/// What the input tensors are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputKind {
    /// FP32 tensors of `--shape` in `--input-name` (identity, MLP).
    Tensor,
    /// Texts in a BYTES tensor of shape [1] in `--text-input-name`
    /// (embedding models), from `--texts` or the built-in corpus.
    Text,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The server: quic://HOST:PORT (Quiver's QUIC native protocol),
    /// quic-echo://HOST:PORT (an echo server), http:// or https:// (KServe v2
    /// REST over HTTP/1.1), h2c:// or h2:// (REST over HTTP/2, cleartext with
    /// prior knowledge or TLS), grpc://HOST:PORT (KServe v2 gRPC), h3://
    /// (REST over HTTP/3), or engine://local (no wire: a gateway in this
    /// process, its router called directly).
    #[arg(long, short)]
    pub target: String,
    /// A second server run with the same schedule, step by step interleaved
    /// with the first; ratios (second / first) are reported.
    #[arg(long)]
    pub compare: Option<String>,
    /// The model's name.
    #[arg(long, short, default_value = "identity")]
    pub model: String,
    /// The model of the `--compare` target, when it differs from `--model`:
    /// e.g. the same gateway's `local-only` twin of a `local-first` model,
    /// to measure overflow on and off side by side.
    #[arg(long, requires = "compare")]
    pub compare_model: Option<String>,

    /// Input kind.
    #[arg(long, value_enum, default_value_t = InputKind::Tensor)]
    pub input: InputKind,
    /// Shape of the FP32 input tensor, comma-separated.
    #[arg(long, default_value = "1,16")]
    pub shape: String,
    /// Name of the FP32 input tensor.
    #[arg(long, default_value = "INPUT0")]
    pub input_name: String,
    /// Texts, one a line (with `--input text`); default: the built-in corpus.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Words per built-in text: N, fixed:N or uniform:A-B (also uniform:A:B).
    #[arg(long, default_value = "uniform:8-64")]
    pub text_len: String,
    /// Name of the BYTES text input.
    #[arg(long, default_value = "text")]
    pub text_input_name: String,
    /// Distinct requests to cycle through.
    #[arg(long, default_value_t = 256)]
    pub pool: usize,

    /// Open loop: arrival rates (requests/s) to sweep, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "concurrency",
        required_unless_present = "concurrency"
    )]
    pub rate: Vec<f64>,
    /// Closed loop: numbers of concurrent clients to sweep, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<u32>,
    /// Open loop: the arrival process.
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,
    /// Seed of the arrival schedule and the inputs; the same seed gives the
    /// same schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds of warm-up per step, sent but not counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Per-request deadline in µs: sent as the `timeout` parameter, and the
    /// latency within which a result counts as goodput. Default: none sent,
    /// every result counts.
    #[arg(long)]
    pub deadline_us: Option<u64>,
    /// The `priority` parameter (1 = most urgent). Default: none sent.
    #[arg(long)]
    pub priority: Option<u32>,
    /// Open loop: requests in flight at most; past that the client waits,
    /// and the wait counts in the latency.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: u32,
    /// Seconds after which the client gives up on a request
    /// (`client_timeout`).
    #[arg(long, default_value_t = 30.0)]
    pub client_timeout: f64,
    /// QUIC connections per target, requests spread round-robin.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// REST and HTTP/3: send tensors with the binary tensor extension
    /// instead of JSON.
    #[arg(long)]
    pub binary: bool,
    /// engine://: the gateway configuration (TOML) to start in this process;
    /// default the embedded one (`identity` and `mlp` on the CPU).
    #[arg(long)]
    pub engine_config: Option<PathBuf>,

    /// Trust the server certificates in this PEM file.
    #[arg(long, conflicts_with_all = ["pin", "insecure"])]
    pub ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint.
    #[arg(long, conflicts_with = "insecure")]
    pub pin: Option<String>,
    /// Trust any certificate (testing only).
    #[arg(long)]
    pub insecure: bool,
    /// The name the server's certificate must hold; default the target's
    /// host, or `localhost` for an IP address.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Bearer token for a server that wants one (Quiver's
    /// `server.auth_tokens`): the `Authorization` header on REST and HTTP/3,
    /// metadata on gRPC, the `authorization` parameter on quic://. Prefer
    /// the environment variable: other users can read a command line.
    #[arg(
        long,
        env = "QUIVER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Write report.json, steps.csv and latency.svg into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar (it is off anyway when stderr is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4434")]
    pub listen: SocketAddr,
    /// Write the self-signed certificate (PEM) here, for `--ca`.
    #[arg(long)]
    pub cert_out: Option<PathBuf>,
    /// Concurrent streams per connection.
    #[arg(long, default_value_t = 1024)]
    pub max_concurrent_streams: u32,
}

fn seconds(name: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .with_context(|| format!("--{name} must be a non-negative number of seconds, got {s}"))
}

/// The steps of a sweep.
pub fn plans(args: &RunArgs) -> anyhow::Result<Vec<StepPlan>> {
    let warmup = seconds("warmup", args.warmup)?;
    let duration = seconds("duration", args.duration)?;
    anyhow::ensure!(duration > Duration::ZERO, "--duration must be positive");
    let client_timeout = seconds("client-timeout", args.client_timeout)?;
    let deadline = args.deadline_us.map(Duration::from_micros);
    let loads: Vec<Load> = if args.concurrency.is_empty() {
        args.rate
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                Ok(Load::Open {
                    schedule: Schedule::new(args.arrival, r, args.seed.wrapping_add(i as u64))?,
                    max_in_flight: args.max_in_flight,
                })
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        anyhow::ensure!(
            args.concurrency.iter().all(|&c| c > 0),
            "--concurrency values must be positive"
        );
        args.concurrency
            .iter()
            .map(|&c| Load::Closed { concurrency: c })
            .collect()
    };
    Ok(loads
        .into_iter()
        .map(|load| StepPlan {
            load,
            warmup,
            duration,
            deadline,
            client_timeout,
        })
        .collect())
}

/// The request pool of a run.
pub fn request_pool(args: &RunArgs) -> anyhow::Result<RequestPool> {
    anyhow::ensure!(args.pool > 0, "--pool must be positive");
    let payloads = match args.input {
        InputKind::Tensor => {
            let shape: Shape = args.shape.parse()?;
            inputs::tensor_payloads(&args.input_name, &shape, args.pool, args.seed)?
        }
        InputKind::Text => {
            let texts = match &args.texts {
                Some(path) => inputs::file_texts(path)?,
                None => {
                    let lengths: LengthDist = args.text_len.parse()?;
                    inputs::corpus_texts(lengths, args.pool, args.seed)
                }
            };
            inputs::text_payloads(&args.text_input_name, &texts)?
        }
    };
    Ok(RequestPool {
        model: args.model.clone(),
        payloads,
        parameters: inputs::policy_parameters(args.deadline_us, args.priority),
    })
}

fn trust(args: &RunArgs) -> Option<Trust> {
    if let Some(ca) = &args.ca {
        Some(Trust::CaFile(ca.clone()))
    } else if let Some(pin) = &args.pin {
        Some(Trust::Pinned(pin.clone()))
    } else if args.insecure {
        Some(Trust::Insecure)
    } else {
        None
    }
}

fn progress_bar(quiet: bool, label: &str, plan: &StepPlan) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let total = (plan.warmup + plan.duration).as_millis() as u64;
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{prefix:>32} [{bar:30}] {elapsed:>4} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

async fn run_one(
    target: Arc<Target>,
    name: &str,
    index: usize,
    plan: &StepPlan,
    quiet: bool,
) -> StepReport {
    let progress = Arc::new(Progress::default());
    let label = match plan.load {
        Load::Open { schedule, .. } => format!("{name} {}/s", schedule.rate()),
        Load::Closed { concurrency } => format!("{name} c={concurrency}"),
    };
    let bar = progress_bar(quiet, &label, plan);
    let ticker = {
        let bar = bar.clone();
        let progress = progress.clone();
        let warmup = plan.warmup;
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                use std::sync::atomic::Ordering::Relaxed;
                let elapsed = start.elapsed();
                bar.set_position(elapsed.as_millis() as u64);
                let phase = if elapsed < warmup {
                    "warm-up"
                } else {
                    "measuring"
                };
                bar.set_message(format!(
                    "{phase}: {} answers, {} errors",
                    progress.answered.load(Relaxed),
                    progress.errors.load(Relaxed)
                ));
            }
        })
    };
    let rec = load::run_step(target, plan, progress).await;
    ticker.abort();
    bar.finish_and_clear();
    StepReport::new(name, index, plan, &rec)
}

/// `quiver-bench run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let plans = plans(&args)?;
    let pool = request_pool(&args)?;
    let options = ConnectOptions {
        trust: trust(&args),
        server_name: args.server_name.clone(),
        connections: args.connections,
        binary: args.binary,
        engine_config: args.engine_config.clone(),
        token: args.token.clone(),
    };
    let mut targets = Vec::new();
    let compare_pool = args.compare_model.as_ref().map(|model| RequestPool {
        model: model.clone(),
        ..pool.clone()
    });
    for (i, name) in std::iter::once(&args.target)
        .chain(args.compare.as_ref())
        .enumerate()
    {
        let url: TargetUrl = name.parse()?;
        let (pool, label) = match (&compare_pool, i) {
            (Some(p), 1) => (p, format!("{name} {}", p.model)),
            _ if compare_pool.is_some() => (&pool, format!("{name} {}", pool.model)),
            _ => (&pool, name.clone()),
        };
        let target = Target::connect(&url, &options, pool)
            .await
            .with_context(|| format!("connecting to {name}"))?;
        targets.push((label, Arc::new(target)));
    }
    let mut steps: Vec<Vec<StepReport>> = vec![Vec::new(); targets.len()];
    for (i, plan) in plans.iter().enumerate() {
        // Interleaved: step i on every target before step i + 1 on any, so
        // drift in the machine's state touches both alike.
        for (t, (name, target)) in targets.iter().enumerate() {
            let s = run_one(target.clone(), name, i, plan, args.quiet).await;
            steps[t].push(s);
        }
    }
    let ratios = if steps.len() == 2 {
        report::ratios(&steps[0], &steps[1])
    } else {
        Vec::new()
    };
    let run = RunReport {
        tool: format!("quiver-bench {}", env!("CARGO_PKG_VERSION")),
        command: redact_token(std::env::args()),
        model: args.model.clone(),
        steps: steps.into_iter().flatten().collect(),
        ratios,
    };
    print!("{}", report::table(&run.steps));
    if !run.ratios.is_empty() {
        println!(
            "\n{} / {}:",
            args.compare.as_deref().unwrap_or(""),
            args.target
        );
        print!("{}", report::ratio_table(&run.ratios));
    }
    if let Some(dir) = &args.out {
        for path in report::write_files(dir, &run)? {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The command line with the value of `--token` hidden, for the report.
fn redact_token(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut hide_next = false;
    for arg in args {
        if std::mem::take(&mut hide_next) {
            out.push("<redacted>".into());
        } else if arg == "--token" {
            hide_next = true;
            out.push(arg);
        } else if arg.starts_with("--token=") {
            out.push("--token=<redacted>".into());
        } else {
            out.push(arg);
        }
    }
    out
}

/// `quiver-bench echo-server`.
pub async fn echo_server(args: EchoArgs) -> anyhow::Result<()> {
    let server = EchoServer::bind(
        args.listen,
        EchoLimits {
            max_concurrent_streams: args.max_concurrent_streams,
            ..EchoLimits::default()
        },
    )?;
    println!(
        "quiver-bench: echo server on udp {} (ALPN quiver/1); sha256 fingerprint {}",
        server.local_addr()?,
        server.identity.fingerprint()
    );
    if let (Some(path), Some(pem)) = (&args.cert_out, &server.identity.self_signed_pem) {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        println!("quiver-bench: certificate written to {}", path.display());
    }
    tokio::select! {
        _ = server.serve() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_never_holds_the_token() {
        let args = [
            "quiver-bench",
            "run",
            "--token",
            "s3cret",
            "--token=other",
            "-t",
            "quic://x",
        ];
        let shown = redact_token(args.iter().map(|s| s.to_string()));
        assert_eq!(
            shown,
            [
                "quiver-bench",
                "run",
                "--token",
                "<redacted>",
                "--token=<redacted>",
                "-t",
                "quic://x"
            ]
        );
    }
}
