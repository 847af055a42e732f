//! `muvee-agent run-task`: one task, locally, through the same code as the agent loop.
//! Input is a task as the control plane sends it, or a bare payload with `--type`.
//! Logs go to stderr, the completion body to stdout. Exit 0 completed, 1 failed, 2 bad input.

use crate::cli::RunTaskArgs;
use crate::config::{process_env, Config, ConfigError};
use crate::sys::executor::System;
use crate::sys::secret::Secret;
use crate::sys::wait::{self, Bell, Stop};
use crate::sys::{redact, signal};
use crate::task::{AgentConfig, Kind, Status, Task};
use crate::work::ctx::{Ctx, Shared};
use crate::work::dispatch;
use serde_json::Value;
use std::fmt;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn run(cfg: Config, args: &RunTaskArgs) -> u8 {
    match prepare(&cfg, args) {
        Ok((task, cp)) => execute(&cfg, &task, &cp),
        Err(e) => {
            eprintln!("muvee-agent run-task: {}", redact::scrub(&e.to_string()));
            2
        }
    }
}

/// Why run-task could not start the task (exit status 2).
#[derive(Debug)]
pub enum RunTaskError {
    Stdin(std::io::Error),
    /// `--file` or `--agent-config` cannot be read.
    Read {
        flag: &'static str,
        path: String,
        err: std::io::Error,
    },
    NotJson(serde_json::Error),
    MalformedTask(serde_json::Error),
    AgentConfig {
        path: String,
        err: serde_json::Error,
    },
    UnknownType(String),
    TypeWithTask,
    NotATask,
    Config(ConfigError),
}

impl fmt::Display for RunTaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunTaskError::Stdin(e) => write!(f, "cannot read stdin: {e}"),
            RunTaskError::Read { flag, path, err } => {
                write!(f, "{flag}: cannot read {path:?}: {err}")
            }
            RunTaskError::NotJson(e) => write!(f, "input is not JSON: {e}"),
            RunTaskError::MalformedTask(e) => write!(f, "malformed task: {e}"),
            RunTaskError::AgentConfig { path, err } => write!(f, "--agent-config {path:?}: {err}"),
            RunTaskError::UnknownType(kind) => write!(
                f,
                "--type {kind:?} is not a task type muvee-agent runs ({})",
                Kind::known_names()
            ),
            RunTaskError::TypeWithTask => {
                f.write_str("--type is for a bare payload, but the input is a whole task")
            }
            RunTaskError::NotATask => f.write_str(
                "input is not a task (ID, Type, Payload); pass --type for a bare payload",
            ),
            RunTaskError::Config(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RunTaskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunTaskError::Stdin(e) | RunTaskError::Read { err: e, .. } => Some(e),
            RunTaskError::NotJson(e)
            | RunTaskError::MalformedTask(e)
            | RunTaskError::AgentConfig { err: e, .. } => Some(e),
            RunTaskError::Config(e) => Some(e),
            RunTaskError::UnknownType(_) | RunTaskError::TypeWithTask | RunTaskError::NotATask => {
                None
            }
        }
    }
}

fn prepare(cfg: &Config, args: &RunTaskArgs) -> Result<(Task, AgentConfig), RunTaskError> {
    let text = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(RunTaskError::Stdin)?;
        s
    } else {
        std::fs::read_to_string(&args.file).map_err(|err| RunTaskError::Read {
            flag: "--file",
            path: args.file.clone(),
            err,
        })?
    };
    let v: Value = serde_json::from_str(&text).map_err(RunTaskError::NotJson)?;
    let is_task = v.get("ID").is_some() || v.get("Type").is_some() || v.get("Payload").is_some();
    let task = match (&args.kind, is_task) {
        (None, true) => serde_json::from_value::<Task>(v).map_err(RunTaskError::MalformedTask)?,
        (Some(kind), false) if matches!(Kind::parse(kind, ""), Kind::Unknown(_)) => {
            return Err(RunTaskError::UnknownType(kind.clone()))
        }
        (Some(kind), false) => Task {
            id: "local".into(),
            type_name: kind.clone(),
            deployment_id: v
                .get("deployment_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            payload: v,
        },
        (Some(_), true) => return Err(RunTaskError::TypeWithTask),
        (None, false) => return Err(RunTaskError::NotATask),
    };
    let mut cp = agent_config(args)?;
    let pick = |flag: &Option<String>, var: &str, cur: &mut String| {
        if let Some(v) = flag
            .clone()
            .or_else(|| process_env(var))
            .filter(|v| !v.is_empty())
        {
            *cur = v;
        }
    };
    pick(&args.registry_addr, "REGISTRY_ADDR", &mut cp.registry_addr);
    pick(&args.registry_user, "REGISTRY_USER", &mut cp.registry_user);
    if let Some(v) = process_env("REGISTRY_PASSWORD").filter(|v| !v.is_empty()) {
        cp.registry_password = Secret::new(v);
    }
    pick(
        &args.dataset_nfs_base_path,
        "DATASET_NFS_BASE_PATH",
        &mut cp.dataset_nfs_base_path,
    );
    pick(
        &args.volume_nfs_base_path,
        "VOLUME_NFS_BASE_PATH",
        &mut cp.volume_nfs_base_path,
    );
    redact::add(cp.registry_password.expose());
    cfg.prepare_data_dir().map_err(RunTaskError::Config)?;
    Ok((task, cp))
}

/// `--agent-config FILE` (the control plane's agent config as JSON), else empty.
fn agent_config(args: &RunTaskArgs) -> Result<AgentConfig, RunTaskError> {
    let Some(path) = &args.agent_config else {
        return Ok(AgentConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|err| RunTaskError::Read {
        flag: "--agent-config",
        path: path.clone(),
        err,
    })?;
    serde_json::from_str(&text).map_err(|err| RunTaskError::AgentConfig {
        path: path.clone(),
        err,
    })
}

fn execute(cfg: &Config, task: &Task, cp: &AgentConfig) -> u8 {
    let shared = Arc::new(Shared::new(cfg, Arc::new(System)));
    // A second signal cuts a deploy's drain wait short.
    signal::watch(shared.bell.clone());
    if !cp.registry_user.is_empty()
        && !cp.registry_password.is_empty()
        && !cp.registry_addr.is_empty()
    {
        let docker = shared.docker(cfg);
        if let Err(e) = docker.login(&cp.registry_addr, &cp.registry_user, &cp.registry_password) {
            log::error!("docker login to {} failed: {e}", cp.registry_addr);
        }
    }
    let err = StderrLines::start();
    let out = |line: &str| err.line(line);
    let secrets = redact::Scope::new();
    let ctx = Ctx {
        cfg,
        cp,
        task,
        shared: &shared,
        secrets: &secrets,
        out: &out,
        turn: None,
    };
    let completion = dispatch::execute(&ctx);
    err.flush();
    let body = serde_json::to_string(&completion).unwrap_or_default();
    let _ = writeln!(std::io::stdout(), "{body}");
    // A deploy's previous container is drained and removed after the report.
    shared.retiring.wait(None);
    if completion.status == Status::Completed {
        0
    } else {
        1
    }
}

/// Task output on stderr, buffered and flushed 100 ms after the first unflushed line: one
/// write per line would make a build that prints 200k lines measurably slower than the same
/// build run by hand. The flusher sleeps while there is nothing to write.
struct StderrLines {
    buf: Arc<Mutex<Vec<u8>>>,
    bell: Arc<Bell>,
}

impl StderrLines {
    fn start() -> StderrLines {
        let (buf, bell) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Bell::default()));
        let (b, r) = (buf.clone(), bell.clone());
        let pending = move || !b.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        let b = buf.clone();
        std::thread::spawn(move || loop {
            wait::until(&r, None, Stop::Never, &pending);
            wait::pause(&r, Instant::now() + Duration::from_millis(100), Stop::Never);
            flush_buf(&b);
        });
        StderrLines { buf, bell }
    }
    fn line(&self, line: &str) {
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let first = b.is_empty();
        b.extend_from_slice(line.as_bytes());
        b.push(b'\n');
        if b.len() >= 1 << 16 {
            let _ = std::io::stderr().write_all(&std::mem::take(&mut *b));
        }
        drop(b);
        if first {
            self.bell.ring();
        }
    }
    fn flush(&self) {
        flush_buf(&self.buf);
    }
}

fn flush_buf(buf: &Mutex<Vec<u8>>) {
    let data = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
    if !data.is_empty() {
        let _ = std::io::stderr().write_all(&data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn input_errors_keep_their_cause_and_their_text() {
        let args = RunTaskArgs {
            file: "/nonexistent/task.json".into(),
            ..RunTaskArgs::default()
        };
        let cfg = Config::load(&crate::cli::Args::default(), &|_| None).unwrap();
        let e = prepare(&cfg, &args).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--file: cannot read \"/nonexistent/task.json\": "),
            "{e}"
        );
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
        let e = RunTaskError::UnknownType("bild".into());
        assert!(e
            .to_string()
            .starts_with("--type \"bild\" is not a task type muvee-agent runs ("));
        assert!(e.source().is_none());
    }
}
