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

use crate::tensor::DataType;

/// The client's input does not fit the model or is malformed. Always the client's fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputError {
    /// An input that the model's signature does not have.
    #[error("unknown input `{name}`")]
    UnknownInput {
        /// The input's name as sent.
        name: String,
    },
    /// An input that the signature requires was not sent.
    #[error("missing input `{name}`")]
    MissingInput {
        /// The signature's input name.
        name: String,
    },
    /// The same input name was sent more than once.
    #[error("input `{name}` is given more than once")]
    DuplicateInput {
        /// The repeated name.
        name: String,
    },
    /// The input's datatype is not the signature's.
    #[error("input `{name}` has datatype {got}, expected {expected}")]
    WrongDatatype {
        /// The input's name.
        name: String,
        /// The signature's datatype.
        expected: DataType,
        /// The datatype sent.
        got: DataType,
    },
    /// The input's shape does not match the signature (rank or a fixed dimension); `-1` in
    /// `expected` means any size.
    #[error("input `{name}` has shape {got:?}, expected {expected:?} (-1 = any size)")]
    WrongShape {
        /// The input's name.
        name: String,
        /// The signature's shape.
        expected: Vec<i64>,
        /// The shape sent.
        got: Vec<usize>,
    },
    /// A shape has a negative dimension.
    #[error("tensor `{name}` has a negative dimension in shape {shape:?}")]
    NegativeDimension {
        /// The tensor's name.
        name: String,
        /// The shape sent.
        shape: Vec<i64>,
    },
    /// The product of a shape's dimensions does not fit in memory addresses.
    #[error("tensor `{name}`: shape {shape:?} has too many elements")]
    ShapeOverflow {
        /// The tensor's name.
        name: String,
        /// The shape sent.
        shape: Vec<i64>,
    },
    /// The raw byte length of a fixed-size datatype does not match shape × element size.
    #[error("tensor `{name}`: raw contents have {got} bytes, shape and datatype need {expected}")]
    RawSize {
        /// The tensor's name.
        name: String,
        /// Bytes the shape and datatype need.
        expected: usize,
        /// Bytes sent.
        got: usize,
    },
    /// A BYTES element in raw contents is malformed: its 4-byte length prefix is cut off,
    /// or its length runs past the end of the buffer.
    #[error("tensor `{name}`: BYTES element {index} at byte offset {offset}: {reason}")]
    BadBytesElement {
        /// The tensor's name.
        name: String,
        /// The element's index in row-major order.
        index: usize,
        /// Where the element's length prefix starts in the raw buffer.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Raw BYTES contents go on after the last element that the shape allows.
    #[error("tensor `{name}`: {extra} bytes after the last of {elements} BYTES elements")]
    TrailingBytes {
        /// The tensor's name.
        name: String,
        /// Elements the shape holds.
        elements: usize,
        /// Bytes left over.
        extra: usize,
    },
    /// A BOOL element in raw contents is neither 0 nor 1.
    #[error("tensor `{name}`: BOOL element {index} is byte {value}, expected 0 or 1")]
    BadBool {
        /// The tensor's name.
        name: String,
        /// The element's index.
        index: usize,
        /// The byte found.
        value: u8,
    },
    /// A BYTES element is longer than the 4-byte length prefix of the raw layout can state.
    #[error("tensor `{name}`: BYTES element {index} has {len} bytes, more than 4 GiB - 1")]
    BytesElementTooLong {
        /// The tensor's name.
        name: String,
        /// The element's index.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// The number of elements does not match the shape.
    #[error("tensor `{name}` has {got} elements, shape {shape:?} holds {expected}")]
    ElementCount {
        /// The tensor's name.
        name: String,
        /// The shape given.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The batch dimension (`shape[0]`) is 0: a request must carry at least one row.
    #[error("input `{name}` has an empty batch dimension (shape[0] = 0)")]
    EmptyBatch {
        /// The input's name.
        name: String,
    },
    /// The batch dimension exceeds what one request may carry (`u32::MAX` rows).
    #[error("input `{name}` has {rows} rows, more than one request may carry")]
    BatchTooLarge {
        /// The input's name.
        name: String,
        /// Rows sent.
        rows: usize,
    },
    /// Inputs of one request disagree on the batch dimension.
    #[error("input `{name}` has {got} rows, but input `{first}` has {expected}")]
    InconsistentBatch {
        /// The disagreeing input.
        name: String,
        /// The first input, whose batch dimension the others must match.
        first: String,
        /// The first input's rows.
        expected: usize,
        /// This input's rows.
        got: usize,
    },
    /// A text element is not valid UTF-8, or the model's tokenizer cannot encode it.
    #[error("input `{name}` element {index} is not text the tokenizer takes: {reason}")]
    BadText {
        /// The input's name.
        name: String,
        /// The element's index in row-major order.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The model or device failed on input that passed [`crate::Model::prepare`]. Not the
/// client's fault; another device or an upstream worker may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// candle failed (device out of memory, a kernel error, a driver error).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
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
