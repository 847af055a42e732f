//! The one error type of task work, and the one place it becomes report text. Its `Display`
//! is the whole report text (the cause included); `source()` hands the cause itself (the
//! docker, exec or io error) to whoever needs more than the text.

use crate::sys::docker::DockerError;
use crate::sys::executor::ExecError;
use crate::sys::wait::Canceled;
use crate::task::Invalid;
use std::fmt;

#[derive(Debug)]
pub enum TaskError {
    /// Input that cannot be used (a payload field, the agent config); the text names it.
    Invalid(String),
    /// An external command failed.
    Exec(ExecError),
    /// A docker call failed.
    Docker(DockerError),
    /// File system work under DATA_DIR (or a share) failed.
    Io { what: String, err: std::io::Error },
    /// A step failed for a reason of its own (a health check, a rollback summary).
    Failed(String),
    /// `err` happened while doing `what` (see [`TaskError::context`]).
    Context { what: String, err: Box<TaskError> },
    /// A task type or deployment mode this agent does not run.
    Unsupported(String),
    /// The agent is shutting down and stopped the work.
    Canceled,
}

impl TaskError {
    pub fn io(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> TaskError {
        let what = what.to_string();
        move |err| TaskError::Io { what, err }
    }

    /// Wraps the error with what was being done (the message gets a `what: ` prefix, the
    /// error stays the source); a cancel stays a cancel.
    pub fn context(self, what: impl fmt::Display) -> TaskError {
        match self {
            e if e.is_canceled() => TaskError::Canceled,
            e => TaskError::Context {
                what: what.to_string(),
                err: Box::new(e),
            },
        }
    }

    pub fn is_canceled(&self) -> bool {
        matches!(
            self,
            TaskError::Canceled
                | TaskError::Exec(ExecError::Canceled)
                | TaskError::Docker(DockerError::Failed(ExecError::Canceled))
        )
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Invalid(m) | TaskError::Failed(m) | TaskError::Unsupported(m) => {
                f.write_str(m)
            }
            TaskError::Exec(e) => e.fmt(f),
            TaskError::Docker(e) => e.fmt(f),
            TaskError::Io { what, err } => write!(f, "{what}: {err}"),
            TaskError::Context { what, err } => write!(f, "{what}: {err}"),
            TaskError::Canceled => f.write_str("canceled: agent shutting down"),
        }
    }
}

impl std::error::Error for TaskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TaskError::Exec(e) => Some(e),
            TaskError::Docker(e) => Some(e),
            TaskError::Io { err, .. } => Some(err),
            TaskError::Context { err, .. } => Some(&**err),
            _ => None,
        }
    }
}

impl From<Invalid> for TaskError {
    fn from(e: Invalid) -> TaskError {
        TaskError::Invalid(e.0)
    }
}

impl From<Canceled> for TaskError {
    fn from(_: Canceled) -> TaskError {
        TaskError::Canceled
    }
}

impl From<ExecError> for TaskError {
    fn from(e: ExecError) -> TaskError {
        match e {
            ExecError::Canceled => TaskError::Canceled,
            e => TaskError::Exec(e),
        }
    }
}

impl From<DockerError> for TaskError {
    fn from(e: DockerError) -> TaskError {
        match e {
            DockerError::Failed(ExecError::Canceled) => TaskError::Canceled,
            e => TaskError::Docker(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::io;

    /// Every error in the chain below `e`, outermost first.
    fn chain(e: &dyn Error) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = e.source();
        while let Some(c) = cur {
            out.push(c.to_string());
            cur = c.source();
        }
        out
    }

    #[test]
    fn context_wraps_the_cause_and_keeps_the_text() {
        let spawn = ExecError::Spawn {
            name: "docker run".into(),
            err: io::Error::from(io::ErrorKind::NotFound),
        };
        let e = TaskError::from(DockerError::Failed(spawn)).context("cannot stop the container");
        assert_eq!(
            e.to_string(),
            "cannot stop the container: docker run: `docker` not found on PATH"
        );
        // Context -> TaskError::Docker -> DockerError -> ExecError -> io::Error.
        let mut bottom: &dyn Error = &e;
        while let Some(s) = bottom.source() {
            bottom = s;
        }
        let io = bottom.downcast_ref::<io::Error>().expect("an io error");
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert_eq!(chain(&e).len(), 4, "{:?}", chain(&e));
        let e = TaskError::Io {
            what: "write x".into(),
            err: io::Error::other("disk full"),
        }
        .context("dataset `d`");
        assert_eq!(e.to_string(), "dataset `d`: write x: disk full");
        assert_eq!(chain(&e), ["write x: disk full", "disk full"]);
    }

    #[test]
    fn a_cancel_stays_a_cancel_under_context() {
        assert!(matches!(
            TaskError::from(ExecError::Canceled).context("x"),
            TaskError::Canceled
        ));
        let d = TaskError::Docker(DockerError::Failed(ExecError::Canceled));
        assert!(matches!(d.context("y"), TaskError::Canceled));
    }
}
