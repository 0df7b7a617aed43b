//! Sidecar mode in the testbed: `ambit sidecar-init` then `ambit sidecar`
//! inside a pod's network namespace, getting the pod's SVID from the
//! testbed's `ambit ca` like the node agents.

use anyhow::{Context, Result, bail, ensure};

use crate::{
    Pod, Testbed,
    agent::{Agent, AgentPlace, WorkloadEntry, agent_binary, workloads_doc, write_atomically},
};

impl WorkloadEntry {
    /// An enrolled pod served by its own sidecar (`sidecar: true`): a mesh
    /// destination the node agents never capture.
    pub fn with_sidecar(pod: &Pod) -> Self {
        Self {
            sidecar: true,
            ..Self::enrolled(pod)
        }
    }
}

impl Testbed {
    /// Installs the redirect rules in `pod` and starts its sidecar there,
    /// in a cgroup of its own (`<node>/sidecar-<pod>`), for the mesh
    /// `entries` (which must list `pod`, as [`WorkloadEntry::with_sidecar`])
    /// with extra `ambit sidecar` arguments; waits until it serves. The
    /// CA must run already (`start_ca` or `start_mesh`) and list `pod`.
    pub fn start_sidecar(
        &self,
        pod: &Pod,
        entries: &[WorkloadEntry],
        extra: &[&str],
    ) -> Result<Agent> {
        self.start_sidecar_with(pod, entries, &[], extra)
    }

    /// Like [`start_sidecar`](Self::start_sidecar), with `init_args` for
    /// `ambit sidecar-init` (e.g. `--proxy-uid`).
    pub fn start_sidecar_with(
        &self,
        pod: &Pod,
        entries: &[WorkloadEntry],
        init_args: &[&str],
        extra: &[&str],
    ) -> Result<Agent> {
        let Some(ca) = self.ca.get() else {
            bail!(
                "start the CA first (Testbed::start_ca or start_mesh): a sidecar gets its SVID from it"
            );
        };
        let own = entries
            .iter()
            .find(|e| e.pod.name == pod.name)
            .context("the entries must list the sidecar's own pod")?;
        let binary = agent_binary()?;
        let init_cmd = [&[binary.to_str().unwrap(), "sidecar-init"], init_args].concat();
        let init = self.run(pod, &init_cmd)?;
        ensure!(
            init.status.success(),
            "ambit sidecar-init in {}: {}",
            pod.name,
            crate::stderr(&init)
        );

        let node = self.node(pod.node).clone();
        let workloads_file = self.dir.path().join(format!("workloads-{}.yaml", pod.name));
        write_atomically(
            &workloads_file,
            &workloads_doc(&format!("node{}", pod.node), entries),
        )?;
        let audit_log = self.dir.path().join(format!("audit-{}.log", pod.name));
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "json".into(),
            "sidecar".into(),
            "--workloads".into(),
            workloads_file.display().to_string(),
            "--workload".into(),
            format!("{}/{}", own.namespace, pod.name),
            "--node-name".into(),
            format!("node{}", pod.node),
            "--reload-interval-ms".into(),
            "100".into(),
            "--ca-addr".into(),
            ca.addr.clone(),
            "--ca-bootstrap-dir".into(),
            ca.bootstrap_dir.display().to_string(),
        ];
        if !extra.contains(&"--audit-log") {
            args.extend(["--audit-log".into(), audit_log.display().to_string()]);
        }
        // As for the node agents: open unless the test is about policy.
        if !extra.contains(&"--default-policy") {
            args.extend(["--default-policy".into(), "allow".into()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let place = AgentPlace {
            netns: pod.netns.clone(),
            cgroup: node.cgroup.join(format!("sidecar-{}", pod.name)),
        };
        let daemon = self.launch_in(
            &place,
            &node,
            &format!("sidecar-{}-", pod.name),
            &args,
            None,
        )?;
        daemon.wait_for("sidecar ready")?;
        Ok(Agent {
            workloads_file,
            audit_log,
            pod: Some(pod.clone()),
            ..daemon
        })
    }
}

impl Agent {
    /// Rewrites a sidecar's workloads file with `entries` (it reloads it),
    /// as when pods join the mesh after it started.
    pub fn rewrite_sidecar_workloads(&self, entries: &[WorkloadEntry]) -> Result<()> {
        let pod = self.pod.as_ref().context("not a sidecar")?;
        write_atomically(
            &self.workloads_file,
            &workloads_doc(&format!("node{}", pod.node), entries),
        )
    }
}
