//! The server side of today's control channel (protocol §1.10): `GET /api/agent/control`
//! upgraded to a WebSocket that greets with `hello{node_id}` and answers every `ping` with
//! `pong`, where a newer connection of a node closes the older one; and muveectl's side of it,
//! as an API: open `exec` and `cp` sessions, feed them, read their frames.
//!
//! The tests take connections with [`Hub::accept`] and drive them frame by frame; they can
//! drop a connection, refuse upgrades with a status, or say `hello` and close
//! ([`Upgrade`]). The dev control plane serves the same channel to its agents, and
//! `POST /dev/exec` (`dev-cp exec`) runs a command through it.
//!
//! A connection's own thread blocks reading frames (no read timeout, so no polling); frames
//! are written from the caller's thread under a lock. tungstenite's reader never writes to
//! the socket here (see [`ReadHalf`]), so two writers never interleave bytes on it.
#![allow(dead_code)]

use super::{err_resp, json_resp, new_uuid, parse_uuid, query_get, text_resp, Req, Resp};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// How the server answers an authorized upgrade with a valid node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// Upgrade, say `hello`, answer pings: today's server.
    Accept,
    /// Answer this status (its reason as a text body) instead of upgrading.
    Refuse(u16),
    /// Upgrade, say `hello`, then close the connection with a close frame.
    HelloThenClose,
}

/// Connections not yet taken by [`Hub::accept`] beyond this are forgotten (the dev server
/// runs for days and nobody accepts there); the connections themselves stay up.
const FRESH_MAX: usize = 64;
/// A peer that stops reading fails the write after this long instead of hanging the caller.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// muveectl's tar chunk size (`cp_up_tar`).
const CP_CHUNK: usize = 32 * 1024;
/// How long `/dev/exec` waits for the next frame of its session.
const DEV_EXEC_WAIT: Duration = Duration::from_secs(60);

/// Every control connection of one server.
pub struct Hub {
    st: Mutex<HubState>,
    arrived: Condvar,
}

struct HubState {
    upgrade: Upgrade,
    /// Upgraded connections not yet accepted, oldest first.
    fresh: VecDeque<Arc<ControlConn>>,
    /// The newest connection of each node id.
    live: HashMap<String, Arc<ControlConn>>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub {
            st: Mutex::new(HubState {
                upgrade: Upgrade::Accept,
                fresh: VecDeque::new(),
                live: HashMap::new(),
            }),
            arrived: Condvar::new(),
        }
    }
}

/// An upgrade the server agreed to: the handshake answer still has to be written.
pub(super) struct Accepted {
    key: String,
    then_close: bool,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How the following upgrades are answered (connections already up are kept).
    pub fn set_upgrade(&self, how: Upgrade) {
        self.lock().upgrade = how;
    }

    /// The oldest upgraded connection not accepted yet, waiting up to `timeout` for one.
    pub fn accept(&self, timeout: Duration) -> Option<Arc<ControlConn>> {
        let end = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(c) = st.fresh.pop_front() {
                return Some(c);
            }
            let left = end.checked_duration_since(Instant::now())?;
            st = self
                .arrived
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The open connection of `node_id`, if any.
    pub fn conn(&self, node_id: &str) -> Option<Arc<ControlConn>> {
        let id = parse_uuid(node_id).ok()?;
        self.lock()
            .live
            .get(&id)
            .filter(|c| !c.is_closed())
            .cloned()
    }

    /// The newest open connection of any node.
    pub fn any_conn(&self) -> Option<Arc<ControlConn>> {
        let st = self.lock();
        let open = st.live.values().filter(|c| !c.is_closed());
        open.max_by_key(|c| c.since).cloned()
    }

    /// `POST /dev/exec` `{"container", "cmd": [...], "node_id"?}`: runs `cmd` as `muveectl
    /// exec` does, through the control connection of `node_id` (default: the newest), and
    /// answers `{"output", "code"}` once it exits. One at a time per connection: frames of
    /// other sessions are dropped while it waits.
    pub(super) fn dev_exec(&self, body: &[u8]) -> Resp {
        let req: Value = serde_json::from_slice(body).unwrap_or_default();
        let (Some(container), Some(cmd)) = (req["container"].as_str(), req["cmd"].as_array())
        else {
            return err_resp(
                400,
                "expected {\"container\", \"cmd\": [...], \"node_id\"?}",
            );
        };
        let conn = match req["node_id"].as_str() {
            Some(node) => self.conn(node),
            None => self.any_conn(),
        };
        let Some(conn) = conn else {
            return err_resp(409, "no agent has its control channel open");
        };
        let session = new_uuid();
        let cmd: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
        if let Err(e) = conn.open_exec(&session, container, &cmd) {
            return err_resp(502, &format!("control connection: {e}"));
        }
        match conn.outcome(&session, DEV_EXEC_WAIT) {
            None => err_resp(504, "the session did not end"),
            Some(o) if o.end["type"] == "error" => {
                err_resp(502, o.end["msg"].as_str().unwrap_or("error"))
            }
            Some(o) => {
                let output = String::from_utf8_lossy(&o.output);
                let code = o.end["code"].as_i64().unwrap_or(0);
                json_resp(200, json!({"output": output, "code": code}).to_string())
            }
        }
    }

    /// The request passed the route and the secret check (§1.10: a bad node id is a 400
    /// before any upgrade); Err is the answer when the upgrade is refused.
    pub(super) fn check(&self, req: &Req) -> Result<Accepted, Resp> {
        let (_, query) = req.target.split_once('?').unwrap_or(("", ""));
        if parse_uuid(&query_get(query, "node_id")).is_err() {
            return Err(text_resp(400, "invalid node_id"));
        }
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let upgrading = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        let key = match header("sec-websocket-key") {
            Some(k) if upgrading && header("sec-websocket-version") == Some("13") => k,
            // gorilla/websocket's answer to a plain GET.
            _ => return Err(text_resp(400, "Bad Request")),
        };
        match self.lock().upgrade {
            Upgrade::Refuse(code) => Err(text_resp(code, super::reason(code))),
            how => Ok(Accepted {
                key: tungstenite::handshake::derive_accept_key(key.as_bytes()),
                then_close: how == Upgrade::HelloThenClose,
            }),
        }
    }

    /// Completes the handshake on `s` (`buffered`: bytes read past the request) and serves
    /// the connection until it ends.
    pub(super) fn serve(&self, s: &TcpStream, target: &str, up: Accepted, buffered: Vec<u8>) {
        let Some(conn) = ControlConn::upgrade(s, target, &up.key) else {
            return;
        };
        let conn = Arc::new(conn);
        let _ = conn.send(&json!({"type": "hello", "node_id": conn.node_id}));
        if up.then_close {
            conn.close();
            return;
        }
        let Ok(read) = s.try_clone() else { return };
        let older = {
            let mut st = self.lock();
            st.fresh.push_back(conn.clone());
            if st.fresh.len() > FRESH_MAX {
                st.fresh.pop_front();
            }
            st.live.insert(conn.node_id.clone(), conn.clone())
        };
        self.arrived.notify_all();
        if let Some(older) = older {
            older.disconnect();
        }
        conn.read_frames(ReadHalf(read), buffered);
        let mut st = self.lock();
        if st
            .live
            .get(&conn.node_id)
            .is_some_and(|c| Arc::ptr_eq(c, &conn))
        {
            st.live.remove(&conn.node_id);
        }
    }
}

/// The reading side of a connection for tungstenite: what tungstenite writes on its own (the
/// answer to a close or a WebSocket ping, which the agent never sends) is dropped, so only
/// [`ControlConn`]'s writer ever writes to the socket.
struct ReadHalf(TcpStream);

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One agent's control connection, seen from the server.
pub struct ControlConn {
    node_id: String,
    target: String,
    since: Instant,
    socket: TcpStream,
    writer: Mutex<WebSocket<TcpStream>>,
    inbox: Mutex<Inbox>,
    arrived: Condvar,
}

#[derive(Default)]
struct Inbox {
    frames: VecDeque<Value>,
    closed: bool,
}

/// What a session sent until it ended.
#[derive(Debug)]
pub struct Outcome {
    /// `stdio` and `cp_down_tar` data, decoded, in order.
    pub output: Vec<u8>,
    /// The type of every frame, in order, the last one `exit` or `error`.
    pub kinds: Vec<String>,
    /// The `exit` or `error` frame that ended the session.
    pub end: Value,
}

impl ControlConn {
    fn upgrade(s: &TcpStream, target: &str, key: &str) -> Option<ControlConn> {
        let (_, query) = target.split_once('?').unwrap_or(("", ""));
        let node_id = parse_uuid(&query_get(query, "node_id")).ok()?;
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {key}\r\n\r\n"
        );
        (&mut &*s).write_all(answer.as_bytes()).ok()?;
        // The HTTP side reads in 50 ms slices; a WebSocket reader blocks until a frame comes.
        s.set_read_timeout(None).ok()?;
        s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
        let writer = WebSocket::from_raw_socket(s.try_clone().ok()?, Role::Server, None);
        Some(ControlConn {
            node_id,
            target: target.to_string(),
            since: Instant::now(),
            socket: s.try_clone().ok()?,
            writer: Mutex::new(writer),
            inbox: Mutex::default(),
            arrived: Condvar::new(),
        })
    }

    /// Reads until the connection ends: pings are answered, every other frame is queued
    /// for [`ControlConn::recv`]. A frame that is not a JSON object ends the connection, as
    /// the server's `ReadJSON` does.
    fn read_frames(&self, read: ReadHalf, buffered: Vec<u8>) {
        let mut ws = WebSocket::from_partially_read(read, buffered, Role::Server, None);
        while let Ok(msg) = ws.read() {
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(frame @ Value::Object(_)) = serde_json::from_str::<Value>(text.as_str()) else {
                break;
            };
            if frame["type"] == "ping" {
                let _ = self.send(&json!({"type": "pong"}));
                continue;
            }
            self.lock_inbox().frames.push_back(frame);
            self.arrived.notify_all();
        }
        self.disconnect();
        self.lock_inbox().closed = true;
        self.arrived.notify_all();
    }

    fn lock_inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node id the agent dialled with.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The upgrade request's target as sent (`/api/agent/control?node_id=…`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Sends one frame.
    pub fn send(&self, frame: &Value) -> Result<(), tungstenite::Error> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.send(Message::text(frame.to_string()))
    }

    /// The next frame from the agent (pings are answered and not shown); None after
    /// `timeout`, or once the connection ended and every frame was read.
    pub fn recv(&self, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        let mut inbox = self.lock_inbox();
        loop {
            if let Some(f) = inbox.frames.pop_front() {
                return Some(f);
            }
            if inbox.closed {
                return None;
            }
            let left = end.checked_duration_since(Instant::now())?;
            inbox = self
                .arrived
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The next frame of `session` within `timeout`; other sessions' frames are dropped.
    pub fn recv_session(&self, session: &str, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let f = self.recv(left)?;
            if f["session"] == session {
                return Some(f);
            }
        }
    }

    /// Reads `session`'s frames until its `exit` or `error`; None when none came within
    /// `timeout` of the previous frame.
    pub fn outcome(&self, session: &str, timeout: Duration) -> Option<Outcome> {
        let (mut output, mut kinds) = (Vec::new(), Vec::new());
        loop {
            let f = self.recv_session(session, timeout)?;
            let kind = f["type"].as_str().unwrap_or("").to_string();
            match kind.as_str() {
                "stdio" | "cp_down_tar" => output.extend(frame_data(&f)),
                "exit" | "error" => {
                    kinds.push(kind);
                    return Some(Outcome {
                        output,
                        kinds,
                        end: f,
                    });
                }
                _ => {}
            }
            kinds.push(kind);
        }
    }

    /// True once the connection ended (either side).
    pub fn is_closed(&self) -> bool {
        self.lock_inbox().closed
    }

    /// Drops the connection without a close frame (the agent sees the socket end).
    pub fn disconnect(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Closes with a close frame, then drops the connection.
    pub fn close(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.close(None);
        let _ = w.flush();
        drop(w);
        self.disconnect();
    }

    // muveectl's side: the frames the server forwards from the CLI.

    /// `muveectl exec`: runs `cmd` in `container` under a PTY of the agent's default size.
    pub fn open_exec(
        &self,
        session: &str,
        container: &str,
        cmd: &[&str],
    ) -> Result<(), tungstenite::Error> {
        self.send(
            &json!({"type": "open_exec", "session": session, "container": container,
                          "cmd": cmd}),
        )
    }

    /// `muveectl cp`: `direction` "up" (into `path` in the container) or "down" (from it).
    pub fn open_cp(
        &self,
        session: &str,
        container: &str,
        path: &str,
        direction: &str,
    ) -> Result<(), tungstenite::Error> {
        self.send(
            &json!({"type": "open_cp", "session": session, "container": container,
                          "path": path, "direction": direction}),
        )
    }

    /// Typed input for an exec session.
    pub fn stdin(&self, session: &str, bytes: &[u8]) -> Result<(), tungstenite::Error> {
        self.send(&json!({"type": "stdio", "session": session, "data": BASE64.encode(bytes)}))
    }

    /// The terminal of an exec session was resized.
    pub fn resize(&self, session: &str, cols: u16, rows: u16) -> Result<(), tungstenite::Error> {
        self.send(&json!({"type": "resize", "session": session, "cols": cols, "rows": rows}))
    }

    /// The CLI went away: the agent ends the session.
    pub fn close_session(&self, session: &str) -> Result<(), tungstenite::Error> {
        self.send(&json!({"type": "close", "session": session}))
    }

    /// An upload's tar stream, in muveectl's chunks, then `cp_end`.
    pub fn upload(&self, session: &str, tar: &[u8]) -> Result<(), tungstenite::Error> {
        for chunk in tar.chunks(CP_CHUNK) {
            let data = BASE64.encode(chunk);
            self.send(&json!({"type": "cp_up_tar", "session": session, "data": data}))?;
        }
        self.send(&json!({"type": "cp_end", "session": session}))
    }
}

/// A frame's `data`, decoded (empty when absent or not base64).
pub fn frame_data(frame: &Value) -> Vec<u8> {
    let d = frame["data"].as_str().unwrap_or("");
    BASE64.decode(d).unwrap_or_default()
}
