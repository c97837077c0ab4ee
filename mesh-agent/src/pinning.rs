//! Keeping the datapath in the kernel across the agent's exit: links pinned on a BPF file
//! system (`--pin-dir`) stay attached when the process that made them is gone, so a pod that
//! asked for fail-closed stays refused rather than going out in plaintext, and a restarted
//! agent finds the programs still in place.
//!
//! What aya 0.13 cannot pin (cgroup links) is made here with the `bpf(2)` commands directly.
//!
//! Layout under the pin directory:
//! - `links/<program>`: the cgroup links (connect4, connect6, getpeername4/6, sockops);
//! - `tc/<ifindex>-ingress`, `tc/<ifindex>-egress`: each enrolled pod's TC links.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

/// `statfs(2)` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `enum bpf_attach_type` values of the cgroup programs (UAPI, stable).
pub mod attach {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const CGROUP_INET6_GETPEERNAME: u32 = 30;
}

/// Where the agent pins what must outlive it.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--pin-dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--pin-dir {0} is not on a BPF file system; mount one first (mount -t bpf bpf /sys/fs/bpf), \
         or, in Kubernetes, give the agent the host's /sys/fs/bpf"
    )]
    NotBpffs(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl PinDir {
    /// Checks that `root` can hold pins (creating it on the BPF file system if needed).
    pub fn open(root: &Path) -> Result<Self, Error> {
        let parent_is_bpffs = root.parent().is_some_and(is_bpffs);
        if !root.exists() && parent_is_bpffs {
            std::fs::create_dir_all(root).map_err(io_err(root))?;
        }
        if !is_bpffs(root) {
            return Err(Error::NotBpffs(root.to_owned()));
        }
        let dir = Self {
            root: root.to_owned(),
        };
        for sub in [dir.links(), dir.tc()] {
            std::fs::create_dir_all(&sub).map_err(io_err(&sub))?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    fn tc(&self) -> PathBuf {
        self.root.join("tc")
    }

    /// Where the cgroup link of `program` is pinned.
    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    /// Where a pod's TC link is pinned.
    pub fn tc_link(&self, ifindex: u32, ingress: bool) -> PathBuf {
        let side = if ingress { "ingress" } else { "egress" };
        self.tc().join(format!("{ifindex}-{side}"))
    }

    /// Unpins everything a previous agent left (which detaches its programs), keeping the
    /// directories. Returns how many pins went.
    pub fn clear(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for sub in [self.links(), self.tc()] {
            for entry in std::fs::read_dir(&sub).map_err(io_err(&sub))? {
                let path = entry.map_err(io_err(&sub))?.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Whether `path` is on a BPF file system.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (the fields a cgroup link uses, then room for the
/// rest of the union, zeroed).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `union bpf_attr` prefix of its full size for `cmd`, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches a cgroup program by a new BPF link (multi-attach, as every cgroup link) and pins
/// the link at `pin`: it stays attached until the pin is removed.
pub fn attach_pinned(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    pin: &Path,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        _rest: [0; 6],
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: a successful BPF_LINK_CREATE returns a new file descriptor we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_fd(link.as_fd(), pin)?;
    Ok(link)
}

/// Pins a BPF object (`BPF_OBJ_PIN`), replacing a stale pin of the same name.
pub fn pin_fd(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    match bpf(BPF_OBJ_PIN, &attr) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            std::fs::remove_file(path)?;
            bpf(BPF_OBJ_PIN, &attr).map(drop)
        }
        other => other.map(drop),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime fills the zeroed struct.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// How often the heartbeat renews the agent's deadline, for a given timeout: five times per
/// timeout, so a beat or two may be late without the programs giving up on the agent.
pub fn beat(timeout: Duration) -> Duration {
    timeout / 5
}
