//! The host checks, as data: `muvee-agent check` prints them, the agent sends them as its
//! health report (today's server, `POST /api/agent/health-report`, §1.9). One implementation,
//! so the report and the command never disagree.
//!
//! The report carries the checks that need nothing from the operator: tools, DATA_DIR, the
//! settings, the shares (deploy role) and whether the registry answers. `check` adds the
//! control plane itself and a real registry login, which the running agent already does on
//! every heartbeat, and the compose policy in force.

use crate::config::{ComposePolicy, Config, DataDir};
use crate::cp::client::{self, Client};
use crate::cp::tls::Roots;
use crate::sys::docker::{BuildMode, Docker};
use crate::sys::executor::{Cmd, Runner};
use crate::sys::redact;
use crate::task::Role;
use crate::task::{clean_text, AgentConfig};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Error,
}

/// One check: the §1.9 element `{name, status, message, hint?}`, and the label `check`
/// prints (which predates the wire names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip)]
    pub label: &'static str,
}

impl Check {
    /// Messages quote command output and paths: scrubbed of secrets, and free of the
    /// characters the server's JSONB column refuses.
    fn new(name: &'static str, label: &'static str, status: Status, message: &str) -> Check {
        let message = clean_text(&redact::scrub(message)).into_owned();
        Check {
            name,
            status,
            message,
            hint: None,
            label,
        }
    }
    fn ok(name: &'static str, label: &'static str, message: &str) -> Check {
        Check::new(name, label, Status::Ok, message)
    }
    fn problem(
        name: &'static str,
        label: &'static str,
        status: Status,
        msg: &str,
        fix: &str,
    ) -> Check {
        Check {
            hint: Some(fix.to_string()),
            ..Check::new(name, label, status, msg)
        }
    }
    /// `ok` with the message, or `error` with the failure and the fix.
    fn of<E: std::fmt::Display>(
        name: &'static str,
        label: &'static str,
        res: Result<String, E>,
        fix: &str,
    ) -> Check {
        match res {
            Ok(msg) => Check::ok(name, label, &msg),
            Err(e) => Check::problem(name, label, Status::Error, &e.to_string(), fix),
        }
    }
}

/// The first line a command prints.
fn probe(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
) -> Result<String, crate::sys::executor::ExecError> {
    let cmd = Cmd::new(program)
        .args(args.iter().copied())
        .timeout(Duration::from_secs(20), "check timeout");
    let out = runner.output(&cmd)?;
    Ok(out.stdout.lines().next().unwrap_or("").trim().to_string())
}

/// Tools, DATA_DIR and settings of this host: git, docker (CLI, daemon, buildx on nodes that
/// may build), rsync on nodes that may deploy.
pub fn host(cfg: &Config, runner: &dyn Runner) -> Vec<Check> {
    let mut out = vec![Check::of(
        "git",
        "git",
        probe(runner, "git", &["--version"]),
        "install git (apt-get install git)",
    )];
    out.extend(docker(cfg, runner));
    if cfg.role != Some(Role::Builder) {
        let rsync = probe(runner, "rsync", &["--version"]);
        let fix = "install rsync (needed for dependency datasets)";
        out.push(Check::of("rsync", "rsync", rsync, fix));
    }
    out.extend(settings(cfg));
    out
}

fn docker(cfg: &Config, runner: &dyn Runner) -> Vec<Check> {
    let docker = cfg.docker_cli.as_str();
    let cli = probe(
        runner,
        docker,
        &["version", "--format", "{{.Client.Version}}"],
    );
    let daemon = probe(runner, docker, &["info", "--format", "{{.ServerVersion}}"]);
    let mut out = vec![
        Check::of(
            "docker_cli",
            "docker CLI",
            cli.map(|v| format!("{docker} {v}")),
            "install the docker CLI or set DOCKER_CLI",
        ),
        Check::of(
            "docker",
            "docker daemon",
            daemon.map(|v| format!("engine {v}")),
            "start dockerd and check access to its socket (DOCKER_HOST)",
        ),
    ];
    if cfg.role != Some(Role::Deploy) {
        out.push(match Docker::new(docker, runner).detect_build_mode() {
            BuildMode::Buildx => Check::ok("docker_buildx", "buildx", "docker buildx available"),
            mode => Check::problem(
                "docker_buildx",
                "buildx",
                Status::Warning,
                &format!("no buildx plugin; builds use {}", mode.describe()),
                "install the docker-buildx plugin for --platform and --push builds",
            ),
        });
    }
    out
}

/// DATA_DIR writable, NODE_ROLE set, AGENT_SECRET not empty.
fn settings(cfg: &Config) -> Vec<Check> {
    let (name, label) = ("data_dir", "DATA_DIR");
    let data_dir = match cfg.check_data_dir() {
        Ok(DataDir::Writable) => Check::ok(
            name,
            label,
            &format!("{} is writable", cfg.data_dir.display()),
        ),
        Ok(DataDir::Full(why)) => Check::problem(
            name,
            label,
            Status::Error,
            &format!("{why}; no task is taken until space returns"),
            "free space on DATA_DIR's filesystem (the agent resumes by itself)",
        ),
        Err(e) => Check::problem(
            name,
            label,
            Status::Error,
            &e.to_string(),
            "create the directory or set DATA_DIR to a writable path",
        ),
    };
    let mut out = vec![data_dir];
    out.push(match cfg.role {
        Some(role) => Check::ok("node_role", "NODE_ROLE", role.as_str()),
        None => Check::problem(
            "node_role",
            "NODE_ROLE",
            Status::Error,
            "not set",
            "set NODE_ROLE=builder or NODE_ROLE=deploy",
        ),
    });
    if cfg.agent_secret.is_empty() {
        out.push(Check::problem(
            "agent_secret",
            "AGENT_SECRET",
            Status::Warning,
            "empty",
            "set AGENT_SECRET to the control plane's secret",
        ));
    }
    out
}

/// Deploy role: whether compose projects are held to the baseline policy (`check` only: the
/// setting is the operator's, not the host's health).
pub fn compose_policy(cfg: &Config) -> Option<Check> {
    let (name, label) = ("compose_policy", "compose policy");
    match cfg.compose_policy {
        _ if cfg.role == Some(Role::Builder) => None,
        ComposePolicy::Baseline => Some(Check::ok(
            name,
            label,
            "baseline: privileged containers, host namespaces, devices, extra capabilities and host paths outside the app's dirs are refused",
        )),
        ComposePolicy::Off => Some(Check::problem(
            name,
            label,
            Status::Warning,
            "off: a compose project can run privileged containers and mount any host path",
            "set DEPLOY_COMPOSE_POLICY=baseline unless every project owner may be root on this node",
        )),
    }
}

/// Deploy role: the workspace and dataset shares the control plane names exist here.
pub fn shares(cfg: &Config, cp: &AgentConfig) -> Vec<Check> {
    if cfg.role == Some(Role::Builder) {
        return Vec::new();
    }
    vec![
        share("nfs_volume", "workspace share", &cp.volume_nfs_base_path),
        share("nfs_dataset", "dataset share", &cp.dataset_nfs_base_path),
    ]
}

fn share(name: &'static str, label: &'static str, path: &str) -> Check {
    let path = path.trim();
    if path.is_empty() {
        let fix = "set the NFS base paths on the control plane if apps use workspaces or datasets";
        return Check::problem(name, label, Status::Warning, "path not configured", fix);
    }
    match std::fs::metadata(Path::new(path)) {
        Ok(m) if m.is_dir() => Check::ok(name, label, &format!("{path} is accessible")),
        Ok(_) => Check::problem(
            name,
            label,
            Status::Error,
            &format!("{path} is not a directory"),
            "mount the share at this path",
        ),
        Err(e) => Check::problem(
            name,
            label,
            Status::Error,
            &format!("cannot access {path}: {e}"),
            "mount the share at this path",
        ),
    }
}

/// The registry answers `GET /v2/` (200, or 401 asking for a login): HTTPS, and plain HTTP
/// when HTTPS fails, as docker itself does for local and insecure registries.
pub fn registry(cp: &AgentConfig) -> Check {
    let (name, label) = ("registry", "registry");
    let addr = cp.registry_addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        let fix = "set REGISTRY_ADDR on the control plane";
        return Check::problem(name, label, Status::Warning, "no registry configured", fix);
    }
    let timeout = Duration::from_secs(5);
    let (https, http) = (format!("https://{addr}/v2/"), format!("http://{addr}/v2/"));
    let urls = if addr.starts_with("http://") || addr.starts_with("https://") {
        vec![format!("{addr}/v2/")]
    } else if loopback(addr) {
        // Docker talks plain HTTP to a local registry when HTTPS fails; asking that first
        // spares a TLS handshake (and TLS setup in an agent that has no other use for it).
        vec![http, https]
    } else {
        vec![https, http]
    };
    let mut first_err = None;
    for url in &urls {
        match client::http_status(url, timeout) {
            Ok(code @ (200 | 401)) => {
                let how = if url.starts_with("http://") {
                    " over plain HTTP"
                } else {
                    ""
                };
                return Check::ok(
                    name,
                    label,
                    &format!("registry reachable{how} (HTTP {code})"),
                );
            }
            Ok(code) => {
                let msg = format!("{url} answered HTTP {code}, not a registry's 200 or 401");
                return Check::problem(name, label, Status::Error, &msg, "check REGISTRY_ADDR");
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let why = first_err.map(|e| e.to_string()).unwrap_or_default();
    let fix = "check REGISTRY_ADDR on the control plane and that this host reaches the registry";
    Check::problem(
        name,
        label,
        Status::Error,
        &format!("cannot reach the registry: {why}"),
        fix,
    )
}

/// `127.0.0.1:5000`, `localhost:5000`, `[::1]:5000`: a registry on this host.
fn loopback(addr: &str) -> bool {
    let host = match addr.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `check` only: the control plane accepts the secret; its config for the checks after it.
pub fn control_plane(cfg: &Config) -> (Check, Option<AgentConfig>) {
    let url = &cfg.control_plane_url;
    let client = Roots::load(cfg.ca_file.as_deref())
        .map(|roots| Client::new(url, &cfg.agent_secret, &roots))
        .map_err(|e| e.to_string());
    match client.and_then(|c| c.config().map_err(|e| e.to_string())) {
        Ok(c) => {
            let msg = format!("{url} reachable, secret accepted");
            (Check::ok("control_plane", "control plane", &msg), Some(c))
        }
        Err(e) => {
            let fix = "check CONTROL_PLANE_URL and AGENT_SECRET";
            let c = Check::problem("control_plane", "control plane", Status::Error, &e, fix);
            (c, None)
        }
    }
}

/// `check` only: logs in to the registry the control plane names, when it hands out
/// credentials (the agent does this on every heartbeat).
pub fn registry_login(cfg: &Config, runner: &dyn Runner, c: &AgentConfig) -> Check {
    let (name, label) = ("registry_login", "registry login");
    let (addr, user, password) = (&c.registry_addr, &c.registry_user, &c.registry_password);
    if user.is_empty() || password.is_empty() {
        let fix = "set REGISTRY_USER and REGISTRY_PASSWORD on the control plane if the registry needs them";
        let msg = format!("no credentials for {addr:?}");
        return Check::problem(name, label, Status::Warning, &msg, fix);
    }
    redact::add(password);
    let login = Docker::new(&cfg.docker_cli, runner)
        .login(addr, user, password)
        .map(|()| format!("logged in to {addr} as {user}"));
    let fix = "check REGISTRY_* on the control plane and that this host reaches the registry";
    Check::of(name, label, login, fix)
}

/// What the agent reports every 2 minutes.
pub fn report(cfg: &Config, runner: &dyn Runner, cp: &AgentConfig) -> Vec<Check> {
    let mut checks = host(cfg, runner);
    checks.extend(shares(cfg, cp));
    checks.push(registry(cp));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Reply;
    use crate::work::ctx::testing::Harness;

    #[test]
    fn checks_are_data_in_the_shape_of_the_health_report() {
        let h = Harness::new("health-shape", &[("NODE_ROLE", "deploy")]);
        h.fake.on("docker version", Reply::Ok("28.2.2\n".into()));
        h.fake.on("docker info", Reply::Ok("20.10.24\n".into()));
        h.fake
            .on("git --version", Reply::Ok("git version 2.39.5\n".into()));
        h.fake.on(
            "rsync --version",
            Reply::Fail(127, "rsync: not found".into()),
        );
        let share = h.dir.join("volumes");
        std::fs::create_dir_all(&share).unwrap();
        let cp = AgentConfig {
            volume_nfs_base_path: share.display().to_string(),
            dataset_nfs_base_path: "/nonexistent/datasets".into(),
            ..AgentConfig::default()
        };
        let checks = report(&h.cfg, &*h.fake, &cp);
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "git",
                "docker_cli",
                "docker",
                "rsync",
                "data_dir",
                "node_role",
                "agent_secret",
                "nfs_volume",
                "nfs_dataset",
                "registry"
            ]
        );
        let json = serde_json::to_value(&checks).unwrap();
        assert_eq!(
            json[2],
            serde_json::json!({"name": "docker", "status": "ok", "message": "engine 20.10.24"})
        );
        assert_eq!(json[3]["status"], "error");
        assert_eq!(json[3]["message"], "rsync exited 127: rsync: not found");
        assert_eq!(
            json[3]["hint"],
            "install rsync (needed for dependency datasets)"
        );
        assert_eq!(json[6]["status"], "warning");
        assert_eq!(json[7]["status"], "ok");
        assert_eq!(json[8]["status"], "error");
        let msg = json[8]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("cannot access /nonexistent/datasets: "),
            "{msg}"
        );
        assert_eq!(json[9]["message"], "no registry configured");
        // Keys in the Go agent's order; no label on the wire.
        let text = serde_json::to_string(&checks[0]).unwrap();
        assert_eq!(
            text,
            r#"{"name":"git","status":"ok","message":"git version 2.39.5"}"#
        );
    }

    #[test]
    fn check_shows_the_compose_policy_and_warns_when_it_is_off() {
        let on = Harness::new("health-policy", &[("NODE_ROLE", "deploy")]);
        let c = compose_policy(&on.cfg).unwrap();
        assert_eq!((c.name, c.status), ("compose_policy", Status::Ok));
        assert!(c.message.starts_with("baseline: "), "{}", c.message);
        let off = Harness::new(
            "health-policy-off",
            &[("NODE_ROLE", "deploy"), ("DEPLOY_COMPOSE_POLICY", "off")],
        );
        let c = compose_policy(&off.cfg).unwrap();
        assert_eq!(c.status, Status::Warning);
        assert!(c.hint.unwrap().contains("DEPLOY_COMPOSE_POLICY=baseline"));
        let builder = Harness::new("health-policy-b", &[("NODE_ROLE", "builder")]);
        assert!(compose_policy(&builder.cfg).is_none());
    }

    #[test]
    fn builder_checks_buildx_not_rsync_or_shares() {
        let h = Harness::new("health-builder", &[("NODE_ROLE", "builder")]);
        let fake = &h.fake;
        fake.on(
            "docker buildx version",
            Reply::Fail(1, "unknown command".into()),
        );
        fake.on(
            "docker build --help",
            Reply::Ok("  --secret stringArray\n".into()),
        );
        let checks = report(&h.cfg, &**fake, &AgentConfig::default());
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "git",
                "docker_cli",
                "docker",
                "docker_buildx",
                "data_dir",
                "node_role",
                "agent_secret",
                "registry"
            ]
        );
        let buildx = &checks[3];
        assert_eq!(buildx.status, Status::Warning);
        assert!(
            buildx.message.contains("DOCKER_BUILDKIT=1 docker build"),
            "{}",
            buildx.message
        );
    }

    #[test]
    fn registry_reachability_over_https_then_http() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap_or(0);
                // A TLS ClientHello starts with 0x16: answer it with garbage and close.
                if buf[..n].first() == Some(&0x16) {
                    continue;
                }
                let _ = s.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        let cp = |addr: String| AgentConfig {
            registry_addr: addr,
            ..AgentConfig::default()
        };
        let c = registry(&cp(format!("127.0.0.1:{port}")));
        assert_eq!(
            (c.status, c.message.as_str()),
            (Status::Ok, "registry reachable over plain HTTP (HTTP 401)")
        );
        assert!(loopback("127.0.0.1:5000") && loopback("localhost:5000") && loopback("[::1]:5000"));
        assert!(!loopback("registry.example.com") && !loopback("10.0.0.1:5000"));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = registry(&cp(format!("127.0.0.1:{closed}")));
        assert_eq!(c.status, Status::Error);
        assert!(
            c.message.starts_with("cannot reach the registry: "),
            "{}",
            c.message
        );
    }
}
