//! Running programs on a simulated host: inside its network namespace and
//! its cgroup, the way a container runtime would start them.

use std::{
    ffi::CString,
    io::{self, Read as _},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Output},
    sync::{Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Somewhere a process can run: a named network namespace plus a cgroup.
pub trait Host {
    fn netns(&self) -> &str;
    fn cgroup(&self) -> &Path;
    /// Short label for error messages.
    fn label(&self) -> &str;
}

pub fn netns_path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// A `Command` that, between fork and exec, joins `host`'s cgroup and then
/// its network namespace.
pub fn command(host: &dyn Host, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let procs = CString::new(host.cgroup().join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path has no NUL");
    let netns = CString::new(netns_path(host.netns())).expect("netns name has no NUL");
    // SAFETY: only async-signal-safe calls (open, write, setns, close) run
    // in the child, on buffers prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(&procs)?;
            enter_netns(&netns)
        });
    }
    cmd
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: see `command`.
    unsafe {
        let fd = check(libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
        // "0" moves the writing process.
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        check(written as libc::c_int)?;
    }
    Ok(())
}

fn enter_netns(path: &CString) -> io::Result<()> {
    // SAFETY: see `command`.
    unsafe {
        let fd = check(libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC))?;
        let entered = libc::setns(fd, libc::CLONE_NEWNET);
        libc::close(fd);
        check(entered)?;
    }
    Ok(())
}

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with this
/// process even when destructors never run (a shared control plane lives in
/// a static; a test killed by a timeout, or a benchmark stopped with
/// Ctrl-C, unwinds nothing).
///
/// The death signal follows the *thread* that forked, and test threads end
/// early, so every spawn happens on one thread that lives as long as the
/// process.
pub fn spawn_tied_to_process(mut cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, inbox) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in inbox {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
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
        .map_err(|_| anyhow!("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| anyhow!("the spawner thread is gone"))?
        .with_context(|| format!("cannot start {shown}"))
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    wait_within(child, timeout).with_context(|| format!("running {shown}"))
}

fn wait_within(mut child: Child, timeout: Duration) -> Result<Output> {
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "timed out after {timeout:?}; stderr: {}",
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs a host-side command (e.g. `ip`) and fails with its stderr.
pub fn host_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = output_within(
        {
            let mut c = Command::new(program);
            c.args(args);
            c
        },
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
