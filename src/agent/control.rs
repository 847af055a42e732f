//! Deploy role: the control channel of today's server (protocol §1.10), a WebSocket to
//! `/api/agent/control?node_id=…` (`wss://` for an https control plane, with the HTTP
//! client's TLS setup) that carries `muveectl exec` and `cp` sessions (`session.rs`).
//!
//! One thread owns the socket and never runs docker nor waits on a session: it sleeps in
//! poll(2) on the socket and a doorbell that sessions ring when they queue a frame, pings
//! every 30 s, and re-dials with a capped backoff that starts over only after a connection
//! stayed up a while (a server that says `hello` and closes is not hammered), and at once
//! when the node id changed. Each session's input waits in a byte-bounded inbox: a session
//! that cannot keep up is ended with an `error`, except that an upload (`cp_up_tar`) into a
//! container slower than the network holds the socket's reading back, so the upload slows
//! down, for up to [`UPLOAD_STALL`] without progress. At most [`MAX_SESSIONS`] run at once.
//! Outgoing frames share one bounded queue: a session producing faster than the socket
//! drains waits, alone; the socket thread's own `error` frames never wait in it.

use crate::agent::frame::{Frame, Out};
use crate::agent::reports::Reports;
use crate::agent::session::{self, Push, Session};
use crate::config::Config;
use crate::cp::tls::Roots;
use crate::cp::url::CpUrl;
use crate::sys::signal;
use crate::sys::wait::{self, Stop};
use crate::work::ctx::Shared;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

const PING_EVERY: Duration = Duration::from_secs(30);
/// Without any frame for this long the connection is dead (the server pongs every ping).
const READ_DEADLINE: Duration = Duration::from_secs(120);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(32);
/// A connection that lasted this long was a good one: the backoff starts over after it.
const STABLE: Duration = Duration::from_secs(30);
/// Frames waiting for the socket, from all sessions (32 KiB of tar each at most).
const OUTBOX: usize = 64;
/// Sessions at once on this node; one more gets an `error`.
pub const MAX_SESSIONS: usize = 16;
/// How long an upload may hold the socket's reading back without its container taking any
/// of it; then the upload fails with an `error`.
pub const UPLOAD_STALL: Duration = Duration::from_secs(30);
/// The largest message the socket accepts (a session's whole inbox); larger ones end the
/// connection, as tungstenite refuses them.
const MAX_MESSAGE: usize = 4 * session::INBOX_BYTES;
/// The socket thread's own frames (errors) waiting to go out; beyond, they are dropped.
const URGENT: usize = 1024;

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

impl std::error::Error for ChannelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChannelError::Url(_) => None,
            ChannelError::Io(e) => Some(e),
            ChannelError::Ws(e) => Some(e),
        }
    }
}

/// What the control channel thread needs from the agent.
struct Ctx {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    reports: Reports,
    roots: Roots,
}

/// Starts the control channel thread (deploy role); it dials once the agent has a node id.
pub fn spawn(cfg: Arc<Config>, shared: Arc<Shared>, reports: Reports, roots: Roots) {
    let ctx = Ctx {
        cfg,
        shared,
        reports,
        roots,
    };
    if let Err(e) = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || run(&ctx))
    {
        log::warn!("cannot start the control channel thread: {e}; exec and cp are unavailable");
    }
}

fn run(ctx: &Ctx) {
    let mut backoff = BACKOFF_FIRST;
    while !signal::shutdown_requested() {
        let Some(node) = ctx.reports.node_id() else {
            let later = Instant::now() + BACKOFF_FIRST;
            wait::pause(&ctx.shared.bell, later, Stop::Shutdown);
            continue;
        };
        match dial(ctx, &node) {
            Ok(ws) => {
                log::info!("control channel connected for node {node}");
                let since = Instant::now();
                serve(ws, ctx, &node);
                if since.elapsed() >= STABLE {
                    backoff = BACKOFF_FIRST;
                }
                if ctx.reports.node_id().as_deref() != Some(node.as_str()) {
                    continue;
                }
            }
            Err(e) => log::debug!("control channel: {e}"),
        }
        wait::pause(&ctx.shared.bell, Instant::now() + backoff, Stop::Shutdown);
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Where to dial: `host:port`, the name the certificate must carry (None: plain ws), and the
/// WebSocket URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    addr: String,
    tls_name: Option<String>,
    url: String,
}

/// `http://h:p/base` → `ws://h:p/base/api/agent/control?node_id=…`; https → wss.
fn control_url(base: &CpUrl, node: &str) -> Target {
    let (scheme, tls) = match base.is_https() {
        false => ("ws", None),
        true => ("wss", Some(base.host().to_string())),
    };
    let (auth, path) = (base.authority(), base.path());
    Target {
        addr: base.host_port(),
        tls_name: tls,
        url: format!("{scheme}://{auth}{path}/api/agent/control?node_id={node}"),
    }
}

/// The socket under the WebSocket: plain, or TLS (rustls over the same non-blocking socket).
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

fn connect(ctx: &Ctx, target: &Target) -> Result<Stream, ChannelError> {
    let host = &target.addr;
    let addr = host
        .to_socket_addrs()
        .map_err(ChannelError::Io)?
        .next()
        .ok_or_else(|| ChannelError::Url(format!("{host} does not resolve")))?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(ChannelError::Io)?;
    // The handshakes block, but not for ever.
    let limit = Some(Duration::from_secs(10));
    tcp.set_read_timeout(limit).map_err(ChannelError::Io)?;
    tcp.set_write_timeout(limit).map_err(ChannelError::Io)?;
    let Some(name) = &target.tls_name else {
        return Ok(Stream::Plain(tcp));
    };
    let config = ctx
        .roots
        .rustls()
        .map_err(|e| ChannelError::Url(e.to_string()))?;
    let server = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|_| ChannelError::Url(format!("{name:?} is not a TLS server name")))?;
    let conn = rustls::ClientConnection::new(config, server)
        .map_err(|e| ChannelError::Url(format!("TLS: {e}")))?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

fn dial(ctx: &Ctx, node: &str) -> Result<WebSocket<Stream>, ChannelError> {
    let target = control_url(&ctx.cfg.control_plane_url, node);
    let stream = connect(ctx, &target)?;
    let mut req = target.url.into_client_request().map_err(ChannelError::Ws)?;
    let secret = &ctx.cfg.agent_secret;
    if !secret.is_empty() {
        let v = http::HeaderValue::from_str(secret.expose())
            .map_err(|_| ChannelError::Url("AGENT_SECRET is not a valid header value".into()))?;
        req.headers_mut().insert("X-Agent-Secret", v);
    }
    let limits = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (ws, _) = tungstenite::client::client_with_config(req, stream, Some(limits)).map_err(
        |e| match e {
            tungstenite::HandshakeError::Failure(e) => ChannelError::Ws(e),
            tungstenite::HandshakeError::Interrupted(_) => {
                ChannelError::Url("the control channel handshake timed out".into())
            }
        },
    )?;
    // From here the thread sleeps in poll(2): reads and writes never block it.
    ws.get_ref()
        .tcp()
        .set_nonblocking(true)
        .map_err(ChannelError::Io)?;
    Ok(ws)
}

/// Serves one connection until it ends, the node id changes or the agent stops.
fn serve(mut ws: WebSocket<Stream>, ctx: &Ctx, node: &str) {
    let Ok(bell) = wait::Doorbell::new() else {
        return;
    };
    let queue = Arc::new(wait::Mailbox::bounded(OUTBOX));
    // Sessions waiting for room in the queue get `Gone` once this connection ends.
    let _closing = Closing(&queue);
    let out = Out::new(queue.clone(), Arc::new(bell));
    ctx.reports.watch_node(out.bell.clone());
    // A signal wakes the socket's poll too: the loop below closes at once on shutdown.
    ctx.shared.bell.attach(&out.bell);
    let mut conn = Conn {
        last_read: Instant::now(),
        next_ping: Instant::now() + PING_EVERY,
        unsent: false,
        sessions: HashMap::new(),
        urgent: VecDeque::new(),
        held: None,
    };
    loop {
        if signal::shutdown_requested() || ctx.reports.node_id().as_deref() != Some(node) {
            let _ = ws.close(None);
            let _ = ws.flush();
            return;
        }
        conn.retry_held();
        if !conn.write(&mut ws, &queue) || !conn.read(&mut ws, ctx, &out) {
            return;
        }
        if conn.last_read.elapsed() > READ_DEADLINE {
            log::info!(
                "control channel silent for {}s; re-dialling",
                READ_DEADLINE.as_secs()
            );
            return;
        }
        conn.sleep(&ws, &out.bell);
    }
}

/// Closes the outgoing queue when the connection's thread lets go of it, however it does.
struct Closing<'a>(&'a wait::Mailbox<Frame>);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The state of one connection between wake-ups.
struct Conn {
    last_read: Instant,
    next_ping: Instant,
    /// A frame waits in the socket's buffer (the peer reads slowly).
    unsent: bool,
    /// Dropping one ends the session (and kills its process).
    sessions: HashMap<String, Session>,
    /// Frames of the socket thread itself (errors): they never wait for the shared queue.
    urgent: VecDeque<Frame>,
    /// An upload frame its session had no room for yet, and since when: reading waits.
    held: Option<(Box<Frame>, Instant)>,
}

impl Conn {
    /// Sends the ping when due, our own frames and every queued frame; false when the
    /// connection broke. A frame the socket has no room for yet stays in tungstenite's
    /// buffer (`unsent`).
    fn write(&mut self, ws: &mut WebSocket<Stream>, queued: &wait::Mailbox<Frame>) -> bool {
        if self.unsent && !self.flush(ws) {
            return false;
        }
        if self.unsent {
            return true;
        }
        let mut frames: Vec<Frame> = self.urgent.drain(..).collect();
        if Instant::now() >= self.next_ping {
            self.next_ping = Instant::now() + PING_EVERY;
            frames.push(Frame::new("ping", ""));
        }
        frames.extend(std::iter::from_fn(|| queued.try_recv()));
        for f in frames {
            let text = serde_json::to_string(&f).unwrap_or_default();
            match ws.write(Message::text(text)) {
                Ok(()) => {}
                // The frame waits in tungstenite's buffer: no more are taken until it went.
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.unsent = true
                }
                Err(e) => {
                    log::info!("control channel closed: {e}");
                    return false;
                }
            }
        }
        // Also pushes out what reading queued (TLS records, pongs to WebSocket pings).
        self.flush(ws)
    }

    fn flush(&mut self, ws: &mut WebSocket<Stream>) -> bool {
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

    /// Handles every frame that has arrived (none while an upload frame is held); false
    /// when the connection ended.
    fn read(&mut self, ws: &mut WebSocket<Stream>, ctx: &Ctx, out: &Out) -> bool {
        while self.held.is_none() {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    self.last_read = Instant::now();
                    match Frame::parse(t.as_str()) {
                        Ok(f) => self.handle(f, ctx, out),
                        // The `error` ends the session at the server: end it here too.
                        Err(Some(e)) => self.end(&e.session, &e.msg),
                        Err(None) => log::debug!("control channel: a frame that is not ours"),
                    }
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
        true
    }

    fn handle(&mut self, f: Frame, ctx: &Ctx, out: &Out) {
        match f.kind.as_str() {
            "hello" | "pong" | "signal" => {}
            "open_exec" | "open_cp" => self.open(f, ctx, out),
            _ => self.deliver(f),
        }
    }

    fn open(&mut self, f: Frame, ctx: &Ctx, out: &Out) {
        self.sessions.retain(|_, s| !s.inbox.ended());
        let id = f.session.clone();
        if self.sessions.contains_key(&id) {
            // The server ends a session on its `error`: the running one must not outlive it.
            return self.end(&id, "a session with this id is already open; both ended");
        }
        if self.sessions.len() >= MAX_SESSIONS {
            let msg = format!("this node already runs {MAX_SESSIONS} exec/cp sessions; close one");
            return self.fail(&id, &msg);
        }
        match session::start(f, &ctx.cfg, &ctx.shared, out) {
            Ok(s) => {
                self.sessions.insert(id, s);
            }
            Err(e) => self.fail(&id, &e.to_string()),
        }
    }

    /// Queues `f` for its session; an upload frame without room is held (reading waits),
    /// any other frame without room ends the session.
    fn deliver(&mut self, f: Frame) {
        let Some(s) = self.sessions.get(&f.session) else {
            return;
        };
        let id = f.session.clone();
        match s.inbox.push(f) {
            Push::Queued => {}
            Push::Ended => {
                self.sessions.remove(&id);
            }
            Push::Full(f) if f.kind == "cp_up_tar" => self.held = Some((f, Instant::now())),
            Push::Full(_) => self.end(
                &id,
                "input arrives faster than the session's program reads it",
            ),
            Push::TooBig => {
                let msg = format!("a frame larger than {} bytes", session::INBOX_BYTES);
                self.end(&id, &msg);
            }
        }
    }

    /// Offers the held upload frame again; gives up on the upload after [`UPLOAD_STALL`]
    /// without room.
    fn retry_held(&mut self) {
        let Some((f, since)) = self.held.take() else {
            return;
        };
        let id = f.session.clone();
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        match s.inbox.push(*f) {
            Push::Full(f) if since.elapsed() < UPLOAD_STALL => self.held = Some((f, since)),
            Push::Full(_) => {
                let msg = format!(
                    "the container took none of the upload for {}s; upload stopped",
                    UPLOAD_STALL.as_secs()
                );
                self.end(&id, &msg);
            }
            _ => {}
        }
        if self.held.is_none() {
            // Frames may have waited in the socket while we did not read.
            self.last_read = Instant::now();
        }
    }

    /// Ends session `id` (its process is killed) and says why.
    fn end(&mut self, id: &str, why: &str) {
        self.sessions.remove(id);
        self.fail(id, why);
    }

    fn fail(&mut self, id: &str, msg: &str) {
        if self.urgent.len() < URGENT {
            self.urgent.push_back(Frame::error(id, msg));
        }
    }

    /// Sleeps until the socket has something (unless an upload frame is held) or room (for
    /// a frame waiting), a session queued a frame or made room, or a deadline is due.
    fn sleep(&self, ws: &WebSocket<Stream>, bell: &wait::Doorbell) {
        let mut events = 0;
        if self.held.is_none() {
            events |= libc::POLLIN;
        }
        if self.unsent {
            events |= libc::POLLOUT;
        }
        let mut deadline = self.last_read + READ_DEADLINE;
        if let Some((_, since)) = &self.held {
            deadline = deadline.min(*since + UPLOAD_STALL);
        }
        // While a frame waits for room in the socket, POLLOUT is what wakes us: neither a
        // due ping nor our own frames can go before it.
        if !self.unsent {
            deadline = deadline.min(self.next_ping);
            if !self.urgent.is_empty() {
                deadline = Instant::now();
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let fds = [
            (ws.get_ref().tcp().as_raw_fd(), events),
            (bell.fd(), libc::POLLIN),
        ];
        wait::poll_fds(&fds, wait);
        bell.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        let url = |s: &str| s.parse::<CpUrl>().unwrap();
        let t = control_url(&url("http://cp.example:8080/base/"), "n1");
        assert_eq!(t.addr, "cp.example:8080");
        assert_eq!(
            t.url,
            "ws://cp.example:8080/base/api/agent/control?node_id=n1"
        );
        assert_eq!(t.tls_name, None);
        assert_eq!(control_url(&url("http://cp"), "n1").addr, "cp:80");
        let t = control_url(&url("https://cp.example"), "n1");
        assert_eq!(
            (t.addr.as_str(), t.tls_name.as_deref()),
            ("cp.example:443", Some("cp.example"))
        );
        assert_eq!(t.url, "wss://cp.example/api/agent/control?node_id=n1");
        let t = control_url(&url("https://[::1]:8443"), "n");
        assert_eq!(
            (t.addr.as_str(), t.tls_name.as_deref()),
            ("[::1]:8443", Some("::1"))
        );
        assert!(
            "ftp://cp".parse::<CpUrl>().is_err(),
            "never reaches the channel"
        );
    }
}
