//! Overflow to upstream CPU inference services (DESIGN.md, "Overflow").
//!
//! [`pool`] is the sans-IO state machine that picks an upstream and ejects
//! failing ones; [`client`] speaks KServe v2 (gRPC, or REST over HTTP/2)
//! to one endpoint. [`Upstream`] is the async layer between them for one
//! model: it sends a request to the endpoint the pool picks, reports each
//! try's outcome back, retries a try that started no work (within the
//! pool's retry budget and the time left), probes every endpoint
//! periodically, and re-resolves a DNS name into endpoints.

pub mod client;
pub mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use quiver_config::Endpoint;
use quiver_kernels::HostTensor;

use crate::error::{Code, GatewayError};
use crate::metrics::{EndpointLabels, Metrics, NameLabels, UpstreamErrorLabels};
use client::{Answer, EndpointClient, TlsDial, TryError};
use pool::{EndpointId, Health, Outcome, Pool, PoolConfig, Ticket};

/// An answer from an upstream, with who gave it and how long it took.
#[derive(Debug)]
pub struct Served {
    pub answer: Answer,
    pub endpoint: String,
    pub latency: Duration,
}

/// One model's upstream pool and the clients of its endpoints.
#[derive(Debug)]
pub struct Upstream {
    /// The local model's name (metrics labels).
    model: String,
    /// The model's name on the upstreams.
    remote_model: String,
    config: quiver_config::Upstream,
    /// TLS toward the endpoints (`[models.upstream.tls]`), loaded once.
    tls: Option<TlsDial>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    clients: HashMap<String, EndpointClient>,
}

impl Upstream {
    /// The pool of `model` over the fixed endpoints of `config`; a `dns`
    /// name is resolved by the task [`Upstream::spawn_tasks`] starts.
    pub fn new(
        model: &str,
        config: &quiver_config::Upstream,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let pool_config = PoolConfig {
            eject_after: config.eject_after,
            base_ejection: config.base_ejection,
            max_ejection: config.max_ejection,
            retry_ratio: f64::from(config.retry_budget_percent) / 100.0,
            ..PoolConfig::default()
        };
        let names: Vec<String> = config.endpoints.iter().map(ToString::to_string).collect();
        let tls = config.tls.as_ref().map(TlsDial::load).transpose()?;
        let mut clients = HashMap::new();
        for e in &config.endpoints {
            clients.insert(
                e.to_string(),
                EndpointClient::new(
                    e,
                    config.connect_timeout,
                    config.token.as_deref(),
                    tls.as_ref(),
                )?,
            );
        }
        // The seed only spreads choices between gateways; any value works.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let upstream = Upstream {
            model: model.to_owned(),
            remote_model: config.model.clone().unwrap_or_else(|| model.to_owned()),
            config: config.clone(),
            tls,
            metrics,
            inner: Mutex::new(Inner {
                pool: Pool::new(pool_config, names.clone(), seed),
                clients,
            }),
        };
        for name in &names {
            upstream
                .metrics
                .upstream_available
                .get_or_create(&upstream.labels(name))
                .set(1);
        }
        Ok(Arc::new(upstream))
    }

    /// Starts the active health probes and, with `dns`, the periodic
    /// resolution. The tasks stop when the last `Arc<Upstream>` is dropped.
    pub fn spawn_tasks(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(probe_loop(weak.clone(), self.config.probe_interval));
        if let Some(dns) = self.config.dns.clone() {
            tokio::spawn(resolve_loop(weak, dns, self.config.resolve_interval));
        }
    }

    /// Resolves the `dns` name once now (bounded by 5 s), so that a
    /// gateway that says it is ready has its endpoints. Without `dns`, or on
    /// failure (logged; the periodic task tries again), nothing changes.
    pub async fn resolve_now(&self) {
        let Some(dns) = &self.config.dns else { return };
        match tokio::time::timeout(Duration::from_secs(5), resolve(dns)).await {
            Ok(Ok(resolved)) => self.set_resolved(resolved),
            Ok(Err(e)) => tracing::warn!(name = %dns, error = %e, "resolving upstreams failed"),
            Err(_) => tracing::warn!(name = %dns, "resolving upstreams timed out"),
        }
    }

    /// Endpoints in the pool, whatever their health.
    pub fn len(&self) -> usize {
        self.lock().pool.len()
    }

    /// True when the pool has no endpoint (a DNS name not resolved yet).
    pub fn is_empty(&self) -> bool {
        self.lock().pool.is_empty()
    }

    /// The margin the local device must leave before the deadline.
    pub fn local_margin(&self) -> Duration {
        self.config.local_margin
    }

    /// The expected latency of the best available endpoint (its peak-EWMA
    /// of answered tries, which includes the round trip), or `None` when
    /// none is available.
    pub fn expected_latency(&self, now: Instant) -> Option<Duration> {
        self.lock().pool.expected_latency(now)
    }

    /// Whether an upstream is expected to answer before `deadline`.
    pub fn fits(&self, now: Instant, deadline: Instant) -> bool {
        self.expected_latency(now)
            .is_some_and(|latency| now + latency <= deadline)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn labels(&self, endpoint: &str) -> EndpointLabels {
        EndpointLabels {
            model: self.model.clone(),
            endpoint: endpoint.to_owned(),
        }
    }

    /// Sends `inputs` to the upstreams until one answers, a try fails after
    /// work may have started, or neither the retry budget nor the deadline
    /// allows another try. Each try's timeout is the time left.
    pub async fn infer(
        &self,
        id: &str,
        inputs: &[HostTensor],
        policy: client::Policy,
        deadline: Instant,
    ) -> Result<Served, GatewayError> {
        let started = Instant::now();
        let mut exclude: Option<EndpointId> = None;
        let mut last_refusal: Option<String> = None;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(match last_refusal {
                    Some(reason) => self.unavailable(format!("deadline passed after: {reason}")),
                    None => GatewayError::DeadlineExceeded,
                });
            }
            let (ticket, name, client) = {
                let mut inner = self.lock();
                let Some(ticket) = inner.pool.start_excluding(now, exclude) else {
                    let reason = last_refusal.unwrap_or_else(|| {
                        if inner.pool.is_empty() {
                            "the pool has no endpoint".to_owned()
                        } else {
                            "every endpoint is ejected".to_owned()
                        }
                    });
                    return Err(self.unavailable(reason));
                };
                let id = ticket.endpoint();
                let name = inner.pool.name(id).unwrap_or_default().to_owned();
                let Some(client) = inner.clients.get(&name).cloned() else {
                    // An endpoint list and its clients change together
                    // under this lock; a missing client is a bug, not a
                    // peer's doing: give the ticket back and say so.
                    inner.pool.finish(ticket, now, Outcome::Abandoned);
                    return Err(self.unavailable(format!("no client for {name}")));
                };
                (ticket, name, client)
            };
            let in_flight = self
                .metrics
                .upstream_in_flight
                .get_or_create(&self.labels(&name))
                .clone();
            in_flight.inc();
            let mut guard = TicketGuard {
                upstream: self,
                ticket: Some(ticket),
            };
            let t0 = Instant::now();
            let result = client
                .infer(&self.remote_model, id, inputs, policy, left)
                .await;
            let latency = t0.elapsed();
            in_flight.dec();
            match result {
                Ok(answer) => {
                    guard.finish(Outcome::Success { latency });
                    self.metrics
                        .upstream_seconds
                        .get_or_create(&self.labels(&name))
                        .observe(latency.as_secs_f64());
                    return Ok(Served {
                        answer,
                        endpoint: name,
                        latency: started.elapsed(),
                    });
                }
                Err(e) => {
                    self.metrics
                        .upstream_errors
                        .get_or_create(&UpstreamErrorLabels {
                            model: self.model.clone(),
                            endpoint: name.clone(),
                            kind: e.kind(),
                        })
                        .inc();
                    let failed_on = guard.endpoint();
                    guard.finish(e.outcome(latency));
                    tracing::debug!(model = %self.model, endpoint = %name, error = %e, "upstream try failed");
                    match e {
                        TryError::NotStarted(why) | TryError::Busy(why) => {
                            let retry = self.lock().pool.try_retry(Instant::now());
                            last_refusal = Some(format!("{name}: {why}"));
                            if !retry {
                                return Err(self.unavailable(format!(
                                    "{} (retry budget spent)",
                                    last_refusal.unwrap_or_default()
                                )));
                            }
                            self.metrics
                                .upstream_retries
                                .get_or_create(&NameLabels {
                                    model: self.model.clone(),
                                })
                                .inc();
                            exclude = failed_on;
                        }
                        TryError::TimedOut(_) => return Err(GatewayError::DeadlineExceeded),
                        TryError::Failed(message) => {
                            return Err(GatewayError::Upstream {
                                model: self.model.clone(),
                                endpoint: name,
                                message,
                            });
                        }
                        TryError::Status { code, message } => {
                            return Err(match code {
                                Code::InvalidArgument => GatewayError::InvalidArgument(format!(
                                    "upstream {name}: {message}"
                                )),
                                Code::DeadlineExceeded => GatewayError::DeadlineExceeded,
                                code => GatewayError::Upstream {
                                    model: self.model.clone(),
                                    endpoint: name,
                                    message: format!("{code}: {message}"),
                                },
                            });
                        }
                    }
                }
            }
        }
    }

    fn unavailable(&self, reason: String) -> GatewayError {
        GatewayError::UpstreamUnavailable {
            model: self.model.clone(),
            reason,
        }
    }

    /// Reports a finished try to the pool and brings the endpoint's
    /// metrics up to date.
    fn finish(&self, ticket: Ticket, outcome: Outcome) {
        let now = Instant::now();
        let mut inner = self.lock();
        let id = ticket.endpoint();
        let before = inner.pool.ejections(id);
        inner.pool.finish(ticket, now, outcome);
        self.publish(&mut inner, id, before, now);
    }

    fn publish(&self, inner: &mut Inner, id: EndpointId, ejections_before: u64, now: Instant) {
        let Some(name) = inner.pool.name(id).map(str::to_owned) else {
            return;
        };
        let labels = self.labels(&name);
        let ejected = inner.pool.ejections(id).saturating_sub(ejections_before);
        if ejected > 0 {
            tracing::warn!(model = %self.model, endpoint = %name, "upstream endpoint ejected");
            self.metrics
                .upstream_ejections
                .get_or_create(&labels)
                .inc_by(ejected);
        }
        let available = !matches!(inner.pool.health(id, now), Some(Health::Ejected { .. }));
        self.metrics
            .upstream_available
            .get_or_create(&labels)
            .set(i64::from(available));
    }

    fn probe_targets(&self) -> Vec<(String, EndpointClient)> {
        let inner = self.lock();
        (0..inner.pool.len())
            .filter_map(|id| {
                let name = inner.pool.name(id)?.to_owned();
                let client = inner.clients.get(&name)?.clone();
                Some((name, client))
            })
            .collect()
    }

    fn report_probe(&self, name: &str, ready: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(id) = inner.pool.position(name) else {
            return;
        };
        let before = inner.pool.ejections(id);
        inner.pool.probe(id, now, ready);
        self.publish(&mut inner, id, before, now);
    }

    /// Replaces the resolved part of the endpoint list (the fixed endpoints
    /// stay); endpoints that stay keep their state.
    fn set_resolved(&self, resolved: Vec<Endpoint>) {
        let mut names: Vec<String> = self
            .config
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut inner = self.lock();
        let mut clients = HashMap::new();
        for e in self.config.endpoints.iter().chain(&resolved) {
            let name = e.to_string();
            if clients.contains_key(&name) {
                continue;
            }
            let client = match inner.clients.remove(&name) {
                Some(c) => c,
                None => match EndpointClient::new(
                    e,
                    self.config.connect_timeout,
                    self.config.token.as_deref(),
                    self.tls.as_ref(),
                ) {
                    Ok(c) => c,
                    Err(why) => {
                        tracing::warn!(model = %self.model, endpoint = %name, %why, "skipping a resolved endpoint");
                        continue;
                    }
                },
            };
            if !names.contains(&name) {
                names.push(name.clone());
            }
            clients.insert(name, client);
        }
        let current: Vec<String> = (0..inner.pool.len())
            .filter_map(|id| inner.pool.name(id).map(str::to_owned))
            .collect();
        if current == names {
            inner.clients = clients;
            return;
        }
        for gone in current.iter().filter(|n| !names.contains(n)) {
            let _ = self.metrics.upstream_available.remove(&self.labels(gone));
        }
        for name in &names {
            if !current.contains(name) {
                self.metrics
                    .upstream_available
                    .get_or_create(&self.labels(name))
                    .set(1);
            }
        }
        tracing::info!(model = %self.model, endpoints = ?names, "upstream endpoints changed");
        inner.pool.set_endpoints(names);
        inner.clients = clients;
    }
}

/// Gives a started try's ticket back to the pool exactly once: with the
/// try's outcome, or as abandoned when the caller is dropped mid-try (its
/// client went away).
struct TicketGuard<'a> {
    upstream: &'a Upstream,
    ticket: Option<Ticket>,
}

impl TicketGuard<'_> {
    fn endpoint(&self) -> Option<EndpointId> {
        self.ticket.as_ref().map(Ticket::endpoint)
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(ticket) = self.ticket.take() {
            self.upstream.finish(ticket, outcome);
        }
    }
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Abandoned);
    }
}

async fn probe_loop(upstream: Weak<Upstream>, every: Duration) {
    let timeout = every.min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(up) = upstream.upgrade() else { return };
        let targets = up.probe_targets();
        let model = up.remote_model.clone();
        drop(up);
        let mut probes = tokio::task::JoinSet::new();
        for (name, client) in targets {
            let model = model.clone();
            probes.spawn(async move { (name, client.ready(&model, timeout).await) });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((name, ready)) = done else { continue };
            let Some(up) = upstream.upgrade() else { return };
            up.report_probe(&name, ready);
        }
    }
}

async fn resolve_loop(upstream: Weak<Upstream>, dns: Endpoint, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match resolve(&dns).await {
            Ok(resolved) => {
                let Some(up) = upstream.upgrade() else { return };
                up.set_resolved(resolved);
            }
            Err(e) => {
                // Keep the last good list: a DNS outage must not empty the
                // pool.
                tracing::warn!(name = %dns, error = %e, "resolving upstreams failed");
                if upstream.strong_count() == 0 {
                    return;
                }
            }
        }
    }
}

/// One endpoint per address `dns` resolves to, sorted for a stable order.
pub async fn resolve(dns: &Endpoint) -> std::io::Result<Vec<Endpoint>> {
    let mut addrs: Vec<std::net::IpAddr> = tokio::net::lookup_host((dns.host.as_str(), dns.port))
        .await?
        .map(|a| a.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs
        .into_iter()
        .map(|ip| dns.with_host(ip.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolves_into_one_endpoint_per_address() {
        let dns = Endpoint::parse("grpc://localhost:9001").expect("endpoint");
        let got = resolve(&dns).await.expect("localhost resolves");
        assert!(!got.is_empty());
        assert!(got.iter().all(|e| e.port == 9001 && e.host != "localhost"));
        assert!(
            got.iter().any(|e| e.host == "127.0.0.1" || e.host == "::1"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn resolved_endpoints_join_the_fixed_ones_and_keep_their_state() {
        let fixed = Endpoint::parse("grpc://127.0.0.1:1").expect("endpoint");
        let mut config = quiver_config::Upstream::new(vec![fixed.clone()]);
        config.eject_after = 1;
        let up = Upstream::new("m", &config, Arc::new(Metrics::new())).expect("upstream");
        assert_eq!(up.len(), 1);
        // Eject the fixed endpoint, then resolve two more.
        up.report_probe("grpc://127.0.0.1:1", false);
        let a = fixed.with_host("10.0.0.1");
        let b = fixed.with_host("10.0.0.2");
        up.set_resolved(vec![a.clone(), b.clone()]);
        assert_eq!(up.len(), 3);
        {
            let mut inner = up.lock();
            let now = Instant::now();
            let id = inner.pool.position("grpc://127.0.0.1:1").expect("kept");
            assert!(matches!(
                inner.pool.health(id, now),
                Some(Health::Ejected { .. })
            ));
            assert_eq!(inner.clients.len(), 3);
        }
        // One address goes away: its endpoint and client go too.
        up.set_resolved(vec![b]);
        assert_eq!(up.len(), 2);
        assert!(up.lock().pool.position(&a.to_string()).is_none());
        assert_eq!(up.lock().clients.len(), 2);
    }
}
