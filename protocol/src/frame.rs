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

use crate::proto::ModelInferResponse;
use crate::proto::native::{Reply, Status, reply};
use crate::status::Code;

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

/// Encodes `Reply { response: resp }` as one frame, with `params` added to
/// the response's `parameters` map.
///
/// The parameters are written straight from borrowed names and values, as
/// map entries after the response's own fields (protobuf merges them into
/// the map), instead of first being built as a `HashMap<String,
/// InferParameter>` (an allocation per name and per string value, and a
/// hash per insert). A reader decodes the same message as if the map had
/// held them; a name also in `resp.parameters` is read as `params`' value.
pub fn encode_response(resp: &ModelInferResponse, params: &[(&str, ParamRef<'_>)]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    // InferParameter's body: its one choice.
    let value_len = |v: &ParamRef<'_>| match *v {
        // Tag byte and the varint.
        ParamRef::Bool(_) => 2,
        ParamRef::Int(i) => 1 + encoded_len_varint(i as u64),
        ParamRef::Str(s) => 1 + encoded_len_varint(s.len() as u64) + s.len(),
    };
    // The map entry's body: key (field 1), value (field 2).
    let entry_len = |k: &str, v: &ParamRef<'_>| {
        let value = value_len(v);
        1 + encoded_len_varint(k.len() as u64)
            + k.len()
            + 1
            + encoded_len_varint(value as u64)
            + value
    };
    let params_len: usize = params
        .iter()
        .map(|(k, v)| {
            let entry = entry_len(k, v);
            1 + encoded_len_varint(entry as u64) + entry
        })
        .sum();
    let inner = resp.encoded_len() + params_len;
    // Reply field 1 (the response), length-delimited.
    let body = 1 + encoded_len_varint(inner as u64) + inner;
    let mut buf = BytesMut::with_capacity(HEADER_LEN + body);
    buf.put_u32(u32::try_from(body).unwrap_or(u32::MAX));
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(inner as u64, &mut buf);
    resp.encode_raw(&mut buf);
    for (k, v) in params {
        // ModelInferResponse.parameters is field 4.
        encode_key(4, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(k, v) as u64, &mut buf);
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(k.len() as u64, &mut buf);
        buf.put_slice(k.as_bytes());
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(value_len(v) as u64, &mut buf);
        match *v {
            ParamRef::Bool(b) => {
                encode_key(1, WireType::Varint, &mut buf);
                encode_varint(u64::from(b), &mut buf);
            }
            ParamRef::Int(i) => {
                encode_key(2, WireType::Varint, &mut buf);
                encode_varint(i as u64, &mut buf);
            }
            ParamRef::Str(s) => {
                encode_key(3, WireType::LengthDelimited, &mut buf);
                encode_varint(s.len() as u64, &mut buf);
                buf.put_slice(s.as_bytes());
            }
        }
    }
    buf.freeze()
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
    fn borrowed_parameters_decode_as_the_map_prost_would_build() {
        use crate::proto::inference::InferParameter;
        use crate::proto::inference::infer_parameter::ParameterChoice;
        use crate::proto::inference::model_infer_response::InferOutputTensor;
        let resp = ModelInferResponse {
            model_name: "identity".into(),
            model_version: "1".into(),
            id: "r-7".into(),
            outputs: vec![InferOutputTensor {
                name: "OUTPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64])],
            ..Default::default()
        };
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
        ];
        let frame = encode_response(&resp, &params);
        let len = body_len(frame[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
        assert_eq!(len, frame.len() - HEADER_LEN);
        let reply: Reply = decode(frame, u32::MAX).unwrap();
        // What prost encodes from the same response with the map filled in.
        let mut want = resp.clone();
        for (k, v) in params {
            let choice = match v {
                ParamRef::Bool(b) => ParameterChoice::BoolParam(b),
                ParamRef::Int(i) => ParameterChoice::Int64Param(i),
                ParamRef::Str(s) => ParameterChoice::StringParam(s.into()),
            };
            want.parameters.insert(
                k.into(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            );
        }
        assert_eq!(reply, reply_ok(want));
        // No parameters: exactly prost's own encoding of the reply.
        assert_eq!(encode_response(&resp, &[]), encode(&reply_ok(resp)));
    }
}
