//! The audit trail: every control change (who, old and new weights, generation), health
//! transitions, ejections and fail-open episodes, as [`AuditRecord`]s.
//!
//! Records go to an in-memory ring (for `proxyctl events`), to followers (`--follow`), and
//! through a bounded channel to a JSON-lines file next to the state file (written by the
//! control runtime, so recording from the request path never does file I/O; when the channel
//! is full the record is counted as dropped instead of stalling). The file is rotated to
//! `.1` past 10 MiB and its tail is loaded at start, so history survives restarts.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;
use switchyard_control::AuditRecord;
use tokio::sync::{broadcast, mpsc};

/// Records kept in memory.
const RING: usize = 1000;
/// Size at which the file is rotated.
const ROTATE_BYTES: u64 = 10 * 1024 * 1024;

/// A record with only `kind`, `actor` and `message` set.
pub(crate) fn record(kind: &str, actor: &str, message: String) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: String::new(),
        kind: kind.to_string(),
        upstream: None,
        pool: None,
        instance: None,
        actor: actor.to_string(),
        uid: None,
        pid: None,
        generation: None,
        old_weights: None,
        new_weights: None,
        forced: false,
        message,
    }
}

#[derive(Debug)]
pub(crate) struct EventLog {
    seq: AtomicU64,
    ring: Mutex<VecDeque<AuditRecord>>,
    followers: broadcast::Sender<AuditRecord>,
    file: Option<mpsc::Sender<AuditRecord>>,
    /// Records not written to the file because the writer fell behind.
    dropped: prometheus::IntCounter,
}

/// Writes records to the file; run it on the control runtime.
#[derive(Debug)]
pub(crate) struct FileWriter {
    path: PathBuf,
    rx: mpsc::Receiver<AuditRecord>,
}

impl EventLog {
    /// A log persisted to `path` (history loaded from it), or memory-only.
    pub(crate) fn new(
        path: Option<&Path>,
        dropped: prometheus::IntCounter,
    ) -> (EventLog, Option<FileWriter>) {
        let history = path.map(load_tail).unwrap_or_default();
        let next = history.back().map(|r| r.seq + 1).unwrap_or(1);
        let (followers, _) = broadcast::channel(256);
        let (file, writer) = match path {
            Some(p) => {
                let (tx, rx) = mpsc::channel(1024);
                (
                    Some(tx),
                    Some(FileWriter {
                        path: p.to_path_buf(),
                        rx,
                    }),
                )
            }
            None => (None, None),
        };
        (
            EventLog {
                seq: AtomicU64::new(next),
                ring: Mutex::new(history),
                followers,
                file,
                dropped,
            },
            writer,
        )
    }

    /// Stamp (sequence number, time) and publish a record.
    pub(crate) fn record(&self, mut r: AuditRecord) {
        r.seq = self.seq.fetch_add(1, Ordering::AcqRel);
        r.time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(r.clone());
        }
        if let Some(tx) = &self.file {
            if tx.try_send(r.clone()).is_err() {
                self.dropped.inc();
            }
        }
        let _ = self.followers.send(r);
    }

    /// The latest `limit` records, oldest first.
    pub(crate) fn recent(&self, limit: usize) -> Vec<AuditRecord> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let skip = ring.len().saturating_sub(limit);
        ring.iter().skip(skip).cloned().collect()
    }

    /// New records from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<AuditRecord> {
        self.followers.subscribe()
    }
}

impl FileWriter {
    /// Append records until the log is dropped.
    pub(crate) async fn run(mut self) {
        while let Some(r) = self.rx.recv().await {
            let mut batch = vec![r];
            while let Ok(more) = self.rx.try_recv() {
                batch.push(more);
            }
            let path = self.path.clone();
            // File I/O off the async threads.
            let res = tokio::task::spawn_blocking(move || append(&path, &batch)).await;
            if let Ok(Err(e)) = res {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the events log");
            }
        }
    }
}

fn append(path: &Path, batch: &[AuditRecord]) -> std::io::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > ROTATE_BYTES {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, PathBuf::from(old))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::new();
    for r in batch {
        serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)
}

/// The last [`RING`] parseable records of the file (unparseable lines are skipped).
fn load_tail(path: &Path) -> VecDeque<AuditRecord> {
    let Ok(f) = std::fs::File::open(path) else {
        return VecDeque::new();
    };
    let mut out = VecDeque::new();
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
            if out.len() == RING {
                out.pop_front();
            }
            out.push_back(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_numbered_kept_persisted_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let counter = || prometheus::IntCounter::new("d", "d").unwrap();
        let (log, writer) = EventLog::new(Some(&path), counter());
        let writer = tokio::spawn(writer.unwrap().run());
        let mut follow = log.subscribe();
        for i in 0..3 {
            log.record(record("switch", "library", format!("change {i}")));
        }
        assert_eq!(follow.recv().await.unwrap().message, "change 0");
        let recent = log.recent(2);
        assert_eq!(recent.len(), 2);
        assert_eq!((recent[0].seq, recent[1].seq), (2, 3));
        drop(log);
        writer.await.unwrap();
        let (again, _) = EventLog::new(Some(&path), counter());
        let all = again.recent(10);
        assert_eq!(all.len(), 3);
        again.record(record("reload", "signal", "x".into()));
        assert_eq!(
            again.recent(1)[0].seq,
            4,
            "numbering continues after a restart"
        );
    }
}
