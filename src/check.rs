//! `muvee-agent check`: verifies this host can do its role. One line per check:
//! `ok`, `warn` or `error`, with a fix for anything not ok. Exit 1 on any error.

use crate::config::{Config, Role};
use crate::cp::client::Client;
use crate::sys::docker::{BuildMode, Docker};
use crate::sys::executor::{self, Cmd, System};
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
}

fn probe(program: &str, args: &[&str]) -> Result<String, String> {
    let cmd = Cmd::new(program)
        .args(args.iter().copied())
        .timeout(Duration::from_secs(20), "check timeout");
    executor::output(&cmd)
        .map(|o| o.stdout.lines().next().unwrap_or("").trim().to_string())
        .map_err(|e| e.to_string())
}

pub fn run(cfg: &Config) -> u8 {
    let mut r = Report { errors: 0 };
    let docker = cfg.docker_cli.as_str();
    match probe("git", &["--version"]) {
        Ok(v) => r.ok("git", &v),
        Err(e) => r.error("git", &e, "install git (apt-get install git)"),
    }
    match probe(docker, &["version", "--format", "{{.Client.Version}}"]) {
        Ok(v) => r.ok("docker CLI", &format!("{docker} {v}")),
        Err(e) => r.error("docker CLI", &e, "install the docker CLI or set DOCKER_CLI"),
    }
    match probe(docker, &["info", "--format", "{{.ServerVersion}}"]) {
        Ok(v) => r.ok("docker daemon", &format!("engine {v}")),
        Err(e) => r.error(
            "docker daemon",
            &e,
            "start dockerd and check access to its socket (DOCKER_HOST)",
        ),
    }
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
    if cfg.role != Some(Role::Builder) {
        match probe("rsync", &["--version"]) {
            Ok(v) => r.ok("rsync", &v),
            Err(e) => r.error(
                "rsync",
                &e,
                "install rsync (needed for dependency datasets)",
            ),
        }
    }
    match cfg.prepare_data_dir() {
        Ok(()) => r.ok(
            "DATA_DIR",
            &format!("{} is writable", cfg.data_dir.display()),
        ),
        Err(e) => r.error(
            "DATA_DIR",
            &e.0,
            "create the directory or set DATA_DIR to a writable path",
        ),
    }
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
    let client = Client::new(&cfg.control_plane_url, &cfg.agent_secret);
    match client.config() {
        Ok(c) => {
            r.ok(
                "control plane",
                &format!("{} reachable, secret accepted", cfg.control_plane_url),
            );
            if c.registry_user.is_empty() || c.registry_password.is_empty() {
                r.warn("registry login", &format!("no credentials for {:?}", c.registry_addr), "set REGISTRY_USER and REGISTRY_PASSWORD on the control plane if the registry needs them");
            } else {
                crate::sys::redact::add(&c.registry_password);
                match Docker::new(docker, &System).login(&c.registry_addr, &c.registry_user, &c.registry_password) {
                    Ok(()) => r.ok("registry login", &format!("logged in to {} as {}", c.registry_addr, c.registry_user)),
                    Err(e) => r.error("registry login", &e.to_string(), "check REGISTRY_* on the control plane and that this host reaches the registry"),
                }
            }
        }
        Err(e) => r.error(
            "control plane",
            &e.to_string(),
            "check CONTROL_PLANE_URL and AGENT_SECRET",
        ),
    }
    if r.errors > 0 {
        1
    } else {
        0
    }
}
