//! The one place that runs external programs (git, docker, rsync). Argv only, never a shell.
//! Output is streamed line by line (invalid UTF-8 tolerated), scrubbed of secrets, handed to
//! a callback and kept in a bounded tail for error messages. Every call runs in its own
//! process group so a timeout or cancel kills the whole tree.

use crate::sys::{redact, signal};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines kept for error messages.
const TAIL_LINES: usize = 20;
/// Bytes of stdout kept for callers that parse it (`docker port`, `git rev-parse`).
const STDOUT_CAP: usize = 1 << 20;
/// A newline-less stream is cut into lines of this size so memory stays bounded.
const MAX_LINE: usize = 16 * 1024;
/// Bytes a pipe reader takes per read(2): lines travel to the consumer in chunks this big.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks in flight between the pipe readers and the consumer (bounded memory).
const CHANNEL_CHUNKS: usize = 16;
/// How often the consumer checks the child's state and limits while output flows.
const TICK: Duration = Duration::from_millis(100);
/// The longest a silent child goes unchecked (cancel, a leader that exited while a
/// grandchild holds the pipes): bounded latency without waking ten times a second.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Grace between SIGTERM and SIGKILL for a process group.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Environment variables never passed to children: the agent's own credentials.
const SCRUBBED_ENV: &[&str] = &["AGENT_SECRET", "REGISTRY_PASSWORD"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A command to run. Values in `env` and `stdin` never show up in argv.
#[derive(Clone, Debug, Default)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    /// Absolute deadline for this call.
    pub deadline: Option<Deadline>,
    /// Kill when no output arrives for this long.
    pub idle_timeout: Option<Duration>,
    /// Name used in messages ("docker buildx build"); defaults to program + first word.
    pub label: Option<String>,
    /// Working directory (the agent's own when None).
    pub dir: Option<std::path::PathBuf>,
    /// Killed at the first SIGTERM, not only at cancel: the periodic reports' commands,
    /// which must not outlive the agent.
    pub stop_at_shutdown: bool,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd {
            program: program.into(),
            ..Cmd::default()
        }
    }
    pub fn arg(mut self, a: impl Into<OsString>) -> Cmd {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, it: I) -> Cmd {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Cmd {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }
    /// `what` names the setting in the timeout message, e.g. "BUILD_TIMEOUT".
    pub fn timeout(self, d: Duration, what: &'static str) -> Cmd {
        self.deadline(Instant::now() + d, d, what)
    }
    /// A deadline shared by several calls (a whole build); `total` is for the message.
    pub fn deadline(mut self, at: Instant, total: Duration, what: &'static str) -> Cmd {
        self.deadline = Some(Deadline {
            at,
            total,
            setting: what,
        });
        self
    }
    pub fn limits(mut self, l: Limits) -> Cmd {
        self.deadline = l.deadline.or(self.deadline);
        self.idle_timeout = l.idle.or(self.idle_timeout);
        self
    }
    #[cfg(test)]
    pub fn idle_timeout(mut self, d: Duration) -> Cmd {
        self.idle_timeout = Some(d);
        self
    }
    pub fn label(mut self, l: impl Into<String>) -> Cmd {
        self.label = Some(l.into());
        self
    }
    pub fn current_dir(mut self, d: impl Into<std::path::PathBuf>) -> Cmd {
        self.dir = Some(d.into());
        self
    }

    pub fn name(&self) -> String {
        if let Some(l) = &self.label {
            return l.clone();
        }
        let prog = self.program.rsplit('/').next().unwrap_or(&self.program);
        match self.args.first().and_then(|a| a.to_str()) {
            Some(a) if !a.starts_with('-') => format!("{prog} {a}"),
            _ => prog.to_string(),
        }
    }

    /// The argv as a redacted string, for debug logs.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        redact::scrub(&s).into_owned()
    }
}

/// When a call (or a group of calls, such as a whole build) must be over.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub at: Instant,
    /// How long the limit was, for the message.
    pub total: Duration,
    /// The setting that sets it, e.g. "BUILD_TIMEOUT".
    pub setting: &'static str,
}

impl Deadline {
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
}

/// The limits of one step: an overall deadline and an idle timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub deadline: Option<Deadline>,
    /// Kill when no output arrives for this long.
    pub idle: Option<Duration>,
}

/// The seam under every external command: the real one starts processes, unit tests use
/// a scripted one (`sys::fake`). Roles reach it through their task context.
pub trait Runner: Send + Sync {
    /// Runs `cmd`, calling `on_line` with every scrubbed output line.
    fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError>;

    /// Runs a short command whose lines are only captured.
    fn output(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        self.run(cmd, &mut |_, _| {})
    }
}

/// Real processes, through [`run`].
pub struct System;

impl Runner for System {
    fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError> {
        run(cmd, on_line)
    }
}

/// What a finished command left behind.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Stdout, capped at 1 MiB, already scrubbed.
    pub stdout: String,
    /// Last lines of stdout+stderr in arrival order, scrubbed.
    pub tail: Vec<String>,
}

#[derive(Debug)]
pub enum ExecError {
    Spawn {
        name: String,
        err: std::io::Error,
    },
    Exit {
        name: String,
        code: i32,
        output: Output,
    },
    Signal {
        name: String,
        sig: i32,
        output: Output,
    },
    Timeout {
        name: String,
        after: Duration,
        what: &'static str,
        output: Output,
    },
    Idle {
        name: String,
        after: Duration,
        output: Output,
    },
    Canceled,
}

impl ExecError {
    pub fn output(&self) -> Option<&Output> {
        match self {
            ExecError::Exit { output, .. }
            | ExecError::Signal { output, .. }
            | ExecError::Timeout { output, .. }
            | ExecError::Idle { output, .. } => Some(output),
            _ => None,
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Spawn { name, err } if err.kind() == std::io::ErrorKind::NotFound => {
                let prog = name.split(' ').next().unwrap_or(name);
                write!(f, "{name}: `{prog}` not found on PATH")
            }
            ExecError::Spawn { name, err } => write!(f, "{name}: cannot start: {err}"),
            ExecError::Exit { name, code, .. } => write!(f, "{name} exited {code}"),
            ExecError::Signal { name, sig, .. } => write!(f, "{name} was killed by signal {sig}"),
            ExecError::Timeout {
                name, after, what, ..
            } => {
                write!(
                    f,
                    "{name} timed out after {} ({what})",
                    fmt_duration(*after)
                )
            }
            ExecError::Idle { name, after, .. } => {
                write!(
                    f,
                    "{name} produced no output for {} and was killed",
                    fmt_duration(*after)
                )
            }
            ExecError::Canceled => write!(f, "canceled: agent shutting down"),
        }?;
        if let Some(out) = self.output() {
            if !out.tail.is_empty() {
                write!(f, ": {}", out.tail.join("\n"))?;
            }
        }
        Ok(())
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

enum Event {
    /// Complete lines, each ending in '\n', as the pipe delivered them.
    Lines(Stream, Vec<u8>),
    Eof,
}

/// How long pumping goes on after the leader exited while a grandchild keeps the pipes open.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// Runs `cmd`, calling `on_line` with every scrubbed output line. Returns the captured
/// output on exit 0; any other ending is an [`ExecError`] whose text says what ran, how it
/// ended and the last lines it printed.
pub fn run(cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError> {
    if signal::cancel_requested() {
        return Err(ExecError::Canceled);
    }
    log::debug!("running: {}", cmd.display());
    let mut running = Running::spawn(cmd)?;
    running.pump(on_line);
    running.finish()
}

/// Runs a short command, ignoring its output lines (they are still captured).
#[cfg(test)]
pub fn output(cmd: &Cmd) -> Result<Output, ExecError> {
    run(cmd, &mut |_, _| {})
}

/// Why the agent ended a call itself, with the limit that was hit.
#[derive(Clone, Copy)]
enum Ending {
    Canceled,
    Timeout(Deadline),
    Idle(Duration),
}

impl Ending {
    fn describe(self) -> &'static str {
        match self {
            Ending::Canceled => "canceled",
            Ending::Timeout(_) => "timed out",
            Ending::Idle(_) => "no output for too long",
        }
    }

    fn into_error(self, name: String, output: Output) -> ExecError {
        match self {
            Ending::Canceled => ExecError::Canceled,
            Ending::Timeout(d) => ExecError::Timeout {
                name,
                after: d.total,
                what: d.setting,
                output,
            },
            Ending::Idle(after) => ExecError::Idle {
                name,
                after,
                output,
            },
        }
    }
}

/// A group kill under way: SIGTERM went out at `since`, SIGKILL follows after [`KILL_GRACE`].
struct Kill {
    since: Instant,
    ending: Ending,
}

impl Kill {
    /// Logs the reason and sends SIGTERM to the group.
    fn start(name: &str, pgid: u32, ending: Ending) -> Kill {
        log::warn!(
            "{name}: {}; sending SIGTERM to its process group",
            ending.describe()
        );
        signal::kill_group(pgid, libc::SIGTERM);
        Kill {
            since: Instant::now(),
            ending,
        }
    }

    /// Sends SIGKILL (again on every tick) once the grace has run out.
    fn escalate(&self, pgid: u32) {
        if self.since.elapsed() >= KILL_GRACE {
            signal::kill_group(pgid, libc::SIGKILL);
        }
    }
}

/// A started child in its own process group and what it has printed so far.
struct Running<'a> {
    cmd: &'a Cmd,
    name: String,
    child: Child,
    pgid: u32,
    readers: [Option<JoinHandle<()>>; 2],
    rx: mpsc::Receiver<Event>,
    out: Output,
    tail: VecDeque<String>,
    /// Line boundaries of the chunk at hand (kept to reuse its allocation).
    ranges: Vec<(usize, usize)>,
    /// When the child's state and the limits were last checked.
    checked: Instant,
    eofs: usize,
    // The leader is only reaped at the very end: until then its pid stays reserved, so a
    // group kill can never reach an unrelated process that reused the number.
    exited_at: Option<Instant>,
    last_output: Instant,
    killing: Option<Kill>,
}

impl<'a> Running<'a> {
    /// Starts the child with a stdin writer thread and one reader thread per output pipe.
    fn spawn(cmd: &'a Cmd) -> Result<Running<'a>, ExecError> {
        let name = cmd.name();
        let mut child = command(cmd).spawn().map_err(|err| ExecError::Spawn {
            name: name.clone(),
            err,
        })?;
        if let (Some(data), Some(mut pipe)) = (cmd.stdin.clone(), child.stdin.take()) {
            // A writer thread, so a child that does not read stdin cannot block us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        // Bounded: a child that prints faster than we consume blocks on its pipe instead of
        // growing our memory (at most CHANNEL_CHUNKS chunks in flight).
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CHUNKS);
        let readers = [
            spawn_reader(child.stdout.take(), Stream::Stdout, tx.clone()),
            spawn_reader(child.stderr.take(), Stream::Stderr, tx),
        ];
        Ok(Running {
            cmd,
            name,
            pgid: child.id(),
            child,
            readers,
            rx,
            out: Output::default(),
            tail: VecDeque::new(),
            ranges: Vec::new(),
            checked: Instant::now(),
            eofs: 0,
            exited_at: None,
            last_output: Instant::now(),
            killing: None,
        })
    }

    /// Hands out lines until the child is done. The child's state and the limits are
    /// checked on a tick and at EOF, not per chunk: a syscall per line would cost more
    /// than the line.
    fn pump(&mut self, on_line: &mut dyn FnMut(Stream, &str)) {
        let mut exit_wait = Duration::from_millis(1);
        loop {
            let event = if self.eofs == 2 {
                // Both pipes are closed: the exit follows at once, so look again soon (the
                // channel is disconnected and would not wait at all).
                std::thread::sleep(exit_wait);
                exit_wait = (exit_wait * 2).min(TICK);
                Err(mpsc::RecvTimeoutError::Timeout)
            } else {
                self.rx.recv_timeout(self.next_check())
            };
            let busy = matches!(event, Ok(Event::Lines(..)));
            match event {
                Ok(Event::Lines(stream, bytes)) => self.lines(stream, &bytes, on_line),
                Ok(Event::Eof) => self.eofs += 1,
                Err(_) => {}
            }
            if busy && self.checked.elapsed() < TICK {
                continue;
            }
            self.checked = Instant::now();
            if self.done() {
                break;
            }
            self.enforce_limits();
        }
    }

    /// How long the consumer may wait for output: a tick, or less when a limit falls due
    /// sooner (an idle agent's short docker calls then wake it once, not every 100 ms).
    fn next_check(&self) -> Duration {
        let now = Instant::now();
        let mut wait = IDLE_TICK;
        if let Some(d) = self.cmd.deadline {
            wait = wait.min(d.at.saturating_duration_since(now));
        }
        if let Some(idle) = self.cmd.idle_timeout {
            wait = wait.min((self.last_output + idle).saturating_duration_since(now));
        }
        if self.killing.is_some() {
            wait = wait.min(TICK);
        }
        wait.max(Duration::from_millis(1))
    }

    /// Passes on a chunk's lines, scrubbed (only when a secret or URL can occur in the
    /// chunk), and keeps them in the stdout capture and the tail. A line longer than MAX_LINE
    /// is scrubbed whole, then cut: a secret across a cut is masked like any other.
    fn lines(&mut self, stream: Stream, chunk: &[u8], on_line: &mut dyn FnMut(Stream, &str)) {
        self.last_output = Instant::now();
        let clean = !redact::may_need_scrub(chunk);
        split_lines(chunk, &mut self.ranges);
        let tail_from = self.ranges.len().saturating_sub(TAIL_LINES);
        for (n, &(a, b)) in self.ranges.iter().enumerate() {
            let raw = String::from_utf8_lossy(&chunk[a..b]);
            let line = match clean {
                true => raw,
                false => std::borrow::Cow::Owned(redact::scrub(&raw).into_owned()),
            };
            for piece in pieces(&line) {
                on_line(stream, piece);
                if stream == Stream::Stdout && self.out.stdout.len() < STDOUT_CAP {
                    self.out.stdout.push_str(piece);
                    self.out.stdout.push('\n');
                }
                if n >= tail_from {
                    if self.tail.len() == TAIL_LINES {
                        self.tail.pop_front();
                    }
                    self.tail.push_back(piece.to_string());
                }
            }
        }
    }

    /// True once the leader has exited and both pipes are closed, or a grandchild has held
    /// them open past [`PIPE_GRACE`] (then the group is killed: it must not keep us waiting).
    fn done(&mut self) -> bool {
        if self.exited_at.is_none() && signal::exited_unreaped(self.pgid) {
            self.exited_at = Some(Instant::now());
        }
        let Some(exited_at) = self.exited_at else {
            return false;
        };
        if self.eofs == 2 {
            return true;
        }
        if exited_at.elapsed() > PIPE_GRACE {
            signal::kill_group(self.pgid, libc::SIGKILL);
            return true;
        }
        false
    }

    /// Starts a group kill when a limit is hit, or escalates the one under way.
    fn enforce_limits(&mut self) {
        match &self.killing {
            None => {
                if let Some(ending) = self.limit_hit() {
                    self.killing = Some(Kill::start(&self.name, self.pgid, ending));
                }
            }
            Some(kill) => kill.escalate(self.pgid),
        }
    }

    /// The first limit this call has hit: cancel, then the deadline, then the idle timeout.
    fn limit_hit(&self) -> Option<Ending> {
        let stop = self.cmd.stop_at_shutdown && signal::shutdown_requested();
        if stop || signal::cancel_requested() {
            Some(Ending::Canceled)
        } else if let Some(d) = self.cmd.deadline.filter(Deadline::passed) {
            Some(Ending::Timeout(d))
        } else {
            let idle = self.last_output.elapsed();
            self.cmd
                .idle_timeout
                .filter(|d| idle >= *d)
                .map(Ending::Idle)
        }
    }

    /// Kills what is left of a killed group, reaps the leader and says how the call ended.
    fn finish(mut self) -> Result<Output, ExecError> {
        // Make sure nothing of the group survives us, then reap the leader.
        if self.killing.is_some() {
            signal::kill_group(self.pgid, libc::SIGKILL);
        }
        let status = self.child.wait().map_err(|err| ExecError::Spawn {
            name: self.name.clone(),
            err,
        })?;
        if self.eofs == 2 {
            for r in self.readers.into_iter().flatten() {
                let _ = r.join();
            }
        }
        let mut out = self.out;
        out.tail = self.tail.into();
        match self.killing {
            Some(kill) => Err(kill.ending.into_error(self.name, out)),
            None => exit_result(self.name, status, out),
        }
    }
}

/// The process to start: its own process group, piped output, the agent's secrets removed
/// from the inherited environment.
fn command(cmd: &Cmd) -> Command {
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for k in SCRUBBED_ENV {
        c.env_remove(k);
    }
    if let Some(d) = &cmd.dir {
        c.current_dir(d);
    }
    c.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    c
}

/// Maps the exit status of a call the agent did not kill to its result.
fn exit_result(name: String, status: ExitStatus, output: Output) -> Result<Output, ExecError> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(output),
        (Some(code), _) => Err(ExecError::Exit { name, code, output }),
        (None, Some(sig)) => Err(ExecError::Signal { name, sig, output }),
        (None, None) => Err(ExecError::Exit {
            name,
            code: -1,
            output,
        }),
    }
}

/// The lines of a chunk as byte ranges without their '\n' (and a '\r' before it).
fn split_lines(chunk: &[u8], out: &mut Vec<(usize, usize)>) {
    out.clear();
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', chunk) {
        let mut end = nl;
        if end > start && chunk[end - 1] == b'\r' {
            end -= 1;
        }
        out.push((start, end));
        start = nl + 1;
    }
}

/// A line in pieces of at most MAX_LINE bytes, cut between characters (an empty line is one
/// empty piece), so memory and each shipped line stay bounded.
fn pieces(line: &str) -> impl Iterator<Item = &str> {
    let (mut rest, mut first) = (line, true);
    std::iter::from_fn(move || {
        if rest.is_empty() && !first {
            return None;
        }
        first = false;
        let mut end = rest.len().min(MAX_LINE);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, r) = rest.split_at(end);
        rest = r;
        Some(piece)
    })
}

/// Where a newline-less stream is cut: at the last multiple of MAX_LINE before its end (so
/// at least one byte of look-ahead), moved back a little so that no secret or URL user info
/// (each piece is scrubbed on its own) and no UTF-8 character is split, or masked where no
/// such place is near. What stays pending is then under MAX_LINE + 4 KiB: a line of any
/// length streams in bounded memory.
fn long_line_cut(pending: &[u8]) -> redact::Cut {
    let at = (pending.len() - 1) / MAX_LINE * MAX_LINE;
    let mut cut = redact::safe_cut(pending, at);
    if cut.mask.is_none() {
        let floor = cut.at.saturating_sub(3);
        while cut.at > floor && pending[cut.at] & 0xC0 == 0x80 {
            cut.at -= 1;
        }
    }
    cut
}

/// Takes the line (or lines) before `cut` out of `pending`, ending in '\n', and masks what
/// the cut splits on both sides.
fn take_lines(pending: &mut Vec<u8>, cut: redact::Cut) -> Vec<u8> {
    let rest = pending.split_off(cut.at);
    let mut chunk = std::mem::replace(pending, rest);
    if let Some((lo, hi)) = cut.mask {
        chunk.truncate(lo);
        chunk.extend_from_slice(b"***");
        pending.splice(..hi - cut.at, *b"***");
    }
    if chunk.last() != Some(&b'\n') {
        chunk.push(b'\n');
    }
    chunk
}

/// Reads a pipe in large chunks and sends the complete lines of each; invalid UTF-8 is
/// the consumer's business (decoded lossily), so a child can never block on a full pipe.
fn spawn_reader(
    pipe: Option<impl Read + Send + 'static>,
    stream: Stream,
    tx: mpsc::SyncSender<Event>,
) -> Option<JoinHandle<()>> {
    let mut pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut pending: Vec<u8> = Vec::new();
        let send = |chunk: Vec<u8>| tx.send(Event::Lines(stream, chunk)).is_ok();
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            pending.extend_from_slice(&buf[..n]);
            let cut = match memchr::memrchr(b'\n', &pending) {
                Some(i) => redact::Cut {
                    at: i + 1,
                    mask: None,
                },
                // A newline-less stream is cut into lines of about MAX_LINE, counted from
                // the start of the line whatever the read sizes were.
                None if pending.len() > MAX_LINE => long_line_cut(&pending),
                None => continue,
            };
            let chunk = take_lines(&mut pending, cut);
            if !send(chunk) {
                return;
            }
        }
        if !pending.is_empty() {
            pending.push(b'\n');
            send(pending);
        }
        let _ = tx.send(Event::Eof);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Cmd {
        Cmd::new("sh").arg("-c").arg(script).label("sh script")
    }

    #[test]
    fn streams_many_lines_and_invalid_utf8_without_deadlock() {
        let cmd = sh("i=0; while [ $i -lt 20000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; printf 'bad \\377 byte\\n'; exit 3");
        let (mut n, mut bad) = (0, Vec::new());
        let err = run(&cmd, &mut |stream, line| {
            n += 1;
            if line.starts_with("bad") {
                bad.push((stream, line.to_string()));
            }
        })
        .unwrap_err();
        assert_eq!(n, 40001);
        assert_eq!(bad, [(Stream::Stdout, "bad \u{fffd} byte".to_string())]);
        // The two pipes are read concurrently and the tail is bounded, so which lines the tail
        // keeps depends on scheduling; only its size and the exit code are certain.
        match &err {
            ExecError::Exit {
                code: 3, output, ..
            } => assert_eq!(output.tail.len(), TAIL_LINES),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("sh script exited 3: "), "{err}");
    }

    #[test]
    fn long_lines_crlf_and_a_missing_final_newline() {
        let cmd =
            sh("printf 'a\\r\\nb\\n'; head -c 40000 /dev/zero | tr '\\0' x; echo; printf tail");
        let mut lines = Vec::new();
        let out = run(&cmd, &mut |_, l| lines.push(l.to_string())).unwrap();
        let lens: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lens, [1, 1, MAX_LINE, MAX_LINE, 40000 - 2 * MAX_LINE, 4]);
        assert_eq!((lines[0].as_str(), lines[5].as_str()), ("a", "tail"));
        assert!(out.stdout.ends_with("\ntail\n"));
        assert_eq!(out.tail.last().map(String::as_str), Some("tail"));
    }

    #[test]
    fn a_secret_or_a_character_across_the_line_cut_stays_whole() {
        let task = redact::Scope::new();
        task.add("tok-cut-5e6f7a8b9c");
        let (pad, tok) = (MAX_LINE - 9, "tok-cut-5e6f7a8b9c");
        // At once (the consumer cuts), then in writes the reader sees apart (the reader cuts).
        let cmd = sh(&format!(
            "printf '%{pad}s%s\\n' '' {tok}; printf '%{pad}s' ''; sleep 0.3; printf {tok}; \
             sleep 0.3; echo ' end'; printf '%{}s' ''; sleep 0.3; printf '\u{e9}\u{20ac}\\n'",
            MAX_LINE - 1
        ));
        let mut lines = Vec::new();
        run(&cmd, &mut |_, l| lines.push(l.to_string())).unwrap();
        let spaces = |n: usize| " ".repeat(n);
        assert_eq!(
            lines,
            [
                spaces(pad) + "***",
                spaces(pad),
                "*** end".into(),
                spaces(MAX_LINE - 1),
                "\u{e9}\u{20ac}".into()
            ]
        );
    }

    #[test]
    fn a_line_of_urls_everywhere_streams_in_pieces_and_masks_a_secret_across_a_cut() {
        let task = redact::Scope::new();
        task.add("tok-url-3c4d5e6f7a");
        let dir = crate::sys::fake::temp_dir("url-chain");
        // The first cut falls inside the token (a `://` every 16 bytes before it); the
        // script waits for the test to see pieces, so no piece waits for the line's end.
        let chain = "yes 'a://bbbbbbbbbbbb' | tr -d '\\n' | head -c";
        let wait = |f: &str| format!("until [ -e {}/{f} ]; do sleep 0.02; done", dir.display());
        let cmd = sh(&format!(
            "{chain} 16379; printf 'tok-url-3c4d5e6f7a@host/x'; {}; {chain} 2000000; {}; \
             echo; echo END",
            wait("1"),
            wait("2")
        ))
        .timeout(Duration::from_secs(60), "TEST_TIMEOUT");
        let (mut lines, mut bytes) = (Vec::<String>::new(), 0);
        run(&cmd, &mut |_, l| {
            bytes += l.len();
            let seen = if bytes >= 1_900_000 { "2" } else { "1" };
            std::fs::write(dir.join(seen), "").unwrap();
            lines.push(l.to_string());
        })
        .unwrap();
        assert!(lines[0].ends_with("a***"), "{}", &lines[0][16300..]);
        assert!(lines[1].starts_with("***/xa://bbbb"), "{}", &lines[1][..40]);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        assert!(lines.len() > 100, "{} pieces", lines.len());
        assert!(!lines
            .iter()
            .any(|l| l.contains("tok-") || l.contains("3c4d5e")));
        assert_eq!(lines.last().map(String::as_str), Some("END"));
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let marker = format!("sleep 77.{}", std::process::id());
        let cmd = sh(&format!("{marker} & {marker}; echo never"))
            .timeout(Duration::from_millis(300), "TEST_TIMEOUT");
        let started = Instant::now();
        let err = output(&cmd).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.to_string()
                .starts_with("sh script timed out after 300ms (TEST_TIMEOUT)"),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
        let left = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(left.stdout.is_empty(), "a grandchild survived");
    }

    #[test]
    fn idle_timeout_and_stdin_and_env() {
        let cmd = sh("echo start; sleep 30").idle_timeout(Duration::from_millis(300));
        let err = output(&cmd).unwrap_err();
        assert!(matches!(err, ExecError::Idle { .. }), "{err}");
        assert!(
            err.to_string().contains("produced no output for 300ms"),
            "{err}"
        );

        let cmd = sh("read x; echo \"got $x and $V\"")
            .stdin(b"piped\n".to_vec())
            .env("V", "envval");
        assert_eq!(output(&cmd).unwrap().stdout, "got piped and envval\n");
    }

    #[test]
    fn output_is_scrubbed_and_agent_secret_is_not_inherited() {
        crate::sys::redact::add("s3cr3t-value-xyz");
        // Edition 2021: set_var is safe; no other test reads AGENT_SECRET.
        std::env::set_var("AGENT_SECRET", "inherited-secret");
        let cmd = sh("echo token=s3cr3t-value-xyz; echo url=https://u:p@h/x; echo \"env=${AGENT_SECRET:-unset}\"")
            .env("X", "1");
        let mut lines = Vec::new();
        let out = run(&cmd, &mut |_, l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["token=***", "url=https://***@h/x", "env=unset"]);
        assert!(!out.stdout.contains("s3cr3t"));
    }

    #[test]
    fn spawn_errors_name_the_program() {
        let err = output(&Cmd::new("no-such-program-xyz").arg("clone")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no-such-program-xyz clone: `no-such-program-xyz` not found on PATH"
        );
    }
}
