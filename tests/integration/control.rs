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

/// The deploy agent under test and the container its sessions reach.
struct Agent {
    child: Child,
    container: String,
}

impl Agent {
    fn start(server: &Server) -> Agent {
        images();
        let container = format!(
            "muvee-itx-{}-{}",
            std::process::id(),
            &util::unique_hex()[..6]
        );
        util::sh(Command::new(util::docker_cli()).args([
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            &format!("muvee.domain_prefix={}", &container[6..]),
            IDLE,
        ]));
        let child = Command::new(util::bin())
            .env("NODE_ROLE", "deploy")
            .env("CONTROL_PLANE_URL", server.url())
            .env("AGENT_SECRET", SECRET)
            .env("DATA_DIR", temp_dir("control-data"))
            .env("DOCKER_CLI", util::docker_cli())
            .env("POLL_INTERVAL", "1s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent { child, container }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = util::docker(&["rm", "-f", &self.container], &[]);
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
    let prefix = &agent.container[6..];
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

    // Interactive: typed input, a resize, then close kills it (-1).
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
    ws.send(json!({"type": "stdio", "session": "s3", "data": b64(b"stty size\n")}));
    while !String::from_utf8_lossy(&seen).contains("11 77") {
        seen.extend(decode(&ws.next("s3", 10)));
    }
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
    let tar = util::sh(
        Command::new("sh")
            .arg("-c")
            .arg(format!("tar -C {} -cf - tree | base64 -w0", src.display())),
    );
    use base64::Engine;
    let tar = base64::engine::general_purpose::STANDARD
        .decode(tar.trim())
        .unwrap();
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

    // A missing path: docker's error text on stderr and its exit code.
    ws.send(
        json!({"type": "open_cp", "session": "d2", "container": agent.container,
                   "path": "/no/such", "direction": "down"}),
    );
    let (err, exit) = ws.run_to_exit("d2");
    assert!(!err.is_empty() && exit["code"] != 0, "{exit}");

    // The server drops the connection: the agent dials again (backoff reset by hello).
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
