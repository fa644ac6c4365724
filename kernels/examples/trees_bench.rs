//! Quiver's side of `scripts/bench-trees`: loads one tree model file (XGBoost JSON or
//! LightGBM text) and one rows file (little-endian f32, `[n, F]` with F from the model), then
//! answers commands on stdin, one line each, so that the script can time Quiver's engine in
//! the same rounds as the Python libraries:
//!
//! ```text
//! predict PATH          -> "ok N": writes the outputs for all n rows to PATH (f32 LE)
//! time ROWS SECONDS     -> "ok CALLS MEDIAN_S": calls on the first ROWS rows for SECONDS
//! repeat ROWS CALLS     -> "ok CALLS": exactly CALLS calls, untimed (for a profiler)
//! quit
//! ```
//!
//! On start it prints one JSON line: `{"ready":true,"isa":...,"threads":...,...}`.
//!
//! Each call is `TreeModel::predict` on the instruction set the model picked at load (what
//! `Model::forward` runs on the CPU): margins into a fresh vector, then the transform, rows
//! from 256 on split over rayon's pool (`RAYON_NUM_THREADS`). A `time` first warms up
//! (2 calls and at least 0.1 s), then times every call separately for `SECONDS` (at least 5
//! calls) and reports the median.
//!
//! ```sh
//! cargo build --release -p quiver-kernels --example trees_bench
//! ```

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use quiver_kernels::Device;
use quiver_kernels::trees::TreeModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, rows_path] = args.as_slice() else {
        return Err("usage: trees_bench MODEL_FILE ROWS_F32_FILE".into());
    };
    let model = TreeModel::load(Path::new(model_path), false, Device::Cpu)?;
    let features = model.forest().features();
    let bytes = std::fs::read(rows_path)?;
    if bytes.len() % (4 * features) != 0 {
        return Err(format!(
            "{rows_path}: {} bytes are not rows of {features} f32 features",
            bytes.len()
        )
        .into());
    }
    let x: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let n = x.len() / features;
    let isa = model.isa();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        r#"{{"ready":true,"isa":"{isa:?}","threads":{},"trees":{},"nodes":{},"max_depth":{},"features":{features},"rows":{n}}}"#,
        rayon::current_num_threads(),
        model.forest().trees(),
        model.forest().nodes(),
        model.forest().max_depth(),
    )?;
    out.flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["predict", path] => {
                let y = model.predict(isa, &x)?;
                let raw: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(path, raw)?;
                writeln!(out, "ok {}", y.len())?;
            }
            ["time", rows, seconds] => {
                let rows: usize = rows.parse()?;
                let seconds: f64 = seconds.parse()?;
                if rows == 0 || rows > n {
                    writeln!(out, "error rows must be 1..={n}")?;
                } else {
                    let x = &x[..rows * features];
                    let (calls, median) = time(Duration::from_secs_f64(seconds), || {
                        std::hint::black_box(model.predict(isa, std::hint::black_box(x)).ok());
                    });
                    writeln!(out, "ok {calls} {:.9e}", median.as_secs_f64())?;
                }
            }
            ["repeat", rows, calls] => {
                let rows: usize = rows.parse()?;
                let calls: usize = calls.parse()?;
                if rows == 0 || rows > n {
                    writeln!(out, "error rows must be 1..={n}")?;
                } else {
                    let x = &x[..rows * features];
                    for _ in 0..calls {
                        std::hint::black_box(model.predict(isa, std::hint::black_box(x)).ok());
                    }
                    writeln!(out, "ok {calls}")?;
                }
            }
            ["quit"] => break,
            _ => writeln!(out, "error unknown command: {line}")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// Warm-up (2 calls, at least 0.1 s), then `f` timed call by call for `span` (at least 5
/// calls): the number of timed calls and their median.
fn time(span: Duration, mut f: impl FnMut()) -> (usize, Duration) {
    let start = Instant::now();
    let mut warm = 0;
    while warm < 2 || start.elapsed() < Duration::from_millis(100) {
        f();
        warm += 1;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 5 || start.elapsed() < span {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples.len(), samples[samples.len() / 2])
}
