//! The KServe v2 raw binary codec: round trips for every datatype, and typed errors (never a
//! panic) for malformed bytes.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use quiver_kernels::{DataType, HostTensor, InputError, TensorData};

fn samples() -> Vec<(Vec<usize>, TensorData)> {
    vec![
        (vec![2, 2], TensorData::Bool(vec![true, false, false, true])),
        (vec![3], TensorData::U8(vec![0, 7, 255])),
        (vec![1, 3], TensorData::U16(vec![0, 0x1234, u16::MAX])),
        (vec![2], TensorData::U32(vec![0xdead_beef, 1])),
        (
            vec![2],
            TensorData::U64(vec![u64::MAX, 0x0102_0304_0506_0708]),
        ),
        (vec![3], TensorData::I8(vec![-128, 0, 127])),
        (vec![2], TensorData::I16(vec![-2, i16::MAX])),
        (vec![2, 1], TensorData::I32(vec![i32::MIN, 42])),
        (vec![2], TensorData::I64(vec![-1, i64::MAX])),
        (
            vec![2, 2],
            TensorData::F32(vec![1.5, -0.0, f32::INFINITY, f32::MIN_POSITIVE]),
        ),
        (vec![1], TensorData::F64(vec![std::f64::consts::PI])),
        (
            vec![2, 2],
            TensorData::Bytes(vec![b"hello".to_vec(), vec![], vec![0, 255], "é".into()]),
        ),
        (vec![0, 4], TensorData::F32(vec![])),
        (vec![0], TensorData::Bytes(vec![])),
    ]
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

#[test]
fn round_trip_every_datatype() {
    let mut seen = std::collections::HashSet::new();
    for (shape, data) in samples() {
        let t = HostTensor::new("T", shape.clone(), data).unwrap();
        seen.insert(t.datatype());
        let raw = t.to_raw();
        assert_eq!(raw.len(), t.raw_len());
        let back = HostTensor::from_raw("T", t.datatype(), &dims(&shape), &raw).unwrap();
        assert_eq!(back, t, "{}", t.datatype());
    }
    assert_eq!(seen.len(), DataType::ALL.len(), "a datatype is not covered");
}

#[test]
fn raw_layout_is_little_endian_with_length_prefixes() {
    let t = HostTensor::new("T", vec![2], TensorData::U32(vec![1, 0x0a0b_0c0d])).unwrap();
    assert_eq!(t.to_raw(), [1, 0, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a]);
    let b = HostTensor::new(
        "B",
        vec![2],
        TensorData::Bytes(vec![b"ab".to_vec(), vec![]]),
    )
    .unwrap();
    assert_eq!(b.to_raw(), [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
    assert_eq!(
        HostTensor::new("T", vec![1], TensorData::I8(vec![-1]))
            .unwrap()
            .to_raw(),
        [0xff]
    );
}

#[test]
fn wrong_lengths_of_fixed_size_datatypes_are_raw_size_errors() {
    let err = HostTensor::from_raw("IN", DataType::Fp32, &[2, 3], &[0; 23]).unwrap_err();
    assert_eq!(
        err,
        InputError::RawSize {
            name: "IN".into(),
            expected: 24,
            got: 23
        }
    );
    let err = HostTensor::from_raw("IN", DataType::Int64, &[1], &[0; 9]).unwrap_err();
    assert!(
        matches!(
            err,
            InputError::RawSize {
                expected: 8,
                got: 9,
                ..
            }
        ),
        "{err}"
    );
    let err = HostTensor::from_raw("IN", DataType::Uint8, &[0], &[1]).unwrap_err();
    assert!(
        matches!(
            err,
            InputError::RawSize {
                expected: 0,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("IN"));
}

#[test]
fn bad_shapes_are_typed_errors() {
    let err = HostTensor::from_raw("IN", DataType::Fp32, &[-1, 2], &[]).unwrap_err();
    assert!(matches!(err, InputError::NegativeDimension { .. }), "{err}");
    let err = HostTensor::from_raw("IN", DataType::Fp32, &[i64::MAX, i64::MAX], &[]).unwrap_err();
    assert!(matches!(err, InputError::ShapeOverflow { .. }), "{err}");
    // Element count fits, byte count does not.
    let err = HostTensor::from_raw("IN", DataType::Fp64, &[i64::MAX], &[]).unwrap_err();
    assert!(matches!(
        err,
        InputError::ShapeOverflow { .. } | InputError::RawSize { .. }
    ));
    let err = HostTensor::new("IN", vec![2, 2], TensorData::F32(vec![0.0; 3])).unwrap_err();
    assert!(
        matches!(
            err,
            InputError::ElementCount {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    let err = HostTensor::new("IN", vec![usize::MAX, 2], TensorData::F32(vec![])).unwrap_err();
    assert!(matches!(err, InputError::ShapeOverflow { .. }), "{err}");
}

#[test]
fn truncated_bytes_length_prefix_is_rejected() {
    // Second element's prefix has only 2 of its 4 bytes.
    let raw = [1, 0, 0, 0, b'x', 5, 0];
    let err = HostTensor::from_raw("S", DataType::Bytes, &[2], &raw).unwrap_err();
    match err {
        InputError::BadBytesElement {
            name,
            index,
            offset,
            ..
        } => {
            assert_eq!((name.as_str(), index, offset), ("S", 1, 5));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bytes_element_longer_than_the_buffer_is_rejected() {
    let raw = [0xff, 0xff, 0xff, 0xff, b'a', b'b'];
    let err = HostTensor::from_raw("S", DataType::Bytes, &[1], &raw).unwrap_err();
    assert!(
        matches!(
            err,
            InputError::BadBytesElement {
                index: 0,
                offset: 0,
                ..
            }
        ),
        "{err}"
    );
    let raw = [3, 0, 0, 0, b'a', b'b'];
    let err = HostTensor::from_raw("S", DataType::Bytes, &[1], &raw).unwrap_err();
    assert!(matches!(err, InputError::BadBytesElement { .. }), "{err}");
}

#[test]
fn bytes_left_over_after_the_last_element_are_rejected() {
    let raw = [1, 0, 0, 0, b'a', 0, 0, 0, 0];
    let err = HostTensor::from_raw("S", DataType::Bytes, &[1], &raw).unwrap_err();
    assert_eq!(
        err,
        InputError::TrailingBytes {
            name: "S".into(),
            elements: 1,
            extra: 4
        }
    );
}

#[test]
fn bool_bytes_other_than_0_and_1_are_rejected() {
    let err = HostTensor::from_raw("B", DataType::Bool, &[3], &[0, 1, 2]).unwrap_err();
    assert_eq!(
        err,
        InputError::BadBool {
            name: "B".into(),
            index: 2,
            value: 2
        }
    );
}

#[test]
fn datatype_names_are_kserve_v2() {
    let names: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
    assert_eq!(
        names,
        [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP32", "FP64", "BYTES"
        ]
    );
    assert_eq!(DataType::parse("INT32"), Some(DataType::Int32));
    assert_eq!(DataType::parse("int32"), None);
    assert_eq!(DataType::Fp64.byte_size(), Some(8));
    assert_eq!(DataType::Bool.byte_size(), Some(1));
    assert_eq!(DataType::Bytes.byte_size(), None);
}

fn any_datatype() -> impl Strategy<Value = DataType> {
    proptest::sample::select(DataType::ALL.to_vec())
}

proptest! {
    /// Arbitrary bytes and shapes never panic the decoder, and whatever it accepts encodes
    /// back to the same bytes.
    #[test]
    fn arbitrary_raw_never_panics(
        datatype in any_datatype(),
        shape in proptest::collection::vec(prop_oneof![-2i64..6, Just(i64::MAX), Just(1 << 40)], 0..4),
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        if let Ok(t) = HostTensor::from_raw("P", datatype, &shape, &raw) {
            prop_assert_eq!(t.to_raw(), raw);
            prop_assert_eq!(t.datatype(), datatype);
        }
    }

    /// BYTES tensors of arbitrary elements round-trip.
    #[test]
    fn bytes_round_trip(elements in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..10), 0..8)) {
        let n = elements.len();
        let t = HostTensor::new("P", vec![n], TensorData::Bytes(elements)).unwrap();
        let back = HostTensor::from_raw("P", DataType::Bytes, &[n as i64], &t.to_raw()).unwrap();
        prop_assert_eq!(back, t);
    }
}
