//! Simulated devices: the service-time model, and real outputs.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use quiver_kernels::sim::{ServiceTime, Simulated};
use quiver_kernels::{Device, HostTensor, Identity, Model, TensorData};

fn service(jitter: f64, slowdown: f64) -> ServiceTime {
    ServiceTime {
        fixed: Duration::from_micros(500),
        per_row: Duration::from_micros(100),
        per_token: Duration::from_micros(2),
        slowdown,
        jitter,
    }
}

fn request(rows: usize) -> quiver_kernels::Prepared {
    let data: Vec<f32> = (0..rows * 3).map(|i| i as f32).collect();
    Identity::new(Device::Cpu)
        .prepare(vec![
            HostTensor::new("INPUT0", vec![rows, 3], TensorData::F32(data)).unwrap(),
        ])
        .unwrap()
}

#[test]
fn the_service_time_is_fixed_plus_rows_plus_padded_tokens_times_the_slowdown() {
    let s = service(0.0, 1.0);
    // 500 + 4 × 100 + (4 × 1 token) × 2 µs.
    assert_eq!(s.of(4, 4), Duration::from_micros(908));
    assert_eq!(service(0.0, 3.0).of(4, 4), Duration::from_micros(2724));
    let sim = Simulated::new(Arc::new(Identity::new(Device::Cpu)), 1, s, 7);
    assert_eq!(
        sim.service_time(&[request(1), request(3)]),
        Duration::from_micros(908)
    );
    assert_eq!(sim.device(), &Device::Sim(1));
    assert_eq!(sim.kind(), "identity");
}

#[test]
fn jitter_stays_in_its_band_and_a_seed_repeats_it() {
    let draw = |seed| {
        let sim = Simulated::new(
            Arc::new(Identity::new(Device::Cpu)),
            0,
            service(0.2, 1.0),
            seed,
        );
        (0..50)
            .map(|_| sim.service_time(&[request(2)]))
            .collect::<Vec<_>>()
    };
    let a = draw(9);
    assert_eq!(a, draw(9), "the same seed draws the same jitter");
    assert_ne!(a, draw(10));
    let base = service(0.0, 1.0).of(2, 2).as_secs_f64();
    for t in &a {
        let f = t.as_secs_f64() / base;
        assert!((0.8 - 1e-9..=1.2 + 1e-9).contains(&f), "{f}");
    }
    assert!(a.iter().any(|t| *t != a[0]), "jitter varies");
}

#[test]
fn forward_returns_the_wrapped_models_outputs() {
    let sim = Simulated::new(
        Arc::new(Identity::new(Device::Cpu)),
        0,
        ServiceTime {
            fixed: Duration::from_micros(50),
            per_row: Duration::ZERO,
            per_token: Duration::ZERO,
            slowdown: 1.0,
            jitter: 0.0,
        },
        1,
    );
    let batch = [request(1), request(2)];
    let out = sim.forward(&batch).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1][0].shape, vec![2, 3]);
    assert_eq!(
        out[1][0].data,
        TensorData::F32((0..6).map(|i| i as f32).collect())
    );
}
