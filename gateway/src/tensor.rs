//! The Open Inference Protocol's protobuf messages to and from Quiver's
//! [`InferRequest`] / [`InferResponse`].
//!
//! The tensor codecs are `quiver_protocol::kserve`'s (re-exported here);
//! this module adds what only the gateway knows: its request type and the
//! parameters that say how a request was served.

use std::collections::HashMap;

use quiver_protocol::kserve::{inputs_from_proto, outputs_to_proto};
pub use quiver_protocol::kserve::{
    int_param, outputs_from_proto, request_to_proto, response_int, response_str, schedule_policy,
    string_param,
};
use quiver_protocol::plain::PlainRequest;

use crate::error::GatewayError;
use crate::proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use crate::request::{InferRequest, InferResponse, Served, params};

/// Decodes a protobuf request into the gateway's request type.
pub fn request_from_proto(req: ModelInferRequest) -> Result<InferRequest, GatewayError> {
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = req;
    let inputs = inputs_from_proto(inputs, &raw_input_contents)?;
    let (priority, timeout) = schedule_policy(&parameters)?;
    let (truncate, truncation_side) = truncation(&parameters)?;
    Ok(InferRequest {
        model: model_name,
        version: model_version,
        rtt: None,
        id,
        inputs,
        outputs: outputs.into_iter().map(|o| o.name).collect(),
        priority,
        timeout,
        truncate,
        truncation_side,
    })
}

/// A request decoded by `quiver_protocol::plain` (its raw contents already
/// tensors) as the gateway's request type: what [`request_from_proto`]
/// gives for the same bytes.
pub fn request_from_plain(req: PlainRequest) -> Result<InferRequest, GatewayError> {
    let (priority, timeout) = schedule_policy(&req.parameters)?;
    let (truncate, truncation_side) = truncation(&req.parameters)?;
    Ok(InferRequest {
        model: req.model_name,
        version: req.model_version,
        rtt: None,
        id: req.id,
        inputs: req.inputs,
        outputs: req.outputs,
        priority,
        timeout,
        truncate,
        truncation_side,
    })
}

/// The `truncate` (bool) and `truncation_direction` (`right` or `left`) request
/// parameters of a text model's request.
pub fn truncation(
    parameters: &HashMap<String, InferParameter>,
) -> Result<(Option<bool>, quiver_kernels::TruncationSide), GatewayError> {
    use crate::proto::inference::infer_parameter::ParameterChoice;
    let choice = |name: &str| {
        parameters
            .get(name)
            .and_then(|p| p.parameter_choice.as_ref())
    };
    let truncate = match choice(params::TRUNCATE) {
        None => None,
        Some(ParameterChoice::BoolParam(b)) => Some(*b),
        Some(_) => {
            return Err(GatewayError::InvalidArgument(format!(
                "parameter '{}' must be a boolean",
                params::TRUNCATE
            )));
        }
    };
    let side = match choice(params::TRUNCATION_DIRECTION) {
        None => quiver_kernels::TruncationSide::Right,
        Some(ParameterChoice::StringParam(s)) => truncation_side(s)?,
        Some(_) => {
            return Err(GatewayError::InvalidArgument(format!(
                "parameter '{}' must be a string: right or left",
                params::TRUNCATION_DIRECTION
            )));
        }
    };
    Ok((truncate, side))
}

/// `right` or `left` (any case, as TEI's `Right` / `Left`).
pub fn truncation_side(s: &str) -> Result<quiver_kernels::TruncationSide, GatewayError> {
    if s.eq_ignore_ascii_case("right") {
        Ok(quiver_kernels::TruncationSide::Right)
    } else if s.eq_ignore_ascii_case("left") {
        Ok(quiver_kernels::TruncationSide::Left)
    } else {
        Err(GatewayError::InvalidArgument(format!(
            "truncation_direction must be right or left, got '{s}'"
        )))
    }
}

/// Encodes a computed answer, outputs in `raw_output_contents`, with the
/// batch it was computed in as response parameters.
pub fn response_to_proto(resp: InferResponse) -> ModelInferResponse {
    let parameters = response_parameters(&resp);
    let (outputs, raw_output_contents) = outputs_to_proto(resp.outputs);
    ModelInferResponse {
        model_name: resp.model,
        model_version: resp.version.to_string(),
        id: resp.id,
        parameters,
        outputs,
        raw_output_contents,
    }
}

/// Every response parameter of an answer: [`served_parameters`], the local
/// device that computed it, the round trip set aside from its deadline, and
/// for a text model `quiver_truncated`, the inputs cut to its token limit.
pub fn response_parameters(resp: &InferResponse) -> HashMap<String, InferParameter> {
    let mut parameters = served_parameters(&resp.served);
    if let Some(device) = &resp.device {
        parameters.insert(params::DEVICE.into(), string_param(device));
    }
    if !resp.rtt_reserved.is_zero() {
        parameters.insert(
            params::RTT_RESERVED_US.into(),
            int_param(i64::try_from(resp.rtt_reserved.as_micros()).unwrap_or(i64::MAX)),
        );
    }
    if let Some(usage) = resp.usage {
        parameters.insert(
            params::TRUNCATED.into(),
            int_param(i64::from(usage.truncated)),
        );
    }
    parameters
}

/// Where and how a request was computed, as response parameters.
pub fn served_parameters(served: &Served) -> HashMap<String, InferParameter> {
    // Room for these and `response_parameters`' own, so the map is built
    // without growing.
    let mut parameters = HashMap::with_capacity(10);
    match served {
        Served::Local(batch) => {
            parameters.insert(
                params::BATCH_SIZE.into(),
                int_param(i64::from(batch.batch_size)),
            );
            parameters.insert(
                params::BATCH_ROWS.into(),
                int_param(i64::from(batch.batch_rows)),
            );
            parameters.insert(
                params::QUEUE_TIME_US.into(),
                int_param(i64::try_from(batch.queue_time.as_micros()).unwrap_or(i64::MAX)),
            );
            parameters.insert(
                params::COMPUTE_TIME_US.into(),
                int_param(i64::try_from(batch.compute_time.as_micros()).unwrap_or(i64::MAX)),
            );
            parameters.insert(
                params::DISPATCH_REASON.into(),
                string_param(batch.reason.as_str()),
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
            parameters.insert(params::UPSTREAM.into(), string_param(&up.endpoint));
            parameters.insert(
                params::OVERFLOW_REASON.into(),
                string_param(up.reason.as_str()),
            );
        }
    }
    parameters.insert(params::PATH.into(), string_param(served.path()));
    parameters
}

/// The response parameters of an answer computed here, held as values for
/// `frame::encode_response` (QUIC native), which writes them into the frame
/// without building the map: the same names and values as
/// [`response_parameters`] gives for it.
#[derive(Debug)]
pub struct LocalParameters {
    batch: crate::request::LocalBatch,
    device: Option<std::sync::Arc<str>>,
    rtt_reserved_us: Option<i64>,
    truncated: Option<i64>,
}

/// Parameters of a local answer, at most.
const LOCAL_PARAMETERS: usize = 9;

impl LocalParameters {
    /// Names and borrowed values, in a fixed array and its used length.
    pub fn pairs<'a>(&'a self) -> ([(&'static str, ParamRef<'a>); LOCAL_PARAMETERS], usize) {
        let us = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let mut out: [(&'static str, ParamRef<'_>); LOCAL_PARAMETERS] =
            [("", ParamRef::Bool(false)); LOCAL_PARAMETERS];
        let mut n = 0;
        let mut push = |name: &'static str, value: ParamRef<'a>| {
            if let Some(slot) = out.get_mut(n) {
                *slot = (name, value);
                n += 1;
            }
        };
        push(
            params::BATCH_SIZE,
            ParamRef::Int(i64::from(self.batch.batch_size)),
        );
        push(
            params::BATCH_ROWS,
            ParamRef::Int(i64::from(self.batch.batch_rows)),
        );
        push(
            params::QUEUE_TIME_US,
            ParamRef::Int(us(self.batch.queue_time)),
        );
        push(
            params::COMPUTE_TIME_US,
            ParamRef::Int(us(self.batch.compute_time)),
        );
        push(
            params::DISPATCH_REASON,
            ParamRef::Str(self.batch.reason.as_str()),
        );
        push(
            params::PATH,
            ParamRef::Str(Served::Local(self.batch).path()),
        );
        if let Some(device) = &self.device {
            push(params::DEVICE, ParamRef::Str(device));
        }
        if let Some(us) = self.rtt_reserved_us {
            push(params::RTT_RESERVED_US, ParamRef::Int(us));
        }
        if let Some(t) = self.truncated {
            push(params::TRUNCATED, ParamRef::Int(t));
        }
        (out, n)
    }
}

pub use quiver_protocol::frame::ParamRef;

/// The parameters of an answer computed here, taken out of it as
/// [`LocalParameters`] for `frame::encode_response`, which writes the answer
/// without building its protobuf message. An answer an upstream computed
/// gives `None` (its parameters pass through as received: use
/// [`response_to_proto`]).
pub fn local_parameters(resp: &mut InferResponse) -> Option<LocalParameters> {
    let Served::Local(batch) = resp.served else {
        return None;
    };
    Some(LocalParameters {
        batch,
        device: resp.device.take(),
        rtt_reserved_us: (!resp.rtt_reserved.is_zero())
            .then(|| i64::try_from(resp.rtt_reserved.as_micros()).unwrap_or(i64::MAX)),
        truncated: resp.usage.map(|u| i64::from(u.truncated)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod local_parameters_tests {
    use super::*;
    use crate::request::LocalBatch;
    use quiver_batching::DispatchReason;
    use quiver_protocol::frame::{ResponseRef, decode, encode_response, open_reply};
    use std::time::Duration;

    #[test]
    fn a_local_answer_encodes_the_parameters_the_map_would_hold() {
        let batch = LocalBatch {
            batch_size: 3,
            batch_rows: 5,
            queue_time: Duration::from_micros(120),
            compute_time: Duration::from_micros(7),
            reason: DispatchReason::Inline,
        };
        for (device, rtt, usage) in [
            (None, Duration::ZERO, None),
            (
                Some("sim:1".into()),
                Duration::from_micros(250),
                Some(crate::request::TextUsage {
                    tokens: 9,
                    truncated: 2,
                }),
            ),
        ] {
            let resp = InferResponse {
                model: "m".into(),
                version: 4,
                rtt_reserved: rtt,
                device,
                id: "x".into(),
                outputs: vec![
                    quiver_protocol::tensor::HostTensor::new(
                        "OUTPUT0",
                        vec![1, 2],
                        quiver_protocol::tensor::TensorData::F32(vec![0.5, -1.0]),
                    )
                    .unwrap(),
                ],
                served: Served::Local(batch),
                usage,
            };
            let want = response_to_proto(resp.clone());
            let mut resp = resp;
            let params = local_parameters(&mut resp).unwrap();
            let (pairs, n) = params.pairs();
            let version = resp.version.to_string();
            let view = ResponseRef {
                model_name: &resp.model,
                model_version: &version,
                id: &resp.id,
                outputs: &resp.outputs,
            };
            let frame = encode_response(&view, &pairs[..n]).unwrap();
            let got = open_reply(decode(frame, u32::MAX).unwrap()).unwrap();
            assert_eq!(got, want);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod plain_tests {
    use super::*;
    use prost::Message;
    use quiver_protocol::tensor::{HostTensor, TensorData};

    #[test]
    fn a_plain_request_becomes_the_request_prost_decoding_gives() {
        let input = HostTensor::new("INPUT0", vec![1, 4], TensorData::F32(vec![1.0; 4])).unwrap();
        for parameters in [
            HashMap::new(),
            [
                ("timeout".to_owned(), int_param(2500)),
                ("priority".to_owned(), int_param(1)),
                (
                    params::TRUNCATE.to_owned(),
                    InferParameter {
                        parameter_choice: Some(
                            crate::proto::inference::infer_parameter::ParameterChoice::BoolParam(
                                true,
                            ),
                        ),
                    },
                ),
                (
                    params::TRUNCATION_DIRECTION.to_owned(),
                    string_param("left"),
                ),
            ]
            .into(),
        ] {
            let body =
                request_to_proto("identity", "r-9", std::slice::from_ref(&input), parameters)
                    .encode_to_vec();
            let plain =
                request_from_plain(quiver_protocol::plain::decode_plain(&body).unwrap()).unwrap();
            let proto =
                request_from_proto(ModelInferRequest::decode(body.as_slice()).unwrap()).unwrap();
            assert_eq!(format!("{plain:?}"), format!("{proto:?}"));
        }
        // A parameter of the wrong type: the same refusal either way.
        let body = request_to_proto(
            "identity",
            "",
            &[input],
            [("timeout".to_owned(), string_param("soon"))].into(),
        )
        .encode_to_vec();
        let plain = request_from_plain(quiver_protocol::plain::decode_plain(&body).unwrap());
        let proto = request_from_proto(ModelInferRequest::decode(body.as_slice()).unwrap());
        assert_eq!(
            plain.unwrap_err().to_string(),
            proto.unwrap_err().to_string()
        );
    }
}
