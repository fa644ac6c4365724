//! A BERT encoder for the CPU device on Quiver's kernels: the same weights and the same
//! arithmetic as candle-transformers' `BertModel` (which the text-embedding model uses),
//! with the element-wise and attention glue replaced:
//!
//! | candle-transformers `BertModel` | here |
//! | --- | --- |
//! | query, key, value: three `Linear`s (matmul + single-threaded bias-add each) | one matmul on the stacked weights + [`super::bias_add`] |
//! | `transpose_for_scores` ×3, `matmul`, `/ √d`, `broadcast_add(mask)`, `softmax`, `matmul`, transpose back | [`super::attention_packed`] |
//! | output dense bias-add + residual add + `LayerNorm` (3 passes) | matmul + [`super::add_layer_norm`] |
//! | intermediate bias-add + `gelu_erf` | matmul + [`super::bias_gelu`] |
//!
//! The matrix products stay candle's (gemm, on the same rayon pool).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

/// A BERT encoder on the CPU kernels; returns the last hidden state, as
/// `candle_transformers::models::bert::BertModel::forward` does.
pub struct CpuBert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln: (Tensor, Tensor),
    layers: Vec<Layer>,
    heads: usize,
    eps: f32,
}

impl std::fmt::Debug for CpuBert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBert")
            .field("layers", &self.layers.len())
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

/// One encoder layer's weights (`[out, in]` matrices, as stored).
struct Layer {
    qkv_w: Tensor,
    qkv_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln1: (Tensor, Tensor),
    inter_w: Tensor,
    inter_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    ln2: (Tensor, Tensor),
}

impl CpuBert {
    /// Loads the weights `BertModel::load` would, from the same `VarBuilder` (tensor names
    /// at the root, under `bert.`, or under `<model_type>.`).
    ///
    /// # Errors
    ///
    /// A missing or misshapen tensor; `hidden_act` other than `gelu` (the erf form, the
    /// only one the kernels implement); heads that do not divide the hidden size.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
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
        let get = |name: &str, shape: &[usize]| vb.get(shape, &format!("{root}{name}"));
        let ln = |p: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                get(&format!("{p}.LayerNorm.weight"), &[h])?,
                get(&format!("{p}.LayerNorm.bias"), &[h])?,
            ))
        };
        let i = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                let a = format!("{p}.attention.self");
                let w = |n: &str| get(&format!("{a}.{n}.weight"), &[h, h]);
                let b = |n: &str| get(&format!("{a}.{n}.bias"), &[h]);
                Ok(Layer {
                    qkv_w: Tensor::cat(&[w("query")?, w("key")?, w("value")?], 0)?,
                    qkv_b: Tensor::cat(&[b("query")?, b("key")?, b("value")?], 0)?,
                    out_w: get(&format!("{p}.attention.output.dense.weight"), &[h, h])?,
                    out_b: get(&format!("{p}.attention.output.dense.bias"), &[h])?,
                    ln1: ln(&format!("{p}.attention.output"))?,
                    inter_w: get(&format!("{p}.intermediate.dense.weight"), &[i, h])?,
                    inter_b: get(&format!("{p}.intermediate.dense.bias"), &[i])?,
                    down_w: get(&format!("{p}.output.dense.weight"), &[h, i])?,
                    down_b: get(&format!("{p}.output.dense.bias"), &[h])?,
                    ln2: ln(&format!("{p}.output"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        #[allow(clippy::cast_possible_truncation)]
        let eps = config.layer_norm_eps as f32;
        Ok(CpuBert {
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
            heads,
            eps,
        })
    }

    /// The last hidden state `[batch, seq, hidden]` for `input_ids` and `token_type_ids`
    /// (`[batch, seq]`, u32) under `attention_mask` (`[batch, seq]`, 1 = token, 0 = padding,
    /// any dtype; `None` = all tokens), as `BertModel::forward`.
    ///
    /// # Errors
    ///
    /// Shapes that do not fit, ids out of range, a sequence longer than
    /// `max_position_embeddings`, tensors off the CPU device.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let h = self.ln.0.elem_count();
        let n = b * s;
        let word = self.word.index_select(&input_ids.flatten_all()?, 0)?;
        let types = self
            .token_type
            .index_select(&token_type_ids.flatten_all()?, 0)?;
        let pos = self.position.narrow(0, 0, s)?;
        let sum = (word + types)?.reshape((b, s, h))?.broadcast_add(&pos)?;
        let mut x = super::layer_norm(&sum.reshape((n, h))?, &self.ln.0, &self.ln.1, self.eps)?;
        // BERT's extended mask: (1 - mask) × f32::MIN, one row of keys per sequence.
        let mask = match attention_mask {
            Some(m) => {
                Some(((1.0 - m.to_dtype(DType::F32)?.reshape((b, s))?)? * f64::from(f32::MIN))?)
            }
            None => None,
        };
        for l in &self.layers {
            let qkv = super::bias_add(&x.matmul(&l.qkv_w.t()?)?, &l.qkv_b)?;
            let ctx =
                super::attention_packed(&qkv.reshape((b, s, 3 * h))?, mask.as_ref(), self.heads)?;
            let attn = ctx.reshape((n, h))?.matmul(&l.out_w.t()?)?;
            let x1 = super::add_layer_norm(&attn, &x, &l.out_b, &l.ln1.0, &l.ln1.1, self.eps)?;
            let inter = super::bias_gelu(&x1.matmul(&l.inter_w.t()?)?, &l.inter_b)?;
            let down = inter.matmul(&l.down_w.t()?)?;
            x = super::add_layer_norm(&down, &x1, &l.down_b, &l.ln2.0, &l.ln2.1, self.eps)?;
        }
        x.reshape((b, s, h))
    }
}
