//! Desired state from a directory of Kubernetes YAML manifests, re-read when it changes.
//!
//! The whole directory is one snapshot: if any file is invalid, the new snapshot is rejected as
//! a whole, the error (file, object, field) is logged and counted, and the last good snapshot
//! stays in force.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
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
    /// The version of the directory the last load saw (taken before reading it, so a change
    /// made while reading is noticed on the next poll).
    seen: Fingerprint,
}

/// What identifies one version of the directory without reading every file.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl ManifestDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
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
            let text = std::fs::read_to_string(&file).map_err(|e| ManifestError {
                file: file.display().to_string(),
                object: "file".to_owned(),
                problem: Problem::Read(e),
            })?;
            objects.extend(manifest::parse_file(&file, &text)?);
        }
        Snapshot::build(objects)
    }

    /// Loads the directory once; a failure here stops start-up.
    pub fn initial(&mut self, metrics: &Metrics) -> Result<Arc<Snapshot>, ManifestError> {
        self.seen = self.fingerprint();
        let result = self.load();
        metrics.manifest_reload(result.is_ok());
        Ok(Arc::new(result?))
    }

    /// Polls the directory and publishes each new valid snapshot until `tx` has no receivers.
    pub async fn watch(mut self, tx: watch::Sender<Arc<Snapshot>>, metrics: Arc<Metrics>) {
        let mut interval = tokio::time::interval(POLL);
        loop {
            interval.tick().await;
            if tx.is_closed() {
                return;
            }
            let now = self.fingerprint();
            if now == self.seen {
                continue;
            }
            self.seen = now;
            match self.load() {
                Ok(snapshot) => {
                    info!(dir = %self.path.display(), "manifests changed; new state in force");
                    metrics.manifest_reload(true);
                    tx.send_replace(Arc::new(snapshot));
                }
                Err(e) => {
                    error!("rejected manifest change, keeping the last good state: {e}");
                    metrics.manifest_reload(false);
                }
            }
        }
    }
}
