//! `muvee-agent check`: verifies this host can do its role. One line per check:
//! `ok`, `warn` or `error`, with a fix for anything not ok. Exit 1 on any error.

use crate::config::{Config, Role};
use crate::cp::client::Client;
use crate::cp::wire::AgentConfig;
use crate::sys::docker::{BuildMode, Docker};
use crate::sys::executor::{self, Cmd, ExecError, System};
use std::fmt;
use std::time::Duration;

struct Report {
    errors: usize,
}

impl Report {
    fn ok(&self, what: &str, msg: &str) {
        println!("ok    {what}: {msg}");
    }
    fn warn(&self, what: &str, msg: &str, fix: &str) {
        println!("warn  {what}: {msg}\n      fix: {fix}");
    }
    fn error(&mut self, what: &str, msg: &str, fix: &str) {
        self.errors += 1;
        println!("error {what}: {msg}\n      fix: {fix}");
    }
    /// `ok` with the message, or `error` with the failure and the fix.
    fn check(&mut self, what: &str, res: Result<String, impl fmt::Display>, fix: &str) {
        match res {
            Ok(msg) => self.ok(what, &msg),
            Err(e) => self.error(what, &e.to_string(), fix),
        }
    }
}

/// The first line of a command's stdout.
fn probe(program: &str, args: &[&str]) -> Result<String, ExecError> {
    let cmd = Cmd::new(program)
        .args(args.iter().copied())
        .timeout(Duration::from_secs(20), "check timeout");
    executor::output(&cmd).map(|o| o.stdout.lines().next().unwrap_or("").trim().to_string())
}

pub fn run(cfg: &Config) -> u8 {
    let mut r = Report { errors: 0 };
    tools(&mut r, cfg);
    local_setup(&mut r, cfg);
    control_plane(&mut r, cfg);
    u8::from(r.errors > 0)
}

/// git, docker (see [`docker`]), and rsync on nodes that may deploy.
fn tools(r: &mut Report, cfg: &Config) {
    let git = probe("git", &["--version"]);
    r.check("git", git, "install git (apt-get install git)");
    docker(r, cfg);
    if cfg.role != Some(Role::Builder) {
        let rsync = probe("rsync", &["--version"]);
        r.check(
            "rsync",
            rsync,
            "install rsync (needed for dependency datasets)",
        );
    }
}

/// The docker CLI, the daemon behind it, and buildx on nodes that may build.
fn docker(r: &mut Report, cfg: &Config) {
    let docker = cfg.docker_cli.as_str();
    let cli = probe(docker, &["version", "--format", "{{.Client.Version}}"]);
    r.check(
        "docker CLI",
        cli.map(|v| format!("{docker} {v}")),
        "install the docker CLI or set DOCKER_CLI",
    );
    let daemon = probe(docker, &["info", "--format", "{{.ServerVersion}}"]);
    r.check(
        "docker daemon",
        daemon.map(|v| format!("engine {v}")),
        "start dockerd and check access to its socket (DOCKER_HOST)",
    );
    if cfg.role != Some(Role::Deploy) {
        match Docker::new(docker, &System).detect_build_mode() {
            BuildMode::Buildx => r.ok("buildx", "docker buildx available"),
            mode => r.warn(
                "buildx",
                &format!("no buildx plugin; builds use {}", mode.describe()),
                "install the docker-buildx plugin for --platform and --push builds",
            ),
        }
    }
}

/// DATA_DIR writable, NODE_ROLE set, AGENT_SECRET not empty.
fn local_setup(r: &mut Report, cfg: &Config) {
    let data_dir = cfg
        .prepare_data_dir()
        .map(|()| format!("{} is writable", cfg.data_dir.display()));
    r.check(
        "DATA_DIR",
        data_dir,
        "create the directory or set DATA_DIR to a writable path",
    );
    match cfg.role {
        Some(role) => r.ok("NODE_ROLE", role.as_str()),
        None => r.error(
            "NODE_ROLE",
            "not set",
            "set NODE_ROLE=builder or NODE_ROLE=deploy",
        ),
    }
    if cfg.agent_secret.is_empty() {
        r.warn(
            "AGENT_SECRET",
            "empty",
            "set AGENT_SECRET to the control plane's secret",
        );
    }
}

/// The control plane accepts the secret; then a registry login with the credentials it hands out.
fn control_plane(r: &mut Report, cfg: &Config) {
    let url = &cfg.control_plane_url;
    match Client::new(url, &cfg.agent_secret).config() {
        Ok(c) => {
            r.ok(
                "control plane",
                &format!("{url} reachable, secret accepted"),
            );
            registry_login(r, cfg, &c);
        }
        Err(e) => r.error(
            "control plane",
            &e.to_string(),
            "check CONTROL_PLANE_URL and AGENT_SECRET",
        ),
    }
}

/// Logs in to the registry the control plane names, when it hands out credentials.
fn registry_login(r: &mut Report, cfg: &Config, c: &AgentConfig) {
    let (addr, user, password) = (&c.registry_addr, &c.registry_user, &c.registry_password);
    if user.is_empty() || password.is_empty() {
        let fix = "set REGISTRY_USER and REGISTRY_PASSWORD on the control plane if the registry needs them";
        r.warn(
            "registry login",
            &format!("no credentials for {addr:?}"),
            fix,
        );
        return;
    }
    crate::sys::redact::add(password);
    let login = Docker::new(&cfg.docker_cli, &System)
        .login(addr, user, password)
        .map(|()| format!("logged in to {addr} as {user}"));
    let fix = "check REGISTRY_* on the control plane and that this host reaches the registry";
    r.check("registry login", login, fix);
}
