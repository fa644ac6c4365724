//! Hot paths of the QUIC native wire: encoding and decoding a request frame
//! (`gateway::framing` + prost), and the raw tensor layout
//! (`HostTensor::to_raw` / `from_raw`) that `raw_input_contents` and the
//! binary tensor extension use. Sizes: a 1x16 FP32 identity input and a
//! 64x1024 one (256 KiB).
#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use quiver_gateway::framing::{self, HEADER_LEN};
use quiver_gateway::proto::ModelInferRequest;
use quiver_gateway::tensor::{request_from_proto, request_to_proto};
use quiver_kernels::{DataType, HostTensor, TensorData};

fn tensor(rows: usize, cols: usize) -> HostTensor {
    let data = (0..rows * cols).map(|i| i as f32 * 0.5).collect();
    HostTensor::new("INPUT0", vec![rows, cols], TensorData::F32(data))
        .expect("the element count matches the shape")
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (rows, cols) in [(1, 16), (64, 1024)] {
        let t = tensor(rows, cols);
        let req = request_to_proto("identity", "7", std::slice::from_ref(&t), HashMap::new());
        let frame = framing::encode(&req);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("encode/{rows}x{cols}"), |b| {
            b.iter(|| framing::encode(black_box(&req)))
        });
        g.bench_function(format!("decode/{rows}x{cols}"), |b| {
            b.iter(|| {
                let f: &Bytes = black_box(&frame);
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(&f[..HEADER_LEN]);
                let len = framing::body_len(header, u32::MAX).expect("within the limit");
                ModelInferRequest::decode(f.slice(HEADER_LEN..HEADER_LEN + len))
                    .expect("a frame we encoded")
            })
        });
        g.bench_function(format!("decode_to_request/{rows}x{cols}"), |b| {
            b.iter(|| {
                let f: &Bytes = black_box(&frame);
                let msg = ModelInferRequest::decode(f.slice(HEADER_LEN..)).expect("valid");
                request_from_proto(msg).expect("valid")
            })
        });
    }
    g.finish();
}

fn raw_tensors(c: &mut Criterion) {
    let mut g = c.benchmark_group("tensor_raw");
    for (rows, cols) in [(1, 16), (64, 1024)] {
        let t = tensor(rows, cols);
        let raw = t.to_raw();
        let shape = [rows as i64, cols as i64];
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(format!("encode/{rows}x{cols}"), |b| {
            b.iter(|| black_box(&t).to_raw())
        });
        g.bench_function(format!("decode/{rows}x{cols}"), |b| {
            b.iter(|| {
                HostTensor::from_raw("INPUT0", DataType::Fp32, &shape, black_box(&raw))
                    .expect("valid")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, raw_tensors);
criterion_main!(benches);
