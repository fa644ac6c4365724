//! Model lifecycle: loading, swapping, unloading and reloading without a
//! restart.
//!
//! Models come from two sources: the inline `[[models]]` tables of the
//! configuration (each one version, `1`) and the model repository
//! (`server.model_repository`): `DIR/NAME/model.toml` plus one directory of
//! weights per integer version, `DIR/NAME/VERSION/`. A model's version
//! policy picks the versions that serve.
//!
//! A load builds each new instance off the serving path (weights read, the
//! latency model calibrated by running real batches, which also warms the
//! device), then swaps the model's versions in the [`Registry`] in one
//! atomic step. An instance that no longer serves is drained: it keeps its
//! device thread until no request holds it (each request holds its instance
//! until it is answered), then is stopped and freed. A load that fails
//! leaves what was serving in place, and reports why on the API, in the log
//! and in `quiver_model_loads_total{outcome="failed"}`.
//!
//! Loads, unloads and reloads are serialised by one lock; inference never
//! takes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use quiver_batching::{LatencyModel, LengthGrouping, Scheduler, SchedulerConfig};
use quiver_config::{Config, ModelControl, ModelKind};
use quiver_kernels::sim::{ServiceTime, Simulated};
use quiver_kernels::{Activation, Device, ModelSpec, OnnxEngine};
use serde_json::{Value, json};

use crate::device::{self, DeviceWorker};
use crate::error::GatewayError;
use crate::frontend::auth::Auth;
use crate::metrics::{DeviceLabels, LoadLabels, Metrics, OutcomeLabels};
use crate::registry::{ModelEntry, Replica, Versions};
use crate::router::Router;

/// The name of a repository model's configuration file.
pub const MODEL_FILE: &str = "model.toml";

/// Where a model comes from.
#[derive(Clone, Debug)]
enum Source {
    /// An inline `[[models]]` table: version 1.
    Inline(Box<quiver_config::Model>),
    /// A repository model: its `model.toml` and the versions the policy
    /// picks, each with its weights directory.
    Repository(BTreeMap<u64, quiver_config::Model>),
}

/// What a load did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Versions loaded now, with their load time (weights and calibration).
    pub loaded: Vec<(u64, Duration)>,
    /// Versions that kept serving unchanged.
    pub kept: Vec<u64>,
    /// Versions that stopped serving and drain.
    pub draining: Vec<u64>,
}

/// What a configuration reload did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReloadReport {
    /// What took effect, one line each.
    pub applied: Vec<String>,
    /// Keys that changed but need a restart to take effect.
    pub needs_restart: Vec<String>,
    /// Models whose reload failed (they keep serving as before).
    pub failed: Vec<String>,
}

impl ReloadReport {
    /// The report as the reload endpoint writes it.
    pub fn to_json(&self) -> Value {
        json!({
            "applied": self.applied,
            "needs_restart": self.needs_restart,
            "failed": self.failed,
        })
    }
}

/// One entry of the repository index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// Empty for a model with no version loaded.
    pub version: String,
    /// Triton's states: `READY`, `UNLOADING`, `UNAVAILABLE`.
    pub state: &'static str,
    pub reason: String,
}

/// The model lifecycle manager: one per gateway.
#[derive(Debug)]
pub struct Lifecycle {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    auth: Auth,
    /// The configuration in effect: the file as last (re)loaded, with the
    /// keys that need a restart kept as the process started.
    config: Mutex<Config>,
    /// The file to re-read on reload, if the configuration came from one.
    config_path: Option<PathBuf>,
    /// The file as last read (before command-line flags): what a reload
    /// diffs against.
    file: Mutex<Config>,
    /// `quiver worker`: every model on the CPU, local-only, no upstreams.
    worker: bool,
    /// Serialises loads, unloads and reloads.
    ops: tokio::sync::Mutex<()>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Why the last load of a model failed, until one succeeds.
    failures: HashMap<String, String>,
    /// Fingerprints (names, sizes, modification times) of the weights
    /// directory each serving repository version was loaded from.
    stamps: HashMap<(String, u64), u64>,
    /// Versions draining now.
    draining: BTreeSet<(String, u64)>,
}

impl Lifecycle {
    /// A manager for `router`'s registry. `config_path`: the file
    /// [`Lifecycle::reload`] re-reads.
    pub fn new(
        router: Arc<Router>,
        auth: Auth,
        config: Config,
        config_path: Option<PathBuf>,
        file_config: Option<Config>,
        worker: bool,
    ) -> Arc<Self> {
        Arc::new(Lifecycle {
            file: Mutex::new(file_config.unwrap_or_else(|| config.clone())),
            metrics: router.metrics().clone(),
            router,
            auth,
            config: Mutex::new(config),
            config_path,
            worker,
            ops: tokio::sync::Mutex::new(()),
            state: Arc::default(),
        })
    }

    fn config(&self) -> MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The models to load at start-up: every inline model, and every
    /// repository model unless `model_control` is `explicit`. A failure
    /// stops the start (the operator sees it at once).
    pub async fn load_startup(&self) -> anyhow::Result<()> {
        let (inline, repository, control) = {
            let c = self.config();
            (
                c.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
                c.server.model_repository.clone(),
                c.server.model_control,
            )
        };
        let mut names = inline;
        if let Some(dir) = &repository
            && control != ModelControl::Explicit
        {
            for name in repository_names(dir)
                .with_context(|| format!("server.model_repository {}", dir.display()))?
            {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        for name in names {
            self.load(&name, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("model '{name}'"))?;
        }
        Ok(())
    }

    /// Loads (or reloads) model `name`: the versions its policy picks are
    /// loaded and swapped in; versions that no longer serve drain. A
    /// version already serving from unchanged files and configuration is
    /// kept as it is. `config_override`: a JSON object of `model.toml` keys
    /// (Triton's `version_policy` spelling is also understood) that replace
    /// the file's, for a repository model.
    pub async fn load(
        &self,
        name: &str,
        config_override: Option<&Value>,
    ) -> Result<LoadReport, GatewayError> {
        let _ops = self.ops.lock().await;
        let result = self.load_locked(name, config_override).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .model_loads
            .get_or_create(&LoadLabels {
                model: name.to_owned(),
                outcome,
            })
            .inc();
        match &result {
            Ok(_) => {
                self.state().failures.remove(name);
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "load failed; what was serving still serves");
                self.state().failures.insert(name.to_owned(), e.to_string());
            }
        }
        result
    }

    async fn load_locked(
        &self,
        name: &str,
        config_override: Option<&Value>,
    ) -> Result<LoadReport, GatewayError> {
        let source = self.source(name, config_override)?;
        let wanted: BTreeMap<u64, quiver_config::Model> = match source {
            Source::Inline(m) => BTreeMap::from([(1, *m)]),
            Source::Repository(versions) => versions,
        };
        let current = self
            .router
            .registry()
            .snapshot()
            .versions(name)
            .cloned()
            .unwrap_or_default();
        let mut next = Versions::new();
        let mut report = LoadReport::default();
        let mut fresh: Vec<Arc<ModelEntry>> = Vec::new();
        let mut stamps = Vec::new();
        for (version, mut config) in wanted {
            if self.worker {
                config = worker_model(config);
            }
            let stamp = config.path.as_deref().map(fingerprint).unwrap_or(0);
            if let Some(old) = current.get(&version)
                && same_instance(&old.config, &config)
                && self
                    .state()
                    .stamps
                    .get(&(name.to_owned(), version))
                    .copied()
                    == Some(stamp)
            {
                next.insert(version, old.clone());
                report.kept.push(version);
                continue;
            }
            let started = Instant::now();
            let metrics = self.metrics.clone();
            let loaded = tokio::task::spawn_blocking(move || load_model(&config, version, metrics))
                .await
                .map_err(|e| anyhow::anyhow!("the load task failed: {e}"))
                .and_then(|r| r);
            match loaded {
                Ok(entry) => {
                    if let Some(up) = &entry.upstream {
                        up.resolve_now().await;
                    }
                    let took = started.elapsed();
                    tracing::info!(
                        model = name,
                        version,
                        load_ms = took.as_millis() as u64,
                        "model version loaded and calibrated"
                    );
                    let entry = Arc::new(entry);
                    fresh.push(entry.clone());
                    next.insert(version, entry);
                    stamps.push((version, stamp));
                    report.loaded.push((version, took));
                }
                Err(e) => {
                    // Nothing was swapped: free what this load built.
                    stop_all(fresh).await;
                    return Err(GatewayError::Repository(format!(
                        "failed to load model '{name}' version {version}: {e:#}"
                    )));
                }
            }
        }
        {
            let mut state = self.state();
            for (version, stamp) in stamps {
                state.stamps.insert((name.to_owned(), version), stamp);
            }
        }
        for entry in next.values() {
            self.metrics
                .model_ready
                .get_or_create(&entry.labels())
                .set(1);
        }
        let removed = self.router.registry().replace(name, next);
        report.draining = removed.iter().map(|e| e.version).collect();
        self.refresh_rate_limits();
        tracing::info!(
            model = name,
            loaded = ?report.loaded.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            kept = ?report.kept,
            draining = ?report.draining,
            "model swapped in"
        );
        for old in removed {
            self.drain(old);
        }
        Ok(report)
    }

    /// Unloads every version of `name`: it stops taking requests at once,
    /// and each instance drains before it is freed.
    pub async fn unload(&self, name: &str) -> Result<Vec<u64>, GatewayError> {
        let _ops = self.ops.lock().await;
        let known = self.router.registry().snapshot().versions(name).is_some()
            || self.config().model(name).is_some()
            || self.repository_has(name);
        if !known {
            return Err(GatewayError::UnknownModel(name.to_owned()));
        }
        let removed = self.router.registry().replace(name, Versions::new());
        let versions: Vec<u64> = removed.iter().map(|e| e.version).collect();
        tracing::info!(model = name, versions = ?versions, "model unloading");
        for old in removed {
            self.drain(old);
        }
        self.refresh_rate_limits();
        Ok(versions)
    }

    /// Stops serving `entry` and frees it once no request holds it (its
    /// queued and in-flight requests finish first). Bounded by twice its
    /// default timeout plus 10 s: past that, what is left is answered
    /// `UNAVAILABLE` as at shutdown.
    fn drain(&self, entry: Arc<ModelEntry>) {
        let key = (entry.name.clone(), entry.version);
        self.state().draining.insert(key.clone());
        let metrics = self.metrics.clone();
        let state = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            let started = Instant::now();
            let limit = entry.default_timeout * 2 + Duration::from_secs(10);
            while Arc::strong_count(&entry) > 1 && started.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let labels = entry.labels();
            let waited = started.elapsed();
            let _ = tokio::task::spawn_blocking(move || {
                entry.stop();
                drop(entry);
            })
            .await;
            metrics.model_ready.get_or_create(&labels).set(0);
            metrics.model_unloads.get_or_create(&labels).inc();
            if let Some(state) = state.upgrade() {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                state.draining.remove(&key);
                state.stamps.remove(&key);
            }
            tracing::info!(
                model = %labels.model,
                version = %labels.version,
                drained_ms = waited.as_millis() as u64,
                "model version drained and unloaded"
            );
        });
    }

    /// Whether `name` has a directory in the repository.
    fn repository_has(&self, name: &str) -> bool {
        self.config()
            .server
            .model_repository
            .as_ref()
            .is_some_and(|dir| dir.join(name).join(MODEL_FILE).is_file())
    }

    /// Where `name` comes from, with the versions its policy picks.
    fn source(&self, name: &str, config_override: Option<&Value>) -> Result<Source, GatewayError> {
        let (inline, repository) = {
            let c = self.config();
            (c.model(name).cloned(), c.server.model_repository.clone())
        };
        if let Some(m) = inline {
            if config_override.is_some() {
                return Err(GatewayError::Repository(format!(
                    "model '{name}' is an inline [[models]] table: change it in the configuration \
                     file and reload, a config override is only for repository models"
                )));
            }
            return Ok(Source::Inline(Box::new(m)));
        }
        let Some(dir) = repository else {
            return Err(GatewayError::UnknownModel(name.to_owned()));
        };
        let model_dir = dir.join(name);
        if !model_dir.join(MODEL_FILE).is_file() || !valid_name(name) {
            return Err(GatewayError::UnknownModel(name.to_owned()));
        }
        read_repository_model(&dir, name, config_override)
            .map(Source::Repository)
            .map_err(GatewayError::Repository)
    }

    /// Per-client rate limits of the models serving now.
    fn refresh_rate_limits(&self) {
        let config = self.config().clone();
        let mut limits = crate::ratelimit::RateLimits::default();
        for entry in self.router.registry().snapshot().newest() {
            if let Some(limit) = config.rate_limit(&entry.config) {
                limits.set(&entry.name, limit);
            }
        }
        self.router.set_rate_limits(limits);
    }

    /// Triton's repository index: every model known (inline, in the
    /// repository, or serving) with each version's state.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let catalog = self.router.registry().snapshot();
        let (mut names, repository): (BTreeSet<String>, _) = {
            let c = self.config();
            (
                c.models.iter().map(|m| m.name.clone()).collect(),
                c.server.model_repository.clone(),
            )
        };
        if let Some(dir) = &repository {
            names.extend(repository_names(dir).unwrap_or_default());
        }
        names.extend(catalog.names().map(str::to_owned));
        let state = self.state();
        let mut out = Vec::new();
        for name in names {
            let serving = catalog.versions(&name);
            for v in serving.into_iter().flat_map(|v| v.keys()) {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: v.to_string(),
                    state: "READY",
                    reason: String::new(),
                });
            }
            if ready_only {
                continue;
            }
            for (n, v) in &state.draining {
                if *n == name {
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: "UNLOADING",
                        reason: "draining".into(),
                    });
                }
            }
            if serving.is_none() {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE",
                    reason: state
                        .failures
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| "unloaded".into()),
                });
            }
        }
        out
    }

    /// One rescan of the repository (`model_control = "poll"`): loads a
    /// model whose picked versions, files or `model.toml` changed, unloads
    /// one whose directory is gone. Errors are logged (and counted) per
    /// model; the others go on.
    pub async fn poll_once(&self) {
        let (dir, inline) = {
            let c = self.config();
            (
                c.server.model_repository.clone(),
                c.models
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<BTreeSet<_>>(),
            )
        };
        let Some(dir) = dir else { return };
        let names = match repository_names(&dir) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(repository = %dir.display(), error = %e, "repository rescan failed");
                return;
            }
        };
        let catalog = self.router.registry().snapshot();
        for name in names.iter().filter(|n| !inline.contains(*n)) {
            if self.changed(&dir, name) {
                let _ = self.load(name, None).await;
            }
        }
        for name in catalog.names() {
            if !inline.contains(name) && !names.iter().any(|n| n == name) {
                let _ = self.unload(name).await;
            }
        }
    }

    /// Whether repository model `name` differs from what serves.
    fn changed(&self, dir: &Path, name: &str) -> bool {
        let wanted = match read_repository_model(dir, name, None) {
            Ok(w) => w,
            // A broken model.toml: report it once, keep serving.
            Err(e) => return self.state().failures.get(name).is_none_or(|f| *f != e),
        };
        let serving = self.router.registry().snapshot().versions(name).cloned();
        let Some(serving) = serving else {
            // Not serving: load unless the same load already failed.
            return !self.state().failures.contains_key(name);
        };
        if wanted.keys().ne(serving.keys()) {
            return true;
        }
        let state = self.state();
        wanted.iter().any(|(v, config)| {
            let stamp = config.path.as_deref().map(fingerprint).unwrap_or(0);
            serving.get(v).is_none_or(|e| {
                !same_instance(&e.config, config)
                    || state.stamps.get(&(name.to_owned(), *v)) != Some(&stamp)
            })
        })
    }

    /// Re-reads the configuration file: tokens, rate limits and the inline
    /// models (their batching knobs, routing, upstreams) take effect now;
    /// keys that need a restart are reported. An invalid file changes
    /// nothing and every error is logged with its path.
    pub async fn reload(&self) -> Result<ReloadReport, GatewayError> {
        let Some(path) = self.config_path.clone() else {
            return Err(GatewayError::Repository(
                "no configuration file to re-read: the gateway runs on the embedded default \
                 or command-line models (start it with --config FILE)"
                    .into(),
            ));
        };
        let new = match Config::from_file(&path) {
            Ok(c) => c,
            Err(e) => {
                for err in &e.errors {
                    tracing::error!(file = %path.display(), path = %err.path, "{}", err.message);
                }
                self.count_reload("invalid");
                return Err(GatewayError::Repository(format!(
                    "{} is invalid; the running configuration is kept: {e}",
                    path.display()
                )));
            }
        };
        let report = self.apply(new).await;
        self.count_reload(if report.failed.is_empty() {
            "ok"
        } else {
            "failed"
        });
        tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            failed = ?report.failed,
            "configuration reloaded"
        );
        Ok(report)
    }

    fn count_reload(&self, outcome: &'static str) {
        self.metrics
            .config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Applies configuration `new` (see [`Lifecycle::reload`]).
    pub async fn apply(&self, mut new: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        let old = self.config().clone();
        {
            // Keys that need a restart stay as the process has them, so a
            // second reload reports them again until the restart.
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            report.needs_restart = needs_restart(&file, &new);
            let mut server = new.server.clone();
            keep_restart_keys(&mut server, &file.server);
            *file = Config {
                server,
                tls: file.tls.clone(),
                models: new.models.clone(),
            };
        }
        if self.worker {
            new.models = new.models.into_iter().map(worker_model).collect();
        }
        let (o, n) = (&old.server, &new.server);
        if o.auth_tokens != n.auth_tokens
            || o.auth_token_identities != n.auth_token_identities
            || o.auth_exempt_health != n.auth_exempt_health
        {
            self.auth.replace(
                &n.auth_tokens,
                &n.auth_token_identities,
                n.auth_exempt_health,
            );
            report.applied.push("server.auth_tokens".into());
        }
        if (o.rate_limit_per_sec, o.rate_limit_burst) != (n.rate_limit_per_sec, n.rate_limit_burst)
        {
            report.applied.push("server.rate_limit_per_sec".into());
        }
        // The running configuration: the new file, less what needs a
        // restart.
        {
            let mut running = self.config();
            let mut server = new.server.clone();
            keep_restart_keys(&mut server, &old.server);
            *running = Config {
                server,
                tls: old.tls.clone(),
                models: new.models.clone(),
            };
        }
        for m in &new.models {
            let before = old.model(&m.name);
            if before == Some(m) {
                continue;
            }
            match self.load(&m.name, None).await {
                Ok(_) => report.applied.push(format!(
                    "models.{}: {}",
                    m.name,
                    if before.is_some() {
                        "reloaded"
                    } else {
                        "loaded"
                    }
                )),
                Err(e) => report.failed.push(format!("models.{}: {e}", m.name)),
            }
        }
        for m in &old.models {
            if new.model(&m.name).is_none() {
                match self.unload(&m.name).await {
                    Ok(_) => report.applied.push(format!("models.{}: unloaded", m.name)),
                    Err(e) => report.failed.push(format!("models.{}: {e}", m.name)),
                }
            }
        }
        self.refresh_rate_limits();
        report
    }
}

/// One model as a `quiver worker` serves it (see
/// [`crate::serve::worker_config`]); also
/// applied to the models of a worker's repository.
pub fn worker_model(mut m: quiver_config::Model) -> quiver_config::Model {
    // GPUs become the CPU; simulated devices stay (they model a worker's
    // service time).
    fn on_worker(model: &str, d: &str) -> String {
        if d == "cpu" || d.starts_with("sim:") {
            d.to_owned()
        } else {
            tracing::info!(model, device = %d, "worker: serving on the CPU instead");
            "cpu".to_owned()
        }
    }
    m.device = on_worker(&m.name, &m.device);
    let mut devices: Vec<String> = Vec::new();
    for d in m.devices.iter().map(|d| on_worker(&m.name, d)) {
        if !devices.contains(&d) {
            devices.push(d);
        }
    }
    m.devices = devices;
    m.routing = quiver_config::Routing::LocalOnly;
    m.upstream = None;
    m
}

/// Whether an instance built from `a` serves as one built from `b` would:
/// every key but the version policy (which picks instances, and is not
/// part of one).
fn same_instance(a: &quiver_config::Model, b: &quiver_config::Model) -> bool {
    let mut a = a.clone();
    a.version_policy.clone_from(&b.version_policy);
    a == *b
}

/// Stops instances that never served.
async fn stop_all(entries: Vec<Arc<ModelEntry>>) {
    let _ = tokio::task::spawn_blocking(move || {
        for e in entries {
            e.stop();
        }
    })
    .await;
}

/// The server keys that only a restart changes.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut out = Vec::new();
    macro_rules! check {
        ($($field:ident),*) => {$(
            if o.$field != n.$field {
                out.push(concat!("server.", stringify!($field)).to_owned());
            }
        )*};
    }
    check!(
        quic_listen,
        metrics_listen,
        http_listen,
        grpc_listen,
        https_listen,
        grpcs_listen,
        max_frame_bytes,
        max_inflight_bytes,
        max_concurrent_streams,
        max_connections,
        max_connections_per_source,
        quic_retry_above_per_sec,
        idle_timeout,
        request_read_timeout,
        header_read_timeout,
        min_body_bytes_per_sec,
        shutdown_grace,
        model_repository,
        model_control,
        repository_poll
    );
    if old.tls != new.tls {
        out.push("tls".into());
    }
    out
}

/// Copies into `server` the keys of `running` that need a restart.
fn keep_restart_keys(server: &mut quiver_config::Server, running: &quiver_config::Server) {
    let live = (
        std::mem::take(&mut server.auth_tokens),
        std::mem::take(&mut server.auth_token_identities),
        server.auth_exempt_health,
        server.rate_limit_per_sec,
        server.rate_limit_burst,
    );
    *server = running.clone();
    server.auth_tokens = live.0;
    server.auth_token_identities = live.1;
    server.auth_exempt_health = live.2;
    server.rate_limit_per_sec = live.3;
    server.rate_limit_burst = live.4;
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The model names of repository `dir`: its subdirectories with a
/// `model.toml`, sorted.
pub fn repository_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if valid_name(&name) && entry.path().join(MODEL_FILE).is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The integer version directories of `DIR/NAME`, sorted.
fn version_dirs(model_dir: &Path) -> Result<Vec<u64>, String> {
    let mut versions = Vec::new();
    let entries = std::fs::read_dir(model_dir)
        .map_err(|e| format!("cannot read {}: {e}", model_dir.display()))?;
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if let (true, Some(v)) = (
            is_dir,
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|v| *v > 0),
        ) {
            versions.push(v);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Reads `DIR/NAME/model.toml` (with `config_override` merged over it) and
/// picks the versions to serve, each with `path` set to its directory.
fn read_repository_model(
    dir: &Path,
    name: &str,
    config_override: Option<&Value>,
) -> Result<BTreeMap<u64, quiver_config::Model>, String> {
    let model_dir = dir.join(name);
    let file = model_dir.join(MODEL_FILE);
    let label = format!("{name}/{MODEL_FILE}");
    let mut text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if let Some(over) = config_override {
        text = merge_override(&text, over).map_err(|e| format!("the config override: {e}"))?;
    }
    let config = Config::repository_model(name, &label, &text).map_err(|e| e.to_string())?;
    let available = version_dirs(&model_dir)?;
    if available.is_empty() {
        return Err(format!(
            "{} has no version directory (an integer such as 1/)",
            model_dir.display()
        ));
    }
    let picked = config.version_policy.select(&available);
    if let quiver_config::VersionPolicy::Specific(wanted) = &config.version_policy {
        let missing: Vec<String> = wanted
            .iter()
            .filter(|v| !available.contains(v))
            .map(u64::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "version_policy names version(s) {} that {} does not have",
                missing.join(", "),
                model_dir.display()
            ));
        }
    }
    let needs_weights = config.kind != ModelKind::Identity && config.demo.is_none();
    Ok(picked
        .into_iter()
        .map(|v| {
            let mut m = config.clone();
            if needs_weights {
                m.path = Some(model_dir.join(v.to_string()));
            }
            (v, m)
        })
        .collect())
}

/// `model.toml` with the keys of JSON object `over` replacing its own.
/// Triton's `version_policy` objects (`{"latest": {"num_versions": 2}}`,
/// `{"all": {}}`, `{"specific": {"versions": [1]}}`) are translated; its
/// `name` is checked against the model's and dropped.
fn merge_override(text: &str, over: &Value) -> Result<String, String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let Value::Object(over) = over else {
        return Err("must be a JSON object of model.toml keys".into());
    };
    for (key, value) in over {
        let value = match (key.as_str(), value) {
            ("name", _) => continue,
            ("version_policy", Value::Object(p)) => triton_policy(p).unwrap_or(value.clone()),
            _ => value.clone(),
        };
        let value = toml::Value::try_from(&value).map_err(|e| format!("{key}: {e}"))?;
        table.insert(key.clone(), value);
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

fn triton_policy(p: &serde_json::Map<String, Value>) -> Option<Value> {
    if p.contains_key("all") {
        return Some(json!("all"));
    }
    if let Some(n) = p.get("latest").and_then(|l| l.get("num_versions")) {
        return Some(json!({ "latest": n }));
    }
    if let Some(v) = p.get("specific").and_then(|s| s.get("versions")) {
        // Triton's JSON writes int64 as strings.
        let versions: Vec<Value> = v
            .as_array()?
            .iter()
            .map(|x| match x {
                Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or(x.clone()),
                _ => x.clone(),
            })
            .collect();
        return Some(json!({ "specific": versions }));
    }
    None
}

/// A fingerprint of a weights directory: its files' names, sizes and
/// modification times (a new file or a rewritten one changes it).
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<(String, u64, Option<SystemTime>)> = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                files.push((
                    e.path().display().to_string(),
                    meta.len(),
                    meta.modified().ok(),
                ));
            }
        }
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Loads one model version: on each of its devices the weights, a
/// calibration (real batches on that device, which warms it) and a device
/// thread; then its upstream pool.
pub fn load_model(
    m: &quiver_config::Model,
    version: u64,
    metrics: Arc<Metrics>,
) -> anyhow::Result<ModelEntry> {
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
            precision: match m.precision {
                quiver_config::Precision::Fp32 => quiver_kernels::Precision::Fp32,
                quiver_config::Precision::Int8 => quiver_kernels::Precision::Int8,
            },
        },
        (ModelKind::Embedding, None, _) => anyhow::bail!("an embedding model needs a path"),
        (ModelKind::Trees, Some(path), _) => ModelSpec::Trees {
            path: path.clone(),
            output_margin: m.output_margin,
        },
        (ModelKind::Trees, None, _) => anyhow::bail!("a trees model needs a path"),
        (ModelKind::Onnx, Some(path), _) => ModelSpec::Onnx {
            path: path.clone(),
            engine: match m.engine {
                quiver_config::OnnxEngine::Auto => OnnxEngine::Auto,
                quiver_config::OnnxEngine::OnnxRuntime => OnnxEngine::OnnxRuntime,
                quiver_config::OnnxEngine::Candle => OnnxEngine::Candle,
            },
        },
        (ModelKind::Onnx, None, _) => anyhow::bail!("an onnx model needs a path"),
    };
    let mut replicas = Vec::new();
    for device_name in m.device_list() {
        let replica = load_replica(m, &spec, &device_name, version, metrics.clone())
            .with_context(|| format!("device {device_name}"));
        match replica {
            Ok(r) => replicas.push(r),
            Err(e) => {
                for r in &replicas {
                    r.worker.stop();
                }
                return Err(e);
            }
        }
    }
    let Some(first) = replicas.first() else {
        anyhow::bail!("no device");
    };
    let model = first.model.clone();
    let upstream = match (&m.upstream, m.routing) {
        (Some(config), routing) if routing != quiver_config::Routing::LocalOnly => {
            let up = crate::upstream::Upstream::new(&m.name, config, metrics.clone())
                .map_err(|e| anyhow::anyhow!("upstream: {e}"))?;
            up.spawn_tasks();
            Some(up)
        }
        _ => None,
    };
    Ok(ModelEntry {
        routing: m.routing,
        upstream,
        name: m.name.clone(),
        version,
        model,
        replicas,
        next_replica: Default::default(),
        default_timeout: m.default_timeout,
        priority_levels: m.priority_levels,
        config: m.clone(),
        series: Default::default(),
    })
}

/// The model on one device, calibrated, with its device thread.
fn load_replica(
    m: &quiver_config::Model,
    spec: &ModelSpec,
    device_name: &str,
    version: u64,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Replica> {
    let device = Device::parse(device_name)?;
    let model: Arc<dyn quiver_kernels::Model> = match device {
        Device::Sim(ordinal) => {
            let sim = m.sim.clone().unwrap_or_default();
            let inner = quiver_kernels::load(spec, &Device::Cpu)?;
            let slowdown = sim.slowdown_pct.get(ordinal).copied().unwrap_or(100);
            Arc::new(Simulated::new(
                inner,
                ordinal,
                ServiceTime {
                    fixed: Duration::from_micros(sim.fixed_us),
                    per_row: Duration::from_micros(sim.per_row_us),
                    per_token: Duration::from_nanos(sim.per_token_ns),
                    slowdown: f64::from(slowdown) / 100.0,
                    jitter: f64::from(sim.jitter_pct) / 100.0,
                },
                sim.seed,
            ))
        }
        _ => quiver_kernels::load(spec, &device)?,
    };
    let scheduler_config = SchedulerConfig {
        max_batch_size: m.max_batch_size,
        max_batch_tokens: m.max_batch_tokens,
        max_queue_delay: m.max_queue_delay,
        queue_capacity: m.queue_capacity as usize,
        priority_levels: m.priority_levels,
        max_in_flight: m.max_in_flight,
        // A CUDA device's calls stay on its device thread, where its context
        // is bound; inline batches are for the CPU (a simulated device's
        // service time keeps it above the bound anyway).
        inline_below: if matches!(device, Device::Cuda(_)) {
            Duration::ZERO
        } else {
            m.inline_below
        },
        idle_spin: m.idle_spin,
        // Only embedding models' requests have lengths (`length_grouping`
        // is refused on other kinds); theirs are all one token, so the
        // grouped batch would be the plain one anyway.
        length_grouping: m.length_grouping.then(|| LengthGrouping {
            max_length_ratio: m.max_length_ratio,
            ..LengthGrouping::default()
        }),
    };
    let mut latency = LatencyModel::new();
    let samples = device::calibrate(model.as_ref(), m.max_batch_size, 3)
        .map_err(|e| anyhow::anyhow!("calibration failed: {e}"))?;
    latency.calibrate(&samples);
    let c = latency.coefficients();
    tracing::info!(
        model = %m.name,
        version,
        device = device_name,
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
                version: version.to_string(),
                device: device_name.to_owned(),
                term,
            })
            .set(seconds);
    }
    let scheduler = Scheduler::new(scheduler_config, latency);
    let worker = DeviceWorker::spawn(
        DeviceLabels {
            model: m.name.clone(),
            version: version.to_string(),
            device: device_name.to_owned(),
        },
        model.clone(),
        scheduler,
        metrics,
        m.unhealthy_after_failures,
    )?;
    Ok(Replica {
        device: device_name.into(),
        model,
        worker,
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

/// Checks a model repository as `quiver config check` does: every model's
/// `model.toml` parses and its policy finds its versions. Returns one line
/// per model, or the errors.
pub fn check_repository(dir: &Path) -> Result<Vec<String>, Vec<String>> {
    let names = repository_names(dir).map_err(|e| vec![format!("{}: {e}", dir.display())])?;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        match read_repository_model(dir, &name, None) {
            Ok(versions) => lines.push(format!(
                "{name}: versions {} serve",
                versions
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}
