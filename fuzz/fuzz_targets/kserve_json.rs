//! A KServe v2 JSON request body: the decoders never panic (JSON nested
//! past serde_json's depth limit included), the REST decoder and the
//! JSON-to-protobuf path agree, and every tensor that decodes survives
//! `tensor_to_json` and back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_protocol::{binary, json, kserve};

fuzz_target!(|data: &[u8]| {
    let rest = binary::decode_request(data, None);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert!(rest.is_err(), "REST accepted what is not JSON");
        return;
    };
    let proto = json::request_from_json("m", &v);
    match (&rest, &proto) {
        (Ok(r), Ok(p)) => {
            let inputs = kserve::inputs_from_proto(p.inputs.clone(), &p.raw_input_contents)
                .expect("the protobuf request built from JSON decodes");
            assert_eq!(inputs, r.inputs, "REST and JSON-to-protobuf disagree");
            for t in &r.inputs {
                let back = json::tensor_from_json(&json::tensor_to_json(t))
                    .expect("an encoded tensor decodes");
                assert_eq!(&back, t, "JSON tensor round trip");
            }
        }
        (Err(_), _) | (_, Err(_)) => {}
    }
});
