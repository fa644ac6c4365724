//! Bearer-token authentication, shared by the REST (HTTP/1.1, HTTP/2,
//! HTTP/3) and gRPC front ends (DESIGN.md, "Security and limits").
//!
//! With no token configured every request passes. Otherwise a request must
//! carry `Authorization: Bearer TOKEN` (an HTTP header, or gRPC metadata)
//! with one of the configured tokens; health endpoints may be exempt, so
//! load balancers and readiness probes need no secret. The check runs before
//! a request body is read.

use std::sync::Arc;

use crate::error::GatewayError;

/// The configured tokens. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Arc<Vec<Vec<u8>>>,
    exempt_health: bool,
}

impl Auth {
    /// Tokens as configured (`server.auth_tokens`); none turns
    /// authentication off. `exempt_health`: `server.auth_exempt_health`.
    pub fn new(tokens: &[String], exempt_health: bool) -> Self {
        Auth {
            tokens: Arc::new(tokens.iter().map(|t| t.as_bytes().to_vec()).collect()),
            exempt_health,
        }
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks the value of the `authorization` header (or metadata) of a
    /// request; `health` says whether the endpoint is a health endpoint.
    pub fn check(&self, authorization: Option<&[u8]>, health: bool) -> Result<(), GatewayError> {
        if !self.enabled() || (health && self.exempt_health) {
            return Ok(());
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
        let mut matched = false;
        for t in self.tokens.iter() {
            matched |= constant_time_eq(t, token);
        }
        if matched {
            Ok(())
        } else {
            Err(GatewayError::Unauthenticated(
                "the bearer token is not accepted".into(),
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
