//! The Quiver side of `scripts/bench-vs-pytorch`: the `embedding` model's raw engine
//! throughput, one measurement at a time on request, so that the script can interleave it
//! with PyTorch cell by cell on a machine that other work shares.
//!
//! `embedding_throughput MODEL_DIR` loads the model three times on the CPU device (Quiver's
//! CPU kernels in f32, the same kernels at `precision = "int8"`, and stock candle BERT),
//! prints `ready`, then answers each line of standard input
//!
//! ```text
//! ENGINE TOKENS BATCH SECONDS      ENGINE: kernels | int8 | candle
//! ```
//!
//! with one line `ok ITERATIONS MEDIAN_S MEAN_S`: `Model::forward` on one request of `BATCH`
//! texts of exactly `TOKENS` tokens (`[CLS]` and `[SEP]` counted; the texts of
//! `benches/benches/embedding.rs`), after warm-up forwards (at least 2 and 0.5 s), repeated
//! until `SECONDS` have passed and at least 3 times; the median and mean seconds per forward. Tokenization
//! (`Model::prepare`) is outside the timed loop, as in the gateway where it runs on the front
//! end. A line it cannot serve gets `error MESSAGE`. Threads: rayon's global pool
//! (`RAYON_NUM_THREADS`, default all cores).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use quiver_kernels::{Device, HostTensor, Model, ModelSpec, Precision, Prepared, TensorData, load};

/// Words that BERT's uncased vocabulary holds as single tokens (as in the criterion bench).
const WORDS: [&str; 12] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river", "bank",
];

/// One request of `batch` different texts of exactly `tokens` tokens: row `r`, word `w` is
/// `WORDS[(r + 7w) % 12]`.
fn request(model: &dyn Model, batch: usize, tokens: usize) -> Result<Prepared, String> {
    if tokens < 3 || batch == 0 {
        return Err(format!(
            "need tokens >= 3 and batch >= 1, got {tokens}, {batch}"
        ));
    }
    let texts: Vec<Vec<u8>> = (0..batch)
        .map(|row| {
            (0..tokens - 2)
                .map(|w| WORDS[(row + w * 7) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
                .into_bytes()
        })
        .collect();
    let input = HostTensor::new("text", vec![batch], TensorData::Bytes(texts))
        .map_err(|e| e.to_string())?;
    let prepared = model.prepare(vec![input]).map_err(|e| e.to_string())?;
    if prepared.token_ids.iter().any(|ids| ids.len() != tokens) {
        return Err(format!("the texts do not tokenize to {tokens} tokens"));
    }
    Ok(prepared)
}

fn measure(models: &[(&str, Arc<dyn Model>)], line: &str) -> Result<String, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [engine, tokens, batch, seconds] = fields[..] else {
        return Err(format!(
            "expected ENGINE TOKENS BATCH SECONDS, got {line:?}"
        ));
    };
    let model = models
        .iter()
        .find(|(name, _)| *name == engine)
        .map(|(_, m)| m)
        .ok_or_else(|| format!("unknown engine {engine:?}: kernels, int8 or candle"))?;
    let number = |s: &str| s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let (tokens, batch) = (number(tokens)?, number(batch)?);
    let seconds: f64 = seconds.parse().map_err(|e| format!("{seconds:?}: {e}"))?;
    let prepared = request(model.as_ref(), batch, tokens)?;
    let batch_ref = std::slice::from_ref(&prepared);
    // Warm-up as the PyTorch side of the script does it: at least 2 forwards and 0.5 s.
    let (mut warm, start) = (0, Instant::now());
    while warm < 2 || start.elapsed().as_secs_f64() < 0.5 {
        model.forward(batch_ref).map_err(|e| e.to_string())?;
        warm += 1;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        std::hint::black_box(model.forward(std::hint::black_box(batch_ref)))
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(format!("ok {} {median:.9} {mean:.9}", times.len()))
}

fn main() -> Result<(), String> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: embedding_throughput MODEL_DIR")?;
    let mut models: Vec<(&str, Arc<dyn Model>)> = Vec::new();
    for (name, cpu_kernels, precision) in [
        ("kernels", true, Precision::Fp32),
        ("int8", true, Precision::Int8),
        ("candle", false, Precision::Fp32),
    ] {
        let spec = ModelSpec::TextEmbedding {
            dir: dir.clone(),
            cpu_kernels,
            precision,
        };
        let model = load(&spec, &Device::Cpu).map_err(|e| format!("{}: {e}", dir.display()))?;
        models.push((name, model));
    }
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    writeln!(out, "ready").map_err(io)?;
    out.flush().map_err(io)?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = measure(&models, &line).unwrap_or_else(|e| format!("error {e}"));
        writeln!(out, "{reply}").map_err(io)?;
        out.flush().map_err(io)?;
    }
    Ok(())
}
