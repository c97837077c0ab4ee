//! Desired state from a directory of Kubernetes YAML manifests, re-read when it changes.
//!
//! The whole directory is one snapshot: if any file is invalid, the new snapshot is rejected as
//! a whole, the error (file, object, field) is logged and counted, and the last good snapshot
//! stays in force.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    metrics::Metrics,
    state::{
        manifest::{self, ManifestError, Problem},
        Snapshot,
    },
};

/// How often the directory is checked for changes.
const POLL: Duration = Duration::from_millis(250);

pub struct ManifestDir {
    path: PathBuf,
    /// Files larger than this are refused (parsing memory grows with the file).
    max_file_bytes: u64,
    /// The version of the last snapshot published.
    version: u64,
    /// The version of the directory the last load saw (taken before reading it, so a change
    /// made while reading is noticed on the next poll).
    seen: Fingerprint,
}

/// What identifies one version of the directory without reading every file.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl ManifestDir {
    pub fn new(path: impl Into<PathBuf>, max_file_bytes: u64) -> Self {
        Self {
            path: path.into(),
            max_file_bytes,
            version: 0,
            seen: Fingerprint::new(),
        }
    }

    fn files(&self) -> Result<Vec<PathBuf>, ManifestError> {
        let read_err = |e| ManifestError {
            file: self.path.display().to_string(),
            object: "directory".to_owned(),
            problem: Problem::Read(e),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            // Editors and `kubectl`-style tools write through dotfiles; skip them.
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if yaml && !hidden && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    fn fingerprint(&self) -> Fingerprint {
        let files = self.files().unwrap_or_default();
        files
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let len = meta.as_ref().map_or(0, |m| m.len());
                let modified = meta.and_then(|m| m.modified().ok());
                (p, len, modified)
            })
            .collect()
    }

    /// Reads and validates every manifest of the directory.
    pub fn load(&self) -> Result<Snapshot, ManifestError> {
        let mut objects = Vec::new();
        for file in self.files()? {
            let text = self.read(&file)?;
            objects.extend(manifest::parse_file(&file, &text)?);
        }
        Snapshot::build(objects)
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

    /// Loads and validates the directory into the next snapshot, timing the apply.
    fn apply(&mut self, metrics: &Metrics) -> Result<Snapshot, ManifestError> {
        let started = Instant::now();
        let result = self.load();
        metrics.manifest_reload(result.is_ok());
        let mut snapshot = result?;
        metrics.state_applied(started.elapsed());
        self.version += 1;
        snapshot.version = self.version;
        snapshot.applied_at = Some(SystemTime::now());
        Ok(snapshot)
    }

    /// Loads the directory once; a failure here stops start-up.
    pub fn initial(&mut self, metrics: &Metrics) -> Result<Arc<Snapshot>, ManifestError> {
        self.seen = self.fingerprint();
        Ok(Arc::new(self.apply(metrics)?))
    }

    /// Polls the directory and publishes each new valid snapshot until `tx` has no receivers.
    /// Runs on a thread of its own (see [`ManifestDir::spawn_watch`]): reading and building a
    /// large state takes time the proxy's runtime must not lose.
    fn watch(mut self, tx: watch::Sender<Arc<Snapshot>>, metrics: Arc<Metrics>) {
        loop {
            std::thread::sleep(POLL);
            if tx.is_closed() {
                return;
            }
            let now = self.fingerprint();
            if now == self.seen {
                continue;
            }
            self.seen = now;
            match self.apply(&metrics) {
                Ok(snapshot) => {
                    info!(dir = %self.path.display(), version = snapshot.version, "manifests changed; new state in force");
                    tx.send_replace(Arc::new(snapshot));
                }
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
}
