//! What is watched while the campaign runs (twice a second): the supervisor's round, the
//! probed apps on the port the control plane routes to, each deploy reported completed
//! (it must answer with its own marker), the agents' memory, and world-readable files with a
//! secret under DATA_DIR.

use crate::hist::Ev;
use crate::plan::{Role, OPS};
use crate::World;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(500);
/// Files above this are datasets, not state: not read every 10 s.
const MAX_SCAN: u64 = 4 << 20;
/// How long a deploy reported completed has to answer with its marker.
pub const ANSWER_WITHIN_MS: u64 = 8000;

struct Pending {
    task: String,
    project: usize,
    port: u16,
    marker: String,
    claimed: u64,
    until: u64,
}

#[derive(Default)]
struct State {
    seen: usize,
    /// First report of each task (its claim), ms.
    claims: HashMap<String, u64>,
    pending: Vec<Pending>,
    rss_max: HashMap<u32, u64>,
    readable: HashSet<String>,
}

/// A task as the monitor needs it: type, project index, marker.
struct Info {
    kind: String,
    project: Option<usize>,
    marker: String,
}

pub fn run(w: &Arc<World>, done: &crate::hist::Stop) {
    let mut st = State::default();
    let mut tick = 0u64;
    loop {
        w.agents.supervise();
        let infos = infos(w);
        new_reports(w, &mut st, &infos);
        probe(w);
        answers(w, &mut st, &infos);
        w.answers_pending
            .store(st.pending.len(), std::sync::atomic::Ordering::SeqCst);
        if tick % 2 == 0 {
            memory(w, &mut st);
        }
        if tick % 20 == 0 {
            scan_data_dirs(w, &mut st);
        }
        tick += 1;
        if done.sleep(TICK) {
            break;
        }
    }
    scan_data_dirs(w, &mut st);
}

fn infos(w: &World) -> HashMap<String, Info> {
    let tasks = w.cp.tasks();
    let by_prefix = |p: &str| w.names.iter().position(|n| n == p);
    tasks
        .iter()
        .map(|t| {
            let payload = &t["payload"];
            let info = Info {
                kind: t["type"].as_str().unwrap_or("").into(),
                project: by_prefix(payload["domain_prefix"].as_str().unwrap_or("")),
                marker: payload["env_vars"]["MARKER"].as_str().unwrap_or("").into(),
            };
            (t["id"].as_str().unwrap_or("").to_string(), info)
        })
        .collect()
}

/// The task id of a report's path (`/api/agent/tasks/{id}/complete`).
pub fn report_task(target: &str) -> &str {
    target
        .trim_start_matches("/api/agent/tasks/")
        .split('/')
        .next()
        .unwrap_or("")
}

fn new_reports(w: &World, st: &mut State, infos: &HashMap<String, Info>) {
    let reqs = w.cp.requests_to("/api/agent/tasks/");
    for r in reqs.iter().skip(st.seen) {
        let id = report_task(&r.target).to_string();
        let ms = w.hist.clock.ms_of(r.at);
        let claimed = *st.claims.entry(id.clone()).or_insert(ms);
        let body: Value = r.json().unwrap_or(Value::Null);
        let port = body["host_port"].as_u64().unwrap_or(0) as u16;
        let Some(info) = infos.get(&id) else { continue };
        let (Some(project), true) = (info.project, body["status"] == "completed") else {
            continue;
        };
        if info.kind != "deploy" || port == 0 || st.pending.iter().any(|p| p.task == id) {
            continue;
        }
        st.pending.push(Pending {
            task: id,
            project,
            port,
            marker: info.marker.clone(),
            claimed,
            until: w.hist.clock.ms() + ANSWER_WITHIN_MS,
        });
    }
    st.seen = reqs.len();
}

/// Asks each probed app on the port the control plane routes it to: the host port of its
/// running deployment, as the server's store has it (the last deploy report it took, then
/// container statuses, re-route it).
fn probe(w: &World) {
    if !w.probing.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let deployments = w.cp.deployments();
    for project in 0..OPS {
        let routed = deployments
            .iter()
            .find(|d| d["domain_prefix"] == w.names[project].as_str() && d["status"] == "running");
        let Some(port) = routed
            .and_then(|d| d["host_port"].as_u64())
            .filter(|p| *p > 0)
        else {
            continue;
        };
        let port = port as u16;
        let ok = http_get(port).is_ok_and(|(code, _)| code == 200);
        w.hist.push(Ev::Probe { project, port, ok });
    }
}

/// Each deploy reported completed answers with its own marker, unless a later task of its
/// app (a deploy, restart, pause or cleanup claimed after it) took its place meanwhile.
fn answers(w: &World, st: &mut State, infos: &HashMap<String, Info>) {
    let now = w.hist.clock.ms();
    let pending = std::mem::take(&mut st.pending);
    for p in pending {
        let later = st.claims.iter().any(|(id, claimed)| {
            *claimed > p.claimed
                && *id != p.task
                && infos.get(id).is_some_and(|i| {
                    i.project == Some(p.project)
                        && matches!(i.kind.as_str(), "deploy" | "restart" | "pause" | "cleanup")
                })
        });
        if later {
            continue;
        }
        let got = http_get(p.port);
        let detail = match &got {
            Ok((200, body)) if body.trim() == p.marker => {
                let (task, detail) = (p.task.clone(), format!("port {}", p.port));
                w.hist.push(Ev::Answer {
                    task,
                    ok: true,
                    detail,
                });
                continue;
            }
            Ok((code, body)) => format!("port {} answered {code} {:?}", p.port, body.trim()),
            Err(e) => format!("port {}: {e}", p.port),
        };
        if now >= p.until {
            let task = p.task.clone();
            w.hist.push(Ev::Answer {
                task,
                ok: false,
                detail: format!("{detail} (expected its marker {})", p.marker),
            });
        } else {
            st.pending.push(p);
        }
    }
}

/// `GET /` on 127.0.0.1:port: (status, body).
pub fn http_get(port: u16) -> Result<(u16, String), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((code, body.to_string()))
}

fn memory(w: &World, st: &mut State) {
    for (role, pid, kib) in w.agents.rss() {
        let max = st.rss_max.entry(pid).or_default();
        // A new maximum of this process, in 1 MiB steps: the history stays small.
        if kib >= *max + 1024 || (*max == 0 && kib > 0) {
            *max = kib;
            w.hist.push(Ev::Rss { role, pid, kib });
        }
    }
}

fn scan_data_dirs(w: &World, st: &mut State) {
    let needles = w.secret_needles();
    for role in [Role::Builder, Role::Deploy] {
        let mut hits = Vec::new();
        readable_secrets(&w.bed.data_dir(role), true, &needles, &mut hits);
        for path in hits {
            if st.readable.insert(path.clone()) {
                w.hist
                    .note(format!("world-readable file with a secret: {path}"));
                w.hist.push(Ev::ReadableSecret { path });
            }
        }
    }
}

/// Files under `dir` that any user can read (o+r, every directory above o+x) and that hold
/// one of `needles`.
fn readable_secrets(dir: &Path, reachable: bool, needles: &[String], hits: &mut Vec<String>) {
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let reachable = reachable && md.permissions().mode() & 0o001 != 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            readable_secrets(&p, reachable, needles, hits);
        } else if md.is_file()
            && reachable
            && md.permissions().mode() & 0o004 != 0
            && md.len() <= MAX_SCAN
        {
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            if crate::check::find_secret(&bytes, needles).is_some() {
                hits.push(p.display().to_string());
            }
        }
    }
}
