//! The `embedding` model: BERT-family sentence embeddings (e.g. all-MiniLM-L6-v2) on candle.
//!
//! This is the "text embeddings" family of `DESIGN.md` ("Models"). A request carries `text`
//! (BYTES, shape `[n]` or `[n, 1]`, UTF-8) and gets `embedding` (FP32, `[n, dim]`).
//!
//! The signature says `[-1, 1]`, one text per row, as Triton's BERT-style configurations do:
//! its model configuration then reports `dims: [1]` with the batch dimension implicit, which
//! is what Triton's clients (perf_analyzer above all) need to make a request. `[n]` is still
//! accepted, as KServe v2 clients that send a plain list of texts do.
//!
//! The work is split as the data path wants it:
//!
//! - [`Model::prepare`], on the front end, tokenizes every row (the `tokenizers` crate, from
//!   `tokenizer.json`) without padding; a row longer than `max_seq_length` is cut to it, or
//!   refused when the request turned truncation off ([`Model::prepare_with`],
//!   [`PrepareOptions`]); it returns the
//!   ids in [`Prepared::token_ids`] with `tokens` = the request's longest row, so the
//!   scheduler's token budget and length grouping see the request's real cost before it is
//!   queued;
//! - [`Model::forward`], on the device thread, pads the whole batch to its longest row, runs
//!   the BERT encoder once ([`Engine`]: Quiver's CPU kernels on the CPU device by default,
//!   candle-transformers' `BertModel` on CUDA or when `cpu_kernels` is off), pools each row under its attention mask ([`pool`]),
//!   L2-normalises when the model says so, and splits the rows back per request.
//!
//! Padding is masked out of attention and pooling, so a row's embedding does not depend on the
//! batch it runs in (the tests check this against the reference embeddings).
//!
//! A model directory (the sentence-transformers layout of the Hugging Face hub) holds
//!
//! - `config.json`: the BERT configuration (candle-transformers' `bert::Config`);
//! - `model.safetensors`: the weights, F32, with or without a `bert.` prefix;
//! - `tokenizer.json`: the tokenizer; its own padding and truncation settings are replaced
//!   (no padding in `prepare`, truncation at `max_seq_length`);
//! - `modules.json` (optional): the pipeline; a `sentence_transformers.models.Normalize`
//!   module turns on L2 normalisation, and the `Pooling` module's `path` locates the pooling
//!   configuration. Without the file: no normalisation, pooling from `1_Pooling/`;
//! - `1_Pooling/config.json` (optional): `pooling_mode_mean_tokens` or
//!   `pooling_mode_cls_token`, exactly one of the modes set. Without the file: mean pooling,
//!   as sentence-transformers does for a bare transformer;
//! - `sentence_bert_config.json` (optional): `max_seq_length`; without it
//!   [`DEFAULT_MAX_SEQ_LENGTH`] (256), the value sentence-transformers used for
//!   all-MiniLM-L6-v2's reference embeddings. Either way it is capped at the model's
//!   `max_position_embeddings`.

use std::path::{Path, PathBuf};

use candle_core::{DType, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::cpu::Precision;
use crate::device::Device;
use crate::error::{InputError, LoadError, ModelError};
use crate::model::{
    Model, PrepareOptions, Prepared, Signature, TensorSpec, TruncationSide, batch_rows,
};
use crate::tensor::{DataType, HostTensor, TensorData};

/// The input's name.
pub const INPUT: &str = "text";
/// The output's name.
pub const OUTPUT: &str = "embedding";
/// `max_seq_length` when `sentence_bert_config.json` is absent or does not state it.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// The BERT configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The sentence-transformers pipeline file.
pub const MODULES_FILE: &str = "modules.json";
/// The sentence-transformers file with `max_seq_length`.
pub const SENTENCE_CONFIG_FILE: &str = "sentence_bert_config.json";
/// The pooling directory when `modules.json` does not name one.
pub const DEFAULT_POOLING_DIR: &str = "1_Pooling";

/// How token vectors become one sentence vector (`1_Pooling/config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pooling {
    /// The mean of the token vectors under the attention mask (padding excluded).
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
}

/// Which BERT forward a [`TextEmbedding`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// candle-transformers' `BertModel`: every device; the only one on CUDA.
    Candle,
    /// [`crate::cpu::CpuBert`], on Quiver's vectorised, multi-threaded CPU kernels: the
    /// default on the CPU device (`ModelSpec::TextEmbedding::cpu_kernels`).
    CpuKernels,
}

/// The loaded encoder behind [`Engine`].
enum Encoder {
    Candle(BertModel),
    CpuKernels(crate::cpu::CpuBert),
}

/// The parts of `1_Pooling/config.json` that Quiver reads.
#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// One entry of `modules.json`.
#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// The parts of `sentence_bert_config.json` that Quiver reads.
#[derive(Debug, Deserialize)]
struct SentenceConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
}

/// A loaded text-embedding model: tokenizer, BERT weights on one candle device, pooling.
pub struct TextEmbedding {
    signature: Signature,
    device: Device,
    candle: candle_core::Device,
    /// Without truncation: the real length of every text, and `/tokenize`.
    tokenizer: Tokenizer,
    /// Truncating at `max_seq_length`, keeping the start / the end of a text. A text is
    /// encoded again by one of these only when it is too long, so a cut is exactly what the
    /// tokenizer's own truncation makes (special tokens kept).
    keep_start: Tokenizer,
    keep_end: Tokenizer,
    encoder: Encoder,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    pad_id: u32,
    dim: usize,
}

impl std::fmt::Debug for TextEmbedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokenizer and the weights are too large to print.
        f.debug_struct("TextEmbedding")
            .field("device", &self.device)
            .field("engine", &self.engine())
            .field("precision", &self.precision())
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_seq_length", &self.max_seq_length)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl TextEmbedding {
    /// Loads the model directory `dir` (see the module docs for its files) onto `candle`
    /// (the opened `device`). `cpu_kernels` picks [`Engine::CpuKernels`] when `candle` is
    /// the CPU and [`crate::cpu::CpuBert::supports`] the configuration; on any other
    /// device, or when it is false, the model runs [`Engine::Candle`].
    pub fn load_dir(
        dir: &Path,
        device: Device,
        candle: candle_core::Device,
        cpu_kernels: bool,
    ) -> Result<Self, LoadError> {
        Self::load_dir_with_precision(dir, device, candle, cpu_kernels, Precision::Fp32)
    }

    /// As [`TextEmbedding::load_dir`], the encoder's linear layers at `precision`.
    /// [`Precision::Int8`] (dynamic int8 quantization, see [`crate::cpu::QuantizedLinear`])
    /// exists on [`Engine::CpuKernels`] only: asked for where the model would run
    /// [`Engine::Candle`] (a CUDA device, `cpu_kernels` off, a configuration the kernels do
    /// not implement) it is [`LoadError::Spec`].
    pub fn load_dir_with_precision(
        dir: &Path,
        device: Device,
        candle: candle_core::Device,
        cpu_kernels: bool,
        precision: Precision,
    ) -> Result<Self, LoadError> {
        let config_path = dir.join(CONFIG_FILE);
        let config: BertConfig = parse_json(&config_path)?;
        if config.hidden_size == 0 {
            return Err(LoadError::Config {
                path: config_path,
                message: "hidden_size is 0".to_owned(),
            });
        }

        let (pooling_dir, normalize) = read_modules(dir)?;
        let pooling = read_pooling(&pooling_dir.join(CONFIG_FILE))?;
        let max_seq_length = read_max_seq_length(&dir.join(SENTENCE_CONFIG_FILE))?
            .min(config.max_position_embeddings);
        if max_seq_length < 2 {
            return Err(LoadError::Config {
                path: dir.join(SENTENCE_CONFIG_FILE),
                message: format!(
                    "max_seq_length {max_seq_length} leaves no room for a token between \
                     [CLS] and [SEP]"
                ),
            });
        }

        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| LoadError::Config {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        // `prepare` must not pad (forward pads the batch); it measures every text whole,
        // then cuts one that is too long at max_seq_length, special tokens included, as
        // sentence-transformers does, when its request allows it.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| LoadError::Config {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        let truncating = |direction| {
            let mut t = tokenizer.clone();
            t.with_truncation(Some(TruncationParams {
                direction,
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| LoadError::Config {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
            Ok::<_, LoadError>(t)
        };
        let keep_start = truncating(TruncationDirection::Right)?;
        let keep_end = truncating(TruncationDirection::Left)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|source| LoadError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let st_error = |e: candle_core::Error| LoadError::Safetensors {
            path: weights_path.clone(),
            message: e.to_string(),
        };
        let vb =
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, &candle).map_err(st_error)?;
        // One encoder only: each holds its own copy of the weights. A configuration the
        // kernels do not implement (another activation) keeps candle's BERT, which has it.
        let kernels = candle.is_cpu() && cpu_kernels && crate::cpu::CpuBert::supports(&config);
        if precision != Precision::Fp32 && !kernels {
            return Err(LoadError::Spec {
                message: format!(
                    "precision \"{}\" needs Quiver's CPU kernels (the cpu device, cpu_kernels \
                     on, hidden_act gelu); this model would run candle's BERT",
                    precision.name()
                ),
            });
        }
        let encoder = if kernels {
            Encoder::CpuKernels(
                crate::cpu::CpuBert::load_with_precision(vb, &config, precision)
                    .map_err(st_error)?,
            )
        } else {
            Encoder::Candle(BertModel::load(vb, &config).map_err(st_error)?)
        };

        let pad_id = u32::try_from(config.pad_token_id).map_err(|_| LoadError::Config {
            path: config_path,
            message: format!("pad_token_id {} does not fit u32", config.pad_token_id),
        })?;
        let dim = config.hidden_size;
        let signature = Signature {
            // `[-1, 1]`: see the module's documentation.
            inputs: vec![TensorSpec::new(INPUT, DataType::Bytes, vec![-1, 1])],
            outputs: vec![TensorSpec::new(
                OUTPUT,
                DataType::Fp32,
                vec![-1, i64::try_from(dim).unwrap_or(i64::MAX)],
            )],
        };
        Ok(TextEmbedding {
            signature,
            device,
            candle,
            tokenizer,
            keep_start,
            keep_end,
            encoder,
            pooling,
            normalize,
            max_seq_length,
            pad_id,
            dim,
        })
    }

    /// The BERT forward this model runs.
    pub fn engine(&self) -> Engine {
        match self.encoder {
            Encoder::Candle(_) => Engine::Candle,
            Encoder::CpuKernels(_) => Engine::CpuKernels,
        }
    }

    /// The arithmetic of the encoder's linear layers (always [`Precision::Fp32`] on
    /// [`Engine::Candle`]).
    pub fn precision(&self) -> Precision {
        match &self.encoder {
            Encoder::CpuKernels(bert) => bert.precision(),
            Encoder::Candle(_) => Precision::Fp32,
        }
    }

    /// The embedding width (`hidden_size`).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The longest row in tokens, special tokens included; longer texts are truncated.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings are L2-normalised.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Tokenizes `texts` as `prepare` does: one id sequence per text, unpadded, truncated at
    /// [`TextEmbedding::max_seq_length`] on the right. `[CLS]` and `[SEP]` count as tokens.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, InputError> {
        Ok(self.tokenize_with(texts, &PrepareOptions::default())?.0)
    }

    /// Tokenizes `texts` under `options`: one id sequence per text, unpadded, and how many
    /// were cut. A text longer than [`TextEmbedding::max_seq_length`] is cut at the side
    /// `options` names, or refused with [`InputError::TooLong`] when `options.truncate` is
    /// off.
    pub fn tokenize_with(
        &self,
        texts: &[&str],
        options: &PrepareOptions,
    ) -> Result<(Vec<Vec<u32>>, u32), InputError> {
        // One text after the other: this runs on a front-end thread, and the rayon pool
        // that a parallel batch encode would use is the one candle computes on.
        let mut truncated = 0u32;
        let bad = |index, e: tokenizers::Error| InputError::BadText {
            name: INPUT.to_owned(),
            index,
            reason: e.to_string(),
        };
        let ids = texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let whole = self
                    .tokenizer
                    .encode_fast(*text, true)
                    .map_err(|e| bad(index, e))?;
                let tokens = whole.get_ids().len();
                if tokens <= self.max_seq_length {
                    return Ok(whole.get_ids().to_vec());
                }
                if !options.truncate {
                    return Err(InputError::TooLong {
                        name: INPUT.to_owned(),
                        index,
                        tokens,
                        limit: self.max_seq_length,
                    });
                }
                truncated = truncated.saturating_add(1);
                let cutter = match options.side {
                    TruncationSide::Right => &self.keep_start,
                    TruncationSide::Left => &self.keep_end,
                };
                cutter
                    .encode_fast(*text, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| bad(index, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((ids, truncated))
    }

    /// The tokens of `text`, whole (never truncated), with their text and byte offsets:
    /// what text-embeddings-inference's `/tokenize` answers. A special token has no
    /// offsets; its text is the token itself.
    pub fn tokens_of(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TextToken>, InputError> {
        let e = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| InputError::BadText {
                name: INPUT.to_owned(),
                index: 0,
                reason: e.to_string(),
            })?;
        Ok(e.get_ids()
            .iter()
            .zip(e.get_tokens())
            .zip(e.get_special_tokens_mask())
            .zip(e.get_offsets())
            .map(|(((&id, token), &special), &(start, stop))| {
                let special = special == 1;
                match text.get(start..stop) {
                    Some(piece) if !special => TextToken {
                        id,
                        text: piece.to_owned(),
                        special,
                        offsets: Some((start, stop)),
                    },
                    _ => TextToken {
                        id,
                        text: token.clone(),
                        special,
                        offsets: None,
                    },
                }
            })
            .collect())
    }

    /// Runs BERT on padded ids `[rows, len]` and pools: `[rows, dim]`.
    fn embed(&self, rows: &[&[u32]]) -> candle_core::Result<Tensor> {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.pad_id, len - row.len()));
            mask.extend(std::iter::repeat_n(1.0f32, row.len()));
            mask.extend(std::iter::repeat_n(0.0f32, len - row.len()));
        }
        let shape = (rows.len(), len);
        let ids = Tensor::from_vec(ids, shape, &self.candle)?;
        let mask = Tensor::from_vec(mask, shape, &self.candle)?;
        let type_ids = ids.zeros_like()?;
        let hidden = match &self.encoder {
            Encoder::CpuKernels(bert) => bert.forward(&ids, &type_ids, Some(&mask))?,
            Encoder::Candle(bert) => bert.forward(&ids, &type_ids, Some(&mask))?,
        };
        pool(&hidden, &mask, self.pooling, self.normalize)
    }
}

/// One token of [`TextEmbedding::tokens_of`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextToken {
    /// Its id in the vocabulary.
    pub id: u32,
    /// The text it covers (a special token: the token itself).
    pub text: String,
    /// Whether it is a special token (`[CLS]`, `[SEP]`).
    pub special: bool,
    /// Its byte range in the text; `None` for a special token.
    pub offsets: Option<(usize, usize)>,
}

/// Pools BERT's last hidden state `hidden` `[rows, len, dim]` under `mask` `[rows, len]`
/// (F32, 1 for a token, 0 for padding) into `[rows, dim]`, then L2-normalises each row when
/// `normalize` is set (`x / max(‖x‖₂, 1e-12)`, PyTorch's `F.normalize`).
///
/// Mean pooling divides by the row's token count (at least 1e-9, as sentence-transformers
/// clamps it), so padding changes nothing. This is the one place where pooling happens;
/// mean pooling goes through [`crate::pool::mean_pool_l2`], CUDA's fused kernel on a GPU.
pub fn pool(
    hidden: &Tensor,
    mask: &Tensor,
    pooling: Pooling,
    normalize: bool,
) -> candle_core::Result<Tensor> {
    let pooled = match pooling {
        Pooling::Cls => hidden.i((.., 0))?.contiguous()?,
        // The fused mean-pool + L2 op: the CUDA kernel on a GPU, its reference on the CPU.
        Pooling::Mean => return crate::pool::mean_pool_l2(hidden, mask, normalize),
    };
    if !normalize {
        return Ok(pooled);
    }
    let norm = pooled
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    pooled.broadcast_div(&norm)
}

impl Model for TextEmbedding {
    fn kind(&self) -> &'static str {
        "embedding"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare(&self, inputs: Vec<HostTensor>) -> Result<Prepared, InputError> {
        self.prepare_with(inputs, &PrepareOptions::default())
    }

    fn as_text_embedding(&self) -> Option<&TextEmbedding> {
        Some(self)
    }

    fn prepare_with(
        &self,
        inputs: Vec<HostTensor>,
        options: &PrepareOptions,
    ) -> Result<Prepared, InputError> {
        let inputs = self.signature.match_inputs(inputs)?;
        // `[n]` as the signature says, or `[n, 1]` as many clients send a column of texts.
        for t in &inputs {
            if !matches!(t.shape.as_slice(), [_] | [_, 1]) {
                return Err(InputError::WrongShape {
                    name: t.name.clone(),
                    expected: vec![-1, 1],
                    got: t.shape.clone(),
                });
            }
        }
        let rows = batch_rows(&inputs, &self.signature)?;
        let Some(HostTensor {
            data: TensorData::Bytes(elements),
            ..
        }) = inputs.first()
        else {
            // `match_inputs` returned exactly the signature's one BYTES input.
            return Err(InputError::MissingInput {
                name: INPUT.to_owned(),
            });
        };
        let texts = elements
            .iter()
            .enumerate()
            .map(|(index, e)| {
                std::str::from_utf8(e).map_err(|err| InputError::BadText {
                    name: INPUT.to_owned(),
                    index,
                    reason: err.to_string(),
                })
            })
            .collect::<Result<Vec<&str>, _>>()?;
        let (token_ids, truncated) = self.tokenize_with(&texts, options)?;
        let longest = token_ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let tokens = u32::try_from(longest).unwrap_or(u32::MAX);
        Ok(Prepared {
            inputs,
            rows,
            tokens,
            token_ids,
            truncated,
        })
    }

    fn forward(&self, batch: &[Prepared]) -> Result<Vec<Vec<HostTensor>>, ModelError> {
        let mut rows: Vec<&[u32]> = Vec::new();
        for p in batch {
            if usize::try_from(p.rows).ok() != Some(p.token_ids.len()) {
                return Err(ModelError::BadBatch {
                    message: format!(
                        "a request has {} rows but {} token sequences",
                        p.rows,
                        p.token_ids.len()
                    ),
                });
            }
            for ids in &p.token_ids {
                if ids.is_empty() || ids.len() > self.max_seq_length {
                    return Err(ModelError::BadBatch {
                        message: format!(
                            "a token sequence of {} ids, expected 1 to {}",
                            ids.len(),
                            self.max_seq_length
                        ),
                    });
                }
                rows.push(ids);
            }
        }
        if rows.is_empty() {
            return Ok(batch
                .iter()
                .map(|_| vec![output_tensor(0, self.dim, Vec::new())])
                .collect());
        }
        let values: Vec<f32> = self
            .embed(&rows)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if values.len() != rows.len() * self.dim {
            return Err(ModelError::BadBatch {
                message: format!(
                    "forward gave {} values for {} rows of {}",
                    values.len(),
                    rows.len(),
                    self.dim
                ),
            });
        }
        let mut start = 0;
        Ok(batch
            .iter()
            .map(|p| {
                let n = p.token_ids.len();
                let end = start + n * self.dim;
                let out = values[start..end].to_vec();
                start = end;
                vec![output_tensor(n, self.dim, out)]
            })
            .collect())
    }
}

fn output_tensor(rows: usize, dim: usize, values: Vec<f32>) -> HostTensor {
    HostTensor {
        name: OUTPUT.to_owned(),
        shape: vec![rows, dim],
        data: TensorData::F32(values),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| LoadError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads a JSON file that may be absent: `Ok(None)` when it does not exist.
fn parse_optional_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, LoadError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => parse_json(path).map(Some),
    }
}

/// `modules.json`: the pooling directory and whether a Normalize module follows.
fn read_modules(dir: &Path) -> Result<(PathBuf, bool), LoadError> {
    let path = dir.join(MODULES_FILE);
    let Some(modules) = parse_optional_json::<Vec<ModuleEntry>>(&path)? else {
        return Ok((dir.join(DEFAULT_POOLING_DIR), false));
    };
    let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
    let pooling_dir = modules
        .iter()
        .find(|m| m.kind.ends_with(".Pooling") && !m.path.is_empty())
        .map(|m| m.path.as_str())
        .unwrap_or(DEFAULT_POOLING_DIR);
    let relative = Path::new(pooling_dir);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(LoadError::Config {
            path,
            message: format!("the Pooling module's path `{pooling_dir}` leaves the directory"),
        });
    }
    Ok((dir.join(relative), normalize))
}

/// The pooling configuration: exactly one supported mode, or mean pooling without a file.
fn read_pooling(path: &Path) -> Result<Pooling, LoadError> {
    let Some(config) = parse_optional_json::<PoolingConfig>(path)? else {
        return Ok(Pooling::Mean);
    };
    let unsupported = [
        ("pooling_mode_max_tokens", config.pooling_mode_max_tokens),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            config.pooling_mode_mean_sqrt_len_tokens,
        ),
        (
            "pooling_mode_weightedmean_tokens",
            config.pooling_mode_weightedmean_tokens,
        ),
        ("pooling_mode_lasttoken", config.pooling_mode_lasttoken),
    ];
    if let Some((mode, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(LoadError::Config {
            path: path.to_owned(),
            message: format!("{mode} is not supported (mean or CLS pooling only)"),
        });
    }
    match (
        config.pooling_mode_mean_tokens,
        config.pooling_mode_cls_token,
    ) {
        (true, false) => Ok(Pooling::Mean),
        (false, true) => Ok(Pooling::Cls),
        (true, true) => Err(LoadError::Config {
            path: path.to_owned(),
            message: "both mean and CLS pooling are set; exactly one is supported".to_owned(),
        }),
        (false, false) => Err(LoadError::Config {
            path: path.to_owned(),
            message: "no pooling mode is set".to_owned(),
        }),
    }
}

fn read_max_seq_length(path: &Path) -> Result<usize, LoadError> {
    Ok(parse_optional_json::<SentenceConfig>(path)?
        .and_then(|c| c.max_seq_length)
        .unwrap_or(DEFAULT_MAX_SEQ_LENGTH))
}
