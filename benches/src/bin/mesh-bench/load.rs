//! The programs mesh-bench runs inside a pod (it re-executes itself there,
//! because capture applies to processes in the pod's netns and cgroup, not
//! to a thread of the harness). Each prints one JSON object on stdout.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    http::{HttpConn, one_shot},
    stats::Percentiles,
};

/// Dispatches `mesh-bench <program> ARGS...` run inside a pod.
pub fn run_in_pod(program: &str, args: &[String]) -> Result<bool> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("{program}: missing argument {}", i + 1))
    };
    let report = match program {
        "http-server" => {
            crate::http::serve(arg(0)?.parse()?)?;
            return Ok(true);
        }
        "open-loop" => serde_json::to_value(open_loop(
            arg(0)?.parse()?,
            arg(1)?.parse()?,
            arg(2)?.parse()?,
            arg(3)?.parse()?,
        )?)?,
        "conn-rate" => serde_json::to_value(conn_rate(
            arg(0)?.parse()?,
            arg(1)?.parse()?,
            arg(2)?.parse()?,
        )?)?,
        "conn-cost" => serde_json::to_value(conn_cost(arg(0)?.parse()?, arg(1)?.parse()?)?)?,
        "spread" => serde_json::to_value(spread(arg(0)?, arg(1)?.parse()?)?)?,
        "first-served" => serde_json::to_value(first_served(arg(0)?.parse()?)?)?,
        "conn-loop" => serde_json::to_value(conn_loop(arg(0)?.parse()?, Path::new(arg(1)?))?)?,
        "idle-conns" => {
            idle_conns(arg(0)?.parse()?, arg(1)?.parse()?)?;
            return Ok(true);
        }
        _ => return Ok(false),
    };
    println!("{report}");
    Ok(true)
}

/// Requests made and failed by one load run.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
}

/// The first failure of a load, for the harness to print.
fn note_error(first: &mut Option<String>, target: SocketAddr, error: std::io::Error) {
    if first.is_none() {
        *first = Some(format!("{target}: {error}"));
    }
}

/// What the open-loop generator measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct OpenLoop {
    pub counts: Counts,
    /// Completed requests per second over the whole run.
    pub achieved_rps: f64,
    /// Latency from each request's scheduled start, µs.
    pub latency_us: Percentiles,
}

/// Open-loop constant-rate load: `connections` keep-alive connections,
/// each sending on its own fixed schedule (rate / connections per second,
/// offset so the sends interleave). Each request is timed from its
/// scheduled start, not from when it was sent, so a stall counts against
/// every request it delays (coordinated-omission correction): a late
/// request is sent at once and its wait is part of its latency.
pub fn open_loop(
    addr: SocketAddr,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> Result<OpenLoop> {
    let per_conn = rate / connections as f64;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let count = (per_conn * seconds).round().max(1.0) as u64;
    // Time for every connection to open and warm up (one untimed request,
    // which also sets up the tunnel) before the schedule starts.
    let start = Instant::now() + Duration::from_millis(500);
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let offset = interval.mul_f64(c as f64 / connections as f64);
            std::thread::spawn(move || -> (Vec<f64>, u64) {
                let mut latencies = Vec::with_capacity(count as usize);
                let mut errors = 0;
                let mut conn = HttpConn::connect(addr)
                    .and_then(|mut c| c.request().map(|()| c))
                    .ok();
                for i in 0..count {
                    let scheduled = start + offset + interval.mul_f64(i as f64);
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let ok = match conn.as_mut() {
                        Some(c) => c.request().is_ok(),
                        None => false,
                    };
                    if ok {
                        latencies.push(scheduled.elapsed().as_secs_f64() * 1e6);
                    } else {
                        errors += 1;
                        conn = HttpConn::connect(addr).ok();
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.join().expect("load thread panicked");
        all.extend(latencies);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(OpenLoop {
        counts: Counts {
            requests: all.len() as u64,
            errors,
        },
        achieved_rps: all.len() as f64 / elapsed,
        latency_us: Percentiles::of(&mut all),
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnRate {
    pub counts: Counts,
    pub per_second: f64,
}

/// `clients` threads, each doing connect + one request + close in a loop
/// for `seconds`.
pub fn conn_rate(addr: SocketAddr, seconds: f64, clients: usize) -> Result<ConnRate> {
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            std::thread::spawn(move || {
                while Instant::now() < end {
                    let counter = if one_shot(addr).is_ok() {
                        &done
                    } else {
                        &errors
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("connection thread panicked");
    }
    let requests = done.load(Ordering::Relaxed);
    Ok(ConnRate {
        counts: Counts {
            requests,
            errors: errors.load(Ordering::Relaxed),
        },
        per_second: requests as f64 / start.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnCost {
    pub counts: Counts,
    pub latency_us: Percentiles,
}

/// `count` sequential connect + one request + close, each timed.
pub fn conn_cost(addr: SocketAddr, count: usize) -> Result<ConnCost> {
    let mut micros = Vec::with_capacity(count);
    let mut errors = 0;
    for _ in 0..count {
        let started = Instant::now();
        match one_shot(addr) {
            Ok(()) => micros.push(started.elapsed().as_secs_f64() * 1e6),
            Err(_) => errors += 1,
        }
    }
    Ok(ConnCost {
        counts: Counts {
            requests: micros.len() as u64,
            errors,
        },
        latency_us: Percentiles::of(&mut micros),
    })
}

/// `requests` requests spread round-robin over keep-alive connections to
/// every address in the comma-separated `targets`, as fast as they answer.
pub fn spread(targets: &str, requests: u64) -> Result<Counts> {
    let addrs: Vec<SocketAddr> = targets
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut conns: Vec<Option<HttpConn>> =
        addrs.iter().map(|a| HttpConn::connect(*a).ok()).collect();
    let mut counts = Counts::default();
    let mut first_error = None;
    for i in 0..requests {
        let slot = i as usize % addrs.len();
        let reused = conns[slot].is_some();
        let result = match conns[slot].as_mut() {
            Some(conn) => conn.request(),
            None => HttpConn::connect(addrs[slot]).and_then(|mut c| {
                c.request()?;
                conns[slot] = Some(c);
                Ok(())
            }),
        };
        match result {
            Ok(()) => counts.requests += 1,
            Err(e) => {
                counts.errors += 1;
                let on = if reused { "a kept-alive" } else { "a new" };
                let e =
                    std::io::Error::new(e.kind(), format!("request {i} on {on} connection: {e}"));
                note_error(&mut first_error, addrs[slot], e);
                conns[slot] = None;
            }
        }
    }
    if let Some(error) = first_error {
        eprintln!("spread: {} failed, the first: {error}", counts.errors);
    }
    Ok(counts)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FirstServed {
    /// Wall-clock time of the first successful request, µs since the epoch
    /// (CLOCK_REALTIME is the same in every network namespace).
    pub at_unix_us: u64,
}

/// Tries connect + request every 5 ms until one succeeds (60 s at most).
pub fn first_served(addr: SocketAddr) -> Result<FirstServed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if one_shot(addr).is_ok() {
            return Ok(FirstServed {
                at_unix_us: unix_micros(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("{addr} never answered within 60 s")
}

pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Connect + request + close every 2 ms until `stop` exists.
pub fn conn_loop(addr: SocketAddr, stop: &Path) -> Result<Counts> {
    let mut counts = Counts::default();
    while !stop.exists() {
        match one_shot(addr) {
            Ok(()) => counts.requests += 1,
            Err(_) => counts.errors += 1,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(counts)
}

/// Opens up to `count` connections, one request on each (so every one is
/// established end to end), prints the counts, then holds them open until
/// killed. Stops at the first failure: a data plane at its connection
/// limit makes every further attempt wait out the timeout.
pub fn idle_conns(addr: SocketAddr, count: usize) -> Result<()> {
    raise_fd_limit()?;
    let mut held = Vec::with_capacity(count);
    let mut counts = Counts::default();
    for _ in 0..count {
        match HttpConn::connect(addr).and_then(|mut c| c.request().map(|()| c)) {
            Ok(conn) => {
                held.push(conn);
                counts.requests += 1;
            }
            Err(error) => {
                counts.errors += 1;
                eprintln!(
                    "idle-conns: connection {} failed: {error}",
                    counts.requests + 1
                );
                break;
            }
        }
    }
    println!("{}", serde_json::to_string(&counts)?);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_fd_limit() -> Result<()> {
    raise_fd_limit_to(0)
}

/// Raises RLIMIT_NOFILE to at least `floor` (the hard limit too: root may)
/// and the soft limit to the hard one. Processes started afterwards (the
/// agents, the sidecars, the pod programs) inherit it.
pub fn raise_fd_limit_to(floor: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let hard = limit.rlim_max;
        limit.rlim_max = hard.max(floor);
        limit.rlim_cur = limit.rlim_max;
        // Raising the hard limit needs CAP_SYS_RESOURCE: without it, take
        // the hard limit as it is.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            limit.rlim_max = hard;
            limit.rlim_cur = hard;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
