//! Runs the plan: enqueues the workload on the control plane and injects the faults, each at
//! its time. Timed faults are undone by a thread of their own; every wait is bounded.

use crate::agents::GRACE_SECS;
use crate::hist::Ev;
use crate::plan::{App, BuildKind, FaultSpec, Role, Step, Trigger, What, Work};
use crate::{TaskRec, World};
use serde_json::{json, Value};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Runs every step of the plan at its time; returns once the last fault was undone.
pub fn run(w: &Arc<World>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for step in &w.plan.steps {
        if w.stop.sleep_until(w.hist.clock.at(step.at_ms)) {
            break;
        }
        w.hist.push(Ev::Step(step.n));
        println!("{step}");
        match &step.what {
            What::Work(Work::Session { project, kind }) => {
                threads.push(crate::sessions::start(w, step.n, *project, kind));
            }
            What::Work(work) => enqueue(w, step, work),
            What::Fault(f) => threads.extend(inject(w, step.n, f)),
        }
        threads.retain(|t| !t.is_finished());
    }
    w.stop
        .sleep_until(w.hist.clock.at(w.plan.duration.as_millis() as u64));
    for t in threads {
        let _ = t.join();
    }
}

/// The node id of the role, once it registered (waits up to 30 s).
pub fn node(w: &World, role: Role) -> Option<String> {
    for _ in 0..150 {
        if let Some(n) = w.cp.node_id_for_role(role.name()) {
            return Some(n);
        }
        if w.stop.sleep(Duration::from_millis(200)) {
            break;
        }
    }
    None
}

fn enqueue(w: &World, step: &Step, work: &Work) {
    let (project, kind) = match work {
        Work::Build { project, .. } => (*project, "build"),
        Work::Deploy { project, .. } => (*project, "deploy"),
        Work::Op { project, kind } | Work::Session { project, kind } => (*project, *kind),
    };
    let made = match work {
        Work::Build { kind, .. } => build(w, step.n, project, *kind),
        Work::Deploy {
            app, dataset, rw, ..
        } => deploy(w, project, *app, *dataset, *rw),
        Work::Op { kind, .. } => op(w, project, kind),
        Work::Session { .. } => None,
    };
    let Some((id, deployment)) = made else {
        w.hist
            .note(format!("#{}: could not enqueue {work}", step.n));
        return;
    };
    let build = match work {
        Work::Build { kind, .. } => {
            Some(build_script(step.n, *kind, w.bed.buildkit, &w.agent_secret).1)
        }
        _ => None,
    };
    w.hist.push(Ev::Task {
        step: step.n,
        id: id.clone(),
        kind: kind.into(),
        project,
        deployment: deployment.clone(),
    });
    w.tasks.lock().unwrap().push(TaskRec {
        step: step.n,
        id,
        kind: kind.into(),
        project,
        deployment,
        build,
    });
}

/// What a deployment of the project runs with: its marker, a token, the workspace.
fn settings(w: &World, project: usize, env: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    let mut vars = serde_json::Map::new();
    vars.insert("MARKER".into(), w.marker().into());
    vars.insert("API_TOKEN".into(), w.secret().into());
    for (k, v) in env {
        vars.insert((*k).into(), (*v).into());
    }
    let mut s = serde_json::Map::new();
    s.insert("domain_prefix".into(), w.names[project].clone().into());
    s.insert("container_port".into(), 8080.into());
    s.insert("volume_mount_path".into(), "/workspace".into());
    s.insert("env_vars".into(), Value::Object(vars));
    s
}

/// Enqueues through the dev routes' logic (a deployment row: a build chains into a deploy).
/// Returns (task id, deployment id).
fn enqueue_row(w: &World, project: usize, req: Value) -> Option<(String, String)> {
    for _ in 0..150 {
        match w.cp.enqueue(req.clone()) {
            Ok(v) => {
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                w.projects.lock().unwrap()[project] = Some(s("project_id"));
                return Some((s("task_id"), s("deployment_id")));
            }
            // No node of the role registered yet.
            Err(_) if !w.stop.sleep(Duration::from_millis(200)) => {}
            Err(_) => break,
        }
    }
    None
}

fn build(w: &World, n: usize, project: usize, kind: BuildKind) -> Option<(String, String)> {
    let branch = format!("b{n}");
    let (script, _) = build_script(n, kind, w.bed.buildkit, &w.agent_secret);
    if let Err(e) = w.bed.commit_build(&branch, &script) {
        w.hist.note(format!("#{n}: cannot commit the build: {e}"));
        return None;
    }
    let url = format!("file://{}", w.bed.repo.display());
    let mut req = settings(w, project, &[]);
    req.insert("git_url".into(), url.clone().into());
    req.insert("git_branch".into(), branch.clone().into());
    if kind != BuildKind::Nasty || !w.bed.buildkit {
        return enqueue_row(w, project, Value::Object(req));
    }
    // Build secrets are not in the dev routes' build payload: a raw task, not chained.
    let node = node(w, Role::Builder)?;
    let dep = crate::server::new_uuid();
    let project_id = w.projects.lock().unwrap()[project]
        .clone()
        .unwrap_or_else(crate::server::new_uuid);
    let payload = json!({
        "git_url": url, "git_branch": branch, "dockerfile_path": "Dockerfile",
        "deployment_id": dep, "project_id": project_id, "domain_prefix": w.names[project],
        "build_secrets": {"tok": w.secret()},
    });
    Some((w.cp.add_task(&node, "build", &dep, payload), dep))
}

/// The RUN step of a build: numbered lines `L<n>-<i>` the checker looks for in the log, and
/// how many. Floods pause every 4000 lines: BuildKit clips output beyond 200 KiB/s.
pub fn build_script(n: usize, kind: BuildKind, buildkit: bool, secret: &str) -> (String, u32) {
    let count = |lines: u32| {
        let run = format!(
            "RUN i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo \"L{n}-$i\"; \
             if [ $((i % 4000)) = 0 ]; then sleep 1; fi; done"
        );
        (run, lines)
    };
    match kind {
        BuildKind::Plain => count(40),
        BuildKind::Flood(lines) => count(lines),
        BuildKind::Broken => (format!("RUN echo \"L{n}-1 about to fail\"; exit 7"), 1),
        BuildKind::Nasty => nasty(n, buildkit, secret),
    }
}

/// NUL, invalid UTF-8 and an escape; the agent's own secret (masked for the life of the
/// process), whole and then across the executor's 16 KiB line cut; with BuildKit a build
/// secret the same two ways. BuildKit puts `#7 0.377 ` before each line: less padding.
fn nasty(n: usize, buildkit: bool, secret: &str) -> (String, u32) {
    let pad = if buildkit { 16_363 } else { 16_375 };
    let mut run = format!(
        "printf 'L{n}-1 nul\\000byte\\n'; printf 'L{n}-2 bad \\377\\376 utf8\\n'; \
         printf 'L{n}-3 esc \\033[31mred\\033[0m\\n'; echo \"L{n}-4 secret {secret}\"; \
         printf 'L{n}-5 %{pad}s' ''; echo '{secret}'; "
    );
    let mut lines = 5;
    if buildkit {
        run = format!(
            "--mount=type=secret,id=tok {run}echo \"L{n}-6 build secret $(cat /run/secrets/tok)\"; \
             printf 'L{n}-7 %{pad}s' ''; cat /run/secrets/tok; echo; "
        );
        lines = 7;
    }
    (
        format!("RUN {run}echo \"L{n}-{} end\"", lines + 1),
        lines + 1,
    )
}

fn deploy(
    w: &World,
    project: usize,
    app: App,
    dataset: Option<(u64, u64)>,
    rw: bool,
) -> Option<(String, String)> {
    let env: &[(&str, &str)] = match app {
        App::Ok => &[],
        App::Crash => &[("CRASH", "1")],
        App::Slow => &[("SLOW", "40")],
    };
    let mut req = settings(w, project, env);
    req.insert("image_tag".into(), w.bed.app_image.clone().into());
    let mut datasets = Vec::new();
    if let Some((k, version)) = dataset {
        datasets.push(json!({
            "id": format!("{:08x}-c4a0-4000-8000-000000000000", 0xda7a_0000 + k),
            "name": format!("ds{k}"), "nfs_path": format!("ds{k}"), "version": version,
            "size_bytes": 1_572_864, "mount_mode": "dependency"}));
    }
    if rw {
        datasets.push(
            json!({"id": "0000f00d-c4a0-4000-8000-000000000000", "name": "rw",
            "nfs_path": "rw", "version": 1, "size_bytes": 0, "mount_mode": "readwrite"}),
        );
    }
    if !datasets.is_empty() {
        req.insert("datasets".into(), Value::Array(datasets));
    }
    enqueue_row(w, project, Value::Object(req))
}

fn op(w: &World, project: usize, kind: &str) -> Option<(String, String)> {
    let node = node(w, Role::Deploy)?;
    let mut payload = json!({"domain_prefix": w.names[project]});
    if kind == "runtime_logs" {
        payload["tail"] = json!(20);
    }
    Some((w.cp.add_task(&node, kind, "", payload), String::new()))
}

fn inject(w: &Arc<World>, n: usize, f: &FaultSpec) -> Option<JoinHandle<()>> {
    let w2 = w.clone();
    let f = f.clone();
    let timed = |w: &Arc<World>, ms: u64, end: Box<dyn FnOnce() + Send>| {
        let w = w.clone();
        std::thread::spawn(move || {
            w.stop.sleep(Duration::from_millis(ms));
            end();
            w.hist.push(Ev::FaultEnd(n));
        })
    };
    match f {
        FaultSpec::Cp { route, fault, ms } => {
            w.faults.inject_for(route, fault, Duration::from_millis(ms));
            // The channel's open connection goes too: the agent must dial into the fault.
            let node = w.cp.node_id_for_role(Role::Deploy.name());
            let conn = node.and_then(|n| w.cp.control().conn(&n));
            if let (Some(c), true) = (conn, matches!(route, "control" | "all")) {
                c.disconnect();
            }
            Some(timed(w, ms, Box::new(|| ())))
        }
        FaultSpec::Docker {
            mode,
            secs,
            subs,
            ms,
        } => {
            w.bed.docker_fault(n, format!("{mode} {secs} {subs}"));
            Some(timed(w, ms, Box::new(move || w2.bed.docker_fault_end(n))))
        }
        FaultSpec::Registry { ms } => {
            w.bed.proxy.refuse();
            Some(timed(w, ms, Box::new(move || w2.bed.proxy.accept())))
        }
        FaultSpec::Disk { role, inodes, ms } => {
            w.bed.fill(role, inodes);
            Some(timed(w, ms, Box::new(move || w2.bed.free(role))))
        }
        FaultSpec::Kill {
            role,
            trigger,
            down_ms,
        } => Some(std::thread::spawn(move || {
            kill(&w2, n, role, trigger, down_ms)
        })),
        FaultSpec::Term { role, second_ms } => {
            Some(std::thread::spawn(move || term(&w2, n, role, second_ms)))
        }
    }
}

/// Waits (up to 30 s) for the moment the trigger names, then kill -9 and a restart.
fn kill(w: &World, n: usize, role: Role, trigger: Trigger, down_ms: u64) {
    let ready = |w: &World| match trigger {
        Trigger::Now => true,
        Trigger::Claim => node_tasks(w, role, None, "pending") > 0,
        Trigger::During(kind, _) => node_tasks(w, role, Some(kind), "running") > 0,
    };
    let mut waited = 0;
    while !ready(w) && waited < 150 {
        if w.stop.sleep(Duration::from_millis(200)) {
            return;
        }
        waited += 1;
    }
    if let Trigger::During(_, delay) = trigger {
        if w.stop.sleep(Duration::from_millis(delay)) {
            return;
        }
    }
    let how = format!("kill -9 (#{n}, {trigger:?})");
    if w.agents.signal(role, libc::SIGKILL, &how).is_some() {
        let _ = w.agents.wait_exit(role, Duration::from_secs(10));
    }
    if !w.stop.sleep(Duration::from_millis(down_ms)) {
        w.agents.start(role);
    }
    w.hist.push(Ev::FaultEnd(n));
}

fn node_tasks(w: &World, role: Role, kind: Option<&str>, status: &str) -> usize {
    let Some(node) = w.cp.node_id_for_role(role.name()) else {
        return 0;
    };
    let tasks = w.cp.tasks();
    let mine = tasks.iter().filter(|t| {
        t["node_id"] == node.as_str()
            && t["status"] == status
            && kind.map_or(true, |k| t["type"] == k)
    });
    mine.count()
}

/// SIGTERM (and a second one when planned); the agent must exit within the shutdown grace
/// (plus the 10 s a second SIGTERM gives tasks); then it is started again.
fn term(w: &World, n: usize, role: Role, second_ms: Option<u64>) {
    let Some(pid) = w
        .agents
        .signal(role, libc::SIGTERM, &format!("SIGTERM (#{n})"))
    else {
        return;
    };
    if let Some(ms) = second_ms {
        if w.agents
            .wait_exit(role, Duration::from_millis(ms))
            .is_none()
        {
            w.agents
                .signal(role, libc::SIGTERM, &format!("second SIGTERM (#{n})"));
        }
    }
    let limit = Duration::from_secs(GRACE_SECS + 25);
    if w.agents.wait_exit(role, limit).is_none() {
        w.hist.note(format!(
            "{} agent (pid {pid}) still running {}s after SIGTERM: SIGKILL",
            role.name(),
            limit.as_secs()
        ));
        w.hist.push(Ev::Stuck { role, pid });
        w.agents
            .signal(role, libc::SIGKILL, "SIGKILL (did not stop)");
        let _ = w.agents.wait_exit(role, Duration::from_secs(10));
    }
    if !w.stop.stopped() {
        w.agents.start(role);
    }
    w.hist.push(Ev::FaultEnd(n));
}
