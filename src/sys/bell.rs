//! The bell every sleeping thread waits on: rung when a task ends, a slot frees or a signal
//! arrives, so nothing polls in short slices; and the doorbell, its twin for a thread that
//! sleeps in poll(2). Below `signal` and `sync`, which both use it; `sys::wait` says who waits
//! on which bell, and for what.

use std::sync::{Arc, Condvar, Mutex, Weak};
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
    /// Doorbells rung with this bell, for threads that sleep in poll(2).
    doorbells: Mutex<Vec<Weak<Doorbell>>>,
}

impl Bell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
        let mut doorbells = self.doorbells.lock().unwrap_or_else(|e| e.into_inner());
        doorbells.retain(|d| d.upgrade().map(|d| d.ring()).is_some());
    }

    /// Rings `doorbell` too whenever this bell rings, while the doorbell lives: a thread in
    /// poll(2) hears what this bell's waiters hear (a signal, on the agent's bell).
    pub fn attach(&self, doorbell: &Arc<Doorbell>) {
        let mut doorbells = self.doorbells.lock().unwrap_or_else(|e| e.into_inner());
        doorbells.push(Arc::downgrade(doorbell));
    }

    #[cfg(test)]
    pub fn rings(&self) -> u64 {
        *self.rung.lock().unwrap()
    }

    /// How often it has rung: note it before checking a condition, then [`Bell::sleep_after`].
    pub(super) fn count(&self) -> u64 {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until a ring after the one counted as `seen`, or `deadline` (None: no deadline).
    pub(super) fn sleep_after(&self, seen: u64, deadline: Option<Instant>) {
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
    /// Only `sys::wait` waits on a bell: it says what ends each wait.
    pub(super) fn wait_until(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut() -> bool,
    ) -> bool {
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

/// poll(2) on `(fd, events)` pairs for up to `wait`: each fd's returned events (0: none).
pub fn poll_fds(fds: &[(i32, i16)], wait: std::time::Duration) -> Vec<i16> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ms = wait.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: poll writes only the revents of the pollfds we own.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    pfds.iter()
        .map(|p| if n > 0 { p.revents } else { 0 })
        .collect()
}

/// A pipe that wakes a thread blocked in poll(2): `ring` writes a byte (never blocks),
/// `drain` empties it.
pub struct Doorbell {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (r, w) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        Ok(Doorbell { r, w })
    }

    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.r.as_raw_fd()
    }

    pub fn ring(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a one-byte write from our buffer; a full pipe (EAGAIN) already rings.
        unsafe {
            libc::write(self.w.as_raw_fd(), [1u8].as_ptr().cast(), 1);
        }
    }

    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into our buffer from a non-blocking pipe until it is empty.
        while unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
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
