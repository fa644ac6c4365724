//! `quiver serve`: builds the gateway from its configuration, serves until
//! SIGINT or SIGTERM, then drains.
//!
//! Start-up order: TLS identity, models (loaded and calibrated, each on its
//! own device thread), the router, then the listeners; `ready` is printed
//! last. Shutdown: new connections are refused, in-flight streams get up to
//! `shutdown_grace` to finish, then every queued request is answered with
//! `UNAVAILABLE` and the device threads stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use quiver_batching::{LatencyModel, Scheduler, SchedulerConfig};
use quiver_config::{Config, ModelKind};
use quiver_kernels::{Activation, Device, ModelSpec};

use crate::device::{self, DeviceWorker};
use crate::frontend::auth::Auth;
use crate::frontend::h3::{self, H3Service};
use crate::frontend::quic::{self, InFlight, QuicLimits};
use crate::frontend::{grpc, http};
use crate::metrics::Metrics;
use crate::router::{ModelEntry, Router};
use crate::tls::Identity;

/// Prints a start-up or shutdown line on stdout, ignoring a closed stdout:
/// the gateway keeps serving when whoever started it stops reading.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// Command-line overrides of the configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Replaces `server.quic_listen`.
    pub quic_listen: Option<SocketAddr>,
    /// Replaces `server.metrics_listen` (`Some(None)` turns metrics off).
    pub metrics_listen: Option<Option<SocketAddr>>,
    /// Replaces `server.http_listen` (`Some(None)` turns REST on TCP off).
    pub http_listen: Option<Option<SocketAddr>>,
    /// Replaces `server.grpc_listen` (`Some(None)` turns gRPC off).
    pub grpc_listen: Option<Option<SocketAddr>>,
    /// Where to write the self-signed certificate as PEM, for `--ca`.
    pub cert_out: Option<PathBuf>,
    /// `quiver worker`: serve on the CPU only, over REST and gRPC, without
    /// the QUIC listener and without overflow (see [`worker_config`]).
    pub worker: bool,
}

/// The configuration a `quiver worker` serves: every model on the CPU,
/// `local-only`, without upstreams. A worker is the upstream; it never
/// overflows further, and a CPU build serves a config written for a GPU box.
pub fn worker_config(mut config: Config) -> Config {
    for m in &mut config.models {
        if m.device != "cpu" {
            tracing::info!(model = %m.name, device = %m.device, "worker: serving on the CPU instead");
        }
        m.device = "cpu".into();
        m.routing = quiver_config::Routing::LocalOnly;
        m.upstream = None;
    }
    config
}

/// Runs the gateway until a shutdown signal.
pub async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    if let Some(addr) = overrides.quic_listen {
        config.server.quic_listen = addr;
    }
    if let Some(m) = overrides.metrics_listen {
        config.server.metrics_listen = m;
    }
    if let Some(a) = overrides.http_listen {
        config.server.http_listen = a;
    }
    if let Some(a) = overrides.grpc_listen {
        config.server.grpc_listen = a;
    }
    let gateway = if overrides.worker {
        let config = worker_config(config.clone());
        Gateway::start_worker(&config).await?
    } else {
        Gateway::start(&config, overrides.cert_out.as_deref()).await?
    };
    // The handlers are registered before `ready` is printed: a signal sent
    // as soon as it is seen drains the gateway instead of killing it.
    let signal = shutdown_signal();
    say!("quiver: ready");
    signal.await;
    let grace = config.server.shutdown_grace;
    say!(
        "quiver: draining: not ready, no new connections; requests in flight get up to {} ms \
         (shutdown_grace_ms) to finish, and the ports stay bound until then",
        grace.as_millis()
    );
    let started = std::time::Instant::now();
    gateway.shutdown(grace).await;
    say!(
        "quiver: drained in {} ms; the ports are free",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// The QUIC listener (native protocol and HTTP/3); none for a worker.
    pub quic_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// The REST listener on TCP, if on.
    pub http_addr: Option<SocketAddr>,
    /// The gRPC listener on TCP, if on.
    pub grpc_addr: Option<SocketAddr>,
    endpoint: Option<quinn::Endpoint>,
    router: Arc<Router>,
    in_flight: Arc<InFlight>,
    stop_metrics: Option<tokio::sync::oneshot::Sender<()>>,
    tcp: TcpListeners,
}

impl Gateway {
    /// The router, for in-process callers: the bench harness's `engine://`
    /// target drives it directly to measure the engine without the wire.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Loads the models, binds the listeners and starts serving. Prints
    /// where it listens.
    pub async fn start(
        config: &Config,
        cert_out: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Self::start_inner(config, cert_out, true).await
    }

    /// As [`Gateway::start`] for `quiver worker`: REST and gRPC only, no
    /// QUIC listener. Pass the configuration through [`worker_config`].
    pub async fn start_worker(config: &Config) -> anyhow::Result<Self> {
        Self::start_inner(config, None, false).await
    }

    async fn start_inner(
        config: &Config,
        cert_out: Option<&std::path::Path>,
        quic_on: bool,
    ) -> anyhow::Result<Self> {
        let identity = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Identity::from_pem_files(cert, key)?,
            _ => Identity::self_signed(&[])?,
        };
        if identity.self_signed {
            say!(
                "quiver: TLS certificate is self-signed; sha256 fingerprint {}",
                identity.fingerprint()
            );
            if let (Some(path), Some(pem)) = (cert_out, &identity.self_signed_pem) {
                std::fs::write(path, pem)
                    .with_context(|| format!("writing the certificate to {}", path.display()))?;
                say!("quiver: certificate written to {}", path.display());
            }
        } else {
            say!(
                "quiver: TLS certificate sha256 fingerprint {}",
                identity.fingerprint()
            );
        }

        let metrics = Arc::new(Metrics::new());
        let mut router = Router::with_metrics(metrics.clone());
        for m in &config.models {
            let entry =
                load_model(m, metrics.clone()).with_context(|| format!("model '{}'", m.name))?;
            router.insert(entry);
        }
        for m in router.models() {
            if let Some(up) = &m.upstream {
                up.resolve_now().await;
            }
        }
        let router = Arc::new(router);
        // One request-memory budget for every front end (and, through the
        // requests it counts, the queues and the upstream calls).
        let budget = crate::budget::MemoryBudget::new(
            config.server.max_inflight_bytes,
            metrics.inflight_bytes.clone(),
        );

        let limits = QuicLimits {
            max_frame_bytes: config.server.max_frame_bytes,
            max_concurrent_streams: config.server.max_concurrent_streams,
            max_connections: config.server.max_connections,
            max_connections_per_source: config.server.max_connections_per_source,
            request_read_timeout: config.server.request_read_timeout,
            memory: budget.clone(),
            idle_timeout: config.server.idle_timeout,
        };
        let in_flight = Arc::new(InFlight::default());
        let ready = Arc::new(AtomicBool::new(true));
        let auth = Auth::new(&config.server.auth_tokens, config.server.auth_exempt_health);
        let max_body_bytes = config.server.max_frame_bytes as usize;
        let api = |protocol| http::Api {
            router: router.clone(),
            metrics: metrics.clone(),
            auth: auth.clone(),
            max_body_bytes,
            request_read_timeout: config.server.request_read_timeout,
            budget: budget.clone(),
            ready: ready.clone(),
            protocol,
        };
        let h3_service = H3Service {
            app: http::app(api(h3::PROTOCOL)),
            auth: auth.clone(),
            metrics: metrics.clone(),
            max_body_bytes,
            request_read_timeout: config.server.request_read_timeout,
            budget: budget.clone(),
            in_flight: in_flight.clone(),
        };
        let (endpoint, quic_addr) = if quic_on {
            let endpoint = quic::bind(config.server.quic_listen, &identity, &limits)?;
            let quic_addr = endpoint.local_addr()?;
            say!("quiver: QUIC native (quiver/1) listening on udp {quic_addr}");
            say!("quiver: HTTP/3 (h3) listening on udp {quic_addr}");
            tokio::spawn(quic::serve(
                endpoint.clone(),
                router.clone(),
                metrics.clone(),
                auth.clone(),
                limits,
                in_flight.clone(),
                Some(h3_service),
            ));
            (Some(endpoint), Some(quic_addr))
        } else {
            (None, None)
        };

        let mut tcp = TcpListeners {
            ready: ready.clone(),
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        let tcp_limits = http::TcpLimits {
            max_connections: config.server.max_connections,
            max_connections_per_source: config.server.max_connections_per_source,
            max_concurrent_streams: config.server.max_concurrent_streams,
            header_timeout: config.server.idle_timeout,
        };
        let grace = config.server.shutdown_grace;
        let http_addr = match config.server.http_listen {
            Some(addr) => {
                let app = http::app(api(http::PROTOCOL));
                let bound = tcp
                    .spawn(
                        addr,
                        app,
                        tcp_limits.clone(),
                        false,
                        &metrics,
                        http::PROTOCOL,
                        grace,
                    )
                    .await
                    .with_context(|| format!("binding the REST listener on tcp {addr}"))?;
                say!("quiver: REST (HTTP/1.1, h2c) listening on http://{bound}");
                Some(bound)
            }
            None => None,
        };
        let grpc_addr = match config.server.grpc_listen {
            Some(addr) => {
                let service = grpc::InferenceService {
                    router: router.clone(),
                    metrics: metrics.clone(),
                    auth: auth.clone(),
                    ready: ready.clone(),
                    budget: budget.clone(),
                };
                let app = tonic::service::Routes::new(service.into_server(max_body_bytes))
                    .into_axum_router();
                let bound = tcp
                    .spawn(addr, app, tcp_limits, true, &metrics, grpc::PROTOCOL, grace)
                    .await
                    .with_context(|| format!("binding the gRPC listener on tcp {addr}"))?;
                say!("quiver: gRPC listening on tcp {bound}");
                Some(bound)
            }
            None => None,
        };

        let (metrics_addr, stop_metrics) = match config.server.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics listener on tcp {addr}"))?;
                let bound = listener.local_addr()?;
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let stop = async move {
                        let _ = rx.await;
                    };
                    if let Err(e) = crate::metrics::serve(listener, metrics, stop).await {
                        tracing::error!(error = %e, "metrics listener failed");
                    }
                });
                say!("quiver: metrics on http://{bound}/metrics");
                (Some(bound), Some(tx))
            }
            None => (None, None),
        };
        for m in router.models() {
            say!(
                "quiver: serving model '{}' ({}) on {}",
                m.name,
                m.model.kind(),
                m.model.device()
            );
            if let Some(up) = &m.upstream {
                say!(
                    "quiver: model '{}' routing {} with {} upstream endpoint(s)",
                    m.name,
                    m.routing,
                    up.len()
                );
            }
        }
        Ok(Gateway {
            quic_addr,
            metrics_addr,
            endpoint,
            router,
            in_flight,
            stop_metrics,
            http_addr,
            grpc_addr,
            tcp,
        })
    }

    /// Drains and stops: refuses new connections, waits up to `grace` for
    /// the streams in flight, then answers what is still queued and stops
    /// the device threads.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.set_server_config(None);
        }
        // TCP listeners stop accepting and drain their connections (bounded
        // by the same grace) while the QUIC streams drain.
        let tcp = self.tcp.stop();
        let (quic_drained, ()) =
            tokio::join!(tokio::time::timeout(grace, self.in_flight.wait_idle()), tcp);
        if quic_drained.is_err() {
            tracing::warn!(
                streams = self.in_flight.count(),
                "shutdown grace over; answering what is left with UNAVAILABLE"
            );
        }
        let router = self.router.clone();
        // Joining device threads blocks; keep it off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || router.stop()).await;
        // Give the stream tasks a moment to write the answers just sent.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.in_flight.wait_idle()).await;
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(0u32.into(), b"shutting down");
        }
        if let Some(tx) = self.stop_metrics.take() {
            let _ = tx.send(());
        }
        if let Some(endpoint) = &self.endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }
}

/// The TCP front ends (REST, gRPC): their stop signals and tasks.
#[derive(Debug)]
struct TcpListeners {
    ready: Arc<AtomicBool>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TcpListeners {
    /// Binds `addr` and serves `app` there; returns the bound address.
    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        &mut self,
        addr: SocketAddr,
        app: axum::Router,
        limits: http::TcpLimits,
        http2_only: bool,
        metrics: &Arc<Metrics>,
        protocol: &'static str,
        grace: Duration,
    ) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
        };
        self.stops.push(tx);
        self.tasks.push(tokio::spawn(http::serve_tcp(
            listener,
            app,
            limits,
            http2_only,
            metrics.clone(),
            protocol,
            stop,
            grace,
        )));
        Ok(bound)
    }

    /// Readiness goes false, accepting stops, and open connections drain
    /// (each listener bounds its own wait by the grace).
    async fn stop(&mut self) {
        self.ready.store(false, Ordering::Release);
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

fn load_model(m: &quiver_config::Model, metrics: Arc<Metrics>) -> anyhow::Result<ModelEntry> {
    let device = Device::parse(&m.device)?;
    let spec = match (m.kind, &m.path, &m.demo) {
        (ModelKind::Identity, _, _) => ModelSpec::Identity,
        (ModelKind::Mlp, Some(dir), _) => ModelSpec::Mlp { dir: dir.clone() },
        (ModelKind::Mlp, None, Some(demo)) => ModelSpec::MlpDemo {
            inputs: demo.inputs as usize,
            hidden: demo.hidden.iter().map(|&h| h as usize).collect(),
            outputs: demo.outputs as usize,
            activation: activation(&demo.activation)?,
            seed: demo.seed,
        },
        (ModelKind::Mlp, None, None) => anyhow::bail!("an mlp model needs a path or a demo"),
        (ModelKind::Embedding, Some(dir), _) => ModelSpec::TextEmbedding {
            dir: dir.clone(),
            cpu_kernels: m.cpu_kernels,
        },
        (ModelKind::Embedding, None, _) => anyhow::bail!("an embedding model needs a path"),
    };
    let model = quiver_kernels::load(&spec, &device)?;
    let scheduler_config = SchedulerConfig {
        max_batch_size: m.max_batch_size,
        max_batch_tokens: m.max_batch_tokens,
        max_queue_delay: m.max_queue_delay,
        queue_capacity: m.queue_capacity as usize,
        priority_levels: m.priority_levels,
        max_in_flight: m.max_in_flight,
    };
    let mut latency = LatencyModel::new();
    let samples = device::calibrate(model.as_ref(), m.max_batch_size, 3)
        .map_err(|e| anyhow::anyhow!("calibration failed: {e}"))?;
    latency.calibrate(&samples);
    let c = latency.coefficients();
    tracing::info!(
        model = %m.name,
        samples = samples.len(),
        fixed_us = c.fixed_s * 1e6,
        per_row_us = c.per_row_s * 1e6,
        per_token_us = c.per_token_s * 1e6,
        "latency model calibrated"
    );
    for (term, seconds) in [
        ("fixed", c.fixed_s),
        ("per_row", c.per_row_s),
        ("per_token", c.per_token_s),
    ] {
        metrics
            .latency_model
            .get_or_create(&crate::metrics::TermLabels {
                model: m.name.clone(),
                term,
            })
            .set(seconds);
    }
    let scheduler = Scheduler::new(scheduler_config, latency);
    let upstream = match (&m.upstream, m.routing) {
        (Some(config), routing) if routing != quiver_config::Routing::LocalOnly => {
            let up = crate::upstream::Upstream::new(&m.name, config, metrics.clone())
                .map_err(|e| anyhow::anyhow!("upstream: {e}"))?;
            up.spawn_tasks();
            Some(up)
        }
        _ => None,
    };
    let worker = DeviceWorker::spawn(m.name.clone(), model.clone(), scheduler, metrics)?;
    Ok(ModelEntry {
        routing: m.routing,
        upstream,
        name: m.name.clone(),
        model,
        worker,
        default_timeout: m.default_timeout,
        priority_levels: m.priority_levels,
        config: m.clone(),
    })
}

fn activation(name: &str) -> anyhow::Result<Activation> {
    Ok(match name {
        "relu" => Activation::Relu,
        "gelu" => Activation::Gelu,
        "tanh" => Activation::Tanh,
        "sigmoid" => Activation::Sigmoid,
        "none" => Activation::None,
        other => anyhow::bail!("unknown activation '{other}'"),
    })
}

/// Registers the SIGINT and SIGTERM handlers now; the future resolves on
/// the first signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
