//! SIGTERM/SIGINT handling: the handler only bumps a counter (async-signal-safe).
//! First signal = stop polling and drain; second = cancel running tasks.
//! This file holds the crate's only `unsafe`, with the executor's process-group kill.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs the handlers. A real handler (not SIG_IGN) is reset to default in children on
/// exec, and it gives PID 1 in a container a working SIGTERM.
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn shutdown_requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) >= 1
}

/// True after a second signal, or once the shutdown grace has run out.
pub fn cancel_requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) >= 2
}

/// Escalates a graceful shutdown to a cancel (used when SHUTDOWN_GRACE expires).
pub fn force_cancel() {
    SIGNALS.fetch_max(2, Ordering::SeqCst);
}

/// Sends `sig` to a whole process group.
pub fn kill_group(pgid: u32, sig: libc::c_int) {
    // kill(0) would hit our own group and kill(-1) every process we may signal.
    if pgid <= 1 || pgid > libc::pid_t::MAX as u32 {
        return;
    }
    // SAFETY: plain syscall; a negative pid addresses the group.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

/// True once child `pid` has exited, without reaping it (WNOWAIT): the zombie keeps the pid
/// and its process-group number reserved until `Child::wait`.
pub fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: waitid only writes into the zeroed siginfo we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) == 0 && info.si_pid() != 0
    }
}

/// Sleeps up to `total`, waking early on a shutdown signal or when `wake` returns true.
/// `thread::sleep` resumes after signals, so sleep in short slices.
pub fn sleep_unless(total: Duration, wake: impl Fn() -> bool) {
    let end = Instant::now() + total;
    while !shutdown_requested() && !wake() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}
