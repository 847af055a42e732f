//! What every task handler gets: settings, the control plane's agent config, the task, the
//! state shared by all tasks of this process, and where its output lines go. Below the roles:
//! they depend on it, never on each other through it.

use crate::config::Config;
use crate::cp::wire::{AgentConfig, Task};
use crate::sys::docker::{BuildMode, Docker};
use crate::sys::executor::Runner;
use crate::sys::sync::{Bell, Jobs, KeyedLocks, Semaphore};
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
    pub locks: KeyedLocks,
    /// Old containers draining after a replacement, by domain prefix.
    pub retiring: Jobs,
    /// How this host builds images: probed once, at start or at the first build.
    pub build_mode: OnceLock<BuildMode>,
    /// Numbers this process's build dirs.
    pub build_seq: AtomicUsize,
    pub cache: CacheBook,
}

impl Shared {
    pub fn new(cfg: &Config, runner: Arc<dyn Runner>) -> Shared {
        let bell = Arc::new(Bell::default());
        Shared {
            runner,
            build_slots: Semaphore::new(cfg.builder_max_concurrent, bell.clone()),
            bell,
            locks: KeyedLocks::default(),
            retiring: Jobs::default(),
            build_mode: OnceLock::new(),
            build_seq: AtomicUsize::new(0),
            cache: CacheBook::default(),
        }
    }

    pub fn docker<'a>(&'a self, cfg: &'a Config) -> Docker<'a> {
        Docker::new(&cfg.docker_cli, &*self.runner)
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
    /// Receives every line meant for the deployment log (already scrubbed).
    pub out: &'a (dyn Fn(&str) + Sync),
}

impl Ctx<'_> {
    /// A line of our own (not a child's) for the deployment log.
    pub fn say(&self, line: &str) {
        (self.out)(&crate::sys::redact::scrub(line));
    }

    pub fn docker(&self) -> Docker<'_> {
        self.shared.docker(self.cfg)
    }
}
