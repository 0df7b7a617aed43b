//! Ambit: a sidecar-less, eBPF-assisted transparent mTLS node agent.
//!
//! The binary (`ambit`) is a thin CLI over these modules; see docs/architecture.md.

pub mod agent;
pub mod ca_service;
pub mod capture;
pub mod config;
pub mod identity;
pub mod mesh;
pub mod netns;
pub mod preflight;
pub mod proxy;
pub mod svids;
pub mod telemetry;
pub mod tunnel;
pub mod workloads;
