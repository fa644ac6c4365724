//! The ONNX Runtime engine of the `onnx` family ([`super::OnnxEngine::OnnxRuntime`]): a
//! session built once at load from the file, through the `ort` crate with its shared library
//! opened at run time (`load-dynamic`), so nothing of ONNX Runtime is downloaded or linked at
//! build time.
//!
//! The library is [`library`]: `ORT_DYLIB_PATH` when set (ort's own variable), else
//! `libonnxruntime.so` on the loader's search path. It is opened once per process, before any
//! other ONNX Runtime call (ort panics on its first call when the library cannot be opened, so
//! nothing else reaches ort first); a failure is [`OnnxError::RuntimeUnavailable`], tried again
//! at the next load. Once open, the library and its one environment stay for the process.
//!
//! A session runs with graph optimisations at `all`, `rayon::current_num_threads()` intra-op
//! threads (the CPU pool Quiver's other CPU models use: `RAYON_NUM_THREADS`, else the cores)
//! and one inter-op thread. Its metadata gives the signature: the graph's inputs (ONNX Runtime
//! leaves out initializers) and outputs with their element types and shapes, a symbolic
//! dimension free (`-1`), as the candle-onnx engine reads them from the protobuf.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::{OnnxError, Port, batch_port};
use crate::error::ModelError;
use crate::model::TensorSpec;
use crate::tensor::{DataType, TensorData};

/// The ONNX Runtime release Quiver is tested with (PyPI's wheel; `scripts/make-onnx`).
pub const ONNXRUNTIME_VERSION: &str = "1.31.1";

/// The process's ONNX Runtime environment, once the library is open.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// The ONNX Runtime library that [`environment`] opens: `ORT_DYLIB_PATH` when set and not
/// empty, else `libonnxruntime.so` (the platform's name for it) on the loader's search path.
pub fn library() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(format!(
            "{}onnxruntime{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
    }
}

/// Whether ONNX Runtime's library is open in this process (by an earlier load).
pub fn is_loaded() -> bool {
    ENVIRONMENT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some()
}

/// The process's ONNX Runtime environment: opens [`library`] and builds the environment the
/// first time, then returns the same one. A library that cannot be opened (missing, not ONNX
/// Runtime, older than the C API 1.17 that ort needs) is [`OnnxError::RuntimeUnavailable`],
/// never a panic.
pub(super) fn environment() -> Result<Environment, OnnxError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let lib = library();
    let unavailable = |message: String| OnnxError::RuntimeUnavailable {
        library: lib.clone(),
        message,
    };
    // `init_from` opens the library and checks its version; it returns errors, but ort's own
    // path resolution may panic on a broken host (no current executable): caught, so that a
    // load fails with a message instead.
    let opened = std::panic::catch_unwind(|| ort::init_from(&lib))
        .map_err(|_| unavailable("opening it panicked".into()))?
        .map_err(|e| unavailable(load_message(&e)))?;
    let env = opened
        .with_name("quiver")
        .with_telemetry(false)
        .build()
        .map_err(|e| unavailable(e.to_string()))?;
    tracing::info!(
        library = %lib.display(),
        build = ort::info(),
        "ONNX Runtime loaded for kind = \"onnx\" on the cpu"
    );
    *slot = Some(env.clone());
    Ok(env)
}

/// ort's message, with the loader's own reason (`dlerror`: no such file, wrong ELF class, a
/// missing dependency), which ort's `Display` leaves out.
fn load_message(e: &ort::LoadDynamicError) -> String {
    use std::error::Error as _;
    match e {
        ort::LoadDynamicError::Dlopen { error, .. } => match error.source() {
            Some(why) => why.to_string(),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// A graph in an ONNX Runtime session.
pub(super) struct OrtGraph {
    /// `Session::run` takes `&mut self` (ONNX Runtime's allocators are not all thread safe);
    /// one batch runs at a time, as on the device thread anyway.
    session: Mutex<Session>,
}

impl std::fmt::Debug for OrtGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtGraph").finish_non_exhaustive()
    }
}

/// What [`load`] gives: the session and the graph's inputs and outputs, in its order.
pub(super) struct Loaded {
    pub(super) graph: OrtGraph,
    pub(super) inputs: Vec<(Port, TensorSpec)>,
    pub(super) outputs: Vec<(Port, TensorSpec)>,
}

/// Builds a session on `file` (already known to be readable) and reads its signature.
pub(super) fn load(file: &Path, env: &Environment) -> Result<Loaded, OnnxError> {
    let session = Session::builder(env)
        .map_err(refused)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(refused)?
        .with_intra_threads(rayon::current_num_threads().max(1))
        .map_err(refused)?
        .with_inter_threads(1)
        .map_err(refused)?
        .commit_from_file(file)
        .map_err(refused)?;
    let ports = |outlets: &[ort::value::Outlet], what: &'static str| {
        outlets
            .iter()
            .map(|o| port(o.name(), o.dtype(), what))
            .collect::<Result<Vec<_>, _>>()
    };
    let inputs = ports(session.inputs(), "input")?;
    let outputs = ports(session.outputs(), "output")?;
    Ok(Loaded {
        graph: OrtGraph {
            session: Mutex::new(session),
        },
        inputs,
        outputs,
    })
}

/// ONNX Runtime's refusal of a file: not ONNX ([`OnnxError::Parse`]), or a graph it cannot run
/// ([`OnnxError::Runtime`]).
fn refused<R>(e: ort::Error<R>) -> OnnxError {
    match e.code() {
        ort::ErrorCode::InvalidProtobuf => OnnxError::Parse {
            message: e.message().to_owned(),
        },
        _ => OnnxError::Runtime {
            message: e.message().to_owned(),
        },
    }
}

/// A session input or output as a port and a signature spec.
fn port(
    name: &str,
    dtype: &ValueType,
    what: &'static str,
) -> Result<(Port, TensorSpec), OnnxError> {
    let error = |message: String| OnnxError::Signature {
        what,
        name: name.to_owned(),
        message,
    };
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(error(
            "not a tensor (sequences, maps and optionals are not served)".into(),
        ));
    };
    use TensorElementType as E;
    let datatype = match ty {
        E::Float32 => DataType::Fp32,
        E::Float64 => DataType::Fp64,
        E::Int64 => DataType::Int64,
        E::Int32 => DataType::Int32,
        E::Int16 => DataType::Int16,
        E::Int8 => DataType::Int8,
        E::Uint8 => DataType::Uint8,
        E::Uint16 => DataType::Uint16,
        E::Uint32 => DataType::Uint32,
        E::Uint64 => DataType::Uint64,
        E::Bool => DataType::Bool,
        other => {
            return Err(error(format!(
                "element type {other:?} is not served (FP32, FP64, INT8-64, UINT8-64, BOOL)"
            )));
        }
    };
    let dims: Vec<i64> = shape.iter().map(|&d| if d > 0 { d } else { -1 }).collect();
    batch_port(name, datatype, dims, what)
}

impl OrtGraph {
    /// Runs the session on one tensor per input (in the session's order, of the ports'
    /// types, `shapes[i]` each); returns the outputs in the ports' order, on the host.
    pub(super) fn run(
        &self,
        inputs: &[(&TensorData, Vec<usize>)],
        outputs: &[Port],
    ) -> Result<Vec<(Vec<usize>, TensorData)>, ModelError> {
        let values = inputs
            .iter()
            .map(|(data, shape)| view(data, shape.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let results = session.run(values.as_slice()).map_err(failed)?;
        if results.len() != outputs.len() {
            return Err(ModelError::BadBatch {
                message: format!(
                    "the session gave {} outputs, the graph declares {}",
                    results.len(),
                    outputs.len()
                ),
            });
        }
        results
            .values()
            .zip(outputs)
            .map(|(value, port)| to_host(&value, port))
            .collect()
    }
}

fn failed(e: ort::Error) -> ModelError {
    ModelError::OnnxRuntime {
        message: e.to_string(),
    }
}

/// Host data as a session input that borrows it (no copy).
fn view(data: &TensorData, shape: Vec<usize>) -> Result<SessionInputValue<'_>, ModelError> {
    Ok(match data {
        TensorData::F32(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::F64(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::I64(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::I32(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::I16(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::I8(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::U8(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::U16(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::U32(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::U64(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        TensorData::Bool(v) => TensorRef::from_array_view((shape, v.as_slice()))
            .map_err(failed)?
            .into(),
        _ => {
            return Err(ModelError::BadBatch {
                message: format!("{} inputs are not served", data.datatype().as_str()),
            });
        }
    })
}

/// A session output as host data of the port's type (one copy, out of ONNX Runtime's memory).
fn to_host(value: &DynValue, port: &Port) -> Result<(Vec<usize>, TensorData), ModelError> {
    fn take<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug>(
        value: &DynValue,
    ) -> Result<(Vec<usize>, Vec<T>), ModelError> {
        let (shape, data) = value.try_extract_tensor::<T>().map_err(failed)?;
        let shape = shape
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(0))
            .collect();
        Ok((shape, data.to_vec()))
    }
    Ok(match port.datatype {
        DataType::Fp32 => take(value).map(|(s, v)| (s, TensorData::F32(v)))?,
        DataType::Fp64 => take(value).map(|(s, v)| (s, TensorData::F64(v)))?,
        DataType::Int64 => take(value).map(|(s, v)| (s, TensorData::I64(v)))?,
        DataType::Int32 => take(value).map(|(s, v)| (s, TensorData::I32(v)))?,
        DataType::Int16 => take(value).map(|(s, v)| (s, TensorData::I16(v)))?,
        DataType::Int8 => take(value).map(|(s, v)| (s, TensorData::I8(v)))?,
        DataType::Uint8 => take(value).map(|(s, v)| (s, TensorData::U8(v)))?,
        DataType::Uint16 => take(value).map(|(s, v)| (s, TensorData::U16(v)))?,
        DataType::Uint32 => take(value).map(|(s, v)| (s, TensorData::U32(v)))?,
        DataType::Uint64 => take(value).map(|(s, v)| (s, TensorData::U64(v)))?,
        DataType::Bool => take(value).map(|(s, v)| (s, TensorData::Bool(v)))?,
        other => {
            return Err(ModelError::BadBatch {
                message: format!(
                    "output `{}` has unserved datatype {}",
                    port.name,
                    other.as_str()
                ),
            });
        }
    })
}
