//! Starting control-plane processes so they never outlive the test process,
//! and picking free loopback ports for them.

use std::{
    fs, io,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command},
    sync::{Mutex, OnceLock, mpsc},
};

use anyhow::{Context, Result, anyhow};

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with this
/// process even when destructors never run (a shared control plane lives in
/// a static; a test killed by a timeout unwinds nothing).
///
/// The death signal follows the *thread* that forked, and test threads end
/// early, so every spawn happens on one thread that lives as long as the
/// process.
pub fn spawn_tied_to_process(mut cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, inbox) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in inbox {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the control-plane spawner thread");
        Mutex::new(jobs)
    });
    let shown = format!("{cmd:?}");
    // SAFETY: prctl is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| anyhow!("the control-plane spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| anyhow!("the control-plane spawner thread is gone"))?
        .with_context(|| format!("cannot start {shown}"))
}

/// A loopback port nothing listens on right now. Another process may take
/// it before ours binds; callers retry a failed start.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// Prefix of control-plane data directories, followed by the owner's pid.
pub const DIR_PREFIX: &str = "ambit-cp-";

/// Removes data directories whose owning process is gone (a shared control
/// plane's directory is never dropped).
pub fn sweep_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            eprintln!(
                "control plane: removing stale {}: {e}",
                entry.path().display()
            );
        }
    }
}
