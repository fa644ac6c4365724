//! One request-memory budget for the whole gateway (`server.max_inflight_bytes`).
//!
//! Each front end bounds its own request (`max_frame_bytes`), but only this
//! bounds the whole: the bytes of every request held at once, across
//! connections, protocols and models, queued, computing or sent upstream. A
//! request reserves its bytes from the moment its length is known (the QUIC
//! native frame header, a REST `Content-Length`, or as a body without one
//! arrives) until its answer is sent; a request that would pass the budget is
//! refused with the protocol's overload answer before its body is read.
//!
//! A [`Reservation`] gives its bytes back when dropped, so every exit (answer,
//! error, cancel, client gone, drain) releases them: there is no release call
//! to forget. The gauge `quiver_inflight_bytes` follows the count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::gauge::Gauge;

use crate::error::GatewayError;

/// The shared budget.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    held: AtomicU64,
    gauge: Gauge,
}

impl MemoryBudget {
    /// A budget of `limit` bytes whose level `gauge` follows.
    pub fn new(limit: u64, gauge: Gauge) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit,
            held: AtomicU64::new(0),
            gauge,
        })
    }

    /// A budget no request can exhaust, for in-process callers and tests.
    pub fn unlimited() -> Arc<Self> {
        MemoryBudget::new(u64::MAX, Gauge::default())
    }

    /// Reserves `bytes`, or refuses with [`GatewayError::MemoryBudget`] when
    /// they do not fit beside what is held. Never blocks.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, GatewayError> {
        self.take(bytes)?;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn take(&self, bytes: u64) -> Result<(), GatewayError> {
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            let after = held
                .checked_add(bytes)
                .filter(|&after| after <= self.limit)
                .ok_or(GatewayError::MemoryBudget {
                    need: bytes,
                    held,
                    limit: self.limit,
                })?;
            match self
                .held
                .compare_exchange_weak(held, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => held = now,
            }
        }
        self.gauge.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    fn give(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        self.gauge.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Bytes reserved for one request; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `more` bytes for the same request (a body without a declared
    /// length, as it arrives); on refusal what was reserved stays reserved
    /// until this is dropped.
    pub fn grow(&mut self, more: u64) -> Result<(), GatewayError> {
        self.budget.take(more)?;
        self.bytes += more;
        Ok(())
    }

    /// The bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
