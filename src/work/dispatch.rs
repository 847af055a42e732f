//! Runs one task, the same way for the agent loop and `run-task`: validates the payload,
//! dispatches on the type and turns the outcome into a completion body. Never panics on
//! input: every problem becomes a `failed` report that says what was wrong.

use crate::sys::redact;
use crate::task::{Completion, Kind, Mode, Payload};
use crate::work::ctx::Ctx;
use crate::work::error::TaskError;
use crate::work::{builder, cleanups, compose, datasets, deployer, lifecycle, spec};

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
    let with_port = |port| Completion {
        host_port: Some(port),
        ..Completion::completed()
    };
    match ctx.task.kind() {
        // Today's compose and image projects.
        Kind::Deploy(Mode::Compose) => compose::deploy(ctx).map(with_port),
        Kind::Cleanup(Mode::Compose) => compose::cleanup(ctx).map(|()| Completion::completed()),
        // A mode we do not know: say so rather than fail on a missing field.
        Kind::Deploy(Mode::Other(mode)) | Kind::Cleanup(Mode::Other(mode)) => {
            Err(TaskError::Unsupported(format!(
                "payload field `mode`: {mode:?} deployments are not supported by muvee-agent {}",
                env!("CARGO_PKG_VERSION")
            )))
        }
        Kind::Build => builder::build(ctx).map(|tag| Completion {
            image_tag: Some(tag),
            ..Completion::completed()
        }),
        Kind::Deploy(Mode::Container) => deployer::deploy(ctx).map(with_port),
        Kind::Cleanup(Mode::Container) => cleanup(ctx).map(|()| Completion::completed()),
        Kind::RuntimeLogs => lifecycle::runtime_logs(ctx).map(Completion::completed_with),
        Kind::Restart => lifecycle::restart(ctx).map(Completion::completed_with),
        Kind::Env => lifecycle::env(ctx).map(Completion::completed_with),
        Kind::Describe => lifecycle::describe(ctx).map(Completion::completed_with),
        Kind::Pause => lifecycle::pause(ctx).map(Completion::completed_with),
        Kind::Unpause => lifecycle::unpause(ctx).map(Completion::completed_with),
        Kind::Unknown(name) if name.is_empty() => {
            Err(TaskError::Invalid("task has no type".into()))
        }
        Kind::Unknown(name) => Err(unknown_type(&name)),
    }
}

pub fn unknown_type(kind: &str) -> TaskError {
    TaskError::Unsupported(format!(
        "unknown task type {kind:?}: muvee-agent {} does not run it",
        env!("CARGO_PKG_VERSION")
    ))
}

/// `cleanup` {domain_prefix}: removes the app container (a missing one is success), the
/// leftovers of an interrupted replacement, and the dataset mount dirs nothing uses. Marked
/// while it runs, so the reaper finishes a cleanup the agent could not.
fn cleanup(ctx: &Ctx) -> Result<(), TaskError> {
    let p = Payload::of(&ctx.task.payload)?;
    let prefix = spec::domain_prefix(&p)?;
    deployer::remove_app(ctx, prefix)?;
    // Not the task's deployment id: it is not trusted to name this app's mounts. The sweep
    // removes only what no container of ours uses.
    datasets::sweep_mounts(ctx.cfg, ctx.shared);
    cleanups::end(&ctx.cfg.data_dir, prefix).map_err(TaskError::io("DATA_DIR/state/cleanups"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::ctx::testing::Harness;
    use std::sync::mpsc::channel;

    /// A cleanup queued behind another task of its app marks the app only once its turn
    /// comes, and clears the mark when done.
    #[test]
    fn a_cleanup_marks_its_app_only_once_its_turn_comes() {
        let h = Harness::new("dispatch-cleanup-turn", &[]);
        let key = deployer::lock_key("app");
        let (held_tx, held) = channel();
        let (release, release_rx) = channel::<()>();
        std::thread::scope(|s| {
            let (locks, slots) = (&h.shared.locks, &h.shared.slots);
            let key = &key;
            s.spawn(move || {
                locks.with(key, slots, || {
                    held_tx.send(()).unwrap();
                    release_rx.recv()
                })
            });
            held.recv().unwrap();
            let payload = serde_json::json!({"domain_prefix": "app"});
            let cleaner = s.spawn(|| h.with("cleanup", payload, cleanup));
            std::thread::sleep(std::time::Duration::from_millis(300));
            let marked = cleanups::unfinished(&h.cfg.data_dir);
            release.send(()).unwrap();
            assert!(marked.is_empty(), "marked while another task held the app");
            assert!(cleaner.join().unwrap().is_ok());
        });
        assert!(cleanups::unfinished(&h.cfg.data_dir).is_empty());
    }
}
