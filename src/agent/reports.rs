//! The agent's periodic reports besides the heartbeat, on one thread of their own (a node
//! with many apps needs a few docker calls per app, which must not delay polling):
//!
//! * both roles, every HEARTBEAT_INTERVAL once registered: node metrics (§1.8); here, not on
//!   the agent loop, so a stalled metrics route never delays polling;
//! * deploy role, every HEARTBEAT_INTERVAL: container statuses, then container metrics
//!   (§1.6, §1.7); nothing to report, no request;
//! * both roles: the health report (§1.9), the checks of `muvee-agent check`, first 10 s after
//!   start (sooner with a shorter HEARTBEAT_INTERVAL), then every 2 minutes. The March 2026
//!   server has no such route: its 404 ends the reports, quietly;
//! * deploy role, every few minutes: reaping (`work::reaper`).

use crate::agent::{health, metrics};
use crate::config::Config;
use crate::cp::client::{Client, CpError};
use crate::cp::outbox::Outbox;
use crate::sys::docker::Docker;
use crate::sys::executor::{Cmd, ExecError, Output, Runner, Stream};
use crate::sys::wait::{self, Stop, Woke};
use crate::task::AgentConfig;
use crate::task::Role;
use crate::work::ctx::Shared;
use crate::work::reaper::{self, Reaper};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const HEALTH_FIRST: Duration = Duration::from_secs(10);
const HEALTH_EVERY: Duration = Duration::from_secs(120);
/// How soon to look again for a node id before the first registration.
const NO_NODE_YET: Duration = Duration::from_secs(1);

/// The agent loop's side of the reports: it tells them the node id once registered.
#[derive(Clone, Default)]
pub struct Reports {
    node_id: Arc<Mutex<Option<String>>>,
    /// The reports thread, joined at shutdown: no child of its outlives the agent.
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Rung when the node id changes (the control channel re-dials at once).
    watchers: Arc<Mutex<Vec<Arc<crate::sys::wait::Doorbell>>>>,
}

impl Reports {
    pub fn node_registered(&self, id: &str) {
        let mut node = self.node_id.lock().unwrap_or_else(|e| e.into_inner());
        let changed = node.as_deref() != Some(id);
        *node = Some(id.to_string());
        drop(node);
        if changed {
            let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            watchers.iter().for_each(|b| b.ring());
        }
    }

    /// `bell` is rung whenever the node id changes.
    pub fn watch_node(&self, bell: Arc<crate::sys::wait::Doorbell>) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|b| Arc::strong_count(b) > 1);
        watchers.push(bell);
    }

    /// Waits for the reports thread to end (it does at shutdown, its commands killed).
    pub fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// The node id of the last registration (None before the first).
    pub fn node_id(&self) -> Option<String> {
        self.node_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the reports thread works with.
pub struct Sources {
    pub cfg: Arc<Config>,
    pub role: Role,
    pub client: Client,
    pub shared: Arc<Shared>,
    /// The control plane's agent config, as the heartbeat last read it.
    pub cp: Arc<RwLock<AgentConfig>>,
    /// Told when one of this thread's calls is answered: that ends an outage as a poll does.
    pub outbox: Arc<Outbox>,
}

/// Starts the reports thread; the returned handle takes the node id.
pub fn spawn(src: Sources) -> Reports {
    let reports = Reports::default();
    let handle = reports.clone();
    let spawned = std::thread::Builder::new()
        .name("reports".into())
        .spawn(move || run(&src, &handle));
    match spawned {
        Ok(t) => *reports.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t),
        Err(e) => {
            log::error!("cannot start the reports thread (statuses, metrics, health, reaping): {e}")
        }
    }
    reports
}

/// When each report is due next; None: never again.
struct Due {
    node: Option<Instant>,
    statuses: Option<Instant>,
    health: Option<Instant>,
    reap: Option<Instant>,
}

fn run(src: &Sources, reports: &Reports) {
    let start = Instant::now();
    let deploy = src.role == Role::Deploy;
    let reap_every = reaper::interval(src.cfg.reap_grace);
    let mut due = Due {
        node: Some(start),
        statuses: deploy.then(|| start + src.cfg.heartbeat_interval),
        health: Some(start + HEALTH_FIRST.min(src.cfg.heartbeat_interval)),
        reap: deploy.then(|| start + reap_every),
    };
    let mut reaper = Reaper::default();
    let mut cpu = metrics::CpuSampler::default();
    let probes = Mutex::default();
    let mut empty_at = None;
    let is_due = |at: Option<Instant>| at.is_some_and(|t| Instant::now() >= t);
    loop {
        let Some(next) = [due.node, due.statuses, due.health, due.reap]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        let taken = || deploy && src.shared.statuses_due.load(Ordering::SeqCst);
        if wait::until(&src.shared.bell, Some(next), Stop::Shutdown, taken) == Woke::Stopped {
            return;
        }
        if deploy && src.shared.statuses_due.swap(false, Ordering::SeqCst) {
            due.statuses = Some(Instant::now());
        }
        if is_due(due.node) {
            due.node = Some(Instant::now() + node_metrics(src, reports, &mut cpu));
        }
        if is_due(due.statuses) {
            statuses_and_metrics(src, &mut empty_at);
            due.statuses = Some(Instant::now() + src.cfg.heartbeat_interval);
        }
        if is_due(due.health) {
            due.health = health_report(src, reports, &probes).map(|d| Instant::now() + d);
        }
        if is_due(due.reap) {
            reaper.round(&src.cfg, &src.shared);
            due.reap = Some(Instant::now() + reap_every);
        }
    }
}

/// Statuses, then metrics of the same containers. A node found without apps is not
/// listed again until a task ran (only tasks start apps): an idle empty node stays asleep.
fn statuses_and_metrics(src: &Sources, empty_at: &mut Option<usize>) {
    let tasks = src
        .shared
        .tasks_started
        .load(std::sync::atomic::Ordering::SeqCst);
    if *empty_at == Some(tasks) {
        return;
    }
    let runner = AtShutdown(&*src.shared.runner);
    let docker = Docker::new(&src.cfg.docker_cli, &runner);
    let Some(apps) = metrics::current_apps(&docker, &src.cfg.node_name) else {
        return;
    };
    // Not while a task runs: the look may have fallen between a replacement's rename aside
    // and its new container's start.
    let idle = src.shared.slots.used() == 0;
    *empty_at = (apps.is_empty() && idle).then_some(tasks);
    if apps.is_empty() {
        return;
    }
    let statuses = metrics::container_statuses(&docker, &apps, &src.shared.locks);
    post(src, "/api/agent/container-statuses", &statuses);
    let names: Vec<String> = apps.iter().map(|(_, c)| c.name.clone()).collect();
    let rows = match docker.stats(&names) {
        Ok(rows) => rows,
        Err(e) => {
            log::debug!("no container metrics: {e}");
            return;
        }
    };
    let body = metrics::container_metrics(&apps, &rows);
    if !body.is_empty() {
        post(src, "/api/agent/container-metrics", &body);
    }
}

/// Posts the node's metrics once registered; returns when to look again.
fn node_metrics(src: &Sources, reports: &Reports, cpu: &mut metrics::CpuSampler) -> Duration {
    let Some(node) = reports.node_id() else {
        return NO_NODE_YET;
    };
    post(
        src,
        "/api/agent/node-metrics",
        &metrics::node_metrics(&node, &src.cfg.data_dir, cpu),
    );
    src.cfg.heartbeat_interval
}

/// Runs the reports' commands so that SIGTERM kills them (their process group): the
/// agent joins this thread when it stops, and no `docker stats` outlives it.
struct AtShutdown<'a>(&'a dyn Runner);

impl Runner for AtShutdown<'_> {
    fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError> {
        let mut cmd = cmd.clone();
        cmd.stop_at_shutdown = true;
        self.0.run(&cmd, on_line)
    }
}

fn post<T: serde::Serialize>(src: &Sources, path: &str, body: &T) {
    let Ok(v) = serde_json::to_value(body) else {
        return;
    };
    match src.client.post(path, &v) {
        Ok(()) => src.outbox.answered(),
        Err(e) => log::debug!("{path} not accepted: {e}"),
    }
}

/// Sends the checks; returns when to send them again (None: never).
/// Tool versions change rarely: the health report runs those probes again every 30 minutes
/// (a failed one every time) and the daemon check (`docker info`) every time, so an idle
/// agent does not start half a dozen commands every 2 minutes.
struct CachedProbes<'a> {
    runner: &'a dyn Runner,
    seen: &'a Mutex<HashMap<String, (Instant, Output)>>,
}

const TOOL_REPROBE: Duration = Duration::from_secs(30 * 60);

impl Runner for CachedProbes<'_> {
    fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError> {
        let key = cmd.display();
        let live = cmd.args.iter().any(|a| a == "info");
        if !live {
            let map = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, out)) = map.get(&key) {
                if at.elapsed() < TOOL_REPROBE {
                    return Ok(out.clone());
                }
            }
        }
        let out = self.runner.run(cmd, on_line)?;
        if !live {
            let mut map = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(key, (Instant::now(), out.clone()));
        }
        Ok(out)
    }
}

fn health_report(
    src: &Sources,
    reports: &Reports,
    probes: &Mutex<HashMap<String, (Instant, Output)>>,
) -> Option<Duration> {
    let Some(node) = reports.node_id() else {
        return Some(NO_NODE_YET);
    };
    let cp = src.cp.read().unwrap_or_else(|e| e.into_inner()).clone();
    let runner = CachedProbes {
        runner: &AtShutdown(&*src.shared.runner),
        seen: probes,
    };
    let checks = health::report(&src.cfg, &runner, &cp);
    let body = serde_json::to_value(&checks).unwrap_or_default();
    let sent = src
        .client
        .post(&format!("/api/agent/health-report?node_id={node}"), &body);
    if sent.is_ok() {
        src.outbox.answered();
    }
    after_health(&sent)
}

/// A 404 is the March 2026 server, which has no health reports: stop, with one debug line.
fn after_health(sent: &Result<(), CpError>) -> Option<Duration> {
    match sent {
        Ok(()) => Some(HEALTH_EVERY),
        Err(e) if e.is_missing_route() => {
            log::debug!("the control plane has no health-report route (March 2026 server); not sending health reports");
            None
        }
        Err(e) => {
            log::debug!("health report not accepted: {e}");
            Some(HEALTH_EVERY)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_ends_the_health_reports_other_failures_do_not() {
        let status = |code: u16| CpError::Status {
            url: "u".into(),
            code,
            body: "404 page not found".into(),
        };
        assert_eq!(after_health(&Ok(())), Some(HEALTH_EVERY));
        assert_eq!(after_health(&Err(status(404))), None);
        assert_eq!(after_health(&Err(status(500))), Some(HEALTH_EVERY));
        let json_404 = CpError::Status {
            url: "u".into(),
            code: 404,
            body: r#"{"error":"not found"}"#.into(),
        };
        assert_eq!(after_health(&Err(json_404)), Some(HEALTH_EVERY));
        let down = CpError::Transport {
            url: "u".into(),
            err: ureq::Error::ConnectionFailed,
        };
        assert_eq!(after_health(&Err(down)), Some(HEALTH_EVERY));
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;
    use crate::sys::fake::{Fake, Reply};

    #[test]
    fn tool_versions_are_probed_again_only_after_a_while_the_daemon_every_time() {
        let fake = Fake::new();
        fake.on("rsync --version", Reply::Fail(127, "not found".into()));
        let seen = Mutex::default();
        let probes = CachedProbes {
            runner: &*fake,
            seen: &seen,
        };
        for _ in 0..3 {
            for args in [&["--version"][..], &["info"][..]] {
                let _ = probes.output(&Cmd::new("git").args(args.iter().copied()));
            }
            let _ = probes.output(&Cmd::new("rsync").arg("--version"));
        }
        assert_eq!(fake.ran("git --version").len(), 1);
        assert_eq!(fake.ran("git info").len(), 3);
        assert_eq!(
            fake.ran("rsync --version").len(),
            3,
            "a failed probe is not kept"
        );
    }
}
