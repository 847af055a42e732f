//! Runs one task, the same way for the agent loop and `run-task`: validates the payload,
//! dispatches on the type and turns the outcome into a completion body. Never panics on
//! input: every problem becomes a `failed` report that says what was wrong.

use crate::config::Config;
use crate::executor::{self, Cmd};
use crate::wire::{AgentConfig, Completion, Payload, Task};
use crate::{builder, deployer, signal};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

/// State shared by all tasks of one agent process.
#[derive(Default)]
pub struct Shared {
    pub build_slots: Semaphore,
    pub locks: KeyedLocks,
}

impl Shared {
    pub fn new(cfg: &Config) -> Shared {
        Shared {
            build_slots: Semaphore::new(cfg.builder_max_concurrent),
            locks: KeyedLocks::default(),
        }
    }
}

/// Everything a task handler needs.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub cp: &'a AgentConfig,
    pub task: &'a Task,
    pub shared: &'a Shared,
    /// Receives every line meant for the deployment log (already scrubbed).
    pub out: &'a (dyn Fn(&str) + Sync),
}

impl Ctx<'_> {
    /// A line of our own (not a child's) for the deployment log.
    pub fn say(&self, line: &str) {
        (self.out)(&crate::redact::scrub(line));
    }

    /// Runs a command, streaming its output into the deployment log.
    pub fn run(&self, cmd: &Cmd) -> Result<executor::Output, executor::ExecError> {
        executor::run(cmd, &mut |_, line| (self.out)(line))
    }
}

pub fn execute(ctx: &Ctx) -> Completion {
    let mode = ctx
        .task
        .payload
        .get("mode")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let result = match ctx.task.kind.as_str() {
        // Today's compose and image projects: say so rather than fail on a missing field.
        "deploy" | "cleanup" if !mode.is_empty() => Err(format!(
            "payload field `mode`: {mode:?} deployments are not supported by muvee-agent {}",
            env!("CARGO_PKG_VERSION")
        )),
        "build" => builder::build(ctx).map(|tag| Completion {
            image_tag: Some(tag),
            ..Completion::completed()
        }),
        "deploy" => deployer::deploy(ctx).map(|port| Completion {
            host_port: Some(port),
            ..Completion::completed()
        }),
        "cleanup" => cleanup(ctx).map(|()| Completion::completed()),
        "" => Err("task has no type".to_string()),
        other => Err(format!(
            "unknown task type {other:?}: muvee-agent {} does not run it",
            env!("CARGO_PKG_VERSION")
        )),
    };
    match result {
        Ok(c) => c,
        // A command killed by our own shutdown says so, whatever step it was in.
        Err(_) if signal::cancel_requested() => Completion::failed("canceled: agent shutting down"),
        Err(reason) => Completion::failed(reason),
    }
}

/// Task types muvee-agent runs (on the role that serves them).
pub fn known_type(kind: &str) -> bool {
    matches!(kind, "build" | "deploy" | "cleanup")
}

/// `cleanup` {domain_prefix}: removes the app container (a missing one is success), the
/// leftovers of an interrupted replacement, and the deployment's dataset mount dir.
pub fn cleanup(ctx: &Ctx) -> Result<(), String> {
    let p = Payload::of(&ctx.task.payload)?;
    let prefix = deployer::domain_prefix(&p)?;
    deployer::remove_app(ctx, prefix)?;
    if !ctx.task.deployment_id.is_empty() {
        crate::datasets::remove_mounts(&ctx.cfg.data_dir, &ctx.task.deployment_id)?;
    }
    Ok(())
}

/// A counting semaphore (BUILDER_MAX_CONCURRENT).
pub struct Semaphore {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Default for Semaphore {
    fn default() -> Semaphore {
        Semaphore::new(1)
    }
}

pub struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    pub fn new(n: usize) -> Semaphore {
        Semaphore {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }
    /// Waits for a slot; None when the agent is canceling tasks.
    pub fn acquire(&self) -> Option<Permit<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            if signal::cancel_requested() {
                return None;
            }
            free = self
                .cv
                .wait_timeout(free, std::time::Duration::from_millis(200))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *free -= 1;
        Some(Permit(self))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

/// One mutex per key (a domain prefix, a dataset): serializes work on the same thing.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl KeyedLocks {
    pub fn with<T>(&self, key: &str, f: impl FnOnce() -> T) -> T {
        let m = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let _g = m.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}
