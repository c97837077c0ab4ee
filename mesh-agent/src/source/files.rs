//! Desired state from a directory of Kubernetes YAML manifests, applied file by file as it
//! changes.
//!
//! - **Notification.** inotify on the directory says which files changed; changes are gathered
//!   into one batch until none came for [`QUIET`] (or [`MAX_DELAY`] after the first), so a
//!   storm of writes makes a few snapshots, not one per file. Every [`RESYNC`] (and whenever
//!   inotify lost events or is unavailable) each file's size, mtime and inode are compared with
//!   what was last read, as a safety net.
//! - **Only changed files are read**, and a file whose bytes did not change is not parsed. The
//!   objects of a changed file become per-object changes for the [`Store`], which rebuilds only
//!   what they feed.
//! - **All or nothing.** The state in force is always that of a directory where every file was
//!   valid: if a file of a batch is invalid, the batch is rejected whole (logged with file,
//!   object and field, and counted), and its files are tried again with the next change.
//! - **Complete files only.** Write a manifest elsewhere (a dotfile in the same directory, say)
//!   and `rename` it into place, as `kubectl cp`, editors and ConfigMap volumes do: the rename
//!   is atomic, so the agent never sees half a file. A file written in place is read when its
//!   writer closes it (`IN_CLOSE_WRITE`), not while it is still being written; a writer that
//!   keeps a file open without writing for [`WRITER_GRACE`] is assumed done.
//! - Dotfiles and files not ending in `.yaml`/`.yml` are ignored; a change to `..data` (how a
//!   ConfigMap volume swaps its files) re-checks every file.
//!
//! All of this runs on a thread of its own, a background one ([`background`]): the proxy's
//! runtime never waits for it, and it never keeps a woken proxy worker or pod off the CPU for
//! more than [`background::SLICE`].

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::Read as _,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    background,
    metrics::Metrics,
    state::{
        manifest::{self, ManifestError, ObjectKey, Problem},
        store::{hash_of, Change, Parsed, Store},
        LastApply, Snapshot,
    },
};

/// A batch closes once no change came for this long...
pub const QUIET: Duration = Duration::from_millis(20);
/// ...or this long after its first change, whichever is first.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often every file is re-checked even without notifications.
pub const RESYNC: Duration = Duration::from_secs(60);
/// How often, while inotify is unavailable (the directory is missing, or out of watches).
const UNWATCHED_RESYNC: Duration = Duration::from_secs(1);
/// Freed memory is handed back to the system once no change came for this long.
const TRIM_WHEN_QUIET: Duration = Duration::from_millis(500);
/// A file modified and not closed for this long is read anyway.
pub const WRITER_GRACE: Duration = Duration::from_secs(10);

pub struct ManifestDir {
    path: PathBuf,
    /// Files larger than this are refused (parsing memory grows with the file).
    max_file_bytes: u64,
    /// The version of the last snapshot published.
    version: u64,
    store: Store,
    /// The files in force (what they define is in the store, by source).
    files: HashMap<PathBuf, InForce>,
    /// How each file looked when last read, accepted or not.
    attempted: HashMap<PathBuf, Fingerprint>,
    /// Files whose content on disk may differ from what is in force.
    dirty: BTreeSet<PathBuf>,
}

/// One file as read for a transaction.
struct ReadFile {
    seen: Option<Fingerprint>,
    bytes: usize,
    hash: u64,
    /// `None`: the same bytes as the version in force.
    objects: Option<Vec<Parsed>>,
}

/// A file in force.
struct InForce {
    /// Of the file's bytes: an identical rewrite is not parsed again.
    hash: u64,
}

/// What identifies one version of a file without reading it.
type Fingerprint = (u64, Option<SystemTime>, u64);

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok(), meta.ino()))
}

/// Whether a directory entry is a manifest (its name, that is; it may be gone by now).
fn is_manifest_name(path: &Path) -> bool {
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    // Editors and `kubectl`-style tools write through dotfiles; skip them.
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    yaml && !hidden
}

impl ManifestDir {
    /// Follows `path`; with `opt_in`, only pods that opt in are enrolled (else all but those
    /// that opt out).
    pub fn new(path: impl Into<PathBuf>, max_file_bytes: u64, opt_in: bool) -> Self {
        Self {
            path: path.into(),
            max_file_bytes,
            version: 0,
            store: if opt_in {
                Store::opt_in()
            } else {
                Store::default()
            },
            files: HashMap::new(),
            attempted: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Files the pods of `node` (the agent's) for [`Snapshot::local_pods`], and no other
    /// node's.
    pub fn for_node(mut self, node: &str) -> Self {
        self.store = std::mem::take(&mut self.store).for_node(node);
        self
    }

    fn listed(&self) -> Result<Vec<PathBuf>, ManifestError> {
        let read_err = |e| ManifestError {
            file: self.path.display().to_string(),
            object: "directory".to_owned(),
            problem: Problem::Read(e),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            if is_manifest_name(&path) && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Marks every file that changed since it was last read (or appeared, or went) as dirty;
    /// returns whether any did.
    fn resync(&mut self) -> Result<bool, ManifestError> {
        let listed = self.listed()?;
        let before = self.dirty.len();
        let present: HashSet<&PathBuf> = listed.iter().collect();
        for path in &listed {
            if self.attempted.get(path) != fingerprint(path).as_ref() {
                self.dirty.insert(path.clone());
            }
        }
        let gone = self
            .files
            .keys()
            .chain(self.attempted.keys())
            .filter(|p| !present.contains(p));
        self.dirty.extend(gone.cloned());
        Ok(self.dirty.len() > before)
    }

    /// A file's text, refused if it is over the size limit (checked on what is read, so a file
    /// that grows meanwhile is caught too).
    fn read(&self, file: &Path) -> Result<String, ManifestError> {
        let fail = |problem| ManifestError {
            file: file.display().to_string(),
            object: "file".to_owned(),
            problem,
        };
        let limit = self.max_file_bytes;
        let size = std::fs::metadata(file)
            .map_err(|e| fail(Problem::Read(e)))?
            .len();
        if size > limit {
            return Err(fail(Problem::TooLarge { size, limit }));
        }
        let mut text = String::with_capacity(usize::try_from(size).unwrap_or(0));
        std::fs::File::open(file)
            .and_then(|f| f.take(limit.saturating_add(1)).read_to_string(&mut text))
            .map_err(|e| fail(Problem::Read(e)))?;
        let read = text.len() as u64;
        if read > limit {
            return Err(fail(Problem::TooLarge { size: read, limit }));
        }
        Ok(text)
    }

    /// Reads the dirty files (except those still being written) and applies them as one
    /// transaction. `Ok(None)`: nothing changed.
    fn apply(
        &mut self,
        writing: &HashSet<PathBuf>,
        metrics: &Metrics,
    ) -> Result<Option<Snapshot>, ManifestError> {
        let started = Instant::now();
        let result = self.try_apply(writing);
        match &result {
            Ok(None) => {}
            Ok(Some(_)) => {
                metrics.manifest_reload(true);
                metrics.state_applied(started.elapsed());
            }
            Err(_) => metrics.manifest_reload(false),
        }
        result
    }

    fn try_apply(&mut self, writing: &HashSet<PathBuf>) -> Result<Option<Snapshot>, ManifestError> {
        let started = Instant::now();
        let mut read_bytes = 0;
        let paths: Vec<PathBuf> = self
            .dirty
            .iter()
            .filter(|p| !writing.contains(*p))
            .cloned()
            .collect();
        // Reading and parsing is the bulk of a large apply: spread it over the cores.
        let present: Vec<bool> = paths
            .iter()
            .map(|p| is_manifest_name(p) && p.is_file())
            .collect();
        let read: Vec<&PathBuf> = paths
            .iter()
            .zip(&present)
            .filter_map(|(p, here)| here.then_some(p))
            .collect();
        let mut parsed = self.read_all(&read).into_iter();
        let mut changes = Vec::new();
        let mut now_in_force: Vec<(&PathBuf, Option<InForce>)> = Vec::new();
        for (path, here) in paths.iter().zip(present) {
            let old = self.files.get(path);
            if !here {
                self.attempted.remove(path);
                if old.is_some() {
                    let source = path.display().to_string();
                    let keys = self.store.keys_of(&source).iter().cloned();
                    changes.extend(keys.map(Change::Remove));
                    now_in_force.push((path, None));
                }
                continue;
            }
            let Some(ReadFile {
                seen,
                bytes,
                hash,
                objects,
            }) = parsed.next().transpose()?
            else {
                continue;
            };
            if let Some(seen) = seen {
                self.attempted.insert(path.clone(), seen);
            }
            read_bytes += bytes;
            let Some(objects) = objects else { continue };
            let source: Arc<str> = Arc::from(path.display().to_string());
            // What the file no longer defines goes.
            let kept: HashSet<&ObjectKey> = objects.iter().map(Parsed::key).collect();
            let gone = self.store.keys_of(&source).iter();
            changes.extend(
                gone.filter(|k| !kept.contains(k))
                    .cloned()
                    .map(Change::Remove),
            );
            changes.extend(objects.into_iter().map(|object| Change::Put {
                source: source.clone(),
                object,
            }));
            now_in_force.push((path, Some(InForce { hash })));
        }
        if now_in_force.is_empty() {
            self.dirty.retain(|p| writing.contains(p));
            return Ok(None);
        }
        let applied = self.store.apply(changes)?;
        let files = now_in_force.len();
        for (path, state) in now_in_force {
            match state {
                Some(state) => self.files.insert(path.clone(), state),
                None => self.files.remove(path),
            };
        }
        self.dirty.retain(|p| writing.contains(p));
        self.version += 1;
        let mut snapshot = self.store.snapshot();
        snapshot.version = self.version;
        snapshot.applied_at = Some(SystemTime::now());
        snapshot.last_apply = Some(LastApply {
            files,
            bytes_read: read_bytes,
            applied,
            duration_us: started.elapsed().as_micros(),
        });
        Ok(Some(snapshot))
    }

    /// Reads, hashes and (when its bytes changed) parses each file, in order; on as many
    /// threads as there are cores when there are many files.
    fn read_all(&self, paths: &[&PathBuf]) -> Vec<Result<ReadFile, ManifestError>> {
        let one = |path: &PathBuf| -> Result<ReadFile, ManifestError> {
            let seen = fingerprint(path);
            let text = self.read(path)?;
            let hash = hash_of(text.as_str());
            let objects = match self.files.get(path) {
                Some(old) if old.hash == hash => None,
                _ => Some(
                    manifest::parse_file(path, &text)?
                        .iter()
                        .map(Parsed::new)
                        .collect(),
                ),
            };
            Ok(ReadFile {
                seen,
                bytes: text.len(),
                hash,
                objects,
            })
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let background = background::is_background();
        if paths.len() < 64 || threads < 2 {
            return paths.iter().map(|p| one(p)).collect();
        }
        let mut out: Vec<Option<Result<ReadFile, ManifestError>>> = Vec::new();
        out.resize_with(paths.len(), || None);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let one = &one;
                    scope.spawn(move || {
                        if background {
                            background::enter();
                        }
                        let mine = paths.iter().enumerate().skip(t).step_by(threads);
                        mine.map(|(i, p)| (i, one(p))).collect::<Vec<_>>()
                    })
                })
                .collect();
            for worker in workers {
                // A worker that panicked leaves its files unread; they are reported below.
                for (i, result) in worker.join().unwrap_or_default() {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = Some(result);
                    }
                }
            }
        });
        out.into_iter()
            .zip(paths)
            .map(|(r, p)| {
                r.unwrap_or_else(|| {
                    Err(ManifestError {
                        file: p.display().to_string(),
                        object: "file".to_owned(),
                        problem: Problem::Read(std::io::Error::other("the reading thread failed")),
                    })
                })
            })
            .collect()
    }

    /// Loads the directory once; a failure here stops start-up.
    pub fn initial(&mut self, metrics: &Metrics) -> Result<Arc<Snapshot>, ManifestError> {
        self.resync()?;
        let snapshot = self.apply(&HashSet::new(), metrics);
        background::release_freed_memory();
        let snapshot = snapshot?;
        // An empty directory is a valid (empty) state.
        let snapshot = snapshot.unwrap_or_else(|| {
            self.version += 1;
            let mut empty = self.store.snapshot();
            empty.version = self.version;
            empty.applied_at = Some(SystemTime::now());
            empty
        });
        Ok(Arc::new(snapshot))
    }

    /// Follows the directory and publishes each new valid snapshot until `tx` has no
    /// receivers.
    fn watch(mut self, tx: watch::Sender<Arc<Snapshot>>, metrics: Arc<Metrics>) {
        background::enter();
        let mut notifier = Notifier::new(&self.path);
        // Files modified but not closed yet, since when.
        let mut writing: HashMap<PathBuf, Instant> = HashMap::new();
        // The first and the latest change of the batch being gathered.
        let mut batch: Option<(Instant, Instant)> = None;
        let mut next_resync = Instant::now() + notifier.resync_interval();
        // When to hand freed memory back (see below).
        let mut trim_due: Option<Instant> = None;
        loop {
            if tx.is_closed() {
                return;
            }
            let now = Instant::now();
            let mut deadline = next_resync.min(now + Duration::from_secs(1));
            if let Some((first, last)) = batch {
                deadline = deadline.min((last + QUIET).min(first + MAX_DELAY));
            }
            for since in writing.values() {
                deadline = deadline.min(*since + WRITER_GRACE);
            }
            if let Some(due) = trim_due {
                deadline = deadline.min(due);
            }
            let seen = notifier.wait(deadline.saturating_duration_since(now));
            let now = Instant::now();
            let mut touched = false;
            for event in seen {
                match event {
                    Seen::Complete(path) => {
                        writing.remove(&path);
                        self.dirty.insert(path);
                        touched = true;
                    }
                    Seen::Writing(path) => {
                        writing.insert(path, now);
                    }
                    Seen::Everything => next_resync = now,
                }
            }
            writing.retain(|path, since| {
                let done = now >= *since + WRITER_GRACE;
                if done {
                    self.dirty.insert(path.clone());
                    touched = true;
                }
                !done
            });
            if now >= next_resync {
                notifier.rewatch();
                match self.resync() {
                    Ok(changed) => touched |= changed,
                    Err(e) => warn!("re-checking the manifest directory: {e}"),
                }
                next_resync = now + notifier.resync_interval();
            }
            if touched {
                batch = Some((batch.map_or(now, |b| b.0), now));
            }
            // Trimming walks the heap under the allocator's lock, which the proxy's workers
            // share: done once things are quiet, not after each apply of a storm.
            if batch.is_none() && trim_due.is_some_and(|due| now >= due) {
                background::release_freed_memory();
                trim_due = None;
            }
            let Some((first, last)) = batch else { continue };
            if now < last + QUIET && now < first + MAX_DELAY {
                continue;
            }
            batch = None;
            let busy: HashSet<PathBuf> = writing.keys().cloned().collect();
            let result = self.apply(&busy, &metrics);
            trim_due = Some(Instant::now() + TRIM_WHEN_QUIET);
            match result {
                Ok(Some(snapshot)) => {
                    info!(
                        dir = %self.path.display(), version = snapshot.version,
                        changes = ?snapshot.last_apply, "manifests changed; new state in force"
                    );
                    tx.send_replace(Arc::new(snapshot));
                }
                Ok(None) => {}
                Err(e) => error!("rejected manifest change, keeping the last good state: {e}"),
            }
        }
    }

    /// Starts [`ManifestDir::watch`] on its own thread.
    pub fn spawn_watch(
        self,
        tx: watch::Sender<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("desired-state".to_owned())
            .spawn(move || self.watch(tx, metrics))
    }

    /// The store behind the snapshots.
    #[cfg(test)]
    fn store(&self) -> &Store {
        &self.store
    }

    /// Marks `path` changed and applies what is dirty, as the watcher does after a batch.
    #[cfg(test)]
    fn apply_now(
        &mut self,
        path: &Path,
        metrics: &Metrics,
    ) -> Result<Option<Snapshot>, ManifestError> {
        self.dirty.insert(path.to_owned());
        self.apply(&HashSet::new(), metrics)
    }
}

/// What the notifier saw.
enum Seen {
    /// A file was closed after writing, renamed in or out, or removed.
    Complete(PathBuf),
    /// A file is being written.
    Writing(PathBuf),
    /// Events were lost, the directory itself went, or a ConfigMap-style swap: re-check all.
    Everything,
}

/// inotify on the manifest directory, when it can be had.
struct Notifier {
    dir: PathBuf,
    inotify: Option<Inotify>,
    buffer: Vec<u8>,
    /// Whether the last failure to watch was logged already.
    warned: bool,
}

impl Notifier {
    fn new(dir: &Path) -> Self {
        let mut n = Self {
            dir: dir.to_owned(),
            inotify: None,
            buffer: vec![0; 64 * 1024],
            warned: false,
        };
        n.rewatch();
        n
    }

    fn resync_interval(&self) -> Duration {
        match self.inotify {
            Some(_) => RESYNC,
            None => UNWATCHED_RESYNC,
        }
    }

    /// Watches the directory if it is not watched yet.
    fn rewatch(&mut self) {
        if self.inotify.is_some() {
            return;
        }
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CREATE
            | WatchMask::MODIFY
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        let watched = Inotify::init().and_then(|inotify| {
            inotify.watches().add(&self.dir, mask)?;
            Ok(inotify)
        });
        match watched {
            Ok(inotify) => {
                if self.warned {
                    info!(dir = %self.dir.display(), "watching the manifest directory again");
                }
                self.inotify = Some(inotify);
                self.warned = false;
            }
            Err(e) if !self.warned => {
                warn!(
                    dir = %self.dir.display(),
                    "cannot watch the manifest directory ({e}); checking it every {UNWATCHED_RESYNC:?}"
                );
                self.warned = true;
            }
            Err(_) => {}
        }
    }

    /// Waits up to `timeout` for events.
    fn wait(&mut self, timeout: Duration) -> Vec<Seen> {
        let Some(inotify) = self.inotify.as_mut() else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        let mut pollfd = libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pollfd, 1, ms) } <= 0 {
            return Vec::new();
        }
        let mut seen = Vec::new();
        let mut lost = false;
        loop {
            let events = match inotify.read_events(&mut self.buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("reading manifest directory events: {e}");
                    lost = true;
                    break;
                }
            };
            for event in events {
                let mask = event.mask;
                if mask.contains(EventMask::Q_OVERFLOW) {
                    seen.push(Seen::Everything);
                    continue;
                }
                if mask
                    .intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    lost = true;
                    continue;
                }
                let Some(name) = event.name else { continue };
                let path = self.dir.join(name);
                if name.to_string_lossy().starts_with("..") {
                    // A ConfigMap volume swapping `..data`: every file may have changed.
                    if mask.intersects(EventMask::MOVED_TO | EventMask::CREATE) {
                        seen.push(Seen::Everything);
                    }
                    continue;
                }
                if !is_manifest_name(&path) {
                    continue;
                }
                let done = EventMask::CLOSE_WRITE
                    | EventMask::MOVED_TO
                    | EventMask::MOVED_FROM
                    | EventMask::DELETE;
                let symlink =
                    || std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                if mask.intersects(done) || (mask.contains(EventMask::CREATE) && symlink()) {
                    seen.push(Seen::Complete(path));
                } else {
                    seen.push(Seen::Writing(path));
                }
            }
        }
        if lost {
            // Watched again (if the directory is back) at the resync this asks for.
            self.inotify = None;
            seen.push(Seen::Everything);
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::state::{store::Applied, Destination};

    /// A directory of its own under the system's temporary directory, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("mesh-agent-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Writes aside and renames into place, as the module asks writers to.
        fn put(&self, name: &str, text: &str) -> PathBuf {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            let path = self.0.join(name);
            std::fs::rename(&tmp, &path).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(crate::metrics::http::Dialect::Both).unwrap()
    }

    /// Service `svc-{i}` at 10.96.x.y:80 with an EndpointSlice of five endpoints.
    fn service(i: u32, first_endpoint: u32) -> String {
        let endpoints: String = (first_endpoint..first_endpoint + 5)
            .map(|e| {
                format!(
                    "  - addresses: [10.{}.{}.{}]\n",
                    100 + e / 65536,
                    (e / 256) % 256,
                    e % 256
                )
            })
            .collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: big}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abc\n  namespace: big\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}",
            i / 250,
            i % 250 + 1
        )
    }

    fn target(s: &Snapshot, i: u32) -> Arc<crate::state::ServiceTarget> {
        let addr = format!("10.96.{}.{}:80", i / 250, i % 250 + 1);
        match s.resolve(addr.parse().unwrap()) {
            Destination::Service(t) => t,
            _ => panic!("svc-{i} is not in the snapshot"),
        }
    }

    #[test]
    fn one_changed_object_among_10k_services_rebuilds_one_service() {
        let dir = TempDir::new("10k");
        // 1,000 files of ten Services each, every Service with five endpoints.
        for f in 0..1000u32 {
            let text: String = (f * 10..f * 10 + 10).map(|i| service(i, i * 5)).collect();
            dir.put(&format!("svc-{f:04}.yaml"), &text);
        }
        let metrics = metrics();
        let mut state = ManifestDir::new(&dir.0, 8 << 20, false);
        let before = state.initial(&metrics).unwrap();
        assert_eq!(before.summary().service_ports, 10_000);
        assert_eq!(before.summary().endpoints, 50_000);

        // svc-4242's slice gets new endpoints; its nine neighbours in the file stay as they were.
        let text: String = (4240..4250)
            .map(|i| service(i, if i == 4242 { 60_000 } else { i * 5 }))
            .collect();
        let path = dir.put("svc-0424.yaml", &text);
        let after = state.apply_now(&path, &metrics).unwrap().unwrap();
        let last = after.last_apply.clone().unwrap();
        assert_eq!(
            (last.files, last.applied),
            (
                1,
                Applied {
                    objects: 1,
                    pods_rebuilt: 0,
                    services_rebuilt: 1
                }
            )
        );
        let changed = target(&after, 4242);
        assert_eq!(changed.endpoints.len(), 5);
        assert_eq!(changed.endpoints[0].to_string(), "10.100.234.96:8080");
        assert!(!Arc::ptr_eq(&changed, &target(&before, 4242)));
        // Every other Service port is the very same object: endpoints, balancer state and all.
        let untouched = (0..10_000)
            .filter(|&i| i != 4242)
            .filter(|&i| Arc::ptr_eq(&target(&before, i), &target(&after, i)))
            .count();
        assert_eq!(untouched, 9_999);
        assert_eq!(after.summary().endpoints, 50_000);

        // Rewriting a file as it was reads it, and changes nothing.
        let again = dir.put("svc-0424.yaml", &text);
        assert!(state.apply_now(&again, &metrics).unwrap().is_none());
    }

    #[test]
    fn objects_and_addresses_move_between_files_in_one_batch() {
        let dir = TempDir::new("move");
        let pod = |name: &str, ip: &str| {
            format!("---\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: n1}}\nstatus: {{phase: Running, podIP: {ip}}}\n")
        };
        dir.put(
            "a.yaml",
            &(pod("old", "10.1.1.5") + &pod("stays", "10.1.1.6")),
        );
        let metrics = metrics();
        let mut state = ManifestDir::new(&dir.0, 1 << 20, false);
        state.initial(&metrics).unwrap();

        // A new pod in b.yaml takes the address `old` gives back in a.yaml, and `stays` moves
        // from a.yaml to b.yaml: fine together, whatever order the files are read in.
        dir.put("a.yaml", "");
        let b = dir.put(
            "b.yaml",
            &(pod("new", "10.1.1.5") + &pod("stays", "10.1.1.6")),
        );
        state.dirty.insert(dir.0.join("a.yaml"));
        let s = state.apply_now(&b, &metrics).unwrap().unwrap();
        let ip = |s: &Snapshot, ip: &str| s.pod_by_ip(ip.parse().unwrap()).map(|w| w.name.clone());
        assert_eq!(ip(&s, "10.1.1.5").as_deref(), Some("new"));
        assert_eq!(ip(&s, "10.1.1.6").as_deref(), Some("stays"));
        assert_eq!(s.summary().pods, 2);

        // Alone, the same claim is refused, and the state stays.
        let c = dir.put("c.yaml", &pod("thief", "10.1.1.5"));
        let err = state.apply_now(&c, &metrics).unwrap_err().to_string();
        assert!(
            err.contains("Pod shop/thief: pod IP 10.1.1.5 is also claimed by Pod shop/new"),
            "{err}"
        );
        assert_eq!(state.store().snapshot().summary().pods, 2);
    }

    #[test]
    fn a_file_being_written_is_read_when_its_writer_closes_it() {
        use std::io::Write as _;
        let dir = TempDir::new("partial");
        dir.put("a.yaml", &service(1, 0));
        let metrics = Arc::new(metrics());
        let mut state = ManifestDir::new(&dir.0, 1 << 20, false);
        let (tx, mut rx) = watch::channel(state.initial(&metrics).unwrap());
        state.spawn_watch(tx, metrics.clone()).unwrap();

        // Written in place, in two halves, the first cut mid-document.
        let text = service(2, 100);
        let (first, rest) = text.split_at(text.len() / 2);
        let mut file = std::fs::File::create(dir.0.join("b.yaml")).unwrap();
        file.write_all(first.as_bytes()).unwrap();
        file.flush().unwrap();
        std::thread::sleep(QUIET * 10 + MAX_DELAY);
        assert_eq!(rx.borrow().version, 1, "half a file was applied");
        file.write_all(rest.as_bytes()).unwrap();
        drop(file);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), rx.changed()).await })
            .unwrap()
            .unwrap();
        let s = rx.borrow().clone();
        assert_eq!((s.version, s.summary().service_ports), (2, 2));
        let rejected = metrics.encode();
        assert!(
            !rejected.contains("mesh_manifest_reloads_total{result=\"error\"}"),
            "{rejected}"
        );
    }
}
