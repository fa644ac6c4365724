//! `quiver-kernels`: Quiver's devices, its `Model` trait and the candle models behind it.
//!
//! In the data path of `DESIGN.md` this crate is the last hop before the hardware: the
//! gateway's front ends turn wire tensors into [`HostTensor`]s (with [`HostTensor::from_raw`]
//! for KServe v2 raw bytes), the router calls [`Model::prepare`] on the front end to validate
//! a request and learn its cost ([`Prepared::rows`], [`Prepared::tokens`]) for the scheduler,
//! and the device thread calls [`Model::forward`] on a whole batch.
//!
//! The crate knows nothing of queues, sockets, wire formats or the batcher, so each model
//! can be tested and benchmarked on its own. Its one workspace dependency is
//! `quiver-protocol`, for the host tensor types alone: the type a request's inputs have
//! from the decoder to the model is one type, not two with a copy between them.
//!
//! - [`tensor`]: datatypes, host tensors and their raw layout (re-exported from
//!   `quiver_protocol::tensor`).
//! - [`cpu`]: vectorised, multi-threaded CPU kernels (GELU, softmax, layer norm, attention).
//! - [`device`]: `cpu` / `cuda:N` and the mapping onto candle devices.
//! - [`model`]: the [`Model`] trait, signatures and input validation; no family named.
//! - [`loader`]: [`ModelSpec`] and [`load`], the one place that picks a family.
//! - [`identity`]: the echo model (serving overhead alone).
//! - [`mlp`]: dense layers from safetensors, and deterministic demo weights.
//! - [`pool`]: fused masked mean pooling + L2 normalisation (a custom CUDA kernel with a
//!   CPU reference).
//! - [`trees`]: gradient-boosted trees from XGBoost JSON and LightGBM text, on a flat
//!   CPU forest engine (scalar reference, AVX2 and AVX-512 walks).
//! - [`onnx`]: ONNX graphs (`model.onnx`) on ONNX Runtime (CPU, its library opened at run
//!   time) or candle-onnx (CUDA, and the CPU without ONNX Runtime), checked at load (a
//!   one-row run).
//! - [`text`]: BERT-family sentence embeddings (tokenizer on the front end, candle BERT).
//! - [`error`]: the crate's error enums, one per kind of fault.

#![warn(missing_docs)]

pub mod cpu;
pub mod device;
pub mod error;
pub mod identity;
pub mod loader;
pub mod mlp;
pub mod model;
pub mod onnx;
pub mod pool;
pub mod sim;
/// Host tensors live in `quiver-protocol`, where the wire codecs decode them.
pub use quiver_protocol::tensor;
pub mod text;
pub mod trees;

pub use cpu::Precision;
pub use device::Device;
pub use error::{DeviceError, InputError, LoadError, ModelError};
pub use identity::Identity;
pub use loader::{ModelSpec, load};
pub use mlp::{Activation, Mlp, MlpConfig, write_mlp};
pub use model::{Model, PrepareOptions, Prepared, Signature, TensorSpec, TruncationSide};
pub use onnx::{OnnxEngine, OnnxError, OnnxModel};
pub use tensor::{DataType, HostTensor, TensorData};
pub use text::{Engine, Pooling, TextEmbedding, TextToken};
pub use trees::{TreeError, TreeModel};
