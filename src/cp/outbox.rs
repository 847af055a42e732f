//! The outbox under DATA_DIR/state/outbox: every report is queued before it is sent and
//! retried until the control plane answers 2xx.
//!
//! - Order is kept per task (running before final), not across tasks: a report the server
//!   keeps rejecting is parked after [`PARK_AFTER`] attempts with an error log and retried
//!   every [`PARK_RETRY`], while the others go on.
//! - A report is queued in memory even when it cannot be written (a full disk): it is sent
//!   from memory and written as soon as space returns.
//! - A delivered final report whose task the journal does not show as done yet leaves a
//!   `<task>.sent` tombstone, so a restart never reports that task again with another outcome.
//! - A successful call to the control plane resets the backoff of waiting reports.

use crate::cp::client::{Backoff, Client, CpError};
use crate::cp::journal::{remove_temps, write_atomic};
use crate::task::Completion;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Attempts after which a report the server keeps rejecting stops holding its task's queue
/// to the normal backoff.
pub const PARK_AFTER: u32 = 8;
/// How often a parked report is tried again.
pub const PARK_RETRY: Duration = Duration::from_secs(10 * 60);
/// A parked report still rejected after this long is dropped with an error.
const PARK_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Serialize, Deserialize)]
struct Report {
    task_id: String,
    body: Completion,
}

struct Queued {
    path: PathBuf,
    report: Report,
    /// False while the file could not be written.
    persisted: bool,
    attempts: u32,
    first_failure: Option<Instant>,
    not_before: Instant,
    parked: bool,
    /// Queued before this start: goes out before new tasks are taken.
    old: bool,
}

struct Queue {
    next_seq: u64,
    items: Vec<Queued>,
    /// Final reports delivered before the journal said done (their tombstones).
    sent: HashSet<String>,
    /// The control plane itself is unreachable: nothing is tried before this.
    pause_until: Instant,
    backoff: Backoff,
    failures: u32,
}

pub struct Outbox {
    dir: PathBuf,
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Outbox {
    pub fn open(data_dir: &Path) -> io::Result<Outbox> {
        let dir = data_dir.join("state/outbox");
        fs::create_dir_all(&dir)?;
        remove_temps(&dir);
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)?.flatten().map(|e| e.path()).collect();
        paths.sort();
        let sent = paths
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "sent"))
            .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
            .collect();
        let json: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        let next_seq = json.last().and_then(|p| seq_of(p)).unwrap_or(0) + 1;
        let items = json.into_iter().filter_map(|p| load(p)).collect();
        let queue = Queue {
            next_seq,
            items,
            sent,
            pause_until: Instant::now(),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            failures: 0,
        };
        Ok(Outbox {
            dir,
            queue: Mutex::new(queue),
            changed: Condvar::new(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report after every report of the same task queued before it. It is sent
    /// even when it cannot be written now (then it is written when space returns).
    pub fn push(&self, task_id: &str, body: &Completion) {
        let mut q = self.queue();
        let seq = q.next_seq;
        q.next_seq += 1;
        let report = Report {
            task_id: task_id.to_string(),
            body: body.clone(),
        };
        let path = self.dir.join(format!("{seq:020}-{task_id}.json"));
        let persisted = persist(&path, &report);
        q.items.push(Queued {
            path,
            report,
            persisted,
            attempts: 0,
            first_failure: None,
            not_before: Instant::now(),
            parked: false,
            old: false,
        });
        self.changed.notify_all();
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// True once every report queued before this start was tried (delivered, waiting for
    /// a retry or parked): new tasks may be taken.
    pub fn settled(&self) -> bool {
        !self.queue().items.iter().any(|i| i.old && i.attempts == 0)
    }

    /// True when a final (completed/failed) report for this task is queued or was sent.
    pub fn has_final(&self, task_id: &str) -> bool {
        let q = self.queue();
        q.sent.contains(task_id)
            || q.items
                .iter()
                .any(|i| i.report.task_id == task_id && i.report.body.is_final())
    }

    /// The control plane answered a call: waiting reports (not parked ones) go out now.
    pub fn reachable(&self) {
        let mut q = self.queue();
        let now = Instant::now();
        let mut woke = q.failures > 0 || q.pause_until > now;
        q.failures = 0;
        q.backoff.reset();
        q.pause_until = now;
        for i in q
            .items
            .iter_mut()
            .filter(|i| !i.parked && i.not_before > now)
        {
            i.not_before = now;
            woke = true;
        }
        if woke {
            self.changed.notify_all();
        }
    }

    /// Forgets tombstones of tasks the journal now shows as done.
    pub fn forget_sent(&self, journal_done: &dyn Fn(&str) -> bool) {
        let mut q = self.queue();
        let done: Vec<String> = q.sent.iter().filter(|t| journal_done(t)).cloned().collect();
        for t in done {
            let _ = fs::remove_file(self.dir.join(format!("{t}.sent")));
            q.sent.remove(&t);
        }
    }

    /// Delivers reports for ever. `journal_done` says whether the journal on disk shows a
    /// task as done (else a delivered final leaves a tombstone).
    pub fn run_sender(&self, client: &Client, journal_done: &dyn Fn(&str) -> bool) {
        loop {
            let (i, report) = self.next_due();
            let body = serde_json::to_vec(&report.body).unwrap_or_default();
            match client.complete(&report.task_id, &body) {
                Ok(()) => self.delivered(i, &report, journal_done),
                Err(e) => self.failed(i, &report, &e),
            }
        }
    }

    /// Waits until a report is due: the first of its task, past its backoff and the pause.
    /// Also writes reports that could not be written before.
    fn next_due(&self) -> (usize, Report) {
        let mut q = self.queue();
        loop {
            retry_persist(&mut q);
            let now = Instant::now();
            let mut seen: HashSet<&str> = HashSet::new();
            let mut due = None;
            let mut wake = None::<Instant>;
            for (n, i) in q.items.iter().enumerate() {
                if !seen.insert(i.report.task_id.as_str()) {
                    continue;
                }
                let at = i.not_before.max(q.pause_until);
                if at <= now {
                    due = Some(n);
                    break;
                }
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if let Some(n) = due {
                return (n, q.items[n].report.clone());
            }
            // Unwritten reports are retried now and then even when nothing else is due.
            if q.items.iter().any(|i| !i.persisted) {
                wake = Some(wake.map_or(now + Duration::from_secs(5), |w| {
                    w.min(now + Duration::from_secs(5))
                }));
            }
            q = match wake {
                None => self.changed.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(w) => self
                    .changed
                    .wait_timeout(q, w.saturating_duration_since(now))
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0),
            };
        }
    }

    fn delivered(&self, i: usize, report: &Report, journal_done: &dyn Fn(&str) -> bool) {
        let task = &report.task_id;
        if report.body.is_final() && !journal_done(task) {
            let tomb = self.dir.join(format!("{task}.sent"));
            if let Err(e) = write_atomic(&tomb, b"") {
                log::warn!("cannot record that the final report of task {task} was sent: {e}");
            }
            self.queue().sent.insert(task.clone());
        }
        let mut q = self.queue();
        if q.failures > 0 {
            log::info!("control plane reachable again; delivering queued reports");
        }
        q.failures = 0;
        q.backoff.reset();
        log::debug!("reported task {task} {}", report.body.status);
        let item = q.items.remove(i);
        let _ = fs::remove_file(&item.path);
        self.changed.notify_all();
    }

    fn failed(&self, i: usize, report: &Report, e: &CpError) {
        let mut q = self.queue();
        let now = Instant::now();
        if e.status().map_or(true, |s| s == 401) {
            // The control plane as a whole: every report waits.
            q.failures += 1;
            let d = q.backoff.next_delay();
            q.pause_until = now + d;
            if q.failures == 1 || q.failures % 10 == 0 {
                log::warn!(
                    "cannot report task {} (attempt {}), retrying in {:.1}s: {e}",
                    report.task_id,
                    q.failures,
                    d.as_secs_f64()
                );
            }
        }
        let item = &mut q.items[i];
        item.attempts += 1;
        let first = *item.first_failure.get_or_insert(now);
        if e.status().is_some_and(|s| s != 401) {
            park_or_back_off(item, e, now);
        } else {
            item.not_before = now;
        }
        if item.parked && now.duration_since(first) > PARK_MAX_AGE {
            log::error!(
                "dropping the {} report of task {} after a week of rejections: {e}",
                report.body.status,
                report.task_id
            );
            let item = q.items.remove(i);
            let _ = fs::remove_file(&item.path);
        }
    }

    /// Waits until every queued report is delivered, or the deadline passes. Reports that
    /// could not be written are written now, if at all possible, for the next start.
    pub fn wait_empty(&self, deadline: Instant) -> bool {
        let mut q = self.queue();
        while !q.items.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                retry_persist(&mut q);
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

/// A report the server answered with an error status: a growing per-report delay, and
/// after PARK_AFTER attempts (at once for a 4xx it will not change its mind about), parked.
fn park_or_back_off(item: &mut Queued, e: &CpError, now: Instant) {
    let hopeless = !e.is_retryable();
    if (hopeless || item.attempts >= PARK_AFTER) && !item.parked {
        item.parked = true;
        log::error!(
            "parking the {} report of task {} after {} attempt(s), other reports go on; retried every {}m: {e}",
            item.report.body.status,
            item.report.task_id,
            item.attempts,
            PARK_RETRY.as_secs() / 60
        );
    }
    item.not_before = if item.parked {
        now + PARK_RETRY
    } else {
        now + Duration::from_millis(500u64 << item.attempts.min(7))
    };
}

fn retry_persist(q: &mut Queue) {
    for i in q.items.iter_mut().filter(|i| !i.persisted) {
        i.persisted = persist(&i.path, &i.report);
        if i.persisted {
            log::info!(
                "report of task {} written to the outbox after an earlier failure",
                i.report.task_id
            );
        }
    }
}

fn persist(path: &Path, report: &Report) -> bool {
    match write_atomic(path, &serde_json::to_vec(report).unwrap_or_default()) {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "cannot write the {} report of task {} to {} (it is sent from memory): {e}",
                report.body.status,
                report.task_id,
                path.display()
            );
            false
        }
    }
}

fn load(path: &Path) -> Option<Queued> {
    let report = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Report>(&b).ok());
    let Some(report) = report else {
        log::error!("outbox: dropping unreadable report {}", path.display());
        let _ = fs::remove_file(path);
        return None;
    };
    Some(Queued {
        path: path.to_path_buf(),
        report,
        persisted: true,
        attempts: 0,
        first_failure: None,
        not_before: Instant::now(),
        parked: false,
        old: true,
    })
}

fn seq_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::temp_dir;

    fn statuses(ob: &Outbox) -> Vec<(String, String)> {
        let q = ob.queue();
        q.items
            .iter()
            .map(|i| (i.report.task_id.clone(), i.report.body.status.to_string()))
            .collect()
    }

    #[test]
    fn survives_reopen_in_order() {
        let d = temp_dir("outbox");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        let ob = Outbox::open(&d).unwrap();
        assert!(!ob.settled());
        ob.push("b", &Completion::running());
        let want = [("a", "running"), ("a", "failed"), ("b", "running")]
            .map(|(a, b)| (a.to_string(), b.to_string()));
        assert_eq!(statuses(&ob), want);
        assert!(ob.has_final("a") && !ob.has_final("b"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_rejected_report_is_parked_and_others_pass_it_in_task_order() {
        let d = temp_dir("outbox-park");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        ob.push("b", &Completion::running());
        let e = CpError::Status {
            url: "u".into(),
            code: 500,
            body: "SQLSTATE 22021".into(),
        };
        for _ in 0..PARK_AFTER {
            let (i, r) = ob.next_due();
            assert_eq!(r.task_id, "a", "b went first while a was not parked");
            ob.failed(i, &r, &e);
            // Skip the backoff, as the clock would.
            let mut q = ob.queue();
            if q.items[i].parked {
                break;
            }
            q.items[i].not_before = Instant::now();
        }
        assert!(ob.queue().items[0].parked);
        // a's final stays behind a's running report; b goes now.
        let (i, r) = ob.next_due();
        assert_eq!(
            (r.task_id.as_str(), r.body.status.as_str()),
            ("b", "running")
        );
        ob.delivered(i, &r, &|_| true);
        assert_eq!(statuses(&ob).len(), 2);
        // A 404 from a proxy parks at once instead of dropping the report.
        let e = CpError::Status {
            url: "u".into(),
            code: 404,
            body: "not found".into(),
        };
        ob.push("c", &Completion::completed());
        let (i, r) = ob.next_due();
        assert_eq!(r.task_id, "c");
        ob.failed(i, &r, &e);
        assert!(ob
            .queue()
            .items
            .iter()
            .any(|i| i.report.task_id == "c" && i.parked));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_final_delivered_before_the_journal_said_done_leaves_a_tombstone() {
        let d = temp_dir("outbox-tomb");
        let ob = Outbox::open(&d).unwrap();
        ob.push("t", &Completion::completed());
        let (i, r) = ob.next_due();
        ob.delivered(i, &r, &|_| false);
        assert!(ob.is_empty() && ob.has_final("t"));
        let ob = Outbox::open(&d).unwrap();
        assert!(ob.has_final("t"), "a restart would report t again");
        ob.forget_sent(&|_| true);
        assert!(!ob.has_final("t"));
        assert!(!d.join("state/outbox/t.sent").exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn reachable_resets_the_backoff_of_waiting_reports() {
        let d = temp_dir("outbox-reach");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        let e = CpError::Transport {
            url: "u".into(),
            err: "connection refused".into(),
        };
        for _ in 0..20 {
            let (i, r) = ob.next_due_now().unwrap();
            ob.failed(i, &r, &e);
            ob.queue().pause_until = Instant::now();
        }
        let r = ob.queue().items[0].report.clone();
        ob.failed(0, &r, &e);
        assert!(
            ob.queue().pause_until > Instant::now() + Duration::from_secs(1),
            "backoff did not grow"
        );
        ob.reachable();
        assert!(ob.next_due_now().is_some());
        let _ = fs::remove_dir_all(&d);
    }

    impl Outbox {
        /// The due report, without waiting.
        fn next_due_now(&self) -> Option<(usize, Report)> {
            let q = self.queue();
            let now = Instant::now();
            let i = q
                .items
                .iter()
                .position(|i| i.not_before.max(q.pause_until) <= now)?;
            Some((i, q.items[i].report.clone()))
        }
    }
}
