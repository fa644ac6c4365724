//! The identity model: validation in `prepare`, exact echo in `forward`.
#![allow(clippy::unwrap_used)]

use quiver_kernels::{
    DataType, Device, HostTensor, InputError, ModelSpec, Prepared, TensorData, load,
};

fn f32_tensor(name: &str, shape: Vec<usize>) -> HostTensor {
    let n = shape.iter().product::<usize>();
    let values = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
    HostTensor::new(name, shape, TensorData::F32(values)).unwrap()
}

#[test]
fn signature_and_kind() {
    let m = load(&ModelSpec::Identity, &Device::Cpu).unwrap();
    assert_eq!(m.kind(), "identity");
    assert_eq!(m.device(), &Device::Cpu);
    let sig = m.signature();
    assert_eq!(sig.inputs.len(), 1);
    assert_eq!(sig.inputs[0].name, "INPUT0");
    assert_eq!(sig.inputs[0].datatype, DataType::Fp32);
    assert_eq!(sig.inputs[0].shape, [-1, -1]);
    assert_eq!(sig.outputs[0].name, "OUTPUT0");
}

#[test]
fn prepare_accepts_any_rank_from_one_and_counts_rows() {
    let m = load(&ModelSpec::Identity, &Device::Cpu).unwrap();
    for shape in [vec![3], vec![2, 5], vec![4, 1, 2]] {
        let rows = shape[0] as u32;
        let p = m.prepare(vec![f32_tensor("INPUT0", shape)]).unwrap();
        assert_eq!((p.rows, p.tokens), (rows, 1));
    }
}

#[test]
fn prepare_rejects_bad_inputs() {
    let m = load(&ModelSpec::Identity, &Device::Cpu).unwrap();
    let err = m
        .prepare(vec![
            f32_tensor("INPUT0", vec![1, 2]),
            f32_tensor("EXTRA", vec![1]),
        ])
        .unwrap_err();
    assert_eq!(
        err,
        InputError::UnknownInput {
            name: "EXTRA".into()
        }
    );

    let err = m.prepare(vec![]).unwrap_err();
    assert_eq!(
        err,
        InputError::MissingInput {
            name: "INPUT0".into()
        }
    );

    let err = m
        .prepare(vec![
            f32_tensor("INPUT0", vec![1]),
            f32_tensor("INPUT0", vec![1]),
        ])
        .unwrap_err();
    assert_eq!(
        err,
        InputError::DuplicateInput {
            name: "INPUT0".into()
        }
    );

    let ints = HostTensor::new("INPUT0", vec![2], TensorData::I32(vec![1, 2])).unwrap();
    let err = m.prepare(vec![ints]).unwrap_err();
    assert_eq!(
        err,
        InputError::WrongDatatype {
            name: "INPUT0".into(),
            expected: DataType::Fp32,
            got: DataType::Int32
        }
    );
    assert!(err.to_string().contains("INT32"), "{err}");

    let scalar = HostTensor::new("INPUT0", vec![], TensorData::F32(vec![1.0])).unwrap();
    let err = m.prepare(vec![scalar]).unwrap_err();
    assert!(
        matches!(&err, InputError::WrongShape { name, got, .. } if name == "INPUT0" && got.is_empty()),
        "{err}"
    );

    let err = m
        .prepare(vec![f32_tensor("INPUT0", vec![0, 3])])
        .unwrap_err();
    assert_eq!(
        err,
        InputError::EmptyBatch {
            name: "INPUT0".into()
        }
    );
}

#[test]
fn forward_echoes_a_batch_of_different_shapes_exactly() {
    let m = load(&ModelSpec::Identity, &Device::Cpu).unwrap();
    let shapes = [vec![1, 4], vec![3, 2], vec![2], vec![2, 2, 3]];
    let inputs: Vec<HostTensor> = shapes
        .iter()
        .map(|s| f32_tensor("INPUT0", s.clone()))
        .collect();
    let batch: Vec<Prepared> = inputs
        .iter()
        .map(|t| m.prepare(vec![t.clone()]).unwrap())
        .collect();
    let outputs = m.forward(&batch).unwrap();
    assert_eq!(outputs.len(), inputs.len());
    for (out, input) in outputs.iter().zip(&inputs) {
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "OUTPUT0");
        assert_eq!(out[0].shape, input.shape);
        assert_eq!(out[0].data, input.data);
    }
    assert!(m.forward(&[]).unwrap().is_empty());
}

#[test]
fn forward_reports_a_foreign_prepared_instead_of_panicking() {
    let m = load(&ModelSpec::Identity, &Device::Cpu).unwrap();
    let bogus = Prepared {
        inputs: vec![],
        rows: 1,
        tokens: 1,
        token_ids: Vec::new(),
        truncated: 0,
    };
    assert!(m.forward(&[bogus]).is_err());
}
