//! Ships a task's output to `POST /api/deployments/{id}/logs`, losslessly at any rate.
//! Lines are batched (joined with `\n`; the server appends `line + "\n"`, so the stored log is
//! byte-identical to one request per line), from a thread of its own so shipping never
//! slows the task. A line printed by a quiet task goes out within LINGER; while a request is
//! under way the next batch grows with the backlog, its JSON body (escapes included) at most
//! 1 MiB, nginx's default `client_max_body_size` (today's server appends each request to a
//! text column, so fewer, larger requests are also what it handles best). When the control
//! plane is slower than the task, the backlog beyond 8 MiB of memory spills to a private
//! per-task file under DATA_DIR, bounded by LOG_SPILL_MAX; beyond it, or when the spill cannot
//! be written, lines are counted and one explicit marker says how many were dropped. Closing
//! drains what is left while the control plane takes it. As soon as a request after close
//! fails, or nothing was taken for CLOSE_STALL (15 s: no request outlives that), the rest
//! (the batch in flight, the spill, memory, a pending marker, in order) is handed to the
//! durable late-log queue ([`crate::cp::latelog`]) and close returns: a log outage holds
//! neither the final report nor loses a line. A cancel (second SIGTERM) hands off at once.
//! While the late-log queue holds lines of the deployment, new batches go there too, so its
//! log stays in order. The March 2026 server has no such route (chi's plain `404 page not
//! found`): shipping stops for that task, its lines are discarded. Any other 404 is retried
//! like a 5xx.

use crate::cp::client::{Backoff, Client, CpError, REQUEST_TIMEOUT};
use crate::cp::files;
use crate::cp::latelog::LateLogs;
use crate::cp::logbody::{fit, lines_in, BODY_MAX, LINE_MAX};
use crate::sys::signal;
use crate::sys::wait::{self, Bell, Check, Stop};
use crate::task::clean_text;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request is sent at once when this much waits.
const BATCH_MIN: usize = 64 * 1024;
/// How long a line into an idle shipper waits for company before it goes out.
const LINGER: Duration = Duration::from_millis(50);
/// Backlog kept in memory; beyond it, the spill file.
const MEM_CAP: usize = 8 << 20;
/// Closing hands off once the control plane has taken no batch for this long.
const CLOSE_STALL: Duration = Duration::from_secs(15);
/// How long closing waits past the hand-off time for the thread to notice it.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Where a shipper keeps its backlog and how much of it may wait on disk.
#[derive(Clone, Debug)]
pub struct Spill {
    pub path: PathBuf,
    pub max_bytes: u64,
}

/// Older lines on disk: bytes `[read, flushed)` of the file and then `buf` (not yet written
/// out) are the undelivered part.
struct SpillFile {
    file: File,
    buf: Vec<u8>,
    flushed: u64,
    read: u64,
    /// Lines written (file and buf) and delivered, to count what a failed read loses.
    lines: u64,
    lines_read: u64,
}

impl SpillFile {
    fn waiting(&self) -> u64 {
        self.flushed + self.buf.len() as u64 - self.read
    }

    /// Writes `buf` out; a partial write is cut off again, so the file holds whole lines.
    fn flush(&mut self) -> std::io::Result<()> {
        if let Err(e) = self.file.write_all_at(&self.buf, self.flushed) {
            let _ = self.file.set_len(self.flushed);
            return Err(e);
        }
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Why lines were dropped since the last marker.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Refusal {
    /// LOG_SPILL_MAX waited on disk.
    Full,
    /// The spill could not be written or read (an unwritable dir, a full disk).
    Failed,
}

struct Buf {
    /// The newest lines, each followed by '\n' (empty while the spill file is in use).
    mem: String,
    /// A batch taken from memory and not delivered yet (older than everything else).
    inflight: Option<String>,
    spill: Option<SpillFile>,
    conf: Spill,
    /// Lines refused since the last marker, and why.
    dropped: u64,
    refusal: Refusal,
    /// The spill failed: lines beyond memory are dropped until the backlog has drained.
    broken: bool,
    /// The last spill error, for the marker.
    spill_error: String,
    warned: bool,
    /// When the oldest waiting line arrived (None: nothing waits).
    since: Option<Instant>,
    /// The shipper thread sleeps until a line or close wakes it.
    idle: bool,
    closed_at: Option<Instant>,
    /// When the control plane last took a batch.
    last_ok: Instant,
    /// The route does not exist (March 2026): everything is discarded.
    gone: bool,
    /// Closing handed the backlog to the late-log queue: the thread must not touch it.
    handed_off: bool,
    /// The shipper thread has ended.
    done: bool,
}

impl Buf {
    fn new(conf: Spill) -> Buf {
        Buf {
            mem: String::new(),
            inflight: None,
            spill: None,
            conf,
            dropped: 0,
            refusal: Refusal::Full,
            broken: false,
            spill_error: String::new(),
            warned: false,
            since: None,
            idle: false,
            closed_at: None,
            last_ok: Instant::now(),
            gone: false,
            handed_off: false,
            done: false,
        }
    }

    fn backlog(&self) -> usize {
        self.mem.len() + self.spill.as_ref().map_or(0, |s| s.waiting() as usize)
    }

    fn push(&mut self, line: &str) {
        self.flush_marker();
        match self.refusal_of(line.len()) {
            None => self.append(line),
            Some(r) => {
                self.dropped += 1;
                self.refusal = r;
            }
        }
    }

    /// Says, in line order, how many lines were dropped and why, once there is room.
    fn flush_marker(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let marker = self.marker();
        if self.refusal_of(marker.len()).is_none() {
            self.dropped = 0;
            self.append(&marker);
        }
    }

    fn marker(&self) -> String {
        let n = self.dropped;
        match &self.refusal {
            Refusal::Full => format!(
                "[muvee-agent: {n} log lines dropped: more than LOG_SPILL_MAX ({} bytes) waited for the control plane]",
                self.conf.max_bytes
            ),
            Refusal::Failed => format!(
                "[muvee-agent: {n} log lines dropped: the log spill {} failed ({}) while more than {MEM_CAP} bytes waited for the control plane]",
                self.conf.path.display(),
                self.spill_error
            ),
        }
    }

    /// None when a line of `len` bytes can wait: in memory below MEM_CAP, else in the
    /// spill (started here) below LOG_SPILL_MAX.
    fn refusal_of(&mut self, len: usize) -> Option<Refusal> {
        let need = len as u64 + 1;
        if self.spill.is_none() {
            if self.mem.len() as u64 + need <= MEM_CAP as u64 {
                return None;
            }
            if self.broken || !self.start_spill() {
                return Some(Refusal::Failed);
            }
        }
        match &self.spill {
            _ if self.broken => Some(Refusal::Failed),
            Some(s) if s.waiting() + need > self.conf.max_bytes => Some(Refusal::Full),
            _ => None,
        }
    }

    fn append(&mut self, line: &str) {
        let Some(s) = &mut self.spill else {
            self.mem.push_str(line);
            self.mem.push('\n');
            return;
        };
        s.buf.extend_from_slice(line.as_bytes());
        s.buf.push(b'\n');
        s.lines += 1;
        if s.buf.len() >= BATCH_MIN {
            if let Err(e) = s.flush() {
                self.spill_failed(e);
            }
        }
    }

    /// Moves the in-memory backlog to a fresh spill file (in order: it is older). False,
    /// with the spill marked broken, when it cannot be written.
    fn start_spill(&mut self) -> bool {
        let path = &self.conf.path;
        // A private dir (whatever the umask), and a fresh 0600 file never opened through a
        // symlink.
        let opened = files::private_dir(path.parent().unwrap_or(path)).and_then(|()| {
            let f = files::create_private(path)?;
            f.write_all_at(self.mem.as_bytes(), 0)?;
            Ok(f)
        });
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                self.unwritable(&e);
                return false;
            }
        };
        let mem = std::mem::take(&mut self.mem);
        self.spill = Some(SpillFile {
            file,
            buf: Vec::new(),
            flushed: mem.len() as u64,
            read: 0,
            lines: lines_in(mem.as_bytes()),
            lines_read: 0,
        });
        true
    }

    /// A write to the spill failed: the lines it held are counted as dropped.
    fn spill_failed(&mut self, e: std::io::Error) {
        if let Some(s) = &mut self.spill {
            let lost = lines_in(&s.buf);
            s.lines -= lost;
            s.buf.clear();
            self.dropped += lost;
        }
        self.unwritable(&e);
    }

    /// From now until the backlog has drained, lines beyond memory are counted, not kept.
    /// Warned once per task: a warning per line would fill the agent's own log.
    fn unwritable(&mut self, e: &std::io::Error) {
        self.broken = true;
        self.spill_error = e.to_string();
        if !std::mem::replace(&mut self.warned, true) {
            log::warn!(
                "cannot write the log spill {}: {e}; log lines beyond {MEM_CAP} bytes are dropped and counted until the control plane catches up",
                self.conf.path.display()
            );
        }
    }

    fn end_spill(&mut self) {
        if self.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.conf.path);
        }
        self.broken = false;
    }

    /// The next batch: the oldest waiting lines, whole, in a body of at most BODY_MAX. A
    /// batch from the spill is only consumed by `delivered`.
    fn next_batch(&mut self) -> Option<Batch> {
        if let Some(s) = &mut self.spill {
            if s.read == s.flushed && !s.buf.is_empty() {
                if let Err(e) = s.flush() {
                    self.spill_failed(e);
                }
            }
        }
        if let Some(s) = &mut self.spill {
            if s.read < s.flushed {
                match read_spill(s) {
                    Ok(text) => return Some(Batch::Disk(text)),
                    Err(e) => {
                        self.dropped += s.lines - s.lines_read;
                        self.unwritable(&e);
                    }
                }
            }
            self.end_spill();
        }
        if self.mem.is_empty() {
            self.broken = false;
            return None;
        }
        let bytes = self.mem.as_bytes();
        let cut = match fit(&bytes[..bytes.len().min(BODY_MAX)]) {
            0 => memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1),
            cut => cut,
        };
        let rest = self.mem.split_off(cut);
        let text = std::mem::replace(&mut self.mem, rest);
        self.inflight = Some(text.clone());
        Some(Batch::Mem(text))
    }

    fn delivered(&mut self, batch: &Batch) {
        self.last_ok = Instant::now();
        match (batch, &mut self.spill) {
            (Batch::Disk(text), Some(s)) => {
                s.read += text.len() as u64;
                s.lines_read += batch.lines();
            }
            (Batch::Mem(_), _) => self.inflight = None,
            _ => {}
        }
    }

    fn discard(&mut self) {
        self.mem = String::new();
        self.inflight = None;
        self.end_spill();
    }

    /// Moves the whole backlog, oldest first, to the late-log queue: the batch in flight,
    /// the spill's undelivered part, memory, then the marker of lines dropped meanwhile.
    /// Returns how many lines it held.
    fn hand_off(&mut self, late: &LateLogs, deployment_id: &str) -> u64 {
        if let Some(s) = &mut self.spill {
            if let Err(e) = s.flush() {
                self.spill_failed(e);
            }
        }
        let Some(mut h) = late.hand_off(deployment_id) else {
            self.discard();
            return 0;
        };
        let mut n = 0;
        if let Some(text) = self.inflight.take() {
            n += lines_in(text.as_bytes());
            h.lines(text.as_bytes());
        }
        if let Some(s) = self.spill.take() {
            let lines = s.lines - s.lines_read;
            n += lines;
            drop(s.file);
            h.spill(&self.conf.path, s.read, lines);
        }
        self.broken = false;
        let mem = std::mem::take(&mut self.mem);
        n += lines_in(mem.as_bytes());
        h.lines(mem.as_bytes());
        if self.dropped > 0 {
            h.marker(self.dropped, &self.marker());
            self.dropped = 0;
        }
        n
    }

    /// When a closing shipper hands off: CLOSE_STALL after close or the last batch taken.
    fn hand_off_at(&self) -> Option<Instant> {
        self.closed_at.map(|c| c.max(self.last_ok) + CLOSE_STALL)
    }

    /// How long the next request may take: once closed, none runs past the give-up time.
    fn request_timeout(&self) -> Duration {
        let left = self.hand_off_at().map_or(REQUEST_TIMEOUT, |t| {
            t.saturating_duration_since(Instant::now())
        });
        left.clamp(Duration::from_millis(1), REQUEST_TIMEOUT)
    }
}

enum Batch {
    Mem(String),
    Disk(String),
}

impl Batch {
    /// The request text: lines joined by '\n' (the server adds the last one).
    fn text(&self) -> &str {
        let (Batch::Mem(t) | Batch::Disk(t)) = self;
        t.strip_suffix('\n').unwrap_or(t)
    }
    fn lines(&self) -> u64 {
        let (Batch::Mem(t) | Batch::Disk(t)) = self;
        lines_in(t.as_bytes())
    }
}

/// The oldest lines of the spill that fit one body.
fn read_spill(s: &mut SpillFile) -> std::io::Result<String> {
    let want = (s.flushed - s.read).min(BODY_MAX as u64) as usize;
    let mut buf = vec![0u8; want];
    s.file.read_exact_at(&mut buf, s.read)?;
    buf.truncate(fit(&buf));
    match String::from_utf8(buf) {
        Ok(text) if !text.is_empty() => Ok(text),
        _ => Err(std::io::Error::other("the spill file is corrupt")),
    }
}

/// The backlog, and its own bell: rung by a line for an idle thread and by close.
type Shared = Arc<(Mutex<Buf>, Bell)>;

fn lock(m: &Mutex<Buf>) -> MutexGuard<'_, Buf> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct LogShipper {
    shared: Shared,
    handle: Option<JoinHandle<()>>,
    /// Rung by a signal and when the thread ends: closing waits on it.
    bell: Arc<Bell>,
    late: Arc<LateLogs>,
    deployment_id: String,
}

impl LogShipper {
    pub fn start(
        client: Client,
        deployment_id: String,
        spill: Spill,
        bell: Arc<Bell>,
        late: Arc<LateLogs>,
    ) -> LogShipper {
        let shared: Shared = Arc::new((Mutex::new(Buf::new(spill)), Bell::default()));
        let (s2, b2, l2) = (shared.clone(), bell.clone(), late.clone());
        let id = deployment_id.clone();
        let handle = std::thread::Builder::new()
            .name("logship".into())
            .spawn(move || {
                let _done = Done(&s2, &b2);
                ship(&client, &id, &s2, &l2)
            })
            .ok();
        LogShipper {
            shared,
            handle,
            bell,
            late,
            deployment_id,
        }
    }

    /// Queues one line (already scrubbed). Never blocks on the network.
    pub fn line(&self, line: &str) {
        let line = clean_text(line);
        let (m, ready) = &*self.shared;
        let mut b = lock(m);
        if b.gone {
            return;
        }
        let was_empty = b.backlog() == 0;
        let mut rest = line.as_ref();
        while rest.len() > LINE_MAX {
            let mut end = LINE_MAX;
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            b.push(&rest[..end]);
            rest = &rest[end..];
        }
        b.push(rest);
        if b.since.is_none() {
            b.since = Some(Instant::now());
        }
        // Wake the thread only when it sleeps without a timeout, or a batch is full.
        if b.idle && (was_empty || b.backlog() >= BATCH_MIN) {
            b.idle = false;
            ready.ring();
        }
    }

    /// Drains what is queued while the control plane takes it, hands the rest to the
    /// late-log queue, and stops the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let (m, ready) = &*self.shared;
        lock(m).closed_at.get_or_insert_with(Instant::now);
        ready.ring();
        // The thread hands off by itself once a request fails or it stalled, and no request
        // runs past that time; never wait longer (but for a moment to see it end), whatever
        // the thread does. A cancel stops the wait at once.
        let canceled = || signal::cancel_requested();
        loop {
            let (done, limit) = {
                let b = lock(m);
                (b.done, b.hand_off_at().map(|t| t + STOP_GRACE))
            };
            if done || canceled() || limit.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            wait::until(&self.bell, limit, Stop::Cancel, || lock(m).done);
        }
        let mut b = lock(m);
        if b.done {
            b.discard();
            drop(b);
            let _ = handle.join();
            return;
        }
        // Left behind: its request's outcome is ignored (the batch is handed off with the
        // rest: sent twice at worst, never lost).
        let n = b.hand_off(&self.late, &self.deployment_id);
        b.handed_off = true;
        let why = if canceled() {
            "canceled"
        } else {
            "the log shipper did not stop in time"
        };
        log::info!(
            "{why}: {n} log lines of deployment {} handed to the late-log queue",
            self.deployment_id
        );
    }
}

impl Drop for LogShipper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Marks the shipper thread ended, however it ends.
struct Done<'a>(&'a Shared, &'a Bell);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        lock(&self.0 .0).done = true;
        self.1.ring();
    }
}

fn ship(client: &Client, deployment_id: &str, shared: &Shared, late: &LateLogs) {
    let (m, _) = &**shared;
    loop {
        let Some(batch) = wait_batch(shared) else {
            return;
        };
        // Behind lines of this deployment that wait in the late-log queue: after them.
        let sent = if late.holds(deployment_id) {
            Sent::Behind
        } else {
            send(client, deployment_id, batch.text(), shared)
        };
        let mut b = lock(m);
        if b.handed_off {
            return;
        }
        match sent {
            Sent::Ok => b.delivered(&batch),
            Sent::Behind => {
                b.hand_off(late, deployment_id);
            }
            Sent::Left => return,
            Sent::Gone => {
                log::info!("control plane has no log route (404, March 2026 server): not shipping logs for deployment {deployment_id}");
                b.gone = true;
                b.discard();
                return;
            }
            Sent::HandOff(e) => {
                let n = b.hand_off(late, deployment_id);
                log::warn!(
                    "log lines of deployment {deployment_id} not taken after the task ended ({e}): {n} handed to the late-log queue"
                );
                return;
            }
        }
    }
}

/// Waits until a batch is due: a full one, the oldest line LINGER old, or close. None once
/// closed and drained, or handed off. Sleeps without a timeout while nothing waits.
fn wait_batch(shared: &Shared) -> Option<Batch> {
    let (m, ready) = &**shared;
    wait::next_ready(ready, || next_batch(&mut lock(m)))
}

/// The batch that is due, None once closed and drained, else how long to sleep (marked
/// idle: the next line rings).
fn next_batch(b: &mut Buf) -> Check<Option<Batch>> {
    b.idle = false;
    loop {
        if b.handed_off {
            return Check::Ready(None);
        }
        let backlog = b.backlog();
        if backlog == 0 {
            b.since = None;
        }
        let lingered = b.since.map(|t| t + LINGER);
        let closed = b.closed_at.is_some();
        let due = closed || backlog >= BATCH_MIN || lingered.is_some_and(|t| Instant::now() >= t);
        if due && backlog > 0 {
            match b.next_batch() {
                Some(batch) => return Check::Ready(Some(batch)),
                None => continue, // the spill failed: its lines are counted
            }
        }
        if closed {
            if b.dropped > 0 {
                // Drained: the marker goes last whatever the limits.
                let marker = b.marker();
                b.dropped = 0;
                b.end_spill();
                b.append(&marker);
                continue;
            }
            return Check::Ready(None);
        }
        b.idle = true;
        return Check::Sleep(lingered);
    }
}

enum Sent {
    Ok,
    /// Lines of the deployment wait in the late-log queue: this batch goes after them.
    Behind,
    Gone,
    /// Closed, and the request failed or the control plane stalled.
    HandOff(CpError),
    /// Closing handed the backlog off meanwhile (a cancel).
    Left,
}

/// One batch, retried with backoff until it is delivered, or closed and not taken (read
/// again on every retry: close may come while the route fails).
fn send(client: &Client, deployment_id: &str, text: &str, shared: &Shared) -> Sent {
    let (m, ready) = &**shared;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let (timeout, left) = {
            let b = lock(m);
            (b.request_timeout(), b.handed_off)
        };
        if left {
            return Sent::Left;
        }
        let e = match client.append_log(deployment_id, text, timeout) {
            Ok(()) => return Sent::Ok,
            Err(e) if e.is_missing_route() => return Sent::Gone,
            Err(e) => e,
        };
        let until = {
            let b = lock(m);
            if b.closed_at.is_some() {
                return Sent::HandOff(e);
            }
            Instant::now() + backoff.next_delay()
        };
        log::debug!("log shipping for deployment {deployment_id} failed, retrying: {e}");
        // Until the retry; close ends the wait (one more try, then the hand-off).
        let closing = || lock(m).closed_at.is_some();
        wait::until(ready, Some(until), Stop::Never, closing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(name: &str, max: u64) -> Buf {
        let path = crate::sys::fake::temp_dir(name).join("spill");
        Buf::new(Spill {
            path,
            max_bytes: max,
        })
    }

    /// Takes every batch, as the shipper would on success; each body fits BODY_MAX.
    fn drain(b: &mut Buf) -> String {
        let mut all = String::new();
        while let Some(batch) = b.next_batch() {
            let body = serde_json::to_vec(&serde_json::json!({ "line": batch.text() })).unwrap();
            assert!(body.len() <= BODY_MAX, "a body of {} bytes", body.len());
            let (Batch::Mem(t) | Batch::Disk(t)) = &batch;
            assert!(t.ends_with('\n'));
            all.push_str(t);
            b.delivered(&batch);
        }
        all
    }

    #[test]
    fn a_backlog_beyond_memory_spills_privately_and_drains_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let mut b = buf("order", 64 << 20);
        let mut want = String::new();
        for i in 0..400_000 {
            let l = format!("line {i} of the build");
            b.push(&l);
            want.push_str(&l);
            want.push('\n');
        }
        assert!(b.spill.is_some() && b.mem.is_empty(), "no spill");
        let mode = std::fs::metadata(&b.conf.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        b.push("after");
        want.push_str("after\n");
        assert_eq!(drain(&mut b), want);
        assert!(!b.conf.path.exists(), "spill left behind");
        // Back to memory once drained.
        b.push("later");
        assert_eq!(b.mem, "later\n");
    }

    #[test]
    fn past_the_spill_limit_one_marker_counts_the_dropped_lines() {
        let mut b = buf("cap", 1 << 20);
        let line = "x".repeat(99);
        for _ in 0..100_000 {
            b.push(&line); // 10 MB: 8 MiB in memory, then 1 MiB on disk, then dropped
        }
        let dropped = b.dropped;
        assert!(dropped > 0);
        let head = drain(&mut b);
        b.flush_marker();
        let rest = drain(&mut b);
        let marker = format!("[muvee-agent: {dropped} log lines dropped: more than LOG_SPILL_MAX (1048576 bytes) waited for the control plane]\n");
        assert_eq!(rest, marker);
        assert_eq!(head.lines().count() as u64 + dropped, 100_000);
    }

    /// A hand-off keeps line order: the batch in flight, the spill from where it was read,
    /// the lines pushed since, then the marker of lines dropped.
    #[test]
    fn a_hand_off_keeps_every_line_in_order() {
        let mut b = buf("handoff", 64 << 20);
        let late = LateLogs::open(b.conf.path.with_file_name("late-logs"), 1 << 30);
        let mut want = String::new();
        let mut push = |b: &mut Buf, from: usize, to: usize| {
            for i in from..to {
                let l = format!("line {i} of the build");
                b.push(&l);
                want.push_str(&l);
                want.push('\n');
            }
        };
        push(&mut b, 0, 10);
        let first = b.next_batch().unwrap(); // in flight
        push(&mut b, 10, 450_000);
        assert!(b.spill.is_some(), "no spill");
        let disk = b.next_batch().unwrap();
        b.delivered(&disk); // the control plane took the spill's first batch
        let (Batch::Mem(a) | Batch::Disk(a)) = &first;
        let (Batch::Disk(d) | Batch::Mem(d)) = &disk;
        let want = format!("{a}{}", &want[a.len() + d.len()..]);
        b.dropped = 3;
        b.hand_off(&late, "dep-1");
        assert!(!b.conf.path.exists() && b.backlog() == 0 && b.inflight.is_none());
        let got = crate::cp::latelog::tests::drain(&late);
        let marker = "[muvee-agent: 3 log lines dropped: more than LOG_SPILL_MAX";
        assert!(got.starts_with(&want), "lines lost or out of order");
        assert!(
            got[want.len()..].starts_with(marker),
            "{}",
            &got[want.len()..]
        );
    }

    #[test]
    fn a_body_never_exceeds_1_mib_once_escaped() {
        // Quotes and backslashes take 2 bytes in JSON, other control characters 6.
        let mut b = buf("escaped", 64 << 20);
        let mut want = String::new();
        for i in 0..40_000 {
            let l = match i % 3 {
                0 => "\"".repeat(300),
                1 => "\\".repeat(300),
                _ => "\x1b".repeat(200),
            };
            b.push(&l);
            want.push_str(&l);
            want.push('\n');
        }
        assert!(b.spill.is_some(), "the disk path is tried too");
        assert_eq!(drain(&mut b), want);
    }

    #[test]
    fn an_unwritable_spill_counts_dropped_lines_in_bounded_memory() {
        let dir = crate::sys::fake::temp_dir("unwritable");
        std::fs::write(dir.join("logs"), "a file where the spill dir should be").unwrap();
        let mut b = Buf::new(Spill {
            path: dir.join("logs/t1.spill"),
            max_bytes: 256 << 20,
        });
        let line = "y".repeat(99);
        for _ in 0..120_000 {
            b.push(&line); // 12 MB
        }
        assert!(b.mem.len() <= MEM_CAP && b.spill.is_none());
        assert!(b.warned && b.dropped > 0);
        let dropped = b.dropped;
        let head = drain(&mut b);
        assert_eq!(head.lines().count() as u64 + dropped, 120_000);
        b.push("after");
        let rest = drain(&mut b);
        assert!(
            rest.starts_with(&format!(
                "[muvee-agent: {dropped} log lines dropped: the log spill "
            )) && rest.ends_with("]\nafter\n"),
            "{rest}"
        );
    }
}
