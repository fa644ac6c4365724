//! ONNX graphs (`kind = "onnx"`): a `model.onnx` run by ONNX Runtime on the CPU and by
//! candle-onnx on CUDA devices (`DESIGN.md`, "Models").
//!
//! Two engines ([`OnnxEngine`], the model table's `engine`):
//!
//! - ONNX Runtime ([`onnxruntime`]), through the `ort` crate with the shared library opened at
//!   run time (`ORT_DYLIB_PATH`, e.g. PyPI's onnxruntime wheel): every op of the ONNX standard,
//!   1.4–38× faster than candle-onnx on the CPU (`benches/README.md`, "ONNX graphs"). CPU only.
//! - candle-onnx: the graph evaluated op by op on candle tensors, so the same graph runs on the
//!   `cpu` and `cuda:N` devices like the other families; a subset of the ops
//!   ([`SUPPORTED_OPS`]).
//!
//! `auto` (the default) runs ONNX Runtime on the CPU when its library opens, else candle-onnx
//! with one warning saying why and what to install; on a CUDA device it runs candle-onnx.
//!
//! The signature comes from the graph: its inputs (less the initializers, which some
//! exporters list as inputs too) and outputs, with their element types and shapes. A
//! symbolic or missing dimension is free (`-1`); the first dimension of every input and
//! output must be free, since it is the batch dimension the batcher fills. Both engines report
//! the same signature for a graph both can run.
//!
//! Loading does what can fail once, so that nothing fails at the first request. On ONNX
//! Runtime: the session is built (graph optimisations, kernels chosen; a graph it cannot run
//! is [`OnnxError::Runtime`]). On candle-onnx:
//!
//! 1. every node's op type (in `If` branches too) is checked against the ops that
//!    candle-onnx 0.11.1's `simple_eval` runs ([`SUPPORTED_OPS`]); a graph using others is
//!    refused with the list of them ([`OnnxError::UnsupportedOps`]);
//! 2. the initializers and `Constant` nodes become tensors on the model's device once
//!    (candle-onnx would otherwise rebuild them on the CPU from the protobuf at every call,
//!    and a CUDA graph would mix devices);
//! 3. `Gemm` nodes become `MatMul` and `Add` on weights transposed and scaled once
//!    (candle-onnx's `Gemm` builds its `alpha` and `beta` on the CPU at every call, and
//!    cannot run without its optional `C`).
//!
//! Then, on either engine, the graph runs once on a one-row batch of zeros (free dimensions
//! 1), and its outputs must have the declared element types, ranks and one row.
//!
//! `forward` concatenates the requests whose inputs agree past the batch dimension into one
//! run of the graph, so a batch of fixed-shape requests costs one evaluation; requests of
//! other shapes (e.g. another sequence length) run in their own group. On ONNX Runtime a
//! group of one request is fed without a copy (the session reads the request's buffers).
//!
//! Element types: on ONNX Runtime FP32, FP64, INT8–INT64, UINT8–UINT64 and BOOL. On
//! candle-onnx FP32, FP64, INT64, INT32, UINT8, UINT32 and BOOL; it computes INT32 as INT64
//! (its initializers and casts do), so an INT32 input is fed as INT64 and an INT32 output
//! converted back. FLOAT16 and strings have no wire type here and are refused at load, as are
//! (on candle-onnx) weights stored outside the file (ONNX external data), which ONNX Runtime
//! reads.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_onnx::onnx::{
    self, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto::dimension,
    type_proto,
};
use prost::Message;

pub mod onnxruntime;

use crate::device::Device;
use crate::error::{InputError, LoadError, ModelError};
use crate::model::{Model, Prepared, Signature, TensorSpec};
use crate::tensor::{DataType, HostTensor, TensorData};

/// The file a model directory holds.
pub const MODEL_FILE: &str = "model.onnx";

/// The op types of the default ONNX domain that candle-onnx 0.11.1's `simple_eval` runs: the
/// arms of its `match node.op_type` (`src/eval.rs`). A graph with any other op is refused at
/// load. Keep in step with the `candle-onnx` version in Cargo.toml.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "HardSwish",
    "Identity",
    "If",
    "LSTM",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "OneHot",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "RNN",
    "RandomNormal",
    "RandomUniform",
    "Range",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// Which engine runs a graph: the model table's `engine` (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnnxEngine {
    /// ONNX Runtime on the CPU when its library opens, else candle-onnx (with a warning); on
    /// a CUDA device candle-onnx.
    #[default]
    Auto,
    /// ONNX Runtime; a load fails when its library cannot be opened, and on a CUDA device.
    OnnxRuntime,
    /// candle-onnx, on every device.
    Candle,
}

impl OnnxEngine {
    /// The configuration's spelling: `auto`, `onnxruntime` or `candle`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnnxEngine::Auto => "auto",
            OnnxEngine::OnnxRuntime => "onnxruntime",
            OnnxEngine::Candle => "candle",
        }
    }
}

impl std::fmt::Display for OnnxEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an ONNX file cannot be served. Wrapped in [`LoadError::Onnx`] with the file's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// The file is not an ONNX model (protobuf `ModelProto`), or has no graph.
    #[error("not an ONNX model: {message}")]
    Parse {
        /// The decoder's message.
        message: String,
    },
    /// The graph uses op types that candle-onnx cannot run.
    #[error(
        "the graph uses op types that candle-onnx {version} cannot run: {}; \
         run it on ONNX Runtime (the cpu device, engine \"auto\" or \"onnxruntime\"), \
         re-export without them (e.g. another opset) or serve it from an upstream",
        ops.join(", "),
        version = CANDLE_ONNX_VERSION
    )]
    UnsupportedOps {
        /// The op types, sorted, each once; `domain:Op` for ops outside the default domain.
        ops: Vec<String>,
    },
    /// An input or output cannot be served: its element type, a missing shape, or a first
    /// dimension that is not free.
    #[error("{what} `{name}`: {message}")]
    Signature {
        /// `input` or `output`.
        what: &'static str,
        /// The tensor's name in the graph.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// An initializer or constant cannot be read (external data, an unsupported element type).
    #[error("tensor `{name}`: {message}")]
    Weight {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// ONNX Runtime's library cannot be opened (engine `onnxruntime`; `auto` falls back to
    /// candle-onnx instead).
    #[error(
        "ONNX Runtime cannot be loaded from `{}`: {message}; install it with \
         `pip install onnxruntime=={version}` and set \
         ORT_DYLIB_PATH=<site-packages>/onnxruntime/capi/libonnxruntime.so.{version}, \
         or set engine = \"candle\"",
        library.display(),
        version = onnxruntime::ONNXRUNTIME_VERSION
    )]
    RuntimeUnavailable {
        /// The library tried (`ORT_DYLIB_PATH`, else `libonnxruntime.so`).
        library: PathBuf,
        /// Why it could not be opened.
        message: String,
    },
    /// ONNX Runtime refused the graph when building its session (an op it has no kernel for,
    /// e.g. a custom domain's, or an invalid graph).
    #[error("ONNX Runtime cannot run the graph: {message}")]
    Runtime {
        /// ONNX Runtime's message.
        message: String,
    },
    /// The engine does not run on the model's device (`onnxruntime` on `cuda:N`).
    #[error(
        "engine \"{engine}\" runs on the cpu only, not on {device}; \
         use engine = \"auto\" or \"candle\" (candle-onnx) there"
    )]
    EngineDevice {
        /// The engine asked for.
        engine: OnnxEngine,
        /// The model's device.
        device: Device,
    },
    /// The graph failed on the load-time check (a one-row batch of zeros), or gave outputs
    /// that do not match its declared outputs.
    #[error("the graph fails on a one-row batch of zeros (free dimensions 1): {message}")]
    Check {
        /// What failed.
        message: String,
    },
}

/// The candle-onnx version whose op set [`SUPPORTED_OPS`] lists.
pub const CANDLE_ONNX_VERSION: &str = "0.11.1";

/// How one signature input or output is fed to or read from the graph.
#[derive(Clone, Debug)]
struct Port {
    /// The graph's name for it (also the signature's).
    name: String,
    /// The wire type (on candle-onnx INT32 is computed as INT64, BOOL as UINT8).
    datatype: DataType,
}

/// A loaded ONNX graph on one device.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    signature: Signature,
    device: Device,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    graph: Graph,
}

/// The engine that runs the graph, with what it loaded.
#[derive(Debug)]
enum Graph {
    OnnxRuntime(onnxruntime::OrtGraph),
    Candle(Box<CandleGraph>),
}

/// A graph prepared for candle-onnx's `simple_eval`.
#[derive(Debug)]
struct CandleGraph {
    candle: candle_core::Device,
    /// The graph without its initializers and `Constant` nodes, `Gemm` rewritten.
    model: ModelProto,
    /// The initializers and constants, on the device.
    weights: HashMap<String, Tensor>,
    ops: BTreeSet<String>,
}

impl OnnxModel {
    /// Loads `path` (a `.onnx` file, or a directory holding [`MODEL_FILE`]) onto `candle`
    /// (the opened `device`) on the engine `engine` picks for it, and checks it (see the
    /// module docs).
    pub fn load(
        path: &Path,
        device: Device,
        candle: candle_core::Device,
        engine: OnnxEngine,
    ) -> Result<Self, LoadError> {
        let file = if path.is_dir() {
            path.join(MODEL_FILE)
        } else {
            path.to_owned()
        };
        let onnx_error = |source| LoadError::Onnx {
            path: file.clone(),
            source,
        };
        let env = match (engine, &device) {
            (OnnxEngine::Candle, _) | (OnnxEngine::Auto, Device::Cuda(_)) => None,
            (OnnxEngine::OnnxRuntime, Device::Cuda(_)) => {
                return Err(onnx_error(OnnxError::EngineDevice { engine, device }));
            }
            (OnnxEngine::OnnxRuntime, _) => Some(onnxruntime::environment().map_err(onnx_error)?),
            (OnnxEngine::Auto, _) => match onnxruntime::environment() {
                Ok(env) => Some(env),
                Err(why) => {
                    tracing::warn!(
                        model = %file.display(),
                        "kind = \"onnx\" runs on candle-onnx (slower, fewer ops) because {why}"
                    );
                    None
                }
            },
        };
        match env {
            Some(env) => {
                // The session reads the file itself; an unreadable one is an I/O error here.
                std::fs::File::open(&file).map_err(|source| LoadError::Io {
                    path: file.clone(),
                    source,
                })?;
                Self::from_session(&file, device, &env).map_err(onnx_error)
            }
            None => {
                let bytes = std::fs::read(&file).map_err(|source| LoadError::Io {
                    path: file.clone(),
                    source,
                })?;
                let model = ModelProto::decode(bytes.as_slice()).map_err(|e| {
                    onnx_error(OnnxError::Parse {
                        message: e.to_string(),
                    })
                })?;
                Self::from_proto(model, &file, device, candle).map_err(onnx_error)
            }
        }
    }

    /// [`OnnxModel::load`] on ONNX Runtime, from the file.
    fn from_session(
        file: &Path,
        device: Device,
        env: &::ort::environment::Environment,
    ) -> Result<Self, OnnxError> {
        let loaded = onnxruntime::load(file, env)?;
        let (inputs, input_specs) = loaded.inputs.into_iter().unzip();
        let (outputs, output_specs) = loaded.outputs.into_iter().unzip();
        Self::checked(
            file,
            device,
            Signature {
                inputs: input_specs,
                outputs: output_specs,
            },
            inputs,
            outputs,
            Graph::OnnxRuntime(loaded.graph),
        )
    }

    /// [`OnnxModel::load`] on candle-onnx, on a decoded model; `path` names it in messages.
    pub fn from_proto(
        mut model: ModelProto,
        path: &Path,
        device: Device,
        candle: candle_core::Device,
    ) -> Result<Self, OnnxError> {
        let Some(graph) = model.graph.as_mut() else {
            return Err(OnnxError::Parse {
                message: "the model has no graph".into(),
            });
        };
        let mut ops = BTreeSet::new();
        let mut unsupported = BTreeSet::new();
        collect_ops(graph, &mut ops, &mut unsupported);
        if !unsupported.is_empty() {
            return Err(OnnxError::UnsupportedOps {
                ops: unsupported.into_iter().collect(),
            });
        }

        // Weights: initializers and constants, once, on the device.
        let mut weights = HashMap::new();
        for t in std::mem::take(&mut graph.initializer) {
            let tensor =
                weight(&t, &t.name)?
                    .to_device(&candle)
                    .map_err(|e| OnnxError::Weight {
                        name: t.name.clone(),
                        message: e.to_string(),
                    })?;
            weights.insert(t.name, tensor);
        }
        let mut nodes = Vec::with_capacity(graph.node.len());
        for node in std::mem::take(&mut graph.node) {
            match constant(&node)? {
                Some(t) => {
                    let name = node.output.first().cloned().unwrap_or_default();
                    let t = t.to_device(&candle).map_err(|e| OnnxError::Weight {
                        name: name.clone(),
                        message: e.to_string(),
                    })?;
                    weights.insert(name, t);
                }
                None => nodes.push(node),
            }
        }
        graph.node = rewrite_gemms(nodes, &mut weights)?;
        // Initializers that an older IR lists among the inputs are not inputs to fill.
        graph.input.retain(|i| !weights.contains_key(&i.name));

        let mut inputs = Vec::with_capacity(graph.input.len());
        let mut input_specs = Vec::with_capacity(graph.input.len());
        for info in &mut graph.input {
            let (port, spec) = port(info, "input")?;
            if port.datatype == DataType::Int32 {
                // candle-onnx computes INT32 as INT64: the graph is fed INT64.
                set_elem_type(info, onnx::tensor_proto::DataType::Int64);
            }
            inputs.push(port);
            input_specs.push(spec);
        }
        let mut outputs = Vec::with_capacity(graph.output.len());
        let mut output_specs = Vec::with_capacity(graph.output.len());
        for info in &graph.output {
            let (port, spec) = port(info, "output")?;
            outputs.push(port);
            output_specs.push(spec);
        }
        Self::checked(
            path,
            device,
            Signature {
                inputs: input_specs,
                outputs: output_specs,
            },
            inputs,
            outputs,
            Graph::Candle(Box::new(CandleGraph {
                candle,
                model,
                weights,
                ops,
            })),
        )
    }

    /// The model, once its graph has inputs and passes the one-row check.
    fn checked(
        path: &Path,
        device: Device,
        signature: Signature,
        inputs: Vec<Port>,
        outputs: Vec<Port>,
        graph: Graph,
    ) -> Result<Self, OnnxError> {
        if inputs.is_empty() {
            return Err(OnnxError::Signature {
                what: "input",
                name: String::new(),
                message: "the graph has no inputs to batch".into(),
            });
        }
        let loaded = OnnxModel {
            path: path.to_owned(),
            signature,
            device,
            inputs,
            outputs,
            graph,
        };
        loaded.check()?;
        Ok(loaded)
    }

    /// The file the graph was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine running the graph: [`OnnxEngine::OnnxRuntime`] or [`OnnxEngine::Candle`]
    /// (what `auto` became).
    pub fn engine(&self) -> OnnxEngine {
        match self.graph {
            Graph::OnnxRuntime(_) => OnnxEngine::OnnxRuntime,
            Graph::Candle(_) => OnnxEngine::Candle,
        }
    }

    /// On candle-onnx, the op types the graph uses (before `Gemm` and `Constant` were
    /// rewritten), sorted; on ONNX Runtime, which reads the file itself, none.
    pub fn ops(&self) -> impl Iterator<Item = &str> {
        let ops = match &self.graph {
            Graph::Candle(g) => Some(g.ops.iter().map(String::as_str)),
            Graph::OnnxRuntime(_) => None,
        };
        ops.into_iter().flatten()
    }

    /// Runs the graph once on a one-row batch of zeros and checks its outputs.
    fn check(&self) -> Result<(), OnnxError> {
        let inputs: Vec<HostTensor> = self
            .signature
            .inputs
            .iter()
            .map(|spec| {
                let shape: Vec<usize> = spec
                    .shape
                    .iter()
                    .map(|&d| usize::try_from(d).unwrap_or(1))
                    .collect();
                let n = shape.iter().product();
                HostTensor {
                    name: spec.name.clone(),
                    shape,
                    data: zeros(spec.datatype, n),
                }
            })
            .collect();
        let prepared = self.prepare(inputs).map_err(|e| OnnxError::Check {
            message: e.to_string(),
        })?;
        self.forward(std::slice::from_ref(&prepared))
            .map_err(|e| OnnxError::Check {
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Runs the graph on one group of requests whose inputs agree past dim 0: one tensor per
    /// input, their rows concatenated. Returns the outputs in signature order, on the host,
    /// each checked to have `rows` rows and its declared rank.
    fn run_group(
        &self,
        group: &[Prepared],
        rows: usize,
    ) -> Result<Vec<(Vec<usize>, TensorData)>, ModelError> {
        let results = match &self.graph {
            Graph::OnnxRuntime(graph) => {
                // A group of one request is read in place; several are concatenated once.
                let joined: Vec<Option<TensorData>> = if group.len() == 1 {
                    vec![None; self.inputs.len()]
                } else {
                    self.inputs
                        .iter()
                        .enumerate()
                        .map(|(i, port)| {
                            concat(group.iter().map(|p| &p.inputs[i].data), port.datatype).map(Some)
                        })
                        .collect::<Result<_, _>>()?
                };
                let feeds: Vec<(&TensorData, Vec<usize>)> = joined
                    .iter()
                    .enumerate()
                    .map(|(i, data)| {
                        let first = &group[0].inputs[i];
                        let mut shape = first.shape.clone();
                        shape[0] = rows;
                        (data.as_ref().unwrap_or(&first.data), shape)
                    })
                    .collect();
                graph.run(&feeds, &self.outputs)?
            }
            Graph::Candle(graph) => graph.run(&self.inputs, &self.outputs, group, rows)?,
        };
        for ((shape, _), spec) in results.iter().zip(&self.signature.outputs) {
            if shape.first() != Some(&rows) {
                return Err(ModelError::BadBatch {
                    message: format!(
                        "output `{}` has shape {shape:?} for a batch of {rows} rows",
                        spec.name
                    ),
                });
            }
            if spec.shape.len() != shape.len() {
                return Err(ModelError::BadBatch {
                    message: format!(
                        "output `{}` has shape {shape:?}, the graph declares rank {}",
                        spec.name,
                        spec.shape.len()
                    ),
                });
            }
        }
        Ok(results)
    }
}

impl CandleGraph {
    /// candle-onnx's evaluation of one group (see [`OnnxModel::run_group`]).
    fn run(
        &self,
        inputs: &[Port],
        outputs: &[Port],
        group: &[Prepared],
        rows: usize,
    ) -> Result<Vec<(Vec<usize>, TensorData)>, ModelError> {
        let mut values = self.weights.clone();
        for (i, port) in inputs.iter().enumerate() {
            let first = &group[0].inputs[i];
            let mut shape = first.shape.clone();
            shape[0] = rows;
            let tensor = if group.len() == 1 {
                to_tensor(&first.data, port, &shape, &self.candle)?
            } else {
                let data = concat(group.iter().map(|p| &p.inputs[i].data), port.datatype)?;
                to_tensor(&data, port, &shape, &self.candle)?
            };
            values.insert(port.name.clone(), tensor);
        }
        let mut results = candle_onnx::simple_eval(&self.model, values)?;
        outputs
            .iter()
            .map(|port| {
                let t = results
                    .remove(&port.name)
                    .ok_or_else(|| ModelError::BadBatch {
                        message: format!("the graph gave no output `{}`", port.name),
                    })?;
                Ok((t.dims().to_vec(), to_host(&t, port)?))
            })
            .collect()
    }
}

impl Model for OnnxModel {
    fn kind(&self) -> &'static str {
        "onnx"
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
        for p in batch {
            let fits = p.inputs.len() == self.inputs.len()
                && p.inputs.iter().zip(&self.inputs).all(|(t, port)| {
                    t.name == port.name
                        && t.data.datatype() == port.datatype
                        && !t.shape.is_empty()
                        && t.shape.iter().product::<usize>() == t.data.len()
                });
            if !fits {
                return Err(ModelError::BadBatch {
                    message: "a request's inputs do not match the graph's signature".into(),
                });
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            // The longest run of requests whose inputs agree past the batch dimension.
            let first = &batch[start];
            let end = start
                + batch[start..]
                    .iter()
                    .take_while(|p| {
                        p.inputs
                            .iter()
                            .zip(&first.inputs)
                            .all(|(a, b)| a.shape[1..] == b.shape[1..])
                    })
                    .count();
            let group = &batch[start..end];
            let rows: usize = group.iter().map(|p| p.inputs[0].shape[0]).sum();
            let outputs = self.run_group(group, rows)?;
            if group.len() == 1 {
                // One request: its outputs as they are.
                answers.push(
                    self.outputs
                        .iter()
                        .zip(outputs)
                        .map(|(port, (shape, data))| HostTensor {
                            name: port.name.clone(),
                            shape,
                            data,
                        })
                        .collect(),
                );
                start = end;
                continue;
            }
            let mut offset = 0;
            for p in group {
                let r = p.inputs[0].shape[0];
                answers.push(
                    self.outputs
                        .iter()
                        .zip(&outputs)
                        .map(|(port, (shape, data))| {
                            let per_row: usize = shape[1..].iter().product();
                            let mut out_shape = shape.clone();
                            out_shape[0] = r;
                            HostTensor {
                                name: port.name.clone(),
                                shape: out_shape,
                                data: slice(data, offset * per_row, r * per_row),
                            }
                        })
                        .collect(),
                );
                offset += r;
            }
            start = end;
        }
        Ok(answers)
    }
}

/// Walks `graph` (and the subgraphs of its nodes' attributes): every op type into `ops`, and
/// those candle-onnx cannot run into `unsupported`.
fn collect_ops(graph: &GraphProto, ops: &mut BTreeSet<String>, unsupported: &mut BTreeSet<String>) {
    for node in &graph.node {
        let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        let name = if default_domain {
            node.op_type.clone()
        } else {
            format!("{}:{}", node.domain, node.op_type)
        };
        if !default_domain || !SUPPORTED_OPS.contains(&node.op_type.as_str()) {
            unsupported.insert(name.clone());
        }
        ops.insert(name);
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                collect_ops(g, ops, unsupported);
            }
            for g in &attr.graphs {
                collect_ops(g, ops, unsupported);
            }
        }
    }
}

/// An initializer as a CPU tensor of its declared shape.
fn weight(t: &TensorProto, name: &str) -> Result<Tensor, OnnxError> {
    let error = |message: String| OnnxError::Weight {
        name: name.to_owned(),
        message,
    };
    if t.data_location == DataLocation::External as i32 || !t.external_data.is_empty() {
        return Err(error(
            "stored outside the .onnx file (external data), which candle-onnx cannot read; \
             save the model with its weights inside"
                .into(),
        ));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| error(format!("negative dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let tensor = candle_onnx::eval::get_tensor(t, name).map_err(|e| error(e.to_string()))?;
    // candle-onnx reads INT32 data as a flat INT64 vector; give it its shape back.
    if tensor.elem_count() != dims.iter().product::<usize>() {
        return Err(error(format!(
            "{} values for dimensions {dims:?}",
            tensor.elem_count()
        )));
    }
    tensor.reshape(dims).map_err(|e| error(e.to_string()))
}

/// A `Constant` node's value as a CPU tensor; `None` for other nodes.
fn constant(node: &NodeProto) -> Result<Option<Tensor>, OnnxError> {
    if node.op_type != "Constant" || !(node.domain.is_empty() || node.domain == "ai.onnx") {
        return Ok(None);
    }
    let name = node.output.first().cloned().unwrap_or_default();
    let error = |message: String| OnnxError::Weight {
        name: name.clone(),
        message,
    };
    let Some(attr) = node.attribute.first() else {
        return Err(error("a Constant without a value".into()));
    };
    let cpu = &candle_core::Device::Cpu;
    let t = match (attr.name.as_str(), attr.r#type()) {
        ("value", AttributeType::Tensor) => match &attr.t {
            Some(t) => weight(t, &name)?,
            None => return Err(error("a Constant `value` without a tensor".into())),
        },
        ("value_float", _) => Tensor::new(attr.f, cpu).map_err(|e| error(e.to_string()))?,
        ("value_floats", _) => {
            Tensor::new(attr.floats.as_slice(), cpu).map_err(|e| error(e.to_string()))?
        }
        ("value_int", _) => Tensor::new(attr.i, cpu).map_err(|e| error(e.to_string()))?,
        ("value_ints", _) => {
            Tensor::new(attr.ints.as_slice(), cpu).map_err(|e| error(e.to_string()))?
        }
        (other, _) => {
            return Err(error(format!(
                "a Constant with `{other}`, which candle-onnx cannot read"
            )));
        }
    };
    Ok(Some(t))
}

/// Rewrites each `Gemm` (`Y = alpha · A' · B' + beta · C`, `A'` and `B'` optionally
/// transposed) into `MatMul` and `Add`: a `B` or `C` among the weights is transposed and
/// scaled once here; otherwise `Transpose` and `Mul` nodes do it at run time.
fn rewrite_gemms(
    nodes: Vec<NodeProto>,
    weights: &mut HashMap<String, Tensor>,
) -> Result<Vec<NodeProto>, OnnxError> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let is_gemm =
            node.op_type == "Gemm" && (node.domain.is_empty() || node.domain == "ai.onnx");
        if !is_gemm {
            out.push(node);
            continue;
        }
        let Some(y) = node.output.first().cloned() else {
            return Err(OnnxError::Check {
                message: format!("Gemm `{}` has no output", node.name),
            });
        };
        let error = |message: String| OnnxError::Weight {
            name: y.clone(),
            message,
        };
        let int = |name: &str, default: i64| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map_or(default, |a| a.i)
        };
        let float = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map_or(1.0, |a| a.f)
        };
        let (alpha, beta) = (float("alpha"), float("beta"));
        let (trans_a, trans_b) = (int("transA", 0) != 0, int("transB", 0) != 0);
        let input = |i: usize| node.input.get(i).filter(|s| !s.is_empty()).cloned();
        let (Some(a), Some(b)) = (input(0), input(1)) else {
            return Err(OnnxError::Check {
                message: format!("Gemm `{}` needs inputs A and B", node.name),
            });
        };
        let c = input(2);
        let fresh = |what: &str| format!("{y}::quiver_gemm_{what}");
        let base = node.name.clone();
        let a = if trans_a {
            transpose(&mut out, &base, a, &y)
        } else {
            a
        };
        // B' (transposed and times alpha when B is a weight).
        let (b, alpha_left) = match weights.get(&b) {
            Some(w) => {
                let mut w = if trans_b { w.t() } else { Ok(w.clone()) }
                    .and_then(|w| w.contiguous())
                    .map_err(|e| error(e.to_string()))?;
                if alpha != 1.0 {
                    w = w
                        .affine(f64::from(alpha), 0.0)
                        .map_err(|e| error(e.to_string()))?;
                }
                let name = fresh("b");
                weights.insert(name.clone(), w);
                (name, 1.0)
            }
            None if trans_b => (transpose(&mut out, &base, b, &y), alpha),
            None => (b, alpha),
        };
        let dtype = weights.get(&b).map_or(DType::F32, |w| w.dtype());
        let device = weights
            .get(&b)
            .map_or(candle_core::Device::Cpu, |w| w.device().clone());
        let scalar = |weights: &mut HashMap<String, Tensor>,
                      v: f32,
                      what: &str|
         -> Result<String, OnnxError> {
            let t = Tensor::new(v, &device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| error(e.to_string()))?;
            let name = fresh(what);
            weights.insert(name.clone(), t);
            Ok(name)
        };
        let scaled_c = match c {
            None => None,
            Some(c) => match weights.get(&c) {
                Some(w) => {
                    let w = if beta != 1.0 {
                        w.affine(f64::from(beta), 0.0)
                            .map_err(|e| error(e.to_string()))?
                    } else {
                        w.clone()
                    };
                    let name = fresh("c");
                    weights.insert(name.clone(), w);
                    Some(name)
                }
                None if beta != 1.0 => {
                    let s = scalar(weights, beta, "beta")?;
                    let name = fresh("beta_c");
                    push_node(&mut out, &base, "Mul", vec![c, s], name.clone());
                    Some(name)
                }
                None => Some(c),
            },
        };
        let alpha_name = if alpha_left != 1.0 {
            Some(scalar(weights, alpha_left, "alpha")?)
        } else {
            None
        };
        let product = if alpha_name.is_some() || scaled_c.is_some() {
            fresh("ab")
        } else {
            y.clone()
        };
        push_node(&mut out, &base, "MatMul", vec![a, b], product.clone());
        let product = match alpha_name {
            Some(s) => {
                let name = if scaled_c.is_some() {
                    fresh("alpha_ab")
                } else {
                    y.clone()
                };
                push_node(&mut out, &base, "Mul", vec![product, s], name.clone());
                name
            }
            None => product,
        };
        if let Some(c) = scaled_c {
            push_node(&mut out, &base, "Add", vec![product, c], y.clone());
        }
    }
    Ok(out)
}

/// Appends a node of the default domain with no attributes.
fn push_node(out: &mut Vec<NodeProto>, base: &str, op: &str, inputs: Vec<String>, output: String) {
    out.push(NodeProto {
        input: inputs,
        output: vec![output],
        name: format!("{base}::{op}"),
        op_type: op.to_owned(),
        ..NodeProto::default()
    });
}

/// Appends a `Transpose` of the last two dimensions of `x` (a 2-D `Gemm` operand); returns
/// its output's name.
fn transpose(out: &mut Vec<NodeProto>, base: &str, x: String, gemm_output: &str) -> String {
    let t = format!("{x}::quiver_t_{gemm_output}");
    push_node(out, base, "Transpose", vec![x], t.clone());
    t
}

/// A graph input or output as a port and a signature spec.
fn port(info: &ValueInfoProto, what: &'static str) -> Result<(Port, TensorSpec), OnnxError> {
    let error = |message: String| OnnxError::Signature {
        what,
        name: info.name.clone(),
        message,
    };
    let Some(type_proto::Value::TensorType(t)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(error(
            "not a tensor (sequences, maps and optionals are not served)".into(),
        ));
    };
    let elem = onnx::tensor_proto::DataType::try_from(t.elem_type)
        .map_err(|_| error(format!("unknown element type {}", t.elem_type)))?;
    use onnx::tensor_proto::DataType as E;
    let datatype = match elem {
        E::Float => DataType::Fp32,
        E::Double => DataType::Fp64,
        E::Int64 => DataType::Int64,
        E::Int32 => DataType::Int32,
        E::Uint8 => DataType::Uint8,
        E::Uint32 => DataType::Uint32,
        E::Bool => DataType::Bool,
        other => {
            return Err(error(format!(
                "element type {} is not served (FP32, FP64, INT64, INT32, UINT8, UINT32, BOOL)",
                other.as_str_name()
            )));
        }
    };
    let Some(shape) = &t.shape else {
        return Err(error(
            "no shape in the graph; Quiver needs at least the rank".into(),
        ));
    };
    let dims: Vec<i64> = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(dimension::Value::DimValue(v)) if v > 0 => v,
            _ => -1,
        })
        .collect();
    batch_port(&info.name, datatype, dims, what)
}

/// An input or output of `datatype` and `dims` (`-1` free) as a port and a signature spec, if
/// its first dimension is free (the batch); both engines' signatures are made here.
fn batch_port(
    name: &str,
    datatype: DataType,
    dims: Vec<i64>,
    what: &'static str,
) -> Result<(Port, TensorSpec), OnnxError> {
    let error = |message: String| OnnxError::Signature {
        what,
        name: name.to_owned(),
        message,
    };
    match dims.first() {
        None => {
            return Err(error(
                "a scalar; Quiver batches along the first dimension".into(),
            ));
        }
        Some(&d) if d >= 0 => {
            return Err(error(format!(
                "first dimension fixed at {d}; Quiver batches along the first dimension, so it \
                 must be free (export with a dynamic batch axis)"
            )));
        }
        Some(_) => {}
    }
    Ok((
        Port {
            name: name.to_owned(),
            datatype,
        },
        TensorSpec::new(name, datatype, dims),
    ))
}

fn set_elem_type(info: &mut ValueInfoProto, elem: onnx::tensor_proto::DataType) {
    if let Some(type_proto::Value::TensorType(t)) =
        info.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = elem as i32;
    }
}

fn zeros(datatype: DataType, n: usize) -> TensorData {
    // Every port type has zeros (see `port`).
    TensorData::zeros(datatype, n).unwrap_or_else(|| TensorData::F32(vec![0.0; n]))
}

/// The requests' data, one after the other.
fn concat<'a>(
    parts: impl Iterator<Item = &'a TensorData>,
    datatype: DataType,
) -> Result<TensorData, ModelError> {
    let mut out = zeros(datatype, 0);
    for part in parts {
        match (&mut out, part) {
            (TensorData::F32(o), TensorData::F32(p)) => o.extend_from_slice(p),
            (TensorData::F64(o), TensorData::F64(p)) => o.extend_from_slice(p),
            (TensorData::I64(o), TensorData::I64(p)) => o.extend_from_slice(p),
            (TensorData::I32(o), TensorData::I32(p)) => o.extend_from_slice(p),
            (TensorData::I16(o), TensorData::I16(p)) => o.extend_from_slice(p),
            (TensorData::I8(o), TensorData::I8(p)) => o.extend_from_slice(p),
            (TensorData::U8(o), TensorData::U8(p)) => o.extend_from_slice(p),
            (TensorData::U16(o), TensorData::U16(p)) => o.extend_from_slice(p),
            (TensorData::U32(o), TensorData::U32(p)) => o.extend_from_slice(p),
            (TensorData::U64(o), TensorData::U64(p)) => o.extend_from_slice(p),
            (TensorData::Bool(o), TensorData::Bool(p)) => o.extend_from_slice(p),
            _ => {
                return Err(ModelError::BadBatch {
                    message: format!("an input is not {}", datatype.as_str()),
                });
            }
        }
    }
    Ok(out)
}

/// Host data as a tensor of the port's candle type on `device`.
fn to_tensor(
    data: &TensorData,
    port: &Port,
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor, ModelError> {
    let t = match data {
        TensorData::F32(v) => Tensor::from_slice(v, shape, device)?,
        TensorData::F64(v) => Tensor::from_slice(v, shape, device)?,
        TensorData::I64(v) => Tensor::from_slice(v, shape, device)?,
        TensorData::I32(v) => {
            let wide: Vec<i64> = v.iter().map(|&x| i64::from(x)).collect();
            Tensor::from_vec(wide, shape, device)?
        }
        TensorData::U8(v) => Tensor::from_slice(v, shape, device)?,
        TensorData::U32(v) => Tensor::from_slice(v, shape, device)?,
        TensorData::Bool(v) => {
            let bytes: Vec<u8> = v.iter().map(|&b| u8::from(b)).collect();
            Tensor::from_vec(bytes, shape, device)?
        }
        _ => {
            return Err(ModelError::BadBatch {
                message: format!("input `{}` has an unserved datatype", port.name),
            });
        }
    };
    Ok(t)
}

/// An output tensor as host data of the port's wire type.
fn to_host(t: &Tensor, port: &Port) -> Result<TensorData, ModelError> {
    let t = t.flatten_all()?;
    let data = match port.datatype {
        DataType::Fp32 => TensorData::F32(t.to_dtype(DType::F32)?.to_vec1()?),
        DataType::Fp64 => TensorData::F64(t.to_dtype(DType::F64)?.to_vec1()?),
        DataType::Int64 => TensorData::I64(t.to_dtype(DType::I64)?.to_vec1()?),
        DataType::Int32 => {
            let wide: Vec<i64> = t.to_dtype(DType::I64)?.to_vec1()?;
            TensorData::I32(wide.into_iter().map(|x| x as i32).collect())
        }
        DataType::Uint8 => TensorData::U8(t.to_dtype(DType::U8)?.to_vec1()?),
        DataType::Uint32 => TensorData::U32(t.to_dtype(DType::U32)?.to_vec1()?),
        DataType::Bool => {
            let bytes: Vec<u8> = t.to_dtype(DType::U8)?.to_vec1()?;
            TensorData::Bool(bytes.into_iter().map(|b| b != 0).collect())
        }
        other => {
            return Err(ModelError::BadBatch {
                message: format!(
                    "output `{}` has unserved datatype {}",
                    port.name,
                    other.as_str()
                ),
            });
        }
    };
    Ok(data)
}

/// `len` elements of `data` from `start`.
fn slice(data: &TensorData, start: usize, len: usize) -> TensorData {
    let r = start..start + len;
    match data {
        TensorData::F32(v) => TensorData::F32(v[r].to_vec()),
        TensorData::F64(v) => TensorData::F64(v[r].to_vec()),
        TensorData::I64(v) => TensorData::I64(v[r].to_vec()),
        TensorData::I32(v) => TensorData::I32(v[r].to_vec()),
        TensorData::I16(v) => TensorData::I16(v[r].to_vec()),
        TensorData::I8(v) => TensorData::I8(v[r].to_vec()),
        TensorData::U8(v) => TensorData::U8(v[r].to_vec()),
        TensorData::U16(v) => TensorData::U16(v[r].to_vec()),
        TensorData::U32(v) => TensorData::U32(v[r].to_vec()),
        TensorData::U64(v) => TensorData::U64(v[r].to_vec()),
        TensorData::Bool(v) => TensorData::Bool(v[r].to_vec()),
        // Neither engine's outputs are BYTES (nor of a type added later).
        _ => TensorData::F32(Vec::new()),
    }
}
