//! Overflow to upstream inference services (`routing` and
//! `[models.upstream]`; DESIGN.md, "Overflow").
//!
//! A model's `routing` says where its requests may run: on the local device
//! only, on the local device first and on an upstream when the local device
//! cannot finish before the deadline, or on upstreams only. The upstreams are
//! Open Inference Protocol (KServe v2) servers — `quiver worker`, Triton on
//! CPU, MLServer — reached over gRPC or REST on HTTP/2 (h2c, binary tensors),
//! from fixed endpoints or from a DNS name resolved again periodically (a
//! Kubernetes headless Service).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::validate::{Bound, Errors};

/// Where a model's requests may run. TOML `routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Routing {
    /// `"local-first"` (default): on the local device when the scheduler
    /// predicts it finishes before the deadline (with `local_margin_us` to
    /// spare); else on an upstream whose expected latency fits the time left;
    /// else refused before any work. A model without `[models.upstream]`
    /// behaves as `local-only`.
    #[default]
    LocalFirst,
    /// `"local-only"`: never on an upstream.
    LocalOnly,
    /// `"upstream-only"`: always on an upstream (needs `[models.upstream]`).
    UpstreamOnly,
}

impl Routing {
    /// Every policy, in the order of the error message that lists them.
    pub const ALL: [Routing; 3] = [
        Routing::LocalFirst,
        Routing::LocalOnly,
        Routing::UpstreamOnly,
    ];

    /// The spelling in the TOML file.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Routing::LocalFirst => "local-first",
            Routing::LocalOnly => "local-only",
            Routing::UpstreamOnly => "upstream-only",
        }
    }

    /// The policy spelled `text`, if any.
    #[must_use]
    pub fn from_name(text: &str) -> Option<Routing> {
        Routing::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wire protocol towards an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// `grpc://`: KServe v2 gRPC `ModelInfer` with raw tensor contents.
    Grpc,
    /// `http://`: KServe v2 REST over HTTP/2 with prior knowledge (h2c),
    /// inputs and outputs as binary tensors (Triton's extension).
    Http,
}

impl UpstreamProtocol {
    /// The URL scheme: `grpc` or `http`.
    #[must_use]
    pub const fn scheme(self) -> &'static str {
        match self {
            UpstreamProtocol::Grpc => "grpc",
            UpstreamProtocol::Http => "http",
        }
    }
}

/// One upstream address: `grpc://HOST:PORT` or `http://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The wire protocol.
    pub protocol: UpstreamProtocol,
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `grpc://HOST:PORT` or `http://HOST:PORT` (IPv6 as `[::1]`).
    ///
    /// # Errors
    ///
    /// What is wrong with the text, in words.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("must start with grpc:// or http://")?;
        let protocol = match scheme {
            "grpc" => UpstreamProtocol::Grpc,
            "http" => UpstreamProtocol::Http,
            other => return Err(format!("scheme must be grpc or http, got \"{other}\"")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or("must give a port: SCHEME://HOST:PORT")?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
            return Err(format!("bad host \"{host}\""));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port must be 1..=65535, got \"{port}\""))?;
        Ok(Endpoint {
            protocol,
            host: host.to_owned(),
            port,
        })
    }

    /// The same endpoint at another host (a resolved address).
    #[must_use]
    pub fn with_host(&self, host: impl Into<String>) -> Endpoint {
        Endpoint {
            protocol: self.protocol,
            host: host.into(),
            port: self.port,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.protocol.scheme(),
                self.host,
                self.port
            )
        } else {
            write!(
                f,
                "{}://{}:{}",
                self.protocol.scheme(),
                self.host,
                self.port
            )
        }
    }
}

/// A model's upstream pool (`[models.upstream]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// Fixed endpoints. TOML `endpoints`, an array of `grpc://HOST:PORT` or
    /// `http://HOST:PORT`. Default `[]`; with `dns` unset, at least one.
    pub endpoints: Vec<Endpoint>,
    /// A name resolved every `resolve_interval` into one endpoint per
    /// address (a Kubernetes headless Service: one address per pod), added
    /// to `endpoints`. TOML `dns`, `grpc://NAME:PORT` or `http://NAME:PORT`.
    /// Default none.
    pub dns: Option<Endpoint>,
    /// How often `dns` is resolved again. TOML `resolve_interval_ms`.
    /// Default 5000 (5 s), range 100..=3 600 000.
    pub resolve_interval: Duration,
    /// The model's name on the upstreams. TOML `model`. Default: the
    /// model's own name.
    pub model: Option<String>,
    /// How often each endpoint is probed (`/v2/health/ready` and
    /// `/v2/models/{m}/ready`, or their gRPC twins). TOML
    /// `probe_interval_ms`. Default 1000 (1 s), range 10..=600 000.
    pub probe_interval: Duration,
    /// Consecutive failures (connect refused, reset, timeout, 5xx) that
    /// eject an endpoint. TOML `eject_after_failures`. Default 3, range
    /// 1..=1000.
    pub eject_after: u32,
    /// Length of a first ejection; it doubles with each ejection in a row.
    /// TOML `base_ejection_ms`. Default 1000 (1 s), range 1..=600 000.
    pub base_ejection: Duration,
    /// Longest ejection. TOML `max_ejection_ms`. Default 30 000 (30 s),
    /// range 1..=3 600 000, at least `base_ejection_ms`.
    pub max_ejection: Duration,
    /// Retries allowed, as a percentage of the requests of the last 10 s
    /// (plus 10 per second). Only tries that started no work upstream are
    /// retried. TOML `retry_budget_percent`. Default 20, range 0..=100.
    pub retry_budget_percent: u32,
    /// Longest wait for a TCP connection to an upstream. TOML
    /// `connect_timeout_ms`. Default 500, range 1..=60 000.
    pub connect_timeout: Duration,
    /// Bearer token sent to the upstreams (`Authorization: Bearer TOKEN` on
    /// REST, `authorization` metadata on gRPC), for workers with
    /// `server.auth_tokens`. TOML `token`, 1 to 4096 visible ASCII
    /// characters. Default none.
    pub token: Option<String>,
    /// TLS toward the upstreams (`[models.upstream.tls]`): when set, every
    /// endpoint, `grpc://` and `http://` alike, is dialled over TLS 1.3
    /// (HTTP/2 by ALPN), trusting `ca` and presenting `cert` (mTLS, for
    /// workers with `tls.client_ca`). Default none: plain TCP.
    pub tls: Option<UpstreamTls>,
    /// `local-first`: the local device is chosen only if its predicted
    /// completion leaves this much of the deadline to spare. TOML
    /// `local_margin_us`. Default 2000 (2 ms), range 0..=10 000 000.
    pub local_margin: Duration,
}

/// TLS toward upstream workers (`[models.upstream.tls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA certificates the workers' certificates must chain to. TOML
    /// `ca`. Required.
    pub ca: std::path::PathBuf,
    /// PEM client certificate chain presented to the workers. TOML `cert`;
    /// with `key`, or neither. Default none.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `cert`. TOML `key`. Default none.
    pub key: Option<std::path::PathBuf>,
    /// The name the workers' certificates must carry. TOML `server_name`.
    /// Default: each endpoint's host.
    pub server_name: Option<String>,
}

impl Upstream {
    /// Default of [`Upstream::resolve_interval`]: 5 s.
    pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
    /// Default of [`Upstream::probe_interval`]: 1 s.
    pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
    /// Default of [`Upstream::eject_after`].
    pub const DEFAULT_EJECT_AFTER: u32 = 3;
    /// Default of [`Upstream::base_ejection`]: 1 s.
    pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(1);
    /// Default of [`Upstream::max_ejection`]: 30 s.
    pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(30);
    /// Default of [`Upstream::retry_budget_percent`].
    pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
    /// Default of [`Upstream::connect_timeout`]: 500 ms.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    /// Default of [`Upstream::local_margin`]: 2 ms.
    pub const DEFAULT_LOCAL_MARGIN: Duration = Duration::from_millis(2);

    /// A pool over `endpoints` with every other knob on its default.
    #[must_use]
    pub fn new(endpoints: Vec<Endpoint>) -> Upstream {
        Upstream {
            endpoints,
            dns: None,
            resolve_interval: Upstream::DEFAULT_RESOLVE_INTERVAL,
            model: None,
            probe_interval: Upstream::DEFAULT_PROBE_INTERVAL,
            eject_after: Upstream::DEFAULT_EJECT_AFTER,
            base_ejection: Upstream::DEFAULT_BASE_EJECTION,
            max_ejection: Upstream::DEFAULT_MAX_EJECTION,
            retry_budget_percent: Upstream::DEFAULT_RETRY_BUDGET_PERCENT,
            connect_timeout: Upstream::DEFAULT_CONNECT_TIMEOUT,
            token: None,
            tls: None,
            local_margin: Upstream::DEFAULT_LOCAL_MARGIN,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    endpoints: Option<Vec<String>>,
    dns: Option<String>,
    resolve_interval_ms: Option<i64>,
    model: Option<String>,
    probe_interval_ms: Option<i64>,
    eject_after_failures: Option<i64>,
    base_ejection_ms: Option<i64>,
    max_ejection_ms: Option<i64>,
    retry_budget_percent: Option<i64>,
    connect_timeout_ms: Option<i64>,
    token: Option<String>,
    tls: Option<RawUpstreamTls>,
    local_margin_us: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
}

const RESOLVE_INTERVAL_MS: Bound = Bound::new(100, 3_600_000);
const PROBE_INTERVAL_MS: Bound = Bound::new(10, 600_000);
const EJECT_AFTER: Bound = Bound::new(1, 1000);
const BASE_EJECTION_MS: Bound = Bound::new(1, 600_000);
const MAX_EJECTION_MS: Bound = Bound::new(1, 3_600_000);
const RETRY_BUDGET_PERCENT: Bound = Bound::new(0, 100);
const CONNECT_TIMEOUT_MS: Bound = Bound::new(1, 60_000);
const LOCAL_MARGIN_US: Bound = Bound::new(0, 10_000_000);

pub(crate) fn convert_routing(raw: Option<String>, path: &str, errors: &mut Errors) -> Routing {
    match raw {
        None => Routing::default(),
        Some(text) => Routing::from_name(&text).unwrap_or_else(|| {
            errors.push(
                path,
                format!(
                    "must be \"local-first\", \"local-only\" or \"upstream-only\", got \"{text}\""
                ),
            );
            Routing::default()
        }),
    }
}

pub(crate) fn convert_upstream(raw: RawUpstream, prefix: &str, errors: &mut Errors) -> Upstream {
    let at = |field: &str| format!("{prefix}.{field}");
    let mut up = Upstream::new(Vec::new());
    for (index, text) in raw.endpoints.unwrap_or_default().iter().enumerate() {
        match Endpoint::parse(text) {
            Ok(e) => up.endpoints.push(e),
            Err(why) => errors.push(
                format!("{prefix}.endpoints[{index}]"),
                format!("{why}, got \"{text}\""),
            ),
        }
    }
    if let Some(text) = raw.dns {
        match Endpoint::parse(&text) {
            Ok(e) => up.dns = Some(e),
            Err(why) => errors.push(at("dns"), format!("{why}, got \"{text}\"")),
        }
    }
    up.model = raw.model;
    up.token = raw.token;
    if let Some(tls) = raw.tls {
        let path = |p: Option<String>| p.map(std::path::PathBuf::from);
        match tls.ca {
            Some(ca) if !ca.is_empty() => {
                up.tls = Some(UpstreamTls {
                    ca: ca.into(),
                    cert: path(tls.cert),
                    key: path(tls.key),
                    server_name: tls.server_name,
                });
            }
            _ => errors.push(
                at("tls.ca"),
                "required: the CA the workers' certificates chain to",
            ),
        }
    }
    let millis = |errors: &mut Errors, field: &str, raw, bound| {
        errors
            .int::<u64>(&at(field), raw, bound)
            .map(Duration::from_millis)
    };
    if let Some(d) = millis(
        errors,
        "resolve_interval_ms",
        raw.resolve_interval_ms,
        RESOLVE_INTERVAL_MS,
    ) {
        up.resolve_interval = d;
    }
    if let Some(d) = millis(
        errors,
        "probe_interval_ms",
        raw.probe_interval_ms,
        PROBE_INTERVAL_MS,
    ) {
        up.probe_interval = d;
    }
    if let Some(n) = errors.int(
        &at("eject_after_failures"),
        raw.eject_after_failures,
        EJECT_AFTER,
    ) {
        up.eject_after = n;
    }
    let base_known = raw.base_ejection_ms.is_none()
        || millis(
            errors,
            "base_ejection_ms",
            raw.base_ejection_ms,
            BASE_EJECTION_MS,
        )
        .map(|d| up.base_ejection = d)
        .is_some();
    let max_known = raw.max_ejection_ms.is_none()
        || millis(
            errors,
            "max_ejection_ms",
            raw.max_ejection_ms,
            MAX_EJECTION_MS,
        )
        .map(|d| up.max_ejection = d)
        .is_some();
    if let Some(n) = errors.int(
        &at("retry_budget_percent"),
        raw.retry_budget_percent,
        RETRY_BUDGET_PERCENT,
    ) {
        up.retry_budget_percent = n;
    }
    if let Some(d) = millis(
        errors,
        "connect_timeout_ms",
        raw.connect_timeout_ms,
        CONNECT_TIMEOUT_MS,
    ) {
        up.connect_timeout = d;
    }
    if let Some(us) =
        errors.int::<u64>(&at("local_margin_us"), raw.local_margin_us, LOCAL_MARGIN_US)
    {
        up.local_margin = Duration::from_micros(us);
    }
    if base_known && max_known && up.max_ejection < up.base_ejection {
        errors.push(
            at("max_ejection_ms"),
            format!(
                "must be at least base_ejection_ms ({}), got {}",
                up.base_ejection.as_millis(),
                up.max_ejection.as_millis()
            ),
        );
    }
    up
}

/// Checks of a typed upstream section, and of the routing it serves.
pub(crate) fn check_routing(
    routing: Routing,
    upstream: Option<&Upstream>,
    prefix: &str,
    errors: &mut Errors,
) {
    if routing == Routing::UpstreamOnly && upstream.is_none() {
        errors.push(
            format!("{prefix}.routing"),
            "\"upstream-only\" needs a [models.upstream] table",
        );
    }
    let Some(up) = upstream else { return };
    let at = |field: &str| format!("{prefix}.upstream.{field}");
    if up.endpoints.is_empty() && up.dns.is_none() {
        errors.push(
            format!("{prefix}.upstream"),
            "needs `endpoints` (grpc://HOST:PORT or http://HOST:PORT) or `dns`",
        );
    }
    if let Some(name) = &up.model
        && name.is_empty()
    {
        errors.push(at("model"), "must not be empty");
    }
    if let Some(tls) = &up.tls {
        match (&tls.cert, &tls.key) {
            (Some(_), None) => errors.push(at("tls.key"), "required when tls.cert is set"),
            (None, Some(_)) => errors.push(at("tls.cert"), "required when tls.key is set"),
            _ => {}
        }
        if tls.server_name.as_deref() == Some("") {
            errors.push(at("tls.server_name"), "must not be empty");
        }
    }
    if let Some(token) = &up.token
        && (token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()))
    {
        errors.push(
            at("token"),
            "must be 1 to 4096 visible ASCII characters without spaces",
        );
    }
    errors.bounded_millis(
        &at("resolve_interval_ms"),
        up.resolve_interval,
        RESOLVE_INTERVAL_MS,
    );
    errors.bounded_millis(
        &at("probe_interval_ms"),
        up.probe_interval,
        PROBE_INTERVAL_MS,
    );
    errors.bounded(
        &at("eject_after_failures"),
        up.eject_after.into(),
        EJECT_AFTER,
    );
    errors.bounded_millis(&at("base_ejection_ms"), up.base_ejection, BASE_EJECTION_MS);
    errors.bounded_millis(&at("max_ejection_ms"), up.max_ejection, MAX_EJECTION_MS);
    errors.bounded(
        &at("retry_budget_percent"),
        up.retry_budget_percent.into(),
        RETRY_BUDGET_PERCENT,
    );
    errors.bounded_millis(
        &at("connect_timeout_ms"),
        up.connect_timeout,
        CONNECT_TIMEOUT_MS,
    );
    errors.bounded_micros(&at("local_margin_us"), up.local_margin, LOCAL_MARGIN_US);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for text in [
            "grpc://127.0.0.1:9001",
            "http://workers.default.svc.cluster.local:9000",
            "grpc://[::1]:9001",
        ] {
            let e = Endpoint::parse(text).expect(text);
            assert_eq!(e.to_string(), text);
        }
        let e = Endpoint::parse("grpc://[::1]:9001").expect("v6");
        assert_eq!(e.host, "::1");
    }

    #[test]
    fn bad_endpoints_say_why() {
        let cases = [
            ("127.0.0.1:9001", "must start with grpc:// or http://"),
            ("https://a:1", "scheme must be grpc or http"),
            ("grpc://host", "must give a port"),
            ("grpc://host:0", "port must be 1..=65535"),
            ("grpc://host:99999", "port must be 1..=65535"),
            ("grpc://:9001", "bad host"),
        ];
        for (text, want) in cases {
            let got = Endpoint::parse(text).expect_err(text);
            assert!(got.contains(want), "{text}: {got}");
        }
    }
}
