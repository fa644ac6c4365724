//! The `quiver/1` frame and reply envelope.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! protobuf: a `ModelInferRequest` on a request stream, a [`Reply`] on the
//! answer. One frame per stream. The length is checked against the limit
//! before any of the body is read, so an oversized frame costs the reader
//! four bytes; the transport only moves bytes ([`body_len`] after the
//! header, [`decode_body`] after the body).

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::error::InputError;
use crate::proto::ModelInferResponse;
use crate::proto::native::{Reply, Status, reply};
use crate::status::Code;
use crate::tensor::HostTensor;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared length is over the limit; the body was not read.
    #[error("frame of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge { declared: u64, limit: u64 },
    /// The stream ended before the frame did.
    #[error("stream ended after {got} of {expected} bytes of a frame")]
    Truncated { expected: u64, got: u64 },
    /// Bytes follow the frame on a stream that carries one.
    #[error("{extra} bytes follow the frame")]
    Trailing { extra: u64 },
    /// The body is not the expected protobuf message.
    #[error("malformed protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The transport failed while reading.
    #[error("stream read failed: {0}")]
    Read(String),
}

/// The body length a header declares, if it is within `limit`.
pub fn body_len(header: [u8; HEADER_LEN], limit: u32) -> Result<usize, FrameError> {
    let declared = u32::from_be_bytes(header);
    if declared > limit {
        return Err(FrameError::TooLarge {
            declared: u64::from(declared),
            limit: u64::from(limit),
        });
    }
    // A u32 fits usize on every target Quiver builds for (64-bit).
    usize::try_from(declared).map_err(|_| FrameError::TooLarge {
        declared: u64::from(declared),
        limit: u64::from(limit),
    })
}

/// Decodes a frame's body of the length its header declared.
pub fn decode_body<M: Message + Default>(body: Bytes) -> Result<M, FrameError> {
    Ok(M::decode(body)?)
}

/// Decodes a whole stream that carries one frame: its header, a body of the
/// declared length (at most `limit`), nothing after.
pub fn decode<M: Message + Default>(stream: Bytes, limit: u32) -> Result<M, FrameError> {
    let got = stream.len() as u64;
    let Some(header) = stream.get(..HEADER_LEN) else {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN as u64,
            got,
        });
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = body_len(h, limit)?;
    let body = stream.slice(HEADER_LEN..);
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated {
            expected: (HEADER_LEN + len) as u64,
            got,
        }),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing {
            extra: (body.len() - len) as u64,
        }),
        std::cmp::Ordering::Equal => decode_body(body),
    }
}

/// Encodes `msg` as one frame. A message of 4 GiB or more gets the length
/// `u32::MAX`, which every peer refuses as too large: never a panic.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    encode_with(msg, &[])
}

/// Encodes `msg` as one frame with `extra` (more encoded fields of the same
/// message) appended to its body, without copying `msg` to add them:
/// protobuf merges concatenated messages, a map entry read later replacing
/// one read earlier.
pub fn encode_with<M: Message>(msg: &M, extra: &[u8]) -> Bytes {
    let len = msg.encoded_len() + extra.len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // `encode_raw` writes what `encode` would, without the capacity check
    // that a growing BytesMut never fails.
    msg.encode_raw(&mut buf);
    buf.put_slice(extra);
    buf.freeze()
}

/// A parameter value borrowed for [`encode_response`]: one of
/// `InferParameter`'s choices, without owning a string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamRef<'a> {
    Bool(bool),
    Int(i64),
    Str(&'a str),
}

/// A response borrowed for [`encode_response`]: what `ModelInferResponse`
/// holds, with the outputs as the tensors a model returned.
#[derive(Clone, Copy, Debug)]
pub struct ResponseRef<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub id: &'a str,
    /// Written as `outputs` (name, datatype, shape) and, in the same order,
    /// `raw_output_contents`.
    pub outputs: &'a [HostTensor],
}

/// Encodes `Reply { response }` as one frame: the `ModelInferResponse`
/// that `kserve::outputs_to_proto` and the `params` map would make, written
/// straight from borrowed fields into one buffer.
///
/// Nothing is built on the way: no output message, shape or datatype
/// string, no raw-contents vector (each tensor's elements go from its data
/// into the frame), and no `HashMap<String, InferParameter>` (the
/// parameters are map entries written from their names and values). The
/// bytes are what prost writes for the built message, field by field in
/// its order, the parameters last; a reader decodes the same message.
///
/// Errors only where `HostTensor::try_to_raw` would: a `BYTES` element
/// longer than `u32::MAX` bytes.
pub fn encode_response(
    resp: &ResponseRef<'_>,
    params: &[(&str, ParamRef<'_>)],
) -> Result<Bytes, InputError> {
    use prost::encoding::encoded_len_varint;
    // A length-delimited field's key, length and body, when written.
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    // Proto3 leaves an empty string out.
    let string = |s: &str| if s.is_empty() { 0 } else { field(s.len()) };
    let value_len = |v: &ParamRef<'_>| match *v {
        // Tag byte and the varint.
        ParamRef::Bool(_) => 2,
        ParamRef::Int(i) => 1 + encoded_len_varint(i as u64),
        ParamRef::Str(s) => field(s.len()),
    };
    // The map entry's body: key (field 1), value (field 2).
    let entry_len = |k: &str, v: &ParamRef<'_>| string(k) + field(value_len(v));
    // InferOutputTensor: name 1, datatype 2, shape 3 (packed).
    let shape_len =
        |t: &HostTensor| -> usize { t.shape.iter().map(|&d| encoded_len_varint(d as u64)).sum() };
    let output_len = |t: &HostTensor| {
        let shape = shape_len(t);
        string(&t.name) + string(t.datatype().as_str()) + if shape == 0 { 0 } else { field(shape) }
    };
    let mut inner = string(resp.model_name) + string(resp.model_version) + string(resp.id);
    for t in resp.outputs {
        inner += field(output_len(t)) + field(t.raw_len());
    }
    for (k, v) in params {
        inner += field(entry_len(k, v));
    }
    // Reply field 1 (the response), length-delimited.
    let body = field(inner);
    let mut out = Out(Vec::with_capacity(HEADER_LEN + body));
    out.bytes(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
    out.delimited(1, inner);
    out.string(1, resp.model_name);
    out.string(2, resp.model_version);
    out.string(3, resp.id);
    // ModelInferResponse.outputs is field 5, raw_output_contents field 6.
    for t in resp.outputs {
        out.delimited(5, output_len(t));
        out.string(1, &t.name);
        out.string(2, t.datatype().as_str());
        let shape = shape_len(t);
        if shape > 0 {
            out.delimited(3, shape);
            for &d in &t.shape {
                out.varint(d as u64);
            }
        }
    }
    for t in resp.outputs {
        out.delimited(6, t.raw_len());
        t.write_raw(&mut out.0)?;
    }
    for (k, v) in params {
        // ModelInferResponse.parameters is field 4.
        out.delimited(4, entry_len(k, v));
        out.string(1, k);
        out.delimited(2, value_len(v));
        match *v {
            ParamRef::Bool(b) => {
                out.key(1, VARINT);
                out.varint(u64::from(b));
            }
            ParamRef::Int(i) => {
                out.key(2, VARINT);
                out.varint(i as u64);
            }
            ParamRef::Str(s) => {
                out.delimited(3, s.len());
                out.bytes(s.as_bytes());
            }
        }
    }
    Ok(Bytes::from(out.0))
}

/// Protobuf's wire types, as a key's low three bits.
const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

/// A protobuf writer over a buffer sized beforehand: each byte a push
/// within capacity, where `BufMut`'s calls cost a capacity check and a
/// call per field (a third of the reply's instructions).
struct Out(Vec<u8>);

impl Out {
    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    #[inline]
    fn key(&mut self, tag: u32, wire_type: u32) {
        self.varint(u64::from((tag << 3) | wire_type));
    }

    /// A length-delimited field's key and length; its body follows.
    #[inline]
    fn delimited(&mut self, tag: u32, len: usize) {
        self.key(tag, LENGTH_DELIMITED);
        self.varint(len as u64);
    }

    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    /// A string field, left out when empty (proto3's default).
    #[inline]
    fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.delimited(tag, s.len());
            self.bytes(s.as_bytes());
        }
    }
}

/// The reply envelope of a result.
pub fn reply_ok(resp: ModelInferResponse) -> Reply {
    Reply {
        result: Some(reply::Result::Response(resp)),
    }
}

/// The reply envelope of an error.
pub fn reply_error(code: Code, message: String) -> Reply {
    Reply {
        result: Some(reply::Result::Status(Status {
            code: code as i32,
            message,
        })),
    }
}

/// What a reply envelope says.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ReplyError {
    /// The server answered with an error status.
    #[error("{code}: {message}")]
    Status { code: Code, message: String },
    /// The envelope holds neither a response nor a status.
    #[error("reply holds neither a response nor a status")]
    Empty,
}

/// Opens a reply envelope: the response, or the status the server sent.
pub fn open_reply(reply: Reply) -> Result<ModelInferResponse, ReplyError> {
    match reply.result {
        Some(reply::Result::Response(r)) => Ok(r),
        Some(reply::Result::Status(s)) => Err(ReplyError::Status {
            code: Code::from_i32(s.code),
            message: s.message,
        }),
        None => Err(ReplyError::Empty),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proto::ModelInferRequest;

    #[test]
    fn header_within_limit_gives_its_length() {
        assert_eq!(body_len(7u32.to_be_bytes(), 10).ok(), Some(7));
        assert_eq!(body_len(10u32.to_be_bytes(), 10).ok(), Some(10));
    }

    #[test]
    fn header_over_limit_is_refused() {
        match body_len(11u32.to_be_bytes(), 10) {
            Err(FrameError::TooLarge { declared, limit }) => {
                assert_eq!((declared, limit), (11, 10));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn encode_prefixes_the_body_length_and_decode_reverses_it() {
        let msg = reply_error(Code::InvalidArgument, "bad".into());
        let frame = encode(&msg);
        let len = body_len(frame[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
        assert_eq!(len, frame.len() - HEADER_LEN);
        let back: Reply = decode(frame, u32::MAX).expect("decodes");
        assert_eq!(back, msg);
        assert_eq!(
            open_reply(back),
            Err(ReplyError::Status {
                code: Code::InvalidArgument,
                message: "bad".into()
            })
        );
    }

    #[test]
    fn a_whole_stream_must_be_exactly_one_frame() {
        let frame = encode(&ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        });
        let short = frame.slice(..frame.len() - 1);
        assert!(matches!(
            decode::<ModelInferRequest>(short, 1024),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = frame.to_vec();
        long.push(0);
        assert_eq!(
            decode::<ModelInferRequest>(long.into(), 1024),
            Err(FrameError::Trailing { extra: 1 })
        );
        assert!(matches!(
            decode::<ModelInferRequest>(frame.clone(), 1),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            decode::<ModelInferRequest>(frame, 1024).unwrap().model_name,
            "m"
        );
        assert!(matches!(
            decode::<ModelInferRequest>(Bytes::from_static(&[0, 0]), 1024),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
    }

    #[test]
    fn appended_fields_merge_into_the_message() {
        let extra = ModelInferRequest {
            id: "late".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let frame = encode_with(
            &ModelInferRequest {
                model_name: "m".into(),
                id: "early".into(),
                ..Default::default()
            },
            &extra,
        );
        let req: ModelInferRequest = decode(frame, 1024).unwrap();
        assert_eq!((req.model_name.as_str(), req.id.as_str()), ("m", "late"));
    }

    #[test]
    fn a_borrowed_response_decodes_as_the_message_prost_would_build() {
        use crate::kserve::outputs_to_proto;
        use crate::proto::inference::InferParameter;
        use crate::proto::inference::infer_parameter::ParameterChoice;
        use crate::tensor::TensorData;
        let outputs = [
            HostTensor::new("OUTPUT0", vec![1, 2], TensorData::F32(vec![1.0, -2.5])).unwrap(),
            // A scalar (no shape field), an empty tensor, wide dimensions
            // (multi-byte varints) and every kind of element layout.
            HostTensor::new("", vec![], TensorData::I64(vec![-7])).unwrap(),
            HostTensor::new("empty", vec![0, 300], TensorData::F64(vec![])).unwrap(),
            HostTensor::new("flags", vec![200], TensorData::Bool(vec![true; 200])).unwrap(),
            HostTensor::new(
                "text",
                vec![2],
                TensorData::Bytes(vec![b"ab".to_vec(), Vec::new()]),
            )
            .unwrap(),
            HostTensor::new("u16", vec![1, 1], TensorData::U16(vec![65535])).unwrap(),
        ];
        let long = "d".repeat(300);
        let params = [
            ("quiver_batch_size", ParamRef::Int(3)),
            ("quiver_queue_time_us", ParamRef::Int(0)),
            ("negative", ParamRef::Int(-5)),
            ("big", ParamRef::Int(i64::MAX)),
            ("quiver_path", ParamRef::Str("local")),
            ("empty", ParamRef::Str("")),
            ("long", ParamRef::Str(&long)),
            ("flag", ParamRef::Bool(true)),
            ("off", ParamRef::Bool(false)),
            ("", ParamRef::Int(1)),
        ];
        for (name, version, id, outputs, params) in [
            ("identity", "1", "r-7", &outputs[..], &params[..]),
            ("m", "", "", &outputs[..1], &params[..0]),
            ("", "12", "x", &outputs[..0], &params[9..]),
        ] {
            let resp = ResponseRef {
                model_name: name,
                model_version: version,
                id,
                outputs,
            };
            let frame = encode_response(&resp, params).unwrap();
            let len = body_len(frame[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
            assert_eq!(len, frame.len() - HEADER_LEN);
            // What prost encodes from the message built the long way.
            let (proto_outputs, raw) = outputs_to_proto(outputs.to_vec());
            let mut want = ModelInferResponse {
                model_name: name.into(),
                model_version: version.into(),
                id: id.into(),
                outputs: proto_outputs,
                raw_output_contents: raw,
                ..Default::default()
            };
            if params.is_empty() {
                // Field for field prost's own bytes.
                assert_eq!(frame, encode(&reply_ok(want.clone())));
            }
            for (k, v) in params {
                let choice = match *v {
                    ParamRef::Bool(b) => ParameterChoice::BoolParam(b),
                    ParamRef::Int(i) => ParameterChoice::Int64Param(i),
                    ParamRef::Str(s) => ParameterChoice::StringParam(s.into()),
                };
                want.parameters.insert(
                    (*k).into(),
                    InferParameter {
                        parameter_choice: Some(choice),
                    },
                );
            }
            let reply: Reply = decode(frame, u32::MAX).unwrap();
            assert_eq!(reply, reply_ok(want));
        }
    }

    #[test]
    fn write_raw_appends_what_to_raw_returns() {
        use crate::tensor::TensorData;
        let t = HostTensor::new("x", vec![3], TensorData::I16(vec![-1, 2, 300])).unwrap();
        let mut out = vec![9u8];
        t.write_raw(&mut out).unwrap();
        assert_eq!(out[0], 9);
        assert_eq!(&out[1..], t.to_raw().as_slice());
        assert_eq!(out.len() - 1, t.raw_len());
    }
}
