//! Keeping the datapath in the kernel across the agent's exit: links pinned on a BPF file
//! system (`--pin-dir`) stay attached when the process that made them is gone, so a pod that
//! asked for fail-closed stays refused rather than going out in plaintext, and a restarted
//! agent finds the programs still in place.
//!
//! What aya 0.13 cannot pin (cgroup links) is made here with the `bpf(2)` commands directly.
//!
//! Layout under the pin directory, in a subdirectory per build of the eBPF object
//! (`obj-<hash>`: a successor adopts only its own build's maps, whose layouts it knows):
//! - `maps/<MAP>`: the maps the agent reads and writes;
//! - `progs/<program>`: the TC programs, for attaching to pods enrolled later;
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
    /// `--pin-dir`.
    base: PathBuf,
    /// This build's subdirectory.
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
    /// Checks that `base` can hold pins (creating it on the BPF file system if needed); the
    /// pins of the build tagged `tag` go in a subdirectory.
    pub fn open(base: &Path, tag: &str) -> Result<Self, Error> {
        let parent_is_bpffs = base.parent().is_some_and(is_bpffs);
        if !base.exists() && parent_is_bpffs {
            std::fs::create_dir_all(base).map_err(io_err(base))?;
        }
        if !is_bpffs(base) {
            return Err(Error::NotBpffs(base.to_owned()));
        }
        let dir = Self {
            base: base.to_owned(),
            root: base.join(format!("obj-{tag}")),
        };
        for sub in [dir.maps(), dir.programs(), dir.links(), dir.tc()] {
            std::fs::create_dir_all(&sub).map_err(io_err(&sub))?;
        }
        Ok(dir)
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn programs(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// Where program `name` is pinned.
    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    /// Whether a previous agent of this build left a whole datapath here: `maps`, the TC
    /// programs and every cgroup link (pinned last).
    pub fn complete(&self, maps: &[&str]) -> bool {
        use mesh_agent_common::programs as p;
        maps.iter().all(|m| self.map(m).exists())
            && [p::ANTI_SPOOF, p::INBOUND_POLICY]
                .iter()
                .all(|n| self.program(n).exists())
            && [
                p::CONNECT4,
                p::CONNECT6,
                p::GETPEERNAME4,
                p::GETPEERNAME6,
                p::SOCKOPS,
            ]
            .iter()
            .all(|n| self.link(n).exists())
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

    /// Unpins everything previous agents left (which detaches their programs): another
    /// build's whole subdirectory, and what of ours is there (an incomplete set). Keeps our
    /// directories. Returns how many pins went.
    pub fn clear(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.base).map_err(io_err(&self.base))? {
            let path = entry.map_err(io_err(&self.base))?.path();
            let ours = path == self.root;
            let build = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("obj-"));
            if build && !ours && path.is_dir() {
                removed += count_files(&path);
                std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
            }
        }
        for sub in [self.maps(), self.programs(), self.links(), self.tc()] {
            for entry in std::fs::read_dir(&sub).map_err(io_err(&sub))? {
                let path = entry.map_err(io_err(&sub))?.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The pinned TC links of interfaces other than `keep` (pods gone while no agent ran).
    pub fn stale_tc_links(&self, keep: &dyn Fn(u32) -> bool) -> Vec<PathBuf> {
        std::fs::read_dir(self.tc())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                let ifindex = name
                    .as_deref()
                    .and_then(|n| n.split_once('-'))
                    .and_then(|(i, _)| i.parse::<u32>().ok());
                ifindex.is_some_and(|i| !keep(i))
            })
            .collect()
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
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
