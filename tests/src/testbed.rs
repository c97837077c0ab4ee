//! A simulated cluster on one host: a fabric namespace with a bridge, one namespace per node
//! (its host network), one namespace and one cgroup per pod, and the Kubernetes manifests that
//! describe what was created.
//!
//! ```text
//! mt-fabric: br0 ── fab-n1 ═ eth0 (mt-n1, 10.0.0.1/24) ── vth-n1-0 ═ eth0 (mt-n1-a, 10.1.1.2/32)
//!                └─ fab-n2 ═ eth0 (mt-n2, 10.0.0.2/24) ── vth-n2-0 ═ eth0 (mt-n2-b, 10.1.2.2/32)
//! ```
//! Pods route everything to a link-local gateway (169.254.1.1) answered by the node side of
//! their veth, which has a fixed MAC, as Calico does; nodes route pod CIDRs to each other.

use std::{
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
};

use crate::netns;

/// Every namespace the testbed creates starts with this.
pub const PREFIX: &str = "mt-";
const FABRIC: &str = "mt-fabric";
const CGROUP_DIR: &str = "mesh-testbed";
const GATEWAY: &str = "169.254.1.1";
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The bridge of a node's bridged pods ([`PodSpec::bridged`]).
const BRIDGE: &str = "mtbr0";

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    /// Index into the nodes (0-based).
    pub node: usize,
    pub namespace: String,
    pub service_account: String,
    pub app: String,
    /// Labels besides `app`.
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// Laid out as containerd (systemd cgroup driver) lays out a pod with this UID: a cgroup
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice` with a
    /// sandbox process in a scope of its own and the pod's processes in another; the Pod
    /// object carries the UID.
    pub uid: Option<String>,
    /// Attached as Flannel attaches pods: the node-side veth is a port of a bridge
    /// (`mtbr0`), and the node routes the pod's address to the bridge, not to the veth.
    pub bridged: bool,
}

impl PodSpec {
    pub fn new(name: &str, node: usize, app: &str) -> Self {
        Self {
            name: name.to_owned(),
            node,
            namespace: "default".to_owned(),
            service_account: app.to_owned(),
            app: app.to_owned(),
            labels: Vec::new(),
            annotations: Vec::new(),
            uid: None,
            bridged: false,
        }
    }

    /// Attaches the pod through a bridge (see [`PodSpec::bridged`]).
    pub fn bridged(mut self) -> Self {
        self.bridged = true;
        self
    }

    /// Lays the pod out as containerd does, with this UID (see [`PodSpec::uid`]).
    pub fn containerd(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_owned());
        self
    }

    pub fn in_namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    /// Pods with this `app` label back the service.
    pub app: String,
}

impl ServiceSpec {
    /// The Service's IPv6 cluster IP on a dual-stack testbed: `fd00:96::` and the last byte of
    /// the IPv4 one.
    pub fn cluster_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x96,
            0,
            0,
            0,
            0,
            0,
            u16::from(self.cluster_ip.octets()[3]),
        )
    }

    /// Service `web` (10.96.0.10:80 → 8080) in `default`, backed by pods labelled `app: web`:
    /// the demo's and the tests' standard service.
    pub fn web() -> Self {
        Self {
            name: "web".into(),
            namespace: "default".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            target_port: 8080,
            app: "web".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestbedSpec {
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    /// IPv6 beside IPv4 everywhere: nodes `fd00::N`, pods `fd00:1:N::M`, Services with an IPv6
    /// cluster IP (`fd00:96::` + the last byte of the IPv4 one).
    pub dual_stack: bool,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub spec: PodSpec,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    pub host_veth: String,
    pub cgroup: PathBuf,
}

pub struct Testbed {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<ServiceSpec>,
    pub dual_stack: bool,
    /// Scratch directory: manifests, logs.
    pub dir: PathBuf,
    children: Mutex<Vec<Child>>,
    torn_down: bool,
}

fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

fn ip(args: &[&str]) -> io::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

fn sysctl(ns: &str, settings: &[&str]) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sysctl", "-qw"])
        .args(settings);
    run(&mut cmd).map(drop)
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo`. The agent has its own copy
/// (`mesh_agent::datapath::cgroup2_root`): this crate must not depend on `mesh-agent`, because
/// `xtask` (which runs `setup` before bpf-linker exists) depends on it.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or_else(|| io::Error::other("no cgroup2 mount in /proc/self/mountinfo"))
}

fn testbed_cgroup() -> io::Result<PathBuf> {
    Ok(cgroup2_root()?.join(CGROUP_DIR))
}

/// Default scratch directory of the testbed.
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join("mesh-testbed")
}

/// Where [`Testbed::bpffs`] mounts the testbed's own BPF file system.
fn bpffs_dir() -> PathBuf {
    scratch_dir().join("bpffs")
}

/// Unmounts the testbed's BPF file system if it is mounted: whatever agents pinned there
/// (links on the cgroup root, on pods' veths) is detached with it.
fn unmount_bpffs() -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = bpffs_dir();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(&*dir.to_string_lossy()))
        .count();
    // One unmount per instance mounted there (a test may have mounted more than one).
    for _ in 0..mounts {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: plain syscall on a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes everything a testbed (even a crashed one) may have left: processes in its
/// namespaces and cgroups, the namespaces, the cgroups, its BPF file system. Safe to call at
/// any time.
pub fn clean() -> io::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    // Pods first, then nodes, then the fabric (longest names are the innermost).
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in &names {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    let cg = testbed_cgroup()?;
    if cg.is_dir() {
        for entry in std::fs::read_dir(&cg)?.flatten() {
            let dir = entry.path();
            if dir.is_dir() {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
        }
    }
    unmount_bpffs()?;
    for name in &names {
        // Killed processes may take a moment to release the namespace; deletion only unmounts.
        ip(&["netns", "del", name])?;
    }
    if cg.is_dir() {
        for entry in std::fs::read_dir(&cg)?.flatten() {
            let dir = entry.path();
            if dir.is_dir() {
                remove_cgroup(&dir)?;
            }
        }
        remove_cgroup(&cg)?;
    }
    Ok(())
}

/// The cgroup containerd's systemd driver gives the pod with `uid`, under `root`.
fn containerd_pod_cgroup(root: &Path, uid: &str) -> PathBuf {
    root.join("kubepods.slice")
        .join("kubepods-besteffort.slice")
        .join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
}

/// Scopes of a containerd pod: its app container's and its sandbox's (ids as containerd's).
const CONTAINER_SCOPE: &str =
    "cri-containerd-4f1c0e9d2b7a6c5e8d3f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f.scope";
const SANDBOX_SCOPE: &str =
    "cri-containerd-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29180f7e6d5c4b3a2918f7e6d5c4b3.scope";

fn remove_cgroup(dir: &Path) -> io::Result<()> {
    // Children first (a containerd pod's slices and scopes).
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path())?;
        }
    }
    // A cgroup can be removed once its killed processes are gone; give them a moment.
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "cgroup {} stays busy",
        dir.display()
    )))
}

/// The pod's namespace, its veth pair to the node, addresses and routes (as a CNI would).
/// IPv6 off, or on without duplicate address detection (addresses usable at once); nodes
/// also forward it.
fn ipv6_sysctls(on: bool, node: bool) -> &'static [&'static str] {
    match (on, node) {
        (false, _) => &[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
        (true, false) => &[
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
        (true, true) => &[
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.forwarding=1",
        ],
    }
}

/// The link-local gateway pods route IPv6 through (the node side of their veth, as for IPv4).
const GATEWAY6: &str = "fe80::1";

fn create_pod_network(pod: &Pod, node: &Node) -> io::Result<()> {
    let ns = pod.netns.as_str();
    ip(&["netns", "add", ns])?;
    sysctl(ns, ipv6_sysctls(pod.ip6.is_some(), false))?;
    ip(&[
        "-n",
        &node.netns,
        "link",
        "add",
        &pod.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns,
    ])?;
    ip(&[
        "-n",
        &node.netns,
        "link",
        "set",
        &pod.host_veth,
        "address",
        GATEWAY_MAC,
        "up",
    ])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/32", pod.ip),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
    ])?;
    ip(&[
        "-n", ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        GATEWAY_MAC,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let towards_pod = match pod.spec.bridged {
        true => {
            // One bridge per node, with the gateway's MAC (as the veths have it).
            if ip(&["-n", &node.netns, "link", "show", BRIDGE]).is_err() {
                ip(&["-n", &node.netns, "link", "add", BRIDGE, "type", "bridge"])?;
                ip(&[
                    "-n",
                    &node.netns,
                    "link",
                    "set",
                    BRIDGE,
                    "address",
                    GATEWAY_MAC,
                    "up",
                ])?;
            }
            ip(&[
                "-n",
                &node.netns,
                "link",
                "set",
                &pod.host_veth,
                "master",
                BRIDGE,
            ])?;
            BRIDGE
        }
        false => pod.host_veth.as_str(),
    };
    ip(&[
        "-n",
        &node.netns,
        "route",
        "add",
        &format!("{}/32", pod.ip),
        "dev",
        towards_pod,
    ])?;
    if let Some(v6) = pod.ip6 {
        let v6 = v6.to_string();
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            GATEWAY6,
            "lladdr",
            GATEWAY_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n", ns, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ])?;
        ip(&[
            "-n",
            &node.netns,
            "-6",
            "route",
            "add",
            &format!("{v6}/128"),
            "dev",
            &pod.host_veth,
        ])?;
    }
    Ok(())
}

impl Testbed {
    /// Cleans any leftovers, then builds the topology and writes its manifests.
    pub fn up(spec: &TestbedSpec) -> io::Result<Testbed> {
        clean()?;
        let dir = scratch_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests"))?;
        let mut bed = Testbed {
            nodes: Vec::new(),
            pods: Vec::new(),
            services: spec.services.clone(),
            dual_stack: spec.dual_stack,
            dir,
            children: Mutex::new(Vec::new()),
            torn_down: false,
        };
        // If anything below fails, Drop tears down what exists.
        bed.build(spec)?;
        bed.write_manifests()?;
        Ok(bed)
    }

    fn build(&mut self, spec: &TestbedSpec) -> io::Result<()> {
        ip(&["netns", "add", FABRIC])?;
        ip(&["-n", FABRIC, "link", "set", "lo", "up"])?;
        ip(&["-n", FABRIC, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", FABRIC, "link", "set", "br0", "up"])?;
        for i in 0..spec.nodes {
            let node = Node {
                name: format!("n{}", i + 1),
                netns: format!("{PREFIX}n{}", i + 1),
                ip: Ipv4Addr::new(10, 0, 0, i as u8 + 1),
                ip6: spec
                    .dual_stack
                    .then(|| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1)),
            };
            let ns = node.netns.as_str();
            ip(&["netns", "add", ns])?;
            sysctl(
                ns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            sysctl(ns, ipv6_sysctls(spec.dual_stack, true))?;
            let fab = format!("fab-{}", node.name);
            ip(&[
                "-n", FABRIC, "link", "add", &fab, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", FABRIC, "link", "set", &fab, "master", "br0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ])?;
            if let Some(v6) = node.ip6 {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
            }
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            self.nodes.push(node);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (j, other) in self.nodes.iter().enumerate() {
                if i != j {
                    let cidr = format!("10.1.{}.0/24", j + 1);
                    ip(&[
                        "-n",
                        &node.netns,
                        "route",
                        "add",
                        &cidr,
                        "via",
                        &other.ip.to_string(),
                    ])?;
                    if let Some(via) = other.ip6 {
                        let cidr6 = format!("fd00:1:{}::/64", j + 1);
                        ip(&[
                            "-n",
                            &node.netns,
                            "-6",
                            "route",
                            "add",
                            &cidr6,
                            "via",
                            &via.to_string(),
                        ])?;
                    }
                }
            }
        }
        let cgroup = testbed_cgroup()?;
        std::fs::create_dir_all(&cgroup)?;
        let mut per_node = vec![0u8; spec.nodes];
        for pod_spec in &spec.pods {
            let node = self
                .nodes
                .get(pod_spec.node)
                .ok_or_else(|| {
                    io::Error::other(format!("pod {} on a missing node", pod_spec.name))
                })?
                .clone();
            let idx = per_node[pod_spec.node];
            per_node[pod_spec.node] += 1;
            let pod = Pod {
                spec: pod_spec.clone(),
                netns: format!("{}-{}", node.netns, pod_spec.name),
                ip: Ipv4Addr::new(10, 1, pod_spec.node as u8 + 1, idx + 2),
                ip6: spec.dual_stack.then(|| {
                    Ipv6Addr::new(
                        0xfd00,
                        1,
                        pod_spec.node as u16 + 1,
                        0,
                        0,
                        0,
                        0,
                        u16::from(idx) + 2,
                    )
                }),
                host_veth: format!("vth-{}-{idx}", node.name),
                cgroup: match &pod_spec.uid {
                    Some(uid) => containerd_pod_cgroup(&cgroup, uid).join(CONTAINER_SCOPE),
                    None => cgroup.join(format!("{}-{}", node.name, pod_spec.name)),
                },
            };
            create_pod_network(&pod, &node)?;
            std::fs::create_dir_all(&pod.cgroup)?;
            self.start_sandbox(&pod)?;
            self.pods.push(pod);
        }
        Ok(())
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the testbed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the testbed"))
    }

    /// Kubernetes YAML for everything in the testbed.
    pub fn manifests(&self) -> Vec<(&'static str, String)> {
        let mut namespaces: Vec<&str> = self
            .pods
            .iter()
            .map(|p| p.spec.namespace.as_str())
            .chain(self.services.iter().map(|s| s.namespace.as_str()))
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut ns_yaml = String::new();
        for ns in namespaces {
            let _ = write!(
                ns_yaml,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            );
        }
        let mut pods = String::new();
        for pod in &self.pods {
            let s = &pod.spec;
            let node = &self.nodes[s.node].name;
            let mut annotations = String::new();
            for (k, v) in &s.annotations {
                let _ = write!(annotations, "\n    {k}: {v:?}");
            }
            let mut labels = String::new();
            for (k, v) in &s.labels {
                let _ = write!(labels, "\n    {k}: {v:?}");
            }
            let annotations = if annotations.is_empty() {
                " {}".to_owned()
            } else {
                annotations
            };
            let (uid, qos) = match &s.uid {
                Some(uid) => (format!("\n  uid: {uid}"), "\n  qosClass: BestEffort"),
                None => (String::new(), ""),
            };
            let ip6 = pod
                .ip6
                .map(|v6| format!("  - ip: {v6}\n"))
                .unwrap_or_default();
            let _ = write!(
                pods,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}{uid}\n  labels:\n    app: {}{labels}\n  annotations:{annotations}\nspec:\n  nodeName: {node}\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: meshtest\nstatus:\n  phase: Running{qos}\n  hostIP: {}\n  podIP: {}\n  podIPs:\n  - ip: {}\n{ip6}",
                s.name, s.namespace, s.app, s.service_account, self.nodes[s.node].ip, pod.ip, pod.ip
            );
        }
        let mut services = String::new();
        let mut slices = String::new();
        for svc in &self.services {
            let families = match self.dual_stack {
                true => format!(
                    "  clusterIPs: [\"{}\", \"{}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
                    svc.cluster_ip,
                    svc.cluster_ip6()
                ),
                false => String::new(),
            };
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  clusterIP: {}\n{families}  selector:\n    app: {}\n  ports:\n  - name: http\n    port: {}\n    targetPort: {}\n    protocol: TCP\n",
                svc.name, svc.namespace, svc.cluster_ip, svc.app, svc.port, svc.target_port
            );
            let members = self
                .pods
                .iter()
                .filter(|p| p.spec.app == svc.app && p.spec.namespace == svc.namespace);
            let v4 = members.clone().map(|p| (IpAddr::V4(p.ip), p));
            self.write_slice(&mut slices, svc, "1", "IPv4", v4);
            if self.dual_stack {
                let v6 = members.filter_map(|p| Some((IpAddr::V6(p.ip6?), p)));
                self.write_slice(&mut slices, svc, "v6", "IPv6", v6);
            }
        }
        vec![
            ("namespaces.yaml", ns_yaml),
            ("pods.yaml", pods),
            ("services.yaml", services),
            ("endpointslices.yaml", slices),
        ]
    }

    /// One EndpointSlice of `svc` (named `<svc>-<suffix>`) listing `endpoints`.
    fn write_slice<'a>(
        &self,
        out: &mut String,
        svc: &ServiceSpec,
        suffix: &str,
        family: &str,
        endpoints: impl Iterator<Item = (IpAddr, &'a Pod)>,
    ) {
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-{suffix}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\naddressType: {family}\nports:\n- name: http\n  port: {}\n  protocol: TCP\nendpoints:\n",
            svc.name, svc.namespace, svc.name, svc.target_port
        );
        for (ip, pod) in endpoints {
            let _ = write!(
                out,
                "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {}\n",
                self.nodes[pod.spec.node].name, pod.spec.name
            );
        }
    }

    pub fn write_manifests(&self) -> io::Result<()> {
        for (file, text) in self.manifests() {
            std::fs::write(self.manifests_dir().join(file), text)?;
        }
        Ok(())
    }

    /// Replaces pod `name`'s sandbox as a container runtime does when it restarts one: its
    /// processes are killed, its veth and network namespace deleted, and a new namespace and
    /// veth (same names, same IP) created. The Pod object, and so the manifests, stay as they
    /// were.
    pub fn recreate_pod(&self, name: &str) -> io::Result<()> {
        self.remove_pod_network(name)?;
        self.restore_pod_network(name)
    }

    /// The first half of [`Testbed::recreate_pod`]: the old sandbox is gone, no new one yet.
    pub fn remove_pod_network(&self, name: &str) -> io::Result<()> {
        let pod = self.pod(name);
        let node = &self.nodes[pod.spec.node];
        // A containerd pod's whole slice: its sandbox and its containers.
        let whole = match pod.spec.uid {
            Some(_) => pod.cgroup.parent().unwrap_or(&pod.cgroup),
            None => &pod.cgroup,
        };
        let _ = std::fs::write(whole.join("cgroup.kill"), "1");
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &pod.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        ip(&["-n", &node.netns, "link", "del", &pod.host_veth])?;
        ip(&["netns", "del", &pod.netns])
    }

    /// The second half of [`Testbed::recreate_pod`]: a new sandbox with the same address.
    pub fn restore_pod_network(&self, name: &str) -> io::Result<()> {
        let pod = self.pod(name);
        create_pod_network(pod, &self.nodes[pod.spec.node])?;
        self.start_sandbox(pod)
    }

    /// A containerd pod's sandbox ("pause") process: in the pod's network namespace, in a
    /// scope of its own beside the containers'. Nothing for other pods.
    fn start_sandbox(&self, pod: &Pod) -> io::Result<()> {
        if pod.spec.uid.is_none() {
            return Ok(());
        }
        let scope = pod
            .cgroup
            .parent()
            .ok_or_else(|| io::Error::other("a containerd pod's cgroup has a parent"))?
            .join(SANDBOX_SCOPE);
        std::fs::create_dir_all(&scope)?;
        let mut pause = Command::new("sleep");
        pause.arg("infinity");
        netns::command_in(&mut pause, &pod.netns, Some(&scope))?;
        self.spawn(pause).map(drop)
    }

    /// A command that will run inside pod `name` (its network namespace and cgroup; and the
    /// names [`Testbed::publish_names`] published).
    pub fn pod_command(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> io::Result<Command> {
        let pod = self.pod(name);
        let mut cmd = Command::new(program);
        netns::command_in(&mut cmd, &pod.netns, Some(&pod.cgroup))?;
        let (hosts, resolv) = self.name_files(name);
        if hosts.exists() {
            netns::command_with_files(&mut cmd, &hosts, &resolv)?;
        }
        Ok(cmd)
    }

    /// The `/etc/hosts` and `/etc/resolv.conf` pod `name` sees once names are published.
    fn name_files(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("pods").join(name);
        (dir.join("hosts"), dir.join("resolv.conf"))
    }

    /// Makes Services resolvable by name inside every pod, as cluster DNS answers them:
    /// `name.namespace.svc.cluster.local`, `name.namespace.svc`, `name.namespace`, and `name`
    /// alone in pods of the same namespace. `extra` are Services (namespace, name, cluster IP)
    /// written into the manifests by the test rather than listed in the testbed's spec. DNS
    /// itself points at the pod's own loopback, so a name not published fails at once and no
    /// query leaves the testbed.
    pub fn publish_names(&self, extra: &[(&str, &str, IpAddr)]) -> io::Result<()> {
        let mut services: Vec<(&str, &str, IpAddr)> = self
            .services
            .iter()
            .map(|s| {
                (
                    s.namespace.as_str(),
                    s.name.as_str(),
                    IpAddr::V4(s.cluster_ip),
                )
            })
            .collect();
        services.extend_from_slice(extra);
        for pod in &self.pods {
            let ns = pod.spec.namespace.as_str();
            let mut hosts = format!("127.0.0.1\tlocalhost\n{}\t{}\n", pod.ip, pod.spec.name);
            for (svc_ns, svc, ip) in &services {
                let short = if *svc_ns == ns { *svc } else { "" };
                let _ = writeln!(
                    hosts,
                    "{ip}\t{svc}.{svc_ns}.svc.cluster.local {svc}.{svc_ns}.svc {svc}.{svc_ns} {short}"
                );
            }
            let resolv = format!(
                "nameserver 127.0.0.1\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 attempts:1 timeout:1\n"
            );
            let (hosts_file, resolv_file) = self.name_files(&pod.spec.name);
            if let Some(dir) = hosts_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(hosts_file, hosts)?;
            std::fs::write(resolv_file, resolv)?;
        }
        Ok(())
    }

    /// A command that will run in node `name`'s host network.
    pub fn node_command(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> io::Result<Command> {
        let mut cmd = Command::new(program);
        netns::command_in(&mut cmd, &self.node(name).netns, None)?;
        Ok(cmd)
    }

    /// The cgroup node `name`'s kubelet runs in (created on first use, removed at teardown
    /// with the pods' cgroups): what the agent's `--kubelet-cgroup` names.
    pub fn kubelet_cgroup(&self, name: &str) -> io::Result<PathBuf> {
        let dir = testbed_cgroup()?.join(format!("{name}-kubelet"));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A command that will run as node `name`'s kubelet does: in its host network and in its
    /// kubelet cgroup.
    pub fn kubelet_command(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> io::Result<Command> {
        let cgroup = self.kubelet_cgroup(name)?;
        let mut cmd = Command::new(program);
        netns::command_in(&mut cmd, &self.node(name).netns, Some(&cgroup))?;
        Ok(cmd)
    }

    /// Starts a long-running process; it is killed at teardown.
    pub fn spawn(&self, mut cmd: Command) -> io::Result<u32> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        let pid = child.id();
        self.children
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .push(child);
        Ok(pid)
    }

    /// Tears everything down. Called by `Drop` too.
    /// A BPF file system of the testbed's own (a fresh instance, mounted in the scratch
    /// directory) for agents that pin (`--pin-dir`); unmounted at teardown. Returns its path.
    pub fn bpffs(&self) -> io::Result<PathBuf> {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = bpffs_dir();
        std::fs::create_dir_all(&dir)?;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: plain syscall on valid C strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(dir)
    }

    pub fn down(&mut self) -> io::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Ok(mut children) = self.children.lock() {
            for child in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            children.clear();
        }
        clean()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("testbed teardown: {e}");
        }
    }
}
