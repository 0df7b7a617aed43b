//! The agent's file-descriptor limit (RLIMIT_NOFILE). Every proxied
//! connection holds descriptors, and the usual soft limit of 1024 would let
//! a few hundred connections starve the whole node; raising it to the hard
//! limit needs no privilege.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Below this, a busy node runs out of descriptors long before memory.
pub const RECOMMENDED_NOFILE: u64 = 65536;

/// Descriptors kept out of the connection budget for the agent's own work:
/// listeners of every pod, the admin server, CA renewals, the audit log,
/// BPF maps and links.
pub const RESERVED_FDS: u64 = 1024;

/// Raises the soft RLIMIT_NOFILE to the hard limit (capped by
/// fs.nr_open, which an unlimited hard limit cannot exceed) and returns
/// the soft limit now in force.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = hard.min(nr_open().unwrap_or(hard));
    if soft >= target {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(target)
}

/// The node-wide connection cap that fits in `nofile` descriptors: a
/// proxied connection holds two (the client's and the upstream one), and
/// [`RESERVED_FDS`] stay free for the agent itself.
pub fn connections_within(nofile: u64) -> usize {
    let pairs = nofile.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(pairs).unwrap_or(usize::MAX).max(1)
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_the_reserve_free() {
        assert_eq!(connections_within(65536), (65536 - 1024) / 2);
        // Two descriptors per connection plus the reserve stay within the limit.
        let cap = u64::try_from(connections_within(20_000)).unwrap();
        assert!(cap * 2 + RESERVED_FDS <= 20_000);
        // A limit below the reserve still admits something rather than nothing.
        assert_eq!(connections_within(100), 1);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Start from a low soft limit, as a node's default of 1024 would be.
        setrlimit(Resource::RLIMIT_NOFILE, 512.min(hard), hard).unwrap();
        let limit = raise_nofile().unwrap();
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, limit);
        assert_eq!(soft, hard.min(nr_open().unwrap_or(hard)));
    }
}
