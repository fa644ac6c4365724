//! The `identity` model: `OUTPUT0` is `INPUT0`, unchanged. As in Triton's identity models, it
//! measures the serving overhead alone (wire, queues, batcher, device thread) with no
//! compute in the way, so it touches no device memory and runs each request on its own.

use crate::device::Device;
use crate::error::{InputError, ModelError};
use crate::model::{Model, Prepared, Signature, TensorSpec, batch_rows};
use crate::tensor::{DataType, HostTensor};

/// The input's name.
pub const INPUT: &str = "INPUT0";
/// The output's name.
pub const OUTPUT: &str = "OUTPUT0";

/// The echo model. Accepts `INPUT0` FP32 of any rank ≥ 1 (the signature reports
/// `[-1, -1]`); rows = `shape[0]`, tokens = 1.
#[derive(Debug)]
pub struct Identity {
    signature: Signature,
    device: Device,
}

impl Identity {
    /// An identity model reporting `device` (it computes nothing there).
    pub fn new(device: Device) -> Self {
        Identity {
            signature: Signature {
                inputs: vec![TensorSpec::new(INPUT, DataType::Fp32, vec![-1, -1])],
                outputs: vec![TensorSpec::new(OUTPUT, DataType::Fp32, vec![-1, -1])],
            },
            device,
        }
    }
}

impl Model for Identity {
    fn kind(&self) -> &'static str {
        "identity"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare(&self, inputs: Vec<HostTensor>) -> Result<Prepared, InputError> {
        // Any rank ≥ 1, so no `check_shapes`: `batch_rows` rejects rank 0.
        let inputs = self.signature.match_inputs(inputs)?;
        let rows = batch_rows(&inputs, &self.signature)?;
        Ok(Prepared::rows(inputs, rows))
    }

    fn forward(&self, batch: &[Prepared]) -> Result<Vec<Vec<HostTensor>>, ModelError> {
        batch
            .iter()
            .map(|p| {
                let input = p.inputs.iter().find(|t| t.name == INPUT).ok_or_else(|| {
                    ModelError::BadBatch {
                        message: format!("a request has no `{INPUT}`"),
                    }
                })?;
                Ok(vec![HostTensor {
                    name: OUTPUT.to_owned(),
                    shape: input.shape.clone(),
                    data: input.data.clone(),
                }])
            })
            .collect()
    }
}
