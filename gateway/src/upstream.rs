//! Overflow to upstream CPU inference services (DESIGN.md, "Overflow").
//!
//! [`pool`] is the sans-IO state machine that picks an upstream and ejects
//! failing ones; the async layer that sends KServe v2 requests to the
//! upstreams drives it.

pub mod pool;
