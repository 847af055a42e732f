//! The late-log queue: what a task's log shipper could not deliver by the time the task
//! ended (the route failed after close, took nothing for 15 s, or the agent was canceled)
//! waits here, on disk, and one sender thread per agent process ships it oldest first, so a
//! log outage neither holds a task's final report nor loses its lines, across restarts too.
//!
//! - Files: `DATA_DIR/state/late-logs/<seq>.<deployment>.<sent>.late`, private (dir 0700,
//!   files 0600, never opened through a symlink), whole lines of one deployment, `seq`
//!   (creation order, 20 digits) first. `sent` (20 digits) is the byte offset up to which the
//!   control plane took them: the file is renamed after each accepted batch (no block is
//!   needed, so a full disk still records progress), and removed once all is taken. A
//!   deployment may have several files (a task's spill is moved in whole, not copied): they
//!   go out in `seq` order.
//! - At start the files a previous process left are picked up; a line cut short by a crash
//!   is cut off, a symlink in the dir is removed, not followed.
//! - Bounded: at most LOG_SPILL_MAX bytes wait in all files together. Lines beyond it, or
//!   that cannot be written (a full disk), are counted per deployment in memory, and one
//!   marker line (`[muvee-agent: N log lines dropped: …]`) takes their place: written once
//!   that deployment's waiting lines are delivered (or before its next lines that fit),
//!   retried every [`MARKER_RETRY`] while the disk refuses it.
//! - Batches as the live shipper's (at most a 1 MiB JSON body); a refused request is retried
//!   per file with a backoff of 1 s doubling to 30 s, other deployments' files meanwhile go
//!   on. The March 2026 server's plain `404 page not found` (no log route) discards the
//!   deployment's files.

use crate::cp::client::{Backoff, Client, CpError, REQUEST_TIMEOUT};
use crate::cp::files;
use crate::cp::logbody::{fit, lines_in, BODY_MAX, LINE_MAX};
use crate::sys::wait::{self, Bell, Check};
use crate::task::{clean_text, valid_id};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a marker the disk refused is tried again.
const MARKER_RETRY: Duration = Duration::from_secs(5);
/// Bytes read at once: a request body at most.
const READ_MAX: u64 = BODY_MAX as u64;

/// Why lines of a deployment were dropped since its last marker.
#[derive(Debug)]
enum Why {
    /// LOG_SPILL_MAX waited in the late files.
    Full,
    /// A late file could not be written.
    Failed(io::Error),
}

struct Dropped {
    dep: String,
    lines: u64,
    why: Why,
}

struct LateFile {
    seq: u64,
    dep: String,
    path: PathBuf,
    file: File,
    len: u64,
    sent: u64,
    retry_at: Option<Instant>,
    backoff: Backoff,
    failures: u32,
}

#[derive(Default)]
struct State {
    /// By `seq`, oldest first.
    files: Vec<LateFile>,
    dropped: Vec<Dropped>,
    /// Bytes not yet taken, in all files.
    waiting: u64,
    last_seq: u64,
    /// A marker could not be written: when to try again.
    marker_retry_at: Option<Instant>,
    no_route_logged: bool,
    closed: bool,
}

pub struct LateLogs {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Rung by a hand-off and by close: the sender sleeps on it.
    bell: Bell,
}

/// One batch: bytes `[sent, end)` of file `seq`.
struct Batch {
    seq: u64,
    dep: String,
    text: String,
    end: u64,
}

fn file_name(seq: u64, dep: &str, sent: u64) -> String {
    format!("{seq:020}.{dep}.{sent:020}.late")
}

/// `(seq, deployment, sent)` of a late file's name.
fn parse_name(name: &str) -> Option<(u64, String, u64)> {
    let mut parts = name.strip_suffix(".late")?.split('.');
    let (seq, dep, sent) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || !digits(seq) || !digits(sent) || !valid_id(dep) {
        return None;
    }
    Some((seq.parse().ok()?, dep.to_string(), sent.parse().ok()?))
}

/// The offset just past the last '\n' in `[from, to)` of `f` (`from` when there is none).
fn last_line_end(f: &File, from: u64, to: u64) -> io::Result<u64> {
    let mut end = to;
    while end > from {
        let start = end.saturating_sub(READ_MAX).max(from);
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut buf, start)?;
        if let Some(i) = memchr::memrchr(b'\n', &buf) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(from)
}

/// Lines (ends of line) in `[from, to)` of `f`.
fn count_lines(f: &File, from: u64, to: u64) -> io::Result<u64> {
    let (mut at, mut n) = (from, 0);
    while at < to {
        let mut buf = vec![0u8; (to - at).min(READ_MAX) as usize];
        f.read_exact_at(&mut buf, at)?;
        n += lines_in(&buf);
        at += buf.len() as u64;
    }
    Ok(n)
}

fn now_nanos() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| d.as_nanos() as u64)
}

impl LateFile {
    fn new(seq: u64, dep: &str, path: PathBuf, file: File, len: u64, sent: u64) -> LateFile {
        LateFile {
            seq,
            dep: dep.to_string(),
            path,
            file,
            len,
            sent,
            retry_at: None,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            failures: 0,
        }
    }

    /// The oldest waiting lines that fit one body. A run of bytes without an end of line
    /// (only a damaged file has one) goes out in LINE_MAX pieces.
    fn read_batch(&self) -> io::Result<Batch> {
        let mut buf = vec![0u8; (self.len - self.sent).min(READ_MAX) as usize];
        self.file.read_exact_at(&mut buf, self.sent)?;
        let cut = match fit(&buf) {
            0 => buf.len().min(LINE_MAX),
            cut => cut,
        };
        buf.truncate(cut);
        let text = String::from_utf8_lossy(&buf);
        let text = clean_text(text.strip_suffix('\n').unwrap_or(&text)).into_owned();
        Ok(Batch {
            seq: self.seq,
            dep: self.dep.clone(),
            text,
            end: self.sent + cut as u64,
        })
    }
}

/// Opens a late file a previous process left; None (and it is removed, or left alone when
/// it is no late file) when it holds nothing to send.
fn pick_up(dir: &Path, name: &str) -> Option<LateFile> {
    let (seq, dep, sent) = parse_name(name)?;
    let path = dir.join(name);
    let opened = files::open_existing(&path).and_then(|f| {
        let len = f.metadata()?.len();
        // A crash may have cut the last line short.
        let end = last_line_end(&f, sent.min(len), len)?;
        if end < len {
            f.set_len(end)?;
        }
        Ok((f, end))
    });
    match opened {
        Ok((file, len)) if len > sent => Some(LateFile::new(seq, &dep, path, file, len, sent)),
        Ok(_) => {
            let _ = fs::remove_file(&path);
            None
        }
        Err(e) => {
            // A symlink (ELOOP) or anything else in the agent's way: removed, never followed.
            log::warn!("removing {} (not a late log file: {e})", path.display());
            let _ = fs::remove_file(&path);
            None
        }
    }
}

impl LateLogs {
    /// The queue in `dir` (made private), with what a previous process left in it.
    pub fn open(dir: PathBuf, max_bytes: u64) -> LateLogs {
        if let Err(e) = files::private_dir(&dir) {
            log::warn!("cannot set up {}: {e}", dir.display());
        }
        let mut s = State::default();
        let names = fs::read_dir(&dir).into_iter().flatten().flatten();
        for name in names.filter_map(|e| e.file_name().into_string().ok()) {
            if let Some(f) = pick_up(&dir, &name) {
                s.waiting += f.len - f.sent;
                s.files.push(f);
            }
        }
        s.files.sort_by_key(|f| f.seq);
        s.last_seq = s.files.last().map_or(0, |f| f.seq);
        if !s.files.is_empty() {
            log::info!(
                "{} late log file(s) ({} bytes) from an earlier run wait for the control plane",
                s.files.len(),
                s.waiting
            );
        }
        LateLogs {
            dir,
            max_bytes,
            state: Mutex::new(s),
            bell: Bell::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lines of `dep` wait here (or are counted, for a marker): newer ones must follow them.
    pub fn holds(&self, dep: &str) -> bool {
        let s = self.lock();
        s.files.iter().any(|f| f.dep == dep) || s.dropped.iter().any(|d| d.dep == dep)
    }

    /// Takes lines of `dep`, in order, until the hand-off is dropped. None for a deployment
    /// id that cannot name a file.
    pub fn hand_off(&self, dep: &str) -> Option<HandOff<'_>> {
        if !valid_id(dep) {
            log::warn!("not keeping late logs of the invalid deployment id {dep:?}");
            return None;
        }
        Some(HandOff {
            q: self,
            s: self.lock(),
            dep: dep.to_string(),
        })
    }

    /// Ends the sender (the files stay for the next start), after one more try at the
    /// markers waiting in memory.
    pub fn close(&self) {
        let mut s = self.lock();
        let deps: Vec<String> = s.dropped.iter().map(|d| d.dep.clone()).collect();
        for dep in deps {
            self.write_marker(&mut s, &dep);
        }
        s.closed = true;
        self.bell.ring();
    }

    fn marker(&self, d: &Dropped) -> String {
        let n = d.lines;
        match &d.why {
            Why::Full => format!(
                "[muvee-agent: {n} log lines dropped: more than LOG_SPILL_MAX ({} bytes) of late logs waited for the control plane]",
                self.max_bytes
            ),
            Why::Failed(e) => format!(
                "[muvee-agent: {n} log lines dropped: the late log queue {} could not be written ({e})]",
                self.dir.display()
            ),
        }
    }

    /// Counts `n` lines of `dep` dropped; `why` replaces the reason unless None.
    fn count(&self, s: &mut State, dep: &str, n: u64, why: Option<Why>) {
        if n == 0 {
            return;
        }
        match s.dropped.iter_mut().find(|d| d.dep == dep) {
            Some(d) => {
                d.lines += n;
                if let Some(why) = why {
                    d.why = why;
                }
            }
            None => s.dropped.push(Dropped {
                dep: dep.to_string(),
                lines: n,
                why: why.unwrap_or(Why::Full),
            }),
        }
        // The sender writes the marker once the deployment's files are delivered.
        self.bell.ring();
    }

    /// Writes the marker of `dep`'s dropped lines, if any; false when it is still waiting.
    fn write_marker(&self, s: &mut State, dep: &str) -> bool {
        let Some(i) = s.dropped.iter().position(|d| d.dep == dep) else {
            return true;
        };
        let line = self.marker(&s.dropped[i]) + "\n";
        match self.write(s, dep, line.as_bytes()) {
            Ok(()) => {
                s.dropped.remove(i);
                true
            }
            Err(e) => {
                s.dropped[i].why = Why::Failed(e);
                s.marker_retry_at = Some(Instant::now() + MARKER_RETRY);
                false
            }
        }
    }

    /// Appends whole lines to `dep`'s newest file (a new one if it has none), all or nothing.
    fn write(&self, s: &mut State, dep: &str, text: &[u8]) -> io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let i = match s.files.iter().rposition(|f| f.dep == dep) {
            Some(i) => i,
            None => self.create(s, dep)?,
        };
        let f = &mut s.files[i];
        if let Err(e) = f.file.write_all_at(text, f.len) {
            let _ = f.file.set_len(f.len);
            if f.len == f.sent {
                let _ = fs::remove_file(&f.path);
                s.files.remove(i);
            }
            return Err(e);
        }
        f.len += text.len() as u64;
        s.waiting += text.len() as u64;
        Ok(())
    }

    fn next_seq(s: &mut State) -> u64 {
        s.last_seq = now_nanos().max(s.last_seq + 1);
        s.last_seq
    }

    /// A new, empty file for `dep`; its index.
    fn create(&self, s: &mut State, dep: &str) -> io::Result<usize> {
        files::private_dir(&self.dir)?;
        let seq = Self::next_seq(s);
        let path = self.dir.join(file_name(seq, dep, 0));
        let file = files::create_private(&path)?;
        s.files.push(LateFile::new(seq, dep, path, file, 0, 0));
        Ok(s.files.len() - 1)
    }

    /// Appends `text` (whole lines) for `dep` within the cap: after the marker of lines
    /// dropped before, if there is room for it; lines beyond the cap or that cannot be
    /// written are counted.
    fn append(&self, s: &mut State, dep: &str, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        let room = |s: &State| self.max_bytes.saturating_sub(s.waiting);
        if let Some(d) = s.dropped.iter().find(|d| d.dep == dep) {
            let first = memchr::memchr(b'\n', text).map_or(text.len(), |i| i + 1);
            let need = (self.marker(d).len() + 1 + first) as u64;
            if need > room(s) || !self.write_marker(s, dep) {
                // Later lines may not go before the marker.
                let why = (need > room(s)).then_some(Why::Full);
                self.count(s, dep, lines_in(text), why);
                return;
            }
        }
        let fits = &text[..text.len().min(room(s) as usize)];
        let cut = memchr::memrchr(b'\n', fits).map_or(0, |i| i + 1);
        if let Err(e) = self.write(s, dep, &text[..cut]) {
            self.count(s, dep, lines_in(&text[..cut]), Some(Why::Failed(e)));
        }
        self.count(s, dep, lines_in(&text[cut..]), Some(Why::Full));
    }
}

/// A hand-off in progress: holds the queue (the lines of one task go in together, in order),
/// and wakes the sender when it ends.
pub struct HandOff<'a> {
    q: &'a LateLogs,
    s: MutexGuard<'a, State>,
    dep: String,
}

impl HandOff<'_> {
    /// Whole lines, each ending in '\n'.
    pub fn lines(&mut self, text: &[u8]) {
        self.q.append(&mut self.s, &self.dep, text);
    }

    /// The shipper's own marker line, counting `dropped` lines: kept whatever the cap (a
    /// marker that cannot be written adds its count to the queue's).
    pub fn marker(&mut self, dropped: u64, line: &str) {
        let text = format!("{line}\n");
        if !self.q.write_marker(&mut self.s, &self.dep) {
            self.q.count(&mut self.s, &self.dep, dropped, None);
        } else if let Err(e) = self.q.write(&mut self.s, &self.dep, text.as_bytes()) {
            self.q
                .count(&mut self.s, &self.dep, dropped, Some(Why::Failed(e)));
        }
    }

    /// Takes a task's spill file whole (moved, not copied: a full disk does not keep it
    /// out): its bytes from `sent` on, `lines` lines, wait to be sent. Beyond the cap it is
    /// cut at a line's end and the rest counted. The spill is gone afterwards.
    pub fn spill(&mut self, spill: &Path, sent: u64, lines: u64) {
        let (q, dep) = (self.q, self.dep.clone());
        let s = &mut *self.s;
        let room = q.max_bytes.saturating_sub(s.waiting);
        let writable = s.dropped.iter().all(|d| d.dep != dep) || q.write_marker(s, &dep);
        let adopted = writable.then(|| q.adopt(s, &dep, spill, sent, room));
        match adopted {
            Some(Ok((f, kept))) => {
                s.waiting += f.len - f.sent;
                q.count(s, &dep, lines.saturating_sub(kept), Some(Why::Full));
                s.files.push(f);
            }
            Some(Err(AdoptError::Empty)) => q.count(s, &dep, lines, Some(Why::Full)),
            Some(Err(AdoptError::Io(e))) => q.count(s, &dep, lines, Some(Why::Failed(e))),
            None => q.count(s, &dep, lines, None),
        }
        let _ = fs::remove_file(spill);
    }
}

impl Drop for HandOff<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.s.files.iter().rfind(|f| f.dep == self.dep) {
            let _ = f.file.sync_data();
        }
        self.q.bell.ring();
    }
}

/// Why a spill was not taken in.
enum AdoptError {
    /// Nothing of it fits the cap.
    Empty,
    Io(io::Error),
}

impl From<io::Error> for AdoptError {
    fn from(e: io::Error) -> AdoptError {
        AdoptError::Io(e)
    }
}

impl LateLogs {
    /// Moves `spill` in as a new file of `dep`, cut to `room` bytes past `sent`; the file
    /// and how many lines it keeps.
    fn adopt(
        &self,
        s: &mut State,
        dep: &str,
        spill: &Path,
        sent: u64,
        room: u64,
    ) -> Result<(LateFile, u64), AdoptError> {
        files::private_dir(&self.dir)?;
        let seq = Self::next_seq(s);
        let path = self.dir.join(file_name(seq, dep, sent));
        fs::rename(spill, &path)?;
        let taken = (|| {
            let file = files::open_existing(&path)?;
            let len = file.metadata()?.len();
            let end = last_line_end(&file, sent, len.min(sent.saturating_add(room)))?;
            let kept = count_lines(&file, sent, end)?;
            file.set_len(end)?;
            Ok::<_, io::Error>((LateFile::new(seq, dep, path.clone(), file, end, sent), kept))
        })();
        match taken {
            Ok((f, _)) if f.len == f.sent => {
                let _ = fs::remove_file(&path);
                Err(AdoptError::Empty)
            }
            Ok(t) => Ok(t),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e.into())
            }
        }
    }
}

/// The file to send from now: the oldest whose turn it is (a deployment's files in order),
/// else when to look again (None: when something changes).
fn due(s: &State, now: Instant) -> Result<usize, Option<Instant>> {
    let mut wake: Option<Instant> = None;
    let mut seen: Vec<&str> = Vec::new();
    for (i, f) in s.files.iter().enumerate() {
        if seen.contains(&f.dep.as_str()) {
            continue;
        }
        seen.push(&f.dep);
        match f.retry_at {
            Some(t) if t > now => wake = Some(wake.map_or(t, |w| w.min(t))),
            _ => return Ok(i),
        }
    }
    Err(wake)
}

impl LateLogs {
    /// Ships the queue until [`close`](Self::close); run by one thread per agent process.
    pub fn run_sender(&self, client: &Client) {
        while let Some(batch) = self.next_batch() {
            let sent = client.append_log(&batch.dep, &batch.text, REQUEST_TIMEOUT);
            self.record(&batch, sent);
        }
    }

    /// Waits until a batch is due (writing the markers whose turn it is meanwhile); None once
    /// closed.
    fn next_batch(&self) -> Option<Batch> {
        wait::next_ready(&self.bell, || {
            let mut s = self.lock();
            if s.closed {
                return Check::Ready(None);
            }
            self.write_due_markers(&mut s);
            let now = Instant::now();
            match due(&s, now) {
                Ok(i) => match s.files[i].read_batch() {
                    Ok(b) => Check::Ready(Some(b)),
                    Err(e) => {
                        let f = &mut s.files[i];
                        log::warn!("cannot read the late log file {}: {e}", f.path.display());
                        f.retry_at = Some(now + f.backoff.next_delay());
                        // Look again at once: other files may be due.
                        Check::Sleep(Some(now))
                    }
                },
                Err(wake) => {
                    let retry = s.marker_retry_at.filter(|_| !s.dropped.is_empty());
                    Check::Sleep(match (wake, retry) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    })
                }
            }
        })
    }

    /// Markers of deployments whose files are all delivered (the marker goes after their
    /// lines); one the disk refused waits for MARKER_RETRY.
    fn write_due_markers(&self, s: &mut State) {
        if s.marker_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        s.marker_retry_at = None;
        let due: Vec<String> = (s.dropped.iter())
            .filter(|d| s.files.iter().all(|f| f.dep != d.dep))
            .map(|d| d.dep.clone())
            .collect();
        for dep in due {
            if !self.write_marker(s, &dep) {
                return;
            }
        }
    }

    /// The control plane answers again after an outage: files waiting for their backoff
    /// go now, so a task's lines follow its final report within moments, not up to 30 s.
    pub fn retry_now(&self) {
        let mut s = self.lock();
        let now = Instant::now();
        let mut woke = false;
        for f in s
            .files
            .iter_mut()
            .filter(|f| f.retry_at.is_some_and(|t| t > now))
        {
            f.retry_at = None;
            f.backoff.reset();
            woke = true;
        }
        drop(s);
        if woke {
            self.bell.ring();
        }
    }

    fn record(&self, batch: &Batch, sent: Result<(), CpError>) {
        let mut s = self.lock();
        match sent {
            Ok(()) => self.delivered(&mut s, batch),
            Err(e) if e.is_missing_route() => {
                if !std::mem::replace(&mut s.no_route_logged, true) {
                    log::info!("control plane has no log route (404, March 2026 server): discarding late logs");
                }
                self.discard(&mut s, &batch.dep);
            }
            // Today's server answers 400 for a deployment id it cannot parse: that never
            // changes, and waiting would hold other deployments' lines out of the cap.
            Err(e) if e.status() == Some(400) => {
                log::warn!(
                    "the control plane refuses the log of deployment {} for good: discarding its late logs: {e}",
                    batch.dep
                );
                self.discard(&mut s, &batch.dep);
            }
            Err(e) => {
                let Some(f) = s.files.iter_mut().find(|f| f.seq == batch.seq) else {
                    return;
                };
                f.failures += 1;
                let delay = f.backoff.next_delay();
                f.retry_at = Some(Instant::now() + delay);
                let left = f.len - f.sent;
                if f.failures == 1 || f.failures % 10 == 0 {
                    log::warn!(
                        "late logs of deployment {} ({left} bytes) not taken (attempt {}), next try in {:.1}s: {e}",
                        f.dep,
                        f.failures,
                        delay.as_secs_f64()
                    );
                }
            }
        }
    }

    /// The control plane took `batch`: progress is recorded in the file's name (a restart
    /// neither loses nor re-sends it), and the file goes once all of it is taken.
    fn delivered(&self, s: &mut State, batch: &Batch) {
        let Some(i) = s.files.iter().position(|f| f.seq == batch.seq) else {
            return;
        };
        let f = &mut s.files[i];
        let taken = batch.end - f.sent;
        f.sent = batch.end;
        if f.failures > 0 {
            log::info!(
                "late logs of deployment {} taken after {} failed attempt(s)",
                f.dep,
                f.failures
            );
        }
        (f.failures, f.retry_at) = (0, None);
        f.backoff.reset();
        if f.sent == f.len {
            let _ = fs::remove_file(&f.path);
            s.files.remove(i);
        } else {
            let path = self.dir.join(file_name(f.seq, &f.dep, f.sent));
            match fs::rename(&f.path, &path).and_then(|()| files::sync_dir(&path)) {
                Ok(()) => f.path = path,
                Err(e) => log::warn!(
                    "cannot record the progress of {} (a restart sends a batch again): {e}",
                    f.path.display()
                ),
            }
        }
        s.waiting -= taken;
    }

    /// Drops every file of `dep`.
    fn discard(&self, s: &mut State, dep: &str) {
        s.files.retain(|f| {
            if f.dep == dep {
                s.waiting -= f.len - f.sent;
                let _ = fs::remove_file(&f.path);
            }
            f.dep != dep
        });
        s.dropped.retain(|d| d.dep != dep);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DEP: &str = "c0ffee00-1234-4abc-9def-000000000001";

    fn status(code: u16, body: &str) -> CpError {
        CpError::Status {
            url: "http://cp/api/deployments/x/logs".into(),
            code,
            body: body.into(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn numbered(from: u64, to: u64) -> String {
        (from..to).map(|i| format!("line {i}\n")).collect()
    }

    /// Takes every batch due (as the control plane would), returning their texts.
    pub(crate) fn drain(q: &LateLogs) -> String {
        let mut all = String::new();
        loop {
            let batch = {
                let mut s = q.lock();
                q.write_due_markers(&mut s);
                match due(&s, Instant::now()) {
                    Ok(i) => s.files[i].read_batch().unwrap(),
                    Err(_) => return all,
                }
            };
            all.push_str(&batch.text);
            all.push('\n');
            q.record(&batch, Ok(()));
        }
    }

    #[test]
    fn names_carry_order_deployment_and_progress() {
        let name = file_name(7, DEP, 1234);
        assert_eq!(
            name,
            format!("00000000000000000007.{DEP}.00000000000000001234.late")
        );
        assert_eq!(parse_name(&name), Some((7, DEP.to_string(), 1234)));
        for bad in [
            "x.late",
            &format!("00000000000000000007.{DEP}.1234.late"),
            "00000000000000000007.../x.00000000000000001234.late",
            &format!("00000000000000000007.{DEP}.00000000000000001234.spill"),
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    /// Progress survives a restart: what was taken is not sent again, what was not is; a
    /// delivered file is removed; files are private.
    #[test]
    fn a_restart_resumes_after_the_last_batch_taken() {
        let dir = crate::sys::fake::temp_dir("late-restart").join("late-logs");
        let q = LateLogs::open(dir.clone(), 64 << 20);
        let text = numbered(0, 200_000); // about 2.3 MB: three batches
        q.hand_off(DEP).unwrap().lines(text.as_bytes());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join(&names(&dir)[0]);
        assert_eq!(mode(&file), 0o600);
        // One batch taken, then the process ends.
        let first = {
            let s = q.lock();
            s.files[0].read_batch().unwrap()
        };
        q.record(&first, Ok(()));
        let second = q.lock().files[0].read_batch().unwrap();
        q.record(&second, Err(status(500, "x")));
        drop(q);
        let (_, _, sent) = parse_name(&names(&dir)[0]).unwrap();
        assert_eq!(sent, first.text.len() as u64 + 1);
        let q = LateLogs::open(dir.clone(), 64 << 20);
        let rest = drain(&q);
        assert_eq!(format!("{}\n{rest}", first.text), text);
        assert!(names(&dir).is_empty(), "{:?}", names(&dir));
        assert_eq!(q.lock().waiting, 0);
    }

    /// A line cut short by a crash is cut off at start; a symlink with a late file's name is
    /// removed, its target untouched; other names are left alone.
    #[test]
    fn pick_up_keeps_whole_lines_and_never_follows_a_symlink_or_a_hard_link() {
        let root = crate::sys::fake::temp_dir("late-pickup");
        let dir = root.join("late-logs");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(file_name(1, DEP, 0)), "one\ntwo\nthr").unwrap();
        let victim = root.join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let link = dir.join(file_name(2, "other", 0));
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        // A hard link to a file outside the dir, whose last line is cut: neither cut nor sent.
        let victim2 = root.join("victim2");
        fs::write(&victim2, "secret\npartial").unwrap();
        let hard = dir.join(file_name(3, "third", 0));
        fs::hard_link(&victim2, &hard).unwrap();
        fs::write(dir.join("notes.txt"), "left alone").unwrap();
        let q = LateLogs::open(dir.clone(), 1 << 20);
        assert!(fs::symlink_metadata(&link).is_err(), "the symlink stays");
        assert!(fs::symlink_metadata(&hard).is_err(), "the hard link stays");
        assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
        assert_eq!(fs::read(&victim2).unwrap(), b"secret\npartial");
        assert!(q.holds(DEP) && !q.holds("other") && !q.holds("third"));
        assert_eq!(drain(&q), "one\ntwo\n");
        assert_eq!(names(&dir), ["notes.txt"]);
    }

    /// Beyond the cap whole lines are counted: one marker, written once the deployment's
    /// waiting lines are delivered, counts exactly the missing ones; later lines that fit
    /// follow it.
    #[test]
    fn beyond_the_cap_one_marker_counts_the_dropped_lines() {
        let dir = crate::sys::fake::temp_dir("late-cap").join("late-logs");
        let q = LateLogs::open(dir, 100);
        let text = numbered(0, 30); // 230 bytes
        q.hand_off(DEP).unwrap().lines(text.as_bytes());
        q.hand_off(DEP).unwrap().lines(b"more\n");
        let got = drain(&q);
        let kept = got.lines().filter(|l| l.starts_with("line ")).count();
        let head: Vec<&str> = text.lines().take(kept).collect();
        assert_eq!(got.lines().take(kept).collect::<Vec<_>>(), head);
        assert!(kept > 0 && head.join("\n").len() < 100, "{kept}");
        let marker = format!(
            "[muvee-agent: {} log lines dropped: more than LOG_SPILL_MAX (100 bytes) of late logs waited for the control plane]\n",
            31 - kept
        );
        assert!(got.ends_with(&marker), "{got}");
        // Room again: the next lines go out as they are.
        q.hand_off(DEP).unwrap().lines(b"after\n");
        assert_eq!(drain(&q), "after\n");
    }

    /// A task's spill is moved in whole from where its shipper stopped; beyond the cap it is
    /// cut at a line's end and the rest counted; the shipper's own marker follows.
    #[test]
    fn a_spill_is_moved_in_and_cut_to_the_cap() {
        let root = crate::sys::fake::temp_dir("late-spill");
        let q = LateLogs::open(root.join("late-logs"), 1000);
        let spill = root.join("t.spill");
        let text = numbered(0, 300); // 2590 bytes
        fs::write(&spill, &text).unwrap();
        let sent = numbered(0, 10).len();
        {
            let mut h = q.hand_off(DEP).unwrap();
            h.spill(&spill, sent as u64, 290);
            h.marker(5, "[muvee-agent: 5 log lines dropped: because]");
        }
        assert!(!spill.exists());
        let got = drain(&q);
        let lines: Vec<&str> = got.lines().collect();
        let kept = lines.iter().filter(|l| l.starts_with("line ")).count();
        let want: Vec<&str> = text.lines().skip(10).take(kept).collect();
        assert_eq!(lines[..kept], want);
        // The cut is the last line's end within the cap.
        let bytes = want.join("\n").len() + 1;
        assert!(bytes <= 1000 && bytes + 10 > 1000, "{bytes}");
        let n = 290 - kept;
        // In line order: the spill's tail was dropped before the shipper's own marker's lines.
        assert_eq!(
            lines[kept..],
            [
                format!("[muvee-agent: {n} log lines dropped: more than LOG_SPILL_MAX (1000 bytes) of late logs waited for the control plane]"),
                "[muvee-agent: 5 log lines dropped: because]".to_string(),
            ]
        );
    }

    /// A deployment the control plane has no route for (March 2026) is discarded; a refused
    /// one waits for its backoff while another deployment's file goes first.
    #[test]
    fn a_refused_file_holds_no_other_and_no_route_discards() {
        let dir = crate::sys::fake::temp_dir("late-refused").join("late-logs");
        let q = LateLogs::open(dir.clone(), 1 << 20);
        q.hand_off("a").unwrap().lines(b"a1\n");
        q.hand_off("b").unwrap().lines(b"b1\n");
        q.hand_off("c").unwrap().lines(b"c1\n");
        let take = || {
            let s = q.lock();
            s.files[due(&s, Instant::now()).unwrap()]
                .read_batch()
                .unwrap()
        };
        let a = take();
        assert_eq!(a.dep, "a");
        q.record(&a, Err(status(502, "<html>")));
        let b = take();
        assert_eq!(b.dep, "b");
        q.record(&b, Err(status(404, "404 page not found")));
        assert!(!q.holds("b"));
        assert_eq!(drain(&q), "c1\n");
        assert!(q.holds("a"));
        assert_eq!(names(&dir).len(), 1);
        // An id the server cannot parse (400) is refused for good: discarded, not retried.
        q.hand_off("not-a-uuid").unwrap().lines(b"x1\n");
        let mut bad = take();
        if bad.dep == "a" {
            q.record(&bad, Err(status(502, "<html>")));
            bad = take();
        }
        assert_eq!(bad.dep, "not-a-uuid");
        q.record(&bad, Err(status(400, r#"{"error":"invalid id"}"#)));
        assert!(!q.holds("not-a-uuid") && q.holds("a"));
    }

    /// After an outage the refused file goes at once, not after its grown backoff.
    #[test]
    fn retry_now_sends_a_file_waiting_for_its_backoff() {
        let dir = crate::sys::fake::temp_dir("late-retry-now").join("late-logs");
        let q = LateLogs::open(dir, 1 << 20);
        q.hand_off(DEP).unwrap().lines(b"l1\n");
        let s = q.lock();
        let b = s.files[due(&s, Instant::now()).unwrap()]
            .read_batch()
            .unwrap();
        drop(s);
        q.record(&b, Err(status(502, "<html>")));
        assert!(
            due(&q.lock(), Instant::now()).is_err(),
            "waits for its backoff"
        );
        q.retry_now();
        assert_eq!(drain(&q), "l1\n");
        assert!(!q.holds(DEP));
    }
}
