//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whichever thread
//! later uses it. Each pod gets one OS thread that has entered the pod's
//! namespace and creates sockets on request; the async runtime then drives
//! them like any other socket.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// A handle to a thread living in one network namespace.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    cookie: u64,
}

impl Netns {
    /// Enters the namespace at `path` (e.g. /var/run/netns/NAME or
    /// /proc/PID/ns/net) on a new thread.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let name = format!("netns:{}", path.file_name().unwrap_or_default().display());
        thread::Builder::new()
            .name(name)
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })
            .context("spawning a namespace thread")?;
        entered_rx
            .recv()
            .map_err(|_| anyhow!("namespace thread exited"))?
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        let mut netns = Self {
            path: path.to_path_buf(),
            jobs,
            cookie: 0,
        };
        netns.cookie = netns.run_blocking(|| {
            let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            netns_cookie(&probe)
        })??;
        Ok(netns)
    }

    /// The namespace the calling thread is in (a sidecar's: its pod's).
    pub fn current() -> Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The kernel's cookie for this namespace, as `bpf_get_netns_cookie` sees it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the namespace thread and waits for it (for setup paths).
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv()
            .map_err(|_| anyhow!("namespace thread dropped a job"))
    }

    /// Runs `f` on the namespace thread without blocking the async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await
            .map_err(|_| anyhow!("namespace thread dropped a job"))
    }

    fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| anyhow!("namespace thread for {} is gone", self.path.display()))
    }

    /// A listening TCP socket bound to `addr` inside the namespace. `[::]`
    /// listens on both IPv6 and IPv4; any other IPv6 address on IPv6 only.
    pub fn listen(&self, addr: SocketAddr, mark: u32) -> Result<std::net::TcpListener> {
        self.run_blocking(move || -> io::Result<_> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(!addr.ip().is_unspecified())?;
            }
            set_mark(&socket, mark)?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })?
        .with_context(|| format!("listening on {addr} in {}", self.path.display()))
    }

    /// Connects, from inside the namespace, a socket carrying `mark` (so the
    /// capture programs let it through) to `dst`.
    pub async fn connect(&self, dst: SocketAddr, mark: u32) -> Result<tokio::net::TcpStream> {
        let socket = self
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                set_mark(&socket, mark)?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await??;
        // SAFETY: the fd comes from a socket we own and hand over exactly once.
        let socket = unsafe { tokio::net::TcpSocket::from_raw_fd(socket.into_raw_fd()) };
        Ok(socket.connect(dst).await?)
    }
}

impl Netns {
    /// Every address configured in the namespace but loopback: link-local
    /// and secondary addresses included, as inbound capture must cover them.
    pub fn local_addresses(&self) -> Result<Vec<IpAddr>> {
        self.run_blocking(|| -> nix::Result<Vec<IpAddr>> {
            let mut found = Vec::new();
            for interface in nix::ifaddrs::getifaddrs()? {
                let Some(addr) = interface.address else {
                    continue;
                };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if !ip.is_loopback() && !found.contains(&ip) {
                    found.push(ip);
                }
            }
            Ok(found)
        })?
        .with_context(|| format!("listing the addresses in {}", self.path.display()))
    }
}

/// SO_MARK, unless `mark` is 0: a sidecar exempted by uid runs without
/// CAP_NET_ADMIN and marks nothing.
fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket.set_mark(mark)
}

/// SO_NETNS_COOKIE (71): the cookie of the namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
