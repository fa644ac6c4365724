//! The [`Model`] trait the gateway drives and the [`Signature`] it reports.
//!
//! This module names no family: each family (`identity`, `mlp`, `text`, …) implements
//! [`Model`] in its own file, and [`crate::loader`] alone picks one by its spec. A new family
//! therefore touches the loader and its own file, nothing here.
//!
//! A request meets a model twice (see `DESIGN.md`, "The data path"):
//!
//! 1. on the front end, [`Model::prepare`] validates its inputs against the signature and
//!    returns a [`Prepared`] with its cost (rows, tokens per row), which the scheduler uses for
//!    admission and batch budgets; invalid input never reaches the queue;
//! 2. on the device thread, [`Model::forward`] runs a whole batch of prepared requests and
//!    splits the outputs back per request.
//!
//! The validation rules shared by all models live here ([`Signature::match_inputs`],
//! [`Signature::check_shapes`], [`batch_rows`]), so each model states only what differs.

use crate::device::Device;
use crate::error::{InputError, ModelError};
use crate::tensor::{DataType, HostTensor};

/// One input or output of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// The tensor's name, e.g. `INPUT0`.
    pub name: String,
    /// Its element type.
    pub datatype: DataType,
    /// Its dimensions; `-1` means any size. `shape[0]` is the batch dimension (`-1`).
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// A spec with these fields.
    pub fn new(name: impl Into<String>, datatype: DataType, shape: Vec<i64>) -> Self {
        TensorSpec {
            name: name.into(),
            datatype,
            shape,
        }
    }

    /// Whether `shape` has this spec's rank and matches each fixed (non-`-1`) dimension.
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want < 0 || usize::try_from(want).is_ok_and(|w| w == got))
    }
}

/// A model's inputs and outputs, as reported by the metadata endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signature {
    /// The inputs, each required.
    pub inputs: Vec<TensorSpec>,
    /// The outputs, in the order `forward` returns them.
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    /// Checks names and datatypes: no duplicate, no unknown and no missing input, each of the
    /// signature's datatype. Returns the inputs reordered as in the signature.
    ///
    /// Errors are reported in that order (duplicate, unknown, missing, datatype), each for
    /// the first offending tensor.
    pub fn match_inputs(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, InputError> {
        // Already in order, as a client that read the metadata sends them:
        // taken as they are. The signature's names are distinct, so no
        // input is a duplicate.
        if inputs.len() == self.inputs.len()
            && inputs
                .iter()
                .zip(&self.inputs)
                .all(|(t, s)| t.name == s.name && t.datatype() == s.datatype)
        {
            return Ok(inputs);
        }
        for (i, t) in inputs.iter().enumerate() {
            if inputs[..i].iter().any(|u| u.name == t.name) {
                return Err(InputError::DuplicateInput {
                    name: t.name.clone(),
                });
            }
            if !self.inputs.iter().any(|s| s.name == t.name) {
                return Err(InputError::UnknownInput {
                    name: t.name.clone(),
                });
            }
        }
        let mut slots: Vec<Option<HostTensor>> = inputs.into_iter().map(Some).collect();
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let found = slots
                .iter_mut()
                .find(|t| t.as_ref().is_some_and(|t| t.name == spec.name))
                .and_then(Option::take);
            let Some(t) = found else {
                return Err(InputError::MissingInput {
                    name: spec.name.clone(),
                });
            };
            if t.datatype() != spec.datatype {
                return Err(InputError::WrongDatatype {
                    got: t.datatype(),
                    name: t.name,
                    expected: spec.datatype,
                });
            }
            ordered.push(t);
        }
        Ok(ordered)
    }

    /// Checks each input's rank and fixed dimensions against its spec; `inputs` is in
    /// signature order, as [`Signature::match_inputs`] returns it.
    pub fn check_shapes(&self, inputs: &[HostTensor]) -> Result<(), InputError> {
        for (spec, t) in self.inputs.iter().zip(inputs) {
            if !spec.accepts_shape(&t.shape) {
                return Err(InputError::WrongShape {
                    name: t.name.clone(),
                    expected: spec.shape.clone(),
                    got: t.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// Names, datatypes, shapes and batch dimension together: the whole check for a model
    /// with fixed-rank inputs. Returns the inputs in signature order and the rows.
    pub fn validate(&self, inputs: Vec<HostTensor>) -> Result<(Vec<HostTensor>, u32), InputError> {
        let inputs = self.match_inputs(inputs)?;
        self.check_shapes(&inputs)?;
        let rows = batch_rows(&inputs, self)?;
        Ok((inputs, rows))
    }
}

/// The batch dimension shared by `inputs`: each must have rank ≥ 1 (else
/// [`InputError::WrongShape`] against its spec in `signature`), `shape[0]` ≥ 1 and at most
/// `u32::MAX`, and the same `shape[0]` as the first input.
pub fn batch_rows(inputs: &[HostTensor], signature: &Signature) -> Result<u32, InputError> {
    let mut first: Option<(&str, usize)> = None;
    for t in inputs {
        let Some(&rows) = t.shape.first() else {
            let expected = signature
                .inputs
                .iter()
                .find(|s| s.name == t.name)
                .map(|s| s.shape.clone())
                .unwrap_or_else(|| vec![-1]);
            return Err(InputError::WrongShape {
                name: t.name.clone(),
                expected,
                got: t.shape.clone(),
            });
        };
        if rows == 0 {
            return Err(InputError::EmptyBatch {
                name: t.name.clone(),
            });
        }
        match first {
            None => first = Some((&t.name, rows)),
            Some((first_name, expected)) if expected != rows => {
                return Err(InputError::InconsistentBatch {
                    name: t.name.clone(),
                    first: first_name.to_owned(),
                    expected,
                    got: rows,
                });
            }
            Some(_) => {}
        }
    }
    let (name, rows) = first.unwrap_or(("", 0));
    u32::try_from(rows).map_err(|_| InputError::BatchTooLarge {
        name: name.to_owned(),
        rows,
    })
}

/// One request's inputs after validation, with its cost for the scheduler. Made on the front
/// end by [`Model::prepare`] (not on the device thread).
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The inputs, in the order of the signature.
    pub inputs: Vec<HostTensor>,
    /// The request's batch dimension: `shape[0]` of its inputs, ≥ 1.
    pub rows: u32,
    /// Sequence length per row: 1 for tabular models and `identity`; for text models the
    /// longest row's token count (special tokens included, after truncation), so that
    /// `rows × tokens` is what the request costs once padded.
    pub tokens: u32,
    /// Text models: each row's token ids, unpadded, as the tokenizer made them on the front
    /// end (see [`crate::text`]); `forward` pads the batch from them. Empty for models without
    /// a tokenizer.
    pub token_ids: Vec<Vec<u32>>,
    /// Text models: how many rows were cut to the model's token limit (see
    /// [`PrepareOptions::truncate`]). 0 for other models.
    pub truncated: u32,
}

impl Prepared {
    /// A request of `rows` rows without tokens: what a tabular model (and
    /// `identity`) prepares.
    pub fn rows(inputs: Vec<HostTensor>, rows: u32) -> Self {
        Prepared {
            inputs,
            rows,
            tokens: 1,
            token_ids: Vec::new(),
            truncated: 0,
        }
    }
}

/// Which end of a text truncation cuts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TruncationSide {
    /// Keep the start of the text (sentence-transformers' behaviour).
    #[default]
    Right,
    /// Keep the end of the text.
    Left,
}

/// What a request asks of [`Model::prepare_with`] beyond its tensors. Only text models read
/// it; the others ignore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Cut a text longer than the model's limit (`true`), or refuse the request with
    /// [`InputError::TooLong`] (`false`).
    pub truncate: bool,
    /// Which end a truncation cuts.
    pub side: TruncationSide,
}

impl Default for PrepareOptions {
    /// Truncate on the right, what [`Model::prepare`] does.
    fn default() -> Self {
        PrepareOptions {
            truncate: true,
            side: TruncationSide::Right,
        }
    }
}

/// A loaded model, shared between the front ends (`prepare`) and its device thread
/// (`forward`).
pub trait Model: Send + Sync + std::fmt::Debug {
    /// The model family: `"identity"`, `"mlp"`, `"embedding"`, `"trees"`, `"onnx"`.
    fn kind(&self) -> &'static str;

    /// The inputs and outputs, for the metadata endpoints and validation.
    fn signature(&self) -> &Signature;

    /// The device the model's weights live on.
    fn device(&self) -> &Device;

    /// Validates one request's inputs against the signature (names, missing/unknown inputs,
    /// datatype, rank, fixed dims, batch dim ≥ 1 and consistent across inputs) and returns
    /// them with their cost. Cheap and device-free: it runs on the front end. Every
    /// [`Prepared`] it returns is one that [`Model::forward`] accepts.
    fn prepare(&self, inputs: Vec<HostTensor>) -> Result<Prepared, InputError>;

    /// [`Model::prepare`] with the request's options (truncation, for text models). Models
    /// without a tokenizer ignore them: the default calls `prepare`.
    fn prepare_with(
        &self,
        inputs: Vec<HostTensor>,
        options: &PrepareOptions,
    ) -> Result<Prepared, InputError> {
        let _ = options;
        self.prepare(inputs)
    }

    /// The text-embedding model behind this one, for the routes that need its tokenizer
    /// and limits (`/tokenize`, `/info`, the OpenAI and TEI embedding routes). `None` for
    /// every other family.
    fn as_text_embedding(&self) -> Option<&crate::text::TextEmbedding> {
        None
    }

    /// Computes a batch of prepared requests; returns one output set per request, in order
    /// (named as the signature's outputs, each with shape `[rows_i, ...]`). Requests are
    /// concatenated along dim 0 where the model can, and split back. A [`Prepared`] not made
    /// by this model's `prepare` is [`ModelError::BadBatch`], not a panic.
    fn forward(&self, batch: &[Prepared]) -> Result<Vec<Vec<HostTensor>>, ModelError>;
}
