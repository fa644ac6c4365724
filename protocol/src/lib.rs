//! Quiver's wire codecs, sans-IO (in the manner of `quinn-proto`): bytes in,
//! typed values or typed errors out; no runtime, no sockets.
//!
//! Every byte a peer sends reaches the gateway through this crate:
//!
//! - [`frame`]: the `quiver/1` length-prefixed frame and its reply envelope;
//! - [`proto`]: the Open Inference Protocol's protobuf messages (KServe v2),
//!   and [`kserve`]: their conversion to and from [`tensor::HostTensor`]s;
//! - [`json`]: KServe v2 JSON requests and responses;
//! - [`binary`]: Triton's binary tensor extension of the REST body;
//! - [`tensor`]: host tensors and the raw tensor layout (dtype, shape with
//!   checked arithmetic, byte length, BYTES element framing);
//! - [`status`]: the one map per protocol from an error's kind to the wire
//!   status (native code, HTTP status, gRPC code).
//!
//! Decoders never panic and never allocate more than the input's length
//! implies, whatever its length fields claim; `fuzz/` holds the targets that
//! check it.
#![forbid(unsafe_code)]
// What a peer sends must not panic: outside tests, no unwrap or expect, no
// indexing or slicing that can panic, no panic! or unreachable!.
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

pub mod binary;
pub mod error;
pub mod frame;
pub mod json;
pub mod kserve;
pub mod params;
pub mod plain;
pub mod proto;
pub mod status;
pub mod tensor;

pub use error::{DecodeError, InputError};
pub use status::{Code, ErrorKind};
pub use tensor::{DataType, HostTensor, TensorData};

/// The ALPN protocol name of Quiver's QUIC native protocol.
pub const NATIVE_ALPN: &[u8] = b"quiver/1";
