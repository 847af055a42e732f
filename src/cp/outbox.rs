//! The outbox under DATA_DIR/state/outbox: every report is queued before it is sent and
//! retried until the control plane answers 2xx.
//!
//! - Order is kept per task (running before final), not across tasks: a report the server
//!   refuses holds only its own task's later reports back. It is tried again at most
//!   [`RETRY_MAX`] apart, so it arrives soon after a passing fault ends; one refused for
//!   longer than [`PARK_AFTER`] is parked with an error log and tried every [`PARK_RETRY`].
//! - A report is queued in memory even when it cannot be written (a full disk): it is sent
//!   from memory and written as soon as space returns. A final report is sent only once it
//!   is recorded (its file, or the journal saying done), and the space for its file is
//!   reserved when the task is claimed, so a restart never contradicts what was reported.
//! - A delivered final report whose task the journal does not show as done yet leaves a
//!   `<task>.sent` tombstone (the report's own file, renamed: no new inode), so a restart
//!   never reports that task again with another outcome.
//! - A successful call to the control plane resets the backoff of waiting reports.

use crate::cp::client::{Backoff, Client, CpError};
use crate::cp::files::{self, remove_temps, sync_dir, write_atomic, write_reserved};
use crate::sys::disk::no_space;
use crate::task::Completion;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest wait between two tries of a report the server refuses.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A report refused for this long is parked: tried every [`PARK_RETRY`] only.
pub const PARK_AFTER: Duration = Duration::from_secs(2 * 3600);
/// How often a parked report is tried again.
pub const PARK_RETRY: Duration = Duration::from_secs(10 * 60);
/// A parked report still rejected after this long is dropped with an error.
const PARK_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Room kept for a task's final report from its claim on.
const RESERVE: usize = 64 << 10;

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
    /// Told the task id of each final report the control plane accepted.
    on_final: std::sync::OnceLock<Delivered>,
}

/// Told the task id of a final report the control plane accepted.
pub type Delivered = Box<dyn Fn(&str) + Send + Sync>;

impl Outbox {
    /// Opens the outbox. A full disk that keeps its directory from being created is no
    /// error: reports are then sent from memory until it can be.
    pub fn open(data_dir: &Path) -> io::Result<Outbox> {
        let dir = data_dir.join("state/outbox");
        match files::private_dir(&dir) {
            Err(e) if !no_space(&e) => return Err(e),
            _ => {}
        }
        remove_temps(&dir);
        let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
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
            on_final: std::sync::OnceLock::new(),
        })
    }

    /// `f` is told the task id of every final report accepted from now on (once set).
    pub fn on_final_delivered(&self, f: Delivered) {
        let _ = self.on_final.set(f);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserve_path(&self, task_id: &str) -> PathBuf {
        self.dir.join(format!("{task_id}.reserve"))
    }

    /// Reserves the space of the task's final report (at its claim: the report must be
    /// writable when the task ends, even on a full disk).
    pub fn reserve(&self, task_id: &str) -> io::Result<()> {
        if !self.dir.is_dir() {
            files::private_dir(&self.dir)?;
        }
        files::reserve(&self.reserve_path(task_id), RESERVE)
    }

    /// Frees every reserve left (at start, once the interrupted tasks were reported).
    pub fn release_reserves(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "reserve") {
                let _ = fs::remove_file(e.path());
            }
        }
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
        let persisted = if body.is_final() {
            let reserve = self.reserve_path(task_id);
            let written = persist(&path, &report, Some(&reserve));
            let _ = fs::remove_file(&reserve);
            written
        } else {
            persist(&path, &report, None)
        };
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

    /// True once every task with reports queued before this start had its first report
    /// tried (delivered, waiting for a retry or parked): new tasks may be taken. Reports
    /// behind a refused one of their task do not count: they cannot be tried before it.
    pub fn settled(&self) -> bool {
        let q = self.queue();
        let mut tasks = HashSet::new();
        !q.items
            .iter()
            .filter(|i| tasks.insert(i.report.task_id.as_str()))
            .any(|i| i.old && i.attempts == 0)
    }

    /// True when a final (completed/failed) report for this task is queued or was sent.
    pub fn has_final(&self, task_id: &str) -> bool {
        let q = self.queue();
        q.sent.contains(task_id)
            || q.items
                .iter()
                .any(|i| i.report.task_id == task_id && i.report.body.is_final())
    }

    /// True when any report of this task is queued, or its delivery left a tombstone.
    pub fn holds(&self, task_id: &str) -> bool {
        let q = self.queue();
        q.sent.contains(task_id) || q.items.iter().any(|i| i.report.task_id == task_id)
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
            let (i, report) = self.next_due(journal_done);
            let body = serde_json::to_vec(&report.body).unwrap_or_default();
            match client.complete(&report.task_id, &body) {
                Ok(()) => self.delivered(i, &report, journal_done),
                Err(e) => self.failed(i, &report, &e),
            }
        }
    }

    /// Waits until a report is due: the first of its task, past its backoff and the pause,
    /// and, for a final report, recorded on disk (its file, or the journal saying done).
    /// Also writes reports that could not be written before.
    fn next_due(&self, journal_done: &dyn Fn(&str) -> bool) -> (usize, Report) {
        let mut q = self.queue();
        loop {
            retry_persist(&mut q);
            let now = Instant::now();
            let mut wake = match find_due(&q, now, journal_done) {
                Ok(n) => return (n, q.items[n].report.clone()),
                Err(wake) => wake,
            };
            // Unwritten reports are retried now and then even when nothing else is due.
            if q.items.iter().any(|i| !i.persisted) {
                let soon = now + Duration::from_secs(5);
                wake = Some(wake.map_or(soon, |w| w.min(soon)));
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
        let mut q = self.queue();
        let item = q.items.remove(i);
        let mut keep_file = false;
        if report.body.is_final() && !journal_done(task) {
            // The delivered report's own file becomes the tombstone: no new inode needed.
            let tomb = self.dir.join(format!("{task}.sent"));
            let renamed = item.persisted
                && fs::rename(&item.path, &tomb)
                    .and_then(|()| sync_dir(&tomb))
                    .is_ok();
            if !renamed {
                if let Err(e) = write_atomic(&tomb, b"") {
                    // The report's file stays: a restart sends the same outcome again
                    // rather than report the task interrupted.
                    keep_file = item.persisted;
                    log::warn!("cannot record that the final report of task {task} was sent: {e}");
                }
            }
            q.sent.insert(task.clone());
        }
        if !keep_file {
            let _ = fs::remove_file(&item.path);
        }
        if q.failures > 0 {
            log::info!("control plane reachable again; delivering queued reports");
        }
        q.failures = 0;
        q.backoff.reset();
        if item.first_failure.is_some() {
            log::info!(
                "the {} report of task {task} was accepted after {} refused attempt(s)",
                report.body.status,
                item.attempts
            );
        }
        log::debug!("reported task {task} {}", report.body.status);
        self.changed.notify_all();
        drop(q);
        if let Some(f) = self.on_final.get().filter(|_| report.body.is_final()) {
            f(task);
        }
    }

    fn failed(&self, i: usize, report: &Report, e: &CpError) {
        let mut q = self.queue();
        let now = Instant::now();
        let whole_cp = e.status().map_or(true, |s| s == 401);
        if whole_cp {
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
        if whole_cp {
            item.not_before = now;
        } else {
            refused(item, e, now);
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

/// The report to send now: the first of its task, past its backoff and the pause, and, for
/// a final report, recorded (its file, or the journal saying done). Else when to look again.
fn find_due(
    q: &Queue,
    now: Instant,
    journal_done: &dyn Fn(&str) -> bool,
) -> Result<usize, Option<Instant>> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut wake = None::<Instant>;
    for (n, i) in q.items.iter().enumerate() {
        if !seen.insert(i.report.task_id.as_str()) {
            continue;
        }
        if !i.persisted && i.report.body.is_final() && !journal_done(&i.report.task_id) {
            continue;
        }
        let at = i.not_before.max(q.pause_until);
        if at <= now {
            return Ok(n);
        }
        wake = Some(wake.map_or(at, |w| w.min(at)));
    }
    Err(wake)
}

/// A report the server answered with an error status: tried again after a delay growing to
/// RETRY_MAX; refused for longer than PARK_AFTER, parked (tried every PARK_RETRY).
fn refused(item: &mut Queued, e: &CpError, now: Instant) {
    let refused_for = item
        .first_failure
        .map_or(Duration::ZERO, |f| now.duration_since(f));
    if refused_for > PARK_AFTER && !item.parked {
        item.parked = true;
        log::error!(
            "parking the {} report of task {} after {}m of refusals ({} attempts), other reports go on; retried every {}m: {e}",
            item.report.body.status,
            item.report.task_id,
            refused_for.as_secs() / 60,
            item.attempts,
            PARK_RETRY.as_secs() / 60
        );
    }
    item.not_before = now
        + if item.parked {
            PARK_RETRY
        } else {
            retry_delay(item.attempts)
        };
    if !item.parked && (item.attempts == 1 || item.attempts % 20 == 0) {
        log::warn!(
            "the {} report of task {} was refused (attempt {}), retrying in {:.1}s: {e}",
            item.report.body.status,
            item.report.task_id,
            item.attempts,
            (item.not_before - now).as_secs_f64()
        );
    }
}

/// 1, 2, 4 ... seconds, at most RETRY_MAX.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(500u64 << attempts.min(10)).min(RETRY_MAX)
}

fn retry_persist(q: &mut Queue) {
    for i in q.items.iter_mut().filter(|i| !i.persisted) {
        i.persisted = persist(&i.path, &i.report, None);
        if i.persisted {
            log::info!(
                "report of task {} written to the outbox after an earlier failure",
                i.report.task_id
            );
        }
    }
}

/// Writes a report, through `reserve` when given (a final report: space kept at the claim).
fn persist(path: &Path, report: &Report, reserve: Option<&Path>) -> bool {
    let data = serde_json::to_vec(report).unwrap_or_default();
    if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
        let _ = files::private_dir(dir);
    }
    let written = match reserve {
        Some(r) => write_reserved(r, path, &data),
        None => write_atomic(path, &data),
    };
    match written {
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

    fn refusal(code: u16) -> CpError {
        CpError::Status {
            url: "u".into(),
            code,
            body: "SQLSTATE 22021".into(),
        }
    }

    const DONE: &dyn Fn(&str) -> bool = &|_| true;

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
        assert!(ob.holds("a") && ob.holds("b") && !ob.holds("c"));
        let _ = fs::remove_dir_all(&d);
    }

    /// A report behind a refused one of its task is never tried: it must not keep the
    /// agent from polling after a restart.
    #[test]
    fn settled_once_each_old_task_had_its_first_report_tried() {
        let d = temp_dir("outbox-settled");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        let ob = Outbox::open(&d).unwrap();
        assert!(!ob.settled());
        let (i, r) = ob.next_due(DONE);
        ob.failed(i, &r, &refusal(404));
        assert!(ob.settled(), "a's final waits behind its running report");
        let _ = fs::remove_dir_all(&d);
    }

    /// A refused report is tried again at most RETRY_MAX apart, holds only its own task's
    /// later reports back, and is parked only after PARK_AFTER of refusals.
    #[test]
    fn a_refused_report_is_retried_soon_and_parked_only_after_hours() {
        let d = temp_dir("outbox-park");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        ob.push("b", &Completion::running());
        let (i, r) = ob.next_due(DONE);
        assert_eq!(r.task_id, "a");
        ob.failed(i, &r, &refusal(500));
        // a waits for its retry: b goes meanwhile, a's final stays behind a's running report.
        let (i, r) = ob.next_due_now(DONE).unwrap();
        assert_eq!(r.task_id, "b");
        ob.delivered(i, &r, DONE);
        for n in 0..40 {
            // Skip the backoff, as the clock would.
            ob.queue().items[0].not_before = Instant::now();
            let (i, r) = ob.next_due(DONE);
            assert_eq!(r.body.status.as_str(), "running", "a's final passed it");
            ob.failed(i, &r, &refusal(if n % 3 == 0 { 502 } else { 404 }));
            let q = ob.queue();
            assert!(
                !q.items[i].parked,
                "parked after {} attempts",
                q.items[i].attempts
            );
            let wait = q.items[i].not_before - Instant::now();
            assert!(wait <= RETRY_MAX, "waits {wait:?}");
        }
        // Refused for longer than PARK_AFTER: parked, tried every PARK_RETRY.
        let Some(long_ago) = Instant::now().checked_sub(PARK_AFTER + Duration::from_secs(1)) else {
            return; // a machine up for less than PARK_AFTER
        };
        let mut q = ob.queue();
        q.items[0].first_failure = Some(long_ago);
        q.items[0].not_before = Instant::now();
        drop(q);
        let (i, r) = ob.next_due(DONE);
        ob.failed(i, &r, &refusal(500));
        let q = ob.queue();
        assert!(q.items[0].parked);
        assert!(q.items[0].not_before > Instant::now() + PARK_RETRY - Duration::from_secs(5));
        drop(q);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_final_delivered_before_the_journal_said_done_leaves_a_tombstone() {
        let d = temp_dir("outbox-tomb");
        let ob = Outbox::open(&d).unwrap();
        ob.push("t", &Completion::completed());
        let (i, r) = ob.next_due(DONE);
        ob.delivered(i, &r, &|_| false);
        assert!(ob.is_empty() && ob.has_final("t"));
        let ob = Outbox::open(&d).unwrap();
        assert!(ob.has_final("t"), "a restart would report t again");
        assert!(ob.is_empty(), "the tombstone was read as a report");
        ob.forget_sent(DONE);
        assert!(!ob.has_final("t"));
        assert!(!d.join("state/outbox/t.sent").exists());
        let _ = fs::remove_dir_all(&d);
    }

    /// The final report goes into the space its claim reserved; one that could not be
    /// written waits until the journal records the task done.
    #[test]
    fn a_final_report_uses_its_reserve_and_goes_out_only_once_recorded() {
        let d = temp_dir("outbox-reserve");
        let ob = Outbox::open(&d).unwrap();
        ob.reserve("t").unwrap();
        let reserve = d.join("state/outbox/t.reserve");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE as u64);
        ob.push("t", &Completion::completed());
        assert!(!reserve.exists(), "the reserve was not used");
        assert!(ob.queue().items[0].persisted);
        // As if it could not be written: not due before the journal records the task.
        ob.queue().items[0].persisted = false;
        assert!(ob.next_due_now(&|_| false).is_none());
        assert!(ob.next_due_now(DONE).is_some());
        ob.release_reserves();
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
            let (i, r) = ob.next_due_now(DONE).unwrap();
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
        assert!(ob.next_due_now(DONE).is_some());
        let _ = fs::remove_dir_all(&d);
    }

    impl Outbox {
        /// The due report, without waiting or writing.
        fn next_due_now(&self, journal_done: &dyn Fn(&str) -> bool) -> Option<(usize, Report)> {
            let q = self.queue();
            let i = find_due(&q, Instant::now(), journal_done).ok()?;
            Some((i, q.items[i].report.clone()))
        }
    }
}
