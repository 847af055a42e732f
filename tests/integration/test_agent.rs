//! The agent under test, started in the foreground by one builder:
//! `TestAgent::builder("deploy").cp(&cp).env("K", "v").start()`.
//! By default external commands are the PATH shims of tests/fixtures/bin (they log their
//! calls); `real_docker()` gives the agent the real engine instead.

use crate::fake_cp::FakeCp;
use crate::util::{self, temp_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub const SECRET: &str = "agent-secret-5b1e9d";

pub fn shims() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bin")
}

/// PATH for an agent without the shims.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub struct TestAgent {
    pub child: Child,
    pub dir: PathBuf,
    log: PathBuf,
}

/// How to start a [`TestAgent`]; see [`TestAgent::builder`].
pub struct AgentBuilder {
    role: String,
    url: String,
    dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
}

impl TestAgent {
    /// An agent of `role`; give it a control plane with [`AgentBuilder::cp`] or
    /// [`AgentBuilder::url`].
    pub fn builder(role: &str) -> AgentBuilder {
        AgentBuilder {
            role: role.into(),
            url: String::new(),
            dir: None,
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The shims' calls, one line each (`docker rm -f …`).
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    pub fn signal(&self, sig: i32) {
        util::signal(self.child.id() as i32, sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        util::poll_for(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl AgentBuilder {
    /// CONTROL_PLANE_URL: the fake control plane's.
    pub fn cp(self, cp: &FakeCp) -> Self {
        self.url(&cp.url())
    }

    /// CONTROL_PLANE_URL as given.
    pub fn url(mut self, url: &str) -> Self {
        self.url = url.into();
        self
    }

    /// The agent's home: HOME, DATA_DIR (`data/`), its log and the shims' records. A second
    /// agent on the same dir is the first one restarted. Default: a fresh temp dir.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// One more environment variable (or a default replaced).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs(self, vars: &[(&str, &str)]) -> Self {
        vars.iter().fold(self, |b, (k, v)| b.env(k, v))
    }

    /// The real Docker engine through the test CLI instead of the shims.
    pub fn real_docker(self) -> Self {
        let cli = which(&util::docker_cli());
        self.env("PATH", SYSTEM_PATH).env("DOCKER_CLI", &cli)
    }

    /// Runs the agent as the last argument of `argv` (e.g. unshare).
    pub fn wrapped_in(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Starts the agent in the foreground, its stderr to `<dir>/agent.<n>.log`. Started
    /// again with the same dir, it is the same node restarted.
    pub fn start(&self) -> TestAgent {
        util::become_subreaper();
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| temp_dir(&format!("agent-{}", self.role)));
        let log = unique(dir.join("agent.log"));
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(util::bin());
                c
            }
            None => Command::new(util::bin()),
        };
        cmd.env_clear()
            .env("PATH", format!("{}:{SYSTEM_PATH}", shims().display()))
            .env("HOME", &dir)
            .env("NODE_ROLE", &self.role)
            .env("CONTROL_PLANE_URL", &self.url)
            .env("AGENT_SECRET", SECRET)
            .env("DATA_DIR", dir.join("data"))
            .env("NODE_NAME", dir.file_name().unwrap())
            .env("POLL_INTERVAL", "200ms")
            .env("HEARTBEAT_INTERVAL", "2s")
            .env("MUVEE_LOG", "debug")
            .env("FAKE_LOG", dir.join("calls.log"))
            .env("FAKE_PIDFILE", dir.join("pids"));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(f).spawn().unwrap();
        TestAgent { child, dir, log }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims left behind by a killed agent. Only process groups whose leader is still our
        // docker shim are killed: a recycled pid must never take an unrelated group with it.
        let shim = shims().join("docker");
        for pid in std::fs::read_to_string(self.dir.join("pids"))
            .unwrap_or_default()
            .lines()
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(shim.to_str().unwrap());
            match pid.parse::<i32>() {
                Ok(p) if ours && p > 1 => util::signal(-p, libc::SIGKILL),
                _ => {}
            }
        }
    }
}

fn unique(p: PathBuf) -> PathBuf {
    let mut n = 0;
    loop {
        let c = p.with_extension(format!("{n}.log"));
        if !c.exists() {
            return c;
        }
        n += 1;
    }
}

/// The absolute path of `prog` as the test's PATH finds it (the agent's PATH differs).
pub fn which(prog: &str) -> String {
    if prog.contains('/') {
        return prog.to_string();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
