//! The `trees` family: gradient-boosted tree ensembles as users already have them, for
//! fraud scoring and other tabular models (`DESIGN.md`, "Models").
//!
//! A model is one file, recognised from its content:
//!
//! - an XGBoost JSON model (`Booster.save_model("model.json")`, text starting with `{`),
//!   objectives `binary:logistic`, `reg:squarederror`, `multi:softprob`, `multi:softmax`
//!   ([`xgboost`]);
//! - a LightGBM text model (`Booster.save_model("model.txt")`, text starting with `tree`),
//!   objectives `binary`, `regression`, `multiclass` ([`lightgbm`]).
//!
//! `path` may also be a directory holding exactly one `model.json` or `model.txt` (a model
//! repository's version directory). Anything the parser does not evaluate exactly as the
//! library does (categorical splits, linear trees, vector leaves, DART, another objective) is
//! refused at load time with a [`TreeError::Unsupported`] that names it, never at the first
//! request.
//!
//! Signature: `INPUT0` FP32 `[-1, F]` (F from the model; NaN means missing and takes the
//! library's default direction); `OUTPUT0` FP32 `[-1]` (binary: the probability; regression:
//! the value) or `[-1, K]` (multiclass: the probabilities, also for `multi:softmax`, whose
//! `predict` gives the argmax of the same). With `output_margin` the raw scores instead
//! (XGBoost's `output_margin=True`, LightGBM's `raw_score=True`).
//!
//! The engine is [`Forest`] (flat node arrays, a scalar reference and AVX2 / AVX-512 walks
//! chosen at run time, rows split over rayon's pool from [`PARALLEL_ROWS`] rows); on a CUDA
//! device (the `cuda` feature), `cuda::CudaForest` and `kernels/cuda/trees.cu`. Sums and
//! transforms follow each library's arithmetic: XGBoost adds and transforms in f32, LightGBM
//! in f64; the output is f32.

use std::path::{Path, PathBuf};

use crate::cpu::Isa;
use crate::device::Device;
use crate::error::{InputError, LoadError, ModelError};
use crate::model::{Model, Prepared, Signature, TensorSpec};
use crate::tensor::{DataType, HostTensor, TensorData};

#[cfg(feature = "cuda")]
pub mod cuda;
mod forest;
mod keyed;
pub mod lightgbm;
mod simd;
pub mod xgboost;

pub use forest::{Accumulate, Forest, MAX_FEATURES, PARALLEL_ROWS};

/// The input's name.
pub const INPUT: &str = "INPUT0";
/// The output's name.
pub const OUTPUT: &str = "OUTPUT0";
/// The XGBoost file looked for when `path` is a directory.
pub const XGBOOST_FILE: &str = "model.json";
/// The LightGBM file looked for when `path` is a directory.
pub const LIGHTGBM_FILE: &str = "model.txt";

/// What is wrong with a tree model file. Always the operator's (the file or the library
/// feature it uses), found at load time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// The file is neither an XGBoost JSON nor a LightGBM text model.
    #[error("not a tree model: {what}")]
    Format {
        /// What was found instead.
        what: String,
    },
    /// The model uses something Quiver does not evaluate; names it.
    #[error("unsupported: {what}")]
    Unsupported {
        /// The feature, e.g. "categorical split on feature 2 (Tree=0)".
        what: String,
    },
    /// The file is of a known format but inconsistent or truncated.
    #[error("malformed: {what}")]
    Malformed {
        /// What is wrong, with where.
        what: String,
    },
}

/// The library the model came from, as recognised from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// XGBoost JSON.
    XGBoost,
    /// LightGBM text.
    LightGbm,
}

/// How raw scores become outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// Binary classification: `1 / (1 + exp(-scale · margin))` (LightGBM's `sigmoid:`
    /// parameter is `scale`; XGBoost's is 1).
    Logistic {
        /// The sigmoid's slope.
        scale: f64,
    },
    /// Regression (squared error): the score itself.
    Identity,
    /// Multiclass: softmax over the classes' scores.
    Softmax,
}

/// A loaded tree ensemble.
#[derive(Debug)]
pub struct TreeModel {
    forest: Forest,
    objective: Objective,
    library: Library,
    output_margin: bool,
    isa: Isa,
    signature: Signature,
    device: Device,
    /// On a CUDA device, the forest in its memory (copied once, at load).
    #[cfg(feature = "cuda")]
    gpu: Option<cuda::CudaForest>,
}

impl TreeModel {
    /// Loads `path` (a model file, or a directory with exactly one of [`XGBOOST_FILE`],
    /// [`LIGHTGBM_FILE`]). `output_margin`: serve raw scores instead of probabilities.
    /// On `cpu` (and `sim:N`) the CPU engine runs it; on `cuda:N` (with the `cuda` feature)
    /// the forest is copied to the GPU here, once, and `forward` runs the CUDA kernel.
    pub fn load(path: &Path, output_margin: bool, device: Device) -> Result<Self, LoadError> {
        let candle = device.to_candle()?;
        let file = model_file(path)?;
        let bytes = std::fs::read(&file).map_err(|source| LoadError::Io {
            path: file.clone(),
            source,
        })?;
        #[allow(unused_mut)]
        let mut model = TreeModel::from_bytes(&bytes, output_margin, device)
            .map_err(|source| LoadError::Trees { path: file, source })?;
        #[cfg(feature = "cuda")]
        if candle.is_cuda() {
            model.gpu = Some(cuda::CudaForest::upload(&model.forest, &candle)?);
        }
        let _ = candle;
        Ok(model)
    }

    /// Parses a model from its file's bytes (format recognised from the content).
    pub fn from_bytes(
        bytes: &[u8],
        output_margin: bool,
        device: Device,
    ) -> Result<Self, TreeError> {
        let (library, (forest, objective)) = parse(bytes)?;
        let isa = fastest_isa(&forest);
        let features = i64::try_from(forest.features()).unwrap_or(i64::MAX);
        let groups = forest.groups();
        let output_shape = if groups == 1 {
            vec![-1]
        } else {
            vec![-1, i64::try_from(groups).unwrap_or(i64::MAX)]
        };
        Ok(TreeModel {
            signature: Signature {
                inputs: vec![TensorSpec::new(INPUT, DataType::Fp32, vec![-1, features])],
                outputs: vec![TensorSpec::new(OUTPUT, DataType::Fp32, output_shape)],
            },
            forest,
            objective,
            library,
            output_margin,
            isa,
            device,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// The flat forest.
    pub fn forest(&self) -> &Forest {
        &self.forest
    }

    /// The objective read from the file.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// The instruction set `forward` walks the forest with on the CPU: the fastest here,
    /// timed at load.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The library the file came from.
    pub fn library(&self) -> Library {
        self.library
    }

    /// Whether outputs are raw scores.
    pub fn output_margin(&self) -> bool {
        self.output_margin
    }

    /// Runs `x` (`[rows, features]`) on `isa` and returns the outputs, `[rows]` or
    /// `[rows, classes]` row-major, probabilities or (with `output_margin`) raw scores.
    /// For tests and benchmarks, which force each instruction set; `forward` uses the
    /// widest this CPU has. Errors when `x` is not a whole number of rows.
    pub fn predict(&self, isa: Isa, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let features = self.forest.features();
        if !x.len().is_multiple_of(features) {
            return Err(ModelError::BadBatch {
                message: format!("{} values are not rows of {features} features", x.len()),
            });
        }
        let rows = x.len() / features;
        let mut margins = vec![0.0f64; rows * self.forest.groups()];
        self.forest.margins(isa, x, &mut margins);
        Ok(self.transform(&margins))
    }

    /// What `forward` computes for one request: on the GPU where the forest is there, else on
    /// the CPU's widest instruction set.
    fn run(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return Ok(self.transform(&gpu.margins(x)?));
        }
        self.predict(self.isa, x)
    }

    /// Margins to outputs, in the library's precision.
    fn transform(&self, margins: &[f64]) -> Vec<f32> {
        let f32_math = self.forest.accumulate() == Accumulate::F32;
        if self.output_margin {
            return margins.iter().map(|&m| m as f32).collect();
        }
        match self.objective {
            Objective::Identity => margins.iter().map(|&m| m as f32).collect(),
            Objective::Logistic { scale } => margins
                .iter()
                .map(|&m| {
                    if f32_math {
                        1.0 / (1.0 + (-(m as f32)).exp())
                    } else {
                        (1.0 / (1.0 + (-scale * m).exp())) as f32
                    }
                })
                .collect(),
            Objective::Softmax => {
                let k = self.forest.groups();
                let mut out = Vec::with_capacity(margins.len());
                for row in margins.chunks_exact(k) {
                    if f32_math {
                        let max = row.iter().map(|&m| m as f32).fold(f32::MIN, f32::max);
                        let start = out.len();
                        let mut sum = 0.0f32;
                        for &m in row {
                            let e = (m as f32 - max).exp();
                            sum += e;
                            out.push(e);
                        }
                        out[start..].iter_mut().for_each(|e| *e /= sum);
                    } else {
                        let max = row.iter().copied().fold(f64::MIN, f64::max);
                        let sum: f64 = row.iter().map(|&m| (m - max).exp()).sum();
                        out.extend(row.iter().map(|&m| ((m - max).exp() / sum) as f32));
                    }
                }
                out
            }
        }
    }
}

/// The instruction set that walks this forest fastest here, timed on 64 rows at load. All
/// give bit-identical results, so the choice is speed alone, and the widest is not always
/// the fastest: on the AMD EPYC of the development machines AVX-512 gathers ran 15-20%
/// slower than AVX2's (`trees_latency`).
fn fastest_isa(forest: &Forest) -> Isa {
    use rand::{Rng, SeedableRng};
    let available = Isa::available();
    if available.len() < 2 {
        return Isa::detect();
    }
    let rows = 64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f32> = (0..rows * forest.features())
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let mut out = vec![0.0; rows * forest.groups()];
    let candidates: Vec<Isa> = available
        .into_iter()
        .filter(|&isa| isa != Isa::Scalar)
        .collect();
    // A first, untimed pass brings the forest into the caches; then rounds in turn, so a
    // burst of load elsewhere does not fall on one instruction set alone.
    forest.margins_here(candidates[0], &x, &mut out);
    let mut best = vec![std::time::Duration::MAX; candidates.len()];
    for _ in 0..3 {
        for (isa, best) in candidates.iter().zip(&mut best) {
            let start = std::time::Instant::now();
            forest.margins_here(*isa, &x, &mut out);
            *best = (*best).min(start.elapsed());
        }
    }
    candidates
        .iter()
        .zip(&best)
        .min_by_key(|(_, took)| **took)
        .map_or(Isa::detect(), |(isa, _)| *isa)
}

/// Recognises the format from the first non-blank bytes and parses.
fn parse(bytes: &[u8]) -> Result<(Library, (Forest, Objective)), TreeError> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let head = &bytes[start..];
    if head.starts_with(b"{") {
        return Ok((Library::XGBoost, xgboost::parse(head)?));
    }
    if head.starts_with(b"tree") {
        let text = std::str::from_utf8(head).map_err(|e| TreeError::Malformed {
            what: format!("LightGBM text is not UTF-8: {e}"),
        })?;
        return Ok((Library::LightGbm, lightgbm::parse(text)?));
    }
    let shown: String = head
        .iter()
        .take(16)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    Err(TreeError::Format {
        what: format!(
            "starts with `{shown}`; expected an XGBoost JSON model (`{{`, from \
             save_model(\"model.json\"); UBJSON is not read) or a LightGBM text model (`tree`)"
        ),
    })
}

/// `path` itself, or the one model file in the directory `path`.
fn model_file(path: &Path) -> Result<PathBuf, LoadError> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    let found: Vec<PathBuf> = [XGBOOST_FILE, LIGHTGBM_FILE]
        .iter()
        .map(|name| path.join(name))
        .filter(|p| p.is_file())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LoadError::Config {
            path: path.to_owned(),
            message: format!("a trees model directory needs {XGBOOST_FILE} or {LIGHTGBM_FILE}"),
        }),
        _ => Err(LoadError::Config {
            path: path.to_owned(),
            message: format!("both {XGBOOST_FILE} and {LIGHTGBM_FILE}: keep one"),
        }),
    }
}

impl Model for TreeModel {
    fn kind(&self) -> &'static str {
        "trees"
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
        let features = self.forest.features();
        let groups = self.forest.groups();
        batch
            .iter()
            .map(|p| {
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
                let rows = match shape.as_slice() {
                    &[rows, f] if f == features && rows.checked_mul(f) == Some(values.len()) => {
                        rows
                    }
                    other => {
                        return Err(ModelError::BadBatch {
                            message: format!(
                                "`{INPUT}` has shape {other:?} and {} values, expected \
                                 [rows, {features}]",
                                values.len()
                            ),
                        });
                    }
                };
                let out = self.run(values)?;
                let shape = if groups == 1 {
                    vec![rows]
                } else {
                    vec![rows, groups]
                };
                Ok(vec![HostTensor {
                    name: OUTPUT.to_owned(),
                    shape,
                    data: TensorData::F32(out),
                }])
            })
            .collect()
    }
}
