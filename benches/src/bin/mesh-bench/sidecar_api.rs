//! Sidecar mode's testbed API (notes/contract.md: `Testbed::start_sidecar`,
//! `WorkloadEntry::with_sidecar`), stood in for until it is in this tree.
//! The real inherent methods take precedence over these trait methods, so
//! once they land, setting `AVAILABLE` to true is the one change needed
//! (and this file can go).

use ambit_testbed::{Agent, Pod, Testbed, WorkloadEntry};
use anyhow::{Result, bail};

/// Whether this build measures sidecar mode.
pub const AVAILABLE: bool = false;

pub trait SidecarTestbed {
    fn start_sidecar(&self, pod: &Pod, entries: &[WorkloadEntry], extra: &[&str]) -> Result<Agent>;
}

impl SidecarTestbed for Testbed {
    fn start_sidecar(&self, pod: &Pod, _: &[WorkloadEntry], _: &[&str]) -> Result<Agent> {
        bail!(
            "sidecar mode is not in this build (no Testbed::start_sidecar for {})",
            pod.name
        )
    }
}

pub trait SidecarEntry {
    fn with_sidecar(pod: &Pod) -> WorkloadEntry;
}

impl SidecarEntry for WorkloadEntry {
    fn with_sidecar(pod: &Pod) -> WorkloadEntry {
        WorkloadEntry::enrolled(pod)
    }
}
