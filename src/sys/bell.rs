//! The bell every sleeping thread waits on: rung when a task ends, a slot frees or a signal
//! arrives, so nothing polls in short slices. Below `signal` and `sync`, which both use it;
//! `sys::wait` says who waits on which bell, and for what.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Wakes every waiter when something it may be waiting for changed (a task finished, a
/// signal arrived, a slot freed). A waiter notes the ring count before it checks its
/// condition and sleeps only while the count is unchanged, so a ring between the check and
/// the sleep is never lost; state changes must happen before `ring` (under their own lock or
/// not: the check never runs under the bell's).
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

    /// How often it has rung: note it before checking a condition, then [`Bell::sleep_after`].
    pub fn count(&self) -> u64 {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until a ring after the one counted as `seen`, or `deadline` (None: no deadline).
    pub fn sleep_after(&self, seen: u64, deadline: Option<Instant>) {
        let mut g = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        while *g == seen {
            g = match deadline {
                None => self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return;
                    }
                    self.cv
                        .wait_timeout(g, d - now)
                        .map(|r| r.0)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
            };
        }
    }

    /// Sleeps until `done()` holds (true) or `deadline` passes (false); None waits for ever.
    pub fn wait_until(&self, deadline: Option<Instant>, mut done: impl FnMut() -> bool) -> bool {
        loop {
            let seen = self.count();
            if done() {
                return true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            self.sleep_after(seen, deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
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
}
