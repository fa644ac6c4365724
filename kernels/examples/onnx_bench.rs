//! Quiver's side of `scripts/bench-onnx`: loads one ONNX graph (`kind = "onnx"`) on the CPU on
//! one engine (`onnxruntime`: ONNX Runtime through `ort`, from ORT_DYLIB_PATH; `candle`:
//! candle-onnx; `auto`, the default: what the gateway picks), then answers commands on stdin,
//! one line each, so that the script can time it in the same rounds as ONNX Runtime from
//! Python:
//!
//! ```text
//! time SECONDS INPUT...  -> "ok CALLS MEDIAN_S": Model::forward on one request of these inputs
//!                           for SECONDS; each INPUT is PATH:D0xD1x... (little-endian, C order,
//!                           of the signature's datatype), in the signature's order
//! quit
//! ```
//!
//! On start it prints one JSON line: `{"ready":true,"engine":...,"threads":...,"load_s":...}`.
//!
//! A call is what the device thread runs for a batch: `Model::forward` on a prepared request
//! (the host tensors to the engine's tensors, the graph, the outputs back to host tensors). A
//! `time` first warms up (2 calls and at least 0.1 s), then times every call separately for
//! `SECONDS` (at least 5 calls) and reports the median.
//!
//! ```sh
//! cargo build --release -p quiver-kernels --example onnx_bench
//! onnx_bench MODEL.onnx [auto|onnxruntime|candle]
//! ```

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use quiver_kernels::{DataType, Device, HostTensor, Model, OnnxEngine, OnnxModel, TensorData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_path, engine) = match args.as_slice() {
        [path] => (path, OnnxEngine::Auto),
        [path, engine] => (
            path,
            match engine.as_str() {
                "auto" => OnnxEngine::Auto,
                "onnxruntime" => OnnxEngine::OnnxRuntime,
                "candle" => OnnxEngine::Candle,
                other => {
                    return Err(format!("engine `{other}`: auto, onnxruntime or candle").into());
                }
            },
        ),
        _ => return Err("usage: onnx_bench MODEL.onnx [auto|onnxruntime|candle]".into()),
    };
    let start = Instant::now();
    let model = OnnxModel::load(
        Path::new(model_path),
        Device::Cpu,
        Device::Cpu.to_candle()?,
        engine,
    )?;
    let load_s = start.elapsed().as_secs_f64();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        r#"{{"ready":true,"engine":"{}","threads":"{threads}","load_s":{load_s}}}"#,
        model.engine()
    );
    std::io::stdout().flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["quit"] | [] => break,
            ["time", seconds, inputs @ ..] => {
                let seconds: f64 = seconds.parse()?;
                let tensors = inputs
                    .iter()
                    .zip(&model.signature().inputs)
                    .map(|(arg, spec)| read_input(arg, &spec.name, spec.datatype))
                    .collect::<Result<Vec<_>, _>>()?;
                let prepared = model.prepare(tensors)?;
                let batch = std::slice::from_ref(&prepared);
                let call = || model.forward(batch).map(|_| ());
                let warm = Instant::now();
                let mut warm_calls = 0;
                while warm_calls < 2 || warm.elapsed() < Duration::from_millis(100) {
                    call()?;
                    warm_calls += 1;
                }
                let mut times = Vec::new();
                let begin = Instant::now();
                while times.len() < 5 || begin.elapsed().as_secs_f64() < seconds {
                    let t = Instant::now();
                    call()?;
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                println!("ok {} {}", times.len(), times[times.len() / 2]);
            }
            other => println!("error unknown command {other:?}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// `PATH:D0xD1x...` as a host tensor named `name` of `datatype`.
fn read_input(
    arg: &str,
    name: &str,
    datatype: DataType,
) -> Result<HostTensor, Box<dyn std::error::Error>> {
    let (path, dims) = arg.rsplit_once(':').ok_or("an input is PATH:D0xD1x...")?;
    let shape = dims
        .split('x')
        .map(str::parse)
        .collect::<Result<Vec<usize>, _>>()?;
    let bytes = std::fs::read(path)?;
    let data = match datatype {
        DataType::Fp32 => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DataType::Int64 => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        other => return Err(format!("{name}: datatype {} not benchmarked", other.as_str()).into()),
    };
    Ok(HostTensor {
        name: name.to_owned(),
        shape,
        data,
    })
}
