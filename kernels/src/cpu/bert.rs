//! A BERT encoder for the CPU device on Quiver's kernels: the same weights and the same
//! arithmetic as candle-transformers' `BertModel` (which the text-embedding model uses on
//! other devices), with the element-wise and attention glue replaced and every activation in
//! a few plain buffers that all layers reuse:
//!
//! | candle-transformers `BertModel` | here |
//! | --- | --- |
//! | query, key, value: three `Linear`s (matmul + single-threaded bias-add each) | one [`PackedLinear`] on the stacked weights, the bias as the accumulators' start |
//! | `transpose_for_scores` ×3, `matmul`, `/ √d`, `broadcast_add(mask)`, `softmax`, `matmul`, transpose back | [`super::attention_packed_slice`] |
//! | output dense bias-add + residual add + `LayerNorm` (3 passes) | [`PackedLinear`] whose tasks normalize each block of rows as they finish it (bias, residual and norm in one pass; [`super::add_layer_norm_slice`] after the product when a short batch splits rows by columns) |
//! | intermediate bias-add + `gelu_erf` | [`PackedLinear`] with the bias and GELU applied before the store |
//!
//! Each op of `BertModel` allocates its output tensor (about 50 per forward); here one
//! forward writes five buffers that the next forward reuses, and returns a sixth. The
//! weights of the linear layers are packed once at load for Quiver's matrix-product kernel
//! (see [`PackedLinear`]); every kernel runs on rayon's pool.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

use super::linear::AddNorm;
use super::linear_i8::BertLinear;
use super::{Activation, AttentionShape, Int8Isa, Isa, PackedLinear, Precision, QuantizedLinear};

/// A BERT encoder on the CPU kernels; returns the last hidden state, as
/// `candle_transformers::models::bert::BertModel::forward` does.
pub struct CpuBert {
    isa: Isa,
    precision: Precision,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    vocab: usize,
    types: usize,
    positions: usize,
    /// `[vocab, hidden]`.
    word: Vec<f32>,
    /// `[positions, hidden]`.
    position: Vec<f32>,
    /// `[types, hidden]`.
    token_type: Vec<f32>,
    ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    eps: f32,
    /// Activation buffers reused across forwards: a fresh multi-megabyte buffer per
    /// forward is paid again in page faults. A forward that finds it taken (two at once)
    /// allocates its own.
    scratch: std::sync::Mutex<Scratch>,
}

impl std::fmt::Debug for CpuBert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBert")
            .field("isa", &self.isa)
            .field("precision", &self.precision)
            .field("layers", &self.layers.len())
            .field("hidden", &self.hidden)
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

/// One encoder layer's weights, the linear layers packed for [`PackedLinear`] (or
/// quantized for [`QuantizedLinear`]).
struct Layer {
    /// Query, key and value stacked (`[3 × hidden, hidden]`), with their biases.
    qkv: BertLinear,
    /// The attention output's dense layer, without its bias (added by the layer norm).
    out: BertLinear,
    out_b: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>),
    /// The intermediate layer with its bias; GELU is applied as it is stored.
    inter: BertLinear,
    /// The output dense layer, without its bias (added by the layer norm).
    down: BertLinear,
    down_b: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
}

/// The activation buffers of one forward, kept for the next (see [`CpuBert::forward`]).
#[derive(Default)]
struct Scratch {
    sum: Vec<f32>,
    x1: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    inter: Vec<f32>,
}

impl Scratch {
    fn floats(&self) -> usize {
        self.sum.len() + self.x1.len() + self.qkv.len() + self.ctx.len() + self.inter.len()
    }
}

/// The most activation memory a [`CpuBert`] keeps between forwards (128 MiB of f32: batch
/// 64 × 128 tokens of MiniLM needs about 80); a larger forward's buffers are freed after it.
const SCRATCH_KEEP_FLOATS: usize = 32 << 20;

/// Rows per block of the feed-forward sub-layer: its `rows × intermediate` activation is
/// written by one product and read by the next, so it should stay in the caches.
const FFN_ROWS: usize = 1024;

/// `buf` grown to at least `len` (new elements zero; old contents are overwritten by the op
/// that writes it, so they are not cleared), as a slice of exactly `len`.
fn take(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl CpuBert {
    /// Whether [`CpuBert::load`] takes `config`: `hidden_act` `gelu` (the erf form, the only
    /// activation the kernels implement) and heads that divide the hidden size. A model
    /// outside this runs on candle-transformers' `BertModel` instead.
    #[must_use]
    pub fn supports(config: &Config) -> bool {
        let heads = config.num_attention_heads;
        config.hidden_act == HiddenAct::Gelu
            && heads != 0
            && config.hidden_size.is_multiple_of(heads)
    }

    /// Loads the weights `BertModel::load` would, from the same `VarBuilder` (tensor names
    /// at the root, under `bert.`, or under `<model_type>.`), on the widest instruction set
    /// this CPU has ([`Isa::detect`]).
    ///
    /// # Errors
    ///
    /// A missing or misshapen tensor; a configuration that [`CpuBert::supports`] refuses.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        Self::load_with_precision(vb, config, Precision::Fp32)
    }

    /// As [`CpuBert::load`], the linear layers at `precision`: [`Precision::Int8`] quantizes
    /// their weights ([`QuantizedLinear`], on [`Int8Isa::detect`]).
    ///
    /// # Errors
    ///
    /// As [`CpuBert::load`].
    pub fn load_with_precision(
        vb: VarBuilder,
        config: &Config,
        precision: Precision,
    ) -> Result<Self> {
        if config.hidden_act != HiddenAct::Gelu {
            candle_core::bail!(
                "CpuBert supports hidden_act gelu only, not {:?}",
                config.hidden_act
            );
        }
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || h % heads != 0 {
            candle_core::bail!("{heads} heads do not divide hidden size {h}");
        }
        let root = ["", "bert."]
            .into_iter()
            .map(str::to_owned)
            .chain(config.model_type.iter().map(|t| format!("{t}.")))
            .find(|p| vb.contains_tensor(&format!("{p}embeddings.word_embeddings.weight")))
            .unwrap_or_default();
        let tensor = |name: &str, shape: &[usize]| vb.get(shape, &format!("{root}{name}"));
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            tensor(name, shape)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        let ln = |p: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                get(&format!("{p}.LayerNorm.weight"), &[h])?,
                get(&format!("{p}.LayerNorm.bias"), &[h])?,
            ))
        };
        let i = config.intermediate_size;
        let isa = Isa::detect();
        let int8 = Int8Isa::detect();
        let linear = |w: &[f32], b: Option<&[f32]>, out: usize, inp: usize| -> Result<BertLinear> {
            Ok(match precision {
                Precision::Int8 => BertLinear::Int8(QuantizedLinear::new(int8, w, b, out, inp)?),
                _ => BertLinear::Fp32(PackedLinear::new(isa, w, b, out, inp)?),
            })
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                let a = format!("{p}.attention.self");
                let w = |n: &str| tensor(&format!("{a}.{n}.weight"), &[h, h]);
                let b = |n: &str| tensor(&format!("{a}.{n}.bias"), &[h]);
                let flat = |t: Tensor| -> Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
                };
                let qkv_w = flat(Tensor::cat(&[w("query")?, w("key")?, w("value")?], 0)?)?;
                let qkv_b = flat(Tensor::cat(&[b("query")?, b("key")?, b("value")?], 0)?)?;
                let out_w = get(&format!("{p}.attention.output.dense.weight"), &[h, h])?;
                let inter_w = get(&format!("{p}.intermediate.dense.weight"), &[i, h])?;
                let inter_b = get(&format!("{p}.intermediate.dense.bias"), &[i])?;
                let down_w = get(&format!("{p}.output.dense.weight"), &[h, i])?;
                Ok(Layer {
                    qkv: linear(&qkv_w, Some(&qkv_b), 3 * h, h)?,
                    out: linear(&out_w, None, h, h)?,
                    out_b: get(&format!("{p}.attention.output.dense.bias"), &[h])?,
                    ln1: ln(&format!("{p}.attention.output"))?,
                    inter: linear(&inter_w, Some(&inter_b), i, h)?,
                    down: linear(&down_w, None, h, i)?,
                    down_b: get(&format!("{p}.output.dense.bias"), &[h])?,
                    ln2: ln(&format!("{p}.output"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        #[allow(clippy::cast_possible_truncation)]
        let eps = config.layer_norm_eps as f32;
        Ok(CpuBert {
            isa,
            precision,
            hidden: h,
            intermediate: i,
            heads,
            vocab: config.vocab_size,
            types: config.type_vocab_size,
            positions: config.max_position_embeddings,
            word: get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            ln: ln("embeddings")?,
            layers,
            eps,
            scratch: std::sync::Mutex::default(),
        })
    }

    /// The arithmetic of its linear layers.
    #[must_use]
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The last hidden state `[batch, seq, hidden]` (f32, CPU) for `input_ids` and
    /// `token_type_ids` (`[batch, seq]`, u32) under `attention_mask` (`[batch, seq]`, 1 =
    /// token, 0 = padding, any dtype; `None` = all tokens), as `BertModel::forward`.
    ///
    /// # Errors
    ///
    /// Shapes that do not fit, ids out of range, a sequence longer than
    /// `max_position_embeddings`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        // Every kernel below splits its work over rayon's pool. Called from outside the pool
        // (the device thread, a request's own thread), each of those ~7 × layers parallel
        // steps would hand its work to the pool and put this thread to sleep until it is
        // done: a futex wake-up per step. Run the whole forward on a pool thread instead:
        // one hand-off per forward, and the steps split among workers that are already
        // awake.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward(input_ids, token_type_ids, attention_mask));
        }
        let (b, s) = input_ids.dims2()?;
        if token_type_ids.dims() != input_ids.dims() {
            candle_core::bail!(
                "token_type_ids {:?} do not match input_ids {:?}",
                token_type_ids.dims(),
                input_ids.dims()
            );
        }
        if s > self.positions {
            candle_core::bail!(
                "sequence of {s} tokens, max_position_embeddings is {}",
                self.positions
            );
        }
        let (h, n, isa) = (self.hidden, b * s, self.isa);
        let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
        let type_ids: Vec<u32> = token_type_ids.flatten_all()?.to_vec1()?;
        // BERT's extended mask: (1 - mask) × f32::MIN, one row of keys per sequence.
        let mask: Option<Vec<f32>> = match attention_mask {
            Some(m) => {
                let m = m.to_dtype(DType::F32)?.reshape((b, s))?;
                Some(
                    ((1.0 - m)? * f64::from(f32::MIN))?
                        .flatten_all()?
                        .to_vec1()?,
                )
            }
            None => None,
        };

        // Embeddings: word + token type + position, then layer norm into `x`.
        let mut sum = vec![0.0f32; n * h];
        for (t, row) in sum.chunks_exact_mut(h).enumerate() {
            let (id, ty) = (ids[t] as usize, type_ids[t] as usize);
            if id >= self.vocab || ty >= self.types {
                candle_core::bail!(
                    "token id {id} (vocabulary {}) or type id {ty} ({} types) out of range",
                    self.vocab,
                    self.types
                );
            }
            let word = &self.word[id * h..][..h];
            let ty = &self.token_type[ty * h..][..h];
            let pos = &self.position[(t % s) * h..][..h];
            for (((o, w), t), p) in row.iter_mut().zip(word).zip(ty).zip(pos) {
                *o = w + t + p;
            }
        }
        let mut x = vec![0.0f32; n * h];
        super::layer_norm_slice(isa, &sum, &self.ln.0, &self.ln.1, self.eps, &mut x)?;

        // Activations, reused by every layer: `sum` holds each sub-layer's product.
        let mut scratch = self
            .scratch
            .try_lock()
            .map(|mut kept| std::mem::take(&mut *kept))
            .unwrap_or_default();
        let block = n.min(FFN_ROWS);
        let Scratch {
            sum,
            x1,
            qkv,
            ctx,
            inter,
        } = &mut scratch;
        let (x1, qkv, ctx) = (take(x1, n * h), take(qkv, n * 3 * h), take(ctx, n * h));
        let (sum, inter) = (take(sum, n * h), take(inter, block * self.intermediate));
        let shape = AttentionShape {
            batch: b,
            heads: self.heads,
            q_len: s,
            kv_len: s,
            head_dim: h / self.heads,
        };
        for l in &self.layers {
            l.qkv.forward(&x, qkv, n, Activation::Identity)?;
            super::attention_packed_slice(isa, shape, qkv, mask.as_deref(), ctx)?;
            let norm = AddNorm {
                residual: &x,
                x_bias: &l.out_b,
                weight: &l.ln1.0,
                bias: &l.ln1.1,
                eps: self.eps,
            };
            l.out.forward_add_norm(isa, ctx, sum, n, norm, x1)?;
            // The feed-forward block by blocks of rows, so its widest activation (4 × hidden
            // per row) stays one block's worth.
            for ((x1, sum), x) in x1
                .chunks(block * h)
                .zip(sum.chunks_mut(block * h))
                .zip(x.chunks_mut(block * h))
            {
                let rows = x1.len() / h;
                let inter = &mut inter[..rows * self.intermediate];
                l.inter.forward(x1, inter, rows, Activation::Gelu)?;
                let norm = AddNorm {
                    residual: x1,
                    x_bias: &l.down_b,
                    weight: &l.ln2.0,
                    bias: &l.ln2.1,
                    eps: self.eps,
                };
                l.down.forward_add_norm(isa, inter, sum, rows, norm, x)?;
            }
        }
        if scratch.floats() <= SCRATCH_KEEP_FLOATS
            && let Ok(mut kept) = self.scratch.try_lock()
        {
            *kept = scratch;
        }
        Tensor::from_vec(x, (b, s, h), &candle_core::Device::Cpu)
    }
}
