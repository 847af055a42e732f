//! The two long-lived agents (builder and deploy), each in a session of its own so that
//! whatever it starts can be found (and, at the end, must be gone). Started, killed, asked to
//! stop and restarted as the plan says; an agent that exits by itself is restarted as the
//! shipped systemd unit would (`Restart=on-failure`, `RestartSec=5s`,
//! `RestartPreventExitStatus=2`).

use crate::hist::{Ev, History};
use crate::plan::Role;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/muvee-agent");

/// The agent binary: this tree's release build, or `CHAOS_AGENT` (e.g. a deliberately broken
/// build, to see an invariant fail).
pub fn agent_bin() -> String {
    std::env::var("CHAOS_AGENT")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| AGENT.into())
}
pub const POLL_MS: u64 = 1000;
pub const MAX_TASKS: usize = 4;
pub const GRACE_SECS: u64 = 20;
/// The unit's `RestartSec`.
const RESTART_SEC: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Proc {
    child: Option<Child>,
    /// Every pid this role ran (each the id of its session).
    sessions: Vec<u32>,
    /// We are killing or stopping it: its exit is not the supervisor's business.
    ours: bool,
    /// Exited by itself: restart then (None: stays down, as after status 2).
    restart_at: Option<Instant>,
}

pub struct Agents {
    /// Each role's environment (the agent's is cleared first).
    env: [Vec<(String, String)>; 2],
    logs: PathBuf,
    procs: [Mutex<Proc>; 2],
    hist: Arc<History>,
}

fn idx(role: Role) -> usize {
    match role {
        Role::Builder => 0,
        Role::Deploy => 1,
    }
}

pub fn signal(pid: u32, sig: i32) {
    // Only ever a positive pid: never a group, never -1.
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            // SAFETY: plain syscall with integer arguments.
            unsafe { libc::kill(p, sig) };
        }
    }
}

impl Agents {
    pub fn new(env: [Vec<(String, String)>; 2], logs: PathBuf, hist: Arc<History>) -> Agents {
        Agents {
            env,
            logs,
            procs: Default::default(),
            hist,
        }
    }

    pub fn log_path(&self, role: Role) -> PathBuf {
        self.logs.join(format!("agent-{}.log", role.name()))
    }

    fn lock(&self, role: Role) -> std::sync::MutexGuard<'_, Proc> {
        self.procs[idx(role)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn start(&self, role: Role) {
        let mut p = self.lock(role);
        if p.child.is_some() {
            return;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(role));
        let Ok(mut log) = log else {
            self.hist
                .note(format!("cannot open the {} log", role.name()));
            return;
        };
        let _ = writeln!(log, "=== chaos: start at +{}ms", self.hist.clock.ms());
        let mut cmd = Command::new(agent_bin());
        cmd.env_clear()
            .envs(self.env[idx(role)].iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                p.sessions.push(pid);
                p.child = Some(child);
                p.ours = false;
                p.restart_at = None;
                self.hist.push(Ev::AgentUp { role, pid });
            }
            Err(e) => self
                .hist
                .note(format!("cannot start the {} agent: {e}", role.name())),
        }
    }

    pub fn pid(&self, role: Role) -> Option<u32> {
        self.lock(role).child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` to the running agent (marking its exit as ours); its pid.
    pub fn signal(&self, role: Role, sig: i32, how: &str) -> Option<u32> {
        let mut p = self.lock(role);
        let pid = p.child.as_ref()?.id();
        p.ours = true;
        signal(pid, sig);
        let how = how.to_string();
        self.hist.push(Ev::AgentDown { role, pid, how });
        Some(pid)
    }

    /// Waits up to `limit` for the agent to exit; its status (None: still running).
    pub fn wait_exit(&self, role: Role, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            {
                let mut p = self.lock(role);
                let Some(child) = p.child.as_mut() else {
                    return Some(ExitStatus::from_raw(0));
                };
                if let Ok(Some(st)) = child.try_wait() {
                    p.child = None;
                    return Some(st);
                }
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The supervisor's round: notices agents that exited by themselves, and restarts them
    /// when the unit would.
    pub fn supervise(&self) {
        for role in [Role::Builder, Role::Deploy] {
            let due = {
                let mut p = self.lock(role);
                if !p.ours {
                    self.notice_exit(role, &mut p);
                }
                p.restart_at.is_some_and(|t| Instant::now() >= t)
            };
            if due {
                self.start(role);
            }
        }
    }

    fn notice_exit(&self, role: Role, p: &mut Proc) {
        let Some(child) = p.child.as_mut() else {
            return;
        };
        let pid = child.id();
        let Ok(Some(st)) = child.try_wait() else {
            return;
        };
        p.child = None;
        let restart = !matches!(st.code(), Some(0) | Some(2));
        let how = format!(
            "exited by itself ({st}){}",
            if restart {
                ", restarted in 5 s as by systemd"
            } else {
                "; systemd would not restart it"
            }
        );
        self.hist
            .note(format!("{} agent (pid {pid}) {how}", role.name()));
        self.hist.push(Ev::AgentDown { role, pid, how });
        p.restart_at = restart.then(|| Instant::now() + RESTART_SEC);
    }

    /// Resident memory of the running agents, in KiB.
    pub fn rss(&self) -> Vec<(Role, u32, u64)> {
        let mut out = Vec::new();
        for role in [Role::Builder, Role::Deploy] {
            let Some(pid) = self.pid(role) else { continue };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            if let Some(kib) = kib {
                out.push((role, pid, kib));
            }
        }
        out
    }

    pub fn sessions(&self) -> Vec<u32> {
        let mut all = self.lock(Role::Builder).sessions.clone();
        all.extend(self.lock(Role::Deploy).sessions.iter());
        all
    }

    /// Ends whatever still runs in the agents' sessions (the agents first), by pid.
    pub fn kill_all(&self) {
        for role in [Role::Builder, Role::Deploy] {
            if let Some(pid) = self.pid(role) {
                signal(pid, libc::SIGKILL);
                let _ = self.wait_exit(role, Duration::from_secs(5));
            }
        }
        for (pid, _) in in_sessions(&self.sessions()) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// Live processes (pid, command line) whose session is one of `sessions`.
pub fn in_sessions(sessions: &[u32]) -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // After "(comm) ": state ppid pgrp session ...
        let Some(rest) = stat.rsplit_once(") ").map(|r| r.1) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let sid = f.get(3).and_then(|s| s.parse::<u32>().ok());
        if f.first() != Some(&"Z") && sid.is_some_and(|s| sessions.contains(&s)) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.push((pid, cmd.trim().to_string()));
        }
    }
    out
}
