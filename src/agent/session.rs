//! Deploy role: one control channel session (`open_exec` or `open_cp`, protocol §1.10) on a
//! thread of its own, so nothing that runs docker runs on the socket thread.
//!
//! A session reaches only this node's apps (`lifecycle::node_container`); anything else gets
//! an `error` frame. Its input waits in an [`Inbox`] bounded by bytes that the socket thread
//! fills without ever waiting. The session writes that input to the PTY or to `docker cp`
//! without blocking, so a program that does not read its input can still be closed; while its
//! input waits the session takes no more frames, and the inbox fills (the socket thread then
//! ends the session, or for a `cp up` holds the upload back). `close`, or the channel
//! dropping, kills the process inside the container too (docker leaves an exec'd process
//! running when its client goes): exec'd processes carry a marker in their environment that
//! `Docker::kill_marked` looks for.

use crate::agent::frame::{Frame, Out};
use crate::config::Config;
use crate::sys::docker::Docker;
use crate::sys::sync::random_u64;
use crate::sys::{signal, wait};
use crate::work::ctx::Shared;
use crate::work::lifecycle;
use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Input bytes waiting for one session; a single frame larger than this is refused.
pub const INBOX_BYTES: usize = 2 << 20;
const PTY_CHUNK: usize = 4096;
/// After a resize the docker client is told again (see `exec`) after this gap, then after
/// twice the gap before, up to [`REWINCH_LAST`]: at 1, 3, 7 and 15 s.
const REWINCH_FIRST: Duration = Duration::from_secs(1);
const REWINCH_LAST: Duration = Duration::from_secs(8);
const CP_CHUNK: usize = 32 * 1024;
/// The environment variable that marks an exec'd process as this session's.
const MARKER: &str = "MUVEE_EXEC_SESSION";

/// Why a session could not start or went wrong; its text goes out as an `error` frame.
#[derive(Debug)]
pub enum SessionError {
    /// Missing or unusable fields, worded as the Go agent words them.
    Refused(&'static str),
    /// A PTY, pipe or thread could not be made, or docker could not be started.
    Setup(&'static str, std::io::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Refused(m) => f.write_str(m),
            SessionError::Setup(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionError::Refused(_) => None,
            SessionError::Setup(_, e) => Some(e),
        }
    }
}

fn ioe(e: std::io::Error) -> SessionError {
    SessionError::Setup("session setup", e)
}

/// What became of a frame the socket thread offered to a session.
pub enum Push {
    Queued,
    /// No room now: the session has not taken its earlier input yet.
    Full(Box<Frame>),
    /// Larger than a whole inbox: it can never be taken.
    TooBig,
    /// The session has finished.
    Ended,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// `close` came, or the socket side let go (overflow, or the connection ended): the
    /// session ends even while its input waits.
    closed: bool,
    /// The session thread finished.
    ended: bool,
    /// A push found no room: ring the socket thread when room appears.
    waited: bool,
}

/// One session's input, bounded by bytes, and the doorbell its thread sleeps on.
pub struct Inbox {
    state: Mutex<State>,
    bell: wait::Doorbell,
    /// The socket thread's doorbell: rung when room appears after a `Full`, and at the end.
    socket: Arc<wait::Doorbell>,
}

fn weight(f: &Frame) -> usize {
    64 + f.data.len() + f.cmd.iter().map(String::len).sum::<usize>()
}

impl Inbox {
    fn new(socket: Arc<wait::Doorbell>) -> std::io::Result<Inbox> {
        Ok(Inbox {
            state: Mutex::default(),
            bell: wait::Doorbell::new()?,
            socket,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Never waits (the socket thread calls it). `close` is not queued: it ends the session
    /// even behind input the program does not read.
    pub fn push(&self, f: Frame) -> Push {
        let size = weight(&f);
        let mut s = self.lock();
        if s.ended {
            return Push::Ended;
        }
        if f.kind == "close" {
            s.closed = true;
            drop(s);
            self.bell.ring();
            return Push::Queued;
        }
        if size > INBOX_BYTES {
            return Push::TooBig;
        }
        if s.bytes + size > INBOX_BYTES {
            s.waited = true;
            return Push::Full(Box::new(f));
        }
        s.bytes += size;
        s.frames.push_back(f);
        drop(s);
        self.bell.ring();
        Push::Queued
    }

    fn pop(&self) -> Option<Frame> {
        let mut s = self.lock();
        let f = s.frames.pop_front()?;
        s.bytes -= weight(&f);
        if std::mem::take(&mut s.waited) {
            self.socket.ring();
        }
        Some(f)
    }

    fn closed(&self) -> bool {
        self.lock().closed
    }

    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// The session finished: what still waits is dropped now, not when the socket thread
    /// next looks.
    fn end(&self) {
        let mut s = self.lock();
        s.ended = true;
        s.frames.clear();
        s.bytes = 0;
        drop(s);
        self.socket.ring();
    }
}

/// The socket thread's hold on a session: dropping it (overflow, or the connection ended)
/// ends the session and kills its process.
pub struct Session {
    pub inbox: Arc<Inbox>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.inbox.lock().closed = true;
        self.inbox.bell.ring();
    }
}

/// Checks the fields (no docker here: this runs on the socket thread) and starts the thread.
pub fn start(
    f: Frame,
    cfg: &Arc<Config>,
    shared: &Arc<Shared>,
    out: &Out,
) -> Result<Session, SessionError> {
    check(&f)?;
    let inbox = Arc::new(Inbox::new(out.bell.clone()).map_err(ioe)?);
    let run = Run {
        f,
        inbox: inbox.clone(),
        out: out.clone(),
        cfg: cfg.clone(),
        shared: shared.clone(),
        rewinch: Cell::new(None),
    };
    std::thread::Builder::new()
        .name("session".into())
        .spawn(move || run.run())
        .map_err(|e| SessionError::Setup("cannot start a session thread", e))?;
    Ok(Session { inbox })
}

fn check(f: &Frame) -> Result<(), SessionError> {
    let exec = f.kind == "open_exec";
    let target = match f.domain_prefix.as_str() {
        "" => &f.container,
        p => p,
    };
    let named = !f.session.is_empty() && valid_container(target);
    if exec && (!named || f.cmd.is_empty()) {
        return Err(SessionError::Refused(
            "open_exec requires session/container/cmd",
        ));
    }
    if !exec && (!named || f.path.is_empty()) {
        return Err(SessionError::Refused(
            "open_cp requires session/container/path",
        ));
    }
    if !exec && f.direction != "up" && f.direction != "down" {
        return Err(SessionError::Refused(
            "open_cp direction must be 'up' or 'down'",
        ));
    }
    Ok(())
}

/// A container name or id: no option-like or path-like values reach docker's argv.
pub fn valid_container(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// How the session's process ended.
#[derive(PartialEq, Eq)]
enum End {
    Exited,
    /// `close`, or the socket side let go: we kill it.
    Closed,
}

/// Input waiting for a non-blocking fd (the PTY, `docker cp`'s stdin).
struct Sink {
    file: File,
    pending: Vec<u8>,
}

impl Sink {
    /// Writes what the fd takes now; true while some input still waits. Err: the reader is
    /// gone (its process ended), and the rest is dropped.
    fn flush(&mut self) -> std::io::Result<bool> {
        while !self.pending.is_empty() {
            match self.file.write(&self.pending) {
                Ok(n) => drop(self.pending.drain(..n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

/// One session's thread.
struct Run {
    f: Frame,
    inbox: Arc<Inbox>,
    out: Out,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    /// When to tell the docker client again that the PTY was resized (see `exec`), and the
    /// gap that led there.
    rewinch: Cell<Option<(Instant, Duration)>>,
}

impl Run {
    fn run(self) {
        let docker = self.shared.docker(&self.cfg);
        let (prefix, name) = (&self.f.domain_prefix, &self.f.container);
        let session = self.f.session.as_str();
        let last = match lifecycle::node_container(&docker, &self.cfg, prefix, name) {
            Ok(Some(c)) => {
                let r = match self.f.kind.as_str() {
                    "open_exec" => self.exec(&docker, &c),
                    _ => self.cp(&docker, &c),
                };
                match r {
                    Ok(code) => Frame {
                        code,
                        ..Frame::new("exit", session)
                    },
                    Err(e) => Frame::error(session, &e.to_string()),
                }
            }
            Ok(None) => {
                let what = match prefix.as_str() {
                    "" => format!("container {name:?}"),
                    p => format!("app {p:?}"),
                };
                let msg = format!("{what} has no container among this node's apps");
                Frame::error(session, &msg)
            }
            Err(e) => Frame::error(session, &format!("cannot look up the container: {e}")),
        };
        // Ended first: once the CLI sees the exit, the session no longer counts.
        self.inbox.end();
        let _ = self.out.send(last);
    }

    /// Takes frames until the process exits or the session is closed. A frame is taken
    /// only once the input before it was written: what waits stays in the inbox.
    fn serve(
        &self,
        child: &Child,
        sink: &mut Option<Sink>,
        mut each: impl FnMut(Frame, &mut Option<Sink>),
    ) -> End {
        let pid = child.id();
        let end = loop {
            if signal::exited_unreaped(pid) {
                break End::Exited;
            }
            if self.inbox.closed() {
                break End::Closed;
            }
            let now = Instant::now();
            if let Some((_, gap)) = self.rewinch.get().filter(|(t, _)| *t <= now) {
                let gap = gap * 2;
                self.rewinch
                    .set((gap <= REWINCH_LAST).then_some((now + gap, gap)));
                signal::kill_group(pid, libc::SIGWINCH);
            }
            let busy = match sink.as_mut().map(Sink::flush) {
                Some(Ok(busy)) => busy,
                Some(Err(_)) => {
                    *sink = None;
                    false
                }
                None => false,
            };
            if !busy {
                if let Some(fr) = self.inbox.pop() {
                    each(fr, sink);
                    continue;
                }
            }
            let mut fds = vec![(self.inbox.bell.fd(), libc::POLLIN)];
            if let Some(s) = sink.as_ref().filter(|_| busy) {
                fds.push((s.file.as_raw_fd(), libc::POLLOUT));
            }
            let wait = match self.rewinch.get() {
                Some((t, _)) => t.saturating_duration_since(now),
                None => Duration::from_secs(3600),
            };
            wait::poll_fds(&fds, wait);
            self.inbox.bell.drain();
        };
        end
    }

    /// Waits (on the bell the exit watcher rings) until `child` exited, then reaps it.
    fn reap(
        &self,
        child: &mut Child,
        watcher: std::thread::JoinHandle<()>,
    ) -> std::io::Result<std::process::ExitStatus> {
        while !signal::exited_unreaped(child.id()) {
            wait::poll_fds(
                &[(self.inbox.bell.fd(), libc::POLLIN)],
                Duration::from_secs(3600),
            );
            self.inbox.bell.drain();
        }
        let _ = watcher.join();
        child.wait()
    }

    /// Rings the session's bell when `child` exits (so `serve` sleeps instead of polling).
    fn watch(&self, child: &Child) -> std::thread::JoinHandle<()> {
        let (pid, inbox) = (child.id(), self.inbox.clone());
        std::thread::spawn(move || {
            signal::wait_exited_unreaped(pid);
            inbox.bell.ring();
        })
    }

    /// `docker exec -ti` under a PTY sized cols×rows: output goes out as `stdout` chunks,
    /// `stdio` input is typed in, `resize` resizes, `close` kills it (in the container too).
    fn exec(&self, docker: &Docker, container: &str) -> Result<i64, SessionError> {
        let f = &self.f;
        let marker = format!("{MARKER}={:016x}", random_u64());
        let (master, slave) =
            openpty(winsize(f.cols, f.rows)).map_err(|e| SessionError::Setup("openpty", e))?;
        let mut cmd = docker.exec_tty(container, &f.cmd, &marker);
        let io = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        let (i, o, e) = (io(&slave), io(&slave), io(&slave));
        cmd.stdin(i.map_err(ioe)?)
            .stdout(o.map_err(ioe)?)
            .stderr(e.map_err(ioe)?);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| SessionError::Setup("docker exec", e))?;
        // The master reads EIO (the end) only once no slave fd is left open here.
        drop(cmd);
        drop(slave);
        let watcher = self.watch(&child);
        signal::set_nonblocking(master.as_raw_fd()).map_err(ioe)?;
        let pump = pump_pty(
            File::from(master.try_clone().map_err(ioe)?),
            &self.out,
            &f.session,
        );
        let mut sink = Some(Sink {
            file: File::from(master.try_clone().map_err(ioe)?),
            pending: Vec::new(),
        });
        let end = self.serve(&child, &mut sink, |fr, sink| match fr.kind.as_str() {
            "stdio" => {
                if let Some(s) = sink {
                    s.pending = fr.bytes();
                }
            }
            "resize" => {
                let ws = winsize(fr.cols, fr.rows);
                // SAFETY: TIOCSWINSZ with a valid winsize on our own master fd.
                unsafe {
                    libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
                }
                // The docker client forwards the size on SIGWINCH, but ignores the signal
                // until the daemon answered its own first resize (made with the size the
                // PTY had then), which a busy engine answers seconds late. So it is told
                // again at growing gaps; the same size again changes nothing in the
                // container.
                self.rewinch
                    .set(Some((Instant::now() + REWINCH_FIRST, REWINCH_FIRST)));
            }
            _ => {}
        });
        if end == End::Closed {
            if let Err(e) = docker.kill_marked(container, &marker) {
                log::warn!(
                    "control channel: cannot kill the session's process in {container}: {e}"
                );
            }
            signal::kill_group(child.id(), libc::SIGKILL);
        }
        let status = self.reap(&mut child, watcher);
        drop(sink);
        let _ = pump.join();
        Ok(exit_code(status, end))
    }

    /// `docker cp` up (tar from `cp_up_tar` frames into the container) or down (the
    /// container's tar out as `cp_down_tar` chunks). A download always ends with `cp_end`,
    /// then a failure's text as `stderr`, then `exit`, in the Go agent's order (muveectl waits
    /// for `cp_end` before it reads the exit code).
    fn cp(&self, docker: &Docker, container: &str) -> Result<i64, SessionError> {
        let f = &self.f;
        let up = f.direction == "up";
        let mut cmd = docker.cp_tar(container, &f.path, up);
        cmd.stdin(if up { Stdio::piped() } else { Stdio::null() })
            .stdout(if up { Stdio::null() } else { Stdio::piped() })
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| SessionError::Setup("docker cp", e))?;
        let watcher = self.watch(&child);
        let errs = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = e.by_ref().take(64 * 1024).read_to_end(&mut s);
                s
            })
        });
        let pump = child
            .stdout
            .take()
            .map(|o| pump_down(o, &self.out, &f.session));
        let mut sink = match child.stdin.take() {
            Some(i) => {
                let file = File::from(OwnedFd::from(i));
                signal::set_nonblocking(file.as_raw_fd()).map_err(ioe)?;
                Some(Sink {
                    file,
                    pending: Vec::new(),
                })
            }
            None => None,
        };
        let end = self.serve(&child, &mut sink, |fr, sink| match fr.kind.as_str() {
            "cp_up_tar" => {
                if let Some(s) = sink {
                    s.pending = fr.bytes();
                }
            }
            "cp_end" => *sink = None,
            _ => {}
        });
        drop(sink);
        if end == End::Closed {
            signal::kill_group(child.id(), libc::SIGKILL);
        }
        let status = self.reap(&mut child, watcher);
        if let Some(p) = pump {
            let _ = p.join();
        }
        let code = exit_code(status, end);
        if !up {
            let _ = self.out.send(Frame::new("cp_end", &f.session));
        }
        let text = errs.and_then(|t| t.join().ok()).unwrap_or_default();
        if code != 0 && !text.is_empty() {
            let mut fr = Frame::with_data("stdio", &f.session, &text);
            fr.stream = "stderr".into();
            let _ = self.out.send(fr);
        }
        Ok(code)
    }
}

/// The PTY's output as `stdout` chunks until EIO (no process holds the slave any more).
fn pump_pty(mut pty: File, out: &Out, session: &str) -> std::thread::JoinHandle<()> {
    let (out, session) = (out.clone(), session.to_string());
    std::thread::spawn(move || {
        let mut buf = [0u8; PTY_CHUNK];
        loop {
            match pty.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut fr = Frame::with_data("stdio", &session, &buf[..n]);
                    fr.stream = "stdout".into();
                    if out.send(fr).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fds = [(pty.as_raw_fd(), libc::POLLIN)];
                    wait::poll_fds(&fds, Duration::from_secs(3600));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// `docker cp`'s tar as `cp_down_tar` chunks until EOF.
fn pump_down(
    mut o: std::process::ChildStdout,
    out: &Out,
    session: &str,
) -> std::thread::JoinHandle<()> {
    let (out, session) = (out.clone(), session.to_string());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CP_CHUNK];
        while let Ok(n @ 1..) = o.read(&mut buf) {
            if out
                .send(Frame::with_data("cp_down_tar", &session, &buf[..n]))
                .is_err()
            {
                break;
            }
        }
    })
}

/// The exit code to report: killed by us (close) or by a signal → -1.
fn exit_code(status: std::io::Result<std::process::ExitStatus>, end: End) -> i64 {
    match status {
        Ok(s) if end == End::Exited => s.code().map_or(-1, i64::from),
        _ => -1,
    }
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A PTY pair sized `ws`, both ends close-on-exec from the start: a session thread forking
/// its docker client at the same moment must not carry this session's slave away (the
/// master would then never read EIO when this session's process ends).
fn openpty(ws: libc::winsize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let last = std::io::Error::last_os_error;
    // SAFETY: posix_openpt returns a new fd (or -1) that we then own.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(last());
    }
    // SAFETY: m was just returned to us and is owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt on our master; ptsname_r writes a NUL-terminated name into
    // our buffer of the given length.
    unsafe {
        if libc::grantpt(m) != 0
            || libc::unlockpt(m) != 0
            || libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(last());
        }
    }
    // SAFETY: name is NUL-terminated (ptsname_r succeeded); open returns a new fd or -1.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(last());
    }
    // SAFETY: s was just returned to us and is owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: TIOCSWINSZ with a valid winsize on our own master fd.
    if unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(last());
    }
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: &str, data: &[u8]) -> Frame {
        Frame::with_data(kind, "s", data)
    }

    #[test]
    fn the_inbox_is_bounded_by_bytes_and_rings_the_socket_when_room_appears() {
        let socket = Arc::new(wait::Doorbell::new().unwrap());
        let inbox = Inbox::new(socket.clone()).unwrap();
        let big = vec![7u8; INBOX_BYTES / 2];
        assert!(matches!(inbox.push(frame("cp_up_tar", &big)), Push::Queued));
        assert!(matches!(
            inbox.push(frame("cp_up_tar", &big)),
            Push::Full(_)
        ));
        assert!(matches!(
            inbox.push(frame("stdio", &vec![0; INBOX_BYTES])),
            Push::TooBig
        ));
        socket.drain();
        assert!(inbox.pop().is_some());
        let rung = wait::poll_fds(&[(socket.fd(), libc::POLLIN)], Duration::ZERO);
        assert_ne!(rung[0], 0, "room after a Full must wake the socket thread");
        assert!(matches!(inbox.push(frame("cp_up_tar", &big)), Push::Queued));
        // `close` gets through a full inbox.
        assert!(matches!(
            inbox.push(frame("cp_up_tar", &big)),
            Push::Full(_)
        ));
        assert!(!inbox.closed());
        assert!(matches!(inbox.push(Frame::new("close", "s")), Push::Queued));
        assert!(inbox.closed());
        inbox.end();
        assert!(matches!(inbox.push(frame("stdio", b"x")), Push::Ended));
    }

    #[test]
    fn fields_are_checked_before_anything_runs() {
        let mut f = Frame::new("open_exec", "s1");
        f.container = "muvee-app".into();
        assert_eq!(
            check(&f).unwrap_err().to_string(),
            "open_exec requires session/container/cmd"
        );
        f.cmd = vec!["sh".into()];
        assert!(check(&f).is_ok());
        f.container = "-v".into();
        assert!(check(&f).is_err());
        f.domain_prefix = "app".into();
        assert!(check(&f).is_ok());
        assert!(valid_container("muvee-app") && !valid_container("-v") && !valid_container("a/b"));
    }
}
