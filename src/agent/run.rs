//! The foreground agent: register, heartbeat, poll, run tasks on bounded worker threads,
//! report through the outbox, and shut down in two stages on SIGTERM/SIGINT.

use crate::agent::reports::{self, Reports};
use crate::config::{Config, ConfigError, DataDir};
use crate::cp::client::{Backoff, Client, CpError};
use crate::cp::files;
use crate::cp::journal::Journal;
use crate::cp::latelog::LateLogs;
use crate::cp::logship::{LogShipper, Spill};
use crate::cp::outbox::{self, Flushed, Outbox};
use crate::cp::tls::Roots;
use crate::cp::wire::{Node, ZERO_TIME, ZERO_UUID};
use crate::sys::executor;
use crate::sys::executor::System;
use crate::sys::secret::Secret;
use crate::sys::sync::{self, FileLock, Turn};
use crate::sys::wait::{self, Stop, Woke};
use crate::sys::{disk, redact, signal};
use crate::task::{valid_id, AgentConfig, Completion, Kind, Role, Status, Task};
use crate::work::ctx::{Ctx, Shared};
use crate::work::dispatch;
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What became of a polled task.
#[derive(PartialEq)]
enum Accept {
    /// Taken (started, reported, or skipped for good).
    Done,
    /// Not recorded: left for a later poll, with the tasks after it.
    Later,
}

/// Finished tasks are remembered this long so a late duplicate poll cannot re-run them.
const JOURNAL_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// After SIGTERM (and any cancel), how long queued reports may take to go out.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

struct Agent {
    cfg: Arc<Config>,
    role: Role,
    client: Client,
    journal: Arc<Journal>,
    outbox: Arc<Outbox>,
    /// Log lines of ended tasks the control plane has not taken yet.
    late: Arc<LateLogs>,
    shared: Arc<Shared>,
    cp_config: Arc<RwLock<AgentConfig>>,
    host_ip: String,
    node_id: Option<String>,
    logged_in: Option<(String, String, Secret)>,
    outbox_flushed: bool,
    /// DATA_DIR was full at the last look: no task is taken.
    disk_full: bool,
    /// The last journal claim failed (logged once until one succeeds).
    journal_failing: bool,
    /// Task threads alive (shutdown waits for them; some may wait for a lock, holding no slot).
    running: Arc<AtomicUsize>,
    reports: Reports,
    /// Invalid task IDs already logged: the server lists them at every poll.
    invalid_ids: HashSet<String>,
}

/// Why the agent could not start.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    /// DATA_DIR's state (journal, outbox) cannot be opened.
    DataDir {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    /// Another agent runs on this DATA_DIR (its pid when known).
    Busy {
        path: std::path::PathBuf,
        holder: Option<String>,
    },
    /// No thread for a sender (outbox, late logs).
    Thread(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::DataDir { path, err } => write!(f, "DATA_DIR: {}: {err}", path.display()),
            StartError::Busy { path, holder } => write!(
                f,
                "DATA_DIR {} is in use by another muvee-agent ({}); give each agent its own DATA_DIR",
                path.display(),
                holder.as_deref().map_or("pid unknown".into(), |p| format!("pid {p}"))
            ),
            StartError::Thread(e) => write!(f, "cannot start a sender thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Config(e) => Some(e),
            StartError::DataDir { err, .. } | StartError::Thread(err) => Some(err),
            StartError::Busy { .. } => None,
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> StartError {
        StartError::Config(e)
    }
}

/// The HTTP client, and the TLS roots it uses (the control channel uses them too).
fn client(cfg: &Config) -> Result<(Client, Roots), ConfigError> {
    let roots = Roots::load(cfg.ca_file.as_deref()).map_err(|e| ConfigError(e.0))?;
    let client = Client::new(&cfg.control_plane_url, &cfg.agent_secret, &roots);
    Ok((client, roots))
}

pub fn run(cfg: Config) -> Result<(), StartError> {
    let role = cfg
        .role
        .ok_or_else(|| ConfigError("NODE_ROLE is required (builder or deploy)".into()))?;
    if let DataDir::Full(why) = cfg.check_data_dir()? {
        log::error!("DATA_DIR {why}: no task is taken until space returns");
    }
    let _lock = lock_data_dir(&cfg)?;
    if cfg.agent_secret.is_empty() {
        log::warn!("AGENT_SECRET is empty: today's control plane rejects every request without it");
    }
    redact::add(cfg.agent_secret.expose());
    let shared = Arc::new(Shared::new(&cfg, Arc::new(System)));
    signal::watch(shared.bell.clone());
    let io_err = |err: std::io::Error| StartError::DataDir {
        path: cfg.data_dir.clone(),
        err,
    };
    let journal = Arc::new(Journal::open(&cfg.data_dir).map_err(io_err)?);
    let outbox = Arc::new(Outbox::open(&cfg.data_dir).map_err(io_err)?);
    // A replaced container is retired only once the control plane has the new port.
    shared.deliveries.track();
    let told = shared.clone();
    outbox.on_final_delivered(Box::new(move |id| told.report_delivered(id)));
    let (client, roots) = client(&cfg)?;
    let host_ip = host_ip(&cfg);
    log_start(&cfg, role, &host_ip);

    // Recovery before any report goes out: a final report queued by the previous run must
    // not race the scan that reports its task interrupted.
    let interrupted = recover(&journal, &outbox);
    // Then reports: whatever an earlier run left in the outbox goes out before new work.
    start_senders(&outbox, &client, &journal)?;
    let late = start_late_logs(&cfg, &client)?;
    // Late logs waiting for their backoff go as soon as an outage ends.
    let back = late.clone();
    outbox.on_outage_end(Box::new(move || back.retry_now()));

    if role == Role::Builder {
        // Probed once per start and logged, not at the first build.
        crate::work::builder::build_mode(&shared, &cfg);
        crate::work::builder::sweep_at_start(&cfg);
    }
    let mut agent = Agent {
        cfg: Arc::new(cfg),
        role,
        client,
        journal,
        outbox,
        late,
        shared,
        cp_config: Arc::default(),
        host_ip,
        node_id: None,
        logged_in: None,
        outbox_flushed: false,
        disk_full: false,
        journal_failing: false,
        running: Arc::default(),
        reports: Reports::default(),
        invalid_ids: HashSet::new(),
    };
    if role == Role::Deploy {
        crate::work::deployer::reconcile(&agent.shared, &agent.cfg, &interrupted);
        agent.measure_cache();
    }
    agent.start_reports();
    if role == Role::Deploy {
        crate::agent::control::spawn(
            agent.cfg.clone(),
            agent.shared.clone(),
            agent.reports.clone(),
            roots,
        );
    }
    agent.main_loop();
    agent.shut_down();
    Ok(())
}

/// The outbox's sender threads.
fn start_senders(
    outbox: &Arc<Outbox>,
    client: &Client,
    journal: &Arc<Journal>,
) -> Result<(), StartError> {
    for n in 0..outbox::SENDERS {
        let (ob, c, j) = (outbox.clone(), client.clone(), journal.clone());
        std::thread::Builder::new()
            .name(format!("outbox-{n}"))
            .spawn(move || ob.run_sender(&c, &|id| j.is_saved_done(id)))
            .map_err(StartError::Thread)?;
    }
    Ok(())
}

/// The late-log queue, with what an earlier process left, and its one sender thread.
/// Log spills of tasks that ended with the previous process go (their reports say failed).
fn start_late_logs(cfg: &Config, client: &Client) -> Result<Arc<LateLogs>, StartError> {
    let logs = cfg.data_dir.join("state/logs");
    let _ = std::fs::remove_dir_all(&logs);
    let _ = files::private_dir(&logs);
    let dir = cfg.data_dir.join("state/late-logs");
    let late = Arc::new(LateLogs::open(dir, cfg.log_spill_max));
    let (l, c) = (late.clone(), client.clone());
    std::thread::Builder::new()
        .name("late-logs".into())
        .spawn(move || l.run_sender(&c))
        .map_err(StartError::Thread)?;
    Ok(late)
}

fn host_ip(cfg: &Config) -> String {
    cfg.resolve_host_ip().unwrap_or_else(|| {
        log::warn!(
            "could not detect HOST_IP from {}; set HOST_IP so Traefik can reach this node",
            cfg.control_plane_url
        );
        String::new()
    })
}

/// One agent per DATA_DIR: an exclusive lock on the directory itself (no file to create,
/// so it works on a full disk; released by the kernel however the process ends), and our
/// pid in `state/agent.pid` for the message another agent prints. DATA_DIR/state is made a
/// private, real directory (not a symlink) first.
fn lock_data_dir(cfg: &Config) -> Result<Option<FileLock>, StartError> {
    let dir = &cfg.data_dir;
    let state = dir.join("state");
    let pid_file = state.join("agent.pid");
    let lock = match FileLock::try_open(dir) {
        Ok(Some(lock)) => Some(lock),
        Ok(None) => {
            return Err(StartError::Busy {
                path: dir.clone(),
                holder: lock_holder(dir, &pid_file).map(|p| p.to_string()),
            })
        }
        Err(e) => {
            // A filesystem without locks (some NFS setups): run, as before locks existed.
            log::warn!(
                "cannot lock DATA_DIR {} ({e}); make sure no other agent uses it",
                dir.display()
            );
            None
        }
    };
    let _ = files::private_dir(&state);
    let _ = files::write_atomic(&pid_file, format!("{}\n", std::process::id()).as_bytes());
    Ok(lock)
}

/// The pid of the agent holding DATA_DIR's lock: the kernel's word (`/proc/locks`), else
/// `state/agent.pid` if that process lives (the holder may not have written it yet: a stale
/// pid from a killed agent is never named).
fn lock_holder(dir: &std::path::Path, pid_file: &std::path::Path) -> Option<u32> {
    sync::flock_holder(dir).or_else(|| {
        let pid = files::read(pid_file).ok()?;
        let pid: u32 = std::str::from_utf8(&pid).ok()?.trim().parse().ok()?;
        signal::alive(pid).then_some(pid)
    })
}

fn log_start(cfg: &Config, role: Role, host_ip: &str) {
    log::info!(
        "muvee-agent {} starting: role {}, node {}, host ip {}, control plane {}, data dir {}",
        env!("CARGO_PKG_VERSION"),
        role.as_str(),
        cfg.node_name,
        host_ip,
        cfg.control_plane_url,
        cfg.data_dir.display()
    );
}

/// What the previous run left: interrupted tasks reported (their deploys returned), space
/// reserves freed, tombstones and old journal entries forgotten.
fn recover(journal: &Journal, outbox: &Outbox) -> Vec<String> {
    let interrupted = report_interrupted(journal, outbox);
    outbox.release_reserves();
    outbox.forget_sent(&|id| journal.is_saved_done(id));
    journal.prune(JOURNAL_KEEP, &|id| outbox.holds(id));
    interrupted
}

/// Tasks that were running when the agent last stopped are reported failed, unless a final
/// report of theirs was ever queued: a task is never reported twice with different outcomes.
/// Returns the deployment ids of the interrupted deploys.
fn report_interrupted(journal: &Journal, outbox: &Outbox) -> Vec<String> {
    let mut deploys = Vec::new();
    for e in journal.interrupted() {
        if outbox.has_final(&e.id) {
            finish_journal(journal, &e.id);
            continue;
        }
        log::warn!(
            "task {} ({}) was running when the agent stopped; reporting it failed",
            e.id,
            e.kind
        );
        finish(
            outbox,
            journal,
            &e.id,
            &Completion::failed("agent restarted during task"),
            None,
        );
        if matches!(Kind::parse(&e.kind, ""), Kind::Deploy(_)) {
            deploys.push(e.deployment_id.clone());
        }
    }
    deploys
}

/// Why a polled task is refused before it runs.
#[derive(Debug)]
enum Rejection {
    Malformed(serde_json::Error),
    WrongRole(String, Role),
    Unknown(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed(e) => write!(f, "malformed task: {e}"),
            Rejection::WrongRole(kind, role) => write!(
                f,
                "task type {kind:?} is not run by a {} node",
                role.as_str()
            ),
            Rejection::Unknown(kind) => write!(
                f,
                "unknown task type {kind:?}: muvee-agent {} does not run it",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }
}

impl std::error::Error for Rejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Rejection::Malformed(e) => Some(e),
            _ => None,
        }
    }
}

impl Agent {
    /// The cache's size, for the heartbeat, on a thread: a large cache takes a while to walk.
    fn measure_cache(&self) {
        let (shared, data_dir) = (self.shared.clone(), self.cfg.data_dir.clone());
        let measure = move || shared.cache.measure(&data_dir);
        let _ = std::thread::Builder::new()
            .name("cache-size".into())
            .spawn(measure);
    }

    /// Statuses, metrics, health report and reaping, on their own thread (`cp::reports`).
    fn start_reports(&mut self) {
        self.reports = reports::spawn(reports::Sources {
            cfg: self.cfg.clone(),
            role: self.role,
            client: self.client.clone(),
            shared: self.shared.clone(),
            cp: self.cp_config.clone(),
            outbox: self.outbox.clone(),
        });
    }

    fn main_loop(&mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_heartbeat = Instant::now();
        let mut config_loaded = false;
        while !signal::shutdown_requested() {
            let delay = match self.step(&mut next_heartbeat, &mut config_loaded) {
                Ok(()) => {
                    backoff.reset();
                    self.cfg.poll_interval
                }
                Err(e) => {
                    if e.status().map_or(true, |s| s == 401) {
                        self.outbox.unreachable();
                    }
                    let d = backoff.next_delay();
                    match &e {
                        CpError::Unauthorized { .. } => {
                            log::error!("{e}; retrying in {:.1}s", d.as_secs_f64())
                        }
                        _ => log::warn!("{e}; retrying in {:.1}s", d.as_secs_f64()),
                    }
                    d
                }
            };
            // Until the next round, a finished task (a free slot) or a signal.
            let (next, slots) = (Some(Instant::now() + delay), &self.shared.slots);
            wait::until(&self.shared.bell, next, Stop::Shutdown, || {
                slots.take_freed()
            });
        }
    }

    /// One round: (re-)register when due, then poll and start tasks.
    fn step(
        &mut self,
        next_heartbeat: &mut Instant,
        config_loaded: &mut bool,
    ) -> Result<(), CpError> {
        if self.node_id.is_none() || Instant::now() >= *next_heartbeat {
            self.heartbeat(config_loaded)?;
            *next_heartbeat = Instant::now() + self.cfg.heartbeat_interval;
            self.outbox.reachable();
        }
        self.journal.retry_unsaved();
        if !self.room_for_tasks() {
            return Ok(());
        }
        // Reports queued before this start are tried before any new task is taken.
        if !self.outbox_flushed {
            if !self.outbox.settled() {
                return Ok(());
            }
            self.outbox_flushed = true;
        }
        if self.shared.slots.used() >= self.cfg.max_concurrent_tasks {
            return Ok(());
        }
        let node_id = self.node_id.clone().unwrap_or_default();
        let tasks = match self.client.poll(&node_id) {
            Err(e) if e.is_unknown_node() => {
                log::warn!("control plane no longer knows node {node_id}; registering again");
                self.node_id = None;
                return Ok(());
            }
            other => other?,
        };
        // The control plane answers: waiting reports go now.
        self.outbox.reachable();
        for raw in tasks {
            if self.shared.slots.used() >= self.cfg.max_concurrent_tasks {
                break;
            }
            // A task that cannot be recorded is left for the next poll, and so are the
            // tasks after it: a later task of its app must not run first.
            if self.accept(raw) == Accept::Later {
                break;
            }
        }
        Ok(())
    }

    /// False while DATA_DIR is full: no task is taken (it could not be recorded) until
    /// space returns. Registering and heartbeats go on, so the node stays online.
    fn room_for_tasks(&mut self) -> bool {
        let usage = disk::usage(&self.cfg.data_dir);
        let full = usage.is_some_and(|u| u.full());
        if full != self.disk_full {
            let dir = self.cfg.data_dir.display();
            match usage {
                Some(u) if full => {
                    log::error!("DATA_DIR {dir} is full ({u}): taking no task until space returns")
                }
                _ => log::info!("DATA_DIR {dir} has space again: taking tasks"),
            }
            self.disk_full = full;
        }
        !full
    }

    /// Register (an idempotent upsert that also refreshes `last_seen_at` on the March 2026
    /// server), re-read the config and log in to the registry when credentials changed.
    fn heartbeat(&mut self, config_loaded: &mut bool) -> Result<(), CpError> {
        let node = Node {
            id: ZERO_UUID.into(),
            hostname: self.cfg.node_name.clone(),
            role: self.role.as_str().into(),
            host_ip: self.host_ip.clone(),
            max_storage_bytes: self.cfg.max_storage,
            used_storage_bytes: self.shared.cache.bytes(),
            last_seen_at: ZERO_TIME.into(),
            created_at: ZERO_TIME.into(),
        };
        let registered = self.client.register(&node)?;
        if registered.id.is_empty() || registered.id == ZERO_UUID {
            return Err(CpError::Protocol {
                url: self.client.base().join("/api/agent/register"),
                what: "register answered without a node id",
            });
        }
        if self.node_id.as_deref() != Some(registered.id.as_str()) {
            log::info!(
                "registered as node {} ({})",
                registered.id,
                self.role.as_str()
            );
        }
        self.node_id = Some(registered.id.clone());
        self.reports.node_registered(&registered.id);
        match self.client.config() {
            Ok(c) => {
                redact::add(c.registry_password.expose());
                *self.cp_config.write().unwrap_or_else(|e| e.into_inner()) = c;
                *config_loaded = true;
            }
            Err(e) if *config_loaded => {
                log::warn!("could not refresh agent config, keeping the last one: {e}")
            }
            Err(e) => return Err(e),
        }
        self.registry_login();
        Ok(())
    }

    fn registry_login(&mut self) {
        let c = self
            .cp_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if c.registry_user.is_empty()
            || c.registry_password.is_empty()
            || c.registry_addr.is_empty()
        {
            return;
        }
        let key = (
            c.registry_addr.clone(),
            c.registry_user.clone(),
            c.registry_password.clone(),
        );
        if self.logged_in.as_ref() == Some(&key) {
            return;
        }
        let docker = self.shared.docker(&self.cfg);
        match docker.login(&c.registry_addr, &c.registry_user, &c.registry_password) {
            Ok(()) => {
                log::info!(
                    "logged in to registry {} as {}",
                    c.registry_addr,
                    c.registry_user
                );
                self.logged_in = Some(key);
            }
            Err(e) => log::error!(
                "docker login to {} failed (will retry at the next heartbeat): {e}",
                c.registry_addr
            ),
        }
    }

    /// Claims one polled task and starts it on a worker thread.
    fn accept(&mut self, raw: serde_json::Value) -> Accept {
        let id = raw
            .get("ID")
            .or_else(|| raw.get("id"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if !valid_id(&id) {
            let raw_id = raw.get("ID").or_else(|| raw.get("id"));
            let shown = raw_id.map_or_else(|| "(none)".to_string(), |v| v.to_string());
            if self.invalid_ids.len() < 1000 && self.invalid_ids.insert(shown.clone()) {
                log::error!("ignoring a task with an invalid ID {shown} (logged once per ID)");
            }
            return Accept::Done;
        }
        let (task, malformed) = match serde_json::from_value::<Task>(raw) {
            Ok(t) => (t, None),
            Err(e) => {
                let t = Task {
                    id: id.clone(),
                    ..Task::default()
                };
                (t, Some(Rejection::Malformed(e)))
            }
        };
        let claimed = self.journal.claim(&task);
        // Logged when it starts and stops failing, not at every poll of every pending task.
        match (&claimed, self.journal_failing) {
            (Err(e), false) => log::error!(
                "cannot record task {id} in the journal, leaving it (and tasks after it) for later: {e}"
            ),
            (Err(e), true) => log::debug!("cannot record task {id} in the journal: {e}"),
            (Ok(_), true) => log::info!("the journal records tasks again"),
            (Ok(_), false) => {}
        }
        self.journal_failing = claimed.is_err();
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                log::debug!("task {id} was already taken; skipping");
                return Accept::Done;
            }
            Err(_) => return Accept::Later,
        }
        if let Err(e) = self.outbox.reserve(&id) {
            self.journal.unclaim(&id);
            log::error!(
                "cannot reserve space for the reports of task {id}, leaving it (and tasks after it) for later: {e}"
            );
            return Accept::Later;
        }
        if let Some(reason) = malformed.or_else(|| self.rejection(&task.kind())) {
            log::error!("task {id}: {reason}");
            self.finish(&id, &Completion::failed(reason.to_string()));
            return Accept::Done;
        }
        self.outbox.push(&id, &Completion::running());
        log::info!(
            "task {id}: starting {} (deployment {})",
            task.type_name,
            task.deployment_id
        );
        self.start_worker(&id, task);
        Accept::Done
    }

    fn rejection(&self, kind: &Kind) -> Option<Rejection> {
        if self.role.serves(kind) {
            None
        } else if kind.role().is_some() {
            Some(Rejection::WrongRole(kind.name().to_string(), self.role))
        } else {
            Some(Rejection::Unknown(kind.name().to_string()))
        }
    }

    fn start_worker(&self, id: &str, task: Task) {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.shared.slots.take();
        let w = Worker {
            cfg: self.cfg.clone(),
            cp: self
                .cp_config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            client: self.client.clone(),
            journal: self.journal.clone(),
            outbox: self.outbox.clone(),
            late: self.late.clone(),
            shared: self.shared.clone(),
            running: self.running.clone(),
            turn: app_turn(&self.shared, &task),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("task-{}", &id[..id.len().min(8)]))
            .spawn(move || w.run(task));
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.shared.slots.give_back();
            self.finish(
                id,
                &Completion::failed(format!("cannot start a worker thread: {e}")),
            );
        }
    }

    fn finish(&self, id: &str, c: &Completion) {
        finish(&self.outbox, &self.journal, id, c, None);
    }

    fn shut_down(&self) {
        let n = self.running.load(Ordering::SeqCst);
        if n > 0 {
            log::info!(
                "shutting down: waiting up to {} for {n} running task(s); signal again to cancel them",
                executor::fmt_duration(self.cfg.shutdown_grace)
            );
        } else {
            log::info!("shutting down");
        }
        let bell = &self.shared.bell;
        let idle = || self.running.load(Ordering::SeqCst) == 0;
        let grace_end = Instant::now() + self.cfg.shutdown_grace;
        wait::until(bell, Some(grace_end), Stop::Cancel, idle);
        if !idle() {
            if !signal::cancel_requested() {
                log::warn!("SHUTDOWN_GRACE expired; canceling running tasks");
                signal::force_cancel();
            }
            // Children get SIGTERM, then SIGKILL after 10 s; give reporting a margin.
            let limit = Instant::now() + executor::KILL_GRACE + Duration::from_secs(20);
            if wait::until(bell, Some(limit), Stop::Never, idle) != Woke::Ready {
                log::error!("tasks did not stop after cancel; exiting anyway");
            }
        }
        self.reports.join();
        self.shared.retiring.wait(None);
        if let Flushed::Left { queued, unwritten } =
            self.outbox.wait_empty(Instant::now() + FINAL_FLUSH)
        {
            let dir = self.cfg.data_dir.join("state/outbox");
            if queued > unwritten {
                log::warn!(
                    "{} undelivered report(s) stay queued in {} for the next start",
                    queued - unwritten,
                    dir.display()
                );
            }
            if unwritten > 0 {
                log::error!("{unwritten} undelivered report(s) could not be written to {} (full?) and are lost; a task whose final report is among them is reported failed at the next start", dir.display());
            }
        }
        // What it has not sent waits in its files for the next start.
        self.late.close();
        log::info!("stopped");
    }
}

/// The final report first, then the journal: a crash in between re-reports the same
/// outcome (the queued report wins over "interrupted" at the next start). A final report
/// that cannot be written (no reserve, a full disk) is not sent before it is; the journal
/// keeps the task running meanwhile, so a restart before then reports it failed rather
/// than forget it.
/// `app`: the app a completed deploy's report routes (see `Outbox::push_routing`).
fn finish(outbox: &Outbox, journal: &Journal, id: &str, c: &Completion, app: Option<&str>) {
    let pushed = match app {
        Some(app) => outbox.push_routing(id, c, app),
        None => outbox.push(id, c),
    };
    if pushed {
        finish_journal(journal, id);
    }
}

fn finish_journal(journal: &Journal, id: &str) {
    if let Err(e) = journal.finish(id) {
        log::error!("cannot mark task {id} finished in the journal (retried at each poll): {e}");
    }
}

/// A task that changes an app's containers takes its turn on the app's lock now, while
/// tasks are claimed in the control plane's order: the app's tasks then change it in that
/// order, whichever worker gets there first (a pause queued before a deploy pauses the old
/// version, not the new one).
fn app_turn(shared: &Shared, task: &Task) -> Option<Turn> {
    let changes_app = matches!(
        task.kind(),
        Kind::Deploy(_) | Kind::Cleanup(_) | Kind::Restart | Kind::Pause | Kind::Unpause
    );
    let prefix = task.payload["domain_prefix"].as_str()?;
    changes_app.then(|| shared.locks.turn(&crate::work::deployer::lock_key(prefix)))
}

struct Worker {
    cfg: Arc<Config>,
    cp: AgentConfig,
    client: Client,
    journal: Arc<Journal>,
    outbox: Arc<Outbox>,
    late: Arc<LateLogs>,
    shared: Arc<Shared>,
    running: Arc<AtomicUsize>,
    turn: Option<Turn>,
}

impl Worker {
    fn run(self, task: Task) {
        let started = Instant::now();
        let ships_logs = task.kind().ships_logs() && !task.deployment_id.is_empty();
        let shipper = ships_logs.then(|| {
            let spill = Spill {
                path: self
                    .cfg
                    .data_dir
                    .join("state/logs")
                    .join(format!("{}.spill", task.id)),
                max_bytes: self.cfg.log_spill_max,
            };
            LogShipper::start(
                self.client.clone(),
                task.deployment_id.clone(),
                spill,
                self.shared.bell.clone(),
                self.late.clone(),
            )
        });
        let short = &task.id[..task.id.len().min(8)];
        let out = |line: &str| {
            log::debug!(target: "muvee_agent::task", "[{short}] {line}");
            if let Some(s) = &shipper {
                s.line(line);
            }
        };
        let secrets = redact::Scope::new();
        let ctx = Ctx {
            cfg: &self.cfg,
            cp: &self.cp,
            task: &task,
            shared: &self.shared,
            secrets: &secrets,
            out: &out,
            turn: self.turn.as_ref(),
        };
        let completion = dispatch::execute(&ctx);
        // Logs first, so the deployment log is complete when the final status lands (unless
        // the control plane does not take them: then they follow from the late-log queue).
        if let Some(s) = shipper {
            s.close();
        }
        let took = executor::fmt_duration(started.elapsed());
        match &completion.result {
            Some(reason) if completion.status == Status::Failed => {
                log::error!("task {}: failed after {took}: {reason}", task.id)
            }
            _ => log::info!("task {}: completed in {took}", task.id),
        }
        // A report with a host port routes its app: in order with the app's others.
        let app = completion
            .host_port
            .and(task.payload["domain_prefix"].as_str());
        finish(&self.outbox, &self.journal, &task.id, &completion, app);
        self.running.fetch_sub(1, Ordering::SeqCst);
        // Rings the bell: the loop polls again, shutdown sees the thread gone.
        self.shared.slots.give_back();
    }
}
