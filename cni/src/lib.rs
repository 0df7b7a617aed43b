//! `ambit-cni`: a chained CNI plugin that hands each enrolled pod to the
//! Ambit node agent before the pod's containers start (docs/operations.md,
//! "CNI plugin"), and the install/uninstall of it into a node's CNI config.

pub mod conflist;
pub mod enrollment;
pub mod install;
pub mod plugin;
pub mod spec;

/// The agent protocol lives in its own crate, shared with the agent.
pub use ambit_cni_protocol as protocol;
