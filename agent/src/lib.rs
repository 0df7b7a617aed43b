//! Ambit: a sidecar-less, eBPF-assisted transparent mTLS node agent.
//!
//! The binary (`ambit`) is a thin CLI over these modules; see docs/architecture.md.

pub mod admin;
pub mod agent;
pub mod agent_state;
pub mod audit;
pub mod ca_service;
pub mod capture;
pub mod cni;
pub mod config;
pub mod fd_limit;
pub mod gate;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod pod;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod proxy_runtime;
pub mod services;
pub mod sidecar;
pub mod svids;
pub mod telemetry;
pub mod tunnel;
pub mod workloads;
