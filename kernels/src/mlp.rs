//! The tabular `mlp` model: dense layers on candle, from safetensors.
//!
//! This is the "tabular MLP" family of `DESIGN.md` ("Models"): `INPUT0` FP32
//! `[-1, features]` in, `OUTPUT0` FP32 `[-1, outputs]` out. `forward` concatenates every
//! request's rows into one `[total_rows, features]` matrix, so a batch costs one matmul per
//! layer whatever its number of requests, and splits the result back by rows.
//!
//! A model directory holds
//!
//! - `config.json`: `{"layers": [in, h1, ..., out], "activation": "relu"}` (other keys are
//!   ignored);
//! - `model.safetensors`: for each layer `i`, `layers.{i}.weight` `[out_i, in_i]` and
//!   `layers.{i}.bias` `[out_i]`, F32, the layout of PyTorch's `nn.Linear`
//!   (`y = x Wᵀ + b`).
//!
//! The activation runs between layers, not after the last. [`write_mlp`] writes such a
//! directory with deterministic random weights, for tests and tools; the demo model
//! ([`crate::ModelSpec::MlpDemo`]) uses the same weights without files.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{InputError, LoadError, ModelError};
use crate::model::{Model, Prepared, Signature, TensorSpec};
use crate::tensor::{DataType, HostTensor, TensorData};

/// The input's name.
pub const INPUT: &str = "INPUT0";
/// The output's name.
pub const OUTPUT: &str = "OUTPUT0";
/// The configuration file in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The non-linearity between layers; lower-case names in `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// GELU with the exact erf form, `x/2 · (1 + erf(x/√2))`, as PyTorch's default
    /// `nn.GELU()`.
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// No activation: the layers compose linearly.
    None,
}

impl Activation {
    fn apply(self, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(&x),
            Activation::None => Ok(x),
        }
    }
}

/// The contents of `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Widths from input to output: `[in, h1, ..., out]`; at least two, each ≥ 1.
    pub layers: Vec<usize>,
    /// The activation between layers.
    pub activation: Activation,
}

impl MlpConfig {
    /// Checks that there are at least two widths, none 0, and that the parameter count fits
    /// a `usize`.
    pub fn check(&self) -> Result<(), String> {
        if self.layers.len() < 2 {
            return Err(format!(
                "`layers` needs at least the input and output widths, got {:?}",
                self.layers
            ));
        }
        if let Some(i) = self.layers.iter().position(|&w| w == 0) {
            return Err(format!("`layers[{i}]` is 0 in {:?}", self.layers));
        }
        let params = self.layers.windows(2).try_fold(0usize, |n, w| {
            w[0].checked_mul(w[1])
                .and_then(|p| p.checked_add(w[1]))
                .and_then(|p| n.checked_add(p))
        });
        if params.is_none() {
            return Err(format!("too many parameters in {:?}", self.layers));
        }
        Ok(())
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.layers.first().copied().unwrap_or(0)
    }

    /// Output features.
    pub fn outputs(&self) -> usize {
        self.layers.last().copied().unwrap_or(0)
    }
}

/// One dense layer's parameters in host memory, as `nn.Linear` stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    /// `[out, in]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
}

/// Deterministic weights for `layers` (`[in, h1, ..., out]`): for each layer in order, the
/// weight row by row and then the bias, each drawn uniformly from `±1/√fan_in` (PyTorch's
/// default initialisation) with `ChaCha8Rng::seed_from_u64(seed)`. The same seed gives the
/// same weights on every platform. `layers` must pass [`MlpConfig::check`].
pub fn random_weights(layers: &[usize], seed: u64) -> Vec<LayerWeights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    layers
        .windows(2)
        .map(|w| {
            let (fan_in, fan_out) = (w[0], w[1]);
            // Widths are ≥ 1 (checked), so the bound is finite and the range non-empty.
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = draw(fan_in * fan_out);
            let bias = draw(fan_out);
            LayerWeights { weight, bias }
        })
        .collect()
}

/// Writes a model directory (`config.json` and `model.safetensors`, see the module docs)
/// with the weights of [`random_weights`]; creates `dir` if needed. For tests and tools.
pub fn write_mlp(
    dir: &Path,
    layers: &[usize],
    activation: Activation,
    seed: u64,
) -> Result<(), LoadError> {
    let config = MlpConfig {
        layers: layers.to_vec(),
        activation,
    };
    config
        .check()
        .map_err(|message| LoadError::Spec { message })?;
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&config).map_err(|e| LoadError::Config {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&config_path, json).map_err(|source| LoadError::Io {
        path: config_path,
        source,
    })?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let st_error = |e: safetensors::SafeTensorError| LoadError::Safetensors {
        path: weights_path.clone(),
        message: e.to_string(),
    };
    let weights = random_weights(layers, seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * weights.len());
    for (i, (w, dims)) in weights.iter().zip(layers.windows(2)).enumerate() {
        tensors.push((weight_name(i), vec![dims[1], dims[0]], le_bytes(&w.weight)));
        tensors.push((bias_name(i), vec![dims[1]], le_bytes(&w.bias)));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(st_error)?;
    let bytes = safetensors::serialize(views, None).map_err(st_error)?;
    std::fs::write(&weights_path, bytes).map_err(|source| LoadError::Io {
        path: weights_path.clone(),
        source,
    })
}

/// The name of layer `i`'s weight tensor: `layers.{i}.weight`.
pub fn weight_name(i: usize) -> String {
    format!("layers.{i}.weight")
}

/// The name of layer `i`'s bias tensor: `layers.{i}.bias`.
pub fn bias_name(i: usize) -> String {
    format!("layers.{i}.bias")
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A loaded MLP: its layers on one candle device.
#[derive(Debug)]
pub struct Mlp {
    config: MlpConfig,
    signature: Signature,
    device: Device,
    candle: candle_core::Device,
    layers: Vec<Linear>,
    /// On the CPU, for a model of at most [`SMALL_PARAMS`] weights: the layers as host
    /// rows, for [`Mlp::run_here`].
    host: Option<Vec<LayerWeights>>,
}

/// Weights up to which a CPU MLP keeps a host copy of its layers for small batches.
pub const SMALL_PARAMS: usize = 1 << 20;

/// Multiply-adds up to which a batch runs on the calling thread ([`Mlp::run_here`]) rather
/// than through candle, whose matmul hands even a one-row batch to its thread pool: for a
/// tabular model that hand-off costs tens of microseconds, the arithmetic one or two.
pub const SMALL_BATCH_MACS: usize = 1 << 18;

impl Mlp {
    /// Loads `dir/config.json` and `dir/model.safetensors` onto `candle` (the opened
    /// `device`). Every tensor that the configuration implies must be present, F32 and of
    /// the implied shape; a `layers.*` tensor it does not imply is an error too (the two
    /// files disagree on the depth).
    pub fn load_dir(
        dir: &Path,
        device: Device,
        candle: candle_core::Device,
    ) -> Result<Self, LoadError> {
        let config_path = dir.join(CONFIG_FILE);
        let json = read(&config_path)?;
        let config: MlpConfig = serde_json::from_slice(&json).map_err(|e| LoadError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| LoadError::Config {
            path: config_path,
            message,
        })?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = read(&weights_path)?;
        let file =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LoadError::Safetensors {
                path: weights_path.clone(),
                message: e.to_string(),
            })?;
        let depth = config.layers.len() - 1;
        let expected: Vec<String> = (0..depth)
            .flat_map(|i| [weight_name(i), bias_name(i)])
            .collect();
        let mut names = file.names();
        names.sort_unstable();
        if let Some(extra) = names
            .into_iter()
            .find(|n| n.starts_with("layers.") && !expected.iter().any(|e| e == n))
        {
            return Err(LoadError::UnexpectedTensor {
                name: extra.to_owned(),
            });
        }
        let mut weights = Vec::with_capacity(depth);
        for (i, dims) in config.layers.windows(2).enumerate() {
            let weight = read_f32(&file, &weight_name(i), &[dims[1], dims[0]])?;
            let bias = read_f32(&file, &bias_name(i), &[dims[1]])?;
            weights.push(LayerWeights { weight, bias });
        }
        Mlp::from_weights(config, weights, device, candle)
    }

    /// The demo model: the weights of [`random_weights`] for `layers` and `seed`, no files.
    pub fn demo(
        layers: &[usize],
        activation: Activation,
        seed: u64,
        device: Device,
        candle: candle_core::Device,
    ) -> Result<Self, LoadError> {
        let config = MlpConfig {
            layers: layers.to_vec(),
            activation,
        };
        config
            .check()
            .map_err(|message| LoadError::Spec { message })?;
        let weights = random_weights(layers, seed);
        Mlp::from_weights(config, weights, device, candle)
    }

    /// Places host weights on the device. `weights[i]` must have the sizes that
    /// `config.layers[i..=i+1]` imply (else [`LoadError::Shape`]).
    pub fn from_weights(
        config: MlpConfig,
        weights: Vec<LayerWeights>,
        device: Device,
        candle: candle_core::Device,
    ) -> Result<Self, LoadError> {
        config
            .check()
            .map_err(|message| LoadError::Spec { message })?;
        if weights.len() + 1 != config.layers.len() {
            return Err(LoadError::Spec {
                message: format!(
                    "{} layers of weights for widths {:?}",
                    weights.len(),
                    config.layers
                ),
            });
        }
        let mut layers = Vec::with_capacity(weights.len());
        let params: usize = weights.iter().map(|w| w.weight.len()).sum();
        let keep_host = candle.is_cpu() && params <= SMALL_PARAMS;
        let mut host = Vec::new();
        for (i, (w, dims)) in weights
            .into_iter()
            .zip(config.layers.windows(2))
            .enumerate()
        {
            let (fan_in, fan_out) = (dims[0], dims[1]);
            if w.weight.len() != fan_in * fan_out {
                return Err(LoadError::Shape {
                    name: weight_name(i),
                    expected: vec![fan_out, fan_in],
                    got: vec![w.weight.len()],
                });
            }
            if w.bias.len() != fan_out {
                return Err(LoadError::Shape {
                    name: bias_name(i),
                    expected: vec![fan_out],
                    got: vec![w.bias.len()],
                });
            }
            if keep_host {
                host.push(w.clone());
            }
            let weight = Tensor::from_vec(w.weight, (fan_out, fan_in), &candle)?;
            let bias = Tensor::from_vec(w.bias, fan_out, &candle)?;
            layers.push(Linear::new(weight, Some(bias)));
        }
        let signature = Signature {
            inputs: vec![TensorSpec::new(
                INPUT,
                DataType::Fp32,
                vec![-1, width(config.inputs())],
            )],
            outputs: vec![TensorSpec::new(
                OUTPUT,
                DataType::Fp32,
                vec![-1, width(config.outputs())],
            )],
        };
        Ok(Mlp {
            config,
            signature,
            device,
            candle,
            layers,
            host: keep_host.then_some(host),
        })
    }

    /// The configuration: widths and activation.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// The layers on `rows` rows of `x`, on the calling thread, when the model keeps host
    /// weights and the batch is at most [`SMALL_BATCH_MACS`] multiply-adds; `None` otherwise.
    /// Same arithmetic as candle's (f32 products summed in f32, then bias, then the
    /// activation); the summation order differs, so results agree to rounding.
    pub fn run_here(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let host = self.host.as_ref()?;
        let macs: usize = host.iter().map(|w| w.weight.len()).sum::<usize>();
        if rows.checked_mul(macs)? > SMALL_BATCH_MACS {
            return None;
        }
        let last = host.len().saturating_sub(1);
        let mut cur = x.to_vec();
        for (i, layer) in host.iter().enumerate() {
            let out_w = layer.bias.len();
            let in_w = layer.weight.len() / out_w.max(1);
            let mut next = vec![0.0f32; rows * out_w];
            for (xr, yr) in cur.chunks_exact(in_w).zip(next.chunks_exact_mut(out_w)) {
                for ((y, w), b) in yr
                    .iter_mut()
                    .zip(layer.weight.chunks_exact(in_w))
                    .zip(&layer.bias)
                {
                    *y = dot(xr, w) + b;
                }
            }
            if i < last {
                self.activate_here(&mut next);
            }
            cur = next;
        }
        Some(cur)
    }

    fn activate_here(&self, x: &mut [f32]) {
        match self.config.activation {
            Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => {
                // The scalar kernel is always available, so this never fails.
                let isa = crate::cpu::Isa::detect();
                let _ = crate::cpu::gelu_in_place_here_slice(isa, x);
            }
            Activation::Tanh => x.iter_mut().for_each(|v| *v = v.tanh()),
            Activation::Sigmoid => x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            Activation::None => {}
        }
    }

    /// Runs the layers on `[rows, inputs]`.
    fn run(&self, x: Tensor) -> candle_core::Result<Tensor> {
        let last = self.layers.len().saturating_sub(1);
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = self.config.activation.apply(x)?;
            }
        }
        Ok(x)
    }
}

/// A width as a signature dimension; widths beyond `i64::MAX` cannot be allocated anyway.
fn width(w: usize) -> i64 {
    i64::try_from(w).unwrap_or(i64::MAX)
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Io {
        path: PathBuf::from(path),
        source,
    })
}

/// Reads an F32 tensor of exactly `shape` from a safetensors file.
fn read_f32(
    file: &safetensors::SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, LoadError> {
    let view = file.tensor(name).map_err(|_| LoadError::MissingTensor {
        name: name.to_owned(),
    })?;
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(LoadError::Dtype {
            name: name.to_owned(),
            expected: "F32".to_owned(),
            got: format!("{:?}", view.dtype()),
        });
    }
    if view.shape() != shape {
        return Err(LoadError::Shape {
            name: name.to_owned(),
            expected: shape.to_vec(),
            got: view.shape().to_vec(),
        });
    }
    // The parser checked that the data is exactly shape × 4 bytes; `chunks_exact(4)` yields
    // 4-byte chunks, so the fallback never runs.
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
        .collect())
}

impl Model for Mlp {
    fn kind(&self) -> &'static str {
        "mlp"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare(&self, inputs: Vec<HostTensor>) -> Result<Prepared, InputError> {
        let (inputs, rows) = self.signature.validate(inputs)?;
        Ok(Prepared::rows(inputs, rows))
    }

    fn forward(&self, batch: &[Prepared]) -> Result<Vec<Vec<HostTensor>>, ModelError> {
        let features = self.config.inputs();
        let outputs = self.config.outputs();
        // One pass to size the matrix, one to fill it: the batch is copied exactly once.
        let mut parts: Vec<(&[f32], usize)> = Vec::with_capacity(batch.len());
        for p in batch {
            let input = p.inputs.iter().find(|t| t.name == INPUT);
            let Some(HostTensor {
                shape,
                data: TensorData::F32(values),
                ..
            }) = input
            else {
                return Err(ModelError::BadBatch {
                    message: format!("a request has no FP32 `{INPUT}`"),
                });
            };
            match shape.as_slice() {
                &[rows, f] if f == features && rows.checked_mul(features) == Some(values.len()) => {
                    parts.push((values, rows));
                }
                other => {
                    return Err(ModelError::BadBatch {
                        message: format!(
                            "`{INPUT}` has shape {other:?} and {} values, expected [rows, {features}]",
                            values.len()
                        ),
                    });
                }
            }
        }
        let total_rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        if total_rows == 0 {
            return Ok(parts
                .iter()
                .map(|_| vec![output_tensor(0, outputs, Vec::new())])
                .collect());
        }
        let mut xs = Vec::with_capacity(total_rows * features);
        for (values, _) in &parts {
            xs.extend_from_slice(values);
        }
        let ys = match self.run_here(&xs, total_rows) {
            Some(ys) => ys,
            None => {
                let x = Tensor::from_vec(xs, (total_rows, features), &self.candle)?;
                let y = self.run(x)?.to_dtype(DType::F32)?.flatten_all()?;
                y.to_vec1()?
            }
        };
        if ys.len() != total_rows * outputs {
            return Err(ModelError::BadBatch {
                message: format!(
                    "forward gave {} values for {total_rows} rows of {outputs}",
                    ys.len()
                ),
            });
        }
        let mut start = 0;
        Ok(parts
            .iter()
            .map(|&(_, rows)| {
                let end = start + rows * outputs;
                let out = ys[start..end].to_vec();
                start = end;
                vec![output_tensor(rows, outputs, out)]
            })
            .collect())
    }
}

fn output_tensor(rows: usize, outputs: usize, values: Vec<f32>) -> HostTensor {
    HostTensor {
        name: OUTPUT.to_owned(),
        shape: vec![rows, outputs],
        data: TensorData::F32(values),
    }
}

/// `Σ a[i]·b[i]` in f32, eight partial sums (so the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(b.len() - b.len() % 8);
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
