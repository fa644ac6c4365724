//! Simulated devices: a device whose service time is a model, spent waiting.
//!
//! A [`Simulated`] device wraps a real model that computes on the CPU. A
//! batch takes `fixed + per_row·rows + per_token·padded tokens` (times the
//! device's slowdown, with optional jitter), measured from the moment
//! `forward` starts: the real outputs are computed first, off the clock, and
//! the thread then sleeps until the service time is over. Scheduling,
//! placement and overflow can then be measured on a machine with few cores
//! without measuring its CPU: a sleeping device uses none. As Triton's
//! delay models serve its scheduler tests, this serves Quiver's; it is a
//! benchmarking and testing tool, not a way to serve.
//!
//! Compute slower than the service time makes the batch late (the time is a
//! floor, never a ceiling): the outputs are still right.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{InputError, ModelError};
use crate::model::{Model, Prepared, Signature};
use crate::{Device, HostTensor};

/// The service-time model of a simulated device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServiceTime {
    /// Per batch.
    pub fixed: Duration,
    /// Per row of the batch.
    pub per_row: Duration,
    /// Per padded token (rows × the longest row's tokens).
    pub per_token: Duration,
    /// Multiplies the whole time (1.0: as configured; 3.0: three times as
    /// slow), so unequal devices share one model.
    pub slowdown: f64,
    /// Uniform jitter, as a fraction of the time (0.1: ±10 %).
    pub jitter: f64,
}

impl ServiceTime {
    /// The time of a batch of `rows` rows and `padded_tokens` tokens, before
    /// jitter.
    pub fn of(&self, rows: u32, padded_tokens: u64) -> Duration {
        let base = self.fixed
            + self.per_row * rows
            + self
                .per_token
                .saturating_mul(u32::try_from(padded_tokens).unwrap_or(u32::MAX));
        base.mul_f64(self.slowdown.max(0.0))
    }
}

/// A model on a simulated device `sim:N`.
#[derive(Debug)]
pub struct Simulated {
    inner: std::sync::Arc<dyn Model>,
    device: Device,
    service: ServiceTime,
    rng: Mutex<ChaCha8Rng>,
}

impl Simulated {
    /// `inner` (loaded on the CPU) on simulated device `ordinal`, its
    /// batches taking `service`; `seed` draws the jitter.
    pub fn new(
        inner: std::sync::Arc<dyn Model>,
        ordinal: usize,
        service: ServiceTime,
        seed: u64,
    ) -> Self {
        Simulated {
            inner,
            device: Device::Sim(ordinal),
            service,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ ordinal as u64)),
        }
    }

    /// The service time of `batch`, with jitter drawn.
    pub fn service_time(&self, batch: &[Prepared]) -> Duration {
        let rows: u32 = batch.iter().map(|p| p.rows).sum();
        let longest = batch.iter().map(|p| p.tokens).max().unwrap_or(1);
        let base = self.service.of(rows, u64::from(rows) * u64::from(longest));
        if self.service.jitter <= 0.0 {
            return base;
        }
        let j = self.service.jitter.min(1.0);
        let factor = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.random_range(1.0 - j..=1.0 + j)
        };
        base.mul_f64(factor)
    }
}

impl Model for Simulated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare(&self, inputs: Vec<HostTensor>) -> Result<Prepared, InputError> {
        self.inner.prepare(inputs)
    }

    fn prepare_with(
        &self,
        inputs: Vec<HostTensor>,
        options: &crate::model::PrepareOptions,
    ) -> Result<Prepared, InputError> {
        self.inner.prepare_with(inputs, options)
    }

    fn as_text_embedding(&self) -> Option<&crate::text::TextEmbedding> {
        self.inner.as_text_embedding()
    }

    fn forward(&self, batch: &[Prepared]) -> Result<Vec<Vec<HostTensor>>, ModelError> {
        let started = Instant::now();
        let until = started + self.service_time(batch);
        let outputs = self.inner.forward(batch);
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
        outputs
    }
}
