//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whichever thread
//! later uses it or whichever namespace that thread is in. So the calling
//! thread enters the pod's namespace, creates the socket and returns to the
//! agent's own namespace at once (as ztunnel's InpodNetns does): no thread
//! per pod and no hop to another thread, two `setns` calls per socket. The
//! async runtime then drives the socket like any other.
//!
//! Returning is not optional: a worker thread left in a pod's namespace
//! would open the next pod's sockets in the wrong place. [`Entered`] always
//! returns, on panic too, and aborts the process if it cannot.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd},
    path::{Path, PathBuf},
    sync::LazyLock,
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// The agent's own network namespace, opened once, before any thread has
/// entered another one (see [`Netns::open`]).
static HOME: LazyLock<io::Result<File>> = LazyLock::new(|| File::open("/proc/thread-self/ns/net"));

fn home() -> Result<&'static File> {
    HOME.as_ref()
        .map_err(|e| anyhow!("opening the agent's own network namespace: {e}"))
}

/// A pod's network namespace, entered by the calling thread for the
/// moment it takes to create a socket.
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: u64,
    /// The process's own namespace (a sidecar's): nothing to enter.
    own: bool,
}

/// The calling thread is inside a pod's namespace until this is dropped.
/// Not `Send`: it returns the thread it was made on.
struct Entered {
    home: &'static File,
    _thread: PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = setns(self.home, CloneFlags::CLONE_NEWNET) {
            // Serving on from a pod's namespace would put other pods'
            // sockets in it: stop instead.
            eprintln!("ambit: cannot return to the agent's network namespace ({e}): aborting");
            std::process::abort();
        }
    }
}

impl Netns {
    /// Opens the namespace at `path` (e.g. /var/run/netns/NAME or
    /// /proc/PID/ns/net) and reads its cookie.
    pub fn open(path: &Path) -> Result<Self> {
        // Pin the way home while this thread is surely in it.
        home()?;
        let file = File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let mut netns = Self {
            path: path.to_path_buf(),
            file,
            cookie: 0,
            own: false,
        };
        netns.cookie = netns.run_blocking(|| {
            let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            netns_cookie(&probe)
        })??;
        Ok(netns)
    }

    /// The namespace the calling thread is in (a sidecar's: its pod's).
    pub fn current() -> Result<Self> {
        let mut netns = Self::open(Path::new("/proc/thread-self/ns/net"))?;
        netns.own = true;
        Ok(netns)
    }

    /// The kernel's cookie for this namespace, as `bpf_get_netns_cookie` sees it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// `None` when the thread is already there (the process's own namespace).
    fn enter(&self) -> Result<Option<Entered>> {
        if self.own {
            return Ok(None);
        }
        let home = home()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", self.path.display()))?;
        Ok(Some(Entered {
            home,
            _thread: PhantomData,
        }))
    }

    /// Runs `f` inside the namespace on the calling thread, then returns.
    /// `f` must be short and must not block (it runs on the async runtime's
    /// thread when called from it): create sockets, read addresses.
    pub fn run_blocking<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let _entered = self.enter()?;
        Ok(f())
    }

    /// A listening TCP socket bound to `addr` inside the namespace. `[::]`
    /// listens on both IPv6 and IPv4; any other IPv6 address on IPv6 only.
    pub fn listen(&self, addr: SocketAddr, mark: u32) -> Result<std::net::TcpListener> {
        self.run_blocking(move || -> io::Result<_> {
            let socket = Socket::new(
                Domain::for_address(addr),
                nonblocking_stream(),
                Some(Protocol::TCP),
            )?;
            if addr.is_ipv6() {
                socket.set_only_v6(!addr.ip().is_unspecified())?;
            }
            set_mark(&socket, mark)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })?
        .with_context(|| format!("listening on {addr} in {}", self.path.display()))
    }

    /// Connects, from inside the namespace, a socket carrying `mark` (so the
    /// capture programs let it through) to `dst`.
    pub async fn connect(&self, dst: SocketAddr, mark: u32) -> Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket(dst, mark)?;
        Ok(into_tokio(socket).connect(dst).await?)
    }

    /// A socket for `dst`, made inside the namespace and bound there to
    /// `src` (an address the namespace need not have: IP_TRANSPARENT), any
    /// port, not yet connected. It carries `mark`, by which the namespace's
    /// policy routing brings the replies back to it (see
    /// [`crate::transparent`]).
    pub fn transparent_socket(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        mark: u32,
    ) -> Result<tokio::net::TcpSocket> {
        let socket = self.tcp_socket(dst, mark)?;
        let transparent = if dst.is_ipv4() {
            socket.set_ip_transparent_v4(true)
        } else {
            socket.set_ip_transparent_v6(true)
        };
        transparent.context("setting IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .with_context(|| format!("binding to {src} in {}", self.path.display()))?;
        Ok(into_tokio(socket))
    }

    /// A non-blocking TCP socket for `dst`, carrying `mark`, made in the
    /// namespace (only its creation needs to be there).
    fn tcp_socket(&self, dst: SocketAddr, mark: u32) -> Result<Socket> {
        let socket = self
            .run_blocking(|| {
                Socket::new(
                    Domain::for_address(dst),
                    nonblocking_stream(),
                    Some(Protocol::TCP),
                )
            })?
            .with_context(|| format!("creating a socket in {}", self.path.display()))?;
        set_mark(&socket, mark)?;
        socket.set_tcp_nodelay(true)?;
        Ok(socket)
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

/// A TCP socket type made non-blocking by socket(2) itself (socket2 adds
/// close-on-exec): the async runtime needs it so, and setting it afterwards
/// costs two fcntl calls per connection.
fn nonblocking_stream() -> Type {
    Type::STREAM.nonblocking()
}

/// SO_MARK, unless `mark` is 0: a sidecar exempted by uid runs without
/// CAP_NET_ADMIN and marks nothing.
fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket.set_mark(mark)
}

fn into_tokio(socket: Socket) -> tokio::net::TcpSocket {
    // SAFETY: the fd comes from a socket we own and hand over exactly once.
    unsafe { tokio::net::TcpSocket::from_raw_fd(socket.into_raw_fd()) }
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

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A new, empty network namespace (needs CAP_SYS_ADMIN), kept alive by
    /// the returned file and reachable at the returned path.
    pub fn new_namespace() -> (File, PathBuf) {
        let file = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) needs root");
            File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        ));
        (file, path)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::{test_support::new_namespace, *};

    /// The inode of the calling thread's network namespace.
    fn current_netns() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn sockets_are_made_inside_and_the_thread_comes_back() {
        let home = current_netns();
        let (_keep, path) = new_namespace();
        let netns = Netns::open(&path).unwrap();
        let inside = netns.run_blocking(current_netns).unwrap();
        assert_ne!(inside, home);
        assert_eq!(current_netns(), home);
        let listener = netns.listen("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        assert_eq!(netns_cookie(&listener).unwrap(), netns.cookie());
        let here = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        assert_ne!(netns_cookie(&here).unwrap(), netns.cookie());
        // A fresh namespace has only a (down) loopback.
        assert!(netns.local_addresses().unwrap().is_empty());
        assert_eq!(current_netns(), home);
    }

    #[test]
    fn a_panic_inside_still_returns_the_thread() {
        let home = current_netns();
        let (_keep, path) = new_namespace();
        let netns = Netns::open(&path).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            netns.run_blocking(|| panic!("inside")).unwrap();
        }));
        assert!(panicked.is_err());
        assert_eq!(current_netns(), home);
    }
}
