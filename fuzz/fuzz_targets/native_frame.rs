//! A `quiver/1` request stream and a reply stream, as a peer may send them:
//! the frame decoder never panics, and what decodes survives the round trip
//! (encode, then decode, gives the same message; the tensors a request
//! carries re-encode to the same raw bytes); and where the plain decoder
//! (`quiver_protocol::plain`) takes a body, it reads what prost and
//! `inputs_from_proto` read, and where its reply peek takes one, what prost
//! reads of the reply.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::frame;
use quiver_protocol::kserve;
use quiver_protocol::plain;
use quiver_protocol::proto::ModelInferRequest;
use quiver_protocol::proto::native::Reply;

/// `server.max_frame_bytes`'s default.
const LIMIT: u32 = 16 << 20;

/// Whether two decoded messages are the same. `==` is exact but a NaN (in
/// typed contents or a double parameter) is not equal to itself; then the
/// two must print the same characters (map order aside) and hold a NaN.
fn same<M: PartialEq + std::fmt::Debug>(a: &M, b: &M) -> bool {
    if a == b {
        return true;
    }
    let sorted = |m: &M| {
        let mut c: Vec<char> = format!("{m:?}").chars().collect();
        c.sort_unstable();
        c
    };
    format!("{a:?}").contains("NaN") && sorted(a) == sorted(b)
}

/// Where the plain decoder takes `body`, prost and `inputs_from_proto` take
/// it too and read the same request.
fn plain_reads_what_prost_reads(body: &[u8]) {
    if let Some(fast) = plain::decode_plain(body) {
        let req = <ModelInferRequest as prost::Message>::decode(body)
            .expect("a body the plain decoder takes, prost takes");
        let generic = plain::PlainRequest::from_proto(req)
            .expect("tensors the plain decoder takes, inputs_from_proto takes");
        assert!(
            same(&fast, &generic),
            "plain decode: {fast:?} != {generic:?}"
        );
    }
}

/// Where the reply peek (`plain::peek_reply`) takes `body`, prost takes it
/// too and reads the same reply.
fn peek_reads_what_prost_reads(body: &[u8]) {
    use quiver_protocol::proto::native::reply;
    if let Some(peek) = plain::peek_reply(body) {
        let reply = <Reply as prost::Message>::decode(body)
            .expect("a reply the peek takes, prost takes");
        match (peek, reply.result) {
            (plain::ReplyPeek::Response(p), Some(reply::Result::Response(m))) => {
                assert!(p.reads_as(&m), "reply peek: {p:?} != {m:?}");
            }
            (plain::ReplyPeek::Status { code, message }, Some(reply::Result::Status(s))) => {
                assert_eq!((code, message), (s.code, s.message.as_str()), "status peek");
            }
            (peek, result) => panic!("reply peek: {peek:?} != {result:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The corpus holds frames: their bodies are after the header.
    for body in [data, data.get(frame::HEADER_LEN..).unwrap_or_default()] {
        plain_reads_what_prost_reads(body);
        peek_reads_what_prost_reads(body);
    }
    let stream = Bytes::copy_from_slice(data);
    if let Ok(req) = frame::decode::<ModelInferRequest>(stream.clone(), LIMIT) {
        let again: ModelInferRequest =
            frame::decode(frame::encode(&req), u32::MAX).expect("an encoded request decodes");
        assert!(
            same(&again, &req),
            "request round trip: {again:?} != {req:?}"
        );
        let _ = kserve::schedule_policy(&req.parameters);
        if let Ok(inputs) = kserve::inputs_from_proto(req.inputs, &req.raw_input_contents) {
            let re =
                kserve::request_to_proto(&req.model_name, &req.id, &inputs, Default::default());
            let back = kserve::inputs_from_proto(re.inputs, &re.raw_input_contents)
                .expect("re-encoded inputs decode");
            assert_eq!(back.len(), inputs.len());
            for (a, b) in inputs.iter().zip(&back) {
                // Raw bytes, not `==`: a NaN is not equal to itself.
                assert_eq!(
                    (&a.name, &a.shape, a.to_raw()),
                    (&b.name, &b.shape, b.to_raw())
                );
            }
        }
    }
    if let Ok(reply) = frame::decode::<Reply>(stream, LIMIT) {
        let again: Reply = frame::decode(frame::encode(&reply), u32::MAX).expect("reply decodes");
        assert!(
            same(&again, &reply),
            "reply round trip: {again:?} != {reply:?}"
        );
        if let Ok(resp) = frame::open_reply(reply) {
            let _ = kserve::outputs_from_proto(&resp);
        }
    }
});
