//! Device names and the mapping onto candle devices.
#![allow(clippy::unwrap_used)]

use quiver_kernels::{Device, DeviceError};

#[test]
fn parse_accepts_cpu_cuda_and_cuda_n() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse(" CPU ").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
    assert_eq!(Device::parse("cuda:0").unwrap(), Device::Cuda(0));
    assert_eq!(Device::parse("cuda:7").unwrap(), Device::Cuda(7));
    assert_eq!("cuda:12".parse::<Device>().unwrap(), Device::Cuda(12));
    assert_eq!(Device::parse("sim:0").unwrap(), Device::Sim(0));
    assert_eq!(Device::parse("SIM:3").unwrap(), Device::Sim(3));
}

#[test]
fn parse_rejects_everything_else() {
    for bad in [
        "",
        "gpu",
        "cuda:",
        "cuda:-1",
        "cuda:+1",
        "cuda:x",
        "cuda:1:2",
        "cuda0",
        "cpu:0",
        "sim",
        "sim:",
        "sim:+1",
        "cuda:99999999999999999999999",
    ] {
        assert_eq!(
            Device::parse(bad).unwrap_err(),
            DeviceError::Parse { input: bad.into() },
            "{bad:?}"
        );
    }
}

#[test]
fn display_reads_back() {
    for d in [
        Device::Cpu,
        Device::Cuda(0),
        Device::Cuda(3),
        Device::Sim(2),
    ] {
        assert_eq!(Device::parse(&d.to_string()).unwrap(), d);
    }
    assert_eq!(Device::Cpu.to_string(), "cpu");
    assert_eq!(Device::Cuda(0).to_string(), "cuda:0");
}

#[test]
fn cpu_opens() {
    assert!(Device::Cpu.to_candle().unwrap().is_cpu());
    // A simulated device computes on the CPU.
    assert!(Device::Sim(1).to_candle().unwrap().is_cpu());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_not_compiled() {
    use quiver_kernels::{LoadError, ModelSpec, load};

    let err = Device::Cuda(0).to_candle().unwrap_err();
    assert_eq!(
        err,
        DeviceError::NotCompiled {
            device: "cuda:0".into()
        }
    );
    assert!(err.to_string().contains("cuda:0"), "{err}");
    let err = load(&ModelSpec::Identity, &Device::Cuda(1)).unwrap_err();
    assert!(
        matches!(err, LoadError::Device(DeviceError::NotCompiled { .. })),
        "{err}"
    );
}
