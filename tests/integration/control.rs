//! The deploy role's control channel (protocol §1.10) against a WebSocket test server that
//! also answers register/config/poll: `exec` and `cp` sessions on a real container.

use crate::deployer::{images, IDLE};
use crate::util::{self, require_docker, temp_dir};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

#[path = "../../examples/dev-cp/tls.rs"]
mod tls;

const SECRET: &str = "control-secret-5d1e";
/// `docker exec -ti` sizes the container's TTY just after the process starts: wait for it.
const WAIT_SIZE: &str = "i=0; while [ $i -lt 100 ]; do s=$(stty size 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != \"0 0\" ] && break; i=$((i+1)); sleep 0.1; done; echo \"size=$s\"; exit 3";

/// The test control plane: HTTP for the agent loop, and WebSocket upgrades handed to the
/// test as (request path and query, socket).
struct Server {
    port: u16,
    node: Arc<Mutex<String>>,
    /// Set: polls answer 500 `node … not found` (a deleted node) until it registers again.
    forgot: Arc<AtomicBool>,
    conns: Receiver<(String, WebSocket<TcpStream>)>,
}

impl Server {
    fn start() -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let node = Arc::new(Mutex::new(util::new_uuid()));
        let forgot = Arc::new(AtomicBool::new(false));
        let (tx, conns) = mpsc::channel();
        let (n, f) = (node.clone(), forgot.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (tx, n, f) = (tx.clone(), n.clone(), f.clone());
                std::thread::spawn(move || serve(s, &n, &f, &tx));
            }
        });
        Server {
            port,
            node,
            forgot,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next control connection (its URI) within `secs`, greeted with `hello`.
    fn accept(&self, secs: u64) -> (String, Ws) {
        let (uri, mut ws) = self
            .conns
            .recv_timeout(Duration::from_secs(secs))
            .expect("the agent never dialled the control channel");
        let node = self.node.lock().unwrap().clone();
        let hello = json!({"type": "hello", "node_id": node}).to_string();
        ws.send(Message::text(hello)).unwrap();
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        (uri, Ws(ws))
    }
}

fn serve(
    mut s: TcpStream,
    node: &Mutex<String>,
    forgot: &AtomicBool,
    tx: &mpsc::Sender<(String, WebSocket<TcpStream>)>,
) {
    let mut head = [0u8; 4096];
    let Ok(n) = s.peek(&mut head) else { return };
    let text = String::from_utf8_lossy(&head[..n]).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    if path.starts_with("/api/agent/control") {
        let authorized = text.contains(&format!("X-Agent-Secret: {SECRET}"))
            || text
                .to_ascii_lowercase()
                .contains(&format!("x-agent-secret: {SECRET}"));
        if !authorized {
            let _ = s.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nunauthorized\n",
            );
            return;
        }
        if let Ok(ws) = tungstenite::accept(s) {
            let _ = tx.send((path, ws));
        }
        return;
    }
    // Plain HTTP: read the head and body, answer what the agent loop needs.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    while let Ok(n @ 1..) = s.read(&mut chunk) {
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = find(&buf, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            break;
        }
    }
    let id = node.lock().unwrap().clone();
    let route = path.split('?').next().unwrap_or("");
    if route == "/api/agent/tasks" && forgot.load(Ordering::SeqCst) {
        let body = "node not found\n";
        let resp = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes());
        return;
    }
    if route == "/api/agent/register" {
        forgot.store(false, Ordering::SeqCst);
    }
    let body = match route {
        "/api/agent/register" => {
            json!({"id": id, "hostname": "h", "role": "deploy", "host_ip": "127.0.0.1",
            "max_storage_bytes": 0, "used_storage_bytes": 0, "last_seen_at": "2026-01-01T00:00:00Z",
            "created_at": "2026-01-01T00:00:00Z"})
        }
        "/api/agent/tasks" => json!([]),
        _ => json!({}),
    }
    .to_string()
        + "\n";
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// The server's end of one control connection.
struct Ws(WebSocket<TcpStream>);

impl Ws {
    fn send(&mut self, v: Value) {
        self.0.send(Message::text(v.to_string())).unwrap();
    }

    /// The next frame of `session` (pings are answered, other frames skipped).
    fn next(&mut self, session: &str, secs: u64) -> Value {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            match self.0.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "ping" {
                        self.send(json!({"type": "pong"}));
                    } else if v["session"] == session {
                        return v;
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("control connection: {e}"),
            }
        }
        panic!("no frame for session {session} within {secs}s");
    }

    /// Collects `session`'s output until `exit`: (stdout bytes, the exit frame).
    fn run_to_exit(&mut self, session: &str) -> (Vec<u8>, Value) {
        let mut out = Vec::new();
        loop {
            let f = self.next(session, 20);
            match f["type"].as_str() {
                Some("stdio") | Some("cp_down_tar") => out.extend(decode(&f)),
                Some("exit") | Some("error") => return (out, f),
                _ => {}
            }
        }
    }
}

fn decode(f: &Value) -> Vec<u8> {
    use base64::Engine;
    let d = f["data"].as_str().unwrap_or("");
    base64::engine::general_purpose::STANDARD.decode(d).unwrap()
}

fn b64(b: &[u8]) -> String {
    util::base64(b)
}

/// Every frame of `session` up to and including its `exit` or `error`.
fn frames_to_end(ws: &mut Ws, session: &str, secs: u64) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let f = ws.next(session, secs);
        let end = matches!(f["type"].as_str(), Some("exit") | Some("error"));
        all.push(f);
        if end {
            return all;
        }
    }
}

/// Types into `session` until its output shows `want` (output seen so far in `seen`).
fn type_until(ws: &mut Ws, session: &str, input: &[u8], want: &str, seen: &mut Vec<u8>) {
    for _ in 0..20 {
        ws.send(json!({"type": "stdio", "session": session, "data": b64(input)}));
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            if String::from_utf8_lossy(seen).contains(want) {
                return;
            }
            if let Some(f) = ws.poll(session) {
                seen.extend(decode(&f));
            }
        }
    }
    panic!(
        "{want:?} never showed in {session}: {}",
        String::from_utf8_lossy(seen)
    );
}

impl Ws {
    /// The next frame of `session` if one arrives within the socket's read timeout.
    fn poll(&mut self, session: &str) -> Option<Value> {
        self.poll_any().filter(|v| v["session"] == session)
    }

    /// The next frame of any session if one arrives within the socket's read timeout.
    fn poll_any(&mut self) -> Option<Value> {
        match self.0.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "ping" {
                    self.send(json!({"type": "pong"}));
                    return None;
                }
                Some(v)
            }
            Ok(_) => None,
            Err(tungstenite::Error::Io(_)) => None,
            Err(e) => panic!("control connection: {e}"),
        }
    }
}

/// `docker top`: the processes running in `container`, one per line.
fn top(container: &str) -> String {
    let out = util::docker(&["top", container], &[]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container labelled as an app of node `node` (`muvee-<prefix>`), or with no labels.
fn app_container(prefix: &str, node: Option<&str>) -> String {
    images();
    let name = format!("muvee-{prefix}");
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        name.clone(),
    ];
    if let Some(node) = node {
        for l in [
            "muvee.managed=true".to_string(),
            format!("muvee.node={node}"),
            format!("muvee.domain_prefix={prefix}"),
        ] {
            args.extend(["--label".into(), l]);
        }
    }
    args.push(IDLE.into());
    util::sh(Command::new(util::docker_cli()).args(&args));
    name
}

/// The deploy agent under test and the container its sessions reach (an app of its node).
struct Agent {
    child: Child,
    container: String,
}

impl Agent {
    fn start(server: &Server) -> Agent {
        Agent::start_with(&server.url(), &[])
    }

    fn start_with(url: &str, env: &[(&str, &str)]) -> Agent {
        let hex = util::unique_hex();
        let node = format!("itx-node-{}-{}", std::process::id(), &hex[..6]);
        let prefix = format!("itx-{}-{}", std::process::id(), &hex[..6]);
        let container = app_container(&prefix, Some(&node));
        let mut cmd = Command::new(util::bin());
        cmd.env("NODE_ROLE", "deploy")
            .env("NODE_NAME", &node)
            .env("CONTROL_PLANE_URL", url)
            .env("AGENT_SECRET", SECRET)
            .env("DATA_DIR", temp_dir("control-data"))
            .env("DOCKER_CLI", util::docker_cli())
            .env("POLL_INTERVAL", "1s")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent {
            child: cmd.spawn().unwrap(),
            container,
        }
    }

    fn prefix(&self) -> &str {
        &self.container[6..]
    }

    /// The agent's peak resident memory (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = util::docker(&["rm", "-f", &self.container], &[]);
    }
}

/// Removes the named containers when the test ends, however it ends.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = util::docker(&["rm", "-f", c], &[]);
        }
    }
}

#[test]
fn exec_sessions_echo_take_input_resize_and_report_exit_codes() {
    if !require_docker("exec_sessions_echo_take_input_resize_and_report_exit_codes") {
        return;
    }
    let server = Server::start();
    let agent = Agent::start(&server);
    let (uri, mut ws) = server.accept(20);
    let node = server.node.lock().unwrap().clone();
    assert_eq!(uri, format!("/api/agent/control?node_id={node}"));

    // echo: output, exit 0 sends no code; by domain prefix.
    let prefix = agent.prefix();
    ws.send(
        json!({"type": "open_exec", "session": "s1", "domain_prefix": prefix,
                   "container": format!("muvee-{prefix}"), "cmd": ["echo", "hello-pty"]}),
    );
    let (out, exit) = ws.run_to_exit("s1");
    assert!(
        String::from_utf8_lossy(&out).contains("hello-pty"),
        "{out:?}"
    );
    assert_eq!(exit, json!({"type": "exit", "session": "s1"}));

    // A non-zero exit code, and the PTY size (cols x rows) the session asked for.
    ws.send(
        json!({"type": "open_exec", "session": "s2", "container": agent.container,
                   "cmd": ["sh", "-c", WAIT_SIZE], "cols": 101, "rows": 33}),
    );
    let (out, exit) = ws.run_to_exit("s2");
    assert!(
        String::from_utf8_lossy(&out).contains("size=33 101"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(exit["code"], 3, "{exit}");

    // Interactive: input typed before the shell is up is not lost; a resize, then close
    // kills it (-1). docker applies a resize asynchronously (SIGWINCH, then an API call)
    // while input goes down the attached stream, so, as a person would, the test asks for
    // the size again until it shows.
    ws.send(
        json!({"type": "open_exec", "session": "s3", "container": agent.container,
                   "cmd": ["sh"]}),
    );
    ws.send(json!({"type": "stdio", "session": "s3", "data": b64(b"echo typed-$((6*7))\n")}));
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("typed-42") {
        seen.extend(decode(&ws.next("s3", 10)));
    }
    ws.send(json!({"type": "resize", "session": "s3", "cols": 77, "rows": 11}));
    type_until(&mut ws, "s3", b"stty size\n", "11 77", &mut seen);
    ws.send(json!({"type": "close", "session": "s3"}));
    let (_, exit) = ws.run_to_exit("s3");
    assert_eq!(exit["code"], -1, "{exit}");

    // Missing fields → error frames, as the Go agent words them.
    ws.send(json!({"type": "open_exec", "session": "s4", "container": agent.container}));
    assert_eq!(
        ws.next("s4", 10)["msg"],
        "open_exec requires session/container/cmd"
    );
    ws.send(
        json!({"type": "open_cp", "session": "s5", "container": agent.container,
                   "path": "/tmp", "direction": "sideways"}),
    );
    assert_eq!(
        ws.next("s5", 10)["msg"],
        "open_cp direction must be 'up' or 'down'"
    );

    // The node was deleted: the agent registers again and dials with the new id.
    let new = util::new_uuid();
    *server.node.lock().unwrap() = new.clone();
    server.forgot.store(true, Ordering::SeqCst);
    let (uri, _ws) = server.accept(15);
    assert_eq!(uri, format!("/api/agent/control?node_id={new}"));
}

#[test]
fn cp_up_and_down_round_trip_a_directory_and_the_channel_reconnects() {
    if !require_docker("cp_up_and_down_round_trip_a_directory_and_the_channel_reconnects") {
        return;
    }
    let server = Server::start();
    let agent = Agent::start(&server);
    let (_, mut ws) = server.accept(20);

    // A directory with text, binary and nested files, as a tar made by tar(1).
    let src = temp_dir("cp-src");
    std::fs::create_dir_all(src.join("tree/sub")).unwrap();
    std::fs::write(src.join("tree/a.txt"), "alpha\n").unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("tree/sub/blob.bin"), &blob).unwrap();
    let tar = tar_of(&src, "tree");
    ws.send(
        json!({"type": "open_cp", "session": "u1", "container": agent.container,
                   "path": "/tmp", "direction": "up"}),
    );
    for chunk in tar.chunks(32 * 1024) {
        ws.send(json!({"type": "cp_up_tar", "session": "u1", "data": b64(chunk)}));
    }
    ws.send(json!({"type": "cp_end", "session": "u1"}));
    let (_, exit) = ws.run_to_exit("u1");
    assert_eq!(exit, json!({"type": "exit", "session": "u1"}));

    ws.send(
        json!({"type": "open_cp", "session": "d1", "container": agent.container,
                   "path": "/tmp/tree", "direction": "down"}),
    );
    let mut down = Vec::new();
    let mut ended = false;
    loop {
        let f = ws.next("d1", 20);
        match f["type"].as_str().unwrap() {
            "cp_down_tar" => down.extend(decode(&f)),
            "cp_end" => ended = true,
            "exit" => break,
            other => panic!("{other}: {f}"),
        }
    }
    assert!(ended, "no cp_end before exit");
    let dst = temp_dir("cp-dst");
    let mut untar = Command::new("tar")
        .arg("-C")
        .arg(&dst)
        .arg("-xf")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    untar.stdin.take().unwrap().write_all(&down).unwrap();
    assert!(untar.wait().unwrap().success());
    assert_eq!(std::fs::read(dst.join("tree/sub/blob.bin")).unwrap(), blob);
    assert_eq!(
        std::fs::read_to_string(dst.join("tree/a.txt")).unwrap(),
        "alpha\n"
    );

    // A missing path: as the Go agent, `cp_end` first (muveectl closes its untar on it and
    // only then reads the exit code), then docker's error text on stderr, then exit 1.
    ws.send(
        json!({"type": "open_cp", "session": "d2", "container": agent.container,
                   "path": "/no/such", "direction": "down"}),
    );
    let frames = frames_to_end(&mut ws, "d2", 20);
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["cp_end", "stdio", "exit"], "{frames:?}");
    assert_eq!(frames[1]["stream"], "stderr");
    assert!(String::from_utf8_lossy(&decode(&frames[1])).contains("/no/such"));
    assert_eq!(frames[2]["code"], 1);

    // The server drops the connection: the agent dials again.
    drop(ws);
    let (_, mut ws) = server.accept(10);
    ws.send(
        json!({"type": "open_exec", "session": "r1", "container": agent.container,
                   "cmd": ["true"]}),
    );
    assert_eq!(
        ws.run_to_exit("r1").1,
        json!({"type": "exit", "session": "r1"})
    );
}

/// `tar -C dir -cf - name`.
fn tar_of(dir: &std::path::Path, name: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", name])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn exec_and_cp_reach_only_this_nodes_apps() {
    if !require_docker("exec_and_cp_reach_only_this_nodes_apps") {
        return;
    }
    let server = Server::start();
    let agent = Agent::start(&server);
    let (_, mut ws) = server.accept(20);
    let hex = util::unique_hex();
    // An app of another node on the same engine, and a container muvee knows nothing of
    // (another installation's, the registry).
    let other = format!("itx-{}-{}-other", std::process::id(), &hex[..6]);
    let plain = format!("itx-{}-{}-plain", std::process::id(), &hex[..6]);
    let _rm = Containers(vec![
        app_container(&other, Some("some-other-node")),
        app_container(&plain, None),
    ]);
    let refused = [
        json!({"type": "open_exec", "session": "x1", "container": format!("muvee-{plain}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_exec", "session": "x2", "domain_prefix": other, "container": format!("muvee-{other}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_exec", "session": "x3", "container": format!("muvee-{other}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_cp", "session": "x4", "container": format!("muvee-{plain}"), "path": "/etc/hostname", "direction": "down"}),
        json!({"type": "open_cp", "session": "x5", "domain_prefix": plain, "container": format!("muvee-{plain}"), "path": "/tmp", "direction": "up"}),
    ];
    for open in refused {
        let s = open["session"].as_str().unwrap().to_string();
        ws.send(open);
        let frames = frames_to_end(&mut ws, &s, 20);
        assert_eq!(frames.len(), 1, "{s}: {frames:?}");
        assert_eq!(frames[0]["type"], "error", "{s}: {frames:?}");
        let msg = frames[0]["msg"].as_str().unwrap();
        assert!(msg.contains("this node's apps"), "{s}: {msg}");
    }
    // This node's app, by its prefix and by its container's name.
    let prefix = agent.prefix().to_string();
    ws.send(json!({"type": "open_exec", "session": "o1", "domain_prefix": prefix, "container": agent.container, "cmd": ["echo", "ours"]}));
    let (out, exit) = ws.run_to_exit("o1");
    assert!(String::from_utf8_lossy(&out).contains("ours") && exit["type"] == "exit");
    ws.send(json!({"type": "open_exec", "session": "o2", "container": agent.container, "cmd": ["true"]}));
    assert_eq!(
        ws.run_to_exit("o2").1,
        json!({"type": "exit", "session": "o2"})
    );
}

#[test]
fn close_and_a_dropped_channel_kill_the_process_inside_the_container() {
    if !require_docker("close_and_a_dropped_channel_kill_the_process_inside_the_container") {
        return;
    }
    let server = Server::start();
    let agent = Agent::start(&server);
    let (_, mut ws) = server.accept(20);
    let c = agent.container.clone();
    // A plain process, and one with a child of its own.
    ws.send(
        json!({"type": "open_exec", "session": "k1", "container": c, "cmd": ["sleep", "7777"]}),
    );
    ws.send(json!({"type": "open_exec", "session": "k2", "container": c, "cmd": ["sh", "-c", "sleep 7778; echo never"]}));
    assert!(
        util::poll(20, || top(&c).contains("sleep 7777")
            && top(&c).contains("sleep 7778")),
        "{}",
        top(&c)
    );
    // One at a time: `run_to_exit` skips the other sessions' frames.
    ws.send(json!({"type": "close", "session": "k1"}));
    assert_eq!(ws.run_to_exit("k1").1["code"], -1);
    ws.send(json!({"type": "close", "session": "k2"}));
    assert_eq!(ws.run_to_exit("k2").1["code"], -1);
    let t = top(&c);
    assert!(
        !t.contains("sleep 7777") && !t.contains("sleep 7778"),
        "left running after close:\n{t}"
    );

    // The channel drops (the control plane went away): the same.
    ws.send(
        json!({"type": "open_exec", "session": "k3", "container": c, "cmd": ["sleep", "7779"]}),
    );
    assert!(
        util::poll(20, || top(&c).contains("sleep 7779")),
        "{}",
        top(&c)
    );
    drop(ws);
    assert!(
        util::poll(15, || !top(&c).contains("sleep 7779")),
        "left running after the channel dropped:\n{}",
        top(&c)
    );
}

#[test]
fn big_or_unread_input_ends_the_session_with_an_error_and_memory_stays_bounded() {
    if !require_docker(
        "big_or_unread_input_ends_the_session_with_an_error_and_memory_stays_bounded",
    ) {
        return;
    }
    let server = Server::start();
    let agent = Agent::start(&server);
    let (_, mut ws) = server.accept(20);
    let c = agent.container.clone();

    // 20 frames of 4 MiB into a program that reads nothing.
    ws.send(
        json!({"type": "open_exec", "session": "b1", "container": c, "cmd": ["sleep", "7781"]}),
    );
    let big = b64(&vec![b'x'; 4 << 20]);
    for _ in 0..20 {
        ws.send(json!({"type": "stdio", "session": "b1", "data": big}));
    }
    let f = ws.next("b1", 30);
    assert_eq!(f["type"], "error", "{f}");
    assert!(f["msg"].as_str().unwrap().contains("larger than"), "{f}");

    // Frames that fit, faster than the program reads them (it reads none).
    ws.send(
        json!({"type": "open_exec", "session": "b2", "container": c, "cmd": ["sleep", "7782"]}),
    );
    let mib = b64(&vec![b'y'; 1 << 20]);
    for _ in 0..16 {
        ws.send(json!({"type": "stdio", "session": "b2", "data": mib}));
    }
    // (The container's TTY echoes what it takes before its buffer fills.)
    let f = frames_to_end(&mut ws, "b2", 30).pop().unwrap();
    assert_eq!(f["type"], "error", "{f}");
    assert!(f["msg"].as_str().unwrap().contains("faster than"), "{f}");
    let peak = agent.peak_rss_kib();
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
    // Both sessions were ended: their processes too.
    assert!(
        util::poll(15, || !top(&c).contains("sleep 778")),
        "{}",
        top(&c)
    );

    // At most 16 sessions at once: the 17th is refused, and closing one makes room.
    for i in 0..17 {
        ws.send(json!({"type": "open_exec", "session": format!("m{i}"), "container": c, "cmd": ["sleep", "7783"]}));
    }
    let f = ws.next("m16", 30);
    assert_eq!(f["type"], "error", "{f}");
    assert!(f["msg"].as_str().unwrap().contains("16"), "{f}");
    ws.send(json!({"type": "close", "session": "m0"}));
    assert_eq!(ws.run_to_exit("m0").1["code"], -1);
    ws.send(
        json!({"type": "open_exec", "session": "m17", "container": c, "cmd": ["echo", "room"]}),
    );
    let (out, exit) = ws.run_to_exit("m17");
    assert!(String::from_utf8_lossy(&out).contains("room"), "{exit}");
    for i in 1..16 {
        ws.send(json!({"type": "close", "session": format!("m{i}")}));
    }
    // Their exits come in any order.
    let mut open: Vec<String> = (1..16).map(|i| format!("m{i}")).collect();
    let end = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() && Instant::now() < end {
        let Some(f) = ws.poll_any() else { continue };
        if f["type"] == "exit" {
            assert_eq!(f["code"], -1, "{f}");
            open.retain(|s| f["session"] != s.as_str());
        }
    }
    assert!(open.is_empty(), "no exit for {open:?}");
}

/// A docker CLI that is the real one, made slow where a test asks: `ps` sleeps 6 s while the
/// file `slow-ps` exists next to it (a slow daemon), and `cp - …` takes its input at about
/// 2 MiB/s (a container whose disk is slower than the network).
fn slow_docker() -> std::path::PathBuf {
    let dir = temp_dir("slow-docker");
    let script = format!(
        "#!/bin/sh\n\
         real={real}\n\
         if [ \"$1\" = ps ] && [ -e {dir}/slow-ps ]; then sleep 6; fi\n\
         if [ \"$1\" = cp ] && [ \"$2\" = - ]; then\n\
           while n=$(dd bs=65536 count=1 iflag=fullblock 2>/dev/null | tee /dev/fd/3 | wc -c) && [ \"$n\" -gt 0 ]; do sleep 0.03; done 3>&1 | \"$real\" \"$@\"\n\
           exit $?\n\
         fi\n\
         exec \"$real\" \"$@\"\n",
        real = util::docker_cli(),
        dir = dir.display()
    );
    let path = dir.join("docker");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn an_upload_into_a_slow_container_slows_down_instead_of_failing() {
    if !require_docker("an_upload_into_a_slow_container_slows_down_instead_of_failing") {
        return;
    }
    let server = Server::start();
    let docker = slow_docker();
    let agent = Agent::start_with(&server.url(), &[("DOCKER_CLI", docker.to_str().unwrap())]);
    let (_, mut ws) = server.accept(20);
    // 16 MiB, sent as fast as the socket takes it: twice what the Go agent's 256-frame
    // inbox held.
    let src = temp_dir("cp-slow");
    let blob: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &blob).unwrap();
    let tar = tar_of(&src, "big.bin");
    ws.send(json!({"type": "open_cp", "session": "u1", "container": agent.container, "path": "/tmp", "direction": "up"}));
    let t0 = Instant::now();
    for chunk in tar.chunks(32 * 1024) {
        ws.send(json!({"type": "cp_up_tar", "session": "u1", "data": b64(chunk)}));
    }
    ws.send(json!({"type": "cp_end", "session": "u1"}));
    let frames = frames_to_end(&mut ws, "u1", 60);
    assert_eq!(frames, [json!({"type": "exit", "session": "u1"})]);
    assert!(
        t0.elapsed() > Duration::from_secs(4),
        "the throttle did not hold: {:?}",
        t0.elapsed()
    );
    let sum = |cmd: &mut Command| util::sh(cmd).split_whitespace().next().unwrap().to_string();
    let here = sum(Command::new("sha256sum").arg(src.join("big.bin")));
    let there = sum(Command::new(util::docker_cli()).args([
        "exec",
        &agent.container,
        "sha256sum",
        "/tmp/big.bin",
    ]));
    assert_eq!(here, there);
    let peak = agent.peak_rss_kib();
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
}

#[test]
fn a_slow_docker_daemon_does_not_stop_other_sessions() {
    if !require_docker("a_slow_docker_daemon_does_not_stop_other_sessions") {
        return;
    }
    let server = Server::start();
    let docker = slow_docker();
    let agent = Agent::start_with(&server.url(), &[("DOCKER_CLI", docker.to_str().unwrap())]);
    let (_, mut ws) = server.accept(20);
    ws.send(
        json!({"type": "open_exec", "session": "a", "container": agent.container, "cmd": ["sh"]}),
    );
    let mut seen = Vec::new();
    type_until(&mut ws, "a", b"echo one-$((1+1))\n", "one-2", &mut seen);
    // From now on every `docker ps` takes 6 s: a session opened by prefix resolves slowly...
    std::fs::write(docker.with_file_name("slow-ps"), "").unwrap();
    let prefix = agent.prefix().to_string();
    ws.send(json!({"type": "open_exec", "session": "b", "domain_prefix": prefix, "container": agent.container, "cmd": ["true"]}));
    // ... while the open session answers at once.
    let t0 = Instant::now();
    ws.send(json!({"type": "stdio", "session": "a", "data": b64(b"echo two-$((2+2))\n")}));
    while !String::from_utf8_lossy(&seen).contains("two-4") {
        seen.extend(decode(&ws.next("a", 10)));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        ws.run_to_exit("b").1,
        json!({"type": "exit", "session": "b"})
    );
    std::fs::remove_file(docker.with_file_name("slow-ps")).unwrap();
    ws.send(json!({"type": "close", "session": "a"}));
    assert_eq!(ws.run_to_exit("a").1["code"], -1);
}

#[test]
fn a_server_that_says_hello_and_closes_is_not_redialled_every_second() {
    if !require_docker("a_server_that_says_hello_and_closes_is_not_redialled_every_second") {
        return;
    }
    let server = Server::start();
    let _agent = Agent::start(&server);
    drop(server.accept(20));
    let t0 = Instant::now();
    let mut dials = 0;
    while let Ok((_, ws)) = server
        .conns
        .recv_timeout(Duration::from_secs(8).saturating_sub(t0.elapsed()))
    {
        dials += 1;
        let mut ws = ws;
        let _ = ws.send(Message::text(json!({"type": "hello"}).to_string()));
        drop(ws);
    }
    // Backoff 1, 2, 4 s: dials at about 1, 3 and 7 s (a reset on hello: one a second).
    assert!((2..=3).contains(&dials), "{dials} dials in 8 s");
}

#[test]
fn an_https_control_plane_gets_exec_over_wss_with_its_own_ca() {
    if !require_docker("an_https_control_plane_gets_exec_over_wss_with_its_own_ca") {
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = temp_dir("tls-ca");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let server = Server::start();
    let front = tls::TlsFront::start(
        "127.0.0.1:0",
        vec![leaf.der().clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        format!("127.0.0.1:{}", server.port),
    )
    .unwrap();
    let url = format!("https://localhost:{}", front.port);
    let agent = Agent::start_with(
        &url,
        &[("CONTROL_PLANE_CA_FILE", ca_file.to_str().unwrap())],
    );
    let (uri, mut ws) = server.accept(20);
    assert!(uri.starts_with("/api/agent/control?node_id="), "{uri}");
    ws.send(json!({"type": "open_exec", "session": "t1", "container": agent.container, "cmd": ["echo", "over-tls"]}));
    let (out, exit) = ws.run_to_exit("t1");
    assert!(String::from_utf8_lossy(&out).contains("over-tls"), "{exit}");
    assert_eq!(exit, json!({"type": "exit", "session": "t1"}));
}
