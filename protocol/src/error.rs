//! The errors of decoding: what a peer sent that cannot be a request.

use crate::tensor::DataType;

/// Why bytes from the wire are not a valid request or response. The
/// client's fault (`INVALID_ARGUMENT`, HTTP 400) when a request is decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message is malformed: bad JSON, a missing field, a parameter of
    /// the wrong type, lengths that disagree.
    #[error("{0}")]
    Invalid(String),
    /// A tensor is malformed: its shape, datatype and contents disagree.
    #[error(transparent)]
    Input(#[from] InputError),
}

impl DecodeError {
    /// A malformed-message error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        DecodeError::Invalid(msg.into())
    }
}

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
    /// A text is longer than the model takes and its request turned truncation off: refused
    /// (HTTP 413) rather than cut silently.
    #[error(
        "input `{name}` element {index} has {tokens} tokens, more than the model's limit of \
         {limit} (truncation is off for this request)"
    )]
    TooLong {
        /// The input's name.
        name: String,
        /// The element's index (row).
        index: usize,
        /// Its tokens, special tokens included.
        tokens: usize,
        /// The model's limit (`max_seq_length`).
        limit: usize,
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
