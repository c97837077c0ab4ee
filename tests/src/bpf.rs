//! Just enough of the bpf(2) syscall to find the agent's maps by name and fill them, for tests
//! that need a datapath under load without making 60,000 real connections.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr prefix of the size we pass, alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    fd: u32,
    info_len: u32,
    info: u64,
}

/// The leading fields of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    kind: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

#[repr(C)]
struct ElemAttr {
    fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A map found by name: its descriptor and sizes.
pub struct Map {
    pub fd: OwnedFd,
    pub key_size: usize,
    pub value_size: usize,
}

/// Every map of the system whose name is `name` (the kernel keeps 15 characters).
pub fn maps_named(name: &str) -> io::Result<Vec<Map>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut next = IdAttr {
            id,
            ..IdAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_ID, &mut next) {
            Ok(_) => id = next.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let mut by_id = IdAttr {
            id,
            ..IdAttr::default()
        };
        let Ok(fd) = bpf(BPF_MAP_GET_FD_BY_ID, &mut by_id) else {
            continue;
        };
        // SAFETY: a fresh descriptor the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = MapInfo::default();
        let mut attr = InfoAttr {
            fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: (&mut info as *mut MapInfo) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let len = info.name.iter().position(|b| *b == 0).unwrap_or(16);
        if info.name.get(..len) == Some(name.as_bytes()) {
            out.push(Map {
                fd,
                key_size: info.key_size as usize,
                value_size: info.value_size as usize,
            });
        }
    }
}

impl Map {
    /// How many entries the map holds now (walked key by key).
    pub fn count(&self) -> io::Result<u64> {
        let mut key = vec![0u8; self.key_size];
        let mut next = vec![0u8; self.key_size];
        let mut n = 0u64;
        let mut first = true;
        loop {
            let mut attr = ElemAttr {
                fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: if first { 0 } else { key.as_ptr() as u64 },
                value: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
            first = false;
            n += 1;
            std::mem::swap(&mut key, &mut next);
        }
    }

    /// Inserts `count` entries whose keys are `i` (little-endian, zero-padded to the key size)
    /// and whose values are zero.
    pub fn fill(&self, count: u64) -> io::Result<()> {
        let value = vec![0u8; self.value_size];
        let mut key = vec![0u8; self.key_size];
        for i in 0..count {
            for (k, b) in key.iter_mut().zip(i.to_le_bytes()) {
                *k = b;
            }
            let mut attr = ElemAttr {
                fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_ptr() as u64,
                flags: 0,
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
        }
        Ok(())
    }
}
