//! Durable agent state under DATA_DIR/state: the task journal (a task ID is never run twice,
//! and a task interrupted by a crash is reported) and the outbox (every report is written to
//! disk before it is sent, and retried until the control plane answers 2xx, in order).

use crate::cp::client::{Backoff, Client};
use crate::cp::wire::{Completion, Task};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Task, deployment and project IDs become file names: allow only what a UUID (or a test's ID) contains.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Writes a file so that a crash leaves either the old or the new content, never half.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub deployment_id: String,
    pub state: String,
    pub at: u64,
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(data_dir: &Path) -> io::Result<Journal> {
        let dir = data_dir.join("state/tasks");
        fs::create_dir_all(&dir)?;
        Ok(Journal { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Records that the task starts. False when this task ID was seen before.
    pub fn claim(&self, task: &Task) -> io::Result<bool> {
        let entry = JournalEntry {
            id: task.id.clone(),
            kind: task.kind.clone(),
            deployment_id: task.deployment_id.clone(),
            state: "running".into(),
            at: now_secs(),
        };
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path(&task.id))
        {
            Ok(mut f) => {
                f.write_all(&serde_json::to_vec(&entry).unwrap_or_default())?;
                f.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn finish(&self, id: &str) -> io::Result<()> {
        let path = self.path(id);
        let mut entry: JournalEntry =
            serde_json::from_slice(&fs::read(&path)?).map_err(io::Error::other)?;
        entry.state = "done".into();
        entry.at = now_secs();
        write_atomic(&path, &serde_json::to_vec(&entry).unwrap_or_default())
    }

    /// Tasks that were running when the agent last stopped.
    pub fn interrupted(&self) -> Vec<JournalEntry> {
        self.entries()
            .into_iter()
            .filter(|e| e.state == "running")
            .collect()
    }

    fn entries(&self) -> Vec<JournalEntry> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// Forgets finished tasks older than `age` (the server stopped listing them long ago).
    pub fn prune(&self, age: Duration) {
        let cutoff = now_secs().saturating_sub(age.as_secs());
        for e in self.entries() {
            if e.state == "done" && e.at < cutoff {
                let _ = fs::remove_file(self.path(&e.id));
            }
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Report {
    task_id: String,
    body: Completion,
}

/// One queued report: its file, and its content (None when the file was unreadable at open).
struct Queued {
    path: PathBuf,
    report: Option<Report>,
}

/// The files are the truth; the queue mirrors them in memory (read once at open) so that an
/// idle sender sleeps on the condvar instead of listing the directory.
pub struct Outbox {
    dir: PathBuf,
    queue: Mutex<Queue>,
    changed: Condvar,
}

struct Queue {
    next_seq: u64,
    items: VecDeque<Queued>,
}

impl Outbox {
    pub fn open(data_dir: &Path) -> io::Result<Outbox> {
        let dir = data_dir.join("state/outbox");
        fs::create_dir_all(&dir)?;
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let next_seq = paths.last().and_then(|p| seq_of(p)).unwrap_or(0) + 1;
        let items = paths
            .into_iter()
            .map(|path| Queued {
                report: read_report(&path),
                path,
            })
            .collect();
        Ok(Outbox {
            dir,
            queue: Mutex::new(Queue { next_seq, items }),
            changed: Condvar::new(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Persists a report; it is sent after every report queued before it.
    pub fn push(&self, task_id: &str, body: &Completion) -> io::Result<()> {
        let mut q = self.queue();
        let seq = q.next_seq;
        q.next_seq += 1;
        let report = Report {
            task_id: task_id.to_string(),
            body: body.clone(),
        };
        let path = self.dir.join(format!("{seq:020}-{task_id}.json"));
        write_atomic(&path, &serde_json::to_vec(&report).unwrap_or_default())?;
        q.items.push_back(Queued {
            path,
            report: Some(report),
        });
        self.changed.notify_all();
        Ok(())
    }

    #[cfg(test)]
    fn pending(&self) -> Vec<PathBuf> {
        self.queue().items.iter().map(|q| q.path.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// True when a final (completed/failed) report for this task is queued.
    pub fn has_final(&self, task_id: &str) -> bool {
        self.queue().items.iter().any(|q| {
            q.report
                .as_ref()
                .is_some_and(|r| r.task_id == task_id && r.body.is_final())
        })
    }

    /// The oldest report, waiting for a push while there is none. Only the sender takes
    /// reports off, so the front stays the same until `delivered`.
    fn next(&self) -> (PathBuf, Option<Report>) {
        let mut q = self.queue();
        loop {
            if let Some(f) = q.items.front() {
                return (f.path.clone(), f.report.clone());
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Removes the front report, file first: a crash in between re-sends rather than loses.
    fn delivered(&self, path: &Path) {
        let _ = fs::remove_file(path);
        let mut q = self.queue();
        if q.items.front().is_some_and(|f| f.path == path) {
            q.items.pop_front();
        }
        self.changed.notify_all();
    }

    /// Delivers reports in order, for ever. Non-retryable rejections (a 4xx other than 401)
    /// are dropped with an error log so one bad report cannot block the rest.
    pub fn run_sender(&self, client: &Client) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut failures = 0u32;
        loop {
            let (path, report) = self.next();
            let Some(report) = report else {
                log::error!("outbox: dropping unreadable report {}", path.display());
                self.delivered(&path);
                continue;
            };
            let body = serde_json::to_vec(&report.body).unwrap_or_default();
            match client.complete(&report.task_id, &body) {
                Ok(()) => {
                    if failures > 0 {
                        log::info!("control plane reachable again; delivering queued reports");
                    }
                    log::debug!("reported task {} {}", report.task_id, report.body.status);
                    self.delivered(&path);
                    failures = 0;
                    backoff.reset();
                }
                Err(e) if !e.is_retryable() && e.status() != Some(401) => {
                    log::error!(
                        "control plane rejected the {} report of task {}, dropping it: {e}",
                        report.body.status,
                        report.task_id
                    );
                    self.delivered(&path);
                }
                Err(e) => {
                    failures += 1;
                    let delay = backoff.next_delay();
                    if failures == 1 || failures % 10 == 0 {
                        log::warn!(
                            "cannot report task {} (attempt {failures}), retrying in {:.1}s: {e}",
                            report.task_id,
                            delay.as_secs_f64()
                        );
                    }
                    std::thread::sleep(delay);
                }
            }
        }
    }

    /// Waits until every queued report is delivered, or the deadline passes.
    pub fn wait_empty(&self, deadline: Instant) -> bool {
        let mut q = self.queue();
        while !q.items.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self
                .changed
                .wait_timeout(q, deadline - now)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }
}

fn seq_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.split('-').next()?.parse().ok()
}

fn read_report(p: &Path) -> Option<Report> {
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("muvee-agent-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn journal_claims_once_and_remembers_interrupted_tasks() {
        let d = temp_dir("journal");
        let j = Journal::open(&d).unwrap();
        let t = Task {
            id: "t1".into(),
            kind: "build".into(),
            ..Task::default()
        };
        assert!(j.claim(&t).unwrap());
        assert!(!j.claim(&t).unwrap());
        let j = Journal::open(&d).unwrap();
        assert_eq!(j.interrupted().len(), 1);
        j.finish("t1").unwrap();
        assert!(j.interrupted().is_empty());
        assert!(!j.claim(&t).unwrap());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn outbox_survives_reopen_in_order() {
        let d = temp_dir("outbox");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running()).unwrap();
        ob.push("a", &Completion::failed("x")).unwrap();
        let ob = Outbox::open(&d).unwrap();
        ob.push("b", &Completion::running()).unwrap();
        let order: Vec<(String, String)> = ob
            .pending()
            .iter()
            .map(|p| read_report(p).map(|r| (r.task_id, r.body.status)).unwrap())
            .collect();
        assert_eq!(
            order,
            [
                ("a".into(), "running".into()),
                ("a".into(), "failed".into()),
                ("b".into(), "running".into())
            ]
        );
        assert!(ob.has_final("a") && !ob.has_final("b"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn outbox_hands_reports_out_in_order_and_wakes_wait_empty() {
        let d = temp_dir("outbox-wake");
        let ob = std::sync::Arc::new(Outbox::open(&d).unwrap());
        assert!(ob.wait_empty(Instant::now()));
        ob.push("a", &Completion::running()).unwrap();
        ob.push("a", &Completion::failed("x")).unwrap();
        let o2 = ob.clone();
        let waiter = std::thread::spawn(move || {
            let t0 = Instant::now();
            (o2.wait_empty(t0 + Duration::from_secs(30)), t0.elapsed())
        });
        for status in ["running", "failed"] {
            let (path, report) = ob.next();
            assert_eq!(report.unwrap().body.status, status);
            ob.delivered(&path);
            assert!(!path.exists());
        }
        let (empty, took) = waiter.join().unwrap();
        assert!(empty && took < Duration::from_secs(10));
        assert!(
            ob.is_empty()
                && fs::read_dir(d.join("state/outbox"))
                    .unwrap()
                    .next()
                    .is_none()
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn task_ids_are_checked_before_becoming_paths() {
        assert!(valid_id("9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10"));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id(""));
    }
}
