//! Deploy role: the control channel of today's server (protocol §1.10), a WebSocket to
//! `/api/agent/control?node_id=…` that carries `muveectl exec` and `cp` sessions.
//!
//! One thread owns the socket: it sleeps in poll(2) on the socket and a doorbell that
//! sessions ring when they queue a frame (no polling in short slices), pings every 30 s and re-dials with a capped backoff that, unlike the Go agent's, resets
//! once a connection said `hello`, and at once when the node id changed. Each session is a
//! thread of its own with a bounded inbox: a session that cannot keep up is ended with an
//! `error`, never allowed to stall the socket or another session. Outgoing frames share one
//! bounded queue: a session producing faster than the socket drains waits, alone.

use crate::agent::reports::Reports;
use crate::config::Config;
use crate::sys::docker::Docker;
use crate::sys::signal;
use crate::work::ctx::Shared;
use crate::work::error::TaskError;
use crate::work::lifecycle;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const PING_EVERY: Duration = Duration::from_secs(30);
/// Without any frame for this long the connection is dead (the server pongs every ping).
const READ_DEADLINE: Duration = Duration::from_secs(120);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(32);
/// While a session runs, how often its thread looks whether the child exited.
const SESSION_TICK: Duration = Duration::from_millis(50);
/// Frames waiting for one session (32 KiB of tar each at most: 8 MiB).
const INBOX: usize = 256;
/// Frames waiting for the socket, from all sessions.
const OUTBOX: usize = 256;
const PTY_CHUNK: usize = 4096;
const CP_CHUNK: usize = 32 * 1024;

/// Where sessions queue frames for the socket: a bounded queue, and the doorbell that
/// wakes the socket thread.
#[derive(Clone)]
struct Out {
    tx: SyncSender<Frame>,
    bell: Arc<signal::Doorbell>,
}

impl Out {
    /// Waits for room in the queue; Err when the connection is gone.
    fn send(&self, f: Frame) -> Result<(), Gone> {
        let r = self.tx.send(f).map_err(|_| Gone);
        self.bell.ring();
        r
    }

    /// Queues unless the queue is full.
    fn try_send(&self, f: Frame) -> Result<(), TrySendError<Box<Frame>>> {
        let r = self.tx.try_send(f).map_err(|e| match e {
            TrySendError::Full(f) => TrySendError::Full(Box::new(f)),
            TrySendError::Disconnected(f) => TrySendError::Disconnected(Box::new(f)),
        });
        self.bell.ring();
        r
    }
}

/// The connection a frame was for has ended.
#[derive(Debug)]
struct Gone;

/// One text frame (§1.10): every field but `type` is left out when empty, as Go's
/// `omitempty` does, so `code:0` never appears.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain_prefix: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stream: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub cols: u16,
    #[serde(skip_serializing_if = "is_zero")]
    pub rows: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sig: String,
    #[serde(skip_serializing_if = "is_zero_i")]
    pub code: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub direction: String,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn is_zero_i(n: &i64) -> bool {
    *n == 0
}

impl Frame {
    fn new(kind: &str, session: &str) -> Frame {
        Frame {
            kind: kind.into(),
            session: session.into(),
            ..Frame::default()
        }
    }

    fn with_data(kind: &str, session: &str, bytes: &[u8]) -> Frame {
        Frame {
            data: BASE64.encode(bytes),
            ..Frame::new(kind, session)
        }
    }

    fn error(session: &str, msg: &str) -> Frame {
        Frame {
            msg: msg.into(),
            ..Frame::new("error", session)
        }
    }

    fn bytes(&self) -> Vec<u8> {
        BASE64.decode(&self.data).unwrap_or_default()
    }
}

/// Why a connection ended or could not be made.
#[derive(Debug)]
enum ChannelError {
    Url(String),
    Io(std::io::Error),
    Ws(tungstenite::Error),
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Url(m) => f.write_str(m),
            ChannelError::Io(e) => e.fmt(f),
            ChannelError::Ws(e) => e.fmt(f),
        }
    }
}

/// Why a session could not start; its text goes to the CLI as an `error` frame.
#[derive(Debug)]
enum SessionError {
    /// Missing or unusable fields, worded as the Go agent words them.
    Refused(&'static str),
    /// The container of a domain prefix could not be looked up.
    Resolve(TaskError),
    /// A PTY, pipe or thread could not be made, or docker could not be started.
    Setup(&'static str, std::io::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Refused(m) => f.write_str(m),
            SessionError::Resolve(e) => e.fmt(f),
            SessionError::Setup(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Starts the control channel thread (deploy role); it dials once the agent has a node id.
pub fn spawn(cfg: Arc<Config>, shared: Arc<Shared>, reports: Reports) {
    let run = move || run(&cfg, &shared, &reports);
    if let Err(e) = std::thread::Builder::new()
        .name("control".into())
        .spawn(run)
    {
        log::warn!("cannot start the control channel thread: {e}; exec and cp are unavailable");
    }
}

fn run(cfg: &Config, shared: &Arc<Shared>, reports: &Reports) {
    let mut backoff = BACKOFF_FIRST;
    while !signal::shutdown_requested() {
        let Some(node) = reports.node_id() else {
            shared.bell.wait_until(
                Some(Instant::now() + BACKOFF_FIRST),
                signal::shutdown_requested,
            );
            continue;
        };
        match dial(cfg, &node) {
            Ok(ws) => {
                log::info!("control channel connected for node {node}");
                let healthy = serve(ws, cfg, shared, reports, &node);
                if healthy {
                    backoff = BACKOFF_FIRST;
                }
                if reports.node_id().as_deref() != Some(node.as_str()) {
                    continue;
                }
            }
            Err(e) => log::debug!("control channel: {e}"),
        }
        let until = Instant::now() + backoff;
        shared
            .bell
            .wait_until(Some(until), signal::shutdown_requested);
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// `http://h:p/base` → (`h:p`, `ws://h:p/base/api/agent/control?node_id=…`).
fn control_url(base: &str, node: &str) -> Result<(String, String), ChannelError> {
    let uri: http::Uri = base
        .parse()
        .map_err(|_| ChannelError::Url(format!("CONTROL_PLANE_URL {base:?} is not a URL")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "ws",
        _ => {
            return Err(ChannelError::Url(format!(
                "the control channel needs an http:// CONTROL_PLANE_URL (wss is not built in), got {base:?}"
            )))
        }
    };
    let auth = uri
        .authority()
        .ok_or_else(|| ChannelError::Url(format!("CONTROL_PLANE_URL {base:?} has no host")))?;
    let host = match auth.port_u16() {
        Some(_) => auth.as_str().to_string(),
        None => format!("{}:80", auth.host()),
    };
    let path = uri.path().trim_end_matches('/');
    let url = format!("{scheme}://{auth}{path}/api/agent/control?node_id={node}");
    Ok((host, url))
}

fn dial(cfg: &Config, node: &str) -> Result<WebSocket<TcpStream>, ChannelError> {
    let (host, url) = control_url(&cfg.control_plane_url, node)?;
    let addr = host
        .to_socket_addrs()
        .map_err(ChannelError::Io)?
        .next()
        .ok_or_else(|| ChannelError::Url(format!("{host} does not resolve")))?;
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(ChannelError::Io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(ChannelError::Io)?;
    let mut req = url.into_client_request().map_err(ChannelError::Ws)?;
    if !cfg.agent_secret.is_empty() {
        let v = http::HeaderValue::from_str(&cfg.agent_secret)
            .map_err(|_| ChannelError::Url("AGENT_SECRET is not a valid header value".into()))?;
        req.headers_mut().insert("X-Agent-Secret", v);
    }
    let (ws, _) = tungstenite::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => ChannelError::Ws(e),
        tungstenite::HandshakeError::Interrupted(_) => {
            ChannelError::Url("the control channel handshake timed out".into())
        }
    })?;
    // From here the thread sleeps in poll(2): reads and writes never block it.
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(ChannelError::Io)?;
    Ok(ws)
}

/// Serves one connection until it ends, the node id changes or the agent stops; true when
/// the server said `hello` (a healthy connection: the backoff starts over).
fn serve(
    mut ws: WebSocket<TcpStream>,
    cfg: &Config,
    shared: &Arc<Shared>,
    reports: &Reports,
    node: &str,
) -> bool {
    let Ok(bell) = signal::Doorbell::new() else {
        return false;
    };
    let (tx, out_rx) = mpsc::sync_channel::<Frame>(OUTBOX);
    let out = Out {
        tx,
        bell: Arc::new(bell),
    };
    reports.watch_node(out.bell.clone());
    let mut sessions: HashMap<String, SyncSender<Frame>> = HashMap::new();
    let mut conn = Conn {
        hello: false,
        last_read: Instant::now(),
        next_ping: Instant::now() + PING_EVERY,
        unsent: false,
    };
    loop {
        if signal::shutdown_requested() || reports.node_id().as_deref() != Some(node) {
            let _ = ws.close(None);
            let _ = ws.flush();
            return conn.hello;
        }
        if !conn.write(&mut ws, &out_rx) || !conn.read(&mut ws, cfg, shared, &mut sessions, &out) {
            return conn.hello;
        }
        if conn.last_read.elapsed() > READ_DEADLINE {
            log::info!(
                "control channel silent for {}s; re-dialling",
                READ_DEADLINE.as_secs()
            );
            return conn.hello;
        }
        conn.sleep(&ws, &out.bell);
    }
}

/// The state of one connection between wake-ups.
struct Conn {
    hello: bool,
    last_read: Instant,
    next_ping: Instant,
    /// A frame waits in the socket's buffer (the peer reads slowly).
    unsent: bool,
}

impl Conn {
    /// Sends the ping when due and every queued frame; false when the connection broke.
    /// A frame the socket has no room for yet stays in tungstenite's buffer (`unsent`).
    fn write(&mut self, ws: &mut WebSocket<TcpStream>, queued: &Receiver<Frame>) -> bool {
        if self.unsent && !self.flush(ws) {
            return false;
        }
        if self.unsent {
            return true;
        }
        let mut frames = Vec::new();
        if Instant::now() >= self.next_ping {
            self.next_ping = Instant::now() + PING_EVERY;
            frames.push(Frame::new("ping", ""));
        }
        frames.extend(queued.try_iter());
        if frames.is_empty() {
            return true;
        }
        for f in frames {
            let text = serde_json::to_string(&f).unwrap_or_default();
            if let Err(e) = ws.write(Message::text(text)) {
                log::info!("control channel closed: {e}");
                return false;
            }
        }
        self.flush(ws)
    }

    fn flush(&mut self, ws: &mut WebSocket<TcpStream>) -> bool {
        match ws.flush() {
            Ok(()) => self.unsent = false,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.unsent = true
            }
            Err(e) => {
                log::info!("control channel closed: {e}");
                return false;
            }
        }
        true
    }

    /// Handles every frame that has arrived; false when the connection ended.
    fn read(
        &mut self,
        ws: &mut WebSocket<TcpStream>,
        cfg: &Config,
        shared: &Arc<Shared>,
        sessions: &mut HashMap<String, SyncSender<Frame>>,
        out: &Out,
    ) -> bool {
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    self.last_read = Instant::now();
                    let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) else {
                        log::debug!("control channel: a frame that is not ours: {}", t.as_str());
                        continue;
                    };
                    self.hello |= f.kind == "hello";
                    handle(f, cfg, shared, sessions, out);
                }
                Ok(Message::Close(_)) => return false,
                Ok(_) => self.last_read = Instant::now(),
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return true
                }
                Err(e) => {
                    log::info!("control channel closed: {e}");
                    return false;
                }
            }
        }
    }

    /// Sleeps until the socket has something (or room, for a frame waiting), a session
    /// queued a frame, or the next ping is due.
    fn sleep(&self, ws: &WebSocket<TcpStream>, bell: &signal::Doorbell) {
        use std::os::fd::AsRawFd;
        let mut events = libc::POLLIN;
        if self.unsent {
            events |= libc::POLLOUT;
        }
        let deadline = self.next_ping.min(self.last_read + READ_DEADLINE);
        let wait = deadline.saturating_duration_since(Instant::now());
        let fds = [
            (ws.get_ref().as_raw_fd(), events),
            (bell.fd(), libc::POLLIN),
        ];
        signal::poll_fds(&fds, wait);
        bell.drain();
    }
}

fn handle(
    f: Frame,
    cfg: &Config,
    shared: &Arc<Shared>,
    sessions: &mut HashMap<String, SyncSender<Frame>>,
    out: &Out,
) {
    match f.kind.as_str() {
        "hello" | "pong" | "signal" => {}
        "open_exec" | "open_cp" => {
            let session = f.session.clone();
            match open(f, cfg, shared, out) {
                Ok(inbox) => {
                    sessions.insert(session, inbox);
                }
                Err(e) => {
                    let _ = out.try_send(Frame::error(&session, &e.to_string()));
                }
            }
        }
        _ => {
            let Some(inbox) = sessions.get(&f.session) else {
                return;
            };
            let session = f.session.clone();
            match inbox.try_send(f) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    // Dropping the inbox ends the session (its process is killed).
                    sessions.remove(&session);
                    let msg = "session input arrives faster than the session consumes it";
                    let _ = out.try_send(Frame::error(&session, msg));
                }
                Err(TrySendError::Disconnected(_)) => {
                    sessions.remove(&session);
                }
            }
        }
    }
}

/// Starts a session thread; returns its inbox, or the `error` text for the CLI.
fn open(
    f: Frame,
    cfg: &Config,
    shared: &Arc<Shared>,
    out: &Out,
) -> Result<SyncSender<Frame>, SessionError> {
    let exec = f.kind == "open_exec";
    let docker = shared.docker(cfg);
    let container = if !f.domain_prefix.is_empty() {
        lifecycle::resolve(&docker, &f.domain_prefix).map_err(SessionError::Resolve)?
    } else {
        f.container.clone()
    };
    let named = !f.session.is_empty() && valid_container(&container);
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
    let (tx, rx) = mpsc::sync_channel(INBOX);
    let out = out.clone();
    let cli = cfg.docker_cli.clone();
    let work = move || {
        let docker = Docker::new(&cli, &crate::sys::executor::System);
        let code = if exec {
            exec_session(&docker, &container, &f, rx, &out)
        } else {
            cp_session(&docker, &container, &f, rx, &out)
        };
        let mut exit = Frame::new("exit", &f.session);
        match code {
            Ok(code) => exit.code = code,
            Err(e) => exit = Frame::error(&f.session, &e.to_string()),
        }
        let _ = out.send(exit);
    };
    std::thread::Builder::new()
        .name("session".into())
        .spawn(work)
        .map_err(|e| SessionError::Setup("cannot start a session thread", e))?;
    Ok(tx)
}

/// A container name or id: no option-like or path-like values reach docker's argv.
fn valid_container(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Kills the process group of `child` (it leads its own).
fn kill(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain syscall; a negative pid names the group the child leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// The exit code to report: killed by us (close) or by a signal → -1.
fn exit_code(status: std::io::Result<std::process::ExitStatus>, killed: bool) -> i64 {
    match status {
        Ok(s) if !killed => s.code().map_or(-1, i64::from),
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

/// `docker exec -ti` under a PTY sized cols×rows: output goes out as `stdout` chunks,
/// `stdio` input is typed in, `resize` resizes, `close` kills.
fn exec_session(
    docker: &Docker,
    container: &str,
    f: &Frame,
    inbox: Receiver<Frame>,
    out: &Out,
) -> Result<i64, SessionError> {
    let (master, slave) =
        openpty(winsize(f.cols, f.rows)).map_err(|e| SessionError::Setup("openpty", e))?;
    let mut cmd = docker.exec_tty(container, &f.cmd);
    let io = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let (i, o, e) = (io(&slave), io(&slave), io(&slave));
    let (i, o, e) = (i.map_err(ioe)?, o.map_err(ioe)?, e.map_err(ioe)?);
    cmd.stdin(i).stdout(o).stderr(e);
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
    let mut reader = std::fs::File::from(master.try_clone().map_err(ioe)?);
    let (out2, session) = (out.clone(), f.session.clone());
    let pump = std::thread::spawn(move || {
        let mut buf = [0u8; PTY_CHUNK];
        // EIO once every slave fd is closed: the process is gone.
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            let mut fr = Frame::with_data("stdio", &session, &buf[..n]);
            fr.stream = "stdout".into();
            if out2.send(fr).is_err() {
                break;
            }
        }
    });
    let mut writer = std::fs::File::from(master.try_clone().map_err(ioe)?);
    let killed = serve_inbox(&mut child, &inbox, |fr| match fr.kind.as_str() {
        "stdio" => {
            let _ = writer.write_all(&fr.bytes());
        }
        "resize" => {
            let ws = winsize(fr.cols, fr.rows);
            // SAFETY: TIOCSWINSZ with a valid winsize on our own master fd.
            unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&master),
                    libc::TIOCSWINSZ,
                    &ws,
                );
            }
        }
        _ => {}
    });
    let status = child.wait();
    drop(writer);
    let _ = pump.join();
    Ok(exit_code(status, killed))
}

fn ioe(e: std::io::Error) -> SessionError {
    SessionError::Setup("session setup", e)
}

/// Feeds inbox frames to `each` until the child exits; `close` or a dropped inbox kills it.
/// Returns whether we killed it.
fn serve_inbox(child: &mut Child, inbox: &Receiver<Frame>, mut each: impl FnMut(Frame)) -> bool {
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        match inbox.recv_timeout(SESSION_TICK) {
            Ok(fr) if fr.kind == "close" => {
                kill(child);
                return true;
            }
            Ok(fr) => each(fr),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                kill(child);
                return true;
            }
        }
    }
}

fn openpty(ws: libc::winsize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: out-pointers to two ints; winsize is read only.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty just returned these two fds to us.
    Ok(unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) })
}

/// `docker cp` up (tar from `cp_up_tar` frames into the container) or down (the container's
/// tar out as `cp_down_tar` chunks, then `cp_end`). A failure's text goes out as `stderr`.
fn cp_session(
    docker: &Docker,
    container: &str,
    f: &Frame,
    inbox: Receiver<Frame>,
    out: &Out,
) -> Result<i64, SessionError> {
    let up = f.direction == "up";
    let mut cmd = docker.cp_tar(container, &f.path, up);
    cmd.stdin(if up { Stdio::piped() } else { Stdio::null() })
        .stdout(if up { Stdio::null() } else { Stdio::piped() })
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| SessionError::Setup("docker cp", e))?;
    let mut stderr = child.stderr.take();
    let errs = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.by_ref().take(64 * 1024).read_to_end(&mut s);
        }
        s
    });
    let pump = child.stdout.take().map(|mut o| {
        let (out, session) = (out.clone(), f.session.clone());
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
    });
    let mut stdin = child.stdin.take();
    let killed = serve_inbox(&mut child, &inbox, |fr| match fr.kind.as_str() {
        "cp_up_tar" => {
            if let Some(i) = stdin.as_mut() {
                let _ = i.write_all(&fr.bytes());
            }
        }
        "cp_end" => stdin = None,
        _ => {}
    });
    drop(stdin);
    let status = child.wait();
    if let Some(p) = pump {
        let _ = p.join();
    }
    let code = exit_code(status, killed);
    let text = errs.join().unwrap_or_default();
    if code != 0 && !text.is_empty() {
        let mut fr = Frame::with_data("stdio", &f.session, &text);
        fr.stream = "stderr".into();
        let _ = out.send(fr);
    } else if code == 0 && !up {
        let _ = out.send(Frame::new("cp_end", &f.session));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_out_empty_fields_as_go_does() {
        let exit = Frame::new("exit", "s1");
        assert_eq!(
            serde_json::to_string(&exit).unwrap(),
            r#"{"type":"exit","session":"s1"}"#
        );
        let f: Frame = serde_json::from_str(
            r#"{"type":"open_exec","session":"a","container":"muvee-x","cmd":["sh"],"cols":120,"rows":40,"extra":1}"#,
        )
        .unwrap();
        assert_eq!((f.cols, f.rows, f.cmd.len()), (120, 40, 1));
        let e = Frame {
            code: -1,
            ..Frame::new("exit", "a")
        };
        assert!(serde_json::to_string(&e).unwrap().contains(r#""code":-1"#));
    }

    #[test]
    fn control_urls() {
        let (h, u) = control_url("http://cp.example:8080/base/", "n1").unwrap();
        assert_eq!(h, "cp.example:8080");
        assert_eq!(u, "ws://cp.example:8080/base/api/agent/control?node_id=n1");
        let (h, _) = control_url("http://cp", "n1").unwrap();
        assert_eq!(h, "cp:80");
        assert!(control_url("https://cp", "n").is_err());
        assert!(valid_container("muvee-app") && !valid_container("-v") && !valid_container("a/b"));
    }
}
