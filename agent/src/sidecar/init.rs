//! `ambit sidecar-init`: installs (or removes) the pod's redirect rules
//! with `nft -f -`, as istio-init does with iptables. Run as root in the
//! pod's network namespace before the application starts.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::rules::{RedirectRules, remove_script};

/// Installs `rules`, replacing any earlier version of the table.
pub fn install(rules: &RedirectRules) -> Result<()> {
    apply(
        &rules.install_script(),
        "install the sidecar's redirect rules",
    )?;
    tracing::info!(rules = ?rules, "sidecar redirect rules installed");
    Ok(())
}

/// Removes the table: the pod's traffic flows unredirected (and in clear)
/// from then on.
pub fn remove() -> Result<()> {
    apply(&remove_script(), "remove the sidecar's redirect rules")?;
    tracing::info!("sidecar redirect rules removed");
    Ok(())
}

fn apply(script: &str, what: &str) -> Result<()> {
    let mut child = match Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "cannot {what}: `nft` is not on PATH.\n\
             fix: install nftables in the init container's image (Debian/Ubuntu: \
             `apt-get install nftables`, Alpine: `apk add nftables`)"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot {what}: starting `nft`")),
    };
    child
        .stdin
        .take()
        .context("nft's standard input")?
        .write_all(script.as_bytes())
        .with_context(|| format!("cannot {what}: writing to `nft`"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "cannot {what}: nft refused them: {}\n\
             fix: run `ambit sidecar-init` as root (CAP_NET_ADMIN) inside the pod's network \
             namespace, on a kernel with nf_tables NAT (CONFIG_NFT_NAT, CONFIG_NFT_REDIR)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
