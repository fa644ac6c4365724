//! Writes the seed corpus of the fuzz targets in `fuzz/` (one file per
//! seed, under `fuzz/corpus/TARGET/`): valid requests of each protocol and
//! datatype, and the lies the adversarial suite tells (lengths past the end,
//! negative and overflowing dimensions, BYTES elements that run past the
//! end). The committed corpus was made with
//!
//!     cargo run -p quiver-protocol --example fuzz_seeds -- fuzz/corpus
//!
//! and the fuzzer grows its own copy from there.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use quiver_protocol::binary::{self, BinaryOutputs, ResponseHead};
use quiver_protocol::kserve::{int_param, outputs_to_proto, request_to_proto};
use quiver_protocol::proto::ModelInferResponse;
use quiver_protocol::status::Code;
use quiver_protocol::{DataType, HostTensor, TensorData, frame};

fn tensors() -> Vec<HostTensor> {
    vec![
        HostTensor::new(
            "f32",
            vec![1, 3],
            TensorData::F32(vec![1.0, -0.5, f32::NAN]),
        )
        .unwrap(),
        HostTensor::new("i64", vec![2], TensorData::I64(vec![i64::MIN, 7])).unwrap(),
        HostTensor::new("bool", vec![2, 1], TensorData::Bool(vec![true, false])).unwrap(),
        HostTensor::new(
            "text",
            vec![1, 2],
            TensorData::Bytes(vec![b"hello".to_vec(), b"\xff\x00".to_vec()]),
        )
        .unwrap(),
        HostTensor::new("u8", vec![0], TensorData::U8(vec![])).unwrap(),
    ]
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let out = Path::new(&out);
    let all = tensors();
    let params = HashMap::from([
        ("timeout".to_string(), int_param(5000)),
        ("priority".to_string(), int_param(1)),
    ]);

    // native_frame: requests, replies, and frames whose lengths lie.
    let req = request_to_proto("identity", "7", &all, params.clone());
    let f = frame::encode(&req);
    write(out, "native_frame", "request", &f);
    write(out, "native_frame", "truncated", &f[..f.len() / 2]);
    let mut long = f.to_vec();
    long.extend_from_slice(b"trailing");
    write(out, "native_frame", "trailing", &long);
    write(
        out,
        "native_frame",
        "absurd_length",
        &[0xff, 0xff, 0xff, 0xff, 1],
    );
    let (outputs, raw_output_contents) = outputs_to_proto(all.clone());
    let resp = ModelInferResponse {
        model_name: "identity".into(),
        model_version: "1".into(),
        id: "7".into(),
        parameters: params.clone(),
        outputs,
        raw_output_contents,
    };
    write(
        out,
        "native_frame",
        "reply_ok",
        &frame::encode(&frame::reply_ok(resp.clone())),
    );
    write(
        out,
        "native_frame",
        "reply_error",
        &frame::encode(&frame::reply_error(Code::InvalidArgument, "bad".into())),
    );

    // kserve_json: JSON requests, valid and not.
    let json_seeds: [(&str, &str); 6] = [
        (
            "nested",
            r#"{"id":"1","parameters":{"timeout":5000},"inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"data":[[1,2],[3,4.5]]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
        ),
        (
            "bytes",
            r#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1,2],"data":["a","\u00e9"]}]}"#,
        ),
        (
            "ints",
            r#"{"inputs":[{"name":"a","datatype":"INT8","shape":[2],"data":[-128,127]},{"name":"b","datatype":"UINT64","shape":[1],"data":[18446744073709551615]}]}"#,
        ),
        (
            "negative_shape",
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,2],"data":[1,2]}]}"#,
        ),
        (
            "overflowing_shape",
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[4294967296,4294967296,16],"data":[]}]}"#,
        ),
        (
            "unknown_dtype",
            r#"{"inputs":[{"name":"x","datatype":"FP8","shape":[1],"data":[1]}]}"#,
        ),
    ];
    for (name, text) in json_seeds {
        write(out, "kserve_json", name, text.as_bytes());
    }

    // binary_body: u16 LE header length (0xFFFF: none), then the body.
    let with_len = |json_len: Option<usize>, body: &[u8]| {
        let n = json_len.map_or(u16::MAX, |n| u16::try_from(n).unwrap());
        let mut v = n.to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    let (body, json_len) = binary::encode_request("7", &all, &params);
    write(
        out,
        "binary_body",
        "request",
        &with_len(Some(json_len), &body),
    );
    write(
        out,
        "binary_body",
        "short",
        &with_len(Some(json_len), &body[..body.len() - 3]),
    );
    write(
        out,
        "binary_body",
        "header_past_end",
        &with_len(Some(body.len() + 1), &body),
    );
    let head = ResponseHead {
        model_name: "identity",
        model_version: "1",
        id: "7",
        parameters: &params,
    };
    let binary = BinaryOutputs {
        all: false,
        names: vec!["f32".into(), "text".into()],
    };
    let (body, json_len) = binary::encode_response(&head, &all, &binary);
    write(out, "binary_body", "response", &with_len(json_len, &body));

    // raw_tensor: datatype index, rank, i64 LE dimensions, contents.
    let raw_seed = |dt: DataType, shape: &[i64], raw: &[u8]| {
        let index = DataType::ALL.iter().position(|d| *d == dt).unwrap();
        let mut v = vec![
            u8::try_from(index).unwrap(),
            u8::try_from(shape.len()).unwrap(),
        ];
        for d in shape {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(raw);
        v
    };
    for t in &all {
        let shape: Vec<i64> = t.shape.iter().map(|&d| i64::try_from(d).unwrap()).collect();
        write(
            out,
            "raw_tensor",
            &t.name,
            &raw_seed(t.datatype(), &shape, &t.to_raw()),
        );
    }
    let mut past_end = 3u32.to_le_bytes().to_vec();
    past_end.extend_from_slice(b"ab");
    write(
        out,
        "raw_tensor",
        "bytes_past_end",
        &raw_seed(DataType::Bytes, &[1], &past_end),
    );
    write(
        out,
        "raw_tensor",
        "huge_bytes_count",
        &raw_seed(DataType::Bytes, &[i64::MAX], &[0, 0, 0, 0]),
    );
    write(
        out,
        "raw_tensor",
        "negative",
        &raw_seed(DataType::Fp32, &[-1, 4], &[0; 16]),
    );
    write(
        out,
        "raw_tensor",
        "overflow",
        &raw_seed(DataType::Fp64, &[1 << 32, 1 << 32, 1 << 32], &[]),
    );
    println!("seeds written under {}", out.display());
}
