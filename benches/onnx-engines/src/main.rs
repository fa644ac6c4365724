//! tract, ONNX Runtime (through the `ort` crate, loaded from ORT_DYLIB_PATH) and candle-onnx on
//! the graphs of scripts/make-onnx (the MLP and the small image classifier) and MiniLM's encoder
//! (scripts/export-minilm-onnx), in one process; scripts/bench-onnx-engines builds and runs it.
//!
//! ```text
//! onnx-engines MODELS_DIR/onnx OUT.json
//! ```
//!
//! Environment: THREADS (2), ROUNDS (5), SECONDS_PER_RUN (1), BATCHES ("1 64"),
//! MINILM_TOKENS (32), ENGINES (all of "tract tract-fixed ort candle-onnx"), ORT_DYLIB_PATH
//! (the ONNX Runtime shared library; without it the ort engine is left out, and said so).
//!
//! Engines:
//!
//! - `tract`: tract-onnx, `into_optimized()?.into_runnable()` on the graph as declared (the
//!   batch, and MiniLM's sequence length, symbolic): one plan for every batch size, as the
//!   gateway would hold it. Its matrix products on a THREADS-thread pool.
//! - `tract-fixed`: the same with every input's shape fixed before optimisation, one plan per
//!   shape (tract's fastest path; a gateway would need a plan per batch size).
//! - `ort`: ONNX Runtime, intra-op THREADS threads, inter-op 1, graph optimisations at all
//!   (Python's defaults, as scripts/bench-onnx.py runs it).
//! - `candle-onnx`: `candle_onnx::simple_eval` on the CPU, as Quiver's `kind = "onnx"` runs
//!   it (the gateway's wrapper around it is not included); RAYON_NUM_THREADS threads.
//!
//! Coverage first: each engine loads and runs make-onnx's `refused.onnx` and MiniLM at
//! optimum's default opset (ops candle-onnx lacks); see [`coverage`].
//!
//! Each engine is first checked on the inputs whose ONNX Runtime (Python) outputs make-onnx and
//! export-minilm-onnx wrote: the largest absolute difference over all outputs is reported, and
//! an engine that fails or differs by more than 1e-3 is not timed on that graph. A call is one
//! run on one request, the input tensors built from host buffers included. Timing: warm-up (2
//! calls and at least 0.1 s), then every call timed separately for SECONDS_PER_RUN (at least 5
//! calls), the median kept; ROUNDS rounds, the engines interleaved within each round; the result
//! is the median of the rounds' medians.

use std::borrow::Cow;
use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

type R<T> = Result<T, Box<dyn Error>>;
/// Named outputs, in the graph's output order.
type Outputs = Vec<(String, Vec<f32>)>;
/// A coverage case: its name, the graph, the inputs, and the reference outputs if stored.
type CoverageCase = (String, PathBuf, Vec<Input>, Option<Vec<Vec<f32>>>);

const TOLERANCE: f32 = 1e-3;

#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Input {
    name: String,
    shape: Vec<usize>,
    data: Data,
}

/// One graph: where it is, and the reference inputs and outputs to check engines against.
struct Graph {
    name: String,
    model: PathBuf,
    check_inputs: Vec<Input>,
    /// ONNX Runtime's outputs on `check_inputs`, in the graph's output order.
    check_outputs: Outputs,
    /// The inputs of one timed call at batch `b`.
    make_inputs: Box<dyn Fn(usize) -> Vec<Input>>,
}

trait Engine {
    /// Runs the graph; with `keep`, returns its outputs in the graph's output order.
    fn run(&mut self, inputs: &[Input], keep: bool) -> R<Vec<Vec<f32>>>;
}

// ---------------------------------------------------------------------------------------------
// tract

use tract_onnx::prelude::*;

struct Tract {
    plan: Arc<TypedRunnableModel>,
}

impl Tract {
    fn load(model: &Path, fixed: Option<&[Input]>) -> R<Self> {
        let mut m = tract_onnx::onnx().model_for_path(model)?;
        if let Some(inputs) = fixed {
            for (i, input) in inputs.iter().enumerate() {
                let dt = match input.data {
                    Data::F32(_) => f32::datum_type(),
                    Data::I64(_) => i64::datum_type(),
                };
                m = m.with_input_fact(i, InferenceFact::dt_shape(dt, input.shape.clone()))?;
            }
        }
        let plan = m.into_optimized()?.into_runnable()?;
        Ok(Tract { plan })
    }
}

impl Engine for Tract {
    fn run(&mut self, inputs: &[Input], keep: bool) -> R<Vec<Vec<f32>>> {
        let values = inputs
            .iter()
            .map(|i| {
                Ok(match &i.data {
                    Data::F32(v) => Tensor::from_shape::<f32>(&i.shape, v)?,
                    Data::I64(v) => Tensor::from_shape::<i64>(&i.shape, v)?,
                }
                .into_tvalue())
            })
            .collect::<TractResult<TVec<TValue>>>()?;
        let outputs = self.plan.run(values)?;
        if !keep {
            return Ok(Vec::new());
        }
        outputs
            .iter()
            .map(|o| {
                Ok(o.cast_to::<f32>()?
                    .to_plain_array_view::<f32>()?
                    .iter()
                    .copied()
                    .collect())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// ONNX Runtime through `ort`

struct Ort {
    session: ort::session::Session,
    outputs: Vec<String>,
}

impl Ort {
    fn load(env: &ort::environment::Environment, model: &Path, threads: usize) -> R<Self> {
        use ort::session::{Session, builder::GraphOptimizationLevel};
        let session = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| e.to_string())?
            .with_intra_threads(threads)
            .map_err(|e| e.to_string())?
            .with_inter_threads(1)
            .map_err(|e| e.to_string())?
            .commit_from_file(model)?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(Ort { session, outputs })
    }
}

impl Engine for Ort {
    fn run(&mut self, inputs: &[Input], keep: bool) -> R<Vec<Vec<f32>>> {
        use ort::session::SessionInputValue;
        use ort::value::TensorRef;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for i in inputs {
            let shape: Vec<i64> = i.shape.iter().map(|&d| d as i64).collect();
            let v: SessionInputValue<'_> = match &i.data {
                Data::F32(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
                Data::I64(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            };
            values.push((Cow::Borrowed(i.name.as_str()), v));
        }
        let outputs = self.session.run(values)?;
        if !keep {
            return Ok(Vec::new());
        }
        self.outputs
            .iter()
            .map(|name| {
                Ok(outputs[name.as_str()]
                    .try_extract_tensor::<f32>()?
                    .1
                    .to_vec())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// candle-onnx

struct Candle {
    model: candle_onnx::onnx::ModelProto,
    outputs: Vec<String>,
}

impl Candle {
    fn load(model: &Path) -> R<Self> {
        let model = candle_onnx::read_file(model)?;
        let outputs = model
            .graph
            .as_ref()
            .ok_or("no graph")?
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        Ok(Candle { model, outputs })
    }
}

impl Engine for Candle {
    fn run(&mut self, inputs: &[Input], keep: bool) -> R<Vec<Vec<f32>>> {
        use candle_core::{Device, Tensor as CTensor};
        let mut values = HashMap::new();
        for i in inputs {
            let t = match &i.data {
                Data::F32(v) => CTensor::from_slice(v, i.shape.as_slice(), &Device::Cpu)?,
                Data::I64(v) => CTensor::from_slice(v, i.shape.as_slice(), &Device::Cpu)?,
            };
            values.insert(i.name.clone(), t);
        }
        let mut outputs = candle_onnx::simple_eval(&self.model, values)?;
        if !keep {
            return Ok(Vec::new());
        }
        self.outputs
            .iter()
            .map(|name| {
                let t = outputs
                    .remove(name)
                    .ok_or_else(|| format!("no output {name}"))?;
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------

fn load_engine(
    kind: &str,
    model: &Path,
    inputs: &[Input],
    threads: usize,
    ort_env: Option<&ort::environment::Environment>,
) -> R<Box<dyn Engine>> {
    Ok(match kind {
        "tract" => Box::new(Tract::load(model, None)?),
        "tract-fixed" => Box::new(Tract::load(model, Some(inputs))?),
        "ort" => Box::new(Ort::load(
            ort_env.ok_or("no ONNX Runtime")?,
            model,
            threads,
        )?),
        "candle-onnx" => Box::new(Candle::load(model)?),
        other => return Err(format!("unknown engine {other}").into()),
    })
}

fn read_f32(path: &Path) -> R<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn read_i64(path: &Path) -> R<Vec<i64>> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// Reads one manifest entry (make-onnx's or export-minilm-onnx's): the inputs and outputs.
fn read_case(dir: &Path, entry: &Value) -> R<(Vec<Input>, Outputs)> {
    let mut inputs = Vec::new();
    for i in entry["inputs"].as_array().ok_or("manifest: no inputs")? {
        let name = i["name"]
            .as_str()
            .ok_or("manifest: input name")?
            .to_string();
        let shape: Vec<usize> = i["shape"]
            .as_array()
            .ok_or("manifest: shape")?
            .iter()
            .map(|d| d.as_u64().unwrap_or(0) as usize)
            .collect();
        let file = dir.join(i["file"].as_str().ok_or("manifest: file")?);
        let data = match i["datatype"].as_str() {
            Some("FP32") => Data::F32(read_f32(&file)?),
            Some("INT64") => Data::I64(read_i64(&file)?),
            other => return Err(format!("manifest: datatype {other:?}").into()),
        };
        inputs.push(Input { name, shape, data });
    }
    let mut outputs = Vec::new();
    for o in entry["outputs"].as_array().ok_or("manifest: no outputs")? {
        let name = o["name"]
            .as_str()
            .ok_or("manifest: output name")?
            .to_string();
        outputs.push((
            name,
            read_f32(&dir.join(o["file"].as_str().ok_or("manifest: file")?))?,
        ));
    }
    Ok((inputs, outputs))
}

/// A small deterministic generator (xorshift64*), for the timed inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

fn graphs(src: &Path, tokens: usize) -> R<Vec<Graph>> {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json"))?)?;
    let mut out = Vec::new();
    for name in ["mlp", "conv"] {
        let entry = &manifest["graphs"][name];
        let (check_inputs, check_outputs) = read_case(src, entry)?;
        let template = check_inputs.clone();
        out.push(Graph {
            name: name.to_string(),
            model: src.join(entry["model"].as_str().ok_or("manifest: model")?),
            check_inputs,
            check_outputs,
            make_inputs: Box::new(move |batch| {
                let mut rng = Rng(7 + batch as u64);
                template
                    .iter()
                    .map(|i| {
                        let mut shape = i.shape.clone();
                        shape[0] = batch;
                        let n = shape.iter().product();
                        Input {
                            name: i.name.clone(),
                            shape,
                            data: Data::F32((0..n).map(|_| rng.normal()).collect()),
                        }
                    })
                    .collect()
            }),
        });
    }
    let minilm = src.join("minilm");
    if minilm.join("manifest.json").is_file() && minilm.join("model.onnx").is_file() {
        let entry: Value =
            serde_json::from_str(&std::fs::read_to_string(minilm.join("manifest.json"))?)?;
        let (check_inputs, check_outputs) = read_case(&minilm, &entry)?;
        let names: Vec<String> = check_inputs.iter().map(|i| i.name.clone()).collect();
        out.push(Graph {
            name: format!("minilm ({tokens} tokens)"),
            model: minilm.join("model.onnx"),
            check_inputs,
            check_outputs,
            make_inputs: Box::new(move |batch| {
                let mut rng = Rng(11 + batch as u64);
                let n = batch * tokens;
                names
                    .iter()
                    .map(|name| Input {
                        name: name.clone(),
                        shape: vec![batch, tokens],
                        data: Data::I64(match name.as_str() {
                            "input_ids" => (0..n)
                                .map(|_| 1000 + (rng.next_u64() % 19000) as i64)
                                .collect(),
                            "attention_mask" => vec![1; n],
                            _ => vec![0; n],
                        }),
                    })
                    .collect()
            }),
        });
    } else {
        eprintln!(
            "onnx-engines: no {}: MiniLM left out (scripts/export-minilm-onnx)",
            minilm.display()
        );
    }
    Ok(out)
}

fn max_abs_diff(engine: &mut dyn Engine, g: &Graph) -> R<f32> {
    let got = engine.run(&g.check_inputs, true)?;
    if got.len() != g.check_outputs.len() {
        return Err(format!("{} outputs, expected {}", got.len(), g.check_outputs.len()).into());
    }
    let mut worst = 0f32;
    for (o, (name, want)) in got.iter().zip(&g.check_outputs) {
        if o.len() != want.len() {
            return Err(
                format!("output {name}: {} values, expected {}", o.len(), want.len()).into(),
            );
        }
        for (a, b) in o.iter().zip(want) {
            let d = (a - b).abs();
            worst = if d.is_nan() {
                f32::INFINITY
            } else {
                worst.max(d)
            };
        }
    }
    Ok(worst)
}

/// Coverage beyond the timed graphs: make-onnx's `refused.onnx` (GlobalAveragePool and
/// LpNormalization, which candle-onnx lacks) and MiniLM at optimum's default opset
/// (LayerNormalization). Each engine loads and runs it; the outputs are compared with the ort
/// engine's (refused.onnx has no stored reference) or with MiniLM's reference outputs.
fn coverage(
    src: &Path,
    engines: &[String],
    threads: usize,
    ort_env: Option<&ort::environment::Environment>,
) -> R<Vec<Value>> {
    let mut cases: Vec<CoverageCase> = Vec::new();
    let mut rng = Rng(3);
    cases.push((
        "refused.onnx (GlobalAveragePool, LpNormalization)".into(),
        src.join("refused.onnx"),
        vec![Input {
            name: "image".into(),
            shape: vec![2, 3, 8, 8],
            data: Data::F32((0..2 * 3 * 8 * 8).map(|_| rng.normal()).collect()),
        }],
        None,
    ));
    let minilm = src.join("minilm");
    if minilm.join("model.default-opset.onnx").is_file() {
        let entry: Value =
            serde_json::from_str(&std::fs::read_to_string(minilm.join("manifest.json"))?)?;
        let (inputs, outputs) = read_case(&minilm, &entry)?;
        cases.push((
            "minilm model.default-opset.onnx (LayerNormalization)".into(),
            minilm.join("model.default-opset.onnx"),
            inputs,
            Some(outputs.into_iter().map(|(_, v)| v).collect()),
        ));
    }
    let mut out = Vec::new();
    for (name, model, inputs, mut reference) in cases {
        // ort first, so that its outputs are the reference where none is stored.
        let mut order: Vec<&String> = engines.iter().filter(|e| *e == "ort").collect();
        order.extend(engines.iter().filter(|e| *e != "ort"));
        for kind in order {
            let got = load_engine(kind, &model, &inputs, threads, ort_env)
                .and_then(|mut e| e.run(&inputs, true));
            let row = match got {
                Ok(got) => {
                    let diff = reference.as_ref().map(|want| {
                        got.iter()
                            .zip(want)
                            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                            .fold(
                                0f32,
                                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                            )
                    });
                    if reference.is_none() && kind == "ort" {
                        reference = Some(got);
                    }
                    json!({"graph": name, "engine": kind, "ok": true, "max_abs_diff": diff})
                }
                Err(e) => {
                    json!({"graph": name, "engine": kind, "ok": false, "error": e.to_string()})
                }
            };
            eprintln!("coverage: {row}");
            out.push(row);
        }
    }
    Ok(out)
}

fn time(engine: &mut dyn Engine, inputs: &[Input], seconds: f64) -> R<f64> {
    let warm = Instant::now();
    let mut calls = 0;
    while calls < 2 || warm.elapsed() < Duration::from_millis(100) {
        engine.run(inputs, false)?;
        calls += 1;
    }
    let mut times = Vec::new();
    let begin = Instant::now();
    while times.len() < 5 || begin.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        engine.run(inputs, false)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, out] = args.as_slice() else {
        return Err("usage: onnx-engines MODELS_DIR/onnx OUT.json".into());
    };
    let threads: usize = env("THREADS", 2);
    let rounds: usize = env("ROUNDS", 5);
    let seconds: f64 = env("SECONDS_PER_RUN", 1.0);
    let tokens: usize = env("MINILM_TOKENS", 32);
    let batches: Vec<usize> = env("BATCHES", "1 64".to_string())
        .split_whitespace()
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let mut engines: Vec<String> = env("ENGINES", "tract tract-fixed ort candle-onnx".to_string())
        .split_whitespace()
        .map(String::from)
        .collect();

    tract_linalg::multithread::set_default_executor(
        tract_linalg::multithread::Executor::multithread(threads),
    );
    let mut failures: Vec<Value> = Vec::new();
    // ONNX Runtime from the shared library at ORT_DYLIB_PATH; the environment lives to the end.
    let mut ort_version = Value::Null;
    let ort_env = if engines.iter().any(|e| e == "ort") {
        let lib = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
        let env = if lib.is_empty() {
            Err("ORT_DYLIB_PATH is not set".to_string())
        } else {
            ort::init_from(&lib)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    b.with_name("onnx-engines")
                        .build()
                        .map_err(|e| e.to_string())
                })
        };
        match env {
            Ok(env) => {
                ort_version = json!(ort::info());
                eprintln!("onnx-engines: ONNX Runtime from {lib}: {}", ort::info());
                Some(env)
            }
            Err(e) => {
                eprintln!("onnx-engines: ort left out: {e}");
                failures.push(json!({"engine": "ort", "graph": null, "error": e}));
                engines.retain(|e| e != "ort");
                None
            }
        }
    } else {
        None
    };

    let coverage = coverage(Path::new(src), &engines, threads, ort_env.as_ref())?;
    let mut results = Vec::new();
    let mut checks = Vec::new();
    for g in graphs(Path::new(src), tokens)? {
        // The check, on the reference inputs.
        let mut ok = Vec::new();
        for kind in &engines {
            let start = Instant::now();
            let checked = load_engine(kind, &g.model, &g.check_inputs, threads, ort_env.as_ref())
                .and_then(|mut e| max_abs_diff(e.as_mut(), &g));
            match checked {
                Ok(diff) => {
                    eprintln!(
                        "{} {kind}: max abs diff {diff:.2e} (load + check {:.2} s)",
                        g.name,
                        start.elapsed().as_secs_f64()
                    );
                    checks.push(json!({"graph": g.name, "engine": kind, "max_abs_diff": diff}));
                    if diff <= TOLERANCE {
                        ok.push(kind.clone());
                    } else {
                        failures.push(json!({"engine": kind, "graph": g.name,
                            "error": format!("max abs diff {diff:e} against ONNX Runtime's outputs")}));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    eprintln!("{} {kind}: FAILED: {e}", g.name);
                    checks.push(json!({"graph": g.name, "engine": kind, "error": e}));
                    failures.push(json!({"engine": kind, "graph": g.name, "error": e}));
                }
            }
        }
        for &batch in &batches {
            let inputs = (g.make_inputs)(batch);
            let mut loaded = Vec::new();
            for kind in &ok {
                match load_engine(kind, &g.model, &inputs, threads, ort_env.as_ref()) {
                    Ok(e) => loaded.push((kind.clone(), e, Vec::new())),
                    Err(e) => {
                        eprintln!("{} batch {batch} {kind}: FAILED to load: {e}", g.name);
                        failures.push(json!({"engine": kind, "graph": g.name, "batch": batch,
                            "error": e.to_string()}));
                    }
                }
            }
            for _ in 0..rounds {
                for (kind, engine, times) in loaded.iter_mut() {
                    match time(engine.as_mut(), &inputs, seconds) {
                        Ok(t) => times.push(t),
                        Err(e) => {
                            eprintln!("{} batch {batch} {kind}: FAILED: {e}", g.name);
                            failures.push(json!({"engine": kind, "graph": g.name, "batch": batch,
                                "error": e.to_string()}));
                            times.push(f64::NAN);
                        }
                    }
                }
            }
            let mut row = json!({"graph": g.name, "batch": batch});
            let mut line = format!("{} batch {batch}:", g.name);
            for (kind, _, times) in loaded.iter_mut() {
                if times.iter().any(|t| t.is_nan()) {
                    continue;
                }
                let rounds_ms: Vec<f64> = times.iter().map(|t| t * 1e3).collect();
                let ms = median(times) * 1e3;
                row[format!("{kind}_ms")] = json!(ms);
                row[format!("{kind}_rounds_ms")] = json!(rounds_ms);
                line += &format!(" {kind} {ms:.3} ms,");
            }
            eprintln!("{}", line.trim_end_matches(','));
            results.push(row);
        }
    }
    let report = json!({
        "threads": threads,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "minilm_tokens": tokens,
        "engines": engines,
        "versions": {"tract-onnx": "0.23.9", "ort": "2.0.0-rc.15", "candle-onnx": "0.11.1",
            "onnxruntime_library": ort_version},
        "checks": checks,
        "results": results,
        "coverage": coverage,
        "failures": failures,
    });
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    Ok(())
}
