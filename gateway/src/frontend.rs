//! Front ends: each decodes its protocol into [`crate::request::InferRequest`],
//! calls the [`crate::router::Router`], and maps errors to its wire status in
//! exactly one function.

pub mod auth;
pub mod catalog;
pub mod embed;
pub mod grpc;
pub mod h3;
pub mod http;
pub mod inflight;
pub mod openapi;
pub mod quic;
pub mod sources;
