//! Packet captures on the inter-node link: what actually crosses the
//! "network" between two simulated nodes.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{Testbed, stderr, wait_until};

/// A tcpdump of TCP on node 0's end of the inter-node link.
pub struct LinkCapture {
    pid: u32,
    file: PathBuf,
    name: String,
}

impl Testbed {
    /// Starts capturing; `name` names the capture's files in the testbed's
    /// directory. Returns once tcpdump listens.
    pub fn capture_link(&self, name: &str) -> Result<LinkCapture> {
        let file = self.dir.path().join(format!("{name}.pcap"));
        let node = self.node(0).clone();
        let path = file.display().to_string();
        let pid = self.spawn(
            &node,
            name,
            &[
                "tcpdump",
                "-i",
                "ln0",
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
                &path,
                "tcp",
            ],
        )?;
        wait_until(Duration::from_secs(10), || {
            Ok(self.stderr_of(name).contains("listening on"))
        })?;
        Ok(LinkCapture {
            pid,
            file,
            name: name.into(),
        })
    }
}

impl LinkCapture {
    /// Stops the capture once it has written a packet; returns the pcap.
    pub fn stop(&self, tb: &Testbed) -> Result<Vec<u8>> {
        // Let tcpdump write what it saw before it stops (more than the
        // 24-byte file header, then a moment for the rest).
        wait_until(Duration::from_secs(5), || {
            Ok(std::fs::metadata(&self.file).map_or(0, |m| m.len()) > 24)
        })
        .context("tcpdump wrote no packet")?;
        std::thread::sleep(Duration::from_millis(500));
        let pid = libc::pid_t::try_from(self.pid)?;
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_until(Duration::from_secs(10), || {
            Ok(tb.stderr_of(&self.name).contains("packets captured"))
        })?;
        Ok(std::fs::read(&self.file)?)
    }

    /// Stops the capture; whether `marker` crossed the link in clear.
    pub fn saw_in_clear(self, tb: &Testbed, marker: &str) -> Result<bool> {
        let pcap = self.stop(tb)?;
        Ok(pcap.windows(marker.len()).any(|w| w == marker.as_bytes()))
    }

    /// Packets tshark finds in the capture for a display filter.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let out = std::process::Command::new("tshark")
            .args(["-n", "-r"])
            .arg(&self.file)
            .args(["-Y", filter])
            .output()?;
        ensure!(out.status.success(), "tshark: {}", stderr(&out));
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }
}
