//! Bearer-token authentication, shared by every front end: REST (HTTP/1.1,
//! HTTP/2, HTTP/3), gRPC and the QUIC native protocol (DESIGN.md, "Security
//! and limits").
//!
//! With no token configured every request passes. Otherwise a request must
//! carry `Authorization: Bearer TOKEN` (an HTTP header, or gRPC metadata)
//! with one of the configured tokens; health endpoints may be exempt, so
//! load balancers and readiness probes need no secret. The check runs before
//! a request body is read. The native protocol has no headers: its token is
//! the string request parameter [`PARAMETER`] of the `ModelInferRequest`
//! (see [`Auth::check_parameters`]), so it is checked once the frame, bounded
//! by `max_frame_bytes`, has been read, and before anything else is done
//! with it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::GatewayError;
use crate::proto::InferParameter;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::ratelimit::{ClientKey, PeerIdentity};

/// The request parameter that carries the bearer token on the QUIC native
/// protocol: a string `Bearer TOKEN`, as the HTTP header would hold it.
pub const PARAMETER: &str = "authorization";

/// The [`PARAMETER`] value for `token`: `Bearer TOKEN`.
pub fn bearer_parameter(token: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(format!("Bearer {token}"))),
    }
}

/// The configured tokens. Cheap to clone; every clone sees a
/// [`Auth::replace`] (a configuration reload) at once.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    state: Arc<arc_swap::ArcSwap<Tokens>>,
}

#[derive(Debug, Default)]
struct Tokens {
    tokens: Vec<Vec<u8>>,
    /// Per token, the client-certificate identity it is bound to, if any.
    bound: Vec<Option<String>>,
    exempt_health: bool,
}

impl Tokens {
    fn new(tokens: &[String], identities: &[String], exempt_health: bool) -> Self {
        Tokens {
            tokens: tokens.iter().map(|t| t.as_bytes().to_vec()).collect(),
            bound: identities
                .iter()
                .map(|id| (!id.is_empty()).then(|| id.clone()))
                .collect(),
            exempt_health,
        }
    }
}

impl Auth {
    /// Tokens as configured (`server.auth_tokens`); none turns
    /// authentication off. `exempt_health`: `server.auth_exempt_health`.
    pub fn new(tokens: &[String], exempt_health: bool) -> Self {
        Auth {
            state: Arc::new(arc_swap::ArcSwap::from_pointee(Tokens::new(
                tokens,
                &[],
                exempt_health,
            ))),
        }
    }

    /// Binds tokens to client-certificate identities
    /// (`server.auth_token_identities`: entry `i` for token `i`, `""` for
    /// unbound).
    #[must_use]
    pub fn with_identities(self, identities: &[String]) -> Self {
        let current = self.state.load();
        let tokens = Tokens {
            bound: Tokens::new(&[], identities, false).bound,
            tokens: current.tokens.clone(),
            exempt_health: current.exempt_health,
        };
        self.state.store(Arc::new(tokens));
        self
    }

    /// Replaces the tokens, their bindings and the health exemption (a
    /// configuration reload): requests checked from now on see the new set.
    pub fn replace(&self, tokens: &[String], identities: &[String], exempt_health: bool) {
        self.state
            .store(Arc::new(Tokens::new(tokens, identities, exempt_health)));
    }

    /// Who an inference request comes from, for its rate limit, once its
    /// token (`token`, from [`Auth::check`]) is known: refused when that
    /// token is bound to a client certificate the connection did not
    /// present.
    pub fn client(
        &self,
        token: Option<usize>,
        identity: Option<&PeerIdentity>,
        source: Option<std::net::IpAddr>,
    ) -> Result<ClientKey, GatewayError> {
        if let Some(i) = token
            && let Some(Some(bound)) = self.state.load().bound.get(i)
            && identity.is_none_or(|id| id.0.as_ref() != bound.as_str())
        {
            return Err(GatewayError::Unauthenticated(
                "this token is bound to another client certificate".into(),
            ));
        }
        Ok(ClientKey::of(token, identity, source))
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.state.load().tokens.is_empty()
    }

    /// Checks the value of the `authorization` header (or metadata) of a
    /// request; `health` says whether the endpoint is a health endpoint.
    /// Returns which configured token it carried (its index: the client's
    /// identity for rate limits), `None` when no token was needed.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        health: bool,
    ) -> Result<Option<usize>, GatewayError> {
        let state = self.state.load();
        if state.tokens.is_empty() || (health && state.exempt_health) {
            return Ok(None);
        }
        let Some(value) = authorization else {
            return Err(GatewayError::Unauthenticated(
                "this server needs 'Authorization: Bearer TOKEN'".into(),
            ));
        };
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .ok_or_else(|| {
                GatewayError::Unauthenticated("the authorization is not a bearer token".into())
            })?;
        // Compare with every token, each in constant time, so the time
        // taken says nothing about which bytes matched.
        let mut matched = None;
        for (i, t) in state.tokens.iter().enumerate() {
            if constant_time_eq(t, token) {
                matched = Some(i);
            }
        }
        if matched.is_some() {
            Ok(matched)
        } else {
            Err(GatewayError::Unauthenticated(
                "the bearer token is not accepted".into(),
            ))
        }
    }
}

impl Auth {
    /// Checks the token of a native request, carried as the string
    /// parameter [`PARAMETER`], and removes that parameter, so the secret
    /// goes no further than this check (not into the router, logs or
    /// upstream requests), whether or not authentication is on.
    pub fn check_parameters(
        &self,
        parameters: &mut HashMap<String, InferParameter>,
    ) -> Result<Option<usize>, GatewayError> {
        let carried = parameters.remove(PARAMETER);
        match carried.and_then(|p| p.parameter_choice) {
            None => self.check(None, false),
            Some(ParameterChoice::StringParam(value)) => self.check(Some(value.as_bytes()), false),
            Some(_) if !self.enabled() => Ok(None),
            Some(_) => Err(GatewayError::Unauthenticated(format!(
                "the '{PARAMETER}' parameter must be the string 'Bearer TOKEN'"
            ))),
        }
    }
}

/// Equal in time that depends on the lengths only (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_token_needs_its_certificate() {
        let auth = Auth::new(&["bound".into(), "free".into()], true)
            .with_identities(&["spiffe://a".into(), String::new()]);
        let id = |s: &str| PeerIdentity(s.into());
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let key = |token, identity: Option<&PeerIdentity>| auth.client(token, identity, Some(ip));
        assert!(matches!(
            key(Some(0), Some(&id("spiffe://a"))),
            Ok(ClientKey::Token(0))
        ));
        assert!(key(Some(0), Some(&id("spiffe://b"))).is_err());
        assert!(key(Some(0), None).is_err());
        assert!(matches!(key(Some(1), None), Ok(ClientKey::Token(1))));
        assert!(
            matches!(key(None, Some(&id("spiffe://b"))), Ok(ClientKey::Identity(i)) if &*i == "spiffe://b")
        );
        assert!(matches!(key(None, None), Ok(ClientKey::Source(a)) if a == ip));
    }

    #[test]
    fn tokens_health_exemption_and_off() {
        let off = Auth::new(&[], false);
        assert!(off.check(None, false).is_ok());

        let auth = Auth::new(&["s3cret".into(), "other".into()], true);
        assert!(auth.check(Some(b"Bearer s3cret"), false).is_ok());
        assert!(auth.check(Some(b"Bearer other"), false).is_ok());
        assert!(auth.check(Some(b"Bearer s3cre"), false).is_err());
        assert!(auth.check(Some(b"Basic s3cret"), false).is_err());
        assert!(auth.check(None, false).is_err());
        assert!(auth.check(None, true).is_ok());

        let strict = Auth::new(&["s3cret".into()], false);
        assert!(matches!(
            strict.check(None, true),
            Err(GatewayError::Unauthenticated(_))
        ));
    }

    #[test]
    fn the_native_parameter_is_checked_and_always_removed() {
        let auth = Auth::new(&["s3cret".into()], true);
        let with = |p: InferParameter| {
            let mut m = HashMap::new();
            m.insert(PARAMETER.to_string(), p);
            m.insert("priority".to_string(), crate::tensor::int_param(1));
            m
        };

        let mut good = with(bearer_parameter("s3cret"));
        assert!(auth.check_parameters(&mut good).is_ok());
        assert!(!good.contains_key(PARAMETER), "the token went further");
        assert!(good.contains_key("priority"), "another parameter was lost");

        let mut wrong = with(bearer_parameter("s3cre"));
        assert!(matches!(
            auth.check_parameters(&mut wrong),
            Err(GatewayError::Unauthenticated(_))
        ));
        assert!(!wrong.contains_key(PARAMETER));

        let mut not_a_string = with(crate::tensor::int_param(7));
        assert!(auth.check_parameters(&mut not_a_string).is_err());
        let mut none = HashMap::new();
        assert!(auth.check_parameters(&mut none).is_err());

        // Authentication off: anything passes, and the parameter still goes.
        let off = Auth::default();
        let mut carried = with(crate::tensor::int_param(7));
        assert!(off.check_parameters(&mut carried).is_ok());
        assert!(!carried.contains_key(PARAMETER));
    }
}
