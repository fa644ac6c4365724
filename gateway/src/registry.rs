//! The live registry of served models: one handle that the front ends, the
//! router and the lifecycle manager read through.
//!
//! It holds an immutable [`Catalog`] (model name → version → instance)
//! behind an [`ArcSwap`]: a reader takes the current catalog without a lock
//! and keeps the [`Arc<ModelEntry>`] it found for as long as its request
//! lasts, so a swap never pulls an instance from under a request. Writers
//! (load, unload, reload) build a new catalog and swap it in atomically;
//! the instances they replace are drained by their owner
//! ([`crate::lifecycle`]) once no request holds them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use quiver_config::Routing;
use quiver_kernels::Model;

use crate::device::DeviceWorker;
use crate::error::GatewayError;
use crate::upstream::Upstream;

/// One device of a model instance: the model loaded there and the device
/// thread that runs its batches.
#[derive(Debug)]
pub struct Replica {
    /// The device, as configured (`cpu`, `cuda:1`, `sim:0`).
    pub device: Arc<str>,
    pub model: Arc<dyn Model>,
    pub worker: DeviceWorker,
}

/// One loaded instance of a model version: its devices, its policy.
#[derive(Debug)]
pub struct ModelEntry {
    pub name: String,
    /// Its version (an inline `[[models]]` table is version 1).
    pub version: u64,
    /// The first replica's model: the signature and `prepare` (every
    /// replica loads the same model, so a request prepared once runs on
    /// any of them).
    pub model: Arc<dyn Model>,
    /// Its devices, at least one.
    pub replicas: Vec<Replica>,
    /// The next device of round-robin placement.
    pub next_replica: std::sync::atomic::AtomicUsize,
    /// The deadline of a request that sends no `timeout`.
    pub default_timeout: Duration,
    /// Priority lanes of the scheduler.
    pub priority_levels: u8,
    /// The model's configuration as loaded: its batching knobs, which the
    /// metadata endpoints report (Triton's model configuration extension).
    pub config: quiver_config::Model,
    /// Where requests may run.
    pub routing: Routing,
    /// The upstream pool requests overflow to, if any.
    pub upstream: Option<Arc<Upstream>>,
    /// Its per-request metric series, resolved on first use.
    pub series: crate::metrics::EntrySeries,
}

impl ModelEntry {
    /// The version as the protocols spell it.
    pub fn version_str(&self) -> String {
        self.version.to_string()
    }

    /// Whether any of its devices is healthy.
    pub fn healthy(&self) -> bool {
        self.replicas.iter().any(|r| r.worker.healthy())
    }

    /// Stops every device thread (queued requests are answered
    /// `UNAVAILABLE`).
    pub fn stop(&self) {
        for r in &self.replicas {
            r.worker.stop();
        }
    }

    /// Its metrics labels (model and version).
    pub fn labels(&self) -> crate::metrics::ModelLabels {
        crate::metrics::ModelLabels::new(&self.name, self.version)
    }
}

/// The versions of one model that serve, by version.
pub type Versions = BTreeMap<u64, Arc<ModelEntry>>;

/// Every model that serves now: an immutable snapshot.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    models: BTreeMap<String, Versions>,
}

impl Catalog {
    /// The versions of `name` that serve now (none: not loaded).
    pub fn versions(&self, name: &str) -> Option<&Versions> {
        self.models.get(name).filter(|v| !v.is_empty())
    }

    /// The newest version of each model.
    pub fn newest(&self) -> impl Iterator<Item = &Arc<ModelEntry>> {
        self.models.values().filter_map(|v| v.values().next_back())
    }

    /// Every loaded instance, by name then version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ModelEntry>> {
        self.models.values().flat_map(|v| v.values())
    }

    /// Model names that serve now.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

/// The live registry.
#[derive(Debug, Default)]
pub struct Registry {
    catalog: ArcSwap<Catalog>,
}

impl Registry {
    /// The catalog now. Cheap; hold it only briefly (it keeps every
    /// instance of this snapshot alive).
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// The instance a request for `name` at `version` goes to: that
    /// version, or with `version` empty the newest one serving.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<ModelEntry>, GatewayError> {
        let catalog = self.catalog.load();
        let versions = catalog
            .versions(name)
            .ok_or_else(|| GatewayError::UnknownModel(name.to_owned()))?;
        let entry = if version.is_empty() {
            versions.values().next_back()
        } else {
            version.parse::<u64>().ok().and_then(|v| versions.get(&v))
        };
        entry.cloned().ok_or_else(|| GatewayError::UnknownVersion {
            model: name.to_owned(),
            version: version.to_owned(),
            serving: versions
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The newest instance of `name`, if it serves.
    pub fn newest(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.get(name, "").ok()
    }

    /// Makes `versions` the versions of `name` that serve (none: the model
    /// is unloaded), in one atomic swap. Returns the instances that no
    /// longer serve, for their owner to drain.
    pub fn replace(&self, name: &str, versions: Versions) -> Vec<Arc<ModelEntry>> {
        let mut removed = Vec::new();
        self.catalog.rcu(|current| {
            let mut next = Catalog::clone(current);
            let old = if versions.is_empty() {
                next.models.remove(name)
            } else {
                next.models.insert(name.to_owned(), versions.clone())
            };
            removed = old
                .unwrap_or_default()
                .into_values()
                .filter(|e| !versions.values().any(|n| Arc::ptr_eq(n, e)))
                .collect();
            next
        });
        removed
    }
}
