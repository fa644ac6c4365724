//! `quiver-bench`: Quiver's load generator, one of the three uses of the
//! project (DESIGN.md): people judge the gateway, and compare it with other
//! servers, with it.
//!
//! The pieces, in the order a run uses them: [`cli`] turns flags into step
//! plans and a request pool ([`inputs`]); [`targets`] connects to the server
//! over one wire protocol and pre-encodes the pool; [`load`] drives each step
//! (closed loop, or an open-loop arrival [`schedule`]) and counts what its
//! window saw, latency measured from intended send times; [`report`] turns
//! the counts into the table, JSON, CSV and plot. [`echo_server`] is the bare
//! transport to compare the gateway with.
#![forbid(unsafe_code)]

pub mod cli;
pub mod echo_server;
pub mod inputs;
pub mod load;
pub mod report;
pub mod schedule;
pub mod soak;
pub mod targets;
pub mod weights;
