//! The campaign's phases: agents up, the plan run under watch, a drain without faults, the
//! apps cleaned up, the agents stopped, what is left looked for; then the invariants checked
//! and the figures and violations printed (and written to the campaign's directory).

use crate::agents::{in_sessions, GRACE_SECS};
use crate::check::{self, Record, Violation, INVARIANTS};
use crate::hist::{Ev, Stop};
use crate::plan::{FaultSpec, Role, What, PROJECTS};
use crate::{drive, monitor, World};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DRAIN: Duration = Duration::from_secs(150);
const CLEANUP: Duration = Duration::from_secs(60);

pub fn run(w: &Arc<World>, duration: &str) -> ExitCode {
    let _ = std::fs::write(w.bed.dir.join("plan.txt"), plan_text(w));
    w.agents.start(Role::Builder);
    w.agents.start(Role::Deploy);
    let done = Arc::new(Stop::default());
    let monitor = {
        let (w, done) = (w.clone(), done.clone());
        std::thread::spawn(move || monitor::run(&w, &done))
    };
    drive::run(w);
    if !w.stop.stopped() {
        drain(w);
        cleanup(w);
    }
    done.stop();
    let _ = monitor.join();
    if w.stop.stopped() {
        return ExitCode::from(130);
    }
    let end_ms = w.hist.clock.ms();
    let leftovers = shut_down(w);
    let rec = Record {
        w,
        events: w.hist.events(),
        reports: w.cp.requests_to("/api/agent/tasks/"),
        tasks: w.cp.tasks(),
        end_ms,
        leftovers,
    };
    let (violations, seen) = check::all(&rec);
    let text = report(&rec, &violations, &seen, duration);
    print!("{text}");
    let _ = std::fs::write(w.bed.dir.join("report.txt"), &text);
    let _ = std::fs::write(w.bed.dir.join("history.txt"), history_text(&rec));
    // What the control plane stored of each build's log, to read a violation's evidence.
    for t in w.tasks.lock().unwrap().iter().filter(|t| t.build.is_some()) {
        let path = w.bed.dir.join(format!("logs/cp-build-{}.log", t.step));
        let _ = std::fs::write(path, w.cp.logs(&t.deployment));
    }
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn plan_text(w: &World) -> String {
    let mut s = format!("seed {} duration {:?}\n", w.plan.seed, w.plan.duration);
    for step in &w.plan.steps {
        let _ = writeln!(s, "{step}");
    }
    s
}

/// No more faults: every task must get its final report.
fn drain(w: &World) {
    w.faults.clear();
    w.bed.docker_faults_clear();
    w.bed.free_all();
    w.bed.proxy.accept_all();
    w.hist.note(format!(
        "drain: faults cleared, waiting up to {}s for every task's final report",
        DRAIN.as_secs()
    ));
    if !wait_all_final(w, DRAIN) {
        w.hist.note("drain: some tasks are still not final".into());
    }
    // Lines a log outage kept from the control plane wait in the agents' late-log queues
    // (retried within 30 s); the final SIGTERM would leave them there until a next start.
    let end = Instant::now() + LATE_LOGS_WAIT;
    while late_logs_waiting(w) && Instant::now() < end {
        if w.stop.sleep(Duration::from_millis(500)) {
            return;
        }
    }
    if late_logs_waiting(w) {
        w.hist.note("drain: late logs still wait after 60s".into());
    }
}

const LATE_LOGS_WAIT: Duration = Duration::from_secs(60);

/// Whether an agent's `DATA_DIR/state/late-logs` holds a file.
fn late_logs_waiting(w: &World) -> bool {
    [Role::Builder, Role::Deploy].iter().any(|r| {
        let dir = w.bed.data_dir(*r).join("state/late-logs");
        let rd = std::fs::read_dir(dir).into_iter().flatten().flatten();
        rd.into_iter()
            .any(|e| e.file_name().to_string_lossy().ends_with(".late"))
    })
}

/// True once every task is final (three looks in a row: the chain adds deploys).
fn wait_all_final(w: &World, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let mut calm = 0;
    while Instant::now() < end {
        let tasks = w.cp.tasks();
        let open = tasks
            .iter()
            .filter(|t| t["status"] != "completed" && t["status"] != "failed")
            .count();
        calm = if open == 0 { calm + 1 } else { 0 };
        if calm >= 3 || w.stop.sleep(Duration::from_millis(700)) {
            return calm >= 3;
        }
    }
    false
}

/// A cleanup task for every app, as when its projects are deleted.
fn cleanup(w: &World) {
    let Some(node) = drive::node(w, Role::Deploy) else {
        return;
    };
    // A deploy reported completed just before the drain ended is judged first: a cleanup
    // claimed after it would take its place and excuse a deploy that never answered.
    let judged = Instant::now() + Duration::from_millis(monitor::ANSWER_WITHIN_MS + 2000);
    while w.answers_pending.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < judged
    {
        if w.stop.sleep(Duration::from_millis(250)) {
            return;
        }
    }
    w.probing.store(false, std::sync::atomic::Ordering::SeqCst);
    let execs = crate::sessions::leftover_execs(w);
    w.leftovers.lock().unwrap().extend(execs);
    w.hist
        .note("cleanup: every app removed by a cleanup task".into());
    for p in 0..PROJECTS {
        let payload = serde_json::json!({"domain_prefix": w.names[p]});
        let id = w.cp.add_task(&node, "cleanup", "", payload);
        let step = w.plan.steps.len() + p;
        w.hist.push(Ev::Task {
            step,
            id: id.clone(),
            kind: "cleanup".into(),
            project: p,
            deployment: String::new(),
        });
    }
    if !wait_all_final(w, CLEANUP) {
        w.hist.note("cleanup: not every cleanup ended".into());
    }
}

/// SIGTERM to both agents; then whatever of ours still runs or exists is a leftover.
fn shut_down(w: &World) -> Vec<String> {
    let mut left = std::mem::take(&mut *w.leftovers.lock().unwrap());
    for role in [Role::Builder, Role::Deploy] {
        w.agents.signal(role, libc::SIGTERM, "final SIGTERM");
    }
    let limit = Duration::from_secs(GRACE_SECS + 25);
    for role in [Role::Builder, Role::Deploy] {
        if w.agents.wait_exit(role, limit).is_none() {
            left.push(format!(
                "the {} agent was still running {}s after SIGTERM",
                role.name(),
                limit.as_secs()
            ));
            w.agents
                .signal(role, libc::SIGKILL, "SIGKILL (did not stop)");
            let _ = w.agents.wait_exit(role, Duration::from_secs(5));
        }
    }
    // A child that outlives its agent by a moment (a `docker stats` ending) is not left over.
    let sessions = w.agents.sessions();
    let end = Instant::now() + Duration::from_secs(10);
    while !in_sessions(&sessions).is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
    }
    for (pid, cmd) in in_sessions(&sessions) {
        left.push(format!(
            "process {pid} of an agent's session still runs 10s after the agent exited: {cmd}"
        ));
    }
    let nodes = [w.bed.node_name(Role::Deploy)];
    for c in crate::bed::our_containers(&nodes, &format!("muvee-chaos-{}", w.bed.run)) {
        left.push(format!(
            "container {c} still exists after every app's cleanup"
        ));
    }
    let mounts = w.bed.data_dir(Role::Deploy).join("mounts");
    let dirs = std::fs::read_dir(&mounts).into_iter().flatten().flatten();
    for d in dirs {
        left.push(format!("mount dir {} still exists", d.path().display()));
    }
    for e in w.hist.events() {
        if let Ev::Stuck { role, pid } = e.ev {
            left.push(format!(
                "the {} agent (pid {pid}) did not exit within {}s of SIGTERM at +{:.1}s",
                role.name(),
                GRACE_SECS + 25,
                e.ms as f64 / 1000.0
            ));
        }
    }
    left
}

fn report(rec: &Record, v: &[Violation], seen: &check::Seen, duration: &str) -> String {
    let w = rec.w;
    let mut s = String::new();
    let _ = writeln!(s, "\n== chaos seed {}: {}", w.plan.seed, figures(rec, v));
    let mut by: BTreeMap<&str, Vec<&Violation>> = BTreeMap::new();
    for x in v {
        by.entry(x.invariant).or_default().push(x);
    }
    for (name, what) in INVARIANTS {
        let looked = seen.get(name).map_or(String::new(), |x| format!(" [{x}]"));
        let Some(list) = by.get(name) else {
            let _ = writeln!(s, "   ok  {name}: {what}{looked}");
            continue;
        };
        let _ = writeln!(
            s,
            "FAILED {name}: {what} ({} violations){looked}",
            list.len()
        );
        for x in list.iter().take(3) {
            let _ = writeln!(
                s,
                "       +{:.1}s {}{}",
                x.ms as f64 / 1000.0,
                task_text(rec, x),
                x.detail
            );
        }
    }
    for (name, list) in &by {
        let _ = writeln!(s, "\n-- around the first {name} violation:");
        s += &around(rec, list[0]);
    }
    if !v.is_empty() {
        let seed = w.plan.seed;
        let _ = writeln!(s, "\nreplay: make chaos SEED={seed} DURATION={duration}");
    }
    s
}

/// Tasks, faults, restarts, minutes, violations: the README's figures.
fn figures(rec: &Record, v: &[Violation]) -> String {
    let mut tasks: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in &rec.tasks {
        let e = tasks
            .entry(t["type"].as_str().unwrap_or("?").into())
            .or_default();
        match t["status"].as_str() {
            Some("completed") => e.0 += 1,
            _ => e.1 += 1,
        }
    }
    let kinds: Vec<String> = tasks
        .iter()
        .map(|(k, (ok, other))| format!("{k} {ok}/{}", ok + other))
        .collect();
    let faults = rec
        .events
        .iter()
        .filter(|e| match e.ev {
            Ev::Step(n) => matches!(rec.w.plan.steps[n].what, What::Fault(_)),
            _ => false,
        })
        .count();
    let restarts = rec
        .events
        .iter()
        .filter(|e| matches!(e.ev, Ev::AgentUp { .. }))
        .count()
        .saturating_sub(2);
    format!(
        "{} tasks ({} completed/all), {faults} faults injected, {restarts} agent restarts, \
         {:.1} minutes, {} violations",
        rec.tasks.len(),
        kinds.join(", "),
        rec.end_ms as f64 / 60_000.0,
        v.len()
    )
}

fn task_text(rec: &Record, x: &Violation) -> String {
    let Some(id) = &x.task else {
        return String::new();
    };
    let kind = rec
        .tasks
        .iter()
        .find(|t| t["id"] == id.as_str())
        .and_then(|t| t["type"].as_str())
        .unwrap_or("?");
    let step = rec.events.iter().find_map(|e| match &e.ev {
        Ev::Task { id: i, step, .. } if i == id => Some(*step),
        _ => None,
    });
    match step.and_then(|n| rec.w.plan.steps.get(n)) {
        Some(s) => format!("task {id} (#{}, {kind}: {}): ", s.n, work_of(s)),
        None => format!(
            "task {id} ({kind}{}): ",
            if step.is_some() {
                ", final cleanup"
            } else {
                ", chained"
            }
        ),
    }
}

fn work_of(s: &crate::plan::Step) -> String {
    match &s.what {
        What::Work(w) => w.to_string(),
        What::Fault(f) => f.to_string(),
    }
}

/// The schedule and what happened from 40 s before a violation to 10 s after it.
fn around(rec: &Record, x: &Violation) -> String {
    let (from, to) = (x.ms.saturating_sub(40_000), x.ms + 10_000);
    let mut s = format!("   {} {}\n", task_text(rec, x), x.detail);
    let _ = writeln!(
        s,
        "   schedule +{:.1}s … +{:.1}s:",
        from as f64 / 1000.0,
        to as f64 / 1000.0
    );
    for step in rec.w.plan.window(from, to) {
        let _ = writeln!(s, "   {step}");
    }
    let _ = writeln!(s, "   what happened:");
    for e in rec.events.iter().filter(|e| e.ms >= from && e.ms <= to) {
        if let Some(line) = event_text(rec, &e.ev) {
            let _ = writeln!(s, "   {:>8.3}s {line}", e.ms as f64 / 1000.0);
        }
    }
    s
}

fn event_text(rec: &Record, ev: &Ev) -> Option<String> {
    Some(match ev {
        Ev::Step(n) => match &rec.w.plan.steps[*n].what {
            What::Fault(f) if !matches!(f, FaultSpec::Kill { .. } | FaultSpec::Term { .. }) => {
                format!("#{n} began")
            }
            _ => return None,
        },
        Ev::FaultEnd(n) => format!("#{n} ended"),
        Ev::Task { step, id, kind, .. } => format!("#{step} enqueued {kind} {id}"),
        Ev::AgentUp { role, pid } => format!("{} agent started (pid {pid})", role.name()),
        Ev::AgentDown { role, pid, how } => format!("{} agent (pid {pid}): {how}", role.name()),
        Ev::Answer { task, ok, detail } => format!("deploy {task} answered: {ok} {detail}"),
        Ev::Note(n) => n.clone(),
        Ev::Stuck { role, pid } => format!("{} agent (pid {pid}) did not stop", role.name()),
        Ev::Probe {
            ok: false,
            project,
            port,
        } => format!("probe p{project} port {port} failed"),
        Ev::ReadableSecret { path } => format!("readable secret {path}"),
        Ev::Session { step, ok, detail } => format!("#{step} session ok={ok}: {detail}"),
        Ev::Probe { .. } | Ev::Rss { .. } => return None,
    })
}

fn history_text(rec: &Record) -> String {
    let mut s = String::new();
    for e in &rec.events {
        let _ = writeln!(s, "{:>9.3}s {:?}", e.ms as f64 / 1000.0, e.ev);
    }
    s
}
