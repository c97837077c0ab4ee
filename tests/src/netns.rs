//! Running code and processes inside a network namespace (and a pod's cgroup).

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
};

/// Path of a named network namespace.
pub fn path(name: &str) -> String {
    format!("/run/netns/{name}")
}

fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path(name))?;
    std::thread::spawn(move || {
        enter(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
}

/// Makes `cmd` start inside namespace `name` and, if given, inside `cgroup` (a cgroup v2
/// directory), the way a container runtime starts a pod's process.
pub fn command_in(cmd: &mut Command, name: &str, cgroup: Option<&Path>) -> io::Result<()> {
    let ns = File::open(path(name))?;
    let procs = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.join("cgroup.procs")))
        .transpose()?;
    // SAFETY: only async-signal-safe calls (setns, write) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` see `hosts` as `/etc/hosts` and `resolv` as `/etc/resolv.conf`, in a mount
/// namespace of its own (what `ip netns exec` does with `/etc/netns/NAME/`): names resolve in a
/// pod as cluster DNS would answer them, and nothing changes for the rest of the machine.
pub fn command_with_files(cmd: &mut Command, hosts: &Path, resolv: &Path) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in a path"))
    };
    let (hosts, resolv) = (c(hosts)?, c(resolv)?);
    let (etc_hosts, etc_resolv, root) = (
        c(Path::new("/etc/hosts"))?,
        c(Path::new("/etc/resolv.conf"))?,
        c(Path::new("/"))?,
    );
    // SAFETY: only unshare and mount (syscalls) run between fork and exec, on strings made
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Nothing mounted here propagates back to the machine's namespace.
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let bind = |from: &CString, to: &CString| {
                libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
            };
            if !bind(&hosts, &etc_hosts) {
                return Err(io::Error::last_os_error());
            }
            // Best effort: a machine whose /etc/resolv.conf is a dangling link keeps it (the
            // testbed's namespaces reach no resolver anyway).
            let _ = bind(&resolv, &etc_resolv);
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` run on CPU `cpu` only (what `taskset -c` does).
pub fn pin(cmd: &mut Command, cpu: usize) {
    // SAFETY: sched_setaffinity is async-signal-safe; the set is built before fork.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writing a bit into a zeroed cpu_set_t we own.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: only sched_setaffinity runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
