//! Generated protobuf types: the Open Inference Protocol (KServe v2) schema
//! (`inference`) and Quiver's native reply envelope (`native`).
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The Open Inference Protocol's gRPC messages.
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// Quiver's own packages; nested as the protobuf package names are, so the
/// generated cross-package paths resolve.
pub mod quiver {
    pub mod native {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/quiver.native.v1.rs"));
        }
    }
}

/// Quiver's QUIC native reply envelope (`quiver.native.v1`).
pub use self::quiver::native::v1 as native;

pub use inference::{InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse};
