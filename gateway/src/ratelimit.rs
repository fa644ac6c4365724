//! Per-client rate limits (`server.rate_limit_per_sec`, a model's own
//! `rate_limit_per_sec`): one keyed GCRA limiter (governor) per model, keyed
//! by the client: its bearer token when tokens are configured, else its
//! source address. Checked after authentication and before admission, so a
//! refused request costs no queue place and no compute.
//!
//! Memory: one small cell per client seen recently; [`RateLimits::retain_recent`]
//! (run every few seconds by `serve`) drops clients whose bucket is full
//! again, so a stream of new source addresses does not grow it without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use quiver_config::RateLimit;

use crate::error::GatewayError;

/// Who a request comes from, for its rate limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The configured bearer token it carried (its index in
    /// `server.auth_tokens`: the secret itself is not kept).
    Token(usize),
    /// The identity of its verified client certificate (mTLS).
    Identity(std::sync::Arc<str>),
    /// Its source address, when no token identifies it.
    Source(IpAddr),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Token(i) => write!(f, "token #{i}"),
            ClientKey::Identity(id) => write!(f, "client {id}"),
            ClientKey::Source(ip) => write!(f, "source {ip}"),
        }
    }
}

impl ClientKey {
    /// The key of a request: the token it authenticated with, else its
    /// client certificate's identity, else the address it came from
    /// (unspecified when the transport gave none).
    pub fn of(
        token: Option<usize>,
        identity: Option<&PeerIdentity>,
        source: Option<IpAddr>,
    ) -> ClientKey {
        match (token, identity) {
            (Some(i), _) => ClientKey::Token(i),
            (None, Some(id)) => ClientKey::Identity(id.0.clone()),
            (None, None) => {
                ClientKey::Source(source.unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)))
            }
        }
    }
}

/// The identity of a connection's verified client certificate (mTLS; see
/// `tls::peer_identity`), in its requests' extensions like [`ClientAddr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub std::sync::Arc<str>);

impl PeerIdentity {
    /// The identity of a QUIC connection's verified client certificate, if
    /// it presented one.
    pub fn of_quic(conn: &quinn::Connection) -> Option<PeerIdentity> {
        let chain = conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        Self::of_chain(&chain)
    }

    /// The identity of a verified certificate chain (`tls::peer_identity`).
    pub fn of_chain(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<PeerIdentity> {
        crate::tls::peer_identity(chain).map(|id| PeerIdentity(id.into()))
    }
}

/// The peer address of a request's connection, put in its extensions by the
/// TCP and HTTP/3 front ends (axum and tonic handlers read it there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

type Keyed<C> = RateLimiter<
    ClientKey,
    DefaultKeyedStateStore<ClientKey>,
    C,
    NoOpMiddleware<<C as Clock>::Instant>,
>;

/// The limits of every model that has one.
pub struct RateLimits<C: Clock = DefaultClock> {
    models: HashMap<String, (RateLimit, Keyed<C>)>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.models.iter().map(|(m, (l, _))| (m, l)))
            .finish()
    }
}

impl Default for RateLimits<DefaultClock> {
    fn default() -> Self {
        RateLimits::with_clock(DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// No limits yet, on `clock`.
    pub fn with_clock(clock: C) -> Self {
        RateLimits {
            models: HashMap::new(),
            clock,
        }
    }

    /// Limits each client of `model` to `limit`.
    pub fn set(&mut self, model: &str, limit: RateLimit) {
        let per_sec = NonZeroU32::new(limit.per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        let limiter =
            RateLimiter::new(quota, DefaultKeyedStateStore::default(), self.clock.clone());
        self.models.insert(model.to_owned(), (limit, limiter));
    }

    /// Whether `client` may send one more request to `model` now; refused
    /// with [`GatewayError::RateLimited`] (how long until it may) if not.
    pub fn check(&self, model: &str, client: ClientKey) -> Result<(), GatewayError> {
        let Some((limit, limiter)) = self.models.get(model) else {
            return Ok(());
        };
        limiter
            .check_key(&client)
            .map_err(|not_until| GatewayError::RateLimited {
                model: model.to_owned(),
                client: client.to_string(),
                per_sec: limit.per_sec,
                retry_after: not_until.wait_time_from(self.clock.now()),
            })
    }

    /// Forgets clients whose bucket has filled up again (they are as if new).
    pub fn retain_recent(&self) {
        for (_, limiter) in self.models.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Clients remembered, over every model.
    pub fn clients(&self) -> usize {
        self.models.values().map(|(_, l)| l.len()).sum()
    }

    /// Whether any model has a limit.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Rounds a wait up to whole seconds for `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limits(per_sec: u32, burst: u32) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let mut l = RateLimits::with_clock(clock.clone());
        l.set("m", RateLimit { per_sec, burst });
        (l, clock)
    }

    const A: ClientKey = ClientKey::Token(0);
    const B: ClientKey = ClientKey::Token(1);

    #[test]
    fn a_burst_then_the_rate_per_client() {
        let (l, clock) = limits(10, 3);
        for _ in 0..3 {
            l.check("m", A).unwrap();
        }
        let err = l.check("m", A).unwrap_err();
        match err {
            GatewayError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_millis(100));
            }
            other => panic!("{other}"),
        }
        // Another client is untouched, another model unlimited.
        l.check("m", B).unwrap();
        for _ in 0..100 {
            l.check("other", A).unwrap();
        }
        // A tenth of a second later, one more.
        clock.advance(Duration::from_millis(100));
        l.check("m", A).unwrap();
        assert!(l.check("m", A).is_err());
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let (l, clock) = limits(10, 2);
        for i in 0..50u8 {
            l.check("m", ClientKey::Source(IpAddr::from([10, 0, 0, i])))
                .unwrap();
        }
        assert_eq!(l.clients(), 50);
        clock.advance(Duration::from_secs(1));
        l.retain_recent();
        assert_eq!(l.clients(), 0);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
