//! The crate's errors, one enum per kind of fault, so the gateway's single mapping point can
//! tell whose fault an error is without looking inside it:
//!
//! - [`InputError`]: the client sent something that does not fit the model (wire status
//!   `INVALID_ARGUMENT` / HTTP 400). Retrying the same request cannot help.
//! - [`ModelError`]: the device or the model failed on valid input (`INTERNAL` / HTTP 500).
//!   The request may succeed elsewhere, e.g. on an upstream CPU worker.
//! - [`LoadError`]: a model could not be loaded at start-up (the operator's configuration or
//!   files).
//! - [`DeviceError`]: a device name could not be parsed or the device cannot be used.

use std::path::PathBuf;

pub use quiver_protocol::InputError;

/// The model or device failed on input that passed [`crate::Model::prepare`]. Not the
/// client's fault; another device or an upstream worker may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// candle failed (device out of memory, a kernel error, a driver error).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// ONNX Runtime failed (`kind = "onnx"` on its ONNX Runtime engine).
    #[error("ONNX Runtime: {message}")]
    OnnxRuntime {
        /// ONNX Runtime's message.
        message: String,
    },
    /// The batch handed to `forward` does not fit the model: a [`crate::Prepared`] that was
    /// not made by this model's `prepare`. A bug in the caller, reported instead of a panic.
    #[error("batch does not fit the model: {message}")]
    BadBatch {
        /// What does not fit.
        message: String,
    },
}

/// A model could not be loaded. The operator's fault (configuration or files) or the
/// device's; names the file, tensor or device involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON, or states an impossible model.
    #[error("{}: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model spec built from the gateway's configuration is impossible (e.g. a layer of
    /// width 0).
    #[error("model spec: {message}")]
    Spec {
        /// What is wrong.
        message: String,
    },
    /// `model.safetensors` could not be parsed or written.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor that `config.json` implies is not in `model.safetensors`.
    #[error("model.safetensors has no tensor `{name}`")]
    MissingTensor {
        /// The tensor's name, e.g. `layers.1.bias`.
        name: String,
    },
    /// `model.safetensors` has a layer tensor that `config.json` does not imply (the two
    /// files disagree on the number of layers).
    #[error("model.safetensors has tensor `{name}`, which config.json does not describe")]
    UnexpectedTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor's shape does not match `config.json`.
    #[error("tensor `{name}` has shape {got:?}, config.json implies {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape that `config.json` implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor's dtype is not the one the model needs.
    #[error("tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The dtype needed.
        expected: String,
        /// The dtype in the file.
        got: String,
    },
    /// A tree model file (`kind = "trees"`) is not one Quiver can evaluate exactly: not a
    /// tree model, malformed, or using a feature it does not support (named).
    #[error("{}: {source}", path.display())]
    Trees {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        source: crate::trees::TreeError,
    },
    /// An ONNX model (`kind = "onnx"`) cannot be served: not ONNX, ONNX Runtime's library
    /// cannot be opened, a graph its engine cannot run (candle-onnx: the op types, listed), an
    /// input or output it cannot batch, or a failed load-time run.
    #[error("{}: {source}", path.display())]
    Onnx {
        /// The `.onnx` file.
        path: PathBuf,
        /// What is wrong.
        source: crate::onnx::OnnxError,
    },
    /// The device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// candle failed while placing weights on the device.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A device name is malformed, or the device cannot be used by this build or machine.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The device's backend is not compiled into this binary (e.g. `cuda:0` without the
    /// `cuda` cargo feature).
    #[error("device {device} is not compiled into this build (it needs the `cuda` feature)")]
    NotCompiled {
        /// The device, e.g. `cuda:0`.
        device: String,
    },
    /// The backend is compiled in but the device could not be opened (no such GPU, no
    /// driver).
    #[error("device {device} is unavailable: {message}")]
    Unavailable {
        /// The device, e.g. `cuda:1`.
        device: String,
        /// The backend's message.
        message: String,
    },
    /// The text is not a device name (`cpu`, `cuda` or `cuda:N`).
    #[error("`{input}` is not a device: expected `cpu`, `cuda` or `cuda:N`")]
    Parse {
        /// The text given.
        input: String,
    },
}
