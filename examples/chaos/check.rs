//! The invariants, checked over the recorded history once the campaign has drained: every
//! request the control plane received (with its fault), every fault and restart, the probes,
//! the docker CLI calls, the marker files, the agents' logs.

use crate::agents::{MAX_TASKS, POLL_MS};
use crate::hist::{Ev, Event};
use crate::monitor::report_task;
use crate::plan::{FaultSpec, Role, What};
use crate::server::Recorded;
use crate::World;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

pub const INVARIANTS: &[(&str, &str)] = &[
    (
        "one-final-report",
        "every task gets exactly one final report, never two outcomes",
    ),
    (
        "completed-is-real",
        "a completed build is in the registry, a completed deploy answers",
    ),
    ("runs-once", "no task runs twice"),
    (
        "polls-and-takes",
        "the agent polls and takes new tasks within a poll interval",
    ),
    (
        "logs-delivered",
        "every log line is delivered or counted by a drop marker",
    ),
    (
        "text-is-storable",
        "what reaches the control plane is valid UTF-8 without NUL",
    ),
    (
        "no-secret",
        "no secret in a report, log line, agent log, argv or readable file",
    ),
    (
        "app-keeps-answering",
        "an app answers HTTP through failed and interrupted redeploys",
    ),
    ("memory", "agent memory stays under 64 MiB"),
    (
        "sessions-end",
        "every exec/cp session ends, a download with cp_end before exit",
    ),
    (
        "nothing-left",
        "no process, container or mount of ours left after cleanup and shutdown",
    ),
];

const MEMORY_LIMIT_KIB: u64 = 64 * 1024;
/// A restarted agent's time to recover its journal and outbox before it polls.
pub const STARTUP_MS: u64 = 15_000;
/// The agent's poll backoff cap after failed rounds (plus its jitter): after a fault on the
/// poll path ends, the next round may be this late.
const BACKOFF_MS: u64 = 62_000;
const GAP_MS: u64 = POLL_MS + 4000;

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub task: Option<String>,
    pub ms: u64,
    pub detail: String,
}

/// Everything the checks read, gathered once.
pub struct Record<'a> {
    pub w: &'a World,
    pub events: Vec<Event>,
    pub reports: Vec<Recorded>,
    pub tasks: Vec<Value>,
    /// When the final shutdown began (the end of what the poll check looks at).
    pub end_ms: u64,
    /// What was found after cleanup and shutdown.
    pub leftovers: Vec<String>,
}

impl Record<'_> {
    fn ms(&self, r: &Recorded) -> u64 {
        self.w.hist.clock.ms_of(r.at)
    }
    fn reports_of(&self, task: &str) -> impl Iterator<Item = &Recorded> {
        let task = task.to_string();
        self.reports
            .iter()
            .filter(move |r| report_task(&r.target) == task)
    }
    /// The accepted final report of a task (status, body).
    pub fn final_of(&self, task: &str) -> Option<Value> {
        self.reports_of(task)
            .filter(|r| r.status == Some(200))
            .filter_map(|r| r.json())
            .find(|b| b["status"] == "completed" || b["status"] == "failed")
    }
    fn claim_ms(&self, task: &str) -> Option<u64> {
        self.reports_of(task).next().map(|r| self.ms(r))
    }
    fn task_row(&self, task: &str) -> Option<&Value> {
        self.tasks.iter().find(|t| t["id"] == task)
    }
}

/// What a check looked at (a checker that looked at nothing proves nothing).
pub type Seen = BTreeMap<&'static str, String>;
/// A check: its violations and what it looked at.
type Check = fn(&Record) -> (Vec<Violation>, String);

pub fn all(rec: &Record) -> (Vec<Violation>, Seen) {
    let checks: [(&str, Check); 10] = [
        ("one-final-report", final_reports),
        ("completed-is-real", completed_is_real),
        ("runs-once", runs_once),
        ("polls-and-takes", crate::polls::check),
        ("logs-delivered", logs_delivered),
        ("text-is-storable", storable_text),
        ("no-secret", no_secret),
        ("app-keeps-answering", app_answers),
        ("memory", memory),
        ("sessions-end", sessions_end),
    ];
    let (mut v, mut seen) = (Vec::new(), Seen::new());
    for (name, check) in checks {
        let (found, what) = check(rec);
        v.extend(found);
        let name = INVARIANTS.iter().find(|i| i.0 == name).map_or("?", |i| i.0);
        seen.insert(name, what);
    }
    v.extend(rec.leftovers.iter().map(|l| Violation {
        invariant: "nothing-left",
        task: None,
        ms: rec.end_ms,
        detail: l.clone(),
    }));
    let sessions = rec.w.agents.sessions().len();
    seen.insert(
        "nothing-left",
        format!("{sessions} agent sessions, the engine's containers, DATA_DIR/mounts"),
    );
    (v, seen)
}

fn final_reports(rec: &Record) -> (Vec<Violation>, String) {
    let mut out = Vec::new();
    for t in &rec.tasks {
        let id = t["id"].as_str().unwrap_or("");
        let mut outcomes: Vec<(u64, String)> = Vec::new();
        for r in rec.reports_of(id) {
            let b = r.json().unwrap_or(Value::Null);
            if b["status"] != "completed" && b["status"] != "failed" {
                continue;
            }
            let outcome = format!(
                "{} {} {} {}",
                b["status"], b["result"], b["image_tag"], b["host_port"]
            );
            if !outcomes.iter().any(|o| o.1 == outcome) {
                outcomes.push((rec.ms(r), outcome));
            }
        }
        let v = |ms, detail| Violation {
            invariant: "one-final-report",
            task: Some(id.to_string()),
            ms,
            detail,
        };
        if outcomes.len() > 1 {
            let all: Vec<String> = outcomes
                .iter()
                .map(|o| format!("+{:.1}s {}", o.0 as f64 / 1000.0, o.1))
                .collect();
            out.push(v(
                outcomes[1].0,
                format!("two outcomes: {}", all.join(" / ")),
            ));
        }
        if rec.final_of(id).is_none() {
            let status = t["status"].as_str().unwrap_or("?");
            let tried: Vec<&Recorded> = rec.reports_of(id).collect();
            let last = tried.last().map_or("none sent".into(), |r| {
                let answer = r.status.map_or("no answer".into(), |s| s.to_string());
                format!("the last at +{:.1}s: {answer}", rec.ms(r) as f64 / 1000.0)
            });
            let detail = format!(
                "no final report accepted by the end (server shows {status}; {} reports tried, {last})",
                tried.len()
            );
            out.push(v(rec.claim_ms(id).unwrap_or(rec.end_ms), detail));
        }
    }
    let seen = format!("{} tasks, {} reports", rec.tasks.len(), rec.reports.len());
    (out, seen)
}

fn completed_is_real(rec: &Record) -> (Vec<Violation>, String) {
    let (mut out, mut builds, mut answers) = (Vec::new(), 0, 0);
    for t in rec.tasks.iter().filter(|t| t["type"] == "build") {
        let id = t["id"].as_str().unwrap_or("");
        let Some(f) = rec.final_of(id).filter(|f| f["status"] == "completed") else {
            continue;
        };
        builds += 1;
        let tag = f["image_tag"].as_str().unwrap_or("");
        if let Err(why) = in_registry(rec.w, tag) {
            out.push(Violation {
                invariant: "completed-is-real",
                task: Some(id.into()),
                ms: rec.claim_ms(id).unwrap_or(0),
                detail: format!("build reported completed with {tag:?}, but {why}"),
            });
        }
    }
    for e in &rec.events {
        if let Ev::Answer { ok: true, .. } = &e.ev {
            answers += 1;
        }
        if let Ev::Answer {
            task,
            ok: false,
            detail,
        } = &e.ev
        {
            out.push(Violation {
                invariant: "completed-is-real",
                task: Some(task.clone()),
                ms: e.ms,
                detail: format!("deploy reported completed does not answer: {detail}"),
            });
        }
    }
    let seen = format!(
        "{builds} completed builds looked up in the registry, {answers} completed deploys answered"
    );
    (out, seen)
}

/// Whether the registry (not the proxy) has the manifest of `tag`.
fn in_registry(w: &World, tag: &str) -> Result<(), String> {
    let (name, reference) = tag.rsplit_once(':').ok_or("the tag has no reference")?;
    let repo = name.split_once('/').ok_or("the tag has no registry")?.1;
    let reg = &w.bed.registry;
    let url = format!("http://{}/v2/{repo}/manifests/{reference}", reg.upstream);
    let auth = crate::base64(&format!("{}:{}", reg.user, reg.password));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let accept = "application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, \
                  application/vnd.oci.image.index.v1+json";
    let res = agent
        .head(&url)
        .header("Authorization", &format!("Basic {auth}"))
        .header("Accept", accept)
        .call()
        .map_err(|e| format!("the registry did not answer: {e}"))?;
    match res.status().as_u16() {
        200 => Ok(()),
        code => Err(format!(
            "the registry answers {code} for {repo}:{reference}"
        )),
    }
}

fn runs_once(rec: &Record) -> (Vec<Violation>, String) {
    let mut out = Vec::new();
    // Builds: one `docker build` per tag (each build task builds a commit of its own).
    let calls = std::fs::read_to_string(&rec.w.bed.docker_log).unwrap_or_default();
    let mut builds: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in calls.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let (ms, sub) = (f.first().and_then(|s| s.parse::<u64>().ok()), f.get(3));
        if sub != Some(&"build") {
            continue;
        }
        if let Some(i) = f.iter().position(|a| *a == "-t") {
            let at = ms.map_or(0, |m| m.saturating_sub(rec.w.hist.clock.epoch_ms()));
            builds
                .entry(f.get(i + 1).unwrap_or(&"").to_string())
                .or_default()
                .push(at);
        }
    }
    for (tag, times) in builds.iter().filter(|b| b.1.len() > 1) {
        let task = rec.tasks.iter().find(|t| {
            let id = t["id"].as_str().unwrap_or("");
            rec.reports_of(id)
                .any(|r| r.json().is_some_and(|b| b["image_tag"] == tag.as_str()))
        });
        out.push(Violation {
            invariant: "runs-once",
            task: task.and_then(|t| t["id"].as_str()).map(String::from),
            ms: times[1],
            detail: format!("`docker build -t {tag}` ran {} times", times.len()),
        });
    }
    let (deploys, starts) = deploys_once(rec);
    out.extend(deploys);
    let n: usize = builds.values().map(Vec::len).sum();
    (out, format!("{n} docker builds, {starts}"))
}

/// Deploys: each container of ours appends "<container id> <marker>" when it starts; one
/// deployment (marker) must never have had two containers.
fn deploys_once(rec: &Record) -> (Vec<Violation>, String) {
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let rd = std::fs::read_dir(&rec.w.bed.volumes).into_iter().flatten();
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path().join("starts")).unwrap_or_default();
        for l in text.lines() {
            if let Some((host, marker)) = l.split_once(' ') {
                let hosts = seen.entry(marker.to_string()).or_default();
                hosts.insert(host.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for (marker, hosts) in seen.iter().filter(|s| s.1.len() > 1) {
        let task = rec.tasks.iter().find(|t| {
            t["type"] == "deploy" && t["payload"]["env_vars"]["MARKER"] == marker.as_str()
        });
        let id = task.and_then(|t| t["id"].as_str()).map(String::from);
        out.push(Violation {
            invariant: "runs-once",
            ms: id.as_deref().and_then(|i| rec.claim_ms(i)).unwrap_or(0),
            task: id,
            detail: format!(
                "deployment {marker} started {} containers: {hosts:?}",
                hosts.len()
            ),
        });
    }
    let containers: usize = seen.values().map(HashSet::len).sum();
    let what = format!("{containers} containers of {} deployments", seen.len());
    (out, what)
}

fn logs_delivered(rec: &Record) -> (Vec<Violation>, String) {
    let (mut out, mut builds, mut lines_seen) = (Vec::new(), 0, 0);
    for t in rec.w.tasks.lock().unwrap().iter() {
        let Some(lines) = t.build else { continue };
        let log = rec.w.cp.logs(&t.deployment);
        let found = numbered_lines(&log, &format!("L{}-", t.step));
        let completed = rec
            .final_of(&t.id)
            .is_some_and(|f| f["status"] == "completed");
        if !completed && !found.contains(&lines) {
            continue;
        }
        builds += 1;
        lines_seen += found.len();
        // BuildKit drops what a step prints beyond 200 KiB/s, before the agent sees it.
        let clipped = find(&log, b"[output clipped, log limit").is_some();
        let lines = match found.iter().max() {
            Some(&max) if clipped => max,
            _ => lines,
        };
        let missing: Vec<u32> = (1..=lines).filter(|i| !found.contains(i)).collect();
        let dropped = dropped_lines(&log);
        if missing.len() as u64 > dropped {
            out.push(Violation {
                invariant: "logs-delivered",
                task: Some(t.id.clone()),
                ms: rec.claim_ms(&t.id).unwrap_or(0),
                detail: format!(
                    "{} of {lines} lines missing (first: L{}-{}), drop markers count {dropped}",
                    missing.len(),
                    t.step,
                    missing[0]
                ),
            });
        }
    }
    (
        out,
        format!("{builds} builds, {lines_seen} numbered lines found"),
    )
}

/// The numbers i of every `<tag><i>` in the log.
fn numbered_lines(log: &[u8], tag: &str) -> HashSet<u32> {
    let mut found = HashSet::new();
    let tag = tag.as_bytes();
    let mut at = 0;
    while let Some(p) = find(&log[at..], tag) {
        let start = at + p + tag.len();
        let digits = log[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if let Ok(n) = std::str::from_utf8(&log[start..start + digits])
            .unwrap_or("")
            .parse()
        {
            found.insert(n);
        }
        at = start;
    }
    found
}

/// The sum of the agent's drop markers ("… N log lines dropped …").
fn dropped_lines(log: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(log);
    text.match_indices("log lines dropped")
        .filter_map(|(i, _)| {
            let before = text[..i].trim_end();
            let digits = before.rsplit(|c: char| !c.is_ascii_digit()).next()?;
            digits.parse::<u64>().ok()
        })
        .sum()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first of `needles` in `bytes`, with where.
pub fn find_secret<'n>(bytes: &[u8], needles: &'n [String]) -> Option<(usize, &'n str)> {
    needles
        .iter()
        .filter_map(|n| find(bytes, n.as_bytes()).map(|p| (p, n.as_str())))
        .min_by_key(|h| h.0)
}

fn storable_text(rec: &Record) -> (Vec<Violation>, String) {
    let mut out = Vec::new();
    let all = rec.w.cp.requests();
    // One violation per route (a refused body is sent again and again).
    let mut routes = HashSet::new();
    for r in all
        .iter()
        .filter(|r| r.method == "POST" && !r.body.is_empty())
    {
        let why = match std::str::from_utf8(&r.body) {
            Err(e) => format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            Ok(s) if s.contains('\0') || s.contains("\\u0000") => "a NUL".into(),
            Ok(_) => continue,
        };
        if !routes.insert(r.path().to_string()) {
            continue;
        }
        out.push(Violation {
            invariant: "text-is-storable",
            task: Some(report_task(&r.target).to_string())
                .filter(|_| r.target.contains("/complete")),
            ms: rec.ms(r),
            detail: format!("POST {} carried {why}", r.path()),
        });
    }
    (out, format!("{} request bodies", all.len()))
}

fn no_secret(rec: &Record) -> (Vec<Violation>, String) {
    let needles = rec.w.secret_needles();
    let mut out = Vec::new();
    // One violation per place (a refused body is sent again and again).
    let mut places = HashSet::new();
    let mut hit = |ms: u64, task: Option<String>, place: String, bytes: &[u8]| {
        let Some((p, n)) = find_secret(bytes, &needles) else {
            return;
        };
        if places.insert(place.clone()) {
            let from = p.saturating_sub(40);
            let excerpt = String::from_utf8_lossy(&bytes[from..(p + 60).min(bytes.len())]);
            let detail = format!("{place} holds secret text {n:?}: …{excerpt}…");
            out.push(Violation {
                invariant: "no-secret",
                task,
                ms,
                detail,
            });
        }
    };
    for r in rec.w.cp.requests().iter().filter(|r| r.method == "POST") {
        let task = report_task(&r.target).to_string();
        // env (and the app's own log) return the container's values by design.
        let kind = rec
            .task_row(&task)
            .map(|t| t["type"].as_str().unwrap_or(""));
        if r.target.contains("/complete") && matches!(kind, Some("env" | "runtime_logs")) {
            continue;
        }
        let task = Some(task).filter(|_| r.target.contains("/complete"));
        hit(rec.ms(r), task, format!("POST {}", r.path()), &r.body);
    }
    for role in [Role::Builder, Role::Deploy] {
        let path = rec.w.agents.log_path(role);
        let text = std::fs::read(&path).unwrap_or_default();
        hit(0, None, format!("the {} agent's log", role.name()), &text);
    }
    let argv = std::fs::read(&rec.w.bed.docker_log).unwrap_or_default();
    hit(0, None, "a docker command line".into(), &argv);
    // The wrapper's look at each build secret file while `docker build` reads it.
    for l in String::from_utf8_lossy(&argv).lines() {
        let f: Vec<&str> = l.splitn(4, ' ').collect();
        if let [ms, _, "readable-secret", path] = f[..] {
            let at = ms.parse::<u64>().unwrap_or(0);
            out.push(Violation {
                invariant: "no-secret",
                task: None,
                ms: at.saturating_sub(rec.w.hist.clock.epoch_ms()),
                detail: format!("world-readable build secret file: {path}"),
            });
        }
    }
    for e in &rec.events {
        if let Ev::ReadableSecret { path } = &e.ev {
            out.push(Violation {
                invariant: "no-secret",
                task: None,
                ms: e.ms,
                detail: format!("world-readable file with a secret: {path}"),
            });
        }
    }
    let secrets = rec.w.secrets();
    let seen =
        format!("{secrets} secrets in request bodies, agent logs, docker argv, DATA_DIR files");
    (out, seen)
}

/// The agent's request timeout: a statuses post held longer than this was given up.
const AGENT_TIMEOUT_MS: u64 = 20_000;

/// When the dev control plane routes by statuses the agent gave up on: a `hang` fault past
/// the agent's timeout delays a post, then applies it (as a server stalled on its database
/// would), over whatever newer posts set. From then until the next post answered without a
/// fault, no agent can route right. `posts`: each statuses post's arrival (ms) and fault.
fn stale_routes(posts: &[(u64, Option<&str>)]) -> Vec<(u64, u64)> {
    let held = |f: Option<&str>| f?.strip_prefix("hang:")?.parse::<u64>().ok();
    let mut windows = Vec::new();
    for (at, fault) in posts {
        let Some(d) = held(*fault).filter(|d| *d > AGENT_TIMEOUT_MS) else {
            continue;
        };
        let from = at + d;
        let fresh = posts.iter().filter(|(t, f)| *t > from && f.is_none());
        // The prober follows the store at once; one probe interval of slack.
        let until = fresh.map(|(t, _)| t + 1_000).min().unwrap_or(u64::MAX);
        windows.push((from, until));
    }
    windows
}

/// Two probes in a row that failed on the port the control plane routes a probed app to,
/// but while it routes by statuses the agent gave up on ([`stale_routes`]).
fn app_answers(rec: &Record) -> (Vec<Violation>, String) {
    let (mut out, mut probes, mut failed, mut stale) = (Vec::new(), 0, 0, 0);
    let mut last_fail: HashMap<usize, (u64, u16)> = HashMap::new();
    let mut reported: HashSet<(usize, u16)> = HashSet::new();
    let all = rec.w.cp.requests();
    let posts: Vec<(u64, Option<&str>)> = (all.iter())
        .filter(|r| r.method == "POST" && r.path() == "/api/agent/container-statuses")
        .map(|r| (rec.ms(r), r.fault.as_deref()))
        .collect();
    let windows = stale_routes(&posts);
    for e in &rec.events {
        let Ev::Probe { project, port, ok } = e.ev else {
            continue;
        };
        probes += 1;
        failed += usize::from(!ok);
        if !ok && windows.iter().any(|(a, b)| (*a..*b).contains(&e.ms)) {
            stale += 1;
            last_fail.remove(&project);
            continue;
        }
        if ok {
            last_fail.remove(&project);
            continue;
        }
        match last_fail.get(&project) {
            Some((since, p)) if *p == port => {
                if reported.insert((project, port)) {
                    out.push(Violation {
                        invariant: "app-keeps-answering",
                        task: None,
                        ms: *since,
                        detail: format!(
                            "app p{project} did not answer on port {port} (routed there) from +{:.1}s",
                            *since as f64 / 1000.0
                        ),
                    });
                }
            }
            _ => {
                last_fail.insert(project, (e.ms, port));
            }
        }
    }
    let seen = format!("{probes} probes, {failed} failed, {stale} of them on stale routes");
    (out, seen)
}

fn sessions_end(rec: &Record) -> (Vec<Violation>, String) {
    let (mut out, mut n) = (Vec::new(), 0);
    for e in &rec.events {
        let Ev::Session { step, ok, detail } = &e.ev else {
            continue;
        };
        n += 1;
        if !ok {
            out.push(Violation {
                invariant: "sessions-end",
                task: None,
                ms: e.ms,
                detail: format!("session #{step}: {detail}"),
            });
        }
    }
    (out, format!("{n} sessions"))
}

fn memory(rec: &Record) -> (Vec<Violation>, String) {
    let mut peak: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &rec.events {
        if let Ev::Rss { role, kib, .. } = e.ev {
            let p = peak.entry(role.name()).or_default();
            *p = (*p).max(kib);
        }
    }
    let peaks: Vec<String> = peak
        .iter()
        .map(|(r, k)| format!("{r} {:.1} MiB", *k as f64 / 1024.0))
        .collect();
    let mut seen = HashSet::new();
    let over = rec.events.iter().filter_map(|e| match e.ev {
        Ev::Rss { role, pid, kib } if kib > MEMORY_LIMIT_KIB && seen.insert(pid) => {
            Some(Violation {
                invariant: "memory",
                task: None,
                ms: e.ms,
                detail: format!(
                    "{} agent (pid {pid}) at {} MiB resident",
                    role.name(),
                    kib / 1024
                ),
            })
        }
        _ => None,
    });
    (over.collect(), format!("peak RSS {}", peaks.join(", ")))
}

/// The step numbers of the plan whose faults match `pred`, with their start and end (ms).
pub fn fault_windows(rec: &Record, pred: impl Fn(&FaultSpec) -> Option<u64>) -> Vec<(u64, u64)> {
    let started: HashMap<usize, u64> = rec
        .events
        .iter()
        .filter_map(|e| match e.ev {
            Ev::Step(n) => Some((n, e.ms)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for s in &rec.w.plan.steps {
        let (What::Fault(f), Some(start)) = (&s.what, started.get(&s.n)) else {
            continue;
        };
        if let Some(extra) = pred(f) {
            out.push((*start, start + f.span_ms() + extra));
        }
    }
    out
}

/// Fault windows that keep `role` from polling (the poll path of the control plane failing,
/// its DATA_DIR full), each with the time the agent may take to notice it ended.
pub fn poll_faults(rec: &Record, role: Role, claims: bool) -> Vec<(u64, u64)> {
    fault_windows(rec, |f| match f {
        FaultSpec::Cp { route, .. } => {
            let path = matches!(*route, "poll" | "register" | "config" | "all");
            (path || (claims && *route == "complete")).then_some(BACKOFF_MS)
        }
        FaultSpec::Disk { role: r, .. } if *r == role => Some(10_000),
        _ => None,
    })
}

/// While `node` had MAX_TASKS tasks between their first and their final report, it takes no
/// more (by design).
pub fn busy_windows(rec: &Record, node: &str) -> Vec<(u64, u64)> {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for t in rec.tasks.iter().filter(|t| t["node_id"] == node) {
        let id = t["id"].as_str().unwrap_or("");
        let mut first = None;
        let mut last = None;
        for r in rec.reports_of(id) {
            first.get_or_insert(rec.ms(r));
            let b = r.json().unwrap_or(Value::Null);
            if b["status"] == "completed" || b["status"] == "failed" {
                last.get_or_insert(rec.ms(r));
            }
        }
        if let Some(f) = first {
            edges.push((f, 1));
            edges.push((last.unwrap_or(u64::MAX / 2), -1));
        }
    }
    edges.sort();
    let (mut n, mut since, mut out) = (0i32, 0u64, Vec::new());
    for (t, d) in edges {
        if n >= MAX_TASKS as i32 && n + d < MAX_TASKS as i32 {
            out.push((since, t));
        }
        if n < MAX_TASKS as i32 && n + d >= MAX_TASKS as i32 {
            since = t;
        }
        n += d;
    }
    if n >= MAX_TASKS as i32 {
        out.push((since, u64::MAX / 2));
    }
    out
}

pub const GAP_LIMIT_MS: u64 = GAP_MS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_lines_and_drop_markers_are_read_from_a_stored_log() {
        let log = b"#7 0.1 L12-1\n#7 0.1 L12-2 nul\xef\xbf\xbdbyte\nL123-9\nL12-10\n\
            [muvee-agent: 1234 log lines dropped: more than LOG_SPILL_MAX (8388608 bytes) waited for the control plane]\n\
            [muvee-agent: 6 log lines dropped]\n";
        let found = numbered_lines(log, "L12-");
        assert_eq!(found, HashSet::from([1, 2, 10]));
        assert_eq!(dropped_lines(log), 1240);
    }

    /// A post held past the agent's timeout makes a window from when it is applied to the
    /// next post answered without a fault; one held less, or a reset, makes none.
    #[test]
    fn statuses_applied_after_the_agent_gave_up_make_a_stale_window() {
        let posts = [
            (1_000, Some("hang:64000")),
            (3_000, Some("hang:5000")),
            (50_000, None),
            (60_000, Some("reset")),
            (70_000, None),
            (80_000, None),
        ];
        assert_eq!(stale_routes(&posts), [(65_000, 71_000)]);
        assert_eq!(stale_routes(&posts[..2]), [(65_000, u64::MAX)]);
        assert!(stale_routes(&posts[1..]).is_empty());
    }

    #[test]
    fn half_a_secret_is_found() {
        let needles = vec!["chaossec".to_string(), "cessoahc".to_string()];
        assert_eq!(find_secret(b"x ***", &needles), None);
        assert_eq!(
            find_secret(b"chao\nssec0123cessoahc", &needles),
            Some((13, "cessoahc"))
        );
    }
}
