//! Running programs on a simulated host: inside its network namespace and
//! its cgroup, the way a container runtime would start them.

use std::{
    ffi::CString,
    io::{self, Read as _},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

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
