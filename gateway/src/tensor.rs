//! Conversion between the Open Inference Protocol's protobuf messages and
//! Quiver's [`InferRequest`] / [`InferResponse`].
//!
//! Inputs may come as `raw_input_contents` (the native protocol's way, and
//! tritonclient's over gRPC) or as typed `contents`; outputs always go back
//! as `raw_output_contents`.

use std::collections::HashMap;
use std::time::Duration;

use quiver_kernels::{DataType, HostTensor, TensorData};

use crate::error::GatewayError;
use crate::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor,
};
use crate::request::{InferRequest, InferResponse, params};

/// Decodes a protobuf request into the gateway's request type.
pub fn request_from_proto(req: ModelInferRequest) -> Result<InferRequest, GatewayError> {
    let ModelInferRequest {
        model_name,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = req;
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(GatewayError::InvalidArgument(format!(
            "{} raw_input_contents for {} inputs: send one per input or none",
            raw_input_contents.len(),
            inputs.len()
        )));
    }
    let mut tensors = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let raw = raw_input_contents.get(i);
        tensors.push(input_tensor(input, raw.map(|b| b.as_ref()))?);
    }
    let (priority, timeout) = schedule_policy(&parameters)?;
    Ok(InferRequest {
        model: model_name,
        id,
        inputs: tensors,
        outputs: outputs.into_iter().map(|o| o.name).collect(),
        priority,
        timeout,
    })
}

/// Reads Triton's schedule-policy parameters `priority` and `timeout` (µs).
pub fn schedule_policy(
    parameters: &HashMap<String, InferParameter>,
) -> Result<(u32, Option<Duration>), GatewayError> {
    let int = |name: &str| -> Result<Option<i64>, GatewayError> {
        match parameters
            .get(name)
            .and_then(|p| p.parameter_choice.as_ref())
        {
            None => Ok(None),
            Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v)),
            Some(ParameterChoice::Uint64Param(v)) => i64::try_from(*v).map(Some).map_err(|_| {
                GatewayError::InvalidArgument(format!("parameter '{name}' is out of range"))
            }),
            Some(_) => Err(GatewayError::InvalidArgument(format!(
                "parameter '{name}' must be an integer"
            ))),
        }
    };
    let priority = match int(params::PRIORITY)? {
        None => 0,
        Some(p) => u32::try_from(p).map_err(|_| {
            GatewayError::InvalidArgument(format!("priority must be >= 0, got {p}"))
        })?,
    };
    let timeout = match int(params::TIMEOUT)? {
        None | Some(0) => None,
        Some(us) if us < 0 => {
            return Err(GatewayError::InvalidArgument(format!(
                "timeout must be >= 0 microseconds, got {us}"
            )));
        }
        Some(us) => Some(Duration::from_micros(us.unsigned_abs())),
    };
    Ok((priority, timeout))
}

fn input_tensor(input: InferInputTensor, raw: Option<&[u8]>) -> Result<HostTensor, GatewayError> {
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        GatewayError::InvalidArgument(format!(
            "input '{}' has unknown datatype '{}'",
            input.name, input.datatype
        ))
    })?;
    if let Some(raw) = raw {
        return Ok(HostTensor::from_raw(
            input.name,
            datatype,
            &input.shape,
            raw,
        )?);
    }
    let shape = dims(&input.name, &input.shape)?;
    let contents = input.contents.unwrap_or_default();
    let data = typed_contents(&input.name, datatype, contents)?;
    Ok(HostTensor::new(input.name, shape, data)?)
}

fn dims(name: &str, shape: &[i64]) -> Result<Vec<usize>, GatewayError> {
    shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                GatewayError::InvalidArgument(format!(
                    "input '{name}' has a negative dimension {d}"
                ))
            })
        })
        .collect()
}

fn typed_contents(
    name: &str,
    datatype: DataType,
    c: InferTensorContents,
) -> Result<TensorData, GatewayError> {
    let narrow = |what: &str| {
        GatewayError::InvalidArgument(format!("input '{name}': a value does not fit {what}"))
    };
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::Uint8 => TensorData::U8(
            c.uint_contents
                .into_iter()
                .map(u8::try_from)
                .collect::<Result<_, _>>()
                .map_err(|_| narrow("UINT8"))?,
        ),
        DataType::Uint16 => TensorData::U16(
            c.uint_contents
                .into_iter()
                .map(u16::try_from)
                .collect::<Result<_, _>>()
                .map_err(|_| narrow("UINT16"))?,
        ),
        DataType::Uint32 => TensorData::U32(c.uint_contents),
        DataType::Uint64 => TensorData::U64(c.uint64_contents),
        DataType::Int8 => TensorData::I8(
            c.int_contents
                .into_iter()
                .map(i8::try_from)
                .collect::<Result<_, _>>()
                .map_err(|_| narrow("INT8"))?,
        ),
        DataType::Int16 => TensorData::I16(
            c.int_contents
                .into_iter()
                .map(i16::try_from)
                .collect::<Result<_, _>>()
                .map_err(|_| narrow("INT16"))?,
        ),
        DataType::Int32 => TensorData::I32(c.int_contents),
        DataType::Int64 => TensorData::I64(c.int64_contents),
        DataType::Fp32 => TensorData::F32(c.fp32_contents),
        DataType::Fp64 => TensorData::F64(c.fp64_contents),
        DataType::Bytes => {
            TensorData::Bytes(c.bytes_contents.into_iter().map(|b| b.to_vec()).collect())
        }
        other => {
            return Err(GatewayError::InvalidArgument(format!(
                "input '{name}': datatype {} is not supported in typed contents",
                other.as_str()
            )));
        }
    })
}

/// Encodes a computed answer, outputs in `raw_output_contents`, with the
/// batch it was computed in as response parameters.
pub fn response_to_proto(resp: InferResponse) -> ModelInferResponse {
    let parameters = served_parameters(&resp.served);
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for t in resp.outputs {
        outputs.push(InferOutputTensor {
            name: t.name.clone(),
            datatype: t.datatype().as_str().into(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(t.to_raw().into());
    }
    ModelInferResponse {
        model_name: resp.model,
        model_version: "1".into(),
        id: resp.id,
        parameters,
        outputs,
        raw_output_contents: raw,
    }
}

/// The response parameters that say how a request was served (batch,
/// queue and compute time, dispatch reason, path); every front end sends
/// them.
pub fn served_parameters(served: &crate::request::Served) -> HashMap<String, InferParameter> {
    use crate::request::Served;
    let int = |v: i64| InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    };
    let string = |v: &str| InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(v.into())),
    };
    let mut parameters = HashMap::new();
    match served {
        Served::Local(batch) => {
            parameters.insert(params::BATCH_SIZE.into(), int(i64::from(batch.batch_size)));
            parameters.insert(params::BATCH_ROWS.into(), int(i64::from(batch.batch_rows)));
            parameters.insert(
                params::QUEUE_TIME_US.into(),
                int(i64::try_from(batch.queue_time.as_micros()).unwrap_or(i64::MAX)),
            );
            parameters.insert(
                params::COMPUTE_TIME_US.into(),
                int(i64::try_from(batch.compute_time.as_micros()).unwrap_or(i64::MAX)),
            );
            parameters.insert(
                params::DISPATCH_REASON.into(),
                string(batch.reason.as_str()),
            );
        }
        Served::Upstream(up) => {
            // A Quiver worker's batch parameters pass through, so that the
            // client sees the batch its request was computed in.
            for name in [
                params::BATCH_SIZE,
                params::BATCH_ROWS,
                params::QUEUE_TIME_US,
                params::COMPUTE_TIME_US,
                params::DISPATCH_REASON,
            ] {
                if let Some(p) = up.parameters.get(name) {
                    parameters.insert(name.into(), p.clone());
                }
            }
            parameters.insert(params::UPSTREAM.into(), string(&up.endpoint));
            parameters.insert(params::OVERFLOW_REASON.into(), string(up.reason.as_str()));
        }
    }
    parameters.insert(params::PATH.into(), string(served.path()));
    parameters
}

/// Decodes the outputs of a protobuf response (raw or typed) into tensors;
/// used by the client.
pub fn outputs_from_proto(resp: &ModelInferResponse) -> Result<Vec<HostTensor>, GatewayError> {
    let mut out = Vec::with_capacity(resp.outputs.len());
    for (i, o) in resp.outputs.iter().enumerate() {
        let datatype = DataType::parse(&o.datatype).ok_or_else(|| {
            GatewayError::InvalidArgument(format!(
                "output '{}' has unknown datatype '{}'",
                o.name, o.datatype
            ))
        })?;
        let t = match resp.raw_output_contents.get(i) {
            Some(raw) => HostTensor::from_raw(o.name.clone(), datatype, &o.shape, raw)?,
            None => {
                let shape = dims(&o.name, &o.shape)?;
                let data =
                    typed_contents(&o.name, datatype, o.contents.clone().unwrap_or_default())?;
                HostTensor::new(o.name.clone(), shape, data)?
            }
        };
        out.push(t);
    }
    Ok(out)
}

/// Encodes tensors as a request with `raw_input_contents`; used by the client.
pub fn request_to_proto(
    model: &str,
    id: &str,
    inputs: &[HostTensor],
    parameters: HashMap<String, InferParameter>,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        model_version: String::new(),
        id: id.into(),
        parameters,
        inputs: inputs
            .iter()
            .map(|t| InferInputTensor {
                name: t.name.clone(),
                datatype: t.datatype().as_str().into(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                parameters: HashMap::new(),
                contents: None,
            })
            .collect(),
        outputs: Vec::new(),
        raw_input_contents: inputs.iter().map(|t| t.to_raw().into()).collect(),
    }
}

/// An int64 request parameter.
pub fn int_param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

/// Reads an int64 (or uint64) parameter of a response.
pub fn response_int(resp: &ModelInferResponse, name: &str) -> Option<i64> {
    match resp.parameters.get(name)?.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(v) => Some(*v),
        ParameterChoice::Uint64Param(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// Reads a string parameter of a response.
pub fn response_str<'a>(resp: &'a ModelInferResponse, name: &str) -> Option<&'a str> {
    match resp.parameters.get(name)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(v) => Some(v),
        _ => None,
    }
}
