//! Ships a task's output to `POST /api/deployments/{id}/logs`, losslessly at any rate.
//! Lines are batched (joined with `\n`; the server appends `line + "\n"`, so the stored log is
//! byte-identical to one request per line), from a thread of its own so shipping never
//! slows the task. A batch grows with the backlog up to 1 MiB (today's server appends each
//! request to a text column, so fewer, larger requests are also what it handles best). When
//! the control plane is slower than the task, the backlog beyond 8 MiB of memory spills to a
//! per-task file under DATA_DIR, bounded by LOG_SPILL_MAX; beyond it one explicit marker says
//! how many lines were dropped. Closing drains what is left (bounded wait) and removes the
//! spill. The March 2026 server has no such route (404): shipping stops for that task.

use crate::cp::client::{Backoff, Client, CpError};
use crate::task::clean_text;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request is sent once this much waits, or at the flush tick.
const BATCH_MIN: usize = 64 * 1024;
const BATCH_MAX: usize = 1 << 20;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Backlog kept in memory; beyond it, the spill file.
const MEM_CAP: usize = 8 << 20;
/// How long closing waits for the backlog to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(60);

/// Where a shipper keeps its backlog and how much of it may wait on disk.
#[derive(Clone, Debug)]
pub struct Spill {
    pub path: PathBuf,
    pub max_bytes: u64,
}

/// Older lines on disk: `[read, written)` is the undelivered part (`buf` is its end, not
/// yet written out).
struct SpillFile {
    file: File,
    buf: Vec<u8>,
    written: u64,
    read: u64,
}

impl SpillFile {
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.seek(SeekFrom::End(0))?;
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

struct Buf {
    /// The newest lines, each followed by '\n' (empty while the spill file is in use).
    mem: String,
    spill: Option<SpillFile>,
    conf: Spill,
    /// Lines refused since the last marker (the spill was full).
    dropped: u64,
    closed: bool,
    /// The route does not exist (March 2026): everything is discarded.
    gone: bool,
}

impl Buf {
    fn backlog(&self) -> usize {
        let disk = self.spill.as_ref().map_or(0, |s| s.written - s.read);
        self.mem.len() + disk as usize
    }

    fn push(&mut self, line: &str) {
        self.flush_marker();
        if self.spill_full(line.len()) {
            self.dropped += 1;
            return;
        }
        self.append(line);
    }

    /// Says, in line order, how many lines the full spill refused, once there is room.
    fn flush_marker(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let marker = self.marker();
        if !self.spill_full(marker.len()) {
            self.dropped = 0;
            self.append(&marker);
        }
    }

    fn marker(&self) -> String {
        format!(
            "[muvee-agent: {} log lines dropped: more than LOG_SPILL_MAX ({} bytes) waited for the control plane]",
            self.dropped, self.conf.max_bytes
        )
    }

    fn spill_full(&self, extra: usize) -> bool {
        let disk = self.spill.as_ref().map_or(0, |s| s.written - s.read);
        self.spill.is_some() && disk + extra as u64 + 1 > self.conf.max_bytes
    }

    fn append(&mut self, line: &str) {
        if self.spill.is_none() && self.mem.len() + line.len() + 1 > MEM_CAP {
            self.start_spill();
        }
        let Some(s) = &mut self.spill else {
            self.mem.push_str(line);
            self.mem.push('\n');
            return;
        };
        s.buf.extend_from_slice(line.as_bytes());
        s.buf.push(b'\n');
        s.written += line.len() as u64 + 1;
        if s.buf.len() >= BATCH_MIN && s.flush().is_err() {
            log::warn!("cannot write the log spill {}", self.conf.path.display());
        }
    }

    /// Moves the in-memory backlog to a fresh spill file (in order: it is older).
    fn start_spill(&mut self) {
        let opened = std::fs::create_dir_all(self.conf.path.parent().unwrap_or(&self.conf.path))
            .and_then(|()| {
                File::options()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&self.conf.path)
            });
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                log::warn!("cannot spill logs to {}: {e}", self.conf.path.display());
                return;
            }
        };
        if file.write_all(self.mem.as_bytes()).is_err() {
            return;
        }
        let written = self.mem.len() as u64;
        self.mem = String::new();
        self.spill = Some(SpillFile {
            file,
            buf: Vec::new(),
            written,
            read: 0,
        });
    }

    /// The next batch: the oldest waiting lines, whole, at most BATCH_MAX bytes. A batch
    /// from the spill is only consumed by `delivered`.
    fn next_batch(&mut self) -> Option<Batch> {
        if let Some(s) = &mut self.spill {
            if s.read < s.written {
                return read_spill(s).map(Batch::Disk);
            }
            self.spill = None;
            let _ = std::fs::remove_file(&self.conf.path);
        }
        if self.mem.is_empty() {
            return None;
        }
        let cut = match self.mem.len() <= BATCH_MAX {
            true => self.mem.len(),
            false => memchr::memrchr(b'\n', &self.mem.as_bytes()[..BATCH_MAX])
                .map_or(self.mem.len(), |i| i + 1),
        };
        let rest = self.mem.split_off(cut);
        Some(Batch::Mem(std::mem::replace(&mut self.mem, rest)))
    }

    fn delivered(&mut self, batch: &Batch) {
        if let (Batch::Disk(text), Some(s)) = (batch, &mut self.spill) {
            s.read += text.len() as u64;
        }
    }

    fn discard(&mut self) {
        self.mem = String::new();
        if self.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.conf.path);
        }
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
    fn lines(&self) -> usize {
        let (Batch::Mem(t) | Batch::Disk(t)) = self;
        memchr::memchr_iter(b'\n', t.as_bytes()).count()
    }
}

/// Up to BATCH_MAX bytes from the spill's read offset, cut after the last whole line.
fn read_spill(s: &mut SpillFile) -> Option<String> {
    s.flush().ok()?;
    let want = (s.written - s.read).min(BATCH_MAX as u64) as usize;
    let mut buf = vec![0u8; want];
    s.file.seek(SeekFrom::Start(s.read)).ok()?;
    s.file.read_exact(&mut buf).ok()?;
    let cut = memchr::memrchr(b'\n', &buf).map_or(buf.len(), |i| i + 1);
    buf.truncate(cut);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

type Shared = Arc<(Mutex<Buf>, Condvar)>;

fn lock(m: &Mutex<Buf>) -> MutexGuard<'_, Buf> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct LogShipper {
    shared: Shared,
    handle: Option<JoinHandle<()>>,
}

impl LogShipper {
    pub fn start(client: Client, deployment_id: String, spill: Spill) -> LogShipper {
        let buf = Buf {
            mem: String::new(),
            spill: None,
            conf: spill,
            dropped: 0,
            closed: false,
            gone: false,
        };
        let shared: Shared = Arc::new((Mutex::new(buf), Condvar::new()));
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("logship".into())
            .spawn(move || ship(&client, &deployment_id, &s2))
            .ok();
        LogShipper { shared, handle }
    }

    /// Queues one line (already scrubbed). Never blocks on the network.
    pub fn line(&self, line: &str) {
        let (m, cv) = &*self.shared;
        let mut b = lock(m);
        if b.gone {
            return;
        }
        b.push(&clean_text(line));
        if b.backlog() >= BATCH_MIN {
            cv.notify_all();
        }
    }

    /// Drains what is queued (bounded wait) and stops the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (m, cv) = &*self.shared;
        lock(m).closed = true;
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        lock(m).discard();
    }
}

impl Drop for LogShipper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn ship(client: &Client, deployment_id: &str, shared: &Shared) {
    let (m, _) = &**shared;
    let mut close_deadline: Option<Instant> = None;
    loop {
        let Some(batch) = wait_batch(shared, &mut close_deadline) else {
            return;
        };
        match send(client, deployment_id, batch.text(), close_deadline) {
            Sent::Ok => lock(m).delivered(&batch),
            Sent::Gone => {
                log::info!("control plane has no log route (404, March 2026 server): not shipping logs for deployment {deployment_id}");
                let mut b = lock(m);
                b.gone = true;
                b.discard();
                return;
            }
            Sent::GaveUp(e) => {
                let b = lock(m);
                log::warn!(
                    "gave up shipping {} log lines for deployment {deployment_id} ({} bytes waiting): {e}",
                    batch.lines(),
                    b.backlog()
                );
                return;
            }
        }
    }
}

/// Waits for a full batch, the flush tick, or close; None once closed and drained.
fn wait_batch(shared: &Shared, close_deadline: &mut Option<Instant>) -> Option<Batch> {
    let (m, cv) = &**shared;
    let mut b = lock(m);
    let started = Instant::now();
    loop {
        if b.closed && close_deadline.is_none() {
            *close_deadline = Some(Instant::now() + CLOSE_WAIT);
        }
        let due = b.closed || b.backlog() >= BATCH_MIN || started.elapsed() >= FLUSH_EVERY;
        if due && b.backlog() > 0 {
            return b.next_batch();
        }
        if b.closed {
            if b.dropped > 0 {
                // Drained: the marker goes last whatever the limit.
                let marker = b.marker();
                b.dropped = 0;
                b.append(&marker);
                continue;
            }
            return None;
        }
        let wait = FLUSH_EVERY
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        b = cv
            .wait_timeout(b, wait)
            .map(|r| r.0)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

enum Sent {
    Ok,
    Gone,
    GaveUp(CpError),
}

/// One batch, retried with backoff until it is delivered or closing has waited too long.
fn send(client: &Client, deployment_id: &str, text: &str, close_deadline: Option<Instant>) -> Sent {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match client.append_log(deployment_id, text) {
            Ok(()) => return Sent::Ok,
            Err(CpError::Status { code: 404, .. }) => return Sent::Gone,
            Err(e) if close_deadline.is_some_and(|d| Instant::now() >= d) => {
                return Sent::GaveUp(e)
            }
            Err(e) => {
                log::debug!("log shipping for deployment {deployment_id} failed, retrying: {e}");
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(name: &str, max: u64) -> Buf {
        let path = crate::sys::fake::temp_dir(name).join("spill");
        let conf = Spill {
            path,
            max_bytes: max,
        };
        Buf {
            mem: String::new(),
            spill: None,
            conf,
            dropped: 0,
            closed: false,
            gone: false,
        }
    }

    /// Takes every batch, as the shipper would on success.
    fn drain(b: &mut Buf) -> String {
        let mut all = String::new();
        while let Some(batch) = b.next_batch() {
            let (Batch::Mem(t) | Batch::Disk(t)) = &batch;
            assert!(t.len() <= BATCH_MAX && t.ends_with('\n'));
            all.push_str(t);
            b.delivered(&batch);
        }
        all
    }

    #[test]
    fn a_backlog_beyond_memory_spills_and_drains_in_order() {
        let mut b = buf("order", 64 << 20);
        let mut want = String::new();
        for i in 0..400_000 {
            let l = format!("line {i} of the build");
            b.push(&l);
            want.push_str(&l);
            want.push('\n');
        }
        assert!(b.spill.is_some() && b.mem.is_empty(), "no spill");
        assert!(b.conf.path.exists());
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
        b.closed = true;
        b.flush_marker();
        let rest = drain(&mut b);
        let marker = format!("[muvee-agent: {dropped} log lines dropped: more than LOG_SPILL_MAX (1048576 bytes) waited for the control plane]\n");
        assert_eq!(rest, marker);
        assert_eq!(head.lines().count() as u64 + dropped, 100_000);
    }
}
