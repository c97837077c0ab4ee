//! A pod's network namespace from its sandbox, as the kubelet and the container runtime lay
//! it out: the kubelet names the pod's cgroup after its UID, the runtime puts the sandbox
//! (pause) process and the containers' processes in cgroups below it, and any of those
//! processes' `/proc/PID/ns/net` is the pod's namespace. Only namespaces of the pod's own
//! processes are probed (the agent falls back to probing the node's namespaces only for a pod
//! whose cgroup leads nowhere: see the reconciler).
//!
//! A pod's process could make a network namespace of its own (in a user namespace it creates:
//! no privilege needed) and give it the pod's address: only a namespace owned by the node's
//! initial user namespace, as the runtime creates a sandbox's, is taken. (Pods with
//! `hostUsers: false` have their sandbox in a user namespace of their own: they are found by
//! the fallback.)
//!
//! Layouts, under the cgroup v2 root (or a kind node's nested one):
//! - cgroupfs driver: `kubepods/[burstable|besteffort/]pod<uid>/<container-id>`;
//! - systemd driver: `kubepods.slice/[kubepods-burstable.slice/]kubepods-[burstable-]pod<uid
//!   with _ for ->.slice/cri-containerd-<id>.scope` (CRI-O: `crio-<id>.scope`), and kind's
//!   `kubelet.slice/kubelet-kubepods.slice/...` with the same names prefixed `kubelet-`.

use std::{
    collections::HashSet,
    fs::File,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use super::{probe_namespace, PodNetns};

/// `NS_GET_USERNS` (`_IO(0xb7, 0x1)`): a descriptor of the user namespace owning a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// Whether the namespace `ns` is owned by the same user namespace as the agent's: the node's,
/// where the container runtime creates sandboxes.
fn owned_by_the_node(ns: &File) -> bool {
    // SAFETY: ioctl on a valid namespace descriptor; a returned descriptor is owned at once.
    let owner = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if owner < 0 {
        return false;
    }
    // SAFETY: fresh descriptor we own.
    let owner = File::from(unsafe { OwnedFd::from_raw_fd(owner) });
    let ours = std::fs::metadata("/proc/self/ns/user");
    match (owner.metadata(), ours) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Names of the kubelet's pod cgroup roots: cgroupfs driver, systemd driver, kind's nested
/// kubelet.
const ROOT_NAMES: &[&str] = &["kubepods", "kubepods.slice", "kubelet-kubepods.slice"];
/// How deep under the cgroup root a pod root is looked for.
const ROOT_DEPTH: usize = 4;
/// While no pod root exists (the kubelet has not started), how often to look again.
const ROOT_RETRY: Duration = Duration::from_secs(10);

/// Finds pods' sandboxes under one cgroup v2 hierarchy.
#[derive(Debug)]
pub struct Sandboxes {
    cgroup_root: PathBuf,
    /// The kubelet's pod roots found so far.
    roots: Vec<PathBuf>,
    looked: Option<Instant>,
}

impl Sandboxes {
    pub fn new(cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            cgroup_root: cgroup_root.into(),
            roots: Vec::new(),
            looked: None,
        }
    }

    /// The kubelet's pod roots (looked for again when none is left, at most every
    /// [`ROOT_RETRY`]).
    fn roots(&mut self) -> &[PathBuf] {
        self.roots.retain(|r| r.is_dir());
        let due = self.looked.is_none_or(|at| at.elapsed() >= ROOT_RETRY);
        if self.roots.is_empty() && due {
            self.looked = Some(Instant::now());
            let mut level = vec![self.cgroup_root.clone()];
            for _ in 0..ROOT_DEPTH {
                let mut next = Vec::new();
                for dir in level {
                    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                            continue;
                        }
                        let name = entry.file_name();
                        if ROOT_NAMES.iter().any(|r| name == *r) {
                            self.roots.push(entry.path());
                        } else {
                            next.push(entry.path());
                        }
                    }
                }
                level = next;
            }
            if !self.roots.is_empty() {
                tracing::info!(roots = ?self.roots, "kubelet pod cgroups found");
            }
        }
        &self.roots
    }

    /// The cgroup of the pod with `uid`: directly under a root or under its QoS class's.
    pub fn pod_cgroup(&mut self, uid: &str) -> Option<PathBuf> {
        let cgroupfs = format!("pod{uid}");
        let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
        let is_pod = |name: &str| name == cgroupfs || name.ends_with(&systemd);
        for root in self.roots().to_vec() {
            let children = || {
                std::fs::read_dir(&root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            };
            // Guaranteed pods sit right under the root; the others under their QoS class.
            if let Some(pod) = children().find(|e| is_pod(&e.file_name().to_string_lossy())) {
                return Some(pod.path());
            }
            for class in children() {
                let found = std::fs::read_dir(class.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .find(|e| is_pod(&e.file_name().to_string_lossy()));
                if let Some(pod) = found {
                    return Some(pod.path());
                }
            }
        }
        None
    }

    /// Finds the network namespace of the pod with `uid` that holds `ip`, among its processes'
    /// namespaces; `None` if the pod has no cgroup (yet), no process, or no process in a
    /// namespace with that address. Namespaces whose cookie is in `skip` (a sandbox just
    /// released) are not taken.
    pub fn find(&mut self, uid: &str, ip: Ipv4Addr, skip: &HashSet<u64>) -> Option<PodNetns> {
        let dir = self.pod_cgroup(uid)?;
        let mut seen = HashSet::new();
        for pid in pids(&dir) {
            let path = format!("/proc/{pid}/ns/net");
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if !seen.insert((meta.dev(), meta.ino())) || !owned_by_the_node(&file) {
                continue;
            }
            let Ok(probe_file) = file.try_clone() else {
                continue;
            };
            // setns affects only the calling thread; a short-lived thread keeps ours untouched.
            let probe = std::thread::Builder::new()
                .name("netns-probe".to_owned())
                .spawn(move || probe_namespace(&probe_file, &[ip]));
            let Ok(Ok(Ok(hits))) = probe.map(|p| p.join()) else {
                continue;
            };
            if let Some((_, cookie)) = hits.into_iter().find(|(_, c)| !skip.contains(c)) {
                return Some(PodNetns { cookie, file });
            }
        }
        None
    }
}

/// The processes in `dir`'s cgroup subtree (the pod's containers and its sandbox), two levels
/// deep.
fn pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut level = vec![dir.to_owned()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for d in level {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    out
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn our_own_namespace_is_the_nodes() {
        assert!(owned_by_the_node(&File::open("/proc/self/ns/net").unwrap()));
    }

    /// Both drivers' layouts, Guaranteed and not, found by UID alone.
    #[test]
    fn pod_cgroups_of_both_drivers() {
        let root = std::env::temp_dir().join(format!("mesh-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let under = |p: &str| {
            let d = root.join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let systemd = under("a/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice");
        under("a/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podother.slice");
        let mut s = Sandboxes::new(root.join("a"));
        assert_eq!(s.pod_cgroup(uid), Some(systemd));
        assert_eq!(s.pod_cgroup("0000"), None);

        let cgroupfs = under(&format!("b/kubepods/pod{uid}"));
        let mut s = Sandboxes::new(root.join("b"));
        assert_eq!(s.pod_cgroup(uid), Some(cgroupfs));

        let kind = under("c/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice");
        let mut s = Sandboxes::new(root.join("c"));
        assert_eq!(s.pod_cgroup(uid), Some(kind));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
