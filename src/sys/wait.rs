//! How a thread of this agent waits. There are three ways, all here, and nothing else
//! blocks a thread (no sleeping in short slices, no bare condvars or channels):
//!
//! * [`until`] / [`pause`] / [`next`]: state shared between threads (a build slot, an app's
//!   lock, the running tasks, a queue of reports or log lines). The thread sleeps on the
//!   [`Bell`] of that state; whoever changes the state rings that bell after the change. A
//!   ring between the check and the sleep is never lost (the bell counts its rings).
//! * [`Mailbox`]: values handed to one thread (a name lookup and its answer). A send or a
//!   close wakes the receiver.
//! * [`Doorbell`] in `poll(2)`: a thread that also waits for a file descriptor (the control
//!   channel's socket). The descriptor or a ring wakes it.
//!
//! What ends a wait early is named where it waits, as a [`Stop`]:
//!
//! * [`Stop::Shutdown`]: the first SIGTERM/SIGINT. For loops that look for new work or report
//!   on a schedule (the poll loop, the periodic reports, the control channel's re-dial).
//! * [`Stop::Cancel`]: the tasks' cancel, a second signal or SHUTDOWN_GRACE running out
//!   ([`signal::force_cancel`]). For every wait inside a task (a build slot, an app's or a
//!   dataset's lock, a drain, the pause between health probes): a canceled task never waits
//!   for anything but its own cleanup.
//! * [`Stop::Never`]: only the condition or the deadline ends it. For the shutdown itself
//!   (tasks ending, reports going out) and for queues that end by being closed.
//!
//! Signals ring only the agent's bell (`Shared::bell`, handed to `signal::watch`), so a wait
//! with `Shutdown` or `Cancel` sleeps on that bell; it is also rung when a task ends and when
//! a slot or lock is freed. A queue's own bell (outbox, log shipper) is rung by new work and
//! by its close, and its waits use `Never`. Joining a thread is a wait too: only threads whose
//! own waits end on the same stop are joined.

pub use crate::sys::bell::Bell;
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

/// What a [`next`] check found.
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

/// [`next_ready`] that also ends, with None, when `stop` happens first.
pub fn next<T>(bell: &Bell, stop: Stop, mut check: impl FnMut() -> Check<T>) -> Option<T> {
    next_ready(bell, || match check() {
        Check::Ready(v) => Check::Ready(Some(v)),
        Check::Sleep(_) if stop.requested() => Check::Ready(None),
        Check::Sleep(deadline) => Check::Sleep(deadline),
    })
}

/// Sleeps on `bell` until `ready()` holds, `stop` happens or `deadline` (None: none) passes.
/// `ready` is asked first, so one that takes something (a slot) reports `Ready` when it did.
pub fn until(
    bell: &Bell,
    deadline: Option<Instant>,
    stop: Stop,
    mut ready: impl FnMut() -> bool,
) -> Woke {
    let check = || match deadline {
        _ if ready() => Check::Ready(Woke::Ready),
        Some(d) if Instant::now() >= d => Check::Ready(Woke::TimedOut),
        _ => Check::Sleep(deadline),
    };
    next(bell, stop, check).unwrap_or(Woke::Stopped)
}

/// Sleeps until `deadline` unless `stop` happens first; true when it did.
pub fn pause(bell: &Bell, deadline: Instant, stop: Stop) -> bool {
    until(bell, Some(deadline), stop, || false) == Woke::Stopped
}

/// Values for one receiving thread, first in first out. Unbounded: senders never wait.
pub struct Mailbox<T> {
    state: Mutex<(VecDeque<T>, bool)>,
    bell: Bell,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Mailbox<T> {
        Mailbox {
            state: Mutex::new((VecDeque::new(), false)),
            bell: Bell::default(),
        }
    }
}

impl<T> Mailbox<T> {
    /// Queues `v` and wakes the receiver; gives `v` back once the mailbox is closed.
    pub fn send(&self, v: T) -> Result<(), T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 {
            return Err(v);
        }
        s.0.push_back(v);
        drop(s);
        self.bell.ring();
        Ok(())
    }

    /// The next value; None once `deadline` passed or the mailbox is closed and empty.
    pub fn recv(&self, deadline: Option<Instant>) -> Option<T> {
        let mut got = None;
        until(&self.bell, deadline, Stop::Never, || {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            got = s.0.pop_front();
            got.is_some() || s.1
        });
        got
    }

    /// No more sends; the receiver gets what is queued, then None.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
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
