//! Runs one task, the same way for the agent loop and `run-task`: validates the payload,
//! dispatches on the type and turns the outcome into a completion body. Never panics on
//! input: every problem becomes a `failed` report that says what was wrong.

use crate::config::Role;
use crate::cp::wire::{Completion, Payload};
use crate::sys::redact;
use crate::work::ctx::Ctx;
use crate::work::error::TaskError;
use crate::work::{builder, cleanups, compose, datasets, deployer, lifecycle};

pub fn execute(ctx: &Ctx) -> Completion {
    ctx.shared
        .tasks_started
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    match run(ctx) {
        Ok(c) => c,
        Err(e) => report(&e),
    }
}

/// The one place a task error becomes report text; our own messages may quote payload
/// values, so they are scrubbed like every output line.
pub fn report(e: &TaskError) -> Completion {
    Completion::failed(redact::scrub(&e.to_string()))
}

fn run(ctx: &Ctx) -> Result<Completion, TaskError> {
    let mode = ctx
        .task
        .payload
        .get("mode")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    match ctx.task.kind.as_str() {
        // Today's compose and image projects.
        "deploy" if mode == "compose" => compose::deploy(ctx).map(|port| Completion {
            host_port: Some(port),
            ..Completion::completed()
        }),
        "cleanup" if mode == "compose" => compose::cleanup(ctx).map(|()| Completion::completed()),
        // A mode we do not know: say so rather than fail on a missing field.
        "deploy" | "cleanup" if !mode.is_empty() => Err(TaskError::Unsupported(format!(
            "payload field `mode`: {mode:?} deployments are not supported by muvee-agent {}",
            env!("CARGO_PKG_VERSION")
        ))),
        "build" => builder::build(ctx).map(|tag| Completion {
            image_tag: Some(tag),
            ..Completion::completed()
        }),
        "deploy" => deployer::deploy(ctx).map(|port| Completion {
            host_port: Some(port),
            ..Completion::completed()
        }),
        "cleanup" => cleanup(ctx).map(|()| Completion::completed()),
        "runtime_logs" => lifecycle::runtime_logs(ctx).map(Completion::completed_with),
        "restart" => lifecycle::restart(ctx).map(Completion::completed_with),
        "env" => lifecycle::env(ctx).map(Completion::completed_with),
        "describe" => lifecycle::describe(ctx).map(Completion::completed_with),
        "pause" => lifecycle::pause(ctx).map(Completion::completed_with),
        "unpause" => lifecycle::unpause(ctx).map(Completion::completed_with),
        "" => Err(TaskError::Invalid("task has no type".into())),
        other => Err(unknown_type(other)),
    }
}

pub fn unknown_type(kind: &str) -> TaskError {
    TaskError::Unsupported(format!(
        "unknown task type {kind:?}: muvee-agent {} does not run it",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Task types muvee-agent runs (on the role that serves them).
pub fn known_type(kind: &str) -> bool {
    Role::Builder.serves(kind) || Role::Deploy.serves(kind)
}

/// `cleanup` {domain_prefix}: removes the app container (a missing one is success), the
/// leftovers of an interrupted replacement, and the deployment's dataset mount dir. Marked
/// while it runs, so the reaper finishes a cleanup the agent could not.
fn cleanup(ctx: &Ctx) -> Result<(), TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let prefix = deployer::domain_prefix(&p)?;
    let data = &ctx.cfg.data_dir;
    let mark = "DATA_DIR/state/cleanups";
    cleanups::begin(data, prefix).map_err(TaskError::io(mark))?;
    deployer::remove_app(ctx, prefix)?;
    if !ctx.task.deployment_id.is_empty() {
        datasets::remove_mounts(data, &ctx.task.deployment_id)?;
    }
    cleanups::end(data, prefix).map_err(TaskError::io(mark))
}
