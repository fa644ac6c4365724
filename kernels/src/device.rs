//! Devices: where a model runs. `cpu` always; `cuda:N` when the crate is built with the
//! `cuda` cargo feature (the CUDA build needs the driver library to start, so CPU workers run
//! the default build; see `DESIGN.md`, "Models").
//!
//! The gateway keeps one batcher and one device thread per model and [`Device`]; this type is
//! the name it configures, logs and labels metrics with, and [`Device::to_candle`] is the one
//! place where that name becomes a candle device.

use std::str::FromStr;

use crate::error::DeviceError;

/// A device name: `cpu` or `cuda:N`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Device {
    /// The host CPU (candle's CPU backend, multi-threaded matmul).
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
    /// A simulated device ([`crate::sim`]): its batches compute on the CPU
    /// and take a modelled service time.
    Sim(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `sim:N` with `N` in decimal digits. ASCII case
    /// is ignored and surrounding whitespace trimmed; anything else is
    /// [`DeviceError::Parse`].
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        let lower = s.trim().to_ascii_lowercase();
        let parse_error = || DeviceError::Parse {
            input: s.to_owned(),
        };
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => {
                let (ordinal, kind): (&str, fn(usize) -> Device) =
                    match (other.strip_prefix("cuda:"), other.strip_prefix("sim:")) {
                        (Some(n), _) => (n, Device::Cuda),
                        (_, Some(n)) => (n, Device::Sim),
                        _ => return Err(parse_error()),
                    };
                // `usize::from_str` takes a leading `+`; a device name should not.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(parse_error());
                }
                ordinal.parse().map(kind).map_err(|_| parse_error())
            }
        }
    }

    /// The CUDA ordinal, for a GPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            Device::Cuda(n) => Some(*n),
            Device::Cpu | Device::Sim(_) => None,
        }
    }

    /// Opens the device in candle.
    ///
    /// `Cpu` always succeeds. `Cuda(n)` is [`DeviceError::NotCompiled`] unless the crate was
    /// built with the `cuda` feature, and [`DeviceError::Unavailable`] if the GPU or its
    /// driver cannot be opened.
    pub fn to_candle(&self) -> Result<candle_core::Device, DeviceError> {
        match self {
            Device::Cpu | Device::Sim(_) => Ok(candle_core::Device::Cpu),
            Device::Cuda(ordinal) => self.open_cuda(*ordinal),
        }
    }

    #[cfg(feature = "cuda")]
    fn open_cuda(&self, ordinal: usize) -> Result<candle_core::Device, DeviceError> {
        candle_core::Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable {
            device: self.to_string(),
            message: e.to_string(),
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn open_cuda(&self, _ordinal: usize) -> Result<candle_core::Device, DeviceError> {
        Err(DeviceError::NotCompiled {
            device: self.to_string(),
        })
    }
}

impl std::fmt::Display for Device {
    /// `cpu` or `cuda:N`, which [`Device::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Sim(n) => write!(f, "sim:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Device::parse(s)
    }
}
