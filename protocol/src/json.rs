//! The Open Inference Protocol's JSON tensors (KServe v2 REST), and their
//! conversion to and from the protobuf messages.
//!
//! `quiver infer` reads a KServe v2 JSON request body and prints the JSON
//! response, so what a user writes for curl against a REST server works over
//! QUIC too.

use std::collections::HashMap;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value, json};

use crate::error::DecodeError;
use crate::kserve::{outputs_from_proto, request_to_proto};
use crate::proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    model_infer_request::InferRequestedOutputTensor,
};
use crate::tensor::{DataType, HostTensor, TensorData};

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(msg.into())
}

/// The `name`, `datatype` and `shape` array of a tensor's JSON description
/// (of JSON data and of a binary tensor alike).
pub(crate) fn tensor_header(v: &Value) -> Result<(&str, DataType, &[Value]), DecodeError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("each tensor must be a JSON object"))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("tensor is missing its 'name'"))?;
    let dt = obj
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("tensor '{name}' is missing its 'datatype'")))?;
    let datatype = DataType::parse(dt)
        .ok_or_else(|| invalid(format!("tensor '{name}' has unknown datatype '{dt}'")))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(format!("tensor '{name}' is missing its 'shape'")))?;
    Ok((name, datatype, shape))
}

/// Decodes one JSON input tensor: `{"name", "datatype", "shape", "data"}`,
/// `data` flat or nested in row-major order.
pub fn tensor_from_json(v: &Value) -> Result<HostTensor, DecodeError> {
    let (name, datatype, shape) = tensor_header(v)?;
    let shape = shape
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            invalid(format!(
                "tensor '{name}': shape must be non-negative integers"
            ))
        })?;
    let data = v
        .get("data")
        .ok_or_else(|| invalid(format!("tensor '{name}' is missing its 'data'")))?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let bad = |what: &str| invalid(format!("tensor '{name}': every element must be {what}"));
    macro_rules! ints {
        ($variant:ident, $t:ty, $what:literal) => {
            TensorData::$variant(
                flat.iter()
                    .map(|v| v.as_i64().and_then(|i| <$t>::try_from(i).ok()))
                    .collect::<Option<Vec<$t>>>()
                    .ok_or_else(|| bad($what))?,
            )
        };
    }
    macro_rules! uints {
        ($variant:ident, $t:ty, $what:literal) => {
            TensorData::$variant(
                flat.iter()
                    .map(|v| v.as_u64().and_then(|i| <$t>::try_from(i).ok()))
                    .collect::<Option<Vec<$t>>>()
                    .ok_or_else(|| bad($what))?,
            )
        };
    }
    let data = match datatype {
        DataType::Bool => TensorData::Bool(
            flat.iter()
                .map(|v| v.as_bool())
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a boolean"))?,
        ),
        DataType::Uint8 => uints!(U8, u8, "an integer in UINT8 range"),
        DataType::Uint16 => uints!(U16, u16, "an integer in UINT16 range"),
        DataType::Uint32 => uints!(U32, u32, "an integer in UINT32 range"),
        DataType::Uint64 => uints!(U64, u64, "an integer in UINT64 range"),
        DataType::Int8 => ints!(I8, i8, "an integer in INT8 range"),
        DataType::Int16 => ints!(I16, i16, "an integer in INT16 range"),
        DataType::Int32 => ints!(I32, i32, "an integer in INT32 range"),
        DataType::Int64 => ints!(I64, i64, "an integer in INT64 range"),
        DataType::Fp32 => TensorData::F32(
            flat.iter()
                // A number past f32's range would become infinity, which
                // no JSON answer can carry back: refused like an INT8 of 300.
                .map(|v| v.as_f64().map(|f| f as f32).filter(|f| f.is_finite()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a number in FP32 range"))?,
        ),
        DataType::Fp64 => TensorData::F64(
            flat.iter()
                .map(|v| v.as_f64())
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a number"))?,
        ),
        DataType::Bytes => TensorData::Bytes(
            flat.iter()
                .map(|v| v.as_str().map(|s| s.as_bytes().to_vec()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a string"))?,
        ),
    };
    Ok(HostTensor::new(name, shape, data)?)
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// An f32 as a JSON number in the shortest form that reads back as the same f32 (`0.1`, not
/// `0.10000000149011612`, which is what widening it to f64 prints: ~40% more bytes per
/// embedding). The shortest decimal of the f32 is parsed as the nearest f64, whose own
/// shortest form is that same decimal. A NaN or infinity, which JSON cannot carry, is `null`.
pub fn f32_to_json(f: f32) -> Value {
    if !f.is_finite() {
        return Value::Null;
    }
    // Rust's `Display` of a float is the shortest round-trip decimal.
    f.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// A tensor as KServe v2 JSON with flat `data`, serialized straight to text: the same
/// document as [`tensor_to_json`] without the [`Value`] in between. `Value` keeps numbers as
/// f64, so [`f32_to_json`] finds each f32's shortest decimal by printing it and parsing that
/// back; for a response of 16 embeddings (6,144 floats) that cost ~1 ms of the gateway's CPU.
/// Here each f32 goes to serde_json's own shortest f32 form (a NaN or infinity is `null`).
#[derive(Debug, Clone, Copy)]
pub struct TensorJson<'a>(pub &'a HostTensor);

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("name", &t.name)?;
        m.serialize_entry("datatype", t.datatype().as_str())?;
        m.serialize_entry("shape", &t.shape)?;
        match &t.data {
            TensorData::Bool(v) => m.serialize_entry("data", v)?,
            TensorData::U8(v) => m.serialize_entry("data", v)?,
            TensorData::U16(v) => m.serialize_entry("data", v)?,
            TensorData::U32(v) => m.serialize_entry("data", v)?,
            TensorData::U64(v) => m.serialize_entry("data", v)?,
            TensorData::I8(v) => m.serialize_entry("data", v)?,
            TensorData::I16(v) => m.serialize_entry("data", v)?,
            TensorData::I32(v) => m.serialize_entry("data", v)?,
            TensorData::I64(v) => m.serialize_entry("data", v)?,
            TensorData::F32(v) => m.serialize_entry("data", v)?,
            // As `json!` would write an f64: non-finite values are `null`.
            TensorData::F64(v) => m.serialize_entry("data", v)?,
            TensorData::Bytes(v) => m.serialize_entry("data", &LossyStrings(v))?,
        }
        m.end()
    }
}

/// Byte strings as JSON strings, invalid UTF-8 replaced (as [`tensor_to_json`] writes them).
struct LossyStrings<'a>(&'a [Vec<u8>]);

impl Serialize for LossyStrings<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|b| String::from_utf8_lossy(b)))
    }
}

/// Encodes a tensor as KServe v2 JSON with flat `data`.
pub fn tensor_to_json(t: &HostTensor) -> Value {
    let data: Value = match &t.data {
        TensorData::Bool(v) => json!(v),
        TensorData::U8(v) => json!(v),
        TensorData::U16(v) => json!(v),
        TensorData::U32(v) => json!(v),
        TensorData::U64(v) => json!(v),
        TensorData::I8(v) => json!(v),
        TensorData::I16(v) => json!(v),
        TensorData::I32(v) => json!(v),
        TensorData::I64(v) => json!(v),
        TensorData::F32(v) => Value::Array(v.iter().map(|&f| f32_to_json(f)).collect()),
        TensorData::F64(v) => json!(v),
        TensorData::Bytes(v) => Value::Array(
            v.iter()
                .map(|b| Value::String(String::from_utf8_lossy(b).into_owned()))
                .collect(),
        ),
    };
    json!({
        "name": t.name,
        "datatype": t.datatype().as_str(),
        "shape": t.shape,
        "data": data,
    })
}

/// Decodes a JSON parameter map into protobuf parameters.
pub fn parameters_from_json(
    v: Option<&Value>,
) -> Result<HashMap<String, InferParameter>, DecodeError> {
    let Some(v) = v else {
        return Ok(HashMap::new());
    };
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("'parameters' must be a JSON object"))?;
    obj.iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => ParameterChoice::Int64Param(i),
                    (None, Some(u)) => ParameterChoice::Uint64Param(u),
                    _ => ParameterChoice::DoubleParam(n.as_f64().unwrap_or(f64::NAN)),
                },
                _ => {
                    return Err(invalid(format!(
                        "parameter '{k}' must be a boolean, number or string"
                    )));
                }
            };
            Ok((
                k.clone(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// Encodes protobuf parameters as a JSON object.
pub fn parameters_to_json(p: &HashMap<String, InferParameter>) -> Value {
    let mut keys: Vec<&String> = p.keys().collect();
    keys.sort();
    let mut map = Map::new();
    for k in keys {
        let v = match p.get(k).and_then(|p| p.parameter_choice.as_ref()) {
            Some(ParameterChoice::BoolParam(b)) => json!(b),
            Some(ParameterChoice::Int64Param(i)) => json!(i),
            Some(ParameterChoice::Uint64Param(u)) => json!(u),
            Some(ParameterChoice::DoubleParam(d)) => json!(d),
            Some(ParameterChoice::StringParam(s)) => json!(s),
            None => Value::Null,
        };
        map.insert(k.clone(), v);
    }
    Value::Object(map)
}

/// Builds a protobuf request (tensors in `raw_input_contents`) from a KServe
/// v2 JSON request body.
pub fn request_from_json(model: &str, body: &Value) -> Result<ModelInferRequest, DecodeError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the request needs an 'inputs' array"))?
        .iter()
        .map(tensor_from_json)
        .collect::<Result<Vec<_>, _>>()?;
    let id = obj.get("id").and_then(Value::as_str).unwrap_or_default();
    let parameters = parameters_from_json(obj.get("parameters"))?;
    let mut req = request_to_proto(model, id, &inputs, parameters);
    if let Some(outputs) = obj.get("outputs") {
        let outputs = outputs
            .as_array()
            .ok_or_else(|| invalid("'outputs' must be an array"))?;
        for o in outputs {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("each requested output needs a 'name'"))?;
            req.outputs.push(InferRequestedOutputTensor {
                name: name.into(),
                parameters: HashMap::new(),
            });
        }
    }
    Ok(req)
}

/// Encodes a protobuf response as a KServe v2 JSON response body.
pub fn response_to_json(resp: &ModelInferResponse) -> Result<Value, DecodeError> {
    let outputs = outputs_from_proto(resp)?;
    Ok(json!({
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "id": resp.id,
        "parameters": parameters_to_json(&resp.parameters),
        "outputs": outputs.iter().map(tensor_to_json).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The significant digits of a JSON number: `-5.20e+14` and `-520000000000000.0` both
    /// give `52`.
    fn significant(number: &str) -> String {
        let mantissa = number.split(['e', 'E']).next().unwrap_or_default();
        let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        digits.trim_matches('0').to_owned()
    }

    #[test]
    fn f32_data_is_written_in_its_shortest_round_trip_form() {
        let t = HostTensor::new(
            "x",
            vec![5],
            TensorData::F32(vec![0.1, -0.034_281_5, 1e-7, 3.402_823_5e38, 2.0]),
        )
        .expect("valid tensor");
        let text = tensor_to_json(&t)["data"].to_string();
        assert_eq!(text, "[0.1,-0.0342815,1e-7,3.4028235e+38,2.0]");
        // Every value reads back as the same f32, over a spread of magnitudes and signs.
        let mut x = 0x1234_5678u32;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            if !f.is_finite() {
                assert_eq!(f32_to_json(f), Value::Null);
                continue;
            }
            let text = f32_to_json(f).to_string();
            let back: f64 = text.parse().expect("a JSON number");
            assert_eq!(
                (back as f32).to_bits(),
                f.to_bits(),
                "{f:e} written as {text}"
            );
            // No more significant digits than serde_json's own (ryu's) shortest f32 form;
            // the notation may differ (f64's switches to an exponent later), and so may the
            // last digit where two shortest decimals read back alike.
            let shortest = serde_json::to_string(&f).expect("a finite f32");
            assert!(
                significant(&text).len() <= significant(&shortest).len(),
                "{f:e}: {text} against {shortest}"
            );
        }
    }

    #[test]
    fn tensor_json_writes_what_tensor_to_json_builds() {
        let text = |t: &HostTensor| serde_json::to_string(&TensorJson(t)).expect("serializes");
        let cases = [
            TensorData::Bool(vec![true, false]),
            TensorData::U8(vec![0, 255]),
            TensorData::U16(vec![1, 65535]),
            TensorData::U32(vec![7, u32::MAX]),
            TensorData::U64(vec![u64::MAX, 0]),
            TensorData::I8(vec![-128, 127]),
            TensorData::I16(vec![-1, 2]),
            TensorData::I32(vec![i32::MIN, 3]),
            TensorData::I64(vec![i64::MIN, i64::MAX]),
            TensorData::F64(vec![0.1, f64::NAN]),
            TensorData::Bytes(vec![b"caf\xc3\xa9".to_vec(), b"\xff\x00".to_vec()]),
        ];
        for data in cases {
            let t = HostTensor::new("t", vec![2], data).expect("valid tensor");
            let written: Value = serde_json::from_str(&text(&t)).expect("JSON");
            assert_eq!(written, tensor_to_json(&t), "{t:?}");
        }
        // f32: the same document, each number reading back as the same f32 in no more
        // significant digits than the `Value` path writes; NaN and infinities are null.
        let mut x = 0x1234_5678u32;
        let floats: Vec<f32> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .chain([
                0.1,
                -0.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
            ])
            .collect();
        let t = HostTensor::new(
            "e",
            vec![2, floats.len() / 2],
            TensorData::F32(floats.clone()),
        )
        .expect("valid tensor");
        let written = text(&t);
        let v: Value = serde_json::from_str(&written).expect("JSON");
        let built = tensor_to_json(&t);
        for key in ["name", "datatype", "shape"] {
            assert_eq!(v[key], built[key]);
        }
        let numbers = written
            .split_once("\"data\":[")
            .and_then(|(_, d)| d.strip_suffix("]}"))
            .expect("a data array")
            .split(',');
        let built = built["data"].as_array().expect("an array");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(floats.len()));
        for ((f, number), b) in floats.iter().zip(numbers).zip(built) {
            if !f.is_finite() {
                assert_eq!(number, "null");
                continue;
            }
            let back: f64 = number.parse().expect("a JSON number");
            assert_eq!(
                (back as f32).to_bits(),
                f.to_bits(),
                "{f:e} written as {number}"
            );
            let b = b.to_string();
            assert!(
                significant(number).len() <= significant(&b).len(),
                "{number} against {b}"
            );
        }
    }

    #[test]
    fn nested_data_flattens_in_row_major_order() {
        let t = tensor_from_json(&json!({
            "name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4.5]]
        }))
        .expect("valid tensor");
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.data, TensorData::F32(vec![1.0, 2.0, 3.0, 4.5]));
    }

    #[test]
    fn element_count_must_match_the_shape() {
        let err = tensor_from_json(&json!({
            "name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]
        }));
        assert!(err.is_err());
    }

    #[test]
    fn a_number_past_fp32_range_is_refused_not_made_infinite() {
        let err = tensor_from_json(&json!({
            "name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2.5e42]
        }))
        .expect_err("2.5e42 is not an f32");
        assert!(err.to_string().contains("FP32 range"), "{err}");
        let ok = tensor_from_json(&json!({
            "name": "x", "datatype": "FP64", "shape": [1], "data": [2.5e42]
        }));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn wrong_element_type_is_an_error_naming_the_tensor() {
        let err = tensor_from_json(&json!({
            "name": "X", "datatype": "INT32", "shape": [1], "data": ["a"]
        }))
        .expect_err("strings are not INT32");
        assert!(err.to_string().contains("'X'"), "{err}");
    }

    #[test]
    fn request_and_response_round_trip() {
        let req = request_from_json(
            "identity",
            &json!({"id": "7", "parameters": {"timeout": 5000, "priority": 1},
                    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
                    "outputs": [{"name": "OUTPUT0"}]}),
        )
        .expect("valid request");
        assert_eq!(req.raw_input_contents.len(), 1);
        assert_eq!(req.outputs[0].name, "OUTPUT0");
        let resp = ModelInferResponse {
            model_name: "identity".into(),
            model_version: "1".into(),
            id: req.id.clone(),
            parameters: req.parameters.clone(),
            outputs: vec![
                crate::proto::inference::model_infer_response::InferOutputTensor {
                    name: "OUTPUT0".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 3],
                    parameters: HashMap::new(),
                    contents: None,
                },
            ],
            raw_output_contents: req.raw_input_contents.clone(),
        };
        let v = response_to_json(&resp).expect("valid response");
        assert_eq!(v["outputs"][0]["data"], json!([1.0, 2.0, 3.0]));
        assert_eq!(v["parameters"]["timeout"], json!(5000));
        assert_eq!(v["id"], json!("7"));
    }
}
