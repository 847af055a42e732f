//! Concurrency primitives shared by the roles: a bell that waiters sleep on until something
//! changed, a counting semaphore (build slots), one lock per key (an app, a dataset), and
//! background jobs that can be waited for by key.

use crate::sys::signal;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Wakes every waiter when something it may be waiting for changed (a task finished, a
/// signal arrived, a slot freed). Waiters re-check their condition under the lock, so a ring
/// between the check and the wait is never lost; state changes must happen before `ring`.
#[derive(Default)]
pub struct Bell {
    rung: Mutex<u64>,
    cv: Condvar,
}

impl Bell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }

    #[cfg(test)]
    pub fn rings(&self) -> u64 {
        *self.rung.lock().unwrap()
    }

    /// Sleeps until `done()` holds (true) or `deadline` passes (false); None waits for ever.
    pub fn wait_until(&self, deadline: Option<Instant>, mut done: impl FnMut() -> bool) -> bool {
        let mut g = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if done() {
                return true;
            }
            g = match deadline {
                None => self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    self.cv
                        .wait_timeout(g, d - now)
                        .map(|r| r.0)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
            };
        }
    }
}

/// A counting semaphore (BUILDER_MAX_CONCURRENT). Waiters sleep on the shared bell, so a
/// cancel signal wakes them as well as a freed slot.
pub struct Semaphore {
    free: Mutex<usize>,
    bell: Arc<Bell>,
}

pub struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    pub fn new(n: usize, bell: Arc<Bell>) -> Semaphore {
        Semaphore {
            free: Mutex::new(n.max(1)),
            bell,
        }
    }
    /// Waits for a slot; None when the agent is canceling tasks.
    pub fn acquire(&self) -> Option<Permit<'_>> {
        let mut got = false;
        self.bell.wait_until(None, || {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if *free > 0 {
                *free -= 1;
                got = true;
            }
            got || signal::cancel_requested()
        });
        got.then_some(Permit(self))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.bell.ring();
    }
}

/// One mutex per key (a domain prefix, a dataset): serializes work on the same thing.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl KeyedLocks {
    pub fn with<T>(&self, key: &str, f: impl FnOnce() -> T) -> T {
        let m = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let _g = m.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

/// Threads doing work after a task reported (draining an old container), by key.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<(String, JoinHandle<()>)>>,
}

impl Jobs {
    /// Starts `work` on a thread named `name`; the error says why no thread could start.
    pub fn spawn(
        &self,
        key: &str,
        name: String,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(_, h)| !h.is_finished());
        let h = std::thread::Builder::new().name(name).spawn(work)?;
        list.push((key.to_string(), h));
        Ok(())
    }

    /// Waits for the jobs of one key, or all of them.
    pub fn wait(&self, key: Option<&str>) {
        let mine: Vec<JoinHandle<()>> = {
            let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *list)
                .into_iter()
                .partition(|(k, _)| key.map_or(true, |x| x == k));
            *list = rest;
            mine.into_iter().map(|(_, h)| h).collect()
        };
        for h in mine {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn bell_wakes_a_waiter_and_times_out_without_a_ring() {
        let bell = Arc::new(Bell::default());
        let flag = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        assert!(!bell.wait_until(Some(t0 + Duration::from_millis(50)), || false));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let (b, f) = (bell.clone(), flag.clone());
        let ringer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f.store(true, Ordering::SeqCst);
            b.ring();
        });
        let t0 = Instant::now();
        let far = Some(t0 + Duration::from_secs(30));
        assert!(bell.wait_until(far, || flag.load(Ordering::SeqCst)));
        assert!(t0.elapsed() < Duration::from_secs(10));
        ringer.join().unwrap();
    }

    #[test]
    fn semaphore_hands_a_freed_slot_to_a_waiter() {
        let sem = Arc::new(Semaphore::new(1, Arc::default()));
        let held = sem.acquire().unwrap();
        let s2 = sem.clone();
        let waiter = std::thread::spawn(move || s2.acquire().is_some());
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        assert!(waiter.join().unwrap());
    }
}
