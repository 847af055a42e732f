//! The repository's one fake muvee control plane: the dev control plane (`examples/dev-cp`),
//! the integration tests' double (`tests/integration/fake_cp.rs` adds fault injection on top,
//! through [`Server::set_interceptor`]) and the benchmark's (`scripts/bench.sh`).
//!
//! Reproduces the agent-facing HTTP API of the real server byte for byte as described in
//! /work/shared/reference/control-plane-protocol.md (sections 0, 1.1-1.9, 8), for the March 2026
//! server (7f715e3, `Version::March`) and today's server (522cd80, `Version::Today`).
//! HTTP/1.1 over `std::net`, one thread per connection, keep-alive like Go's `net/http`.
//! Deployment rows and today's scheduler side effects are modelled for deployments created
//! through [`Server::enqueue`] (the dev routes): a build reported `running` marks its deployment
//! `building`; a loop every `chain_interval` dispatches a deploy task for each completed build
//! of a `building` deployment to the newest deploy node and marks the build's result
//! `…_dispatched`; deploy results set the deployment `running`/`failed` and stop the project's
//! other deployments (a cleanup task where they ran on another node); failures append to the
//! deployment's logs. Tasks added with [`Server::add_task`] have no deployment row, as before.
//! Today's WebSocket control channel is served by [`control`] (reached through
//! [`Server::control`]). Not modelled: hosted git (`/git/…` gets the SPA page).
#![allow(dead_code)]

#[path = "control.rs"]
pub mod control;

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// github.com/hoveychen/muvee 7f715e3 (2026-03-16)
    March,
    /// github.com/hoveychen/muvee 522cd80
    Today,
}

/// What an interceptor (the tests' fault injection) makes of a request instead of routing it.
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer with this status, content type and body instead of the real handler.
    Respond(u16, &'static str, Vec<u8>),
    /// Read the request, sleep, then handle it normally (state changes happen after the sleep).
    Delay(Duration),
    /// Close the socket with a TCP RST without answering.
    Reset,
}

/// Called with each request's raw target and body length before routing;
/// `Some((name, action))` overrides it (`name` is recorded in [`Recorded::fault`]).
pub type Interceptor = Box<dyn Fn(&str, usize) -> Option<(String, Action)> + Send + Sync>;

/// One request as received (recorded before faults and routing).
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Raw request target: path + query, exactly as sent.
    pub target: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Would pass this version's agent-secret middleware (Today: server secret non-empty and equal;
    /// March: server secret empty, or equal).
    pub secret_ok: bool,
    /// Name of the injected fault that was applied, if any.
    pub fault: Option<String>,
    /// Status answered (None: no answer, e.g. reset, hang interrupted, or still in progress).
    pub status: Option<u16>,
    pub at: SystemTime,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

struct Node {
    id: String,
    hostname: String,
    role: String,
    host_ip: String,
    max_storage: i64,
    used_storage: i64,
    last_seen: SystemTime,
    created_at: SystemTime,
    registered: Instant,
    health_report: Option<Value>,
}

/// A deployment row, with the project settings the scheduler puts in its deploy payload.
struct Deployment {
    id: String,
    project_id: String,
    domain_prefix: String,
    status: String,
    image_tag: String,
    host_port: i64,
    node_id: String,
    /// Deploy payload fields besides image/ids: container_port, memory_limit, datasets, env_vars…
    settings: serde_json::Map<String, Value>,
    created_at: SystemTime,
}

/// What the dev routes and the benchmark read: counts kept even when requests are not recorded.
#[derive(Default, Clone)]
struct Counters {
    requests: u64,
    log_requests: u64,
    log_bytes: u64,
    log_lines: u64,
}

struct Task {
    id: String,
    seq: u64,
    kind: String,
    node_id: String,
    deployment_id: String,
    payload: Value,
    status: String,
    result: String,
    created_at: SystemTime,
    updated_at: SystemTime,
}

#[derive(Default)]
struct State {
    nodes: Vec<Node>,
    tasks: Vec<Task>,
    completions: HashMap<String, Vec<(Vec<u8>, Value)>>,
    logs: HashMap<String, Vec<u8>>,
    config: BTreeMap<String, String>,
    requests: Vec<Recorded>,
    register_count: usize,
    deployments: Vec<Deployment>,
    counters: Counters,
    next_seq: u64,
}

/// How a server behaves beyond its version and secret.
pub struct Options {
    /// Keep every request (method, headers, body) for inspection; a long-lived dev server
    /// keeps counters only.
    pub record: bool,
    /// Serve the `/dev/...` routes (enqueue work, list tasks, read logs), without the secret.
    pub dev_routes: bool,
    /// Time every `/api/deployments/{id}/logs` request takes before it is handled.
    pub log_delay: Duration,
    /// Period of the build → deploy chain loop (today's server: 5 s).
    pub chain_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            record: true,
            dev_routes: true,
            log_delay: Duration::ZERO,
            chain_interval: Duration::from_secs(5),
        }
    }
}

struct Shared {
    version: Version,
    secret: String,
    opts: Options,
    interceptor: Mutex<Option<Interceptor>>,
    st: Mutex<State>,
    stop: AtomicBool,
    epoch: AtomicU64,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    control: control::Hub,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn aborted(&self, epoch: u64) -> bool {
        self.stop.load(SeqCst) || self.epoch.load(SeqCst) != epoch
    }
}

pub struct Server {
    sh: Arc<Shared>,
    port: u16,
    acceptor: Mutex<Option<(JoinHandle<()>, Arc<AtomicBool>)>>,
}

struct Resp {
    status: u16,
    ctype: &'static str,
    body: Vec<u8>,
}

fn resp(status: u16, ctype: &'static str, body: impl Into<Vec<u8>>) -> Resp {
    let body = body.into();
    Resp {
        status,
        ctype,
        body,
    }
}
fn json_resp(status: u16, json: String) -> Resp {
    resp(status, "application/json", json + "\n")
}
fn err_resp(status: u16, msg: &str) -> Resp {
    json_resp(status, obj(&[("error", go_str(msg))]))
}
fn ok_resp() -> Resp {
    json_resp(200, r#"{"status":"ok"}"#.into())
}
fn text_resp(status: u16, text: &str) -> Resp {
    resp(status, "text/plain; charset=utf-8", format!("{text}\n"))
}
/// The web UI's page, which the real server answers for every path outside its routers.
pub const SPA_HTML: &str =
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"UTF-8\"><title>muvee</title></head>\
                <body><div id=\"root\"></div></body></html>\n";
fn html_resp() -> Resp {
    resp(200, "text/html; charset=utf-8", SPA_HTML)
}

const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

impl Server {
    /// Binds 127.0.0.1:0 and starts serving, recording every request.
    pub fn start(version: Version, secret: &str) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake control plane");
        Server::serve(listener, version, secret, Options::default())
    }

    /// Serves on `listener` until dropped.
    pub fn serve(listener: TcpListener, version: Version, secret: &str, opts: Options) -> Server {
        let port = listener.local_addr().unwrap().port();
        let mut st = State::default();
        for (k, v) in [
            ("base_domain", "localhost"),
            ("registry_addr", "localhost:5000"),
        ] {
            st.config.insert(k.into(), v.into());
        }
        for k in [
            "dataset_nfs_base_path",
            "registry_password",
            "registry_user",
            "volume_nfs_base_path",
        ] {
            st.config.insert(k.into(), String::new());
        }
        let sh = Arc::new(Shared {
            version,
            secret: secret.into(),
            opts,
            interceptor: Mutex::new(None),
            st: Mutex::new(st),
            stop: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            control: control::Hub::default(),
        });
        let cp = Server {
            sh,
            port,
            acceptor: Mutex::new(None),
        };
        cp.spawn_acceptor(listener);
        let sh = cp.sh.clone();
        thread::spawn(move || chain_loop(&sh));
        cp
    }

    /// Installs the hook that may override requests (the tests' fault injection).
    pub fn set_interceptor(&self, f: Interceptor) {
        *self.sh.interceptor.lock().unwrap() = Some(f);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn version(&self) -> Version {
        self.sh.version
    }
    /// The agents' control connections (today's server only).
    pub fn control(&self) -> &control::Hub {
        &self.sh.control
    }

    fn spawn_acceptor(&self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let quit = Arc::new(AtomicBool::new(false));
        let (sh, q) = (self.sh.clone(), quit.clone());
        let handle = thread::spawn(move || {
            while !q.load(SeqCst) && !sh.stop.load(SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let cid = sh.next_conn.fetch_add(1, SeqCst);
                        let epoch = sh.epoch.load(SeqCst);
                        if let Ok(c) = s.try_clone() {
                            sh.conns.lock().unwrap().insert(cid, c);
                        }
                        let sh2 = sh.clone();
                        thread::spawn(move || {
                            let reset = serve_conn(&sh2, &s, epoch);
                            sh2.conns.lock().unwrap().remove(&cid);
                            if reset {
                                set_linger0(&s);
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        *self.acceptor.lock().unwrap() = Some((handle, quit));
    }

    /// Stop accepting: closes the listener (connects are refused) and drops open connections.
    pub fn go_down(&self) {
        if let Some((h, quit)) = self.acceptor.lock().unwrap().take() {
            quit.store(true, SeqCst);
            let _ = h.join();
        }
        self.sh.epoch.fetch_add(1, SeqCst);
        for (_, c) in self.sh.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Rebind the same port (all state kept). Panics if the port cannot be rebound within 5 s.
    pub fn come_up(&self) {
        if self.acceptor.lock().unwrap().is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("rebind port {}: {e}", self.port),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        self.spawn_acceptor(listener);
    }

    /// Adds a pending task; returns its id.
    pub fn add_task(
        &self,
        node_id: &str,
        task_type: &str,
        deployment_id: &str,
        payload: Value,
    ) -> String {
        let id = push_task(
            &mut self.sh.lock(),
            node_id,
            task_type,
            deployment_id,
            payload,
        );
        // Distinct created_at values (microsecond DB precision) keep "oldest first" well defined.
        thread::sleep(Duration::from_micros(2));
        id
    }

    pub fn node_id_for_role(&self, role: &str) -> Option<String> {
        newest_node(&self.sh.lock(), role)
    }

    /// Enqueues work as the dev routes do (`{"git_url"…}` a build, `{"image_tag"…}` a deploy):
    /// returns `{"deployment_id","task_id","project_id"}`.
    pub fn enqueue(&self, req: Value) -> Result<Value, String> {
        enqueue(&mut self.sh.lock(), &req).map_err(|e| e.1)
    }

    /// Runs one pass of the build → deploy chain now.
    pub fn chain_now(&self) {
        chain_once(&mut self.sh.lock());
    }

    /// Deployment rows as `GET /dev/deployments` lists them.
    pub fn deployments(&self) -> Vec<Value> {
        self.sh
            .lock()
            .deployments
            .iter()
            .map(deployment_row)
            .collect()
    }

    /// Tasks as `GET /dev/tasks` lists them, plus their payloads.
    pub fn tasks(&self) -> Vec<Value> {
        let st = self.sh.lock();
        let row = |t: &Task| {
            let mut v = task_row(&st, t);
            v["payload"] = t.payload.clone();
            v
        };
        st.tasks.iter().map(row).collect()
    }

    /// Deletes every node (Today's server then answers polls with 500 `node … not found`).
    pub fn forget_nodes(&self) {
        self.sh.lock().nodes.clear();
    }

    pub fn set_config(&self, key: &str, value: &str) {
        self.sh.lock().config.insert(key.into(), value.into());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.sh.lock().requests.clone()
    }
    /// Requests whose raw target starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Recorded> {
        self.sh
            .lock()
            .requests
            .iter()
            .filter(|r| r.target.starts_with(prefix))
            .cloned()
            .collect()
    }
    /// Parsed JSON bodies of requests with a valid secret whose path starts with `prefix`.
    pub fn posted(&self, prefix: &str) -> Vec<Value> {
        let st = self.sh.lock();
        let hits = st
            .requests
            .iter()
            .filter(|r| r.secret_ok && r.path().starts_with(prefix));
        hits.filter_map(|r| r.json()).collect()
    }

    /// Parsed completion bodies for a task in arrival order (`null` for a non-JSON body).
    pub fn completions(&self, task_id: &str) -> Vec<Value> {
        let st = self.sh.lock();
        st.completions
            .get(&norm_id(task_id))
            .map(|v| v.iter().map(|c| c.1.clone()).collect())
            .unwrap_or_default()
    }
    pub fn completion_bodies_raw(&self, task_id: &str) -> Vec<Vec<u8>> {
        let st = self.sh.lock();
        st.completions
            .get(&norm_id(task_id))
            .map(|v| v.iter().map(|c| c.0.clone()).collect())
            .unwrap_or_default()
    }
    /// "pending" | "running" | "completed" | "failed"; "" for an unknown task.
    pub fn task_status(&self, task_id: &str) -> String {
        self.with_task(task_id, |t| t.status.clone())
    }
    /// The stored `result` column (Today: `{"image_tag":…}` when a tag was reported).
    pub fn task_result(&self, task_id: &str) -> String {
        self.with_task(task_id, |t| t.result.clone())
    }
    fn with_task(&self, task_id: &str, f: impl Fn(&Task) -> String) -> String {
        let id = norm_id(task_id);
        self.sh
            .lock()
            .tasks
            .iter()
            .find(|t| t.id == id)
            .map(f)
            .unwrap_or_default()
    }

    /// Stored log bytes of a deployment (Today only; March has no log endpoint).
    pub fn logs(&self, deployment_id: &str) -> Vec<u8> {
        self.sh
            .lock()
            .logs
            .get(&norm_id(deployment_id))
            .cloned()
            .unwrap_or_default()
    }

    /// Node rows: id, hostname, role, host_ip, max_storage_bytes, used_storage_bytes,
    /// last_seen_at, created_at (RFC 3339, ns), health_report (JSON, Today, if reported).
    pub fn nodes(&self) -> Vec<Value> {
        let st = self.sh.lock();
        let row = |n: &Node| {
            let mut v = serde_json::json!({
                "id": n.id, "hostname": n.hostname, "role": n.role, "host_ip": n.host_ip,
                "max_storage_bytes": n.max_storage, "used_storage_bytes": n.used_storage,
                "last_seen_at": rfc3339(n.last_seen, 9), "created_at": rfc3339(n.created_at, 9),
            });
            if let Some(h) = &n.health_report {
                v["health_report"] = h.clone();
            }
            v
        };
        st.nodes.iter().map(row).collect()
    }
    pub fn last_seen(&self, node_id: &str) -> Option<SystemTime> {
        let id = norm_id(node_id);
        self.sh
            .lock()
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.last_seen)
    }
    /// Number of register requests that reached the handler with a valid secret.
    pub fn register_count(&self) -> usize {
        self.sh.lock().register_count
    }

    /// Human-readable list of the last `n` requests (bodies truncated).
    pub fn dump(&self, n: usize) -> String {
        let st = self.sh.lock();
        let mut out = format!(
            "last {} of {} requests to fake control plane:\n",
            n.min(st.requests.len()),
            st.requests.len()
        );
        for r in st.requests.iter().rev().take(n).rev() {
            let mut body = String::from_utf8_lossy(&r.body).into_owned();
            if body.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|i| body.is_char_boundary(*i))
                    .unwrap_or(0);
                body = format!("{}…(+{} bytes)", &body[..cut], r.body.len() - cut);
            }
            let status = r.status.map_or("-".into(), |s| s.to_string());
            let fault = r
                .fault
                .as_deref()
                .map(|f| format!(" fault={f}"))
                .unwrap_or_default();
            let at = rfc3339(r.at, 3);
            out += &format!(
                "  {at} {} {} -> {status} secret_ok={}{fault} {body}\n",
                r.method, r.target, r.secret_ok
            );
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.sh.stop.store(true, SeqCst);
        self.go_down();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 server side

struct Req {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

struct Conn<'a> {
    sh: &'a Shared,
    s: &'a TcpStream,
    buf: Vec<u8>,
    epoch: u64,
}

impl Conn<'_> {
    /// Reads more bytes; false on EOF, error or server shutdown.
    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        loop {
            match (&mut &*self.s).read(&mut tmp) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if self.sh.aborted(self.epoch) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    }
    fn take_until(&mut self, pat: &[u8], max: usize) -> Option<Vec<u8>> {
        loop {
            if let Some(p) = self.buf.windows(pat.len()).position(|w| w == pat) {
                let mut out: Vec<u8> = self.buf.drain(..p + pat.len()).collect();
                out.truncate(p);
                return Some(out);
            }
            if self.buf.len() > max || !self.fill() {
                return None;
            }
        }
    }
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill() {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Ok(None): connection closed; Err(()): malformed request.
    fn read_request(&mut self) -> Result<Option<Req>, ()> {
        let Some(head) = self.take_until(b"\r\n\r\n", 1 << 20) else {
            return if self.buf.is_empty() {
                Ok(None)
            } else {
                Err(())
            };
        };
        let head = String::from_utf8(head).map_err(|_| ())?;
        let mut lines = head.trim_start_matches("\r\n").split("\r\n");
        let mut parts = lines.next().unwrap_or("").split(' ');
        let (method, target, proto) = match (parts.next(), parts.next(), parts.next(), parts.next())
        {
            (Some(m), Some(t), Some(p), None) if !m.is_empty() && p.starts_with("HTTP/1.") => {
                (m, t, p)
            }
            _ => return Err(()),
        };
        let mut headers = Vec::new();
        for line in lines {
            let (k, v) = line.split_once(':').ok_or(())?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let hv = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let conn = hv("connection").unwrap_or_default();
        let keep_alive = if proto == "HTTP/1.0" {
            conn.contains("keep-alive")
        } else {
            !conn.contains("close")
        };
        if hv("expect").is_some_and(|e| e == "100-continue") {
            let _ = (&mut &*self.s).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = if hv("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = self.take_until(b"\r\n", 4096).ok_or(())?;
                let size = String::from_utf8_lossy(&line);
                let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| ())?;
                if size == 0 {
                    while !self.take_until(b"\r\n", 1 << 16).ok_or(())?.is_empty() {}
                    break body;
                }
                body.extend(self.take(size).ok_or(())?);
                self.take(2).ok_or(())?;
            }
        } else {
            let len = hv("content-length")
                .map_or(Ok(0), |v| v.parse::<usize>())
                .map_err(|_| ())?;
            self.take(len).ok_or(())?
        };
        Ok(Some(Req {
            method: method.into(),
            target: target.into(),
            headers,
            body,
            keep_alive,
        }))
    }
}

/// Serves one connection; returns true if it must be closed with a reset.
fn serve_conn(sh: &Shared, s: &TcpStream, epoch: u64) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = s.set_nodelay(true);
    let mut conn = Conn {
        sh,
        s,
        buf: Vec::new(),
        epoch,
    };
    loop {
        let req = match conn.read_request() {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(()) => {
                let _ = (&mut &*s).write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request",
                );
                return false;
            }
        };
        let (idx, action, authorized) = record(sh, &req);
        let mut delay = match &action {
            Some(Action::Delay(d)) => *d,
            _ => Duration::ZERO,
        };
        if !sh.opts.log_delay.is_zero() && req.target.contains("/logs") {
            delay += sh.opts.log_delay;
        }
        let resp = match action {
            Some(Action::Reset) => return true,
            Some(Action::Respond(code, ctype, body)) => resp(code, ctype, body),
            _ => {
                let until = Instant::now() + delay;
                while Instant::now() < until {
                    if sh.aborted(epoch) {
                        return false;
                    }
                    thread::sleep(
                        until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(20)),
                    );
                }
                handle(sh, &req, authorized)
            }
        };
        let (resp, upgrade) = match resp.status {
            101 => match sh.control.check(&req) {
                Ok(up) => (resp, Some(up)),
                Err(refused) => (refused, None),
            },
            _ => (resp, None),
        };
        if let Some(idx) = idx {
            sh.lock().requests[idx].status = Some(resp.status);
        }
        if let Some(up) = upgrade {
            sh.control
                .serve(s, &req.target, up, std::mem::take(&mut conn.buf));
            return false;
        }
        let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        if !resp.ctype.is_empty() {
            head += &format!("Content-Type: {}\r\n", resp.ctype);
        }
        if resp.ctype.starts_with("text/plain") {
            head += "X-Content-Type-Options: nosniff\r\n";
        }
        if resp.status != 204 {
            head += &format!("Content-Length: {}\r\n", resp.body.len());
        }
        if !req.keep_alive {
            head += "Connection: close\r\n";
        }
        let mut out = (head + "\r\n").into_bytes();
        out.extend_from_slice(&resp.body);
        if (&mut &*s).write_all(&out).is_err() || !req.keep_alive {
            return false;
        }
    }
}

fn record(sh: &Shared, req: &Req) -> (Option<usize>, Option<Action>, bool) {
    let hdr = req
        .headers
        .iter()
        .find(|(k, _)| k == "x-agent-secret")
        .map(|(_, v)| v.as_str());
    let secret_ok = match sh.version {
        Version::March => sh.secret.is_empty() || hdr == Some(sh.secret.as_str()),
        Version::Today => !sh.secret.is_empty() && hdr == Some(sh.secret.as_str()),
    };
    let mut st = sh.lock();
    let hit = match &*sh.interceptor.lock().unwrap() {
        Some(f) => f(&req.target, req.body.len()),
        None => None,
    };
    st.counters.requests += 1;
    if !sh.opts.record {
        return (None, hit.map(|h| h.1), secret_ok);
    }
    st.requests.push(Recorded {
        method: req.method.clone(),
        target: req.target.clone(),
        headers: req.headers.clone(),
        body: req.body.clone(),
        secret_ok,
        fault: hit.as_ref().map(|h| h.0.clone()),
        status: None,
        at: SystemTime::now(),
    });
    (Some(st.requests.len() - 1), hit.map(|h| h.1), secret_ok)
}

fn reason(code: u16) -> &'static str {
    match code {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn set_linger0(s: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: valid fd owned by `s`, pointer/len describe a live `linger` struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            len,
        )
    };
}

// ---------------------------------------------------------------------------------------------
// Routing and handlers (mirrors mountFrontend + chi router + agentSecretMiddleware)

enum Route<'a> {
    Tasks,
    Complete(&'a str),
    Register,
    Config,
    Statuses,
    CMetrics,
    NMetrics,
    Health,
    Control,
    Logs(&'a str),
}

fn handle(sh: &Shared, req: &Req, authorized: bool) -> Resp {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if sh.opts.dev_routes && path.starts_with("/dev/") {
        if (req.method.as_str(), path) == ("POST", "/dev/exec") {
            // Not under the state lock: it waits for the agent.
            return sh.control.dev_exec(&req.body);
        }
        let mut st = sh.lock();
        return dev_route(&mut st, &req.method, path, &req.body)
            .unwrap_or_else(|(code, msg)| err_resp(code, &msg));
    }
    if !path.starts_with("/api") && !path.starts_with("/auth") {
        return html_resp(); // the SPA answers every other path, including `//api/...`
    }
    let today = sh.version == Version::Today;
    let seg: Vec<&str> = path.split('/').collect();
    let (route, method) = match seg[1..] {
        ["api", "agent", "tasks"] => (Route::Tasks, "GET"),
        ["api", "agent", "tasks", id, "complete"] => (Route::Complete(id), "POST"),
        ["api", "agent", "register"] => (Route::Register, "POST"),
        ["api", "agent", "config"] => (Route::Config, "GET"),
        ["api", "agent", "container-statuses"] => (Route::Statuses, "POST"),
        ["api", "agent", "container-metrics"] => (Route::CMetrics, "POST"),
        ["api", "agent", "node-metrics"] => (Route::NMetrics, "POST"),
        ["api", "agent", "health-report"] if today => (Route::Health, "POST"),
        ["api", "agent", "control"] if today => (Route::Control, "GET"),
        ["api", "deployments", id, "logs"] if today => (Route::Logs(id), "POST"),
        _ => return text_resp(404, "404 page not found"),
    };
    if req.method != method {
        return resp(405, "", "");
    }
    if !authorized {
        return text_resp(401, "unauthorized");
    }
    let mut st = sh.lock();
    dispatch(&mut st, sh.version, route, query, &req.body)
        .unwrap_or_else(|(code, msg)| err_resp(code, &msg))
}

type HRes = Result<Resp, (u16, String)>;

/// What today's server answers when a text column would get a NUL byte.
const PG_NUL: &str = "ERROR: invalid byte sequence for encoding \"UTF8\": 0x00 (SQLSTATE 22021)";

fn dispatch(st: &mut State, version: Version, route: Route, query: &str, body: &[u8]) -> HRes {
    match route {
        Route::Register => register(st, version, body),
        Route::Config => {
            let pairs: Vec<(&str, String)> = st
                .config
                .iter()
                .map(|(k, v)| (k.as_str(), go_str(v)))
                .collect();
            Ok(json_resp(200, obj(&pairs)))
        }
        Route::Tasks => poll(st, version, query),
        Route::Complete(id) => complete(st, version, id, body),
        Route::Logs(id) => {
            let id =
                parse_uuid(id).map_err(|e| (400, format!("invalid id {}: {e}", go_quote(id))))?;
            let line = f_str(
                &decode_struct(body, "struct { Line string }")?,
                "line",
                "line",
            )?;
            if line.contains('\0') {
                return Err((500, PG_NUL.into()));
            }
            st.counters.log_requests += 1;
            st.counters.log_bytes += body.len() as u64;
            st.counters.log_lines += line.matches('\n').count() as u64 + 1;
            append_log(st, &id, &line);
            Ok(ok_resp())
        }
        Route::Statuses => {
            items(body, "containerStatus", |m| {
                f_str(m, "domain_prefix", "containerStatus.domain_prefix")?;
                f_int(m, "restart_count", "containerStatus.restart_count")?;
                f_bool(m, "oom_killed", "containerStatus.oom_killed")?;
                f_int(m, "host_port", "containerStatus.host_port").map(drop)
            })?;
            if version == Version::Today {
                reroute(st, body);
            }
            Ok(ok_resp())
        }
        Route::CMetrics => {
            items(body, "containerMetric", |m| {
                f_str(m, "domain_prefix", "containerMetric.domain_prefix")?;
                f_float(m, "cpu_percent", "containerMetric.cpu_percent")?;
                for k in [
                    "mem_usage_bytes",
                    "mem_limit_bytes",
                    "net_rx_bytes",
                    "net_tx_bytes",
                    "block_read_bytes",
                    "block_write_bytes",
                ] {
                    f_int(m, k, &format!("containerMetric.{k}"))?;
                }
                Ok(())
            })?;
            Ok(ok_resp())
        }
        Route::NMetrics => {
            let m = decode_struct(body, "api.nodeMetricsReq")?;
            parse_uuid(&f_str(&m, "node_id", "nodeMetricsReq.node_id")?)
                .map_err(|_| (400, "invalid node_id".to_string()))?;
            Ok(ok_resp())
        }
        Route::Health => {
            let id = parse_uuid(&query_get(query, "node_id"))
                .map_err(|_| (400, "invalid node_id".to_string()))?;
            let v = decode(body)?;
            if let Some(n) = st.nodes.iter_mut().find(|n| n.id == id) {
                n.health_report = Some(v);
            }
            Ok(resp(204, "", ""))
        }
        Route::Control => Ok(resp(101, "", "")), // the upgrade: control::Hub::check
    }
}

fn register(st: &mut State, version: Version, body: &[u8]) -> HRes {
    let m = decode_struct(body, "store.Node")?;
    let id = f_str(&m, "id", "Node.id")?;
    if field(&m, "id").is_some() {
        parse_uuid(&id).map_err(|e| (400, e))?;
    }
    let (hostname, role, host_ip) = (
        f_str(&m, "hostname", "Node.hostname")?,
        f_str(&m, "role", "Node.role")?,
        f_str(&m, "host_ip", "Node.host_ip")?,
    );
    let (max, used) = (
        f_int(&m, "max_storage_bytes", "Node.max_storage_bytes")?,
        f_int(&m, "used_storage_bytes", "Node.used_storage_bytes")?,
    );
    let mut times = [ZERO_TIME.to_string(), ZERO_TIME.to_string()];
    for (i, k) in ["last_seen_at", "created_at"].into_iter().enumerate() {
        let t = f_str(&m, k, &format!("Node.{k}"))?;
        if field(&m, k).is_some() {
            if !valid_rfc3339(&t) {
                return Err((
                    400,
                    format!(
                        "parsing time {} as \"2006-01-02T15:04:05Z07:00\": cannot parse",
                        go_quote(&t)
                    ),
                ));
            }
            times[i] = t;
        }
    }
    if role != "builder" && role != "deploy" {
        return Err((500, "ERROR: new row for relation \"nodes\" violates check constraint \"nodes_role_check\" (SQLSTATE 23514)".into()));
    }
    st.register_count += 1;
    let now = SystemTime::now();
    let existing = st
        .nodes
        .iter_mut()
        .find(|n| n.hostname == hostname && (version == Version::March || n.role == role));
    let (id, created) = match existing {
        Some(n) => {
            if version == Version::March {
                n.role = role.clone();
            }
            (n.host_ip, n.max_storage, n.last_seen, n.registered) =
                (host_ip.clone(), max, now, Instant::now());
            (n.id.clone(), times[1].clone())
        }
        None => {
            let id = new_uuid();
            let (hostname, role, host_ip) = (hostname.clone(), role.clone(), host_ip.clone());
            st.nodes.push(Node {
                id: id.clone(),
                hostname,
                role,
                host_ip,
                max_storage: max,
                used_storage: used,
                last_seen: now,
                created_at: now,
                registered: Instant::now(),
                health_report: None,
            });
            (id, rfc3339(SystemTime::now(), 9))
        }
    };
    let fields = [
        ("id", go_str(&id)),
        ("hostname", go_str(&hostname)),
        ("role", go_str(&role)),
        ("host_ip", go_str(&host_ip)),
        ("max_storage_bytes", max.to_string()),
        ("used_storage_bytes", used.to_string()),
        ("last_seen_at", go_str(&rfc3339(now, 9))),
        ("created_at", go_str(&created)),
    ];
    Ok(json_resp(200, obj(&fields)))
}

fn poll(st: &mut State, version: Version, query: &str) -> HRes {
    let node = parse_uuid(&query_get(query, "node_id")).map_err(|e| (400, e))?;
    if version == Version::Today {
        let n = st
            .nodes
            .iter_mut()
            .find(|n| n.id == node)
            .ok_or((500, format!("node {node} not found")))?;
        n.last_seen = SystemTime::now();
    }
    let items: Vec<String> = st
        .tasks
        .iter()
        .filter(|t| t.node_id == node && t.status == "pending")
        .take(10)
        .map(|t| {
            let node_id = if t.node_id.is_empty() {
                "null".into()
            } else {
                go_str(&t.node_id)
            };
            obj(&[
                ("ID", go_str(&t.id)),
                ("Type", go_str(&t.kind)),
                ("NodeID", node_id),
                ("DeploymentID", go_str(&t.deployment_id)),
                ("Payload", enc(&t.payload, false)),
                ("PayloadJSON", go_str(&enc(&t.payload, true))),
                ("Status", go_str(&t.status)),
                ("Result", go_str(&t.result)),
                ("CreatedAt", go_str(&rfc3339(t.created_at, 6))),
                ("UpdatedAt", go_str(&rfc3339(t.updated_at, 6))),
            ])
        })
        .collect();
    Ok(json_resp(200, format!("[{}]", items.join(","))))
}

fn complete(st: &mut State, version: Version, raw_id: &str, body: &[u8]) -> HRes {
    let id = match (parse_uuid(raw_id), version) {
        (Ok(id), _) => id,
        (Err(e), Version::Today) => {
            return Err((400, format!("invalid id {}: {e}", go_quote(raw_id))))
        }
        (Err(_), Version::March) => NIL_UUID.to_string(), // mustParseUUID
    };
    let parsed = decode(body).unwrap_or(Value::Null);
    st.completions
        .entry(norm_id(raw_id))
        .or_default()
        .push((body.to_vec(), parsed));
    let m = decode_struct(body, "struct")?;
    let status = f_str(&m, "status", "status")?;
    let mut result = f_str(&m, "result", "result")?;
    let image_tag = f_str(&m, "image_tag", "image_tag")?;
    f_int(&m, "host_port", "host_port")?;
    if version == Version::Today && !image_tag.is_empty() {
        result = obj(&[("image_tag", go_str(&image_tag))]);
    }
    if let Some(t) = st.tasks.iter_mut().find(|t| t.id == id) {
        // Postgres text columns refuse NUL: today's server answers 500 for ever.
        if version == Version::Today && (result.contains('\0') || status.contains('\0')) {
            return Err((500, PG_NUL.into()));
        }
        if !["pending", "running", "completed", "failed"].contains(&status.as_str()) {
            return Err((500, "ERROR: new row for relation \"tasks\" violates check constraint \"tasks_status_check\" (SQLSTATE 23514)".into()));
        }
        (t.status, t.result, t.updated_at) = (status.clone(), result.clone(), SystemTime::now());
        let (kind, node, dep) = (t.kind.clone(), t.node_id.clone(), t.deployment_id.clone());
        if version == Version::Today {
            let host_port = f_int(&m, "host_port", "host_port")?;
            scheduler_effects(st, &kind, &node, &dep, &status, &result, host_port);
        }
    }
    Ok(ok_resp())
}

// ---------------------------------------------------------------------------------------------
// Deployments and today's scheduler (internal/api/server.go:4311-4391, cmd/muvee/server.go:254-327)

/// Today's server re-routes by container statuses: each app's running deployment(s) take
/// the reported `host_port` (> 0), as after a restart reassigned the ephemeral port.
fn reroute(st: &mut State, body: &[u8]) {
    let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    for m in &list {
        let (prefix, port) = (m["domain_prefix"].as_str(), m["host_port"].as_i64());
        let (Some(prefix), Some(port)) = (prefix, port.filter(|p| *p > 0)) else {
            continue;
        };
        let running = |d: &&mut Deployment| d.domain_prefix == prefix && d.status == "running";
        for d in st.deployments.iter_mut().filter(running) {
            d.host_port = port;
        }
    }
}

fn append_log(st: &mut State, deployment_id: &str, line: &str) {
    let log = st.logs.entry(deployment_id.to_string()).or_default();
    log.extend_from_slice(line.as_bytes());
    log.push(b'\n');
}

fn push_task(
    st: &mut State,
    node_id: &str,
    task_type: &str,
    deployment_id: &str,
    payload: Value,
) -> String {
    let now = SystemTime::now();
    let id = new_uuid();
    let deployment_id = if deployment_id.is_empty() {
        NIL_UUID
    } else {
        deployment_id
    };
    st.next_seq += 1;
    let seq = st.next_seq;
    st.tasks.push(Task {
        id: id.clone(),
        seq,
        kind: task_type.into(),
        node_id: norm_id(node_id),
        deployment_id: norm_id(deployment_id),
        payload,
        status: "pending".into(),
        result: String::new(),
        created_at: now,
        updated_at: now,
    });
    id
}

/// What today's complete handler does to the deployment row of a build or deploy task.
fn scheduler_effects(
    st: &mut State,
    kind: &str,
    node: &str,
    dep: &str,
    status: &str,
    result: &str,
    host_port: i64,
) {
    let Some(d) = st.deployments.iter_mut().find(|d| d.id == dep) else {
        return;
    };
    let (project, dep) = (d.project_id.clone(), d.id.clone());
    match (kind, status) {
        ("build", "running") => d.status = "building".into(),
        ("build" | "deploy", "failed") => {
            d.status = "failed".into();
            let msg = if result.is_empty() {
                "task failed"
            } else {
                result
            };
            append_log(st, &dep, msg);
        }
        ("deploy", "completed") if host_port > 0 => {
            (d.status, d.host_port, d.node_id) = ("running".into(), host_port, node.into());
            let mut cleanups = Vec::new();
            for o in st.deployments.iter_mut() {
                if o.project_id == project && o.id != dep && o.status == "running" {
                    o.status = "stopped".into();
                    if o.node_id != node && !o.node_id.is_empty() {
                        cleanups.push((o.node_id.clone(), o.domain_prefix.clone()));
                    }
                }
            }
            for (n, prefix) in cleanups {
                push_task(
                    st,
                    &n,
                    "cleanup",
                    NIL_UUID,
                    json!({"domain_prefix": prefix}),
                );
            }
        }
        ("deploy", "completed") => {
            d.status = "failed".into();
            append_log(st, &dep, "deploy completed but no host_port reported");
        }
        _ => {}
    }
}

fn newest_node(st: &State, role: &str) -> Option<String> {
    st.nodes
        .iter()
        .filter(|n| n.role == role)
        .max_by_key(|n| n.registered)
        .map(|n| n.id.clone())
}

fn deploy_payload(d: &Deployment) -> Value {
    let mut p = d.settings.clone();
    for (k, v) in [
        ("image_tag", &d.image_tag),
        ("deployment_id", &d.id),
        ("project_id", &d.project_id),
        ("domain_prefix", &d.domain_prefix),
    ] {
        p.insert(k.into(), Value::String(v.clone()));
    }
    Value::Object(p)
}

/// One pass of the server's build-completion loop: completed builds of `building` deployments
/// get a deploy task on the newest deploy node; the build's result becomes `…_dispatched`.
fn chain_once(st: &mut State) {
    let Some(node) = newest_node(st, "deploy") else {
        return;
    };
    let ready: Vec<(usize, usize, String)> = st
        .tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.kind == "build" && t.status == "completed")
        .filter_map(|(i, t)| {
            let d = st
                .deployments
                .iter()
                .position(|d| d.id == t.deployment_id && d.status == "building")?;
            let tag = serde_json::from_str::<Value>(&t.result).ok()?["image_tag"]
                .as_str()?
                .to_string();
            Some((i, d, tag))
        })
        .take(20)
        .collect();
    for (ti, di, tag) in ready {
        let d = &mut st.deployments[di];
        (d.image_tag, d.status) = (tag, "deploying".into());
        let (payload, dep) = (deploy_payload(d), d.id.clone());
        st.tasks[ti].result += "_dispatched";
        push_task(st, &node, "deploy", &dep, payload);
    }
}

fn chain_loop(sh: &Shared) {
    let mut next = Instant::now() + sh.opts.chain_interval;
    while !sh.stop.load(SeqCst) {
        thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next {
            chain_once(&mut sh.lock());
            next = Instant::now() + sh.opts.chain_interval;
        }
    }
}

/// A new deployment of a project (one per domain prefix), and its first task: a build on the
/// newest builder node (`image_tag` absent) or a deploy on the newest deploy node.
fn enqueue(st: &mut State, req: &Value) -> Result<Value, (u16, String)> {
    let s = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let prefix = Some(s("domain_prefix"))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "demo".into());
    let project_id = st
        .deployments
        .iter()
        .find(|d| d.domain_prefix == prefix)
        .map(|d| d.project_id.clone())
        .unwrap_or_else(new_uuid);
    let (git_url, image) = (s("git_url"), s("image_tag"));
    let role = if git_url.is_empty() {
        "deploy"
    } else {
        "builder"
    };
    if git_url.is_empty() == image.is_empty() {
        return Err((400, "give git_url (a build) or image_tag (a deploy)".into()));
    }
    let node = newest_node(st, role).ok_or((409, format!("no {role} node registered yet")))?;
    let mut settings = serde_json::Map::new();
    let defaults = [
        ("auth_domains", json!("")),
        ("auth_required", json!(false)),
        ("container_port", json!(8080)),
        ("datasets", Value::Null),
        ("env_vars", json!({})),
        ("memory_limit", json!("")),
        ("volume_mount_path", json!("")),
    ];
    for (k, v) in defaults {
        settings.insert(k.into(), req.get(k).cloned().unwrap_or(v));
    }
    let id = new_uuid();
    let d = Deployment {
        id: id.clone(),
        project_id: project_id.clone(),
        domain_prefix: prefix.clone(),
        status: "pending".into(),
        image_tag: image.clone(),
        host_port: 0,
        node_id: String::new(),
        settings,
        created_at: SystemTime::now(),
    };
    let payload = if role == "builder" {
        let branch = Some(s("git_branch")).filter(|b| !b.is_empty());
        let dockerfile = Some(s("dockerfile_path")).filter(|b| !b.is_empty());
        json!({
            "git_url": git_url, "git_branch": branch.unwrap_or_else(|| "main".into()),
            "dockerfile_path": dockerfile.unwrap_or_else(|| "Dockerfile".into()),
            "deployment_id": id, "project_id": project_id, "domain_prefix": prefix,
        })
    } else {
        deploy_payload(&d)
    };
    st.deployments.push(d);
    let kind = if role == "builder" { "build" } else { "deploy" };
    if kind == "deploy" {
        st.deployments.last_mut().unwrap().status = "deploying".into();
    }
    let task = push_task(st, &node, kind, &id, payload);
    Ok(json!({"deployment_id": id, "task_id": task, "project_id": project_id}))
}

fn task_row(st: &State, t: &Task) -> Value {
    let role = st.nodes.iter().find(|n| n.id == t.node_id);
    json!({
        "id": t.id, "type": t.kind, "node_id": t.node_id,
        "node": role.map(|n| format!("{} ({})", n.hostname, n.role)),
        "deployment_id": t.deployment_id, "status": t.status, "result": t.result,
        "created_at": rfc3339(t.created_at, 3), "updated_at": rfc3339(t.updated_at, 3),
    })
}

fn deployment_row(d: &Deployment) -> Value {
    json!({
        "id": d.id, "project_id": d.project_id, "domain_prefix": d.domain_prefix,
        "status": d.status, "image_tag": d.image_tag, "host_port": d.host_port,
        "node_id": d.node_id, "created_at": rfc3339(d.created_at, 3),
    })
}

/// The dev surface (no secret; the dev control plane listens on loopback):
/// `POST /dev/build` `{"git_url",…}`, `POST /dev/deploy` `{"image_tag",…}` (both take
/// `domain_prefix`, `container_port`, `memory_limit`, `datasets`, `env_vars`, …),
/// `POST /dev/tasks` `{"type","payload","deployment_id"}` (a raw task, no deployment row),
/// `POST /dev/exec` (a command through the control channel, see [`control::Hub::dev_exec`]),
/// `GET /dev/tasks`, `/dev/tasks/<id>`, `/dev/deployments`, `/dev/nodes`, `/dev/stats`, and
/// `/dev/logs/<deployment>` (text).
fn dev_route(st: &mut State, method: &str, path: &str, body: &[u8]) -> HRes {
    let seg: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    let out = match (method, &seg[..]) {
        ("POST", ["build"] | ["deploy"]) => {
            let mut v = decode(body)?;
            if !v.is_object() {
                return Err((400, "expected a JSON object".into()));
            }
            if seg[0] == "build" && v["git_url"].as_str().unwrap_or("").is_empty() {
                return Err((400, "git_url is required".into()));
            }
            if seg[0] == "deploy" {
                v.as_object_mut().unwrap().remove("git_url");
            }
            enqueue(st, &v)?
        }
        ("POST", ["tasks"]) => {
            // A raw task: {"type", "payload", "deployment_id"?}, for the newest node of the
            // role that runs the type (what the benchmark enqueues).
            let v = decode_struct(body, "devTask")?;
            let kind = f_str(&v, "type", "type")?;
            let role = if kind == "build" { "builder" } else { "deploy" };
            let node =
                newest_node(st, role).ok_or((409, format!("no {role} node registered yet")))?;
            let dep = f_str(&v, "deployment_id", "deployment_id")?;
            let payload = v.get("payload").cloned().unwrap_or(json!({}));
            let id = push_task(st, &node, &kind, &dep, payload);
            json!({"task_id": id})
        }
        ("GET", ["tasks"]) => Value::Array(st.tasks.iter().map(|t| task_row(st, t)).collect()),
        ("GET", ["tasks", id]) => {
            let id = norm_id(id);
            let t = st.tasks.iter().find(|t| t.id == id);
            task_row(st, t.ok_or((404, format!("no task {id}")))?)
        }
        ("GET", ["deployments"]) => {
            Value::Array(st.deployments.iter().map(deployment_row).collect())
        }
        ("GET", ["nodes"]) => {
            let rows = st.nodes.iter().map(|n| {
                json!({"id": n.id, "hostname": n.hostname, "role": n.role, "host_ip": n.host_ip,
                       "last_seen_at": rfc3339(n.last_seen, 3)})
            });
            Value::Array(rows.collect())
        }
        ("GET", ["stats"]) => {
            let c = &st.counters;
            let reports: serde_json::Map<String, Value> = st
                .tasks
                .iter()
                .map(|t| (t.id.clone(), Value::String(t.status.clone())))
                .collect();
            json!({"requests": c.requests, "log_requests": c.log_requests,
                   "log_bytes": c.log_bytes, "log_lines": c.log_lines, "tasks": reports})
        }
        ("GET", ["logs", id]) => {
            let log = st.logs.get(&norm_id(id)).cloned().unwrap_or_default();
            return Ok(resp(200, "text/plain; charset=utf-8", log));
        }
        _ => return Err((404, format!("no dev route {method} {path}"))),
    };
    Ok(json_resp(200, out.to_string()))
}

/// A random version-4 UUID (from /dev/urandom; time and a counter if that fails).
pub fn new_uuid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 16];
    let urandom = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if urandom.is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let x = t ^ (u128::from(N.fetch_add(1, SeqCst)) << 64) ^ u128::from(std::process::id());
        b = x.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

// ---------------------------------------------------------------------------------------------
// Go-compatible JSON decoding (first value only, case-insensitive keys, strict types)

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn decode(body: &[u8]) -> Result<Value, (u16, String)> {
    match serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next()
    {
        None => Err((400, "EOF".into())),
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) if e.is_eof() => Err((400, "unexpected EOF".into())),
        Some(Err(e)) => Err((400, format!("invalid character: {e}"))),
    }
}

/// Top-level value for a Go struct target: an object, or `null` (a no-op in Go).
fn decode_struct(body: &[u8], ty: &str) -> Result<Value, (u16, String)> {
    match decode(body)? {
        v @ (Value::Null | Value::Object(_)) => Ok(v),
        v => Err((
            400,
            format!(
                "json: cannot unmarshal {} into Go value of type {ty}",
                kind(&v)
            ),
        )),
    }
}

fn field<'a>(m: &'a Value, k: &str) -> Option<&'a Value> {
    let m = m.as_object()?;
    let v = m.get(k).or_else(|| {
        m.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
    })?;
    (!v.is_null()).then_some(v)
}

fn f_str(m: &Value, k: &str, name: &str) -> Result<String, (u16, String)> {
    match field(m, k) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err((
            400,
            format!(
                "json: cannot unmarshal {} into Go struct field {name} of type string",
                kind(v)
            ),
        )),
    }
}

fn f_int(m: &Value, k: &str, name: &str) -> Result<i64, (u16, String)> {
    match field(m, k) {
        None => Ok(0),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().unwrap()),
        Some(v) => Err((
            400,
            format!(
                "json: cannot unmarshal {} into Go struct field {name} of type int64",
                kind(v)
            ),
        )),
    }
}

fn f_float(m: &Value, k: &str, name: &str) -> Result<f64, (u16, String)> {
    match field(m, k) {
        None => Ok(0.0),
        Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(0.0)),
        Some(v) => Err((
            400,
            format!(
                "json: cannot unmarshal {} into Go struct field {name} of type float64",
                kind(v)
            ),
        )),
    }
}

fn f_bool(m: &Value, k: &str, name: &str) -> Result<bool, (u16, String)> {
    match field(m, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err((
            400,
            format!(
                "json: cannot unmarshal {} into Go struct field {name} of type bool",
                kind(v)
            ),
        )),
    }
}

/// A body decoded into a Go `[]api.<ty>` (today's and the March server's handlers): an
/// array (or null) of objects (or nulls), each field of its Go type.
fn items(
    body: &[u8],
    ty: &str,
    check: impl Fn(&Value) -> Result<(), (u16, String)>,
) -> Result<(), (u16, String)> {
    let list = match decode(body)? {
        Value::Null => return Ok(()),
        Value::Array(list) => list,
        v => {
            let msg = format!(
                "json: cannot unmarshal {} into Go value of type []api.{ty}",
                kind(&v)
            );
            return Err((400, msg));
        }
    };
    for v in &list {
        match v {
            Value::Null => {}
            Value::Object(_) => check(v)?,
            v => {
                let msg = format!(
                    "json: cannot unmarshal {} into Go value of type api.{ty}",
                    kind(v)
                );
                return Err((400, msg));
            }
        }
    }
    Ok(())
}

fn query_get(query: &str, key: &str) -> String {
    let pair = query
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .find(|(k, _)| pct_decode(k) == key);
    pair.map(|(_, v)| pct_decode(v)).unwrap_or_default()
}

fn pct_decode(s: &str) -> String {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |c: u8| (c as char).to_digit(16).unwrap() as u8;
                out.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Go-compatible JSON encoding

/// Go `encoding/json` string: serde escaping plus HTML-safe escapes.
pub fn go_str(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap();
    q.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// Approximates Go's `%q`.
fn go_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Ordered struct-like object with pre-encoded values.
fn obj(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", go_str(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// `jsonb == false`: Go map encoding (sorted keys, compact, HTML escapes).
/// `jsonb == true`: Postgres jsonb text (keys by length then bytes, `", "` / `": "`).
pub fn enc(v: &Value, jsonb: bool) -> String {
    let sep = if jsonb { ", " } else { "," };
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{f}"),
            _ => n.to_string(),
        },
        Value::String(s) if jsonb => serde_json::to_string(s).unwrap(),
        Value::String(s) => go_str(s),
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| enc(x, jsonb))
                .collect::<Vec<_>>()
                .join(sep)
        ),
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            if jsonb {
                keys.sort_by(|a, b| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
            } else {
                keys.sort();
            }
            let kv = if jsonb { ": " } else { ":" };
            let items: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "{}{kv}{}",
                        enc(&Value::String(k.to_string()), jsonb),
                        enc(&m[*k], jsonb)
                    )
                })
                .collect();
            format!("{{{}}}", items.join(sep))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// UUIDs and time

/// google/uuid `Parse`: canonical lower-case form, or the error text Go gives.
pub fn parse_uuid(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let core = match b.len() {
        36 => b,
        38 if b[0] == b'{' && b[37] == b'}' => &b[1..37],
        45 if b[..9].eq_ignore_ascii_case(b"urn:uuid:") => &b[9..],
        32 | 38 | 45 => b,
        n => return Err(format!("invalid UUID length: {n}")),
    };
    let dashes = core.len() == 36;
    let ok = core.iter().enumerate().all(|(i, c)| {
        let dash = dashes && [8, 13, 18, 23].contains(&i);
        (dash && *c == b'-') || (!dash && c.is_ascii_hexdigit())
    });
    let hex: String = core
        .iter()
        .filter(|c| **c != b'-')
        .map(|c| c.to_ascii_lowercase() as char)
        .collect();
    if !ok || hex.len() != 32 {
        return Err("invalid UUID format".into());
    }
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn norm_id(s: &str) -> String {
    parse_uuid(s).unwrap_or_else(|_| s.to_string())
}

fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let (d, m) = (
        doy - (153 * mp + 2) / 5 + 1,
        if mp < 10 { mp + 3 } else { mp - 9 },
    );
    (yoe + era * 400 + i64::from(m <= 2), m as u32, d as u32)
}

/// RFC 3339 in UTC with up to `digits` fractional digits, trailing zeros trimmed (Go RFC3339Nano).
pub fn rfc3339(t: SystemTime, digits: u32) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ((y, mo, da), sod) = (civil(secs.div_euclid(86_400)), secs.rem_euclid(86_400));
    let mut s = format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    let frac = d.subsec_nanos() / 10u32.pow(9 - digits.min(9));
    if frac != 0 {
        s += format!(".{:0w$}", frac, w = digits as usize).trim_end_matches('0');
    }
    s + "Z"
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, as Go's time.Time UnmarshalJSON requires.
fn valid_rfc3339(s: &str) -> bool {
    let fits = |s: &str, tpl: &str| {
        s.len() == tpl.len()
            && s.bytes().zip(tpl.bytes()).all(|(c, t)| {
                if t == b'9' {
                    c.is_ascii_digit()
                } else {
                    c == t
                }
            })
    };
    let (Some(head), Some(mut rest)) = (s.get(..19), s.get(19..)) else {
        return false;
    };
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[n..];
        if n == 0 {
            return false;
        }
    }
    fits(head, "9999-99-99T99:99:99") && (rest == "Z" || fits(&rest.replace('-', "+"), "+99:99"))
}
