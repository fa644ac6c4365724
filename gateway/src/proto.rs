//! The protobuf types: the messages from `quiver-protocol`, and the
//! Open Inference Protocol's tonic service (`GRPCInferenceService`), which
//! only the gateway (with its runtime) needs.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The Open Inference Protocol's gRPC messages and service.
pub mod inference {
    pub use quiver_protocol::proto::inference::*;
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

pub use quiver_protocol::proto::native;
pub use quiver_protocol::proto::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
