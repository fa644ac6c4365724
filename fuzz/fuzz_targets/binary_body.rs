//! A REST body with Triton's binary tensor extension: the first two bytes
//! are `Inference-Header-Content-Length` (0xFFFF: absent), the rest the
//! body. The decoders never panic, whatever the lengths claim, and a request
//! that decodes survives `encode_request` and back; a response likewise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_protocol::HostTensor;
use quiver_protocol::binary::{self, BinaryOutputs, ResponseHead};

fn same(a: &[HostTensor], b: &[HostTensor]) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        // Raw bytes, not `==`: a NaN is not equal to itself.
        assert_eq!(
            (&a.name, a.datatype(), &a.shape, a.to_raw()),
            (&b.name, b.datatype(), &b.shape, b.to_raw())
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((len, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let json_len = match u16::from_le_bytes(*len) {
        u16::MAX => None,
        n => Some(usize::from(n)),
    };
    if let Ok(req) = binary::decode_request(body, json_len) {
        let (body, json_len) = binary::encode_request(&req.id, &req.inputs, &req.parameters);
        let back = binary::decode_request(&body, Some(json_len)).expect("encoded request decodes");
        assert_eq!(back.id, req.id);
        same(&back.inputs, &req.inputs);
    }
    if let Ok(resp) = binary::decode_response(body, json_len) {
        let head = ResponseHead {
            model_name: "m",
            model_version: "1",
            id: "",
            parameters: &resp.parameters,
        };
        let all = BinaryOutputs {
            all: true,
            names: Vec::new(),
        };
        let (body, json_len) = binary::encode_response(&head, &resp.outputs, &all);
        let back = binary::decode_response(&body, json_len).expect("encoded response decodes");
        same(&back.outputs, &resp.outputs);
    }
});
