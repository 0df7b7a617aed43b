//! The node side of `ambit-cni` (docs/architecture.md, "CNI plugin"): the
//! unix socket the plugin calls on ADD/DEL/CHECK, and the on-node record of
//! every pod it announced, which the Kubernetes workload source merges with
//! the API server's view and a restarted agent reloads.

pub mod records;
pub mod server;

use std::{path::PathBuf, sync::Arc};

use anyhow::Result;
use tokio::sync::watch;

use self::{
    records::{CniPods, RecordStore},
    server::CniServer,
};
use crate::{agent_state::AgentState, workloads::NodeWorkloads};

pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/run/ambit";
/// Below the state dir: one JSON file per pod, named by its uid.
pub const RECORDS_DIR: &str = "pods";

#[derive(Clone, Debug)]
pub struct CniConfig {
    /// Where the plugin finds the agent (`agentSocket` in its config).
    pub socket: PathBuf,
    /// Holds the records (`<state dir>/pods/`).
    pub state_dir: PathBuf,
}

/// The records, loaded at start (before the workload source, so that its
/// first view already has them), and the server that adds to them.
pub struct Cni {
    config: CniConfig,
    pub records: Arc<RecordStore>,
}

impl Cni {
    pub fn open(config: &CniConfig) -> Result<Self> {
        let records = RecordStore::open(&config.state_dir.join(RECORDS_DIR))?;
        Ok(Self {
            config: config.clone(),
            records: Arc::new(records),
        })
    }

    pub fn pods(&self) -> watch::Receiver<Arc<CniPods>> {
        self.records.subscribe()
    }

    /// Binds the socket and serves it in the background.
    pub async fn serve(
        &self,
        workloads: watch::Receiver<NodeWorkloads>,
        state: Arc<AgentState>,
    ) -> Result<()> {
        let listener = server::bind(&self.config.socket).await?;
        let server = Arc::new(CniServer::new(Arc::clone(&self.records), workloads, state));
        tokio::spawn(server.serve(listener, self.config.socket.clone()));
        Ok(())
    }
}
