//! The `quiver` command: `serve`, `infer` and `config check`.
#![forbid(unsafe_code)]
// Nothing a peer sends may panic the gateway: outside tests, no unwrap or
// expect, no indexing or slicing that can panic, no panic! or unreachable!.
// The few local invariants that need one say why in an #[allow] on the item.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable
    )
)]

/// mimalloc rather than glibc's malloc: on the QUIC path, with ~37 allocations
/// per request, glibc's malloc and free were a fifth of the gateway's
/// instructions (their consolidation of freed chunks included).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quiver_config::Config;
use quiver_gateway::client::{Client, ClientOptions};
use quiver_gateway::json;
use quiver_gateway::serve::{self, Overrides};
use quiver_gateway::tls::Trust;

/// Quiver: an inference edge gateway. Clients send KServe v2 (Open Inference
/// Protocol) requests over QUIC; a deadline-aware dynamic batcher runs them on
/// the local devices.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve models. With no --config, serves the embedded default: the
    /// `identity` model and a demo MLP named `mlp`.
    ///
    /// On SIGTERM or SIGINT the gateway drains: readiness turns false, no new
    /// connection is accepted, and requests in flight get up to
    /// server.shutdown_grace_ms (default 10 s) to finish; what is still
    /// queued then gets UNAVAILABLE. The ports stay bound while it drains,
    /// so a new instance on the same ports starts once the old one printed
    /// "quiver: drained".
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Serve models as a CPU worker: the upstream gateways overflow to. The
    /// same models and batching as `serve`, every model on the CPU, over
    /// KServe v2 REST (HTTP/1.1, h2c) and gRPC only: no QUIC listener, no
    /// overflow of its own. See config/examples/worker.toml.
    Worker(WorkerArgs),
    /// Send one KServe v2 JSON inference request (read from stdin) over the
    /// QUIC native protocol and print the JSON response.
    Infer(InferArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (see config/examples/). Without it, the
    /// embedded default (config/examples/default.toml) is served.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address of the QUIC listener; overrides server.quic_listen
    /// (default 0.0.0.0:4433).
    #[arg(long, value_name = "ADDR")]
    quic_listen: Option<SocketAddr>,
    /// TCP address of the Prometheus /metrics listener, or `off`; overrides
    /// server.metrics_listen (default 0.0.0.0:8002).
    #[arg(long, value_name = "ADDR|off")]
    metrics_listen: Option<String>,
    /// TCP address of the KServe v2 REST listener (HTTP/1.1, h2c), or
    /// `off`; overrides server.http_listen (default 0.0.0.0:8000).
    #[arg(long, value_name = "ADDR|off")]
    http_listen: Option<String>,
    /// TCP address of the gRPC listener, or `off`; overrides
    /// server.grpc_listen (default 0.0.0.0:8001).
    #[arg(long, value_name = "ADDR|off")]
    grpc_listen: Option<String>,
    /// Write the self-signed certificate (when no [tls] is configured) to
    /// this file as PEM, for clients' --ca.
    #[arg(long, value_name = "FILE")]
    cert_out: Option<PathBuf>,
    /// Serve this model directory, without a configuration file; repeatable.
    /// `NAME=DIR` names the model, else it is the directory's name. The kind
    /// comes from the files: `tokenizer.json` or `modules.json` makes an
    /// `embedding`, a `config.json` with `layers` an `mlp`. Every other knob
    /// takes its default.
    #[arg(long = "model", value_name = "[NAME=]DIR", conflicts_with = "config")]
    models: Vec<String>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// TOML configuration file (e.g. config/examples/worker.toml). Without
    /// it, the embedded default's models are served.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Port of the KServe v2 REST listener, on the host of
    /// server.http_listen (0.0.0.0 if it is off); 0 takes any free port.
    #[arg(long, value_name = "N")]
    http_port: Option<u16>,
    /// Port of the gRPC listener, on the host of server.grpc_listen
    /// (0.0.0.0 if it is off); 0 takes any free port.
    #[arg(long, value_name = "N")]
    grpc_port: Option<u16>,
    /// Port of the Prometheus /metrics listener, on the host of
    /// server.metrics_listen (0.0.0.0 if it is off); 0 takes any free port.
    #[arg(long, value_name = "N")]
    metrics_port: Option<u16>,
}

#[derive(Debug, Args)]
struct InferArgs {
    /// The gateway's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433", value_name = "ADDR")]
    addr: SocketAddr,
    /// The model to call.
    #[arg(long, short = 'm')]
    model: String,
    /// Trust the server certificate(s) in this PEM file (e.g. the file
    /// `quiver serve --cert-out` wrote).
    #[arg(long, value_name = "FILE", group = "trust")]
    ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint, as
    /// `quiver serve` prints it.
    #[arg(long, value_name = "SHA256", group = "trust")]
    pin: Option<String>,
    /// Accept any server certificate (testing only: no protection against
    /// impersonation).
    #[arg(long, group = "trust")]
    insecure: bool,
    /// The name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// A client certificate chain (PEM) to present, for a server with
    /// `tls.client_ca` (mTLS); needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Read the request body from this file instead of stdin.
    #[arg(long, short = 'i', value_name = "FILE")]
    input: Option<PathBuf>,
    /// The bearer token, for a server with `server.auth_tokens`. Prefer the
    /// environment variable: other users of the machine can read a command
    /// line.
    #[arg(
        long,
        env = "QUIVER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file: exit 0 if valid, else list every
    /// error with its path and exit 2.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Serve(args) => serve_cmd(args),
        Command::Worker(args) => worker_cmd(args),
        Command::Infer(args) => infer_cmd(args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::from_file(&file) {
            Ok(config) => {
                println!(
                    "{}: valid ({} model{})",
                    file.display(),
                    config.models.len(),
                    if config.models.len() == 1 { "" } else { "s" }
                );
                let Some(dir) = &config.server.model_repository else {
                    return ExitCode::SUCCESS;
                };
                match quiver_gateway::lifecycle::check_repository(dir) {
                    Ok(lines) => {
                        println!(
                            "{}: valid model repository ({} model{})",
                            dir.display(),
                            lines.len(),
                            if lines.len() == 1 { "" } else { "s" }
                        );
                        for line in lines {
                            println!("  {line}");
                        }
                        ExitCode::SUCCESS
                    }
                    Err(errors) => {
                        eprintln!("{}: invalid model repository", dir.display());
                        for e in errors {
                            eprintln!("{e}");
                        }
                        ExitCode::from(2)
                    }
                }
            }
            Err(e) => {
                eprintln!("{}: invalid configuration\n{e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", Config::EMBEDDED_DEFAULT_TOML);
            ExitCode::SUCCESS
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: in `kubectl logs`, journald or a file the
    // escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("quiver-io")
        .build()
}

fn serve_cmd(args: ServeArgs) -> ExitCode {
    let config = if args.config.is_none() && !args.models.is_empty() {
        match config_for_dirs(&args.models) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("--model: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        match config_or_default(args.config.as_deref()) {
            Ok(c) => c,
            Err(code) => return code,
        }
    };
    let http_listen = match listen_flag("--http-listen", args.http_listen.as_deref()) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let grpc_listen = match listen_flag("--grpc-listen", args.grpc_listen.as_deref()) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let metrics_listen = match args.metrics_listen.as_deref() {
        None => None,
        Some("off") | Some("") => Some(None),
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(Some(a)),
            Err(e) => {
                eprintln!("--metrics-listen: '{s}' is not an address or 'off': {e}");
                return ExitCode::from(2);
            }
        },
    };
    let overrides = Overrides {
        quic_listen: args.quic_listen,
        metrics_listen,
        http_listen,
        grpc_listen,
        cert_out: args.cert_out,
        worker: false,
        config_path: args.config.clone(),
    };
    run_until_signal(config, overrides, "quiver")
}

/// Serves `config` until SIGINT or SIGTERM; `label` prefixes a fatal error.
fn run_until_signal(config: Config, overrides: Overrides, label: &str) -> ExitCode {
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(serve::run(config, overrides)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{label}: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once. Errors often quote
/// their source in their own message (`cannot bind udp ADDR: Address already
/// in use`), which anyhow's `{:#}` would print a second time.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The configuration file at `path`, or the embedded default; an invalid
/// file is reported with every error and exit code 2.
fn config_or_default(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    match path {
        Some(path) => Config::from_file(path).map_err(|e| {
            eprintln!("{}: invalid configuration\n{e}", path.display());
            ExitCode::from(2)
        }),
        None => Ok(Config::embedded_default()),
    }
}

fn worker_cmd(args: WorkerArgs) -> ExitCode {
    use std::net::{IpAddr, Ipv4Addr};
    let config = match config_or_default(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let host = |a: Option<SocketAddr>| a.map_or(any, |a| a.ip());
    let port = |configured: Option<SocketAddr>, flag: Option<u16>| {
        flag.map(|p| Some(SocketAddr::new(host(configured), p)))
    };
    let overrides = Overrides {
        quic_listen: None,
        metrics_listen: port(config.server.metrics_listen, args.metrics_port),
        http_listen: port(config.server.http_listen, args.http_port),
        grpc_listen: port(config.server.grpc_listen, args.grpc_port),
        cert_out: None,
        worker: true,
        config_path: args.config.clone(),
    };
    run_until_signal(config, overrides, "quiver worker")
}

/// The embedded default's server settings serving the `--model` directories.
fn config_for_dirs(args: &[String]) -> Result<Config, String> {
    let mut config = Config::embedded_default();
    config.models = args
        .iter()
        .map(|arg| model_for_dir(arg))
        .collect::<Result<_, _>>()?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// One `--model [NAME=]DIR`: its name and the kind its files show.
fn model_for_dir(arg: &str) -> Result<quiver_config::Model, String> {
    use quiver_config::{Model, ModelKind};
    let (name, dir) = match arg.split_once('=') {
        Some((name, dir)) => (Some(name.to_owned()), PathBuf::from(dir)),
        None => (None, PathBuf::from(arg)),
    };
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let name = match name {
        Some(n) => n,
        None => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| format!("{}: cannot name the model; use NAME=DIR", dir.display()))?,
    };
    let kind = if dir.join("tokenizer.json").is_file() || dir.join("modules.json").is_file() {
        ModelKind::Embedding
    } else if std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("layers").is_some())
    {
        ModelKind::Mlp
    } else if dir.join("model.json").is_file() || dir.join("model.txt").is_file() {
        ModelKind::Trees
    } else if dir.join("model.onnx").is_file() {
        ModelKind::Onnx
    } else {
        return Err(format!(
            "{}: not a model directory (no tokenizer.json or modules.json for an embedding, \
             no config.json with `layers` for an mlp, no model.json or model.txt for trees, \
             no model.onnx for onnx)",
            dir.display()
        ));
    };
    let mut model = Model::new(name, kind);
    model.path = Some(dir);
    Ok(model)
}

/// An `ADDR|off` flag: `None` when absent, `Some(None)` for `off`.
fn listen_flag(flag: &str, value: Option<&str>) -> Result<Option<Option<SocketAddr>>, ExitCode> {
    match value {
        None => Ok(None),
        Some("off") | Some("") => Ok(Some(None)),
        Some(s) => s.parse::<SocketAddr>().map(|a| Some(Some(a))).map_err(|e| {
            eprintln!("{flag}: '{s}' is not an address or 'off': {e}");
            ExitCode::from(2)
        }),
    }
}

fn infer_cmd(args: InferArgs) -> ExitCode {
    match infer(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("quiver infer: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn infer(args: InferArgs) -> anyhow::Result<ExitCode> {
    let mut body = String::new();
    match &args.input {
        Some(path) => body = std::fs::read_to_string(path)?,
        None => {
            std::io::stdin().read_to_string(&mut body)?;
        }
    }
    let value: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("the request body is not valid JSON: {e}"))?;
    let request = json::request_from_json(&args.model, &value)?;
    let trust = match (args.ca, args.pin, args.insecure) {
        (Some(ca), _, _) => Trust::CaFile(ca),
        (None, Some(pin), _) => Trust::Pinned(pin),
        (None, None, true) => Trust::Insecure,
        (None, None, false) => anyhow::bail!(
            "say how to trust the server: --ca FILE, --pin SHA256 (printed by `quiver serve`), or --insecure"
        ),
    };
    let mut options = ClientOptions::new(trust);
    options.server_name = args.server_name;
    options.token = args.token;
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        options.certificate = Some(std::sync::Arc::new(
            quiver_gateway::tls::Identity::from_pem_files(cert, key)?,
        ));
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let client = Client::connect(args.addr, options).await?;
        let result = client.infer(&request).await;
        client.close().await;
        match result {
            Ok(resp) => {
                let v = json::response_to_json(&resp)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                let code = e.code();
                eprintln!("quiver infer: {e}");
                Ok(match code {
                    Some(_) => ExitCode::from(3),
                    None => ExitCode::FAILURE,
                })
            }
        }
    })
}
