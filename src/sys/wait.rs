//! How a thread of this agent waits. There are three ways, all here, and nothing else
//! blocks a thread (no sleeping in short slices, no bare condvars):
//!
//! * [`until`] / [`pause`] / [`next_ready`]: state shared between threads (a build slot, an
//!   app's lock, the running tasks, a queue of reports or log lines). The thread sleeps on the
//!   [`Bell`] of that state; whoever changes the state rings that bell after the change. A
//!   ring between the check and the sleep is never lost (the bell counts its rings).
//! * [`Mailbox`]: values handed to one thread (a name lookup and its answer). A send or a
//!   close wakes the receiver.
//! * [`Doorbell`] in [`poll_fds`]: a thread that also waits for file descriptors (the control
//!   channel's socket, a session's pipes and PTY). The descriptors or a ring wake it.
//!
//! What ends a wait early is named where it waits, as a [`Stop`]:
//!
//! * [`Stop::Shutdown`]: the first SIGTERM/SIGINT. For loops that look for new work or report
//!   on a schedule (the poll loop, the periodic reports, the control channel's re-dial and its
//!   socket).
//! * [`Stop::Cancel`]: the tasks' cancel, a second signal or SHUTDOWN_GRACE running out
//!   ([`signal::force_cancel`]). For every wait inside a task (a build slot, an app's or a
//!   dataset's lock, a drain, the pause between health probes): a canceled task never waits
//!   for anything but its own cleanup.
//! * [`Stop::Never`]: only the condition or the deadline ends it. For the shutdown itself
//!   (tasks ending, reports going out) and for queues that end by being closed.
//!
//! Signals ring only the agent's bell (`Shared::bell`, handed to `signal::watch`), so a wait
//! with `Shutdown` or `Cancel` sleeps on that bell; it is also rung when a task ends and when
//! a slot or lock is freed. A doorbell [`Bell::attach`]ed to it hears the same (the control
//! channel's socket thread, which then closes on shutdown). A queue's own bell or doorbell
//! (outbox, log shipper, a session's inbox) is rung by new work and by its close, and its
//! waits use `Never`: they end when the queue's owner closes it (a session ends with its
//! connection). Joining a thread is a wait too: only threads whose own waits end on the same
//! stop are joined. The command runner (`sys::executor`) is the one exception: it checks the
//! cancel and its limits on a tick while it reads a child's output.

pub use crate::sys::bell::{poll_fds, Bell, Doorbell};
use crate::sys::signal;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// What, besides its condition and deadline, ends a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The first signal: stop looking for new work.
    Shutdown,
    /// The tasks' cancel (second signal, or the shutdown grace ran out).
    Cancel,
    /// Nothing: only the condition or the deadline.
    Never,
}

impl Stop {
    pub fn requested(self) -> bool {
        match self {
            Stop::Shutdown => signal::shutdown_requested(),
            Stop::Cancel => signal::cancel_requested(),
            Stop::Never => false,
        }
    }
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woke {
    /// The condition holds.
    Ready,
    /// The [`Stop`] happened first.
    Stopped,
    /// The deadline passed first.
    TimedOut,
}

/// A wait given up because the tasks are being canceled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canceled;

impl std::fmt::Display for Canceled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("canceled: agent shutting down")
    }
}

impl std::error::Error for Canceled {}

/// What a [`next_ready`] check found.
pub enum Check<T> {
    /// Done, with this.
    Ready(T),
    /// Not yet: sleep until a ring, or at most until this instant (None: no limit).
    Sleep(Option<Instant>),
}

/// The general wait, with [`Stop::Never`]: asks `check` after every ring (and when the
/// deadline it gave passes) until it is `Ready`. `check` may take the state's lock, and it
/// decides each time how long to sleep at most (a queue's next retry).
pub fn next_ready<T>(bell: &Bell, mut check: impl FnMut() -> Check<T>) -> T {
    loop {
        let seen = bell.count();
        match check() {
            Check::Ready(v) => return v,
            Check::Sleep(deadline) => bell.sleep_after(seen, deadline),
        }
    }
}

/// Sleeps on `bell` until `ready()` holds, `stop` happens or `deadline` (None: none) passes.
/// `ready` is asked first, so one that takes something (a slot) reports `Ready` when it did.
pub fn until(
    bell: &Bell,
    deadline: Option<Instant>,
    stop: Stop,
    mut ready: impl FnMut() -> bool,
) -> Woke {
    let mut woke = Woke::TimedOut;
    bell.wait_until(deadline, || {
        woke = match () {
            _ if ready() => Woke::Ready,
            _ if stop.requested() => Woke::Stopped,
            _ => return false,
        };
        true
    });
    woke
}

/// Sleeps until `deadline` unless `stop` happens first; true when it did.
pub fn pause(bell: &Bell, deadline: Instant, stop: Stop) -> bool {
    until(bell, Some(deadline), stop, || false) == Woke::Stopped
}

/// Values for one receiving thread, first in first out. A bounded mailbox makes a sender
/// wait for room (ended by a close: the receiver is gone); an unbounded one never does.
pub struct Mailbox<T> {
    state: Mutex<(VecDeque<T>, bool)>,
    /// Rung by a send, a take (room) and the close.
    bell: Bell,
    cap: usize,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Mailbox<T> {
        Mailbox::bounded(usize::MAX)
    }
}

impl<T> Mailbox<T> {
    /// Holds at most `cap` values.
    pub fn bounded(cap: usize) -> Mailbox<T> {
        Mailbox {
            state: Mutex::new((VecDeque::new(), false)),
            bell: Bell::default(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<T>, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `v` (waiting for room) and wakes the receiver; gives `v` back once the mailbox
    /// is closed.
    pub fn send(&self, v: T) -> Result<(), T> {
        let mut v = Some(v);
        let sent = next_ready(&self.bell, || {
            let mut s = self.lock();
            match v.take() {
                Some(v) if s.1 => Check::Ready(Err(v)),
                Some(v) if s.0.len() < self.cap => {
                    s.0.push_back(v);
                    Check::Ready(Ok(()))
                }
                taken => {
                    v = taken;
                    Check::Sleep(None)
                }
            }
        });
        self.bell.ring();
        sent
    }

    /// The next value; None once `deadline` passed or the mailbox is closed and empty.
    pub fn recv(&self, deadline: Option<Instant>) -> Option<T> {
        let mut got = None;
        until(&self.bell, deadline, Stop::Never, || {
            let mut s = self.lock();
            got = s.0.pop_front();
            got.is_some() || s.1
        });
        if got.is_some() {
            self.bell.ring();
        }
        got
    }

    /// The next value if one is queued, without waiting (for a thread that sleeps in
    /// poll(2) and is woken by its doorbell).
    pub fn try_recv(&self) -> Option<T> {
        let got = self.lock().0.pop_front();
        if got.is_some() {
            self.bell.ring();
        }
        got
    }

    /// No more sends (waiting senders get their value back); the receiver gets what is
    /// queued, then None.
    pub fn close(&self) {
        self.lock().1 = true;
        self.bell.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Generous for a loaded machine, far below the 30 s the waits below would otherwise take.
    const BOUND: Duration = Duration::from_secs(5);
    const FAR: Duration = Duration::from_secs(30);

    #[test]
    fn a_ring_after_the_change_wakes_the_waiter_and_a_deadline_ends_it() {
        let bell = Arc::new(Bell::default());
        let flag = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let short = Some(t0 + Duration::from_millis(50));
        assert_eq!(until(&bell, short, Stop::Never, || false), Woke::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let (b, f) = (bell.clone(), flag.clone());
        let t0 = Instant::now();
        let ringer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f.store(true, Ordering::SeqCst);
            b.ring();
        });
        let far = Some(Instant::now() + FAR);
        let woke = until(&bell, far, Stop::Never, || flag.load(Ordering::SeqCst));
        assert_eq!(woke, Woke::Ready);
        assert!(t0.elapsed() < BOUND, "{:?}", t0.elapsed());
        ringer.join().unwrap();
    }

    #[test]
    fn a_mailbox_hands_values_over_in_order_and_a_close_wakes_the_receiver() {
        let mb = Arc::new(Mailbox::default());
        let m = mb.clone();
        let t0 = Instant::now();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            m.send(1).unwrap();
            m.send(2).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            m.close();
            m.send(3)
        });
        let far = Some(Instant::now() + FAR);
        assert_eq!(mb.recv(far), Some(1));
        assert_eq!(mb.recv(far), Some(2));
        assert_eq!(mb.recv(far), None, "closed");
        assert!(t0.elapsed() < BOUND, "{:?}", t0.elapsed());
        assert_eq!(sender.join().unwrap(), Err(3));
        let full = Arc::new(Mailbox::bounded(1));
        full.send(1).unwrap();
        let f = full.clone();
        let t0 = Instant::now();
        let blocked = std::thread::spawn(move || (f.send(2), Instant::now()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished(), "no room: the sender waits");
        assert_eq!(full.try_recv(), Some(1));
        let (sent, at) = blocked.join().unwrap();
        assert_eq!(sent, Ok(()));
        assert!(at.duration_since(t0) < BOUND);
        let f = full.clone();
        let blocked = std::thread::spawn(move || f.send(3));
        std::thread::sleep(Duration::from_millis(50));
        full.close();
        assert_eq!(
            blocked.join().unwrap(),
            Err(3),
            "a close ends the wait for room"
        );
        let empty = Mailbox::<u8>::default();
        let t0 = Instant::now();
        assert_eq!(empty.recv(Some(t0 + Duration::from_millis(50))), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
    }

    /// Signals are process-wide: the test runs again in a child process of its own (this
    /// binary, this test only), so no other test sees them.
    #[test]
    fn a_signal_ends_shutdown_waits_and_a_second_one_cancel_waits() {
        const NAME: &str =
            "sys::wait::tests::a_signal_ends_shutdown_waits_and_a_second_one_cancel_waits";
        if std::env::var_os("MUVEE_WAIT_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env("MUVEE_WAIT_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        signal::install();
        let bell = Arc::new(Bell::default());
        signal::watch(bell.clone());
        let start = Instant::now();
        let far = Some(start + FAR);
        let waiter = |stop: Stop, deadline: Option<Instant>| {
            let b = bell.clone();
            std::thread::spawn(move || (until(&b, deadline, stop, || false), Instant::now()))
        };
        let on_shutdown = waiter(Stop::Shutdown, far);
        let on_cancel = waiter(Stop::Cancel, far);
        let never = waiter(Stop::Never, Some(start + Duration::from_secs(1)));
        // A thread in poll(2) on a doorbell attached to the bell (the control channel's).
        let door = Arc::new(Doorbell::new().unwrap());
        bell.attach(&door);
        let d = door.clone();
        let polling = std::thread::spawn(move || {
            let rung = poll_fds(&[(d.fd(), libc::POLLIN)], FAR);
            (rung[0] != 0, Instant::now())
        });
        // A build slot and an app's lock, both held: their waiters end on the cancel.
        let slots = Arc::new(crate::sys::sync::Semaphore::new(1, bell.clone()));
        let _slot = slots.acquire().unwrap();
        let s = slots.clone();
        let slot_waiter = std::thread::spawn(move || s.acquire().map(drop));
        let locks = Arc::new(crate::sys::sync::KeyedLocks::new(bell.clone()));
        let tasks = Arc::new(crate::sys::sync::Slots::new(bell.clone()));
        let (l, t, holding) = (
            locks.clone(),
            tasks.clone(),
            Arc::new(Mailbox::<()>::default()),
        );
        let h = holding.clone();
        std::thread::spawn(move || l.with("app", &t, || h.recv(None)));
        while locks.try_with("app", || ()).is_some() {
            std::thread::yield_now();
        }
        let lock_waiter = std::thread::spawn(move || locks.with("app", &tasks, || ()));
        std::thread::sleep(Duration::from_millis(100));
        let term = || {
            // SAFETY: a SIGTERM to this (child) process, whose handler only counts it.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            Instant::now()
        };
        let sent = term();
        let (woke, at) = on_shutdown.join().unwrap();
        assert_eq!(woke, Woke::Stopped);
        assert!(
            at.duration_since(sent) < BOUND,
            "{:?}",
            at.duration_since(sent)
        );
        let (rung, at) = polling.join().unwrap();
        assert!(
            rung && at.duration_since(sent) < BOUND,
            "the doorbell did not ring"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !on_cancel.is_finished() && !slot_waiter.is_finished() && !lock_waiter.is_finished()
        );
        let sent = term();
        let (woke, at) = on_cancel.join().unwrap();
        assert_eq!(woke, Woke::Stopped);
        assert!(
            at.duration_since(sent) < BOUND,
            "{:?}",
            at.duration_since(sent)
        );
        assert_eq!(slot_waiter.join().unwrap(), Err(Canceled));
        assert_eq!(lock_waiter.join().unwrap(), Err(Canceled));
        assert!(sent.elapsed() < BOUND, "{:?}", sent.elapsed());
        let (woke, at) = never.join().unwrap();
        assert_eq!(woke, Woke::TimedOut, "signals do not end a Never wait");
        assert!(at >= start + Duration::from_secs(1));
    }
}
