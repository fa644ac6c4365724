//! Raw engine throughput of the `embedding` model (all-MiniLM-L6-v2) on the CPU, in
//! sentences per second: `Model::forward` on one batch of `batch` texts of exactly `tokens`
//! tokens (`[CLS]` and `[SEP]` counted), for batch 1, 8, 32, 64 and 16- and 128-token inputs.
//! Tokenization (`Model::prepare`, on the front end in the gateway) is outside the timed
//! loop; the gateway's overhead is measured by the load generator, not here.
//!
//! Both engines of the CPU device: `kernels` (Quiver's CPU kernels, the default) and
//! `candle` (stock candle-transformers BERT, `cpu_kernels = false`), as
//! `embedding_cpu/{kernels,candle}/{tokens}_tokens/batch/{batch}`.
//!
//! Needs the model: `scripts/fetch-models`, or `QUIVER_MODELS_DIR`. Run with
//! `cargo bench -p quiver-bench --bench embedding` (add `-- kernels` for one engine);
//! `QUIVER_BENCH_QUICK=1` takes fewer samples. Thread count: rayon's (`RAYON_NUM_THREADS`,
//! default all cores). `scripts/bench-vs-pytorch` measures the same cells against PyTorch.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use quiver_kernels::{Device, HostTensor, Model, ModelSpec, Prepared, TensorData, load};

const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const BATCHES: [usize; 4] = [1, 8, 32, 64];
const TOKENS: [usize; 2] = [16, 128];
/// Words that BERT's uncased vocabulary holds as single tokens.
const WORDS: [&str; 12] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river", "bank",
];

fn model_dir() -> PathBuf {
    let dir = match std::env::var_os("QUIVER_MODELS_DIR") {
        Some(root) => {
            let root = PathBuf::from(root);
            let nested = root.join(MODEL_NAME);
            if nested.join("config.json").is_file() {
                nested
            } else {
                root
            }
        }
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(MODEL_NAME),
    };
    assert!(
        dir.join("model.safetensors").is_file(),
        "{MODEL_NAME} is not in {}: run scripts/fetch-models (or set QUIVER_MODELS_DIR)",
        dir.display()
    );
    dir
}

/// One request of `batch` different texts of exactly `tokens` tokens each.
fn request(model: &dyn Model, batch: usize, tokens: usize) -> Prepared {
    let texts: Vec<Vec<u8>> = (0..batch)
        .map(|row| {
            (0..tokens - 2)
                .map(|w| WORDS[(row + w * 7) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
                .into_bytes()
        })
        .collect();
    let input =
        HostTensor::new("text", vec![batch], TensorData::Bytes(texts)).expect("one text per row");
    let prepared = model.prepare(vec![input]).expect("valid text input");
    assert_eq!(
        prepared.tokens as usize, tokens,
        "the texts tokenize to {tokens} tokens"
    );
    assert!(prepared.token_ids.iter().all(|ids| ids.len() == tokens));
    prepared
}

fn embedding(c: &mut Criterion) {
    let quick = std::env::var_os("QUIVER_BENCH_QUICK").is_some();
    for (engine, cpu_kernels) in [("kernels", true), ("candle", false)] {
        let spec = ModelSpec::TextEmbedding {
            dir: model_dir(),
            cpu_kernels,
            precision: quiver_kernels::Precision::Fp32,
        };
        let model = load(&spec, &Device::Cpu).expect("the model loads");
        engine_cells(c, engine, model.as_ref(), quick);
    }
}

fn engine_cells(c: &mut Criterion, engine: &str, model: &dyn Model, quick: bool) {
    for tokens in TOKENS {
        let mut g = c.benchmark_group(format!("embedding_cpu/{engine}/{tokens}_tokens"));
        // A batch of 64 long texts takes seconds on a small CPU: flat sampling, few samples.
        g.sampling_mode(SamplingMode::Flat);
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }));
        g.measurement_time(Duration::from_secs(if quick { 2 } else { 5 }));
        for batch in BATCHES {
            let prepared = request(model, batch, tokens);
            let batch_ref = std::slice::from_ref(&prepared);
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, _| {
                b.iter(|| model.forward(black_box(batch_ref)).expect("forward"))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, embedding);
criterion_main!(benches);
