//! `quiver-bench gen-weights`: random weights for a model whose tensor
//! names, dtypes and shapes are given, so a benchmark machine can run a
//! model of real dimensions without carrying its weights (`scripts/gpu-check`
//! carries a manifest of a few kilobytes instead of 90 MB of MiniLM).
//!
//! The manifest is a safetensors header as JSON (`{"name": {"dtype":
//! "F32", "shape": [..]}, ...}`; `scripts/gpu-check` cuts it from a real
//! file). F32 tensors get values of a BERT initialisation: layer-norm
//! weights 1, biases 0, the rest uniform with standard deviation 0.02
//! (seeded, ChaCha8). I64 tensors (`position_ids`) count 0, 1, 2, ...

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `quiver-bench gen-weights`.
#[derive(Debug, clap::Args)]
pub struct GenWeightsArgs {
    /// The manifest: a safetensors header as JSON.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The `model.safetensors` to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
}

/// Writes the weights of `args.manifest` to `args.out`.
pub fn gen_weights(args: &GenWeightsArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("reading {}", args.manifest.display()))?;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON object", args.manifest.display()))?;
    header.remove("__metadata__");
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    // sqrt(3) × 0.02: a uniform of standard deviation 0.02.
    let bound = 0.02f32 * 3f32.sqrt();
    let mut data: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, value) in header {
        let entry: Entry =
            serde_json::from_value(value).with_context(|| format!("tensor {name}"))?;
        let n: usize = entry.shape.iter().product();
        let (dtype, bytes) = match entry.dtype.as_str() {
            "F32" => {
                let v: Vec<f32> = if name.ends_with("LayerNorm.weight") {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                };
                (
                    safetensors::Dtype::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            }
            "I64" => (
                safetensors::Dtype::I64,
                (0..n as i64).flat_map(|i| i.to_le_bytes()).collect(),
            ),
            other => bail!("tensor {name}: dtype {other} is not generated (F32, I64)"),
        };
        data.insert(name, (dtype, entry.shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "gen-weights: {} tensors written to {}",
        data.len(),
        args.out.display()
    );
    Ok(())
}
