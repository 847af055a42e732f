//! Ships a task's output to `POST /api/deployments/{id}/logs`. Lines are batched (joined with
//! `\n`; the server appends `line + "\n"`, so the stored log is byte-identical to one request
//! per line), flushed at least every second or 64 KiB, from a thread of its own so shipping
//! never slows the task. Memory is bounded; overflow leaves an explicit marker. The March 2026
//! server has no such route (404): shipping stops for that task with one info line.

use crate::cp::client::{Backoff, Client, CpError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BATCH_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Unsent output kept in memory while the control plane is slow or down.
const MAX_BUFFERED: usize = 4 << 20;
/// How long closing waits for the last batches.
const CLOSE_WAIT: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Buf {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
    dropped: u64,
    closed: bool,
}

impl Buf {
    /// Records, in line order, how many lines were dropped since the last marker.
    fn push_marker(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let marker = format!(
            "[muvee-agent: {} log lines dropped: the control plane did not keep up]",
            self.dropped
        );
        self.bytes += marker.len() + 1;
        self.lines.push_back(marker);
        self.dropped = 0;
    }
}

pub struct LogShipper {
    shared: Arc<(Mutex<Buf>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl LogShipper {
    pub fn start(client: Client, deployment_id: String) -> LogShipper {
        let shared = Arc::new((Mutex::new(Buf::default()), Condvar::new()));
        let s2 = shared.clone();
        let handle = std::thread::spawn(move || ship(&client, &deployment_id, &s2));
        LogShipper {
            shared,
            handle: Some(handle),
        }
    }

    /// Queues one line (already scrubbed). Never blocks on the network.
    pub fn line(&self, line: &str) {
        let (m, cv) = &*self.shared;
        let mut b = m.lock().unwrap_or_else(|e| e.into_inner());
        if b.bytes + line.len() > MAX_BUFFERED {
            b.dropped += 1;
            return;
        }
        b.push_marker();
        b.bytes += line.len() + 1;
        b.lines.push_back(line.to_string());
        if b.bytes >= BATCH_BYTES {
            cv.notify_all();
        }
    }

    /// Flushes what is queued (bounded wait) and stops the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let (m, cv) = &*self.shared;
            m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for LogShipper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn ship(client: &Client, deployment_id: &str, shared: &(Mutex<Buf>, Condvar)) {
    let (m, cv) = shared;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut close_deadline: Option<Instant> = None;
    loop {
        // Wait for a full batch, the flush tick, or close.
        let batch = {
            let mut b = m.lock().unwrap_or_else(|e| e.into_inner());
            let started = Instant::now();
            while !b.closed && b.bytes < BATCH_BYTES && started.elapsed() < FLUSH_EVERY {
                b = cv
                    .wait_timeout(b, FLUSH_EVERY - started.elapsed())
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if b.closed && close_deadline.is_none() {
                close_deadline = Some(Instant::now() + CLOSE_WAIT);
            }
            if b.lines.is_empty() {
                b.push_marker();
            }
            if b.lines.is_empty() {
                if b.closed {
                    return;
                }
                continue;
            }
            take_batch(&mut b)
        };
        loop {
            match client.append_log(deployment_id, &batch.0) {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(CpError::Status { code: 404, .. }) => {
                    log::info!("control plane has no log route (404, March 2026 server): not shipping logs for deployment {deployment_id}");
                    let mut b = m.lock().unwrap_or_else(|e| e.into_inner());
                    b.lines.clear();
                    b.bytes = 0;
                    drop(b);
                    return drain_until_closed(shared);
                }
                Err(e) => {
                    if close_deadline.is_some_and(|d| Instant::now() >= d) {
                        let b = m.lock().unwrap_or_else(|e| e.into_inner());
                        log::warn!(
                            "gave up shipping {} log lines for deployment {deployment_id}: {e}",
                            batch.1 + b.lines.len()
                        );
                        return;
                    }
                    log::debug!(
                        "log shipping for deployment {deployment_id} failed, retrying: {e}"
                    );
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }
}

/// Takes queued lines up to one batch (at least one line).
fn take_batch(b: &mut Buf) -> (String, usize) {
    let mut out = String::new();
    let mut n = 0;
    while let Some(l) = b.lines.front() {
        if n > 0 && out.len() + l.len() + 1 > BATCH_BYTES {
            break;
        }
        let l = b.lines.pop_front().unwrap_or_default();
        b.bytes -= l.len() + 1;
        if n > 0 {
            out.push('\n');
        }
        out.push_str(&l);
        n += 1;
    }
    (out, n)
}

/// After a 404 the producer may keep writing; discard until closed so memory stays flat.
fn drain_until_closed(shared: &(Mutex<Buf>, Condvar)) {
    let (m, cv) = shared;
    let mut b = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        b.lines.clear();
        b.bytes = 0;
        b.dropped = 0;
        if b.closed {
            return;
        }
        b = cv
            .wait_timeout(b, FLUSH_EVERY)
            .map(|r| r.0)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}
