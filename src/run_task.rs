//! `muvee-agent run-task`: one task, locally, through the same code as the agent loop.
//! Input is a task as the control plane sends it, or a bare payload with `--type`.
//! Logs go to stderr, the completion body to stdout. Exit 0 completed, 1 failed, 2 bad input.

use crate::cli::RunTaskArgs;
use crate::config::{process_env, Config};
use crate::sys::executor::System;
use crate::sys::{redact, signal};
use crate::task::{AgentConfig, Kind, Status, Task};
use crate::work::ctx::{Ctx, Shared};
use crate::work::dispatch;
use serde_json::Value;
use std::io::{Read, Write};
use std::sync::Arc;

pub fn run(cfg: Config, args: &RunTaskArgs) -> u8 {
    match prepare(&cfg, args) {
        Ok((task, cp)) => execute(&cfg, &task, &cp),
        Err(e) => {
            eprintln!("muvee-agent run-task: {}", redact::scrub(&e));
            2
        }
    }
}

fn prepare(cfg: &Config, args: &RunTaskArgs) -> Result<(Task, AgentConfig), String> {
    let text = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("--file: cannot read {:?}: {e}", args.file))?
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("input is not JSON: {e}"))?;
    let is_task = v.get("ID").is_some() || v.get("Type").is_some() || v.get("Payload").is_some();
    let task = match (&args.kind, is_task) {
        (None, true) => {
            serde_json::from_value::<Task>(v).map_err(|e| format!("malformed task: {e}"))?
        }
        (Some(kind), false) if matches!(Kind::parse(kind, ""), Kind::Unknown(_)) => {
            return Err(format!(
                "--type {kind:?} is not a task type muvee-agent runs ({})",
                Kind::known_names()
            ))
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
        (Some(_), true) => {
            return Err("--type is for a bare payload, but the input is a whole task".into())
        }
        (None, false) => {
            return Err(
                "input is not a task (ID, Type, Payload); pass --type for a bare payload".into(),
            )
        }
    };
    let mut cp: AgentConfig = match &args.agent_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--agent-config: cannot read {path:?}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("--agent-config {path:?}: {e}"))?
        }
        None => AgentConfig::default(),
    };
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
    pick(&None, "REGISTRY_PASSWORD", &mut cp.registry_password);
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
    redact::add(&cp.registry_password);
    cfg.prepare_data_dir().map_err(|e| e.0)?;
    Ok((task, cp))
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

/// Task output on stderr, buffered and flushed every 100 ms: one write per line would make a
/// build that prints 200k lines measurably slower than the same build run by hand.
struct StderrLines {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl StderrLines {
    fn start() -> StderrLines {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = buf.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            flush_buf(&b);
        });
        StderrLines { buf }
    }
    fn line(&self, line: &str) {
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        b.extend_from_slice(line.as_bytes());
        b.push(b'\n');
        if b.len() >= 1 << 16 {
            let _ = std::io::stderr().write_all(&std::mem::take(&mut *b));
        }
    }
    fn flush(&self) {
        flush_buf(&self.buf);
    }
}

fn flush_buf(buf: &std::sync::Mutex<Vec<u8>>) {
    let data = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
    if !data.is_empty() {
        let _ = std::io::stderr().write_all(&data);
    }
}
