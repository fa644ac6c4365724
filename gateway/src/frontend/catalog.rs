//! What every front end says about the server and its models: server
//! metadata, model metadata, Triton's model configuration and statistics.
//!
//! Built once here as the protobuf messages of `grpc_service.proto`; the
//! gRPC front end sends them as they are, and the REST front ends (HTTP and
//! HTTP/3) write them as the JSON of KServe v2 and Triton's HTTP extensions.

use std::sync::Arc;

use quiver_kernels::DataType;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::proto::inference::{
    DataType as ConfigDataType, InferStatistics, ModelConfig, ModelDynamicBatching, ModelInput,
    ModelInstanceGroup, ModelMetadataResponse, ModelOutput, ModelQueuePolicy, ModelStatistics,
    StatisticDuration, model_config::SchedulingChoice, model_instance_group::Kind,
    model_metadata_response::TensorMetadata,
};
use crate::router::{ModelEntry, Router};

/// The server's name in server metadata.
pub const SERVER_NAME: &str = "quiver";

/// The protocol extensions really implemented, as Triton names them:
/// binary tensors over HTTP, `GET /v2/models/{m}/config` and gRPC
/// `ModelConfig`, the model repository (index, load, unload), the `priority` and `timeout` request parameters, and model
/// statistics (`GET /v2/models/{m}/stats`, gRPC `ModelStatistics`).
pub const EXTENSIONS: [&str; 5] = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "schedule_policy",
    "statistics",
];

/// The model called `name` at `version` (empty: the newest serving).
pub fn find(router: &Router, name: &str, version: &str) -> Result<Arc<ModelEntry>, GatewayError> {
    router.registry().get(name, version)
}

/// KServe v2 model metadata: shapes with the batch dimension (`-1`).
/// `versions` lists the versions of the model serving now.
pub fn metadata(router: &Router, entry: &ModelEntry) -> ModelMetadataResponse {
    let sig = entry.model.signature();
    let tensor = |s: &quiver_kernels::TensorSpec| TensorMetadata {
        name: s.name.clone(),
        datatype: s.datatype.as_str().into(),
        shape: s.shape.clone(),
    };
    ModelMetadataResponse {
        name: entry.name.clone(),
        versions: router
            .registry()
            .snapshot()
            .versions(&entry.name)
            .map(|v| v.keys().map(u64::to_string).collect())
            .unwrap_or_else(|| vec![entry.version_str()]),
        platform: platform(entry),
        inputs: sig.inputs.iter().map(tensor).collect(),
        outputs: sig.outputs.iter().map(tensor).collect(),
    }
}

fn platform(entry: &ModelEntry) -> String {
    format!("quiver_{}", entry.model.kind())
}

/// Triton's model configuration. Quiver models take `[n, ...]` inputs with
/// `1 <= n <= max_batch_size` rows, which is Triton's batching contract: so
/// `max_batch_size` is the model's, and `dims` leave out the batch
/// dimension. The dynamic batcher's knobs are reported as configured.
pub fn model_config(entry: &ModelEntry) -> ModelConfig {
    let sig = entry.model.signature();
    let dims = |shape: &[i64]| shape.iter().skip(1).copied().collect::<Vec<i64>>();
    let c = &entry.config;
    ModelConfig {
        name: entry.name.clone(),
        platform: platform(entry),
        backend: "quiver".into(),
        max_batch_size: i32::try_from(c.max_batch_size).unwrap_or(i32::MAX),
        input: sig
            .inputs
            .iter()
            .map(|s| ModelInput {
                name: s.name.clone(),
                data_type: config_datatype(s.datatype) as i32,
                dims: dims(&s.shape),
                ..Default::default()
            })
            .collect(),
        output: sig
            .outputs
            .iter()
            .map(|s| ModelOutput {
                name: s.name.clone(),
                data_type: config_datatype(s.datatype) as i32,
                dims: dims(&s.shape),
                ..Default::default()
            })
            .collect(),
        // One group per device, as Triton lists one per GPU.
        instance_group: entry
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let gpu = r.model.device().cuda_ordinal();
                ModelInstanceGroup {
                    name: format!("{}_{i}", entry.name),
                    count: 1,
                    gpus: gpu
                        .map(|g| vec![i32::try_from(g).unwrap_or(i32::MAX)])
                        .unwrap_or_default(),
                    kind: if gpu.is_some() { Kind::Gpu } else { Kind::Cpu } as i32,
                }
            })
            .collect(),
        scheduling_choice: Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            preferred_batch_size: Vec::new(),
            max_queue_delay_microseconds: u64::try_from(c.max_queue_delay.as_micros())
                .unwrap_or(u64::MAX),
            preserve_ordering: false,
            priority_levels: u64::from(c.priority_levels),
            default_priority_level: u64::from(c.priority_levels),
            default_queue_policy: Some(ModelQueuePolicy {
                timeout_action: 0,
                default_timeout_microseconds: u64::try_from(c.default_timeout.as_micros())
                    .unwrap_or(u64::MAX),
                allow_timeout_override: true,
                max_queue_size: c.queue_capacity,
            }),
        })),
        parameters: Default::default(),
    }
}

/// Triton's `TYPE_*` of a KServe datatype.
pub fn config_datatype(d: DataType) -> ConfigDataType {
    match d {
        DataType::Bool => ConfigDataType::TypeBool,
        DataType::Uint8 => ConfigDataType::TypeUint8,
        DataType::Uint16 => ConfigDataType::TypeUint16,
        DataType::Uint32 => ConfigDataType::TypeUint32,
        DataType::Uint64 => ConfigDataType::TypeUint64,
        DataType::Int8 => ConfigDataType::TypeInt8,
        DataType::Int16 => ConfigDataType::TypeInt16,
        DataType::Int32 => ConfigDataType::TypeInt32,
        DataType::Int64 => ConfigDataType::TypeInt64,
        DataType::Fp32 => ConfigDataType::TypeFp32,
        DataType::Fp64 => ConfigDataType::TypeFp64,
        DataType::Bytes => ConfigDataType::TypeString,
        #[allow(unreachable_patterns)]
        _ => ConfigDataType::TypeInvalid,
    }
}

/// Triton's model statistics, from the gateway's metrics: `success` is the
/// requests answered ok with their total time, `queue` the time from
/// admission to dispatch, `compute_infer` the batches' device time (one per
/// batch), `compute_input` and `compute_output` the same count with no time
/// of their own.
pub fn statistics(entry: &ModelEntry, metrics: &Metrics) -> ModelStatistics {
    let labels = entry.labels();
    let duration = |snap: crate::metrics::LatencySnapshot| StatisticDuration {
        count: snap.count,
        ns: (snap.sum * 1e9) as u64,
    };
    let success = metrics.request_seconds.get_or_create(&labels).snapshot();
    let queue = metrics.queue_seconds.get_or_create(&labels).snapshot();
    let compute = metrics.compute_seconds.get_or_create(&labels).snapshot();
    let executions = compute.count;
    ModelStatistics {
        name: entry.name.clone(),
        version: entry.version_str(),
        last_inference: 0,
        inference_count: entry
            .replicas
            .iter()
            .map(|r| {
                metrics
                    .computed
                    .get_or_create(&crate::metrics::DeviceLabels {
                        model: labels.model.clone(),
                        version: labels.version.clone(),
                        device: r.device.to_string(),
                    })
                    .get()
            })
            .sum(),
        execution_count: executions,
        inference_stats: Some(InferStatistics {
            success: Some(duration(success)),
            queue: Some(duration(queue)),
            // Quiver has no separate input and output copy phases: the
            // device time holds them. The counts agree, as clients (such
            // as perf_analyzer) check.
            compute_input: Some(StatisticDuration {
                count: executions,
                ns: 0,
            }),
            compute_infer: Some(duration(compute)),
            compute_output: Some(StatisticDuration {
                count: executions,
                ns: 0,
            }),
            ..Default::default()
        }),
        batch_stats: Vec::new(),
    }
}

/// Server metadata as KServe v2 JSON.
pub fn server_metadata_json() -> Value {
    json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    })
}

/// Model metadata as KServe v2 JSON.
pub fn metadata_json(m: &ModelMetadataResponse) -> Value {
    let tensors = |ts: &[TensorMetadata]| {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    json!({
        "name": m.name,
        "versions": m.versions,
        "platform": m.platform,
        "inputs": tensors(&m.inputs),
        "outputs": tensors(&m.outputs),
    })
}

fn type_name(t: i32) -> &'static str {
    ConfigDataType::try_from(t)
        .map(|d| d.as_str_name())
        .unwrap_or("TYPE_INVALID")
}

/// Triton's model configuration as its HTTP extension writes it (protobuf
/// field names, enums by name, numbers as numbers).
pub fn model_config_json(c: &ModelConfig) -> Value {
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| json!({
            "name": i.name,
            "data_type": type_name(i.data_type),
            "format": "FORMAT_NONE",
            "dims": i.dims,
            "is_shape_tensor": false,
            "allow_ragged_batch": false,
            "optional": false,
        })).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| json!({
            "name": o.name,
            "data_type": type_name(o.data_type),
            "dims": o.dims,
            "label_filename": "",
            "is_shape_tensor": false,
        })).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "kind": Kind::try_from(g.kind).map(|k| k.as_str_name()).unwrap_or("KIND_AUTO"),
            "count": g.count,
            "gpus": g.gpus,
        })).collect::<Vec<_>>(),
        "parameters": {},
    });
    if let Some(SchedulingChoice::DynamicBatching(d)) = &c.scheduling_choice {
        let policy = d.default_queue_policy.unwrap_or_default();
        let dynamic_batching = json!({
            "preferred_batch_size": d.preferred_batch_size,
            "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
            "preserve_ordering": d.preserve_ordering,
            "priority_levels": d.priority_levels,
            "default_priority_level": d.default_priority_level,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": policy.default_timeout_microseconds,
                "allow_timeout_override": policy.allow_timeout_override,
                "max_queue_size": policy.max_queue_size,
            },
        });
        if let Some(object) = v.as_object_mut() {
            object.insert("dynamic_batching".into(), dynamic_batching);
        }
    }
    v
}

/// Model statistics as Triton's HTTP extension writes them.
pub fn statistics_json(stats: &[ModelStatistics]) -> Value {
    let d = |s: &Option<StatisticDuration>| {
        let s = s.unwrap_or_default();
        json!({"count": s.count, "ns": s.ns})
    };
    json!({
        "model_stats": stats.iter().map(|m| {
            let i = m.inference_stats.unwrap_or_default();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(&i.success),
                    "fail": d(&i.fail),
                    "queue": d(&i.queue),
                    "compute_input": d(&i.compute_input),
                    "compute_infer": d(&i.compute_infer),
                    "compute_output": d(&i.compute_output),
                    "cache_hit": d(&i.cache_hit),
                    "cache_miss": d(&i.cache_miss),
                },
                "batch_stats": [],
            })
        }).collect::<Vec<_>>(),
    })
}
