//! The outbox under DATA_DIR/state/outbox: every report is queued before it is sent and
//! retried until the control plane answers 2xx.
//!
//! - Order is kept per task (running before final), not across tasks: [`SENDERS`] threads
//!   send reports of different tasks at once, never two of one task. A report that fails
//!   (refused with an error status, or no answer: a reset, a timeout) holds only its own
//!   task's later reports back. It is tried again after its own delay, growing to
//!   [`RETRY_MAX`], so it arrives soon after a passing fault ends; one failing for longer
//!   than [`PARK_AFTER`] is parked with an error log and tried every [`PARK_RETRY`].
//! - The control plane counts as down only when the agent's own calls (register, poll) get
//!   no answer too ([`Outbox::unreachable`]): then every report waits, one probes at a time
//!   with a growing backoff, and all go once a call is answered ([`Outbox::reachable`]).
//! - A final report is sent only once its file is written, so a restart never contradicts
//!   what was reported. The space for it is reserved when the task is claimed; a report
//!   bigger than the reserve that cannot be written whole (a full disk) is written, and
//!   sent, with its result cut to fit. A `running` report that cannot be written is sent
//!   from memory and written as soon as space returns.
//! - A delivered final report whose task the journal does not show as done yet leaves a
//!   `<task>.sent` tombstone (the report's own file, renamed: no new inode), so a restart
//!   never reports that task again with another outcome.
//! - A report file found unreadable at start (cut short by a crash) is replaced by a
//!   `failed` report of its task, unless another final report of that task is queued.

use crate::cp::client::{Backoff, Client, CpError};
use crate::cp::files::{self, remove_temps, sync_dir, write_atomic, write_reserved};
use crate::sys::disk::no_space;
use crate::sys::wait::{self, Bell, Check, Stop, Woke};
use crate::task::{valid_id, Completion};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Reports sent at once (of different tasks): a report whose request hangs until the
/// timeout holds no other task's reports back.
pub const SENDERS: usize = 4;
/// The longest wait between two tries of a failing report.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A report failing for this long is parked: tried every [`PARK_RETRY`] only.
pub const PARK_AFTER: Duration = Duration::from_secs(2 * 3600);
/// How often a parked report is tried again.
pub const PARK_RETRY: Duration = Duration::from_secs(10 * 60);
/// A parked report still failing after this long is dropped with an error.
const PARK_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Room kept for a task's final report from its claim on.
const RESERVE: usize = 64 << 10;
/// How long a refused routing report keeps a newer one of its app waiting.
const ROUTE_ORDER_MAX: Duration = Duration::from_secs(120);
/// How often reports that could not be written are tried again.
const PERSIST_RETRY: Duration = Duration::from_secs(5);
/// Ends a result cut so that its report fits the space reserved for it.
const CUT_MARK: &str = "\n[cut by muvee-agent: DATA_DIR was full when the task ended]\n";
/// The reason reported for a task whose queued report was found unreadable.
const UNREADABLE: &str = "the agent's queued report of this task was damaged (unreadable file in DATA_DIR/state/outbox); its outcome is unknown";

#[derive(Clone, Serialize, Deserialize)]
struct Report {
    task_id: String,
    body: Completion,
    /// The app a completed deploy's report routes (see [`Outbox::push_routing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route: Option<String>,
}

struct Queued {
    /// Its place in the queue, and its identity while a sender holds a copy.
    seq: u64,
    path: PathBuf,
    report: Report,
    /// False while the file could not be written.
    persisted: bool,
    attempts: u32,
    first_failure: Option<Instant>,
    /// Failing since, the control plane up: how long it has held newer routing reports of
    /// its app (a failure during an outage is no refusal of this report).
    failing_up_since: Option<Instant>,
    not_before: Instant,
    parked: bool,
    /// The last try got no answer (not a refusal): a poll answered proves nothing for it.
    unanswered: bool,
    /// Queued before this start: goes out before new tasks are taken.
    old: bool,
}

struct Queue {
    next_seq: u64,
    items: Vec<Queued>,
    /// Final reports delivered before the journal said done (their tombstones).
    sent: HashSet<String>,
    /// Tasks whose report a sender is sending now.
    in_flight: HashSet<String>,
    /// The agent's own calls get no answer either: the control plane is down.
    down: bool,
    /// While down: nothing is tried before this.
    pause_until: Instant,
    backoff: Backoff,
    /// Reports that got no answer while down, in a row.
    failures: u32,
    /// When unwritten reports are tried again.
    next_persist: Instant,
}

/// What [`Outbox::wait_empty`] left behind.
pub enum Flushed {
    All,
    /// `queued` reports stay, `unwritten` of them only in memory (lost at exit).
    Left {
        queued: usize,
        unwritten: usize,
    },
}

pub struct Outbox {
    dir: PathBuf,
    queue: Mutex<Queue>,
    /// Rung when a report is queued, delivered or due again: the senders wait on it.
    changed: Bell,
    /// Told the task id of each final report the control plane accepted.
    on_final: std::sync::OnceLock<Delivered>,
    /// Told when an outage ends, whichever call shows it.
    on_back: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
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
        let (mut items, mut unreadable) = (Vec::new(), Vec::new());
        for p in json {
            match load(p) {
                Ok(item) => items.push(item),
                Err(task) => unreadable.extend(task),
            }
        }
        let now = Instant::now();
        let queue = Queue {
            next_seq,
            items,
            sent,
            in_flight: HashSet::new(),
            down: false,
            pause_until: now,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            failures: 0,
            next_persist: now,
        };
        let outbox = Outbox {
            dir,
            queue: Mutex::new(queue),
            changed: Bell::default(),
            on_final: std::sync::OnceLock::new(),
            on_back: std::sync::OnceLock::new(),
        };
        for task in unreadable {
            if !outbox.has_final(&task) {
                log::error!("task {task}: its queued report was unreadable; reporting it failed");
                outbox.push(&task, &Completion::failed(UNREADABLE));
            }
        }
        Ok(outbox)
    }

    /// `f` is told the task id of every final report accepted from now on (once set).
    pub fn on_final_delivered(&self, f: Delivered) {
        let _ = self.on_final.set(f);
    }

    /// `f` is told when an outage ends (once set): a poll, a report or another call of the
    /// agent's was answered.
    pub fn on_outage_end(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_back.set(f);
    }

    fn outage_ended(&self) {
        if let Some(f) = self.on_back.get() {
            f();
        }
    }

    /// Another call of the agent's (metrics, statuses) was answered: it ends an outage as a
    /// poll does, and does nothing otherwise.
    pub fn answered(&self) {
        if self.queue().down {
            self.reachable();
        }
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
        files::private_dir(&self.dir)?;
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

    /// Queues a report after every report of the same task queued before it. True when it
    /// is on disk. A `running` report is sent even when it cannot be written now; a final
    /// one only once it is written (tried again until space returns).
    pub fn push(&self, task_id: &str, body: &Completion) -> bool {
        self.push_with(task_id, body, None)
    }

    /// Queues the report of a deploy that routes `app` (its host port). The control plane
    /// routes an app by the last such report it took, so they go out in the order they were
    /// queued: a newer deploy's report waits while an older one of the same app is refused
    /// (for at most ROUTE_ORDER_MAX, after which statuses correct a late older report).
    pub fn push_routing(&self, task_id: &str, body: &Completion, app: &str) -> bool {
        self.push_with(task_id, body, Some(app))
    }

    fn push_with(&self, task_id: &str, body: &Completion, route: Option<&str>) -> bool {
        let mut q = self.queue();
        let seq = q.next_seq;
        q.next_seq += 1;
        let mut report = Report {
            task_id: task_id.to_string(),
            body: body.clone(),
            route: route.map(String::from),
        };
        let path = self.dir.join(format!("{seq:020}-{task_id}.json"));
        let written = if body.is_final() {
            self.persist_final(&path, &mut report)
        } else {
            write_report(&path, &report, None)
        };
        if let Err(e) = &written {
            let what = if body.is_final() {
                "it is sent once written; a restart before that reports the task failed"
            } else {
                "it is sent from memory"
            };
            log::error!(
                "cannot write the {} report of task {task_id} to {} ({what}; tried again every {}s): {e}",
                body.status,
                path.display(),
                PERSIST_RETRY.as_secs()
            );
        }
        let now = Instant::now();
        q.items.push(Queued {
            seq,
            path,
            report,
            persisted: written.is_ok(),
            attempts: 0,
            first_failure: None,
            failing_up_since: None,
            not_before: now,
            parked: false,
            unanswered: false,
            old: false,
        });
        self.changed.ring();
        written.is_ok()
    }

    /// Writes a final report into the space its claim reserved. One that does not fit there
    /// and cannot be written whole (a full disk) is written with its result cut to fit, and
    /// `report` becomes what was written: exactly that is sent.
    fn persist_final(&self, path: &Path, report: &mut Report) -> io::Result<()> {
        let reserve = self.reserve_path(&report.task_id);
        let mut written = write_report(path, report, Some(&reserve));
        if written.as_ref().is_err_and(no_space) {
            if let Some(cut) = cut_to_fit(report, RESERVE) {
                written = write_report(path, &cut, Some(&reserve));
                if written.is_ok() {
                    log::warn!(
                        "task {}: DATA_DIR is full: the result of its {} report was cut to the {} KiB kept for it",
                        report.task_id,
                        report.body.status,
                        RESERVE >> 10
                    );
                    *report = cut;
                }
            }
        }
        if written.is_ok() {
            let _ = fs::remove_file(&reserve);
        }
        written
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// True once every task with reports queued before this start had its first report
    /// tried (delivered, or failed once: refused, unanswered, or the control plane down):
    /// new tasks may be taken. Reports behind a failing one of their task do not count: they
    /// cannot be tried before it.
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

    /// A call of the agent's own (register, poll) was answered. After an outage every
    /// waiting report (not a parked one) goes now; otherwise refused reports do (the server
    /// may take them again), while one that got no answer keeps its own delay: a poll
    /// answered says nothing about its route, and retrying it at every poll would hammer.
    /// True when this ends an outage.
    pub fn reachable(&self) -> bool {
        let was_down = self.answered_in(&mut self.queue(), true);
        if was_down {
            self.outage_ended();
        }
        was_down
    }

    /// Something was answered: the outage (if any) ends, and with it every report's wait;
    /// `refused_too` (a poll) wakes refused reports as well. True when an outage ended.
    fn answered_in(&self, q: &mut Queue, refused_too: bool) -> bool {
        let now = Instant::now();
        let was_down = std::mem::replace(&mut q.down, false);
        if was_down {
            log::info!("control plane reachable again; delivering queued reports");
        }
        q.failures = 0;
        q.backoff.reset();
        q.pause_until = now;
        let mut woke = was_down;
        for i in q.items.iter_mut() {
            if was_down {
                // Its failures may have come before the outage was noticed.
                i.failing_up_since = None;
            }
            let wakes = was_down || (refused_too && !i.unanswered);
            if !i.parked && i.not_before > now && wakes {
                i.not_before = now;
                woke = true;
            }
        }
        if woke {
            self.changed.ring();
        }
        was_down
    }

    /// A call of the agent's own got no answer (or 401): with reports getting none either,
    /// the control plane is down and reports wait for it, one probing at a time.
    pub fn unreachable(&self) {
        self.queue().down = true;
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

    /// Delivers reports for ever; run by [`SENDERS`] threads. `journal_done` says whether
    /// the journal on disk shows a task as done (else a delivered final leaves a tombstone).
    pub fn run_sender(&self, client: &Client, journal_done: &dyn Fn(&str) -> bool) {
        loop {
            let (seq, report) = self.next_due();
            let body = serde_json::to_vec(&report.body).unwrap_or_default();
            match client.complete(&report.task_id, &body) {
                Ok(()) => self.delivered(seq, &report, journal_done),
                Err(e) => self.failed(seq, &report, &e),
            }
        }
    }

    /// Waits until a report is due (see [`find_due`]) and marks its task in flight. Also
    /// writes reports that could not be written before.
    fn next_due(&self) -> (u64, Report) {
        wait::next_ready(&self.changed, || {
            let mut q = self.queue();
            let now = Instant::now();
            if now >= q.next_persist {
                retry_persist(&mut q, &self.dir);
                q.next_persist = now + PERSIST_RETRY;
            }
            let mut wake = match find_due(&q, now) {
                Ok(n) => {
                    let (seq, report) = (q.items[n].seq, q.items[n].report.clone());
                    q.in_flight.insert(report.task_id.clone());
                    return Check::Ready((seq, report));
                }
                Err(wake) => wake,
            };
            if q.items.iter().any(|i| !i.persisted) {
                wake = Some(wake.map_or(q.next_persist, |w| w.min(q.next_persist)));
            }
            Check::Sleep(wake)
        })
    }

    fn delivered(&self, seq: u64, report: &Report, journal_done: &dyn Fn(&str) -> bool) {
        let task = &report.task_id;
        let mut q = self.queue();
        q.in_flight.remove(task);
        self.changed.ring();
        let Some(n) = q.items.iter().position(|i| i.seq == seq) else {
            return;
        };
        let item = q.items.remove(n);
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
        let ended = self.answered_in(&mut q, false);
        if item.first_failure.is_some() {
            log::info!(
                "the {} report of task {task} was accepted after {} failed attempt(s)",
                report.body.status,
                item.attempts
            );
        }
        log::debug!("reported task {task} {}", report.body.status);
        drop(q);
        if ended {
            self.outage_ended();
        }
        if let Some(f) = self.on_final.get().filter(|_| report.body.is_final()) {
            f(task);
        }
    }

    fn failed(&self, seq: u64, report: &Report, e: &CpError) {
        let mut q = self.queue();
        q.in_flight.remove(&report.task_id);
        self.changed.ring();
        let now = Instant::now();
        let unanswered = e.status().map_or(true, |s| s == 401);
        let down = unanswered && q.down;
        if down {
            // The agent's own calls fail too: every report waits.
            q.failures += 1;
            let d = q.backoff.next_delay();
            q.pause_until = now + d;
            if q.failures == 1 || q.failures % 10 == 0 {
                log::warn!(
                    "control plane unreachable: reports wait (attempt {}), next try in {:.1}s: {e}",
                    q.failures,
                    d.as_secs_f64()
                );
            }
        }
        let Some(n) = q.items.iter().position(|i| i.seq == seq) else {
            return;
        };
        let item = &mut q.items[n];
        item.attempts += 1;
        item.unanswered = unanswered;
        let first = *item.first_failure.get_or_insert(now);
        if !down {
            item.failing_up_since.get_or_insert(now);
        }
        retry_later(item, e, now, !down);
        if item.parked && now.duration_since(first) > PARK_MAX_AGE {
            log::error!(
                "dropping the {} report of task {} after a week of failures: {e}",
                report.body.status,
                report.task_id
            );
            let item = q.items.remove(n);
            let _ = fs::remove_file(&item.path);
        }
    }

    /// Waits until every queued report is delivered, or the deadline passes. Reports that
    /// could not be written are written now, if at all possible, for the next start.
    pub fn wait_empty(&self, deadline: Instant) -> Flushed {
        let empty = || self.queue().items.is_empty();
        if wait::until(&self.changed, Some(deadline), Stop::Never, empty) == Woke::Ready {
            return Flushed::All;
        }
        let mut q = self.queue();
        retry_persist(&mut q, &self.dir);
        Flushed::Left {
            queued: q.items.len(),
            unwritten: q.items.iter().filter(|i| !i.persisted).count(),
        }
    }
}

/// The report to send now: the first of its task (and of its app, for a routing report
/// behind one that has not failed for ROUTE_ORDER_MAX), no report of its task in flight,
/// past its delay (and, while the control plane is down, the pause, one at a time), and,
/// for a final report, written. Else when to look again (None: when something changes).
fn find_due(q: &Queue, now: Instant) -> Result<usize, Option<Instant>> {
    if q.down && !q.in_flight.is_empty() {
        return Err(None);
    }
    let pause = if q.down { q.pause_until } else { now };
    // The first report of each task: the one its later reports wait for.
    let mut firsts: HashMap<&str, &Queued> = HashMap::new();
    let mut routes: HashSet<&str> = HashSet::new();
    let mut wake = None::<Instant>;
    for (n, i) in q.items.iter().enumerate() {
        let task = i.report.task_id.as_str();
        let first = *firsts.entry(task).or_insert(i);
        let first_of_task = first.seq == i.seq;
        let route = i.report.route.as_deref();
        let first_of_app = route.map_or(true, |r| !routes.contains(r));
        // Waiting behind its task's failing report, it holds the app as long as that one.
        if let (Some(r), true) = (route, holds_its_app(first, now)) {
            routes.insert(r);
        }
        if !first_of_task || !first_of_app || q.in_flight.contains(task) {
            continue;
        }
        if !i.persisted && i.report.body.is_final() {
            continue;
        }
        let at = i.not_before.max(pause);
        if at <= now {
            return Ok(n);
        }
        wake = Some(wake.map_or(at, |w| w.min(at)));
    }
    Err(wake)
}

/// Whether a routing report keeps later ones of its app waiting: until it has failed, the
/// control plane up, for ROUTE_ORDER_MAX (a report refused for good must not keep an app on
/// its old port; an outage refuses nothing, after it the order holds again).
fn holds_its_app(i: &Queued, now: Instant) -> bool {
    !i.parked
        && i.failing_up_since
            .map_or(true, |f| now.duration_since(f) < ROUTE_ORDER_MAX)
}

/// A report that failed (refused, or no answer): tried again after a delay growing to
/// RETRY_MAX; failing for longer than PARK_AFTER, parked (tried every PARK_RETRY). Warns at
/// the first failure and every 20th (`warn`: the control plane is not known to be down).
fn retry_later(item: &mut Queued, e: &CpError, now: Instant, warn: bool) {
    let failing_for = item
        .first_failure
        .map_or(Duration::ZERO, |f| now.duration_since(f));
    let what = if item.unanswered {
        "got no answer"
    } else {
        "was refused"
    };
    if failing_for > PARK_AFTER && !item.parked {
        item.parked = true;
        log::error!(
            "parking the {} report of task {} after {}m of failures ({} attempts), other reports go on; retried every {}m; it {what}: {e}",
            item.report.body.status,
            item.report.task_id,
            failing_for.as_secs() / 60,
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
    if warn && !item.parked && (item.attempts == 1 || item.attempts % 20 == 0) {
        // A refused report is also tried at every successful poll (see `reachable`).
        let when = if item.unanswered {
            ""
        } else {
            "at the next poll or "
        };
        log::warn!(
            "the {} report of task {} {what} (attempt {}), retrying {when}in {:.1}s; other reports go on: {e}",
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

/// Writes the reports that could not be written before (quietly: the failure was logged
/// when they were queued).
fn retry_persist(q: &mut Queue, dir: &Path) {
    for i in q.items.iter_mut().filter(|i| !i.persisted) {
        let reserve = dir.join(format!("{}.reserve", i.report.task_id));
        let reserve = Some(reserve.as_path()).filter(|_| i.report.body.is_final());
        i.persisted = write_report(&i.path, &i.report, reserve).is_ok();
        if i.persisted {
            log::info!(
                "the {} report of task {} was written to the outbox after an earlier failure",
                i.report.body.status,
                i.report.task_id
            );
        }
    }
}

/// Writes a report, through `reserve` when given (a final report: space kept at the claim).
fn write_report(path: &Path, report: &Report, reserve: Option<&Path>) -> io::Result<()> {
    let data = serde_json::to_vec(report).unwrap_or_default();
    if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
        files::private_dir(dir)?;
    }
    match reserve {
        Some(r) => write_reserved(r, path, &data),
        None => write_atomic(path, &data),
    }
}

/// The report with its result cut (at a character boundary, [`CUT_MARK`] appended) so that
/// it serializes to at most `max` bytes; None when it fits already or has no result to cut.
fn cut_to_fit(report: &Report, max: usize) -> Option<Report> {
    let json_len = |r: &Report| serde_json::to_vec(r).map_or(usize::MAX, |d| d.len());
    let text = report.body.result.as_deref()?;
    if json_len(report) <= max {
        return None;
    }
    let mut cut = report.clone();
    let mut fits = |keep: usize| {
        cut.body.result = Some(format!("{}{CUT_MARK}", &text[..keep]));
        json_len(&cut) <= max
    };
    // The longest start that fits (escapes make the JSON longer than the text, by how much
    // depends on the text): a binary search, `lo` fitting and `hi` not.
    let (mut lo, mut hi) = (0, text.len());
    if !fits(lo) {
        return None;
    }
    loop {
        let mut mid = lo + (hi - lo) / 2;
        while !text.is_char_boundary(mid) {
            mid -= 1;
        }
        if mid == lo {
            break;
        }
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    fits(lo);
    Some(cut)
}

fn load(path: &Path) -> Result<Queued, Option<String>> {
    let report = files::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Report>(&b).ok());
    let Some(report) = report else {
        log::error!("outbox: dropping unreadable report {}", path.display());
        let _ = fs::remove_file(path);
        return Err(task_of(path));
    };
    Ok(Queued {
        seq: seq_of(path).unwrap_or(0),
        path: path.to_path_buf(),
        report,
        persisted: true,
        attempts: 0,
        first_failure: None,
        failing_up_since: None,
        not_before: Instant::now(),
        parked: false,
        unanswered: false,
        old: true,
    })
}

fn seq_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.split('-').next()?.parse().ok()
}

/// The task of a report file, from its name (`<seq>-<task>.json`).
fn task_of(p: &Path) -> Option<String> {
    let (_, task) = p.file_stem()?.to_str()?.split_once('-')?;
    valid_id(task).then(|| task.to_string())
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

    fn no_answer() -> CpError {
        CpError::Transport {
            url: "u".into(),
            err: ureq::Error::Io(io::Error::from_raw_os_error(libc::ECONNRESET)),
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

    /// A report behind a failing one of its task is never tried: it must not keep the agent
    /// from polling after a restart. A report that got no answer counts as tried too.
    #[test]
    fn settled_once_each_old_task_had_its_first_report_tried() {
        let d = temp_dir("outbox-settled");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        ob.push("b", &Completion::running());
        let ob = Outbox::open(&d).unwrap();
        assert!(!ob.settled());
        let (s, r) = ob.next_due();
        ob.failed(s, &r, &refusal(404));
        assert!(!ob.settled(), "b was not tried");
        ob.unreachable();
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "b");
        ob.failed(s, &r, &no_answer());
        assert!(ob.settled(), "a's final waits behind its running report");
        let _ = fs::remove_dir_all(&d);
    }

    /// A completed deploy report naming host port `p`.
    fn port(p: u16) -> Completion {
        Completion {
            host_port: Some(p),
            ..Completion::completed()
        }
    }

    /// The control plane routes an app by the last deploy report it took: a newer deploy's
    /// report of the same app waits behind a refused older one (also across a restart),
    /// another app's does not, and a report refused for ROUTE_ORDER_MAX stops holding it.
    #[test]
    fn routing_reports_of_an_app_go_out_in_order() {
        let d = temp_dir("outbox-route");
        let ob = Outbox::open(&d).unwrap();
        ob.push_routing("old", &port(1001), "app");
        ob.push_routing("new", &port(1002), "app");
        ob.push_routing("other", &port(2001), "web");
        let ob = Outbox::open(&d).unwrap();
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "old");
        ob.failed(s, &r, &refusal(503));
        // While old waits for its retry, only the other app's report is due.
        let (s, r) = ob.due_at(Instant::now()).unwrap();
        assert_eq!(r.task_id, "other");
        ob.delivered(s, &r, DONE);
        assert!(ob.due_at(Instant::now()).is_none(), "new passed old");
        // Refused for ROUTE_ORDER_MAX: new goes (statuses correct a late old one).
        let Some(long_ago) = Instant::now().checked_sub(ROUTE_ORDER_MAX) else {
            return; // a machine up for less than that
        };
        ob.queue().items[0].failing_up_since = Some(long_ago);
        let (_, r) = ob.due_at(Instant::now()).unwrap();
        assert_eq!(r.task_id, "new");
        let _ = fs::remove_dir_all(&d);
    }

    /// A routing report waiting behind its own task's refused `running` report is never
    /// tried itself: it must not hold a newer deploy's report of its app for longer than
    /// ROUTE_ORDER_MAX either (the task deleted meanwhile: 404 for ever, parked only after
    /// PARK_AFTER).
    #[test]
    fn a_routing_report_stuck_behind_its_own_task_holds_its_app_at_most_route_order_max() {
        let d = temp_dir("outbox-route-stuck");
        let ob = Outbox::open(&d).unwrap();
        ob.push("old", &Completion::running());
        ob.push_routing("old", &port(1001), "app");
        ob.push_routing("new", &port(1002), "app");
        let (s, r) = ob.next_due();
        assert_eq!(
            (r.task_id.as_str(), r.body.status.to_string().as_str()),
            ("old", "running")
        );
        ob.failed(s, &r, &refusal(404));
        assert!(ob.due_at(Instant::now()).is_none(), "new passed old");
        let Some(long_ago) = Instant::now().checked_sub(ROUTE_ORDER_MAX) else {
            return; // a machine up for less than that
        };
        // Old's task has been refused for ROUTE_ORDER_MAX: new goes.
        ob.queue().items[0].failing_up_since = Some(long_ago);
        let (_, r) = ob.due_at(Instant::now()).expect("new is held for ever");
        assert_eq!(r.task_id, "new");
        let _ = fs::remove_dir_all(&d);
    }

    /// Nobody refused a routing report that got no answer while the control plane was down
    /// for longer than ROUTE_ORDER_MAX: once it is back, a newer report of the app must not
    /// go while the older one is being sent (the control plane would route to the port it
    /// takes last).
    #[test]
    fn routing_reports_keep_their_order_after_a_long_outage() {
        let d = temp_dir("outbox-route-outage");
        let ob = Outbox::open(&d).unwrap();
        ob.push_routing("old", &port(1001), "app");
        ob.push_routing("new", &port(1002), "app");
        ob.unreachable();
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "old");
        ob.failed(s, &r, &no_answer());
        let Some(long_ago) = Instant::now().checked_sub(ROUTE_ORDER_MAX) else {
            return; // a machine up for less than that
        };
        // It failed for ROUTE_ORDER_MAX, all but the first time with the outage known.
        let mut q = ob.queue();
        (q.items[0].first_failure, q.items[0].failing_up_since) = (Some(long_ago), Some(long_ago));
        drop(q);
        assert!(ob.reachable(), "the outage ends");
        let (_, r) = ob.due_at(Instant::now()).unwrap();
        assert_eq!(r.task_id, "old");
        let (_s, _r) = ob.next_due();
        assert!(
            ob.due_at(Instant::now()).is_none(),
            "new goes while old is sent"
        );
        let _ = fs::remove_dir_all(&d);
    }

    /// A report that ends an outage ends every report's wait, as a poll would: one whose
    /// try got no answer goes at once, not at its grown delay.
    #[test]
    fn an_outage_ended_by_a_report_sends_the_reports_waiting_at_once() {
        let d = temp_dir("outbox-back-report");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("b", &Completion::running());
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "a");
        ob.failed(s, &r, &no_answer());
        ob.unreachable();
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "b");
        ob.delivered(s, &r, DONE);
        let (_, r) = ob.due_at(Instant::now()).expect("a waits for its delay");
        assert_eq!(r.task_id, "a");
        let _ = fs::remove_dir_all(&d);
    }

    /// An outage ends with whichever call is answered first (a report, a poll, the node's
    /// metrics), and is told once; answers while the control plane is up tell nothing.
    #[test]
    fn the_end_of_an_outage_is_told_whichever_call_shows_it() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::sync::Arc;
        let d = temp_dir("outbox-back");
        let ob = Outbox::open(&d).unwrap();
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        ob.on_outage_end(Box::new(move || {
            t.fetch_add(1, SeqCst);
        }));
        ob.push("a", &Completion::running());
        ob.unreachable();
        let (s, r) = ob.next_due();
        ob.delivered(s, &r, DONE);
        assert_eq!(told.load(SeqCst), 1, "a report ended it");
        assert!(!ob.reachable(), "already over");
        ob.answered();
        assert_eq!(told.load(SeqCst), 1);
        ob.unreachable();
        ob.answered();
        assert_eq!(told.load(SeqCst), 2, "the node's metrics ended it");
        let _ = fs::remove_dir_all(&d);
    }

    /// A failing report (refused, or no answer) is tried again at most RETRY_MAX apart,
    /// holds only its own task's later reports back, and is parked only after PARK_AFTER.
    #[test]
    fn a_failing_report_is_retried_soon_and_parked_only_after_hours() {
        let d = temp_dir("outbox-park");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::failed("x"));
        ob.push("b", &Completion::running());
        let (s, r) = ob.next_due();
        assert_eq!(r.task_id, "a");
        let before = Instant::now();
        ob.failed(s, &r, &refusal(500));
        // a waits for its retry: b goes meanwhile, a's final stays behind a's running report.
        let (s, r) = ob.due_at(before).unwrap();
        assert_eq!(r.task_id, "b");
        ob.delivered(s, &r, DONE);
        for n in 0..40 {
            // Skip the delay, as the clock would.
            ob.queue().items[0].not_before = Instant::now();
            let (s, r) = ob.next_due();
            assert_eq!(r.body.status.as_str(), "running", "a's final passed it");
            let e = match n % 3 {
                0 => refusal(502),
                1 => no_answer(),
                _ => refusal(404),
            };
            ob.failed(s, &r, &e);
            let q = ob.queue();
            assert!(
                !q.items[0].parked,
                "parked after {} attempts",
                q.items[0].attempts
            );
            let wait = q.items[0].not_before - Instant::now();
            assert!(wait <= RETRY_MAX, "waits {wait:?}");
        }
        // Failing for longer than PARK_AFTER (no answer, too): parked, tried every PARK_RETRY.
        let Some(long_ago) = Instant::now().checked_sub(PARK_AFTER + Duration::from_secs(1)) else {
            return; // a machine up for less than PARK_AFTER
        };
        let mut q = ob.queue();
        q.items[0].first_failure = Some(long_ago);
        q.items[0].not_before = Instant::now();
        drop(q);
        let (s, r) = ob.next_due();
        ob.failed(s, &r, &no_answer());
        let q = ob.queue();
        assert!(q.items[0].parked);
        assert!(q.items[0].not_before > Instant::now() + PARK_RETRY - Duration::from_secs(5));
        drop(q);
        let _ = fs::remove_dir_all(&d);
    }

    /// A report that gets no answer while the agent's own calls are answered waits alone, on
    /// its own growing delay: other tasks' reports go on, and an answered poll does not make
    /// it due again (it would be retried at every poll).
    #[test]
    fn a_report_without_answer_waits_alone_and_polls_do_not_hammer_it() {
        let d = temp_dir("outbox-unanswered");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("b", &Completion::running());
        let mut delays = Vec::new();
        for _ in 0..3 {
            ob.queue().items[0].not_before = Instant::now();
            let (s, r) = ob.next_due();
            assert_eq!(r.task_id, "a");
            let before = Instant::now();
            ob.failed(s, &r, &no_answer());
            let slack = before.elapsed();
            ob.reachable();
            let q = ob.queue();
            assert!(!q.down && q.pause_until <= Instant::now(), "all wait");
            delays.push((q.items[0].not_before.duration_since(before), slack));
            drop(q);
            let (_, r) = ob.due_at(before).expect("nothing due");
            assert_eq!(r.task_id, "b", "a is due again");
        }
        // 1 s, 2 s, 4 s from the failure (measured from just before it).
        for ((d, slack), want) in delays.iter().zip([1, 2, 4]) {
            let want = Duration::from_secs(want);
            assert!(*d >= want && *d <= want + *slack, "{delays:?}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    /// While the control plane is down (the agent's own calls fail too) reports wait for a
    /// pause that grows, one report probing at a time; once a call is answered they all go
    /// at once, whatever their delays. Asserted on counts, not on jittered delays.
    #[test]
    fn reachable_after_an_outage_resets_the_backoff_of_waiting_reports() {
        let d = temp_dir("outbox-reach");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("b", &Completion::running());
        ob.unreachable();
        for n in 1..=20 {
            // Skip the pause and the delays, as the clock would.
            let (mut q, now) = (ob.queue(), Instant::now());
            q.pause_until = now;
            q.items.iter_mut().for_each(|i| i.not_before = now);
            drop(q);
            let (s, r) = ob.next_due_now().unwrap();
            ob.queue().in_flight.insert(r.task_id.clone());
            assert!(ob.next_due_now().is_none(), "two probes at once");
            let before = Instant::now();
            ob.failed(s, &r, &no_answer());
            let q = ob.queue();
            assert_eq!(q.failures, n);
            assert!(q.pause_until > before, "no pause");
            assert!(
                find_due(&q, before).is_err(),
                "a report went during the pause"
            );
        }
        ob.reachable();
        let q = ob.queue();
        assert_eq!(q.failures, 0);
        assert!(!q.down);
        assert!(q.items.iter().all(|i| i.not_before <= Instant::now()));
        drop(q);
        assert!(ob.next_due_now().is_some());
        let _ = fs::remove_dir_all(&d);
    }

    /// Senders take reports of different tasks at once, never two of one task.
    #[test]
    fn a_task_in_flight_gives_its_next_report_to_nobody() {
        let d = temp_dir("outbox-flight");
        let ob = Outbox::open(&d).unwrap();
        ob.push("a", &Completion::running());
        ob.push("a", &Completion::completed());
        ob.push("b", &Completion::running());
        let (sa, ra) = ob.next_due();
        let (sb, rb) = ob.next_due();
        assert_eq!((ra.task_id.as_str(), rb.task_id.as_str()), ("a", "b"));
        assert!(
            ob.next_due_now().is_none(),
            "a's final went beside its running report"
        );
        ob.delivered(sb, &rb, DONE);
        ob.delivered(sa, &ra, DONE);
        let (_, r) = ob.next_due_now().unwrap();
        assert_eq!(
            (r.task_id.as_str(), r.body.status.as_str()),
            ("a", "completed")
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_final_delivered_before_the_journal_said_done_leaves_a_tombstone() {
        let d = temp_dir("outbox-tomb");
        let ob = Outbox::open(&d).unwrap();
        ob.push("t", &Completion::completed());
        let (s, r) = ob.next_due();
        ob.delivered(s, &r, &|_| false);
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
    /// written is not sent (a restart would not know it was).
    #[test]
    fn a_final_report_uses_its_reserve_and_goes_out_only_once_written() {
        let d = temp_dir("outbox-reserve");
        let ob = Outbox::open(&d).unwrap();
        ob.reserve("t").unwrap();
        let reserve = d.join("state/outbox/t.reserve");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE as u64);
        assert!(ob.push("t", &Completion::completed()));
        assert!(!reserve.exists(), "the reserve was not used");
        assert!(ob.queue().items[0].persisted);
        // As if it could not be written: not due, whatever the journal says.
        ob.queue().items[0].persisted = false;
        assert!(ob.next_due_now().is_none());
        ob.queue().next_persist = Instant::now();
        let (_, r) = ob.next_due();
        assert_eq!(r.task_id, "t", "written again and sent");
        ob.release_reserves();
        let _ = fs::remove_dir_all(&d);
    }

    /// A result too big for the reserve is cut to fit it: same status, the text's start (at
    /// a character boundary, escapes counted), and a marker saying why.
    #[test]
    fn a_report_too_big_for_its_reserve_is_cut_to_fit() {
        let text = "a \"quoted\" é line\n".repeat(70_000);
        let r = Report {
            task_id: "t".into(),
            body: Completion::completed_with(&text),
            route: None,
        };
        let cut = cut_to_fit(&r, RESERVE).unwrap();
        let len = serde_json::to_vec(&cut).unwrap().len();
        assert!(len <= RESERVE && len > RESERVE - 1024, "{len}");
        assert_eq!(cut.body.status, r.body.status);
        let result = cut.body.result.unwrap();
        let kept = result.strip_suffix(CUT_MARK).unwrap();
        assert!(text.starts_with(kept));
        let small = Report {
            task_id: "t".into(),
            body: Completion::failed("short"),
            route: None,
        };
        assert!(cut_to_fit(&small, RESERVE).is_none());
    }

    /// An unreadable report file (cut short by a crash) becomes a `failed` report of its
    /// task, named by the file, unless a final report of that task is still queued.
    #[test]
    fn an_unreadable_report_is_replaced_by_a_failed_report_of_its_task() {
        let d = temp_dir("outbox-unreadable");
        let dir = d.join("state/outbox");
        fs::create_dir_all(&dir).unwrap();
        let good = |seq: u64, task: &str, body: &str| {
            let r = format!(r#"{{"task_id":"{task}","body":{body}}}"#);
            fs::write(dir.join(format!("{seq:020}-{task}.json")), r).unwrap();
        };
        fs::write(dir.join(format!("{:020}-t1.json", 1)), "").unwrap();
        fs::write(dir.join(format!("{:020}-t2.json", 2)), r#"{"task_id":"#).unwrap();
        good(3, "t2", r#"{"status":"completed"}"#);
        fs::write(dir.join(format!("{:020}-t 3.json", 4)), "").unwrap();
        let ob = Outbox::open(&d).unwrap();
        let want =
            [("t2", "completed"), ("t1", "failed")].map(|(a, b)| (a.to_string(), b.to_string()));
        assert_eq!(statuses(&ob), want);
        let q = ob.queue();
        assert_eq!(q.items[1].report.body.result.as_deref(), Some(UNREADABLE));
        assert!(q.items[1].persisted && q.items[1].seq == 5);
        drop(q);
        let _ = fs::remove_dir_all(&d);
    }

    impl Outbox {
        /// The due report, without waiting, writing or taking it.
        fn next_due_now(&self) -> Option<(u64, Report)> {
            self.due_at(Instant::now())
        }

        /// The report due at `t`.
        fn due_at(&self, t: Instant) -> Option<(u64, Report)> {
            let q = self.queue();
            let i = find_due(&q, t).ok()?;
            Some((q.items[i].seq, q.items[i].report.clone()))
        }
    }
}
