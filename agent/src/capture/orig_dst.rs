//! The original-destination map, read the way the agent uses it: each entry
//! taken exactly once, right after accept().

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use ambit_common::{ClientKey, OriginalDst};
use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};

/// The bpf(2) commands used here. aya 0.14's HashMap has no
/// lookup-and-delete, hence the raw calls.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Hash maps support it since Linux 5.14.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// What older kernels answer for hash maps (the kernel's ENOTSUPP).
const ENOTSUPP: i32 = 524;

pub struct OriginalDsts {
    map: MapData,
    /// Cleared the first time the kernel refuses the one-call form.
    one_call: AtomicBool,
}

/// The kernel's `bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl OriginalDsts {
    /// Takes the map, checking its key and value sizes first.
    pub fn new(map: Map) -> Result<Self> {
        HashMap::<&MapData, ClientKey, OriginalDst>::try_from(&map)
            .context("the original-destination map does not match this agent")?;
        let (Map::HashMap(map) | Map::LruHashMap(map)) = map else {
            anyhow::bail!("the original-destination map is not a hash map");
        };
        Ok(Self {
            map,
            one_call: AtomicBool::new(true),
        })
    }

    /// Looks `key` up and deletes it: one syscall (atomic, so the sock_ops
    /// program's delete at close cannot come in between), or two on
    /// kernels older than 5.14.
    pub fn take(&self, key: &ClientKey) -> Option<OriginalDst> {
        if self.one_call.load(Ordering::Relaxed) {
            match self.call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key) {
                Err(e) if e.raw_os_error() == Some(ENOTSUPP) => {
                    tracing::info!(
                        "no BPF_MAP_LOOKUP_AND_DELETE_ELEM for hash maps before Linux 5.14: \
                         taking original destinations with a lookup, then a delete"
                    );
                    self.one_call.store(false, Ordering::Relaxed);
                }
                taken => return taken.ok(),
            }
        }
        let dst = self.call(BPF_MAP_LOOKUP_ELEM, key).ok()?;
        // The sock_ops program also deletes it at close; whoever is first wins.
        let _ = self.call(BPF_MAP_DELETE_ELEM, key);
        Some(dst)
    }

    fn call(&self, cmd: libc::c_long, key: &ClientKey) -> io::Result<OriginalDst> {
        let mut value = OriginalDst::default();
        let attr = ElemAttr {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: key as *const ClientKey as u64,
            value: &mut value as *mut OriginalDst as u64,
            flags: 0,
        };
        // SAFETY: `attr` points at a live key and at room for one value of
        // the map's value size (checked in `new`); the kernel reads no more
        // of `attr` than the size we pass.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    }
}
