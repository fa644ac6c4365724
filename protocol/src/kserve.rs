//! The Open Inference Protocol's protobuf messages (KServe v2) to and from
//! [`HostTensor`]s.
//!
//! Inputs may come as `raw_input_contents` (the native protocol's way, and
//! tritonclient's over gRPC) or as typed `contents`; outputs always go back
//! as `raw_output_contents`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use crate::error::DecodeError;
use crate::params;
use crate::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor,
};
use crate::tensor::{DataType, HostTensor, TensorData};

/// Decodes a request's inputs: one tensor per input, from its raw contents
/// when the request has `raw_input_contents` (one per input, or none), else
/// from its typed `contents`.
pub fn inputs_from_proto(
    inputs: Vec<InferInputTensor>,
    raw: &[Bytes],
) -> Result<Vec<HostTensor>, DecodeError> {
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(DecodeError::invalid(format!(
            "{} raw_input_contents for {} inputs: send one per input or none",
            raw.len(),
            inputs.len()
        )));
    }
    let mut tensors = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        tensors.push(input_tensor(input, raw.get(i).map(|b| b.as_ref()))?);
    }
    Ok(tensors)
}

/// Reads Triton's schedule-policy parameters `priority` and `timeout` (µs):
/// the priority (0 when absent) and the relative deadline (`None` when
/// absent or 0).
pub fn schedule_policy(
    parameters: &HashMap<String, InferParameter>,
) -> Result<(u32, Option<Duration>), DecodeError> {
    let int = |name: &str| -> Result<Option<i64>, DecodeError> {
        match parameters
            .get(name)
            .and_then(|p| p.parameter_choice.as_ref())
        {
            None => Ok(None),
            Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v)),
            Some(ParameterChoice::Uint64Param(v)) => i64::try_from(*v)
                .map(Some)
                .map_err(|_| DecodeError::invalid(format!("parameter '{name}' is out of range"))),
            Some(_) => Err(DecodeError::invalid(format!(
                "parameter '{name}' must be an integer"
            ))),
        }
    };
    let priority = match int(params::PRIORITY)? {
        None => 0,
        Some(p) => u32::try_from(p)
            .map_err(|_| DecodeError::invalid(format!("priority must be >= 0, got {p}")))?,
    };
    let timeout = match int(params::TIMEOUT)? {
        None | Some(0) => None,
        Some(us) if us < 0 => {
            return Err(DecodeError::invalid(format!(
                "timeout must be >= 0 microseconds, got {us}"
            )));
        }
        Some(us) => Some(Duration::from_micros(us.unsigned_abs())),
    };
    Ok((priority, timeout))
}

fn input_tensor(input: InferInputTensor, raw: Option<&[u8]>) -> Result<HostTensor, DecodeError> {
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        DecodeError::invalid(format!(
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

fn dims(name: &str, shape: &[i64]) -> Result<Vec<usize>, DecodeError> {
    shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                DecodeError::invalid(format!("tensor '{name}' has a negative dimension {d}"))
            })
        })
        .collect()
}

fn typed_contents(
    name: &str,
    datatype: DataType,
    c: InferTensorContents,
) -> Result<TensorData, DecodeError> {
    let narrow =
        |what: &str| DecodeError::invalid(format!("tensor '{name}': a value does not fit {what}"));
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
    })
}

/// Encodes output tensors as `outputs` and `raw_output_contents`.
pub fn outputs_to_proto(tensors: Vec<HostTensor>) -> (Vec<InferOutputTensor>, Vec<Bytes>) {
    let mut outputs = Vec::with_capacity(tensors.len());
    let mut raw = Vec::with_capacity(tensors.len());
    for t in tensors {
        raw.push(t.to_raw().into());
        outputs.push(InferOutputTensor {
            datatype: t.datatype().as_str().into(),
            shape: wire_shape(&t.shape),
            name: t.name,
            parameters: HashMap::new(),
            contents: None,
        });
    }
    (outputs, raw)
}

/// A shape as the wire's `int64` dimensions. A dimension is at most the
/// element count of a tensor in memory, far below `i64::MAX`.
pub fn wire_shape(shape: &[usize]) -> Vec<i64> {
    shape
        .iter()
        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
        .collect()
}

/// Decodes the outputs of a protobuf response (raw or typed) into tensors.
pub fn outputs_from_proto(resp: &ModelInferResponse) -> Result<Vec<HostTensor>, DecodeError> {
    let mut out = Vec::with_capacity(resp.outputs.len());
    for (i, o) in resp.outputs.iter().enumerate() {
        let datatype = DataType::parse(&o.datatype).ok_or_else(|| {
            DecodeError::invalid(format!(
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

/// Encodes tensors as a request with `raw_input_contents`.
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
                shape: wire_shape(&t.shape),
                parameters: HashMap::new(),
                contents: None,
            })
            .collect(),
        outputs: Vec::new(),
        raw_input_contents: inputs.iter().map(|t| t.to_raw().into()).collect(),
    }
}

/// An int64 parameter.
pub fn int_param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

/// A string parameter.
pub fn string_param(v: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(v.into())),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn raw_inputs_round_trip_through_a_request() {
        let t =
            HostTensor::new("x", vec![2, 2], TensorData::I32(vec![1, -2, 3, i32::MAX])).unwrap();
        let req = request_to_proto("m", "7", std::slice::from_ref(&t), HashMap::new());
        let back = inputs_from_proto(req.inputs, &req.raw_input_contents).unwrap();
        assert_eq!(back, vec![t]);
    }

    #[test]
    fn typed_contents_decode_and_narrow_with_an_error() {
        let input = |contents| InferInputTensor {
            name: "x".into(),
            datatype: "INT8".into(),
            shape: vec![2],
            parameters: HashMap::new(),
            contents: Some(contents),
        };
        let ok = inputs_from_proto(
            vec![input(InferTensorContents {
                int_contents: vec![-128, 127],
                ..Default::default()
            })],
            &[],
        )
        .unwrap();
        assert_eq!(ok[0].data, TensorData::I8(vec![-128, 127]));
        let err = inputs_from_proto(
            vec![input(InferTensorContents {
                int_contents: vec![128, 0],
                ..Default::default()
            })],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("INT8"), "{err}");
    }

    #[test]
    fn raw_contents_must_be_one_per_input() {
        let err = inputs_from_proto(Vec::new(), &[Bytes::from_static(b"x")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 raw_input_contents for 0 inputs")
        );
    }

    #[test]
    fn schedule_policy_reads_and_checks_its_parameters() {
        let p = |k: &str, v: i64| HashMap::from([(k.to_string(), int_param(v))]);
        assert_eq!(schedule_policy(&HashMap::new()).unwrap(), (0, None));
        assert_eq!(schedule_policy(&p("priority", 2)).unwrap(), (2, None));
        assert_eq!(
            schedule_policy(&p("timeout", 1500)).unwrap(),
            (0, Some(Duration::from_micros(1500)))
        );
        assert!(schedule_policy(&p("timeout", -1)).is_err());
        assert!(schedule_policy(&p("priority", -1)).is_err());
        let s = HashMap::from([("timeout".to_string(), string_param("soon"))]);
        assert!(schedule_policy(&s).is_err());
    }

    #[test]
    fn outputs_round_trip_through_a_response() {
        let t = HostTensor::new(
            "y",
            vec![1, 2],
            TensorData::Bytes(vec![b"a".to_vec(), vec![]]),
        )
        .unwrap();
        let (outputs, raw_output_contents) = outputs_to_proto(vec![t.clone()]);
        let resp = ModelInferResponse {
            outputs,
            raw_output_contents,
            ..Default::default()
        };
        assert_eq!(outputs_from_proto(&resp).unwrap(), vec![t]);
    }
}
