//! What every task handler gets: settings, the control plane's agent config, the task, the
//! state shared by all tasks of this process, and where its output lines go. Below the roles:
//! they depend on it, never on each other through it.

use crate::config::Config;
use crate::sys::bell::Bell;
use crate::sys::docker::{BuildMode, Docker};
use crate::sys::executor::Runner;
use crate::sys::redact::Scope;
use crate::sys::sync::{FileLock, Jobs, KeyedLocks, Semaphore, Slots, Turn};
use crate::task::{AgentConfig, Task};
use crate::work::error::TaskError;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// State shared by all tasks of one agent process (or one `run-task`).
pub struct Shared {
    /// Every external command goes through this.
    pub runner: Arc<dyn Runner>,
    /// Rung when a task finishes, a slot frees or a signal arrives: every wait sleeps on it.
    pub bell: Arc<Bell>,
    pub build_slots: Semaphore,
    /// Tasks running at once (MAX_CONCURRENT_TASKS); the agent loop counts them.
    pub slots: Slots,
    pub locks: KeyedLocks,
    /// Old containers draining after a replacement, by domain prefix.
    pub retiring: Jobs,
    /// Which deploys' final reports the control plane took (their old containers wait).
    pub deliveries: Deliveries,
    /// How this host builds images: probed once, at start or at the first build.
    pub build_mode: OnceLock<BuildMode>,
    /// Numbers this process's build dirs.
    pub build_seq: AtomicUsize,
    /// Tasks started so far: only a task changes which apps run (reports use it to skip
    /// listing containers on a node that has none).
    pub tasks_started: AtomicUsize,
    /// This process's id under DATA_DIR/builds and the lock that proves it is alive.
    pub build_owner: Mutex<Option<(String, FileLock)>>,
    pub cache: CacheBook,
    /// A final report was taken: the container statuses (with each app's current port) go
    /// out at once. The control plane routes by the last deploy report it took, so a late
    /// report of an older deploy moves the route back to a retired port until statuses
    /// correct it.
    pub statuses_due: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(cfg: &Config, runner: Arc<dyn Runner>) -> Shared {
        let bell = Arc::new(Bell::default());
        Shared {
            runner,
            build_slots: Semaphore::new(cfg.builder_max_concurrent, bell.clone()),
            locks: KeyedLocks::new(bell.clone()),
            slots: Slots::new(bell.clone()),
            bell,
            retiring: Jobs::default(),
            deliveries: Deliveries::default(),
            build_mode: OnceLock::new(),
            build_seq: AtomicUsize::new(0),
            tasks_started: AtomicUsize::new(0),
            build_owner: Mutex::new(None),
            cache: CacheBook::default(),
            statuses_due: Default::default(),
        }
    }

    pub fn docker<'a>(&'a self, cfg: &'a Config) -> Docker<'a> {
        Docker::new(&cfg.docker_cli, &*self.runner)
    }

    /// The control plane accepted task `task_id`'s final report (the agent tells).
    pub fn report_delivered(&self, task_id: &str) {
        self.deliveries
            .release(|t, _| t == task_id, Release::Delivered);
        self.statuses_due
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.bell.ring();
    }
}

/// How a retirement's wait for a report ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The control plane took the report: it routes to the new container now.
    Delivered,
    /// A newer deploy or a cleanup of the app took over before that: the old containers
    /// stay, and are its to retire (it finds them set aside).
    Superseded,
}

/// Retirements waiting until the control plane has the new port: the old container serves
/// until the deploy's final report was accepted. Only an agent, whose outbox tells, tracks
/// them; `run-task` and the unit tests do not wait.
#[derive(Default)]
pub struct Deliveries {
    tracked: std::sync::atomic::AtomicBool,
    /// Task id, domain prefix, and how the wait ended (None: still waiting).
    awaited: Mutex<Vec<(String, String, Option<Release>)>>,
}

impl Deliveries {
    pub fn track(&self) {
        self.tracked
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A retirement of `prefix` waits for `task_id`'s report; false when nothing tells.
    pub fn expect(&self, task_id: &str, prefix: &str) -> bool {
        if !self.tracked.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let mut a = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        a.push((task_id.into(), prefix.into(), None));
        true
    }

    /// Ends the waits `which(task, prefix)` picks that still wait, as `how`; true if any.
    pub fn release(&self, which: impl Fn(&str, &str) -> bool, how: Release) -> bool {
        let mut a = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for e in a.iter_mut().filter(|e| e.2.is_none() && which(&e.0, &e.1)) {
            e.2 = Some(how);
            any = true;
        }
        any
    }

    pub fn released(&self, task_id: &str) -> bool {
        let a = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        a.iter().any(|(t, _, r)| t == task_id && r.is_some())
    }

    /// The retirement ended; returns how its wait ended (None: it did not).
    pub fn forget(&self, task_id: &str) -> Option<Release> {
        let mut a = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        let how = a.iter().find(|(t, _, _)| t == task_id).and_then(|e| e.2);
        a.retain(|(t, _, _)| t != task_id);
        how
    }
}

/// The dataset cache's bookkeeping: versions in-flight deploys are about to mount (eviction
/// holds this lock while it deletes, so a version is either pinned before eviction looks or
/// re-checked after it), and the remembered total size.
#[derive(Default)]
pub struct CacheBook {
    pub pinned: Mutex<Vec<PathBuf>>,
    pub total: Mutex<Option<u64>>,
}

/// Everything a task handler needs.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub cp: &'a AgentConfig,
    pub task: &'a Task,
    pub shared: &'a Arc<Shared>,
    /// The task's secrets, masked until the task ends.
    pub secrets: &'a Scope,
    /// Receives every line meant for the deployment log (already scrubbed).
    pub out: &'a (dyn Fn(&str) + Sync),
    /// The task's place in its app's line (taken when it was claimed).
    pub turn: Option<&'a Turn>,
}

impl Ctx<'_> {
    /// A line of our own (not a child's) for the deployment log.
    pub fn say(&self, line: &str) {
        (self.out)(&crate::sys::redact::scrub(line));
    }

    pub fn docker(&self) -> Docker<'_> {
        self.shared.docker(self.cfg)
    }

    /// Runs `f` holding `key`'s lock (an app, a dataset); a wait for it holds no task slot
    /// and ends on the tasks' cancel.
    pub fn exclusive<T>(
        &self,
        key: &str,
        f: impl FnOnce() -> Result<T, TaskError>,
    ) -> Result<T, TaskError> {
        let turn = self.turn.filter(|t| t.key() == key);
        let (locks, slots) = (&self.shared.locks, &self.shared.slots);
        locks.with_turn(key, turn, slots, f)?
    }
}

/// A task context over a scripted runner, for the roles' unit tests.
#[cfg(test)]
mod delivery_tests {
    use super::{Deliveries, Release};

    #[test]
    fn only_a_tracked_agent_waits_and_a_release_is_per_task_or_app() {
        let d = Deliveries::default();
        assert!(!d.expect("t0", "app"), "run-task has nobody to tell");
        d.track();
        assert!(d.expect("t1", "app") && d.expect("t2", "web"));
        assert!(!d.release(|t, _| t == "t9", Release::Delivered));
        assert!(d.release(|t, _| t == "t1", Release::Delivered));
        assert!(d.released("t1") && !d.released("t2"));
        // A takeover ends only the waits still waiting: t1's delivery stays a delivery.
        assert!(d.release(|_, _| true, Release::Superseded));
        assert_eq!(d.forget("t1"), Some(Release::Delivered));
        assert_eq!(d.forget("t2"), Some(Release::Superseded));
        assert_eq!(d.forget("t1"), None);
        assert!(!d.released("t1"));
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::cli::Args;
    use crate::sys::fake::Fake;

    pub struct Harness {
        pub cfg: Config,
        pub cp: AgentConfig,
        pub fake: Arc<Fake>,
        pub shared: Arc<Shared>,
        pub lines: Mutex<Vec<String>>,
        pub dir: PathBuf,
    }

    impl Harness {
        /// `env` adds to NODE_ROLE/DATA_DIR defaults (DEPLOY_DRAIN=0s unless given).
        pub fn new(name: &str, env: &[(&str, &str)]) -> Harness {
            let dir = crate::sys::fake::temp_dir(name);
            let data = dir.join("data").to_string_lossy().into_owned();
            let mut vars: Vec<(String, String)> = vec![
                ("DATA_DIR".into(), data),
                ("DEPLOY_DRAIN".into(), "0s".into()),
                ("DEPLOY_HEALTH_TIMEOUT".into(), "2s".into()),
            ];
            vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let lookup = move |k: &str| {
                vars.iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            let cfg = Config::load(&Args::default(), &lookup).unwrap();
            cfg.prepare_data_dir().unwrap();
            let fake = Fake::new();
            let shared = Arc::new(Shared::new(&cfg, fake.clone()));
            Harness {
                cfg,
                cp: AgentConfig::default(),
                fake,
                shared,
                lines: Mutex::default(),
                dir,
            }
        }

        /// Runs `f` with a context for a task of `kind` with `payload`.
        pub fn with<T>(
            &self,
            kind: &str,
            payload: serde_json::Value,
            f: impl FnOnce(&Ctx) -> T,
        ) -> T {
            let task = Task {
                id: "t1".into(),
                type_name: kind.into(),
                deployment_id: "dep-1".into(),
                payload,
            };
            let out = |l: &str| self.lines.lock().unwrap().push(l.to_string());
            let secrets = Scope::new();
            let ctx = Ctx {
                cfg: &self.cfg,
                cp: &self.cp,
                task: &task,
                shared: &self.shared,
                secrets: &secrets,
                out: &out,
                turn: None,
            };
            f(&ctx)
        }

        pub fn said(&self) -> String {
            self.lines.lock().unwrap().join("\n")
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.shared.retiring.wait(None);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
