//! The Quiver gateway: it joins the leaves of the workspace.
//!
//! A request enters through a front end ([`frontend::quic`] for the QUIC
//! native protocol), is decoded into one [`request::InferRequest`], and goes
//! to the [`router::Router`]. The router validates it against the model's
//! signature (`quiver_kernels::Model::prepare`), asks the model's scheduler
//! whether the deadline can be met, and admits it into the bounded lanes of
//! `quiver_batching`. One OS thread per model and device ([`device`]) drives
//! the scheduler and runs the batches on `quiver_kernels` models. Every
//! accepted request ends with exactly one answer: a result or a typed
//! [`error::GatewayError`].
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

pub mod budget;
pub mod client;
pub mod device;
pub mod error;
pub mod framing;
pub mod frontend;
pub mod lifecycle;
/// KServe v2 JSON, from `quiver-protocol`.
pub use quiver_protocol::json;
pub mod metrics;
pub mod proto;
pub mod ratelimit;
pub mod registry;
pub mod request;
pub mod router;
pub mod serve;
pub mod tensor;
pub mod tls;
pub mod upstream;

pub use quiver_protocol::NATIVE_ALPN;
