//! A `ModelInferRequest` read straight into tensors, for the common shape
//! of a request: inputs described by name, datatype and shape, their
//! elements in `raw_input_contents`.
//!
//! The generic way (prost's decode, then [`crate::kserve::inputs_from_proto`])
//! builds every message on the way: a vector of input messages, a datatype
//! string and a shape vector per input, a vector of raw contents; then the
//! tensors from those. [`decode_plain`] reads the same bytes once and
//! builds only what the gateway keeps: the names, the parameters (through
//! prost, so exactly as it reads them) and the tensors.
//!
//! It is an optimisation, never a second dialect: whatever it does not
//! handle, or anything wrong with the message, makes it answer `None`, and
//! the caller decodes with prost and reports errors as it always has.
//! Where it answers, the answer is what the generic way gives (the
//! `native_frame` fuzz target compares them on every input).
//!
//! [`peek_reply`] is the same for the other direction: a client reads a
//! reply's names and parameters in place instead of building the message.

use std::collections::HashMap;

use prost::Message;

use crate::frame::ParamRef;
use crate::proto::ModelInferRequest;
use crate::proto::inference::InferParameter;
use crate::tensor::{DataType, HostTensor};

/// A request decoded by [`decode_plain`]: what `ModelInferRequest` holds,
/// its raw contents already tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainRequest {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub parameters: HashMap<String, InferParameter>,
    /// One per input, in the message's order, from its raw contents.
    pub inputs: Vec<HostTensor>,
    /// The requested outputs' names.
    pub outputs: Vec<String>,
}

impl PlainRequest {
    /// What the generic way makes of a message prost decoded: its inputs
    /// as tensors by [`crate::kserve::inputs_from_proto`]. Where
    /// [`decode_plain`] answers, it answers this.
    pub fn from_proto(req: ModelInferRequest) -> Result<Self, crate::DecodeError> {
        let inputs = crate::kserve::inputs_from_proto(req.inputs, &req.raw_input_contents)?;
        Ok(PlainRequest {
            model_name: req.model_name,
            model_version: req.model_version,
            id: req.id,
            parameters: req.parameters,
            inputs,
            outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        })
    }
}

/// Inputs, and dimensions per input, that [`decode_plain`] holds on the
/// stack; a message with more goes the generic way.
const MAX_INPUTS: usize = 8;
const MAX_DIMS: usize = 8;

/// Protobuf wire types.
const VARINT: u64 = 0;
const LENGTH_DELIMITED: u64 = 2;

/// Decodes `body` (a `ModelInferRequest`) when it is a plain request: no
/// fields but those of `ModelInferRequest` itself, no parameters on inputs
/// or outputs, no typed `contents`, at most eight inputs of at most eight
/// dimensions, one raw contents per input, every tensor valid. `None`
/// otherwise: decode it with prost.
pub fn decode_plain(body: &[u8]) -> Option<PlainRequest> {
    let mut r = Reader(body);
    let (mut model_name, mut model_version, mut id) = ("", "", "");
    let mut parameters: Option<ModelInferRequest> = None;
    let mut inputs: [Input<'_>; MAX_INPUTS] = Default::default();
    let mut n_inputs = 0;
    let mut raw: [&[u8]; MAX_INPUTS] = [&[]; MAX_INPUTS];
    let mut n_raw = 0;
    let mut outputs = Vec::new();
    while !r.0.is_empty() {
        let start = r.0;
        let (tag, wire_type) = r.key()?;
        if wire_type != LENGTH_DELIMITED {
            return None;
        }
        let field = r.delimited()?;
        match tag {
            1 => model_name = std::str::from_utf8(field).ok()?,
            2 => model_version = std::str::from_utf8(field).ok()?,
            3 => id = std::str::from_utf8(field).ok()?,
            4 => {
                // The map entry with its key, merged as prost merges it: a
                // name read later replaces one read earlier.
                let whole = start.get(..start.len() - r.0.len())?;
                parameters
                    .get_or_insert_with(ModelInferRequest::default)
                    .merge(whole)
                    .ok()?;
            }
            5 => {
                let slot = inputs.get_mut(n_inputs)?;
                *slot = Input::read(field)?;
                n_inputs += 1;
            }
            6 => outputs.push(requested_output(field)?),
            7 => {
                *raw.get_mut(n_raw)? = field;
                n_raw += 1;
            }
            _ => return None,
        }
    }
    if n_raw != n_inputs || n_inputs == 0 {
        // Typed contents, or raw contents that do not match the inputs:
        // the generic way decodes or refuses them.
        return None;
    }
    let mut tensors = Vec::with_capacity(n_inputs);
    for (input, raw) in inputs.iter().zip(raw).take(n_inputs) {
        let datatype = DataType::parse(input.datatype)?;
        let shape = input.shape.get(..input.dims)?;
        tensors.push(HostTensor::from_raw(input.name, datatype, shape, raw).ok()?);
    }
    Some(PlainRequest {
        model_name: model_name.to_owned(),
        model_version: model_version.to_owned(),
        id: id.to_owned(),
        parameters: parameters.map(|p| p.parameters).unwrap_or_default(),
        inputs: tensors,
        outputs,
    })
}

/// An `InferInputTensor` without parameters or contents, borrowed.
#[derive(Default)]
struct Input<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: [i64; MAX_DIMS],
    dims: usize,
}

impl<'a> Input<'a> {
    fn read(body: &'a [u8]) -> Option<Self> {
        let mut input = Input::default();
        let mut r = Reader(body);
        while !r.0.is_empty() {
            let (tag, wire_type) = r.key()?;
            match (tag, wire_type) {
                (1, LENGTH_DELIMITED) => input.name = std::str::from_utf8(r.delimited()?).ok()?,
                (2, LENGTH_DELIMITED) => {
                    input.datatype = std::str::from_utf8(r.delimited()?).ok()?;
                }
                // Packed, as proto3 writes it; a reader also takes the
                // unpacked form, one dimension per key.
                (3, LENGTH_DELIMITED) => {
                    let mut packed = Reader(r.delimited()?);
                    while !packed.0.is_empty() {
                        input.push_dim(packed.varint()?)?;
                    }
                }
                (3, VARINT) => {
                    let d = r.varint()?;
                    input.push_dim(d)?;
                }
                _ => return None,
            }
        }
        Some(input)
    }

    fn push_dim(&mut self, d: u64) -> Option<()> {
        // int64 on the wire: the varint is the two's complement.
        *self.shape.get_mut(self.dims)? = d as i64;
        self.dims += 1;
        Some(())
    }
}

/// An `InferRequestedOutputTensor`'s name; one with parameters goes the
/// generic way.
fn requested_output(body: &[u8]) -> Option<String> {
    let mut name = "";
    let mut r = Reader(body);
    while !r.0.is_empty() {
        match r.key()? {
            (1, LENGTH_DELIMITED) => name = std::str::from_utf8(r.delimited()?).ok()?,
            _ => return None,
        }
    }
    Some(name.to_owned())
}

/// Parameters of a reply that [`peek_reply`] holds on the stack (a local
/// answer carries nine at most); a reply with more goes the generic way.
const MAX_REPLY_PARAMETERS: usize = 16;

/// A `Reply` frame's body read in place by [`peek_reply`].
#[derive(Debug, Clone, Copy, PartialEq)]
// A response's parameters are held on the stack for the one read: boxing
// them would allocate, which is what the peek is for avoiding.
#[allow(clippy::large_enum_variant)]
pub enum ReplyPeek<'a> {
    /// `result.response`.
    Response(ResponsePeek<'a>),
    /// `result.status`: the gRPC code number and the message.
    Status { code: i32, message: &'a str },
}

/// A `ModelInferResponse` read in place: its names and parameters borrowed
/// from the body, its outputs counted. For a client that wants to know how
/// a request was served without building the message (prost's decode of a
/// local answer builds a map of nine parameters, a string each).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResponsePeek<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub id: &'a str,
    /// `outputs` entries (each checked as prost checks it).
    pub outputs: usize,
    /// `raw_output_contents` entries.
    pub raw_outputs: usize,
    parameters: [(&'a str, ParamRef<'a>); MAX_REPLY_PARAMETERS],
    n_parameters: usize,
}

impl<'a> ResponsePeek<'a> {
    /// The parameter `name`, as prost's map holds it (a name sent twice:
    /// the later value).
    pub fn parameter(&self, name: &str) -> Option<ParamRef<'a>> {
        self.parameters
            .get(..self.n_parameters)?
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|&(_, v)| v)
    }

    /// Every parameter entry in the order sent (a name sent twice appears
    /// twice; [`parameter`](Self::parameter) takes the later).
    pub fn parameter_entries(&self) -> &[(&'a str, ParamRef<'a>)] {
        self.parameters.get(..self.n_parameters).unwrap_or_default()
    }
}

impl ResponsePeek<'_> {
    /// Whether this is what prost decodes the same body into: the names, the
    /// counts of outputs and raw contents, and every parameter (the map's
    /// names and values). What the tests and the `native_frame` fuzz target
    /// check wherever [`peek_reply`] answers.
    pub fn reads_as(&self, m: &crate::proto::ModelInferResponse) -> bool {
        use crate::proto::inference::infer_parameter::ParameterChoice;
        let same_value =
            |peeked: ParamRef<'_>, p: &InferParameter| match (peeked, &p.parameter_choice) {
                (ParamRef::Bool(a), Some(ParameterChoice::BoolParam(b))) => a == *b,
                (ParamRef::Int(a), Some(ParameterChoice::Int64Param(b))) => a == *b,
                (ParamRef::Str(a), Some(ParameterChoice::StringParam(b))) => a == b,
                _ => false,
            };
        self.model_name == m.model_name
            && self.model_version == m.model_version
            && self.id == m.id
            && self.outputs == m.outputs.len()
            && self.raw_outputs == m.raw_output_contents.len()
            && self
                .parameter_entries()
                .iter()
                .all(|(k, _)| m.parameters.contains_key(*k))
            && m.parameters
                .iter()
                .all(|(k, v)| self.parameter(k).is_some_and(|p| same_value(p, v)))
    }
}

/// Reads `body` (a `quiver/1` `Reply`) in place when it has the common
/// shape: one result, a response whose fields are `ModelInferResponse`'s own,
/// outputs without parameters or typed contents, at most sixteen parameters,
/// each a bool, an int64 or a string. What it answers is what prost's decode
/// holds (the `native_frame` fuzz target compares them). `None` otherwise,
/// for anything malformed too: decode it with prost, which says what is
/// wrong.
pub fn peek_reply(body: &[u8]) -> Option<ReplyPeek<'_>> {
    let mut r = Reader(body);
    let (tag, wire_type) = r.key()?;
    if wire_type != LENGTH_DELIMITED {
        return None;
    }
    let field = r.delimited()?;
    // A second result merges into or replaces the first: prost's to read.
    if !r.0.is_empty() {
        return None;
    }
    match tag {
        1 => peek_response(field).map(ReplyPeek::Response),
        2 => peek_status(field),
        _ => None,
    }
}

fn peek_status(body: &[u8]) -> Option<ReplyPeek<'_>> {
    let (mut code, mut message) = (0, "");
    let mut r = Reader(body);
    while !r.0.is_empty() {
        match r.key()? {
            // int32 on the wire: the low 32 bits of the varint.
            (1, VARINT) => code = r.varint()? as i32,
            (2, LENGTH_DELIMITED) => message = std::str::from_utf8(r.delimited()?).ok()?,
            _ => return None,
        }
    }
    Some(ReplyPeek::Status { code, message })
}

fn peek_response(body: &[u8]) -> Option<ResponsePeek<'_>> {
    let mut peek = ResponsePeek {
        model_name: "",
        model_version: "",
        id: "",
        outputs: 0,
        raw_outputs: 0,
        parameters: [("", ParamRef::Bool(false)); MAX_REPLY_PARAMETERS],
        n_parameters: 0,
    };
    let mut r = Reader(body);
    while !r.0.is_empty() {
        let (tag, wire_type) = r.key()?;
        if wire_type != LENGTH_DELIMITED {
            return None;
        }
        let field = r.delimited()?;
        match tag {
            1 => peek.model_name = std::str::from_utf8(field).ok()?,
            2 => peek.model_version = std::str::from_utf8(field).ok()?,
            3 => peek.id = std::str::from_utf8(field).ok()?,
            4 => {
                let slot = peek.parameters.get_mut(peek.n_parameters)?;
                *slot = parameter_entry(field)?;
                peek.n_parameters += 1;
            }
            5 => {
                // Name, datatype and shape, as a request's input is read.
                Input::read(field)?;
                peek.outputs += 1;
            }
            6 => peek.raw_outputs += 1,
            _ => return None,
        }
    }
    Some(peek)
}

/// A parameters map entry: its key once, its value once with one choice.
fn parameter_entry(body: &[u8]) -> Option<(&str, ParamRef<'_>)> {
    let mut r = Reader(body);
    let (mut key, mut value) = (None, None);
    while !r.0.is_empty() {
        match r.key()? {
            (1, LENGTH_DELIMITED) if key.is_none() => {
                key = Some(std::str::from_utf8(r.delimited()?).ok()?);
            }
            (2, LENGTH_DELIMITED) if value.is_none() => {
                value = Some(parameter_value(r.delimited()?)?);
            }
            _ => return None,
        }
    }
    // An entry without its key or value (prost fills in the defaults) goes
    // the generic way.
    Some((key?, value?))
}

/// An `InferParameter` with one choice of bool, int64 or string.
fn parameter_value(body: &[u8]) -> Option<ParamRef<'_>> {
    let mut r = Reader(body);
    let value = match r.key()? {
        (1, VARINT) => ParamRef::Bool(r.varint()? != 0),
        // int64 on the wire: the varint is the two's complement.
        (2, VARINT) => ParamRef::Int(r.varint()? as i64),
        (3, LENGTH_DELIMITED) => ParamRef::Str(std::str::from_utf8(r.delimited()?).ok()?),
        _ => return None,
    };
    r.0.is_empty().then_some(value)
}

/// The protobuf wire format read from a slice; `None` on anything
/// malformed (the generic decoder then says what).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            // The tenth byte holds bit 63 alone.
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = self.0.get(i + 1..)?;
                return Some(value);
            }
        }
        None
    }

    fn key(&mut self) -> Option<(u64, u64)> {
        let key = self.varint()?;
        let tag = key >> 3;
        // Field numbers are 1 to 2^29 - 1.
        if tag == 0 || tag > u64::from(u32::MAX >> 3) {
            return None;
        }
        Some((tag, key & 7))
    }

    fn delimited(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let (field, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::kserve::{int_param, request_to_proto, string_param};
    use crate::proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use crate::tensor::TensorData;

    /// What prost and `inputs_from_proto` make of `body`.
    fn generic(body: &[u8]) -> Option<PlainRequest> {
        PlainRequest::from_proto(ModelInferRequest::decode(body).ok()?).ok()
    }

    fn tensors() -> Vec<HostTensor> {
        vec![
            HostTensor::new("INPUT0", vec![1, 16], TensorData::F32(vec![0.25; 16])).unwrap(),
            HostTensor::new("ids", vec![2], TensorData::I64(vec![-1, 300])).unwrap(),
            HostTensor::new("text", vec![1], TensorData::Bytes(vec![b"hi".to_vec()])).unwrap(),
        ]
    }

    #[test]
    fn a_plain_request_decodes_as_prost_and_inputs_from_proto_decode_it() {
        let mut parameters = HashMap::new();
        parameters.insert("timeout".to_owned(), int_param(5000));
        parameters.insert("authorization".to_owned(), string_param("Bearer x"));
        let mut req = request_to_proto("identity", "r-1", &tensors(), parameters);
        req.model_version = "2".into();
        req.outputs = vec![InferRequestedOutputTensor {
            name: "OUTPUT0".into(),
            parameters: HashMap::new(),
        }];
        let body = req.encode_to_vec();
        let plain = decode_plain(&body).expect("a plain request");
        assert_eq!(Some(plain.clone()), generic(&body));
        assert_eq!(plain.inputs, tensors());
        assert_eq!(plain.parameters.len(), 2);
        // Fields repeated: the last string wins, map entries merge, inputs
        // and shapes append (the unpacked form too), as prost reads them.
        let mut twice = body.clone();
        let mut again = ModelInferRequest {
            model_name: "other".into(),
            ..Default::default()
        };
        again.parameters.insert("timeout".into(), int_param(7));
        twice.extend(again.encode_to_vec());
        // inputs[0].shape gets one more dimension, unpacked: field 5 holding
        // field 3 as a varint. The raw size no longer fits: both refuse.
        let mut extra = twice.clone();
        extra.extend([0x2a, 0x02, 0x18, 0x01]);
        let plain = decode_plain(&twice).unwrap();
        assert_eq!(plain.model_name, "other");
        assert_eq!(plain.parameters["timeout"], int_param(7));
        assert_eq!(Some(plain), generic(&twice));
        assert_eq!(decode_plain(&extra), None);
    }

    #[test]
    fn what_it_does_not_handle_goes_the_generic_way() {
        let base = request_to_proto("m", "", &tensors(), HashMap::new());
        let mut typed = base.clone();
        typed.raw_input_contents.clear();
        let mut input_params = base.clone();
        input_params.inputs[0]
            .parameters
            .insert("x".into(), int_param(1));
        let mut output_params = base.clone();
        output_params.outputs.push(InferRequestedOutputTensor {
            name: "o".into(),
            parameters: [("x".to_owned(), int_param(1))].into(),
        });
        let mut many = base.clone();
        for i in 0..MAX_INPUTS {
            many.inputs.push(InferInputTensor {
                name: format!("in{i}"),
                datatype: "FP32".into(),
                shape: vec![1],
                ..Default::default()
            });
            many.raw_input_contents.push(vec![0; 4].into());
        }
        let mut wide = base.clone();
        wide.inputs[1].shape = vec![1; MAX_DIMS + 1];
        let mut bad_datatype = base.clone();
        bad_datatype.inputs[0].datatype = "FP99".into();
        let mut short_raw = base.clone();
        short_raw.raw_input_contents[0] = vec![0; 3].into();
        for (what, req) in [
            ("typed contents", typed),
            ("input parameters", input_params),
            ("output parameters", output_params),
            ("more inputs than the stack holds", many),
            ("more dimensions than the stack holds", wide),
            ("an unknown datatype", bad_datatype),
            ("raw contents of the wrong size", short_raw),
        ] {
            assert_eq!(decode_plain(&req.encode_to_vec()), None, "{what}");
        }
        // Unknown fields, malformed bytes, bad UTF-8, a truncated message.
        let body = base.encode_to_vec();
        let mut unknown = body.clone();
        unknown.extend([0x48, 0x01]);
        let mut bad_utf8 = ModelInferRequest {
            model_name: "m".into(),
            ..base.clone()
        }
        .encode_to_vec();
        bad_utf8[2] = 0xff;
        for (what, bytes) in [
            ("an unknown field", unknown),
            ("bad UTF-8", bad_utf8),
            ("a truncated message", body[..body.len() - 1].to_vec()),
            (
                "an overlong varint",
                vec![
                    0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
                ],
            ),
            ("field number 0", vec![0x02, 0x00]),
            ("nothing", Vec::new()),
        ] {
            assert_eq!(decode_plain(&bytes), None, "{what}");
        }
    }

    /// Where `peek_reply` answers, prost reads the same reply.
    fn peek_reads_as_prost(body: &[u8]) -> bool {
        use crate::proto::native::{Reply, reply};
        let Some(peek) = peek_reply(body) else {
            return true;
        };
        let Ok(reply) = Reply::decode(body) else {
            return false;
        };
        match (peek, reply.result) {
            (ReplyPeek::Response(p), Some(reply::Result::Response(m))) => p.reads_as(&m),
            (ReplyPeek::Status { code, message }, Some(reply::Result::Status(s))) => {
                code == s.code && message == s.message
            }
            _ => false,
        }
    }

    /// A local answer's reply, as the gateway writes it.
    fn local_reply() -> Vec<u8> {
        let outputs = [
            HostTensor::new("OUTPUT0", vec![1, 4], TensorData::F32(vec![0.5; 4])).unwrap(),
            HostTensor::new("ids", vec![2], TensorData::I64(vec![-1, 300])).unwrap(),
        ];
        let view = crate::frame::ResponseRef {
            model_name: "identity",
            model_version: "3",
            id: "req-7",
            outputs: &outputs,
        };
        let params = [
            ("quiver_batch_size", ParamRef::Int(1)),
            ("quiver_queue_time_us", ParamRef::Int(0)),
            ("quiver_rtt_reserved_us", ParamRef::Int(-5)),
            ("quiver_path", ParamRef::Str("local")),
            ("quiver_truncated", ParamRef::Bool(true)),
        ];
        let frame = crate::frame::encode_response(&view, &params).unwrap();
        frame[crate::frame::HEADER_LEN..].to_vec()
    }

    #[test]
    fn a_local_answer_peeks_as_prost_decodes_it() {
        let body = local_reply();
        let Some(ReplyPeek::Response(peek)) = peek_reply(&body) else {
            panic!("a local answer is in the common shape");
        };
        assert_eq!(
            (
                peek.model_name,
                peek.model_version,
                peek.id,
                peek.outputs,
                peek.raw_outputs
            ),
            ("identity", "3", "req-7", 2, 2)
        );
        assert_eq!(peek.parameter("quiver_path"), Some(ParamRef::Str("local")));
        assert_eq!(
            peek.parameter("quiver_rtt_reserved_us"),
            Some(ParamRef::Int(-5))
        );
        assert_eq!(
            peek.parameter("quiver_truncated"),
            Some(ParamRef::Bool(true))
        );
        assert_eq!(peek.parameter("absent"), None);
        assert_eq!(peek.parameter_entries().len(), 5);
        assert!(peek_reads_as_prost(&body));
    }

    #[test]
    fn a_status_reply_peeks_as_prost_decodes_it() {
        use crate::proto::native::{Reply, Status, reply};
        for code in [5, 0, -1] {
            let body = Reply {
                result: Some(reply::Result::Status(Status {
                    code,
                    message: "model 'x' is not served here".into(),
                })),
            }
            .encode_to_vec();
            assert_eq!(
                peek_reply(&body),
                Some(ReplyPeek::Status {
                    code,
                    message: "model 'x' is not served here"
                })
            );
            assert!(peek_reads_as_prost(&body));
        }
    }

    #[test]
    fn a_name_sent_twice_reads_as_the_later_value_as_in_prost() {
        use crate::proto::ModelInferResponse;
        use crate::proto::native::Reply;
        let one = |v: i64| ModelInferResponse {
            parameters: [("n".to_owned(), int_param(v))].into(),
            ..Default::default()
        };
        // Two encodings of the response's fields, concatenated inside one
        // result: the map entries of both, the later `n` wins.
        let mut inner = one(1).encode_to_vec();
        inner.extend(one(2).encode_to_vec());
        let mut body = Vec::new();
        prost::encoding::bytes::encode(1, &inner, &mut body);
        let Some(ReplyPeek::Response(peek)) = peek_reply(&body) else {
            panic!("two entries are in the common shape");
        };
        assert_eq!(peek.parameter("n"), Some(ParamRef::Int(2)));
        assert!(peek_reads_as_prost(&body));
        assert!(Reply::decode(&body[..]).is_ok());
    }

    #[test]
    fn a_reply_it_does_not_read_goes_the_generic_way() {
        use crate::proto::ModelInferResponse;
        use crate::proto::inference::InferParameter;
        use crate::proto::inference::infer_parameter::ParameterChoice;
        use crate::proto::inference::model_infer_response::InferOutputTensor;
        use crate::proto::native::{Reply, reply};
        let wrap = |m: ModelInferResponse| {
            Reply {
                result: Some(reply::Result::Response(m)),
            }
            .encode_to_vec()
        };
        let double = ModelInferResponse {
            parameters: [(
                "d".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::DoubleParam(0.5)),
                },
            )]
            .into(),
            ..Default::default()
        };
        let output_params = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "o".into(),
                parameters: [("x".to_owned(), int_param(1))].into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let many = ModelInferResponse {
            parameters: (0..=MAX_REPLY_PARAMETERS)
                .map(|i| (format!("p{i}"), int_param(1)))
                .collect(),
            ..Default::default()
        };
        let body = local_reply();
        let mut two_results = body.clone();
        two_results.extend(&body);
        let mut unknown = body.clone();
        unknown.extend([0x18, 0x01]);
        for (what, bytes) in [
            ("a double parameter", wrap(double)),
            ("output parameters", wrap(output_params)),
            ("more parameters than the stack holds", wrap(many)),
            ("two results", two_results),
            ("a field Reply does not have", unknown),
            ("an empty reply", Vec::new()),
            ("a truncated reply", body[..body.len() - 1].to_vec()),
        ] {
            assert_eq!(peek_reply(&bytes), None, "{what}");
        }
    }

    #[test]
    fn every_cut_and_flipped_byte_of_a_reply_peeks_as_prost_or_not_at_all() {
        let body = local_reply();
        for end in 0..=body.len() {
            assert!(peek_reads_as_prost(&body[..end]), "cut at {end}");
        }
        for i in 0..body.len() {
            for bit in 0..8 {
                let mut flipped = body.clone();
                flipped[i] ^= 1 << bit;
                assert!(peek_reads_as_prost(&flipped), "byte {i} bit {bit}");
            }
        }
    }
}
