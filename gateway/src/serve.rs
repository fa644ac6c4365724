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
use quiver_config::Config;

use crate::frontend::auth::Auth;
use crate::frontend::h3::{self, H3Service};
use crate::frontend::inflight::InFlight;
use crate::frontend::quic::{self, QuicLimits};
use crate::frontend::{grpc, http};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::router::Router;
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
    /// The configuration file, re-read on SIGHUP and
    /// `POST /v2/repository/reload`; none for the embedded default.
    pub config_path: Option<PathBuf>,
}

/// The configuration a `quiver worker` serves: every model on the CPU,
/// `local-only`, without upstreams. A worker is the upstream; it never
/// overflows further, and a CPU build serves a config written for a GPU box.
pub fn worker_config(mut config: Config) -> Config {
    config.models = config
        .models
        .into_iter()
        .map(crate::lifecycle::worker_model)
        .collect();
    config
}

/// Runs the gateway until a shutdown signal.
pub async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    // What the file says, before the flags: a reload compares the file
    // with this, so a flag is not mistaken for a change.
    let file_config = config.clone();
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
    let options = StartOptions {
        cert_out: overrides.cert_out.clone(),
        config_path: overrides.config_path.clone(),
        worker: overrides.worker,
        file_config: Some(file_config),
    };
    let gateway = if overrides.worker {
        Gateway::start_with(&worker_config(config.clone()), options).await?
    } else {
        Gateway::start_with(&config, options).await?
    };
    // The handlers are registered before `ready` is printed: a signal sent
    // as soon as it is seen drains the gateway instead of killing it.
    let signal = shutdown_signal();
    reload_on_sighup(gateway.lifecycle().clone());
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
    lifecycle: Arc<Lifecycle>,
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

    /// The model lifecycle manager (load, unload, reload).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Loads the models, binds the listeners and starts serving. Prints
    /// where it listens.
    pub async fn start(
        config: &Config,
        cert_out: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Self::start_with(
            config,
            StartOptions {
                cert_out: cert_out.map(std::path::Path::to_owned),
                ..StartOptions::default()
            },
        )
        .await
    }

    /// As [`Gateway::start`] for `quiver worker`: REST and gRPC only, no
    /// QUIC listener. Pass the configuration through [`worker_config`].
    pub async fn start_worker(config: &Config) -> anyhow::Result<Self> {
        Self::start_with(
            config,
            StartOptions {
                worker: true,
                ..StartOptions::default()
            },
        )
        .await
    }

    /// Starts a gateway (or, with `options.worker`, a worker).
    pub async fn start_with(config: &Config, options: StartOptions) -> anyhow::Result<Self> {
        let cert_out = options.cert_out.as_deref();
        let quic_on = !options.worker;
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
        let router = Arc::new(Router::with_metrics(metrics.clone()));
        let auth = Auth::new(&config.server.auth_tokens, config.server.auth_exempt_health)
            .with_identities(&config.server.auth_token_identities);
        // Models load (weights, calibration) before any listener binds.
        let lifecycle = Lifecycle::new(
            router.clone(),
            auth.clone(),
            config.clone(),
            options.config_path.clone(),
            options.file_config.clone(),
            options.worker,
        );
        lifecycle.load_startup().await?;
        {
            // Forget clients whose bucket is full again, so their count
            // stays bounded by those active in the last seconds.
            let router = Arc::downgrade(&router);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(10));
                loop {
                    every.tick().await;
                    let Some(router) = router.upgrade() else {
                        break;
                    };
                    router.rate_limits().retain_recent();
                }
            });
        }
        if config.server.model_control == quiver_config::ModelControl::Poll {
            let lifecycle = Arc::downgrade(&lifecycle);
            let period = config.server.repository_poll;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(period);
                every.tick().await;
                loop {
                    every.tick().await;
                    let Some(lifecycle) = lifecycle.upgrade() else {
                        break;
                    };
                    lifecycle.poll_once().await;
                }
            });
        }
        // One request-memory budget for every front end (and, through the
        // requests it counts, the queues and the upstream calls).
        let budget = crate::budget::MemoryBudget::new(
            config.server.max_inflight_bytes,
            metrics.inflight_bytes.clone(),
        );

        // mTLS: the CAs client certificates must chain to.
        let client_roots = match &config.tls.client_ca {
            Some(path) => Some(Arc::new(
                crate::tls::load_roots(path).context("tls.client_ca")?,
            )),
            None => None,
        };
        let limits = QuicLimits {
            max_frame_bytes: config.server.max_frame_bytes,
            max_concurrent_streams: config.server.max_concurrent_streams,
            max_connections: config.server.max_connections,
            max_connections_per_source: config.server.max_connections_per_source,
            retry_above_per_sec: config.server.quic_retry_above_per_sec,
            client_roots: client_roots.clone(),
            request_read_timeout: config.server.request_read_timeout,
            memory: budget.clone(),
            idle_timeout: config.server.idle_timeout,
        };
        let in_flight = Arc::new(InFlight::default());
        let ready = Arc::new(AtomicBool::new(true));
        let max_body_bytes = config.server.max_frame_bytes as usize;
        let api = |protocol| http::Api {
            router: router.clone(),
            metrics: metrics.clone(),
            auth: auth.clone(),
            max_body_bytes,
            request_read_timeout: config.server.request_read_timeout,
            min_body_rate: http::BodyRate::new(
                config.server.min_body_bytes_per_sec,
                quiver_config::Server::MIN_BODY_RATE_GRACE,
            ),
            budget: budget.clone(),
            ready: ready.clone(),
            lifecycle: lifecycle.clone(),
            protocol,
        };
        let h3_service = H3Service {
            app: http::app(api(h3::PROTOCOL)),
            auth: auth.clone(),
            metrics: metrics.clone(),
            max_body_bytes,
            request_read_timeout: config.server.request_read_timeout,
            min_body_rate: http::BodyRate::new(
                config.server.min_body_bytes_per_sec,
                quiver_config::Server::MIN_BODY_RATE_GRACE,
            ),
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
            header_timeout: config.server.header_read_timeout,
            tls: None,
        };
        // The TLS listeners: the same certificate as QUIC, client
        // certificates required with tls.client_ca.
        let tls_limits = |alpn: &[&[u8]]| -> anyhow::Result<http::TcpLimits> {
            let mut tls = crate::tls::server_config(&identity, alpn, client_roots.as_ref())?;
            tls.max_early_data_size = 0;
            Ok(http::TcpLimits {
                tls: Some(Arc::new(tls)),
                ..tcp_limits.clone()
            })
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
        let grpc_app = || {
            let service = grpc::InferenceService {
                router: router.clone(),
                metrics: metrics.clone(),
                auth: auth.clone(),
                ready: ready.clone(),
                budget: budget.clone(),
                lifecycle: lifecycle.clone(),
            };
            tonic::service::Routes::new(service.into_server(max_body_bytes)).into_axum_router()
        };
        let grpc_addr = match config.server.grpc_listen {
            Some(addr) => {
                let bound = tcp
                    .spawn(
                        addr,
                        grpc_app(),
                        tcp_limits.clone(),
                        true,
                        &metrics,
                        grpc::PROTOCOL,
                        grace,
                    )
                    .await
                    .with_context(|| format!("binding the gRPC listener on tcp {addr}"))?;
                say!("quiver: gRPC listening on tcp {bound}");
                Some(bound)
            }
            None => None,
        };
        if let Some(addr) = config.server.https_listen {
            let bound = tcp
                .spawn(
                    addr,
                    http::app(api(http::PROTOCOL)),
                    tls_limits(&[b"h2", b"http/1.1"])?,
                    false,
                    &metrics,
                    http::PROTOCOL,
                    grace,
                )
                .await
                .with_context(|| format!("binding the REST TLS listener on tcp {addr}"))?;
            say!("quiver: REST over TLS (HTTP/1.1, HTTP/2) listening on https://{bound}");
        }
        if let Some(addr) = config.server.grpcs_listen {
            let bound = tcp
                .spawn(
                    addr,
                    grpc_app(),
                    tls_limits(&[b"h2"])?,
                    true,
                    &metrics,
                    grpc::PROTOCOL,
                    grace,
                )
                .await
                .with_context(|| format!("binding the gRPC TLS listener on tcp {addr}"))?;
            say!("quiver: gRPC over TLS listening on tcp {bound}");
        }
        if client_roots.is_some() {
            for (name, addr) in [
                ("http_listen", config.server.http_listen),
                ("grpc_listen", config.server.grpc_listen),
            ] {
                if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                    tracing::warn!(
                        "server.{name} ({addr}) is plain TCP and takes no client certificate: \
                         with tls.client_ca set, bind it to loopback or turn it off"
                    );
                }
            }
        }

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
                "quiver: serving model '{}' version {} ({}) on {}",
                m.name,
                m.version,
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
            lifecycle,
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

/// How to start a gateway beyond its configuration.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Where to write the self-signed certificate as PEM.
    pub cert_out: Option<PathBuf>,
    /// The configuration file a reload re-reads.
    pub config_path: Option<PathBuf>,
    /// A `quiver worker`: no QUIC listener, every model on the CPU.
    pub worker: bool,
    /// The configuration as the file says it, before command-line flags:
    /// what a reload compares the re-read file with. Default: the
    /// configuration started with.
    pub file_config: Option<Config>,
}

/// Re-reads the configuration on each SIGHUP (logged; an invalid file
/// changes nothing).
fn reload_on_sighup(lifecycle: Arc<Lifecycle>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                let lifecycle = Arc::downgrade(&lifecycle);
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let Some(lifecycle) = lifecycle.upgrade() else {
                            break;
                        };
                        say!("quiver: SIGHUP: re-reading the configuration");
                        match lifecycle.reload().await {
                            Ok(report) => {
                                say!("quiver: configuration reloaded: {}", report.to_json())
                            }
                            Err(e) => say!("quiver: configuration not reloaded: {e}"),
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "no SIGHUP handler: reload through the API only"),
        }
    }
    #[cfg(not(unix))]
    let _ = lifecycle;
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
