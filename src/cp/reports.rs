//! The agent's periodic reports besides the heartbeat, on one thread of their own (a node
//! with many apps needs a few docker calls per app, which must not delay polling):
//!
//! * deploy role, every HEARTBEAT_INTERVAL: container statuses, then container metrics
//!   (§1.6, §1.7); nothing to report, no request;
//! * both roles: the health report (§1.9), the checks of `muvee-agent check`, first 10 s after
//!   start (sooner with a shorter HEARTBEAT_INTERVAL), then every 2 minutes. The March 2026
//!   server has no such route: its 404 ends the reports, quietly;
//! * deploy role, every few minutes: reaping (`work::reaper`).

use crate::config::{Config, Role};
use crate::cp::client::{Client, CpError};
use crate::cp::wire::AgentConfig;
use crate::cp::{health, metrics};
use crate::sys::signal;
use crate::work::ctx::Shared;
use crate::work::reaper::{self, Reaper};
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
}

impl Reports {
    pub fn node_registered(&self, id: &str) {
        *self.node_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
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
}

/// Starts the reports thread; the returned handle takes the node id.
pub fn spawn(src: Sources) -> Reports {
    let reports = Reports::default();
    let handle = reports.clone();
    let spawned = std::thread::Builder::new()
        .name("reports".into())
        .spawn(move || run(&src, &handle));
    if let Err(e) = spawned {
        log::error!("cannot start the reports thread (statuses, metrics, health, reaping): {e}");
    }
    reports
}

/// When each report is due next; None: never again.
struct Due {
    statuses: Option<Instant>,
    health: Option<Instant>,
    reap: Option<Instant>,
}

fn run(src: &Sources, reports: &Reports) {
    let start = Instant::now();
    let deploy = src.role == Role::Deploy;
    let reap_every = reaper::interval(src.cfg.reap_grace);
    let mut due = Due {
        statuses: deploy.then(|| start + src.cfg.heartbeat_interval),
        health: Some(start + HEALTH_FIRST.min(src.cfg.heartbeat_interval)),
        reap: deploy.then(|| start + reap_every),
    };
    let mut reaper = Reaper::default();
    let is_due = |at: Option<Instant>| at.is_some_and(|t| Instant::now() >= t);
    loop {
        let Some(next) = [due.statuses, due.health, due.reap]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        // The bell rings on signals: a shutdown ends the wait at once, nothing polls.
        if src
            .shared
            .bell
            .wait_until(Some(next), signal::shutdown_requested)
        {
            return;
        }
        if is_due(due.statuses) {
            statuses_and_metrics(src);
            due.statuses = Some(Instant::now() + src.cfg.heartbeat_interval);
        }
        if is_due(due.health) {
            due.health = health_report(src, reports).map(|d| Instant::now() + d);
        }
        if is_due(due.reap) {
            reaper.round(&src.cfg, &src.shared);
            due.reap = Some(Instant::now() + reap_every);
        }
    }
}

/// Statuses, then metrics of the same containers.
fn statuses_and_metrics(src: &Sources) {
    let docker = src.shared.docker(&src.cfg);
    let apps = metrics::current_apps(&docker);
    if apps.is_empty() {
        return;
    }
    let statuses = metrics::container_statuses(&docker, &apps);
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

fn post<T: serde::Serialize>(src: &Sources, path: &str, body: &T) {
    let Ok(v) = serde_json::to_value(body) else {
        return;
    };
    if let Err(e) = src.client.post(path, &v) {
        log::debug!("{path} not accepted: {e}");
    }
}

/// Sends the checks; returns when to send them again (None: never).
fn health_report(src: &Sources, reports: &Reports) -> Option<Duration> {
    let Some(node) = reports.node_id() else {
        return Some(NO_NODE_YET);
    };
    let cp = src.cp.read().unwrap_or_else(|e| e.into_inner()).clone();
    let checks = health::report(&src.cfg, &*src.shared.runner, &cp);
    let body = serde_json::to_value(&checks).unwrap_or_default();
    let sent = src
        .client
        .post(&format!("/api/agent/health-report?node_id={node}"), &body);
    after_health(&sent)
}

/// A 404 is the March 2026 server, which has no health reports: stop, with one debug line.
fn after_health(sent: &Result<(), CpError>) -> Option<Duration> {
    match sent {
        Ok(()) => Some(HEALTH_EVERY),
        Err(e) if e.status() == Some(404) => {
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
        let down = CpError::Transport {
            url: "u".into(),
            err: "connection refused".into(),
        };
        assert_eq!(after_health(&Err(down)), Some(HEALTH_EVERY));
    }
}
