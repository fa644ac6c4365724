//! The one place where a model family plugs in: [`ModelSpec`] names what to load and
//! [`load`] picks the family that loads it, as text-embeddings-inference's `backends/`
//! picks candle or ONNX Runtime.
//!
//! The [`Model`] trait and its signature types live apart, in [`crate::model`], and know no
//! family; each family's file implements the trait and knows nothing of the others. Adding
//! a family touches this file (a [`ModelSpec`] variant and one arm of [`load`]) and the
//! family's own file.

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::Device;
use crate::error::LoadError;
use crate::mlp::{Activation, Mlp};
use crate::model::Model;
use crate::onnx::OnnxEngine;

/// What to load; built by the gateway from its configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ModelSpec {
    /// The echo model: `OUTPUT0` = `INPUT0`.
    Identity,
    /// A dense MLP from a directory with `config.json` and `model.safetensors` (see
    /// [`crate::mlp`]).
    Mlp {
        /// The model directory.
        dir: PathBuf,
    },
    /// A BERT-family text-embedding model from a Hugging Face / sentence-transformers
    /// directory (see [`crate::text`]).
    TextEmbedding {
        /// The model directory.
        dir: PathBuf,
        /// On the CPU device, run the encoder on Quiver's CPU kernels
        /// ([`crate::text::Engine::CpuKernels`]) instead of candle-transformers' BERT.
        /// Ignored on CUDA devices. The config's `cpu_kernels` (default true).
        cpu_kernels: bool,
        /// The encoder's linear layers in f32, or dynamically quantized to int8
        /// ([`crate::cpu::QuantizedLinear`]). Int8 needs the CPU kernels: elsewhere it is a
        /// load error. The config's `precision` (default fp32).
        precision: crate::cpu::Precision,
    },
    /// A gradient-boosted tree ensemble: an XGBoost JSON or LightGBM text model file, or a
    /// directory holding one (see [`crate::trees`]). CPU only.
    Trees {
        /// The model file, or a directory with `model.json` or `model.txt`.
        path: PathBuf,
        /// Serve raw scores instead of probabilities. The config's `output_margin`
        /// (default false).
        output_margin: bool,
    },
    /// An ONNX graph: a `.onnx` file, or a directory holding `model.onnx` (see
    /// [`crate::onnx`]). Runs on ONNX Runtime on the CPU, on candle-onnx on CUDA devices.
    Onnx {
        /// The model file, or a directory with `model.onnx`.
        path: PathBuf,
        /// Which engine runs it. The config's `engine` (default `auto`).
        engine: OnnxEngine,
    },
    /// A demo MLP whose weights are drawn from `seed` (ChaCha8), so every start gives the
    /// same outputs. For trying the gateway without model files; it computes nothing useful.
    MlpDemo {
        /// Input features.
        inputs: usize,
        /// Hidden layer widths, in order; may be empty (one layer).
        hidden: Vec<usize>,
        /// Output features.
        outputs: usize,
        /// Activation between layers.
        activation: Activation,
        /// Seed of the weights.
        seed: u64,
    },
}

/// Loads a model on a device. Opens the device first, so a `cuda:N` device in a build
/// without the `cuda` feature is [`LoadError::Device`] for every model, `identity` included.
pub fn load(spec: &ModelSpec, device: &Device) -> Result<Arc<dyn Model>, LoadError> {
    let candle = device.to_candle()?;
    Ok(match spec {
        ModelSpec::Identity => Arc::new(crate::identity::Identity::new(device.clone())),
        ModelSpec::Mlp { dir } => Arc::new(Mlp::load_dir(dir, device.clone(), candle)?),
        ModelSpec::TextEmbedding {
            dir,
            cpu_kernels,
            precision,
        } => Arc::new(crate::text::TextEmbedding::load_dir_with_precision(
            dir,
            device.clone(),
            candle,
            *cpu_kernels,
            *precision,
        )?),
        ModelSpec::Trees {
            path,
            output_margin,
        } => Arc::new(crate::trees::TreeModel::load(
            path,
            *output_margin,
            device.clone(),
        )?),
        ModelSpec::Onnx { path, engine } => Arc::new(crate::onnx::OnnxModel::load(
            path,
            device.clone(),
            candle,
            *engine,
        )?),
        ModelSpec::MlpDemo {
            inputs,
            hidden,
            outputs,
            activation,
            seed,
        } => {
            let mut layers = Vec::with_capacity(hidden.len() + 2);
            layers.push(*inputs);
            layers.extend_from_slice(hidden);
            layers.push(*outputs);
            Arc::new(Mlp::demo(
                &layers,
                *activation,
                *seed,
                device.clone(),
                candle,
            )?)
        }
    })
}
