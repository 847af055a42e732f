//! SIGTERM/SIGINT handling: the handler bumps a counter and writes a byte to a self-pipe
//! (both async-signal-safe); a watcher thread blocked on the pipe rings the agent's bell, so
//! nothing polls for signals. First signal = stop polling and drain; second = cancel running
//! tasks. This file holds the crate's only `unsafe`, with the executor's process-group kill.

use crate::sys::bell::Bell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// The self-pipe's ends, -1 until `install`.
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    poke();
}

/// Wakes the watcher. Async-signal-safe; a full pipe already holds a wake-up.
fn poke() {
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    // SAFETY: write(2) on our own non-blocking fd from a one-byte buffer; errno is restored
    // because the handler may interrupt code that is about to read it.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        libc::write(fd, [1u8].as_ptr().cast(), 1);
        *errno = saved;
    }
}

/// Installs the handlers. A real handler (not SIG_IGN) is reset to default in children on
/// exec, and it gives PID 1 in a container a working SIGTERM.
pub fn install() {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into our array; fcntl only changes their flags.
    // O_CLOEXEC keeps them out of children, O_NONBLOCK keeps the handler from blocking.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) == 0 {
            let fl = libc::fcntl(fds[1], libc::F_GETFL);
            libc::fcntl(fds[1], libc::F_SETFL, fl | libc::O_NONBLOCK);
            PIPE_READ.store(fds[0], Ordering::SeqCst);
            PIPE_WRITE.store(fds[1], Ordering::SeqCst);
        }
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches atomics and write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Starts the thread that rings `bell` after every signal (and `force_cancel`). Once per
/// process; without `install` there is nothing to watch.
pub fn watch(bell: Arc<Bell>) {
    let fd = PIPE_READ.swap(-1, Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: read(2) into a buffer we own, at most its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    bell.ring();
                    continue;
                }
                let err = std::io::Error::last_os_error();
                if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("signal watcher stopped: {err}");
                return;
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal watcher thread: {e}");
    }
}

pub fn shutdown_requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) >= 1
}

/// True after a second signal, or once the shutdown grace has run out.
pub fn cancel_requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) >= 2
}

/// Escalates a graceful shutdown to a cancel (used when SHUTDOWN_GRACE expires); waiters are
/// woken as by a second signal.
pub fn force_cancel() {
    SIGNALS.fetch_max(2, Ordering::SeqCst);
    poke();
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

/// Blocks until child `pid` has exited, without reaping it (as [`exited_unreaped`]).
pub fn wait_exited_unreaped(pid: u32) {
    loop {
        // SAFETY: waitid only writes into the zeroed siginfo we own.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Sets O_NONBLOCK on `fd` (and on every descriptor sharing its open file).
pub fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when process `pid` exists (kill with signal 0: EPERM means it does, as another
/// user's).
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_signal_rings_the_bell_through_the_watcher() {
        install();
        let bell = Arc::new(Bell::default());
        watch(bell.clone());
        // SAFETY: one SIGTERM to ourselves; the handler above only bumps the counter (one
        // signal is a shutdown request, which no other unit test looks at).
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
        let t0 = Instant::now();
        while bell.rings() == 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(bell.rings(), 1, "the watcher rang once");
        assert!(shutdown_requested() && !cancel_requested());
    }
}
