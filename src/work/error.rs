//! The one error type of task work, and the one place it becomes report text.

use crate::sys::docker::DockerError;
use crate::sys::executor::ExecError;
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

    /// Prefixes the message with what was being done; a cancel stays a cancel.
    pub fn context(self, what: impl fmt::Display) -> TaskError {
        match self {
            TaskError::Canceled => TaskError::Canceled,
            e if e.is_canceled() => TaskError::Canceled,
            e => TaskError::Failed(format!("{what}: {e}")),
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
            TaskError::Canceled => f.write_str("canceled: agent shutting down"),
        }
    }
}

impl From<Invalid> for TaskError {
    fn from(e: Invalid) -> TaskError {
        TaskError::Invalid(e.0)
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
