//! KServe v2 REST bodies, with Triton's binary tensor extension.
//!
//! A body is JSON, or a JSON header of `Inference-Header-Content-Length`
//! bytes followed by the raw bytes of the tensors whose
//! `parameters.binary_data_size` says so, in the order they are listed.
//! Requests and responses use the same layout; [`decode_request`] and
//! [`decode_response`] read them, [`encode_request`] and [`encode_response`]
//! write them.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::error::DecodeError;
use crate::json::{
    TensorJson, parameters_from_json, parameters_to_json, tensor_from_json, tensor_header,
};
use crate::proto::InferParameter;
use crate::tensor::HostTensor;

/// The header that gives the length of the JSON part of a body with
/// binary tensors (lower case, as HTTP/2 and HTTP/3 carry it).
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(msg.into())
}

/// Parses the value of [`HEADER_CONTENT_LENGTH`].
pub fn header_length(value: &[u8]) -> Result<usize, DecodeError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .ok_or_else(|| invalid(format!("{HEADER_CONTENT_LENGTH} must be a byte count")))
}

/// Which outputs a client wants as binary tensors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BinaryOutputs {
    /// All of them (`parameters.binary_data_output`).
    pub all: bool,
    /// These (`outputs[].parameters.binary_data`).
    pub names: Vec<String>,
}

impl BinaryOutputs {
    /// Whether output `name` goes back as a binary tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }
}

/// A decoded REST inference request.
#[derive(Clone, Debug, PartialEq)]
pub struct RestRequest {
    /// The client's id (may be empty).
    pub id: String,
    /// The inputs, in the client's order.
    pub inputs: Vec<HostTensor>,
    /// The outputs asked for; empty means all.
    pub outputs: Vec<String>,
    /// The request's parameters (schedule policy and others).
    pub parameters: HashMap<String, InferParameter>,
    /// Which outputs go back as binary tensors.
    pub binary_outputs: BinaryOutputs,
}

/// A decoded REST inference response.
#[derive(Clone, Debug, PartialEq)]
pub struct RestResponse {
    /// The outputs, in the server's order.
    pub outputs: Vec<HostTensor>,
    /// The response's parameters.
    pub parameters: HashMap<String, InferParameter>,
}

/// Splits a body into its JSON header and the binary part after it.
fn split(body: &[u8], json_len: Option<usize>) -> Result<(Value, &[u8]), DecodeError> {
    let (header, binary) = match json_len {
        None => (body, &[][..]),
        Some(n) => body.split_at_checked(n).ok_or_else(|| {
            invalid(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has only {} bytes",
                body.len()
            ))
        })?,
    };
    let v: Value = serde_json::from_slice(header)
        .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("the body must be a JSON object"));
    }
    Ok((v, binary))
}

/// Decodes a list of tensors, each JSON or binary (taking its bytes from
/// the front of `binary`).
fn tensors(list: &[Value], binary: &mut &[u8]) -> Result<Vec<HostTensor>, DecodeError> {
    let mut out = Vec::with_capacity(list.len().min(1024));
    for t in list {
        match binary_size(t)? {
            None => out.push(tensor_from_json(t)?),
            Some(n) => {
                let (raw, rest) = binary.split_at_checked(n).ok_or_else(|| {
                    invalid(format!(
                        "binary_data_size {n} runs past the end of the body"
                    ))
                })?;
                *binary = rest;
                out.push(binary_tensor(t, raw)?);
            }
        }
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data follow the tensors that name them",
            binary.len()
        )));
    }
    Ok(out)
}

/// Decodes a REST inference request body; `json_len` is the value of
/// [`HEADER_CONTENT_LENGTH`], if sent.
pub fn decode_request(body: &[u8], json_len: Option<usize>) -> Result<RestRequest, DecodeError> {
    let (v, mut binary) = split(body, json_len)?;
    let inputs = v
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the request needs an 'inputs' array"))?;
    let inputs = tensors(inputs, &mut binary)?;
    let parameters = parameters_from_json(v.get("parameters"))?;
    let mut binary_outputs = BinaryOutputs {
        all: v
            .get("parameters")
            .and_then(|p| p.get("binary_data_output"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        names: Vec::new(),
    };
    let mut outputs = Vec::new();
    if let Some(requested) = v.get("outputs") {
        let requested = requested
            .as_array()
            .ok_or_else(|| invalid("'outputs' must be an array"))?;
        for o in requested {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("each requested output needs a 'name'"))?;
            if o.get("parameters")
                .and_then(|p| p.get("binary_data"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                binary_outputs.names.push(name.to_owned());
            }
            outputs.push(name.to_owned());
        }
    }
    Ok(RestRequest {
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        inputs,
        outputs,
        parameters,
        binary_outputs,
    })
}

/// Decodes a REST inference response body; `json_len` as for
/// [`decode_request`].
pub fn decode_response(body: &[u8], json_len: Option<usize>) -> Result<RestResponse, DecodeError> {
    let (v, mut binary) = split(body, json_len)?;
    let outputs = v
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the response has no 'outputs' array"))?;
    Ok(RestResponse {
        outputs: tensors(outputs, &mut binary)?,
        parameters: parameters_from_json(v.get("parameters"))?,
    })
}

fn binary_size(tensor: &Value) -> Result<Option<usize>, DecodeError> {
    match tensor
        .get("parameters")
        .and_then(|p| p.get("binary_data_size"))
    {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid("binary_data_size must be a byte count")),
    }
}

/// Decodes a binary tensor: its JSON description and its raw bytes.
pub fn binary_tensor(tensor: &Value, raw: &[u8]) -> Result<HostTensor, DecodeError> {
    let (name, datatype, shape) = tensor_header(tensor)?;
    let shape = shape
        .iter()
        .map(Value::as_i64)
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| invalid(format!("tensor '{name}': shape must be integers")))?;
    Ok(HostTensor::from_raw(name, datatype, &shape, raw)?)
}

/// A tensor's description in a binary body, and its raw bytes.
fn binary_description(t: &HostTensor) -> (Value, Vec<u8>) {
    let raw = t.to_raw();
    let mut o = Map::new();
    o.insert("name".into(), json!(t.name));
    o.insert("datatype".into(), json!(t.datatype().as_str()));
    o.insert("shape".into(), json!(t.shape));
    o.insert(
        "parameters".into(),
        json!({ "binary_data_size": raw.len() }),
    );
    (Value::Object(o), raw)
}

/// Joins a JSON header and raw tensors into a body; the header's length
/// when there are raw tensors (for [`HEADER_CONTENT_LENGTH`]).
fn join(head: &impl serde::Serialize, raw: Vec<Vec<u8>>) -> (Vec<u8>, Option<usize>) {
    // Only a map with keys that are not strings, or a failing `Serialize` impl, makes
    // serde_json fail; the headers here have neither. Were one added, the body says so.
    let head = serde_json::to_vec(head).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("encoding the response: {e}") })
            .to_string()
            .into_bytes()
    });
    if raw.is_empty() {
        return (head, None);
    }
    let json_len = head.len();
    let mut body = Vec::with_capacity(json_len + raw.iter().map(Vec::len).sum::<usize>());
    body.extend_from_slice(&head);
    for r in &raw {
        body.extend_from_slice(r);
    }
    (body, Some(json_len))
}

/// Encodes a request with every input as a binary tensor, and every output
/// asked back as binary (`binary_data_output`). Returns the body and the
/// value of [`HEADER_CONTENT_LENGTH`].
pub fn encode_request(
    id: &str,
    inputs: &[HostTensor],
    parameters: &HashMap<String, InferParameter>,
) -> (Vec<u8>, usize) {
    let (described, raw): (Vec<Value>, Vec<Vec<u8>>) =
        inputs.iter().map(binary_description).unzip();
    let mut params = parameters_to_json(parameters);
    if let Value::Object(map) = &mut params {
        map.insert("binary_data_output".into(), Value::Bool(true));
    }
    let (body, json_len) = join(
        &json!({ "id": id, "inputs": described, "parameters": params }),
        raw,
    );
    // With no inputs there is no binary part; the header is the whole body.
    let json_len = json_len.unwrap_or(body.len());
    (body, json_len)
}

/// The fields of a response besides its outputs.
#[derive(Clone, Debug)]
pub struct ResponseHead<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub id: &'a str,
    pub parameters: &'a HashMap<String, InferParameter>,
}

/// Encodes a response, the outputs in `binary` as binary tensors after the
/// JSON header. Returns the body and, when it has binary tensors, the value
/// of [`HEADER_CONTENT_LENGTH`].
pub fn encode_response(
    head: &ResponseHead<'_>,
    outputs: &[HostTensor],
    binary: &BinaryOutputs,
) -> (Vec<u8>, Option<usize>) {
    let mut raw = Vec::new();
    let mut described = Vec::with_capacity(outputs.len());
    for t in outputs {
        if binary.contains(&t.name) {
            let (d, r) = binary_description(t);
            described.push(Described::Binary(d));
            raw.push(r);
        } else {
            described.push(Described::Json(TensorJson(t)));
        }
    }
    join(
        &ResponseJson {
            model_name: head.model_name,
            model_version: head.model_version,
            id: head.id,
            parameters: parameters_to_json(head.parameters),
            outputs: described,
        },
        raw,
    )
}

/// A response's JSON header: written straight to text, so that its JSON tensors skip
/// [`Value`] (see [`TensorJson`]).
#[derive(serde::Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    id: &'a str,
    parameters: Value,
    outputs: Vec<Described<'a>>,
}

/// An output in the header: a binary tensor's description, or a tensor with its data.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Described<'a> {
    Binary(Value),
    Json(TensorJson<'a>),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::kserve::int_param;
    use crate::tensor::TensorData;

    fn t(name: &str, data: TensorData, shape: Vec<usize>) -> HostTensor {
        HostTensor::new(name, shape, data).unwrap()
    }

    #[test]
    fn a_request_round_trips() {
        let inputs = vec![
            t(
                "a",
                TensorData::F32(vec![1.0, f32::MIN_POSITIVE]),
                vec![1, 2],
            ),
            t("b", TensorData::Bytes(vec![b"\xff\x00".to_vec()]), vec![1]),
        ];
        let parameters = HashMap::from([("timeout".to_string(), int_param(5))]);
        let (body, json_len) = encode_request("7", &inputs, &parameters);
        let back = decode_request(&body, Some(json_len)).unwrap();
        assert_eq!(back.id, "7");
        assert_eq!(back.inputs, inputs);
        assert_eq!(back.parameters.get("timeout"), Some(&int_param(5)));
        assert!(back.binary_outputs.all);
    }

    #[test]
    fn a_response_round_trips_binary_and_json_outputs() {
        let outputs = vec![
            t("y", TensorData::I64(vec![-1, 2]), vec![2]),
            t("z", TensorData::U8(vec![9]), vec![1]),
        ];
        let parameters = HashMap::from([("quiver_batch_size".to_string(), int_param(3))]);
        let head = ResponseHead {
            model_name: "m",
            model_version: "1",
            id: "",
            parameters: &parameters,
        };
        let binary = BinaryOutputs {
            all: false,
            names: vec!["y".into()],
        };
        let (body, json_len) = encode_response(&head, &outputs, &binary);
        assert!(json_len.is_some());
        let back = decode_response(&body, json_len).unwrap();
        assert_eq!(back.outputs, outputs);
        assert_eq!(back.parameters, parameters);
    }

    #[test]
    fn lengths_that_lie_are_errors() {
        let long = decode_request(b"{}", Some(3)).unwrap_err();
        assert!(long.to_string().contains("only 2 bytes"), "{long}");
        let body = br#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[2],"parameters":{"binary_data_size":2}}]}"#;
        let mut with_raw = body.to_vec();
        with_raw.push(1);
        let short = decode_request(&with_raw, Some(body.len())).unwrap_err();
        assert!(short.to_string().contains("runs past"), "{short}");
        with_raw.extend_from_slice(&[2, 3]);
        let extra = decode_request(&with_raw, Some(body.len())).unwrap_err();
        assert!(
            extra.to_string().contains("1 bytes of binary data"),
            "{extra}"
        );
    }

    #[test]
    fn header_length_must_be_a_count() {
        assert_eq!(header_length(b" 12 ").unwrap(), 12);
        assert!(header_length(b"-1").is_err());
        assert!(header_length(b"\xff").is_err());
    }
}
